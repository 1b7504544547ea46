//! `ril actor`'s entry point: load the student, join the run over gRPC, and run the
//! [`Actor`]'s phases against the peers the registration names.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use candle_core::{DType, Device};
use ril_model::Head;
use ril_model::bundle::Bundle;

use crate::actor::{Actor, ActorSummary, register};
use crate::error::ActorError;
use crate::grpc::{GrpcCoordinator, connect_peers};

/// How an actor runs; everything about the run itself comes from the coordinator.
#[derive(Debug, Clone)]
pub struct ActorOptions {
    /// Unique per actor process.
    pub actor_id: String,
    pub coordinator: String,
    /// The student checkpoint: its tokenizer, config and image processor (weights come from
    /// the learner).
    pub student: PathBuf,
    pub device: Device,
    pub questions_per_lease: u32,
    /// Connecting to a peer, and the deadline of every coordinator and discriminator call: sent as `grpc-timeout` and enforced here, so a peer that keeps its
    /// connection open and stops answering fails the call instead of blocking the actor.
    pub rpc_timeout: Duration,
    /// The deadline of one teacher `Answer` call (the whole stream).
    pub teacher_timeout: Duration,
    /// The deadline of one learner `PushGroups` call (checked, scored and committed first).
    pub push_timeout: Duration,
    /// How long a LeasePrompts or CompleteLease call is asked again, with backoff, while its
    /// outcome is unknown (the coordinator unreachable or restarting), and how long the
    /// learner's weights may stay unavailable (leases handed back meanwhile); then the actor
    /// stops with the error naming the peer and the call.
    pub coordinator_deadline: Duration,
    /// How long to keep registering while the coordinator is not ready.
    pub register_timeout: Duration,
    pub weight_timeout: Duration,
    pub weight_chunk_bytes: u32,
    pub weight_attempts: usize,
    /// Seeds the rollouts (with the position and policy version).
    pub seed: u64,
    /// Stop after this many leases (benchmarks, tests); `None` runs until the run finishes.
    pub max_leases: Option<u64>,
    /// TLS, client certificate and run token for every call (plaintext by default: the `ril`
    /// binary always sets the process's resolved security).
    pub security: ril_proto::security::Security,
    /// What the actor has done, for `/metrics` (shared: the caller keeps a clone to serve).
    pub metrics: std::sync::Arc<crate::ActorMetrics>,
}

impl ActorOptions {
    pub fn new(actor_id: String, coordinator: String, student: PathBuf) -> Self {
        Self {
            actor_id,
            coordinator,
            student,
            device: Device::Cpu,
            questions_per_lease: 1,
            rpc_timeout: Duration::from_secs(30),
            teacher_timeout: Duration::from_secs(300),
            push_timeout: Duration::from_secs(300),
            coordinator_deadline: Duration::from_secs(120),
            register_timeout: Duration::from_secs(300),
            weight_timeout: Duration::from_secs(120),
            weight_chunk_bytes: 1 << 20,
            weight_attempts: 5,
            seed: 0,
            max_leases: None,
            security: ril_proto::security::Security::default(),
            metrics: std::sync::Arc::default(),
        }
    }
}

/// Runs the actor until the run finishes, `max_leases` is reached or `shutdown` resolves (the
/// lease in progress is finished first).
pub async fn run_actor(
    opts: ActorOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<ActorSummary, ActorError> {
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            shutdown.await;
            stop.store(true, Ordering::SeqCst);
        });
    }
    let student = load_student(&opts).await?;
    let coordinator =
        GrpcCoordinator::connect(&opts.coordinator, opts.rpc_timeout, &opts.security).await?;
    let coordinator = Arc::new(coordinator);
    let Some(registration) = register(&*coordinator, &opts, &stop).await? else {
        return Ok(ActorSummary::default());
    };
    let peers = connect_peers(coordinator, &registration, &opts)?;
    Actor::new(opts, registration.settings, student, peers, stop)
        .run()
        .await
}

/// The student's tokenizer, config and image processor (its weights are replaced by the
/// learner's before the first rollout).
async fn load_student(opts: &ActorOptions) -> Result<Bundle, ActorError> {
    let (path, device) = (opts.student.clone(), opts.device.clone());
    tokio::task::spawn_blocking(move || {
        Bundle::load(&path, Head::LanguageModel, &device, DType::F32)
    })
    .await
    .map_err(|source| ActorError::Task {
        what: "loading the student",
        source,
    })?
    .map_err(ActorError::from)
}
