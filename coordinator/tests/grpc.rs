//! The coordinator over the wire: a real server on an ephemeral loopback port, real dataset
//! files, waits on predicates with a bound (never fixed sleeps).

use std::path::{Path, PathBuf};
use std::time::Duration;

use ril_common::wait::wait_until;
use ril_coordinator::{CoordinatorOptions, STATE_FILE, serve};
use ril_data::shapes::{SynthConfig, write_dataset};
use ril_proto::client::Channel;
use ril_proto::server::{self, ServingStatus, names};
use ril_proto::v1;
use ril_proto::v1::coordinator_client::CoordinatorClient;
use tokio::sync::oneshot;

const WAIT: Duration = Duration::from_secs(60);

fn shapes_dataset(dir: &Path, n_train: usize) -> PathBuf {
    let out = dir.join("data");
    write_dataset(
        &SynthConfig {
            seed: 3,
            n_train,
            n_val: 1,
            n_test: 1,
            image_size: 32,
            ..Default::default()
        },
        &out,
    )
    .unwrap();
    out
}

fn options(dir: &Path) -> CoordinatorOptions {
    CoordinatorOptions {
        run_id: "wire".into(),
        dataset: shapes_dataset(dir, 8),
        seed: 5,
        questions_per_iteration: 4,
        total_iterations: 2,
        state_dir: Some(dir.join("state")),
        ..Default::default()
    }
}

struct Running {
    addr: String,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<ril_coordinator::Result<()>>,
}

async fn start(options: CoordinatorOptions) -> Running {
    let bound = server::bind("127.0.0.1:0").await.unwrap();
    let addr = bound.addr.to_string();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(options, bound, async {
        let _ = stopped.await;
    }));
    wait_until("the coordinator to be SERVING", WAIT, || {
        let addr = addr.clone();
        async move {
            let ok = |s: &str| {
                let addr = addr.clone();
                let s = s.to_string();
                async move {
                    matches!(
                        ril_proto::client::health_check(
                            &addr,
                            &s,
                            Duration::from_secs(5),
                            &Default::default()
                        )
                        .await,
                        Ok(ServingStatus::Serving)
                    )
                }
            };
            ok(names::COORDINATOR).await && ok("").await
        }
    })
    .await;
    Running { addr, stop, task }
}

async fn client(addr: &str) -> CoordinatorClient<Channel> {
    let channel = ril_proto::client::connect(addr, Duration::from_secs(10), &Default::default())
        .await
        .unwrap();
    ril_proto::client::coordinator(channel)
}

async fn stop(r: Running) {
    r.stop.send(()).unwrap();
    r.task.await.unwrap().unwrap();
}

fn lease_request(actor: &str, n: u32) -> v1::LeasePromptsRequest {
    v1::LeasePromptsRequest {
        actor_id: actor.into(),
        max_questions: n,
        policy_version: 0,
        request_id: String::new(),
    }
}

fn accept_request(lease: &v1::LeasePromptsResponse, i: usize) -> v1::AcceptGroupRequest {
    let item = &lease.items[i];
    v1::AcceptGroupRequest {
        lease_id: lease.lease_id.clone(),
        position: item.position,
        question_id: item.question.as_ref().unwrap().id.clone(),
        iteration: item.iteration,
        publisher_key: PUBLISHER_KEY.as_slice().into(),
    }
}

