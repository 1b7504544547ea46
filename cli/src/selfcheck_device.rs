//! `ril model selfcheck --device cuda:0 --against cpu`: the same model (same weights, loaded from
//! one saved directory) on two devices, through the real code paths, compared: (a) the logits of
//! a batch of image questions, (b) the log-probs of sampled tokens as scored (`score.rs`), (c)
//! greedy tokens, (d) one Dr.GRPO step (`ril_learner::grpo::train_step`: loss, backward,
//! AdamW) and (e) one discriminator step (`DiscriminatorModel::train_step`). A table is printed,
//! `device-selfcheck.json` written, and a failed check makes the command fail. It is what the
//! prepared GPU run executes; `--device cpu --against cpu` must agree exactly (a unit test).
//!
//! Tolerances, and why:
//! - logits and log-probs: max |diff| <= 1e-3. f32 everywhere, but cuBLAS and candle's CUDA
//!   reductions sum in another order than the CPU kernels; over a few hundred-wide dot products
//!   that moves values in the 1e-6..1e-5 range, so 1e-3 leaves two orders of margin while a
//!   wrong kernel (a transposed weight, a missing mask) moves them by O(1).
//! - greedy tokens: identical (a random model's top-2 logits are not within 1e-5 of each other).
//! - weights after one step: |w_dev - w_ref| / |w_ref - w_0| (L2 over all weights: the gap
//!   between the two updates relative to the update itself) <= 1e-2. AdamW's first step moves
//!   every weight by about lr * sign(gradient), so a gradient component within rounding of zero
//!   may step the other way on the other device; the L2 ratio tolerates a few such elements
//!   (one in 10^5 weights gives ~5e-3) while any real error in the loss or the backward pass
//!   gives O(1).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use candle_core::{DType, Device};
use ril_discriminator::{DiscriminatorModel, DiscriminatorOptions, LabelledResponse};
use ril_learner::collective::SingleRank;
use ril_learner::grpo::{Group, GrpoConfig, Response, ResponseSource, train_step};
use ril_model::bundle::Bundle;
use ril_model::config::ModelSize;
use ril_model::generate::{
    DecodeMode, GenerateOptions, Generation, Prompt, SamplingParams, generate_with,
};
use ril_model::image::{ImageProcessor, ImageProcessorConfig};
use ril_model::optim::AdamW;
use ril_model::score::{ScoreRequest, score_tokens};
use ril_model::toy::{Example, colour_examples};
use ril_model::{Head, LlavaConfig, Vlm};
use serde::Serialize;

pub const LOGIT_TOLERANCE: f64 = 1e-3;
pub const STEP_TOLERANCE: f64 = 1e-2;

/// One comparison: what was measured (0 means identical) against its bound.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceCheck {
    pub name: &'static str,
    pub passed: bool,
    pub measured: f64,
    pub tolerance: f64,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeviceReport {
    pub device: String,
    pub against: String,
    pub parameters: usize,
    pub checks: Vec<DeviceCheck>,
}

impl DeviceReport {
    pub fn failed(&self) -> usize {
        self.checks.iter().filter(|c| !c.passed).count()
    }
}

fn check(name: &'static str, measured: f64, tolerance: f64, detail: String) -> DeviceCheck {
    DeviceCheck {
        name,
        passed: measured.is_finite() && measured <= tolerance,
        measured,
        tolerance,
        detail,
    }
}

/// The model, its image questions and a reference model, loaded on one device.
struct Side {
    bundle: Bundle,
    reference: Vlm,
    examples: Vec<Example>,
    prompts: Vec<Prompt>,
}

impl Side {
    fn load(dirs: &ModelDirs, cfg: &LlavaConfig, device: &Device) -> anyhow::Result<Self> {
        let load = |dir: &Path| {
            Bundle::load(dir, Head::LanguageModel, device, DType::F32)
                .with_context(|| format!("loading {} onto {device:?}", dir.display()))
        };
        let bundle = load(&dirs.policy)?;
        let reference = load(&dirs.reference)?.model;
        let examples = colour_examples(&bundle.tokenizer, cfg, device)?;
        let prompts = examples.iter().map(Example::prompt).collect();
        Ok(Self {
            bundle,
            reference,
            examples,
            prompts,
        })
    }
}

