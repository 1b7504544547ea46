//! Answer styles: the same reference answer written the way different teachers write. The
//! discriminator learns to tell styles apart, so the built-in teachers must differ in style,
//! not only in accuracy. Styles depend only on the row's generic fields, never on a
//! benchmark's wording.

use serde::{Deserialize, Serialize};

use crate::dataset::Row;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AnswerStyle {
    /// The bare answer: `red`.
    Terse,
    /// The row's rationale (or, without one, a one-sentence lead-in), then the answer on an
    /// `Answer:` line.
    Reasoned,
    /// The rationale as a sentence, then "So the answer is X." on one line.
    Narrated,
}

impl std::str::FromStr for AnswerStyle {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "terse" => Ok(Self::Terse),
            "reasoned" => Ok(Self::Reasoned),
            "narrated" => Ok(Self::Narrated),
            other => Err(format!(
                "unknown answer style {other:?} (terse, reasoned, narrated)"
            )),
        }
    }
}

pub fn styled_answer(row: &Row, style: AnswerStyle) -> String {
    match style {
        AnswerStyle::Terse => row.answer.clone(),
        AnswerStyle::Reasoned => {
            let lead = row.rationale().unwrap_or(if row.images.is_empty() {
                "I read the question carefully."
            } else {
                "I checked the image carefully."
            });
            format!("{lead}\nAnswer: {}", row.answer)
        }
        AnswerStyle::Narrated => {
            let lead = match row.rationale() {
                Some(r) => format!("I see {}.", r.trim_end_matches('.')),
                None => "Let me think.".to_string(),
            };
            format!("{lead} So the answer is {}.", row.answer)
        }
    }
}
