//! Batched sampling with a KV cache kept outside the model: the one sampling loop of ril.
//!
//! [`generate_sequences`] samples a batch in which every sequence has its own settings and its
//! own random stream ([`SequenceSpec`]); [`generate`] is that loop with one set of settings and
//! stream `j` of one seed for sequence `j` ([`sequence_rng`]). A teacher batches unrelated
//! requests and gives answer `i` of a key stream `i` of its seed, so a sequence's sample does
//! not depend on what else is in the batch or on when the others finish.
//!
//! Logits processing follows transformers' `generate` order: repetition penalty, temperature,
//! top-k, top-p.
//!
//! The log-prob returned for each token is `log softmax(logits / temperature)` of the *raw* model
//! logits (no penalty, no truncation): the behaviour policy's probability that scoring the same
//! tokens at the same temperature reproduces (temperature 1 for greedy decoding).

use candle_core::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::batch::{Packed, PadSide, concat_images, pack};
use crate::decoder::KvCache;
use crate::error::{ModelError, Result};
use crate::vlm::{ForwardInput, Vlm};

/// Sampling settings: the workspace's one type for them (`ril-common`), re-exported here
/// where sampling happens.
pub use ril_common::sampling::SamplingParams;

/// One prompt: token ids (with `<image>` placeholders already expanded) and its images.
#[derive(Debug, Clone)]
pub struct Prompt {
    pub token_ids: Vec<u32>,
    /// `[n_images, C, H, W]`.
    pub pixel_values: Option<Tensor>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// A stop token was produced.
    Stop,
    /// `max_new_tokens` was reached.
    Length,
}

/// One generated response.
#[derive(Debug, Clone)]
pub struct Generation {
    pub token_ids: Vec<u32>,
    /// Behaviour log-prob of each generated token (see the module docs).
    pub logprobs: Vec<f32>,
    pub finish_reason: FinishReason,
    /// The raw logits each token was drawn from, when requested (tests, debugging).
    pub step_logits: Option<Vec<Vec<f32>>>,
}

/// How the next token's logits are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeMode {
    /// Prefill once, then one token per step against the cache.
    KvCache,
    /// Run the whole sequence (images included) again at every step: the reference the cache
    /// must reproduce, and the benchmark's baseline.
    Recompute,
}

/// The most prompt tokens (rows x padded width) one prefill forward takes by default: a larger
/// batch's prompts go through the model in chunks of rows and their KV caches are joined. A
/// whole batch of 32 prompts at once costs more per prompt than chunks of a few (the medium
/// preset's prompt pass: 88 ms per prompt at 4 rows, 201 ms at 32; docs/BENCHMARKS.md).
pub const DEFAULT_PREFILL_CHUNK_TOKENS: usize = 768;

#[derive(Debug, Clone, Copy)]
pub struct GenerateOptions {
    pub mode: DecodeMode,
    pub record_logits: bool,
    /// The most prompt tokens one prefill forward takes (with the KV cache); 0: the whole
    /// batch in one forward. The results are the same up to rounding.
    pub prefill_chunk_tokens: usize,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            mode: DecodeMode::KvCache,
            record_logits: false,
            prefill_chunk_tokens: DEFAULT_PREFILL_CHUNK_TOKENS,
        }
    }
}

/// Samples one response per prompt: prompt `j` draws from stream `j` of `params.seed`
/// ([`sequence_rng`]).
pub fn generate(
    model: &Vlm,
    prompts: &[Prompt],
    params: &SamplingParams,
) -> Result<Vec<Generation>> {
    generate_with(model, prompts, params, GenerateOptions::default())
}

/// [`generate`] with a decode mode and logit recording.
pub fn generate_with(
    model: &Vlm,
    prompts: &[Prompt],
    params: &SamplingParams,
    options: GenerateOptions,
) -> Result<Vec<Generation>> {
    params.validate()?;
    let sequences = prompts
        .iter()
        .enumerate()
        .map(|(j, prompt)| SequenceSpec {
            prompt,
            params,
            rng: sequence_rng(params.seed, j as u64),
        })
        .collect();
    generate_sequences(model, sequences, options)
}

/// The random stream `stream` of `seed`: what sequence `stream` of a [`generate`] call draws
/// from, and what a caller gives a sequence whose sample must not depend on its batch (a
/// teacher's answer `i` of a key).
pub fn sequence_rng(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng
}

