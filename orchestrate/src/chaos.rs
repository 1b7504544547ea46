//! `ril experiment chaos`: the local cluster run to its end while a fault is injected every few
//! seconds — a role killed (SIGKILL) and restarted on the same address, or a teacher hung
//! (SIGSTOP) past its deadline and continued — one fault at a time, each once the run has
//! recovered from the last. It reports what was injected, what the run recovered from and how
//! fast, the longest stretch without progress, and whether any group was lost or trained twice
//! (from the coordinator's count and the learner's `metrics.jsonl`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use ril_config::RunConfig;
use serde::Serialize;

use crate::cluster::{ClusterOptions, LocalCluster};
use crate::error::{OrchestrateError, Result};
use crate::ril::RilBinary;
use crate::status::fetch_status;

/// A fault the experiment injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    KillCoordinator,
    KillLearner,
    KillDiscriminator,
    KillTeacher,
    KillActor,
    /// SIGSTOP for `hang_for`, then SIGCONT: a hang, not a death.
    HangTeacher,
}

impl Fault {
    pub const ALL: [Fault; 6] = [
        Fault::KillCoordinator,
        Fault::KillLearner,
        Fault::KillDiscriminator,
        Fault::KillTeacher,
        Fault::KillActor,
        Fault::HangTeacher,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::KillCoordinator => "kill-coordinator",
            Fault::KillLearner => "kill-learner",
            Fault::KillDiscriminator => "kill-discriminator",
            Fault::KillTeacher => "kill-teacher",
            Fault::KillActor => "kill-actor",
            Fault::HangTeacher => "hang-teacher",
        }
    }

    /// A fault by its name (as `--faults` takes them).
    pub fn parse(name: &str) -> Result<Fault> {
        Fault::ALL
            .into_iter()
            .find(|f| f.name() == name)
            .ok_or_else(|| {
                let known: Vec<&str> = Fault::ALL.iter().map(|f| f.name()).collect();
                OrchestrateError::InvalidOption(format!(
                    "unknown fault {name:?}: expected one of {}",
                    known.join(", ")
                ))
            })
    }
}

/// How the chaos experiment runs.
#[derive(Debug, Clone)]
pub struct ChaosOptions {
    /// The faults drawn from (uniformly).
    pub faults: Vec<Fault>,
    /// The pause between the run's recovery from one fault and the next fault (drawn
    /// uniformly from half to one and a half times this).
    pub fault_every: Duration,
    /// How long a killed role stays down before it is started again.
    pub down_for: Duration,
    /// How long a hung teacher stays stopped (longer than `[actors] teacher_timeout_ms`).
    pub hang_for: Duration,
    /// A fault the run has not recovered from within this long fails the experiment.
    pub recover_timeout: Duration,
    pub seed: u64,
    pub startup_timeout: Duration,
    /// Where the report (JSON) goes.
    pub report: PathBuf,
}

/// One injected fault.
#[derive(Debug, Clone, Serialize)]
pub struct FaultRecord {
    pub fault: Fault,
    /// The role it hit.
    pub role: String,
    /// Seconds since the run started.
    pub injected_at_s: f64,
    /// When the role was started again (or continued).
    pub healed_at_s: Option<f64>,
    /// From healing to the run's next progress (a group accepted or a version published).
    pub recovered_after_s: Option<f64>,
}

/// Recovery times of one fault kind.
#[derive(Debug, Clone, Serialize)]
pub struct Recovery {
    pub injected: usize,
    pub recovered: usize,
    pub mean_s: f64,
    pub max_s: f64,
}

/// What the experiment saw.
#[derive(Debug, Clone, Serialize)]
pub struct ChaosReport {
    pub iterations: u64,
    pub questions_per_iteration: u64,
    pub seconds: f64,
    pub faults_injected: usize,
    pub faults_recovered: usize,
    /// Faults still in effect when the run finished (the other roles completed it before the
    /// role was started again): neither recovered nor failed.
    pub faults_open_at_end: usize,
    /// Positions never accepted or never trained.
    pub groups_lost: u64,
    /// Groups trained beyond one per position (from `metrics.jsonl`), plus versions logged
    /// more than once.
    pub groups_trained_twice: u64,
    /// Duplicates the coordinator refused (the same position rolled out twice, e.g. a lease
    /// re-issued after a coordinator restart): wasted work, not training.
    pub duplicates_refused: u64,
    /// The longest stretch without progress, and what the run was waiting for then.
    pub longest_stall_s: f64,
    pub longest_stall_waiting_for: String,
    pub recovery: BTreeMap<&'static str, Recovery>,
    pub faults: Vec<FaultRecord>,
}

