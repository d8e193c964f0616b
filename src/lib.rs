//! onnx-gateway: serves ONNX models through ONNX Runtime over the KServe v2 / Triton gRPC protocol.
pub mod model;
pub mod scheduler;
pub mod server;
pub mod telemetry;
pub mod tensor;

/// Types generated from proto/ (package `inference`).
pub mod proto {
    tonic::include_proto!("inference");

    /// Encoded FileDescriptorSet of proto/, for server reflection and config.pbtxt parsing.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("inference_descriptor");
}
