//! `ril demo`: the whole loop in one command on this machine. It writes the `shapes` benchmark
//! (if absent), takes the built-in models (`models/builtin`: two teachers with different answer
//! styles and a weaker student) or, when they are missing, makes small ones on first use with
//! the project's own commands, writes a run config, runs the local cluster (every role its own
//! process) for a short RIL run, and evaluates the student before and after.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use crate::cluster::{TrainArgs, run_cluster};
use crate::config::RunConfig;

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// The run directory: data, run state, checkpoints, logs, `report.json`, `metrics.jsonl`.
    #[arg(long, visible_alias = "dir", default_value = "runs/demo")]
    pub out: PathBuf,
    /// The built-in models (student, student-reasoned, teacher-terse, teacher-reasoned,
    /// teacher-narrated).
    #[arg(long, default_value = "models/builtin")]
    pub models: PathBuf,
    /// The student, by its model directory under `--models`: `student-reasoned` (writes the
    /// scene and a look-up before `Answer: X`, briefly trained) or `student` (answers bare).
    #[arg(long, default_value = STUDENTS[0].0)]
    pub student: String,
    /// RIL iterations (learner steps). 300 at lr 2e-4 with the reasoned teacher and the
    /// reasoning student: the best of the settings tried on the validation split
    /// (docs/RESULTS.md).
    #[arg(long, default_value_t = 300)]
    pub iterations: u64,
    /// The teachers in the run, by name: `terse` (teacher-terse), `reasoned`
    /// (teacher-reasoned), `narrated` (teacher-narrated); the last two reason before they
    /// answer. The reasoned one alone, in the student's own answer format, is the one the
    /// settings were tuned with on the validation split; with the narrated one as well, D tells
    /// the styles apart and pulls the student off its format (docs/RESULTS.md). Two is the
    /// paper's setting.
    #[arg(long, value_delimiter = ',', default_value = "reasoned")]
    pub teachers: Vec<String>,
    #[arg(long, default_value_t = 4)]
    pub questions_per_iteration: u64,
    /// G: student rollouts per question (and teacher answers per question).
    #[arg(long, default_value_t = 4)]
    pub group_size: u32,
    #[arg(long, default_value_t = 2)]
    pub actors: u32,
    /// The student's generation budget (rollouts, D pre-training's student answers and the
    /// evaluations); also Dr.GRPO's constant normaliser. A student that reasons before it
    /// answers needs ~128 on the benchmark.
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: u32,
    /// Test questions evaluated before and after (greedy).
    #[arg(long, default_value_t = 500)]
    pub eval_rows: usize,
    /// The policy's learning rate (tuned on the validation split: docs/RESULTS.md).
    #[arg(long, default_value_t = 2e-4)]
    pub lr: f64,
    /// The run's seed (sampling, data order, D's head).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Checkpoints evaluated on the held-out questions during the run, for the accuracy plot
    /// (the last one is the final policy).
    #[arg(long, default_value_t = 4)]
    pub accuracy_points: u64,
    #[command(flatten)]
    pub pretrain: PretrainArgs,
    /// SFT steps for the models made on first use when the built-in ones are missing.
    #[arg(long, default_value_t = 300)]
    pub fallback_sft_steps: usize,
}

pub fn ril(args: &[&str]) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("locating the ril binary")?;
    let status = Command::new(&exe)
        .args(args)
        .status()
        .with_context(|| format!("running ril {}", args.join(" ")))?;
    if !status.success() {
        bail!("ril {} failed ({status})", args.join(" "));
    }
    Ok(())
}

pub fn p(x: &Path) -> String {
    x.to_string_lossy().into_owned()
}

/// The model directories the demo needs: the student and the teachers it runs with.
fn needed_models(args: &DemoArgs) -> anyhow::Result<Vec<&'static str>> {
    let mut needed = vec![student_dir(&args.student)?];
    for name in &args.teachers {
        needed.push(teacher_dir(name)?);
    }
    Ok(needed)
}

/// The built-in students, `(name, model directory)`: the demo's default first.
pub const STUDENTS: [(&str, &str); 2] = [
    ("student-reasoned", "student-reasoned"),
    ("student", "student"),
];

