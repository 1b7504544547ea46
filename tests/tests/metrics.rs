//! Prometheus metrics as a user's Prometheus sees them: every role started as its own `ril`
//! process with `--metrics-listen`, scraped over HTTP and parsed with a parser of the text format
//! (`ril_tests::scrape`), while and after a real run works.

use std::time::{Duration, Instant};

use ril_proto::v1;
use ril_proto::v1::coordinator_client::CoordinatorClient;
use ril_tests::Sandbox;
use ril_tests::roles::{Role, edit_config, make_models, serve, start, wait_addr, write_config};
use ril_tests::scrape::{Metrics, request, scrape};

/// A serving role with its metrics endpoint: the process, its gRPC and its metrics address.
fn serve_metered(sb: &Sandbox, name: &str, args: &[&str]) -> (Role, String, String) {
    let file = format!("{name}.metrics");
    let mut a = args.to_vec();
    a.extend([
        "--metrics-listen",
        "127.0.0.1:0",
        "--metrics-addr-file",
        &file,
    ]);
    let (mut role, addr) = serve(sb, name, &a);
    let metrics = wait_addr(sb, &mut role, &file);
    (role, addr, metrics)
}

/// Scrapes `addr` until `done` holds for the scrape (every 20 ms, up to `limit`); the scrape.
fn scrape_until(
    what: &str,
    addr: &str,
    limit: Duration,
    done: impl Fn(&Metrics) -> bool,
) -> Metrics {
    let deadline = Instant::now() + limit;
    loop {
        let m = scrape(addr).unwrap_or_else(|e| panic!("scraping {what} at {addr}: {e}"));
        if done(&m) {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not reached in {limit:?}; last scrape:\n{}",
            m.text
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn value(m: &Metrics, name: &str, labels: &[(&str, &str)]) -> f64 {
    m.value(name, labels)
        .unwrap_or_else(|| panic!("{name}{labels:?} missing from\n{}", m.text))
}

/// Every role's `/metrics` parses and counts what the run did: the actor's generated tokens
/// while it works; after the run, the coordinator's accepted groups and lease latency, the
/// learner's steps, KL and weight bytes, D's steps, the teacher's answers, and refused calls
/// by method and code.
#[test]
fn every_role_serves_metrics_that_parse_and_count_the_run() {
    let sb = Sandbox::new();
    make_models(&sb);
    write_config(&sb, "");
    // Three iterations: the actor is scraped while it works, before the run ends.
    edit_config(&sb, &[("iterations = 2", "iterations = 3")]);

    let (_teacher, teacher, teacher_m) =
        serve_metered(&sb, "teacher", &["teacher", "--name", "t1"]);
    let (_disc, disc, disc_m) = serve_metered(&sb, "discriminator", &["discriminator", "serve"]);
    let t_flag = format!("t1={teacher}");
    let (_coord, coord, coord_m) = serve_metered(
        &sb,
        "coordinator",
        &[
            "coordinator",
            "--teacher-addr",
            &t_flag,
            "--discriminator-addr",
            &disc,
        ],
    );
    let (_learner, _, learner_m) = serve_metered(
        &sb,
        "learner",
        &[
            "learner",
            "--coordinator",
            &coord,
            "--discriminator-addr",
            &disc,
        ],
    );
    let loaded = Duration::from_secs(120);
    for (role, addr) in [
        ("teacher", &teacher_m),
        ("discriminator", &disc_m),
        ("coordinator", &coord_m),
        ("learner", &learner_m),
    ] {
        let name = format!("ril_{role}_loaded");
        scrape_until(role, addr, loaded, |m| m.value(&name, &[]) == Some(1.0));
    }

    // The actor serves metrics while it works: its generated tokens show before the run ends.
    let mut actor = start(
        &sb,
        "actor",
        &[
            "actor",
            "--config",
            "run.toml",
            "--coordinator",
            &coord,
            "--id",
            "a1",
            "--metrics-listen",
            "127.0.0.1:0",
            "--metrics-addr-file",
            "actor.metrics",
        ],
    );
    let actor_m = wait_addr(&sb, &mut actor, "actor.metrics");
    let a = scrape_until("actor", &actor_m, loaded, |m| {
        m.value("ril_actor_generated_tokens_total", &[])
            .unwrap_or(0.0)
            > 0.0
    });
    assert_eq!(a.kind("ril_actor_generated_tokens_total"), Some("counter"));
    assert!(
        value(&a, "ril_actor_generated_responses_total", &[]) >= 2.0,
        "{}",
        a.text
    );
    assert!(
        value(&a, "ril_actor_weight_sync_bytes_total", &[]) > 0.0,
        "{}",
        a.text
    );
    assert!(
        value(
            &a,
            "ril_actor_phase_seconds_total",
            &[("phase", "generation")]
        ) > 0.0
    );
    assert_eq!(value(&a, "ril_build_info", &[("role", "actor")]), 1.0);

    // The run finishes; the serving roles stay up and are scraped once more.
    let c = scrape_until("coordinator", &coord_m, Duration::from_secs(240), |m| {
        m.value("ril_coordinator_run_finished", &[]) == Some(1.0)
    });
    assert_eq!(
        value(&c, "ril_coordinator_groups_accepted_total", &[]),
        6.0,
        "{}",
        c.text
    );
    assert_eq!(value(&c, "ril_coordinator_policy_version", &[]), 3.0);
    assert_eq!(
        c.kind("ril_coordinator_groups_accepted_total"),
        Some("counter")
    );
    assert!(value(&c, "ril_coordinator_state_writes_total", &[]) >= 1.0);
    assert!(value(&c, "ril_coordinator_state_file_bytes", &[]) > 0.0);
    assert!(
        value(
            &c,
            "ril_coordinator_actor_questions_leased_total",
            &[("actor", "a1")]
        ) >= 6.0
    );
    let lease = [
        ("service", "ril.v1.Coordinator"),
        ("method", "LeasePrompts"),
    ];
    let leases_ok = value(
        &c,
        "ril_rpc_server_handled_total",
        &[lease[0], lease[1], ("code", "OK")],
    );
    assert!(leases_ok >= 3.0, "{}", c.text);
    let timed = c
        .histogram_count("ril_rpc_server_handling_seconds", &lease)
        .unwrap_or_else(|| panic!("no lease latency histogram in\n{}", c.text));
    assert!(timed >= leases_ok, "{timed} timed, {leases_ok} OK");
    assert!(value(&c, "process_resident_memory_bytes", &[]) > 0.0);

    let l = scrape(&learner_m).unwrap();
    assert_eq!(value(&l, "ril_learner_steps_total", &[]), 3.0, "{}", l.text);
    assert_eq!(
        l.histogram_count("ril_learner_step_seconds", &[]),
        Some(3.0)
    );
    assert_eq!(value(&l, "ril_learner_groups_trained_total", &[]), 6.0);
    assert!(value(&l, "ril_learner_weight_sync_bytes_total", &[]) > 0.0);
    for gauge in [
        "ril_learner_kl_mean",
        "ril_learner_entropy_mean",
        "ril_learner_reward_student_mean",
    ] {
        assert!(value(&l, gauge, &[]).is_finite(), "{gauge} in\n{}", l.text);
        assert_eq!(l.kind(gauge), Some("gauge"));
    }
    let d = scrape(&disc_m).unwrap();
    assert!(
        value(&d, "ril_discriminator_step", &[]) >= 1.0,
        "{}",
        d.text
    );
    assert!(
        value(&d, "ril_discriminator_responses_scored_total", &[]) >= 12.0,
        "{}",
        d.text
    );
    assert!(value(&d, "ril_discriminator_train_accuracy_ratio", &[]).is_finite());
    let t = scrape(&teacher_m).unwrap();
    assert!(
        value(&t, "ril_teacher_answers_generated_total", &[]) > 0.0,
        "{}",
        t.text
    );
    assert!(
        value(&t, "ril_teacher_cache_entries", &[]) > 0.0,
        "{}",
        t.text
    );

    // The Grafana dashboard queries only metrics the roles export.
    let exported: std::collections::BTreeSet<String> = [&a, &c, &l, &d, &t]
        .iter()
        .flat_map(|m| m.scrape.samples.iter())
        .flat_map(|s| {
            let base = s.metric.clone();
            [
                format!("{base}_bucket"),
                format!("{base}_sum"),
                format!("{base}_count"),
                base,
            ]
        })
        .collect();
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(ril_tests::k8s::repo().join("deploy/grafana/ril-run.json"))
            .unwrap(),
    )
    .unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(panels.len() >= 10, "{} panels", panels.len());
    for panel in panels {
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{}: no queries", panel["title"]);
        for target in targets {
            let expr = target["expr"].as_str().unwrap();
            for name in metric_names(expr) {
                assert!(
                    exported.contains(&name),
                    "the dashboard's {:?} queries {name}, which no role exports: {expr}",
                    panel["title"]
                );
            }
        }
    }

    // A call the caller's role may not make is refused and counted by method and code.
    let admin = ril_proto::security::SecurityConfig::from_dir(&sb.path("certs"))
        .resolve(ril_proto::security::Role::Admin)
        .unwrap();
    let refused = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let ch = ril_proto::client::connect(&coord, Duration::from_secs(5), &admin)
            .await
            .unwrap();
        CoordinatorClient::new(ch)
            .report_metrics(v1::ReportMetricsRequest::default())
            .await
            .unwrap_err()
    });
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    let c = scrape(&coord_m).unwrap();
    let denied = [("method", "ReportMetrics"), ("code", "PERMISSION_DENIED")];
    assert_eq!(
        value(&c, "ril_rpc_server_handled_total", &denied),
        1.0,
        "{}",
        c.text
    );

    // The endpoint serves only the metrics.
    let r = request(&coord_m, "GET", "/nothing").unwrap();
    assert_eq!(r.status, 404, "{r:?}");
    let r = request(&coord_m, "POST", "/metrics").unwrap();
    assert_eq!(r.status, 405, "{r:?}");
}

/// The metric names (`ril_*`, `process_*`) a PromQL expression mentions.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut rest = expr;
    while let Some(i) = rest.find(|c: char| word(c)) {
        let tail = &rest[i..];
        let end = tail.find(|c: char| !word(c)).unwrap_or(tail.len());
        let token = &tail[..end];
        if token.starts_with("ril_") || token.starts_with("process_") {
            names.push(token.to_string());
        }
        rest = &tail[end..];
    }
    names
}
