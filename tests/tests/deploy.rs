//! The Kubernetes deployment (`deploy/k8s`) as a cluster would run it. Every kustomization is
//! rendered with `kubectl kustomize` (offline) and its objects checked for what a cluster needs
//! and `kubectl apply` does not check: gRPC probes on the ports the roles really serve,
//! resources, the run config that `ril config check` accepts, addresses that match the
//! Services, NetworkPolicies that let exactly the talking roles talk, no secrets in ConfigMaps.
//! Then real roles are started with the manifests' own command lines and probed the way the
//! kubelet probes them. Strict schema validation (`kubernetes-validate --strict`) runs in
//! `deploy/check.sh`, which CI runs.
//!
//! The tests need `kubectl` (CI's machine image has it); without it they say so and pass.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ril_tests::{Sandbox, ril_binary, stderr, stdout};
use serde_json::Value;

// ---------------------------------------------------------------------------------------------
// Rendering

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the repository")
        .to_path_buf()
}

fn kubectl_present() -> bool {
    Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Skips (passing, with a message) when kubectl is absent: it renders the manifests.
macro_rules! need_kubectl {
    () => {
        if !kubectl_present() {
            eprintln!(
                "SKIPPED: kubectl is not on PATH (it renders deploy/k8s; CI's machine image has it)"
            );
            return;
        }
    };
}

/// Every kustomization under deploy/k8s, as `overlays/local`-style names.
fn kustomizations() -> Vec<String> {
    fn walk(dir: &Path, root: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, root, out);
            } else if path.file_name().is_some_and(|n| n == "kustomization.yaml") {
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
struct Rendering {
    name: String,
    objects: Vec<Value>,
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

fn render(name: &str) -> Rendering {
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

fn all_renderings() -> Vec<Rendering> {
    kustomizations().iter().map(|k| render(k)).collect()
}

fn kind(o: &Value) -> &str {
    o["kind"].as_str().unwrap_or("")
}

fn name(o: &Value) -> &str {
    o["metadata"]["name"].as_str().unwrap_or("")
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn labels(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

impl Rendering {
    fn of_kind<'a>(&'a self, k: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
        self.objects.iter().filter(move |o| kind(o) == k)
    }

    fn get<'a>(&'a self, k: &'a str, n: &str) -> &'a Value {
        self.of_kind(k)
            .find(|o| name(o) == n)
            .unwrap_or_else(|| panic!("{}: no {k} {n}", self.name))
    }

    fn workloads(&self) -> Vec<Workload<'_>> {
        self.objects
            .iter()
            .filter(|o| matches!(kind(o), "Deployment" | "StatefulSet" | "DaemonSet" | "Job"))
            .map(|o| Workload { object: o })
            .collect()
    }

    /// The one workload whose containers run `ril <role>`.
    fn workload_running(&self, role: &str) -> Workload<'_> {
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
    fn run_config(&self) -> (String, toml::Table) {
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
struct Workload<'a> {
    object: &'a Value,
}

impl<'a> Workload<'a> {
    fn name(&self) -> &'a str {
        name(self.object)
    }
    fn kind(&self) -> &'a str {
        kind(self.object)
    }
    fn pod(&self) -> &'a Value {
        &self.object["spec"]["template"]["spec"]
    }
    fn pod_labels(&self) -> BTreeMap<String, String> {
        labels(&self.object["spec"]["template"]["metadata"]["labels"])
    }
    fn containers(&self) -> Vec<&'a Value> {
        self.pod()["containers"]
            .as_array()
            .map(|a| a.iter().collect())
            .unwrap_or_default()
    }
    fn init_containers(&self) -> Vec<&'a Value> {
        self.pod()["initContainers"]
            .as_array()
            .map(|a| a.iter().collect())
            .unwrap_or_default()
    }
    fn volume(&self, volume: &str) -> &'a Value {
        self.pod()["volumes"]
            .as_array()
            .and_then(|a| a.iter().find(|v| v["name"] == volume))
            .unwrap_or_else(|| panic!("{}: no volume {volume}", self.name()))
    }
}

fn args(c: &Value) -> Vec<String> {
    strs(&c["args"])
}

/// `ril`'s subcommand words (`discriminator serve`, `data synth`, `coordinator`).
fn subcommand(c: &Value) -> String {
    args(c)
        .iter()
        .take_while(|a| !a.starts_with('-'))
        .cloned()
        .collect::<Vec<_>>()
        .join(" ")
}

fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("{addr:?} has no port"))
}

fn host_of(addr: &str) -> &str {
    addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(addr)
}

/// The port a container answers the kubelet's probes on: its plaintext grpc.health.v1
/// endpoint (`--health-listen`). The kubelet's gRPC probe speaks no TLS, and every role's own
/// gRPC port (`--listen`) is TLS-only.
fn health_port(c: &Value) -> Option<u16> {
    flag(&args(c), "--health-listen").map(|addr| port_of(&addr))
}

/// The port a container serves its role's RPCs on (`--listen`, TLS); for the actor, which
/// serves none, its health endpoint.
fn serving_port(c: &Value) -> Option<u16> {
    flag(&args(c), "--listen")
        .map(|addr| port_of(&addr))
        .or_else(|| health_port(c))
}

fn env_value<'a>(c: &'a Value, var: &str) -> Option<&'a Value> {
    c["env"]
        .as_array()
        .and_then(|e| e.iter().find(|v| v["name"] == var))
}

/// SHUTDOWN_GRACE in cli/src/roles.rs: how long a role may drain after SIGTERM.
fn shutdown_grace_s() -> u64 {
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

fn config_str<'a>(t: &'a toml::Table, section: &str, key: &str) -> Option<&'a str> {
    t.get(section)?.get(key)?.as_str()
}

