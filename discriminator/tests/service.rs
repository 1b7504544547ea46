//! The discriminator as a real gRPC server on an ephemeral loopback port: Score, Train, Info,
//! health, reflection, validation, frozen mode, idempotence, shutdown checkpoints and resume,
//! and the LLM judge behind an OpenAI-compatible stand-in.

mod common;

use std::path::Path;
use std::time::Duration;

use candle_core::Device;
use common::*;
use ril_discriminator::checkpoint::latest_checkpoint;
use ril_discriminator::judge::JudgeConfig;
use ril_discriminator::{DiscriminatorOptions, JudgeBackend, serve};
use ril_proto::client::Channel;
use ril_proto::client::health_check;
use ril_proto::convert::row_to_question;
use ril_proto::server::{ServingStatus, names};
use ril_proto::v1;
use ril_proto::v1::discriminator_client::DiscriminatorClient;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::Code;

const STARTUP: Duration = Duration::from_secs(120);

struct Running {
    addr: String,
    stop: Option<oneshot::Sender<()>>,
    handle: JoinHandle<ril_discriminator::Result<()>>,
}

impl Running {
    /// Starts the server and returns at once (health may still be NOT_SERVING).
    async fn spawn(options: DiscriminatorOptions) -> Self {
        let bound = ril_proto::server::bind("127.0.0.1:0").await.unwrap();
        let addr = bound.addr.to_string();
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(serve(options, Device::Cpu, bound, async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            stop: Some(stop),
            handle,
        }
    }

    /// Starts the server and waits until it reports SERVING.
    async fn start(options: DiscriminatorOptions) -> Self {
        let running = Self::spawn(options).await;
        running.wait_serving().await;
        running
    }

    async fn status(&self, service: &str) -> Option<ServingStatus> {
        health_check(
            &self.addr,
            service,
            Duration::from_secs(5),
            &Default::default(),
        )
        .await
        .ok()
    }

    async fn wait_serving(&self) {
        wait_until("SERVING", STARTUP, || async {
            self.status(names::DISCRIMINATOR).await == Some(ServingStatus::Serving)
        })
        .await;
        assert_eq!(self.status("").await, Some(ServingStatus::Serving));
    }

    async fn client(&self) -> DiscriminatorClient<Channel> {
        ril_proto::client::discriminator(
            ril_proto::client::connect(&self.addr, Duration::from_secs(5), &Default::default())
                .await
                .unwrap(),
        )
    }

    /// Triggers graceful shutdown and returns what `serve` returned.
    async fn stop(mut self) -> ril_discriminator::Result<()> {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(STARTUP, self.handle)
            .await
            .expect("the server stops")
            .unwrap()
    }
}

fn question(colour: &str, rgb: [u8; 3]) -> v1::Question {
    row_to_question(&colour_row(colour, rgb))
}

fn score_request(colour: &str, rgb: [u8; 3], responses: &[String]) -> v1::ScoreRequest {
    v1::ScoreRequest {
        question: Some(question(colour, rgb)),
        responses: responses.to_vec(),
    }
}

/// One student and one teacher answer per colour, for iteration `iteration`.
fn train_request(colours: &[(&str, [u8; 3])], iteration: u64) -> v1::TrainRequest {
    let items = colours
        .iter()
        .flat_map(|(c, rgb)| {
            let q = question(c, *rgb);
            [
                v1::LabelledResponse {
                    question: Some(q.clone()),
                    response: student_answer(c),
                    from_student: true,
                },
                v1::LabelledResponse {
                    question: Some(q),
                    response: teacher_answer(c),
                    from_student: false,
                },
            ]
        })
        .collect();
    v1::TrainRequest { items, iteration }
}

async fn d_probs(client: &mut DiscriminatorClient<Channel>) -> Vec<f32> {
    let responses = [student_answer("red"), teacher_answer("red")];
    client
        .score(score_request("red", COLOURS[0].1, &responses))
        .await
        .unwrap()
        .into_inner()
        .scores
        .iter()
        .map(|s| s.d_prob)
        .collect()
}

async fn step(client: &mut DiscriminatorClient<Channel>) -> u64 {
    client
        .info(v1::DiscriminatorInfoRequest {})
        .await
        .unwrap()
        .into_inner()
        .step
}

fn options(student: &Path) -> DiscriminatorOptions {
    DiscriminatorOptions {
        max_responses: 4,
        ..DiscriminatorOptions::for_test(student)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn score_returns_the_d_probability_and_the_rule_judges_answer_score() {
    let tmp = tempfile::tempdir().unwrap();
    let student = tiny_student(&tmp.path().join("student"), 11);
    let server = Running::start(options(&student)).await;
    let mut client = server.client().await;

    let responses = vec![
        "The object is red. Answer: red".to_string(),
        "Answer: blue".to_string(),
    ];
    let reply = client
        .score(score_request("red", COLOURS[0].1, &responses))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.discriminator_step, 0);
    assert_eq!(reply.scores.len(), 2);
    assert_eq!(reply.scores[0].answer_score, 1.0);
    assert_eq!(reply.scores[1].answer_score, 0.0);
    assert_eq!(reply.scores[0].extracted_answer, "red");
    assert_eq!(reply.scores[1].extracted_answer, "blue");
    for s in &reply.scores {
        assert_eq!(s.judge, "rule");
        assert!(s.d_prob > 0.0 && s.d_prob < 1.0, "{}", s.d_prob);
    }
    // Scoring is deterministic and per response: the same response scores the same alone.
    let alone = client
        .score(score_request("red", COLOURS[0].1, &responses[1..]))
        .await
        .unwrap()
        .into_inner();
    assert!((alone.scores[0].d_prob - reply.scores[1].d_prob).abs() < 1e-5);

    let info = client
        .info(v1::DiscriminatorInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (info.step, info.judge.as_str(), info.frozen),
        (0, "rule", false)
    );

    // Reflection lists what D serves, and no other role's service.
    let listed =
        ril_proto::client::list_services(&server.addr, Duration::from_secs(5), &Default::default())
            .await
            .unwrap();
    assert_eq!(listed, names::listed(&[names::DISCRIMINATOR]));
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn train_separates_the_styles_and_is_idempotent_per_iteration() {
    let tmp = tempfile::tempdir().unwrap();
    let student = tiny_student(&tmp.path().join("student"), 12);
    let server = Running::start(options(&student)).await;
    let mut client = server.client().await;
    let colours = &COLOURS[..4];

    let mut replies = Vec::new();
    for iteration in 0..20 {
        let reply = client
            .train(train_request(colours, iteration))
            .await
            .unwrap()
            .into_inner();
        assert!(!reply.skipped);
        assert_eq!(reply.step, iteration + 1);
        replies.push(reply);
    }
    let first = replies[0].loss;
    let last = replies.last().unwrap();
    assert!(
        last.loss < 0.5 * first && last.accuracy == 1.0,
        "losses {:?}, accuracies {:?}",
        replies.iter().map(|r| r.loss).collect::<Vec<_>>(),
        replies.iter().map(|r| r.accuracy).collect::<Vec<_>>()
    );
    let probs = d_probs(&mut client).await;
    assert!(probs[0] > 0.5 && probs[1] < 0.5, "{probs:?}");

    // A retried iteration (or an older one) is a no-op.
    for iteration in [19, 4] {
        let again = client
            .train(train_request(colours, iteration))
            .await
            .unwrap()
            .into_inner();
        assert!(again.skipped && again.step == 20, "{again:?}");
    }
    assert_eq!(d_probs(&mut client).await, probs);
    assert_eq!(step(&mut client).await, 20);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_discriminator_never_changes() {
    let tmp = tempfile::tempdir().unwrap();
    let student = tiny_student(&tmp.path().join("student"), 13);
    let root = tmp.path().join("d");
    let opts = DiscriminatorOptions {
        frozen: true,
        checkpoint_dir: Some(root.clone()),
        ..options(&student)
    };
    let server = Running::start(opts).await;
    let mut client = server.client().await;
    let before = d_probs(&mut client).await;
    for iteration in 0..3 {
        let reply = client
            .train(train_request(&COLOURS[..2], iteration))
            .await
            .unwrap()
            .into_inner();
        assert!(reply.skipped && reply.step == 0, "{reply:?}");
    }
    assert_eq!(d_probs(&mut client).await, before);
    let info = client
        .info(v1::DiscriminatorInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(info.frozen && info.step == 0);
    server.stop().await.unwrap();
    assert!(
        latest_checkpoint(&root).unwrap().is_none(),
        "a frozen D writes no checkpoint"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_invalid_argument_naming_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    let student = tiny_student(&tmp.path().join("student"), 14);
    let opts = DiscriminatorOptions {
        include_image: true,
        ..options(&student)
    };
    let server = Running::start(opts).await;
    let mut client = server.client().await;
    let red = COLOURS[0].1;
    let one = vec!["Answer: red".to_string()];

    let mut no_turns = question("red", red);
    no_turns.messages.clear();
    let mut broken_image = question("red", red);
    broken_image.images[0].data = bytes_of(b"not a png");
    let score_cases = [
        (
            v1::ScoreRequest {
                question: None,
                responses: one.clone(),
            },
            "question",
        ),
        (score_request("red", red, &[]), "responses"),
        (
            score_request(
                "red",
                red,
                &std::iter::repeat_n(one[0].clone(), 5).collect::<Vec<_>>(),
            ),
            "responses",
        ),
        (
            v1::ScoreRequest {
                question: Some(no_turns),
                responses: one.clone(),
            },
            "question.messages",
        ),
        (
            v1::ScoreRequest {
                question: Some(broken_image.clone()),
                responses: one.clone(),
            },
            "colour-red",
        ),
    ];
    for (request, field) in score_cases {
        let status = client.score(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().contains(field),
            "{field}: {}",
            status.message()
        );
    }

    let mut missing_question = train_request(&COLOURS[..1], 0);
    missing_question.items[1].question = None;
    let mut bad_image = train_request(&COLOURS[..1], 0);
    bad_image.items[0].question = Some(broken_image);
    let train_cases = [
        (
            v1::TrainRequest {
                items: vec![],
                iteration: 0,
            },
            "items",
        ),
        (missing_question, "items[1].question"),
        (bad_image, "colour-red"),
    ];
    for (request, field) in train_cases {
        let status = client.train(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().contains(field),
            "{field}: {}",
            status.message()
        );
    }
    // Nothing was trained by the refused calls, and the server still works.
    assert_eq!(step(&mut client).await, 0);
    let ok = client
        .train(train_request(&COLOURS[..1], 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.step, 1);
    server.stop().await.unwrap();
}

fn bytes_of(data: &'static [u8]) -> tonic::codegen::Bytes {
    tonic::codegen::Bytes::from_static(data)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_saves_d_and_a_restart_resumes_it() {
    let tmp = tempfile::tempdir().unwrap();
    let student = tiny_student(&tmp.path().join("student"), 15);
    let root = tmp.path().join("d");
    let opts = DiscriminatorOptions {
        checkpoint_dir: Some(root.clone()),
        save_every: 2,
        ..options(&student)
    };
    let server = Running::start(opts.clone()).await;
    let mut client = server.client().await;
    for iteration in 0..3 {
        client
            .train(train_request(&COLOURS[..2], iteration))
            .await
            .unwrap();
    }
    // The periodic save at step 2 happened during training.
    assert!(root.join("step-00000002").is_dir());
    let probs = d_probs(&mut client).await;
    server.stop().await.unwrap();
    assert_eq!(
        latest_checkpoint(&root).unwrap().unwrap(),
        root.join("step-00000003"),
        "shutdown saved the last step"
    );

    let server = Running::start(opts).await;
    let mut client = server.client().await;
    assert_eq!(step(&mut client).await, 3);
    assert_eq!(d_probs(&mut client).await, probs);
    let repeat = client
        .train(train_request(&COLOURS[..2], 2))
        .await
        .unwrap()
        .into_inner();
    assert!(repeat.skipped, "iteration 2 was trained before the restart");
    let next = client
        .train(train_request(&COLOURS[..2], 3))
        .await
        .unwrap()
        .into_inner();
    assert!(!next.skipped && next.step == 4, "{next:?}");
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_model_is_an_error_from_serve() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Running::spawn(options(&tmp.path().join("no-such-model"))).await;
    let result = tokio::time::timeout(STARTUP, server.handle)
        .await
        .unwrap()
        .unwrap();
    let err = result.unwrap_err().to_string();
    assert!(err.contains("no-such-model"), "{err}");
}

/// An OpenAI-compatible judge that says 1 when the generated answer contains the reference.
fn judge_router() -> axum::Router {
    use axum::Json;
    use axum::routing::post;
    use serde_json::{Value, json};
    async fn complete(Json(body): Json<Value>) -> Json<Value> {
        let prompt = body["messages"][0]["content"].as_str().unwrap_or_default();
        let between = |start: &str, end: &str| {
            prompt
                .split_once(start)
                .and_then(|(_, rest)| rest.split_once(end))
                .map(|(inside, _)| inside.trim().to_string())
                .unwrap_or_default()
        };
        let reference = between("Reference answer:", "Generated answer:");
        let response = between("Generated answer:", "Output 1 if");
        let score = u8::from(!reference.is_empty() && response.contains(&reference));
        Json(json!({
            "choices": [{
                "message": {"role": "assistant", "content": format!("Checked. <answer>{score}</answer>")},
                "finish_reason": "stop"
            }]
        }))
    }
    axum::Router::new().route("/v1/chat/completions", post(complete))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_waits_for_the_llm_judge_which_then_scores_answers() {
    let tmp = tempfile::tempdir().unwrap();
    let student = tiny_student(&tmp.path().join("student"), 16);
    // The judge's port is bound but not served yet: the probe's request waits in its backlog.
    let judge_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let judge_url = format!("http://{}/v1", judge_listener.local_addr().unwrap());
    let opts = DiscriminatorOptions {
        judge: JudgeBackend::Llm(JudgeConfig {
            timeout: Duration::from_secs(60),
            ..JudgeConfig::for_test(judge_url)
        }),
        ..options(&student)
    };
    let server = Running::spawn(opts).await;
    wait_until("the health service", STARTUP, || async {
        server.status(names::DISCRIMINATOR).await.is_some()
    })
    .await;
    assert_eq!(
        server.status(names::DISCRIMINATOR).await,
        Some(ServingStatus::NotServing)
    );
    assert_eq!(server.status("").await, Some(ServingStatus::NotServing));
    let mut client = server.client().await;
    let early = client
        .score(score_request("red", COLOURS[0].1, &["Answer: red".into()]))
        .await
        .unwrap_err();
    assert_eq!(early.code(), Code::Unavailable, "{early:?}");

    let judge = tokio::spawn(async move {
        axum::serve(judge_listener, judge_router()).await.unwrap();
    });
    server.wait_serving().await;
    let reply = client
        .score(score_request(
            "red",
            COLOURS[0].1,
            &[
                "It looks red to me. Answer: red".into(),
                "Answer: blue".into(),
            ],
        ))
        .await
        .unwrap()
        .into_inner();
    let answer_scores: Vec<f32> = reply.scores.iter().map(|s| s.answer_score).collect();
    assert_eq!(answer_scores, [1.0, 0.0]);
    assert_eq!(reply.scores[0].judge, "llm:test-judge");
    assert_eq!(reply.scores[1].extracted_answer, "blue");
    server.stop().await.unwrap();
    judge.abort();
}
