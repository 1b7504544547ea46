//! `ril data ...`, `ril tokenizer train`, `ril model init`, `ril sft`, `ril eval`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use candle_core::DType;
use ril_data::dataset::{ReadOptions, RowReader, Split, read_all, split_file};
use ril_data::shapes::{SynthConfig, write_dataset};
use ril_learner::eval::{EvalConfig, evaluate};
use ril_learner::sft::{OPTIMIZER_FILE, Schedule, SftConfig, SftEvent, SftState, Target, run_sft};
use ril_model::bundle::Bundle;
use ril_model::config::ModelSize;
use ril_model::image::{ImageProcessor, ImageProcessorConfig};
use ril_model::optim::{AdamW, AdamWConfig};
use ril_model::{Head, LlavaConfig, Vlm};

#[derive(Debug, clap::Args)]
pub struct SynthArgs {
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 2000)]
    pub n_train: usize,
    #[arg(long, default_value_t = 200)]
    pub n_val: usize,
    #[arg(long, default_value_t = 500)]
    pub n_test: usize,
    #[arg(long, default_value_t = 64)]
    pub image_size: u32,
    #[arg(long, default_value_t = 1)]
    pub min_objects: usize,
    #[arg(long, default_value_t = 5)]
    pub max_objects: usize,
    /// Uniform pixel noise in [0, 1].
    #[arg(long, default_value_t = 0.05)]
    pub noise: f32,
    /// How far objects stray from their cell's centre, as a fraction in [0, 1] of the room
    /// they have.
    #[arg(long, default_value_t = 0.25)]
    pub jitter: f32,
    /// Comma-separated question families to draw from: colour, shape, count, relation,
    /// exists, compare, arithmetic (the default mix) and describe (dense captions, for
    /// pre-training). Each row's family is drawn uniformly from the list, so repeating a name
    /// weights it.
    #[arg(long, value_delimiter = ',', default_values_t = ril_data::shapes::default_families())]
    pub families: Vec<String>,
    /// Background colour as R,G,B (0-255); the default is CLIP's mean grey.
    #[arg(long, value_delimiter = ',', default_values_t = ril_data::shapes::CLIP_MEAN_GREY)]
    pub background: Vec<u8>,
    /// Leave out each question's `rationale` (the scene cell by cell, which reasoning answer
    /// styles write before the answer).
    #[arg(long)]
    pub no_rationale: bool,
    /// Which rationale: `scene` (every object, cell by cell), `focused` (only the objects
    /// the question is about, with their cells or their count) or `stepwise` (the scene, then
    /// the focused step) or `tally` (the scene, each object marked as read with what it means
    /// for the question: running counts, the attribute asked for, the two objects named) or
    /// `lookup` (the scene object first, "red circle at top left", then the focused step,
    /// written so each look-up copies the words next to a match).
    #[arg(long, default_value = "scene", value_parser = ["scene", "focused", "stepwise", "tally", "lookup"])]
    pub rationale_kind: String,
}

pub fn synth(a: &SynthArgs) -> anyhow::Result<()> {
    let cfg = SynthConfig {
        seed: a.seed,
        n_train: a.n_train,
        n_val: a.n_val,
        n_test: a.n_test,
        image_size: a.image_size,
        min_objects: a.min_objects,
        max_objects: a.max_objects,
        noise: a.noise,
        jitter: a.jitter,
        families: a.families.clone(),
        background: a
            .background
            .as_slice()
            .try_into()
            .context("--background takes three values, R,G,B")?,
        rationale: !a.no_rationale,
        rationale_kind: match a.rationale_kind.as_str() {
            "focused" => ril_data::shapes::RationaleKind::Focused,
            "stepwise" => ril_data::shapes::RationaleKind::Stepwise,
            "tally" => ril_data::shapes::RationaleKind::Tally,
            "lookup" => ril_data::shapes::RationaleKind::Lookup,
            _ => ril_data::shapes::RationaleKind::Scene,
        },
    };
    let started = std::time::Instant::now();
    let [tr, va, te] =
        write_dataset(&cfg, &a.out).with_context(|| format!("writing {}", a.out.display()))?;
    println!(
        "shapes: {tr} train, {va} val, {te} test rows in {} ({:.1} s)",
        a.out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// A JSONL or Parquet file, or a directory with train/val/test.{jsonl,parquet}.
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long)]
    pub skip_bad_rows: bool,
}

