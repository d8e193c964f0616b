//! Transport: the gRPC service (protocol messages <-> engine types), health, reflection, the admin
//! HTTP server and the listeners. The only module that knows gRPC and HTTP.
pub mod admin;
pub mod auth;
pub mod budget;
pub mod budget_grpc;
pub mod budget_gunzip;
pub mod classification;
pub mod codec;
pub mod codec_prescan;
pub mod connection_cap;
pub mod cuda_shm;
pub mod decode;
pub mod encode;
pub mod grpc;
pub mod grpc_metrics_layer;
pub mod grpc_server;
pub mod http;
pub mod infer;
pub mod inference_first;
pub mod layer_future;
pub mod listeners;
pub mod model_control;
pub mod sequence_params;
pub mod state;
pub mod status;
pub mod trace_context;
pub mod uds_authority;
mod write_through;
