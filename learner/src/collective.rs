//! How learner ranks combine their work: every rank computes gradients (and loss statistics) on
//! its shard of an iteration's groups, the collective sums them across ranks, and every rank then
//! takes the same optimizer step.
//!
//! Today only [`SingleRank`] exists (world size 1, identity). A CPU collective for development and
//! the NCCL one (feature `nccl`) implement the same trait.

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
    /// Sums `grads` across ranks, in place.
    fn all_reduce_sum(&self, grads: &mut Gradients) -> Result<()>;
    /// Sums scalars (loss terms, token and group counts) across ranks, in place.
    fn all_reduce_sum_scalars(&self, values: &mut [f64]) -> Result<()>;
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
    fn all_reduce_sum(&self, _grads: &mut Gradients) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_scalars(&self, _values: &mut [f64]) -> Result<()> {
        Ok(())
    }
}
