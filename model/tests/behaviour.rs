//! The model's maths, pinned on tiny random models built here (nothing is downloaded):
//! gradients reach every trainable tensor, the KV cache reproduces full recomputation, sampled
//! log-probs equal scored ones, a tiny model overfits and then answers, checkpoints and optimizer
//! state round-trip, gradient accumulation equals one batch, a resumed run equals an
//! uninterrupted one.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use ril_model::generate::{
    DecodeMode, FinishReason, GenerateOptions, Generation, Prompt, SamplingParams, SequenceSpec,
    generate_sequences, generate_with, sequence_rng,
};
use ril_model::optim::{AdamW, AdamWConfig, Gradients};
use ril_model::score::{ScoreRequest, scalar_scores, score_tokens};
use ril_model::tokenizer::byte_level_chatml;
use ril_model::toy::{Example, colour_examples, sft_loss};
use ril_model::{ChatTokenizer, Head, LlavaConfig, Vlm};

fn setup(seed: u64) -> (ChatTokenizer, LlavaConfig, Vlm) {
    let tok = byte_level_chatml().unwrap();
    let image_id = tok.token_id("<image>").unwrap();
    let mut cfg = LlavaConfig::for_tests(tok.vocab_size(), image_id);
    // Select the second-to-last layer so the frozen-tensor path is exercised too.
    cfg.vision_config.num_hidden_layers = 3;
    cfg.vision_feature_layer = ril_model::config::FeatureLayer::One(-2);
    let model = Vlm::new_random(&cfg, Head::LanguageModel, &Device::Cpu, DType::F32, seed).unwrap();
    (tok, cfg, model)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn assert_every_trainable_tensor_has_a_gradient(model: &Vlm, loss: &Tensor) {
    let params = model.trainable_vars();
    let grads = Gradients::backward(loss, &params).unwrap();
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
            .unwrap()
            .sqrt();
        assert!(
            norm.is_finite() && norm > 0.0,
            "`{name}` has gradient norm {norm}"
        );
    }
    // The frozen tensors (vision layers past the feature layer, post_layernorm) exist, are
    // saved, and are not trained.
    let frozen: Vec<String> = model
        .named_vars()
        .into_keys()
        .filter(|n| !model.is_trainable(n))
        .collect();
    assert!(
        frozen.iter().any(|n| n.contains("post_layernorm")),
        "{frozen:?}"
    );
    assert!(
        frozen.iter().any(|n| n.contains("encoder.layers.2.")),
        "{frozen:?}"
    );
}

#[test]
fn every_trainable_tensor_gets_a_gradient_from_the_lm_loss() {
    let (tok, cfg, model) = setup(1);
    let examples = colour_examples(&tok, &cfg, &Device::Cpu).unwrap();
    let loss = sft_loss(&model, &examples).unwrap();
    assert_every_trainable_tensor_has_a_gradient(&model, &loss);
}

#[test]
fn every_trainable_tensor_gets_a_gradient_from_the_scalar_head() {
    let (tok, cfg, _) = setup(1);
    let model = Vlm::new_random(&cfg, Head::Scalar, &Device::Cpu, DType::F32, 2).unwrap();
    let examples = colour_examples(&tok, &cfg, &Device::Cpu).unwrap();
    let requests: Vec<ScoreRequest<'_>> = examples.iter().map(Example::score_request).collect();
    let logits = scalar_scores(&model, &requests).unwrap();
    assert_eq!(logits.dims(), &[4]);
    // Binary cross-entropy against labels 1, 0, 1, 0 (student / teacher).
    let labels = Tensor::new(&[1f32, 0., 1., 0.], &Device::Cpu).unwrap();
    let p = candle_nn::ops::sigmoid(&logits).unwrap();
    let loss = ((&labels * p.log().unwrap()).unwrap()
        + ((1.0 - &labels).unwrap() * (1.0 - &p).unwrap().log().unwrap()).unwrap())
    .unwrap()
    .mean_all()
    .unwrap()
    .neg()
    .unwrap();
    assert_every_trainable_tensor_has_a_gradient(&model, &loss);
}

