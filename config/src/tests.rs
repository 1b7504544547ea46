use std::path::Path;

use super::*;

fn base(dir: &Path) -> String {
    std::fs::create_dir_all(dir.join("data")).unwrap();
    std::fs::create_dir_all(dir.join("student")).unwrap();
    r#"
[run]
id = "r"
dir = "out"
iterations = 3
questions_per_iteration = 2
[data]
path = "data"
[student]
checkpoint = "student"
[rollout]
group_size = 2
[network]
teachers = { big = "teacher-big:50061" }
[[teachers]]
name = "big"
backend = "openai"
base_url = "http://127.0.0.1:8000/v1"
model = "Qwen/Qwen2.5-VL-72B-Instruct"
"#
    .to_string()
}

#[test]
fn run_level_keys_fill_the_roles_and_names_stay_names() {
    let dir = tempfile::tempdir().unwrap();
    let text = base(dir.path());
    let cfg = RunConfig::parse(&text, &dir.path().join("run.toml")).unwrap();
    // An OpenAI model is a name, not a path next to the config.
    let t = format!("{:?}", cfg.teachers[0]);
    assert!(t.contains("\"Qwen/Qwen2.5-VL-72B-Instruct\""), "{t}");
    assert!(
        !t.contains(&format!("{}/Qwen", dir.path().display())),
        "{t}"
    );
    // The teacher's cache and the learner's dirs land under the run dir.
    assert!(
        t.contains(
            &dir.path()
                .join("out/teachers/big.redb")
                .display()
                .to_string()
        ),
        "{t}"
    );
    assert_eq!(cfg.learner.out_dir, dir.path().join("out/learner"));
    assert_eq!(cfg.learner.questions_per_iteration, 2);
    assert_eq!(cfg.learner.total_iterations, 3);
    assert_eq!(cfg.learner.init_checkpoint, dir.path().join("student"));
    assert_eq!(cfg.discriminator.init, dir.path().join("student"));
    assert_eq!(
        cfg.teacher_addrs().unwrap(),
        vec!["teacher-big:50061".to_string()]
    );
    let c = cfg.coordinator_options(cfg.teacher_addrs().unwrap(), "d:1".into());
    assert_eq!(c.actor.teacher_slots, 2);
    assert_eq!(c.total_iterations, 3);

    // Contradictions and unknown keys are refused by name.
    let bad = text.replace(
        "[rollout]",
        "[learner]\nquestions_per_iteration = 5\n[rollout]",
    );
    let e = RunConfig::parse(&bad, &dir.path().join("run.toml"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("questions_per_iteration") && e.contains("[run]"),
        "{e}"
    );
    let bad = text.replace("[rollout]", "[rollout]\ngroup_sise = 3");
    let e = RunConfig::parse(&bad, &dir.path().join("run.toml"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("group_sise"), "{e}");
    let bad = text
        .replace("teacher-big:50061", "x")
        .replace("name = \"big\"", "name = \"small\"");
    let e = RunConfig::parse(&bad, &dir.path().join("run.toml"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("big"), "{e}");
}

/// Found by the bad-input table (tests/bad-inputs): these used to pass `ril config check`
/// and failed only in every actor.
#[test]
fn rollout_sampling_settings_are_checked_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let text = base(dir.path());
    for (setting, field) in [
        ("temperature = -1.0", "temperature"),
        ("top_p = 1.5", "top_p"),
        ("repetition_penalty = -1.0", "repetition_penalty"),
    ] {
        let bad = text.replace("group_size = 2", &format!("group_size = 2\n{setting}"));
        let e = RunConfig::parse(&bad, &dir.path().join("run.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("run.toml") && e.contains("[rollout]") && e.contains(field),
            "{setting}: {e}"
        );
    }
}

/// Zeros switch nucleus sampling and the repetition penalty off, as they always did (the
/// actor read them so from the wire).
#[test]
fn zero_top_p_and_repetition_penalty_mean_off() {
    let dir = tempfile::tempdir().unwrap();
    let text = base(dir.path()).replace(
        "group_size = 2",
        "group_size = 2\ntop_p = 0.0\nrepetition_penalty = 0",
    );
    let cfg = RunConfig::parse(&text, &dir.path().join("run.toml")).unwrap();
    let s = cfg.student_sampling();
    assert_eq!((s.top_p, s.repetition_penalty), (1.0, 1.0));
    assert_eq!(s.seed, cfg.run.seed);
    assert_eq!(s.max_new_tokens, 64);
}

/// A config with a setting in every kind of section: what the demo and the ablation change.
fn busy(dir: &Path) -> String {
    let text = base(dir).replace("[[teachers]]", "[[teachers]]\nmax_n = 8");
    format!(
        r#"{text}
[teachers.sampling]
temperature = 0.7
max_new_tokens = 96

[[teachers]]
name = "local"
backend = "candle"
checkpoint = "student"
cache = "elsewhere/local.redb"

[coordinator]
lease_timeout_s = 120
heartbeat_interval_ms = 500

[actors]
count = 3

[learner]
save_every = 2
keep_checkpoints = 1000
reference_checkpoint = "student"

[learner.grpo]
lr = 2e-4
loss_normalizer = 128
use_sim_reward = false

[discriminator]
init = "data"
lr = 1e-4
frozen = true

[discriminator.judge]
kind = "rule"
"#
    )
    .replace(
        "teachers = { big = \"teacher-big:50061\" }",
        "teachers = { big = \"teacher-big:50061\", local = \"127.0.0.1:7\" }",
    )
}

#[test]
fn a_config_written_back_reads_back_to_itself_with_run_level_keys_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.toml");
    let cfg = RunConfig::parse(&busy(dir.path()), &path).unwrap();
    let text = cfg.to_toml().unwrap();
    assert_eq!(RunConfig::parse(&text, &path).unwrap(), cfg, "{text}");
    // Run-level keys are not repeated in the role sections; defaults filled in are left out;
    // paths under the config's directory stay relative to it.
    for filled in [
        "init_checkpoint",
        "out_dir",
        "total_iterations",
        "checkpoint_dir",
        "big.redb",
    ] {
        assert!(!text.contains(filled), "{filled}: {text}");
    }
    assert!(text.contains("dir = \"out\""), "{text}");
    // Sections in the documented order, as a person writes them.
    let at = |section: &str| {
        text.find(section)
            .unwrap_or_else(|| panic!("{section}: {text}"))
    };
    let order = [
        "[run]",
        "[data]",
        "[student]",
        "[rollout]",
        "[network",
        "[coordinator]",
        "[actors]",
        "[learner]",
        "[discriminator]",
        "[[teachers]]",
    ];
    let positions: Vec<usize> = order.into_iter().map(at).collect();
    assert!(positions.is_sorted(), "{text}");
    assert!(text.contains("init = \"data\""), "{text}");
    assert!(text.contains("cache = \"elsewhere/local.redb\""), "{text}");
    assert!(!text.contains(&dir.path().display().to_string()), "{text}");

    // A role section that disagrees with the run is written as it is, and refused on reading.
    let mut changed = cfg.clone();
    changed.learner.seed = 99;
    let e = RunConfig::parse(&changed.to_toml().unwrap(), &path)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("[learner] seed = 99") && e.contains("[run] seed"),
        "{e}"
    );
}

/// Paths relative to a config in a relative directory are written relative to it again, so
/// the file reads back to the same paths (nothing here is validated: nothing need exist).
#[test]
fn relative_paths_round_trip_for_a_config_in_a_relative_directory() {
    let path = Path::new("runs/x/run.toml");
    let mut cfg = RunConfig::new(
        path,
        RunSection {
            id: "x".into(),
            dir: "run".into(),
            seed: 3,
            iterations: 2,
            questions_per_iteration: 4,
            staleness_bound: 0,
            device: None,
        },
        DataSection {
            path: "/abs/data".into(),
            skip_bad_rows: false,
        },
        StudentSection {
            checkpoint: "../models/student".into(),
        },
        RolloutSection::new(4, 128),
    )
    .unwrap();
    assert_eq!(cfg.run.dir, Path::new("runs/x/run"));
    assert_eq!(cfg.learner.out_dir, Path::new("runs/x/run/learner"));
    assert_eq!(cfg.learner.seed, 3);
    assert_eq!(
        cfg.discriminator.init,
        Path::new("runs/x/../models/student")
    );
    cfg.discriminator.init = "runs/x/pretrained".into();
    let text = cfg.to_toml().unwrap();
    assert!(text.contains("dir = \"run\""), "{text}");
    assert!(text.contains("path = \"/abs/data\""), "{text}");
    assert!(text.contains("init = \"pretrained\""), "{text}");
    let back = RunConfig::from_table(parse::read_table(&text, path).unwrap(), path).unwrap();
    assert_eq!(back, cfg, "{text}");
}

/// [`RunConfig::new`] is what parsing a file with only the four run-level sections gives.
#[test]
fn a_new_config_is_the_file_with_the_run_level_sections_alone() {
    let path = Path::new("/r/run.toml");
    let text = r#"
[run]
id = "n"
dir = "out"
iterations = 5
questions_per_iteration = 2
[data]
path = "data"
[student]
checkpoint = "s"
[rollout]
group_size = 4
max_new_tokens = 128
"#;
    let parsed = RunConfig::from_table(parse::read_table(text, path).unwrap(), path).unwrap();
    let run: RunSection =
        toml::from_str(&text[..text.find("[data]").unwrap()].replace("[run]", "")).unwrap();
    let new = RunConfig::new(
        path,
        run,
        DataSection {
            path: "data".into(),
            skip_bad_rows: false,
        },
        StudentSection {
            checkpoint: "s".into(),
        },
        RolloutSection::new(4, 128),
    )
    .unwrap();
    assert_eq!(new, parsed);
}

/// Every role runs on the CPU unless told otherwise; `[run] device` moves every role that names
/// no device of its own, a role's own `device` wins, and the file written back reads back the
/// same (each role's device written only where it differs from `[run] device`).
#[test]
fn devices_default_to_cpu_and_run_device_fills_the_roles_without_their_own() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.toml");
    let with_candle_teacher = base(dir.path()).replace(
        "[[teachers]]",
        "[[teachers]]\nname = \"small\"\nbackend = \"candle\"\ncheckpoint = \"student\"\n[[teachers]]",
    );
    let candle_device = |cfg: &RunConfig| match &cfg.teachers[0].backend {
        ril_teacher::BackendOptions::Candle(c) => c.device.clone(),
        other => panic!("{other:?}"),
    };
    let cfg = RunConfig::parse(&with_candle_teacher, &path).unwrap();
    assert_eq!(cfg.run.device, None);
    assert_eq!(cfg.actors.device, "cpu");
    assert_eq!(cfg.learner.device, "cpu");
    assert_eq!(cfg.discriminator.device, "cpu");
    assert_eq!(candle_device(&cfg), "cpu");

    let on_gpu = with_candle_teacher.replace(
        "questions_per_iteration = 2\n",
        "questions_per_iteration = 2\ndevice = \"cuda:0\"\n[learner]\ndevice = \"cuda:1\"\n",
    );
    let cfg = RunConfig::parse(&on_gpu, &path).unwrap();
    assert_eq!(cfg.run.device.as_deref(), Some("cuda:0"));
    assert_eq!(cfg.actors.device, "cuda:0");
    assert_eq!(cfg.learner.device, "cuda:1");
    assert_eq!(cfg.discriminator.device, "cuda:0");
    assert_eq!(candle_device(&cfg), "cuda:0");
    let text = cfg.to_toml().unwrap();
    assert_eq!(text.matches("device = ").count(), 2, "{text}");
    assert_eq!(RunConfig::parse(&text, &path).unwrap(), cfg, "{text}");

    // An OpenAI teacher runs no model here: it takes no device.
    let bad = with_candle_teacher.replace("model = \"Qwen", "device = \"cuda:0\"\nmodel = \"Qwen");
    let e = RunConfig::parse(&bad, &path).unwrap_err().to_string();
    assert!(e.contains("device"), "{e}");
}

