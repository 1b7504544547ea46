//! Model configuration, deserialised straight from a Hugging Face `config.json` (`LlavaConfig`
//! with a CLIP `vision_config` and a Llama or Qwen2 `text_config`).
//!
//! Keys this crate does not use are kept in `extra` so that a config read from the Hub and saved
//! again loses nothing. A config in the ecosystem's format cannot deny unknown fields (every
//! transformers release adds some); values that change the maths and that we do not implement are
//! refused by [`LlavaConfig::validate`] instead.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// Activation functions by their transformers names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Activation {
    /// Exact GELU with erf.
    #[serde(rename = "gelu")]
    Gelu,
    /// The tanh approximation of GELU (transformers: `gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`).
    #[serde(
        rename = "gelu_pytorch_tanh",
        alias = "gelu_new",
        alias = "gelu_fast",
        alias = "gelu_python_tanh"
    )]
    GeluTanh,
    #[serde(rename = "quick_gelu")]
    QuickGelu,
    #[serde(rename = "silu", alias = "swish")]
    Silu,
    #[serde(rename = "relu")]
    Relu,
}

/// `vision_feature_layer`: one hidden-state index, or several whose features are concatenated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum FeatureLayer {
    One(i64),
    Many(Vec<i64>),
}

impl Default for FeatureLayer {
    fn default() -> Self {
        Self::One(-2)
    }
}

impl FeatureLayer {
    pub fn layers(&self) -> Vec<i64> {
        match self {
            Self::One(i) => vec![*i],
            Self::Many(v) => v.clone(),
        }
    }
}

/// `vision_feature_select_strategy`: `default` drops the CLS token, `full` keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FeatureSelectStrategy {
    #[default]
    Default,
    Full,
}

/// CLIP vision tower configuration (`CLIPVisionConfig`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipVisionConfig {
    #[serde(default = "default_clip_model_type")]
    pub model_type: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    #[serde(default = "default_num_channels")]
    pub num_channels: usize,
    #[serde(default = "default_clip_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_clip_act")]
    pub hidden_act: Activation,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

fn default_clip_model_type() -> String {
    "clip_vision_model".into()
}
fn default_num_channels() -> usize {
    3
}
fn default_clip_eps() -> f64 {
    1e-5
}
fn default_clip_act() -> Activation {
    Activation::QuickGelu
}

impl ClipVisionConfig {
    pub fn num_patches(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

/// Rotary embedding parameters (`rope_parameters` in transformers 5, `rope_theta` +
/// `rope_scaling` before).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeParameters {
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_rope_type")]
    pub rope_type: String,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_rope_type() -> String {
    "default".into()
}

/// A token id or a list of them (`eos_token_id` may be either).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            Self::One(i) => vec![*i],
            Self::Many(v) => v.clone(),
        }
    }
}

/// Decoder configuration (`LlamaConfig` or `Qwen2Config`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextConfig {
    #[serde(default = "default_text_model_type")]
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<RopeParameters>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_bias: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlp_bias: Option<bool>,
    #[serde(default = "default_text_act")]
    pub hidden_act: Activation,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tie_word_embeddings: Option<bool>,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

fn default_text_model_type() -> String {
    "llama".into()
}
fn default_rms_eps() -> f64 {
    1e-6
}
fn default_text_act() -> Activation {
    Activation::Silu
}
fn default_max_pos() -> usize {
    4096
}

impl TextConfig {
    pub fn is_qwen2(&self) -> bool {
        self.model_type == "qwen2"
    }
    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }
    /// Biases on q/k/v: Qwen2 always has them; Llama when `attention_bias` is set.
    pub fn qkv_bias(&self) -> bool {
        self.is_qwen2() || self.attention_bias.unwrap_or(false)
    }
    /// Bias on o_proj: Llama's `attention_bias` covers it; Qwen2's o_proj never has one.
    pub fn o_bias(&self) -> bool {
        !self.is_qwen2() && self.attention_bias.unwrap_or(false)
    }
    pub fn mlp_bias(&self) -> bool {
        self.mlp_bias.unwrap_or(false)
    }
    /// `eos_token_id` (one id or a list; absent or null: none).
    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.extra
            .get("eos_token_id")
            .and_then(|v| serde_json::from_value::<TokenIds>(v.clone()).ok())
            .map(|t| t.to_vec())
            .unwrap_or_default()
    }
    pub fn rope_theta(&self) -> f64 {
        match (&self.rope_parameters, self.rope_theta) {
            (Some(p), _) => p.rope_theta,
            (None, Some(t)) => t,
            (None, None) => default_rope_theta(),
        }
    }
}