/// One sequence to sample: its prompt, its own settings and its own random stream, so that
/// what it samples depends on nothing else in the batch.
#[derive(Debug, Clone)]
pub struct SequenceSpec<'a> {
    pub prompt: &'a Prompt,
    pub params: &'a SamplingParams,
    pub rng: ChaCha8Rng,
}

/// Samples every sequence in one batch (prefill once, then one token per step for the
/// sequences still going); the generations come back in the order of `sequences`. Each
/// sequence stops at one of its stop tokens (included in its output) or after its own
/// `max_new_tokens`.
pub fn generate_sequences(
    model: &Vlm,
    sequences: Vec<SequenceSpec<'_>>,
    options: GenerateOptions,
) -> Result<Vec<Generation>> {
    let mut batch = Batch::start(model, sequences, options)?;
    if batch.active.is_empty() {
        return Ok(batch.finish());
    }
    let mut logits = batch.prefill()?;
    loop {
        batch.sample(&logits)?;
        if !batch.drop_finished()? {
            break;
        }
        logits = batch.next_logits()?;
    }
    Ok(batch.finish())
}

struct SequenceState<'a> {
    prompt: &'a Prompt,
    /// The caller's settings with the `<image>` placeholder suppressed.
    params: SamplingParams,
    history: Vec<u32>,
    generation: Generation,
    rng: ChaCha8Rng,
    done: bool,
}

/// A batch being decoded: the sequences, which of them are still running (rows of the KV
/// cache), and the cache's bookkeeping (no cache: [`DecodeMode::Recompute`]).
struct Batch<'m, 'a> {
    model: &'m Vlm,
    states: Vec<SequenceState<'a>>,
    /// Rows of the running batch -> sequence index.
    active: Vec<usize>,
    cache: Option<KvCache>,
    key_valid: Vec<Vec<u8>>,
    next_positions: Vec<u32>,
    prefill_chunk_tokens: usize,
}

impl<'m, 'a> Batch<'m, 'a> {
    /// Checks every sequence's settings and that the longest prompt plus the most new tokens
    /// fits the model.
    fn start(
        model: &'m Vlm,
        sequences: Vec<SequenceSpec<'a>>,
        options: GenerateOptions,
    ) -> Result<Self> {
        // The `<image>` placeholder stands for image features: a sampled one could not be fed
        // back.
        let image_token = model.config().image_token_index;
        let mut states = Vec::with_capacity(sequences.len());
        for spec in sequences {
            spec.params.validate()?;
            let mut params = spec.params.clone();
            if !params.suppress_token_ids.contains(&image_token) {
                params.suppress_token_ids.push(image_token);
            }
            states.push(SequenceState {
                prompt: spec.prompt,
                history: spec.prompt.token_ids.clone(),
                generation: Generation {
                    token_ids: Vec::new(),
                    logprobs: Vec::new(),
                    finish_reason: FinishReason::Length,
                    step_logits: options.record_logits.then(Vec::new),
                },
                rng: spec.rng,
                done: params.max_new_tokens == 0,
                params,
            });
        }
        let longest = states.iter().map(|s| s.history.len()).max().unwrap_or(0);
        let most_new = states
            .iter()
            .map(|s| s.params.max_new_tokens)
            .max()
            .unwrap_or(0);
        if longest + most_new > model.max_positions() {
            return Err(ModelError::input(format!(
                "a prompt of {longest} tokens plus {most_new} new tokens exceeds max_position_embeddings {}",
                model.max_positions()
            )));
        }
        let active = if states.iter().all(|s| s.done) {
            Vec::new()
        } else {
            (0..states.len()).collect()
        };
        let cache = (options.mode == DecodeMode::KvCache)
            .then(|| model.new_cache_with_capacity(longest + most_new));
        Ok(Self {
            model,
            states,
            active,
            cache,
            key_valid: Vec::new(),
            next_positions: Vec::new(),
            prefill_chunk_tokens: options.prefill_chunk_tokens,
        })
    }

