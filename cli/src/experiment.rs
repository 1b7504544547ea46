//! `ril experiment ablation`: the paper's comparison in miniature. Every variant runs with the
//! same budget of iterations on the same data, once per seed, through the real local cluster
//! (`ril train`'s processes); each final policy is evaluated greedily on a held-out split. The
//! result is a markdown table (mean ± std of accuracy per variant, next to the paper's numbers
//! for reference), the same as JSON, and a bar plot.
//!
//! Runs are resumable: a variant × seed whose `result.json` exists is not run again, so an
//! interrupted ablation continues where it stopped (delete the directory for a fresh one).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use crate::config::RunConfig;
use crate::demo::{
    Metrics, PretrainArgs, RunSpec, absolute, eval_accuracy, first_last, pretrain_discriminator,
    run_config_toml, run_local, synth_benchmark,
};

#[derive(Debug, clap::Args)]
pub struct AblationArgs {
    /// Where the runs, the table (`ablation.md`, `ablation.json`) and the plot go.
    #[arg(long, default_value = "runs/ablation")]
    pub out: PathBuf,
    /// The built-in models (the students and the teachers).
    #[arg(long, default_value = "models/builtin")]
    pub models: PathBuf,
    /// The student (its model directory under `--models`), as in `ril demo`.
    #[arg(long, default_value = crate::demo::STUDENTS[0].0)]
    pub student: String,
    /// Teacher 1 and teacher 2, by name (`terse`, `reasoned`, `narrated`): the variants with
    /// one teacher take one of these, the others both. Two teachers with the same answer
    /// format and different wording, as the paper's are.
    #[arg(long, value_delimiter = ',', num_args = 1.., default_value = "reasoned,narrated")]
    pub teachers: Vec<String>,
    /// The student's generation budget in every variant (rollouts and evaluation).
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: u32,
    /// A dataset directory; default: the demo's `shapes` benchmark, written under `--out`.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// The split the final policies are evaluated on. Tune on `val`; report `test`.
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Rows of the split evaluated (greedy).
    #[arg(long, default_value_t = 500)]
    pub eval_rows: usize,
    /// Seeds per variant (0, 1, ..., N-1).
    #[arg(long, default_value_t = 3)]
    pub seeds: u64,
    /// RIL iterations per run: the same budget for every variant.
    #[arg(long, default_value_t = 40)]
    pub iterations: u64,
    #[arg(long, default_value_t = 4)]
    pub questions_per_iteration: u64,
    #[arg(long, default_value_t = 4)]
    pub group_size: u32,
    #[arg(long, default_value_t = 2)]
    pub actors: u32,
    /// The policy's learning rate (every variant).
    #[arg(long, default_value_t = 2e-4)]
    pub lr: f64,
    /// D's pre-training, as `ril demo` does, for every variant that uses the similarity
    /// reward: one pre-trained D per teacher set, shared by its variants and seeds.
    #[command(flatten)]
    pub pretrain: PretrainArgs,
    /// Comma-separated subset of the variants (default: all); `--list-variants` names them.
    #[arg(long, value_delimiter = ',')]
    pub variants: Vec<String>,
    /// Print the variants and exit.
    #[arg(long)]
    pub list_variants: bool,
}

/// One row of the ablation table: how its run differs from full RIL.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Variant {
    pub key: &'static str,
    pub label: &'static str,
    /// No training: the SFT student itself.
    pub base: bool,
    /// Which of the ablation's two teachers (`--teachers`) take part (indices).
    pub teachers: &'static [usize],
    pub use_ans_reward: bool,
    pub use_sim_reward: bool,
    pub teachers_in_group: bool,
    pub std_normalized_advantage: bool,
    pub frozen_discriminator: bool,
    /// The paper's number for the closest setting, and where it comes from.
    pub paper: Option<(f64, &'static str)>,
}

