//! Dataset rows and the JSONL format.
//!
//! One JSON object per line:
//! `{"id", "images": [path relative to the file | {"bytes": base64} | "data:image/png;base64,..."],
//!   "question" | "messages": [{"role", "content"}], "answer", "answer_type"?,
//!   "teacher_answers"?: {teacher: [answers]}, "family"?, ...}`.
//! Unknown keys are kept in `extra` (datasets carry metadata we must not lose). Reading streams
//! line by line, so a file larger than memory works; a shuffled read keeps only the byte offset
//! of each row in memory.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use base64::Engine;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{DataError, Result};
use crate::types::AnswerType;

/// One chat turn as the ecosystem writes it: `content` is a string or a list of parts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: Value,
}

/// An image of a row, read into memory and checked to decode.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageData {
    /// Where it came from: the file path, or `<row id>#image<i>` for inline bytes.
    pub name: String,
    pub bytes: Vec<u8>,
}

/// One question.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub id: String,
    pub images: Vec<ImageData>,
    /// The conversation up to the question (a single user turn for `question` rows).
    pub messages: Vec<Message>,
    pub answer: String,
    pub answer_type: Option<AnswerType>,
    pub teacher_answers: BTreeMap<String, Vec<String>>,
    /// Question family, for per-family accuracy (`family`, or `extra_info.family` in verl data).
    pub family: Option<String>,
    pub extra: serde_json::Map<String, Value>,
}

impl Row {
    /// The row's worked reasoning, when the dataset has one: a non-empty string in `rationale`
    /// (JSONL) or `extra_info.rationale` (verl Parquet), as chain-of-thought datasets such as
    /// A-OKVQA (`rationales`) or ScienceQA (`solution`) carry. Styles that reason before the
    /// answer (see [`crate::style`]) write it out; nothing else reads it.
    pub fn rationale(&self) -> Option<&str> {
        let direct = self.extra.get("rationale");
        let verl = self
            .extra
            .get("extra_info")
            .and_then(|i| i.get("rationale"));
        direct
            .or(verl)
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|r| !r.is_empty())
    }

    /// The question's text: the last user turn's text parts, joined.
    pub fn question_text(&self) -> String {
        self.messages
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .map(|m| content_text(&m.content))
            .unwrap_or_default()
    }

    /// Number of image placeholders in the conversation (`{"type": "image"}` parts, or
    /// `<image>` in string content).
    pub fn image_placeholders(&self) -> usize {
        self.messages
            .iter()
            .map(|m| count_image_parts(&m.content))
            .sum()
    }
}

pub(crate) fn content_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.replace("<image>", "").trim().to_string(),
        Value::Array(parts) => parts
            .iter()
            .filter(|p| p.get("type").and_then(Value::as_str) == Some("text"))
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

fn count_image_parts(content: &Value) -> usize {
    match content {
        Value::String(s) => s.matches("<image>").count(),
        Value::Array(parts) => parts
            .iter()
            .filter(|p| p.get("type").and_then(Value::as_str) == Some("image"))
            .count(),
        _ => 0,
    }
}

/// How a reader treats rows it cannot use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadOptions {
    /// Skip bad rows (counted in [`SkipReport`]) instead of stopping at the first.
    pub skip_bad_rows: bool,
}

/// What was skipped, for the end-of-read report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SkipReport {
    pub skipped: usize,
    /// The first few skipped rows' ids (or `line N` when the id is unknown) and why.
    pub first: Vec<String>,
}

impl SkipReport {
    const KEEP: usize = 5;
    pub(crate) fn record(&mut self, err: &DataError) {
        self.skipped += 1;
        if self.first.len() < Self::KEEP {
            self.first.push(err.to_string());
        }
    }

    /// The readers' one bad-row policy: a parsed row or, without `skip_bad_rows`, its error is
    /// handed on (`Some`); with it, a bad row is logged, counted and skipped (`None`).
    pub(crate) fn pass(
        &mut self,
        parsed: Result<Row>,
        options: ReadOptions,
    ) -> Option<Result<Row>> {
        match parsed {
            Err(e) if options.skip_bad_rows => {
                tracing::warn!(error = %e, "skipping a bad row");
                self.record(&e);
                None
            }
            other => Some(other),
        }
    }
}