/// A built-in student's model directory, by its name (`--student`).
pub fn student_dir(name: &str) -> anyhow::Result<&'static str> {
    builtin_dir("--student", "student", &STUDENTS, name)
}

/// The model directory of a built-in teacher, by its name in the run (`--teachers`).
pub fn teacher_dir(name: &str) -> anyhow::Result<&'static str> {
    builtin_dir("--teachers", "teacher", &TEACHERS, name)
}

/// `name`'s model directory in `table`, or an error naming `flag` and the known names.
fn builtin_dir(
    flag: &str,
    what: &str,
    table: &[(&'static str, &'static str)],
    name: &str,
) -> anyhow::Result<&'static str> {
    table
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, d)| *d)
        .ok_or_else(|| {
            let known: Vec<&str> = table.iter().map(|(n, _)| *n).collect();
            anyhow::anyhow!(
                "{flag}: unknown {what} {name:?} (the built-in ones: {})",
                known.join(", ")
            )
        })
}

/// The models the demo runs on: the built-in ones, or small ones made here on first use.
fn models(args: &DemoArgs, data: &Path) -> anyhow::Result<PathBuf> {
    let needed = needed_models(args)?;
    if needed
        .iter()
        .all(|m| args.models.join(m).join("config.json").is_file())
    {
        tracing::info!(dir = %args.models.display(), "using the built-in models");
        return Ok(args.models.clone());
    }
    let out = args.out.join("models");
    if needed
        .iter()
        .all(|m| out.join(m).join("config.json").is_file())
    {
        tracing::info!(dir = %out.display(), "using the models made on an earlier demo run");
        return Ok(out);
    }
    tracing::warn!(
        missing = %args.models.display(),
        "built-in models not found: making small ones on first use (a few minutes)"
    );
    let work = args.out.join("models-work");
    let tok = work.join("tokenizer");
    let tok_s = p(&tok);
    ril(&[
        "tokenizer",
        "train",
        "--data",
        &p(data),
        "--out",
        &tok_s,
        "--vocab-size",
        "320",
    ])?;
    let steps = args.fallback_sft_steps.to_string();
    let student_steps = (args.fallback_sft_steps / 3).max(1).to_string();
    for (name, seed, target, steps, extra) in [
        ("teacher-terse", "1", "reference", steps.as_str(), vec![]),
        (
            "teacher-reasoned",
            "2",
            "style:reasoned",
            steps.as_str(),
            vec![],
        ),
        (
            "teacher-narrated",
            "4",
            "style:narrated",
            steps.as_str(),
            vec![],
        ),
        (
            "student",
            "3",
            "reference",
            student_steps.as_str(),
            vec!["--layers", "1"],
        ),
        (
            "student-reasoned",
            "5",
            "style:reasoned",
            student_steps.as_str(),
            vec!["--layers", "1"],
        ),
    ]
    .into_iter()
    .filter(|(name, ..)| needed.contains(name))
    {
        let init = work.join(format!("{name}-init"));
        let mut a = vec![
            "model",
            "init",
            "--tokenizer",
            &tok_s,
            "--size",
            "test",
            "--seed",
            seed,
        ];
        let init_s = p(&init);
        a.extend(["--out", &init_s]);
        a.extend(extra);
        ril(&a)?;
        let sft = work.join(format!("{name}-sft"));
        ril(&[
            "sft",
            "--model",
            &init_s,
            "--data",
            &p(data),
            "--out",
            &p(&sft),
            "--steps",
            steps,
            "--batch-size",
            "16",
            "--lr",
            "1e-3",
            "--warmup-steps",
            "20",
            "--eval-every",
            "1000000",
            "--save-every",
            "1000000",
            "--target",
            target,
        ])?;
        ril(&[
            "model",
            "export",
            "--model",
            &p(&sft.join("final")),
            "--out",
            &p(&out.join(name)),
        ])?;
    }
    Ok(out)
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
}

/// The built-in teachers' generation budget in `ril demo` and `ril experiment ablation`.
pub const TEACHER_MAX_NEW_TOKENS: u32 = 128;

/// The demo's teachers: `(name in the run, model directory)`.
pub const TEACHERS: [(&str, &str); 3] = [
    ("terse", "teacher-terse"),
    ("reasoned", "teacher-reasoned"),
    ("narrated", "teacher-narrated"),
];

