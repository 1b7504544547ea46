//! `ril bench model`: generation throughput (KV cache against full recomputation) and training
//! throughput (forward + backward + AdamW) on random models of preset sizes. Prints a markdown
//! table; `--json` also writes the raw figures.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use candle_core::DType;
use ril_model::config::ModelSize;
use ril_model::generate::{DecodeMode, GenerateOptions, Prompt, SamplingParams, generate_with};
use ril_model::optim::{AdamW, AdamWConfig, Gradients};
use ril_model::toy::{Example, colour_examples, sft_loss};
use ril_model::{Head, LlavaConfig, Vlm};
use serde::Serialize;

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Model sizes to measure (test, tiny, medium).
    #[arg(long, value_delimiter = ',', default_value = "tiny,medium")]
    pub sizes: Vec<ModelSize>,
    /// Also measure these model configs (transformers' LLaVA `config.json` layout, e.g.
    /// tools/bench-configs/llava-0.5b.json), named by file stem. Their `vocab_size` and
    /// `image_token_index` must be the built-in tokenizer's (260 and 259).
    #[arg(long, value_delimiter = ',')]
    pub configs: Vec<PathBuf>,
    /// Generation batch sizes.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    pub batches: Vec<usize>,
    #[arg(long, default_value_t = 64)]
    pub new_tokens: usize,
    /// Largest batch also measured with full recomputation (it is quadratic in length).
    #[arg(long, default_value_t = 8)]
    pub recompute_max_batch: usize,
    /// The most prompt tokens one prefill forward takes (larger batches are prefilled in
    /// chunks of rows); 0: the whole batch at once.
    #[arg(long, default_value_t = ril_model::generate::DEFAULT_PREFILL_CHUNK_TOKENS)]
    pub prefill_chunk_tokens: usize,
    #[arg(long, default_value_t = 8)]
    pub train_batch: usize,
    /// Timed training steps (after one warm-up step).
    #[arg(long, default_value_t = 5)]
    pub train_steps: usize,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Also write the figures as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct GenFigure {
    size: String,
    parameters: usize,
    batch: usize,
    mode: &'static str,
    prompt_tokens: usize,
    new_tokens: usize,
    seconds: f64,
    tokens_per_second: f64,
}

/// What `tools/torch-bench.py` needs to build the same model and the same inputs.
#[derive(Debug, Serialize)]
struct ModelShape {
    size: String,
    parameters: usize,
    config: LlavaConfig,
    prompt_tokens: usize,
    image_tokens_per_prompt: usize,
    images_per_prompt: usize,
    answer_tokens: usize,
}

#[derive(Debug, Serialize)]
struct TrainFigure {
    size: String,
    parameters: usize,
    batch: usize,
    tokens_per_step: usize,
    seconds_per_step: f64,
    tokens_per_second: f64,
}

/// Generation throughput at every batch size, with the KV cache and (up to
/// `recompute_max_batch`) with full recomputation. Every sequence produces exactly
/// `new_tokens` (no stop tokens).
fn measure_generation(
    args: &BenchArgs,
    model: &Vlm,
    examples: &[Example],
    size_name: &str,
    parameters: usize,
) -> anyhow::Result<Vec<GenFigure>> {
    let params = SamplingParams::paper(args.new_tokens, 0);
    let prompt_for = |i: usize| examples[i % examples.len()].prompt();
    // Warm-up (allocations, thread pool).
    generate_with(
        model,
        &[prompt_for(0)],
        &SamplingParams::paper(4, 0),
        GenerateOptions::default(),
    )?;
    let mut figures = Vec::new();
    for &batch in &args.batches {
        let prompts: Vec<Prompt> = (0..batch).map(prompt_for).collect();
        for (mode, label) in [
            (DecodeMode::KvCache, "kv-cache"),
            (DecodeMode::Recompute, "recompute"),
        ] {
            if mode == DecodeMode::Recompute && batch > args.recompute_max_batch {
                continue;
            }
            let started = Instant::now();
            let options = GenerateOptions {
                mode,
                record_logits: false,
                prefill_chunk_tokens: args.prefill_chunk_tokens,
            };
            let out = generate_with(model, &prompts, &params, options)?;
            let seconds = started.elapsed().as_secs_f64();
            let produced: usize = out.iter().map(|g| g.token_ids.len()).sum();
            let fig = GenFigure {
                size: size_name.to_string(),
                parameters,
                batch,
                mode: label,
                prompt_tokens: prompts[0].token_ids.len(),
                new_tokens: args.new_tokens,
                seconds,
                tokens_per_second: produced as f64 / seconds,
            };
            tracing::info!(?fig, "generation");
            figures.push(fig);
        }
    }
    Ok(figures)
}

