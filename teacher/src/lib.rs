//! The teacher server (one per teacher model): answers questions from a backend, caches the
//! answers per (question id, teacher, sampling settings) in a persistent store, and streams them
//! to actors over `ril.v1.Teacher`.
//!
//! - [`options`]: [`TeacherOptions`], the TOML table the CLI embeds in its run config
//!   (`backend = "candle" | "openai" | "replay"` selects the backend's fields); sampling
//!   settings are `ril_common::SamplingParams` (`sampling` table: the paper's by default).
//! - [`backend`]: a local candle checkpoint (batched generation on its own thread through
//!   `ril_model::generate::generate_sequences`, each answer with its own settings and random
//!   stream), any OpenAI-compatible `/v1/chat/completions` endpoint (the client is
//!   `ril_openai`'s; the messages with images as data URLs are the teacher's), or answers
//!   replayed from the dataset's `teacher_answers` / a JSONL file.
//! - [`cache`]: the redb answer cache; answer `i` of a key never changes once written.
//! - [`service`]: [`Teacher`], the domain service: cached answers first, then only the missing
//!   ones generated, one generation per key at a time. No tonic types.
//! - [`convert`]: the wire to the domain (`TryFrom<AnswerRequest>`, every field checked and
//!   named) and back; [`error`]: [`TeacherError`] and its kind at the RPC edge
//!   (`ril_proto::ServiceError`).
//! - [`grpc`]: the thin gRPC adapter (convert, call, `ril_proto::error::status`) and [`serve`]
//!   (health NOT_SERVING until the backend is loaded, reflection, explicit message limits,
//!   graceful shutdown).

pub mod backend;
pub mod cache;
pub mod convert;
pub mod error;
pub mod grpc;
pub mod options;
pub mod service;

pub use error::TeacherError;
pub use grpc::{serve, serve_loading, serve_teacher};
pub use options::{
    BackendOptions, CandleOptions, DEFAULT_SHUTDOWN_GRACE, OpenAiOptions, ReplayOptions,
    TeacherOptions,
};
pub use service::{Answer, AnswerQuery, Teacher, TeacherInfo};
