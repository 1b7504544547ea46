//! The answer reward: an LLM judge behind an OpenAI-compatible chat-completions endpoint (vLLM,
//! SGLang, or a hosted API), asked whether a response captures the core point of the reference
//! answer, as in the paper.
//!
//! A judge that cannot answer must never look like a judge that said 0: a 0 teaches the policy
//! that a correct answer was wrong. So every failure (unreachable, refused, unreadable reply) is a
//! [`JudgeError`], and the caller decides whether to drop the sample or stop.
//!
//! The HTTP side (retries with backoff, `Retry-After`, the concurrency limit, errors naming the
//! endpoint and the attempts) is `ril_openai`'s, shared with the teacher's openai backend; the
//! judge sets `retry_unreadable_once`: a reply without a readable score is asked for once more
//! (a sampled judge or a proxy's error page served with 200 often does better the second time;
//! a greedy judge repeats itself, so more tries only cost time). What is the judge's own: its
//! prompt ([`JUDGE_PROMPT_TEMPLATE`]), its config ([`JudgeConfig`]) and reading the verdict.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use ril_openai::{
    ChatCompletion, ChatMessage, ChatRequest, ClientConfig, OpenAiClient, OpenAiError, seconds,
    snippet,
};
use serde::{Deserialize, Serialize};
use tracing::{debug, instrument};

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
    #[serde(default = "ril_openai::default_initial_backoff", with = "seconds")]
    pub initial_backoff: Duration,
    /// Requests in flight at once from this client.
    #[serde(default = "ril_openai::default_max_concurrency")]
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
            initial_backoff: ril_openai::default_initial_backoff(),
            max_concurrency: ril_openai::default_max_concurrency(),
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

    /// The settings of the HTTP client (the judge's reply must carry a score, so an
    /// unreadable one is asked for once more).
    pub fn client_config(&self) -> ClientConfig {
        ClientConfig {
            base_url: self.base_url.clone(),
            api_key: self.api_key.clone(),
            timeout: self.timeout,
            connect_timeout: None,
            max_retries: self.max_retries,
            initial_backoff: self.initial_backoff,
            max_concurrency: self.max_concurrency,
            retry_unreadable_once: true,
        }
    }

    pub fn validate(&self) -> Result<(), JudgeError> {
        let invalid =
            |field: &'static str, reason: String| Err(JudgeError::InvalidConfig { field, reason });
        self.client_config()
            .validate()
            .or_else(|e| invalid(e.field, e.reason))?;
        if self.model.trim().is_empty() {
            return invalid("model", "must name the served judge model".to_owned());
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

/// Why the judge gave no score. A config the judge refuses, or a call that failed: the client's
/// error names the endpoint (and the attempts when retries ran out), complete on one line.
#[derive(Debug, thiserror::Error)]
pub enum JudgeError {
    #[error("invalid judge config: `{field}` {reason}")]
    InvalidConfig { field: &'static str, reason: String },

    #[error("judge {0}")]
    Client(#[from] OpenAiError),
}

/// A client for one judge endpoint. Cloning is cheap and clones share the concurrency limit,
/// which covers every call, `judge` and `judge_many` alike.
#[derive(Clone)]
pub struct JudgeClient {
    config: Arc<JudgeConfig>,
    client: OpenAiClient,
}

impl fmt::Debug for JudgeClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JudgeClient")
            .field("endpoint", &self.client.endpoint())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl JudgeClient {
    pub fn new(config: JudgeConfig) -> Result<Self, JudgeError> {
        config.validate()?;
        let client = OpenAiClient::new(config.client_config())?;
        Ok(Self {
            config: Arc::new(config),
            client,
        })
    }

    pub fn config(&self) -> &JudgeConfig {
        &self.config
    }

    pub fn endpoint(&self) -> &str {
        self.client.endpoint()
    }

    /// Asks whether `response` captures the core point of `reference` as an answer to
    /// `question`.
    #[instrument(
        level = "debug",
        skip_all,
        fields(endpoint = %self.client.endpoint(), model = %self.config.model)
    )]
    pub async fn judge(
        &self,
        question: &str,
        reference: &str,
        response: &str,
    ) -> Result<JudgeScore, JudgeError> {
        let prompt = render_judge_prompt(question, reference, response);
        let request = ChatRequest {
            model: self.config.model.clone(),
            messages: vec![ChatMessage::text("user", prompt)],
            n: 1,
            temperature: self.config.temperature as f32,
            top_p: None,
            max_tokens: self.config.max_tokens,
            seed: None,
            top_k: None,
            repetition_penalty: None,
        };
        let score = self.client.post(&request, read_score).await?;
        debug!(score = score.score, "judge answered");
        Ok(score)
    }

    /// Judges `(question, reference, response)` triples, at most `max_concurrency` at a time;
    /// the results are in the order of `items`, and one failure does not stop the others.
    #[instrument(
        level = "debug",
        skip_all,
        fields(endpoint = %self.client.endpoint(), n_items = items.len())
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
}

/// Reads a chat completion's first choice, or says (within 200 characters) why it cannot.
fn read_score(body: &str) -> Result<JudgeScore, String> {
    let completion = ChatCompletion::from_body(body)?;
    let Some(choice) = completion.choices.into_iter().next() else {
        return Err(snippet(&format!("reply has no choices: {body}")));
    };
    let content = choice.text().unwrap_or_default();
    parse_verdict(&content).ok_or_else(|| {
        let reason = match choice.finish_reason.as_deref() {
            Some("length") => {
                "no <answer>0|1</answer> (cut off at max_tokens; raise it)".to_owned()
            }
            _ => "no <answer>0|1</answer> in the judge's last tag".to_owned(),
        };
        snippet(&format!("{reason}: {content}"))
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
