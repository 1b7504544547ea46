//! The OpenAI-compatible backend: `POST {base_url}/chat/completions` on vLLM, SGLang, llama.cpp or
//! OpenAI itself. The question's turns become chat messages; its images travel inline as data
//! URLs (`data:image/png;base64,...`, the type read from the bytes) in `image_url` content parts,
//! where the question places them (`{"type": "image"}` parts or `<image>` in the text), or before
//! the first user turn's text when it places none.
//!
//! One call asks for up to `max_n_per_call` choices (`n`); a server that returns fewer (some
//! ignore `n`) is asked again for the rest. Each call sends `seed + first answer index`, so
//! successive calls do not repeat one another.
//!
//! Retry policy (as the judge's): connect errors, timeouts, HTTP 408, 429 and 5xx are retried up
//! to `max_retries` times with exponential backoff (doubling from `initial_backoff`, capped at
//! [`MAX_BACKOFF`], plus up to 25% jitter), or after the server's `Retry-After` seconds. Other
//! statuses and unreadable replies fail at once. A request holds its concurrency slot while it
//! backs off, so an overloaded server is not refilled meanwhile.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use reqwest::StatusCode;
use ril_data::Row;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc};
use tracing::{debug, warn};

use crate::error::TeacherError;
use crate::options::{OpenAiOptions, SamplingSettings};

/// Longest wait between two attempts, whatever the backoff or `Retry-After` say.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Longest excerpt of a reply quoted in an error.
const MAX_DETAIL_CHARS: usize = 300;

pub struct OpenAiBackend {
    options: OpenAiOptions,
    endpoint: String,
    /// Read from `api_key_env` at load; never printed.
    api_key: Option<String>,
    http: reqwest::Client,
    slots: Arc<Semaphore>,
}

impl fmt::Debug for OpenAiBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiBackend")
            .field("endpoint", &self.endpoint)
            .field("model", &self.options.model)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

enum Failure {
    Transient {
        detail: String,
        retry_after: Option<Duration>,
    },
    Fatal(TeacherError),
}

