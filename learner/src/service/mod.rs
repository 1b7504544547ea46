//! The learner as a service, without gRPC types: groups come in, are checked against the model,
//! committed with the coordinator, buffered per iteration, and trained on once the iteration has
//! its B groups; each update trains the discriminator on the iteration's responses, publishes a
//! new policy version and serves its weights.
//!
//! Protocol with the coordinator (through [`CoordinatorLink`]):
//! - every group that passes validation is committed with `AcceptGroup` before it is buffered; a
//!   refusal (duplicate, unknown position, ...) becomes the group's verdict;
//! - a committed group the learner cannot use (too stale, its iteration already trained, the
//!   learner shutting down) is handed back with `ReturnQuestion`, so the coordinator must reopen
//!   that position;
//! - after each update: D's step on the iteration's responses ([`DiscriminatorLink`], when one
//!   is configured), `PublishVersion(v + 1, iteration v, checkpoint if one was written)` and
//!   `ReportMetrics`. The new weights are served before the version is published.
//!
//! Staleness (bound k): a group is stale when one of its student responses was sampled with a
//! version older than `current - k`. Groups of up to k iterations ahead are buffered, and checked
//! again when their iteration comes up.
//!
//! Several ranks (world_size R > 1): rank 0 alone takes groups (a push to another rank is
//! refused, naming rank 0's address), commits, publishes, reports, drives the discriminator and
//! writes checkpoints. When an iteration is complete it sorts the groups by position, gives
//! group i to rank i % R, sends ranks 1..R their shards through [`ShardPeers`] (concurrently)
//! and trains shard 0 itself; every rank's step (an empty shard included) meets the others' in
//! the collective. Ranks > 0 train what they are sent ([`LearnerService::train_shard`]) and keep
//! their version in step. All ranks compare their weights' SHA-256 at start and every
//! `verify_every` versions.
//!
//! A failed training step (e.g. a non-finite loss) leaves the weights as they were and stops the
//! learner: it refuses further groups, [`Progress::failed`] says why and
//! [`LearnerService::failure`] holds the error, so the process can exit and be resumed from its
//! last checkpoint.

mod discriminator;
mod exported;
mod groups;
mod links;
mod step;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::watch;

pub use discriminator::{DiscriminatorBuffer, LabelledGroup, LabelledResponse};
pub use groups::{GroupPreparer, IncomingGroup, Rejection, Verdict};
pub use links::{
    Acceptance, CoordinatorLink, DiscriminatorLink, DiscriminatorStep, GroupKey, JoinReply,
    JoinRequest, ShardPeers,
};

use crate::error::{LearnerError, Result};
use crate::grpo::{Group, ResponseSource};
use crate::options::LearnerOptions;
use crate::trainer::{Trainer, WeightsPayload};

/// Group `i` of an iteration (in position order) goes to rank `i % world_size`.
pub fn shard_of(index: usize, world_size: u32) -> usize {
    index % world_size.max(1) as usize
}

/// Where the learner stands, for waiting on (tests, `serve`) and for status.
#[derive(Debug, Clone, Default, PartialEq)]
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
    /// D's last Train failed (its error; `None` once one succeeds, and before any): the
    /// learner's health shows it as NOT_SERVING for `ril.v1.Learner/discriminator`.
    pub discriminator_failed: Option<String>,
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

/// The learner's peers besides the coordinator.
#[derive(Clone, Default)]
pub struct Peers {
    /// Rank 0 of several: the other ranks, sent their shards (required when world_size > 1).
    pub ranks: Option<Arc<dyn ShardPeers>>,
    /// Rank 0: the discriminator trained after every iteration (None: D is not trained
    /// online, e.g. frozen or absent).
    pub discriminator: Option<Arc<dyn DiscriminatorLink>>,
    /// Ranks > 0: rank 0's address, named when a push reaches another rank.
    pub rank0_addr: Option<String>,
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peers")
            .field("ranks", &self.ranks.is_some())
            .field("discriminator", &self.discriminator.is_some())
            .field("rank0_addr", &self.rank0_addr)
            .finish()
    }
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
    failed: Option<Arc<LearnerError>>,
    stale_groups_dropped: u64,
    groups_refused: u64,
    last_checkpoint: Option<PathBuf>,
    discriminator_failed: Option<String>,
}

