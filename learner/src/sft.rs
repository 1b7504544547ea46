//! Supervised fine-tuning: next-token loss on the answer tokens of dataset rows (the reference
//! answer, a teacher's answer, or a styled answer), with warm-up + linear or cosine decay,
//! gradient accumulation, validation loss, periodic checkpoints and exact resume.
//!
//! The loss is the mean negative log-likelihood per target token over the whole accumulated
//! batch: micro-batches contribute token *sums* and the gradient is divided once by the total,
//! so accumulation equals one big batch.

use std::path::{Path, PathBuf};
use std::time::Instant;

use ril_data::Row;
use ril_data::dataset::{ReadOptions, ShuffledJsonl, read_all};
use ril_model::bundle::Bundle;
use ril_model::optim::{AdamW, Gradients};
use ril_model::score::{ScoreRequest, score_tokens};
use serde::{Deserialize, Serialize};

use crate::error::{LearnerError, Result};
use ril_prompt::{SupervisedExample, supervised};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Constant,
    Linear,
    Cosine,
}

/// What the model learns to say.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// The row's reference answer, verbatim.
    Reference,
    /// The first answer of this teacher in the row's `teacher_answers`.
    Teacher(String),
    /// The reference answer in a house style (see [`ril_data::style`]).
    Style(ril_data::style::AnswerStyle),
    /// Each row gets one of these targets, drawn with the given weights by a hash of the
    /// row's id (so a row keeps its target across epochs and resumes): e.g. a student that
    /// mostly answers tersely and sometimes reasons first.
    Mixed(Vec<(Target, f64)>),
}

impl Target {
    pub fn text(&self, row: &Row) -> Result<String> {
        match self {
            Self::Reference => Ok(row.answer.clone()),
            Self::Teacher(name) => row
                .teacher_answers
                .get(name)
                .and_then(|a| a.first())
                .cloned()
                .ok_or_else(|| {
                    LearnerError::Invalid(format!(
                        "row {}: no answer from teacher {name:?}",
                        row.id
                    ))
                }),
            Self::Style(style) => Ok(ril_data::style::styled_answer(row, *style)),
            Self::Mixed(choices) => {
                let total: f64 = choices.iter().map(|(_, w)| w).sum();
                let valid = |w: f64| w.is_finite() && w >= 0.0;
                if choices.is_empty()
                    || !valid(total)
                    || total == 0.0
                    || choices.iter().any(|(_, w)| !valid(*w))
                {
                    return Err(LearnerError::Invalid(format!(
                        "mixed target: weights must be non-negative with a positive sum, got {choices:?}"
                    )));
                }
                // FNV-1a of the id: stable across platforms and runs, unlike std's hasher.
                let hash = row.id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                    (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
                });
                let mut point = (hash >> 11) as f64 / (1u64 << 53) as f64 * total;
                for (target, weight) in choices {
                    if point < *weight {
                        return target.text(row);
                    }
                    point -= weight;
                }
                choices[choices.len() - 1].0.text(row)
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SftConfig {
    pub steps: usize,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: usize,
    pub schedule: Schedule,
    pub eval_every: usize,
    pub eval_rows: usize,
    pub save_every: usize,
    pub keep_checkpoints: usize,
    pub log_every: usize,
    pub seed: u64,
    pub target: Target,
    pub skip_bad_rows: bool,
}

impl Default for SftConfig {
    fn default() -> Self {
        Self {
            steps: 200,
            batch_size: 8,
            grad_accum: 1,
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 10,
            schedule: Schedule::Cosine,
            eval_every: 50,
            eval_rows: 100,
            save_every: 100,
            keep_checkpoints: 2,
            log_every: 10,
            seed: 0,
            target: Target::Reference,
            skip_bad_rows: false,
        }
    }
}

impl SftConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(LearnerError::Invalid(format!("sft: {m}")));
        if self.steps == 0 || self.batch_size == 0 || self.grad_accum == 0 {
            return bad("steps, batch_size and grad_accum must be positive");
        }
        if !(self.lr.is_finite() && self.lr > 0.0 && self.min_lr >= 0.0 && self.min_lr <= self.lr) {
            return bad("need lr > 0 and 0 <= min_lr <= lr");
        }
        Ok(())
    }
}

/// The learning rate at `step` (0-based): linear warm-up to `lr`, then constant, linear or
/// cosine decay to `min_lr` at the last step.
pub fn lr_at(cfg: &SftConfig, step: usize) -> f64 {
    if step < cfg.warmup_steps {
        return cfg.lr * (step + 1) as f64 / cfg.warmup_steps as f64;
    }
    let span = cfg.steps.saturating_sub(cfg.warmup_steps).max(1) as f64;
    let progress = ((step - cfg.warmup_steps) as f64 / span).clamp(0.0, 1.0);
    match cfg.schedule {
        Schedule::Constant => cfg.lr,
        Schedule::Linear => cfg.lr + (cfg.min_lr - cfg.lr) * progress,
        Schedule::Cosine => {
            cfg.min_lr
                + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
        }
    }
}

/// Which checkpoints to delete: all but the newest `keep` (by step).
pub fn checkpoints_to_delete(mut steps: Vec<usize>, keep: usize) -> Vec<usize> {
    steps.sort_unstable();
    let n = steps.len().saturating_sub(keep);
    steps.truncate(n);
    steps
}

/// Where training stands; saved with every checkpoint so a resumed run continues exactly.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SftState {
    /// Optimizer steps done.
    pub step: usize,
    pub epoch: u64,
    /// Position in the epoch's shuffled order.
    pub cursor: usize,
    pub last_val_loss: Option<f64>,
}

