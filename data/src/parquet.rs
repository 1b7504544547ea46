//! verl's RL Parquet schema: read it as [`Row`]s, streaming, and write rows back in it.
//!
//! The schema is what verl's `examples/data_preprocess/*.py` write with Hugging Face
//! `datasets.to_parquet`:
//!
//! ```text
//! data_source:  string
//! prompt:       list<struct<role: string, content: string>>   (`<image>` placeholders in content)
//! images:       list<struct<bytes: binary, path: string>>      (optional: absent when text-only)
//! ability:      string                                         (optional)
//! reward_model: struct<style: string, ground_truth: string | list<string>>
//! extra_info:   struct<...>      (varies: commonly split, index, answer, question)
//! ```
//!
//! Mapping to [`Row`]:
//! - `id`: `extra_info.id` when present (a dataset's own id, and what [`write_verl_parquet`]
//!   stores so ids round-trip); else `{data_source}-{split}-{index}` from `data_source`,
//!   `extra_info.split` and `extra_info.index` (the parts that exist, `index` required); else
//!   `{file stem}-{row}`.
//! - `messages`: `prompt`, content as written (placeholders included); a plain string `prompt`
//!   is one user turn.
//! - `images`: each struct's `bytes`, or the file at `path` (relative to the Parquet file) when
//!   `bytes` is null or empty; every image must decode.
//! - `answer`: `reward_model.ground_truth`, the first element when it is a list.
//! - `answer_type`, `family`, `teacher_answers`: from `extra_info` (`family` falls back to
//!   `data_source`).
//! - `extra`: `data_source`, `ability`, the whole `reward_model` and `extra_info` structs as
//!   JSON, and any other column by its name (null values left out). Binary values inside
//!   them become base64 strings; Arrow types with no JSON counterpart (dates, decimals) become
//!   null.
//!
//! Validation is the JSONL reader's: a missing prompt or one with no question text, a missing
//! or empty ground truth, an image that does not decode, or `<image>` placeholders (when there
//! are any) that do not match the number of images make a row bad: a [`DataError::BadRow`]
//! naming the file, the row (numbered from 1 across row groups), the id and the field
//! (`prompt`, `reward_model.ground_truth`, `images[1]`, ...), or, with
//! [`ReadOptions::skip_bad_rows`], a skipped row counted in the [`SkipReport`]. A file without
//! `prompt` or `reward_model.ground_truth` columns is refused when opened.
//!
//! Reading decodes [`BATCH_ROWS`] rows at a time; the file is never read whole.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::{
    Float16Type, Float32Type, Float64Type, Int8Type, Int16Type, Int32Type, Int64Type, UInt8Type,
    UInt16Type, UInt32Type, UInt64Type,
};
use arrow_array::{
    Array, ArrayRef, BinaryArray, BooleanArray, Float64Array, Int64Array, ListArray, RecordBatch,
    StringArray, StructArray,
};
use arrow_buffer::{NullBuffer, OffsetBuffer};
use arrow_schema::{ArrowError, DataType, Field, FieldRef, Fields, Schema, SchemaRef};
use base64::Engine;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use serde_json::{Map, Value};

use crate::dataset::{
    ImageData, Message, ReadOptions, Row, SkipReport, check_image_bytes, content_text,
};
use crate::error::{DataError, Result};

/// Rows decoded at a time. A batch of image rows is held in memory whole, so it is small.
pub const BATCH_ROWS: usize = 64;

/// The columns of verl's schema; any other column is kept in [`Row::extra`] by name.
const VERL_COLUMNS: [&str; 6] = [
    "data_source",
    "prompt",
    "images",
    "ability",
    "reward_model",
    "extra_info",
];

/// A streaming reader of a Parquet file in verl's RL schema.
pub struct ParquetReader {
    path: PathBuf,
    base_dir: PathBuf,
    stem: String,
    batches: ParquetRecordBatchReader,
    batch: Option<RecordBatch>,
    next_in_batch: usize,
    /// Rows consumed so far (the 1-based number of the last row read).
    row: usize,
    num_rows: usize,
    options: ReadOptions,
    report: SkipReport,
    finished: bool,
}

impl std::fmt::Debug for ParquetReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParquetReader")
            .field("path", &self.path)
            .field("row", &self.row)
            .field("num_rows", &self.num_rows)
            .field("options", &self.options)
            .field("report", &self.report)
            .finish_non_exhaustive()
    }
}

