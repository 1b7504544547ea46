//! The rollout actor (scaled separately, one per device): keeps a copy of the current policy,
//! leases prompts from the coordinator, samples G responses per question with the KV cache and
//! records behaviour log-probs and policy versions, gathers teacher answers and discriminator
//! scores, and pushes scored groups to the learner.
//!
//! Status: the crate exists so the workspace has its final shape; the domain service and its
//! gRPC adapter arrive with the services issue. Generation itself lives in `ril_model::generate`.
