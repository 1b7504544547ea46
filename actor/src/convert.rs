//! The wire <-> domain conversions of the actor's peers: `TryFrom` for what the actor receives
//! (registration, lease, scores), validating every field it reads and naming the field in the
//! error; `From` for what it sends. Only [`crate::grpc`] and this module see generated types.

use std::time::Duration;

use ril_common::SamplingParams;
use ril_data::Row;
use ril_proto::convert::{question_to_row, row_to_question, sampling_from_wire};
use ril_proto::v1;

use crate::peers::{
    GroupVerdict, HeartbeatReply, Lease, LeaseCompletion, LeaseItem, LeaseReply, LeaseRequest,
    Registration, ResponseScore, ResponseSource, RolloutSettings, ScoredGroup, ScoredResponse,
    TeacherAnswer, UnreadableItem,
};

/// A reply that breaks the protocol: which field, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field `{field}`: {problem}")]
pub struct ConvertError {
    /// As the proto spells it, with the index of a repeated field (`scores[3].d_prob`).
    pub field: String,
    pub problem: String,
}

impl ConvertError {
    fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            problem: problem.into(),
        }
    }

    /// The same problem, one level down in the message (`items[2].` + `question.id`).
    fn within(self, parent: &str) -> Self {
        Self {
            field: format!("{parent}.{}", self.field),
            problem: self.problem,
        }
    }
}

/// The student's sampling: required (the coordinator always sends it), validated.
fn student_sampling(wire: Option<&v1::SamplingSettings>) -> Result<SamplingParams, ConvertError> {
    let wire = wire.ok_or_else(|| ConvertError::new("sampling", "missing"))?;
    let sampling = sampling_from_wire(wire).ok_or_else(|| {
        ConvertError::new(
            "sampling.max_new_tokens",
            "is 0 (the coordinator must set it)",
        )
    })?;
    validated_sampling(sampling, "sampling")
}

/// The teachers' sampling: unset (absent or `max_new_tokens == 0`) means the teacher servers'
/// own settings.
fn teacher_sampling(
    wire: Option<&v1::SamplingSettings>,
) -> Result<Option<SamplingParams>, ConvertError> {
    wire.and_then(sampling_from_wire)
        .map(|s| validated_sampling(s, "teacher_sampling"))
        .transpose()
}

fn validated_sampling(
    sampling: SamplingParams,
    field: &str,
) -> Result<SamplingParams, ConvertError> {
    sampling
        .validate()
        .map_err(|e| ConvertError::new(format!("{field}.{}", e.field), e.problem))?;
    Ok(sampling)
}

fn address(field: &str, addr: &str) -> Result<String, ConvertError> {
    if addr.trim().is_empty() {
        return Err(ConvertError::new(field, "empty"));
    }
    Ok(addr.to_string())
}

impl TryFrom<v1::RegisterActorResponse> for Registration {
    type Error = ConvertError;

    fn try_from(r: v1::RegisterActorResponse) -> Result<Self, ConvertError> {
        if r.group_size == 0 {
            return Err(ConvertError::new("group_size", "is 0"));
        }
        let teacher_addrs = r
            .teacher_addrs
            .iter()
            .enumerate()
            .map(|(i, a)| address(&format!("teacher_addrs[{i}]"), a))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            learner_addr: address("learner_addr", &r.learner_addr)?,
            discriminator_addr: address("discriminator_addr", &r.discriminator_addr)?,
            teacher_addrs,
            settings: RolloutSettings {
                group_size: r.group_size as usize,
                teacher_slots: r.teacher_slots as usize,
                student_sampling: student_sampling(r.sampling.as_ref())?,
                teacher_sampling: teacher_sampling(r.teacher_sampling.as_ref())?,
                heartbeat_interval: Duration::from_millis(r.heartbeat_interval_ms),
            },
            run_id: r.run_id,
        })
    }
}

impl From<v1::HeartbeatResponse> for HeartbeatReply {
    fn from(r: v1::HeartbeatResponse) -> Self {
        Self {
            known: r.known,
            run_finished: r.run_finished,
        }
    }
}

impl From<&LeaseRequest> for v1::LeasePromptsRequest {
    fn from(r: &LeaseRequest) -> Self {
        Self {
            actor_id: r.actor_id.clone(),
            max_questions: r.max_questions,
            // proto3 has no "none": 0 is what an actor without weights reports.
            policy_version: r.policy_version.unwrap_or(0),
            request_id: r.request_id.clone(),
        }
    }
}

