//! The persistent answer cache: one redb file mapping a key (question id, teacher name, every
//! sampling setting) to the ordered list of answer texts generated for it so far. Answer `i` of a
//! key never changes once written: lists only grow, by appending at their end.
//!
//! The key is the SHA-256 (hex) of a canonical string, so ids of any length and content make
//! fixed-size keys and no two different (id, teacher, settings) share one.
//!
//! The cache holds at most `max_entries` keys. When a write makes it hold more, the key
//! written longest ago is evicted (first in, first out by the latest write: appending answers to
//! a key makes it the newest). An RIL run asks for each question's answers about once an epoch,
//! so the key written longest ago is also the one used longest ago, and reads need no write to
//! keep an order. A key evicted while a request was generating more answers for it is not
//! written again from the middle (answer `i` would shift): the request's answers are sent, not
//! kept, and the next request generates the key's answers from the start. Files written before
//! the limit existed get their order (by key) when opened.
//!
//! The calls block (a commit syncs the file): async callers run them on the blocking pool.

use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use sha2::{Digest, Sha256};

use crate::error::TeacherError;
use ril_common::SamplingParams;

/// key -> JSON list of answer texts.
const ANSWERS: TableDefinition<&str, &str> = TableDefinition::new("answers_v1");
/// Write order -> key, and key -> its place in that order (the eviction order).
const ORDER: TableDefinition<u64, &str> = TableDefinition::new("order_v1");
const PLACE: TableDefinition<&str, u64> = TableDefinition::new("place_v1");

/// The keys a cache holds unless the teacher's `cache_max_entries` says otherwise.
pub const DEFAULT_MAX_ENTRIES: u64 = 100_000;

/// What an append did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// The answers are kept; `evicted` older keys made room.
    Kept { evicted: u64 },
    /// The key was evicted while its answers were being generated: these are not kept.
    KeyEvicted,
}

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
    max_entries: u64,
    /// Keys evicted since the cache was opened.
    evicted: AtomicU64,
}

impl AnswerCache {
    /// Opens (or creates, with its parent directories) the cache file, holding at most
    /// `max_entries` keys (a file holding more is cut down to the newest). Only one process
    /// may have it open.
    pub fn open(path: &Path, max_entries: u64) -> Result<Self, TeacherError> {
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
        Self::init(db, Some(path.to_path_buf()), max_entries)
    }

    /// A cache that lives in memory, holds at most `max_entries` keys and ends with the
    /// process.
    pub fn in_memory(max_entries: u64) -> Result<Self, TeacherError> {
        let db = Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .map_err(|e| TeacherError::Cache {
                path: None,
                reason: e.to_string(),
            })?;
        Self::init(db, None, max_entries)
    }

    fn init(db: Database, path: Option<PathBuf>, max_entries: u64) -> Result<Self, TeacherError> {
        let cache = Self {
            db: RwLock::new(Some(db)),
            path,
            max_entries: max_entries.max(1),
            evicted: AtomicU64::new(0),
        };
        // Create the tables, so that readers never meet a missing one; give keys written
        // before the eviction order existed a place in it; apply the limit.
        let evicted = cache.with_db(|db| {
            let txn = db.begin_write()?;
            {
                let answers = txn.open_table(ANSWERS)?;
                let mut order = txn.open_table(ORDER)?;
                let mut place = txn.open_table(PLACE)?;
                // Every key has a place once the order is complete: only a file from before the
                // limit (or one cut short) is scanned, not every file at every start.
                if place.len()? < answers.len()? {
                    let mut next = order.last()?.map_or(0, |(k, _)| k.value() + 1);
                    for entry in answers.iter()? {
                        let (key, _) = entry?;
                        if place.get(key.value())?.is_none() {
                            order.insert(next, key.value())?;
                            place.insert(key.value(), next)?;
                            next += 1;
                        }
                    }
                }
            }
            let evicted = evict_beyond(&txn, cache.max_entries)?;
            txn.commit()?;
            Ok(evicted)
        })?;
        if evicted > 0 {
            tracing::info!(
                cache = %cache.describe(),
                evicted,
                max_entries = cache.max_entries,
                "answer cache cut down to its limit"
            );
        }
        cache.evicted.store(evicted, Ordering::Relaxed);
        Ok(cache)
    }

