//! What `ril demo` and `ril experiment ablation` share: the built-in models a run may take, a
//! [`RunSpec`] turned into a typed run config, the benchmark they run on, D's pre-training
//! against the run's own teacher servers, a run through the local cluster, and greedy
//! evaluation.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ril_config::{DataSection, RolloutSection, RunConfig, RunSection, StudentSection};
use ril_teacher::{BackendOptions, CandleOptions, TeacherOptions};

use crate::cluster::{ClusterOptions, LocalCluster, TrainOutcome, run_cluster};
use crate::error::{OrchestrateError, Result};
use crate::ril::{RilBinary, arg, runtime};

/// The built-in students, `(name, model directory)`: the demo's default first.
pub const STUDENTS: [(&str, &str); 2] = [
    ("student-reasoned", "student-reasoned"),
    ("student", "student"),
];

/// The demo's teachers: `(name in the run, model directory)`.
pub const TEACHERS: [(&str, &str); 3] = [
    ("terse", "teacher-terse"),
    ("reasoned", "teacher-reasoned"),
    ("narrated", "teacher-narrated"),
];

/// The built-in teachers' generation budget in `ril demo` and `ril experiment ablation`.
pub const TEACHER_MAX_NEW_TOKENS: u32 = 128;

/// What the generated run configs say first.
const CONFIG_HEADER: &str =
    "# Written by ril (demo / experiment): a short RIL run on the built-in tiny models.\n";

/// A built-in student's model directory, by its name (`--student`).
pub fn student_dir(name: &str) -> Result<&'static str> {
    builtin_dir("--student", "student", &STUDENTS, name)
}

/// The model directory of a built-in teacher, by its name in the run (`--teachers`).
pub fn teacher_dir(name: &str) -> Result<&'static str> {
    builtin_dir("--teachers", "teacher", &TEACHERS, name)
}

/// `name`'s model directory in `table`, or an error naming `flag` and the known names.
fn builtin_dir(
    flag: &str,
    what: &str,
    table: &[(&'static str, &'static str)],
    name: &str,
) -> Result<&'static str> {
    table
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, d)| *d)
        .ok_or_else(|| {
            let known: Vec<&str> = table.iter().map(|(n, _)| *n).collect();
            OrchestrateError::InvalidOption(format!(
                "{flag}: unknown {what} {name:?} (the built-in ones: {})",
                known.join(", ")
            ))
        })
}

/// What differs between the runs `ril demo` and `ril experiment ablation` write: everything
/// else is the paper's setting (G = 4 by default, temperature 1.0, top-p 0.95, top-k 50,
/// repetition penalty 1.05, eps = 0.2, beta = 0.01, one D step per iteration, binary rewards
/// summed).
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// The run's id and state directory (absolute).
    pub id: String,
    pub dir: PathBuf,
    pub seed: u64,
    pub iterations: u64,
    pub questions_per_iteration: u64,
    pub group_size: u32,
    pub actors: u32,
    pub lr: f64,
    /// Dataset directory and the built-in models' directory (absolute).
    pub data: PathBuf,
    pub models: PathBuf,
    /// The student's model directory under `models`.
    pub student: String,
    /// `(name, model directory name under models)`: the teachers in the run.
    pub teachers: Vec<(String, String)>,
    pub use_ans_reward: bool,
    pub use_sim_reward: bool,
    pub teachers_in_group: bool,
    pub std_normalized_advantage: bool,
    pub frozen_discriminator: bool,
    /// D's starting weights (a pre-training result); None: the student's, with a fresh head.
    pub discriminator_init: Option<PathBuf>,
    /// Save the policy every this many iterations (0: only at the end).
    pub save_every: u64,
    /// The student's generation budget (and Dr.GRPO's constant normaliser).
    pub max_new_tokens: u32,
    /// The teachers' generation budget: a reasoning teacher writes its chain of thought
    /// before the answer (60-100 tokens on the benchmark); a terse one stops at its end token.
    pub teacher_max_new_tokens: u32,
    /// `[run] device`: every role's device (None: the CPU).
    pub device: Option<String>,
}

