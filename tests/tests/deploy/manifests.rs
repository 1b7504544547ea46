//! What every container must have, the shape of the workloads (actors apart from the learner
//! ranks), and that the run config's addresses and paths match the Services and volumes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use ril_tests::k8s::*;
use ril_tests::need_kubectl;
use serde_json::Value;

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

/// Every ril role serves Prometheus metrics where the manifests tell Prometheus to look: a
/// `--metrics-listen` port declared as `metrics`, the pod annotations naming it, a NetworkPolicy
/// admitting scrapers to it; with the Prometheus operator, a ServiceMonitor over a Service that
/// selects every role's pods on that port.
#[test]
fn every_role_serves_metrics_where_prometheus_looks() {
    need_kubectl!();
    let renderings = all_renderings();
    for r in &renderings {
        let mut metered = Vec::new();
        for w in r.workloads() {
            let at = format!("{}: {} {}", r.name, w.kind(), w.name());
            for c in w.containers() {
                if health_port(c).is_none() {
                    continue; // not a ril role (e.g. a one-off Job's tool)
                }
                let listen = flag(&args(c), "--metrics-listen")
                    .unwrap_or_else(|| panic!("{at}: no --metrics-listen"));
                let port = u64::from(port_of(&listen));
                let declared = c["ports"]
                    .as_array()
                    .and_then(|ps| ps.iter().find(|p| p["name"] == "metrics"))
                    .unwrap_or_else(|| panic!("{at}: no port named metrics"));
                assert_eq!(declared["containerPort"].as_u64(), Some(port), "{at}");
                let notes = &w.object["spec"]["template"]["metadata"]["annotations"];
                assert_eq!(notes["prometheus.io/scrape"], "true", "{at}: {notes}");
                assert_eq!(
                    notes["prometheus.io/port"],
                    port.to_string(),
                    "{at}: {notes}"
                );
                assert_eq!(notes["prometheus.io/path"], "/metrics", "{at}: {notes}");
                metered.push((w.pod_labels(), port));
            }
        }
        assert!(
            metered.len() >= 4,
            "{}: {} metered roles",
            r.name,
            metered.len()
        );
        for (pod, port) in &metered {
            let admitted = r.of_kind("NetworkPolicy").any(|np| {
                let selects = labels(&np["spec"]["podSelector"]["matchLabels"])
                    .iter()
                    .all(|(k, v)| pod.get(k) == Some(v));
                let rules = np["spec"]["ingress"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                selects
                    && rules.iter().any(|rule| {
                        rule["ports"]
                            .as_array()
                            .is_some_and(|ps| ps.iter().any(|p| p["port"].as_u64() == Some(*port)))
                    })
            });
            assert!(
                admitted,
                "{}: no NetworkPolicy admits scrapes of {pod:?} on {port}",
                r.name
            );
        }
        let monitors: Vec<_> = r.of_kind("ServiceMonitor").collect();
        for m in monitors {
            let selector = labels(&m["spec"]["selector"]["matchLabels"]);
            let services: Vec<_> = r
                .of_kind("Service")
                .filter(|s| {
                    let l = labels(&s["metadata"]["labels"]);
                    selector.iter().all(|(k, v)| l.get(k) == Some(v))
                })
                .collect();
            assert_eq!(
                services.len(),
                1,
                "{}: the ServiceMonitor selects one Service",
                r.name
            );
            let svc = services[0];
            let endpoint = &m["spec"]["endpoints"][0];
            let svc_port = svc["spec"]["ports"]
                .as_array()
                .and_then(|ps| ps.iter().find(|p| p["name"] == endpoint["port"]))
                .unwrap_or_else(|| {
                    panic!("{}: the Service lacks port {}", r.name, endpoint["port"])
                });
            assert_eq!(svc_port["targetPort"], "metrics", "{}", r.name);
            assert_eq!(endpoint["path"], "/metrics", "{}", r.name);
            let chosen = labels(&svc["spec"]["selector"]);
            for (pod, _) in &metered {
                assert!(
                    chosen.iter().all(|(k, v)| pod.get(k) == Some(v)),
                    "{}: the metrics Service misses pods {pod:?}",
                    r.name
                );
            }
        }
    }
    assert!(
        renderings
            .iter()
            .any(|r| r.of_kind("ServiceMonitor").count() == 1),
        "no rendering has the ServiceMonitor (examples/prometheus-operator)"
    );
}
