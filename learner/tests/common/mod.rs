//! Tiny models, questions and scored groups for the learner's tests. Student responses are
//! sampled from the model with `ril_model::generate`, so their behaviour log-probs are real.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use ril_data::Row;
use ril_data::dataset::{ImageData, Message};
use ril_learner::grpo::{Group, Response, ResponseSource};
use ril_learner::service::IncomingGroup;
use ril_model::bundle::Bundle;
use ril_model::generate::SamplingParams;
use ril_model::image::{ImageProcessor, ImageProcessorConfig};
use ril_model::{Head, LlavaConfig, Vlm};
use ril_prompt::prompt;

/// A test-size model with the built-in tokenizer, saved as a model directory `dir/name`.
pub fn tiny_model(dir: &Path, name: &str, seed: u64) -> PathBuf {
    let tokenizer = ril_model::tokenizer::byte_level_chatml().unwrap();
    let image_id = tokenizer.token_id("<image>").unwrap();
    let cfg = LlavaConfig::for_tests(tokenizer.vocab_size(), image_id);
    let model = Vlm::new_random(&cfg, Head::LanguageModel, &Device::Cpu, DType::F32, seed).unwrap();
    let processor = ImageProcessor::new(ImageProcessorConfig::clip(16)).unwrap();
    let out = dir.join(name);
    Bundle {
        model,
        tokenizer,
        processor,
    }
    .save(&out)
    .unwrap();
    out
}

pub fn load(dir: &Path) -> Bundle {
    Bundle::load(dir, Head::LanguageModel, &Device::Cpu, DType::F32).unwrap()
}

pub const COLOURS: [(&str, [u8; 3]); 4] = [
    ("red", [220, 30, 30]),
    ("green", [30, 200, 40]),
    ("blue", [30, 40, 220]),
    ("yellow", [230, 220, 30]),
];

/// "What colour is the square?" with a 16x16 PNG.
pub fn colour_row(i: usize) -> Row {
    let (name, rgb) = COLOURS[i % COLOURS.len()];
    let png = ril_model::toy::square_png(16, 16, [255, 255, 255], Some(rgb)).unwrap();
    Row {
        id: format!("q{i}"),
        images: vec![ImageData {
            name: format!("q{i}.png"),
            bytes: png,
        }],
        messages: vec![Message {
            role: "user".into(),
            content: serde_json::Value::String("What colour is the square?".into()),
        }],
        answer: name.into(),
        answer_type: None,
        teacher_answers: Default::default(),
        family: Some("colour".into()),
        extra: Default::default(),
    }
}

/// Deterministic, varied rewards so groups have non-zero advantages.
pub fn rewards(position: u64, index: usize) -> (f32, f32) {
    let r_sim = ((position as usize + index) % 2) as f32;
    let r_ans = (position as usize * 3 + index).is_multiple_of(3) as u8 as f32;
    (r_sim, r_ans)
}

pub fn sampling(temperature: f64, seed: u64, bundle: &Bundle) -> SamplingParams {
    SamplingParams {
        temperature,
        top_p: 1.0,
        top_k: 0,
        repetition_penalty: 1.0,
        max_new_tokens: 6,
        stop_token_ids: bundle.stop_token_ids(),
        suppress_token_ids: Vec::new(),
        seed,
    }
}

/// `n_students` sampled responses and the given teacher answers for `row`, with rewards.
pub fn responses(
    bundle: &Bundle,
    row: &Row,
    position: u64,
    n_students: usize,
    teachers: &[&str],
    temperature: f64,
    policy_version: u64,
) -> Vec<Response> {
    let p = prompt(bundle, row).unwrap();
    let prompts = vec![p; n_students];
    let generations = ril_model::generate(
        &bundle.model,
        &prompts,
        &sampling(temperature, 1000 + position, bundle),
    )
    .unwrap();
    let mut out: Vec<Response> = generations
        .into_iter()
        .map(|g| Response {
            source: ResponseSource::Student,
            token_ids: g.token_ids,
            behaviour_logprobs: g.logprobs,
            policy_version,
            d_prob: 0.0,
            r_sim: 0.0,
            r_ans: 0.0,
            text: String::new(),
        })
        .collect();
    for t in teachers {
        let mut ids = bundle.tokenizer.encode(t, false).unwrap();
        ids.push(bundle.tokenizer.eos_id().unwrap());
        out.push(Response {
            source: ResponseSource::Teacher,
            token_ids: ids,
            behaviour_logprobs: Vec::new(),
            policy_version: 0,
            d_prob: 0.0,
            r_sim: 0.0,
            r_ans: 0.0,
            text: t.to_string(),
        });
    }
    for (i, r) in out.iter_mut().enumerate() {
        let (s, a) = rewards(position, i);
        r.r_sim = s;
        r.r_ans = a;
        r.d_prob = if (position as usize + i).is_multiple_of(3) {
            0.7
        } else {
            0.3
        };
    }
    out
}

/// A model-ready group for `row`.
pub fn group(bundle: &Bundle, row: &Row, position: u64, responses: Vec<Response>) -> Group {
    let p = prompt(bundle, row).unwrap();
    Group {
        position,
        prompt_ids: p.token_ids,
        pixel_values: p.pixel_values,
        responses,
    }
}

/// An incoming (wire-converted) group for `row`.
pub fn incoming(
    row: &Row,
    position: u64,
    iteration: u64,
    responses: Vec<Response>,
) -> IncomingGroup {
    IncomingGroup {
        lease_id: format!("lease-{position}"),
        position,
        iteration,
        row: row.clone(),
        prompt_ids: Vec::new(),
        responses,
        actor_id: "actor-test".into(),
        timings_ms: [("generate".to_string(), 12.0)].into_iter().collect(),
    }
}

/// Every parameter's values.
pub fn weights(model: &Vlm) -> Vec<(String, Vec<f32>)> {
    model
        .named_vars()
        .into_iter()
        .map(|(k, v)| (k, v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()))
        .collect()
}
