//! `ril coordinator | learner | discriminator | teacher | actor | status | config check`: each
//! role as its own process, configured from the run's TOML file. `--listen` picks the bind
//! address (port 0: any free port) and `--addr-file` tells a supervisor where it ended up.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use ril_config::RunConfig;
use ril_orchestrate::runtime;
use ril_orchestrate::security::SecurityOverrides;
use ril_orchestrate::status::{fetch_status, format_status};

/// How a process finds its run token and certificates (overriding `[security]`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SecurityArgs {
    /// A directory as `ril certs init` writes it (`ca.crt`, `<role>.crt`, `<role>.key`,
    /// `token`); overrides `[security]`'s paths.
    #[arg(long, value_name = "DIR")]
    pub security_dir: Option<PathBuf>,
    /// Plaintext, no token, no roles (debugging only; loudly logged). Same as `[security]
    /// allow_insecure = true`.
    #[arg(long)]
    pub insecure: bool,
    /// Serve gRPC reflection (to token holders); on in local mode, off by default.
    #[arg(long)]
    pub reflection: bool,
}

impl SecurityArgs {
    pub fn overrides(&self) -> SecurityOverrides {
        SecurityOverrides {
            security_dir: self.security_dir.clone(),
            insecure: self.insecure,
            reflection: self.reflection,
        }
    }
}

/// The process's security for `role`: `--insecure`, then `--security-dir`, then `[security]`.
pub fn resolve_security(
    config: Option<&ril_proto::security::SecurityConfig>,
    args: &SecurityArgs,
    role: ril_proto::security::Role,
) -> anyhow::Result<ril_proto::security::Security> {
    Ok(ril_orchestrate::security::resolve_security(
        config,
        &args.overrides(),
        role,
    )?)
}

/// Flags every serving role takes.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// The run config (TOML).
    #[arg(long)]
    pub config: PathBuf,
    /// Address to listen on, e.g. 0.0.0.0:50051 (port 0: any free port).
    #[arg(long, default_value = "0.0.0.0:0")]
    pub listen: String,
    /// Writes the bound address here once listening (for supervisors and scripts).
    #[arg(long)]
    pub addr_file: Option<PathBuf>,
    /// Also serve grpc.health.v1 alone, in plaintext, here (Kubernetes' gRPC probes cannot
    /// speak TLS), e.g. 0.0.0.0:8081.
    #[arg(long, value_name = "ADDR")]
    pub health_listen: Option<String>,
    /// Writes the health endpoint's bound address here (for `--health-listen` with port 0).
    #[arg(long, requires = "health_listen")]
    pub health_addr_file: Option<PathBuf>,
    #[command(flatten)]
    pub metrics: MetricsArgs,
    #[command(flatten)]
    pub security: SecurityArgs,
}

