//! The learner role over real gRPC on loopback ports, with a minimal in-test coordinator:
//! health waits for the coordinator, pushed groups train the policy and publish version 1, the
//! weights stream back in verified chunks that load into a model equal to the learner's policy,
//! duplicates, malformed and stale groups are refused, and shutdown is graceful.

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use ril_common::wait::wait_until;
use ril_learner::options::LearnerOptions;
use ril_learner::trainer::checkpoint_dir;
use ril_proto::server::{self, ServingStatus, names};
use ril_proto::v1 as pb;
use ril_proto::v1::coordinator_server::{Coordinator, CoordinatorServer};
use ril_proto::v1::learner_client::LearnerClient;
use sha2::{Digest, Sha256};
use tonic::{Request, Response, Status};

#[derive(Debug, Default)]
struct Record {
    accepted: BTreeSet<u64>,
    returned: Vec<(u64, String)>,
    published: Vec<pb::PublishVersionRequest>,
    metrics: Vec<pb::ReportMetricsRequest>,
    joins: u32,
    /// Learner ranks to wait for (0: answer every join as a world of one).
    world: u32,
    /// Rank -> (learner address, collective address).
    ranks: std::collections::BTreeMap<u32, (String, String)>,
}

/// Accepts each position once (a position in `taken` counts as accepted elsewhere).
#[derive(Debug, Clone, Default)]
struct TestCoordinator(Arc<Mutex<Record>>);

fn unimplemented<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented("not part of the learner's test"))
}

