//! The vision-language model every ril role runs: a LLaVA-style VLM (CLIP vision tower, MLP
//! projector, Llama/Qwen2 decoder) in candle, with the pieces around it that must agree with the
//! Hugging Face ecosystem: `config.json`, safetensors names, `tokenizer.json` + chat template,
//! `CLIPImageProcessor` preprocessing.
//!
//! Architecture invariant: no tokio, no tonic, no I/O beyond reading and writing model files.

pub mod batch;
pub mod bundle;
pub mod checkpoint;
pub mod clip;
pub mod config;
pub mod decoder;
pub mod device;
pub mod error;
pub mod generate;
pub mod image;
pub mod ops;
pub mod optim;
pub mod score;
pub mod tokenizer;
pub mod toy;
pub mod vlm;

pub use config::{LlavaConfig, ModelSize};
pub use device::{DeviceError, DeviceSpec};
pub use error::{ModelError, Result};
pub use generate::{Generation, Prompt, SamplingParams, generate};
pub use tokenizer::{ChatMessage, ChatTokenizer};
pub use vlm::{Head, Vlm};
