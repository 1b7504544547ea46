//! Per-method RPC metrics every ril server records, as a tower layer in front of its services
//! (outside the authorisation layer, so refused calls count too):
//!
//! - `ril_rpc_server_handled_total{service,method,code}`: calls finished, by gRPC status code
//!   (`OK`, `UNAVAILABLE`, ...). Errors by method and code are the series with `code != "OK"`.
//! - `ril_rpc_server_handling_seconds{service,method}`: from the request's arrival to the end
//!   of the response (a stream's whole life).
//!
//! The code is the response's: the `grpc-status` header of a trailers-only response (an error
//! returned by a handler), else the trailers' (the end of a unary or streaming call). A response
//! dropped before it ended (the client went away, the server stopped) counts as `CANCELLED`,
//! unless its headers already carried the status.
//! At most [`MAX_METHODS`] `(service, method)` pairs are kept; paths beyond that are counted as
//! `other`, so a client calling made-up paths cannot grow the server's memory.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use tonic::codegen::http;

use super::{Exposition, HistogramSnapshot, Kind, SECONDS_BUCKETS};

/// Most distinct `(service, method)` pairs one server keeps.
pub const MAX_METHODS: usize = 128;

/// gRPC's status code names, by number.
const CODE_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// The name of gRPC status code `code` (`UNKNOWN` for a number outside the protocol's).
pub fn code_name(code: i32) -> &'static str {
    usize::try_from(code)
        .ok()
        .and_then(|i| CODE_NAMES.get(i))
        .copied()
        .unwrap_or("UNKNOWN")
}

fn code_of(value: Option<&http::HeaderValue>) -> Option<i32> {
    value?.to_str().ok()?.trim().parse().ok()
}

#[derive(Debug, Clone)]
struct MethodStats {
    seconds: HistogramSnapshot,
    /// Calls finished, by code number.
    codes: BTreeMap<i32, u64>,
}

/// What a server's calls did, per method. Cheap to clone (shared).
#[derive(Debug, Clone, Default)]
pub struct RpcStats {
    methods: Arc<Mutex<BTreeMap<(String, String), MethodStats>>>,
}

impl RpcStats {
    /// Records one finished call.
    pub fn record(&self, service: &str, method: &str, code: i32, seconds: f64) {
        self.record_key((service.to_string(), method.to_string()), code, seconds);
    }

    /// [`Self::record`] with the `(service, method)` key already owned (a call's own).
    fn record_key(&self, key: (String, String), code: i32, seconds: f64) {
        let mut methods = self.methods.lock().unwrap_or_else(|p| p.into_inner());
        let key = if methods.contains_key(&key) || methods.len() < MAX_METHODS {
            key
        } else {
            ("other".to_string(), "other".to_string())
        };
        let stats = methods.entry(key).or_insert_with(|| MethodStats {
            seconds: HistogramSnapshot::new(SECONDS_BUCKETS),
            codes: BTreeMap::new(),
        });
        stats.seconds.observe(seconds);
        *stats.codes.entry(code).or_default() += 1;
    }

    /// Calls of `service`/`method` finished with `code` so far.
    pub fn handled(&self, service: &str, method: &str, code: &str) -> u64 {
        let methods = self.methods.lock().unwrap_or_else(|p| p.into_inner());
        methods
            .get(&(service.to_string(), method.to_string()))
            .map(|s| {
                s.codes
                    .iter()
                    .filter(|(c, _)| code_name(**c) == code)
                    .map(|(_, n)| n)
                    .sum()
            })
            .unwrap_or(0)
    }

    pub(super) fn collect(&self, out: &mut Exposition) {
        let methods = self
            .methods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let handled: Vec<([(&str, &str); 3], f64)> = methods
            .iter()
            .flat_map(|((service, method), s)| {
                s.codes.iter().map(move |(code, n)| {
                    (
                        [
                            ("service", service.as_str()),
                            ("method", method.as_str()),
                            ("code", code_name(*code)),
                        ],
                        *n as f64,
                    )
                })
            })
            .collect();
        out.family(
            "ril_rpc_server_handled_total",
            "RPCs this server finished, by service, method and gRPC status code.",
            Kind::Counter,
            handled.iter().map(|(l, v)| (&l[..], *v)),
        );
        let labels: Vec<[(&str, &str); 2]> = methods
            .keys()
            .map(|(service, method)| [("service", service.as_str()), ("method", method.as_str())])
            .collect();
        out.histogram(
            "ril_rpc_server_handling_seconds",
            "Time from an RPC's arrival to the end of its response, by service and method.",
            labels
                .iter()
                .zip(methods.values())
                .map(|(l, s)| (&l[..], &s.seconds)),
        );
    }
}

/// The tower layer that records [`RpcStats`] for every call through a server.
#[derive(Debug, Clone)]
pub struct RpcMetricsLayer {
    stats: RpcStats,
}

impl RpcMetricsLayer {
    pub fn new(stats: RpcStats) -> Self {
        Self { stats }
    }
}

