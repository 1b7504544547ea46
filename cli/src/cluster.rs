//! `ril train --config run.toml`: the local cluster. Teachers, the discriminator, the
//! coordinator, the learner and N actors run as separate `ril` processes on loopback ports,
//! talking the same gRPC as on Kubernetes. Their logs stream with a role prefix (and go to
//! `<run dir>/logs/<role>.log`); a progress line follows the coordinator's status; success,
//! failure and Ctrl-C all stop every child (SIGTERM, then SIGKILL after a grace period).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::config::RunConfig;
use crate::supervise::{Proc, addr_file, spawn, stop_all, wait_addr};

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

/// What a finished run left behind.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    pub status: ril_proto::v1::RunStatus,
    pub learner_dir: PathBuf,
    pub seconds: f64,
}

fn s(x: impl AsRef<std::ffi::OsStr>) -> String {
    x.as_ref().to_string_lossy().into_owned()
}

/// The local cluster's security: the flags every child gets and the supervisor's own (admin)
/// settings. By default a fresh CA, role certificates and token are generated into
/// `<run dir>/security/` for every launch, so the local run takes the secure path (TLS, mutual
/// TLS, token, roles; reflection on). A `[security]` naming its own files is used as written;
/// `allow_insecure = true` turns everything off (loudly).
pub fn local_security(
    cfg: &RunConfig,
) -> anyhow::Result<(Vec<String>, ril_proto::security::Security)> {
    use ril_proto::security::Role;
    let sec = &cfg.security;
    let args = crate::roles::SecurityArgs::default();
    if sec.allow_insecure {
        let admin = crate::roles::resolve_security(Some(sec), &args, Role::Admin)?;
        return Ok((vec!["--insecure".into()], admin));
    }
    let own = sec.token_file.is_some()
        || sec.token_env.is_some()
        || sec.ca.is_some()
        || sec.cert.is_some()
        || sec.key.is_some();
    if own {
        let admin = crate::roles::resolve_security(Some(sec), &args, Role::Admin)?;
        return Ok((vec!["--reflection".into()], admin));
    }
    let dir = cfg.run.dir.join("security");
    crate::certs::generate(&dir, &[], "ril", true).with_context(|| {
        format!(
            "generating the local run's certificates in {}",
            dir.display()
        )
    })?;
    tracing::info!(dir = %dir.display(), "local cluster: TLS + mutual TLS + run token (generated for this launch)");
    let args = crate::roles::SecurityArgs {
        security_dir: Some(dir.clone()),
        insecure: false,
        reflection: true,
    };
    let admin = crate::roles::resolve_security(Some(sec), &args, Role::Admin)?;
    Ok((
        vec!["--security-dir".into(), s(&dir), "--reflection".into()],
        admin,
    ))
}

/// A serving role's arguments after its subcommand: the run config, a loopback listener on
/// any free port with its address file, and the run's security flags.
fn serve_args(
    config: &str,
    addrs: &Path,
    role: &str,
    security_flags: &[String],
) -> (Vec<String>, PathBuf) {
    let f = addr_file(addrs, role);
    let mut a: Vec<String> = vec![
        "--config".into(),
        config.into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--addr-file".into(),
        s(&f),
    ];
    a.extend(security_flags.iter().cloned());
    (a, f)
}

/// One `ril teacher` server per `[[teachers]]` entry (role `teacher-<name>`, log in `logs`):
/// the processes, their roles and their address files.
fn spawn_teachers(
    cfg: &RunConfig,
    logs: &Path,
    serve_args: impl Fn(&str) -> (Vec<String>, PathBuf),
) -> anyhow::Result<Vec<(Proc, String, PathBuf)>> {
    let mut out = Vec::new();
    for t in &cfg.teachers {
        let role = format!("teacher-{}", t.name);
        let (mut a, f) = serve_args(&role);
        a.splice(0..0, ["teacher".to_string()]);
        a.extend(["--name".into(), t.name.clone()]);
        out.push((
            spawn(&role, &a, Some(&logs.join(format!("{role}.log"))))?,
            role,
            f,
        ));
    }
    Ok(out)
}

