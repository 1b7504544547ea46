//! The discriminator's settings, as the run's TOML writes them (`[discriminator]`), validated
//! once.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{DiscriminatorError, Result};
use crate::judge::JudgeConfig;

/// Which judge gives the answer reward.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", from = "JudgeBackendToml")]
pub enum JudgeBackend {
    /// `ril_data::answer::check` against the question's reference and answer type.
    #[default]
    Rule,
    /// An OpenAI-compatible LLM judge (the paper's Qwen2.5-32B setup).
    Llm(JudgeConfig),
}

/// What the TOML holds. A unit variant of an internally tagged enum ignores unknown keys, so
/// the rule judge is an empty struct variant here: `kind = "rule"` with a stray key (a leftover
/// `model = ...`) is refused instead of silently meaning the rule judge.
#[derive(Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
enum JudgeBackendToml {
    Rule {},
    Llm(JudgeConfig),
}

impl From<JudgeBackendToml> for JudgeBackend {
    fn from(t: JudgeBackendToml) -> Self {
        match t {
            JudgeBackendToml::Rule {} => Self::Rule,
            JudgeBackendToml::Llm(cfg) => Self::Llm(cfg),
        }
    }
}

/// Everything the discriminator service needs, the device included. Keys and defaults:
///
/// ```toml
/// [discriminator]
/// init = "checkpoints/sft"            # a student model dir, or a (pre-trained) D dir
/// checkpoint_dir = "runs/r1/discriminator"
/// resume = true                       # continue from checkpoint_dir/latest when present
/// lr = 1e-5
/// weight_decay = 0.0
/// max_grad_norm = 1.0
/// frozen = false
/// include_question = true
/// include_image = false
/// max_response_tokens = 512
/// max_question_tokens = 256
/// save_every = 50
/// keep_checkpoints = 2
/// max_responses = 64
/// max_train_items = 1024
/// micro_batch_size = 16
/// seed = 0
/// max_message_bytes = 67108864
/// device = "cpu"                      # or cuda / cuda:N
///
/// [discriminator.judge]
/// kind = "rule"                       # or "llm" with JudgeConfig's keys:
/// # kind = "llm"
/// # base_url = "http://judge:8000/v1"
/// # model = "Qwen/Qwen2.5-32B-Instruct"
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiscriminatorOptions {
    /// Where D's weights come from when there is nothing to resume: a student checkpoint
    /// directory (its LM head is dropped and a fresh scalar head is drawn from `seed`), or a
    /// discriminator directory (a pre-training result: its scalar head is kept). A checkpoint
    /// directory with a `latest` file is followed to that checkpoint. Only the weights are
    /// taken: the optimizer starts fresh at step 0.
    pub init: PathBuf,
    /// Where D's own checkpoints go (`step-00000042/` directories and a `latest` file). None:
    /// D is never saved.
    #[serde(default)]
    pub checkpoint_dir: Option<PathBuf>,
    /// Continue from `checkpoint_dir/latest` (weights, optimizer moments, step, last trained
    /// iteration) when it exists, instead of starting from `init`.
    #[serde(default = "default_true")]
    pub resume: bool,
    /// AdamW learning rate (constant during RIL).
    #[serde(default = "default_lr")]
    pub lr: f64,
    #[serde(default)]
    pub weight_decay: f64,
    /// Global gradient-norm clip; 0: no clipping.
    #[serde(default = "default_max_grad_norm")]
    pub max_grad_norm: f64,
    /// The ablation "frozen discriminator": Train is always skipped and the weights never
    /// change.
    #[serde(default)]
    pub frozen: bool,
    /// D sees the question's text (default, ours: the paper does not say).
    #[serde(default = "default_true")]
    pub include_question: bool,
    /// D sees the question's images, as pixel values like the student sees them.
    #[serde(default)]
    pub include_image: bool,
    /// Responses longer than this many tokens are cut to their last `max_response_tokens`
    /// tokens: the end of a response (its final answer, how it closes, whether it was cut off)
    /// is where student and teacher differ most reliably, and the scalar head reads the last
    /// token.
    #[serde(default = "default_max_response_tokens")]
    pub max_response_tokens: usize,
    /// Question texts longer than this are cut to their first `max_question_tokens` tokens
    /// (the question comes first; the response is what D judges).
    #[serde(default = "default_max_question_tokens")]
    pub max_question_tokens: usize,
    #[serde(default)]
    pub judge: JudgeBackend,
    /// Save a checkpoint every this many optimizer steps (0: only on shutdown).
    #[serde(default = "default_save_every")]
    pub save_every: u64,
    /// Checkpoints kept in `checkpoint_dir` (the newest ones; at least 1).
    #[serde(default = "default_keep_checkpoints")]
    pub keep_checkpoints: usize,
    /// Most responses one Score request may carry.
    #[serde(default = "default_max_responses")]
    pub max_responses: usize,
    /// Most items one Train request may carry.
    #[serde(default = "default_max_train_items")]
    pub max_train_items: usize,
    /// Sequences per forward pass, for scoring and for training (gradients are accumulated
    /// over micro-batches: the step is the same as one pass over the whole batch).
    #[serde(default = "default_micro_batch_size")]
    pub micro_batch_size: usize,
    /// Seeds the scalar head's initialisation when D starts from a student.
    #[serde(default)]
    pub seed: u64,
    /// Largest gRPC message accepted or sent (Train requests carry every item's question,
    /// images included).
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// Where D's weights, optimizer state and batches live: `cpu`, `cuda` or `cuda:N`.
    /// Default: `[run] device`, else `cpu`.
    #[serde(default = "default_device")]
    pub device: String,
}

