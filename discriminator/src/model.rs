//! D itself: the student architecture with a scalar head, its AdamW optimizer and where
//! training stands. No tokio, no tonic: the service runs this on blocking threads.
//!
//! D(q, o) = sigmoid(logit) = P(the response came from the student). Training minimises the
//! binary cross-entropy with student -> 1 and teacher -> 0 (the paper's Eq. 1), written from
//! the logit in the softplus form, `max(x, 0) - y x + log(1 + exp(-|x|))`, which never
//! overflows and is built only from candle ops with a backward pass.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use ril_data::Row;
use ril_model::bundle::Bundle;
use ril_model::image::{ImageProcessor, ImageProcessorConfig, PREPROCESSOR_FILE};
use ril_model::optim::{AdamW, AdamWConfig, Gradients};
use ril_model::score::{ScoreRequest, scalar_scores};
use ril_model::{ChatTokenizer, Head, Vlm};
use tracing::{info, warn};

use crate::checkpoint::{
    DiscriminatorState, OPTIMIZER_FILE, latest_checkpoint, resolve_model_dir, save_atomically,
};
use crate::error::{DiscriminatorError, Result};
use crate::options::DiscriminatorOptions;
use crate::prompt::{EncodedQuestion, PromptSettings, encode_question};

/// One training example: a response to a question, and who wrote it.
#[derive(Debug, Clone)]
pub struct LabelledResponse {
    /// Shared, because a question's images are large and each question has many responses.
    pub question: Arc<Row>,
    pub response: String,
    /// True for a student response (label 1), false for a teacher's (label 0).
    pub from_student: bool,
}

/// What a Train call did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainOutcome {
    /// Mean binary cross-entropy over the batch, before the step. 0 when the call was skipped
    /// as a repeat; the batch's loss without a step when D is frozen.
    pub loss: f32,
    /// D's accuracy on the batch before the step (logit > 0 means "student"); like `loss`.
    pub accuracy: f32,
    /// Optimizer steps done after this call.
    pub step: u64,
    /// No step was taken: the iteration was already trained, or D is frozen.
    pub skipped: bool,
    /// Global gradient norm before clipping (0 when skipped).
    pub grad_norm: f64,
}

/// A batch's loss, accuracy and gradients, computed without changing anything.
#[derive(Debug, Clone)]
pub struct PreparedStep {
    pub loss: f32,
    pub accuracy: f32,
    pub n_items: usize,
    pub gradients: Gradients,
}

/// A batch's loss and accuracy (no gradients).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Evaluation {
    pub loss: f32,
    pub accuracy: f32,
    pub n_items: usize,
}