const FULL: Variant = Variant {
    key: "ril",
    label: "RIL, both teachers",
    base: false,
    teachers: &[0, 1],
    use_ans_reward: true,
    use_sim_reward: true,
    teachers_in_group: true,
    std_normalized_advantage: false,
    frozen_discriminator: false,
    paper: Some((72.3, "Qwen2.5-VL-3B, mean of 14 benchmarks")),
};

/// The variants, in the table's order.
pub const VARIANTS: [Variant; 9] = [
    Variant {
        key: "base",
        label: "base (SFT)",
        base: true,
        paper: Some((64.0, "Qwen2.5-VL-3B, mean of 14 benchmarks")),
        ..FULL
    },
    Variant {
        key: "rl",
        label: "RL only: Dr.GRPO, answer reward",
        use_sim_reward: false,
        teachers_in_group: false,
        paper: Some((66.4, "Qwen2.5-VL-3B, mean of 14 benchmarks")),
        ..FULL
    },
    Variant {
        key: "il",
        label: "IL only: similarity reward",
        use_ans_reward: false,
        paper: Some((65.2, "Qwen2.5-VL-7B, MathVista: no answer reward")),
        ..FULL
    },
    Variant {
        key: "ril-t1",
        label: "RIL, teacher 1",
        teachers: &[0],
        paper: Some((68.7, "Qwen2.5-VL-3B, mean of 14 benchmarks")),
        ..FULL
    },
    Variant {
        key: "ril-t2",
        label: "RIL, teacher 2",
        teachers: &[1],
        paper: Some((68.8, "Qwen2.5-VL-3B, mean of 14 benchmarks")),
        ..FULL
    },
    FULL,
    Variant {
        key: "ril-frozen-d",
        label: "RIL, frozen discriminator",
        frozen_discriminator: true,
        paper: Some((75.3, "Qwen2.5-VL-7B, MathVista (updated D: 79.7)")),
        ..FULL
    },
    Variant {
        key: "ril-no-d",
        label: "RIL, no discriminator",
        use_sim_reward: false,
        paper: Some((69.5, "Qwen2.5-VL-7B, MathVista (updated D: 79.7)")),
        ..FULL
    },
    Variant {
        key: "ril-grpo-std",
        label: "RIL, GRPO's std-normalised advantage",
        std_normalized_advantage: true,
        paper: None,
        ..FULL
    },
];

pub fn variant(key: &str) -> anyhow::Result<Variant> {
    VARIANTS
        .iter()
        .copied()
        .find(|v| v.key == key)
        .ok_or_else(|| {
            let known: Vec<&str> = VARIANTS.iter().map(|v| v.key).collect();
            anyhow::anyhow!(
                "unknown variant {key:?}; the variants are {}",
                known.join(", ")
            )
        })
}

