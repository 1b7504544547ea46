//! `ril model selfcheck`: the model's whole life on this machine in under a minute, with every
//! check's measured value printed and written to `selfcheck.json`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use candle_core::{DType, Device};
use ril_model::bundle::Bundle;
use ril_model::config::ModelSize;
use ril_model::generate::{
    DecodeMode, GenerateOptions, Generation, Prompt, SamplingParams, generate_with,
};
use ril_model::image::{ImageProcessor, ImageProcessorConfig};
use ril_model::optim::{AdamW, AdamWConfig, Gradients};
use ril_model::score::{ScoreRequest, score_tokens};
use ril_model::toy::{Example, colour_examples, sft_loss};
use ril_model::{Head, LlavaConfig, Vlm};
use serde::Serialize;

#[derive(Debug, clap::Args)]
pub struct SelfcheckArgs {
    /// Where the model directories and `selfcheck.json` go (default: a new directory under ./runs).
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Model size: `test` (~0.15M parameters) or `tiny` (~4M).
    #[arg(long, default_value = "test")]
    pub size: ModelSize,
    /// Fine-tuning steps at most (stops early once the loss is below 0.01).
    #[arg(long, default_value_t = 300)]
    pub max_steps: usize,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Compare `--device` against this device instead (e.g. `--device cuda:0 --against cpu`):
    /// the same weights on both, logits, scored log-probs, greedy tokens, one Dr.GRPO step and
    /// one discriminator step; writes `device-selfcheck.json`.
    #[arg(long)]
    pub against: Option<String>,
}

#[derive(Debug, Serialize)]
struct Check {
    name: &'static str,
    passed: bool,
    measured: String,
    requirement: &'static str,
}

