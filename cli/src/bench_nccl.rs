//! `ril bench nccl`: the GPU check for a lent machine. A world-size-1 NCCL communicator does the
//! learner's bucketed all-reduce of gradients (results checked, bandwidth measured) on two
//! paths: `host` (CPU tensors, flattened on the host and staged through pinned memory, as a CPU
//! learner's) and `device` (tensors on the GPU, flattened there and reduced in place; needs
//! `--features cuda`). Then the error path: a communicator of 2 ranks with a made-up id and no
//! peer must fail within the timeout instead of hanging. Needs a build with `--features nccl`
//! (see tools/gpu-check.sh).

/// The paths measured unless `--paths` says otherwise: the device path only where it exists.
#[cfg(feature = "cuda")]
const DEFAULT_PATHS: &str = "host,device";
#[cfg(not(feature = "cuda"))]
const DEFAULT_PATHS: &str = "host";

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
    /// Gradient paths to measure: `host` (CPU tensors through pinned host memory) and/or
    /// `device` (tensors on the GPU, reduced in place; needs `--features cuda`).
    #[arg(long, value_delimiter = ',', default_value = DEFAULT_PATHS)]
    pub paths: Vec<GradientPath>,
    /// How many gradient tensors each buffer is split into (a model has many parameters; the
    /// flattening and write-back work per tensor).
    #[arg(long, default_value_t = 16)]
    pub tensors: usize,
    /// Timeout for the deliberately broken communicator (seconds).
    #[arg(long, default_value_t = 10)]
    pub bad_timeout_s: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GradientPath {
    Host,
    Device,
}

/// `n` f32 values split into `tensors` gradients (names in order), with the values each should
/// hold after a world-size-1 sum (the same). Tested in every build; used where NCCL is.
#[cfg_attr(not(feature = "nccl"), allow(dead_code))]
fn gradients(
    n: usize,
    tensors: usize,
    device: &candle_core::Device,
) -> anyhow::Result<(ril_model::optim::Gradients, Vec<Vec<f32>>)> {
    let tensors = tensors.clamp(1, n.max(1));
    let mut grads = ril_model::optim::Gradients::default();
    let mut expected = Vec::with_capacity(tensors);
    for (i, range) in ril_learner::collective::bucket_ranges(n, n.div_ceil(tensors)).enumerate() {
        let values: Vec<f32> = range.map(|j| (j % 1000) as f32 * 0.5).collect();
        let t = candle_core::Tensor::from_slice(&values, values.len(), device)?;
        grads.grads.insert(format!("g{i:05}"), t);
        expected.push(values);
    }
    Ok((grads, expected))
}

/// One size on one path: the median of `reps` timed runs (after a warm-up) of the whole
/// `all_reduce_sum`, and of its flatten + write-back alone (the part outside the all-reduce).
#[cfg(feature = "nccl")]
struct Measured {
    seconds: f64,
    outside_seconds: f64,
}

#[cfg(feature = "nccl")]
fn measure(
    c: &ril_learner::nccl::NcclCollective,
    path: GradientPath,
    mb: usize,
    args: &NcclBenchArgs,
) -> anyhow::Result<Measured> {
    use std::time::Instant;

    use ril_learner::collective::Collective;

    let device = match path {
        GradientPath::Host => candle_core::Device::Cpu,
        GradientPath::Device => crate::device::parse(&format!("cuda:{}", c.ordinal()))?,
    };
    let n = (mb << 20) / 4;
    let (mut times, mut outside_times) = (Vec::new(), Vec::new());
    for rep in 0..=args.reps {
        let (mut g, expected) = gradients(n, args.tensors, &device)?;
        device.synchronize()?;
        let start = Instant::now();
        flatten_and_write_back(path, &mut g)?;
        device.synchronize()?;
        let outside = start.elapsed().as_secs_f64();
        let start = Instant::now();
        c.all_reduce_sum(&mut g)?;
        device.synchronize()?;
        let secs = start.elapsed().as_secs_f64();
        // World size 1: the sum is the input.
        for ((name, t), want) in g.grads.iter().zip(&expected) {
            anyhow::ensure!(
                t.to_vec1::<f32>()? == *want,
                "{path:?} all-reduce of {mb} MB returned wrong values in {name}"
            );
        }
        if rep > 0 {
            times.push(secs);
            outside_times.push(outside);
        }
    }
    Ok(Measured {
        seconds: median(&mut times),
        outside_seconds: median(&mut outside_times),
    })
}

/// The part of a path's `all_reduce_sum` outside the all-reduce itself: flattening the
/// gradients into one buffer and cutting it back into gradients.
#[cfg(feature = "nccl")]
fn flatten_and_write_back(
    path: GradientPath,
    g: &mut ril_model::optim::Gradients,
) -> anyhow::Result<()> {
    use ril_learner::collective::{DeviceFlatGradients, FlatGradients};
    match path {
        GradientPath::Host => FlatGradients::new(g)?.write_back(g)?,
        GradientPath::Device => DeviceFlatGradients::new(g)?.write_back(g)?,
    }
    Ok(())
}

#[cfg(feature = "nccl")]
fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
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
        "gradients split into {} tensors; `outside` = flatten + write-back alone (host: to and \
         from a host buffer; device: cat + narrow on the GPU)",
        args.tensors
    );
    println!("| path | MB | all_reduce_sum (median) | GB/s | outside the all-reduce | share |");
    println!("|---|---:|---:|---:|---:|---:|");
    for &path in &args.paths {
        for &mb in &args.sizes_mb {
            let m = measure(&c, path, mb, args)?;
            println!(
                "| {} | {mb} | {:.4} s | {:.2} | {:.4} s | {:.0}% |",
                format!("{path:?}").to_lowercase(),
                m.seconds,
                (mb << 20) as f64 / m.seconds / 1e9,
                m.outside_seconds,
                100.0 * m.outside_seconds / m.seconds
            );
        }
    }
    println!("values checked: yes (every row)");
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The benchmark's gradients cover the buffer exactly once, in name order, whatever the
    /// split (more tensors than values included).
    #[test]
    fn gradients_split_the_buffer_in_order() -> anyhow::Result<()> {
        for (n, tensors) in [(10, 3), (4, 16), (1 << 10, 16), (5, 1)] {
            let (g, expected) = gradients(n, tensors, &candle_core::Device::Cpu)?;
            let flat: Vec<f32> = g
                .grads
                .values()
                .map(|t| t.to_vec1::<f32>())
                .collect::<Result<Vec<_>, _>>()?
                .concat();
            let want: Vec<f32> = (0..n).map(|j| (j % 1000) as f32 * 0.5).collect();
            assert_eq!(flat, want, "n {n}, tensors {tensors}");
            assert_eq!(expected.concat(), want);
        }
        Ok(())
    }
}
