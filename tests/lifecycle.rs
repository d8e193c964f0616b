//! Lifecycle inside one process: version swaps that refuse nobody, readiness through reloads, explicit
//! model control with name validation, and open streams during the drain. The real binary (signals,
//! exit codes, poll mode, TLS, auth, Unix socket, Envoy) is tested from tests/python/test_lifecycle.py
//! and its neighbours.
mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use onnx_gateway::config::ModelControlMode;
use onnx_gateway::model::manager::{ManagerSettings, ModelManager};
use onnx_gateway::proto::model_infer_request::InferInputTensor;
use onnx_gateway::proto::model_repository_parameter::ParameterChoice;
use onnx_gateway::proto::*;
use onnx_gateway::runtime::init_onnxruntime;
use onnx_gateway::scheduler::InferRequest;
use onnx_gateway::tensor::{DataType, NamedTensor, Tensor, TensorData};
use onnx_gateway::Config;
use tokio_stream::StreamExt;
use tonic::Code;

/// add_sub whose single requests wait a second in the queue for a batch that never fills, so a test
/// knows a request is still in flight when it acts.
fn slow_add_sub(repo: &Path) -> PathBuf {
    let config = repo.join("add_sub/config.pbtxt");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "dynamic_batching {}",
        "dynamic_batching { preferred_batch_size: [ 8 ] max_queue_delay_microseconds: 1000000 }",
    );
    std::fs::write(&config, text).unwrap();
    config
}

fn manager(repo: &Path) -> Arc<ModelManager> {
    init_onnxruntime(None).expect("ONNX Runtime (run scripts/setup)");
    Arc::new(ModelManager::new(ManagerSettings {
        repository: repo.to_path_buf(),
        default_max_queue_size: 64,
        ..ManagerSettings::default()
    }))
}

fn engine_request(a: &[f32], b: &[f32]) -> InferRequest {
    let tensor = |name: &str, values: &[f32]| NamedTensor {
        name: name.into(),
        tensor: Tensor::new(
            name,
            DataType::Fp32,
            vec![1, 16],
            TensorData::Fixed(f32_bytes(values)),
        )
        .unwrap(),
    };
    InferRequest {
        id: "r".into(),
        inputs: vec![tensor("INPUT0", a), tensor("INPUT1", b)],
        requested_outputs: vec![],
        priority: 0,
        timeout: None,
        span: tracing::Span::none(),
    }
}

fn add_sub_request(id: &str, a: &[f32], b: &[f32]) -> ModelInferRequest {
    let input = |name: &str| InferInputTensor {
        name: name.into(),
        datatype: "FP32".into(),
        shape: vec![1, 16],
        ..Default::default()
    };
    ModelInferRequest {
        model_name: "add_sub".into(),
        id: id.into(),
        inputs: vec![input("INPUT0"), input("INPUT1")],
        raw_input_contents: vec![f32_bytes(a), f32_bytes(b)],
        ..Default::default()
    }
}