/// A field of a row that is wrong: its name as the row spells it (`messages[2].role`) and why.
type FieldError = (String, String);

fn field_error(field: &str, reason: impl Into<String>) -> FieldError {
    (field.to_string(), reason.into())
}

/// Parses and validates one JSONL line. `line_no` is 1-based; `base_dir` resolves relative
/// image paths.
pub fn parse_row(line: &str, file: &Path, line_no: usize, base_dir: &Path) -> Result<Row> {
    let bad = |id: Option<&str>, (field, reason): FieldError| DataError::BadRow {
        file: file.to_path_buf(),
        row: line_no,
        id: id.map(str::to_string),
        field,
        reason,
    };
    let value: Value = serde_json::from_str(line)
        .map_err(|e| bad(None, field_error("<row>", format!("invalid JSON: {e}"))))?;
    let Value::Object(mut obj) = value else {
        return Err(bad(None, field_error("<row>", "not a JSON object")));
    };
    let id = read_id(obj.remove("id")).map_err(|e| bad(None, e))?;
    row_fields(obj, &id, base_dir).map_err(|e| bad(Some(&id), e))
}

/// The fields of a row whose id is known, checked.
fn row_fields(
    mut obj: serde_json::Map<String, Value>,
    id: &str,
    base_dir: &Path,
) -> std::result::Result<Row, FieldError> {
    let messages = read_messages(obj.remove("question"), obj.remove("messages"))?;
    let answer = read_answer(obj.remove("answer"))?;
    let answer_type = match obj.remove("answer_type") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(
            s.parse()
                .map_err(|e: String| field_error("answer_type", e))?,
        ),
        Some(_) => return Err(field_error("answer_type", "must be a string")),
    };
    let teacher_answers = match obj.remove("teacher_answers") {
        None | Some(Value::Null) => BTreeMap::new(),
        Some(v) => serde_json::from_value(v).map_err(|e| {
            field_error(
                "teacher_answers",
                format!("must map teacher names to lists of strings: {e}"),
            )
        })?,
    };
    let family = match obj.get("family") {
        Some(Value::String(s)) => Some(s.clone()),
        _ => None,
    };
    let images = read_images(obj.remove("images"), id, base_dir)?;
    let row = Row {
        id: id.to_string(),
        images,
        messages,
        answer,
        answer_type,
        teacher_answers,
        family,
        extra: obj,
    };
    check_question(&row)?;
    Ok(row)
}

fn read_id(id: Option<Value>) -> std::result::Result<String, FieldError> {
    match id {
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(s),
        Some(Value::Number(n)) => Ok(n.to_string()),
        Some(_) => Err(field_error("id", "must be a non-empty string or a number")),
        None => Err(field_error("id", "missing")),
    }
}

/// The conversation: a `question` string (one user turn) or a `messages` list, not both.
fn read_messages(
    question: Option<Value>,
    messages: Option<Value>,
) -> std::result::Result<Vec<Message>, FieldError> {
    match (question, messages) {
        (Some(_), Some(_)) => Err(field_error(
            "question",
            "give `question` or `messages`, not both",
        )),
        (Some(Value::String(q)), None) => {
            if q.trim().is_empty() {
                return Err(field_error("question", "empty"));
            }
            Ok(vec![Message {
                role: "user".into(),
                content: Value::String(q),
            }])
        }
        (Some(_), None) => Err(field_error("question", "must be a string")),
        (None, Some(m)) => {
            let msgs: Vec<Message> = serde_json::from_value(m).map_err(|e| {
                field_error(
                    "messages",
                    format!("must be a list of {{role, content}}: {e}"),
                )
            })?;
            if msgs.is_empty() || msgs.iter().all(|m| content_text(&m.content).is_empty()) {
                return Err(field_error("messages", "no question text"));
            }
            // Every turn is sent on the wire with its role; a turn without one is not a chat.
            if let Some(i) = msgs.iter().position(|m| m.role.trim().is_empty()) {
                return Err(field_error(
                    &format!("messages[{i}].role"),
                    "empty (every chat turn needs a role, e.g. system, user, assistant)",
                ));
            }
            Ok(msgs)
        }
        (None, None) => Err(field_error(
            "question",
            "missing (`question` or `messages`)",
        )),
    }
}

