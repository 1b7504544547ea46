//! The run config's own sections: the run-level ones (`[run]`, `[data]`, `[student]`,
//! `[rollout]`), which are written once and filled into the role sections, and the ones no role
//! crate owns (`[network]`, `[coordinator]`, `[actors]`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSection {
    pub id: String,
    pub dir: PathBuf,
    #[serde(default)]
    pub seed: u64,
    pub iterations: u64,
    pub questions_per_iteration: u64,
    #[serde(default)]
    pub staleness_bound: u64,
    /// The device of every role that does not name its own (`[actors]`, `[learner]`,
    /// `[discriminator]` and candle `[[teachers]]` `device`): `cpu`, `cuda` or `cuda:N`. None:
    /// each role's own default, `cpu`. One GPU for the whole run is `device = "cuda:0"` here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    pub path: PathBuf,
    #[serde(default)]
    pub skip_bad_rows: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudentSection {
    pub checkpoint: PathBuf,
}

fn d_temperature() -> f64 {
    1.0
}
fn d_top_p() -> f64 {
    0.95
}
fn d_top_k() -> u32 {
    50
}
fn d_rep() -> f64 {
    1.05
}
fn d_max_new() -> u32 {
    64
}

/// Student sampling (the paper's settings by default) and the group's shape. `top_p = 0` and
/// `repetition_penalty = 0` mean "off" (1), as they do on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutSection {
    pub group_size: u32,
    /// Default: `group_size` (RIL's G + G mixed group).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher_slots: Option<u32>,
    #[serde(default = "d_temperature")]
    pub temperature: f64,
    #[serde(default = "d_top_p")]
    pub top_p: f64,
    #[serde(default = "d_top_k")]
    pub top_k: u32,
    #[serde(default = "d_rep")]
    pub repetition_penalty: f64,
    #[serde(default = "d_max_new")]
    pub max_new_tokens: u32,
}

impl RolloutSection {
    /// `group_size` rollouts per question with the paper's sampling and `max_new_tokens`.
    pub fn new(group_size: u32, max_new_tokens: u32) -> Self {
        Self {
            group_size,
            teacher_slots: None,
            temperature: d_temperature(),
            top_p: d_top_p(),
            top_k: d_top_k(),
            repetition_penalty: d_rep(),
            max_new_tokens,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSection {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coordinator: Option<String>,
    /// Learner rank 0's address as actors reach it. Default: what rank 0 advertises when it
    /// joins the coordinator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub learner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discriminator: Option<String>,
    /// Teacher name -> address.
    #[serde(default)]
    pub teachers: BTreeMap<String, String>,
}

fn d_lease() -> u64 {
    300
}
fn d_heartbeat() -> u64 {
    1000
}
fn d_actor_timeout() -> u64 {
    30
}
fn d_lease_retry() -> u64 {
    50
}

fn d_stall_limit() -> u64 {
    1800
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorSection {
    #[serde(default = "d_lease")]
    pub lease_timeout_s: u64,
    #[serde(default = "d_heartbeat")]
    pub heartbeat_interval_ms: u64,
    #[serde(default = "d_actor_timeout")]
    pub actor_timeout_s: u64,
    /// How soon an actor asks again when nothing may be leased yet (on-policy runs wait for
    /// the next version this way).
    #[serde(default = "d_lease_retry")]
    pub lease_retry_ms: u64,
    /// The progress watchdog: a run that has not advanced (no group accepted, no version
    /// published) for this long stops with an error naming what it waited for. 0: no limit.
    #[serde(default = "d_stall_limit")]
    pub stall_limit_s: u64,
}

impl Default for CoordinatorSection {
    fn default() -> Self {
        Self {
            lease_timeout_s: d_lease(),
            heartbeat_interval_ms: d_heartbeat(),
            actor_timeout_s: d_actor_timeout(),
            lease_retry_ms: d_lease_retry(),
            stall_limit_s: d_stall_limit(),
        }
    }
}

fn d_actors() -> u32 {
    1
}
fn d_qpl() -> u32 {
    1
}
fn d_device() -> String {
    "cpu".into()
}
fn d_actor_rpc_timeout() -> u64 {
    30_000
}
fn d_actor_teacher_timeout() -> u64 {
    300_000
}
fn d_actor_push_timeout() -> u64 {
    300_000
}
fn d_actor_coordinator_deadline() -> u64 {
    120_000
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActorsSection {
    /// Actors `ril train` starts (a cluster scales them with its own tools).
    #[serde(default = "d_actors")]
    pub count: u32,
    #[serde(default = "d_qpl")]
    pub questions_per_lease: u32,
    /// Where each actor's copy of the student samples: `cpu`, `cuda` or `cuda:N`. Default:
    /// `[run] device`, else `cpu`.
    #[serde(default = "d_device")]
    pub device: String,
    /// The deadline of each call an actor makes to the coordinator and the discriminator, and
    /// of connecting to any peer; sent as `grpc-timeout` and enforced by the actor. A peer that
    /// misses it has failed that call.
    #[serde(default = "d_actor_rpc_timeout")]
    pub rpc_timeout_ms: u64,
    /// The deadline of one teacher `Answer` call, the whole stream (a teacher generates the
    /// answers it has not cached before the stream ends). A teacher that misses it has failed
    /// the question, which goes back to the coordinator naming the teacher.
    #[serde(default = "d_actor_teacher_timeout")]
    pub teacher_timeout_ms: u64,
    /// The deadline of one PushGroups call: the learner checks and scores each group and
    /// commits it with the coordinator (retrying while the coordinator is unreachable) before
    /// it answers. A push that misses it hands its questions back; the learner still commits
    /// and buffers what it had started, so nothing is trained twice or lost.
    #[serde(default = "d_actor_push_timeout")]
    pub push_timeout_ms: u64,
    /// How long an actor keeps asking the coordinator again (with backoff) when a LeasePrompts
    /// or CompleteLease call fails with an unknown outcome (unreachable, a deadline, a broken
    /// connection: e.g. the coordinator restarting). Past it the actor stops, naming the
    /// coordinator and the call. A repeated request is answered as the first one was (the
    /// lease request carries a key; a lease is completed once).
    #[serde(default = "d_actor_coordinator_deadline")]
    pub coordinator_deadline_ms: u64,
}

impl Default for ActorsSection {
    fn default() -> Self {
        Self {
            count: d_actors(),
            questions_per_lease: d_qpl(),
            device: d_device(),
            rpc_timeout_ms: d_actor_rpc_timeout(),
            teacher_timeout_ms: d_actor_teacher_timeout(),
            push_timeout_ms: d_actor_push_timeout(),
            coordinator_deadline_ms: d_actor_coordinator_deadline(),
        }
    }
}
