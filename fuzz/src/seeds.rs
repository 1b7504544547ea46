//! The binary seeds of the corpus (protobuf messages, weight chunks, safetensors, images),
//! generated so they stay valid when the messages change: `ril-fuzz make-seeds` rewrites the
//! files named `gen-*` under `fuzz/corpus/`. Text seeds (TOML, JSONL, answers) are written by
//! hand and committed as they are.

use std::collections::BTreeMap;
use std::path::Path;

use bytes::Bytes;
use prost::Message;
use ril_proto::v1;
use sha2::Digest;

use crate::corpus_dir;

fn png() -> Vec<u8> {
    ril_model::toy::square_png(8, 8, [255, 255, 255], Some([20, 200, 20])).unwrap()
}

fn question(id: &str) -> v1::Question {
    v1::Question {
        id: id.into(),
        messages: vec![v1::ChatMessage {
            role: "user".into(),
            text: "What colour is the square?".into(),
            parts_json: String::new(),
        }],
        images: vec![v1::Image {
            name: format!("{id}.png"),
            data: Bytes::from(png()),
        }],
        reference: "green".into(),
        answer_type: "exact".into(),
        family: "colour".into(),
    }
}

fn structured_question() -> v1::Question {
    v1::Question {
        id: "q-parts".into(),
        messages: vec![
            v1::ChatMessage {
                role: "system".into(),
                text: "Answer briefly.".into(),
                parts_json: String::new(),
            },
            v1::ChatMessage {
                role: "user".into(),
                text: String::new(),
                parts_json: r#"[{"type":"image"},{"type":"text","text":"How many?"}]"#.into(),
            },
        ],
        images: vec![v1::Image {
            name: String::new(),
            data: Bytes::from(png()),
        }],
        reference: "3".into(),
        answer_type: "number".into(),
        family: String::new(),
    }
}

fn response(
    source: v1::ResponseSource,
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
) -> v1::ScoredResponse {
    v1::ScoredResponse {
        source: source as i32,
        token_ids: tokens,
        behaviour_logprobs: logprobs,
        policy_version: 0,
        d_prob: 0.5,
        r_sim: 1.0,
        r_ans: 0.0,
        text: "green".into(),
        ..Default::default()
    }
}

fn group(position: u64) -> v1::ScoredGroup {
    v1::ScoredGroup {
        lease_id: "lease-1".into(),
        position,
        iteration: 0,
        question: Some(question(&format!("q{position}"))),
        prompt_token_ids: Vec::new(),
        responses: vec![
            response(
                v1::ResponseSource::Student,
                vec![5, 6, 7],
                vec![-0.1, -0.2, -0.3],
            ),
            response(v1::ResponseSource::Teacher, vec![8, 9], Vec::new()),
        ],
        actor_id: "actor-0".into(),
        timings_ms: BTreeMap::from([("generation".to_string(), 12.5)])
            .into_iter()
            .collect(),
    }
}

fn sampling() -> v1::SamplingSettings {
    v1::SamplingSettings {
        temperature: 1.0,
        top_p: 0.9,
        top_k: 20,
        repetition_penalty: 1.1,
        max_new_tokens: 16,
        seed: 7,
    }
}

fn chunks(payload: &[u8], chunk: usize, version: u64) -> Vec<u8> {
    let sha: [u8; 32] = sha2::Sha256::digest(payload).into();
    let n = payload.len().div_ceil(chunk).max(1);
    let mut out = Vec::new();
    for i in 0..n {
        let start = i * chunk;
        let end = (start + chunk).min(payload.len());
        v1::WeightChunk {
            version: Some(v1::PolicyVersion { version }),
            offset: start as u64,
            total_bytes: payload.len() as u64,
            data: Bytes::copy_from_slice(&payload[start..end]),
            sha256: if i + 1 == n {
                Bytes::copy_from_slice(&sha)
            } else {
                Bytes::new()
            },
        }
        .encode_length_delimited(&mut out)
        .unwrap();
    }
    out
}

