//! What a teacher server is configured with. The CLI embeds [`TeacherOptions`] in its run config
//! (one TOML table per teacher); every field but `name` and the backend's own required fields has
//! a default.
//!
//! ```toml
//! name = "big"                        # the teacher's name: part of the cache key, sent in answers
//! backend = "openai"                  # "candle" | "openai" | "replay"
//! cache = "runs/demo/teacher-big.redb"  # optional; without it the cache lives in memory
//! cache_max_entries = 100000           # optional; beyond it the key written longest ago goes
//! max_n = 64                          # most answers one request may ask for
//! shutdown_grace = 10                 # seconds serve waits for open connections at shutdown
//! base_url = "http://127.0.0.1:8000/v1"
//! model = "Qwen/Qwen2.5-VL-72B-Instruct"
//! api_key_env = "OPENAI_API_KEY"      # the NAME of the variable holding the key, never the key
//!
//! [sampling]                          # defaults for requests that send none
//! temperature = 1.0
//! top_p = 0.95
//! top_k = 50
//! repetition_penalty = 1.05
//! max_new_tokens = 256
//! seed = 0
//! ```
//!
//! The backend's fields sit beside the common ones, selected by `backend`: a field that belongs to
//! another backend (or to none) is an error naming it.

use std::path::PathBuf;
use std::time::Duration;

use ril_common::SamplingParams;
use ril_openai::{ClientConfig, seconds};
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

use crate::cache::DEFAULT_MAX_ENTRIES;
use crate::error::TeacherError;

/// The largest `max_n` a server accepts: a request for more answers is a mistake, not a need.
pub const MAX_N_LIMIT: u32 = 4096;

/// Checks sampling settings as a teacher takes them; errors name the field as
/// `{prefix}.{field}`. Every setting is part of the cache key (answers drawn differently are
/// different answers), so the stop and suppressed tokens, which the key does not hold, must be
/// left to the model: its own stop tokens end an answer.
pub fn validate_sampling(p: &SamplingParams, prefix: &str) -> Result<(), TeacherError> {
    let bad = |field: &str, reason: String| {
        Err(TeacherError::invalid(format!("{prefix}.{field}"), reason))
    };
    if let Err(e) = p.validate() {
        let got = match e.field {
            "temperature" => p.temperature,
            "top_p" => p.top_p,
            _ => p.repetition_penalty,
        };
        return bad(e.field, format!("{}; got {got}", e.problem));
    }
    if p.max_new_tokens == 0 {
        return bad("max_new_tokens", "must be at least 1".into());
    }
    for (field, ids) in [
        ("stop_token_ids", &p.stop_token_ids),
        ("suppress_token_ids", &p.suppress_token_ids),
    ] {
        if !ids.is_empty() {
            return bad(
                field,
                "is not a teacher setting: answers end at the model's own stop tokens".into(),
            );
        }
    }
    Ok(())
}

/// The settings at the precision they travel at (`f32` on the wire, as the cache key renders
/// them), so that the answers of a key do not depend on whether its settings came from the
/// config (`f64`) or a request (`f32`).
pub fn at_wire_precision(p: SamplingParams) -> SamplingParams {
    let f32_precision = |x: f64| f64::from(x as f32);
    SamplingParams {
        temperature: f32_precision(p.temperature),
        top_p: f32_precision(p.top_p),
        repetition_penalty: f32_precision(p.repetition_penalty),
        ..p
    }
}

/// A teacher server's configuration. See the module docs for the TOML shape.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TeacherOptions {
    /// The teacher's name: the cache key's teacher, the `teacher` of every answer, and the name
    /// the replay backend looks answers up under (unless it says otherwise).
    pub name: String,
    #[serde(flatten)]
    pub backend: BackendOptions,
    /// The persistent answer cache (a redb file, created with its parent directories). `None`:
    /// an in-memory cache that ends with the process.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache: Option<PathBuf>,
    /// The most keys (question x settings) the cache holds; beyond it the key written longest
    /// ago is evicted (`cache` module docs). Bounds the memory of an in-memory cache and the
    /// size of a file.
    pub cache_max_entries: u64,
    /// Used for requests that carry no sampling settings: the paper's sampling with 256 new
    /// tokens unless the table says otherwise.
    pub sampling: SamplingParams,
    /// The most answers one request may ask for.
    pub max_n: u32,
    /// At shutdown, once every answer stream has been produced, how long `serve` waits for
    /// connections to finish (clients reading their last answers) before it returns anyway.
    /// Bounds the wait for clients that never close on their own, such as health `Watch`
    /// streams.
    #[serde(with = "seconds")]
    pub shutdown_grace: Duration,
}

