//! The CLIP vision tower (`CLIPVisionTransformer`), returning the hidden states LLaVA selects.

use candle_core::{DType, Tensor};
use candle_nn::{Init, VarBuilder};

use crate::config::ClipVisionConfig;
use crate::error::Result;
use crate::ops::{Linear, activate, layer_norm, softmax_last};

pub(crate) fn linear(
    vb: &VarBuilder,
    in_dim: usize,
    out_dim: usize,
    bias: bool,
    std: f64,
) -> Result<Linear> {
    let weight = vb.get_with_hints(
        (out_dim, in_dim),
        "weight",
        Init::Randn {
            mean: 0.0,
            stdev: std,
        },
    )?;
    let bias = if bias {
        Some(vb.get_with_hints(out_dim, "bias", Init::Const(0.0))?)
    } else {
        None
    };
    Ok(Linear { weight, bias })
}

#[derive(Debug, Clone)]
pub(crate) struct Norm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl Norm {
    pub(crate) fn new(vb: &VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(dim, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(dim, "bias", Init::Const(0.0))?,
            eps,
        })
    }
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

#[derive(Debug, Clone)]
struct ClipAttention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
    head_dim: usize,
}

impl ClipAttention {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let split = |y: Tensor| -> Result<Tensor> {
            Ok(y.reshape((b, t, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = split((self.q.forward(x)? * (self.head_dim as f64).powf(-0.5))?)?;
        let k = split(self.k.forward(x)?)?;
        let v = split(self.v.forward(x)?)?;
        let scores = q.matmul(&k.t()?)?;
        let probs = softmax_last(&scores)?;
        let y = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, t, self.heads * self.head_dim))?;
        self.out.forward(&y)
    }
}

#[derive(Debug, Clone)]
struct ClipLayer {
    norm1: Norm,
    attn: ClipAttention,
    norm2: Norm,
    fc1: Linear,
    fc2: Linear,
    act: crate::config::Activation,
}

impl ClipLayer {
    fn new(cfg: &ClipVisionConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        let std = 0.02;
        let a = vb.pp("self_attn");
        Ok(Self {
            norm1: Norm::new(&vb.pp("layer_norm1"), d, cfg.layer_norm_eps)?,
            attn: ClipAttention {
                q: linear(&a.pp("q_proj"), d, d, true, std)?,
                k: linear(&a.pp("k_proj"), d, d, true, std)?,
                v: linear(&a.pp("v_proj"), d, d, true, std)?,
                out: linear(&a.pp("out_proj"), d, d, true, std)?,
                heads: cfg.num_attention_heads,
                head_dim: cfg.head_dim(),
            },
            norm2: Norm::new(&vb.pp("layer_norm2"), d, cfg.layer_norm_eps)?,
            fc1: linear(&vb.pp("mlp").pp("fc1"), d, cfg.intermediate_size, true, std)?,
            fc2: linear(&vb.pp("mlp").pp("fc2"), cfg.intermediate_size, d, true, std)?,
            act: cfg.hidden_act,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = (x + self.attn.forward(&self.norm1.forward(x)?)?)?;
        let m = self.fc2.forward(&activate(
            &self.fc1.forward(&self.norm2.forward(&h)?)?,
            self.act,
        )?)?;
        Ok((h + m)?)
    }
}

/// The vision tower. Only the layers up to the deepest selected hidden state are run; the rest
/// (and `post_layernorm`, which LLaVA never uses) are registered so checkpoints round-trip, but
/// are frozen: they cannot influence the output and so can never receive a gradient.
#[derive(Debug, Clone)]
pub struct ClipVisionTower {
    cfg: ClipVisionConfig,
    patch_embedding: Tensor,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_layernorm: Norm,
    layers: Vec<ClipLayer>,
}

impl ClipVisionTower {
    /// `layers_used`: how many encoder layers must run to reach the deepest selected state.
    /// Returns the tower and the names (relative to `vb`) of the frozen, unused tensors.
    pub fn new(
        cfg: &ClipVisionConfig,
        layers_used: usize,
        vb: VarBuilder,
    ) -> Result<(Self, Vec<String>)> {
        let d = cfg.hidden_size;
        let p = cfg.patch_size;
        let emb = vb.pp("embeddings");
        let patch_embedding = emb.get_with_hints(
            (d, cfg.num_channels, p, p),
            "patch_embedding.weight",
            Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
        )?;
        let class_embedding = emb.get_with_hints(
            d,
            "class_embedding",
            Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
        )?;
        let position_embedding = emb.get_with_hints(
            (cfg.num_patches() + 1, d),
            "position_embedding.weight",
            Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
        )?;
        let pre_layernorm = Norm::new(&vb.pp("pre_layrnorm"), d, cfg.layer_norm_eps)?;
        let mut layers = Vec::with_capacity(layers_used);
        let mut frozen = Vec::new();
        let enc = vb.pp("encoder").pp("layers");
        for i in 0..cfg.num_hidden_layers {
            let layer = ClipLayer::new(cfg, enc.pp(i))?;
            if i < layers_used {
                layers.push(layer);
            } else {
                frozen.push(format!("encoder.layers.{i}."));
            }
        }
        Norm::new(&vb.pp("post_layernorm"), d, cfg.layer_norm_eps)?;
        frozen.push("post_layernorm.".to_string());
        Ok((
            Self {
                cfg: cfg.clone(),
                patch_embedding,
                class_embedding,
                position_embedding,
                pre_layernorm,
                layers,
            },
            frozen,
        ))
    }

    /// Hidden states `[embeddings after pre_layrnorm, layer 1, ..., layer L]` for the layers run,
    /// each `[N, 1 + patches, d]`, for pixel values `[N, C, H, W]`.
    pub fn hidden_states(&self, pixel_values: &Tensor) -> Result<Vec<Tensor>> {
        let (n, c, h, w) = pixel_values.dims4()?;
        let p = self.cfg.patch_size;
        let d = self.cfg.hidden_size;
        if c != self.cfg.num_channels || h != self.cfg.image_size || w != self.cfg.image_size {
            return Err(crate::error::ModelError::input(format!(
                "pixel values have shape [{n}, {c}, {h}, {w}], the vision tower expects [N, {}, {}, {}]",
                self.cfg.num_channels, self.cfg.image_size, self.cfg.image_size
            )));
        }
        let (gh, gw) = (h / p, w / p);
        // A stride-p convolution without bias is a matmul over flattened (c, kh, kw) patches.
        let patches = pixel_values
            .to_dtype(self.patch_embedding.dtype())?
            .reshape((n, c, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((n * gh * gw, c * p * p))?;
        let kernel = self.patch_embedding.reshape((d, c * p * p))?;
        let patch_embeds = patches.matmul(&kernel.t()?)?.reshape((n, gh * gw, d))?;
        let cls = self
            .class_embedding
            .reshape((1, 1, d))?
            .broadcast_as((n, 1, d))?;
        let embeds = Tensor::cat(&[&cls, &patch_embeds], 1)?
            .broadcast_add(&self.position_embedding.unsqueeze(0)?)?;
        let mut x = self.pre_layernorm.forward(&embeds)?;
        let mut states = Vec::with_capacity(self.layers.len() + 1);
        states.push(x.clone());
        for layer in &self.layers {
            x = layer.forward(&x)?;
            states.push(x.clone());
        }
        Ok(states)
    }

    pub fn dtype(&self) -> DType {
        self.patch_embedding.dtype()
    }
}
