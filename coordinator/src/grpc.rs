//! The gRPC adapter: `ril.v1.Coordinator` over the domain [`Coordinator`], plus `serve`.
//!
//! Requests are converted and validated at this boundary; each call runs the domain logic on the
//! blocking pool (a change may fsync the state file). Until the dataset and state are loaded the
//! service answers `UNAVAILABLE` and health reports NOT_SERVING.

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ril_proto::error::status;
use ril_proto::server::{self, Bound, ServingStatus, names};
use ril_proto::v1;
use ril_proto::v1::coordinator_server::{Coordinator as CoordinatorService, CoordinatorServer};
use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::commit::Committed;
use crate::convert::{
    AcceptGroup, CompleteLease, Heartbeat, JoinLearner, LeaseRequest, PublishVersion,
    RegisterActor, ReportMetrics, ReturnQuestion, registration,
};
use crate::coordinator::{Coordinator, Now};
use crate::error::{CoordinatorError, Result};
use crate::options::CoordinatorOptions;

type Shared = Arc<Committed>;

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
        let _ = state.set(Arc::new(Committed::new(coordinator)));
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

    /// Runs `f` on the coordinator on the blocking pool; answers once what `f` changed or read
    /// is in the state file (group commit, [`Committed::run`]).
    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Coordinator, Now) -> Result<T> + Send + 'static,
    ) -> std::result::Result<T, Status> {
        let shared = self.state.get().cloned().ok_or_else(|| {
            status(&CoordinatorError::Unavailable(
                "the coordinator is still loading its dataset".into(),
            ))
        })?;
        tokio::task::spawn_blocking(move || shared.run(f))
            .await
            .map_err(|e| CoordinatorError::Internal(format!("coordinator task failed: {e}")))
            .and_then(|r| r)
            .map_err(|e| status(&e))
    }
}

/// A request converted into its domain form, or INVALID_ARGUMENT naming the field.
fn convert<T, R>(request: Request<R>) -> std::result::Result<T, Status>
where
    T: TryFrom<R, Error = CoordinatorError>,
{
    T::try_from(request.into_inner()).map_err(|e| status(&e))
}

#[tonic::async_trait]
impl CoordinatorService for CoordinatorGrpc {
    #[instrument(skip(self, request))]
    async fn register_actor(
        &self,
        request: Request<v1::RegisterActorRequest>,
    ) -> std::result::Result<Response<v1::RegisterActorResponse>, Status> {
        let r: RegisterActor = convert(request)?;
        let (run_id, learner_addr) = self
            .with(move |c, now| {
                let learner_addr = c.learner_addr_for_actors()?;
                Ok((c.register_actor(&r.actor_id, &r.device, now)?, learner_addr))
            })
            .await?;
        Ok(Response::new(registration(
            &self.options,
            run_id,
            learner_addr,
        )))
    }

    #[instrument(skip(self, request))]
    async fn heartbeat(
        &self,
        request: Request<v1::HeartbeatRequest>,
    ) -> std::result::Result<Response<v1::HeartbeatResponse>, Status> {
        let r: Heartbeat = convert(request)?;
        let h = self
            .with(move |c, now| c.heartbeat(&r.actor_id, r.policy_version, now))
            .await?;
        Ok(Response::new(h.into()))
    }

    #[instrument(skip(self, request))]
    async fn lease_prompts(
        &self,
        request: Request<v1::LeasePromptsRequest>,
    ) -> std::result::Result<Response<v1::LeasePromptsResponse>, Status> {
        let r: LeaseRequest = convert(request)?;
        let g = self
            .with(move |c, now| {
                c.lease_keyed(
                    &r.actor_id,
                    r.max_questions,
                    r.policy_version,
                    &r.request_id,
                    now,
                )
            })
            .await?;
        Ok(Response::new(g.into()))
    }

    #[instrument(skip(self, request))]
    async fn complete_lease(
        &self,
        request: Request<v1::CompleteLeaseRequest>,
    ) -> std::result::Result<Response<v1::CompleteLeaseResponse>, Status> {
        let r: CompleteLease = convert(request)?;
        self.with(move |c, now| {
            c.complete_lease_because(
                &r.actor_id,
                &r.lease_id,
                &r.returned_positions,
                &r.reason,
                now,
            )
        })
        .await?;
        Ok(Response::new(v1::CompleteLeaseResponse {}))
    }

