//! Logits of the real loader + model equal transformers' on tiny random LLaVA checkpoints
//! (fixtures from tools/parity/make_fixtures.py), for a Llama decoder (untied head, quick-GELU
//! vision tower, `default` feature selection at layer -2) and a Qwen2 decoder (attention biases,
//! tied head, GELU vision tower, `full` selection over layers [-3, -1]), with a left-padded row.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use ril_model::vlm::{ForwardInput, Head, Vlm};

const TOLERANCE: f32 = 1e-4;

fn parity_inputs(dir: &Path) -> BTreeMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("parity.safetensors"), &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect()
}

/// Max |ours - transformers| over the non-pad positions.
fn max_logit_diff(model: &Vlm, inputs: &BTreeMap<String, Tensor>) -> f32 {
    let ids = inputs["input_ids"].to_dtype(DType::U32).unwrap();
    let positions = inputs["position_ids"].to_dtype(DType::U32).unwrap();
    let mask: Vec<Vec<i64>> = inputs["attention_mask"].to_vec2().unwrap();
    let key_valid: Vec<Vec<u8>> = mask
        .iter()
        .map(|r| r.iter().map(|&m| m as u8).collect())
        .collect();
    let px = &inputs["pixel_values"];
    let hidden = model
        .forward_hidden(
            &ForwardInput {
                input_ids: &ids,
                positions: &positions,
                key_valid: &key_valid,
                pixel_values: Some(px),
            },
            None,
        )
        .unwrap();
    let ours: Vec<Vec<Vec<f32>>> = model.lm_logits(&hidden).unwrap().to_vec3().unwrap();
    let theirs: Vec<Vec<Vec<f32>>> = inputs["logits"].to_vec3().unwrap();
    let mut max = 0f32;
    for (b, row) in mask.iter().enumerate() {
        for (t, &m) in row.iter().enumerate() {
            if m == 1 {
                for (a, e) in ours[b][t].iter().zip(&theirs[b][t]) {
                    max = max.max((a - e).abs());
                }
            }
        }
    }
    max
}

fn check(name: &str) {
    let dir = common::fixtures().join(name);
    let model = Vlm::from_pretrained(&dir, Head::LanguageModel, &Device::Cpu, DType::F32).unwrap();
    let diff = max_logit_diff(&model, &parity_inputs(&dir));
    assert!(
        diff <= TOLERANCE,
        "{name}: max |logit diff| {diff} > {TOLERANCE}"
    );
}

#[test]
fn llama_decoder_matches_transformers() {
    check("llava_llama");
}

#[test]
fn qwen2_decoder_matches_transformers() {
    check("llava_qwen2");
}

/// Writes the fixture's tensors under the names of an older layout and checks the loader maps
/// them back: the same logits, bit for bit.
fn reload_renamed(name: &str, rename: impl Fn(&str) -> String) {
    let dir = common::fixtures().join(name);
    let tensors =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let renamed: BTreeMap<String, Tensor> =
        tensors.into_iter().map(|(k, v)| (rename(&k), v)).collect();
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(dir.join("config.json"), tmp.path().join("config.json")).unwrap();
    std::fs::write(
        tmp.path().join("model.safetensors"),
        ril_model::checkpoint::safetensors_bytes(&renamed, None).unwrap(),
    )
    .unwrap();
    let a = Vlm::from_pretrained(&dir, Head::LanguageModel, &Device::Cpu, DType::F32).unwrap();
    let b =
        Vlm::from_pretrained(tmp.path(), Head::LanguageModel, &Device::Cpu, DType::F32).unwrap();
    let inputs = parity_inputs(&dir);
    assert_eq!(max_logit_diff(&a, &inputs), max_logit_diff(&b, &inputs));
    for ((na, va), (nb, vb)) in a.named_vars().iter().zip(b.named_vars().iter()) {
        assert_eq!(na, nb);
        let d = (va.as_tensor() - vb.as_tensor())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0, "{na}");
    }
}

#[test]
fn loads_the_hub_llava_layout() {
    // llava-hf uploads: `vision_tower.vision_model.*`.
    reload_renamed("llava_llama", |k| {
        k.strip_prefix("vision_tower.").map_or_else(
            || k.to_string(),
            |r| format!("vision_tower.vision_model.{r}"),
        )
    });
}

#[test]
fn loads_the_transformers_4_5x_layout() {
    reload_renamed("llava_llama", |k| {
        if k == "language_model.lm_head.weight" {
            "lm_head.weight".into()
        } else if let Some(r) = k.strip_prefix("language_model.model.") {
            format!("model.language_model.{r}")
        } else if let Some(r) = k.strip_prefix("vision_tower.") {
            format!("model.vision_tower.vision_model.{r}")
        } else {
            format!("model.{k}")
        }
    });
}

#[test]
fn saved_checkpoint_keeps_transformers_names_and_config() {
    let dir = common::fixtures().join("llava_qwen2");
    let model = Vlm::from_pretrained(&dir, Head::LanguageModel, &Device::Cpu, DType::F32).unwrap();
    let out = tempfile::tempdir().unwrap();
    model.save_pretrained(out.path()).unwrap();
    let names = |p: &Path| -> Vec<String> {
        let mut v: Vec<String> =
            candle_core::safetensors::load(p.join("model.safetensors"), &Device::Cpu)
                .unwrap()
                .into_keys()
                .collect();
        v.sort();
        v
    };
    assert_eq!(names(&dir), names(out.path()));
    let cfg_in: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let cfg_out: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg_in, cfg_out, "config.json must round-trip unchanged");
}
