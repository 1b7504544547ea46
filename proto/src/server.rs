//! What every ril gRPC server shares: binding (ephemeral ports included), `grpc.health.v1`,
//! server reflection, explicit message-size limits, and graceful shutdown on SIGTERM / Ctrl-C.
//! Clients get the same limits and connect with a deadline.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint};
pub use tonic_health::ServingStatus;
pub use tonic_health::server::HealthReporter;

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
    #[error("cannot build the reflection service: {0}")]
    Reflection(String),
    #[error("cannot reach {addr} within {timeout:?}: {detail}")]
    Connect {
        addr: String,
        timeout: Duration,
        detail: String,
    },
}

/// A bound listener. Binding before serving lets a caller use port 0 and learn the real port.
#[derive(Debug)]
pub struct Bound {
    pub listener: TcpListener,
    pub addr: SocketAddr,
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
    Ok(Bound { listener, addr })
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

/// Server reflection (v1 and v1alpha) over every `ril.v1` service and grpc.health.v1.
pub fn reflection() -> Result<
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
    let v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;
    let v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;
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

/// A tonic `Server` builder with the project's defaults: HTTP/2 keep-alive so dead peers are
/// noticed, and a per-connection concurrency cap.
pub fn builder() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .tcp_nodelay(true)
}

/// Normalises `host:port` / `http://host:port` to a URI tonic accepts.
pub fn uri(addr: &str) -> String {
    if addr.starts_with("http://") || addr.starts_with("https://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

/// Connects to `addr`, failing with the address and the cause after `timeout`.
pub async fn connect(addr: &str, timeout: Duration) -> Result<Channel, ServeError> {
    let err = |detail: String| ServeError::Connect {
        addr: addr.to_string(),
        timeout,
        detail,
    };
    let endpoint = Endpoint::from_shared(uri(addr))
        .map_err(|e| err(format!("invalid address: {e}")))?
        .connect_timeout(timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(20));
    match tokio::time::timeout(timeout, endpoint.connect()).await {
        Ok(Ok(ch)) => Ok(ch),
        Ok(Err(e)) => Err(err(source_chain(&e))),
        Err(_) => Err(err("timed out".into())),
    }
}

/// A lazily connecting channel (reconnects on its own after a peer restarts).
pub fn connect_lazy(addr: &str, timeout: Duration) -> Result<Channel, ServeError> {
    let endpoint = Endpoint::from_shared(uri(addr))
        .map_err(|e| ServeError::Connect {
            addr: addr.to_string(),
            timeout,
            detail: format!("invalid address: {e}"),
        })?
        .connect_timeout(timeout)
        .tcp_nodelay(true);
    Ok(endpoint.connect_lazy())
}

/// `error: cause: cause` for messages that name the root problem.
pub fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// Asks `addr`'s grpc.health.v1 for `service` ("" = the server as a whole).
pub async fn health_check(
    addr: &str,
    service: &str,
    timeout: Duration,
) -> Result<ServingStatus, ServeError> {
    let channel = connect(addr, timeout).await?;
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    let reply = tokio::time::timeout(
        timeout,
        client.check(tonic_health::pb::HealthCheckRequest {
            service: service.to_string(),
        }),
    )
    .await
    .map_err(|_| ServeError::Connect {
        addr: addr.to_string(),
        timeout,
        detail: "health check timed out".into(),
    })?
    .map_err(|s| ServeError::Connect {
        addr: addr.to_string(),
        timeout,
        detail: format!("health check failed: {}", s.message()),
    })?;
    Ok(
        match tonic_health::pb::health_check_response::ServingStatus::try_from(
            reply.into_inner().status,
        ) {
            Ok(tonic_health::pb::health_check_response::ServingStatus::Serving) => {
                ServingStatus::Serving
            }
            Ok(tonic_health::pb::health_check_response::ServingStatus::NotServing) => {
                ServingStatus::NotServing
            }
            _ => ServingStatus::Unknown,
        },
    )
}

/// Fully-qualified gRPC service names, for health status keys.
pub mod names {
    pub const COORDINATOR: &str = "ril.v1.Coordinator";
    pub const TEACHER: &str = "ril.v1.Teacher";
    pub const DISCRIMINATOR: &str = "ril.v1.Discriminator";
    pub const LEARNER: &str = "ril.v1.Learner";
}
