//! `ril demo`: the whole loop in one command on this machine. It writes the `shapes` benchmark
//! (if absent), takes the built-in models (`models/builtin`: teachers with different answer
//! styles and a weaker student) or, when they are missing, makes small ones on first use with
//! the project's own commands, writes a run config, runs the local cluster (every role its own
//! process) for a short RIL run, and evaluates the student before and after.

use std::path::{Path, PathBuf};
use std::time::Instant;

use ril_config::RunConfig;

use crate::cluster::TrainOutcome;
use crate::error::{OrchestrateError, Result};
use crate::ril::{RilBinary, arg};
use crate::runs::{
    PretrainSettings, RunSpec, TEACHER_MAX_NEW_TOKENS, absolute, eval_accuracy, first_last,
    pretrain_discriminator, read_json, run_local, student_dir, synth_benchmark, teacher_dir,
    write_json,
};

/// Everything `ril demo` takes (its flags, documented there).
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// The run directory: data, run state, checkpoints, logs, `report.json`, `metrics.jsonl`.
    pub out: PathBuf,
    /// The built-in models' directory.
    pub models: PathBuf,
    /// The student, by its built-in name.
    pub student: String,
    pub iterations: u64,
    /// The teachers in the run, by their built-in names.
    pub teachers: Vec<String>,
    pub questions_per_iteration: u64,
    pub group_size: u32,
    pub actors: u32,
    pub max_new_tokens: u32,
    /// Test questions evaluated before and after (greedy).
    pub eval_rows: usize,
    pub lr: f64,
    pub seed: u64,
    /// Checkpoints evaluated on the way, the last one the final policy.
    pub accuracy_points: u64,
    pub pretrain: PretrainSettings,
    /// SFT steps for the models made on first use when the built-in ones are missing.
    pub fallback_sft_steps: usize,
    /// Every role's device (`[run] device`), the evaluations' and the fallback models' SFT.
    /// None: the CPU.
    pub device: Option<String>,
}

impl DemoOptions {
    /// The device as the commands take it.
    fn device(&self) -> &str {
        self.device.as_deref().unwrap_or("cpu")
    }
}

/// The model directories the demo needs: the student and the teachers it runs with.
pub fn needed_models(options: &DemoOptions) -> Result<Vec<&'static str>> {
    let mut needed = vec![student_dir(&options.student)?];
    for name in &options.teachers {
        needed.push(teacher_dir(name)?);
    }
    Ok(needed)
}

/// A model the demo makes on first use: its directory, init seed and SFT target; students are
/// smaller (one layer) and trained less.
struct FallbackModel {
    name: &'static str,
    seed: &'static str,
    target: &'static str,
    student: bool,
}

const FALLBACK_MODELS: [FallbackModel; 5] = [
    FallbackModel {
        name: "teacher-terse",
        seed: "1",
        target: "reference",
        student: false,
    },
    FallbackModel {
        name: "teacher-reasoned",
        seed: "2",
        target: "style:reasoned",
        student: false,
    },
    FallbackModel {
        name: "teacher-narrated",
        seed: "4",
        target: "style:narrated",
        student: false,
    },
    FallbackModel {
        name: "student",
        seed: "3",
        target: "reference",
        student: true,
    },
    FallbackModel {
        name: "student-reasoned",
        seed: "5",
        target: "style:reasoned",
        student: true,
    },
];

