//! The `ril` binary's argument handling and its errors for bad input.

use std::process::Command;

fn ril(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ril"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("the ril binary runs")
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn help_lists_the_commands() {
    let out = ril(&["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in ["model", "bench", "env"] {
        assert!(text.contains(cmd), "{text}");
    }
}

#[test]
fn env_reports_features_and_never_panics_without_a_gpu() {
    let out = ril(&["env"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("features: cuda=") && text.contains("nccl:"),
        "{text}"
    );
}

#[test]
fn a_missing_model_directory_is_named() {
    let out = ril(&["model", "info", "--model", "/definitely/not/here"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("/definitely/not/here"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_gpu_device_without_cuda_support_is_a_clear_error() {
    let out = ril(&["model", "info", "--model", ".", "--device", "cuda:0"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("cuda:0") && err.contains("--features cuda"),
        "{err}"
    );
    let out = ril(&["model", "info", "--model", ".", "--device", "tpu"]);
    assert!(
        stderr(&out).contains("expected cpu, cuda or cuda:N"),
        "{}",
        stderr(&out)
    );
}

/// `ril bench cluster` at its smallest: a real coordinator, 2 simulated actors, 2 iterations of
/// 4 questions; every group is accepted once and the figures are written.
#[test]
fn the_control_plane_bench_runs_a_small_cluster_to_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("cluster.json");
    let out = ril(&[
        "--log-level",
        "warn",
        "bench",
        "cluster",
        "--actors",
        "1,2",
        "--iterations",
        "2",
        "--questions-per-iteration",
        "4",
        "--rows",
        "16",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let figures: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let runs = figures.as_array().unwrap();
    assert_eq!(runs.len(), 2);
    for (run, actors) in runs.iter().zip([1, 2]) {
        assert_eq!(run["actors"], actors);
        assert_eq!(run["groups_accepted"], 8, "{run}");
        assert_eq!(run["calls"]["AcceptGroup"][0], 8, "{run}");
        assert!(run["state_file_bytes"].as_u64().unwrap() > 0, "{run}");
    }
}

#[test]
fn a_bad_log_filter_is_refused() {
    let out = ril(&["--log-level", "info,=[", "env"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--log-level"), "{}", stderr(&out));
}
