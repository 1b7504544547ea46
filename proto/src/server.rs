//! What every ril gRPC server shares: binding (ephemeral ports included), `grpc.health.v1`,
//! server reflection, explicit message-size limits, and graceful shutdown on SIGTERM / Ctrl-C.
//! Security (TLS, mutual TLS, the run token, per-role authorisation) comes from
//! [`crate::security`] through [`secure_builder`]. The client side is [`crate::client`].

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
pub use tonic_health::ServingStatus;
pub use tonic_health::server::HealthReporter;

use crate::error::source_chain;
use crate::metrics::Registry;
use crate::metrics::rpc::RpcMetricsLayer;
use crate::security::{AuthLayer, Security};

/// A server with the RPC metrics layer, then the authorisation layer, in front of its services.
pub type SecureServer = tonic::transport::Server<
    tower_layer::Stack<AuthLayer, tower_layer::Stack<RpcMetricsLayer, tower_layer::Identity>>,
>;

/// Most concurrent requests one client connection may have in flight at a server (the rest
/// wait: back-pressure per client, not a refusal).
pub const CONCURRENCY_LIMIT_PER_CONNECTION: usize = 64;
/// Most HTTP/2 streams one connection may open at once.
pub const MAX_CONCURRENT_STREAMS: u32 = 128;
/// Largest HTTP/2 header block a server accepts (tokens and metadata are small).
pub const MAX_HEADER_LIST_BYTES: u32 = 16 << 10;

/// Default largest message a server accepts or a client sends/receives: 64 MiB. Weight
/// transfers are chunked well below it; a larger message is refused with `OUT_OF_RANGE`.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("gRPC server on {addr} failed: {source}")]
    Serve {
        addr: SocketAddr,
        source: tonic::transport::Error,
    },
    #[error("TLS setup for {what} failed: {detail}")]
    Tls { what: String, detail: String },
    #[error("cannot build the reflection service: {0}")]
    Reflection(String),
    #[error("cannot write the address file {path}: {source}")]
    AddrFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot reach {addr} within {timeout:?}: {detail}")]
    Connect {
        addr: String,
        timeout: Duration,
        detail: String,
    },
}

/// A bound listener and the security its server (and that server's own clients) use.
/// Binding before serving lets a caller use port 0 and learn the real port. [`bind`] gives
/// plaintext (in-process tests); the `ril` binary attaches the process's resolved
/// [`Security`] with [`Bound::with_security`].
#[derive(Debug)]
pub struct Bound {
    pub listener: TcpListener,
    pub addr: SocketAddr,
    pub security: Security,
    /// Also serve grpc.health.v1 alone, in plaintext, here (Kubernetes' gRPC probes).
    pub plain_health: Option<String>,
    /// Where to write the plaintext health endpoint's bound address (for port 0).
    pub plain_health_addr_file: Option<std::path::PathBuf>,
    /// The server's metrics: its RPCs (always recorded) and what its role adds.
    pub metrics: Registry,
    /// Also serve `GET /metrics` (Prometheus' text format, plain HTTP) here.
    pub metrics_listen: Option<String>,
    /// Where to write the metrics endpoint's bound address (for port 0).
    pub metrics_addr_file: Option<std::path::PathBuf>,
}

impl Bound {
    /// Attaches the process's security (and names the metrics' role after it).
    pub fn with_security(mut self, security: Security) -> Self {
        self.metrics = Registry::new(security.role.as_str());
        self.security = security;
        self
    }

    pub fn with_metrics(
        mut self,
        listen: Option<String>,
        addr_file: Option<std::path::PathBuf>,
    ) -> Self {
        self.metrics_listen = listen;
        self.metrics_addr_file = addr_file;
        self
    }

    pub fn with_plain_health(
        mut self,
        listen: Option<String>,
        addr_file: Option<std::path::PathBuf>,
    ) -> Self {
        self.plain_health = listen;
        self.plain_health_addr_file = addr_file;
        self
    }

