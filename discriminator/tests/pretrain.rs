//! Pre-training end to end: rows on disk, student answers sampled from a tiny checkpoint,
//! teacher answers from the rows and from a real teacher gRPC server, D trained until it tells
//! them apart on held-out questions, saved, and resumed.

mod common;

use std::pin::Pin;
use std::sync::{Arc, Mutex};

use candle_core::Device;
use common::*;
use ril_discriminator::checkpoint::latest_checkpoint;
use ril_discriminator::pretrain::{EXAMPLES_FILE, PretrainEvent, teacher_answers};
use ril_discriminator::{DiscriminatorModel, PretrainOptions, run_pretrain};
use ril_proto::server::{bind, incoming};
use ril_proto::v1;
use ril_proto::v1::teacher_server::{Teacher, TeacherServer};
use tonic::codegen::tokio_stream::{self, Stream};
use tonic::{Request, Response, Status};

/// A teacher server that answers in its own style, `n` answers per request.
struct StubTeacher;

#[tonic::async_trait]
impl Teacher for StubTeacher {
    type AnswerStream = Pin<Box<dyn Stream<Item = Result<v1::TeacherAnswer, Status>> + Send>>;

    async fn answer(
        &self,
        request: Request<v1::AnswerRequest>,
    ) -> Result<Response<Self::AnswerStream>, Status> {
        let request = request.into_inner();
        let reference = request
            .question
            .ok_or_else(|| Status::invalid_argument("question"))?
            .reference;
        let answers: Vec<Result<v1::TeacherAnswer, Status>> = (0..request.n)
            .map(|index| {
                let text = if index % 2 == 0 {
                    teacher_answer(&reference)
                } else {
                    format!("Looking at the image, the object is {reference}. Answer: {reference}")
                };
                Ok(v1::TeacherAnswer {
                    teacher: "stub".into(),
                    index,
                    text,
                    from_cache: false,
                })
            })
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(answers))))
    }

    async fn info(
        &self,
        _request: Request<v1::TeacherInfoRequest>,
    ) -> Result<Response<v1::TeacherInfo>, Status> {
        Ok(Response::new(v1::TeacherInfo {
            name: "stub".into(),
            backend: "test".into(),
            ..Default::default()
        }))
    }
}

async fn start_teacher() -> String {
    let bound = bind("127.0.0.1:0").await.unwrap();
    let addr = bound.addr.to_string();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TeacherServer::new(StubTeacher))
            .serve_with_incoming(incoming(bound)),
    );
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn teacher_answers_come_from_the_rows_then_round_robin_from_the_servers() {
    let teachers = vec![start_teacher().await, start_teacher().await];
    let mut with_own = colour_row("red", COLOURS[0].1);
    with_own
        .teacher_answers
        .insert("big".into(), vec!["Own answer: red".into()]);
    let plain = colour_row("blue", COLOURS[2].1);
    let answers = teacher_answers(
        &[with_own, plain.clone()],
        &teachers,
        4,
        std::time::Duration::from_secs(30),
        &Default::default(),
    )
    .await
    .unwrap();
    assert_eq!(answers[0].len(), 4);
    assert_eq!(answers[0][0], "Own answer: red");
    // 3 missing: 2 from the first server, 1 from the second, interleaved.
    assert_eq!(answers[0][1], teacher_answer("red"));
    assert_eq!(answers[0][2], teacher_answer("red"));
    assert!(answers[0][3].starts_with("Looking at the image"));
    assert_eq!(answers[1].len(), 4);
    // Without servers a row with no answers of its own is an error naming it.
    let err = teacher_answers(
        &[plain],
        &[],
        2,
        std::time::Duration::from_secs(5),
        &Default::default(),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("colour-blue"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pretraining_tells_student_from_teacher_answers_on_held_out_questions() {
    let tmp = tempfile::tempdir().unwrap();
    let student = tiny_student(&tmp.path().join("student"), 21);
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mut lines = String::new();
    for (i, (c, rgb)) in COLOURS[..6].iter().enumerate() {
        let mut row = colour_row(c, *rgb);
        if i < 2 {
            row.teacher_answers
                .insert("cached".into(), vec![teacher_answer(c)]);
        }
        lines.push_str(&ril_data::dataset::row_to_json(&row, None).to_string());
        lines.push('\n');
    }
    std::fs::write(data.join("train.jsonl"), lines).unwrap();
    let out = tmp.path().join("d-pretrained");

    let mut options = PretrainOptions::new(&student, &data, &out);
    options.teachers = vec![start_teacher().await];
    options.n_student_answers = 3;
    options.n_teacher_answers = 3;
    options.max_new_tokens = 12;
    options.generation_batch_size = 2;
    options.steps = 25;
    options.batch_size = 8;
    options.eval_every = 10;
    options.held_out_fraction = 0.34;
    options.discriminator.lr = 1e-3;
    options.min_lr = 1e-4;
    options.discriminator.max_response_tokens = 48;

    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    let report = run_pretrain(
        options.clone(),
        Device::Cpu,
        &Default::default(),
        move |e| sink.lock().unwrap().push(e),
    )
    .await
    .unwrap();
    assert_eq!(report.steps, 25);
    assert_eq!(report.n_train + report.n_held_out, 6 * 6);
    assert_eq!(report.n_held_out, 2 * 6, "2 of 6 questions held out");
    let before = report.initial_held_out.unwrap();
    let after = report.final_held_out.unwrap();
    assert!(
        after.accuracy >= 0.9 && after.loss < 0.5 * before.loss,
        "held out: {before:?} -> {after:?}"
    );
    let steps = events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| matches!(e, PretrainEvent::Step { .. }))
        .count();
    assert_eq!(steps, 25);
    let saved = latest_checkpoint(&out).unwrap().unwrap();
    assert_eq!(Some(saved.clone()), report.checkpoint);
    assert!(saved.ends_with("step-00000025"));
    let examples = std::fs::read_to_string(out.join(EXAMPLES_FILE)).unwrap();
    assert_eq!(examples.lines().count(), 36);

    // The result serves as `init` of an online discriminator (weights only, step 0).
    let d_options = ril_discriminator::DiscriminatorOptions {
        max_response_tokens: 48,
        ..ril_discriminator::DiscriminatorOptions::for_test(&out)
    };
    let online = DiscriminatorModel::from_init(&d_options, &Device::Cpu).unwrap();
    assert_eq!(online.step(), 0);
    let trained = DiscriminatorModel::resume(&saved, &d_options, &Device::Cpu).unwrap();
    assert_eq!(trained.step(), 25);
    let row = colour_row("red", COLOURS[0].1);
    let responses = vec![teacher_answer("red"), "zq#x".to_string()];
    assert_eq!(
        online.score(&row, &responses).unwrap(),
        trained.score(&row, &responses).unwrap()
    );

    // ... and an interrupted pre-training continues where it stopped, with the same examples.
    options.steps = 28;
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    let resumed = run_pretrain(options, Device::Cpu, &Default::default(), move |e| {
        sink.lock().unwrap().push(e)
    })
    .await
    .unwrap();
    assert_eq!(resumed.steps, 28);
    let first_step = events.lock().unwrap().iter().find_map(|e| match e {
        PretrainEvent::Step { step, .. } => Some(*step),
        _ => None,
    });
    assert_eq!(first_step, Some(26));
}