/// What the injector does next.
enum Pending {
    /// Start the role at this index again (or continue it) at this time.
    Heal {
        at: Instant,
        index: usize,
        record: usize,
        hung: bool,
    },
    /// Inject the next fault at this time (once the run has recovered from the last).
    Inject { at: Instant },
}

/// Runs `cfg` through the local cluster (every server on a fixed loopback address), injecting
/// faults until the run finishes; the report is written to `options.report` and returned.
pub async fn chaos(
    ril: &RilBinary,
    cfg: &RunConfig,
    options: &ChaosOptions,
) -> Result<ChaosReport> {
    if options.faults.is_empty() {
        return Err(OrchestrateError::InvalidOption(
            "chaos: no faults to inject".into(),
        ));
    }
    let mut cluster = LocalCluster::new(ril, cfg)?.with_fixed_addresses();
    let cluster_options = ClusterOptions {
        actors: None,
        startup_timeout: options.startup_timeout,
        stall_timeout: options.recover_timeout,
    };
    let result = async {
        let (coordinator, first_actor) = cluster.start_all(&cluster_options).await?;
        let mut run = Injector::new(options, coordinator, first_actor);
        run.run(&mut cluster).await
    }
    .await;
    cluster.stop(Duration::from_secs(30)).await;
    let mut report = result?;
    settle_from_metrics(&mut report, &cfg.learner.out_dir.join("metrics.jsonl"))?;
    let text = serde_json::to_string_pretty(&report)
        .map_err(|e| OrchestrateError::InvalidOption(format!("chaos report: {e}")))?;
    if let Some(dir) = options.report.parent() {
        std::fs::create_dir_all(dir).ok();
    }
    std::fs::write(&options.report, text).map_err(OrchestrateError::io(format!(
        "writing {}",
        options.report.display()
    )))?;
    Ok(report)
}

/// The injection loop's state.
struct Injector<'o> {
    options: &'o ChaosOptions,
    coordinator: String,
    first_actor: usize,
    rng: StdRng,
    started: Instant,
    records: Vec<FaultRecord>,
    pending: Pending,
    /// A role down on purpose (its exit is not a failure).
    down: Option<usize>,
    last_progress: Instant,
    seen: (u64, u64),
    longest_stall: (Duration, String),
    waiting_for: String,
}

impl<'o> Injector<'o> {
    fn new(options: &'o ChaosOptions, coordinator: String, first_actor: usize) -> Self {
        let now = Instant::now();
        let mut rng = StdRng::seed_from_u64(options.seed);
        let first = now + jitter(&mut rng, options.fault_every);
        Self {
            options,
            coordinator,
            first_actor,
            rng,
            started: now,
            records: Vec::new(),
            pending: Pending::Inject { at: first },
            down: None,
            last_progress: now,
            seen: (0, 0),
            longest_stall: (Duration::ZERO, String::new()),
            waiting_for: String::new(),
        }
    }

    fn secs(&self, t: Instant) -> f64 {
        t.duration_since(self.started).as_secs_f64()
    }

