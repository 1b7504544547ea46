//! [`serve`], the learner role's entry point, as named phases:
//!
//! 1. serve: the gRPC server runs at once, NOT_SERVING, every learner call UNAVAILABLE;
//! 2. load the model (policy, reference, optimizer; a checkpoint when resuming);
//! 3. rendezvous: JoinLearner with the coordinator until every rank has joined;
//! 4. republish: a rank 0 resumed from a checkpoint publishes its version again;
//! 5. join the collective (the CPU ring or NCCL) and verify every rank holds the same weights;
//! 6. the service starts, SERVING, until shutdown or the run's end.
//!
//! A failure in any phase stops the already-running server, then returns the error; a
//! shutdown signal during a phase that waits on others stops it cleanly.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ril_proto::security::Security;
use ril_proto::server::names;
use ril_proto::server::{self, Bound, DEFAULT_MAX_MESSAGE_BYTES, HealthReporter, ServingStatus};
use ril_proto::v1::learner_ranks_server::LearnerRanksServer;
use ril_proto::v1::learner_server::LearnerServer;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::client::{GrpcCoordinator, GrpcDiscriminator, GrpcPeers};
use crate::collective::{Collective, SingleRank};
use crate::error::{LearnerError, Result};
use crate::grpc::LearnerGrpc;
use crate::options::LearnerOptions;
use crate::service::{CoordinatorLink, JoinReply, JoinRequest, LearnerService, Peers, Progress};
use crate::trainer::Trainer;

/// Runs the learner role on `bound` until `shutdown` resolves (or, with `exit_when_finished`,
/// until the run is finished, or a training step fails).
///
/// The server answers at once with health NOT_SERVING (`ril.v1.Learner` and the server as a
/// whole) and `Unavailable` for learner RPCs while the model loads and the coordinator is
/// reached; then SERVING. At shutdown: NOT_SERVING, buffered groups handed back, a checkpoint of
/// the current version written, the server drained. A failed training step ends it with that
/// error (after the same shutdown), so the process exits non-zero and can be resumed.
pub async fn serve(
    options: LearnerOptions,
    bound: Bound,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    options.validate()?;
    let server = RunningServer::start(bound, shutdown).await?;
    match start_learner(&options, &server).await {
        Ok(Some(service)) => serve_until_done(service, server).await,
        // The shutdown signal came while starting.
        Ok(None) => server.stop().await,
        Err(e) => {
            server.stop().await?;
            Err(e)
        }
    }
}

/// Phase 1: the gRPC server, running while the learner starts, and the shutdown signal.
struct RunningServer {
    addr: SocketAddr,
    security: Security,
    reporter: HealthReporter,
    service: Arc<OnceLock<LearnerService<GrpcCoordinator>>>,
    stop_tx: watch::Sender<bool>,
    /// Raised by the caller's shutdown future.
    signal_rx: watch::Receiver<bool>,
    task: JoinHandle<std::result::Result<(), tonic::transport::Error>>,
}

/// Waits for `flag` to become true.
async fn raised(mut flag: watch::Receiver<bool>) {
    let _ = flag.wait_for(|s| *s).await;
}