/// An item whose question cannot be read is kept apart (and handed back) rather than failing
/// the lease: the other questions of the lease are fine.
impl TryFrom<v1::LeasePromptsResponse> for LeaseReply {
    type Error = ConvertError;

    fn try_from(r: v1::LeasePromptsResponse) -> Result<Self, ConvertError> {
        if r.run_finished {
            return Ok(Self::Finished);
        }
        if r.items.is_empty() {
            return Ok(Self::Wait {
                retry_after: Duration::from_millis(r.retry_after_ms),
            });
        }
        if r.lease_id.is_empty() {
            return Err(ConvertError::new("lease_id", "empty in a lease with items"));
        }
        let mut items = Vec::with_capacity(r.items.len());
        let mut unreadable = Vec::new();
        for (i, item) in r.items.into_iter().enumerate() {
            let (position, iteration) = (item.position, item.iteration);
            match lease_question(item.question.as_ref()) {
                Ok(question) => items.push(LeaseItem {
                    position,
                    iteration,
                    question,
                }),
                Err(e) => unreadable.push(UnreadableItem {
                    position,
                    error: e.within(&format!("items[{i}]")),
                }),
            }
        }
        Ok(Self::Granted(Lease {
            lease_id: r.lease_id,
            policy_version: r.policy_version,
            items,
            unreadable,
        }))
    }
}

fn lease_question(question: Option<&v1::Question>) -> Result<Row, ConvertError> {
    let question = question.ok_or_else(|| ConvertError::new("question", "missing"))?;
    question_to_row(question).map_err(|e| {
        ConvertError::new(
            format!("question.{}", e.field),
            format!("(question {:?}) {}", e.id, e.problem),
        )
    })
}

impl From<&LeaseCompletion> for v1::CompleteLeaseRequest {
    fn from(c: &LeaseCompletion) -> Self {
        Self {
            actor_id: c.actor_id.clone(),
            lease_id: c.lease_id.clone(),
            returned_positions: c.returned_positions.clone(),
            reason: c.reason.clone(),
        }
    }
}

/// The `Answer` request for `n` answers to `question`.
pub fn answer_request(
    question: &Row,
    n: usize,
    sampling: Option<&SamplingParams>,
) -> v1::AnswerRequest {
    v1::AnswerRequest {
        question: Some(row_to_question(question)),
        n: u32::try_from(n).unwrap_or(u32::MAX),
        sampling: sampling.map(v1::SamplingSettings::from),
    }
}

impl From<v1::TeacherAnswer> for TeacherAnswer {
    fn from(a: v1::TeacherAnswer) -> Self {
        Self {
            teacher: a.teacher,
            index: a.index,
            text: a.text,
        }
    }
}

/// The `Score` request for `responses` to `question`.
pub fn score_request(question: &Row, responses: &[String]) -> v1::ScoreRequest {
    v1::ScoreRequest {
        question: Some(row_to_question(question)),
        responses: responses.to_vec(),
    }
}

fn probability(field: &str, value: f32) -> Result<f32, ConvertError> {
    if !(0.0..=1.0).contains(&value) {
        return Err(ConvertError::new(
            field,
            format!("{value} is not a probability in [0, 1]"),
        ));
    }
    Ok(value)
}

impl TryFrom<v1::ResponseScore> for ResponseScore {
    type Error = ConvertError;

    fn try_from(s: v1::ResponseScore) -> Result<Self, ConvertError> {
        Ok(Self {
            d_prob: probability("d_prob", s.d_prob)?,
            answer_score: probability("answer_score", s.answer_score)?,
        })
    }
}

/// The scores of a `Score` reply, in order (the count is the actor's to check).
pub fn scores(reply: v1::ScoreResponse) -> Result<Vec<ResponseScore>, ConvertError> {
    reply
        .scores
        .into_iter()
        .enumerate()
        .map(|(i, s)| ResponseScore::try_from(s).map_err(|e| e.within(&format!("scores[{i}]"))))
        .collect()
}

impl From<ScoredResponse> for v1::ScoredResponse {
    fn from(r: ScoredResponse) -> Self {
        let (source, teacher) = match r.source {
            ResponseSource::Student => (v1::ResponseSource::Student, String::new()),
            ResponseSource::Teacher { name } => (v1::ResponseSource::Teacher, name),
        };
        Self {
            source: source as i32,
            teacher,
            text: r.text,
            token_ids: r.token_ids,
            behaviour_logprobs: r.behaviour_logprobs,
            policy_version: r.policy_version,
            d_prob: r.d_prob,
            r_sim: r.r_sim,
            r_ans: r.r_ans,
            truncated: r.truncated,
        }
    }
}