impl ParquetReader {
    /// Opens `path` and checks that it is Parquet with verl's `prompt` and
    /// `reward_model.ground_truth` columns. Reads only the footer.
    pub fn open(path: &Path, options: ReadOptions) -> Result<Self> {
        let file = File::open(path).map_err(|e| DataError::io(path, e))?;
        let builder =
            ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| unreadable(path, &e))?;
        check_schema(path, builder.schema())?;
        let num_rows = usize::try_from(builder.metadata().file_metadata().num_rows()).unwrap_or(0);
        let batches = builder
            .with_batch_size(BATCH_ROWS)
            .build()
            .map_err(|e| unreadable(path, &e))?;
        Ok(Self {
            path: path.to_path_buf(),
            base_dir: path.parent().unwrap_or(Path::new(".")).to_path_buf(),
            stem: path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "row".into()),
            batches,
            batch: None,
            next_in_batch: 0,
            row: 0,
            num_rows,
            options,
            report: SkipReport::default(),
            finished: false,
        })
    }

    pub fn skip_report(&self) -> &SkipReport {
        &self.report
    }

    /// Rows in the file (from its footer), bad ones included.
    pub fn num_rows(&self) -> usize {
        self.num_rows
    }
}

fn unreadable(path: &Path, e: &dyn std::fmt::Display) -> DataError {
    DataError::Invalid(format!(
        "{}: not a readable Parquet file: {e}",
        path.display()
    ))
}

fn check_schema(path: &Path, schema: &Schema) -> Result<()> {
    let missing = |what: &str| DataError::Missing {
        path: path.to_path_buf(),
        what: format!("{what} (verl's RL schema)"),
    };
    if schema.field_with_name("prompt").is_err() {
        return Err(missing("column `prompt`"));
    }
    match schema
        .field_with_name("reward_model")
        .map(|f| f.data_type())
    {
        Ok(DataType::Struct(fields)) if fields.find("ground_truth").is_some() => Ok(()),
        Ok(_) => Err(missing("struct field `reward_model.ground_truth`")),
        Err(_) => Err(missing("column `reward_model`")),
    }
}

impl Iterator for ParquetReader {
    type Item = Result<Row>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.finished {
            let batch = match &self.batch {
                Some(batch) if self.next_in_batch < batch.num_rows() => batch,
                _ => {
                    // The parquet crate can panic on a corrupt file (seen by the fuzzer:
                    // "offset + len out of bounds" in arrow-buffer): caught and reported as an
                    // unreadable file, naming it, like its errors.
                    let next = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        self.batches.next()
                    }))
                    .unwrap_or_else(|panic| {
                        let what = panic
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "the Parquet decoder panicked".into());
                        Some(Err(ArrowError::ParseError(format!(
                            "corrupt file (the decoder failed: {what})"
                        ))))
                    });
                    match next {
                        None => self.finished = true,
                        Some(Ok(batch)) => {
                            self.batch = Some(batch);
                            self.next_in_batch = 0;
                        }
                        Some(Err(e)) => {
                            // A page that does not decode: the rows it holds are unknown, so
                            // this cannot be skipped as a row.
                            self.finished = true;
                            return Some(Err(DataError::Invalid(format!(
                                "{}: cannot read the rows after row {}: {e}",
                                self.path.display(),
                                self.row
                            ))));
                        }
                    }
                    continue;
                }
            };
            let index = self.next_in_batch;
            self.next_in_batch += 1;
            self.row += 1;
            let at = RowAt {
                file: &self.path,
                base_dir: &self.base_dir,
                stem: &self.stem,
                row: self.row,
            };
            if let Some(out) = self
                .report
                .pass(parse_verl_row(batch, index, &at), self.options)
            {
                return Some(out);
            }
        }
        None
    }
}

/// Where a row comes from, for its id and its errors.
struct RowAt<'a> {
    file: &'a Path,
    base_dir: &'a Path,
    stem: &'a str,
    /// 1-based, across row groups.
    row: usize,
}