/// Where a role serves its Prometheus metrics.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct MetricsArgs {
    /// Serve Prometheus metrics (text format, plain HTTP `GET /metrics`) here, e.g.
    /// 0.0.0.0:9464 (port 0: any free port).
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<String>,
    /// Writes the metrics endpoint's bound address here (for `--metrics-listen` with port 0).
    #[arg(long, requires = "metrics_listen")]
    pub metrics_addr_file: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct CoordinatorArgs {
    #[command(flatten)]
    pub serve: ServeArgs,
    /// Teacher addresses as NAME=ADDR (override `[network] teachers`).
    #[arg(long = "teacher-addr", value_name = "NAME=ADDR")]
    pub teacher_addrs: Vec<String>,
    /// Overrides `[network] discriminator`.
    #[arg(long)]
    pub discriminator_addr: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct LearnerArgs {
    #[command(flatten)]
    pub serve: ServeArgs,
    /// Overrides `[network] coordinator`.
    #[arg(long)]
    pub coordinator: Option<String>,
    /// The address others reach this learner at (default: the bound address).
    #[arg(long)]
    pub advertise: Option<String>,
    #[arg(long, default_value_t = 0)]
    pub rank: u32,
    /// Overrides `[learner] device` (ranks of one machine each on their own GPU).
    #[arg(long)]
    pub device: Option<String>,
    /// Overrides `[learner] collective_listen` (the ring collective's listen address, with
    /// world_size > 1).
    #[arg(long)]
    pub collective_listen: Option<String>,
    /// Overrides `[network] discriminator` (the service trained once per iteration).
    #[arg(long)]
    pub discriminator_addr: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct TeacherArgs {
    #[command(flatten)]
    pub serve: ServeArgs,
    /// Which `[[teachers]]` entry to serve.
    #[arg(long)]
    pub name: String,
}

#[derive(Debug, clap::Args)]
pub struct DiscriminatorServeArgs {
    #[command(flatten)]
    pub serve: ServeArgs,
    /// Overrides `[discriminator] device`.
    #[arg(long)]
    pub device: Option<String>,
    /// The environment variable that holds the LLM judge's API key (`[discriminator.judge]
    /// kind = "llm"`), e.g. filled from a Kubernetes Secret, so that the key never has to be
    /// written into the run config. An unset or empty variable: no key is sent.
    #[arg(long, value_name = "VAR")]
    pub judge_api_key_env: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct PretrainArgs {
    /// The student checkpoint D starts from.
    #[arg(long)]
    pub student: PathBuf,
    /// Dataset dir or file (train split).
    #[arg(long)]
    pub data: PathBuf,
    /// Teacher servers (host:port) for answers the rows do not carry.
    #[arg(long = "teacher")]
    pub teachers: Vec<String>,
    #[arg(long)]
    pub out: PathBuf,
    /// Student and teacher answers per question (the paper: 16 each).
    #[arg(long, default_value_t = 16)]
    pub answers: usize,
    #[arg(long)]
    pub max_questions: Option<usize>,
    #[arg(long)]
    pub steps: Option<u64>,
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[command(flatten)]
    pub security: SecurityArgs,
}

#[derive(Debug, clap::Args)]
pub struct ActorArgs {
    #[arg(long)]
    pub config: PathBuf,
    /// Overrides `[network] coordinator`.
    #[arg(long)]
    pub coordinator: Option<String>,
    /// Unique actor id (default: host name + pid).
    #[arg(long)]
    pub id: Option<String>,
    /// Overrides `[actors] device`.
    #[arg(long)]
    pub device: Option<String>,
    /// Stop after this many leases.
    #[arg(long)]
    pub max_leases: Option<u64>,
    /// Serve grpc.health.v1 (plaintext, health only) here while the actor runs, e.g. 0.0.0.0:50070.
    /// An actor serves no RPCs of its own; this gives Kubernetes' gRPC probes an endpoint. It
    /// answers SERVING while the actor runs and NOT_SERVING once it is stopping.
    #[arg(long, value_name = "ADDR")]
    pub health_listen: Option<String>,
    /// Writes the health endpoint's bound address here (for `--health-listen` with port 0).
    #[arg(long, requires = "health_listen")]
    pub health_addr_file: Option<PathBuf>,
    #[command(flatten)]
    pub metrics: MetricsArgs,
    #[command(flatten)]
    pub security: SecurityArgs,
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[arg(long)]
    pub coordinator: String,
    /// Print the status as JSON.
    #[arg(long)]
    pub json: bool,
    #[arg(long, default_value_t = 10)]
    pub timeout_s: u64,
    /// `ril status` speaks as the admin role (`admin.crt` under `--security-dir`).
    #[command(flatten)]
    pub security: SecurityArgs,
}

/// How long a role may take to stop after SIGTERM before the process exits anyway. Graceful
/// shutdown waits for open streams; a client's `grpc.health.v1` Watch never ends by itself.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// Runs a role's `serve` with the process's shutdown signal, returning at most
/// [`SHUTDOWN_GRACE`] after the signal even when open streams keep the server draining.
pub async fn serve_role<F, Fut, E>(serve: F) -> anyhow::Result<()>
where
    F: FnOnce(std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
    E: Into<anyhow::Error>,
{
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        ril_proto::server::shutdown_signal().await;
        let _ = tx.send(true);
    });
    let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    let signal: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> =
        Box::pin(wait(rx.clone()));
    let fut = serve(signal);
    tokio::select! {
        r = fut => r.map_err(Into::into),
        _ = async { wait(rx).await; tokio::time::sleep(SHUTDOWN_GRACE).await } => {
            tracing::warn!(grace = ?SHUTDOWN_GRACE, "still draining open streams after the shutdown grace; exiting");
            Ok(())
        }
    }
}

async fn bind(
    args: &ServeArgs,
    cfg: &RunConfig,
    role: ril_proto::security::Role,
) -> anyhow::Result<ril_proto::server::Bound> {
    let security = resolve_security(Some(&cfg.security), &args.security, role)?;
    let bound = ril_proto::server::bind(&args.listen)
        .await?
        .with_security(security)
        .with_plain_health(args.health_listen.clone(), args.health_addr_file.clone())
        .with_metrics(
            args.metrics.metrics_listen.clone(),
            args.metrics.metrics_addr_file.clone(),
        );
    tracing::info!(addr = %bound.addr, "listening");
    if let Some(f) = &args.addr_file {
        ril_proto::server::write_addr_file(f, &bound.addr)?;
    }
    Ok(bound)
}

fn parse_named(list: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    list.iter()
        .map(|s| {
            s.split_once('=')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| anyhow::anyhow!("expected NAME=ADDR, got {s:?}"))
        })
        .collect()
}

pub fn coordinator(args: &CoordinatorArgs) -> anyhow::Result<()> {
    let mut cfg = RunConfig::load(&args.serve.config)?;
    for (name, addr) in parse_named(&args.teacher_addrs)? {
        cfg.network.teachers.insert(name, addr);
    }
    let teachers = cfg.teacher_addrs()?;
    let disc = args
        .discriminator_addr
        .clone()
        .or(cfg.network.discriminator.clone())
        .ok_or_else(|| anyhow::anyhow!("no discriminator address: set [network] discriminator"))?;
    let opts = cfg.coordinator_options(teachers, disc);
    runtime()?.block_on(async {
        let bound = bind(&args.serve, &cfg, ril_proto::security::Role::Coordinator).await?;
        serve_role(|stop| ril_coordinator::serve(opts, bound, stop)).await
    })
}

pub fn learner(args: &LearnerArgs) -> anyhow::Result<()> {
    let cfg = RunConfig::load(&args.serve.config)?;
    let mut opts = cfg.learner.clone();
    if let Some(c) = &args.coordinator {
        opts.coordinator_addr = c.clone();
    }
    if opts.coordinator_addr.is_empty() {
        bail!("no coordinator address: set [network] coordinator or pass --coordinator");
    }
    opts.rank = args.rank;
    if let Some(device) = &args.device {
        opts.device = device.clone();
    }
    if let Some(c) = &args.collective_listen {
        opts.collective_listen = c.clone();
    }
    if args.advertise.is_some() {
        opts.advertise_addr = args.advertise.clone();
    }
    if args.discriminator_addr.is_some() {
        opts.discriminator_addr = args.discriminator_addr.clone();
    }
    if opts.discriminator_addr.is_none() {
        opts.discriminator_addr = cfg.network.discriminator.clone();
    }
    if cfg.discriminator.frozen {
        // A frozen D never trains: no per-iteration step to ask for.
        opts.discriminator_addr = None;
    }
    runtime()?.block_on(async {
        let bound = bind(&args.serve, &cfg, ril_proto::security::Role::Learner).await?;
        serve_role(|stop| ril_learner::serve(opts, bound, stop)).await
    })
}

pub fn teacher(args: &TeacherArgs) -> anyhow::Result<()> {
    let cfg = RunConfig::load(&args.serve.config)?;
    let opts = cfg
        .teachers
        .iter()
        .find(|t| t.name == args.name)
        .cloned()
        .ok_or_else(|| {
            anyhow::anyhow!(
                "{}: no [[teachers]] entry named {:?} (have: {})",
                cfg.path.display(),
                args.name,
                cfg.teachers
                    .iter()
                    .map(|t| t.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
    runtime()?.block_on(async {
        let bound = bind(&args.serve, &cfg, ril_proto::security::Role::Teacher).await?;
        serve_role(|stop| ril_teacher::serve(opts, bound, stop)).await
    })
}

pub fn discriminator(args: &DiscriminatorServeArgs) -> anyhow::Result<()> {
    let mut cfg = RunConfig::load(&args.serve.config)?;
    if let Some(var) = &args.judge_api_key_env {
        judge_api_key_from_env(&mut cfg.discriminator.judge, var, std::env::var(var).ok())?;
    }
    if let Some(device) = &args.device {
        cfg.discriminator.device = device.clone();
    }
    let device = cfg.discriminator.open_device()?;
    runtime()?.block_on(async {
        let bound = bind(&args.serve, &cfg, ril_proto::security::Role::Discriminator).await?;
        serve_role(|stop| ril_discriminator::serve(cfg.discriminator.clone(), device, bound, stop))
            .await
    })
}

/// `--judge-api-key-env VAR`: the LLM judge's key is `VAR`'s value. Only an LLM judge takes a
/// key, and a key written into the config as well is refused (one source, the secret one).
fn judge_api_key_from_env(
    judge: &mut ril_discriminator::JudgeBackend,
    var: &str,
    value: Option<String>,
) -> anyhow::Result<()> {
    let ril_discriminator::JudgeBackend::Llm(cfg) = judge else {
        bail!(
            "--judge-api-key-env {var}: the judge is not an LLM judge; only [discriminator.judge] kind = \"llm\" takes an API key"
        );
    };
    if cfg.api_key.is_some() {
        bail!(
            "--judge-api-key-env {var}: [discriminator.judge] api_key is set in the config too; remove it from the config and keep the key in {var} only"
        );
    }
    match value {
        Some(key) if !key.is_empty() => cfg.api_key = Some(key),
        _ => tracing::warn!(
            var,
            "the judge's API key variable is unset or empty: asking the judge without a key"
        ),
    }
    Ok(())
}

pub fn pretrain(args: &PretrainArgs) -> anyhow::Result<()> {
    let mut p = ril_discriminator::PretrainOptions::new(&args.student, &args.data, &args.out);
    p.teachers = args.teachers.clone();
    p.n_student_answers = args.answers;
    p.n_teacher_answers = args.answers;
    p.max_questions = args.max_questions;
    if let Some(s) = args.steps {
        p.steps = s;
    }
    if let Some(lr) = args.lr {
        p.discriminator.lr = lr;
    }
    if let Some(m) = args.max_new_tokens {
        p.max_new_tokens = m;
    }
    let device = crate::device::parse(&args.device)?;
    let security = resolve_security(
        None,
        &args.security,
        ril_proto::security::Role::Discriminator,
    )?;
    let report =
        runtime()?.block_on(ril_discriminator::run_pretrain(p, device, &security, |e| {
            if let ril_discriminator::pretrain::PretrainEvent::Eval { step, held_out } = e {
                tracing::info!(step, ?held_out, "held-out");
            }
        }))?;
    println!(
        "discriminator pre-training: {} steps on {} examples; held-out accuracy {:?} -> {:?}; saved {:?}",
        report.steps,
        report.n_train,
        report.initial_held_out.as_ref().map(|e| e.accuracy),
        report.final_held_out.as_ref().map(|e| e.accuracy),
        report.checkpoint
    );
    Ok(())
}

pub fn actor(args: &ActorArgs) -> anyhow::Result<()> {
    let cfg = RunConfig::load(&args.config)?;
    let coordinator = args
        .coordinator
        .clone()
        .or(cfg.network.coordinator.clone())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no coordinator address: set [network] coordinator or pass --coordinator"
            )
        })?;
    let id = args.id.clone().unwrap_or_else(|| {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "actor".into());
        format!("{host}-{}", std::process::id())
    });
    let mut opts = ril_actor::ActorOptions::new(id, coordinator, cfg.student.checkpoint.clone());
    opts.device = crate::device::parse(args.device.as_deref().unwrap_or(&cfg.actors.device))?;
    opts.questions_per_lease = cfg.actors.questions_per_lease;
    opts.rpc_timeout = Duration::from_millis(cfg.actors.rpc_timeout_ms);
    opts.teacher_timeout = Duration::from_millis(cfg.actors.teacher_timeout_ms);
    opts.push_timeout = Duration::from_millis(cfg.actors.push_timeout_ms);
    opts.coordinator_deadline = Duration::from_millis(cfg.actors.coordinator_deadline_ms);
    opts.seed = cfg.run.seed;
    opts.max_leases = args.max_leases;
    opts.security = resolve_security(
        Some(&cfg.security),
        &args.security,
        ril_proto::security::Role::Actor,
    )?;
    let summary = runtime()?.block_on(async {
        let health = match &args.health_listen {
            Some(listen) => {
                Some(HealthEndpoint::start(listen, args.health_addr_file.as_deref()).await?)
            }
            None => None,
        };
        if let Some(listen) = &args.metrics.metrics_listen {
            let registry = ril_proto::metrics::Registry::new("actor");
            let metrics = opts.metrics.clone();
            registry.add(move |out: &mut ril_proto::metrics::Exposition| metrics.write(out));
            let addr = ril_proto::metrics::http::spawn(listen, registry).await?;
            if let Some(f) = &args.metrics.metrics_addr_file {
                ril_proto::server::write_addr_file(f, &addr)?;
            }
        }
        let summary = ril_actor::run_actor(opts, ril_proto::server::shutdown_signal()).await;
        if let Some(h) = health {
            h.stop().await;
        }
        anyhow::Ok(summary?)
    })?;
    tracing::info!(
        leases = summary.leases,
        groups_pushed = summary.groups_pushed,
        groups_refused = summary.groups_refused,
        returned = summary.positions_returned,
        version = summary.final_version,
        phase_ms = ?summary.phase_ms,
        "actor done"
    );
    Ok(())
}

/// A plaintext grpc.health.v1 endpoint (health only: nothing here needs a token) for a role
/// that serves no RPCs of its own (the actor), so that Kubernetes' gRPC probes have something
/// to ask. SERVING from the moment it
/// listens; NOT_SERVING once the process is asked to stop (SIGTERM or Ctrl-C), while the role
/// finishes its work.
struct HealthEndpoint {
    reporter: ril_proto::server::HealthReporter,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    addr: std::net::SocketAddr,
}

impl HealthEndpoint {
    async fn start(listen: &str, addr_file: Option<&std::path::Path>) -> anyhow::Result<Self> {
        use ril_proto::server::{self, ServingStatus};
        let bound = server::bind(listen).await?;
        let addr = bound.addr;
        let (reporter, health) = server::health(std::iter::empty()).await;
        server::set_status(&reporter, &[], ServingStatus::Serving).await;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(
            server::builder()
                .add_service(
                    health
                        .max_decoding_message_size(server::DEFAULT_MAX_MESSAGE_BYTES)
                        .max_encoding_message_size(server::DEFAULT_MAX_MESSAGE_BYTES),
                )
                .serve_with_incoming_shutdown(server::incoming(bound), async {
                    let _ = stopped.await;
                }),
        );
        {
            // Draining: the role finishes its lease after the signal; say so to the probes.
            let reporter = reporter.clone();
            tokio::spawn(async move {
                server::shutdown_signal().await;
                server::set_status(&reporter, &[], ServingStatus::NotServing).await;
            });
        }
        tracing::info!(%addr, "health endpoint listening (grpc.health.v1)");
        if let Some(f) = addr_file {
            ril_proto::server::write_addr_file(f, &addr)?;
        }
        Ok(Self {
            reporter,
            stop,
            server,
            addr,
        })
    }

    async fn stop(self) {
        use ril_proto::server::{self, ServingStatus};
        server::set_status(&self.reporter, &[], ServingStatus::NotServing).await;
        let _ = self.stop.send(());
        match tokio::time::timeout(SHUTDOWN_GRACE, self.server).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => {
                tracing::warn!(addr = %self.addr, error = %e, "health endpoint failed")
            }
            Ok(Err(e)) => {
                tracing::warn!(addr = %self.addr, error = %e, "health endpoint task failed")
            }
            Err(_) => tracing::warn!(addr = %self.addr, "health endpoint still draining; exiting"),
        }
    }
}

