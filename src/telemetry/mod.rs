//! Telemetry: statistics, metric names and exposition, logging, tracing.
pub mod stats;
