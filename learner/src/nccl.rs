//! The GPU collective (feature `nccl`): gradients all-reduced through NCCL (`cudarc::nccl`).
//!
//! cudarc's `Comm` is not `Send`, and NCCL gives no deadline of its own: a dead peer leaves the
//! all-reduce kernel spinning forever. So one worker thread owns the communicator, and every
//! operation is a request to it; the worker enqueues the work, records an event and polls it
//! until it completes or the timeout passes. On a timeout the worker drops the communicator
//! (cudarc's `Drop` is `ncclCommAbort`), which ends the kernel; the operation and every later
//! one fail with an error naming the rank, the operation and the timeout, and the learner stops
//! (restart the ranks to resume from the last checkpoint). The unique id is made by rank 0 and
//! handed out by the coordinator's rendezvous (`JoinLearner.collective_id`).
//!
//! Two paths for the gradients:
//! - **Device-resident** (feature `cuda`, gradients all on this rank's CUDA device): the calling
//!   thread flattens them on the GPU (`DeviceFlatGradients`: one `Tensor::cat`, device-to-device
//!   copies), records an event on candle's stream and sends the worker a handle to the
//!   flat tensor (a cheap `Tensor` clone, no data) and the event. The worker makes its stream
//!   wait for the event, all-reduces the tensor's own CUDA buffer in place bucket by bucket
//!   (`InplaceOp1`, so candle hands out the `&mut CudaSlice` safely), polls its completion
//!   event under the deadline and drops its handle before answering; the caller cuts the
//!   buffer back into gradients by narrow + reshape views. No gradient byte crosses to the host.
//! - **Through the host** (CPU gradients, or a build without `cuda`): flattened into a host
//!   `Vec<f32>`, then bucket by bucket through one reused page-locked host buffer and one
//!   device buffer (both allocated at connect): stage, copy to the device, all-reduce, copy
//!   back, wait.
//!
//! Why not the very stream candle uses: candle's `CudaDevice` runs on `CU_STREAM_PER_THREAD`, a
//! handle that names a different stream on every host thread, and the communicator must stay
//! on its worker thread. So the communicator uses the legacy default stream of the same
//! (primary) context, and the ordering with candle's work is explicit: the event recorded by the
//! calling thread on the way in, the completed event polled by the worker on the way out. The
//! legacy stream also serialises with every blocking stream, which orders the host path and the
//! scalars the same way.
//!
//! This module is compile-checked in CI; it runs only where CUDA and NCCL are.

use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, PinnedHostSlice};
use cudarc::nccl::safe::{Comm, Id, ReduceOp};
use ril_model::optim::Gradients;

#[cfg(feature = "cuda")]
use crate::collective::DeviceFlatGradients;
use crate::collective::{Collective, all_reduce_sum_through_host};
use crate::error::{LearnerError, Result};

/// The NCCL unique id's length (bytes shipped through the coordinator).
pub const ID_BYTES: usize = 128;

/// A fresh NCCL unique id (rank 0), as bytes for `JoinLearner.collective_id`.
pub fn new_unique_id() -> Result<Vec<u8>> {
    crate::gpu::nccl_available().map_err(|e| LearnerError::Collective(e.to_string()))?;
    let id = Id::new().map_err(|e| LearnerError::Collective(format!("ncclGetUniqueId: {e:?}")))?;
    Ok(id.internal().iter().map(|&c| c as u8).collect())
}

fn id_from_bytes(bytes: &[u8]) -> Result<Id> {
    if bytes.len() != ID_BYTES {
        return Err(LearnerError::Collective(format!(
            "the NCCL unique id has {} bytes, expected {ID_BYTES} (did rank 0 join with one?)",
            bytes.len()
        )));
    }
    let mut internal = [0 as std::ffi::c_char; ID_BYTES];
    for (d, &b) in internal.iter_mut().zip(bytes) {
        *d = b as std::ffi::c_char;
    }
    Ok(Id::uninit(internal))
}

type Reply<T> = mpsc::Sender<std::result::Result<T, String>>;

enum Request {
    F32(Vec<f32>, Reply<Vec<f32>>),
    F64(Vec<f64>, Reply<Vec<f64>>),
    /// A flat f32 tensor on this rank's GPU to reduce in place, once `ready` has completed.
    #[cfg(feature = "cuda")]
    Device {
        flat: candle_core::Tensor,
        ready: cudarc::driver::CudaEvent,
        reply: Reply<()>,
    },
}

