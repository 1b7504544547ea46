//! Dataset rows <-> `ril.v1.Question`, lossless in both directions (ids, chat turns with
//! structured content, image bytes, reference, answer type, family), so every role builds its
//! model inputs from the same `ril_data::Row` the dataset readers produce.

use ril_data::Row;
use ril_data::dataset::{ImageData, Message};
use serde_json::Value;

use crate::v1;

/// A `Question` that cannot become a row: the message names the question and the field.
#[derive(Debug, thiserror::Error)]
#[error("question {id:?}: field `{field}`: {problem}")]
pub struct InvalidQuestion {
    pub id: String,
    pub field: &'static str,
    pub problem: String,
}

pub fn row_to_question(row: &Row) -> v1::Question {
    v1::Question {
        id: row.id.clone(),
        messages: row
            .messages
            .iter()
            .map(|m| match &m.content {
                Value::String(s) => v1::ChatMessage {
                    role: m.role.clone(),
                    text: s.clone(),
                    parts_json: String::new(),
                },
                other => v1::ChatMessage {
                    role: m.role.clone(),
                    text: String::new(),
                    parts_json: other.to_string(),
                },
            })
            .collect(),
        images: row
            .images
            .iter()
            .map(|i| v1::Image {
                name: i.name.clone(),
                data: bytes::Bytes::from(i.bytes.clone()),
            })
            .collect(),
        reference: row.answer.clone(),
        answer_type: row
            .answer_type
            .map(|t| {
                serde_json::to_value(t)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default()
            })
            .unwrap_or_default(),
        family: row.family.clone().unwrap_or_default(),
    }
}

/// Validates and converts; images are checked to be non-empty (decoding happens where a model
/// needs the pixels, and fails there naming the image).
pub fn question_to_row(q: &v1::Question) -> Result<Row, InvalidQuestion> {
    let bad = |field: &'static str, problem: String| InvalidQuestion {
        id: q.id.clone(),
        field,
        problem,
    };
    if q.id.is_empty() {
        return Err(bad("id", "empty".into()));
    }
    if q.messages.is_empty() {
        return Err(bad("messages", "no chat turns".into()));
    }
    let mut messages = Vec::with_capacity(q.messages.len());
    for (i, m) in q.messages.iter().enumerate() {
        if m.role.is_empty() {
            return Err(bad("messages.role", format!("turn {i} has no role")));
        }
        let content = if m.parts_json.is_empty() {
            Value::String(m.text.clone())
        } else {
            let v: Value = serde_json::from_str(&m.parts_json)
                .map_err(|e| bad("messages.parts_json", format!("turn {i}: {e}")))?;
            if !v.is_array() {
                return Err(bad(
                    "messages.parts_json",
                    format!("turn {i}: not a JSON list of parts"),
                ));
            }
            v
        };
        messages.push(Message {
            role: m.role.clone(),
            content,
        });
    }
    let mut images = Vec::with_capacity(q.images.len());
    for (i, im) in q.images.iter().enumerate() {
        if im.data.is_empty() {
            return Err(bad("images", format!("image {i} ({:?}) is empty", im.name)));
        }
        images.push(ImageData {
            name: if im.name.is_empty() {
                format!("{}#image{i}", q.id)
            } else {
                im.name.clone()
            },
            bytes: im.data.to_vec(),
        });
    }
    let answer_type = if q.answer_type.is_empty() {
        None
    } else {
        Some(
            q.answer_type
                .parse()
                .map_err(|e: String| bad("answer_type", e))?,
        )
    };
    let row = Row {
        id: q.id.clone(),
        images,
        messages,
        answer: q.reference.clone(),
        answer_type,
        teacher_answers: Default::default(),
        family: (!q.family.is_empty()).then(|| q.family.clone()),
        extra: Default::default(),
    };
    if row.question_text().is_empty() {
        return Err(bad("messages", "no user turn with text".into()));
    }
    Ok(row)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png() -> Vec<u8> {
        // A 1x1 PNG, enough for a round trip (nothing decodes it here).
        vec![0x89, b'P', b'N', b'G', 1, 2, 3]
    }

    #[test]
    fn rows_round_trip_through_questions() {
        let row = Row {
            id: "q7".into(),
            images: vec![ImageData {
                name: "a.png".into(),
                bytes: png(),
            }],
            messages: vec![
                Message {
                    role: "system".into(),
                    content: Value::String("be brief".into()),
                },
                Message {
                    role: "user".into(),
                    content: serde_json::json!([{"type": "image"}, {"type": "text", "text": "What colour?"}]),
                },
            ],
            answer: "red".into(),
            answer_type: Some(ril_data::AnswerType::Exact),
            teacher_answers: Default::default(),
            family: Some("colour".into()),
            extra: Default::default(),
        };
        let q = row_to_question(&row);
        assert_eq!(q.answer_type, "exact");
        let back = question_to_row(&q).unwrap();
        assert_eq!(back, row);
    }

    #[test]
    fn bad_questions_name_the_field() {
        let mut q = row_to_question(&Row {
            id: "q1".into(),
            images: vec![],
            messages: vec![Message {
                role: "user".into(),
                content: Value::String("hi?".into()),
            }],
            answer: "x".into(),
            answer_type: None,
            teacher_answers: Default::default(),
            family: None,
            extra: Default::default(),
        });
        q.answer_type = "fuzzy".into();
        let e = question_to_row(&q).unwrap_err().to_string();
        assert!(e.contains("q1") && e.contains("answer_type"), "{e}");
        q.answer_type.clear();
        q.messages[0].parts_json = "{\"not\": \"a list\"}".into();
        let e = question_to_row(&q).unwrap_err().to_string();
        assert!(e.contains("parts_json"), "{e}");
        q.messages.clear();
        assert!(
            question_to_row(&q)
                .unwrap_err()
                .to_string()
                .contains("messages")
        );
    }
}