fn parse_verl_row(batch: &RecordBatch, i: usize, at: &RowAt<'_>) -> Result<Row> {
    let column = |name: &str| {
        batch
            .column_by_name(name)
            .map(|c| c.as_ref())
            .filter(|c| !is_null_at(*c, i))
    };
    let data_source = column("data_source").and_then(|c| str_at(c, i));
    let extra_info = column("extra_info").map(|c| to_json(c, i));
    let info = extra_info.as_ref().and_then(Value::as_object);
    let id = row_id(data_source, info, at);
    let bad = |field: &str, reason: String| DataError::BadRow {
        file: at.file.to_path_buf(),
        row: at.row,
        id: Some(id.clone()),
        field: field.to_string(),
        reason,
    };

    let prompt = column("prompt").ok_or_else(|| bad("prompt", "missing".into()))?;
    let messages = read_prompt(&to_json(prompt, i)).map_err(|r| bad("prompt", r))?;
    if messages.is_empty() || messages.iter().all(|m| content_text(&m.content).is_empty()) {
        return Err(bad("prompt", "no question text".into()));
    }

    let reward_model = column("reward_model").map_or(Value::Null, |c| to_json(c, i));
    let answer = read_ground_truth(reward_model.get("ground_truth"))
        .map_err(|r| bad("reward_model.ground_truth", r))?;

    let answer_type = match info.and_then(|o| o.get("answer_type")) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(
            s.parse()
                .map_err(|e: String| bad("extra_info.answer_type", e))?,
        ),
        Some(_) => return Err(bad("extra_info.answer_type", "must be a string".into())),
    };
    let family = match info.and_then(|o| o.get("family")) {
        Some(Value::String(s)) => Some(s.clone()),
        _ => data_source.map(str::to_string),
    };
    let teacher_answers = read_teacher_answers(info.and_then(|o| o.get("teacher_answers")))
        .map_err(|r| bad("extra_info.teacher_answers", r))?;

    let images = match column("images") {
        None => Vec::new(),
        Some(list) => read_images(list, i, &id, at.base_dir).map_err(|(f, r)| bad(&f, r))?,
    };

    let mut extra = Map::new();
    for (field, array) in batch.schema().fields().iter().zip(batch.columns()) {
        let name = field.name();
        if name == "prompt" || name == "images" {
            continue;
        }
        let value = match name.as_str() {
            "reward_model" => reward_model.clone(),
            "extra_info" => extra_info.clone().unwrap_or(Value::Null),
            _ => to_json(array.as_ref(), i),
        };
        if !value.is_null() {
            extra.insert(name.clone(), value);
        }
    }

    let row = Row {
        id: id.clone(),
        images,
        messages,
        answer,
        answer_type,
        teacher_answers,
        family,
        extra,
    };
    let placeholders = row.image_placeholders();
    if placeholders > 0 && placeholders != row.images.len() {
        return Err(bad(
            "images",
            format!(
                "the prompt has {placeholders} image placeholders but the row has {} images",
                row.images.len()
            ),
        ));
    }
    Ok(row)
}

