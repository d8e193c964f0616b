//! The engine's error as the transport sees it: every failure a request can meet, from each layer.
//! The one mapping to gRPC status codes lives in server/status.rs, the one to HTTP in
//! server/http/error.rs; nothing here knows a protocol.
use crate::model::manager::LookupError;
use crate::model::ModelError;
use crate::scheduler::SchedulerError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Request(#[from] RequestError),
    #[error(transparent)]
    Lookup(#[from] LookupError),
    #[error(transparent)]
    Scheduler(#[from] SchedulerError),
    #[error(transparent)]
    Model(#[from] ModelError),
    /// An RPC or extension this server does not implement.
    #[error("{0}")]
    Unimplemented(String),
    /// The server is draining: it accepts nothing new.
    #[error("server is shutting down")]
    ShuttingDown,
    /// The request does not fit the memory budget (--max-inflight-bytes).
    #[error(transparent)]
    Budget(#[from] BudgetExceeded),
}

impl Error {
    /// Stable snake_case name of the error kind, reused as a metrics label.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Request(_) => "invalid_request",
            Error::Lookup(_) => "model_not_found",
            Error::Scheduler(SchedulerError::QueueFull) => "queue_full",
            Error::Scheduler(SchedulerError::TimedOut) => "timeout",
            Error::Scheduler(SchedulerError::ShuttingDown) => "shutting_down",
            Error::Scheduler(SchedulerError::Cancelled) => "cancelled",
            Error::Scheduler(SchedulerError::Execute(_)) => "backend",
            Error::Scheduler(SchedulerError::InvalidRequest(_)) => "invalid_request",
            Error::Model(_) => "model_error",
            Error::Unimplemented(_) => "unimplemented",
            Error::ShuttingDown => "shutting_down",
            Error::Budget(_) => "memory_budget",
        }
    }
}

/// A request that failed validation (names, datatypes, shapes, sizes, parameters), with a message
/// naming what was wrong; INVALID_ARGUMENT in gRPC, 400 in HTTP.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct RequestError(pub String);

/// A request that does not fit the budget (RESOURCE_EXHAUSTED in gRPC, 503 in HTTP).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "memory budget exceeded: {requested} more bytes do not fit --max-inflight-bytes {limit} \
     ({in_flight} bytes of requests already in flight); retry later or send smaller requests"
)]
pub struct BudgetExceeded {
    pub requested: u64,
    pub limit: u64,
    pub in_flight: u64,
}