/// The models the demo runs on: the built-in ones, or small ones made here on first use.
fn models(ril: &RilBinary, options: &DemoOptions, data: &Path) -> Result<PathBuf> {
    let needed = needed_models(options)?;
    let all_in = |dir: &Path| (needed.iter()).all(|m| dir.join(m).join("config.json").is_file());
    if all_in(&options.models) {
        tracing::info!(dir = %options.models.display(), "using the built-in models");
        return Ok(options.models.clone());
    }
    let out = options.out.join("models");
    if all_in(&out) {
        tracing::info!(dir = %out.display(), "using the models made on an earlier demo run");
        return Ok(out);
    }
    tracing::warn!(
        missing = %options.models.display(),
        "built-in models not found: making small ones on first use (a few minutes)"
    );
    let work = options.out.join("models-work");
    let tok = work.join("tokenizer");
    ril.run(&[
        "tokenizer",
        "train",
        "--data",
        &arg(data),
        "--out",
        &arg(&tok),
        "--vocab-size",
        "320",
    ])?;
    for model in FALLBACK_MODELS.iter().filter(|m| needed.contains(&m.name)) {
        make_model(ril, options, model, data, &tok, &work, &out)?;
    }
    Ok(out)
}

/// A random test-size model (one layer for a student), fine-tuned on `data` towards its
/// target, exported as `out/<name>`.
fn make_model(
    ril: &RilBinary,
    options: &DemoOptions,
    model: &FallbackModel,
    data: &Path,
    tok: &Path,
    work: &Path,
    out: &Path,
) -> Result<()> {
    let init = arg(&work.join(format!("{}-init", model.name)));
    let mut a = vec!["model", "init", "--tokenizer"];
    let tok = arg(tok);
    a.extend([tok.as_str(), "--size", "test", "--seed", model.seed]);
    a.extend(["--out", &init]);
    if model.student {
        a.extend(["--layers", "1"]);
    }
    ril.run(&a)?;
    // Students are trained less, so that RIL has something to improve.
    let steps = match model.student {
        true => (options.fallback_sft_steps / 3).max(1),
        false => options.fallback_sft_steps,
    };
    let sft = work.join(format!("{}-sft", model.name));
    ril.run(&[
        "sft",
        "--model",
        &init,
        "--data",
        &arg(data),
        "--out",
        &arg(&sft),
        "--steps",
        &steps.to_string(),
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
        model.target,
        "--device",
        options.device(),
    ])?;
    ril.run(&[
        "model",
        "export",
        "--model",
        &arg(&sft.join("final")),
        "--out",
        &arg(&out.join(model.name)),
    ])
}

/// Writes the demo's run config (`<out>/run.toml`) and reads it back.
fn write_config(
    options: &DemoOptions,
    data: &Path,
    models: &Path,
    discriminator_init: Option<PathBuf>,
) -> Result<RunConfig> {
    let out = absolute(&options.out)?;
    let spec = RunSpec {
        id: "demo".into(),
        dir: out.join("run"),
        seed: options.seed,
        iterations: options.iterations,
        questions_per_iteration: options.questions_per_iteration,
        group_size: options.group_size,
        actors: options.actors,
        lr: options.lr,
        data: absolute(data)?,
        models: absolute(models)?,
        student: options.student.clone(),
        teachers: (options.teachers.iter())
            .map(|name| Ok((name.clone(), teacher_dir(name)?.to_string())))
            .collect::<Result<_>>()?,
        use_ans_reward: true,
        use_sim_reward: true,
        teachers_in_group: true,
        std_normalized_advantage: false,
        frozen_discriminator: false,
        discriminator_init,
        save_every: (options.iterations)
            .div_ceil(options.accuracy_points.max(1))
            .max(1),
        max_new_tokens: options.max_new_tokens,
        teacher_max_new_tokens: TEACHER_MAX_NEW_TOKENS,
        device: options.device.clone(),
    };
    spec.write_config(&options.out.join("run.toml"))
}

/// The stages' wall times, printed as each ends.
struct Stages {
    started: Instant,
    stage: Instant,
    done: Vec<(String, f64)>,
}

/// The demo's stages, in order.
const TOTAL_STAGES: usize = 6;

impl Stages {
    fn new() -> Self {
        let now = Instant::now();
        Self {
            started: now,
            stage: now,
            done: Vec::new(),
        }
    }
    fn begin(&mut self, n: usize, what: &str) {
        self.stage = Instant::now();
        println!(
            "== stage {n}/{TOTAL_STAGES}: {what} ({:.0} s elapsed) ==",
            self.started.elapsed().as_secs_f64()
        );
    }
    fn end(&mut self, name: &str) {
        let s = self.stage.elapsed().as_secs_f64();
        println!("   {name}: {s:.1} s");
        self.done.push((name.to_string(), s));
    }
}

