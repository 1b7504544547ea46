//! The local-checkpoint backend: a model directory loaded with `ril_model` on its `device`, run by
//! one generation thread that batches requests. The first request of a batch waits up to the
//! batching window for others; the batch closes early when it holds `max_batch` answers. While a
//! batch runs, new requests queue and form the next one.
//!
//! A request for `n` answers is `n` sequences of the same prompt in one
//! `ril_model::generate::generate_sequences` call, each with its request's settings; answer `i`
//! samples from the random stream `i` of the settings' seed (`sequence_rng(seed, i)`), wherever
//! it sits in the batch, so it does not depend on what else was batched with it. One question's
//! bad input (an image that does not decode, a prompt too long) fails that request alone.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use candle_core::DType;
use ril_common::SamplingParams;
use ril_data::Row;
use ril_model::Head;
use ril_model::bundle::Bundle;
use ril_model::generate::{
    FinishReason, GenerateOptions, Prompt, SequenceSpec, generate_sequences, sequence_rng,
};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info, warn};

use crate::error::TeacherError;
use crate::options::CandleOptions;

/// Counters of the generation thread, for tests and logs.
#[derive(Debug, Default)]
pub struct BatchStats {
    batches: AtomicU64,
    sequences: AtomicU64,
}

impl BatchStats {
    /// `generate` calls made (one per batch).
    pub fn batches(&self) -> u64 {
        self.batches.load(Ordering::Relaxed)
    }

    /// Answers generated in them.
    pub fn sequences(&self) -> u64 {
        self.sequences.load(Ordering::Relaxed)
    }
}

struct Job {
    row: Arc<Row>,
    settings: SamplingParams,
    indices: Range<u32>,
    reply: oneshot::Sender<Result<Vec<String>, TeacherError>>,
}

impl Job {
    fn len(&self) -> usize {
        self.indices.len()
    }
}

#[derive(Debug)]
pub struct CandleBackend {
    jobs: std_mpsc::Sender<Job>,
    stats: Arc<BatchStats>,
    checkpoint: PathBuf,
    max_batch: usize,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("id", &self.row.id)
            .field("indices", &self.indices)
            .finish_non_exhaustive()
    }
}

impl CandleBackend {
    /// Loads the checkpoint (on the blocking pool) and starts the generation thread.
    pub async fn load(options: &CandleOptions) -> Result<Self, TeacherError> {
        let dir = options.checkpoint.clone();
        let started = Instant::now();
        let device = options.open_device()?;
        let device_name = ril_model::device::describe(&device);
        let bundle = tokio::task::spawn_blocking(move || {
            Bundle::load(&dir, Head::LanguageModel, &device, DType::F32)
        })
        .await
        .map_err(|e| TeacherError::Internal(format!("checkpoint loading panicked: {e}")))?
        .map_err(|e| TeacherError::Load {
            backend: "candle",
            what: options.checkpoint.display().to_string(),
            reason: crate::error::chain(&e),
        })?;
        info!(checkpoint = %options.checkpoint.display(), device = %device_name, elapsed = ?started.elapsed(), "teacher checkpoint loaded");
        let (jobs, rx) = std_mpsc::channel();
        let stats = Arc::new(BatchStats::default());
        let worker = Worker {
            bundle,
            window: options.batch_window(),
            max_batch: options.max_batch,
            stats: stats.clone(),
        };
        std::thread::Builder::new()
            .name("teacher-generate".into())
            .spawn(move || worker.run(rx))
            .map_err(|e| TeacherError::Load {
                backend: "candle",
                what: options.checkpoint.display().to_string(),
                reason: format!("cannot start the generation thread: {e}"),
            })?;
        Ok(Self {
            jobs,
            stats,
            checkpoint: options.checkpoint.clone(),
            max_batch: options.max_batch,
        })
    }

    pub fn checkpoint(&self) -> &Path {
        &self.checkpoint
    }

    pub fn stats(&self) -> &Arc<BatchStats> {
        &self.stats
    }

