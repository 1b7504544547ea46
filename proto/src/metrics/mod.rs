//! Prometheus metrics for every role: the text exposition format (version 0.0.4) written here,
//! a [`Registry`] of collectors that read a role's live state at scrape time, the per-method RPC
//! metrics every server records ([`rpc`]), process metrics, and the plain HTTP `/metrics`
//! endpoint ([`http`]) a role serves with `--metrics-listen`.
//!
//! Naming follows Prometheus' conventions: every name starts `ril_` (the process metrics keep
//! their standard `process_` names), base units in the name (`_seconds`, `_bytes`), counters
//! end `_total`, ratios end `_ratio`. Gauges that read a role's state are computed at scrape
//! time: nothing is sampled in the background and nothing here grows with the run (label sets
//! are bounded: methods per server, actors per coordinator, [`rpc::MAX_METHODS`]).

pub mod http;
pub mod rpc;

use std::fmt::Write as _;
use std::sync::{Arc, LazyLock, Mutex};

/// The exposition format's content type.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What a metric family is, as its `# TYPE` line says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// A metric or label name as the format allows it (`[a-zA-Z_:][a-zA-Z0-9_:]*`; labels without
/// `:`). Names built from outside input go through [`sanitize`] first.
pub fn valid_name(name: &str, label: bool) -> bool {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || (!label && c == ':'));
    first_ok && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || (!label && c == ':'))
}

/// `raw` as a metric-name fragment: ASCII letters, digits and `_`, lower case, every other
/// character as `_` (so `d/train loss` becomes `d_train_loss`).
pub fn sanitize(raw: &str) -> String {
    raw.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect()
}

fn escape_label(value: &str, out: &mut String) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

fn escape_help(help: &str, out: &mut String) {
    for c in help.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// A sample value as the format writes it (`NaN`, `+Inf`, `-Inf` spelled out).
fn write_value(value: f64, out: &mut String) {
    if value.is_nan() {
        out.push_str("NaN");
    } else if value == f64::INFINITY {
        out.push_str("+Inf");
    } else if value == f64::NEG_INFINITY {
        out.push_str("-Inf");
    } else {
        let _ = write!(out, "{value}");
    }
}

/// Label pairs of one sample.
pub type Labels<'a> = &'a [(&'a str, &'a str)];

/// A scrape's text, written family by family. Each family is written once, all its samples
/// together (the format requires it); a name written twice, or one the format does not allow,
/// is skipped with a warning rather than making the whole scrape unparseable.
#[derive(Debug, Default)]
pub struct Exposition {
    text: String,
    written: std::collections::BTreeSet<String>,
}

impl Exposition {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn into_text(self) -> String {
        self.text
    }

    /// Writes the `# HELP` and `# TYPE` lines; false (nothing written) for a name that is
    /// invalid or already written.
    fn header(&mut self, name: &str, help: &str, kind: Kind) -> bool {
        if !valid_name(name, false) || !self.written.insert(name.to_string()) {
            tracing::warn!(
                metric = name,
                "metric left out of the scrape: invalid or repeated name"
            );
            return false;
        }
        self.text.push_str("# HELP ");
        self.text.push_str(name);
        self.text.push(' ');
        escape_help(help, &mut self.text);
        self.text.push_str("\n# TYPE ");
        self.text.push_str(name);
        self.text.push(' ');
        self.text.push_str(kind.as_str());
        self.text.push('\n');
        true
    }

    fn sample(
        &mut self,
        name: &str,
        suffix: &str,
        labels: Labels<'_>,
        extra: Option<(&str, &str)>,
        value: f64,
    ) {
        self.text.push_str(name);
        self.text.push_str(suffix);
        let mut pairs = labels.iter().copied().chain(extra).peekable();
        if pairs.peek().is_some() {
            self.text.push('{');
            let mut first = true;
            for (k, v) in pairs {
                if !valid_name(k, true) {
                    continue;
                }
                if !first {
                    self.text.push(',');
                }
                first = false;
                self.text.push_str(k);
                self.text.push_str("=\"");
                escape_label(v, &mut self.text);
                self.text.push('"');
            }
            self.text.push('}');
        }
        self.text.push(' ');
        write_value(value, &mut self.text);
        self.text.push('\n');
    }

    /// One family of `kind` (counter or gauge) with a sample per label set.
    pub fn family<'a>(
        &mut self,
        name: &str,
        help: &str,
        kind: Kind,
        samples: impl IntoIterator<Item = (Labels<'a>, f64)>,
    ) {
        debug_assert_ne!(
            kind,
            Kind::Histogram,
            "histograms go through Exposition::histogram"
        );
        if self.header(name, help, kind) {
            for (labels, value) in samples {
                self.sample(name, "", labels, None, value);
            }
        }
    }

    pub fn counter(&mut self, name: &str, help: &str, value: f64) {
        self.family(name, help, Kind::Counter, [(&[][..], value)]);
    }

    pub fn gauge(&mut self, name: &str, help: &str, value: f64) {
        self.family(name, help, Kind::Gauge, [(&[][..], value)]);
    }

    /// A histogram family: per label set, cumulative `_bucket{le=..}` samples (ending `+Inf`),
    /// `_sum` and `_count`.
    pub fn histogram<'a>(
        &mut self,
        name: &str,
        help: &str,
        series: impl IntoIterator<Item = (Labels<'a>, &'a HistogramSnapshot)>,
    ) {
        if !self.header(name, help, Kind::Histogram) {
            return;
        }
        for (labels, h) in series {
            let mut cumulative = 0u64;
            for (bound, count) in h.bounds.iter().zip(&h.counts) {
                cumulative += count;
                let mut le = String::new();
                write_value(*bound, &mut le);
                self.sample(
                    name,
                    "_bucket",
                    labels,
                    Some(("le", &le)),
                    cumulative as f64,
                );
            }
            self.sample(
                name,
                "_bucket",
                labels,
                Some(("le", "+Inf")),
                h.count as f64,
            );
            self.sample(name, "_sum", labels, None, h.sum);
            self.sample(name, "_count", labels, None, h.count as f64);
        }
    }
}

