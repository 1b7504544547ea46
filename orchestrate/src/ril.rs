//! The `ril` binary the orchestration runs: every role and every tool step (data, models,
//! evaluation) is `ril <subcommand>` in a process of its own, as a user would run it.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{OrchestrateError, Result};

#[derive(Debug, Clone)]
pub struct RilBinary {
    path: PathBuf,
}

impl RilBinary {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// This process's own executable: the `ril` command calling into this crate.
    pub fn current() -> Result<Self> {
        let path =
            std::env::current_exe().map_err(OrchestrateError::io("locating the ril binary"))?;
        Ok(Self::new(path))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `ril ARGS` to its end, its output on this process's.
    pub fn run(&self, args: &[&str]) -> Result<()> {
        let command = args.join(" ");
        let status = Command::new(&self.path)
            .args(args)
            .status()
            .map_err(|error| OrchestrateError::Run {
                command: command.clone(),
                error,
            })?;
        if !status.success() {
            return Err(OrchestrateError::Failed { command, status });
        }
        Ok(())
    }
}

/// A path as a command-line argument.
pub fn arg(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// The runtime the orchestration's async parts (the local cluster, its supervision) run on.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|error| OrchestrateError::Runtime { error })
}
