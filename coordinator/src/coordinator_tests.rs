//! The domain state machine under a stepped clock.

use std::time::Duration;

use super::*;
use crate::testutil::shapes_dataset;

struct Fixture {
    _dir: tempfile::TempDir,
    options: CoordinatorOptions,
}

/// B = 4, 3 iterations, a 10-row dataset, state in a temp dir.
fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let dataset = shapes_dataset(dir.path(), 10);
    let options = CoordinatorOptions {
        run_id: "test-run".into(),
        dataset,
        seed: 11,
        questions_per_iteration: 4,
        total_iterations: 3,
        lease_timeout: Duration::from_secs(10),
        heartbeat_interval: Duration::from_secs(1),
        actor_timeout: Duration::from_secs(30),
        state_dir: Some(dir.path().join("state")),
        ..Default::default()
    };
    Fixture { _dir: dir, options }
}

fn positions(g: &LeaseGrant) -> Vec<u64> {
    g.items.iter().map(|i| i.position).collect()
}

fn accept(c: &mut Coordinator, g: &LeaseGrant, position: u64, now: Now) -> Acceptance {
    let item = g.items.iter().find(|i| i.position == position).unwrap();
    c.accept_group(&g.lease_id, position, &item.row.id, item.iteration, now)
        .unwrap()
}

fn refused(a: Acceptance) -> String {
    match a {
        Acceptance::Refused(r) => r,
        Acceptance::Accepted => panic!("expected a refusal"),
    }
}

#[test]
fn a_group_is_accepted_once_and_bad_groups_are_refused_with_a_reason() {
    let f = fixture();
    let mut c = Coordinator::open(f.options.clone()).unwrap();
    let t = Now::current();
    c.register_actor("a", "cpu", t).unwrap();
    let g = c.lease("a", 2, 0, t).unwrap();
    assert_eq!(positions(&g), [0, 1]);
    assert_eq!(g.policy_version, 0);
    assert!(
        g.items
            .iter()
            .all(|i| i.iteration == 0 && i.row.images.len() == 1)
    );
    assert!(!g.lease_id.is_empty() && g.deadline_unix_ms >= t.unix_ms + 10_000);
    assert_eq!(accept(&mut c, &g, 0, t), Acceptance::Accepted);
    // A retry under the same lease (the learner lost the answer) gets the same answer.
    assert_eq!(accept(&mut c, &g, 0, t), Acceptance::Accepted);
    let id0 = g.items[0].row.id.clone();
    let dup = refused(c.accept_group("another-lease", 0, &id0, 0, t).unwrap());
    assert_eq!(
        dup,
        format!(
            "duplicate: position 0 ({id0}) already accepted (group from lease \"another-lease\", \
             question {id0:?})"
        )
    );
    // The wrong question, the wrong iteration, a position never issued, one past the run.
    let r = refused(c.accept_group(&g.lease_id, 1, &id0, 0, t).unwrap());
    assert!(r.contains("position 1 is question"), "{r}");
    let id1 = g.items[1].row.id.clone();
    let r = refused(c.accept_group(&g.lease_id, 1, &id1, 2, t).unwrap());
    assert!(r.contains("belongs to iteration 0"), "{r}");
    let r = refused(c.accept_group(&g.lease_id, 3, "x", 0, t).unwrap());
    assert!(r.contains("never issued"), "{r}");
    let r = refused(c.accept_group(&g.lease_id, 12, "x", 3, t).unwrap());
    assert!(r.contains("unknown position 12"), "{r}");
    // Malformed requests (an empty question id, actor id, no questions asked for) are refused
    // at the boundary: `convert::tests::malformed_requests_name_the_field`.

    assert_eq!(accept(&mut c, &g, 1, t), Acceptance::Accepted);
    let s = c.status(t);
    assert_eq!(
        (s.groups_accepted, s.duplicates_refused, s.cursor),
        (2, 1, 2)
    );
    assert!(s.groups_per_second > 0.0);
    assert_eq!(s.actors.len(), 1);
    assert!(s.actors[0].alive && s.actors[0].groups_leased == 2 && s.actors[0].device == "cpu");
    // The lease is still open until the actor completes it.
    assert_eq!(s.leases_outstanding, 1);
    c.complete_lease("a", &g.lease_id, &[], t).unwrap();
    assert_eq!(c.status(t).leases_outstanding, 0);
}

#[test]
fn an_expired_lease_is_reissued_and_its_late_group_still_counts_once() {
    let f = fixture();
    let mut c = Coordinator::open(f.options.clone()).unwrap();
    let t0 = Now::current();
    let ga = c.lease("a", 2, 0, t0).unwrap();
    assert_eq!(positions(&ga), [0, 1]);
    // b keeps heartbeating; a is silent but within actor_timeout. a's lease expires at 10 s.
    let t1 = t0.after(Duration::from_secs(11));
    c.heartbeat("a", 0, t1).unwrap();
    let gb = c.lease("b", 4, 0, t1).unwrap();
    assert_eq!(
        positions(&gb),
        [0, 1, 2, 3],
        "re-issued positions first, then fresh"
    );
    assert_eq!(c.status(t1).leases_expired, 1);
    // a's late group for position 0 is valid work: accepted once; b's is then a duplicate.
    assert_eq!(accept(&mut c, &ga, 0, t1), Acceptance::Accepted);
    assert!(refused(accept(&mut c, &gb, 0, t1)).starts_with("duplicate"));
    // b's lease expires too: position 0 (accepted) is not re-issued, the rest are.
    let t2 = t1.after(Duration::from_secs(11));
    c.heartbeat("b", 0, t2).unwrap();
    let gc = c.lease("c", 10, 0, t2).unwrap();
    assert_eq!(positions(&gc), [1, 2, 3]);
    assert_eq!(c.status(t2).leases_expired, 2);
    // Completing an expired lease is harmless.
    c.complete_lease("a", &ga.lease_id, &[1], t2).unwrap();
    assert_eq!(c.status(t2).leases_outstanding, 1);
}

