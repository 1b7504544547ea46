//! The learner's Prometheus metrics: its version and rank, step counters and the step-time
//! histogram, weights served to actors, and the last step's metrics line (every name of
//! `metrics.jsonl`: reward components, KL, entropy, clip fraction, D's accuracy and loss, actor
//! phase times...) as gauges `ril_learner_<name>`, with `*_ms` names given in seconds
//! (`ril_learner_actor_generation_seconds`). Steps are rank 0's; every rank serves weights.

use std::collections::BTreeMap;

use ril_proto::metrics::{Exposition, HistogramSnapshot, SECONDS_BUCKETS, sanitize};

/// Step-line names with a metric of their own (counters, or the histogram).
const OWN_METRIC: [&str; 6] = [
    "iteration",
    "version",
    "step_seconds",
    "groups_trained",
    "stale_groups_dropped",
    "tokens",
];

#[derive(Debug)]
pub(crate) struct Exported {
    steps: u64,
    step_seconds: HistogramSnapshot,
    groups_trained: u64,
    stale_groups_dropped: u64,
    tokens_trained: u64,
    last_iteration: Option<u64>,
    last: BTreeMap<String, f64>,
    weights_served: u64,
    weight_bytes_served: u64,
}

impl Default for Exported {
    fn default() -> Self {
        Self {
            steps: 0,
            step_seconds: HistogramSnapshot::new(SECONDS_BUCKETS),
            groups_trained: 0,
            stale_groups_dropped: 0,
            tokens_trained: 0,
            last_iteration: None,
            last: BTreeMap::new(),
            weights_served: 0,
            weight_bytes_served: 0,
        }
    }
}

impl Exported {
    /// One finished step (rank 0): its metrics line.
    pub(crate) fn step(&mut self, iteration: u64, seconds: f64, metrics: &BTreeMap<String, f64>) {
        self.steps += 1;
        self.step_seconds.observe(seconds);
        let get = |k: &str| {
            metrics
                .get(k)
                .copied()
                .filter(|v| v.is_finite() && *v >= 0.0)
        };
        if let Some(g) = get("groups_trained") {
            self.groups_trained = g as u64;
        }
        self.stale_groups_dropped += get("stale_groups_dropped").unwrap_or(0.0) as u64;
        self.tokens_trained += get("tokens").unwrap_or(0.0) as u64;
        self.last_iteration = Some(iteration);
        self.last = metrics.clone();
    }

    pub(crate) fn weights_served(&mut self, bytes: usize) {
        self.weights_served += 1;
        self.weight_bytes_served += bytes as u64;
    }

    pub(crate) fn write(&self, out: &mut Exposition) {
        let counters = [
            (
                "ril_learner_steps_total",
                "Training steps this learner finished (rank 0).",
                self.steps,
            ),
            (
                "ril_learner_groups_trained_total",
                "Groups the policy trained on over the run (rank 0).",
                self.groups_trained,
            ),
            (
                "ril_learner_groups_dropped_stale_total",
                "Groups dropped for staleness since this learner started (rank 0).",
                self.stale_groups_dropped,
            ),
            (
                "ril_learner_tokens_trained_total",
                "Response tokens in the loss since this learner started (rank 0).",
                self.tokens_trained,
            ),
            (
                "ril_learner_weight_syncs_served_total",
                "Weight transfers this rank served to actors (GetWeights).",
                self.weights_served,
            ),
            (
                "ril_learner_weight_sync_bytes_total",
                "Weight bytes this rank served to actors (the transfers' seconds are the RPC \
                 layer's ril_rpc_server_handling_seconds{method=\"GetWeights\"}).",
                self.weight_bytes_served,
            ),
        ];
        for (name, help, value) in counters {
            out.counter(name, help, value as f64);
        }
        out.histogram(
            "ril_learner_step_seconds",
            "Wall time of each training step (rank 0: shard, train, D's step, install weights).",
            [(&[][..], &self.step_seconds)],
        );
        if let Some(it) = self.last_iteration {
            out.gauge(
                "ril_learner_last_step_iteration",
                "The iteration of the last step.",
                it as f64,
            );
        }
        for (key, value) in &self.last {
            if OWN_METRIC.contains(&key.as_str()) {
                continue;
            }
            let (stem, value) = match key.strip_suffix("_ms") {
                Some(stem) => (format!("{stem}_seconds"), value / 1000.0),
                None => (key.clone(), *value),
            };
            out.gauge(
                &format!("ril_learner_{}", sanitize(&stem)),
                &format!("The last step's {key} (as in metrics.jsonl)."),
                value,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_accumulate_and_the_line_becomes_gauges_in_seconds() {
        let mut e = Exported::default();
        let line = |tokens: f64| {
            BTreeMap::from([
                ("tokens".to_string(), tokens),
                ("groups_trained".to_string(), 8.0),
                ("stale_groups_dropped".to_string(), 1.0),
                ("kl_mean".to_string(), 0.25),
                ("actor_generation_ms".to_string(), 1500.0),
                ("step_seconds".to_string(), 2.0),
            ])
        };
        e.step(0, 2.0, &line(100.0));
        e.step(1, 3.0, &line(50.0));
        e.weights_served(1024);
        let mut out = Exposition::new();
        e.write(&mut out);
        let text = out.into_text();
        for want in [
            "ril_learner_steps_total 2\n",
            "ril_learner_tokens_trained_total 150\n",
            "ril_learner_groups_dropped_stale_total 2\n",
            "ril_learner_groups_trained_total 8\n",
            "ril_learner_weight_sync_bytes_total 1024\n",
            "ril_learner_kl_mean 0.25\n",
            "ril_learner_actor_generation_seconds 1.5\n",
            "ril_learner_step_seconds_count 2\n",
            "ril_learner_step_seconds_sum 5\n",
            "ril_learner_last_step_iteration 1\n",
        ] {
            assert!(text.contains(want), "{want:?} missing from\n{text}");
        }
        assert!(!text.contains("ril_learner_tokens "), "{text}");
    }
}
