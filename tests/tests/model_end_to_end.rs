//! The model's life through the `ril` binary, as a user runs it: the self-check writes real
//! model directories, `ril model generate` loads one and answers about an image file, and bad
//! files get errors that name them.

use ril_tests::{Sandbox, stderr, stdout};

#[test]
fn selfcheck_then_generate_from_the_saved_directory() {
    let sb = Sandbox::new();
    let out = sb.ril(&["--log-format", "json", "model", "selfcheck", "--out", "run"]);
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let text = stdout(&out);
    assert_eq!(text.matches("[PASS]").count(), 6, "{text}");
    // JSON logs: every stderr line is a JSON object with a level.
    for line in stderr(&out).lines().filter(|l| !l.is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}"));
        assert!(v.get("level").is_some(), "{line}");
    }
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(sb.path("run/selfcheck.json")).unwrap())
            .unwrap();
    assert!(
        report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["passed"] == true)
    );

    // A blue square as a JPEG file the user has on disk.
    let png = ril_model::toy::square_png(64, 48, [255, 255, 255], Some([30, 40, 220])).unwrap();
    let img = image_from_png_as_jpeg(&png);
    std::fs::write(sb.path("blue.jpg"), img).unwrap();
    let out = sb.ril(&[
        "model",
        "generate",
        "--model",
        "run/trained",
        "--image",
        "blue.jpg",
        "--prompt",
        "What colour is the square?",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let answer: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(answer["text"], "blue", "{answer}");
    assert_eq!(answer["finish_reason"], "stop");

    let out = sb.ril(&["model", "info", "--model", "run/trained"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("parameters:"));

    // A corrupt image is an error naming the file.
    std::fs::write(sb.path("broken.png"), b"\x89PNG\r\n\x1a\nnot really").unwrap();
    let out = sb.ril(&[
        "model",
        "generate",
        "--model",
        "run/trained",
        "--image",
        "broken.png",
        "--prompt",
        "?",
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("broken.png"), "{}", stderr(&out));

    // A malformed config.json is an error naming the file.
    std::fs::write(sb.path("run/trained/config.json"), "{\"text_config\": ").unwrap();
    let out = sb.ril(&["model", "info", "--model", "run/trained"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("config.json"), "{}", stderr(&out));
}

fn image_from_png_as_jpeg(png: &[u8]) -> Vec<u8> {
    // Re-encode through the `image` crate that `ril_model` uses, as a JPEG.
    let decoded = ril_model::image::ImageProcessor::decode(png, "square").unwrap();
    let mut out = std::io::Cursor::new(Vec::new());
    decoded
        .write_to(&mut out, ril_model::image::ImageFormat::Jpeg)
        .unwrap();
    out.into_inner()
}
