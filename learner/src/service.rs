//! The learner as a service, without gRPC types: groups come in, are checked against the model,
//! committed with the coordinator, buffered per iteration, and trained on once the iteration has
//! its B groups; each update publishes a new policy version and its weights.
//!
//! Protocol with the coordinator (through [`CoordinatorLink`]):
//! - every group that passes validation is committed with `AcceptGroup` before it is buffered; a
//!   refusal (duplicate, unknown position, ...) becomes the group's verdict;
//! - a committed group the learner cannot use (too stale, its iteration already trained, the
//!   learner shutting down) is handed back with `ReturnQuestion`, so the coordinator must reopen
//!   that position;
//! - after each update: `PublishVersion(v + 1, iteration v, checkpoint if one was written)` and
//!   `ReportMetrics`. The new weights are served before the version is published.
//!
//! Staleness (bound k): a group is stale when one of its student responses was sampled with a
//! version older than `current - k`. Groups of up to k iterations ahead are buffered, and checked
//! again when their iteration comes up.
//!
//! Several ranks (world_size R > 1): rank 0 alone takes groups, commits, publishes, reports,
//! drives the discriminator and writes checkpoints. When an iteration is complete it sorts the
//! groups by position, gives group i to rank i % R, sends ranks 1..R their shards through
//! [`ShardPeers`] (concurrently) and trains shard 0 itself; every rank's step (an empty shard
//! included) meets the others' in the collective. Ranks > 0 train what they are sent
//! ([`LearnerService::train_shard`]) and keep their version in step. All ranks compare their
//! weights' SHA-256 at start and every `verify_every` versions.
//!
//! A failed training step (e.g. a non-finite loss) leaves the weights as they were and stops the
//! learner: it refuses further groups and [`Progress::failed`] says why, so the process can exit
//! and be resumed from its last checkpoint.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use ril_data::Row;
use ril_model::bundle::Bundle;
use ril_model::image::ImageProcessor;
use ril_model::tokenizer::expand_image_tokens;
use ril_model::{ChatTokenizer, LlavaConfig};
use tokio::sync::watch;

use crate::error::{LearnerError, Result};
use crate::grpo::{Group, Response, ResponseSource};
use crate::options::LearnerOptions;
use crate::trainer::{Trainer, WeightsPayload};
use ril_prompt::row_messages;

/// A group as it arrives: converted from the wire, not yet checked against the model.
#[derive(Debug, Clone)]
pub struct IncomingGroup {
    pub lease_id: String,
    pub position: u64,
    pub iteration: u64,
    /// The question (with its images) as a dataset row.
    pub row: Row,
    /// The prompt as the actor tokenised it (image placeholders expanded). Empty: the learner
    /// renders it from `row` with the student's chat template.
    pub prompt_ids: Vec<u32>,
    pub responses: Vec<Response>,
    pub actor_id: String,
    /// The actor's phase timings, averaged into the step metrics as `actor_<phase>_ms`.
    pub timings_ms: BTreeMap<String, f64>,
}

/// Why a group was not taken: names the position and the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("group at position {position}: field `{field}`: {problem}")]
pub struct Rejection {
    pub position: u64,
    pub field: String,
    pub problem: String,
}

impl Rejection {
    pub fn new(position: u64, field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            position,
            field: field.into(),
            problem: problem.into(),
        }
    }
}

/// The answer to one pushed group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub position: u64,
    pub accepted: bool,
    pub reason: String,
}

impl Verdict {
    fn accepted(position: u64) -> Self {
        Self {
            position,
            accepted: true,
            reason: String::new(),
        }
    }
    fn refused(position: u64, reason: impl Into<String>) -> Self {
        Self {
            position,
            accepted: false,
            reason: reason.into(),
        }
    }
}

/// What identifies a group to the coordinator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupKey {
    pub lease_id: String,
    pub position: u64,
    pub question_id: String,
    pub iteration: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acceptance {
    Accepted,
    Refused(String),
}

/// The coordinator RPCs the learner makes (the gRPC client in `grpc`, fakes in tests).
pub trait CoordinatorLink: Send + Sync + 'static {
    fn accept_group(&self, key: GroupKey) -> impl Future<Output = Result<Acceptance>> + Send;
    fn return_question(
        &self,
        position: u64,
        reason: String,
    ) -> impl Future<Output = Result<()>> + Send;
    fn publish_version(
        &self,
        version: u64,
        iteration: u64,
        checkpoint: Option<PathBuf>,
    ) -> impl Future<Output = Result<()>> + Send;
    fn report_metrics(
        &self,
        iteration: u64,
        metrics: BTreeMap<String, f64>,
    ) -> impl Future<Output = Result<()>> + Send;
    /// Called once an iteration has trained, before its version is published: the
    /// discriminator's update on that iteration's responses (RIL's mu = 1 step per iteration),
    /// so every group of the next version is scored by the updated D. Returns metrics to report.
    fn after_iteration(
        &self,
        _iteration: u64,
    ) -> impl Future<Output = Result<BTreeMap<String, f64>>> + Send {
        async { Ok(BTreeMap::new()) }
    }
}