fn default_true() -> bool {
    true
}
fn default_lr() -> f64 {
    1e-5
}
fn default_max_grad_norm() -> f64 {
    1.0
}
fn default_max_response_tokens() -> usize {
    512
}
fn default_max_question_tokens() -> usize {
    256
}
fn default_save_every() -> u64 {
    50
}
fn default_keep_checkpoints() -> usize {
    2
}
fn default_max_responses() -> usize {
    64
}
fn default_max_train_items() -> usize {
    1024
}
fn default_micro_batch_size() -> usize {
    16
}
fn default_device() -> String {
    "cpu".into()
}
fn default_max_message_bytes() -> usize {
    ril_proto::server::DEFAULT_MAX_MESSAGE_BYTES
}

impl DiscriminatorOptions {
    /// The defaults, starting from `init`.
    pub fn new(init: impl Into<PathBuf>) -> Self {
        Self {
            init: init.into(),
            checkpoint_dir: None,
            resume: true,
            lr: default_lr(),
            weight_decay: 0.0,
            max_grad_norm: default_max_grad_norm(),
            frozen: false,
            include_question: true,
            include_image: false,
            max_response_tokens: default_max_response_tokens(),
            max_question_tokens: default_max_question_tokens(),
            judge: JudgeBackend::Rule,
            save_every: default_save_every(),
            keep_checkpoints: default_keep_checkpoints(),
            max_responses: default_max_responses(),
            max_train_items: default_max_train_items(),
            micro_batch_size: default_micro_batch_size(),
            seed: 0,
            max_message_bytes: default_max_message_bytes(),
            device: default_device(),
        }
    }

