//! The `ril` command's library: argument parsing and the commands, so tests can drive them
//! in-process as well as through the binary. The run config is `ril-config`; the
//! orchestration (the local cluster, the demo, the experiments) is `ril-orchestrate`: the
//! commands here parse their flags and call in there. The benchmarks stay here: each is one
//! process timing building blocks of the roles, with nothing to orchestrate.

pub mod bench;
pub mod bench_allreduce;
pub mod bench_cluster;
pub mod bench_nccl;
pub mod bench_rpc;
pub mod certs;
pub mod chaos;
pub mod cluster;
pub mod demo;
pub mod device;
pub mod experiment;
pub mod logging;
pub mod model_cmd;
pub mod roles;
pub mod selfcheck;
pub mod selfcheck_device;
pub mod train_cmd;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "ril",
    version,
    about = "RIL: unified reinforcement and imitation learning for vision-language models"
)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = logging::LogFormat::Human, env = "RIL_LOG_FORMAT")]
    pub log_format: logging::LogFormat,
    /// Log filter (tracing-subscriber syntax, e.g. `info` or `ril_model=debug`); `RUST_LOG` wins.
    #[arg(long, global = true, default_value = "info")]
    pub log_level: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Model tools: self-check, inspect a checkpoint, generate.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// What this build supports (features) and what this machine offers (CUDA, NCCL).
    Env,
    /// Datasets: the synthetic benchmark, format checks.
    #[command(subcommand)]
    Data(DataCommand),
    /// Tokenizers.
    #[command(subcommand)]
    Tokenizer(TokenizerCommand),
    /// Supervised fine-tuning on a dataset's answers.
    Sft(train_cmd::SftArgs),
    /// Accuracy of a model on a dataset split, per question family.
    Eval(train_cmd::EvalArgs),
    /// The run's coordinator: dataset cursor, leases, versions, membership, rendezvous.
    Coordinator(roles::CoordinatorArgs),
    /// A learner rank: Dr.GRPO over mixed groups, weight publication, checkpoints.
    Learner(roles::LearnerArgs),
    /// A teacher server (one `[[teachers]]` entry) with its persistent answer cache.
    Teacher(roles::TeacherArgs),
    /// The discriminator service, or its offline pre-training.
    #[command(subcommand)]
    Discriminator(DiscriminatorCommand),
    /// A rollout actor (run as many as you like; they join and leave at any time).
    Actor(roles::ActorArgs),
    /// The local cluster: every role as its own process on loopback, until the run finishes.
    Train(cluster::TrainArgs),
    /// The whole loop on the built-in tiny models: data, models, a short RIL run, evaluation.
    Demo(demo::DemoArgs),
    /// Experiments over many runs: `ablation`, the paper's comparison in miniature.
    #[command(subcommand)]
    Experiment(ExperimentCommand),
    /// A run's state from its coordinator.
    Status(roles::StatusArgs),
    /// Run config tools.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Certificates and the run token.
    #[command(subcommand)]
    Certs(CertsCommand),
}

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Writes a run CA, a certificate and key per role (coordinator, learner, actor, teacher,
    /// discriminator, admin) and a run token into DIR.
    Init(certs::CertsInitArgs),
    /// Prints, for `kubectl apply -f -`, the Kubernetes Secrets the manifests mount from DIR
    /// (as `ril certs init` wrote it): `ril-run-token`, and one `ril-tls-<role>` per role holding
    /// only `ca.crt`, `<role>.crt` and `<role>.key`. The CA's key goes into none of them.
    Secrets(certs::CertsSecretsArgs),
}

#[derive(Debug, Subcommand)]
pub enum ExperimentCommand {
    /// Every variant of the paper's comparison (base, RL only, IL only, RIL with teacher 1, 2,
    /// both, frozen D, no D, GRPO's std-normalised advantage), the same budget each, several
    /// seeds: a markdown table of held-out accuracy (mean ± std) and a plot.
    Ablation(experiment::AblationArgs),
    /// The local cluster run to its end while a fault is injected every few seconds (a role
    /// killed and restarted on its address, or a teacher hung past its deadline), one at a
    /// time: faults injected and recovered, the time to recover per kind, the longest stall,
    /// groups lost and trained twice.
    Chaos(chaos::ChaosArgs),
}

