//! The local-checkpoint backend with a tiny random model saved as a real checkpoint directory
//! and real PNG images: concurrent requests share one batch, answers are reproducible for a
//! seed whatever their batch, and a question with a broken image is rejected with its id.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};
use common::{Server, ask, from_cache, info, request, row, sampling, texts};
use ril_model::bundle::Bundle;
use ril_model::image::{ImageProcessor, ImageProcessorConfig};
use ril_model::{Head, LlavaConfig, Vlm};
use ril_teacher::{BackendOptions, CandleOptions, Teacher, TeacherOptions};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

fn tiny_checkpoint(dir: &Path) -> PathBuf {
    let tokenizer = ril_model::tokenizer::byte_level_chatml().unwrap();
    let image_id = tokenizer.token_id("<image>").unwrap();
    let cfg = LlavaConfig::for_tests(tokenizer.vocab_size(), image_id);
    let model = Vlm::new_random(&cfg, Head::LanguageModel, &Device::Cpu, DType::F32, 11).unwrap();
    let processor = ImageProcessor::new(ImageProcessorConfig::clip(16)).unwrap();
    let path = dir.join("teacher");
    Bundle {
        model,
        tokenizer,
        processor,
    }
    .save(&path)
    .unwrap();
    path
}

fn options(checkpoint: &Path, window_ms: u64, max_batch: usize) -> TeacherOptions {
    TeacherOptions::new(
        "tiny",
        BackendOptions::Candle(CandleOptions {
            checkpoint: checkpoint.to_path_buf(),
            batch_window_ms: window_ms,
            max_batch,
            device: "cpu".into(),
        }),
    )
}

fn png(rgb: [u8; 3]) -> Vec<u8> {
    ril_model::toy::square_png(16, 16, [255, 255, 255], Some(rgb)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_share_a_batch_and_answers_are_reproducible() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = tiny_checkpoint(dir.path());
    let q1 = row("q1", "What colour is the square?", vec![png([220, 30, 30])]);
    let q2 = row("q2", "Is there a square?", vec![png([30, 40, 220])]);

    // A window far longer than the test: the batch closes because it is full (2 + 2 answers).
    let teacher = Arc::new(
        Teacher::load(options(&checkpoint, 600_000, 4))
            .await
            .unwrap(),
    );
    let server = Server::start_teacher(teacher.clone()).await;
    server.wait_for_health(ServingStatus::Serving).await;
    let (mut a, mut b) = (server.client().await, server.client().await);
    let (batched1, batched2) = tokio::join!(
        ask(&mut a, request(&q1, 2, Some(sampling(5)))),
        ask(&mut b, request(&q2, 2, Some(sampling(5))))
    );
    let (batched1, batched2) = (batched1.unwrap(), batched2.unwrap());
    let stats = teacher.batch_stats().unwrap();
    assert_eq!((stats.batches(), stats.sequences()), (1, 4));
    assert_eq!(from_cache(&batched1), [false, false]);
    assert_eq!(batched2.len(), 2);
    assert_eq!(info(&mut a).await.generated, 4);
    server.stop().await.unwrap();
    drop(teacher);

    // A fresh server (empty cache) with no batching window: q1 alone gives the same answers,
    // and asking for more keeps the first ones (answer i has its own random stream).
    let server = Server::ready(options(&checkpoint, 0, 16)).await;
    let mut client = server.client().await;
    let alone = ask(&mut client, request(&q1, 4, Some(sampling(5))))
        .await
        .unwrap();
    assert_eq!(texts(&alone)[..2], texts(&batched1)[..]);
    assert_eq!(from_cache(&alone), [false; 4]);
    assert_ne!(
        alone[0].text, alone[1].text,
        "answers of one request differ"
    );
    let cached = ask(&mut client, request(&q1, 4, Some(sampling(5))))
        .await
        .unwrap();
    assert_eq!(texts(&cached), texts(&alone));
    assert_eq!(from_cache(&cached), [true; 4]);
    let reseeded = ask(&mut client, request(&q1, 2, Some(sampling(6))))
        .await
        .unwrap();
    assert_eq!(from_cache(&reseeded), [false, false]);
    assert_ne!(
        texts(&reseeded),
        texts(&batched1),
        "another seed, other answers"
    );
    let i = info(&mut client).await;
    assert!(i.backend.starts_with("candle"), "{}", i.backend);
    assert_eq!((i.generated, i.cache_hits, i.cache_entries), (6, 4, 2));
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_question_whose_image_does_not_decode_is_rejected_with_its_id() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = tiny_checkpoint(dir.path());
    let server = Server::ready(options(&checkpoint, 0, 16)).await;
    let mut client = server.client().await;
    let broken = row(
        "q-broken",
        "What colour?",
        vec![b"\x89PNG\r\n\x1a\ntruncated".to_vec()],
    );
    let e = ask(&mut client, request(&broken, 2, Some(sampling(1))))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("q-broken"), "{}", e.message());
    // The generation thread lives on.
    let good = row("q-good", "What colour?", vec![png([30, 200, 40])]);
    let got = ask(&mut client, request(&good, 1, Some(sampling(1))))
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    server.stop().await.unwrap();

    // A checkpoint that is not there fails the load, naming it.
    let missing = dir.path().join("no-such-model");
    let e = Server::start(options(&missing, 0, 16))
        .await
        .finished()
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("no-such-model"), "{e}");
}
