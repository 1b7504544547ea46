//! The domain service: D behind a lock, the judge, and the rules of Score and Train. No tonic
//! types; the gRPC adapter (`grpc`) converts and calls this.
//!
//! Concurrency: D sits behind an `RwLock`. Scoring takes the read lock for the whole forward
//! pass, and a Train computes its loss and gradients under a read lock too (alongside scoring),
//! then takes the write lock only to apply the optimizer step. So scoring never sees a
//! half-applied step, and is held up only for the update itself. Trains are serialised by their
//! own mutex, so nothing changes the weights between a Train's gradients and its step. All model
//! work runs on blocking threads.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use candle_core::Device;
use ril_data::Row;
use tracing::{error, info, warn};

use crate::answer_judge::AnswerJudge;
use crate::error::{DiscriminatorError, Result};
use crate::judge::JudgeError;
use crate::model::{DiscriminatorModel, LabelledResponse, TrainOutcome};
use crate::options::DiscriminatorOptions;
use ril_openai::OpenAiError;

/// Both reward components of one response.
#[derive(Debug, Clone, PartialEq)]
pub struct ResponseScore {
    /// D's P(student | response); the similarity reward is 1 when it is below 0.5.
    pub d_prob: f32,
    /// The judge's answer score in {0, 1}.
    pub answer_score: u8,
    /// `rule` or `llm:<model>`.
    pub judge: String,
    pub extracted_answer: String,
}

/// Scores of a question's responses, in order, and the D step that produced them.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoreOutcome {
    pub scores: Vec<ResponseScore>,
    pub discriminator_step: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscriminatorInfo {
    pub step: u64,
    pub judge: String,
    pub frozen: bool,
    pub last_iteration: Option<u64>,
}

/// D, its judge and its settings, ready to serve.
#[derive(Debug)]
pub struct DiscriminatorService {
    model: Arc<RwLock<DiscriminatorModel>>,
    train_lock: Arc<Mutex<()>>,
    /// D's step, readable without waiting for the model lock.
    step: Arc<AtomicU64>,
    last_iteration: Arc<Mutex<Option<u64>>>,
    /// What the metrics report: responses scored, and the last step's outcome.
    counters: Arc<Counters>,
    judge: AnswerJudge,
    judge_name: String,
    options: DiscriminatorOptions,
}

/// The service's running totals, for its metrics.
#[derive(Debug, Default)]
struct Counters {
    responses_scored: AtomicU64,
    score_calls: AtomicU64,
    items_trained: AtomicU64,
    last_train: Mutex<Option<TrainOutcome>>,
}

fn poisoned<T>(_: T) -> DiscriminatorError {
    DiscriminatorError::Task("the discriminator's lock was poisoned by a panic".into())
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| DiscriminatorError::Task(e.to_string()))?
}

impl DiscriminatorService {
    pub fn new(
        model: DiscriminatorModel,
        judge: AnswerJudge,
        options: DiscriminatorOptions,
    ) -> Self {
        let step = Arc::new(AtomicU64::new(model.step()));
        let last_iteration = Arc::new(Mutex::new(model.last_iteration()));
        Self {
            model: Arc::new(RwLock::new(model)),
            train_lock: Arc::new(Mutex::new(())),
            step,
            last_iteration,
            counters: Arc::default(),
            judge_name: judge.name(),
            judge,
            options,
        }
    }

    /// Loads D (on a blocking thread) and builds the judge client; does not wait for the judge
    /// (see [`Self::wait_for_judge`]).
    pub async fn load(options: DiscriminatorOptions, device: Device) -> Result<Self> {
        options.validate()?;
        let judge = AnswerJudge::new(&options.judge)?;
        let for_load = options.clone();
        let model = blocking(move || DiscriminatorModel::load(&for_load, &device)).await?;
        Ok(Self::new(model, judge, options))
    }

    pub fn options(&self) -> &DiscriminatorOptions {
        &self.options
    }

