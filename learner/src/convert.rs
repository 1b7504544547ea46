//! Wire <-> domain conversions of the learner's messages, every field checked on the way in.
//! A scored group that does not convert is a [`Rejection`] naming its position and field (the
//! adapter turns it into that group's verdict, never into an RPC error).

use std::sync::Arc;

use bytes::Bytes;
use ril_proto::v1 as pb;

use crate::grpo::{Response, ResponseSource};
use crate::service::{
    DiscriminatorStep, IncomingGroup, JoinReply, LabelledGroup, LearnerInfo, Rejection, Verdict,
};
use crate::trainer::WeightsPayload;

/// Weight chunk size when the request leaves `chunk_bytes` at 0.
pub const DEFAULT_CHUNK_BYTES: usize = 1 << 20;
/// The largest chunk served, whatever the request asks (well below the message limit).
pub const MAX_CHUNK_BYTES: usize = 16 << 20;

impl From<ResponseSource> for pb::ResponseSource {
    fn from(source: ResponseSource) -> Self {
        match source {
            ResponseSource::Student => pb::ResponseSource::Student,
            ResponseSource::Teacher => pb::ResponseSource::Teacher,
        }
    }
}

/// The wire's response source; UNSPECIFIED and unknown values are not a source.
fn response_source(source: i32) -> Option<ResponseSource> {
    match pb::ResponseSource::try_from(source) {
        Ok(pb::ResponseSource::Student) => Some(ResponseSource::Student),
        Ok(pb::ResponseSource::Teacher) => Some(ResponseSource::Teacher),
        _ => None,
    }
}

fn response_from_wire(
    position: u64,
    i: usize,
    r: &pb::ScoredResponse,
) -> Result<Response, Rejection> {
    let source = response_source(r.source).ok_or_else(|| {
        Rejection::new(
            position,
            format!("responses[{i}].source"),
            format!("{} is neither STUDENT nor TEACHER", r.source),
        )
    })?;
    Ok(Response {
        source,
        token_ids: r.token_ids.clone(),
        behaviour_logprobs: match source {
            ResponseSource::Student => r.behaviour_logprobs.clone(),
            // Teacher tokens are scored by the learner itself.
            ResponseSource::Teacher => Vec::new(),
        },
        policy_version: r.policy_version,
        d_prob: r.d_prob,
        r_sim: r.r_sim,
        r_ans: r.r_ans,
        text: r.text.clone(),
    })
}

/// A wire group as a domain group. Structural problems (no question, an unreadable question,
/// an unspecified response source) are rejections naming the position and field.
impl TryFrom<&pb::ScoredGroup> for IncomingGroup {
    type Error = Rejection;

    fn try_from(g: &pb::ScoredGroup) -> Result<Self, Rejection> {
        let p = g.position;
        let question = g
            .question
            .as_ref()
            .ok_or_else(|| Rejection::new(p, "question", "missing"))?;
        let row = ril_proto::convert::question_to_row(question)
            .map_err(|e| Rejection::new(p, format!("question.{}", e.field), e.to_string()))?;
        let responses = g
            .responses
            .iter()
            .enumerate()
            .map(|(i, r)| response_from_wire(p, i, r))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(IncomingGroup {
            lease_id: g.lease_id.clone(),
            position: p,
            iteration: g.iteration,
            row,
            prompt_ids: g.prompt_token_ids.clone(),
            responses,
            actor_id: g.actor_id.clone(),
            timings_ms: g.timings_ms.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        })
    }
}

