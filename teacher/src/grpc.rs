//! The gRPC adapter: `ril.v1.Teacher` over a [`Teacher`], with `grpc.health.v1`, server
//! reflection, explicit message-size limits and graceful shutdown.
//!
//! The server accepts connections at once and reports NOT_SERVING (for `ril.v1.Teacher` and
//! the server as a whole) until the backend is loaded; requests meanwhile get UNAVAILABLE. On
//! shutdown it reports NOT_SERVING, stops accepting, lets in-flight answer streams finish, and
//! closes the cache file before returning.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use ril_proto::error::status;
use ril_proto::server::{self, Bound, DEFAULT_MAX_MESSAGE_BYTES, ServingStatus, names, set_status};
use ril_proto::v1;
use ril_proto::v1::teacher_server::TeacherServer;
use tokio::sync::{mpsc, watch};
use tonic::{Request, Response, Status};
use tracing::{error, info, instrument, warn};

use crate::convert::answer_to_wire;
use crate::error::TeacherError;
use crate::options::{DEFAULT_SHUTDOWN_GRACE, TeacherOptions};
use crate::service::{Answer, AnswerQuery, Teacher};

/// Where the loaded teacher appears; empty while loading and after shutdown.
type Slot = Arc<RwLock<Option<Arc<Teacher>>>>;

struct TeacherGrpc {
    name: String,
    slot: Slot,
    /// Raised at shutdown.
    stopping: watch::Receiver<bool>,
}

impl TeacherGrpc {
    fn teacher(&self) -> Result<Arc<Teacher>, Status> {
        let teacher = self.slot.read().unwrap_or_else(|p| p.into_inner()).clone();
        teacher.ok_or_else(|| {
            status(&if *self.stopping.borrow() {
                TeacherError::ShuttingDown("not taking new requests".into())
            } else {
                TeacherError::Loading {
                    name: self.name.clone(),
                }
            })
        })
    }
}

/// The answers of one request, as a gRPC stream.
pub struct AnswerStream {
    teacher: String,
    rx: mpsc::Receiver<Result<Answer, TeacherError>>,
}

impl Stream for AnswerStream {
    type Item = Result<v1::TeacherAnswer, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx).map(|item| {
            item.map(|r| match r {
                Ok(answer) => Ok(answer_to_wire(&self.teacher, answer)),
                Err(e) => Err(status(&e)),
            })
        })
    }
}

#[tonic::async_trait]
impl v1::teacher_server::Teacher for TeacherGrpc {
    type AnswerStream = AnswerStream;

    #[instrument(skip(self, request))]
    async fn answer(
        &self,
        request: Request<v1::AnswerRequest>,
    ) -> Result<Response<Self::AnswerStream>, Status> {
        let query = AnswerQuery::try_from(request.into_inner()).map_err(|e| status(&e))?;
        let teacher = self.teacher()?;
        let rx = teacher.answer(query).map_err(|e| status(&e))?;
        Ok(Response::new(AnswerStream {
            teacher: teacher.name().to_string(),
            rx,
        }))
    }

    #[instrument(skip(self, request))]
    async fn info(
        &self,
        request: Request<v1::TeacherInfoRequest>,
    ) -> Result<Response<v1::TeacherInfo>, Status> {
        let v1::TeacherInfoRequest {} = request.into_inner();
        let info = self.teacher()?.info().await.map_err(|e| status(&e))?;
        Ok(Response::new(info.into()))
    }
}

/// Serves the teacher `options` describe on `bound` until `shutdown` resolves. The backend
/// loads while the server already answers health checks (NOT_SERVING); a backend that fails to
/// load stops the server and is the error returned.
pub async fn serve(
    options: TeacherOptions,
    bound: Bound,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), TeacherError> {
    options.validate()?;
    let name = options.name.clone();
    let grace = options.shutdown_grace;
    serve_loading(
        name,
        async move { Teacher::load(options).await.map(Arc::new) },
        grace,
        bound,
        shutdown,
    )
    .await
}

/// Serves an already loaded teacher (tests, embedding), with [`DEFAULT_SHUTDOWN_GRACE`]. A
/// teacher is served once: its cache is closed when the server stops.
pub async fn serve_teacher(
    teacher: Arc<Teacher>,
    bound: Bound,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), TeacherError> {
    let name = teacher.name().to_string();
    serve_loading(
        name,
        async move { Ok(teacher) },
        DEFAULT_SHUTDOWN_GRACE,
        bound,
        shutdown,
    )
    .await
}

