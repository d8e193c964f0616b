//! Accepting connections with bounds: how many may be open, how long one may take to start
//! HTTP/2, how long one may stay idle. gRPC's listeners use all three; the HTTP door uses the cap
//! and the idle bound (`--http-max-connections`, `--http-idle-timeout-secs`).
//!
//! - **Connection cap** (`--grpc-max-connections`, TCP and Unix socket together; see
//!   `connection_cap`): a connection past the cap is never handed to hyper; it is closed before any
//!   HTTP/2 byte (see [`ConnectionLimits::refuse`] for why not a GOAWAY), and the server logs a
//!   warning naming the flag.
//! - **Handshake timeout** (`--grpc-handshake-timeout-secs`): the 24 bytes of the HTTP/2 client
//!   preface must arrive within it, or the connection is closed. Under TLS the same bound is the TLS
//!   handshake's (`tls_handshakes`), and the preface inside TLS is covered by the idle timeout.
//! - **Idle timeout** (`--grpc-idle-timeout-secs`): a connection with no RPC in flight for that long
//!   is closed, as gRPC's MAX_CONNECTION_IDLE; pings do not count as use. A client reconnects for its
//!   next call. RPCs are counted by [`ConnectionActivityLayer`], which finds this connection's
//!   [`ConnectionActivity`] in the request's connect info.
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use futures::Stream;
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::time::Sleep;
use tonic::transport::server::Connected;
use tower::{Layer, Service};

use super::connection_cap::{ConnectionCap, ConnectionSlot};
use super::layer_future::{AfterResponse, ThenRespond};
use super::uds_authority::AuthorityRewrite;

const PREFACE_LEN: usize = 24;
/// Pause after a failed accept (out of file descriptors), so the accept loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// A bound in seconds from its flag: 0 means none.
fn secs(seconds: u64) -> Option<Duration> {
    (seconds > 0).then(|| Duration::from_secs(seconds))
}

/// The bounds of one door: gRPC's listeners (TCP and Unix socket together), or HTTP's.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    handshake_timeout: Option<Duration>,
    idle_timeout: Option<Duration>,
    /// The flag that sets `idle_timeout`, named when a connection is closed for it.
    idle_flag: &'static str,
    cap: ConnectionCap,
}

impl ConnectionLimits {
    /// Zero for any value means "no bound".
    pub fn new(
        handshake_timeout_secs: u64,
        idle_timeout_secs: u64,
        max_connections: usize,
    ) -> Self {
        Self {
            handshake_timeout: secs(handshake_timeout_secs),
            idle_timeout: secs(idle_timeout_secs),
            idle_flag: "--grpc-idle-timeout-secs",
            cap: ConnectionCap::new("gRPC", "--grpc-max-connections", max_connections),
        }
    }

    /// The HTTP door's bounds: no preface to wait for (HTTP/1.1 has its own head-read bound).
    pub fn http(idle_timeout_secs: u64, max_connections: usize) -> Self {
        Self {
            handshake_timeout: None,
            idle_timeout: secs(idle_timeout_secs),
            idle_flag: "--http-idle-timeout-secs",
            cap: ConnectionCap::new("HTTP", "--http-max-connections", max_connections),
        }
    }

    pub fn max_connections(&self) -> usize {
        self.cap.limit()
    }

    pub fn handshake_timeout(&self) -> Option<Duration> {
        self.handshake_timeout
    }

    /// A slot for a new connection, or `None` when the cap is reached.
    pub fn admit(&self) -> Option<ConnectionSlot> {
        self.cap.admit()
    }

    /// `inner` with the bounds applied, holding `slot`. `plaintext`: the bytes read are HTTP/2's
    /// own, so the preface can be waited for.
    pub fn bound<S>(
        &self,
        inner: S,
        slot: ConnectionSlot,
        plaintext: bool,
    ) -> BoundedConnection<S> {
        // Under TLS `tls_handshakes` bounds the handshake, and the bytes seen here are TLS records.
        let handshake = self
            .handshake_timeout
            .filter(|_| plaintext)
            .map(|t| Box::pin(tokio::time::sleep(t)));
        let activity = Arc::new(ConnectionActivity::new());
        let idle = self
            .idle_timeout
            .map(|t| (t, Box::pin(tokio::time::sleep(t))));
        BoundedConnection {
            inner,
            activity,
            _slot: slot,
            handshake,
            preface_read: 0,
            idle,
            idle_flag: self.idle_flag,
        }
    }

