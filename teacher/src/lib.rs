//! The teacher server (one per teacher model): answers questions from a backend, caches the
//! answers per (question id, teacher, sampling settings) in a persistent store, and streams them
//! to actors over `ril.v1.Teacher`.
//!
//! - [`options`]: [`TeacherOptions`], the TOML table the CLI embeds in its run config
//!   (`backend = "candle" | "openai" | "replay"` selects the backend's fields).
//! - [`backend`]: a local candle checkpoint (batched generation on its own thread, per-answer
//!   random streams), any OpenAI-compatible `/v1/chat/completions` endpoint (images as data
//!   URLs, `n` answers per call, retries with backoff, a concurrency limit), or answers replayed
//!   from the dataset's `teacher_answers` / a JSONL file.
//! - [`cache`]: the redb answer cache; answer `i` of a key never changes once written.
//! - [`service`]: [`Teacher`], the domain service: cached answers first, then only the missing
//!   ones generated, one generation per key at a time. No tonic types.
//! - [`grpc`]: the thin gRPC adapter and [`serve`] (health NOT_SERVING until the backend is
//!   loaded, reflection, explicit message limits, graceful shutdown).

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
