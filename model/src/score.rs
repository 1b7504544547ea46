//! Teacher-forced scoring: per-token log-probs and entropies of given responses, and the scalar
//! head's logits. Everything here is differentiable, so the learner and the discriminator train
//! through the same functions the actors and services score with.

use candle_core::{D, DType, Tensor};

use crate::batch::{PadSide, concat_images, pack};
use crate::error::{ModelError, Result};
use crate::ops::log_softmax_last;
use crate::vlm::{ForwardInput, Vlm};

/// A prompt and a response to score under the model.
#[derive(Debug, Clone)]
pub struct ScoreRequest<'a> {
    pub prompt_ids: &'a [u32],
    pub response_ids: &'a [u32],
    /// `[n_images, C, H, W]` for the prompt's `<image>` tokens.
    pub pixel_values: Option<&'a Tensor>,
}

/// Per-token results, `[B, R]` with `R` the longest response; padded entries are 0 and
/// `mask` says which are real.
#[derive(Debug, Clone)]
pub struct TokenScores {
    /// `log softmax(logits / temperature)` of each response token (f32).
    pub logprobs: Tensor,
    /// Entropy of the predictive distribution at each response token (f32).
    pub entropy: Tensor,
    /// 1.0 for real response tokens, 0.0 for padding (f32).
    pub mask: Tensor,
    pub response_lengths: Vec<usize>,
}

impl TokenScores {
    /// Log-probs per response as plain vectors (no padding).
    pub fn logprobs_vec(&self) -> Result<Vec<Vec<f32>>> {
        unpad(&self.logprobs, &self.response_lengths)
    }
    pub fn entropy_vec(&self) -> Result<Vec<Vec<f32>>> {
        unpad(&self.entropy, &self.response_lengths)
    }
}

fn unpad(t: &Tensor, lengths: &[usize]) -> Result<Vec<Vec<f32>>> {
    let rows = t.to_vec2::<f32>()?;
    Ok(rows
        .into_iter()
        .zip(lengths)
        .map(|(mut r, &l)| {
            r.truncate(l);
            r
        })
        .collect())
}

/// Scores `responses` after their prompts. The LM head runs only at the positions that predict
/// response tokens, so long image prompts cost no vocabulary projection.
pub fn score_tokens(
    model: &Vlm,
    requests: &[ScoreRequest<'_>],
    temperature: f64,
) -> Result<TokenScores> {
    if !(temperature.is_finite() && temperature > 0.0) {
        return Err(ModelError::input(format!(
            "scoring temperature {temperature} must be finite and > 0"
        )));
    }
    let sequences: Vec<Vec<u32>> = requests
        .iter()
        .enumerate()
        .map(|(i, r)| {
            if r.prompt_ids.is_empty() {
                return Err(ModelError::input(format!("request {i}: empty prompt")));
            }
            Ok([r.prompt_ids, r.response_ids].concat())
        })
        .collect::<Result<_>>()?;
    let seq_refs: Vec<&[u32]> = sequences.iter().map(|s| s.as_slice()).collect();
    let device = model.device().clone();
    let packed = pack(&seq_refs, 0, PadSide::Right, &device)?;
    let images: Vec<Option<&Tensor>> = requests.iter().map(|r| r.pixel_values).collect();
    let px = concat_images(&images)?;
    let hidden = model.forward_hidden(
        &ForwardInput {
            input_ids: &packed.input_ids,
            positions: &packed.positions,
            key_valid: &packed.key_valid,
            pixel_values: px.as_ref(),
        },
        None,
    )?;
    let (b, t, d) = hidden.dims3()?;
    let lengths: Vec<usize> = requests.iter().map(|r| r.response_ids.len()).collect();
    let r_max = lengths.iter().copied().max().unwrap_or(0).max(1);
    // Row-major [B, R] gather of the hidden states that predict each response token.
    let mut rows = Vec::with_capacity(b * r_max);
    let mut targets = Vec::with_capacity(b * r_max);
    let mut mask = Vec::with_capacity(b * r_max);
    for (i, r) in requests.iter().enumerate() {
        let p = r.prompt_ids.len();
        for j in 0..r_max {
            if j < r.response_ids.len() {
                rows.push((i * t + p + j - 1) as u32);
                targets.push(r.response_ids[j]);
                mask.push(1f32);
            } else {
                rows.push((i * t) as u32);
                targets.push(0);
                mask.push(0f32);
            }
        }
    }
    let rows = Tensor::from_vec(rows, b * r_max, &device)?;
    let targets = Tensor::from_vec(targets, (b * r_max, 1), &device)?;
    let mask = Tensor::from_vec(mask, (b, r_max), &device)?;
    let selected = hidden.reshape((b * t, d))?.index_select(&rows, 0)?;
    let logits = model
        .lm_logits(&selected.unsqueeze(0)?)?
        .squeeze(0)?
        .to_dtype(DType::F32)?;
    let logp = log_softmax_last(&(logits / temperature)?)?;
    let token_lp = logp.gather(&targets, 1)?.reshape((b, r_max))?;
    let entropy = (logp.exp()? * &logp)?
        .sum(D::Minus1)?
        .neg()?
        .reshape((b, r_max))?;
    Ok(TokenScores {
        logprobs: (token_lp * &mask)?,
        entropy: (entropy * &mask)?,
        mask,
        response_lengths: lengths,
    })
}

/// The scalar head's logit for each full sequence (prompt + response) at its last token.
pub fn scalar_scores(model: &Vlm, requests: &[ScoreRequest<'_>]) -> Result<Tensor> {
    let sequences: Vec<Vec<u32>> = requests
        .iter()
        .map(|r| [r.prompt_ids, r.response_ids].concat())
        .collect();
    let seq_refs: Vec<&[u32]> = sequences.iter().map(|s| s.as_slice()).collect();
    let packed = pack(&seq_refs, 0, PadSide::Right, model.device())?;
    let images: Vec<Option<&Tensor>> = requests.iter().map(|r| r.pixel_values).collect();
    let px = concat_images(&images)?;
    let hidden = model.forward_hidden(
        &ForwardInput {
            input_ids: &packed.input_ids,
            positions: &packed.positions,
            key_valid: &packed.key_valid,
            pixel_values: px.as_ref(),
        },
        None,
    )?;
    let last: Vec<usize> = packed.lengths.iter().map(|l| l - 1).collect();
    model.scalar_logits(&hidden, &last)
}
