//! The learner (R ranks, one per GPU): policy + optimizer + frozen reference, the Dr.GRPO loss,
//! gradient all-reduce across ranks (NCCL on GPUs, a CPU collective for development),
//! checkpoints and weight publication.
//!
//! Status: the optimizer, gradient accumulation and checkpointed optimizer state live in
//! `ril_model::optim`; the loss, the ranks and the collectives arrive with later issues. What is
//! here now is the NCCL library probe, so a machine without CUDA gets an error instead of a panic.

pub mod gpu;