/// D's pre-training before RIL, for `ril demo` and `ril experiment ablation`.
#[derive(Debug, Clone, clap::Args)]
pub struct PretrainArgs {
    /// Questions whose student and teacher answers (4 each) pre-train the discriminator before
    /// RIL (0: no pre-training; D starts from the student with a fresh head, so a frozen D
    /// gives every response r_sim = 0).
    #[arg(long, default_value_t = 64)]
    pub pretrain_questions: usize,
    /// D's pre-training steps.
    #[arg(long, default_value_t = 30)]
    pub pretrain_steps: u64,
}

/// Pre-trains the discriminator into `d_dir` (`ril discriminator pretrain`): the student's and
/// the run's teachers' answers (4 each) to `pretrain_questions` training questions of `data`,
/// `pretrain_steps` steps. The teachers are the run's own servers (`cfg`'s `[[teachers]]`, started by the
/// cluster supervisor and stopped after), on the run's secure path (TLS, mutual TLS and a
/// token generated for this launch, or `[security]`'s own); the client speaks as the
/// discriminator.
pub fn pretrain_discriminator(
    cfg: &RunConfig,
    config: &Path,
    data: &Path,
    d_dir: &Path,
    how: &PretrainArgs,
) -> anyhow::Result<()> {
    let rt = crate::roles::runtime()?;
    let (mut teachers, addrs, security_flags) = rt.block_on(crate::cluster::serve_teachers(
        cfg,
        config,
        std::time::Duration::from_secs(300),
    ))?;
    let mut a: Vec<String> = ["discriminator", "pretrain", "--student"]
        .map(String::from)
        .to_vec();
    a.extend([
        p(&cfg.student.checkpoint),
        "--data".into(),
        p(data),
        "--out".into(),
        p(d_dir),
    ]);
    a.extend(["--answers".into(), "4".into(), "--max-questions".into()]);
    a.extend([how.pretrain_questions.to_string(), "--steps".into()]);
    a.extend([
        how.pretrain_steps.to_string(),
        // The student's answers get the run's budget.
        "--max-new-tokens".into(),
        cfg.rollout.max_new_tokens.to_string(),
    ]);
    for addr in addrs {
        a.extend(["--teacher".into(), addr]);
    }
    a.extend(security_flags);
    let result = ril(&a.iter().map(String::as_str).collect::<Vec<_>>());
    rt.block_on(crate::supervise::stop_all(
        &mut teachers,
        std::time::Duration::from_secs(30),
    ));
    result
}

/// The run config (TOML) for `spec`.
pub fn run_config_toml(spec: &RunSpec) -> String {
    let models = p(&spec.models);
    let mut teachers = String::new();
    for (name, dir) in &spec.teachers {
        teachers.push_str(&format!(
            r#"
[[teachers]]
name = "{name}"
backend = "candle"
checkpoint = "{models}/{dir}"

[teachers.sampling]
temperature = 1.0
max_new_tokens = {max_new_tokens}
"#,
            max_new_tokens = spec.teacher_max_new_tokens
        ));
    }
    let d_init = spec
        .discriminator_init
        .as_ref()
        .map(|d| format!("init = \"{}\"\n", p(d)))
        .unwrap_or_default();
    format!(
        r#"# Written by ril (demo / experiment): a short RIL run on the built-in tiny models.
[run]
id = "{id}"
dir = "{dir}"
seed = {seed}
iterations = {iterations}
questions_per_iteration = {b}
staleness_bound = 0

[data]
path = "{data}"

[student]
checkpoint = "{models}/{student}"

[rollout]
group_size = {g}
max_new_tokens = {max_new_tokens}

[coordinator]
lease_timeout_s = 120
heartbeat_interval_ms = 500
actor_timeout_s = 20

[actors]
count = {actors}

[learner]
save_every = {save_every}
keep_checkpoints = 1000

[learner.grpo]
lr = {lr:e}
loss_normalizer = {max_new_tokens}
micro_batch_size = 8
use_ans_reward = {use_ans}
use_sim_reward = {use_sim}
teachers_in_group = {tig}
std_normalized_advantage = {std_adv}

[discriminator]
{d_init}lr = 1e-4
save_every = 0
frozen = {frozen}

[discriminator.judge]
kind = "rule"
{teachers}"#,
        id = spec.id,
        dir = p(&spec.dir),
        seed = spec.seed,
        iterations = spec.iterations,
        b = spec.questions_per_iteration,
        data = p(&spec.data),
        student = spec.student,
        g = spec.group_size,
        max_new_tokens = spec.max_new_tokens,
        actors = spec.actors,
        save_every = spec.save_every,
        lr = spec.lr,
        use_ans = spec.use_ans_reward,
        use_sim = spec.use_sim_reward,
        tig = spec.teachers_in_group,
        std_adv = spec.std_normalized_advantage,
        frozen = spec.frozen_discriminator,
    )
}