/// A domain group back in its wire form (rank 0 sends shards to the other ranks in it).
impl From<&IncomingGroup> for pb::ScoredGroup {
    fn from(g: &IncomingGroup) -> Self {
        pb::ScoredGroup {
            lease_id: g.lease_id.clone(),
            position: g.position,
            iteration: g.iteration,
            question: Some(ril_proto::convert::row_to_question(&g.row)),
            prompt_token_ids: g.prompt_ids.clone(),
            responses: g
                .responses
                .iter()
                .map(|r| pb::ScoredResponse {
                    source: pb::ResponseSource::from(r.source) as i32,
                    token_ids: r.token_ids.clone(),
                    behaviour_logprobs: r.behaviour_logprobs.clone(),
                    policy_version: r.policy_version,
                    d_prob: r.d_prob,
                    r_sim: r.r_sim,
                    r_ans: r.r_ans,
                    text: r.text.clone(),
                    ..Default::default()
                })
                .collect(),
            actor_id: g.actor_id.clone(),
            timings_ms: g.timings_ms.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        }
    }
}

impl From<Verdict> for pb::GroupVerdict {
    fn from(v: Verdict) -> Self {
        pb::GroupVerdict {
            position: v.position,
            accepted: v.accepted,
            reason: v.reason,
        }
    }
}

impl From<LearnerInfo> for pb::LearnerInfo {
    fn from(info: LearnerInfo) -> Self {
        pb::LearnerInfo {
            policy_version: info.policy_version,
            iteration: info.iteration,
            rank: info.rank,
            world_size: info.world_size,
            weights_bytes: info.weights_bytes,
            weights_sha256: info.weights_sha256,
        }
    }
}

/// `payload` as GetWeights streams it: chunks of `chunk_bytes` (0: the default; capped at
/// [`MAX_CHUNK_BYTES`]) in order, the SHA-256 on the last one only.
pub fn weight_chunks(
    payload: Arc<WeightsPayload>,
    chunk_bytes: u32,
) -> impl Iterator<Item = pb::WeightChunk> + Send {
    let chunk = match chunk_bytes as usize {
        0 => DEFAULT_CHUNK_BYTES,
        n => n.min(MAX_CHUNK_BYTES),
    };
    let total = payload.bytes.len();
    let n_chunks = total.div_ceil(chunk).max(1);
    (0..n_chunks).map(move |i| {
        let start = i * chunk;
        let end = (start + chunk).min(total);
        let last = i + 1 == n_chunks;
        pb::WeightChunk {
            version: Some(pb::PolicyVersion {
                version: payload.version,
            }),
            offset: start as u64,
            total_bytes: total as u64,
            data: payload.bytes.slice(start..end),
            sha256: if last {
                Bytes::copy_from_slice(&payload.sha256)
            } else {
                Bytes::new()
            },
        }
    })
}

impl From<pb::JoinLearnerResponse> for JoinReply {
    fn from(r: pb::JoinLearnerResponse) -> Self {
        JoinReply {
            world_size: r.world_size,
            ready: r.ready,
            rank_addrs: r.rank_addrs,
            collective_addrs: r.collective_addrs,
            collective_id: r.collective_id.to_vec(),
        }
    }
}

/// The items of D's Train request: every response with its question.
pub fn labelled_responses(groups: &[LabelledGroup]) -> Vec<pb::LabelledResponse> {
    groups
        .iter()
        .flat_map(|g| {
            let question = ril_proto::convert::row_to_question(&g.row);
            g.responses.iter().map(move |r| pb::LabelledResponse {
                question: Some(question.clone()),
                response: r.text.clone(),
                from_student: r.from_student,
            })
        })
        .collect()
}