    /// The first step's logits: every prompt (images included) through the model once.
    fn prefill(&mut self) -> Result<Vec<Vec<f32>>> {
        let Some(cache) = self.cache.as_mut() else {
            return self.recompute_logits();
        };
        let all: Vec<usize> = (0..self.states.len()).collect();
        let seqs: Vec<&[u32]> = self.states.iter().map(|s| s.history.as_slice()).collect();
        let packed = pack(&seqs, 0, PadSide::Left, self.model.device())?;
        let rows_per_chunk = match self.prefill_chunk_tokens {
            0 => all.len(),
            budget => (budget / packed.width.max(1)).max(1),
        };
        let mut logits = Vec::with_capacity(all.len());
        let mut parts = Vec::new();
        for rows in all.chunks(rows_per_chunk.max(1)) {
            let (first, n) = (rows[0], rows.len());
            let images: Vec<Option<&Tensor>> = rows
                .iter()
                .map(|&s| self.states[s].prompt.pixel_values.as_ref())
                .collect();
            let px = concat_images(&images)?;
            // The batch's cache is still empty here: each chunk fills a part of its shape.
            let mut part = cache.empty_like();
            let hidden = self.model.forward_hidden(
                &ForwardInput {
                    input_ids: &packed.input_ids.narrow(0, first, n)?,
                    positions: &packed.positions.narrow(0, first, n)?,
                    key_valid: &packed.key_valid[first..first + n],
                    pixel_values: px.as_ref(),
                },
                Some(&mut part),
            )?;
            logits.extend(last_logits(self.model, &hidden)?);
            parts.push(part);
        }
        *cache = if parts.len() == 1 {
            parts.pop().expect("one part")
        } else {
            KvCache::join_rows(parts)?
        };
        self.key_valid = packed.key_valid;
        self.next_positions = packed.lengths.iter().map(|&l| l as u32).collect();
        Ok(logits)
    }

    /// Draws the next token of every running sequence from its row of `logits`.
    fn sample(&mut self, logits: &[Vec<f32>]) -> Result<()> {
        for (row, &seq) in self.active.iter().enumerate() {
            let state = &mut self.states[seq];
            if state.done {
                continue;
            }
            let raw = &logits[row];
            let params = &state.params;
            let token = choose_token(raw, &state.history, params, &mut state.rng)?;
            let lp = token_logprob(raw, token, params.logprob_temperature())?;
            state.history.push(token);
            let g = &mut state.generation;
            g.token_ids.push(token);
            g.logprobs.push(lp);
            if let Some(rec) = g.step_logits.as_mut() {
                rec.push(raw.clone());
            }
            if params.stop_token_ids.contains(&token) {
                g.finish_reason = FinishReason::Stop;
                state.done = true;
            } else if g.token_ids.len() >= params.max_new_tokens {
                g.finish_reason = FinishReason::Length;
                state.done = true;
            }
        }
        Ok(())
    }

    /// Drops finished sequences from the running batch (and their rows from the cache).
    /// Returns whether any sequence is still running.
    fn drop_finished(&mut self) -> Result<bool> {
        let keep: Vec<usize> = (0..self.active.len())
            .filter(|&r| !self.states[self.active[r]].done)
            .collect();
        if keep.is_empty() {
            return Ok(false);
        }
        if keep.len() != self.active.len() {
            if let Some(cache) = self.cache.as_mut() {
                let rows: Vec<u32> = keep.iter().map(|&r| r as u32).collect();
                cache.retain_rows(&Tensor::new(rows.as_slice(), self.model.device())?)?;
                self.key_valid = keep.iter().map(|&r| self.key_valid[r].clone()).collect();
                self.next_positions = keep.iter().map(|&r| self.next_positions[r]).collect();
            }
            self.active = keep.iter().map(|&r| self.active[r]).collect();
        }
        Ok(true)
    }

    /// The next step's logits: the last sampled tokens against the cache.
    fn next_logits(&mut self) -> Result<Vec<Vec<f32>>> {
        let Some(cache) = self.cache.as_mut() else {
            return self.recompute_logits();
        };
        let device = self.model.device();
        let b = self.active.len();
        let last: Vec<u32> = self
            .active
            .iter()
            .map(|&s| {
                *self.states[s]
                    .history
                    .last()
                    .expect("a token was just sampled")
            })
            .collect();
        let ids = Tensor::from_vec(last, (b, 1), device)?;
        let positions = Tensor::from_vec(self.next_positions.clone(), (b, 1), device)?;
        for row in self.key_valid.iter_mut() {
            row.push(1);
        }
        let hidden = self.model.forward_hidden(
            &ForwardInput {
                input_ids: &ids,
                positions: &positions,
                key_valid: &self.key_valid,
                pixel_values: None,
            },
            Some(cache),
        )?;
        for p in self.next_positions.iter_mut() {
            *p += 1;
        }
        last_logits(self.model, &hidden)
    }

    /// [`DecodeMode::Recompute`]: the whole of every running sequence through the model.
    fn recompute_logits(&self) -> Result<Vec<Vec<f32>>> {
        let (_, logits) = forward_whole(self.model, &self.states, &self.active, None)?;
        Ok(logits)
    }

