//! The future of a tower layer that acts on its inner service's result, with no box: the inner
//! future, polled in place, and what the layer does with the result once it is ready. Every gRPC
//! call crosses four such layers; boxed futures cost each call an allocation and a copy of a
//! growing future per layer, and a clone of the service below (the four layers together cost a
//! small call 1-2 µs of the 16-17 µs it takes on one CPU; docs/PERFORMANCE.md §6).
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

pin_project_lite::pin_project! {
    /// The inner service's future, then `after` applied to its result.
    pub struct ThenRespond<F, A> {
        #[pin]
        inner: F,
        after: Option<A>,
    }
}

impl<F, A> ThenRespond<F, A> {
    pub fn new(inner: F, after: A) -> Self {
        Self {
            inner,
            after: Some(after),
        }
    }
}

/// What a layer does with its inner service's result.
pub trait AfterResponse<R> {
    type Output;
    fn after(self, result: R) -> Self::Output;
}

impl<F, A> Future for ThenRespond<F, A>
where
    F: Future,
    A: AfterResponse<F::Output>,
{
    type Output = A::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let after = this
            .after
            .take()
            .expect("ThenRespond polled after it completed");
        Poll::Ready(after.after(result))
    }
}