/// Reads every row (images decoded) and reports counts, families and skipped rows.
pub fn check(a: &CheckArgs) -> anyhow::Result<()> {
    let files: Vec<PathBuf> = if a.data.is_dir() {
        [Split::Train, Split::Val, Split::Test]
            .into_iter()
            .filter_map(|s| split_file(&a.data, s).ok())
            .collect()
    } else {
        vec![a.data.clone()]
    };
    if files.is_empty() {
        bail!("{}: no train/val/test.jsonl found", a.data.display());
    }
    for f in files {
        let mut reader = RowReader::open(
            &f,
            ReadOptions {
                skip_bad_rows: a.skip_bad_rows,
            },
        )?;
        let mut families: std::collections::BTreeMap<String, usize> = Default::default();
        let mut n = 0;
        let mut images = 0;
        for row in reader.by_ref() {
            let row = row?;
            n += 1;
            images += row.images.len();
            *families
                .entry(row.family.unwrap_or_else(|| "-".into()))
                .or_default() += 1;
        }
        let report = reader.skip_report();
        println!(
            "{}: {n} rows, {images} images, families {families:?}",
            f.display()
        );
        if report.skipped > 0 {
            println!(
                "  skipped {} bad rows; first: {:#?}",
                report.skipped, report.first
            );
        }
    }
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct TokenizerTrainArgs {
    /// A JSONL file or a dataset directory (its train split is used).
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 512)]
    pub vocab_size: usize,
}