fn read_answer(answer: Option<Value>) -> std::result::Result<String, FieldError> {
    match answer {
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(s),
        Some(Value::Number(n)) => Ok(n.to_string()),
        Some(Value::Bool(b)) => Ok(if b { "yes" } else { "no" }.to_string()),
        Some(_) => Err(field_error("answer", "must be a non-empty string")),
        None => Err(field_error("answer", "missing")),
    }
}

fn read_images(
    images: Option<Value>,
    id: &str,
    base_dir: &Path,
) -> std::result::Result<Vec<ImageData>, FieldError> {
    match images {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(list)) => list
            .iter()
            .enumerate()
            .map(|(i, v)| {
                load_image(v, i, id, base_dir).map_err(|r| field_error(&format!("images[{i}]"), r))
            })
            .collect(),
        Some(_) => Err(field_error("images", "must be a list")),
    }
}

/// A row is a question: its last user turn has text, and images placed in the messages match
/// the row's images.
fn check_question(row: &Row) -> std::result::Result<(), FieldError> {
    // The question is the last user turn's text (what every role renders and the wire form
    // requires): a conversation without one is not a question.
    if row.question_text().trim().is_empty() {
        return Err(field_error(
            "messages",
            "no user turn with text (the question is the last `user` turn)",
        ));
    }
    let placeholders = row.image_placeholders();
    if placeholders > 0 && placeholders != row.images.len() {
        return Err(field_error(
            "images",
            format!(
                "the messages have {placeholders} image placeholders but the row has {} images",
                row.images.len()
            ),
        ));
    }
    Ok(())
}

/// Reads one image reference: a path (relative to the dataset file), a data URL, or
/// `{"bytes": base64}` / `{"path": ...}`; checks that it decodes.
fn load_image(
    v: &Value,
    index: usize,
    id: &str,
    base_dir: &Path,
) -> std::result::Result<ImageData, String> {
    let (name, bytes) = match v {
        Value::String(s) if s.starts_with("data:") => {
            let b64 = s
                .split_once(',')
                .map(|(_, b)| b)
                .ok_or("a data URL without a comma")?;
            (format!("{id}#image{index}"), decode_b64(b64)?)
        }
        Value::String(p) => read_path(p, base_dir)?,
        Value::Object(o) => match (o.get("bytes"), o.get("path")) {
            (Some(Value::String(b)), _) => (format!("{id}#image{index}"), decode_b64(b)?),
            (_, Some(Value::String(p))) => read_path(p, base_dir)?,
            _ => return Err("an image object needs `bytes` (base64) or `path`".into()),
        },
        _ => return Err("must be a path, a data URL or {\"bytes\": base64}".into()),
    };
    check_image_bytes(&bytes, &name)?;
    Ok(ImageData { name, bytes })
}

/// Checks that `bytes` decode as an image (the same check for every dataset format); `name`
/// says which image in the error.
pub(crate) fn check_image_bytes(bytes: &[u8], name: &str) -> std::result::Result<(), String> {
    image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| format!("{name}: {e}"))?
        .decode()
        .map_err(|e| format!("{name}: cannot decode: {e}"))?;
    Ok(())
}

/// The largest image file a dataset row may point at: images travel inside gRPC messages, which
/// are limited to 64 MiB.
pub const MAX_IMAGE_FILE_BYTES: u64 = 64 << 20;

fn read_path(p: &str, base_dir: &Path) -> std::result::Result<(String, Vec<u8>), String> {
    let path = base_dir.join(p);
    // Checked before reading: a path to a device or a pipe (/dev/zero, a FIFO) would otherwise
    // be read forever.
    let meta = std::fs::metadata(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("{}: not a regular file", path.display()));
    }
    if meta.len() > MAX_IMAGE_FILE_BYTES {
        return Err(format!(
            "{}: {} bytes, over the {MAX_IMAGE_FILE_BYTES}-byte limit for one image",
            path.display(),
            meta.len()
        ));
    }
    let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((path.display().to_string(), bytes))
}

fn decode_b64(s: &str) -> std::result::Result<Vec<u8>, String> {
    base64::engine::general_purpose::STANDARD
        .decode(s.trim())
        .map_err(|e| format!("invalid base64: {e}"))
}

