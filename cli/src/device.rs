//! `--device cpu | cuda | cuda:N`.

use anyhow::{Context, bail};
use candle_core::Device;

pub fn parse(spec: &str) -> anyhow::Result<Device> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        "cuda" => cuda(0),
        s if s.starts_with("cuda:") => {
            let n: usize = s[5..]
                .parse()
                .with_context(|| format!("--device {s:?}: the GPU ordinal must be a number"))?;
            cuda(n)
        }
        s => bail!("--device {s:?}: expected cpu, cuda or cuda:N"),
    }
}

fn cuda(ordinal: usize) -> anyhow::Result<Device> {
    if !candle_core::utils::cuda_is_available() {
        bail!(
            "--device cuda:{ordinal}: this `ril` was built without CUDA support (rebuild with `--features cuda`)"
        );
    }
    Device::new_cuda(ordinal)
        .with_context(|| format!("--device cuda:{ordinal}: cannot open the GPU"))
}
