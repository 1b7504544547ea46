//! The coordinator: the run's control plane. It owns the question stream's cursor, prompt
//! leases with deadlines, exactly-once accounting of groups, the policy version registry, actor
//! membership, the learner rendezvous (ranks, addresses, the NCCL unique id) and the run's
//! status. No tensors flow through it.
//!
//! - [`stream`]: position `p` (epochs concatenated, each shuffled by `seed + epoch`) -> dataset
//!   row; iteration `p / B`. Every row is checked when the stream opens.
//! - [`coordinator`]: the domain state machine ([`Coordinator`]), free of gRPC types. Leases
//!   hand out re-issued positions first, then fresh ones, only of iterations
//!   `<= version + staleness_bound` (0: synchronous on-policy). Expired leases (deadline passed,
//!   or the actor stopped heartbeating) give their unaccepted positions back; the learner
//!   accepts each position once.
//! - [`persist`]: the state file (cursor, accepted positions as a watermark plus a set, the
//!   latest versions, run id), replaced atomically after every change a restart must see. Reopening the
//!   same `state_dir` continues the run; positions outstanding at the restart are re-issued. A
//!   lock file keeps a second coordinator off a `state_dir` in use.
//! - [`commit`]: group commit ([`Committed`]): many callers' changes applied in memory and
//!   covered by one write, each caller answered once its change (and any it read) is written;
//!   a failed write rolls back to the state file's and fails those callers.
//! - [`convert`]: one domain request per RPC (`TryFrom` the proto request; every rule that
//!   needs no run state is checked there, errors naming the field) and the replies from domain
//!   types. [`error`]: [`CoordinatorError`] and its kind at the RPC edge
//!   (`ril_proto::ServiceError`).
//! - [`grpc`]: the `ril.v1.Coordinator` adapter (convert, call the domain on the blocking pool,
//!   `ril_proto::error::status`) and [`serve`] (health, reflection, message limits, graceful
//!   shutdown that writes the state).
//! - [`metrics`]: the coordinator's Prometheus metrics, from [`Coordinator::status`] at scrape
//!   time.
//! - [`options`]: [`CoordinatorOptions`], with the actors' sampling as
//!   `ril_common::SamplingParams` (no wire types).

pub mod commit;
pub mod convert;
pub mod coordinator;
pub mod error;
pub mod grpc;
pub mod metrics;
pub mod options;
pub mod persist;
pub mod stream;
#[cfg(test)]
mod testutil;

pub use commit::Committed;
pub use coordinator::{
    Acceptance, ActorInfo, Coordinator, HeartbeatReply, LOCK_FILE, LeaseGrant, LeasedQuestion, Now,
    Rendezvous, StateWrites, Status,
};
pub use error::{CoordinatorError, Result};
pub use grpc::{CoordinatorGrpc, serve};
pub use options::{ActorSettings, CoordinatorOptions};
pub use persist::{STATE_FILE, VersionRecord};
