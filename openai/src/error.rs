//! Why a call gave no usable reply. Every message starts with the endpoint and is complete on one
//! line (causes are rendered into it), because these end up in log fields and RPC statuses
//! where an error chain is lost. A role wraps it with its own name for the endpoint ("judge",
//! "teacher endpoint").

use crate::config::ConfigError;

#[derive(Debug, thiserror::Error)]
pub enum OpenAiError {
    #[error("invalid client config: {0}")]
    InvalidConfig(#[from] ConfigError),

    #[error("{endpoint}: cannot build the HTTP client: {}", error_chain(.error))]
    ClientBuild {
        endpoint: String,
        error: reqwest::Error,
    },

    /// One attempt failed before a status arrived (connect error, timeout, broken connection).
    /// Only seen inside [`OpenAiError::Unreachable`].
    #[error("{endpoint}: {}", error_chain(.error))]
    Transport {
        endpoint: String,
        error: reqwest::Error,
    },

    /// An error status: one that asking again will not fix (bad key, unknown model, prompt too
    /// long), or a transient one inside [`OpenAiError::Unreachable`].
    #[error("{endpoint} answered {status}: {detail}")]
    Http {
        endpoint: String,
        status: reqwest::StatusCode,
        /// The start of the reply body.
        detail: String,
    },

    /// Transient failures until the retries ran out.
    #[error(
        "{endpoint} unreachable after {attempts} attempt{}; last error: {}",
        if *.attempts == 1 { "" } else { "s" },
        .last_error.reason()
    )]
    Unreachable {
        endpoint: String,
        attempts: u32,
        /// A [`OpenAiError::Transport`] or a retryable [`OpenAiError::Http`].
        last_error: Box<OpenAiError>,
    },

    /// A reply arrived but the caller could not read what it needed from it.
    #[error("{endpoint} gave no usable reply: {detail}")]
    Unparseable {
        endpoint: String,
        /// What was wrong, then the start of the reply, on one line.
        detail: String,
    },
}

impl OpenAiError {
    /// The message without the leading endpoint, for nesting in a message that already names
    /// it.
    fn reason(&self) -> String {
        match self {
            Self::Transport { error, .. } => error_chain(error),
            Self::Http { status, detail, .. } => format!("answered {status}: {detail}"),
            other => other.to_string(),
        }
    }

    /// Whether the endpoint was down or overloaded (asking again later can work), as opposed
    /// to refusing the request or garbling its reply.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, Self::Unreachable { .. } | Self::Transport { .. })
    }
}

/// reqwest's own message is a generic "error sending request for url (...)": the cause that
/// says what to fix (connection refused, timed out) is further down the chain.
pub(crate) fn error_chain(error: &reqwest::Error) -> String {
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