fn ramp(scale: f32) -> Vec<f32> {
    (0..16).map(|i| i as f32 * scale).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_swap_refuses_no_request_that_already_looked_up_the_old_one() {
    let repo = repo_with(&["add_sub"]);
    let models = manager(repo.path());
    models.load("add_sub", None).await.unwrap();
    // A request between lookup and queueing when the new version lands.
    let old = models.get("add_sub", "").unwrap();
    assert_eq!(old.version, 1);
    copy_dir(
        &repo.path().join("add_sub/1"),
        &repo.path().join("add_sub/2"),
    );
    models.load("add_sub", None).await.unwrap();
    assert_eq!(models.get("add_sub", "").unwrap().version, 2);
    assert!(models.get("add_sub", "1").is_err(), "version 1 is retired");
    // Time for any background retirement to act, as it would under real load.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let (a, b) = (ramp(1.0), ramp(0.5));
    let response = old
        .scheduler
        .infer(engine_request(&a, &b))
        .await
        .expect("the retired version still answers what reached it");
    let sum = match &response.outputs[0].tensor.data {
        TensorData::Fixed(raw) => f32_from(raw),
        other => panic!("unexpected output {other:?}"),
    };
    let expected: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
    assert_eq!(sum, expected);
    drop(old);
    models.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_holds_while_a_serving_model_reloads() {
    let repo = repo_with(&["add_sub", "mlp_bench"]);
    let models = manager(repo.path());
    models.load("add_sub", None).await.unwrap();
    models.load("mlp_bench", None).await.unwrap();
    assert!(models.all_ready());
    copy_dir(
        &repo.path().join("mlp_bench/1"),
        &repo.path().join("mlp_bench/2"),
    );
    let reload = tokio::spawn({
        let models = Arc::clone(&models);
        async move { models.load("mlp_bench", None).await }
    });
    let mut samples = 0;
    while !reload.is_finished() {
        assert!(models.all_ready(), "readiness dropped during a reload");
        samples += 1;
        tokio::task::yield_now().await;
    }
    reload.await.unwrap().unwrap();
    assert!(samples > 0);
    assert!(models.all_ready());

    // A reload that fails keeps the old version serving and the server ready.
    std::fs::create_dir_all(repo.path().join("mlp_bench/3")).unwrap();
    std::fs::write(repo.path().join("mlp_bench/3/model.onnx"), b"not a model").unwrap();
    assert!(models.load("mlp_bench", None).await.is_err());
    assert_eq!(models.get("mlp_bench", "").unwrap().version, 2);
    assert!(models.all_ready());
    models.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_misspelt_load_leaves_nothing_behind() {
    let repo = repo_with(&["add_sub"]);
    let models = manager(repo.path());
    models.load("add_sub", None).await.unwrap();
    let err = models.load("add_subb", None).await.unwrap_err();
    assert!(err.to_string().contains("no such model"), "{err}");
    assert!(
        !err.to_string().contains(&repo.path().display().to_string()),
        "server paths stay out of client messages: {err}"
    );
    assert!(
        models.all_ready(),
        "a load of nothing must not hold readiness down"
    );
    assert!(models.index().await.iter().all(|row| row.name == "add_sub"));
    models.shutdown().await;
}

fn load_request(name: &str, config_json: Option<&str>) -> RepositoryModelLoadRequest {
    let mut parameters = std::collections::HashMap::new();
    if let Some(json) = config_json {
        parameters.insert(
            "config".to_string(),
            ModelRepositoryParameter {
                parameter_choice: Some(ParameterChoice::StringParam(json.into())),
            },
        );
    }
    RepositoryModelLoadRequest {
        model_name: name.into(),
        parameters,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_control_validates_names_and_codes() {
    let outside = repo_with(&["add_sub"]);
    let repo = tempfile::tempdir_in(outside.path()).unwrap();
    copy_dir(
        &example_models().join("add_sub"),
        &repo.path().join("add_sub"),
    );
    let mut config = Config::for_repository(repo.path());
    config.models.model_control_mode = ModelControlMode::Explicit;
    config.models.load_models = vec!["add_sub".into()];
    let server = TestServer::start_with(config).await;
    let mut client = server.client().await;

    // The parent of the repository holds a valid model: no name may reach it.
    let escape = format!(
        "../{}/add_sub",
        outside.path().file_name().unwrap().to_string_lossy()
    );
    for name in [
        "..",
        "../add_sub",
        escape.as_str(),
        "a/b",
        "/etc",
        "a\\b",
        ".hidden",
        "",
    ] {
        let status = client
            .repository_model_load(load_request(name, None))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{name:?}: {status:?}");
        let status = client
            .repository_model_unload(RepositoryModelUnloadRequest {
                model_name: name.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{name:?}: {status:?}");
    }
    let status = client
        .repository_model_load(load_request("missing", None))
        .await
        .unwrap_err();
    // Triton's answer for a name the repository does not hold.
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    assert!(
        status
            .message()
            .starts_with("failed to load 'missing', failed to poll from model repository"),
        "{status:?}"
    );
    let status = client
        .repository_model_unload(RepositoryModelUnloadRequest {
            model_name: "missing".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let ready = client.server_ready(ServerReadyRequest {}).await.unwrap();
    assert!(
        ready.into_inner().ready,
        "refused loads leave readiness alone"
    );

    // Bad override JSON and file overrides without a config fail the load as Triton's do, and the
    // model keeps serving.
    let status = client
        .repository_model_load(load_request("add_sub", Some("{not json")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    assert!(
        status.message().contains("failed to load 'add_sub'"),
        "{status:?}"
    );
    let mut request = load_request("add_sub", None);
    request.parameters.insert(
        "file:1/model.onnx".into(),
        ModelRepositoryParameter {
            parameter_choice: Some(ParameterChoice::BytesParam(vec![1, 2, 3])),
        },
    );
    // A file override without the `config` it needs.
    let status = client.repository_model_load(request).await.unwrap_err();
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    assert!(
        status.message().contains("'config' must be specified"),
        "{status:?}"
    );
    let (a, b) = (ramp(1.0), ramp(2.0));
    client
        .model_infer(add_sub_request("after", &a, &b))
        .await
        .expect("add_sub still serves");
    server.stop().await.unwrap();
}

/// One scrape of the admin server's /metrics.
async fn scrape(admin: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(admin).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).await.unwrap();
    text
}

/// Waits until add_sub holds `n` accepted, unanswered requests (or fails after 30 s).
async fn wait_pending(admin: std::net::SocketAddr, n: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let text = scrape(admin).await;
        let pending = text
            .lines()
            .filter(|l| l.starts_with("nv_inference_pending_request_count{"))
            .filter(|l| l.contains("model=\"add_sub\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum::<u64>();
        if pending == n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "add_sub never had {n} pending requests:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sends stream requests from a channel so the test decides when each goes out.
fn request_stream() -> (
    tokio::sync::mpsc::Sender<ModelInferRequest>,
    tokio_stream::wrappers::ReceiverStream<ModelInferRequest>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    (tx, tokio_stream::wrappers::ReceiverStream::new(rx))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_stream_finishes_its_requests_then_ends_unavailable_at_the_drain() {
    let repo = repo_with(&["add_sub"]);
    slow_add_sub(repo.path());
    let mut config = Config::for_repository(repo.path());
    // Were the stream to hold the drain open, the test would wait this long and fail below.
    config.lifecycle.exit_timeout_secs = 120;
    let server = TestServer::start_with(config).await;
    let mut client = server.client().await;
    let (tx, requests) = request_stream();
    let mut responses = client
        .model_stream_infer(requests)
        .await
        .unwrap()
        .into_inner();

    let (a, b) = (ramp(1.0), ramp(3.0));
    tx.send(add_sub_request("first", &a, &b)).await.unwrap();
    let first = responses.next().await.unwrap().unwrap();
    assert_eq!(first.error_message, "");
    // This one waits a second for its batch: it is in flight when the drain begins.
    tx.send(add_sub_request("in-flight", &a, &b)).await.unwrap();
    wait_pending(server.admin_addr, 1).await;
    let stopped = tokio::spawn(server.stop());

    let in_flight = responses.next().await.unwrap().unwrap();
    assert_eq!(in_flight.error_message, "");
    let answer = in_flight.infer_response.unwrap();
    assert_eq!(answer.id, "in-flight");
    let expected: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
    assert_eq!(f32_from(&answer.raw_output_contents[0]), expected);
    let end = tokio::time::timeout(Duration::from_secs(60), responses.next())
        .await
        .expect("the stream ends at the drain instead of waiting for the exit timeout");
    let status = end.unwrap().unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(responses.next().await.is_none());
    tokio::time::timeout(Duration::from_secs(60), stopped)
        .await
        .expect("the drain does not wait for the exit timeout")
        .unwrap()
        .unwrap();
    drop(tx);
}
