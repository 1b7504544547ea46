//! The rollout actor (scaled separately, one per device): keeps a copy of the current policy,
//! leases prompts from the coordinator, samples G responses per question with the KV cache and
//! records behaviour log-probs and policy versions, gathers teacher answers (round-robin across
//! teachers, fetched while the student samples) and discriminator scores, and pushes scored
//! groups to the learner.
//!
//! The role's shape: a domain loop over traits, and the wire behind them.
//! - [`actor`]: [`Actor`], the loop as named phases (register, lease, sync weights, roll out,
//!   score, push, complete) plus the heartbeat task, over domain types only.
//! - [`peers`]: the traits over the coordinator, learner, teachers and discriminator, and the
//!   domain types they carry (registration and its [`RolloutSettings`], leases, scores, scored
//!   groups). Tests put in-process fakes behind them.
//! - [`grpc`]: the gRPC clients implementing those traits (every call built and its failure
//!   named in one place); [`convert`]: `TryFrom` the wire for what the actor receives,
//!   validating each field, and `From` the domain for what it sends.
//! - [`sync`]: chunked, verified weight transfer; a version is applied whole or not at all.
//! - [`rollout`]: the model-side half (sampling, teacher tokenisation, rewards, a group's
//!   scored responses), no gRPC.
//! - [`run`]: [`run_actor`], what `ril actor` calls: load the student, register over gRPC, run.

pub mod actor;
pub mod convert;
pub mod error;
pub mod grpc;
pub mod metrics;
pub mod peers;
pub mod rollout;
pub mod run;
pub mod sync;

pub use actor::{Actor, ActorSummary, Peers, register};
pub use error::ActorError;
pub use metrics::ActorMetrics;
pub use peers::{Registration, RolloutSettings};
pub use run::{ActorOptions, run_actor};
