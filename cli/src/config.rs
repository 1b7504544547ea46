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
//! [actors]                    # count (local mode), questions_per_lease, device
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;
use toml::Value;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSection {
    pub id: String,
    pub dir: PathBuf,
    #[serde(default)]
    pub seed: u64,
    pub iterations: u64,
    pub questions_per_iteration: u64,
    #[serde(default)]
    pub staleness_bound: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    pub path: PathBuf,
    #[serde(default)]
    pub skip_bad_rows: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudentSection {
    pub checkpoint: PathBuf,
}

fn d_temperature() -> f32 {
    1.0
}
fn d_top_p() -> f32 {
    0.95
}
fn d_top_k() -> u32 {
    50
}
fn d_rep() -> f32 {
    1.05
}
fn d_max_new() -> u32 {
    64
}

/// Student sampling (the paper's settings by default) and the group's shape.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutSection {
    pub group_size: u32,
    /// Default: `group_size` (RIL's G + G mixed group).
    #[serde(default)]
    pub teacher_slots: Option<u32>,
    #[serde(default = "d_temperature")]
    pub temperature: f32,
    #[serde(default = "d_top_p")]
    pub top_p: f32,
    #[serde(default = "d_top_k")]
    pub top_k: u32,
    #[serde(default = "d_rep")]
    pub repetition_penalty: f32,
    #[serde(default = "d_max_new")]
    pub max_new_tokens: u32,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSection {
    #[serde(default)]
    pub coordinator: Option<String>,
    /// Learner rank 0's address as actors reach it. Default: what rank 0 advertises when it
    /// joins the coordinator.
    #[serde(default)]
    pub learner: Option<String>,
    #[serde(default)]
    pub discriminator: Option<String>,
    /// Teacher name -> address.
    #[serde(default)]
    pub teachers: BTreeMap<String, String>,
}

fn d_lease() -> u64 {
    300
}
fn d_heartbeat() -> u64 {
    1000
}
fn d_actor_timeout() -> u64 {
    30
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorSection {
    #[serde(default = "d_lease")]
    pub lease_timeout_s: u64,
    #[serde(default = "d_heartbeat")]
    pub heartbeat_interval_ms: u64,
    #[serde(default = "d_actor_timeout")]
    pub actor_timeout_s: u64,
    /// How soon an actor asks again when nothing may be leased yet (on-policy runs wait for
    /// the next version this way).
    #[serde(default = "d_lease_retry")]
    pub lease_retry_ms: u64,
}

fn d_lease_retry() -> u64 {
    50
}

impl Default for CoordinatorSection {
    fn default() -> Self {
        Self {
            lease_timeout_s: d_lease(),
            heartbeat_interval_ms: d_heartbeat(),
            actor_timeout_s: d_actor_timeout(),
            lease_retry_ms: d_lease_retry(),
        }
    }
}

fn d_actors() -> u32 {
    1
}
fn d_qpl() -> u32 {
    1
}
fn d_device() -> String {
    "cpu".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActorsSection {
    /// Actors `ril train` starts (a cluster scales them with its own tools).
    #[serde(default = "d_actors")]
    pub count: u32,
    #[serde(default = "d_qpl")]
    pub questions_per_lease: u32,
    #[serde(default = "d_device")]
    pub device: String,
}

impl Default for ActorsSection {
    fn default() -> Self {
        Self {
            count: d_actors(),
            questions_per_lease: d_qpl(),
            device: d_device(),
        }
    }
}

/// The parsed, validated run config.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub path: PathBuf,
    pub run: RunSection,
    pub data: DataSection,
    pub student: StudentSection,
    pub rollout: RolloutSection,
    pub network: NetworkSection,
    pub coordinator: CoordinatorSection,
    pub actors: ActorsSection,
    pub learner: ril_learner::options::LearnerOptions,
    pub discriminator: ril_discriminator::DiscriminatorOptions,
    pub teachers: Vec<ril_teacher::TeacherOptions>,
    /// `[security]`: the run token, the CA and role certificates, mutual TLS, the opt-out.
    pub security: ril_proto::security::SecurityConfig,
}

const TOP_LEVEL: &[&str] = &[
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

fn section<T: serde::de::DeserializeOwned>(
    path: &Path,
    table: &toml::Table,
    name: &str,
) -> anyhow::Result<Option<T>> {
    match table.get(name) {
        None => Ok(None),
        Some(v) => v
            .clone()
            .try_into()
            .map(Some)
            .map_err(|e| anyhow::anyhow!("{}: [{name}]: {e}", path.display())),
    }
}

/// Puts `value` at `key` of `table` unless present; a present, different value is refused.
fn inject(
    path: &Path,
    table: &mut toml::Table,
    section: &str,
    key: &str,
    value: Value,
    from: &str,
) -> anyhow::Result<()> {
    match table.get(key) {
        None => {
            table.insert(key.to_string(), value);
            Ok(())
        }
        Some(v) if *v == value => Ok(()),
        Some(v) => bail!(
            "{}: [{section}] {key} = {v} contradicts {from} = {value}; set it once, in {from}",
            path.display()
        ),
    }
}

fn path_value(p: &Path) -> Value {
    Value::String(p.to_string_lossy().into_owned())
}

impl RunConfig {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text, path)
    }

    /// Parses and validates; relative paths are relative to the config file's directory.
    pub fn parse(text: &str, path: &Path) -> anyhow::Result<Self> {
        let mut table: toml::Table = text
            .parse()
            .map_err(|e| anyhow::anyhow!("{}: not valid TOML: {e}", path.display()))?;
        for key in table.keys() {
            if !TOP_LEVEL.contains(&key.as_str()) {
                bail!(
                    "{}: unknown section `{key}` (expected one of: {})",
                    path.display(),
                    TOP_LEVEL.join(", ")
                );
            }
        }
        let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let resolve = |p: &Path| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };
        let need = |name: &str| -> anyhow::Result<()> {
            if table.contains_key(name) {
                Ok(())
            } else {
                bail!("{}: missing section [{name}]", path.display())
            }
        };
        for s in ["run", "data", "student", "rollout"] {
            need(s)?;
        }
        let mut run: RunSection = section(path, &table, "run")?.expect("checked");
        run.dir = resolve(&run.dir);
        let mut data: DataSection = section(path, &table, "data")?.expect("checked");
        data.path = resolve(&data.path);
        let mut student: StudentSection = section(path, &table, "student")?.expect("checked");
        student.checkpoint = resolve(&student.checkpoint);
        let rollout: RolloutSection = section(path, &table, "rollout")?.expect("checked");
        let network: NetworkSection = section(path, &table, "network")?.unwrap_or_default();
        let coordinator: CoordinatorSection =
            section(path, &table, "coordinator")?.unwrap_or_default();
        let actors: ActorsSection = section(path, &table, "actors")?.unwrap_or_default();
        let mut security: ril_proto::security::SecurityConfig =
            section(path, &table, "security")?.unwrap_or_default();
        for p in [
            &mut security.token_file,
            &mut security.ca,
            &mut security.cert,
            &mut security.key,
        ]
        .into_iter()
        .flatten()
        {
            *p = resolve(p);
        }

        // [learner]: run-level keys filled in.
        let mut learner_t = match table.remove("learner") {
            Some(Value::Table(t)) => t,
            None => toml::Table::new(),
            Some(_) => bail!("{}: [learner] must be a table", path.display()),
        };
        let l = &mut learner_t;
        inject(
            path,
            l,
            "learner",
            "init_checkpoint",
            path_value(&student.checkpoint),
            "[student] checkpoint",
        )?;
        inject(
            path,
            l,
            "learner",
            "out_dir",
            path_value(&run.dir.join("learner")),
            "[run] dir",
        )?;
        inject(
            path,
            l,
            "learner",
            "questions_per_iteration",
            Value::Integer(run.questions_per_iteration as i64),
            "[run] questions_per_iteration",
        )?;
        inject(
            path,
            l,
            "learner",
            "total_iterations",
            Value::Integer(run.iterations as i64),
            "[run] iterations",
        )?;
        inject(
            path,
            l,
            "learner",
            "staleness_bound",
            Value::Integer(run.staleness_bound as i64),
            "[run] staleness_bound",
        )?;
        inject(
            path,
            l,
            "learner",
            "seed",
            Value::Integer(run.seed as i64),
            "[run] seed",
        )?;
        inject(
            path,
            l,
            "learner",
            "coordinator_addr",
            Value::String(network.coordinator.clone().unwrap_or_default()),
            "[network] coordinator",
        )?;
        if let Some(Value::String(p)) = l.get("reference_checkpoint").cloned() {
            l.insert(
                "reference_checkpoint".into(),
                path_value(&resolve(Path::new(&p))),
            );
        }
        let mut learner: ril_learner::options::LearnerOptions = Value::Table(learner_t)
            .try_into()
            .map_err(|e| anyhow::anyhow!("{}: [learner]: {e}", path.display()))?;
        if learner.grpo.loss_normalizer == 0 {
            learner.grpo.loss_normalizer = rollout.max_new_tokens as usize;
        }

        // [discriminator]: D starts from the student; checkpoints under the run dir.
        let mut disc_t = match table.remove("discriminator") {
            Some(Value::Table(t)) => t,
            None => toml::Table::new(),
            Some(_) => bail!("{}: [discriminator] must be a table", path.display()),
        };
        match disc_t.get("init").cloned() {
            Some(Value::String(p)) => {
                disc_t.insert("init".into(), path_value(&resolve(Path::new(&p))));
            }
            _ => {
                disc_t.insert("init".into(), path_value(&student.checkpoint));
            }
        }
        inject(
            path,
            &mut disc_t,
            "discriminator",
            "checkpoint_dir",
            path_value(&run.dir.join("discriminator")),
            "[run] dir",
        )?;
        let discriminator: ril_discriminator::DiscriminatorOptions = Value::Table(disc_t)
            .try_into()
            .map_err(|e| anyhow::anyhow!("{}: [discriminator]: {e}", path.display()))?;

        // [[teachers]]: caches under the run dir, model paths relative to the config.
        let teachers_v = match table.remove("teachers") {
            Some(Value::Array(a)) => a,
            None => Vec::new(),
            Some(_) => bail!(
                "{}: `teachers` must be an array of tables ([[teachers]])",
                path.display()
            ),
        };
        let mut teachers = Vec::new();
        for (i, v) in teachers_v.into_iter().enumerate() {
            let Value::Table(mut t) = v else {
                bail!("{}: teachers[{i}] must be a table", path.display());
            };
            let name = t
                .get("name")
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| anyhow::anyhow!("{}: teachers[{i}] has no name", path.display()))?;
            // File paths of the backends (an OpenAI `model` is a model name, not a path).
            for key in ["checkpoint", "dataset", "answers"] {
                if let Some(Value::String(p)) = t.get(key).cloned() {
                    t.insert(key.into(), path_value(&resolve(Path::new(&p))));
                }
            }
            if let Some(Value::String(p)) = t.get("cache").cloned() {
                t.insert("cache".into(), path_value(&resolve(Path::new(&p))));
            }
            if !t.contains_key("cache") {
                t.insert(
                    "cache".into(),
                    path_value(&run.dir.join("teachers").join(format!("{name}.redb"))),
                );
            }
            let opts: ril_teacher::TeacherOptions = Value::Table(t)
                .try_into()
                .map_err(|e| anyhow::anyhow!("{}: teachers[{i}] ({name}): {e}", path.display()))?;
            teachers.push(opts);
        }

        let cfg = Self {
            path: path.to_path_buf(),
            run,
            data,
            student,
            rollout,
            network,
            coordinator,
            actors,
            learner,
            discriminator,
            teachers,
            security,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> anyhow::Result<()> {
        let p = self.path.display();
        if self.run.id.is_empty() {
            bail!("{p}: [run] id is empty");
        }
        if self.run.iterations == 0 || self.run.questions_per_iteration == 0 {
            bail!("{p}: [run] iterations and questions_per_iteration must be positive");
        }
        if self.rollout.group_size == 0 {
            bail!("{p}: [rollout] group_size must be positive");
        }
        if self.rollout.max_new_tokens == 0 {
            bail!("{p}: [rollout] max_new_tokens must be positive");
        }
        // The check every actor makes of these settings when it registers, made here so that a
        // bad temperature or top_p stops `ril config check` instead of every actor later.
        ril_actor::run::sampling_from_proto(&self.student_sampling())
            .map_err(|e| anyhow::anyhow!("{p}: [rollout]: {e}"))?;
        let mut names = std::collections::BTreeSet::new();
        for t in &self.teachers {
            if !names.insert(t.name.clone()) {
                bail!("{p}: two teachers are named {:?}", t.name);
            }
            t.validate()
                .map_err(|e| anyhow::anyhow!("{p}: teacher {:?}: {e}", t.name))?;
        }
        for n in self.network.teachers.keys() {
            if !names.contains(n) {
                bail!("{p}: [network] teachers names {n:?}, which no [[teachers]] entry defines");
            }
        }
        if self.teacher_slots() > 0 && self.teachers.is_empty() {
            bail!(
                "{p}: [rollout] teacher_slots is {} but no [[teachers]] are configured (set teacher_slots = 0 for RL without teachers)",
                self.teacher_slots()
            );
        }
        self.discriminator
            .validate()
            .map_err(|e| anyhow::anyhow!("{p}: [discriminator]: {e}"))?;
        let mut l = self.learner.clone();
        if l.coordinator_addr.is_empty() {
            l.coordinator_addr = "127.0.0.1:1".into();
        }
        l.validate()
            .map_err(|e| anyhow::anyhow!("{p}: [learner]: {e}"))?;
        if !self.data.path.exists() {
            bail!(
                "{p}: [data] path {} does not exist",
                self.data.path.display()
            );
        }
        if !self.student.checkpoint.is_dir() {
            bail!(
                "{p}: [student] checkpoint {} is not a model directory",
                self.student.checkpoint.display()
            );
        }
        Ok(())
    }

    pub fn teacher_slots(&self) -> u32 {
        self.rollout
            .teacher_slots
            .unwrap_or(self.rollout.group_size)
    }

    pub fn student_sampling(&self) -> ril_proto::v1::SamplingSettings {
        ril_proto::v1::SamplingSettings {
            temperature: self.rollout.temperature,
            top_p: self.rollout.top_p,
            top_k: self.rollout.top_k,
            repetition_penalty: self.rollout.repetition_penalty,
            max_new_tokens: self.rollout.max_new_tokens,
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
            ..Default::default()
        };
        o.actor.group_size = self.rollout.group_size;
        o.actor.teacher_slots = self.teacher_slots();
        o.actor.teacher_addrs = teacher_addrs;
        o.actor.discriminator_addr = discriminator_addr;
        o.actor.learner_addr = self.network.learner.clone().unwrap_or_default();
        // Checked at load (`max_new_tokens` > 0), so the settings are never "unset".
        o.actor.sampling =
            ril_proto::convert::sampling_from_wire(&self.student_sampling()).unwrap_or_default();
        // None: actors ask teachers for answers drawn with the teacher servers' own settings
        // (which key their caches).
        o.actor.teacher_sampling = None;
        o
    }

    /// Teacher addresses from `[network] teachers`, in `[[teachers]]` order.
    pub fn teacher_addrs(&self) -> anyhow::Result<Vec<String>> {
        self.teachers
            .iter()
            .map(|t| {
                self.network.teachers.get(&t.name).cloned().ok_or_else(|| {
                    anyhow::anyhow!(
                        "{}: [network] teachers has no address for teacher {:?}",
                        self.path.display(),
                        t.name
                    )
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(dir: &Path) -> String {
        std::fs::create_dir_all(dir.join("data")).unwrap();
        std::fs::create_dir_all(dir.join("student")).unwrap();
        r#"
[run]
id = "r"
dir = "out"
iterations = 3
questions_per_iteration = 2
[data]
path = "data"
[student]
checkpoint = "student"
[rollout]
group_size = 2
[network]
teachers = { big = "teacher-big:50061" }
[[teachers]]
name = "big"
backend = "openai"
base_url = "http://127.0.0.1:8000/v1"
model = "Qwen/Qwen2.5-VL-72B-Instruct"
"#
        .to_string()
    }

    #[test]
    fn run_level_keys_fill_the_roles_and_names_stay_names() {
        let dir = tempfile::tempdir().unwrap();
        let text = base(dir.path());
        let cfg = RunConfig::parse(&text, &dir.path().join("run.toml")).unwrap();
        // An OpenAI model is a name, not a path next to the config.
        let t = format!("{:?}", cfg.teachers[0]);
        assert!(t.contains("\"Qwen/Qwen2.5-VL-72B-Instruct\""), "{t}");
        assert!(
            !t.contains(&format!("{}/Qwen", dir.path().display())),
            "{t}"
        );
        // The teacher's cache and the learner's dirs land under the run dir.
        assert!(
            t.contains(
                &dir.path()
                    .join("out/teachers/big.redb")
                    .display()
                    .to_string()
            ),
            "{t}"
        );
        assert_eq!(cfg.learner.out_dir, dir.path().join("out/learner"));
        assert_eq!(cfg.learner.questions_per_iteration, 2);
        assert_eq!(cfg.learner.total_iterations, 3);
        assert_eq!(cfg.learner.init_checkpoint, dir.path().join("student"));
        assert_eq!(cfg.discriminator.init, dir.path().join("student"));
        assert_eq!(
            cfg.teacher_addrs().unwrap(),
            vec!["teacher-big:50061".to_string()]
        );
        let c = cfg.coordinator_options(cfg.teacher_addrs().unwrap(), "d:1".into());
        assert_eq!(c.actor.teacher_slots, 2);
        assert_eq!(c.total_iterations, 3);

        // Contradictions and unknown keys are refused by name.
        let bad = text.replace(
            "[rollout]",
            "[learner]\nquestions_per_iteration = 5\n[rollout]",
        );
        let e = RunConfig::parse(&bad, &dir.path().join("run.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("questions_per_iteration") && e.contains("[run]"),
            "{e}"
        );
        let bad = text.replace("[rollout]", "[rollout]\ngroup_sise = 3");
        let e = RunConfig::parse(&bad, &dir.path().join("run.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("group_sise"), "{e}");
        let bad = text
            .replace("teacher-big:50061", "x")
            .replace("name = \"big\"", "name = \"small\"");
        let e = RunConfig::parse(&bad, &dir.path().join("run.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("big"), "{e}");
    }

    /// Found by the bad-input table (tests/bad-inputs): these used to pass `ril config check`
    /// and failed only in every actor.
    #[test]
    fn rollout_sampling_settings_are_checked_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let text = base(dir.path());
        for (setting, field) in [
            ("temperature = -1.0", "temperature"),
            ("top_p = 1.5", "top_p"),
            ("repetition_penalty = -1.0", "repetition_penalty"),
        ] {
            let bad = text.replace("group_size = 2", &format!("group_size = 2\n{setting}"));
            let e = RunConfig::parse(&bad, &dir.path().join("run.toml"))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("run.toml") && e.contains("[rollout]") && e.contains(field),
                "{setting}: {e}"
            );
        }
    }
}
