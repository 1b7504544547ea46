//! The bad-input table (`tests/bad-inputs/cases.toml`): every case goes to the real entry point
//! — the `ril config check` binary, the dataset readers, the image loader, the checkpoint loader
//! and the running roles over gRPC — and must come back as an error whose message names the
//! input and the problem (the table's `expect` substrings), with no panic and nothing changed:
//! the case files, the model directories and the run's counters and versions are as before.
//!
//! All mismatches of a kind are collected and reported together.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use ril_data::dataset::{ReadOptions, read_all};
use ril_model::bundle::Bundle;
use ril_model::image::{ImageProcessor, ImageProcessorConfig};
use ril_model::{Head, LlavaConfig, Vlm};
use ril_proto::security::Role::{Actor, Admin, Learner};
use ril_proto::v1;
use ril_tests::{Sandbox, ok, ril_binary, stderr, stdout};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Table {
    case: Vec<Case>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    kind: String,
    input: Option<String>,
    edit: Option<String>,
    expect: Vec<String>,
}

impl Case {
    fn input(&self) -> PathBuf {
        root().join(self.input.as_deref().expect("a file case names its input"))
    }
    fn file_name(&self) -> String {
        self.input()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned()
    }
    fn edit(&self) -> &str {
        self.edit.as_deref().expect("this kind of case has an edit")
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("bad-inputs")
}

fn table() -> Vec<Case> {
    let path = root().join("cases.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    toml::from_str::<Table>(&text)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .case
}

fn cases(kind: &str) -> Vec<Case> {
    let c: Vec<Case> = table().into_iter().filter(|c| c.kind == kind).collect();
    assert!(!c.is_empty(), "no {kind} cases");
    c
}

/// Every file under `dir` with its bytes: a directory's state, compared before and after.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.clone(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// Checks one error message: every expected substring, the input's name, no panic.
fn check(case: &Case, message: &str, names: &str, failures: &mut Vec<String>) {
    let mut missing: Vec<&str> = case
        .expect
        .iter()
        .map(String::as_str)
        .filter(|e| !message.contains(e))
        .collect();
    if !message.contains(names) {
        missing.push(names);
    }
    if !missing.is_empty() {
        failures.push(format!(
            "{}: the message lacks {missing:?}:\n    {message}",
            case.name
        ));
    }
    if message.contains("panicked") {
        failures.push(format!("{}: panicked:\n    {message}", case.name));
    }
}

fn report(kind: &str, failures: &[String]) {
    assert!(
        failures.is_empty(),
        "{} {kind} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn the_table_has_at_least_50_cases_and_uses_every_file() {
    let table = table();
    assert!(table.len() >= 50, "only {} cases", table.len());
    let mut names = std::collections::BTreeSet::new();
    for c in &table {
        assert!(names.insert(&c.name), "case {} appears twice", c.name);
        assert!(!c.expect.is_empty(), "{}: nothing expected", c.name);
        match c.kind.as_str() {
            "config" | "jsonl" | "parquet" | "image" => {
                assert!(c.input().is_file(), "{}: {:?} is missing", c.name, c.input)
            }
            "checkpoint" | "rpc" => assert!(c.edit.is_some(), "{}: no edit", c.name),
            k => panic!("{}: unknown kind {k:?}", c.name),
        }
    }
    let used: std::collections::BTreeSet<PathBuf> = table
        .iter()
        .filter(|c| c.input.is_some())
        .map(|c| c.input())
        .collect();
    for (f, _) in snapshot(&root()) {
        let rel = f.strip_prefix(root()).unwrap();
        if rel.starts_with("datasets/support") || rel == Path::new("cases.toml") {
            continue;
        }
        assert!(used.contains(&f), "{} is in no case", rel.display());
    }
}

#[test]
fn bad_run_configs_are_refused_by_ril_config_check() {
    let sb = Sandbox::new();
    std::fs::create_dir_all(sb.path("data")).unwrap();
    std::fs::create_dir_all(sb.path("student")).unwrap();
    let mut failures = Vec::new();
    for case in cases("config") {
        let name = case.file_name();
        std::fs::copy(case.input(), sb.path(&name)).unwrap();
        let before = snapshot(sb.dir.path());
        let out = sb.ril(&["config", "check", &name]);
        if out.status.success() {
            failures.push(format!("{}: accepted:\n{}", case.name, stdout(&out)));
            continue;
        }
        check(&case, &stderr(&out), &name, &mut failures);
        if snapshot(sb.dir.path()) != before {
            failures.push(format!("{}: the directory changed", case.name));
        }
    }
    report("config", &failures);
}

#[test]
fn bad_dataset_rows_stop_the_read_naming_file_row_and_field() {
    let before = snapshot(&root());
    let mut failures = Vec::new();
    for case in cases("jsonl") {
        match read_all(&case.input(), ReadOptions::default()) {
            Ok(_) => failures.push(format!("{}: read without an error", case.name)),
            Err(e) => check(&case, &e.to_string(), &case.file_name(), &mut failures),
        }
        // Skipping bad rows reads the rest and counts the bad one.
        match read_all(
            &case.input(),
            ReadOptions {
                skip_bad_rows: true,
            },
        ) {
            Ok((_, report)) if report.skipped >= 1 => {}
            other => failures.push(format!(
                "{}: with skip_bad_rows: {:?}",
                case.name,
                other.map(|r| r.1)
            )),
        }
    }
    assert!(snapshot(&root()) == before, "a case file changed");
    report("jsonl", &failures);
}

#[test]
fn bad_parquet_files_are_refused_naming_the_file() {
    let before = snapshot(&root());
    let mut failures = Vec::new();
    for case in cases("parquet") {
        match read_all(&case.input(), ReadOptions::default()) {
            Ok(_) => failures.push(format!("{}: read without an error", case.name)),
            Err(e) => check(&case, &e.to_string(), &case.file_name(), &mut failures),
        }
    }
    assert!(snapshot(&root()) == before, "a case file changed");
    report("parquet", &failures);
}

#[test]
fn bad_images_are_refused_by_the_image_loader_and_the_dataset_reader() {
    let before = snapshot(&root());
    let processor = ImageProcessor::new(ImageProcessorConfig::clip(16)).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for case in cases("image") {
        match processor.preprocess_file(&case.input(), &Device::Cpu) {
            Ok(t) => failures.push(format!("{}: decoded to {:?}", case.name, t.dims())),
            Err(e) => check(&case, &e.to_string(), &case.file_name(), &mut failures),
        }
        // A dataset row that points at an image that does not decode is refused with its id and
        // the image (the dataset reader checks decoding, not what a model's preprocessing makes
        // of the pixels).
        if ImageProcessor::decode(&std::fs::read(case.input()).unwrap(), "x").is_ok() {
            continue;
        }
        let rows = scratch.path().join(format!("{}.jsonl", case.name));
        let row = serde_json::json!({
            "id": case.name, "images": [case.input()], "question": "What?", "answer": "x"
        });
        std::fs::write(&rows, format!("{row}\n")).unwrap();
        match read_all(&rows, ReadOptions::default()) {
            Ok(_) => failures.push(format!("{}: a row with it was read", case.name)),
            Err(e) => {
                let m = e.to_string();
                for want in [format!("id {}", case.name), "images[0]".into()] {
                    if !m.contains(&want) {
                        failures.push(format!("{}: row error lacks {want:?}: {m}", case.name));
                    }
                }
            }
        }
    }
    assert!(snapshot(&root()) == before, "a case file changed");
    report("image", &failures);
}

/// A test-size model directory (safetensors, config.json, tokenizer, image processor).
fn model_dir(dir: &Path) {
    let tokenizer = ril_model::tokenizer::byte_level_chatml().unwrap();
    let image_id = tokenizer.token_id("<image>").unwrap();
    let cfg = LlavaConfig::for_tests(tokenizer.vocab_size(), image_id);
    let model = Vlm::new_random(&cfg, Head::LanguageModel, &Device::Cpu, DType::F32, 3).unwrap();
    Bundle {
        model,
        tokenizer,
        processor: ImageProcessor::new(ImageProcessorConfig::clip(16)).unwrap(),
    }
    .save(dir)
    .unwrap();
}

/// Applies a checkpoint case's edit to the model directory `dir`.
fn apply_edit(dir: &Path, edit: &str) {
    let (verb, rest) = edit.split_once(' ').unwrap();
    let weights = dir.join("model.safetensors");
    let edit_tensors = |f: &dyn Fn(&mut std::collections::HashMap<String, Tensor>)| {
        let mut t = candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();
        f(&mut t);
        candle_core::safetensors::save(&t, &weights).unwrap();
    };
    match verb {
        "drop-tensor" => edit_tensors(&|t| {
            assert!(t.remove(rest).is_some(), "no tensor {rest}");
        }),
        "add-tensor" => edit_tensors(&|t| {
            t.insert(
                rest.into(),
                Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap(),
            );
        }),
        "reshape-tensor" => edit_tensors(&|t| {
            assert!(t.contains_key(rest), "no tensor {rest}");
            t.insert(
                rest.into(),
                Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap(),
            );
        }),
        "retype-tensor" => edit_tensors(&|t| {
            let old = t.get(rest).unwrap_or_else(|| panic!("no tensor {rest}"));
            let new = Tensor::zeros(old.shape(), DType::I64, &Device::Cpu).unwrap();
            t.insert(rest.into(), new);
        }),
        "truncate" => {
            let b = std::fs::read(dir.join(rest)).unwrap();
            std::fs::write(dir.join(rest), &b[..b.len() / 2]).unwrap();
        }
        "corrupt-header" => {
            let mut b = std::fs::read(dir.join(rest)).unwrap();
            b[..8].copy_from_slice(&u64::MAX.to_le_bytes());
            std::fs::write(dir.join(rest), b).unwrap();
        }
        "set-config" => {
            let (key, value) = rest.split_once(' ').unwrap();
            let path = dir.join("config.json");
            let mut v: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            let mut at = &mut v;
            for k in key.split('.') {
                at = at
                    .get_mut(k)
                    .unwrap_or_else(|| panic!("config.json has no {key}"));
            }
            *at = serde_json::from_str(value).unwrap();
            std::fs::write(&path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
        }
        "write" => {
            let (file, text) = rest.split_once(' ').unwrap();
            std::fs::write(dir.join(file), text).unwrap();
        }
        "delete" => std::fs::remove_file(dir.join(rest)).unwrap(),
        v => panic!("unknown edit {v:?}"),
    }
}

#[test]
fn bad_checkpoints_are_refused_before_anything_is_loaded() {
    let scratch = tempfile::tempdir().unwrap();
    let base = scratch.path().join("base");
    model_dir(&base);
    let mut failures = Vec::new();
    for case in cases("checkpoint") {
        let dir = scratch.path().join(&case.name);
        std::fs::create_dir_all(&dir).unwrap();
        for (f, bytes) in snapshot(&base) {
            std::fs::write(dir.join(f.file_name().unwrap()), bytes).unwrap();
        }
        apply_edit(&dir, case.edit());
        let before = snapshot(&dir);
        match Bundle::load(&dir, Head::LanguageModel, &Device::Cpu, DType::F32) {
            Ok(_) => failures.push(format!("{}: loaded", case.name)),
            Err(e) => check(&case, &e.to_string(), &case.name, &mut failures),
        }
        if snapshot(&dir) != before {
            failures.push(format!("{}: loading changed the directory", case.name));
        }
    }
    report("checkpoint", &failures);
}

// ---------------------------------------------------------------------------------------------
// RPC payloads, sent to the real roles.

struct Role {
    child: Child,
}

impl Drop for Role {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The running roles and their addresses.
struct Servers {
    /// `ril certs init`'s directory: the roles serve with it, the test's clients take their
    /// role's certificate and the run token from it (the secure path is the tested path).
    certs: std::path::PathBuf,
    coordinator: String,
    learner: String,
    discriminator: String,
    teacher: String,
    _roles: Vec<Role>,
}

/// Data, a tokenizer and a test-size student (also the teacher) made with ril's own commands.
fn make_run(sb: &Sandbox) {
    sb.make_tiny_run(8, &[("student", "1")]);
    let toml = r#"
[run]
id = "bad-inputs"
dir = "run"
seed = 1
iterations = 2
questions_per_iteration = 2

[data]
path = "data"

[student]
checkpoint = "student"

[rollout]
group_size = 2
max_new_tokens = 6

[learner]
save_every = 1

[[teachers]]
name = "t1"
backend = "candle"
checkpoint = "student"
"#;
    std::fs::write(sb.path("run.toml"), toml).unwrap();
}

/// Starts `ril ARGS --config run.toml --listen 127.0.0.1:0 --addr-file` and waits for the
/// address.
fn serve(sb: &Sandbox, name: &str, args: &[&str]) -> (Role, String) {
    let file = sb.path(&format!("{name}.addr"));
    let log = std::fs::File::create(sb.path(&format!("{name}.log"))).unwrap();
    let mut a: Vec<&str> = args.to_vec();
    let file_arg = file.display().to_string();
    a.extend([
        "--config",
        "run.toml",
        "--listen",
        "127.0.0.1:0",
        "--addr-file",
        &file_arg,
        "--security-dir",
        "certs",
    ]);
    let child = Command::new(ril_binary())
        .args(&a)
        .current_dir(sb.dir.path())
        .env("CANDLE_NUM_THREADS", "1")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut role = Role { child };
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(s) = std::fs::read_to_string(&file)
            && !s.trim().is_empty()
        {
            return (role, s.trim().to_string());
        }
        if let Ok(Some(st)) = role.child.try_wait() {
            panic!(
                "{name} exited ({st}): {}",
                std::fs::read_to_string(sb.path(&format!("{name}.log"))).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "{name} never wrote its address");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The one place that starts the servers: TLS, mutual TLS and the run token, as in production.
async fn start_servers(sb: &Sandbox) -> Servers {
    make_run(sb);
    ok(&sb.ril(&["certs", "init", "certs"]));
    let certs = sb.path("certs");
    let (d, discriminator) = serve(sb, "discriminator", &["discriminator", "serve"]);
    let (t, teacher) = serve(sb, "teacher", &["teacher", "--name", "t1"]);
    let teacher_arg = format!("t1={teacher}");
    let (c, coordinator) = serve(
        sb,
        "coordinator",
        &[
            "coordinator",
            "--teacher-addr",
            &teacher_arg,
            "--discriminator-addr",
            &discriminator,
        ],
    );
    let (l, learner) = serve(
        sb,
        "learner",
        &[
            "learner",
            "--coordinator",
            &coordinator,
            "--discriminator-addr",
            &discriminator,
        ],
    );
    for addr in [&discriminator, &teacher, &coordinator, &learner] {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !matches!(
            ril_proto::client::health_check(
                addr,
                "",
                Duration::from_secs(2),
                &as_role(&certs, Admin)
            )
            .await,
            Ok(ril_proto::server::ServingStatus::Serving)
        ) {
            assert!(Instant::now() < deadline, "{addr} never became SERVING");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Servers {
        certs,
        coordinator,
        learner,
        discriminator,
        teacher,
        _roles: vec![d, t, c, l],
    }
}

/// A client's credentials: `role`'s certificate and the run token.
fn as_role(
    certs: &std::path::Path,
    role: ril_proto::security::Role,
) -> ril_proto::security::Security {
    ril_proto::security::SecurityConfig::from_dir(certs)
        .resolve(role)
        .unwrap()
}

/// The one place that makes a client channel: as `role`, the role that may make the call, so
/// a refusal comes from the payload, not from authorisation.
async fn channel(
    s: &Servers,
    addr: &str,
    role: ril_proto::security::Role,
) -> ril_proto::client::Channel {
    ril_proto::client::connect(addr, Duration::from_secs(5), &as_role(&s.certs, role))
        .await
        .unwrap()
}

/// The learner's publisher key, from its out_dir (`run/learner/publisher.key` beside the
/// certificates): with it a call gets past the rank-0 check, so its payload is what is judged.
fn rank0_publisher_key(s: &Servers) -> Vec<u8> {
    let path = s.certs.parent().unwrap().join("run/learner/publisher.key");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    hex::decode(text.trim()).unwrap()
}

/// What the run looks like from outside: coordinator counters and versions, the learner's
/// version and weights, the discriminator's step.
async fn run_state(s: &Servers) -> String {
    use v1::coordinator_client::CoordinatorClient;
    use v1::discriminator_client::DiscriminatorClient;
    use v1::learner_client::LearnerClient;
    let st = CoordinatorClient::new(channel(s, &s.coordinator, Admin).await)
        .get_status(v1::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let li = LearnerClient::new(channel(s, &s.learner, Admin).await)
        .info(v1::LearnerInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    let di = DiscriminatorClient::new(channel(s, &s.discriminator, Admin).await)
        .info(v1::DiscriminatorInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    format!(
        "coordinator: version {} iteration {} cursor {} accepted {} duplicates {} leases {}; \
         learner: version {} iteration {} weights {}; discriminator: step {}",
        st.policy_version,
        st.iteration,
        st.cursor,
        st.groups_accepted,
        st.duplicates_refused,
        st.leases_outstanding,
        li.policy_version,
        li.iteration,
        li.weights_sha256,
        di.step
    )
}

fn png() -> bytes::Bytes {
    ril_model::toy::square_png(16, 16, [255, 255, 255], Some([200, 20, 20]))
        .unwrap()
        .into()
}

fn question() -> v1::Question {
    v1::Question {
        id: "bad-q".into(),
        messages: vec![v1::ChatMessage {
            role: "user".into(),
            text: "What colour is the square?".into(),
            parts_json: String::new(),
        }],
        images: vec![v1::Image {
            name: "bad-q.png".into(),
            data: png(),
        }],
        reference: "red".into(),
        answer_type: String::new(),
        family: String::new(),
    }
}

/// A well-formed group (which the coordinator would still refuse: its lease is unknown).
fn group() -> v1::ScoredGroup {
    v1::ScoredGroup {
        lease_id: "no-such-lease".into(),
        position: 0,
        iteration: 0,
        question: Some(question()),
        prompt_token_ids: Vec::new(),
        responses: vec![v1::ScoredResponse {
            source: v1::ResponseSource::Student as i32,
            text: "red".into(),
            token_ids: vec![40, 41, 42],
            behaviour_logprobs: vec![-0.5, -0.5, -0.5],
            policy_version: 0,
            d_prob: 0.5,
            r_sim: 1.0,
            r_ans: 1.0,
            ..Default::default()
        }],
        actor_id: "bad-actor".into(),
        timings_ms: Default::default(),
    }
}

/// Pushes `groups`; an RPC error or a refused group is the error.
async fn push(s: &Servers, groups: Vec<v1::ScoredGroup>) -> Result<String, String> {
    let mut l = v1::learner_client::LearnerClient::new(channel(s, &s.learner, Actor).await)
        .max_encoding_message_size(128 << 20);
    let r = l
        .push_groups(v1::PushGroupsRequest { groups })
        .await
        .map_err(|e| format!("{:?}: {}", e.code(), e.message()))?
        .into_inner();
    match r.verdicts.iter().find(|v| !v.accepted) {
        Some(v) => Err(v.reason.clone()),
        None => Ok(format!("{:?}", r.verdicts)),
    }
}

fn status<T>(r: Result<tonic::Response<T>, tonic::Status>) -> Result<String, String> {
    r.map(|_| "ok".to_string())
        .map_err(|e| format!("{:?}: {}", e.code(), e.message()))
}

/// Sends the payload of the RPC case `name` to its role.
async fn send(s: &Servers, name: &str) -> Result<String, String> {
    use v1::coordinator_client::CoordinatorClient;
    use v1::discriminator_client::DiscriminatorClient;
    use v1::teacher_client::TeacherClient;
    let with = |f: &dyn Fn(&mut v1::ScoredGroup)| {
        let mut g = group();
        f(&mut g);
        vec![g]
    };
    match name {
        "rpc-push-nan-reward" => push(s, with(&|g| g.responses[0].r_sim = f32::NAN)).await,
        "rpc-push-infinite-logprob" => {
            push(
                s,
                with(&|g| g.responses[0].behaviour_logprobs[1] = f32::NEG_INFINITY),
            )
            .await
        }
        "rpc-push-empty-group" => push(s, with(&|g| g.responses.clear())).await,
        "rpc-push-no-groups" => push(s, Vec::new()).await,
        "rpc-push-logprobs-tokens-mismatch" => {
            push(s, with(&|g| g.responses[0].behaviour_logprobs.truncate(2))).await
        }
        "rpc-push-missing-question" => push(s, with(&|g| g.question = None)).await,
        "rpc-push-unknown-source" => push(s, with(&|g| g.responses[0].source = 7)).await,
        "rpc-push-token-outside-vocabulary" => {
            push(s, with(&|g| g.responses[0].token_ids[0] = 1_000_000)).await
        }
        "rpc-push-future-policy-version" => {
            push(s, with(&|g| g.responses[0].policy_version = 99)).await
        }
        "rpc-push-wrong-iteration" => push(s, with(&|g| g.iteration = 5)).await,
        "rpc-push-oversized" => {
            let big =
                with(&|g| g.question.as_mut().unwrap().images[0].data = vec![0u8; 65 << 20].into());
            push(s, big).await
        }
        "rpc-get-weights-unknown-version" => {
            let mut l = v1::learner_client::LearnerClient::new(channel(s, &s.learner, Actor).await);
            status(
                l.get_weights(v1::GetWeightsRequest {
                    version: 42,
                    chunk_bytes: 0,
                })
                .await,
            )
        }
        "rpc-push-wrong-message-type" => {
            // Another message's bytes on PushGroups: field 1 holds a string whose first byte is
            // an invalid protobuf tag (wire type 7), so it cannot decode as a ScoredGroup.
            let mut grpc = tonic::client::Grpc::new(channel(s, &s.learner, Actor).await);
            grpc.ready().await.unwrap();
            let not_a_push = v1::ChatMessage {
                role: "\u{f}\u{f}".into(),
                ..Default::default()
            };
            let r: Result<tonic::Response<v1::PushGroupsResponse>, _> = grpc
                .unary(
                    tonic::Request::new(not_a_push),
                    "/ril.v1.Learner/PushGroups".parse().unwrap(),
                    tonic_prost::ProstCodec::default(),
                )
                .await;
            status(r)
        }
        "rpc-accept-group-never-issued" | "rpc-accept-group-without-publisher-key" => {
            let mut c = CoordinatorClient::new(channel(s, &s.coordinator, Learner).await);
            let publisher_key = match name {
                "rpc-accept-group-never-issued" => rank0_publisher_key(s),
                _ => vec![1u8; 32],
            };
            let r = c
                .accept_group(v1::AcceptGroupRequest {
                    lease_id: "no-such-lease".into(),
                    position: 0,
                    question_id: "bad-q".into(),
                    iteration: 0,
                    publisher_key: publisher_key.into(),
                })
                .await
                .map_err(|e| format!("{:?}: {}", e.code(), e.message()))?
                .into_inner();
            if r.accepted {
                Ok("accepted".into())
            } else {
                Err(r.reason)
            }
        }
        "rpc-publish-version-skips-ahead" => {
            let mut c = CoordinatorClient::new(channel(s, &s.coordinator, Learner).await);
            status(
                c.publish_version(v1::PublishVersionRequest {
                    version: 5,
                    iteration: 4,
                    checkpoint: String::new(),
                    publisher_key: rank0_publisher_key(s).into(),
                })
                .await,
            )
        }
        "rpc-lease-empty-actor-id" => {
            let mut c = CoordinatorClient::new(channel(s, &s.coordinator, Actor).await);
            status(
                c.lease_prompts(v1::LeasePromptsRequest {
                    actor_id: String::new(),
                    max_questions: 1,
                    policy_version: 0,
                    request_id: String::new(),
                })
                .await,
            )
        }
        "rpc-score-empty-question-id"
        | "rpc-score-missing-question"
        | "rpc-score-bad-parts-json" => {
            let mut q = question();
            match name {
                "rpc-score-empty-question-id" => q.id.clear(),
                "rpc-score-bad-parts-json" => q.messages[0].parts_json = "[{".into(),
                _ => {}
            }
            let mut d = DiscriminatorClient::new(channel(s, &s.discriminator, Actor).await);
            status(
                d.score(v1::ScoreRequest {
                    question: (name != "rpc-score-missing-question").then_some(q),
                    responses: vec!["red".into()],
                })
                .await,
            )
        }
        "rpc-train-missing-question" => {
            let mut d = DiscriminatorClient::new(channel(s, &s.discriminator, Learner).await);
            status(
                d.train(v1::TrainRequest {
                    items: vec![v1::LabelledResponse {
                        question: None,
                        response: "red".into(),
                        from_student: true,
                    }],
                    iteration: 0,
                })
                .await,
            )
        }
        "rpc-answer-zero-n" | "rpc-answer-nan-temperature" => {
            let mut t = TeacherClient::new(channel(s, &s.teacher, Actor).await);
            let sampling = (name == "rpc-answer-nan-temperature").then_some(v1::SamplingSettings {
                temperature: f32::NAN,
                max_new_tokens: 4,
                ..Default::default()
            });
            let n = if name == "rpc-answer-zero-n" { 0 } else { 1 };
            match t
                .answer(v1::AnswerRequest {
                    question: Some(question()),
                    n,
                    sampling,
                })
                .await
            {
                Err(e) => Err(format!("{:?}: {}", e.code(), e.message())),
                Ok(r) => {
                    let mut stream = r.into_inner();
                    match stream.message().await {
                        Err(e) => Err(format!("{:?}: {}", e.code(), e.message())),
                        Ok(m) => Ok(format!("{m:?}")),
                    }
                }
            }
        }
        other => panic!("no payload for RPC case {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rpc_payloads_are_refused_and_leave_the_run_unchanged() {
    let sb = Sandbox::new();
    let servers = start_servers(&sb).await;
    let before = run_state(&servers).await;
    let mut failures = Vec::new();
    for case in cases("rpc") {
        match send(&servers, &case.name).await {
            Ok(what) => failures.push(format!("{}: accepted: {what}", case.name)),
            Err(message) => {
                // The role is named by the call itself; the message must name the field.
                check(&case, &message, "", &mut failures);
            }
        }
        let now = run_state(&servers).await;
        if now != before {
            failures.push(format!(
                "{}: the run changed:\n    before {before}\n    after  {now}",
                case.name
            ));
        }
    }
    // Every role is still serving.
    for addr in [
        &servers.coordinator,
        &servers.learner,
        &servers.discriminator,
        &servers.teacher,
    ] {
        assert!(matches!(
            ril_proto::client::health_check(
                addr,
                "",
                Duration::from_secs(2),
                &as_role(&servers.certs, Admin)
            )
            .await,
            Ok(ril_proto::server::ServingStatus::Serving)
        ));
    }
    report("rpc", &failures);
}
