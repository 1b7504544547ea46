//! `tokenizer.json` through the `tokenizers` crate, and the chat template from
//! `tokenizer_config.json` (or `chat_template.jinja` / `chat_template.json`) rendered as
//! transformers renders it: Jinja with `trim_blocks` and `lstrip_blocks`, loop controls, Python
//! string methods, `raise_exception`, `strftime_now`, and a `tojson` that matches Python's
//! `json.dumps(..., ensure_ascii=False)`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use minijinja::{Environment, Error as JinjaError, ErrorKind, Value};
use serde::Serialize;
use serde_json::Value as Json;

use crate::error::{ModelError, Result};

pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
pub const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";
pub const CHAT_TEMPLATE_JSON_FILE: &str = "chat_template.json";

/// One chat message. `content` is a string or a list of parts (`{"type": "image"}`,
/// `{"type": "text", "text": ...}`), exactly as transformers' chat templates receive it.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: Json,
}

impl ChatMessage {
    pub fn text(role: &str, text: &str) -> Self {
        Self {
            role: role.into(),
            content: Json::String(text.into()),
        }
    }

    /// A user turn with `n_images` image parts followed by the text.
    pub fn with_images(role: &str, n_images: usize, text: &str) -> Self {
        let mut parts: Vec<Json> = (0..n_images)
            .map(|_| serde_json::json!({"type": "image"}))
            .collect();
        parts.push(serde_json::json!({"type": "text", "text": text}));
        Self {
            role: role.into(),
            content: Json::Array(parts),
        }
    }
}

/// A tokenizer with its special tokens and chat template.
#[derive(Debug, Clone)]
pub struct ChatTokenizer {
    inner: tokenizers::Tokenizer,
    chat_template: Option<String>,
    /// Special token strings by their `tokenizer_config.json` names (`bos_token`, ...).
    special_tokens: BTreeMap<String, String>,
    config: serde_json::Map<String, Json>,
    source: PathBuf,
}

fn token_string(v: &Json) -> Option<String> {
    match v {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        _ => None,
    }
}

fn read_json(path: &Path) -> Result<Json> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    serde_json::from_str(&text).map_err(|source| ModelError::Json {
        path: path.to_path_buf(),
        source,
    })
}

