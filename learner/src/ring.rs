//! The CPU collective: a ring all-reduce between learner processes over TCP, for development,
//! CI and CPU clusters. Each rank listens on its own address, connects to the next rank and
//! accepts the previous one; a sum all-reduce is a reduce-scatter then an all-gather around the
//! ring (each rank sends and receives 2 (R-1)/R of the buffer), in buckets of a configurable
//! size. Every socket operation has a timeout, so a dead or stalled peer becomes an error naming
//! the rank and the operation instead of a hang; after such an error the ring is unusable and the
//! learner stops (the run resumes from its last checkpoint with the ranks restarted).
//!
//! Frames carry the operation number, the step and the payload length, so ranks that disagree
//! on what they are reducing (a different call order, a different gradient layout) fail loudly.
//!
//! Every connection is authenticated both ways before it carries data ([`RingAuth`]): the
//! connecting rank sends its hello (rank, world) and a fresh nonce, the accepting rank answers
//! with its own nonce and an HMAC-SHA256 over both nonces and the hello, and the connecting rank
//! answers with its HMAC. The key is derived from the run token (`Security::collective_key`),
//! so only a process of the run joins the ring; a connection that fails the handshake is
//! dropped and the rank keeps accepting until the right one arrives or the timeout passes (the
//! first connection no longer wins). Without a token (security off) the key is a fixed public
//! one: the handshake still checks rank and world, but authenticates nothing.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::collective::Collective;
use crate::error::{LearnerError, Result};

const MAGIC: u32 = 0x5249_4c52; // "RILR"
const NONCE: usize = 32;
const MAC: usize = 32;

/// The key the ring's handshake is authenticated with.
#[derive(Clone)]
pub struct RingAuth {
    key: [u8; 32],
    /// Whether the key is the run's (false: security off, the fixed public key).
    authenticated: bool,
}

impl std::fmt::Debug for RingAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingAuth")
            .field("authenticated", &self.authenticated)
            .finish()
    }
}

impl RingAuth {
    /// From the run's collective key (`Security::collective_key`); `None`: security off.
    pub fn new(key: Option<[u8; 32]>) -> Self {
        match key {
            Some(key) => Self {
                key,
                authenticated: true,
            },
            None => Self {
                key: Sha256::digest(b"ril ring: no run token").into(),
                authenticated: false,
            },
        }
    }

    pub fn is_authenticated(&self) -> bool {
        self.authenticated
    }

    fn mac(&self, parts: &[&[u8]]) -> [u8; MAC] {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.key).expect("HMAC takes any key");
        for p in parts {
            m.update(p);
        }
        m.finalize().into_bytes().into()
    }

    fn verify(&self, parts: &[&[u8]], presented: &[u8]) -> bool {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.key).expect("HMAC takes any key");
        for p in parts {
            m.update(p);
        }
        m.verify_slice(presented).is_ok()
    }
}

fn nonce() -> [u8; NONCE] {
    use rand::RngCore;
    let mut n = [0u8; NONCE];
    rand::rng().fill_bytes(&mut n);
    n
}

/// The hello a rank sends to the next one: who it is and the world it thinks it is in.
fn hello(rank: usize, world: usize) -> [u8; 12] {
    let mut h = [0u8; 12];
    h[..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4..8].copy_from_slice(&(rank as u32).to_le_bytes());
    h[8..].copy_from_slice(&(world as u32).to_le_bytes());
    h
}

/// The connecting side of the handshake, on a fresh connection to the next rank.
fn handshake_as_connector(
    s: &mut TcpStream,
    auth: &RingAuth,
    rank: usize,
    world: usize,
) -> std::io::Result<std::result::Result<(), String>> {
    let hello = hello(rank, world);
    let mine = nonce();
    s.write_all(&hello)?;
    s.write_all(&mine)?;
    let mut reply = [0u8; NONCE + MAC];
    s.read_exact(&mut reply)?;
    let (theirs, mac) = reply.split_at(NONCE);
    if !auth.verify(&[b"acceptor", &hello, &mine, theirs], mac) {
        return Ok(Err(
            "the listener at its address failed the ring's authentication (not a rank of this \
             run, or another run token)"
                .into(),
        ));
    }
    s.write_all(&auth.mac(&[b"connector", &hello, theirs, &mine]))?;
    Ok(Ok(()))
}

