//! The one client ril has for OpenAI-compatible `POST {base_url}/chat/completions` endpoints
//! (vLLM, SGLang, llama.cpp, hosted APIs). Two roles talk to such endpoints: the teacher's
//! `openai` backend (answers, with images) and the discriminator's LLM judge (a verdict). What
//! they share lives here; what is theirs (the teacher's messages with images, the judge's prompt
//! and verdict) stays with them.
//!
//! - [`config`]: [`ClientConfig`] (endpoint, key, timeouts, retries, concurrency), checked by
//!   [`ClientConfig::validate`] with errors naming the field; [`seconds`] for durations in
//!   config files.
//! - [`wire`]: the request and reply types ([`ChatRequest`], [`ChatCompletion`]), reply
//!   excerpts for errors ([`snippet`]) and images as data URLs ([`image_data_url`]).
//! - [`client`]: [`OpenAiClient::post`], one logical call with retries.
//! - [`error`]: [`OpenAiError`], naming the endpoint, and the attempts when retries ran out.
//!
//! Retry policy: connect errors, timeouts, HTTP 408, 429 and 5xx are transient and retried up
//! to `max_retries` times with exponential backoff (doubling from `initial_backoff`, capped at
//! [`MAX_BACKOFF`], plus up to 25% jitter so that many clients do not retry in lockstep), or
//! after the server's `Retry-After` seconds (capped the same way). Other statuses fail at once.
//! A reply that arrives but cannot be read fails at once, or (with `retry_unreadable_once`) is
//! asked for once more, immediately: a sampled model or a proxy's error page served with 200
//! often does better the second time, a greedy one repeats itself. A call holds its concurrency
//! slot while it backs off, so an overloaded server is not refilled meanwhile.
//!
//! The API key is never printed: not by `Debug`, not in errors, not in logs.

pub mod client;
pub mod config;
pub mod error;
pub mod wire;

pub use client::OpenAiClient;
pub use config::{
    ClientConfig, ConfigError, check_api_key, default_initial_backoff, default_max_concurrency,
    endpoint_url, seconds,
};
pub use error::OpenAiError;
pub use reqwest::StatusCode;
pub use wire::{
    ChatCompletion, ChatMessage, ChatRequest, Choice, MAX_DETAIL_CHARS, image_data_url, image_mime,
    snippet,
};

use std::time::Duration;

/// Longest wait between two attempts, whatever the backoff or the server's `Retry-After` say: a
/// server that wants longer is treated as down rather than stalling its caller.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
