//! The Llama-style decoder (Llama, Mistral and Qwen2 configs): RMSNorm, rotary embeddings,
//! grouped-query attention, SwiGLU MLP. The KV cache lives outside the model.

use candle_core::Tensor;
use candle_nn::{Init, VarBuilder};

use crate::clip::linear;
use crate::config::{Activation, TextConfig};
use crate::error::Result;
use crate::ops::{Embedding, Linear, Rotary, activate, rms_norm, softmax_last};

/// Keys and values of one layer in preallocated buffers `[B, kv_heads, capacity, head_dim]`;
/// the first `len` positions are valid. Appending writes in place, so a decoding step copies
/// only the new token's keys and values, not the whole cache.
#[derive(Debug, Clone, Default)]
pub struct LayerCache {
    buffers: Option<(Tensor, Tensor)>,
    len: usize,
    capacity_hint: usize,
}

impl LayerCache {
    fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, kv, t, hd) = k.dims4()?;
        let needed = self.len + t;
        let capacity = self
            .buffers
            .as_ref()
            .map_or(0, |(kb, _)| kb.dim(2).unwrap_or(0));
        if needed > capacity {
            let new_capacity = needed.max(self.capacity_hint).max(2 * capacity);
            let kb = Tensor::zeros((b, kv, new_capacity, hd), k.dtype(), k.device())?;
            let vb = Tensor::zeros((b, kv, new_capacity, hd), v.dtype(), v.device())?;
            if let Some((old_k, old_v)) = &self.buffers {
                kb.slice_set(&old_k.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                vb.slice_set(&old_v.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
            }
            self.buffers = Some((kb, vb));
        }
        let (kb, vb) = self.buffers.as_ref().expect("allocated above");
        kb.slice_set(&k.contiguous()?, 2, self.len)?;
        vb.slice_set(&v.contiguous()?, 2, self.len)?;
        self.len = needed;
        Ok((kb.narrow(2, 0, self.len)?, vb.narrow(2, 0, self.len)?))
    }
}

/// The KV cache of a batch of sequences, kept outside the model so one model serves many
/// concurrent generations.
#[derive(Debug, Clone)]
pub struct KvCache {
    pub layers: Vec<LayerCache>,
}

impl KvCache {
    pub fn new(n_layers: usize) -> Self {
        Self::with_capacity(n_layers, 0)
    }

    /// A cache whose buffers are sized for `capacity` positions on first use (prompt plus new
    /// tokens), so generation never reallocates.
    pub fn with_capacity(n_layers: usize, capacity: usize) -> Self {
        Self {
            layers: vec![
                LayerCache {
                    capacity_hint: capacity,
                    ..Default::default()
                };
                n_layers
            ],
        }
    }

    /// An empty cache with this one's layers and capacity (for a part of the batch).
    pub fn empty_like(&self) -> Self {
        Self {
            layers: self
                .layers
                .iter()
                .map(|l| LayerCache {
                    capacity_hint: l.capacity_hint,
                    ..Default::default()
                })
                .collect(),
        }
    }

