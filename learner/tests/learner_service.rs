//! The learner service without gRPC, against an in-memory coordinator: a resumed learner
//! continues exactly, and bad groups are refused with the position and field before anything is
//! committed.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use ril_learner::Result;
use ril_learner::collective::SingleRank;
use ril_learner::grpo::ResponseSource;
use ril_learner::options::LearnerOptions;
use ril_learner::service::{
    Acceptance, CoordinatorLink, GroupKey, IncomingGroup, JoinReply, JoinRequest, LearnerService,
};
use ril_learner::trainer::{Trainer, TrainerState, checkpoint_dir};

type Shared<T> = Arc<Mutex<Vec<T>>>;

/// Accepts each position once; records what the learner tells it.
#[derive(Debug, Clone, Default)]
struct FakeCoordinator {
    accepted: Arc<Mutex<BTreeSet<u64>>>,
    returned: Shared<(u64, String)>,
    published: Shared<(u64, u64, Option<PathBuf>)>,
    metrics: Shared<(u64, BTreeMap<String, f64>)>,
}

impl CoordinatorLink for FakeCoordinator {
    async fn accept_group(&self, key: GroupKey) -> Result<Acceptance> {
        Ok(if self.accepted.lock().unwrap().insert(key.position) {
            Acceptance::Accepted
        } else {
            Acceptance::Refused(format!("position {} is a duplicate", key.position))
        })
    }
    async fn return_question(&self, position: u64, reason: String) -> Result<()> {
        self.accepted.lock().unwrap().remove(&position);
        self.returned.lock().unwrap().push((position, reason));
        Ok(())
    }
    async fn publish_version(
        &self,
        version: u64,
        iteration: u64,
        checkpoint: Option<PathBuf>,
    ) -> Result<()> {
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
