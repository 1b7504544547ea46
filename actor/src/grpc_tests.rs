//! Every call the actor makes carries its peer's deadline on the wire (`grpc-timeout`) and is
//! held to it here: a peer whose kernel accepts the connection but which never answers (a
//! stopped process, a wedged server) fails the call as DEADLINE_EXCEEDED naming the peer, its
//! address and the call, instead of blocking the actor. Real sockets, real tonic servers.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ril_data::Row;
use ril_proto::server;
use ril_proto::v1::discriminator_server::{
    Discriminator as DiscriminatorService, DiscriminatorServer,
};
use tonic::{Request, Response, Status};

use super::*;

const DEADLINE: Duration = Duration::from_millis(400);
/// How late past the deadline a failure may come on a loaded 2-core machine.
const SLACK: Duration = Duration::from_secs(5);

/// A question as a dataset line reads (the project's one row parser).
fn question() -> Row {
    let line = r#"{"id": "q0", "messages": [{"role": "user", "content": "What colour is the square?"}], "answer": "red"}"#;
    let here = std::path::Path::new(".");
    ril_data::dataset::parse_row(line, &here.join("test.jsonl"), 1, here).expect("a valid row")
}

fn peer(role: &'static str, addr: &str, deadline: Duration) -> (PeerClient, Channel) {
    let channel = client::connect_lazy(addr, Duration::from_secs(1), &Security::default())
        .expect("a lazy channel");
    let peer = PeerClient {
        role,
        addr: addr.to_string(),
        deadline,
    };
    (peer, channel)
}

/// Asserts `result` is the deadline failure of `call` at `role`/`addr`, and came in time.
fn assert_missed<T: std::fmt::Debug>(
    result: Result<T, ActorError>,
    started: Instant,
    role: &str,
    addr: &str,
    call: &str,
) {
    let elapsed = started.elapsed();
    let error = result.expect_err("a silent peer must fail the call");
    match &error {
        ActorError::Rpc(e) => {
            assert_eq!(e.code, tonic::Code::DeadlineExceeded, "{error}");
            assert_eq!((e.peer, e.addr.as_str(), e.call), (role, addr, call));
        }
        other => panic!("expected an RPC deadline failure, got {other}"),
    }
    assert!(
        elapsed >= DEADLINE && elapsed < DEADLINE + SLACK,
        "{call} failed after {elapsed:?}, the deadline is {DEADLINE:?}"
    );
    let text = error.to_string();
    assert!(
        text.contains(role) && text.contains(addr) && text.contains(call),
        "the error names the peer, its address and the call: {text}"
    );
}

/// A listener that is never accepted from: connections complete in the kernel's backlog and
/// nothing ever answers, as with a SIGSTOPped peer.
fn silent_peer() -> (std::net::TcpListener, String) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    (listener, addr)
}

#[tokio::test]
async fn every_call_to_a_silent_peer_fails_at_its_deadline_naming_it() {
    let (_listener, addr) = silent_peer();

    let (p, channel) = peer("teacher", &addr, DEADLINE);
    let teacher = GrpcTeacher {
        peer: p,
        client: client::teacher(channel),
    };
    let started = Instant::now();
    let result = teacher.answers(&question(), 2, None).await;
    assert_missed(result, started, "teacher", &addr, "Answer");

    let (p, channel) = peer("discriminator", &addr, DEADLINE);
    let discriminator = GrpcDiscriminator {
        peer: p,
        client: client::discriminator(channel),
    };
    let started = Instant::now();
    let result = discriminator.score(&question(), &["red".into()]).await;
    assert_missed(result, started, "discriminator", &addr, "Score");

    let (p, channel) = peer("learner", &addr, DEADLINE);
    let learner = GrpcLearner {
        peer: p,
        client: client::learner(channel),
        chunk_bytes: 1 << 20,
        transfer_timeout: DEADLINE,
        attempts: 1,
    };
    let started = Instant::now();
    let result = learner.push_groups(Vec::new()).await;
    assert_missed(result, started, "learner", &addr, "PushGroups");

    let (p, channel) = peer("coordinator", &addr, DEADLINE);
    let coordinator = GrpcCoordinator {
        peer: p,
        client: client::coordinator(channel),
    };
    let started = Instant::now();
    let result = coordinator.heartbeat("actor-1", Some(3)).await;
    assert_missed(result, started, "coordinator", &addr, "Heartbeat");
    let started = Instant::now();
    let result = coordinator.register("actor-1", "cpu").await;
    assert_missed(result, started, "coordinator", &addr, "RegisterActor");
}