/// The discriminator's link and what it trains on next.
struct OnlineDiscriminator {
    link: Arc<dyn DiscriminatorLink>,
    buffer: DiscriminatorBuffer,
}

struct Inner<C> {
    link: C,
    options: LearnerOptions,
    preparer: GroupPreparer,
    trainer: Arc<Mutex<Trainer>>,
    ranks: Option<Arc<dyn ShardPeers>>,
    discriminator: Option<OnlineDiscriminator>,
    rank0_addr: Option<String>,
    pending: Mutex<Pending>,
    weights: RwLock<Arc<WeightsPayload>>,
    progress: watch::Sender<Progress>,
    /// D collapse, reward hacking, KL blow-up, entropy collapse: warned about as they begin.
    diagnostics: Mutex<crate::diagnostics::Diagnostics>,
    /// What `/metrics` reports beyond the state above.
    exported: Mutex<exported::Exported>,
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

fn poisoned<T>(_: T) -> LearnerError {
    LearnerError::TrainerPoisoned
}

/// A group as it arrived from the wire: converted, or the reason it could not be.
pub type Pushed = std::result::Result<IncomingGroup, Rejection>;

impl<C: CoordinatorLink> LearnerService<C> {
    /// Wraps an opened trainer. Serialises the current weights (CPU work: call it off the async
    /// runtime's threads for large models).
    pub fn new(trainer: Trainer, link: C, options: LearnerOptions) -> Result<Self> {
        Self::with_peers(trainer, link, options, Peers::default())
    }

    /// [`Self::new`] with the other peers: for rank 0 of several ranks its `peers.ranks`
    /// (required), for rank 0 the discriminator to train online, for ranks > 0 rank 0's address.
    pub fn with_peers(
        trainer: Trainer,
        link: C,
        options: LearnerOptions,
        peers: Peers,
    ) -> Result<Self> {
        options.validate()?;
        check_ranks(&trainer, &options, &peers)?;
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
            discriminator_failed: None,
        };
        let progress = watch::Sender::new(progress_of(&pending, options.total_iterations));
        let discriminator = peers.discriminator.map(|link| OnlineDiscriminator {
            link,
            buffer: DiscriminatorBuffer::default(),
        });
        Ok(Self {
            inner: Arc::new(Inner {
                link,
                options,
                preparer,
                trainer: Arc::new(Mutex::new(trainer)),
                ranks: peers.ranks,
                discriminator,
                rank0_addr: peers.rank0_addr,
                pending: Mutex::new(pending),
                weights: RwLock::new(Arc::new(payload)),
                progress,
                diagnostics: Mutex::new(crate::diagnostics::Diagnostics::default()),
                exported: Mutex::default(),
            }),
        })
    }

    /// Whether this learner trains an online discriminator (has a link to D).
    pub fn has_discriminator(&self) -> bool {
        self.inner.discriminator.is_some()
    }

    pub fn options(&self) -> &LearnerOptions {
        &self.inner.options
    }

    /// Follows the learner's progress (version, failures, ...).
    pub fn progress(&self) -> watch::Receiver<Progress> {
        self.inner.progress.subscribe()
    }

    /// The error of the training step that stopped this learner, if one did.
    pub fn failure(&self) -> Option<Arc<LearnerError>> {
        self.lock_pending().failed.clone()
    }

    /// Runs `f` on the trainer (blocking while a step trains): for checks and tests.
    pub fn with_trainer<T>(&self, f: impl FnOnce(&Trainer) -> T) -> Result<T> {
        let t = self.inner.trainer.lock().map_err(poisoned)?;
        Ok(f(&t))
    }

