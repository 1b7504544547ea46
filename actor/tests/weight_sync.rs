//! Weight sync against a real gRPC learner stand-in on a loopback port: a corrupted and then a
//! truncated transfer are refused and fetched again; the payload finally applied is the good one.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::Stream;
use ril_proto::v1::learner_server::{Learner, LearnerServer};
use ril_proto::v1::{self, PolicyVersion, WeightChunk};
use sha2::{Digest, Sha256};
use tonic::{Request, Response, Status};

struct Flaky {
    payload: Vec<u8>,
    calls: Arc<AtomicUsize>,
}

type Chunks = Pin<Box<dyn Stream<Item = Result<WeightChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Learner for Flaky {
    async fn push_groups(
        &self,
        _: Request<v1::PushGroupsRequest>,
    ) -> Result<Response<v1::PushGroupsResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    type GetWeightsStream = Chunks;

    async fn get_weights(
        &self,
        r: Request<v1::GetWeightsRequest>,
    ) -> Result<Response<Chunks>, Status> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        let size = r.into_inner().chunk_bytes as usize;
        let sha: [u8; 32] = Sha256::digest(&self.payload).into();
        let n = self.payload.len().div_ceil(size);
        let mut chunks: Vec<WeightChunk> = self
            .payload
            .chunks(size)
            .enumerate()
            .map(|(i, c)| WeightChunk {
                version: Some(PolicyVersion { version: 5 }),
                offset: (i * size) as u64,
                total_bytes: self.payload.len() as u64,
                data: bytes::Bytes::copy_from_slice(c),
                sha256: if i + 1 == n {
                    bytes::Bytes::copy_from_slice(&sha)
                } else {
                    bytes::Bytes::new()
                },
            })
            .collect();
        match call {
            // First: one flipped bit in the middle.
            0 => {
                let mut d = chunks[n / 2].data.to_vec();
                d[0] ^= 0x10;
                chunks[n / 2].data = d.into();
            }
            // Second: the stream ends early.
            1 => chunks.truncate(n - 1),
            _ => {}
        }
        Ok(Response::new(Box::pin(futures_util::stream::iter(
            chunks.into_iter().map(Ok),
        ))))
    }

    async fn info(
        &self,
        _: Request<v1::LearnerInfoRequest>,
    ) -> Result<Response<v1::LearnerInfo>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
}

#[tokio::test]
async fn corrupt_and_truncated_transfers_are_refused_and_fetched_again() {
    let payload: Vec<u8> = (0..100_000u32).map(|i| (i * 31 % 253) as u8).collect();
    let calls = Arc::new(AtomicUsize::new(0));
    let bound = ril_proto::server::bind("127.0.0.1:0").await.unwrap();
    let addr = bound.addr.to_string();
    let server = LearnerServer::new(Flaky {
        payload: payload.clone(),
        calls: calls.clone(),
    });
    tokio::spawn(
        ril_proto::server::builder()
            .add_service(server)
            .serve_with_incoming(ril_proto::server::incoming(bound)),
    );
    let ch = ril_proto::client::connect(&addr, Duration::from_secs(5), &Default::default())
        .await
        .unwrap();
    let mut client = v1::learner_client::LearnerClient::new(ch);

    // One attempt: the corrupted transfer is an error naming the version and the checksum.
    let e = ril_actor::sync::fetch(&mut client, &addr, 0, 4096, Duration::from_secs(5), 1)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("version 5") && e.contains("SHA-256"), "{e}");
    // Then with retries: the truncated one is refused too, the third is applied.
    let got = ril_actor::sync::fetch(&mut client, &addr, 0, 4096, Duration::from_secs(5), 3)
        .await
        .unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(got.version, 5);
    assert_eq!(got.bytes, payload);
}

/// Found by the fuzzer (fuzz target proto_weight_chunks): a first chunk announcing the largest
/// allowed size made the assembler reserve all of it (64 GiB) before any data came, and the
/// allocation aborted the process. Now memory follows the data and the transfer is refused as
/// truncated.
#[test]
fn a_huge_announced_size_allocates_nothing_up_front() {
    let mut a = ril_actor::sync::Assembler::new();
    a.push(WeightChunk {
        version: Some(PolicyVersion { version: 1 }),
        offset: 0,
        total_bytes: ril_actor::sync::Assembler::MAX_TOTAL_BYTES,
        data: vec![1u8; 16].into(),
        sha256: Default::default(),
    })
    .unwrap();
    let err = a.finish().unwrap_err().to_string();
    assert!(
        err.contains("version 1") && err.contains("truncated"),
        "{err}"
    );
}
