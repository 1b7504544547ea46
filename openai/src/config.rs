//! Where and how to call an endpoint. Each role keeps its own config table (the teacher's
//! `OpenAiOptions`, the judge's `JudgeConfig`, with their own defaults and keys) and builds a
//! [`ClientConfig`] from it; the checks common to both live here.

use std::fmt;
use std::time::Duration;

/// A client's settings.
#[derive(Clone, PartialEq)]
pub struct ClientConfig {
    /// The API root, as OpenAI clients take it: `http://127.0.0.1:8000/v1`.
    pub base_url: String,
    /// Sent as `Authorization: Bearer`; never printed.
    pub api_key: Option<String>,
    /// Per attempt, from sending the request to the end of the reply.
    pub timeout: Duration,
    /// `None`: reqwest's default (no separate connect timeout).
    pub connect_timeout: Option<Duration>,
    /// Attempts after the first one for transient failures.
    pub max_retries: u32,
    /// Wait before the first retry; doubled for each following one.
    pub initial_backoff: Duration,
    /// Calls in flight at once from this client (and its clones).
    pub max_concurrency: usize,
    /// Ask once more, at once, when a reply arrives but cannot be read (see the crate docs).
    pub retry_unreadable_once: bool,
}

impl fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientConfig")
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("max_retries", &self.max_retries)
            .field("initial_backoff", &self.initial_backoff)
            .field("max_concurrency", &self.max_concurrency)
            .field("retry_unreadable_once", &self.retry_unreadable_once)
            .finish()
    }
}

/// The wait before the first retry unless a role's config says otherwise
/// (`#[serde(default = "ril_openai::default_initial_backoff")]`).
pub fn default_initial_backoff() -> Duration {
    Duration::from_millis(500)
}

/// Calls in flight at once unless a role's config says otherwise.
pub fn default_max_concurrency() -> usize {
    16
}

/// A setting out of range, named as the config spells it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{field}` {reason}")]
pub struct ConfigError {
    pub field: &'static str,
    pub reason: String,
}

impl ConfigError {
    fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self {
            field,
            reason: reason.into(),
        }
    }
}

/// The URL requests go to: `{base_url}/chat/completions`.
pub fn endpoint_url(base_url: &str) -> String {
    format!("{}/chat/completions", base_url.trim_end_matches('/'))
}

/// Checks a key without quoting it: keys read from files and Secrets often end in a newline.
pub fn check_api_key(key: &str) -> Result<(), &'static str> {
    if key.is_empty() || key.chars().any(|c| c.is_control() || !c.is_ascii()) {
        return Err("must be non-empty printable ASCII (check for a trailing newline)");
    }
    Ok(())
}

impl ClientConfig {
    /// The URL requests go to.
    pub fn endpoint(&self) -> String {
        endpoint_url(&self.base_url)
    }

    /// Checks every setting; the error names the field (`base_url`, `api_key`, `timeout`,
    /// `connect_timeout`, `max_concurrency`) and never quotes the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_base_url(&self.base_url)?;
        if let Some(key) = &self.api_key {
            check_api_key(key).map_err(|reason| ConfigError::new("api_key", reason))?;
        }
        if self.timeout.is_zero() {
            return Err(ConfigError::new("timeout", "must be positive"));
        }
        if self.connect_timeout.is_some_and(|t| t.is_zero()) {
            return Err(ConfigError::new("connect_timeout", "must be positive"));
        }
        if self.max_concurrency == 0 {
            return Err(ConfigError::new("max_concurrency", "must be at least 1"));
        }
        Ok(())
    }
}

fn check_base_url(base_url: &str) -> Result<(), ConfigError> {
    const EXAMPLE: &str = "http://127.0.0.1:8000/v1";
    match reqwest::Url::parse(base_url) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.has_host() => {}
        Ok(_) => {
            return Err(ConfigError::new(
                "base_url",
                format!("must be an http(s) URL with a host, like {EXAMPLE}; got `{base_url}`"),
            ));
        }
        Err(error) => {
            return Err(ConfigError::new(
                "base_url",
                format!("`{base_url}` is not a URL ({error}); expected e.g. {EXAMPLE}"),
            ));
        }
    }
    if base_url
        .trim_end_matches('/')
        .ends_with("/chat/completions")
    {
        return Err(ConfigError::new(
            "base_url",
            format!("is the API root (e.g. {EXAMPLE}); `/chat/completions` is appended"),
        ));
    }
    Ok(())
}

/// Durations as (fractional) seconds, the unit people write in config files
/// (`#[serde(with = "ril_openai::seconds")]`).
pub mod seconds {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ClientConfig {
        ClientConfig {
            base_url: "http://judge:8000/v1".into(),
            api_key: None,
            timeout: Duration::from_secs(5),
            connect_timeout: None,
            max_retries: 2,
            initial_backoff: Duration::from_millis(1),
            max_concurrency: 4,
            retry_unreadable_once: false,
        }
    }

    #[test]
    fn each_bad_setting_is_named_and_the_key_never_quoted() {
        config().validate().unwrap();
        type Break = fn(&mut ClientConfig);
        let cases: [(&str, Break); 8] = [
            ("base_url", |c| c.base_url = "judge:8000".into()),
            ("base_url", |c| c.base_url = "ftp://judge/v1".into()),
            ("base_url", |c| c.base_url = "no url at all".into()),
            ("base_url", |c| {
                c.base_url = "http://judge:8000/v1/chat/completions/".into()
            }),
            ("api_key", |c| c.api_key = Some("sk-secret\n".into())),
            ("timeout", |c| c.timeout = Duration::ZERO),
            ("connect_timeout", |c| {
                c.connect_timeout = Some(Duration::ZERO)
            }),
            ("max_concurrency", |c| c.max_concurrency = 0),
        ];
        for (field, break_it) in cases {
            let mut c = config();
            break_it(&mut c);
            let e = c.validate().unwrap_err();
            assert_eq!(e.field, field, "{e}");
            assert!(!e.to_string().contains("sk-secret"), "{e}");
        }
    }

    #[test]
    fn the_endpoint_is_the_root_plus_chat_completions_and_debug_hides_the_key() {
        assert_eq!(
            endpoint_url("http://h:1/v1/"),
            "http://h:1/v1/chat/completions"
        );
        let mut c = config();
        c.api_key = Some("sk-very-secret".into());
        let debug = format!("{c:?}");
        assert!(!debug.contains("sk-very-secret") && debug.contains("redacted"));
    }

    #[test]
    fn durations_are_written_in_seconds() {
        #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
        struct T {
            #[serde(with = "seconds")]
            d: Duration,
        }
        let t: T = toml::from_str("d = 0.25").unwrap();
        assert_eq!(t.d, Duration::from_millis(250));
        assert_eq!(
            toml::from_str::<T>(&toml::to_string(&t).unwrap()).unwrap(),
            t
        );
        let e = toml::from_str::<T>("d = -1").unwrap_err().to_string();
        assert!(e.contains("non-negative"), "{e}");
    }
}