    /// The weights of `requested` (0: the current version).
    pub fn weights(&self, requested: u64) -> Result<Arc<WeightsPayload>> {
        let w = self.inner.weights.read().map_err(poisoned)?.clone();
        if requested == 0 || requested == w.version {
            Ok(w)
        } else {
            Err(LearnerError::VersionNotHeld {
                requested,
                held: w.version,
            })
        }
    }

    /// Counts a weight transfer of `bytes` served to an actor (for `/metrics`).
    pub fn weights_served(&self, bytes: usize) {
        self.inner
            .exported
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .weights_served(bytes);
    }

    /// The learner's Prometheus metrics ([`exported`]).
    pub fn write_metrics(&self, out: &mut ril_proto::metrics::Exposition) {
        let options = &self.inner.options;
        let version = self.inner.weights.read().map(|w| w.version).ok();
        if let Some(v) = version {
            out.gauge(
                "ril_learner_policy_version",
                "The policy version this rank holds.",
                v as f64,
            );
        }
        out.gauge(
            "ril_learner_iteration",
            "The iteration this learner works on.",
            self.inner.progress.borrow().iteration as f64,
        );
        out.gauge(
            "ril_learner_rank",
            "This learner's rank.",
            f64::from(options.rank),
        );
        out.gauge(
            "ril_learner_world_size",
            "Learner ranks in the run.",
            f64::from(options.world_size),
        );
        self.inner
            .exported
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .write(out);
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
        self.inner
            .progress
            .send_replace(progress_of(p, self.inner.options.total_iterations));
    }

    /// PushGroups: only rank 0 takes groups, and a push holds at least one. Each group gets its
    /// verdict; one that did not convert from the wire keeps its rejection.
    pub async fn push_groups(&self, groups: Vec<Pushed>) -> Result<Vec<Verdict>> {
        let rank = self.inner.options.rank;
        if rank > 0 {
            return Err(LearnerError::NotRankZero {
                rank,
                rank0_addr: self.inner.rank0_addr.clone(),
            });
        }
        if groups.is_empty() {
            return Err(LearnerError::NoGroups);
        }
        // In a task of its own: if the caller gives up (its deadline, a broken connection) and
        // the handler is dropped, a group whose commit is under way is still committed and
        // buffered, never committed and forgotten.
        let this = self.clone();
        let pushes = tokio::spawn(async move {
            let mut verdicts = Vec::with_capacity(groups.len());
            for g in groups {
                verdicts.push(match g {
                    Ok(incoming) => this.push_group(incoming).await,
                    Err(rejection) => Verdict::from(&rejection),
                });
            }
            verdicts
        });
        pushes.await.map_err(LearnerError::task("pushing groups"))
    }

    /// Takes one group: validates it, commits it with the coordinator, buffers it, and starts a
    /// training step when its iteration is complete. Never fails: problems become the verdict.
    pub async fn push_group(&self, incoming: IncomingGroup) -> Verdict {
        let position = incoming.position;
        if let Err(reason) = self.admissible(&incoming) {
            return self.refuse(position, reason);
        }
        let (incoming, group) = match self.prepare(incoming).await {
            Ok(prepared) => prepared,
            Err(reason) => return self.refuse(position, reason),
        };
        let key = GroupKey {
            lease_id: incoming.lease_id.clone(),
            position,
            question_id: incoming.row.id.clone(),
            iteration: incoming.iteration,
        };
        if let Err(reason) = self.commit(key.clone()).await {
            return self.refuse(position, reason);
        }
        let lease_id = key.lease_id.clone();
        let labelled = self
            .inner
            .discriminator
            .as_ref()
            .map(|_| LabelledGroup::from(&incoming));
        let (outcome, start) = self.buffer(self.buffered(incoming, group, key));
        if let (Ok(Some(iteration)), Some(d), Some(labelled)) =
            (&outcome, &self.inner.discriminator, labelled)
        {
            d.buffer.add(*iteration, labelled);
        }
        if let Some(batch) = start {
            let this = self.clone();
            tokio::spawn(async move { this.run_training(batch).await });
        }
        match outcome {
            Ok(_) => Verdict::accepted(position),
            Err(reason) => {
                self.return_question(position, &lease_id, &reason, self.commit_deadline())
                    .await;
                self.refuse(
                    position,
                    format!("group at position {position}: {reason}; the question was handed back"),
                )
            }
        }
    }

