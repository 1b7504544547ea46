//! The Kubernetes deployment (`deploy/k8s`) as objects: every kustomization rendered with
//! `kubectl kustomize` (offline) into JSON objects, and the questions the deployment tests ask
//! of them (the workload running a role, a container's command line and ports, the run config
//! in its ConfigMap, the workload behind a Service's port). [`network_policy`] is what
//! Kubernetes lets through.

pub mod network_policy;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::stderr;

/// The repository's root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the repository")
        .to_path_buf()
}

pub fn kubectl_present() -> bool {
    Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Every kustomization under deploy/k8s, as `overlays/local`-style names.
pub fn kustomizations() -> Vec<String> {
    pub fn walk(dir: &Path, root: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, root, out);
            } else if path.file_name().is_some_and(|n| n == "kustomization.yaml")
                // A Component is not deployed alone: the overlays that use it are rendered.
                && !std::fs::read_to_string(&path).unwrap().contains("\nkind: Component")
            {
                let rel = path.parent().unwrap().strip_prefix(root).unwrap();
                out.push(rel.to_string_lossy().into_owned());
            }
        }
    }
    let root = repo().join("deploy/k8s");
    let mut out = Vec::new();
    walk(&root, &root, &mut out);
    out.sort();
    for required in ["base", "overlays/local", "overlays/gpu"] {
        assert!(
            out.iter().any(|k| k == required),
            "deploy/k8s/{required} is missing"
        );
    }
    out
}

/// The rendered objects of one kustomization.
pub struct Rendering {
    pub name: String,
    pub objects: Vec<Value>,
}

fn run_piped(cmd: &mut Command, input: &[u8]) -> std::process::Output {
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl runs");
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    out
}

pub fn render(name: &str) -> Rendering {
    let dir = repo().join("deploy/k8s").join(name);
    let yaml = Command::new("kubectl")
        .arg("kustomize")
        .arg(&dir)
        .output()
        .expect("kubectl runs");
    assert!(
        yaml.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        stderr(&yaml)
    );
    // YAML to JSON without a YAML parser: kubectl's client-side no-op patch prints each object
    // as JSON (offline: `--local` talks to no API server).
    let json = run_piped(
        Command::new("kubectl").args([
            "patch", "--local", "--type", "merge", "-p", "{}", "-o", "json", "-f", "-",
        ]),
        &yaml.stdout,
    );
    assert!(
        json.status.success(),
        "converting {name} to JSON: {}",
        stderr(&json)
    );
    let objects: Vec<Value> = serde_json::Deserializer::from_slice(&json.stdout)
        .into_iter::<Value>()
        .collect::<Result<_, _>>()
        .unwrap();
    let documents = String::from_utf8_lossy(&yaml.stdout)
        .lines()
        .filter(|l| l.starts_with("kind:"))
        .count();
    assert_eq!(
        objects.len(),
        documents,
        "{name}: objects lost in conversion"
    );
    Rendering {
        name: name.to_string(),
        objects,
    }
}

pub fn all_renderings() -> Vec<Rendering> {
    kustomizations().iter().map(|k| render(k)).collect()
}

pub fn kind(o: &Value) -> &str {
    o["kind"].as_str().unwrap_or("")
}

pub fn name(o: &Value) -> &str {
    o["metadata"]["name"].as_str().unwrap_or("")
}

pub fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

pub fn labels(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

impl Rendering {
    pub fn of_kind<'a>(&'a self, k: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
        self.objects.iter().filter(move |o| kind(o) == k)
    }

    pub fn get<'a>(&'a self, k: &'a str, n: &str) -> &'a Value {
        self.of_kind(k)
            .find(|o| name(o) == n)
            .unwrap_or_else(|| panic!("{}: no {k} {n}", self.name))
    }

    pub fn workloads(&self) -> Vec<Workload<'_>> {
        self.objects
            .iter()
            .filter(|o| matches!(kind(o), "Deployment" | "StatefulSet" | "DaemonSet" | "Job"))
            .map(|o| Workload { object: o })
            .collect()
    }

    /// The one workload whose containers run `ril <role>`.
    pub fn workload_running(&self, role: &str) -> Workload<'_> {
        let found: Vec<_> = self
            .workloads()
            .into_iter()
            .filter(|w| w.containers().iter().any(|c| subcommand(c) == role))
            .collect();
        assert_eq!(
            found.len(),
            1,
            "{}: expected one workload running `ril {role}`, found {}",
            self.name,
            found.len()
        );
        found.into_iter().next().unwrap()
    }

    /// The run config: the ConfigMap generated from run.toml, and its parsed TOML.
    pub fn run_config(&self) -> (String, toml::Table) {
        let maps: Vec<_> = self
            .of_kind("ConfigMap")
            .filter(|c| name(c).starts_with("ril-run-config"))
            .collect();
        assert_eq!(maps.len(), 1, "{}: one ril-run-config ConfigMap", self.name);
        let text = maps[0]["data"]["run.toml"]
            .as_str()
            .unwrap_or_else(|| panic!("{}: ril-run-config has no run.toml", self.name))
            .to_string();
        let table = text
            .parse::<toml::Table>()
            .unwrap_or_else(|e| panic!("{}: run.toml: {e}", self.name));
        (text, table)
    }
}

