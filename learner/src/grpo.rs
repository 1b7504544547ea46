//! Dr.GRPO over mixed groups (RIL.md, Eq. 2): the policy loss of one learner iteration.
//!
//! For each question the group holds G student rollouts and the teacher responses (tokenised
//! with the student's tokenizer). With R_i = r_sim + r_ans (each switchable) and
//! A_i = R_i - mean_group(R) (no division by the standard deviation):
//!
//! ```text
//! J = mean_groups 1/|group| sum_i 1/L sum_t [ min(r A_i, clip(r, 1-eps, 1+eps) A_i) - beta k3 ]
//! r   = exp(logp - old_logp)
//! k3  = exp(ref - logp) - (ref - logp) - 1
//! ```
//!
//! `L` is a constant (`loss_normalizer`, the actors' `max_new_tokens`), not each response's
//! length: Dr.GRPO's fix for the length bias. `old_logp` is the behaviour log-prob the actor
//! recorded for student tokens and, for teacher tokens, the current policy's own log-prob,
//! detached when the batch is formed (so their ratio is exactly 1 at the single update per
//! batch RIL uses). The loss is `-J`.
//!
//! Micro-batches contribute already-weighted sums, so gradient accumulation equals one big batch,
//! and the per-response weights use the number of groups over *all* ranks, so summing the
//! ranks' gradients (the [`Collective`]) equals one rank with all the data.
//!
//! Numerical guards **(ours)**: log-ratios are clamped to +-[`LOG_RATIO_CLAMP`] before `exp`
//! (the ratio of a token whose probability moved by e^20 is not informative, and `inf * 0`
//! would poison the sum), for both the importance ratio and the k3 estimator.

use std::collections::BTreeMap;

use candle_core::{D, DType, Tensor, Var};
use ril_model::Vlm;
use ril_model::optim::{AdamW, AdamWConfig, Gradients};
use ril_model::score::{ScoreRequest, score_tokens};
use serde::{Deserialize, Serialize};

use crate::collective::Collective;
use crate::error::{LearnerError, Result};

/// Log-ratios are clamped to `[-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP]` before exponentiation.
pub const LOG_RATIO_CLAMP: f64 = 20.0;

/// The policy-loss and optimizer settings. Field names are the TOML keys (`[learner.grpo]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpoConfig {
    /// PPO clip range: ratios are clipped to `[1 - clip_eps, 1 + clip_eps]` (paper: 0.2).
    pub clip_eps: f64,
    /// Weight of the k3 KL to the frozen reference (paper: 0.01).
    pub kl_beta: f64,
    /// Include the discriminator's similarity reward r_sim in R.
    pub use_sim_reward: bool,
    /// Include the judge's answer reward r_ans in R.
    pub use_ans_reward: bool,
    /// Train on the teacher responses too (RIL). Off: the group is the student rollouts only
    /// (plain Dr.GRPO); teacher responses are still counted in the reward statistics.
    pub teachers_in_group: bool,
    /// GRPO's advantage instead of Dr.GRPO's: divide the mean-centred reward by the group's
    /// reward standard deviation (+ 1e-4). Off (the paper's Dr.GRPO) by default; an ablation.
    pub std_normalized_advantage: bool,
    /// The constant token sums are divided by: the actors' `max_new_tokens`.
    pub loss_normalizer: usize,
    pub lr: f64,
    pub weight_decay: f64,
    /// Global gradient-norm clipping; 0 disables it.
    pub max_grad_norm: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_eps: f64,
    /// Responses per forward/backward pass (gradient accumulation over the iteration's groups).
    pub micro_batch_size: usize,
    /// Temperature of the log-probs: must be what the actors record behaviour log-probs at,
    /// `SamplingParams::logprob_temperature()` (the sampling temperature, 1 for greedy).
    pub logprob_temperature: f64,
}

