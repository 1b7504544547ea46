//! What every ril client shares: channels that connect with a deadline (TLS and the run token
//! from the process's [`Security`]), generated clients with the project's message limits, and
//! health checks. The server side is [`crate::server`].

use std::time::Duration;

use tonic::service::interceptor::InterceptedService;
use tonic::transport::Endpoint;

use crate::error::source_chain;
use crate::security::{ClientAuth, Security};
use crate::server::{DEFAULT_MAX_MESSAGE_BYTES, ServeError, ServingStatus};
use crate::v1;

/// Every ril client's channel: TLS when the process's [`Security`] has it, and the run token
/// on every call.
pub type Channel = InterceptedService<tonic::transport::Channel, ClientAuth>;

/// Normalises `host:port` / `http://host:port` to a URI tonic accepts (`https` with TLS).
pub fn uri(addr: &str, tls: bool) -> String {
    let bare = addr
        .strip_prefix("http://")
        .or_else(|| addr.strip_prefix("https://"))
        .unwrap_or(addr);
    if tls {
        format!("https://{bare}")
    } else {
        format!("http://{bare}")
    }
}

fn endpoint(addr: &str, timeout: Duration, security: &Security) -> Result<Endpoint, ServeError> {
    let err = |detail: String| ServeError::Connect {
        addr: addr.to_string(),
        timeout,
        detail,
    };
    let mut endpoint = Endpoint::from_shared(uri(addr, security.is_tls()))
        .map_err(|e| err(format!("invalid address: {e}")))?
        .connect_timeout(timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(20));
    if let Some(tls) = security.client_tls() {
        endpoint = endpoint.tls_config(tls).map_err(|e| ServeError::Tls {
            what: format!("the client of {addr}"),
            detail: source_chain(&e),
        })?;
    }
    Ok(endpoint)
}

/// Connects to `addr` (TLS and the run token per `security`), failing with the address and
/// the cause after `timeout`.
pub async fn connect(
    addr: &str,
    timeout: Duration,
    security: &Security,
) -> Result<Channel, ServeError> {
    let endpoint = endpoint(addr, timeout, security)?;
    let err = |detail: String| ServeError::Connect {
        addr: addr.to_string(),
        timeout,
        detail,
    };
    match tokio::time::timeout(timeout, endpoint.connect()).await {
        Ok(Ok(ch)) => Ok(InterceptedService::new(ch, security.client_auth())),
        Ok(Err(e)) => Err(err(source_chain(&e))),
        Err(_) => Err(err("timed out".into())),
    }
}

/// Awaits a call's `reply` (for a stream, the call and every message of it) for at most
/// `deadline`, enforced on this side: a peer that keeps its connection open and stops
/// answering (a stopped process whose kernel still accepts connections, a server that never
/// replies) fails the call as DEADLINE_EXCEEDED "no reply within the deadline of N ms".
/// A server that gave up on the `grpc-timeout` it was sent (CANCELLED or DEADLINE_EXCEEDED
/// once the deadline has passed) reads the same.
pub async fn within<T>(
    deadline: Duration,
    reply: impl std::future::Future<Output = Result<T, tonic::Status>>,
) -> Result<T, tonic::Status> {
    let started = std::time::Instant::now();
    let missed = || {
        tonic::Status::deadline_exceeded(format!(
            "no reply within the deadline of {} ms",
            deadline.as_millis()
        ))
    };
    match tokio::time::timeout(deadline, reply).await {
        Ok(Err(status))
            if started.elapsed() >= deadline
                && matches!(
                    status.code(),
                    tonic::Code::Cancelled | tonic::Code::DeadlineExceeded
                ) =>
        {
            Err(missed())
        }
        Ok(result) => result,
        Err(_) => Err(missed()),
    }
}

/// A lazily connecting channel (reconnects on its own after a peer restarts).
pub fn connect_lazy(
    addr: &str,
    timeout: Duration,
    security: &Security,
) -> Result<Channel, ServeError> {
    let ch = endpoint(addr, timeout, security)?.connect_lazy();
    Ok(InterceptedService::new(ch, security.client_auth()))
}

/// The services `addr` lists through server reflection (v1 ListServices), sorted.
pub async fn list_services(
    addr: &str,
    timeout: Duration,
    security: &Security,
) -> Result<Vec<String>, ServeError> {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let failed = |detail: String| ServeError::Connect {
        addr: addr.to_string(),
        timeout,
        detail,
    };
    let channel = connect(addr, timeout, security).await?;
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let ask = async {
        let mut client = ServerReflectionClient::new(channel);
        let requests = tonic::codegen::tokio_stream::iter([request]);
        let mut replies = client.server_reflection_info(requests).await?.into_inner();
        replies.message().await
    };
    let reply = within(timeout, ask)
        .await
        .map_err(|s| {
            failed(format!(
                "reflection failed ({:?}): {}",
                s.code(),
                s.message()
            ))
        })?
        .ok_or_else(|| failed("reflection answered nothing".into()))?;
    match reply.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
            names.sort();
            Ok(names)
        }
        other => Err(failed(format!(
            "reflection answered {other:?}, not a service list"
        ))),
    }
}

/// Asks `addr`'s grpc.health.v1 for `service` ("" = the server as a whole).
pub async fn health_check(
    addr: &str,
    service: &str,
    timeout: Duration,
    security: &Security,
) -> Result<ServingStatus, ServeError> {
    let channel = connect(addr, timeout, security).await?;
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

/// The generated clients with the project's message limits on both directions (tonic's default
/// of 4 MiB would refuse what the servers accept).
macro_rules! limited_clients {
    ($($(#[$doc:meta])* $name:ident => $client:ty;)*) => {$(
        $(#[$doc])*
        pub fn $name(channel: Channel) -> $client {
            <$client>::new(channel)
                .max_decoding_message_size(DEFAULT_MAX_MESSAGE_BYTES)
                .max_encoding_message_size(DEFAULT_MAX_MESSAGE_BYTES)
        }
    )*};
}

limited_clients! {
    /// A `ril.v1.Coordinator` client.
    coordinator => v1::coordinator_client::CoordinatorClient<Channel>;
    /// A `ril.v1.Learner` client (actors: PushGroups, GetWeights).
    learner => v1::learner_client::LearnerClient<Channel>;
    /// A `ril.v1.LearnerRanks` client (rank 0 to the other ranks).
    learner_ranks => v1::learner_ranks_client::LearnerRanksClient<Channel>;
    /// A `ril.v1.Teacher` client.
    teacher => v1::teacher_client::TeacherClient<Channel>;
    /// A `ril.v1.Discriminator` client.
    discriminator => v1::discriminator_client::DiscriminatorClient<Channel>;
}