impl RunSpec {
    /// A candle teacher server for the built-in model `dir`, sampling at temperature 1 within
    /// the teachers' budget, its cache under the run.
    fn teacher(&self, cfg: &RunConfig, name: &str, dir: &str) -> TeacherOptions {
        let checkpoint = self.models.join(dir);
        let mut candle = CandleOptions::new(checkpoint);
        if let Some(device) = &self.device {
            candle.device = device.clone();
        }
        let mut t = TeacherOptions::new(name, BackendOptions::Candle(candle));
        t.cache = Some(cfg.default_teacher_cache(name));
        t.sampling.temperature = 1.0;
        t.sampling.max_new_tokens = self.teacher_max_new_tokens as _;
        t
    }

    /// The run config (at `path`) for this spec.
    pub fn config(&self, path: &Path) -> Result<RunConfig> {
        let run = RunSection {
            id: self.id.clone(),
            dir: self.dir.clone(),
            seed: self.seed,
            iterations: self.iterations,
            questions_per_iteration: self.questions_per_iteration,
            staleness_bound: 0,
            device: self.device.clone(),
        };
        let data = DataSection {
            path: self.data.clone(),
            skip_bad_rows: false,
        };
        let student = StudentSection {
            checkpoint: self.models.join(&self.student),
        };
        let rollout = RolloutSection::new(self.group_size, self.max_new_tokens);
        let mut cfg = RunConfig::new(path, run, data, student, rollout)?;
        cfg.coordinator.lease_timeout_s = 120;
        cfg.coordinator.heartbeat_interval_ms = 500;
        cfg.coordinator.actor_timeout_s = 20;
        cfg.actors.count = self.actors;
        let learner = &mut cfg.learner;
        learner.save_every = self.save_every;
        learner.keep_checkpoints = 1000;
        learner.grpo.lr = self.lr;
        learner.grpo.loss_normalizer = self.max_new_tokens as usize;
        learner.grpo.micro_batch_size = 8;
        learner.grpo.use_ans_reward = self.use_ans_reward;
        learner.grpo.use_sim_reward = self.use_sim_reward;
        learner.grpo.teachers_in_group = self.teachers_in_group;
        learner.grpo.std_normalized_advantage = self.std_normalized_advantage;
        let d = &mut cfg.discriminator;
        if let Some(init) = &self.discriminator_init {
            d.init = init.clone();
        }
        d.lr = 1e-4;
        d.save_every = 0;
        d.frozen = self.frozen_discriminator;
        d.judge = ril_discriminator::JudgeBackend::Rule;
        cfg.teachers = (self.teachers.iter())
            .map(|(name, dir)| self.teacher(&cfg, name, dir))
            .collect();
        Ok(cfg)
    }

    /// Writes this spec's run config to `path` and reads it back, validated as every role
    /// will read it.
    pub fn write_config(&self, path: &Path) -> Result<RunConfig> {
        self.config(path)?.save(CONFIG_HEADER)?;
        Ok(RunConfig::load(path)?)
    }
}

/// D's pre-training before RIL, for `ril demo` and `ril experiment ablation`.
#[derive(Debug, Clone, Copy)]
pub struct PretrainSettings {
    /// Questions whose student and teacher answers (4 each) pre-train D (0: none).
    pub questions: usize,
    pub steps: u64,
}

/// Pre-trains the discriminator into `d_dir` (`ril discriminator pretrain`): the student's and
/// the run's teachers' answers (4 each) to `how.questions` training questions of `data`,
/// `how.steps` steps. The teachers are the run's own servers (`cfg`'s `[[teachers]]`, started
/// here and stopped after), on the run's secure path (TLS, mutual TLS and a token generated
/// for this launch, or `[security]`'s own); the client speaks as the discriminator.
pub fn pretrain_discriminator(
    ril: &RilBinary,
    cfg: &RunConfig,
    data: &Path,
    d_dir: &Path,
    how: PretrainSettings,
) -> Result<()> {
    let rt = runtime()?;
    let mut teachers = LocalCluster::new(ril, cfg)?;
    let served = rt.block_on(teachers.serve_teachers(Duration::from_secs(300)));
    let result = served.and_then(|addrs| {
        let mut a: Vec<String> = ["discriminator", "pretrain", "--student"]
            .map(String::from)
            .to_vec();
        a.extend([arg(&cfg.student.checkpoint), "--data".into(), arg(data)]);
        a.extend(["--out".into(), arg(d_dir), "--answers".into(), "4".into()]);
        a.extend(["--max-questions".into(), how.questions.to_string()]);
        a.extend(["--steps".into(), how.steps.to_string()]);
        // The student's answers get the run's budget.
        let budget = cfg.rollout.max_new_tokens.to_string();
        a.extend(["--max-new-tokens".into(), budget]);
        a.extend(["--device".into(), cfg.discriminator.device.clone()]);
        for addr in addrs {
            a.extend(["--teacher".into(), addr]);
        }
        a.extend(teachers.security_flags().iter().cloned());
        ril.run(&a.iter().map(String::as_str).collect::<Vec<_>>())
    });
    rt.block_on(teachers.stop(Duration::from_secs(30)));
    result
}

