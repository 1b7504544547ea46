//! Group commit: what one write covers, who waits for it, and what a failed write undoes.

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::coordinator::LeaseGrant;
use crate::options::CoordinatorOptions;
use crate::persist::{STATE_FILE, StateFile};
use crate::testutil::shapes_dataset;

struct Fixture {
    dir: tempfile::TempDir,
    options: CoordinatorOptions,
}

/// A 10-row dataset (epochs repeat it), state in a temp dir.
fn fixture(total_iterations: u64, questions_per_iteration: u64) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let dataset = shapes_dataset(dir.path(), 10);
    let options = CoordinatorOptions {
        run_id: "commit-test".into(),
        dataset,
        seed: 5,
        questions_per_iteration,
        total_iterations,
        lease_timeout: Duration::from_secs(60),
        heartbeat_interval: Duration::from_secs(1),
        actor_timeout: Duration::from_secs(120),
        state_dir: Some(dir.path().join("state")),
        ..Default::default()
    };
    Fixture { dir, options }
}

impl Fixture {
    fn state_file(&self) -> StateFile {
        let path = self.dir.path().join("state").join(STATE_FILE);
        StateFile::load(&path).unwrap().unwrap()
    }
}

fn lease(c: &mut Coordinator, actor: &str, n: u32) -> LeaseGrant {
    c.lease(actor, n, 0, Now::current()).unwrap()
}

#[test]
fn one_write_covers_every_change_made_while_none_was_written() {
    let f = fixture(20, 16);
    let committed = Committed::new(Coordinator::open(f.options.clone()).unwrap());
    let opened = committed.lock().status(Now::current()).state_writes;
    assert_eq!(opened.writes, 1, "the open writes the state once");
    {
        // Three changes applied while no caller waits: nothing is written yet.
        let mut c = committed.lock();
        for actor in ["a", "b", "c"] {
            lease(&mut c, actor, 2);
        }
        assert_eq!(c.status(Now::current()).state_writes, opened);
    }
    assert_eq!(f.state_file().cursor, 0);
    // A fourth change through `run` waits for a write, which covers all four.
    let g = committed.run(|c, now| c.lease("d", 2, 0, now)).unwrap();
    assert_eq!(g.items.len(), 2);
    let w = committed.lock().status(Now::current()).state_writes;
    assert_eq!((w.writes, w.changes, w.failures), (2, 4, 0), "{w:?}");
    let on_disk = f.state_file();
    assert_eq!(on_disk.cursor, 8);
    assert_eq!(on_disk.open_leases.len(), 4);
    assert_eq!(
        w.last_bytes,
        std::fs::metadata(f.dir.path().join("state").join(STATE_FILE))
            .unwrap()
            .len()
    );
}

#[test]
fn a_read_that_saw_an_unwritten_change_is_answered_after_it_is_written() {
    let f = fixture(20, 16);
    let committed = Committed::new(Coordinator::open(f.options.clone()).unwrap());
    lease(&mut committed.lock(), "a", 3);
    assert_eq!(f.state_file().cursor, 0);
    // A status read changes nothing, but it saw the lease: it is answered once that is written.
    let s = committed.run(|c, now| Ok(c.status(now))).unwrap();
    assert_eq!(s.cursor, 3);
    assert_eq!(f.state_file().cursor, 3);
    // With nothing unwritten, a read does not write.
    let before = committed.lock().status(Now::current()).state_writes.writes;
    committed.run(|c, now| Ok(c.status(now))).unwrap();
    assert_eq!(
        committed.lock().status(Now::current()).state_writes.writes,
        before
    );
}

#[cfg(unix)]
#[test]
fn a_failed_group_write_rolls_every_unwritten_change_back_and_tells_their_callers() {
    use ril_proto::{ServiceError, ServiceErrorCode};
    let f = fixture(20, 16);
    let committed = Committed::new(Coordinator::open(f.options.clone()).unwrap());
    let first = committed.run(|c, now| c.lease("a", 2, 0, now)).unwrap();
    assert_eq!(first.items.len(), 2);
    let state = f.dir.path().join("state").join(STATE_FILE);
    let before = std::fs::read(&state).unwrap();
    // Another caller's change is applied and waits for the next write.
    let waiting = {
        let mut c = committed.lock();
        lease(&mut c, "b", 2);
        c.ticket().unwrap()
    };
    let temp = ril_common::fs::temp_sibling(&state);
    std::os::unix::fs::symlink("/dev/full", &temp).unwrap();

    let e = committed.run(|c, now| c.lease("c", 2, 0, now)).unwrap_err();
    assert_eq!(e.error_code(), ServiceErrorCode::Unavailable, "{e}");
    let text = e.to_string();
    assert!(
        text.contains("rolled back") && text.contains("No space left on device"),
        "{text}"
    );
    let mut c = committed.lock();
    let told = c.journal.outcomes.remove(&waiting).unwrap().unwrap_err();
    assert!(told.contains(&temp.display().to_string()), "{told}");
    assert_eq!(c.cursor(), 2, "both unwritten leases were rolled back");
    let s = c.status(Now::current());
    assert_eq!((s.leases_outstanding, s.state_writes.failures), (1, 1));
    assert_eq!(std::fs::read(&state).unwrap(), before);
    drop(c);
    // Space is back (the failed write removed the link): the next change goes through.
    let again = committed.run(|c, now| c.lease("c", 2, 0, now)).unwrap();
    assert_eq!(again.items[0].position, 2);
    assert_eq!(f.state_file().cursor, 4);
}