    fn describe(&self) -> String {
        self.path
            .as_ref()
            .map_or_else(|| "(in memory)".into(), |p| p.display().to_string())
    }

    /// Keys evicted since the cache was opened.
    pub fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }

    /// The most keys the cache holds.
    pub fn max_entries(&self) -> u64 {
        self.max_entries
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
    /// the key's lock, so anything else is a bug, and writing would shift answer indices) or
    /// none when the key was evicted meanwhile ([`Appended::KeyEvicted`]: nothing is written).
    /// The key becomes the newest; keys beyond the limit are evicted, oldest first.
    pub fn append(
        &self,
        key: &str,
        at: usize,
        answers: &[String],
    ) -> Result<Appended, TeacherError> {
        let max_entries = self.max_entries;
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
                if list.is_empty() && at > 0 {
                    Ok(Appended::KeyEvicted)
                } else if list.len() != at {
                    Err(format!(
                        "entry {key} holds {} answers, expected {at} before appending",
                        list.len()
                    ))
                } else {
                    list.extend_from_slice(answers);
                    let json = serde_json::to_string(&list).expect("strings serialise");
                    table.insert(key, json.as_str())?;
                    drop(table);
                    make_newest(&txn, key)?;
                    let evicted = evict_beyond(&txn, max_entries)?;
                    Ok(Appended::Kept { evicted })
                }
            };
            match result {
                Ok(Appended::Kept { .. }) => txn.commit()?,
                _ => txn.abort()?,
            }
            Ok(result)
        })?;
        let appended = outcome.map_err(|reason| self.error(reason))?;
        if let Appended::Kept { evicted } = appended {
            self.evicted.fetch_add(evicted, Ordering::Relaxed);
        }
        Ok(appended)
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

/// Moves `key` to the end of the eviction order.
fn make_newest(txn: &redb::WriteTransaction, key: &str) -> Result<(), redb::Error> {
    let mut order = txn.open_table(ORDER)?;
    let mut place = txn.open_table(PLACE)?;
    let old = place.get(key)?.map(|v| v.value());
    if let Some(old) = old {
        order.remove(old)?;
    }
    let next = order.last()?.map_or(0, |(k, _)| k.value() + 1);
    order.insert(next, key)?;
    place.insert(key, next)?;
    Ok(())
}

