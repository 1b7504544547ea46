//! The run's question stream: position `p` (epochs concatenated) -> dataset row.
//!
//! Epoch `e = p / n` is the dataset's usable rows shuffled with ChaCha8 seeded `seed + e` (the
//! convention of the SFT stream); `p % n` indexes that order. Opening scans the file once:
//! every row is parsed and its images decoded, so a bad row fails the start naming its file,
//! row and field (or, with `skip_bad_rows`, is left out of the stream and counted). A JSONL
//! file keeps only each usable row's byte offset and id in memory and re-reads a row when it is
//! leased; a Parquet file is held in memory.
//!
//! The stream's fingerprint (a SHA-256 over the usable rows' ids in file order) identifies the
//! dataset in the state file, so a resumed run cannot silently continue on other data.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use ril_data::Row;
use ril_data::dataset::{ReadOptions, SkipReport, Split, is_parquet, parse_row, read_all};
use sha2::{Digest, Sha256};

use crate::error::{CoordinatorError, Result};

/// Epoch orders kept in memory (re-issued questions may come from the previous epoch).
const CACHED_EPOCHS: usize = 4;

/// Skipped rows whose errors are kept for the report.
const KEEP_SKIPPED: usize = 5;

enum Source {
    /// Byte offset and 1-based line number of each usable row.
    Jsonl {
        file: BufReader<File>,
        base_dir: PathBuf,
        lines: Vec<(u64, usize)>,
    },
    Memory(Vec<Row>),
}

/// Random access to the run's shuffled, epoch-concatenated question stream.
pub struct QuestionStream {
    path: PathBuf,
    seed: u64,
    ids: Vec<String>,
    source: Source,
    orders: HashMap<u64, Arc<Vec<u32>>>,
    fingerprint: String,
    skipped: SkipReport,
}

impl std::fmt::Debug for QuestionStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuestionStream")
            .field("path", &self.path)
            .field("rows", &self.ids.len())
            .field("seed", &self.seed)
            .field("fingerprint", &self.fingerprint)
            .finish()
    }
}

impl QuestionStream {
    /// Opens `dataset` (a directory: its train split; or a `.jsonl` / `.parquet` file) and
    /// checks every row.
    pub fn open(dataset: &Path, seed: u64, skip_bad_rows: bool) -> Result<Self> {
        let path = ril_data::dataset::split_file(dataset, Split::Train)
            .map_err(|source| CoordinatorError::dataset(dataset, source))?;
        let data_err = |source| CoordinatorError::dataset(&path, source);
        let options = ReadOptions { skip_bad_rows };
        let (ids, source, skipped) = if is_parquet(&path) {
            let (rows, skipped) = read_all(&path, options).map_err(data_err)?;
            let ids = rows.iter().map(|r| r.id.clone()).collect();
            (ids, Source::Memory(rows), skipped)
        } else {
            let (ids, lines, skipped) = scan_jsonl(&path, options)?;
            let file = File::open(&path).map_err(|e| CoordinatorError::io(&path, e))?;
            let base_dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
            (
                ids,
                Source::Jsonl {
                    file: BufReader::new(file),
                    base_dir,
                    lines,
                },
                skipped,
            )
        };
        if ids.is_empty() {
            return Err(CoordinatorError::DatasetInvalid {
                path,
                problem: if skipped.skipped > 0 {
                    format!("all {} rows were skipped as bad", skipped.skipped)
                } else {
                    "no rows".into()
                },
            });
        }
        if ids.len() > u32::MAX as usize {
            return Err(CoordinatorError::DatasetInvalid {
                path,
                problem: format!("{} rows is more than the stream supports", ids.len()),
            });
        }
        if skipped.skipped > 0 {
            tracing::warn!(
                path = %path.display(),
                skipped = skipped.skipped,
                first = ?skipped.first,
                "bad rows left out of the question stream"
            );
        }
        let mut hasher = Sha256::new();
        hasher.update((ids.len() as u64).to_le_bytes());
        for id in &ids {
            hasher.update(id.as_bytes());
            hasher.update(b"\n");
        }
        let fingerprint = hex::encode(hasher.finalize());
        Ok(Self {
            path,
            seed,
            ids,
            source,
            orders: HashMap::new(),
            fingerprint,
            skipped,
        })
    }

