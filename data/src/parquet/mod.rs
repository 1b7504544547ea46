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
//!
//! Reading lives in `read` (the file, its batches and each row), writing in `write`, and the
//! Arrow -> JSON value conversion both sides rely on in `arrow_json`.

/// The columns of verl's schema; any other column is kept in [`Row::extra`] by name.
const VERL_COLUMNS: [&str; 6] = [
    "data_source",
    "prompt",
    "images",
    "ability",
    "reward_model",
    "extra_info",
];

mod arrow_json;
mod read;
mod write;

pub use read::{BATCH_ROWS, ParquetReader};
pub use write::{WriteOptions, write_verl_parquet, write_verl_parquet_with};
