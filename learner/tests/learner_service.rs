//! The learner service without gRPC, against fake peers (coordinator, discriminator, other
//! ranks): a resumed learner continues exactly, bad groups are refused with the position and
//! field before anything is committed, D trains on each iteration before its version is
//! published, rank 0 shards iterations across ranks, and pushes and shards reach only the ranks
//! that take them.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use ril_learner::collective::{Collective, SingleRank};
use ril_learner::grpo::ResponseSource;
use ril_learner::options::LearnerOptions;
use ril_learner::service::{
    Acceptance, CoordinatorLink, DiscriminatorLink, DiscriminatorStep, GroupKey, IncomingGroup,
    JoinReply, JoinRequest, LabelledGroup, LearnerService, Peers, ShardPeers,
};
use ril_learner::trainer::{Trainer, TrainerState, checkpoint_dir};
use ril_learner::{LearnerError, Result};

type Shared<T> = Arc<Mutex<Vec<T>>>;

/// Accepts each position once (a retry under the same lease gets the same answer, as the real
/// coordinator's); records what the learner tells it; loses answers or is down on request.
#[derive(Debug, Clone, Default)]
struct FakeCoordinator {
    accepted: Arc<Mutex<BTreeSet<u64>>>,
    accepted_by: Arc<Mutex<BTreeMap<u64, String>>>,
    /// This many AcceptGroup calls commit and then fail, as if the answer was lost.
    lose_answers: Arc<AtomicUsize>,
    /// While set, AcceptGroup, ReturnQuestion and PublishVersion fail UNAVAILABLE without effect.
    down: Arc<AtomicBool>,
    accept_calls: Arc<AtomicUsize>,
    /// While set, PublishVersion alone fails UNAVAILABLE.
    publish_down: Arc<AtomicBool>,
    publish_refusals: Arc<AtomicUsize>,
    returned: Shared<(u64, String)>,
    published: Shared<(u64, u64, Option<PathBuf>)>,
    metrics: Shared<(u64, BTreeMap<String, f64>)>,
}

impl CoordinatorLink for FakeCoordinator {
    async fn accept_group(&self, key: GroupKey) -> Result<Acceptance> {
        self.accept_calls.fetch_add(1, Ordering::SeqCst);
        let failure = |code, message: &str| {
            Err(LearnerError::Coordinator(
                ril_proto::error::RpcError::local(
                    "coordinator",
                    "fake",
                    "AcceptGroup",
                    code,
                    message,
                ),
            ))
        };
        if self.down.load(Ordering::SeqCst) {
            return failure(tonic::Code::Unavailable, "down (injected)");
        }
        let answer = if self.accepted.lock().unwrap().insert(key.position) {
            let mut by = self.accepted_by.lock().unwrap();
            by.insert(key.position, key.lease_id.clone());
            Acceptance::Accepted
        } else if self.accepted_by.lock().unwrap().get(&key.position) == Some(&key.lease_id) {
            Acceptance::Accepted
        } else {
            Acceptance::Refused(format!("position {} is a duplicate", key.position))
        };
        let lose = self.lose_answers.load(Ordering::SeqCst) > 0;
        if lose {
            self.lose_answers.fetch_sub(1, Ordering::SeqCst);
            return failure(tonic::Code::DeadlineExceeded, "answer lost (injected)");
        }
        Ok(answer)
    }
    async fn return_question(&self, position: u64, lease_id: String, reason: String) -> Result<()> {
        assert!(!lease_id.is_empty(), "a hand-back names its group's lease");
        if self.down.load(Ordering::SeqCst) {
            return Err(LearnerError::Coordinator(
                ril_proto::error::RpcError::local(
                    "coordinator",
                    "fake",
                    "ReturnQuestion",
                    tonic::Code::Unavailable,
                    "down (injected)",
                ),
            ));
        }
        self.accepted.lock().unwrap().remove(&position);
        self.accepted_by.lock().unwrap().remove(&position);
        self.returned.lock().unwrap().push((position, reason));
        Ok(())
    }
    async fn publish_version(
        &self,
        version: u64,
        iteration: u64,
        checkpoint: Option<PathBuf>,
    ) -> Result<()> {
        if self.down.load(Ordering::SeqCst) || self.publish_down.load(Ordering::SeqCst) {
            self.publish_refusals.fetch_add(1, Ordering::SeqCst);
            return Err(LearnerError::Coordinator(
                ril_proto::error::RpcError::local(
                    "coordinator",
                    "fake",
                    "PublishVersion",
                    tonic::Code::Unavailable,
                    "down (injected)",
                ),
            ));
        }
        self.published
            .lock()
            .unwrap()
            .push((version, iteration, checkpoint));
        Ok(())
    }
    async fn report_metrics(&self, iteration: u64, metrics: BTreeMap<String, f64>) -> Result<()> {
        self.metrics.lock().unwrap().push((iteration, metrics));
        Ok(())
    }
    /// A world of one: the service never joins (startup does), so this is only for the trait.
    async fn join_learner(&self, request: JoinRequest) -> Result<JoinReply> {
        Ok(JoinReply {
            world_size: 1,
            ready: true,
            rank_addrs: vec![request.addr],
            collective_addrs: vec![request.collective_addr],
            collective_id: Vec::new(),
        })
    }
}