impl RunningServer {
    async fn start(
        bound: Bound,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<Self> {
        let addr = bound.addr;
        let security = bound.security.clone();
        let (reporter, health_service) = server::health([names::LEARNER]).await;
        let (reflection_v1, reflection_v1alpha) =
            server::reflection(&[names::LEARNER, names::LEARNER_RANKS])?;
        let service: Arc<OnceLock<LearnerService<GrpcCoordinator>>> = Arc::new(OnceLock::new());
        {
            let service = service.clone();
            bound.metrics.add_loaded(
                "ril_learner_loaded",
                "1 once the model is loaded and the ranks have met.",
                move || service.get().cloned(),
                |learner, out| learner.write_metrics(out),
            );
        }
        let grpc = LearnerGrpc::new(service.clone());
        let ranks = LearnerRanksServer::new(grpc.clone())
            .max_decoding_message_size(DEFAULT_MAX_MESSAGE_BYTES)
            .max_encoding_message_size(DEFAULT_MAX_MESSAGE_BYTES);
        let learner = LearnerServer::new(grpc)
            .max_decoding_message_size(DEFAULT_MAX_MESSAGE_BYTES)
            .max_encoding_message_size(DEFAULT_MAX_MESSAGE_BYTES);
        let (stop_tx, stop_rx) = watch::channel(false);
        let (signal_tx, signal_rx) = watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            let _ = signal_tx.send(true);
        });
        let mut secure = bound.server(&health_service).await?;
        let task = tokio::spawn(
            secure
                .add_service(health_service)
                .add_service(reflection_v1)
                .add_service(reflection_v1alpha)
                .add_service(learner)
                .add_service(ranks)
                .serve_with_incoming_shutdown(server::incoming(bound), raised(stop_rx)),
        );
        tracing::info!(%addr, "learner listening (NOT_SERVING while loading)");
        Ok(Self {
            addr,
            security,
            reporter,
            service,
            stop_tx,
            signal_rx,
            task,
        })
    }

    /// Runs `phase` unless the shutdown signal comes first (then `None`).
    async fn unless_shutdown<T>(
        &self,
        phase: impl Future<Output = Result<T>>,
    ) -> Result<Option<T>> {
        tokio::select! {
            done = phase => done.map(Some),
            _ = raised(self.signal_rx.clone()) => Ok(None),
        }
    }

    async fn set_status(&self, status: ServingStatus) {
        server::set_status(&self.reporter, &[names::LEARNER], status).await;
    }

    /// Stops the server and waits for it to drain.
    async fn stop(self) -> Result<()> {
        let _ = self.stop_tx.send(true);
        match self.task.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => Err(LearnerError::Serve(server::ServeError::Serve {
                addr: self.addr,
                source,
            })),
            Err(source) => Err(LearnerError::Task {
                task: "the gRPC server task",
                source,
            }),
        }
    }
}

/// Phases 2-6, on a running server. `None`: the shutdown signal came first.
async fn start_learner(
    options: &LearnerOptions,
    server: &RunningServer,
) -> Result<Option<LearnerService<GrpcCoordinator>>> {
    let advertise = options
        .advertise_addr
        .clone()
        .unwrap_or_else(|| server.addr.to_string());
    let ring = RingListener::bind(options)?;
    let collective_addr = ring
        .as_ref()
        .map(|r| r.advertised_addr(options, &advertise))
        .unwrap_or_default();
    // The model loads first, so the coordinator hands this learner's address to actors only
    // once it can serve weights.
    let Some(trainer) = server.unless_shutdown(load_model(options)).await? else {
        return Ok(None);
    };
    let timeout = Duration::from_millis(options.coordinator_timeout_ms);
    let publisher_key = match options.rank {
        0 => Some(crate::client::publisher_key(&options.out_dir)?),
        _ => None,
    };
    let coordinator = GrpcCoordinator::connect_lazy(
        &options.coordinator_addr,
        timeout,
        &server.security,
        publisher_key,
    )?;
    let join = JoinRequest {
        rank: options.rank,
        addr: advertise,
        collective_addr,
        collective_id: nccl_collective_id(options)?,
        version: trainer.state().version,
    };
    let Some(rendezvous) = server
        .unless_shutdown(join_coordinator(&coordinator, options, join))
        .await?
    else {
        return Ok(None);
    };
    republish_resumed_version(&coordinator, options, trainer.state().version).await?;
    let key = server.security.collective_key();
    let joined = join_collective(options, trainer, ring, rendezvous.as_ref(), key);
    let Some(trainer) = server.unless_shutdown(joined).await? else {
        return Ok(None);
    };
    let peers = connect_peers(options, rendezvous, &server.security)?;
    let opts = options.clone();
    let service = tokio::task::spawn_blocking(move || {
        LearnerService::with_peers(trainer, coordinator, opts, peers)
    })
    .await
    .map_err(LearnerError::task("starting the service"))??;
    Ok(Some(service))
}

/// Phase 2: policy, reference and optimizer, on a blocking thread.
async fn load_model(options: &LearnerOptions) -> Result<Trainer> {
    let opts = options.clone();
    tokio::task::spawn_blocking(move || Trainer::open(&opts, Box::new(SingleRank)))
        .await
        .map_err(LearnerError::task("loading the model"))?
}