/// `cfg`'s run through the local cluster (`ril train`'s supervisor, its default timeouts).
pub fn run_local(ril: &RilBinary, cfg: &RunConfig) -> Result<TrainOutcome> {
    let options = ClusterOptions {
        actors: None,
        startup_timeout: Duration::from_secs(300),
        stall_timeout: Duration::from_secs(900),
    };
    runtime()?.block_on(run_cluster(ril, cfg, &options))
}

/// Greedy accuracy of `model` on the first `rows` questions of `split`, `max_new_tokens` at
/// most per answer (`ril eval` on `device`, whose full report goes to `out`).
pub fn eval_accuracy(
    ril: &RilBinary,
    model: &Path,
    data: &Path,
    (split, rows, max_new_tokens): (&str, usize, u32),
    device: &str,
    out: &Path,
) -> Result<f64> {
    ril.run(&[
        "eval",
        "--device",
        device,
        "--max-new-tokens",
        &max_new_tokens.to_string(),
        "--model",
        &arg(model),
        "--data",
        &arg(data),
        "--split",
        split,
        "--max-rows",
        &rows.to_string(),
        "--out",
        &arg(out),
    ])?;
    read_json(out)?["accuracy"]
        .as_f64()
        .ok_or_else(|| OrchestrateError::NoAccuracy {
            path: out.to_path_buf(),
        })
}

/// The `shapes` benchmark the demo and the ablation run on (seed 0; 2000 train, 200 val,
/// 500 test questions; objects at their cell's centre, as the built-in models were trained).
pub fn synth_benchmark(ril: &RilBinary, data: &Path) -> Result<()> {
    ril.run(&[
        "data",
        "synth",
        "--out",
        &arg(data),
        "--seed",
        "0",
        "--image-size",
        "72",
        "--jitter",
        "0",
        "--n-train",
        "2000",
        "--n-val",
        "200",
        "--n-test",
        "500",
    ])
}

/// An absolute path for `x` (which must exist).
pub fn absolute(x: &Path) -> Result<PathBuf> {
    std::fs::canonicalize(x).map_err(OrchestrateError::io(format!("resolving {}", x.display())))
}

pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path)
        .map_err(OrchestrateError::io(format!("reading {}", path.display())))?;
    serde_json::from_str(&text).map_err(|error| OrchestrateError::Json {
        what: "parsing",
        path: path.to_path_buf(),
        error,
    })
}

/// Writes `value` as pretty JSON to `path` (atomically).
pub fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|error| OrchestrateError::Json {
        what: "writing",
        path: path.to_path_buf(),
        error,
    })?;
    Ok(ril_common::fs::write_atomic(path, text.as_bytes())?)
}

/// The series of a run's `metrics.jsonl` by key (ril-plot's reader: errors name the line).
pub type Metrics = std::collections::BTreeMap<String, Vec<(f64, f64)>>;

