//! The actor's phases against in-process fake peers (no sockets): registration retried while
//! the coordinator is not ready, weights fetched only when a lease needs a newer version and
//! applied whole, teacher and discriminator replies checked (a failing question goes back),
//! the pushed group's layout and rewards, the learner's verdicts counted, the lease completed
//! with the returned positions, heartbeats, and shutdown finishing the lease in progress.

use std::collections::{BTreeSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use candle_core::{DType, Device};
use ril_actor::convert::ConvertError;
use ril_actor::peers::{
    Coordinator, Discriminator, GroupVerdict, HeartbeatReply, Learner, Lease, LeaseCompletion,
    LeaseItem, LeaseReply, LeaseRequest, Registration, ResponseScore, ResponseSource,
    RolloutSettings, ScoredGroup, Teacher, TeacherAnswer, UnreadableItem,
};
use ril_actor::sync::WeightPayload;
use ril_actor::{Actor, ActorError, ActorOptions, Peers, register};
use ril_common::SamplingParams;
use ril_data::Row;
use ril_data::dataset::Message;
use ril_model::bundle::Bundle;
use ril_model::checkpoint::{safetensors_bytes, weights_bytes};
use ril_model::image::{ImageProcessor, ImageProcessorConfig};
use ril_model::{Head, LlavaConfig, Vlm};
use ril_proto::error::RpcError;

type Log<T> = Arc<Mutex<Vec<T>>>;

fn unavailable(peer: &'static str, call: &'static str) -> ActorError {
    ActorError::Rpc(RpcError::local(
        peer,
        "fake",
        call,
        tonic::Code::Unavailable,
        "not ready",
    ))
}

/// Scripted replies; records what the actor asked.
#[derive(Clone, Default)]
struct FakeCoordinator {
    /// How many registrations are answered Unavailable before one is accepted.
    unavailable_registrations: Arc<AtomicUsize>,
    registrations: Arc<AtomicUsize>,
    heartbeat_replies: Arc<Mutex<VecDeque<HeartbeatReply>>>,
    heartbeats: Log<Option<u64>>,
    /// Granted in order; then `Finished`, or `Wait` when `wait_when_empty`.
    leases: Arc<Mutex<VecDeque<Lease>>>,
    wait_when_empty: bool,
    lease_requests: Log<LeaseRequest>,
    completions: Log<LeaseCompletion>,
    /// Set when a lease is handed out (a shutdown arriving mid-lease).
    stop_on_lease: Option<Arc<AtomicBool>>,
    /// How many LeasePrompts / CompleteLease calls take effect but lose their reply (the
    /// actor sees UNAVAILABLE); usize::MAX: every call fails.
    lost_replies: Arc<AtomicUsize>,
    /// The same for CompleteLease alone.
    lost_completions: Arc<AtomicUsize>,
    /// The latest lease request's key and the lease granted for it (a repeat gets it again,
    /// as from the coordinator).
    last_grant: Arc<Mutex<Option<(String, Lease)>>>,
}

impl FakeCoordinator {
    /// Whether this call's reply is lost.
    fn lose_reply(counter: &AtomicUsize) -> bool {
        counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| match n {
                0 => None,
                usize::MAX => Some(usize::MAX),
                n => Some(n - 1),
            })
            .is_ok()
    }
}

impl Coordinator for FakeCoordinator {
    async fn register(&self, _actor_id: &str, _device: &str) -> Result<Registration, ActorError> {
        self.registrations.fetch_add(1, Ordering::SeqCst);
        let left = self.unavailable_registrations.load(Ordering::SeqCst);
        if left > 0 {
            self.unavailable_registrations
                .store(left - 1, Ordering::SeqCst);
            return Err(unavailable("coordinator", "RegisterActor"));
        }
        Ok(Registration {
            run_id: "run".into(),
            learner_addr: "learner:1".into(),
            discriminator_addr: "discriminator:2".into(),
            teacher_addrs: vec!["teacher-a:3".into()],
            settings: settings(),
        })
    }

    async fn heartbeat(
        &self,
        _actor_id: &str,
        policy_version: Option<u64>,
    ) -> Result<HeartbeatReply, ActorError> {
        self.heartbeats.lock().unwrap().push(policy_version);
        let reply = self.heartbeat_replies.lock().unwrap().pop_front();
        Ok(reply.unwrap_or(HeartbeatReply {
            known: true,
            run_finished: false,
        }))
    }

