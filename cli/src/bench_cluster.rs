//! `ril bench cluster`: the control plane under load. A real coordinator (the gRPC service with
//! its state file, every reply after an fsync covering it (group commit), in a temporary
//! directory) on loopback, a learner
//! stand-in that joins as rank 0 and publishes each version as soon as its iteration's groups are
//! all accepted (a no-op training step), and N simulated actors, each a task with its own gRPC
//! connection, looping lease -> (instant rollout) -> AcceptGroup per question -> CompleteLease
//! until the run finishes. So what is measured is the coordinator: its calls' latencies, the
//! groups it durably accepts per second, and its state file. The coordinator runs in this
//! process, so CPU time and peak memory are the whole process's (clients included).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use ril_coordinator::{CoordinatorOptions, STATE_FILE};
use ril_proto::client::Channel;
use ril_proto::v1;
use ril_proto::v1::coordinator_client::CoordinatorClient;
use tokio::sync::{Mutex, mpsc};

#[derive(Debug, clap::Args)]
pub struct ClusterBenchArgs {
    /// Simulated actor counts, one run each.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
    pub actors: Vec<usize>,
    /// Iterations per run.
    #[arg(long, default_value_t = 20)]
    pub iterations: u64,
    /// Questions per iteration (B; the paper's runs use 144).
    #[arg(long, default_value_t = 144)]
    pub questions_per_iteration: u64,
    /// Questions an actor asks for per lease.
    #[arg(long, default_value_t = 2)]
    pub max_questions: u32,
    /// Iterations actors may run ahead of the published version.
    #[arg(long, default_value_t = 1)]
    pub staleness_bound: u64,
    /// How long the coordinator tells an actor with nothing to lease to wait before asking
    /// again (`lease_retry_after`; its default).
    #[arg(long, default_value_t = 250)]
    pub retry_after_ms: u64,
    /// Rows in the generated dataset (64x64 PNG questions).
    #[arg(long, default_value_t = 512)]
    pub rows: usize,
    /// Write the figures as JSON here too.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

/// The latencies of one kind of call.
#[derive(Debug, Default, Clone)]
struct Latencies(Vec<Duration>);

impl Latencies {
    /// (count, p50 ms, p99 ms), sorting once.
    fn summary(mut self) -> (usize, f64, f64) {
        self.0.sort();
        let at = |q: f64| {
            let i = ((self.0.len().saturating_sub(1)) as f64 * q).round() as usize;
            self.0.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e3)
        };
        (self.0.len(), at(0.5), at(0.99))
    }
}

/// What one run measured.
#[derive(Debug, serde::Serialize)]
struct Figures {
    actors: usize,
    iterations: u64,
    seconds: f64,
    leases: u64,
    groups_accepted: u64,
    leases_per_s: f64,
    accepted_groups_per_s: f64,
    /// Call -> (count, p50 ms, p99 ms).
    calls: BTreeMap<String, (usize, f64, f64)>,
    state_file_bytes: u64,
    /// State file writes (each an fsynced atomic replace) over the run, per second, and the
    /// changes each covered on average.
    state_writes: u64,
    state_writes_per_s: f64,
    changes_per_write: f64,
    /// Process CPU seconds (user + system) over the run, per wall second.
    cpu_cores: f64,
    /// The process's peak resident memory at the end of the run (getrusage's maxrss), MiB.
    peak_rss_mib: f64,
    /// The process's resident memory (VmRSS) after each tenth of the iterations was published
    /// and at the end, MiB: flat memory over a long run shows as a flat curve (the bench's own
    /// latency records, 16 B per call, grow meanwhile).
    rss_mib_by_tenth: Vec<f64>,
    /// The largest the state file was after any publish over the run.
    state_file_max_bytes: u64,
}

