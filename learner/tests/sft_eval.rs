//! SFT and evaluation on a small synthetic dataset with the real loaders: SFT lowers the
//! validation loss, a resumed run equals an uninterrupted one, accumulation equals a big batch,
//! and evaluation's accuracy is what the checker says row by row.

use std::path::Path;

use candle_core::{DType, Device};
use ril_data::dataset::{ReadOptions, read_all};
use ril_data::shapes::{SynthConfig, write_dataset};
use ril_learner::eval::{EvalConfig, evaluate, score};
use ril_learner::sft::{Schedule, SftConfig, SftState, run_sft};
use ril_model::bundle::Bundle;
use ril_model::image::{ImageProcessor, ImageProcessorConfig};
use ril_model::optim::{AdamW, AdamWConfig};
use ril_model::{Head, LlavaConfig, Vlm};

/// A dataset, and a test-size model with the built-in tokenizer, saved as a model directory.
fn setup(dir: &Path) -> std::path::PathBuf {
    let data = dir.join("data");
    write_dataset(
        &SynthConfig {
            seed: 1,
            n_train: 48,
            n_val: 16,
            n_test: 12,
            image_size: 32,
            max_objects: 3,
            noise: 0.0,
            min_objects: 1,
            ..Default::default()
        },
        &data,
    )
    .unwrap();
    let tokenizer = ril_model::tokenizer::byte_level_chatml().unwrap();
    let image_id = tokenizer.token_id("<image>").unwrap();
    let cfg = LlavaConfig::for_tests(tokenizer.vocab_size(), image_id);
    let model = Vlm::new_random(&cfg, Head::LanguageModel, &Device::Cpu, DType::F32, 5).unwrap();
    let processor = ImageProcessor::new(ImageProcessorConfig::clip(16)).unwrap();
    let model_dir = dir.join("model");
    Bundle {
        model,
        tokenizer,
        processor,
    }
    .save(&model_dir)
    .unwrap();
    data
}

fn cfg(steps: usize) -> SftConfig {
    SftConfig {
        steps,
        batch_size: 4,
        grad_accum: 1,
        lr: 3e-3,
        min_lr: 3e-4,
        warmup_steps: 2,
        schedule: Schedule::Cosine,
        eval_every: 0,
        eval_rows: 16,
        save_every: 0,
        log_every: 1,
        ..Default::default()
    }
}

fn load(dir: &Path) -> Bundle {
    Bundle::load(dir, Head::LanguageModel, &Device::Cpu, DType::F32).unwrap()
}

fn weights(b: &Bundle) -> Vec<(String, Vec<f32>)> {
    b.model
        .named_vars()
        .into_iter()
        .map(|(k, v)| (k, v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()))
        .collect()
}

#[test]
fn sft_lowers_the_validation_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let data = setup(tmp.path());
    let bundle = load(&tmp.path().join("model"));
    let mut opt = AdamW::new(bundle.model.trainable_vars(), AdamWConfig::default()).unwrap();
    let c = SftConfig {
        eval_every: 20,
        ..cfg(20)
    };
    let summary = run_sft(
        &bundle,
        &mut opt,
        &data.join("train.jsonl"),
        Some(&data.join("val.jsonl")),
        &tmp.path().join("out"),
        &c,
        SftState::default(),
        |_| {},
    )
    .unwrap();
    let (first, last) = (
        summary.first_val_loss.unwrap(),
        summary.final_val_loss.unwrap(),
    );
    assert!(last < 0.6 * first, "validation loss {first} -> {last}");
    // The final directory is a loadable model directory with its optimizer and state.
    let reloaded = load(&summary.final_dir);
    assert_eq!(weights(&reloaded), weights(&bundle));
    assert_eq!(SftState::load(&summary.final_dir).unwrap().step, 20);
}

#[test]
fn a_resumed_sft_run_equals_an_uninterrupted_one() {
    let tmp = tempfile::tempdir().unwrap();
    let data = setup(tmp.path());
    let train = data.join("train.jsonl");
    // Uninterrupted: 14 steps of 4 rows, crossing the 48-row epoch boundary.
    let a = load(&tmp.path().join("model"));
    let mut opt_a = AdamW::new(a.model.trainable_vars(), AdamWConfig::default()).unwrap();
    run_sft(
        &a,
        &mut opt_a,
        &train,
        None,
        &tmp.path().join("a"),
        &cfg(14),
        SftState::default(),
        |_| {},
    )
    .unwrap();
    // Interrupted after 7 (checkpoint), resumed from the checkpoint in a fresh process state.
    let b = load(&tmp.path().join("model"));
    let mut opt_b = AdamW::new(b.model.trainable_vars(), AdamWConfig::default()).unwrap();
    let first_half = SftConfig {
        save_every: 7,
        ..cfg(14)
    };
    run_sft(
        &b,
        &mut opt_b,
        &train,
        None,
        &tmp.path().join("b"),
        &first_half,
        SftState::default(),
        |_| {},
    )
    .unwrap();
    let ckpt = tmp.path().join("b/checkpoint-000007");
    let c = load(&ckpt);
    let mut opt_c = AdamW::new(c.model.trainable_vars(), AdamWConfig::default()).unwrap();
    opt_c.load(&ckpt.join("optimizer.safetensors")).unwrap();
    let state = SftState::load(&ckpt).unwrap();
    assert_eq!(state.step, 7);
    run_sft(
        &c,
        &mut opt_c,
        &train,
        None,
        &tmp.path().join("c"),
        &cfg(14),
        state,
        |_| {},
    )
    .unwrap();
    assert_eq!(weights(&a), weights(&c));
}