    async fn lease(&self, request: &LeaseRequest) -> Result<LeaseReply, ActorError> {
        self.lease_requests.lock().unwrap().push(request.clone());
        let repeat = self
            .last_grant
            .lock()
            .unwrap()
            .clone()
            .filter(|(key, _)| *key == request.request_id)
            .map(|(_, lease)| lease);
        let next = repeat.or_else(|| self.leases.lock().unwrap().pop_front());
        if let Some(lease) = &next {
            *self.last_grant.lock().unwrap() = Some((request.request_id.clone(), lease.clone()));
        }
        if Self::lose_reply(&self.lost_replies) {
            return Err(unavailable("coordinator", "LeasePrompts"));
        }
        Ok(match next {
            Some(lease) => {
                if let Some(stop) = &self.stop_on_lease {
                    stop.store(true, Ordering::SeqCst);
                }
                LeaseReply::Granted(lease)
            }
            None if self.wait_when_empty => LeaseReply::Wait {
                retry_after: Duration::from_millis(10),
            },
            None => LeaseReply::Finished,
        })
    }

    async fn complete_lease(&self, completion: &LeaseCompletion) -> Result<(), ActorError> {
        self.completions.lock().unwrap().push(completion.clone());
        if Self::lose_reply(&self.lost_replies) || Self::lose_reply(&self.lost_completions) {
            return Err(unavailable("coordinator", "CompleteLease"));
        }
        Ok(())
    }
}

/// Serves queued weight payloads (the last one stays); takes or refuses pushed groups.
#[derive(Clone, Default)]
struct FakeLearner {
    weights: Arc<Mutex<VecDeque<WeightPayload>>>,
    fetches: Arc<AtomicUsize>,
    pushed: Log<ScoredGroup>,
    refuse: Arc<Mutex<BTreeSet<u64>>>,
    fail_push: Arc<AtomicBool>,
}

impl Learner for FakeLearner {
    fn addr(&self) -> &str {
        "learner:1"
    }

    async fn fetch_weights(&self) -> Result<WeightPayload, ActorError> {
        self.fetches.fetch_add(1, Ordering::SeqCst);
        let mut queue = self.weights.lock().unwrap();
        let payload = if queue.len() > 1 {
            queue.pop_front()
        } else {
            queue.front().cloned()
        };
        payload.ok_or_else(|| unavailable("learner", "GetWeights"))
    }

    async fn push_groups(&self, groups: Vec<ScoredGroup>) -> Result<Vec<GroupVerdict>, ActorError> {
        if self.fail_push.load(Ordering::SeqCst) {
            return Err(unavailable("learner", "PushGroups"));
        }
        let refuse = self.refuse.lock().unwrap().clone();
        let verdicts = groups
            .iter()
            .map(|g| GroupVerdict {
                position: g.position,
                refused: refuse
                    .contains(&g.position)
                    .then(|| "a duplicate".to_string()),
            })
            .collect();
        self.pushed.lock().unwrap().extend(groups);
        Ok(verdicts)
    }
}

/// Answers `n - short_by` answers, last index first (the actor puts them in order).
#[derive(Clone)]
struct FakeTeacher {
    name: &'static str,
    addr: &'static str,
    short_by: usize,
    asked: Log<usize>,
    /// Answer fails (UNAVAILABLE) while set.
    down: Arc<AtomicBool>,
}

impl FakeTeacher {
    fn new(name: &'static str, addr: &'static str) -> Self {
        Self {
            name,
            addr,
            short_by: 0,
            asked: Log::default(),
            down: Arc::default(),
        }
    }
}

impl Teacher for FakeTeacher {
    fn addr(&self) -> &str {
        self.addr
    }

    async fn answers(
        &self,
        _question: &Row,
        n: usize,
        _sampling: Option<&SamplingParams>,
    ) -> Result<Vec<TeacherAnswer>, ActorError> {
        self.asked.lock().unwrap().push(n);
        if self.down.load(Ordering::SeqCst) {
            return Err(ActorError::Rpc(RpcError::local(
                "teacher",
                self.addr,
                "Answer",
                tonic::Code::Unavailable,
                "down (injected)",
            )));
        }
        Ok((0..n.saturating_sub(self.short_by))
            .rev()
            .map(|i| TeacherAnswer {
                teacher: self.name.to_string(),
                index: i as u32,
                text: format!("{} says red ({i})", self.name),
            })
            .collect())
    }
}

