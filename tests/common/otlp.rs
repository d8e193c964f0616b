//! An OTLP trace receiver for tests: gRPC (a tonic TraceService) or HTTP/protobuf (POST /v1/traces),
//! bound to 127.0.0.1:0, handing every export to the test in arrival order.
use std::net::SocketAddr;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use prost::Message as _;
use tokio::sync::{mpsc, oneshot};

pub type Exports = mpsc::UnboundedReceiver<ExportTraceServiceRequest>;

/// The receiving end of OTLP/gRPC: hands every export to the test.
struct GrpcReceiver(mpsc::UnboundedSender<ExportTraceServiceRequest>);

#[tonic::async_trait]
impl TraceService for GrpcReceiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let _ = self.0.send(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// A running receiver: where it listens, what it received, and how to stop it.
pub struct Receiver {
    pub addr: SocketAddr,
    pub exports: Exports,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.expect("receiver task");
    }
}

pub async fn start_grpc_receiver() -> Receiver {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, exports) = mpsc::unbounded_channel();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(GrpcReceiver(tx)))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async {
                    let _ = stopped.await;
                },
            )
            .await
            .expect("OTLP/gRPC receiver");
    });
    Receiver {
        addr,
        exports,
        stop,
        task,
    }
}

pub async fn start_http_receiver() -> Receiver {
    use axum::routing::post;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, exports) = mpsc::unbounded_channel();
    let (stop, stopped) = oneshot::channel::<()>();
    let app = axum::Router::new().route(
        "/v1/traces",
        post(move |body: bytes::Bytes| async move {
            let request = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
            let _ = tx.send(request);
            (
                [("content-type", "application/x-protobuf")],
                ExportTraceServiceResponse::default().encode_to_vec(),
            )
        }),
    );
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await
            .expect("OTLP/HTTP receiver");
    });
    Receiver {
        addr,
        exports,
        stop,
        task,
    }
}