    /// [`secure_builder`] for this listener's security and metrics, plus the plaintext health
    /// and metrics endpoints when they were asked for.
    pub async fn server<T: tonic_health::pb::health_server::Health>(
        &self,
        health: &tonic_health::pb::health_server::HealthServer<T>,
    ) -> Result<SecureServer, ServeError> {
        if let Some(listen) = &self.plain_health {
            let addr = spawn_plain_health(listen, health.clone()).await?;
            if let Some(path) = &self.plain_health_addr_file {
                write_addr_file(path, &addr)?;
            }
        }
        if let Some(listen) = &self.metrics_listen {
            let addr = crate::metrics::http::spawn(listen, self.metrics.clone()).await?;
            if let Some(path) = &self.metrics_addr_file {
                write_addr_file(path, &addr)?;
            }
        }
        secure_builder(&self.security, &self.metrics)
    }
}

/// Writes `addr` to `path` atomically (a temporary file renamed), so that a reader never sees
/// half an address.
pub fn write_addr_file(path: &std::path::Path, addr: &SocketAddr) -> Result<(), ServeError> {
    ril_common::fs::write_atomic(path, addr.to_string().as_bytes()).map_err(|e| {
        ServeError::AddrFile {
            path: path.to_path_buf(),
            source: e.source,
        }
    })
}

/// Binds `addr` (e.g. `127.0.0.1:0` for an ephemeral port).
pub async fn bind(addr: &str) -> Result<Bound, ServeError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind {
            addr: addr.to_string(),
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: addr.to_string(),
        source,
    })?;
    Ok(Bound {
        listener,
        addr,
        security: Security::default(),
        plain_health: None,
        plain_health_addr_file: None,
        metrics: Registry::new("server"),
        metrics_listen: None,
        metrics_addr_file: None,
    })
}

/// A health service whose every listed service starts NOT_SERVING (and the whole server, the
/// empty name, too). The role flips them to SERVING once its model is loaded and its peers
/// are reachable.
pub async fn health<I: IntoIterator<Item = &'static str>>(
    services: I,
) -> (
    HealthReporter,
    tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
) {
    let (reporter, server) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", ServingStatus::NotServing)
        .await;
    for s in services {
        reporter
            .set_service_status(s, ServingStatus::NotServing)
            .await;
    }
    (reporter, server)
}

/// Marks `services` and the server as a whole SERVING (or NOT_SERVING).
pub async fn set_status(reporter: &HealthReporter, services: &[&str], status: ServingStatus) {
    reporter.set_service_status("", status).await;
    for s in services {
        reporter.set_service_status(*s, status).await;
    }
}

/// Server reflection (v1 and v1alpha) listing what this server serves: `services` (its
/// `ril.v1` services, [`names`]), grpc.health.v1.Health and reflection itself, never another
/// role's service. The descriptors of every `ril.v1` message stay available for the listed
/// services' methods.
pub fn reflection(
    services: &[&str],
) -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    ServeError,
> {
    let configure = || {
        let builder = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            )
            .include_reflection_service(false);
        let listed = services.iter().copied().chain(names::ON_EVERY_SERVER);
        listed.fold(builder, |b, service| b.with_service_name(service))
    };
    let failed = |e: tonic_reflection::server::Error| ServeError::Reflection(e.to_string());
    let v1 = configure().build_v1().map_err(failed)?;
    let v1alpha = configure().build_v1alpha().map_err(failed)?;
    Ok((v1, v1alpha))
}

/// Resolves when the process gets SIGTERM (Kubernetes' stop signal) or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("Ctrl-C: shutting down"),
        _ = term => tracing::info!("SIGTERM: shutting down"),
    }
}

/// Turns a bound listener into tonic's incoming stream (TCP_NODELAY on: small RPCs dominate).
pub fn incoming(bound: Bound) -> TcpIncoming {
    TcpIncoming::from(bound.listener).with_nodelay(Some(true))
}

/// A plaintext tonic `Server` builder with the project's defaults and limits: HTTP/2
/// keep-alive so dead peers are noticed, a per-connection concurrency cap, a cap on concurrent
/// streams and on header size. No authentication: for stub servers in tests; roles use
/// [`secure_builder`].
pub fn builder() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .tcp_nodelay(true)
        .concurrency_limit_per_connection(CONCURRENCY_LIMIT_PER_CONNECTION)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
}