#[derive(Debug, Serialize)]
struct Report {
    parameters: usize,
    trainable_parameters: usize,
    checks: Vec<Check>,
    fine_tune_steps: usize,
    fine_tune_seconds: f64,
    loss_before: f32,
    loss_after: f32,
    answers: Vec<(String, String)>,
    out_dir: PathBuf,
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Where the model directories and `selfcheck.json` go.
pub(crate) fn out_dir(args: &SelfcheckArgs) -> anyhow::Result<PathBuf> {
    let out = match &args.out {
        Some(p) => p.clone(),
        None => PathBuf::from("runs").join(format!(
            "selfcheck-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs()
        )),
    };
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    Ok(out)
}

/// Check 1: a fresh model directory, written and read back through the real loaders.
fn fresh_model(
    args: &SelfcheckArgs,
    device: &Device,
    out: &Path,
    checks: &mut Vec<Check>,
) -> anyhow::Result<(Bundle, LlavaConfig)> {
    let tokenizer = ril_model::tokenizer::byte_level_chatml()?;
    let image_id = tokenizer
        .token_id("<image>")
        .context("built-in tokenizer has no <image>")?;
    let cfg = LlavaConfig::sized(tokenizer.vocab_size(), image_id, args.size);
    let model = Vlm::new_random(&cfg, Head::LanguageModel, device, DType::F32, args.seed)?;
    let (n_params, n_trainable) = model.parameter_counts();
    tracing::info!(
        parameters = n_params,
        trainable = n_trainable,
        "built a random model"
    );
    let processor = ImageProcessor::new(ImageProcessorConfig::clip(
        cfg.vision_config.image_size as u32,
    ))?;
    let initial_dir = out.join("initial");
    Bundle {
        model,
        tokenizer,
        processor,
    }
    .save(&initial_dir)?;
    let bundle = Bundle::load(&initial_dir, Head::LanguageModel, device, DType::F32)
        .with_context(|| format!("reloading {}", initial_dir.display()))?;
    checks.push(Check {
        name: "checkpoint round trip",
        passed: true,
        measured: format!(
            "{} tensors reloaded from {}",
            bundle.model.named_vars().len(),
            initial_dir.display()
        ),
        requirement: "config.json + model.safetensors + tokenizer + preprocessor reload strictly",
    });
    Ok((bundle, cfg))
}

/// Check 2: KV cache against full recomputation. The cached generations.
fn check_kv_cache(
    model: &Vlm,
    prompts: &[Prompt],
    params: &SamplingParams,
    checks: &mut Vec<Check>,
) -> anyhow::Result<Vec<Generation>> {
    let opts = |mode| GenerateOptions {
        mode,
        record_logits: true,
        ..Default::default()
    };
    let cached = generate_with(model, prompts, params, opts(DecodeMode::KvCache))?;
    let full = generate_with(model, prompts, params, opts(DecodeMode::Recompute))?;
    let mut worst = 0f32;
    let mut same_tokens = true;
    for (c, f) in cached.iter().zip(&full) {
        same_tokens &= c.token_ids == f.token_ids;
        for (a, b) in c
            .step_logits
            .iter()
            .flatten()
            .zip(f.step_logits.iter().flatten())
        {
            worst = worst.max(max_diff(a, b));
        }
    }
    checks.push(Check {
        name: "KV cache = recomputation",
        passed: same_tokens && worst <= 1e-4,
        measured: format!("max |logit diff| {worst:.2e}, same tokens: {same_tokens}"),
        requirement: "<= 1e-4",
    });
    Ok(cached)
}

/// Check 3: sampled log-probs against teacher-forced scoring.
fn check_logprobs(
    model: &Vlm,
    prompts: &[Prompt],
    sampled: &[Generation],
    temperature: f64,
    checks: &mut Vec<Check>,
) -> anyhow::Result<()> {
    let requests: Vec<ScoreRequest<'_>> = prompts
        .iter()
        .zip(sampled)
        .map(|(p, g)| ScoreRequest {
            prompt_ids: &p.token_ids,
            response_ids: &g.token_ids,
            pixel_values: p.pixel_values.as_ref(),
        })
        .collect();
    let scored = score_tokens(model, &requests, temperature)?.logprobs_vec()?;
    let lp_diff = sampled
        .iter()
        .zip(&scored)
        .map(|(g, s)| max_diff(&g.logprobs, s))
        .fold(0.0, f32::max);
    checks.push(Check {
        name: "sampled = scored log-probs",
        passed: lp_diff <= 1e-4,
        measured: format!("max diff {lp_diff:.2e}"),
        requirement: "<= 1e-4",
    });
    Ok(())
}

/// Check 4: every trainable tensor receives a gradient. The loss before fine-tuning.
fn check_gradients(
    model: &Vlm,
    examples: &[Example],
    checks: &mut Vec<Check>,
) -> anyhow::Result<f32> {
    let trainable = model.trainable_vars();
    let loss = sft_loss(model, examples)?;
    let grads = Gradients::backward(&loss, &trainable)?;
    let mut with_grad = 0;
    for name in trainable.keys() {
        if let Some(g) = grads.grads.get(name) {
            let n = g.sqr()?.sum_all()?.to_scalar::<f32>()?;
            if n.is_finite() && n > 0.0 {
                with_grad += 1;
            }
        }
    }
    checks.push(Check {
        name: "gradients reach every tensor",
        passed: with_grad == trainable.len(),
        measured: format!("{with_grad}/{} trainable tensors", trainable.len()),
        requirement: "all, finite and non-zero",
    });
    Ok(loss.to_scalar::<f32>()?)
}

/// How fine-tuning went.
struct FineTune {
    steps: usize,
    seconds: f64,
    loss_after: f32,
}

/// Check 5: fine-tune on the colour questions until the loss is near zero.
fn fine_tune(
    model: &Vlm,
    examples: &[Example],
    max_steps: usize,
    loss_before: f32,
    checks: &mut Vec<Check>,
) -> anyhow::Result<FineTune> {
    let lr = 3e-3;
    let config = AdamWConfig {
        lr,
        ..Default::default()
    };
    let mut opt = AdamW::new(model.trainable_vars(), config)?;
    let started = Instant::now();
    let mut steps = 0;
    let mut loss_after = loss_before;
    while steps < max_steps && loss_after >= 0.01 {
        let loss = sft_loss(model, examples)?;
        loss_after = loss.to_scalar::<f32>()?;
        let grads = Gradients::backward(&loss, opt.params())?;
        opt.step(&grads, lr)?;
        steps += 1;
        if steps % 25 == 0 {
            tracing::info!(step = steps, loss = loss_after, "fine-tuning");
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    checks.push(Check {
        name: "fine-tuning converges",
        passed: loss_after < 0.01,
        measured: format!(
            "loss {loss_before:.3} -> {loss_after:.4} in {steps} steps ({seconds:.1} s)"
        ),
        requirement: "< 0.01",
    });
    Ok(FineTune {
        steps,
        seconds,
        loss_after,
    })
}

/// Check 6: the saved fine-tuned model answers every question. `(expected, answered)` pairs.
fn check_answers(
    bundle: &Bundle,
    cfg: &LlavaConfig,
    device: &Device,
    out: &Path,
    examples: &[Example],
    prompts: &[Prompt],
    checks: &mut Vec<Check>,
) -> anyhow::Result<Vec<(String, String)>> {
    let trained_dir = out.join("trained");
    bundle.save(&trained_dir)?;
    let trained = Bundle::load(&trained_dir, Head::LanguageModel, device, DType::F32)?;
    let mut greedy = SamplingParams::greedy(12);
    greedy.stop_token_ids = trained.stop_token_ids();
    greedy.suppress_token_ids = vec![cfg.image_token_index];
    let answers = ril_model::generate(&trained.model, prompts, &greedy)?;
    let mut pairs = Vec::new();
    let mut correct = 0;
    for (e, g) in examples.iter().zip(&answers) {
        let text = trained.tokenizer.decode(&g.token_ids, true)?;
        correct += usize::from(text == e.answer_text);
        pairs.push((e.answer_text.clone(), text));
    }
    checks.push(Check {
        name: "reloaded model answers",
        passed: correct == examples.len(),
        measured: format!("{correct}/{} greedy answers correct", examples.len()),
        requirement: "all",
    });
    Ok(pairs)
}

fn print_report(report: &Report, json_path: &Path) {
    println!(
        "ril model selfcheck: {} parameters ({} trainable)",
        report.parameters, report.trainable_parameters
    );
    for c in &report.checks {
        println!(
            "  [{}] {:<30} {}  (needs {})",
            if c.passed { "PASS" } else { "FAIL" },
            c.name,
            c.measured,
            c.requirement
        );
    }
    for (want, got) in &report.answers {
        println!("  expected {want:<8} answered {got:?}");
    }
    println!("report: {}", json_path.display());
}

pub fn run(args: &SelfcheckArgs) -> anyhow::Result<()> {
    if let Some(against) = &args.against {
        return crate::selfcheck_device::run(args, against);
    }
    let device = crate::device::parse(&args.device)?;
    let out = out_dir(args)?;
    let mut checks = Vec::new();
    let (bundle, cfg) = fresh_model(args, &device, &out, &mut checks)?;
    let (n_params, n_trainable) = bundle.model.parameter_counts();
    let model = &bundle.model;
    let examples = colour_examples(&bundle.tokenizer, &cfg, &device)?;
    let prompts: Vec<Prompt> = examples.iter().map(Example::prompt).collect();
    let params = SamplingParams::paper(16, args.seed);
    let sampled = check_kv_cache(model, &prompts, &params, &mut checks)?;
    check_logprobs(model, &prompts, &sampled, params.temperature, &mut checks)?;
    let loss_before = check_gradients(model, &examples, &mut checks)?;
    let tuned = fine_tune(model, &examples, args.max_steps, loss_before, &mut checks)?;
    let answers = check_answers(
        &bundle,
        &cfg,
        &device,
        &out,
        &examples,
        &prompts,
        &mut checks,
    )?;
    let report = Report {
        parameters: n_params,
        trainable_parameters: n_trainable,
        fine_tune_steps: tuned.steps,
        fine_tune_seconds: tuned.seconds,
        loss_before,
        loss_after: tuned.loss_after,
        answers,
        out_dir: out.clone(),
        checks,
    };
    let json_path = out.join("selfcheck.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", json_path.display()))?;
    print_report(&report, &json_path);
    let failed = report.checks.iter().filter(|c| !c.passed).count();
    if failed > 0 {
        bail!("{failed} self-check(s) failed; see {}", json_path.display());
    }
    Ok(())
}