/// Response i gets D's 0.25 when i is even (r_sim 1), 0.75 when odd; the judge's 1 when i is a
/// multiple of 3.
#[derive(Clone, Default)]
struct FakeDiscriminator {
    one_short: bool,
    scored: Log<Vec<String>>,
}

impl Discriminator for FakeDiscriminator {
    fn addr(&self) -> &str {
        "discriminator:2"
    }

    async fn score(
        &self,
        _question: &Row,
        responses: &[String],
    ) -> Result<Vec<ResponseScore>, ActorError> {
        self.scored.lock().unwrap().push(responses.to_vec());
        let mut scores: Vec<ResponseScore> = (0..responses.len())
            .map(|i| ResponseScore {
                d_prob: if i % 2 == 0 { 0.25 } else { 0.75 },
                answer_score: if i % 3 == 0 { 1.0 } else { 0.0 },
            })
            .collect();
        if self.one_short {
            scores.pop();
        }
        Ok(scores)
    }
}

fn settings() -> RolloutSettings {
    RolloutSettings {
        group_size: 3,
        teacher_slots: 3,
        student_sampling: SamplingParams::paper(6, 0),
        teacher_sampling: None,
        heartbeat_interval: Duration::from_millis(50),
    }
}

fn row(position: u64) -> Row {
    Row {
        id: format!("q{position}"),
        images: Vec::new(),
        messages: vec![Message {
            role: "user".into(),
            content: serde_json::Value::String("What colour is the square?".into()),
        }],
        answer: "red".into(),
        answer_type: None,
        teacher_answers: Default::default(),
        family: None,
        extra: Default::default(),
    }
}

fn lease(id: &str, policy_version: u64, positions: &[u64]) -> Lease {
    Lease {
        lease_id: id.into(),
        policy_version,
        items: positions
            .iter()
            .map(|&p| LeaseItem {
                position: p,
                iteration: p / 2,
                question: row(p),
            })
            .collect(),
        unreadable: Vec::new(),
    }
}

/// A test-size student saved in a temporary directory, and weight payloads for it.
struct Student {
    dir: tempfile::TempDir,
    config: LlavaConfig,
}

impl Student {
    fn new() -> Self {
        let tokenizer = ril_model::tokenizer::byte_level_chatml().unwrap();
        let image_id = tokenizer.token_id("<image>").unwrap();
        let config = LlavaConfig::for_tests(tokenizer.vocab_size(), image_id);
        let dir = tempfile::tempdir().unwrap();
        Bundle {
            model: Self::model(&config, 1),
            tokenizer,
            processor: ImageProcessor::new(ImageProcessorConfig::clip(16)).unwrap(),
        }
        .save(&dir.path().join("student"))
        .unwrap();
        Self { dir, config }
    }

    fn model(config: &LlavaConfig, seed: u64) -> Vlm {
        Vlm::new_random(config, Head::LanguageModel, &Device::Cpu, DType::F32, seed).unwrap()
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("student")
    }

    fn bundle(&self) -> Bundle {
        Bundle::load(&self.path(), Head::LanguageModel, &Device::Cpu, DType::F32).unwrap()
    }

    /// The learner's weights at `version` (a different random model per version).
    fn weights(&self, version: u64) -> WeightPayload {
        let bytes = weights_bytes(&Self::model(&self.config, 100 + version)).unwrap();
        WeightPayload {
            version,
            bytes,
            sha256: [0; 32],
        }
    }

    /// Weights at `version` whose last tensor has the wrong shape: a partial load would
    /// change every tensor before it.
    fn bad_weights(&self, version: u64) -> WeightPayload {
        let good = self.weights(version);
        let mut tensors: std::collections::BTreeMap<_, _> =
            candle_core::safetensors::load_buffer(&good.bytes, &Device::Cpu)
                .unwrap()
                .into_iter()
                .collect();
        let last = tensors.keys().next_back().unwrap().clone();
        tensors.insert(
            last,
            candle_core::Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
        );
        WeightPayload {
            bytes: safetensors_bytes(&tensors, None).unwrap(),
            ..good
        }
    }
}

