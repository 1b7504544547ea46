//! The gRPC surface: health NOT_SERVING until the backend is loaded, then SERVING; requests
//! meanwhile are UNAVAILABLE; malformed requests are INVALID_ARGUMENT naming the field.

mod common;

use std::sync::Arc;

use common::{Server, ask, request, row, sampling, texts};
use ril_proto::v1;
use ril_teacher::{BackendOptions, ReplayOptions, Teacher, TeacherOptions};
use serde_json::json;
use tokio::sync::oneshot;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

fn replay_options(dir: &std::path::Path) -> TeacherOptions {
    let answers = dir.join("answers.jsonl");
    std::fs::write(
        &answers,
        json!({"id": "q1", "teacher": "big", "answers": ["red", "It is red."]}).to_string(),
    )
    .unwrap();
    TeacherOptions::new(
        "big",
        BackendOptions::Replay(ReplayOptions {
            dataset: None,
            answers: Some(answers),
            teacher: None,
            cycle: false,
        }),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_not_serving_until_the_backend_is_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let options = replay_options(dir.path());
    let (release, gate) = oneshot::channel::<()>();
    let server = Server::start_loading("big", async move {
        let _ = gate.await;
        Teacher::load(options).await.map(Arc::new)
    })
    .await;
    assert_eq!(
        server.health("ril.v1.Teacher").await,
        ServingStatus::NotServing
    );
    assert_eq!(server.health("").await, ServingStatus::NotServing);
    let mut client = server.client().await;
    let q1 = row("q1", "What colour?", vec![]);
    let e = ask(&mut client, request(&q1, 1, None)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("loading"), "{}", e.message());
    let e = client.info(v1::TeacherInfoRequest {}).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);

    release.send(()).unwrap();
    server.wait_for_health(ServingStatus::Serving).await;
    assert_eq!(server.health("").await, ServingStatus::Serving);
    let got = ask(&mut client, request(&q1, 2, None)).await.unwrap();
    assert_eq!(texts(&got), ["red", "It is red."]);
    // Reflection lists what a teacher serves, and no other role's service.
    let timeout = std::time::Duration::from_secs(5);
    let listed = ril_proto::client::list_services(&server.addr, timeout, &Default::default())
        .await
        .unwrap();
    let teacher = ril_proto::server::names::TEACHER;
    assert_eq!(listed, ril_proto::server::names::listed(&[teacher]));
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_invalid_arguments_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::ready(replay_options(dir.path())).await;
    let mut client = server.client().await;
    let q1 = row("q1", "What colour?", vec![]);

    let mut cases: Vec<(v1::AnswerRequest, &str)> = Vec::new();
    let mut no_question = request(&q1, 1, None);
    no_question.question = None;
    cases.push((no_question, "`question`"));
    cases.push((request(&q1, 0, None), "`n`"));
    cases.push((request(&q1, 65, None), "max_n of 64"));
    let mut bad_parts = request(&q1, 1, None);
    bad_parts.question.as_mut().unwrap().messages[0].parts_json = "{\"not\": \"a list\"}".into();
    cases.push((bad_parts, "`question.messages.parts_json`"));
    let mut no_id = request(&q1, 1, None);
    no_id.question.as_mut().unwrap().id.clear();
    cases.push((no_id, "`question.id`"));
    let mut no_turns = request(&q1, 1, None);
    no_turns.question.as_mut().unwrap().messages.clear();
    cases.push((no_turns, "`question.messages`"));
    let mut bad_type = request(&q1, 1, None);
    bad_type.question.as_mut().unwrap().answer_type = "fuzzy".into();
    cases.push((bad_type, "`question.answer_type`"));
    let mut empty_image = request(&q1, 1, None);
    empty_image
        .question
        .as_mut()
        .unwrap()
        .images
        .push(v1::Image {
            name: "blank.png".into(),
            data: Default::default(),
        });
    cases.push((empty_image, "`question.images`"));
    cases.push((
        request(
            &q1,
            1,
            Some(v1::SamplingSettings {
                top_p: 0.0,
                ..sampling(1)
            }),
        ),
        "`sampling.top_p`",
    ));
    cases.push((
        request(
            &q1,
            1,
            Some(v1::SamplingSettings {
                max_new_tokens: 0,
                ..sampling(1)
            }),
        ),
        "`sampling.max_new_tokens`",
    ));
    for (req, field) in cases {
        let e = ask(&mut client, req).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{field}: {e:?}");
        assert!(e.message().contains(field), "{field}: {}", e.message());
    }
    // Nothing was generated or cached for them.
    let i = common::info(&mut client).await;
    assert_eq!((i.generated, i.cache_entries), (0, 0));
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_health_watcher_does_not_hold_shutdown_past_the_grace() {
    let dir = tempfile::tempdir().unwrap();
    let mut options = replay_options(dir.path());
    options.shutdown_grace = std::time::Duration::from_millis(200);
    let server = Server::ready(options).await;
    // A `Watch` stream never ends on its own; graceful shutdown alone would wait for it forever.
    // `stop` fails the test if `serve` has not returned within `common::WAIT`.
    let _watching = server.health_stream().await;
    server.stop().await.unwrap();
}