    async fn run(&mut self, cluster: &mut LocalCluster<'_>) -> Result<ChaosReport> {
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            self.check_roles(cluster)?;
            let now = Instant::now();
            let status = fetch_status(&self.coordinator, Duration::from_secs(2), cluster.admin())
                .await
                .ok();
            if let Some(s) = &status {
                let seen = (s.groups_accepted, s.policy_version);
                if seen.0 > self.seen.0 || seen.1 > self.seen.1 {
                    // The stall this ends is named by what the run waited for until now.
                    self.progressed(now);
                }
                self.seen = seen;
                self.waiting_for = s.waiting_for.clone();
                if s.finished {
                    if let Pending::Heal {
                        index, hung: true, ..
                    } = self.pending
                    {
                        // Continued, so that it can stop like the others.
                        signal(cluster.proc_mut(index), nix::sys::signal::Signal::SIGCONT);
                    }
                    return Ok(self.report(s));
                }
            }
            let quiet = now.duration_since(self.last_progress);
            if quiet > self.options.recover_timeout {
                return Err(OrchestrateError::Stalled {
                    seconds: quiet.as_secs(),
                    version: self.seen.1,
                    waiting_for: self.waiting_for.clone(),
                });
            }
            self.step(cluster, now).await?;
        }
    }

    /// The run advanced at `now`: the stall it ends is measured, and faults healed before it
    /// count as recovered.
    fn progressed(&mut self, now: Instant) {
        let stall = now.duration_since(self.last_progress);
        if stall > self.longest_stall.0 {
            self.longest_stall = (stall, self.waiting_for.clone());
        }
        self.last_progress = now;
        let at = self.secs(now);
        for r in &mut self.records {
            if let (Some(healed), None) = (r.healed_at_s, r.recovered_after_s) {
                r.recovered_after_s = Some(at - healed);
            }
        }
    }

    /// Injects or heals when it is time.
    async fn step(&mut self, cluster: &mut LocalCluster<'_>, now: Instant) -> Result<()> {
        match self.pending {
            Pending::Heal {
                at,
                index,
                record,
                hung,
            } if now >= at => {
                if hung {
                    signal(cluster.proc_mut(index), nix::sys::signal::Signal::SIGCONT);
                } else {
                    cluster.restart(index)?;
                }
                self.down = None;
                self.records[record].healed_at_s = Some(self.secs(now));
                tracing::info!(role = %self.records[record].role, "chaos: healed");
                self.pending = Pending::Inject {
                    at: now + jitter(&mut self.rng, self.options.fault_every),
                };
            }
            Pending::Inject { at } if now >= at && self.recovered() => {
                self.inject(cluster, now).await?
            }
            _ => {}
        }
        Ok(())
    }

    fn recovered(&self) -> bool {
        self.records.iter().all(|r| r.recovered_after_s.is_some())
    }

    async fn inject(&mut self, cluster: &mut LocalCluster<'_>, now: Instant) -> Result<()> {
        let fault = self.options.faults[self.rng.random_range(0..self.options.faults.len())];
        let roles = cluster.roles();
        let role = match fault {
            Fault::KillCoordinator => "coordinator".to_string(),
            Fault::KillLearner => "learner".to_string(),
            Fault::KillDiscriminator => "discriminator".to_string(),
            Fault::KillTeacher | Fault::HangTeacher => {
                let teachers: Vec<&String> =
                    roles.iter().filter(|r| r.starts_with("teacher-")).collect();
                teachers[self.rng.random_range(0..teachers.len())].clone()
            }
            Fault::KillActor => {
                let actors = &roles[self.first_actor..];
                actors[self.rng.random_range(0..actors.len())].clone()
            }
        };
        let index = cluster
            .index_of(&role)
            .ok_or_else(|| OrchestrateError::InvalidOption(format!("chaos: no role {role}")))?;
        let hung = fault == Fault::HangTeacher;
        let proc = cluster.proc_mut(index);
        if hung {
            signal(proc, nix::sys::signal::Signal::SIGSTOP);
        } else {
            signal(proc, nix::sys::signal::Signal::SIGKILL);
            let _ = tokio::time::timeout(Duration::from_secs(10), proc.child.wait()).await;
            self.down = Some(index);
        }
        tracing::info!(fault = fault.name(), %role, "chaos: fault injected");
        self.records.push(FaultRecord {
            fault,
            role,
            injected_at_s: self.secs(now),
            healed_at_s: None,
            recovered_after_s: None,
        });
        let wait = if hung {
            self.options.hang_for
        } else {
            self.options.down_for
        };
        self.pending = Pending::Heal {
            at: now + wait,
            index,
            record: self.records.len() - 1,
            hung,
        };
        Ok(())
    }

    /// A role that exited on its own (not one killed on purpose, not an actor that finished)
    /// fails the experiment with its last output.
    fn check_roles(&mut self, cluster: &mut LocalCluster<'_>) -> Result<()> {
        for i in 0..cluster.roles().len() {
            if Some(i) == self.down {
                continue;
            }
            let proc = cluster.proc_mut(i);
            if let Ok(Some(status)) = proc.child.try_wait()
                && (i < self.first_actor || !status.success())
            {
                return Err(OrchestrateError::Exited {
                    role: proc.role.clone(),
                    status,
                    when: "during the chaos run",
                    tail: proc.tail(),
                });
            }
        }
        Ok(())
    }

    fn report(&self, s: &ril_proto::v1::RunStatus) -> ChaosReport {
        let mut recovery = BTreeMap::new();
        for fault in Fault::ALL {
            let of: Vec<&FaultRecord> = self.records.iter().filter(|r| r.fault == fault).collect();
            if of.is_empty() {
                continue;
            }
            let times: Vec<f64> = of.iter().filter_map(|r| r.recovered_after_s).collect();
            recovery.insert(
                fault.name(),
                Recovery {
                    injected: of.len(),
                    recovered: times.len(),
                    mean_s: times.iter().sum::<f64>() / times.len().max(1) as f64,
                    max_s: times.iter().copied().fold(0.0, f64::max),
                },
            );
        }
        ChaosReport {
            iterations: s.total_iterations,
            questions_per_iteration: 0,
            seconds: self.started.elapsed().as_secs_f64(),
            faults_injected: self.records.len(),
            faults_recovered: self
                .records
                .iter()
                .filter(|r| r.recovered_after_s.is_some())
                .count(),
            faults_open_at_end: self
                .records
                .iter()
                .filter(|r| r.healed_at_s.is_none())
                .count(),
            groups_lost: 0,
            groups_trained_twice: 0,
            duplicates_refused: s.duplicates_refused,
            longest_stall_s: self.longest_stall.0.as_secs_f64(),
            longest_stall_waiting_for: self.longest_stall.1.clone(),
            recovery,
            faults: self.records.clone(),
        }
    }
}

