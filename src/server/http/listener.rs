//! The HTTP listener: HTTP/1.1 with keep-alive and cleartext HTTP/2 (h2c, by prior knowledge) on
//! one port, optionally TLS (h2 and http/1.1 by ALPN), with a graceful stop: on `stop` it accepts
//! no more connections, lets requests in progress finish and closes idle keep-alive connections.
//! At most `--http-max-connections` are open at once: one more is answered 503 and closed. A
//! connection with no request in progress for `--http-idle-timeout-secs` is closed (the bounds
//! are gRPC's, from `listeners`).
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::extract::ConnectInfo;
use axum::Router;
use bytes::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tonic::transport::server::Connected;
use tower::{Layer, ServiceExt};

use crate::config::HttpArgs;
use crate::server::listeners::{ConnectionActivityLayer, ConnectionLimits};
use crate::server::tls_files::{ReloadingTls, TlsFlags};

/// A client that opens a connection must finish its TLS handshake or request head within this
/// time, so idle half-open connections cannot pile up.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// A bound HTTP listener, ready to serve.
pub struct HttpListener {
    tcp: TcpListener,
    tls: Option<Arc<ReloadingTls>>,
    limits: ConnectionLimits,
}

impl HttpListener {
    /// Binds `--http-address:--http-port` and prepares TLS, so a bad certificate stops startup.
    pub async fn bind(args: &HttpArgs) -> anyhow::Result<Self> {
        let addr = SocketAddr::new(args.http_address, args.http_port);
        let tcp = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot bind HTTP address {addr}"))?;
        let tls = http_tls(args)?;
        let limits = ConnectionLimits::http(args.http_idle_timeout_secs, args.http_max_connections);
        Ok(Self { tcp, tls, limits })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// The listener's TLS settings, for SIGHUP to reload; None without TLS.
    pub fn tls(&self) -> Option<Arc<ReloadingTls>> {
        self.tls.clone()
    }

    /// Serves `router` until `stop` turns true, then drains the open connections.
    pub async fn serve(self, router: Router, mut stop: tokio::sync::watch::Receiver<bool>) {
        let graceful = GracefulShutdown::new();
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(HANDSHAKE_TIMEOUT);
        let builder = Arc::new(builder);
        let stopped = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        tokio::pin!(stopped);
        loop {
            let (stream, peer) = tokio::select! {
                accepted = self.tcp.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        // Out of file descriptors and the like: keep serving what is open.
                        tracing::warn!(error = %e, "HTTP accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = &mut stopped => break,
            };
            // Without it a small response can wait behind Nagle's algorithm for a delayed ACK.
            let _ = stream.set_nodelay(true);
            let Some(slot) = self.limits.admit() else {
                // Plain text can carry an answer; under TLS there is no session to carry it in.
                let farewell = match self.tls {
                    None => refusal_answer(self.limits.max_connections()),
                    Some(_) => Bytes::new(),
                };
                self.limits.refuse_with(stream, farewell);
                continue;
            };
            let stream = self.limits.bound(stream, slot, false);
            // The peer address for the audit log, as axum's `ConnectInfo` (read by authentication),
            // and the connection's activity, which the idle bound reads (requests in progress).
            let info = stream.connect_info();
            // Outermost: the extensions must be in place before the activity layer looks for them.
            let service = TowerToHyperService::new(
                ConnectionActivityLayer.layer(router.clone()).map_request(
                    move |mut request: http::Request<hyper::body::Incoming>| {
                        request.extensions_mut().insert(ConnectInfo(peer));
                        request.extensions_mut().insert(info.clone());
                        request
                    },
                ),
            );
            // The settings in force as the connection came: a reload while it shakes hands waits.
            let tls = self.tls.as_ref().map(|tls| tls.acceptor());
            let (builder, watcher) = (Arc::clone(&builder), graceful.watcher());
            tokio::spawn(async move {
                let result = match tls {
                    None => {
                        let conn = builder.serve_connection(TokioIo::new(stream), service);
                        watcher.watch(conn.into_owned()).await
                    }
                    Some(acceptor) => {
                        let Ok(Ok(stream)) =
                            tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
                        else {
                            tracing::debug!(%peer, "HTTP TLS handshake failed");
                            return;
                        };
                        let conn = builder.serve_connection(TokioIo::new(stream), service);
                        watcher.watch(conn.into_owned()).await
                    }
                };
                if let Err(e) = result {
                    tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
                }
            });
        }
        drop(self.tcp);
        graceful.shutdown().await;
    }
}

/// What a connection past the cap reads: an HTTP/1.1 503 in the protocol's JSON error form, with
/// Retry-After as for a full queue, so clients back off and retry. An h2c client reads it as a
/// protocol error, which also ends in a retry.
fn refusal_answer(limit: usize) -> Bytes {
    let body = serde_json::json!({
        "error": format!(
            "the server has its maximum of {limit} HTTP connections open \
             (--http-max-connections); retry later"
        )
    })
    .to_string();
    Bytes::from(format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    ))
}

/// The HTTP TLS flags → the listener's TLS (h2 and http/1.1 by ALPN), its files read now. None
/// with TLS off.
fn http_tls(args: &HttpArgs) -> anyhow::Result<Option<Arc<ReloadingTls>>> {
    ReloadingTls::from_flags(TlsFlags {
        door: "HTTP",
        on: args.http_use_ssl,
        mutual: args.http_use_ssl_mutual,
        cert: ("--http-server-cert", &args.http_server_cert),
        key: ("--http-server-key", &args.http_server_key),
        root: ("--http-root-cert", &args.http_root_cert),
        alpn: &[b"h2", b"http/1.1"],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refusal_is_a_whole_503_naming_the_flag() {
        let answer = refusal_answer(7);
        let text = std::str::from_utf8(&answer).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
        assert!(
            head.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{head}"
        );
        assert!(head.contains("\r\nretry-after: 1\r\n"), "{head}");
        assert!(head.contains("\r\nconnection: close"), "{head}");
        let length: usize = head
            .lines()
            .find_map(|line| line.strip_prefix("content-length: "))
            .expect("a content-length")
            .parse()
            .unwrap();
        assert_eq!(length, body.len());
        let error: serde_json::Value = serde_json::from_str(body).unwrap();
        let message = error["error"].as_str().unwrap();
        assert!(
            message.contains("maximum of 7 HTTP connections"),
            "{message}"
        );
        assert!(message.contains("--http-max-connections"), "{message}");
    }
}