/// The numerically safe binary cross-entropy of each logit against its 0/1 label
/// (`softplus(x) - y x`), with a backward pass.
pub fn bce_with_logits(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let softplus = (logits.relu()? + (logits.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
    Ok((softplus - (labels * logits)?)?)
}

pub fn sigmoid(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

struct EncodedItem {
    ids: Vec<u32>,
    pixel_values: Option<Tensor>,
    label: f32,
}

/// D, its optimizer and its training state.
pub struct DiscriminatorModel {
    bundle: Bundle,
    optimizer: AdamW,
    prompt: PromptSettings,
    lr: f64,
    frozen: bool,
    micro_batch_size: usize,
    keep_checkpoints: usize,
    last_iteration: Option<u64>,
    /// The step of the newest checkpoint on disk (saving needs only `&self`, so that it can
    /// run while scoring goes on).
    last_saved_step: Mutex<Option<u64>>,
}

impl std::fmt::Debug for DiscriminatorModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiscriminatorModel")
            .field("model", &self.bundle.model)
            .field("step", &self.step())
            .field("last_iteration", &self.last_iteration)
            .field("prompt", &self.prompt)
            .field("frozen", &self.frozen)
            .finish_non_exhaustive()
    }
}

impl DiscriminatorModel {
    /// Resumes from `checkpoint_dir/latest` when `resume` is on and there is one, else builds
    /// D from `init`.
    pub fn load(options: &DiscriminatorOptions, device: &Device) -> Result<Self> {
        options.validate()?;
        if options.resume
            && let Some(root) = &options.checkpoint_dir
            && let Some(dir) = latest_checkpoint(root)?
        {
            return Self::resume(&dir, options, device);
        }
        Self::from_init(options, device)
    }

    /// D from `options.init`: a student directory (LM head dropped, scalar head drawn from
    /// `options.seed`) or a discriminator directory (its head kept). Fresh optimizer, step 0.
    pub fn from_init(options: &DiscriminatorOptions, device: &Device) -> Result<Self> {
        let dir = resolve_model_dir(&options.init)?;
        if !dir.is_dir() {
            return Err(DiscriminatorError::config(
                "init",
                format!(
                    "{} is not a model directory (config.json, model.safetensors, \
                     tokenizer.json, preprocessor_config.json)",
                    dir.display()
                ),
            ));
        }
        let tokenizer = ChatTokenizer::from_dir(&dir)?;
        let processor = ImageProcessor::new(ImageProcessorConfig::from_file(
            &dir.join(PREPROCESSOR_FILE),
        )?)?;
        let (model, report) =
            Vlm::discriminator_from_student(&dir, device, DType::F32, options.seed)?;
        info!(
            init = %dir.display(),
            ignored = ?report.ignored,
            freshly_initialised = ?report.kept_initial,
            "discriminator initialised"
        );
        Self::from_bundle(
            Bundle {
                model,
                tokenizer,
                processor,
            },
            options,
        )
    }

    /// Continues a checkpoint exactly: weights, optimizer moments, step, last iteration.
    pub fn resume(dir: &Path, options: &DiscriminatorOptions, device: &Device) -> Result<Self> {
        let bundle = Bundle::load(dir, Head::Scalar, device, DType::F32)?;
        let mut model = Self::from_bundle(bundle, options)?;
        model.optimizer.load(&dir.join(OPTIMIZER_FILE))?;
        let state = DiscriminatorState::load(dir)?;
        if state.step != model.optimizer.step_count() {
            return Err(DiscriminatorError::Checkpoint {
                path: dir.to_path_buf(),
                reason: format!(
                    "the state says step {} but the optimizer is at step {}",
                    state.step,
                    model.optimizer.step_count()
                ),
            });
        }
        if state.prompt_settings() != model.prompt {
            warn!(
                checkpoint = ?state.prompt_settings(),
                now = ?model.prompt,
                "the discriminator was trained on inputs built differently"
            );
        }
        model.last_iteration = state.last_iteration;
        *model.last_saved_step.get_mut().expect("fresh lock") = Some(state.step);
        info!(checkpoint = %dir.display(), step = state.step, last_iteration = ?state.last_iteration, "discriminator resumed");
        Ok(model)
    }

    /// Wraps a loaded scalar-head bundle (tests build one in memory).
    pub fn from_bundle(bundle: Bundle, options: &DiscriminatorOptions) -> Result<Self> {
        options.validate()?;
        if bundle.model.head() != Head::Scalar {
            return Err(DiscriminatorError::config(
                "init",
                "the model has a language-model head; a discriminator needs the scalar head \
                 (build it with Vlm::discriminator_from_student)",
            ));
        }
        let optimizer = AdamW::new(
            bundle.model.trainable_vars(),
            AdamWConfig {
                lr: options.lr,
                weight_decay: options.weight_decay,
                max_grad_norm: options.grad_clip(),
                ..AdamWConfig::default()
            },
        )?;
        Ok(Self {
            bundle,
            optimizer,
            prompt: PromptSettings {
                include_question: options.include_question,
                include_image: options.include_image,
                max_response_tokens: options.max_response_tokens,
                max_question_tokens: options.max_question_tokens,
            },
            lr: options.lr,
            frozen: options.frozen,
            micro_batch_size: options.micro_batch_size,
            keep_checkpoints: options.keep_checkpoints,
            last_iteration: None,
            last_saved_step: Mutex::new(None),
        })
    }

    pub fn bundle(&self) -> &Bundle {
        &self.bundle
    }
    pub fn prompt_settings(&self) -> &PromptSettings {
        &self.prompt
    }
    pub fn step(&self) -> u64 {
        self.optimizer.step_count()
    }
    pub fn last_iteration(&self) -> Option<u64> {
        self.last_iteration
    }
    pub fn is_frozen(&self) -> bool {
        self.frozen
    }
    pub fn lr(&self) -> f64 {
        self.lr
    }

    /// Whether a Train for `iteration` would be a repeat.
    pub fn already_trained(&self, iteration: u64) -> bool {
        self.last_iteration.is_some_and(|last| iteration <= last)
    }

    /// D's input tokens for `response` to `row` (what [`Self::score`] and training feed it).
    pub fn encode(&self, row: &Row, response: &str) -> Result<Vec<u32>> {
        encode_question(&self.bundle, row, &self.prompt)?.with_response(&self.bundle, response)
    }

    /// P(student) for each response to the question.
    pub fn score(&self, row: &Row, responses: &[String]) -> Result<Vec<f32>> {
        Ok(self
            .score_logits(row, responses)?
            .into_iter()
            .map(sigmoid)
            .collect())
    }

    /// D's logits for each response to the question.
    pub fn score_logits(&self, row: &Row, responses: &[String]) -> Result<Vec<f32>> {
        let question = encode_question(&self.bundle, row, &self.prompt)?;
        let items = responses
            .iter()
            .map(|r| {
                Ok(EncodedItem {
                    ids: question.with_response(&self.bundle, r)?,
                    pixel_values: question.pixel_values.clone(),
                    label: 0.0,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut logits = Vec::with_capacity(items.len());
        for chunk in items.chunks(self.micro_batch_size) {
            logits.extend(self.forward(chunk)?.to_vec1::<f32>()?);
        }
        Ok(logits)
    }

    fn forward(&self, items: &[EncodedItem]) -> Result<Tensor> {
        let requests: Vec<ScoreRequest<'_>> = items
            .iter()
            .map(|item| ScoreRequest {
                prompt_ids: &item.ids,
                response_ids: &[],
                pixel_values: item.pixel_values.as_ref(),
            })
            .collect();
        Ok(scalar_scores(&self.bundle.model, &requests)?.to_dtype(DType::F32)?)
    }

    fn encode_items(&self, items: &[LabelledResponse]) -> Result<Vec<EncodedItem>> {
        // Each question is rendered (and its images preprocessed) once, however many of its
        // responses are in the batch.
        let mut questions: HashMap<*const Row, EncodedQuestion> = HashMap::new();
        items
            .iter()
            .map(|item| {
                let key = Arc::as_ptr(&item.question);
                let q = match questions.entry(key) {
                    Entry::Occupied(e) => e.into_mut(),
                    Entry::Vacant(e) => {
                        e.insert(encode_question(&self.bundle, &item.question, &self.prompt)?)
                    }
                };
                Ok(EncodedItem {
                    ids: q.with_response(&self.bundle, &item.response)?,
                    pixel_values: q.pixel_values.clone(),
                    label: if item.from_student { 1.0 } else { 0.0 },
                })
            })
            .collect()
    }

    /// Loss, accuracy and (when `with_gradients`) gradients over `items`, in micro-batches.
    fn run_batch(
        &self,
        items: &[LabelledResponse],
        with_gradients: bool,
    ) -> Result<(Evaluation, Gradients)> {
        if items.is_empty() {
            return Err(DiscriminatorError::invalid(
                "items",
                "no labelled responses",
            ));
        }
        let encoded = self.encode_items(items)?;
        let n = encoded.len();
        let device = self.bundle.model.device();
        let mut gradients = Gradients::default();
        let mut loss_sum = 0f64;
        let mut correct = 0usize;
        for chunk in encoded.chunks(self.micro_batch_size) {
            let logits = self.forward(chunk)?;
            let labels: Vec<f32> = chunk.iter().map(|i| i.label).collect();
            let label_tensor = Tensor::from_vec(labels.clone(), labels.len(), device)?;
            // Each micro-batch's sum is divided by the whole batch's size, so the accumulated
            // gradient is that of the batch mean.
            let loss = (bce_with_logits(&logits, &label_tensor)?.sum_all()? / n as f64)?;
            let value = loss.to_scalar::<f32>()?;
            if !value.is_finite() {
                return Err(DiscriminatorError::NonFiniteLoss {
                    loss: value,
                    step: self.step() + 1,
                });
            }
            loss_sum += value as f64;
            let logit_values = logits.to_vec1::<f32>()?;
            correct += logit_values
                .iter()
                .zip(&labels)
                .filter(|(logit, label)| (**logit > 0.0) == (**label > 0.5))
                .count();
            if with_gradients {
                let g = Gradients::backward(&loss, self.optimizer.params())?;
                gradients.accumulate(&g, 1.0)?;
            }
        }
        Ok((
            Evaluation {
                loss: loss_sum as f32,
                accuracy: correct as f32 / n as f32,
                n_items: n,
            },
            gradients,
        ))
    }

    /// Loss and accuracy on `items`, without gradients or a step.
    pub fn evaluate(&self, items: &[LabelledResponse]) -> Result<Evaluation> {
        Ok(self.run_batch(items, false)?.0)
    }

    /// The batch's loss, accuracy and gradients; changes nothing. A non-finite loss is an
    /// error.
    pub fn prepare_step(&self, items: &[LabelledResponse]) -> Result<PreparedStep> {
        let (eval, gradients) = self.run_batch(items, true)?;
        Ok(PreparedStep {
            loss: eval.loss,
            accuracy: eval.accuracy,
            n_items: eval.n_items,
            gradients,
        })
    }

    /// One AdamW step with prepared gradients at `lr`, recording `iteration` as trained. A
    /// non-finite gradient is refused before anything changes.
    pub fn apply_step(
        &mut self,
        prepared: &PreparedStep,
        lr: f64,
        iteration: Option<u64>,
    ) -> Result<TrainOutcome> {
        let stats = self.optimizer.step(&prepared.gradients, lr)?;
        if let Some(it) = iteration {
            self.last_iteration = Some(self.last_iteration.map_or(it, |last| last.max(it)));
        }
        Ok(TrainOutcome {
            loss: prepared.loss,
            accuracy: prepared.accuracy,
            step: stats.step,
            skipped: false,
            grad_norm: stats.grad_norm,
        })
    }

    /// What Train answers without stepping (a repeated iteration, or a frozen D), if it does.
    pub fn skip(
        &self,
        items: &[LabelledResponse],
        iteration: Option<u64>,
    ) -> Result<Option<TrainOutcome>> {
        let skipped = |loss, accuracy| TrainOutcome {
            loss,
            accuracy,
            step: self.step(),
            skipped: true,
            grad_norm: 0.0,
        };
        if iteration.is_some_and(|it| self.already_trained(it)) {
            return Ok(Some(skipped(0.0, 0.0)));
        }
        if self.frozen {
            let eval = self.evaluate(items)?;
            return Ok(Some(skipped(eval.loss, eval.accuracy)));
        }
        Ok(None)
    }

    /// One training step on `items` at the configured learning rate; skipped for an
    /// iteration already trained and when D is frozen.
    pub fn train_step(
        &mut self,
        items: &[LabelledResponse],
        iteration: Option<u64>,
    ) -> Result<TrainOutcome> {
        self.train_step_at(items, iteration, self.lr)
    }

    /// [`Self::train_step`] at learning rate `lr` (pre-training's schedule).
    pub fn train_step_at(
        &mut self,
        items: &[LabelledResponse],
        iteration: Option<u64>,
        lr: f64,
    ) -> Result<TrainOutcome> {
        if let Some(outcome) = self.skip(items, iteration)? {
            return Ok(outcome);
        }
        let prepared = self.prepare_step(items)?;
        self.apply_step(&prepared, lr, iteration)
    }

    /// The state saved with the weights.
    pub fn state(&self) -> DiscriminatorState {
        DiscriminatorState {
            step: self.step(),
            last_iteration: self.last_iteration,
            include_question: self.prompt.include_question,
            include_image: self.prompt.include_image,
            max_response_tokens: self.prompt.max_response_tokens,
            max_question_tokens: self.prompt.max_question_tokens,
        }
    }

    /// Writes weights, tokenizer, image processor, optimizer and state into `dir`.
    pub fn write_checkpoint_files(&self, dir: &Path) -> Result<()> {
        self.bundle.save(dir)?;
        self.optimizer.save(&dir.join(OPTIMIZER_FILE))?;
        self.state().save(dir)
    }

    /// Saves a checkpoint under `root` unless the newest one there is already at this step.
    /// Returns the checkpoint's directory when one was written.
    pub fn save_checkpoint(&self, root: &Path) -> Result<Option<PathBuf>> {
        let step = self.step();
        let mut last = self
            .last_saved_step
            .lock()
            .map_err(|_| DiscriminatorError::Task("checkpoint lock poisoned".into()))?;
        if *last == Some(step) {
            return Ok(None);
        }
        let dir = save_atomically(root, step, self.keep_checkpoints, |tmp| {
            self.write_checkpoint_files(tmp)
        })?;
        *last = Some(step);
        info!(dir = %dir.display(), step, "discriminator checkpoint saved");
        Ok(Some(dir))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bce_is_finite_for_extreme_logits_and_its_gradient_is_sigmoid_minus_label() {
        let xs = [-1e4f32, -30.0, -1.0, 0.0, 0.5, 30.0, 1e4];
        for label in [0f32, 1.0] {
            let var = candle_core::Var::new(&xs[..], &Device::Cpu).unwrap();
            let labels = Tensor::new(&vec![label; xs.len()][..], &Device::Cpu).unwrap();
            let loss = bce_with_logits(var.as_tensor(), &labels).unwrap();
            let values = loss.to_vec1::<f32>().unwrap();
            let grads = loss.sum_all().unwrap().backward().unwrap();
            let g = grads
                .get(var.as_tensor())
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for ((x, v), g) in xs.iter().zip(values).zip(g) {
                let x64 = *x as f64;
                let y = label as f64;
                let expected = if x64.abs() > 50.0 {
                    // exp underflows: the loss is ~0 when the logit agrees with the label, |x|
                    // when it does not.
                    if (x64 > 0.0) == (y > 0.5) {
                        0.0
                    } else {
                        x64.abs()
                    }
                } else {
                    let p = 1.0 / (1.0 + (-x64).exp());
                    -(y * p.ln() + (1.0 - y) * (1.0 - p).ln())
                };
                assert!(v.is_finite(), "x {x} label {label}: {v}");
                assert!(
                    (v as f64 - expected).abs() < 1e-4 * expected.max(1.0),
                    "x {x} label {label}: {v} vs {expected}"
                );
                assert!(
                    (g - (sigmoid(*x) - label)).abs() < 1e-6,
                    "x {x} label {label}: gradient {g}"
                );
            }
        }
        assert_eq!(sigmoid(0.0), 0.5);
        assert!(sigmoid(-200.0) >= 0.0 && sigmoid(200.0) <= 1.0);
    }
}
