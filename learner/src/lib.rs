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
//!   coordinator, per-iteration buffering, staleness, training on a blocking thread, the
//!   discriminator's per-iteration step and its buffer, publication, the rank-0 guard,
//!   shutdown. Its peers are traits with domain types ([`service::CoordinatorLink`],
//!   [`service::DiscriminatorLink`], [`service::ShardPeers`]), so tests drive it with fakes.
//! - `convert`: wire <-> domain conversions (`TryFrom<&ScoredGroup>` for a pushed group, the
//!   reverse for shards sent to other ranks, verdicts, weight chunks, D's Train items).
//! - `grpc`: the `ril.v1.Learner` and `ril.v1.LearnerRanks` adapter: convert, call the
//!   service, map its error through `ril_proto::error::status` (the kinds are
//!   [`LearnerError`]'s `ServiceError` impl).
//! - `client`: the gRPC clients behind the link traits (coordinator, discriminator, peer ranks);
//!   a failed call keeps the peer, address and call as a `ril_proto::RpcError`.
//! - `startup`: [`startup::serve`], the role's entry point, as named phases (serve, load the
//!   model, rendezvous, republish, join the collective and verify the weights, run).
//! - `options`: [`options::LearnerOptions`], the `[learner]` table of the run's TOML file.
//! - Supervised fine-tuning (`sft`), evaluation (`eval`) and the NCCL library probe (`gpu`).
//!   Dataset rows become model inputs through `ril-prompt`, as for every other role.
//!
//! Architecture invariant: only `grpc`, `convert`, `client` and `startup` know generated
//! protobuf or tonic types.

pub mod client;
pub mod collective;
pub mod convert;
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
pub mod startup;
pub mod trainer;

pub use error::{LearnerError, Result};
pub use grpo::GrpoConfig;
pub use options::LearnerOptions;
pub use startup::serve;
