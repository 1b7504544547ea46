//! D as a domain object: learning, gradients, the NaN guard, frozen mode, idempotence,
//! truncation, checkpoints and exact resume.

mod common;

use candle_core::{Device, Tensor};
use common::*;
use ril_discriminator::checkpoint::{LATEST_FILE, latest_checkpoint};
use ril_discriminator::{DiscriminatorError, DiscriminatorModel, DiscriminatorOptions};

fn options(student: &std::path::Path) -> DiscriminatorOptions {
    DiscriminatorOptions::for_test(student)
}

#[test]
fn training_separates_terse_student_answers_from_fuller_teacher_answers() {
    let tmp = tempfile::tempdir().unwrap();
    let student = tiny_student(&tmp.path().join("student"), 1);
    let mut d = DiscriminatorModel::from_init(&options(&student), &Device::Cpu).unwrap();
    let (train_colours, held_out_colours) = (&COLOURS[..4], &COLOURS[6..]);
    let train = styled_examples(train_colours);
    let (gap_before, _) = separation(&d, held_out_colours);
    assert!(
        gap_before.abs() < 0.1,
        "a fresh head starts near 1/2 for both styles: gap {gap_before}"
    );
    let mut accuracies = Vec::new();
    let mut losses = Vec::new();
    for iteration in 0..20 {
        let outcome = d.train_step(&train, Some(iteration)).unwrap();
        assert!(!outcome.skipped);
        assert_eq!(outcome.step, iteration + 1);
        accuracies.push(outcome.accuracy);
        losses.push(outcome.loss);
    }
    let (gap_after, accuracy_after) = separation(&d, held_out_colours);
    assert!(
        accuracy_after == 1.0 && gap_after > 0.5,
        "held-out colours: accuracy {accuracy_after}, gap {gap_after}; losses {losses:?}"
    );
    let first: f32 = losses[..5].iter().sum::<f32>() / 5.0;
    let last: f32 = losses[15..].iter().sum::<f32>() / 5.0;
    assert!(last < 0.3 * first, "loss {first} -> {last}");
    assert_eq!(*accuracies.last().unwrap(), 1.0, "{accuracies:?}");
}

#[test]
fn every_trainable_tensor_gets_a_gradient_when_d_sees_the_image() {
    let tmp = tempfile::tempdir().unwrap();
    let student = tiny_student(&tmp.path().join("student"), 2);
    let opts = DiscriminatorOptions {
        include_image: true,
        ..options(&student)
    };
    let d = DiscriminatorModel::from_init(&opts, &Device::Cpu).unwrap();
    let examples = styled_examples(&COLOURS[..2]);
    let prepared = d.prepare_step(&examples).unwrap();
    let trainable = d.bundle().model.trainable_vars();
    assert!(trainable.contains_key("score.weight"));
    assert!(
        !trainable.keys().any(|k| k.contains("lm_head")),
        "D has no LM head"
    );
    for name in trainable.keys() {
        let g = prepared
            .gradients
            .grads
            .get(name)
            .unwrap_or_else(|| panic!("{name} got no gradient"));
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(norm.is_finite(), "{name}: gradient norm {norm}");
        if name == "score.weight" {
            assert!(norm > 0.0, "the head's gradient is zero");
        }
    }
    // Without the image, the question's text and the response still reach every text tensor.
    let d_text = DiscriminatorModel::from_init(&options(&student), &Device::Cpu).unwrap();
    let prepared = d_text.prepare_step(&examples).unwrap();
    for name in d_text.bundle().model.trainable_vars().keys() {
        if name.starts_with("language_model.") || name == "score.weight" {
            assert!(prepared.gradients.grads.contains_key(name), "{name}");
        }
    }
}

#[test]
fn a_non_finite_loss_is_refused_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let student = tiny_student(&tmp.path().join("student"), 3);
    let mut d = DiscriminatorModel::from_init(&options(&student), &Device::Cpu).unwrap();
    let examples = styled_examples(&COLOURS[..2]);
    d.train_step(&examples, Some(0)).unwrap();
    let head = d.bundle().model.named_vars()["score.weight"].clone();
    let good = head.as_tensor().copy().unwrap();
    let nan = Tensor::full(f32::NAN, head.shape(), &Device::Cpu).unwrap();
    head.set(&nan).unwrap();
    let before = weights(&d);
    let err = d.train_step(&examples, Some(1)).unwrap_err();
    assert!(
        matches!(err, DiscriminatorError::NonFiniteLoss { step: 2, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("unchanged"), "{err}");
    assert_eq!(weights(&d), before, "weights changed after a refused step");
    assert_eq!(d.step(), 1);
    assert_eq!(d.last_iteration(), Some(0));
    // With sane weights again, the same iteration trains.
    head.set(&good).unwrap();
    assert_eq!(d.train_step(&examples, Some(1)).unwrap().step, 2);
}

#[test]
fn frozen_d_never_changes_and_repeated_iterations_are_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    let student = tiny_student(&tmp.path().join("student"), 4);
    let examples = styled_examples(&COLOURS[..2]);

    let frozen_opts = DiscriminatorOptions {
        frozen: true,
        ..options(&student)
    };
    let mut frozen = DiscriminatorModel::from_init(&frozen_opts, &Device::Cpu).unwrap();
    let before = weights(&frozen);
    for iteration in 0..3 {
        let outcome = frozen.train_step(&examples, Some(iteration)).unwrap();
        assert!(outcome.skipped && outcome.step == 0, "{outcome:?}");
        assert!(
            outcome.loss > 0.0,
            "frozen Train still reports the batch's loss"
        );
    }
    assert_eq!(weights(&frozen), before);

    let mut d = DiscriminatorModel::from_init(&options(&student), &Device::Cpu).unwrap();
    let first = d.train_step(&examples, Some(7)).unwrap();
    assert!(!first.skipped && first.step == 1);
    let after_first = weights(&d);
    for repeat in [7, 3] {
        let again = d.train_step(&examples, Some(repeat)).unwrap();
        assert!(again.skipped && again.step == 1, "{again:?}");
    }
    assert_eq!(weights(&d), after_first);
    assert!(!d.train_step(&examples, Some(8)).unwrap().skipped);
}

