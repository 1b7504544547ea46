//! The wire (`ril.v1` coordinator messages) to the domain and back. Every request becomes a
//! domain request here, and every rule that needs no run state is checked here, with errors
//! naming the field as the proto spells it (`actor_id`, `max_questions`). Rules that depend on
//! the run (a rank inside the world, a position below the cursor, who holds a lease) are the
//! [`Coordinator`](crate::Coordinator)'s.

use std::collections::BTreeMap;
use std::time::Duration;

use ril_proto::convert::row_to_question;
use ril_proto::v1;

use crate::coordinator::{
    Acceptance, ActorInfo, HeartbeatReply, LeaseGrant, LeasedQuestion, Rendezvous, Status,
};
use crate::error::{CoordinatorError, Result};
use crate::options::CoordinatorOptions;

/// Longest id (actor, lease, question, address, metric name) a request may carry.
pub const MAX_ID_LEN: usize = 512;

/// The shortest publisher key learner rank 0 may bring.
pub const MIN_PUBLISHER_KEY_BYTES: usize = 16;

/// An optional id (a client's request key, a lease named in a hand-back): empty, or a valid id.
fn check_optional_id(field: &'static str, value: &str) -> Result<()> {
    if value.is_empty() {
        return Ok(());
    }
    check_id(field, value)
}

/// The longest reason kept from a client (longer ones are cut, on a character boundary).
const MAX_REASON_BYTES: usize = 2048;

