//! How learner ranks combine their work: every rank computes gradients (and loss statistics) on
//! its shard of an iteration's groups, the collective sums them across ranks, and every rank then
//! takes the same optimizer step.
//!
//! [`SingleRank`] is world size 1 (identity); the CPU ring (`ring::TcpRing`) and the NCCL one
//! (feature `nccl`) implement the same trait. [`verify_identical_weights`] checks the ranks
//! still agree.

use ril_model::optim::Gradients;

use crate::error::Result;

/// A sum all-reduce across the learner ranks.
///
/// Contract for implementations: every rank calls the methods in the same order with the same
/// gradient names and shapes (a rank whose shard produced no gradient for a parameter passes
/// zeros), and after the call every rank holds the element-wise sum.
pub trait Collective: Send + std::fmt::Debug {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Sums a flat f32 buffer across ranks, in place (every rank passes the same length).
    fn all_reduce_flat(&self, values: &mut Vec<f32>) -> Result<()>;
    /// Sums scalars (loss terms, token and group counts) across ranks, in place.
    fn all_reduce_sum_scalars(&self, values: &mut [f64]) -> Result<()>;
    /// Sums `grads` across ranks, in place. By default through the host
    /// ([`all_reduce_sum_through_host`]); the NCCL collective keeps CUDA gradients on their
    /// device instead.
    fn all_reduce_sum(&self, grads: &mut Gradients) -> Result<()> {
        all_reduce_sum_through_host(self, grads)
    }
}

/// The host path of [`Collective::all_reduce_sum`]: `grads` flattened into one host buffer (the
/// ranks' layouts checked to agree first), reduced with [`Collective::all_reduce_flat`], written
/// back onto each gradient's device.
pub fn all_reduce_sum_through_host<C: Collective + ?Sized>(
    collective: &C,
    grads: &mut Gradients,
) -> Result<()> {
    let mut flat = FlatGradients::new(grads)?;
    flat.check_same_layout(collective)?;
    collective.all_reduce_flat(&mut flat.values)?;
    flat.write_back(grads)
}

/// The element ranges `0..total` is reduced in, `bucket_elems` at a time (the last one shorter):
/// every rank cuts the same buffer the same way, so the ranks' bucket calls pair up.
pub fn bucket_ranges(
    total: usize,
    bucket_elems: usize,
) -> impl Iterator<Item = std::ops::Range<usize>> {
    let bucket_elems = bucket_elems.max(1);
    (0..total)
        .step_by(bucket_elems)
        .map(move |start| start..(start + bucket_elems).min(total))
}

/// Sums (value count, tensor count) across ranks: ranks whose gradients differ in layout fail
/// here, naming this rank's layout, instead of reducing mismatched buffers.
fn check_layout_across_ranks<C: Collective + ?Sized>(
    collective: &C,
    n_values: usize,
    n_tensors: usize,
) -> Result<()> {
    let mine = [n_values as f64, n_tensors as f64];
    let mut sum = mine;
    collective.all_reduce_sum_scalars(&mut sum)?;
    let world = collective.world_size() as f64;
    if sum[0] != mine[0] * world || sum[1] != mine[1] * world {
        return Err(crate::error::LearnerError::Collective(format!(
            "rank {}: gradient layouts differ across ranks: this rank has {} tensors / {} values",
            collective.rank(),
            mine[1],
            mine[0]
        )));
    }
    Ok(())
}

/// One rank: the sum over ranks is the rank's own value.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleRank;

impl Collective for SingleRank {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_flat(&self, _values: &mut Vec<f32>) -> Result<()> {
        Ok(())
    }
    /// Nothing to sum: no flattening either.
    fn all_reduce_sum(&self, _grads: &mut Gradients) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_scalars(&self, _values: &mut [f64]) -> Result<()> {
        Ok(())
    }
}

/// Checks that every rank holds the same weights: rank r writes its weights' SHA-256 (one byte
/// per value) into slot r of a `world_size * 32` vector, zeros elsewhere; after the sum every
/// rank sees every rank's digest and compares them with rank 0's. A mismatch is an error naming
/// the ranks that differ from rank 0 (on every rank alike).
pub fn verify_identical_weights(collective: &dyn Collective, sha256: &[u8; 32]) -> Result<()> {
    let world = collective.world_size();
    if world <= 1 {
        return Ok(());
    }
    let rank = collective.rank();
    let mut slots = vec![0.0f64; world * 32];
    for (slot, b) in slots[rank * 32..(rank + 1) * 32].iter_mut().zip(sha256) {
        *slot = f64::from(*b);
    }
    collective.all_reduce_sum_scalars(&mut slots)?;
    let digest = |r: usize| -> String {
        slots[r * 32..(r + 1) * 32]
            .iter()
            .map(|v| format!("{:02x}", *v as u8))
            .collect()
    };
    let reference = digest(0);
    let differing: Vec<usize> = (1..world).filter(|&r| digest(r) != reference).collect();
    if differing.is_empty() {
        return Ok(());
    }
    let detail: Vec<String> = differing
        .iter()
        .map(|&r| format!("rank {r} holds {}", digest(r)))
        .collect();
    Err(crate::error::LearnerError::Collective(format!(
        "the learner ranks' weights diverged: rank 0 holds {reference}, {} (checked on rank \
         {rank})",
        detail.join(", ")
    )))
}

