//! The JSONL format: round trips, streaming and shuffled reads, and bad rows that are errors
//! naming file, row and field (or skipped and counted, when asked).

use std::path::Path;

use base64::Engine;
use ril_data::dataset::{
    JsonlReader, ReadOptions, ShuffledJsonl, parse_row, read_all, row_to_json,
};

fn png() -> Vec<u8> {
    let img = image::RgbImage::from_pixel(8, 8, image::Rgb([10, 200, 30]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn write(dir: &Path, name: &str, lines: &[String]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

#[test]
fn rows_round_trip_with_paths_base64_and_data_urls() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("img")).unwrap();
    std::fs::write(dir.path().join("img/a.png"), png()).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD.encode(png());
    let lines = vec![
        serde_json::json!({"id": "a", "images": ["img/a.png"], "question": "What colour?", "answer": "green",
            "answer_type": "exact", "family": "colour", "teacher_answers": {"big": ["green", "It is green."]}, "source": "unit"}).to_string(),
        serde_json::json!({"id": 2, "images": [{"bytes": b64}], "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Shape?"}]}], "answer": "square"}).to_string(),
        serde_json::json!({"id": "c", "images": [format!("data:image/png;base64,{b64}")], "question": "<image> Count?", "answer": 3}).to_string(),
        String::new(),
    ];
    let path = write(dir.path(), "d.jsonl", &lines);
    let (rows, report) = read_all(&path, ReadOptions::default()).unwrap();
    assert_eq!(report.skipped, 0);
    assert_eq!(rows.len(), 3);
    assert_eq!(
        rows[0].teacher_answers["big"],
        vec!["green", "It is green."]
    );
    assert_eq!(rows[0].extra["source"], "unit");
    assert_eq!(rows[1].id, "2");
    assert_eq!(rows[1].question_text(), "Shape?");
    assert_eq!(rows[2].answer, "3");
    assert_eq!(rows[2].question_text(), "Count?");
    for r in &rows {
        assert_eq!(r.images[0].bytes, png());
    }
    // Write back (images inlined) and read again: the same rows, image names aside.
    let out: Vec<String> = rows
        .iter()
        .map(|r| row_to_json(r, None).to_string())
        .collect();
    let path2 = write(dir.path(), "e.jsonl", &out);
    let (again, _) = read_all(&path2, ReadOptions::default()).unwrap();
    for (a, b) in rows.iter().zip(&again) {
        assert_eq!(
            (
                &a.id,
                &a.messages,
                &a.answer,
                a.answer_type,
                &a.teacher_answers,
                &a.family,
                &a.extra
            ),
            (
                &b.id,
                &b.messages,
                &b.answer,
                b.answer_type,
                &b.teacher_answers,
                &b.family,
                &b.extra
            )
        );
        assert_eq!(
            a.images.iter().map(|i| &i.bytes).collect::<Vec<_>>(),
            b.images.iter().map(|i| &i.bytes).collect::<Vec<_>>()
        );
    }
}

