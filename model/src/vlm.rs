//! The whole vision-language model (`LlavaForConditionalGeneration`), with either a language-model
//! head (student, reference, teachers) or a scalar head (the discriminator).

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

use crate::clip::{ClipVisionTower, linear};
use crate::config::LlavaConfig;
use crate::decoder::{Decoder, KvCache};
use crate::error::{ModelError, Result};
use crate::ops::{Linear, activate};

/// Which head sits on the decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Head {
    /// Vocabulary logits (`language_model.lm_head`, or the tied embedding).
    LanguageModel,
    /// One logit per sequence from the last non-pad token's hidden state (`score.weight`,
    /// as transformers' `*ForSequenceClassification` with one label names it).
    Scalar,
}

/// Tensor-name prefixes, in the layout transformers 5 writes for `LlavaForConditionalGeneration`.
pub const VISION_PREFIX: &str = "vision_tower";
pub const PROJECTOR_PREFIX: &str = "multi_modal_projector";
pub const TEXT_PREFIX: &str = "language_model";
pub const SCORE_HEAD: &str = "score.weight";

/// One forward pass's inputs.
#[derive(Debug, Clone, Copy)]
pub struct ForwardInput<'a> {
    /// `[B, T]` u32 token ids of the new tokens.
    pub input_ids: &'a Tensor,
    /// `[B, T]` u32 positions of the new tokens.
    pub positions: &'a Tensor,
    /// For each row, which of the `cache + T` key positions are real tokens (1) or padding (0).
    pub key_valid: &'a [Vec<u8>],
    /// `[N, C, H, W]` pixel values of every image referenced by `<image>` tokens in `input_ids`,
    /// in row-major order of their appearance.
    pub pixel_values: Option<&'a Tensor>,
}

/// The model. Parameters live in a [`VarMap`] so the same object trains and serves; frozen
/// tensors (vision layers past the selected feature layer, the unused `post_layernorm`) are
/// kept so checkpoints round-trip but are never trained.
pub struct Vlm {
    cfg: LlavaConfig,
    head: Head,
    vision: ClipVisionTower,
    feature_layers: Vec<usize>,
    projector: (Linear, Linear),
    pub(crate) decoder: Decoder,
    score: Option<Linear>,
    varmap: VarMap,
    frozen_prefixes: Vec<String>,
    device: Device,
    dtype: DType,
}

impl std::fmt::Debug for Vlm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vlm")
            .field("head", &self.head)
            .field("device", &self.device)
            .field("dtype", &self.dtype)
            .field("parameters", &self.parameter_counts())
            .finish_non_exhaustive()
    }
}

/// How [`Vlm::init_weights`] draws the weight matrices and embedding tables (norms start at 1,
/// biases at 0 either way).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// The default for new models. Embedding tables (token, position, class) N(0, 0.02);
    /// the discriminator's scalar head N(0, 0.02), so D starts near 1/2; every other matrix
    /// N(0, 1/fan_in), LeCun normal, with fan_in the product of all but the first dimension
    /// (a convolution kernel counts its channels x kernel area). transformers' fixed
    /// `initializer_range` of 0.02 suits widths in the thousands; at the built-in models'
    /// widths (64-512) it leaves attention uniform and the layers near-linear, and a model
    /// trained from it learns the answer prior of each question and never reads the image
    /// (docs/BENCHMARKS.md, "Built-in models").
    FanIn,
    /// Every matrix and table N(0, std): for tests that need a particular weight scale.
    Normal(f32),
}

impl Init {
    fn std_for(self, name: &str, dims: &[usize]) -> f32 {
        match self {
            Init::Normal(std) => std,
            Init::FanIn => {
                let is_table = name.ends_with("embed_tokens.weight")
                    || name.ends_with("position_embedding.weight")
                    || name.ends_with("class_embedding");
                if is_table || name == SCORE_HEAD || dims.len() < 2 {
                    0.02
                } else {
                    let fan_in: usize = dims[1..].iter().product();
                    1.0 / (fan_in.max(1) as f32).sqrt()
                }
            }
        }
    }
}

impl Vlm {
    /// Builds the model with deterministic random weights from `seed` ([`Init::FanIn`]).
    pub fn new_random(
        cfg: &LlavaConfig,
        head: Head,
        device: &Device,
        dtype: DType,
        seed: u64,
    ) -> Result<Self> {
        let model = Self::build(cfg, head, device, dtype)?;
        model.init_weights(seed, Init::FanIn)?;
        Ok(model)
    }