pub const STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";

impl SftState {
    pub fn load(dir: &Path) -> Result<Self> {
        load_state(dir)
    }
}

/// A checkpoint's `trainer_state.json` (SFT's or the RL learner's state).
pub fn load_state<T: serde::de::DeserializeOwned>(dir: &Path) -> Result<T> {
    let path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&path).map_err(|source| LearnerError::Io {
        path: path.clone(),
        source,
    })?;
    serde_json::from_str(&text)
        .map_err(|e| LearnerError::Invalid(format!("{}: {e}", path.display())))
}

/// Writes a resumable checkpoint directory `dir` whole: the model directory, the optimizer and
/// `state`, staged in a hidden sibling and published with one rename (replacing an older `dir`),
/// so a crash never leaves a half-written checkpoint under a real name.
pub fn write_checkpoint_dir<T: Serialize>(
    bundle: &Bundle,
    optimizer: &AdamW,
    state: &T,
    dir: &Path,
) -> Result<()> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "checkpoint".into());
    let staged = dir.with_file_name(format!(".{name}.tmp"));
    if staged.exists() {
        std::fs::remove_dir_all(&staged).map_err(|source| LearnerError::Io {
            path: staged.clone(),
            source,
        })?;
    }
    bundle.save(&staged)?;
    optimizer.save(&staged.join(OPTIMIZER_FILE))?;
    let text = serde_json::to_string_pretty(state)
        .map_err(|e| LearnerError::Invalid(format!("trainer state: {e}")))?;
    ril_common::fs::write_atomic(&staged.join(STATE_FILE), text.as_bytes())?;
    ril_common::fs::publish_dir(&staged, dir)?;
    Ok(())
}