fn learner_world_size(t: &toml::Table) -> i64 {
    t.get("learner")
        .and_then(|l| l.get("world_size"))
        .and_then(|w| w.as_integer())
        .unwrap_or(1)
}

// ---------------------------------------------------------------------------------------------
// What every container must have

#[test]
fn every_container_has_grpc_probes_on_the_port_its_role_serves_and_resources() {
    need_kubectl!();
    let grace = shutdown_grace_s();
    for r in all_renderings() {
        let workloads = r.workloads();
        assert!(!workloads.is_empty(), "{}: no workloads", r.name);
        for w in &workloads {
            let pod = w.pod();
            let at = format!("{}: {} {}", r.name, w.kind(), w.name());
            assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{at}");
            assert_eq!(pod["automountServiceAccountToken"], false, "{at}");
            // The roles drain for up to SHUTDOWN_GRACE after SIGTERM, then save state and exit.
            let termination = pod["terminationGracePeriodSeconds"]
                .as_u64()
                .unwrap_or_else(|| panic!("{at}: terminationGracePeriodSeconds unset"));
            assert!(
                termination >= grace + 5,
                "{at}: terminationGracePeriodSeconds {termination} < ril's {grace} s grace + 5"
            );
            for c in w.containers() {
                let cat = format!("{at} container {}", c["name"]);
                let port = health_port(c).unwrap_or_else(|| {
                    panic!("{cat}: no plaintext health endpoint for the probes (--health-listen)")
                });
                let declared: Vec<u64> = c["ports"]
                    .as_array()
                    .map(|p| {
                        p.iter()
                            .filter_map(|p| p["containerPort"].as_u64())
                            .collect()
                    })
                    .unwrap_or_default();
                assert!(
                    declared.contains(&u64::from(port)),
                    "{cat}: port {port} not declared"
                );
                // A server's gRPC port is declared too, and is not the health port.
                if let Some(listen) = flag(&args(c), "--listen") {
                    let grpc = port_of(&listen);
                    assert_ne!(grpc, port, "{cat}: the TLS port cannot be the probes' port");
                    assert!(
                        declared.contains(&u64::from(grpc)),
                        "{cat}: port {grpc} not declared"
                    );
                }
                for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
                    let p = &c[probe];
                    assert!(p.is_object(), "{cat}: no {probe}");
                    assert_eq!(
                        p["grpc"]["port"].as_u64(),
                        Some(u64::from(port)),
                        "{cat}: {probe} must be a grpc probe on {port}: {p}"
                    );
                    for other in ["httpGet", "tcpSocket", "exec"] {
                        assert!(p[other].is_null(), "{cat}: {probe} has {other}");
                    }
                    // The server as a whole ("" service), which every role reports.
                    let service = p["grpc"]["service"].as_str().unwrap_or("");
                    assert_eq!(service, "", "{cat}: {probe} asks for service {service:?}");
                }
                assert_resources(&cat, c);
                assert_eq!(
                    c["securityContext"]["readOnlyRootFilesystem"], true,
                    "{cat}"
                );
                assert_eq!(
                    c["securityContext"]["allowPrivilegeEscalation"], false,
                    "{cat}"
                );
            }
            for c in w.init_containers() {
                let cat = format!("{at} init container {}", c["name"]);
                assert_resources(&cat, c);
                assert_eq!(
                    c["securityContext"]["readOnlyRootFilesystem"], true,
                    "{cat}"
                );
            }
        }
    }
}