impl OpenAiBackend {
    /// Reads the API key from its environment variable and builds the HTTP client. Nothing is
    /// sent: a server that is down is reported by the first request, naming the endpoint.
    pub fn load(options: &OpenAiOptions) -> Result<Self, TeacherError> {
        let endpoint = options.endpoint();
        let api_key = match &options.api_key_env {
            None => None,
            Some(var) => {
                let key = std::env::var(var).map_err(|_| {
                    TeacherError::config(
                        "api_key_env",
                        format!("the environment variable {var} is not set (or not UTF-8)"),
                    )
                })?;
                if key.is_empty() || key.chars().any(|c| c.is_control() || !c.is_ascii()) {
                    // The key itself is never quoted.
                    return Err(TeacherError::config(
                        "api_key_env",
                        format!(
                            "the key in {var} must be non-empty printable ASCII (check for a trailing newline)"
                        ),
                    ));
                }
                Some(key)
            }
        };
        install_crypto_provider();
        let http = reqwest::Client::builder()
            .connect_timeout(options.connect_timeout)
            .build()
            .map_err(|e| TeacherError::Load {
                backend: "openai",
                what: endpoint.clone(),
                reason: error_chain(&e),
            })?;
        Ok(Self {
            slots: Arc::new(Semaphore::new(options.max_concurrency)),
            options: options.clone(),
            endpoint,
            api_key,
            http,
        })
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn describe(&self) -> String {
        format!("{} at {}", self.options.model, self.endpoint)
    }

    /// Generates answers `indices` of `row` and sends them, in order, to `out`.
    pub async fn generate(
        &self,
        row: &Row,
        settings: &SamplingSettings,
        indices: Range<u32>,
        out: &mpsc::Sender<(u32, String)>,
    ) -> Result<(), TeacherError> {
        let messages = chat_messages(row)?;
        let mut next = indices.start;
        while next < indices.end {
            let want = (indices.end - next).min(self.options.max_n_per_call);
            let body = self.request_body(&messages, settings, want, next);
            let texts = self.call(&body).await?;
            if texts.is_empty() {
                return Err(TeacherError::Endpoint {
                    endpoint: self.endpoint.clone(),
                    detail: format!("returned no choices (asked for n = {want})"),
                });
            }
            if (texts.len() as u32) < want {
                debug!(
                    asked = want,
                    got = texts.len(),
                    "the endpoint returned fewer choices than asked for; asking again for the rest"
                );
            }
            for text in texts.into_iter().take(want as usize) {
                if out.send((next, text)).await.is_err() {
                    return Ok(());
                }
                next += 1;
            }
        }
        Ok(())
    }

    fn request_body(
        &self,
        messages: &[Value],
        settings: &SamplingSettings,
        n: u32,
        first_index: u32,
    ) -> Value {
        let mut body = json!({
            "model": self.options.model,
            "messages": messages,
            "n": n,
            "temperature": settings.temperature,
            "top_p": settings.top_p,
            "max_tokens": settings.max_new_tokens,
            "seed": settings.seed.wrapping_add(u64::from(first_index)),
        });
        if self.options.extended_sampling {
            if settings.top_k > 0 {
                body["top_k"] = json!(settings.top_k);
            }
            if settings.repetition_penalty != 1.0 {
                body["repetition_penalty"] = json!(settings.repetition_penalty);
            }
        }
        body
    }

    /// One logical call, with retries.
    async fn call(&self, body: &Value) -> Result<Vec<String>, TeacherError> {
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| TeacherError::ShuttingDown("the HTTP client is closed".into()))?;
        let max_attempts = self.options.max_retries.saturating_add(1);
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.attempt(body).await {
                Ok(texts) => return Ok(texts),
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Transient {
                    detail,
                    retry_after,
                }) => {
                    if attempt >= max_attempts {
                        return Err(TeacherError::Unreachable {
                            endpoint: self.endpoint.clone(),
                            attempts: attempt,
                            last_error: detail,
                        });
                    }
                    let delay = retry_after.map_or_else(
                        || backoff(self.options.initial_backoff, attempt),
                        |after| after.min(MAX_BACKOFF),
                    );
                    warn!(endpoint = %self.endpoint, attempt, ?delay, error = %detail, "teacher call failed; retrying");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    async fn attempt(&self, body: &Value) -> Result<Vec<String>, Failure> {
        let transport = |e: reqwest::Error| Failure::Transient {
            detail: error_chain(&e),
            retry_after: None,
        };
        let mut request = self
            .http
            .post(&self.endpoint)
            .timeout(self.options.timeout)
            .json(body);
        if let Some(key) = &self.api_key {
            // reqwest marks the header sensitive, so its Debug does not print it either.
            request = request.bearer_auth(key);
        }
        let reply = request.send().await.map_err(transport)?;
        let status = reply.status();
        let retry_after = reply
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let bytes = reply.bytes().await.map_err(transport)?;
        let text = String::from_utf8_lossy(&bytes);
        if !status.is_success() {
            let detail = format!("answered {status}: {}", snippet(&text));
            let transient = status.is_server_error()
                || status == StatusCode::TOO_MANY_REQUESTS
                || status == StatusCode::REQUEST_TIMEOUT;
            return Err(if transient {
                Failure::Transient {
                    detail,
                    retry_after,
                }
            } else {
                Failure::Fatal(TeacherError::Endpoint {
                    endpoint: self.endpoint.clone(),
                    detail,
                })
            });
        }
        parse_completion(&text).map_err(|detail| {
            Failure::Fatal(TeacherError::Endpoint {
                endpoint: self.endpoint.clone(),
                detail,
            })
        })
    }
}

#[derive(Deserialize)]
struct Completion {
    choices: Vec<Choice>,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    index: Option<u32>,
    message: ChoiceMessage,
}

#[derive(Deserialize)]
struct ChoiceMessage {
    #[serde(default)]
    content: Option<Value>,
}

/// The texts of a completion's choices, in choice order.
fn parse_completion(body: &str) -> Result<Vec<String>, String> {
    let completion: Completion = serde_json::from_str(body).map_err(|e| {
        format!(
            "gave a reply that is not a chat completion ({e}): {}",
            snippet(body)
        )
    })?;
    let mut choices = completion.choices;
    choices.sort_by_key(|c| c.index.unwrap_or(u32::MAX));
    choices
        .into_iter()
        .enumerate()
        .map(|(i, c)| match c.message.content {
            Some(Value::String(s)) => Ok(s.trim().to_string()),
            // Some servers answer with content parts.
            Some(Value::Array(parts)) => Ok(parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join("")
                .trim()
                .to_string()),
            _ => Err(format!(
                "gave choice {i} without text content: {}",
                snippet(body)
            )),
        })
        .collect()
}

/// The question as OpenAI chat messages with its images inline.
pub(crate) fn chat_messages(row: &Row) -> Result<Vec<Value>, TeacherError> {
    let bad = |reason: String| TeacherError::BadQuestion {
        id: row.id.clone(),
        reason,
    };
    let urls: Vec<String> = row
        .images
        .iter()
        .map(|im| {
            image_mime(&im.bytes)
                .map(|mime| {
                    format!(
                        "data:{mime};base64,{}",
                        base64::engine::general_purpose::STANDARD.encode(&im.bytes)
                    )
                })
                .ok_or_else(|| {
                    bad(format!(
                        "image {:?} is not PNG, JPEG, WebP or GIF (by its first bytes)",
                        im.name
                    ))
                })
        })
        .collect::<Result<_, _>>()?;
    let placeholders = row.image_placeholders();
    // Where the images go when no message places them: the rule every role shares.
    let image_turn = ril_prompt::image_turn(row);
    let mut next = 0usize;
    let image_part = |next: &mut usize| -> Result<Value, TeacherError> {
        let url = urls.get(*next).ok_or_else(|| {
            bad(format!(
                "the conversation has {placeholders} image placeholders but {} images",
                urls.len()
            ))
        })?;
        *next += 1;
        Ok(json!({"type": "image_url", "image_url": {"url": url}}))
    };
    let mut messages = Vec::with_capacity(row.messages.len());
    for (i, m) in row.messages.iter().enumerate() {
        let content = match &m.content {
            Value::String(text) if text.contains("<image>") => {
                let mut parts = Vec::new();
                for (k, segment) in text.split("<image>").enumerate() {
                    if k > 0 {
                        parts.push(image_part(&mut next)?);
                    }
                    if !segment.trim().is_empty() {
                        parts.push(json!({"type": "text", "text": segment}));
                    }
                }
                Value::Array(parts)
            }
            Value::String(text) if Some(i) == image_turn => {
                let mut parts = Vec::new();
                for _ in 0..urls.len() {
                    parts.push(image_part(&mut next)?);
                }
                parts.push(json!({"type": "text", "text": text}));
                Value::Array(parts)
            }
            Value::Array(parts) => Value::Array(
                parts
                    .iter()
                    .map(|p| {
                        if p.get("type").and_then(Value::as_str) == Some("image") {
                            image_part(&mut next)
                        } else {
                            Ok(p.clone())
                        }
                    })
                    .collect::<Result<_, _>>()?,
            ),
            other => other.clone(),
        };
        messages.push(json!({"role": m.role, "content": content}));
    }
    if next != urls.len() {
        return Err(bad(format!(
            "the conversation has {placeholders} image placeholders but {} images",
            urls.len()
        )));
    }
    Ok(messages)
}

/// The MIME type of an encoded image, from its magic bytes.
pub(crate) fn image_mime(bytes: &[u8]) -> Option<&'static str> {
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some("image/png")
    } else if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some("image/jpeg")
    } else if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        Some("image/webp")
    } else if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
        Some("image/gif")
    } else {
        None
    }
}