/// Progress, for progress bars and logs.
#[derive(Debug, Clone)]
pub enum SftEvent {
    Step {
        step: usize,
        total: usize,
        loss: f64,
        lr: f64,
        grad_norm: f64,
        tokens_per_second: f64,
    },
    Eval {
        step: usize,
        val_loss: f64,
    },
    Saved {
        step: usize,
        dir: PathBuf,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct SftSummary {
    pub steps: usize,
    pub first_val_loss: Option<f64>,
    pub final_val_loss: Option<f64>,
    pub final_train_loss: f64,
    pub seconds: f64,
    pub final_dir: PathBuf,
}

/// The training stream: shuffled by (seed, epoch), cycling epochs, resumable at a cursor.
/// JSONL streams from disk (only row offsets in memory); Parquet is read into memory once and
/// shuffled the same way (convert a Parquet set larger than memory to JSONL first).
struct Stream {
    path: PathBuf,
    seed: u64,
    epoch: u64,
    source: Source,
    options: ReadOptions,
}

enum Source {
    Jsonl(ShuffledJsonl),
    Memory {
        rows: Vec<Row>,
        order: Vec<usize>,
        next: usize,
    },
}

fn shuffled_order(n: usize, seed: u64) -> Vec<usize> {
    use rand::SeedableRng;
    use rand::seq::SliceRandom;
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
    order
}

impl Stream {
    fn open(
        path: &Path,
        seed: u64,
        epoch: u64,
        cursor: usize,
        options: ReadOptions,
    ) -> Result<Self> {
        let source = if ril_data::dataset::is_parquet(path) {
            let (rows, _) = read_all(path, options)?;
            let order = shuffled_order(rows.len(), seed.wrapping_add(epoch));
            Source::Memory {
                next: cursor.min(order.len()),
                rows,
                order,
            }
        } else {
            let mut reader = ShuffledJsonl::open(path, Some(seed.wrapping_add(epoch)), options)?;
            reader.seek_to(cursor);
            Source::Jsonl(reader)
        };
        let empty = match &source {
            Source::Jsonl(r) => r.is_empty(),
            Source::Memory { rows, .. } => rows.is_empty(),
        };
        if empty {
            return Err(LearnerError::Invalid(format!(
                "{}: no rows to train on",
                path.display()
            )));
        }
        Ok(Self {
            path: path.to_path_buf(),
            seed,
            epoch,
            source,
            options,
        })
    }

    fn position(&self) -> usize {
        match &self.source {
            Source::Jsonl(r) => r.position(),
            Source::Memory { next, .. } => *next,
        }
    }

    fn next_row(&mut self) -> Result<Row> {
        for _ in 0..2 {
            let row = match &mut self.source {
                Source::Jsonl(r) => r.next().transpose()?,
                Source::Memory { rows, order, next } => {
                    let row = order.get(*next).map(|&i| rows[i].clone());
                    *next += 1;
                    row
                }
            };
            if let Some(row) = row {
                return Ok(row);
            }
            // End of the epoch: the next one, reshuffled. In-memory rows are reshuffled in
            // place; a JSONL file is reopened with the next epoch's order.
            self.epoch += 1;
            let epoch_seed = self.seed.wrapping_add(self.epoch);
            match &mut self.source {
                Source::Memory { rows, order, next } => {
                    *order = shuffled_order(rows.len(), epoch_seed);
                    *next = 0;
                }
                Source::Jsonl(reader) => {
                    *reader = ShuffledJsonl::open(&self.path, Some(epoch_seed), self.options)?;
                }
            }
        }
        Err(LearnerError::Invalid(format!(
            "{}: every row was skipped",
            self.path.display()
        )))
    }
}

/// Sum of target-token negative log-likelihoods of a batch, and the number of target tokens
/// and of all tokens.
pub fn nll_sum(
    bundle: &Bundle,
    batch: &[SupervisedExample],
) -> Result<(candle_core::Tensor, usize, usize)> {
    let requests: Vec<ScoreRequest<'_>> = batch
        .iter()
        .map(|e| ScoreRequest {
            prompt_ids: &e.prompt_ids,
            response_ids: &e.target_ids,
            pixel_values: e.pixel_values.as_ref(),
        })
        .collect();
    let scores = score_tokens(&bundle.model, &requests, 1.0)?;
    let targets: usize = scores.response_lengths.iter().sum();
    let all: usize = batch
        .iter()
        .map(|e| e.prompt_ids.len() + e.target_ids.len())
        .sum();
    Ok((scores.logprobs.sum_all()?.neg()?, targets, all))
}

/// Mean validation loss per target token over already-encoded examples.
pub fn validation_loss(
    bundle: &Bundle,
    examples: &[SupervisedExample],
    batch_size: usize,
) -> Result<f64> {
    let mut total = 0f64;
    let mut tokens = 0usize;
    for batch in examples.chunks(batch_size.max(1)) {
        let (sum, n, _) = nll_sum(bundle, batch)?;
        total += sum.to_scalar::<f32>()? as f64;
        tokens += n;
    }
    Ok(total / tokens.max(1) as f64)
}

/// Saves a resumable checkpoint: the model directory, the optimizer and the trainer state.
pub fn save_checkpoint(
    bundle: &Bundle,
    optimizer: &AdamW,
    state: &SftState,
    dir: &Path,
) -> Result<()> {
    write_checkpoint_dir(bundle, optimizer, state, dir)
}

/// Validation examples, decoded and tokenised once (not at every evaluation).
fn validation_examples(
    bundle: &Bundle,
    val: Option<&Path>,
    cfg: &SftConfig,
    options: ReadOptions,
) -> Result<Vec<SupervisedExample>> {
    let Some(v) = val else {
        return Ok(Vec::new());
    };
    let (mut rows, _) = read_all(v, options)?;
    rows.truncate(cfg.eval_rows);
    rows.iter()
        .map(|r| Ok(supervised(bundle, r, &cfg.target.text(r)?)?))
        .collect()
}

/// One optimizer step over `grad_accum` batches from `stream`; advances `state` and returns
/// the step's loss per target token.
fn sft_step(
    bundle: &Bundle,
    optimizer: &mut AdamW,
    stream: &mut Stream,
    cfg: &SftConfig,
    state: &mut SftState,
    on_event: &mut impl FnMut(&SftEvent),
) -> Result<f64> {
    let step_started = Instant::now();
    let mut grads = Gradients::default();
    let mut loss_sum = 0f64;
    let mut target_tokens = 0usize;
    let mut all_tokens = 0usize;
    for _ in 0..cfg.grad_accum {
        let mut batch = Vec::with_capacity(cfg.batch_size);
        for _ in 0..cfg.batch_size {
            let row = stream.next_row()?;
            batch.push(supervised(bundle, &row, &cfg.target.text(&row)?)?);
        }
        let (sum, n, all) = nll_sum(bundle, &batch)?;
        loss_sum += sum.to_scalar::<f32>()? as f64;
        target_tokens += n;
        all_tokens += all;
        grads.accumulate(&Gradients::backward(&sum, optimizer.params())?, 1.0)?;
    }
    grads.scale(1.0 / target_tokens.max(1) as f64)?;
    let lr = lr_at(cfg, state.step);
    let stats = optimizer.step(&grads, lr)?;
    let loss = loss_sum / target_tokens.max(1) as f64;
    if !loss.is_finite() {
        return Err(LearnerError::Invalid(format!(
            "sft: loss is {loss} at step {}",
            state.step + 1
        )));
    }
    state.step += 1;
    state.epoch = stream.epoch;
    state.cursor = stream.position();
    if state.step.is_multiple_of(cfg.log_every.max(1)) || state.step == cfg.steps {
        on_event(&SftEvent::Step {
            step: state.step,
            total: cfg.steps,
            loss,
            lr,
            grad_norm: stats.grad_norm,
            tokens_per_second: all_tokens as f64 / step_started.elapsed().as_secs_f64(),
        });
    }
    Ok(loss)
}

/// The periodic checkpoint of `state.step`, and the deletion of those beyond
/// `keep_checkpoints` (`saved`: the steps checkpointed so far).
fn save_periodic_checkpoint(
    bundle: &Bundle,
    optimizer: &AdamW,
    state: &SftState,
    out: &Path,
    cfg: &SftConfig,
    saved: &mut Vec<usize>,
    on_event: &mut impl FnMut(&SftEvent),
) -> Result<()> {
    let dir = out.join(format!("checkpoint-{:06}", state.step));
    save_checkpoint(bundle, optimizer, state, &dir)?;
    saved.push(state.step);
    on_event(&SftEvent::Saved {
        step: state.step,
        dir,
    });
    for old in checkpoints_to_delete(saved.clone(), cfg.keep_checkpoints) {
        let dir = out.join(format!("checkpoint-{old:06}"));
        std::fs::remove_dir_all(&dir).map_err(|source| LearnerError::Io { path: dir, source })?;
        saved.retain(|s| *s != old);
    }
    Ok(())
}

/// Runs (or continues, from `state`) supervised fine-tuning of `bundle` on `train`.
pub fn run_sft(
    bundle: &Bundle,
    optimizer: &mut AdamW,
    train: &Path,
    val: Option<&Path>,
    out: &Path,
    cfg: &SftConfig,
    mut state: SftState,
    mut on_event: impl FnMut(&SftEvent),
) -> Result<SftSummary> {
    cfg.validate()?;
    let options = ReadOptions {
        skip_bad_rows: cfg.skip_bad_rows,
    };
    let val_examples = validation_examples(bundle, val, cfg, options)?;
    let mut stream = Stream::open(train, cfg.seed, state.epoch, state.cursor, options)?;
    let started = Instant::now();
    let evaluate = |state: &SftState, on_event: &mut dyn FnMut(&SftEvent)| -> Result<f64> {
        let v = validation_loss(bundle, &val_examples, cfg.batch_size)?;
        on_event(&SftEvent::Eval {
            step: state.step,
            val_loss: v,
        });
        Ok(v)
    };
    let first_val_loss = if val_examples.is_empty() {
        None
    } else {
        Some(evaluate(&state, &mut on_event)?)
    };
    let mut last_loss = f64::NAN;
    let mut saved: Vec<usize> = Vec::new();
    while state.step < cfg.steps {
        last_loss = sft_step(
            bundle,
            optimizer,
            &mut stream,
            cfg,
            &mut state,
            &mut on_event,
        )?;
        if !val_examples.is_empty()
            && cfg.eval_every > 0
            && (state.step.is_multiple_of(cfg.eval_every) || state.step == cfg.steps)
        {
            state.last_val_loss = Some(evaluate(&state, &mut on_event)?);
        }
        if cfg.save_every > 0 && state.step.is_multiple_of(cfg.save_every) && state.step < cfg.steps
        {
            save_periodic_checkpoint(
                bundle,
                optimizer,
                &state,
                out,
                cfg,
                &mut saved,
                &mut on_event,
            )?;
        }
    }
    let final_dir = out.join("final");
    save_checkpoint(bundle, optimizer, &state, &final_dir)?;
    on_event(&SftEvent::Saved {
        step: state.step,
        dir: final_dir.clone(),
    });
    Ok(SftSummary {
        steps: state.step,
        first_val_loss,
        final_val_loss: state.last_val_loss,
        final_train_loss: last_loss,
        seconds: started.elapsed().as_secs_f64(),
        final_dir,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_min_lr() {
        let cfg = SftConfig {
            steps: 110,
            warmup_steps: 10,
            lr: 1.0,
            min_lr: 0.1,
            ..Default::default()
        };
        assert!((lr_at(&cfg, 0) - 0.1).abs() < 1e-12);
        assert!((lr_at(&cfg, 9) - 1.0).abs() < 1e-12);
        assert!((lr_at(&cfg, 10) - 1.0).abs() < 1e-12);
        assert!((lr_at(&cfg, 60) - 0.55).abs() < 1e-12, "cosine midpoint");
        assert!((lr_at(&cfg, 110) - 0.1).abs() < 1e-12);
        let lin = SftConfig {
            schedule: Schedule::Linear,
            ..cfg.clone()
        };
        assert!((lr_at(&lin, 60) - 0.55).abs() < 1e-12);
        assert!((lr_at(&lin, 35) - 0.775).abs() < 1e-12);
        let constant = SftConfig {
            schedule: Schedule::Constant,
            ..cfg
        };
        assert_eq!(lr_at(&constant, 100), 1.0);
    }

    #[test]
    fn a_mixed_target_draws_per_row_stably_with_its_weights() {
        let row = |id: String| Row {
            id,
            images: vec![],
            messages: vec![ril_data::dataset::Message {
                role: "user".into(),
                content: serde_json::Value::String("How many?".into()),
            }],
            answer: "2".into(),
            answer_type: None,
            teacher_answers: Default::default(),
            family: None,
            extra: Default::default(),
        };
        let mixed = Target::Mixed(vec![
            (Target::Reference, 3.0),
            (Target::Style(ril_data::style::AnswerStyle::Reasoned), 1.0),
        ]);
        let texts: Vec<String> = (0..4000)
            .map(|i| mixed.text(&row(format!("row-{i}"))).unwrap())
            .collect();
        let terse = texts.iter().filter(|t| *t == "2").count();
        let reasoned = texts.iter().filter(|t| t.ends_with("\nAnswer: 2")).count();
        assert_eq!(terse + reasoned, texts.len());
        assert!(
            (2850..=3150).contains(&terse),
            "{terse} of 4000 terse for weight 3/4"
        );
        // The same row always gets the same target.
        for i in 0..50 {
            let r = row(format!("row-{i}"));
            assert_eq!(mixed.text(&r).unwrap(), texts[i]);
        }
        for bad in [
            Target::Mixed(vec![]),
            Target::Mixed(vec![(Target::Reference, 0.0)]),
            Target::Mixed(vec![(Target::Reference, f64::NAN)]),
        ] {
            assert!(bad.text(&row("x".into())).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn checkpoint_policy_keeps_the_newest() {
        assert_eq!(checkpoints_to_delete(vec![300, 100, 200], 2), vec![100]);
        assert_eq!(checkpoints_to_delete(vec![100], 2), Vec::<usize>::new());
        assert_eq!(checkpoints_to_delete(vec![1, 2, 3], 0), vec![1, 2, 3]);
    }
}