/// Serialises a row back to a JSONL line, images inlined as base64 unless `image_paths` gives
/// a path (relative to the output file) for each.
pub fn row_to_json(row: &Row, image_paths: Option<&[String]>) -> Value {
    let mut obj = row.extra.clone();
    obj.insert("id".into(), Value::String(row.id.clone()));
    let images: Vec<Value> = match image_paths {
        Some(paths) => paths.iter().map(|p| Value::String(p.clone())).collect(),
        None => row
            .images
            .iter()
            .map(|i| serde_json::json!({"bytes": base64::engine::general_purpose::STANDARD.encode(&i.bytes)}))
            .collect(),
    };
    obj.insert("images".into(), Value::Array(images));
    let single_question = row.messages.len() == 1
        && row.messages[0].role == "user"
        && row.messages[0].content.is_string();
    if single_question {
        obj.insert("question".into(), row.messages[0].content.clone());
    } else {
        obj.insert(
            "messages".into(),
            serde_json::to_value(&row.messages).unwrap_or(Value::Null),
        );
    }
    obj.insert("answer".into(), Value::String(row.answer.clone()));
    insert_answer_metadata(row, &mut obj);
    if let Some(f) = &row.family {
        obj.insert("family".into(), Value::String(f.clone()));
    }
    Value::Object(obj)
}

/// Writes a row's optional `answer_type` and `teacher_answers` into a JSON object (the JSONL
/// row itself, or verl's `extra_info`).
pub(crate) fn insert_answer_metadata(row: &Row, obj: &mut serde_json::Map<String, Value>) {
    if let Some(t) = row.answer_type {
        obj.insert(
            "answer_type".into(),
            serde_json::to_value(t).unwrap_or(Value::Null),
        );
    }
    if !row.teacher_answers.is_empty() {
        obj.insert(
            "teacher_answers".into(),
            serde_json::to_value(&row.teacher_answers).unwrap_or(Value::Null),
        );
    }
}

/// A streaming JSONL reader.
#[derive(Debug)]
pub struct JsonlReader {
    path: PathBuf,
    base_dir: PathBuf,
    lines: std::io::Lines<BufReader<File>>,
    line_no: usize,
    options: ReadOptions,
    report: SkipReport,
}

impl JsonlReader {
    pub fn open(path: &Path, options: ReadOptions) -> Result<Self> {
        let file = File::open(path).map_err(|e| DataError::io(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            base_dir: path.parent().unwrap_or(Path::new(".")).to_path_buf(),
            lines: BufReader::new(file).lines(),
            line_no: 0,
            options,
            report: SkipReport::default(),
        })
    }

    pub fn skip_report(&self) -> &SkipReport {
        &self.report
    }
}

impl Iterator for JsonlReader {
    type Item = Result<Row>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let line = match self.lines.next()? {
                Ok(l) => l,
                Err(e) => return Some(Err(DataError::io(&self.path, e))),
            };
            self.line_no += 1;
            if line.trim().is_empty() {
                continue;
            }
            if let Some(out) = self.report.pass(
                parse_row(&line, &self.path, self.line_no, &self.base_dir),
                self.options,
            ) {
                return Some(out);
            }
        }
    }
}

/// Byte offsets of every non-empty line, for shuffled and random access without holding rows.
pub fn line_offsets(path: &Path) -> Result<Vec<(u64, usize)>> {
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut reader = BufReader::new(file);
    let mut offsets = Vec::new();
    let mut offset = 0u64;
    let mut line_no = 0;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = reader
            .read_until(b'\n', &mut buf)
            .map_err(|e| DataError::io(path, e))?;
        if n == 0 {
            break;
        }
        line_no += 1;
        if buf.iter().any(|b| !b.is_ascii_whitespace()) {
            offsets.push((offset, line_no));
        }
        offset += n as u64;
    }
    Ok(offsets)
}

/// Reads the rows of a JSONL file in an order shuffled deterministically by `seed` (`None`: file
/// order), one row in memory at a time.
#[derive(Debug)]
pub struct ShuffledJsonl {
    path: PathBuf,
    base_dir: PathBuf,
    file: BufReader<File>,
    order: Vec<(u64, usize)>,
    next: usize,
    options: ReadOptions,
    report: SkipReport,
}

