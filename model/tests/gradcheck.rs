//! Gradients are not only present but right: analytic gradients match central finite
//! differences for parameters along the whole path (vision tower, projector, decoder, head).

use candle_core::{DType, Device, Tensor};
use ril_model::optim::Gradients;
use ril_model::tokenizer::byte_level_chatml;
use ril_model::toy::{colour_examples, sft_loss};
use ril_model::{Head, LlavaConfig, Vlm};

#[test]
fn analytic_gradients_match_finite_differences() {
    let tok = byte_level_chatml().unwrap();
    let cfg = LlavaConfig::for_tests(tok.vocab_size(), tok.token_id("<image>").unwrap());
    let model = Vlm::new_random(&cfg, Head::LanguageModel, &Device::Cpu, DType::F32, 3).unwrap();
    model
        .init_weights(3, ril_model::vlm::Init::Normal(0.2))
        .unwrap();
    let examples = colour_examples(&tok, &cfg, &Device::Cpu).unwrap();
    let params = model.trainable_vars();
    let loss = sft_loss(&model, &examples).unwrap();
    let grads = Gradients::backward(&loss, &params).unwrap();
    let names = [
        "vision_tower.embeddings.patch_embedding.weight",
        "vision_tower.embeddings.class_embedding",
        "vision_tower.embeddings.position_embedding.weight",
        "vision_tower.pre_layrnorm.weight",
        "vision_tower.encoder.layers.0.self_attn.q_proj.weight",
        "vision_tower.encoder.layers.1.mlp.fc1.weight",
        "vision_tower.encoder.layers.1.layer_norm2.bias",
        "multi_modal_projector.linear_1.weight",
        "multi_modal_projector.linear_2.bias",
        "language_model.model.embed_tokens.weight",
        "language_model.model.layers.0.self_attn.k_proj.weight",
        "language_model.model.layers.1.mlp.down_proj.weight",
        "language_model.model.norm.weight",
        "language_model.lm_head.weight",
    ];
    let eps = 1e-2f32;
    for name in names {
        let var = &params[name];
        let g: Vec<f32> = grads.grads[name].flatten_all().unwrap().to_vec1().unwrap();
        // The element with the largest gradient: finite differences are meaningful there.
        let (idx, &analytic) = g
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
            .unwrap();
        let original: Vec<f32> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let eval_at = |delta: f32| {
            let mut v = original.clone();
            v[idx] += delta;
            var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
            sft_loss(&model, &examples)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64
        };
        let numeric = (eval_at(eps) - eval_at(-eps)) / (2.0 * eps as f64);
        var.set(&Tensor::from_vec(original.clone(), var.shape(), &Device::Cpu).unwrap())
            .unwrap();
        let rel = (numeric - analytic as f64).abs() / (analytic.abs() as f64).max(1e-4);
        assert!(
            rel < 0.05,
            "{name}[{idx}]: analytic {analytic}, numeric {numeric} (relative error {rel})"
        );
    }
}