/// Evicts keys, oldest first, until at most `max_entries` remain; returns how many went.
fn evict_beyond(txn: &redb::WriteTransaction, max_entries: u64) -> Result<u64, redb::Error> {
    let mut answers = txn.open_table(ANSWERS)?;
    let mut order = txn.open_table(ORDER)?;
    let mut place = txn.open_table(PLACE)?;
    let mut evicted = 0;
    while answers.len()? > max_entries {
        let Some(key) = order.pop_first()?.map(|(_, k)| k.value().to_string()) else {
            break;
        };
        answers.remove(key.as_str())?;
        place.remove(key.as_str())?;
        evicted += 1;
    }
    Ok(evicted)
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
            let c = AnswerCache::open(&path, DEFAULT_MAX_ENTRIES).unwrap();
            assert!(c.get(&k).unwrap().is_empty());
            c.append(&k, 0, &["a".into()]).unwrap();
            c.append(&k, 1, &["b".into(), "c".into()]).unwrap();
            let e = c.append(&k, 1, &["x".into()]).unwrap_err().to_string();
            assert!(e.contains("holds 3 answers"), "{e}");
            assert!(AnswerCache::open(&path, DEFAULT_MAX_ENTRIES).is_err());
            c.close();
            assert!(c.get(&k).unwrap_err().to_string().contains("closed"));
        }
        let c = AnswerCache::open(&path, DEFAULT_MAX_ENTRIES).unwrap();
        assert_eq!(c.get(&k).unwrap(), ["a", "b", "c"]);
        assert_eq!(c.entries().unwrap(), 1);
        let m = AnswerCache::in_memory(DEFAULT_MAX_ENTRIES).unwrap();
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

    fn answers(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("answer {i}")).collect()
    }

    #[test]
    fn a_full_cache_evicts_the_key_written_longest_ago() {
        let c = AnswerCache::in_memory(3).unwrap();
        for k in ["k1", "k2", "k3"] {
            assert_eq!(
                c.append(k, 0, &answers(1)).unwrap(),
                Appended::Kept { evicted: 0 }
            );
        }
        // k1 is the oldest write: the fourth key evicts it.
        assert_eq!(
            c.append("k4", 0, &answers(2)).unwrap(),
            Appended::Kept { evicted: 1 }
        );
        assert!(c.get("k1").unwrap().is_empty());
        assert_eq!(c.entries().unwrap(), 3);
        // More answers for k2 make it the newest: k3 goes next, not k2.
        c.append("k2", 1, &answers(1)).unwrap();
        c.append("k5", 0, &answers(1)).unwrap();
        assert!(c.get("k3").unwrap().is_empty());
        assert_eq!(c.get("k2").unwrap().len(), 2);
        assert_eq!(c.evicted(), 2);
        // A key evicted while its next answers were being generated is not written from the
        // middle (answer 1 would become answer 0).
        assert_eq!(
            c.append("k3", 1, &answers(1)).unwrap(),
            Appended::KeyEvicted
        );
        assert!(c.get("k3").unwrap().is_empty());
        // A non-empty list of the wrong length is still a bug, refused.
        let e = c.append("k2", 5, &answers(1)).unwrap_err().to_string();
        assert!(e.contains("holds 2 answers, expected 5"), "{e}");
    }

    #[test]
    fn a_cache_stays_within_its_limit_over_many_keys_and_across_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.redb");
        {
            let c = AnswerCache::open(&path, 50).unwrap();
            for i in 0..600 {
                c.append(&format!("key-{i:05}"), 0, &answers(4)).unwrap();
                assert!(c.entries().unwrap() <= 50);
            }
            assert_eq!(c.evicted(), 550);
            assert_eq!(c.get("key-00599").unwrap().len(), 4);
            assert!(c.get("key-00549").unwrap().is_empty());
        }
        // Reopened with a lower limit: cut down to the newest keys.
        let c = AnswerCache::open(&path, 10).unwrap();
        assert_eq!((c.entries().unwrap(), c.evicted()), (10, 40));
        assert_eq!(c.get("key-00590").unwrap().len(), 4);
        assert!(c.get("key-00589").unwrap().is_empty());
    }

    #[test]
    fn a_cache_file_from_before_the_limit_gets_an_order_and_is_cut_down() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.redb");
        {
            // A file as written before the eviction order existed: the answers table only.
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut t = txn.open_table(ANSWERS).unwrap();
                for k in ["a", "b", "c", "d"] {
                    t.insert(k, r#"["x"]"#).unwrap();
                }
            }
            txn.commit().unwrap();
        }
        let c = AnswerCache::open(&path, 3).unwrap();
        assert_eq!((c.entries().unwrap(), c.evicted()), (3, 1));
        // Ordered by key: "a" went; the others are kept and the limit holds for new keys.
        assert!(c.get("a").unwrap().is_empty());
        c.append("e", 0, &answers(1)).unwrap();
        assert!(c.get("b").unwrap().is_empty());
        assert_eq!(c.get("c").unwrap(), ["x"]);
    }
}