/// Upper bounds (seconds) for latencies from sub-millisecond RPCs to minute-long steps.
pub const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0,
];

/// A histogram's state: counts per bucket (not cumulative; the last bucket's overflow is
/// `count` minus their sum), the sum and the count.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    pub bounds: &'static [f64],
    pub counts: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

impl HistogramSnapshot {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    pub fn observe(&mut self, value: f64) {
        if let Some(i) = self.bounds.iter().position(|b| value <= *b) {
            self.counts[i] += 1;
        }
        if value.is_finite() {
            self.sum += value;
        }
        self.count += 1;
    }
}

/// Writes a role's metrics into a scrape. Called on every scrape, with the role's live state;
/// it must not block for long (read a snapshot, do not wait on a training step).
pub trait Collect: Send + Sync {
    fn collect(&self, out: &mut Exposition);
}

impl<F: Fn(&mut Exposition) + Send + Sync> Collect for F {
    fn collect(&self, out: &mut Exposition) {
        self(out)
    }
}

/// A server's metrics: the RPC metrics its layer records, the process metrics, and the
/// collectors its role adds. Cheap to clone (shared).
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

struct Inner {
    role: String,
    rpc: rpc::RpcStats,
    collectors: Mutex<Vec<Arc<dyn Collect>>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("role", &self.inner.role)
            .finish_non_exhaustive()
    }
}

impl Registry {
    /// A registry for a process of `role` (the `ril_build_info` metric's label).
    pub fn new(role: &str) -> Self {
        // The start time is read now (at bind, near the process's start), not at the first scrape.
        LazyLock::force(&START_TIME);
        Self {
            inner: Arc::new(Inner {
                role: role.to_string(),
                rpc: rpc::RpcStats::default(),
                collectors: Mutex::new(Vec::new()),
            }),
        }
    }

    pub fn role(&self) -> &str {
        &self.inner.role
    }

    pub fn rpc(&self) -> &rpc::RpcStats {
        &self.inner.rpc
    }