/// A rank of an NCCL communicator, driven by its own worker thread.
#[derive(Debug)]
pub struct NcclCollective {
    rank: usize,
    world: usize,
    /// The CUDA device the communicator is on (device-path gradients must be on it too).
    ordinal: usize,
    timeout: Duration,
    requests: std::sync::Mutex<mpsc::Sender<Request>>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Request")
    }
}

impl NcclCollective {
    /// Joins the communicator on CUDA device `ordinal`. Every rank must call this with the same
    /// `id` (rank 0's) and `world`; NCCL's init blocks until all have.
    pub fn connect(
        rank: usize,
        world: usize,
        ordinal: usize,
        id: &[u8],
        timeout: Duration,
        bucket_elems: usize,
    ) -> Result<Self> {
        crate::gpu::nccl_available().map_err(|e| LearnerError::Collective(e.to_string()))?;
        let id = id_from_bytes(id)?;
        let bucket_elems = bucket_elems.max(1);
        let (tx, rx) = mpsc::channel::<Request>();
        let (ready_tx, ready_rx) = mpsc::channel::<std::result::Result<(), String>>();
        std::thread::Builder::new()
            .name(format!("nccl-rank-{rank}"))
            .spawn(move || {
                worker(
                    rank,
                    world,
                    ordinal,
                    id,
                    timeout,
                    bucket_elems,
                    rx,
                    ready_tx,
                )
            })
            .map_err(|e| {
                LearnerError::Collective(format!("rank {rank}: spawning the NCCL thread: {e}"))
            })?;
        match ready_rx.recv_timeout(timeout) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(LearnerError::Collective(format!("rank {rank}: {e}"))),
            Err(_) => {
                return Err(LearnerError::Collective(format!(
                    "rank {rank}: the NCCL communicator of {world} ranks did not form within \
                     {timeout:?} (a rank missing, or a wrong unique id)"
                )));
            }
        }
        Ok(Self {
            rank,
            world,
            ordinal,
            timeout,
            requests: std::sync::Mutex::new(tx),
        })
    }

    /// The CUDA device ordinal the communicator runs on.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Request) -> Result<T> {
        let (tx, rx) = mpsc::channel();
        self.requests
            .lock()
            .map_err(|_| LearnerError::Collective("poisoned".into()))?
            .send(make(tx))
            .map_err(|_| {
                LearnerError::Collective(format!(
                    "rank {}: the NCCL communicator is gone (aborted after an earlier error)",
                    self.rank
                ))
            })?;
        // The worker enforces the timeout; this bound only guards against a stuck worker.
        rx.recv_timeout(self.timeout * 2 + Duration::from_secs(5))
            .map_err(|_| {
                LearnerError::Collective(format!(
                    "rank {}: the NCCL worker did not answer",
                    self.rank
                ))
            })?
            .map_err(|e| LearnerError::Collective(format!("rank {}: {e}", self.rank)))
    }
}

/// Reused transfer buffers: one bucket of page-locked host memory (DMA straight from it, no
/// driver-side staging of pageable memory) and one bucket on the device.
struct Staging {
    pinned: PinnedHostSlice<f32>,
    dev: CudaSlice<f32>,
}

impl Staging {
    fn new(stream: &Arc<CudaStream>, elems: usize) -> std::result::Result<Self, String> {
        let ctx = stream.context();
        // Default flags: not write-combined, since the host reads the reduced bucket back.
        // SAFETY: cuMemHostAlloc returns uninitialised memory; every bit pattern is a valid
        // f32, and each bucket is written before the device reads it.
        #[allow(unsafe_code)]
        let pinned = unsafe { ctx.alloc_pinned_with_flags::<f32>(elems, 0) }
            .map_err(|e| format!("allocating {elems} pinned host floats: {e:?}"))?;
        let dev = stream
            .alloc_zeros::<f32>(elems)
            .map_err(|e| format!("allocating {elems} device floats: {e:?}"))?;
        Ok(Self { pinned, dev })
    }
}