struct Fakes {
    coordinator: Arc<FakeCoordinator>,
    learner: FakeLearner,
    discriminator: FakeDiscriminator,
    teachers: Vec<FakeTeacher>,
}

impl Fakes {
    fn new(student: &Student, leases: Vec<Lease>) -> Self {
        let learner = FakeLearner::default();
        learner
            .weights
            .lock()
            .unwrap()
            .push_back(student.weights(1));
        Self {
            coordinator: Arc::new(FakeCoordinator {
                leases: Arc::new(Mutex::new(leases.into())),
                ..Default::default()
            }),
            learner,
            discriminator: FakeDiscriminator::default(),
            teachers: vec![
                FakeTeacher::new("big", "teacher-a:3"),
                FakeTeacher::new("small", "teacher-b:4"),
            ],
        }
    }

    fn actor(
        &self,
        student: &Student,
        stop: Arc<AtomicBool>,
    ) -> Actor<FakeCoordinator, FakeLearner, FakeDiscriminator, FakeTeacher> {
        self.actor_with(student, settings(), stop)
    }

    fn actor_with(
        &self,
        student: &Student,
        settings: RolloutSettings,
        stop: Arc<AtomicBool>,
    ) -> Actor<FakeCoordinator, FakeLearner, FakeDiscriminator, FakeTeacher> {
        self.build(student, settings, stop, |_| {})
    }

    /// An actor whose options `configure` changes.
    fn actor_configured(
        &self,
        student: &Student,
        configure: impl FnOnce(&mut ActorOptions),
    ) -> Actor<FakeCoordinator, FakeLearner, FakeDiscriminator, FakeTeacher> {
        self.build(student, settings(), no_stop(), configure)
    }

    fn build(
        &self,
        student: &Student,
        settings: RolloutSettings,
        stop: Arc<AtomicBool>,
        configure: impl FnOnce(&mut ActorOptions),
    ) -> Actor<FakeCoordinator, FakeLearner, FakeDiscriminator, FakeTeacher> {
        let mut options = ActorOptions {
            // Long enough for a stale version to be fetched again, short for the test of one
            // that stays stale.
            weight_timeout: Duration::from_millis(500),
            ..ActorOptions::new("actor-1".into(), "fake".into(), student.path())
        };
        configure(&mut options);
        let peers = Peers {
            coordinator: self.coordinator.clone(),
            learner: self.learner.clone(),
            discriminator: self.discriminator.clone(),
            teachers: self.teachers.clone(),
        };
        Actor::new(options, settings, student.bundle(), peers, stop)
    }

    fn completions(&self) -> Vec<(String, Vec<u64>)> {
        let completions = self.coordinator.completions.lock().unwrap();
        completions
            .iter()
            .map(|c| (c.lease_id.clone(), c.returned_positions.clone()))
            .collect()
    }
}

fn no_stop() -> Arc<AtomicBool> {
    Arc::new(AtomicBool::new(false))
}

#[tokio::test]
async fn registration_is_retried_while_the_coordinator_is_unavailable() {
    let coordinator = FakeCoordinator::default();
    coordinator
        .unavailable_registrations
        .store(2, Ordering::SeqCst);
    let opts = ActorOptions::new("actor-1".into(), "fake".into(), PathBuf::from("unused"));
    let registration = register(&coordinator, &opts, &AtomicBool::new(false))
        .await
        .unwrap()
        .expect("registered");
    assert_eq!(coordinator.registrations.load(Ordering::SeqCst), 3);
    assert_eq!(registration.settings, settings());

    // Not past the register timeout: the last Unavailable is the error.
    coordinator
        .unavailable_registrations
        .store(1, Ordering::SeqCst);
    let impatient = ActorOptions {
        register_timeout: Duration::ZERO,
        ..opts.clone()
    };
    let e = register(&coordinator, &impatient, &AtomicBool::new(false))
        .await
        .unwrap_err();
    assert!(
        e.is_unavailable() && e.to_string().contains("RegisterActor"),
        "{e}"
    );

    // Asked to stop first: no registration at all.
    let before = coordinator.registrations.load(Ordering::SeqCst);
    let stopped = register(&coordinator, &opts, &AtomicBool::new(true)).await;
    assert!(stopped.unwrap().is_none());
    assert_eq!(coordinator.registrations.load(Ordering::SeqCst), before);
}