impl ChatTokenizer {
    /// Loads `tokenizer.json` and, when present, `tokenizer_config.json` and the chat template
    /// from a model directory.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let tok_path = dir.join(TOKENIZER_FILE);
        let inner =
            tokenizers::Tokenizer::from_file(&tok_path).map_err(|e| ModelError::Tokenizer {
                what: tok_path.display().to_string(),
                reason: e.to_string(),
            })?;
        let cfg_path = dir.join(TOKENIZER_CONFIG_FILE);
        let config = if cfg_path.is_file() {
            match read_json(&cfg_path)? {
                Json::Object(o) => o,
                _ => {
                    return Err(ModelError::Tokenizer {
                        what: cfg_path.display().to_string(),
                        reason: "not a JSON object".into(),
                    });
                }
            }
        } else {
            Default::default()
        };
        let mut chat_template = template_from_config(&config, &cfg_path)?;
        let jinja = dir.join(CHAT_TEMPLATE_FILE);
        let json = dir.join(CHAT_TEMPLATE_JSON_FILE);
        if jinja.is_file() {
            chat_template =
                Some(std::fs::read_to_string(&jinja).map_err(|e| ModelError::io(&jinja, e))?);
        } else if json.is_file() {
            let v = read_json(&json)?;
            chat_template = v
                .get("chat_template")
                .and_then(|t| t.as_str())
                .map(str::to_string);
        }
        let mut tok = Self::new(inner, chat_template, config)?;
        tok.source = dir.to_path_buf();
        Ok(tok)
    }

    /// Wraps an in-memory tokenizer. `config` holds `tokenizer_config.json`'s keys.
    pub fn new(
        inner: tokenizers::Tokenizer,
        chat_template: Option<String>,
        config: serde_json::Map<String, Json>,
    ) -> Result<Self> {
        let mut special_tokens = BTreeMap::new();
        for key in [
            "bos_token",
            "eos_token",
            "pad_token",
            "unk_token",
            "image_token",
        ] {
            if let Some(s) = config.get(key).and_then(token_string) {
                special_tokens.insert(key.to_string(), s);
            }
        }
        let tok = Self {
            inner,
            chat_template,
            special_tokens,
            config,
            source: PathBuf::from("<memory>"),
        };
        if let Some(t) = &tok.chat_template {
            // Compile once up front so a broken template is reported at load, not mid-run.
            let mut env = template_env();
            env.add_template("chat", t)
                .map_err(|e| ModelError::Template(format!("{}: {e}", tok.source.display())))?;
        }
        Ok(tok)
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// A special token's string (`bos_token`, `eos_token`, `pad_token`, `unk_token`).
    pub fn special_token(&self, name: &str) -> Option<&str> {
        self.special_tokens.get(name).map(String::as_str)
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    fn special_id(&self, name: &str) -> Option<u32> {
        self.special_token(name).and_then(|t| self.token_id(t))
    }
    pub fn eos_id(&self) -> Option<u32> {
        self.special_id("eos_token")
    }
    pub fn bos_id(&self) -> Option<u32> {
        self.special_id("bos_token")
    }
    /// The padding id: `pad_token`, else `eos_token`, else 0.
    pub fn pad_id(&self) -> u32 {
        self.special_id("pad_token")
            .or_else(|| self.eos_id())
            .unwrap_or(0)
    }

    /// Renders a conversation with the chat template, as transformers'
    /// `apply_chat_template(..., tokenize=False)` does.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let template = self.chat_template.as_deref().ok_or_else(|| {
            ModelError::Template(format!(
                "{}: the tokenizer has no chat template",
                self.source.display()
            ))
        })?;
        let mut env = template_env();
        env.add_template("chat", template)
            .map_err(|e| ModelError::Template(e.to_string()))?;
        let tmpl = env.get_template("chat").expect("just added");
        let mut ctx: BTreeMap<String, Value> = BTreeMap::new();
        for (k, v) in &self.config {
            if k.ends_with("_token")
                && let Some(s) = token_string(v)
            {
                ctx.insert(k.clone(), Value::from(s));
            }
        }
        ctx.insert(
            "messages".into(),
            Value::from_serialize(drop_null_keys(messages)),
        );
        ctx.insert(
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        );
        tmpl.render(ctx)
            .map_err(|e| ModelError::Template(describe_jinja_error(&e)))
    }

    /// Token ids of `text`, with or without the tokenizer's own special-token post-processing.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc =
            self.inner
                .encode(text, add_special_tokens)
                .map_err(|e| ModelError::Tokenizer {
                    what: self.source.display().to_string(),
                    reason: format!("encoding failed: {e}"),
                })?;
        Ok(enc.get_ids().to_vec())
    }

    /// Renders and tokenizes a conversation (the template supplies the special tokens, so the
    /// text is encoded without adding more, as transformers does).
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        self.encode(&self.render(messages, add_generation_prompt)?, false)
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| ModelError::Tokenizer {
                what: self.source.display().to_string(),
                reason: format!("decoding failed: {e}"),
            })
    }

    /// Writes `tokenizer.json`, `tokenizer_config.json` and `chat_template.jinja`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
        let tok = self
            .inner
            .to_string(true)
            .map_err(|e| ModelError::Tokenizer {
                what: dir.display().to_string(),
                reason: format!("serialising: {e}"),
            })?;
        crate::checkpoint::write_atomic(&dir.join(TOKENIZER_FILE), tok.as_bytes())?;
        let mut config = self.config.clone();
        config.remove("chat_template");
        let text = serde_json::to_string_pretty(&Json::Object(config))
            .map_err(|e| ModelError::input(e.to_string()))?;
        crate::checkpoint::write_atomic(&dir.join(TOKENIZER_CONFIG_FILE), text.as_bytes())?;
        if let Some(t) = &self.chat_template {
            crate::checkpoint::write_atomic(&dir.join(CHAT_TEMPLATE_FILE), t.as_bytes())?;
        }
        Ok(())
    }
}

/// Replaces each `image_token_id` with `n_per_image` copies (what LLaVA's processor does to the
/// `<image>` placeholder before the model sees it).
pub fn expand_image_tokens(ids: &[u32], image_token_id: u32, n_per_image: usize) -> Vec<u32> {
    let mut out = Vec::with_capacity(ids.len() + n_per_image);
    for &id in ids {
        if id == image_token_id {
            out.extend(std::iter::repeat_n(id, n_per_image));
        } else {
            out.push(id);
        }
    }
    out
}

/// transformers removes keys whose value is `None` from each message before rendering, so a
/// template's `message.tool_calls is defined` behaves the same for absent and null keys.
fn drop_null_keys(messages: &[ChatMessage]) -> Vec<Json> {
    messages
        .iter()
        .map(|m| {
            let mut v = serde_json::to_value(m).unwrap_or(Json::Null);
            if let Json::Object(o) = &mut v {
                o.retain(|_, x| !x.is_null());
            }
            v
        })
        .collect()
}

/// Renders any template with the same environment the chat template uses (trim/lstrip blocks,
/// Python semantics). `context` must be a JSON object.
pub fn render_template(template: &str, context: &Json) -> Result<String> {
    let mut env = template_env();
    env.add_template("t", template)
        .map_err(|e| ModelError::Template(describe_jinja_error(&e)))?;
    env.get_template("t")
        .expect("just added")
        .render(Value::from_serialize(context))
        .map_err(|e| ModelError::Template(describe_jinja_error(&e)))
}

