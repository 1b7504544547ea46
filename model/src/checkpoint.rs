//! Checkpoints in the ecosystem's format: `config.json` + `model.safetensors` (or shards listed in
//! `model.safetensors.index.json`), tensor names as transformers 5 saves `LlavaForConditionalGeneration`.
//!
//! Loading also accepts the two older layouts still found on the Hub:
//! - transformers 4.x / the original llava-hf uploads: `vision_tower.vision_model.*`;
//! - transformers 4.5x: `model.language_model.*`, `model.vision_tower.*`,
//!   `model.multi_modal_projector.*`, `lm_head.weight`.
//!
//! Loading is strict: a missing, unexpected or mis-shaped tensor is an error naming the tensor.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{ModelError, Result};
use crate::vlm::{Head, SCORE_HEAD, Vlm};

pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const WEIGHTS_INDEX_FILE: &str = "model.safetensors.index.json";
pub const CONFIG_FILE: &str = "config.json";

/// Maps a tensor name from any supported layout to the canonical (transformers 5) one.
pub fn canonical_name(name: &str) -> String {
    let name = name.strip_prefix("model.").map_or_else(
        || name.to_string(),
        |rest| {
            // transformers 4.5x nests everything but the LM head under `model.`.
            if let Some(text) = rest.strip_prefix("language_model.") {
                format!("language_model.model.{text}")
            } else {
                rest.to_string()
            }
        },
    );
    if name == "lm_head.weight" {
        return "language_model.lm_head.weight".into();
    }
    if let Some(rest) = name.strip_prefix("vision_tower.vision_model.") {
        return format!("vision_tower.{rest}");
    }
    name
}

/// What loading may tolerate beyond the strict default.
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    /// Skip `language_model.lm_head.*` (a discriminator built from a student).
    pub ignore_lm_head: bool,
    /// Keep the current value of `score.weight` when the checkpoint has none.
    pub allow_missing_score_head: bool,
}

impl LoadOptions {
    pub fn strict() -> Self {
        Self {
            ignore_lm_head: false,
            allow_missing_score_head: false,
        }
    }
    pub fn discriminator_from_student() -> Self {
        Self {
            ignore_lm_head: true,
            allow_missing_score_head: true,
        }
    }
}

/// What a lenient load skipped or left at its initial value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    pub ignored: Vec<String>,
    pub kept_initial: Vec<String>,
}

/// The weight files of a checkpoint directory (one file, or the shards of an index), or the
/// file itself when `path` is a `.safetensors` file.
pub fn weight_files(path: &Path) -> Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let single = path.join(WEIGHTS_FILE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = path.join(WEIGHTS_INDEX_FILE);
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| ModelError::Json {
                path: index.clone(),
                source,
            })?;
        let map = value
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| ModelError::Checkpoint {
                path: index.clone(),
                reason: "no `weight_map` object".into(),
            })?;
        let files: BTreeSet<String> = map
            .values()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        return Ok(files.into_iter().map(|f| path.join(f)).collect());
    }
    Err(ModelError::Checkpoint {
        path: path.to_path_buf(),
        reason: format!("neither {WEIGHTS_FILE} nor {WEIGHTS_INDEX_FILE} found"),
    })
}

/// Reads every tensor of the given files (on the CPU), keyed by canonical name.
pub fn read_tensors(files: &[PathBuf]) -> Result<BTreeMap<String, (PathBuf, Tensor)>> {
    let mut out: BTreeMap<String, (PathBuf, Tensor)> = BTreeMap::new();
    for file in files {
        let bytes = std::fs::read(file).map_err(|e| ModelError::io(file, e))?;
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).map_err(|e| {
            ModelError::Checkpoint {
                path: file.clone(),
                reason: format!("not a readable safetensors file: {e}"),
            }
        })?;
        for (name, tensor) in tensors {
            let canonical = canonical_name(&name);
            if let Some((other, _)) = out.get(&canonical) {
                return Err(ModelError::Checkpoint {
                    path: file.clone(),
                    reason: format!(
                        "tensor `{name}` maps to `{canonical}`, which {} already provides",
                        other.display()
                    ),
                });
            }
            out.insert(canonical, (file.clone(), tensor));
        }
    }
    Ok(out)
}

/// Loads a checkpoint's weights into `model`, strictly unless `options` relax it.
pub fn load_weights(model: &Vlm, path: &Path, options: LoadOptions) -> Result<LoadReport> {
    let files = weight_files(path)?;
    let tensors = read_tensors(&files)?;
    load_tensor_map(model, path, tensors, options)
}

/// Loads weights from an in-memory safetensors payload (a weight transfer); `origin` names it in
/// errors. Like [`load_weights`], every tensor is checked before any is changed.
pub fn load_weights_from_bytes(
    model: &Vlm,
    bytes: &[u8],
    origin: &str,
    options: LoadOptions,
) -> Result<LoadReport> {
    let origin_path = PathBuf::from(origin);
    let tensors = candle_core::safetensors::load_buffer(bytes, &Device::Cpu).map_err(|e| {
        ModelError::Checkpoint {
            path: origin_path.clone(),
            reason: format!("not a readable safetensors payload: {e}"),
        }
    })?;
    let mut map = BTreeMap::new();
    for (name, tensor) in tensors {
        let canonical = canonical_name(&name);
        if map.contains_key(&canonical) {
            return Err(ModelError::Checkpoint {
                path: origin_path.clone(),
                reason: format!("tensor `{name}` maps to `{canonical}` twice"),
            });
        }
        map.insert(canonical, (origin_path.clone(), tensor));
    }
    load_tensor_map(model, &origin_path, map, options)
}