#[tokio::test]
async fn weights_are_fetched_only_when_the_lease_needs_a_newer_version() {
    let student = Student::new();
    let fakes = Fakes::new(
        &student,
        vec![
            lease("L1", 1, &[0]),
            lease("L2", 1, &[1]),
            lease("L3", 2, &[2]),
        ],
    );
    // For the third lease the learner serves version 1 once more before version 2.
    fakes
        .learner
        .weights
        .lock()
        .unwrap()
        .extend([student.weights(1), student.weights(2)]);
    let summary = fakes.actor(&student, no_stop()).run().await.unwrap();

    assert_eq!(fakes.learner.fetches.load(Ordering::SeqCst), 3);
    assert_eq!(summary.weight_syncs, 2);
    assert_eq!(summary.final_version, 2);
    let reported: Vec<Option<u64>> = fakes
        .coordinator
        .lease_requests
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.policy_version)
        .collect();
    assert_eq!(reported, [None, Some(1), Some(1), Some(2)]);
    let sampled_with: Vec<u64> = fakes
        .learner
        .pushed
        .lock()
        .unwrap()
        .iter()
        .map(|g| g.responses[0].policy_version)
        .collect();
    assert_eq!(sampled_with, [1, 1, 2]);
    assert_eq!(summary.leases, 3);
    for phase in [
        "lease",
        "weight_sync",
        "generation",
        "teacher",
        "scoring",
        "push",
    ] {
        assert!(
            summary.phase_ms.contains_key(phase),
            "{phase}: {:?}",
            summary.phase_ms
        );
    }
}

#[tokio::test]
async fn a_refused_payload_leaves_the_previous_weights_whole() {
    let student = Student::new();
    let fakes = Fakes::new(&student, Vec::new());
    let greedy = RolloutSettings {
        student_sampling: SamplingParams::greedy(6),
        teacher_slots: 0,
        ..settings()
    };
    let mut actor = fakes.actor_with(&student, greedy, no_stop());
    assert_eq!(actor.sync_weights(1).await.unwrap(), 1);
    let item = lease("L1", 1, &[0]).items.remove(0);
    let before = actor.roll_out(&item, 1).await.unwrap();

    *fakes.learner.weights.lock().unwrap() = [student.bad_weights(2)].into();
    let e = actor.sync_weights(2).await.unwrap_err().to_string();
    assert!(e.contains("<weights v2>"), "{e}");
    assert_eq!(actor.policy_version(), Some(1));
    let after = actor.roll_out(&item, 1).await.unwrap();
    assert_eq!(after.student.prompt_ids, before.student.prompt_ids);
    for (a, b) in after
        .student
        .generations
        .iter()
        .zip(&before.student.generations)
    {
        assert_eq!(a.token_ids, b.token_ids);
    }

    // The comparison sees weights change: the good version 2 samples differently.
    *fakes.learner.weights.lock().unwrap() = [student.weights(2)].into();
    assert_eq!(actor.sync_weights(2).await.unwrap(), 2);
    let changed = actor.roll_out(&item, 2).await.unwrap();
    assert!(
        changed
            .student
            .generations
            .iter()
            .zip(&before.student.generations)
            .any(|(a, b)| a.token_ids != b.token_ids)
    );

    // A version older than the lease needs, for longer than the weight timeout, is an error
    // naming both versions.
    let e = actor.sync_weights(3).await.unwrap_err().to_string();
    assert!(e.contains("serves version 2 but the lease needs 3"), "{e}");
}

