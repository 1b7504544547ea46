//! Reading verl Parquet: the file in batches of [`BATCH_ROWS`] rows, and each row as a [`Row`].

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use arrow_array::cast::AsArray;
use arrow_array::{Array, RecordBatch};
use arrow_schema::{ArrowError, DataType, Schema};
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::file::reader::{ChunkReader, Length};
use serde_json::{Map, Value};

use crate::dataset::{
    ImageData, Message, ReadOptions, Row, SkipReport, check_image_bytes, content_text,
};
use crate::error::{DataError, Result};

use super::arrow_json::{bytes_at, is_null_at, list_at, str_at, to_json};

/// Rows decoded at a time. A batch of image rows is held in memory whole, so it is small.
pub const BATCH_ROWS: usize = 64;

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
        let file = ParquetFile::open(path)?;
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

/// The Parquet file as the decoder reads it: like `File`, except that reading past its end is an
/// error instead of an empty read. Every offset and length in Parquet is declared, so a
/// well-formed file is never read past its end; a corrupt one on which the decoder keeps
/// asking for more (found by the fuzzer: a 13 KB file read 750,000 times at its end, 34 s) fails
/// at once instead.
struct ParquetFile {
    file: File,
    len: u64,
}

impl ParquetFile {
    fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| DataError::io(path, e))?;
        let len = file.metadata().map_err(|e| DataError::io(path, e))?.len();
        Ok(Self { file, len })
    }
}

impl Length for ParquetFile {
    fn len(&self) -> u64 {
        self.len
    }
}

impl ChunkReader for ParquetFile {
    type T = BufReader<EndedRead>;

    fn get_read(&self, start: u64) -> parquet::errors::Result<Self::T> {
        let mut file = self.file.try_clone()?;
        file.seek(SeekFrom::Start(start))?;
        let left = self.len.saturating_sub(start);
        Ok(BufReader::new(EndedRead { file, left }))
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<bytes::Bytes> {
        self.file.get_bytes(start, length)
    }
}

/// A reader of the rest of a file that fails, rather than reading nothing, at its end.
struct EndedRead {
    file: File,
    left: u64,
}

impl Read for EndedRead {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let past_the_end = || {
            std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the Parquet decoder read past the end of the file",
            )
        };
        if self.left == 0 {
            return Err(past_the_end());
        }
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.file.read(&mut buf[..want])?;
        if n == 0 {
            // The file shrank since it was opened.
            return Err(past_the_end());
        }
        self.left -= n as u64;
        Ok(n)
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