fn default_max_n() -> u32 {
    64
}

/// See [`TeacherOptions::shutdown_grace`].
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

fn default_shutdown_grace() -> Duration {
    DEFAULT_SHUTDOWN_GRACE
}

impl TeacherOptions {
    /// Defaults for everything but the name and the backend.
    pub fn new(name: impl Into<String>, backend: BackendOptions) -> Self {
        Self {
            name: name.into(),
            backend,
            cache: None,
            cache_max_entries: DEFAULT_MAX_ENTRIES,
            sampling: SamplingParams::default(),
            max_n: default_max_n(),
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
        }
    }

    pub fn validate(&self) -> Result<(), TeacherError> {
        if self.name.trim().is_empty() {
            return Err(TeacherError::config("name", "must not be empty"));
        }
        if self.cache_max_entries == 0 {
            return Err(TeacherError::config(
                "cache_max_entries",
                "must be at least 1 (the cache keeps the newest keys up to this many)",
            ));
        }
        if self.max_n == 0 || self.max_n > MAX_N_LIMIT {
            return Err(TeacherError::config(
                "max_n",
                format!("must be in 1..={MAX_N_LIMIT}; got {}", self.max_n),
            ));
        }
        validate_sampling(&self.sampling, "sampling").map_err(|e| match e {
            TeacherError::InvalidArgument { field, reason } => {
                TeacherError::Config { field, reason }
            }
            other => other,
        })?;
        self.backend.validate()
    }
}

/// The common fields of [`TeacherOptions`], read apart from the backend's.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CommonOptions {
    name: String,
    #[serde(default)]
    cache: Option<PathBuf>,
    #[serde(default = "default_cache_max_entries")]
    cache_max_entries: u64,
    #[serde(default)]
    sampling: SamplingParams,
    #[serde(default = "default_max_n")]
    max_n: u32,
    #[serde(default = "default_shutdown_grace", with = "seconds")]
    shutdown_grace: Duration,
}

const COMMON_FIELDS: [&str; 6] = [
    "name",
    "cache",
    "cache_max_entries",
    "sampling",
    "max_n",
    "shutdown_grace",
];

fn default_cache_max_entries() -> u64 {
    DEFAULT_MAX_ENTRIES
}

/// serde cannot combine `flatten` with `deny_unknown_fields`, so the table is split by hand: the
/// common fields into [`CommonOptions`], the rest (with the `backend` tag) into
/// [`BackendOptions`]; both deny unknown fields.
impl<'de> Deserialize<'de> for TeacherOptions {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut rest = Map::<String, Value>::deserialize(deserializer)?;
        let mut common = Map::new();
        for field in COMMON_FIELDS {
            if let Some(v) = rest.remove(field) {
                common.insert(field.to_string(), v);
            }
        }
        let common: CommonOptions =
            serde_json::from_value(Value::Object(common)).map_err(D::Error::custom)?;
        if !rest.contains_key("backend") {
            return Err(D::Error::custom(
                "missing field `backend` (\"candle\", \"openai\" or \"replay\")",
            ));
        }
        let backend: BackendOptions = serde_json::from_value(Value::Object(rest))
            .map_err(|e| D::Error::custom(format!("teacher {:?}: {e}", common.name)))?;
        Ok(Self {
            name: common.name,
            backend,
            cache: common.cache,
            cache_max_entries: common.cache_max_entries,
            sampling: common.sampling,
            max_n: common.max_n,
            shutdown_grace: common.shutdown_grace,
        })
    }
}

/// Where answers come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "backend", rename_all = "snake_case")]
pub enum BackendOptions {
    /// A local checkpoint directory (config.json + safetensors + tokenizer), as the built-in
    /// teachers are.
    Candle(CandleOptions),
    /// Any OpenAI-compatible `/v1/chat/completions` endpoint (vLLM, SGLang, llama.cpp, OpenAI).
    #[serde(rename = "openai")]
    OpenAi(OpenAiOptions),
    /// Answers recorded beforehand, from the dataset's `teacher_answers` or a JSONL file.
    Replay(ReplayOptions),
}

