//! The replay backend (from dataset rows and from an answers file) and the persistent cache,
//! through real servers on loopback ports.

mod common;

use std::path::Path;

use common::{Server, ask, from_cache, info, request, row, sampling, texts};
use ril_teacher::{BackendOptions, ReplayOptions, TeacherOptions};
use serde_json::json;
use tonic::Code;

fn write_lines(path: &Path, lines: &[serde_json::Value]) {
    let text: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    std::fs::write(path, text.join("\n") + "\n").unwrap();
}

fn replay(
    name: &str,
    dataset: Option<&Path>,
    answers: Option<&Path>,
    teacher: Option<&str>,
    cycle: bool,
) -> TeacherOptions {
    TeacherOptions::new(
        name,
        BackendOptions::Replay(ReplayOptions {
            dataset: dataset.map(Path::to_path_buf),
            answers: answers.map(Path::to_path_buf),
            teacher: teacher.map(str::to_string),
            cycle,
        }),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_answers_come_from_rows_and_files_and_missing_ones_are_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let dataset = dir.path().join("train.jsonl");
    write_lines(
        &dataset,
        &[
            json!({"id": "q1", "question": "What colour?", "answer": "red",
                   "teacher_answers": {"big": ["r1a", "r1b"], "small": ["s1"]}}),
            json!({"id": "q2", "question": "How many?", "answer": "3",
                   "teacher_answers": {"small": ["s2"]}}),
        ],
    );
    let answers = dir.path().join("answers.jsonl");
    write_lines(
        &answers,
        &[
            json!({"id": "q3", "teacher": "big", "answers": ["f3a", "f3b", "f3c"]}),
            json!({"id": "q1", "teacher": "big", "answers": ["f1c"]}),
            json!({"id": "q2", "teacher": "other", "answers": ["o2"]}),
        ],
    );

    let server = Server::ready(replay("big", Some(&dataset), Some(&answers), None, false)).await;
    let mut client = server.client().await;
    let q1 = row("q1", "What colour?", vec![]);
    let got = ask(&mut client, request(&q1, 3, None)).await.unwrap();
    assert_eq!(texts(&got), ["r1a", "r1b", "f1c"]);
    assert!(got.iter().all(|a| a.teacher == "big"));
    assert_eq!(got.iter().map(|a| a.index).collect::<Vec<_>>(), [0, 1, 2]);
    let q3 = row("q3", "Which?", vec![]);
    let got = ask(&mut client, request(&q3, 2, None)).await.unwrap();
    assert_eq!(texts(&got), ["f3a", "f3b"]);

    // q2 has answers only from other teachers.
    let q2 = row("q2", "How many?", vec![]);
    let e = ask(&mut client, request(&q2, 1, None)).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(
        e.message().contains("\"q2\"") && e.message().contains("\"big\""),
        "{}",
        e.message()
    );
    // More answers than recorded, without `cycle`.
    let e = ask(&mut client, request(&q1, 4, None)).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("3 recorded"), "{}", e.message());
    let i = info(&mut client).await;
    assert!(i.backend.starts_with("replay"), "{}", i.backend);
    assert_eq!(i.generated, 5);
    server.stop().await.unwrap();

    // Another teacher name, looked up explicitly, with cycling.
    let server = Server::ready(replay("s", Some(&dataset), None, Some("small"), true)).await;
    let mut client = server.client().await;
    let got = ask(&mut client, request(&q2, 3, None)).await.unwrap();
    assert_eq!(texts(&got), ["s2", "s2", "s2"]);
    assert!(got.iter().all(|a| a.teacher == "s"));
    server.stop().await.unwrap();

    // A malformed answers file fails the load, naming the file and the line.
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"id\": \"q1\", \"teacher\": \"big\", \"answers\": [\"a\"]}\nnot json\n",
    )
    .unwrap();
    let server = Server::start(replay("big", None, Some(&bad), None, false)).await;
    let e = server.finished().await.unwrap_err().to_string();
    assert!(e.contains("bad.jsonl") && e.contains("line 2"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_answers_are_served_again_across_restarts_and_only_missing_ones_are_generated() {
    let dir = tempfile::tempdir().unwrap();
    let answers = dir.path().join("answers.jsonl");
    let recorded = |prefix: &str| {
        json!({"id": "q1", "teacher": "big",
               "answers": (0..6).map(|i| format!("{prefix}{i}")).collect::<Vec<_>>()})
    };
    write_lines(&answers, &[recorded("a")]);
    let cache = dir.path().join("cache/big.redb");
    let options = || {
        let mut o = replay("big", None, Some(&answers), None, false);
        o.cache = Some(cache.clone());
        o
    };
    let q1 = row("q1", "What colour?", vec![]);

    let server = Server::ready(options()).await;
    let mut client = server.client().await;
    let first = ask(&mut client, request(&q1, 2, Some(sampling(1))))
        .await
        .unwrap();
    assert_eq!(texts(&first), ["a0", "a1"]);
    assert_eq!(from_cache(&first), [false, false]);
    let i = info(&mut client).await;
    assert_eq!((i.generated, i.cache_hits, i.cache_entries), (2, 0, 1));

    // The same request again: the cache, nothing generated.
    let again = ask(&mut client, request(&q1, 2, Some(sampling(1))))
        .await
        .unwrap();
    assert_eq!(texts(&again), texts(&first));
    assert_eq!(from_cache(&again), [true, true]);
    let i = info(&mut client).await;
    assert_eq!((i.generated, i.cache_hits), (2, 2));

    // More than cached: only the difference is generated, appended after the cached ones.
    let more = ask(&mut client, request(&q1, 4, Some(sampling(1))))
        .await
        .unwrap();
    assert_eq!(texts(&more), ["a0", "a1", "a2", "a3"]);
    assert_eq!(from_cache(&more), [true, true, false, false]);
    assert_eq!(info(&mut client).await.generated, 4);

    // Other sampling settings are another key.
    let other = ask(&mut client, request(&q1, 2, Some(sampling(2))))
        .await
        .unwrap();
    assert_eq!(from_cache(&other), [false, false]);
    let i = info(&mut client).await;
    assert_eq!((i.generated, i.cache_entries), (6, 2));
    server.stop().await.unwrap();

    // A new server on the same cache file, whose backend now records different answers: the
    // cached ones are still served, and only the missing one comes from the backend.
    write_lines(&answers, &[recorded("z")]);
    let server = Server::ready(options()).await;
    let mut client = server.client().await;
    let after = ask(&mut client, request(&q1, 5, Some(sampling(1))))
        .await
        .unwrap();
    assert_eq!(texts(&after), ["a0", "a1", "a2", "a3", "z4"]);
    assert_eq!(from_cache(&after), [true, true, true, true, false]);
    let i = info(&mut client).await;
    assert_eq!((i.generated, i.cache_hits, i.cache_entries), (1, 4, 2));
    server.stop().await.unwrap();
}