fn row_id(data_source: Option<&str>, info: Option<&Map<String, Value>>, at: &RowAt<'_>) -> String {
    let scalar = |key: &str| match info.and_then(|o| o.get(key)) {
        Some(Value::String(s)) if !s.trim().is_empty() => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    if let Some(id) = scalar("id") {
        return id;
    }
    if let Some(index) = scalar("index") {
        return [
            data_source.map(str::to_string),
            scalar("split"),
            Some(index),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join("-");
    }
    format!("{}-{}", at.stem, at.row)
}

fn read_prompt(prompt: &Value) -> std::result::Result<Vec<Message>, String> {
    match prompt {
        Value::String(s) => Ok(vec![Message {
            role: "user".into(),
            content: Value::String(s.clone()),
        }]),
        Value::Array(turns) => turns
            .iter()
            .enumerate()
            .map(|(j, turn)| match (turn.get("role"), turn.get("content")) {
                (Some(Value::String(role)), Some(content))
                    if !content.is_null() && !role.trim().is_empty() =>
                {
                    Ok(Message {
                        role: role.clone(),
                        content: content.clone(),
                    })
                }
                _ => Err(format!(
                    "turn {j} needs `role` (a non-empty string) and `content`, got {turn}"
                )),
            })
            .collect(),
        _ => Err("must be a list of {role, content}".into()),
    }
}

fn read_ground_truth(value: Option<&Value>) -> std::result::Result<String, String> {
    let scalar = |v: &Value| match v {
        Value::String(s) if !s.trim().is_empty() => Ok(s.clone()),
        Value::String(_) => Err("empty".to_string()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(if *b { "yes" } else { "no" }.to_string()),
        Value::Null => Err("missing".to_string()),
        _ => Err("must be a string or a list of strings".to_string()),
    };
    match value {
        None => Err("missing".into()),
        Some(Value::Array(list)) => match list.first() {
            Some(first) => scalar(first).map_err(|r| format!("first element: {r}")),
            None => Err("an empty list".into()),
        },
        Some(v) => scalar(v),
    }
}

fn read_teacher_answers(
    value: Option<&Value>,
) -> std::result::Result<BTreeMap<String, Vec<String>>, String> {
    let value = match value {
        None | Some(Value::Null) => return Ok(BTreeMap::new()),
        Some(Value::String(s)) => {
            serde_json::from_str(s).map_err(|e| format!("invalid JSON: {e}"))?
        }
        Some(v) => v.clone(),
    };
    let Value::Object(map) = value else {
        return Err("must map teacher names to lists of strings".into());
    };
    // Parquet stores the union of all rows' teachers: a teacher absent from this row is null.
    map.into_iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(name, v)| {
            serde_json::from_value(v)
                .map(|answers| (name.clone(), answers))
                .map_err(|e| format!("`{name}` must be a list of strings: {e}"))
        })
        .collect()
}

/// The row's images; an error names the field (`images`, `images[i]`).
fn read_images(
    column: &dyn Array,
    i: usize,
    id: &str,
    base_dir: &Path,
) -> std::result::Result<Vec<ImageData>, (String, String)> {
    let list = list_at(column, i).ok_or_else(|| {
        (
            "images".to_string(),
            format!(
                "must be a list of {{bytes, path}}, not {}",
                column.data_type()
            ),
        )
    })?;
    (0..list.len())
        .map(|j| {
            let field = || format!("images[{j}]");
            let (name, bytes) =
                image_at(list.as_ref(), j, id, base_dir).map_err(|r| (field(), r))?;
            check_image_bytes(&bytes, &name).map_err(|r| (field(), r))?;
            Ok(ImageData { name, bytes })
        })
        .collect()
}

/// One image: `{bytes, path}` (bytes first), plain bytes, or a path.
fn image_at(
    list: &dyn Array,
    j: usize,
    id: &str,
    base_dir: &Path,
) -> std::result::Result<(String, Vec<u8>), String> {
    let inline = |bytes: &[u8]| (format!("{id}#image{j}"), bytes.to_vec());
    let from_path = |p: &str| {
        let path = base_dir.join(p);
        std::fs::read(&path)
            .map(|bytes| (path.display().to_string(), bytes))
            .map_err(|e| format!("{}: {e}", path.display()))
    };
    if is_null_at(list, j) {
        return Err("null".into());
    }
    if let Some(image) = list.as_struct_opt() {
        let field = |name: &str| image.column_by_name(name).map(|c| c.as_ref());
        if let Some(bytes) = field("bytes")
            .and_then(|c| bytes_at(c, j))
            .filter(|b| !b.is_empty())
        {
            return Ok(inline(bytes));
        }
        if let Some(path) = field("path")
            .and_then(|c| str_at(c, j))
            .filter(|p| !p.is_empty())
        {
            return from_path(path);
        }
        return Err("an image needs `bytes` or `path`; both are null or empty".into());
    }
    if let Some(bytes) = bytes_at(list, j) {
        return Ok(inline(bytes));
    }
    if let Some(path) = str_at(list, j) {
        return from_path(path);
    }
    Err(format!(
        "must be a struct {{bytes, path}}, bytes or a path, not {}",
        list.data_type()
    ))
}

/// Null-type arrays have no validity buffer: every slot is null.
fn is_null_at(array: &dyn Array, i: usize) -> bool {
    array.data_type() == &DataType::Null || array.is_null(i)
}

fn str_at(array: &dyn Array, i: usize) -> Option<&str> {
    if is_null_at(array, i) {
        return None;
    }
    match array.data_type() {
        DataType::Utf8 => Some(array.as_string::<i32>().value(i)),
        DataType::LargeUtf8 => Some(array.as_string::<i64>().value(i)),
        DataType::Utf8View => Some(array.as_string_view().value(i)),
        _ => None,
    }
}

fn bytes_at(array: &dyn Array, i: usize) -> Option<&[u8]> {
    if is_null_at(array, i) {
        return None;
    }
    match array.data_type() {
        DataType::Binary => Some(array.as_binary::<i32>().value(i)),
        DataType::LargeBinary => Some(array.as_binary::<i64>().value(i)),
        DataType::BinaryView => Some(array.as_binary_view().value(i)),
        DataType::FixedSizeBinary(_) => Some(array.as_fixed_size_binary().value(i)),
        _ => None,
    }
}

fn list_at(array: &dyn Array, i: usize) -> Option<ArrayRef> {
    if is_null_at(array, i) {
        return None;
    }
    match array.data_type() {
        DataType::List(_) => Some(array.as_list::<i32>().value(i)),
        DataType::LargeList(_) => Some(array.as_list::<i64>().value(i)),
        DataType::FixedSizeList(..) => Some(array.as_fixed_size_list().value(i)),
        _ => None,
    }
}

/// One Arrow value as JSON. Binary becomes base64; types with no JSON counterpart become null.
fn to_json(array: &dyn Array, i: usize) -> Value {
    fn float(x: f64) -> Value {
        serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)
    }
    if is_null_at(array, i) {
        return Value::Null;
    }
    match array.data_type() {
        DataType::Boolean => Value::Bool(array.as_boolean().value(i)),
        DataType::Int8 => array.as_primitive::<Int8Type>().value(i).into(),
        DataType::Int16 => array.as_primitive::<Int16Type>().value(i).into(),
        DataType::Int32 => array.as_primitive::<Int32Type>().value(i).into(),
        DataType::Int64 => array.as_primitive::<Int64Type>().value(i).into(),
        DataType::UInt8 => array.as_primitive::<UInt8Type>().value(i).into(),
        DataType::UInt16 => array.as_primitive::<UInt16Type>().value(i).into(),
        DataType::UInt32 => array.as_primitive::<UInt32Type>().value(i).into(),
        DataType::UInt64 => array.as_primitive::<UInt64Type>().value(i).into(),
        DataType::Float16 => float(array.as_primitive::<Float16Type>().value(i).to_f64()),
        DataType::Float32 => float(f64::from(array.as_primitive::<Float32Type>().value(i))),
        DataType::Float64 => float(array.as_primitive::<Float64Type>().value(i)),
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
            str_at(array, i).map_or(Value::Null, |s| Value::String(s.to_string()))
        }
        DataType::Binary
        | DataType::LargeBinary
        | DataType::BinaryView
        | DataType::FixedSizeBinary(_) => bytes_at(array, i).map_or(Value::Null, |b| {
            Value::String(base64::engine::general_purpose::STANDARD.encode(b))
        }),
        DataType::List(_) | DataType::LargeList(_) | DataType::FixedSizeList(..) => {
            list_at(array, i).map_or(Value::Null, |list| {
                Value::Array((0..list.len()).map(|j| to_json(list.as_ref(), j)).collect())
            })
        }
        DataType::Struct(_) => {
            let s = array.as_struct();
            Value::Object(
                s.fields()
                    .iter()
                    .zip(s.columns())
                    .map(|(f, c)| (f.name().clone(), to_json(c.as_ref(), i)))
                    .collect(),
            )
        }
        DataType::Map(..) => {
            let entries = array.as_map().value(i);
            let (keys, values) = (entries.column(0), entries.column(1));
            Value::Object(
                (0..entries.len())
                    .map(|j| {
                        let key = match to_json(keys.as_ref(), j) {
                            Value::String(s) => s,
                            other => other.to_string(),
                        };
                        (key, to_json(values.as_ref(), j))
                    })
                    .collect(),
            )
        }
        DataType::Dictionary(..) => {
            let dictionary = array.as_any_dictionary();
            to_json(dictionary.keys(), i)
                .as_u64()
                .and_then(|k| usize::try_from(k).ok())
                .map_or(Value::Null, |k| to_json(dictionary.values().as_ref(), k))
        }
        _ => Value::Null,
    }
}

