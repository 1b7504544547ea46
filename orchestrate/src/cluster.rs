//! The local cluster (`ril train --config run.toml`). Teachers, the discriminator, the
//! coordinator, the learner ranks and N actors run as separate `ril` processes on loopback
//! ports, talking the same gRPC as on Kubernetes. Their logs stream with a role prefix (and go to
//! `<run dir>/logs/<role>.log`); a progress line follows the coordinator's status; success,
//! failure and Ctrl-C all stop every child (SIGTERM, then SIGKILL after a grace period).
//!
//! Start-up runs in phases, each waiting for what the next needs: teachers and the
//! discriminator (they need nobody), the coordinator (it hands their addresses to actors), the
//! learner ranks (they meet at the coordinator before serving), then the actors.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ril_config::RunConfig;
use ril_proto::security::Security;
use ril_proto::v1::RunStatus;

use crate::error::{OrchestrateError, Result};
use crate::ril::{RilBinary, arg};
use crate::security::{LocalSecurity, local_security};
use crate::status::fetch_status;
use crate::supervise::{Proc, addr_file, spawn, stop_all, wait_addr, wait_for};

/// How the local cluster runs, beyond the run config.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Overrides `[actors] count`.
    pub actors: Option<u32>,
    /// How long a role may take to come up (model loading included).
    pub startup_timeout: Duration,
    /// Give up when the run has not advanced for this long.
    pub stall_timeout: Duration,
}

/// What a finished run left behind.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    pub status: RunStatus,
    pub learner_dir: PathBuf,
    pub seconds: f64,
}

/// How long the children get to stop after SIGTERM before they are killed.
const STOP_GRACE: Duration = Duration::from_secs(30);

/// The role processes of one local run, as they are started.
pub struct LocalCluster<'a> {
    ril: &'a RilBinary,
    cfg: &'a RunConfig,
    addrs: PathBuf,
    logs: PathBuf,
    security: LocalSecurity,
    procs: Vec<Proc>,
    /// Each process's `ril` arguments, to start it again ([`LocalCluster::restart`]).
    args: Vec<Vec<String>>,
    /// Role -> the loopback address it listens on, when servers keep one address across
    /// restarts (the chaos experiment); `None`: any free port.
    fixed: Option<std::collections::BTreeMap<String, String>>,
    /// Restarts so far (numbering their log files).
    restarts: u32,
}

impl std::fmt::Debug for LocalCluster<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCluster")
            .field("run", &self.cfg.run.id)
            .field("procs", &self.procs)
            .finish()
    }
}

/// The addresses of the servers that need nobody: teachers and the discriminator.
struct Peers {
    /// `--teacher-addr NAME=ADDR` for the coordinator.
    teacher_flags: Vec<String>,
    discriminator: String,
}

impl<'a> LocalCluster<'a> {
    /// The run's `addrs/` directory and its security (generated for this launch unless the
    /// config names its own); nothing is started yet.
    pub fn new(ril: &'a RilBinary, cfg: &'a RunConfig) -> Result<Self> {
        let addrs = cfg.run.dir.join("addrs");
        std::fs::create_dir_all(&addrs).map_err(OrchestrateError::io(format!(
            "creating {}",
            addrs.display()
        )))?;
        Ok(Self {
            ril,
            cfg,
            addrs,
            logs: cfg.run.dir.join("logs"),
            security: local_security(cfg)?,
            procs: Vec::new(),
            args: Vec::new(),
            fixed: None,
            restarts: 0,
        })
    }

    /// Servers listen on one loopback address each for the life of the cluster, so that a
    /// restarted role is found where its peers look.
    pub fn with_fixed_addresses(mut self) -> Self {
        self.fixed = Some(Default::default());
        self
    }