    fn finish(self) -> Vec<Generation> {
        self.states.into_iter().map(|s| s.generation).collect()
    }
}

/// The whole of the sequences `rows` (images included) through the model, left-padded into
/// one batch: the packed batch and each row's last logits.
fn forward_whole(
    model: &Vlm,
    states: &[SequenceState<'_>],
    rows: &[usize],
    cache: Option<&mut KvCache>,
) -> Result<(Packed, Vec<Vec<f32>>)> {
    let seqs: Vec<&[u32]> = rows.iter().map(|&s| states[s].history.as_slice()).collect();
    let packed = pack(&seqs, 0, PadSide::Left, model.device())?;
    let images: Vec<Option<&Tensor>> = rows
        .iter()
        .map(|&s| states[s].prompt.pixel_values.as_ref())
        .collect();
    let px = concat_images(&images)?;
    let hidden = model.forward_hidden(
        &ForwardInput {
            input_ids: &packed.input_ids,
            positions: &packed.positions,
            key_valid: &packed.key_valid,
            pixel_values: px.as_ref(),
        },
        cache,
    )?;
    let logits = last_logits(model, &hidden)?;
    Ok((packed, logits))
}

fn last_logits(model: &Vlm, hidden: &Tensor) -> Result<Vec<Vec<f32>>> {
    let t = hidden.dim(1)?;
    let last = hidden.narrow(1, t - 1, 1)?;
    let logits = model.lm_logits(&last)?.squeeze(1)?;
    Ok(logits.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?)
}

/// `log softmax(raw / temperature)[token]`, in f64 for accuracy.
pub fn token_logprob(raw: &[f32], token: u32, temperature: f64) -> Result<f32> {
    let scaled: Vec<f64> = raw.iter().map(|&x| x as f64 / temperature).collect();
    let max = scaled.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !max.is_finite() {
        return Err(ModelError::NonFinite(format!(
            "logits contain non-finite values (max {max})"
        )));
    }
    let lse = max + scaled.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
    Ok((scaled[token as usize] - lse) as f32)
}

/// Applies the logits processors and picks the next token.
fn choose_token(
    raw: &[f32],
    history: &[u32],
    params: &SamplingParams,
    rng: &mut ChaCha8Rng,
) -> Result<u32> {
    if raw.iter().any(|x| x.is_nan()) {
        return Err(ModelError::NonFinite("logits contain NaN".into()));
    }
    let mut logits: Vec<f32> = raw.to_vec();
    if params.repetition_penalty != 1.0 {
        let p = params.repetition_penalty as f32;
        let mut seen = vec![false; logits.len()];
        for &t in history {
            if let Some(s) = seen.get_mut(t as usize)
                && !*s
            {
                *s = true;
                let l = &mut logits[t as usize];
                *l = if *l < 0.0 { *l * p } else { *l / p };
            }
        }
    }
    for &t in &params.suppress_token_ids {
        if let Some(l) = logits.get_mut(t as usize) {
            *l = f32::NEG_INFINITY;
        }
    }
    if params.is_greedy() {
        let (best, _) =
            logits
                .iter()
                .enumerate()
                .fold((0usize, f32::NEG_INFINITY), |acc, (i, &l)| {
                    if l > acc.1 { (i, l) } else { acc }
                });
        return Ok(best as u32);
    }
    let t = params.temperature as f32;
    let mut candidates: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .filter(|(_, l)| l.is_finite())
        .map(|(i, &l)| (i as u32, l / t))
        .collect();
    if candidates.is_empty() {
        return Err(ModelError::NonFinite(
            "every token is suppressed or has -inf logit".into(),
        ));
    }
    let by_logit_desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if params.top_k > 0 && params.top_k < candidates.len() {
        candidates.select_nth_unstable_by(params.top_k - 1, by_logit_desc);
        let kth = candidates[params.top_k - 1].1;
        // transformers keeps every token tied with the k-th.
        let rest: Vec<(u32, f32)> = candidates[params.top_k..]
            .iter()
            .copied()
            .filter(|c| c.1 >= kth)
            .collect();
        candidates.truncate(params.top_k);
        candidates.extend(rest);
    }
    candidates.sort_by(by_logit_desc);
    let max = candidates[0].1;
    let mut probs: Vec<f64> = candidates
        .iter()
        .map(|c| ((c.1 - max) as f64).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if params.top_p < 1.0 {
        // Keep the smallest prefix whose mass reaches top_p (at least one token).
        let mut mass = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            mass += p;
            if mass >= params.top_p {
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