/// How [`write_verl_parquet_with`] cuts the file into row groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteOptions {
    /// Rows per row group at most (Hugging Face `datasets` writes 100 per group for images).
    pub max_rows_per_group: usize,
    /// Bytes per row group at most (estimated, images included); at most 1 GiB.
    pub max_bytes_per_group: usize,
}

impl Default for WriteOptions {
    fn default() -> Self {
        Self {
            max_rows_per_group: 256,
            max_bytes_per_group: 64 << 20,
        }
    }
}

/// Writes `rows` in verl's RL schema with [`WriteOptions::default`]. See
/// [`write_verl_parquet_with`].
pub fn write_verl_parquet(rows: &[Row], path: &Path, data_source: &str, split: &str) -> Result<()> {
    write_verl_parquet_with(rows, path, data_source, split, WriteOptions::default())
}

/// Writes `rows` in verl's RL schema, snappy-compressed, atomically (a temporary file renamed
/// into place).
///
/// - `data_source` is the same for every row; `ability` is `extra.ability`.
/// - `prompt` is the messages; list content (`{"type": "image"}` / `{"type": "text"}` parts)
///   becomes one string with `<image>` placeholders, as verl expects.
/// - `images` are `{bytes, path: null}`; the column is left out when no row has an image.
/// - `reward_model` is `{style: extra.reward_model.style or "rule", ground_truth: answer}` (a
///   list ground truth is written as its first element, the answer).
/// - `extra_info` is `extra.extra_info` plus `split` (this file's), `index` (kept, else the
///   row's position), `id` (so the id round-trips), `answer` and `question` when absent, and
///   `answer_type`, `teacher_answers` and `family` (unless it is `data_source`) when the row
///   has them.
/// - Any other key of `extra` becomes a column of that name.
///
/// Nested values are stored as Arrow structs and lists with types inferred over all rows
/// (integers widen to floats); a key whose values disagree in type is stored as JSON text.
pub fn write_verl_parquet_with(
    rows: &[Row],
    path: &Path,
    data_source: &str,
    split: &str,
    options: WriteOptions,
) -> Result<()> {
    if options.max_rows_per_group == 0
        || options.max_bytes_per_group == 0
        || options.max_bytes_per_group > 1 << 30
    {
        return Err(DataError::Invalid(format!(
            "{}: row groups need 1 row or more and between 1 byte and 1 GiB, got {options:?}",
            path.display()
        )));
    }
    let file_name = path
        .file_name()
        .ok_or_else(|| DataError::Invalid(format!("{}: not a file path", path.display())))?;
    let tmp = path.with_file_name(format!(
        ".{}.tmp{}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let result = write_to(rows, path, &tmp, data_source, split, options)
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| DataError::io(path, e)));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn write_to(
    rows: &[Row],
    path: &Path,
    tmp: &Path,
    data_source: &str,
    split: &str,
    options: WriteOptions,
) -> Result<()> {
    let cannot = |e: &dyn std::fmt::Display| {
        DataError::Invalid(format!("{}: cannot write Parquet: {e}", path.display()))
    };
    let plan = WritePlan::new(rows, data_source, split);
    let schema = plan.schema();
    let file = File::create(tmp).map_err(|e| DataError::io(tmp, e))?;
    let properties = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(options.max_rows_per_group))
        .set_max_row_group_bytes(Some(options.max_bytes_per_group))
        .build();
    let mut writer =
        ArrowWriter::try_new(file, schema.clone(), Some(properties)).map_err(|e| cannot(&e))?;
    // Batches of at most one row group's rows and bytes, so that arrays stay bounded.
    let mut start = 0;
    while start < rows.len() {
        let mut end = start;
        let mut bytes = 0;
        while end < rows.len() && end - start < options.max_rows_per_group {
            let row_bytes: usize = rows[end].images.iter().map(|i| i.bytes.len()).sum();
            if end > start && bytes + row_bytes > options.max_bytes_per_group {
                break;
            }
            bytes += row_bytes;
            end += 1;
        }
        let batch = plan
            .batch(&schema, rows, start..end, data_source)
            .map_err(|e| cannot(&e))?;
        writer.write(&batch).map_err(|e| cannot(&e))?;
        start = end;
    }
    writer.finish().map_err(|e| cannot(&e))?;
    writer
        .inner()
        .sync_all()
        .map_err(|e| DataError::io(tmp, e))?;
    Ok(())
}

