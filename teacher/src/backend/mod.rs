//! The three backends behind one interface: given a question and sampling settings, produce
//! answers `start..end` (the cache asks only for the ones it lacks) and send them, in index
//! order, as each is ready.

use std::ops::Range;
use std::sync::Arc;

use ril_common::SamplingParams;
use ril_data::Row;
use tokio::sync::mpsc;

use crate::error::TeacherError;
use crate::options::BackendOptions;

pub mod candle;
pub mod openai;
pub mod replay;

pub use candle::{BatchStats, CandleBackend};
pub use openai::OpenAiBackend;
pub use replay::ReplayBackend;

/// A loaded backend.
#[derive(Debug)]
pub enum Backend {
    Candle(CandleBackend),
    OpenAi(OpenAiBackend),
    Replay(ReplayBackend),
}

impl Backend {
    /// Loads the model, configures the endpoint, or reads the replay answers. `name` is the
    /// teacher's name.
    pub async fn load(name: &str, options: &BackendOptions) -> Result<Self, TeacherError> {
        options.validate()?;
        Ok(match options {
            BackendOptions::Candle(o) => Self::Candle(CandleBackend::load(o).await?),
            BackendOptions::OpenAi(o) => Self::OpenAi(OpenAiBackend::load(o)?),
            BackendOptions::Replay(o) => Self::Replay(ReplayBackend::load(name, o).await?),
        })
    }

    /// `candle`, `openai` or `replay`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Candle(_) => "candle",
            Self::OpenAi(_) => "openai",
            Self::Replay(_) => "replay",
        }
    }

    /// The kind and where answers come from, e.g. `openai: big-model at http://.../chat/completions`.
    pub fn describe(&self) -> String {
        match self {
            Self::Candle(b) => format!("candle: {}", b.checkpoint().display()),
            Self::OpenAi(b) => format!("openai: {}", b.describe()),
            Self::Replay(b) => format!("replay: {}", b.describe()),
        }
    }

    /// The candle backend's batching counters.
    pub fn batch_stats(&self) -> Option<&Arc<BatchStats>> {
        match self {
            Self::Candle(b) => Some(b.stats()),
            _ => None,
        }
    }

    /// Produces answers `indices` of `row` into `out`, in index order. Stops early (without an
    /// error) when `out` is closed.
    pub async fn generate(
        &self,
        row: Arc<Row>,
        settings: &SamplingParams,
        indices: Range<u32>,
        out: &mpsc::Sender<(u32, String)>,
    ) -> Result<(), TeacherError> {
        match self {
            Self::Candle(b) => b.generate(row, settings, indices, out).await,
            Self::OpenAi(b) => b.generate(&row, settings, indices, out).await,
            Self::Replay(b) => b.generate(&row.id, indices, out).await,
        }
    }
}
