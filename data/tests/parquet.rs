//! verl's RL Parquet schema: round trips through `write_verl_parquet`, streaming across row
//! groups, bad rows that are errors naming file, row and field (or skipped and counted), files
//! that are not Parquet, and fixtures written by Hugging Face `datasets` as verl writes them
//! (`tools/verl_fixture.py`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::{
    Array, ArrayRef, BinaryArray, Int64Array, ListArray, RecordBatch, StringArray, StructArray,
};
use arrow_buffer::{NullBuffer, OffsetBuffer};
use arrow_schema::{Field, Schema};
use base64::Engine;
use parquet::arrow::ArrowWriter;
use parquet::file::reader::{FileReader, SerializedFileReader};
use ril_data::dataset::{ImageData, ReadOptions, Row, SkipReport, parse_row};
use ril_data::parquet::{ParquetReader, WriteOptions, write_verl_parquet, write_verl_parquet_with};
use ril_data::{AnswerType, DataError};
use serde_json::{Value, json};

fn png(width: u32, height: u32, rgb: [u8; 3]) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(width, height, image::Rgb(rgb));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A row as the JSONL reader builds it.
fn jsonl_row(value: Value) -> Row {
    parse_row(
        &value.to_string(),
        Path::new("rows.jsonl"),
        1,
        Path::new("."),
    )
    .unwrap()
}

fn read(path: &Path, options: ReadOptions) -> (Vec<ril_data::Result<Row>>, SkipReport, usize) {
    let mut reader = ParquetReader::open(path, options).unwrap();
    let num_rows = reader.num_rows();
    let rows: Vec<_> = reader.by_ref().collect();
    (rows, reader.skip_report().clone(), num_rows)
}

fn read_ok(path: &Path) -> Vec<Row> {
    let (rows, report, _) = read(path, ReadOptions::default());
    assert_eq!(report.skipped, 0);
    rows.into_iter().collect::<ril_data::Result<_>>().unwrap()
}

/// `extra_info` without null fields: Parquet stores the union of all rows' keys, so a key one
/// row lacks reads back as null.
fn without_nulls(value: &Value) -> Value {
    match value {
        Value::Object(o) => Value::Object(
            o.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), without_nulls(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(without_nulls).collect()),
        v => v.clone(),
    }
}

fn bad_row(result: &ril_data::Result<Row>) -> (PathBuf, usize, Option<String>, String) {
    match result {
        Err(DataError::BadRow {
            file,
            row,
            id,
            field,
            ..
        }) => (file.clone(), *row, id.clone(), field.clone()),
        other => panic!("expected a bad row, got {other:?}"),
    }
}

