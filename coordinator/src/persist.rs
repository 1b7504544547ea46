//! The run's state on disk: one JSON file, replaced atomically (temp file, fsync, rename, fsync
//! of the directory), written before any reply that depends on it.
//!
//! Only what a restart needs is kept: the cursor, the accepted positions (a watermark below
//! which every position is accepted plus the set above it), the version history, the run id,
//! the counters, the identity of the stream (dataset fingerprint, seed, B) so that a state
//! file is never applied to another run, and the leases open at the last write with their
//! deadlines: after a restart an open lease's positions stay with its actor until the lease's
//! deadline (so an actor still rolling them out is not raced by a re-issue), and every other
//! position below the cursor that is not accepted is re-issued.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{CoordinatorError, Result};

/// The state file's name inside `state_dir`.
pub const STATE_FILE: &str = "coordinator_state.json";

/// The state file's format version.
const FORMAT: u32 = 1;

/// How many of the latest published versions the state keeps (status shows them; a retried
/// publish and a learner's restart look at the latest only). The learner's `metrics.jsonl`
/// and checkpoints keep the full record.
pub const HISTORY_KEPT: usize = 64;

/// Positions accepted so far: all below `watermark`, plus `above`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcceptedSet {
    watermark: u64,
    above: BTreeSet<u64>,
}

impl AcceptedSet {
    pub fn contains(&self, p: u64) -> bool {
        p < self.watermark || self.above.contains(&p)
    }

    /// Adds `p`; false if it was already there.
    pub fn insert(&mut self, p: u64) -> bool {
        if self.contains(p) {
            return false;
        }
        self.above.insert(p);
        while self.above.first() == Some(&self.watermark) {
            self.above.pop_first();
            self.watermark += 1;
        }
        true
    }

    /// Removes `p`; false if it was not there. Removing below the watermark lowers it to `p`
    /// (the positions between move to the set; returns are recent, so the range is short).
    pub fn remove(&mut self, p: u64) -> bool {
        if p < self.watermark {
            self.above.extend(p + 1..self.watermark);
            self.watermark = p;
            true
        } else {
            self.above.remove(&p)
        }
    }

    pub fn len(&self) -> u64 {
        self.watermark + self.above.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many accepted positions are kept above the watermark.
    pub fn above_len(&self) -> usize {
        self.above.len()
    }

    /// Every position below this one is accepted.
    pub fn watermark(&self) -> u64 {
        self.watermark
    }

    fn is_consistent(&self) -> bool {
        self.above.first().is_none_or(|&f| f > self.watermark)
    }
}

/// One published policy version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRecord {
    pub version: u64,
    /// The iteration that produced it (`version - 1`).
    pub iteration: u64,
    /// Where the learner saved it.
    pub checkpoint: String,
    pub published_unix_ms: u64,
}

/// What identifies the question stream a state belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamIdentity {
    /// For messages only (a dataset may move between machines).
    pub dataset_path: String,
    pub rows: u64,
    /// SHA-256 over the usable rows' ids in file order.
    pub fingerprint: String,
    pub seed: u64,
    pub questions_per_iteration: u64,
}

/// The state file's contents.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateFile {
    pub format: u32,
    pub run_id: String,
    pub stream: StreamIdentity,
    /// Next never-issued position.
    pub cursor: u64,
    pub accepted: AcceptedSet,
    /// The latest published policy version (0: the SFT checkpoint the run started from).
    pub version: u64,
    /// The latest [`HISTORY_KEPT`] published versions, oldest first.
    pub history: Vec<VersionRecord>,
    pub duplicates_refused: u64,
    pub leases_expired: u64,
    pub written_unix_ms: u64,
    /// SHA-256 (hex) of learner rank 0's publisher key (JoinLearner); empty until rank 0 joins.
    /// Kept across restarts so that a running rank 0 goes on publishing to a restarted
    /// coordinator. Older state files have none.
    #[serde(default)]
    pub publisher_key_sha256: String,
    /// The lease each accepted position of a not-yet-trained iteration was accepted under, so
    /// that AcceptGroup retried after an ambiguous failure (the learner saw a deadline or a
    /// broken connection after the commit) gets its original answer instead of "duplicate".
    /// Pruned as versions are published. Older state files have none.
    #[serde(default)]
    pub accepted_by: BTreeMap<u64, String>,
    /// The lease-id prefix of every coordinator that has served this run (one per start), so
    /// that AcceptGroup can tell a lease granted before a restart (whose grants are no longer
    /// known in detail: its group is taken if no other was) from one this run never issued.
    /// Older state files have none (their leases are then not checked).
    #[serde(default)]
    pub lease_prefixes: Vec<String>,
    /// The learner ranks as they last joined, so that a restarted coordinator still tells
    /// actors where rank 0 is and `GetStatus` still counts them. Not used for the rendezvous,
    /// which is among ranks that join after the coordinator's start (a restarted learner world
    /// binds new addresses). Older state files have none.
    #[serde(default)]
    pub learner_ranks: BTreeMap<u32, RankRecord>,
    /// The leases open at this write, by lease id (those with positions outstanding). Older
    /// state files have none (their outstanding positions are then all re-issued).
    #[serde(default)]
    pub open_leases: BTreeMap<String, OpenLease>,
}

