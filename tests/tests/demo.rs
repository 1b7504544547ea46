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
        "--pretrain-questions",
        "4",
        "--pretrain-steps",
        "3",
        "--accuracy-points",
        "2",
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
    for stage in [
        "data_and_models",
        "discriminator_pretrain",
        "ril",
        "eval_before",
        "eval_after",
    ] {
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
    // The mechanics (not the science): the policy starts at the reference (KL 0 at the first
    // step), every group holds G = 4 student and G = 4 teacher responses (2 groups of 8 per
    // iteration with B = 4 questions: 32 responses), advantages are centred on their group's
    // mean, and binary rewards are summed (each component's mean in [0, 1], totals in [0, 2]).
    assert_eq!(lines[0]["kl_mean"].as_f64().unwrap(), 0.0, "{}", lines[0]);
    for l in &lines {
        assert_eq!(l["responses"].as_f64().unwrap(), 32.0, "{l}");
        assert!(
            l["response_length_teacher_mean"].as_f64().unwrap() > 0.0,
            "{l}"
        );
        assert!(l["advantage_mean"].as_f64().unwrap().abs() < 1e-9, "{l}");
        for who in ["student", "teacher"] {
            for part in ["ans", "sim"] {
                let r = l[format!("reward_{part}_{who}_mean")].as_f64().unwrap();
                assert!((0.0..=1.0).contains(&r), "{part} {who}: {r}");
            }
            let total = l[format!("reward_{who}_mean")].as_f64().unwrap();
            assert!((0.0..=2.0).contains(&total), "{who}: {total}");
        }
    }
    // D was pre-trained and the RIL run's D started from it.
    let config = std::fs::read_to_string(sb.path("run/run.toml")).unwrap();
    assert!(config.contains("discriminator-pretrained"), "{config}");
    assert!(sb.path("run/discriminator-pretrained/latest").is_file());
    // Held-out accuracy before, at the checkpoint on the way and after.
    let points = report["accuracy_by_iteration"].as_array().unwrap();
    let iterations: Vec<f64> = points
        .iter()
        .map(|p| p["iteration"].as_f64().unwrap())
        .collect();
    assert_eq!(iterations, vec![0.0, 1.0, 2.0], "{report}");
    // The plots are PNGs that decode.
    for name in ["rewards", "discriminator", "kl", "accuracy"] {
        let path = sb.path(&format!("run/plots/{name}.png"));
        let decoder =
            png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&path).unwrap()));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert!(info.width >= 400 && info.height >= 300, "{name}: {info:?}");
        let plots = report["plots"].as_array().unwrap();
        assert!(
            plots
                .iter()
                .any(|p| p.as_str().unwrap().ends_with(&format!("{name}.png"))),
            "{report}"
        );
    }
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

