//! The Dr.GRPO loss pinned down: advantages and the clipped objective against plain f64
//! arithmetic from the same log-probs, accumulation equals one big batch, every trainable tensor
//! is reached, ratio 1 without KL is REINFORCE, and a NaN loss changes nothing.

mod common;

use std::collections::BTreeMap;

use candle_core::Tensor;
use common::*;
use ril_learner::LearnerError;
use ril_learner::collective::SingleRank;
use ril_learner::grpo::{
    Group, GrpoConfig, Response, ResponseSource, advantages, loss_gradients, train_step,
};
use ril_model::Vlm;
use ril_model::optim::{AdamW, Gradients};
use ril_model::score::{ScoreRequest, score_tokens};

fn response(source: ResponseSource, r_sim: f32, r_ans: f32) -> Response {
    Response {
        source,
        token_ids: vec![1],
        behaviour_logprobs: if source == ResponseSource::Student {
            vec![-1.0]
        } else {
            Vec::new()
        },
        policy_version: 0,
        d_prob: 0.5,
        r_sim,
        r_ans,
        text: String::new(),
    }
}

#[test]
fn advantages_are_centred_on_the_group_mean_without_std_division() {
    use ResponseSource::{Student, Teacher};
    let group = Group {
        position: 0,
        prompt_ids: vec![1],
        pixel_values: None,
        responses: vec![
            response(Student, 1.0, 1.0),
            response(Student, 0.0, 0.0),
            response(Teacher, 1.0, 0.0),
            response(Teacher, 1.0, 1.0),
        ],
    };
    let cfg = GrpoConfig::default();
    // R = [2, 0, 1, 2], mean 1.25.
    assert_eq!(
        advantages(&cfg, &group),
        vec![Some(0.75), Some(-1.25), Some(-0.25), Some(0.75)]
    );
    // Answer reward only: R = [1, 0, 0, 1], mean 0.5.
    let ans_only = GrpoConfig {
        use_sim_reward: false,
        ..cfg.clone()
    };
    assert_eq!(
        advantages(&ans_only, &group),
        vec![Some(0.5), Some(-0.5), Some(-0.5), Some(0.5)]
    );
    // GRPO's std-normalised advantage: R = [2, 0, 1, 2], std = sqrt(0.6875).
    let grpo = GrpoConfig {
        std_normalized_advantage: true,
        ..cfg.clone()
    };
    let std = 0.6875_f64.sqrt() + ril_learner::grpo::STD_EPS;
    for (got, want) in advantages(&grpo, &group)
        .into_iter()
        .zip([0.75, -1.25, -0.25, 0.75])
    {
        assert!((got.unwrap() - want / std).abs() < 1e-12, "{got:?}");
    }
    // Plain Dr.GRPO: the teachers leave the group, students are centred among themselves.
    let no_teachers = GrpoConfig {
        teachers_in_group: false,
        ..cfg
    };
    assert_eq!(
        advantages(&no_teachers, &group),
        vec![Some(1.0), Some(-1.0), None, None]
    );
}

struct Setup {
    _tmp: tempfile::TempDir,
    policy: ril_model::bundle::Bundle,
    reference: Vlm,
    groups: Vec<Group>,
}

/// Two groups of different sizes (2 students + 2 teachers, 1 student + 2 teachers) sampled at
/// `temperature` from the policy; the reference is another random model, so the KL is not 0.
fn setup(temperature: f64) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let policy = load(&tiny_model(tmp.path(), "policy", 1));
    let reference = load(&tiny_model(tmp.path(), "reference", 2)).model;
    let rows = [colour_row(0), colour_row(1)];
    let g0 = responses(
        &policy,
        &rows[0],
        0,
        2,
        &["red", "it is red"],
        temperature,
        0,
    );
    let g1 = responses(
        &policy,
        &rows[1],
        1,
        1,
        &["green", "a green square"],
        temperature,
        0,
    );
    let groups = vec![
        group(&policy, &rows[0], 0, g0),
        group(&policy, &rows[1], 1, g1),
    ];
    Setup {
        _tmp: tmp,
        policy,
        reference,
        groups,
    }
}