/// Rank 0's line to the other learner ranks (the gRPC client in `grpc`): each takes its shard
/// of an iteration (possibly empty) and trains on it; its step joins rank 0's in the gradient
/// all-reduce. Resolves with the rank's new policy version once its step is done.
pub trait ShardPeers: Send + Sync + 'static {
    fn train_shard(
        &self,
        rank: u32,
        iteration: u64,
        groups: Vec<IncomingGroup>,
    ) -> Pin<Box<dyn Future<Output = Result<u64>> + Send + '_>>;
}

/// Group `i` of an iteration (in position order) goes to rank `i % world_size`.
pub fn shard_of(index: usize, world_size: u32) -> usize {
    index % world_size.max(1) as usize
}

/// Checks incoming groups against the model and turns them into model inputs. Holds copies of
/// the tokenizer, image processor and config so groups are checked while a step trains.
#[derive(Debug, Clone)]
pub struct GroupPreparer {
    cfg: LlavaConfig,
    tokenizer: ChatTokenizer,
    processor: ImageProcessor,
    device: Device,
    dtype: DType,
    max_positions: usize,
    teachers_in_group: bool,
}

impl GroupPreparer {
    pub fn new(bundle: &Bundle, teachers_in_group: bool) -> Self {
        Self {
            cfg: bundle.model.config().clone(),
            tokenizer: bundle.tokenizer.clone(),
            processor: bundle.processor.clone(),
            device: bundle.model.device().clone(),
            dtype: bundle.model.dtype(),
            max_positions: bundle.model.max_positions(),
            teachers_in_group,
        }
    }

    /// Validates `g` and builds its model inputs (prompt ids, pixel values).
    pub fn prepare(&self, g: &IncomingGroup) -> std::result::Result<Group, Rejection> {
        let p = g.position;
        let vocab = self.cfg.text_config.vocab_size;
        let image_token = self.cfg.image_token_index;
        if g.responses.is_empty() {
            return Err(Rejection::new(p, "responses", "no responses"));
        }
        let in_loss_count = g
            .responses
            .iter()
            .filter(|r| r.source == ResponseSource::Student || self.teachers_in_group)
            .count();
        if in_loss_count == 0 {
            return Err(Rejection::new(
                p,
                "responses",
                "no student responses (teacher responses are not trained on in this run: \
                 teachers_in_group = false)",
            ));
        }
        let prompt_ids = if g.prompt_ids.is_empty() {
            let ids = self
                .tokenizer
                .apply_chat_template(&row_messages(&g.row), true)
                .map_err(|e| Rejection::new(p, "question.messages", e.to_string()))?;
            expand_image_tokens(&ids, image_token, self.cfg.image_features_per_image())
        } else {
            g.prompt_ids.clone()
        };
        if let Some((j, &t)) = prompt_ids
            .iter()
            .enumerate()
            .find(|(_, t)| **t as usize >= vocab)
        {
            return Err(Rejection::new(
                p,
                format!("prompt_token_ids[{j}]"),
                format!("token id {t} is not below the vocabulary size {vocab}"),
            ));
        }
        let placeholders = prompt_ids.iter().filter(|&&t| t == image_token).count();
        let expected = g.row.images.len() * self.cfg.image_features_per_image();
        if placeholders != expected {
            return Err(Rejection::new(
                p,
                "prompt_token_ids",
                format!(
                    "{placeholders} image placeholder tokens, but the question's {} images need \
                     {expected} ({} per image)",
                    g.row.images.len(),
                    self.cfg.image_features_per_image()
                ),
            ));
        }
        for (i, r) in g.responses.iter().enumerate() {
            let field = |f: &str| format!("responses[{i}].{f}");
            if let Some((j, &t)) = r
                .token_ids
                .iter()
                .enumerate()
                .find(|(_, t)| **t as usize >= vocab || **t == image_token)
            {
                let problem = if t == image_token {
                    format!("token id {t} is the image placeholder, which a response cannot hold")
                } else {
                    format!("token id {t} is not below the vocabulary size {vocab}")
                };
                return Err(Rejection::new(
                    p,
                    format!("responses[{i}].token_ids[{j}]"),
                    problem,
                ));
            }
            if prompt_ids.len() + r.token_ids.len() > self.max_positions {
                return Err(Rejection::new(
                    p,
                    field("token_ids"),
                    format!(
                        "prompt ({}) + response ({}) tokens exceed max_position_embeddings {}",
                        prompt_ids.len(),
                        r.token_ids.len(),
                        self.max_positions
                    ),
                ));
            }
            if r.source == ResponseSource::Student {
                if r.behaviour_logprobs.len() != r.token_ids.len() {
                    return Err(Rejection::new(
                        p,
                        field("behaviour_logprobs"),
                        format!(
                            "{} log-probs for {} token ids (a student response needs one per token)",
                            r.behaviour_logprobs.len(),
                            r.token_ids.len()
                        ),
                    ));
                }
                if let Some((j, v)) = r
                    .behaviour_logprobs
                    .iter()
                    .enumerate()
                    .find(|(_, v)| !v.is_finite())
                {
                    return Err(Rejection::new(
                        p,
                        format!("responses[{i}].behaviour_logprobs[{j}]"),
                        format!("{v} is not finite"),
                    ));
                }
            }
            for (name, v) in [("r_sim", r.r_sim), ("r_ans", r.r_ans), ("d_prob", r.d_prob)] {
                if !v.is_finite() {
                    return Err(Rejection::new(p, field(name), format!("{v} is not finite")));
                }
            }
        }
        let pixel_values = self.pixel_values(&g.row).map_err(|(k, e)| {
            Rejection::new(
                p,
                format!("question.images[{k}]"),
                format!("question {:?}: {e}", g.row.id),
            )
        })?;
        Ok(Group {
            position: p,
            prompt_ids,
            pixel_values,
            responses: g.responses.clone(),
        })
    }

