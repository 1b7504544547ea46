//! D's checkpoints: `ROOT/step-00000042/` directories, each a complete model directory (loads
//! with `Bundle::load(dir, Head::Scalar, ..)`, so the ecosystem's tools read it too) plus the
//! optimizer's moments and the trainer state, and `ROOT/latest` naming the newest one.
//!
//! A checkpoint is written to a temporary directory beside the others and published in place
//! (`ril_common::fs::publish_dir`), and only then does `latest` (itself written atomically,
//! `ril_common::fs::write_atomic`) point at it: a crash at any moment leaves `latest` naming a
//! complete checkpoint.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{DiscriminatorError, Result};
use crate::prompt::PromptSettings;

pub const LATEST_FILE: &str = "latest";
pub const STATE_FILE: &str = "discriminator_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const STEP_PREFIX: &str = "step-";

/// Where training stands, saved with the weights and the optimizer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiscriminatorState {
    /// Optimizer steps done.
    pub step: u64,
    /// The last learner iteration D trained on (Train is idempotent per iteration).
    pub last_iteration: Option<u64>,
    /// How the inputs were built; a resumed D built differently is warned about.
    pub include_question: bool,
    pub include_image: bool,
    pub max_response_tokens: usize,
    pub max_question_tokens: usize,
}

impl DiscriminatorState {
    pub fn prompt_settings(&self) -> PromptSettings {
        PromptSettings {
            include_question: self.include_question,
            include_image: self.include_image,
            max_response_tokens: self.max_response_tokens,
            max_question_tokens: self.max_question_tokens,
        }
    }

    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(STATE_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| DiscriminatorError::io(&path, e))?;
        serde_json::from_str(&text).map_err(|e| DiscriminatorError::Checkpoint {
            path,
            reason: format!("unreadable state: {e}"),
        })
    }

    pub fn save(&self, dir: &Path) -> Result<()> {
        let text =
            serde_json::to_string_pretty(self).map_err(|e| DiscriminatorError::Checkpoint {
                path: dir.join(STATE_FILE),
                reason: e.to_string(),
            })?;
        ril_common::fs::write_atomic(&dir.join(STATE_FILE), text.as_bytes())?;
        Ok(())
    }
}

/// The directory name of the checkpoint at `step`.
pub fn step_dir_name(step: u64) -> String {
    format!("{STEP_PREFIX}{step:08}")
}

fn parse_step_dir_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(STEP_PREFIX)?;
    (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// The checkpoint `root/latest` names, if there is one.
pub fn latest_checkpoint(root: &Path) -> Result<Option<PathBuf>> {
    let latest = root.join(LATEST_FILE);
    if !latest.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&latest).map_err(|e| DiscriminatorError::io(&latest, e))?;
    let name = text.trim();
    if parse_step_dir_name(name).is_none() {
        return Err(DiscriminatorError::Checkpoint {
            path: latest,
            reason: format!("expected a name like `step-00000042`, found {name:?}"),
        });
    }
    let dir = root.join(name);
    if !dir.is_dir() {
        return Err(DiscriminatorError::Checkpoint {
            path: latest,
            reason: format!("names {}, which is not a directory", dir.display()),
        });
    }
    Ok(Some(dir))
}

/// A model directory, or the newest checkpoint of a checkpoint root (one with `latest`).
pub fn resolve_model_dir(path: &Path) -> Result<PathBuf> {
    Ok(latest_checkpoint(path)?.unwrap_or_else(|| path.to_path_buf()))
}

/// Which steps to delete so that the `keep` newest remain (never `current`). Pure, for tests.
pub fn checkpoints_to_delete(mut steps: Vec<u64>, keep: usize, current: u64) -> Vec<u64> {
    steps.sort_unstable();
    steps.dedup();
    let n = steps.len();
    steps
        .into_iter()
        .enumerate()
        .filter(|&(i, s)| i + keep.max(1) < n && s != current)
        .map(|(_, s)| s)
        .collect()
}

/// Writes a checkpoint for `step` under `root` with `write` (which fills the directory it is
/// given), then points `latest` at it and prunes old ones down to `keep`.
pub fn save_atomically(
    root: &Path,
    step: u64,
    keep: usize,
    write: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    std::fs::create_dir_all(root).map_err(|e| DiscriminatorError::io(root, e))?;
    let name = step_dir_name(step);
    let tmp = root.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| DiscriminatorError::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| DiscriminatorError::io(&tmp, e))?;
    if let Err(e) = write(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    // An existing directory of this step is from a run that stopped before `latest` moved on:
    // it is replaced.
    let dir = root.join(&name);
    ril_common::fs::publish_dir(&tmp, &dir)?;
    ril_common::fs::write_atomic(&root.join(LATEST_FILE), format!("{name}\n").as_bytes())?;
    let steps: Vec<u64> = std::fs::read_dir(root)
        .map_err(|e| DiscriminatorError::io(root, e))?
        .filter_map(|entry| entry.ok())
        .filter(|entry| entry.path().is_dir())
        .filter_map(|entry| parse_step_dir_name(&entry.file_name().to_string_lossy()))
        .collect();
    for old in checkpoints_to_delete(steps, keep, step) {
        let path = root.join(step_dir_name(old));
        if let Err(e) = std::fs::remove_dir_all(&path) {
            tracing::warn!(path = %path.display(), error = %e, "cannot delete an old discriminator checkpoint");
        }
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pruning_keeps_the_newest_and_the_current() {
        assert_eq!(checkpoints_to_delete(vec![3, 1, 2, 4], 2, 4), vec![1, 2]);
        assert_eq!(checkpoints_to_delete(vec![1, 2], 5, 2), Vec::<u64>::new());
        assert_eq!(checkpoints_to_delete(vec![1, 2, 3], 0, 3), vec![1, 2]);
        assert_eq!(parse_step_dir_name("step-00000042"), Some(42));
        assert_eq!(parse_step_dir_name("step-"), None);
        assert_eq!(parse_step_dir_name("step-4x"), None);
    }

    #[test]
    fn latest_moves_only_after_a_complete_write() {
        let root = tempfile::tempdir().unwrap();
        let write_ok = |dir: &Path| {
            std::fs::write(dir.join("x"), b"1").unwrap();
            Ok(())
        };
        save_atomically(root.path(), 1, 2, write_ok).unwrap();
        let failed = save_atomically(root.path(), 2, 2, |_| {
            Err(DiscriminatorError::config("test", "fails"))
        });
        assert!(failed.is_err());
        let latest = latest_checkpoint(root.path()).unwrap().unwrap();
        assert!(latest.ends_with("step-00000001"));
        assert!(latest.join("x").is_file());
        for step in 2..=4 {
            save_atomically(root.path(), step, 2, write_ok).unwrap();
        }
        let mut names: Vec<String> = std::fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["latest", "step-00000003", "step-00000004"]);
        assert_eq!(
            resolve_model_dir(root.path()).unwrap(),
            root.path().join("step-00000004")
        );
    }
}
