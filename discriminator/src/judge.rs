//! The answer reward: an LLM judge behind an OpenAI-compatible chat-completions endpoint (vLLM,
//! SGLang, or a hosted API), asked whether a response captures the core point of the reference
//! answer, as in the paper.
//!
//! A judge that cannot answer must never look like a judge that said 0: a 0 teaches the policy
//! that a correct answer was wrong. So every failure (unreachable, refused, unreadable reply) is a
//! [`JudgeError`], and the caller decides whether to drop the sample or stop.
//!
//! Retry policy:
//! - connect errors, timeouts, HTTP 408, 429 and 5xx are transient: retried up to
//!   `max_retries` times with exponential backoff (doubling from `initial_backoff`, capped at
//!   [`MAX_BACKOFF`], plus up to 25% jitter so that many clients do not retry in lockstep), or
//!   after the server's `Retry-After` seconds when it sends them (capped the same way). When they
//!   run out: [`JudgeError::Unreachable`], carrying the last failure.
//! - other 4xx (bad key, unknown model, prompt too long) will not change by asking again:
//!   [`JudgeError::Http`] at once.
//! - a reply without a readable score is retried once (within `max_retries`), immediately: a
//!   sampled judge (temperature > 0) or a proxy's transient error page served with 200 often
//!   succeeds the second time, but a greedy judge repeats itself, so more tries only cost time.
//!   Then [`JudgeError::Unparseable`].
//!
//! The concurrency limit is per client and covers every call, `judge` and `judge_many` alike,
//! because its purpose is to protect the judge server, not to batch one call. A request keeps its
//! slot while it backs off, so an overloaded judge is not refilled by other requests meanwhile.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tracing::{debug, instrument, warn};

/// The paper's judge prompt. The placeholders are filled in a single pass, so a question or a
/// response that itself contains `{reference}` is sent verbatim.
pub const JUDGE_PROMPT_TEMPLATE: &str = "\
You are a strict grader. Compare a generated answer with the reference answer to a question.

Question:
{question}

Reference answer:
{reference}

Generated answer:
{response}

Output 1 if the generated text fully and correctly captures the core point of the reference \
answer, else 0. Give a brief explanation first, then the score inside <answer></answer>, for \
example <answer>1</answer>.";

/// Longest wait between two attempts, whatever the backoff or the server's `Retry-After` say: a
/// judge that wants longer is treated as down rather than stalling the training loop.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Longest excerpt of a reply quoted in an error: enough to recognise an HTML error page or a
/// truncated answer, short enough for one log line.
const MAX_DETAIL_CHARS: usize = 200;

/// Fills [`JUDGE_PROMPT_TEMPLATE`].
pub fn render_judge_prompt(question: &str, reference: &str, response: &str) -> String {
    let placeholders = [
        ("{question}", question),
        ("{reference}", reference),
        ("{response}", response),
    ];
    let template = JUDGE_PROMPT_TEMPLATE;
    let mut prompt =
        String::with_capacity(template.len() + question.len() + reference.len() + response.len());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        prompt.push_str(&rest[..open]);
        let tail = &rest[open..];
        match placeholders
            .iter()
            .find(|(placeholder, _)| tail.starts_with(placeholder))
        {
            Some((placeholder, value)) => {
                prompt.push_str(value);
                rest = &tail[placeholder.len()..];
            }
            None => {
                prompt.push('{');
                rest = &tail[1..];
            }
        }
    }
    prompt.push_str(rest);
    prompt
}

