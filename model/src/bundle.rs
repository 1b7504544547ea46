//! A model directory as the ecosystem lays it out: `config.json`, `model.safetensors`,
//! `tokenizer.json` (+ `tokenizer_config.json`, `chat_template.jinja`) and
//! `preprocessor_config.json`. Every role loads its model through this.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::error::{ModelError, Result};
use crate::generate::Prompt;
use crate::image::{ImageProcessor, ImageProcessorConfig, PREPROCESSOR_FILE};
use crate::tokenizer::{ChatMessage, ChatTokenizer, expand_image_tokens};
use crate::vlm::{Head, Vlm};

#[derive(Debug)]
pub struct Bundle {
    pub model: Vlm,
    pub tokenizer: ChatTokenizer,
    pub processor: ImageProcessor,
}

impl Bundle {
    pub fn load(dir: &Path, head: Head, device: &Device, dtype: DType) -> Result<Self> {
        if !dir.is_dir() {
            return Err(ModelError::Checkpoint {
                path: dir.to_path_buf(),
                reason: "not a directory (expected config.json, model.safetensors, tokenizer.json, preprocessor_config.json)".into(),
            });
        }
        let tokenizer = ChatTokenizer::from_dir(dir)?;
        let processor = ImageProcessor::new(ImageProcessorConfig::from_file(
            &dir.join(PREPROCESSOR_FILE),
        )?)?;
        let model = Vlm::from_pretrained(dir, head, device, dtype)?;
        let bundle = Self {
            model,
            tokenizer,
            processor,
        };
        bundle.check_consistency(dir)?;
        Ok(bundle)
    }

    /// The tokenizer, the image processor and the model must agree on the image token, the
    /// vocabulary and the image size.
    fn check_consistency(&self, dir: &Path) -> Result<()> {
        let cfg = self.model.config();
        let bad = |reason: String| ModelError::Checkpoint {
            path: dir.to_path_buf(),
            reason,
        };
        if self.tokenizer.vocab_size() > cfg.text_config.vocab_size {
            return Err(bad(format!(
                "the tokenizer has {} tokens but the model's vocab_size is {}",
                self.tokenizer.vocab_size(),
                cfg.text_config.vocab_size
            )));
        }
        if let Some(tok) = self.tokenizer.special_token("image_token")
            && self.tokenizer.token_id(tok) != Some(cfg.image_token_index)
        {
            return Err(bad(format!(
                "the tokenizer's image token {tok:?} has id {:?}, config.json says image_token_index {}",
                self.tokenizer.token_id(tok),
                cfg.image_token_index
            )));
        }
        Ok(())
    }

    pub fn save(&self, dir: &Path) -> Result<()> {
        self.save_as(dir, None)
    }

    /// [`Bundle::save`] with the weights stored in `dtype` (`None`: the model's own).
    pub fn save_as(&self, dir: &Path, dtype: Option<DType>) -> Result<()> {
        crate::checkpoint::save_model_as(&self.model, dir, dtype)?;
        self.tokenizer.save(dir)?;
        self.processor.config.save(&dir.join(PREPROCESSOR_FILE))
    }

    /// Preprocessed pixel values `[N, 3, H, W]` of encoded images; `names` label errors.
    pub fn pixel_values(&self, images: &[(&str, &[u8])]) -> Result<Option<Tensor>> {
        if images.is_empty() {
            return Ok(None);
        }
        let device = self.model.device();
        let tensors = images
            .iter()
            .map(|(name, bytes)| self.processor.preprocess_bytes(bytes, name, device))
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(
            Tensor::stack(&tensors, 0)?.to_dtype(self.model.dtype())?,
        ))
    }

    /// A generation prompt for a conversation whose `<image>` parts refer, in order, to
    /// `images`.
    pub fn prompt(&self, messages: &[ChatMessage], images: &[(&str, &[u8])]) -> Result<Prompt> {
        let cfg = self.model.config();
        let ids = self.tokenizer.apply_chat_template(messages, true)?;
        let n_placeholders = ids.iter().filter(|&&i| i == cfg.image_token_index).count();
        if n_placeholders != images.len() {
            return Err(ModelError::input(format!(
                "the conversation has {n_placeholders} image placeholders but {} images were given",
                images.len()
            )));
        }
        Ok(Prompt {
            token_ids: expand_image_tokens(
                &ids,
                cfg.image_token_index,
                cfg.image_features_per_image(),
            ),
            pixel_values: self.pixel_values(images)?,
        })
    }

    /// The ids that end a response: the tokenizer's eos token and the config's eos ids.
    pub fn stop_token_ids(&self) -> Vec<u32> {
        let mut ids = self.model.config().text_config.eos_token_ids();
        if let Some(e) = self.tokenizer.eos_id()
            && !ids.contains(&e)
        {
            ids.push(e);
        }
        ids
    }
}
