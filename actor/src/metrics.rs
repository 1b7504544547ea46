//! The actor's Prometheus metrics (`ril actor --metrics-listen`): leases, groups pushed and
//! refused, questions handed back, weight syncs and their bytes, the student tokens it
//! generated (`rate(ril_actor_generated_tokens_total[1m])` is its rollout tokens/s) and the
//! seconds it spent in each phase. Shared with the running actor through
//! [`crate::ActorOptions::metrics`]; atomics, so a scrape never waits on a rollout.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use ril_proto::metrics::{Exposition, Kind};

#[derive(Debug, Default)]
pub struct ActorMetrics {
    pub leases: AtomicU64,
    pub groups_pushed: AtomicU64,
    pub groups_refused: AtomicU64,
    pub questions_returned: AtomicU64,
    pub weight_syncs: AtomicU64,
    pub weight_bytes: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub generated_responses: AtomicU64,
    /// The version the student samples with, plus one (0: none yet).
    version_plus_one: AtomicU64,
    phase_seconds: Mutex<BTreeMap<String, f64>>,
}

impl ActorMetrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn set_version(&self, version: u64) {
        self.version_plus_one
            .store(version.saturating_add(1), Ordering::Relaxed);
    }

    pub fn add_phase_ms(&self, phase: &str, ms: f64) {
        let mut phases = self.phase_seconds.lock().unwrap_or_else(|p| p.into_inner());
        *phases.entry(phase.to_string()).or_default() += ms / 1000.0;
    }

    pub fn write(&self, out: &mut Exposition) {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed) as f64;
        let counters = [
            (
                "ril_actor_leases_total",
                "Leases granted to this actor.",
                &self.leases,
            ),
            (
                "ril_actor_groups_pushed_total",
                "Scored groups the learner took.",
                &self.groups_pushed,
            ),
            (
                "ril_actor_groups_refused_total",
                "Scored groups the learner refused (stale, duplicate, invalid).",
                &self.groups_refused,
            ),
            (
                "ril_actor_questions_returned_total",
                "Questions handed back to the coordinator (failed, unreadable, or a failed push).",
                &self.questions_returned,
            ),
            (
                "ril_actor_weight_syncs_total",
                "Policy weights fetched and applied.",
                &self.weight_syncs,
            ),
            (
                "ril_actor_weight_sync_bytes_total",
                "Bytes of policy weights fetched and applied.",
                &self.weight_bytes,
            ),
            (
                "ril_actor_generated_tokens_total",
                "Student response tokens generated (rate() of it: rollout tokens/s).",
                &self.generated_tokens,
            ),
            (
                "ril_actor_generated_responses_total",
                "Student responses generated.",
                &self.generated_responses,
            ),
        ];
        for (name, help, counter) in counters {
            out.counter(name, help, load(counter));
        }
        let version = self.version_plus_one.load(Ordering::Relaxed);
        if version > 0 {
            out.gauge(
                "ril_actor_policy_version",
                "The policy version the student samples with.",
                (version - 1) as f64,
            );
        }
        let phases = self
            .phase_seconds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let labels: Vec<[(&str, &str); 1]> =
            phases.keys().map(|k| [("phase", k.as_str())]).collect();
        out.family(
            "ril_actor_phase_seconds_total",
            "Seconds spent per phase: lease, weight_sync, generation, teacher, scoring, push.",
            Kind::Counter,
            labels
                .iter()
                .zip(phases.values())
                .map(|(l, v)| (&l[..], *v)),
        );
    }
}