    fn pixel_values(
        &self,
        row: &Row,
    ) -> std::result::Result<Option<Tensor>, (usize, ril_model::ModelError)> {
        if row.images.is_empty() {
            return Ok(None);
        }
        let mut tensors = Vec::with_capacity(row.images.len());
        for (k, im) in row.images.iter().enumerate() {
            tensors.push(
                self.processor
                    .preprocess_bytes(&im.bytes, &im.name, &self.device)
                    .map_err(|e| (k, e))?,
            );
        }
        let stacked = Tensor::stack(&tensors, 0)
            .and_then(|t| t.to_dtype(self.dtype))
            .map_err(|e| (0, e.into()))?;
        Ok(Some(stacked))
    }
}

/// Where the learner stands, for waiting on (tests, `serve`) and for status.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    pub version: u64,
    pub iteration: u64,
    /// A step is running.
    pub training: bool,
    /// `total_iterations` reached.
    pub finished: bool,
    /// A training step failed; the learner takes no more groups.
    pub failed: Option<String>,
    pub groups_buffered: usize,
    pub stale_groups_dropped: u64,
    pub groups_refused: u64,
    /// The newest checkpoint written by this process.
    pub last_checkpoint: Option<PathBuf>,
}

/// What `Info` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LearnerInfo {
    pub policy_version: u64,
    pub iteration: u64,
    pub rank: u32,
    pub world_size: u32,
    pub weights_bytes: u64,
    pub weights_sha256: String,
}

#[derive(Debug)]
struct Buffered {
    group: Group,
    /// The group as it came (with the prompt the learner trained on), kept to send it to
    /// another rank; only with world_size > 1.
    incoming: Option<IncomingGroup>,
    key: GroupKey,
    oldest_student_version: Option<u64>,
    timings_ms: BTreeMap<String, f64>,
}

#[derive(Debug)]
struct Pending {
    version: u64,
    iteration: u64,
    buffers: BTreeMap<u64, Vec<Buffered>>,
    training: bool,
    closing: bool,
    failed: Option<String>,
    stale_groups_dropped: u64,
    groups_refused: u64,
    last_checkpoint: Option<PathBuf>,
}

struct Inner<C> {
    link: C,
    options: LearnerOptions,
    preparer: GroupPreparer,
    trainer: Arc<Mutex<Trainer>>,
    peers: Option<Arc<dyn ShardPeers>>,
    pending: Mutex<Pending>,
    weights: RwLock<Arc<WeightsPayload>>,
    progress: watch::Sender<Progress>,
    /// D collapse, reward hacking, KL blow-up, entropy collapse: warned about as they begin.
    diagnostics: Mutex<crate::diagnostics::Diagnostics>,
}

/// The learner service. Cheap to clone (shared state).
pub struct LearnerService<C: CoordinatorLink> {
    inner: Arc<Inner<C>>,
}

impl<C: CoordinatorLink> Clone for LearnerService<C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<C: CoordinatorLink> std::fmt::Debug for LearnerService<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LearnerService")
            .field("progress", &*self.inner.progress.borrow())
            .finish_non_exhaustive()
    }
}

/// Whether all ranks compare their weights after reaching `version`.
fn verify_due(verify_every: u64, version: u64) -> bool {
    verify_every > 0 && version.is_multiple_of(verify_every)
}

fn poisoned() -> LearnerError {
    LearnerError::Failed("a learner thread panicked while holding the trainer".into())
}

impl<C: CoordinatorLink> LearnerService<C> {
    /// Wraps an opened trainer. Serialises the current weights (CPU work: call it off the async
    /// runtime's threads for large models).
    pub fn new(trainer: Trainer, link: C, options: LearnerOptions) -> Result<Self> {
        Self::with_peers(trainer, link, options, None)
    }