/// The ring's listener, bound before the rendezvous so its address can be announced.
struct RingListener {
    listener: std::net::TcpListener,
    port: u16,
}

impl RingListener {
    /// The listener when this rank joins a ring (world_size > 1, collective = "ring").
    fn bind(options: &LearnerOptions) -> Result<Option<Self>> {
        if options.world_size <= 1 || options.collective != "ring" {
            return Ok(None);
        }
        let fail = |e: std::io::Error| {
            LearnerError::Collective(format!(
                "learner rank {}: collective_listen {:?}: {e}",
                options.rank, options.collective_listen
            ))
        };
        let listener = std::net::TcpListener::bind(&options.collective_listen).map_err(fail)?;
        let port = listener.local_addr().map_err(fail)?.port();
        Ok(Some(Self { listener, port }))
    }

    /// `collective_advertise`, or the advertised host with the listener's port.
    fn advertised_addr(&self, options: &LearnerOptions, advertise: &str) -> String {
        match &options.collective_advertise {
            Some(a) if !a.is_empty() => a.clone(),
            _ => {
                let host = advertise
                    .rsplit_once(':')
                    .map(|(h, _)| h)
                    .unwrap_or(advertise);
                format!("{host}:{}", self.port)
            }
        }
    }
}

/// With NCCL, rank 0 makes the communicator's unique id and the rendezvous hands it out.
fn nccl_collective_id(options: &LearnerOptions) -> Result<Vec<u8>> {
    if options.world_size > 1 && options.collective == "nccl" && options.rank == 0 {
        new_nccl_id()
    } else {
        Ok(Vec::new())
    }
}

/// How often a rank asks the coordinator again while it waits for it or for the other ranks.
const JOIN_POLL: Duration = Duration::from_millis(200);

/// Phase 3: rendezvous with the coordinator (JoinLearner), retrying until it answers; with
/// several ranks, polling until all have joined (at most `collective_timeout_ms` after the
/// coordinator first answered). Returns the ready answer (None: a coordinator without
/// JoinLearner, one rank only).
pub async fn join_coordinator<C: CoordinatorLink>(
    link: &C,
    options: &LearnerOptions,
    request: JoinRequest,
) -> Result<Option<JoinReply>> {
    let mut attempt = 0u32;
    let mut waiting_since: Option<std::time::Instant> = None;
    let wait_limit = Duration::from_millis(options.collective_timeout_ms);
    loop {
        match link.join_learner(request.clone()).await {
            Ok(reply) => {
                check_rendezvous(&reply, options)?;
                if reply.ready {
                    return Ok(Some(reply));
                }
                let since = *waiting_since.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() >= wait_limit {
                    return Err(missing_ranks(&reply, options));
                }
            }
            Err(LearnerError::Coordinator(e)) if e.code == tonic::Code::Unimplemented => {
                if options.world_size > 1 {
                    return Err(LearnerError::Rendezvous(format!(
                        "the coordinator at {} does not implement JoinLearner, which {} learner \
                         ranks need to meet",
                        options.coordinator_addr, options.world_size
                    )));
                }
                tracing::warn!(
                    coordinator = %options.coordinator_addr,
                    "the coordinator does not implement JoinLearner; going on without a rendezvous"
                );
                return Ok(None);
            }
            Err(e) => {
                if attempt.is_multiple_of(10) {
                    tracing::warn!(coordinator = %options.coordinator_addr, error = %e, "waiting for the coordinator");
                }
            }
        }
        attempt += 1;
        tokio::time::sleep(JOIN_POLL).await;
    }
}

