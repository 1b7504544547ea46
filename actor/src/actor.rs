//! The actor as named phases over its peers (DESIGN.md "One iteration"): [`register`] once,
//! then per lease [`Actor::lease`], [`Actor::sync_weights`], and for each question
//! [`Actor::roll_out`] (the student samples while the teachers answer), [`Actor::score`], then
//! [`Actor::push`] and [`Actor::complete`]. A heartbeat task runs beside the loop. Everything here
//! speaks domain types; the peers are traits ([`crate::peers`]), gRPC or fakes.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use candle_core::Device;
use ril_data::Row;
use ril_model::bundle::Bundle;
use ril_model::checkpoint::{LoadOptions, load_weights_from_bytes};
use tracing::Instrument;

use crate::ActorMetrics;
use crate::error::ActorError;
use crate::peers::{
    Coordinator, Discriminator, Learner, Lease, LeaseCompletion, LeaseItem, LeaseReply,
    LeaseRequest, Registration, ResponseScore, ResponseSource, RolloutSettings, ScoredGroup,
    Teacher, TeacherAnswer,
};
use crate::rollout::{
    StudentRollouts, rollout_seed, sample_student, scored_responses, teacher_split,
};
use crate::run::ActorOptions;
use crate::sync::WeightPayload;

/// What an actor did, for logs and tests.
#[derive(Debug, Default, Clone)]
pub struct ActorSummary {
    pub leases: u64,
    pub groups_pushed: u64,
    pub groups_refused: u64,
    pub positions_returned: u64,
    pub weight_syncs: u64,
    /// The version the student last sampled with (`u64::MAX`: no weights were ever applied).
    pub final_version: u64,
    /// Total milliseconds per phase (lease, weight_sync, generation, teacher, scoring, push).
    pub phase_ms: BTreeMap<String, f64>,
}

/// The peers of a run, as its registration names them.
#[derive(Debug)]
pub struct Peers<C, L, D, T> {
    /// Shared with the heartbeat task.
    pub coordinator: Arc<C>,
    pub learner: L,
    pub discriminator: D,
    /// In registration order: teacher slots are shared round-robin in this order.
    pub teachers: Vec<T>,
}

/// One question rolled out: the student's G responses and the teacher answers.
#[derive(Debug, Clone)]
pub struct Rollouts {
    pub student: StudentRollouts,
    /// Teacher by teacher, each teacher's answers in index order.
    pub teacher_answers: Vec<TeacherAnswer>,
    pub generation_ms: f64,
    pub teacher_ms: f64,
}

/// The policy version the student holds, shared with the heartbeat task.
#[derive(Debug, Clone)]
struct SharedVersion(Arc<AtomicU64>);

impl SharedVersion {
    /// No weights applied yet (the student's checkpoint weights are never sampled with).
    const NONE: u64 = u64::MAX;

    fn none() -> Self {
        Self(Arc::new(AtomicU64::new(Self::NONE)))
    }

    fn get(&self) -> Option<u64> {
        Some(self.0.load(Ordering::SeqCst)).filter(|&v| v != Self::NONE)
    }

    fn set(&self, version: u64) {
        self.0.store(version, Ordering::SeqCst);
    }
}

fn device_name(device: &Device) -> String {
    ril_model::device::describe(device)
}

fn elapsed_ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

