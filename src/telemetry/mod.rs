//! Telemetry: statistics, metric names and exposition, logging, tracing.
pub mod gpu;
pub mod logging;
pub mod metrics;
pub mod otel;
pub mod stats;