fn prompts(tok: &ChatTokenizer, cfg: &LlavaConfig) -> Vec<Prompt> {
    let ex = colour_examples(tok, cfg, &Device::Cpu).unwrap();
    // Different lengths (left padding is exercised), with and without images.
    let text_only = tok
        .apply_chat_template(
            &[ril_model::ChatMessage::text(
                "user",
                "Say something long, please.",
            )],
            true,
        )
        .unwrap();
    vec![
        Prompt {
            token_ids: ex[0].prompt_ids.clone(),
            pixel_values: Some(ex[0].pixel_values.clone()),
        },
        Prompt {
            token_ids: text_only,
            pixel_values: None,
        },
        Prompt {
            token_ids: ex[2].prompt_ids[3..].to_vec(),
            pixel_values: Some(ex[2].pixel_values.clone()),
        },
    ]
}

/// KV-cache logits equal full recomputation within 1e-4 (f32; the two paths sum attention in
/// different shapes, so they agree to rounding, not bit for bit).
#[test]
fn kv_cache_decoding_equals_full_recomputation() {
    let (tok, cfg, model) = setup(3);
    // Larger weights than the 0.02 default make logits depend strongly on positions and cached
    // keys, so a cache bug cannot hide in near-uniform logits.
    model
        .init_weights(3, ril_model::vlm::Init::Normal(0.2))
        .unwrap();
    let prompts = prompts(&tok, &cfg);
    for params in [SamplingParams::greedy(12), SamplingParams::paper(12, 7)] {
        let run = |mode| {
            generate_with(
                &model,
                &prompts,
                &params,
                GenerateOptions {
                    mode,
                    record_logits: true,
                    ..Default::default()
                },
            )
            .unwrap()
        };
        let cached = run(DecodeMode::KvCache);
        let full = run(DecodeMode::Recompute);
        assert_same_generations(&cached, &full, "KV cache against recomputation");
    }
}

/// The same tokens, and every step's logits within 1e-4.
fn assert_same_generations(a: &[Generation], b: &[Generation], what: &str) {
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.token_ids, y.token_ids, "{what}");
        let steps = x.step_logits.as_ref().unwrap();
        for (lx, ly) in steps.iter().zip(y.step_logits.as_ref().unwrap()) {
            let d = lx
                .iter()
                .zip(ly)
                .map(|(p, q)| (p - q).abs())
                .fold(0f32, f32::max);
            assert!(d <= 1e-4, "{what}: logit difference {d}");
        }
    }
}

/// Prompts prefilled in chunks of rows (their KV caches joined) decode as the whole batch
/// prefilled at once: the same tokens, logits within 1e-4.
#[test]
fn a_prefill_in_chunks_of_rows_equals_one_over_the_whole_batch() {
    let (tok, cfg, model) = setup(5);
    model
        .init_weights(5, ril_model::vlm::Init::Normal(0.2))
        .unwrap();
    let mut prompts = prompts(&tok, &cfg);
    prompts.extend(prompts.clone());
    for params in [SamplingParams::greedy(10), SamplingParams::paper(10, 3)] {
        let run = |prefill_chunk_tokens| {
            generate_with(
                &model,
                &prompts,
                &params,
                GenerateOptions {
                    record_logits: true,
                    prefill_chunk_tokens,
                    ..Default::default()
                },
            )
            .unwrap()
        };
        let whole = run(0);
        // One row per chunk, then two rows per chunk (a last chunk of one row among them).
        let width = prompts.iter().map(|p| p.token_ids.len()).max().unwrap();
        for budget in [1, 2 * width + 1, 4 * width] {
            let chunked = run(budget);
            assert_same_generations(&chunked, &whole, &format!("prefill budget {budget}"));
        }
    }
}

#[test]
fn sampled_logprobs_equal_scored_logprobs() {
    let (tok, cfg, model) = setup(4);
    model
        .init_weights(4, ril_model::vlm::Init::Normal(0.2))
        .unwrap();
    let prompts = prompts(&tok, &cfg);
    for temperature in [1.0, 0.7] {
        let mut params = SamplingParams::paper(10, 11);
        params.temperature = temperature;
        params.stop_token_ids = vec![tok.eos_id().unwrap()];
        let gens = ril_model::generate(&model, &prompts, &params).unwrap();
        let requests: Vec<ScoreRequest<'_>> = prompts
            .iter()
            .zip(&gens)
            .map(|(p, g)| ScoreRequest {
                prompt_ids: &p.token_ids,
                response_ids: &g.token_ids,
                pixel_values: p.pixel_values.as_ref(),
            })
            .collect();
        let scored = score_tokens(&model, &requests, temperature)
            .unwrap()
            .logprobs_vec()
            .unwrap();
        for (g, s) in gens.iter().zip(&scored) {
            assert_eq!(g.logprobs.len(), s.len());
            for (a, b) in g.logprobs.iter().zip(s) {
                assert!(
                    (a - b).abs() <= 1e-4,
                    "sampled {a} vs scored {b} at T={temperature}"
                );
            }
        }
    }
}

