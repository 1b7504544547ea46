//! What the coordinator needs to run: the run's shape (dataset, seed, B, iterations, staleness),
//! its timing (leases, heartbeats), where it keeps its state, and the settings it hands to
//! every actor that registers. The CLI maps the run config onto this struct.

use std::path::PathBuf;
use std::time::Duration;

use ril_common::SamplingParams;

use crate::error::{CoordinatorError, Result};

/// The coordinator's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct CoordinatorOptions {
    /// The run's name. Empty: a fresh run gets a generated one, a resumed run keeps its own.
    /// A resumed run whose state names another run is refused.
    pub run_id: String,
    /// A dataset directory (its train split, `train.jsonl` or `train.parquet`, is used) or a
    /// `.jsonl` / `.parquet` file.
    pub dataset: PathBuf,
    /// Shuffle seed: epoch `e` of the question stream is the dataset shuffled with `seed + e`.
    pub seed: u64,
    /// B: questions (groups) per learner iteration.
    pub questions_per_iteration: u64,
    /// The run ends when the learner has published this version (after this many iterations).
    pub total_iterations: u64,
    /// How long an actor has to roll out a lease (and, after it completes the lease, how long the
    /// learner has to accept its groups) before its questions are re-issued.
    pub lease_timeout: Duration,
    /// How often actors heartbeat (handed to them at registration).
    pub heartbeat_interval: Duration,
    /// An actor not heard from for this long is gone: its open leases expire. A few heartbeat
    /// intervals.
    pub actor_timeout: Duration,
    /// k: questions of iteration `i` are leased once the policy version is at least `i - k`.
    /// 0 (the default) is synchronous on-policy: actors wait for version `v + 1`.
    pub staleness_bound: u64,
    /// Where the run's state file lives; `None` keeps the state in memory only (a restart
    /// starts over).
    pub state_dir: Option<PathBuf>,
    /// Skip dataset rows that fail to parse or whose images do not decode (logged and counted)
    /// instead of refusing to start.
    pub skip_bad_rows: bool,
    /// Learner ranks that rendezvous through `JoinLearner`.
    pub learner_world_size: u32,
    /// The retry hint returned with an empty lease.
    pub lease_retry_after: Duration,
    /// The progress watchdog's limit: a run that has not advanced (no group accepted, no
    /// version published) for this long stops with an error naming what it was waiting for.
    /// `None`: no limit (the wait is still shown by `GetStatus`).
    pub stall_limit: Option<Duration>,
    /// Handed to every actor at registration.
    pub actor: ActorSettings,
}

/// The part of `RegisterActorResponse` that the coordinator only passes through.
#[derive(Debug, Clone, PartialEq)]
pub struct ActorSettings {
    /// G: student rollouts per question.
    pub group_size: u32,
    /// Teacher answers per group, shared round-robin across the teachers.
    pub teacher_slots: u32,
    pub teacher_addrs: Vec<String>,
    pub discriminator_addr: String,
    pub learner_addr: String,
    /// How actors sample the student.
    pub sampling: SamplingParams,
    /// What actors ask the teachers for; `None`: the teacher servers' own settings (which key
    /// their caches).
    pub teacher_sampling: Option<SamplingParams>,
}

impl Default for ActorSettings {
    fn default() -> Self {
        Self {
            group_size: 4,
            teacher_slots: 4,
            teacher_addrs: Vec::new(),
            discriminator_addr: String::new(),
            learner_addr: String::new(),
            // The paper's sampling with 256 new tokens, seed 0.
            sampling: SamplingParams::default(),
            teacher_sampling: Some(SamplingParams::default()),
        }
    }
}

impl Default for CoordinatorOptions {
    /// Every setting but `dataset` (which must be set).
    fn default() -> Self {
        Self {
            run_id: String::new(),
            dataset: PathBuf::new(),
            seed: 0,
            questions_per_iteration: 8,
            total_iterations: 100,
            lease_timeout: Duration::from_secs(600),
            heartbeat_interval: Duration::from_secs(5),
            actor_timeout: Duration::from_secs(30),
            staleness_bound: 0,
            state_dir: None,
            skip_bad_rows: false,
            learner_world_size: 1,
            lease_retry_after: Duration::from_millis(250),
            stall_limit: Some(Duration::from_secs(1800)),
            actor: ActorSettings::default(),
        }
    }
}

impl CoordinatorOptions {
    /// Positions in the run's question stream: `total_iterations * B`.
    pub fn total_positions(&self) -> u64 {
        self.total_iterations
            .saturating_mul(self.questions_per_iteration)
    }

    /// Checks every setting; the error names the one that is wrong.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(CoordinatorError::Options(m));
        if self.dataset.as_os_str().is_empty() {
            return bad("dataset: no dataset path given".into());
        }
        if self.questions_per_iteration == 0 {
            return bad("questions_per_iteration must be at least 1".into());
        }
        if self.total_iterations == 0 {
            return bad("total_iterations must be at least 1".into());
        }
        if self
            .total_iterations
            .checked_mul(self.questions_per_iteration)
            .is_none()
        {
            return bad("total_iterations * questions_per_iteration overflows u64".into());
        }
        for (name, d) in [
            ("lease_timeout", self.lease_timeout),
            ("heartbeat_interval", self.heartbeat_interval),
            ("actor_timeout", self.actor_timeout),
        ] {
            if d.is_zero() {
                return bad(format!("{name} must be positive"));
            }
        }
        if self.actor_timeout < self.heartbeat_interval {
            return bad(format!(
                "actor_timeout ({:?}) must be at least heartbeat_interval ({:?})",
                self.actor_timeout, self.heartbeat_interval
            ));
        }
        if let Some(limit) = self.stall_limit
            && limit <= self.actor_timeout
        {
            return bad(format!(
                "stall_limit ({limit:?}) must be longer than actor_timeout ({:?}): a run is \
                 only stalled once a dead actor's questions could have been handed out again",
                self.actor_timeout
            ));
        }
        if self.learner_world_size == 0 {
            return bad("learner_world_size must be at least 1".into());
        }
        if self.actor.group_size == 0 {
            return bad("actor.group_size must be at least 1".into());
        }
        if self.run_id.chars().any(|c| c.is_control()) {
            return bad(format!(
                "run_id {:?} contains control characters",
                self.run_id
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_setting() {
        let mut o = CoordinatorOptions {
            dataset: "d".into(),
            ..Default::default()
        };
        o.validate().unwrap();
        o.questions_per_iteration = 0;
        assert!(
            o.validate()
                .unwrap_err()
                .to_string()
                .contains("questions_per_iteration")
        );
        o.questions_per_iteration = 4;
        o.actor_timeout = Duration::from_secs(1);
        assert!(
            o.validate()
                .unwrap_err()
                .to_string()
                .contains("actor_timeout")
        );
        o.actor_timeout = Duration::from_secs(60);
        o.learner_world_size = 0;
        assert!(
            o.validate()
                .unwrap_err()
                .to_string()
                .contains("learner_world_size")
        );
        o.learner_world_size = 1;
        o.dataset = PathBuf::new();
        assert!(o.validate().unwrap_err().to_string().contains("dataset"));
    }
}
