//! How a dataset row becomes a model's input — the one home of that rule, used by the actor
//! (the student's rollouts), the learner (SFT, evaluation, the re-check of pushed prompts), the
//! discriminator (its pre-training's student answers) and the teacher servers (the candle
//! backend's prompts, the OpenAI backend's choice of where a row's images go). The student, D
//! and the teachers therefore see the same conversation for the same row.
//!
//! The rule (LLaVA's convention, as transformers' processors apply it):
//! - a message whose content already places images (`<image>` in a string, `{"type": "image"}`
//!   parts) is left as it is, and the row's images fill those places in order;
//! - otherwise the row's images go, as image parts before the text, on the **first user turn**
//!   when its content is a string; a row without a user turn gets them on no message, so a row
//!   with images and no user turn is refused by [`prompt`] ("N images but 0 placeholders")
//!   rather than having its images silently put on a system or assistant turn.
//!
//! **Architecture invariant:** no gRPC and no async; this crate sits between `model`/`data`
//! and the roles.

use candle_core::Tensor;
use ril_data::Row;
use ril_model::bundle::Bundle;
use ril_model::generate::Prompt;
use ril_model::tokenizer::ChatTokenizer;
use ril_model::{ChatMessage, ModelError};
use serde_json::Value;

/// A row the model cannot take, with the row's id.
#[derive(Debug, thiserror::Error)]
#[error("row {id}: {source}")]
pub struct PromptError {
    pub id: String,
    /// Boxed: a model error is large, and a row's error travels up through every role's own.
    #[source]
    pub source: Box<ModelError>,
}

impl PromptError {
    fn new(row: &Row, source: ModelError) -> Self {
        Self {
            id: row.id.clone(),
            source: Box::new(source),
        }
    }
}

pub type Result<T, E = PromptError> = std::result::Result<T, E>;

/// The index of the message that gets the row's images as leading image parts, or `None` when
/// no message does (the row has no images, places them itself, or has no user turn whose
/// content is a string).
pub fn image_turn(row: &Row) -> Option<usize> {
    if row.images.is_empty() || row.image_placeholders() > 0 {
        return None;
    }
    let first_user = row.messages.iter().position(|m| m.role == "user")?;
    matches!(row.messages[first_user].content, Value::String(_)).then_some(first_user)
}

/// The row's conversation for a chat template, images placed by the rule above.
pub fn row_messages(row: &Row) -> Vec<ChatMessage> {
    let image_turn = image_turn(row);
    row.messages
        .iter()
        .enumerate()
        .map(|(i, message)| match (&message.content, image_turn) {
            (Value::String(text), Some(turn)) if turn == i => {
                ChatMessage::with_images(&message.role, row.images.len(), text)
            }
            (content, _) => ChatMessage {
                role: message.role.clone(),
                content: content.clone(),
            },
        })
        .collect()
}

/// The row's encoded images with their names, in the order the conversation refers to them.
pub fn row_images(row: &Row) -> Vec<(&str, &[u8])> {
    row.images
        .iter()
        .map(|image| (image.name.as_str(), image.bytes.as_slice()))
        .collect()
}

/// The generation prompt of a row: the conversation through the chat template with the
/// generation prompt appended, image placeholders expanded, images preprocessed.
pub fn prompt(bundle: &Bundle, row: &Row) -> Result<Prompt> {
    bundle
        .prompt(&row_messages(row), &row_images(row))
        .map_err(|e| PromptError::new(row, e))
}

/// [`prompt`], refused when the prompt plus `max_new_tokens` does not fit the model's context
/// (a teacher or an actor would otherwise fail half-way through generating).
pub fn prompt_within_context(bundle: &Bundle, row: &Row, max_new_tokens: usize) -> Result<Prompt> {
    let prompt = prompt(bundle, row)?;
    let context = bundle.model.max_positions();
    let needed = prompt.token_ids.len() + max_new_tokens;
    if needed > context {
        return Err(PromptError::new(
            row,
            ModelError::Input(format!(
                "a prompt of {} tokens plus max_new_tokens {max_new_tokens} exceeds the model's \
                 context of {context} tokens",
                prompt.token_ids.len()
            )),
        ));
    }
    Ok(prompt)
}

/// An answer as the model would have produced it: its text under `tokenizer`, ended by the
/// end-of-turn token. SFT targets and teacher answers in a group are both made this way, so
/// the student learns to stop where a teacher stopped.
pub fn answer_ids(
    tokenizer: &ChatTokenizer,
    text: &str,
) -> std::result::Result<Vec<u32>, ModelError> {
    let mut ids = tokenizer.encode(text, false)?;
    let eos = tokenizer.eos_id().ok_or_else(|| {
        ModelError::Input("the tokenizer has no eos_token to end answers with".into())
    })?;
    ids.push(eos);
    Ok(ids)
}

/// A supervised example: prompt, target tokens (ending with the end-of-turn token), images.
#[derive(Debug, Clone)]
pub struct SupervisedExample {
    pub id: String,
    pub prompt_ids: Vec<u32>,
    pub target_ids: Vec<u32>,
    pub pixel_values: Option<Tensor>,
}

/// The row's prompt with `target` as the answer to learn.
pub fn supervised(bundle: &Bundle, row: &Row, target: &str) -> Result<SupervisedExample> {
    let prompt = prompt(bundle, row)?;
    let target_ids = answer_ids(&bundle.tokenizer, target).map_err(|e| PromptError::new(row, e))?;
    Ok(SupervisedExample {
        id: row.id.clone(),
        prompt_ids: prompt.token_ids,
        target_ids,
        pixel_values: prompt.pixel_values,
    })
}