/// Stage 1: the benchmark (unless written earlier) and the models; the run config.
fn prepare(ril: &RilBinary, options: &DemoOptions) -> Result<(PathBuf, PathBuf, RunConfig)> {
    let data = options.out.join("data");
    if !data.join("train.jsonl").is_file() {
        synth_benchmark(ril, &data)?;
    }
    let models = models(ril, options, &data)?;
    let cfg = write_config(options, &data, &models, None)?;
    Ok((data, models, cfg))
}

/// Stage 2: D pre-trained against the run's teachers, and the run config that starts from it.
fn pretrain(
    ril: &RilBinary,
    options: &DemoOptions,
    cfg: RunConfig,
    data: &Path,
    models: &Path,
) -> Result<RunConfig> {
    if options.pretrain.questions == 0 {
        println!("   skipped (--pretrain-questions 0)");
        return Ok(cfg);
    }
    let d_dir = absolute(&options.out)?.join("discriminator-pretrained");
    let _ = std::fs::remove_dir_all(&d_dir);
    pretrain_discriminator(ril, &cfg, data, &d_dir, options.pretrain)?;
    write_config(options, data, models, Some(d_dir))
}

/// Stages 4 and 5: greedy accuracy of the student before RIL, of the checkpoints on the way
/// and of the final policy, as `(iteration, accuracy)`.
fn evaluate(
    ril: &RilBinary,
    options: &DemoOptions,
    cfg: &RunConfig,
    data: &Path,
    outcome: &TrainOutcome,
    stages: &mut Stages,
) -> Result<Vec<(f64, f64)>> {
    let eval = |model: &Path, out: &Path| {
        let (rows, budget) = (options.eval_rows, options.max_new_tokens);
        eval_accuracy(
            ril,
            model,
            data,
            ("test", rows, budget),
            options.device(),
            out,
        )
    };
    let version = outcome.status.policy_version;
    let final_ckpt = ril_learner::trainer::checkpoint_dir(&outcome.learner_dir, version);
    stages.begin(
        4,
        "the student before RIL (held-out test questions, greedy)",
    );
    let before = eval(
        &cfg.student.checkpoint,
        &options.out.join("eval-before.json"),
    )?;
    stages.end("eval_before");
    stages.begin(
        5,
        &format!(
            "the student after {version} RIL iterations ({}), and the checkpoints on the way",
            final_ckpt.display()
        ),
    );
    let mut accuracy = vec![(0.0, before)];
    for (v, dir) in ril_learner::trainer::list_checkpoints(&cfg.learner.out_dir)? {
        if v != version {
            let out = options.out.join(format!("eval-{v:06}.json"));
            accuracy.push((v as f64, eval(&dir, &out)?));
        }
    }
    let after = eval(&final_ckpt, &options.out.join("eval-after.json"))?;
    accuracy.push((version as f64, after));
    stages.end("eval_after");
    Ok(accuracy)
}

pub fn run(ril: &RilBinary, options: &DemoOptions) -> Result<()> {
    let mut stages = Stages::new();
    std::fs::create_dir_all(&options.out).map_err(OrchestrateError::io(format!(
        "creating {}",
        options.out.display()
    )))?;
    stages.begin(1, "data and models");
    let (data, models, cfg) = prepare(ril, options)?;
    stages.end("data_and_models");
    // A fresh run each time: the demo's state is its own.
    let _ = std::fs::remove_dir_all(&cfg.run.dir);
    ril.run(&["config", "check", &arg(&cfg.path)])?;

    stages.begin(2, "discriminator pre-training (student vs teacher answers)");
    let cfg = pretrain(ril, options, cfg, &data, &models)?;
    stages.end("discriminator_pretrain");

    stages.begin(3, &format!("RIL ({} iterations)", options.iterations));
    let outcome = run_local(ril, &cfg)?;
    println!("{}", crate::status::format_status(&outcome.status));
    stages.end("ril");

    let accuracy = evaluate(ril, options, &cfg, &data, &outcome, &mut stages)?;

    stages.begin(6, "report and plots");
    let report = write_report(options, &outcome, &accuracy, &stages)?;
    stages.end("report");
    println!("{report}");
    println!(
        "demo finished in {:.0} s (the RIL run {:.0} s); report, metrics, plots and logs in {}",
        stages.started.elapsed().as_secs_f64(),
        outcome.seconds,
        options.out.display()
    );
    Ok(())
}