fn assert_resources(at: &str, c: &Value) {
    for side in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            assert!(
                !c["resources"][side][resource].is_null(),
                "{at}: no resources.{side}.{resource}"
            );
        }
    }
    // An extended resource (GPUs) is requested exactly as limited.
    if let Some(limits) = c["resources"]["limits"].as_object() {
        for (k, v) in limits {
            if k.contains('/') {
                assert_eq!(&c["resources"]["requests"][k], v, "{at}: {k}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The shape: actors apart from the learner ranks

#[test]
fn actors_are_their_own_deployment_apart_from_the_learner_statefulset() {
    need_kubectl!();
    for r in all_renderings() {
        let (_, config) = r.run_config();
        let actor = r.workload_running("actor");
        let learner = r.workload_running("learner");
        let at = &r.name;
        assert_eq!(
            (actor.kind(), actor.name()),
            ("Deployment", "ril-actor"),
            "{at}"
        );
        assert_eq!(
            (learner.kind(), learner.name()),
            ("StatefulSet", "ril-learner"),
            "{at}"
        );
        // Neither selects the other's pods, and nothing else runs in their pods.
        let actor_selector = labels(&actor.object["spec"]["selector"]["matchLabels"]);
        let learner_selector = labels(&learner.object["spec"]["selector"]["matchLabels"]);
        let selects = |sel: &BTreeMap<String, String>, l: &BTreeMap<String, String>| {
            sel.iter().all(|(k, v)| l.get(k) == Some(v))
        };
        assert!(selects(&actor_selector, &actor.pod_labels()), "{at}");
        assert!(!selects(&actor_selector, &learner.pod_labels()), "{at}");
        assert!(!selects(&learner_selector, &actor.pod_labels()), "{at}");
        assert_eq!(actor.containers().len(), 1, "{at}");
        assert_eq!(learner.containers().len(), 1, "{at}");
        // An autoscaler, if any, scales the actors and nothing else.
        for hpa in r.of_kind("HorizontalPodAutoscaler") {
            let target = &hpa["spec"]["scaleTargetRef"];
            assert_eq!(
                (target["kind"].as_str(), target["name"].as_str()),
                (Some("Deployment"), Some("ril-actor")),
                "{at}"
            );
        }

        // Learner ranks: the world size is the replica count; the rank is the pod's ordinal.
        let spec = &learner.object["spec"];
        assert_eq!(
            spec["replicas"].as_i64().unwrap_or(1),
            learner_world_size(&config),
            "{at}: the learner StatefulSet's replicas must equal [learner] world_size"
        );
        assert_eq!(
            spec["podManagementPolicy"], "Parallel",
            "{at}: rank 0 is ready only once every rank has joined"
        );
        let service_name = spec["serviceName"].as_str().unwrap();
        let service = r.get("Service", service_name);
        assert_eq!(service["spec"]["clusterIP"], "None", "{at}: headless");
        assert_eq!(
            service["spec"]["publishNotReadyAddresses"], true,
            "{at}: ranks must resolve each other before they are ready"
        );
        assert!(selects(
            &labels(&service["spec"]["selector"]),
            &learner.pod_labels()
        ));
        let c = learner.containers()[0];
        let a = args(c);
        let listen = port_of(&flag(&a, "--listen").unwrap());
        let rank = flag(&a, "--rank").expect("--rank");
        let rank_var = rank
            .strip_prefix("$(")
            .and_then(|v| v.strip_suffix(')'))
            .unwrap_or_else(|| panic!("{at}: --rank {rank} is not the pod's ordinal"));
        assert_eq!(
            env_value(c, rank_var).unwrap()["valueFrom"]["fieldRef"]["fieldPath"],
            "metadata.labels['apps.kubernetes.io/pod-index']",
            "{at}"
        );
        let advertise = flag(&a, "--advertise").expect("--advertise");
        let (pod_var, rest) = advertise
            .strip_prefix("$(")
            .and_then(|s| s.split_once(')'))
            .expect("--advertise $(POD_NAME).SERVICE:PORT");
        assert_eq!(
            env_value(c, pod_var).unwrap()["valueFrom"]["fieldRef"]["fieldPath"],
            "metadata.name",
            "{at}"
        );
        assert_eq!(
            rest,
            format!(".{service_name}:{listen}"),
            "{at}: --advertise"
        );
        // The collective listens where the config and the Service say.
        let collective = port_of(&flag(&a, "--collective-listen").unwrap());
        if let Some(cfg) = config_str(&config, "learner", "collective_listen") {
            assert_eq!(port_of(cfg), collective, "{at}");
        }
        let service_ports: Vec<u64> = service["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|p| p["port"].as_u64())
            .collect();
        assert!(service_ports.contains(&u64::from(collective)), "{at}");
        assert!(service_ports.contains(&u64::from(listen)), "{at}");
        // One checkpoint volume for every rank (rank 0 writes, all resume from it), not one
        // per rank; shared across nodes when there are several ranks.
        assert!(spec["volumeClaimTemplates"].is_null(), "{at}");
        let claim = learner.volume("checkpoints")["persistentVolumeClaim"]["claimName"]
            .as_str()
            .expect("the checkpoints volume is a PersistentVolumeClaim");
        let pvc = r.get("PersistentVolumeClaim", claim);
        if learner_world_size(&config) > 1 {
            assert!(
                strs(&pvc["spec"]["accessModes"]).contains(&"ReadWriteMany".to_string()),
                "{at}: several ranks on several nodes share the checkpoints"
            );
        }
        if config_str(&config, "learner", "collective") == Some("nccl") {
            assert!(
                !c["resources"]["limits"]["nvidia.com/gpu"].is_null(),
                "{at}: NCCL ranks need GPUs"
            );
        }
    }
    // The gpu overlay is the NCCL one.
    let gpu = render("overlays/gpu");
    let (_, config) = gpu.run_config();
    assert_eq!(config_str(&config, "learner", "collective"), Some("nccl"));
    assert!(learner_world_size(&config) > 1);
    for role in ["learner", "actor", "discriminator serve"] {
        let w = gpu.workload_running(role);
        assert_eq!(
            w.containers()[0]["resources"]["limits"]["nvidia.com/gpu"],
            1,
            "{role}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Addresses, volumes, secrets

/// The port a Service's port forwards to on the pods it selects.
fn service_target<'a>(r: &'a Rendering, host: &str, port: u16) -> (Workload<'a>, u16) {
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

#[test]
fn the_run_config_s_addresses_are_services_of_the_roles_listening_there() {
    need_kubectl!();
    for r in all_renderings() {
        let (_, config) = r.run_config();
        let network = config["network"].as_table().expect("[network]");
        let mut expect = vec![
            (
                "coordinator".to_string(),
                network["coordinator"].as_str().unwrap().to_string(),
            ),
            (
                "discriminator serve".to_string(),
                network["discriminator"].as_str().unwrap().to_string(),
            ),
        ];
        let teachers = network["teachers"].as_table().expect("[network] teachers");
        let configured: BTreeSet<String> = config
            .get("teachers")
            .and_then(|t| t.as_array())
            .map(|a| {
                a.iter()
                    .map(|t| t["name"].as_str().unwrap().to_string())
                    .collect()
            })
            .unwrap_or_default();
        assert_eq!(
            teachers.keys().cloned().collect::<BTreeSet<_>>(),
            configured,
            "{}: every teacher has an address",
            r.name
        );
        for (teacher, addr) in teachers {
            expect.push((
                format!("teacher {teacher}"),
                addr.as_str().unwrap().to_string(),
            ));
        }
        for (role, addr) in expect {
            let (w, target) = service_target(&r, host_of(&addr), port_of(&addr));
            let c = w.containers()[0];
            let at = format!("{}: {addr} ({role})", r.name);
            assert!(subcommand(c) == role || role.starts_with("teacher"), "{at}");
            if let Some(teacher) = role.strip_prefix("teacher ") {
                assert_eq!(subcommand(c), "teacher", "{at}");
                assert_eq!(flag(&args(c), "--name").as_deref(), Some(teacher), "{at}");
            }
            assert_eq!(
                serving_port(c),
                Some(target),
                "{at}: the role listens elsewhere"
            );
        }
        // Every workload reads the config the ConfigMap holds, where --config says.
        for w in r.workloads() {
            for c in w.containers() {
                let a = args(c);
                let Some(path) = flag(&a, "--config") else {
                    continue;
                };
                let path = Path::new(&path);
                let mount = c["volumeMounts"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|m| Some(Path::new(m["mountPath"].as_str().unwrap())) == path.parent())
                    .unwrap_or_else(|| {
                        panic!(
                            "{}: {}: nothing mounted at {path:?}'s directory",
                            r.name,
                            w.name()
                        )
                    });
                let volume = w.volume(mount["name"].as_str().unwrap());
                let map = volume["configMap"]["name"].as_str().unwrap();
                let cm = r.get("ConfigMap", map);
                assert!(
                    cm["data"][path.file_name().unwrap().to_str().unwrap()].is_string(),
                    "{}: {}",
                    r.name,
                    w.name()
                );
            }
        }
    }
}

/// With a read-only root filesystem, every path a role writes must be a writable volume.
#[test]
fn every_path_a_role_writes_is_a_writable_volume_and_what_it_reads_is_mounted() {
    need_kubectl!();
    for r in all_renderings() {
        let (_, config) = r.run_config();
        let run_dir = PathBuf::from(config_str(&config, "run", "dir").unwrap());
        let data = PathBuf::from(config_str(&config, "data", "path").unwrap());
        let student = PathBuf::from(config_str(&config, "student", "checkpoint").unwrap());
        for w in r.workloads() {
            let c = w.containers()[0];
            let role = subcommand(c);
            let mut writes = vec![PathBuf::from("/tmp")];
            let mut reads = vec![data.clone(), student.clone()];
            match role.as_str() {
                "coordinator" => writes.push(run_dir.join("coordinator")),
                "learner" => writes.push(run_dir.join("learner")),
                "discriminator serve" => writes.push(run_dir.join("discriminator")),
                "teacher" => {
                    writes.push(run_dir.join("teachers"));
                    let teacher = flag(&args(c), "--name").unwrap();
                    let entry = config["teachers"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .find(|t| t["name"].as_str() == Some(&teacher))
                        .unwrap();
                    if let Some(ckpt) = entry.get("checkpoint").and_then(|c| c.as_str()) {
                        reads.push(PathBuf::from(ckpt));
                    }
                }
                "actor" => {}
                other => panic!("{}: unexpected role {other}", r.name),
            }
            let mounts: Vec<(PathBuf, bool)> = c["volumeMounts"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| {
                    (
                        PathBuf::from(m["mountPath"].as_str().unwrap()),
                        m["readOnly"].as_bool().unwrap_or(false),
                    )
                })
                .collect();
            let mounted = |p: &Path, writable: bool| {
                mounts
                    .iter()
                    .any(|(m, ro)| p.starts_with(m) && (!writable || !ro))
            };
            for p in &writes {
                assert!(
                    mounted(p, true),
                    "{}: {} writes {} but no writable volume is mounted there",
                    r.name,
                    w.name(),
                    p.display()
                );
            }
            for p in &reads {
                assert!(
                    mounted(p, false),
                    "{}: {} reads {} from no volume",
                    r.name,
                    w.name(),
                    p.display()
                );
            }
        }
    }
}

#[test]
fn api_keys_come_from_secrets_never_from_config_maps() {
    need_kubectl!();
    let secretish = |n: &str| {
        let n = n.to_ascii_uppercase();
        ["KEY", "TOKEN", "SECRET", "PASSWORD"]
            .iter()
            .any(|s| n.contains(s))
    };
    let mut checked_key_vars = 0;
    for r in all_renderings() {
        // Keys are created out of band (`kubectl create secret`), never rendered from git.
        assert_eq!(
            r.of_kind("Secret").count(),
            0,
            "{}: a Secret with its values in the repository",
            r.name
        );
        for cm in r.of_kind("ConfigMap") {
            for (k, v) in cm["data"].as_object().into_iter().flatten() {
                let text = v.as_str().unwrap_or("");
                for line in text.lines() {
                    let line = line.trim_start();
                    assert!(
                        !(line.starts_with("api_key ") || line.starts_with("api_key=")),
                        "{}: ConfigMap {} key {k} holds an API key: {line}",
                        r.name,
                        name(cm)
                    );
                    assert!(
                        !line.contains("Bearer ") && !line.contains("sk-"),
                        "{}: ConfigMap {} key {k}: {line}",
                        r.name,
                        name(cm)
                    );
                }
            }
        }
        let (_, config) = r.run_config();
        for w in r.workloads() {
            for c in w.containers().into_iter().chain(w.init_containers()) {
                for e in c["env"].as_array().into_iter().flatten() {
                    let var = e["name"].as_str().unwrap();
                    if secretish(var) {
                        assert!(
                            e["value"].is_null() && e["valueFrom"]["secretKeyRef"].is_object(),
                            "{}: {} sets {var} other than from a Secret",
                            r.name,
                            w.name()
                        );
                    }
                }
                // Each variable ril is told to read a key from is filled from a Secret.
                let a = args(c);
                let mut key_vars = Vec::new();
                if let Some(v) = flag(&a, "--judge-api-key-env") {
                    key_vars.push(v);
                }
                if subcommand(c) == "teacher" {
                    let teacher = flag(&a, "--name").unwrap();
                    let entry = config["teachers"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .find(|t| t["name"].as_str() == Some(&teacher))
                        .unwrap();
                    if let Some(v) = entry.get("api_key_env").and_then(|v| v.as_str()) {
                        key_vars.push(v.to_string());
                    }
                }
                for var in key_vars {
                    let e = env_value(c, &var).unwrap_or_else(|| {
                        panic!(
                            "{}: {} reads its key from {var}, which it lacks",
                            r.name,
                            w.name()
                        )
                    });
                    assert!(e["valueFrom"]["secretKeyRef"]["name"].is_string());
                    checked_key_vars += 1;
                }
            }
        }
    }
    assert!(
        checked_key_vars >= 2,
        "the vLLM example's teacher and judge keys come from the Secret"
    );
}

// ---------------------------------------------------------------------------------------------
// NetworkPolicies

struct Pod {
    role: String,
    labels: BTreeMap<String, String>,
}

fn selector_matches(sel: &Value, l: &BTreeMap<String, String>) -> bool {
    let by_labels = labels(&sel["matchLabels"])
        .iter()
        .all(|(k, v)| l.get(k) == Some(v));
    let by_expressions = sel["matchExpressions"]
        .as_array()
        .into_iter()
        .flatten()
        .all(|e| {
            let key = e["key"].as_str().unwrap();
            let values = strs(&e["values"]);
            match e["operator"].as_str().unwrap() {
                "In" => l.get(key).is_some_and(|v| values.contains(v)),
                "NotIn" => !l.get(key).is_some_and(|v| values.contains(v)),
                "Exists" => l.contains_key(key),
                "DoesNotExist" => !l.contains_key(key),
                other => panic!("operator {other}"),
            }
        });
    by_labels && by_expressions
}

/// Whether `peers` (a rule's `from` or `to`) includes a pod of this namespace.
fn peers_include(peers: &Value, pod: &Pod) -> bool {
    match peers.as_array() {
        None => true,
        Some(list) if list.is_empty() => true,
        Some(list) => list.iter().any(|p| {
            // Peers in other namespaces or IP blocks are never ril's own pods.
            p["namespaceSelector"].is_null()
                && p["ipBlock"].is_null()
                && selector_matches(&p["podSelector"], &pod.labels)
        }),
    }
}

fn ports_include(ports: &Value, port: u16) -> bool {
    match ports.as_array() {
        None => true,
        Some(list) if list.is_empty() => true,
        Some(list) => list.iter().any(|p| {
            p["protocol"].as_str().unwrap_or("TCP") == "TCP"
                && p["port"].as_u64() == Some(u64::from(port))
        }),
    }
}

fn policy_types(policy: &Value) -> Vec<String> {
    let t = strs(&policy["spec"]["policyTypes"]);
    if !t.is_empty() {
        return t;
    }
    let mut t = vec!["Ingress".to_string()];
    if policy["spec"]["egress"].is_array() {
        t.push("Egress".into());
    }
    t
}

/// Kubernetes' semantics: a connection needs the source's egress and the destination's
/// ingress; a pod no policy of a direction selects is open in that direction.
fn allowed(r: &Rendering, from: &Pod, to: &Pod, port: u16) -> bool {
    let direction = |pod: &Pod, ty: &str, rules: &str, peers: &str, other: &Pod| {
        let policies: Vec<_> = r
            .of_kind("NetworkPolicy")
            .filter(|p| selector_matches(&p["spec"]["podSelector"], &pod.labels))
            .filter(|p| policy_types(p).iter().any(|t| t == ty))
            .collect();
        policies.is_empty()
            || policies.iter().any(|p| {
                p["spec"][rules]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|rule| {
                        peers_include(&rule[peers], other) && ports_include(&rule["ports"], port)
                    })
            })
    };
    direction(from, "Egress", "egress", "to", to)
        && direction(to, "Ingress", "ingress", "from", from)
}

#[test]
fn network_policies_let_exactly_the_roles_that_must_talk_talk() {
    need_kubectl!();
    for r in all_renderings() {
        let pods: Vec<Pod> = r
            .workloads()
            .iter()
            .map(|w| Pod {
                role: subcommand(w.containers()[0]),
                labels: w.pod_labels(),
            })
            .collect();
        let port = |role: &str| serving_port(r.workload_running(role).containers()[0]).unwrap();
        let ring = port_of(
            &flag(
                &args(r.workload_running("learner").containers()[0]),
                "--collective-listen",
            )
            .unwrap(),
        );
        let is = |p: &Pod, role: &str| p.role == role;
        let ok = |from: &str, to: &str, port: u16| {
            let mut any = false;
            for a in pods.iter().filter(|p| is(p, from)) {
                for b in pods.iter().filter(|p| is(p, to)) {
                    any = true;
                    assert!(
                        allowed(&r, a, b, port),
                        "{}: {from} must reach {to} on {port}",
                        r.name
                    );
                }
            }
            assert!(any, "{}: no {from} or no {to}", r.name);
        };
        let denied = |from: &str, to: &str, port: u16| {
            for a in pods.iter().filter(|p| is(p, from)) {
                for b in pods.iter().filter(|p| is(p, to)) {
                    assert!(
                        !allowed(&r, a, b, port),
                        "{}: {from} may reach {to} on {port}, which it never needs",
                        r.name
                    );
                }
            }
        };
        let (coordinator, learner, discriminator, teacher, actor) = (
            port("coordinator"),
            port("learner"),
            port("discriminator serve"),
            serving_port(
                r.workloads()
                    .iter()
                    .find(|w| subcommand(w.containers()[0]) == "teacher")
                    .expect("a teacher")
                    .containers()[0],
            )
            .unwrap(),
            port("actor"),
        );
        ok("actor", "coordinator", coordinator);
        ok("actor", "learner", learner);
        ok("actor", "teacher", teacher);
        ok("actor", "discriminator serve", discriminator);
        ok("learner", "coordinator", coordinator);
        ok("learner", "discriminator serve", discriminator);
        ok("learner", "learner", learner);
        ok("learner", "learner", ring);
        ok("learner", "learner", 41_000); // NCCL picks its own ports
        for role in [
            "coordinator",
            "learner",
            "teacher",
            "discriminator serve",
            "actor",
        ] {
            denied(role, "actor", actor);
        }
        denied("teacher", "coordinator", coordinator);
        denied("teacher", "learner", learner);
        denied("teacher", "discriminator serve", discriminator);
        denied("coordinator", "learner", learner);
        denied("coordinator", "teacher", teacher);
        denied("coordinator", "discriminator serve", discriminator);
        denied("discriminator serve", "learner", learner);
        denied("discriminator serve", "coordinator", coordinator);
        denied("actor", "learner", ring);
        denied("actor", "coordinator", learner);
        denied("teacher", "teacher", teacher);
        // The plaintext health ports are for the kubelet, which NetworkPolicies do not cover.
        let health = health_port(r.workload_running("coordinator").containers()[0]).unwrap();
        denied("actor", "coordinator", health);
        denied("learner", "discriminator serve", health);
    }
}

// ---------------------------------------------------------------------------------------------
// The binary accepts what the manifests run

/// Every subcommand and flag a manifest passes exists in this `ril`.
#[test]
fn every_command_line_in_the_manifests_is_one_ril_accepts() {
    need_kubectl!();
    let mut help: BTreeMap<String, String> = BTreeMap::new();
    for r in all_renderings() {
        for w in r.workloads() {
            for c in w.containers().into_iter().chain(w.init_containers()) {
                let sub = subcommand(c);
                let text = help.entry(sub.clone()).or_insert_with(|| {
                    let mut cmd = Command::new(ril_binary());
                    cmd.args(sub.split(' ')).arg("--help");
                    let out = cmd.output().unwrap();
                    assert!(out.status.success(), "ril {sub} --help: {}", stderr(&out));
                    stdout(&out)
                });
                for a in args(c).iter().filter(|a| a.starts_with("--")) {
                    assert!(
                        text.contains(&format!("{a} ")) || text.contains(&format!("{a}\n")),
                        "{}: {}: `ril {sub}` has no flag {a}",
                        r.name,
                        w.name()
                    );
                }
            }
        }
    }
}

/// The local overlay's init containers, run here: they make what its config names.
fn make_assets(sb: &Sandbox, local: &Rendering) -> PathBuf {
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
const SECRETS_MOUNT: &str = "/var/run/secrets/ril";

/// A run config with the pods' paths pointed at `assets`, `run` and `secrets` (a directory
/// laid out as the pods' Secret mounts: `tls/`, `token/`) here.
fn localise(text: &str, assets: &Path, run: &Path, secrets: &Path) -> String {
    text.replace("/var/lib/ril/assets", &assets.to_string_lossy())
        .replace("/var/lib/ril/run", &run.to_string_lossy())
        .replace(SECRETS_MOUNT, &secrets.to_string_lossy())
}

/// `ril certs init certs`, then `ril certs secrets certs`: the Secrets a user applies.
fn make_secrets(sb: &Sandbox) -> Vec<Value> {
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
fn write_secret(secret: &Value, dir: &Path) {
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
fn mount_secrets(w: Workload<'_>, secrets: &[Value], root: &Path) {
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
fn every_role_s_secrets(sb: &Sandbox) -> PathBuf {
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
fn security_role(c: &Value) -> &'static str {
    match subcommand(c).as_str() {
        "coordinator" => "coordinator",
        "learner" => "learner",
        "actor" => "actor",
        "teacher" => "teacher",
        "discriminator serve" => "discriminator",
        other => panic!("unexpected role {other}"),
    }
}

/// The manifests mount, in every pod, exactly the Secrets its run config's `[security]` reads:
/// its own role's certificate and key (and no other role's), the CA certificate and the run
/// token, from the Secrets `ril certs secrets` makes; the CA's key is in none of them. Nothing
/// runs with security off.
#[test]
fn every_pod_mounts_its_own_role_s_certificate_and_the_run_token_from_secrets() {
    need_kubectl!();
    let sb = Sandbox::new();
    let secrets = make_secrets(&sb);
    for s in &secrets {
        assert_eq!(s["kind"], "Secret");
        assert!(
            !s["data"].as_object().unwrap().contains_key("ca.key"),
            "{}: the CA key must stay offline",
            name(s)
        );
    }
    for r in all_renderings() {
        let (_, config) = r.run_config();
        let sec = config
            .get("security")
            .and_then(|s| s.as_table())
            .unwrap_or_else(|| panic!("{}: run.toml has no [security]", r.name));
        assert!(
            !sec.get("allow_insecure")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
            "{}: security is off",
            r.name
        );
        assert_ne!(
            sec.get("mtls").and_then(|v| v.as_bool()),
            Some(false),
            "{}",
            r.name
        );
        for w in r.workloads() {
            let c = w.containers()[0];
            let role = security_role(c);
            let pod = sb.path(&format!("pods/{}-{}", r.name.replace('/', "-"), w.name()));
            mount_secrets(w, &secrets, &pod);
            // Only this role's certificate: a pod holds no other role's key.
            let mut keys = BTreeSet::new();
            for f in std::fs::read_dir(pod.join("tls")).unwrap() {
                keys.insert(f.unwrap().file_name().to_string_lossy().into_owned());
            }
            let expected: BTreeSet<String> = [
                "ca.crt".to_string(),
                format!("{role}.crt"),
                format!("{role}.key"),
            ]
            .into();
            assert_eq!(keys, expected, "{}: {}'s tls mount", r.name, w.name());
            for key in ["token_file", "ca", "cert", "key"] {
                let path = sec
                    .get(key)
                    .and_then(|v| v.as_str())
                    .unwrap_or_else(|| panic!("{}: [security] {key} unset", r.name))
                    .replace("{role}", role);
                let below = path.strip_prefix(SECRETS_MOUNT).unwrap_or_else(|| {
                    panic!(
                        "{}: [security] {key} = {path} is not under {SECRETS_MOUNT}",
                        r.name
                    )
                });
                assert!(
                    pod.join(below.trim_start_matches('/')).is_file(),
                    "{}: {} reads {path} ([security] {key}), which no Secret mount provides",
                    r.name,
                    w.name()
                );
            }
            // The Secrets' files are readable by the pod's user through fsGroup, by no one else.
            for m in c["volumeMounts"].as_array().unwrap() {
                if m["mountPath"].as_str().unwrap().starts_with(SECRETS_MOUNT) {
                    assert_eq!(m["readOnly"], true, "{}: {}", r.name, w.name());
                    let v = w.volume(m["name"].as_str().unwrap());
                    assert_eq!(
                        v["secret"]["defaultMode"].as_u64(),
                        Some(0o440),
                        "{}: {}",
                        r.name,
                        w.name()
                    );
                }
            }
        }
    }
}

#[test]
fn every_rendered_run_config_passes_ril_config_check() {
    need_kubectl!();
    let sb = Sandbox::new();
    let local = render("overlays/local");
    let assets = make_assets(&sb, &local);
    let secrets = every_role_s_secrets(&sb);
    let env = sb.ril(&["env"]);
    let features = stdout(&env);
    for r in all_renderings() {
        let (text, _) = r.run_config();
        let file = sb.path(&format!("{}.toml", r.name.replace('/', "-")));
        std::fs::write(&file, localise(&text, &assets, &sb.path("run"), &secrets)).unwrap();
        let out = sb.ril(&["config", "check", &file.to_string_lossy()]);
        if out.status.success() {
            assert!(stdout(&out).contains(": ok"), "{}", stdout(&out));
            continue;
        }
        // A GPU config needs a GPU build (deploy/Dockerfile.cuda). Without one, the refusal
        // must be that, and the config must pass with the CPU equivalents.
        let e = stderr(&out);
        assert!(
            features.contains("nccl=false") || features.contains("cuda=false"),
            "{}: {e}",
            r.name
        );
        assert!(
            e.contains("needs a build with `--features nccl`")
                || e.contains("rebuild with `--features cuda`"),
            "{}: {e}",
            r.name
        );
        let cpu = localise(&text, &assets, &sb.path("run"), &secrets)
            .replace("collective = \"nccl\"", "collective = \"ring\"")
            .replace("device = \"cuda:0\"", "device = \"cpu\"");
        std::fs::write(&file, cpu).unwrap();
        let out = sb.ril(&["config", "check", &file.to_string_lossy()]);
        assert!(
            out.status.success(),
            "{} (with CPU devices): {}",
            r.name,
            stderr(&out)
        );
        eprintln!(
            "{}: checked with the ring collective and CPU devices (this ril has {})",
            r.name,
            features
                .lines()
                .find(|l| l.starts_with("features"))
                .unwrap_or("")
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Real roles, started as the manifests start them, probed as the kubelet probes

struct Role {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Drop for Role {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Role {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn sigterm(&self) {
        let st = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
    }

    /// Waits for the process to exit, at most `limit`.
    fn exits_within(&mut self, limit: Duration) -> std::process::ExitStatus {
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
fn expand(arg: &str, env: &BTreeMap<String, String>) -> String {
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
fn pod_env(c: &Value, pod_name: &str, ordinal: &str) -> BTreeMap<String, String> {
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
fn start_as_manifest(
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
    Started {
        role,
        grpc,
        health,
        probe: c["readinessProbe"].clone(),
    }
}

/// A role started as its manifest starts it: the process, its TLS gRPC address (servers), its
/// plaintext health address (what the probes ask) and its readiness probe.
struct Started {
    role: Role,
    grpc: Option<String>,
    health: String,
    probe: Value,
}

/// The kubelet's gRPC probe: grpc.health.v1 Check for the probe's service ("" when unset),
/// plaintext, no credentials, within the probe's timeout; success is SERVING only.
async fn kubelet_probe(addr: &str, probe: &Value) -> Option<ril_proto::server::ServingStatus> {
    let service = probe["grpc"]["service"].as_str().unwrap_or("");
    let timeout = Duration::from_secs(probe["timeoutSeconds"].as_u64().unwrap_or(1));
    ril_proto::client::health_check(addr, service, timeout, &Default::default())
        .await
        .ok()
}

async fn probe_until_serving(role: &mut Role, addr: &str, probe: &Value) {
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

/// The local overlay's coordinator, learner rank 0 and an actor, each started with its
/// manifest's command line and environment (rank and advertised name from the simulated
/// downward API), answer the kubelet's probe SERVING on the probed port; after SIGTERM the
/// servers exit cleanly within the pod's terminationGracePeriodSeconds, and the actor's
/// endpoint stops reporting SERVING.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_started_as_the_manifests_start_them_answer_the_kubelet_s_probe() {
    need_kubectl!();
    let sb = Sandbox::new();
    let local = render("overlays/local");
    let assets = make_assets(&sb, &local);
    let secrets = make_secrets(&sb);
    let (text, _) = local.run_config();
    // Peers this test does not start: refused at once instead of looked up in DNS. Learners
    // and actors reach the coordinator at its Service's name; here, where it listens.
    let mut coordinator_addr: Option<String> = None;
    // Each pod's own config: the run config with its own Secret mounts (only its role's
    // certificate and key, as the kubelet mounts them from `ril certs secrets`' Secrets).
    let pod_config = |w: Workload<'_>, pod: &str, coordinator: &Option<String>| {
        let mounts = sb.path(&format!("pods/{pod}"));
        mount_secrets(w, &secrets, &mounts);
        let mut config: toml::Table = localise(&text, &assets, &sb.path("run"), &mounts)
            .parse()
            .unwrap();
        let network = config["network"].as_table_mut().unwrap();
        network.insert("discriminator".into(), "127.0.0.1:1".into());
        for (_, addr) in network["teachers"].as_table_mut().unwrap().iter_mut() {
            *addr = "127.0.0.1:1".into();
        }
        if let Some(c) = coordinator {
            network.insert("coordinator".into(), c.clone().into());
        }
        let path = sb.path(&format!("{pod}.toml"));
        std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
        path
    };

    let coordinator = local.workload_running("coordinator");
    let grace = |w: Workload<'_>| {
        Duration::from_secs(w.pod()["terminationGracePeriodSeconds"].as_u64().unwrap())
    };
    let path = pod_config(coordinator, "ril-coordinator-test", &coordinator_addr);
    let mut coord = start_as_manifest(&sb, coordinator, &path, "ril-coordinator-test", "");
    probe_until_serving(&mut coord.role, &coord.health, &coord.probe).await;
    coordinator_addr = coord.grpc.clone();
    let coord_addr = coordinator_addr.clone().unwrap();
    // The gRPC port itself speaks only TLS and wants the token: the probe's plaintext call is
    // refused there.
    assert_eq!(kubelet_probe(&coord_addr, &coord.probe).await, None);

    // An actor before any learner has joined: it waits to register, and is alive meanwhile.
    let actor_w = local.workload_running("actor");
    let path = pod_config(actor_w, "ril-actor-test", &coordinator_addr);
    let mut actor = start_as_manifest(&sb, actor_w, &path, "ril-actor-test", "");
    probe_until_serving(&mut actor.role, &actor.health, &actor.probe).await;
    actor.role.sigterm();
    let deadline = Instant::now() + Duration::from_secs(10);
    while kubelet_probe(&actor.health, &actor.probe).await
        == Some(ril_proto::server::ServingStatus::Serving)
    {
        assert!(
            Instant::now() < deadline,
            "the actor still reports SERVING after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(actor);

    let learner_w = local.workload_running("learner");
    let path = pod_config(learner_w, "ril-learner-0", &coordinator_addr);
    let mut learner = start_as_manifest(&sb, learner_w, &path, "ril-learner-0", "0");
    probe_until_serving(&mut learner.role, &learner.health, &learner.probe).await;
    // Rank 0 joined (over TLS, as the learner role) under the name the StatefulSet's headless
    // Service gives it. `ril status` speaks as the admin role, with `ril certs init`'s files.
    let status = sb.ril(&[
        "status",
        "--coordinator",
        &coord_addr,
        "--security-dir",
        "certs",
    ]);
    assert!(status.status.success(), "{}", stderr(&status));
    assert!(
        stdout(&status).contains("learner ranks 1/1"),
        "{}",
        stdout(&status)
    );
    assert!(
        coord.role.log().contains("ril-learner-0.ril-learner:50052"),
        "rank 0 joins with its pod's DNS name: {}",
        coord.role.log()
    );
    // Without credentials, status is refused.
    let anonymous = sb.ril(&["status", "--coordinator", &coord_addr, "--insecure"]);
    assert!(!anonymous.status.success(), "{}", stdout(&anonymous));

    learner.role.sigterm();
    let st = learner.role.exits_within(grace(learner_w));
    assert!(st.success(), "learner: {st}: {}", learner.role.log());
    coord.role.sigterm();
    let st = coord.role.exits_within(grace(coordinator));
    assert!(st.success(), "coordinator: {st}: {}", coord.role.log());
    assert!(
        sb.path("run/coordinator").is_dir(),
        "the coordinator's state is where its volume is mounted"
    );
}

fn tree(dir: &Path) -> BTreeMap<PathBuf, u64> {
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

/// The local overlay's run, on what its init containers make, trains to the end (here with
/// `ril train` and 2 iterations), and the roles write nothing but their own state directories,
/// which are the volumes the manifests mount (the assets stay untouched: they are read-only).
#[test]
fn the_local_overlay_s_run_trains_and_the_roles_write_only_to_their_volumes() {
    need_kubectl!();
    let sb = Sandbox::new();
    let local = render("overlays/local");
    let assets = make_assets(&sb, &local);
    let before = tree(&assets);
    let (text, _) = local.run_config();
    let run = sb.path("run");
    let secrets = every_role_s_secrets(&sb);
    let mut config: toml::Table = localise(&text, &assets, &run, &secrets).parse().unwrap();
    config["run"]
        .as_table_mut()
        .unwrap()
        .insert("iterations".into(), 2.into());
    std::fs::write(sb.path("run.toml"), toml::to_string(&config).unwrap()).unwrap();
    let out = sb.ril(&[
        "train",
        "--config",
        "run.toml",
        "--startup-timeout-s",
        "120",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("iteration 2/2 (policy version 2), finished"),
        "{}",
        stdout(&out)
    );
    assert_eq!(
        tree(&assets),
        before,
        "a role wrote into the read-only assets"
    );
    // `ril train`'s own logs/, addrs/ and security/ (the local run's generated CA,
    // certificates and token) aside, every entry is one role's volume.
    let mounted: BTreeSet<String> = ["coordinator", "learner", "discriminator", "teachers"]
        .map(String::from)
        .into();
    for entry in std::fs::read_dir(&run).unwrap() {
        let entry = entry.unwrap().file_name().to_string_lossy().into_owned();
        assert!(
            mounted.contains(&entry) || ["logs", "addrs", "security"].contains(&entry.as_str()),
            "a role wrote {} outside its volumes",
            run.join(&entry).display()
        );
    }
    assert!(run.join("learner/checkpoint-000002").is_dir());
    assert!(run.join("coordinator").is_dir());
}