impl BackendOptions {
    /// `candle`, `openai` or `replay`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Candle(_) => "candle",
            Self::OpenAi(_) => "openai",
            Self::Replay(_) => "replay",
        }
    }

    pub fn validate(&self) -> Result<(), TeacherError> {
        match self {
            Self::Candle(o) => o.validate(),
            Self::OpenAi(o) => o.validate(),
            Self::Replay(o) => o.validate(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CandleOptions {
    /// The checkpoint directory.
    pub checkpoint: PathBuf,
    /// How long the first request of a batch waits for others to join it (milliseconds).
    #[serde(default = "default_batch_window_ms")]
    pub batch_window_ms: u64,
    /// The most sequences (answers) in one `generate` call; a batch closes early when full.
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// Where the teacher's weights, KV cache and sampling live: `cpu`, `cuda` or `cuda:N`.
    /// Default: `[run] device`, else `cpu`.
    #[serde(default = "default_device")]
    pub device: String,
}

fn default_batch_window_ms() -> u64 {
    5
}
fn default_max_batch() -> usize {
    16
}
fn default_device() -> String {
    "cpu".into()
}

impl CandleOptions {
    pub fn new(checkpoint: impl Into<PathBuf>) -> Self {
        Self {
            checkpoint: checkpoint.into(),
            batch_window_ms: default_batch_window_ms(),
            max_batch: default_max_batch(),
            device: default_device(),
        }
    }

    /// `device` parsed, not opened (a config is checked where the teacher may not run).
    pub fn device_spec(&self) -> Result<ril_model::DeviceSpec, TeacherError> {
        (self.device.parse()).map_err(|error| TeacherError::Device { error })
    }

    /// Opens `device`.
    pub fn open_device(&self) -> Result<candle_core::Device, TeacherError> {
        (self.device_spec()?.open(&self.device)).map_err(|error| TeacherError::Device { error })
    }

    pub fn batch_window(&self) -> Duration {
        Duration::from_millis(self.batch_window_ms)
    }

    fn validate(&self) -> Result<(), TeacherError> {
        if self.checkpoint.as_os_str().is_empty() {
            return Err(TeacherError::config("checkpoint", "must name a directory"));
        }
        if self.max_batch == 0 {
            return Err(TeacherError::config("max_batch", "must be at least 1"));
        }
        self.device_spec()?;
        Ok(())
    }
}

/// An OpenAI-compatible endpoint. Durations are written in seconds (`timeout = 120`,
/// `initial_backoff = 0.5`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenAiOptions {
    /// The API root, as OpenAI clients take it: `http://127.0.0.1:8000/v1`.
    pub base_url: String,
    /// The model name the server serves the teacher under.
    pub model: String,
    /// The name of the environment variable that holds the API key (sent as
    /// `Authorization: Bearer`). The key itself never appears in a config, a log or an error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
    /// Per attempt, from sending the request to the end of the reply.
    #[serde(default = "default_timeout", with = "seconds")]
    pub timeout: Duration,
    #[serde(default = "default_connect_timeout", with = "seconds")]
    pub connect_timeout: Duration,
    /// Attempts after the first one for transient failures (connect errors, timeouts, 408, 429,
    /// 5xx).
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    /// Wait before the first retry; doubled for each following one (capped at 30 s).
    #[serde(default = "ril_openai::default_initial_backoff", with = "seconds")]
    pub initial_backoff: Duration,
    /// HTTP requests in flight at once from this server.
    #[serde(default = "ril_openai::default_max_concurrency")]
    pub max_concurrency: usize,
    /// The most choices asked for in one call (`n`); more answers take several calls.
    #[serde(default = "default_max_n_per_call")]
    pub max_n_per_call: u32,
    /// Also send `top_k` and `repetition_penalty`, which vLLM, SGLang and llama.cpp accept and
    /// api.openai.com rejects.
    #[serde(default = "default_true")]
    pub extended_sampling: bool,
}

fn default_timeout() -> Duration {
    Duration::from_secs(300)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_max_retries() -> u32 {
    4
}
fn default_max_n_per_call() -> u32 {
    16
}
fn default_true() -> bool {
    true
}

impl OpenAiOptions {
    /// Defaults for everything but where the teacher is.
    pub fn new(base_url: impl Into<String>, model: impl Into<String>) -> Self {
        Self {
            base_url: base_url.into(),
            model: model.into(),
            api_key_env: None,
            timeout: default_timeout(),
            connect_timeout: default_connect_timeout(),
            max_retries: default_max_retries(),
            initial_backoff: ril_openai::default_initial_backoff(),
            max_concurrency: ril_openai::default_max_concurrency(),
            max_n_per_call: default_max_n_per_call(),
            extended_sampling: true,
        }
    }

    /// The HTTP client's settings (the key is read from `api_key_env` when the backend loads).
    pub fn client_config(&self) -> ClientConfig {
        ClientConfig {
            base_url: self.base_url.clone(),
            api_key: None,
            timeout: self.timeout,
            connect_timeout: Some(self.connect_timeout),
            max_retries: self.max_retries,
            initial_backoff: self.initial_backoff,
            max_concurrency: self.max_concurrency,
            retry_unreadable_once: false,
        }
    }

    fn validate(&self) -> Result<(), TeacherError> {
        self.client_config()
            .validate()
            .map_err(|e| TeacherError::config(e.field, e.reason))?;
        if self.model.trim().is_empty() {
            return Err(TeacherError::config(
                "model",
                "must name the served teacher model",
            ));
        }
        if let Some(var) = &self.api_key_env
            && var.trim().is_empty()
        {
            return Err(TeacherError::config(
                "api_key_env",
                "must name an environment variable",
            ));
        }
        if self.max_n_per_call == 0 {
            return Err(TeacherError::config("max_n_per_call", "must be at least 1"));
        }
        Ok(())
    }
}

/// Answers recorded beforehand. At least one source is needed; with both, the file's answers
/// for a question follow the dataset's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayOptions {
    /// A dataset (JSONL or Parquet) whose rows carry `teacher_answers`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<PathBuf>,
    /// A JSONL file of `{"id": ..., "teacher": ..., "answers": [...]}` lines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answers: Option<PathBuf>,
    /// The teacher name to look answers up under (default: the server's `name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher: Option<String>,
    /// Serve answer `i` as recorded answer `i mod k` when `k` answers are recorded and more are
    /// asked for (otherwise asking for more than `k` is a NotFound error).
    #[serde(default)]
    pub cycle: bool,
}

impl ReplayOptions {
    fn validate(&self) -> Result<(), TeacherError> {
        if self.dataset.is_none() && self.answers.is_none() {
            return Err(TeacherError::config(
                "dataset",
                "the replay backend needs `dataset` (rows with teacher_answers) or `answers` (a JSONL file), or both",
            ));
        }
        if let Some(t) = &self.teacher
            && t.trim().is_empty()
        {
            return Err(TeacherError::config("teacher", "must not be empty"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<TeacherOptions, String> {
        let v: Value = serde_json::from_str(s).map_err(|e| e.to_string())?;
        serde_json::from_value(v).map_err(|e| e.to_string())
    }

    #[test]
    fn flat_tables_select_the_backend_and_deny_strangers() {
        let o = parse(
            r#"{"name": "big", "backend": "candle", "checkpoint": "/m", "max_batch": 4,
                "sampling": {"temperature": 0.5, "seed": 3}}"#,
        )
        .unwrap();
        assert_eq!(o.name, "big");
        assert_eq!(o.max_n, 64);
        assert_eq!(o.sampling.temperature, 0.5);
        assert_eq!(o.sampling.top_p, 0.95);
        assert_eq!(o.sampling.seed, 3);
        let BackendOptions::Candle(c) = &o.backend else {
            panic!("{o:?}")
        };
        assert_eq!((c.max_batch, c.batch_window_ms), (4, 5));
        o.validate().unwrap();

        let e = parse(r#"{"name": "big", "backend": "candle", "checkpoint": "/m", "model": "x"}"#)
            .unwrap_err();
        assert!(e.contains("unknown field `model`"), "{e}");
        let e = parse(r#"{"name": "big", "checkpoint": "/m"}"#).unwrap_err();
        assert!(e.contains("backend"), "{e}");
        let e = parse(r#"{"name": "big", "backend": "vllm"}"#).unwrap_err();
        assert!(e.contains("vllm"), "{e}");
        let e =
            parse(r#"{"name": "b", "backend": "replay", "dataset": "d", "sampling": {"tmp": 1}}"#)
                .unwrap_err();
        assert!(e.contains("tmp"), "{e}");
    }

    #[test]
    fn toml_tables_as_the_cli_embeds_them() {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct RunConfig {
            teachers: Vec<TeacherOptions>,
        }
        let config: RunConfig = toml::from_str(
            r#"
            [[teachers]]
            name = "big"
            backend = "openai"
            cache = "runs/demo/teacher-big.redb"
            base_url = "http://127.0.0.1:8000/v1"
            model = "Qwen/Qwen2.5-VL-72B-Instruct"
            api_key_env = "OPENAI_API_KEY"
            timeout = 120
            initial_backoff = 0.25
            [teachers.sampling]
            temperature = 0.7
            max_new_tokens = 512

            [[teachers]]
            name = "builtin-a"
            backend = "candle"
            checkpoint = "models/teacher-a"
            batch_window_ms = 5
            max_batch = 16

            [[teachers]]
            name = "recorded"
            backend = "replay"
            dataset = "data/train.jsonl"
            teacher = "big"
            max_n = 8
            "#,
        )
        .unwrap();
        let [big, a, recorded] = &config.teachers[..] else {
            panic!("three teachers")
        };
        let BackendOptions::OpenAi(o) = &big.backend else {
            panic!("{big:?}")
        };
        assert_eq!(o.timeout, Duration::from_secs(120));
        assert_eq!(o.initial_backoff, Duration::from_millis(250));
        assert_eq!(o.api_key_env.as_deref(), Some("OPENAI_API_KEY"));
        assert_eq!(big.sampling.temperature, 0.7);
        assert_eq!(big.sampling.top_k, 50);
        assert_eq!(big.sampling.max_new_tokens, 512);
        assert!(matches!(&a.backend, BackendOptions::Candle(c) if c.max_batch == 16));
        assert_eq!(recorded.max_n, 8);
        for t in &config.teachers {
            t.validate().unwrap();
        }
        // TOML out and back in, every backend (run configs are written from these structs).
        for t in &config.teachers {
            let text = toml::to_string(t).unwrap();
            assert_eq!(
                &toml::from_str::<TeacherOptions>(&text).unwrap(),
                t,
                "{text}"
            );
        }

        let e = toml::from_str::<TeacherOptions>(
            "name = \"x\"\nbackend = \"candle\"\ncheckpoint = \"m\"\nbatch_windw_ms = 3\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("batch_windw_ms"), "{e}");
    }

    #[test]
    fn options_round_trip_and_validate() {
        let mut o = TeacherOptions::new(
            "t",
            BackendOptions::OpenAi(OpenAiOptions::new("http://127.0.0.1:9/v1", "m")),
        );
        o.cache = Some("/tmp/c.redb".into());
        let back: TeacherOptions =
            serde_json::from_value(serde_json::to_value(&o).unwrap()).unwrap();
        assert_eq!(back, o);
        o.validate().unwrap();
        o.max_n = 0;
        assert!(o.validate().unwrap_err().to_string().contains("max_n"));
        o.max_n = 4;
        o.sampling.top_p = 0.0;
        assert!(
            o.validate()
                .unwrap_err()
                .to_string()
                .contains("sampling.top_p")
        );
        let replay = BackendOptions::Replay(ReplayOptions {
            dataset: None,
            answers: None,
            teacher: None,
            cycle: false,
        });
        assert!(
            replay
                .validate()
                .unwrap_err()
                .to_string()
                .contains("dataset")
        );
    }

    #[test]
    fn sampling_errors_name_prefix_and_field_and_the_value() {
        let ok = SamplingParams::default();
        validate_sampling(&ok, "sampling").unwrap();
        type Break = fn(&mut SamplingParams);
        let cases: [(Break, &str, &str); 5] = [
            (|p| p.top_p = 0.0, "`sampling.top_p`", "got 0"),
            (|p| p.temperature = -1.0, "`sampling.temperature`", "got -1"),
            (
                |p| p.repetition_penalty = 0.0,
                "`sampling.repetition_penalty`",
                "> 0",
            ),
            (
                |p| p.max_new_tokens = 0,
                "`sampling.max_new_tokens`",
                "at least 1",
            ),
            (
                |p| p.stop_token_ids = vec![2],
                "`sampling.stop_token_ids`",
                "stop tokens",
            ),
        ];
        for (break_it, field, problem) in cases {
            let mut p = ok.clone();
            break_it(&mut p);
            let e = validate_sampling(&p, "sampling").unwrap_err().to_string();
            assert!(e.contains(field) && e.contains(problem), "{e}");
        }
    }

    #[test]
    fn settings_at_wire_precision_are_what_a_request_would_carry() {
        let from_config = SamplingParams::default();
        let from_wire = SamplingParams {
            top_p: f64::from(0.95f32),
            repetition_penalty: f64::from(1.05f32),
            ..SamplingParams::default()
        };
        assert_ne!(from_config, from_wire);
        assert_eq!(at_wire_precision(from_config), from_wire);
        assert_eq!(at_wire_precision(from_wire.clone()), from_wire);
    }
}