/// Gradients as one f32 buffer in name order (what a collective reduces), and the layout to put
/// them back. Every collective implementation flattens through this.
#[derive(Debug)]
pub struct FlatGradients {
    pub values: Vec<f32>,
    /// (name, dims, device, offset, length) per tensor.
    layout: Vec<(String, Vec<usize>, candle_core::Device, usize, usize)>,
}

impl FlatGradients {
    pub fn new(grads: &Gradients) -> Result<Self> {
        // Sized once: growing a multi-GB buffer by doubling copies it again and again.
        let total: usize = grads.grads.values().map(|g| g.elem_count()).sum();
        let mut values: Vec<f32> = Vec::with_capacity(total);
        let mut layout = Vec::with_capacity(grads.grads.len());
        for (name, g) in &grads.grads {
            let v = g.flatten_all()?.to_vec1::<f32>()?;
            layout.push((
                name.clone(),
                g.dims().to_vec(),
                g.device().clone(),
                values.len(),
                v.len(),
            ));
            values.extend(v);
        }
        Ok(Self { values, layout })
    }

    /// Sums (value count, tensor count) across ranks first: ranks whose gradients differ in
    /// layout fail here, naming this rank's layout, instead of reducing mismatched buffers.
    pub fn check_same_layout<C: Collective + ?Sized>(&self, collective: &C) -> Result<()> {
        check_layout_across_ranks(collective, self.values.len(), self.layout.len())
    }

    /// Writes `values` (after the reduction) back into `grads`, tensor by tensor.
    pub fn write_back(self, grads: &mut Gradients) -> Result<()> {
        for (name, dims, device, start, len) in self.layout {
            let t = candle_core::Tensor::from_slice(
                &self.values[start..start + len],
                dims.as_slice(),
                &device,
            )?;
            grads.grads.insert(name, t);
        }
        Ok(())
    }
}

/// Gradients as one contiguous f32 tensor on their own device, in name order: one `Tensor::cat`
/// of the flattened gradients (on a GPU, device-to-device copies into one fresh allocation; no
/// host copy), and the layout to cut it back into gradients. The device path of the NCCL
/// collective reduces [`DeviceFlatGradients::flat`] in place; the code is device-generic, so the
/// layout is tested on CPU tensors.
#[derive(Debug)]
pub struct DeviceFlatGradients {
    /// Owned by this value alone (a fresh allocation), so reducing it in place changes no
    /// other tensor.
    pub flat: candle_core::Tensor,
    /// (name, dims, dtype, offset, length) per tensor.
    layout: Vec<(String, Vec<usize>, candle_core::DType, usize, usize)>,
}

impl DeviceFlatGradients {
    /// Flattens `grads` (all on one device; empty gradients are refused, the host path handles
    /// them) into one f32 tensor on that device.
    pub fn new(grads: &Gradients) -> Result<Self> {
        let mut parts = Vec::with_capacity(grads.grads.len());
        let mut layout = Vec::with_capacity(grads.grads.len());
        let mut offset = 0;
        for (name, g) in &grads.grads {
            let n = g.elem_count();
            layout.push((name.clone(), g.dims().to_vec(), g.dtype(), offset, n));
            parts.push(g.flatten_all()?.to_dtype(candle_core::DType::F32)?);
            offset += n;
        }
        let flat = match parts.as_slice() {
            [] => {
                return Err(crate::error::LearnerError::Collective(
                    "device all-reduce: no gradients to flatten".into(),
                ));
            }
            // `cat` of one tensor returns that tensor (shared storage): copy, so the in-place
            // reduction writes into a buffer nobody else holds.
            [one] => one.copy()?,
            many => candle_core::Tensor::cat(many, 0)?,
        };
        Ok(Self { flat, layout })
    }

