//! The engine's error as the transport sees it: every failure a request can meet, from each layer.
//! The one mapping to gRPC status codes lives in server/status.rs.
use crate::model::manager::LookupError;
use crate::model::ModelError;
use crate::scheduler::SchedulerError;
use crate::server::decode::RequestError;

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
    Budget(#[from] crate::server::budget::BudgetExceeded),
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