impl From<pb::TrainResponse> for DiscriminatorStep {
    fn from(r: pb::TrainResponse) -> Self {
        DiscriminatorStep {
            loss: r.loss,
            accuracy: r.accuracy,
            step: r.step,
            skipped: r.skipped,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire_group() -> pb::ScoredGroup {
        let row = ril_data::Row {
            id: "q7".into(),
            images: vec![],
            messages: vec![ril_data::dataset::Message {
                role: "user".into(),
                content: serde_json::Value::String("What colour?".into()),
            }],
            answer: "red".into(),
            answer_type: None,
            teacher_answers: Default::default(),
            family: Some("colour".into()),
            extra: Default::default(),
        };
        let response = |source: pb::ResponseSource, text: &str| pb::ScoredResponse {
            source: source as i32,
            text: text.into(),
            token_ids: vec![5, 6],
            behaviour_logprobs: vec![-0.5, -0.25],
            policy_version: 3,
            d_prob: 0.25,
            r_sim: 0.75,
            r_ans: 1.0,
            ..Default::default()
        };
        pb::ScoredGroup {
            lease_id: "lease-7".into(),
            position: 7,
            iteration: 3,
            question: Some(ril_proto::convert::row_to_question(&row)),
            prompt_token_ids: vec![1, 2, 3],
            responses: vec![
                response(pb::ResponseSource::Student, "red"),
                response(pb::ResponseSource::Teacher, "It is red."),
            ],
            actor_id: "actor-0".into(),
            timings_ms: [("generate".to_string(), 5.0)].into_iter().collect(),
        }
    }

    #[test]
    fn a_group_converts_and_converts_back() {
        let wire = wire_group();
        let group = IncomingGroup::try_from(&wire).unwrap();
        assert_eq!((group.position, group.iteration), (7, 3));
        assert_eq!(group.row.id, "q7");
        assert_eq!(group.responses[0].behaviour_logprobs, [-0.5, -0.25]);
        assert!(
            group.responses[1].behaviour_logprobs.is_empty(),
            "teacher tokens are scored by the learner"
        );
        let again = IncomingGroup::try_from(&pb::ScoredGroup::from(&group)).unwrap();
        assert_eq!(again.row, group.row);
        assert_eq!(again.responses, group.responses);
        assert_eq!(again.timings_ms, group.timings_ms);
        let labelled = labelled_responses(&[LabelledGroup::from(&group)]);
        assert_eq!(
            labelled
                .iter()
                .map(|l| (l.response.as_str(), l.from_student))
                .collect::<Vec<_>>(),
            [("red", true), ("It is red.", false)]
        );
        assert_eq!(labelled[0].question, wire.question);
    }

    #[test]
    fn a_malformed_group_is_a_rejection_naming_position_and_field() {
        let mut no_question = wire_group();
        no_question.question = None;
        let mut no_id = wire_group();
        no_id.question.as_mut().unwrap().id.clear();
        let mut no_source = wire_group();
        no_source.responses[1].source = pb::ResponseSource::Unspecified as i32;
        for (wire, field) in [
            (no_question, "question"),
            (no_id, "question.id"),
            (no_source, "responses[1].source"),
        ] {
            let rejection = IncomingGroup::try_from(&wire).unwrap_err();
            assert_eq!((rejection.position, rejection.field.as_str()), (7, field));
            let verdict = pb::GroupVerdict::from(Verdict::from(&rejection));
            assert!(!verdict.accepted);
            assert!(
                verdict.reason.contains("position 7") && verdict.reason.contains(field),
                "{}",
                verdict.reason
            );
        }
    }

    #[test]
    fn weights_stream_in_chunks_with_the_checksum_last() {
        let payload = Arc::new(WeightsPayload {
            version: 4,
            bytes: Bytes::from(vec![7u8; 10]),
            sha256: [9; 32],
        });
        let chunks: Vec<_> = weight_chunks(payload.clone(), 4).collect();
        assert_eq!(
            chunks.iter().map(|c| c.offset).collect::<Vec<_>>(),
            [0, 4, 8]
        );
        assert!(chunks[..2].iter().all(|c| c.sha256.is_empty()));
        assert_eq!(chunks[2].sha256.as_ref(), &[9; 32]);
        assert_eq!(chunks[2].data.len(), 2);
        assert!(
            chunks
                .iter()
                .all(|c| c.total_bytes == 10 && c.version.as_ref().map(|v| v.version) == Some(4))
        );
        assert_eq!(weight_chunks(payload, 0).count(), 1, "the default size");
    }
}