impl From<ScoredGroup> for v1::ScoredGroup {
    fn from(g: ScoredGroup) -> Self {
        Self {
            lease_id: g.lease_id,
            position: g.position,
            iteration: g.iteration,
            question: Some(row_to_question(&g.question)),
            prompt_token_ids: g.prompt_token_ids,
            responses: g.responses.into_iter().map(Into::into).collect(),
            actor_id: g.actor_id,
            timings_ms: g.timings_ms.into_iter().collect(),
        }
    }
}

impl From<v1::GroupVerdict> for GroupVerdict {
    fn from(v: v1::GroupVerdict) -> Self {
        Self {
            position: v.position,
            refused: (!v.accepted).then_some(v.reason),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values an f32 holds exactly, so they survive the wire unchanged.
    fn sampling() -> SamplingParams {
        SamplingParams {
            top_p: 0.5,
            repetition_penalty: 1.25,
            ..SamplingParams::paper(32, 7)
        }
    }

    fn registration() -> v1::RegisterActorResponse {
        v1::RegisterActorResponse {
            run_id: "run".into(),
            heartbeat_interval_ms: 250,
            lease_timeout_ms: 60_000,
            group_size: 4,
            teacher_addrs: vec!["t1:1".into(), "t2:2".into()],
            discriminator_addr: "d:3".into(),
            learner_addr: "l:4".into(),
            sampling: Some(v1::SamplingSettings::from(&sampling())),
            teacher_sampling: Some(v1::SamplingSettings::default()),
            teacher_slots: 3,
        }
    }

    #[test]
    fn a_registration_becomes_the_run_settings() {
        let r = Registration::try_from(registration()).unwrap();
        assert_eq!(r.run_id, "run");
        assert_eq!(r.learner_addr, "l:4");
        assert_eq!(r.discriminator_addr, "d:3");
        assert_eq!(r.teacher_addrs, ["t1:1", "t2:2"]);
        let s = &r.settings;
        assert_eq!((s.group_size, s.teacher_slots), (4, 3));
        assert_eq!(s.heartbeat_interval, Duration::from_millis(250));
        assert_eq!(s.student_sampling, sampling());
        // All zeros: the teacher servers' own settings.
        assert_eq!(s.teacher_sampling, None);
        let sent = SamplingParams::greedy(8);
        let mut wire = registration();
        wire.teacher_sampling = Some(v1::SamplingSettings::from(&sent));
        let r = Registration::try_from(wire).unwrap();
        assert_eq!(r.settings.teacher_sampling, Some(sent));
    }

    #[test]
    fn a_bad_registration_names_the_field() {
        type Edit = fn(&mut v1::RegisterActorResponse);
        let cases: [(Edit, &str); 8] = [
            (|r| r.group_size = 0, "group_size"),
            (|r| r.sampling = None, "sampling"),
            (
                |r| r.sampling.as_mut().unwrap().max_new_tokens = 0,
                "sampling.max_new_tokens",
            ),
            (
                |r| r.sampling.as_mut().unwrap().temperature = -1.0,
                "sampling.temperature",
            ),
            (
                |r| r.sampling.as_mut().unwrap().top_p = 1.5,
                "sampling.top_p",
            ),
            (
                |r| {
                    r.teacher_sampling = Some(v1::SamplingSettings {
                        max_new_tokens: 4,
                        repetition_penalty: -1.0,
                        ..Default::default()
                    })
                },
                "teacher_sampling.repetition_penalty",
            ),
            (|r| r.learner_addr.clear(), "learner_addr"),
            (|r| r.teacher_addrs[1] = " ".into(), "teacher_addrs[1]"),
        ];
        for (edit, field) in cases {
            let mut wire = registration();
            edit(&mut wire);
            let e = Registration::try_from(wire).unwrap_err();
            assert_eq!(e.field, field, "{e}");
            assert!(e.to_string().contains(field), "{e}");
        }
    }

    fn question(id: &str) -> v1::Question {
        v1::Question {
            id: id.into(),
            messages: vec![v1::ChatMessage {
                role: "user".into(),
                text: "What colour?".into(),
                parts_json: String::new(),
            }],
            reference: "red".into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_lease_keeps_unreadable_questions_apart() {
        let reply = v1::LeasePromptsResponse {
            lease_id: "L1".into(),
            policy_version: 3,
            items: vec![
                v1::LeaseItem {
                    position: 10,
                    iteration: 2,
                    question: Some(question("q10")),
                },
                v1::LeaseItem {
                    position: 11,
                    iteration: 2,
                    question: None,
                },
                v1::LeaseItem {
                    position: 12,
                    iteration: 2,
                    question: Some(question("")),
                },
            ],
            ..Default::default()
        };
        let LeaseReply::Granted(lease) = LeaseReply::try_from(reply).unwrap() else {
            panic!("a lease with items is granted");
        };
        assert_eq!((lease.lease_id.as_str(), lease.policy_version), ("L1", 3));
        assert_eq!(lease.items.len(), 1);
        assert_eq!(lease.items[0].question.id, "q10");
        assert_eq!(lease.items[0].question.answer, "red");
        let bad: Vec<(u64, &str)> = lease
            .unreadable
            .iter()
            .map(|u| (u.position, u.error.field.as_str()))
            .collect();
        assert_eq!(
            bad,
            [(11, "items[1].question"), (12, "items[2].question.id")]
        );
        assert_eq!(lease.positions(), [10, 11, 12]);
    }

    #[test]
    fn empty_and_finished_leases() {
        let wait = v1::LeasePromptsResponse {
            retry_after_ms: 40,
            ..Default::default()
        };
        assert_eq!(
            LeaseReply::try_from(wait).unwrap(),
            LeaseReply::Wait {
                retry_after: Duration::from_millis(40)
            }
        );
        let finished = v1::LeasePromptsResponse {
            run_finished: true,
            ..Default::default()
        };
        assert_eq!(
            LeaseReply::try_from(finished).unwrap(),
            LeaseReply::Finished
        );
        let nameless = v1::LeasePromptsResponse {
            items: vec![v1::LeaseItem {
                position: 1,
                iteration: 0,
                question: Some(question("q1")),
            }],
            ..Default::default()
        };
        assert_eq!(
            LeaseReply::try_from(nameless).unwrap_err().field,
            "lease_id"
        );
    }

    #[test]
    fn scores_must_be_probabilities() {
        let wire = |d_prob, answer_score| v1::ResponseScore {
            d_prob,
            answer_score,
            ..Default::default()
        };
        let ok = scores(v1::ScoreResponse {
            scores: vec![wire(0.25, 1.0), wire(0.75, 0.0)],
            discriminator_step: 0,
        })
        .unwrap();
        assert_eq!(ok[1].d_prob, 0.75);
        for (bad, field) in [
            (wire(f32::NAN, 1.0), "scores[1].d_prob"),
            (wire(0.5, 2.0), "scores[1].answer_score"),
        ] {
            let e = scores(v1::ScoreResponse {
                scores: vec![wire(0.5, 1.0), bad],
                discriminator_step: 0,
            })
            .unwrap_err();
            assert_eq!(e.field, field, "{e}");
        }
    }

    #[test]
    fn sent_messages_carry_every_field() {
        let request = v1::LeasePromptsRequest::from(&LeaseRequest {
            actor_id: "a".into(),
            max_questions: 2,
            policy_version: None,
            request_id: "a/7".into(),
        });
        assert_eq!((request.max_questions, request.policy_version), (2, 0));
        assert_eq!(request.request_id, "a/7");
        let row = question_to_row(&question("q1")).unwrap();
        let group = v1::ScoredGroup::from(ScoredGroup {
            lease_id: "L".into(),
            position: 5,
            iteration: 1,
            question: row.clone(),
            prompt_token_ids: vec![1, 2],
            responses: vec![ScoredResponse {
                source: ResponseSource::Teacher { name: "big".into() },
                text: "red".into(),
                token_ids: vec![3],
                behaviour_logprobs: vec![],
                policy_version: 4,
                d_prob: 0.25,
                r_sim: 1.0,
                r_ans: 1.0,
                truncated: false,
            }],
            actor_id: "a".into(),
            timings_ms: [("scoring".to_string(), 2.5)].into(),
        });
        assert_eq!(
            question_to_row(group.question.as_ref().unwrap()).unwrap(),
            row
        );
        let response = &group.responses[0];
        assert_eq!(response.source, v1::ResponseSource::Teacher as i32);
        assert_eq!(
            (response.teacher.as_str(), response.policy_version),
            ("big", 4)
        );
        assert_eq!(group.timings_ms["scoring"], 2.5);
        let refused = GroupVerdict::from(v1::GroupVerdict {
            position: 5,
            accepted: false,
            reason: "duplicate".into(),
        });
        assert_eq!(refused.refused.as_deref(), Some("duplicate"));
    }
}
