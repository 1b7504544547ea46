//! The run config (`run.toml`): one strict TOML file with every role's section. Unknown keys
//! anywhere are errors naming the key. Run-level settings live once (in `[run]`, `[data]`,
//! `[student]`, `[rollout]`) and are filled into the role sections they concern; a role
//! section that repeats one of them with a different value is refused.
//!
//! ```toml
//! [run]
//! id = "demo"                 # the run's name (state and checkpoints are keyed by it)
//! dir = "runs/demo"           # everything the run writes
//! seed = 0
//! iterations = 8              # learner steps (policy versions)
//! questions_per_iteration = 4 # B
//! staleness_bound = 0         # k: 0 = synchronous on-policy
//! device = "cuda:0"           # optional: every role's device unless it names its own
//!
//! [data]
//! path = "data/shapes"        # dataset dir (its train split) or a .jsonl / .parquet file
//!
//! [student]
//! checkpoint = "models/builtin/student"
//!
//! [rollout]
//! group_size = 4              # G student rollouts per question
//! teacher_slots = 4           # G teacher answers, shared round-robin by the teachers
//! max_new_tokens = 32         # plus temperature, top_p, top_k, repetition_penalty
//!
//! [network]                   # how roles reach each other (Kubernetes: service names)
//! coordinator = "ril-coordinator:50051"
//! discriminator = "ril-discriminator:50053"
//! teachers = { terse = "ril-teacher-terse:50061" }
//!
//! [learner.grpo]              # Dr.GRPO: clip_eps, kl_beta, rewards and teachers on/off, lr ...
//! [discriminator]             # D: lr, frozen, include_question ..., [discriminator.judge]
//! [[teachers]]                # name + backend = "candle" | "openai" | "replay"
//! [actors]                    # count (local mode), questions_per_lease, device, rpc_timeout_ms,
//!                             # teacher_timeout_ms, push_timeout_ms, coordinator_deadline_ms
//! ```
//!
//! Devices: `[run] device = "cuda:0"` puts every role on that GPU; `[actors]`, `[learner]`,
//! `[discriminator]` and a candle `[[teachers]]` entry each take their own `device`, which wins.
//! Default: `cpu`.
//!
//! [`RunConfig::parse`] reads it in named steps (`parse.rs`); [`RunConfig::to_toml`] writes a
//! config back in the same shape (`write.rs`), so that programs (the demo, the ablation) build
//! run configs from typed values and users read what they would have written.
//!
//! **Architecture invariant:** no generated (`ril.v1`) types in the config's own types: the
//! student's sampling is a [`SamplingParams`].

mod error;
mod parse;
pub mod sections;
mod write;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ril_common::SamplingParams;

pub use error::ConfigError;
pub use sections::{
    ActorsSection, CoordinatorSection, DataSection, NetworkSection, RolloutSection, RunSection,
    StudentSection,
};

/// The sections a run config may have.
pub const TOP_LEVEL: &[&str] = &[
    "run",
    "data",
    "student",
    "rollout",
    "network",
    "coordinator",
    "actors",
    "learner",
    "discriminator",
    "teachers",
    "security",
];

/// The parsed, validated run config.
#[derive(Debug, Clone, PartialEq)]
pub struct RunConfig {
    /// Where the config lives: relative paths in it are relative to its directory.
    pub path: PathBuf,
    pub run: RunSection,
    pub data: DataSection,
    pub student: StudentSection,
    pub rollout: RolloutSection,
    pub network: NetworkSection,
    pub coordinator: CoordinatorSection,
    pub actors: ActorsSection,
    pub learner: ril_learner::LearnerOptions,
    pub discriminator: ril_discriminator::DiscriminatorOptions,
    pub teachers: Vec<ril_teacher::TeacherOptions>,
    /// `[security]`: the run token, the CA and role certificates, mutual TLS, the opt-out.
    pub security: ril_proto::security::SecurityConfig,
}

