//! A tower layer for tonic's server that counts gRPC requests by method and status code and times
//! them, into [`GrpcMetrics`].
//!
//! Where the status is: tonic answers an error that happens before the first message as a
//! "trailers-only" response, with `grpc-status` in the response headers; every other response
//! (success, or an error in the middle of a stream) carries it in the trailers after the body. So the
//! layer looks at the headers first and otherwise wraps the body to read the trailers as they pass.
//! A response dropped before its status was sent (client gone, deadline, connection reset) counts as
//! CANCELLED. The duration runs from the request's arrival to its status.
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http_body::{Body, Frame, SizeHint};
use tonic::Code;
use tower::{Layer, Service};

use super::layer_future::{AfterResponse, ThenRespond};
use crate::telemetry::metrics::GrpcMetrics;

/// Wraps a gRPC server so each request is recorded in `GrpcMetrics`.
#[derive(Debug, Clone)]
pub struct GrpcMetricsLayer {
    metrics: Arc<GrpcMetrics>,
}

impl GrpcMetricsLayer {
    pub fn new(metrics: Arc<GrpcMetrics>) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetricsService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// The service [`GrpcMetricsLayer`] produces.
#[derive(Debug, Clone)]
pub struct GrpcMetricsService<S> {
    inner: S,
    metrics: Arc<GrpcMetrics>,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for GrpcMetricsService<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    ResBody: Body + Unpin,
{
    type Response = http::Response<MetricsBody<ResBody>>;
    type Error = S::Error;
    type Future = ThenRespond<S::Future, Recorder>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let recorder = Recorder {
            metrics: self.metrics.clone(),
            method: GrpcMetrics::method_label(method_name(request.uri().path())),
            start: Instant::now(),
            recorded: false,
        };
        ThenRespond::new(self.inner.call(request), recorder)
    }
}

impl<B: Body, E> AfterResponse<Result<http::Response<B>, E>> for Recorder {
    type Output = Result<http::Response<MetricsBody<B>>, E>;

    /// A status in the headers (trailers-only) is recorded now; otherwise the body carries the
    /// recorder to the trailers.
    fn after(self, result: Result<http::Response<B>, E>) -> Self::Output {
        let response = match result {
            Ok(response) => response,
            Err(error) => {
                self.finish(Code::Unknown as i32);
                return Err(error);
            }
        };
        let (parts, body) = response.into_parts();
        let recorder = match grpc_status(&parts.headers) {
            Some(code) => {
                self.finish(code);
                None
            }
            // No status in the headers and no body to carry trailers: not a gRPC answer.
            None if body.is_end_stream() => {
                self.finish(Code::Unknown as i32);
                None
            }
            None => Some(self),
        };
        let body = MetricsBody {
            inner: body,
            recorder,
        };
        Ok(http::Response::from_parts(parts, body))
    }
}

/// The last segment of a gRPC path (`/package.Service/Method`).
fn method_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or_default()
}

/// The numeric `grpc-status` in a header map, if there is a readable one.
fn grpc_status(headers: &http::HeaderMap) -> Option<i32> {
    // A name built once: looking up by `&str` parses and validates the name on every response.
    static GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");
    let value = headers.get(&GRPC_STATUS)?.as_bytes();
    std::str::from_utf8(value).ok()?.trim().parse().ok()
}

/// Records one request exactly once: with the status it saw, or CANCELLED when dropped first.
#[derive(Debug)]
pub struct Recorder {
    metrics: Arc<GrpcMetrics>,
    method: &'static str,
    start: Instant,
    recorded: bool,
}

impl Recorder {
    fn finish(mut self, code: i32) {
        self.record(code);
    }

    fn record(&mut self, code: i32) {
        if !self.recorded {
            self.recorded = true;
            self.metrics.record(self.method, code, self.start.elapsed());
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.record(Code::Cancelled as i32);
    }
}

/// A response body that records the request when the trailers with its status go by.
#[derive(Debug)]
pub struct MetricsBody<B> {
    inner: B,
    /// `None` once the request is recorded (status was in the headers, or already seen).
    recorder: Option<Recorder>,
}

impl<B> MetricsBody<B> {
    fn finish(&mut self, code: i32) {
        if let Some(recorder) = self.recorder.take() {
            recorder.finish(code);
        }
    }
}

impl<B: Body + Unpin> Body for MetricsBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    let code = grpc_status(trailers).unwrap_or(Code::Unknown as i32);
                    this.finish(code);
                }
            }
            // The stream broke, or ended without a status: the client cannot know the outcome.
            Poll::Ready(Some(Err(_))) | Poll::Ready(None) => this.finish(Code::Unknown as i32),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests;