impl Default for GrpoConfig {
    fn default() -> Self {
        Self {
            clip_eps: 0.2,
            kl_beta: 0.01,
            use_sim_reward: true,
            use_ans_reward: true,
            teachers_in_group: true,
            std_normalized_advantage: false,
            loss_normalizer: 128,
            lr: 1e-6,
            weight_decay: 0.01,
            max_grad_norm: 1.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            micro_batch_size: 8,
            logprob_temperature: 1.0,
        }
    }
}

impl GrpoConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(LearnerError::Invalid(format!("grpo: {m}")));
        if !(self.clip_eps.is_finite() && self.clip_eps > 0.0 && self.clip_eps < 1.0) {
            return bad(format!("clip_eps {} must be in (0, 1)", self.clip_eps));
        }
        if !(self.kl_beta.is_finite() && self.kl_beta >= 0.0) {
            return bad(format!("kl_beta {} must be finite and >= 0", self.kl_beta));
        }
        if !(self.use_sim_reward || self.use_ans_reward) {
            return bad("use_sim_reward and use_ans_reward are both off: no reward".into());
        }
        if self.loss_normalizer == 0 || self.micro_batch_size == 0 {
            return bad("loss_normalizer and micro_batch_size must be positive".into());
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!("lr {} must be finite and > 0", self.lr));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(format!("weight_decay {} must be >= 0", self.weight_decay));
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0) {
            return bad(format!(
                "max_grad_norm {} must be >= 0 (0 disables clipping)",
                self.max_grad_norm
            ));
        }
        if !(self.logprob_temperature.is_finite() && self.logprob_temperature > 0.0) {
            return bad(format!(
                "logprob_temperature {} must be finite and > 0",
                self.logprob_temperature
            ));
        }
        Ok(())
    }

    /// The optimizer these settings describe.
    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
            lr: self.lr,
            beta1: self.adam_beta1,
            beta2: self.adam_beta2,
            eps: self.adam_eps,
            weight_decay: self.weight_decay,
            max_grad_norm: (self.max_grad_norm > 0.0).then_some(self.max_grad_norm),
            decay_1d: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResponseSource {
    Student,
    Teacher,
}

/// One scored response of a group.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    pub source: ResponseSource,
    /// Under the student's tokenizer.
    pub token_ids: Vec<u32>,
    /// Student: the behaviour policy's log-prob of each token. Teacher: unused (empty).
    pub behaviour_logprobs: Vec<f32>,
    /// The policy version that sampled it (student responses).
    pub policy_version: u64,
    /// The discriminator's probability that the response is the student's.
    pub d_prob: f32,
    pub r_sim: f32,
    pub r_ans: f32,
    /// The response as text: what the discriminator trains on (empty where it is not known,
    /// e.g. in tests of the loss).
    pub text: String,
}

/// One question's responses, ready for the model.
#[derive(Debug, Clone)]
pub struct Group {
    /// Position in the run's question stream (for error messages).
    pub position: u64,
    /// The prompt with image placeholders expanded.
    pub prompt_ids: Vec<u32>,
    /// `[n_images, C, H, W]` on the model's device.
    pub pixel_values: Option<Tensor>,
    pub responses: Vec<Response>,
}

/// R_i under `cfg`.
pub fn total_reward(cfg: &GrpoConfig, r: &Response) -> f64 {
    let sim = if cfg.use_sim_reward {
        r.r_sim as f64
    } else {
        0.0
    };
    let ans = if cfg.use_ans_reward {
        r.r_ans as f64
    } else {
        0.0
    };
    sim + ans
}

/// Whether a response takes part in the loss (and in its group's mean reward).
pub fn in_loss(cfg: &GrpoConfig, r: &Response) -> bool {
    r.source == ResponseSource::Student || cfg.teachers_in_group
}

