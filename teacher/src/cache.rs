//! The persistent answer cache: one redb file mapping a key (question id, teacher name, every
//! sampling setting) to the ordered list of answer texts generated for it so far. Answer `i` of a
//! key never changes once written: lists only grow, by appending at their end.
//!
//! The key is the SHA-256 (hex) of a canonical string, so ids of any length and content make
//! fixed-size keys and no two different (id, teacher, settings) share one.
//!
//! The calls block (a commit syncs the file): async callers run them on the blocking pool.

use std::path::{Path, PathBuf};
use std::sync::RwLock;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use sha2::{Digest, Sha256};

use crate::error::TeacherError;
use ril_common::SamplingParams;

/// key -> JSON list of answer texts.
const ANSWERS: TableDefinition<&str, &str> = TableDefinition::new("answers_v1");

/// The cache key of `(id, teacher, settings)`.
pub fn cache_key(id: &str, teacher: &str, settings: &SamplingParams) -> String {
    // Lengths first, so that no id or name can run into the next field.
    let canonical = format!(
        "ril-teacher-cache/v1\nid={}:{id}\nteacher={}:{teacher}\n{}",
        id.len(),
        teacher.len(),
        canonical_sampling(settings)
    );
    Sha256::digest(canonical.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Every sampling setting of the key, exactly: floats by the bits of the `f32` they travel as
/// (the key of a user's existing cache file must keep matching), integers in decimal. Stop and
/// suppressed tokens are not settings a teacher takes (`options::validate_sampling`).
fn canonical_sampling(p: &SamplingParams) -> String {
    let bits = |x: f64| (x as f32).to_bits();
    format!(
        "temperature={:08x};top_p={:08x};top_k={};repetition_penalty={:08x};max_new_tokens={};seed={}",
        bits(p.temperature),
        bits(p.top_p),
        p.top_k,
        bits(p.repetition_penalty),
        p.max_new_tokens,
        p.seed
    )
}

#[derive(Debug)]
pub struct AnswerCache {
    /// `None` once closed.
    db: RwLock<Option<Database>>,
    path: Option<PathBuf>,
}

impl AnswerCache {
    /// Opens (or creates, with its parent directories) the cache file. Only one process may
    /// have it open.
    pub fn open(path: &Path) -> Result<Self, TeacherError> {
        let fail = |reason: String| TeacherError::Cache {
            path: Some(path.to_path_buf()),
            reason,
        };
        if let Some(parent) = path.parent()
            && !parent.as_os_str().is_empty()
        {
            std::fs::create_dir_all(parent)
                .map_err(|e| fail(format!("cannot create {}: {e}", parent.display())))?;
        }
        let db = Database::create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => {
                fail("already open (by another teacher server?)".into())
            }
            e => fail(format!("cannot open: {e}")),
        })?;
        Self::init(db, Some(path.to_path_buf()))
    }

    /// A cache that lives in memory and ends with the process.
    pub fn in_memory() -> Result<Self, TeacherError> {
        let db = Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .map_err(|e| TeacherError::Cache {
                path: None,
                reason: e.to_string(),
            })?;
        Self::init(db, None)
    }

    fn init(db: Database, path: Option<PathBuf>) -> Result<Self, TeacherError> {
        let cache = Self {
            db: RwLock::new(Some(db)),
            path,
        };
        // Create the table, so that readers never meet a missing one.
        cache.with_db(|db| {
            let txn = db.begin_write()?;
            txn.open_table(ANSWERS)?;
            txn.commit()?;
            Ok(())
        })?;
        Ok(cache)
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    fn error(&self, reason: impl std::fmt::Display) -> TeacherError {
        TeacherError::Cache {
            path: self.path.clone(),
            reason: reason.to_string(),
        }
    }

    fn with_db<T>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, redb::Error>,
    ) -> Result<T, TeacherError> {
        let guard = self.db.read().map_err(|_| self.error("lock poisoned"))?;
        let db = guard.as_ref().ok_or_else(|| self.error("closed"))?;
        f(db).map_err(|e| self.error(e))
    }

    /// The answers cached under `key`, in order (empty when none).
    pub fn get(&self, key: &str) -> Result<Vec<String>, TeacherError> {
        let raw = self.with_db(|db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(ANSWERS)?;
            Ok(table.get(key)?.map(|v| v.value().to_string()))
        })?;
        match raw {
            None => Ok(Vec::new()),
            Some(json) => serde_json::from_str(&json)
                .map_err(|e| self.error(format!("entry {key} is not a list of answers: {e}"))),
        }
    }

    /// Appends `answers` to `key`'s list, which must hold exactly `at` answers (the caller holds
    /// the key's lock, so anything else is a bug, and writing would shift answer indices).
    pub fn append(&self, key: &str, at: usize, answers: &[String]) -> Result<(), TeacherError> {
        let outcome = self.with_db(|db| {
            let txn = db.begin_write()?;
            let result = {
                let mut table = txn.open_table(ANSWERS)?;
                let current = table.get(key)?.map(|v| v.value().to_string());
                let mut list: Vec<String> = match current {
                    None => Vec::new(),
                    Some(json) => match serde_json::from_str(&json) {
                        Ok(list) => list,
                        Err(e) => {
                            return Ok(Err(format!("entry {key} is not a list of answers: {e}")));
                        }
                    },
                };
                if list.len() != at {
                    Err(format!(
                        "entry {key} holds {} answers, expected {at} before appending",
                        list.len()
                    ))
                } else {
                    list.extend_from_slice(answers);
                    let json = serde_json::to_string(&list).expect("strings serialise");
                    table.insert(key, json.as_str())?;
                    Ok(())
                }
            };
            if result.is_ok() {
                txn.commit()?;
            } else {
                txn.abort()?;
            }
            Ok(result)
        })?;
        outcome.map_err(|reason| self.error(reason))
    }

    /// How many keys hold answers.
    pub fn entries(&self) -> Result<u64, TeacherError> {
        self.with_db(|db| {
            let txn = db.begin_read()?;
            Ok(txn.open_table(ANSWERS)?.len()?)
        })
    }

    /// Closes the file (later calls fail); another process may open it afterwards.
    pub fn close(&self) {
        if let Ok(mut guard) = self.db.write() {
            guard.take();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_grow_by_appending_and_persist() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/cache.redb");
        let s = SamplingParams::default();
        let k = cache_key("q1", "big", &s);
        assert_eq!(k.len(), 64);
        assert_ne!(k, cache_key("q1", "small", &s));
        assert_ne!(k, cache_key("q2", "big", &s));
        {
            let c = AnswerCache::open(&path).unwrap();
            assert!(c.get(&k).unwrap().is_empty());
            c.append(&k, 0, &["a".into()]).unwrap();
            c.append(&k, 1, &["b".into(), "c".into()]).unwrap();
            let e = c.append(&k, 1, &["x".into()]).unwrap_err().to_string();
            assert!(e.contains("holds 3 answers"), "{e}");
            assert!(AnswerCache::open(&path).is_err());
            c.close();
            assert!(c.get(&k).unwrap_err().to_string().contains("closed"));
        }
        let c = AnswerCache::open(&path).unwrap();
        assert_eq!(c.get(&k).unwrap(), ["a", "b", "c"]);
        assert_eq!(c.entries().unwrap(), 1);
        let m = AnswerCache::in_memory().unwrap();
        assert_eq!(m.entries().unwrap(), 0);
    }

    /// Keys written by earlier versions must keep hitting: the exact text and digest of a key
    /// are pinned (they were made when the settings were `f32` fields).
    #[test]
    fn keys_are_byte_identical_to_the_ones_already_on_disk() {
        let paper = SamplingParams::default();
        assert_eq!(
            canonical_sampling(&paper),
            "temperature=3f800000;top_p=3f733333;top_k=50;repetition_penalty=3f866666;max_new_tokens=256;seed=0"
        );
        assert_eq!(
            cache_key("q1", "big", &paper),
            "22b8ce603d00964aa9ea8920ba922d65dc8c5a8e18a46b18ff8dee6afe900a23"
        );
        let tuned = SamplingParams {
            temperature: 0.7,
            top_p: 0.9,
            top_k: 5,
            repetition_penalty: 1.3,
            max_new_tokens: 10,
            seed: 3,
            ..paper.clone()
        };
        assert_eq!(
            canonical_sampling(&tuned),
            "temperature=3f333333;top_p=3f666666;top_k=5;repetition_penalty=3fa66666;max_new_tokens=10;seed=3"
        );
        // A value that came over the wire as f32 makes the same key as the same value written
        // in the config.
        let from_wire = SamplingParams {
            temperature: f64::from(0.7f32),
            top_p: f64::from(0.9f32),
            repetition_penalty: f64::from(1.3f32),
            ..tuned.clone()
        };
        assert_eq!(
            cache_key("q1", "big", &from_wire),
            cache_key("q1", "big", &tuned)
        );
    }

    #[test]
    fn every_setting_is_part_of_the_key() {
        let base = SamplingParams::default();
        type Edit = fn(&mut SamplingParams);
        let edits: [Edit; 6] = [
            |p| p.temperature = 0.7,
            |p| p.top_p = 0.9,
            |p| p.top_k = 5,
            |p| p.repetition_penalty = 1.0,
            |p| p.max_new_tokens = 7,
            |p| p.seed = 1,
        ];
        for edit in edits {
            let mut v = base.clone();
            edit(&mut v);
            assert_ne!(canonical_sampling(&v), canonical_sampling(&base), "{v:?}");
        }
    }
}