fn template_from_config(
    config: &serde_json::Map<String, Json>,
    path: &Path,
) -> Result<Option<String>> {
    match config.get("chat_template") {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        // A list of named templates: transformers uses the one named "default".
        Some(Json::Array(list)) => {
            let pick = list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .or_else(|| list.first());
            Ok(pick
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .map(str::to_string))
        }
        Some(_) => Err(ModelError::Tokenizer {
            what: path.display().to_string(),
            reason: "`chat_template` must be a string or a list of {name, template}".into(),
        }),
    }
}

fn describe_jinja_error(e: &JinjaError) -> String {
    let mut msg = e.to_string();
    if let Some(line) = e.line() {
        msg.push_str(&format!(" (template line {line})"));
    }
    msg
}

fn template_env() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_keep_trailing_newline(false);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<Value, JinjaError> {
            Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
        },
    );
    env.add_function("strftime_now", |fmt: String| -> String {
        strftime_now(&fmt)
    });
    env.add_filter("tojson", tojson);
    // Python's str(): True/False/None, as Jinja2 prints them.
    env.set_formatter(|out, state, value| {
        if value.is_none() {
            out.write_str("None")?;
            Ok(())
        } else if value.kind() == minijinja::value::ValueKind::Bool {
            out.write_str(if value.is_true() { "True" } else { "False" })?;
            Ok(())
        } else {
            minijinja::escape_formatter(out, state, value)
        }
    });
    env
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=indent)`; transformers' templates
/// use this filter for tool schemas and arguments.
fn tojson(
    value: Value,
    kwargs: minijinja::value::Kwargs,
) -> std::result::Result<Value, JinjaError> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let _: Option<Value> = kwargs.get("separators")?;
    let _: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value)
        .map_err(|e| JinjaError::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let mut out = String::new();
    python_json(&json, indent, 0, &mut out);
    Ok(Value::from_safe_string(out))
}

fn python_json(v: &Json, indent: Option<usize>, depth: usize, out: &mut String) {
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v {
        Json::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                python_json(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        Json::Object(map) if !map.is_empty() => {
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                out.push_str(&Json::String(k.clone()).to_string());
                out.push_str(": ");
                python_json(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
        Json::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or(0.0);
            if f.fract() == 0.0 && f.abs() < 1e16 {
                out.push_str(&format!("{f:.1}"));
            } else {
                out.push_str(&n.to_string());
            }
        }
        other => out.push_str(&other.to_string()),
    }
}

/// `strftime_now(format)` for the common directives (%Y %m %d %B %b %A %a %H %M %S %%), in UTC.
fn strftime_now(fmt: &str) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    format_utc(secs, fmt)
}

fn format_utc(secs: i64, fmt: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
    ];
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let weekday = DAYS[days.rem_euclid(7) as usize];
    let month_name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('B') => out.push_str(month_name),
            Some('b') => out.push_str(&month_name[..3]),
            Some('A') => out.push_str(weekday),
            Some('a') => out.push_str(&weekday[..3]),
            Some('H') => out.push_str(&format!("{:02}", rem / 3600)),
            Some('M') => out.push_str(&format!("{:02}", rem / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", rem % 60)),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// The built-in byte-level tokenizer: GPT-2's byte alphabet (every UTF-8 text encodes, nothing
/// is unknown) with no merges, plus ChatML and image special tokens. Issue-free and tiny, so
/// tests and the self-check need no download.
pub fn byte_level_chatml() -> Result<ChatTokenizer> {
    let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"];
    let alphabet = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet();
    let mut chars: Vec<char> = alphabet.into_iter().collect();
    chars.sort_unstable();
    let mut vocab: Vec<(String, u32)> = chars
        .iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), i as u32))
        .collect();
    let base = vocab.len() as u32;
    vocab.extend(
        specials
            .iter()
            .enumerate()
            .map(|(i, s)| (s.to_string(), base + i as u32)),
    );
    let vocab_json: serde_json::Map<String, Json> = vocab
        .iter()
        .map(|(t, i)| (t.clone(), Json::from(*i)))
        .collect();
    let added: Vec<Json> = specials
        .iter()
        .enumerate()
        .map(|(i, s)| {
            serde_json::json!({"id": base + i as u32, "content": s, "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let spec = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab_json, "merges": []}
    });
    let inner: tokenizers::Tokenizer =
        spec.to_string()
            .parse()
            .map_err(|e: tokenizers::Error| ModelError::Tokenizer {
                what: "built-in byte-level tokenizer".into(),
                reason: e.to_string(),
            })?;
    with_chatml(inner)
}

/// Trains a byte-level BPE tokenizer (GPT-2's byte alphabet, so any text encodes) on `texts`,
/// with the ChatML and image special tokens first (ids 0-3) and the ChatML chat template.
pub fn train_byte_level_chatml(
    texts: impl Iterator<Item = String> + Send,
    vocab_size: usize,
) -> Result<ChatTokenizer> {
    use tokenizers::models::TrainerWrapper;
    use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"];
    let trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(
            specials
                .iter()
                .map(|s| tokenizers::AddedToken::from(s.to_string(), true))
                .collect(),
        )
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut trainer = TrainerWrapper::BpeTrainer(trainer);
    let mut inner = tokenizers::Tokenizer::new(BPE::default());
    inner.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    inner.with_decoder(Some(ByteLevel::new(false, true, true)));
    inner.with_post_processor(Some(ByteLevel::new(false, true, true)));
    let err = |e: tokenizers::Error| ModelError::Tokenizer {
        what: "tokenizer training".into(),
        reason: e.to_string(),
    };
    inner.train(&mut trainer, texts).map_err(err)?;
    // Register the specials as added tokens so they are matched atomically in any text.
    inner
        .add_special_tokens(
            specials
                .iter()
                .map(|s| tokenizers::AddedToken::from(s.to_string(), true)),
        )
        .map_err(err)?;
    with_chatml(inner)
}

/// Wraps a tokenizer with the ChatML special tokens in `tokenizer_config.json` and the ChatML
/// template.
fn with_chatml(inner: tokenizers::Tokenizer) -> Result<ChatTokenizer> {
    let mut config = serde_json::Map::new();
    config.insert("eos_token".into(), Json::from("<|im_end|>"));
    config.insert("pad_token".into(), Json::from("<|endoftext|>"));
    config.insert("image_token".into(), Json::from("<image>"));
    config.insert("model_max_length".into(), Json::from(2048));
    config.insert(
        "tokenizer_class".into(),
        Json::from("PreTrainedTokenizerFast"),
    );
    ChatTokenizer::new(inner, Some(CHATML_TEMPLATE.to_string()), config)
}

/// A ChatML template that accepts string or part-list content (images render as `<image>`).
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formatting_matches_known_dates() {
        assert_eq!(format_utc(0, "%Y-%m-%d %A"), "1970-01-01 Thursday");
        // 2024-02-29 12:34:56 UTC
        assert_eq!(
            format_utc(1_709_210_096, "%d %b %Y %H:%M:%S %a"),
            "29 Feb 2024 12:34:56 Thu"
        );
    }

    #[test]
    fn python_style_json() {
        let v = serde_json::json!({"a": [1, 2.0, "é"], "b": {}});
        let mut s = String::new();
        python_json(&v, None, 0, &mut s);
        assert_eq!(s, r#"{"a": [1, 2.0, "é"], "b": {}}"#);
        let mut s = String::new();
        python_json(&serde_json::json!({"a": [1]}), Some(2), 0, &mut s);
        assert_eq!(s, "{\n  \"a\": [\n    1\n  ]\n}");
    }

    #[test]
    fn trained_bpe_compresses_its_corpus_and_keeps_special_tokens_atomic() {
        let corpus: Vec<String> = (0..200)
            .map(|i| {
                format!(
                    "How many red circles are there? There are {} red circles.",
                    i % 7
                )
            })
            .collect();
        let tok = train_byte_level_chatml(corpus.clone().into_iter(), 400).unwrap();
        assert!(
            tok.vocab_size() > 260 && tok.vocab_size() <= 400,
            "{}",
            tok.vocab_size()
        );
        assert_eq!(tok.token_id("<|endoftext|>"), Some(0));
        assert_eq!(tok.token_id("<image>"), Some(3));
        let text = &corpus[3];
        let ids = tok.encode(text, false).unwrap();
        assert!(
            ids.len() * 3 < text.len(),
            "{} tokens for {} bytes",
            ids.len(),
            text.len()
        );
        assert_eq!(tok.decode(&ids, false).unwrap(), *text);
        let with_image = tok
            .encode("<|im_start|>user\n<image>What?<|im_end|>", false)
            .unwrap();
        assert_eq!(with_image.iter().filter(|&&i| i == 3).count(), 1);
        assert_eq!(with_image[0], 1);
        // Never-seen text still encodes (byte fallback through the byte alphabet).
        let odd = "日本 ✓";
        assert_eq!(
            tok.decode(&tok.encode(odd, false).unwrap(), false).unwrap(),
            odd
        );
    }

    #[test]
    fn byte_level_round_trips_any_text() {
        let tok = byte_level_chatml().unwrap();
        let text = "café ≥ 3 ✓ <image> done";
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
        let image_id = tok.token_id("<image>").unwrap();
        assert_eq!(ids.iter().filter(|&&i| i == image_id).count(), 1);
    }
}
