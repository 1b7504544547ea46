//! What the kubelet does for a pod, done here: the local overlay's init containers, Secret
//! volumes written as files, `$(VAR)` expansion with the pod's environment and downward API, a
//! container's `ril` started with its manifest's command line, and the gRPC probe.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ril_tests::k8s::*;
use ril_tests::{Sandbox, ril_binary, stderr, stdout};
use serde_json::Value;

/// The local overlay's init containers, run here: they make what its config names.
pub(crate) fn make_assets(sb: &Sandbox, local: &Rendering) -> PathBuf {
    let assets = sb.path("assets");
    let w = local.workload_running("coordinator");
    assert!(!w.init_containers().is_empty());
    for c in w.init_containers() {
        let a: Vec<String> = args(c)
            .iter()
            .map(|a| a.replace("/var/lib/ril/assets", &assets.to_string_lossy()))
            .collect();
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let out = sb.ril(&a);
        assert!(
            out.status.success(),
            "init container {}: {}",
            c["name"],
            stderr(&out)
        );
    }
    assets
}

/// Where the manifests mount the Secrets (`[security]` in every run config reads from here).
pub(crate) const SECRETS_MOUNT: &str = "/var/run/secrets/ril";

/// A run config with the pods' paths pointed at `assets`, `run` and `secrets` (a directory
/// laid out as the pods' Secret mounts: `tls/`, `token/`) here.
pub(crate) fn localise(text: &str, assets: &Path, run: &Path, secrets: &Path) -> String {
    text.replace("/var/lib/ril/assets", &assets.to_string_lossy())
        .replace("/var/lib/ril/run", &run.to_string_lossy())
        .replace(SECRETS_MOUNT, &secrets.to_string_lossy())
}

