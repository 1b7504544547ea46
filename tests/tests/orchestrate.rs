//! The orchestration as a library, without the `ril` command in front of it: a run config built
//! from typed values (`ril_config::RunConfig`), saved, and run through the local cluster
//! (`ril_orchestrate::cluster`), which starts the real roles as `ril` processes. What the demo and
//! the ablation do for each of their runs.

use std::time::Duration;

use ril_config::{DataSection, RolloutSection, RunConfig, RunSection, StudentSection};
use ril_orchestrate::RilBinary;
use ril_orchestrate::cluster::{ClusterOptions, run_cluster};
use ril_teacher::{BackendOptions, CandleOptions, TeacherOptions};
use ril_tests::{Sandbox, ril_binary};

/// A tiny run (2 iterations of 2 questions, G = 2, 6 new tokens, one teacher) as typed values.
fn tiny_config(sb: &Sandbox) -> RunConfig {
    let run = RunSection {
        id: "typed".into(),
        dir: "run".into(),
        seed: 1,
        iterations: 2,
        questions_per_iteration: 2,
        staleness_bound: 0,
        device: None,
    };
    let data = DataSection {
        path: "data".into(),
        skip_bad_rows: false,
    };
    let student = StudentSection {
        checkpoint: "student".into(),
    };
    let path = sb.path("run.toml");
    let mut cfg = RunConfig::new(&path, run, data, student, RolloutSection::new(2, 6)).unwrap();
    cfg.coordinator.lease_timeout_s = 2;
    cfg.coordinator.heartbeat_interval_ms = 200;
    cfg.coordinator.actor_timeout_s = 2;
    cfg.actors.count = 2;
    cfg.learner.save_every = 1;
    cfg.learner.grpo.lr = 1e-3;
    cfg.learner.grpo.loss_normalizer = 6;
    cfg.discriminator.lr = 1e-3;
    let backend = BackendOptions::Candle(CandleOptions::new(sb.path("teacher")));
    let mut teacher = TeacherOptions::new("t1", backend);
    teacher.cache = Some(cfg.default_teacher_cache("t1"));
    teacher.sampling.max_new_tokens = 6;
    cfg.teachers.push(teacher);
    cfg
}

#[test]
fn a_typed_run_config_runs_through_the_local_cluster_to_the_end() {
    let sb = Sandbox::new();
    sb.make_tiny_run(24, &[("student", "1"), ("teacher", "2")]);
    let cfg = tiny_config(&sb);
    cfg.save("# Written by the orchestration test.\n").unwrap();
    // What every role will read is what was built (and `ril config check` accepts it).
    let loaded = RunConfig::load(&cfg.path).unwrap();
    assert_eq!(loaded, cfg);
    assert_eq!(loaded.learner.grpo.loss_normalizer, 6);
    ril_tests::ok(&sb.ril(&["config", "check", "run.toml"]));

    let options = ClusterOptions {
        actors: None,
        startup_timeout: Duration::from_secs(120),
        stall_timeout: Duration::from_secs(300),
    };
    let ril = RilBinary::new(ril_binary());
    let runtime = ril_orchestrate::runtime().unwrap();
    let outcome = runtime
        .block_on(run_cluster(&ril, &loaded, &options))
        .unwrap();
    assert!(outcome.status.finished);
    assert_eq!(outcome.status.policy_version, 2);
    assert_eq!(outcome.status.groups_accepted, 4);
    assert_eq!(outcome.learner_dir, sb.path("run/learner"));
    assert!(sb.path("run/learner/checkpoint-000002").is_dir());
    // The supervisor kept each role's log in the run directory.
    assert!(sb.path("run/logs/actor-1.log").is_file());
}