pub fn status(args: &StatusArgs) -> anyhow::Result<()> {
    let security = resolve_security(None, &args.security, ril_proto::security::Role::Admin)?;
    let s = runtime()?.block_on(fetch_status(
        &args.coordinator,
        Duration::from_secs(args.timeout_s),
        &security,
    ))?;
    if args.json {
        let v = serde_json::json!({
            "run_id": s.run_id, "policy_version": s.policy_version, "iteration": s.iteration,
            "total_iterations": s.total_iterations, "cursor": s.cursor,
            "groups_accepted": s.groups_accepted, "duplicates_refused": s.duplicates_refused,
            "leases_expired": s.leases_expired, "leases_outstanding": s.leases_outstanding,
            "groups_per_second": s.groups_per_second, "finished": s.finished,
            "actors": s.actors.iter().map(|a| serde_json::json!({
                "actor_id": a.actor_id, "device": a.device, "policy_version": a.policy_version,
                "last_seen_ms_ago": a.last_seen_ms_ago, "alive": a.alive,
                "groups_leased": a.groups_leased})).collect::<Vec<_>>(),
            "metrics": s.metrics,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", format_status(&s));
    }
    Ok(())
}

pub fn config_check(path: &std::path::Path) -> anyhow::Result<()> {
    let cfg = RunConfig::load(path)?;
    println!(
        "{}: ok — run {:?}, {} iterations x {} questions, G = {} + {} teacher slots, {} teacher(s): {}",
        path.display(),
        cfg.run.id,
        cfg.run.iterations,
        cfg.run.questions_per_iteration,
        cfg.rollout.group_size,
        cfg.teacher_slots(),
        cfg.teachers.len(),
        cfg.teachers
            .iter()
            .map(|t| t.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llm_judge() -> ril_discriminator::JudgeBackend {
        ril_discriminator::JudgeBackend::Llm(ril_discriminator::judge::JudgeConfig::new(
            "http://judge:8000/v1",
            "judge-model",
        ))
    }

    fn key(judge: &ril_discriminator::JudgeBackend) -> Option<String> {
        match judge {
            ril_discriminator::JudgeBackend::Llm(c) => c.api_key.clone(),
            ril_discriminator::JudgeBackend::Rule => None,
        }
    }

    #[test]
    fn the_judge_key_comes_from_the_named_variable_only() {
        let mut judge = llm_judge();
        judge_api_key_from_env(&mut judge, "JUDGE_API_KEY", Some("s3cret".into())).unwrap();
        assert_eq!(key(&judge).as_deref(), Some("s3cret"));
        // The key is redacted wherever the config is shown.
        assert!(!format!("{judge:?}").contains("s3cret"));

        // Unset or empty (an optional Secret that is absent): no key.
        for value in [None, Some(String::new())] {
            let mut judge = llm_judge();
            judge_api_key_from_env(&mut judge, "JUDGE_API_KEY", value).unwrap();
            assert_eq!(key(&judge), None);
        }

        // A key in the config as well, or a judge that takes no key, is a mistake to report.
        let mut judge = llm_judge();
        if let ril_discriminator::JudgeBackend::Llm(c) = &mut judge {
            c.api_key = Some("in-the-config".into());
        }
        let e = judge_api_key_from_env(&mut judge, "JUDGE_API_KEY", Some("k".into()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("api_key") && e.contains("JUDGE_API_KEY"), "{e}");
        assert!(!e.contains("in-the-config"), "{e}");
        let mut rule = ril_discriminator::JudgeBackend::Rule;
        let e = judge_api_key_from_env(&mut rule, "JUDGE_API_KEY", Some("k".into()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("kind = \"llm\""), "{e}");
    }
}
