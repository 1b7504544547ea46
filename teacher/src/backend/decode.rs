//! Batched decoding where every sequence has its own sampling settings and its own random
//! stream. `ril_model::generate` gives sequence `j` of a call the stream `j` of one seed, so a
//! sequence's sample would depend on where in a batch it sat; a teacher batches unrelated
//! requests, and answer `i` of a key must be the same whatever else was in its batch. Here the
//! stream of answer `i` with seed `s` is `ChaCha8(s)` stream `i`, wherever it sits.
//!
//! The model side (packing, the KV cache, the forward pass) is `ril_model`'s; only the loop and
//! the logits processing live here. Logits are processed in transformers' order: repetition
//! penalty, temperature, top-k, top-p; temperature 0 is greedy.

use candle_core::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use ril_model::batch::{PadSide, concat_images, pack};
use ril_model::generate::Prompt;
use ril_model::vlm::ForwardInput;
use ril_model::{ModelError, Vlm};

use crate::options::SamplingSettings;

/// One answer to generate.
#[derive(Debug, Clone)]
pub(crate) struct Sequence {
    pub prompt: Prompt,
    pub settings: SamplingSettings,
    /// The answer's index: its random stream.
    pub index: u32,
}

/// The random stream of answer `index` under `seed`.
pub(crate) fn answer_rng(seed: u64, index: u32) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(u64::from(index));
    rng
}

/// Generates every sequence (until a stop token, excluded, or its `max_new_tokens`); returns
/// the generated token ids in the order of `seqs`.
pub(crate) fn generate_sequences(
    model: &Vlm,
    seqs: &[Sequence],
    stop_ids: &[u32],
) -> Result<Vec<Vec<u32>>, ModelError> {
    if seqs.is_empty() {
        return Ok(Vec::new());
    }
    let image_token = model.config().image_token_index;
    let device = model.device().clone();
    let longest = seqs
        .iter()
        .map(|s| s.prompt.token_ids.len())
        .max()
        .unwrap_or(0);
    let most_new = seqs
        .iter()
        .map(|s| s.settings.max_new_tokens as usize)
        .max()
        .unwrap_or(0);
    if longest + most_new > model.max_positions() {
        return Err(ModelError::Input(format!(
            "a prompt of {longest} tokens plus {most_new} new tokens exceeds max_position_embeddings {}",
            model.max_positions()
        )));
    }
    let mut rngs: Vec<ChaCha8Rng> = seqs
        .iter()
        .map(|s| answer_rng(s.settings.seed, s.index))
        .collect();
    let mut histories: Vec<Vec<u32>> = seqs.iter().map(|s| s.prompt.token_ids.clone()).collect();
    let mut outputs: Vec<Vec<u32>> = vec![Vec::new(); seqs.len()];
    let mut done: Vec<bool> = seqs
        .iter()
        .map(|s| s.settings.max_new_tokens == 0)
        .collect();

    let tokens: Vec<&[u32]> = seqs.iter().map(|s| s.prompt.token_ids.as_slice()).collect();
    let packed = pack(&tokens, 0, PadSide::Left, &device)?;
    let images: Vec<Option<&Tensor>> = seqs
        .iter()
        .map(|s| s.prompt.pixel_values.as_ref())
        .collect();
    let pixel_values = concat_images(&images)?;
    let mut cache = model.new_cache_with_capacity(longest + most_new);
    let hidden = model.forward_hidden(
        &ForwardInput {
            input_ids: &packed.input_ids,
            positions: &packed.positions,
            key_valid: &packed.key_valid,
            pixel_values: pixel_values.as_ref(),
        },
        Some(&mut cache),
    )?;
    let mut key_valid = packed.key_valid;
    let mut next_positions: Vec<u32> = packed.lengths.iter().map(|&l| l as u32).collect();
    let mut logits = last_logits(model, &hidden)?;
    // Rows of the running batch -> sequence index.
    let mut active: Vec<usize> = (0..seqs.len()).collect();
    loop {
        for (row, &s) in active.iter().enumerate() {
            if done[s] {
                continue;
            }
            let settings = &seqs[s].settings;
            let token = sample_token(
                &logits[row],
                &histories[s],
                settings,
                image_token,
                &mut rngs[s],
            )?;
            histories[s].push(token);
            if stop_ids.contains(&token) {
                done[s] = true;
            } else {
                outputs[s].push(token);
                done[s] = outputs[s].len() >= settings.max_new_tokens as usize;
            }
        }
        let keep: Vec<usize> = (0..active.len()).filter(|&r| !done[active[r]]).collect();
        if keep.is_empty() {
            break;
        }
        if keep.len() != active.len() {
            let rows: Vec<u32> = keep.iter().map(|&r| r as u32).collect();
            cache.retain_rows(&Tensor::new(rows.as_slice(), &device)?)?;
            key_valid = keep.iter().map(|&r| key_valid[r].clone()).collect();
            next_positions = keep.iter().map(|&r| next_positions[r]).collect();
            active = keep.iter().map(|&r| active[r]).collect();
        }
        let b = active.len();
        let last: Vec<u32> = active
            .iter()
            .map(|&s| *histories[s].last().expect("a token was just sampled"))
            .collect();
        let ids = Tensor::from_vec(last, (b, 1), &device)?;
        let positions = Tensor::from_vec(next_positions.clone(), (b, 1), &device)?;
        for row in key_valid.iter_mut() {
            row.push(1);
        }
        let hidden = model.forward_hidden(
            &ForwardInput {
                input_ids: &ids,
                positions: &positions,
                key_valid: &key_valid,
                pixel_values: None,
            },
            Some(&mut cache),
        )?;
        for p in next_positions.iter_mut() {
            *p += 1;
        }
        logits = last_logits(model, &hidden)?;
    }
    Ok(outputs)
}