#[tokio::test]
async fn a_pushed_group_is_g_student_responses_then_the_teacher_slots_with_rewards() {
    let student = Student::new();
    let fakes = Fakes::new(&student, vec![lease("L1", 1, &[4])]);
    let summary = fakes.actor(&student, no_stop()).run().await.unwrap();
    assert_eq!((summary.groups_pushed, summary.groups_refused), (1, 0));

    let pushed = fakes.learner.pushed.lock().unwrap();
    let group = &pushed[0];
    assert_eq!((group.lease_id.as_str(), group.position), ("L1", 4));
    assert_eq!((group.iteration, group.actor_id.as_str()), (2, "actor-1"));
    assert_eq!(group.question, row(4));
    assert!(!group.prompt_token_ids.is_empty());
    // Three slots over two teachers: two from the first, one from the second, in index order.
    let sources: Vec<ResponseSource> = group.responses.iter().map(|r| r.source.clone()).collect();
    let teacher = |name: &str| ResponseSource::Teacher { name: name.into() };
    assert_eq!(
        sources,
        [
            ResponseSource::Student,
            ResponseSource::Student,
            ResponseSource::Student,
            teacher("big"),
            teacher("big"),
            teacher("small"),
        ]
    );
    assert_eq!(*fakes.teachers[0].asked.lock().unwrap(), [2]);
    assert_eq!(*fakes.teachers[1].asked.lock().unwrap(), [1]);
    let texts: Vec<&str> = group.responses[3..]
        .iter()
        .map(|r| r.text.as_str())
        .collect();
    assert_eq!(
        texts,
        ["big says red (0)", "big says red (1)", "small says red (0)"]
    );
    // D saw the responses in the group's order.
    let scored = fakes.discriminator.scored.lock().unwrap();
    let group_texts: Vec<&String> = group.responses.iter().map(|r| &r.text).collect();
    assert_eq!(scored[0].iter().collect::<Vec<_>>(), group_texts);

    let bundle = student.bundle();
    for (i, r) in group.responses.iter().enumerate() {
        assert_eq!(r.d_prob, if i % 2 == 0 { 0.25 } else { 0.75 });
        assert_eq!(r.r_sim, if i % 2 == 0 { 1.0 } else { 0.0 }, "response {i}");
        assert_eq!(r.r_ans, if i % 3 == 0 { 1.0 } else { 0.0 }, "response {i}");
        assert_eq!(r.policy_version, 1);
        if r.source == ResponseSource::Student {
            assert_eq!(r.behaviour_logprobs.len(), r.token_ids.len());
        } else {
            assert!(r.behaviour_logprobs.is_empty() && !r.truncated);
            let ids = ril_prompt::answer_ids(&bundle.tokenizer, &r.text).unwrap();
            assert_eq!(r.token_ids, ids);
        }
    }
    for phase in ["generation", "teacher", "scoring"] {
        assert!(
            group.timings_ms.contains_key(phase),
            "{:?}",
            group.timings_ms
        );
    }
    assert_eq!(fakes.completions(), [("L1".to_string(), vec![])]);
}

/// Why the group of a one-question lease could not be made, with version 1's weights.
async fn group_error(fakes: &Fakes, student: &Student) -> String {
    let mut actor = fakes.actor(student, no_stop());
    actor.sync_weights(1).await.unwrap();
    let the_lease = lease("L0", 1, &[0]);
    let error = actor.scored_group(&the_lease, &the_lease.items[0], 1).await;
    error.unwrap_err().to_string()
}

