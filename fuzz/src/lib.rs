//! Fuzz harnesses: one plain function per target, each feeding arbitrary bytes to a real entry
//! point of ril. Bad input must come back as an error; a panic, a hang or a broken round trip
//! is a bug. The same functions run under libFuzzer (`fuzz/libfuzzer/`, `cargo fuzz`, nightly)
//! and under the stable driver (`cargo run -p ril-fuzz --release -- run ...`, src/main.rs), and
//! `tests/corpus.rs` replays the committed corpus through them on every `cargo test`.
//!
//! Inputs are read-only: harnesses write only into their own scratch directory.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use prost::Message;
use ril_proto::v1;

pub mod seeds;

/// A fuzz target: its name (the corpus directory under `fuzz/corpus/`) and its harness.
pub type Harness = fn(&[u8]);

/// Every target, in the order CI runs them.
pub const TARGETS: &[(&str, Harness)] = &[
    ("run_config", run_config),
    ("jsonl_rows", jsonl_rows),
    ("parquet_rows", parquet_rows),
    ("image", image),
    ("chat_template", chat_template),
    ("answer", answer),
    ("proto_question", proto_question),
    ("proto_scored_groups", proto_scored_groups),
    ("proto_answer_request", proto_answer_request),
    ("proto_sampling", proto_sampling),
    ("proto_weight_chunks", proto_weight_chunks),
    ("checkpoint_bytes", checkpoint_bytes),
];

pub fn harness(name: &str) -> Option<Harness> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, h)| *h)
}

/// `fuzz/corpus/<target>/` in this checkout.
pub fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target)
}

/// The repository root (for fixtures the harnesses load once).
fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("fuzz/ lives in the repository")
}

/// A scratch directory for this process: `data/` and `student/` exist (so a run config's path
/// checks can pass) and `a.png` is a small valid image (so relative image paths can resolve).
fn scratch() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a scratch directory");
        std::fs::create_dir_all(dir.path().join("data")).unwrap();
        std::fs::create_dir_all(dir.path().join("student")).unwrap();
        let png = ril_model::toy::square_png(8, 8, [255, 255, 255], Some([200, 20, 20])).unwrap();
        std::fs::write(dir.path().join("a.png"), png).unwrap();
        dir
    })
    .path()
}

/// Writes `data` to a scratch file named `name` (one per thread, reused) and returns its path.
fn scratch_file(name: &str, data: &[u8]) -> PathBuf {
    let path = scratch().join(format!("{:?}-{name}", std::thread::current().id()));
    let mut f = std::fs::File::create(&path).expect("scratch file");
    f.write_all(data).expect("scratch write");
    path
}

/// The run config (`ril config check`, every role's `--config`): TOML text into a validated
/// [`ril_config::RunConfig`], then into the coordinator's options.
pub fn run_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = scratch().join("run.toml");
    if let Ok(config) = ril_config::RunConfig::parse(text, &path) {
        let _ = config.teacher_slots();
        let _ = config.student_sampling();
        if let Ok(addrs) = config.teacher_addrs() {
            let options = config.coordinator_options(addrs, "127.0.0.1:1".into());
            let _ = options.validate();
        }
    }
}

/// The JSONL dataset reader (`ril data check`, the coordinator's dataset): a file of rows,
/// read to the end with bad rows stopping the read and, separately, skipped and counted.
pub fn jsonl_rows(data: &[u8]) {
    let path = scratch_file("rows.jsonl", data);
    for skip_bad_rows in [false, true] {
        let options = ril_data::dataset::ReadOptions { skip_bad_rows };
        let Ok(reader) = ril_data::dataset::JsonlReader::open(&path, options) else {
            return;
        };
        for row in reader {
            match row {
                Ok(row) => {
                    // What every role does with a row: it becomes a Question and back.
                    let q = ril_proto::convert::row_to_question(&row);
                    let back = ril_proto::convert::question_to_row(&q)
                        .expect("a row read from a dataset converts back from its Question");
                    assert_eq!(back.id, row.id);
                }
                Err(_) => {
                    if !skip_bad_rows {
                        break;
                    }
                }
            }
        }
    }
}