/// Log-probs of one response under `model`, scored alone.
fn scored(model: &Vlm, g: &Group, r: &Response, temperature: f64) -> Vec<f64> {
    let s = score_tokens(
        model,
        &[ScoreRequest {
            prompt_ids: &g.prompt_ids,
            response_ids: &r.token_ids,
            pixel_values: g.pixel_values.as_ref(),
        }],
        temperature,
    )
    .unwrap();
    s.logprobs_vec().unwrap()[0]
        .iter()
        .map(|&x| x as f64)
        .collect()
}

#[test]
fn the_loss_matches_plain_arithmetic_on_small_groups() {
    let temperature = 0.7;
    let mut s = setup(temperature);
    // Move the behaviour log-probs off the policy's so ratios land on both sides of the clip.
    let offsets = [0.5, -0.5, 0.05, -0.02, 0.3, -0.3];
    for g in &mut s.groups {
        for r in &mut g.responses {
            for (t, lp) in r.behaviour_logprobs.iter_mut().enumerate() {
                *lp += offsets[t % offsets.len()];
            }
        }
    }
    let cfg = GrpoConfig {
        kl_beta: 0.1,
        loss_normalizer: 16,
        micro_batch_size: 3,
        logprob_temperature: temperature,
        ..GrpoConfig::default()
    };
    let params = s.policy.model.trainable_vars();
    let (_, sums) = loss_gradients(
        &s.policy.model,
        &s.reference,
        &params,
        &s.groups,
        &cfg,
        s.groups.len(),
    )
    .unwrap();
    let stats = sums.stats();

    // The same objective in f64, written out from RIL.md.
    let (eps, beta, l) = (0.2, 0.1, 16.0);
    let mut j = 0.0;
    let (mut kl, mut clipped, mut tokens) = (0.0, 0.0, 0.0);
    for g in &s.groups {
        let rewards: Vec<f64> = g
            .responses
            .iter()
            .map(|r| r.r_sim as f64 + r.r_ans as f64)
            .collect();
        let mean = rewards.iter().sum::<f64>() / rewards.len() as f64;
        let mut group_sum = 0.0;
        for (r, reward) in g.responses.iter().zip(&rewards) {
            let a = reward - mean;
            let lp = scored(&s.policy.model, g, r, temperature);
            let rf = scored(&s.reference, g, r, temperature);
            let mut sum = 0.0;
            for t in 0..lp.len() {
                let old = match r.source {
                    ResponseSource::Student => r.behaviour_logprobs[t] as f64,
                    ResponseSource::Teacher => lp[t],
                };
                let ratio = (lp[t] - old).exp();
                let unclipped = ratio * a;
                let clip = ratio.clamp(1.0 - eps, 1.0 + eps) * a;
                if clip < unclipped {
                    clipped += 1.0;
                }
                let k3 = (rf[t] - lp[t]).exp() - (rf[t] - lp[t]) - 1.0;
                kl += k3;
                tokens += 1.0;
                sum += unclipped.min(clip) - beta * k3;
            }
            group_sum += sum / l;
        }
        j += group_sum / g.responses.len() as f64;
    }
    j /= s.groups.len() as f64;
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-4 * b.abs().max(1e-2);
    assert!(close(stats.loss, -j), "loss {} vs {}", stats.loss, -j);
    assert!(
        close(stats.kl_mean, kl / tokens),
        "kl {} vs {}",
        stats.kl_mean,
        kl / tokens
    );
    assert_eq!(stats.tokens as f64, tokens);
    assert!(
        (stats.clip_fraction - clipped / tokens).abs() < 1e-9,
        "clip fraction {} vs {}",
        stats.clip_fraction,
        clipped / tokens
    );
    assert!(
        stats.clip_fraction > 0.0 && stats.clip_fraction < 1.0,
        "the case must exercise both branches of the clip: {}",
        stats.clip_fraction
    );
    assert!(
        stats.kl_mean > 1e-3,
        "the reference differs: {}",
        stats.kl_mean
    );
    // The statistics that do not depend on the model.
    assert_eq!(stats.groups, 2);
    assert_eq!(stats.responses, 7);
    assert!(stats.advantage_mean.abs() < 1e-12);
    let student_tokens: usize = s
        .groups
        .iter()
        .flat_map(|g| &g.responses)
        .filter(|r| r.source == ResponseSource::Student)
        .map(|r| r.token_ids.len())
        .sum();
    assert!(student_tokens > 0);
    // |behaviour - learner| is the offsets' mean magnitude.
    let diff = stats.behaviour_logprob_abs_diff.unwrap();
    assert!(diff > 0.01 && diff < 0.5, "{diff}");
}