/// A small safetensors file: `name` with the given shape, f32 zeros.
fn safetensors(tensors: &[(&str, &[usize])]) -> Vec<u8> {
    let map: std::collections::HashMap<String, candle_core::Tensor> = tensors
        .iter()
        .map(|(n, shape)| {
            (
                n.to_string(),
                candle_core::Tensor::zeros(
                    *shape,
                    candle_core::DType::F32,
                    &candle_core::Device::Cpu,
                )
                .unwrap(),
            )
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.safetensors");
    candle_core::safetensors::save(&map, &path).unwrap();
    std::fs::read(path).unwrap()
}

fn write(target: &str, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let dir = corpus_dir(target);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join(format!("gen-{name}")), bytes)
}

/// Rewrites every generated seed.
pub fn write_all() -> std::io::Result<()> {
    write_message_seeds()?;
    write_weight_seeds()?;
    write_file_seeds()
}

/// Questions, scored groups, answer requests and sampling settings.
fn write_message_seeds() -> std::io::Result<()> {
    write("proto_question", "plain", &question("q-1").encode_to_vec())?;
    write(
        "proto_question",
        "parts",
        &structured_question().encode_to_vec(),
    )?;
    let mut empty_image = question("q-2");
    empty_image.images[0].data = Bytes::new();
    write(
        "proto_question",
        "empty-image",
        &empty_image.encode_to_vec(),
    )?;

    let push = v1::PushGroupsRequest {
        groups: vec![group(0), group(1)],
    };
    write("proto_scored_groups", "two-groups", &push.encode_to_vec())?;
    let mut bad = group(2);
    bad.responses[0].behaviour_logprobs.pop();
    bad.responses[0].r_sim = f32::NAN;
    bad.responses[1].source = 7;
    let push = v1::PushGroupsRequest { groups: vec![bad] };
    write("proto_scored_groups", "bad-group", &push.encode_to_vec())?;

    let answer = v1::AnswerRequest {
        question: Some(question("q-3")),
        n: 4,
        sampling: Some(sampling()),
    };
    write(
        "proto_answer_request",
        "with-sampling",
        &answer.encode_to_vec(),
    )?;
    let answer = v1::AnswerRequest {
        question: Some(structured_question()),
        n: 1,
        sampling: None,
    };
    write(
        "proto_answer_request",
        "no-sampling",
        &answer.encode_to_vec(),
    )?;

    write("proto_sampling", "paper", &sampling().encode_to_vec())?;
    let zeros = v1::SamplingSettings {
        max_new_tokens: 8,
        ..Default::default()
    };
    write("proto_sampling", "greedy", &zeros.encode_to_vec())
}

/// Weight transfers and checkpoint bytes.
fn write_weight_seeds() -> std::io::Result<()> {
    let payload = safetensors(&[("score.weight", &[1, 4])]);
    write(
        "proto_weight_chunks",
        "one-chunk",
        &chunks(&payload, 1 << 20, 3),
    )?;
    write(
        "proto_weight_chunks",
        "many-chunks",
        &chunks(&payload, 64, 4),
    )?;
    // The crash the fuzzer found: a first chunk announcing 64 GiB (the assembler reserved it).
    let mut huge = Vec::new();
    v1::WeightChunk {
        version: Some(v1::PolicyVersion { version: 1 }),
        offset: 0,
        total_bytes: 64 << 30,
        data: Bytes::from_static(b"0123456789abcdef"),
        sha256: Bytes::new(),
    }
    .encode_length_delimited(&mut huge)
    .unwrap();
    write("proto_weight_chunks", "huge-announced-size", &huge)?;

    write(
        "checkpoint_bytes",
        "wrong-shape",
        &safetensors(&[
            ("language_model.lm_head.weight", &[2, 2]),
            ("score.weight", &[1, 64]),
        ]),
    )?;
    write(
        "checkpoint_bytes",
        "unknown-tensor",
        &safetensors(&[("not.a.tensor", &[3])]),
    )
}

/// Images and Parquet files (generated, and the repository's own fixtures).
fn write_file_seeds() -> std::io::Result<()> {
    let png = png();
    write("image", "square.png", &png)?;
    write("image", "truncated.png", &png[..png.len() / 2])?;
    let fixtures =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../model/tests/fixtures/image_preproc");
    for f in ["rgb_30x50.jpg", "rgba_40x30.png", "gray_24x24.png"] {
        write("image", f, &std::fs::read(fixtures.join(f))?)?;
    }
    let parquet = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/tests/fixtures");
    for f in ["verl_tiny.parquet", "verl_tiny_text.parquet"] {
        write("parquet_rows", f, &std::fs::read(parquet.join(f))?)?;
    }
    Ok(())
}