/// A_i = R_i - mean(R) over the group's responses in the loss (divided by std(R) + 1e-4
/// under `std_normalized_advantage`); `None` for the others.
pub fn advantages(cfg: &GrpoConfig, group: &Group) -> Vec<Option<f64>> {
    let rewards: Vec<Option<f64>> = group
        .responses
        .iter()
        .map(|r| in_loss(cfg, r).then(|| total_reward(cfg, r)))
        .collect();
    let included: Vec<f64> = rewards.iter().flatten().copied().collect();
    if included.is_empty() {
        return rewards;
    }
    let n = included.len() as f64;
    let mean = included.iter().sum::<f64>() / n;
    let scale = if cfg.std_normalized_advantage {
        let var = included.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / n;
        1.0 / (var.sqrt() + STD_EPS)
    } else {
        1.0
    };
    rewards
        .into_iter()
        .map(|r| r.map(|r| (r - mean) * scale))
        .collect()
}

/// Added to the group's reward std under `std_normalized_advantage` (GRPO's epsilon).
pub const STD_EPS: f64 = 1e-4;

fn groups_in_loss(cfg: &GrpoConfig, groups: &[Group]) -> usize {
    groups
        .iter()
        .filter(|g| g.responses.iter().any(|r| in_loss(cfg, r)))
        .count()
}

/// Per-source sums for the statistics.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct SourceSums {
    responses: f64,
    reward: f64,
    r_sim: f64,
    r_ans: f64,
    length: f64,
}

/// Additive sums over responses and tokens: a rank's share of the iteration's loss and
/// statistics. They are summed across ranks (as a flat vector) before becoming [`GrpoStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LossSums {
    /// J (already weighted by 1 / (groups * |group| * L)).
    objective: f64,
    groups: f64,
    responses: f64,
    tokens: f64,
    kl: f64,
    clipped_tokens: f64,
    entropy: f64,
    advantage: f64,
    advantage_sq: f64,
    advantage_abs: f64,
    student: SourceSums,
    teacher: SourceSums,
    d_correct: f64,
    d_total: f64,
    logprob_abs_diff: f64,
    student_tokens: f64,
}

impl LossSums {
    const LEN: usize = 24;

    fn fields(&mut self) -> [&mut f64; Self::LEN] {
        [
            &mut self.objective,
            &mut self.groups,
            &mut self.responses,
            &mut self.tokens,
            &mut self.kl,
            &mut self.clipped_tokens,
            &mut self.entropy,
            &mut self.advantage,
            &mut self.advantage_sq,
            &mut self.advantage_abs,
            &mut self.student.responses,
            &mut self.student.reward,
            &mut self.student.r_sim,
            &mut self.student.r_ans,
            &mut self.student.length,
            &mut self.teacher.responses,
            &mut self.teacher.reward,
            &mut self.teacher.r_sim,
            &mut self.teacher.r_ans,
            &mut self.teacher.length,
            &mut self.d_correct,
            &mut self.d_total,
            &mut self.logprob_abs_diff,
            &mut self.student_tokens,
        ]
    }

    /// The sums as a flat vector, for an all-reduce.
    pub fn to_vec(&self) -> Vec<f64> {
        let mut copy = *self;
        copy.fields().into_iter().map(|f| *f).collect()
    }

    /// The inverse of [`LossSums::to_vec`].
    pub fn from_slice(values: &[f64]) -> Result<Self> {
        if values.len() != Self::LEN {
            return Err(LearnerError::Invalid(format!(
                "loss sums: expected {} values, got {}",
                Self::LEN,
                values.len()
            )));
        }
        let mut sums = Self::default();
        for (f, v) in sums.fields().into_iter().zip(values) {
            *f = *v;
        }
        Ok(sums)
    }

    /// -J.
    pub fn loss(&self) -> f64 {
        -self.objective
    }