fn options(init: &Path, out: &Path) -> LearnerOptions {
    LearnerOptions {
        questions_per_iteration: 2,
        total_iterations: 3,
        save_every: 0,
        seed: 7,
        ..LearnerOptions::for_test(init, out, "127.0.0.1:1")
    }
}

fn start(opts: &LearnerOptions) -> (LearnerService<FakeCoordinator>, FakeCoordinator) {
    let link = FakeCoordinator::default();
    let trainer = Trainer::open(opts, Box::new(SingleRank)).unwrap();
    (
        LearnerService::new(trainer, link.clone(), opts.clone()).unwrap(),
        link,
    )
}

async fn wait_for_version(service: &LearnerService<FakeCoordinator>, version: u64) {
    let mut rx = service.progress();
    tokio::time::timeout(
        Duration::from_secs(120),
        rx.wait_for(|p| p.version >= version && !p.training || p.failed.is_some()),
    )
    .await
    .expect("the learner did not reach the version in time")
    .unwrap();
    assert_eq!(service.progress().borrow().failed, None);
    assert_eq!(service.current_version(), version);
}

/// Six groups, two per iteration, sampled once from the initial model (labelled with the
/// version that would have produced them).
fn groups(init: &Path) -> Vec<IncomingGroup> {
    let bundle = load(init);
    (0..6u64)
        .map(|position| {
            let iteration = position / 2;
            let row = colour_row(position as usize);
            let r = responses(&bundle, &row, position, 2, &["red"], 1.0, iteration);
            incoming(&row, position, iteration, r)
        })
        .collect()
}

