//! The judge client against a real HTTP server on a loopback port that speaks the OpenAI
//! chat-completions wire format and misbehaves as each test scripts it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use ril_discriminator::judge::{
    JUDGE_PROMPT_TEMPLATE, JudgeClient, JudgeConfig, JudgeError, JudgeScore, render_judge_prompt,
};
use ril_openai::OpenAiError;
use serde_json::{Value, json};
use tokio::sync::watch;

/// What the server answers once the request got past auth and the scripted failures.
#[derive(Clone)]
enum Reply {
    /// `<answer>1</answer>` when the response contains the reference, else `<answer>0</answer>`.
    Judge,
    /// A well-formed chat completion whose message is this text.
    Content(&'static str),
    /// Anything at all, with this status and content type.
    Raw {
        status: StatusCode,
        content_type: &'static str,
        body: String,
    },
    /// Never answers.
    Hang,
}

#[derive(Clone)]
struct Script {
    reply: Reply,
    /// Required `Authorization: Bearer` key; 401 without it.
    api_key: Option<&'static str>,
    /// The first `fail_first` requests get `fail_status` (with `Retry-After: 0`).
    fail_first: usize,
    fail_status: StatusCode,
    /// The first `limit` requests are held until `limit` are in flight at once, then for
    /// [`OBSERVATION_WINDOW`] or until one more arrives: a client honouring the limit is seen
    /// using all of it, and one ignoring it is seen exceeding it.
    observe_concurrency_limit: Option<usize>,
    /// The first request waits (bounded) until this many others have completed, so that
    /// replies arrive out of order.
    first_waits_for_completed: usize,
}

impl Script {
    fn new(reply: Reply) -> Self {
        Self {
            reply,
            api_key: None,
            fail_first: 0,
            fail_status: StatusCode::SERVICE_UNAVAILABLE,
            observe_concurrency_limit: None,
            first_waits_for_completed: 0,
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Counters {
    requests: usize,
    in_flight: usize,
    max_in_flight: usize,
    completed: usize,
}

struct ServerState {
    script: Script,
    counters: watch::Sender<Counters>,
    bodies: Mutex<Vec<Value>>,
}

struct TestServer {
    base_url: String,
    state: Arc<ServerState>,
}

impl TestServer {
    async fn start(script: Script) -> Self {
        let state = Arc::new(ServerState {
            script,
            counters: watch::Sender::new(Counters::default()),
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

    fn config(&self) -> JudgeConfig {
        JudgeConfig::for_test(&self.base_url)
    }

    fn endpoint(&self) -> String {
        format!("{}/chat/completions", self.base_url)
    }

    fn counters(&self) -> Counters {
        *self.state.counters.borrow()
    }

    fn bodies(&self) -> Vec<Value> {
        self.state.bodies.lock().unwrap().clone()
    }
}

/// How long the server watches for a request beyond the concurrency limit. Seeing that nothing
/// happens needs some time; a client ignoring the limit sends its next requests within
/// milliseconds, since nothing it waits for is answered.
const OBSERVATION_WINDOW: Duration = Duration::from_millis(300);

/// Bounded waits inside the server: long enough never to expire on a loaded machine when the
/// client behaves, short enough that a misbehaving client fails the test instead of hanging it.
const SERVER_WAIT_LIMIT: Duration = Duration::from_secs(3);

async fn chat_completions(
    State(state): State<Arc<ServerState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let script = &state.script;
    let mut index = 0;
    state.counters.send_modify(|c| {
        index = c.requests;
        c.requests += 1;
    });
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    state.bodies.lock().unwrap().push(request.clone());

    if let Some(key) = script.api_key {
        let sent = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if sent != Some(&format!("Bearer {key}")) {
            let error =
                json!({"error": {"message": "Invalid API key", "type": "invalid_request_error"}});
            return (StatusCode::UNAUTHORIZED, axum::Json(error)).into_response();
        }
    }
    if index < script.fail_first {
        return (
            script.fail_status,
            [(header::RETRY_AFTER, "0")],
            "scripted failure",
        )
            .into_response();
    }

    state.counters.send_modify(|c| {
        c.in_flight += 1;
        c.max_in_flight = c.max_in_flight.max(c.in_flight);
    });
    let mut counters = state.counters.subscribe();
    if let Some(limit) = script.observe_concurrency_limit
        && index < limit
    {
        let _ = tokio::time::timeout(
            SERVER_WAIT_LIMIT,
            counters.wait_for(|c| c.max_in_flight >= limit),
        )
        .await;
        let _ = tokio::time::timeout(
            OBSERVATION_WINDOW,
            counters.wait_for(|c| c.max_in_flight > limit),
        )
        .await;
    }
    if index == 0 {
        let others = script.first_waits_for_completed;
        let _ = tokio::time::timeout(
            SERVER_WAIT_LIMIT,
            counters.wait_for(|c| c.completed >= others),
        )
        .await;
    }
    let response = match &script.reply {
        Reply::Judge => {
            let prompt = request["messages"][0]["content"].as_str().unwrap_or("");
            let (question, reference, response) = prompt_parts(prompt);
            let score = u8::from(response.contains(reference));
            completion(&format!(
                "The question was {question:?}. Judged by containment.\n<answer>{score}</answer>"
            ))
        }
        Reply::Content(content) => completion(content),
        Reply::Raw {
            status,
            content_type,
            body,
        } => (
            *status,
            [(header::CONTENT_TYPE, *content_type)],
            body.clone(),
        )
            .into_response(),
        Reply::Hang => std::future::pending().await,
    };
    state.counters.send_modify(|c| {
        c.in_flight -= 1;
        c.completed += 1;
    });
    response
}

fn completion(content: &str) -> Response {
    axum::Json(json!({
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 0,
        "model": "test-judge",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content},
            "finish_reason": "stop",
        }],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }))
    .into_response()
}

/// Splits a rendered prompt back into (question, reference, response) with the template's own
/// literal text, so the server follows whatever wording the template has.
fn prompt_parts(prompt: &str) -> (&str, &str, &str) {
    let (before_question, rest) = JUDGE_PROMPT_TEMPLATE.split_once("{question}").unwrap();
    let (between_q_r, rest) = rest.split_once("{reference}").unwrap();
    let (between_r_s, after_response) = rest.split_once("{response}").unwrap();
    let prompt = prompt.strip_prefix(before_question).unwrap();
    let prompt = prompt.strip_suffix(after_response).unwrap();
    let (question, rest) = prompt.split_once(between_q_r).unwrap();
    let (reference, response) = rest.split_once(between_r_s).unwrap();
    (question, reference, response)
}

fn client(config: JudgeConfig) -> JudgeClient {
    JudgeClient::new(config).unwrap()
}

#[tokio::test]
async fn scores_one_when_the_response_captures_the_reference_and_zero_otherwise() {
    let server = TestServer::start(Script::new(Reply::Judge)).await;
    let mut config = server.config();
    config.model = "qwen2.5-32b-judge".to_owned();
    config.max_tokens = 77;
    let judge = client(config);

    let correct = judge
        .judge("What colour is the sky?", "blue", "The sky is blue.")
        .await
        .unwrap();
    assert_eq!(correct.score, 1);
    assert!(
        correct.explanation.contains("What colour is the sky?"),
        "{correct:?}"
    );
    assert!(correct.raw.ends_with("<answer>1</answer>"), "{correct:?}");
    let wrong = judge
        .judge("What colour is the sky?", "blue", "Green, obviously.")
        .await
        .unwrap();
    assert_eq!(wrong.score, 0);

    let bodies = server.bodies();
    assert_eq!(bodies.len(), 2);
    let body = &bodies[0];
    assert_eq!(body["model"], "qwen2.5-32b-judge");
    assert_eq!(body["n"], 1);
    assert_eq!(body["temperature"], 0.0);
    assert_eq!(body["max_tokens"], 77);
    let messages = body["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0]["role"], "user");
    let content = messages[0]["content"].as_str().unwrap();
    assert_eq!(
        content,
        render_judge_prompt("What colour is the sky?", "blue", "The sky is blue.")
    );
    assert!(content.contains("fully and correctly captures the core point"));
    assert!(content.contains("<answer></answer>"));
}

#[test]
fn the_prompt_is_filled_in_one_pass() {
    let prompt = render_judge_prompt("q {reference}", "r {response}", "s {question}");
    assert!(prompt.contains("q {reference}"));
    assert!(prompt.contains("r {response}"));
    assert!(prompt.contains("s {question}"));
    assert_eq!(
        prompt_parts(&prompt),
        ("q {reference}", "r {response}", "s {question}")
    );
}

#[tokio::test]
async fn reads_the_last_answer_tag_whatever_its_case_and_spacing() {
    let cases: [(&'static str, u8, &str); 5] = [
        ("Matches.\n<answer>1</answer>", 1, "Matches."),
        (
            "Misses the point. <ANSWER> 0 </Answer>",
            0,
            "Misses the point.",
        ),
        (
            "I must put the score in <answer></answer>. It matches.\n<answer>\n1\n</answer>\n",
            1,
            "I must put the score in <answer></answer>. It matches.",
        ),
        (
            "First <answer>1</answer>, on reflection <answer>0</answer>",
            0,
            "First <answer>1</answer>, on reflection",
        ),
        ("<answer>1</answer>", 1, ""),
    ];
    for (content, score, explanation) in cases {
        let server = TestServer::start(Script::new(Reply::Content(content))).await;
        let verdict = client(server.config()).judge("q", "r", "s").await.unwrap();
        assert_eq!(
            verdict,
            JudgeScore {
                score,
                explanation: explanation.to_owned(),
                raw: content.to_owned(),
            },
            "for {content:?}"
        );
    }
}

#[tokio::test]
async fn sends_the_bearer_key_and_fails_clearly_without_retrying_when_refused() {
    let mut script = Script::new(Reply::Judge);
    script.api_key = Some("sk-test-secret-123");
    let server = TestServer::start(script).await;

    let mut config = server.config();
    config.api_key = Some("sk-test-secret-123".to_owned());
    let verdict = client(config).judge("q", "a", "a").await.unwrap();
    assert_eq!(verdict.score, 1);
    assert_eq!(server.counters().requests, 1);

    for api_key in [None, Some("sk-wrong-key-456".to_owned())] {
        let before = server.counters().requests;
        let mut config = server.config();
        config.api_key = api_key.clone();
        config.max_retries = 3;
        let error = client(config).judge("q", "a", "a").await.unwrap_err();
        match &error {
            JudgeError::Client(OpenAiError::Http {
                endpoint, status, ..
            }) => {
                assert_eq!(endpoint, &server.endpoint());
                assert_eq!(status.as_u16(), 401);
            }
            other => panic!("expected an HTTP 401 error, got {other:?}"),
        }
        let message = error.to_string();
        assert!(
            message.starts_with(&format!(
                "judge {} answered 401 Unauthorized: ",
                server.endpoint()
            )),
            "{message}"
        );
        assert!(message.contains("Invalid API key"), "{message}");
        if let Some(key) = api_key {
            assert!(!message.contains(&key), "{message}");
            assert!(!format!("{error:?}").contains(&key));
        }
        assert_eq!(
            server.counters().requests,
            before + 1,
            "a 401 is not retried"
        );
    }
}

#[tokio::test]
async fn retries_transient_failures_then_succeeds() {
    for fail_status in [
        StatusCode::SERVICE_UNAVAILABLE,
        StatusCode::TOO_MANY_REQUESTS,
    ] {
        let mut script = Script::new(Reply::Judge);
        script.fail_first = 2;
        script.fail_status = fail_status;
        let server = TestServer::start(script).await;
        let mut config = server.config();
        config.max_retries = 3;
        // Retry-After: 0 from the server must win over this long backoff.
        config.initial_backoff = Duration::from_secs(20);
        let started = Instant::now();
        let verdict = client(config).judge("q", "ref", "has ref").await.unwrap();
        assert_eq!(verdict.score, 1);
        assert_eq!(server.counters().requests, 3, "{fail_status}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "Retry-After was not honoured"
        );
    }
}

#[tokio::test]
async fn gives_up_after_max_retries_on_persistent_server_errors() {
    let mut script = Script::new(Reply::Judge);
    script.fail_first = usize::MAX;
    let server = TestServer::start(script).await;
    let mut config = server.config();
    config.max_retries = 2;
    let error = client(config).judge("q", "r", "r").await.unwrap_err();
    match &error {
        JudgeError::Client(OpenAiError::Unreachable {
            endpoint,
            attempts,
            last_error,
        }) => {
            assert_eq!(endpoint, &server.endpoint());
            assert_eq!(*attempts, 3);
            assert!(
                matches!(**last_error, OpenAiError::Http { status, .. } if status == 503),
                "{last_error:?}"
            );
        }
        other => panic!("expected Unreachable, got {other:?}"),
    }
    assert!(
        error.to_string().contains("503 Service Unavailable"),
        "{error}"
    );
    assert_eq!(server.counters().requests, 3);
}

#[tokio::test]
async fn a_judge_slower_than_the_timeout_is_unreachable_after_every_attempt() {
    let server = TestServer::start(Script::new(Reply::Hang)).await;
    let mut config = server.config();
    config.timeout = Duration::from_millis(300);
    config.max_retries = 2;
    let started = Instant::now();
    let error = client(config).judge("q", "r", "r").await.unwrap_err();
    let elapsed = started.elapsed();
    match &error {
        JudgeError::Client(OpenAiError::Unreachable {
            endpoint,
            attempts,
            last_error,
        }) => {
            assert_eq!(endpoint, &server.endpoint());
            assert_eq!(*attempts, 3);
            assert!(
                matches!(&**last_error, OpenAiError::Transport { error, .. } if error.is_timeout()),
                "{last_error:?}"
            );
        }
        other => panic!("expected Unreachable, got {other:?}"),
    }
    assert!(error.to_string().contains("timed out"), "{error}");
    assert_eq!(server.counters().requests, 3);
    assert!(elapsed >= Duration::from_millis(900), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(4), "{elapsed:?}");
}

#[tokio::test]
async fn a_reply_without_a_score_is_an_error_naming_the_endpoint_after_one_retry() {
    let html = format!(
        "<!DOCTYPE html>\n<html><head><title>502 Bad Gateway</title></head>\n\
         <body>{}</body></html>",
        "nginx ".repeat(100)
    );
    let raw_200 = |content_type, body: String| Reply::Raw {
        status: StatusCode::OK,
        content_type,
        body,
    };
    let cases = [
        (raw_200("text/html", html), "not a chat completion"),
        (
            raw_200("text/plain", "garbage \u{1F4A5}".repeat(50)),
            "not a chat completion",
        ),
        (
            raw_200(
                "application/json",
                r#"{"id": "x", "object": "chat.completion"}"#.to_owned(),
            ),
            "not a chat completion",
        ),
        (
            raw_200("application/json", r#"{"choices": []}"#.to_owned()),
            "no choices",
        ),
        (
            Reply::Content("It is right, I think."),
            "no <answer>0|1</answer>",
        ),
        (
            Reply::Content("Hard to say. <answer>maybe</answer>"),
            "no <answer>0|1</answer>",
        ),
        (
            Reply::Content("<answer>1</answer> on second thought <answer>2</answer>"),
            "no <answer>0|1</answer>",
        ),
    ];
    for (reply, expected_reason) in cases {
        let server = TestServer::start(Script::new(reply)).await;
        let mut config = server.config();
        config.max_retries = 3;
        let error = client(config).judge("q", "r", "r").await.unwrap_err();
        match &error {
            JudgeError::Client(OpenAiError::Unparseable { endpoint, detail }) => {
                assert_eq!(endpoint, &server.endpoint());
                assert!(detail.contains(expected_reason), "{detail}");
                assert!(
                    detail.chars().count() <= 200,
                    "{} chars: {detail}",
                    detail.chars().count()
                );
                assert!(!detail.contains('\n'), "{detail:?}");
            }
            other => panic!("expected Unparseable, got {other:?}"),
        }
        assert!(error.to_string().contains(&server.endpoint()), "{error}");
        assert_eq!(
            server.counters().requests,
            2,
            "retried exactly once: {error}"
        );
    }
}

#[tokio::test]
async fn judge_many_respects_the_concurrency_limit_and_keeps_the_order() {
    let limit = 3;
    let mut script = Script::new(Reply::Judge);
    script.observe_concurrency_limit = Some(limit);
    script.first_waits_for_completed = 2;
    let server = TestServer::start(script).await;
    let mut config = server.config();
    config.max_concurrency = limit;
    let judge = client(config);

    let items: Vec<(String, String, String)> = (0..10)
        .map(|i| {
            let reference = format!("answer-{i}");
            let response = if i % 3 == 0 {
                format!("I say {reference}.")
            } else {
                "I do not know.".to_owned()
            };
            (format!("question-{i}"), reference, response)
        })
        .collect();
    let results = judge.judge_many(&items).await;

    assert_eq!(results.len(), items.len());
    for (i, result) in results.iter().enumerate() {
        let verdict = result.as_ref().unwrap();
        assert_eq!(verdict.score, u8::from(i % 3 == 0), "item {i}");
        assert!(
            verdict.explanation.contains(&format!("\"question-{i}\"")),
            "item {i}: {verdict:?}"
        );
    }
    let counters = server.counters();
    assert_eq!(counters.requests, 10);
    assert_eq!(counters.max_in_flight, limit, "{counters:?}");

    let empty: [(&str, &str, &str); 0] = [];
    assert!(judge.judge_many(&empty).await.is_empty());
}

#[tokio::test]
async fn a_closed_port_is_unreachable_and_the_error_names_the_url() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let mut config = JudgeConfig::for_test(format!("http://127.0.0.1:{port}/v1/"));
    config.max_retries = 1;
    let judge = client(config);
    let url = format!("http://127.0.0.1:{port}/v1/chat/completions");
    assert_eq!(judge.endpoint(), url);
    let error = judge.judge("q", "r", "r").await.unwrap_err();
    match &error {
        JudgeError::Client(OpenAiError::Unreachable {
            endpoint,
            attempts,
            last_error,
        }) => {
            assert_eq!(endpoint, &url);
            assert_eq!(*attempts, 2);
            assert!(
                matches!(&**last_error, OpenAiError::Transport { error, .. } if error.is_connect()),
                "{last_error:?}"
            );
        }
        other => panic!("expected Unreachable, got {other:?}"),
    }
    let message = error.to_string();
    assert!(message.contains(&url), "{message}");
    assert!(message.to_lowercase().contains("refused"), "{message}");
}

#[test]
fn the_api_key_never_shows_in_debug_or_serialised_config() {
    let mut config = JudgeConfig::new("http://127.0.0.1:8000/v1", "judge");
    config.api_key = Some("sk-very-secret-0xC0FFEE".to_owned());
    let debug = format!("{config:?}");
    assert!(!debug.contains("sk-very-secret"), "{debug}");
    assert!(debug.contains("redacted"), "{debug}");
    let judge = client(config.clone());
    assert!(!format!("{judge:?}").contains("sk-very-secret"));
    let serialised = serde_json::to_string(&config).unwrap();
    assert!(!serialised.contains("sk-very-secret"), "{serialised}");
}

#[test]
fn config_deserialises_with_defaults_and_refuses_unknown_or_invalid_settings() {
    let config: JudgeConfig = serde_json::from_value(json!({
        "base_url": "http://judge:8000/v1",
        "model": "Qwen/Qwen2.5-32B-Instruct",
        "api_key": "sk-x",
        "timeout": 2.5,
        "initial_backoff": 0,
    }))
    .unwrap();
    assert_eq!(config.timeout, Duration::from_millis(2500));
    assert_eq!(config.initial_backoff, Duration::ZERO);
    assert_eq!(config.temperature, 0.0);
    assert_eq!(config.api_key.as_deref(), Some("sk-x"));
    config.validate().unwrap();
    let mut round_trip = config.clone();
    round_trip.api_key = None;
    let back: JudgeConfig = serde_json::from_value(serde_json::to_value(&config).unwrap()).unwrap();
    assert_eq!(back, round_trip);

    let unknown = serde_json::from_value::<JudgeConfig>(json!({
        "base_url": "http://judge:8000/v1", "model": "m", "temprature": 0.5,
    }))
    .unwrap_err();
    assert!(unknown.to_string().contains("temprature"), "{unknown}");
    let negative = serde_json::from_value::<JudgeConfig>(json!({
        "base_url": "http://judge:8000/v1", "model": "m", "timeout": -1,
    }))
    .unwrap_err();
    assert!(negative.to_string().contains("non-negative"), "{negative}");

    let base = JudgeConfig::new("http://judge:8000/v1", "m");
    type BreakConfig = fn(&mut JudgeConfig);
    let invalid: [(&str, BreakConfig); 9] = [
        ("base_url", |c| c.base_url = "judge:8000".to_owned()),
        ("base_url", |c| c.base_url = "ftp://judge/v1".to_owned()),
        ("base_url", |c| {
            c.base_url = "http://judge:8000/v1/chat/completions".to_owned()
        }),
        ("model", |c| c.model = " ".to_owned()),
        ("api_key", |c| c.api_key = Some("sk-x\n".to_owned())),
        ("timeout", |c| c.timeout = Duration::ZERO),
        ("max_concurrency", |c| c.max_concurrency = 0),
        ("temperature", |c| c.temperature = f64::NAN),
        ("max_tokens", |c| c.max_tokens = 0),
    ];
    for (field, break_it) in invalid {
        let mut config = base.clone();
        break_it(&mut config);
        match config.validate() {
            Err(JudgeError::InvalidConfig {
                field: named,
                reason,
            }) => {
                assert_eq!(named, field, "{reason}");
                assert!(!reason.contains("sk-x"), "{reason}");
            }
            other => panic!("{field}: expected InvalidConfig, got {other:?}"),
        }
        assert!(matches!(
            JudgeClient::new(config),
            Err(JudgeError::InvalidConfig { .. })
        ));
    }
}