#[tonic::async_trait]
impl Coordinator for TestCoordinator {
    async fn register_actor(
        &self,
        _: Request<pb::RegisterActorRequest>,
    ) -> Result<Response<pb::RegisterActorResponse>, Status> {
        unimplemented()
    }
    async fn heartbeat(
        &self,
        _: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        unimplemented()
    }
    async fn lease_prompts(
        &self,
        _: Request<pb::LeasePromptsRequest>,
    ) -> Result<Response<pb::LeasePromptsResponse>, Status> {
        unimplemented()
    }
    async fn complete_lease(
        &self,
        _: Request<pb::CompleteLeaseRequest>,
    ) -> Result<Response<pb::CompleteLeaseResponse>, Status> {
        unimplemented()
    }
    async fn accept_group(
        &self,
        request: Request<pb::AcceptGroupRequest>,
    ) -> Result<Response<pb::AcceptGroupResponse>, Status> {
        let r = request.into_inner();
        let fresh = self.0.lock().unwrap().accepted.insert(r.position);
        Ok(Response::new(pb::AcceptGroupResponse {
            accepted: fresh,
            reason: if fresh {
                String::new()
            } else {
                format!("position {} was already accepted (duplicate)", r.position)
            },
        }))
    }
    async fn return_question(
        &self,
        request: Request<pb::ReturnQuestionRequest>,
    ) -> Result<Response<pb::ReturnQuestionResponse>, Status> {
        let r = request.into_inner();
        let mut rec = self.0.lock().unwrap();
        rec.accepted.remove(&r.position);
        rec.returned.push((r.position, r.reason));
        Ok(Response::new(pb::ReturnQuestionResponse {}))
    }
    async fn publish_version(
        &self,
        request: Request<pb::PublishVersionRequest>,
    ) -> Result<Response<pb::PublishVersionResponse>, Status> {
        self.0.lock().unwrap().published.push(request.into_inner());
        Ok(Response::new(pb::PublishVersionResponse {}))
    }
    async fn join_learner(
        &self,
        request: Request<pb::JoinLearnerRequest>,
    ) -> Result<Response<pb::JoinLearnerResponse>, Status> {
        let r = request.into_inner();
        let mut rec = self.0.lock().unwrap();
        rec.joins += 1;
        if rec.world > 0 {
            rec.ranks.insert(r.rank, (r.addr, r.collective_addr));
            let ready = rec.ranks.len() == rec.world as usize;
            let collective_addrs = (0..rec.world)
                .map(|k| rec.ranks.get(&k).map(|a| a.1.clone()).unwrap_or_default())
                .collect();
            return Ok(Response::new(pb::JoinLearnerResponse {
                world_size: rec.world,
                ready,
                rank_addrs: if ready {
                    rec.ranks.values().map(|a| a.0.clone()).collect()
                } else {
                    Vec::new()
                },
                collective_id: Default::default(),
                collective_addrs,
            }));
        }
        Ok(Response::new(pb::JoinLearnerResponse {
            world_size: 1,
            ready: true,
            rank_addrs: vec![r.addr],
            collective_id: Default::default(),
            collective_addrs: vec![r.collective_addr],
        }))
    }
    async fn report_metrics(
        &self,
        request: Request<pb::ReportMetricsRequest>,
    ) -> Result<Response<pb::ReportMetricsResponse>, Status> {
        self.0.lock().unwrap().metrics.push(request.into_inner());
        Ok(Response::new(pb::ReportMetricsResponse {}))
    }
    async fn get_status(
        &self,
        _: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::RunStatus>, Status> {
        unimplemented()
    }
}

async fn health(addr: &str) -> Option<ServingStatus> {
    ril_proto::client::health_check(
        addr,
        names::LEARNER,
        Duration::from_secs(2),
        &Default::default(),
    )
    .await
    .ok()
}

/// A wire group for `row` with real student responses sampled from `bundle`.
fn scored_group(
    bundle: &ril_model::bundle::Bundle,
    position: u64,
    iteration: u64,
    policy_version: u64,
) -> pb::ScoredGroup {
    let row = colour_row(position as usize);
    let rs = responses(
        bundle,
        &row,
        position,
        2,
        &["red", "it is red"],
        1.0,
        policy_version,
    );
    pb::ScoredGroup {
        lease_id: format!("lease-{position}"),
        position,
        iteration,
        question: Some(ril_proto::convert::row_to_question(&row)),
        prompt_token_ids: ril_prompt::prompt(bundle, &row).unwrap().token_ids,
        responses: rs
            .into_iter()
            .map(|r| pb::ScoredResponse {
                source: match r.source {
                    ril_learner::grpo::ResponseSource::Student => pb::ResponseSource::Student,
                    ril_learner::grpo::ResponseSource::Teacher => pb::ResponseSource::Teacher,
                } as i32,
                teacher: String::new(),
                text: String::new(),
                token_ids: r.token_ids,
                behaviour_logprobs: r.behaviour_logprobs,
                policy_version: r.policy_version,
                d_prob: r.d_prob,
                r_sim: r.r_sim,
                r_ans: r.r_ans,
                truncated: false,
            })
            .collect(),
        actor_id: "actor-0".into(),
        timings_ms: [("generate".to_string(), 5.0)].into_iter().collect(),
    }
}

async fn push(
    client: &mut LearnerClient<ril_proto::client::Channel>,
    groups: Vec<pb::ScoredGroup>,
) -> pb::PushGroupsResponse {
    client
        .push_groups(pb::PushGroupsRequest { groups })
        .await
        .unwrap()
        .into_inner()
}

async fn version(client: &mut LearnerClient<ril_proto::client::Channel>) -> u64 {
    client
        .info(pb::LearnerInfoRequest {})
        .await
        .map(|r| r.into_inner().policy_version)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_learner_trains_publishes_and_serves_its_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let init = tiny_model(tmp.path(), "init", 11);
    let bundle = load(&init);
    let out = tmp.path().join("out");

    // The coordinator's port is bound but not served yet: the learner must stay NOT_SERVING.
    let coordinator_bound = server::bind("127.0.0.1:0").await.unwrap();
    let coordinator_addr = coordinator_bound.addr.to_string();
    let learner_bound = server::bind("127.0.0.1:0").await.unwrap();
    let learner_addr = learner_bound.addr.to_string();
    let options = LearnerOptions {
        questions_per_iteration: 2,
        total_iterations: 5,
        staleness_bound: 0,
        save_every: 1,
        coordinator_timeout_ms: 1_000,
        ..LearnerOptions::for_test(&init, &out, &coordinator_addr)
    };
    let (stop_learner, learner_stopped) = tokio::sync::oneshot::channel::<()>();
    let learner = tokio::spawn(ril_learner::serve(options, learner_bound, async move {
        let _ = learner_stopped.await;
    }));
    wait_until(
        "the learner's health service",
        Duration::from_secs(60),
        || async { health(&learner_addr).await.is_some() },
    )
    .await;
    assert_eq!(health(&learner_addr).await, Some(ServingStatus::NotServing));
    let whole_server = ril_proto::client::health_check(
        &learner_addr,
        "",
        Duration::from_secs(2),
        &Default::default(),
    )
    .await
    .unwrap();
    assert_eq!(whole_server, ServingStatus::NotServing);
    let mut client = ril_proto::client::learner(
        ril_proto::client::connect(&learner_addr, Duration::from_secs(5), &Default::default())
            .await
            .unwrap(),
    );
    let not_ready = client.info(pb::LearnerInfoRequest {}).await.unwrap_err();
    assert_eq!(not_ready.code(), tonic::Code::Unavailable, "{not_ready:?}");
    // Reflection lists what a learner rank serves, and no other role's service.
    let listed = ril_proto::client::list_services(
        &learner_addr,
        Duration::from_secs(5),
        &Default::default(),
    )
    .await
    .unwrap();
    assert_eq!(
        listed,
        names::listed(&[names::LEARNER, names::LEARNER_RANKS])
    );

    let coordinator = TestCoordinator::default();
    let record = coordinator.0.clone();
    let (stop_coordinator, coordinator_stopped) = tokio::sync::oneshot::channel::<()>();
    let coordinator_task = tokio::spawn(
        server::builder()
            .add_service(CoordinatorServer::new(coordinator))
            .serve_with_incoming_shutdown(server::incoming(coordinator_bound), async move {
                let _ = coordinator_stopped.await;
            }),
    );
    wait_until("SERVING", Duration::from_secs(60), || async {
        health(&learner_addr).await == Some(ServingStatus::Serving)
    })
    .await;
    assert_eq!(record.lock().unwrap().joins, 1);

    // Iteration 0: a duplicate, two malformed groups, then the two good ones.
    let g0 = scored_group(&bundle, 0, 0, 0);
    let g1 = scored_group(&bundle, 1, 0, 0);
    let mut bad_token = scored_group(&bundle, 5, 0, 0);
    bad_token.responses[1].token_ids[0] = 1_000_000;
    let mut bad_question = scored_group(&bundle, 6, 0, 0);
    bad_question.question.as_mut().unwrap().id.clear();
    let mut bad_source = scored_group(&bundle, 7, 0, 0);
    bad_source.responses[3].source = 0;
    let reply = push(
        &mut client,
        vec![g0.clone(), bad_token, bad_question, bad_source, g0.clone()],
    )
    .await;
    let verdicts = reply.verdicts;
    assert_eq!(reply.policy_version, 0);
    assert!(verdicts[0].accepted, "{:?}", verdicts[0]);
    for (v, position, field) in [
        (&verdicts[1], 5, "responses[1].token_ids[0]"),
        (&verdicts[2], 6, "question.id"),
        (&verdicts[3], 7, "responses[3].source"),
    ] {
        assert!(!v.accepted);
        assert_eq!(v.position, position);
        assert!(
            v.reason.contains(&format!("position {position}")) && v.reason.contains(field),
            "{}",
            v.reason
        );
    }
    assert!(!verdicts[4].accepted, "a duplicate was accepted");
    assert_eq!(verdicts[4].position, 0);
    // A position the coordinator already counted (e.g. pushed through another lease).
    record.lock().unwrap().accepted.insert(9);
    let elsewhere = push(&mut client, vec![scored_group(&bundle, 9, 0, 0)]).await;
    assert!(!elsewhere.verdicts[0].accepted);
    assert!(
        elsewhere.verdicts[0].reason.contains("duplicate"),
        "{}",
        elsewhere.verdicts[0].reason
    );
    let reply = push(&mut client, vec![g1]).await;
    assert!(reply.verdicts[0].accepted, "{:?}", reply.verdicts[0]);

    wait_until("version 1", Duration::from_secs(120), || {
        let mut c = client.clone();
        async move { version(&mut c).await == 1 }
    })
    .await;
    wait_until("PublishVersion(1)", Duration::from_secs(30), || async {
        !record.lock().unwrap().published.is_empty() && !record.lock().unwrap().metrics.is_empty()
    })
    .await;
    {
        let rec = record.lock().unwrap();
        let p = &rec.published[0];
        assert_eq!((p.version, p.iteration), (1, 0));
        assert_eq!(p.checkpoint, checkpoint_dir(&out, 1).display().to_string());
        let m = &rec.metrics[0];
        assert_eq!(m.iteration, 0);
        for key in [
            "loss",
            "kl_mean",
            "reward_student_mean",
            "actor_generate_ms",
        ] {
            assert!(m.metrics.contains_key(key), "{key} not in {:?}", m.metrics);
        }
        // On-policy groups: the learner scores the actor's tokens as the actor sampled them.
        let diff = m.metrics["behaviour_logprob_abs_diff"];
        assert!(
            diff < 1e-4,
            "behaviour vs learner log-probs differ by {diff}"
        );
    }

    // The weights: chunks in order, the checksum on the last one only.
    let mut stream = client
        .get_weights(pb::GetWeightsRequest {
            version: 0,
            chunk_bytes: 4096,
        })
        .await
        .unwrap()
        .into_inner();
    let mut payload = Vec::new();
    let mut checksum = Vec::new();
    let mut total = 0;
    let mut chunks = 0;
    while let Some(chunk) = stream.message().await.unwrap() {
        assert_eq!(chunk.version.unwrap().version, 1);
        assert_eq!(chunk.offset, payload.len() as u64);
        assert!(
            checksum.is_empty(),
            "the checksum came before the last chunk"
        );
        assert!(chunk.data.len() <= 4096);
        total = chunk.total_bytes;
        payload.extend_from_slice(&chunk.data);
        checksum = chunk.sha256.to_vec();
        chunks += 1;
    }
    assert!(chunks > 1);
    assert_eq!(payload.len() as u64, total);
    assert_eq!(Sha256::digest(&payload).to_vec(), checksum);
    let info = client
        .info(pb::LearnerInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.weights_sha256, hex::encode(&checksum));
    assert_eq!((info.iteration, info.world_size), (1, 1));
    // They load into a model equal to the learner's policy (its version-1 checkpoint), which
    // is no longer the initial one.
    let file = tmp.path().join("pulled.safetensors");
    std::fs::write(&file, &payload).unwrap();
    let pulled = load(&init);
    ril_model::checkpoint::load_weights(
        &pulled.model,
        &file,
        ril_model::checkpoint::LoadOptions::strict(),
    )
    .unwrap();
    let policy = load(&checkpoint_dir(&out, 1));
    assert_eq!(weights(&pulled.model), weights(&policy.model));
    assert_ne!(weights(&pulled.model), weights(&bundle.model));
    // An old version is not held.
    let old = client
        .get_weights(pb::GetWeightsRequest {
            version: 7,
            chunk_bytes: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(old.code(), tonic::Code::FailedPrecondition);
    assert!(
        old.message().contains('7') && old.message().contains("version 1"),
        "{}",
        old.message()
    );

    // Iteration 1 at staleness bound 0: a group sampled with version 0 is dropped, counted and
    // handed back; fresh ones train.
    let stale = push(&mut client, vec![scored_group(&bundle, 2, 1, 0)]).await;
    assert!(!stale.verdicts[0].accepted);
    assert!(
        stale.verdicts[0].reason.contains("stale"),
        "{}",
        stale.verdicts[0].reason
    );
    assert!(
        record
            .lock()
            .unwrap()
            .returned
            .iter()
            .any(|(p, r)| *p == 2 && r.contains("stale"))
    );
    let fresh = push(
        &mut client,
        vec![
            scored_group(&bundle, 2, 1, 1),
            scored_group(&bundle, 3, 1, 1),
        ],
    )
    .await;
    assert!(fresh.verdicts.iter().all(|v| v.accepted), "{fresh:?}");
    wait_until(
        "the iteration 1 metrics",
        Duration::from_secs(120),
        || async { record.lock().unwrap().metrics.len() == 2 },
    )
    .await;
    assert_eq!(
        record.lock().unwrap().metrics[1].metrics["stale_groups_dropped"],
        1.0
    );
    assert_eq!(version(&mut client).await, 2);

    // Graceful shutdown: a buffered group is handed back, the server stops cleanly.
    let buffered = push(&mut client, vec![scored_group(&bundle, 4, 2, 2)]).await;
    assert!(buffered.verdicts[0].accepted);
    stop_learner.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(60), learner)
        .await
        .expect("the learner did not stop")
        .unwrap()
        .unwrap();
    assert!(
        record
            .lock()
            .unwrap()
            .returned
            .iter()
            .any(|(p, r)| *p == 4 && r.contains("shutting down"))
    );
    assert!(checkpoint_dir(&out, 2).join("trainer_state.json").is_file());
    let _ = stop_coordinator.send(());
    coordinator_task.await.unwrap().unwrap();
}

async fn serve_coordinator(
    world: u32,
) -> (String, Arc<Mutex<Record>>, tokio::sync::oneshot::Sender<()>) {
    let bound = server::bind("127.0.0.1:0").await.unwrap();
    let addr = bound.addr.to_string();
    let coordinator = TestCoordinator::default();
    coordinator.0.lock().unwrap().world = world;
    let record = coordinator.0.clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(
        server::builder()
            .add_service(CoordinatorServer::new(coordinator))
            .serve_with_incoming_shutdown(server::incoming(bound), async move {
                let _ = stopped.await;
            }),
    );
    (addr, record, stop)
}

/// Two learner ranks over real gRPC and the ring: rank 0 takes the pushed groups and sends rank
/// 1 its shard (TrainShard); both reach version 1 with identical weights (checked by the ranks
/// themselves too: verify_every = 1); rank 1 refuses pushes, pointing at rank 0; only rank 0
/// publishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_ranks_train_in_step_and_rank_1_refuses_pushes() {
    let tmp = tempfile::tempdir().unwrap();
    let init = tiny_model(tmp.path(), "init", 11);
    let bundle = load(&init);
    let out = tmp.path().join("out");
    let (coordinator_addr, record, _stop_coordinator) = serve_coordinator(2).await;
    let mut addrs = Vec::new();
    let mut stops = Vec::new();
    let mut tasks = Vec::new();
    for rank in 0..2u32 {
        let bound = server::bind("127.0.0.1:0").await.unwrap();
        addrs.push(bound.addr.to_string());
        let options = LearnerOptions {
            questions_per_iteration: 3,
            total_iterations: 3,
            coordinator_timeout_ms: 1_000,
            rank,
            world_size: 2,
            verify_every: 1,
            ..LearnerOptions::for_test(&init, &out, &coordinator_addr)
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        stops.push(stop);
        tasks.push(tokio::spawn(ril_learner::serve(
            options,
            bound,
            async move {
                let _ = stopped.await;
            },
        )));
    }
    for addr in &addrs {
        wait_until("SERVING", Duration::from_secs(120), || async {
            health(addr).await == Some(ServingStatus::Serving)
        })
        .await;
    }
    let mut clients = Vec::new();
    for addr in &addrs {
        clients.push(ril_proto::client::learner(
            ril_proto::client::connect(addr, Duration::from_secs(5), &Default::default())
                .await
                .unwrap(),
        ));
    }
    let refused = clients[1]
        .push_groups(pb::PushGroupsRequest {
            groups: vec![scored_group(&bundle, 0, 0, 0)],
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused
            .message()
            .contains(&format!("push to rank 0 at {}", addrs[0])),
        "{}",
        refused.message()
    );
    let groups = (0..3).map(|p| scored_group(&bundle, p, 0, 0)).collect();
    let reply = push(&mut clients[0], groups).await;
    assert!(reply.verdicts.iter().all(|v| v.accepted), "{reply:?}");
    for c in &clients {
        wait_until("version 1 on every rank", Duration::from_secs(120), || {
            let mut c = c.clone();
            async move { version(&mut c).await == 1 }
        })
        .await;
    }
    let mut shas = Vec::new();
    for c in &mut clients {
        let info = c
            .info(pb::LearnerInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.world_size, 2);
        shas.push(info.weights_sha256);
    }
    assert_eq!(shas[0], shas[1], "the ranks' weights differ");
    let initial = hex::encode(Sha256::digest(
        ril_model::checkpoint::safetensors_bytes(
            &bundle
                .model
                .named_vars()
                .into_iter()
                .map(|(k, v)| (k, v.as_tensor().clone()))
                .collect(),
            None,
        )
        .unwrap(),
    ));
    assert_ne!(shas[0], initial, "the policy did not change");
    wait_until("PublishVersion(1)", Duration::from_secs(30), || async {
        !record.lock().unwrap().published.is_empty()
    })
    .await;
    assert_eq!(
        record.lock().unwrap().published.len(),
        1,
        "only rank 0 publishes"
    );
    for stop in stops {
        let _ = stop.send(());
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
}

/// A rank whose peers never join gives up after collective_timeout_ms, naming them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rank_whose_peers_never_join_names_them() {
    let tmp = tempfile::tempdir().unwrap();
    let init = tiny_model(tmp.path(), "init", 11);
    let (coordinator_addr, _record, _stop) = serve_coordinator(3).await;
    let options = LearnerOptions {
        rank: 1,
        world_size: 3,
        collective_timeout_ms: 300,
        ..LearnerOptions::for_test(&init, &tmp.path().join("out"), &coordinator_addr)
    };
    let bound = server::bind("127.0.0.1:0").await.unwrap();
    let e = ril_learner::serve(options, bound, std::future::pending())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing rank(s) 0, 2"), "{e}");
}