async fn push_all(service: &LearnerService<FakeCoordinator>, groups: &[IncomingGroup]) {
    for g in groups {
        let iteration = g.iteration;
        let verdict = service.push_group(g.clone()).await;
        assert!(verdict.accepted, "{verdict:?}");
        if g.position % 2 == 1 {
            wait_for_version(service, iteration + 1).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_learner_equals_an_uninterrupted_one() {
    let tmp = tempfile::tempdir().unwrap();
    let init = tiny_model(tmp.path(), "init", 3);
    let groups = groups(&init);

    // Uninterrupted: three iterations.
    let (a, link_a) = start(&options(&init, &tmp.path().join("a")));
    push_all(&a, &groups).await;
    assert_eq!(
        link_a
            .published
            .lock()
            .unwrap()
            .iter()
            .map(|(v, i, _)| (*v, *i))
            .collect::<Vec<_>>(),
        vec![(1, 0), (2, 1), (3, 2)]
    );
    let final_checkpoint = link_a.published.lock().unwrap()[2].2.clone();
    assert_eq!(
        final_checkpoint,
        Some(checkpoint_dir(&tmp.path().join("a"), 3)),
        "the last version is checkpointed"
    );
    let metrics = link_a.metrics.lock().unwrap().clone();
    assert_eq!(metrics.len(), 3);
    assert!(metrics[0].1.contains_key("loss") && metrics[0].1.contains_key("actor_generate_ms"));
    // Iteration 0 is on-policy, and the learner rendered the prompts itself (the groups carry
    // no prompt ids): its log-probs must be the sampler's.
    let diff = metrics[0].1["behaviour_logprob_abs_diff"];
    assert!(
        diff < 1e-4,
        "behaviour vs learner log-probs differ by {diff}"
    );

    // Interrupted after two iterations (shutdown writes the checkpoint), resumed in a new
    // learner from it.
    let out_b = tmp.path().join("b");
    let (b, _) = start(&options(&init, &out_b));
    push_all(&b, &groups[..4]).await;
    let saved = b.shutdown().await.unwrap();
    assert_eq!(saved, Some(checkpoint_dir(&out_b, 2)));
    drop(b);
    let resumed_options = LearnerOptions {
        resume: true,
        ..options(&init, &out_b)
    };
    let (c, _) = start(&resumed_options);
    assert_eq!(c.current_version(), 2);
    push_all(&c, &groups[4..]).await;

    let state = |s: &LearnerService<FakeCoordinator>| -> TrainerState {
        s.with_trainer(|t| t.state().clone()).unwrap()
    };
    assert_eq!(state(&a), state(&c));
    assert_eq!(
        a.with_trainer(|t| t.optimizer().step_count()).unwrap(),
        c.with_trainer(|t| t.optimizer().step_count()).unwrap()
    );
    let (wa, wc) = (a.weights(0).unwrap(), c.weights(0).unwrap());
    assert_eq!(wa.version, 3);
    assert_eq!(wa.sha256, wc.sha256, "the resumed weights differ");
    assert_eq!(
        a.with_trainer(|t| weights(&t.policy().model)).unwrap(),
        c.with_trainer(|t| weights(&t.policy().model)).unwrap()
    );
    // And training did something.
    assert_ne!(
        a.with_trainer(|t| weights(&t.policy().model)).unwrap(),
        weights(&load(&init).model)
    );
    // The run is finished: further groups are refused.
    let late = a.push_group(groups[0].clone()).await;
    assert!(
        !late.accepted && late.reason.contains("finished"),
        "{late:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_groups_are_refused_naming_position_and_field_before_any_commit() {
    let tmp = tempfile::tempdir().unwrap();
    let init = tiny_model(tmp.path(), "init", 4);
    let opts = options(&init, &tmp.path().join("out"));
    let (service, link) = start(&opts);
    let good = groups(&init).remove(0);
    let vocab = load(&init).model.config().text_config.vocab_size as u32;
    let image_token = load(&init).model.config().image_token_index;

    type Mutation = Box<dyn Fn(&mut IncomingGroup)>;
    let cases: Vec<(&str, Mutation, &str)> = vec![
        (
            "token id beyond the vocabulary",
            Box::new(move |g| g.responses[0].token_ids[0] = vocab + 5),
            "responses[0].token_ids[0]",
        ),
        (
            "image placeholder in a response",
            Box::new(move |g| g.responses[2].token_ids[0] = image_token),
            "responses[2].token_ids[0]",
        ),
        (
            "log-probs missing",
            Box::new(|g| {
                g.responses[1].behaviour_logprobs.pop();
            }),
            "responses[1].behaviour_logprobs",
        ),
        (
            "non-finite log-prob",
            Box::new(|g| g.responses[0].behaviour_logprobs[0] = f32::NAN),
            "responses[0].behaviour_logprobs[0]",
        ),
        (
            "non-finite reward",
            Box::new(|g| g.responses[2].r_ans = f32::INFINITY),
            "responses[2].r_ans",
        ),
        (
            "no responses",
            Box::new(|g| g.responses.clear()),
            "field `responses`",
        ),
        (
            "iteration from the future",
            Box::new(|g| g.iteration = 9),
            "iteration",
        ),
        (
            "policy version from the future",
            Box::new(|g| g.responses[1].policy_version = 4),
            "responses[1].policy_version",
        ),
        (
            "prompt without the image placeholders",
            Box::new(|g| g.prompt_ids = vec![1, 2, 3]),
            "prompt_token_ids",
        ),
        (
            "image that does not decode",
            Box::new(|g| g.row.images[0].bytes = vec![0x89, b'P', b'N', b'G', 0, 1]),
            "question.images[0]",
        ),
    ];
    for (what, mutate, field) in &cases {
        let mut g = good.clone();
        g.position = 42;
        mutate(&mut g);
        let v = service.push_group(g).await;
        assert!(!v.accepted, "{what}: accepted");
        assert_eq!(v.position, 42, "{what}");
        assert!(
            v.reason.contains("position 42") && v.reason.contains(field),
            "{what}: {}",
            v.reason
        );
    }
    assert!(
        link.accepted.lock().unwrap().is_empty(),
        "nothing may be committed"
    );
    assert_eq!(
        service.progress().borrow().groups_refused,
        cases.len() as u64
    );
    // A duplicate is refused by the learner's buffer before the coordinator sees it.
    let first = service.push_group(good.clone()).await;
    assert!(first.accepted, "{first:?}");
    let again = service.push_group(good.clone()).await;
    assert!(
        !again.accepted && again.reason.contains("field `position`"),
        "{again:?}"
    );
    // Teacher-only groups are fine in RIL (and complete the iteration here), refused in plain
    // Dr.GRPO.
    let mut teachers_only = good.clone();
    teachers_only.position = 1;
    teachers_only
        .responses
        .retain(|r| r.source == ResponseSource::Teacher);
    assert!(service.push_group(teachers_only.clone()).await.accepted);
    wait_for_version(&service, 1).await;
    let dr_grpo = LearnerOptions {
        grpo: ril_learner::GrpoConfig {
            teachers_in_group: false,
            ..opts.grpo.clone()
        },
        ..options(&init, &tmp.path().join("plain"))
    };
    let (plain, _) = start(&dr_grpo);
    let v = plain.push_group(teachers_only).await;
    assert!(
        !v.accepted && v.reason.contains("no student responses"),
        "{v:?}"
    );
    // A group of the iteration just trained is refused.
    let late = service.push_group(good).await;
    assert!(
        !late.accepted && late.reason.contains("iteration"),
        "{late:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_step_stops_the_learner_and_hands_its_questions_back() {
    let tmp = tempfile::tempdir().unwrap();
    let init = tiny_model(tmp.path(), "init", 5);
    // An absurd learning rate: the first step leaves weights of ~1e27, the second one's loss
    // is not finite.
    let mut opts = options(&init, &tmp.path().join("out"));
    opts.questions_per_iteration = 1;
    opts.grpo.lr = 1e30;
    opts.grpo.max_grad_norm = 0.0;
    let (service, link) = start(&opts);
    let groups = groups(&init);
    let mut first = groups[0].clone();
    first.iteration = 0;
    assert!(service.push_group(first).await.accepted);
    wait_for_version(&service, 1).await;
    let relabel = |g: &IncomingGroup| {
        let mut g = g.clone();
        g.iteration = 1;
        for r in &mut g.responses {
            if r.source == ResponseSource::Student {
                r.policy_version = 1;
            }
        }
        g
    };
    let second = relabel(&groups[1]);
    assert!(service.push_group(second).await.accepted);
    let mut rx = service.progress();
    let failed = tokio::time::timeout(
        Duration::from_secs(120),
        rx.wait_for(|p| p.failed.is_some()),
    )
    .await
    .unwrap()
    .unwrap()
    .failed
    .clone()
    .unwrap();
    assert!(failed.contains("non-finite"), "{failed}");
    assert_eq!(
        service.current_version(),
        1,
        "the failed step published nothing"
    );
    assert!(
        link.returned
            .lock()
            .unwrap()
            .iter()
            .any(|(p, r)| *p == 1 && r.contains("failed")),
        "{:?}",
        link.returned.lock().unwrap()
    );
    let v = service.push_group(relabel(&groups[2])).await;
    assert!(!v.accepted && v.reason.contains("failed step"), "{v:?}");
    // Shutdown checkpoints the last good version (version 1; with save_every = 0 nothing was
    // on disk yet).
    let saved = service.shutdown().await.unwrap();
    assert_eq!(saved, Some(checkpoint_dir(&tmp.path().join("out"), 1)));
}

/// Records D's Train calls, and how many versions the coordinator had seen published by then.
#[derive(Clone)]
struct FakeDiscriminator {
    coordinator: FakeCoordinator,
    calls: Shared<(u64, Vec<LabelledGroup>, usize)>,
    /// Train fails (UNAVAILABLE) while set.
    down: Arc<AtomicBool>,
}

impl DiscriminatorLink for FakeDiscriminator {
    fn train(
        &self,
        iteration: u64,
        groups: Vec<LabelledGroup>,
    ) -> Pin<Box<dyn Future<Output = Result<DiscriminatorStep>> + Send + '_>> {
        Box::pin(async move {
            let published = self.coordinator.published.lock().unwrap().len();
            self.calls
                .lock()
                .unwrap()
                .push((iteration, groups, published));
            if self.down.load(Ordering::SeqCst) {
                return Err(LearnerError::Discriminator(
                    ril_proto::error::RpcError::local(
                        "discriminator",
                        "fake",
                        "Train",
                        tonic::Code::Unavailable,
                        "down (injected)",
                    ),
                ));
            }
            Ok(DiscriminatorStep {
                loss: 0.5,
                accuracy: 0.75,
                step: iteration + 1,
                skipped: false,
            })
        })
    }
}

/// A collective for one rank of a world of `world` whose other ranks all mirror it: the sum
/// across ranks is `world` times this rank's values.
#[derive(Debug)]
struct MirroredRanks {
    rank: usize,
    world: usize,
}

impl Collective for MirroredRanks {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn all_reduce_flat(&self, values: &mut Vec<f32>) -> Result<()> {
        values.iter_mut().for_each(|v| *v *= self.world as f32);
        Ok(())
    }
    fn all_reduce_sum_scalars(&self, values: &mut [f64]) -> Result<()> {
        values.iter_mut().for_each(|v| *v *= self.world as f64);
        Ok(())
    }
}

/// Records the shards rank 0 sends, answering with the next version (or failing).
#[derive(Clone, Default)]
struct FakeRanks {
    shards: Shared<(u32, u64, Vec<IncomingGroup>)>,
    fail: bool,
}

impl ShardPeers for FakeRanks {
    fn train_shard(
        &self,
        rank: u32,
        iteration: u64,
        groups: Vec<IncomingGroup>,
    ) -> Pin<Box<dyn Future<Output = Result<u64>> + Send + '_>> {
        Box::pin(async move {
            self.shards.lock().unwrap().push((rank, iteration, groups));
            if self.fail {
                return Err(LearnerError::PeerRank {
                    rank,
                    iteration,
                    source: ril_proto::RpcError::new(
                        "learner",
                        "10.0.0.2:50054",
                        "TrainShard",
                        tonic::Status::unavailable("rank 1 is gone"),
                    ),
                });
            }
            Ok(iteration + 1)
        })
    }
}

fn start_with(
    opts: &LearnerOptions,
    collective: Box<dyn Collective>,
    peers: Peers,
) -> (LearnerService<FakeCoordinator>, FakeCoordinator) {
    let link = FakeCoordinator::default();
    let trainer = Trainer::open(opts, collective).unwrap();
    let service = LearnerService::with_peers(trainer, link.clone(), opts.clone(), peers).unwrap();
    (service, link)
}

/// After an iteration trains, D gets that iteration's accepted responses (labelled, with their
/// texts) before the version is published, and its step's numbers join the step's metrics.
/// With D down, the policy trains on and the step's metrics say D's update was lost
/// (`d_train_failed`, which `ril status` shows).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_discriminator_trains_on_the_iteration_before_its_version_is_published() {
    let tmp = tempfile::tempdir().unwrap();
    let init = tiny_model(tmp.path(), "init", 6);
    let opts = options(&init, &tmp.path().join("out"));
    let coordinator = FakeCoordinator::default();
    let discriminator = FakeDiscriminator {
        coordinator: coordinator.clone(),
        calls: Shared::default(),
        down: Arc::default(),
    };
    let trainer = Trainer::open(&opts, Box::new(SingleRank)).unwrap();
    let peers = Peers {
        discriminator: Some(Arc::new(discriminator.clone())),
        ..Peers::default()
    };
    let service =
        LearnerService::with_peers(trainer, coordinator.clone(), opts.clone(), peers).unwrap();
    let groups = groups(&init);
    // A refused group (a duplicate position) is not D's to learn from.
    assert!(service.push_group(groups[0].clone()).await.accepted);
    assert!(!service.push_group(groups[0].clone()).await.accepted);
    assert!(service.push_group(groups[1].clone()).await.accepted);
    wait_for_version(&service, 1).await;
    ril_common::wait::wait_until("the step's metrics", Duration::from_secs(30), || async {
        !coordinator.metrics.lock().unwrap().is_empty()
    })
    .await;
    let calls = discriminator.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 1);
    let (iteration, trained_on, published_before) = &calls[0];
    assert_eq!((*iteration, *published_before), (0, 0));
    assert_eq!(
        trained_on
            .iter()
            .map(|g| g.row.id.as_str())
            .collect::<Vec<_>>(),
        ["q0", "q1"]
    );
    for g in trained_on {
        let labels: Vec<bool> = g.responses.iter().map(|r| r.from_student).collect();
        assert_eq!(labels, [true, true, false]);
        assert_eq!(g.responses[2].text, "red", "the teacher's answer as text");
    }
    let metrics = coordinator.metrics.lock().unwrap()[0].1.clone();
    assert_eq!(metrics["d_train_items"], 6.0);
    assert_eq!((metrics["d_step"], metrics["d_train_loss"]), (1.0, 0.5));
    assert_eq!(metrics["d_train_failed"], 0.0);
    assert_eq!(service.progress().borrow().discriminator_failed, None);

    // D down: the policy trains on and publishes, and the step says D's update was lost.
    discriminator.down.store(true, Ordering::SeqCst);
    let next: Vec<IncomingGroup> = groups[2..4]
        .iter()
        .map(|g| {
            let mut g = g.clone();
            g.iteration = 1;
            for r in &mut g.responses {
                if r.source == ResponseSource::Student {
                    r.policy_version = 1;
                }
            }
            g
        })
        .collect();
    for g in next {
        assert!(service.push_group(g).await.accepted);
    }
    wait_for_version(&service, 2).await;
    ril_common::wait::wait_until(
        "the second step's metrics",
        Duration::from_secs(30),
        || async { coordinator.metrics.lock().unwrap().len() >= 2 },
    )
    .await;
    let metrics = coordinator.metrics.lock().unwrap()[1].1.clone();
    assert_eq!(metrics["d_train_failed"], 1.0);
    assert!(!metrics.contains_key("d_train_loss"));
    // ... and so does the learner's progress, which its health shows
    // (`ril.v1.Learner/discriminator` NOT_SERVING).
    let failed = service.progress().borrow().discriminator_failed.clone();
    assert!(
        failed
            .as_deref()
            .is_some_and(|e| e.contains("down (injected)")),
        "{failed:?}"
    );
}

/// Rank 0 of two keeps every other group (in position order) and sends the rest, in wire form
/// with the prompt it rendered, to rank 1; a rank that fails stops the learner, naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rank_0_sends_the_other_rank_its_shard_and_stops_when_that_rank_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let init = tiny_model(tmp.path(), "init", 8);
    let opts = LearnerOptions {
        world_size: 2,
        ..options(&init, &tmp.path().join("out"))
    };
    let world_of_two = || Box::new(MirroredRanks { rank: 0, world: 2 });
    let ranks = FakeRanks::default();
    let peers = Peers {
        ranks: Some(Arc::new(ranks.clone())),
        ..Peers::default()
    };
    let (service, link) = start_with(&opts, world_of_two(), peers);
    let groups = groups(&init);
    // Pushed out of order: the shards follow positions, not arrival.
    assert!(service.push_group(groups[1].clone()).await.accepted);
    assert!(service.push_group(groups[0].clone()).await.accepted);
    wait_for_version(&service, 1).await;
    {
        let shards = ranks.shards.lock().unwrap();
        assert_eq!(shards.len(), 1);
        let (rank, iteration, shard) = &shards[0];
        assert_eq!((*rank, *iteration), (1, 0));
        assert_eq!(
            shard.iter().map(|g| g.position).collect::<Vec<_>>(),
            [1],
            "group 0 stays on rank 0, group 1 goes to rank 1"
        );
        assert!(
            !shard[0].prompt_ids.is_empty(),
            "the prompt rank 0 rendered"
        );
        assert!(shard[0].timings_ms.is_empty());
    }
    assert_eq!(link.published.lock().unwrap().len(), 1);

    let failing = FakeRanks {
        fail: true,
        ..FakeRanks::default()
    };
    let peers = Peers {
        ranks: Some(Arc::new(failing)),
        ..Peers::default()
    };
    let (service, link) = start_with(&opts, world_of_two(), peers);
    assert!(service.push_group(groups[0].clone()).await.accepted);
    assert!(service.push_group(groups[1].clone()).await.accepted);
    let mut rx = service.progress();
    tokio::time::timeout(
        Duration::from_secs(120),
        rx.wait_for(|p| p.failed.is_some()),
    )
    .await
    .unwrap()
    .unwrap();
    let failure = service.failure().unwrap();
    assert!(
        matches!(*failure, LearnerError::PeerRank { rank: 1, .. }),
        "{failure}"
    );
    assert!(failure.to_string().contains("rank 1 is gone"), "{failure}");
    assert!(link.published.lock().unwrap().is_empty());
    assert_eq!(
        link.returned.lock().unwrap().len(),
        2,
        "the iteration's questions are handed back"
    );
}

