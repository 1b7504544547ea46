//! `ril experiment ablation`: the paper's comparison in miniature. Every variant runs with the
//! same budget of iterations on the same data, once per seed, through the real local cluster
//! (`ril train`'s processes); each final policy is evaluated greedily on a held-out split. The
//! result is a markdown table (mean ± std of accuracy per variant, next to the paper's numbers
//! for reference), the same as JSON, and a bar plot.
//!
//! Runs are resumable: a variant × seed whose `result.json` exists is not run again, so an
//! interrupted ablation continues where it stopped (delete the directory for a fresh one).

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::error::{OrchestrateError, Result};
use crate::ril::RilBinary;
use crate::runs::{
    Metrics, PretrainSettings, RunSpec, TEACHER_MAX_NEW_TOKENS, absolute, eval_accuracy,
    first_last, pretrain_discriminator, run_local, student_dir, synth_benchmark, teacher_dir,
    write_json,
};

/// Everything `ril experiment ablation` takes (its flags, documented there).
#[derive(Debug, Clone)]
pub struct AblationOptions {
    /// Where the runs, the table (`ablation.md`, `ablation.json`) and the plot go.
    pub out: PathBuf,
    /// The built-in models' directory.
    pub models: PathBuf,
    pub student: String,
    /// Teacher 1 and teacher 2, by their built-in names.
    pub teachers: Vec<String>,
    pub max_new_tokens: u32,
    /// A dataset directory; `None`: the demo's `shapes` benchmark, written under `out`.
    pub data: Option<PathBuf>,
    /// The split the final policies are evaluated on.
    pub split: String,
    pub eval_rows: usize,
    /// Seeds per variant (0, 1, ..., N-1).
    pub seeds: u64,
    pub iterations: u64,
    pub questions_per_iteration: u64,
    pub group_size: u32,
    pub actors: u32,
    pub lr: f64,
    /// D's pre-training: one pre-trained D per teacher set, shared by its variants and seeds.
    pub pretrain: PretrainSettings,
    /// A subset of the variants by key (empty: all).
    pub variants: Vec<String>,
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

pub fn variant(key: &str) -> Result<Variant> {
    VARIANTS
        .iter()
        .copied()
        .find(|v| v.key == key)
        .ok_or_else(|| {
            let known: Vec<&str> = VARIANTS.iter().map(|v| v.key).collect();
            OrchestrateError::InvalidOption(format!(
                "unknown variant {key:?}; the variants are {}",
                known.join(", ")
            ))
        })
}

/// The run of `variant` with `seed` (everything else from `options`).
pub fn spec(
    options: &AblationOptions,
    v: &Variant,
    seed: u64,
    dir: &Path,
    data: &Path,
    models: &Path,
) -> Result<RunSpec> {
    let teachers = v
        .teachers
        .iter()
        .map(|&i| {
            let name = options.teachers.get(i).ok_or_else(|| {
                OrchestrateError::InvalidOption(format!(
                    "--teachers: {} needs teacher {}",
                    v.label,
                    i + 1
                ))
            })?;
            Ok((name.clone(), teacher_dir(name)?.to_string()))
        })
        .collect::<Result<_>>()?;
    Ok(RunSpec {
        id: format!("ablation-{}-s{seed}", v.key),
        dir: dir.join("run"),
        seed,
        iterations: options.iterations,
        questions_per_iteration: options.questions_per_iteration,
        group_size: options.group_size,
        actors: options.actors,
        lr: options.lr,
        data: data.to_path_buf(),
        models: models.to_path_buf(),
        student: options.student.clone(),
        teachers,
        use_ans_reward: v.use_ans_reward,
        use_sim_reward: v.use_sim_reward,
        teachers_in_group: v.teachers_in_group,
        std_normalized_advantage: v.std_normalized_advantage,
        frozen_discriminator: v.frozen_discriminator,
        discriminator_init: None,
        save_every: 0,
        max_new_tokens: options.max_new_tokens,
        teacher_max_new_tokens: TEACHER_MAX_NEW_TOKENS,
        // The ablation runs on the CPU, as its recorded results did.
        device: None,
    })
}

/// The variant's teachers by name, e.g. `reasoned+narrated` (none for the base, which runs
/// nothing).
fn teacher_set(options: &AblationOptions, v: &Variant) -> String {
    if v.base {
        return String::new();
    }
    v.teachers
        .iter()
        .filter_map(|&i| options.teachers.get(i).map(String::as_str))
        .collect::<Vec<_>>()
        .join("+")
}

/// What the ablation needs of its options that their types cannot say: two distinct known
/// teachers, a known student, positive counts.
pub fn check_options(options: &AblationOptions) -> Result<()> {
    let bad = |m: String| Err(OrchestrateError::InvalidOption(m));
    if options.seeds == 0 || options.iterations == 0 || options.eval_rows == 0 {
        return bad("--seeds, --iterations and --eval-rows must be positive".into());
    }
    student_dir(&options.student)?;
    if options.teachers.len() != 2 {
        return bad(format!(
            "--teachers: the ablation compares two teachers (teacher 1, teacher 2), got {}: {:?}",
            options.teachers.len(),
            options.teachers
        ));
    }
    if options.teachers[0] == options.teachers[1] {
        return bad(format!(
            "--teachers: teacher 1 and teacher 2 are both {:?}",
            options.teachers[0]
        ));
    }
    for name in &options.teachers {
        teacher_dir(name)?;
    }
    Ok(())
}

/// Where the variant's pre-trained discriminator lives (`<out>/discriminators/<teachers>`,
/// next to `runs/`; `run_dir` is `<out>/runs/<variant>-s<seed>`), or `None` when it needs none:
/// the base, variants without the similarity reward, and no pre-training questions.
pub fn pretrained_d_dir(options: &AblationOptions, v: &Variant, run_dir: &Path) -> Option<PathBuf> {
    if v.base || !v.use_sim_reward || options.pretrain.questions == 0 {
        return None;
    }
    let out = run_dir.parent()?.parent()?;
    Some(out.join("discriminators").join(teacher_set(options, v)))
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

/// The variant's pre-trained D, made on first use: written aside and published whole, so an
/// interrupted pre-training is redone.
fn pretrained_discriminator(
    ril: &RilBinary,
    options: &AblationOptions,
    v: &Variant,
    cfg: &ril_config::RunConfig,
    data: &Path,
    d_dir: &Path,
) -> Result<()> {
    if d_dir.is_dir() {
        return Ok(());
    }
    let tmp = d_dir.with_extension("partial");
    let _ = std::fs::remove_dir_all(&tmp);
    println!(
        "    pre-training the discriminator against {} ({} questions, {} steps)",
        teacher_set(options, v),
        options.pretrain.questions,
        options.pretrain.steps
    );
    pretrain_discriminator(ril, cfg, data, &tmp, options.pretrain)?;
    Ok(ril_common::fs::publish_dir(&tmp, d_dir)?)
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

/// A variant's accuracies over seeds and the runs' results.
type Row = (Variant, Vec<f64>, Vec<serde_json::Value>);

/// The markdown table: one row per variant with its accuracy over seeds.
pub fn table(options: &AblationOptions, rows: &[Row]) -> String {
    let mut md = format!(
        "| variant | held-out accuracy ({} {} questions, greedy), mean ± std | seeds | r_ans student (end) | r_sim student (end) | D accuracy (end) | KL (end) | paper (reference) |\n|---|---:|---:|---:|---:|---:|---:|---|\n",
        options.eval_rows, options.split
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

/// The variants `options` names, in the order given (all, in the table's order, by default).
fn chosen_variants(options: &AblationOptions) -> Result<Vec<Variant>> {
    if options.variants.is_empty() {
        return Ok(VARIANTS.to_vec());
    }
    options.variants.iter().map(|k| variant(k.trim())).collect()
}

/// The dataset every run trains and is evaluated on (absolute).
fn dataset(ril: &RilBinary, options: &AblationOptions, out: &Path) -> Result<PathBuf> {
    if let Some(d) = &options.data {
        return absolute(d);
    }
    let d = out.join("data");
    if !d.join("train.jsonl").is_file() {
        synth_benchmark(ril, &d)?;
    }
    Ok(d)
}

/// Where the ablation runs and what it runs on, shared by every variant × seed.
struct Plan<'a> {
    ril: &'a RilBinary,
    options: &'a AblationOptions,
    out: PathBuf,
    data: PathBuf,
    models: PathBuf,
    started: Instant,
    total: u64,
    done: u64,
}

impl Plan<'_> {
    /// A variant's RIL run (its own D pre-trained first when it needs one): the final policy
    /// and the run's end-of-run metrics.
    fn train_variant(
        &self,
        v: &Variant,
        seed: u64,
        dir: &Path,
    ) -> Result<(PathBuf, serde_json::Value)> {
        let (ril, options) = (self.ril, self.options);
        let mut spec = spec(options, v, seed, dir, &self.data, &self.models)?;
        let config = dir.join("run.toml");
        let mut cfg = spec.write_config(&config)?;
        let _ = std::fs::remove_dir_all(&cfg.run.dir);
        if let Some(d_dir) = pretrained_d_dir(options, v, dir) {
            pretrained_discriminator(ril, options, v, &cfg, &self.data, &d_dir)?;
            spec.discriminator_init = Some(d_dir);
            cfg = spec.write_config(&config)?;
        }
        let outcome = run_local(ril, &cfg)?;
        let metrics_file = (outcome.learner_dir).join(ril_learner::metrics_log::METRICS_FILE);
        let metrics = ril_plot::read_metrics(&metrics_file)?;
        let version = outcome.status.policy_version;
        let policy = ril_learner::trainer::checkpoint_dir(&outcome.learner_dir, version);
        Ok((policy, end_of_run(&metrics)))
    }

    /// One variant × seed: its run (unless it is the base) and the held-out accuracy of its
    /// final policy. Written to `dir/result.json`, which marks it done.
    fn run_one(&self, v: &Variant, seed: u64, dir: &Path) -> Result<serde_json::Value> {
        let options = self.options;
        let started = Instant::now();
        std::fs::create_dir_all(dir)
            .map_err(OrchestrateError::io(format!("creating {}", dir.display())))?;
        let (model, metrics) = if v.base {
            (self.models.join(&options.student), serde_json::Value::Null)
        } else {
            self.train_variant(v, seed, dir)?
        };
        let accuracy = eval_accuracy(
            self.ril,
            &model,
            &self.data,
            (&options.split, options.eval_rows, options.max_new_tokens),
            "cpu",
            &dir.join("eval.json"),
        )?;
        let result = serde_json::json!({
            "variant": v.key,
            "label": v.label,
            "seed": seed,
            "split": options.split,
            "eval_rows": options.eval_rows,
            "student": options.student,
            "teachers": teacher_set(options, v),
            "iterations": if v.base { 0 } else { options.iterations },
            "accuracy": accuracy,
            "final_metrics": metrics,
            "seconds": started.elapsed().as_secs_f64(),
        });
        write_json(&dir.join("result.json"), &result)?;
        Ok(result)
    }

    /// A result of an earlier invocation, reused only for the same split, student and teachers.
    fn earlier_result(&self, v: &Variant, path: &Path) -> Option<serde_json::Value> {
        let r: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
        let same = r["split"] == self.options.split.as_str()
            && r["student"] == self.options.student.as_str()
            && r["teachers"] == teacher_set(self.options, v).as_str();
        same.then_some(r)
    }

    /// Every seed of `v` (one for the base, evaluated greedily: one evaluation is every
    /// seed's), run or found done.
    fn variant_row(&mut self, v: &Variant) -> Result<Row> {
        let (mut accs, mut results) = (Vec::new(), Vec::new());
        let seeds = if v.base { 1 } else { self.options.seeds };
        for seed in 0..seeds {
            self.done += 1;
            let (done, total) = (self.done, self.total);
            let dir = self.out.join("runs").join(format!("{}-s{seed}", v.key));
            let result_path = dir.join("result.json");
            let result = match self.earlier_result(v, &result_path) {
                Some(r) => {
                    println!("[{done}/{total}] {} seed {seed}: done earlier", v.label);
                    r
                }
                None => {
                    let elapsed = self.started.elapsed().as_secs_f64();
                    println!(
                        "[{done}/{total}] {} seed {seed} ({elapsed:.0} s elapsed)",
                        v.label
                    );
                    self.run_one(v, seed, &dir)
                        .map_err(|e| OrchestrateError::Variant {
                            variant: v.key,
                            seed,
                            error: Box::new(e),
                        })?
                }
            };
            let acc = result["accuracy"]
                .as_f64()
                .ok_or(OrchestrateError::NoAccuracy { path: result_path })?;
            println!("    accuracy {:.1} %", 100.0 * acc);
            accs.push(acc);
            results.push(result);
        }
        Ok((*v, accs, results))
    }
}

/// `ablation.md` (a header and the table), `ablation.json` and `ablation.png`; the header and
/// table, as printed.
fn write_results(options: &AblationOptions, out: &Path, rows: &[Row]) -> Result<String> {
    let header = format!(
        "# Ablation: {}, teacher 1 = {}, teacher 2 = {}; {} iterations per run, B = {}, G = {}, lr {:e}, {} seed(s), {} split\n\n",
        options.student,
        options.teachers[0],
        options.teachers[1],
        options.iterations,
        options.questions_per_iteration,
        options.group_size,
        options.lr,
        options.seeds,
        options.split
    );
    let md = format!("{header}{}", table(options, rows));
    ril_common::fs::write_atomic(&out.join("ablation.md"), md.as_bytes())?;
    let json: Vec<serde_json::Value> = rows
        .iter()
        .map(|(v, accs, results)| {
            let (mean, std) = mean_std(accs);
            serde_json::json!({"variant": v.key, "label": v.label, "accuracy": accs, "mean": mean, "std": std, "runs": results})
        })
        .collect();
    write_json(&out.join("ablation.json"), &json.into())?;
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
            options.split
        ),
        "accuracy (%)",
        &bars,
        Some(&reference),
        &out.join("ablation.png"),
    )?;
    Ok(md)
}

pub fn ablation(ril: &RilBinary, options: &AblationOptions) -> Result<()> {
    check_options(options)?;
    let chosen = chosen_variants(options)?;
    std::fs::create_dir_all(&options.out).map_err(OrchestrateError::io(format!(
        "creating {}",
        options.out.display()
    )))?;
    let out = absolute(&options.out)?;
    let mut plan = Plan {
        ril,
        options,
        data: dataset(ril, options, &out)?,
        models: absolute(&options.models)?,
        out,
        started: Instant::now(),
        total: (chosen.iter())
            .map(|v| if v.base { 1 } else { options.seeds })
            .sum(),
        done: 0,
    };
    let rows = (chosen.iter())
        .map(|v| plan.variant_row(v))
        .collect::<Result<Vec<_>>>()?;
    let md = write_results(options, &plan.out, &rows)?;
    println!("{md}");
    println!(
        "ablation finished in {:.0} s: {}",
        plan.started.elapsed().as_secs_f64(),
        plan.out.join("ablation.md").display()
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
    fn mean_and_sample_std() {
        let (m, s) = mean_std(&[0.5, 0.6, 0.7]);
        assert!((m - 0.6).abs() < 1e-12);
        assert!((s - 0.1).abs() < 1e-12);
        assert_eq!(mean_std(&[0.4]), (0.4, 0.0));
        assert!(mean_std(&[]).0.is_nan());
    }
}