#[test]
fn an_actor_that_stops_heartbeating_loses_its_leases() {
    let f = fixture();
    let options = CoordinatorOptions {
        lease_timeout: Duration::from_secs(600),
        actor_timeout: Duration::from_secs(5),
        state_dir: None,
        ..f.options.clone()
    };
    let mut c = Coordinator::open(options).unwrap();
    let t0 = Now::current();
    c.register_actor("quiet", "cpu", t0).unwrap();
    c.register_actor("chatty", "cpu", t0).unwrap();
    let g = c.lease("quiet", 2, 0, t0).unwrap();
    let mut t = t0;
    for _ in 0..3 {
        t = t.after(Duration::from_secs(2));
        assert!(c.heartbeat("chatty", 0, t).unwrap().known);
    }
    let s = c.status(t);
    assert_eq!(s.leases_expired, 1);
    let quiet = s.actors.iter().find(|a| a.actor_id == "quiet").unwrap();
    assert!(!quiet.alive && quiet.last_seen_ms_ago >= 6000);
    assert!(
        s.actors
            .iter()
            .find(|a| a.actor_id == "chatty")
            .unwrap()
            .alive
    );
    assert_eq!(
        positions(&c.lease("chatty", 2, 0, t).unwrap()),
        positions(&g)
    );
    // Unknown actors are told to register.
    assert!(!c.heartbeat("stranger", 0, t).unwrap().known);
}

#[test]
fn on_policy_runs_wait_for_the_next_version_and_staleness_lets_them_run_ahead() {
    let f = fixture();
    let mut c = Coordinator::open(CoordinatorOptions {
        state_dir: None,
        ..f.options.clone()
    })
    .unwrap();
    let t = Now::current();
    let g = c.lease("a", 100, 0, t).unwrap();
    assert_eq!(
        positions(&g),
        [0, 1, 2, 3],
        "only iteration 0 before version 1"
    );
    let empty = c.lease("a", 100, 0, t).unwrap();
    assert!(empty.items.is_empty() && empty.lease_id.is_empty());
    assert!(empty.retry_after_ms > 0 && !empty.run_finished);
    c.publish_version(1, 0, "ckpt/v1", t).unwrap();
    let g1 = c.lease("a", 100, 1, t).unwrap();
    assert_eq!(positions(&g1), [4, 5, 6, 7]);
    assert!(g1.items.iter().all(|i| i.iteration == 1));
    assert_eq!(g1.policy_version, 1);

    // Version rules: in order, a retry is harmless. (Version 0 and a version not from the
    // matching iteration are refused at the boundary: `convert::tests`.)
    let e = c.publish_version(3, 2, "", t).unwrap_err();
    assert!(e.to_string().contains("skips ahead"), "{e}");
    c.publish_version(1, 0, "ckpt/v1", t).unwrap();
    let e = c.publish_version(1, 0, "elsewhere", t).unwrap_err();
    assert!(e.to_string().contains("not newer"), "{e}");
    c.publish_version(2, 1, "ckpt/v2", t).unwrap();
    c.publish_version(3, 2, "ckpt/v3", t).unwrap();
    let e = c.publish_version(4, 3, "", t).unwrap_err();
    assert!(e.to_string().contains("past the run's 3 iterations"), "{e}");
    let done = c.lease("a", 1, 3, t).unwrap();
    assert!(done.run_finished && done.items.is_empty());
    assert!(c.heartbeat("a", 3, t).unwrap().run_finished);
    let s = c.status(t);
    assert!(s.finished);
    assert_eq!(s.history.len(), 3);
    assert_eq!(s.history[2].checkpoint, "ckpt/v3");

    // Staleness 1: iterations 0 and 1 are leased at version 0.
    let mut c = Coordinator::open(CoordinatorOptions {
        staleness_bound: 1,
        state_dir: None,
        ..f.options.clone()
    })
    .unwrap();
    let g = c.lease("a", 100, 0, t).unwrap();
    assert_eq!(positions(&g), (0..8).collect::<Vec<_>>());
    assert!(c.lease("a", 100, 0, t).unwrap().items.is_empty());
    c.publish_version(1, 0, "", t).unwrap();
    assert_eq!(
        positions(&c.lease("a", 100, 1, t).unwrap()),
        (8..12).collect::<Vec<_>>()
    );
}

