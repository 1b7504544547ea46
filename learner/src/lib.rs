//! The learner (R ranks, one per GPU): policy + optimizer + frozen reference, the Dr.GRPO loss,
//! gradient all-reduce across ranks (NCCL on GPUs, a CPU collective for development),
//! checkpoints and weight publication.
//!
//! Today: supervised fine-tuning (`sft`), evaluation (`eval`), dataset rows as model inputs
//! (`examples`) and the NCCL library probe (`gpu`). The optimizer, gradient accumulation and
//! checkpointed optimizer state live in `ril_model::optim`. The RL loss, ranks and collectives
//! arrive with later issues.

pub mod error;
pub mod eval;
pub mod examples;
pub mod gpu;
pub mod sft;

pub use error::{LearnerError, Result};
