//! `ril.v1`: the protobuf messages and gRPC services every ril role speaks. This is the only
//! crate that knows the generated types; role crates convert them to domain types at their
//! boundary (`TryFrom`, validating every field).

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("ril.v1");
}

pub mod client;
pub mod convert;
pub mod error;
pub mod metrics;
pub mod security;
pub mod server;

pub use error::{RpcError, ServiceError, ServiceErrorCode};

/// The encoded `FileDescriptorSet` of every `ril.v1` file, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/ril_v1_descriptor.bin"));

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::v1::{PolicyVersion, WeightChunk};

    #[test]
    fn weight_chunks_round_trip_and_the_descriptor_set_names_the_package() {
        let chunk = WeightChunk {
            version: Some(PolicyVersion { version: 7 }),
            offset: 1024,
            total_bytes: 4096,
            data: bytes::Bytes::from_static(b"\x01\x02\x03"),
            sha256: bytes::Bytes::new(),
        };
        let decoded = WeightChunk::decode(chunk.encode_to_vec().as_slice()).unwrap();
        assert_eq!(decoded, chunk);
        let fds = prost_types::FileDescriptorSet::decode(super::FILE_DESCRIPTOR_SET).unwrap();
        assert!(fds.file.iter().any(|f| f.package() == "ril.v1"));
    }
}