/// The saved models both sides load: a policy, a GRPO reference and a discriminator (all
/// random, drawn on the CPU so both devices start from the very same bits).
struct ModelDirs {
    policy: std::path::PathBuf,
    reference: std::path::PathBuf,
    discriminator: std::path::PathBuf,
}

fn save_models(size: ModelSize, seed: u64, out: &Path) -> anyhow::Result<(ModelDirs, LlavaConfig)> {
    let tokenizer = ril_model::tokenizer::byte_level_chatml()?;
    let image_id = tokenizer
        .token_id("<image>")
        .context("built-in tokenizer has no <image>")?;
    let cfg = LlavaConfig::sized(tokenizer.vocab_size(), image_id, size);
    let processor = ImageProcessor::new(ImageProcessorConfig::clip(
        cfg.vision_config.image_size as u32,
    ))?;
    let dirs = ModelDirs {
        policy: out.join("policy"),
        reference: out.join("reference"),
        discriminator: out.join("discriminator"),
    };
    for (dir, seed) in [(&dirs.policy, seed), (&dirs.reference, seed + 1)] {
        Bundle {
            model: Vlm::new_random(&cfg, Head::LanguageModel, &Device::Cpu, DType::F32, seed)?,
            tokenizer: tokenizer.clone(),
            processor: processor.clone(),
        }
        .save(dir)?;
    }
    // D's scalar head is drawn here, once; both sides then keep it (a discriminator directory).
    DiscriminatorModel::from_init(&DiscriminatorOptions::for_test(&dirs.policy), &Device::Cpu)?
        .write_checkpoint_files(&dirs.discriminator)?;
    Ok((dirs, cfg))
}

fn max_abs_diff<'a>(
    a: impl IntoIterator<Item = &'a f32>,
    b: impl IntoIterator<Item = &'a f32>,
) -> f64 {
    a.into_iter()
        .zip(b)
        .map(|(x, y)| f64::from((x - y).abs()))
        .fold(0.0, f64::max)
}

/// (a) and (c): greedy generation with the logits recorded, on both sides.
fn compare_greedy(
    dev: &Side,
    reference: &Side,
    checks: &mut Vec<DeviceCheck>,
) -> anyhow::Result<()> {
    let run = |side: &Side| -> anyhow::Result<Vec<Generation>> {
        let mut params = SamplingParams::greedy(8);
        params.suppress_token_ids = vec![side.bundle.model.config().image_token_index];
        let opts = GenerateOptions {
            mode: DecodeMode::KvCache,
            record_logits: true,
            ..Default::default()
        };
        Ok(generate_with(
            &side.bundle.model,
            &side.prompts,
            &params,
            opts,
        )?)
    };
    let (a, b) = (run(dev)?, run(reference)?);
    let logits = |g: &[Generation]| -> Vec<f32> {
        g.iter()
            .flat_map(|g| g.step_logits.iter().flatten().flatten().copied())
            .collect()
    };
    let (la, lb) = (logits(&a), logits(&b));
    let same_len = la.len() == lb.len();
    checks.push(check(
        "logits (image batch)",
        if same_len {
            max_abs_diff(&la, &lb)
        } else {
            f64::INFINITY
        },
        LOGIT_TOLERANCE,
        format!(
            "{} prompts, {} logits compared (max abs diff)",
            a.len(),
            la.len()
        ),
    ));
    let differing = a
        .iter()
        .zip(&b)
        .filter(|(x, y)| x.token_ids != y.token_ids)
        .count();
    checks.push(check(
        "greedy tokens",
        differing as f64,
        0.0,
        format!("{differing} of {} generations differ", a.len()),
    ));
    Ok(())
}