/// Half to one and a half times `every`.
fn jitter(rng: &mut StdRng, every: Duration) -> Duration {
    every.mul_f64(rng.random_range(0.5..1.5))
}

fn signal(proc: &mut crate::supervise::Proc, signal: nix::sys::signal::Signal) {
    if let Some(pid) = proc.child.id() {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal);
    }
}

/// Groups lost and trained twice, from the learner's `metrics.jsonl`: every version
/// `1..=iterations` must be logged once, each with its iteration's B groups.
fn settle_from_metrics(report: &mut ChaosReport, metrics: &Path) -> Result<()> {
    let text = std::fs::read_to_string(metrics).map_err(OrchestrateError::io(format!(
        "reading {}",
        metrics.display()
    )))?;
    let mut per_version: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let bad = |what: &str| {
            OrchestrateError::InvalidOption(format!("{} line {}: {what}", metrics.display(), n + 1))
        };
        let m: serde_json::Value = serde_json::from_str(line).map_err(|e| bad(&e.to_string()))?;
        let version = m["version"].as_u64().ok_or_else(|| bad("no version"))?;
        let groups = m["groups"].as_f64().ok_or_else(|| bad("no groups"))? as u64;
        per_version.entry(version).or_default().push(groups);
    }
    let b = per_version.values().flatten().copied().max().unwrap_or(0);
    report.questions_per_iteration = b;
    let mut lost = 0;
    let mut twice = 0;
    for v in 1..=report.iterations {
        match per_version.get(&v).map(Vec::as_slice) {
            None => lost += b,
            Some([g]) => {
                lost += b.saturating_sub(*g);
            }
            Some(many) => {
                twice += many.iter().sum::<u64>() - many[0];
            }
        }
    }
    report.groups_lost = lost;
    report.groups_trained_twice = twice;
    Ok(())
}

/// The report as a Markdown table (what `ril experiment chaos` prints).
pub fn table(r: &ChaosReport) -> String {
    let mut out = format!(
        "| | |\n|---|---|\n| iterations | {} (B = {}) |\n| run time | {:.0} s |\n\
         | faults injected / recovered / open at the end | {} / {} / {} |\n| groups lost | {} |\n\
         | groups trained twice | {} |\n| duplicates refused (wasted rollouts) | {} |\n\
         | longest stall | {:.1} s (waiting for: {}) |\n\n\
         | fault | injected | recovered | time to progress after the restart: mean | max |\n\
         |---|---|---|---|---|\n",
        r.iterations,
        r.questions_per_iteration,
        r.seconds,
        r.faults_injected,
        r.faults_recovered,
        r.faults_open_at_end,
        r.groups_lost,
        r.groups_trained_twice,
        r.duplicates_refused,
        r.longest_stall_s,
        if r.longest_stall_waiting_for.is_empty() {
            "-"
        } else {
            &r.longest_stall_waiting_for
        },
    );
    for (name, k) in &r.recovery {
        out.push_str(&format!(
            "| {name} | {} | {} | {:.2} s | {:.2} s |\n",
            k.injected, k.recovered, k.mean_s, k.max_s
        ));
    }
    out
}