    /// [`Self::new`] for one of several ranks: rank 0 sends the other ranks their shards
    /// through `peers` (required when world_size > 1); ranks > 0 take theirs with
    /// [`Self::train_shard`].
    pub fn with_peers(
        trainer: Trainer,
        link: C,
        options: LearnerOptions,
        peers: Option<Arc<dyn ShardPeers>>,
    ) -> Result<Self> {
        options.validate()?;
        if options.rank == 0 && options.world_size > 1 && peers.is_none() {
            return Err(LearnerError::Invalid(format!(
                "learner rank 0 of {} needs its peers to send them their shards",
                options.world_size
            )));
        }
        if trainer.collective().world_size() != options.world_size as usize
            || trainer.collective().rank() != options.rank as usize
        {
            return Err(LearnerError::Invalid(format!(
                "the trainer's collective is rank {} of {}, the options say rank {} of {}",
                trainer.collective().rank(),
                trainer.collective().world_size(),
                options.rank,
                options.world_size
            )));
        }
        let preparer = GroupPreparer::new(trainer.policy(), options.grpo.teachers_in_group);
        let payload = trainer.weights_payload()?;
        let state = trainer.state().clone();
        let pending = Pending {
            version: state.version,
            iteration: state.iteration,
            buffers: BTreeMap::new(),
            training: false,
            closing: false,
            failed: None,
            stale_groups_dropped: state.stale_groups_dropped,
            groups_refused: 0,
            last_checkpoint: None,
        };
        let progress = watch::Sender::new(Progress {
            version: state.version,
            iteration: state.iteration,
            training: false,
            finished: state.version >= options.total_iterations,
            failed: None,
            groups_buffered: 0,
            stale_groups_dropped: state.stale_groups_dropped,
            groups_refused: 0,
            last_checkpoint: None,
        });
        Ok(Self {
            inner: Arc::new(Inner {
                link,
                options,
                preparer,
                trainer: Arc::new(Mutex::new(trainer)),
                peers,
                pending: Mutex::new(pending),
                weights: RwLock::new(Arc::new(payload)),
                progress,
                diagnostics: Mutex::new(crate::diagnostics::Diagnostics::default()),
            }),
        })
    }

    pub fn options(&self) -> &LearnerOptions {
        &self.inner.options
    }

    /// Follows the learner's progress (version, failures, ...).
    pub fn progress(&self) -> watch::Receiver<Progress> {
        self.inner.progress.subscribe()
    }

    /// Runs `f` on the trainer (blocking while a step trains): for checks and tests.
    pub fn with_trainer<T>(&self, f: impl FnOnce(&Trainer) -> T) -> Result<T> {
        let t = self.inner.trainer.lock().map_err(|_| poisoned())?;
        Ok(f(&t))
    }

    /// The weights of `requested` (0: the current version).
    pub fn weights(&self, requested: u64) -> Result<Arc<WeightsPayload>> {
        let w = self.inner.weights.read().map_err(|_| poisoned())?.clone();
        if requested == 0 || requested == w.version {
            Ok(w)
        } else {
            Err(LearnerError::VersionNotHeld {
                requested,
                held: w.version,
            })
        }
    }

    pub fn info(&self) -> Result<LearnerInfo> {
        let w = self.weights(0)?;
        let iteration = self.inner.progress.borrow().iteration;
        Ok(LearnerInfo {
            policy_version: w.version,
            iteration,
            rank: self.inner.options.rank,
            world_size: self.inner.options.world_size,
            weights_bytes: w.bytes.len() as u64,
            weights_sha256: w.sha256_hex(),
        })
    }

