//! `ril bench allreduce`: the CPU ring collective's bandwidth between ranks on loopback, against
//! a plain memcpy of the same size (the ceiling on one machine). Ranks run as threads of this
//! process, each with its own sockets, exactly as separate learner processes would use them.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use ril_learner::ring::TcpRing;

#[derive(Debug, clap::Args)]
pub struct AllReduceBenchArgs {
    /// Buffer sizes in MB (f32 values).
    #[arg(long, value_delimiter = ',', default_value = "1,10,100")]
    pub sizes_mb: Vec<usize>,
    #[arg(long, default_value_t = 2)]
    pub ranks: usize,
    /// Timed repetitions per size (after one warm-up).
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
    /// Ring bucket size in MB.
    #[arg(long, default_value_t = 16)]
    pub bucket_mb: usize,
}

pub fn run(args: &AllReduceBenchArgs) -> anyhow::Result<()> {
    let world = args.ranks.max(2);
    let listeners: Vec<TcpListener> = (0..world)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()?;
    let addrs: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.to_string()))
        .collect::<Result<_, _>>()?;
    let bucket = (args.bucket_mb << 20) / 4;
    let rings: Vec<TcpRing> = std::thread::scope(|s| {
        let hs: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(r, l)| {
                let addrs = addrs.clone();
                s.spawn(move || {
                    // Authenticated, as in a run, so the handshake is in the figures.
                    let auth = ril_learner::ring::RingAuth::new(Some([1; 32]));
                    TcpRing::connect(r, l, &addrs, Duration::from_secs(60), bucket, &auth)
                        .map_err(anyhow::Error::from)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("ring thread"))
            .collect::<Result<Vec<_>, _>>()
    })?;
    println!(
        "| MB | ranks | all-reduce (s) | algorithm GB/s | bus GB/s | memcpy GB/s | bus / memcpy |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for &mb in &args.sizes_mb {
        let n = (mb << 20) / 4;
        let mut bufs: Vec<Vec<f32>> = (0..world).map(|r| vec![r as f32; n]).collect();
        let mut times = Vec::new();
        for rep in 0..=args.reps {
            let t = std::thread::scope(|s| {
                let hs: Vec<_> = rings
                    .iter()
                    .zip(bufs.iter_mut())
                    .map(|(ring, buf)| {
                        s.spawn(move || {
                            let t = Instant::now();
                            ring.all_reduce_f32(buf)
                                .map(|_| t.elapsed())
                                .map_err(anyhow::Error::from)
                        })
                    })
                    .collect();
                hs.into_iter()
                    .map(|h| h.join().expect("rank thread"))
                    .collect::<Result<Vec<_>, _>>()
            })?;
            if rep > 0 {
                times.push(t.into_iter().max().unwrap_or_default().as_secs_f64());
            }
        }
        times.sort_by(f64::total_cmp);
        let secs = times[times.len() / 2];
        // memcpy of the same buffer, median of the same number of repetitions.
        let src = vec![1f32; n];
        let mut dst = vec![0f32; n];
        let mut copies = Vec::new();
        for _ in 0..=args.reps {
            let t = Instant::now();
            dst.copy_from_slice(std::hint::black_box(&src));
            std::hint::black_box(&dst);
            copies.push(t.elapsed().as_secs_f64());
        }
        copies.sort_by(f64::total_cmp);
        let copy = copies[copies.len() / 2];
        let bytes = (n * 4) as f64;
        let algo = bytes / secs / 1e9;
        let bus = algo * 2.0 * (world - 1) as f64 / world as f64;
        let mem = bytes / copy / 1e9;
        println!(
            "| {mb} | {world} | {secs:.4} | {algo:.2} | {bus:.2} | {mem:.2} | {:.3} |",
            bus / mem
        );
    }
    Ok(())
}
