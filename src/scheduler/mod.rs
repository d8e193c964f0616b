//! Per-model scheduling: admission into a bounded queue, batch forming, and the instance workers that
//! own ONNX Runtime sessions. The contract with the rest of the engine is `Scheduler::infer`.
pub mod actor;
pub mod adaptive;
mod answer_split;
pub mod policy;
pub mod sequence;
pub mod settings;
mod timer;
mod worker;

pub use actor::Scheduler;
pub use adaptive::BatchingStrategy;
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

pub use crate::telemetry::stats::RequestTimings;

/// Runs one already-assembled batch on one model instance. Each implementation is owned by exactly
/// one worker thread, so it needs no lock around its session.
pub trait ModelExecutor: Send + 'static {
    fn execute(
        &mut self,
        inputs: Vec<NamedTensor>,
        outputs: &[String],
    ) -> Result<Vec<NamedTensor>, ExecuteError>;

    /// Runs the requests of one batch (each a list of inputs with the same names, datatypes and
    /// non-batch dims): assembles them along dim 0 and runs the result. This default concatenates
    /// with `concat_rows` and calls `execute`; a runtime that can assemble straight into its own
    /// input buffers overrides it to save the intermediate copy.
    fn execute_batch(
        &mut self,
        requests: Vec<Vec<NamedTensor>>,
        outputs: &[String],
    ) -> Result<BatchRun, ExecuteError> {
        let started = std::time::Instant::now();
        let assembled = crate::tensor::batch::concat_rows(requests)
            .map_err(|e| ExecuteError(format!("failed to assemble the batch: {e}")))?;
        let assembly = started.elapsed();
        Ok(BatchRun {
            outputs: self.execute(assembled, outputs)?,
            assembly,
        })
    }
}

/// What one batch's run produced.
#[derive(Debug)]
pub struct BatchRun {
    /// The batch's outputs, not yet split per request.
    pub outputs: Vec<NamedTensor>,
    /// Time spent assembling the inputs (the `compute_input` part of the run).
    pub assembly: Duration,
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
