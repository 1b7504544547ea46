//! `<out_dir>/metrics.jsonl`: one JSON object per learner step, written by rank 0 as the step
//! completes (`iteration`, `version`, unix `time`, then every metric the step reports: reward
//! components, advantage statistics, KL, clip fraction, entropy, D's accuracy and loss, phase
//! times). Non-finite values are written as `null`. A resumed learner first drops the lines
//! of versions after its checkpoint, so each version appears once even across restarts.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use ril_common::fs::WriteError;

use crate::error::{LearnerError, Result};

pub const METRICS_FILE: &str = "metrics.jsonl";

fn write_error(path: &Path, action: &'static str, source: std::io::Error) -> LearnerError {
    LearnerError::Write(WriteError {
        path: path.to_path_buf(),
        action,
        source,
    })
}

/// Appends one step's line.
pub fn append(
    path: &Path,
    iteration: u64,
    version: u64,
    metrics: &BTreeMap<String, f64>,
) -> Result<()> {
    let mut line = serde_json::Map::new();
    line.insert("iteration".into(), iteration.into());
    line.insert("version".into(), version.into());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    line.insert("time".into(), now.into());
    for (k, &v) in metrics {
        if k == "iteration" || k == "version" {
            continue;
        }
        let value = serde_json::Number::from_f64(v)
            .map(serde_json::Value::Number)
            .unwrap_or(serde_json::Value::Null);
        line.insert(k.clone(), value);
    }
    let mut text = serde_json::Value::Object(line).to_string();
    text.push('\n');
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| write_error(dir, "creating the directory", e))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| write_error(path, "opening for append", e))?;
    f.write_all(text.as_bytes())
        .map_err(|e| write_error(path, "appending a line", e))
}

/// Keeps the lines of versions up to `version` (a resume point); drops later ones and any line
/// that is not a JSON object with a numeric `version` (a torn last line after a crash).
/// Returns how many lines were dropped. A missing file is fine.
pub fn truncate_after(path: &Path, version: u64) -> Result<usize> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(source) => {
            return Err(LearnerError::Io {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let mut kept = String::new();
    let mut dropped = 0;
    for line in text.lines() {
        let v = serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|j| j.get("version").and_then(|v| v.as_u64()));
        match v {
            Some(v) if v <= version => {
                kept.push_str(line);
                kept.push('\n');
            }
            _ => dropped += 1,
        }
    }
    if dropped > 0 {
        ril_common::fs::write_atomic(path, kept.as_bytes())?;
    }
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_append_and_a_resume_drops_later_versions_and_torn_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(METRICS_FILE);
        assert_eq!(truncate_after(&path, 0).unwrap(), 0);
        for v in 1..=4u64 {
            let mut m = BTreeMap::new();
            m.insert("kl".to_string(), v as f64 * 0.5);
            m.insert("d_accuracy".to_string(), f64::NAN);
            append(&path, v - 1, v, &m).unwrap();
        }
        // A crash mid-write leaves a torn line.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"{\"iteration\": 4, \"vers").unwrap();
        drop(f);
        assert_eq!(truncate_after(&path, 2).unwrap(), 3);
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1]["version"], 2);
        assert_eq!(lines[1]["iteration"], 1);
        assert_eq!(lines[1]["kl"], 1.0);
        assert!(lines[1]["d_accuracy"].is_null());
        assert!(lines[1]["time"].as_f64().unwrap() > 1.7e9);
    }
}