    pub fn judge(&self) -> &AnswerJudge {
        &self.judge
    }

    /// The model, for callers that need it directly (tests, tools). Hold it briefly.
    pub fn model(&self) -> &Arc<RwLock<DiscriminatorModel>> {
        &self.model
    }

    pub fn info(&self) -> DiscriminatorInfo {
        DiscriminatorInfo {
            step: self.step.load(Ordering::SeqCst),
            judge: self.judge_name.clone(),
            frozen: self.options.frozen,
            last_iteration: self.last_iteration.lock().map(|l| *l).unwrap_or(None),
        }
    }

    /// D's Prometheus metrics: its step, what it scored and trained, the last step's loss,
    /// accuracy and gradient norm.
    pub fn write_metrics(&self, out: &mut ril_proto::metrics::Exposition) {
        let info = self.info();
        out.gauge(
            "ril_discriminator_step",
            "D's optimizer steps so far.",
            info.step as f64,
        );
        if let Some(it) = info.last_iteration {
            out.gauge(
                "ril_discriminator_last_iteration",
                "The iteration D last trained on.",
                it as f64,
            );
        }
        out.gauge(
            "ril_discriminator_frozen",
            "1 when D is frozen (scores, never trains).",
            f64::from(u8::from(info.frozen)),
        );
        let c = &self.counters;
        out.counter(
            "ril_discriminator_score_calls_total",
            "Score calls answered.",
            c.score_calls.load(Ordering::Relaxed) as f64,
        );
        out.counter(
            "ril_discriminator_responses_scored_total",
            "Responses D and the judge scored.",
            c.responses_scored.load(Ordering::Relaxed) as f64,
        );
        out.counter(
            "ril_discriminator_items_trained_total",
            "Labelled responses D took training steps on.",
            c.items_trained.load(Ordering::Relaxed) as f64,
        );
        let last = c.last_train.lock().map(|l| *l).unwrap_or(None);
        if let Some(last) = last {
            out.gauge(
                "ril_discriminator_train_loss",
                "Mean binary cross-entropy of D's last training batch, before the step.",
                f64::from(last.loss),
            );
            out.gauge(
                "ril_discriminator_train_accuracy_ratio",
                "D's accuracy on its last training batch, before the step.",
                f64::from(last.accuracy),
            );
            out.gauge(
                "ril_discriminator_grad_norm",
                "D's global gradient norm before clipping, last step.",
                last.grad_norm,
            );
        }
    }

    /// D's probability and the judge's score for each response to `question`.
    pub async fn score(&self, question: Arc<Row>, responses: Vec<String>) -> Result<ScoreOutcome> {
        if responses.is_empty() {
            return Err(DiscriminatorError::invalid(
                "responses",
                "no responses to score",
            ));
        }
        if responses.len() > self.options.max_responses {
            return Err(DiscriminatorError::invalid(
                "responses",
                format!(
                    "{} responses, more than max_responses = {}",
                    responses.len(),
                    self.options.max_responses
                ),
            ));
        }
        let responses = Arc::new(responses);
        let model = self.model.clone();
        let (row, texts) = (question.clone(), responses.clone());
        let d = blocking(move || {
            let m = model.read().map_err(poisoned)?;
            Ok((m.score(&row, &texts)?, m.step()))
        });
        let judged = self.judge.score(&question, &responses);
        let (d, judged) = tokio::join!(d, judged);
        let (probs, step) = d?;
        let judged = judged?;
        self.counters.score_calls.fetch_add(1, Ordering::Relaxed);
        self.counters
            .responses_scored
            .fetch_add(probs.len() as u64, Ordering::Relaxed);
        Ok(ScoreOutcome {
            scores: probs
                .into_iter()
                .zip(judged)
                .map(|(d_prob, answer)| ResponseScore {
                    d_prob,
                    answer_score: answer.score,
                    judge: self.judge_name.clone(),
                    extracted_answer: answer.extracted_answer,
                })
                .collect(),
            discriminator_step: step,
        })
    }

