//! Generated `gradguard.v1` protobuf messages and gRPC service code.

#![allow(clippy::all, missing_docs)]

tonic::include_proto!("gradguard.v1");

/// The encoded file descriptor set, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("gradguard_descriptor");

/// The server side of `gradguard.v1.Ingest` with each worker message handed
/// over still encoded (a [`Frame`]), for a server that decodes them itself:
/// `gradguard serve` decodes every summary of a stream into the vectors of the
/// one before, from one contiguous slice, where the generated server would
/// allocate a new message per step and read it through tonic's chunked buffer.
/// Same route, same wire contract; clients use the generated `ingest_client`.
pub mod frames {
    use bytes::{Buf, Bytes};
    use tonic::Status;
    use tonic::codec::{Codec, DecodeBuf, Decoder};
    use tonic_prost::ProstEncoder;

    include!(concat!(env!("OUT_DIR"), "/gradguard.v1.Ingest.rs"));

    /// One `WorkerMessage`, encoded. Taken from tonic's receive buffer without
    /// a copy.
    pub type Frame = Bytes;

    /// Encodes `ServerMessage`s as prost does; decodes nothing.
    #[derive(Debug, Default, Clone, Copy)]
    pub struct FrameCodec;

    impl Codec for FrameCodec {
        type Encode = super::ServerMessage;
        type Decode = Frame;
        type Encoder = ProstEncoder<super::ServerMessage>;
        type Decoder = FrameDecoder;

        fn encoder(&mut self) -> Self::Encoder {
            ProstEncoder::default()
        }

        fn decoder(&mut self) -> Self::Decoder {
            FrameDecoder
        }
    }

    #[derive(Debug, Default, Clone, Copy)]
    pub struct FrameDecoder;

    impl Decoder for FrameDecoder {
        type Item = Frame;
        type Error = Status;

        fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Frame>, Status> {
            Ok(Some(buf.copy_to_bytes(buf.remaining())))
        }
    }
}
