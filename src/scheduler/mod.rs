//! Per-model scheduling: admission into a bounded queue, batch forming, and the instance workers that
//! own ONNX Runtime sessions. The contract with the rest of the engine is `Scheduler::infer`.
pub mod actor;
pub mod policy;
pub mod sequence;
pub mod settings;
mod timer;
mod worker;

pub use actor::Scheduler;
pub use settings::{InstanceKind, InstanceSpec, SchedulerSettings, DEFAULT_MAX_QUEUE};

use std::time::Duration;

use crate::tensor::NamedTensor;

/// One inference request as the engine sees it: decoded, validated tensors.
#[derive(Debug)]
pub struct InferRequest {
    /// The client's request id, echoed in the response and carried in logs.
    pub id: String,
    pub inputs: Vec<NamedTensor>,
    /// Outputs the client asked for; empty means every output of the model.
    pub requested_outputs: Vec<String>,
    /// Priority level (1 is highest); 0 means the model's default level.
    pub priority: u32,
    /// Client's queue timeout override, already checked against what the model allows.
    pub timeout: Option<Duration>,
    /// The request's tracing span, so batch work is attributed to the callers.
    pub span: tracing::Span,
}

/// Outputs of one request plus where its time went.
#[derive(Debug)]
pub struct InferResponse {
    pub outputs: Vec<NamedTensor>,
    pub timings: RequestTimings,
}

/// Durations measured at the hand-offs of the request path (see DESIGN.md).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestTimings {
    pub queue: Duration,
    pub compute_input: Duration,
    pub compute_infer: Duration,
    pub compute_output: Duration,
    /// Rows in the execution this request was part of; 0 when it ran in none (a response-cache hit).
    pub batch_size: usize,
}

/// Runs one already-assembled batch on one model instance. Each implementation is owned by exactly
/// one worker thread, so it needs no lock around its session.
pub trait ModelExecutor: Send + 'static {
    fn execute(
        &mut self,
        inputs: Vec<NamedTensor>,
        outputs: &[String],
    ) -> Result<Vec<NamedTensor>, ExecuteError>;
}

/// An execution failed inside ONNX Runtime.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct ExecuteError(pub String);

/// Why the scheduler did not produce a response.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SchedulerError {
    #[error("Exceeds maximum queue size")]
    QueueFull,
    #[error("Request timeout expired")]
    TimedOut,
    #[error("model is unloading or the server is shutting down")]
    ShuttingDown,
    #[error("request cancelled by the client")]
    Cancelled,
    #[error("inference failed: {0}")]
    Execute(#[from] ExecuteError),
    #[error("{0}")]
    InvalidRequest(String),
}
