//! Transport: the only place that knows gRPC and HTTP.
pub mod admin;
pub mod grpc_metrics_layer;
pub mod trace_context;
