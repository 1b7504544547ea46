//! The plain HTTP/1.1 `/metrics` endpoint a role serves with `--metrics-listen` (Prometheus
//! scrapes over HTTP; the gRPC port may be TLS-only). `GET /metrics` answers the scrape in the
//! text format; `GET /` says where the metrics are; other paths are 404, other methods 405. It
//! serves no data but the metrics, so it needs no token: keep it on the cluster network (the
//! manifests' NetworkPolicy admits the monitoring namespace only).
//!
//! Bounded: at most [`MAX_CONNECTIONS`] connections at once (more wait in the accept queue),
//! a request's headers must arrive within [`HEADER_TIMEOUT`] and a connection lives at most
//! [`CONNECTION_TIMEOUT`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;

use super::{CONTENT_TYPE, Registry};
use crate::error::source_chain;
use crate::server::ServeError;

pub const MAX_CONNECTIONS: usize = 32;
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);

fn answer(registry: &Registry, req: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, content_type: &str, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        if let Ok(v) = content_type.parse() {
            r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
        }
        r
    };
    let text = "text/plain; charset=utf-8";
    match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/metrics") => {
            reply(StatusCode::OK, CONTENT_TYPE, registry.render())
        }
        (&Method::GET | &Method::HEAD, "/") => reply(
            StatusCode::OK,
            text,
            format!("ril {} metrics: GET /metrics\n", registry.role()),
        ),
        (_, "/" | "/metrics") => reply(
            StatusCode::METHOD_NOT_ALLOWED,
            text,
            format!("{} is not served here; use GET\n", req.method()),
        ),
        (_, path) => reply(
            StatusCode::NOT_FOUND,
            text,
            format!("{path} is not served here; the metrics are at /metrics\n"),
        ),
    }
}

/// Binds `listen` and serves `registry` there for as long as the process lives. Returns the
/// bound address (for port 0).
pub async fn spawn(listen: &str, registry: Registry) -> Result<SocketAddr, ServeError> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: listen.to_string(),
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: listen.to_string(),
        source,
    })?;
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(%addr, error = %e, "metrics endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let registry = registry.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let registry = registry.clone();
                    async move { Ok::<_, Infallible>(answer(&registry, &req)) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                match tokio::time::timeout(CONNECTION_TIMEOUT, conn).await {
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %source_chain(&e), "metrics connection failed")
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "metrics connection closed after its time limit")
                    }
                    Ok(Ok(())) => {}
                }
                drop(slot);
            });
        }
    });
    tracing::info!(%addr, "metrics endpoint listening (GET /metrics)");
    Ok(addr)
}
