//! Dataset rows <-> `ril.v1.Question`, lossless in both directions (ids, chat turns with
//! structured content, image bytes, reference, answer type, family), so every role builds its
//! model inputs from the same `ril_data::Row` the dataset readers produce.

use ril_common::SamplingParams;
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

/// Wire sampling settings as the domain's [`SamplingParams`]. proto3 cannot tell 0 from
/// "unset", so zeros read as: `max_new_tokens == 0` — no settings were sent, the receiver's own
/// apply (`None`); `top_p == 0` and `repetition_penalty == 0` — disabled (1). Values are not
/// checked here: the receiver validates them (`SamplingParams::validate`) and names the field.
pub fn sampling_from_wire(s: &v1::SamplingSettings) -> Option<SamplingParams> {
    if s.max_new_tokens == 0 {
        return None;
    }
    let or_one = |x: f32| if x == 0.0 { 1.0 } else { f64::from(x) };
    Some(SamplingParams {
        temperature: f64::from(s.temperature),
        top_p: or_one(s.top_p),
        top_k: s.top_k as usize,
        repetition_penalty: or_one(s.repetition_penalty),
        max_new_tokens: s.max_new_tokens as usize,
        stop_token_ids: Vec::new(),
        suppress_token_ids: Vec::new(),
        seed: s.seed,
    })
}

/// The wire form of sampling settings (stop and suppressed tokens are the receiver's: they
/// depend on its tokenizer).
impl From<&SamplingParams> for v1::SamplingSettings {
    fn from(p: &SamplingParams) -> Self {
        Self {
            temperature: p.temperature as f32,
            top_p: p.top_p as f32,
            top_k: u32::try_from(p.top_k).unwrap_or(u32::MAX),
            repetition_penalty: p.repetition_penalty as f32,
            max_new_tokens: u32::try_from(p.max_new_tokens).unwrap_or(u32::MAX),
            seed: p.seed,
        }
    }
}

#[cfg(test)]
mod sampling_tests {
    use super::*;

    #[test]
    fn sampling_round_trips_and_zeros_read_as_unset() {
        // Values an f32 holds exactly survive the wire unchanged.
        let p = SamplingParams {
            top_p: 0.5,
            repetition_penalty: 1.25,
            ..SamplingParams::paper(48, 7)
        };
        assert_eq!(sampling_from_wire(&v1::SamplingSettings::from(&p)), Some(p));
        assert_eq!(sampling_from_wire(&v1::SamplingSettings::default()), None);
        let sparse = sampling_from_wire(&v1::SamplingSettings {
            max_new_tokens: 5,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(sparse.top_p, 1.0);
        assert_eq!(sparse.repetition_penalty, 1.0);
        assert!(sparse.is_greedy());
    }
}