/// Mean of `key` over the first and the last quarter of the steps that have it.
pub fn first_last(metrics: &Metrics, key: &str) -> serde_json::Value {
    let vals: Vec<f64> = metrics
        .get(key)
        .map(|s| s.iter().map(|&(_, v)| v).collect())
        .unwrap_or_default();
    if vals.is_empty() {
        return serde_json::Value::Null;
    }
    let k = (vals.len() / 4).max(1);
    let mean = |x: &[f64]| x.iter().sum::<f64>() / x.len() as f64;
    serde_json::json!({
        "first": mean(&vals[..k]),
        "last": mean(&vals[vals.len() - k..]),
        "steps": vals.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dir: &Path) -> RunSpec {
        RunSpec {
            id: "demo".into(),
            dir: dir.join("run"),
            seed: 7,
            iterations: 300,
            questions_per_iteration: 4,
            group_size: 4,
            actors: 2,
            lr: 2e-4,
            data: dir.join("data"),
            models: dir.join("models"),
            student: "student-reasoned".into(),
            teachers: vec![
                ("reasoned".into(), "teacher-reasoned".into()),
                ("narrated".into(), "teacher-narrated".into()),
            ],
            use_ans_reward: true,
            use_sim_reward: false,
            teachers_in_group: true,
            std_normalized_advantage: true,
            frozen_discriminator: true,
            discriminator_init: Some(dir.join("d-pretrained")),
            save_every: 75,
            max_new_tokens: 128,
            teacher_max_new_tokens: TEACHER_MAX_NEW_TOKENS,
            device: None,
        }
    }

    /// What the generated file says is what the spec says, read back through the same parser
    /// every role uses, and every setting the demo and the ablation vary lands where they meant.
    #[test]
    fn a_spec_s_run_config_reads_back_with_every_setting_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let s = spec(dir.path());
        for d in ["data", "models/student-reasoned", "d-pretrained"] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        for t in ["teacher-reasoned", "teacher-narrated"] {
            std::fs::create_dir_all(dir.path().join("models").join(t)).unwrap();
        }
        let path = dir.path().join("run.toml");
        let cfg = s.write_config(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("# Written by ril"), "{text}");
        assert_eq!(cfg, s.config(&path).unwrap());
        assert_eq!((cfg.run.seed, cfg.run.iterations), (7, 300));
        assert_eq!(cfg.rollout.max_new_tokens, 128);
        assert_eq!(cfg.teacher_slots(), 4);
        assert_eq!(cfg.actors.count, 2);
        assert_eq!(cfg.coordinator.lease_timeout_s, 120);
        let g = &cfg.learner.grpo;
        assert_eq!(
            (g.lr, g.loss_normalizer, g.micro_batch_size),
            (2e-4, 128, 8)
        );
        assert!(g.use_ans_reward && !g.use_sim_reward && g.teachers_in_group);
        assert!(g.std_normalized_advantage);
        assert_eq!(
            (cfg.learner.save_every, cfg.learner.keep_checkpoints),
            (75, 1000)
        );
        assert_eq!(cfg.discriminator.init, dir.path().join("d-pretrained"));
        assert!(cfg.discriminator.frozen);
        assert_eq!(cfg.discriminator.save_every, 0);
        let names: Vec<&str> = cfg.teachers.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["reasoned", "narrated"]);
        let t = &cfg.teachers[0];
        assert_eq!(t.sampling.max_new_tokens as u32, TEACHER_MAX_NEW_TOKENS);
        assert_eq!(t.cache, Some(dir.path().join("run/teachers/reasoned.redb")));
        match &t.backend {
            BackendOptions::Candle(c) => {
                assert_eq!(c.checkpoint, dir.path().join("models/teacher-reasoned"))
            }
            other => panic!("{other:?}"),
        }
        // The settings the integration tests look for in the file.
        assert!(text.contains("seed = 7"), "{text}");
        assert!(text.contains("use_sim_reward = false"), "{text}");
        assert!(text.contains("d-pretrained\""), "{text}");
    }

    /// A spec's device puts every role on it: the run config's `[run] device`, read back into
    /// the actors, the learner, D and the candle teachers.
    #[test]
    fn a_spec_s_device_reaches_every_role() {
        let dir = tempfile::tempdir().unwrap();
        let s = RunSpec {
            device: Some("cuda:0".into()),
            ..spec(dir.path())
        };
        for d in ["data", "models/student-reasoned", "d-pretrained"] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        let path = dir.path().join("run.toml");
        let cfg = s.write_config(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        // Once, in `[run]`: every role takes it from there.
        assert_eq!(text.matches("device = ").count(), 1, "{text}");
        assert_eq!(cfg.run.device.as_deref(), Some("cuda:0"));
        assert_eq!(cfg.actors.device, "cuda:0");
        assert_eq!(cfg.learner.device, "cuda:0");
        assert_eq!(cfg.discriminator.device, "cuda:0");
        for t in &cfg.teachers {
            match &t.backend {
                BackendOptions::Candle(c) => assert_eq!(c.device, "cuda:0"),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn unknown_built_in_models_are_refused_naming_the_flag_and_the_known_ones() {
        assert_eq!(teacher_dir("terse").unwrap(), "teacher-terse");
        let e = teacher_dir("loud").unwrap_err().to_string();
        assert!(
            e.contains("--teachers") && e.contains("terse, reasoned, narrated"),
            "{e}"
        );
        let e = student_dir("teacher-terse").unwrap_err().to_string();
        assert!(
            e.contains("--student") && e.contains("student-reasoned, student"),
            "{e}"
        );
    }
}