pub fn tokenizer_train(a: &TokenizerTrainArgs) -> anyhow::Result<()> {
    let file = split_file(&a.data, Split::Train)?;
    let (rows, _) = read_all(&file, ReadOptions::default())?;
    let mut texts = Vec::with_capacity(rows.len() * 3);
    for r in &rows {
        texts.push(r.question_text());
        texts.push(r.answer.clone());
        // The reasoned style (with the row's rationale, when it has one), so its words get
        // tokens of their own.
        texts.push(ril_data::style::styled_answer(
            r,
            ril_data::style::AnswerStyle::Reasoned,
        ));
        for answers in r.teacher_answers.values() {
            texts.extend(answers.iter().cloned());
        }
    }
    let tok = ril_model::tokenizer::train_byte_level_chatml(texts.into_iter(), a.vocab_size)?;
    tok.save(&a.out)?;
    println!(
        "tokenizer: {} tokens -> {}",
        tok.vocab_size(),
        a.out.display()
    );
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct InitArgs {
    /// A directory with tokenizer.json (+ tokenizer_config.json, chat template).
    #[arg(long)]
    pub tokenizer: PathBuf,
    /// test, tiny or medium.
    #[arg(long, default_value = "tiny")]
    pub size: ModelSize,
    /// Decoder layers, overriding the size's default.
    #[arg(long)]
    pub layers: Option<usize>,
    /// Decoder width, overriding the size's default (heads keep 32 dimensions each).
    #[arg(long)]
    pub hidden: Option<usize>,
    /// Vision-tower layers, overriding the size's default.
    #[arg(long)]
    pub vision_layers: Option<usize>,
    /// Vision-tower width, overriding the size's default (MLP 4x wide; 4 heads, so a multiple
    /// of 4).
    #[arg(long)]
    pub vision_hidden: Option<usize>,
    /// Image side in pixels, overriding the size's default (must be a multiple of the patch).
    #[arg(long)]
    pub image_size: Option<usize>,
    #[arg(long)]
    pub patch_size: Option<usize>,
    /// Start the vision tower from this model directory's (LLaVA's recipe: a trained vision
    /// encoder under a new language model). Its vision config must match the new model's; the
    /// projector and the decoder stay random.
    #[arg(long)]
    pub vision_from: Option<PathBuf>,
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Copies every `vision_tower.*` tensor of the model in `dir` into `model`.
fn copy_vision_tower(model: &Vlm, dir: &std::path::Path) -> anyhow::Result<usize> {
    let source = Vlm::from_pretrained(
        dir,
        Head::LanguageModel,
        &candle_core::Device::Cpu,
        DType::F32,
    )
    .with_context(|| format!("--vision-from {}", dir.display()))?;
    let (want, have) = (
        &model.config().vision_config,
        &source.config().vision_config,
    );
    // Everything that fixes the tower's tensors' shapes.
    let describe = |c: &ril_model::config::ClipVisionConfig| {
        format!(
            "width {}, MLP {}, {} layers, {} heads, {}-px images in {}-px patches, {} channels",
            c.hidden_size,
            c.intermediate_size,
            c.num_hidden_layers,
            c.num_attention_heads,
            c.image_size,
            c.patch_size,
            c.num_channels
        )
    };
    let (want, have) = (describe(want), describe(have));
    anyhow::ensure!(
        want == have,
        "--vision-from {}: its vision tower ({have}) differs from the new model's ({want})",
        dir.display()
    );
    let from = source.named_vars();
    let prefix = format!("{}.", ril_model::vlm::VISION_PREFIX);
    let mut copied = 0;
    for (name, var) in model.named_vars() {
        if !name.starts_with(&prefix) {
            continue;
        }
        let src = from
            .get(&name)
            .with_context(|| format!("--vision-from {}: no tensor {name}", dir.display()))?;
        var.set(&src.as_tensor().to_dtype(var.dtype())?)?;
        copied += 1;
    }
    Ok(copied)
}

/// A new random model directory for a tokenizer.
pub fn init(a: &InitArgs) -> anyhow::Result<()> {
    let tokenizer = ril_model::ChatTokenizer::from_dir(&a.tokenizer)?;
    let image_id = tokenizer
        .token_id(tokenizer.special_token("image_token").unwrap_or("<image>"))
        .context("the tokenizer has no image token")?;
    let mut cfg = LlavaConfig::sized(tokenizer.vocab_size(), image_id, a.size);
    if let Some(l) = a.layers {
        cfg.text_config.num_hidden_layers = l;
    }
    if let Some(h) = a.hidden {
        cfg.text_config.hidden_size = h;
        cfg.text_config.intermediate_size = 3 * h;
        cfg.text_config.num_attention_heads = (h / 32).max(1);
        cfg.text_config.num_key_value_heads = Some((h / 64).max(1));
    }
    if let Some(l) = a.vision_layers {
        cfg.vision_config.num_hidden_layers = l;
    }
    if let Some(h) = a.vision_hidden {
        cfg.vision_config.hidden_size = h;
        cfg.vision_config.intermediate_size = 4 * h;
    }
    if let Some(s) = a.image_size {
        cfg.vision_config.image_size = s;
    }
    if let Some(p) = a.patch_size {
        cfg.vision_config.patch_size = p;
    }
    cfg.validate()?;
    if let Some(eos) = tokenizer.eos_id() {
        cfg.text_config
            .extra
            .insert("eos_token_id".into(), eos.into());
    }
    let model = Vlm::new_random(
        &cfg,
        Head::LanguageModel,
        &candle_core::Device::Cpu,
        DType::F32,
        a.seed,
    )?;
    if let Some(dir) = &a.vision_from {
        let copied = copy_vision_tower(&model, dir)?;
        println!("vision tower: {copied} tensors from {}", dir.display());
    }
    let (n, _) = model.parameter_counts();
    let processor = ImageProcessor::new(ImageProcessorConfig::clip(
        cfg.vision_config.image_size as u32,
    ))?;
    Bundle {
        model,
        tokenizer,
        processor,
    }
    .save(&a.out)?;
    println!("model: {n} parameters -> {}", a.out.display());
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct SftArgs {
    /// Model directory to start from (ignored with --resume).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Dataset directory (train.jsonl, val.jsonl) or a train JSONL file.
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
    /// Continue from a checkpoint directory written by a previous run.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    #[arg(long, default_value_t = 200)]
    pub steps: usize,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 1e-4)]
    pub min_lr: f64,
    #[arg(long, default_value_t = 10)]
    pub warmup_steps: usize,
    /// constant, linear or cosine.
    #[arg(long, default_value = "cosine")]
    pub schedule: String,
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 50)]
    pub eval_every: usize,
    #[arg(long, default_value_t = 100)]
    pub eval_rows: usize,
    #[arg(long, default_value_t = 100)]
    pub save_every: usize,
    #[arg(long, default_value_t = 10)]
    pub log_every: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// reference, teacher:NAME, style:terse|reasoned|narrated, or a weighted mix drawn per
    /// row, e.g. `reference=0.8,style:reasoned=0.2`.
    #[arg(long, default_value = "reference")]
    pub target: String,
    /// Keep tensors whose names start with this prefix fixed (repeatable), e.g. `vision_tower`
    /// to train a new decoder over a trained vision tower without disturbing it. A resumed run
    /// must freeze the same ones.
    #[arg(long)]
    pub freeze: Vec<String>,
    #[arg(long)]
    pub skip_bad_rows: bool,
    /// Where the model, optimizer state and batches live: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

