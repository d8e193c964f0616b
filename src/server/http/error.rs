//! The HTTP door's errors and the one mapping from engine errors to HTTP statuses (as Triton's
//! HTTP server: NOT_FOUND 404, UNAVAILABLE 503, INVALID_ARGUMENT 400, UNIMPLEMENTED 501,
//! INTERNAL 500). Every error body is `{"error": "..."}`.
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use tonic::Code;

use crate::error::Error;
use crate::model::manager::LookupError;
use crate::scheduler::SchedulerError;
use crate::server::status::code_of;

/// Seconds a client is told to wait before retrying where a retry can succeed.
const RETRY_AFTER_SECS: &str = "1";

/// A failed HTTP request: the status, the message for the body, and whether a retry can succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct HttpError {
    pub status: StatusCode,
    pub message: String,
    pub retry: bool,
}

impl HttpError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            retry: false,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    pub fn unimplemented(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_IMPLEMENTED, message)
    }
}

/// A gRPC code as the HTTP status Triton's HTTP server gives for the same error.
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            StatusCode::BAD_REQUEST
        }
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists => StatusCode::CONFLICT,
        Code::Unavailable | Code::Cancelled | Code::DeadlineExceeded => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Internal | Code::Unknown | Code::DataLoss | Code::Aborted => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    }
}

/// Whether the same request may succeed later: a full queue, a timeout, a version still loading.
fn retryable(error: &Error) -> bool {
    matches!(
        error,
        Error::Scheduler(SchedulerError::QueueFull | SchedulerError::TimedOut)
            | Error::Lookup(LookupError::VersionNotReady(..))
            | Error::ShuttingDown
            | Error::Scheduler(SchedulerError::ShuttingDown)
            | Error::Budget(_)
    )
}

impl From<Error> for HttpError {
    fn from(error: Error) -> Self {
        Self {
            status: http_status(code_of(&error)),
            retry: retryable(&error),
            message: error.to_string(),
        }
    }
}

impl From<tonic::Status> for HttpError {
    fn from(status: tonic::Status) -> Self {
        Self::new(http_status(status.code()), status.message())
    }
}

impl From<crate::server::decode::RequestError> for HttpError {
    fn from(error: crate::server::decode::RequestError) -> Self {
        Self::bad_request(error.0)
    }
}

/// `{"error": message}` with the given status.
pub fn error_body(status: StatusCode, message: &str) -> Response {
    let body = serde_json::json!({ "error": message }).to_string();
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let mut response = error_body(self.status, &self.message);
        if self.retry {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_static(RETRY_AFTER_SECS),
            );
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_errors_map_to_tritons_http_statuses() {
        let full = HttpError::from(Error::Scheduler(SchedulerError::QueueFull));
        assert_eq!(
            (full.status, full.retry),
            (StatusCode::SERVICE_UNAVAILABLE, true)
        );
        let unknown = HttpError::from(Error::Lookup(LookupError::UnknownModel("m".into())));
        assert_eq!(
            (unknown.status, unknown.retry),
            (StatusCode::NOT_FOUND, false)
        );
        let bad = HttpError::from(Error::Request(crate::server::decode::RequestError(
            "x".into(),
        )));
        assert_eq!(bad.status, StatusCode::BAD_REQUEST);
        let unimpl = HttpError::from(Error::Unimplemented("y".into()));
        assert_eq!(unimpl.status, StatusCode::NOT_IMPLEMENTED);
        let internal = HttpError::from(Error::Scheduler(SchedulerError::Execute(
            crate::scheduler::ExecuteError("z".into()),
        )));
        assert_eq!(internal.status, StatusCode::INTERNAL_SERVER_ERROR);
    }
}
