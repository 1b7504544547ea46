//! `ril train --config run.toml`'s flags; the local cluster itself is
//! `ril_orchestrate::cluster`.

use std::path::PathBuf;
use std::time::Duration;

use ril_config::RunConfig;
use ril_orchestrate::cluster::ClusterOptions;

#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    #[arg(long)]
    pub config: PathBuf,
    /// Overrides `[actors] count`.
    #[arg(long)]
    pub actors: Option<u32>,
    /// How long a role may take to come up (model loading included).
    #[arg(long, default_value_t = 300)]
    pub startup_timeout_s: u64,
    /// Give up when the run has not advanced for this long.
    #[arg(long, default_value_t = 1800)]
    pub stall_timeout_s: u64,
}

pub fn train(args: &TrainArgs) -> anyhow::Result<()> {
    let cfg = RunConfig::load(&args.config)?;
    let options = ClusterOptions {
        actors: args.actors,
        startup_timeout: Duration::from_secs(args.startup_timeout_s),
        stall_timeout: Duration::from_secs(args.stall_timeout_s),
    };
    let ril = ril_orchestrate::RilBinary::current()?;
    let outcome = ril_orchestrate::runtime()?
        .block_on(ril_orchestrate::cluster::run_cluster(&ril, &cfg, &options))?;
    println!(
        "{}",
        ril_orchestrate::status::format_status(&outcome.status)
    );
    println!(
        "finished in {:.1} s; learner checkpoints in {}",
        outcome.seconds,
        outcome.learner_dir.display()
    );
    Ok(())
}