/// Joins the run, asking again every 100 ms while the coordinator answers Unavailable (it does
/// until the run's learner has joined), for at most `opts.register_timeout`. `None`: asked to
/// stop first (e.g. SIGTERM during a rollout of the pods); nothing was leased, so there is
/// nothing to finish.
#[tracing::instrument(skip_all, fields(actor = %opts.actor_id))]
pub async fn register<C: Coordinator>(
    coordinator: &C,
    opts: &ActorOptions,
    stop: &AtomicBool,
) -> Result<Option<Registration>, ActorError> {
    let deadline = Instant::now() + opts.register_timeout;
    let device = device_name(&opts.device);
    let mut refusals = 0u64;
    loop {
        if stop.load(Ordering::SeqCst) {
            tracing::info!("stopped before registering");
            return Ok(None);
        }
        match coordinator.register(&opts.actor_id, &device).await {
            Ok(r) => {
                tracing::info!(run = %r.run_id, %device, group_size = r.settings.group_size, teachers = r.teacher_addrs.len(), "registered");
                return Ok(Some(r));
            }
            Err(e) if e.is_unavailable() && Instant::now() < deadline => {
                // Said once at info (what the actor waits for), then at debug.
                if refusals == 0 {
                    tracing::info!(reason = %e, "waiting for the coordinator to be ready; registering again every 100 ms");
                } else {
                    tracing::debug!(reason = %e, "coordinator not ready; registering again");
                }
                refusals += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// A teacher's recent failures. After `failures` in a row it sits out `bench_time(failures)`
/// (1 s doubling to 60 s): the other teachers fill its slots, and when the time is up it is
/// asked again (one success clears the record).
#[derive(Debug, Clone, Default)]
struct TeacherHealth {
    failures: u32,
    benched_until: Option<Instant>,
}

impl TeacherHealth {
    const MAX_BENCH: Duration = Duration::from_secs(60);

    fn bench_time(failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(6);
        Duration::from_secs(1 << doublings).min(Self::MAX_BENCH)
    }
}

/// How long a coordinator call is asked again once the actor is stopping (its process has a
/// grace period; an unanswered lease expires on the coordinator's side).
const STOPPING_ASK_DEADLINE: Duration = Duration::from_secs(5);

/// Why a lease's questions go back: the distinct failures, the first few kept.
#[derive(Debug, Default)]
struct HandBack {
    reasons: Vec<String>,
    more: usize,
}

impl HandBack {
    const KEPT: usize = 3;

    fn add(&mut self, e: &dyn std::fmt::Display) {
        let text = e.to_string();
        if self.reasons.contains(&text) {
            return;
        }
        if self.reasons.len() < Self::KEPT {
            self.reasons.push(text);
        } else {
            self.more += 1;
        }
    }

    fn text(&self) -> String {
        let mut text = self.reasons.join("; ");
        if self.more > 0 {
            text.push_str(&format!("; and {} other failure(s)", self.more));
        }
        text
    }
}

/// A registered actor: its student, its peers and what it has done.
pub struct Actor<C, L, D, T> {
    options: ActorOptions,
    settings: RolloutSettings,
    student: Arc<RwLock<Bundle>>,
    peers: Peers<C, L, D, T>,
    /// Each teacher's recent failures (a teacher that keeps failing sits out for a while).
    teacher_health: std::sync::Mutex<Vec<TeacherHealth>>,
    version: SharedVersion,
    /// Set from outside (shutdown) or at the end of `run`; the lease in progress is finished.
    stop: Arc<AtomicBool>,
    /// The coordinator said the run is over.
    finished: Arc<AtomicBool>,
    summary: ActorSummary,
    /// Lease requests made: the key of the next one.
    lease_requests: u64,
    /// Since when the learner's weights could not be had (while the learner restarts).
    weights_failing_since: Option<Instant>,
}

impl<C: Coordinator, L: Learner, D: Discriminator, T: Teacher> Actor<C, L, D, T> {
    pub fn new(
        options: ActorOptions,
        settings: RolloutSettings,
        student: Bundle,
        peers: Peers<C, L, D, T>,
        stop: Arc<AtomicBool>,
    ) -> Self {
        let teacher_health = vec![TeacherHealth::default(); peers.teachers.len()];
        Self {
            options,
            settings,
            student: Arc::new(RwLock::new(student)),
            peers,
            teacher_health: std::sync::Mutex::new(teacher_health),
            version: SharedVersion::none(),
            stop,
            finished: Arc::new(AtomicBool::new(false)),
            summary: ActorSummary::default(),
            lease_requests: 0,
            weights_failing_since: None,
        }
    }

    pub fn summary(&self) -> &ActorSummary {
        &self.summary
    }

    /// The version the student samples with; `None` before the first weights.
    pub fn policy_version(&self) -> Option<u64> {
        self.version.get()
    }

    /// Leases and rolls out until the run finishes, `max_leases` is reached or `stop` is set
    /// (the lease in progress is finished first), with heartbeats beside.
    #[tracing::instrument(skip_all, fields(actor = %self.options.actor_id))]
    pub async fn run(mut self) -> Result<ActorSummary, ActorError> {
        let heartbeat = self.spawn_heartbeat();
        let result = self.lease_loop().await;
        self.stop.store(true, Ordering::SeqCst);
        heartbeat.abort();
        self.summary.final_version = self.version.get().unwrap_or(SharedVersion::NONE);
        result.map(|()| self.summary)
    }

    async fn lease_loop(&mut self) -> Result<(), ActorError> {
        while !self.should_stop() {
            if let Some(lease) = self.lease().await? {
                self.run_lease(lease).await?;
            }
        }
        Ok(())
    }

    fn should_stop(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
            || self.finished.load(Ordering::SeqCst)
            || self
                .options
                .max_leases
                .is_some_and(|m| self.summary.leases >= m)
    }

    /// Heartbeats carrying the version the student samples with, every interval (at least
    /// 50 ms); registers again when the coordinator has forgotten this actor.
    fn spawn_heartbeat(&self) -> tokio::task::JoinHandle<()> {
        let coordinator = self.peers.coordinator.clone();
        let (version, finished, stop) = (
            self.version.clone(),
            self.finished.clone(),
            self.stop.clone(),
        );
        let id = self.options.actor_id.clone();
        let device = device_name(&self.options.device);
        let every = self
            .settings
            .heartbeat_interval
            .max(Duration::from_millis(50));
        let span = tracing::info_span!("heartbeat", actor = %id);
        let beat = async move {
            while !stop.load(Ordering::SeqCst) && !finished.load(Ordering::SeqCst) {
                match coordinator.heartbeat(&id, version.get()).await {
                    Ok(reply) => {
                        if reply.run_finished {
                            finished.store(true, Ordering::SeqCst);
                        }
                        if !reply.known {
                            let _ = coordinator.register(&id, &device).await;
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
                }
                tokio::time::sleep(every).await;
            }
        };
        tokio::spawn(beat.instrument(span))
    }

    fn add_phase_ms(&mut self, phase: &str, ms: f64) {
        *self.summary.phase_ms.entry(phase.to_string()).or_default() += ms;
        self.options.metrics.add_phase_ms(phase, ms);
    }

    /// Asks for questions. `None` when there are none yet (after the coordinator's retry
    /// hint, kept within 10 ms to 1 s) or the run is over.
    pub async fn lease(&mut self) -> Result<Option<Lease>, ActorError> {
        let started = Instant::now();
        self.lease_requests += 1;
        let request = LeaseRequest {
            actor_id: self.options.actor_id.clone(),
            max_questions: self.options.questions_per_lease,
            policy_version: self.version.get(),
            // Unique per actor process and request; the same when asked again below.
            request_id: format!("{}/{}", self.options.actor_id, self.lease_requests),
        };
        let coordinator = self.peers.coordinator.clone();
        let reply = self
            .ask_coordinator("LeasePrompts", || coordinator.lease(&request))
            .await?;
        match reply {
            LeaseReply::Finished => {
                self.finished.store(true, Ordering::SeqCst);
                Ok(None)
            }
            LeaseReply::Wait { retry_after } => {
                // Nothing to do until the learner publishes the next version.
                let wait = retry_after.clamp(Duration::from_millis(10), Duration::from_secs(1));
                tokio::time::sleep(wait).await;
                Ok(None)
            }
            LeaseReply::Granted(lease) => {
                self.add_phase_ms("lease", elapsed_ms(started));
                self.summary.leases += 1;
                ActorMetrics::add(&self.options.metrics.leases, 1);
                Ok(Some(lease))
            }
        }
    }

    /// One lease: weights at least as new as the lease, then each question rolled out, scored
    /// and pushed. A question that fails goes back with the lease's completion (all of them
    /// when the push fails); a peer failure outside a question ends the run with an error.
    #[tracing::instrument(skip_all, fields(lease = %lease.lease_id, lease_version = lease.policy_version))]
    pub async fn run_lease(&mut self, lease: Lease) -> Result<(), ActorError> {
        let started = Instant::now();
        let version = match self.sync_weights(lease.policy_version).await {
            Ok(version) => {
                self.weights_failing_since = None;
                version
            }
            Err(e) if e.weights_unavailable() => {
                return self.hand_back_without_weights(lease, e).await;
            }
            Err(e) => return Err(e),
        };
        self.add_phase_ms("weight_sync", elapsed_ms(started));
        let mut returned = Vec::new();
        let mut reasons = HandBack::default();
        for unreadable in &lease.unreadable {
            tracing::warn!(position = unreadable.position, error = %unreadable.error, "question handed back");
            returned.push(unreadable.position);
            reasons.add(&unreadable.error);
        }
        let mut groups = Vec::new();
        for item in &lease.items {
            match self.scored_group(&lease, item, version).await {
                Ok(group) => {
                    for (phase, ms) in &group.timings_ms {
                        self.add_phase_ms(phase, *ms);
                    }
                    let student = group
                        .responses
                        .iter()
                        .filter(|r| r.source == ResponseSource::Student);
                    let (n, tokens) =
                        student.fold((0, 0), |(n, t), r| (n + 1, t + r.token_ids.len() as u64));
                    let metrics = &self.options.metrics;
                    ActorMetrics::add(&metrics.generated_responses, n);
                    ActorMetrics::add(&metrics.generated_tokens, tokens);
                    groups.push(group);
                }
                Err(e) => {
                    tracing::warn!(position = item.position, error = %e, "question handed back");
                    returned.push(item.position);
                    reasons.add(&e);
                }
            }
        }
        let started = Instant::now();
        if !groups.is_empty()
            && let Err(e) = self.push(groups).await
        {
            returned = lease.positions();
            reasons.add(&e);
        }
        self.add_phase_ms("push", elapsed_ms(started));
        self.complete(&lease, returned, reasons.text()).await
    }

    /// The learner's weights could not be had (e.g. it is restarting): the whole lease goes back
    /// naming the failure, and the actor leases again after a pause. Past
    /// `coordinator_deadline` of such failures in a row the actor stops with the error.
    async fn hand_back_without_weights(
        &mut self,
        lease: Lease,
        error: ActorError,
    ) -> Result<(), ActorError> {
        let since = *self.weights_failing_since.get_or_insert_with(Instant::now);
        if since.elapsed() > self.options.coordinator_deadline {
            return Err(error);
        }
        tracing::warn!(error = %error, "no weights from the learner; handing the lease back");
        self.complete(&lease, lease.positions(), error.to_string())
            .await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        Ok(())
    }

    /// Asks the coordinator with `ask`, again with backoff (50 ms doubling to 2 s) while the
    /// outcome is unknown, for up to `coordinator_deadline` (5 s once the actor is stopping);
    /// the requests are keyed, so a repeat is answered like the first. Past the deadline the
    /// error names the call, how long and the last failure.
    async fn ask_coordinator<A, F, Fut>(
        &self,
        call: &'static str,
        mut ask: F,
    ) -> Result<A, ActorError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<A, ActorError>>,
    {
        let started = Instant::now();
        let mut deadline = started + self.options.coordinator_deadline;
        let mut backoff = Duration::from_millis(50);
        let mut attempts = 1u32;
        loop {
            if self.stop.load(Ordering::SeqCst) {
                deadline = deadline.min(Instant::now() + STOPPING_ASK_DEADLINE);
            }
            match ask().await {
                Ok(answer) => {
                    if attempts > 1 {
                        tracing::info!(call, attempts, "the coordinator answered again");
                    }
                    return Ok(answer);
                }
                Err(e) if e.outcome_unknown() && Instant::now() + backoff < deadline => {
                    tracing::warn!(call, attempts, error = %e, "coordinator call failed; asking again");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    attempts += 1;
                }
                Err(e) if e.outcome_unknown() => {
                    return Err(ActorError::CoordinatorGaveUp {
                        call,
                        waited_s: started.elapsed().as_secs(),
                        attempts,
                        last: Box::new(e),
                    });
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Makes the student hold at least version `needed`: the learner's weights are fetched
    /// (again every 50 ms while they are older, for up to `weight_timeout`) and applied whole.
    /// Returns the version the student samples with.
    pub async fn sync_weights(&mut self, needed: u64) -> Result<u64, ActorError> {
        if let Some(current) = self.version.get()
            && current >= needed
        {
            return Ok(current);
        }
        let deadline = Instant::now() + self.options.weight_timeout;
        loop {
            let payload = self.peers.learner.fetch_weights().await?;
            if payload.version >= needed {
                return self.apply_weights(payload).await;
            }
            if Instant::now() > deadline {
                return Err(ActorError::StaleWeights {
                    addr: self.peers.learner.addr().to_string(),
                    served: payload.version,
                    needed,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Loads a verified payload into the student; the model checks every tensor before it
    /// changes any, so a refused payload leaves the previous version in place.
    async fn apply_weights(&mut self, payload: WeightPayload) -> Result<u64, ActorError> {
        let student = self.student.clone();
        let version = payload.version;
        let bytes = payload.bytes.len() as u64;
        tokio::task::spawn_blocking(move || {
            let guard = student.write().expect("model lock");
            load_weights_from_bytes(
                &guard.model,
                &payload.bytes,
                &format!("<weights v{version}>"),
                LoadOptions::strict(),
            )
        })
        .await
        .map_err(|source| ActorError::Task {
            what: "applying weights",
            source,
        })??;
        self.version.set(version);
        self.summary.weight_syncs += 1;
        let metrics = &self.options.metrics;
        metrics.set_version(version);
        ActorMetrics::add(&metrics.weight_syncs, 1);
        ActorMetrics::add(&metrics.weight_bytes, bytes);
        tracing::info!(version, "weights applied");
        Ok(version)
    }

    /// A question's scored group: rolled out with `version`, scored, rewarded.
    #[tracing::instrument(skip_all, fields(position = item.position, question = %item.question.id))]
    pub async fn scored_group(
        &self,
        lease: &Lease,
        item: &LeaseItem,
        version: u64,
    ) -> Result<ScoredGroup, ActorError> {
        let rollouts = self.roll_out(item, version).await?;
        let (scores, scoring_ms) = self.score(&item.question, &rollouts).await?;
        let responses = {
            let student = self.student.read().expect("model lock");
            scored_responses(
                &student,
                &rollouts.student,
                &rollouts.teacher_answers,
                &scores,
                version,
            )?
        };
        Ok(ScoredGroup {
            lease_id: lease.lease_id.clone(),
            position: item.position,
            iteration: item.iteration,
            question: item.question.clone(),
            prompt_token_ids: rollouts.student.prompt_ids,
            responses,
            actor_id: self.options.actor_id.clone(),
            timings_ms: BTreeMap::from([
                ("generation".to_string(), rollouts.generation_ms),
                ("teacher".to_string(), rollouts.teacher_ms),
                ("scoring".to_string(), scoring_ms),
            ]),
        })
    }

    /// The student's G responses (sampled with `version`, seeded by position and version)
    /// and the teachers' answers, the teachers asked while the student samples.
    pub async fn roll_out(&self, item: &LeaseItem, version: u64) -> Result<Rollouts, ActorError> {
        let (teachers, student) = tokio::join!(
            self.teacher_answers(&item.question),
            self.sample_student(item, version)
        );
        let (teacher_answers, teacher_ms) = teachers?;
        let (student, generation_ms) = student?;
        Ok(Rollouts {
            student,
            teacher_answers,
            generation_ms,
            teacher_ms,
        })
    }

    async fn sample_student(
        &self,
        item: &LeaseItem,
        version: u64,
    ) -> Result<(StudentRollouts, f64), ActorError> {
        let started = Instant::now();
        let student = self.student.clone();
        let row = item.question.clone();
        let sampling = self.settings.student_sampling.clone();
        let group_size = self.settings.group_size;
        let seed = rollout_seed(self.options.seed, item.position, version);
        let rollouts = tokio::task::spawn_blocking(move || {
            let guard = student.read().expect("model lock");
            sample_student(&guard, &row, group_size, &sampling, seed)
        })
        .await
        .map_err(|source| ActorError::Task {
            what: "generation",
            source,
        })??;
        Ok((rollouts, elapsed_ms(started)))
    }

    /// The group's teacher slots: each teacher that is not benched asked in turn for its share
    /// (round-robin split), which must all come. A teacher that fails is benched (see
    /// [`TeacherHealth`]) and the question goes back naming it; the other teachers fill the
    /// slots meanwhile. With every teacher benched, the actor waits for the first to come off
    /// the bench (the failures still go back to the coordinator, which names them if the run
    /// stops advancing).
    async fn teacher_answers(
        &self,
        question: &Row,
    ) -> Result<(Vec<TeacherAnswer>, f64), ActorError> {
        let started = Instant::now();
        let sampling = self.settings.teacher_sampling.as_ref();
        let serving = self.serving_teachers().await;
        let split = teacher_split(serving.len(), self.settings.teacher_slots);
        let mut all = Vec::new();
        for (&t, &asked) in serving.iter().zip(&split) {
            if asked == 0 {
                continue;
            }
            let teacher = &self.peers.teachers[t];
            let answers = match teacher.answers(question, asked, sampling).await {
                Ok(mut answers) if answers.len() >= asked => {
                    answers.sort_by_key(|a| a.index);
                    answers
                }
                Ok(short) => {
                    let e = ActorError::TooFewAnswers {
                        addr: teacher.addr().to_string(),
                        sent: short.len(),
                        asked,
                    };
                    self.teacher_failed(t, &e);
                    return Err(e);
                }
                Err(e) => {
                    self.teacher_failed(t, &e);
                    return Err(e);
                }
            };
            self.teacher_served(t);
            all.extend(answers.into_iter().take(asked));
        }
        Ok((all, elapsed_ms(started)))
    }

    /// The teachers not benched now, in order; with all of them benched, waits until the first
    /// comes off the bench.
    async fn serving_teachers(&self) -> Vec<usize> {
        let (serving, next) = {
            let health = self.teacher_health.lock().expect("teacher health");
            let now = Instant::now();
            let serving: Vec<usize> = (0..health.len())
                .filter(|&t| health[t].benched_until.is_none_or(|u| u <= now))
                .collect();
            let next = health.iter().filter_map(|h| h.benched_until).min();
            (serving, next)
        };
        match next {
            Some(until) if serving.is_empty() => {
                let wait = until.saturating_duration_since(Instant::now());
                tracing::warn!(
                    wait_ms = wait.as_millis() as u64,
                    "every teacher is benched; waiting for the first to come back"
                );
                tokio::time::sleep(wait).await;
                let health = self.teacher_health.lock().expect("teacher health");
                (0..health.len())
                    .filter(|&t| health[t].benched_until.is_none_or(|u| u <= until))
                    .collect()
            }
            _ => serving,
        }
    }

    fn teacher_failed(&self, t: usize, error: &ActorError) {
        let mut health = self.teacher_health.lock().expect("teacher health");
        let h = &mut health[t];
        h.failures += 1;
        let bench = TeacherHealth::bench_time(h.failures);
        h.benched_until = Some(Instant::now() + bench);
        tracing::warn!(
            teacher = self.peers.teachers[t].addr(),
            failures = h.failures,
            bench_ms = bench.as_millis() as u64,
            %error,
            "teacher failed; benched (the other teachers fill its slots meanwhile)"
        );
    }

    fn teacher_served(&self, t: usize) {
        let mut health = self.teacher_health.lock().expect("teacher health");
        let h = &mut health[t];
        if h.failures > 0 {
            tracing::info!(
                teacher = self.peers.teachers[t].addr(),
                failures = h.failures,
                "teacher serving again"
            );
        }
        *h = TeacherHealth::default();
    }

    /// D's and the judge's scores of a group's responses (the student's, then the teachers'),
    /// exactly one per response.
    pub async fn score(
        &self,
        question: &Row,
        rollouts: &Rollouts,
    ) -> Result<(Vec<ResponseScore>, f64), ActorError> {
        let started = Instant::now();
        let mut texts = rollouts.student.texts.clone();
        texts.extend(rollouts.teacher_answers.iter().map(|a| a.text.clone()));
        let discriminator = &self.peers.discriminator;
        let scores = discriminator.score(question, &texts).await?;
        if scores.len() != texts.len() {
            return Err(ActorError::ScoreCount {
                addr: discriminator.addr().to_string(),
                scores: scores.len(),
                responses: texts.len(),
            });
        }
        Ok((scores, elapsed_ms(started)))
    }

    /// Pushes a lease's groups and counts the learner's verdicts. An error when the push
    /// failed: the learner may not have them, so their questions go back.
    pub async fn push(&mut self, groups: Vec<ScoredGroup>) -> Result<(), ActorError> {
        let n = groups.len();
        match self.peers.learner.push_groups(groups).await {
            Ok(verdicts) => {
                for verdict in verdicts {
                    match verdict.refused {
                        None => {
                            self.summary.groups_pushed += 1;
                            ActorMetrics::add(&self.options.metrics.groups_pushed, 1);
                        }
                        Some(reason) => {
                            self.summary.groups_refused += 1;
                            ActorMetrics::add(&self.options.metrics.groups_refused, 1);
                            tracing::warn!(position = verdict.position, %reason, "group refused by the learner");
                        }
                    }
                }
                Ok(())
            }
            Err(e) => {
                tracing::warn!(groups = n, error = %e, "push failed; handing the questions back");
                Err(e)
            }
        }
    }

    /// Tells the coordinator the lease is done; `returned_positions` are re-issued at once,
    /// `reason` says why. Asked again while the outcome is unknown (a lease is completed once,
    /// so a repeat changes nothing).
    pub async fn complete(
        &mut self,
        lease: &Lease,
        returned_positions: Vec<u64>,
        reason: String,
    ) -> Result<(), ActorError> {
        self.summary.positions_returned += returned_positions.len() as u64;
        ActorMetrics::add(
            &self.options.metrics.questions_returned,
            returned_positions.len() as u64,
        );
        let completion = LeaseCompletion {
            actor_id: self.options.actor_id.clone(),
            lease_id: lease.lease_id.clone(),
            returned_positions,
            reason,
        };
        let coordinator = self.peers.coordinator.clone();
        self.ask_coordinator("CompleteLease", || coordinator.complete_lease(&completion))
            .await
    }
}