    pub fn current_version(&self) -> u64 {
        self.inner.progress.borrow().version
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        // A panic while holding this lock cannot leave it half-updated in a way that matters
        // more than stopping would; keep serving what is there.
        self.inner
            .pending
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    fn publish_progress(&self, p: &Pending) {
        let total = self.inner.options.total_iterations;
        self.inner.progress.send_replace(Progress {
            version: p.version,
            iteration: p.iteration,
            training: p.training,
            finished: p.version >= total,
            failed: p.failed.clone(),
            groups_buffered: p.buffers.values().map(Vec::len).sum(),
            stale_groups_dropped: p.stale_groups_dropped,
            groups_refused: p.groups_refused,
            last_checkpoint: p.last_checkpoint.clone(),
        });
    }

    /// Checks the learner's state before any work on a group: why it cannot be taken now.
    fn admissible(&self, g: &IncomingGroup) -> std::result::Result<(), String> {
        let p = self.lock_pending();
        let opts = &self.inner.options;
        let pos = g.position;
        if let Some(f) = &p.failed {
            return Err(format!(
                "group at position {pos}: the learner stopped after a failed step: {f}"
            ));
        }
        if p.closing {
            return Err(format!(
                "group at position {pos}: the learner is shutting down"
            ));
        }
        if p.version >= opts.total_iterations {
            return Err(format!(
                "group at position {pos}: the run is finished (total_iterations {} reached)",
                opts.total_iterations
            ));
        }
        if p.training && g.iteration == p.iteration {
            return Err(format!(
                "group at position {pos}: iteration {} is being trained with its {} groups",
                g.iteration, opts.questions_per_iteration
            ));
        }
        let last = (p.iteration + opts.staleness_bound).min(opts.total_iterations - 1);
        if g.iteration < p.iteration || g.iteration > last {
            return Err(Rejection::new(
                pos,
                "iteration",
                format!(
                    "iteration {} does not match the learner's: it is at iteration {} and takes \
                     iterations {}..={last} (staleness_bound {})",
                    g.iteration, p.iteration, p.iteration, opts.staleness_bound
                ),
            )
            .to_string());
        }
        for (i, r) in g.responses.iter().enumerate() {
            if r.source == ResponseSource::Student && r.policy_version > p.version {
                return Err(Rejection::new(
                    pos,
                    format!("responses[{i}].policy_version"),
                    format!(
                        "version {} is newer than the learner's version {}",
                        r.policy_version, p.version
                    ),
                )
                .to_string());
            }
        }
        if p.buffers
            .get(&g.iteration)
            .is_some_and(|b| b.iter().any(|x| x.key.position == pos))
        {
            return Err(Rejection::new(
                pos,
                "position",
                "a group for this position is already buffered",
            )
            .to_string());
        }
        Ok(())
    }

    /// Whether a group whose oldest student response came from `oldest` is too stale at
    /// `version`.
    fn stale_reason(&self, oldest: Option<u64>, version: u64) -> Option<String> {
        let k = self.inner.options.staleness_bound;
        let oldest = oldest?;
        (oldest + k < version).then(|| {
            format!(
                "stale: a student response was sampled with policy version {oldest}, the learner \
                 is at version {version} and the staleness bound is {k}"
            )
        })
    }

    /// Takes one group: validates it, commits it with the coordinator, buffers it, and starts a
    /// training step when its iteration is complete. Never fails: problems become the verdict.
    pub async fn push_group(&self, incoming: IncomingGroup) -> Verdict {
        let position = incoming.position;
        if let Err(reason) = self.admissible(&incoming) {
            return self.refuse(position, reason);
        }
        let preparer = self.inner.preparer.clone();
        let prepared = tokio::task::spawn_blocking(move || {
            let group = preparer.prepare(&incoming);
            (incoming, group)
        })
        .await;
        let (incoming, group) = match prepared {
            Ok((incoming, Ok(group))) => (incoming, group),
            Ok((_, Err(rejection))) => return self.refuse(position, rejection.to_string()),
            Err(e) => {
                return self.refuse(
                    position,
                    format!("group at position {position}: checking it failed: {e}"),
                );
            }
        };
        let key = GroupKey {
            lease_id: incoming.lease_id.clone(),
            position,
            question_id: incoming.row.id.clone(),
            iteration: incoming.iteration,
        };
        match self.inner.link.accept_group(key.clone()).await {
            Ok(Acceptance::Accepted) => {}
            Ok(Acceptance::Refused(reason)) => {
                return self.refuse(
                    position,
                    format!("group at position {position}: the coordinator refused it: {reason}"),
                );
            }
            Err(e) => {
                return self.refuse(
                    position,
                    format!("group at position {position}: not committed ({e}); push it again"),
                );
            }
        }
        let oldest_student_version = incoming
            .responses
            .iter()
            .filter(|r| r.source == ResponseSource::Student)
            .map(|r| r.policy_version)
            .min();
        let to_send = (self.inner.options.world_size > 1).then(|| IncomingGroup {
            prompt_ids: group.prompt_ids.clone(),
            timings_ms: BTreeMap::new(),
            ..incoming.clone()
        });
        let buffered = Buffered {
            group,
            incoming: to_send,
            key,
            oldest_student_version,
            timings_ms: incoming.timings_ms,
        };
        // Re-check under the lock: a step may have finished while the coordinator answered.
        let (outcome, start) = {
            let mut p = self.lock_pending();
            let b = self.inner.options.questions_per_iteration;
            let outcome = if p.closing || p.failed.is_some() {
                Err("the learner is shutting down".to_string())
            } else if buffered.key.iteration < p.iteration
                || (p.training && buffered.key.iteration == p.iteration)
            {
                Err(format!(
                    "iteration {} was trained while the group was being committed",
                    buffered.key.iteration
                ))
            } else if let Some(reason) =
                self.stale_reason(buffered.oldest_student_version, p.version)
            {
                p.stale_groups_dropped += 1;
                Err(reason)
            } else if p
                .buffers
                .get(&buffered.key.iteration)
                .is_some_and(|v| v.len() >= b)
            {
                Err(format!(
                    "iteration {} already has its {b} groups",
                    buffered.key.iteration
                ))
            } else {
                p.buffers
                    .entry(buffered.key.iteration)
                    .or_default()
                    .push(buffered);
                Ok(())
            };
            let start = self.take_ready(&mut p);
            self.publish_progress(&p);
            (outcome, start)
        };
        if let Some(batch) = start {
            let this = self.clone();
            tokio::spawn(async move { this.run_training(batch).await });
        }
        match outcome {
            Ok(()) => Verdict::accepted(position),
            Err(reason) => {
                self.return_question(position, &reason).await;
                self.refuse(
                    position,
                    format!("group at position {position}: {reason}; the question was handed back"),
                )
            }
        }
    }

    fn refuse(&self, position: u64, reason: String) -> Verdict {
        let mut p = self.lock_pending();
        p.groups_refused += 1;
        self.publish_progress(&p);
        tracing::debug!(reason, "group refused");
        Verdict::refused(position, reason)
    }

    async fn return_question(&self, position: u64, reason: &str) {
        for attempt in 0..3u32 {
            match self
                .inner
                .link
                .return_question(position, reason.to_string())
                .await
            {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(position, attempt, error = %e, "ReturnQuestion failed");
                    tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
                }
            }
        }
    }

