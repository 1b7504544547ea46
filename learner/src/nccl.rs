//! The GPU collective (feature `nccl`): gradients all-reduced through NCCL (`cudarc::nccl`).
//!
//! cudarc's `Comm` is not `Send`, and NCCL gives no deadline of its own: a dead peer leaves the
//! all-reduce kernel spinning forever. So one worker thread owns the communicator, and every
//! operation is a request to it. The worker reduces the flat gradient buffer bucket by bucket
//! through one reused page-locked host buffer and one device buffer (allocated once, at
//! connect): stage, copy to the device, launch the all-reduce, copy back, record an event and
//! poll it until it completes or the timeout passes. On a
//! timeout the worker drops the communicator (cudarc's `Drop` is `ncclCommAbort`), which ends
//! the kernel; the operation and every later one fail with an error naming the rank, the
//! operation and the timeout, and the learner stops (restart the ranks to resume from the last
//! checkpoint). The unique id is made by rank 0 and handed out by the coordinator's rendezvous
//! (`JoinLearner.collective_id`).
//!
//! Buffers travel host -> device -> host here because the learner's gradients are candle
//! tensors that may live on the CPU; with candle's `cuda` feature a device-resident path can skip
//! the copies. This module is compile-checked in CI; it runs only where CUDA and NCCL are.

use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, PinnedHostSlice};
use cudarc::nccl::safe::{Comm, Id, ReduceOp};

use crate::collective::Collective;
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

enum Request {
    F32(
        Vec<f32>,
        mpsc::Sender<std::result::Result<Vec<f32>, String>>,
    ),
    F64(
        Vec<f64>,
        mpsc::Sender<std::result::Result<Vec<f64>, String>>,
    ),
}

/// A rank of an NCCL communicator, driven by its own worker thread.
#[derive(Debug)]
pub struct NcclCollective {
    rank: usize,
    world: usize,
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
            timeout,
            requests: std::sync::Mutex::new(tx),
        })
    }

    fn call<T>(
        &self,
        make: impl FnOnce(mpsc::Sender<std::result::Result<Vec<T>, String>>) -> Request,
    ) -> Result<Vec<T>> {
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
        let failed = match req {
            // Gradients: bucket by bucket through the reused pinned and device buffers, in place.
            Request::F32(mut host, reply) => {
                let result = (|| -> std::result::Result<(), String> {
                    for chunk in host.chunks_mut(bucket_elems) {
                        let n = chunk.len();
                        let pinned = staging
                            .pinned
                            .as_mut_slice()
                            .map_err(|e| format!("all-reduce #{op}: pinned buffer: {e:?}"))?;
                        pinned[..n].copy_from_slice(chunk);
                        let mut dev = staging.dev.slice_mut(..n);
                        stream
                            .memcpy_htod(&pinned[..n], &mut dev)
                            .map_err(|e| format!("all-reduce #{op}: copy to device: {e:?}"))?;
                        c.all_reduce_in_place(&mut dev, &ReduceOp::Sum)
                            .map_err(|e| format!("all-reduce #{op}: ncclAllReduce: {e:?}"))?;
                        stream
                            .memcpy_dtoh(&dev, &mut pinned[..n])
                            .map_err(|e| format!("all-reduce #{op}: copy to host: {e:?}"))?;
                        wait(&stream, op, timeout)?;
                        chunk.copy_from_slice(&pinned[..n]);
                    }
                    Ok(())
                })();
                let failed = result.is_err();
                let _ = reply.send(result.map(|()| host));
                failed
            }
            // Scalars (a few values): straight copies.
            Request::F64(host, reply) => {
                let result = (|| -> std::result::Result<Vec<f64>, String> {
                    let mut dev = stream
                        .clone_htod(&host)
                        .map_err(|e| format!("all-reduce #{op}: copy to device: {e:?}"))?;
                    c.all_reduce_in_place(&mut dev, &ReduceOp::Sum)
                        .map_err(|e| format!("all-reduce #{op}: ncclAllReduce: {e:?}"))?;
                    wait(&stream, op, timeout)?;
                    stream
                        .clone_dtoh(&dev)
                        .map_err(|e| format!("all-reduce #{op}: copy to host: {e:?}"))
                })();
                let failed = result.is_err();
                let _ = reply.send(result);
                failed
            }
        };
        if failed {
            // ncclCommAbort: ends a hung kernel; later requests find no communicator.
            drop(comm.take());
            break;
        }
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