#[test]
fn rows_round_trip_with_one_two_and_no_images() {
    let dir = tempfile::tempdir().unwrap();
    let (red, green, blue) = (
        png(4, 4, [255, 0, 0]),
        png(3, 2, [0, 255, 0]),
        png(2, 5, [0, 0, 255]),
    );
    let rows = vec![
        jsonl_row(
            json!({"id": "a", "images": [{"bytes": b64(&red)}], "question": "<image>What colour is it?",
            "answer": "red", "answer_type": "exact", "family": "colour", "teacher_answers": {"big": ["red", "It is red."]},
            "source": "unit", "ability": "perception", "extra_info": {"difficulty": 2}}),
        ),
        jsonl_row(
            json!({"id": "b", "images": [{"bytes": b64(&green)}, {"bytes": b64(&blue)}],
            "question": "<image> and <image>: which is taller? Answer A or B.", "answer": "B", "answer_type": "choice",
            "source": "unit"}),
        ),
        jsonl_row(json!({"id": "c", "question": "What is 2 + 3?", "answer": 5})),
        jsonl_row(
            json!({"id": "d", "images": [{"bytes": b64(&red)}], "messages": [
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Shape?"}]}],
            "answer": "square"}),
        ),
    ];
    let path = dir.path().join("train.parquet");
    write_verl_parquet(&rows, &path, "unit-test", "train").unwrap();

    let (results, report, num_rows) = read(&path, ReadOptions::default());
    assert_eq!((num_rows, report.skipped), (4, 0));
    let again: Vec<Row> = results.into_iter().map(Result::unwrap).collect();
    assert_eq!(again.len(), 4);
    for (i, (before, after)) in rows.iter().zip(&again).enumerate() {
        assert_eq!(after.id, before.id);
        assert_eq!(after.answer, before.answer);
        assert_eq!(after.answer_type, before.answer_type);
        assert_eq!(after.teacher_answers, before.teacher_answers);
        assert_eq!(after.question_text(), before.question_text());
        assert_eq!(after.image_placeholders(), before.image_placeholders());
        let bytes = |r: &Row| r.images.iter().map(|i| i.bytes.clone()).collect::<Vec<_>>();
        assert_eq!(bytes(after), bytes(before), "row {i}");
        assert_eq!(
            after.family,
            before.family.clone().or(Some("unit-test".into()))
        );
        assert_eq!(after.extra["data_source"], "unit-test");
        assert_eq!(
            after.extra["reward_model"],
            json!({"style": "rule", "ground_truth": before.answer})
        );
        assert_eq!(after.extra.get("source"), before.extra.get("source"));
        assert_eq!(after.extra.get("ability"), before.extra.get("ability"));
    }
    // Messages with string content come back as they were; list content becomes verl's one
    // string with placeholders.
    for i in 0..3 {
        assert_eq!(again[i].messages, rows[i].messages);
    }
    assert_eq!(again[3].messages[0], rows[3].messages[0]);
    assert_eq!(again[3].messages[1].content, "<image>Shape?");
    assert_eq!(again[0].images[0].name, "a#image0");

    assert_eq!(
        without_nulls(&again[0].extra["extra_info"]),
        json!({"difficulty": 2, "split": "train", "index": 0, "id": "a", "answer": "red",
            "question": "<image>What colour is it?", "family": "colour", "answer_type": "exact",
            "teacher_answers": {"big": ["red", "It is red."]}})
    );
    assert_eq!(
        without_nulls(&again[2].extra["extra_info"]),
        json!({"split": "train", "index": 2, "id": "c", "answer": "5", "question": "What is 2 + 3?"})
    );

    // Writing what was read gives the same rows again.
    let path2 = dir.path().join("again.parquet");
    write_verl_parquet(&again, &path2, "unit-test", "train").unwrap();
    assert_eq!(read_ok(&path2), again);
}

#[test]
fn small_row_groups_stream_and_rows_are_numbered_across_groups() {
    let dir = tempfile::tempdir().unwrap();
    let image = png(2, 2, [9, 9, 9]);
    let rows: Vec<Row> = (0..150)
        .map(|i| {
            let mut row = if i % 10 == 0 {
                jsonl_row(
                    json!({"id": format!("r{i}"), "images": [{"bytes": b64(&image)}], "question": format!("<image>Count {i}?"), "answer": i}),
                )
            } else {
                jsonl_row(json!({"id": format!("r{i}"), "question": format!("What is {i} + 0?"), "answer": i}))
            };
            if i == 20 {
                row.images[0] = ImageData {
                    name: "broken".into(),
                    bytes: b"\x89PNG\r\n\x1a\nnot really".to_vec(),
                };
            }
            if i == 129 {
                row.messages[0].content = json!("  ");
            }
            row
        })
        .collect();
    let path = dir.path().join("groups.parquet");
    let options = WriteOptions {
        max_rows_per_group: 40,
        ..WriteOptions::default()
    };
    write_verl_parquet_with(&rows, &path, "groups", "train", options).unwrap();
    let file = SerializedFileReader::new(std::fs::File::open(&path).unwrap()).unwrap();
    let groups: Vec<i64> = file
        .metadata()
        .row_groups()
        .iter()
        .map(|g| g.num_rows())
        .collect();
    assert_eq!(groups, vec![40, 40, 40, 30]);

    let (results, report, num_rows) = read(&path, ReadOptions::default());
    assert_eq!((num_rows, results.len(), report.skipped), (150, 150, 0));
    for (i, result) in results.iter().enumerate() {
        match i {
            20 => assert_eq!(
                bad_row(result),
                (path.clone(), 21, Some("r20".into()), "images[0]".into())
            ),
            129 => assert_eq!(
                bad_row(result),
                (path.clone(), 130, Some("r129".into()), "prompt".into())
            ),
            _ => assert_eq!(result.as_ref().unwrap().id, format!("r{i}")),
        }
    }

    let (results, report, _) = read(
        &path,
        ReadOptions {
            skip_bad_rows: true,
        },
    );
    assert_eq!(results.len(), 148);
    assert!(results.iter().all(Result::is_ok));
    assert_eq!(report.skipped, 2);
    assert!(report.first[0].contains("row 21 (id r20), field `images[0]`"));
    assert!(report.first[1].contains("row 130 (id r129), field `prompt`"));
}

/// Columns built by hand with Arrow, as another writer (pyarrow) might lay them out.
fn strings(values: &[Option<&str>]) -> ArrayRef {
    Arc::new(StringArray::from(values.to_vec()))
}

fn list_of(values: ArrayRef, lengths: &[Option<usize>]) -> ArrayRef {
    let field = Arc::new(Field::new("element", values.data_type().clone(), true));
    Arc::new(ListArray::new(
        field,
        OffsetBuffer::from_lengths(lengths.iter().map(|l| l.unwrap_or(0))),
        values,
        Some(NullBuffer::from(
            lengths.iter().map(Option::is_some).collect::<Vec<_>>(),
        )),
    ))
}

fn struct_of(fields: Vec<(&str, ArrayRef)>) -> ArrayRef {
    Arc::new(StructArray::from(
        fields
            .into_iter()
            .map(|(name, a)| (Arc::new(Field::new(name, a.data_type().clone(), true)), a))
            .collect::<Vec<_>>(),
    ))
}

fn user_prompts(contents: &[&str]) -> ArrayRef {
    let roles = vec![Some("user"); contents.len()];
    let contents: Vec<Option<&str>> = contents.iter().copied().map(Some).collect();
    list_of(
        struct_of(vec![
            ("role", strings(&roles)),
            ("content", strings(&contents)),
        ]),
        &vec![Some(1); contents.len()],
    )
}

fn write_batch(path: &Path, columns: Vec<(&str, ArrayRef)>) {
    let schema = Arc::new(Schema::new(
        columns
            .iter()
            .map(|(name, a)| Field::new(*name, a.data_type().clone(), true))
            .collect::<Vec<_>>(),
    ));
    let batch = RecordBatch::try_new(
        schema.clone(),
        columns.into_iter().map(|(_, a)| a).collect(),
    )
    .unwrap();
    let mut writer =
        ArrowWriter::try_new(std::fs::File::create(path).unwrap(), schema, None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
}

#[test]
fn bad_rows_name_file_row_and_field_and_can_be_skipped() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("img")).unwrap();
    let good = png(3, 3, [1, 2, 3]);
    std::fs::write(dir.path().join("img/p.png"), &good).unwrap();
    let garbage = b"GIF89a but not really".to_vec();
    // (bytes, path) of each image.
    let images: Vec<(Option<&[u8]>, Option<&str>)> = vec![
        (Some(&good), None),       // row 1
        (Some(&garbage), None),    // row 2: does not decode
        (Some(&good), None),       // row 3: empty question
        (Some(&good), None),       // row 5: two placeholders, one image
        (None, Some("img/p.png")), // row 6: a path next to the file
    ];
    let image_structs = struct_of(vec![
        (
            "bytes",
            Arc::new(BinaryArray::from(
                images.iter().map(|(b, _)| *b).collect::<Vec<_>>(),
            )) as ArrayRef,
        ),
        (
            "path",
            strings(&images.iter().map(|(_, p)| *p).collect::<Vec<_>>()),
        ),
    ]);
    let columns = vec![
        ("data_source", strings(&[Some("hand"); 7])),
        (
            "prompt",
            user_prompts(&[
                "<image>What colour?",
                "<image>Colour?",
                "   <image>  ",
                "What is 1 + 1?",
                "<image><image>Compare them.",
                "<image>Which shade?",
                "What is 2 + 2?",
            ]),
        ),
        (
            "images",
            list_of(
                image_structs,
                &[Some(1), Some(1), Some(1), None, Some(1), Some(1), Some(0)],
            ),
        ),
        ("ability", strings(&[Some("colour"); 7])),
        (
            "reward_model",
            struct_of(vec![
                ("style", strings(&[Some("rule"); 7])),
                (
                    "ground_truth",
                    strings(&[
                        Some("red"),
                        Some("blue"),
                        Some("green"),
                        None,
                        Some("left"),
                        Some("grey"),
                        Some("4"),
                    ]),
                ),
            ]),
        ),
        (
            "extra_info",
            struct_of(vec![
                ("split", strings(&[Some("val"); 7])),
                (
                    "index",
                    Arc::new(Int64Array::from((0..7).collect::<Vec<i64>>())) as ArrayRef,
                ),
            ]),
        ),
    ];
    let path = dir.path().join("bad.parquet");
    write_batch(&path, columns);

    let (results, _, num_rows) = read(&path, ReadOptions::default());
    assert_eq!((num_rows, results.len()), (7, 7));
    let expected_bad = [
        (1, "images[0]"),
        (2, "prompt"),
        (3, "reward_model.ground_truth"),
        (4, "images"),
    ];
    for (i, field) in expected_bad {
        assert_eq!(
            bad_row(&results[i]),
            (
                path.clone(),
                i + 1,
                Some(format!("hand-val-{i}")),
                field.into()
            )
        );
    }
    let message = results[1].as_ref().unwrap_err().to_string();
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(
        message.contains("row 2 (id hand-val-1), field `images[0]`"),
        "{message}"
    );
    assert!(message.contains("cannot decode"), "{message}");
    let message = results[3].as_ref().unwrap_err().to_string();
    assert!(
        message.ends_with("field `reward_model.ground_truth`: missing"),
        "{message}"
    );

    let ok: Vec<&Row> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(
        ok.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        ["hand-val-0", "hand-val-5", "hand-val-6"]
    );
    assert_eq!(ok[1].images[0].bytes, good);
    assert_eq!(
        ok[1].images[0].name,
        dir.path().join("img/p.png").display().to_string()
    );
    assert!(ok[2].images.is_empty());
    assert_eq!(ok[2].extra["ability"], "colour");

    let (results, report, _) = read(
        &path,
        ReadOptions {
            skip_bad_rows: true,
        },
    );
    assert_eq!(results.len(), 3);
    assert!(results.iter().all(Result::is_ok));
    assert_eq!(report.skipped, 4);
    assert_eq!(report.first.len(), 4);
    assert!(report.first[2].contains("row 4 (id hand-val-3), field `reward_model.ground_truth`"));
}