fn assert_same_gradients(a: &Gradients, b: &Gradients) {
    assert_eq!(
        a.grads.keys().collect::<Vec<_>>(),
        b.grads.keys().collect::<Vec<_>>()
    );
    for (name, ga) in &a.grads {
        let gb = &b.grads[name];
        let scale = gb
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let diff = (ga - gb)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            diff <= 1e-4 * scale + 1e-9,
            "`{name}`: max |diff| {diff}, max |grad| {scale}"
        );
    }
}

#[test]
fn gradient_accumulation_over_micro_batches_equals_one_big_batch() {
    let s = setup(1.0);
    let params = s.policy.model.trainable_vars();
    let run = |micro_batch_size| {
        let cfg = GrpoConfig {
            micro_batch_size,
            loss_normalizer: 16,
            ..GrpoConfig::default()
        };
        loss_gradients(&s.policy.model, &s.reference, &params, &s.groups, &cfg, 2).unwrap()
    };
    let (one, sums_one) = run(1);
    let (big, sums_big) = run(64);
    assert_same_gradients(&one, &big);
    assert!((sums_one.loss() - sums_big.loss()).abs() < 1e-6);
}

#[test]
fn every_trainable_tensor_gets_a_gradient() {
    let s = setup(1.0);
    let params = s.policy.model.trainable_vars();
    let cfg = GrpoConfig {
        loss_normalizer: 16,
        ..GrpoConfig::default()
    };
    let (grads, _) =
        loss_gradients(&s.policy.model, &s.reference, &params, &s.groups, &cfg, 2).unwrap();
    for name in params.keys() {
        let g = grads
            .grads
            .get(name)
            .unwrap_or_else(|| panic!("`{name}` got no gradient"));
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(norm.is_finite() && norm > 0.0, "`{name}`: |g|^2 = {norm}");
    }
}

#[test]
fn at_ratio_one_without_kl_the_gradient_is_reinforce() {
    let mut s = setup(1.0);
    // Behaviour log-probs = the policy's own: every ratio is 1.
    for g in &mut s.groups {
        let position = g.position;
        let snapshot = g.clone();
        for r in g.responses.iter_mut() {
            if r.source == ResponseSource::Student {
                r.behaviour_logprobs = scored(&s.policy.model, &snapshot, r, 1.0)
                    .into_iter()
                    .map(|x| x as f32)
                    .collect();
            }
        }
        assert_eq!(g.position, position);
    }
    let cfg = GrpoConfig {
        kl_beta: 0.0,
        loss_normalizer: 16,
        ..GrpoConfig::default()
    };
    let params = s.policy.model.trainable_vars();
    let (grpo, sums) =
        loss_gradients(&s.policy.model, &s.reference, &params, &s.groups, &cfg, 2).unwrap();
    assert_eq!(sums.stats().clip_fraction, 0.0);

    // REINFORCE: -(1/groups) sum_g 1/|g| sum_i A_i / L sum_t log pi(o_t).
    let mut requests = Vec::new();
    let mut coefficients = Vec::new();
    for g in &s.groups {
        let advs = advantages(&cfg, g);
        for (r, a) in g.responses.iter().zip(advs) {
            requests.push(ScoreRequest {
                prompt_ids: &g.prompt_ids,
                response_ids: &r.token_ids,
                pixel_values: g.pixel_values.as_ref(),
            });
            coefficients.push((a.unwrap() / (2.0 * g.responses.len() as f64 * 16.0)) as f32);
        }
    }
    let scores = score_tokens(&s.policy.model, &requests, 1.0).unwrap();
    let n = coefficients.len();
    let c = Tensor::from_vec(coefficients, (n, 1), &candle_core::Device::Cpu).unwrap();
    let loss = scores
        .logprobs
        .broadcast_mul(&c)
        .unwrap()
        .sum_all()
        .unwrap()
        .neg()
        .unwrap();
    let reinforce = Gradients::backward(&loss, &params).unwrap();
    assert_same_gradients(&grpo, &reinforce);
}

