//! Dataset rows as model inputs: the conversation through the chat template with one image part
//! per row image, the target answer tokens ended by the end-of-turn token.

use candle_core::Tensor;
use ril_data::Row;
use ril_data::dataset::Message;
use ril_model::bundle::Bundle;
use ril_model::generate::Prompt;
use ril_model::{ChatMessage, ModelError};

use crate::error::Result;

/// The row's conversation for the chat template. A string question gets one `{"type": "image"}`
/// part per row image before its text (LLaVA's convention) unless it places `<image>` itself.
pub fn row_messages(row: &Row) -> Vec<ChatMessage> {
    let n_images = row.images.len();
    let placeholders = row.image_placeholders();
    row.messages
        .iter()
        .enumerate()
        .map(|(i, Message { role, content })| {
            let first_user = i
                == row
                    .messages
                    .iter()
                    .position(|m| m.role == "user")
                    .unwrap_or(0);
            match content {
                serde_json::Value::String(text)
                    if first_user && placeholders == 0 && n_images > 0 =>
                {
                    ChatMessage::with_images(role, n_images, text)
                }
                _ => ChatMessage {
                    role: role.clone(),
                    content: content.clone(),
                },
            }
        })
        .collect()
}

fn images(row: &Row) -> Vec<(&str, &[u8])> {
    row.images
        .iter()
        .map(|i| (i.name.as_str(), i.bytes.as_slice()))
        .collect()
}

/// The generation prompt of a row.
pub fn prompt(bundle: &Bundle, row: &Row) -> Result<Prompt> {
    bundle
        .prompt(&row_messages(row), &images(row))
        .map_err(|e| with_row(e, row))
}

fn with_row(e: ModelError, row: &Row) -> crate::error::LearnerError {
    crate::error::LearnerError::Row {
        id: row.id.clone(),
        source: e,
    }
}

/// A supervised example: prompt, target tokens (ending with the end-of-turn token), images.
#[derive(Debug, Clone)]
pub struct SupervisedExample {
    pub id: String,
    pub prompt_ids: Vec<u32>,
    pub target_ids: Vec<u32>,
    pub pixel_values: Option<Tensor>,
}

pub fn supervised(bundle: &Bundle, row: &Row, target: &str) -> Result<SupervisedExample> {
    let p = prompt(bundle, row)?;
    let mut target_ids = bundle
        .tokenizer
        .encode(target, false)
        .map_err(|e| with_row(e, row))?;
    let eos = bundle.tokenizer.eos_id().ok_or_else(|| {
        with_row(
            ModelError::Input("the tokenizer has no eos_token to end targets with".into()),
            row,
        )
    })?;
    target_ids.push(eos);
    Ok(SupervisedExample {
        id: row.id.clone(),
        prompt_ids: p.token_ids,
        target_ids,
        pixel_values: p.pixel_values,
    })
}
