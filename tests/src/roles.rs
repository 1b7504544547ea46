//! The run's roles as separate `ril` processes in a [`Sandbox`] (with `--security-dir certs`),
//! for tests that start them one by one.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{Sandbox, ok, ril_binary};

/// A role's process; killed when dropped.
pub struct Role {
    pub name: String,
    pub child: Child,
}

impl Drop for Role {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `ril <args> --security-dir certs` in the sandbox, logging to `<name>.log`.
pub fn start(sb: &Sandbox, name: &str, args: &[&str]) -> Role {
    let log = std::fs::File::create(sb.path(&format!("{name}.log"))).unwrap();
    let child = Command::new(ril_binary())
        .args(args)
        .args(["--security-dir", "certs"])
        .current_dir(sb.dir.path())
        .env("CANDLE_NUM_THREADS", "1")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    Role {
        name: name.to_string(),
        child,
    }
}

/// Waits (up to 120 s) for `role` to write its address to `file`; fails if it exits first.
pub fn wait_addr(sb: &Sandbox, role: &mut Role, file: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(s) = std::fs::read_to_string(sb.path(file))
            && !s.trim().is_empty()
        {
            return s.trim().to_string();
        }
        if let Ok(Some(st)) = role.child.try_wait() {
            panic!(
                "{} exited ({st}): {}",
                role.name,
                std::fs::read_to_string(sb.path(&format!("{}.log", role.name))).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "{} never wrote {file}",
            role.name
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts a serving role on a free loopback port (its address in `<name>.addr`).
pub fn serve(sb: &Sandbox, name: &str, args: &[&str]) -> (Role, String) {
    let file = format!("{name}.addr");
    let mut a: Vec<&str> = args.to_vec();
    a.extend([
        "--config",
        "run.toml",
        "--listen",
        "127.0.0.1:0",
        "--addr-file",
        &file,
    ]);
    let mut role = start(sb, name, &a);
    let addr = wait_addr(sb, &mut role, &file);
    (role, addr)
}

/// A small dataset, a tokenizer, a student and a teacher (random test-size models: the
/// mechanics, not the learning, are under test here).
pub fn make_models(sb: &Sandbox) {
    sb.make_tiny_run(24, &[("student", "1"), ("teacher", "2")]);
}

/// Writes `run.toml` (2 iterations of B = 2, G = 2, one candle teacher `t1`, `extra` appended)
/// and, once, the run's certificates and token under `certs/`.
pub fn write_config(sb: &Sandbox, extra: &str) {
    let toml = format!(
        r#"
[run]
id = "t"
dir = "run"
seed = 1
iterations = 2
questions_per_iteration = 2

[data]
path = "data"

[student]
checkpoint = "student"

[rollout]
group_size = 2
max_new_tokens = 6

[coordinator]
lease_timeout_s = 2
heartbeat_interval_ms = 200
actor_timeout_s = 2

[actors]
count = 2

[learner]
save_every = 1

[learner.grpo]
lr = 1e-3
loss_normalizer = 6

[discriminator]
lr = 1e-3

[[teachers]]
name = "t1"
backend = "candle"
checkpoint = "teacher"

[teachers.sampling]
max_new_tokens = 6
{extra}
"#
    );
    std::fs::write(sb.path("run.toml"), toml).unwrap();
    // Roles started one by one below take `--security-dir certs`; `ril train` generates its own.
    if !sb.path("certs/token").exists() {
        ok(&sb.ril(&["certs", "init", "certs"]));
    }
}

/// Rewrites run.toml: each `from` must be there and becomes `to`.
pub fn edit_config(sb: &Sandbox, edits: &[(&str, &str)]) {
    let mut text = std::fs::read_to_string(sb.path("run.toml")).unwrap();
    for (from, to) in edits {
        assert!(text.contains(from), "run.toml lacks {from:?}");
        text = text.replace(from, to);
    }
    std::fs::write(sb.path("run.toml"), text).unwrap();
}
