//! The learner (R ranks, one per GPU): policy + optimizer + frozen reference, the Dr.GRPO loss
//! over mixed student/teacher groups, gradient all-reduce across ranks, checkpoints and weight
//! publication.
//!
//! - `grpo`: the RIL policy loss (RIL.md, Eq. 2) and one update ([`grpo::train_step`]): pure
//!   maths on the model, no I/O.
//! - `collective`: how ranks sum gradients ([`collective::Collective`]): the single-rank
//!   identity, and `ring` ([`ring::TcpRing`]), the CPU ring all-reduce over TCP with timeouts
//!   (the NCCL one slots in behind the same trait).
//! - `trainer`: policy, reference, AdamW, version and random stream on one rank; checkpoints
//!   that resume exactly; the safetensors weight payload with its SHA-256.
//! - `service`: the learner as a service without gRPC types: group validation, commit with the
//!   coordinator ([`service::CoordinatorLink`]), per-iteration buffering, staleness, training on
//!   a blocking thread, publication, shutdown.
//! - `grpc`: the `ril.v1.Learner` adapter, the coordinator client, and [`grpc::serve`] (the
//!   role's entry point).
//! - `options`: [`options::LearnerOptions`], the `[learner]` table of the run's TOML file.
//! - Supervised fine-tuning (`sft`), evaluation (`eval`) and the NCCL library probe (`gpu`).
//!   Dataset rows become model inputs through `ril-prompt`, as for every other role.
//!
//! Architecture invariant: only `grpc` knows generated protobuf or tonic types.

pub mod collective;
pub mod diagnostics;
pub mod error;
pub mod eval;
pub mod gpu;
pub mod grpc;
pub mod grpo;
pub mod metrics_log;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod options;
pub mod ring;
pub mod service;
pub mod sft;
pub mod trainer;

pub use error::{LearnerError, Result};
pub use grpc::serve;
pub use grpo::GrpoConfig;
pub use options::LearnerOptions;
