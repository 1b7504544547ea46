//! Training steps: rank 0's loop over complete iterations (shard, train, install the weights,
//! train D, publish, record), and a rank > 0's step on the shard rank 0 sends it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use super::discriminator::step_metrics;
use super::{Buffered, CoordinatorLink, IncomingGroup, LearnerService, poisoned, shard_of};
use crate::error::{LearnerError, Result};
use crate::grpo::{Group, GrpoStats};
use crate::trainer::{TrainerState, WeightsPayload};

/// Whether all ranks compare their weights after reaching `version`.
fn verify_due(verify_every: u64, version: u64) -> bool {
    verify_every > 0 && version.is_multiple_of(verify_every)
}

/// What rank 0's own step produced.
struct LocalStep {
    report: StepReport,
    /// The step's metrics line, as written to `metrics.jsonl`.
    metrics: BTreeMap<String, f64>,
    payload: WeightsPayload,
    state: TrainerState,
}

/// What rank 0's step needs besides its groups, to write the step's metrics line.
struct StepContext {
    n_groups: usize,
    stale: u64,
    actor_timings_ms: BTreeMap<String, f64>,
    started: Instant,
    /// D's step on this iteration's responses (trained before the policy step).
    discriminator: BTreeMap<String, f64>,
    metrics_path: PathBuf,
}

/// A finished step, as it is published, logged and reported.
struct StepReport {
    stats: GrpoStats,
    version: u64,
    iteration: u64,
    seconds: f64,
    n_groups: usize,
    groups_trained: u64,
    stale_groups_dropped: u64,
    /// The actors' mean phase timings over the iteration's groups.
    actor_timings_ms: BTreeMap<String, f64>,
    checkpoint: Option<PathBuf>,
}

impl StepReport {
    fn metrics(&self, discriminator: BTreeMap<String, f64>) -> BTreeMap<String, f64> {
        let mut metrics = self.stats.metrics();
        for (name, value) in [
            ("version", self.version as f64),
            ("step_seconds", self.seconds),
            ("groups_per_second", self.n_groups as f64 / self.seconds),
            ("groups_trained", self.groups_trained as f64),
            ("stale_groups_dropped", self.stale_groups_dropped as f64),
        ] {
            metrics.insert(name.to_string(), value);
        }
        for (k, mean) in &self.actor_timings_ms {
            metrics.insert(format!("actor_{k}_ms"), *mean);
        }
        metrics.extend(discriminator);
        metrics
    }

    fn log(&self) {
        let stats = &self.stats;
        let nan = f64::NAN;
        tracing::info!(
            target: "ril_learner::step",
            iteration = self.iteration,
            version = self.version,
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
            stale_groups_dropped = self.stale_groups_dropped,
            seconds = self.seconds,
            checkpoint = self
                .checkpoint
                .as_ref()
                .map(|c| c.display().to_string())
                .unwrap_or_default(),
            "learner step"
        );
    }
}

/// The mean of each actor phase timing over the groups that carry it.
fn mean_timings(batch: &[Buffered]) -> BTreeMap<String, f64> {
    let mut sums: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for g in batch {
        for (k, v) in &g.timings_ms {
            let e = sums.entry(k.clone()).or_default();
            e.0 += v;
            e.1 += 1.0;
        }
    }
    sums.into_iter().map(|(k, (sum, n))| (k, sum / n)).collect()
}

/// Group i (in position order) to rank i % R: rank 0's own groups, and every rank's shard in
/// its wire form (rank 0's entry empty).
fn split_into_shards(
    mut batch: Vec<Buffered>,
    world: u32,
) -> Result<(Vec<Group>, Vec<Vec<IncomingGroup>>)> {
    batch.sort_by_key(|b| b.key.position);
    let mut shards: Vec<Vec<IncomingGroup>> = vec![Vec::new(); world as usize];
    let mut own: Vec<Group> = Vec::new();
    for (i, b) in batch.into_iter().enumerate() {
        match shard_of(i, world) {
            0 => own.push(b.group),
            r => shards[r].push(b.incoming.ok_or(LearnerError::ShardFormMissing {
                position: b.key.position,
            })?),
        }
    }
    Ok((own, shards))
}

/// A group's question to hand back: its position, the lease it came under, and why.
struct HandBack {
    position: u64,
    lease_id: String,
    reason: String,
}

