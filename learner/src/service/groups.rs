//! Groups as they arrive ([`IncomingGroup`]), why one is not taken ([`Rejection`]), the answer to
//! a push ([`Verdict`]), and the checks against the model that turn a group into model inputs
//! ([`GroupPreparer`]).

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use ril_data::Row;
use ril_model::bundle::Bundle;
use ril_model::image::ImageProcessor;
use ril_model::tokenizer::expand_image_tokens;
use ril_model::{ChatTokenizer, LlavaConfig};
use ril_prompt::row_messages;

use crate::grpo::{Group, Response, ResponseSource};

/// A group as it arrives: converted from the wire, not yet checked against the model.
#[derive(Debug, Clone)]
pub struct IncomingGroup {
    pub lease_id: String,
    pub position: u64,
    pub iteration: u64,
    /// The question (with its images) as a dataset row.
    pub row: Row,
    /// The prompt as the actor tokenised it (image placeholders expanded). Empty: the learner
    /// renders it from `row` with the student's chat template.
    pub prompt_ids: Vec<u32>,
    pub responses: Vec<Response>,
    pub actor_id: String,
    /// The actor's phase timings, averaged into the step metrics as `actor_<phase>_ms`.
    pub timings_ms: BTreeMap<String, f64>,
}

/// Why a group was not taken: names the position and the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("group at position {position}: field `{field}`: {problem}")]
pub struct Rejection {
    pub position: u64,
    pub field: String,
    pub problem: String,
}

impl Rejection {
    pub fn new(position: u64, field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            position,
            field: field.into(),
            problem: problem.into(),
        }
    }
}

/// The answer to one pushed group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub position: u64,
    pub accepted: bool,
    pub reason: String,
}

impl Verdict {
    pub(crate) fn accepted(position: u64) -> Self {
        Self {
            position,
            accepted: true,
            reason: String::new(),
        }
    }

    pub(crate) fn refused(position: u64, reason: impl Into<String>) -> Self {
        Self {
            position,
            accepted: false,
            reason: reason.into(),
        }
    }
}

impl From<&Rejection> for Verdict {
    fn from(rejection: &Rejection) -> Self {
        Self::refused(rejection.position, rejection.to_string())
    }
}

/// Checks incoming groups against the model and turns them into model inputs. Holds copies of
/// the tokenizer, image processor and config so groups are checked while a step trains.
#[derive(Debug, Clone)]
pub struct GroupPreparer {
    cfg: LlavaConfig,
    tokenizer: ChatTokenizer,
    processor: ImageProcessor,
    device: Device,
    dtype: DType,
    max_positions: usize,
    teachers_in_group: bool,
}

type Checked<T = ()> = std::result::Result<T, Rejection>;

impl GroupPreparer {
    pub fn new(bundle: &Bundle, teachers_in_group: bool) -> Self {
        Self {
            cfg: bundle.model.config().clone(),
            tokenizer: bundle.tokenizer.clone(),
            processor: bundle.processor.clone(),
            device: bundle.model.device().clone(),
            dtype: bundle.model.dtype(),
            max_positions: bundle.model.max_positions(),
            teachers_in_group,
        }
    }

    /// Validates `g` and builds its model inputs (prompt ids, pixel values).
    pub fn prepare(&self, g: &IncomingGroup) -> Checked<Group> {
        let p = g.position;
        self.check_something_to_train(g)?;
        let prompt_ids = self.prompt_ids(g)?;
        self.check_prompt(g, &prompt_ids)?;
        for (i, r) in g.responses.iter().enumerate() {
            self.check_response(p, i, r, prompt_ids.len())?;
        }
        let pixel_values = self.pixel_values(&g.row).map_err(|(k, e)| {
            Rejection::new(
                p,
                format!("question.images[{k}]"),
                format!("question {:?}: {e}", g.row.id),
            )
        })?;
        Ok(Group {
            position: p,
            prompt_ids,
            pixel_values,
            responses: g.responses.clone(),
        })
    }

    /// At least one response, and at least one that enters the loss.
    fn check_something_to_train(&self, g: &IncomingGroup) -> Checked {
        let p = g.position;
        if g.responses.is_empty() {
            return Err(Rejection::new(p, "responses", "no responses"));
        }
        let in_loss_count = g
            .responses
            .iter()
            .filter(|r| r.source == ResponseSource::Student || self.teachers_in_group)
            .count();
        if in_loss_count == 0 {
            return Err(Rejection::new(
                p,
                "responses",
                "no student responses (teacher responses are not trained on in this run: \
                 teachers_in_group = false)",
            ));
        }
        Ok(())
    }

