//! The stable-Rust fuzz driver: for each target, replays its committed corpus, then feeds it
//! seeded random mutations of the corpus for a time budget. No coverage feedback (that needs
//! nightly and libFuzzer: `fuzz/libfuzzer/`); the same harness functions run in both.
//!
//! A panic stops the target and writes the input to `<artifacts>/<target>/crash-<hash>`; an
//! input that runs longer than `--timeout-s` is written as `timeout-<hash>` and stops the
//! process. The exit status is non-zero if any target failed.
//!
//! ```text
//! ril-fuzz list
//! ril-fuzz run [--seconds N] [--seed S] [--timeout-s T] [--max-len B] [--artifacts DIR] [TARGET...]
//! ril-fuzz replay TARGET FILE...
//! ril-fuzz make-seeds      (rewrites the generated binary seeds under fuzz/corpus/)
//! ```

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ril_fuzz::{Harness, TARGETS, corpus_dir, harness};

thread_local! {
    /// Where the last panic on this thread happened (set by the driver's panic hook).
    static LAST_PANIC: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

struct Settings {
    seconds: f64,
    seed: u64,
    timeout: Duration,
    max_len: usize,
    artifacts: PathBuf,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = match args.first().map(String::as_str) {
        Some("list") => {
            for (name, _) in TARGETS {
                println!("{name}");
            }
            0
        }
        Some("run") => run(&args[1..]),
        Some("replay") if args.len() >= 3 => replay(&args[1], &args[2..]),
        Some("make-seeds") => {
            ril_fuzz::seeds::write_all().expect("writing the generated seeds");
            0
        }
        _ => {
            eprintln!(
                "usage: ril-fuzz list | run [--seconds N] [--seed S] [--timeout-s T] \
                 [--max-len B] [--artifacts DIR] [TARGET...] | replay TARGET FILE..."
            );
            2
        }
    };
    std::process::exit(code);
}

fn replay(target: &str, files: &[String]) -> i32 {
    let Some(h) = harness(target) else {
        eprintln!("unknown target {target:?}");
        return 2;
    };
    for f in files {
        let data = std::fs::read(f).unwrap_or_else(|e| panic!("{f}: {e}"));
        let t = Instant::now();
        h(&data);
        println!("{f}: ok in {:?}", t.elapsed());
    }
    0
}

fn run(args: &[String]) -> i32 {
    let mut s = Settings {
        seconds: 30.0,
        seed: 0,
        timeout: Duration::from_secs(20),
        max_len: 64 << 10,
        artifacts: Path::new(env!("CARGO_MANIFEST_DIR")).join("artifacts"),
    };
    let mut targets = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |what: &str| -> String {
            it.next()
                .unwrap_or_else(|| panic!("{what} needs a value"))
                .clone()
        };
        match a.as_str() {
            "--seconds" => s.seconds = value(a).parse().expect("--seconds N"),
            "--seed" => s.seed = value(a).parse().expect("--seed S"),
            "--timeout-s" => s.timeout = Duration::from_secs(value(a).parse().expect("secs")),
            "--max-len" => s.max_len = value(a).parse().expect("--max-len B"),
            "--artifacts" => s.artifacts = PathBuf::from(value(a)),
            t => match harness(t) {
                Some(h) => targets.push((t.to_string(), h)),
                None => {
                    eprintln!("unknown target {t:?} (ril-fuzz list)");
                    return 2;
                }
            },
        }
    }
    if targets.is_empty() {
        targets = TARGETS.iter().map(|(n, h)| (n.to_string(), *h)).collect();
    }
    println!(
        "ril-fuzz (stable driver, no coverage feedback): seed {}, {} s per target, {} targets",
        s.seed,
        s.seconds,
        targets.len()
    );
    // Quiet panics: a library may panic and catch it itself (the Parquet reader does, for the
    // parquet crate's panics on corrupt files); the location of one that reaches the driver is
    // kept and reported with the crash.
    std::panic::set_hook(Box::new(|info| {
        let at = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        LAST_PANIC.with(|p| *p.borrow_mut() = at);
    }));
    let watch = Watchdog::start(s.timeout, s.artifacts.clone());
    let mut failed = Vec::new();
    for (name, h) in &targets {
        if let Err(e) = fuzz_one(name, *h, &s, &watch) {
            eprintln!("FAILED {name}: {e}");
            failed.push(name.clone());
        }
    }
    if failed.is_empty() {
        println!("all {} targets ran without a crash", targets.len());
        0
    } else {
        eprintln!("crashed: {}", failed.join(", "));
        1
    }
}