#[test]
fn a_panic_inside_a_change_rolls_back_to_the_state_written() {
    let f = fixture(20, 16);
    let committed = Arc::new(Committed::new(
        Coordinator::open(f.options.clone()).unwrap(),
    ));
    committed.run(|c, now| c.lease("a", 2, 0, now)).unwrap();
    let panicking = committed.clone();
    let joined = std::thread::spawn(move || {
        panicking.run(|c, now| {
            c.lease("b", 2, 0, now)?;
            panic!("a bug inside a change");
            #[allow(unreachable_code)]
            Ok(())
        })
    })
    .join();
    assert!(joined.is_err(), "the change panicked");
    let mut c = committed.lock();
    assert_eq!(c.cursor(), 2, "the half-made change is gone");
    assert_eq!(c.status(Now::current()).leases_outstanding, 1);
    drop(c);
    let g = committed.run(|c, now| c.lease("b", 2, 0, now)).unwrap();
    assert_eq!(g.items[0].position, 2);
}

#[test]
fn concurrent_callers_are_each_answered_with_their_change_durable() {
    let f = fixture(100, 40);
    let committed = Arc::new(Committed::new(
        Coordinator::open(f.options.clone()).unwrap(),
    ));
    let callers: Vec<_> = (0..32)
        .map(|i| {
            let committed = committed.clone();
            let state = f.dir.path().join("state").join(STATE_FILE);
            std::thread::spawn(move || {
                let g = committed
                    .run(|c, now| c.lease(&format!("actor-{i}"), 1, 0, now))
                    .unwrap();
                // Answered only once the state file holds the lease.
                let on_disk = StateFile::load(&state).unwrap().unwrap();
                assert!(
                    on_disk.open_leases.contains_key(&g.lease_id),
                    "{}",
                    g.lease_id
                );
                g.items[0].position
            })
        })
        .collect();
    let mut got: Vec<u64> = callers.into_iter().map(|t| t.join().unwrap()).collect();
    got.sort_unstable();
    assert_eq!(got, (0..32).collect::<Vec<_>>());
    let w = committed.lock().status(Now::current()).state_writes;
    assert_eq!(w.changes, 32, "{w:?}");
    assert!(w.writes <= 33, "{w:?}");
    committed.close().unwrap();
    let reopened = Coordinator::open(f.options.clone()).unwrap();
    assert_eq!(reopened.cursor(), 32);
}

/// Thousands of accepted groups over 300 iterations, one write per iteration: the
/// coordinator's collections and its state file stay the same size from iteration 150 on (the
/// version history keeps the latest `HISTORY_KEPT`, commits of trained iterations are dropped,
/// the accepted positions compact into a watermark).
#[test]
fn memory_and_state_size_stay_flat_over_thousands_of_accepts() {
    let b = 16;
    let f = fixture(300, b);
    let committed = Committed::new(Coordinator::open(f.options.clone()).unwrap());
    let t0 = Now::current();
    let state = f.dir.path().join("state").join(STATE_FILE);
    let mut at = Vec::new();
    for iteration in 0..300u64 {
        let now = t0.after(Duration::from_millis(500 * iteration));
        {
            let mut c = committed.lock();
            let g = c.lease("a", b as u32, iteration, now).unwrap();
            assert_eq!(g.items.len(), b as usize, "iteration {iteration}");
            c.complete_lease("a", &g.lease_id, &[], now).unwrap();
            for item in &g.items {
                let a = c
                    .accept_group(
                        &g.lease_id,
                        item.position,
                        &item.row.id,
                        item.iteration,
                        now,
                    )
                    .unwrap();
                assert_eq!(a, crate::coordinator::Acceptance::Accepted);
            }
            c.publish_version(iteration + 1, iteration, &format!("ckpt/v{iteration}"), now)
                .unwrap();
        }
        committed.run(|_, _| Ok(())).unwrap();
        if iteration == 149 || iteration == 299 {
            let c = committed.lock();
            at.push((c.footprint(), std::fs::metadata(&state).unwrap().len()));
        }
    }
    let (early, late) = (at[0], at[1]);
    assert!(late.0 <= early.0, "collections grew: {early:?} -> {late:?}");
    // Numbers of the same digit count at both points: only a growing record would show.
    assert!(
        late.1 <= early.1 + early.1 / 100,
        "the state file grew: {early:?} -> {late:?}"
    );
    let s = committed.lock().status(Now::current());
    assert_eq!(s.groups_accepted, 300 * b);
    assert_eq!(s.history.len(), crate::persist::HISTORY_KEPT);
}
