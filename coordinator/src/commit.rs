//! Group commit: the coordinator shared by many callers, each answered only once the state file
//! holds every change it made or saw, with one write covering all the changes made meanwhile.
//!
//! A call applies its change in memory under the lock and takes a ticket for the latest change
//! (its own, or one it may have read). The first caller to find no write in flight leads: it
//! serialises the state under the lock, writes and fsyncs it without the lock (the other calls
//! go on applying changes), then settles every ticket the write covers and wakes the waiters;
//! one of those still waiting leads the next write. A failed write rolls the book back to the
//! last state written and fails every unwritten change's caller (`UNAVAILABLE`: nothing was
//! kept, asking again is safe), so no reply ever depends on a change that a crash could lose.
//! Under load the writes per second stay at what the disk's fsync allows while the changes per
//! write grow with the callers.

use std::sync::{Condvar, Mutex, MutexGuard};

use crate::coordinator::{Coordinator, Now};
use crate::error::{CoordinatorError, Result};

/// A [`Coordinator`] behind its lock, with group commit.
#[derive(Debug)]
pub struct Committed {
    coordinator: Mutex<Coordinator>,
    /// Signalled when a write ends (its tickets are settled).
    written: Condvar,
}

impl Committed {
    /// Takes over `coordinator`; from now on its changes are written by group commits.
    pub fn new(mut coordinator: Coordinator) -> Self {
        coordinator.journal.deferred = true;
        Self {
            coordinator: Mutex::new(coordinator),
            written: Condvar::new(),
        }
    }

    /// The coordinator, for reads and for changes that need not wait for the disk (lease
    /// expiry, the watchdog). A panic inside a change poisons the lock; the book is then rolled
    /// back to the state last written before it is used again.
    pub fn lock(&self) -> MutexGuard<'_, Coordinator> {
        match self.coordinator.lock() {
            Ok(c) => c,
            Err(poisoned) => {
                let mut c = poisoned.into_inner();
                c.recover_from_panic();
                self.coordinator.clear_poison();
                c
            }
        }
    }

    /// Runs `f` on the coordinator and returns its answer once everything `f` changed or may
    /// have read is in the state file. A refusal (`f`'s error) is returned at once.
    pub fn run<T>(&self, f: impl FnOnce(&mut Coordinator, Now) -> Result<T>) -> Result<T> {
        let mut c = self.lock();
        let out = f(&mut c, Now::current())?;
        let Some(ticket) = c.ticket() else {
            return Ok(out);
        };
        loop {
            if let Some(outcome) = c.journal.outcomes.remove(&ticket) {
                return outcome.map(|()| out).map_err(CoordinatorError::Unavailable);
            }
            if c.journal.writing.is_none() {
                c = self.lead_write(c);
                continue;
            }
            c = self.written.wait(c).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Writes every change applied so far: prepared under the lock, written without it, settled
    /// under it again. Returns the lock.
    fn lead_write<'a>(&'a self, mut c: MutexGuard<'a, Coordinator>) -> MutexGuard<'a, Coordinator> {
        // A failure (here or in the write) is the callers' to report: their tickets are settled
        // with it.
        if let Ok(Some((seq, path, bytes))) = c.prepare_write(Now::current().unix_ms) {
            drop(c);
            let written = crate::persist::write_bytes(&path, &bytes);
            c = self.lock();
            let _ = c.finish_write(seq, written);
        }
        self.written.notify_all();
        c
    }

    /// Waits for a write in flight to end, then writes the state one last time and gives up
    /// `state_dir` ([`Coordinator::close`]).
    pub fn close(&self) -> Result<()> {
        let mut c = self.lock();
        while c.journal.writing.is_some() {
            c = self.written.wait(c).unwrap_or_else(|e| e.into_inner());
        }
        let closed = c.close();
        self.written.notify_all();
        closed
    }
}

impl Coordinator {
    /// A ticket for the latest change applied when some are not written yet: what a caller
    /// that made or saw them waits for.
    pub(crate) fn ticket(&mut self) -> Option<u64> {
        let j = &mut self.journal;
        if j.applied <= j.settled {
            return None;
        }
        let ticket = j.next_ticket;
        j.next_ticket += 1;
        j.waiting.insert(ticket, j.applied);
        Some(ticket)
    }
}

#[cfg(test)]
#[path = "commit_tests.rs"]
mod tests;
