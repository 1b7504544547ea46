//! The discriminator service (`ril discriminator`): D, the student architecture with a scalar
//! head, trained online GAIL-style to tell student answers (label 1) from teacher answers
//! (label 0), and the judge that gives the answer reward. For each response it returns both
//! reward components: D's probability that the student wrote it (r_sim = 1 when below 0.5) and
//! the judge's 0/1 answer score.
//!
//! - [`options`]: [`DiscriminatorOptions`], the `[discriminator]` table of the run's TOML.
//! - [`prompt`]: what D reads — the paper's discriminator prompt around the response, the
//!   question's text by default, its images when configured, through the chat template;
//!   responses keep their last `max_response_tokens` tokens.
//! - [`model`]: [`DiscriminatorModel`] — D from a student checkpoint (or resumed from its own),
//!   scoring, the binary cross-entropy step with AdamW (NaN/inf losses refused, weights
//!   untouched; idempotent per learner iteration; a frozen mode), checkpoints.
//! - [`checkpoint`]: D's checkpoint directories (`step-N/` + `latest`, written atomically).
//! - [`answer_judge`]: the answer reward, rule-based (`ril_data::answer::check`) or the LLM
//!   judge ([`judge`]: its prompt, config and verdict over `ril_openai`'s client).
//! - [`service`]: the domain service (D behind a read-write lock, model work on blocking
//!   threads); [`convert`]: the wire to the domain (`ScoreQuery`, `TrainBatch`, questions
//!   checked and named) and back; [`grpc`]: the thin `ril.v1.Discriminator` adapter (convert,
//!   call, `ril_proto::error::status`) and [`serve`]. [`error`]: [`DiscriminatorError`] and its
//!   kind at the RPC edge (`ril_proto::ServiceError`).
//! - [`pretrain`]: offline pre-training of D on k student and k teacher answers per question,
//!   and [`run_pretrain`], the pipeline behind `ril discriminator pretrain`.
//!
//! Architecture invariant: only `convert`, `grpc` (and `pretrain`'s teacher client) touch
//! generated `ril.v1` types; everything else is plain domain types.

pub mod answer_judge;
pub mod checkpoint;
pub mod convert;
pub mod error;
pub mod grpc;
pub mod judge;
pub mod model;
pub mod options;
pub mod pretrain;
pub mod prompt;
pub mod service;

pub use answer_judge::{AnswerJudge, AnswerScore};
pub use error::{DiscriminatorError, Result};
pub use grpc::{DiscriminatorGrpc, serve};
pub use model::{DiscriminatorModel, LabelledResponse, TrainOutcome};
pub use options::{DiscriminatorOptions, JudgeBackend};
pub use pretrain::{PretrainOptions, PretrainReport, PretrainSchedule, pretrain, run_pretrain};
pub use service::{DiscriminatorService, ResponseScore, ScoreOutcome};