/// The accepting side of the handshake on a connection that should be from rank `prev` of
/// `world`: `Ok(Err(why))` when it is not (the connection is then dropped).
fn handshake_as_acceptor(
    s: &mut TcpStream,
    auth: &RingAuth,
    prev: usize,
    world: usize,
) -> std::io::Result<std::result::Result<(), String>> {
    let mut got = [0u8; 12 + NONCE];
    s.read_exact(&mut got)?;
    let (their_hello, theirs) = got.split_at(12);
    if their_hello != hello(prev, world) {
        let field = |i: usize| {
            u32::from_le_bytes([
                their_hello[i],
                their_hello[i + 1],
                their_hello[i + 2],
                their_hello[i + 3],
            ])
        };
        return Ok(Err(format!(
            "expected rank {prev} of {world} to connect; got rank {} of {} (magic {:#x})",
            field(4),
            field(8),
            field(0)
        )));
    }
    let mine = nonce();
    let mac = auth.mac(&[b"acceptor", their_hello, theirs, &mine]);
    s.write_all(&mine)?;
    s.write_all(&mac)?;
    let mut answer = [0u8; MAC];
    s.read_exact(&mut answer)?;
    if !auth.verify(&[b"connector", their_hello, &mine, theirs], &answer) {
        return Ok(Err(
            "the connection failed the ring's authentication (not a rank of this run, or \
             another run token)"
                .into(),
        ));
    }
    Ok(Ok(()))
}

fn set_timeouts(s: &TcpStream, timeout: Duration) -> std::io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))
}
/// Default bucket: 4 Mi f32 elements (16 MiB).
pub const DEFAULT_BUCKET_ELEMS: usize = 4 << 20;

/// A rank of the TCP ring.
#[derive(Debug)]
pub struct TcpRing {
    rank: usize,
    world: usize,
    next: Mutex<TcpStream>,
    prev: Mutex<TcpStream>,
    timeout: Duration,
    bucket_elems: usize,
    op: Mutex<u64>,
}

fn err(rank: usize, what: impl Into<String>) -> LearnerError {
    LearnerError::Collective(format!("rank {rank}: {}", what.into()))
}

impl TcpRing {
    /// Joins the ring: `listener` is this rank's bound socket, `addrs[r]` rank r's address.
    /// Connects to rank + 1 and accepts rank - 1, both authenticated with `auth`, within
    /// `timeout`.
    pub fn connect(
        rank: usize,
        listener: TcpListener,
        addrs: &[String],
        timeout: Duration,
        bucket_elems: usize,
        auth: &RingAuth,
    ) -> Result<Self> {
        let world = addrs.len();
        if world < 2 || rank >= world {
            return Err(err(
                rank,
                format!("a ring needs rank < world >= 2 (world {world})"),
            ));
        }
        let next_rank = (rank + 1) % world;
        let prev_rank = (rank + world - 1) % world;
        let deadline = Instant::now() + timeout;
        // Connect to the next rank (it may not be listening yet) while accepting the previous.
        let next_addr = addrs[next_rank].clone();
        let connector_auth = auth.clone();
        let connector = std::thread::spawn(move || -> std::result::Result<TcpStream, String> {
            let addr: SocketAddr = next_addr
                .parse()
                .map_err(|e| format!("rank {next_rank}'s address {next_addr:?}: {e}"))?;
            let mut s = loop {
                match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
                    Ok(s) => break s,
                    Err(e) if Instant::now() < deadline => {
                        let _ = e;
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => {
                        return Err(format!("cannot reach rank {next_rank} at {addr}: {e}"));
                    }
                }
            };
            set_timeouts(&s, timeout).map_err(|e| format!("socket options: {e}"))?;
            match handshake_as_connector(&mut s, &connector_auth, rank, world) {
                Ok(Ok(())) => Ok(s),
                Ok(Err(why)) => Err(format!("rank {next_rank} at {addr}: {why}")),
                Err(e) => Err(format!("handshake with rank {next_rank} at {addr}: {e}")),
            }
        });
        let prev = accept_authenticated(&listener, auth, rank, prev_rank, world, timeout);
        // Both sides are reported when both failed (the connecting side ends by the deadline).
        let next = connector
            .join()
            .map_err(|_| err(rank, "the connecting thread panicked"))?;
        let (prev, next) = match (prev, next) {
            (Ok(prev), Ok(next)) => (prev, next),
            (Err(accepting), Err(connecting)) => {
                return Err(err(rank, format!("{connecting}; and {accepting}")));
            }
            (Err(accepting), Ok(_)) => return Err(accepting),
            (Ok(_), Err(connecting)) => return Err(err(rank, connecting)),
        };
        Ok(Self {
            rank,
            world,
            next: Mutex::new(next),
            prev: Mutex::new(prev),
            timeout,
            bucket_elems: bucket_elems.max(world),
            op: Mutex::new(0),
        })
    }