    /// The file the rows come from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Usable rows per epoch.
    pub fn rows(&self) -> u64 {
        self.ids.len() as u64
    }

    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Rows left out because they were bad (only with `skip_bad_rows`).
    pub fn skipped(&self) -> &SkipReport {
        &self.skipped
    }

    fn order(&mut self, epoch: u64) -> Arc<Vec<u32>> {
        if let Some(o) = self.orders.get(&epoch) {
            return o.clone();
        }
        let mut order: Vec<u32> = (0..self.ids.len() as u32).collect();
        order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(
            self.seed.wrapping_add(epoch),
        ));
        let order = Arc::new(order);
        if self.orders.len() >= CACHED_EPOCHS {
            // Evict the epoch furthest from the one asked for.
            if let Some(&far) = self.orders.keys().max_by_key(|e| e.abs_diff(epoch)) {
                self.orders.remove(&far);
            }
        }
        self.orders.insert(epoch, order.clone());
        order
    }

    /// The dataset row index of stream position `position`.
    fn row_index(&mut self, position: u64) -> usize {
        let n = self.rows();
        let order = self.order(position / n);
        order[(position % n) as usize] as usize
    }

    /// The question id at `position` (no file access).
    pub fn id_at(&mut self, position: u64) -> &str {
        let i = self.row_index(position);
        &self.ids[i]
    }

    /// The row at `position`, read from the file (JSONL) or memory (Parquet).
    pub fn row_at(&mut self, position: u64) -> Result<Row> {
        let i = self.row_index(position);
        match &mut self.source {
            Source::Memory(rows) => Ok(rows[i].clone()),
            Source::Jsonl {
                file,
                base_dir,
                lines,
            } => {
                let (offset, line_no) = lines[i];
                file.seek(SeekFrom::Start(offset))
                    .map_err(|e| CoordinatorError::io(&self.path, e))?;
                let mut line = String::new();
                file.read_line(&mut line)
                    .map_err(|e| CoordinatorError::io(&self.path, e))?;
                let row = parse_row(&line, &self.path, line_no, base_dir)
                    .map_err(|source| CoordinatorError::dataset(&self.path, source))?;
                if row.id != self.ids[i] {
                    return Err(CoordinatorError::DatasetInvalid {
                        path: self.path.clone(),
                        problem: format!(
                            "changed since the run started: line {line_no} holds {:?}, expected {:?}",
                            row.id, self.ids[i]
                        ),
                    });
                }
                Ok(row)
            }
        }
    }
}

type Scan = (Vec<String>, Vec<(u64, usize)>, SkipReport);

/// Reads a JSONL file once: ids and byte offsets of its usable rows.
fn scan_jsonl(path: &Path, options: ReadOptions) -> Result<Scan> {
    let file = File::open(path).map_err(|e| CoordinatorError::io(path, e))?;
    let base_dir = path.parent().unwrap_or(Path::new("."));
    let mut reader = BufReader::new(file);
    let mut ids = Vec::new();
    let mut lines = Vec::new();
    let mut report = SkipReport::default();
    let mut offset = 0u64;
    let mut line_no = 0usize;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = reader
            .read_until(b'\n', &mut buf)
            .map_err(|e| CoordinatorError::io(path, e))?;
        if n == 0 {
            break;
        }
        line_no += 1;
        let start = offset;
        offset += n as u64;
        if buf.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let parsed = match std::str::from_utf8(&buf) {
            Ok(line) => parse_row(line, path, line_no, base_dir),
            Err(e) => Err(ril_data::DataError::BadRow {
                file: path.to_path_buf(),
                row: line_no,
                id: None,
                field: "<row>".into(),
                reason: format!("not UTF-8: {e}"),
            }),
        };
        match parsed {
            Ok(row) => {
                ids.push(row.id);
                lines.push((start, line_no));
            }
            Err(e) if options.skip_bad_rows => {
                tracing::warn!(error = %e, "skipping a bad row");
                report.skipped += 1;
                if report.first.len() < KEEP_SKIPPED {
                    report.first.push(e.to_string());
                }
            }
            Err(source) => {
                return Err(CoordinatorError::dataset(path, source));
            }
        }
    }
    Ok((ids, lines, report))
}