#[test]
fn bad_rows_name_file_row_and_field() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ok.png"), png()).unwrap();
    std::fs::write(dir.path().join("corrupt.png"), b"\x89PNG\r\n\x1a\n garbage").unwrap();
    let cases = [
        ("{not json", "row 1", "<row>"),
        (r#"{"question": "q", "answer": "a"}"#, "row 1", "`id`"),
        (
            r#"{"id": "x", "question": "  ", "answer": "a"}"#,
            "id x",
            "`question`",
        ),
        (r#"{"id": "x", "question": "q"}"#, "id x", "`answer`"),
        (
            r#"{"id": "x", "question": "q", "answer": "a", "images": ["missing.png"]}"#,
            "missing.png",
            "`images[0]`",
        ),
        (
            r#"{"id": "x", "question": "q", "answer": "a", "images": ["corrupt.png"]}"#,
            "decode",
            "`images[0]`",
        ),
        (
            r#"{"id": "x", "question": "q", "answer": "a", "images": [{"bytes": "%%%"}]}"#,
            "base64",
            "`images[0]`",
        ),
        (
            r#"{"id": "x", "question": "q", "answer": "a", "answer_type": "fuzzy"}"#,
            "fuzzy",
            "`answer_type`",
        ),
        (
            r#"{"id": "x", "question": "<image><image> q", "answer": "a", "images": ["ok.png"]}"#,
            "2 image placeholders",
            "`images`",
        ),
        (
            r#"{"id": "x", "messages": [], "answer": "a"}"#,
            "no question",
            "`messages`",
        ),
        // Found by the fuzzer (fuzz/corpus/jsonl_rows/crash-no-user-turn.jsonl): a row whose
        // turns have text but none is a user's was read, then refused by every role.
        (
            r#"{"id": "x", "messages": [{"role": "userNaN", "content": "q"}], "answer": "a"}"#,
            "no user turn",
            "`messages`",
        ),
        // Found by the fuzzer (fuzz/corpus/jsonl_rows/crash-empty-role.jsonl): a turn with an
        // empty role was read, then refused when the row came back from the wire.
        (
            r#"{"id": "x", "messages": [{"role": "", "content": "Be brief."}, {"role": "user", "content": "q"}], "answer": "a"}"#,
            "every chat turn needs a role",
            "`messages[0].role`",
        ),
    ];
    for (line, must, field) in cases {
        let err = parse_row(line, Path::new("/data/set.jsonl"), 1, dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/data/set.jsonl") && err.contains(must) && err.contains(field),
            "{line}\n -> {err}"
        );
    }
}

/// Found by the bad-input corpus (tests/bad-inputs): an image path that is a device, a pipe or
/// a directory is refused before reading (reading /dev/zero would never end).
#[test]
fn image_paths_that_are_not_regular_files_are_refused_before_reading() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("a-directory")).unwrap();
    for (image, must) in [("/dev/zero", "/dev/zero"), ("a-directory", "a-directory")] {
        let line =
            format!(r#"{{"id": "x", "question": "q", "answer": "a", "images": ["{image}"]}}"#);
        let err = parse_row(&line, Path::new("set.jsonl"), 3, dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("row 3")
                && err.contains("`images[0]`")
                && err.contains(must)
                && err.contains("not a regular file"),
            "{err}"
        );
    }
}

#[test]
fn skip_bad_rows_counts_and_reports_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut lines = Vec::new();
    for i in 0..10 {
        if i % 3 == 0 {
            lines.push(format!(r#"{{"id": "bad{i}", "question": "q"}}"#));
        } else {
            lines.push(format!(
                r#"{{"id": "good{i}", "question": "q{i}", "answer": "a"}}"#
            ));
        }
    }
    let path = write(dir.path(), "d.jsonl", &lines);
    // Strict: the first bad row stops the read with its line number.
    let err = JsonlReader::open(&path, ReadOptions::default())
        .unwrap()
        .find_map(|r| r.err())
        .unwrap();
    assert!(
        err.to_string().contains("row 1") && err.to_string().contains("bad0"),
        "{err}"
    );
    let (rows, report) = read_all(
        &path,
        ReadOptions {
            skip_bad_rows: true,
        },
    )
    .unwrap();
    assert_eq!(rows.len(), 6);
    assert_eq!(report.skipped, 4);
    assert!(
        report.first[0].contains("bad0") && report.first[3].contains("bad9"),
        "{:?}",
        report.first
    );
}

#[test]
fn shuffled_reads_are_deterministic_permutations_and_resumable() {
    let dir = tempfile::tempdir().unwrap();
    let lines: Vec<String> = (0..50)
        .map(|i| format!(r#"{{"id": "r{i}", "question": "q", "answer": "a"}}"#))
        .collect();
    let path = write(dir.path(), "d.jsonl", &lines);
    let ids = |seed| -> Vec<String> {
        ShuffledJsonl::open(&path, seed, ReadOptions::default())
            .unwrap()
            .map(|r| r.unwrap().id)
            .collect()
    };
    let (a, b, c) = (ids(Some(1)), ids(Some(1)), ids(Some(2)));
    assert_eq!(a, b);
    assert_ne!(a, c);
    let mut sorted = a.clone();
    sorted.sort();
    let mut expected: Vec<String> = (0..50).map(|i| format!("r{i}")).collect();
    expected.sort();
    assert_eq!(sorted, expected, "a permutation of the file");
    assert_eq!(
        ids(None),
        (0..50).map(|i| format!("r{i}")).collect::<Vec<_>>()
    );
    let mut r = ShuffledJsonl::open(&path, Some(1), ReadOptions::default()).unwrap();
    r.seek_to(20);
    let rest: Vec<String> = r.map(|x| x.unwrap().id).collect();
    assert_eq!(rest, a[20..]);
}