/// The run's teacher servers alone, serving (for D's pre-training, which asks them for
/// answers before the cluster runs; their answer caches are the run's, so the RIL run reuses
/// what they wrote). Returns the processes (stop them with [`stop_all`]), their addresses and
/// the security flags a client of this launch needs.
pub async fn serve_teachers(
    cfg: &RunConfig,
    config: &Path,
    startup: Duration,
) -> anyhow::Result<(Vec<Proc>, Vec<String>, Vec<String>)> {
    let addrs = cfg.run.dir.join("addrs");
    std::fs::create_dir_all(&addrs).with_context(|| format!("creating {}", addrs.display()))?;
    let logs = cfg.run.dir.join("logs");
    let config = s(config);
    let (security_flags, admin) = local_security(cfg)?;
    let spawned = spawn_teachers(cfg, &logs, |role| {
        serve_args(&config, &addrs, role, &security_flags)
    })?;
    let mut procs = Vec::new();
    let mut waiting = Vec::new();
    for (proc, role, f) in spawned {
        procs.push(proc);
        waiting.push((role, f));
    }
    let mut found = Vec::new();
    for (i, (role, f)) in waiting.iter().enumerate() {
        let up = async {
            let addr = wait_addr(&mut procs[i], f, startup).await?;
            wait_serving(&addr, role, &mut procs[i], startup, &admin).await?;
            anyhow::Ok(addr)
        }
        .await;
        match up {
            Ok(addr) => found.push(addr),
            Err(e) => {
                stop_all(&mut procs, Duration::from_secs(10)).await;
                return Err(e);
            }
        }
    }
    Ok((procs, found, security_flags))
}