/// `ril experiment ablation` as a user runs it, cut down: two variants (the base and RIL with a
/// frozen discriminator, two seeds), one iteration each, on the built-in models. D is
/// pre-trained once against the variant's teachers and both seeds' runs start from it. The
/// table and JSON agree with the runs' own results, the plot decodes, and a second invocation
/// resumes (runs and pre-trains nothing again).
#[test]
fn the_ablation_writes_its_table_and_plot_and_resumes() {
    let sb = Sandbox::new();
    let models = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/builtin");
    let args = [
        "experiment",
        "ablation",
        "--out",
        "abl",
        "--models",
        models.to_str().unwrap(),
        "--variants",
        "base,ril-frozen-d",
        "--seeds",
        "2",
        "--iterations",
        "1",
        "--eval-rows",
        "8",
        "--split",
        "val",
        "--pretrain-questions",
        "2",
        "--pretrain-steps",
        "2",
    ];
    let out = sb.ril(&args);
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(sb.path("abl/ablation.json")).unwrap())
            .unwrap();
    let rows = json.as_array().unwrap();
    assert_eq!(rows.len(), 2, "{json}");
    assert_eq!(rows[0]["variant"], "base");
    assert_eq!(rows[1]["variant"], "ril-frozen-d");
    assert_eq!(
        stdout(&out)
            .matches("pre-training the discriminator")
            .count(),
        1,
        "{}",
        stdout(&out)
    );
    let d_dir = sb.path("abl/discriminators/reasoned+narrated");
    assert!(d_dir.join("latest").exists(), "{}", d_dir.display());
    // The base is evaluated once (greedy); the RIL variant once per seed, each its own run.
    assert_eq!(rows[0]["accuracy"].as_array().unwrap().len(), 1);
    let accs: Vec<f64> = rows[1]["accuracy"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_f64().unwrap())
        .collect();
    assert_eq!(accs.len(), 2);
    for (seed, acc) in accs.iter().enumerate() {
        let result: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(
                sb.path(&format!("abl/runs/ril-frozen-d-s{seed}/result.json")),
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(result["accuracy"].as_f64().unwrap(), *acc);
        assert_eq!(result["split"], "val");
        assert_eq!(result["student"], "student-reasoned");
        assert_eq!(result["teachers"], "reasoned+narrated");
        let config =
            std::fs::read_to_string(sb.path(&format!("abl/runs/ril-frozen-d-s{seed}/run.toml")))
                .unwrap();
        assert!(config.contains(&format!("seed = {seed}")), "{config}");
        assert!(config.contains("use_sim_reward = true"), "{config}");
        assert!(config.contains("teachers_in_group = true"), "{config}");
        // Both seeds start from the one pre-trained D.
        assert!(
            config.contains("discriminators/reasoned+narrated\""),
            "{config}"
        );
    }
    let mean = (accs[0] + accs[1]) / 2.0;
    assert!((rows[1]["mean"].as_f64().unwrap() - mean).abs() < 1e-12);
    let table = std::fs::read_to_string(sb.path("abl/ablation.md")).unwrap();
    assert!(
        table.contains("| RIL, frozen discriminator |") && table.contains("| base (SFT) |"),
        "{table}"
    );
    assert!(table.contains(&format!("{:.1} ±", 100.0 * mean)), "{table}");
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(sb.path("abl/ablation.png")).unwrap(),
    ));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    reader.next_frame(&mut buf).unwrap();

    // Again: every run is found done, nothing is rerun.
    let again = sb.ril(&args);
    assert!(again.status.success(), "{}", stderr(&again));
    assert_eq!(
        stdout(&again).matches("done earlier").count(),
        3,
        "{}",
        stdout(&again)
    );
    assert!(
        !stdout(&again).contains("pre-training"),
        "{}",
        stdout(&again)
    );

    // Other teachers: the RIL runs are not theirs, so they run again (with their own D); the
    // base, which runs nothing, is reused.
    let mut other = args.to_vec();
    let seeds = other.iter().position(|a| *a == "--seeds").unwrap();
    other[seeds + 1] = "1";
    other.extend(["--teachers", "narrated,reasoned"]);
    let other = sb.ril(&other);
    assert!(other.status.success(), "{}", stderr(&other));
    let printed = stdout(&other);
    assert!(
        printed.contains("base (SFT) seed 0: done earlier")
            && printed.contains("RIL, frozen discriminator seed 0 (")
            && printed.contains("pre-training the discriminator against narrated+reasoned"),
        "{printed}"
    );
    assert!(
        sb.path("abl/discriminators/narrated+reasoned/latest")
            .exists()
    );

    // A variant that does not exist is refused, naming it and the known ones.
    let bad = sb.ril(&[
        "experiment",
        "ablation",
        "--out",
        "abl2",
        "--variants",
        "ppo",
    ]);
    assert!(!bad.status.success());
    assert!(
        stderr(&bad).contains("\"ppo\"") && stderr(&bad).contains("ril-no-d"),
        "{}",
        stderr(&bad)
    );
}
