//! The service under the gRPC layers: calls of the inference service go to it directly, every
//! other service (health, reflection) through tonic's router.
//!
//! tonic's router is an axum router: per call it clones the boxed route service, matches the path,
//! records the matched path and its parameters in two extensions, and boxes the request and
//! response bodies once more. Measured at add_sub, 16 in flight on one core, that was about 4% of
//! the server's CPU per request, and the inference service is where almost every call goes.
use std::convert::Infallible;
use std::task::{Context, Poll};

use futures::future::Either;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::service::Routes;
use tower::Service;

/// Routes `/<I::NAME>/...` to `inference`, anything else to `routes`.
#[derive(Clone)]
pub struct InferenceFirst<I> {
    inference: I,
    routes: Routes,
}

impl<I: NamedService> InferenceFirst<I> {
    /// `routes` should not hold `inference` too: a call for it never reaches them.
    pub fn new(inference: I, routes: Routes) -> Self {
        Self {
            inference,
            routes: routes.prepare(),
        }
    }

    fn is_inference(path: &str) -> bool {
        path.strip_prefix('/')
            .and_then(|rest| rest.strip_prefix(I::NAME))
            .is_some_and(|rest| rest.starts_with('/'))
    }
}

impl<I, B> Service<http::Request<B>> for InferenceFirst<I>
where
    I: Service<http::Request<B>, Response = http::Response<Body>, Error = Infallible>
        + NamedService,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<tonic::codegen::StdError>,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Either<I::Future, <Routes as Service<http::Request<B>>>::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Both are always ready (neither holds a limit of its own); asked anyway, so that this
        // stays true if one ever gains one.
        match self.inference.poll_ready(cx) {
            Poll::Ready(Ok(())) => Service::<http::Request<B>>::poll_ready(&mut self.routes, cx),
            other => other,
        }
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if Self::is_inference(request.uri().path()) {
            Either::Left(self.inference.call(request))
        } else {
            Either::Right(self.routes.call(request))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone)]
    struct Named;
    impl NamedService for Named {
        const NAME: &'static str = "inference.GRPCInferenceService";
    }

    #[test]
    fn only_the_services_own_paths_are_its_calls() {
        let is = InferenceFirst::<Named>::is_inference;
        assert!(is("/inference.GRPCInferenceService/ModelInfer"));
        assert!(is("/inference.GRPCInferenceService/NoSuchMethod"));
        assert!(!is("/inference.GRPCInferenceServiceX/ModelInfer"));
        assert!(!is("/grpc.health.v1.Health/Check"));
        assert!(!is("inference.GRPCInferenceService/ModelInfer"));
        assert!(!is("/inference.GRPCInferenceService"));
    }
}
