//! The gRPC adapter: `ril.v1.Coordinator` over the domain [`Coordinator`], plus `serve`.
//!
//! Requests are converted and validated at this boundary; each call runs the domain logic on the
//! blocking pool (a change may fsync the state file). Until the dataset and state are loaded the
//! service answers `UNAVAILABLE` and health reports NOT_SERVING.

use std::future::Future;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use ril_proto::server::{self, Bound, ServingStatus, names};
use ril_proto::v1;
use ril_proto::v1::coordinator_server::{Coordinator as CoordinatorService, CoordinatorServer};
use tonic::{Request, Response, Status};

use crate::coordinator::{Acceptance, Coordinator, Now};
use crate::error::{CoordinatorError, Result};
use crate::options::CoordinatorOptions;

impl From<CoordinatorError> for Status {
    fn from(e: CoordinatorError) -> Self {
        match &e {
            CoordinatorError::InvalidArgument { .. } => Status::invalid_argument(e.to_string()),
            CoordinatorError::FailedPrecondition(_) => Status::failed_precondition(e.to_string()),
            CoordinatorError::Unavailable(_) => Status::unavailable(e.to_string()),
            CoordinatorError::PermissionDenied(_) => Status::permission_denied(e.to_string()),
            _ => Status::internal(e.to_string()),
        }
    }
}

type Shared = Arc<Mutex<Coordinator>>;

/// `ril.v1.Coordinator` served from a domain [`Coordinator`] (set once it is loaded).
#[derive(Clone)]
pub struct CoordinatorGrpc {
    state: Arc<OnceLock<Shared>>,
    options: Arc<CoordinatorOptions>,
}

impl std::fmt::Debug for CoordinatorGrpc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoordinatorGrpc")
            .field("loaded", &self.state.get().is_some())
            .finish()
    }
}

impl CoordinatorGrpc {
    /// An adapter over an already opened coordinator.
    pub fn new(coordinator: Coordinator) -> Self {
        let options = Arc::new(coordinator.options().clone());
        let state = Arc::new(OnceLock::new());
        let _ = state.set(Arc::new(Mutex::new(coordinator)));
        Self { state, options }
    }

    fn loading(options: CoordinatorOptions) -> Self {
        Self {
            state: Arc::new(OnceLock::new()),
            options: Arc::new(options),
        }
    }

    /// The generated server with the project's message-size limits.
    pub fn into_server(self) -> CoordinatorServer<Self> {
        CoordinatorServer::new(self)
            .max_decoding_message_size(server::DEFAULT_MAX_MESSAGE_BYTES)
            .max_encoding_message_size(server::DEFAULT_MAX_MESSAGE_BYTES)
    }

    /// Runs `f` on the coordinator on the blocking pool.
    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Coordinator, Now) -> Result<T> + Send + 'static,
    ) -> std::result::Result<T, Status> {
        let shared =
            self.state.get().cloned().ok_or_else(|| {
                Status::unavailable("the coordinator is still loading its dataset")
            })?;
        tokio::task::spawn_blocking(move || {
            let mut c = lock(&shared);
            f(&mut c, Now::current())
        })
        .await
        .map_err(|e| Status::internal(format!("coordinator task failed: {e}")))?
        .map_err(Status::from)
    }
}