/// Serves the teacher `loader` produces once it has produced it: NOT_SERVING until then.
/// `grace`: see [`TeacherOptions::shutdown_grace`].
pub async fn serve_loading<L>(
    name: String,
    loader: L,
    grace: Duration,
    bound: Bound,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), TeacherError>
where
    L: Future<Output = Result<Arc<Teacher>, TeacherError>> + Send + 'static,
{
    let addr = bound.addr;
    let (reporter, health_service) = server::health([names::TEACHER]).await;
    let (reflection_v1, reflection_v1alpha) = server::reflection(&[names::TEACHER])?;
    // Raised by the caller's shutdown or by a failed load.
    let (stop_tx, stop_rx) = watch::channel(false);
    let stop_tx = Arc::new(stop_tx);
    let slot: Slot = Arc::new(RwLock::new(None));
    {
        let slot = slot.clone();
        bound.metrics.add_loaded(
            "ril_teacher_loaded",
            "1 once the backend is loaded and the teacher serves.",
            move || slot.read().unwrap_or_else(|p| p.into_inner()).clone(),
            |teacher, out| teacher.write_metrics(out),
        );
    }
    let service = TeacherServer::new(TeacherGrpc {
        name: name.clone(),
        slot: slot.clone(),
        stopping: stop_rx.clone(),
    })
    .max_decoding_message_size(DEFAULT_MAX_MESSAGE_BYTES)
    .max_encoding_message_size(DEFAULT_MAX_MESSAGE_BYTES);
    let watcher = {
        let stop_tx = stop_tx.clone();
        let draining = reporter.clone();
        tokio::spawn(async move {
            shutdown.await;
            set_status(&draining, &[names::TEACHER], ServingStatus::NotServing).await;
            let _ = stop_tx.send(true);
        })
    };
    let mut secure = bound.server(&health_service).await?;
    let server = tokio::spawn(
        secure
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(service)
            .serve_with_incoming_shutdown(server::incoming(bound), stopped(stop_rx.clone())),
    );
    info!(teacher = %name, %addr, "teacher server listening; loading the backend");

    let load_error = match tokio::select! {
        result = loader => Some(result),
        _ = stopped(stop_rx.clone()) => None,
    } {
        Some(Ok(teacher)) => {
            *slot.write().unwrap_or_else(|p| p.into_inner()) = Some(teacher);
            if !*stop_rx.borrow() {
                set_status(&reporter, &[names::TEACHER], ServingStatus::Serving).await;
                info!(teacher = %name, %addr, "teacher serving");
            }
            None
        }
        Some(Err(e)) => {
            error!(teacher = %name, error = %e, "teacher backend failed to load; stopping");
            let _ = stop_tx.send(true);
            Some(e)
        }
        None => {
            info!(teacher = %name, "shut down while loading");
            None
        }
    };
    let served = drain(server, &slot, stop_rx, grace, &name, addr).await;
    // After a failed load the caller's shutdown never came: stop waiting for it.
    watcher.abort();
    // Streams still being produced finish (into the cache) before the file is closed.
    let teacher = slot.write().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(teacher) = teacher {
        teacher.close().await;
    }
    info!(teacher = %name, "teacher server stopped");
    match load_error {
        Some(e) => Err(e),
        None => served,
    }
}

/// Resolves once the server is told to stop.
async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

type ServerTask = tokio::task::JoinHandle<Result<(), tonic::transport::Error>>;

/// Waits for the server to stop after shutdown. Graceful shutdown waits for every open stream,
/// and a health `Watch` never ends on its own: once the answer streams are produced,
/// connections get `grace` to finish; then this stops waiting for them (their tasks end when
/// their clients go, or with the process).
async fn drain(
    mut server: ServerTask,
    slot: &Slot,
    stop_rx: watch::Receiver<bool>,
    grace: Duration,
    name: &str,
    addr: std::net::SocketAddr,
) -> Result<(), TeacherError> {
    let drained = {
        let slot = slot.clone();
        async move {
            stopped(stop_rx).await;
            let teacher = slot.read().unwrap_or_else(|p| p.into_inner()).clone();
            if let Some(teacher) = teacher {
                teacher.wait_idle().await;
            }
            tokio::time::sleep(grace).await;
        }
    };
    let joined = tokio::select! {
        joined = &mut server => joined,
        () = drained => {
            warn!(teacher = %name, ?grace, "connections still open after the shutdown grace (health watchers?); not waiting for them");
            server.abort();
            let _ = server.await;
            return Ok(());
        }
    };
    joined
        .map_err(|e| TeacherError::Internal(format!("the gRPC server task failed: {e}")))?
        .map_err(|source| ril_proto::server::ServeError::Serve { addr, source }.into())
}