#[test]
fn gradient_accumulation_equals_one_big_batch_in_sft() {
    let tmp = tempfile::tempdir().unwrap();
    let data = setup(tmp.path());
    let train = data.join("train.jsonl");
    let big = load(&tmp.path().join("model"));
    // Adam divides by sqrt(v) + eps, so a gradient that is pure float noise takes a step set
    // by eps and by the noise's sign: the attention key biases' gradient is exactly zero
    // (softmax is shift-invariant), and with eps = 1e-8 their noise steps differ between
    // summation orders by ~1e-5. eps = 1e-6 keeps noise steps far below the tolerance while
    // real gradients (>> 1e-6) step as before.
    let adam = AdamWConfig {
        eps: 1e-6,
        ..AdamWConfig::default()
    };
    let mut opt_big = AdamW::new(big.model.trainable_vars(), adam.clone()).unwrap();
    run_sft(
        &big,
        &mut opt_big,
        &train,
        None,
        &tmp.path().join("big"),
        &SftConfig {
            batch_size: 4,
            grad_accum: 1,
            ..cfg(2)
        },
        SftState::default(),
        |_| {},
    )
    .unwrap();
    let acc = load(&tmp.path().join("model"));
    let mut opt_acc = AdamW::new(acc.model.trainable_vars(), adam).unwrap();
    run_sft(
        &acc,
        &mut opt_acc,
        &train,
        None,
        &tmp.path().join("acc"),
        &SftConfig {
            batch_size: 2,
            grad_accum: 2,
            ..cfg(2)
        },
        SftState::default(),
        |_| {},
    )
    .unwrap();
    // Same rows, same tokens: equal up to float summation order.
    for ((n, a), (_, b)) in weights(&big).iter().zip(weights(&acc).iter()) {
        let d = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(d < 1e-5, "{n}: {d}");
    }
}

#[test]
fn evaluation_accuracy_is_the_checkers_row_by_row() {
    let tmp = tempfile::tempdir().unwrap();
    let data = setup(tmp.path());
    let (rows, _) = read_all(&data.join("test.jsonl"), ReadOptions::default()).unwrap();
    // Hand-made responses: the first half right (in different phrasings), the rest wrong.
    let responses: Vec<Vec<String>> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| {
            vec![if i < 6 {
                format!("Answer: {}", r.answer)
            } else {
                "purple elephant".to_string()
            }]
        })
        .collect();
    let report = score(&rows, &responses);
    assert_eq!(report.questions, 12);
    assert!((report.accuracy - 0.5).abs() < 1e-12, "{}", report.accuracy);
    let by_family: usize = report.per_family.values().map(|f| f.total).sum();
    assert_eq!(by_family, 12);
    // Generation end to end: whatever the untrained model says, the reported accuracy equals
    // re-checking its responses.
    let bundle = load(&tmp.path().join("model"));
    let report = evaluate(
        &bundle,
        &rows,
        &EvalConfig {
            max_new_tokens: 6,
            batch_size: 5,
            ..Default::default()
        },
        |_, _| {},
    )
    .unwrap();
    let rechecked = report
        .rows
        .iter()
        .zip(&rows)
        .filter(|(r, row)| {
            ril_data::answer::check(&r.responses[0], &row.answer, row.answer_type).correct
        })
        .count() as f64
        / rows.len() as f64;
    assert!((report.accuracy - rechecked).abs() < 1e-12);
}

#[test]
fn sft_and_eval_read_verl_parquet_too() {
    let tmp = tempfile::tempdir().unwrap();
    let data = setup(tmp.path());
    let (rows, _) = read_all(&data.join("train.jsonl"), ReadOptions::default()).unwrap();
    let parquet = tmp.path().join("train.parquet");
    ril_data::parquet::write_verl_parquet(&rows, &parquet, "shapes", "train").unwrap();
    let bundle = load(&tmp.path().join("model"));
    let mut opt = AdamW::new(bundle.model.trainable_vars(), AdamWConfig::default()).unwrap();
    // 14 steps of 4 rows cross the 48-row epoch boundary of the in-memory Parquet stream.
    let summary = run_sft(
        &bundle,
        &mut opt,
        &parquet,
        None,
        &tmp.path().join("out"),
        &cfg(14),
        SftState::default(),
        |_| {},
    )
    .unwrap();
    assert_eq!(summary.steps, 14);
    let (back, _) = read_all(&parquet, ReadOptions::default()).unwrap();
    assert_eq!(back.len(), rows.len());
    let report = evaluate(
        &bundle,
        &back[..4],
        &EvalConfig {
            max_new_tokens: 4,
            ..Default::default()
        },
        |_, _| {},
    )
    .unwrap();
    assert_eq!(report.questions, 4);
}