/// A client's free-text reason, cut to [`MAX_REASON_BYTES`] and with control characters
/// replaced, so that it can go into logs and status as one line.
fn reason_text(reason: String) -> String {
    let mut cut = reason.len().min(MAX_REASON_BYTES);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    reason[..cut]
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

fn check_id(field: &'static str, value: &str) -> Result<()> {
    if value.trim().is_empty() {
        return Err(CoordinatorError::invalid(field, "empty"));
    }
    if value.len() > MAX_ID_LEN {
        return Err(CoordinatorError::invalid(
            field,
            format!("{} bytes, more than {MAX_ID_LEN}", value.len()),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(CoordinatorError::invalid(
            field,
            format!("{value:?} contains control characters"),
        ));
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterActor {
    pub actor_id: String,
    pub device: String,
}

impl TryFrom<v1::RegisterActorRequest> for RegisterActor {
    type Error = CoordinatorError;

    fn try_from(r: v1::RegisterActorRequest) -> Result<Self> {
        check_id("actor_id", &r.actor_id)?;
        if r.device.len() > MAX_ID_LEN || r.device.chars().any(char::is_control) {
            return Err(CoordinatorError::invalid(
                "device",
                format!("{:?} is not a device name", r.device),
            ));
        }
        Ok(Self {
            actor_id: r.actor_id,
            device: r.device,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heartbeat {
    pub actor_id: String,
    pub policy_version: u64,
}

impl TryFrom<v1::HeartbeatRequest> for Heartbeat {
    type Error = CoordinatorError;

    fn try_from(r: v1::HeartbeatRequest) -> Result<Self> {
        check_id("actor_id", &r.actor_id)?;
        Ok(Self {
            actor_id: r.actor_id,
            policy_version: r.policy_version,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRequest {
    pub actor_id: String,
    pub max_questions: u32,
    pub policy_version: u64,
    /// The actor's key for this request (empty: none).
    pub request_id: String,
}

impl TryFrom<v1::LeasePromptsRequest> for LeaseRequest {
    type Error = CoordinatorError;

    fn try_from(r: v1::LeasePromptsRequest) -> Result<Self> {
        check_id("actor_id", &r.actor_id)?;
        if r.max_questions == 0 {
            return Err(CoordinatorError::invalid(
                "max_questions",
                "must be at least 1",
            ));
        }
        check_optional_id("request_id", &r.request_id)?;
        Ok(Self {
            actor_id: r.actor_id,
            max_questions: r.max_questions,
            policy_version: r.policy_version,
            request_id: r.request_id,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompleteLease {
    pub actor_id: String,
    pub lease_id: String,
    pub returned_positions: Vec<u64>,
    pub reason: String,
}

impl TryFrom<v1::CompleteLeaseRequest> for CompleteLease {
    type Error = CoordinatorError;

    fn try_from(r: v1::CompleteLeaseRequest) -> Result<Self> {
        check_id("actor_id", &r.actor_id)?;
        check_id("lease_id", &r.lease_id)?;
        Ok(Self {
            actor_id: r.actor_id,
            lease_id: r.lease_id,
            returned_positions: r.returned_positions,
            reason: reason_text(r.reason),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptGroup {
    pub lease_id: String,
    pub position: u64,
    pub question_id: String,
    pub iteration: u64,
    pub publisher_key: Vec<u8>,
}

impl TryFrom<v1::AcceptGroupRequest> for AcceptGroup {
    type Error = CoordinatorError;

    fn try_from(r: v1::AcceptGroupRequest) -> Result<Self> {
        check_id("lease_id", &r.lease_id)?;
        check_id("question_id", &r.question_id)?;
        Ok(Self {
            lease_id: r.lease_id,
            position: r.position,
            question_id: r.question_id,
            iteration: r.iteration,
            publisher_key: r.publisher_key.to_vec(),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReturnQuestion {
    pub position: u64,
    pub reason: String,
    /// The lease whose group is handed back (empty: whatever holds the position).
    pub lease_id: String,
}

impl TryFrom<v1::ReturnQuestionRequest> for ReturnQuestion {
    type Error = CoordinatorError;

    fn try_from(r: v1::ReturnQuestionRequest) -> Result<Self> {
        check_optional_id("lease_id", &r.lease_id)?;
        Ok(Self {
            position: r.position,
            reason: reason_text(r.reason),
            lease_id: r.lease_id,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishVersion {
    pub version: u64,
    pub iteration: u64,
    pub checkpoint: String,
    pub publisher_key: Vec<u8>,
}

impl TryFrom<v1::PublishVersionRequest> for PublishVersion {
    type Error = CoordinatorError;

    fn try_from(r: v1::PublishVersionRequest) -> Result<Self> {
        let version = r.version;
        if version == 0 {
            return Err(CoordinatorError::invalid(
                "version",
                "published versions start at 1 (version 0 is the policy the run starts from)",
            ));
        }
        if r.iteration.checked_add(1) != Some(version) {
            return Err(CoordinatorError::invalid(
                "iteration",
                format!(
                    "version {version} comes from iteration {}, not {}",
                    version - 1,
                    r.iteration
                ),
            ));
        }
        if r.checkpoint.chars().any(char::is_control) {
            return Err(CoordinatorError::invalid(
                "checkpoint",
                "contains control characters",
            ));
        }
        Ok(Self {
            version,
            iteration: r.iteration,
            checkpoint: r.checkpoint,
            publisher_key: r.publisher_key.to_vec(),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinLearner {
    pub rank: u32,
    pub addr: String,
    pub collective_id: Vec<u8>,
    pub collective_addr: String,
    pub version: u64,
    /// Rank 0's publisher key; `None` for the other ranks.
    pub publisher_key: Option<Vec<u8>>,
}

impl TryFrom<v1::JoinLearnerRequest> for JoinLearner {
    type Error = CoordinatorError;

    fn try_from(r: v1::JoinLearnerRequest) -> Result<Self> {
        check_id("addr", &r.addr)?;
        let rank = r.rank;
        let publisher_key = if rank == 0 {
            if r.publisher_key.len() < MIN_PUBLISHER_KEY_BYTES {
                return Err(CoordinatorError::invalid(
                    "publisher_key",
                    format!(
                        "rank 0 brings a random key of at least {MIN_PUBLISHER_KEY_BYTES} bytes ({} sent)",
                        r.publisher_key.len()
                    ),
                ));
            }
            Some(r.publisher_key.to_vec())
        } else {
            if !r.publisher_key.is_empty() {
                return Err(CoordinatorError::invalid(
                    "publisher_key",
                    format!("only rank 0 brings a publisher key (rank {rank} sent one)"),
                ));
            }
            if !r.collective_id.is_empty() {
                return Err(CoordinatorError::invalid(
                    "collective_id",
                    format!("only rank 0 brings the collective id (rank {rank} sent one)"),
                ));
            }
            None
        };
        Ok(Self {
            rank,
            addr: r.addr,
            collective_id: r.collective_id.to_vec(),
            collective_addr: r.collective_addr,
            version: r.version,
            publisher_key,
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ReportMetrics {
    pub iteration: u64,
    pub metrics: Vec<(String, f64)>,
}

impl TryFrom<v1::ReportMetricsRequest> for ReportMetrics {
    type Error = CoordinatorError;

    fn try_from(r: v1::ReportMetricsRequest) -> Result<Self> {
        if let Some(name) = r.metrics.keys().find(|n| {
            n.trim().is_empty() || n.len() > MAX_ID_LEN || n.chars().any(char::is_control)
        }) {
            return Err(CoordinatorError::invalid(
                "metrics",
                format!("{name:?} is not a metric name"),
            ));
        }
        Ok(Self {
            iteration: r.iteration,
            metrics: r.metrics.into_iter().collect(),
        })
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// What a registering actor is told: the run, its timing, its peers and its sampling.
pub(crate) fn registration(
    options: &CoordinatorOptions,
    run_id: String,
    learner_addr: String,
) -> v1::RegisterActorResponse {
    let a = &options.actor;
    v1::RegisterActorResponse {
        run_id,
        heartbeat_interval_ms: ms(options.heartbeat_interval),
        lease_timeout_ms: ms(options.lease_timeout),
        group_size: a.group_size,
        teacher_addrs: a.teacher_addrs.clone(),
        discriminator_addr: a.discriminator_addr.clone(),
        learner_addr,
        sampling: Some((&a.sampling).into()),
        // All zeros: "unset", the teacher servers' own settings (which key their caches).
        teacher_sampling: Some(
            a.teacher_sampling
                .as_ref()
                .map(Into::into)
                .unwrap_or_default(),
        ),
        teacher_slots: a.teacher_slots,
    }
}

impl From<HeartbeatReply> for v1::HeartbeatResponse {
    fn from(h: HeartbeatReply) -> Self {
        Self {
            latest_version: h.latest_version,
            known: h.known,
            run_finished: h.run_finished,
        }
    }
}

impl From<&LeasedQuestion> for v1::LeaseItem {
    fn from(i: &LeasedQuestion) -> Self {
        Self {
            position: i.position,
            iteration: i.iteration,
            question: Some(row_to_question(&i.row)),
        }
    }
}

impl From<LeaseGrant> for v1::LeasePromptsResponse {
    fn from(g: LeaseGrant) -> Self {
        Self {
            items: g.items.iter().map(Into::into).collect(),
            lease_id: g.lease_id,
            deadline_unix_ms: g.deadline_unix_ms,
            policy_version: g.policy_version,
            retry_after_ms: g.retry_after_ms,
            run_finished: g.run_finished,
        }
    }
}

impl From<Acceptance> for v1::AcceptGroupResponse {
    fn from(a: Acceptance) -> Self {
        match a {
            Acceptance::Accepted => Self {
                accepted: true,
                reason: String::new(),
            },
            Acceptance::Refused(reason) => Self {
                accepted: false,
                reason,
            },
        }
    }
}

impl From<Rendezvous> for v1::JoinLearnerResponse {
    fn from(j: Rendezvous) -> Self {
        Self {
            world_size: j.world_size,
            ready: j.ready,
            rank_addrs: j.rank_addrs,
            collective_id: j.collective_id.into(),
            collective_addrs: j.collective_addrs,
        }
    }
}

impl From<ActorInfo> for v1::ActorStatus {
    fn from(a: ActorInfo) -> Self {
        Self {
            actor_id: a.actor_id,
            device: a.device,
            policy_version: a.policy_version,
            last_seen_ms_ago: a.last_seen_ms_ago,
            alive: a.alive,
            groups_leased: a.groups_leased,
        }
    }
}

impl From<Status> for v1::RunStatus {
    fn from(s: Status) -> Self {
        let metrics: BTreeMap<String, f64> = s.metrics;
        Self {
            run_id: s.run_id,
            policy_version: s.policy_version,
            iteration: s.iteration,
            total_iterations: s.total_iterations,
            cursor: s.cursor,
            groups_accepted: s.groups_accepted,
            duplicates_refused: s.duplicates_refused,
            leases_expired: s.leases_expired,
            leases_outstanding: s.leases_outstanding,
            actors: s.actors.into_iter().map(Into::into).collect(),
            metrics: metrics.into_iter().collect(),
            groups_per_second: s.groups_per_second,
            finished: s.finished,
            learner_world_size: s.learner_world_size,
            learner_ranks_joined: s.learner_ranks_joined,
            ms_since_progress: ms(s.progress.since_progress),
            waiting_for: s.progress.waiting_for,
            stalled: s.progress.stalled.unwrap_or_default(),
            last_handback_ms_ago: s
                .progress
                .last_handback
                .as_ref()
                .map_or(0, |(ago, _)| ms(*ago)),
            last_handback: s
                .progress
                .last_handback
                .map(|(_, why)| why)
                .unwrap_or_default(),
            state_writes: s.state_writes.writes,
            state_write_failures: s.state_writes.failures,
            state_changes_written: s.state_writes.changes,
            state_file_bytes: s.state_writes.last_bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(e: CoordinatorError) -> &'static str {
        match e {
            CoordinatorError::InvalidArgument { field, .. } => field,
            other => panic!("expected InvalidArgument, got {other}"),
        }
    }

    /// Moved here from the domain tests with the checks they pin: malformed requests name the
    /// field.
    #[test]
    fn malformed_requests_name_the_field() {
        let lease = |actor_id: &str, max_questions| {
            LeaseRequest::try_from(v1::LeasePromptsRequest {
                actor_id: actor_id.into(),
                max_questions,
                policy_version: 0,
                request_id: String::new(),
            })
        };
        assert_eq!(field_of(lease("", 1).unwrap_err()), "actor_id");
        assert_eq!(field_of(lease("a", 0).unwrap_err()), "max_questions");
        assert_eq!(
            field_of(lease(&"x".repeat(513), 1).unwrap_err()),
            "actor_id"
        );
        assert_eq!(field_of(lease("a\n", 1).unwrap_err()), "actor_id");
        lease("a", 1).unwrap();

        let accept = AcceptGroup::try_from(v1::AcceptGroupRequest {
            lease_id: "l-1".into(),
            position: 1,
            question_id: String::new(),
            iteration: 0,
            publisher_key: Default::default(),
        });
        assert_eq!(field_of(accept.unwrap_err()), "question_id");

        let publish = |version, iteration| {
            PublishVersion::try_from(v1::PublishVersionRequest {
                version,
                iteration,
                checkpoint: String::new(),
                publisher_key: Default::default(),
            })
        };
        assert_eq!(field_of(publish(0, 0).unwrap_err()), "version");
        assert_eq!(field_of(publish(2, 0).unwrap_err()), "iteration");
        publish(3, 2).unwrap();

        let join = |rank, addr: &str, collective_id: &[u8], publisher_key: &[u8]| {
            JoinLearner::try_from(v1::JoinLearnerRequest {
                rank,
                addr: addr.into(),
                collective_id: collective_id.to_vec().into(),
                collective_addr: String::new(),
                version: 0,
                publisher_key: publisher_key.to_vec().into(),
            })
        };
        assert_eq!(field_of(join(1, "", &[], &[]).unwrap_err()), "addr");
        assert_eq!(
            field_of(join(1, "h:1", &[1], &[]).unwrap_err()),
            "collective_id"
        );
        assert_eq!(
            field_of(join(1, "h:1", &[], &[1; 32]).unwrap_err()),
            "publisher_key"
        );
        assert_eq!(
            field_of(join(0, "h:0", &[], &[1; 4]).unwrap_err()),
            "publisher_key"
        );
        let rank0 = join(0, "h:0", &[7; 8], &[1; 32]).unwrap();
        assert_eq!(rank0.publisher_key, Some(vec![1; 32]));
        assert_eq!(join(1, "h:1", &[], &[]).unwrap().publisher_key, None);

        let metrics = ReportMetrics::try_from(v1::ReportMetricsRequest {
            iteration: 2,
            metrics: [(String::new(), 1.0)].into_iter().collect(),
        });
        assert_eq!(field_of(metrics.unwrap_err()), "metrics");

        let register = |device: &str| {
            RegisterActor::try_from(v1::RegisterActorRequest {
                actor_id: "a".into(),
                device: device.into(),
            })
        };
        assert_eq!(field_of(register("cuda\u{7}").unwrap_err()), "device");
        register("").unwrap();
    }

    #[test]
    fn registration_sends_the_sampling_and_unset_teacher_sampling_as_zeros() {
        let mut options = CoordinatorOptions::default();
        let r = registration(&options, "run".into(), "l:1".into());
        let sampling = r.sampling.unwrap();
        assert_eq!((sampling.top_k, sampling.max_new_tokens), (50, 256));
        assert_eq!(r.teacher_sampling.unwrap(), sampling);
        options.actor.teacher_sampling = None;
        let r = registration(&options, "run".into(), "l:1".into());
        assert_eq!(r.teacher_sampling, Some(v1::SamplingSettings::default()));
        assert_eq!(r.learner_addr, "l:1");
    }
}
