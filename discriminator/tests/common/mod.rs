//! Test fixtures: a tiny random student checkpoint (test-size LLaVA, byte-level tokenizer),
//! rows with real PNG images, and two visibly different answer styles.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};
use ril_data::Row;
use ril_data::dataset::{ImageData, Message};
use ril_discriminator::LabelledResponse;
use ril_model::bundle::Bundle;
use ril_model::image::{ImageProcessor, ImageProcessorConfig};
use ril_model::{Head, LlavaConfig, Vlm};

pub const COLOURS: [(&str, [u8; 3]); 8] = [
    ("red", [220, 30, 30]),
    ("green", [30, 200, 40]),
    ("blue", [30, 40, 220]),
    ("yellow", [230, 220, 30]),
    ("purple", [140, 40, 170]),
    ("orange", [240, 140, 20]),
    ("pink", [240, 150, 190]),
    ("brown", [120, 70, 30]),
];

/// Writes a test-size student (LM head, random weights from `seed`) to `dir`.
pub fn tiny_student(dir: &Path, seed: u64) -> PathBuf {
    let tokenizer = ril_model::tokenizer::byte_level_chatml().unwrap();
    let image_id = tokenizer.token_id("<image>").unwrap();
    let cfg = LlavaConfig::for_tests(tokenizer.vocab_size(), image_id);
    let model = Vlm::new_random(&cfg, Head::LanguageModel, &Device::Cpu, DType::F32, seed).unwrap();
    let processor = ImageProcessor::new(ImageProcessorConfig::clip(16)).unwrap();
    Bundle {
        model,
        tokenizer,
        processor,
    }
    .save(dir)
    .unwrap();
    dir.to_path_buf()
}

/// "What colour is the object?" with a 16x16 PNG of that colour.
pub fn colour_row(colour: &str, rgb: [u8; 3]) -> Row {
    let png = ril_model::toy::square_png(16, 16, [255, 255, 255], Some(rgb)).unwrap();
    Row {
        id: format!("colour-{colour}"),
        images: vec![ImageData {
            name: format!("{colour}.png"),
            bytes: png,
        }],
        messages: vec![Message {
            role: "user".into(),
            content: serde_json::Value::String("What colour is the object?".into()),
        }],
        answer: colour.into(),
        answer_type: None,
        teacher_answers: Default::default(),
        family: Some("colour".into()),
        extra: Default::default(),
    }
}

/// The student's terse style.
pub fn student_answer(colour: &str) -> String {
    format!("Answer: {colour}")
}

/// The teacher's fuller style.
pub fn teacher_answer(colour: &str) -> String {
    format!("The object is {colour}. Answer: {colour}")
}

/// One student and one teacher answer for each of the given colours.
pub fn styled_examples(colours: &[(&str, [u8; 3])]) -> Vec<LabelledResponse> {
    colours
        .iter()
        .flat_map(|(c, rgb)| {
            let row = Arc::new(colour_row(c, *rgb));
            [
                LabelledResponse {
                    question: row.clone(),
                    response: student_answer(c),
                    from_student: true,
                },
                LabelledResponse {
                    question: row,
                    response: teacher_answer(c),
                    from_student: false,
                },
            ]
        })
        .collect()
}

/// Mean D(student answer) - mean D(teacher answer), and the accuracy of `D > 0.5 <=> student`.
pub fn separation(
    model: &ril_discriminator::DiscriminatorModel,
    colours: &[(&str, [u8; 3])],
) -> (f32, f32) {
    let mut gap = 0.0;
    let mut correct = 0;
    for (c, rgb) in colours {
        let row = colour_row(c, *rgb);
        let p = model
            .score(&row, &[student_answer(c), teacher_answer(c)])
            .unwrap();
        gap += p[0] - p[1];
        correct += usize::from(p[0] > 0.5) + usize::from(p[1] < 0.5);
    }
    (
        gap / colours.len() as f32,
        correct as f32 / (2 * colours.len()) as f32,
    )
}

/// The one `wait_until` (polls until the predicate holds, panics with `what` after the
/// timeout).
#[allow(unused_imports)]
pub use ril_common::wait::wait_until;

/// Every parameter's values, by name.
pub fn weights(model: &ril_discriminator::DiscriminatorModel) -> Vec<(String, Vec<u32>)> {
    model
        .bundle()
        .model
        .named_vars()
        .into_iter()
        .map(|(k, v)| {
            let values: Vec<f32> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            (k, values.into_iter().map(f32::to_bits).collect())
        })
        .collect()
}
