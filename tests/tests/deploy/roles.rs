//! Real roles, started as the manifests start them, probed as the kubelet probes; the local
//! overlay's run trained to the end.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use ril_tests::k8s::*;
use ril_tests::{Sandbox, need_kubectl, stderr, stdout};

use crate::kubelet::{
    every_role_s_secrets, kubelet_probe, localise, make_assets, make_secrets, mount_secrets,
    probe_until_serving, start_as_manifest, tree,
};

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
    // Its metrics port (what the pod annotations and the ServiceMonitor point at) serves.
    let m = ril_tests::scrape::scrape(&coord.metrics).unwrap();
    assert_eq!(
        m.value("ril_coordinator_loaded", &[]),
        Some(1.0),
        "{}",
        m.text
    );
    assert_eq!(
        m.value("ril_build_info", &[("role", "coordinator")]),
        Some(1.0)
    );
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
    let m = ril_tests::scrape::scrape(&actor.metrics).unwrap();
    assert_eq!(
        m.value("ril_build_info", &[("role", "actor")]),
        Some(1.0),
        "{}",
        m.text
    );
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
    let m = ril_tests::scrape::scrape(&learner.metrics).unwrap();
    assert_eq!(m.value("ril_learner_loaded", &[]), Some(1.0), "{}", m.text);
    assert_eq!(m.value("ril_learner_rank", &[]), Some(0.0), "{}", m.text);
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
