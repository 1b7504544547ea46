//! The coordinator's Prometheus metrics, read from [`Coordinator::status`] at scrape time: the
//! run's progress, groups and leases, actors, the learner rendezvous, the progress watchdog and
//! the state file's writes. Lease latency is the RPC layer's
//! `ril_rpc_server_handling_seconds{service="ril.v1.Coordinator",method="LeasePrompts"}`.
//! The learner's step metrics are the learner's own `/metrics` (not repeated here).

use std::sync::{Arc, OnceLock};

use ril_proto::metrics::{Exposition, Kind, Registry};

use crate::commit::Committed;
use crate::coordinator::{Now, Status};

/// Adds the coordinator's collector to `registry`: its status once it is loaded (before that,
/// only `ril_coordinator_loaded 0`).
pub fn register(registry: &Registry, slot: Arc<OnceLock<Arc<Committed>>>) {
    registry.add_loaded(
        "ril_coordinator_loaded",
        "1 once the dataset and state are loaded and the coordinator serves.",
        move || slot.get().map(|c| c.lock().status(Now::current())),
        |status, out| write(&status, out),
    );
}

fn flag(b: bool) -> f64 {
    f64::from(u8::from(b))
}

/// `status` as metrics.
pub fn write(status: &Status, out: &mut Exposition) {
    let n = |v: u64| v as f64;
    out.gauge(
        "ril_coordinator_policy_version",
        "The latest policy version the learner published.",
        n(status.policy_version),
    );
    out.gauge(
        "ril_coordinator_iteration",
        "The iteration being worked on.",
        n(status.iteration),
    );
    out.gauge(
        "ril_coordinator_iterations",
        "The run's length in iterations.",
        n(status.total_iterations),
    );
    out.gauge(
        "ril_coordinator_run_finished",
        "1 once every iteration is trained.",
        flag(status.finished),
    );
    let counters = [
        (
            "ril_coordinator_questions_issued_total",
            "Stream positions ever leased (the cursor).",
            status.cursor,
        ),
        (
            "ril_coordinator_groups_accepted_total",
            "Groups the learner accepted, each position once, durably.",
            status.groups_accepted,
        ),
        (
            "ril_coordinator_groups_refused_duplicate_total",
            "Groups refused because their position was already accepted.",
            status.duplicates_refused,
        ),
        (
            "ril_coordinator_leases_expired_total",
            "Leases that passed their deadline or whose actor stopped heartbeating.",
            status.leases_expired,
        ),
        (
            "ril_coordinator_state_writes_total",
            "State-file writes (each covers one or more changes: group commit).",
            status.state_writes.writes,
        ),
        (
            "ril_coordinator_state_write_failures_total",
            "State-file writes that failed (their changes rolled back, their callers told).",
            status.state_writes.failures,
        ),
        (
            "ril_coordinator_state_changes_written_total",
            "Changes the state-file writes covered.",
            status.state_writes.changes,
        ),
    ];
    for (name, help, value) in counters {
        out.counter(name, help, n(value));
    }
    out.gauge(
        "ril_coordinator_state_file_bytes",
        "Size of the latest state-file write.",
        n(status.state_writes.last_bytes),
    );
    write_actors(status, out);
}

/// Leases, actors, the learner rendezvous and the progress watchdog.
fn write_actors(status: &Status, out: &mut Exposition) {
    let n = |v: u64| v as f64;
    out.gauge(
        "ril_coordinator_leases_outstanding",
        "Leases holding questions: being rolled out, or completed and not yet accepted.",
        n(status.leases_outstanding),
    );
    let alive = status.actors.iter().filter(|a| a.alive).count();
    out.family(
        "ril_coordinator_actors",
        "Actors the coordinator knows, by whether they heartbeat within the actor timeout.",
        Kind::Gauge,
        [
            (&[("state", "alive")][..], alive as f64),
            (
                &[("state", "silent")][..],
                (status.actors.len() - alive) as f64,
            ),
        ],
    );
    let ids: Vec<[(&str, &str); 1]> = status
        .actors
        .iter()
        .map(|a| [("actor", a.actor_id.as_str())])
        .collect();
    let per_actor = |f: fn(&crate::coordinator::ActorInfo) -> f64| {
        ids.iter()
            .zip(&status.actors)
            .map(move |(l, a)| (&l[..], f(a)))
    };
    out.family(
        "ril_coordinator_actor_questions_leased_total",
        "Questions leased to each actor.",
        Kind::Counter,
        per_actor(|a| a.groups_leased as f64),
    );
    out.family(
        "ril_coordinator_actor_policy_version",
        "The policy version each actor last said it samples with.",
        Kind::Gauge,
        per_actor(|a| a.policy_version as f64),
    );
    out.family(
        "ril_coordinator_actor_last_seen_seconds",
        "Seconds since each actor's last call.",
        Kind::Gauge,
        per_actor(|a| a.last_seen_ms_ago as f64 / 1000.0),
    );
    out.gauge(
        "ril_coordinator_learner_world_size",
        "Learner ranks the run expects.",
        f64::from(status.learner_world_size),
    );
    out.gauge(
        "ril_coordinator_learner_ranks_joined",
        "Learner ranks that joined.",
        f64::from(status.learner_ranks_joined),
    );
    out.gauge(
        "ril_coordinator_seconds_since_progress",
        "Seconds since the run last advanced (a group accepted, a version published, the start).",
        status.progress.since_progress.as_secs_f64(),
    );
    out.gauge(
        "ril_coordinator_stalled",
        "1 once the progress watchdog stopped the run (no progress for the stall limit).",
        flag(status.progress.stalled.is_some()),
    );
}