/// (b): tokens sampled on the reference side, scored on both. Returns them with the reference
/// side's log-probs (the GRPO step's behaviour log-probs).
fn compare_scores(
    dev: &Side,
    reference: &Side,
    seed: u64,
    checks: &mut Vec<DeviceCheck>,
) -> anyhow::Result<Vec<(Vec<u32>, Vec<f32>)>> {
    let params = SamplingParams::paper(8, seed);
    let sampled = ril_model::generate(&reference.bundle.model, &reference.prompts, &params)?;
    let score = |side: &Side| -> anyhow::Result<Vec<Vec<f32>>> {
        let requests: Vec<ScoreRequest<'_>> = side
            .prompts
            .iter()
            .zip(&sampled)
            .map(|(p, g)| ScoreRequest {
                prompt_ids: &p.token_ids,
                response_ids: &g.token_ids,
                pixel_values: p.pixel_values.as_ref(),
            })
            .collect();
        Ok(score_tokens(&side.bundle.model, &requests, params.temperature)?.logprobs_vec()?)
    };
    let (a, b) = (score(dev)?, score(reference)?);
    checks.push(check(
        "sampled tokens' log-probs",
        max_abs_diff(a.iter().flatten(), b.iter().flatten()),
        LOGIT_TOLERANCE,
        format!("{} tokens scored", b.iter().map(Vec::len).sum::<usize>()),
    ));
    Ok(sampled.into_iter().map(|g| g.token_ids).zip(b).collect())
}

/// All weights of `model`, on the host.
fn weights(model: &Vlm) -> anyhow::Result<BTreeMap<String, Vec<f32>>> {
    model
        .named_vars()
        .into_iter()
        .map(|(name, v)| {
            let values = v
                .as_tensor()
                .flatten_all()?
                .to_dtype(DType::F32)?
                .to_vec1()?;
            Ok((name, values))
        })
        .collect()
}

/// |after_dev - after_ref| / |after_ref - before| over all weights (L2); and the size of the
/// update, so that a step that moved nothing is not taken for agreement.
fn update_gap(
    before: &BTreeMap<String, Vec<f32>>,
    after_dev: &BTreeMap<String, Vec<f32>>,
    after_ref: &BTreeMap<String, Vec<f32>>,
) -> anyhow::Result<(f64, f64)> {
    let (mut gap, mut moved) = (0.0f64, 0.0f64);
    for (name, w0) in before {
        let (a, b) = match (after_dev.get(name), after_ref.get(name)) {
            (Some(a), Some(b)) if a.len() == w0.len() && b.len() == w0.len() => (a, b),
            _ => anyhow::bail!("weight {name}: missing or reshaped after the step"),
        };
        for ((x0, xa), xb) in w0.iter().zip(a).zip(b) {
            gap += f64::from(xa - xb).powi(2);
            moved += f64::from(xb - x0).powi(2);
        }
    }
    Ok((
        gap.sqrt() / moved.sqrt().max(f64::MIN_POSITIVE),
        moved.sqrt(),
    ))
}

fn step_check(name: &'static str, gap: f64, moved: f64, losses: (f64, f64)) -> DeviceCheck {
    let mut c = check(
        name,
        gap,
        STEP_TOLERANCE,
        format!(
            "update size {moved:.3e}; loss {:.6} vs {:.6}",
            losses.0, losses.1
        ),
    );
    // A step that changed nothing proves nothing.
    c.passed &= moved > 0.0;
    c
}

/// The GRPO groups of one side: per question, the sampled student response (with the reference
/// side's log-probs as behaviour log-probs) and the example's answer as a teacher response.
fn groups(side: &Side, sampled: &[(Vec<u32>, Vec<f32>)]) -> Vec<Group> {
    let response = |source, token_ids: &[u32], behaviour: &[f32], reward: f32| Response {
        source,
        token_ids: token_ids.to_vec(),
        behaviour_logprobs: behaviour.to_vec(),
        policy_version: 0,
        d_prob: 0.5,
        r_sim: reward,
        r_ans: reward,
        text: String::new(),
    };
    side.examples
        .iter()
        .zip(sampled)
        .enumerate()
        .map(|(i, (e, (ids, lps)))| Group {
            position: i as u64,
            prompt_ids: e.prompt_ids.clone(),
            pixel_values: Some(e.pixel_values.clone()),
            responses: vec![
                response(ResponseSource::Student, ids, lps, (i % 2) as f32),
                response(ResponseSource::Teacher, &e.answer_ids, &[], 1.0),
            ],
        })
        .collect()
}