impl<C: CoordinatorLink> LearnerService<C> {
    /// Trains complete iterations one after the other until none is ready; a failed step stops
    /// the learner.
    pub(super) async fn run_training(self, mut batch: Vec<Buffered>) {
        loop {
            let positions: Vec<(u64, String)> = batch
                .iter()
                .map(|b| (b.key.position, b.key.lease_id.clone()))
                .collect();
            if let Err(e) = self.train_one(batch).await {
                self.stop_after_failed_step(positions, e).await;
                return;
            }
            let (next, returns) = self.settle_buffers_after_step();
            for r in returns {
                self.return_question(r.position, &r.lease_id, &r.reason, self.commit_deadline())
                    .await;
            }
            match next {
                Some(b) => batch = b,
                None => return,
            }
        }
    }

    async fn stop_after_failed_step(&self, positions: Vec<(u64, String)>, e: LearnerError) {
        tracing::error!(error = %e, "training step failed; the learner takes no more groups");
        // The iteration was not trained: its questions go back to the coordinator, so a learner
        // resumed from the last checkpoint gets them again.
        let reason = format!("the learner's training step failed: {e}");
        for (position, lease_id) in positions {
            self.return_question(position, &lease_id, &reason, self.commit_deadline())
                .await;
        }
        let mut p = self.lock_pending();
        p.failed = Some(Arc::new(e));
        p.training = false;
        self.publish_progress(&p);
    }