/// An absolute path for `x` (which must exist).
pub fn absolute(x: &Path) -> anyhow::Result<PathBuf> {
    std::fs::canonicalize(x).with_context(|| format!("resolving {}", x.display()))
}

fn write_config(
    args: &DemoArgs,
    data: &Path,
    models: &Path,
    discriminator_init: Option<PathBuf>,
) -> anyhow::Result<PathBuf> {
    let out = absolute(&args.out)?;
    let spec = RunSpec {
        id: "demo".into(),
        dir: out.join("run"),
        seed: args.seed,
        iterations: args.iterations,
        questions_per_iteration: args.questions_per_iteration,
        group_size: args.group_size,
        actors: args.actors,
        lr: args.lr,
        data: absolute(data)?,
        models: absolute(models)?,
        student: args.student.clone(),
        teachers: args
            .teachers
            .iter()
            .map(|name| Ok((name.clone(), teacher_dir(name)?.to_string())))
            .collect::<anyhow::Result<_>>()?,
        use_ans_reward: true,
        use_sim_reward: true,
        teachers_in_group: true,
        std_normalized_advantage: false,
        frozen_discriminator: false,
        discriminator_init,
        save_every: args.iterations.div_ceil(args.accuracy_points.max(1)).max(1),
        max_new_tokens: args.max_new_tokens,
        teacher_max_new_tokens: TEACHER_MAX_NEW_TOKENS,
    };
    let path = args.out.join("run.toml");
    std::fs::write(&path, run_config_toml(&spec))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// The stages' wall times, printed as each ends.
struct Stages {
    started: std::time::Instant,
    stage: std::time::Instant,
    done: Vec<(String, f64)>,
}

impl Stages {
    fn new() -> Self {
        let now = std::time::Instant::now();
        Self {
            started: now,
            stage: now,
            done: Vec::new(),
        }
    }
    fn begin(&mut self, n: usize, total: usize, what: &str) {
        self.stage = std::time::Instant::now();
        println!(
            "== stage {n}/{total}: {what} ({:.0} s elapsed) ==",
            self.started.elapsed().as_secs_f64()
        );
    }
    fn end(&mut self, name: &str) {
        let s = self.stage.elapsed().as_secs_f64();
        println!("   {name}: {s:.1} s");
        self.done.push((name.to_string(), s));
    }
}

pub fn run(args: &DemoArgs) -> anyhow::Result<()> {
    let mut stages = Stages::new();
    const TOTAL: usize = 6;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    stages.begin(1, TOTAL, "data and models");
    let data = args.out.join("data");
    if !data.join("train.jsonl").is_file() {
        synth_benchmark(&data)?;
    }
    let models = models(args, &data)?;
    stages.end("data_and_models");

    let mut config = write_config(args, &data, &models, None)?;
    let mut cfg = RunConfig::load(&config)?;
    // A fresh run each time: the demo's state is its own.
    let _ = std::fs::remove_dir_all(&cfg.run.dir);
    ril(&["config", "check", &p(&config)])?;

    stages.begin(
        2,
        TOTAL,
        "discriminator pre-training (student vs teacher answers)",
    );
    if args.pretrain.pretrain_questions > 0 {
        let d_dir = absolute(&args.out)?.join("discriminator-pretrained");
        let _ = std::fs::remove_dir_all(&d_dir);
        pretrain_discriminator(&cfg, &config, &data, &d_dir, &args.pretrain)?;
        config = write_config(args, &data, &models, Some(d_dir))?;
        cfg = RunConfig::load(&config)?;
    } else {
        println!("   skipped (--pretrain-questions 0)");
    }
    stages.end("discriminator_pretrain");

    stages.begin(3, TOTAL, &format!("RIL ({} iterations)", args.iterations));
    let outcome = run_local(&cfg, &config)?;
    println!("{}", crate::roles::format_status(&outcome.status));
    stages.end("ril");

    let final_ckpt =
        ril_learner::trainer::checkpoint_dir(&outcome.learner_dir, outcome.status.policy_version);
    stages.begin(
        4,
        TOTAL,
        "the student before RIL (held-out test questions, greedy)",
    );
    let before = eval_accuracy(
        &cfg.student.checkpoint,
        &data,
        "test",
        args.eval_rows,
        args.max_new_tokens,
        &args.out.join("eval-before.json"),
    )?;
    stages.end("eval_before");
    stages.begin(
        5,
        TOTAL,
        &format!(
            "the student after {} RIL iterations ({}), and the checkpoints on the way",
            outcome.status.policy_version,
            final_ckpt.display()
        ),
    );
    let mut accuracy = vec![(0.0, before)];
    for (version, dir) in ril_learner::trainer::list_checkpoints(&cfg.learner.out_dir)? {
        if version == outcome.status.policy_version {
            continue;
        }
        let out = args.out.join(format!("eval-{version:06}.json"));
        accuracy.push((
            version as f64,
            eval_accuracy(
                &dir,
                &data,
                "test",
                args.eval_rows,
                args.max_new_tokens,
                &out,
            )?,
        ));
    }
    let after = eval_accuracy(
        &final_ckpt,
        &data,
        "test",
        args.eval_rows,
        args.max_new_tokens,
        &args.out.join("eval-after.json"),
    )?;
    accuracy.push((outcome.status.policy_version as f64, after));
    stages.end("eval_after");

    stages.begin(6, TOTAL, "report and plots");
    let report = write_report(args, &outcome, &accuracy, &stages)?;
    stages.end("report");
    println!("{report}");
    println!(
        "demo finished in {:.0} s (the RIL run {:.0} s); report, metrics, plots and logs in {}",
        stages.started.elapsed().as_secs_f64(),
        outcome.seconds,
        args.out.display()
    );
    Ok(())
}

/// Greedy accuracy of `model` on the first `rows` questions of `split`, `max_new_tokens` at
/// most per answer (`ril eval`, whose full report goes to `out`).
pub fn eval_accuracy(
    model: &Path,
    data: &Path,
    split: &str,
    rows: usize,
    max_new_tokens: u32,
    out: &Path,
) -> anyhow::Result<f64> {
    ril(&[
        "eval",
        "--max-new-tokens",
        &max_new_tokens.to_string(),
        "--model",
        &p(model),
        "--data",
        &p(data),
        "--split",
        split,
        "--max-rows",
        &rows.to_string(),
        "--out",
        &p(out),
    ])?;
    read_json(out)?["accuracy"]
        .as_f64()
        .with_context(|| format!("{}: no accuracy", out.display()))
}

/// `config`'s run through the local cluster (`ril train`'s supervisor, its default timeouts).
pub fn run_local(cfg: &RunConfig, config: &Path) -> anyhow::Result<crate::cluster::TrainOutcome> {
    let train = TrainArgs {
        config: config.to_path_buf(),
        actors: None,
        startup_timeout_s: 300,
        stall_timeout_s: 900,
    };
    crate::roles::runtime()?.block_on(run_cluster(cfg, config, &train))
}

/// The `shapes` benchmark the demo and the ablation run on (seed 0; 2000 train, 200 val,
/// 500 test questions; objects at their cell's centre, as the built-in models were trained).
pub fn synth_benchmark(data: &Path) -> anyhow::Result<()> {
    ril(&[
        "data",
        "synth",
        "--out",
        &p(data),
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

pub fn read_json(path: &Path) -> anyhow::Result<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
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

/// `report.json` (accuracy before/after overall and per family, reward components, D accuracy,
/// KL, wall time per stage) and `metrics.jsonl` (the learner's per-step lines) in the run
/// directory; returns the terminal summary.
fn write_report(
    args: &DemoArgs,
    outcome: &crate::cluster::TrainOutcome,
    accuracy: &[(f64, f64)],
    stages: &Stages,
) -> anyhow::Result<String> {
    let wall = stages.started.elapsed().as_secs_f64();
    let before = read_json(&args.out.join("eval-before.json"))?;
    let after = read_json(&args.out.join("eval-after.json"))?;
    let metrics_src = outcome
        .learner_dir
        .join(ril_learner::metrics_log::METRICS_FILE);
    let metrics_dst = args.out.join(ril_learner::metrics_log::METRICS_FILE);
    std::fs::copy(&metrics_src, &metrics_dst).with_context(|| {
        format!(
            "copying {} to {}",
            metrics_src.display(),
            metrics_dst.display()
        )
    })?;
    let metrics = ril_plot::read_metrics(&metrics_dst)?;
    let plots = ril_plot::metrics_plots(&metrics_dst, &args.out.join("plots"), accuracy)?;
    let mut families = serde_json::Map::new();
    if let Some(fams) = before["per_family"].as_object() {
        for (name, b) in fams {
            families.insert(
                name.clone(),
                serde_json::json!({
                    "questions": b["total"],
                    "before": b["accuracy"],
                    "after": after["per_family"][name]["accuracy"],
                }),
            );
        }
    }
    let mut components = serde_json::Map::new();
    for key in [
        "reward_student_mean",
        "reward_teacher_mean",
        "reward_ans_student_mean",
        "reward_ans_teacher_mean",
        "reward_sim_student_mean",
        "reward_sim_teacher_mean",
    ] {
        components.insert(key.into(), first_last(&metrics, key));
    }
    let report = serde_json::json!({
        "accuracy": {
            "before": before["accuracy"],
            "after": after["accuracy"],
            "questions": after["questions"],
            "per_family": families,
        },
        "iterations": outcome.status.policy_version,
        "reward_components": components,
        "d_accuracy": first_last(&metrics, "d_accuracy"),
        "kl": first_last(&metrics, "kl_mean"),
        "entropy": first_last(&metrics, "entropy_mean"),
        "wall_time_s": wall,
        "stage_seconds": stages.done.iter().map(|(n, s)| (n.clone(), serde_json::json!(s))).collect::<serde_json::Map<_, _>>(),
        "accuracy_by_iteration": accuracy.iter().map(|(v, a)| serde_json::json!({"iteration": v, "accuracy": a})).collect::<Vec<_>>(),
        "plots": plots.iter().map(|x| p(x)).collect::<Vec<_>>(),
        "run_dir": args.out,
    });
    let path = args.out.join("report.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", path.display()))?;
    let pct = |v: &serde_json::Value| v.as_f64().map(|x| format!("{:.1} %", 100.0 * x));
    Ok(format!(
        "held-out accuracy ({} test questions, greedy): {} before RIL -> {} after {} iterations \
         (report: {})",
        after["questions"],
        pct(&before["accuracy"]).unwrap_or_default(),
        pct(&after["accuracy"]).unwrap_or_default(),
        outcome.status.policy_version,
        path.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        demo: DemoArgs,
    }

    #[test]
    fn the_demo_needs_the_student_and_only_its_own_teachers() {
        let args = Cli::parse_from(["ril"]).demo;
        assert_eq!(
            needed_models(&args).unwrap(),
            ["student-reasoned", "teacher-reasoned"]
        );
        let args = Cli::parse_from([
            "ril",
            "--teachers",
            "terse,narrated",
            "--student",
            "student",
        ])
        .demo;
        assert_eq!(
            needed_models(&args).unwrap(),
            ["student", "teacher-terse", "teacher-narrated"]
        );
        let args = Cli::parse_from(["ril", "--teachers", "loud"]).demo;
        let e = needed_models(&args).unwrap_err().to_string();
        assert!(
            e.contains("\"loud\"") && e.contains("terse, reasoned, narrated"),
            "{e}"
        );
        let args = Cli::parse_from(["ril", "--student", "teacher-terse"]).demo;
        let e = needed_models(&args).unwrap_err().to_string();
        assert!(
            e.contains("--student") && e.contains("student-reasoned, student"),
            "{e}"
        );
    }
}