/// (d): one Dr.GRPO step on each side from the same weights and groups.
fn compare_grpo_step(
    dev: &Side,
    reference: &Side,
    sampled: &[(Vec<u32>, Vec<f32>)],
    checks: &mut Vec<DeviceCheck>,
) -> anyhow::Result<()> {
    let before = weights(&reference.bundle.model)?;
    let cfg = GrpoConfig::default();
    let step = |side: &Side| -> anyhow::Result<f64> {
        let mut optimizer = AdamW::new(side.bundle.model.trainable_vars(), cfg.adamw())?;
        let groups = groups(side, sampled);
        let stats = train_step(
            &side.bundle.model,
            &side.reference,
            &mut optimizer,
            &groups,
            &cfg,
            &SingleRank,
        )?;
        Ok(stats.loss)
    };
    let losses = (step(dev)?, step(reference)?);
    let after = (
        weights(&dev.bundle.model)?,
        weights(&reference.bundle.model)?,
    );
    let (gap, moved) = update_gap(&before, &after.0, &after.1)?;
    checks.push(step_check("Dr.GRPO step", gap, moved, losses));
    Ok(())
}

/// (e): one discriminator step on each side from the same saved D and the same answers.
fn compare_discriminator_step(
    device: &Device,
    against: &Device,
    dirs: &ModelDirs,
    out: &Path,
    checks: &mut Vec<DeviceCheck>,
) -> anyhow::Result<()> {
    let options = DiscriminatorOptions::for_test(&dirs.discriminator);
    let load = |d: &Device| -> anyhow::Result<DiscriminatorModel> {
        Ok(DiscriminatorModel::from_init(&options, d)?)
    };
    let (mut on_dev, mut on_ref) = (load(device)?, load(against)?);
    let before = weights(&on_ref.bundle().model)?;
    let items = discriminator_items(out)?;
    let losses = (
        f64::from(on_dev.train_step(&items, None)?.loss),
        f64::from(on_ref.train_step(&items, None)?.loss),
    );
    let (gap, moved) = update_gap(
        &before,
        &weights(&on_dev.bundle().model)?,
        &weights(&on_ref.bundle().model)?,
    )?;
    checks.push(step_check("discriminator step", gap, moved, losses));
    Ok(())
}

/// Two image questions (PNGs written under `out`, rows read by the dataset loader), each with a
/// terse (student) and a fuller (teacher) answer.
fn discriminator_items(out: &Path) -> anyhow::Result<Vec<LabelledResponse>> {
    let mut items = Vec::new();
    for (i, (colour, rgb)) in [("red", [220, 30, 30]), ("blue", [30, 40, 220])]
        .into_iter()
        .enumerate()
    {
        let image = out.join(format!("{colour}.png"));
        let png = ril_model::toy::square_png(16, 16, [255, 255, 255], Some(rgb))?;
        std::fs::write(&image, png).with_context(|| format!("writing {}", image.display()))?;
        let line = serde_json::json!({
            "id": format!("colour-{colour}"),
            "question": "What colour is the object?",
            "images": [format!("{colour}.png")],
            "answer": colour,
        });
        let questions = out.join("questions.jsonl");
        let row = ril_data::dataset::parse_row(&line.to_string(), &questions, i + 1, out)?;
        let row = Arc::new(row);
        for (response, from_student) in [
            (format!("Answer: {colour}"), true),
            (format!("The object is {colour}. Answer: {colour}"), false),
        ] {
            items.push(LabelledResponse {
                question: row.clone(),
                response,
                from_student,
            });
        }
    }
    Ok(items)
}

