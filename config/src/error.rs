//! What can be wrong with a run config. Every message starts with the file and names the
//! section and key.
//!
//! A wrapped error's text is part of the message (a config error is read once, by a person,
//! and says everything on one line), so it is kept as a typed field but not as the `source`:
//! a chain printer (anyhow's `{:#}`) would print it twice.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {}: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{}: not valid TOML: {error}", path.display())]
    NotToml {
        path: PathBuf,
        error: Box<toml::de::Error>,
    },
    #[error("{}: unknown section `{key}` (expected one of: {})", path.display(), crate::TOP_LEVEL.join(", "))]
    UnknownSection { path: PathBuf, key: String },
    #[error("{}: missing section [{section}]", path.display())]
    MissingSection {
        path: PathBuf,
        section: &'static str,
    },
    #[error("{}: [{section}] must be a table", path.display())]
    NotATable {
        path: PathBuf,
        section: &'static str,
    },
    /// A section whose keys or values its type refuses (an unknown key, a wrong type).
    #[error("{}: [{section}]: {error}", path.display())]
    Section {
        path: PathBuf,
        section: &'static str,
        error: Box<toml::de::Error>,
    },
    #[error("{}: `teachers` must be an array of tables ([[teachers]])", path.display())]
    TeachersNotAnArray { path: PathBuf },
    #[error("{}: teachers[{index}] must be a table", path.display())]
    TeacherNotATable { path: PathBuf, index: usize },
    #[error("{}: teachers[{index}] has no name", path.display())]
    TeacherWithoutName { path: PathBuf, index: usize },
    #[error("{}: teachers[{index}] ({name}): {error}", path.display())]
    Teacher {
        path: PathBuf,
        index: usize,
        name: String,
        error: Box<toml::de::Error>,
    },
    /// A role section repeats a run-level key with another value.
    #[error(
        "{}: [{section}] {key} = {value} contradicts {from} = {run_value}; set it once, in {from}",
        path.display()
    )]
    Contradiction {
        path: PathBuf,
        section: &'static str,
        key: &'static str,
        /// The values as TOML writes them.
        value: String,
        /// The run-level key it contradicts, e.g. `[run] seed`.
        from: &'static str,
        run_value: String,
    },
    /// A value out of range or a combination that cannot run, said in words.
    #[error("{}: {problem}", path.display())]
    Invalid { path: PathBuf, problem: String },
    /// A device string (`key`, e.g. `actors.device`) that is not `cpu`, `cuda` or `cuda:N`.
    #[error("{}: {key}: {error}", path.display())]
    Device {
        path: PathBuf,
        key: &'static str,
        error: ril_model::DeviceError,
    },
    #[error("{}: [rollout]: {error}", path.display())]
    Sampling {
        path: PathBuf,
        error: ril_common::SamplingError,
    },
    #[error("{}: teacher {name:?}: {error}", path.display())]
    TeacherOptions {
        path: PathBuf,
        name: String,
        error: Box<ril_teacher::TeacherError>,
    },
    #[error("{}: [discriminator]: {error}", path.display())]
    Discriminator {
        path: PathBuf,
        error: Box<ril_discriminator::DiscriminatorError>,
    },
    #[error("{}: [learner]: {error}", path.display())]
    Learner {
        path: PathBuf,
        error: Box<ril_learner::LearnerError>,
    },
    #[error("{}: [network] teachers has no address for teacher {name:?}", path.display())]
    NoTeacherAddress { path: PathBuf, name: String },
    /// The config could not be written as TOML (a path that is not UTF-8, a number TOML cannot
    /// hold).
    #[error("{}: cannot be written as TOML: {error}", path.display())]
    NotWritable {
        path: PathBuf,
        error: Box<toml::ser::Error>,
    },
    #[error(transparent)]
    Save(#[from] ril_common::fs::WriteError),
}