/// `ril certs init certs`, then `ril certs secrets certs`: the Secrets a user applies.
pub(crate) fn make_secrets(sb: &Sandbox) -> Vec<Value> {
    if !sb.path("certs/token").exists() {
        let out = sb.ril(&["certs", "init", "certs"]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let out = sb.ril(&["certs", "secrets", "certs"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let list: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(list["kind"], "List");
    list["items"].as_array().unwrap().clone()
}

/// A Secret's keys as files in `dir`, as the kubelet writes a Secret volume.
pub(crate) fn write_secret(secret: &Value, dir: &Path) {
    use base64::Engine as _;
    std::fs::create_dir_all(dir).unwrap();
    for (key, value) in secret["data"].as_object().unwrap() {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(value.as_str().unwrap())
            .unwrap();
        std::fs::write(dir.join(key), bytes).unwrap();
    }
}

/// What the kubelet puts at each of a pod's Secret mounts under SECRETS_MOUNT: every key of
/// the Secret its volume names, as a file, written under `root` (the mount path's part below
/// SECRETS_MOUNT kept). Panics when a mounted Secret is not among `secrets`.
pub(crate) fn mount_secrets(w: Workload<'_>, secrets: &[Value], root: &Path) {
    let c = w.containers()[0];
    for m in c["volumeMounts"].as_array().into_iter().flatten() {
        let path = m["mountPath"].as_str().unwrap();
        let Some(below) = path.strip_prefix(SECRETS_MOUNT) else {
            continue;
        };
        let volume = w.volume(m["name"].as_str().unwrap());
        let secret_name = volume["secret"]["secretName"]
            .as_str()
            .unwrap_or_else(|| panic!("{}: {path} is not a Secret volume", w.name()));
        let secret = secrets
            .iter()
            .find(|s| name(s) == secret_name)
            .unwrap_or_else(|| {
                panic!(
                    "{}: mounts Secret {secret_name}, which `ril certs secrets` does not make",
                    w.name()
                )
            });
        write_secret(secret, &root.join(below.trim_start_matches('/')));
    }
}

/// The Secrets' mounts for every role at once (`tls/` holding every role's certificate), for
/// runs that start every role from one config (`ril config check`, `ril train`).
pub(crate) fn every_role_s_secrets(sb: &Sandbox) -> PathBuf {
    let root = sb.path("all-secrets");
    for s in make_secrets(sb) {
        let kind = if name(&s) == "ril-run-token" {
            "token"
        } else {
            "tls"
        };
        write_secret(&s, &root.join(kind));
    }
    root
}

/// The role a container's `ril` subcommand runs as (the certificate it needs).
pub(crate) fn security_role(c: &Value) -> &'static str {
    match subcommand(c).as_str() {
        "coordinator" => "coordinator",
        "learner" => "learner",
        "actor" => "actor",
        "teacher" => "teacher",
        "discriminator serve" => "discriminator",
        other => panic!("unexpected role {other}"),
    }
}

pub(crate) struct Role {
    pub(crate) name: String,
    pub(crate) child: Child,
    pub(crate) log: PathBuf,
}

impl Drop for Role {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Role {
    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub(crate) fn sigterm(&self) {
        let st = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
    }

    /// Waits for the process to exit, at most `limit`.
    pub(crate) fn exits_within(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {limit:?} of SIGTERM: {}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Kubernetes' `$(VAR)` expansion of container args, with the pod's environment.
pub(crate) fn expand(arg: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = arg;
    while let Some(i) = rest.find("$(") {
        out.push_str(&rest[..i]);
        let tail = &rest[i + 2..];
        match tail.find(')') {
            Some(j) if env.contains_key(&tail[..j]) => {
                out.push_str(&env[&tail[..j]]);
                rest = &tail[j + 1..];
            }
            _ => {
                out.push_str("$(");
                rest = tail;
            }
        }
    }
    out.push_str(rest);
    out
}

/// The pod's environment as the kubelet gives it: literal values and the downward API fields
/// the manifests use (pod `pod_name`, StatefulSet ordinal `ordinal`).
pub(crate) fn pod_env(c: &Value, pod_name: &str, ordinal: &str) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for e in c["env"].as_array().into_iter().flatten() {
        let var = e["name"].as_str().unwrap().to_string();
        if let Some(v) = e["value"].as_str() {
            env.insert(var, v.to_string());
        } else if let Some(field) = e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            let v = match field {
                "metadata.name" => pod_name.to_string(),
                "metadata.labels['apps.kubernetes.io/pod-index']" => ordinal.to_string(),
                other => panic!("downward API field {other} not simulated here"),
            };
            env.insert(var, v);
        }
    }
    env
}

/// Starts `ril` with a container's args as the kubelet would (expanded, its environment),
/// changing only what differs here: the config's path, and the listen addresses (port 0 on
/// loopback, reported through address files). Returns the role and where it listens.
pub(crate) fn start_as_manifest(
    sb: &Sandbox,
    w: Workload<'_>,
    config: &Path,
    pod_name: &str,
    ordinal: &str,
) -> Started {
    let c = w.containers()[0];
    let env = pod_env(c, pod_name, ordinal);
    let probe_port = c["readinessProbe"]["grpc"]["port"].as_u64().unwrap() as u16;
    let addr_file = sb.path(&format!("{pod_name}.addr"));
    let health_file = sb.path(&format!("{pod_name}.health.addr"));
    let metrics_file = sb.path(&format!("{pod_name}.metrics.addr"));
    let mut a: Vec<String> = Vec::new();
    let manifest_args: Vec<String> = args(c).iter().map(|x| expand(x, &env)).collect();
    let mut it = manifest_args.iter();
    let (mut serves, mut probed) = (false, false);
    while let Some(x) = it.next() {
        match x.as_str() {
            "--config" => {
                it.next();
                a.extend(["--config".into(), config.to_string_lossy().into_owned()]);
            }
            "--listen" => {
                it.next();
                serves = true;
                a.extend([
                    x.clone(),
                    "127.0.0.1:0".into(),
                    "--addr-file".into(),
                    addr_file.to_string_lossy().into_owned(),
                ]);
            }
            "--health-listen" => {
                let addr = it.next().unwrap();
                // The probes ask the plaintext health endpoint.
                assert_eq!(port_of(addr), probe_port, "{}: {x} {addr}", w.name());
                probed = true;
                a.extend([
                    x.clone(),
                    "127.0.0.1:0".into(),
                    "--health-addr-file".into(),
                    health_file.to_string_lossy().into_owned(),
                ]);
            }
            "--metrics-listen" => {
                it.next();
                a.extend([
                    x.clone(),
                    "127.0.0.1:0".into(),
                    "--metrics-addr-file".into(),
                    metrics_file.to_string_lossy().into_owned(),
                ]);
            }
            "--collective-listen" => {
                it.next();
                a.extend([x.clone(), "127.0.0.1:0".into()]);
            }
            _ => a.push(x.clone()),
        }
    }
    assert!(probed, "{}: nothing to probe", w.name());
    assert!(
        !a.iter().any(|x| x.contains("$(")),
        "{}: unexpanded {a:?}",
        w.name()
    );
    let log = sb.path(&format!("{pod_name}.log"));
    let mut cmd = Command::new(ril_binary());
    cmd.args(&a)
        .current_dir(sb.dir.path())
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    for (k, v) in &env {
        cmd.env(k, v);
    }
    cmd.env("CANDLE_NUM_THREADS", "1");
    let child = cmd.spawn().unwrap();
    let mut role = Role {
        name: pod_name.to_string(),
        child,
        log,
    };
    let mut wait_for = |file: &Path| {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(s) = std::fs::read_to_string(file)
                && !s.trim().is_empty()
            {
                return s.trim().to_string();
            }
            if let Some(st) = role.child.try_wait().unwrap() {
                panic!("{pod_name} exited ({st}): {}", role.log());
            }
            assert!(Instant::now() < deadline, "{pod_name} never listened");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let grpc = serves.then(|| wait_for(&addr_file));
    let health = wait_for(&health_file);
    let metrics = wait_for(&metrics_file);
    Started {
        role,
        grpc,
        health,
        metrics,
        probe: c["readinessProbe"].clone(),
    }
}

/// A role started as its manifest starts it: the process, its TLS gRPC address (servers), its
/// plaintext health address (what the probes ask) and its readiness probe.
pub(crate) struct Started {
    pub(crate) role: Role,
    pub(crate) grpc: Option<String>,
    pub(crate) health: String,
    /// Its Prometheus metrics endpoint (`--metrics-listen`).
    pub(crate) metrics: String,
    pub(crate) probe: Value,
}

/// The kubelet's gRPC probe: grpc.health.v1 Check for the probe's service ("" when unset),
/// plaintext, no credentials, within the probe's timeout; success is SERVING only.
pub(crate) async fn kubelet_probe(
    addr: &str,
    probe: &Value,
) -> Option<ril_proto::server::ServingStatus> {
    let service = probe["grpc"]["service"].as_str().unwrap_or("");
    let timeout = Duration::from_secs(probe["timeoutSeconds"].as_u64().unwrap_or(1));
    ril_proto::client::health_check(addr, service, timeout, &Default::default())
        .await
        .ok()
}

pub(crate) async fn probe_until_serving(role: &mut Role, addr: &str, probe: &Value) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if kubelet_probe(addr, probe).await == Some(ril_proto::server::ServingStatus::Serving) {
            return;
        }
        if let Some(st) = role.child.try_wait().unwrap() {
            panic!("{} exited ({st}) before SERVING: {}", role.name, role.log());
        }
        assert!(
            Instant::now() < deadline,
            "{} was not SERVING within 120 s: {}",
            role.name,
            role.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub(crate) fn tree(dir: &Path) -> BTreeMap<PathBuf, u64> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let len = path.metadata().unwrap().len();
                out.insert(path.strip_prefix(dir).unwrap().to_path_buf(), len);
            }
        }
    }
    out
}
