//! The OpenAI-compatible backend against a real HTTP server on a loopback port that speaks
//! `/v1/chat/completions` (see `common::StandIn`), through a real teacher server.

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use base64::Engine as _;
use common::{
    Script, Server, StandIn, WAIT, ask, from_cache, info, request, row, sampling, texts,
    wait_for_status,
};
use ril_teacher::{BackendOptions, OpenAiOptions, Teacher, TeacherOptions};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

fn options(base_url: &str) -> TeacherOptions {
    let mut o = OpenAiOptions::new(base_url, "big-vlm");
    o.timeout = Duration::from_secs(30);
    o.max_retries = 2;
    o.initial_backoff = Duration::from_millis(1);
    TeacherOptions::new("big", BackendOptions::OpenAi(o))
}

fn openai(o: &mut TeacherOptions) -> &mut OpenAiOptions {
    match &mut o.backend {
        BackendOptions::OpenAi(o) => o,
        _ => unreachable!(),
    }
}

fn png() -> Vec<u8> {
    ril_model::toy::square_png(8, 8, [255, 255, 255], Some([220, 30, 30])).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_carry_the_image_as_a_data_url_and_n_and_the_answers_come_back() {
    // Cargo sets CARGO_PKG_NAME for the tests it runs: a variable whose value the stand-in can
    // expect as the key, without the test setting the environment.
    let key = std::env::var("CARGO_PKG_NAME").ok();
    let stand_in = StandIn::start(Script {
        api_key: key.clone(),
        ..Default::default()
    })
    .await;
    let mut o = options(&stand_in.base_url);
    if key.is_some() {
        openai(&mut o).api_key_env = Some("CARGO_PKG_NAME".into());
    }
    let server = Server::ready(o).await;
    let mut client = server.client().await;
    let image = png();
    let q = row("q1", "What colour is the square?", vec![image.clone()]);
    let got = ask(&mut client, request(&q, 3, Some(sampling(7))))
        .await
        .unwrap();
    assert_eq!(
        texts(&got),
        [
            "answer 7 from big-vlm",
            "answer 8 from big-vlm",
            "answer 9 from big-vlm"
        ]
    );
    assert_eq!(from_cache(&got), [false, false, false]);
    assert_eq!(stand_in.requests(), 1, "one call for n = 3");

    let body = &stand_in.bodies()[0];
    assert_eq!(body["model"], "big-vlm");
    assert_eq!(body["n"], 3);
    assert_eq!(body["max_tokens"], 8);
    assert_eq!(body["seed"], 7);
    assert_eq!(body["top_k"], 50);
    assert!((body["temperature"].as_f64().unwrap() - 1.0).abs() < 1e-6);
    assert!((body["top_p"].as_f64().unwrap() - 0.95).abs() < 1e-6);
    assert!((body["repetition_penalty"].as_f64().unwrap() - 1.05).abs() < 1e-6);
    let messages = body["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0]["role"], "user");
    let parts = messages[0]["content"].as_array().unwrap();
    assert_eq!(parts[0]["type"], "image_url");
    let url = parts[0]["image_url"]["url"].as_str().unwrap();
    let data = url
        .strip_prefix("data:image/png;base64,")
        .unwrap_or_else(|| panic!("not a PNG data URL: {}", &url[..40.min(url.len())]));
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(data)
            .unwrap(),
        image
    );
    assert_eq!(parts[1]["type"], "text");
    assert_eq!(parts[1]["text"], "What colour is the square?");

    let i = info(&mut client).await;
    assert!(
        i.backend.contains(&stand_in.base_url) && i.backend.contains("big-vlm"),
        "{}",
        i.backend
    );
    if let Some(key) = &key {
        assert!(!i.backend.contains(key.as_str()));
    }
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fewer_choices_than_asked_for_are_completed_by_further_calls() {
    let stand_in = StandIn::start(Script {
        max_choices: Some(1),
        ..Default::default()
    })
    .await;
    let server = Server::ready(options(&stand_in.base_url)).await;
    let mut client = server.client().await;
    let q = row("q1", "What colour?", vec![png()]);
    let got = ask(&mut client, request(&q, 3, Some(sampling(0))))
        .await
        .unwrap();
    assert_eq!(
        texts(&got),
        [
            "answer 0 from big-vlm",
            "answer 1 from big-vlm",
            "answer 2 from big-vlm"
        ]
    );
    assert_eq!(got.iter().map(|a| a.index).collect::<Vec<_>>(), [0, 1, 2]);
    let asked: Vec<u64> = stand_in
        .bodies()
        .iter()
        .map(|b| b["n"].as_u64().unwrap())
        .collect();
    assert_eq!(asked, [3, 2, 1]);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_are_retried_and_failures_name_the_endpoint() {
    // 500 then 200: one retry, then the answers.
    let flaky = StandIn::start(Script {
        fail_first: 1,
        fail_status: StatusCode::INTERNAL_SERVER_ERROR,
        ..Default::default()
    })
    .await;
    let server = Server::ready(options(&flaky.base_url)).await;
    let mut client = server.client().await;
    let q = row("q1", "What colour?", vec![]);
    let got = ask(&mut client, request(&q, 2, None)).await.unwrap();
    assert_eq!(got.len(), 2);
    assert_eq!(flaky.requests(), 2);
    server.stop().await.unwrap();

    // A 400 is not retried.
    let refusing = StandIn::start(Script {
        fail_first: 10,
        fail_status: StatusCode::BAD_REQUEST,
        ..Default::default()
    })
    .await;
    let server = Server::ready(options(&refusing.base_url)).await;
    let mut client = server.client().await;
    let e = ask(&mut client, request(&q, 2, None)).await.unwrap_err();
    assert_eq!(e.code(), Code::Internal, "{e:?}");
    assert!(
        e.message()
            .contains(&format!("{}/chat/completions", refusing.base_url))
            && e.message().contains("400"),
        "{}",
        e.message()
    );
    assert_eq!(refusing.requests(), 1);
    server.stop().await.unwrap();

    // Nothing listens: retries run out, and the error names the URL.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let base_url = format!("http://127.0.0.1:{port}/v1");
    let server = Server::ready(options(&base_url)).await;
    let mut client = server.client().await;
    let e = ask(&mut client, request(&q, 1, None)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    let message = e.message();
    assert!(
        message.contains(&format!("{base_url}/chat/completions"))
            && message.contains("unreachable after 3 attempts"),
        "{message}"
    );
    server.stop().await.unwrap();

    // A key variable that is not set fails the load, naming the variable.
    let mut o = options(&base_url);
    openai(&mut o).api_key_env = Some("RIL_TEACHER_TEST_KEY_THAT_IS_NOT_SET".into());
    let e = Server::start(o)
        .await
        .finished()
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("RIL_TEACHER_TEST_KEY_THAT_IS_NOT_SET"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_for_one_key_generate_once() {
    let stand_in = StandIn::start(Script {
        gated: true,
        ..Default::default()
    })
    .await;
    let teacher = Arc::new(Teacher::load(options(&stand_in.base_url)).await.unwrap());
    let server = Server::start_teacher(teacher.clone()).await;
    server.wait_for_health(ServingStatus::Serving).await;
    let q = row("q1", "What colour?", vec![png()]);
    let mut clients = [server.client().await, server.client().await];
    let [a, b] = &mut clients;
    let both = async {
        tokio::join!(
            ask(a, request(&q, 3, Some(sampling(1)))),
            ask(b, request(&q, 3, Some(sampling(1))))
        )
    };
    let release = async {
        // Both requests are being served, and one of them is at the endpoint.
        let mut in_flight = teacher.requests_in_flight();
        tokio::time::timeout(WAIT, in_flight.wait_for(|n| *n == 2))
            .await
            .unwrap()
            .unwrap();
        stand_in.wait_for_requests(1).await;
        stand_in.open_gate();
    };
    let ((first, second), ()) = tokio::join!(both, release);
    let (first, second) = (first.unwrap(), second.unwrap());
    assert_eq!(texts(&first), texts(&second));
    let mut flags = [from_cache(&first), from_cache(&second)];
    flags.sort();
    assert_eq!(flags, [vec![false; 3], vec![true; 3]]);
    assert_eq!(stand_in.requests(), 1);
    assert_eq!(teacher.generated(), 3);
    assert_eq!(teacher.cache_hits(), 3);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_answer_streams_finish_into_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let stand_in = StandIn::start(Script {
        gated: true,
        ..Default::default()
    })
    .await;
    let mut o = options(&stand_in.base_url);
    o.cache = Some(dir.path().join("cache.redb"));
    let server = Server::ready(o.clone()).await;
    let mut client = server.client().await;
    let mut health = server.health_stream().await;
    let q = row("q1", "What colour?", vec![]);
    let pending = tokio::spawn({
        let q = q.clone();
        async move { ask(&mut client, request(&q, 2, Some(sampling(3)))).await }
    });
    stand_in.wait_for_requests(1).await;
    let stopping = tokio::spawn(server.stop());
    wait_for_status(&mut health, ServingStatus::NotServing).await;
    drop(health);
    stand_in.open_gate();
    let got = pending.await.unwrap().unwrap();
    assert_eq!(
        texts(&got),
        ["answer 3 from big-vlm", "answer 4 from big-vlm"]
    );
    stopping.await.unwrap().unwrap();

    // The answers reached the cache, and the file was closed for the next server.
    let server = Server::ready(o).await;
    let mut client = server.client().await;
    let again = ask(&mut client, request(&q, 2, Some(sampling(3))))
        .await
        .unwrap();
    assert_eq!(from_cache(&again), [true, true]);
    assert_eq!(stand_in.requests(), 1);
    server.stop().await.unwrap();
}
