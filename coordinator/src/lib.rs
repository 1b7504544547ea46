//! The coordinator: owns the run (config, dataset cursor, prompt leases with deadlines, policy
//! versions, actor membership, learner rendezvous including the NCCL unique id, checkpoint
//! manifest, status). Control plane only: no tensors flow through it.
//!
//! Status: placeholder crate; it arrives with the services issue.