/// The JSON-valued columns of every row and the Arrow shapes inferred over all of them.
struct WritePlan {
    prompts: Vec<Value>,
    reward_models: Vec<Value>,
    extra_infos: Vec<Value>,
    extra_info_shape: Shape,
    /// Columns from other `extra` keys, in order of first appearance.
    extra_columns: Vec<(String, Shape)>,
    with_images: bool,
}

impl WritePlan {
    fn new(rows: &[Row], data_source: &str, split: &str) -> Self {
        let prompts = rows
            .iter()
            .map(|r| {
                Value::Array(
                    r.messages
                        .iter()
                        .map(|m| serde_json::json!({"role": m.role, "content": verl_content(&m.content)}))
                        .collect(),
                )
            })
            .collect();
        let reward_models = rows
            .iter()
            .map(|r| {
                let style = r
                    .extra
                    .get("reward_model")
                    .and_then(|v| v.get("style"))
                    .and_then(Value::as_str)
                    .unwrap_or("rule");
                serde_json::json!({"style": style, "ground_truth": r.answer})
            })
            .collect();
        let extra_infos: Vec<Value> = rows
            .iter()
            .enumerate()
            .map(|(position, r)| Value::Object(extra_info(r, position, data_source, split)))
            .collect();
        let extra_info_shape = extra_infos
            .iter()
            .fold(Shape::Null, |s, v| s.merge(Shape::of(v)))
            .finish();
        let mut extra_columns: Vec<(String, Shape)> = Vec::new();
        for row in rows {
            for (key, value) in &row.extra {
                if VERL_COLUMNS.contains(&key.as_str()) {
                    continue;
                }
                match extra_columns.iter_mut().find(|(k, _)| k == key) {
                    Some((_, shape)) => *shape = shape.clone().merge(Shape::of(value)),
                    None => extra_columns.push((key.clone(), Shape::of(value))),
                }
            }
        }
        for (_, shape) in &mut extra_columns {
            *shape = shape.clone().finish();
        }
        Self {
            prompts,
            reward_models,
            extra_infos,
            extra_info_shape,
            extra_columns,
            with_images: rows.iter().any(|r| !r.images.is_empty()),
        }
    }

    fn schema(&self) -> SchemaRef {
        let mut fields = vec![
            Field::new("data_source", DataType::Utf8, true),
            Field::new("prompt", prompt_shape().data_type(), true),
        ];
        if self.with_images {
            fields.push(Field::new("images", images_type(), true));
        }
        fields.push(Field::new("ability", DataType::Utf8, true));
        fields.push(Field::new(
            "reward_model",
            reward_model_shape().data_type(),
            true,
        ));
        fields.push(Field::new(
            "extra_info",
            self.extra_info_shape.data_type(),
            true,
        ));
        for (name, shape) in &self.extra_columns {
            fields.push(Field::new(name, shape.data_type(), true));
        }
        Arc::new(Schema::new(fields))
    }