    /// The number of f32 values in [`DeviceFlatGradients::flat`].
    pub fn len(&self) -> usize {
        self.flat.elem_count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// As [`FlatGradients::check_same_layout`].
    pub fn check_same_layout<C: Collective + ?Sized>(&self, collective: &C) -> Result<()> {
        check_layout_across_ranks(collective, self.len(), self.layout.len())
    }

    /// Cuts the (reduced) flat tensor back into `grads` on the device: each gradient a narrow +
    /// reshape view of it (no copy), cast back to its dtype.
    pub fn write_back(self, grads: &mut Gradients) -> Result<()> {
        for (name, dims, dtype, start, len) in self.layout {
            let t = self
                .flat
                .narrow(0, start, len)?
                .reshape(dims.as_slice())?
                .to_dtype(dtype)?;
            grads.grads.insert(name, t);
        }
        Ok(())
    }
}

/// The one device every gradient lives on, when that is not the CPU (the device path); `None`
/// for CPU gradients, none at all, or gradients spread over several devices (the host path).
pub fn accelerator_device(grads: &Gradients) -> Option<candle_core::Device> {
    let mut devices = grads.grads.values().map(|g| g.device());
    let first = devices.next()?;
    if first.is_cpu() || !devices.all(|d| d.same_device(first)) {
        return None;
    }
    Some(first.clone())
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::*;

    fn grads(named: &[(&str, Tensor)]) -> Gradients {
        let mut g = Gradients::default();
        for (name, t) in named {
            g.grads.insert((*name).to_string(), t.clone());
        }
        g
    }

    #[test]
    fn buckets_cover_the_buffer_once_in_order() {
        // (total, bucket size, the (start, end) of each bucket)
        let cases: [(usize, usize, &[_]); 5] = [
            (0, 4, &[]),
            (3, 4, &[(0, 3)]),
            (8, 4, &[(0, 4), (4, 8)]),
            (10, 4, &[(0, 4), (4, 8), (8, 10)]),
            (2, 0, &[(0, 1), (1, 2)]),
        ];
        for (total, bucket, want) in cases {
            let got: Vec<_> = bucket_ranges(total, bucket)
                .map(|r| (r.start, r.end))
                .collect();
            assert_eq!(got, want, "total {total}, bucket {bucket}");
        }
    }

    /// The device path's flatten -> reduce -> write back, on CPU tensors: every
    /// gradient comes back under its name, shape and dtype with the reduced values, and the
    /// inputs are untouched (the flat buffer is a copy, also with a single gradient).
    #[test]
    fn device_flatten_reduce_and_write_back_keep_the_layout() -> Result<()> {
        let dev = Device::Cpu;
        let a = Tensor::arange(0f32, 6.0, &dev)?.reshape((2, 3))?;
        let b = Tensor::new(&[[7f32], [8.0]], &dev)?.t()?; // not contiguous
        let c = Tensor::new(&[9f32, 10.0], &dev)?.to_dtype(DType::F64)?;
        for named in [
            vec![("a", a.clone()), ("b", b.clone()), ("c", c.clone())],
            vec![("a", a.clone())],
        ] {
            let mut g = grads(&named);
            let mut flat = DeviceFlatGradients::new(&g)?;
            assert_eq!(
                flat.len(),
                named.iter().map(|(_, t)| t.elem_count()).sum::<usize>()
            );
            // The reduction stands in as doubling (what two identical ranks would sum to).
            flat.flat = flat.flat.affine(2.0, 0.0)?;
            flat.write_back(&mut g)?;
            assert_eq!(g.grads.len(), named.len());
            for (name, original) in &named {
                let back = &g.grads[*name];
                assert_eq!(back.dims(), original.dims(), "{name}");
                assert_eq!(back.dtype(), original.dtype(), "{name}");
                let want = original.to_dtype(DType::F32)?.affine(2.0, 0.0)?;
                let diff = (back.to_dtype(DType::F32)? - want)?.abs()?.max_all()?;
                assert_eq!(diff.to_scalar::<f32>()?, 0.0, "{name}");
            }
        }
        assert_eq!(a.flatten_all()?.to_vec1::<f32>()?, [0., 1., 2., 3., 4., 5.]);
        Ok(())
    }

    /// The device path is taken only for gradients all on one accelerator: CPU gradients and
    /// none at all go through the host; an empty set is refused by the device flattening.
    #[test]
    fn cpu_gradients_take_the_host_path() -> Result<()> {
        let t = Tensor::zeros(3, DType::F32, &Device::Cpu)?;
        assert!(accelerator_device(&grads(&[("x", t)])).is_none());
        assert!(accelerator_device(&Gradients::default()).is_none());
        assert!(DeviceFlatGradients::new(&Gradients::default()).is_err());
        Ok(())
    }

    /// The host path (flatten to a host buffer, reduce, write back), called directly (one rank
    /// would skip it): the gradients come back identical, on their device.
    #[test]
    fn the_host_path_writes_back_what_it_flattened() -> Result<()> {
        let a = Tensor::arange(0f32, 6.0, &Device::Cpu)?.reshape((3, 2))?;
        let mut g = grads(&[("a", a.clone())]);
        all_reduce_sum_through_host(&SingleRank, &mut g)?;
        assert_eq!(g.grads["a"].to_vec2::<f32>()?, a.to_vec2::<f32>()?);
        assert!(g.grads["a"].device().is_cpu());
        Ok(())
    }
}
