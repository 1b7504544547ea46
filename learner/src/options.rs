//! The learner's settings, as the run's TOML file holds them (`[learner]`, with the loss and
//! optimizer under `[learner.grpo]`). Validated once, before anything is loaded.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

use ril_model::DeviceSpec;

use crate::error::{LearnerError, Result};
use crate::grpo::GrpoConfig;

fn default_save_every() -> u64 {
    50
}
fn default_keep_checkpoints() -> usize {
    2
}
fn default_coordinator_timeout_ms() -> u64 {
    10_000
}
fn default_commit_deadline_ms() -> u64 {
    120_000
}
fn default_true() -> bool {
    true
}

fn default_world_size() -> u32 {
    1
}
fn default_collective() -> String {
    "ring".into()
}
fn default_collective_listen() -> String {
    "0.0.0.0:0".into()
}
fn default_collective_timeout_ms() -> u64 {
    60_000
}
fn default_bucket_mb() -> usize {
    16
}
fn default_verify_every() -> u64 {
    10
}
fn default_device() -> String {
    "cpu".into()
}
fn default_dtype() -> String {
    "f32".into()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LearnerOptions {
    /// The student's starting checkpoint (a model directory: config.json, model.safetensors,
    /// tokenizer.json, preprocessor_config.json), usually the SFT output. Version 0.
    pub init_checkpoint: PathBuf,
    /// The frozen reference of the KL term. Default: `init_checkpoint`.
    #[serde(default)]
    pub reference_checkpoint: Option<PathBuf>,
    /// Checkpoints go to `<out_dir>/checkpoint-<version, 6 digits>`.
    pub out_dir: PathBuf,
    /// Continue from the newest checkpoint in `out_dir`; a fresh start when there is none.
    /// On by default, as for the discriminator: the run directory is the run, and the
    /// coordinator continues from its state there, so a learner starting over from the student
    /// would be refused by a coordinator that has already advanced.
    #[serde(default = "default_true")]
    pub resume: bool,
    /// B: groups (questions) per iteration, i.e. per optimizer step.
    pub questions_per_iteration: usize,
    /// The run ends when the policy reaches this version.
    pub total_iterations: u64,
    /// k: a group whose student responses were sampled with a policy more than k versions behind
    /// the current one is dropped and its question handed back. 0 = synchronous on-policy.
    /// Groups of up to k iterations ahead of the current one are buffered.
    #[serde(default)]
    pub staleness_bound: u64,
    /// Write a checkpoint every this many versions (0: only at the end and at shutdown).
    #[serde(default = "default_save_every")]
    pub save_every: u64,
    /// Keep the newest this many checkpoints (0: keep all).
    #[serde(default = "default_keep_checkpoints")]
    pub keep_checkpoints: usize,
    /// `host:port` of the coordinator.
    pub coordinator_addr: String,
    /// Deadline of each coordinator RPC.
    #[serde(default = "default_coordinator_timeout_ms")]
    pub coordinator_timeout_ms: u64,
    /// How long a group's AcceptGroup is asked again after failures that leave its outcome
    /// unknown (the coordinator restarting, a lost answer) before the learner stops with the
    /// error. A retry is answered as the first call was, so nothing is committed twice.
    #[serde(default = "default_commit_deadline_ms")]
    pub commit_deadline_ms: u64,
    /// The address other roles reach this learner at, sent with JoinLearner. Default: the bound
    /// address.
    #[serde(default)]
    pub advertise_addr: Option<String>,
    /// The discriminator service (`host:port`). When set, the learner sends it each trained
    /// iteration's student and teacher responses for one `Train` step before publishing the
    /// next version. Unset: D is not updated online (a frozen or absent discriminator).
    #[serde(default)]
    pub discriminator_addr: Option<String>,
    #[serde(default)]
    pub rank: u32,
    /// Learner ranks (data parallel). Rank 0 takes the actors' groups and sends every other
    /// rank its shard of each iteration (`TrainShard`); gradients are summed with the CPU ring
    /// collective. `ranks` is accepted as another name for it.
    #[serde(default = "default_world_size", alias = "ranks")]
    pub world_size: u32,
    /// The gradient collective when world_size > 1: `ring` (CPU, TCP between the learner
    /// processes) or `nccl` (GPUs; needs the `nccl` build feature and `device = "cuda:N"`; the
    /// unique id travels through the coordinator's rendezvous).
    #[serde(default = "default_collective")]
    pub collective: String,
    /// Where the ring collective listens (world_size > 1).
    #[serde(default = "default_collective_listen")]
    pub collective_listen: String,
    /// The ring address other ranks connect to. Default: the host of `advertise_addr` (or of
    /// the bound address) with the ring listener's port.
    #[serde(default)]
    pub collective_advertise: Option<String>,
    /// The rendezvous wait for the other ranks, connecting the ring, and each transfer in it.
    #[serde(default = "default_collective_timeout_ms")]
    pub collective_timeout_ms: u64,
    /// The ring's bucket size in MiB.
    #[serde(default = "default_bucket_mb")]
    pub bucket_mb: usize,
    /// All ranks check they hold identical weights at start and every this many iterations
    /// (0: only at start).
    #[serde(default = "default_verify_every")]
    pub verify_every: u64,
    /// Where the policy, the reference, the optimizer state and the batches live: `cpu`,
    /// `cuda` or `cuda:N`. Default: `[run] device`, else `cpu`.
    #[serde(default = "default_device")]
    pub device: String,
    /// Weights' dtype in memory: `f32`, `bf16` or `f16` (optimizer moments stay f32).
    #[serde(default = "default_dtype")]
    pub dtype: String,
    /// Seeds the learner's own random stream (the order groups are processed in).
    #[serde(default)]
    pub seed: u64,
    /// Stop serving once `total_iterations` is reached (after the final checkpoint). Default:
    /// keep serving the final weights until shut down.
    #[serde(default)]
    pub exit_when_finished: bool,
    #[serde(default)]
    pub grpo: GrpoConfig,
}

impl LearnerOptions {
    /// Settings for tests: small iterations, checkpoints every version.
    pub fn for_test(init_checkpoint: &Path, out_dir: &Path, coordinator_addr: &str) -> Self {
        Self {
            init_checkpoint: init_checkpoint.to_path_buf(),
            reference_checkpoint: None,
            out_dir: out_dir.to_path_buf(),
            resume: true,
            questions_per_iteration: 2,
            total_iterations: 10,
            staleness_bound: 0,
            save_every: 1,
            keep_checkpoints: 0,
            coordinator_addr: coordinator_addr.to_string(),
            coordinator_timeout_ms: default_coordinator_timeout_ms(),
            commit_deadline_ms: default_commit_deadline_ms(),
            advertise_addr: None,
            discriminator_addr: None,
            rank: 0,
            world_size: 1,
            collective: default_collective(),
            collective_listen: "127.0.0.1:0".into(),
            collective_advertise: None,
            collective_timeout_ms: default_collective_timeout_ms(),
            bucket_mb: default_bucket_mb(),
            verify_every: default_verify_every(),
            device: default_device(),
            dtype: default_dtype(),
            seed: 0,
            exit_when_finished: false,
            grpo: GrpoConfig {
                lr: 1e-3,
                loss_normalizer: 16,
                micro_batch_size: 4,
                ..GrpoConfig::default()
            },
        }
    }

    pub fn reference_checkpoint(&self) -> &Path {
        self.reference_checkpoint
            .as_deref()
            .unwrap_or(&self.init_checkpoint)
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(LearnerError::Invalid(format!("learner: {m}")));
        self.grpo.validate()?;
        if self.questions_per_iteration == 0 {
            return bad("questions_per_iteration must be positive".into());
        }
        if self.total_iterations == 0 {
            return bad("total_iterations must be positive".into());
        }
        if self.world_size == 0 || self.rank >= self.world_size {
            return bad(format!(
                "rank {} of world_size {}: world_size must be positive and rank below it",
                self.rank, self.world_size
            ));
        }
        match self.collective.as_str() {
            "ring" => {}
            "nccl" if cfg!(feature = "nccl") => {
                if self.device_spec()? == DeviceSpec::Cpu {
                    return bad(format!(
                        "collective = \"nccl\" needs a CUDA device (device = \"cuda:N\"), not {:?}",
                        self.device
                    ));
                }
            }
            "nccl" => {
                return bad(
                    "collective = \"nccl\" needs a build with `--features nccl`".to_string()
                );
            }
            other => {
                return bad(format!(
                    "collective {other:?}: expected \"ring\" or \"nccl\""
                ));
            }
        }
        if self.world_size > 1 {
            if self.collective_listen.is_empty() {
                return bad("collective_listen is empty".into());
            }
            if self.collective_timeout_ms == 0 {
                return bad("collective_timeout_ms must be positive".into());
            }
            if self.bucket_mb == 0 {
                return bad("bucket_mb must be positive".into());
            }
        }
        if self.coordinator_addr.is_empty() {
            return bad("coordinator_addr is empty".into());
        }
        if self.coordinator_timeout_ms == 0 || self.commit_deadline_ms == 0 {
            return bad("coordinator_timeout_ms and commit_deadline_ms must be positive".into());
        }
        self.device_spec()?;
        self.parse_dtype()?;
        Ok(())
    }

    /// `device` parsed (not opened): the form is checked with the rest of the settings, so
    /// that `ril config check` refuses a bad string on any machine, GPU or not.
    pub fn device_spec(&self) -> Result<DeviceSpec> {
        self.device.parse().map_err(|error| LearnerError::Device {
            key: "learner.device",
            error,
        })
    }

    /// `None` for `cpu`, the ordinal for `cuda` (0) or `cuda:N`.
    pub fn cuda_ordinal(&self) -> Result<Option<usize>> {
        Ok(match self.device_spec()? {
            DeviceSpec::Cpu => None,
            DeviceSpec::Cuda(ordinal) => Some(ordinal),
        })
    }

    /// Opens `device` (the trainer's weights, optimizer state and batches live there).
    pub fn parse_device(&self) -> Result<Device> {
        self.device_spec()?
            .open(&self.device)
            .map_err(|error| LearnerError::Device {
                key: "learner.device",
                error,
            })
    }

    pub fn parse_dtype(&self) -> Result<DType> {
        match self.dtype.as_str() {
            "f32" => Ok(DType::F32),
            "bf16" => Ok(DType::BF16),
            "f16" => Ok(DType::F16),
            other => Err(LearnerError::Invalid(format!(
                "learner.dtype {other:?}: expected f32, bf16 or f16"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `[learner]` table as a run's TOML file writes it (the CLI embeds it).
    const EXAMPLE: &str = r#"
init_checkpoint = "runs/sft/final"
out_dir = "runs/ril/learner"
resume = true
questions_per_iteration = 32
total_iterations = 1000
staleness_bound = 1
save_every = 50
coordinator_addr = "ril-coordinator:50051"
advertise_addr = "ril-learner-0.ril-learner:50054"
device = "cpu"
dtype = "f32"

[grpo]
clip_eps = 0.2
kl_beta = 0.01
use_sim_reward = true
use_ans_reward = true
teachers_in_group = true
loss_normalizer = 256
lr = 1e-6
micro_batch_size = 4
logprob_temperature = 1.0
"#;

    #[test]
    fn the_documented_toml_parses_with_defaults_and_unknown_keys_are_refused() {
        let o: LearnerOptions = toml::from_str(EXAMPLE).unwrap();
        o.validate().unwrap();
        assert_eq!(o.reference_checkpoint(), Path::new("runs/sft/final"));
        assert_eq!((o.rank, o.world_size, o.keep_checkpoints), (0, 1, 2));
        assert_eq!(o.grpo.loss_normalizer, 256);
        assert_eq!(
            o.grpo.max_grad_norm, 1.0,
            "defaults fill what the file leaves out"
        );
        // `ranks` is another name for `world_size` (the issue's spelling).
        let ranks: LearnerOptions = toml::from_str(&format!("ranks = 2\n{EXAMPLE}")).unwrap();
        assert_eq!(ranks.world_size, 2);
        let typo = EXAMPLE.replace("kl_beta", "kl_coef");
        let e = toml::from_str::<LearnerOptions>(&typo)
            .unwrap_err()
            .to_string();
        assert!(e.contains("kl_coef"), "{e}");
        let two_ranks = LearnerOptions {
            world_size: 2,
            rank: 1,
            ..o.clone()
        };
        two_ranks.validate().unwrap();
        assert_eq!(two_ranks.collective_timeout_ms, 60_000);
        let outside = LearnerOptions {
            rank: 2,
            ..two_ranks
        };
        assert!(
            outside
                .validate()
                .unwrap_err()
                .to_string()
                .contains("world_size")
        );
        let no_reward = LearnerOptions {
            grpo: GrpoConfig {
                use_sim_reward: false,
                use_ans_reward: false,
                ..o.grpo.clone()
            },
            ..o
        };
        assert!(no_reward.validate().is_err());
    }

    /// The run config is written from typed structs (the demo's configs among them): what is
    /// written reads back as the same options, defaults and optional fields included.
    #[test]
    fn options_written_as_toml_read_back_the_same() {
        let parsed: LearnerOptions = toml::from_str(EXAMPLE).unwrap();
        let mut all_set = LearnerOptions::for_test(Path::new("m"), Path::new("o"), "c:1");
        all_set.reference_checkpoint = Some("runs/reference".into());
        all_set.advertise_addr = Some("ril-learner-0:50054".into());
        all_set.discriminator_addr = Some("ril-discriminator:50053".into());
        all_set.collective_advertise = Some("10.0.0.2:7000".into());
        all_set.grpo.kl_beta = 0.04;
        for options in [parsed, all_set] {
            let text = toml::to_string(&options).unwrap();
            let again: LearnerOptions = toml::from_str(&text).unwrap();
            assert_eq!(again, options, "{text}");
            let json = serde_json::to_string(&options).unwrap();
            assert_eq!(
                serde_json::from_str::<LearnerOptions>(&json).unwrap(),
                options
            );
        }
    }

    #[test]
    fn the_collective_is_ring_or_nccl_and_nccl_needs_the_feature_and_a_gpu() {
        let mut o = LearnerOptions::for_test(Path::new("m"), Path::new("o"), "c:1");
        assert_eq!(o.collective, "ring");
        o.validate().unwrap();
        o.collective = "mpi".into();
        assert!(o.validate().unwrap_err().to_string().contains("mpi"));
        o.collective = "nccl".into();
        let e = o.validate().unwrap_err().to_string();
        if cfg!(feature = "nccl") {
            assert!(e.contains("cuda"), "{e}");
        } else {
            assert!(e.contains("--features nccl"), "{e}");
        }
    }
}