    /// Closes a connection past the cap, off the accept loop and bounded in time. It is closed
    /// before any HTTP/2 byte is sent, so a gRPC client counts it as a failed connection attempt:
    /// the call fails with UNAVAILABLE and the client backs off before it reconnects. (A SETTINGS
    /// and GOAWAY would name the limit, but C-core clients treat that connection as established and
    /// reconnect at once, hundreds of times a second.)
    fn refuse<S>(&self, stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        self.refuse_with(stream, bytes::Bytes::new());
    }

    /// Closes a connection past the cap after writing `farewell` to it (see `ConnectionCap`).
    pub fn refuse_with<S>(&self, stream: S, farewell: bytes::Bytes)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        self.cap.refuse(stream, farewell);
    }
}

/// RPCs in flight on one connection and when the last one ended.
#[derive(Debug)]
pub struct ConnectionActivity {
    opened: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds after `opened` when the connection last became idle.
    idle_since_ms: AtomicU64,
}

impl ConnectionActivity {
    fn new() -> Self {
        Self {
            opened: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
        }
    }

    fn start(self: &Arc<Self>) -> RpcGuard {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        RpcGuard(Arc::clone(self))
    }

    /// When the idle timeout ends, or `None` while an RPC is in flight.
    fn idle_deadline(&self, timeout: Duration) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let since = Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire));
        Some(self.opened + since + timeout)
    }
}

/// Held while an RPC (request and its whole response) is in progress.
struct RpcGuard(Arc<ConnectionActivity>);

impl Drop for RpcGuard {
    fn drop(&mut self) {
        let now = self.0.opened.elapsed().as_millis() as u64;
        self.0.idle_since_ms.fetch_max(now, Ordering::AcqRel);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What tonic puts in each request's extensions for a bounded connection: its activity, and the
/// TCP peer address for the audit log.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    activity: Arc<ConnectionActivity>,
    peer: Option<std::net::SocketAddr>,
}

impl ConnectionInfo {
    /// The TCP peer, under TLS too; `None` on the Unix socket.
    pub fn remote_addr(&self) -> Option<std::net::SocketAddr> {
        self.peer
    }
}

/// A connection with the handshake and idle bounds applied on every read, holding its slot under
/// the connection cap until hyper drops it.
pub struct BoundedConnection<S> {
    inner: S,
    activity: Arc<ConnectionActivity>,
    _slot: ConnectionSlot,
    handshake: Option<Pin<Box<Sleep>>>,
    preface_read: usize,
    idle: Option<(Duration, Pin<Box<Sleep>>)>,
    idle_flag: &'static str,
}

impl<S> BoundedConnection<S> {
    /// Err when a bound is past; hyper closes the connection on a read error. Polling the timers
    /// here registers them with the connection's task, which always has a read pending.
    fn check_bounds(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if let Some(deadline) = &mut self.handshake {
            if deadline.as_mut().poll(cx).is_ready() {
                tracing::debug!(
                    "gRPC connection closed: no HTTP/2 preface within the handshake timeout"
                );
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no HTTP/2 preface within --grpc-handshake-timeout-secs",
                ));
            }
        }
        let Some((timeout, timer)) = &mut self.idle else {
            return Ok(());
        };
        while timer.as_mut().poll(cx).is_ready() {
            match self.activity.idle_deadline(*timeout) {
                Some(deadline) if deadline <= Instant::now() => {
                    let flag = self.idle_flag;
                    tracing::debug!("connection closed: idle past {flag}");
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("connection idle past {flag}"),
                    ));
                }
                Some(deadline) => timer.as_mut().reset(deadline.into()),
                None => timer.as_mut().reset((Instant::now() + *timeout).into()),
            }
        }
        Ok(())
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for BoundedConnection<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check_bounds(cx)?;
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        if this.handshake.is_some() {
            this.preface_read += buf.filled().len() - before;
            if this.preface_read >= PREFACE_LEN {
                this.handshake = None;
            }
        }
        Poll::Ready(Ok(()))
    }
}

