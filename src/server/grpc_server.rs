//! The gRPC server: its listeners (TCP with optional TLS, a Unix socket), the tower layers every
//! call passes, the services (inference, health following readiness, reflection) and their drain.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tonic::service::Routes;
use tonic::transport::Server;
use tower::layer::util::{Identity as NoLayer, Stack};

use super::auth::TokenAuthLayer;
use super::budget_grpc::GrpcBudgetLayer;
use super::grpc::InferenceService;
use super::grpc_metrics_layer::GrpcMetricsLayer;
use super::inference_first::InferenceFirst;
use super::listeners::{self, ConnectionActivityLayer, ConnectionLimits};
use super::state::ServerState;
use super::tls_files::{ReloadingTls, TlsFlags};
use super::tls_handshakes::TlsHandshakes;
use crate::config::{GrpcArgs, ResponseCompression, TlsArgs};
use crate::proto::grpc_inference_service_server::GrpcInferenceServiceServer;
use crate::security::AccessControl;

/// gRPC service name whose health follows server readiness (as does the empty service name).
const INFERENCE_SERVICE: &str = "inference.GRPCInferenceService";

/// Everything the gRPC server needs that can fail, prepared before serving so that a bad
/// certificate, an unreadable token file or an unusable socket path stops startup with one clear
/// message instead of leaving a process that is live and ready with no gRPC listener.
pub(crate) struct GrpcListeners {
    tcp: TcpListener,
    uds: Option<(tokio::net::UnixListener, PathBuf)>,
    tls: Option<Arc<ReloadingTls>>,
    auth: TokenAuthLayer,
}

impl GrpcListeners {
    pub(crate) async fn bind(args: &GrpcArgs, access: &Arc<AccessControl>) -> anyhow::Result<Self> {
        let addr = SocketAddr::new(args.grpc_address, args.grpc_port);
        let tcp = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot bind gRPC address {addr}"))?;
        let auth = TokenAuthLayer::new(Arc::clone(access), args.auth.auth_exempt_health);
        let tls = grpc_tls(&args.tls)?;
        let uds = match &args.grpc_uds {
            Some(path) => Some((bind_uds(path)?, path.clone())),
            None => None,
        };
        Ok(Self {
            tcp,
            uds,
            tls,
            auth,
        })
    }

    pub(crate) fn tcp_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// The TCP listener's TLS settings, for SIGHUP to reload; None without TLS.
    pub(crate) fn tls(&self) -> Option<Arc<ReloadingTls>> {
        self.tls.clone()
    }
}

fn bind_uds(path: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    // A previous run (or a restarted sidecar) may have left the socket file behind. Only a socket
    // is replaced: a typo must not delete someone's file.
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        anyhow::ensure!(
            meta.file_type().is_socket(),
            "--grpc-uds {} exists and is not a socket",
            path.display()
        );
        std::fs::remove_file(path)
            .with_context(|| format!("cannot replace stale socket {}", path.display()))?;
    }
    tokio::net::UnixListener::bind(path)
        .with_context(|| format!("cannot bind Unix socket {}", path.display()))
}

/// The gRPC listeners: TCP (TLS when configured) and optionally a Unix socket, serving the same
/// services until `stop` flips.
pub(crate) async fn serve_grpc(
    listeners: GrpcListeners,
    state: Arc<ServerState>,
    args: GrpcArgs,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let GrpcListeners {
        tcp,
        uds,
        tls,
        auth,
    } = listeners;
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    tokio::spawn(follow_readiness(health_reporter, Arc::clone(&state)));
    let limits = ConnectionLimits::new(
        args.grpc_handshake_timeout_secs,
        args.grpc_idle_timeout_secs,
        args.grpc_max_connections,
    );
    let mut servers = Vec::new();
    if let Some((uds, path)) = uds {
        tracing::info!(path = %path.display(), "gRPC listening on Unix socket");
        // Peers on the socket share the pod: no TLS there.
        let uds_server = layered_server(&state, &args, auth.clone(), health_service.clone())?;
        let mut stop = stop.clone();
        let limits = limits.clone();
        servers.push(tokio::spawn(async move {
            let result = uds_server
                .serve_with_incoming_shutdown(
                    listeners::uds_incoming(uds, limits.clone()),
                    async move {
                        let _ = stop.wait_for(|s| *s).await;
                    },
                )
                .await;
            let _ = std::fs::remove_file(&path);
            result.map_err(anyhow::Error::from)
        }));
    }
    let tcp_server = layered_server(&state, &args, auth, health_service)?;
    let mut stop_tcp = stop.clone();
    let stopped = async move {
        let _ = stop_tcp.wait_for(|s| *s).await;
    };
    let handshake_timeout = limits.handshake_timeout();
    // TCP_NODELAY is set on each connection there: without it a small response can sit behind
    // Nagle's algorithm until the client's delayed ACK (~40 ms), a 40-50 ms p99 on small tensors.
    let incoming = listeners::tcp_incoming(tcp, limits, tls.is_some());
    let result = match tls {
        Some(tls) => {
            let incoming = TlsHandshakes::new(incoming, tls, handshake_timeout);
            tcp_server
                .serve_with_incoming_shutdown(incoming, stopped)
                .await
        }
        None => {
            tcp_server
                .serve_with_incoming_shutdown(incoming, stopped)
                .await
        }
    };
    let result = result.map_err(anyhow::Error::from);
    for server in servers {
        server.await??;
    }
    result
}