/// The rank guards, as the gRPC adapter reports them: only rank 0 takes pushes (the others name
/// rank 0), a push holds groups, TrainShard goes to ranks > 0 and must match their iteration,
/// and a shard the rank's model refuses stops that rank.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_and_shards_reach_the_ranks_that_take_them() {
    let tmp = tempfile::tempdir().unwrap();
    let init = tiny_model(tmp.path(), "init", 9);
    let code = |e: LearnerError| ril_proto::error::status(&e).code();

    let (rank0, _) = start(&options(&init, &tmp.path().join("r0")));
    let e = rank0.push_groups(Vec::new()).await.unwrap_err();
    assert!(e.to_string().contains("no groups"), "{e}");
    assert_eq!(code(e), tonic::Code::InvalidArgument);
    let e = rank0.train_shard(0, Vec::new()).await.unwrap_err();
    assert_eq!(code(e), tonic::Code::FailedPrecondition);
    let mut bad = groups(&init).remove(0);
    bad.position = 5;
    bad.responses[0].token_ids[0] = u32::MAX;
    let malformed = Err(ril_learner::service::Rejection::new(
        6, "question", "missing",
    ));
    let verdicts = rank0.push_groups(vec![Ok(bad), malformed]).await.unwrap();
    assert_eq!(
        verdicts
            .iter()
            .map(|v| (v.position, v.accepted))
            .collect::<Vec<_>>(),
        [(5, false), (6, false)]
    );
    assert!(
        verdicts[1].reason.contains("field `question`"),
        "{verdicts:?}"
    );

    let rank1_options = LearnerOptions {
        rank: 1,
        world_size: 2,
        ..options(&init, &tmp.path().join("r1"))
    };
    let peers = Peers {
        rank0_addr: Some("10.0.0.1:50054".into()),
        ..Peers::default()
    };
    let (rank1, _) = start_with(
        &rank1_options,
        Box::new(MirroredRanks { rank: 1, world: 2 }),
        peers,
    );
    let e = rank1
        .push_groups(vec![Ok(groups(&init).remove(0))])
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("push to rank 0 at 10.0.0.1:50054"),
        "{e}"
    );
    assert_eq!(code(e), tonic::Code::FailedPrecondition);
    let e = rank1.train_shard(3, Vec::new()).await.unwrap_err();
    assert!(e.to_string().contains("a shard of iteration 3"), "{e}");
    assert_eq!(code(e), tonic::Code::FailedPrecondition);
    let mut refused = groups(&init).remove(0);
    refused.responses.clear();
    let e = rank1.train_shard(0, vec![refused]).await.unwrap_err();
    assert!(e.to_string().contains("field `responses`"), "{e}");
    assert!(rank1.failure().is_some());
    let e = rank1.train_shard(0, Vec::new()).await.unwrap_err();
    assert!(e.to_string().contains("stopped after a failed"), "{e}");
    assert_eq!(code(e), tonic::Code::Aborted);
}

