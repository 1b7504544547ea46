//! The actor's loop (DESIGN.md "One iteration"): lease, sync weights, sample G responses, fetch
//! teacher answers, score, push the scored group, ack the lease. Teacher answers are fetched
//! while the student samples.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use ril_model::Head;
use ril_model::bundle::Bundle;
use ril_model::checkpoint::{LoadOptions, load_weights_from_bytes};
use ril_model::generate::SamplingParams;
use ril_proto::client::Channel;
use ril_proto::v1;
use ril_proto::v1::coordinator_client::CoordinatorClient;
use ril_proto::v1::discriminator_client::DiscriminatorClient;
use ril_proto::v1::learner_client::LearnerClient;
use ril_proto::v1::teacher_client::TeacherClient;

use crate::error::ActorError;
use crate::rollout::{
    rewards, rollout_seed, sample_student, teacher_split, teacher_tokens, truncated,
};
use crate::sync;

/// How an actor runs; everything about the run itself comes from the coordinator.
#[derive(Debug, Clone)]
pub struct ActorOptions {
    /// Unique per actor process.
    pub actor_id: String,
    pub coordinator: String,
    /// The student checkpoint: its tokenizer, config and image processor (weights come from
    /// the learner).
    pub student: PathBuf,
    pub device: Device,
    pub questions_per_lease: u32,
    pub rpc_timeout: Duration,
    /// How long to keep registering while the coordinator is not ready.
    pub register_timeout: Duration,
    pub weight_timeout: Duration,
    pub weight_chunk_bytes: u32,
    pub weight_attempts: usize,
    /// Seeds the rollouts (with the position and policy version).
    pub seed: u64,
    /// Stop after this many leases (benchmarks, tests); `None` runs until the run finishes.
    pub max_leases: Option<u64>,
    /// TLS, client certificate and run token for every call (plaintext by default: the `ril`
    /// binary always sets the process's resolved security).
    pub security: ril_proto::security::Security,
}

impl ActorOptions {
    pub fn new(actor_id: String, coordinator: String, student: PathBuf) -> Self {
        Self {
            actor_id,
            coordinator,
            student,
            device: Device::Cpu,
            questions_per_lease: 1,
            rpc_timeout: Duration::from_secs(30),
            register_timeout: Duration::from_secs(300),
            weight_timeout: Duration::from_secs(120),
            weight_chunk_bytes: 1 << 20,
            weight_attempts: 5,
            seed: 0,
            max_leases: None,
            security: ril_proto::security::Security::default(),
        }
    }
}

/// What an actor did, for logs and tests.
#[derive(Debug, Default, Clone)]
pub struct ActorSummary {
    pub leases: u64,
    pub groups_pushed: u64,
    pub groups_refused: u64,
    pub positions_returned: u64,
    pub weight_syncs: u64,
    pub final_version: u64,
    /// Total milliseconds per phase (lease, weight_sync, generation, teacher, scoring, push).
    pub phase_ms: BTreeMap<String, f64>,
}

/// Converts wire sampling settings (zeros mean "unset" where 0 is not a valid value).
pub fn sampling_from_proto(s: &v1::SamplingSettings) -> Result<SamplingParams, ActorError> {
    let p = SamplingParams {
        temperature: f64::from(s.temperature),
        top_p: if s.top_p == 0.0 {
            1.0
        } else {
            f64::from(s.top_p)
        },
        top_k: s.top_k as usize,
        repetition_penalty: if s.repetition_penalty == 0.0 {
            1.0
        } else {
            f64::from(s.repetition_penalty)
        },
        max_new_tokens: s.max_new_tokens as usize,
        stop_token_ids: Vec::new(),
        suppress_token_ids: Vec::new(),
        seed: s.seed,
    };
    if p.max_new_tokens == 0 {
        return Err(ActorError::Config(
            "sampling.max_new_tokens is 0 (the coordinator must set it)".into(),
        ));
    }
    p.validate().map_err(ril_model::ModelError::from)?;
    Ok(p)
}