    /// One training step on the iteration's labelled responses; skipped when the iteration
    /// was already trained or D is frozen. Saves a checkpoint every `save_every` steps (a
    /// failed periodic save is logged, not returned: the step itself happened).
    pub async fn train(
        &self,
        iteration: u64,
        items: Vec<LabelledResponse>,
    ) -> Result<TrainOutcome> {
        if items.is_empty() {
            return Err(DiscriminatorError::invalid(
                "items",
                "no labelled responses",
            ));
        }
        if items.len() > self.options.max_train_items {
            return Err(DiscriminatorError::invalid(
                "items",
                format!(
                    "{} items, more than max_train_items = {}",
                    items.len(),
                    self.options.max_train_items
                ),
            ));
        }
        let model = self.model.clone();
        let train_lock = self.train_lock.clone();
        let step = self.step.clone();
        let last_iteration = self.last_iteration.clone();
        let counters = self.counters.clone();
        let n_items = items.len() as u64;
        let save_every = self.options.save_every;
        let root = self.options.checkpoint_dir.clone();
        blocking(move || {
            let _serialised = train_lock.lock().map_err(poisoned)?;
            let prepared = {
                let m = model.read().map_err(poisoned)?;
                if let Some(skipped) = m.skip(&items, Some(iteration))? {
                    return Ok(skipped);
                }
                m.prepare_step(&items)?
            };
            let outcome = {
                let mut m = model.write().map_err(poisoned)?;
                let lr = m.lr();
                let outcome = m.apply_step(&prepared, lr, Some(iteration))?;
                step.store(outcome.step, Ordering::SeqCst);
                *last_iteration.lock().map_err(poisoned)? = m.last_iteration();
                if !outcome.skipped {
                    counters.items_trained.fetch_add(n_items, Ordering::Relaxed);
                    *counters.last_train.lock().map_err(poisoned)? = Some(outcome);
                }
                outcome
            };
            if let Some(root) = root
                && save_every > 0
                && outcome.step % save_every == 0
            {
                let m = model.read().map_err(poisoned)?;
                if let Err(e) = m.save_checkpoint(&root) {
                    error!(error = %e, step = outcome.step, "periodic discriminator checkpoint failed");
                }
            }
            Ok(outcome)
        })
        .await
    }

    /// Saves a checkpoint to `checkpoint_dir` unless there is none, D is frozen, or the newest
    /// one is already at this step.
    pub async fn save_checkpoint(&self) -> Result<Option<PathBuf>> {
        let Some(root) = self.options.checkpoint_dir.clone() else {
            return Ok(None);
        };
        if self.options.frozen {
            return Ok(None);
        }
        let model = self.model.clone();
        let train_lock = self.train_lock.clone();
        blocking(move || {
            let _serialised = train_lock.lock().map_err(poisoned)?;
            let m = model.read().map_err(poisoned)?;
            if m.step() == 0 {
                return Ok(None);
            }
            m.save_checkpoint(&root)
        })
        .await
    }

    /// Returns once the judge answers a probe, retrying with backoff (the rule judge answers
    /// at once).
    pub async fn wait_for_judge(&self) {
        wait_for_judge(&self.judge).await
    }
}

/// Probes `judge` until it answers.
pub async fn wait_for_judge(judge: &AnswerJudge) {
    let mut delay = Duration::from_millis(500);
    loop {
        match judge.probe().await {
            Ok(()) => {
                info!(judge = %judge.name(), "the judge answers");
                return;
            }
            Err(DiscriminatorError::Judge(e @ JudgeError::Client(OpenAiError::Http { .. }))) => {
                error!(error = %e, retry_in = ?delay, "the judge refuses requests; check its URL, model and key");
            }
            Err(e) => warn!(error = %e, retry_in = ?delay, "the judge does not answer yet"),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}