    /// Generates answers `indices` of `row` and sends them, in order, to `out`.
    pub async fn generate(
        &self,
        row: Arc<Row>,
        settings: &SamplingParams,
        indices: Range<u32>,
        out: &mpsc::Sender<(u32, String)>,
    ) -> Result<(), TeacherError> {
        // Submit every chunk at once, so that they fill batches back to back.
        let mut replies = Vec::new();
        let mut start = indices.start;
        while start < indices.end {
            let end = indices.end.min(start + self.max_batch as u32);
            let (reply, rx) = oneshot::channel();
            self.jobs
                .send(Job {
                    row: row.clone(),
                    settings: settings.clone(),
                    indices: start..end,
                    reply,
                })
                .map_err(|_| TeacherError::ShuttingDown("the generation thread stopped".into()))?;
            replies.push((start, rx));
            start = end;
        }
        for (start, rx) in replies {
            let texts = rx.await.map_err(|_| {
                TeacherError::Internal(
                    "the generation thread dropped the request (see the server log)".into(),
                )
            })??;
            for (i, text) in texts.into_iter().enumerate() {
                // A closed receiver means nobody wants more answers: stop quietly.
                if out.send((start + i as u32, text)).await.is_err() {
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}

struct Worker {
    bundle: Bundle,
    window: Duration,
    max_batch: usize,
    stats: Arc<BatchStats>,
}

impl Worker {
    fn run(self, rx: std_mpsc::Receiver<Job>) {
        let mut carry: Option<Job> = None;
        loop {
            let first = match carry.take() {
                Some(job) => job,
                None => match rx.recv() {
                    Ok(job) => job,
                    Err(_) => break,
                },
            };
            let mut size = first.len();
            let mut batch = vec![first];
            let deadline = Instant::now() + self.window;
            while size < self.max_batch {
                let now = Instant::now();
                // Past the window, only jobs already queued join.
                let next = if now < deadline {
                    rx.recv_timeout(deadline - now).ok()
                } else {
                    rx.try_recv().ok()
                };
                let Some(job) = next else { break };
                if size + job.len() > self.max_batch {
                    carry = Some(job);
                    break;
                }
                size += job.len();
                batch.push(job);
            }
            // A panic inside the model must not take the thread (and every later request)
            // with it: the batch's requesters see their replies dropped, the next batch runs.
            let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.run_batch(batch);
            }));
            if run.is_err() {
                error!("a teacher batch panicked; its requests fail, the next batch runs");
            }
        }
        debug!("teacher generation thread: every sender is gone; stopping");
    }

    fn run_batch(&self, batch: Vec<Job>) {
        // The jobs whose prompts fit, each with its prompt and its settings (the model's stop
        // tokens end an answer).
        let stop_token_ids = self.bundle.stop_token_ids();
        let mut accepted: Vec<(Job, Prompt, SamplingParams)> = Vec::with_capacity(batch.len());
        for job in batch {
            match self.prompt(&job.row, &job.settings) {
                Ok(prompt) => {
                    let params = SamplingParams {
                        stop_token_ids: stop_token_ids.clone(),
                        ..job.settings.clone()
                    };
                    accepted.push((job, prompt, params));
                }
                Err(e) => {
                    debug!(id = %job.row.id, error = %e, "question rejected");
                    // The requester may have gone; nothing to do then.
                    let _ = job.reply.send(Err(e));
                }
            }
        }
        // Sequence -> its job in `accepted`.
        let mut owners = Vec::new();
        let mut sequences = Vec::new();
        for (j, (job, prompt, params)) in accepted.iter().enumerate() {
            for index in job.indices.clone() {
                sequences.push(SequenceSpec {
                    prompt,
                    params,
                    rng: sequence_rng(params.seed, u64::from(index)),
                });
                owners.push(j);
            }
        }
        if sequences.is_empty() {
            return;
        }
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        self.stats
            .sequences
            .fetch_add(sequences.len() as u64, Ordering::Relaxed);
        let started = Instant::now();
        let n_sequences = sequences.len();
        let outcome = generate_sequences(&self.bundle.model, sequences, GenerateOptions::default());
        debug!(
            jobs = accepted.len(),
            sequences = n_sequences,
            elapsed = ?started.elapsed(),
            "teacher batch generated"
        );
        let mut texts: Vec<Result<Vec<String>, TeacherError>> =
            (0..accepted.len()).map(|_| Ok(Vec::new())).collect();
        match outcome {
            Ok(generations) => {
                for (s, mut generation) in generations.into_iter().enumerate() {
                    let j = owners[s];
                    let Ok(list) = &mut texts[j] else { continue };
                    // An answer ends before its stop token.
                    if generation.finish_reason == FinishReason::Stop {
                        generation.token_ids.pop();
                    }
                    match self.bundle.tokenizer.decode(&generation.token_ids, true) {
                        Ok(text) => list.push(text.trim().to_string()),
                        Err(e) => texts[j] = Err(TeacherError::model(&accepted[j].0.row.id, e)),
                    }
                }
            }
            Err(e) => {
                warn!(error = %e, "teacher batch failed");
                for (j, (job, _, _)) in accepted.iter().enumerate() {
                    texts[j] = Err(TeacherError::Internal(format!(
                        "generation of a batch holding question {:?} failed: {e}",
                        job.row.id
                    )));
                }
            }
        }
        for ((job, _, _), result) in accepted.into_iter().zip(texts) {
            let _ = job.reply.send(result);
        }
    }

    /// The question's generation prompt, checked to fit the model's context.
    fn prompt(&self, row: &Row, settings: &SamplingParams) -> Result<Prompt, TeacherError> {
        ril_prompt::prompt_within_context(&self.bundle, row, settings.max_new_tokens)
            .map_err(|e| TeacherError::model(&e.id, *e.source))
    }
}