/// Polls `event`-style completion of everything queued on `stream` until `deadline`.
fn wait(stream: &Arc<CudaStream>, op: u64, timeout: Duration) -> std::result::Result<(), String> {
    let done = stream
        .record_event(None)
        .map_err(|e| format!("all-reduce #{op}: event: {e:?}"))?;
    let deadline = Instant::now() + timeout;
    loop {
        match done.try_is_complete() {
            Ok(true) => return Ok(()),
            Ok(false) if Instant::now() < deadline => std::thread::sleep(Duration::from_micros(50)),
            Ok(false) => {
                return Err(format!(
                    "all-reduce #{op} did not complete within {timeout:?} (a peer rank dead or \
                     stalled); the communicator was aborted"
                ));
            }
            Err(e) => return Err(format!("all-reduce #{op}: {e:?}")),
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn worker(
    rank: usize,
    world: usize,
    ordinal: usize,
    id: Id,
    timeout: Duration,
    bucket_elems: usize,
    rx: mpsc::Receiver<Request>,
    ready: mpsc::Sender<std::result::Result<(), String>>,
) {
    let setup = CudaContext::new(ordinal)
        .map_err(|e| format!("CUDA device {ordinal}: {e:?}"))
        .and_then(|ctx| {
            let stream = ctx.default_stream();
            let staging = Staging::new(&stream, bucket_elems)?;
            Comm::from_rank(stream.clone(), rank, world, id)
                .map(|c| (c, stream, staging))
                .map_err(|e| format!("ncclCommInitRank (rank {rank} of {world}): {e:?}"))
        });
    let (comm, stream, mut staging) = match setup {
        Ok(x) => {
            let _ = ready.send(Ok(()));
            x
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let mut comm = Some(comm);
    let mut op = 0u64;
    while let Ok(req) = rx.recv() {
        op += 1;
        let Some(c) = comm.as_ref() else {
            break;
        };
        let work = Work {
            comm: c,
            stream: &stream,
            op,
            timeout,
            bucket_elems,
        };
        let failed = match req {
            Request::F32(host, reply) => answer(reply, work.through_host(host, &mut staging)),
            Request::F64(host, reply) => answer(reply, work.scalars(&host)),
            #[cfg(feature = "cuda")]
            Request::Device { flat, ready, reply } => {
                let result = work.on_device(&flat, &ready);
                // Only the caller's handle frees the buffer, on the caller's thread.
                drop(flat);
                answer(reply, result)
            }
        };
        if failed {
            // ncclCommAbort: ends a hung kernel; later requests find no communicator.
            drop(comm.take());
            break;
        }
    }
}

/// Sends `result` to the caller; true when it is a failure (the communicator is then aborted).
fn answer<T>(reply: Reply<T>, result: std::result::Result<T, String>) -> bool {
    let failed = result.is_err();
    let _ = reply.send(result);
    failed
}

/// One operation of the worker: the communicator, its stream, the operation's number (for
/// errors), the deadline and the bucket size.
struct Work<'a> {
    comm: &'a Comm,
    stream: &'a Arc<CudaStream>,
    op: u64,
    timeout: Duration,
    bucket_elems: usize,
}

impl Work<'_> {
    /// Gradients from the host: bucket by bucket through the reused pinned and device buffers.
    fn through_host(
        &self,
        mut host: Vec<f32>,
        staging: &mut Staging,
    ) -> std::result::Result<Vec<f32>, String> {
        let op = self.op;
        for chunk in host.chunks_mut(self.bucket_elems) {
            let n = chunk.len();
            let pinned = staging
                .pinned
                .as_mut_slice()
                .map_err(|e| format!("all-reduce #{op}: pinned buffer: {e:?}"))?;
            pinned[..n].copy_from_slice(chunk);
            let mut dev = staging.dev.slice_mut(..n);
            self.stream
                .memcpy_htod(&pinned[..n], &mut dev)
                .map_err(|e| format!("all-reduce #{op}: copy to device: {e:?}"))?;
            self.comm
                .all_reduce_in_place(&mut dev, &ReduceOp::Sum)
                .map_err(|e| format!("all-reduce #{op}: ncclAllReduce: {e:?}"))?;
            self.stream
                .memcpy_dtoh(&dev, &mut pinned[..n])
                .map_err(|e| format!("all-reduce #{op}: copy to host: {e:?}"))?;
            wait(self.stream, op, self.timeout)?;
            chunk.copy_from_slice(&pinned[..n]);
        }
        Ok(host)
    }

    /// Scalars (a few values): straight copies.
    fn scalars(&self, host: &[f64]) -> std::result::Result<Vec<f64>, String> {
        let op = self.op;
        let mut dev = self
            .stream
            .clone_htod(host)
            .map_err(|e| format!("all-reduce #{op}: copy to device: {e:?}"))?;
        self.comm
            .all_reduce_in_place(&mut dev, &ReduceOp::Sum)
            .map_err(|e| format!("all-reduce #{op}: ncclAllReduce: {e:?}"))?;
        wait(self.stream, op, self.timeout)?;
        self.stream
            .clone_dtoh(&dev)
            .map_err(|e| format!("all-reduce #{op}: copy to host: {e:?}"))
    }

    /// A flat tensor on the GPU, reduced in place in its own buffer once `ready` (the caller's
    /// flattening) has completed, then waited for under the deadline.
    #[cfg(feature = "cuda")]
    fn on_device(
        &self,
        flat: &candle_core::Tensor,
        ready: &cudarc::driver::CudaEvent,
    ) -> std::result::Result<(), String> {
        let op = self.op;
        self.stream
            .wait(ready)
            .map_err(|e| format!("all-reduce #{op}: waiting for the flattened gradients: {e:?}"))?;
        flat.inplace_op1(&InPlaceAllReduce { work: self })
            .map_err(|e| format!("all-reduce #{op}: {e}"))?;
        wait(self.stream, op, self.timeout)
    }
}

/// The device path's reduction as a candle in-place op: candle takes the tensor's write lock and
/// hands over its `&mut CudaStorage`, whose buffer NCCL then reduces in place, bucket by bucket.
#[cfg(feature = "cuda")]
struct InPlaceAllReduce<'a> {
    work: &'a Work<'a>,
}

#[cfg(feature = "cuda")]
impl candle_core::InplaceOp1 for InPlaceAllReduce<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce-sum"
    }

    fn cpu_fwd(
        &self,
        _storage: &mut candle_core::CpuStorage,
        _layout: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        // The caller sends only CUDA gradients here; CPU ones take the host path.
        candle_core::bail!("the device all-reduce was given a CPU tensor")
    }

    fn cuda_fwd(
        &self,
        storage: &mut candle_core::CudaStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("the device all-reduce needs a contiguous tensor");
        };
        let slice = storage.as_cuda_slice_mut::<f32>()?;
        for bucket in crate::collective::bucket_ranges(end - start, self.work.bucket_elems) {
            let mut view = slice.slice_mut(start + bucket.start..start + bucket.end);
            self.work
                .comm
                .all_reduce_in_place(&mut view, &ReduceOp::Sum)
                .map_err(|e| candle_core::Error::Msg(format!("ncclAllReduce: {e:?}")))?;
        }
        Ok(())
    }
}