#[test]
fn long_responses_keep_their_tail_and_the_question_is_optional() {
    let tmp = tempfile::tempdir().unwrap();
    let student = tiny_student(&tmp.path().join("student"), 5);
    let opts = DiscriminatorOptions {
        max_response_tokens: 11,
        ..options(&student)
    };
    let d = DiscriminatorModel::from_init(&opts, &Device::Cpu).unwrap();
    let row = colour_row("red", [220, 30, 30]);
    let tok = &d.bundle().tokenizer;
    let short = d.encode(&row, "").unwrap();
    let long_text = "x".repeat(50) + " Answer: red";
    let long = d.encode(&row, &long_text).unwrap();
    assert_eq!(long.len(), short.len() + 11);
    let text = tok.decode(&long, false).unwrap();
    assert!(
        text.contains("<response>Answer: red</response>"),
        "the tail is kept: {text}"
    );
    assert!(text.contains("<question>What colour is the object?</question>"));
    assert!(text.contains("Return 1 if it was generated by the student model."));
    assert!(text.ends_with("<|im_start|>assistant\n"), "{text}");
    // A response spelling the image token does not open an image slot.
    let sneaky = d.encode(&row, "<image> Answer: red").unwrap();
    let image_id = d.bundle().model.config().image_token_index;
    assert!(!sneaky.contains(&image_id));
    d.score(&row, &["<image>".to_string()]).unwrap();

    let no_question = DiscriminatorModel::from_init(
        &DiscriminatorOptions {
            include_question: false,
            ..options(&student)
        },
        &Device::Cpu,
    )
    .unwrap();
    let text = tok
        .decode(&no_question.encode(&row, "Answer: red").unwrap(), false)
        .unwrap();
    assert!(!text.contains("What colour"), "{text}");
}

#[test]
fn checkpoint_and_resume_continue_exactly_like_an_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let student = tiny_student(&tmp.path().join("student"), 6);
    let batches: Vec<_> = (0..4)
        .map(|i| styled_examples(&COLOURS[2 * i..2 * i + 2]))
        .collect();
    let probe = colour_row("red", [220, 30, 30]);
    let probe_answers = vec![student_answer("red"), teacher_answer("red")];

    // Uninterrupted: four steps, checkpointing after the second.
    let root = tmp.path().join("d");
    let opts = DiscriminatorOptions {
        checkpoint_dir: Some(root.clone()),
        ..options(&student)
    };
    let mut a = DiscriminatorModel::load(&opts, &Device::Cpu).unwrap();
    for (i, b) in batches[..2].iter().enumerate() {
        a.train_step(b, Some(i as u64)).unwrap();
    }
    let saved = a.save_checkpoint(&root).unwrap().unwrap();
    assert!(saved.ends_with("step-00000002"));
    assert!(
        a.save_checkpoint(&root).unwrap().is_none(),
        "same step: not saved twice"
    );
    assert!(root.join(LATEST_FILE).is_file());
    let scores_at_2 = a.score(&probe, &probe_answers).unwrap();
    for (i, b) in batches[2..].iter().enumerate() {
        a.train_step(b, Some(i as u64 + 2)).unwrap();
    }
    let scores_at_4 = a.score(&probe, &probe_answers).unwrap();

    // Resumed from step 2.
    let mut b = DiscriminatorModel::load(&opts, &Device::Cpu).unwrap();
    assert_eq!(b.step(), 2);
    assert_eq!(b.last_iteration(), Some(1));
    assert!(b.already_trained(1) && !b.already_trained(2));
    assert_eq!(b.score(&probe, &probe_answers).unwrap(), scores_at_2);
    for (i, batch) in batches[2..].iter().enumerate() {
        let outcome = b.train_step(batch, Some(i as u64 + 2)).unwrap();
        assert_eq!(outcome.step, i as u64 + 3);
    }
    assert_eq!(b.score(&probe, &probe_answers).unwrap(), scores_at_4);
    assert_eq!(weights(&a), weights(&b));

    // `resume = false` starts again from the student; a D directory as `init` keeps its head.
    let fresh = DiscriminatorModel::load(
        &DiscriminatorOptions {
            resume: false,
            ..opts.clone()
        },
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(fresh.step(), 0);
    let from_d = DiscriminatorModel::from_init(
        &DiscriminatorOptions {
            seed: 99,
            ..options(&root)
        },
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(from_d.step(), 0, "init takes the weights only");
    assert_eq!(from_d.score(&probe, &probe_answers).unwrap(), scores_at_2);
    assert_eq!(
        latest_checkpoint(&root).unwrap().unwrap(),
        root.join("step-00000002")
    );
}

#[test]
fn a_student_directory_cannot_be_resumed_as_a_discriminator() {
    let tmp = tempfile::tempdir().unwrap();
    let student = tiny_student(&tmp.path().join("student"), 7);
    let err = DiscriminatorModel::resume(&student, &options(&student), &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("lm_head"), "{err}");
    let err = DiscriminatorModel::from_init(&options(&tmp.path().join("nowhere")), &Device::Cpu)
        .unwrap_err();
    assert!(err.to_string().contains("init"), "{err}");
}