    /// Sums `buf` across ranks in place (ring reduce-scatter + all-gather, in buckets).
    pub fn all_reduce_f32(&self, buf: &mut [f32]) -> Result<()> {
        let mut op = self.op.lock().map_err(|_| err(self.rank, "poisoned"))?;
        for bucket in buf.chunks_mut(self.bucket_elems) {
            *op += 1;
            self.ring(bucket, *op)?;
        }
        Ok(())
    }

    /// The same for f64 values (loss sums, counts), sent exactly.
    pub fn all_reduce_f64(&self, buf: &mut [f64]) -> Result<()> {
        let mut op = self.op.lock().map_err(|_| err(self.rank, "poisoned"))?;
        *op += 1;
        self.ring(buf, *op)
    }

    fn ring<T: Elem>(&self, buf: &mut [T], op: u64) -> Result<()> {
        let (w, r) = (self.world, self.rank);
        let n = buf.len();
        let bounds = |c: usize| (n * c / w, n * (c + 1) / w);
        let mut next = self.next.lock().map_err(|_| err(r, "poisoned"))?;
        let mut prev = self.prev.lock().map_err(|_| err(r, "poisoned"))?;
        let prev_rank = (r + w - 1) % w;
        let next_rank = (r + 1) % w;
        for phase in 0..2 {
            for s in 0..w - 1 {
                // Reduce-scatter sends chunk r - s; all-gather sends chunk r + 1 - s.
                let send_c = (r + w * 2 - s - (1 - phase)) % w;
                let recv_c = (r + w * 2 - s - 1 - (1 - phase)) % w;
                let (a, b) = bounds(send_c);
                let payload = T::to_bytes(&buf[a..b]);
                let step = (phase * w + s) as u32;
                let header = header(op, step, payload.len());
                let (c0, c1) = bounds(recv_c);
                let expected = (c1 - c0) * T::SIZE;
                let stream_next: &mut TcpStream = &mut next;
                let stream_prev: &mut TcpStream = &mut prev;
                let timeout = self.timeout;
                let received = std::thread::scope(|scope| {
                    let sender = scope.spawn(move || {
                        stream_next
                            .write_all(&header)
                            .and_then(|_| stream_next.write_all(&payload))
                    });
                    let got = read_frame(stream_prev, op, step, expected);
                    let sent = sender.join();
                    (got, sent)
                });
                match received {
                    (_, Err(_)) => return Err(err(r, "the sending thread panicked")),
                    (_, Ok(Err(e))) => {
                        return Err(err(
                            r,
                            format!(
                                "all-reduce #{op} step {step}: sending to rank {next_rank} failed \
                                 within {timeout:?}: {e} (rank {next_rank} dead or stalled?)"
                            ),
                        ));
                    }
                    (Err(e), _) => {
                        return Err(err(
                            r,
                            format!("all-reduce #{op} step {step}: from rank {prev_rank}: {e}"),
                        ));
                    }
                    (Ok(bytes), Ok(Ok(()))) => {
                        let vals = T::from_bytes(&bytes);
                        let dst = &mut buf[c0..c1];
                        if phase == 0 {
                            for (d, v) in dst.iter_mut().zip(vals) {
                                *d = d.add(v);
                            }
                        } else {
                            dst.copy_from_slice(&vals);
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// Accepts connections until one is rank `prev` of `world` and passes the handshake, within
/// `timeout`; the others are dropped with a warning naming their peer address and why.
fn accept_authenticated(
    listener: &TcpListener,
    auth: &RingAuth,
    rank: usize,
    prev: usize,
    world: usize,
    timeout: Duration,
) -> Result<TcpStream> {
    let deadline = Instant::now() + timeout;
    listener
        .set_nonblocking(true)
        .map_err(|e| err(rank, format!("listener: {e}")))?;
    let mut refused = Vec::new();
    loop {
        match listener.accept() {
            Ok((mut s, peer)) => {
                // A stranger gets at most a few seconds of the handshake.
                let left = deadline.saturating_duration_since(Instant::now());
                let budget = left
                    .min(Duration::from_secs(5))
                    .max(Duration::from_millis(100));
                set_timeouts(&s, budget).map_err(|e| err(rank, format!("socket options: {e}")))?;
                let why = match handshake_as_acceptor(&mut s, auth, prev, world) {
                    Ok(Ok(())) => {
                        set_timeouts(&s, timeout)
                            .map_err(|e| err(rank, format!("socket options: {e}")))?;
                        return Ok(s);
                    }
                    Ok(Err(why)) => why,
                    Err(e) => format!("handshake: {e}"),
                };
                tracing::warn!(rank, %peer, reason = %why, "ring connection refused");
                refused.push(format!("{peer}: {why}"));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    let also = if refused.is_empty() {
                        String::new()
                    } else {
                        format!(" (refused: {})", refused.join("; "))
                    };
                    return Err(err(
                        rank,
                        format!("rank {prev} did not connect within {timeout:?}{also}"),
                    ));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(err(rank, format!("accepting rank {prev}: {e}"))),
        }
    }
}

fn header(op: u64, step: u32, len: usize) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..8].copy_from_slice(&op.to_le_bytes());
    h[8..12].copy_from_slice(&step.to_le_bytes());
    h[12..16].copy_from_slice(&(len as u32).to_le_bytes());
    h
}

fn read_frame(
    s: &mut TcpStream,
    op: u64,
    step: u32,
    expected: usize,
) -> std::result::Result<Vec<u8>, String> {
    let mut h = [0u8; 16];
    s.read_exact(&mut h).map_err(describe_read)?;
    let got_op = u64::from_le_bytes(h[..8].try_into().expect("8 bytes"));
    let got_step = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
    let len = u32::from_le_bytes(h[12..16].try_into().expect("4 bytes")) as usize;
    if got_op != op || got_step != step || len != expected {
        return Err(format!(
            "out of step: expected operation #{op} step {step} with {expected} bytes, got #{got_op} \
             step {got_step} with {len} bytes (the ranks reduce different things)"
        ));
    }
    let mut data = vec![0u8; len];
    s.read_exact(&mut data).map_err(describe_read)?;
    Ok(data)
}

fn describe_read(e: std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            "no data within the timeout (peer dead or stalled)".to_string()
        }
        std::io::ErrorKind::UnexpectedEof => "the peer closed the connection".to_string(),
        _ => e.to_string(),
    }
}

trait Elem: Copy + Send + Sync {
    const SIZE: usize;
    fn to_bytes(v: &[Self]) -> Vec<u8>;
    fn from_bytes(b: &[u8]) -> Vec<Self>;
    fn add(self, o: Self) -> Self;
}

impl Elem for f32 {
    const SIZE: usize = 4;
    fn to_bytes(v: &[Self]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }
    fn from_bytes(b: &[u8]) -> Vec<Self> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }
    fn add(self, o: Self) -> Self {
        self + o
    }
}

impl Elem for f64 {
    const SIZE: usize = 8;
    fn to_bytes(v: &[Self]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }
    fn from_bytes(b: &[u8]) -> Vec<Self> {
        b.chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect()
    }
    fn add(self, o: Self) -> Self {
        self + o
    }
}

impl Collective for TcpRing {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_flat(&self, values: &mut Vec<f32>) -> Result<()> {
        self.all_reduce_f32(values)
    }

    fn all_reduce_sum_scalars(&self, values: &mut [f64]) -> Result<()> {
        self.all_reduce_f64(values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each of `ranks` all-reduces `len` ones at once, on its own thread; every one must fail, and
    /// their errors come back by rank.
    fn failing_all_reduces(ranks: &[TcpRing], len: usize) -> Vec<String> {
        std::thread::scope(|s| {
            let hs: Vec<_> = ranks
                .iter()
                .map(|rk| {
                    s.spawn(move || {
                        let mut v = vec![1f32; len];
                        rk.all_reduce_f32(&mut v).unwrap_err().to_string()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    fn ring(world: usize, timeout: Duration, bucket: usize) -> Vec<TcpRing> {
        let listeners: Vec<TcpListener> = (0..world)
            .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let addrs: Vec<String> = listeners
            .iter()
            .map(|l| l.local_addr().unwrap().to_string())
            .collect();
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(r, l)| {
                let addrs = addrs.clone();
                let auth = RingAuth::new(Some([7; 32]));
                std::thread::spawn(move || {
                    TcpRing::connect(r, l, &addrs, timeout, bucket, &auth).unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn ring_sums_equal_plain_sums_for_2_and_3_ranks_and_odd_sizes() {
        for world in [2usize, 3] {
            for (n, bucket) in [(1usize, 4usize), (7, 4), (1000, 64), (4099, 1 << 20)] {
                let ranks = ring(world, Duration::from_secs(10), bucket);
                let inputs: Vec<Vec<f32>> = (0..world)
                    .map(|r| {
                        (0..n)
                            .map(|i| ((i * 7 + r * 13) % 17) as f32 - 8.0)
                            .collect()
                    })
                    .collect();
                let expected: Vec<f32> =
                    (0..n).map(|i| inputs.iter().map(|v| v[i]).sum()).collect();
                let outs: Vec<Vec<f32>> = std::thread::scope(|s| {
                    let hs: Vec<_> = ranks
                        .iter()
                        .zip(inputs.clone())
                        .map(|(rk, mut v)| {
                            s.spawn(move || {
                                rk.all_reduce_f32(&mut v).unwrap();
                                let mut c = [rk.rank() as f64, 1.0];
                                rk.all_reduce_f64(&mut c).unwrap();
                                assert_eq!(c[1], world as f64);
                                v
                            })
                        })
                        .collect();
                    hs.into_iter().map(|h| h.join().unwrap()).collect()
                });
                for o in outs {
                    // Small integers: every summation order is exact.
                    assert_eq!(o, expected, "world {world} n {n}");
                }
            }
        }
    }

    #[test]
    fn a_dead_peer_is_an_error_naming_the_rank_within_the_timeout() {
        let mut ranks = ring(3, Duration::from_millis(500), 1 << 20);
        let dead = ranks.remove(2);
        drop(dead);
        let started = Instant::now();
        let errors = failing_all_reduces(&ranks, 10_000);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        for e in &errors {
            assert!(e.contains("all-reduce #1"), "{e}");
        }
        // Rank 0 receives from the dead rank 2; rank 1 sends to it.
        assert!(
            errors[0].contains("rank 0") && errors[0].contains("from rank 2"),
            "{}",
            errors[0]
        );
        assert!(
            errors[1].contains("rank 1") && errors[1].contains("rank 2"),
            "{}",
            errors[1]
        );
    }

    /// Rank `r` of `addrs`, joining with `key` on its own thread.
    fn join(
        r: usize,
        l: TcpListener,
        addrs: &[String],
        key: [u8; 32],
        timeout: Duration,
    ) -> std::thread::JoinHandle<Result<TcpRing>> {
        let addrs = addrs.to_vec();
        std::thread::spawn(move || {
            TcpRing::connect(r, l, &addrs, timeout, 64, &RingAuth::new(Some(key)))
        })
    }

    #[test]
    fn a_connection_without_the_run_key_is_refused_and_the_ring_still_forms() {
        let listeners: Vec<TcpListener> = (0..2)
            .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let addrs: Vec<String> = (listeners.iter())
            .map(|l| l.local_addr().unwrap().to_string())
            .collect();
        // Before rank 0 connects to rank 1, two strangers do: one claiming to be rank 0 with
        // another key, one that says nothing and goes away.
        let mut forger = TcpStream::connect(&addrs[1]).unwrap();
        forger
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let silent = TcpStream::connect(&addrs[1]).unwrap();
        drop(silent);
        let mut listeners = listeners.into_iter();
        let (l0, l1) = (listeners.next().unwrap(), listeners.next().unwrap());
        let timeout = Duration::from_secs(20);
        let rank1 = join(1, l1, &addrs, [7; 32], timeout);
        let forged = handshake_as_connector(&mut forger, &RingAuth::new(Some([9; 32])), 0, 2);
        assert!(
            forged
                .unwrap()
                .unwrap_err()
                .contains("failed the ring's authentication"),
            "the forger cannot authenticate rank 1 either"
        );
        drop(forger);
        let rank0 = join(0, l0, &addrs, [7; 32], timeout);
        let rings = [
            rank0.join().unwrap().unwrap(),
            rank1.join().unwrap().unwrap(),
        ];
        let sums: Vec<Vec<f32>> = std::thread::scope(|s| {
            let hs: Vec<_> = (rings.iter().enumerate())
                .map(|(r, ring)| {
                    s.spawn(move || {
                        let mut v = vec![r as f32 + 1.0; 5];
                        ring.all_reduce_f32(&mut v).unwrap();
                        v
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(sums, [vec![3.0; 5], vec![3.0; 5]]);
    }

    #[test]
    fn ranks_with_different_keys_never_form_a_ring() {
        let listeners: Vec<TcpListener> = (0..2)
            .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let addrs: Vec<String> = (listeners.iter())
            .map(|l| l.local_addr().unwrap().to_string())
            .collect();
        let timeout = Duration::from_secs(2);
        let mut listeners = listeners.into_iter();
        let rank0 = join(0, listeners.next().unwrap(), &addrs, [1; 32], timeout);
        let rank1 = join(1, listeners.next().unwrap(), &addrs, [2; 32], timeout);
        for (r, h) in [(0, rank0), (1, rank1)] {
            let e = h.join().unwrap().unwrap_err().to_string();
            assert!(
                e.contains(&format!("rank {r}")) && e.contains("authentication"),
                "rank {r}: {e}"
            );
        }
    }

    #[test]
    fn a_stalled_peer_times_out_instead_of_hanging() {
        let ranks = ring(3, Duration::from_millis(400), 1 << 20);
        let started = Instant::now();
        // Rank 2 is alive but never joins the operation.
        let errors = failing_all_reduces(&ranks[..2], 1000);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        assert!(
            errors[0].contains("from rank 2") && errors[0].contains("within the timeout"),
            "{}",
            errors[0]
        );
        assert!(errors[1].contains("rank 1:"), "{}", errors[1]);
        drop(ranks);
    }

    #[test]
    fn ranks_reducing_different_things_fail_loudly() {
        let ranks = ring(2, Duration::from_secs(5), 1 << 20);
        let errors: Vec<bool> = std::thread::scope(|s| {
            let hs: Vec<_> = ranks
                .iter()
                .map(|rk| {
                    s.spawn(move || {
                        let mut v = vec![1f32; 10 + rk.rank() * 5];
                        rk.all_reduce_f32(&mut v)
                            .is_err_and(|e| e.to_string().contains("out of step"))
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(errors.iter().any(|&e| e), "{errors:?}");
    }
}