    /// The address a server role listens on: a free loopback port chosen once per role when
    /// addresses are fixed, else any free port.
    fn listen_addr(&mut self, role: &str) -> Result<String> {
        let Some(fixed) = &mut self.fixed else {
            return Ok("127.0.0.1:0".into());
        };
        if let Some(addr) = fixed.get(role) {
            return Ok(addr.clone());
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(OrchestrateError::io(format!("choosing a port for {role}")))?
            .port();
        let addr = format!("127.0.0.1:{port}");
        fixed.insert(role.to_string(), addr.clone());
        Ok(addr)
    }

    /// The index of the process running as `role`.
    pub(crate) fn index_of(&self, role: &str) -> Option<usize> {
        self.procs.iter().position(|p| p.role == role)
    }

    /// The roles, in start order.
    pub(crate) fn roles(&self) -> Vec<String> {
        self.procs.iter().map(|p| p.role.clone()).collect()
    }

    pub(crate) fn proc_mut(&mut self, i: usize) -> &mut Proc {
        &mut self.procs[i]
    }

    /// Starts the process at `i` again with the same arguments (its log goes to
    /// `logs/<role>.<n>.log`); the old one must have exited.
    pub(crate) fn restart(&mut self, i: usize) -> Result<()> {
        self.restarts += 1;
        let role = self.procs[i].role.clone();
        let log = self.logs.join(format!("{role}.{}.log", self.restarts));
        self.procs[i] = spawn(self.ril, &role, &self.args[i], Some(&log))?;
        Ok(())
    }

    /// The flags a client of this launch needs (`--security-dir ...` or `--insecure`).
    pub fn security_flags(&self) -> &[String] {
        &self.security.flags
    }

    /// Starts `ril <subcommand> <args>` as `role`, logging to `logs/<role>.log`; its index.
    fn start(&mut self, role: &str, subcommand: &[&str], args: Vec<String>) -> Result<usize> {
        let mut a: Vec<String> = subcommand.iter().map(|s| s.to_string()).collect();
        a.extend(args);
        let log = self.logs.join(format!("{role}.log"));
        self.procs.push(spawn(self.ril, role, &a, Some(&log))?);
        self.args.push(a);
        Ok(self.procs.len() - 1)
    }

    /// Starts a serving role: the run config, a loopback listener on any free port with its
    /// address file, the run's security flags, then `extra`. Its index and address file.
    fn start_server(
        &mut self,
        role: &str,
        subcommand: &[&str],
        extra: Vec<String>,
    ) -> Result<(usize, PathBuf)> {
        let file = addr_file(&self.addrs, role);
        let mut a: Vec<String> = vec![
            "--config".into(),
            arg(&self.cfg.path),
            "--listen".into(),
            self.listen_addr(role)?,
            "--addr-file".into(),
            arg(&file),
        ];
        a.extend(self.security.flags.iter().cloned());
        a.extend(self.metrics_flags(role));
        a.extend(extra);
        Ok((self.start(role, subcommand, a)?, file))
    }

    /// Every role serves Prometheus metrics on a free loopback port, its address written to
    /// `addrs/<role>.metrics.addr` (`curl http://$(cat ...)/metrics`).
    fn metrics_flags(&self, role: &str) -> Vec<String> {
        let file = addr_file(&self.addrs, &format!("{role}.metrics"));
        vec![
            "--metrics-listen".into(),
            "127.0.0.1:0".into(),
            "--metrics-addr-file".into(),
            arg(&file),
        ]
    }

    /// One `ril teacher` server per `[[teachers]]` entry (role `teacher-<name>`).
    fn start_teachers(&mut self) -> Result<Vec<(usize, String, PathBuf)>> {
        let mut started = Vec::new();
        for t in &self.cfg.teachers {
            let role = format!("teacher-{}", t.name);
            let name = vec!["--name".to_string(), t.name.clone()];
            let (i, file) = self.start_server(&role, &["teacher"], name)?;
            started.push((i, role, file));
        }
        Ok(started)
    }

    /// Waits for the process at `i` to write its address and to answer SERVING.
    async fn wait_up(&mut self, i: usize, file: &Path, startup: Duration) -> Result<String> {
        let addr = wait_addr(&mut self.procs[i], file, startup).await?;
        wait_serving(&addr, &mut self.procs[i], startup, &self.security.admin).await?;
        Ok(addr)
    }

    /// The run's teacher servers alone, serving (for D's pre-training, which asks them for
    /// answers before the cluster runs; their answer caches are the run's, so the RIL run
    /// reuses what they wrote). Their addresses, in `[[teachers]]` order.
    pub async fn serve_teachers(&mut self, startup: Duration) -> Result<Vec<String>> {
        let mut found = Vec::new();
        for (i, _, file) in self.start_teachers()? {
            found.push(self.wait_up(i, &file, startup).await?);
        }
        Ok(found)
    }

    /// Teachers and the discriminator need nobody; they start together.
    async fn start_peers(&mut self, startup: Duration) -> Result<Peers> {
        let mut waiting = self.start_teachers()?;
        let (i, file) = self.start_server("discriminator", &["discriminator", "serve"], vec![])?;
        waiting.push((i, "discriminator".into(), file));
        let mut found = Vec::new();
        for (i, role, file) in waiting {
            found.push((
                i,
                role,
                wait_addr(&mut self.procs[i], &file, startup).await?,
            ));
        }
        let mut peers = Peers {
            teacher_flags: Vec::new(),
            discriminator: String::new(),
        };
        for (i, role, addr) in found {
            wait_serving(&addr, &mut self.procs[i], startup, &self.security.admin).await?;
            match role.strip_prefix("teacher-") {
                Some(name) => peers
                    .teacher_flags
                    .extend(["--teacher-addr".to_string(), format!("{name}={addr}")]),
                None => peers.discriminator = addr,
            }
        }
        Ok(peers)
    }

    async fn start_coordinator(&mut self, peers: &Peers, startup: Duration) -> Result<String> {
        let mut extra = peers.teacher_flags.clone();
        extra.extend(["--discriminator-addr".into(), peers.discriminator.clone()]);
        let (i, file) = self.start_server("coordinator", &["coordinator"], extra)?;
        self.wait_up(i, &file, startup).await
    }

    /// Learner ranks 0..R-1 (rank 0, `learner`, is the one actors and status use). All start
    /// before any is waited on: they meet at the coordinator before serving. Rank 0's address.
    async fn start_learner_ranks(
        &mut self,
        coordinator: &str,
        discriminator: &str,
        startup: Duration,
    ) -> Result<String> {
        let mut ranks = Vec::new();
        for rank in 0..self.cfg.learner.world_size.max(1) {
            let role = match rank {
                0 => "learner".to_string(),
                _ => format!("learner-{rank}"),
            };
            let mut extra = [
                "--coordinator",
                coordinator,
                "--discriminator-addr",
                discriminator,
                "--rank",
                &rank.to_string(),
                "--collective-listen",
                "127.0.0.1:0",
            ]
            .map(String::from)
            .to_vec();
            if let Some(device) = rank_device(&self.cfg.learner, rank) {
                extra.extend(["--device".to_string(), device]);
            }
            ranks.push(self.start_server(&role, &["learner"], extra)?);
        }
        let mut rank0 = String::new();
        for (i, file) in ranks {
            let addr = self.wait_up(i, &file, startup).await?;
            if rank0.is_empty() {
                rank0 = addr;
            }
        }
        Ok(rank0)
    }

    /// `count` actors (`actor-<k>`); the index of the first.
    fn start_actors(&mut self, coordinator: &str, count: u32) -> Result<usize> {
        if count == 0 {
            return Err(OrchestrateError::NoActors);
        }
        let first = self.procs.len();
        for k in 0..count {
            let role = format!("actor-{k}");
            let mut a = vec![
                "--config".to_string(),
                arg(&self.cfg.path),
                "--coordinator".into(),
                coordinator.to_string(),
                "--id".into(),
                role.clone(),
            ];
            a.extend(self.security.flags.iter().cloned());
            a.extend(self.metrics_flags(&role));
            self.start(&role, &["actor"], a)?;
        }
        Ok(first)
    }

    /// Follows the run until it finishes, a role fails, it stalls, or Ctrl-C. Actors may end
    /// on their own (successfully); any other role ending is a failure.
    async fn follow(
        &mut self,
        coordinator: &str,
        first_actor: usize,
        stall_timeout: Duration,
    ) -> Result<RunStatus> {
        let bar = progress_bar(self.cfg.run.iterations);
        let mut last_change = Instant::now();
        let mut last_version = u64::MAX;
        let ctrl_c = ril_proto::server::shutdown_signal();
        tokio::pin!(ctrl_c);
        loop {
            tokio::select! {
                _ = &mut ctrl_c => return Err(OrchestrateError::Interrupted),
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
            self.check_roles(first_actor)?;
            let admin = &self.security.admin;
            let status = match fetch_status(coordinator, Duration::from_secs(5), admin).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "status unavailable");
                    continue;
                }
            };
            let advanced = status.policy_version != last_version;
            if advanced {
                last_version = status.policy_version;
                last_change = Instant::now();
            }
            report_progress(&bar, &status, advanced);
            if status.finished {
                if let Some(b) = &bar {
                    b.finish();
                }
                return Ok(status);
            }
            let actors = &mut self.procs[first_actor..];
            if actors
                .iter_mut()
                .all(|p| matches!(p.child.try_wait(), Ok(Some(_))))
            {
                return Err(OrchestrateError::ActorsGone);
            }
            if last_change.elapsed() > stall_timeout {
                return Err(OrchestrateError::Stalled {
                    seconds: stall_timeout.as_secs(),
                    version: last_version,
                    waiting_for: status.waiting_for.clone(),
                });
            }
        }
    }

    /// A role that has exited is a failure, but for an actor that finished successfully.
    fn check_roles(&mut self, first_actor: usize) -> Result<()> {
        for (i, p) in self.procs.iter_mut().enumerate() {
            let status = p
                .child
                .try_wait()
                .map_err(OrchestrateError::io(format!("waiting for {}", p.role)))?;
            if let Some(status) = status
                && (i < first_actor || !status.success())
            {
                return Err(OrchestrateError::Exited {
                    role: p.role.clone(),
                    status,
                    when: "during the run",
                    tail: p.tail(),
                });
            }
        }
        Ok(())
    }

    /// Every role, started in order: the coordinator's address and the index of the first
    /// actor.
    pub(crate) async fn start_all(&mut self, options: &ClusterOptions) -> Result<(String, usize)> {
        let startup = options.startup_timeout;
        let peers = self.start_peers(startup).await?;
        let coordinator = self.start_coordinator(&peers, startup).await?;
        let learner = self
            .start_learner_ranks(&coordinator, &peers.discriminator, startup)
            .await?;
        let n_actors = options.actors.unwrap_or(self.cfg.actors.count);
        let first_actor = self.start_actors(&coordinator, n_actors)?;
        tracing::info!(coordinator = %coordinator, learner = %learner, discriminator = %peers.discriminator, actors = n_actors, "local cluster up");
        Ok((coordinator, first_actor))
    }

    /// Every role, started in order, then the run followed to its end.
    async fn run(&mut self, options: &ClusterOptions) -> Result<RunStatus> {
        let (coordinator, first_actor) = self.start_all(options).await?;
        self.follow(&coordinator, first_actor, options.stall_timeout)
            .await
    }

    /// The admin credentials of this launch (for status calls).
    pub(crate) fn admin(&self) -> &Security {
        &self.security.admin
    }

    /// SIGTERM to every child, SIGKILL to those still running after `grace`.
    pub async fn stop(&mut self, grace: Duration) {
        for (role, st) in stop_all(&mut self.procs, grace).await {
            tracing::debug!(role, status = ?st, "stopped");
        }
    }
}