    /// Settings for tests on test-size models: a learning rate that moves a tiny model in a
    /// few steps, short limits, no periodic saves.
    pub fn for_test(init: impl Into<PathBuf>) -> Self {
        Self {
            lr: 1e-3,
            max_response_tokens: 64,
            max_question_tokens: 64,
            save_every: 0,
            micro_batch_size: 8,
            ..Self::new(init)
        }
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |field, problem: &str| Err(DiscriminatorError::config(field, problem));
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return bad("lr", "must be finite and >= 0");
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad("weight_decay", "must be finite and >= 0");
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0) {
            return bad("max_grad_norm", "must be finite and >= 0 (0: no clipping)");
        }
        for (field, value) in [
            ("max_response_tokens", self.max_response_tokens),
            ("max_responses", self.max_responses),
            ("max_train_items", self.max_train_items),
            ("micro_batch_size", self.micro_batch_size),
            ("keep_checkpoints", self.keep_checkpoints),
            ("max_message_bytes", self.max_message_bytes),
        ] {
            if value == 0 {
                return bad(field, "must be at least 1");
            }
        }
        if self.include_question && self.max_question_tokens == 0 {
            return bad(
                "max_question_tokens",
                "must be at least 1 when include_question is on",
            );
        }
        if let JudgeBackend::Llm(cfg) = &self.judge {
            cfg.validate()?;
        }
        // The form only: the device is opened where D runs (`open_device`).
        self.device_spec()?;
        Ok(())
    }

    /// `device` parsed, not opened.
    pub fn device_spec(&self) -> Result<ril_model::DeviceSpec> {
        (self.device.parse()).map_err(|error| DiscriminatorError::Device { error })
    }

    /// Opens `device`.
    pub fn open_device(&self) -> Result<candle_core::Device> {
        (self.device_spec()?.open(&self.device))
            .map_err(|error| DiscriminatorError::Device { error })
    }

    /// The clipping norm as the optimizer takes it.
    pub fn grad_clip(&self) -> Option<f64> {
        (self.max_grad_norm > 0.0).then_some(self.max_grad_norm)
    }

    /// The judge's name as Score and Info report it: `rule`, or `llm:<model>`.
    pub fn judge_name(&self) -> String {
        match &self.judge {
            JudgeBackend::Rule => "rule".into(),
            JudgeBackend::Llm(cfg) => format!("llm:{}", cfg.model),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_with_defaults_and_an_llm_judge_parses() {
        let text = r#"
            init = "sft"
            checkpoint_dir = "runs/d"
            lr = 2e-6
            include_image = true
            [judge]
            kind = "llm"
            base_url = "http://127.0.0.1:8000/v1"
            model = "judge-32b"
            timeout = 30
        "#;
        let o: DiscriminatorOptions = toml::from_str(text).unwrap();
        assert_eq!(o.init, PathBuf::from("sft"));
        assert_eq!(o.lr, 2e-6);
        assert!(o.include_question && o.include_image && o.resume && !o.frozen);
        assert_eq!(o.max_response_tokens, 512);
        match &o.judge {
            JudgeBackend::Llm(cfg) => {
                assert_eq!(cfg.model, "judge-32b");
                assert_eq!(cfg.timeout, std::time::Duration::from_secs(30));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(o.judge_name(), "llm:judge-32b");
        o.validate().unwrap();
        let written = toml::to_string(&o).unwrap();
        assert!(written.contains("kind = \"llm\""), "{written}");
        assert_eq!(toml::from_str::<DiscriminatorOptions>(&written).unwrap(), o);

        let rule: DiscriminatorOptions = toml::from_str("init = \"sft\"").unwrap();
        assert_eq!(rule.judge, JudgeBackend::Rule);
        assert_eq!(rule, DiscriminatorOptions::new("sft"));
        let written = toml::to_string(&rule).unwrap();
        assert_eq!(
            toml::from_str::<DiscriminatorOptions>(&written).unwrap(),
            rule
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        for text in [
            "init = \"a\"\nlearning_rate = 1.0",
            "init = \"a\"\n[judge]\nkind = \"rule\"\nmodel = \"x\"",
            "init = \"a\"\n[judge]\nkind = \"llm\"\nbase_url = \"http://h/v1\"\nmodel = \"m\"\ncolour = 1",
            "init = \"a\"\n[judge]\nkind = \"oracle\"",
        ] {
            assert!(
                toml::from_str::<DiscriminatorOptions>(text).is_err(),
                "accepted: {text}"
            );
        }
        let mut o = DiscriminatorOptions::new("a");
        o.max_responses = 0;
        let e = o.validate().unwrap_err().to_string();
        assert!(e.contains("max_responses"), "{e}");
        let mut o = DiscriminatorOptions::new("a");
        o.lr = f64::NAN;
        assert!(o.validate().unwrap_err().to_string().contains("lr"));
    }
}