#[test]
fn sampling_is_seeded_per_sequence_and_honours_stop_and_length() {
    let (tok, cfg, model) = setup(5);
    let prompts = prompts(&tok, &cfg);
    let mut params = SamplingParams::paper(8, 21);
    let all = ril_model::generate(&model, &prompts, &params).unwrap();
    let again = ril_model::generate(&model, &prompts, &params).unwrap();
    let alone = ril_model::generate(&model, &prompts[..1], &params).unwrap();
    assert_eq!(all[0].token_ids, again[0].token_ids);
    assert_eq!(
        all[0].token_ids, alone[0].token_ids,
        "a sequence does not depend on its batch"
    );
    for g in &all {
        assert_eq!(g.token_ids.len(), 8);
        assert_eq!(g.finish_reason, ril_model::generate::FinishReason::Length);
    }
    // Make the first sampled token a stop token: that sequence ends after one token while the
    // others go on.
    params.stop_token_ids = vec![all[0].token_ids[0]];
    let stopped = ril_model::generate(&model, &prompts, &params).unwrap();
    assert_eq!(stopped[0].token_ids, vec![all[0].token_ids[0]]);
    assert_eq!(
        stopped[0].finish_reason,
        ril_model::generate::FinishReason::Stop
    );
    let image_id = cfg.image_token_index;
    params.suppress_token_ids = vec![image_id];
    for g in ril_model::generate(&model, &prompts, &params).unwrap() {
        assert!(!g.token_ids.contains(&image_id));
    }
}

/// The one sampling loop with per-sequence settings and streams (what a teacher batches
/// unrelated requests with): a sequence samples the same whatever its batch-mates ask for, and
/// `generate` is that loop with stream `j` of one seed for sequence `j`.
#[test]
fn each_sequence_has_its_own_settings_and_stream() {
    let (tok, cfg, model) = setup(5);
    let prompts = prompts(&tok, &cfg);
    let mine = SamplingParams::paper(8, 21);
    let mut other = SamplingParams::paper(3, 99);
    other.temperature = 0.3;
    other.top_k = 2;
    let nothing = SamplingParams::greedy(0);
    let spec = |prompt, params, seed, stream| SequenceSpec {
        prompt,
        params,
        rng: sequence_rng(seed, stream),
    };
    let alone = generate_sequences(
        &model,
        vec![spec(&prompts[0], &mine, 21, 4)],
        GenerateOptions::default(),
    )
    .unwrap();
    let mixed = generate_sequences(
        &model,
        vec![
            spec(&prompts[1], &other, 99, 0),
            spec(&prompts[0], &mine, 21, 4),
            spec(&prompts[2], &nothing, 0, 0),
        ],
        GenerateOptions::default(),
    )
    .unwrap();
    assert_eq!(alone[0].token_ids, mixed[1].token_ids);
    assert_eq!(alone[0].token_ids.len(), 8);
    assert_eq!(mixed[0].token_ids.len(), 3, "its own max_new_tokens");
    assert!(mixed[2].token_ids.is_empty());
    assert_eq!(mixed[2].finish_reason, FinishReason::Length);

    let via_generate = ril_model::generate(&model, &prompts, &mine).unwrap();
    let specs = prompts
        .iter()
        .enumerate()
        .map(|(j, p)| spec(p, &mine, 21, j as u64))
        .collect();
    let via_sequences = generate_sequences(&model, specs, GenerateOptions::default()).unwrap();
    for (a, b) in via_generate.iter().zip(&via_sequences) {
        assert_eq!(a.token_ids, b.token_ids);
        assert_eq!(a.logprobs, b.logprobs);
    }
    // A sequence whose settings are out of range fails the call, naming the setting.
    let mut bad = mine.clone();
    bad.top_p = 0.0;
    let e = generate_sequences(
        &model,
        vec![
            spec(&prompts[0], &mine, 1, 0),
            spec(&prompts[1], &bad, 1, 1),
        ],
        GenerateOptions::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("top_p"), "{e}");
}

