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
    /// Sums `grads` across ranks, in place: flattened into one buffer (the ranks' layouts
    /// checked to agree first), reduced with [`Collective::all_reduce_flat`], written back.
    fn all_reduce_sum(&self, grads: &mut Gradients) -> Result<()> {
        let mut flat = FlatGradients::new(grads)?;
        flat.check_same_layout(self)?;
        self.all_reduce_flat(&mut flat.values)?;
        flat.write_back(grads)
    }
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
        let mine = [self.values.len() as f64, self.layout.len() as f64];
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