/// Training throughput: forward + backward + AdamW over a batch of image questions, after one
/// warm-up step.
fn measure_training(
    args: &BenchArgs,
    model: &Vlm,
    examples: &[Example],
    size_name: &str,
    parameters: usize,
) -> anyhow::Result<TrainFigure> {
    let batch: Vec<Example> = (0..args.train_batch)
        .map(|i| examples[i % examples.len()].clone())
        .collect();
    let tokens_per_step: usize = batch
        .iter()
        .map(|e| e.prompt_ids.len() + e.answer_ids.len())
        .sum();
    let mut opt = AdamW::new(model.trainable_vars(), AdamWConfig::default())?;
    let mut step = || -> anyhow::Result<()> {
        let loss = sft_loss(model, &batch)?;
        let grads = Gradients::backward(&loss, opt.params())?;
        opt.step(&grads, 1e-4)?;
        Ok(())
    };
    step()?;
    let started = Instant::now();
    for _ in 0..args.train_steps {
        step()?;
    }
    let per_step = started.elapsed().as_secs_f64() / args.train_steps.max(1) as f64;
    let fig = TrainFigure {
        size: size_name.to_string(),
        parameters,
        batch: args.train_batch,
        tokens_per_step,
        seconds_per_step: per_step,
        tokens_per_second: tokens_per_step as f64 / per_step,
    };
    tracing::info!(?fig, "training");
    Ok(fig)
}

fn print_tables(gen_figures: &[GenFigure], train_figures: &[TrainFigure]) {
    println!(
        "| size | parameters | batch | decoding | prompt tokens | new tokens | seconds | new tokens/s |"
    );
    println!("|---|---:|---:|---|---:|---:|---:|---:|");
    for f in gen_figures {
        println!(
            "| {} | {:.1}M | {} | {} | {} | {} | {:.2} | {:.0} |",
            f.size,
            f.parameters as f64 / 1e6,
            f.batch,
            f.mode,
            f.prompt_tokens,
            f.new_tokens,
            f.seconds,
            f.tokens_per_second
        );
    }
    println!();
    println!("| size | parameters | batch | tokens/step | s/step | tokens/s (fwd+bwd+AdamW) |");
    println!("|---|---:|---:|---:|---:|---:|");
    for f in train_figures {
        println!(
            "| {} | {:.1}M | {} | {} | {:.3} | {:.0} |",
            f.size,
            f.parameters as f64 / 1e6,
            f.batch,
            f.tokens_per_step,
            f.seconds_per_step,
            f.tokens_per_second
        );
    }
}

/// The models to measure: the presets, then the config files.
fn bench_models(
    args: &BenchArgs,
    vocab: usize,
    image_id: u32,
) -> anyhow::Result<Vec<(String, LlavaConfig)>> {
    let mut models: Vec<(String, LlavaConfig)> = args
        .sizes
        .iter()
        .map(|&size| {
            (
                size.name().to_string(),
                LlavaConfig::sized(vocab, image_id, size),
            )
        })
        .collect();
    for path in &args.configs {
        let cfg = LlavaConfig::from_file(path)?;
        let (v, i) = (cfg.text_config.vocab_size, cfg.image_token_index);
        anyhow::ensure!(
            v == vocab && i == image_id,
            "{}: text_config.vocab_size {v} and image_token_index {i}, but the benchmark's \
             built-in tokenizer has {vocab} tokens and <image> = {image_id}",
            path.display()
        );
        let name = path.file_stem().map_or_else(
            || path.display().to_string(),
            |s| s.to_string_lossy().into_owned(),
        );
        models.push((name, cfg));
    }
    Ok(models)
}