    fn batch<'a>(
        &'a self,
        schema: &SchemaRef,
        rows: &[Row],
        range: std::ops::Range<usize>,
        data_source: &str,
    ) -> std::result::Result<RecordBatch, ArrowError> {
        let chunk = &rows[range.clone()];
        let refs = |values: &'a [Value]| -> Vec<Option<&'a Value>> {
            values[range.clone()].iter().map(Some).collect()
        };
        let mut columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from(vec![data_source; chunk.len()])),
            prompt_shape().build(&refs(&self.prompts))?,
        ];
        if self.with_images {
            columns.push(images_array(chunk)?);
        }
        columns.push(Arc::new(StringArray::from(
            chunk
                .iter()
                .map(|r| match r.extra.get("ability") {
                    None | Some(Value::Null) => None,
                    Some(Value::String(s)) => Some(s.clone()),
                    Some(other) => Some(other.to_string()),
                })
                .collect::<Vec<_>>(),
        )));
        columns.push(reward_model_shape().build(&refs(&self.reward_models))?);
        columns.push(self.extra_info_shape.build(&refs(&self.extra_infos))?);
        for (name, shape) in &self.extra_columns {
            let values: Vec<Option<&Value>> = chunk.iter().map(|r| r.extra.get(name)).collect();
            columns.push(shape.build(&values)?);
        }
        RecordBatch::try_new(schema.clone(), columns)
    }
}

fn prompt_shape() -> Shape {
    Shape::List(Box::new(Shape::Struct(vec![
        ("role".into(), Shape::Str),
        ("content".into(), Shape::Str),
    ])))
}

fn reward_model_shape() -> Shape {
    Shape::Struct(vec![
        ("style".into(), Shape::Str),
        ("ground_truth".into(), Shape::Str),
    ])
}

fn extra_info(row: &Row, position: usize, data_source: &str, split: &str) -> Map<String, Value> {
    let mut info = match row.extra.get("extra_info") {
        Some(Value::Object(o)) => o.clone(),
        _ => Map::new(),
    };
    info.insert("split".into(), Value::String(split.to_string()));
    if !info.get("index").is_some_and(Value::is_i64) {
        info.insert("index".into(), Value::from(position));
    }
    info.insert("id".into(), Value::String(row.id.clone()));
    if info.get("answer").is_none_or(Value::is_null) {
        info.insert("answer".into(), Value::String(row.answer.clone()));
    }
    if info.get("question").is_none_or(Value::is_null) {
        // As verl's scripts store it: the user's text, placeholders included.
        let question = row
            .messages
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .map_or(Value::Null, |m| verl_content(&m.content));
        info.insert("question".into(), question);
    }
    // The reader falls back to `data_source` for the family.
    if let Some(family) = row.family.as_ref().filter(|f| *f != data_source) {
        info.insert("family".into(), Value::String(family.clone()));
    }
    crate::dataset::insert_answer_metadata(row, &mut info);
    info
}

/// verl's content is a string with `<image>` placeholders: list content is flattened to one.
fn verl_content(content: &Value) -> Value {
    let Value::Array(parts) = content else {
        return content.clone();
    };
    let mut text = String::new();
    let mut after_text = false;
    for part in parts {
        match part.get("type").and_then(Value::as_str) {
            Some("image") => {
                text.push_str("<image>");
                after_text = false;
            }
            Some("text") => {
                if after_text {
                    text.push(' ');
                }
                text.push_str(part.get("text").and_then(Value::as_str).unwrap_or_default());
                after_text = true;
            }
            _ => {}
        }
    }
    Value::String(text)
}

fn list_field(item: DataType) -> FieldRef {
    // "element", as the Parquet spec and pyarrow name it.
    Arc::new(Field::new("element", item, true))
}

fn image_fields() -> Fields {
    Fields::from(vec![
        Field::new("bytes", DataType::Binary, true),
        Field::new("path", DataType::Utf8, true),
    ])
}

fn images_type() -> DataType {
    DataType::List(list_field(DataType::Struct(image_fields())))
}

fn images_array(rows: &[Row]) -> std::result::Result<ArrayRef, ArrowError> {
    let bytes = BinaryArray::from_iter_values(
        rows.iter()
            .flat_map(|r| r.images.iter().map(|i| i.bytes.as_slice())),
    );
    let count = bytes.len();
    let images = StructArray::try_new_with_length(
        image_fields(),
        vec![Arc::new(bytes), Arc::new(StringArray::new_null(count))],
        None,
        count,
    )?;
    Ok(Arc::new(ListArray::try_new(
        list_field(DataType::Struct(image_fields())),
        OffsetBuffer::from_lengths(rows.iter().map(|r| r.images.len())),
        Arc::new(images),
        None,
    )?))
}

/// The Arrow type of JSON values, inferred over all rows.
#[derive(Debug, Clone, PartialEq)]
enum Shape {
    /// Only nulls seen so far.
    Null,
    Bool,
    Int,
    Float,
    Str,
    List(Box<Shape>),
    Struct(Vec<(String, Shape)>),
    /// Values that disagree in type: stored as JSON text.
    Json,
}

impl Shape {
    fn of(value: &Value) -> Self {
        match value {
            Value::Null => Self::Null,
            Value::Bool(_) => Self::Bool,
            Value::Number(n) if n.is_i64() => Self::Int,
            Value::Number(_) => Self::Float,
            Value::String(_) => Self::Str,
            Value::Array(items) => Self::List(Box::new(
                items.iter().fold(Self::Null, |s, v| s.merge(Self::of(v))),
            )),
            Value::Object(o) => {
                Self::Struct(o.iter().map(|(k, v)| (k.clone(), Self::of(v))).collect())
            }
        }
    }

