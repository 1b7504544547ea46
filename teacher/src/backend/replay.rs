//! The replay backend: answers recorded beforehand, from a dataset's `teacher_answers` (JSONL or
//! Parquet rows) and/or a JSONL file of `{"id": ..., "teacher": ..., "answers": [...]}` lines.
//! Only the answers of one teacher name are kept. A question without recorded answers (or with
//! fewer than asked for, unless `cycle` is on) is a NotFound error naming the id and teacher.

use std::collections::HashMap;
use std::io::BufRead;
use std::ops::Range;
use std::path::Path;

use ril_data::dataset::{ReadOptions, RowReader};
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::error::TeacherError;
use crate::options::ReplayOptions;

#[derive(Debug)]
pub struct ReplayBackend {
    /// Question id -> the teacher's answers, in order.
    answers: HashMap<String, Vec<String>>,
    teacher: String,
    cycle: bool,
    sources: String,
}

/// One line of an answers file.
#[derive(Deserialize)]
struct AnswerLine {
    id: String,
    teacher: String,
    answers: Vec<String>,
}

impl ReplayBackend {
    /// Reads the sources (on the blocking pool). `name` is the server's teacher name.
    pub async fn load(name: &str, options: &ReplayOptions) -> Result<Self, TeacherError> {
        let options = options.clone();
        let teacher = options.teacher.clone().unwrap_or_else(|| name.to_string());
        tokio::task::spawn_blocking(move || Self::read(teacher, &options))
            .await
            .map_err(|e| TeacherError::Internal(format!("reading replay answers panicked: {e}")))?
    }

    fn read(teacher: String, options: &ReplayOptions) -> Result<Self, TeacherError> {
        let mut answers: HashMap<String, Vec<String>> = HashMap::new();
        let mut sources = Vec::new();
        if let Some(path) = &options.dataset {
            read_dataset(path, &teacher, &mut answers)?;
            sources.push(path.display().to_string());
        }
        if let Some(path) = &options.answers {
            read_answers_file(path, &teacher, &mut answers)?;
            sources.push(path.display().to_string());
        }
        answers.retain(|_, list| !list.is_empty());
        let sources = sources.join(" + ");
        if answers.is_empty() {
            tracing::warn!(%teacher, %sources, "no replay answers recorded for this teacher");
        } else {
            tracing::info!(%teacher, %sources, questions = answers.len(), "replay answers read");
        }
        Ok(Self {
            answers,
            teacher,
            cycle: options.cycle,
            sources,
        })
    }

    pub fn describe(&self) -> String {
        format!("{} (teacher {:?})", self.sources, self.teacher)
    }

    /// How many questions have answers.
    pub fn questions(&self) -> usize {
        self.answers.len()
    }

    pub async fn generate(
        &self,
        id: &str,
        indices: Range<u32>,
        out: &mpsc::Sender<(u32, String)>,
    ) -> Result<(), TeacherError> {
        let not_found = |reason: String| TeacherError::NotFound {
            id: id.to_string(),
            teacher: self.teacher.clone(),
            reason,
        };
        let Some(list) = self.answers.get(id) else {
            return Err(not_found(format!("none recorded in {}", self.sources)));
        };
        if !self.cycle && indices.end as usize > list.len() {
            return Err(not_found(format!(
                "{} recorded in {}, {} asked for (set `cycle = true` to reuse them)",
                list.len(),
                self.sources,
                indices.end
            )));
        }
        for i in indices {
            if out
                .send((i, list[i as usize % list.len()].clone()))
                .await
                .is_err()
            {
                break;
            }
        }
        Ok(())
    }
}

fn load_error(path: &Path, reason: String) -> TeacherError {
    TeacherError::Load {
        backend: "replay",
        what: path.display().to_string(),
        reason,
    }
}

fn read_dataset(
    path: &Path,
    teacher: &str,
    answers: &mut HashMap<String, Vec<String>>,
) -> Result<(), TeacherError> {
    let reader = RowReader::open(path, ReadOptions::default())
        .map_err(|e| load_error(path, e.to_string()))?;
    for row in reader {
        let row = row.map_err(|e| load_error(path, e.to_string()))?;
        if let Some(list) = row.teacher_answers.get(teacher) {
            answers
                .entry(row.id.clone())
                .or_default()
                .extend(list.iter().cloned());
        }
    }
    Ok(())
}

fn read_answers_file(
    path: &Path,
    teacher: &str,
    answers: &mut HashMap<String, Vec<String>>,
) -> Result<(), TeacherError> {
    let file = std::fs::File::open(path).map_err(|e| load_error(path, e.to_string()))?;
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| load_error(path, format!("line {}: {e}", i + 1)))?;
        if line.trim().is_empty() {
            continue;
        }
        let parsed: AnswerLine = serde_json::from_str(&line).map_err(|e| {
            load_error(
                path,
                format!(
                    "line {}: expected {{\"id\": ..., \"teacher\": ..., \"answers\": [...]}}: {e}",
                    i + 1
                ),
            )
        })?;
        if parsed.teacher == teacher {
            answers.entry(parsed.id).or_default().extend(parsed.answers);
        }
    }
    Ok(())
}
