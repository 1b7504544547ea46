//! The teacher server (one per teacher model): answers questions from a backend (a local
//! candle checkpoint, an OpenAI-compatible endpoint, or replayed answers), caches answers per
//! (question id, teacher, sampling settings) in a persistent store, and streams them to actors.
//!
//! Status: placeholder crate; the backends and the gRPC service arrive with the services issue.
