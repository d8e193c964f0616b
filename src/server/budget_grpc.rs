//! The memory budget as a tower layer for tonic's server: every request body is counted against the
//! shared [`MemoryBudget`] as its frames arrive, and a message that does not fit ends the call with
//! RESOURCE_EXHAUSTED naming the budget before its payload is read. The reservation also travels in
//! the request's extensions (so a handler can add what decoding will cost) and in the response body
//! (so the bytes stay held until the answer was sent).
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::task::futures::TaskLocalFuture;
use tower::{Layer, Service};

use super::budget::{BudgetExceeded, CountingBody, Framing, Hold, HoldingBody, MemoryBudget};
use super::budget_gunzip::{Compression, Gunzip, DEFAULT_MAX_DECOMPRESSED_BYTES};
use super::layer_future::{AfterResponse, ThenRespond};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

tokio::task_local! {
    /// The budget of the call being served, for the codec: it reserves what decoding a message
    /// will allocate before prost decodes it (see `codec.rs`).
    static CALL_BUDGET: Arc<MemoryBudget>;
}

/// The budget of the gRPC call this task is serving, when it passed [`GrpcBudgetLayer`].
pub fn current_call_budget() -> Option<Arc<MemoryBudget>> {
    CALL_BUDGET.try_with(Arc::clone).ok()
}

/// The gRPC status for a refused request.
pub fn budget_status(exceeded: &BudgetExceeded) -> tonic::Status {
    tonic::Status::resource_exhausted(exceeded.to_string())
}

/// Wraps a gRPC server so each request's bytes are reserved from the budget.
#[derive(Debug, Clone)]
pub struct GrpcBudgetLayer {
    budget: Arc<MemoryBudget>,
    max_decompressed: u64,
}

impl GrpcBudgetLayer {
    pub fn new(budget: Arc<MemoryBudget>) -> Self {
        Self {
            budget,
            max_decompressed: DEFAULT_MAX_DECOMPRESSED_BYTES,
        }
    }

    /// The most bytes a compressed message may decompress to (the server's largest message,
    /// `--max-message-bytes`); larger ones are refused before they are decompressed.
    pub fn max_decompressed_bytes(mut self, bytes: u64) -> Self {
        self.max_decompressed = bytes;
        self
    }
}

impl<S> Layer<S> for GrpcBudgetLayer {
    type Service = GrpcBudget<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcBudget {
            inner,
            budget: Arc::clone(&self.budget),
            max_decompressed: self.max_decompressed,
        }
    }
}

/// The service [`GrpcBudgetLayer`] produces.
#[derive(Debug, Clone)]
pub struct GrpcBudget<S> {
    inner: S,
    budget: Arc<MemoryBudget>,
    max_decompressed: u64,
}

/// Streaming calls live as long as the client likes: their messages are reserved while they arrive
/// and each decoded request again while it is served (see `grpc.rs`), instead of for the stream's
/// whole life.
fn hold_for(path: &str) -> Hold {
    if path.ends_with("/ModelStreamInfer") {
        Hold::PerMessage
    } else {
        Hold::UntilDropped
    }
}

impl<S, B, RB> Service<http::Request<B>> for GrpcBudget<S>
where
    S: Service<http::Request<GrpcCountingBody<B>>, Response = http::Response<RB>>,
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Response = http::Response<HoldingBody<RB>>;
    type Error = S::Error;
    type Future = TaskLocalFuture<Arc<MemoryBudget>, ThenRespond<S::Future, HeldUntilSent>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let reservation = Arc::new(self.budget.reservation());
        let hold = hold_for(request.uri().path());
        let (mut parts, body) = request.into_parts();
        parts.extensions.insert(Arc::clone(&reservation));
        // A compressed request is decompressed here, where its decompressed size can be reserved
        // before it is allocated; tonic then sees it uncompressed.
        let compression = parts
            .headers
            .get("grpc-encoding")
            .and_then(|v| Compression::from_header(v.as_bytes()));
        if compression.is_some() {
            parts.headers.remove("grpc-encoding");
        }
        let gunzip = compression
            .map(|c| Gunzip::new(c, Arc::clone(&reservation), hold, self.max_decompressed));
        let body = GrpcCountingBody {
            counting: CountingBody::new(body, Arc::clone(&reservation), Framing::Grpc, hold),
            gunzip,
            failed: false,
        };
        let request = http::Request::from_parts(parts, body);
        // The service only builds its future here; the codec decodes (and reads the budget) while
        // that future is polled, inside the scope.
        let answer = ThenRespond::new(self.inner.call(request), HeldUntilSent(reservation));
        CALL_BUDGET.scope(Arc::clone(&self.budget), answer)
    }
}

/// The call's reservation, moved into its response body once the answer exists.
pub struct HeldUntilSent(Arc<super::budget::Reservation>);

impl<RB, E> AfterResponse<Result<http::Response<RB>, E>> for HeldUntilSent {
    type Output = Result<http::Response<HoldingBody<RB>>, E>;

    fn after(self, result: Result<http::Response<RB>, E>) -> Self::Output {
        Ok(result?.map(|body| HoldingBody::new(body, self.0)))
    }
}

/// A [`CountingBody`] whose refusal is a `tonic::Status`, which tonic's decoder passes on as the
/// call's status (any other body error would become UNKNOWN); it decompresses a compressed request.
pub struct GrpcCountingBody<B> {
    counting: CountingBody<B>,
    gunzip: Option<Gunzip>,
    failed: bool,
}

impl<B> GrpcCountingBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    fn poll_counted(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match Pin::new(&mut self.counting).poll_frame(cx) {
            Poll::Ready(Some(Err(error))) => {
                let error = match error.downcast::<BudgetExceeded>() {
                    Ok(exceeded) => Box::new(budget_status(&exceeded)) as BoxError,
                    Err(other) => other,
                };
                Poll::Ready(Some(Err(error)))
            }
            other => other,
        }
    }
}

impl<B> Body for GrpcCountingBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        if this.failed {
            return Poll::Ready(None);
        }
        loop {
            let Some(gunzip) = &mut this.gunzip else {
                return this.poll_counted(cx);
            };
            match gunzip.next_frame() {
                Ok(Some(plain)) => return Poll::Ready(Some(Ok(Frame::data(plain)))),
                Ok(None) => {}
                Err(error) => {
                    this.failed = true;
                    return Poll::Ready(Some(Err(error)));
                }
            }
            let frame = match this.poll_counted(cx) {
                Poll::Ready(Some(Ok(frame))) => frame,
                other => return other,
            };
            match frame.into_data() {
                Ok(data) => gunzip_feed(&mut this.gunzip, data),
                Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.failed
            || (self.gunzip.as_ref().is_none_or(Gunzip::is_idle) && self.counting.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        match self.gunzip {
            // Decompressing changes the size.
            Some(_) => SizeHint::default(),
            None => self.counting.size_hint(),
        }
    }
}

fn gunzip_feed(gunzip: &mut Option<Gunzip>, data: Bytes) {
    if let Some(gunzip) = gunzip {
        gunzip.feed(data);
    }
}