    fn build(cfg: &LlavaConfig, head: Head, device: &Device, dtype: DType) -> Result<Self> {
        cfg.validate()?;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, dtype, device);
        let feature_layers = cfg.feature_layer_indices()?;
        // hidden_states[i] is the output of encoder layer i (0 = embeddings), so the deepest
        // selected index is the number of layers that must run.
        let layers_used = feature_layers.iter().copied().max().unwrap_or(0);
        let (vision, frozen_vision) =
            ClipVisionTower::new(&cfg.vision_config, layers_used, vb.pp(VISION_PREFIX))?;
        let vh = cfg.vision_config.hidden_size * feature_layers.len();
        let th = cfg.text_config.hidden_size;
        let pvb = vb.pp(PROJECTOR_PREFIX);
        let projector = (
            linear(
                &pvb.pp("linear_1"),
                vh,
                th,
                cfg.multimodal_projector_bias,
                0.02,
            )?,
            linear(
                &pvb.pp("linear_2"),
                th,
                th,
                cfg.multimodal_projector_bias,
                0.02,
            )?,
        );
        let decoder = Decoder::new(
            &cfg.text_config,
            cfg.tie_word_embeddings(),
            head == Head::LanguageModel,
            vb.pp(TEXT_PREFIX),
        )?;
        let score = match head {
            Head::Scalar => Some(linear(&vb.pp("score"), th, 1, false, 0.02)?),
            Head::LanguageModel => None,
        };
        let frozen_prefixes = frozen_vision
            .into_iter()
            .map(|p| format!("{VISION_PREFIX}.{p}"))
            .collect();
        Ok(Self {
            cfg: cfg.clone(),
            head,
            vision,
            feature_layers,
            projector,
            decoder,
            score,
            varmap,
            frozen_prefixes,
            device: device.clone(),
            dtype,
        })
    }

    /// Builds the model and fills it from a checkpoint directory (see [`crate::checkpoint`]).
    pub fn from_pretrained(
        dir: &std::path::Path,
        head: Head,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let cfg = LlavaConfig::from_file(&dir.join("config.json"))?;
        let model = Self::build(&cfg, head, device, dtype)?;
        crate::checkpoint::load_weights(&model, dir, crate::checkpoint::LoadOptions::strict())?;
        Ok(model)
    }

    /// A discriminator initialised from a student checkpoint: the backbone's weights are the
    /// student's, the LM head is dropped and the scalar head starts at `score_init_std` noise
    /// (seeded) unless the checkpoint already has one.
    pub fn discriminator_from_student(
        dir: &std::path::Path,
        device: &Device,
        dtype: DType,
        seed: u64,
    ) -> Result<(Self, crate::checkpoint::LoadReport)> {
        let cfg = LlavaConfig::from_file(&dir.join("config.json"))?;
        let model = Self::build(&cfg, Head::Scalar, device, dtype)?;
        model.init_weights(seed, Init::FanIn)?;
        let report = crate::checkpoint::load_weights(
            &model,
            dir,
            crate::checkpoint::LoadOptions::discriminator_from_student(),
        )?;
        Ok((model, report))
    }

    pub fn config(&self) -> &LlavaConfig {
        &self.cfg
    }
    pub fn head(&self) -> Head {
        self.head
    }
    pub fn device(&self) -> &Device {
        &self.device
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }
    pub fn n_layers(&self) -> usize {
        self.decoder.n_layers()
    }
    pub fn max_positions(&self) -> usize {
        self.decoder.max_positions()
    }
    pub fn vocab_size(&self) -> usize {
        self.cfg.text_config.vocab_size
    }

    /// Whether a tensor takes part in training (and so must receive a gradient).
    pub fn is_trainable(&self, name: &str) -> bool {
        !self.frozen_prefixes.iter().any(|p| name.starts_with(p))
    }

    /// Every parameter by name (sorted), frozen ones included.
    pub fn named_vars(&self) -> BTreeMap<String, Var> {
        let data = self.varmap.data().lock().expect("varmap lock poisoned");
        data.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// The trainable parameters by name (sorted).
    pub fn trainable_vars(&self) -> BTreeMap<String, Var> {
        self.named_vars()
            .into_iter()
            .filter(|(name, _)| self.is_trainable(name))
            .collect()
    }

    /// Number of parameters (all, frozen included) and of trainable ones.
    pub fn parameter_counts(&self) -> (usize, usize) {
        let mut all = 0;
        let mut trainable = 0;
        for (name, var) in self.named_vars() {
            let n = var.elem_count();
            all += n;
            if self.is_trainable(&name) {
                trainable += n;
            }
        }
        (all, trainable)
    }

    /// Deterministic re-initialisation from `seed`: norms' weights 1, biases 0, the rest drawn
    /// as `init` says.
    pub fn init_weights(&self, seed: u64, init: Init) -> Result<()> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let standard = Normal::new(0.0f32, 1.0).expect("unit normal");
        for (name, var) in self.named_vars() {
            let n = var.elem_count();
            let is_norm = name.ends_with("norm.weight")
                || name.ends_with("layernorm.weight")
                || name.ends_with("layrnorm.weight")
                || name.ends_with("layer_norm1.weight")
                || name.ends_with("layer_norm2.weight");
            let values: Vec<f32> = if is_norm {
                vec![1.0; n]
            } else if name.ends_with(".bias") {
                vec![0.0; n]
            } else {
                let std = init.std_for(&name, var.shape().dims());
                if !(std.is_finite() && std > 0.0) {
                    return Err(ModelError::input(format!(
                        "init std {std} for {name} must be finite and > 0"
                    )));
                }
                (0..n).map(|_| standard.sample(&mut rng) * std).collect()
            };
            let t = Tensor::from_vec(values, var.shape(), &self.device)?.to_dtype(self.dtype)?;
            var.set(&t)?;
        }
        Ok(())
    }

    /// Projected image features `[N, F, d_text]` for pixel values `[N, C, H, W]`.
    pub fn image_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let states = self.vision.hidden_states(pixel_values)?;
        let selected: Vec<Tensor> = self
            .feature_layers
            .iter()
            .map(|&i| states[i].clone())
            .collect();
        let mut feats = Tensor::cat(&selected, 2)?;
        if self.cfg.vision_feature_select_strategy == crate::config::FeatureSelectStrategy::Default
        {
            let n = feats.dim(1)?;
            feats = feats.narrow(1, 1, n - 1)?;
        }
        let h = activate(
            &self.projector.0.forward(&feats)?,
            self.cfg.projector_hidden_act,
        )?;
        self.projector.1.forward(&h)
    }

    /// Input embeddings `[B, T, d]`: token embeddings with every `<image>` token replaced, in
    /// row-major order, by the next image feature.
    pub fn embed(&self, input_ids: &Tensor, pixel_values: Option<&Tensor>) -> Result<Tensor> {
        let (_, t) = input_ids.dims2()?;
        self.embed_host_ids(&input_ids.to_vec2::<u32>()?, t, pixel_values)
    }

    /// [`Vlm::embed`] with the ids already on the host (`ids`, `[B][T]`): where the image
    /// tokens are and whether every id is in the vocabulary is decided there.
    fn embed_host_ids(
        &self,
        ids: &[Vec<u32>],
        t: usize,
        pixel_values: Option<&Tensor>,
    ) -> Result<Tensor> {
        let b = ids.len();
        let image_token = self.cfg.image_token_index;
        let vocab = self.vocab_size() as u32;
        let mut image_positions = Vec::new();
        let mut text_ids = Vec::with_capacity(b * t);
        for (row_index, row) in ids.iter().enumerate() {
            for (col, &id) in row.iter().enumerate() {
                if id == image_token {
                    image_positions.push(row_index * t + col);
                    text_ids.push(0);
                } else if id >= vocab {
                    return Err(ModelError::input(format!(
                        "token id {id} at row {row_index}, position {col} is outside the vocabulary of {vocab}"
                    )));
                } else {
                    text_ids.push(id);
                }
            }
        }
        let text_ids = Tensor::from_vec(text_ids, (b, t), &self.device)?;
        let text = self.decoder.embed_tokens.forward(&text_ids)?;
        let per_image = self.cfg.image_features_per_image();
        match pixel_values {
            None if image_positions.is_empty() => Ok(text),
            None => Err(ModelError::input(format!(
                "the input has {} image tokens but no images",
                image_positions.len()
            ))),
            Some(px) => {
                let n_images = px.dim(0)?;
                if image_positions.len() != n_images * per_image {
                    return Err(ModelError::input(format!(
                        "the input has {} image tokens but {n_images} images give {} features \
                         ({per_image} each): expand each <image> placeholder to {per_image} tokens",
                        image_positions.len(),
                        n_images * per_image
                    )));
                }
                if n_images == 0 {
                    return Ok(text);
                }
                let d = text.dim(2)?;
                let feats = self
                    .image_features(px)?
                    .to_dtype(text.dtype())?
                    .reshape((n_images * per_image, d))?;
                // Gather from [text rows; image rows]: index_select has a backward pass, so both
                // the token embeddings and the vision tower receive gradients.
                let mut gather: Vec<u32> = (0..(b * t) as u32).collect();
                for (k, &p) in image_positions.iter().enumerate() {
                    gather[p] = (b * t + k) as u32;
                }
                let gather = Tensor::from_vec(gather, b * t, &self.device)?;
                let all = Tensor::cat(&[&text.reshape((b * t, d))?, &feats], 0)?;
                Ok(all.index_select(&gather, 0)?.reshape((b, t, d))?)
            }
        }
    }

    /// Final hidden states `[B, T, d]` for the new tokens; appends to `cache` when given.
    pub fn forward_hidden(
        &self,
        input: &ForwardInput<'_>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (b, t) = input.input_ids.dims2()?;
        let cached = cache.as_ref().map_or(0, |c| c.len());
        if input.key_valid.len() != b || input.key_valid.iter().any(|r| r.len() != cached + t) {
            return Err(ModelError::input(format!(
                "key mask must be {b} rows of {} (cache {cached} + {t} new tokens)",
                cached + t
            )));
        }
        // The ids and positions come to the host in one transfer (on a GPU each is a
        // synchronisation): the positions' maximum is checked and the image tokens found there.
        let both = Tensor::cat(&[input.input_ids, input.positions], 1)?.to_vec2::<u32>()?;
        let (ids, positions): (Vec<Vec<u32>>, Vec<&[u32]>) = both
            .iter()
            .map(|row| (row[..t].to_vec(), &row[t..]))
            .unzip();
        let max_pos = positions
            .iter()
            .flat_map(|r| r.iter())
            .copied()
            .max()
            .unwrap_or(0) as usize;
        if max_pos >= self.max_positions() {
            return Err(ModelError::input(format!(
                "position {max_pos} exceeds max_position_embeddings {}",
                self.max_positions()
            )));
        }
        let embeds = self.embed_host_ids(&ids, t, input.pixel_values)?;
        let mask = crate::ops::attention_mask(input.key_valid, t, self.dtype, &self.device)?;
        self.decoder
            .forward_embeds(&embeds, input.positions, &mask, cache)
    }

    /// Vocabulary logits `[B, T, V]` for hidden states `[B, T, d]`.
    pub fn lm_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.decoder.logits(hidden)
    }

    /// The scalar head's logit `[B]` at each row's `last_index` (its last non-pad token).
    pub fn scalar_logits(&self, hidden: &Tensor, last_index: &[usize]) -> Result<Tensor> {
        let score = self
            .score
            .as_ref()
            .ok_or_else(|| ModelError::input("this model has no scalar head"))?;
        let (b, t, d) = hidden.dims3()?;
        if last_index.len() != b || last_index.iter().any(|&i| i >= t) {
            return Err(ModelError::input(format!(
                "last-token indices {last_index:?} do not fit a batch of {b} x {t}"
            )));
        }
        let rows: Vec<u32> = last_index
            .iter()
            .enumerate()
            .map(|(r, &i)| (r * t + i) as u32)
            .collect();
        let rows = Tensor::from_vec(rows, b, &self.device)?;
        let pooled = hidden.reshape((b * t, d))?.index_select(&rows, 0)?;
        Ok(score.forward(&pooled)?.squeeze(1)?)
    }

    /// A fresh KV cache for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.n_layers())
    }

    /// A KV cache preallocated for `capacity` positions.
    pub fn new_cache_with_capacity(&self, capacity: usize) -> KvCache {
        KvCache::with_capacity(self.n_layers(), capacity)
    }

    /// Saves `config.json` and `model.safetensors` in transformers' layout.
    pub fn save_pretrained(&self, dir: &std::path::Path) -> Result<()> {
        crate::checkpoint::save_model(self, dir)
    }
}
