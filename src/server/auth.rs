//! Bearer-token authentication as a tower layer in front of every gRPC service. It sits outermost
//! so an unauthenticated call costs no decoding and reaches no handler.
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::{BoxFuture, FutureExt};
use http::{Request, Response};
use tower::{Layer, Service};

/// The expected token and which paths need none.
#[derive(Clone)]
pub struct TokenAuthLayer {
    token: Option<Arc<[u8]>>,
    exempt_health: bool,
}

impl TokenAuthLayer {
    /// `token: None` lets every call through.
    pub fn new(token: Option<String>, exempt_health: bool) -> Self {
        Self {
            token: token.map(|t| Arc::from(t.into_bytes().into_boxed_slice())),
            exempt_health,
        }
    }
}

impl<S> Layer<S> for TokenAuthLayer {
    type Service = TokenAuth<S>;
    fn layer(&self, inner: S) -> Self::Service {
        TokenAuth {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct TokenAuth<S> {
    inner: S,
    layer: TokenAuthLayer,
}

/// Compares in time independent of where the first difference is, so the token cannot be guessed
/// byte by byte from response timings.
fn same_token(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub fn authorized(expected: &[u8], headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        .map(|given| same_token(given.trim_ascii(), expected))
        .unwrap_or(false)
}

impl<S, B, RB> Service<Request<B>> for TokenAuth<S>
where
    S: Service<Request<B>, Response = Response<RB>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    RB: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        if let Some(expected) = &self.layer.token {
            let exempt = self.layer.exempt_health
                && request.uri().path().starts_with("/grpc.health.v1.Health/");
            if !exempt && !authorized(expected, request.headers()) {
                let status = tonic::Status::unauthenticated("missing or invalid bearer token");
                let (parts, ()) = status.into_http::<()>().into_parts();
                return futures::future::ready(Ok(Response::from_parts(parts, RB::default())))
                    .boxed();
            }
        }
        self.inner.call(request).boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison() {
        let mut headers = http::HeaderMap::new();
        assert!(!authorized(b"secret", &headers));
        headers.insert(
            http::header::AUTHORIZATION,
            "Bearer secret".parse().unwrap(),
        );
        assert!(authorized(b"secret", &headers));
        headers.insert(
            http::header::AUTHORIZATION,
            "Bearer secreT".parse().unwrap(),
        );
        assert!(!authorized(b"secret", &headers));
        headers.insert(http::header::AUTHORIZATION, "Basic secret".parse().unwrap());
        assert!(!authorized(b"secret", &headers));
        assert!(!same_token(b"abc", b"abcd"));
    }
}
