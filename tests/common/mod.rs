//! Shared harness for integration tests: a real gateway on 127.0.0.1:0, a gRPC client, shutdown via
//! a oneshot. No fixed ports and no sleeps: readiness is awaited through ServerReady.
#![allow(dead_code)]
pub mod otlp;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use onnx_gateway::proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use onnx_gateway::proto::ServerReadyRequest;
use onnx_gateway::{Config, Gateway};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

pub type Client = GrpcInferenceServiceClient<Channel>;

pub fn project_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn example_models() -> PathBuf {
    project_dir().join("models")
}

pub fn test_models() -> PathBuf {
    project_dir().join("tests/models")
}

/// A temporary repository holding copies of the named example models.
pub fn repo_with(models: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for model in models {
        copy_dir(&example_models().join(model), &dir.path().join(model));
    }
    dir
}

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A running gateway; dropping it without `stop` aborts the server task.
pub struct TestServer {
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    pub async fn start(repo: &Path) -> TestServer {
        Self::start_with(Config::for_repository(repo)).await
    }

    /// Starts the gateway and waits until it reports ready (or fails the test after 60 s).
    pub async fn start_with(config: Config) -> TestServer {
        let server = Self::spawn(config).await;
        wait_until_ready(&mut server.client().await, || {
            "gateway did not become ready".into()
        })
        .await;
        server
    }

    /// Starts the gateway without waiting for readiness.
    pub async fn spawn(config: Config) -> TestServer {
        let gateway = Gateway::bind(config).await.expect("gateway binds");
        let grpc_addr = gateway.grpc_addr().expect("gRPC is on");
        let admin_addr = gateway.admin_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(gateway.serve(async move {
            let _ = stopped.await;
        }));
        TestServer {
            grpc_addr,
            admin_addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// The statistics of the one version of `model` (ModelStatistics with no version).
    pub async fn statistics(&self, model: &str) -> onnx_gateway::proto::ModelStatistics {
        let mut stats = self
            .client()
            .await
            .model_statistics(onnx_gateway::proto::ModelStatisticsRequest {
                name: model.into(),
                version: String::new(),
            })
            .await
            .expect("statistics")
            .into_inner()
            .model_stats;
        assert_eq!(stats.len(), 1, "one version of {model}");
        stats.remove(0)
    }

    pub async fn client(&self) -> Client {
        let endpoint = format!("http://{}", self.grpc_addr);
        let channel = Channel::from_shared(endpoint)
            .expect("endpoint")
            .connect_lazy();
        GrpcInferenceServiceClient::new(channel)
            .max_decoding_message_size(256 << 20)
            .max_encoding_message_size(256 << 20)
    }

    /// Graceful shutdown; returns what `serve` returned.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => task.await.expect("server task"),
            None => Ok(()),
        }
    }

    /// Waits for `serve` to return on its own (e.g. a startup failure).
    pub async fn join(mut self) -> anyhow::Result<()> {
        match self.task.take() {
            Some(task) => task.await.expect("server task"),
            None => Ok(()),
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Polls ServerReady until it is true; after 60 s fails the test with `why()`.
pub async fn wait_until_ready(client: &mut Client, why: impl Fn() -> String) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let ready = client
            .server_ready(ServerReadyRequest {})
            .await
            .map(|r| r.into_inner().ready)
            .unwrap_or(false);
        if ready {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{}", why());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The repository-index row of `name` (fails the test when the model is not listed).
pub async fn index_row(
    client: &mut Client,
    name: &str,
) -> onnx_gateway::proto::repository_index_response::ModelIndex {
    let index = client
        .repository_index(onnx_gateway::proto::RepositoryIndexRequest::default())
        .await
        .expect("repository index")
        .into_inner();
    index
        .models
        .into_iter()
        .find(|m| m.name == name)
        .unwrap_or_else(|| panic!("{name} not listed"))
}

/// Little-endian bytes of f32 values.
pub fn f32_bytes(values: &[f32]) -> bytes::Bytes {
    values
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect::<Vec<u8>>()
        .into()
}

pub fn f32_from(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}
