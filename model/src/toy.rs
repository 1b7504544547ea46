//! Small, real examples for tests, the self-check and benchmarks: PNG images encoded and decoded
//! through the real pipeline, prompts rendered through the chat template.

use std::io::Cursor;

use candle_core::{Device, Tensor};

use crate::config::LlavaConfig;
use crate::error::{ModelError, Result};
use crate::image::{ImageProcessor, ImageProcessorConfig};
use crate::score::{ScoreRequest, score_tokens};
use crate::tokenizer::{ChatMessage, ChatTokenizer, expand_image_tokens};
use crate::vlm::Vlm;

/// An image + question + answer, tokenised for the model.
#[derive(Debug, Clone)]
pub struct Example {
    pub prompt_ids: Vec<u32>,
    pub answer_ids: Vec<u32>,
    /// `[1, 3, H, W]`.
    pub pixel_values: Tensor,
    pub answer_text: String,
}

impl Example {
    /// The example's question as a generation prompt.
    pub fn prompt(&self) -> crate::generate::Prompt {
        crate::generate::Prompt {
            token_ids: self.prompt_ids.clone(),
            pixel_values: Some(self.pixel_values.clone()),
        }
    }

    /// The example's answer, to score under its question.
    pub fn score_request(&self) -> ScoreRequest<'_> {
        ScoreRequest {
            prompt_ids: &self.prompt_ids,
            response_ids: &self.answer_ids,
            pixel_values: Some(&self.pixel_values),
        }
    }
}

/// A `w x h` PNG filled with `rgb`, with a centred square of `inner` when given.
pub fn square_png(w: u32, h: u32, background: [u8; 3], inner: Option<[u8; 3]>) -> Result<Vec<u8>> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        let inside = x >= w / 4 && x < 3 * w / 4 && y >= h / 4 && y < 3 * h / 4;
        match (inner, inside) {
            (Some(c), true) => image::Rgb(c),
            _ => image::Rgb(background),
        }
    });
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .map_err(|e| ModelError::Image {
            name: "generated square".into(),
            reason: e.to_string(),
        })?;
    Ok(out.into_inner())
}

/// Tokenises one example: the chat-templated prompt (one image, then the question) with the
/// `<image>` placeholder expanded, and the answer followed by the end-of-turn token.
pub fn encode_example(
    tok: &ChatTokenizer,
    processor: &ImageProcessor,
    cfg: &LlavaConfig,
    png: &[u8],
    question: &str,
    answer: &str,
    device: &Device,
) -> Result<Example> {
    let prompt = tok.apply_chat_template(&[ChatMessage::with_images("user", 1, question)], true)?;
    let prompt_ids = expand_image_tokens(
        &prompt,
        cfg.image_token_index,
        cfg.image_features_per_image(),
    );
    let mut answer_ids = tok.encode(answer, false)?;
    answer_ids.push(tok.eos_id().ok_or_else(|| ModelError::Tokenizer {
        what: "tokenizer".into(),
        reason: "no eos_token to end the answer with".into(),
    })?);
    let pixel_values = processor
        .preprocess_bytes(png, "generated square", device)?
        .unsqueeze(0)?;
    Ok(Example {
        prompt_ids,
        answer_ids,
        pixel_values,
        answer_text: answer.to_string(),
    })
}

/// Four "what colour is the square?" examples with different colours.
pub fn colour_examples(
    tok: &ChatTokenizer,
    cfg: &LlavaConfig,
    device: &Device,
) -> Result<Vec<Example>> {
    let side = cfg.vision_config.image_size as u32;
    let processor = ImageProcessor::new(ImageProcessorConfig::clip(side))?;
    let colours = [
        ("red", [220, 30, 30]),
        ("green", [30, 200, 40]),
        ("blue", [30, 40, 220]),
        ("yellow", [230, 220, 30]),
    ];
    colours
        .iter()
        .map(|(name, rgb)| {
            let png = square_png(side, side, [255, 255, 255], Some(*rgb))?;
            encode_example(
                tok,
                &processor,
                cfg,
                &png,
                "What colour is the square?",
                name,
                device,
            )
        })
        .collect()
}

/// Mean negative log-likelihood per answer token (supervised fine-tuning loss).
pub fn sft_loss(model: &Vlm, examples: &[Example]) -> Result<Tensor> {
    let requests: Vec<ScoreRequest<'_>> = examples.iter().map(Example::score_request).collect();
    let scores = score_tokens(model, &requests, 1.0)?;
    let n_tokens: usize = scores.response_lengths.iter().sum();
    Ok((scores.logprobs.sum_all()?.neg()? / n_tokens as f64)?)
}
