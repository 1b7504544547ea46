//! `ril model info`, `ril model generate` and `ril model export`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::DType;
use ril_model::bundle::Bundle;
use ril_model::generate::SamplingParams;
use ril_model::{ChatMessage, Head};

#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
    /// f32, f16 or bf16.
    #[arg(long, default_value = "f16")]
    pub dtype: String,
}

pub fn export(a: &ExportArgs) -> anyhow::Result<()> {
    let dtype = match a.dtype.as_str() {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        other => anyhow::bail!("--dtype {other:?}: expected f32, f16 or bf16"),
    };
    if a.out == a.model {
        anyhow::bail!("--out must differ from --model ({})", a.model.display());
    }
    let bundle = Bundle::load(
        &a.model,
        Head::LanguageModel,
        &candle_core::Device::Cpu,
        DType::F32,
    )
    .with_context(|| format!("loading the model directory {}", a.model.display()))?;
    bundle
        .save_as(&a.out, Some(dtype))
        .with_context(|| format!("writing {}", a.out.display()))?;
    let bytes = std::fs::metadata(a.out.join(ril_model::checkpoint::WEIGHTS_FILE))?.len();
    println!(
        "model: {} -> {} ({:?} weights, {:.1} MB)",
        a.model.display(),
        a.out.display(),
        dtype,
        bytes as f64 / 1e6
    );
    Ok(())
}

pub fn info(dir: &Path, device: &str) -> anyhow::Result<()> {
    let device = crate::device::parse(device)?;
    let bundle = Bundle::load(dir, Head::LanguageModel, &device, DType::F32)
        .with_context(|| format!("loading the model directory {}", dir.display()))?;
    let cfg = bundle.model.config();
    let (all, trainable) = bundle.model.parameter_counts();
    let t = &cfg.text_config;
    let v = &cfg.vision_config;
    println!("model directory: {}", dir.display());
    println!("parameters: {all} ({trainable} trainable)");
    println!(
        "decoder: {} d={} layers={} heads={}/{} kv vocab={} tied={}",
        t.model_type,
        t.hidden_size,
        t.num_hidden_layers,
        t.num_attention_heads,
        t.num_kv_heads(),
        t.vocab_size,
        cfg.tie_word_embeddings()
    );
    println!(
        "vision: {}x{} images, patch {}, d={} layers={}, features/image={}",
        v.image_size,
        v.image_size,
        v.patch_size,
        v.hidden_size,
        v.num_hidden_layers,
        cfg.image_features_per_image()
    );
    println!(
        "tokenizer: {} tokens, chat template: {}",
        bundle.tokenizer.vocab_size(),
        if bundle.tokenizer.chat_template().is_some() {
            "yes"
        } else {
            "no"
        }
    );
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// Model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Image files, in the order the question refers to them (each becomes an image part
    /// before the text).
    #[arg(long = "image")]
    pub images: Vec<PathBuf>,
    /// The question.
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// 0 for greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Number of samples.
    #[arg(long, short = 'n', default_value_t = 1)]
    pub n: usize,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Print JSON (text, token ids, log-probs) instead of plain text.
    #[arg(long)]
    pub json: bool,
}

pub fn generate(args: &GenerateArgs) -> anyhow::Result<()> {
    let device = crate::device::parse(&args.device)?;
    let bundle = Bundle::load(&args.model, Head::LanguageModel, &device, DType::F32)
        .with_context(|| format!("loading the model directory {}", args.model.display()))?;
    let files: Vec<(String, Vec<u8>)> = args
        .images
        .iter()
        .map(|p| {
            std::fs::read(p)
                .map(|b| (p.display().to_string(), b))
                .with_context(|| format!("reading image {}", p.display()))
        })
        .collect::<anyhow::Result<_>>()?;
    let images: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(n, b)| (n.as_str(), b.as_slice()))
        .collect();
    let message = ChatMessage::with_images("user", images.len(), &args.prompt);
    let prompt = bundle.prompt(&[message], &images)?;
    let params = SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        repetition_penalty: args.repetition_penalty,
        max_new_tokens: args.max_new_tokens,
        stop_token_ids: bundle.stop_token_ids(),
        suppress_token_ids: vec![bundle.model.config().image_token_index],
        seed: args.seed,
    };
    let prompts = vec![prompt; args.n.max(1)];
    let generations = ril_model::generate(&bundle.model, &prompts, &params)?;
    for g in generations {
        let text = bundle.tokenizer.decode(&g.token_ids, true)?;
        if args.json {
            println!(
                "{}",
                serde_json::json!({
                    "text": text,
                    "token_ids": g.token_ids,
                    "logprobs": g.logprobs,
                    "finish_reason": g.finish_reason,
                })
            );
        } else {
            println!("{text}");
        }
    }
    Ok(())
}
