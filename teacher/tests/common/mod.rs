//! Shared test plumbing: teacher servers on ephemeral loopback ports, a client, waits on health
//! (the `Watch` stream, not polling), questions, and an OpenAI-compatible stand-in.
#![allow(dead_code)]

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use ril_data::Row;
use ril_data::dataset::{ImageData, Message};
use ril_proto::client::Channel;
use ril_proto::convert::row_to_question;
use ril_proto::v1;
use ril_proto::v1::teacher_client::TeacherClient;
use ril_teacher::{Teacher, TeacherError, TeacherOptions};
use serde_json::{Value, json};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse, health_client::HealthClient};

/// Bound on every wait, so that a broken server fails the test instead of hanging it.
pub const WAIT: Duration = Duration::from_secs(120);

pub struct Server {
    pub addr: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), TeacherError>>>,
}

impl Server {
    async fn spawn<F, Fut>(run: F) -> Self
    where
        F: FnOnce(ril_proto::server::Bound, oneshot::Receiver<()>) -> Fut,
        Fut: Future<Output = Result<(), TeacherError>> + Send + 'static,
    {
        let bound = ril_proto::server::bind("127.0.0.1:0").await.unwrap();
        let addr = bound.addr.to_string();
        let (stop, rx) = oneshot::channel();
        let task = tokio::spawn(run(bound, rx));
        Self {
            addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub async fn start(options: TeacherOptions) -> Self {
        Self::spawn(|bound, rx| {
            ril_teacher::serve(options, bound, async move {
                let _ = rx.await;
            })
        })
        .await
    }

    pub async fn start_teacher(teacher: Arc<Teacher>) -> Self {
        Self::spawn(|bound, rx| {
            ril_teacher::serve_teacher(teacher, bound, async move {
                let _ = rx.await;
            })
        })
        .await
    }

    pub async fn start_loading<L>(name: &str, loader: L) -> Self
    where
        L: Future<Output = Result<Arc<Teacher>, TeacherError>> + Send + 'static,
    {
        let name = name.to_string();
        Self::spawn(|bound, rx| {
            ril_teacher::serve_loading(name, loader, Duration::from_secs(5), bound, async move {
                let _ = rx.await;
            })
        })
        .await
    }

    /// Starts and waits until it reports SERVING.
    pub async fn ready(options: TeacherOptions) -> Self {
        let s = Self::start(options).await;
        s.wait_for_health(ServingStatus::Serving).await;
        s
    }

    pub async fn client(&self) -> TeacherClient<Channel> {
        let channel =
            ril_proto::client::connect(&self.addr, Duration::from_secs(10), &Default::default())
                .await
                .unwrap();
        ril_proto::client::teacher(channel)
    }

    /// Current health of `service` (`""` = the server as a whole).
    pub async fn health(&self, service: &str) -> ServingStatus {
        let channel =
            ril_proto::client::connect(&self.addr, Duration::from_secs(10), &Default::default())
                .await
                .unwrap();
        let reply = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        ServingStatus::try_from(reply.status).unwrap()
    }

    /// The health `Watch` stream of `ril.v1.Teacher`.
    pub async fn health_stream(&self) -> tonic::Streaming<HealthCheckResponse> {
        let channel =
            ril_proto::client::connect(&self.addr, Duration::from_secs(10), &Default::default())
                .await
                .unwrap();
        HealthClient::new(channel)
            .watch(HealthCheckRequest {
                service: "ril.v1.Teacher".into(),
            })
            .await
            .unwrap()
            .into_inner()
    }

    /// Follows the health `Watch` stream of `ril.v1.Teacher` until it reports `want`.
    pub async fn wait_for_health(&self, want: ServingStatus) {
        let mut stream = self.health_stream().await;
        wait_for_status(&mut stream, want).await;
    }

    /// Raises shutdown and returns what `serve` returned.
    pub async fn stop(mut self) -> Result<(), TeacherError> {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(WAIT, self.task.take().unwrap())
            .await
            .expect("the server stops")
            .unwrap()
    }

    /// What `serve` returned when it stopped on its own (a failed load).
    pub async fn finished(mut self) -> Result<(), TeacherError> {
        tokio::time::timeout(WAIT, self.task.take().unwrap())
            .await
            .expect("the server stops")
            .unwrap()
    }
}

/// Reads a health `Watch` stream until it reports `want`.
pub async fn wait_for_status(
    stream: &mut tonic::Streaming<HealthCheckResponse>,
    want: ServingStatus,
) {
    tokio::time::timeout(WAIT, async {
        while let Some(reply) = stream.message().await.unwrap() {
            if reply.status == want as i32 {
                return;
            }
        }
        panic!("health stream ended before {want:?}");
    })
    .await
    .unwrap_or_else(|_| panic!("no {want:?} within {WAIT:?}"));
}

pub async fn info(client: &mut TeacherClient<Channel>) -> v1::TeacherInfo {
    client
        .info(v1::TeacherInfoRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// Every answer of one request, or the status that ended the stream (answers before it lost).
pub async fn ask(
    client: &mut TeacherClient<Channel>,
    request: v1::AnswerRequest,
) -> Result<Vec<v1::TeacherAnswer>, tonic::Status> {
    let mut stream = client.answer(request).await?.into_inner();
    let mut out = Vec::new();
    while let Some(a) = tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("an answer within the wait")?
    {
        out.push(a);
    }
    Ok(out)
}

pub fn request(row: &Row, n: u32, sampling: Option<v1::SamplingSettings>) -> v1::AnswerRequest {
    v1::AnswerRequest {
        question: Some(row_to_question(row)),
        n,
        sampling,
    }
}

pub fn sampling(seed: u64) -> v1::SamplingSettings {
    v1::SamplingSettings {
        temperature: 1.0,
        top_p: 0.95,
        top_k: 50,
        repetition_penalty: 1.05,
        max_new_tokens: 8,
        seed,
    }
}

pub fn row(id: &str, question: &str, images: Vec<Vec<u8>>) -> Row {
    Row {
        id: id.into(),
        images: images
            .into_iter()
            .enumerate()
            .map(|(i, bytes)| ImageData {
                name: format!("{id}-{i}.png"),
                bytes,
            })
            .collect(),
        messages: vec![Message {
            role: "user".into(),
            content: Value::String(question.into()),
        }],
        answer: "red".into(),
        answer_type: None,
        teacher_answers: Default::default(),
        family: None,
        extra: Default::default(),
    }
}

pub fn texts(answers: &[v1::TeacherAnswer]) -> Vec<String> {
    answers.iter().map(|a| a.text.clone()).collect()
}

pub fn indices(answers: &[v1::TeacherAnswer]) -> Vec<u32> {
    answers.iter().map(|a| a.index).collect()
}

pub fn from_cache(answers: &[v1::TeacherAnswer]) -> Vec<bool> {
    answers.iter().map(|a| a.from_cache).collect()
}

/// How the OpenAI-compatible stand-in behaves.
#[derive(Clone)]
pub struct Script {
    /// The first `fail_first` requests get `fail_status`.
    pub fail_first: usize,
    pub fail_status: StatusCode,
    /// At most this many choices per reply (servers that ignore `n`).
    pub max_choices: Option<usize>,
    /// Required `Authorization: Bearer` key.
    pub api_key: Option<String>,
    /// Replies wait until the gate is opened.
    pub gated: bool,
}

impl Default for Script {
    fn default() -> Self {
        Self {
            fail_first: 0,
            fail_status: StatusCode::INTERNAL_SERVER_ERROR,
            max_choices: None,
            api_key: None,
            gated: false,
        }
    }
}

struct StandInState {
    script: Script,
    requests: watch::Sender<usize>,
    gate: watch::Sender<bool>,
    bodies: Mutex<Vec<Value>>,
}

/// A real HTTP server on a loopback port that speaks `/v1/chat/completions`. Answer `i` of a
/// call with seed `s` is `"answer {s + i} from {model}"`.
pub struct StandIn {
    pub base_url: String,
    state: Arc<StandInState>,
}

impl StandIn {
    pub async fn start(script: Script) -> Self {
        let state = Arc::new(StandInState {
            gate: watch::Sender::new(!script.gated),
            script,
            requests: watch::Sender::new(0),
            bodies: Mutex::new(Vec::new()),
        });
        let app = Router::new()
            .route("/v1/chat/completions", post(chat_completions))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self {
            base_url: format!("http://{address}/v1"),
            state,
        }
    }

    pub fn requests(&self) -> usize {
        *self.state.requests.borrow()
    }

    /// Waits until `n` requests have arrived.
    pub async fn wait_for_requests(&self, n: usize) {
        let mut rx = self.state.requests.subscribe();
        tokio::time::timeout(WAIT, rx.wait_for(|r| *r >= n))
            .await
            .expect("requests arrive")
            .unwrap();
    }

    pub fn open_gate(&self) {
        self.state.gate.send_replace(true);
    }

    pub fn bodies(&self) -> Vec<Value> {
        self.state.bodies.lock().unwrap().clone()
    }
}

async fn chat_completions(
    State(state): State<Arc<StandInState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    state.bodies.lock().unwrap().push(request.clone());
    let mut index = 0;
    state.requests.send_modify(|r| {
        index = *r;
        *r += 1;
    });
    let script = &state.script;
    if let Some(key) = &script.api_key {
        let sent = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if sent != Some(&format!("Bearer {key}")) {
            return (
                StatusCode::UNAUTHORIZED,
                axum::Json(json!({"error": {"message": "Invalid API key"}})),
            )
                .into_response();
        }
    }
    if index < script.fail_first {
        return (script.fail_status, "scripted failure").into_response();
    }
    let mut gate = state.gate.subscribe();
    let _ = tokio::time::timeout(WAIT, gate.wait_for(|open| *open)).await;
    let n = request["n"].as_u64().unwrap_or(1) as usize;
    let k = script.max_choices.map_or(n, |m| n.min(m));
    let seed = request["seed"].as_u64().unwrap_or(0);
    let model = request["model"].as_str().unwrap_or("?");
    let choices: Vec<Value> = (0..k)
        .map(|i| {
            json!({"index": i, "finish_reason": "stop",
                   "message": {"role": "assistant", "content": format!("answer {} from {model}", seed + i as u64)}})
        })
        .collect();
    axum::Json(
        json!({"id": "cmpl-1", "object": "chat.completion", "model": model, "choices": choices}),
    )
    .into_response()
}