fn parse_target(s: &str) -> anyhow::Result<Target> {
    // "reference=0.8,style:reasoned=0.2": a weighted mix, drawn per row.
    if s.contains(',') || s.contains('=') {
        let choices = s
            .split(',')
            .map(|part| {
                let (target, weight) = part.rsplit_once('=').ok_or_else(|| {
                    anyhow::anyhow!("--target {s:?}: {part:?} needs a weight (TARGET=WEIGHT)")
                })?;
                let weight: f64 = weight.trim().parse().map_err(|_| {
                    anyhow::anyhow!("--target {s:?}: weight {weight:?} is not a number")
                })?;
                if !weight.is_finite() || weight < 0.0 {
                    bail!("--target {s:?}: weight {weight} must be finite and >= 0");
                }
                Ok((parse_target(target.trim())?, weight))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        if choices.iter().map(|(_, w)| w).sum::<f64>() <= 0.0 {
            bail!("--target {s:?}: the weights sum to 0");
        }
        return Ok(Target::Mixed(choices));
    }
    Ok(match s.split_once(':') {
        None if s == "reference" => Target::Reference,
        Some(("teacher", name)) if !name.is_empty() => Target::Teacher(name.to_string()),
        Some(("style", style)) => Target::Style(style.parse().map_err(anyhow::Error::msg)?),
        _ => bail!(
            "--target {s:?}: expected reference, teacher:NAME or style:terse|reasoned|narrated"
        ),
    })
}

/// A progress bar on a terminal, plain log lines otherwise.
fn progress_bar(total: u64, what: &str) -> Option<indicatif::ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_prefix(what.to_string());
    Some(bar)
}

/// The SFT settings `a` asks for.
fn sft_config(a: &SftArgs) -> anyhow::Result<SftConfig> {
    let schedule = match a.schedule.as_str() {
        "constant" => Schedule::Constant,
        "linear" => Schedule::Linear,
        "cosine" => Schedule::Cosine,
        other => bail!("--schedule {other:?}: expected constant, linear or cosine"),
    };
    Ok(SftConfig {
        steps: a.steps,
        batch_size: a.batch_size,
        grad_accum: a.grad_accum,
        lr: a.lr,
        min_lr: a.min_lr,
        warmup_steps: a.warmup_steps,
        schedule,
        eval_every: a.eval_every,
        eval_rows: a.eval_rows,
        save_every: a.save_every,
        keep_checkpoints: 2,
        log_every: a.log_every,
        seed: a.seed,
        target: parse_target(&a.target)?,
        skip_bad_rows: a.skip_bad_rows,
    })
}

/// AdamW over the model's trainable tensors but the `--freeze` prefixes, resumed from
/// `--resume`'s optimizer state when given.
fn sft_optimizer(a: &SftArgs, bundle: &Bundle, start_dir: &Path) -> anyhow::Result<AdamW> {
    let mut params = bundle.model.trainable_vars();
    for prefix in &a.freeze {
        let before = params.len();
        params.retain(|name, _| !name.starts_with(prefix.as_str()));
        anyhow::ensure!(
            params.len() < before,
            "--freeze {prefix}: no trainable tensor of {} starts with it",
            start_dir.display()
        );
    }
    anyhow::ensure!(!params.is_empty(), "--freeze left nothing to train");
    let mut optimizer = AdamW::new(
        params,
        AdamWConfig {
            lr: a.lr,
            weight_decay: a.weight_decay,
            ..Default::default()
        },
    )?;
    if let Some(r) = &a.resume {
        optimizer.load(&r.join(OPTIMIZER_FILE))?;
    }
    Ok(optimizer)
}

/// Progress on a terminal's bar, log lines otherwise.
fn report_sft_event(bar: &Option<indicatif::ProgressBar>, e: &SftEvent) {
    match e {
        SftEvent::Step {
            step,
            total,
            loss,
            lr,
            grad_norm,
            tokens_per_second,
        } => match bar {
            Some(b) => {
                b.set_position(*step as u64);
                b.set_message(format!(
                    "loss {loss:.4} lr {lr:.2e} {tokens_per_second:.0} tok/s"
                ));
            }
            None => tracing::info!(
                step,
                total,
                loss,
                lr,
                grad_norm,
                tokens_per_second,
                "sft step"
            ),
        },
        SftEvent::Eval { step, val_loss } => {
            tracing::info!(step, val_loss, "validation");
        }
        SftEvent::Saved { step, dir } => {
            tracing::info!(step, dir = %dir.display(), "checkpoint saved")
        }
    }
}

pub fn sft(a: &SftArgs) -> anyhow::Result<()> {
    let cfg = sft_config(a)?;
    let start_dir: &Path = match (&a.resume, &a.model) {
        (Some(r), _) => r,
        (None, Some(m)) => m,
        (None, None) => bail!("give --model (a model directory) or --resume (a checkpoint)"),
    };
    let device = crate::device::parse(&a.device)?;
    tracing::info!(device = %crate::device::describe(&device), "sft");
    let bundle = Bundle::load(start_dir, Head::LanguageModel, &device, DType::F32)
        .with_context(|| format!("loading {}", start_dir.display()))?;
    let mut optimizer = sft_optimizer(a, &bundle, start_dir)?;
    let state = match &a.resume {
        Some(r) => SftState::load(r)?,
        None => SftState::default(),
    };
    let train = split_file(&a.data, Split::Train)?;
    let val = if a.data.is_dir() {
        split_file(&a.data, Split::Val).ok()
    } else {
        None
    };
    let bar = progress_bar(cfg.steps as u64, "sft");
    if let Some(b) = &bar {
        b.set_position(state.step as u64);
    }
    let summary = run_sft(
        &bundle,
        &mut optimizer,
        &train,
        val.as_deref(),
        &a.out,
        &cfg,
        state,
        |e| report_sft_event(&bar, e),
    )?;
    if let Some(b) = bar {
        b.finish();
    }
    println!(
        "sft: {} steps in {:.1} s; train loss {:.4}; val loss {} -> {}; model: {}",
        summary.steps,
        summary.seconds,
        summary.final_train_loss,
        summary
            .first_val_loss
            .map_or("-".into(), |v| format!("{v:.4}")),
        summary
            .final_val_loss
            .map_or("-".into(), |v| format!("{v:.4}")),
        summary.final_dir.display()
    );
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    #[arg(long)]
    pub model: PathBuf,
    /// Dataset directory or JSONL file.
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Evaluate only the first N rows.
    #[arg(long)]
    pub max_rows: Option<usize>,
    #[arg(long, default_value_t = 1)]
    pub samples: usize,
    /// 0: greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 48)]
    pub max_new_tokens: usize,
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write the full report (every row) as JSON here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long)]
    pub skip_bad_rows: bool,
    /// Where the model and its generation run: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