#[test]
fn a_nan_loss_is_an_error_and_the_weights_are_untouched() {
    let mut s = setup(1.0);
    s.groups[1].responses[0].r_ans = f32::NAN;
    let cfg = GrpoConfig {
        lr: 1e-2,
        loss_normalizer: 16,
        ..GrpoConfig::default()
    };
    let mut optimizer = AdamW::new(s.policy.model.trainable_vars(), cfg.adamw()).unwrap();
    let before = weights(&s.policy.model);
    let err = train_step(
        &s.policy.model,
        &s.reference,
        &mut optimizer,
        &s.groups,
        &cfg,
        &SingleRank,
    )
    .unwrap_err();
    assert!(
        matches!(err, LearnerError::NonFinite { what: "loss", .. }),
        "{err}"
    );
    assert!(err.to_string().contains("unchanged"), "{err}");
    assert_eq!(weights(&s.policy.model), before);
    assert_eq!(optimizer.step_count(), 0);

    // The same groups with a finite reward do train.
    s.groups[1].responses[0].r_ans = 1.0;
    let stats = train_step(
        &s.policy.model,
        &s.reference,
        &mut optimizer,
        &s.groups,
        &cfg,
        &SingleRank,
    )
    .unwrap();
    assert!(stats.loss.is_finite() && stats.grad_norm > 0.0);
    assert_ne!(weights(&s.policy.model), before);
    let metrics: BTreeMap<String, f64> = stats.metrics();
    for key in [
        "loss",
        "kl_mean",
        "clip_fraction",
        "reward_teacher_mean",
        "d_accuracy",
    ] {
        assert!(metrics.contains_key(key), "{key} missing from {metrics:?}");
    }
}

