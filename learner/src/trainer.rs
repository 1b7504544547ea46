//! The learner's training state on one rank: policy, frozen reference, AdamW, version and the
//! random stream; one Dr.GRPO update per iteration; checkpoints that resume exactly; the weight
//! payload actors pull.
//!
//! Checkpoint layout, `<out_dir>/checkpoint-<version:06>/`: the policy as a model directory
//! (`Bundle::save`: config.json, model.safetensors, tokenizer files, preprocessor config), the
//! optimizer moments (`optimizer.safetensors`) and `trainer_state.json` ([`TrainerState`]), the
//! same file names supervised fine-tuning uses. A checkpoint is staged in a hidden directory and
//! published with one rename (`ril_common::fs::publish_dir`), so a crash never leaves a
//! half-written one under a real name.

use std::io::Read;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use candle_core::Tensor;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use ril_model::bundle::Bundle;
use ril_model::optim::AdamW;
use ril_model::{Head, Vlm};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::collective::Collective;
use crate::error::{LearnerError, Result};
use crate::grpo::{Group, GrpoConfig, GrpoStats, train_step};
use crate::options::LearnerOptions;
use crate::sft::{OPTIMIZER_FILE, STATE_FILE, checkpoints_to_delete, write_checkpoint_dir};

const CHECKPOINT_PREFIX: &str = "checkpoint-";

/// Where training stands; saved with every checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// The policy version: 0 is the initial checkpoint; training on iteration v's groups gives
    /// version v + 1.
    pub version: u64,
    /// Iterations trained.
    pub iteration: u64,
    /// The learner's random stream (the order an iteration's groups are processed in).
    pub rng: ChaCha8Rng,
    /// The reference the KL term was computed against, and its id (SHA-256 of its weight files):
    /// resuming against another reference is refused.
    pub reference_checkpoint: PathBuf,
    pub reference_checkpoint_id: String,
    pub groups_trained: u64,
    pub stale_groups_dropped: u64,
}

impl TrainerState {
    pub fn load(dir: &Path) -> Result<Self> {
        crate::sft::load_state(dir)
    }
}

/// The serialised policy of one version: safetensors bytes (transformers' tensor names) and
/// their SHA-256.
#[derive(Debug, Clone)]
pub struct WeightsPayload {
    pub version: u64,
    pub bytes: Bytes,
    pub sha256: [u8; 32],
}

impl WeightsPayload {
    pub fn sha256_hex(&self) -> String {
        hex::encode(self.sha256)
    }
}

