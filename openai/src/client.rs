//! [`OpenAiClient`]: one endpoint, its concurrency limit, and the retrying POST.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use crate::MAX_BACKOFF;
use crate::config::ClientConfig;
use crate::error::OpenAiError;
use crate::wire::{ChatRequest, snippet};

/// A client for one endpoint. Cloning is cheap and clones share the concurrency limit, which
/// covers every call: its purpose is to protect the server.
#[derive(Clone)]
pub struct OpenAiClient {
    config: Arc<ClientConfig>,
    endpoint: Arc<str>,
    http: reqwest::Client,
    slots: Arc<Semaphore>,
}

impl fmt::Debug for OpenAiClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiClient")
            .field("endpoint", &self.endpoint)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// How one attempt ended, when it did not produce what the caller reads.
enum AttemptFailure {
    /// Worth another attempt after a backoff (or after the server's `Retry-After`).
    Transient {
        error: OpenAiError,
        retry_after: Option<Duration>,
    },
    /// A reply arrived and the caller could not read it (the reason, quoting the reply).
    Unreadable(String),
    /// Asking again will not help.
    Fatal(OpenAiError),
}

impl OpenAiClient {
    /// Checks the config and builds the HTTP client. Nothing is sent: a server that is down is
    /// reported by the first call.
    pub fn new(config: ClientConfig) -> Result<Self, OpenAiError> {
        config.validate()?;
        let endpoint = config.endpoint();
        install_crypto_provider();
        let mut builder = reqwest::Client::builder();
        if let Some(timeout) = config.connect_timeout {
            builder = builder.connect_timeout(timeout);
        }
        let http = builder.build().map_err(|error| OpenAiError::ClientBuild {
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

    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// The URL requests go to: `{base_url}/chat/completions`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Sends `request` and reads the reply body with `read` (which says why it cannot, quoting
    /// the reply, e.g. with [`crate::snippet`]), retrying as the crate docs say.
    pub async fn post<T>(
        &self,
        request: &ChatRequest,
        read: impl Fn(&str) -> Result<T, String>,
    ) -> Result<T, OpenAiError> {
        let _slot = self
            .slots
            .acquire()
            .await
            .expect("the client's semaphore is never closed");
        let max_attempts = self.config.max_retries.saturating_add(1);
        let mut retried_unreadable = false;
        let mut attempt = 0;
        loop {
            attempt += 1;
            debug!(endpoint = %self.endpoint, attempt, "posting a chat completion request");
            let failure = match self.attempt(request, &read).await {
                Ok(value) => return Ok(value),
                Err(failure) => failure,
            };
            match failure {
                AttemptFailure::Fatal(error) => return Err(error),
                AttemptFailure::Unreadable(detail) => {
                    if !self.config.retry_unreadable_once
                        || retried_unreadable
                        || attempt >= max_attempts
                    {
                        return Err(OpenAiError::Unparseable {
                            endpoint: self.endpoint.to_string(),
                            detail,
                        });
                    }
                    retried_unreadable = true;
                    warn!(endpoint = %self.endpoint, attempt, %detail, "unusable reply; asking once more");
                }
                AttemptFailure::Transient { error, retry_after } => {
                    if attempt >= max_attempts {
                        return Err(OpenAiError::Unreachable {
                            endpoint: self.endpoint.to_string(),
                            attempts: attempt,
                            last_error: Box::new(error),
                        });
                    }
                    let delay = retry_after.map_or_else(
                        || backoff(self.config.initial_backoff, attempt),
                        |after| after.min(MAX_BACKOFF),
                    );
                    warn!(endpoint = %self.endpoint, attempt, ?delay, %error, "call failed; retrying");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    async fn attempt<T>(
        &self,
        request: &ChatRequest,
        read: &impl Fn(&str) -> Result<T, String>,
    ) -> Result<T, AttemptFailure> {
        let transport = |error: reqwest::Error| AttemptFailure::Transient {
            error: OpenAiError::Transport {
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
            // reqwest marks the header sensitive, so its Debug does not print it either.
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
            let error = OpenAiError::Http {
                endpoint: self.endpoint.to_string(),
                status,
                detail: snippet(&body),
            };
            return Err(if is_transient(status) {
                AttemptFailure::Transient { error, retry_after }
            } else {
                AttemptFailure::Fatal(error)
            });
        }
        read(&body).map_err(AttemptFailure::Unreadable)
    }
}

fn is_transient(status: StatusCode) -> bool {
    status.is_server_error()
        || status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
}

/// reqwest's rustls backend is built without a crypto provider (see the workspace manifest) and
/// panics when none is installed; ring is installed unless the process chose one already.
fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race with another thread installing one is fine: any provider serves.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// The wait after `failed_attempts` failures: doubling from `initial`, capped, plus up to 25%
/// jitter.
fn backoff(initial: Duration, failed_attempts: u32) -> Duration {
    let exponent = failed_attempts.saturating_sub(1).min(20);
    let base = initial.saturating_mul(1 << exponent).min(MAX_BACKOFF);
    let jitter = base.mul_f64(rand::random_range(0.0..0.25));
    (base + jitter).min(MAX_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        let initial = Duration::from_millis(100);
        for (failed, base) in [(1, 100), (2, 200), (3, 400)] {
            let d = backoff(initial, failed);
            let base = Duration::from_millis(base);
            assert!(d >= base && d <= base.mul_f64(1.25), "{failed}: {d:?}");
        }
        assert_eq!(backoff(Duration::from_secs(20), 5), MAX_BACKOFF);
        assert!(is_transient(StatusCode::TOO_MANY_REQUESTS));
        assert!(is_transient(StatusCode::BAD_GATEWAY));
        assert!(!is_transient(StatusCode::UNAUTHORIZED));
    }
}