/// The Parquet reader (verl's RL schema): a file, opened and read to the end.
pub fn parquet_rows(data: &[u8]) {
    let path = scratch_file("rows.parquet", data);
    for skip_bad_rows in [false, true] {
        let options = ril_data::dataset::ReadOptions { skip_bad_rows };
        let Ok(reader) = ril_data::parquet::ParquetReader::open(&path, options) else {
            return;
        };
        for row in reader {
            if row.is_err() && !skip_bad_rows {
                break;
            }
        }
    }
}

/// Image decoding and CLIP preprocessing (every role that feeds pixels to a model), with
/// processors that resize and crop (16 and 224 px) and one that does neither.
pub fn image(data: &[u8]) {
    use ril_model::image::{ImageProcessor, ImageProcessorConfig};
    static PROCESSORS: OnceLock<Vec<ImageProcessor>> = OnceLock::new();
    let processors = PROCESSORS.get_or_init(|| {
        let mut plain = ImageProcessorConfig::clip(16);
        plain.do_resize = false;
        plain.do_center_crop = false;
        // CLIP's real size too: resizing to a 224-pixel edge is where extreme aspect ratios hurt.
        [
            ImageProcessorConfig::clip(16),
            plain,
            ImageProcessorConfig::clip(224),
        ]
        .into_iter()
        .map(|c| ImageProcessor::new(c).unwrap())
        .collect()
    });
    let Ok(img) = ril_model::image::ImageProcessor::decode(data, "fuzz.png") else {
        return;
    };
    // Without resizing the tensor is as large as the image: keep that one to small images.
    let small = u64::from(img.width()) * u64::from(img.height()) <= 1 << 16;
    for (i, p) in processors.iter().enumerate() {
        if i == 1 && !small {
            continue;
        }
        if let Ok(t) = p.preprocess(&img, "fuzz.png", &candle_core::Device::Cpu) {
            assert_eq!(t.dims().len(), 3);
            assert_eq!(t.dims()[0], 3);
        }
    }
}

/// Chat-template rendering and tokenization of untrusted conversations (dataset rows' messages)
/// with the repository's templates: transformers' LLaVA and ChatML fixtures and the built-in
/// tokenizer. Templates themselves come with a model directory and are not fuzzed here.
///
/// The input is a JSON list of `{role, content}` messages; anything else becomes the text of
/// one user turn. The first byte's low bit chooses `add_generation_prompt`.
pub fn chat_template(data: &[u8]) {
    use ril_model::tokenizer::{ChatMessage, ChatTokenizer};
    static TOKENIZERS: OnceLock<Vec<ChatTokenizer>> = OnceLock::new();
    let tokenizers = TOKENIZERS.get_or_init(|| {
        let fixtures = repo_root().join("model/tests/fixtures");
        vec![
            ril_model::tokenizer::byte_level_chatml().unwrap(),
            ChatTokenizer::from_dir(&fixtures.join("tokenizer_llava")).unwrap(),
            ChatTokenizer::from_dir(&fixtures.join("tokenizer_chatml")).unwrap(),
        ]
    });
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    let messages: Vec<ChatMessage> =
        serde_json::from_str(&text).unwrap_or_else(|_| vec![ChatMessage::text("user", &text)]);
    for t in tokenizers {
        if let Ok(ids) = t.apply_chat_template(&messages, flags & 1 == 1) {
            let _ = t.decode(&ids, false);
        }
    }
}

/// Answer extraction and checking (the rule-based judge): `response NUL reference`, the answer
/// type chosen by the reference (inferred) and by every explicit type.
pub fn answer(data: &[u8]) {
    use ril_data::AnswerType;
    let text = String::from_utf8_lossy(data);
    let (response, reference) = text.split_once('\0').unwrap_or((&text, "42"));
    let _ = ril_data::answer::extract_final_answer(response);
    let _ = ril_data::answer::normalize(response);
    let _ = ril_data::answer::parse_number(response);
    let _ = ril_data::answer::infer_answer_type(reference);
    for t in [
        None,
        Some(AnswerType::Exact),
        Some(AnswerType::Number),
        Some(AnswerType::Choice),
        Some(AnswerType::YesNo),
        Some(AnswerType::Free),
    ] {
        let _ = ril_data::answer::check(response, reference, t);
    }
}