fn train(model: &Vlm, opt: &mut AdamW, examples: &[Example], steps: usize, lr: f64) -> f32 {
    let mut last = f32::NAN;
    for _ in 0..steps {
        let loss = sft_loss(model, examples).unwrap();
        last = loss.to_scalar::<f32>().unwrap();
        let grads = Gradients::backward(&loss, opt.params()).unwrap();
        opt.step(&grads, lr).unwrap();
    }
    last
}

#[test]
fn a_tiny_model_overfits_and_then_answers_greedily() {
    let (tok, cfg, model) = setup(6);
    let examples = colour_examples(&tok, &cfg, &Device::Cpu).unwrap();
    let mut opt = AdamW::new(
        model.trainable_vars(),
        AdamWConfig {
            lr: 3e-3,
            ..Default::default()
        },
    )
    .unwrap();
    let first = sft_loss(&model, &examples)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let mut last = first;
    let mut steps = 0;
    while last >= 0.01 && steps < 300 {
        last = train(&model, &mut opt, &examples, 1, 3e-3);
        steps += 1;
    }
    assert!(
        last < 0.01,
        "loss went from {first} to {last} in {steps} steps"
    );
    let prompts: Vec<Prompt> = examples.iter().map(Example::prompt).collect();
    let mut params = SamplingParams::greedy(10);
    params.stop_token_ids = vec![tok.eos_id().unwrap()];
    let gens = ril_model::generate(&model, &prompts, &params).unwrap();
    for (e, g) in examples.iter().zip(&gens) {
        let text = tok.decode(&g.token_ids, true).unwrap();
        assert_eq!(text, e.answer_text);
    }
}

fn weights(model: &Vlm) -> BTreeMap<String, Tensor> {
    model
        .named_vars()
        .into_iter()
        .map(|(k, v)| (k, v.as_tensor().copy().unwrap()))
        .collect()
}

fn assert_same_weights(a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>) {
    assert_eq!(a.len(), b.len());
    for (name, t) in a {
        assert_eq!(max_abs_diff(t, &b[name]), 0.0, "{name}");
    }
}

#[test]
fn save_then_load_is_exact() {
    let (_, _, model) = setup(7);
    let dir = tempfile::tempdir().unwrap();
    model.save_pretrained(dir.path()).unwrap();
    let loaded =
        Vlm::from_pretrained(dir.path(), Head::LanguageModel, &Device::Cpu, DType::F32).unwrap();
    assert_same_weights(&weights(&model), &weights(&loaded));
}