    /// The actor's prompt ids, or the row rendered with the student's chat template.
    fn prompt_ids(&self, g: &IncomingGroup) -> Checked<Vec<u32>> {
        if !g.prompt_ids.is_empty() {
            return Ok(g.prompt_ids.clone());
        }
        let ids = self
            .tokenizer
            .apply_chat_template(&row_messages(&g.row), true)
            .map_err(|e| Rejection::new(g.position, "question.messages", e.to_string()))?;
        Ok(expand_image_tokens(
            &ids,
            self.cfg.image_token_index,
            self.cfg.image_features_per_image(),
        ))
    }

    /// Every prompt token in the vocabulary, and one placeholder per image feature.
    fn check_prompt(&self, g: &IncomingGroup, prompt_ids: &[u32]) -> Checked {
        let p = g.position;
        let vocab = self.cfg.text_config.vocab_size;
        let image_token = self.cfg.image_token_index;
        if let Some((j, &t)) = prompt_ids
            .iter()
            .enumerate()
            .find(|(_, t)| **t as usize >= vocab)
        {
            return Err(Rejection::new(
                p,
                format!("prompt_token_ids[{j}]"),
                format!("token id {t} is not below the vocabulary size {vocab}"),
            ));
        }
        let placeholders = prompt_ids.iter().filter(|&&t| t == image_token).count();
        let expected = g.row.images.len() * self.cfg.image_features_per_image();
        if placeholders != expected {
            return Err(Rejection::new(
                p,
                "prompt_token_ids",
                format!(
                    "{placeholders} image placeholder tokens, but the question's {} images need \
                     {expected} ({} per image)",
                    g.row.images.len(),
                    self.cfg.image_features_per_image()
                ),
            ));
        }
        Ok(())
    }

    /// Response `i`: tokens the model can take, a length that fits, log-probs for every
    /// student token, finite values.
    fn check_response(&self, p: u64, i: usize, r: &Response, prompt_len: usize) -> Checked {
        let vocab = self.cfg.text_config.vocab_size;
        let image_token = self.cfg.image_token_index;
        let field = |f: &str| format!("responses[{i}].{f}");
        if let Some((j, &t)) = r
            .token_ids
            .iter()
            .enumerate()
            .find(|(_, t)| **t as usize >= vocab || **t == image_token)
        {
            let problem = if t == image_token {
                format!("token id {t} is the image placeholder, which a response cannot hold")
            } else {
                format!("token id {t} is not below the vocabulary size {vocab}")
            };
            return Err(Rejection::new(
                p,
                format!("responses[{i}].token_ids[{j}]"),
                problem,
            ));
        }
        if prompt_len + r.token_ids.len() > self.max_positions {
            return Err(Rejection::new(
                p,
                field("token_ids"),
                format!(
                    "prompt ({prompt_len}) + response ({}) tokens exceed max_position_embeddings {}",
                    r.token_ids.len(),
                    self.max_positions
                ),
            ));
        }
        if r.source == ResponseSource::Student {
            check_behaviour_logprobs(p, i, r)?;
        }
        for (name, v) in [("r_sim", r.r_sim), ("r_ans", r.r_ans), ("d_prob", r.d_prob)] {
            if !v.is_finite() {
                return Err(Rejection::new(p, field(name), format!("{v} is not finite")));
            }
        }
        Ok(())
    }

    fn pixel_values(
        &self,
        row: &Row,
    ) -> std::result::Result<Option<Tensor>, (usize, ril_model::ModelError)> {
        if row.images.is_empty() {
            return Ok(None);
        }
        let mut tensors = Vec::with_capacity(row.images.len());
        for (k, im) in row.images.iter().enumerate() {
            tensors.push(
                self.processor
                    .preprocess_bytes(&im.bytes, &im.name, &self.device)
                    .map_err(|e| (k, e))?,
            );
        }
        let stacked = Tensor::stack(&tensors, 0)
            .and_then(|t| t.to_dtype(self.dtype))
            .map_err(|e| (0, e.into()))?;
        Ok(Some(stacked))
    }
}

/// A student response needs one finite behaviour log-prob per token.
fn check_behaviour_logprobs(p: u64, i: usize, r: &Response) -> Checked {
    if r.behaviour_logprobs.len() != r.token_ids.len() {
        return Err(Rejection::new(
            p,
            format!("responses[{i}].behaviour_logprobs"),
            format!(
                "{} log-probs for {} token ids (a student response needs one per token)",
                r.behaviour_logprobs.len(),
                r.token_ids.len()
            ),
        ));
    }
    if let Some((j, v)) = r
        .behaviour_logprobs
        .iter()
        .enumerate()
        .find(|(_, v)| !v.is_finite())
    {
        return Err(Rejection::new(
            p,
            format!("responses[{i}].behaviour_logprobs[{j}]"),
            format!("{v} is not finite"),
        ));
    }
    Ok(())
}
