//! Types shared by the dataset formats and the answer checker.

use serde::{Deserialize, Serialize};

/// How a reference answer is compared with a response (`answer_type` in a dataset row).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnswerType {
    /// Normalised string equality.
    Exact,
    /// Numeric equality with tolerance (number words accepted).
    Number,
    /// A multiple-choice letter (A, B, ...), or the option text.
    Choice,
    /// yes / no.
    YesNo,
    /// Open-ended: only an LLM judge can grade it; the rule-based checker falls back to
    /// normalised containment.
    Free,
}

impl std::str::FromStr for AnswerType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "exact" => Ok(Self::Exact),
            "number" | "numeric" => Ok(Self::Number),
            "choice" | "multiple_choice" => Ok(Self::Choice),
            "yes_no" | "yesno" | "boolean" => Ok(Self::YesNo),
            "free" | "open" => Ok(Self::Free),
            other => Err(format!(
                "unknown answer_type {other:?} (exact, number, choice, yes_no, free)"
            )),
        }
    }
}