pub fn run(args: &ClusterBenchArgs) -> anyhow::Result<()> {
    let dir = tempfile::tempdir().context("a temporary directory for the bench")?;
    let dataset = dir.path().join("data");
    let synth = ril_data::shapes::SynthConfig {
        seed: 7,
        n_train: args.rows,
        n_val: 1,
        n_test: 1,
        image_size: 64,
        ..Default::default()
    };
    ril_data::shapes::write_dataset(&synth, &dataset)?;
    let rt = tokio::runtime::Runtime::new()?;
    let mut all = Vec::new();
    for &n in &args.actors {
        let state_dir = dir.path().join(format!("state-{n}"));
        let figures = rt.block_on(one_run(args, n, &dataset, &state_dir))?;
        print_figures(&figures);
        all.push(figures);
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&all)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn print_figures(f: &Figures) {
    println!(
        "actors {:>4}: {:.1} s, {} leases ({:.0}/s), {} groups accepted ({:.0}/s), state file {} B, \
         {} writes ({:.0}/s, {:.1} changes each), {:.2} cores, peak RSS {:.0} MiB \
         (RSS {:.1} MiB at a tenth of the run, {:.1} MiB at the end; state file at most {} B)",
        f.actors,
        f.seconds,
        f.leases,
        f.leases_per_s,
        f.groups_accepted,
        f.accepted_groups_per_s,
        f.state_file_bytes,
        f.state_writes,
        f.state_writes_per_s,
        f.changes_per_write,
        f.cpu_cores,
        f.peak_rss_mib,
        f.rss_mib_by_tenth.first().copied().unwrap_or(0.0),
        f.rss_mib_by_tenth.last().copied().unwrap_or(0.0),
        f.state_file_max_bytes
    );
    let curve: Vec<String> = f
        .rss_mib_by_tenth
        .iter()
        .map(|m| format!("{m:.1}"))
        .collect();
    println!("    RSS by tenth of the run (MiB): {}", curve.join(" "));
    for (call, (n, p50, p99)) in &f.calls {
        println!("    {call:<16} {n:>7} calls  p50 {p50:>7.2} ms  p99 {p99:>7.2} ms");
    }
}

const PUBLISHER_KEY: [u8; 32] = [7; 32];
const DEADLINE: Duration = Duration::from_secs(30);

async fn one_run(
    args: &ClusterBenchArgs,
    n_actors: usize,
    dataset: &Path,
    state_dir: &Path,
) -> anyhow::Result<Figures> {
    let options = CoordinatorOptions {
        run_id: format!("bench-{n_actors}"),
        dataset: dataset.to_path_buf(),
        questions_per_iteration: args.questions_per_iteration,
        total_iterations: args.iterations,
        staleness_bound: args.staleness_bound,
        lease_timeout: Duration::from_secs(600),
        actor_timeout: Duration::from_secs(600),
        lease_retry_after: Duration::from_millis(args.retry_after_ms),
        state_dir: Some(state_dir.to_path_buf()),
        ..Default::default()
    };
    let bound = ril_proto::server::bind("127.0.0.1:0").await?;
    let addr = bound.addr.to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(ril_coordinator::serve(options, bound, async move {
        let _ = stopped.await;
    }));
    let security = ril_proto::security::Security::default();
    let connect = || ril_proto::client::connect(&addr, DEADLINE, &security);
    ril_common::wait::wait_until("the coordinator to serve", DEADLINE, || async {
        let status =
            ril_proto::client::health_check(&addr, "", Duration::from_secs(1), &security).await;
        matches!(status, Ok(ril_proto::server::ServingStatus::Serving))
    })
    .await;
    let mut learner = ril_proto::client::coordinator(connect().await?);
    learner
        .join_learner(v1::JoinLearnerRequest {
            rank: 0,
            addr: "127.0.0.1:1".into(),
            publisher_key: PUBLISHER_KEY.to_vec().into(),
            ..Default::default()
        })
        .await?;

    let (done_tx, done_rx) = mpsc::unbounded_channel::<u64>();
    let publisher = tokio::spawn(publish_in_order(
        learner,
        done_rx,
        args.iterations,
        state_dir.join(STATE_FILE),
    ));
    let accepted_per_iteration = Arc::new(Mutex::new(BTreeMap::<u64, u64>::new()));
    let (cpu_before, _) = usage()?;
    let started = Instant::now();
    let mut actors = Vec::new();
    for i in 0..n_actors {
        let client = ril_proto::client::coordinator(connect().await?);
        let shared = Shared {
            done: done_tx.clone(),
            accepted: accepted_per_iteration.clone(),
            b: args.questions_per_iteration,
        };
        actors.push(tokio::spawn(actor(
            format!("bench-actor-{i}"),
            client,
            args.max_questions,
            shared,
        )));
    }
    drop(done_tx);
    let mut calls: BTreeMap<&'static str, Latencies> = BTreeMap::new();
    for a in actors {
        for (call, l) in a.await?? {
            calls.entry(call).or_default().0.extend(l.0);
        }
    }
    let samples = publisher.await??;
    let seconds = started.elapsed().as_secs_f64();
    let (cpu_after, peak_rss_kib) = usage()?;
    let cpu = cpu_after - cpu_before;
    let status = ril_proto::client::coordinator(connect().await?)
        .get_status(v1::GetStatusRequest {})
        .await?
        .into_inner();
    let _ = stop.send(());
    server.await??;
    let leases = calls.get("LeasePrompts(q)").map_or(0, |l| l.0.len()) as u64;
    let groups_accepted = calls.get("AcceptGroup").map_or(0, |l| l.0.len()) as u64;
    let state_file_bytes = std::fs::metadata(state_dir.join(STATE_FILE))
        .map(|m| m.len())
        .unwrap_or(0);
    Ok(Figures {
        actors: n_actors,
        iterations: args.iterations,
        seconds,
        leases,
        groups_accepted,
        leases_per_s: leases as f64 / seconds,
        accepted_groups_per_s: groups_accepted as f64 / seconds,
        calls: calls
            .into_iter()
            .map(|(k, l)| (k.to_string(), l.summary()))
            .collect(),
        state_file_bytes,
        state_writes: status.state_writes,
        state_writes_per_s: status.state_writes as f64 / seconds,
        changes_per_write: status.state_changes_written as f64 / status.state_writes.max(1) as f64,
        cpu_cores: cpu / seconds,
        peak_rss_mib: peak_rss_kib as f64 / 1024.0,
        rss_mib_by_tenth: samples.rss_mib_by_tenth,
        state_file_max_bytes: samples.state_file_max_bytes,
    })
}

/// What the actors share: where to say an iteration is complete.
struct Shared {
    done: mpsc::UnboundedSender<u64>,
    accepted: Arc<Mutex<BTreeMap<u64, u64>>>,
    b: u64,
}

/// One simulated actor: lease, accept every question at once (as the learner would after an
/// instant rollout), complete the lease; until the run is finished. Returns its calls' latencies.
async fn actor(
    id: String,
    mut c: CoordinatorClient<Channel>,
    max_questions: u32,
    shared: Shared,
) -> anyhow::Result<BTreeMap<&'static str, Latencies>> {
    let mut calls: BTreeMap<&'static str, Latencies> = BTreeMap::new();
    let mut timed = |call: &'static str, t: Instant| {
        calls.entry(call).or_default().0.push(t.elapsed());
    };
    let t = Instant::now();
    c.register_actor(v1::RegisterActorRequest {
        actor_id: id.clone(),
        device: "bench".into(),
    })
    .await?;
    timed("RegisterActor", t);
    let mut version = 0;
    loop {
        let t = Instant::now();
        let lease = c
            .lease_prompts(v1::LeasePromptsRequest {
                actor_id: id.clone(),
                max_questions,
                policy_version: version,
                request_id: String::new(),
            })
            .await?
            .into_inner();
        version = lease.policy_version;
        if lease.items.is_empty() {
            timed("LeasePrompts(0)", t);
            if lease.run_finished {
                return Ok(calls);
            }
            tokio::time::sleep(Duration::from_millis(lease.retry_after_ms.max(1))).await;
            continue;
        }
        timed("LeasePrompts(q)", t);
        for item in &lease.items {
            let question = item
                .question
                .as_ref()
                .context("a leased item without its question")?;
            let t = Instant::now();
            let reply = c
                .accept_group(v1::AcceptGroupRequest {
                    lease_id: lease.lease_id.clone(),
                    position: item.position,
                    question_id: question.id.clone(),
                    iteration: item.iteration,
                    publisher_key: PUBLISHER_KEY.to_vec().into(),
                })
                .await?
                .into_inner();
            timed("AcceptGroup", t);
            anyhow::ensure!(
                reply.accepted,
                "position {} refused: {}",
                item.position,
                reply.reason
            );
            let mut accepted = shared.accepted.lock().await;
            let n = accepted.entry(item.iteration).or_default();
            *n += 1;
            if *n == shared.b {
                accepted.remove(&item.iteration);
                let _ = shared.done.send(item.iteration);
            }
        }
        let t = Instant::now();
        c.complete_lease(v1::CompleteLeaseRequest {
            actor_id: id.clone(),
            lease_id: lease.lease_id.clone(),
            returned_positions: Vec::new(),
            reason: String::new(),
        })
        .await?;
        timed("CompleteLease", t);
    }
}