    #[instrument(skip(self, request))]
    async fn accept_group(
        &self,
        request: Request<v1::AcceptGroupRequest>,
    ) -> std::result::Result<Response<v1::AcceptGroupResponse>, Status> {
        let r: AcceptGroup = convert(request)?;
        let a = self
            .with(move |c, now| {
                c.check_publisher(&r.publisher_key, "AcceptGroup")?;
                c.accept_group(&r.lease_id, r.position, &r.question_id, r.iteration, now)
            })
            .await?;
        Ok(Response::new(a.into()))
    }

    #[instrument(skip(self, request))]
    async fn return_question(
        &self,
        request: Request<v1::ReturnQuestionRequest>,
    ) -> std::result::Result<Response<v1::ReturnQuestionResponse>, Status> {
        let r: ReturnQuestion = convert(request)?;
        self.with(move |c, now| c.return_question(r.position, &r.lease_id, &r.reason, now))
            .await?;
        Ok(Response::new(v1::ReturnQuestionResponse {}))
    }

    #[instrument(skip(self, request))]
    async fn publish_version(
        &self,
        request: Request<v1::PublishVersionRequest>,
    ) -> std::result::Result<Response<v1::PublishVersionResponse>, Status> {
        let r: PublishVersion = convert(request)?;
        self.with(move |c, now| {
            c.check_publisher(&r.publisher_key, "PublishVersion")?;
            c.publish_version(r.version, r.iteration, &r.checkpoint, now)
        })
        .await?;
        Ok(Response::new(v1::PublishVersionResponse {}))
    }

    #[instrument(skip(self, request))]
    async fn join_learner(
        &self,
        request: Request<v1::JoinLearnerRequest>,
    ) -> std::result::Result<Response<v1::JoinLearnerResponse>, Status> {
        let r: JoinLearner = convert(request)?;
        let j = self
            .with(move |c, now| {
                // The key is checked before the join may rewind the run, and kept only once
                // the join is taken (a refused rank 0 leaves no key behind).
                if let Some(key) = &r.publisher_key {
                    c.check_rank0_key(key)?;
                }
                let joined = c.join_learner(
                    r.rank,
                    &r.addr,
                    &r.collective_id,
                    &r.collective_addr,
                    r.version,
                    now,
                )?;
                if let Some(key) = &r.publisher_key {
                    c.set_publisher(key, now)?;
                }
                Ok(joined)
            })
            .await?;
        Ok(Response::new(j.into()))
    }

    #[instrument(skip(self, request))]
    async fn report_metrics(
        &self,
        request: Request<v1::ReportMetricsRequest>,
    ) -> std::result::Result<Response<v1::ReportMetricsResponse>, Status> {
        let r: ReportMetrics = convert(request)?;
        self.with(move |c, _| c.report_metrics(r.iteration, r.metrics))
            .await?;
        Ok(Response::new(v1::ReportMetricsResponse {}))
    }

    #[instrument(skip(self, request))]
    async fn get_status(
        &self,
        request: Request<v1::GetStatusRequest>,
    ) -> std::result::Result<Response<v1::RunStatus>, Status> {
        let v1::GetStatusRequest {} = request.into_inner();
        let s = self.with(|c, now| Ok(c.status(now))).await?;
        Ok(Response::new(s.into()))
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
    let (reflection_v1, reflection_v1alpha) = server::reflection(&[names::COORDINATOR])?;
    let grpc = CoordinatorGrpc::loading(options.clone());
    let slot = grpc.state.clone();
    crate::metrics::register(&bound.metrics, slot.clone());
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
                Ok(c) => Arc::new(Committed::new(c)),
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

    // The ticker expires leases and runs the progress watchdog: a stalled run stops the server
    // and `serve` returns the watchdog's error (what the run waited for, and for how long).
    let ticker = {
        let shared = shared.clone();
        let abort = abort.clone();
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(tick);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                let shared = shared.clone();
                let check = move || shared.lock().check_stall(Now::current());
                if let Ok(Some(stalled)) = tokio::task::spawn_blocking(check).await {
                    abort.notify_one();
                    return Some(stalled);
                }
            }
        })
    };
    let served = serving.await;
    ticker.abort();
    let stalled = ticker.await.ok().flatten();
    let persisted = tokio::task::spawn_blocking(move || shared.close())
        .await
        .map_err(|e| CoordinatorError::Internal(format!("persisting task: {e}")))?;
    served.map_err(|source| ril_proto::server::ServeError::Serve { addr, source })?;
    persisted?;
    tracing::info!(%addr, "coordinator stopped; state written");
    stalled.map_or(Ok(()), Err)
}