/// The coordinator commits a group but its answer is lost (twice): the learner asks again, gets
/// the first answer, and buffers the group; the same group pushed again (an actor that lost
/// the PushGroups answer) is refused as already buffered, so the iteration trains on its two
/// distinct groups.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ambiguous_commit_is_asked_again_and_its_group_trained_once() {
    let tmp = tempfile::tempdir().unwrap();
    let init = tiny_model(tmp.path(), "init", 3);
    let groups = groups(&init);
    let (service, link) = start(&options(&init, &tmp.path().join("out")));
    link.lose_answers.store(2, Ordering::SeqCst);
    let verdict = service.push_group(groups[0].clone()).await;
    assert!(verdict.accepted, "{verdict:?}");
    assert_eq!(link.accept_calls.load(Ordering::SeqCst), 3);
    // The same group again (an actor that lost the PushGroups answer): refused as already
    // buffered, before any commit; it stays buffered once.
    let calls = link.accept_calls.load(Ordering::SeqCst);
    let again = service.push_group(groups[0].clone()).await;
    assert!(
        !again.accepted && again.reason.contains("already buffered"),
        "{again:?}"
    );
    assert_eq!(link.accept_calls.load(Ordering::SeqCst), calls);
    {
        let progress = service.progress();
        let p = progress.borrow();
        assert!(
            !p.training && p.version == 0 && p.groups_buffered == 1,
            "one group of two is buffered, the repeat did not fill the iteration: {p:?}"
        );
    }
    let second = service.push_group(groups[1].clone()).await;
    assert!(second.accepted, "{second:?}");
    wait_for_version(&service, 1).await;
    assert_eq!(link.accepted.lock().unwrap().len(), 2);
    assert!(link.returned.lock().unwrap().is_empty());
}

