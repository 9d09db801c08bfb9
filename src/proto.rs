//! Generated `gradguard.v1` protobuf messages and gRPC service code.

#![allow(clippy::all, missing_docs)]

tonic::include_proto!("gradguard.v1");

/// The encoded file descriptor set, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("gradguard_descriptor");