#[derive(Debug, Subcommand)]
pub enum DiscriminatorCommand {
    /// Serves D (Score, Train) with the judge.
    Serve(roles::DiscriminatorServeArgs),
    /// Trains D offline on student and teacher answers (the paper: 16 of each per question).
    Pretrain(roles::PretrainArgs),
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Parses and validates a run config (unknown keys, contradictions, missing paths).
    Check {
        /// The run config (TOML).
        path: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Writes the synthetic `shapes` benchmark (JSONL + PNG).
    Synth(train_cmd::SynthArgs),
    /// Reads every row of a dataset (images decoded) and reports what it holds.
    Check(train_cmd::CheckArgs),
}

#[derive(Debug, Subcommand)]
pub enum TokenizerCommand {
    /// Trains a byte-level BPE tokenizer with a ChatML template on a dataset's text.
    Train(train_cmd::TokenizerTrainArgs),
}

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Builds a tiny VLM with the built-in tokenizer, saves and reloads it, checks the KV cache
    /// and log-probs, fine-tunes it on a few image questions and checks its answers.
    Selfcheck(selfcheck::SelfcheckArgs),
    /// Loads a model directory and prints what it holds.
    Info {
        /// Model directory (config.json, model.safetensors, tokenizer.json, preprocessor_config.json).
        #[arg(long)]
        model: PathBuf,
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Answers a question about images with a model directory.
    Generate(model_cmd::GenerateArgs),
    /// Writes a new, randomly initialised model directory for a tokenizer.
    Init(train_cmd::InitArgs),
    /// Copies a model directory (weights, config, tokenizer, preprocessor; no optimizer state)
    /// with its weights stored in another dtype, e.g. f16 to halve it for shipping.
    Export(model_cmd::ExportArgs),
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Generation (KV cache vs recomputation) and training throughput.
    Model(bench::BenchArgs),
    /// The wire cost of one scored group (prost codec, a loopback gRPC round trip).
    Rpc(bench_rpc::RpcBenchArgs),
    /// The control plane under load: a real coordinator, a no-op learner, N simulated actors.
    Cluster(bench_cluster::ClusterBenchArgs),
    /// The CPU ring all-reduce's bandwidth between ranks, against memcpy.
    Allreduce(bench_allreduce::AllReduceBenchArgs),
    /// The GPU check: NCCL all-reduce on device buffers, its bandwidth, the error path.
    Nccl(bench_nccl::NcclBenchArgs),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Model(ModelCommand::Selfcheck(args)) => selfcheck::run(&args),
        Command::Model(ModelCommand::Info { model, device }) => model_cmd::info(&model, &device),
        Command::Model(ModelCommand::Generate(args)) => model_cmd::generate(&args),
        Command::Model(ModelCommand::Init(args)) => train_cmd::init(&args),
        Command::Model(ModelCommand::Export(args)) => model_cmd::export(&args),
        Command::Data(DataCommand::Synth(args)) => train_cmd::synth(&args),
        Command::Data(DataCommand::Check(args)) => train_cmd::check(&args),
        Command::Tokenizer(TokenizerCommand::Train(args)) => train_cmd::tokenizer_train(&args),
        Command::Sft(args) => train_cmd::sft(&args),
        Command::Eval(args) => train_cmd::eval(&args),
        Command::Bench(BenchCommand::Model(args)) => bench::run(&args),
        Command::Bench(BenchCommand::Rpc(args)) => bench_rpc::run(&args),
        Command::Bench(BenchCommand::Cluster(args)) => bench_cluster::run(&args),
        Command::Bench(BenchCommand::Allreduce(args)) => bench_allreduce::run(&args),
        Command::Bench(BenchCommand::Nccl(args)) => bench_nccl::run(&args),
        Command::Coordinator(args) => roles::coordinator(&args),
        Command::Learner(args) => roles::learner(&args),
        Command::Teacher(args) => roles::teacher(&args),
        Command::Discriminator(DiscriminatorCommand::Serve(args)) => roles::discriminator(&args),
        Command::Discriminator(DiscriminatorCommand::Pretrain(args)) => roles::pretrain(&args),
        Command::Actor(args) => roles::actor(&args),
        Command::Train(args) => cluster::train(&args),
        Command::Demo(args) => demo::run(&args),
        Command::Experiment(ExperimentCommand::Ablation(args)) => experiment::ablation(&args),
        Command::Experiment(ExperimentCommand::Chaos(args)) => chaos::run(&args),
        Command::Status(args) => roles::status(&args),
        Command::Config(ConfigCommand::Check { path }) => roles::config_check(&path),
        Command::Certs(CertsCommand::Init(args)) => certs::init(&args),
        Command::Certs(CertsCommand::Secrets(args)) => certs::secrets(&args),
        Command::Env => {
            env_report();
            Ok(())
        }
    }
}

fn env_report() {
    println!("ril {}", env!("CARGO_PKG_VERSION"));
    println!(
        "features: cuda={} nccl={}",
        cfg!(feature = "cuda"),
        cfg!(feature = "nccl")
    );
    println!(
        "cuda devices: {}",
        if candle_core::utils::cuda_is_available() {
            "available"
        } else {
            "not compiled in"
        }
    );
    match ril_learner::gpu::nccl_available() {
        Ok(()) => println!("nccl: libraries found"),
        Err(e) => println!("nccl: unavailable: {e}"),
    }
    println!(
        "cpu threads for candle: {} (set CANDLE_NUM_THREADS to change)",
        candle_core::utils::get_num_threads()
    );
}