/// A chat turn whose role is empty or blank is refused at read, naming the row, the `prompt`
/// field and the turn (as JSONL refuses `messages[i].role`); the rows around it are read.
#[test]
fn a_turn_with_an_empty_role_is_a_bad_row_naming_the_turn() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = list_of(
        struct_of(vec![
            (
                "role",
                strings(&[Some("user"), Some("user"), Some(""), Some("  ")]),
            ),
            (
                "content",
                strings(&[
                    Some("2 + 2?"),
                    Some("3 + 3?"),
                    Some("4 + 4?"),
                    Some("5 + 5?"),
                ]),
            ),
        ]),
        &[Some(1), Some(2), Some(1)],
    );
    let columns = vec![
        ("prompt", prompts),
        (
            "reward_model",
            struct_of(vec![(
                "ground_truth",
                strings(&[Some("4"), Some("6"), Some("10")]),
            )]),
        ),
    ];
    let path = dir.path().join("roles.parquet");
    write_batch(&path, columns);
    let (results, _, num_rows) = read(&path, ReadOptions::default());
    assert_eq!((num_rows, results.len()), (3, 3));
    assert_eq!(results[0].as_ref().unwrap().messages[0].role, "user");
    assert_eq!(
        bad_row(&results[1]),
        (path.clone(), 2, Some("roles-2".into()), "prompt".into())
    );
    let message = results[1].as_ref().unwrap_err().to_string();
    assert!(
        message.contains("turn 1 needs `role` (a non-empty string)"),
        "{message}"
    );
    let message = results[2].as_ref().unwrap_err().to_string();
    assert!(message.contains("turn 0 needs `role`"), "{message}");
}