/// The layers every call passes: connection activity outermost, then metrics, then
/// authentication, then the budget.
type GrpcLayers = Stack<
    GrpcBudgetLayer,
    Stack<TokenAuthLayer, Stack<GrpcMetricsLayer, Stack<ConnectionActivityLayer, NoLayer>>>,
>;

/// One listener's server: tonic's transport with the layers, over the services (inference first).
struct LayeredServer {
    server: Server<GrpcLayers>,
    services: InferenceFirst<GrpcInferenceServiceServer<InferenceService>>,
}

impl LayeredServer {
    async fn serve_with_incoming_shutdown<I, IO, IE>(
        self,
        incoming: I,
        signal: impl std::future::Future<Output = ()>,
    ) -> Result<(), tonic::transport::Error>
    where
        I: tokio_stream::Stream<Item = Result<IO, IE>>,
        IO: tokio::io::AsyncRead
            + tokio::io::AsyncWrite
            + tonic::transport::server::Connected
            + Unpin
            + Send
            + 'static,
        IE: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        self.server
            .serve_with_incoming_shutdown(self.services, incoming, signal)
            .await
    }
}

/// One listener's server: transport settings, then the layers, then the services.
fn layered_server(
    state: &Arc<ServerState>,
    args: &GrpcArgs,
    auth: TokenAuthLayer,
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
) -> anyhow::Result<LayeredServer> {
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let mut inference = GrpcInferenceServiceServer::new(InferenceService::new(Arc::clone(state)))
        .max_decoding_message_size(args.max_message_bytes)
        .max_encoding_message_size(args.max_message_bytes);
    if args.grpc_infer_response_compression_level != ResponseCompression::None {
        // Used only where the call's grpc-accept-encoding lists gzip.
        inference = inference.send_compressed(tonic::codec::CompressionEncoding::Gzip);
    }
    let keepalive =
        (args.grpc_keepalive_secs > 0).then(|| Duration::from_secs(args.grpc_keepalive_secs));
    let mut builder = Server::builder()
        .http2_keepalive_interval(keepalive)
        .http2_keepalive_timeout(Some(Duration::from_secs(args.grpc_keepalive_timeout_secs)))
        .max_concurrent_streams(Some(args.grpc_max_concurrent_streams));
    if args.grpc_connection_concurrency > 0 {
        // Per connection: past the limit a call is refused at once (RESOURCE_EXHAUSTED), never queued.
        builder = builder
            .concurrency_limit_per_connection(args.grpc_connection_concurrency)
            .load_shed(true);
    }
    let server = builder
        // Outermost: any RPC, even one refused below, keeps its connection from counting as idle.
        .layer(ConnectionActivityLayer)
        // Then metrics, so every call is counted, refused ones included.
        .layer(GrpcMetricsLayer::new(Arc::clone(&state.grpc_metrics)))
        // Before the services, so an unauthenticated call is refused before any decoding.
        .layer(auth)
        // After authentication (a refused caller reserves nothing), before the services decode.
        .layer(
            GrpcBudgetLayer::new(Arc::clone(&state.budget))
                .max_decompressed_bytes(args.max_message_bytes as u64),
        );
    let others = Routes::new(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    Ok(LayeredServer {
        server,
        services: InferenceFirst::new(inference, others),
    })
}

/// Triton's TLS flags → the TCP listener's TLS (h2 only), its files read now. None with TLS off.
fn grpc_tls(args: &TlsArgs) -> anyhow::Result<Option<Arc<ReloadingTls>>> {
    ReloadingTls::from_flags(TlsFlags {
        door: "gRPC",
        on: args.grpc_use_ssl,
        mutual: args.grpc_use_ssl_mutual,
        cert: ("--grpc-server-cert", &args.grpc_server_cert),
        key: ("--grpc-server-key", &args.grpc_server_key),
        root: ("--grpc-root-cert", &args.grpc_root_cert),
        alpn: &[b"h2"],
    })
}

/// Keeps grpc.health.v1 in step with readiness, for Kubernetes' native gRPC probes.
async fn follow_readiness(reporter: tonic_health::server::HealthReporter, state: Arc<ServerState>) {
    let mut changes = state.readiness.subscribe();
    loop {
        let status = if state.is_ready() {
            tonic_health::ServingStatus::Serving
        } else {
            tonic_health::ServingStatus::NotServing
        };
        reporter.set_service_status("", status).await;
        reporter.set_service_status(INFERENCE_SERVICE, status).await;
        if changes.changed().await.is_err() {
            break;
        }
    }
}
