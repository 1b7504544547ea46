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
    /// Where the demo writes everything (data, run state, checkpoints, logs).
    #[arg(long, default_value = "runs/demo")]
    pub dir: PathBuf,
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
    /// Test questions evaluated before and after.
    #[arg(long, default_value_t = 100)]
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
    let out = args.dir.join("models");
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
    let work = args.dir.join("models-work");
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
    let dir = abs(&args.dir)?;
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
    let path = args.dir.join("run.toml");
    std::fs::write(&path, toml).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

pub fn run(args: &DemoArgs) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let data = args.dir.join("data");
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
            "--n-train",
            "2000",
            "--n-val",
            "100",
            "--n-test",
            "500",
        ])?;
    }
    let models = models(args, &data)?;
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
        &p(&args.dir.join("eval-before.json")),
    ])?;
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
        &p(&args.dir.join("eval-after.json")),
    ])?;
    println!(
        "demo finished in {:.0} s (the RIL run {:.0} s); logs in {}",
        started.elapsed().as_secs_f64(),
        outcome.seconds,
        cfg.run.dir.join("logs").display()
    );
    Ok(())
}