#[test]
fn tolerant_of_list_ground_truths_string_prompts_and_extra_columns() {
    let dir = tempfile::tempdir().unwrap();
    let ground_truths = list_of(
        strings(&[Some("4"), Some("four"), Some("")]),
        &[Some(2), Some(1)],
    );
    let columns = vec![
        (
            "prompt",
            strings(&[Some("What is 2 + 2?"), Some("Say nothing.")]),
        ),
        (
            "reward_model",
            struct_of(vec![("ground_truth", ground_truths)]),
        ),
        (
            "difficulty",
            Arc::new(Int64Array::from(vec![Some(3), None])) as ArrayRef,
        ),
    ];
    let path = dir.path().join("plain.parquet");
    write_batch(&path, columns);
    let (results, _, _) = read(&path, ReadOptions::default());
    let row = results[0].as_ref().unwrap();
    // No extra_info: the id is the file stem and the row number.
    assert_eq!(row.id, "plain-1");
    assert_eq!(row.answer, "4");
    assert_eq!(row.messages[0].role, "user");
    assert_eq!(row.question_text(), "What is 2 + 2?");
    assert_eq!(row.family, None);
    assert_eq!(
        row.extra["reward_model"],
        json!({"ground_truth": ["4", "four"]})
    );
    assert_eq!(row.extra["difficulty"], 3);
    assert_eq!(
        bad_row(&results[1]),
        (
            path.clone(),
            2,
            Some("plain-2".into()),
            "reward_model.ground_truth".into()
        )
    );
}