/// The id of a checkpoint's weights: SHA-256 over its weight files' names and contents.
pub fn checkpoint_id(dir: &Path) -> Result<String> {
    let files = ril_model::checkpoint::weight_files(dir)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for file in files {
        let name = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        hasher.update(name.as_bytes());
        let io = |source| LearnerError::Io {
            path: file.clone(),
            source,
        };
        let mut f = std::fs::File::open(&file).map_err(io)?;
        loop {
            let n = f.read(&mut buf).map_err(io)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
    }
    Ok(hex::encode(hasher.finalize()))
}

/// The checkpoint directory of `version`.
pub fn checkpoint_dir(out_dir: &Path, version: u64) -> PathBuf {
    out_dir.join(format!("{CHECKPOINT_PREFIX}{version:06}"))
}

/// The complete checkpoints in `out_dir` (those with a trainer state), by version.
pub fn list_checkpoints(out_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let entries = match std::fs::read_dir(out_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(LearnerError::Io {
                path: out_dir.to_path_buf(),
                source,
            });
        }
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| LearnerError::Io {
            path: out_dir.to_path_buf(),
            source,
        })?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(version) = name
            .strip_prefix(CHECKPOINT_PREFIX)
            .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|v| v.parse::<u64>().ok())
        else {
            continue;
        };
        if entry.path().join(STATE_FILE).is_file() {
            found.push((version, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// The policy, its optimizer and the frozen reference on one rank.
#[derive(Debug)]
pub struct Trainer {
    policy: Bundle,
    reference: Vlm,
    optimizer: AdamW,
    state: TrainerState,
    grpo: GrpoConfig,
    collective: Box<dyn Collective>,
    out_dir: PathBuf,
    keep_checkpoints: usize,
    /// The version whose checkpoint is on disk (None: none written by or resumed into this
    /// trainer).
    saved_version: Option<u64>,
}

impl Trainer {
    /// Loads the policy (from the newest checkpoint when resuming, else the initial checkpoint),
    /// the reference and the optimizer.
    pub fn open(options: &LearnerOptions, collective: Box<dyn Collective>) -> Result<Self> {
        options.validate()?;
        let device = options.parse_device()?;
        let dtype = options.parse_dtype()?;
        tracing::info!(device = %ril_model::device::describe(&device), ?dtype, rank = options.rank, "learner: loading the policy");
        let reference_dir = options.reference_checkpoint();
        let reference_id = checkpoint_id(reference_dir)?;
        let reference = Vlm::from_pretrained(reference_dir, Head::LanguageModel, &device, dtype)?;
        let resume_from = if options.resume {
            list_checkpoints(&options.out_dir)?.pop()
        } else {
            None
        };
        let (policy, optimizer, state, saved_version) = match resume_from {
            Some((version, dir)) => {
                let policy = Bundle::load(&dir, Head::LanguageModel, &device, dtype)?;
                let mut optimizer =
                    AdamW::new(policy.model.trainable_vars(), options.grpo.adamw())?;
                optimizer.load(&dir.join(OPTIMIZER_FILE))?;
                let state = TrainerState::load(&dir)?;
                if state.version != version {
                    return Err(LearnerError::Invalid(format!(
                        "{}: the trainer state says version {}, the directory name {version}",
                        dir.display(),
                        state.version
                    )));
                }
                if state.reference_checkpoint_id != reference_id {
                    return Err(LearnerError::Invalid(format!(
                        "{}: this run was trained against the reference {} (id {}), but {} has id \
                         {reference_id}: point reference_checkpoint at the run's original reference",
                        dir.display(),
                        state.reference_checkpoint.display(),
                        state.reference_checkpoint_id,
                        reference_dir.display()
                    )));
                }
                tracing::info!(
                    checkpoint = %dir.display(),
                    version,
                    "learner resumed"
                );
                (policy, optimizer, state, Some(version))
            }
            None => {
                let policy = Bundle::load(
                    &options.init_checkpoint,
                    Head::LanguageModel,
                    &device,
                    dtype,
                )?;
                let optimizer = AdamW::new(policy.model.trainable_vars(), options.grpo.adamw())?;
                let state = TrainerState {
                    version: 0,
                    iteration: 0,
                    rng: ChaCha8Rng::seed_from_u64(options.seed),
                    reference_checkpoint: reference_dir.to_path_buf(),
                    reference_checkpoint_id: reference_id,
                    groups_trained: 0,
                    stale_groups_dropped: 0,
                };
                (policy, optimizer, state, None)
            }
        };
        if options.rank == 0 {
            let path = options.out_dir.join(crate::metrics_log::METRICS_FILE);
            let dropped = crate::metrics_log::truncate_after(&path, saved_version.unwrap_or(0))?;
            if dropped > 0 {
                tracing::info!(dropped, path = %path.display(), "dropped the metrics lines after the resume point");
            }
        }
        if policy.model.config() != reference.config() {
            return Err(LearnerError::Invalid(format!(
                "the policy ({}) and the reference ({}) have different model configs",
                options.init_checkpoint.display(),
                reference_dir.display()
            )));
        }
        Ok(Self {
            policy,
            reference,
            optimizer,
            state,
            grpo: options.grpo.clone(),
            collective,
            out_dir: options.out_dir.clone(),
            keep_checkpoints: options.keep_checkpoints,
            saved_version,
        })
    }

    pub fn policy(&self) -> &Bundle {
        &self.policy
    }
    pub fn reference(&self) -> &Vlm {
        &self.reference
    }
    pub fn optimizer(&self) -> &AdamW {
        &self.optimizer
    }
    pub fn state(&self) -> &TrainerState {
        &self.state
    }
    pub fn grpo(&self) -> &GrpoConfig {
        &self.grpo
    }
    pub fn collective(&self) -> &dyn Collective {
        self.collective.as_ref()
    }
    /// Replaces the collective (the model is loaded before the ranks meet; the ring joins
    /// after). Call it between steps only.
    pub fn set_collective(&mut self, collective: Box<dyn Collective>) {
        self.collective = collective;
    }
    /// The version whose checkpoint is on disk, if any.
    pub fn saved_version(&self) -> Option<u64> {
        self.saved_version
    }

    pub fn set_stale_groups_dropped(&mut self, n: u64) {
        self.state.stale_groups_dropped = n;
    }

    /// Trains on one iteration's groups and advances the version. The groups are ordered by
    /// position, then shuffled with the learner's random stream, so the result does not depend
    /// on the order they arrived in. On error nothing changes.
    pub fn train_iteration(&mut self, groups: Vec<Group>) -> Result<GrpoStats> {
        let n = groups.len();
        self.train_shard(groups, n)
    }

    /// [`Self::train_iteration`] on this rank's shard of an iteration of `iteration_groups`
    /// groups (every rank takes part, an empty shard included: the collective joins them).
    pub fn train_shard(
        &mut self,
        mut groups: Vec<Group>,
        iteration_groups: usize,
    ) -> Result<GrpoStats> {
        groups.sort_by_key(|g| g.position);
        let mut rng = self.state.rng.clone();
        groups.shuffle(&mut rng);
        let stats = train_step(
            &self.policy.model,
            &self.reference,
            &mut self.optimizer,
            &groups,
            &self.grpo,
            self.collective.as_ref(),
        )?;
        self.state.rng = rng;
        self.state.version += 1;
        self.state.iteration += 1;
        self.state.groups_trained += iteration_groups as u64;
        Ok(stats)
    }

    /// Checks that every rank holds the weights of `payload` (this rank's current weights):
    /// an error names the ranks that differ.
    pub fn verify_replicas(&self, payload: &WeightsPayload) -> Result<()> {
        crate::collective::verify_identical_weights(self.collective.as_ref(), &payload.sha256)
    }

    /// The current policy as a safetensors payload (every tensor, as `Bundle::save` writes
    /// them) with its SHA-256. Equal weights give equal bytes.
    pub fn weights_payload(&self) -> Result<WeightsPayload> {
        let tensors: std::collections::BTreeMap<String, Tensor> = self
            .policy
            .model
            .named_vars()
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().clone()))
            .collect();
        // No metadata of our own: safetensors writes a metadata map in hash order, so a second
        // key would make equal weights hash differently. The version travels with every chunk.
        let bytes = ril_model::checkpoint::safetensors_bytes(&tensors, None)?;
        let sha256: [u8; 32] = Sha256::digest(&bytes).into();
        Ok(WeightsPayload {
            version: self.state.version,
            bytes: Bytes::from(bytes),
            sha256,
        })
    }

    /// Writes `<out_dir>/checkpoint-<version>` (replacing one of the same version) and deletes
    /// all but the newest `keep_checkpoints`.
    pub fn save_checkpoint(&mut self) -> Result<PathBuf> {
        let version = self.state.version;
        let dir = checkpoint_dir(&self.out_dir, version);
        write_checkpoint_dir(&self.policy, &self.optimizer, &self.state, &dir)?;
        self.saved_version = Some(version);
        if self.keep_checkpoints > 0 {
            let existing = list_checkpoints(&self.out_dir)?;
            let versions: Vec<usize> = existing.iter().map(|(v, _)| *v as usize).collect();
            for old in checkpoints_to_delete(versions, self.keep_checkpoints) {
                let old_dir = checkpoint_dir(&self.out_dir, old as u64);
                std::fs::remove_dir_all(&old_dir).map_err(|source| LearnerError::Io {
                    path: old_dir.clone(),
                    source,
                })?;
            }
        }
        tracing::info!(checkpoint = %dir.display(), version, "checkpoint written");
        Ok(dir)
    }
}