/// A coordinator that stays unreachable past `commit_deadline_ms`: the learner asked again
/// until then, and stops with the error naming the coordinator and the call (the group may
/// be committed; going on would lose it silently).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_unreachable_past_the_commit_deadline_stops_the_learner_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let init = tiny_model(tmp.path(), "init", 3);
    let groups = groups(&init);
    let mut opts = options(&init, &tmp.path().join("out"));
    opts.commit_deadline_ms = 400;
    let (service, link) = start(&opts);
    link.down.store(true, Ordering::SeqCst);
    let verdict = service.push_group(groups[0].clone()).await;
    assert!(
        !verdict.accepted
            && verdict.reason.contains("AcceptGroup")
            && verdict.reason.contains("stops"),
        "{verdict:?}"
    );
    assert!(
        link.accept_calls.load(Ordering::SeqCst) >= 3,
        "it asked again"
    );
    let failed = service
        .progress()
        .borrow()
        .failed
        .clone()
        .expect("the learner stopped");
    assert!(
        failed.contains("coordinator at fake") && failed.contains("AcceptGroup"),
        "{failed}"
    );
    link.down.store(false, Ordering::SeqCst);
    let later = service.push_group(groups[1].clone()).await;
    assert!(
        !later.accepted,
        "a stopped learner takes no more groups: {later:?}"
    );
}

