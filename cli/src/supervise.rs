//! Child-process supervision for the local cluster: every role runs as its own `ril <role>`
//! process on loopback, its output streamed with a role prefix; a role announces its bound
//! address through an address file; on success, failure or Ctrl-C every child gets SIGTERM,
//! then SIGKILL after a grace period.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The last lines a child printed, shown when it fails.
type Tail = Arc<Mutex<std::collections::VecDeque<String>>>;

pub struct Proc {
    pub role: String,
    pub child: Child,
    tail: Tail,
}

impl std::fmt::Debug for Proc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proc").field("role", &self.role).finish()
    }
}

impl Proc {
    pub fn tail(&self) -> String {
        self.tail
            .lock()
            .map(|t| t.iter().cloned().collect::<Vec<_>>().join("\n"))
            .unwrap_or_default()
    }
}

/// Starts `ril <args>` as role `role`, prefixing each output line with `[role]`. Lines go to
/// stderr (and to `log_file` when given).
pub fn spawn(role: &str, args: &[String], log_file: Option<&Path>) -> anyhow::Result<Proc> {
    let exe = std::env::current_exe().context("locating the ril binary")?;
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {role}: ril {}", args.join(" ")))?;
    let tail: Tail = Arc::default();
    let log = match log_file {
        Some(p) => {
            if let Some(d) = p.parent() {
                std::fs::create_dir_all(d).ok();
            }
            Some(Arc::new(Mutex::new(
                std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
            )))
        }
        None => None,
    };
    let pump = |stream: Option<Box<dyn tokio::io::AsyncRead + Unpin + Send>>| {
        let role = role.to_string();
        let tail = tail.clone();
        let log = log.clone();
        if let Some(s) = stream {
            tokio::spawn(async move {
                let mut lines = BufReader::new(s).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    eprintln!("[{role}] {line}");
                    if let Some(l) = &log
                        && let Ok(mut f) = l.lock()
                    {
                        use std::io::Write;
                        let _ = writeln!(f, "{line}");
                    }
                    if let Ok(mut t) = tail.lock() {
                        t.push_back(line);
                        if t.len() > 20 {
                            t.pop_front();
                        }
                    }
                }
            });
        }
    };
    pump(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
    );
    pump(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
    );
    Ok(Proc {
        role: role.to_string(),
        child,
        tail,
    })
}

/// Waits for `file` to hold an address written by `proc` (roles write it once bound), failing
/// early with the child's last output if it exits first.
pub async fn wait_addr(proc: &mut Proc, file: &Path, timeout: Duration) -> anyhow::Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(s) = std::fs::read_to_string(file) {
            let s = s.trim().to_string();
            if !s.is_empty() {
                return Ok(s);
            }
        }
        if let Some(status) = proc.child.try_wait()? {
            bail!(
                "{} exited ({status}) before it was ready; its last output:\n{}",
                proc.role,
                proc.tail()
            );
        }
        if Instant::now() > deadline {
            bail!("{} was not ready within {timeout:?}", proc.role);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends SIGTERM to every child still running, waits up to `grace`, then kills the rest.
pub async fn stop_all(procs: &mut [Proc], grace: Duration) -> Vec<(String, Option<ExitStatus>)> {
    for p in procs.iter_mut() {
        if let Ok(None) = p.child.try_wait()
            && let Some(pid) = p.child.id()
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
    let deadline = Instant::now() + grace;
    let mut out = Vec::new();
    for p in procs.iter_mut() {
        let left = deadline.saturating_duration_since(Instant::now());
        let status = match tokio::time::timeout(left, p.child.wait()).await {
            Ok(Ok(s)) => Some(s),
            _ => {
                tracing::warn!(role = %p.role, "did not stop within the grace period; killing it");
                let _ = p.child.kill().await;
                None
            }
        };
        out.push((p.role.clone(), status));
    }
    out
}

/// A fresh address file path under `dir` for `role`.
pub fn addr_file(dir: &Path, role: &str) -> PathBuf {
    let p = dir.join(format!("{role}.addr"));
    let _ = std::fs::remove_file(&p);
    p
}

/// Writes the bound address for a supervisor (atomically: temp file + rename).
pub fn write_addr_file(path: &Path, addr: &std::net::SocketAddr) -> anyhow::Result<()> {
    Ok(ril_proto::server::write_addr_file(path, addr)?)
}
