//! Transport: the gRPC service (protocol messages ↔ engine types), health, reflection, and the
//! listeners. The only module that knows gRPC.
pub mod auth;
pub mod decode;
pub mod encode;
pub mod grpc;
pub mod state;
pub mod status;