/// Stops the process when one input runs too long (a hang cannot be unwound), after writing it.
struct Watchdog {
    /// Milliseconds since `epoch` at which the current input started; 0 when idle.
    started_ms: Arc<AtomicU64>,
    current: Arc<Mutex<(String, Vec<u8>)>>,
    epoch: Instant,
}

impl Watchdog {
    fn start(timeout: Duration, artifacts: PathBuf) -> Self {
        let w = Self {
            started_ms: Arc::new(AtomicU64::new(0)),
            current: Arc::new(Mutex::new((String::new(), Vec::new()))),
            epoch: Instant::now(),
        };
        let (started, current, epoch) = (w.started_ms.clone(), w.current.clone(), w.epoch);
        std::thread::spawn(move || {
            loop {
                std::thread::sleep(Duration::from_millis(200));
                let s = started.load(Ordering::SeqCst);
                if s == 0 {
                    continue;
                }
                let ran = epoch.elapsed().saturating_sub(Duration::from_millis(s));
                if ran > timeout {
                    let (target, input) = current.lock().map(|c| c.clone()).unwrap_or_default();
                    let path = save(&artifacts, &target, "timeout", &input);
                    eprintln!(
                        "TIMEOUT {target}: one input ran over {timeout:?}; written to {}",
                        path.display()
                    );
                    std::process::exit(70);
                }
            }
        });
        w
    }

    fn exec(&self, target: &str, h: Harness, input: &[u8]) -> Result<(), String> {
        if let Ok(mut c) = self.current.lock() {
            c.0.clear();
            c.0.push_str(target);
            c.1.clear();
            c.1.extend_from_slice(input);
        }
        let now = u64::try_from(self.epoch.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        self.started_ms.store(now, Ordering::SeqCst);
        let r = catch_unwind(AssertUnwindSafe(|| h(input)));
        self.started_ms.store(0, Ordering::SeqCst);
        r.map_err(|p| {
            let message = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "(non-string panic)".into());
            let at = LAST_PANIC.with(|p| p.borrow().clone());
            format!("panicked at {at}: {message}")
        })
    }
}

fn save(artifacts: &Path, target: &str, kind: &str, input: &[u8]) -> PathBuf {
    let dir = artifacts.join(target);
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join(format!("{kind}-{:016x}", fnv1a(input)));
    let _ = std::fs::write(&path, input);
    path
}

fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn read_corpus(dir: &Path) -> Vec<Vec<u8>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    files
        .into_iter()
        .filter(|p| p.is_file())
        .filter_map(|p| std::fs::read(p).ok())
        .collect()
}

fn fuzz_one(name: &str, h: Harness, s: &Settings, watch: &Watchdog) -> Result<(), String> {
    let corpus = read_corpus(&corpus_dir(name));
    let started = Instant::now();
    let fail = |input: &[u8], msg: String| {
        let path = save(&s.artifacts, name, "crash", input);
        format!("{msg} (input written to {})", path.display())
    };
    for input in &corpus {
        watch.exec(name, h, input).map_err(|m| fail(input, m))?;
    }
    let replayed = corpus.len();
    let mut rng = Rng::new(s.seed ^ fnv1a(name.as_bytes()));
    let dictionary = dictionary(name);
    let budget = Duration::from_secs_f64(s.seconds);
    let mut execs: u64 = 0;
    let mut slowest = Duration::ZERO;
    let mut input = Vec::new();
    while started.elapsed() < budget {
        input.clear();
        if corpus.is_empty() || rng.below(16) == 0 {
            let n = rng.below(64);
            input.extend((0..n).map(|_| rng.byte()));
        } else {
            input.extend_from_slice(&corpus[rng.below(corpus.len())]);
        }
        let rounds = 1 + rng.below(8);
        for _ in 0..rounds {
            mutate(&mut input, &mut rng, &corpus, &dictionary, s.max_len);
        }
        let t = Instant::now();
        watch.exec(name, h, &input).map_err(|m| fail(&input, m))?;
        slowest = slowest.max(t.elapsed());
        execs += 1;
    }
    println!(
        "{name}: {replayed} corpus inputs replayed, {execs} mutated inputs in {:.1} s \
         ({:.0}/s, slowest {:?}), no crash",
        started.elapsed().as_secs_f64(),
        execs as f64 / started.elapsed().as_secs_f64().max(1e-9),
        slowest
    );
    Ok(())
}