/// reqwest's rustls backend is built without a crypto provider (see the workspace manifest) and
/// panics when none is installed; ring is installed unless the process chose one already.
fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race with another thread installing one is fine: any provider serves.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

fn backoff(initial: Duration, failed_attempts: u32) -> Duration {
    let exponent = failed_attempts.saturating_sub(1).min(20);
    let base = initial.saturating_mul(1 << exponent).min(MAX_BACKOFF);
    let jitter = base.mul_f64(rand::random_range(0.0..0.25));
    (base + jitter).min(MAX_BACKOFF)
}

/// reqwest's own message is a generic "error sending request for url (...)": the cause that
/// says what to fix (connection refused, timed out) is further down the chain.
fn error_chain(error: &reqwest::Error) -> String {
    let mut causes = Vec::new();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        causes.push(cause.to_string());
        source = cause.source();
    }
    if error.is_timeout() && !causes.iter().any(|c| c.contains("timed out")) {
        causes.insert(0, "timed out".to_owned());
    }
    if causes.is_empty() {
        causes.push(error.to_string());
    }
    causes.join(": ")
}

/// The start of `text` on one line, at most [`MAX_DETAIL_CHARS`] characters.
fn snippet(text: &str) -> String {
    let one_line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() <= MAX_DETAIL_CHARS {
        return one_line;
    }
    let mut cut: String = one_line.chars().take(MAX_DETAIL_CHARS - 1).collect();
    cut.push('…');
    cut
}