/// Handing a question back while the coordinator is briefly down: the learner asks again until
/// it gets through (here at shutdown, which hands its buffered groups back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_question_handed_back_while_the_coordinator_is_down_gets_through_when_it_is_back() {
    let tmp = tempfile::tempdir().unwrap();
    let init = tiny_model(tmp.path(), "init", 3);
    let groups = groups(&init);
    let (service, link) = start(&options(&init, &tmp.path().join("out")));
    assert!(service.push_group(groups[0].clone()).await.accepted);
    link.down.store(true, Ordering::SeqCst);
    let back = link.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(600)).await;
        back.down.store(false, Ordering::SeqCst);
    });
    service.shutdown().await.unwrap();
    let returned = link.returned.lock().unwrap().clone();
    assert_eq!(returned.len(), 1, "{returned:?}");
    assert_eq!(returned[0].0, 0);
    assert!(returned[0].1.contains("shutting down"), "{returned:?}");
    assert_eq!(service.progress().borrow().failed, None);
}

/// The coordinator is down when a step finishes: the learner publishes the version once it is
/// back (it used to give up after ~6 s, leaving the actors waiting for it for ever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_is_published_once_the_coordinator_is_back() {
    let tmp = tempfile::tempdir().unwrap();
    let init = tiny_model(tmp.path(), "init", 3);
    let groups = groups(&init);
    let (service, link) = start(&options(&init, &tmp.path().join("out")));
    // PublishVersion fails until it has been refused 8 times, more than the 5 attempts the
    // learner used to make before giving up.
    link.publish_down.store(true, Ordering::SeqCst);
    assert!(service.push_group(groups[0].clone()).await.accepted);
    assert!(service.push_group(groups[1].clone()).await.accepted);
    ril_common::wait::wait_until(
        "8 refused PublishVersion calls",
        Duration::from_secs(60),
        || {
            let refusals = link.publish_refusals.load(Ordering::SeqCst);
            async move { refusals >= 8 }
        },
    )
    .await;
    assert!(link.published.lock().unwrap().is_empty());
    link.publish_down.store(false, Ordering::SeqCst);
    ril_common::wait::wait_until("version 1 published", Duration::from_secs(60), || {
        let published = link.published.lock().unwrap().len();
        async move { published == 1 }
    })
    .await;
    assert_eq!(link.published.lock().unwrap()[0].0, 1);
    assert_eq!(service.progress().borrow().failed, None);
}