/// A device string that is not `cpu`, `cuda` or `cuda:N` is refused naming the key and the
/// string, wherever it is. Only the form is checked: a CUDA device passes on a machine without
/// one (the role opens it where it runs).
#[test]
fn a_bad_device_string_is_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.toml");
    let text = base(dir.path());
    let at = |section: &str, device: &str| {
        text.replace(
            "[rollout]",
            &format!("[{section}]\ndevice = \"{device}\"\n[rollout]"),
        )
    };
    for (section, key) in [
        ("actors", "actors.device"),
        ("learner", "learner.device"),
        ("discriminator", "discriminator.device"),
    ] {
        let e = RunConfig::parse(&at(section, "gpu0"), &path)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(key) && e.contains("\"gpu0\"") && e.contains("expected cpu, cuda or cuda:N"),
            "{e}"
        );
        RunConfig::parse(&at(section, "cuda:7"), &path).unwrap();
    }
    let run = text.replace(
        "questions_per_iteration = 2\n",
        "questions_per_iteration = 2\ndevice = \"cuda:x\"\n",
    );
    let e = RunConfig::parse(&run, &path).unwrap_err().to_string();
    assert!(e.contains("run.device") && e.contains("\"cuda:x\""), "{e}");
    let teacher = text.replace(
        "[[teachers]]",
        "[[teachers]]\nname = \"small\"\nbackend = \"candle\"\ncheckpoint = \"student\"\ndevice = \"tpu\"\n[[teachers]]",
    );
    let e = RunConfig::parse(&teacher, &path).unwrap_err().to_string();
    assert!(
        e.contains("\"small\"") && e.contains("device") && e.contains("\"tpu\""),
        "{e}"
    );
}

#[test]
fn actor_deadlines_are_read_written_back_and_must_be_positive() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.toml");
    let text = base(dir.path());
    let cfg = RunConfig::parse(&text, &path).unwrap();
    assert_eq!(
        (cfg.actors.rpc_timeout_ms, cfg.actors.teacher_timeout_ms),
        (30_000, 300_000)
    );

    let set = format!("{text}[actors]\nrpc_timeout_ms = 2500\nteacher_timeout_ms = 90000\n");
    let cfg = RunConfig::parse(&set, &path).unwrap();
    assert_eq!(
        (cfg.actors.rpc_timeout_ms, cfg.actors.teacher_timeout_ms),
        (2_500, 90_000)
    );
    let written = cfg.to_toml().unwrap();
    assert_eq!(RunConfig::parse(&written, &path).unwrap(), cfg, "{written}");

    let zero = format!("{text}[actors]\npush_timeout_ms = 0\n");
    let error = RunConfig::parse(&zero, &path).unwrap_err().to_string();
    assert!(
        error.contains("run.toml") && error.contains("push_timeout_ms"),
        "{error}"
    );
}
