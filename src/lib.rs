//! onnx-gateway: serves ONNX models through ONNX Runtime over the KServe v2 / Triton gRPC protocol.
#![deny(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]
pub mod cache;
pub mod config;
pub mod ensemble;
pub mod error;
pub mod model;
pub mod runtime;
pub mod scheduler;
pub mod security;
pub mod server;
pub mod shm;
pub mod telemetry;
pub mod tensor;

mod gateway;

pub use config::Config;
pub use gateway::{run, Gateway};

/// Types generated from proto/ (package `inference`).
pub mod proto {
    #![allow(clippy::all, clippy::unwrap_used)]
    tonic::include_proto!("inference");

    /// Encoded FileDescriptorSet of proto/, for server reflection and config.pbtxt parsing.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("inference_descriptor");
}