/// Runs every comparison of `device` against `against`, the models saved under `out`.
pub fn compare(
    device: &Device,
    against: &Device,
    size: ModelSize,
    seed: u64,
    out: &Path,
) -> anyhow::Result<DeviceReport> {
    let (dirs, cfg) = save_models(size, seed, out)?;
    let dev = Side::load(&dirs, &cfg, device)?;
    let reference = Side::load(&dirs, &cfg, against)?;
    let mut checks = Vec::new();
    compare_greedy(&dev, &reference, &mut checks)?;
    let sampled = compare_scores(&dev, &reference, seed, &mut checks)?;
    compare_grpo_step(&dev, &reference, &sampled, &mut checks)?;
    compare_discriminator_step(device, against, &dirs, out, &mut checks)?;
    Ok(DeviceReport {
        device: label(device),
        against: label(against),
        parameters: dev.bundle.model.parameter_counts().0,
        checks,
    })
}

/// `cpu`, `cuda:N`, as `--device` spells it.
fn label(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        other => format!("{other:?}"),
    }
}

fn print_report(report: &DeviceReport, json_path: &Path) {
    println!(
        "ril model selfcheck: {} against {} ({} parameters)",
        report.device, report.against, report.parameters
    );
    println!("| check | result | measured | tolerance | detail |");
    println!("|---|---|---:|---:|---|");
    for c in &report.checks {
        println!(
            "| {} | {} | {:.3e} | {:.0e} | {} |",
            c.name,
            if c.passed { "PASS" } else { "FAIL" },
            c.measured,
            c.tolerance,
            c.detail
        );
    }
    println!("report: {}", json_path.display());
}

/// `ril model selfcheck --device D --against R`.
pub fn run(args: &crate::selfcheck::SelfcheckArgs, against: &str) -> anyhow::Result<()> {
    let device = crate::device::parse(&args.device)?;
    let against_device =
        crate::device::parse(against).with_context(|| format!("--against {against:?}"))?;
    let out = crate::selfcheck::out_dir(args)?;
    let report = compare(&device, &against_device, args.size, args.seed, &out)?;
    let json_path = out.join("device-selfcheck.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", json_path.display()))?;
    print_report(&report, &json_path);
    let failed = report.failed();
    anyhow::ensure!(
        failed == 0,
        "{failed} device check(s) failed ({} against {against}); see {}",
        args.device,
        json_path.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The comparison code on CPU against CPU: every path runs and agrees exactly.
    #[test]
    fn cpu_against_cpu_agrees_exactly() -> anyhow::Result<()> {
        let tmp = tempfile::tempdir()?;
        let report = compare(&Device::Cpu, &Device::Cpu, ModelSize::Test, 0, tmp.path())?;
        assert_eq!(report.checks.len(), 5, "{report:#?}");
        for c in &report.checks {
            assert!(c.passed, "{c:?}");
            assert_eq!(c.measured, 0.0, "{c:?}");
        }
        Ok(())
    }

    /// A step that moves nothing, or weights that differ, fail.
    #[test]
    fn a_step_that_moves_nothing_or_differs_fails() -> anyhow::Result<()> {
        let before: BTreeMap<String, Vec<f32>> = [("w".to_string(), vec![1.0, 2.0])].into();
        let (gap, moved) = update_gap(&before, &before, &before)?;
        assert!(!step_check("s", gap, moved, (0.0, 0.0)).passed);
        let moved_ref: BTreeMap<String, Vec<f32>> = [("w".to_string(), vec![1.1, 2.0])].into();
        let moved_dev: BTreeMap<String, Vec<f32>> = [("w".to_string(), vec![0.9, 2.0])].into();
        let (gap, moved) = update_gap(&before, &moved_dev, &moved_ref)?;
        assert!((gap - 2.0).abs() < 1e-5, "{gap}");
        assert!(!step_check("s", gap, moved, (0.0, 0.0)).passed);
        Ok(())
    }
}