#[tokio::test]
async fn a_teacher_short_of_answers_sends_the_question_back_naming_the_teacher() {
    let student = Student::new();
    let mut fakes = Fakes::new(&student, vec![lease("L1", 1, &[6])]);
    fakes.teachers[1].short_by = 1;
    assert_eq!(
        group_error(&fakes, &student).await,
        "teacher at teacher-b:4: sent 0 answers, 1 were asked for"
    );

    let summary = fakes.actor(&student, no_stop()).run().await.unwrap();
    assert_eq!(fakes.completions(), [("L1".to_string(), vec![6])]);
    assert_eq!(summary.positions_returned, 1);
    assert!(fakes.learner.pushed.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_discriminator_with_the_wrong_number_of_scores_sends_the_question_back() {
    let student = Student::new();
    let mut fakes = Fakes::new(&student, vec![lease("L1", 1, &[8, 9])]);
    fakes.discriminator.one_short = true;
    let summary = fakes.actor(&student, no_stop()).run().await.unwrap();
    assert_eq!(fakes.completions(), [("L1".to_string(), vec![8, 9])]);
    assert_eq!(summary.positions_returned, 2);
    assert_eq!(summary.groups_pushed, 0);
    assert_eq!(
        group_error(&fakes, &student).await,
        "discriminator at discriminator:2: 5 scores for 6 responses"
    );
}

#[tokio::test]
async fn verdicts_are_counted_and_returned_positions_complete_the_lease() {
    let student = Student::new();
    let mut with_unreadable = lease("L1", 1, &[10, 11]);
    with_unreadable.unreadable.push(UnreadableItem {
        position: 12,
        error: ConvertError {
            field: "items[2].question".into(),
            problem: "missing".into(),
        },
    });
    let fakes = Fakes::new(&student, vec![with_unreadable, lease("L2", 1, &[13, 14])]);
    fakes.learner.refuse.lock().unwrap().insert(11);
    let mut actor = fakes.actor(&student, no_stop());

    let first = actor.lease().await.unwrap().expect("a lease");
    actor.run_lease(first).await.unwrap();
    assert_eq!(fakes.completions(), [("L1".to_string(), vec![12])]);
    assert_eq!(
        (
            actor.summary().groups_pushed,
            actor.summary().groups_refused
        ),
        (1, 1)
    );

    // A push that fails hands every question of the lease back.
    fakes.learner.fail_push.store(true, Ordering::SeqCst);
    let second = actor.lease().await.unwrap().expect("a lease");
    actor.run_lease(second).await.unwrap();
    assert_eq!(fakes.completions()[1], ("L2".to_string(), vec![13, 14]));
    assert_eq!(actor.summary().positions_returned, 3);
    assert!(
        actor.lease().await.unwrap().is_none(),
        "the run is finished"
    );
}

#[tokio::test]
async fn a_lost_coordinator_reply_is_asked_again_with_the_same_key_and_answered_the_same() {
    let student = Student::new();
    let mut fakes = Fakes::new(&student, vec![lease("L1", 1, &[6])]);
    fakes.teachers[1].short_by = 1;
    // The first lease reply and the first completion reply are lost after taking effect.
    fakes.coordinator.lost_replies.store(1, Ordering::SeqCst);
    fakes
        .coordinator
        .lost_completions
        .store(1, Ordering::SeqCst);
    let summary = fakes.actor(&student, no_stop()).run().await.unwrap();

    let keys: Vec<String> = (fakes.coordinator.lease_requests.lock().unwrap().iter())
        .map(|r| r.request_id.clone())
        .collect();
    assert_eq!(keys.len(), 3, "{keys:?}");
    assert_eq!(keys[0], keys[1], "the repeat carries the same key");
    assert_ne!(keys[1], keys[2], "the next lease request has a new key");
    assert_eq!(summary.leases, 1, "one lease, not two");
    let completions = fakes.coordinator.completions.lock().unwrap().clone();
    assert_eq!(completions.len(), 2, "completed, then asked again");
    assert_eq!(completions[0], completions[1]);
    assert_eq!(completions[0].returned_positions, [6]);
    assert_eq!(
        completions[0].reason, "teacher at teacher-b:4: sent 0 answers, 1 were asked for",
        "the hand-back says why, naming the teacher"
    );
}

#[tokio::test]
async fn a_coordinator_that_never_answers_stops_the_actor_at_its_deadline_naming_the_call() {
    let student = Student::new();
    let fakes = Fakes::new(&student, vec![lease("L1", 1, &[6])]);
    fakes
        .coordinator
        .lost_replies
        .store(usize::MAX, Ordering::SeqCst);
    let actor = fakes.actor_configured(&student, |o| {
        o.coordinator_deadline = Duration::from_millis(600);
    });
    let started = std::time::Instant::now();
    let error = actor.run().await.unwrap_err().to_string();
    let waited = started.elapsed();
    assert!(
        error.starts_with("coordinator: LeasePrompts got no answer for 0 s (")
            && error.contains("coordinator_deadline_ms")
            && error.contains("not ready"),
        "{error}"
    );
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    let asked = fakes.coordinator.lease_requests.lock().unwrap().len();
    assert!(asked >= 3, "asked again with backoff ({asked} calls)");
}

/// A teacher that fails is benched: its question goes back naming it, the next questions get
/// all the teacher slots from the other teacher, and once the bench time (1 s after one
/// failure) is up the teacher is asked again and, serving, takes its share back.
#[tokio::test]
async fn a_failing_teacher_is_benched_while_the_other_fills_its_slots() {
    let student = Student::new();
    let leases = (0..4)
        .map(|i| lease(&format!("L{i}"), 1, &[10 + i]))
        .collect();
    let fakes = Fakes::new(&student, leases);
    fakes.teachers[1].down.store(true, Ordering::SeqCst);
    let mut actor = fakes.actor(&student, no_stop());
    for _ in 0..3 {
        let l = actor.lease().await.unwrap().expect("a lease");
        actor.run_lease(l).await.unwrap();
    }
    let completions = fakes.coordinator.completions.lock().unwrap().clone();
    assert_eq!(completions[0].returned_positions, [10]);
    assert!(
        completions[0].reason.contains("teacher-b:4") && completions[0].reason.contains("down"),
        "{}",
        completions[0].reason
    );
    assert!(
        completions[1..]
            .iter()
            .all(|c| c.returned_positions.is_empty())
    );
    // Slots 3: split 2 + 1 while both serve; 3 from teacher a alone while b is benched.
    assert_eq!(*fakes.teachers[0].asked.lock().unwrap(), [2, 3, 3]);
    assert_eq!(
        *fakes.teachers[1].asked.lock().unwrap(),
        [1],
        "benched: not asked"
    );
    assert_eq!(fakes.learner.pushed.lock().unwrap().len(), 2);
    // Back after the bench time.
    fakes.teachers[1].down.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let l = actor.lease().await.unwrap().expect("a lease");
    actor.run_lease(l).await.unwrap();
    assert_eq!(*fakes.teachers[1].asked.lock().unwrap(), [1, 1]);
    assert_eq!(fakes.teachers[0].asked.lock().unwrap().last(), Some(&2));
    assert_eq!(fakes.learner.pushed.lock().unwrap().len(), 3);
}

/// With every teacher benched the actor waits for the first to come back rather than handing
/// questions back as fast as it can lease them.
#[tokio::test]
async fn with_every_teacher_benched_the_actor_waits_for_the_first_back() {
    let student = Student::new();
    let leases = (0..2)
        .map(|i| lease(&format!("L{i}"), 1, &[20 + i]))
        .collect();
    let mut fakes = Fakes::new(&student, leases);
    fakes.teachers.truncate(1);
    fakes.teachers[0].down.store(true, Ordering::SeqCst);
    let mut actor = fakes.actor(&student, no_stop());
    let l = actor.lease().await.unwrap().expect("a lease");
    actor.run_lease(l).await.unwrap();
    let started = std::time::Instant::now();
    let l = actor.lease().await.unwrap().expect("a lease");
    actor.run_lease(l).await.unwrap();
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(900), "{waited:?}");
    assert_eq!(fakes.teachers[0].asked.lock().unwrap().len(), 2);
    let completions = fakes.coordinator.completions.lock().unwrap().clone();
    assert!(completions.iter().all(|c| c.returned_positions.len() == 1));
}

#[tokio::test]
async fn shutdown_finishes_the_lease_in_progress() {
    let student = Student::new();
    let stop = no_stop();
    let mut fakes = Fakes::new(&student, vec![lease("L1", 1, &[0]), lease("L2", 1, &[1])]);
    Arc::get_mut(&mut fakes.coordinator).unwrap().stop_on_lease = Some(stop.clone());
    let summary = fakes.actor(&student, stop).run().await.unwrap();

    assert_eq!(fakes.coordinator.lease_requests.lock().unwrap().len(), 1);
    assert_eq!(fakes.completions(), [("L1".to_string(), vec![])]);
    assert_eq!((summary.leases, summary.groups_pushed), (1, 1));
}

#[tokio::test]
async fn heartbeats_register_again_when_forgotten_and_end_a_finished_run() {
    let student = Student::new();
    let mut fakes = Fakes::new(&student, Vec::new());
    let coordinator = FakeCoordinator {
        wait_when_empty: true,
        ..Default::default()
    };
    coordinator.heartbeat_replies.lock().unwrap().extend([
        HeartbeatReply {
            known: false,
            run_finished: false,
        },
        HeartbeatReply {
            known: true,
            run_finished: true,
        },
    ]);
    fakes.coordinator = Arc::new(coordinator);
    let summary = tokio::time::timeout(
        Duration::from_secs(30),
        fakes.actor(&student, no_stop()).run(),
    )
    .await
    .expect("the run ends once a heartbeat says it is finished")
    .unwrap();

    assert_eq!(summary.leases, 0);
    assert_eq!(fakes.coordinator.registrations.load(Ordering::SeqCst), 1);
    let heartbeats = fakes.coordinator.heartbeats.lock().unwrap();
    assert_eq!(heartbeats[..2], [None, None]);
}