/// A checkpoint that cannot be written (its staging path taken by a file, as a disk that fails
/// the write would): the step fails with an error naming the path, nothing is published, the
/// iteration's question goes back, and the previous checkpoint is intact and loads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_that_cannot_be_written_stops_the_learner_and_keeps_the_previous_one() {
    let tmp = tempfile::tempdir().unwrap();
    let init = tiny_model(tmp.path(), "init", 5);
    let out = tmp.path().join("out");
    let mut opts = options(&init, &out);
    opts.questions_per_iteration = 1;
    opts.save_every = 1;
    let (service, link) = start(&opts);
    let groups = groups(&init);
    let mut first = groups[0].clone();
    first.iteration = 0;
    assert!(service.push_group(first).await.accepted);
    wait_for_version(&service, 1).await;
    let previous = checkpoint_dir(&out, 1);
    let state_before = std::fs::read(previous.join("trainer_state.json")).unwrap();

    let blocked = out.join(".checkpoint-000002.tmp");
    std::fs::write(&blocked, "in the way").unwrap();
    let mut second = groups[1].clone();
    second.iteration = 1;
    for r in &mut second.responses {
        if r.source == ResponseSource::Student {
            r.policy_version = 1;
        }
    }
    assert!(service.push_group(second).await.accepted);
    let mut rx = service.progress();
    let failed = tokio::time::timeout(
        Duration::from_secs(120),
        rx.wait_for(|p| p.failed.is_some()),
    )
    .await
    .unwrap()
    .unwrap()
    .failed
    .clone()
    .unwrap();
    assert!(failed.contains(&blocked.display().to_string()), "{failed}");
    assert_eq!(service.current_version(), 1, "nothing was published");
    assert!(link.returned.lock().unwrap().iter().any(|(p, _)| *p == 1));
    assert!(!checkpoint_dir(&out, 2).exists());
    assert_eq!(
        std::fs::read(previous.join("trainer_state.json")).unwrap(),
        state_before
    );
    let listed = ril_learner::trainer::list_checkpoints(&out).unwrap();
    assert_eq!(listed.iter().map(|(v, _)| *v).collect::<Vec<_>>(), [1]);
}
