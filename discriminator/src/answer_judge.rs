//! The answer reward's judge: the rule-based checker or the LLM judge, behind one type.
//!
//! A judge that cannot answer is an error, never a 0 (see `judge`): the caller fails the Score
//! call and the actor retries it or drops the group.

use ril_data::Row;
use ril_data::answer::{check, extract_final_answer};

use crate::error::Result;
use crate::judge::JudgeClient;
use crate::options::JudgeBackend;

/// The judge's verdict on one response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnswerScore {
    /// 1 when the response answers the question as the reference does, else 0.
    pub score: u8,
    /// The final answer found in the response (`ril_data::answer::extract_final_answer`),
    /// for logs; the LLM judge reads the whole response.
    pub extracted_answer: String,
}

/// The configured judge.
#[derive(Debug, Clone)]
pub enum AnswerJudge {
    Rule,
    Llm(JudgeClient),
}

/// The question the probe asks the LLM judge; any score means it answered.
const PROBE: (&str, &str, &str) = ("What is 1 + 1?", "2", "1 + 1 = 2. Answer: 2");

impl AnswerJudge {
    pub fn new(backend: &JudgeBackend) -> Result<Self> {
        Ok(match backend {
            JudgeBackend::Rule => Self::Rule,
            JudgeBackend::Llm(cfg) => Self::Llm(JudgeClient::new(cfg.clone())?),
        })
    }

    /// `rule`, or `llm:<model>`.
    pub fn name(&self) -> String {
        match self {
            Self::Rule => "rule".into(),
            Self::Llm(client) => format!("llm:{}", client.config().model),
        }
    }

    /// One judge call to see that the judge answers (the rule judge always does).
    pub async fn probe(&self) -> Result<()> {
        if let Self::Llm(client) = self {
            client.judge(PROBE.0, PROBE.1, PROBE.2).await?;
        }
        Ok(())
    }

    /// Judges each response against the row's reference answer, in order. With the LLM judge
    /// the calls run concurrently (within the client's limit) and the first failure is the
    /// error.
    pub async fn score(&self, row: &Row, responses: &[String]) -> Result<Vec<AnswerScore>> {
        match self {
            Self::Rule => Ok(responses
                .iter()
                .map(|r| {
                    let verdict = check(r, &row.answer, row.answer_type);
                    AnswerScore {
                        score: u8::from(verdict.correct),
                        extracted_answer: verdict.extracted,
                    }
                })
                .collect()),
            Self::Llm(client) => {
                let question = row.question_text();
                let items: Vec<(&str, &str, &str)> = responses
                    .iter()
                    .map(|r| (question.as_str(), row.answer.as_str(), r.as_str()))
                    .collect();
                client
                    .judge_many(&items)
                    .await
                    .into_iter()
                    .zip(responses)
                    .map(|(verdict, response)| {
                        Ok(AnswerScore {
                            score: verdict?.score,
                            extracted_answer: extract_final_answer(response),
                        })
                    })
                    .collect()
            }
        }
    }
}
