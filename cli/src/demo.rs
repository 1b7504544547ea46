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
    /// The built-in models (student, teacher-terse, teacher-reasoned).
    #[arg(long, default_value = "models/builtin")]
    pub models: PathBuf,
    /// RIL iterations (learner steps).
    #[arg(long, default_value_t = 6)]
    pub iterations: u64,
    #[arg(long, default_value_t = 4)]
    pub questions_per_iteration: u64,
    /// G: student rollouts per question (and teacher answers per question).
    #[arg(long, default_value_t = 4)]
    pub group_size: u32,
    #[arg(long, default_value_t = 2)]
    pub actors: u32,
    /// Test questions evaluated before and after (greedy).
    #[arg(long, default_value_t = 500)]
    pub eval_rows: usize,
    /// SFT steps for the models made on first use when the built-in ones are missing.
    #[arg(long, default_value_t = 300)]
    pub fallback_sft_steps: usize,
}

fn ril(args: &[&str]) -> anyhow::Result<()> {
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

fn p(x: &Path) -> String {
    x.to_string_lossy().into_owned()
}

const MODELS: [&str; 3] = ["student", "teacher-terse", "teacher-reasoned"];

/// The models the demo runs on: the built-in ones, or small ones made here on first use.
fn models(args: &DemoArgs, data: &Path) -> anyhow::Result<PathBuf> {
    if MODELS
        .iter()
        .all(|m| args.models.join(m).join("config.json").is_file())
    {
        tracing::info!(dir = %args.models.display(), "using the built-in models");
        return Ok(args.models.clone());
    }
    let out = args.out.join("models");
    if MODELS
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
            "student",
            "3",
            "reference",
            student_steps.as_str(),
            vec!["--layers", "1"],
        ),
    ] {
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

fn write_config(args: &DemoArgs, data: &Path, models: &Path) -> anyhow::Result<PathBuf> {
    let abs = |x: &Path| -> anyhow::Result<String> {
        Ok(p(
            &std::fs::canonicalize(x).with_context(|| format!("resolving {}", x.display()))?
        ))
    };
    let dir = abs(&args.out)?;
    let toml = format!(
        r#"# Written by `ril demo`: a short RIL run on the built-in tiny models.
[run]
id = "demo"
dir = "{dir}/run"
seed = 0
iterations = {iterations}
questions_per_iteration = {b}
staleness_bound = 0

[data]
path = "{data}"

[student]
checkpoint = "{models}/student"

[rollout]
group_size = {g}
max_new_tokens = 48

[coordinator]
lease_timeout_s = 120
heartbeat_interval_ms = 500
actor_timeout_s = 20

[actors]
count = {actors}

[learner]
save_every = 0

[learner.grpo]
lr = 2e-5
loss_normalizer = 48
micro_batch_size = 8

[discriminator]
lr = 1e-4
save_every = 0

[discriminator.judge]
kind = "rule"

[[teachers]]
name = "terse"
backend = "candle"
checkpoint = "{models}/teacher-terse"

[teachers.sampling]
temperature = 1.0
max_new_tokens = 48

[[teachers]]
name = "reasoned"
backend = "candle"
checkpoint = "{models}/teacher-reasoned"

[teachers.sampling]
temperature = 1.0
max_new_tokens = 48
"#,
        iterations = args.iterations,
        b = args.questions_per_iteration,
        data = abs(data)?,
        models = abs(models)?,
        g = args.group_size,
        actors = args.actors,
    );
    let path = args.out.join("run.toml");
    std::fs::write(&path, toml).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

pub fn run(args: &DemoArgs) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let mut stages: Vec<(&str, f64)> = Vec::new();
    let mut stage = std::time::Instant::now();
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let data = args.out.join("data");
    if !data.join("train.jsonl").is_file() {
        ril(&[
            "data",
            "synth",
            "--out",
            &p(&data),
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
        ])?;
    }
    stages.push(("data", stage.elapsed().as_secs_f64()));
    stage = std::time::Instant::now();
    let models = models(args, &data)?;
    stages.push(("models", stage.elapsed().as_secs_f64()));
    stage = std::time::Instant::now();
    let config = write_config(args, &data, &models)?;
    let cfg = RunConfig::load(&config)?;
    // A fresh run each time: the demo's state is its own.
    let _ = std::fs::remove_dir_all(&cfg.run.dir);
    ril(&["config", "check", &p(&config)])?;
    let train = TrainArgs {
        config: config.clone(),
        actors: None,
        startup_timeout_s: 300,
        stall_timeout_s: 900,
    };
    let outcome = crate::roles::runtime()?.block_on(run_cluster(&cfg, &config, &train))?;
    println!("{}", crate::roles::format_status(&outcome.status));
    stages.push(("ril", stage.elapsed().as_secs_f64()));
    stage = std::time::Instant::now();
    let final_ckpt = cfg
        .learner
        .out_dir
        .join(format!("checkpoint-{:06}", outcome.status.policy_version));
    let rows = args.eval_rows.to_string();
    println!("== the student before RIL ==");
    ril(&[
        "eval",
        "--model",
        &p(&cfg.student.checkpoint),
        "--data",
        &p(&data),
        "--split",
        "test",
        "--max-rows",
        &rows,
        "--out",
        &p(&args.out.join("eval-before.json")),
    ])?;
    stages.push(("eval_before", stage.elapsed().as_secs_f64()));
    stage = std::time::Instant::now();
    println!(
        "== the student after {} RIL iterations ({}) ==",
        outcome.status.policy_version,
        final_ckpt.display()
    );
    ril(&[
        "eval",
        "--model",
        &p(&final_ckpt),
        "--data",
        &p(&data),
        "--split",
        "test",
        "--max-rows",
        &rows,
        "--out",
        &p(&args.out.join("eval-after.json")),
    ])?;
    stages.push(("eval_after", stage.elapsed().as_secs_f64()));
    let report = write_report(args, &outcome, &stages, started.elapsed().as_secs_f64())?;
    println!("{report}");
    println!(
        "demo finished in {:.0} s (the RIL run {:.0} s); report, metrics and logs in {}",
        started.elapsed().as_secs_f64(),
        outcome.seconds,
        args.out.display()
    );
    Ok(())
}

fn read_json(path: &Path) -> anyhow::Result<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Mean of `key` over the first and the last `k` lines of the run's metrics (lines lacking it
/// are skipped).
fn first_last(lines: &[serde_json::Value], key: &str, k: usize) -> serde_json::Value {
    let vals: Vec<f64> = lines
        .iter()
        .filter_map(|l| l.get(key).and_then(|v| v.as_f64()))
        .collect();
    if vals.is_empty() {
        return serde_json::Value::Null;
    }
    let k = k.clamp(1, vals.len());
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
    stages: &[(&str, f64)],
    wall: f64,
) -> anyhow::Result<String> {
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
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&metrics_dst)?
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let k = (lines.len() / 4).max(1);
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
        components.insert(key.into(), first_last(&lines, key, k));
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
        "d_accuracy": first_last(&lines, "d_accuracy", k),
        "kl": first_last(&lines, "kl_mean", k),
        "entropy": first_last(&lines, "entropy_mean", k),
        "wall_time_s": wall,
        "stage_seconds": stages.iter().map(|(n, s)| (n.to_string(), serde_json::json!(s))).collect::<serde_json::Map<_, _>>(),
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