    /// The caches of consecutive row ranges of one batch, joined into the batch's cache (each
    /// part holds the same positions: the same padded width).
    pub fn join_rows(parts: Vec<KvCache>) -> Result<Self> {
        let Some(first) = parts.first() else {
            return Err(crate::error::ModelError::input("no caches to join"));
        };
        let mut layers = Vec::with_capacity(first.layers.len());
        for i in 0..first.layers.len() {
            let (len, capacity_hint) = (first.layers[i].len, first.layers[i].capacity_hint);
            let mut ks = Vec::with_capacity(parts.len());
            let mut vs = Vec::with_capacity(parts.len());
            for part in &parts {
                let layer = part.layers.get(i).filter(|l| l.len == len).ok_or_else(|| {
                    crate::error::ModelError::input(format!(
                        "cache parts disagree at layer {i}: their lengths or layer counts differ"
                    ))
                })?;
                if let Some((k, v)) = &layer.buffers {
                    ks.push(k);
                    vs.push(v);
                }
            }
            let buffers = if ks.is_empty() {
                None
            } else if ks.len() == parts.len() {
                Some((Tensor::cat(&ks, 0)?, Tensor::cat(&vs, 0)?))
            } else {
                return Err(crate::error::ModelError::input(format!(
                    "cache parts disagree at layer {i}: some hold keys, some do not"
                )));
            };
            layers.push(LayerCache {
                buffers,
                len,
                capacity_hint,
            });
        }
        Ok(Self { layers })
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, |l| l.len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps only the given batch rows (sequences that are still generating).
    pub fn retain_rows(&mut self, rows: &Tensor) -> Result<()> {
        for layer in &mut self.layers {
            if let Some((k, v)) = &layer.buffers {
                layer.buffers = Some((k.index_select(rows, 0)?, v.index_select(rows, 0)?));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
        cache: Option<&mut LayerCache>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let q = self
            .q
            .forward(x)?
            .reshape((b, t, self.heads, self.head_dim))?
            .transpose(1, 2)?;
        let k = self
            .k
            .forward(x)?
            .reshape((b, t, self.kv_heads, self.head_dim))?
            .transpose(1, 2)?;
        let v = self
            .v
            .forward(x)?
            .reshape((b, t, self.kv_heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = Rotary::apply(&q.contiguous()?, cos, sin)?;
        let k = Rotary::apply(&k.contiguous()?, cos, sin)?;
        let (k, v) = match cache {
            Some(cache) => cache.append(&k, &v)?,
            None => (k, v),
        };
        let tk = k.dim(2)?;
        // Grouped-query attention without copying keys and values per query head: the query
        // heads that share a kv head (transformers' `repeat_kv` maps head h to kv head
        // h / n_rep) are stacked along the query axis of that kv head.
        let n_rep = self.heads / self.kv_heads;
        let q = q.reshape((b, self.kv_heads, n_rep * t, self.head_dim))?;
        let scale = (self.head_dim as f64).powf(-0.5);
        let scores = (q.matmul(&k.t()?)? * scale)?
            .reshape((b, self.kv_heads, n_rep, t, tk))?
            .broadcast_add(&mask.unsqueeze(1)?)?
            .reshape((b, self.kv_heads, n_rep * t, tk))?;
        let probs = softmax_last(&scores)?;
        let y = probs
            .matmul(&v)?
            .reshape((b, self.heads, t, self.head_dim))?
            .transpose(1, 2)?
            .reshape((b, t, self.heads * self.head_dim))?;
        self.o.forward(&y)
    }
}

#[derive(Debug, Clone)]
struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
    act: Activation,
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let g = activate(&self.gate.forward(x)?, self.act)?;
        self.down.forward(&(g * self.up.forward(x)?)?)
    }
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    input_norm: Tensor,
    attn: Attention,
    post_norm: Tensor,
    mlp: Mlp,
    eps: f64,
}

impl DecoderLayer {
    fn new(cfg: &TextConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        let hd = cfg.head_dim();
        let std = 0.02;
        let a = vb.pp("self_attn");
        let m = vb.pp("mlp");
        Ok(Self {
            input_norm: vb.get_with_hints(d, "input_layernorm.weight", Init::Const(1.0))?,
            attn: Attention {
                q: linear(
                    &a.pp("q_proj"),
                    d,
                    cfg.num_attention_heads * hd,
                    cfg.qkv_bias(),
                    std,
                )?,
                k: linear(
                    &a.pp("k_proj"),
                    d,
                    cfg.num_kv_heads() * hd,
                    cfg.qkv_bias(),
                    std,
                )?,
                v: linear(
                    &a.pp("v_proj"),
                    d,
                    cfg.num_kv_heads() * hd,
                    cfg.qkv_bias(),
                    std,
                )?,
                o: linear(
                    &a.pp("o_proj"),
                    cfg.num_attention_heads * hd,
                    d,
                    cfg.o_bias(),
                    std,
                )?,
                heads: cfg.num_attention_heads,
                kv_heads: cfg.num_kv_heads(),
                head_dim: hd,
            },
            post_norm: vb.get_with_hints(d, "post_attention_layernorm.weight", Init::Const(1.0))?,
            mlp: Mlp {
                gate: linear(
                    &m.pp("gate_proj"),
                    d,
                    cfg.intermediate_size,
                    cfg.mlp_bias(),
                    std,
                )?,
                up: linear(
                    &m.pp("up_proj"),
                    d,
                    cfg.intermediate_size,
                    cfg.mlp_bias(),
                    std,
                )?,
                down: linear(
                    &m.pp("down_proj"),
                    cfg.intermediate_size,
                    d,
                    cfg.mlp_bias(),
                    std,
                )?,
                act: cfg.hidden_act,
            },
            eps: cfg.rms_norm_eps,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
        cache: Option<&mut LayerCache>,
    ) -> Result<Tensor> {
        let h = (x + self.attn.forward(
            &rms_norm(x, &self.input_norm, self.eps)?,
            cos,
            sin,
            mask,
            cache,
        )?)?;
        let out = (&h
            + self
                .mlp
                .forward(&rms_norm(&h, &self.post_norm, self.eps)?)?)?;
        Ok(out)
    }
}

/// The decoder: `model.*` of `LlamaForCausalLM` plus its LM head.
#[derive(Debug, Clone)]
pub struct Decoder {
    pub(crate) embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: Tensor,
    eps: f64,
    rotary: Rotary,
    /// `None` when tied to the embeddings or when the model has a scalar head instead.
    lm_head: Option<Linear>,
    tied: bool,
}

impl Decoder {
    /// `vb` points at the decoder root (`language_model`); `with_lm_head` is false for the
    /// discriminator, whose head is a scalar.
    pub fn new(cfg: &TextConfig, tied: bool, with_lm_head: bool, vb: VarBuilder) -> Result<Self> {
        let base = vb.pp("model");
        let d = cfg.hidden_size;
        let embed_tokens = Embedding {
            weight: base.get_with_hints(
                (cfg.vocab_size, d),
                "embed_tokens.weight",
                Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            )?,
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::new(cfg, base.pp("layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let norm = base.get_with_hints(d, "norm.weight", Init::Const(1.0))?;
        let lm_head = if with_lm_head && !tied {
            Some(linear(&vb.pp("lm_head"), d, cfg.vocab_size, false, 0.02)?)
        } else {
            None
        };
        let rotary = Rotary::new(
            cfg.rope_theta(),
            cfg.head_dim(),
            cfg.max_position_embeddings,
            vb.dtype(),
            vb.device(),
        )?;
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            eps: cfg.rms_norm_eps,
            rotary,
            lm_head,
            tied: tied && with_lm_head,
        })
    }

    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    pub fn max_positions(&self) -> usize {
        self.rotary.max_positions()
    }

    /// Runs the decoder over input embeddings `[B, T, d]` at positions `[B, T]` (u32) with the
    /// additive mask `[B, 1, T, Tk]`; returns the final-normed hidden states `[B, T, d]`.
    pub fn forward_embeds(
        &self,
        embeds: &Tensor,
        positions: &Tensor,
        mask: &Tensor,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (cos, sin) = self.rotary.tables(positions)?;
        let mut x = embeds.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            x = layer.forward(&x, &cos, &sin, mask, layer_cache)?;
        }
        rms_norm(&x, &self.norm, self.eps)
    }

    /// Vocabulary logits for hidden states `[B, T, d]`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        match (&self.lm_head, self.tied) {
            (Some(head), _) => head.forward(hidden),
            (None, true) => Linear {
                weight: self.embed_tokens.weight.clone(),
                bias: None,
            }
            .forward(hidden),
            (None, false) => Err(crate::error::ModelError::input(
                "this model has a scalar head, not a language-model head",
            )),
        }
    }
}