/// A lease open when the state was written: what a restarted coordinator needs to honour it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenLease {
    pub actor_id: String,
    /// The deadline handed to the actor (wall clock: it outlives the process).
    pub deadline_unix_ms: u64,
    /// The version it was granted at.
    pub version: u64,
    /// Every position it was granted, in grant order.
    pub positions: Vec<u64>,
    /// Those neither accepted nor returned yet.
    pub outstanding: BTreeSet<u64>,
    /// The actor completed it (the rest await the learner's acceptance).
    pub completed: bool,
}

/// One learner rank's addresses, as it joined.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankRecord {
    pub addr: String,
    /// Empty: no CPU ring (world size 1, or NCCL).
    pub collective_addr: String,
}

impl StateFile {
    pub fn new(run_id: String, stream: StreamIdentity) -> Self {
        Self {
            format: FORMAT,
            run_id,
            stream,
            cursor: 0,
            accepted: AcceptedSet::default(),
            version: 0,
            history: Vec::new(),
            duplicates_refused: 0,
            leases_expired: 0,
            written_unix_ms: 0,
            publisher_key_sha256: String::new(),
            accepted_by: BTreeMap::new(),
            lease_prefixes: Vec::new(),
            learner_ranks: BTreeMap::new(),
            open_leases: BTreeMap::new(),
        }
    }

    /// Reads `path`; `Ok(None)` when there is no state file yet.
    pub fn load(path: &Path) -> Result<Option<Self>> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(CoordinatorError::io(path, e)),
        };
        let bad = |problem: String| CoordinatorError::State {
            path: path.to_path_buf(),
            problem,
        };
        let state: Self =
            serde_json::from_str(&text).map_err(|e| bad(format!("not a state file: {e}")))?;
        if state.format != FORMAT {
            return Err(bad(format!(
                "format {} is not the supported format {FORMAT}",
                state.format
            )));
        }
        if !state.accepted.is_consistent() {
            return Err(bad("accepted positions are inconsistent".into()));
        }
        if state.accepted.watermark > state.cursor
            || state
                .accepted
                .above
                .last()
                .is_some_and(|&l| l >= state.cursor)
        {
            return Err(bad(format!(
                "accepted positions reach past the cursor {}",
                state.cursor
            )));
        }
        Ok(Some(state))
    }

    /// Checks that this state belongs to the stream `current` describes; the error names what
    /// differs.
    pub fn check_identity(&self, current: &StreamIdentity, path: &Path) -> Result<()> {
        let bad = |problem: String| {
            Err(CoordinatorError::State {
                path: path.to_path_buf(),
                problem: format!("{problem}; use another state_dir for a new run"),
            })
        };
        let s = &self.stream;
        if s.seed != current.seed {
            return bad(format!(
                "the run was started with seed {}, not {}",
                s.seed, current.seed
            ));
        }
        if s.questions_per_iteration != current.questions_per_iteration {
            return bad(format!(
                "the run was started with {} questions per iteration, not {}",
                s.questions_per_iteration, current.questions_per_iteration
            ));
        }
        if s.rows != current.rows || s.fingerprint != current.fingerprint {
            return bad(format!(
                "the run was started on another dataset ({} with {} rows, fingerprint {}); \
                 {} has {} rows, fingerprint {}",
                s.dataset_path,
                s.rows,
                short(&s.fingerprint),
                current.dataset_path,
                current.rows,
                short(&current.fingerprint)
            ));
        }
        Ok(())
    }

    /// The file's bytes (compact JSON; `path` only names the file in an error).
    pub fn to_bytes(&self, path: &Path) -> Result<Vec<u8>> {
        serde_json::to_vec(self).map_err(|e| CoordinatorError::State {
            path: path.to_path_buf(),
            problem: format!("cannot serialise: {e}"),
        })
    }

    /// Writes the state to `path` atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        write_bytes(path, &self.to_bytes(path)?)
    }

    /// Records a published version, keeping the latest [`HISTORY_KEPT`] only, so that the
    /// state does not grow with the run's length.
    pub fn record_version(&mut self, record: VersionRecord) {
        self.history.push(record);
        let excess = self.history.len().saturating_sub(HISTORY_KEPT);
        self.history.drain(..excess);
    }
}