/// `ril.v1.Question` -> dataset row (teacher `Answer`, discriminator `Score`/`Train`, the
/// learner's groups): the conversion must validate, and a converted row must survive the
/// round trip unchanged (the conversion is documented as lossless).
pub fn proto_question(data: &[u8]) {
    let Ok(q) = v1::Question::decode(data) else {
        return;
    };
    let Ok(row) = ril_proto::convert::question_to_row(&q) else {
        return;
    };
    let again = ril_proto::convert::question_to_row(&ril_proto::convert::row_to_question(&row))
        .expect("a row made from a Question converts back");
    assert_eq!(
        again, row,
        "Question -> row -> Question -> row changed the row"
    );
}

/// The learner's `PushGroups` / `TrainShard` payload: every group through the wire -> domain
/// conversion; an accepted conversion must convert back (what rank 0 sends to other ranks).
pub fn proto_scored_groups(data: &[u8]) {
    use ril_learner::service::{IncomingGroup, LabelledGroup};
    let Ok(request) = v1::PushGroupsRequest::decode(data) else {
        return;
    };
    for g in &request.groups {
        if let Ok(incoming) = IncomingGroup::try_from(g) {
            let wire = v1::ScoredGroup::from(&incoming);
            let again = IncomingGroup::try_from(&wire)
                .expect("a converted group converts back from its wire form");
            assert_eq!(again.row, incoming.row);
            assert_eq!(again.responses.len(), incoming.responses.len());
            let _ = ril_learner::convert::labelled_responses(&[LabelledGroup::from(&incoming)]);
        }
    }
}

/// The teacher's `Answer` request: question, n and sampling validated into a domain query.
pub fn proto_answer_request(data: &[u8]) {
    let Ok(request) = v1::AnswerRequest::decode(data) else {
        return;
    };
    let _ = ril_teacher::AnswerQuery::try_from(request);
}

/// Sampling settings from the wire (the coordinator's `RegisterActor` answer for actors; an
/// `Answer` request for teachers), validated by each side.
pub fn proto_sampling(data: &[u8]) {
    let Ok(s) = v1::SamplingSettings::decode(data) else {
        return;
    };
    let _ = ril_proto::convert::sampling_from_wire(&s).map(|p| p.validate());
    let _ = ril_teacher::convert::sampling_from_request(&s);
    if let Ok(registration) = ril_proto::v1::RegisterActorResponse::decode(data) {
        let _ = ril_actor::Registration::try_from(registration);
    }
}

/// The actor's weight-sync reassembly: a stream of length-delimited `WeightChunk`s; a payload
/// that comes out must carry the SHA-256 it was announced with.
pub fn proto_weight_chunks(data: &[u8]) {
    use sha2::Digest;
    let mut buf = data;
    let mut assembler = ril_actor::sync::Assembler::new();
    while !buf.is_empty() {
        let Ok(chunk) = v1::WeightChunk::decode_length_delimited(&mut buf) else {
            return;
        };
        if assembler.push(chunk).is_err() {
            return;
        }
    }
    if let Ok(payload) = assembler.finish() {
        let digest: [u8; 32] = sha2::Sha256::digest(&payload.bytes).into();
        assert_eq!(
            digest, payload.sha256,
            "a payload passed with the wrong SHA-256"
        );
    }
}

/// Safetensors bytes into a model (what an actor does with a weight transfer, and checkpoint
/// loading after reading the file): strict and lenient loads of a test-size model.
pub fn checkpoint_bytes(data: &[u8]) {
    use ril_model::checkpoint::{LoadOptions, load_weights_from_bytes};
    static MODEL: OnceLock<ril_model::Vlm> = OnceLock::new();
    let model = MODEL.get_or_init(|| {
        let tokenizer = ril_model::tokenizer::byte_level_chatml().unwrap();
        let image_id = tokenizer.token_id("<image>").unwrap();
        let cfg = ril_model::LlavaConfig::for_tests(tokenizer.vocab_size(), image_id);
        ril_model::Vlm::new_random(
            &cfg,
            ril_model::Head::LanguageModel,
            &candle_core::Device::Cpu,
            candle_core::DType::F32,
            1,
        )
        .unwrap()
    });
    for options in [
        LoadOptions::strict(),
        LoadOptions::discriminator_from_student(),
    ] {
        let _ = load_weights_from_bytes(model, data, "fuzz.safetensors", options);
    }
}
