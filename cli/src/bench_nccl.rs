//! `ril bench nccl`: the GPU check for a lent machine. A world-size-1 NCCL communicator does the
//! learner's bucketed all-reduce on device buffers (results checked, bandwidth measured), then
//! the error path: a communicator of 2 ranks with a made-up id and no peer must fail within the
//! timeout instead of hanging. Needs a build with `--features nccl` (see tools/gpu-check.sh).

#[derive(Debug, clap::Args)]
pub struct NcclBenchArgs {
    /// Buffer sizes in MB (f32).
    #[arg(long, value_delimiter = ',', default_value = "1,10,100")]
    pub sizes_mb: Vec<usize>,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    pub device: usize,
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
    /// Timeout for the deliberately broken communicator (seconds).
    #[arg(long, default_value_t = 10)]
    pub bad_timeout_s: u64,
}

#[cfg(feature = "nccl")]
pub fn run(args: &NcclBenchArgs) -> anyhow::Result<()> {
    use std::time::{Duration, Instant};

    use ril_learner::collective::Collective;
    use ril_learner::nccl::{ID_BYTES, NcclCollective, new_unique_id};

    ril_learner::gpu::nccl_available().map_err(|e| anyhow::anyhow!("{e}"))?;
    let id = new_unique_id()?;
    let bucket = 4 << 20;
    let c = NcclCollective::connect(0, 1, args.device, &id, Duration::from_secs(60), bucket)?;
    println!(
        "| MB | all-reduce (median) | GB/s (host->device->host included) | of which host flatten + write-back | values checked |"
    );
    println!("|---:|---:|---:|---:|---|");
    for &mb in &args.sizes_mb {
        let n = (mb << 20) / 4;
        let dims = [n];
        let mut times = Vec::new();
        let mut host_times = Vec::new();
        for rep in 0..=args.reps {
            let data: Vec<f32> = (0..n).map(|i| (i % 1000) as f32 * 0.5).collect();
            let t = candle_core::Tensor::from_vec(data, &dims[..], &candle_core::Device::Cpu)?;
            let mut g = ril_model::optim::Gradients::default();
            g.grads.insert("x".into(), t);
            // The host-side part alone: flatten the gradients and write them back.
            let start = Instant::now();
            let flat = ril_learner::collective::FlatGradients::new(&g)?;
            flat.write_back(&mut g)?;
            let host_secs = start.elapsed().as_secs_f64();
            let start = Instant::now();
            c.all_reduce_sum(&mut g)?;
            let secs = start.elapsed().as_secs_f64();
            let out = g.grads["x"].to_vec1::<f32>()?;
            // World size 1: the sum is the input.
            let ok = out
                .iter()
                .enumerate()
                .all(|(i, &v)| v == (i % 1000) as f32 * 0.5);
            anyhow::ensure!(ok, "all-reduce of {mb} MB returned wrong values");
            if rep > 0 {
                times.push(secs);
                host_times.push(host_secs);
            }
        }
        times.sort_by(f64::total_cmp);
        host_times.sort_by(f64::total_cmp);
        let secs = times[times.len() / 2];
        println!(
            "| {mb} | {:.4} s | {:.2} | {:.4} s | yes |",
            secs,
            (mb << 20) as f64 / secs / 1e9,
            host_times[host_times.len() / 2]
        );
    }
    let mut scalars = [1.5f64, 2.0];
    c.all_reduce_sum_scalars(&mut scalars)?;
    anyhow::ensure!(
        scalars == [1.5, 2.0],
        "scalar all-reduce returned {scalars:?}"
    );
    println!("scalars: ok");

    // The error path: rank 0 of 2 with an id nobody else has; no peer will ever join.
    let bad = vec![7u8; ID_BYTES];
    let started = Instant::now();
    match NcclCollective::connect(
        0,
        2,
        args.device,
        &bad,
        Duration::from_secs(args.bad_timeout_s),
        bucket,
    ) {
        Ok(_) => anyhow::bail!("a 2-rank communicator formed without its second rank"),
        Err(e) => println!(
            "bad id / missing peer: refused in {:.1} s: {e}",
            started.elapsed().as_secs_f64()
        ),
    }
    Ok(())
}

#[cfg(not(feature = "nccl"))]
pub fn run(_args: &NcclBenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("this ril was built without NCCL: rebuild with `--features nccl`")
}
