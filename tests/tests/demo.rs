//! `ril demo` end to end, as a user runs it, on the small models it makes on first use when
//! the built-in ones are absent: data, models, the local cluster, evaluation before and after,
//! and what it leaves in the run directory (`report.json`, `metrics.jsonl`).

use ril_tests::{Sandbox, stderr, stdout};

#[test]
fn demo_writes_its_report_and_one_metrics_line_per_step() {
    let sb = Sandbox::new();
    let out = sb.ril(&[
        "demo",
        "--out",
        "run",
        "--models",
        "no-builtin-models-here",
        "--iterations",
        "2",
        "--eval-rows",
        "12",
        "--fallback-sft-steps",
        "12",
    ]);
    assert!(
        out.status.success(),
        "stdout:\n{}\nstderr:\n{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(
        stdout(&out).contains("held-out accuracy (12 test questions, greedy)"),
        "{}",
        stdout(&out)
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(sb.path("run/report.json")).unwrap())
            .unwrap();
    for key in ["before", "after"] {
        let acc = report["accuracy"][key].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc), "{key}: {acc}");
    }
    assert_eq!(report["accuracy"]["questions"], 12);
    assert_eq!(report["iterations"], 2);
    assert!(report["accuracy"]["per_family"].as_object().unwrap().len() >= 2);
    assert!(report["wall_time_s"].as_f64().unwrap() > 0.0);
    for stage in ["data", "models", "ril", "eval_before", "eval_after"] {
        assert!(
            report["stage_seconds"][stage].as_f64().is_some(),
            "stage {stage} missing: {report}"
        );
    }
    let steps = report["reward_components"]["reward_ans_student_mean"]["steps"]
        .as_u64()
        .unwrap();
    assert_eq!(steps, 2);
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(sb.path("run/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "one line per learner step");
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["version"], i as u64 + 1);
        for key in [
            "reward_student_mean",
            "kl_mean",
            "entropy_mean",
            "d_accuracy",
        ] {
            assert!(l.get(key).is_some(), "line {i} lacks {key}: {l}");
        }
    }
}
