//! The distributed actor-learner as a user runs it: every role a separate `ril` process talking
//! gRPC on loopback ports. Tiny models are made here with the project's own commands (nothing
//! is downloaded); waits are on predicates (status, files), never fixed sleeps.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ril_common::wait::wait_until;
use ril_proto::v1;
use ril_proto::v1::coordinator_client::CoordinatorClient;
use ril_tests::roles::{Role, edit_config, make_models, serve, start, wait_addr, write_config};
use ril_tests::{Sandbox, ok, ril_binary, stderr, stdout};

/// The test's own client credentials (the admin role's certificate, the run token).
fn security(sb: &Sandbox) -> ril_proto::security::Security {
    security_as(sb, ril_proto::security::Role::Admin)
}

fn security_as(sb: &Sandbox, role: ril_proto::security::Role) -> ril_proto::security::Security {
    ril_proto::security::SecurityConfig::from_dir(&sb.path("certs"))
        .resolve(role)
        .unwrap()
}

/// `ril train` on run.toml to the end: it must succeed, finish all `iterations` and accept
/// `groups` groups with no duplicate.
fn train_to_the_end(sb: &Sandbox, iterations: u64, groups: u64) {
    let out = sb.ril(&[
        "train",
        "--config",
        "run.toml",
        "--startup-timeout-s",
        "120",
    ]);
    ok(&out);
    let text = stdout(&out);
    assert!(
        text.contains(&format!(
            "iteration {iterations}/{iterations} (policy version {iterations}), finished"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!("groups accepted {groups}, duplicates refused 0")),
        "{text}"
    );
}

#[test]
fn a_full_run_across_processes_trains_and_advances_the_version() {
    let sb = Sandbox::new();
    make_models(&sb);
    write_config(&sb, "");
    ok(&sb.ril(&["config", "check", "run.toml"]));
    train_to_the_end(&sb, 2, 4);
    // Every role ran as its own process and logged.
    for role in [
        "coordinator",
        "learner",
        "discriminator",
        "teacher-t1",
        "actor-0",
        "actor-1",
    ] {
        assert!(sb.path(&format!("run/logs/{role}.log")).is_file(), "{role}");
    }
    // The learner's weights changed: version 2's checkpoint differs from the student.
    let before = std::fs::read(sb.path("student/model.safetensors")).unwrap();
    let after = std::fs::read(sb.path("run/learner/checkpoint-000002/model.safetensors")).unwrap();
    assert_ne!(before, after, "the policy did not change");
    let learner_log = std::fs::read_to_string(sb.path("run/logs/learner.log")).unwrap();
    assert_eq!(
        learner_log.matches("learner step").count(),
        2,
        "{learner_log}"
    );
    // The teacher cached its answers on disk, keyed per question.
    assert!(sb.path("run/teachers/t1.redb").is_file());
}

/// Data-parallel learning: `[learner] world_size = 2` starts two learner ranks; rank 0 takes the
/// actors' groups and sends rank 1 its shard of each iteration, the ring collective joins their
/// steps, and the ranks compare their weights after every iteration (verify_every = 1).
#[test]
fn a_run_with_two_learner_ranks_finishes_and_rank_0_checkpoints() {
    let sb = Sandbox::new();
    make_models(&sb);
    write_config(&sb, "");
    edit_config(
        &sb,
        &[(
            "[learner]\nsave_every = 1\n",
            "[learner]\nsave_every = 1\nworld_size = 2\nverify_every = 1\n",
        )],
    );
    ok(&sb.ril(&["config", "check", "run.toml"]));
    train_to_the_end(&sb, 2, 4);
    assert!(
        sb.path("run/learner/checkpoint-000002/model.safetensors")
            .is_file()
    );
    let rank0 = std::fs::read_to_string(sb.path("run/logs/learner.log")).unwrap();
    assert_eq!(rank0.matches("learner step").count(), 2, "{rank0}");
    let rank1 = std::fs::read_to_string(sb.path("run/logs/learner-1.log")).unwrap();
    assert!(
        !rank1.contains("checkpoint written") && !rank1.contains("learner step"),
        "only rank 0 checkpoints and reports: {rank1}"
    );
    assert_eq!(
        rank1.matches("learner shard trained").count(),
        2,
        "rank 1 trains its shard of every iteration: {rank1}"
    );
}

#[test]
fn bad_configs_are_refused_naming_the_problem() {
    let sb = Sandbox::new();
    make_models(&sb);
    write_config(&sb, "colour = \"red\"\n");
    let out = sb.ril(&["config", "check", "run.toml"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("unknown field `colour`") && stderr(&out).contains("t1"),
        "{}",
        stderr(&out)
    );

    write_config(&sb, "[network]\ncoordinators = \"x:1\"\n");
    let out = sb.ril(&["config", "check", "run.toml"]);
    assert!(stderr(&out).contains("coordinators"), "{}", stderr(&out));

    // A run-level setting repeated in a role section with another value.
    let text = std::fs::read_to_string(sb.path("run.toml"))
        .unwrap()
        .replace("[network]\ncoordinators = \"x:1\"\n", "")
        .replace("save_every = 1", "save_every = 1\ntotal_iterations = 7");
    std::fs::write(sb.path("run.toml"), text).unwrap();
    let out = sb.ril(&["config", "check", "run.toml"]);
    assert!(
        stderr(&out).contains("total_iterations") && stderr(&out).contains("[run] iterations"),
        "{}",
        stderr(&out)
    );

    std::fs::write(sb.path("bad.toml"), "[run\nid = 1").unwrap();
    let out = sb.ril(&["config", "check", "bad.toml"]);
    assert!(stderr(&out).contains("not valid TOML"), "{}", stderr(&out));
}

async fn status(sb: &Sandbox, addr: &str) -> Option<v1::RunStatus> {
    let ch = ril_proto::client::connect(addr, Duration::from_secs(2), &security(sb))
        .await
        .ok()?;
    CoordinatorClient::new(ch)
        .get_status(v1::GetStatusRequest {})
        .await
        .ok()
        .map(|r| r.into_inner())
}

/// Every role reports NOT_SERVING or SERVING over grpc.health.v1; the run's roles come up
/// SERVING. An actor that dies holding a lease loses it when it expires; another actor rolls
/// the question out and every question is trained on exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_actor_s_lease_is_reissued_and_every_question_trains_once() {
    let sb = Sandbox::new();
    make_models(&sb);
    write_config(&sb, "");
    let (_teacher, teacher) = serve(&sb, "teacher", &["teacher", "--name", "t1"]);
    let (_disc, disc) = serve(&sb, "discriminator", &["discriminator", "serve"]);
    let t_flag = format!("t1={teacher}");
    let (_coord, coord) = serve(
        &sb,
        "coordinator",
        &[
            "coordinator",
            "--teacher-addr",
            &t_flag,
            "--discriminator-addr",
            &disc,
        ],
    );
    let (_learner, learner) = serve(
        &sb,
        "learner",
        &[
            "learner",
            "--coordinator",
            &coord,
            "--discriminator-addr",
            &disc,
        ],
    );
    for (addr, role) in [
        (&teacher, "teacher"),
        (&disc, "discriminator"),
        (&coord, "coordinator"),
        (&learner, "learner"),
    ] {
        wait_until(role, Duration::from_secs(120), || async {
            matches!(
                ril_proto::client::health_check(addr, "", Duration::from_secs(2), &security(&sb))
                    .await,
                Ok(ril_proto::server::ServingStatus::Serving)
            )
        })
        .await;
    }

    // An actor registers, takes a lease, and dies without completing it.
    let actor = security_as(&sb, ril_proto::security::Role::Actor);
    let ch = ril_proto::client::connect(&coord, Duration::from_secs(5), &actor)
        .await
        .unwrap();
    let mut c = CoordinatorClient::new(ch);
    c.register_actor(v1::RegisterActorRequest {
        actor_id: "doomed".into(),
        device: "cpu".into(),
    })
    .await
    .unwrap();
    let lease = c
        .lease_prompts(v1::LeasePromptsRequest {
            actor_id: "doomed".into(),
            max_questions: 1,
            policy_version: 0,
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(lease.items.len(), 1);
    drop(c);

    // A real actor process starts working and is killed (SIGKILL) once it has taken a lease.
    let mut victim = start(
        &sb,
        "victim",
        &[
            "actor",
            "--config",
            "run.toml",
            "--coordinator",
            &coord,
            "--id",
            "victim",
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let leased = status(&sb, &coord).await.is_some_and(|s| {
            s.actors
                .iter()
                .any(|a| a.actor_id == "victim" && a.groups_leased > 0)
        });
        if leased {
            break;
        }
        assert!(
            victim.child.try_wait().unwrap().is_none(),
            "the victim exited early: {}",
            std::fs::read_to_string(sb.path("victim.log")).unwrap_or_default()
        );
        assert!(Instant::now() < deadline, "the victim never leased");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    victim.child.kill().unwrap();
    victim.child.wait().unwrap();
    // Every lease outstanding now belongs to a dead client (the doomed one, the victim): each
    // must expire, none be lost or completed.
    let at_kill = status(&sb, &coord).await.unwrap();
    assert!(
        at_kill.leases_outstanding + at_kill.leases_expired >= 1,
        "{at_kill:?}"
    );

    // Another actor process does the rest, including the dead actors' questions once their
    // leases expire.
    let mut actor = start(
        &sb,
        "actor",
        &[
            "actor",
            "--config",
            "run.toml",
            "--coordinator",
            &coord,
            "--id",
            "survivor",
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        // Check the run before the actor: a finished run makes the actor exit (successfully).
        if status(&sb, &coord).await.is_some_and(|s| s.finished) {
            break;
        }
        if let Ok(Some(st)) = actor.child.try_wait()
            && !(st.success() && status(&sb, &coord).await.is_some_and(|s| s.finished))
        {
            panic!(
                "the actor exited ({st}) before the run finished: {}",
                std::fs::read_to_string(sb.path("actor.log")).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "the run did not finish");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let s = status(&sb, &coord).await.unwrap();
    // Every question trained exactly once, whatever the victim had pushed before it died.
    assert_eq!(s.groups_accepted, 4, "{s:?}");
    assert!(
        s.leases_expired >= at_kill.leases_expired + at_kill.leases_outstanding,
        "every lease the dead clients held expired: at the kill {at_kill:?}, at the end {s:?}"
    );
    assert_eq!(s.metrics.get("groups_trained").copied(), Some(4.0), "{s:?}");
    // `ril status` prints the same state.
    let out = sb.ril(&["status", "--coordinator", &coord, "--security-dir", "certs"]);
    ok(&out);
    let text = stdout(&out);
    assert!(
        text.contains("iteration 2/2 (policy version 2), finished"),
        "{text}"
    );
    assert!(
        text.contains("survivor") && text.contains("groups_trained = 4"),
        "{text}"
    );
    let _ = actor.child.wait();
}

/// An unreachable teacher: the actor hands its question back with an error naming the teacher's
/// address, nothing is accepted, and the run's state stays intact. An oversized message to the
/// learner is refused with the size named, and the learner keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_teacher_and_an_oversized_message_give_clear_errors() {
    let sb = Sandbox::new();
    make_models(&sb);
    write_config(&sb, "");
    let (_disc, disc) = serve(&sb, "discriminator", &["discriminator", "serve"]);
    let (_coord, coord) = serve(
        &sb,
        "coordinator",
        &[
            "coordinator",
            "--teacher-addr",
            "t1=127.0.0.1:1",
            "--discriminator-addr",
            &disc,
        ],
    );
    let (_learner, learner) = serve(
        &sb,
        "learner",
        &[
            "learner",
            "--coordinator",
            &coord,
            "--discriminator-addr",
            &disc,
        ],
    );
    for (addr, role) in [
        (&disc, "discriminator"),
        (&coord, "coordinator"),
        (&learner, "learner"),
    ] {
        wait_until(role, Duration::from_secs(120), || async {
            matches!(
                ril_proto::client::health_check(addr, "", Duration::from_secs(2), &security(&sb))
                    .await,
                Ok(ril_proto::server::ServingStatus::Serving)
            )
        })
        .await;
    }
    let mut actor = start(
        &sb,
        "actor",
        &[
            "actor",
            "--config",
            "run.toml",
            "--coordinator",
            &coord,
            "--max-leases",
            "1",
        ],
    );
    let st = actor.child.wait().unwrap();
    let log = std::fs::read_to_string(sb.path("actor.log")).unwrap();
    assert!(st.success(), "{log}");
    assert!(
        log.contains("question handed back") && log.contains("teacher at 127.0.0.1:1"),
        "{log}"
    );
    let s = status(&sb, &coord).await.unwrap();
    assert_eq!(s.groups_accepted, 0, "{s:?}");
    assert_eq!(s.policy_version, 0, "{s:?}");

    // 65 MiB of "image" in one PushGroups (as an actor: the only role that may push): over
    // the 64 MiB limit.
    let actor = security_as(&sb, ril_proto::security::Role::Actor);
    let ch = ril_proto::client::connect(&learner, Duration::from_secs(5), &actor)
        .await
        .unwrap();
    let mut l = v1::learner_client::LearnerClient::new(ch).max_encoding_message_size(128 << 20);
    let group_of = |mib: usize| v1::ScoredGroup {
        question: Some(v1::Question {
            id: "huge".into(),
            images: vec![v1::Image {
                name: "huge.png".into(),
                data: vec![0u8; mib << 20].into(),
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    // 8 MiB, over tonic's 4 MiB default but under the 64 MiB limit, gets through to the learner
    // (which may refuse the made-up group for what it holds, not for its size).
    let reply = l
        .push_groups(v1::PushGroupsRequest {
            groups: vec![group_of(8)],
        })
        .await;
    if let Err(e) = &reply {
        assert!(
            !matches!(
                e.code(),
                tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
            ) && !e.message().contains("message length too large"),
            "an 8 MiB message must pass the size limit: {e:?}"
        );
    }
    let e = l
        .push_groups(v1::PushGroupsRequest {
            groups: vec![group_of(65)],
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            e.code(),
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
        ),
        "{e:?}"
    );
    assert!(
        e.message().contains("message length too large") || e.message().contains("size"),
        "{e:?}"
    );
    assert!(matches!(
        ril_proto::client::health_check(&learner, "", Duration::from_secs(2), &security(&sb)).await,
        Ok(ril_proto::server::ServingStatus::Serving)
    ));
}

/// Ctrl-C on `ril train` stops every role: the run's servers stop answering, and the learner
/// writes its checkpoint on the way out.
#[test]
fn ctrl_c_stops_every_role() {
    let sb = Sandbox::new();
    make_models(&sb);
    // Long enough that the run is still going when it is interrupted.
    write_config(&sb, "");
    // Checkpoints only at the end or at shutdown: one in the log proves a graceful stop.
    edit_config(
        &sb,
        &[
            ("iterations = 2", "iterations = 10000"),
            ("save_every = 1", "save_every = 0"),
        ],
    );
    let mut train = Command::new(ril_binary())
        .args(["train", "--config", "run.toml"])
        .current_dir(sb.dir.path())
        .env("CANDLE_NUM_THREADS", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the actors are running (their logs exist and the learner has stepped).
    let deadline = Instant::now() + Duration::from_secs(180);
    let addrs = ["coordinator", "learner", "discriminator", "teacher-t1"];
    loop {
        let stepped = std::fs::read_to_string(sb.path("run/logs/learner.log"))
            .is_ok_and(|l| l.contains("learner step"));
        if stepped {
            break;
        }
        assert!(
            train.try_wait().unwrap().is_none(),
            "ril train exited early"
        );
        assert!(Instant::now() < deadline, "the run never stepped");
        std::thread::sleep(Duration::from_millis(50));
    }
    let bound: Vec<String> = addrs
        .iter()
        .map(|r| std::fs::read_to_string(sb.path(&format!("run/addrs/{r}.addr"))).unwrap())
        .collect();
    let st = Command::new("kill")
        .args(["-INT", &train.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = train.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "ril train did not stop after Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success(), "an interrupted run is not a success");
    for (role, addr) in addrs.iter().zip(&bound) {
        let a: std::net::SocketAddr = addr.trim().parse().unwrap();
        assert!(
            std::net::TcpStream::connect_timeout(&a, Duration::from_millis(500)).is_err(),
            "{role} at {addr} still accepts connections"
        );
    }
    let learner_log = std::fs::read_to_string(sb.path("run/logs/learner.log")).unwrap();
    assert!(learner_log.contains("checkpoint written"), "{learner_log}");
}

/// The pid of the child of `parent` whose command line holds `needle` (argument by argument).
fn child_pid(parent: u32, needle: &[&str]) -> Option<u32> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // pid (comm) state ppid ...: comm may hold spaces, so split after its closing paren.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid != Some(parent) {
            continue;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let args: Vec<String> = cmdline
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.windows(needle.len()).any(|w| w == needle) {
            return Some(pid);
        }
    }
    None
}

/// Two learner ranks; rank 1 is killed (SIGKILL) mid-run. `ril train` stops every role and
/// fails naming the dead rank; nothing hangs. Run again, the ranks resume from rank 0's last
/// checkpoint, the coordinator takes back the groups the dead learner had accepted but not
/// trained, and the run finishes with every question trained exactly once.
#[test]
fn a_killed_learner_rank_stops_the_run_and_a_restart_resumes_it() {
    let sb = Sandbox::new();
    make_models(&sb);
    write_config(&sb, "");
    edit_config(
        &sb,
        &[
            ("iterations = 2", "iterations = 6"),
            (
                "[learner]\nsave_every = 1\n",
                "[learner]\nsave_every = 1\nworld_size = 2\ncollective_timeout_ms = 10000\n",
            ),
        ],
    );
    let mut train = Command::new(ril_binary())
        .args([
            "train",
            "--config",
            "run.toml",
            "--startup-timeout-s",
            "120",
        ])
        .current_dir(sb.dir.path())
        .env("CANDLE_NUM_THREADS", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(sb.path("train-1.log")).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(180);
    while !sb.path("run/learner/checkpoint-000002").is_dir() {
        assert!(
            train.try_wait().unwrap().is_none(),
            "ril train exited early: {}",
            std::fs::read_to_string(sb.path("train-1.log")).unwrap_or_default()
        );
        assert!(Instant::now() < deadline, "the run never reached version 2");
        std::thread::sleep(Duration::from_millis(20));
    }
    let rank1 = child_pid(train.id(), &["--rank", "1"]).expect("learner rank 1's process");
    let st = Command::new("kill")
        .args(["-KILL", &rank1.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = train.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "ril train hung after rank 1 died"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success());
    // Whichever notices first names rank 1: the supervisor (its process exited) or rank 0 (its
    // call to rank 1 failed).
    let err = std::fs::read_to_string(sb.path("train-1.log")).unwrap();
    let last = err
        .lines()
        .rev()
        .find(|l| l.starts_with("error: "))
        .unwrap_or("");
    assert!(
        last.contains("learner-1 exited") || last.contains("learner rank 1"),
        "{last}"
    );

    // The restart: same command, same run directory.
    // Every question once.
    train_to_the_end(&sb, 6, 12);
    let rank0 = std::fs::read_to_string(sb.path("run/logs/learner.log")).unwrap();
    assert!(rank0.contains("learner resumed"), "{rank0}");
    let rank1 = std::fs::read_to_string(sb.path("run/logs/learner-1.log")).unwrap();
    assert!(rank1.contains("learner resumed"), "{rank1}");
    // One metrics line per version, across both runs.
    let versions: Vec<u64> = std::fs::read_to_string(sb.path("run/learner/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["version"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(versions, [1, 2, 3, 4, 5, 6]);
}

/// A role of a role-death test: it listens on a fixed address, so that its restart is found
/// where its peers look.
struct Fixed {
    name: &'static str,
    args: Vec<String>,
    listen: String,
}

impl Fixed {
    fn new(name: &'static str, args: &[&str]) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Self {
            name,
            args: args.iter().map(|a| a.to_string()).collect(),
            listen: format!("127.0.0.1:{port}"),
        }
    }

    /// Starts it (the `n`th time) and waits for its address.
    fn start(&self, sb: &Sandbox, n: u32) -> (Role, String) {
        let name = format!("{}-{n}", self.name);
        let file = format!("{name}.addr");
        let mut args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        args.extend(["--config", "run.toml", "--listen", &self.listen]);
        args.extend(["--addr-file", &file]);
        let mut role = start(sb, &name, &args);
        let addr = wait_addr(sb, &mut role, &file);
        (role, addr)
    }
}

/// Which role a role-death test kills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Victim {
    Coordinator,
    Teacher,
    Discriminator,
    /// Learner rank 0 (the run's only rank).
    Learner,
    /// The teacher stopped (SIGSTOP) rather than killed, and continued (SIGCONT): a hang.
    TeacherStopped,
}

/// Runs 6 iterations with two actors, kills `victim` with SIGKILL once version 2 is published
/// and restarts it on the same address (and state) `down_for` later (`TeacherStopped`: stops it
/// with SIGSTOP and continues it `down_for` later). The run must finish with
/// every question accepted once and trained once (2 groups in each of the 6 versions of
/// `metrics.jsonl`, each version once), and the actors ending cleanly. A group pushed twice
/// (e.g. an expired lease's and its re-issue's) is refused as a duplicate: wasted work, never
/// trained twice. Returns the roles' logs, concatenated.
async fn killed_mid_run_and_restarted(victim: Victim, down_for: Duration) -> String {
    let sb = Sandbox::new();
    make_models(&sb);
    write_config(&sb, "");
    edit_config(&sb, &[("iterations = 2", "iterations = 6")]);
    if victim == Victim::TeacherStopped {
        edit_config(
            &sb,
            &[("count = 2", "count = 2\nteacher_timeout_ms = 1000")],
        );
    }
    let d = Fixed::new("discriminator", &["discriminator", "serve"]);
    let (mut d_role, discriminator) = d.start(&sb, 1);
    let teacher = Fixed::new("teacher", &["teacher", "--name", "t1"]);
    let (mut teacher_role, teacher_addr) = teacher.start(&sb, 1);
    let teacher_arg = format!("t1={teacher_addr}");
    let coordinator = Fixed::new(
        "coordinator",
        &[
            "coordinator",
            "--teacher-addr",
            &teacher_arg,
            "--discriminator-addr",
            &discriminator,
        ],
    );
    let (mut coordinator_role, addr) = coordinator.start(&sb, 1);
    let learner = Fixed::new(
        "learner",
        &[
            "learner",
            "--coordinator",
            &addr,
            "--discriminator-addr",
            &discriminator,
        ],
    );
    let (mut learner_role, _learner_addr) = learner.start(&sb, 1);
    let actor = |id: &str| {
        let args = [
            "actor",
            "--config",
            "run.toml",
            "--coordinator",
            &addr,
            "--id",
            id,
        ];
        start(&sb, id, &args)
    };
    let mut actors = [actor("a1"), actor("a2")];
    wait_until("version 2", Duration::from_secs(120), || async {
        status(&sb, &addr)
            .await
            .is_some_and(|s| s.policy_version >= 2)
    })
    .await;
    let (victim_role, fixed) = match victim {
        Victim::Coordinator => (&mut coordinator_role, &coordinator),
        Victim::Teacher | Victim::TeacherStopped => (&mut teacher_role, &teacher),
        Victim::Discriminator => (&mut d_role, &d),
        Victim::Learner => (&mut learner_role, &learner),
    };
    let _restarted = if victim == Victim::TeacherStopped {
        let pid = victim_role.child.id().to_string();
        let signal = |s: &str| Command::new("kill").args([s, &pid]).status().unwrap();
        assert!(signal("-STOP").success());
        tokio::time::sleep(down_for).await;
        assert!(signal("-CONT").success());
        None
    } else {
        victim_role.child.kill().unwrap();
        victim_role.child.wait().unwrap();
        tokio::time::sleep(down_for).await;
        let (restarted, again) = fixed.start(&sb, 2);
        assert_eq!(again, fixed.listen);
        Some(restarted)
    };

    wait_until("the run to finish", Duration::from_secs(180), || async {
        status(&sb, &addr).await.is_some_and(|s| s.finished)
    })
    .await;
    let s = status(&sb, &addr).await.unwrap();
    assert_eq!(s.groups_accepted, 12, "{s:?}");
    for a in &mut actors {
        let deadline = Instant::now() + Duration::from_secs(30);
        let exit = loop {
            if let Some(exit) = a.child.try_wait().unwrap() {
                break exit;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not stop at the run's end",
                a.name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let log = std::fs::read_to_string(sb.path(&format!("{}.log", a.name))).unwrap();
        assert!(exit.success(), "{log}");
    }
    let trained: Vec<(u64, u64)> = std::fs::read_to_string(sb.path("run/learner/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let m = serde_json::from_str::<serde_json::Value>(l).unwrap();
            (
                m["version"].as_u64().unwrap(),
                m["groups"].as_f64().unwrap() as u64,
            )
        })
        .collect();
    assert_eq!(trained, (1..=6).map(|v| (v, 2)).collect::<Vec<_>>());
    [
        "a1",
        "a2",
        "learner-1",
        "learner-2",
        "coordinator-1",
        "coordinator-2",
        "discriminator-2",
    ]
    .map(|name| {
        let log = std::fs::read_to_string(sb.path(&format!("{name}.log"))).unwrap_or_default();
        // A log written to a file carries no colour codes.
        assert!(
            !log.contains('\x1b'),
            "ANSI escape codes in {name}.log:\n{log}"
        );
        log
    })
    .concat()
}

/// A coordinator killed mid-run and restarted: the actors and the learner ask again with the
/// same keys while it is gone (`coordinator_deadline_ms`, `commit_deadline_ms`), it reloads its
/// state (the leases open at the kill stay with their actors until their deadlines; the ranks
/// and the publisher key are kept), and the run finishes losing nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_mid_run_is_restarted_and_the_run_finishes_losing_nothing() {
    let logs = killed_mid_run_and_restarted(Victim::Coordinator, Duration::from_secs(1)).await;
    assert!(
        logs.contains("asking again") || logs.contains("heartbeat failed"),
        "no role saw the coordinator gone"
    );
}

/// The run's only teacher killed mid-run and restarted: while it is gone every question an
/// actor takes fails its Answer call and goes back to the coordinator naming the teacher;
/// once it is back (its answer cache on disk) the run finishes losing nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_teacher_killed_mid_run_is_restarted_and_the_run_finishes_losing_nothing() {
    let logs = killed_mid_run_and_restarted(Victim::Teacher, Duration::from_secs(2)).await;
    assert!(
        logs.contains("question handed back") && logs.contains("teacher at 127.0.0.1:"),
        "no question went back naming the teacher"
    );
}

/// The discriminator killed mid-run and restarted (from its last checkpoint): while it is gone
/// every question fails its Score call and goes back naming D, so the iterations in between
/// wait (a group is never trained without its similarity rewards); once it is back the run
/// finishes losing nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_discriminator_killed_mid_run_is_restarted_and_the_run_finishes_losing_nothing() {
    let logs = killed_mid_run_and_restarted(Victim::Discriminator, Duration::from_secs(2)).await;
    assert!(
        logs.contains("question handed back") && logs.contains("discriminator at 127.0.0.1:"),
        "no question went back naming the discriminator"
    );
}

/// Learner rank 0 killed mid-run and restarted on its address: it resumes from its last
/// checkpoint with its publisher key (out_dir), the coordinator takes back what it had accepted
/// but not trained and re-issues it, the actors hand their leases back while it is gone (no
/// weights, pushes refused) and carry on once it serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn learner_rank_0_killed_mid_run_is_restarted_and_the_run_finishes_losing_nothing() {
    let logs = killed_mid_run_and_restarted(Victim::Learner, Duration::from_secs(1)).await;
    assert!(
        logs.contains("learner resumed"),
        "the restarted learner did not resume"
    );
}

/// The only teacher hung (SIGSTOP) for 3 s, three times its 1 s deadline
/// (`[actors] teacher_timeout_ms`), then continued: every Answer call in between fails at the
/// deadline naming the teacher (a hang is not waited out), its questions go back, and the run
/// finishes losing nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_teacher_hung_past_its_deadline_fails_its_calls_and_the_run_finishes_losing_nothing() {
    let logs = killed_mid_run_and_restarted(Victim::TeacherStopped, Duration::from_secs(3)).await;
    assert!(
        logs.contains("question handed back")
            && logs.contains("teacher at 127.0.0.1:")
            && logs.contains("no reply within the deadline of 1000 ms"),
        "no Answer call failed at its deadline naming the teacher"
    );
}

/// `ril experiment chaos`, short: 20 iterations with a fault every ~1 s drawn from every
/// kind (roles killed and restarted on their addresses, a teacher hung past its 1 s deadline).
/// The report must show every fault recovered from, no group lost and none trained twice.
/// The figures of a long run are in docs/RESULTS.md.
#[test]
fn a_short_chaos_run_recovers_from_every_fault_losing_nothing() {
    let sb = Sandbox::new();
    make_models(&sb);
    write_config(&sb, "");
    edit_config(
        &sb,
        &[
            ("iterations = 2", "iterations = 20"),
            ("count = 2", "count = 2\nteacher_timeout_ms = 1000"),
        ],
    );
    let out = sb.ril(&[
        "experiment",
        "chaos",
        "--config",
        "run.toml",
        "--fault-every-s",
        "1",
        "--seed",
        "3",
        "--report",
        "chaos.json",
    ]);
    ok(&out);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(sb.path("chaos.json")).unwrap()).unwrap();
    let n = |k: &str| report[k].as_u64().unwrap();
    assert!(n("faults_injected") >= 3, "{report:#}");
    assert_eq!(
        n("faults_recovered") + n("faults_open_at_end"),
        n("faults_injected"),
        "{report:#}"
    );
    assert!(n("faults_open_at_end") <= 1, "{report:#}");
    assert_eq!(
        (n("groups_lost"), n("groups_trained_twice")),
        (0, 0),
        "{report:#}"
    );
    assert_eq!(
        (n("iterations"), n("questions_per_iteration")),
        (20, 2),
        "{report:#}"
    );
    let table = stdout(&out);
    assert!(table.contains("| groups lost | 0 |"), "{table}");
}

/// A coordinator whose teacher and discriminator addresses lead nowhere (port 9): enough for
/// what happens before a learner joins.
fn coordinator_without_peers(sb: &Sandbox) -> (Role, String) {
    serve(
        sb,
        "coordinator",
        &[
            "coordinator",
            "--teacher-addr",
            "t1=127.0.0.1:9",
            "--discriminator-addr",
            "127.0.0.1:9",
        ],
    )
}

/// The progress watchdog on a real coordinator process: no learner ever joins, GetStatus says
/// what the run waits for, and past `[coordinator] stall_limit_s` the process stops with an
/// error naming the wait instead of serving a run that cannot advance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_that_stops_advancing_is_stopped_by_the_watchdog_naming_the_wait() {
    let sb = Sandbox::new();
    make_models(&sb);
    write_config(&sb, "");
    edit_config(
        &sb,
        &[(
            "actor_timeout_s = 2",
            "actor_timeout_s = 2\nstall_limit_s = 4",
        )],
    );
    let (mut coord, addr) = coordinator_without_peers(&sb);
    let s = status(&sb, &addr).await.expect("GetStatus answers");
    assert!(
        s.waiting_for == "learner rank(s) 0 to join (JoinLearner; 0 of 1 joined)"
            && s.stalled.is_empty()
            && s.ms_since_progress < 4_000,
        "{s:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let exit = loop {
        if let Some(exit) = coord.child.try_wait().unwrap() {
            break exit;
        }
        assert!(
            Instant::now() < deadline,
            "the coordinator kept serving a stalled run"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let log = std::fs::read_to_string(sb.path("coordinator.log")).unwrap();
    assert!(!exit.success(), "{log}");
    assert!(
        log.contains("the run stalled: no progress for 4 s (the stall limit, [coordinator] stall_limit_s): learner rank(s) 0 to join (JoinLearner; 0 of 1 joined)"),
        "{log}"
    );
}

/// An actor waiting for the run to let it in (the coordinator answers Unavailable until the
/// learner joins) stops promptly on SIGTERM instead of retrying until its registration timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_actor_still_registering_stops_on_sigterm() {
    let sb = Sandbox::new();
    make_models(&sb);
    write_config(&sb, "");
    let (_coord, coord) = coordinator_without_peers(&sb);
    let mut actor = start(
        &sb,
        "actor",
        &[
            "actor",
            "--config",
            "run.toml",
            "--coordinator",
            &coord,
            "--id",
            "a1",
        ],
    );
    // Wait until it has loaded the student and been told the coordinator is not ready.
    wait_until(
        "the actor asks to register",
        Duration::from_secs(60),
        || async {
            std::fs::read_to_string(sb.path("actor.log"))
                .is_ok_and(|log| log.contains("waiting for the coordinator to be ready"))
        },
    )
    .await;
    assert!(
        actor.child.try_wait().unwrap().is_none(),
        "the actor should still be waiting"
    );
    let st = Command::new("kill")
        .args(["-TERM", &actor.child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = actor.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the actor ignored SIGTERM while registering"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        status.success(),
        "{}",
        std::fs::read_to_string(sb.path("actor.log")).unwrap_or_default()
    );
    let log = std::fs::read_to_string(sb.path("actor.log")).unwrap();
    assert!(log.contains("stopped before registering"), "{log}");
}

/// Security on a real coordinator process (TLS, mutual TLS, the run token, roles): calls
/// without the token, with a wrong token, with a certificate from another CA, and from a role
/// without the right are refused; health answers without credentials.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_without_credentials_or_the_right_role_are_refused_and_health_still_answers() {
    use ril_proto::security::{Role as R, SecurityConfig, Token};
    let sb = Sandbox::new();
    make_models(&sb);
    write_config(&sb, "");
    ok(&sb.ril(&["certs", "init", "other-ca"]));
    let (_coord, coord) = coordinator_without_peers(&sb);
    // Health: TLS against the run CA, but no token and no client certificate.
    let anonymous = security(&sb).with_token(None);
    let no_cert = SecurityConfig {
        mtls: false,
        ..SecurityConfig::from_dir(&sb.path("certs"))
    }
    .resolve(R::Admin)
    .unwrap()
    .with_token(None);
    for s in [&anonymous, &no_cert] {
        wait_until(
            "health SERVING without credentials",
            Duration::from_secs(60),
            || async {
                matches!(
                    ril_proto::client::health_check(&coord, "", Duration::from_secs(2), s).await,
                    Ok(ril_proto::server::ServingStatus::Serving)
                )
            },
        )
        .await;
    }
    type BoxError = Box<dyn std::error::Error + Send + Sync>;
    let call = |s: ril_proto::security::Security| {
        let coord = coord.clone();
        async move {
            let ch = ril_proto::client::connect(&coord, Duration::from_secs(5), &s)
                .await
                .map_err(BoxError::from)?;
            CoordinatorClient::new(ch)
                .get_status(v1::GetStatusRequest {})
                .await
                .map(|_| ())
                .map_err(BoxError::from)
        }
    };
    let code = |r: Result<(), BoxError>| {
        r.unwrap_err()
            .downcast::<tonic::Status>()
            .map(|s| (s.code(), s.message().to_string()))
            .unwrap()
    };
    // The right credentials work.
    call(security(&sb)).await.unwrap();
    // No token.
    let (c, m) = code(call(anonymous.clone()).await);
    assert_eq!(c, tonic::Code::Unauthenticated, "{m}");
    assert!(m.contains("GetStatus") && m.contains("no run token"), "{m}");
    // A wrong token (the other CA's run's token), never echoed back.
    let wrong = std::fs::read_to_string(sb.path("other-ca/token")).unwrap();
    let (c, m) =
        code(call(security(&sb).with_token(Some(Token::new(&wrong, "test").unwrap()))).await);
    assert_eq!(c, tonic::Code::Unauthenticated, "{m}");
    assert!(
        m.contains("wrong run token") && !m.contains(wrong.trim()),
        "{m}"
    );
    // The token but no client certificate under mutual TLS.
    let (c, m) = code(call(no_cert.with_token(security(&sb).token_for_tests())).await);
    assert_eq!(c, tonic::Code::Unauthenticated, "{m}");
    assert!(m.contains("no client certificate"), "{m}");
    // A certificate from another CA: the handshake is refused.
    let foreign = SecurityConfig {
        ca: Some(sb.path("certs/ca.crt")),
        token_file: Some(sb.path("certs/token")),
        ..SecurityConfig::from_dir(&sb.path("other-ca"))
    }
    .resolve(R::Learner)
    .unwrap();
    // (Under TLS 1.3 the client's side of the handshake completes first; the server then drops
    // the connection, so the call fails as a transport error, never reaching the service.)
    let e = call(foreign).await.unwrap_err();
    assert!(
        e.downcast_ref::<tonic::Status>().is_none_or(|s| matches!(
            s.code(),
            tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::Unknown
        )),
        "{e:?}"
    );
    // A role without the right: an actor publishing a version.
    let ch =
        ril_proto::client::connect(&coord, Duration::from_secs(5), &security_as(&sb, R::Actor))
            .await
            .unwrap();
    let s = CoordinatorClient::new(ch)
        .publish_version(v1::PublishVersionRequest::default())
        .await
        .unwrap_err();
    assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
    assert!(
        s.message().contains("PublishVersion") && s.message().contains("actor"),
        "{s:?}"
    );
    // Plaintext to a TLS server fails too.
    let plain = ril_proto::security::Security::plaintext(R::Admin);
    assert!(call(plain).await.is_err());
}