    /// The iteration's statistics (optimizer fields left at 0).
    pub fn stats(&self) -> GrpoStats {
        let mean = |sum: f64, n: f64| (n > 0.0).then(|| sum / n);
        let per_response = |sum: f64| mean(sum, self.responses).unwrap_or(0.0);
        let adv_mean = per_response(self.advantage);
        let adv_var = (per_response(self.advantage_sq) - adv_mean * adv_mean).max(0.0);
        GrpoStats {
            loss: self.loss(),
            groups: self.groups as u64,
            responses: self.responses as u64,
            tokens: self.tokens as u64,
            reward_student_mean: mean(self.student.reward, self.student.responses),
            reward_teacher_mean: mean(self.teacher.reward, self.teacher.responses),
            reward_sim_student_mean: mean(self.student.r_sim, self.student.responses),
            reward_sim_teacher_mean: mean(self.teacher.r_sim, self.teacher.responses),
            reward_ans_student_mean: mean(self.student.r_ans, self.student.responses),
            reward_ans_teacher_mean: mean(self.teacher.r_ans, self.teacher.responses),
            response_length_student_mean: mean(self.student.length, self.student.responses),
            response_length_teacher_mean: mean(self.teacher.length, self.teacher.responses),
            advantage_mean: adv_mean,
            advantage_std: adv_var.sqrt(),
            advantage_abs_mean: per_response(self.advantage_abs),
            kl_mean: mean(self.kl, self.tokens).unwrap_or(0.0),
            clip_fraction: mean(self.clipped_tokens, self.tokens).unwrap_or(0.0),
            entropy_mean: mean(self.entropy, self.tokens).unwrap_or(0.0),
            d_accuracy: mean(self.d_correct, self.d_total),
            behaviour_logprob_abs_diff: mean(self.logprob_abs_diff, self.student_tokens),
            grad_norm: 0.0,
            grad_clip_scale: 1.0,
            lr: 0.0,
        }
    }
}

/// What one iteration's update saw and did. The field names are the metric names.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GrpoStats {
    /// -J.
    pub loss: f64,
    /// Groups with at least one response in the loss.
    pub groups: u64,
    /// Responses in the loss.
    pub responses: u64,
    /// Response tokens in the loss.
    pub tokens: u64,
    /// Mean R (under the configured reward switches) of the student / teacher responses.
    pub reward_student_mean: Option<f64>,
    pub reward_teacher_mean: Option<f64>,
    pub reward_sim_student_mean: Option<f64>,
    pub reward_sim_teacher_mean: Option<f64>,
    pub reward_ans_student_mean: Option<f64>,
    pub reward_ans_teacher_mean: Option<f64>,
    pub response_length_student_mean: Option<f64>,
    pub response_length_teacher_mean: Option<f64>,
    /// Over the responses in the loss (the mean is 0 up to rounding by construction).
    pub advantage_mean: f64,
    pub advantage_std: f64,
    pub advantage_abs_mean: f64,
    /// Mean k3 estimate of KL(policy || reference) per token.
    pub kl_mean: f64,
    /// Fraction of tokens whose gradient the clip removed.
    pub clip_fraction: f64,
    /// Mean entropy of the policy's next-token distribution per token.
    pub entropy_mean: f64,
    /// How often the discriminator was right (student d_prob >= 0.5, teacher < 0.5).
    pub d_accuracy: Option<f64>,
    /// Mean |behaviour log-prob - learner log-prob| over student tokens, before the update.
    /// Near 0 for on-policy data; a large value means actors sample with other weights (or at
    /// another temperature) than the learner scores with.
    pub behaviour_logprob_abs_diff: Option<f64>,
    /// Global gradient norm before clipping, and the factor clipping applied.
    pub grad_norm: f64,
    pub grad_clip_scale: f64,
    pub lr: f64,
}

