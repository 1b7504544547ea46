//! The coordinator's domain logic, free of gRPC: the question stream's cursor, leases with
//! deadlines, exactly-once acceptance, the version registry, actor membership, the learner
//! rendezvous and the run's status.
//!
//! Every position below the cursor that is not accepted is in exactly one place: an open lease
//! (an actor is rolling it out), a completed lease (its group is on its way to the learner, which
//! has `lease_timeout` to accept it), or the re-issue queue. Expired leases, returned positions and
//! positions outstanding at a restart go to the queue; the queue is served lowest position first,
//! before fresh positions.
//!
//! Every method takes the time as a [`Now`], so the state machine is deterministic under test.
//! Changes are applied in place. Used directly, a change that a restart must see is written to
//! the state file before the method returns; behind [`crate::commit::Committed`] (the gRPC
//! adapter) it is written by a group commit that covers every change made meanwhile, before
//! any caller that made or saw it is answered. A change whose write fails is rolled back with
//! every change after it: the book returns to what the state file holds.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ril_data::Row;

use crate::error::{CoordinatorError, Result};
use crate::options::CoordinatorOptions;
use crate::persist::{OpenLease, RankRecord, STATE_FILE, StateFile, StreamIdentity, VersionRecord};
use crate::stream::QuestionStream;

/// The window `groups_per_second` is measured over.
const RATE_WINDOW: Duration = Duration::from_secs(30);

/// Actors not heard from for this many `actor_timeout`s are dropped from the membership list.
const FORGET_AFTER_TIMEOUTS: u32 = 10;

/// Held locked (advisory) by the coordinator that owns a `state_dir`.
pub const LOCK_FILE: &str = "coordinator.lock";

/// A point in time, monotonic and wall-clock (for deadlines handed to clients).
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub instant: Instant,
    pub unix_ms: u64,
}

impl Now {
    pub fn current() -> Self {
        Self {
            instant: Instant::now(),
            unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        }
    }

    /// This time plus `d` (for tests that step the clock).
    pub fn after(self, d: Duration) -> Self {
        Self {
            instant: self.instant + d,
            unix_ms: self.unix_ms + d.as_millis() as u64,
        }
    }
}

/// One leased question.
#[derive(Debug, Clone, PartialEq)]
pub struct LeasedQuestion {
    pub position: u64,
    /// `position / B`: the learner iteration it belongs to.
    pub iteration: u64,
    pub row: Row,
}

/// The answer to a lease request. `items` is empty when nothing may be leased now; then
/// `retry_after_ms` says when to ask again, and `run_finished` whether to stop asking.
#[derive(Debug, Clone, PartialEq)]
pub struct LeaseGrant {
    /// Empty when no lease was made.
    pub lease_id: String,
    pub deadline_unix_ms: u64,
    /// The policy version at lease time; the actor samples with at least this version.
    pub policy_version: u64,
    pub items: Vec<LeasedQuestion>,
    pub retry_after_ms: u64,
    pub run_finished: bool,
}

/// What happened to a group the learner wants to train on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acceptance {
    Accepted,
    /// Refused, with the reason (duplicate, unknown position, wrong question).
    Refused(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatReply {
    pub latest_version: u64,
    /// False when this actor is not registered (e.g. after a coordinator restart).
    pub known: bool,
    pub run_finished: bool,
}

/// The learner ranks' rendezvous.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendezvous {
    pub world_size: u32,
    /// Every rank joined; `rank_addrs` and `collective_id` are filled only then.
    pub ready: bool,
    pub rank_addrs: Vec<String>,
    pub collective_id: Vec<u8>,
    /// Each rank's collective (ring) address, indexed by rank; empty for a rank that has not
    /// joined yet (complete when `ready`).
    pub collective_addrs: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ActorInfo {
    pub actor_id: String,
    pub device: String,
    pub policy_version: u64,
    pub last_seen_ms_ago: u64,
    pub alive: bool,
    /// Questions leased to it so far.
    pub groups_leased: u64,
}

/// Where the run stands.
#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    pub run_id: String,
    pub policy_version: u64,
    /// The iteration being worked on (the version it starts from), at most `total_iterations`.
    pub iteration: u64,
    pub total_iterations: u64,
    /// Next never-issued position.
    pub cursor: u64,
    pub groups_accepted: u64,
    pub duplicates_refused: u64,
    pub leases_expired: u64,
    /// Leases still holding questions: being rolled out, or completed with groups the learner
    /// has not accepted yet.
    pub leases_outstanding: u64,
    pub actors: Vec<ActorInfo>,
    /// The learner's latest metrics (merged over reports, newest value per name).
    pub metrics: BTreeMap<String, f64>,
    /// The iteration of the latest metrics report.
    pub metrics_iteration: Option<u64>,
    /// Accepted groups per second over the last 30 s.
    pub groups_per_second: f64,
    pub finished: bool,
    pub learner_world_size: u32,
    pub learner_ranks_joined: u32,
    /// Published versions, oldest first.
    pub history: Vec<VersionRecord>,
    /// The progress watchdog's view.
    pub progress: Progress,
    /// The state file: writes made and failed since the start, the changes they covered
    /// (several per write under load: group commit) and the size of the last one.
    pub state_writes: StateWrites,
}

/// What the coordinator wrote to its state file since it started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StateWrites {
    pub writes: u64,
    pub failures: u64,
    pub changes: u64,
    pub last_bytes: u64,
}

/// How long the run has gone without advancing, and what it waits for.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Progress {
    /// Since the run last advanced (a group accepted, a version published, or the start).
    pub since_progress: Duration,
    /// The role and call the run waits for; empty once the run is finished.
    pub waiting_for: String,
    /// Set once the run made no progress for the stall limit: the error it stopped with.
    pub stalled: Option<String>,
    /// The latest reason a question was handed back, and how long ago.
    pub last_handback: Option<(Duration, String)>,
}

/// An open lease: what the state file keeps of it ([`OpenLease`]: the actor, the wall-clock
/// deadline handed to it, the positions, which are outstanding, whether it was completed) and
/// its deadline on this process's monotonic clock, which decides its expiry.
#[derive(Debug, Clone)]
struct Lease {
    deadline: Instant,
    record: OpenLease,
}

#[derive(Debug, Clone)]
struct Actor {
    device: String,
    policy_version: u64,
    last_seen: Instant,
    groups_leased: u64,
}

/// The mutable part of the coordinator, changed in place. A change checks everything that can
/// refuse it before it changes anything, so a refused change leaves nothing behind; a change
/// whose state write fails is undone by going back to the book as last written
/// ([`Journal::durable`]).
#[derive(Debug, Clone)]
pub(crate) struct Book {
    /// What is persisted.
    state: StateFile,
    reissue: BTreeSet<u64>,
    leases: BTreeMap<String, Lease>,
    /// Position -> the lease holding it.
    leased: HashMap<u64, String>,
    actors: BTreeMap<String, Actor>,
    ranks: BTreeMap<u32, String>,
    /// Rank -> its collective (ring) address.
    collective_addrs: BTreeMap<u32, String>,
    collective_id: Vec<u8>,
    metrics: BTreeMap<String, f64>,
    metrics_iteration: Option<u64>,
    accept_times: VecDeque<Instant>,
    next_lease: u64,
    /// Position -> the leases (of this coordinator's start) that held it, until its iteration
    /// is trained: what AcceptGroup checks a group's lease against.
    granted: HashMap<u64, Vec<String>>,
    /// Actor -> (its latest lease request's key, the lease granted for it).
    lease_requests: HashMap<String, (String, String)>,
    /// When the run last advanced (a group accepted, a version published, or the start).
    last_progress: Instant,
    /// The latest reason a question was handed back, and when.
    last_handback: Option<(Instant, String)>,
    /// Set by the watchdog once the run made no progress for the stall limit.
    stalled: Option<String>,
    /// The run was resumed from a state file without lease prefixes (see `lease_problem`).
    legacy_leases: bool,
    /// A persisted field changed.
    dirty: bool,
}