impl ShuffledJsonl {
    pub fn open(path: &Path, seed: Option<u64>, options: ReadOptions) -> Result<Self> {
        let mut order = line_offsets(path)?;
        if let Some(seed) = seed {
            order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
        }
        let file = File::open(path).map_err(|e| DataError::io(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            base_dir: path.parent().unwrap_or(Path::new(".")).to_path_buf(),
            file: BufReader::new(file),
            order,
            next: 0,
            options,
            report: SkipReport::default(),
        })
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    pub fn skip_report(&self) -> &SkipReport {
        &self.report
    }

    /// Starts again at `position` in the shuffled order (a resumed run's cursor).
    pub fn seek_to(&mut self, position: usize) {
        self.next = position.min(self.order.len());
    }

    pub fn position(&self) -> usize {
        self.next
    }

    fn read_at(&mut self, offset: u64) -> Result<String> {
        self.file
            .seek(SeekFrom::Start(offset))
            .map_err(|e| DataError::io(&self.path, e))?;
        let mut line = String::new();
        self.file
            .read_line(&mut line)
            .map_err(|e| DataError::io(&self.path, e))?;
        Ok(line)
    }
}

impl Iterator for ShuffledJsonl {
    type Item = Result<Row>;

    fn next(&mut self) -> Option<Self::Item> {
        while self.next < self.order.len() {
            let (offset, line_no) = self.order[self.next];
            self.next += 1;
            let line = match self.read_at(offset) {
                Ok(l) => l,
                Err(e) => return Some(Err(e)),
            };
            if let Some(out) = self.report.pass(
                parse_row(&line, &self.path, line_no, &self.base_dir),
                self.options,
            ) {
                return Some(out);
            }
        }
        None
    }
}

/// Dataset splits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Val,
    Test,
}

impl Split {
    pub fn name(self) -> &'static str {
        match self {
            Self::Train => "train",
            Self::Val => "val",
            Self::Test => "test",
        }
    }
}

impl std::str::FromStr for Split {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "train" => Ok(Self::Train),
            "val" | "validation" => Ok(Self::Val),
            "test" => Ok(Self::Test),
            other => Err(format!("unknown split {other:?} (train, val, test)")),
        }
    }
}

/// The file of a split: `DIR/<split>.jsonl` or `DIR/<split>.parquet` when `path` is a
/// directory, else `path` itself.
pub fn split_file(path: &Path, split: Split) -> Result<PathBuf> {
    if path.is_dir() {
        for ext in ["jsonl", "parquet"] {
            let f = path.join(format!("{}.{ext}", split.name()));
            if f.is_file() {
                return Ok(f);
            }
        }
        return Err(DataError::Missing {
            path: path.join(format!("{}.jsonl", split.name())),
            what: format!("the {} split (.jsonl or .parquet)", split.name()),
        });
    }
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    Err(DataError::Missing {
        path: path.to_path_buf(),
        what: "a dataset file or directory".into(),
    })
}

/// Whether a file is Parquet (by extension); everything else is read as JSONL.
pub fn is_parquet(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("parquet"))
}

/// A streaming reader of either format, chosen by the file's extension.
#[derive(Debug)]
pub enum RowReader {
    Jsonl(JsonlReader),
    Parquet(crate::parquet::ParquetReader),
}

impl RowReader {
    pub fn open(path: &Path, options: ReadOptions) -> Result<Self> {
        Ok(if is_parquet(path) {
            Self::Parquet(crate::parquet::ParquetReader::open(path, options)?)
        } else {
            Self::Jsonl(JsonlReader::open(path, options)?)
        })
    }

    pub fn skip_report(&self) -> &SkipReport {
        match self {
            Self::Jsonl(r) => r.skip_report(),
            Self::Parquet(r) => r.skip_report(),
        }
    }
}

impl Iterator for RowReader {
    type Item = Result<Row>;
    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Self::Jsonl(r) => r.next(),
            Self::Parquet(r) => r.next(),
        }
    }
}

/// Reads a whole split (JSONL or Parquet) into memory (evaluation, small datasets, tests).
pub fn read_all(path: &Path, options: ReadOptions) -> Result<(Vec<Row>, SkipReport)> {
    let mut reader = RowReader::open(path, options)?;
    let rows = reader.by_ref().collect::<Result<Vec<_>>>()?;
    Ok((rows, reader.skip_report().clone()))
}
