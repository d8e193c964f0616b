//! The single, exhaustive mapping from engine errors to gRPC statuses (codes as Triton uses them).
use tonic::{Code, Status};

use crate::error::Error;
use crate::model::manager::LookupError;
use crate::model::ModelError;
use crate::scheduler::SchedulerError;

pub fn code_of(error: &Error) -> Code {
    match error {
        Error::Request(_) => Code::InvalidArgument,
        Error::Lookup(
            LookupError::UnknownModel(_)
            | LookupError::UnknownVersion(..)
            | LookupError::NoReadyVersion(_),
        ) => Code::NotFound,
        Error::Lookup(LookupError::VersionNotReady(..)) => Code::Unavailable,
        Error::Scheduler(e) => match e {
            SchedulerError::QueueFull | SchedulerError::TimedOut | SchedulerError::ShuttingDown => {
                Code::Unavailable
            }
            SchedulerError::Cancelled => Code::Cancelled,
            SchedulerError::Execute(_) => Code::Internal,
            SchedulerError::InvalidRequest(_) => Code::InvalidArgument,
        },
        Error::Model(e) => match e {
            ModelError::ConfigParse { .. } | ModelError::InvalidConfig { .. } => {
                Code::InvalidArgument
            }
            ModelError::Repository { .. } => Code::Internal,
            ModelError::InvalidName { .. } => Code::InvalidArgument,
            ModelError::NotFound { .. } => Code::NotFound,
        },
        Error::Unimplemented(_) => Code::Unimplemented,
        Error::ShuttingDown => Code::Unavailable,
        Error::Budget(_) => Code::ResourceExhausted,
    }
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        // Texts repeat client-supplied names: bounded so a huge name cannot overflow metadata limits.
        Status::new(
            code_of(&error),
            crate::tensor::names::bounded_text(error.to_string()),
        )
    }
}