impl GrpoStats {
    /// The statistics as named metrics (undefined ones, e.g. teacher means without teachers,
    /// are left out).
    pub fn metrics(&self) -> BTreeMap<String, f64> {
        let value = serde_json::to_value(self).unwrap_or_default();
        value
            .as_object()
            .map(|o| {
                o.iter()
                    .filter_map(|(k, v)| v.as_f64().map(|x| (k.clone(), x)))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// One response in the loss, with its weight 1 / (groups * |group| * L).
struct Item<'a> {
    group: &'a Group,
    index: usize,
    response: &'a Response,
    advantage: f64,
    weight: f64,
}

fn check_group(group: &Group) -> Result<()> {
    for (i, r) in group.responses.iter().enumerate() {
        if r.source == ResponseSource::Student && r.behaviour_logprobs.len() != r.token_ids.len() {
            return Err(LearnerError::Invalid(format!(
                "group at position {}: responses[{i}]: {} behaviour_logprobs for {} token_ids",
                group.position,
                r.behaviour_logprobs.len(),
                r.token_ids.len()
            )));
        }
    }
    if group.prompt_ids.is_empty() {
        return Err(LearnerError::Invalid(format!(
            "group at position {}: empty prompt",
            group.position
        )));
    }
    Ok(())
}

/// The gradients of this rank's part of `-J` with respect to `params`, and its sums.
/// `n_groups_total` is the number of groups in the loss over all ranks (the mean's divisor).
pub fn loss_gradients(
    policy: &Vlm,
    reference: &Vlm,
    params: &BTreeMap<String, Var>,
    groups: &[Group],
    cfg: &GrpoConfig,
    n_groups_total: usize,
) -> Result<(Gradients, LossSums)> {
    cfg.validate()?;
    let mut sums = LossSums::default();
    let mut items = Vec::new();
    for group in groups {
        check_group(group)?;
        let advs = advantages(cfg, group);
        let n_in_group = advs.iter().flatten().count();
        if n_in_group > 0 {
            sums.groups += 1.0;
        }
        for (index, (r, a)) in group.responses.iter().zip(&advs).enumerate() {
            let side = match r.source {
                ResponseSource::Student => &mut sums.student,
                ResponseSource::Teacher => &mut sums.teacher,
            };
            side.responses += 1.0;
            side.reward += total_reward(cfg, r);
            side.r_sim += r.r_sim as f64;
            side.r_ans += r.r_ans as f64;
            side.length += r.token_ids.len() as f64;
            let d_right = match r.source {
                ResponseSource::Student => r.d_prob >= 0.5,
                ResponseSource::Teacher => r.d_prob < 0.5,
            };
            sums.d_total += 1.0;
            sums.d_correct += d_right as u8 as f64;
            if let Some(a) = *a {
                sums.responses += 1.0;
                sums.advantage += a;
                sums.advantage_sq += a * a;
                sums.advantage_abs += a.abs();
                // An empty response adds nothing to the loss (but its reward counted above).
                if !r.token_ids.is_empty() {
                    items.push(Item {
                        group,
                        index,
                        response: r,
                        advantage: a,
                        weight: 1.0
                            / (n_groups_total.max(1) as f64
                                * n_in_group as f64
                                * cfg.loss_normalizer as f64),
                    });
                }
            }
        }
    }
    let mut grads = Gradients::default();
    for chunk in items.chunks(cfg.micro_batch_size) {
        micro_batch(policy, reference, params, chunk, cfg, &mut grads, &mut sums)?;
    }
    Ok((grads, sums))
}

fn micro_batch(
    policy: &Vlm,
    reference: &Vlm,
    params: &BTreeMap<String, Var>,
    chunk: &[Item<'_>],
    cfg: &GrpoConfig,
    grads: &mut Gradients,
    sums: &mut LossSums,
) -> Result<()> {
    let requests: Vec<ScoreRequest<'_>> = chunk
        .iter()
        .map(|it| ScoreRequest {
            prompt_ids: &it.group.prompt_ids,
            response_ids: &it.response.token_ids,
            pixel_values: it.group.pixel_values.as_ref(),
        })
        .collect();
    let at = |it: &Item<'_>, e: ril_model::ModelError| {
        LearnerError::Invalid(format!(
            "group at position {} (scoring responses[{}] among a micro-batch of {}): {e}",
            it.group.position,
            it.index,
            chunk.len()
        ))
    };
    let reference_scores = score_tokens(reference, &requests, cfg.logprob_temperature)
        .map_err(|e| at(&chunk[0], e))?;
    let ref_logp = reference_scores.logprobs.detach();
    let scores =
        score_tokens(policy, &requests, cfg.logprob_temperature).map_err(|e| at(&chunk[0], e))?;
    let logp = &scores.logprobs;
    let mask = &scores.mask;
    let (b, r_max) = logp.dims2()?;
    let device = logp.device().clone();
    let MicroBatchInputs {
        behaviour,
        teacher_rows,
        advantages,
    } = MicroBatchInputs::new(chunk, r_max, &device)?;
    // Teacher rows: old = the policy's own log-prob, detached (ratio exactly 1).
    let old = (behaviour + logp.detach().broadcast_mul(&teacher_rows)?)?;
    let log_ratio = ((logp - &old)? * mask)?.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)?;
    let ratio = log_ratio.exp()?;
    let unclipped = ratio.broadcast_mul(&advantages)?;
    let clipped = ratio
        .detach()
        .clamp(1.0 - cfg.clip_eps, 1.0 + cfg.clip_eps)?
        .broadcast_mul(&advantages)?;
    // min(r A, clip(r) A): the unclipped term (gradient r A d logp) where it is the smaller,
    // the constant clipped term (no gradient) where clipping made it smaller.
    let take_unclipped = unclipped.detach().le(&clipped)?.to_dtype(DType::F32)?;
    let objective =
        ((&unclipped * &take_unclipped)? + (&clipped * take_unclipped.affine(-1.0, 1.0)?)?)?;
    let ref_minus_logp = ((&ref_logp - logp)? * mask)?.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)?;
    let k3 = ((ref_minus_logp.exp()? - &ref_minus_logp)? - 1.0)?;
    let per_token = ((objective - (&k3 * cfg.kl_beta)?)? * mask)?;
    let per_response = per_token.sum(D::Minus1)?;
    let weights: Vec<f32> = chunk.iter().map(|it| it.weight as f32).collect();
    let weights = Tensor::from_vec(weights, b, &device)?;
    let j = (&per_response * &weights)?.sum_all()?;
    grads.accumulate(&Gradients::backward(&j.neg()?, params)?, 1.0)?;

    let per_response: Vec<f32> = per_response.to_vec1()?;
    for (it, v) in chunk.iter().zip(&per_response) {
        sums.objective += *v as f64 * it.weight;
    }
    add_token_statistics(chunk, logp, &k3, &take_unclipped, &scores.entropy, sums)
}

/// The per-row tensors of a micro-batch besides the scores: behaviour log-probs (zero-padded;
/// zeros for teacher rows), which rows are teachers', and the advantages.
struct MicroBatchInputs {
    behaviour: Tensor,
    teacher_rows: Tensor,
    advantages: Tensor,
}

impl MicroBatchInputs {
    fn new(chunk: &[Item<'_>], r_max: usize, device: &candle_core::Device) -> Result<Self> {
        let b = chunk.len();
        let mut behaviour = vec![0f32; b * r_max];
        let mut teacher_rows = vec![0f32; b];
        let mut advantages = vec![0f32; b];
        for (i, it) in chunk.iter().enumerate() {
            match it.response.source {
                ResponseSource::Student => {
                    let n = it.response.behaviour_logprobs.len();
                    behaviour[i * r_max..i * r_max + n]
                        .copy_from_slice(&it.response.behaviour_logprobs);
                }
                ResponseSource::Teacher => teacher_rows[i] = 1.0,
            }
            advantages[i] = it.advantage as f32;
        }
        Ok(Self {
            behaviour: Tensor::from_vec(behaviour, (b, r_max), device)?,
            teacher_rows: Tensor::from_vec(teacher_rows, (b, 1), device)?,
            advantages: Tensor::from_vec(advantages, (b, 1), device)?,
        })
    }
}

/// Token statistics (KL, clipped tokens, entropy, behaviour vs learner log-probs), from the
/// detached values of a micro-batch.
fn add_token_statistics(
    chunk: &[Item<'_>],
    logp: &Tensor,
    k3: &Tensor,
    take_unclipped: &Tensor,
    entropy: &Tensor,
    sums: &mut LossSums,
) -> Result<()> {
    // One device -> host transfer for the four (on a GPU, each is a synchronisation).
    let stacked = Tensor::stack(&[&logp.detach(), k3, take_unclipped, entropy], 0)?;
    let [logp_v, k3_v, clipped_v, entropy_v]: [Vec<Vec<f32>>; 4] = stacked
        .to_vec3::<f32>()?
        .try_into()
        .expect("four tensors were stacked");
    for (i, it) in chunk.iter().enumerate() {
        let n = it.response.token_ids.len();
        sums.tokens += n as f64;
        for t in 0..n {
            sums.kl += k3_v[i][t] as f64;
            sums.clipped_tokens += (clipped_v[i][t] == 0.0) as u8 as f64;
            sums.entropy += entropy_v[i][t] as f64;
        }
        if it.response.source == ResponseSource::Student {
            sums.student_tokens += n as f64;
            for t in 0..n {
                sums.logprob_abs_diff +=
                    (it.response.behaviour_logprobs[t] as f64 - logp_v[i][t] as f64).abs();
            }
        }
    }
    Ok(())
}

/// Sums `grads` across ranks when ranks' shards touched different parameters (or, for an empty
/// shard, none): every rank all-reduces one entry per trainable parameter (zeros where its shard
/// gave no gradient), and afterwards a parameter no rank had a gradient for is absent again, as
/// it would be on a single rank holding every group (AdamW skips it).
fn align_gradients(
    grads: &mut Gradients,
    params: &BTreeMap<String, Var>,
    collective: &dyn Collective,
) -> Result<()> {
    let mut present: Vec<f64> = params
        .keys()
        .map(|name| f64::from(u8::from(grads.grads.contains_key(name))))
        .collect();
    collective.all_reduce_sum_scalars(&mut present)?;
    for (name, var) in params {
        if !grads.grads.contains_key(name) {
            let zeros = Tensor::zeros(var.shape(), DType::F32, var.device())?;
            grads.grads.insert(name.clone(), zeros);
        }
    }
    collective.all_reduce_sum(grads)?;
    for (name, n) in params.keys().zip(present) {
        if n == 0.0 {
            grads.grads.remove(name);
        }
    }
    Ok(())
}

/// One RIL policy update on this rank's `groups`: gradients of `-J`, summed across ranks, then
/// one AdamW step at `cfg.lr`. A non-finite loss or gradient is an error and nothing changes
/// (weights, optimizer moments and step count stay as they were).
pub fn train_step(
    policy: &Vlm,
    reference: &Vlm,
    optimizer: &mut AdamW,
    groups: &[Group],
    cfg: &GrpoConfig,
    collective: &dyn Collective,
) -> Result<GrpoStats> {
    cfg.validate()?;
    let mut n_groups = [groups_in_loss(cfg, groups) as f64];
    collective.all_reduce_sum_scalars(&mut n_groups)?;
    let n_groups_total = n_groups[0].round() as usize;
    if n_groups_total == 0 {
        return Err(LearnerError::Invalid(
            "grpo: no group has a response to train on".into(),
        ));
    }
    let (mut grads, sums) = loss_gradients(
        policy,
        reference,
        optimizer.params(),
        groups,
        cfg,
        n_groups_total,
    )?;
    if collective.world_size() > 1 {
        align_gradients(&mut grads, optimizer.params(), collective)?;
    } else {
        collective.all_reduce_sum(&mut grads)?;
    }
    let mut flat = sums.to_vec();
    collective.all_reduce_sum_scalars(&mut flat)?;
    let sums = LossSums::from_slice(&flat)?;
    let loss = sums.loss();
    if !loss.is_finite() {
        return Err(LearnerError::NonFinite {
            what: "loss",
            detail: format!(
                "the Dr.GRPO loss over {} groups is {loss}; the update was skipped and the \
                 weights are unchanged (check the groups' rewards and log-probs)",
                n_groups_total
            ),
        });
    }
    let step = optimizer.step(&grads, cfg.lr)?;
    let mut stats = sums.stats();
    stats.grad_norm = step.grad_norm;
    stats.grad_clip_scale = step.clip_scale;
    stats.lr = cfg.lr;
    Ok(stats)
}