    /// The current iteration's groups when they are complete and no step is running.
    fn take_ready(&self, p: &mut Pending) -> Option<Vec<Buffered>> {
        let b = self.inner.options.questions_per_iteration;
        let ready = !p.training
            && !p.closing
            && p.failed.is_none()
            && p.version < self.inner.options.total_iterations
            && p.buffers.get(&p.iteration).is_some_and(|v| v.len() >= b);
        if !ready {
            return None;
        }
        p.training = true;
        let iteration = p.iteration;
        p.buffers.remove(&iteration)
    }

    async fn run_training(self, mut batch: Vec<Buffered>) {
        loop {
            let positions: Vec<u64> = batch.iter().map(|b| b.key.position).collect();
            if let Err(e) = self.train_one(batch).await {
                tracing::error!(error = %e, "training step failed; the learner takes no more groups");
                // The iteration was not trained: its questions go back to the coordinator, so
                // a learner resumed from the last checkpoint gets them again.
                let reason = format!("the learner's training step failed: {e}");
                for position in positions {
                    self.return_question(position, &reason).await;
                }
                let mut p = self.lock_pending();
                p.failed = Some(e.to_string());
                p.training = false;
                self.publish_progress(&p);
                return;
            }
            // The next iteration's early groups may have gone stale, or may already be complete.
            let (next, returns) = {
                let mut p = self.lock_pending();
                p.training = false;
                let mut returns = Vec::new();
                let iteration = p.iteration;
                let version = p.version;
                // Nothing of an iteration already trained stays behind (defensive: pushes
                // check this too).
                let past: Vec<u64> = p.buffers.range(..iteration).map(|(k, _)| *k).collect();
                for k in past {
                    for g in p.buffers.remove(&k).unwrap_or_default() {
                        returns.push((
                            g.key.position,
                            format!("iteration {k} was trained without this group"),
                        ));
                    }
                }
                if let Some(buf) = p.buffers.remove(&iteration) {
                    let mut keep = Vec::with_capacity(buf.len());
                    let mut stale = Vec::new();
                    for g in buf {
                        match self.stale_reason(g.oldest_student_version, version) {
                            Some(reason) => stale.push((g.key.position, reason)),
                            None => keep.push(g),
                        }
                    }
                    p.stale_groups_dropped += stale.len() as u64;
                    returns.extend(stale);
                    if !keep.is_empty() {
                        p.buffers.insert(iteration, keep);
                    }
                }
                let next = self.take_ready(&mut p);
                self.publish_progress(&p);
                (next, returns)
            };
            for (position, reason) in returns {
                self.return_question(position, &reason).await;
            }
            match next {
                Some(b) => batch = b,
                None => return,
            }
        }
    }