    /// The model-level checks, off the async runtime's threads.
    async fn prepare(
        &self,
        incoming: IncomingGroup,
    ) -> std::result::Result<(IncomingGroup, Group), String> {
        let position = incoming.position;
        let preparer = self.inner.preparer.clone();
        let prepared = tokio::task::spawn_blocking(move || {
            let group = preparer.prepare(&incoming);
            (incoming, group)
        })
        .await;
        match prepared {
            Ok((incoming, Ok(group))) => Ok((incoming, group)),
            Ok((_, Err(rejection))) => Err(rejection.to_string()),
            Err(e) => Err(format!(
                "group at position {position}: checking it failed: {e}"
            )),
        }
    }

    /// AcceptGroup: the coordinator counts the group (exactly once per position). A failure
    /// that leaves it unknown whether the commit happened (the coordinator down, slow or cut
    /// off mid-call) is asked again with backoff for up to `commit_deadline_ms`: the coordinator
    /// answers a retry under the same lease as it answered the first time, so a group it
    /// committed is buffered, not lost. Past the deadline the learner stops with the error (the
    /// group may be committed and can no longer be trained: the run must not go on silently).
    async fn commit(&self, key: GroupKey) -> std::result::Result<(), String> {
        let position = key.position;
        let started = Instant::now();
        let deadline = self.commit_deadline();
        let link = &self.inner.link;
        let answer = self
            .ask_until("AcceptGroup", position, deadline, || {
                link.accept_group(key.clone())
            })
            .await;
        match answer {
            Ok(Acceptance::Accepted) => Ok(()),
            Ok(Acceptance::Refused(reason)) => Err(format!(
                "group at position {position}: the coordinator refused it: {reason}"
            )),
            Err((e, attempts)) if outcome_unknown(&e) => {
                let waited = started.elapsed().as_secs_f64();
                let reason = format!(
                    "group at position {position}: AcceptGroup's outcome still unknown after \
                     {attempts} attempts over {waited:.1} s ({e}); the learner stops"
                );
                self.stop_for(e);
                Err(reason)
            }
            Err((e, _)) => Err(format!(
                "group at position {position}: not committed ({e}); push it again"
            )),
        }
    }

    /// When calls to the coordinator whose outcome is unknown stop being asked again.
    pub(super) fn commit_deadline(&self) -> Instant {
        Instant::now() + Duration::from_millis(self.inner.options.commit_deadline_ms)
    }