pub fn eval(a: &EvalArgs) -> anyhow::Result<()> {
    let split: Split = a.split.parse().map_err(anyhow::Error::msg)?;
    let file = split_file(&a.data, split)?;
    let (mut rows, skipped) = read_all(
        &file,
        ReadOptions {
            skip_bad_rows: a.skip_bad_rows,
        },
    )?;
    if let Some(n) = a.max_rows {
        rows.truncate(n);
    }
    if rows.is_empty() {
        bail!("{}: no rows to evaluate", file.display());
    }
    let device = crate::device::parse(&a.device)?;
    tracing::info!(device = %crate::device::describe(&device), "eval");
    let bundle = Bundle::load(&a.model, Head::LanguageModel, &device, DType::F32)
        .with_context(|| format!("loading {}", a.model.display()))?;
    let cfg = EvalConfig {
        samples: a.samples,
        temperature: a.temperature,
        top_p: 1.0,
        max_new_tokens: a.max_new_tokens,
        batch_size: a.batch_size,
        seed: a.seed,
    };
    let bar = progress_bar((rows.len() * a.samples.max(1)) as u64, "eval");
    let report = evaluate(&bundle, &rows, &cfg, |done, total| match &bar {
        Some(b) => b.set_position(done as u64),
        None => tracing::debug!(done, total, "evaluating"),
    })?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    println!("| family | questions | accuracy |");
    println!("|---|---:|---:|");
    for (family, s) in &report.per_family {
        println!("| {family} | {} | {:.3} |", s.total, s.accuracy);
    }
    println!(
        "| **all** | {} | **{:.3}** |",
        report.questions, report.accuracy
    );
    if skipped.skipped > 0 {
        println!("skipped {} bad rows: {:?}", skipped.skipped, skipped.first);
    }
    if let Some(out) = &a.out {
        std::fs::write(out, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}
