//! The data → tokenizer → model → SFT → evaluation path through the `ril` binary, as the README
//! documents it, on a small synthetic dataset.

use ril_tests::{Sandbox, ok, stderr, stdout};

#[test]
fn synth_tokenizer_init_sft_eval() {
    let sb = Sandbox::new();
    let out = sb.ril(&[
        "data",
        "synth",
        "--out",
        "shapes",
        "--seed",
        "3",
        "--n-train",
        "64",
        "--n-val",
        "16",
        "--n-test",
        "16",
        "--image-size",
        "32",
        "--max-objects",
        "3",
    ]);
    ok(&out);
    let out = sb.ril(&["data", "check", "--data", "shapes"]);
    ok(&out);
    assert!(
        stdout(&out).contains("train.jsonl: 64 rows, 64 images"),
        "{}",
        stdout(&out)
    );
    ok(&sb.ril(&[
        "tokenizer",
        "train",
        "--data",
        "shapes",
        "--out",
        "tok",
        "--vocab-size",
        "320",
    ]));
    ok(&sb.ril(&[
        "model",
        "init",
        "--tokenizer",
        "tok",
        "--size",
        "test",
        "--out",
        "init",
    ]));
    let out = sb.ril(&[
        "sft",
        "--model",
        "init",
        "--data",
        "shapes",
        "--out",
        "sft",
        "--steps",
        "12",
        "--batch-size",
        "4",
        "--lr",
        "3e-3",
        "--eval-every",
        "12",
        "--eval-rows",
        "16",
        "--save-every",
        "6",
        "--log-every",
        "4",
    ]);
    ok(&out);
    let text = stdout(&out);
    // "val loss A -> B": training on the answers lowers it.
    let losses: Vec<f64> = text
        .split("val loss ")
        .nth(1)
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .split(" -> ")
        .map(|v| v.trim().parse().unwrap())
        .collect();
    assert!(losses[1] < losses[0], "{text}");
    assert!(
        sb.path("sft/checkpoint-000006/trainer_state.json")
            .is_file()
    );
    // Resume from the checkpoint to the same end.
    ok(&sb.ril(&[
        "sft",
        "--resume",
        "sft/checkpoint-000006",
        "--data",
        "shapes",
        "--out",
        "sft-resumed",
        "--steps",
        "12",
        "--batch-size",
        "4",
        "--lr",
        "3e-3",
        "--eval-every",
        "0",
        "--save-every",
        "0",
    ]));
    let a = std::fs::read(sb.path("sft/final/model.safetensors")).unwrap();
    let b = std::fs::read(sb.path("sft-resumed/final/model.safetensors")).unwrap();
    assert_eq!(a, b, "a resumed run ends with the same weights");

    // A bigger decoder over the trained vision tower (LLaVA's recipe): the tower's tensors are
    // copied bit for bit, the rest is new.
    ok(&sb.ril(&[
        "model",
        "init",
        "--tokenizer",
        "tok",
        "--size",
        "test",
        "--hidden",
        "96",
        "--layers",
        "3",
        "--seed",
        "5",
        "--vision-from",
        "sft/final",
        "--out",
        "bigger",
    ]));
    let load = |dir: &str| {
        candle_core::safetensors::load(
            sb.path(&format!("{dir}/model.safetensors")),
            &candle_core::Device::Cpu,
        )
        .unwrap()
    };
    let (trained, bigger) = (load("sft/final"), load("bigger"));
    let mut vision = 0;
    for (name, t) in &bigger {
        let same = trained.get(name).is_some_and(|u| {
            u.dims() == t.dims()
                && u.flatten_all().unwrap().to_vec1::<f32>().unwrap()
                    == t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        });
        if name.starts_with("vision_tower.") {
            assert!(same, "{name} was not copied");
            vision += 1;
        } else if name.starts_with("language_model.") && name.ends_with("proj.weight") {
            assert!(!same, "{name} should be new");
        }
    }
    assert!(vision > 10, "{vision} vision tensors");
    // Training the new decoder with the tower frozen leaves the tower as it was.
    let sft_frozen = |freeze: &str, out: &str| {
        sb.ril(&[
            "sft",
            "--model",
            "bigger",
            "--data",
            "shapes",
            "--out",
            out,
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--eval-every",
            "0",
            "--save-every",
            "0",
            "--freeze",
            freeze,
        ])
    };
    ok(&sft_frozen("vision_tower", "frozen"));
    let frozen = load("frozen/final");
    let changed = |name: &str| {
        frozen[name]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            != bigger[name]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
    };
    for name in bigger.keys() {
        if name.starts_with("vision_tower.") {
            assert!(!changed(name), "{name} moved although frozen");
        }
    }
    assert!(
        bigger
            .keys()
            .any(|n| n.starts_with("language_model.") && changed(n)),
        "the decoder did not train"
    );
    let out = sft_frozen("no_such_module", "nothing");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("--freeze no_such_module"),
        "{}",
        stderr(&out)
    );
    // A tower of another shape is refused, naming both.
    let out = sb.ril(&[
        "model",
        "init",
        "--tokenizer",
        "tok",
        "--size",
        "test",
        "--vision-hidden",
        "48",
        "--vision-from",
        "sft/final",
        "--out",
        "mismatch",
    ]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("--vision-from") && err.contains("width 32") && err.contains("width 48"),
        "{err}"
    );

    let out = sb.ril(&[
        "eval",
        "--model",
        "sft/final",
        "--data",
        "shapes",
        "--split",
        "test",
        "--out",
        "eval.json",
        "--max-new-tokens",
        "8",
    ]);
    ok(&out);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(sb.path("eval.json")).unwrap()).unwrap();
    assert_eq!(report["questions"], 16);
    let acc = report["accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc));
    assert!(
        stdout(&out).contains("| **all** | 16 |"),
        "{}",
        stdout(&out)
    );

    // Bad input: a dataset row with a missing answer stops evaluation with file, row and field.
    std::fs::write(
        sb.path("bad.jsonl"),
        "{\"id\": \"q1\", \"question\": \"Why?\"}\n",
    )
    .unwrap();
    let out = sb.ril(&["eval", "--model", "sft/final", "--data", "bad.jsonl"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("bad.jsonl") && err.contains("row 1") && err.contains("`answer`"),
        "{err}"
    );
}