    /// Calls the coordinator until it answers, fails for a reason other than an unknown
    /// outcome, or `deadline` passes (backoff from 50 ms doubling to 2 s). `key` (a position, a
    /// version) names the call in the log. The error comes with the number of attempts made.
    pub(super) async fn ask_until<T, F, Fut>(
        &self,
        call: &'static str,
        key: u64,
        deadline: Instant,
        mut ask: F,
    ) -> std::result::Result<T, (LearnerError, u32)>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let mut backoff = Duration::from_millis(50);
        let mut attempt = 1u32;
        let mut deadline = deadline;
        loop {
            if self.lock_pending().closing {
                // Shutting down: the process has a grace period, and a restarted learner takes
                // back what it had accepted but not trained.
                deadline = deadline.min(Instant::now() + SHUTDOWN_ASK_DEADLINE);
            }
            match ask().await {
                Ok(answer) => return Ok(answer),
                Err(e) if outcome_unknown(&e) && Instant::now() + backoff < deadline => {
                    tracing::warn!(call, key, attempt, error = %e, "coordinator call failed; asking again");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    attempt += 1;
                }
                Err(e) => return Err((e, attempt)),
            }
        }
    }

    /// Stops taking groups because the coordinator could not be told something it must know
    /// (a commit, a question handed back, a version): going on would lose groups silently or
    /// wait for ever.
    pub(super) fn stop_for(&self, e: LearnerError) {
        tracing::error!(error = %e, "the coordinator did not answer within commit_deadline_ms; the learner takes no more groups");
        let mut p = self.lock_pending();
        if p.failed.is_none() {
            p.failed = Some(Arc::new(e));
        }
        self.publish_progress(&p);
    }

    fn buffered(&self, incoming: IncomingGroup, group: Group, key: GroupKey) -> Buffered {
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
        Buffered {
            group,
            incoming: to_send,
            key,
            oldest_student_version,
            timings_ms: incoming.timings_ms,
        }
    }

    /// Buffers a committed group, re-checked under the lock (a step may have finished while
    /// the coordinator answered). Returns the group's iteration (`None` when its position was
    /// already buffered) or why it was dropped, and the batch to train when this group
    /// completed its iteration.
    fn buffer(
        &self,
        buffered: Buffered,
    ) -> (
        std::result::Result<Option<u64>, String>,
        Option<Vec<Buffered>>,
    ) {
        let mut p = self.lock_pending();
        let b = self.inner.options.questions_per_iteration;
        let iteration = buffered.key.iteration;
        let position = buffered.key.position;
        let outcome = if p.closing || p.failed.is_some() {
            Err("the learner is shutting down".to_string())
        } else if iteration < p.iteration || (p.training && iteration == p.iteration) {
            Err(format!(
                "iteration {iteration} was trained while the group was being committed"
            ))
        } else if let Some(reason) = self.stale_reason(buffered.oldest_student_version, p.version) {
            p.stale_groups_dropped += 1;
            Err(reason)
        } else if p
            .buffers
            .get(&iteration)
            .is_some_and(|v| v.iter().any(|g| g.key.position == position))
        {
            // The same position again (an actor pushing again after losing the answer, which
            // the coordinator accepted as the same commit): it is here once, and stays once.
            Ok(None)
        } else if p.buffers.get(&iteration).is_some_and(|v| v.len() >= b) {
            Err(format!("iteration {iteration} already has its {b} groups"))
        } else {
            p.buffers.entry(iteration).or_default().push(buffered);
            Ok(Some(iteration))
        };
        let start = self.take_ready(&mut p);
        self.publish_progress(&p);
        (outcome, start)
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
        check_fits_state(g, &p, opts).map_err(|r| r.to_string())
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

    fn refuse(&self, position: u64, reason: String) -> Verdict {
        let mut p = self.lock_pending();
        p.groups_refused += 1;
        self.publish_progress(&p);
        tracing::debug!(reason, "group refused");
        Verdict::refused(position, reason)
    }

    /// Hands a question back to the coordinator (re-issued at once), asking again until
    /// `deadline` while the outcome is unknown. If it never gets through the learner stops:
    /// the question would otherwise never be rolled out again in this run (a restarted learner
    /// takes back what it had accepted but not trained).
    pub(super) async fn return_question(
        &self,
        position: u64,
        lease_id: &str,
        reason: &str,
        deadline: Instant,
    ) {
        let link = &self.inner.link;
        let answer = self
            .ask_until("ReturnQuestion", position, deadline, || {
                link.return_question(position, lease_id.to_string(), reason.to_string())
            })
            .await;
        match answer {
            Ok(()) => {}
            Err((e, _)) if outcome_unknown(&e) => self.stop_for(e),
            Err((e, _)) => {
                tracing::error!(position, error = %e, "ReturnQuestion refused");
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

    /// Stops taking groups, hands buffered ones back, waits for a running step, and writes a
    /// checkpoint of the current version unless one is already on disk. Returns its directory.
    pub async fn shutdown(&self) -> Result<Option<PathBuf>> {
        let returns: Vec<(u64, String)> = {
            let mut p = self.lock_pending();
            p.closing = true;
            let positions = p
                .buffers
                .values()
                .flatten()
                .map(|b| (b.key.position, b.key.lease_id.clone()))
                .collect();
            p.buffers.clear();
            self.publish_progress(&p);
            positions
        };
        // One deadline for them all, and a short one: a restarted learner takes back what it
        // had accepted but not trained anyway.
        let deadline = Instant::now()
            + Duration::from_millis(self.inner.options.commit_deadline_ms)
                .min(SHUTDOWN_ASK_DEADLINE);
        for (position, lease_id) in returns {
            let reason = "the learner is shutting down";
            self.return_question(position, &lease_id, reason, deadline)
                .await;
        }
        let mut rx = self.progress();
        // The sender lives in `self`, so this only ends when no step is running.
        let _ = rx.wait_for(|p| !p.training).await;
        if self.inner.options.rank > 0 {
            // Rank 0 writes the run's checkpoints.
            return Ok(None);
        }
        let saved = self.save_final_checkpoint().await?;
        if let Some(dir) = &saved {
            let mut p = self.lock_pending();
            p.last_checkpoint = Some(dir.clone());
            self.publish_progress(&p);
        }
        Ok(saved)
    }

    /// The shutdown checkpoint: the current version, unless it is on disk already or its step
    /// never completed.
    async fn save_final_checkpoint(&self) -> Result<Option<PathBuf>> {
        let trainer = self.inner.trainer.clone();
        let completed = self.lock_pending().version;
        tokio::task::spawn_blocking(move || {
            let mut t = trainer.lock().map_err(poisoned)?;
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
        .map_err(LearnerError::task("the checkpoint thread"))?
    }
}

/// The iteration window (staleness bound), versions from the future, and duplicates.
fn check_fits_state(
    g: &IncomingGroup,
    p: &Pending,
    opts: &LearnerOptions,
) -> std::result::Result<(), Rejection> {
    let pos = g.position;
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
        ));
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
            ));
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
        ));
    }
    Ok(())
}

