//! Scraping a role's `/metrics` as Prometheus does (HTTP/1.1 GET over TCP) and reading it with
//! `prometheus-parse`, a parser of the text format written outside this project. Every line
//! must be one the parser recognises (it skips what it cannot read, so a test checks that
//! nothing was skipped).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use prometheus_parse::{LineInfo, Scrape, Value};

/// An HTTP response: status code, content type and body.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub content_type: String,
    pub body: String,
}

/// `METHOD path` at `addr` (`host:port`), with a 10 s deadline on connecting and reading.
pub fn request(addr: &str, method: &str, path: &str) -> std::io::Result<Reply> {
    let sock = addr
        .parse()
        .map_err(|e| std::io::Error::other(format!("{addr}: {e}")))?;
    let mut stream = TcpStream::connect_timeout(&sock, Duration::from_secs(10))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/plain\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8(raw).map_err(std::io::Error::other)?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no end of headers in {text:?}")))?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status line in {head:?}")))?;
    let content_type = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default();
    Ok(Reply {
        status,
        content_type,
        body: body.to_string(),
    })
}

/// A parsed scrape.
#[derive(Debug)]
pub struct Metrics {
    pub text: String,
    pub scrape: Scrape,
}

/// `GET /metrics` at `addr`, checked (200, the text format's content type, every line
/// recognised) and parsed.
pub fn scrape(addr: &str) -> std::io::Result<Metrics> {
    let reply = request(addr, "GET", "/metrics")?;
    if reply.status != 200 || !reply.content_type.starts_with("text/plain; version=0.0.4") {
        return Err(std::io::Error::other(format!(
            "GET /metrics at {addr}: {} {:?}",
            reply.status, reply.content_type
        )));
    }
    parse(reply.body)
}

/// Parses exposition text, failing on any line the parser does not recognise.
pub fn parse(text: String) -> std::io::Result<Metrics> {
    for line in text.lines() {
        if !line.trim().is_empty() && matches!(LineInfo::parse(line), LineInfo::Ignored) {
            return Err(std::io::Error::other(format!("unparseable line {line:?}")));
        }
    }
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_string())))?;
    Ok(Metrics { text, scrape })
}

impl Metrics {
    /// The value of the counter, gauge or untyped sample `name` whose labels include all of
    /// `labels`; summed over the matching samples. `None` when no sample matches.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut found = None;
        for s in &self.scrape.samples {
            if s.metric != name || !labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)) {
                continue;
            }
            let v = match &s.value {
                Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
                _ => continue,
            };
            *found.get_or_insert(0.0) += v;
        }
        found
    }

    /// The kind the parser gave `name`'s samples ("counter", "gauge", "histogram", ...).
    pub fn kind(&self, name: &str) -> Option<&'static str> {
        self.scrape
            .samples
            .iter()
            .find(|s| s.metric == name)
            .map(|s| match s.value {
                Value::Counter(_) => "counter",
                Value::Gauge(_) => "gauge",
                Value::Histogram(_) => "histogram",
                Value::Summary(_) => "summary",
                Value::Untyped(_) => "untyped",
            })
    }

    /// The `+Inf` bucket (the observation count) of histogram `name` with `labels`.
    pub fn histogram_count(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.scrape.samples.iter().find_map(|s| match &s.value {
            Value::Histogram(buckets)
                if s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)) =>
            {
                buckets
                    .iter()
                    .find(|b| b.less_than == f64::INFINITY)
                    .map(|b| b.count)
            }
            _ => None,
        })
    }
}