#[test]
fn files_that_are_not_verl_parquet_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let rows = vec![jsonl_row(
        json!({"id": "a", "question": "Why?", "answer": "because"}),
    )];
    let good = dir.path().join("good.parquet");
    write_verl_parquet(&rows, &good, "unit", "train").unwrap();
    let bytes = std::fs::read(&good).unwrap();

    let truncated = dir.path().join("truncated.parquet");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let text = dir.path().join("text.parquet");
    std::fs::write(&text, "{\"id\": \"a\"}\n").unwrap();
    let empty = dir.path().join("empty.parquet");
    std::fs::write(&empty, "").unwrap();
    for path in [&truncated, &text, &empty] {
        let err = ParquetReader::open(path, ReadOptions::default()).unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, DataError::Invalid(_)), "{err:?}");
        assert!(
            message.starts_with(&format!("{}: not a readable Parquet file", path.display())),
            "{message}"
        );
    }

    let absent = dir.path().join("absent.parquet");
    let err = ParquetReader::open(&absent, ReadOptions::default()).unwrap_err();
    assert!(
        matches!(err, DataError::Io { ref path, .. } if *path == absent),
        "{err:?}"
    );

    let no_prompt = dir.path().join("no_prompt.parquet");
    write_batch(&no_prompt, vec![("question", strings(&[Some("Why?")]))]);
    let message = ParquetReader::open(&no_prompt, ReadOptions::default())
        .unwrap_err()
        .to_string();
    assert_eq!(
        message,
        format!(
            "{}: column `prompt` (verl's RL schema) not found",
            no_prompt.display()
        )
    );
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

const GEO3K_INSTRUCTION: &str = " You FIRST think about the reasoning process as an internal \
    monologue and then provide the final answer. The reasoning process MUST BE enclosed within \
    <think> </think> tags. The final answer MUST BE put in \\boxed{}.";