#[test]
fn a_reopened_run_continues_and_reissues_what_was_outstanding() {
    let f = fixture();
    let t = Now::current();
    let (ids, lease_id) = {
        let mut c = Coordinator::open(f.options.clone()).unwrap();
        let e = Coordinator::open(f.options.clone())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("another coordinator") && e.contains(LOCK_FILE),
            "{e}"
        );
        let g = c.lease("a", 3, 0, t).unwrap();
        assert_eq!(positions(&g), [0, 1, 2]);
        assert_eq!(accept(&mut c, &g, 0, t), Acceptance::Accepted);
        assert_eq!(accept(&mut c, &g, 2, t), Acceptance::Accepted);
        let id2 = g.items[2].row.id.clone();
        let r = refused(c.accept_group("another-lease", 2, &id2, 0, t).unwrap());
        assert!(r.starts_with("duplicate"), "{r}");
        c.publish_version(1, 0, "ckpt/v1", t).unwrap();
        let ids: Vec<String> = g.items.iter().map(|i| i.row.id.clone()).collect();
        (ids, g.lease_id)
        // Dropped without a shutdown: every change was already written.
    };
    let mut c = Coordinator::open(f.options.clone()).unwrap();
    assert_eq!((c.cursor(), c.version(), c.run_id()), (3, 1, "test-run"));
    let s = c.status(t);
    assert_eq!((s.groups_accepted, s.duplicates_refused), (2, 1));
    assert_eq!(s.history.len(), 1);
    // The same stream: position 0 is the same question, still accepted; its iteration is trained
    // (version 1 is published), so even its own lease's retry is now a duplicate.
    let r = refused(c.accept_group(&lease_id, 0, &ids[0], 0, t).unwrap());
    assert!(r.starts_with("duplicate"), "{r}");
    // Position 1 was outstanding under "a"'s lease, which the restart honours until its
    // deadline (`a_lease_open_at_a_restart_stays_with_its_actor_until_its_deadline`); past it,
    // position 1 is re-issued first, then fresh positions up to iteration 1.
    let g = c
        .lease("b", 10, 1, t.after(Duration::from_secs(11)))
        .unwrap();
    assert_eq!(positions(&g), [1, 3, 4, 5, 6, 7]);
    assert_eq!(g.items[0].row.id, ids[1]);
    assert_ne!(g.lease_id, lease_id, "lease ids are unique across restarts");
    drop(c);

    // Another run's settings are refused with a clear error.
    for (options, needle) in [
        (
            CoordinatorOptions {
                seed: 12,
                ..f.options.clone()
            },
            "seed 11",
        ),
        (
            CoordinatorOptions {
                questions_per_iteration: 5,
                ..f.options.clone()
            },
            "4 questions per iteration",
        ),
        (
            CoordinatorOptions {
                run_id: "other".into(),
                ..f.options.clone()
            },
            "belongs to run \"test-run\"",
        ),
        (
            CoordinatorOptions {
                dataset: shapes_dataset(&f._dir.path().join("other"), 9),
                ..f.options.clone()
            },
            "another dataset",
        ),
    ] {
        let e = Coordinator::open(options).unwrap_err().to_string();
        assert!(e.contains(needle) && e.contains(STATE_FILE), "{e}");
    }
    // An empty run id resumes the stored one.
    let c = Coordinator::open(CoordinatorOptions {
        run_id: String::new(),
        ..f.options.clone()
    })
    .unwrap();
    assert_eq!(c.run_id(), "test-run");
}