impl<S> tower_layer::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetricsService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RpcMetricsService {
            inner,
            stats: self.stats.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RpcMetricsService<S> {
    inner: S,
    stats: RpcStats,
}

type BoxFuture<T, E> = Pin<Box<dyn std::future::Future<Output = Result<T, E>> + Send>>;

/// `/package.Service/Method` as `(package.Service, Method)`.
fn split_path(path: &str) -> (String, String) {
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let service = parts.next().unwrap_or_default();
    let method = parts.next().unwrap_or_default();
    (service.to_string(), method.to_string())
}

impl<S, B, R> tower_service::Service<http::Request<B>> for RpcMetricsService<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: http_body::Body + Send + 'static,
{
    type Response = http::Response<MeteredBody<R>>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let (service, method) = split_path(req.uri().path());
        let call = Pending {
            stats: self.stats.clone(),
            service,
            method,
            started: Instant::now(),
            header_code: None,
        };
        let response = self.inner.call(req);
        Box::pin(async move {
            let response = response.await?;
            let mut call = call;
            call.header_code = code_of(response.headers().get("grpc-status"));
            Ok(response.map(|body| MeteredBody {
                inner: Box::pin(body),
                call: Some(call),
            }))
        })
    }
}

/// A call whose response has not ended yet.
struct Pending {
    stats: RpcStats,
    service: String,
    method: String,
    started: Instant,
    header_code: Option<i32>,
}

impl Pending {
    fn finish(self, code: i32) {
        let seconds = self.started.elapsed().as_secs_f64();
        self.stats
            .record_key((self.service, self.method), code, seconds);
    }
}

/// A response body that records its call when it ends (trailers, end of stream, an error or
/// being dropped early).
pub struct MeteredBody<R> {
    inner: Pin<Box<R>>,
    call: Option<Pending>,
}

impl<R> Drop for MeteredBody<R> {
    fn drop(&mut self) {
        if let Some(call) = self.call.take() {
            // A trailers-only response (an error a handler returned) is complete with its
            // headers and need not be polled; anything else dropped before its end was cut
            // short: the client went away or the server is stopping.
            let code = call.header_code.unwrap_or(1);
            call.finish(code);
        }
    }
}

impl<R: http_body::Body> http_body::Body for MeteredBody<R> {
    type Data = R::Data;
    type Error = R::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let polled = this.inner.as_mut().poll_frame(cx);
        let code = match &polled {
            Poll::Ready(Some(Ok(frame))) => frame
                .trailers_ref()
                .map(|t| code_of(t.get("grpc-status")).unwrap_or(2)),
            // An error in the body: the stream broke (INTERNAL, as a client would see it).
            Poll::Ready(Some(Err(_))) => Some(13),
            // Ended without trailers: a trailers-only response's header code (else not gRPC).
            Poll::Ready(None) => Some(this.call.as_ref().and_then(|c| c.header_code).unwrap_or(2)),
            Poll::Pending => None,
        };
        if let Some(code) = code
            && let Some(call) = this.call.take()
        {
            call.finish(code);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_split_and_codes_are_named() {
        assert_eq!(
            split_path("/ril.v1.Coordinator/LeasePrompts"),
            ("ril.v1.Coordinator".to_string(), "LeasePrompts".to_string())
        );
        assert_eq!(code_name(0), "OK");
        assert_eq!(code_name(14), "UNAVAILABLE");
        assert_eq!(code_name(16), "UNAUTHENTICATED");
        assert_eq!(code_name(99), "UNKNOWN");
        assert_eq!(code_name(-1), "UNKNOWN");
    }

    #[test]
    fn methods_beyond_the_limit_count_as_other() {
        let stats = RpcStats::default();
        for i in 0..MAX_METHODS + 10 {
            stats.record("s", &format!("m{i}"), 0, 0.001);
        }
        assert_eq!(stats.methods.lock().unwrap().len(), MAX_METHODS + 1);
        assert_eq!(stats.handled("other", "other", "OK"), 10);
        assert_eq!(stats.handled("s", "m0", "OK"), 1);
    }
}

#[cfg(test)]
mod served {
    use std::time::Duration;

    use crate::server::{self, ServingStatus};

    /// A real server's health calls are recorded by method and code, its refused calls too.
    #[tokio::test]
    async fn a_real_server_records_its_calls_by_method_and_code() {
        let bound = server::bind("127.0.0.1:0").await.unwrap();
        let addr = bound.addr.to_string();
        let registry = bound.metrics.clone();
        let (reporter, health) = server::health(["ril.v1.Teacher"]).await;
        server::set_status(&reporter, &["ril.v1.Teacher"], ServingStatus::Serving).await;
        let serving = bound
            .server(&health)
            .await
            .unwrap()
            .add_service(health)
            .serve_with_incoming(server::incoming(bound));
        tokio::spawn(serving);
        let security = crate::security::Security::default();
        let t = Duration::from_secs(5);
        let ok = crate::client::health_check(&addr, "ril.v1.Teacher", t, &security).await;
        assert_eq!(ok.unwrap(), ServingStatus::Serving);
        let unknown = crate::client::health_check(&addr, "nope", t, &security).await;
        assert!(unknown.is_err());
        let stats = registry.rpc();
        let deadline = std::time::Instant::now() + t;
        while stats.handled("grpc.health.v1.Health", "Check", "NOT_FOUND") == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "{}",
                registry.render()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(stats.handled("grpc.health.v1.Health", "Check", "OK"), 1);
        let text = registry.render();
        assert!(text.contains("ril_rpc_server_handling_seconds_count{service=\"grpc.health.v1.Health\",method=\"Check\"} 2"), "{text}");
    }
}