/// Learner rank 0's publisher key in these tests.
const PUBLISHER_KEY: [u8; 32] = [7u8; 32];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_round_trip_over_grpc_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut options = options(dir.path());
    options.actor.learner_addr = "learner:1".into();
    let running = start(options.clone()).await;
    let mut c = client(&running.addr).await;

    let reg = c
        .register_actor(v1::RegisterActorRequest {
            actor_id: "actor-1".into(),
            device: "cpu".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reg.run_id, "wire");
    assert_eq!(reg.learner_addr, "learner:1");
    // Reflection lists what the coordinator serves, and no other role's service.
    let listed = ril_proto::client::list_services(
        &running.addr,
        Duration::from_secs(5),
        &Default::default(),
    )
    .await
    .unwrap();
    assert_eq!(listed, names::listed(&[names::COORDINATOR]));
    assert_eq!(reg.group_size, 4);
    assert_eq!(reg.lease_timeout_ms, 600_000);
    assert!(reg.sampling.is_some() && reg.teacher_sampling.is_some());

    // The learner joins first (from version 0), as it does before accepting anything.
    let joined = c
        .join_learner(v1::JoinLearnerRequest {
            rank: 0,
            addr: "h:0".into(),
            collective_id: vec![9u8; 128].into(),
            collective_addr: String::new(),
            version: 0,
            publisher_key: PUBLISHER_KEY.as_slice().into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(joined.ready && joined.rank_addrs == ["h:0"] && joined.collective_id.len() == 128);
    let lease = c
        .lease_prompts(lease_request("actor-1", 2))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(lease.items.len(), 2);
    for (i, item) in lease.items.iter().enumerate() {
        assert_eq!((item.position, item.iteration), (i as u64, 0));
        let q = item.question.as_ref().unwrap();
        assert!(q.id.starts_with("shapes-train-"), "{q:?}");
        assert_eq!(q.images.len(), 1);
        assert!(q.images[0].data.starts_with(b"\x89PNG"));
        assert!(!q.reference.is_empty() && !q.messages.is_empty());
    }
    let ok = c
        .accept_group(accept_request(&lease, 0))
        .await
        .unwrap()
        .into_inner();
    assert!(ok.accepted, "{ok:?}");
    // The same commit again (its answer lost on the way): the same answer, not a duplicate.
    let retry = c
        .accept_group(accept_request(&lease, 0))
        .await
        .unwrap()
        .into_inner();
    assert!(retry.accepted, "{retry:?}");
    // The same position under another lease is a duplicate.
    let dup = c
        .accept_group(v1::AcceptGroupRequest {
            lease_id: "another-lease".into(),
            ..accept_request(&lease, 0)
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        !dup.accepted && dup.reason.starts_with("duplicate: position 0"),
        "{dup:?}"
    );

    // Malformed requests are INVALID_ARGUMENT naming the field.
    let e = c.lease_prompts(lease_request("", 2)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("actor_id"), "{}", e.message());
    let e = c
        .join_learner(v1::JoinLearnerRequest {
            rank: 3,
            addr: "h:1".into(),
            collective_id: Default::default(),
            collective_addr: String::new(),
            version: 0,
            publisher_key: Default::default(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("rank"), "{}", e.message());
    let e = c
        .publish_version(v1::PublishVersionRequest {
            version: 2,
            iteration: 1,
            checkpoint: String::new(),
            publisher_key: PUBLISHER_KEY.as_slice().into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{}", e.message());
    // Only rank 0 publishes and accepts: another learner-role caller, without rank 0's key,
    // is refused, whatever else its request holds.
    for key in [Vec::new(), vec![8u8; 32]] {
        let e = c
            .publish_version(v1::PublishVersionRequest {
                version: 1,
                iteration: 0,
                checkpoint: String::new(),
                publisher_key: key.clone().into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{}", e.message());
        assert!(e.message().contains("rank 0"), "{}", e.message());
        let e = c
            .accept_group(v1::AcceptGroupRequest {
                publisher_key: key.into(),
                ..accept_request(&lease, 1)
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{}", e.message());
    }
    // Rank 0 must bring a key; other ranks must not.
    for (rank, key) in [(0u32, vec![1u8; 4]), (1, vec![1u8; 32])] {
        let e = c
            .join_learner(v1::JoinLearnerRequest {
                rank,
                addr: "h:9".into(),
                collective_id: Default::default(),
                collective_addr: String::new(),
                version: 0,
                publisher_key: key.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{}", e.message());
        assert!(e.message().contains("publisher_key"), "{}", e.message());
    }

    c.report_metrics(v1::ReportMetricsRequest {
        iteration: 0,
        metrics: [("reward".to_string(), 1.25)].into(),
    })
    .await
    .unwrap();
    let hb = c
        .heartbeat(v1::HeartbeatRequest {
            actor_id: "nobody".into(),
            policy_version: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!hb.known);

    let s = c
        .get_status(v1::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.run_id, "wire");
    assert_eq!(
        (s.cursor, s.groups_accepted, s.duplicates_refused),
        (2, 1, 1)
    );
    assert_eq!(
        (s.total_iterations, s.policy_version, s.leases_outstanding),
        (2, 0, 1)
    );
    assert_eq!(s.actors.len(), 1);
    assert!(s.actors[0].alive && s.actors[0].groups_leased == 2);
    assert_eq!(s.metrics["reward"], 1.25);
    assert_eq!((s.learner_world_size, s.learner_ranks_joined), (1, 1));
    assert!(s.groups_per_second > 0.0 && !s.finished);

    drop(c);
    stop(running).await;
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("state").join(STATE_FILE)).unwrap(),
    )
    .unwrap();
    assert_eq!(state["cursor"], 2);

    // A restart continues the run. Position 1 (leased, never accepted) stays with actor-1's
    // lease, still open (its deadline is in the state file): another actor gets a fresh one.
    let running = start(options).await;
    let mut c = client(&running.addr).await;
    let s = c
        .get_status(v1::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (s.cursor, s.groups_accepted, s.duplicates_refused),
        (2, 1, 1)
    );
    assert_eq!(s.leases_outstanding, 1);
    let held = c
        .lease_prompts(lease_request("actor-2", 1))
        .await
        .unwrap()
        .into_inner();
    let fresh: Vec<u64> = held.items.iter().map(|i| i.position).collect();
    assert_eq!(fresh, [2], "position 1 is still actor-1's");
    // Once actor-1 hands it back under that lease, it is re-issued at once.
    c.complete_lease(v1::CompleteLeaseRequest {
        actor_id: "actor-1".into(),
        lease_id: lease.lease_id.clone(),
        returned_positions: vec![1],
        reason: "test".into(),
    })
    .await
    .unwrap();
    let again = c
        .lease_prompts(lease_request("actor-2", 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.items[0].position, 1);
    assert_eq!(again.items[0].question, lease.items[1].question);
    // Rank 0's key survived the restart (its SHA-256 is in the state file): a running rank 0
    // goes on accepting; another key is still refused.
    let ok = c
        .accept_group(accept_request(&again, 0))
        .await
        .unwrap()
        .into_inner();
    assert!(ok.accepted, "{ok:?}");
    let e = c
        .accept_group(v1::AcceptGroupRequest {
            publisher_key: vec![8u8; 32].into(),
            ..accept_request(&again, 0)
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{}", e.message());
    drop(c);
    stop(running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_lease_goes_to_another_actor_and_the_late_group_counts_once() {
    let dir = tempfile::tempdir().unwrap();
    let options = CoordinatorOptions {
        lease_timeout: Duration::from_millis(200),
        heartbeat_interval: Duration::from_millis(100),
        state_dir: None,
        ..options(dir.path())
    };
    let running = start(options).await;
    let mut c = client(&running.addr).await;
    // Learner rank 0 joins (with its publisher key) before it accepts anything.
    c.join_learner(v1::JoinLearnerRequest {
        rank: 0,
        addr: "h:0".into(),
        publisher_key: PUBLISHER_KEY.as_slice().into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let first = c
        .lease_prompts(lease_request("slow", 2))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.items.len(), 2);
    // The background ticker expires it; no request needs to arrive.
    wait_until("the lease to expire", WAIT, || {
        let mut c = c.clone();
        async move {
            let s = c
                .get_status(v1::GetStatusRequest {})
                .await
                .unwrap()
                .into_inner();
            s.leases_expired >= 1 && s.leases_outstanding == 0
        }
    })
    .await;
    let second = c
        .lease_prompts(lease_request("fast", 4))
        .await
        .unwrap()
        .into_inner();
    let positions: Vec<u64> = second.items.iter().map(|i| i.position).collect();
    assert_eq!(&positions[..2], [0, 1]);
    let late = c
        .accept_group(accept_request(&first, 0))
        .await
        .unwrap()
        .into_inner();
    assert!(late.accepted, "{late:?}");
    let dup = c
        .accept_group(accept_request(&second, 0))
        .await
        .unwrap()
        .into_inner();
    assert!(!dup.accepted && dup.reason.contains("duplicate"), "{dup:?}");
    drop(c);
    stop(running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dataset_that_cannot_be_opened_stops_the_server_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-dataset");
    let bound = server::bind("127.0.0.1:0").await.unwrap();
    let e = serve(
        CoordinatorOptions {
            dataset: missing.clone(),
            ..Default::default()
        },
        bound,
        std::future::pending(),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(e.contains(&missing.display().to_string()), "{e}");
}