/// The coordinator's state and logic. Not thread-safe by itself: the gRPC adapter holds it in a
/// mutex.
pub struct Coordinator {
    options: CoordinatorOptions,
    stream: QuestionStream,
    book: Book,
    state_path: Option<PathBuf>,
    /// Held while the coordinator owns `state_dir` (released by [`Coordinator::close`] or drop).
    _lock: Option<std::fs::File>,
    started: Instant,
    /// Makes lease ids unique across restarts.
    lease_prefix: String,
    /// Which changes are written, and the book to go back to when a write fails.
    pub(crate) journal: Journal,
}

/// The coordinator's changes against its state file (group commit).
#[derive(Debug, Default)]
pub(crate) struct Journal {
    /// Leave writing to [`crate::commit::Committed`] instead of writing in each change.
    pub(crate) deferred: bool,
    /// Changes applied in memory so far (each one's sequence number).
    pub(crate) applied: u64,
    /// Every change up to this one is written, or was rolled back.
    pub(crate) settled: u64,
    /// The book as the state file holds it (`None` without a state file).
    pub(crate) durable: Option<Box<Book>>,
    /// The write in flight: the last change it covers and the book it writes.
    pub(crate) writing: Option<(u64, Box<Book>)>,
    /// Callers waiting for their changes (ticket -> the change they wait for) and the
    /// outcomes settled for them (an error message when the write failed).
    pub(crate) waiting: HashMap<u64, u64>,
    pub(crate) outcomes: HashMap<u64, std::result::Result<(), String>>,
    pub(crate) next_ticket: u64,
    /// What was written (status reports it as it is).
    pub(crate) stats: StateWrites,
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator")
            .field("run_id", &self.book.state.run_id)
            .field("stream", &self.stream)
            .field("cursor", &self.book.state.cursor)
            .field("version", &self.book.state.version)
            .field("state_path", &self.state_path)
            .finish()
    }
}

/// Takes `state_dir/coordinator.lock` so that two coordinators never write one run's state.
fn lock_state_dir(dir: &std::path::Path) -> Result<Option<std::fs::File>> {
    let path = dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| CoordinatorError::io(&path, e))?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(error) => Err(lock_refused(path, error)),
    }
}