struct Peers {
    coordinator: CoordinatorClient<Channel>,
    learner: LearnerClient<Channel>,
    learner_addr: String,
    discriminator: DiscriminatorClient<Channel>,
    discriminator_addr: String,
    teachers: Vec<(String, TeacherClient<Channel>)>,
}

fn limits<T>(c: T, f: impl FnOnce(T, usize) -> T) -> T {
    f(c, ril_proto::server::DEFAULT_MAX_MESSAGE_BYTES)
}

/// Runs the actor until the run finishes, `max_leases` is reached or `shutdown` resolves (the
/// lease in progress is finished first).
pub async fn run_actor(
    opts: ActorOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<ActorSummary, ActorError> {
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            shutdown.await;
            stop.store(true, Ordering::SeqCst);
        });
    }
    let student = opts.student.clone();
    let device = opts.device.clone();
    let bundle = tokio::task::spawn_blocking(move || {
        Bundle::load(&student, Head::LanguageModel, &device, DType::F32)
    })
    .await
    .map_err(|e| ActorError::Config(format!("loading the student: {e}")))??;
    let bundle = Arc::new(RwLock::new(bundle));

    let channel =
        ril_proto::client::connect(&opts.coordinator, opts.rpc_timeout, &opts.security).await?;
    let mut coordinator = limits(CoordinatorClient::new(channel), |c, n| {
        c.max_decoding_message_size(n).max_encoding_message_size(n)
    });
    // The coordinator answers Unavailable until the run's peers (the learner) have joined.
    let deadline = Instant::now() + opts.register_timeout;
    let reg = loop {
        // Asked to stop before the run let it in (e.g. SIGTERM during a rollout of the pods):
        // nothing was leased, so there is nothing to finish.
        if stop.load(Ordering::SeqCst) {
            tracing::info!(actor = %opts.actor_id, "stopped before registering");
            return Ok(ActorSummary::default());
        }
        match coordinator
            .register_actor(v1::RegisterActorRequest {
                actor_id: opts.actor_id.clone(),
                device: format!("{:?}", opts.device),
            })
            .await
        {
            Ok(r) => break r.into_inner(),
            Err(s) if s.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                tracing::debug!(reason = %s.message(), "coordinator not ready; registering again");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(s) => return Err(ActorError::peer("coordinator", &opts.coordinator, s)),
        }
    };
    let sampling =
        sampling_from_proto(reg.sampling.as_ref().ok_or_else(|| {
            ActorError::Config("the coordinator sent no sampling settings".into())
        })?)?;
    // Unset (max_new_tokens 0): the teacher servers' own settings.
    let teacher_sampling = reg.teacher_sampling.filter(|s| s.max_new_tokens > 0);
    let group_size = reg.group_size as usize;
    if group_size == 0 {
        return Err(ActorError::Config("group_size is 0".into()));
    }
    tracing::info!(actor = %opts.actor_id, run = %reg.run_id, group_size, teachers = reg.teacher_addrs.len(), "registered");

    let connect =
        |addr: &str| ril_proto::client::connect_lazy(addr, opts.rpc_timeout, &opts.security);
    let mut peers = Peers {
        coordinator: coordinator.clone(),
        learner: limits(LearnerClient::new(connect(&reg.learner_addr)?), |c, n| {
            c.max_decoding_message_size(n).max_encoding_message_size(n)
        }),
        learner_addr: reg.learner_addr.clone(),
        discriminator: limits(
            DiscriminatorClient::new(connect(&reg.discriminator_addr)?),
            |c, n| c.max_decoding_message_size(n).max_encoding_message_size(n),
        ),
        discriminator_addr: reg.discriminator_addr.clone(),
        teachers: reg
            .teacher_addrs
            .iter()
            .map(|a| {
                Ok((
                    a.clone(),
                    limits(TeacherClient::new(connect(a)?), |c, n| {
                        c.max_decoding_message_size(n).max_encoding_message_size(n)
                    }),
                ))
            })
            .collect::<Result<_, ActorError>>()?,
    };
    let split = teacher_split(peers.teachers.len(), reg.teacher_slots as usize);

    // Heartbeats, carrying the version this actor samples with.
    let version = Arc::new(AtomicU64::new(u64::MAX));
    let finished = Arc::new(AtomicBool::new(false));
    let heartbeat = {
        let mut client = coordinator.clone();
        let (version, finished, stop) = (version.clone(), finished.clone(), stop.clone());
        let id = opts.actor_id.clone();
        let device = format!("{:?}", opts.device);
        let every = Duration::from_millis(reg.heartbeat_interval_ms.max(50));
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) && !finished.load(Ordering::SeqCst) {
                let v = version.load(Ordering::SeqCst);
                match client
                    .heartbeat(v1::HeartbeatRequest {
                        actor_id: id.clone(),
                        policy_version: if v == u64::MAX { 0 } else { v },
                    })
                    .await
                {
                    Ok(r) => {
                        let r = r.into_inner();
                        if r.run_finished {
                            finished.store(true, Ordering::SeqCst);
                        }
                        if !r.known {
                            let _ = client
                                .register_actor(v1::RegisterActorRequest {
                                    actor_id: id.clone(),
                                    device: device.clone(),
                                })
                                .await;
                        }
                    }
                    Err(s) => tracing::warn!(error = %s.message(), "heartbeat failed"),
                }
                tokio::time::sleep(every).await;
            }
        })
    };

    let mut summary = ActorSummary::default();
    let phase = |summary: &mut ActorSummary, name: &str, since: Instant| {
        *summary.phase_ms.entry(name.to_string()).or_default() +=
            since.elapsed().as_secs_f64() * 1e3;
    };
    let result: Result<(), ActorError> = async {
        loop {
            if stop.load(Ordering::SeqCst) || finished.load(Ordering::SeqCst) {
                break;
            }
            if opts.max_leases.is_some_and(|m| summary.leases >= m) {
                break;
            }
            let t = Instant::now();
            let current = version.load(Ordering::SeqCst);
            let lease = peers
                .coordinator
                .lease_prompts(v1::LeasePromptsRequest {
                    actor_id: opts.actor_id.clone(),
                    max_questions: opts.questions_per_lease,
                    policy_version: if current == u64::MAX { 0 } else { current },
                })
                .await
                .map_err(|s| ActorError::peer("coordinator", &opts.coordinator, s))?
                .into_inner();
            if lease.run_finished {
                finished.store(true, Ordering::SeqCst);
                break;
            }
            if lease.items.is_empty() {
                // Nothing to do until the learner publishes the next version.
                tokio::time::sleep(Duration::from_millis(lease.retry_after_ms.clamp(10, 1000)))
                    .await;
                continue;
            }
            phase(&mut summary, "lease", t);
            summary.leases += 1;

            // Weights: at least the version the lease was granted at, applied whole.
            let t = Instant::now();
            if current == u64::MAX || current < lease.policy_version {
                let deadline = Instant::now() + opts.weight_timeout;
                loop {
                    let payload = sync::fetch(
                        &mut peers.learner,
                        &peers.learner_addr,
                        0,
                        opts.weight_chunk_bytes,
                        opts.weight_timeout,
                        opts.weight_attempts,
                    )
                    .await?;
                    if payload.version >= lease.policy_version {
                        let b = bundle.clone();
                        let v = payload.version;
                        tokio::task::spawn_blocking(move || {
                            let guard = b.write().expect("model lock");
                            load_weights_from_bytes(
                                &guard.model,
                                &payload.bytes,
                                &format!("<weights v{v}>"),
                                LoadOptions::strict(),
                            )
                        })
                        .await
                        .map_err(|e| ActorError::Config(format!("applying weights: {e}")))??;
                        version.store(v, Ordering::SeqCst);
                        summary.weight_syncs += 1;
                        tracing::info!(version = v, "weights applied");
                        break;
                    }
                    if Instant::now() > deadline {
                        return Err(ActorError::Peer {
                            role: "learner",
                            addr: peers.learner_addr.clone(),
                            detail: format!(
                                "serves version {} but the lease needs {}",
                                payload.version, lease.policy_version
                            ),
                        });
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            phase(&mut summary, "weight_sync", t);
            let sampling_version = version.load(Ordering::SeqCst);

            let mut groups = Vec::new();
            let mut returned = Vec::new();
            for item in &lease.items {
                match rollout_item(
                    &opts,
                    &mut peers,
                    &bundle,
                    &sampling,
                    teacher_sampling,
                    &split,
                    group_size,
                    sampling_version,
                    &lease,
                    item,
                    &mut summary,
                )
                .await
                {
                    Ok(g) => groups.push(g),
                    Err(e) => {
                        tracing::warn!(position = item.position, error = %e, "question handed back");
                        returned.push(item.position);
                    }
                }
            }
            let t = Instant::now();
            if !groups.is_empty() {
                let n = groups.len();
                let reply = peers
                    .learner
                    .push_groups(v1::PushGroupsRequest { groups })
                    .await;
                match reply {
                    Ok(r) => {
                        for v in r.into_inner().verdicts {
                            if v.accepted {
                                summary.groups_pushed += 1;
                            } else {
                                summary.groups_refused += 1;
                                tracing::warn!(position = v.position, reason = %v.reason, "group refused by the learner");
                            }
                        }
                    }
                    Err(s) => {
                        tracing::warn!(groups = n, error = %s.message(), "push failed; handing the questions back");
                        returned.extend(lease.items.iter().map(|i| i.position));
                    }
                }
            }
            phase(&mut summary, "push", t);
            summary.positions_returned += returned.len() as u64;
            peers
                .coordinator
                .complete_lease(v1::CompleteLeaseRequest {
                    actor_id: opts.actor_id.clone(),
                    lease_id: lease.lease_id.clone(),
                    returned_positions: returned,
                })
                .await
                .map_err(|s| ActorError::peer("coordinator", &opts.coordinator, s))?;
        }
        Ok(())
    }
    .await;
    stop.store(true, Ordering::SeqCst);
    heartbeat.abort();
    summary.final_version = version.load(Ordering::SeqCst);
    result.map(|_| summary)
}

#[allow(clippy::too_many_arguments)]
async fn rollout_item(
    opts: &ActorOptions,
    peers: &mut Peers,
    bundle: &Arc<RwLock<Bundle>>,
    sampling: &SamplingParams,
    teacher_sampling: Option<v1::SamplingSettings>,
    split: &[usize],
    group_size: usize,
    version: u64,
    lease: &v1::LeasePromptsResponse,
    item: &v1::LeaseItem,
    summary: &mut ActorSummary,
) -> Result<v1::ScoredGroup, ActorError> {
    let question = item.question.clone().ok_or_else(|| {
        ActorError::Config(format!("lease item {} has no question", item.position))
    })?;
    let row = ril_proto::convert::question_to_row(&question).map_err(|e| ActorError::Question {
        id: question.id.clone(),
        detail: e.to_string(),
    })?;
    let mut timings = BTreeMap::new();

    // Teacher answers, fetched while the student samples.
    let teacher_fut = {
        let mut teachers = peers.teachers.clone();
        let question = question.clone();
        let split = split.to_vec();
        async move {
            let t = Instant::now();
            let mut out: Vec<(String, String)> = Vec::new();
            for ((addr, client), &n) in teachers.iter_mut().zip(&split) {
                if n == 0 {
                    continue;
                }
                let mut stream = client
                    .answer(v1::AnswerRequest {
                        question: Some(question.clone()),
                        n: n as u32,
                        sampling: teacher_sampling,
                    })
                    .await
                    .map_err(|s| ActorError::peer("teacher", addr, s))?
                    .into_inner();
                let mut answers: Vec<v1::TeacherAnswer> = Vec::new();
                while let Some(a) = stream
                    .message()
                    .await
                    .map_err(|s| ActorError::peer("teacher", addr, s))?
                {
                    answers.push(a);
                }
                answers.sort_by_key(|a| a.index);
                if answers.len() < n {
                    return Err(ActorError::Peer {
                        role: "teacher",
                        addr: addr.clone(),
                        detail: format!("sent {} answers, {n} were asked for", answers.len()),
                    });
                }
                out.extend(answers.into_iter().take(n).map(|a| (a.teacher, a.text)));
            }
            Ok::<_, ActorError>((out, t.elapsed().as_secs_f64() * 1e3))
        }
    };
    let student_fut = {
        let bundle = bundle.clone();
        let row = row.clone();
        let sampling = sampling.clone();
        let seed = rollout_seed(opts.seed, item.position, version);
        async move {
            let t = Instant::now();
            let r = tokio::task::spawn_blocking(move || {
                let guard = bundle.read().expect("model lock");
                sample_student(&guard, &row, group_size, &sampling, seed)
            })
            .await
            .map_err(|e| ActorError::Config(format!("generation task: {e}")))??;
            Ok::<_, ActorError>((r, t.elapsed().as_secs_f64() * 1e3))
        }
    };
    let (teachers, student) = tokio::join!(teacher_fut, student_fut);
    let (teacher_answers, teacher_ms) = teachers?;
    let (student, gen_ms) = student?;
    timings.insert("generation".to_string(), gen_ms);
    timings.insert("teacher".to_string(), teacher_ms);

    let t = Instant::now();
    let mut texts: Vec<String> = student.texts.clone();
    texts.extend(teacher_answers.iter().map(|(_, t)| t.clone()));
    let scores = peers
        .discriminator
        .score(v1::ScoreRequest {
            question: Some(question.clone()),
            responses: texts.clone(),
        })
        .await
        .map_err(|s| ActorError::peer("discriminator", &peers.discriminator_addr, s))?
        .into_inner()
        .scores;
    if scores.len() != texts.len() {
        return Err(ActorError::Peer {
            role: "discriminator",
            addr: peers.discriminator_addr.clone(),
            detail: format!("{} scores for {} responses", scores.len(), texts.len()),
        });
    }
    timings.insert("scoring".to_string(), t.elapsed().as_secs_f64() * 1e3);

    let mut responses = Vec::with_capacity(texts.len());
    for (i, (generation, text)) in student.generations.iter().zip(&student.texts).enumerate() {
        let (r_sim, r_ans) = rewards(scores[i].d_prob, scores[i].answer_score);
        responses.push(v1::ScoredResponse {
            source: v1::ResponseSource::Student as i32,
            teacher: String::new(),
            text: text.clone(),
            token_ids: generation.token_ids.clone(),
            behaviour_logprobs: generation.logprobs.clone(),
            policy_version: version,
            d_prob: scores[i].d_prob,
            r_sim,
            r_ans,
            truncated: truncated(generation),
        });
    }
    let token_ids = {
        let guard = bundle.read().expect("model lock");
        teacher_answers
            .iter()
            .map(|(_, text)| teacher_tokens(&guard, text))
            .collect::<Result<Vec<_>, _>>()?
    };
    for (j, ((teacher, text), ids)) in teacher_answers.iter().zip(token_ids).enumerate() {
        let s = &scores[student.texts.len() + j];
        let (r_sim, r_ans) = rewards(s.d_prob, s.answer_score);
        responses.push(v1::ScoredResponse {
            source: v1::ResponseSource::Teacher as i32,
            teacher: teacher.clone(),
            text: text.clone(),
            token_ids: ids,
            behaviour_logprobs: Vec::new(),
            policy_version: version,
            d_prob: s.d_prob,
            r_sim,
            r_ans,
            truncated: false,
        });
    }
    for (k, v) in &timings {
        *summary.phase_ms.entry(k.clone()).or_default() += v;
    }
    Ok(v1::ScoredGroup {
        lease_id: lease.lease_id.clone(),
        position: item.position,
        iteration: item.iteration,
        question: Some(question),
        prompt_token_ids: student.prompt_ids,
        responses,
        actor_id: opts.actor_id.clone(),
        timings_ms: timings.into_iter().collect(),
    })
}