/// A discriminator that records the `grpc-timeout` each Score call arrived with and answers
/// after `delay`.
#[derive(Clone)]
struct RecordingDiscriminator {
    seen: Arc<Mutex<Vec<Option<String>>>>,
    delay: Duration,
}

#[tonic::async_trait]
impl DiscriminatorService for RecordingDiscriminator {
    async fn score(
        &self,
        request: Request<v1::ScoreRequest>,
    ) -> Result<Response<v1::ScoreResponse>, Status> {
        let timeout = request.metadata().get("grpc-timeout");
        let timeout = timeout.map(|v| v.to_str().unwrap_or("?").to_string());
        self.seen.lock().unwrap().push(timeout);
        tokio::time::sleep(self.delay).await;
        let n = request.into_inner().responses.len();
        Ok(Response::new(v1::ScoreResponse {
            scores: vec![
                v1::ResponseScore {
                    d_prob: 0.25,
                    answer_score: 1.0,
                    ..Default::default()
                };
                n
            ],
            discriminator_step: 0,
        }))
    }

    async fn train(
        &self,
        _: Request<v1::TrainRequest>,
    ) -> Result<Response<v1::TrainResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn info(
        &self,
        _: Request<v1::DiscriminatorInfoRequest>,
    ) -> Result<Response<v1::DiscriminatorInfo>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
}

/// `grpc-timeout`'s value (digits and a unit, gRPC's HTTP/2 spec) as a duration.
fn parse_grpc_timeout(value: &str) -> Duration {
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().expect("grpc-timeout digits");
    match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        other => panic!("grpc-timeout unit {other:?} in {value:?}"),
    }
}

async fn recording_discriminator(delay: Duration) -> (String, Arc<Mutex<Vec<Option<String>>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let service = RecordingDiscriminator {
        seen: seen.clone(),
        delay,
    };
    let bound = server::bind("127.0.0.1:0").await.expect("bind");
    let addr = bound.addr.to_string();
    tokio::spawn(
        server::builder()
            .add_service(DiscriminatorServer::new(service))
            .serve_with_incoming(server::incoming(bound)),
    );
    (addr, seen)
}

#[tokio::test]
async fn the_deadline_travels_as_grpc_timeout_and_a_late_answer_fails_the_call() {
    let (addr, seen) = recording_discriminator(Duration::ZERO).await;
    let (p, channel) = peer("discriminator", &addr, DEADLINE);
    let discriminator = GrpcDiscriminator {
        peer: p,
        client: client::discriminator(channel),
    };
    let scores = discriminator
        .score(&question(), &["red".into(), "blue".into()])
        .await
        .expect("a prompt discriminator answers within the deadline");
    assert_eq!(scores.len(), 2);
    let sent = seen.lock().unwrap().clone();
    let [Some(header)] = sent.as_slice() else {
        panic!("one Score call carrying grpc-timeout, got {sent:?}");
    };
    let sent = parse_grpc_timeout(header);
    assert!(
        sent <= DEADLINE && sent > DEADLINE / 2,
        "grpc-timeout {header} is not the deadline {DEADLINE:?}"
    );

    // A discriminator that answers, but after the deadline: the call fails, it is not waited for.
    let (addr, _seen) = recording_discriminator(DEADLINE * 10).await;
    let (p, channel) = peer("discriminator", &addr, DEADLINE);
    let discriminator = GrpcDiscriminator {
        peer: p,
        client: client::discriminator(channel),
    };
    let started = Instant::now();
    let result = discriminator.score(&question(), &["red".into()]).await;
    assert_missed(result, started, "discriminator", &addr, "Score");
}
