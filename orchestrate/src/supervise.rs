//! Child-process supervision for the local cluster: every role runs as its own `ril <role>`
//! process on loopback, its output streamed with a role prefix; a role announces its bound
//! address through an address file; on success, failure or Ctrl-C every child gets SIGTERM,
//! then SIGKILL after a grace period.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};

use crate::error::{OrchestrateError, Result};
use crate::ril::RilBinary;

/// The last lines a child printed, shown when it fails.
type Tail = Arc<Mutex<std::collections::VecDeque<String>>>;

/// How many of a child's last lines are kept for the error that reports its death.
const TAIL_LINES: usize = 20;

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

    /// The error for this child having exited (`when`: "before it was ready", ...), if it has.
    pub fn exited(&mut self, when: &'static str) -> Result<Option<OrchestrateError>> {
        let status = self
            .child
            .try_wait()
            .map_err(OrchestrateError::io(format!("waiting for {}", self.role)))?;
        Ok(status.map(|status| OrchestrateError::Exited {
            role: self.role.clone(),
            status,
            when,
            tail: self.tail(),
        }))
    }
}

/// Copies a child's output stream, line by line, to stderr with a `[role]` prefix, to the
/// log file, and into the tail.
fn pump(
    stream: Box<dyn AsyncRead + Unpin + Send>,
    role: &str,
    tail: &Tail,
    log: Option<&Arc<Mutex<std::fs::File>>>,
) {
    let role = role.to_string();
    let tail = tail.clone();
    let log = log.cloned();
    tokio::spawn(async move {
        let mut lines = BufReader::new(stream).lines();
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
                if t.len() > TAIL_LINES {
                    t.pop_front();
                }
            }
        }
    });
}

fn log_file(path: &Path) -> Result<Arc<Mutex<std::fs::File>>> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).ok();
    }
    let file = std::fs::File::create(path)
        .map_err(OrchestrateError::io(format!("creating {}", path.display())))?;
    Ok(Arc::new(Mutex::new(file)))
}

/// Starts `ril <args>` as role `role`, prefixing each output line with `[role]`. Lines go to
/// stderr (and to `log_file` when given).
pub fn spawn(
    ril: &RilBinary,
    role: &str,
    args: &[String],
    log_file: Option<&Path>,
) -> Result<Proc> {
    let mut child = Command::new(ril.path())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|error| OrchestrateError::Spawn {
            role: role.to_string(),
            command: args.join(" "),
            error,
        })?;
    let tail: Tail = Arc::default();
    let log = log_file.map(self::log_file).transpose()?;
    if let Some(s) = child.stdout.take() {
        pump(Box::new(s), role, &tail, log.as_ref());
    }
    if let Some(s) = child.stderr.take() {
        pump(Box::new(s), role, &tail, log.as_ref());
    }
    Ok(Proc {
        role: role.to_string(),
        child,
        tail,
    })
}

/// Polls `probe` until it gives a value, failing early with the child's last output if it
/// exits first (`when` says what it had not done yet), or with `timed_out` after `timeout`.
pub async fn wait_for<T, F, Fut>(
    proc: &mut Proc,
    timeout: Duration,
    every: Duration,
    when: &'static str,
    timed_out: impl FnOnce(&Proc) -> OrchestrateError,
    mut probe: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(found) = probe().await {
            return Ok(found);
        }
        if let Some(e) = proc.exited(when)? {
            return Err(e);
        }
        if Instant::now() > deadline {
            return Err(timed_out(proc));
        }
        tokio::time::sleep(every).await;
    }
}

/// Waits for `file` to hold an address written by `proc` (roles write it once bound), failing
/// early with the child's last output if it exits first.
pub async fn wait_addr(proc: &mut Proc, file: &Path, timeout: Duration) -> Result<String> {
    let read = || async {
        std::fs::read_to_string(file)
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    };
    let timed_out = |p: &Proc| OrchestrateError::NotReady {
        role: p.role.clone(),
        timeout,
        tail: p.tail(),
    };
    let every = Duration::from_millis(50);
    wait_for(proc, timeout, every, "before it was ready", timed_out, read).await
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A shell stands in for `ril`: `sh -c SCRIPT` is a child process like a role's.
    fn shell() -> RilBinary {
        RilBinary::new("/bin/sh")
    }

    fn script(s: &str) -> Vec<String> {
        vec!["-c".into(), s.into()]
    }

    #[tokio::test]
    async fn a_role_s_address_is_read_once_written_and_sigterm_stops_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = addr_file(dir.path(), "fake");
        let log = dir.path().join("logs/fake.log");
        let s = format!(
            "echo starting; echo 127.0.0.1:7 > {}; exec sleep 60",
            file.display()
        );
        let mut procs = vec![spawn(&shell(), "fake", &script(&s), Some(&log)).unwrap()];
        let addr = wait_addr(&mut procs[0], &file, Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(addr, "127.0.0.1:7");
        let stopped = stop_all(&mut procs, Duration::from_secs(30)).await;
        assert_eq!(stopped.len(), 1);
        let (role, status) = &stopped[0];
        assert_eq!(role, "fake");
        assert!(status.is_some(), "SIGTERM ends it within the grace period");
        assert!(std::fs::read_to_string(&log).unwrap().contains("starting"));
    }

    #[tokio::test]
    async fn a_role_that_dies_first_is_reported_with_its_last_output() {
        let dir = tempfile::tempdir().unwrap();
        let file = addr_file(dir.path(), "fragile");
        let s = "echo cannot load the model >&2; exit 3";
        let mut p = spawn(&shell(), "fragile", &script(s), None).unwrap();
        let e = wait_addr(&mut p, &file, Duration::from_secs(30))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("fragile exited") && e.contains("before it was ready"),
            "{e}"
        );
        // The tail is filled by the output pump, which may still be reading when the exit is
        // seen: wait for it rather than for a fixed time.
        let mut p = p;
        ril_common::wait::wait_until("the dead role's output", Duration::from_secs(30), || {
            let tail = p.tail();
            async move { tail.contains("cannot load the model") }
        })
        .await;
        assert!(p.exited("later").unwrap().is_some());
    }

    #[tokio::test]
    async fn a_role_that_never_answers_times_out_naming_itself() {
        let dir = tempfile::tempdir().unwrap();
        let file = addr_file(dir.path(), "mute");
        // It says why it is stuck, as a role whose judge cannot be read does, then hangs: the
        // run's error carries that line, not only the role's log.
        let s = "echo the judge replied without an answer tag >&2; exec sleep 60";
        let mut procs = vec![spawn(&shell(), "mute", &script(s), None).unwrap()];
        ril_common::wait::wait_until("the stuck role's output", Duration::from_secs(30), || {
            let tail = procs[0].tail();
            async move { tail.contains("answer tag") }
        })
        .await;
        let e = wait_addr(&mut procs[0], &file, Duration::from_millis(200))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("mute was not ready within"), "{e}");
        assert!(
            e.contains("its last output:\nthe judge replied without an answer tag"),
            "{e}"
        );
        stop_all(&mut procs, Duration::from_secs(30)).await;
    }
}