    /// Adds a collector, written after those added before it.
    pub fn add(&self, collector: impl Collect + 'static) {
        self.inner
            .collectors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Arc::new(collector));
    }

    /// Adds the collector of a role whose state is loaded after the server starts: the gauge
    /// `loaded_name` (1 once `read` finds the state, 0 before), then `write` over the state.
    pub fn add_loaded<T>(
        &self,
        loaded_name: &'static str,
        loaded_help: &'static str,
        read: impl Fn() -> Option<T> + Send + Sync + 'static,
        write: impl Fn(T, &mut Exposition) + Send + Sync + 'static,
    ) {
        self.add(move |out: &mut Exposition| {
            let state = read();
            out.gauge(
                loaded_name,
                loaded_help,
                f64::from(u8::from(state.is_some())),
            );
            if let Some(state) = state {
                write(state, out);
            }
        });
    }

    /// The whole scrape's text.
    pub fn render(&self) -> String {
        let mut out = Exposition::new();
        out.family(
            "ril_build_info",
            "Always 1; the labels say which ril and which role this process is.",
            Kind::Gauge,
            [(
                &[
                    ("version", env!("CARGO_PKG_VERSION")),
                    ("role", self.role()),
                ][..],
                1.0,
            )],
        );
        process_metrics(&mut out);
        self.inner.rpc.collect(&mut out);
        let collectors = self
            .inner
            .collectors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for c in collectors {
            c.collect(&mut out);
        }
        out.into_text()
    }
}

/// The standard process metrics (as Prometheus' own clients name them): CPU seconds, resident
/// memory, open file descriptors and the start time. Linux's `/proc`; left out elsewhere.
fn process_metrics(out: &mut Exposition) {
    if let Ok(usage) = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF) {
        let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
        out.counter(
            "process_cpu_seconds_total",
            "User and system CPU time this process has used.",
            secs(usage.user_time()) + secs(usage.system_time()),
        );
    }
    if let Some(rss) = resident_bytes() {
        out.gauge(
            "process_resident_memory_bytes",
            "Resident memory size.",
            rss as f64,
        );
    }
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        out.gauge(
            "process_open_fds",
            "Open file descriptors.",
            dir.count() as f64,
        );
    }
    out.gauge(
        "process_start_time_seconds",
        "When this process's first server bound its port, in seconds since the Unix epoch.",
        *START_TIME,
    );
}

static START_TIME: LazyLock<f64> = LazyLock::new(|| {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
});

/// `VmRSS` of `/proc/self/status`, in bytes.
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_format_escapes_labels_and_help_and_spells_out_special_values() {
        let mut out = Exposition::new();
        out.family(
            "ril_test_value",
            "A help with a \\ and a\nnew line.",
            Kind::Gauge,
            [
                (&[("name", "a \"quoted\"\nvalue\\")][..], f64::NAN),
                (&[("name", "inf")][..], f64::INFINITY),
                (&[("name", "neg")][..], f64::NEG_INFINITY),
                (&[("name", "x")][..], 1.5),
            ],
        );
        let text = out.into_text();
        assert_eq!(
            text,
            "# HELP ril_test_value A help with a \\\\ and a\\nnew line.\n\
             # TYPE ril_test_value gauge\n\
             ril_test_value{name=\"a \\\"quoted\\\"\\nvalue\\\\\"} NaN\n\
             ril_test_value{name=\"inf\"} +Inf\n\
             ril_test_value{name=\"neg\"} -Inf\n\
             ril_test_value{name=\"x\"} 1.5\n"
        );
    }

    #[test]
    fn repeated_and_invalid_names_are_left_out() {
        let mut out = Exposition::new();
        out.counter("ril_x_total", "x", 1.0);
        out.counter("ril_x_total", "again", 2.0);
        out.gauge("1bad", "starts with a digit", 3.0);
        out.gauge("ril bad", "has a space", 3.0);
        let text = out.into_text();
        assert_eq!(text.matches("ril_x_total").count(), 3, "{text}");
        assert!(!text.contains("bad"), "{text}");
        assert_eq!(sanitize("d/train Loss"), "d_train_loss");
        assert!(valid_name("ril:rule_x", false) && !valid_name("ril:rule", true));
    }

    #[test]
    fn histograms_are_cumulative_with_an_inf_bucket() {
        let mut h = HistogramSnapshot::new(&[0.1, 1.0]);
        for v in [0.05, 0.5, 0.7, 5.0] {
            h.observe(v);
        }
        let mut out = Exposition::new();
        out.histogram("ril_t_seconds", "t", [(&[("m", "a")][..], &h)]);
        let text = out.into_text();
        for line in [
            "ril_t_seconds_bucket{m=\"a\",le=\"0.1\"} 1\n",
            "ril_t_seconds_bucket{m=\"a\",le=\"1\"} 3\n",
            "ril_t_seconds_bucket{m=\"a\",le=\"+Inf\"} 4\n",
            "ril_t_seconds_sum{m=\"a\"} 6.25\n",
            "ril_t_seconds_count{m=\"a\"} 4\n",
        ] {
            assert!(text.contains(line), "{line:?} missing from\n{text}");
        }
    }
}