/// The coordinator's answer fits this learner: the same world size, and (when ready, with
/// several ranks) every rank's addresses.
fn check_rendezvous(reply: &JoinReply, options: &LearnerOptions) -> Result<()> {
    if reply.world_size != 0 && reply.world_size != options.world_size {
        return Err(LearnerError::Rendezvous(format!(
            "the coordinator at {} runs {} learner ranks, this learner was configured with \
             world_size {}",
            options.coordinator_addr, reply.world_size, options.world_size
        )));
    }
    let world = options.world_size as usize;
    if reply.ready
        && world > 1
        && (reply.rank_addrs.len() != world
            || reply.collective_addrs.len() != world
            || reply.collective_addrs.iter().any(String::is_empty))
    {
        return Err(LearnerError::Rendezvous(format!(
            "the coordinator at {} answered the rendezvous of {} ranks with learner addresses \
             {:?} and collective addresses {:?} (a coordinator too old to hand out collective \
             addresses?)",
            options.coordinator_addr, world, reply.rank_addrs, reply.collective_addrs
        )));
    }
    Ok(())
}

/// The rendezvous timed out: which ranks never joined.
fn missing_ranks(reply: &JoinReply, options: &LearnerOptions) -> LearnerError {
    let missing: Vec<String> = (0..options.world_size)
        .filter(|&r| {
            reply
                .collective_addrs
                .get(r as usize)
                .is_none_or(String::is_empty)
        })
        .map(|r| r.to_string())
        .collect();
    LearnerError::Collective(format!(
        "learner rank {}: the other learner ranks did not all join within {} ms \
         (collective_timeout_ms): missing rank(s) {}",
        options.rank,
        options.collective_timeout_ms,
        missing.join(", ")
    ))
}

/// Phase 4: a rank 0 resumed from a checkpoint publishes its version again: a harmless repeat
/// when the coordinator has it, and the missing publication when the learner stopped between
/// writing the checkpoint and publishing it.
async fn republish_resumed_version<C: CoordinatorLink>(
    link: &C,
    options: &LearnerOptions,
    resumed: u64,
) -> Result<()> {
    if options.rank != 0 || resumed == 0 {
        return Ok(());
    }
    let checkpoint = crate::trainer::checkpoint_dir(&options.out_dir, resumed);
    link.publish_version(resumed, resumed - 1, Some(checkpoint))
        .await
}

/// Phase 5: the trainer on this rank's collective (unchanged with one rank): NCCL with the id
/// from the rendezvous, or the ring over the listener bound before it; then every rank checks
/// they all hold the same weights.
async fn join_collective(
    options: &LearnerOptions,
    trainer: Trainer,
    ring: Option<RingListener>,
    rendezvous: Option<&JoinReply>,
    key: Option<[u8; 32]>,
) -> Result<Trainer> {
    let opts = options.clone();
    let collective: Box<dyn Collective> = if options.world_size > 1 && options.collective == "nccl"
    {
        let id = rendezvous
            .map(|r| r.collective_id.clone())
            .unwrap_or_default();
        tokio::task::spawn_blocking(move || connect_nccl(&opts, &id))
            .await
            .map_err(LearnerError::task("joining NCCL"))??
    } else if let Some(ring) = ring {
        let collective_addrs = rendezvous
            .map(|r| r.collective_addrs.clone())
            .unwrap_or_default();
        tokio::task::spawn_blocking(move || connect_ring(&opts, ring, &collective_addrs, key))
            .await
            .map_err(LearnerError::task("joining the ring"))??
    } else {
        return Ok(trainer);
    };
    verify_weights(trainer, collective).await
}

fn connect_ring(
    opts: &LearnerOptions,
    ring: RingListener,
    collective_addrs: &[String],
    key: Option<[u8; 32]>,
) -> Result<Box<dyn Collective>> {
    let auth = crate::ring::RingAuth::new(key);
    if !auth.is_authenticated() {
        tracing::warn!(
            "the CPU ring is not authenticated: security is off (no run token), so any process \
             that reaches a rank's ring address first can join the ring"
        );
    }
    Ok(Box::new(crate::ring::TcpRing::connect(
        opts.rank as usize,
        ring.listener,
        collective_addrs,
        Duration::from_millis(opts.collective_timeout_ms),
        (opts.bucket_mb << 20) / std::mem::size_of::<f32>(),
        &auth,
    )?))
}

/// The trainer on its collective, once every rank starts from the same weights (or the run
/// stops here, naming who differs).
async fn verify_weights(mut trainer: Trainer, collective: Box<dyn Collective>) -> Result<Trainer> {
    tokio::task::spawn_blocking(move || {
        trainer.set_collective(collective);
        trainer.verify_replicas(&trainer.weights_payload()?)?;
        Ok(trainer)
    })
    .await
    .map_err(LearnerError::task("verifying the ranks' weights"))?
}