/// The run config of `variant` with `seed` (everything else from `args`).
pub fn spec(
    args: &AblationArgs,
    v: &Variant,
    seed: u64,
    dir: &Path,
    data: &Path,
    models: &Path,
) -> anyhow::Result<RunSpec> {
    let teachers = v
        .teachers
        .iter()
        .map(|&i| {
            let name = args
                .teachers
                .get(i)
                .with_context(|| format!("--teachers: {} needs teacher {}", v.label, i + 1))?;
            Ok((name.clone(), crate::demo::teacher_dir(name)?.to_string()))
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(RunSpec {
        id: format!("ablation-{}-s{seed}", v.key),
        dir: dir.join("run"),
        seed,
        iterations: args.iterations,
        questions_per_iteration: args.questions_per_iteration,
        group_size: args.group_size,
        actors: args.actors,
        lr: args.lr,
        data: data.to_path_buf(),
        models: models.to_path_buf(),
        student: args.student.clone(),
        teachers,
        use_ans_reward: v.use_ans_reward,
        use_sim_reward: v.use_sim_reward,
        teachers_in_group: v.teachers_in_group,
        std_normalized_advantage: v.std_normalized_advantage,
        frozen_discriminator: v.frozen_discriminator,
        discriminator_init: None,
        save_every: 0,
        max_new_tokens: args.max_new_tokens,
        teacher_max_new_tokens: crate::demo::TEACHER_MAX_NEW_TOKENS,
    })
}

/// The variant's teachers by name, e.g. `reasoned+narrated` (none for the base, which runs
/// nothing).
fn teacher_set(args: &AblationArgs, v: &Variant) -> String {
    if v.base {
        return String::new();
    }
    v.teachers
        .iter()
        .filter_map(|&i| args.teachers.get(i).map(String::as_str))
        .collect::<Vec<_>>()
        .join("+")
}

/// The ablation's own arguments that clap cannot check: two known teachers, a known student.
pub fn check_args(args: &AblationArgs) -> anyhow::Result<()> {
    crate::demo::student_dir(&args.student)?;
    if args.teachers.len() != 2 {
        bail!(
            "--teachers: the ablation compares two teachers (teacher 1, teacher 2), got {}: {:?}",
            args.teachers.len(),
            args.teachers
        );
    }
    if args.teachers[0] == args.teachers[1] {
        bail!(
            "--teachers: teacher 1 and teacher 2 are both {:?}",
            args.teachers[0]
        );
    }
    for name in &args.teachers {
        crate::demo::teacher_dir(name)?;
    }
    Ok(())
}

/// Where the variant's pre-trained discriminator lives (`<out>/discriminators/<teachers>`,
/// next to `runs/`; `run_dir` is `<out>/runs/<variant>-s<seed>`), or `None` when it needs none:
/// the base, variants without the similarity reward, and `--pretrain-questions 0`.
pub fn pretrained_d_dir(args: &AblationArgs, v: &Variant, run_dir: &Path) -> Option<PathBuf> {
    if v.base || !v.use_sim_reward || args.pretrain.pretrain_questions == 0 {
        return None;
    }
    let out = run_dir.parent()?.parent()?;
    Some(out.join("discriminators").join(teacher_set(args, v)))
}

/// Mean and (sample) standard deviation; std 0 for fewer than two values.
pub fn mean_std(xs: &[f64]) -> (f64, f64) {
    if xs.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    if xs.len() < 2 {
        return (mean, 0.0);
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

/// One variant × seed: its run (unless it is the base) and the held-out accuracy of its final
/// policy. Written to `dir/result.json`, which marks it done.
fn run_one(
    args: &AblationArgs,
    v: &Variant,
    seed: u64,
    dir: &Path,
    data: &Path,
    models: &Path,
) -> anyhow::Result<serde_json::Value> {
    let started = std::time::Instant::now();
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let (model, metrics) = if v.base {
        (models.join(&args.student), serde_json::Value::Null)
    } else {
        let mut spec = spec(args, v, seed, dir, data, models)?;
        let config = dir.join("run.toml");
        std::fs::write(&config, run_config_toml(&spec))
            .with_context(|| format!("writing {}", config.display()))?;
        let mut cfg = RunConfig::load(&config)?;
        let _ = std::fs::remove_dir_all(&cfg.run.dir);
        if let Some(d_dir) = pretrained_d_dir(args, v, dir) {
            if !d_dir.is_dir() {
                // Written aside and renamed, so an interrupted pre-training is redone.
                let tmp = d_dir.with_extension("partial");
                let _ = std::fs::remove_dir_all(&tmp);
                println!(
                    "    pre-training the discriminator against {} ({} questions, {} steps)",
                    teacher_set(args, v),
                    args.pretrain.pretrain_questions,
                    args.pretrain.pretrain_steps
                );
                pretrain_discriminator(&cfg, &config, data, &tmp, &args.pretrain)?;
                std::fs::rename(&tmp, &d_dir)
                    .with_context(|| format!("moving {} to {}", tmp.display(), d_dir.display()))?;
            }
            spec.discriminator_init = Some(d_dir);
            std::fs::write(&config, run_config_toml(&spec))
                .with_context(|| format!("writing {}", config.display()))?;
            cfg = RunConfig::load(&config)?;
        }
        let outcome = run_local(&cfg, &config)?;
        let metrics = ril_plot::read_metrics(
            &outcome
                .learner_dir
                .join(ril_learner::metrics_log::METRICS_FILE),
        )?;
        (
            ril_learner::trainer::checkpoint_dir(
                &outcome.learner_dir,
                outcome.status.policy_version,
            ),
            end_of_run(&metrics),
        )
    };
    let accuracy = eval_accuracy(
        &model,
        data,
        &args.split,
        args.eval_rows,
        args.max_new_tokens,
        &dir.join("eval.json"),
    )?;
    let result = serde_json::json!({
        "variant": v.key,
        "label": v.label,
        "seed": seed,
        "split": args.split,
        "eval_rows": args.eval_rows,
        "student": args.student,
        "teachers": teacher_set(args, v),
        "iterations": if v.base { 0 } else { args.iterations },
        "accuracy": accuracy,
        "final_metrics": metrics,
        "seconds": started.elapsed().as_secs_f64(),
    });
    let path = dir.join("result.json");
    std::fs::write(&path, serde_json::to_string_pretty(&result)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(result)
}

/// The last quarter's means of the run's reward components, D accuracy, KL and entropy: what
/// the run looked like at its end.
fn end_of_run(metrics: &Metrics) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    for key in [
        "reward_ans_student_mean",
        "reward_sim_student_mean",
        "reward_ans_teacher_mean",
        "reward_sim_teacher_mean",
        "d_accuracy",
        "kl_mean",
        "entropy_mean",
    ] {
        if let Some(last) = first_last(metrics, key).get("last") {
            out.insert(key.into(), last.clone());
        }
    }
    serde_json::Value::Object(out)
}

/// The markdown table: one row per variant with its accuracy over seeds.
pub fn table(args: &AblationArgs, rows: &[(Variant, Vec<f64>, Vec<serde_json::Value>)]) -> String {
    let mut md = format!(
        "| variant | held-out accuracy ({} {} questions, greedy), mean ± std | seeds | r_ans student (end) | r_sim student (end) | D accuracy (end) | KL (end) | paper (reference) |\n|---|---:|---:|---:|---:|---:|---:|---|\n",
        args.eval_rows, args.split
    );
    for (v, accs, results) in rows {
        let (mean, std) = mean_std(accs);
        let metric = |key: &str| -> String {
            let vals: Vec<f64> = results
                .iter()
                .filter_map(|r| r["final_metrics"][key].as_f64())
                .collect();
            if vals.is_empty() {
                "–".into()
            } else {
                format!("{:.3}", mean_std(&vals).0)
            }
        };
        let paper = v
            .paper
            .map(|(x, src)| format!("{x:.1} ({src})"))
            .unwrap_or_else(|| "–".into());
        md.push_str(&format!(
            "| {} | {:.1} ± {:.1} % | {} | {} | {} | {} | {} | {} |\n",
            v.label,
            100.0 * mean,
            100.0 * std,
            accs.len(),
            metric("reward_ans_student_mean"),
            metric("reward_sim_student_mean"),
            metric("d_accuracy"),
            metric("kl_mean"),
            paper
        ));
    }
    md
}

pub fn ablation(args: &AblationArgs) -> anyhow::Result<()> {
    if args.list_variants {
        for v in VARIANTS {
            println!("{:14} {}", v.key, v.label);
        }
        return Ok(());
    }
    if args.seeds == 0 || args.iterations == 0 || args.eval_rows == 0 {
        bail!("--seeds, --iterations and --eval-rows must be positive");
    }
    check_args(args)?;
    let chosen: Vec<Variant> = if args.variants.is_empty() {
        VARIANTS.to_vec()
    } else {
        args.variants
            .iter()
            .map(|k| variant(k.trim()))
            .collect::<anyhow::Result<_>>()?
    };
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let out = absolute(&args.out)?;
    let data = match &args.data {
        Some(d) => absolute(d)?,
        None => {
            let d = out.join("data");
            if !d.join("train.jsonl").is_file() {
                synth_benchmark(&d)?;
            }
            d
        }
    };
    let models = absolute(&args.models)?;
    let started = std::time::Instant::now();
    let total = chosen
        .iter()
        .map(|v| if v.base { 1 } else { args.seeds })
        .sum::<u64>();
    let mut done = 0;
    let mut rows = Vec::new();
    for v in &chosen {
        let mut accs = Vec::new();
        let mut results = Vec::new();
        // The base is evaluated greedily: one evaluation is every seed's.
        let seeds = if v.base { 1 } else { args.seeds };
        for seed in 0..seeds {
            done += 1;
            let dir = out.join("runs").join(format!("{}-s{seed}", v.key));
            let result_path = dir.join("result.json");
            let result = match std::fs::read_to_string(&result_path)
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                // A result is reused only for the same split, student and teachers.
                .filter(|r| {
                    r["split"] == args.split.as_str()
                        && r["student"] == args.student.as_str()
                        && r["teachers"] == teacher_set(args, v).as_str()
                }) {
                Some(r) => {
                    println!("[{done}/{total}] {} seed {seed}: done earlier", v.label);
                    r
                }
                None => {
                    println!(
                        "[{done}/{total}] {} seed {seed} ({:.0} s elapsed)",
                        v.label,
                        started.elapsed().as_secs_f64()
                    );
                    run_one(args, v, seed, &dir, &data, &models)
                        .with_context(|| format!("variant {} seed {seed}", v.key))?
                }
            };
            let acc = result["accuracy"]
                .as_f64()
                .with_context(|| format!("{}: no accuracy", result_path.display()))?;
            println!("    accuracy {:.1} %", 100.0 * acc);
            accs.push(acc);
            results.push(result);
        }
        rows.push((*v, accs, results));
    }
    let md = table(args, &rows);
    let header = format!(
        "# Ablation: {}, teacher 1 = {}, teacher 2 = {}; {} iterations per run, B = {}, G = {}, lr {:e}, {} seed(s), {} split\n\n",
        args.student,
        args.teachers[0],
        args.teachers[1],
        args.iterations,
        args.questions_per_iteration,
        args.group_size,
        args.lr,
        args.seeds,
        args.split
    );
    std::fs::write(out.join("ablation.md"), format!("{header}{md}"))?;
    let json: Vec<serde_json::Value> = rows
        .iter()
        .map(|(v, accs, results)| {
            let (mean, std) = mean_std(accs);
            serde_json::json!({"variant": v.key, "label": v.label, "accuracy": accs, "mean": mean, "std": std, "runs": results})
        })
        .collect();
    std::fs::write(
        out.join("ablation.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    let bars: Vec<(String, f64, f64)> = rows
        .iter()
        .map(|(v, accs, _)| {
            let (m, s) = mean_std(accs);
            (v.label.to_string(), 100.0 * m, 100.0 * s)
        })
        .collect();
    let reference: Vec<(String, f64)> = rows
        .iter()
        .filter_map(|(v, _, _)| v.paper.map(|(x, _)| (v.label.to_string(), x)))
        .collect();
    ril_plot::bar_plot(
        &format!(
            "held-out accuracy ({} split), mean ± std over seeds; reference: the paper",
            args.split
        ),
        "accuracy (%)",
        &bars,
        Some(&reference),
        &out.join("ablation.png"),
    )?;
    println!("{header}{md}");
    println!(
        "ablation finished in {:.0} s: {}",
        started.elapsed().as_secs_f64(),
        out.join("ablation.md").display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variants_differ_from_full_ril_in_what_their_names_say() {
        let keys: Vec<&str> = VARIANTS.iter().map(|v| v.key).collect();
        let unique: std::collections::BTreeSet<&str> = keys.iter().copied().collect();
        assert_eq!(keys.len(), 9);
        assert_eq!(unique.len(), 9, "{keys:?}");
        let labels: std::collections::BTreeSet<&str> = VARIANTS.iter().map(|v| v.label).collect();
        assert_eq!(labels.len(), 9);
        let rl = variant("rl").unwrap();
        assert!(!rl.use_sim_reward && !rl.teachers_in_group && rl.use_ans_reward);
        let il = variant("il").unwrap();
        assert!(il.use_sim_reward && !il.use_ans_reward && il.teachers_in_group);
        assert_eq!(variant("ril-t1").unwrap().teachers, &[0]);
        assert_eq!(variant("ril-t2").unwrap().teachers, &[1]);
        assert!(variant("ril-frozen-d").unwrap().frozen_discriminator);
        let no_d = variant("ril-no-d").unwrap();
        assert!(!no_d.use_sim_reward && no_d.teachers_in_group);
        assert!(variant("ril-grpo-std").unwrap().std_normalized_advantage);
        assert!(variant("base").unwrap().base);
        let err = variant("ppo").unwrap_err().to_string();
        assert!(err.contains("ppo") && err.contains("ril-no-d"), "{err}");
    }

    #[test]
    fn d_is_pre_trained_once_per_teacher_set_for_the_variants_that_score_with_it() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            a: AblationArgs,
        }
        use clap::Parser as _;
        let args = Cli::parse_from(["ablation", "--out", "abl"]).a;
        let run = |key: &str| Path::new("abl/runs").join(format!("{key}-s1"));
        let d = |key: &str| pretrained_d_dir(&args, &variant(key).unwrap(), &run(key));
        let both = Some(PathBuf::from("abl/discriminators/reasoned+narrated"));
        for key in ["ril", "il", "ril-frozen-d", "ril-grpo-std"] {
            assert_eq!(d(key), both, "{key}");
        }
        assert_eq!(
            d("ril-t1"),
            Some(PathBuf::from("abl/discriminators/reasoned"))
        );
        assert_eq!(
            d("ril-t2"),
            Some(PathBuf::from("abl/discriminators/narrated"))
        );
        // Other teachers: the sets are named after them.
        let other = Cli::parse_from(["ablation", "--out", "abl", "--teachers", "terse,reasoned"]).a;
        assert_eq!(
            pretrained_d_dir(&other, &variant("ril").unwrap(), &run("ril")),
            Some(PathBuf::from("abl/discriminators/terse+reasoned"))
        );
        for key in ["base", "rl", "ril-no-d"] {
            assert_eq!(d(key), None, "{key}");
        }
        let none = Cli::parse_from(["ablation", "--pretrain-questions", "0"]).a;
        assert_eq!(
            pretrained_d_dir(&none, &variant("ril").unwrap(), &run("ril")),
            None
        );
    }

    #[test]
    fn the_ablation_refuses_teacher_lists_it_cannot_compare_naming_them() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            a: AblationArgs,
        }
        use clap::Parser as _;
        let check = |extra: &[&str]| {
            let mut argv = vec!["ablation"];
            argv.extend_from_slice(extra);
            check_args(&Cli::parse_from(argv).a)
        };
        check(&[]).unwrap();
        check(&["--teachers", "terse,narrated", "--student", "student"]).unwrap();
        let e = check(&["--teachers", "reasoned"]).unwrap_err().to_string();
        assert!(e.contains("two teachers") && e.contains("got 1"), "{e}");
        let e = check(&["--teachers", "reasoned,reasoned"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("both \"reasoned\""), "{e}");
        let e = check(&["--teachers", "reasoned,loud"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"loud\""), "{e}");
        let e = check(&["--student", "teacher-terse"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--student") && e.contains("student-reasoned"),
            "{e}"
        );
    }

    #[test]
    fn mean_and_sample_std() {
        let (m, s) = mean_std(&[0.5, 0.6, 0.7]);
        assert!((m - 0.6).abs() < 1e-12);
        assert!((s - 0.1).abs() < 1e-12);
        assert_eq!(mean_std(&[0.4]), (0.4, 0.0));
        assert!(mean_std(&[]).0.is_nan());
    }
}
