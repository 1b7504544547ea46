//! The wire (`ril.v1` discriminator messages) to the domain and back. Questions are checked
//! here and errors name the field as the proto spells it (`question.messages.parts_json`,
//! `items[3].question`); the limits that come from the options (how many responses, how many
//! items) are the service's.

use std::sync::Arc;

use ril_data::Row;
use ril_proto::convert::question_to_row;
use ril_proto::v1;

use crate::error::{DiscriminatorError, Result};
use crate::model::{LabelledResponse, TrainOutcome};
use crate::service::{DiscriminatorInfo, ScoreOutcome};

/// A question's responses to score.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoreQuery {
    pub question: Arc<Row>,
    pub responses: Vec<String>,
}

/// One learner iteration's labelled responses.
#[derive(Debug, Clone)]
pub struct TrainBatch {
    pub iteration: u64,
    pub items: Vec<LabelledResponse>,
}

/// A question as a row, or InvalidRequest naming the field under `prefix`.
fn row_of(question: Option<&v1::Question>, prefix: &str) -> Result<Row> {
    let question = question.ok_or_else(|| DiscriminatorError::invalid(prefix, "missing"))?;
    question_to_row(question)
        .map_err(|e| DiscriminatorError::invalid(format!("{prefix}.{}", e.field), e.to_string()))
}

impl TryFrom<v1::ScoreRequest> for ScoreQuery {
    type Error = DiscriminatorError;

    fn try_from(request: v1::ScoreRequest) -> Result<Self> {
        let row = row_of(request.question.as_ref(), "question")?;
        Ok(Self {
            question: Arc::new(row),
            responses: request.responses,
        })
    }
}

impl TryFrom<v1::TrainRequest> for TrainBatch {
    type Error = DiscriminatorError;

    fn try_from(request: v1::TrainRequest) -> Result<Self> {
        // Items of one question usually repeat it: each distinct question becomes one shared
        // row, so D renders it and decodes its images once.
        let mut rows: Vec<(&v1::Question, Arc<Row>)> = Vec::new();
        let mut items = Vec::with_capacity(request.items.len());
        for (i, item) in request.items.iter().enumerate() {
            let prefix = format!("items[{i}].question");
            let question = item
                .question
                .as_ref()
                .ok_or_else(|| DiscriminatorError::invalid(&prefix, "missing"))?;
            let row = match rows.iter().find(|(q, _)| *q == question) {
                Some((_, row)) => row.clone(),
                None => {
                    let row = Arc::new(row_of(Some(question), &prefix)?);
                    rows.push((question, row.clone()));
                    row
                }
            };
            items.push(LabelledResponse {
                question: row,
                response: item.response.clone(),
                from_student: item.from_student,
            });
        }
        Ok(Self {
            iteration: request.iteration,
            items,
        })
    }
}

impl From<ScoreOutcome> for v1::ScoreResponse {
    fn from(outcome: ScoreOutcome) -> Self {
        Self {
            scores: outcome
                .scores
                .into_iter()
                .map(|s| v1::ResponseScore {
                    d_prob: s.d_prob,
                    answer_score: f32::from(s.answer_score),
                    judge: s.judge,
                    extracted_answer: s.extracted_answer,
                })
                .collect(),
            discriminator_step: outcome.discriminator_step,
        }
    }
}

impl From<TrainOutcome> for v1::TrainResponse {
    fn from(outcome: TrainOutcome) -> Self {
        Self {
            loss: outcome.loss,
            accuracy: outcome.accuracy,
            step: outcome.step,
            skipped: outcome.skipped,
        }
    }
}

impl From<DiscriminatorInfo> for v1::DiscriminatorInfo {
    fn from(info: DiscriminatorInfo) -> Self {
        Self {
            step: info.step,
            judge: info.judge,
            frozen: info.frozen,
        }
    }
}

#[cfg(test)]
mod tests {
    use ril_proto::convert::row_to_question;

    use super::*;

    fn question(id: &str) -> v1::Question {
        let line = format!(
            r#"{{"id": "{id}", "messages": [{{"role": "user", "content": "What colour?"}}], "answer": "red"}}"#
        );
        let row = ril_data::dataset::parse_row(
            &line,
            std::path::Path::new("test.jsonl"),
            1,
            std::path::Path::new("."),
        )
        .unwrap();
        row_to_question(&row)
    }

    fn field_of(e: DiscriminatorError) -> String {
        match e {
            DiscriminatorError::InvalidRequest { field, .. } => field,
            other => panic!("expected InvalidRequest, got {other}"),
        }
    }

    #[test]
    fn questions_are_checked_and_named_by_their_place() {
        let q = ScoreQuery::try_from(v1::ScoreRequest {
            question: Some(question("q1")),
            responses: vec!["red".into()],
        })
        .unwrap();
        assert_eq!((q.question.id.as_str(), q.responses.len()), ("q1", 1));
        let missing = ScoreQuery::try_from(v1::ScoreRequest {
            question: None,
            responses: vec!["red".into()],
        });
        assert_eq!(field_of(missing.unwrap_err()), "question");
        let mut broken = question("q1");
        broken.messages[0].parts_json = "[{".into();
        let bad = ScoreQuery::try_from(v1::ScoreRequest {
            question: Some(broken),
            responses: vec![],
        });
        assert_eq!(field_of(bad.unwrap_err()), "question.messages.parts_json");

        let item = |q: Option<v1::Question>, from_student| v1::LabelledResponse {
            question: q,
            response: "red".into(),
            from_student,
        };
        let batch = TrainBatch::try_from(v1::TrainRequest {
            items: vec![
                item(Some(question("q1")), true),
                item(Some(question("q1")), false),
                item(Some(question("q2")), true),
            ],
            iteration: 4,
        })
        .unwrap();
        assert_eq!(batch.iteration, 4);
        // One shared row per distinct question.
        assert!(Arc::ptr_eq(
            &batch.items[0].question,
            &batch.items[1].question
        ));
        assert!(!Arc::ptr_eq(
            &batch.items[0].question,
            &batch.items[2].question
        ));
        let e = TrainBatch::try_from(v1::TrainRequest {
            items: vec![item(Some(question("q1")), true), item(None, false)],
            iteration: 0,
        })
        .unwrap_err();
        assert_eq!(field_of(e), "items[1].question");
    }
}