/// [`builder`] with the process's TLS, the RPC metrics layer recording into `metrics`, and the
/// authorisation layer (health open, the run token, roles under mutual TLS, reflection only
/// where enabled). Metrics sit outside authorisation, so refused calls are counted.
pub fn secure_builder(security: &Security, metrics: &Registry) -> Result<SecureServer, ServeError> {
    let mut b = builder();
    if let Some(tls) = security.server_tls() {
        b = b.tls_config(tls).map_err(|e| ServeError::Tls {
            what: format!("the {} server", security.role),
            detail: source_chain(&e),
        })?;
    }
    Ok(b.layer(RpcMetricsLayer::new(metrics.rpc().clone()))
        .layer(AuthLayer::new(security)))
}

/// Serves grpc.health.v1 alone, in plaintext, on `listen` (Kubernetes' gRPC probes cannot
/// speak TLS). The task lives as long as the process. Returns the bound address.
pub async fn spawn_plain_health<T: tonic_health::pb::health_server::Health>(
    listen: &str,
    health: tonic_health::pb::health_server::HealthServer<T>,
) -> Result<SocketAddr, ServeError> {
    let bound = bind(listen).await?;
    let addr = bound.addr;
    let serving = builder()
        .add_service(health)
        .serve_with_incoming(incoming(bound));
    tokio::spawn(async move {
        if let Err(e) = serving.await {
            tracing::warn!(%addr, error = %source_chain(&e), "plaintext health endpoint failed");
        }
    });
    tracing::info!(%addr, "plaintext health endpoint listening (grpc.health.v1 only)");
    Ok(addr)
}

/// Fully-qualified gRPC service names, for health status keys.
pub mod names {
    pub const COORDINATOR: &str = "ril.v1.Coordinator";
    pub const TEACHER: &str = "ril.v1.Teacher";
    pub const DISCRIMINATOR: &str = "ril.v1.Discriminator";
    pub const LEARNER: &str = "ril.v1.Learner";
    /// The learner's view of its discriminator (health only): SERVING while D's last Train
    /// succeeded (or none has run yet), NOT_SERVING after one failed. The learner itself stays
    /// SERVING (the policy trains on without D's step).
    pub const LEARNER_DISCRIMINATOR: &str = "ril.v1.Learner/discriminator";
    /// Learner rank to rank (TrainShard), served by every learner rank next to `LEARNER`.
    pub const LEARNER_RANKS: &str = "ril.v1.LearnerRanks";
    pub const HEALTH: &str = "grpc.health.v1.Health";
    pub const REFLECTION_V1: &str = "grpc.reflection.v1.ServerReflection";
    pub const REFLECTION_V1ALPHA: &str = "grpc.reflection.v1alpha.ServerReflection";
    /// What every ril server serves besides its own services (reflection only where enabled).
    pub const ON_EVERY_SERVER: [&str; 3] = [HEALTH, REFLECTION_V1, REFLECTION_V1ALPHA];

    /// What reflection lists for a server of `services`: them and [`ON_EVERY_SERVER`], sorted
    /// (as `client::list_services` returns them).
    pub fn listed(services: &[&str]) -> Vec<String> {
        let mut all: Vec<String> = services
            .iter()
            .chain(&ON_EVERY_SERVER)
            .map(|s| s.to_string())
            .collect();
        all.sort();
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names the health and reflection services use are the services' own (as generated
    /// from the descriptors): a typo would list a service nobody serves.
    #[test]
    fn the_service_names_are_the_generated_ones() {
        use crate::v1;
        assert_eq!(names::COORDINATOR, v1::coordinator_server::SERVICE_NAME);
        assert_eq!(names::TEACHER, v1::teacher_server::SERVICE_NAME);
        assert_eq!(names::DISCRIMINATOR, v1::discriminator_server::SERVICE_NAME);
        assert_eq!(names::LEARNER, v1::learner_server::SERVICE_NAME);
        assert_eq!(names::LEARNER_RANKS, v1::learner_ranks_server::SERVICE_NAME);
        assert_eq!(names::HEALTH, tonic_health::pb::health_server::SERVICE_NAME);
        assert_eq!(
            names::REFLECTION_V1,
            tonic_reflection::pb::v1::server_reflection_server::SERVICE_NAME
        );
        assert_eq!(
            names::REFLECTION_V1ALPHA,
            tonic_reflection::pb::v1alpha::server_reflection_server::SERVICE_NAME
        );
    }
}
