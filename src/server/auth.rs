//! The gRPC adapter of security/access.rs. A tower layer in front of every gRPC service resolves
//! the bearer token to a principal (outermost, so an unknown caller costs no decoding and reaches
//! no handler) and leaves it in the request's extensions; the service methods, which know the
//! model a message names, then ask [`authorize`] whether that principal may use it.
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::{Either, Ready};
use http::{Request, Response};
use tower::{Layer, Service};

use super::listeners::ConnectionInfo;
use crate::security::{Access, AccessControl, AuthError, CallContext, Credential, Principal};

/// The authenticated caller of one gRPC call, as the layer found it.
#[derive(Debug, Clone)]
pub struct Caller {
    pub principal: Principal,
    /// The token's hash, to resolve the principal again under a reloaded policy (streams).
    pub credential: Option<Credential>,
    pub peer: Option<Arc<str>>,
    /// The call's path, `/inference.GRPCInferenceService/ModelInfer`.
    pub rpc: Arc<str>,
}

impl Caller {
    pub fn context(&self) -> CallContext<'_> {
        CallContext {
            rpc: &self.rpc,
            peer: self.peer.as_deref(),
        }
    }
}

/// The caller a request's `authorization` header names, for any front door: None when nothing is
/// protected or audited (the request path then pays nothing: `describe`, which names the call and
/// its peer for the audit, is not even called), a refusal for no or unknown token.
pub fn resolve_caller(
    access: &AccessControl,
    headers: &http::HeaderMap,
    describe: impl FnOnce() -> (Arc<str>, Option<Arc<str>>),
) -> Result<Option<Caller>, AuthError> {
    if !access.is_enabled() && !access.audit().is_enabled() {
        return Ok(None);
    }
    let (rpc, peer) = describe();
    let call = CallContext {
        rpc: &rpc,
        peer: peer.as_deref(),
    };
    let credential = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| Credential::from_authorization(v.as_bytes()));
    let principal = access.principal_of(credential.as_ref(), &call)?;
    Ok(Some(Caller {
        principal,
        credential,
        peer,
        rpc,
    }))
}

/// The refusal as a gRPC status: no or unknown token UNAUTHENTICATED, a known one without the right
/// PERMISSION_DENIED.
pub fn auth_status(error: AuthError) -> tonic::Status {
    match error {
        AuthError::Unauthenticated => tonic::Status::unauthenticated(error.to_string()),
        AuthError::ModelDenied { .. } | AuthError::AdminDenied { .. } => {
            tonic::Status::permission_denied(error.to_string())
        }
    }
}

/// Whether the caller of `request` may do `access`. Call it before looking the model up, so that a
/// refused caller learns nothing about which models exist.
pub fn authorize<T>(
    control: &AccessControl,
    request: &tonic::Request<T>,
    access: Access<'_>,
) -> Result<(), tonic::Status> {
    match request.extensions().get::<Caller>() {
        Some(caller) => control
            .authorize(&caller.principal, access, &caller.context())
            .map_err(auth_status),
        // Only a service mounted without the layer gets here: fine when nothing is protected.
        None if !control.is_enabled() => Ok(()),
        None => Err(auth_status(AuthError::Unauthenticated)),
    }
}

/// Whether the caller may see `model` at all (for filtering lists; nothing is audited).
pub fn may_see<T>(request: &tonic::Request<T>, model: &str) -> bool {
    request
        .extensions()
        .get::<Caller>()
        .is_none_or(|c| c.principal.may_use_model(model))
}

/// The token check and which paths need none.
#[derive(Clone)]
pub struct TokenAuthLayer {
    access: Arc<AccessControl>,
    exempt_health: bool,
}

impl TokenAuthLayer {
    pub fn new(access: Arc<AccessControl>, exempt_health: bool) -> Self {
        Self {
            access,
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

/// The peer address the listener recorded for the connection (TCP, or TCP under TLS); None on a
/// Unix socket.
fn peer_of(extensions: &http::Extensions) -> Option<Arc<str>> {
    super::listeners::connection_info(extensions)
        .and_then(ConnectionInfo::remote_addr)
        .map(|a| Arc::from(a.to_string()))
}

impl<S, B, RB> Service<Request<B>> for TokenAuth<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
    RB: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<S::Future, Ready<Result<Self::Response, Self::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let path = request.uri().path();
        if self.layer.exempt_health && path.starts_with("/grpc.health.v1.Health/") {
            return Either::Left(self.inner.call(request));
        }
        let describe = || (Arc::from(path), peer_of(request.extensions()));
        match resolve_caller(&self.layer.access, request.headers(), describe) {
            Ok(caller) => {
                if let Some(caller) = caller {
                    request.extensions_mut().insert(caller);
                }
                Either::Left(self.inner.call(request))
            }
            Err(error) => {
                let (parts, ()) = auth_status(error).into_http::<()>().into_parts();
                Either::Right(futures::future::ready(Ok(Response::from_parts(
                    parts,
                    RB::default(),
                ))))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::security::AuditLog;

    #[test]
    fn refusals_map_to_their_codes() {
        assert_eq!(
            auth_status(AuthError::Unauthenticated).code(),
            tonic::Code::Unauthenticated
        );
        let denied = AuthError::ModelDenied {
            principal: "a".into(),
            model: "m".into(),
        };
        assert_eq!(auth_status(denied).code(), tonic::Code::PermissionDenied);
    }

    #[test]
    fn a_request_without_a_caller_is_refused_only_when_protected() {
        let open = AccessControl::open(Arc::new(AuditLog::disabled()));
        let request = tonic::Request::new(());
        assert!(authorize(&open, &request, Access::Admin).is_ok());
        let protected =
            AccessControl::configure(Some(b"t"), None, Arc::new(AuditLog::disabled())).unwrap();
        let status = authorize(&protected, &request, Access::Model("m")).unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
    }
}