/// The service's peers: rank 0's clients of the other ranks and of the discriminator, a rank
/// > 0's pointer to rank 0.
fn connect_peers(
    options: &LearnerOptions,
    rendezvous: Option<JoinReply>,
    security: &Security,
) -> Result<Peers> {
    let mut peers = Peers {
        rank0_addr: rendezvous
            .as_ref()
            .and_then(|r| r.rank_addrs.first().cloned()),
        ..Peers::default()
    };
    if let Some(r) = rendezvous.filter(|_| options.rank == 0 && options.world_size > 1) {
        // A TrainShard call covers the peer's whole step; the ring's own timeouts catch a dead
        // peer much sooner.
        let call_timeout = Duration::from_millis(options.collective_timeout_ms) * 10;
        peers.ranks = Some(Arc::new(GrpcPeers::connect_lazy(
            &r.rank_addrs,
            call_timeout,
            security,
        )?));
    }
    if let Some(addr) = options
        .discriminator_addr
        .as_deref()
        .filter(|a| !a.is_empty())
    {
        // A D step on a few dozen responses; generous next to a coordinator call.
        let timeout = Duration::from_millis(options.coordinator_timeout_ms) * 30;
        peers.discriminator = Some(Arc::new(GrpcDiscriminator::connect_lazy(
            addr, timeout, security,
        )?));
    }
    Ok(peers)
}

/// Keeps `ril.v1.Learner/discriminator` in the learner's health at what D's last Train did:
/// SERVING while it succeeded (or none has run), NOT_SERVING after a failure (the step logs the
/// failure itself, with its error).
async fn show_discriminator_health(
    mut progress: watch::Receiver<Progress>,
    reporter: HealthReporter,
) {
    let mut shown = None;
    loop {
        let status = match progress.borrow_and_update().discriminator_failed {
            None => ServingStatus::Serving,
            Some(_) => ServingStatus::NotServing,
        };
        if shown != Some(status) {
            reporter
                .set_service_status(names::LEARNER_DISCRIMINATOR, status)
                .await;
            shown = Some(status);
        }
        if progress.changed().await.is_err() {
            return;
        }
    }
}

/// Phase 6: SERVING until the shutdown signal, a failed step, or (with `exit_when_finished`)
/// the run's end; then NOT_SERVING, the service's shutdown (groups handed back, a final
/// checkpoint) and the server's.
async fn serve_until_done(
    service: LearnerService<GrpcCoordinator>,
    server: RunningServer,
) -> Result<()> {
    let _ = server.service.set(service.clone());
    server.set_status(ServingStatus::Serving).await;
    // Only rank 0 trains D (its step runs Train): the other ranks have no D health to show.
    let trains_d = service.has_discriminator() && service.options().rank == 0;
    let d_health = trains_d.then(|| {
        tokio::spawn(show_discriminator_health(
            service.progress(),
            server.reporter.clone(),
        ))
    });
    tracing::info!(addr = %server.addr, version = service.current_version(), "learner serving");
    let exit_when_finished = service.options().exit_when_finished;
    let mut progress = service.progress();
    let failed = tokio::select! {
        _ = raised(server.signal_rx.clone()) => false,
        failed = async {
            progress
                .wait_for(|p| p.failed.is_some() || (exit_when_finished && p.finished))
                .await
                .is_ok_and(|p| p.failed.is_some())
        } => failed,
    };
    if let Some(task) = d_health {
        task.abort();
    }
    server.set_status(ServingStatus::NotServing).await;
    let saved = service.shutdown().await;
    let stopped = server.stop().await;
    if let Some(e) = service.failure().filter(|_| failed) {
        return Err(LearnerError::Stopped(e));
    }
    saved?;
    stopped
}

#[cfg(feature = "nccl")]
fn new_nccl_id() -> Result<Vec<u8>> {
    crate::nccl::new_unique_id()
}

