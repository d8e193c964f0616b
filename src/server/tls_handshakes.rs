//! The TLS handshakes of accepted gRPC connections, many at once, each within the handshake bound
//! and with the settings in force when it began. tonic's own TLS takes its settings once, at
//! startup; doing the handshakes here lets SIGHUP renew the certificate without a restart.
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::task::JoinSet;
use tokio_rustls::server::TlsStream;

use super::tls_files::ReloadingTls;

/// Connections from `plain`, each yielded once its handshake completes. A handshake that fails or
/// runs past the bound drops its connection (freeing its slot under the connection cap) and is
/// logged at debug, as a client's broken handshake is no server fault.
pub struct TlsHandshakes<IO> {
    plain: Option<Pin<Box<dyn Stream<Item = io::Result<IO>> + Send>>>,
    tls: Arc<ReloadingTls>,
    timeout: Option<Duration>,
    /// Spawned, so handshakes use every worker thread and a slow client holds up no other.
    running: JoinSet<io::Result<TlsStream<IO>>>,
}

impl<IO> TlsHandshakes<IO>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    pub fn new(
        plain: impl Stream<Item = io::Result<IO>> + Send + 'static,
        tls: Arc<ReloadingTls>,
        timeout: Option<Duration>,
    ) -> Self {
        Self {
            plain: Some(Box::pin(plain)),
            tls,
            timeout,
            running: JoinSet::new(),
        }
    }

    fn start(&mut self, connection: IO) {
        let accept = self.tls.acceptor().accept(connection);
        let timeout = self.timeout;
        self.running.spawn(async move {
            match timeout {
                Some(bound) => tokio::time::timeout(bound, accept).await.map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::TimedOut,
                        "TLS handshake not done within --grpc-handshake-timeout-secs",
                    )
                })?,
                None => accept.await,
            }
        });
    }
}

impl<IO> Stream for TlsHandshakes<IO>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Item = io::Result<TlsStream<IO>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        // Take every connection accepted so far, so each one's handshake starts at once.
        while let Some(plain) = this.plain.as_mut() {
            match plain.as_mut().poll_next(cx) {
                Poll::Ready(Some(Ok(connection))) => this.start(connection),
                // An accept error (out of file descriptors) is the caller's to see and pause on.
                Poll::Ready(Some(Err(error))) => return Poll::Ready(Some(Err(error))),
                Poll::Ready(None) => this.plain = None,
                Poll::Pending => break,
            }
        }
        loop {
            match this.running.poll_join_next(cx) {
                Poll::Ready(Some(Ok(Ok(stream)))) => return Poll::Ready(Some(Ok(stream))),
                Poll::Ready(Some(Ok(Err(error)))) => {
                    tracing::debug!(%error, "gRPC TLS handshake failed");
                }
                // A handshake task that panicked or was cancelled: its connection is gone.
                Poll::Ready(Some(Err(error))) => {
                    tracing::debug!(%error, "gRPC TLS handshake task ended");
                }
                // None running: done once the listener is, else woken by the listener.
                Poll::Ready(None) if this.plain.is_none() => return Poll::Ready(None),
                Poll::Ready(None) | Poll::Pending => return Poll::Pending,
            }
        }
    }
}