#[derive(Clone, Copy)]
pub struct Workload<'a> {
    pub object: &'a Value,
}

impl<'a> Workload<'a> {
    pub fn name(&self) -> &'a str {
        name(self.object)
    }
    pub fn kind(&self) -> &'a str {
        kind(self.object)
    }
    pub fn pod(&self) -> &'a Value {
        &self.object["spec"]["template"]["spec"]
    }
    pub fn pod_labels(&self) -> BTreeMap<String, String> {
        labels(&self.object["spec"]["template"]["metadata"]["labels"])
    }
    pub fn containers(&self) -> Vec<&'a Value> {
        self.pod()["containers"]
            .as_array()
            .map(|a| a.iter().collect())
            .unwrap_or_default()
    }
    pub fn init_containers(&self) -> Vec<&'a Value> {
        self.pod()["initContainers"]
            .as_array()
            .map(|a| a.iter().collect())
            .unwrap_or_default()
    }
    pub fn volume(&self, volume: &str) -> &'a Value {
        self.pod()["volumes"]
            .as_array()
            .and_then(|a| a.iter().find(|v| v["name"] == volume))
            .unwrap_or_else(|| panic!("{}: no volume {volume}", self.name()))
    }
}

pub fn args(c: &Value) -> Vec<String> {
    strs(&c["args"])
}

/// `ril`'s subcommand words (`discriminator serve`, `data synth`, `coordinator`).
pub fn subcommand(c: &Value) -> String {
    args(c)
        .iter()
        .take_while(|a| !a.starts_with('-'))
        .cloned()
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

pub fn port_of(addr: &str) -> u16 {
    addr.rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("{addr:?} has no port"))
}

pub fn host_of(addr: &str) -> &str {
    addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(addr)
}

/// The port a container answers the kubelet's probes on: its plaintext grpc.health.v1
/// endpoint (`--health-listen`). The kubelet's gRPC probe speaks no TLS, and every role's own
/// gRPC port (`--listen`) is TLS-only.
pub fn health_port(c: &Value) -> Option<u16> {
    flag(&args(c), "--health-listen").map(|addr| port_of(&addr))
}

/// The port a container serves its role's RPCs on (`--listen`, TLS); for the actor, which
/// serves none, its health endpoint.
pub fn serving_port(c: &Value) -> Option<u16> {
    flag(&args(c), "--listen")
        .map(|addr| port_of(&addr))
        .or_else(|| health_port(c))
}

pub fn env_value<'a>(c: &'a Value, var: &str) -> Option<&'a Value> {
    c["env"]
        .as_array()
        .and_then(|e| e.iter().find(|v| v["name"] == var))
}

/// SHUTDOWN_GRACE in cli/src/roles.rs: how long a role may drain after SIGTERM.
pub fn shutdown_grace_s() -> u64 {
    let src = std::fs::read_to_string(repo().join("cli/src/roles.rs")).unwrap();
    let line = src
        .lines()
        .find(|l| l.contains("const SHUTDOWN_GRACE: Duration"))
        .expect("SHUTDOWN_GRACE in cli/src/roles.rs");
    let inner = line
        .split("from_secs(")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .expect("SHUTDOWN_GRACE = Duration::from_secs(N)");
    inner.parse().unwrap()
}

pub fn config_str<'a>(t: &'a toml::Table, section: &str, key: &str) -> Option<&'a str> {
    t.get(section)?.get(key)?.as_str()
}

pub fn learner_world_size(t: &toml::Table) -> i64 {
    t.get("learner")
        .and_then(|l| l.get("world_size"))
        .and_then(|w| w.as_integer())
        .unwrap_or(1)
}

/// The port a Service's port forwards to on the pods it selects.
pub fn service_target<'a>(r: &'a Rendering, host: &str, port: u16) -> (Workload<'a>, u16) {
    let service = r.get("Service", host);
    let sp = service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["port"].as_u64() == Some(u64::from(port)))
        .unwrap_or_else(|| panic!("{}: Service {host} has no port {port}", r.name));
    let selector = labels(&service["spec"]["selector"]);
    let selected: Vec<_> = r
        .workloads()
        .into_iter()
        .filter(|w| {
            let l = w.pod_labels();
            selector.iter().all(|(k, v)| l.get(k) == Some(v))
        })
        .collect();
    assert_eq!(
        selected.len(),
        1,
        "{}: Service {host} selects {} workloads",
        r.name,
        selected.len()
    );
    let w = selected[0];
    let target = match &sp["targetPort"] {
        Value::Number(n) => n.as_u64().unwrap() as u16,
        Value::String(named) => w.containers()[0]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == named.as_str())
            .and_then(|p| p["containerPort"].as_u64())
            .unwrap_or_else(|| panic!("{}: no container port named {named}", r.name))
            as u16,
        _ => port,
    };
    (w, target)
}