#[test]
fn completed_leases_return_positions_and_wait_a_lease_timeout_for_acceptance() {
    let f = fixture();
    let mut c = Coordinator::open(CoordinatorOptions {
        state_dir: None,
        ..f.options.clone()
    })
    .unwrap();
    let t0 = Now::current();
    let g = c.lease("a", 3, 0, t0).unwrap();
    let e = c.complete_lease("b", &g.lease_id, &[], t0).unwrap_err();
    assert!(
        matches!(
            e,
            CoordinatorError::InvalidArgument {
                field: "actor_id",
                ..
            }
        ),
        "{e}"
    );
    let e = c.complete_lease("a", &g.lease_id, &[3], t0).unwrap_err();
    assert!(
        matches!(
            e,
            CoordinatorError::InvalidArgument {
                field: "returned_positions",
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(accept(&mut c, &g, 0, t0), Acceptance::Accepted);
    c.complete_lease("a", &g.lease_id, &[2], t0).unwrap();
    // Position 2 comes back at once; position 1's group is awaited.
    assert_eq!(positions(&c.lease("b", 10, 0, t0).unwrap()), [2, 3]);
    let t1 = t0.after(Duration::from_secs(11));
    c.heartbeat("b", 0, t1).unwrap();
    let g2 = c.lease("b", 10, 0, t1).unwrap();
    assert_eq!(positions(&g2), [1, 2, 3], "position 1 was never accepted");
}

/// A coordinator restart keeps the leases open at its last write: their positions stay with
/// their actors until each lease's deadline (an actor still rolling them out is not raced by a
/// re-issue, which would only be refused as a duplicate later), their groups are accepted and
/// they can be completed; a lease past its deadline is re-issued as before.
#[test]
fn a_lease_open_at_a_restart_stays_with_its_actor_until_its_deadline() {
    let f = fixture();
    let t = Now::current();
    let (ga, gb) = {
        let mut c = Coordinator::open(f.options.clone()).unwrap();
        let ga = c.lease("a", 2, 0, t).unwrap();
        let gb = c.lease("b", 2, 0, t).unwrap();
        (ga, gb)
        // Dropped without a shutdown, as by SIGKILL.
    };
    assert_eq!((positions(&ga), positions(&gb)), (vec![0, 1], vec![2, 3]));
    let mut c = Coordinator::open(f.options.clone()).unwrap();
    let s = c.status(t);
    assert_eq!((s.leases_outstanding, s.cursor), (2, 4));
    // Nothing to re-issue while both leases are open (iteration 0 is all leased).
    let gc = c.lease("c", 4, 0, t).unwrap();
    assert!(positions(&gc).is_empty() && gc.retry_after_ms > 0, "{gc:?}");
    // The actors are known (no re-registration needed), their groups are taken, and a lease
    // completes with a question handed back, which is re-issued at once.
    assert!(c.heartbeat("a", 0, t).unwrap().known);
    assert_eq!(accept(&mut c, &ga, 0, t), Acceptance::Accepted);
    c.complete_lease("a", &ga.lease_id, &[1], t).unwrap();
    let gd = c.lease("d", 4, 0, t.after(Duration::from_secs(5))).unwrap();
    assert_eq!(positions(&gd), [1], "b's lease is open until t + 10 s");
    // Past b's deadline its questions are re-issued; its late group is still taken once.
    let later = t.after(Duration::from_secs(11));
    let ge = c.lease("e", 4, 0, later).unwrap();
    assert_eq!(positions(&ge), [2, 3]);
    assert_eq!(c.status(later).leases_expired, 1);
    assert_eq!(accept(&mut c, &gb, 2, t), Acceptance::Accepted);
    let r = refused(accept(&mut c, &ge, 2, t));
    assert!(r.starts_with("duplicate"), "{r}");
}

/// A learner that stops loses the groups it accepted but had not trained (they live in its
/// memory). When rank 0 joins again from its checkpoint, the coordinator takes back what was
/// accepted for iterations from that version on and re-issues it. A rank 0 from a checkpoint
/// older than the latest published version is refused: the run never goes backwards.
#[test]
fn a_restarted_learner_gets_back_what_it_accepted_but_never_trained() {
    let f = fixture();
    let mut c = Coordinator::open(f.options.clone()).unwrap();
    let t = Now::current();
    // Iterations 0 and 1 trained and published as versions 1 and 2 (each checkpointed).
    let g = c.lease("a", 4, 0, t).unwrap();
    for p in 0..4 {
        assert_eq!(accept(&mut c, &g, p, t), Acceptance::Accepted);
    }
    c.publish_version(1, 0, "ckpt-1", t).unwrap();
    let g = c.lease("a", 4, 1, t).unwrap();
    for p in 4..8 {
        assert_eq!(accept(&mut c, &g, p, t), Acceptance::Accepted);
    }
    c.publish_version(2, 1, "ckpt-2", t).unwrap();
    // Iteration 2 half accepted, never trained.
    let g = c.lease("a", 4, 2, t).unwrap();
    for p in 8..10 {
        assert_eq!(accept(&mut c, &g, p, t), Acceptance::Accepted);
    }
    assert_eq!(c.status(t).groups_accepted, 10);

    // A checkpoint from the future is not this run's.
    let e = c.join_learner(0, "h:0", &[], "", 4, t).unwrap_err();
    assert!(e.to_string().contains("version 4"), "{e}");
    // One from before the latest published version would roll the run back: refused, naming
    // the checkpoint to start from, and nothing changes.
    let e = c.join_learner(0, "h:0", &[], "", 1, t).unwrap_err();
    assert!(
        matches!(e, CoordinatorError::FailedPrecondition(_))
            && e.to_string().contains("already published version 2")
            && e.to_string().contains("ckpt-2"),
        "{e}"
    );
    let s = c.status(t);
    assert_eq!((s.policy_version, s.groups_accepted), (2, 10));

    // A learner one version ahead (checkpointed version 3, stopped before publishing it) is
    // this run's: nothing it trained is taken back.
    c.join_learner(0, "h:0", &[], "", 3, t).unwrap();
    assert_eq!(c.status(t).groups_accepted, 10);
    // Rank 0 restarts from version 2: positions 8 and 9 (accepted, never trained) come back.
    c.join_learner(0, "h:0", &[], "", 2, t).unwrap();
    let s = c.status(t);
    assert_eq!((s.policy_version, s.groups_accepted), (2, 8));
    assert_eq!(s.history.last().unwrap().version, 2);
    // Polling again changes nothing.
    c.join_learner(0, "h:0", &[], "", 2, t).unwrap();
    assert_eq!(c.status(t).groups_accepted, 8);
    // They are leased again first.
    let again = c.lease("b", 2, 2, t).unwrap();
    assert_eq!(positions(&again), [8, 9]);
    // It survives a restart of the coordinator (the rewind was persisted).
    drop(c);
    let mut c = Coordinator::open(f.options.clone()).unwrap();
    let s = c.status(t);
    assert_eq!((s.policy_version, s.groups_accepted), (2, 8));
}

#[test]
fn a_returned_question_is_unaccepted_and_reissued() {
    let f = fixture();
    let mut c = Coordinator::open(CoordinatorOptions {
        state_dir: None,
        ..f.options.clone()
    })
    .unwrap();
    let t = Now::current();
    let g = c.lease("a", 4, 0, t).unwrap();
    for p in 0..4 {
        assert_eq!(accept(&mut c, &g, p, t), Acceptance::Accepted);
    }
    c.return_question(1, "", "too stale", t).unwrap();
    assert_eq!(c.status(t).groups_accepted, 3);
    let again = c.lease("b", 4, 0, t).unwrap();
    assert_eq!(positions(&again), [1]);
    assert_eq!(accept(&mut c, &again, 1, t), Acceptance::Accepted);
    assert_eq!(c.status(t).groups_accepted, 4);
    let e = c.return_question(9, "", "", t).unwrap_err();
    assert!(
        matches!(
            e,
            CoordinatorError::InvalidArgument {
                field: "position",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn learner_ranks_rendezvous_with_rank_zeros_collective_id() {
    let f = fixture();
    let mut c = Coordinator::open(CoordinatorOptions {
        learner_world_size: 2,
        state_dir: None,
        ..f.options.clone()
    })
    .unwrap();
    let t = Now::current();
    let e = c.join_learner(2, "h:2", &[], "", 0, t).unwrap_err();
    assert!(
        matches!(e, CoordinatorError::InvalidArgument { field: "rank", .. }),
        "{e}"
    );
    // An empty address and a collective id from rank 1 are refused at the boundary
    // (`convert::tests`).
    let r1 = c.join_learner(1, "h:1", &[], "c:1", 0, t).unwrap();
    assert!(!r1.ready && r1.rank_addrs.is_empty() && r1.world_size == 2);
    assert_eq!(
        r1.collective_addrs,
        ["", "c:1"],
        "the missing rank shows as empty"
    );
    assert_eq!(c.status(Now::current()).learner_ranks_joined, 1);
    let id = vec![7u8; 128];
    let r0 = c.join_learner(0, "h:0", &id, "c:0", 0, t).unwrap();
    assert!(r0.ready);
    assert_eq!(r0.rank_addrs, ["h:0", "h:1"]);
    assert_eq!(r0.collective_addrs, ["c:0", "c:1"]);
    assert_eq!(r0.collective_id, id);
    assert_eq!(c.join_learner(1, "h:1", &[], "c:1", 0, t).unwrap(), r0);
    let s = c.status(Now::current());
    assert_eq!((s.learner_world_size, s.learner_ranks_joined), (2, 2));
}

#[test]
fn metrics_are_merged_and_bad_names_refused() {
    let f = fixture();
    let mut c = Coordinator::open(CoordinatorOptions {
        state_dir: None,
        ..f.options.clone()
    })
    .unwrap();
    c.report_metrics(0, [("loss".to_string(), 1.5), ("kl".to_string(), 0.1)])
        .unwrap();
    c.report_metrics(1, [("loss".to_string(), 1.0)]).unwrap();
    let s = c.status(Now::current());
    assert_eq!(s.metrics["loss"], 1.0);
    assert_eq!(s.metrics["kl"], 0.1);
    assert_eq!(s.metrics_iteration, Some(1));
    // Bad metric names are refused at the boundary (`convert::tests`).
}

#[test]
fn epochs_are_reshuffled_permutations_of_the_dataset() {
    let f = fixture();
    let mut c = Coordinator::open(CoordinatorOptions {
        total_iterations: 10,
        staleness_bound: 9,
        state_dir: None,
        ..f.options.clone()
    })
    .unwrap();
    let t = Now::current();
    let g = c.lease("a", 40, 0, t).unwrap();
    let ids: Vec<&str> = g.items.iter().map(|i| i.row.id.as_str()).collect();
    assert_eq!(ids.len(), 40);
    let epochs: Vec<Vec<&str>> = ids.chunks(10).map(|c| c.to_vec()).collect();
    let mut sorted0 = epochs[0].clone();
    sorted0.sort();
    for e in &epochs {
        let mut s = e.clone();
        s.sort();
        assert_eq!(s, sorted0, "every epoch holds every row once");
    }
    assert!(
        epochs.windows(2).any(|w| w[0] != w[1]),
        "epochs are reshuffled"
    );
    // The order depends only on (seed, epoch): a second coordinator agrees.
    let mut d = Coordinator::open(CoordinatorOptions {
        total_iterations: 10,
        staleness_bound: 9,
        state_dir: None,
        ..f.options.clone()
    })
    .unwrap();
    let again: Vec<String> = d
        .lease("a", 40, 0, t)
        .unwrap()
        .items
        .into_iter()
        .map(|i| i.row.id)
        .collect();
    assert_eq!(again, ids);
}

#[test]
fn datasets_that_cannot_be_used_are_errors_naming_the_file() {
    let f = fixture();
    let missing = f._dir.path().join("nowhere");
    let e = Coordinator::open(CoordinatorOptions {
        dataset: missing.clone(),
        ..f.options.clone()
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains(&missing.display().to_string()), "{e}");

    // A row whose image is missing: refused naming the row, or skipped when asked.
    let train = f.options.dataset.join("train.jsonl");
    let mut text = std::fs::read_to_string(&train).unwrap();
    text.push_str(
        "{\"id\": \"broken\", \"images\": [\"images/none.png\"], \"question\": \"what?\", \"answer\": \"x\"}\n",
    );
    let bad = f._dir.path().join("data").join("bad.jsonl");
    std::fs::write(&bad, text).unwrap();
    let e = Coordinator::open(CoordinatorOptions {
        dataset: bad.clone(),
        state_dir: None,
        ..f.options.clone()
    })
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("bad.jsonl") && e.contains("broken") && e.contains("images[0]"),
        "{e}"
    );
    let c = Coordinator::open(CoordinatorOptions {
        dataset: bad,
        skip_bad_rows: true,
        state_dir: None,
        ..f.options.clone()
    })
    .unwrap();
    assert_eq!(c.stream().rows(), 10);
    assert_eq!(c.stream().skipped().skipped, 1);
}

#[test]
fn actors_get_the_configured_learner_or_rank_zeros_once_it_joined() {
    let f = fixture();
    let mut c = Coordinator::open(CoordinatorOptions {
        state_dir: None,
        ..f.options.clone()
    })
    .unwrap();
    let e = c.learner_addr_for_actors().unwrap_err();
    assert!(
        matches!(e, CoordinatorError::Unavailable(_)) && e.to_string().contains("rank 0"),
        "{e}"
    );
    c.join_learner(0, "h:0", &[], "", 0, Now::current())
        .unwrap();
    assert_eq!(c.learner_addr_for_actors().unwrap(), "h:0");
    let mut options = f.options.clone();
    options.state_dir = None;
    options.actor.learner_addr = "learner:50051".into();
    let c = Coordinator::open(options).unwrap();
    assert_eq!(c.learner_addr_for_actors().unwrap(), "learner:50051");
}

#[test]
fn a_state_dir_that_cannot_be_locked_is_refused_not_used_unlocked() {
    let path = PathBuf::from("/runs/r/state").join(LOCK_FILE);
    let unsupported = std::io::Error::from(std::io::ErrorKind::Unsupported);
    let error = lock_refused(path.clone(), std::fs::TryLockError::Error(unsupported)).to_string();
    assert!(
        error.contains(&path.display().to_string())
            && error.contains("cannot lock the state_dir")
            && error.contains("refuses to run without the lock"),
        "{error}"
    );
    let held = lock_refused(path, std::fs::TryLockError::WouldBlock).to_string();
    assert!(held.contains("another coordinator"), "{held}");
}

#[test]
fn a_retried_accept_gets_its_answer_again_until_its_iteration_is_trained() {
    let f = fixture();
    let t = Now::current();
    let (g, id1) = {
        let mut c = Coordinator::open(f.options.clone()).unwrap();
        let g = c.lease("a", 4, 0, t).unwrap();
        assert_eq!(positions(&g), [0, 1, 2, 3]);
        assert_eq!(accept(&mut c, &g, 1, t), Acceptance::Accepted);
        let id1 = g_id(&g, 1);
        (g, id1)
    };
    // A restarted coordinator still knows which lease committed what.
    let mut c = Coordinator::open(f.options.clone()).unwrap();
    assert_eq!(accept(&mut c, &g, 1, t), Acceptance::Accepted);
    let r = refused(c.accept_group("another-lease", 1, &id1, 0, t).unwrap());
    assert!(r.starts_with("duplicate"), "{r}");
    let s = c.status(t);
    assert_eq!((s.groups_accepted, s.duplicates_refused), (1, 1));
    // Once iteration 0 is trained (version 1), its commits are final; iteration 1's are not.
    for position in [0, 2, 3] {
        assert_eq!(accept(&mut c, &g, position, t), Acceptance::Accepted);
    }
    c.publish_version(1, 0, "ckpt/v1", t).unwrap();
    assert!(refused(accept(&mut c, &g, 1, t)).starts_with("duplicate"));
    let next = c.lease("a", 4, 1, t).unwrap();
    assert_eq!(positions(&next), [4, 5, 6, 7]);
    assert_eq!(accept(&mut c, &next, 5, t), Acceptance::Accepted);
    assert_eq!(accept(&mut c, &next, 5, t), Acceptance::Accepted);
    assert_eq!(c.status(t).groups_accepted, 5);
    // A question handed back is accepted by no one any more: its lease's retry is new work.
    c.return_question(5, "", "stale", t).unwrap();
    assert_eq!(c.status(t).groups_accepted, 4);
    assert_eq!(accept(&mut c, &next, 5, t), Acceptance::Accepted);
    assert_eq!(c.status(t).groups_accepted, 5);
}

fn g_id(g: &LeaseGrant, position: u64) -> String {
    let item = g.items.iter().find(|i| i.position == position).unwrap();
    item.row.id.clone()
}

#[test]
fn a_repeated_lease_request_gets_the_same_lease_and_a_new_key_a_new_one() {
    let f = fixture();
    let mut c = Coordinator::open(f.options.clone()).unwrap();
    let t = Now::current();
    let first = c.lease_keyed("a", 2, 0, "a/1", t).unwrap();
    assert_eq!(positions(&first), [0, 1]);
    // The reply was lost; the actor asks again with the same key.
    let repeat = c.lease_keyed("a", 2, 0, "a/1", t).unwrap();
    assert_eq!(repeat, first, "the same lease, deadline and questions");
    assert_eq!(c.status(t).leases_outstanding, 1);
    assert_eq!(c.cursor(), 2, "nothing more was issued");
    // Another actor's key, or the next key, is a new lease.
    let other = c.lease_keyed("b", 1, 0, "a/1", t).unwrap();
    assert_eq!(positions(&other), [2]);
    let next = c.lease_keyed("a", 1, 0, "a/2", t).unwrap();
    assert_eq!(positions(&next), [3]);
    // Once completed, a lease is never handed out again, whatever the key.
    c.complete_lease("a", &next.lease_id, &[], t).unwrap();
    let after = c.lease_keyed("a", 1, 1, "a/2", t).unwrap();
    assert_ne!(after.lease_id, next.lease_id);
    // Completing twice (a retried CompleteLease) returns nothing twice.
    c.complete_lease("a", &first.lease_id, &[1], t).unwrap();
    c.complete_lease("a", &first.lease_id, &[1], t).unwrap();
    let again = c.lease_keyed("c", 4, 0, "c/1", t).unwrap();
    assert_eq!(positions(&again), [1], "position 1 re-issued once");
}

#[test]
fn accept_group_takes_only_a_lease_that_held_the_position() {
    let f = fixture();
    let t = Now::current();
    let (g, earlier) = {
        let mut c = Coordinator::open(f.options.clone()).unwrap();
        let g = c.lease("a", 2, 0, t).unwrap();
        let other = c.lease("b", 2, 0, t).unwrap();
        assert_eq!(positions(&other), [2, 3]);
        // Position 2 was never in lease `g`; a made-up lease id was never issued.
        let r = refused(
            c.accept_group(&g.lease_id, 2, &g_id(&other, 2), 0, t)
                .unwrap(),
        );
        assert!(r.contains("never held position 2"), "{r}");
        let r = refused(
            c.accept_group("L-forged-1", 2, &g_id(&other, 2), 0, t)
                .unwrap(),
        );
        assert!(r.contains("was not issued by this run"), "{r}");
        assert_eq!(c.status(t).groups_accepted, 0);
        (g, other)
    };
    // After a restart, a group from a lease granted before it is still taken (the lease is
    // honoured until its deadline, then its positions are re-issued; the first group wins), a
    // forged one still is not.
    let mut c = Coordinator::open(f.options.clone()).unwrap();
    assert_eq!(accept(&mut c, &earlier, 2, t), Acceptance::Accepted);
    let r = refused(
        c.accept_group("L-forged-1", 3, &g_id(&earlier, 3), 0, t)
            .unwrap(),
    );
    assert!(r.contains("was not issued by this run"), "{r}");
    // A lease of this start that held the position after the re-issue is taken.
    let reissued = c
        .lease("a", 4, 0, t.after(Duration::from_secs(11)))
        .unwrap();
    assert_eq!(positions(&reissued), [0, 1, 3]);
    assert_eq!(accept(&mut c, &reissued, 3, t), Acceptance::Accepted);
    assert_eq!(accept(&mut c, &g, 0, t), Acceptance::Accepted);
}

#[test]
fn a_keyed_hand_back_repeated_after_the_question_moved_on_changes_nothing() {
    let f = fixture();
    let mut c = Coordinator::open(f.options.clone()).unwrap();
    let t = Now::current();
    let g = c.lease("a", 1, 0, t).unwrap();
    assert_eq!(accept(&mut c, &g, 0, t), Acceptance::Accepted);
    c.return_question(0, &g.lease_id, "too stale", t).unwrap();
    assert_eq!(c.status(t).groups_accepted, 0);
    // Re-issued to another lease, which has it accepted, before the repeat arrives.
    let again = c.lease("b", 1, 0, t).unwrap();
    assert_eq!(positions(&again), [0]);
    assert_eq!(accept(&mut c, &again, 0, t), Acceptance::Accepted);
    c.return_question(0, &g.lease_id, "too stale", t).unwrap();
    let s = c.status(t);
    assert_eq!(s.groups_accepted, 1, "the new lease's group stays accepted");
    assert!(
        c.lease("c", 4, 0, t)
            .unwrap()
            .items
            .iter()
            .all(|i| i.position != 0)
    );
    // The hand-back is what the watchdog reports as the latest.
    let (_, why) = s.progress.last_handback.unwrap();
    assert!(
        why.contains("position 0") && why.contains("too stale"),
        "{why}"
    );
}

#[test]
fn only_the_first_rank_zeros_publisher_key_may_join_as_rank_zero_again() {
    let f = fixture();
    let t = Now::current();
    {
        let mut c = Coordinator::open(f.options.clone()).unwrap();
        c.check_rank0_key(&[1; 32]).unwrap();
        c.set_publisher(&[1; 32], t).unwrap();
        c.set_publisher(&[1; 32], t).unwrap();
        let e = c.check_rank0_key(&[2; 32]).unwrap_err();
        assert!(
            matches!(e, CoordinatorError::PermissionDenied(_))
                && e.to_string().contains("another publisher key")
                && e.to_string().contains("publisher.key"),
            "{e}"
        );
        assert!(c.set_publisher(&[2; 32], t).is_err());
        c.check_publisher(&[1; 32], "AcceptGroup").unwrap();
        assert!(c.check_publisher(&[2; 32], "AcceptGroup").is_err());
    }
    // Kept across a coordinator restart.
    let mut c = Coordinator::open(f.options.clone()).unwrap();
    assert!(c.set_publisher(&[2; 32], t).is_err());
    c.set_publisher(&[1; 32], t).unwrap();
}

#[test]
fn the_watchdog_names_what_the_run_waits_for_and_stops_it_past_the_limit() {
    let f = fixture();
    let mut c = Coordinator::open(CoordinatorOptions {
        stall_limit: Some(Duration::from_secs(60)),
        ..f.options.clone()
    })
    .unwrap();
    let t = Now::current();
    let waiting = |c: &mut Coordinator, now: Now| c.status(now).progress.waiting_for;
    assert!(waiting(&mut c, t).contains("learner rank(s) 0 to join (JoinLearner; 0 of 1 joined)"));
    c.join_learner(0, "h:0", &[], "", 0, t).unwrap();
    let w = waiting(&mut c, t);
    assert!(
        w.contains("iteration 0: 0 of 4 groups accepted")
            && w.contains("an actor to lease 4 question(s) (LeasePrompts; no actor is alive)"),
        "{w}"
    );
    let g = c.lease("a", 2, 0, t).unwrap();
    let w = waiting(&mut c, t);
    assert!(
        w.contains("actor a (2, lease ") && w.contains("to roll out and push its lease"),
        "{w}"
    );
    assert!(
        w.contains("actors to lease 2 question(s) (LeasePrompts; 1 alive)"),
        "{w}"
    );
    c.complete_lease_because(
        "a",
        &g.lease_id,
        &[1],
        "teacher at t:1: Answer: HTTP 500",
        t,
    )
    .unwrap();
    let w = waiting(&mut c, t);
    assert!(
        w.contains("the learner to accept the groups of actor a (1, lease ")
            && w.contains("AcceptGroup"),
        "{w}"
    );
    // Before the limit nothing stops; past it the run stops naming the wait and the latest
    // hand-back, and says so from then on.
    assert!(c.check_stall(t.after(Duration::from_secs(59))).is_none());
    let late = t.after(Duration::from_secs(61));
    let e = c.check_stall(late).expect("stalled").to_string();
    assert!(
        e.starts_with("the run stalled: no progress for 61 s (the stall limit, [coordinator] stall_limit_s): iteration 0")
            && e.contains("waiting for")
            && e.contains("teacher at t:1: Answer: HTTP 500"),
        "{e}"
    );
    assert_eq!(
        c.status(late).progress.stalled.as_deref(),
        e.strip_prefix("the run stalled: ")
    );
    assert!(c.check_stall(late).is_some());

    // Progress resets the clock: a fresh coordinator, every group accepted, waits for the
    // learner's step, and a published version moves the wait to the next iteration.
    let f = fixture();
    let mut c = Coordinator::open(CoordinatorOptions {
        stall_limit: Some(Duration::from_secs(60)),
        ..f.options.clone()
    })
    .unwrap();
    c.join_learner(0, "h:0", &[], "", 0, t).unwrap();
    let g = c.lease("a", 4, 0, t).unwrap();
    let later = t.after(Duration::from_secs(50));
    for p in 0..4 {
        assert_eq!(accept(&mut c, &g, p, later), Acceptance::Accepted);
    }
    let w = waiting(&mut c, later);
    assert!(
        w.contains(
            "the learner to train iteration 0 and publish version 1 (PublishVersion; all 4 groups accepted)"
        ),
        "{w}"
    );
    assert!(c.check_stall(t.after(Duration::from_secs(100))).is_none());
    c.publish_version(1, 0, "v1", later).unwrap();
    assert!(waiting(&mut c, later).starts_with("iteration 1: 0 of 4 groups accepted"));
    // A finished run waits for nothing and never stalls.
    let mut done = Coordinator::open(CoordinatorOptions {
        total_iterations: 1,
        state_dir: None,
        stall_limit: Some(Duration::from_secs(60)),
        ..f.options.clone()
    })
    .unwrap();
    done.join_learner(0, "h:0", &[], "", 0, t).unwrap();
    let g = done.lease("a", 4, 0, t).unwrap();
    for p in 0..4 {
        assert_eq!(accept(&mut done, &g, p, t), Acceptance::Accepted);
    }
    done.publish_version(1, 0, "v1", t).unwrap();
    assert_eq!(waiting(&mut done, t), "");
    assert!(
        done.check_stall(t.after(Duration::from_secs(3600)))
            .is_none()
    );
}

#[test]
fn a_restarted_coordinator_still_knows_the_learner_ranks() {
    let f = fixture();
    let options = CoordinatorOptions {
        learner_world_size: 2,
        ..f.options.clone()
    };
    let t = Now::current();
    {
        let mut c = Coordinator::open(options.clone()).unwrap();
        c.join_learner(1, "h:1", &[], "c:1", 0, t).unwrap();
        c.join_learner(0, "h:0", &[9; 128], "c:0", 0, t).unwrap();
    }
    // Actors still find rank 0, and the status still counts the ranks.
    let mut c = Coordinator::open(options).unwrap();
    assert_eq!(c.learner_addr_for_actors().unwrap(), "h:0");
    assert_eq!(c.status(t).learner_ranks_joined, 2);
    assert!(!c.status(t).progress.waiting_for.contains("to join"));
    // The rendezvous is among ranks that join again (a restarted learner world binds new
    // addresses): not ready on the old ones.
    let r = c.join_learner(1, "h:1b", &[], "c:1b", 0, t).unwrap();
    assert!(!r.ready);
    let r = c.join_learner(0, "h:0b", &[7; 128], "c:0b", 0, t).unwrap();
    assert!(r.ready);
    assert_eq!(r.rank_addrs, ["h:0b", "h:1b"]);
    assert_eq!(r.collective_addrs, ["c:0b", "c:1b"]);
    assert_eq!(r.collective_id, vec![7; 128]);
    assert_eq!(c.learner_addr_for_actors().unwrap(), "h:0b");
}

/// A full disk while the state file is written: the temporary file the write goes through is
/// made a link to `/dev/full`, so the kernel answers ENOSPC. The change is refused with an
/// error naming the file (UNAVAILABLE on the wire: nothing was applied, asking again is safe),
/// nothing of it is kept, the state file on disk is the previous one, and once there is space
/// again the same request goes through.
#[cfg(unix)]
#[test]
fn a_full_disk_refuses_the_change_naming_the_file_and_keeps_the_previous_state() {
    use ril_proto::{ServiceError, ServiceErrorCode};
    let f = fixture();
    let mut c = Coordinator::open(f.options.clone()).unwrap();
    let t = Now::current();
    let first = c.lease("a", 2, 0, t).unwrap();
    assert_eq!(positions(&first), [0, 1]);
    let state = c.state_path().unwrap().to_path_buf();
    let before = std::fs::read_to_string(&state).unwrap();
    let temp = ril_common::fs::temp_sibling(&state);
    std::os::unix::fs::symlink("/dev/full", &temp).unwrap();

    let e = c.lease("a", 2, 0, t).unwrap_err();
    assert_eq!(e.error_code(), ServiceErrorCode::Unavailable, "{e}");
    let text = e.to_string();
    assert!(
        text.contains(&temp.display().to_string()) && text.contains("No space left on device"),
        "{text}"
    );
    assert_eq!(c.cursor(), 2, "the refused lease took nothing");
    assert_eq!(c.status(t).leases_outstanding, 1);
    assert_eq!(std::fs::read_to_string(&state).unwrap(), before);
    // The failed write cleaned up after itself (here: the link), so space is back.
    assert!(!temp.exists() && std::fs::symlink_metadata(&temp).is_err());
    let again = c.lease("a", 2, 0, t).unwrap();
    assert_eq!(positions(&again), [2, 3]);
    drop(c);
    let reopened = Coordinator::open(f.options.clone()).unwrap();
    assert_eq!(reopened.cursor(), 4);
}