/// Where and how to ask the judge. Durations are written in seconds (`timeout = 30`,
/// `initial_backoff = 0.5`).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JudgeConfig {
    /// The API root, as OpenAI clients take it: `http://127.0.0.1:8000/v1`.
    pub base_url: String,
    /// The model name the server serves the judge under.
    pub model: String,
    /// Sent as `Authorization: Bearer`. Never serialised, logged or shown by `Debug`, so that a
    /// config dump or an error report cannot leak it.
    #[serde(default, skip_serializing)]
    pub api_key: Option<String>,
    /// Per attempt, from sending the request to the end of the reply.
    #[serde(default = "default_timeout", with = "seconds")]
    pub timeout: Duration,
    /// Attempts after the first one for transient failures.
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    /// Wait before the first retry; doubled for each following one.
    #[serde(default = "default_initial_backoff", with = "seconds")]
    pub initial_backoff: Duration,
    /// Requests in flight at once from this client.
    #[serde(default = "default_max_concurrency")]
    pub max_concurrency: usize,
    /// 0 by default: the reward should not depend on the judge's dice.
    #[serde(default)]
    pub temperature: f64,
    /// Room for the brief explanation and the tag; a reply cut short has no score.
    #[serde(default = "default_max_tokens")]
    pub max_tokens: u32,
}

fn default_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_max_retries() -> u32 {
    3
}
fn default_initial_backoff() -> Duration {
    Duration::from_millis(500)
}
fn default_max_concurrency() -> usize {
    16
}
fn default_max_tokens() -> u32 {
    512
}

impl JudgeConfig {
    /// Defaults for everything but where the judge is.
    pub fn new(base_url: impl Into<String>, model: impl Into<String>) -> Self {
        Self {
            base_url: base_url.into(),
            model: model.into(),
            api_key: None,
            timeout: default_timeout(),
            max_retries: default_max_retries(),
            initial_backoff: default_initial_backoff(),
            max_concurrency: default_max_concurrency(),
            temperature: 0.0,
            max_tokens: default_max_tokens(),
        }
    }

    /// Short timeouts and backoffs, so that tests of failures finish in milliseconds.
    pub fn for_test(base_url: impl Into<String>) -> Self {
        Self {
            timeout: Duration::from_secs(5),
            max_retries: 2,
            initial_backoff: Duration::from_millis(1),
            max_concurrency: 4,
            ..Self::new(base_url, "test-judge")
        }
    }

    /// The URL requests go to: `{base_url}/chat/completions`.
    pub fn endpoint(&self) -> String {
        format!("{}/chat/completions", self.base_url.trim_end_matches('/'))
    }

    pub fn validate(&self) -> Result<(), JudgeError> {
        let invalid =
            |field: &'static str, reason: String| Err(JudgeError::InvalidConfig { field, reason });
        match reqwest::Url::parse(&self.base_url) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.has_host() => {}
            Ok(_) => {
                return invalid(
                    "base_url",
                    format!(
                        "must be an http(s) URL with a host, like {}; got `{}`",
                        "http://127.0.0.1:8000/v1", self.base_url
                    ),
                );
            }
            Err(error) => {
                return invalid(
                    "base_url",
                    format!(
                        "`{}` is not a URL ({error}); expected e.g. http://127.0.0.1:8000/v1",
                        self.base_url
                    ),
                );
            }
        }
        if self
            .base_url
            .trim_end_matches('/')
            .ends_with("/chat/completions")
        {
            return invalid(
                "base_url",
                "is the API root (e.g. http://127.0.0.1:8000/v1); `/chat/completions` is appended"
                    .to_owned(),
            );
        }
        if self.model.trim().is_empty() {
            return invalid("model", "must name the served judge model".to_owned());
        }
        if let Some(key) = &self.api_key
            && (key.is_empty() || key.chars().any(|c| c.is_control() || !c.is_ascii()))
        {
            // The key itself is never quoted.
            return invalid(
                "api_key",
                "must be non-empty printable ASCII (check for a trailing newline)".to_owned(),
            );
        }
        if self.timeout.is_zero() {
            return invalid("timeout", "must be positive".to_owned());
        }
        if self.max_concurrency == 0 {
            return invalid("max_concurrency", "must be at least 1".to_owned());
        }
        if !(self.temperature.is_finite() && (0.0..=2.0).contains(&self.temperature)) {
            return invalid(
                "temperature",
                format!("must be in [0, 2]; got {}", self.temperature),
            );
        }
        if self.max_tokens == 0 {
            return invalid(
                "max_tokens",
                "must be at least 1 (the reply needs room for <answer>)".to_owned(),
            );
        }
        Ok(())
    }
}