    /// One update on a complete iteration, then publication.
    async fn train_one(&self, batch: Vec<Buffered>) -> Result<()> {
        let opts = &self.inner.options;
        let n_groups = batch.len();
        let mut timings: BTreeMap<String, (f64, f64)> = BTreeMap::new();
        for g in &batch {
            for (k, v) in &g.timings_ms {
                let e = timings.entry(k.clone()).or_default();
                e.0 += v;
                e.1 += 1.0;
            }
        }
        // Shards: group i (in position order) to rank i % R; rank 0 trains shard 0 itself.
        let world = opts.world_size;
        let mut batch = batch;
        batch.sort_by_key(|b| b.key.position);
        let mut shards: Vec<Vec<IncomingGroup>> = vec![Vec::new(); world as usize];
        let mut groups: Vec<Group> = Vec::new();
        for (i, b) in batch.into_iter().enumerate() {
            match shard_of(i, world) {
                0 => groups.push(b.group),
                r => shards[r].push(b.incoming.ok_or_else(|| {
                    LearnerError::Failed(format!(
                        "group at position {} was buffered without its wire form",
                        b.key.position
                    ))
                })?),
            }
        }
        let stale = self.lock_pending().stale_groups_dropped;
        let trainer = self.inner.trainer.clone();
        let save_every = opts.save_every;
        let total = opts.total_iterations;
        let verify_every = opts.verify_every;
        let started = Instant::now();
        let iteration_now = self.lock_pending().iteration;
        let local = tokio::task::spawn_blocking(move || {
            let mut t = trainer.lock().map_err(|_| poisoned())?;
            t.set_stale_groups_dropped(stale);
            let stats = t.train_shard(groups, n_groups)?;
            let payload = t.weights_payload()?;
            let version = t.state().version;
            if verify_due(verify_every, version) {
                t.verify_replicas(&payload)?;
            }
            let checkpoint =
                if (save_every > 0 && version.is_multiple_of(save_every)) || version >= total {
                    Some(t.save_checkpoint()?)
                } else {
                    None
                };
            Ok::<_, LearnerError>((stats, payload, checkpoint, t.state().clone()))
        });
        let remote = async {
            let Some(peers) = &self.inner.peers else {
                return Ok(());
            };
            let calls = shards
                .into_iter()
                .enumerate()
                .skip(1)
                .map(|(r, shard)| peers.train_shard(r as u32, iteration_now, shard));
            for (r, result) in futures_util::future::join_all(calls)
                .await
                .into_iter()
                .enumerate()
            {
                let v = result?;
                if v != iteration_now + 1 {
                    return Err(LearnerError::Collective(format!(
                        "learner rank {} is at version {v} after iteration {iteration_now}, \
                         rank 0 at {}",
                        r + 1,
                        iteration_now + 1
                    )));
                }
            }
            Ok(())
        };
        let (local, remote) = tokio::join!(local, remote);
        let local =
            local.map_err(|e| LearnerError::Failed(format!("the training thread failed: {e}")))?;
        remote?;
        let (stats, payload, checkpoint, state) = local?;
        let seconds = started.elapsed().as_secs_f64();
        let version = state.version;
        let iteration = version - 1;
        *self.inner.weights.write().map_err(|_| poisoned())? = Arc::new(payload);
        {
            let mut p = self.lock_pending();
            p.version = version;
            p.iteration = state.iteration;
            if checkpoint.is_some() {
                p.last_checkpoint = checkpoint.clone();
            }
            self.publish_progress(&p);
        }
        let extra_metrics = match self.inner.link.after_iteration(iteration).await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(iteration, error = %e, "the discriminator step failed");
                BTreeMap::new()
            }
        };
        let mut published = false;
        for attempt in 0..5u32 {
            match self
                .inner
                .link
                .publish_version(version, iteration, checkpoint.clone())
                .await
            {
                Ok(()) => {
                    published = true;
                    break;
                }
                Err(e) => {
                    tracing::warn!(version, attempt, error = %e, "PublishVersion failed");
                    tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                }
            }
        }
        if !published {
            tracing::error!(
                version,
                "PublishVersion failed 5 times; actors may not see it"
            );
        }
        let mut metrics = stats.metrics();
        metrics.insert("version".into(), version as f64);
        metrics.insert("step_seconds".into(), seconds);
        metrics.insert("groups_per_second".into(), n_groups as f64 / seconds);
        metrics.insert("groups_trained".into(), state.groups_trained as f64);
        metrics.insert("stale_groups_dropped".into(), stale as f64);
        for (k, (sum, n)) in timings {
            metrics.insert(format!("actor_{k}_ms"), sum / n);
        }
        metrics.extend(extra_metrics);
        let metrics_path = self
            .inner
            .options
            .out_dir
            .join(crate::metrics_log::METRICS_FILE);
        if let Err(e) = crate::metrics_log::append(&metrics_path, iteration, version, &metrics) {
            tracing::warn!(error = %e, "writing the step's metrics line failed");
        }
        let signals = crate::diagnostics::StepSignals {
            d_accuracy: stats.d_accuracy,
            // Without the similarity reward in R the policy is not optimising it: no gaming.
            reward_sim_student: stats
                .reward_sim_student_mean
                .filter(|_| self.inner.options.grpo.use_sim_reward),
            reward_ans_student: stats.reward_ans_student_mean,
            kl: stats.kl_mean,
            entropy: stats.entropy_mean,
        };
        let warnings = self
            .inner
            .diagnostics
            .lock()
            .map(|mut d| d.observe(version, signals))
            .unwrap_or_default();
        for w in warnings {
            tracing::warn!(version, "{w}");
        }
        let nan = f64::NAN;
        tracing::info!(
            target: "ril_learner::step",
            iteration,
            version,
            loss = stats.loss,
            reward_student = stats.reward_student_mean.unwrap_or(nan),
            reward_teacher = stats.reward_teacher_mean.unwrap_or(nan),
            advantage_abs = stats.advantage_abs_mean,
            kl = stats.kl_mean,
            clip_fraction = stats.clip_fraction,
            entropy = stats.entropy_mean,
            d_accuracy = stats.d_accuracy.unwrap_or(nan),
            logprob_diff = stats.behaviour_logprob_abs_diff.unwrap_or(nan),
            grad_norm = stats.grad_norm,
            tokens = stats.tokens,
            groups = stats.groups,
            stale_groups_dropped = stale,
            seconds,
            checkpoint = checkpoint.as_ref().map(|c| c.display().to_string()).unwrap_or_default(),
            "learner step"
        );
        if let Err(e) = self.inner.link.report_metrics(iteration, metrics).await {
            tracing::warn!(iteration, error = %e, "ReportMetrics failed");
        }
        Ok(())
    }

    /// Rank r > 0: trains on its shard of `iteration` (sent by rank 0; possibly empty), in
    /// step with the other ranks through the collective, and returns the new version. Only
    /// rank 0 publishes, reports and checkpoints.
    pub async fn train_shard(&self, iteration: u64, shard: Vec<IncomingGroup>) -> Result<u64> {
        let opts = &self.inner.options;
        if opts.rank == 0 {
            return Err(LearnerError::Invalid(
                "TrainShard goes to learner ranks > 0; this is rank 0".into(),
            ));
        }
        {
            let mut p = self.lock_pending();
            if let Some(f) = &p.failed {
                return Err(LearnerError::Failed(format!(
                    "this rank stopped after a failed step: {f}"
                )));
            }
            if p.closing {
                return Err(LearnerError::ShuttingDown);
            }
            if p.training {
                return Err(LearnerError::Invalid(format!(
                    "iteration {} is already training on this rank",
                    p.iteration
                )));
            }
            if iteration != p.iteration {
                return Err(LearnerError::Invalid(format!(
                    "a shard of iteration {iteration}, but this rank is at iteration {} \
                     (version {})",
                    p.iteration, p.version
                )));
            }
            p.training = true;
            self.publish_progress(&p);
        }
        let n_groups = shard.len();
        let result = self.train_shard_inner(shard).await;
        let mut p = self.lock_pending();
        p.training = false;
        match &result {
            Ok((version, iteration)) => {
                tracing::info!(
                    rank = self.inner.options.rank,
                    version,
                    groups = n_groups,
                    "learner shard trained"
                );
                p.version = *version;
                p.iteration = *iteration;
            }
            Err(e) => p.failed = Some(e.to_string()),
        }
        self.publish_progress(&p);
        result.map(|(v, _)| v)
    }

    async fn train_shard_inner(&self, shard: Vec<IncomingGroup>) -> Result<(u64, u64)> {
        let preparer = self.inner.preparer.clone();
        let trainer = self.inner.trainer.clone();
        let verify_every = self.inner.options.verify_every;
        let (payload, state) = tokio::task::spawn_blocking(move || {
            let groups = shard
                .iter()
                .map(|g| preparer.prepare(g))
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|r| LearnerError::Invalid(r.to_string()))?;
            let n = groups.len();
            let mut t = trainer.lock().map_err(|_| poisoned())?;
            t.train_shard(groups, n)?;
            let payload = t.weights_payload()?;
            if verify_due(verify_every, t.state().version) {
                t.verify_replicas(&payload)?;
            }
            Ok::<_, LearnerError>((payload, t.state().clone()))
        })
        .await
        .map_err(|e| LearnerError::Failed(format!("the training thread failed: {e}")))??;
        *self.inner.weights.write().map_err(|_| poisoned())? = Arc::new(payload);
        Ok((state.version, state.iteration))
    }

    /// Stops taking groups, hands buffered ones back, waits for a running step, and writes a
    /// checkpoint of the current version unless one is already on disk. Returns its directory.
    pub async fn shutdown(&self) -> Result<Option<PathBuf>> {
        let returns: Vec<u64> = {
            let mut p = self.lock_pending();
            p.closing = true;
            let positions = p
                .buffers
                .values()
                .flatten()
                .map(|b| b.key.position)
                .collect();
            p.buffers.clear();
            self.publish_progress(&p);
            positions
        };
        for position in returns {
            self.return_question(position, "the learner is shutting down")
                .await;
        }
        let mut rx = self.progress();
        // The sender lives in `self`, so this only ends when no step is running.
        let _ = rx.wait_for(|p| !p.training).await;
        if self.inner.options.rank > 0 {
            // Rank 0 writes the run's checkpoints.
            return Ok(None);
        }
        let trainer = self.inner.trainer.clone();
        let completed = self.lock_pending().version;
        let saved = tokio::task::spawn_blocking(move || {
            let mut t = trainer.lock().map_err(|_| poisoned())?;
            if t.saved_version() == Some(t.state().version) {
                return Ok(None);
            }
            if t.state().version != completed {
                // A multi-rank step failed after this rank's update (another rank failed):
                // that version was never completed, so it is not checkpointed.
                tracing::warn!(
                    version = t.state().version,
                    completed,
                    "not checkpointing a version whose step failed"
                );
                return Ok(None);
            }
            t.save_checkpoint().map(Some)
        })
        .await
        .map_err(|e| LearnerError::Failed(format!("the checkpoint thread failed: {e}")))??;
        if let Some(dir) = &saved {
            let mut p = self.lock_pending();
            p.last_checkpoint = Some(dir.clone());
            self.publish_progress(&p);
        }
        Ok(saved)
    }
}