async fn wait_serving(
    addr: &str,
    role: &str,
    proc: &mut Proc,
    timeout: Duration,
    security: &ril_proto::security::Security,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(ril_proto::server::ServingStatus::Serving) =
            ril_proto::client::health_check(addr, "", Duration::from_secs(2), security).await
        {
            return Ok(());
        }
        if let Some(st) = proc.child.try_wait()? {
            bail!(
                "{role} exited ({st}) before serving; its last output:\n{}",
                proc.tail()
            );
        }
        if Instant::now() > deadline {
            bail!("{role} at {addr} was not SERVING within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn train(args: &TrainArgs) -> anyhow::Result<()> {
    let cfg = RunConfig::load(&args.config)?;
    let outcome = crate::roles::runtime()?.block_on(run_cluster(&cfg, &args.config, args))?;
    println!("{}", crate::roles::format_status(&outcome.status));
    println!(
        "finished in {:.1} s; learner checkpoints in {}",
        outcome.seconds,
        outcome.learner_dir.display()
    );
    Ok(())
}

pub async fn run_cluster(
    cfg: &RunConfig,
    config: &Path,
    args: &TrainArgs,
) -> anyhow::Result<TrainOutcome> {
    let started = Instant::now();
    let dir = &cfg.run.dir;
    let addrs = dir.join("addrs");
    let logs = dir.join("logs");
    std::fs::create_dir_all(&addrs).with_context(|| format!("creating {}", addrs.display()))?;
    let config = s(config);
    let startup = Duration::from_secs(args.startup_timeout_s);
    let mut procs: Vec<Proc> = Vec::new();
    let (security_flags, admin) = local_security(cfg)?;
    let result = async {
        let listen = "127.0.0.1:0".to_string();
        let serve_args = |role: &str| serve_args(&config, &addrs, role, &security_flags);
        // Teachers and the discriminator need nobody; start them together.
        let mut waiting = Vec::new();
        for (proc, role, f) in spawn_teachers(cfg, &logs, serve_args)? {
            procs.push(proc);
            waiting.push((procs.len() - 1, role, f));
        }
        let (mut a, f) = serve_args("discriminator");
        a.splice(0..0, ["discriminator".to_string(), "serve".to_string()]);
        procs.push(spawn("discriminator", &a, Some(&logs.join("discriminator.log")))?);
        waiting.push((procs.len() - 1, "discriminator".into(), f));
        let mut found = Vec::new();
        for (i, role, f) in waiting {
            let addr = wait_addr(&mut procs[i], &f, startup).await?;
            found.push((i, role, addr));
        }
        let mut teacher_flags = Vec::new();
        let mut disc_addr = String::new();
        for (i, role, addr) in &found {
            wait_serving(addr, role, &mut procs[*i], startup, &admin).await?;
            if let Some(name) = role.strip_prefix("teacher-") {
                teacher_flags.extend(["--teacher-addr".to_string(), format!("{name}={addr}")]);
            } else {
                disc_addr = addr.clone();
            }
        }
        let (mut a, f) = serve_args("coordinator");
        a.splice(0..0, ["coordinator".to_string()]);
        a.extend(teacher_flags);
        a.extend(["--discriminator-addr".into(), disc_addr.clone()]);
        procs.push(spawn("coordinator", &a, Some(&logs.join("coordinator.log")))?);
        let ci = procs.len() - 1;
        let coord = wait_addr(&mut procs[ci], &f, startup).await?;
        wait_serving(&coord, "coordinator", &mut procs[ci], startup, &admin).await?;

        // Learner ranks 0..R-1 (rank 0, `learner`, is the one actors and status use). All start
        // before any is waited on: they meet at the coordinator before serving.
        let mut ranks = Vec::new();
        for rank in 0..cfg.learner.world_size.max(1) {
            let role = if rank == 0 { "learner".to_string() } else { format!("learner-{rank}") };
            let (mut a, f) = serve_args(&role);
            a.splice(0..0, ["learner".to_string()]);
            a.extend([
                "--coordinator".into(), coord.clone(), "--discriminator-addr".into(), disc_addr.clone(),
                "--rank".into(), rank.to_string(), "--collective-listen".into(), listen.clone(),
            ]);
            procs.push(spawn(&role, &a, Some(&logs.join(format!("{role}.log"))))?);
            ranks.push((procs.len() - 1, role, f));
        }
        let mut learner = String::new();
        for (i, role, f) in &ranks {
            let addr = wait_addr(&mut procs[*i], f, startup).await?;
            wait_serving(&addr, role, &mut procs[*i], startup, &admin).await?;
            if learner.is_empty() {
                learner = addr;
            }
        }

        let n_actors = args.actors.unwrap_or(cfg.actors.count);
        if n_actors == 0 {
            bail!("no actors: set [actors] count >= 1");
        }
        let first_actor = procs.len();
        for k in 0..n_actors {
            let role = format!("actor-{k}");
            let mut a = vec![
                "actor".to_string(), "--config".into(), config.clone(), "--coordinator".into(),
                coord.clone(), "--id".into(), role.clone(),
            ];
            a.extend(security_flags.iter().cloned());
            procs.push(spawn(&role, &a, Some(&logs.join(format!("{role}.log"))))?);
        }
        tracing::info!(coordinator = %coord, learner = %learner, discriminator = %disc_addr, actors = n_actors, "local cluster up");

        // Follow the run until it finishes, a role fails, or Ctrl-C.
        let bar = progress_bar(cfg.run.iterations);
        let mut last_change = Instant::now();
        let mut last_version = u64::MAX;
        let ctrl_c = ril_proto::server::shutdown_signal();
        tokio::pin!(ctrl_c);
        loop {
            tokio::select! {
                _ = &mut ctrl_c => bail!("interrupted"),
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
            for (i, p) in procs.iter_mut().enumerate() {
                if let Some(st) = p.child.try_wait()? {
                    let is_actor = i >= first_actor;
                    if !is_actor || !st.success() {
                        bail!("{} exited ({st}) during the run; its last output:\n{}", p.role, p.tail());
                    }
                }
            }
            let status = match crate::roles::fetch_status(&coord, Duration::from_secs(5), &admin).await {
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
                return Ok((status, learner.clone()));
            }
            if procs[first_actor..].iter_mut().all(|p| matches!(p.child.try_wait(), Ok(Some(_)))) {
                bail!("every actor has exited but the run is not finished");
            }
            if last_change.elapsed() > Duration::from_secs(args.stall_timeout_s) {
                bail!("the run made no progress for {} s (version {last_version})", args.stall_timeout_s);
            }
        }
    }
    .await;
    let stopped = stop_all(&mut procs, Duration::from_secs(30)).await;
    for (role, st) in &stopped {
        tracing::debug!(role, status = ?st, "stopped");
    }
    let (status, _) = result?;
    Ok(TrainOutcome {
        status,
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

fn report_progress(
    bar: &Option<indicatif::ProgressBar>,
    s: &ril_proto::v1::RunStatus,
    advanced: bool,
) {
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