/// Accuracy before and after per question family, from the two evaluations' reports.
fn per_family(before: &serde_json::Value, after: &serde_json::Value) -> serde_json::Value {
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
    families.into()
}

/// The reward components' means over the first and the last quarter of the run.
fn reward_components(metrics: &crate::runs::Metrics) -> serde_json::Value {
    let mut components = serde_json::Map::new();
    for key in [
        "reward_student_mean",
        "reward_teacher_mean",
        "reward_ans_student_mean",
        "reward_ans_teacher_mean",
        "reward_sim_student_mean",
        "reward_sim_teacher_mean",
    ] {
        components.insert(key.into(), first_last(metrics, key));
    }
    components.into()
}

/// `metrics.jsonl` (the learner's per-step lines) copied into the run directory, and its
/// series.
fn copy_metrics(options: &DemoOptions, outcome: &TrainOutcome) -> Result<PathBuf> {
    let file = ril_learner::metrics_log::METRICS_FILE;
    let (src, dst) = (outcome.learner_dir.join(file), options.out.join(file));
    std::fs::copy(&src, &dst).map_err(OrchestrateError::io(format!(
        "copying {} to {}",
        src.display(),
        dst.display()
    )))?;
    Ok(dst)
}

/// `report.json` (accuracy before/after overall and per family, reward components, D accuracy,
/// KL, wall time per stage) and `metrics.jsonl` and `plots/` in the run directory; returns the
/// terminal summary.
fn write_report(
    options: &DemoOptions,
    outcome: &TrainOutcome,
    accuracy: &[(f64, f64)],
    stages: &Stages,
) -> Result<String> {
    let wall = stages.started.elapsed().as_secs_f64();
    let before = read_json(&options.out.join("eval-before.json"))?;
    let after = read_json(&options.out.join("eval-after.json"))?;
    let metrics_file = copy_metrics(options, outcome)?;
    let metrics = ril_plot::read_metrics(&metrics_file)?;
    let plots = ril_plot::metrics_plots(&metrics_file, &options.out.join("plots"), accuracy)?;
    let stage_seconds: serde_json::Map<_, _> = (stages.done.iter())
        .map(|(n, s)| (n.clone(), serde_json::json!(s)))
        .collect();
    let by_iteration: Vec<_> = (accuracy.iter())
        .map(|(v, a)| serde_json::json!({"iteration": v, "accuracy": a}))
        .collect();
    let report = serde_json::json!({
        "accuracy": {
            "before": before["accuracy"],
            "after": after["accuracy"],
            "questions": after["questions"],
            "per_family": per_family(&before, &after),
        },
        "iterations": outcome.status.policy_version,
        "reward_components": reward_components(&metrics),
        "d_accuracy": first_last(&metrics, "d_accuracy"),
        "kl": first_last(&metrics, "kl_mean"),
        "entropy": first_last(&metrics, "entropy_mean"),
        "wall_time_s": wall,
        "stage_seconds": stage_seconds,
        "accuracy_by_iteration": by_iteration,
        "plots": plots.iter().map(|x| arg(x)).collect::<Vec<_>>(),
        "run_dir": options.out,
    });
    let path = options.out.join("report.json");
    write_json(&path, &report)?;
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