fn last_logits(model: &Vlm, hidden: &Tensor) -> Result<Vec<Vec<f32>>, ModelError> {
    let t = hidden.dim(1)?;
    let last = hidden.narrow(1, t - 1, 1)?;
    let logits = model.lm_logits(&last)?.squeeze(1)?;
    Ok(logits.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?)
}

/// Processes one step's raw logits and draws the next token.
pub(crate) fn sample_token(
    raw: &[f32],
    history: &[u32],
    settings: &SamplingSettings,
    suppressed: u32,
    rng: &mut ChaCha8Rng,
) -> Result<u32, ModelError> {
    if raw.iter().any(|x| x.is_nan()) {
        return Err(ModelError::NonFinite("logits contain NaN".into()));
    }
    let mut logits = raw.to_vec();
    let penalty = settings.repetition_penalty;
    if penalty != 1.0 {
        let mut seen = vec![false; logits.len()];
        for &t in history {
            if let Some(s) = seen.get_mut(t as usize)
                && !*s
            {
                *s = true;
                let l = &mut logits[t as usize];
                *l = if *l < 0.0 { *l * penalty } else { *l / penalty };
            }
        }
    }
    if let Some(l) = logits.get_mut(suppressed as usize) {
        *l = f32::NEG_INFINITY;
    }
    let mut candidates: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .filter(|(_, l)| l.is_finite())
        .map(|(i, &l)| (i as u32, l))
        .collect();
    if candidates.is_empty() {
        return Err(ModelError::NonFinite(
            "every token is suppressed or has a -inf logit".into(),
        ));
    }
    // Highest logit first; ties by the lower id, so the order is total and reproducible.
    let descending = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if settings.temperature == 0.0 {
        let best = candidates
            .iter()
            .copied()
            .min_by(descending)
            .expect("non-empty");
        return Ok(best.0);
    }
    for c in candidates.iter_mut() {
        c.1 /= settings.temperature;
    }
    let k = settings.top_k as usize;
    if k > 0 && k < candidates.len() {
        candidates.select_nth_unstable_by(k - 1, descending);
        let kth = candidates[k - 1].1;
        // Every token tied with the k-th stays, as in transformers.
        let tied: Vec<(u32, f32)> = candidates[k..]
            .iter()
            .copied()
            .filter(|c| c.1 >= kth)
            .collect();
        candidates.truncate(k);
        candidates.extend(tied);
    }
    candidates.sort_by(descending);
    let max = candidates[0].1;
    let mut probs: Vec<f64> = candidates
        .iter()
        .map(|c| f64::from(c.1 - max).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if settings.top_p < 1.0 {
        // The smallest prefix whose mass reaches top_p (at least one token).
        let mut mass = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            mass += p;
            if mass >= f64::from(settings.top_p) {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        candidates.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
    }
    let u: f64 = rng.random::<f64>();
    let mut acc = 0.0;
    for (c, p) in candidates.iter().zip(&probs) {
        acc += p;
        if u < acc {
            return Ok(c.0);
        }
    }
    Ok(candidates.last().expect("non-empty").0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(temperature: f32, top_k: u32, top_p: f32) -> SamplingSettings {
        SamplingSettings {
            temperature,
            top_p,
            top_k,
            repetition_penalty: 1.0,
            max_new_tokens: 1,
            seed: 0,
        }
    }

    #[test]
    fn greedy_top_k_and_suppression() {
        let logits = [0.0, 3.0, 1.0, 2.0];
        let mut rng = answer_rng(0, 0);
        // Greedy picks the best token that is not suppressed.
        assert_eq!(
            sample_token(&logits, &[], &settings(0.0, 0, 1.0), 9, &mut rng).unwrap(),
            1
        );
        assert_eq!(
            sample_token(&logits, &[], &settings(0.0, 0, 1.0), 1, &mut rng).unwrap(),
            3
        );
        // top_k 1 at any temperature is greedy.
        for _ in 0..20 {
            assert_eq!(
                sample_token(&logits, &[], &settings(2.0, 1, 1.0), 9, &mut rng).unwrap(),
                1
            );
        }
        // A repetition penalty pushes a seen token below the next.
        let s = SamplingSettings {
            repetition_penalty: 2.0,
            ..settings(0.0, 0, 1.0)
        };
        assert_eq!(sample_token(&logits, &[1], &s, 9, &mut rng).unwrap(), 3);
        assert!(sample_token(&[f32::NAN], &[], &s, 9, &mut rng).is_err());
    }

    #[test]
    fn answer_streams_are_distinct_and_reproducible() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.1).collect();
        let draw = |seed, index| {
            let mut rng = answer_rng(seed, index);
            (0..16)
                .map(|_| sample_token(&logits, &[], &settings(1.0, 0, 1.0), 99, &mut rng).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(5, 0), draw(5, 0));
        assert_ne!(draw(5, 0), draw(5, 1));
        assert_ne!(draw(5, 0), draw(6, 0));
    }
}
