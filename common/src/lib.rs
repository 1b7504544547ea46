//! The ground floor of ril, below every other crate: what several crates need in exactly one
//! copy.
//!
//! - [`fs`]: atomic writes of files and directories (a temporary name in the same directory,
//!   fsync, rename, fsync of the directory), so a crash leaves the old or the new content, never
//!   half of either.
//! - [`sampling`]: [`SamplingParams`], the one type for sampling settings (the run config's
//!   `[rollout]`, the teacher servers' defaults, the model's `generate`); the wire form lives in
//!   `ril-proto` and converts to and from it there.
//! - [`wait`] (feature `async`): `wait_until`, polling an async predicate with a deadline, for
//!   tests and supervisors that wait on a state instead of sleeping.
//!
//! **Architecture invariant:** no tensors, no gRPC, no tokio unless the `async` feature asks for
//! it (`ril-model` uses this crate and has no tokio).

pub mod fs;
pub mod sampling;
#[cfg(feature = "async")]
pub mod wait;

pub use sampling::{SamplingError, SamplingParams};