/// The whole VLM's configuration (`LlavaConfig`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlavaConfig {
    #[serde(default = "default_llava_model_type")]
    pub model_type: String,
    pub vision_config: ClipVisionConfig,
    pub text_config: TextConfig,
    #[serde(alias = "image_token_id")]
    pub image_token_index: u32,
    #[serde(default = "default_projector_act")]
    pub projector_hidden_act: Activation,
    #[serde(default)]
    pub vision_feature_layer: FeatureLayer,
    #[serde(default)]
    pub vision_feature_select_strategy: FeatureSelectStrategy,
    #[serde(default = "default_true")]
    pub multimodal_projector_bias: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tie_word_embeddings: Option<bool>,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

fn default_llava_model_type() -> String {
    "llava".into()
}
fn default_projector_act() -> Activation {
    Activation::Gelu
}
fn default_true() -> bool {
    true
}

impl LlavaConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let cfg: Self = serde_json::from_str(&text).map_err(|source| ModelError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        cfg.validate()
            .map_err(|e| ModelError::config(path.display().to_string(), e.to_string()))?;
        Ok(cfg)
    }

    /// Writes `config.json` in transformers' layout.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut value = serde_json::to_value(self).map_err(|source| ModelError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        if let Some(obj) = value.as_object_mut() {
            obj.entry("architectures")
                .or_insert_with(|| serde_json::json!(["LlavaForConditionalGeneration"]));
        }
        let text = serde_json::to_string_pretty(&value).map_err(|source| ModelError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        crate::checkpoint::write_atomic(path, text.as_bytes())
    }

    /// Whether the LM head shares the token embedding's weight.
    pub fn tie_word_embeddings(&self) -> bool {
        self.text_config
            .tie_word_embeddings
            .or(self.tie_word_embeddings)
            .unwrap_or(false)
    }

    /// Vision hidden-state indices (into `[embeddings, layer 1, ..., layer N]`), resolved to
    /// non-negative positions.
    pub fn feature_layer_indices(&self) -> Result<Vec<usize>> {
        let n_states = self.vision_config.num_hidden_layers as i64 + 1;
        self.vision_feature_layer
            .layers()
            .into_iter()
            .map(|l| {
                let idx = if l < 0 { n_states + l } else { l };
                if idx < 0 || idx >= n_states {
                    Err(ModelError::config(
                        "vision_feature_layer",
                        format!(
                            "layer {l} is out of range for a vision tower with {} layers",
                            n_states - 1
                        ),
                    ))
                } else {
                    Ok(idx as usize)
                }
            })
            .collect()
    }

    /// Number of image features (= `<image>` tokens) per image.
    pub fn image_features_per_image(&self) -> usize {
        let patches = self.vision_config.num_patches();
        match self.vision_feature_select_strategy {
            FeatureSelectStrategy::Default => patches,
            FeatureSelectStrategy::Full => patches + 1,
        }
    }

    /// Refuses configurations whose maths this implementation does not reproduce.
    pub fn validate(&self) -> Result<()> {
        let t = &self.text_config;
        let v = &self.vision_config;
        if !matches!(t.model_type.as_str(), "llama" | "qwen2" | "mistral") {
            return Err(ModelError::config(
                "text_config.model_type",
                format!(
                    "`{}` is not supported (llama, qwen2, mistral)",
                    t.model_type
                ),
            ));
        }
        for (name, value) in [
            ("text_config.vocab_size", t.vocab_size),
            ("text_config.hidden_size", t.hidden_size),
            ("text_config.num_attention_heads", t.num_attention_heads),
            ("text_config.num_hidden_layers", t.num_hidden_layers),
            ("vision_config.hidden_size", v.hidden_size),
            ("vision_config.num_attention_heads", v.num_attention_heads),
            ("vision_config.patch_size", v.patch_size),
            ("vision_config.image_size", v.image_size),
        ] {
            if value == 0 {
                return Err(ModelError::config(name, "must be positive"));
            }
        }
        if !t.num_attention_heads.is_multiple_of(t.num_kv_heads()) {
            return Err(ModelError::config(
                "text_config.num_key_value_heads",
                format!(
                    "{} attention heads are not a multiple of {} key/value heads",
                    t.num_attention_heads,
                    t.num_kv_heads()
                ),
            ));
        }
        if !t.head_dim().is_multiple_of(2) {
            return Err(ModelError::config(
                "text_config.head_dim",
                "rotary embeddings need an even head dimension",
            ));
        }
        if !v.hidden_size.is_multiple_of(v.num_attention_heads) {
            return Err(ModelError::config(
                "vision_config.num_attention_heads",
                "must divide vision_config.hidden_size",
            ));
        }
        if !v.image_size.is_multiple_of(v.patch_size) {
            return Err(ModelError::config(
                "vision_config.patch_size",
                "must divide vision_config.image_size",
            ));
        }
        if let Some(p) = &t.rope_parameters
            && p.rope_type != "default"
        {
            return Err(ModelError::config(
                "text_config.rope_parameters.rope_type",
                format!("`{}` is not supported (only `default`)", p.rope_type),
            ));
        }
        if let Some(s) = &t.rope_scaling
            && !s.is_null()
        {
            let kind = s
                .get("rope_type")
                .or_else(|| s.get("type"))
                .and_then(|k| k.as_str())
                .unwrap_or("?");
            if kind != "default" {
                return Err(ModelError::config(
                    "text_config.rope_scaling",
                    format!("`{kind}` is not supported (only unscaled rotary embeddings)"),
                ));
            }
        }
        if t.extra.get("use_sliding_window").and_then(|b| b.as_bool()) == Some(true) {
            return Err(ModelError::config(
                "text_config.use_sliding_window",
                "sliding-window attention is not supported",
            ));
        }
        self.feature_layer_indices()?;
        Ok(())
    }

    /// The unit-test configuration: CLIP 16x16 images in 4x4 patches, a 2-layer Llama decoder
    /// with grouped-query attention (~0.13M parameters with a byte-level vocabulary).
    pub fn for_tests(vocab_size: usize, image_token_index: u32) -> Self {
        Self::sized(vocab_size, image_token_index, ModelSize::Test)
    }

    pub fn sized(vocab_size: usize, image_token_index: u32, size: ModelSize) -> Self {
        let (vh, vl, vi, img, patch, th, tl, ti, heads, kv) = match size {
            ModelSize::Test => (32, 2, 64, 16, 4, 64, 2, 128, 4, 2),
            ModelSize::Tiny => (128, 4, 512, 32, 4, 256, 4, 768, 8, 4),
            ModelSize::Medium => (192, 4, 768, 32, 4, 512, 7, 1536, 8, 4),
        };
        Self {
            model_type: default_llava_model_type(),
            vision_config: ClipVisionConfig {
                model_type: default_clip_model_type(),
                hidden_size: vh,
                intermediate_size: vi,
                num_hidden_layers: vl,
                num_attention_heads: 4,
                image_size: img,
                patch_size: patch,
                num_channels: 3,
                layer_norm_eps: 1e-5,
                hidden_act: Activation::QuickGelu,
                extra: Default::default(),
            },
            text_config: TextConfig {
                model_type: default_text_model_type(),
                vocab_size,
                hidden_size: th,
                intermediate_size: ti,
                num_hidden_layers: tl,
                num_attention_heads: heads,
                num_key_value_heads: Some(kv),
                head_dim: None,
                rms_norm_eps: 1e-6,
                rope_theta: None,
                rope_parameters: Some(RopeParameters {
                    rope_theta: 10_000.0,
                    rope_type: default_rope_type(),
                    extra: Default::default(),
                }),
                rope_scaling: None,
                attention_bias: Some(false),
                mlp_bias: None,
                hidden_act: Activation::Silu,
                tie_word_embeddings: Some(false),
                max_position_embeddings: 2048,
                extra: Default::default(),
            },
            image_token_index,
            projector_hidden_act: Activation::Gelu,
            vision_feature_layer: FeatureLayer::One(-1),
            vision_feature_select_strategy: FeatureSelectStrategy::Default,
            multimodal_projector_bias: true,
            tie_word_embeddings: Some(false),
            extra: Default::default(),
        }
    }
}

/// Preset sizes for tests, the self-check and benchmarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelSize {
    /// ~0.13M parameters: unit tests.
    Test,
    /// ~4M parameters, 32x32 images: the built-in models' default size.
    Tiny,
    /// ~25M parameters: the benchmark's larger size.
    Medium,
}

impl ModelSize {
    pub fn name(self) -> &'static str {
        match self {
            Self::Test => "test",
            Self::Tiny => "tiny",
            Self::Medium => "medium",
        }
    }
}

impl std::str::FromStr for ModelSize {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "test" => Ok(Self::Test),
            "tiny" => Ok(Self::Tiny),
            "medium" => Ok(Self::Medium),
            other => Err(format!("unknown model size {other:?} (test, tiny, medium)")),
        }
    }
}