    /// After a step: the next iteration's early groups may have gone stale (they are dropped,
    /// to be handed back), or may already be complete (the next batch).
    /// The returns are (position, lease, reason).
    fn settle_buffers_after_step(&self) -> (Option<Vec<Buffered>>, Vec<HandBack>) {
        let mut p = self.lock_pending();
        p.training = false;
        let mut returns = Vec::new();
        let iteration = p.iteration;
        let version = p.version;
        // Nothing of an iteration already trained stays behind (defensive: pushes check this
        // too).
        let past: Vec<u64> = p.buffers.range(..iteration).map(|(k, _)| *k).collect();
        for k in past {
            for g in p.buffers.remove(&k).unwrap_or_default() {
                returns.push(HandBack {
                    position: g.key.position,
                    lease_id: g.key.lease_id.clone(),
                    reason: format!("iteration {k} was trained without this group"),
                });
            }
        }
        if let Some(buf) = p.buffers.remove(&iteration) {
            let mut keep = Vec::with_capacity(buf.len());
            let mut stale = Vec::new();
            for g in buf {
                match self.stale_reason(g.oldest_student_version, version) {
                    Some(reason) => stale.push(HandBack {
                        position: g.key.position,
                        lease_id: g.key.lease_id.clone(),
                        reason,
                    }),
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
    }

    /// One update on a complete iteration (rank 0's shard here, the others' through the peer
    /// ranks), then D's step, publication and the step's record.
    async fn train_one(&self, batch: Vec<Buffered>) -> Result<()> {
        let n_groups = batch.len();
        let actor_timings_ms = mean_timings(&batch);
        let (own, shards) = split_into_shards(batch, self.inner.options.world_size)?;
        let stale = self.lock_pending().stale_groups_dropped;
        let started = Instant::now();
        let iteration_now = self.lock_pending().iteration;
        // D learns from this iteration's responses first (its update only matters to the next
        // version's groups, scored after it is published), so that the step's metrics line is
        // whole when it is written, before the checkpoint.
        let discriminator = self.train_discriminator(iteration_now).await;
        let context = StepContext {
            n_groups,
            stale,
            actor_timings_ms,
            started,
            discriminator,
            metrics_path: (self.inner.options.out_dir).join(crate::metrics_log::METRICS_FILE),
        };
        let (local, remote) = tokio::join!(
            self.train_own_shard(own, context),
            self.send_shards(iteration_now, shards)
        );
        let local = local.map_err(LearnerError::task("the training thread"))?;
        remote?;
        let step = local?;
        self.install_weights(step.payload)?;
        {
            let mut p = self.lock_pending();
            p.version = step.state.version;
            p.iteration = step.state.iteration;
            if step.report.checkpoint.is_some() {
                p.last_checkpoint = step.report.checkpoint.clone();
            }
            self.publish_progress(&p);
        }
        self.publish_version(&step.report).await;
        self.record_step(&step.report, step.metrics).await;
        Ok(())
    }

    /// Rank 0's part of the step, on a blocking thread: train, serialise the weights, verify
    /// the replicas when due, write the step's metrics line, checkpoint when due. The line comes
    /// before the checkpoint: a learner killed between them resumes from the previous
    /// checkpoint, which drops the line (`metrics_log::truncate_after`) and writes it again;
    /// killed after, the line is there. So every version is in `metrics.jsonl` once.
    async fn train_own_shard(
        &self,
        groups: Vec<Group>,
        context: StepContext,
    ) -> std::result::Result<Result<LocalStep>, tokio::task::JoinError> {
        let trainer = self.inner.trainer.clone();
        let opts = &self.inner.options;
        let (save_every, total, verify_every) =
            (opts.save_every, opts.total_iterations, opts.verify_every);
        tokio::task::spawn_blocking(move || {
            let mut t = trainer.lock().map_err(poisoned)?;
            t.set_stale_groups_dropped(context.stale);
            let stats = t.train_shard(groups, context.n_groups)?;
            let payload = t.weights_payload()?;
            let version = t.state().version;
            if verify_due(verify_every, version) {
                t.verify_replicas(&payload)?;
            }
            let mut report = StepReport {
                version,
                iteration: version - 1,
                seconds: context.started.elapsed().as_secs_f64(),
                n_groups: context.n_groups,
                groups_trained: t.state().groups_trained,
                stale_groups_dropped: context.stale,
                actor_timings_ms: context.actor_timings_ms,
                checkpoint: None,
                stats,
            };
            let metrics = report.metrics(context.discriminator);
            let line = crate::metrics_log::append(
                &context.metrics_path,
                report.iteration,
                version,
                &metrics,
            );
            if let Err(e) = line {
                tracing::warn!(error = %e, "writing the step's metrics line failed");
            }
            if (save_every > 0 && version.is_multiple_of(save_every)) || version >= total {
                report.checkpoint = Some(t.save_checkpoint()?);
            }
            Ok(LocalStep {
                report,
                metrics,
                payload,
                state: t.state().clone(),
            })
        })
        .await
    }

    /// Sends ranks 1..R their shards (concurrently) and checks they all reach the next version.
    async fn send_shards(&self, iteration: u64, shards: Vec<Vec<IncomingGroup>>) -> Result<()> {
        let Some(peers) = &self.inner.ranks else {
            return Ok(());
        };
        let calls = shards
            .into_iter()
            .enumerate()
            .skip(1)
            .map(|(r, shard)| peers.train_shard(r as u32, iteration, shard));
        for (r, result) in futures_util::future::join_all(calls)
            .await
            .into_iter()
            .enumerate()
        {
            let v = result?;
            if v != iteration + 1 {
                return Err(LearnerError::Collective(format!(
                    "learner rank {} is at version {v} after iteration {iteration}, rank 0 at {}",
                    r + 1,
                    iteration + 1
                )));
            }
        }
        Ok(())
    }

    fn install_weights(&self, payload: WeightsPayload) -> Result<()> {
        *self.inner.weights.write().map_err(poisoned)? = Arc::new(payload);
        Ok(())
    }

    /// D's step on the iteration's responses, before the version is published. A failure is
    /// logged, not fatal: D misses one step.
    async fn train_discriminator(&self, iteration: u64) -> BTreeMap<String, f64> {
        let Some(d) = &self.inner.discriminator else {
            return BTreeMap::new();
        };
        let groups = d.buffer.take(iteration);
        let items: usize = groups.iter().map(|g| g.responses.len()).sum();
        if items == 0 {
            return BTreeMap::new();
        }
        let trained = d.link.train(iteration, groups).await;
        {
            let mut p = self.lock_pending();
            p.discriminator_failed = trained.as_ref().err().map(ToString::to_string);
            self.publish_progress(&p);
        }
        match trained {
            Ok(step) => step_metrics(&step, items),
            Err(e) => {
                tracing::warn!(iteration, error = %e, "the discriminator step failed; the policy trains on");
                BTreeMap::from([(super::discriminator::D_TRAIN_FAILED.to_string(), 1.0)])
            }
        }
    }

    /// PublishVersion, asked again while the outcome is unknown (the coordinator restarting, a
    /// lost answer: publishing the same version and checkpoint again is harmless) until
    /// `commit_deadline_ms`. A version that never gets through stops the learner: the actors
    /// would otherwise wait for it for ever.
    async fn publish_version(&self, report: &StepReport) {
        let version = report.version;
        let link = &self.inner.link;
        let answer = self
            .ask_until("PublishVersion", version, self.commit_deadline(), || {
                link.publish_version(version, report.iteration, report.checkpoint.clone())
            })
            .await;
        if let Err((e, attempts)) = answer {
            tracing::error!(version, attempts, error = %e, "PublishVersion failed");
            self.stop_for(e);
        }
    }

    /// The step's diagnostics, its log line and ReportMetrics (its metrics line is written
    /// with the step, before the checkpoint).
    async fn record_step(&self, report: &StepReport, metrics: BTreeMap<String, f64>) {
        self.inner
            .exported
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .step(report.iteration, report.seconds, &metrics);
        let options = &self.inner.options;
        let stats = &report.stats;
        let signals = crate::diagnostics::StepSignals {
            d_accuracy: stats.d_accuracy,
            // Without the similarity reward in R the policy is not optimising it: no gaming.
            reward_sim_student: stats
                .reward_sim_student_mean
                .filter(|_| options.grpo.use_sim_reward),
            reward_ans_student: stats.reward_ans_student_mean,
            kl: stats.kl_mean,
            entropy: stats.entropy_mean,
        };
        let warnings = self
            .inner
            .diagnostics
            .lock()
            .map(|mut d| d.observe(report.version, signals))
            .unwrap_or_default();
        for w in warnings {
            tracing::warn!(version = report.version, "{w}");
        }
        report.log();
        if let Err(e) = self
            .inner
            .link
            .report_metrics(report.iteration, metrics)
            .await
        {
            tracing::warn!(iteration = report.iteration, error = %e, "ReportMetrics failed");
        }
    }

    /// Rank r > 0: trains on its shard of `iteration` (sent by rank 0; possibly empty), in
    /// step with the other ranks through the collective, and returns the new version. Only
    /// rank 0 publishes, reports and checkpoints.
    pub async fn train_shard(&self, iteration: u64, shard: Vec<IncomingGroup>) -> Result<u64> {
        self.start_shard(iteration)?;
        let n_groups = shard.len();
        let result = self.train_shard_inner(shard).await;
        let mut p = self.lock_pending();
        p.training = false;
        let result = match result {
            Ok((version, iteration)) => {
                tracing::info!(
                    rank = self.inner.options.rank,
                    version,
                    groups = n_groups,
                    "learner shard trained"
                );
                p.version = version;
                p.iteration = iteration;
                Ok(version)
            }
            Err(e) => {
                let e = Arc::new(e);
                p.failed = Some(e.clone());
                Err(LearnerError::Stopped(e))
            }
        };
        self.publish_progress(&p);
        result
    }

    /// Whether this rank takes a shard of `iteration` now; marks it training if so.
    fn start_shard(&self, iteration: u64) -> Result<()> {
        if self.inner.options.rank == 0 {
            return Err(LearnerError::ShardToRankZero);
        }
        let mut p = self.lock_pending();
        if let Some(f) = &p.failed {
            return Err(LearnerError::Stopped(f.clone()));
        }
        if p.closing {
            return Err(LearnerError::ShuttingDown);
        }
        if p.training {
            return Err(LearnerError::ShardWhileTraining {
                iteration: p.iteration,
            });
        }
        if iteration != p.iteration {
            return Err(LearnerError::ShardOutOfStep {
                iteration,
                rank_iteration: p.iteration,
                version: p.version,
            });
        }
        p.training = true;
        self.publish_progress(&p);
        Ok(())
    }

    async fn train_shard_inner(&self, shard: Vec<IncomingGroup>) -> Result<(u64, u64)> {
        let preparer = self.inner.preparer.clone();
        let trainer = self.inner.trainer.clone();
        let verify_every = self.inner.options.verify_every;
        let rank = self.inner.options.rank;
        let (payload, state) = tokio::task::spawn_blocking(move || {
            let groups = shard
                .iter()
                .map(|g| preparer.prepare(g))
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|source| LearnerError::ShardRejected { rank, source })?;
            let n = groups.len();
            let mut t = trainer.lock().map_err(poisoned)?;
            t.train_shard(groups, n)?;
            let payload = t.weights_payload()?;
            if verify_due(verify_every, t.state().version) {
                t.verify_replicas(&payload)?;
            }
            Ok::<_, LearnerError>((payload, t.state().clone()))
        })
        .await
        .map_err(LearnerError::task("the training thread"))??;
        self.install_weights(payload)?;
        Ok((state.version, state.iteration))
    }
}