#[test]
fn reads_what_hugging_face_datasets_writes_for_verl() {
    let path = fixture("verl_tiny.parquet");
    let (results, report, num_rows) = read(&path, ReadOptions::default());
    assert_eq!((num_rows, report.skipped), (3, 0));
    let rows: Vec<Row> = results.into_iter().map(Result::unwrap).collect();
    let questions = [
        "<image>Find x. Round to the nearest tenth.",
        "<image>Which figure has the larger area? <image>Answer A or B.",
        "What is 7 times 6?",
    ];
    let answers = ["3.5", "B", "42"];
    // (width, height, colour) of each row's images.
    let images: [&[(u32, u32, [u8; 3])]; 3] = [
        &[(4, 3, [255, 0, 0])],
        &[(4, 3, [0, 255, 0]), (2, 5, [0, 0, 255])],
        &[],
    ];
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row.id, format!("hiyouga/geometry3k-train-{i}"));
        assert_eq!(row.messages.len(), 1);
        assert_eq!(row.messages[0].role, "user");
        assert_eq!(
            row.messages[0].content,
            format!("{}{GEO3K_INSTRUCTION}", questions[i])
        );
        assert_eq!(row.answer, answers[i]);
        assert_eq!(row.answer_type, None);
        assert_eq!(row.family.as_deref(), Some("hiyouga/geometry3k"));
        assert_eq!(row.image_placeholders(), images[i].len());
        assert_eq!(row.images.len(), images[i].len());
        for (j, (image, &(width, height, colour))) in row.images.iter().zip(images[i]).enumerate() {
            assert_eq!(image.name, format!("{}#image{j}", row.id));
            let decoded = image::load_from_memory(&image.bytes).unwrap().to_rgb8();
            assert_eq!(decoded.dimensions(), (width, height));
            assert_eq!(decoded.get_pixel(0, 0).0, colour);
        }
        assert_eq!(row.extra["data_source"], "hiyouga/geometry3k");
        assert_eq!(row.extra["ability"], "math");
        assert_eq!(
            row.extra["reward_model"],
            json!({"style": "rule", "ground_truth": answers[i]})
        );
        assert_eq!(
            row.extra["extra_info"],
            json!({"split": "train", "index": i, "answer": answers[i], "question": questions[i]})
        );
    }

    // Written again by ril and read back: the same rows, with the id now in extra_info.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("geo3k.parquet");
    write_verl_parquet(&rows, &out, "hiyouga/geometry3k", "train").unwrap();
    for (before, mut after) in rows.iter().zip(read_ok(&out)) {
        let info = after.extra["extra_info"].as_object_mut().unwrap();
        assert_eq!(info.remove("id"), Some(Value::String(before.id.clone())));
        assert_eq!(&after, before);
    }
}

#[test]
fn reads_a_text_only_verl_file_without_an_images_column() {
    let rows = read_ok(&fixture("verl_tiny_text.parquet"));
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert_eq!(row.id, "openai/gsm8k-test-0");
    assert!(row.images.is_empty());
    assert_eq!(
        row.question_text(),
        "Tom has 3 apples and buys 4 more. How many apples does he have? Let's think step by step."
    );
    assert_eq!(row.answer, "7");
    assert_eq!(row.family.as_deref(), Some("openai/gsm8k"));
    assert_eq!(
        row.extra["extra_info"]["answer"],
        "3 + 4 = 7 apples.\n#### 7"
    );
    assert_eq!(row.answer_type, None::<AnswerType>);
}

/// Found by the fuzzer (fuzz/corpus/parquet_rows/crash-arrow-offset-out-of-bounds.parquet):
/// verl_tiny.parquet with a few bytes changed made the parquet crate panic ("offset + len out
/// of bounds" in arrow-buffer) while decoding definition levels. It is an error naming the file.
#[test]
fn a_file_the_decoder_panics_on_is_an_error_naming_it() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/corrupt_def_levels.parquet");
    let err = ril_data::dataset::read_all(&path, ril_data::dataset::ReadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("corrupt_def_levels.parquet") && err.contains("corrupt file"),
        "{err}"
    );
}

/// A fuzzed file on which the parquet crate's decoder kept reading at the end of the file
/// (750,000 empty reads, 34 s for 13 KB). Reading past the end is now an error, naming the file.
#[test]
fn a_file_the_decoder_reads_past_the_end_of_is_an_error_naming_it() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/reads_past_end.parquet");
    for skip_bad_rows in [false, true] {
        let options = ril_data::dataset::ReadOptions { skip_bad_rows };
        let err = ril_data::dataset::read_all(&path, options)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("reads_past_end.parquet") && err.contains("past the end of the file"),
            "{err}"
        );
    }
}
