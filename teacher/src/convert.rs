//! The wire (`ril.v1` teacher messages) to the domain and back. Every request field is checked
//! here, and errors name it as the proto spells it (`question.messages.parts_json`,
//! `sampling.top_p`).

use ril_common::SamplingParams;
use ril_proto::convert::{question_to_row, sampling_from_wire};
use ril_proto::v1;

use crate::error::TeacherError;
use crate::options::validate_sampling;
use crate::service::{Answer, AnswerQuery, TeacherInfo};

impl TryFrom<v1::AnswerRequest> for AnswerQuery {
    type Error = TeacherError;

    fn try_from(request: v1::AnswerRequest) -> Result<Self, TeacherError> {
        let question = request
            .question
            .as_ref()
            .ok_or_else(|| TeacherError::invalid("question", "missing"))?;
        if request.n == 0 {
            return Err(TeacherError::invalid("n", "must be at least 1"));
        }
        let row = question_to_row(question).map_err(|e| {
            TeacherError::invalid(
                format!("question.{}", e.field),
                format!("(question {:?}): {}", e.id, e.problem),
            )
        })?;
        let sampling = request
            .sampling
            .as_ref()
            .map(sampling_from_request)
            .transpose()?;
        Ok(Self {
            row,
            n: request.n,
            sampling,
        })
    }
}

/// Sampling settings sent with a request, checked. A teacher takes them literally: settings that were
/// sent are meant, so a zero `top_p`, `repetition_penalty` or `max_new_tokens` is an error
/// naming the field (where `sampling_from_wire` reads zeros as "unset"). A request that wants
/// the server's own settings sends none.
pub fn sampling_from_request(s: &v1::SamplingSettings) -> Result<SamplingParams, TeacherError> {
    let sent = sampling_from_wire(s)
        .ok_or_else(|| TeacherError::invalid("sampling.max_new_tokens", "must be at least 1"))?;
    let sent = SamplingParams {
        top_p: f64::from(s.top_p),
        repetition_penalty: f64::from(s.repetition_penalty),
        ..sent
    };
    validate_sampling(&sent, "sampling")?;
    Ok(sent)
}

/// One answer of a stream, from `teacher`.
pub(crate) fn answer_to_wire(teacher: &str, answer: Answer) -> v1::TeacherAnswer {
    v1::TeacherAnswer {
        teacher: teacher.to_string(),
        index: answer.index,
        text: answer.text,
        from_cache: answer.from_cache,
    }
}

impl From<TeacherInfo> for v1::TeacherInfo {
    fn from(info: TeacherInfo) -> Self {
        Self {
            name: info.name,
            backend: info.backend,
            cache_entries: info.cache_entries,
            cache_hits: info.cache_hits,
            generated: info.generated,
        }
    }
}

#[cfg(test)]
mod tests {
    use ril_proto::convert::row_to_question;

    use super::*;

    fn request(sampling: Option<v1::SamplingSettings>) -> v1::AnswerRequest {
        let row = ril_data::dataset::parse_row(
            r#"{"id": "q1", "messages": [{"role": "user", "content": "What colour?"}], "answer": "red"}"#,
            std::path::Path::new("test.jsonl"),
            1,
            std::path::Path::new("."),
        )
        .unwrap();
        v1::AnswerRequest {
            question: Some(row_to_question(&row)),
            n: 2,
            sampling,
        }
    }

    fn wire(p: &SamplingParams) -> v1::SamplingSettings {
        v1::SamplingSettings::from(p)
    }

    #[test]
    fn a_request_becomes_a_query_with_its_settings_at_wire_precision() {
        let q = AnswerQuery::try_from(request(None)).unwrap();
        assert_eq!((q.row.id.as_str(), q.n, q.sampling), ("q1", 2, None));
        let sent = SamplingParams::paper(8, 5);
        let q = AnswerQuery::try_from(request(Some(wire(&sent)))).unwrap();
        let got = q.sampling.unwrap();
        assert_eq!(got.top_p, f64::from(0.95f32));
        assert_eq!(
            (got.top_k, got.max_new_tokens, got.seed, got.temperature),
            (50, 8, 5, 1.0)
        );
    }

    #[test]
    fn every_bad_field_is_named_as_the_proto_spells_it() {
        let paper = SamplingParams::paper(8, 0);
        let mut no_question = request(None);
        no_question.question = None;
        let mut zero_n = request(None);
        zero_n.n = 0;
        let mut no_id = request(None);
        no_id.question.as_mut().unwrap().id.clear();
        let cases = [
            (no_question, "`question` missing"),
            (zero_n, "`n`"),
            (no_id, "`question.id`"),
            (
                request(Some(v1::SamplingSettings {
                    top_p: 0.0,
                    ..wire(&paper)
                })),
                "`sampling.top_p`",
            ),
            (
                request(Some(v1::SamplingSettings {
                    repetition_penalty: 0.0,
                    ..wire(&paper)
                })),
                "`sampling.repetition_penalty`",
            ),
            (
                request(Some(v1::SamplingSettings {
                    max_new_tokens: 0,
                    ..wire(&paper)
                })),
                "`sampling.max_new_tokens`",
            ),
            (
                request(Some(v1::SamplingSettings {
                    temperature: f32::NAN,
                    ..wire(&paper)
                })),
                "`sampling.temperature`",
            ),
        ];
        for (req, field) in cases {
            let e = AnswerQuery::try_from(req).unwrap_err();
            assert!(matches!(e, TeacherError::InvalidArgument { .. }), "{e:?}");
            assert!(e.to_string().contains(field), "{field}: {e}");
        }
    }
}