/// Waits until `addr` answers grpc.health.v1 SERVING, failing early if `proc` exits.
async fn wait_serving(
    addr: &str,
    proc: &mut Proc,
    timeout: Duration,
    security: &Security,
) -> Result<()> {
    let serving = || async {
        let health = ril_proto::client::health_check(addr, "", Duration::from_secs(2), security);
        matches!(health.await, Ok(ril_proto::server::ServingStatus::Serving)).then_some(())
    };
    let timed_out = |p: &Proc| OrchestrateError::NotServing {
        role: p.role.clone(),
        addr: addr.to_string(),
        timeout,
        tail: p.tail(),
    };
    let every = Duration::from_millis(100);
    wait_for(proc, timeout, every, "before serving", timed_out, serving).await
}

/// `cfg`'s run through the local cluster, every child stopped at the end, whatever the end.
pub async fn run_cluster(
    ril: &RilBinary,
    cfg: &RunConfig,
    options: &ClusterOptions,
) -> Result<TrainOutcome> {
    let started = Instant::now();
    let mut cluster = LocalCluster::new(ril, cfg)?;
    let result = cluster.run(options).await;
    cluster.stop(STOP_GRACE).await;
    Ok(TrainOutcome {
        status: result?,
        learner_dir: cfg.learner.out_dir.clone(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn progress_bar(total: u64) -> Option<indicatif::ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{elapsed_precise} [{bar:30}] iteration {pos}/{len} {msg}",
    ) {
        bar.set_style(style);
    }
    Some(bar)
}

fn report_progress(bar: &Option<indicatif::ProgressBar>, s: &RunStatus, advanced: bool) {
    let metric = |k: &str| s.metrics.get(k).copied().unwrap_or(f64::NAN);
    let msg = format!(
        "reward student {:.2} teacher {:.2}, kl {:.4}, {} actors, {:.2} groups/s",
        metric("reward_student_mean"),
        metric("reward_teacher_mean"),
        metric("kl_mean"),
        s.actors.iter().filter(|a| a.alive).count(),
        s.groups_per_second
    );
    match bar {
        Some(b) => {
            b.set_position(s.policy_version);
            b.set_message(msg);
        }
        // Without a terminal: one log line per new version.
        None if advanced => {
            tracing::info!(
                iteration = s.policy_version,
                total = s.total_iterations,
                "{msg}"
            );
        }
        None => {}
    }
}

/// The device of learner rank `rank` in a local cluster: with `collective = "nccl"` and
/// `learner.device = "cuda:N"`, rank r runs on `cuda:(N + r)`, since NCCL needs each rank on its
/// own GPU; otherwise (CPU, or the ring collective) every rank keeps `learner.device`.
fn rank_device(learner: &ril_learner::LearnerOptions, rank: u32) -> Option<String> {
    if learner.collective != "nccl" {
        return None;
    }
    match learner.cuda_ordinal() {
        Ok(Some(first)) => Some(format!("cuda:{}", first + rank as usize)),
        _ => None,
    }
}

#[cfg(test)]
mod rank_device_tests {
    use super::*;

    #[test]
    fn nccl_ranks_take_consecutive_gpus_and_others_keep_the_learner_device() {
        let p = std::path::Path::new("unused");
        let mut learner = ril_learner::LearnerOptions::for_test(p, p, "127.0.0.1:1");
        learner.collective = "nccl".into();
        learner.device = "cuda:2".into();
        assert_eq!(rank_device(&learner, 0).as_deref(), Some("cuda:2"));
        assert_eq!(rank_device(&learner, 3).as_deref(), Some("cuda:5"));
        learner.device = "cuda".into();
        assert_eq!(rank_device(&learner, 1).as_deref(), Some("cuda:1"));
        learner.collective = "ring".into();
        assert_eq!(rank_device(&learner, 1), None);
        learner.collective = "nccl".into();
        learner.device = "cpu".into();
        assert_eq!(rank_device(&learner, 1), None);
    }
}