fn model_shape(name: &str, parameters: usize, cfg: &LlavaConfig, e: &Example) -> ModelShape {
    let image_tokens = e
        .prompt_ids
        .iter()
        .filter(|&&t| t == cfg.image_token_index)
        .count();
    ModelShape {
        size: name.to_string(),
        parameters,
        config: cfg.clone(),
        prompt_tokens: e.prompt_ids.len(),
        image_tokens_per_prompt: image_tokens,
        images_per_prompt: e.pixel_values.dim(0).unwrap_or(1),
        answer_tokens: e.answer_ids.len(),
    }
}

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let device = crate::device::parse(&args.device)?;
    let tok = ril_model::tokenizer::byte_level_chatml()?;
    let image_id = tok
        .token_id("<image>")
        .context("built-in tokenizer has no <image>")?;
    let mut gen_figures = Vec::new();
    let mut train_figures = Vec::new();
    let mut shapes = Vec::new();
    for (name, cfg) in bench_models(args, tok.vocab_size(), image_id)? {
        let model = Vlm::new_random(&cfg, Head::LanguageModel, &device, DType::F32, 0)?;
        let (parameters, _) = model.parameter_counts();
        let examples = colour_examples(&tok, &cfg, &device)?;
        tracing::info!(size = name, parameters, "benchmarking");
        shapes.push(model_shape(&name, parameters, &cfg, &examples[0]));
        gen_figures.extend(measure_generation(
            args, &model, &examples, &name, parameters,
        )?);
        train_figures.push(measure_training(
            args, &model, &examples, &name, parameters,
        )?);
    }
    print_tables(&gen_figures, &train_figures);
    if let Some(path) = &args.json {
        let run = serde_json::json!({
            "device": args.device, "new_tokens": args.new_tokens, "batches": args.batches,
            "recompute_max_batch": args.recompute_max_batch, "train_batch": args.train_batch,
            "train_steps": args.train_steps,
        });
        let json = serde_json::json!({
            "run": run, "models": shapes, "generation": gen_figures, "training": train_figures,
        });
        std::fs::write(path, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    fn args(extra: &[&str]) -> BenchArgs {
        let argv = ["bench"].iter().chain(extra).copied();
        Cli::try_parse_from(argv).expect("arguments").bench
    }

    /// The ~0.5B config the GPU run benchmarks loads, validates and fits the built-in tokenizer;
    /// a config for another vocabulary is refused naming the file and both sizes.
    #[test]
    fn bench_configs_load_and_must_fit_the_builtin_tokenizer() -> anyhow::Result<()> {
        let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let committed = repo.join("tools/bench-configs/llava-0.5b.json");
        let a = args(&["--sizes", "test", "--configs", committed.to_str().unwrap()]);
        let models = bench_models(&a, 260, 259)?;
        let names: Vec<&str> = models.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["test", "llava-0.5b"]);
        let cfg = &models[1].1;
        assert_eq!(cfg.text_config.hidden_size, 1024);
        assert_eq!(cfg.text_config.num_hidden_layers, 24);
        assert_eq!(cfg.vision_config.image_size, 224);

        let err = bench_models(&a, 300, 299).unwrap_err().to_string();
        assert!(err.contains("llava-0.5b.json"), "{err}");
        assert!(
            err.contains("vocab_size 260") && err.contains("300 tokens"),
            "{err}"
        );
        Ok(())
    }
}
