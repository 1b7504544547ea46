//! Writing rows in verl's RL schema (atomically, in bounded row groups).

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use arrow_array::{
    Array, ArrayRef, BinaryArray, BooleanArray, Float64Array, Int64Array, ListArray, RecordBatch,
    StringArray, StructArray,
};
use arrow_buffer::{NullBuffer, OffsetBuffer};
use arrow_schema::{ArrowError, DataType, Field, FieldRef, Fields, Schema, SchemaRef};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use serde_json::{Map, Value};

use super::VERL_COLUMNS;
use crate::dataset::Row;
use crate::error::{DataError, Result};

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
    if path.file_name().is_none() {
        return Err(DataError::Invalid(format!(
            "{}: not a file path",
            path.display()
        )));
    }
    // A Parquet failure inside the atomic write is kept whole (it names the file and what
    // Parquet said); only I/O failures come back as the write's own error.
    let mut parquet_failure = None;
    let written = ril_common::fs::write_atomic_with(path, |file| {
        write_row_groups(file, rows, data_source, split, options).map_err(|e| {
            let message = e.to_string();
            parquet_failure = Some(e);
            std::io::Error::other(message)
        })
    });
    match (written, parquet_failure) {
        (Ok(()), _) => Ok(()),
        (Err(_), Some(e)) => Err(DataError::Invalid(format!(
            "{}: cannot write Parquet: {e}",
            path.display()
        ))),
        (Err(e), None) => Err(DataError::io(&e.path, e.source)),
    }
}

/// Writes the rows into `file` in batches of at most one row group's rows and bytes, so that
/// the Arrow arrays stay bounded.
fn write_row_groups(
    file: &mut std::io::BufWriter<File>,
    rows: &[Row],
    data_source: &str,
    split: &str,
    options: WriteOptions,
) -> std::result::Result<(), parquet::errors::ParquetError> {
    let plan = WritePlan::new(rows, data_source, split);
    let schema = plan.schema();
    let properties = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(options.max_rows_per_group))
        .set_max_row_group_bytes(Some(options.max_bytes_per_group))
        .build();
    let mut writer = ArrowWriter::try_new(file, schema.clone(), Some(properties))?;
    let mut start = 0;
    while start < rows.len() {
        let end = row_group_end(rows, start, options);
        let batch = plan.batch(&schema, rows, start..end, data_source)?;
        writer.write(&batch)?;
        start = end;
    }
    writer.finish()?;
    Ok(())
}

/// Where the row group starting at `start` ends: at most `max_rows_per_group` rows, and no more
/// image bytes than `max_bytes_per_group` (one row at least, however large).
fn row_group_end(rows: &[Row], start: usize, options: WriteOptions) -> usize {
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
    end
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