impl NcclCollective {
    /// The device path (see the module doc): `grads` all on `device`, a CUDA device.
    #[cfg(feature = "cuda")]
    fn all_reduce_sum_on_device(
        &self,
        grads: &mut Gradients,
        device: &candle_core::Device,
    ) -> Result<()> {
        let stream = device.as_cuda_device()?.cuda_stream();
        let ordinal = stream.context().ordinal();
        if ordinal != self.ordinal {
            return Err(LearnerError::Collective(format!(
                "rank {}: the gradients are on cuda:{ordinal}, the NCCL communicator on cuda:{} \
                 (learner.device and the communicator's device must agree)",
                self.rank, self.ordinal
            )));
        }
        let flat = DeviceFlatGradients::new(grads)?;
        flat.check_same_layout(self)?;
        // Marks the end of the flattening on candle's stream (this thread's); the worker's
        // stream waits for it before NCCL reads the buffer.
        let ready = stream.record_event(None).map_err(|e| {
            LearnerError::Collective(format!("rank {}: recording an event: {e:?}", self.rank))
        })?;
        let handle = flat.flat.clone();
        self.call(|reply| Request::Device {
            flat: handle,
            ready,
            reply,
        })?;
        flat.write_back(grads)
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_flat(&self, values: &mut Vec<f32>) -> Result<()> {
        // One request for the whole buffer; the worker reduces it bucket by bucket in place.
        let taken = std::mem::take(values);
        *values = self.call(|tx| Request::F32(taken, tx))?;
        Ok(())
    }

    fn all_reduce_sum_scalars(&self, values: &mut [f64]) -> Result<()> {
        let v = values.to_vec();
        let out = self.call(|tx| Request::F64(v, tx))?;
        values.copy_from_slice(&out);
        Ok(())
    }

    /// CUDA gradients stay on the device; anything else goes through the host.
    fn all_reduce_sum(&self, grads: &mut Gradients) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let Some(device) = crate::collective::accelerator_device(grads) {
            return self.all_reduce_sum_on_device(grads, &device);
        }
        all_reduce_sum_through_host(self, grads)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_must_be_128_bytes_and_a_machine_without_cuda_gets_an_error() {
        assert!(id_from_bytes(&[0u8; 12]).is_err());
        assert!(id_from_bytes(&[7u8; ID_BYTES]).is_ok());
        if crate::gpu::nccl_available().is_err() {
            let e = NcclCollective::connect(0, 1, 0, &[0u8; ID_BYTES], Duration::from_secs(1), 16)
                .unwrap_err()
                .to_string();
            assert!(e.contains("CUDA") || e.contains("NCCL"), "{e}");
            assert!(new_unique_id().is_err());
        }
    }
}