/// Runs `f(rank, ring)` on `world` ring ranks, each its own thread with its own loopback
/// sockets, and returns the results by rank.
fn on_ring_ranks<T: Send>(
    world: usize,
    f: impl Fn(usize, &ril_learner::ring::TcpRing) -> T + Sync,
) -> Vec<T> {
    use ril_learner::ring::TcpRing;
    let listeners: Vec<std::net::TcpListener> = (0..world)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addrs: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().unwrap().to_string())
        .collect();
    std::thread::scope(|sc| {
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, l)| {
                let (addrs, f) = (addrs.clone(), &f);
                sc.spawn(move || {
                    let auth = ril_learner::ring::RingAuth::new(Some([3; 32]));
                    let timeout = std::time::Duration::from_secs(30);
                    let ring = TcpRing::connect(rank, l, &addrs, timeout, 1000, &auth).unwrap();
                    f(rank, &ring)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Data parallelism: R learner ranks, each with one group, joined by the CPU ring collective,
/// end three steps with the weights one rank gets from all R groups. The sums differ only in
/// float order (per-rank partial sums, then the ring's chunked additions), so the weights agree
/// to ~1e-6 of the step size; Adam's eps is raised from 1e-8 to 1e-6 so that gradients which are
/// pure rounding noise (exactly zero in exact arithmetic) do not take full-size steps.
fn ring_ranks_equal_one_rank(world: usize) {
    let mut s = setup(1.0);
    // A third group (3 students + 2 teachers) when three ranks need one each.
    while s.groups.len() < world {
        let i = s.groups.len();
        let row = colour_row(i);
        let g = responses(
            &s.policy,
            &row,
            i as u64,
            3,
            &["blue", "the blue one"],
            1.0,
            0,
        );
        s.groups.push(group(&s.policy, &row, i as u64, g));
    }
    let dir = s._tmp.path().join("policy");
    let cfg = GrpoConfig {
        lr: 1e-3,
        adam_eps: 1e-6,
        loss_normalizer: 16,
        micro_batch_size: 4,
        ..GrpoConfig::default()
    };
    let steps = 3;
    let single = load(&dir);
    let mut opt = AdamW::new(single.model.trainable_vars(), cfg.adamw()).unwrap();
    for _ in 0..steps {
        train_step(
            &single.model,
            &s.reference,
            &mut opt,
            &s.groups,
            &cfg,
            &SingleRank,
        )
        .unwrap();
    }

    let results: Vec<Vec<(String, Vec<f32>)>> = on_ring_ranks(world, |rank, ring| {
        let policy = load(&dir);
        let mut opt = AdamW::new(policy.model.trainable_vars(), cfg.adamw()).unwrap();
        let shard = &s.groups[rank..rank + 1];
        for _ in 0..steps {
            train_step(&policy.model, &s.reference, &mut opt, shard, &cfg, ring).unwrap();
        }
        weights(&policy.model)
    });
    let one = weights(&single.model);
    let initial = weights(&load(&dir).model);
    let mut moved = 0f32;
    for (rank, ranked) in results.iter().enumerate() {
        for (((name, a), (_, b)), (_, w0)) in one.iter().zip(ranked).zip(&initial) {
            for ((x, y), z) in a.iter().zip(b).zip(w0) {
                assert!(
                    (x - y).abs() <= 1e-6,
                    "`{name}`: one rank {x}, rank {rank} of {world} {y} (initial {z})"
                );
                moved = moved.max((x - z).abs());
            }
        }
    }
    // The test would be empty if nothing moved: three steps of lr 1e-3 move weights ~1e-3.
    assert!(moved > 1e-4, "the weights did not move ({moved})");
}

#[test]
fn two_ring_ranks_equal_one_rank_after_several_steps() {
    ring_ranks_equal_one_rank(2);
}

#[test]
fn three_ring_ranks_equal_one_rank_after_several_steps() {
    ring_ranks_equal_one_rank(3);
}

/// SHA-256 of a model's weights (names and values in name order), as the ranks compare them.
fn weights_digest(model: &Vlm) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for (name, values) in weights(model) {
        h.update(name.as_bytes());
        for v in values {
            h.update(v.to_le_bytes());
        }
    }
    h.finalize().into()
}

/// A rank whose shard is empty still takes part (zero gradients for every parameter, so the
/// ring's layouts match) and both ranks end with the weights one rank gets from all groups.
/// Then the replica check: it passes while the ranks agree, and after a divergence injected on
/// rank 1 it fails on every rank, naming rank 1.
#[test]
fn an_empty_shard_takes_part_and_the_replica_check_catches_divergence() {
    use ril_learner::collective::verify_identical_weights;
    let s = setup(1.0);
    let dir = s._tmp.path().join("policy");
    let cfg = GrpoConfig {
        lr: 1e-3,
        adam_eps: 1e-6,
        loss_normalizer: 16,
        micro_batch_size: 4,
        ..GrpoConfig::default()
    };
    let single = load(&dir);
    let mut opt = AdamW::new(single.model.trainable_vars(), cfg.adamw()).unwrap();
    train_step(
        &single.model,
        &s.reference,
        &mut opt,
        &s.groups,
        &cfg,
        &SingleRank,
    )
    .unwrap();

    type RankResult = (
        Vec<(String, Vec<f32>)>,
        Result<(), String>,
        Result<(), String>,
    );
    let results: Vec<RankResult> = on_ring_ranks(2, |rank, ring| {
        let policy = load(&dir);
        let mut opt = AdamW::new(policy.model.trainable_vars(), cfg.adamw()).unwrap();
        let shard: &[Group] = if rank == 0 { &s.groups } else { &[] };
        train_step(&policy.model, &s.reference, &mut opt, shard, &cfg, ring).unwrap();
        let trained = weights(&policy.model);
        let agreed = verify_identical_weights(ring, &weights_digest(&policy.model))
            .map_err(|e| e.to_string());
        if rank == 1 {
            let (_, var) = policy.model.named_vars().into_iter().next().unwrap();
            let nudged = (var.as_tensor() + 1e-3).unwrap();
            var.set(&nudged).unwrap();
        }
        let diverged = verify_identical_weights(ring, &weights_digest(&policy.model))
            .map_err(|e| e.to_string());
        (trained, agreed, diverged)
    });
    let one = weights(&single.model);
    for (rank, (trained, agreed, diverged)) in results.iter().enumerate() {
        for ((name, a), (_, b)) in one.iter().zip(trained) {
            for (x, y) in a.iter().zip(b) {
                assert!(
                    (x - y).abs() <= 1e-6,
                    "rank {rank} `{name}`: one rank {x}, two ranks {y}"
                );
            }
        }
        assert_eq!(agreed, &Ok(()), "rank {rank}");
        let e = diverged.as_ref().unwrap_err();
        assert!(
            e.contains("diverged") && e.contains("rank 1 holds"),
            "rank {rank}: {e}"
        );
    }
}