/// Why the state directory cannot be used when its lock cannot be taken. Fails closed: a file
/// system that cannot lock (an error other than "held") is refused too, since two coordinators
/// writing one run's state would hand out and accept the same positions twice.
fn lock_refused(path: PathBuf, error: std::fs::TryLockError) -> CoordinatorError {
    let problem = match error {
        std::fs::TryLockError::WouldBlock => "another coordinator is using this state_dir".into(),
        std::fs::TryLockError::Error(e) => format!(
            "cannot lock the state_dir ({e}); the coordinator refuses to run without the lock \
             (put state_dir on a file system with file locks)"
        ),
    };
    CoordinatorError::State { path, problem }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Coordinator {
    /// Opens the dataset and the state (continuing the run when `state_dir` holds one). Blocks
    /// while every dataset row is checked.
    pub fn open(options: CoordinatorOptions) -> Result<Self> {
        options.validate()?;
        let now = Now::current();
        let stream = QuestionStream::open(&options.dataset, options.seed, options.skip_bad_rows)?;
        let identity = StreamIdentity {
            dataset_path: stream.path().display().to_string(),
            rows: stream.rows(),
            fingerprint: stream.fingerprint().to_string(),
            seed: options.seed,
            questions_per_iteration: options.questions_per_iteration,
        };
        let (state_path, lock) = match &options.state_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir).map_err(|e| CoordinatorError::io(dir, e))?;
                (Some(dir.join(STATE_FILE)), lock_state_dir(dir)?)
            }
            None => (None, None),
        };
        let loaded = match &state_path {
            Some(p) => StateFile::load(p)?,
            None => None,
        };
        let resumed = loaded.is_some();
        let state = match (loaded, &state_path) {
            (Some(state), Some(path)) => {
                state.check_identity(&identity, path)?;
                if !options.run_id.is_empty() && options.run_id != state.run_id {
                    return Err(CoordinatorError::State {
                        path: path.clone(),
                        problem: format!(
                            "it belongs to run {:?}, not {:?}; use another state_dir for a new run",
                            state.run_id, options.run_id
                        ),
                    });
                }
                if state.cursor > options.total_positions() {
                    return Err(CoordinatorError::State {
                        path: path.clone(),
                        problem: format!(
                            "the run already issued {} positions, more than total_iterations {} x {} \
                             questions allow",
                            state.cursor, options.total_iterations, options.questions_per_iteration
                        ),
                    });
                }
                state
            }
            _ => {
                let run_id = if options.run_id.is_empty() {
                    format!("run-{:x}-{:04x}", now.unix_ms, rand::random::<u16>())
                } else {
                    options.run_id.clone()
                };
                StateFile::new(run_id, identity)
            }
        };
        let lease_prefix = format!("L{:x}-{:08x}", now.unix_ms, rand::random::<u32>());
        let book = Book::restored(state, resumed, &lease_prefix, &options, now);
        let mut coordinator = Self {
            lease_prefix,
            options,
            stream,
            book,
            state_path,
            _lock: lock,
            started: now.instant,
            journal: Journal::default(),
        };
        coordinator.persist()?;
        let s = &coordinator.book.state;
        tracing::info!(
            run_id = %s.run_id,
            dataset = %coordinator.stream.path().display(),
            rows = coordinator.stream.rows(),
            resumed,
            cursor = s.cursor,
            accepted = s.accepted.len(),
            version = s.version,
            reissue = coordinator.book.reissue.len(),
            "coordinator state ready"
        );
        Ok(coordinator)
    }

    pub fn options(&self) -> &CoordinatorOptions {
        &self.options
    }

    pub fn run_id(&self) -> &str {
        &self.book.state.run_id
    }

    /// The latest published policy version.
    pub fn version(&self) -> u64 {
        self.book.state.version
    }

    /// Next never-issued position.
    pub fn cursor(&self) -> u64 {
        self.book.state.cursor
    }

    /// The learner has published the last version.
    pub fn finished(&self) -> bool {
        self.book.finished(&self.options)
    }

    pub fn stream(&self) -> &QuestionStream {
        &self.stream
    }

    /// Where the state file is written (`None`: in memory only).
    pub fn state_path(&self) -> Option<&std::path::Path> {
        self.state_path.as_deref()
    }

    /// How many entries the coordinator's collections hold in all (the book, and the group
    /// commit's bookkeeping): what must stay flat over a long run.
    pub fn footprint(&self) -> usize {
        let b = &self.book;
        let j = &self.journal;
        let state = b.state.history.len()
            + b.state.accepted.above_len()
            + b.state.accepted_by.len()
            + b.state.lease_prefixes.len()
            + b.state.learner_ranks.len();
        state
            + b.reissue.len()
            + b.leases.len()
            + b.leases
                .values()
                .map(|l| l.record.positions.len())
                .sum::<usize>()
            + b.leased.len()
            + b.actors.len()
            + b.metrics.len()
            + b.accept_times.len()
            + b.granted.values().map(Vec::len).sum::<usize>()
            + b.lease_requests.len()
            + j.waiting.len()
            + j.outcomes.len()
    }

    /// Writes the state file now, covering every change applied so far (also done after every
    /// change that matters). Must not race a group commit's write ([`Committed`] waits for it).
    ///
    /// [`Committed`]: crate::commit::Committed
    pub fn persist(&mut self) -> Result<()> {
        let Some((seq, path, bytes)) = self.prepare_write(Now::current().unix_ms)? else {
            return Ok(());
        };
        let written = crate::persist::write_bytes(&path, &bytes);
        self.finish_write(seq, written)
    }

    /// Writes the state file one last time and gives up `state_dir`, so that another
    /// coordinator may open it. Later changes are kept in memory only.
    pub fn close(&mut self) -> Result<()> {
        let written = self.persist();
        self.state_path = None;
        self._lock = None;
        written
    }

    /// Applies the change `f` to the book in place. `f` refuses (returns an error) before it
    /// changes anything. When it changed a persisted field, the change is written now (or,
    /// deferred, by the group commit the caller waits for); a failed write rolls the book back
    /// to the state file's.
    fn transact<T>(
        &mut self,
        now: Now,
        f: impl FnOnce(&mut Book, &mut QuestionStream, &CoordinatorOptions) -> Result<T>,
    ) -> Result<T> {
        self.book.dirty = false;
        let out = f(&mut self.book, &mut self.stream, &self.options)?;
        if std::mem::take(&mut self.book.dirty) {
            self.journal.applied += 1;
            if !self.journal.deferred
                && let Some((seq, path, bytes)) = self.prepare_write(now.unix_ms)?
            {
                let written = crate::persist::write_bytes(&path, &bytes);
                self.finish_write(seq, written)?;
            }
        }
        Ok(out)
    }

    /// Starts a write of every change applied so far: the last change covered, the state
    /// file's path and bytes; the book they hold is kept to roll back to should a later write
    /// fail. `None` without a state file (the changes count as written).
    pub(crate) fn prepare_write(
        &mut self,
        unix_ms: u64,
    ) -> Result<Option<(u64, PathBuf, Vec<u8>)>> {
        let seq = self.journal.applied;
        let Some(path) = &self.state_path else {
            self.settle(seq, Ok(()));
            return Ok(None);
        };
        let bytes = match self.book.state_bytes(path, unix_ms) {
            Ok(b) => b,
            Err(e) => {
                self.roll_back(&e);
                return Err(e);
            }
        };
        let path = path.clone();
        self.journal.stats.last_bytes = bytes.len() as u64;
        self.journal.writing = Some((seq, Box::new(self.book.clone())));
        Ok(Some((seq, path, bytes)))
    }

    /// Ends the write of the changes up to `seq`: written, its book becomes the one to roll
    /// back to; failed, the book goes back to the last one written, with every change since
    /// (all of them unwritten: their callers are told the write failed). Returns the write's
    /// error.
    pub(crate) fn finish_write(&mut self, seq: u64, written: Result<()>) -> Result<()> {
        let snapshot = match self.journal.writing.take() {
            Some((s, book)) if s == seq => Some(book),
            other => {
                self.journal.writing = other;
                None
            }
        };
        match written {
            Ok(()) => {
                self.journal.stats.writes += 1;
                self.journal.stats.changes += seq.saturating_sub(self.journal.settled);
                if let Some(book) = snapshot {
                    self.journal.durable = Some(book);
                }
                self.settle(seq, Ok(()));
                Ok(())
            }
            Err(e) => {
                self.roll_back(&e);
                Err(e)
            }
        }
    }

    /// A write failed: the book goes back to the last one written, and every change since is
    /// settled as failed (its callers get `error`).
    fn roll_back(&mut self, error: &CoordinatorError) {
        self.journal.stats.failures += 1;
        if let Some(durable) = &self.journal.durable {
            self.book = (**durable).clone();
        }
        let undone = self.journal.applied.saturating_sub(self.journal.settled);
        tracing::warn!(
            %error,
            changes_undone = undone,
            "the state file could not be written: the changes since the last write are rolled \
             back and their callers told"
        );
        self.settle(
            self.journal.applied,
            Err(format!("the change was rolled back: {error}")),
        );
    }

    /// Every change up to `seq` is settled with `outcome`; so are the callers waiting for them.
    fn settle(&mut self, seq: u64, outcome: std::result::Result<(), String>) {
        self.journal.settled = self.journal.settled.max(seq);
        self.settle_callers(|s| s <= seq, &outcome);
    }

    fn settle_callers(
        &mut self,
        which: impl Fn(u64) -> bool,
        outcome: &std::result::Result<(), String>,
    ) {
        let j = &mut self.journal;
        let done: Vec<u64> = j
            .waiting
            .iter()
            .filter(|&(_, &s)| which(s))
            .map(|(&t, _)| t)
            .collect();
        for ticket in done {
            j.waiting.remove(&ticket);
            j.outcomes.insert(ticket, outcome.clone());
        }
    }

    /// After a panic inside a change (a bug; the lock is poisoned): the book goes back to the
    /// state being written, or else the one last written, and the callers of the changes after
    /// it are told.
    pub(crate) fn recover_from_panic(&mut self) {
        let (seq, book) = match (&self.journal.writing, &self.journal.durable) {
            (Some((seq, book)), _) => (*seq, Some(book)),
            (None, durable) => (self.journal.settled, durable.as_ref()),
        };
        if let Some(book) = book {
            self.book = (**book).clone();
        }
        tracing::error!(
            back_to_change = seq,
            "a coordinator change panicked: the book goes back to the state file's"
        );
        let outcome = Err("the change was rolled back: the coordinator hit a bug (a panic)".into());
        self.settle_callers(|s| s > seq, &outcome);
    }

    /// Expires leases past their deadline and the open leases of actors that stopped
    /// heartbeating; their unaccepted positions go back to the queue. Returns how many leases
    /// expired. Every request calls this first; a background ticker calls it too.
    pub fn expire(&mut self, now: Now) -> usize {
        self.book.expire(&self.options, now)
    }

    /// An actor joins (or re-joins) the run. Returns the run id.
    pub fn register_actor(&mut self, actor_id: &str, device: &str, now: Now) -> Result<String> {
        self.expire(now);
        let known = self.book.actors.contains_key(actor_id);
        let actor = self.book.touch_actor(actor_id, now);
        actor.device = device.to_string();
        if known {
            tracing::info!(actor_id, device, "actor registered again");
        } else {
            tracing::info!(actor_id, device, "actor registered");
        }
        Ok(self.book.state.run_id.clone())
    }

    pub fn heartbeat(
        &mut self,
        actor_id: &str,
        policy_version: u64,
        now: Now,
    ) -> Result<HeartbeatReply> {
        self.expire(now);
        let known = match self.book.actors.get_mut(actor_id) {
            Some(a) => {
                a.last_seen = now.instant;
                a.policy_version = policy_version;
                true
            }
            None => false,
        };
        Ok(HeartbeatReply {
            latest_version: self.book.state.version,
            known,
            run_finished: self.finished(),
        })
    }

    /// Up to `max_questions` questions for `actor_id`: re-issued positions first, then fresh ones
    /// from the cursor, only of iterations `<= version + staleness_bound`. An actor that was not
    /// registered (e.g. the coordinator restarted) is registered on the way.
    pub fn lease(
        &mut self,
        actor_id: &str,
        max_questions: u32,
        policy_version: u64,
        now: Now,
    ) -> Result<LeaseGrant> {
        self.lease_keyed(actor_id, max_questions, policy_version, "", now)
    }

    /// [`Coordinator::lease`] with the actor's key for this request: a request repeated with
    /// the key of the actor's latest one (its reply was lost) gets the lease granted the first
    /// time while that lease is open, instead of a second lease. An empty key is no key.
    pub fn lease_keyed(
        &mut self,
        actor_id: &str,
        max_questions: u32,
        policy_version: u64,
        request_id: &str,
        now: Now,
    ) -> Result<LeaseGrant> {
        self.expire(now);
        if let Some(grant) = self.repeated_lease(actor_id, request_id)? {
            tracing::info!(
                actor_id,
                lease_id = grant.lease_id,
                "lease request repeated: the same lease again"
            );
            return Ok(grant);
        }
        let lease_prefix = self.lease_prefix.clone();
        self.transact(now, |book, stream, options| {
            let actor = book.touch_actor(actor_id, now);
            actor.policy_version = policy_version;
            let version = book.state.version;
            let empty = |retry_after_ms, run_finished| LeaseGrant {
                lease_id: String::new(),
                deadline_unix_ms: 0,
                policy_version: version,
                items: Vec::new(),
                retry_after_ms,
                run_finished,
            };
            if book.finished(options) {
                return Ok(empty(0, true));
            }
            let b = options.questions_per_iteration;
            let limit = version
                .saturating_add(options.staleness_bound)
                .saturating_add(1)
                .saturating_mul(b)
                .min(options.total_positions());
            let max = max_questions as usize;
            // Picked (re-issued first, then fresh) and read before anything changes: a row that
            // cannot be read refuses the lease and leaves the book as it was.
            let mut picked: Vec<u64> = book.reissue.range(..limit).take(max).copied().collect();
            let fresh = (max - picked.len()).min(limit.saturating_sub(book.state.cursor) as usize);
            picked.extend(book.state.cursor..book.state.cursor + fresh as u64);
            if picked.is_empty() {
                return Ok(empty(ms(options.lease_retry_after), false));
            }
            let items = picked
                .iter()
                .map(|&p| {
                    Ok(LeasedQuestion {
                        position: p,
                        iteration: p / b,
                        row: stream.row_at(p)?,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            for p in &picked[..picked.len() - fresh] {
                book.reissue.remove(p);
            }
            book.state.cursor += fresh as u64;
            // The lease is written with the state, so that a restart honours it.
            book.dirty = true;
            let lease_id = format!("{lease_prefix}-{}", book.next_lease);
            book.next_lease += 1;
            for &p in &picked {
                book.leased.insert(p, lease_id.clone());
                book.granted.entry(p).or_default().push(lease_id.clone());
            }
            if !request_id.is_empty() {
                book.lease_requests.insert(
                    actor_id.to_string(),
                    (request_id.to_string(), lease_id.clone()),
                );
            }
            book.touch_actor(actor_id, now).groups_leased += picked.len() as u64;
            let deadline_unix_ms = now.unix_ms.saturating_add(ms(options.lease_timeout));
            book.leases.insert(
                lease_id.clone(),
                Lease {
                    deadline: now.instant + options.lease_timeout,
                    record: OpenLease {
                        actor_id: actor_id.to_string(),
                        deadline_unix_ms,
                        version,
                        outstanding: picked.iter().copied().collect(),
                        positions: picked,
                        completed: false,
                    },
                },
            );
            tracing::debug!(actor_id, lease_id, n = items.len(), version, "leased");
            Ok(LeaseGrant {
                lease_id,
                deadline_unix_ms,
                policy_version: version,
                items,
                retry_after_ms: 0,
                run_finished: false,
            })
        })
    }

    /// The lease granted for `actor_id`'s latest request when `request_id` repeats it and the
    /// lease is still open (not completed, not expired).
    fn repeated_lease(&mut self, actor_id: &str, request_id: &str) -> Result<Option<LeaseGrant>> {
        if request_id.is_empty() {
            return Ok(None);
        }
        let Some((key, lease_id)) = self.book.lease_requests.get(actor_id) else {
            return Ok(None);
        };
        let lease = match self.book.leases.get(lease_id) {
            Some(l)
                if key == request_id && !l.record.completed && l.record.actor_id == actor_id =>
            {
                l
            }
            _ => return Ok(None),
        };
        let (lease_id, deadline_unix_ms, version) = (
            lease_id.clone(),
            lease.record.deadline_unix_ms,
            lease.record.version,
        );
        let positions: Vec<u64> = lease
            .record
            .positions
            .iter()
            .copied()
            .filter(|p| lease.record.outstanding.contains(p))
            .collect();
        let b = self.options.questions_per_iteration;
        let items = positions
            .into_iter()
            .map(|p| {
                Ok(LeasedQuestion {
                    position: p,
                    iteration: p / b,
                    row: self.stream.row_at(p)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(LeaseGrant {
            lease_id,
            deadline_unix_ms,
            policy_version: version,
            items,
            retry_after_ms: 0,
            run_finished: false,
        }))
    }

    /// The actor is done with a lease: `returned` positions are re-issued at once; the groups of
    /// the rest are expected at the learner, which has `lease_timeout` to accept them before they
    /// are re-issued too. Completing an unknown (e.g. already expired) lease does nothing, and so
    /// does completing it again (a retry): the key is the lease id.
    pub fn complete_lease(
        &mut self,
        actor_id: &str,
        lease_id: &str,
        returned: &[u64],
        now: Now,
    ) -> Result<()> {
        self.complete_lease_because(actor_id, lease_id, returned, "", now)
    }

    /// [`Coordinator::complete_lease`] with why the `returned` positions came back (shown by the
    /// progress watchdog).
    pub fn complete_lease_because(
        &mut self,
        actor_id: &str,
        lease_id: &str,
        returned: &[u64],
        reason: &str,
        now: Now,
    ) -> Result<()> {
        self.expire(now);
        self.transact(now, |book, _, options| {
            if let Some(a) = book.actors.get_mut(actor_id) {
                a.last_seen = now.instant;
            }
            let Some(lease) = book.leases.get_mut(lease_id) else {
                tracing::debug!(actor_id, lease_id, "completing an unknown or expired lease");
                return Ok(());
            };
            if lease.record.actor_id != actor_id {
                return Err(CoordinatorError::invalid(
                    "actor_id",
                    format!(
                        "lease {lease_id} belongs to actor {:?}, not {actor_id:?}",
                        lease.record.actor_id
                    ),
                ));
            }
            if let Some(p) = returned
                .iter()
                .find(|p| !lease.record.positions.contains(p))
            {
                return Err(CoordinatorError::invalid(
                    "returned_positions",
                    format!("position {p} is not in lease {lease_id}"),
                ));
            }
            for p in returned {
                if lease.record.outstanding.remove(p) {
                    book.leased.remove(p);
                    book.reissue.insert(*p);
                }
            }
            lease.record.completed = true;
            lease.deadline = lease.deadline.max(now.instant + options.lease_timeout);
            if lease.record.outstanding.is_empty() {
                book.leases.remove(lease_id);
            }
            if !returned.is_empty() {
                let why = if reason.is_empty() {
                    "no reason given"
                } else {
                    reason
                };
                book.last_handback = Some((
                    now.instant,
                    format!(
                        "{} question(s) of lease {lease_id} handed back by actor {actor_id}: {why}",
                        returned.len()
                    ),
                ));
                tracing::info!(
                    actor_id,
                    lease_id,
                    returned = returned.len(),
                    reason,
                    "positions returned"
                );
            }
            Ok(())
        })
    }

    /// The learner commits a group before training on it. Each position is accepted once; the
    /// question id and iteration must match the position. A group from an expired lease is
    /// still accepted if no other group for its position was.
    pub fn accept_group(
        &mut self,
        lease_id: &str,
        position: u64,
        question_id: &str,
        iteration: u64,
        now: Now,
    ) -> Result<Acceptance> {
        self.expire(now);
        let lease_prefix = self.lease_prefix.clone();
        let acceptance = self.transact(now, |book, stream, options| {
            let refuse = |reason: String| Ok(Acceptance::Refused(reason));
            let total = options.total_positions();
            if position >= total {
                return refuse(format!(
                    "unknown position {position}: the run has {total} positions"
                ));
            }
            if position >= book.state.cursor {
                return refuse(format!(
                    "position {position} was never issued (the cursor is at {})",
                    book.state.cursor
                ));
            }
            let b = options.questions_per_iteration;
            if iteration != position / b {
                return refuse(format!(
                    "position {position} belongs to iteration {}, not {iteration}",
                    position / b
                ));
            }
            let id = stream.id_at(position);
            if id != question_id {
                return refuse(format!(
                    "position {position} is question {id:?}, not {question_id:?}"
                ));
            }
            if book.state.accepted.contains(position) {
                // The same lease again: a retry of a commit whose answer was lost. Same answer.
                if book.state.accepted_by.get(&position).map(String::as_str) == Some(lease_id) {
                    return Ok(Acceptance::Accepted);
                }
                book.state.duplicates_refused += 1;
                book.dirty = true;
                return refuse(format!(
                    "duplicate: position {position} ({question_id}) already accepted"
                ));
            }
            if let Some(problem) = book.lease_problem(lease_id, position, &lease_prefix) {
                return refuse(problem);
            }
            book.state.accepted.insert(position);
            book.state
                .accepted_by
                .insert(position, lease_id.to_string());
            book.dirty = true;
            book.reissue.remove(&position);
            if let Some(holder) = book.leased.remove(&position)
                && let Some(lease) = book.leases.get_mut(&holder)
            {
                lease.record.outstanding.remove(&position);
                if lease.record.completed && lease.record.outstanding.is_empty() {
                    book.leases.remove(&holder);
                }
            }
            book.accept_times.push_back(now.instant);
            book.prune_rate_window(now);
            book.last_progress = now.instant;
            Ok(Acceptance::Accepted)
        })?;
        Ok(match acceptance {
            Acceptance::Refused(reason) => {
                tracing::info!(lease_id, position, question_id, reason, "group refused");
                // The refusal names the group it is about (the learner logs and forwards it).
                Acceptance::Refused(format!(
                    "{reason} (group from lease {lease_id:?}, question {question_id:?})"
                ))
            }
            a => a,
        })
    }

    /// The learner gives a question back (e.g. its group was too stale): it is no longer
    /// accepted and is re-issued at once. With `lease_id` (the lease of the group handed back)
    /// the call is idempotent: it takes effect only while the position is accepted under that
    /// lease (or held by it), so a retry arriving after the question was re-issued, or accepted
    /// again from another lease, changes nothing. An empty `lease_id` hands the position back
    /// whatever holds it.
    pub fn return_question(
        &mut self,
        position: u64,
        lease_id: &str,
        reason: &str,
        now: Now,
    ) -> Result<()> {
        self.expire(now);
        self.transact(now, |book, _, _| {
            if position >= book.state.cursor {
                return Err(CoordinatorError::invalid(
                    "position",
                    format!(
                        "position {position} was never issued (the cursor is at {})",
                        book.state.cursor
                    ),
                ));
            }
            if !lease_id.is_empty() && !book.holds(position, lease_id) {
                tracing::debug!(
                    position,
                    lease_id,
                    "question already handed back (a repeated ReturnQuestion): nothing to do"
                );
                return Ok(());
            }
            book.last_handback = Some((
                now.instant,
                format!("position {position} handed back by the learner: {reason}"),
            ));
            let was_accepted = book.state.accepted.remove(position);
            book.state.accepted_by.remove(&position);
            if was_accepted {
                book.dirty = true;
            }
            if let Some(holder) = book.leased.remove(&position)
                && let Some(lease) = book.leases.get_mut(&holder)
            {
                lease.record.outstanding.remove(&position);
                if lease.record.completed && lease.record.outstanding.is_empty() {
                    book.leases.remove(&holder);
                }
            }
            book.reissue.insert(position);
            tracing::info!(
                position,
                reason,
                was_accepted,
                "question returned by the learner"
            );
            Ok(())
        })
    }

    /// The learner published `version` (made by `iteration = version - 1`). Versions come in
    /// order; publishing the latest again with the same checkpoint is a harmless retry.
    pub fn publish_version(
        &mut self,
        version: u64,
        iteration: u64,
        checkpoint: &str,
        now: Now,
    ) -> Result<()> {
        self.expire(now);
        self.transact(now, |book, _, options| {
            let latest = book.state.version;
            if version <= latest {
                let retry = book
                    .state
                    .history
                    .iter()
                    .any(|r| r.version == version && r.checkpoint == checkpoint);
                if retry {
                    return Ok(());
                }
                return Err(CoordinatorError::FailedPrecondition(format!(
                    "version {version} is not newer than the latest published version {latest}"
                )));
            }
            if version != latest + 1 {
                return Err(CoordinatorError::FailedPrecondition(format!(
                    "version {version} skips ahead: the latest published version is {latest}, \
                     the next must be {}",
                    latest + 1
                )));
            }
            if version > options.total_iterations {
                return Err(CoordinatorError::FailedPrecondition(format!(
                    "version {version} is past the run's {} iterations",
                    options.total_iterations
                )));
            }
            book.state.version = version;
            // Iterations before `version` are trained: their commits are final.
            let trained = version.saturating_mul(options.questions_per_iteration);
            book.state
                .accepted_by
                .retain(|&position, _| position >= trained);
            book.granted.retain(|&position, _| position >= trained);
            book.last_progress = now.instant;
            book.state.record_version(VersionRecord {
                version,
                iteration,
                checkpoint: checkpoint.to_string(),
                published_unix_ms: now.unix_ms,
            });
            book.dirty = true;
            tracing::info!(version, iteration, checkpoint, "policy version published");
            Ok(())
        })
    }

    /// Learner rank 0 starts from `version` (its checkpoint). Versions published after it are
    /// forgotten (never checkpointed, so no learner can serve them), and groups accepted for
    /// iterations from `version` on are taken back and re-issued: the learner that accepted
    /// them held them in memory only. Idempotent, so a rank polling the rendezvous repeats it
    /// harmlessly. A version more than one beyond the latest published one is refused: that
    /// checkpoint is not this run's.
    fn rewind_to(&mut self, version: u64, now: Now) -> Result<()> {
        self.transact(now, |book, _, options| {
            let latest = book.state.version;
            // One ahead is a learner that checkpointed a version and stopped before publishing
            // it; it publishes it again once joined.
            if version > latest + 1 {
                return Err(CoordinatorError::FailedPrecondition(format!(
                    "learner rank 0 starts from version {version}, but this run has published \
                     only up to version {latest}: its checkpoint is not from this run (point \
                     the learner's out_dir at this run's, or start a fresh run directory)"
                )));
            }
            if version < latest {
                let checkpoint = book
                    .state
                    .history
                    .iter()
                    .rfind(|r| r.version == latest)
                    .map(|r| r.checkpoint.as_str())
                    .filter(|c| !c.is_empty())
                    .unwrap_or("its checkpoint");
                return Err(CoordinatorError::FailedPrecondition(format!(
                    "learner rank 0 starts from version {version}, but this run has already \
                     published version {latest}: a run never goes back past a published \
                     version (actors may have sampled with it). Start rank 0 from \
                     {checkpoint} (the learner's out_dir of this run), or start a new run"
                )));
            }
            let first = version.saturating_mul(options.questions_per_iteration);
            let mut taken_back = Vec::new();
            for position in first..book.state.cursor {
                if book.state.accepted.remove(position) {
                    book.state.accepted_by.remove(&position);
                    book.reissue.insert(position);
                    taken_back.push(position);
                }
            }
            if !taken_back.is_empty() {
                book.dirty = true;
                tracing::warn!(
                    version,
                    positions = ?taken_back,
                    "groups accepted but never trained (the learner restarted): re-issued"
                );
            }
            Ok(())
        })
    }

    /// The address of learner rank 0 once it has joined (actors pull weights from it).
    pub fn learner_rank0_addr(&self) -> Option<String> {
        let joined = self.book.ranks.get(&0).cloned();
        joined.or_else(|| {
            self.book
                .state
                .learner_ranks
                .get(&0)
                .map(|r| r.addr.clone())
        })
    }

    /// Where actors pull weights and push groups: the configured learner address, or else
    /// rank 0's joined one; until it has joined, actors are told to come back.
    pub fn learner_addr_for_actors(&self) -> Result<String> {
        let configured = &self.options.actor.learner_addr;
        if !configured.is_empty() {
            return Ok(configured.clone());
        }
        self.learner_rank0_addr().ok_or_else(|| {
            CoordinatorError::Unavailable("learner rank 0 has not joined yet".into())
        })
    }

    /// Learner rank 0's publisher key, from its JoinLearner (its SHA-256 is kept, persisted).
    /// The first rank 0 of the run sets it; after that only a rank 0 holding the same key (the
    /// same learner, restarted: the key lives in its out_dir) may join as rank 0, so a holder of
    /// a learner certificate cannot take the run over (replace the publisher, roll it back).
    pub fn set_publisher(&mut self, key: &[u8], now: Now) -> Result<()> {
        self.check_rank0_key(key)?;
        let digest = publisher_digest(key);
        if self.book.state.publisher_key_sha256 == digest {
            return Ok(());
        }
        self.transact(now, |book, _, _| {
            book.state.publisher_key_sha256 = digest;
            book.dirty = true;
            Ok(())
        })
    }

    /// Refuses `what` (AcceptGroup, PublishVersion) unless `key` is learner rank 0's.
    pub fn check_publisher(&self, key: &[u8], what: &str) -> Result<()> {
        let known = &self.book.state.publisher_key_sha256;
        if known.is_empty() {
            return Err(CoordinatorError::FailedPrecondition(format!(
                "{what}: learner rank 0 has not joined this run yet (JoinLearner with its publisher key)"
            )));
        }
        let digest = publisher_digest(key);
        if !ril_proto::security::constant_time_eq(digest.as_bytes(), known.as_bytes()) {
            return Err(CoordinatorError::PermissionDenied(format!(
                "{what} is for learner rank 0 only: the publisher key does not match the one \
                 rank 0 joined with"
            )));
        }
        Ok(())
    }

    /// A learner rank joins. Ranks poll until `ready`; rank 0 brings the collective's id.
    pub fn join_learner(
        &mut self,
        rank: u32,
        addr: &str,
        collective_id: &[u8],
        collective_addr: &str,
        version: u64,
        now: Now,
    ) -> Result<Rendezvous> {
        let world_size = self.options.learner_world_size;
        if rank >= world_size {
            return Err(CoordinatorError::invalid(
                "rank",
                format!("rank {rank} is outside the learner world of {world_size} ranks"),
            ));
        }
        if rank == 0 {
            self.rewind_to(version, now)?;
        }
        // Kept in the state file too, so that a restarted coordinator still knows the ranks.
        self.transact(now, |book, _, _| {
            if rank == 0 && book.collective_id != collective_id {
                if !book.collective_id.is_empty() {
                    tracing::warn!("learner rank 0 joined again with a new collective id");
                }
                book.collective_id = collective_id.to_vec();
            }
            if book.ranks.insert(rank, addr.to_string()).as_deref() != Some(addr) {
                tracing::info!(rank, addr, world_size, "learner rank joined");
            }
            book.collective_addrs
                .insert(rank, collective_addr.to_string());
            let record = RankRecord {
                addr: addr.to_string(),
                collective_addr: collective_addr.to_string(),
            };
            if book.state.learner_ranks.get(&rank) != Some(&record) {
                book.state.learner_ranks.insert(rank, record);
                book.dirty = true;
            }
            Ok(())
        })?;
        let book = &self.book;
        let ready = book.ranks.len() == world_size as usize;
        let collective_addrs = (0..world_size)
            .map(|r| book.collective_addrs.get(&r).cloned().unwrap_or_default())
            .collect();
        Ok(Rendezvous {
            collective_addrs,
            world_size,
            ready,
            rank_addrs: if ready {
                book.ranks.values().cloned().collect()
            } else {
                Vec::new()
            },
            collective_id: if ready {
                book.collective_id.clone()
            } else {
                Vec::new()
            },
        })
    }

    /// The learner's step metrics; merged into the latest values shown by `status`.
    pub fn report_metrics(
        &mut self,
        iteration: u64,
        metrics: impl IntoIterator<Item = (String, f64)>,
    ) -> Result<()> {
        self.book.metrics.extend(metrics);
        self.book.metrics_iteration = Some(iteration);
        Ok(())
    }

    pub fn status(&mut self, now: Now) -> Status {
        self.expire(now);
        self.book.prune_rate_window(now);
        let book = &self.book;
        let options = &self.options;
        let since = now
            .instant
            .checked_sub(RATE_WINDOW)
            .map_or(self.started, |t| t.max(self.started));
        let span = now.instant.saturating_duration_since(since).as_secs_f64();
        let groups_per_second = if book.accept_times.is_empty() {
            0.0
        } else {
            book.accept_times.len() as f64 / span.max(1.0)
        };
        Status {
            run_id: book.state.run_id.clone(),
            policy_version: book.state.version,
            iteration: book.state.version.min(options.total_iterations),
            total_iterations: options.total_iterations,
            cursor: book.state.cursor,
            groups_accepted: book.state.accepted.len(),
            duplicates_refused: book.state.duplicates_refused,
            leases_expired: book.state.leases_expired,
            leases_outstanding: book.leases.len() as u64,
            actors: book
                .actors
                .iter()
                .map(|(id, a)| {
                    let ago = now.instant.saturating_duration_since(a.last_seen);
                    ActorInfo {
                        actor_id: id.clone(),
                        device: a.device.clone(),
                        policy_version: a.policy_version,
                        last_seen_ms_ago: ms(ago),
                        alive: ago <= options.actor_timeout,
                        groups_leased: a.groups_leased,
                    }
                })
                .collect(),
            metrics: book.metrics.clone(),
            metrics_iteration: book.metrics_iteration,
            groups_per_second,
            finished: book.finished(options),
            learner_world_size: options.learner_world_size,
            learner_ranks_joined: book.ranks_known() as u32,
            history: book.state.history.clone(),
            progress: book.progress(options, now),
            state_writes: self.journal.stats,
        }
    }

    /// The progress watchdog, called by the server's ticker: once the run (not finished) has
    /// not advanced for the stall limit, the error it stops with, naming how long and what it
    /// waits for (and the latest reason a question came back). Repeats the error once set.
    pub fn check_stall(&mut self, now: Now) -> Option<CoordinatorError> {
        self.expire(now);
        if let Some(stalled) = &self.book.stalled {
            return Some(CoordinatorError::Stalled(stalled.clone()));
        }
        let limit = self.options.stall_limit?;
        let progress = self.book.progress(&self.options, now);
        if progress.waiting_for.is_empty() || progress.since_progress < limit {
            return None;
        }
        let mut message = format!(
            "no progress for {} s (the stall limit, [coordinator] stall_limit_s): {}",
            progress.since_progress.as_secs(),
            progress.waiting_for
        );
        if let Some((ago, why)) = &progress.last_handback {
            message.push_str(&format!(
                "; the latest question handed back ({} s ago): {why}",
                ago.as_secs()
            ));
        }
        tracing::error!(%message, "the run stalled");
        self.book.stalled = Some(message.clone());
        Some(CoordinatorError::Stalled(message))
    }

    /// Refuses a rank 0 whose publisher key is not the run's (see [`Coordinator::set_publisher`])
    /// without changing anything: checked before the join rewinds the run.
    pub fn check_rank0_key(&self, key: &[u8]) -> Result<()> {
        let known = &self.book.state.publisher_key_sha256;
        let digest = publisher_digest(key);
        if known.is_empty()
            || ril_proto::security::constant_time_eq(digest.as_bytes(), known.as_bytes())
        {
            return Ok(());
        }
        Err(CoordinatorError::PermissionDenied(
            "JoinLearner as rank 0: this run's rank 0 joined with another publisher key. Only \
             that learner may join as rank 0 again (a restarted learner reads its key from \
             publisher.key in its out_dir); a learner without it cannot take the run over. \
             Restart rank 0 with the run's out_dir, or start a new run"
                .into(),
        ))
    }
}

impl Book {
    /// The book of a coordinator starting on `state` (fresh, or `resumed` from its file):
    /// positions issued and never accepted go to the re-issue queue, the learner ranks are as
    /// they last joined are kept for actors and status (`Book::ranks_known`), and this
    /// start's lease prefix is recorded.
    fn restored(
        mut state: StateFile,
        resumed: bool,
        lease_prefix: &str,
        options: &CoordinatorOptions,
        now: Now,
    ) -> Self {
        // A run resumed from a state file that kept no lease prefixes: its earlier leases
        // cannot be told from forged ones, so groups from them are not checked.
        let legacy_leases = resumed && state.lease_prefixes.is_empty() && state.cursor > 0;
        let reissue: BTreeSet<u64> = (state.accepted.watermark()..state.cursor)
            .filter(|&p| !state.accepted.contains(p))
            .collect();
        let world = options.learner_world_size;
        state.learner_ranks.retain(|&rank, _| rank < world);
        state.lease_prefixes.push(lease_prefix.to_string());
        let open = std::mem::take(&mut state.open_leases);
        let mut book = Self {
            state,
            reissue,
            leases: BTreeMap::new(),
            leased: HashMap::new(),
            actors: BTreeMap::new(),
            ranks: BTreeMap::new(),
            collective_addrs: BTreeMap::new(),
            collective_id: Vec::new(),
            metrics: BTreeMap::new(),
            metrics_iteration: None,
            accept_times: VecDeque::new(),
            next_lease: 0,
            granted: HashMap::new(),
            lease_requests: HashMap::new(),
            last_progress: now.instant,
            last_handback: None,
            stalled: None,
            legacy_leases,
            dirty: false,
        };
        book.reopen_leases(open, options, now);
        book
    }

    /// The leases open at the last write, honoured after a restart: each one still within its
    /// deadline keeps its outstanding positions (not accepted since, not held by another) for
    /// its actor until that deadline, as if the coordinator had not stopped; its actor counts
    /// as just seen (it has `actor_timeout` to heartbeat or register again). Expired ones, and
    /// the positions no lease holds, are re-issued.
    fn reopen_leases(
        &mut self,
        open: BTreeMap<String, OpenLease>,
        options: &CoordinatorOptions,
        now: Now,
    ) {
        for (lease_id, l) in open {
            let left = Duration::from_millis(l.deadline_unix_ms.saturating_sub(now.unix_ms));
            let outstanding: BTreeSet<u64> = l
                .outstanding
                .iter()
                .copied()
                .filter(|p| self.reissue.contains(p) && !self.leased.contains_key(p))
                .collect();
            if left.is_zero() || outstanding.is_empty() {
                continue;
            }
            for &p in &outstanding {
                self.reissue.remove(&p);
                self.leased.insert(p, lease_id.clone());
                self.granted.entry(p).or_default().push(lease_id.clone());
            }
            let actor = self.touch_actor(&l.actor_id, now);
            actor.policy_version = actor.policy_version.max(l.version);
            tracing::info!(
                lease_id,
                actor_id = l.actor_id,
                positions = outstanding.len(),
                left_ms = ms(left),
                "lease open before the restart kept until its deadline"
            );
            let lease = Lease {
                // Never beyond a lease's full length, whatever the clocks say.
                deadline: now.instant + left.min(options.lease_timeout),
                record: OpenLease { outstanding, ..l },
            };
            self.leases.insert(lease_id, lease);
        }
    }

    /// The state file's bytes, with the leases open now (those with positions outstanding).
    /// They are derived from `leases`, so the in-memory state never keeps a copy of them.
    fn state_bytes(&mut self, path: &std::path::Path, unix_ms: u64) -> Result<Vec<u8>> {
        self.state.written_unix_ms = unix_ms;
        self.state.open_leases = self
            .leases
            .iter()
            .filter(|(_, l)| !l.record.outstanding.is_empty())
            .map(|(id, l)| (id.clone(), l.record.clone()))
            .collect();
        let bytes = self.state.to_bytes(path);
        self.state.open_leases.clear();
        bytes
    }

    fn finished(&self, options: &CoordinatorOptions) -> bool {
        self.state.version >= options.total_iterations
    }

    /// Ranks that joined this coordinator, or (before they join again) the last time: a
    /// restart of the coordinator alone leaves them running.
    fn ranks_known(&self) -> usize {
        let earlier = self.state.learner_ranks.keys();
        earlier.filter(|r| !self.ranks.contains_key(r)).count() + self.ranks.len()
    }

    /// Why `lease_id` cannot carry a group for `position`, if it cannot: a lease of this
    /// coordinator's start must have held the position; a lease of an earlier start (the
    /// coordinator restarted since) must at least be one this run issued, since the grants
    /// before a restart are not kept.
    fn lease_problem(&self, lease_id: &str, position: u64, current: &str) -> Option<String> {
        let of_start = |prefix: &str| {
            lease_id
                .strip_prefix(prefix)
                .and_then(|rest| rest.strip_prefix('-'))
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        };
        if of_start(current) {
            let held = self
                .granted
                .get(&position)
                .is_some_and(|leases| leases.iter().any(|l| l == lease_id));
            return (!held).then(|| format!("lease {lease_id:?} never held position {position}"));
        }
        if self.legacy_leases || self.state.lease_prefixes.iter().any(|p| of_start(p)) {
            return None;
        }
        Some(format!("lease {lease_id:?} was not issued by this run"))
    }

    /// Whether `position` is accepted under `lease_id`, or held by it: what a keyed
    /// ReturnQuestion may hand back. An accepted position with no record of its lease (a state
    /// file from before they were kept) counts as held.
    fn holds(&self, position: u64, lease_id: &str) -> bool {
        if self.state.accepted.contains(position) {
            return self
                .state
                .accepted_by
                .get(&position)
                .is_none_or(|l| l == lease_id);
        }
        self.leased.get(&position).is_some_and(|l| l == lease_id)
    }

    /// What the run waits for now, naming the role and the call.
    fn waiting_for(&self, options: &CoordinatorOptions, now: Now) -> String {
        if self.finished(options) {
            return String::new();
        }
        let world = options.learner_world_size;
        if self.ranks_known() < world as usize {
            let known =
                |r: &u32| self.ranks.contains_key(r) || self.state.learner_ranks.contains_key(r);
            let missing: Vec<String> = (0..world)
                .filter(|r| !known(r))
                .map(|r| r.to_string())
                .collect();
            return format!(
                "learner rank(s) {} to join (JoinLearner; {} of {world} joined)",
                missing.join(", "),
                self.ranks_known()
            );
        }
        let b = options.questions_per_iteration;
        let iteration = self.state.version;
        let positions = iteration.saturating_mul(b)..(iteration + 1).saturating_mul(b);
        let open: Vec<u64> = positions
            .clone()
            .filter(|&p| !self.state.accepted.contains(p))
            .collect();
        if open.is_empty() {
            return format!(
                "the learner to train iteration {iteration} and publish version {} \
                 (PublishVersion; all {b} groups accepted)",
                iteration + 1
            );
        }
        let mut rolling: BTreeMap<&str, (usize, Vec<&str>)> = BTreeMap::new();
        let mut pushed: BTreeMap<&str, (usize, Vec<&str>)> = BTreeMap::new();
        for p in &open {
            let Some(id) = self.leased.get(p) else {
                continue;
            };
            let Some(lease) = self.leases.get(id) else {
                continue;
            };
            let into = if lease.record.completed {
                &mut pushed
            } else {
                &mut rolling
            };
            let entry = into.entry(&lease.record.actor_id).or_default();
            entry.0 += 1;
            if !entry.1.contains(&id.as_str()) {
                entry.1.push(id);
            }
        }
        let describe = |m: &BTreeMap<&str, (usize, Vec<&str>)>| {
            m.iter()
                .map(|(actor, (n, leases))| format!("{actor} ({n}, lease {})", leases.join(", ")))
                .collect::<Vec<_>>()
                .join("; ")
        };
        let mut parts = Vec::new();
        if !pushed.is_empty() {
            parts.push(format!(
                "the learner to accept the groups of actor {} (AcceptGroup after the actor's \
                 PushGroups)",
                describe(&pushed)
            ));
        }
        if !rolling.is_empty() {
            parts.push(format!(
                "actor {} to roll out and push its lease (teacher Answer, discriminator Score, \
                 learner PushGroups)",
                describe(&rolling)
            ));
        }
        let unleased = open.len()
            - pushed
                .values()
                .chain(rolling.values())
                .map(|e| e.0)
                .sum::<usize>();
        if unleased > 0 {
            let alive = self
                .actors
                .values()
                .filter(|a| {
                    now.instant.saturating_duration_since(a.last_seen) <= options.actor_timeout
                })
                .count();
            parts.push(if alive == 0 {
                format!(
                    "an actor to lease {unleased} question(s) (LeasePrompts; no actor is alive)"
                )
            } else {
                format!("actors to lease {unleased} question(s) (LeasePrompts; {alive} alive)")
            });
        }
        format!(
            "iteration {iteration}: {} of {b} groups accepted; waiting for {}",
            b as usize - open.len(),
            parts.join("; and ")
        )
    }

    fn progress(&self, options: &CoordinatorOptions, now: Now) -> Progress {
        Progress {
            since_progress: now.instant.saturating_duration_since(self.last_progress),
            waiting_for: self.waiting_for(options, now),
            stalled: self.stalled.clone(),
            last_handback: self
                .last_handback
                .as_ref()
                .map(|(t, why)| (now.instant.saturating_duration_since(*t), why.clone())),
        }
    }

    /// The actor's record, created when new; marks it seen.
    fn touch_actor(&mut self, actor_id: &str, now: Now) -> &mut Actor {
        let actor = self
            .actors
            .entry(actor_id.to_string())
            .or_insert_with(|| Actor {
                device: String::new(),
                policy_version: 0,
                last_seen: now.instant,
                groups_leased: 0,
            });
        actor.last_seen = now.instant;
        actor
    }

    fn prune_rate_window(&mut self, now: Now) {
        while self
            .accept_times
            .front()
            .is_some_and(|&t| now.instant.saturating_duration_since(t) > RATE_WINDOW)
        {
            self.accept_times.pop_front();
        }
    }

    fn expire(&mut self, options: &CoordinatorOptions, now: Now) -> usize {
        let gone =
            |a: &Actor| now.instant.saturating_duration_since(a.last_seen) > options.actor_timeout;
        let expired: Vec<String> = self
            .leases
            .iter()
            .filter(|(_, l)| {
                now.instant >= l.deadline
                    || (!l.record.completed && self.actors.get(&l.record.actor_id).is_none_or(gone))
            })
            .map(|(id, _)| id.clone())
            .collect();
        let mut count = 0;
        for id in expired {
            let Some(lease) = self.leases.remove(&id) else {
                continue;
            };
            if lease.record.outstanding.is_empty() {
                continue;
            }
            count += 1;
            self.state.leases_expired += 1;
            for p in &lease.record.outstanding {
                self.leased.remove(p);
                self.reissue.insert(*p);
            }
            tracing::info!(
                lease_id = id,
                actor_id = lease.record.actor_id,
                positions = lease.record.outstanding.len(),
                completed = lease.record.completed,
                "lease expired: its questions will be re-issued"
            );
        }
        let forget = options.actor_timeout * FORGET_AFTER_TIMEOUTS;
        self.actors
            .retain(|_, a| now.instant.saturating_duration_since(a.last_seen) <= forget);
        let actors = &self.actors;
        self.lease_requests.retain(|id, _| actors.contains_key(id));
        count
    }
}

#[cfg(test)]
#[path = "coordinator_tests.rs"]
mod tests;

/// SHA-256 of a publisher key, hex (as the state file keeps it).
fn publisher_digest(key: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(key))
}
