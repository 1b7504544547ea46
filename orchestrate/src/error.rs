//! What can go wrong while orchestrating runs. Messages say what was being done and to what
//! (a file, a role, a `ril` command line); a wrapped error's text ends the message.
//!
//! As in `ril-config`, a wrapped error's text is part of the message and the typed value is kept
//! as a field, not as the `source`, so that a chain printer (anyhow's `{:#}`) does not print it
//! twice. The one exception is [`OrchestrateError::Variant`], which only adds where an error
//! happened and leaves the rest to its source.

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum OrchestrateError {
    #[error(transparent)]
    Config(#[from] ril_config::ConfigError),
    /// A file-system step (what was done, to what), and how it failed.
    #[error("{what}: {error}")]
    Io { what: String, error: std::io::Error },
    #[error(transparent)]
    Write(#[from] ril_common::fs::WriteError),
    #[error("starting the async runtime: {error}")]
    Runtime { error: std::io::Error },
    #[error("running ril {command}: {error}")]
    Run {
        command: String,
        error: std::io::Error,
    },
    #[error("ril {command} failed ({status})")]
    Failed { command: String, status: ExitStatus },
    #[error("starting {role}: ril {command}: {error}")]
    Spawn {
        role: String,
        command: String,
        error: std::io::Error,
    },
    /// A role process ended before it should have (`when`: "before it was ready", "during the
    /// run"), with the last lines it printed.
    #[error("{role} exited ({status}) {when}; its last output:\n{tail}")]
    Exited {
        role: String,
        status: ExitStatus,
        when: &'static str,
        tail: String,
    },
    /// A role that did not report its address in time, with the last lines it printed (why it
    /// is not ready is usually there).
    #[error("{role} was not ready within {timeout:?}; its last output:\n{tail}")]
    NotReady {
        role: String,
        timeout: Duration,
        tail: String,
    },
    /// A role whose health never said SERVING in time, with the last lines it printed (an LLM
    /// judge whose replies cannot be read, a peer it cannot reach).
    #[error("{role} at {addr} was not SERVING within {timeout:?}; its last output:\n{tail}")]
    NotServing {
        role: String,
        addr: String,
        timeout: Duration,
        tail: String,
    },
    #[error("interrupted")]
    Interrupted,
    #[error("no actors: set [actors] count >= 1")]
    NoActors,
    #[error("every actor has exited but the run is not finished")]
    ActorsGone,
    #[error(
        "the run made no progress for {seconds} s (version {version}): waiting for {waiting_for}"
    )]
    Stalled {
        seconds: u64,
        version: u64,
        /// The coordinator's watchdog: the role and call the run waits for.
        waiting_for: String,
    },
    /// A call to a role (the coordinator's status) failed.
    #[error(transparent)]
    Rpc(#[from] ril_proto::error::RpcError),
    #[error(transparent)]
    Connect(#[from] ril_proto::server::ServeError),
    #[error("setting up security for the {role} role: {error}")]
    Security {
        role: ril_proto::security::Role,
        error: ril_proto::security::SecurityError,
    },
    #[error("{what}: {error}")]
    Certificate { what: String, error: rcgen::Error },
    #[error("{} already holds {present} (and maybe more); pass --force to replace them", dir.display())]
    CertificatesPresent { dir: PathBuf, present: String },
    #[error("{what} {}: {error}", path.display())]
    Json {
        /// "parsing" or "writing".
        what: &'static str,
        path: PathBuf,
        error: serde_json::Error,
    },
    #[error("{}: no accuracy", path.display())]
    NoAccuracy { path: PathBuf },
    #[error(transparent)]
    Plot(#[from] ril_plot::PlotError),
    #[error(transparent)]
    Learner(Box<ril_learner::LearnerError>),
    /// An option that names something unknown or cannot be used (the message names the flag).
    #[error("{0}")]
    InvalidOption(String),
    /// Where in an experiment an error happened.
    #[error("variant {variant} seed {seed}")]
    Variant {
        variant: &'static str,
        seed: u64,
        #[source]
        error: Box<OrchestrateError>,
    },
}

impl OrchestrateError {
    /// A failed file-system step: `what` names the step and the path ("creating runs/x").
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |error| Self::Io { what, error }
    }
}

impl From<ril_learner::LearnerError> for OrchestrateError {
    fn from(e: ril_learner::LearnerError) -> Self {
        Self::Learner(Box::new(e))
    }
}

pub type Result<T, E = OrchestrateError> = std::result::Result<T, E>;
