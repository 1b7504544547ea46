//! Weight sync: an actor pulls the learner's current weights in chunks, verifies them (one
//! version, contiguous offsets, the announced size, the SHA-256 on the last chunk) and applies
//! a version whole or not at all. A corrupt or truncated transfer is refused and fetched again.

use std::time::Duration;

use ril_proto::client::Channel;
use ril_proto::error::RpcError;
use ril_proto::v1::learner_client::LearnerClient;
use ril_proto::v1::{GetWeightsRequest, WeightChunk};
use sha2::{Digest, Sha256};

/// A verified weight payload (a safetensors file in memory).
#[derive(Debug, Clone)]
pub struct WeightPayload {
    pub version: u64,
    pub bytes: Vec<u8>,
    pub sha256: [u8; 32],
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("weight transfer of version {version}: {detail}")]
    Corrupt { version: u64, detail: String },
    #[error("weight transfer: {0}")]
    Transport(#[source] RpcError),
    #[error("weight transfer from {addr} timed out after {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
}

/// Reassembles chunks in order, checking each as it arrives.
#[derive(Debug, Default)]
pub struct Assembler {
    version: Option<u64>,
    total: u64,
    bytes: Vec<u8>,
    sha256: Option<Vec<u8>>,
    hasher: Sha256,
}

impl Assembler {
    /// The largest payload accepted (a bound on what a peer can make us allocate).
    pub const MAX_TOTAL_BYTES: u64 = 64 << 30;
    /// The most memory reserved before the data arrives.
    pub const INITIAL_RESERVE_BYTES: u64 = 256 << 20;

    pub fn new() -> Self {
        Self::default()
    }

    fn corrupt(&self, detail: String) -> SyncError {
        SyncError::Corrupt {
            version: self.version.unwrap_or(0),
            detail,
        }
    }

    pub fn push(&mut self, chunk: WeightChunk) -> Result<(), SyncError> {
        let version = chunk
            .version
            .as_ref()
            .map(|v| v.version)
            .ok_or_else(|| self.corrupt("a chunk without a version".into()))?;
        match self.version {
            None => {
                if chunk.total_bytes == 0 || chunk.total_bytes > Self::MAX_TOTAL_BYTES {
                    return Err(SyncError::Corrupt {
                        version,
                        detail: format!("announced size {} bytes is invalid", chunk.total_bytes),
                    });
                }
                self.version = Some(version);
                self.total = chunk.total_bytes;
                // Up to 256 MiB up front, then as data arrives: the announced size is the
                // peer's word, and reserving it whole let one chunk claiming 64 GiB abort the
                // process (found by the fuzzer, fuzz/corpus/proto_weight_chunks).
                self.bytes
                    .reserve(chunk.total_bytes.min(Self::INITIAL_RESERVE_BYTES) as usize);
            }
            Some(v) if v != version => {
                return Err(self.corrupt(format!(
                    "a chunk of version {version} inside the transfer of version {v}"
                )));
            }
            Some(_) => {}
        }
        if self.sha256.is_some() {
            return Err(self.corrupt("a chunk after the last one".into()));
        }
        if chunk.total_bytes != self.total {
            return Err(self.corrupt(format!(
                "total size changed from {} to {}",
                self.total, chunk.total_bytes
            )));
        }
        let received = self.bytes.len() as u64;
        if chunk.offset != received {
            return Err(self.corrupt(format!(
                "chunk at offset {} but {received} bytes received so far",
                chunk.offset
            )));
        }
        if chunk.data.is_empty() {
            return Err(self.corrupt(format!("empty chunk at offset {}", chunk.offset)));
        }
        if received + chunk.data.len() as u64 > self.total {
            return Err(self.corrupt(format!(
                "chunk at offset {} with {} bytes overruns the announced {} bytes",
                chunk.offset,
                chunk.data.len(),
                self.total
            )));
        }
        self.hasher.update(&chunk.data);
        self.bytes.extend_from_slice(&chunk.data);
        let complete = self.bytes.len() as u64 == self.total;
        match (complete, chunk.sha256.is_empty()) {
            (true, true) => Err(self.corrupt("the last chunk carries no SHA-256".into())),
            (false, false) => Err(self.corrupt(format!(
                "a SHA-256 at offset {} before the end ({} of {} bytes)",
                chunk.offset,
                self.bytes.len(),
                self.total
            ))),
            (true, false) => {
                self.sha256 = Some(chunk.sha256.to_vec());
                Ok(())
            }
            (false, true) => Ok(()),
        }
    }