#[cfg(not(feature = "nccl"))]
fn new_nccl_id() -> Result<Vec<u8>> {
    Err(LearnerError::Invalid(
        "collective = \"nccl\" needs a build with `--features nccl`".into(),
    ))
}

/// The NCCL collective on this rank's CUDA device (`device = "cuda:N"`).
#[cfg(feature = "nccl")]
fn connect_nccl(opts: &LearnerOptions, id: &[u8]) -> Result<Box<dyn Collective>> {
    let ordinal = opts.cuda_ordinal()?.unwrap_or(0);
    Ok(Box::new(crate::nccl::NcclCollective::connect(
        opts.rank as usize,
        opts.world_size as usize,
        ordinal,
        id,
        Duration::from_millis(opts.collective_timeout_ms),
        (opts.bucket_mb << 20) / std::mem::size_of::<f32>(),
    )?))
}

#[cfg(not(feature = "nccl"))]
fn connect_nccl(_opts: &LearnerOptions, _id: &[u8]) -> Result<Box<dyn Collective>> {
    Err(LearnerError::Invalid(
        "collective = \"nccl\" needs a build with `--features nccl`".into(),
    ))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    use ril_proto::error::RpcError;

    use super::*;
    use crate::service::{Acceptance, GroupKey};

    /// `ril.v1.Learner/discriminator` in the learner's health, asked over a real socket, follows
    /// D's last Train: SERVING before any and after a success, NOT_SERVING after a failure.
    #[tokio::test]
    async fn the_learner_s_health_shows_whether_d_s_last_train_failed() {
        let (reporter, health_service) = server::health([names::LEARNER]).await;
        let bound = server::bind("127.0.0.1:0").await.unwrap();
        let addr = bound.addr.to_string();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(health_service)
                .serve_with_incoming(server::incoming(bound)),
        );
        let (progress, watched) = watch::channel(Progress::default());
        let shower = tokio::spawn(show_discriminator_health(watched, reporter));
        let security = Security::default();
        let shows = |expected: ServingStatus| {
            let (addr, security) = (addr.clone(), security.clone());
            async move {
                let what = format!("{} {expected:?}", names::LEARNER_DISCRIMINATOR);
                ril_common::wait::wait_until(&what, Duration::from_secs(10), || async {
                    let service = names::LEARNER_DISCRIMINATOR;
                    let timeout = Duration::from_secs(2);
                    server_status(&addr, service, timeout, &security).await == Some(expected)
                })
                .await;
            }
        };
        shows(ServingStatus::Serving).await;
        progress.send_modify(|p| {
            p.discriminator_failed = Some("discriminator at x: Train failed".into())
        });
        shows(ServingStatus::NotServing).await;
        progress.send_modify(|p| p.iteration = 3);
        shows(ServingStatus::NotServing).await;
        progress.send_modify(|p| p.discriminator_failed = None);
        shows(ServingStatus::Serving).await;
        shower.abort();
    }

    async fn server_status(
        addr: &str,
        service: &str,
        timeout: Duration,
        security: &Security,
    ) -> Option<ServingStatus> {
        ril_proto::client::health_check(addr, service, timeout, security)
            .await
            .ok()
    }

    /// Answers JoinLearner from a script (the last answer repeats; a last error repeats as
    /// UNIMPLEMENTED) and counts the joins.
    struct ScriptedCoordinator {
        answers: Mutex<Vec<Result<JoinReply>>>,
        joins: Mutex<Vec<JoinRequest>>,
    }

    impl ScriptedCoordinator {
        fn new(answers: Vec<Result<JoinReply>>) -> Self {
            Self {
                answers: Mutex::new(answers),
                joins: Mutex::default(),
            }
        }
    }

    fn unimplemented(call: &'static str) -> LearnerError {
        LearnerError::Coordinator(RpcError::new(
            "coordinator",
            "c:1",
            call,
            tonic::Status::unimplemented("not in this test"),
        ))
    }

    impl CoordinatorLink for ScriptedCoordinator {
        async fn accept_group(&self, _: GroupKey) -> Result<Acceptance> {
            Err(unimplemented("AcceptGroup"))
        }
        async fn return_question(&self, _: u64, _: String, _: String) -> Result<()> {
            Err(unimplemented("ReturnQuestion"))
        }
        async fn publish_version(&self, _: u64, _: u64, _: Option<PathBuf>) -> Result<()> {
            Err(unimplemented("PublishVersion"))
        }
        async fn report_metrics(&self, _: u64, _: BTreeMap<String, f64>) -> Result<()> {
            Err(unimplemented("ReportMetrics"))
        }
        async fn join_learner(&self, request: JoinRequest) -> Result<JoinReply> {
            self.joins.lock().unwrap().push(request);
            let mut answers = self.answers.lock().unwrap();
            if answers.len() > 1 {
                answers.remove(0)
            } else {
                match &answers[0] {
                    Ok(reply) => Ok(reply.clone()),
                    Err(_) => Err(unimplemented("JoinLearner")),
                }
            }
        }
    }

    fn options(rank: u32, world_size: u32) -> LearnerOptions {
        LearnerOptions {
            rank,
            world_size,
            collective_timeout_ms: 300,
            ..LearnerOptions::for_test(Path::new("m"), Path::new("o"), "c:1")
        }
    }

    fn request(rank: u32) -> JoinRequest {
        JoinRequest {
            rank,
            addr: format!("10.0.0.{rank}:50054"),
            collective_addr: format!("10.0.0.{rank}:7000"),
            collective_id: Vec::new(),
            version: 0,
        }
    }

    fn two_ranks(ready: bool) -> JoinReply {
        JoinReply {
            world_size: 2,
            ready,
            rank_addrs: if ready {
                vec!["10.0.0.0:50054".into(), "10.0.0.1:50054".into()]
            } else {
                Vec::new()
            },
            collective_addrs: vec![
                "10.0.0.0:7000".into(),
                if ready {
                    "10.0.0.1:7000".into()
                } else {
                    String::new()
                },
            ],
            collective_id: Vec::new(),
        }
    }

    #[tokio::test]
    async fn a_rank_retries_until_the_coordinator_answers_and_all_ranks_joined() {
        let coordinator = ScriptedCoordinator::new(vec![
            Err(LearnerError::Coordinator(RpcError::new(
                "coordinator",
                "c:1",
                "JoinLearner",
                tonic::Status::unavailable("starting"),
            ))),
            Ok(two_ranks(false)),
            Ok(two_ranks(true)),
        ]);
        let reply = join_coordinator(&coordinator, &options(0, 2), request(0))
            .await
            .unwrap();
        assert_eq!(reply, Some(two_ranks(true)));
        assert_eq!(coordinator.joins.lock().unwrap().len(), 3);
    }

    #[tokio::test]
    async fn a_rank_whose_peers_never_join_names_them() {
        let coordinator = ScriptedCoordinator::new(vec![Ok(two_ranks(false))]);
        let e = join_coordinator(&coordinator, &options(0, 2), request(0))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("missing rank(s) 1"), "{e}");
    }

    #[tokio::test]
    async fn a_rendezvous_that_does_not_fit_the_settings_is_refused() {
        let other_world = ScriptedCoordinator::new(vec![Ok(JoinReply {
            world_size: 3,
            ..two_ranks(true)
        })]);
        let e = join_coordinator(&other_world, &options(0, 2), request(0))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("runs 3 learner ranks"), "{e}");
        let no_ring = ScriptedCoordinator::new(vec![Ok(JoinReply {
            collective_addrs: Vec::new(),
            ..two_ranks(true)
        })]);
        let e = join_coordinator(&no_ring, &options(1, 2), request(1))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("too old"), "{e}");
    }

    #[tokio::test]
    async fn a_coordinator_without_join_learner_suits_one_rank_only() {
        let old = || ScriptedCoordinator::new(vec![Err(unimplemented("JoinLearner"))]);
        let alone = join_coordinator(&old(), &options(0, 1), request(0))
            .await
            .unwrap();
        assert_eq!(alone, None);
        let e = join_coordinator(&old(), &options(0, 2), request(0))
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("does not implement JoinLearner"),
            "{e}"
        );
        assert_eq!(
            ril_proto::error::status(&e).code(),
            tonic::Code::FailedPrecondition
        );
    }
}
