//! Datasets and answers: the row formats users bring (JSONL, verl's Parquet schema), the
//! synthetic `shapes` benchmark, and rule-based answer checking (the cheap judge).
//!
//! Architecture invariant: no tokio, no tonic, no model code. Bad rows are errors naming file,
//! row and field; skipping them is explicit and counted.

pub mod answer;
pub mod dataset;
pub mod error;
pub mod parquet;
pub mod shapes;
pub mod style;
pub mod types;

pub use dataset::{Row, Split};
pub use error::{DataError, Result};
pub use types::AnswerType;