#[cfg(test)]
mod tests {
    use ril_data::dataset::{ImageData, Message};

    use super::*;

    fn row(content: Value, n_images: usize) -> Row {
        Row {
            id: "q1".into(),
            images: (0..n_images)
                .map(|i| ImageData {
                    name: format!("im{i}.png"),
                    bytes: b"\x89PNG\r\n\x1a\nrest".to_vec(),
                })
                .collect(),
            messages: vec![
                Message {
                    role: "system".into(),
                    content: Value::String("be brief".into()),
                },
                Message {
                    role: "user".into(),
                    content,
                },
            ],
            answer: "red".into(),
            answer_type: None,
            teacher_answers: Default::default(),
            family: None,
            extra: Default::default(),
        }
    }

    #[test]
    fn images_go_where_the_question_places_them() {
        let m = chat_messages(&row(Value::String("What colour?".into()), 1)).unwrap();
        assert_eq!(m[0], json!({"role": "system", "content": "be brief"}));
        let parts = m[1]["content"].as_array().unwrap();
        assert_eq!(parts.len(), 2);
        let url = parts[0]["image_url"]["url"].as_str().unwrap();
        assert!(url.starts_with("data:image/png;base64,"), "{url}");
        assert_eq!(parts[1], json!({"type": "text", "text": "What colour?"}));

        let m = chat_messages(&row(Value::String("A <image> and B <image>?".into()), 2)).unwrap();
        let kinds: Vec<&str> = m[1]["content"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap())
            .collect();
        assert_eq!(kinds, ["text", "image_url", "text", "image_url", "text"]);

        let m = chat_messages(&row(
            json!([{"type": "text", "text": "see"}, {"type": "image"}]),
            1,
        ))
        .unwrap();
        assert_eq!(m[1]["content"][1]["type"], "image_url");

        let e = chat_messages(&row(json!([{"type": "image"}, {"type": "image"}]), 1))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("q1") && e.contains("2 image placeholders"),
            "{e}"
        );
        let mut r = row(Value::String("x".into()), 1);
        r.images[0].bytes = b"BM....".to_vec();
        let e = chat_messages(&r).unwrap_err().to_string();
        assert!(e.contains("im0.png") && e.contains("q1"), "{e}");
    }

    #[test]
    fn mime_types_and_completions() {
        assert_eq!(image_mime(&[0xFF, 0xD8, 0xFF, 0xE0]), Some("image/jpeg"));
        assert_eq!(image_mime(b"RIFF\0\0\0\0WEBPVP8 "), Some("image/webp"));
        assert_eq!(image_mime(b"GIF89a.."), Some("image/gif"));
        assert_eq!(image_mime(b"hello"), None);
        let texts = parse_completion(
            r#"{"choices": [{"index": 1, "message": {"content": " b "}},
                            {"index": 0, "message": {"content": "a"}}]}"#,
        )
        .unwrap();
        assert_eq!(texts, ["a", "b"]);
        assert!(parse_completion("<html>").unwrap_err().contains("<html>"));
        assert!(
            parse_completion(r#"{"choices": [{"message": {"content": null}}]}"#)
                .unwrap_err()
                .contains("choice 0")
        );
    }
}