/// Writes a state file's bytes to `path` atomically (`ril_common::fs::write_atomic`).
pub fn write_bytes(path: &Path, bytes: &[u8]) -> Result<()> {
    ril_common::fs::write_atomic(path, bytes)?;
    Ok(())
}

fn short(fingerprint: &str) -> &str {
    fingerprint.get(..12).unwrap_or(fingerprint)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_set_compacts_into_a_watermark_and_reopens_below_it() {
        let mut a = AcceptedSet::default();
        assert!(a.insert(1));
        assert_eq!(a.watermark(), 0);
        assert!(a.insert(0));
        assert_eq!(a.watermark(), 2);
        assert!(!a.insert(1));
        assert!(a.insert(5));
        assert_eq!((a.watermark(), a.len()), (2, 3));
        assert!(a.insert(2) && a.insert(3) && a.insert(4));
        assert_eq!((a.watermark(), a.len()), (6, 6));
        assert!(a.remove(3));
        assert!(!a.contains(3) && a.contains(2) && a.contains(4) && a.contains(5));
        assert_eq!((a.watermark(), a.len()), (3, 5));
        assert!(!a.remove(3));
        assert!(a.insert(3));
        assert_eq!((a.watermark(), a.len()), (6, 6));
        assert!(a.is_consistent());
    }

    #[test]
    fn state_files_round_trip_atomically_and_refuse_another_stream() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATE_FILE);
        assert!(StateFile::load(&path).unwrap().is_none());
        let id = StreamIdentity {
            dataset_path: "a.jsonl".into(),
            rows: 10,
            fingerprint: "ab".repeat(32),
            seed: 3,
            questions_per_iteration: 4,
        };
        let mut s = StateFile::new("run".into(), id.clone());
        s.cursor = 9;
        s.accepted.insert(0);
        s.accepted.insert(7);
        s.open_leases.insert(
            "L1-0".into(),
            OpenLease {
                actor_id: "a1".into(),
                deadline_unix_ms: 123_456,
                version: 1,
                positions: vec![5, 6],
                outstanding: BTreeSet::from([6]),
                completed: false,
            },
        );
        s.save(&path).unwrap();
        assert!(!ril_common::fs::temp_sibling(&path).exists());
        let back = StateFile::load(&path).unwrap().unwrap();
        assert_eq!(back, s);
        back.check_identity(&id, &path).unwrap();
        let other_seed = StreamIdentity {
            seed: 4,
            ..id.clone()
        };
        let e = back
            .check_identity(&other_seed, &path)
            .unwrap_err()
            .to_string();
        assert!(e.contains("seed 3") && e.contains(STATE_FILE), "{e}");
        let other_b = StreamIdentity {
            questions_per_iteration: 8,
            ..id.clone()
        };
        let e = back
            .check_identity(&other_b, &path)
            .unwrap_err()
            .to_string();
        assert!(e.contains("questions per iteration"), "{e}");
        let other_data = StreamIdentity {
            fingerprint: "cd".repeat(32),
            ..id
        };
        let e = back
            .check_identity(&other_data, &path)
            .unwrap_err()
            .to_string();
        assert!(e.contains("another dataset"), "{e}");
        std::fs::write(&path, "{not json").unwrap();
        let e = StateFile::load(&path).unwrap_err().to_string();
        assert!(e.contains("not a state file"), "{e}");
    }
}