/// What the publisher saw of memory and the state file as versions were published.
#[derive(Debug, Default)]
struct Samples {
    rss_mib_by_tenth: Vec<f64>,
    state_file_max_bytes: u64,
}

/// The learner stand-in: publishes version i + 1 once iteration i is wholly accepted, in order;
/// samples the process's memory and the state file's size after each publish.
async fn publish_in_order(
    mut c: CoordinatorClient<Channel>,
    mut done: mpsc::UnboundedReceiver<u64>,
    iterations: u64,
    state_file: std::path::PathBuf,
) -> anyhow::Result<Samples> {
    let mut samples = Samples::default();
    let tenth = (iterations / 10).max(1);
    let rss_mib = || ril_proto::metrics::resident_bytes().unwrap_or(0) as f64 / (1 << 20) as f64;
    let mut complete = std::collections::BTreeSet::new();
    let mut next = 0;
    while next < iterations {
        let Some(iteration) = done.recv().await else {
            anyhow::bail!("the actors stopped before iteration {next} was complete");
        };
        complete.insert(iteration);
        while complete.remove(&next) {
            c.publish_version(v1::PublishVersionRequest {
                version: next + 1,
                iteration: next,
                checkpoint: format!("bench/v{}", next + 1),
                publisher_key: PUBLISHER_KEY.to_vec().into(),
            })
            .await?;
            next += 1;
            let size = std::fs::metadata(&state_file).map_or(0, |m| m.len());
            samples.state_file_max_bytes = samples.state_file_max_bytes.max(size);
            if next % tenth == 0 || next == iterations {
                samples.rss_mib_by_tenth.push(rss_mib());
            }
        }
    }
    Ok(samples)
}

/// This process's user + system CPU seconds and its peak resident memory in KiB (getrusage;
/// Linux reports `ru_maxrss` in KiB).
fn usage() -> anyhow::Result<(f64, u64)> {
    use nix::sys::resource::{UsageWho, getrusage};
    let u = getrusage(UsageWho::RUSAGE_SELF).context("getrusage")?;
    let seconds = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    let cpu = seconds(u.user_time()) + seconds(u.system_time());
    Ok((cpu, u64::try_from(u.max_rss()).unwrap_or(0)))
}
