//! The orchestration below the `ril` binary: what runs many `ril` processes and reports on
//! them. `cli` parses arguments and calls in here; tests can call in here too, without going
//! through the command line (the role processes are still `ril` processes: every entry point
//! takes the [`RilBinary`] to start them with).
//!
//! - [`cluster`] + [`supervise`]: the local cluster (`ril train`): every role a child process on
//!   loopback, its address read from an address file, its logs prefixed and kept, the run
//!   followed through the coordinator's status, every child stopped at the end.
//! - [`security`] and [`certs`]: how a process finds its run token and certificates, and the
//!   local run's own CA, certificates and token, generated for every launch.
//! - [`demo`]: `ril demo`, six timed stages from data to report.
//! - [`experiment`]: `ril experiment ablation`, the paper's comparison in miniature.
//! - [`chaos`]: `ril experiment chaos`, the local cluster run to its end while roles are
//!   killed and restarted (or hung) one after the other, with the recovery figures.
//! - [`runs`]: what the demo and the experiments share: the built-in models, a [`runs::RunSpec`]
//!   turned into a typed run config, D's pre-training, evaluation.
//! - [`status`]: a run's status from its coordinator, and its printed form.
//!
//! **Architecture invariant:** no argument parsing (clap lives in `cli`), and run configs are
//! built through [`ril_config::RunConfig`], never as text.

pub mod certs;
pub mod chaos;
pub mod cluster;
pub mod demo;
mod error;
pub mod experiment;
mod ril;
pub mod runs;
pub mod security;
pub mod status;
pub mod supervise;

pub use error::{OrchestrateError, Result};
pub use ril::{RilBinary, arg, runtime};