#[test]
fn a_weight_payload_applies_exactly_and_a_damaged_one_changes_nothing() {
    let (_, _, source) = setup(11);
    let (_, _, target) = setup(12);
    let payload = ril_model::checkpoint::weights_bytes(&source).unwrap();
    let before = weights(&target);
    // Truncated: refused, the target untouched.
    let e = ril_model::checkpoint::load_weights_from_bytes(
        &target,
        &payload[..payload.len() / 2],
        "<weights v1>",
        ril_model::checkpoint::LoadOptions::strict(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("<weights v1>"), "{e}");
    assert_same_weights(&before, &weights(&target));
    ril_model::checkpoint::load_weights_from_bytes(
        &target,
        &payload,
        "<weights v1>",
        ril_model::checkpoint::LoadOptions::strict(),
    )
    .unwrap();
    assert_same_weights(&weights(&source), &weights(&target));
}

#[test]
fn weights_holding_nan_or_inf_are_refused_at_load_naming_the_tensor() {
    let (_, _, source) = setup(13);
    let (_, _, target) = setup(14);
    let before = weights(&target);
    for (poison, what) in [(f32::NAN, "NaN"), (f32::NEG_INFINITY, "-inf")] {
        let mut tensors = weights(&source);
        let (name, tensor) = tensors.iter_mut().nth(3).unwrap();
        let name = name.clone();
        let mut values = tensor.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let last = values.len() - 1;
        values[last] = poison;
        *tensor = Tensor::from_vec(values, tensor.dims(), &Device::Cpu).unwrap();
        let payload = ril_model::checkpoint::safetensors_bytes(&tensors, None).unwrap();

        let e = ril_model::checkpoint::load_weights_from_bytes(
            &target,
            &payload,
            "<weights v2>",
            ril_model::checkpoint::LoadOptions::strict(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("<weights v2>") && e.contains(&name) && e.contains("1 non-finite"),
            "{what}: {e}"
        );
        assert_same_weights(&before, &weights(&target));

        // The same from a checkpoint directory.
        let dir = tempfile::tempdir().unwrap();
        source.save_pretrained(dir.path()).unwrap();
        std::fs::write(dir.path().join("model.safetensors"), &payload).unwrap();
        let e = Vlm::from_pretrained(dir.path(), Head::LanguageModel, &Device::Cpu, DType::F32)
            .expect_err("a checkpoint with non-finite weights is refused")
            .to_string();
        assert!(
            e.contains("model.safetensors") && e.contains(&name) && e.contains("non-finite"),
            "{what}: {e}"
        );
    }
}

#[test]
fn weights_stored_as_f16_load_as_their_rounded_values_at_half_the_size() {
    let (_, _, model) = setup(9);
    let full = tempfile::tempdir().unwrap();
    let half = tempfile::tempdir().unwrap();
    model.save_pretrained(full.path()).unwrap();
    ril_model::checkpoint::save_model_as(&model, half.path(), Some(DType::F16)).unwrap();
    let size = |d: &std::path::Path| {
        std::fs::metadata(d.join("model.safetensors"))
            .unwrap()
            .len()
    };
    let (full_bytes, half_bytes) = (size(full.path()), size(half.path()));
    assert!(
        half_bytes * 10 < full_bytes * 6,
        "f16 file {half_bytes} bytes against f32 {full_bytes}"
    );
    let loaded =
        Vlm::from_pretrained(half.path(), Head::LanguageModel, &Device::Cpu, DType::F32).unwrap();
    assert_eq!(loaded.dtype(), DType::F32);
    let rounded: BTreeMap<String, Tensor> = weights(&model)
        .into_iter()
        .map(|(k, t)| {
            (
                k,
                t.to_dtype(DType::F16)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap(),
            )
        })
        .collect();
    assert_same_weights(&rounded, &weights(&loaded));
    assert!(
        ril_model::checkpoint::save_model_as(&model, half.path(), Some(DType::U32)).is_err(),
        "an integer storage dtype is refused"
    );
}

#[test]
fn missing_extra_and_misshaped_tensors_are_refused_by_name() {
    let (_, _, model) = setup(8);
    let dir = tempfile::tempdir().unwrap();
    model.save_pretrained(dir.path()).unwrap();
    let original = weights(&model);
    let file = dir.path().join("model.safetensors");
    let rewrite = |edit: &dyn Fn(&mut BTreeMap<String, Tensor>)| {
        let mut t: BTreeMap<String, Tensor> = original.clone();
        edit(&mut t);
        std::fs::write(
            &file,
            ril_model::checkpoint::safetensors_bytes(&t, None).unwrap(),
        )
        .unwrap();
    };
    let target = Vlm::new_random(
        model.config(),
        Head::LanguageModel,
        &Device::Cpu,
        DType::F32,
        99,
    )
    .unwrap();
    let before = weights(&target);
    let load = || {
        ril_model::checkpoint::load_weights(
            &target,
            dir.path(),
            ril_model::checkpoint::LoadOptions::strict(),
        )
        .unwrap_err()
        .to_string()
    };

    rewrite(&|t| {
        t.remove("language_model.model.layers.1.mlp.up_proj.weight");
    });
    let err = load();
    assert!(
        err.contains("language_model.model.layers.1.mlp.up_proj.weight") && err.contains("missing"),
        "{err}"
    );

    rewrite(&|t| {
        t.insert(
            "language_model.model.layers.9.extra.weight".into(),
            Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let err = load();
    assert!(
        err.contains("language_model.model.layers.9.extra.weight") && err.contains("unexpected"),
        "{err}"
    );

    rewrite(&|t| {
        t.insert(
            "multi_modal_projector.linear_2.weight".into(),
            Tensor::zeros((3, 5), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let err = load();
    assert!(
        err.contains("multi_modal_projector.linear_2.weight") && err.contains("[3, 5]"),
        "{err}"
    );

    rewrite(&|t| {
        let w = t["language_model.model.norm.weight"]
            .to_dtype(DType::U8)
            .unwrap();
        t.insert("language_model.model.norm.weight".into(), w);
    });
    let err = load();
    assert!(
        err.contains("language_model.model.norm.weight") && err.contains("dtype"),
        "{err}"
    );

    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 3]).unwrap();
    let err = load();
    assert!(err.contains("model.safetensors"), "{err}");

    // Nothing of a refused checkpoint was applied.
    assert_same_weights(&before, &weights(&target));
}

#[test]
fn a_discriminator_starts_from_the_student_backbone() {
    let (_, _, student) = setup(9);
    let dir = tempfile::tempdir().unwrap();
    student.save_pretrained(dir.path()).unwrap();
    let (d, report) =
        Vlm::discriminator_from_student(dir.path(), &Device::Cpu, DType::F32, 1).unwrap();
    assert_eq!(
        report.ignored,
        vec!["language_model.lm_head.weight".to_string()]
    );
    assert_eq!(report.kept_initial, vec!["score.weight".to_string()]);
    let s = weights(&student);
    for (name, t) in weights(&d) {
        if name != "score.weight" {
            assert_eq!(max_abs_diff(&t, &s[&name]), 0.0, "{name}");
        }
    }
    // A student checkpoint is not silently accepted as a discriminator.
    let err = Vlm::from_pretrained(dir.path(), Head::Scalar, &Device::Cpu, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("lm_head") || err.contains("score.weight"),
        "{err}"
    );
}

/// Gradients summed over tokens (Dr.GRPO-style constant normaliser) from two micro-batches
/// equal those of one batch: only float summation order differs (tolerance 1e-6 relative).
#[test]
fn gradient_accumulation_equals_one_big_batch() {
    let (tok, cfg, model) = setup(10);
    let examples = colour_examples(&tok, &cfg, &Device::Cpu).unwrap();
    let params = model.trainable_vars();
    let summed = |ex: &[Example]| {
        let requests: Vec<ScoreRequest<'_>> = ex.iter().map(Example::score_request).collect();
        let lp = score_tokens(&model, &requests, 1.0).unwrap().logprobs;
        (lp.sum_all().unwrap().neg().unwrap() / 64.0).unwrap()
    };
    let big = Gradients::backward(&summed(&examples), &params).unwrap();
    let mut acc = Gradients::default();
    acc.accumulate(
        &Gradients::backward(&summed(&examples[..2]), &params).unwrap(),
        1.0,
    )
    .unwrap();
    acc.accumulate(
        &Gradients::backward(&summed(&examples[2..]), &params).unwrap(),
        1.0,
    )
    .unwrap();
    for (name, g) in &big.grads {
        let scale = g
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .max(1e-12);
        let d = max_abs_diff(g, &acc.grads[name]);
        assert!(d <= 1e-5 * scale + 1e-9, "{name}: diff {d} (scale {scale})");
    }
}

/// Training 3 steps, saving model + optimizer, and training 3 more from the saved state gives
/// bit-identical weights to 6 uninterrupted steps.
#[test]
fn a_resumed_run_equals_an_uninterrupted_one() {
    let cfg_opt = AdamWConfig {
        lr: 1e-3,
        ..Default::default()
    };
    let (tok, cfg, a) = setup(11);
    let examples = colour_examples(&tok, &cfg, &Device::Cpu).unwrap();
    let mut opt_a = AdamW::new(a.trainable_vars(), cfg_opt.clone()).unwrap();
    train(&a, &mut opt_a, &examples, 3, 1e-3);
    let dir = tempfile::tempdir().unwrap();
    a.save_pretrained(dir.path()).unwrap();
    opt_a
        .save(&dir.path().join("optimizer.safetensors"))
        .unwrap();
    train(&a, &mut opt_a, &examples, 3, 1e-3);

    let b =
        Vlm::from_pretrained(dir.path(), Head::LanguageModel, &Device::Cpu, DType::F32).unwrap();
    let mut opt_b = AdamW::new(b.trainable_vars(), cfg_opt).unwrap();
    opt_b
        .load(&dir.path().join("optimizer.safetensors"))
        .unwrap();
    assert_eq!(opt_b.step_count(), 3);
    train(&b, &mut opt_b, &examples, 3, 1e-3);
    assert_same_weights(&weights(&a), &weights(&b));
}

#[test]
fn a_non_finite_gradient_is_refused_without_touching_the_weights() {
    let (_, _, model) = setup(12);
    let before = weights(&model);
    let mut opt = AdamW::new(model.trainable_vars(), AdamWConfig::default()).unwrap();
    let mut grads = Gradients::default();
    let (name, var) = model.trainable_vars().into_iter().next().unwrap();
    grads.grads.insert(
        name,
        Tensor::full(f32::NAN, var.shape(), &Device::Cpu).unwrap(),
    );
    let err = opt.step(&grads, 1e-3).unwrap_err().to_string();
    assert!(err.contains("NaN") || err.contains("non-finite"), "{err}");
    assert_eq!(opt.step_count(), 0);
    assert_same_weights(&before, &weights(&model));
}