super::write_through::write_through_to_inner!(BoundedConnection);

impl Connected for BoundedConnection<TcpStream> {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> ConnectionInfo {
        ConnectionInfo {
            activity: Arc::clone(&self.activity),
            peer: self.inner.connect_info().remote_addr(),
        }
    }
}

impl Connected for BoundedConnection<AuthorityRewrite<UnixStream>> {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> ConnectionInfo {
        ConnectionInfo {
            activity: Arc::clone(&self.activity),
            peer: None,
        }
    }
}

/// The TCP listener's connections, bounded; TCP_NODELAY on each (a small response must not wait
/// for the client's delayed ACK).
pub fn tcp_incoming(
    listener: TcpListener,
    limits: ConnectionLimits,
    tls: bool,
) -> impl Stream<Item = io::Result<BoundedConnection<TcpStream>>> + Send + 'static {
    futures::stream::unfold((listener, limits), move |(listener, limits)| async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    return Some((Err(error), (listener, limits)));
                }
            };
            let _ = stream.set_nodelay(true);
            match limits.admit() {
                Some(slot) => {
                    let connection = limits.bound(stream, slot, !tls);
                    return Some((Ok(connection), (listener, limits)));
                }
                None => limits.refuse(stream),
            }
        }
    })
}

/// The Unix socket's connections, bounded, with any `:authority` accepted (see `uds_authority`).
pub fn uds_incoming(
    listener: UnixListener,
    limits: ConnectionLimits,
) -> impl Stream<Item = io::Result<BoundedConnection<AuthorityRewrite<UnixStream>>>> + Send + 'static
{
    futures::stream::unfold((listener, limits), move |(listener, limits)| async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    return Some((Err(error), (listener, limits)));
                }
            };
            match limits.admit() {
                Some(slot) => {
                    let connection = limits.bound(AuthorityRewrite::new(stream), slot, true);
                    return Some((Ok(connection), (listener, limits)));
                }
                None => limits.refuse(stream),
            }
        }
    })
}

/// Counts each RPC as in flight on its connection from its arrival until its response body is
/// done, for the idle timeout. (tonic's `Request::remote_addr` finds nothing behind this listener;
/// the gateway reads the peer from [`ConnectionInfo::remote_addr`], which costs no insert per call.)
#[derive(Debug, Clone, Default)]
pub struct ConnectionActivityLayer;

impl<S> Layer<S> for ConnectionActivityLayer {
    type Service = ConnectionActivityService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ConnectionActivityService { inner }
    }
}

/// The service [`ConnectionActivityLayer`] produces.
#[derive(Debug, Clone)]
pub struct ConnectionActivityService<S> {
    inner: S,
}

/// The bounded connection a request came on, as tonic records it (plain, or under TLS).
pub fn connection_info(extensions: &http::Extensions) -> Option<&ConnectionInfo> {
    extensions.get::<ConnectionInfo>().or_else(|| {
        extensions
            .get::<tonic::transport::server::TlsConnectInfo<ConnectionInfo>>()
            .map(|tls| tls.get_ref())
    })
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for ConnectionActivityService<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    ResBody: Body + Unpin,
{
    type Response = http::Response<ActivityBody<ResBody>>;
    type Error = S::Error;
    type Future = ThenRespond<S::Future, RpcInFlight>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let guard = connection_info(request.extensions()).map(|info| info.activity.start());
        ThenRespond::new(self.inner.call(request), RpcInFlight(guard))
    }
}

/// Keeps an RPC counted as in flight on its connection: in the call's future, then in its body.
pub struct RpcInFlight(Option<RpcGuard>);

impl<B, E> AfterResponse<Result<http::Response<B>, E>> for RpcInFlight {
    type Output = Result<http::Response<ActivityBody<B>>, E>;

    fn after(self, result: Result<http::Response<B>, E>) -> Self::Output {
        Ok(result?.map(|inner| ActivityBody {
            inner,
            _guard: self.0,
        }))
    }
}

/// A response body that keeps its RPC counted as in flight until it is dropped.
pub struct ActivityBody<B> {
    inner: B,
    _guard: Option<RpcGuard>,
}

impl<B: Body + Unpin> Body for ActivityBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
#[path = "listeners_tests.rs"]
mod tests;
