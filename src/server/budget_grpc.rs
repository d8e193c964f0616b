//! The memory budget as a tower layer for tonic's server: every request body is counted against the
//! shared [`MemoryBudget`] as its frames arrive, and a message that does not fit ends the call with
//! RESOURCE_EXHAUSTED naming the budget before its payload is read. The reservation also travels in
//! the request's extensions (so a handler can add what decoding will cost) and in the response body
//! (so the bytes stay held until the answer was sent).
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tower::{Layer, Service};

use super::budget::{BudgetExceeded, CountingBody, Framing, Hold, HoldingBody, MemoryBudget};

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
}

impl GrpcBudgetLayer {
    pub fn new(budget: Arc<MemoryBudget>) -> Self {
        Self { budget }
    }
}

impl<S> Layer<S> for GrpcBudgetLayer {
    type Service = GrpcBudget<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcBudget {
            inner,
            budget: Arc::clone(&self.budget),
        }
    }
}

/// The service [`GrpcBudgetLayer`] produces.
#[derive(Debug, Clone)]
pub struct GrpcBudget<S> {
    inner: S,
    budget: Arc<MemoryBudget>,
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

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, B, RB> Service<http::Request<B>> for GrpcBudget<S>
where
    S: Service<http::Request<GrpcCountingBody<B>>, Response = http::Response<RB>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = http::Response<HoldingBody<RB>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let reservation = Arc::new(self.budget.reservation());
        let hold = hold_for(request.uri().path());
        let (mut parts, body) = request.into_parts();
        parts.extensions.insert(Arc::clone(&reservation));
        let body = GrpcCountingBody(CountingBody::new(
            body,
            Arc::clone(&reservation),
            Framing::Grpc,
            hold,
        ));
        let request = http::Request::from_parts(parts, body);
        // The clone that was polled ready is the one to call; keep a fresh clone for next time.
        let fresh = self.inner.clone();
        let mut ready = std::mem::replace(&mut self.inner, fresh);
        let budget = Arc::clone(&self.budget);
        Box::pin(CALL_BUDGET.scope(budget, async move {
            let response = ready.call(request).await?;
            Ok(response.map(|body| HoldingBody::new(body, reservation)))
        }))
    }
}

/// A [`CountingBody`] whose refusal is a `tonic::Status`, which tonic's decoder passes on as the
/// call's status (any other body error would become UNKNOWN).
pub struct GrpcCountingBody<B>(CountingBody<B>);

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
        match Pin::new(&mut self.0).poll_frame(cx) {
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

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.0.size_hint()
    }
}