/// Locks the coordinator. A panic inside a change leaves the book untouched (changes work on a
/// copy), so a poisoned lock is still consistent.
fn lock(shared: &Mutex<Coordinator>) -> std::sync::MutexGuard<'_, Coordinator> {
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[tonic::async_trait]
impl CoordinatorService for CoordinatorGrpc {
    async fn register_actor(
        &self,
        request: Request<v1::RegisterActorRequest>,
    ) -> std::result::Result<Response<v1::RegisterActorResponse>, Status> {
        let r = request.into_inner();
        let configured = self.options.actor.learner_addr.clone();
        let (run_id, learner_addr) = self
            .with(move |c, now| {
                // Without a configured learner address, actors get rank 0's joined one; until
                // it has joined they are told to come back.
                let learner = if configured.is_empty() {
                    c.learner_rank0_addr()
                } else {
                    Some(configured)
                };
                match learner {
                    Some(l) => Ok((c.register_actor(&r.actor_id, &r.device, now)?, l)),
                    None => Err(CoordinatorError::Unavailable(
                        "learner rank 0 has not joined yet".into(),
                    )),
                }
            })
            .await?;
        let o = &self.options;
        let a = &o.actor;
        Ok(Response::new(v1::RegisterActorResponse {
            run_id,
            heartbeat_interval_ms: ms(o.heartbeat_interval),
            lease_timeout_ms: ms(o.lease_timeout),
            group_size: a.group_size,
            teacher_addrs: a.teacher_addrs.clone(),
            discriminator_addr: a.discriminator_addr.clone(),
            learner_addr,
            sampling: Some(a.sampling),
            teacher_sampling: Some(a.teacher_sampling),
            teacher_slots: a.teacher_slots,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<v1::HeartbeatRequest>,
    ) -> std::result::Result<Response<v1::HeartbeatResponse>, Status> {
        let r = request.into_inner();
        let h = self
            .with(move |c, now| c.heartbeat(&r.actor_id, r.policy_version, now))
            .await?;
        Ok(Response::new(v1::HeartbeatResponse {
            latest_version: h.latest_version,
            known: h.known,
            run_finished: h.run_finished,
        }))
    }

    async fn lease_prompts(
        &self,
        request: Request<v1::LeasePromptsRequest>,
    ) -> std::result::Result<Response<v1::LeasePromptsResponse>, Status> {
        let r = request.into_inner();
        let g = self
            .with(move |c, now| c.lease(&r.actor_id, r.max_questions, r.policy_version, now))
            .await?;
        Ok(Response::new(v1::LeasePromptsResponse {
            lease_id: g.lease_id,
            deadline_unix_ms: g.deadline_unix_ms,
            policy_version: g.policy_version,
            items: g
                .items
                .iter()
                .map(|i| v1::LeaseItem {
                    position: i.position,
                    iteration: i.iteration,
                    question: Some(ril_proto::convert::row_to_question(&i.row)),
                })
                .collect(),
            retry_after_ms: g.retry_after_ms,
            run_finished: g.run_finished,
        }))
    }

    async fn complete_lease(
        &self,
        request: Request<v1::CompleteLeaseRequest>,
    ) -> std::result::Result<Response<v1::CompleteLeaseResponse>, Status> {
        let r = request.into_inner();
        self.with(move |c, now| {
            c.complete_lease(&r.actor_id, &r.lease_id, &r.returned_positions, now)
        })
        .await?;
        Ok(Response::new(v1::CompleteLeaseResponse {}))
    }

    async fn accept_group(
        &self,
        request: Request<v1::AcceptGroupRequest>,
    ) -> std::result::Result<Response<v1::AcceptGroupResponse>, Status> {
        let r = request.into_inner();
        let a = self
            .with(move |c, now| {
                c.check_publisher(&r.publisher_key, "AcceptGroup")?;
                c.accept_group(&r.lease_id, r.position, &r.question_id, r.iteration, now)
            })
            .await?;
        Ok(Response::new(match a {
            Acceptance::Accepted => v1::AcceptGroupResponse {
                accepted: true,
                reason: String::new(),
            },
            Acceptance::Refused(reason) => v1::AcceptGroupResponse {
                accepted: false,
                reason,
            },
        }))
    }

    async fn return_question(
        &self,
        request: Request<v1::ReturnQuestionRequest>,
    ) -> std::result::Result<Response<v1::ReturnQuestionResponse>, Status> {
        let r = request.into_inner();
        self.with(move |c, now| c.return_question(r.position, &r.reason, now))
            .await?;
        Ok(Response::new(v1::ReturnQuestionResponse {}))
    }

    async fn publish_version(
        &self,
        request: Request<v1::PublishVersionRequest>,
    ) -> std::result::Result<Response<v1::PublishVersionResponse>, Status> {
        let r = request.into_inner();
        self.with(move |c, now| {
            c.check_publisher(&r.publisher_key, "PublishVersion")?;
            c.publish_version(r.version, r.iteration, &r.checkpoint, now)
        })
        .await?;
        Ok(Response::new(v1::PublishVersionResponse {}))
    }

    async fn join_learner(
        &self,
        request: Request<v1::JoinLearnerRequest>,
    ) -> std::result::Result<Response<v1::JoinLearnerResponse>, Status> {
        let r = request.into_inner();
        let j = self
            .with(move |c, now| {
                if r.rank == 0 {
                    c.set_publisher(&r.publisher_key, now)?;
                } else if !r.publisher_key.is_empty() {
                    return Err(CoordinatorError::invalid(
                        "publisher_key",
                        format!(
                            "only rank 0 brings a publisher key (rank {} sent one)",
                            r.rank
                        ),
                    ));
                }
                c.join_learner(
                    r.rank,
                    &r.addr,
                    &r.collective_id,
                    &r.collective_addr,
                    r.version,
                    now,
                )
            })
            .await?;
        Ok(Response::new(v1::JoinLearnerResponse {
            world_size: j.world_size,
            ready: j.ready,
            rank_addrs: j.rank_addrs,
            collective_id: j.collective_id.into(),
            collective_addrs: j.collective_addrs,
        }))
    }

    async fn report_metrics(
        &self,
        request: Request<v1::ReportMetricsRequest>,
    ) -> std::result::Result<Response<v1::ReportMetricsResponse>, Status> {
        let r = request.into_inner();
        self.with(move |c, _| c.report_metrics(r.iteration, r.metrics))
            .await?;
        Ok(Response::new(v1::ReportMetricsResponse {}))
    }

    async fn get_status(
        &self,
        _request: Request<v1::GetStatusRequest>,
    ) -> std::result::Result<Response<v1::RunStatus>, Status> {
        let s = self.with(|c, now| Ok(c.status(now))).await?;
        Ok(Response::new(v1::RunStatus {
            run_id: s.run_id,
            policy_version: s.policy_version,
            iteration: s.iteration,
            total_iterations: s.total_iterations,
            cursor: s.cursor,
            groups_accepted: s.groups_accepted,
            duplicates_refused: s.duplicates_refused,
            leases_expired: s.leases_expired,
            leases_outstanding: s.leases_outstanding,
            actors: s
                .actors
                .into_iter()
                .map(|a| v1::ActorStatus {
                    actor_id: a.actor_id,
                    device: a.device,
                    policy_version: a.policy_version,
                    last_seen_ms_ago: a.last_seen_ms_ago,
                    alive: a.alive,
                    groups_leased: a.groups_leased,
                })
                .collect(),
            metrics: s.metrics.into_iter().collect(),
            groups_per_second: s.groups_per_second,
            finished: s.finished,
            learner_world_size: s.learner_world_size,
            learner_ranks_joined: s.learner_ranks_joined,
        }))
    }
}

/// How often the background ticker expires leases: a quarter of the shortest timeout, between
/// 10 ms and 1 s.
fn tick_interval(options: &CoordinatorOptions) -> Duration {
    (options.lease_timeout.min(options.actor_timeout) / 4)
        .clamp(Duration::from_millis(10), Duration::from_secs(1))
}

/// Serves `ril.v1.Coordinator` (with grpc.health.v1 and reflection) on `bound` until `shutdown`
/// resolves, then drains in-flight calls and writes the state file.
///
/// The server answers at once: health says NOT_SERVING (for `ril.v1.Coordinator` and the server
/// as a whole) while the dataset is checked and the state loaded, SERVING after. A dataset or
/// state that cannot be loaded stops the server and is returned.
pub async fn serve(
    options: CoordinatorOptions,
    bound: Bound,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    options.validate()?;
    let addr = bound.addr;
    let (reporter, health) = server::health([names::COORDINATOR]).await;
    let (reflection_v1, reflection_v1alpha) = server::reflection()?;
    let grpc = CoordinatorGrpc::loading(options.clone());
    let slot = grpc.state.clone();
    let abort = Arc::new(tokio::sync::Notify::new());
    let stop = {
        let abort = abort.clone();
        let reporter = reporter.clone();
        async move {
            tokio::select! {
                _ = shutdown => tracing::info!(%addr, "coordinator shutting down"),
                _ = abort.notified() => {}
            }
            server::set_status(&reporter, &[names::COORDINATOR], ServingStatus::NotServing).await;
        }
    };
    let serving = bound
        .server(&health)
        .await?
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(grpc.into_server())
        .serve_with_incoming_shutdown(server::incoming(bound), stop);
    tokio::pin!(serving);
    tracing::info!(%addr, dataset = %options.dataset.display(), "coordinator listening; loading the dataset");

    let tick = tick_interval(&options);
    let mut loading = tokio::task::spawn_blocking(move || Coordinator::open(options));
    let shared: Shared = tokio::select! {
        served = &mut serving => {
            // Stopped (shutdown, or the server failed) before the state was loaded.
            served.map_err(|source| ril_proto::server::ServeError::Serve { addr, source })?;
            return Ok(());
        }
        loaded = &mut loading => {
            match loaded.map_err(|e| CoordinatorError::Internal(format!("loading task: {e}"))).and_then(|r| r) {
                Ok(c) => Arc::new(Mutex::new(c)),
                Err(e) => {
                    abort.notify_one();
                    if let Err(source) = serving.await {
                        tracing::warn!(%addr, error = %source, "coordinator server stopped with an error");
                    }
                    return Err(e);
                }
            }
        }
    };
    let _ = slot.set(shared.clone());
    server::set_status(&reporter, &[names::COORDINATOR], ServingStatus::Serving).await;
    tracing::info!(%addr, "coordinator serving");

    let ticker = {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(tick);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                let shared = shared.clone();
                let _ =
                    tokio::task::spawn_blocking(move || lock(&shared).expire(Now::current())).await;
            }
        })
    };
    let served = serving.await;
    ticker.abort();
    let _ = ticker.await;
    let persisted = tokio::task::spawn_blocking(move || lock(&shared).close())
        .await
        .map_err(|e| CoordinatorError::Internal(format!("persisting task: {e}")))?;
    served.map_err(|source| ril_proto::server::ServeError::Serve { addr, source })?;
    persisted?;
    tracing::info!(%addr, "coordinator stopped; state written");
    Ok(())
}
