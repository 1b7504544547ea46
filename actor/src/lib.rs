//! The rollout actor (scaled separately, one per device): keeps a copy of the current policy,
//! leases prompts from the coordinator, samples G responses per question with the KV cache and
//! records behaviour log-probs and policy versions, gathers teacher answers (round-robin across
//! teachers, fetched while the student samples) and discriminator scores, and pushes scored
//! groups to the learner.
//!
//! - [`sync`]: chunked, verified weight transfer; a version is applied whole or not at all.
//! - [`rollout`]: the model-side half (sampling, teacher tokenisation, rewards), no gRPC.
//! - [`run`]: the loop against the coordinator, learner, teachers and discriminator.

pub mod error;
pub mod rollout;
pub mod run;
pub mod sync;

pub use error::ActorError;
pub use run::{ActorOptions, ActorSummary, run_actor};