impl RunConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates; relative paths are relative to the config file's directory.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let cfg = Self::from_table(parse::read_table(text, path)?, path)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The config a file at `path` with just these four sections would give: every other
    /// section at its defaults, the run-level keys filled in. Relative paths are relative to
    /// `path`'s directory, as in a file. Not validated (nothing need exist yet): change what
    /// differs, [`RunConfig::save`] it and [`RunConfig::load`] it back.
    pub fn new(
        path: &Path,
        run: RunSection,
        data: DataSection,
        student: StudentSection,
        rollout: RolloutSection,
    ) -> Result<Self, ConfigError> {
        let not_writable = |error| ConfigError::NotWritable {
            path: path.to_path_buf(),
            error: Box::new(error),
        };
        let mut table = toml::Table::new();
        table.insert(
            "run".into(),
            toml::Value::try_from(run).map_err(not_writable)?,
        );
        table.insert(
            "data".into(),
            toml::Value::try_from(data).map_err(not_writable)?,
        );
        let student = toml::Value::try_from(student).map_err(not_writable)?;
        table.insert("student".into(), student);
        let rollout = toml::Value::try_from(rollout).map_err(not_writable)?;
        table.insert("rollout".into(), rollout);
        Self::from_table(table, path)
    }

    fn invalid(&self, problem: String) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.clone(),
            problem,
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.validate_run_level()?;
        self.validate_teachers()?;
        self.validate_roles()?;
        if !self.data.path.exists() {
            return Err(self.invalid(format!(
                "[data] path {} does not exist",
                self.data.path.display()
            )));
        }
        if !self.student.checkpoint.is_dir() {
            return Err(self.invalid(format!(
                "[student] checkpoint {} is not a model directory",
                self.student.checkpoint.display()
            )));
        }
        Ok(())
    }

    fn validate_run_level(&self) -> Result<(), ConfigError> {
        if self.run.id.is_empty() {
            return Err(self.invalid("[run] id is empty".into()));
        }
        if self.run.iterations == 0 || self.run.questions_per_iteration == 0 {
            return Err(self
                .invalid("[run] iterations and questions_per_iteration must be positive".into()));
        }
        if self.rollout.group_size == 0 {
            return Err(self.invalid("[rollout] group_size must be positive".into()));
        }
        if self.rollout.max_new_tokens == 0 {
            return Err(self.invalid("[rollout] max_new_tokens must be positive".into()));
        }
        let actors = &self.actors;
        if [
            actors.rpc_timeout_ms,
            actors.teacher_timeout_ms,
            actors.push_timeout_ms,
            actors.coordinator_deadline_ms,
        ]
        .contains(&0)
        {
            return Err(self.invalid(
                "[actors] rpc_timeout_ms, teacher_timeout_ms, push_timeout_ms and \
                 coordinator_deadline_ms must be positive (they are deadlines)"
                    .into(),
            ));
        }
        // The forms only: each role opens its device where it runs, which need not be here.
        let devices = [("run.device", self.run.device.as_deref())]
            .into_iter()
            .chain([("actors.device", Some(self.actors.device.as_str()))]);
        for (key, device) in devices {
            if let Some(Err(error)) = device.map(str::parse::<ril_model::DeviceSpec>) {
                return Err(ConfigError::Device {
                    path: self.path.clone(),
                    key,
                    error,
                });
            }
        }
        // The check every actor makes of these settings when it registers, made here so that a
        // bad temperature or top_p stops `ril config check` instead of every actor later.
        self.student_sampling()
            .validate()
            .map_err(|error| ConfigError::Sampling {
                path: self.path.clone(),
                error,
            })
    }

    fn validate_teachers(&self) -> Result<(), ConfigError> {
        let mut names = BTreeSet::new();
        for t in &self.teachers {
            if !names.insert(t.name.clone()) {
                return Err(self.invalid(format!("two teachers are named {:?}", t.name)));
            }
            t.validate().map_err(|error| ConfigError::TeacherOptions {
                path: self.path.clone(),
                name: t.name.clone(),
                error: Box::new(error),
            })?;
        }
        if let Some(n) = self.network.teachers.keys().find(|n| !names.contains(*n)) {
            return Err(self.invalid(format!(
                "[network] teachers names {n:?}, which no [[teachers]] entry defines"
            )));
        }
        if self.teacher_slots() > 0 && self.teachers.is_empty() {
            return Err(self.invalid(format!(
                "[rollout] teacher_slots is {} but no [[teachers]] are configured (set teacher_slots = 0 for RL without teachers)",
                self.teacher_slots()
            )));
        }
        Ok(())
    }

    fn validate_roles(&self) -> Result<(), ConfigError> {
        self.discriminator
            .validate()
            .map_err(|error| ConfigError::Discriminator {
                path: self.path.clone(),
                error: Box::new(error),
            })?;
        // The coordinator's address may come from the command line instead; any address
        // stands in for it here.
        let mut l = self.learner.clone();
        if l.coordinator_addr.is_empty() {
            l.coordinator_addr = "127.0.0.1:1".into();
        }
        l.validate().map_err(|error| ConfigError::Learner {
            path: self.path.clone(),
            error: Box::new(error),
        })
    }

    pub fn teacher_slots(&self) -> u32 {
        self.rollout
            .teacher_slots
            .unwrap_or(self.rollout.group_size)
    }

    /// Where teacher `name`'s answer cache goes unless its `[[teachers]]` entry names one.
    pub fn default_teacher_cache(&self, name: &str) -> PathBuf {
        parse::default_teacher_cache(&self.run, name)
    }

    /// The student's sampling: `[rollout]` with the run's seed. A zero `top_p` or
    /// `repetition_penalty` turns it off (1), as a zero does on the wire.
    pub fn student_sampling(&self) -> SamplingParams {
        let or_one = |x: f64| if x == 0.0 { 1.0 } else { x };
        SamplingParams {
            temperature: self.rollout.temperature,
            top_p: or_one(self.rollout.top_p),
            top_k: self.rollout.top_k as usize,
            repetition_penalty: or_one(self.rollout.repetition_penalty),
            max_new_tokens: self.rollout.max_new_tokens as usize,
            stop_token_ids: Vec::new(),
            suppress_token_ids: Vec::new(),
            seed: self.run.seed,
        }
    }

    /// The coordinator's options, with the peers' addresses as given.
    pub fn coordinator_options(
        &self,
        teacher_addrs: Vec<String>,
        discriminator_addr: String,
    ) -> ril_coordinator::CoordinatorOptions {
        let mut o = ril_coordinator::CoordinatorOptions {
            run_id: self.run.id.clone(),
            dataset: self.data.path.clone(),
            seed: self.run.seed,
            questions_per_iteration: self.run.questions_per_iteration,
            total_iterations: self.run.iterations,
            lease_timeout: Duration::from_secs(self.coordinator.lease_timeout_s),
            heartbeat_interval: Duration::from_millis(self.coordinator.heartbeat_interval_ms),
            actor_timeout: Duration::from_secs(self.coordinator.actor_timeout_s),
            staleness_bound: self.run.staleness_bound,
            state_dir: Some(self.run.dir.join("coordinator")),
            skip_bad_rows: self.data.skip_bad_rows,
            learner_world_size: self.learner.world_size,
            lease_retry_after: Duration::from_millis(self.coordinator.lease_retry_ms),
            stall_limit: (self.coordinator.stall_limit_s > 0)
                .then(|| Duration::from_secs(self.coordinator.stall_limit_s)),
            ..Default::default()
        };
        o.actor.group_size = self.rollout.group_size;
        o.actor.teacher_slots = self.teacher_slots();
        o.actor.teacher_addrs = teacher_addrs;
        o.actor.discriminator_addr = discriminator_addr;
        o.actor.learner_addr = self.network.learner.clone().unwrap_or_default();
        o.actor.sampling = self.student_sampling();
        // None: actors ask teachers for answers drawn with the teacher servers' own settings
        // (which key their caches).
        o.actor.teacher_sampling = None;
        o
    }

    /// Teacher addresses from `[network] teachers`, in `[[teachers]]` order.
    pub fn teacher_addrs(&self) -> Result<Vec<String>, ConfigError> {
        self.teachers
            .iter()
            .map(|t| {
                self.network.teachers.get(&t.name).cloned().ok_or_else(|| {
                    ConfigError::NoTeacherAddress {
                        path: self.path.clone(),
                        name: t.name.clone(),
                    }
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