    fn merge(self, other: Self) -> Self {
        match (self, other) {
            (Self::Null, s) | (s, Self::Null) => s,
            (Self::Int, Self::Float) | (Self::Float, Self::Int) => Self::Float,
            (Self::List(a), Self::List(b)) => Self::List(Box::new(a.merge(*b))),
            (Self::Struct(mut a), Self::Struct(b)) => {
                for (key, shape) in b {
                    match a.iter_mut().find(|(k, _)| *k == key) {
                        Some((_, s)) => *s = s.clone().merge(shape),
                        None => a.push((key, shape)),
                    }
                }
                Self::Struct(a)
            }
            (a, b) if a == b => a,
            _ => Self::Json,
        }
    }

    /// The shape to write: all-null values become nullable strings, and empty structs (which
    /// Parquet cannot store) JSON text.
    fn finish(self) -> Self {
        match self {
            Self::Null => Self::Str,
            Self::List(item) => Self::List(Box::new(item.finish())),
            Self::Struct(fields) if fields.is_empty() => Self::Json,
            Self::Struct(fields) => {
                Self::Struct(fields.into_iter().map(|(k, s)| (k, s.finish())).collect())
            }
            s => s,
        }
    }

    fn data_type(&self) -> DataType {
        match self {
            Self::Bool => DataType::Boolean,
            Self::Int => DataType::Int64,
            Self::Float => DataType::Float64,
            Self::Null | Self::Str | Self::Json => DataType::Utf8,
            Self::List(item) => DataType::List(list_field(item.data_type())),
            Self::Struct(fields) => DataType::Struct(Self::arrow_fields(fields)),
        }
    }

    fn arrow_fields(fields: &[(String, Shape)]) -> Fields {
        fields
            .iter()
            .map(|(name, shape)| Field::new(name, shape.data_type(), true))
            .collect()
    }

    fn build(&self, values: &[Option<&Value>]) -> std::result::Result<ArrayRef, ArrowError> {
        fn present<'a>(v: &Option<&'a Value>) -> Option<&'a Value> {
            v.filter(|v| !v.is_null())
        }
        Ok(match self {
            Self::Bool => Arc::new(BooleanArray::from(
                values
                    .iter()
                    .map(|v| present(v).and_then(Value::as_bool))
                    .collect::<Vec<_>>(),
            )),
            Self::Int => Arc::new(Int64Array::from(
                values
                    .iter()
                    .map(|v| present(v).and_then(Value::as_i64))
                    .collect::<Vec<_>>(),
            )),
            Self::Float => Arc::new(Float64Array::from(
                values
                    .iter()
                    .map(|v| present(v).and_then(Value::as_f64))
                    .collect::<Vec<_>>(),
            )),
            Self::Null | Self::Str => Arc::new(StringArray::from(
                values
                    .iter()
                    .map(|v| {
                        present(v).map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string))
                    })
                    .collect::<Vec<_>>(),
            )),
            Self::Json => Arc::new(StringArray::from(
                values
                    .iter()
                    .map(|v| present(v).map(Value::to_string))
                    .collect::<Vec<_>>(),
            )),
            Self::List(item) => {
                let lists: Vec<Option<&Vec<Value>>> = values
                    .iter()
                    .map(|v| present(v).and_then(Value::as_array))
                    .collect();
                let flat: Vec<Option<&Value>> = lists
                    .iter()
                    .flatten()
                    .flat_map(|l| l.iter().map(Some))
                    .collect();
                Arc::new(ListArray::try_new(
                    list_field(item.data_type()),
                    OffsetBuffer::from_lengths(lists.iter().map(|l| l.map_or(0, Vec::len))),
                    item.build(&flat)?,
                    Some(NullBuffer::from(
                        lists.iter().map(Option::is_some).collect::<Vec<_>>(),
                    )),
                )?)
            }
            Self::Struct(fields) => {
                let objects: Vec<Option<&Map<String, Value>>> = values
                    .iter()
                    .map(|v| present(v).and_then(Value::as_object))
                    .collect();
                let children = fields
                    .iter()
                    .map(|(name, shape)| {
                        let child: Vec<Option<&Value>> = objects
                            .iter()
                            .map(|o| o.and_then(|o| o.get(name)))
                            .collect();
                        shape.build(&child)
                    })
                    .collect::<std::result::Result<Vec<_>, _>>()?;
                Arc::new(StructArray::try_new_with_length(
                    Self::arrow_fields(fields),
                    children,
                    Some(NullBuffer::from(
                        objects.iter().map(Option::is_some).collect::<Vec<_>>(),
                    )),
                    values.len(),
                )?)
            }
        })
    }
}