/// Tokens worth splicing into a target's inputs (the formats' syntax and edge values).
fn dictionary(target: &str) -> Vec<&'static [u8]> {
    let common: &[&[u8]] = &[
        b"0",
        b"-1",
        b"1e309",
        b"NaN",
        b"inf",
        b"\"\"",
        b"null",
        b"\\u0000",
        b"\xff\xfe",
        b"18446744073709551615",
        b"-9223372036854775808",
        b"\n",
    ];
    let specific: &[&[u8]] = match target {
        "run_config" => &[
            b"[run]\n",
            b"[data]\n",
            b"[student]\n",
            b"[rollout]\n",
            b"[learner]\n",
            b"[learner.grpo]\n",
            b"[[teachers]]\n",
            b"[network]\n",
            b"[discriminator]\n",
            b" = ",
            b"\"\"\"",
            b"group_size",
            b"iterations",
            b"staleness_bound",
            b"world_size",
            b"questions_per_iteration",
            b"temperature",
            b"top_p",
            b"0.0",
            b"-0.5",
            b"true",
        ],
        "jsonl_rows" | "chat_template" => &[
            b"{\"id\":",
            b"\"question\":",
            b"\"messages\":",
            b"\"answer\":",
            b"\"images\":",
            b"\"role\":",
            b"\"content\":",
            b"{\"type\":\"image\"}",
            b"<image>",
            b"\"a.png\"",
            b"\"data:image/png;base64,\"",
            b"{\"bytes\":\"\"}",
            b"\"answer_type\":\"number\"",
            b"[",
            b"]",
            b"{",
            b"}",
            b",",
            b":",
        ],
        "answer" => &[
            b"Answer: ",
            b"<answer>",
            b"</answer>",
            b"\\boxed{",
            b"}",
            b"The answer is ",
            b"\0",
            b"1/2",
            b"1,000",
            b"three",
            b"(B)",
            b"yes",
            b"No.",
            b"0.5",
            b"-",
            b"%",
        ],
        _ => &[
            b"\x08",
            b"\x0a",
            b"\x10",
            b"\x12",
            b"\x1a",
            b"\x22",
            b"\x2a",
            b"\x7f\xff\xff",
        ],
    };
    common.iter().chain(specific).copied().collect()
}

fn mutate(input: &mut Vec<u8>, rng: &mut Rng, corpus: &[Vec<u8>], dict: &[&[u8]], max: usize) {
    let len = input.len();
    match rng.below(9) {
        0 if len > 0 => {
            let i = rng.below(len);
            input[i] ^= 1 << rng.below(8);
        }
        1 if len > 0 => {
            let i = rng.below(len);
            input[i] = rng.byte();
        }
        2 => {
            let i = rng.below(len + 1);
            let n = 1 + rng.below(8);
            let bytes: Vec<u8> = (0..n).map(|_| rng.byte()).collect();
            input.splice(i..i, bytes);
        }
        3 if len > 0 => {
            let i = rng.below(len);
            let n = 1 + rng.below((len - i).min(64));
            input.drain(i..i + n);
        }
        4 if len > 0 => {
            // Duplicate a range (repeats of structure: more rows, more chunks).
            let i = rng.below(len);
            let n = 1 + rng.below((len - i).min(256));
            let copy = input[i..i + n].to_vec();
            let at = rng.below(len + 1);
            input.splice(at..at, copy);
        }
        5 if !corpus.is_empty() => {
            // Splice: our head with another input's tail.
            let other = &corpus[rng.below(corpus.len())];
            let cut = rng.below(len + 1);
            let from = rng.below(other.len() + 1);
            input.truncate(cut);
            input.extend_from_slice(&other[from..]);
        }
        6 if !dict.is_empty() => {
            let token = dict[rng.below(dict.len())];
            let i = rng.below(len + 1);
            input.splice(i..i, token.iter().copied());
        }
        7 if len > 0 => {
            // Truncate (files cut short).
            input.truncate(rng.below(len));
        }
        _ if len >= 4 => {
            // An interesting little-endian integer over four bytes (lengths, counts, sizes).
            let i = rng.below(len - 3);
            let v: u32 = [0, 1, 0x7f, 0x80, 0xff, 0xffff, 0x7fff_ffff, u32::MAX][rng.below(8)];
            input[i..i + 4].copy_from_slice(&v.to_le_bytes());
        }
        _ => input.push(rng.byte()),
    }
    input.truncate(max);
}

/// xorshift64*: seeded, reproducible, no dependency.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
}