impl fmt::Debug for JudgeConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JudgeConfig")
            .field("base_url", &self.base_url)
            .field("model", &self.model)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("timeout", &self.timeout)
            .field("max_retries", &self.max_retries)
            .field("initial_backoff", &self.initial_backoff)
            .field("max_concurrency", &self.max_concurrency)
            .field("temperature", &self.temperature)
            .field("max_tokens", &self.max_tokens)
            .finish()
    }
}

/// Durations as (fractional) seconds, the unit people write in config files.
mod seconds {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

    pub fn serialize<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_f64(duration.as_secs_f64())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let seconds = f64::deserialize(deserializer)?;
        Duration::try_from_secs_f64(seconds).map_err(|_| {
            D::Error::custom(format!(
                "expected a non-negative number of seconds, got {seconds}"
            ))
        })
    }
}

/// The judge's verdict on one response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JudgeScore {
    /// 1 if the response captures the reference answer's core point, else 0.
    pub score: u8,
    /// What the judge wrote before its final `<answer>` tag.
    pub explanation: String,
    /// The judge's whole reply, for audits of surprising rewards.
    pub raw: String,
}

/// Why the judge gave no score. Every message names the endpoint and is complete on one line
/// (causes are rendered into it rather than left to `source()`), because these end up in log
/// fields and RPC statuses where an error chain is lost.
#[derive(Debug, thiserror::Error)]
pub enum JudgeError {
    #[error("invalid judge config: `{field}` {reason}")]
    InvalidConfig { field: &'static str, reason: String },

    #[error("could not build the HTTP client for judge {endpoint}: {}", error_chain(.error))]
    ClientBuild {
        endpoint: String,
        error: reqwest::Error,
    },

    /// One attempt failed before a status arrived (connect error, timeout, broken connection).
    /// Only seen inside [`JudgeError::Unreachable`].
    #[error("judge {endpoint}: {}", error_chain(.error))]
    Transport {
        endpoint: String,
        error: reqwest::Error,
    },

    #[error("judge {endpoint} answered {status}: {detail}")]
    Http {
        endpoint: String,
        status: StatusCode,
        /// The start of the reply body.
        detail: String,
    },

    #[error(
        "judge {endpoint} unreachable after {attempts} attempt{}; last error: {}",
        if *.attempts == 1 { "" } else { "s" },
        .last_error.reason()
    )]
    Unreachable {
        endpoint: String,
        attempts: u32,
        /// A [`JudgeError::Transport`] or a retryable [`JudgeError::Http`].
        last_error: Box<JudgeError>,
    },

    #[error("judge {endpoint} gave no readable score: {detail}")]
    Unparseable {
        endpoint: String,
        /// What was wrong, then the start of the reply; at most 200 characters.
        detail: String,
    },
}

impl JudgeError {
    /// The message without the leading "judge {endpoint}", for nesting in a message that
    /// already names it.
    fn reason(&self) -> String {
        match self {
            JudgeError::Transport { error, .. } => error_chain(error),
            JudgeError::Http { status, detail, .. } => format!("answered {status}: {detail}"),
            other => other.to_string(),
        }
    }
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

/// A client for one judge endpoint. Cloning is cheap and clones share the concurrency limit.
#[derive(Clone)]
pub struct JudgeClient {
    config: Arc<JudgeConfig>,
    endpoint: Arc<str>,
    http: reqwest::Client,
    slots: Arc<Semaphore>,
}

impl fmt::Debug for JudgeClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JudgeClient")
            .field("endpoint", &self.endpoint)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct ChatRequest<'a> {
    model: &'a str,
    messages: [ChatMessage<'a>; 1],
    temperature: f64,
    max_tokens: u32,
    n: u32,
}

#[derive(Serialize)]
struct ChatMessage<'a> {
    role: &'static str,
    content: &'a str,
}

