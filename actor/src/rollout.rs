//! The model-side half of an actor's iteration, free of gRPC: sampling G student responses
//! with behaviour log-probs, tokenising teacher answers with the student's tokenizer, the
//! round-robin split of teacher slots, the binary rewards, and a group's scored responses.

use ril_data::Row;
use ril_model::bundle::Bundle;
use ril_model::generate::{FinishReason, Generation, SamplingParams, generate};

use crate::error::ActorError;
use crate::peers::{ResponseScore, ResponseSource, ScoredResponse, TeacherAnswer};

/// The student's G responses to one question.
#[derive(Debug, Clone)]
pub struct StudentRollouts {
    /// The prompt as tokenised (image placeholders expanded).
    pub prompt_ids: Vec<u32>,
    pub generations: Vec<Generation>,
    pub texts: Vec<String>,
}

/// A per-(position, version) seed, so a re-issued question is sampled afresh by each version
/// and reproducibly by the same one.
pub fn rollout_seed(run_seed: u64, position: u64, version: u64) -> u64 {
    // SplitMix64 over the three inputs.
    let mut z = run_seed
        ^ position.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ version.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Samples `g` responses to `row` (one batch of `g` copies of the prompt; each has its own
/// random stream).
pub fn sample_student(
    bundle: &Bundle,
    row: &Row,
    g: usize,
    sampling: &SamplingParams,
    seed: u64,
) -> Result<StudentRollouts, ActorError> {
    let prompt = ril_prompt::prompt(bundle, row)?;
    let mut params = sampling.clone();
    params.seed = seed;
    if params.stop_token_ids.is_empty() {
        params.stop_token_ids = bundle.stop_token_ids();
    }
    let prompts = vec![prompt.clone(); g];
    let generations = generate(&bundle.model, &prompts, &params)?;
    let texts = generations
        .iter()
        .map(|g| bundle.tokenizer.decode(&g.token_ids, true))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(StudentRollouts {
        prompt_ids: prompt.token_ids,
        generations,
        texts,
    })
}

/// A teacher's answer as the student would have produced it: its text under the student's
/// tokenizer, ended by the end-of-turn token (as SFT targets are).
pub fn teacher_tokens(bundle: &Bundle, text: &str) -> Result<Vec<u32>, ActorError> {
    Ok(ril_prompt::answer_ids(&bundle.tokenizer, text)?)
}

/// How many of `slots` teacher answers each of `n_teachers` gives: round-robin, so slot j
/// goes to teacher j mod n (the first teachers get one more when it does not divide).
pub fn teacher_split(n_teachers: usize, slots: usize) -> Vec<usize> {
    if n_teachers == 0 {
        return Vec::new();
    }
    (0..n_teachers)
        .map(|t| slots / n_teachers + usize::from(t < slots % n_teachers))
        .collect()
}

/// The binary rewards of RIL: r_sim = 1 when D says "teacher" (P(student) < 0.5), r_ans the
/// judge's 0/1.
pub fn rewards(d_prob: f32, answer_score: f32) -> (f32, f32) {
    (
        if d_prob < 0.5 { 1.0 } else { 0.0 },
        if answer_score >= 0.5 { 1.0 } else { 0.0 },
    )
}

pub fn truncated(g: &Generation) -> bool {
    g.finish_reason == FinishReason::Length
}

/// A group's responses with their rewards: the G student responses (sampled with `version`)
/// first, then the teacher answers in slot order, each scored by the score at its index.
/// `scores` holds one score per response, in that order (the actor checks the count first).
///
/// # Panics
/// When `scores` has fewer entries than there are student responses.
pub fn scored_responses(
    bundle: &Bundle,
    student: &StudentRollouts,
    teacher_answers: &[TeacherAnswer],
    scores: &[ResponseScore],
    version: u64,
) -> Result<Vec<ScoredResponse>, ActorError> {
    let (student_scores, teacher_scores) = scores.split_at(student.texts.len());
    let mut responses = Vec::with_capacity(scores.len());
    for ((generation, text), score) in student
        .generations
        .iter()
        .zip(&student.texts)
        .zip(student_scores)
    {
        let (r_sim, r_ans) = rewards(score.d_prob, score.answer_score);
        responses.push(ScoredResponse {
            source: ResponseSource::Student,
            text: text.clone(),
            token_ids: generation.token_ids.clone(),
            behaviour_logprobs: generation.logprobs.clone(),
            policy_version: version,
            d_prob: score.d_prob,
            r_sim,
            r_ans,
            truncated: truncated(generation),
        });
    }
    for (answer, score) in teacher_answers.iter().zip(teacher_scores) {
        let (r_sim, r_ans) = rewards(score.d_prob, score.answer_score);
        responses.push(ScoredResponse {
            source: ResponseSource::Teacher {
                name: answer.teacher.clone(),
            },
            text: answer.text.clone(),
            token_ids: teacher_tokens(bundle, &answer.text)?,
            behaviour_logprobs: Vec::new(),
            policy_version: version,
            d_prob: score.d_prob,
            r_sim,
            r_ans,
            truncated: false,
        });
    }
    Ok(responses)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn teacher_slots_are_shared_round_robin() {
        assert_eq!(teacher_split(2, 4), vec![2, 2]);
        assert_eq!(teacher_split(2, 3), vec![2, 1]);
        assert_eq!(teacher_split(3, 4), vec![2, 1, 1]);
        assert_eq!(teacher_split(1, 4), vec![4]);
        assert!(teacher_split(0, 4).is_empty());
        for n in 1..5 {
            for s in 0..9 {
                assert_eq!(teacher_split(n, s).iter().sum::<usize>(), s);
            }
        }
    }

    #[test]
    fn rewards_are_binary_at_one_half() {
        assert_eq!(rewards(0.49, 1.0), (1.0, 1.0));
        assert_eq!(rewards(0.5, 0.0), (0.0, 0.0));
        assert_eq!(rewards(0.9, 1.0), (0.0, 1.0));
    }

    #[test]
    fn seeds_differ_by_position_and_version() {
        let a = rollout_seed(1, 10, 0);
        assert_eq!(a, rollout_seed(1, 10, 0));
        assert_ne!(a, rollout_seed(1, 11, 0));
        assert_ne!(a, rollout_seed(1, 10, 1));
        assert_ne!(a, rollout_seed(2, 10, 0));
    }
}
