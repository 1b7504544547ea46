//! Differentiable building blocks.
//!
//! candle's fused `softmax_last_dim`, `rms_norm`, `layer_norm` and `rope` kernels return no
//! gradient (see STYLE.md); everything here is written with ops that have a backward pass, and
//! the "every trainable tensor gets a gradient" test guards it.

use candle_core::{D, DType, Tensor};

use crate::config::Activation;
use crate::error::Result;

/// A linear layer `y = x W^T + b` over the last dimension of any-rank input.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match *x.dims() {
            [b, t, d] => x
                .reshape((b * t, d))?
                .matmul(&self.weight.t()?)?
                .reshape((b, t, ()))?,
            _ => x.matmul(&self.weight.t()?)?,
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// RMSNorm as Llama computes it: in f32, scaled by the weight in the input's dtype.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x32 = x.to_dtype(DType::F32)?;
    let variance = x32.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = x32.broadcast_div(&(variance + eps)?.sqrt()?)?;
    Ok(normed.to_dtype(dtype)?.broadcast_mul(weight)?)
}

/// LayerNorm over the last dimension, in f32.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x32 = x.to_dtype(DType::F32)?;
    let mean = x32.mean_keepdim(D::Minus1)?;
    let centered = x32.broadcast_sub(&mean)?;
    let variance = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(variance + eps)?.sqrt()?)?;
    Ok(normed
        .to_dtype(dtype)?
        .broadcast_mul(weight)?
        .broadcast_add(bias)?)
}

/// Softmax over the last dimension, computed in f32.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    let x32 = x.to_dtype(DType::F32)?;
    Ok(candle_nn::ops::softmax(&x32, D::Minus1)?.to_dtype(dtype)?)
}

/// Log-softmax over the last dimension, computed in f32 (returns f32).
pub fn log_softmax_last(x: &Tensor) -> Result<Tensor> {
    let x32 = x.to_dtype(DType::F32)?;
    let max = x32.max_keepdim(D::Minus1)?.detach();
    let shifted = x32.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

pub fn activate(x: &Tensor, act: Activation) -> Result<Tensor> {
    Ok(match act {
        Activation::Gelu => x.gelu_erf()?,
        Activation::GeluTanh => x.gelu()?,
        Activation::QuickGelu => {
            // x * sigmoid(1.702 x), written with basic ops so it has a gradient.
            let s = ((x * -1.702)?.exp()? + 1.0)?.recip()?;
            (x * s)?
        }
        Activation::Silu => x.silu()?,
        Activation::Relu => x.relu()?,
    })
}

/// Rotates the two halves of the last dimension: `[-x2, x1]` (transformers' `rotate_half`).
fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    Ok(Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?)
}

/// Rotary embeddings with per-sequence positions (left-padded batches have different ones).
#[derive(Debug, Clone)]
pub struct Rotary {
    /// `[max_positions, head_dim]`: cos and sin of `cat(freqs, freqs)` as transformers builds them.
    cos: Tensor,
    sin: Tensor,
    max_positions: usize,
}

impl Rotary {
    pub fn new(
        theta: f64,
        head_dim: usize,
        max_positions: usize,
        dtype: DType,
        device: &candle_core::Device,
    ) -> Result<Self> {
        let half = head_dim / 2;
        // transformers computes inv_freq in f32 from an int64 arange.
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0f32 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
            .collect();
        let mut cos = Vec::with_capacity(max_positions * head_dim);
        let mut sin = Vec::with_capacity(max_positions * head_dim);
        for p in 0..max_positions {
            let row: Vec<f32> = inv_freq.iter().map(|f| p as f32 * f).collect();
            for _ in 0..2 {
                cos.extend(row.iter().map(|a| a.cos()));
                sin.extend(row.iter().map(|a| a.sin()));
            }
        }
        let cos = Tensor::from_vec(cos, (max_positions, head_dim), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (max_positions, head_dim), device)?.to_dtype(dtype)?;
        Ok(Self {
            cos,
            sin,
            max_positions,
        })
    }

    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// cos/sin for positions `[B, T]` (u32), shaped `[B, 1, T, head_dim]`.
    pub fn tables(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, t) = positions.dims2()?;
        let flat = positions.flatten_all()?;
        let cos = self.cos.index_select(&flat, 0)?.reshape((b, 1, t, ()))?;
        let sin = self.sin.index_select(&flat, 0)?.reshape((b, 1, t, ()))?;
        Ok((cos, sin))
    }

    /// Applies the rotation to `[B, H, T, head_dim]`.
    pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        Ok((x.broadcast_mul(cos)? + rotate_half(x)?.broadcast_mul(sin)?)?)
    }
}

/// A token embedding table.
#[derive(Debug, Clone)]
pub struct Embedding {
    pub weight: Tensor,
}

impl Embedding {
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let shape = ids.dims().to_vec();
        let flat = ids.flatten_all()?;
        let rows = self.weight.index_select(&flat, 0)?;
        let mut out_shape = shape;
        out_shape.push(self.weight.dim(1)?);
        Ok(rows.reshape(out_shape)?)
    }
}

/// The additive attention mask `[B, 1, T, Tk]` for `T` new queries against `Tk` keys (the
/// cache plus the new tokens): key `j` is visible to query `i` when it is not padding and
/// `j <= Tk - T + i`. Masked entries get the dtype's most negative finite value, so a row with
/// nothing visible (a padding query) stays finite instead of turning into NaN.
pub fn attention_mask(
    key_valid: &[Vec<u8>],
    n_queries: usize,
    dtype: DType,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let b = key_valid.len();
    let tk = key_valid.first().map_or(0, |r| r.len());
    let offset = tk - n_queries;
    let neg = match dtype {
        DType::F16 => -65504.0f32,
        DType::BF16 => -3.38e38f32,
        _ => f32::MIN,
    };
    let mut data = vec![0f32; b * n_queries * tk];
    for (bi, row) in key_valid.iter().enumerate() {
        for i in 0..n_queries {
            let base = (bi * n_queries + i) * tk;
            for j in 0..tk {
                if row[j] == 0 || j > offset + i {
                    data[base + j] = neg;
                }
            }
        }
    }
    Ok(Tensor::from_vec(data, (b, 1, n_queries, tk), device)?.to_dtype(dtype)?)
}