/// The model's weights as one safetensors payload (what a learner serves to actors).
pub fn weights_bytes(model: &Vlm) -> Result<Vec<u8>> {
    let tensors: BTreeMap<String, Tensor> = model
        .named_vars()
        .into_iter()
        .map(|(k, v)| (k, v.as_tensor().clone()))
        .collect();
    safetensors_bytes(&tensors, None)
}

/// Refuses a tensor holding NaN or ±inf: such weights poison every step that uses them, and a
/// run that saved them had already diverged.
fn check_finite(file: &Path, name: &str, tensor: &Tensor) -> Result<()> {
    // One pass, no temporary: the sum is NaN or infinite when any value is (weights never sum
    // past f32's range; if they did, the count below finds nothing and the tensor loads).
    let sum = tensor.sum_all()?.to_dtype(DType::F32)?;
    if sum.to_scalar::<f32>()?.is_finite() {
        return Ok(());
    }
    let values = tensor
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let bad = values.iter().filter(|v| !v.is_finite()).count();
    if bad == 0 {
        return Ok(());
    }
    Err(ModelError::Checkpoint {
        path: file.to_path_buf(),
        reason: format!(
            "tensor `{name}` holds {bad} non-finite values (NaN or ±inf) of {}; refusing to load it",
            values.len()
        ),
    })
}

pub(crate) fn load_tensor_map(
    model: &Vlm,
    path: &Path,
    mut tensors: BTreeMap<String, (PathBuf, Tensor)>,
    options: LoadOptions,
) -> Result<LoadReport> {
    let vars = model.named_vars();
    let tied = model.config().tie_word_embeddings();
    let mut report = LoadReport::default();
    // Check everything before changing anything: a refused checkpoint leaves the model as it was.
    for (name, (file, tensor)) in &tensors {
        match vars.get(name) {
            Some(var) => {
                if var.dims() != tensor.dims() {
                    return Err(ModelError::ShapeMismatch {
                        path: file.clone(),
                        name: name.clone(),
                        expected: var.dims().to_vec(),
                        found: tensor.dims().to_vec(),
                    });
                }
                if !tensor.dtype().is_float() {
                    return Err(ModelError::Checkpoint {
                        path: file.clone(),
                        reason: format!(
                            "tensor `{name}` has dtype {:?}, expected a floating-point dtype",
                            tensor.dtype()
                        ),
                    });
                }
                check_finite(file, name, tensor)?;
            }
            None => {
                let is_lm_head = name.starts_with("language_model.lm_head.");
                if is_lm_head && (tied || options.ignore_lm_head) {
                    report.ignored.push(name.clone());
                    continue;
                }
                let hint = if name == SCORE_HEAD {
                    ": it is a discriminator's scalar head".to_string()
                } else if is_lm_head && model.head() == Head::Scalar {
                    ": a scalar-head model has no LM head; build the discriminator from a student \
                     with `Vlm::discriminator_from_student`"
                        .to_string()
                } else {
                    String::new()
                };
                return Err(ModelError::UnexpectedTensor {
                    path: file.clone(),
                    name: name.clone(),
                    hint,
                });
            }
        }
    }
    for name in vars.keys() {
        if !tensors.contains_key(name) {
            if name == SCORE_HEAD && options.allow_missing_score_head {
                report.kept_initial.push(name.clone());
                continue;
            }
            return Err(ModelError::MissingTensor {
                path: path.to_path_buf(),
                name: name.clone(),
            });
        }
    }
    for (name, var) in &vars {
        if let Some((_, tensor)) = tensors.remove(name) {
            let value = tensor.to_dtype(model.dtype())?.to_device(model.device())?;
            var.set(&value)?;
        }
    }
    Ok(report)
}

/// Writes `bytes` to `path` atomically (`ril_common::fs::write_atomic`).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    Ok(ril_common::fs::write_atomic(path, bytes)?)
}

/// Serialises named tensors to safetensors bytes with transformers' `{"format": "pt"}` metadata.
pub fn safetensors_bytes(
    tensors: &BTreeMap<String, Tensor>,
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let mut meta = metadata.unwrap_or_default();
    meta.entry("format".into()).or_insert_with(|| "pt".into());
    let cpu: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<_>>()?;
    safetensors::serialize(cpu.iter().map(|(k, v)| (k.as_str(), v)), Some(meta)).map_err(|e| {
        ModelError::Checkpoint {
            path: PathBuf::from("<memory>"),
            reason: format!("serialising tensors: {e}"),
        }
    })
}

/// Saves `config.json` and `model.safetensors` (tied LM heads are not written, as transformers
/// does not write them).
pub fn save_model(model: &Vlm, dir: &Path) -> Result<()> {
    save_model_as(model, dir, None)
}

/// [`save_model`] with the weights stored in `dtype` (e.g. f16 to halve a checkpoint; loading
/// converts back to the model's dtype). `None` keeps the model's dtype.
pub fn save_model_as(model: &Vlm, dir: &Path, dtype: Option<DType>) -> Result<()> {
    if let Some(d) = dtype
        && !d.is_float()
    {
        return Err(ModelError::input(format!(
            "cannot store weights as {d:?}: not a floating-point dtype"
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let tensors: BTreeMap<String, Tensor> = model
        .named_vars()
        .into_iter()
        .map(|(k, v)| {
            let t = v.as_tensor().clone();
            Ok((
                k,
                match dtype {
                    Some(d) => t.to_dtype(d)?,
                    None => t,
                },
            ))
        })
        .collect::<Result<_>>()?;
    let bytes = safetensors_bytes(&tensors, None)?;
    write_atomic(&dir.join(WEIGHTS_FILE), &bytes)?;
    model.config().save(&dir.join(CONFIG_FILE))
}
