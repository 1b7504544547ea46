//! `ril experiment chaos`'s flags; the experiment itself is `ril_orchestrate::chaos`.

use std::path::PathBuf;
use std::time::Duration;

use ril_config::RunConfig;
use ril_orchestrate::chaos::{ChaosOptions, Fault};

#[derive(Debug, clap::Args)]
pub struct ChaosArgs {
    /// The run (a fresh run directory: the experiment trains it from the start).
    #[arg(long)]
    pub config: PathBuf,
    /// The faults to draw from, comma-separated (default: all): kill-coordinator,
    /// kill-learner, kill-discriminator, kill-teacher, kill-actor, hang-teacher.
    #[arg(long, value_delimiter = ',')]
    pub faults: Vec<String>,
    /// Seconds between the run's recovery from one fault and the next fault (drawn from half
    /// to one and a half times this).
    #[arg(long, default_value_t = 3.0)]
    pub fault_every_s: f64,
    /// How long a killed role stays down before it is started again.
    #[arg(long, default_value_t = 1000)]
    pub down_for_ms: u64,
    /// How long a hung teacher stays stopped: longer than `[actors] teacher_timeout_ms`.
    #[arg(long, default_value_t = 3000)]
    pub hang_for_ms: u64,
    /// A fault the run has not recovered from within this long fails the experiment.
    #[arg(long, default_value_t = 120)]
    pub recover_timeout_s: u64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// How long a role may take to come up (model loading included).
    #[arg(long, default_value_t = 300)]
    pub startup_timeout_s: u64,
    /// The report (JSON); default `<run dir>/chaos.json`.
    #[arg(long)]
    pub report: Option<PathBuf>,
}

impl ChaosArgs {
    fn options(&self, cfg: &RunConfig) -> anyhow::Result<ChaosOptions> {
        let faults = if self.faults.is_empty() {
            Fault::ALL.to_vec()
        } else {
            (self.faults.iter())
                .map(|f| Fault::parse(f.trim()))
                .collect::<Result<_, _>>()?
        };
        anyhow::ensure!(
            self.fault_every_s.is_finite() && self.fault_every_s > 0.0,
            "--fault-every-s must be a positive number of seconds"
        );
        Ok(ChaosOptions {
            faults,
            fault_every: Duration::from_secs_f64(self.fault_every_s),
            down_for: Duration::from_millis(self.down_for_ms),
            hang_for: Duration::from_millis(self.hang_for_ms),
            recover_timeout: Duration::from_secs(self.recover_timeout_s),
            seed: self.seed,
            startup_timeout: Duration::from_secs(self.startup_timeout_s),
            report: (self.report.clone()).unwrap_or_else(|| cfg.run.dir.join("chaos.json")),
        })
    }
}

pub fn run(args: &ChaosArgs) -> anyhow::Result<()> {
    let cfg = RunConfig::load(&args.config)?;
    let options = args.options(&cfg)?;
    let ril = ril_orchestrate::RilBinary::current()?;
    let report = ril_orchestrate::runtime()?
        .block_on(ril_orchestrate::chaos::chaos(&ril, &cfg, &options))?;
    println!("{}", ril_orchestrate::chaos::table(&report));
    println!("report: {}", options.report.display());
    anyhow::ensure!(
        report.groups_lost == 0 && report.groups_trained_twice == 0,
        "the chaos run lost {} group(s) and trained {} twice",
        report.groups_lost,
        report.groups_trained_twice
    );
    Ok(())
}