    pub fn finish(self) -> Result<WeightPayload, SyncError> {
        let version = self.version.ok_or(SyncError::Corrupt {
            version: 0,
            detail: "no chunks".into(),
        })?;
        let expected = self.sha256.ok_or_else(|| SyncError::Corrupt {
            version,
            detail: format!(
                "truncated: {} of {} bytes and no final chunk",
                self.bytes.len(),
                self.total
            ),
        })?;
        let got: [u8; 32] = self.hasher.finalize().into();
        if expected.as_slice() != got.as_slice() {
            return Err(SyncError::Corrupt {
                version,
                detail: format!(
                    "SHA-256 mismatch: announced {}, computed {}",
                    hex::encode(&expected),
                    hex::encode(got)
                ),
            });
        }
        Ok(WeightPayload {
            version,
            bytes: self.bytes,
            sha256: got,
        })
    }
}

fn transport(addr: &str, status: tonic::Status) -> SyncError {
    SyncError::Transport(RpcError::new("learner", addr, "GetWeights", status))
}

/// One transfer of the learner's current weights (or `version`, 0 = current).
pub async fn fetch_once(
    client: &mut LearnerClient<Channel>,
    addr: &str,
    version: u64,
    chunk_bytes: u32,
    timeout: Duration,
) -> Result<WeightPayload, SyncError> {
    let transfer = async {
        let mut stream = client
            .get_weights(GetWeightsRequest {
                version,
                chunk_bytes,
            })
            .await
            .map_err(|s| transport(addr, s))?
            .into_inner();
        let mut asm = Assembler::new();
        while let Some(chunk) = stream.message().await.map_err(|s| transport(addr, s))? {
            asm.push(chunk)?;
        }
        asm.finish()
    };
    tokio::time::timeout(timeout, transfer)
        .await
        .map_err(|_| SyncError::Timeout {
            addr: addr.to_string(),
            timeout,
        })?
}

/// [`fetch_once`] retried up to `attempts` times on corrupt or failed transfers.
pub async fn fetch(
    client: &mut LearnerClient<Channel>,
    addr: &str,
    version: u64,
    chunk_bytes: u32,
    timeout: Duration,
    attempts: usize,
) -> Result<WeightPayload, SyncError> {
    let mut last = None;
    for attempt in 1..=attempts.max(1) {
        match fetch_once(client, addr, version, chunk_bytes, timeout).await {
            Ok(p) => return Ok(p),
            Err(e) => {
                tracing::warn!(attempt, error = %e, "weight transfer refused; fetching again");
                last = Some(e);
                tokio::time::sleep(Duration::from_millis(100 * attempt as u64)).await;
            }
        }
    }
    Err(last.expect("at least one attempt"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ril_proto::v1::PolicyVersion;

    fn chunks(payload: &[u8], size: usize, version: u64) -> Vec<WeightChunk> {
        let sha: [u8; 32] = Sha256::digest(payload).into();
        let n = payload.len().div_ceil(size);
        payload
            .chunks(size)
            .enumerate()
            .map(|(i, c)| WeightChunk {
                version: Some(PolicyVersion { version }),
                offset: (i * size) as u64,
                total_bytes: payload.len() as u64,
                data: bytes::Bytes::copy_from_slice(c),
                sha256: if i + 1 == n {
                    bytes::Bytes::copy_from_slice(&sha)
                } else {
                    bytes::Bytes::new()
                },
            })
            .collect()
    }

    fn assemble(cs: Vec<WeightChunk>) -> Result<WeightPayload, SyncError> {
        let mut a = Assembler::new();
        for c in cs {
            a.push(c)?;
        }
        a.finish()
    }

    #[test]
    fn good_transfers_assemble_and_bad_ones_are_refused() {
        let payload: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 251) as u8).collect();
        let ok = assemble(chunks(&payload, 64, 3)).unwrap();
        assert_eq!(ok.version, 3);
        assert_eq!(ok.bytes, payload);

        // A flipped byte: the checksum catches it.
        let mut cs = chunks(&payload, 64, 3);
        let mut d = cs[5].data.to_vec();
        d[0] ^= 1;
        cs[5].data = d.into();
        let e = assemble(cs).unwrap_err().to_string();
        assert!(
            e.contains("SHA-256 mismatch") && e.contains("version 3"),
            "{e}"
        );

        // Truncated: the last chunk never came.
        let mut cs = chunks(&payload, 64, 3);
        cs.pop();
        let e = assemble(cs).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");

        // A gap, a mixed version, an overrun.
        let mut cs = chunks(&payload, 64, 3);
        cs.remove(2);
        assert!(assemble(cs).unwrap_err().to_string().contains("offset"));
        let mut cs = chunks(&payload, 64, 3);
        cs[4].version = Some(PolicyVersion { version: 4 });
        assert!(assemble(cs).unwrap_err().to_string().contains("version 4"));
        let mut cs = chunks(&payload, 64, 3);
        let mut d = cs[0].data.to_vec();
        d.extend_from_slice(&[0; 2000]);
        cs[0].data = d.into();
        assert!(assemble(cs).unwrap_err().to_string().contains("overruns"));
        assert!(assemble(vec![]).is_err());
    }
}