/// The trainer's collective and the peers must fit the options' rank and world size.
fn check_ranks(trainer: &Trainer, options: &LearnerOptions, peers: &Peers) -> Result<()> {
    if options.rank == 0 && options.world_size > 1 && peers.ranks.is_none() {
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
    Ok(())
}

fn progress_of(p: &Pending, total_iterations: u64) -> Progress {
    Progress {
        version: p.version,
        iteration: p.iteration,
        training: p.training,
        finished: p.version >= total_iterations,
        failed: p.failed.as_ref().map(|e| e.to_string()),
        groups_buffered: p.buffers.values().map(Vec::len).sum(),
        stale_groups_dropped: p.stale_groups_dropped,
        groups_refused: p.groups_refused,
        last_checkpoint: p.last_checkpoint.clone(),
        discriminator_failed: p.discriminator_failed.clone(),
    }
}

/// How long a shutting-down learner keeps asking the coordinator (handing its buffered questions
/// back, publishing the version of a step that was running), within its grace period.
const SHUTDOWN_ASK_DEADLINE: Duration = Duration::from_secs(5);

/// Whether a failed coordinator call may still have been carried out, and may succeed if asked
/// again: the peer was down, slow or cut off mid-call (not a refusal).
fn outcome_unknown(e: &LearnerError) -> bool {
    match e {
        LearnerError::Coordinator(rpc) => rpc.outcome_unknown(),
        _ => false,
    }
}