#[derive(Deserialize)]
struct ChatCompletion {
    choices: Vec<ChatChoice>,
}

#[derive(Deserialize)]
struct ChatChoice {
    message: ChatReply,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct ChatReply {
    #[serde(default)]
    content: Option<String>,
}

/// How one attempt ended, when it did not produce a score.
enum AttemptFailure {
    /// Worth another attempt after a backoff (or after the server's `Retry-After`).
    Transient {
        error: JudgeError,
        retry_after: Option<Duration>,
    },
    /// The server answered but no score could be read from it.
    Unparseable(String),
    /// Asking again will not help.
    Fatal(JudgeError),
}

impl JudgeClient {
    pub fn new(config: JudgeConfig) -> Result<Self, JudgeError> {
        config.validate()?;
        let endpoint = config.endpoint();
        install_crypto_provider();
        let http = reqwest::Client::builder()
            .build()
            .map_err(|error| JudgeError::ClientBuild {
                endpoint: endpoint.clone(),
                error,
            })?;
        Ok(Self {
            slots: Arc::new(Semaphore::new(config.max_concurrency)),
            endpoint: endpoint.into(),
            config: Arc::new(config),
            http,
        })
    }

    pub fn config(&self) -> &JudgeConfig {
        &self.config
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Asks whether `response` captures the core point of `reference` as an answer to
    /// `question`.
    #[instrument(
        level = "debug",
        skip_all,
        fields(endpoint = %self.endpoint, model = %self.config.model)
    )]
    pub async fn judge(
        &self,
        question: &str,
        reference: &str,
        response: &str,
    ) -> Result<JudgeScore, JudgeError> {
        let prompt = render_judge_prompt(question, reference, response);
        let request = ChatRequest {
            model: &self.config.model,
            messages: [ChatMessage {
                role: "user",
                content: &prompt,
            }],
            temperature: self.config.temperature,
            max_tokens: self.config.max_tokens,
            n: 1,
        };
        let _slot = self
            .slots
            .acquire()
            .await
            .expect("the judge's semaphore is never closed");

        let max_attempts = self.config.max_retries.saturating_add(1);
        let mut retried_unparseable = false;
        let mut attempt = 0;
        loop {
            attempt += 1;
            debug!(attempt, "asking the judge");
            let failure = match self.attempt(&request).await {
                Ok(score) => {
                    debug!(attempt, score = score.score, "judge answered");
                    return Ok(score);
                }
                Err(failure) => failure,
            };
            match failure {
                AttemptFailure::Fatal(error) => return Err(error),
                AttemptFailure::Unparseable(detail) => {
                    if retried_unparseable || attempt >= max_attempts {
                        return Err(JudgeError::Unparseable {
                            endpoint: self.endpoint.to_string(),
                            detail,
                        });
                    }
                    retried_unparseable = true;
                    warn!(attempt, %detail, "judge reply had no score; asking once more");
                }
                AttemptFailure::Transient { error, retry_after } => {
                    if attempt >= max_attempts {
                        return Err(JudgeError::Unreachable {
                            endpoint: self.endpoint.to_string(),
                            attempts: attempt,
                            last_error: Box::new(error),
                        });
                    }
                    let delay = retry_after.map_or_else(
                        || backoff(self.config.initial_backoff, attempt),
                        |after| after.min(MAX_BACKOFF),
                    );
                    warn!(attempt, ?delay, %error, "judge attempt failed; retrying");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Judges `(question, reference, response)` triples, at most `max_concurrency` at a time;
    /// the results are in the order of `items`, and one failure does not stop the others.
    #[instrument(
        level = "debug",
        skip_all,
        fields(endpoint = %self.endpoint, n_items = items.len())
    )]
    pub async fn judge_many<Q, R, S>(
        &self,
        items: &[(Q, R, S)],
    ) -> Vec<Result<JudgeScore, JudgeError>>
    where
        Q: AsRef<str>,
        R: AsRef<str>,
        S: AsRef<str>,
    {
        futures_util::future::join_all(items.iter().map(|(question, reference, response)| {
            self.judge(question.as_ref(), reference.as_ref(), response.as_ref())
        }))
        .await
    }

    async fn attempt(&self, request: &ChatRequest<'_>) -> Result<JudgeScore, AttemptFailure> {
        let transport = |error: reqwest::Error| AttemptFailure::Transient {
            error: JudgeError::Transport {
                endpoint: self.endpoint.to_string(),
                error,
            },
            retry_after: None,
        };
        let mut builder = self
            .http
            .post(&*self.endpoint)
            .timeout(self.config.timeout)
            .json(request);
        if let Some(key) = &self.config.api_key {
            // reqwest marks the header sensitive, so it is not printed by its Debug either.
            builder = builder.bearer_auth(key);
        }
        let reply = builder.send().await.map_err(transport)?;
        let status = reply.status();
        let retry_after = reply
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = reply.bytes().await.map_err(transport)?;
        let body = String::from_utf8_lossy(&body);

        if !status.is_success() {
            let error = JudgeError::Http {
                endpoint: self.endpoint.to_string(),
                status,
                detail: snippet(&body, MAX_DETAIL_CHARS),
            };
            let transient = status.is_server_error()
                || status == StatusCode::TOO_MANY_REQUESTS
                || status == StatusCode::REQUEST_TIMEOUT;
            return Err(if transient {
                AttemptFailure::Transient { error, retry_after }
            } else {
                AttemptFailure::Fatal(error)
            });
        }
        parse_completion(&body).map_err(AttemptFailure::Unparseable)
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

/// Reads a chat completion's first choice, or says (within 200 characters) why it cannot.
fn parse_completion(body: &str) -> Result<JudgeScore, String> {
    let unparseable = |reason: &str| snippet(&format!("{reason}: {body}"), MAX_DETAIL_CHARS);
    let completion: ChatCompletion = serde_json::from_str(body)
        .map_err(|error| unparseable(&format!("reply is not a chat completion ({error})")))?;
    let Some(choice) = completion.choices.into_iter().next() else {
        return Err(unparseable("reply has no choices"));
    };
    let content = choice.message.content.unwrap_or_default();
    parse_verdict(&content).ok_or_else(|| {
        let reason = match choice.finish_reason.as_deref() {
            Some("length") => {
                "no <answer>0|1</answer> (cut off at max_tokens; raise it)".to_owned()
            }
            _ => "no <answer>0|1</answer> in the judge's last tag".to_owned(),
        };
        snippet(&format!("{reason}: {content}"), MAX_DETAIL_CHARS)
    })
}

/// The score in the last `<answer>…</answer>` pair. Only the last counts: the judge may quote the
/// tag while explaining, but its verdict comes at the end. A last pair holding anything but 0 or
/// 1 is no score, not a reason to look at earlier ones.
fn parse_verdict(content: &str) -> Option<JudgeScore> {
    const OPEN: &str = "<answer>";
    const CLOSE: &str = "</answer>";
    // ASCII lowercasing keeps byte offsets, so positions found here index `content` too.
    let lower = content.to_ascii_lowercase();
    let close = lower.rfind(CLOSE)?;
    let open = lower[..close].rfind(OPEN)?;
    let score = match content[open + OPEN.len()..close].trim() {
        "0" => 0,
        "1" => 1,
        _ => return None,
    };
    Some(JudgeScore {
        score,
        explanation: content[..open].trim().to_owned(),
        raw: content.to_owned(),
    })
}

/// The start of `text` on one line (whitespace runs collapsed), at most `max_chars` characters.
fn snippet(text: &str, max_chars: usize) -> String {
    let one_line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() <= max_chars {
        return one_line;
    }
    let mut cut: String = one_line.chars().take(max_chars - 1).collect();
    cut.push('…');
    cut
}
