//! The `batching_strategy` model config parameter and `--default-batching-strategy`, over real gRPC:
//! Triton's strategy keeps its delay semantics (a lone request waits for its whole window, so a
//! queue timeout shorter than the window expires it); the adaptive strategy treats the window as a
//! cap (with nothing learned that says waiting pays, a lone request runs at once); batches still form
//! under concurrency with both; the reported config and /metrics show what was decided; an unknown
//! strategy fails the load with INVALID_ARGUMENT naming the allowed values.
//!
//! Windows are 30 s, far longer than any test, so no outcome depends on timing: a request held by
//! one is released only by what the test sends, or by its queue timeout.
mod common;

use std::time::Duration;

use common::*;
use onnx_gateway::config::ModelControlMode;
use onnx_gateway::proto::model_infer_request::InferInputTensor;
use onnx_gateway::proto::*;
use onnx_gateway::scheduler::BatchingStrategy;
use onnx_gateway::telemetry::stats::BATCH_FORMED_REASONS;
use onnx_gateway::Config;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

/// Far longer than any test.
const HOLD_US: u64 = 30_000_000;
/// How long a test waits for something that must happen.
const PATIENCE: Duration = Duration::from_secs(20);
/// Concurrent requests per round.
const IN_FLIGHT: usize = 16;

/// The two example models used: add_sub (two FP32 [16] inputs) and mlp_bench (FP32 [256] -> [10]).
#[derive(Clone, Copy)]
enum Model {
    AddSub,
    Mlp,
}

impl Model {
    fn dir(self) -> &'static str {
        match self {
            Model::AddSub => "add_sub",
            Model::Mlp => "mlp_bench",
        }
    }

    fn io(self) -> String {
        let t = |n: &str, dims: u32| {
            format!("{{ name: \"{n}\" data_type: TYPE_FP32 dims: [ {dims} ] }}")
        };
        match self {
            Model::AddSub => format!(
                "input [ {}, {} ]\noutput [ {}, {} ]",
                t("INPUT0", 16),
                t("INPUT1", 16),
                t("OUTPUT0", 16),
                t("OUTPUT1", 16)
            ),
            Model::Mlp => format!(
                "input [ {} ]\noutput [ {} ]",
                t("input", 256),
                t("output", 10)
            ),
        }
    }

    fn request(self, name: &str, seed: u32) -> ModelInferRequest {
        let tensor = |n: &str, width: usize| {
            let values: Vec<f32> = (0..width)
                .map(|i| (seed as f32) * 0.01 + i as f32 * 0.001)
                .collect();
            (
                InferInputTensor {
                    name: n.into(),
                    datatype: "FP32".into(),
                    shape: vec![1, width as i64],
                    ..Default::default()
                },
                f32_bytes(&values),
            )
        };
        let inputs = match self {
            Model::AddSub => vec![tensor("INPUT0", 16), tensor("INPUT1", 16)],
            Model::Mlp => vec![tensor("input", 256)],
        };
        let (inputs, raw) = inputs.into_iter().unzip();
        ModelInferRequest {
            model_name: name.into(),
            id: format!("seed-{seed}"),
            inputs,
            raw_input_contents: raw,
            ..Default::default()
        }
    }
}

/// config.pbtxt of a copy of `model` batching up to `max_batch_size` rows with a 30 s window,
/// `extra` inside dynamic_batching, and `strategy` as the batching_strategy parameter if given.
fn config(
    name: &str,
    model: Model,
    max_batch_size: u32,
    extra: &str,
    strategy: Option<&str>,
) -> String {
    let parameter = strategy.map_or_else(String::new, |s| {
        format!("parameters {{ key: \"batching_strategy\" value: {{ string_value: \"{s}\" }} }}\n")
    });
    format!(
        "name: \"{name}\"\nbackend: \"onnxruntime\"\nmax_batch_size: {max_batch_size}\n{}\n\
         dynamic_batching {{ max_queue_delay_microseconds: {HOLD_US} {extra} }}\n\
         instance_group [ {{ count: 1 kind: KIND_CPU }} ]\n{parameter}",
        model.io()
    )
}

/// A queue timeout of 200 ms, far shorter than the window.
const SHORT_TIMEOUT: &str =
    "default_queue_policy { timeout_action: REJECT default_timeout_microseconds: 200000 }";

/// A repository of copies of example models, one per (name, model, config.pbtxt).
fn repository(models: &[(&str, Model, String)]) -> TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    for (name, model, config) in models {
        let version = dir.path().join(name).join("1");
        std::fs::create_dir_all(&version).expect("model dir");
        let onnx = example_models().join(model.dir()).join("1/model.onnx");
        std::fs::copy(onnx, version.join("model.onnx")).expect("copy model");
        std::fs::write(dir.path().join(name).join("config.pbtxt"), config).expect("config");
    }
    dir
}

async fn infer(
    server: &TestServer,
    req: ModelInferRequest,
) -> Result<ModelInferResponse, tonic::Status> {
    let mut client = server.client().await;
    tokio::time::timeout(PATIENCE, client.model_infer(req))
        .await
        .expect("answered in time")
        .map(|r| r.into_inner())
}

/// `IN_FLIGHT` requests at once to `name`; every one must succeed.
async fn concurrent_round(server: &TestServer, name: &str, model: Model, round: u32) {
    let mut tasks = Vec::new();
    for i in 0..IN_FLIGHT as u32 {
        let mut client = server.client().await;
        let req = model.request(name, round * 100 + i);
        tasks.push(tokio::spawn(async move { client.model_infer(req).await }));
    }
    for task in tasks {
        let resp = tokio::time::timeout(PATIENCE, task)
            .await
            .expect("answered in time")
            .expect("task")
            .expect("request succeeds")
            .into_inner();
        assert_eq!(resp.raw_output_contents.len(), resp.outputs.len());
        assert_eq!(
            resp.outputs[0].shape[0], 1,
            "each caller gets its own row back"
        );
    }
}

async fn reported_parameters(
    server: &TestServer,
    name: &str,
) -> std::collections::HashMap<String, String> {
    let mut client = server.client().await;
    let config = client
        .model_config(ModelConfigRequest {
            name: name.into(),
            version: String::new(),
        })
        .await
        .expect("model config")
        .into_inner()
        .config
        .expect("config");
    config
        .parameters
        .into_iter()
        .map(|(k, v)| (k, v.string_value))
        .collect()
}

/// /metrics, through a bare HTTP/1.1 exchange.
async fn scrape(server: &TestServer) -> String {
    let mut stream = tokio::net::TcpStream::connect(server.admin_addr)
        .await
        .expect("admin connect");
    let head = "GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n";
    stream.write_all(head.as_bytes()).await.expect("write");
    let mut body = String::new();
    stream.read_to_string(&mut body).await.expect("read");
    body
}

/// The value of the sample `name` whose labels include every `labels` pair.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} {labels:?} in:\n{text}"))
}

/// (batches, rows) formed per reason for `model`, from /metrics.
fn formed(text: &str, model: &str) -> Vec<(&'static str, f64, f64)> {
    BATCH_FORMED_REASONS
        .iter()
        .map(|reason| {
            let labels = [("model", model), ("reason", *reason)];
            (
                *reason,
                sample(text, "onnx_gateway_batch_formed_total", &labels),
                sample(text, "onnx_gateway_batch_formed_rows_total", &labels),
            )
        })
        .collect()
}

fn of<'a>(formed: &'a [(&'static str, f64, f64)], reason: &str) -> &'a (&'static str, f64, f64) {
    formed
        .iter()
        .find(|(r, _, _)| *r == reason)
        .expect("reason")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn triton_keeps_its_window_and_adaptive_treats_it_as_a_cap() {
    let repo = repository(&[
        (
            "held",
            Model::AddSub,
            config("held", Model::AddSub, 8, SHORT_TIMEOUT, None),
        ),
        (
            "capped",
            Model::AddSub,
            config("capped", Model::AddSub, 8, SHORT_TIMEOUT, Some("adaptive")),
        ),
    ]);
    let server = TestServer::start(repo.path()).await;

    // Triton's semantics: a lone request waits for the 30 s window, so its 200 ms queue timeout
    // expires first.
    let status = infer(&server, Model::AddSub.request("held", 1))
        .await
        .expect_err("the window outlasts the queue timeout");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("Request timeout expired"),
        "{status:?}"
    );

    // Adaptive: nothing says more requests will come while it waits, so it runs at once, every
    // time (one request in flight never brings a second one).
    for seed in 0..5 {
        let resp = infer(&server, Model::AddSub.request("capped", seed))
            .await
            .expect("the window is only a cap");
        assert_eq!(resp.outputs.len(), 2);
    }
    let capped = server.statistics("capped").await;
    assert_eq!(capped.execution_count, 5);

    let text = scrape(&server).await;
    let capped = formed(&text, "capped");
    assert_eq!(of(&capped, "adaptive_early").1, 5.0, "{capped:?}");
    assert_eq!(of(&capped, "window_expired").1, 0.0);
    let held = formed(&text, "held");
    assert!(
        held.iter().all(|(_, batches, _)| *batches == 0.0),
        "the timed-out request never ran"
    );
    let held_timeouts = sample(
        &text,
        "nv_inference_request_failure",
        &[("model", "held"), ("reason", "CANCELED")],
    );
    assert_eq!(held_timeouts, 1.0);

    // Each model reports the strategy it set; the one that set none shows none (Triton's).
    assert_eq!(
        reported_parameters(&server, "capped")
            .await
            .get("batching_strategy")
            .map(String::as_str),
        Some("adaptive")
    );
    assert!(!reported_parameters(&server, "held")
        .await
        .contains_key("batching_strategy"));
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_default_applies_to_models_that_set_no_strategy() {
    let repo = repository(&[
        (
            "defaulted",
            Model::AddSub,
            config("defaulted", Model::AddSub, 8, SHORT_TIMEOUT, None),
        ),
        (
            "pinned",
            Model::AddSub,
            config("pinned", Model::AddSub, 8, SHORT_TIMEOUT, Some("triton")),
        ),
    ]);
    let mut config = Config::for_repository(repo.path());
    config.models.default_batching_strategy = BatchingStrategy::Adaptive;
    let server = TestServer::start_with(config).await;

    infer(&server, Model::AddSub.request("defaulted", 1))
        .await
        .expect("adaptive by the server's default: runs at once");
    let status = infer(&server, Model::AddSub.request("pinned", 2))
        .await
        .expect_err("the model's own triton strategy wins over the default");
    assert!(
        status.message().contains("Request timeout expired"),
        "{status:?}"
    );

    // The reported config shows the strategy the default gave.
    let defaulted = reported_parameters(&server, "defaulted").await;
    assert_eq!(
        defaulted.get("batching_strategy").map(String::as_str),
        Some("adaptive")
    );
    let pinned = reported_parameters(&server, "pinned").await;
    assert_eq!(
        pinned.get("batching_strategy").map(String::as_str),
        Some("triton")
    );
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_form_under_concurrency_with_both_strategies() {
    let repo = repository(&[
        (
            "mlp_triton",
            Model::Mlp,
            config("mlp_triton", Model::Mlp, 8, "", None),
        ),
        (
            "mlp_adaptive",
            Model::Mlp,
            config("mlp_adaptive", Model::Mlp, 8, "", Some("adaptive")),
        ),
    ]);
    let server = TestServer::start(repo.path()).await;

    // Triton: 16 requests and a 30 s window make exactly two full batches of 8.
    concurrent_round(&server, "mlp_triton", Model::Mlp, 0).await;
    let triton = server.statistics("mlp_triton").await;
    assert_eq!(triton.inference_count, IN_FLIGHT as u64);
    assert_eq!(triton.execution_count, 2);

    // Adaptive: a request that finds the instance idle goes at once (with whatever arrived in the
    // same reactor tick); the others queue while it runs and go together. A round where every
    // request found the instance idle is possible in principle, so rounds repeat (a bounded
    // number) until some batch held more than one request.
    const MAX_ROUNDS: u32 = 10;
    let mut rounds = 0;
    while rounds < MAX_ROUNDS {
        concurrent_round(&server, "mlp_adaptive", Model::Mlp, rounds).await;
        rounds += 1;
        let s = server.statistics("mlp_adaptive").await;
        if s.execution_count < s.inference_count {
            break;
        }
    }
    let adaptive = server.statistics("mlp_adaptive").await;
    let requests = u64::from(rounds) * IN_FLIGHT as u64;
    assert_eq!(adaptive.inference_count, requests);
    assert!(
        adaptive.execution_count < requests,
        "{} executions for {requests} requests in {rounds} rounds",
        adaptive.execution_count
    );

    // /metrics: every execution is a batch formed, with its rows, and says why it went.
    let text = scrape(&server).await;
    for (model, stats) in [("mlp_triton", &triton), ("mlp_adaptive", &adaptive)] {
        let formed = formed(&text, model);
        let batches: f64 = formed.iter().map(|(_, b, _)| b).sum();
        let rows: f64 = formed.iter().map(|(_, _, r)| r).sum();
        assert_eq!(batches, stats.execution_count as f64, "{model}: {formed:?}");
        assert_eq!(rows, stats.inference_count as f64, "{model}: {formed:?}");
        assert_eq!(
            of(&formed, "window_expired").1,
            0.0,
            "{model}: never waited 30 s"
        );
        assert_eq!(of(&formed, "other").1, 0.0);
        let waits = sample(
            &text,
            "onnx_gateway_batch_wait_seconds_count",
            &[("model", model)],
        );
        assert_eq!(waits, stats.execution_count as f64);
    }
    let triton_formed = formed(&text, "mlp_triton");
    assert_eq!(of(&triton_formed, "full").1, 2.0);
    assert_eq!(of(&triton_formed, "full").2, 16.0);
    // Adaptive never waits for the window: each batch went full, early, or after a short wait of
    // its own choosing. Which depends on how the round's arrivals fell against the instance's runs
    // (a round whose 16 requests all queued within one reactor tick makes two full batches), so
    // only their sum is fixed.
    let adaptive_formed = formed(&text, "mlp_adaptive");
    assert_eq!(of(&adaptive_formed, "window_expired").1, 0.0);
    assert_eq!(
        of(&adaptive_formed, "full").1
            + of(&adaptive_formed, "adaptive_early").1
            + of(&adaptive_formed, "adaptive_waited").1,
        adaptive.execution_count as f64,
        "{adaptive_formed:?}"
    );
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_strategy_fails_the_load_naming_the_allowed_values() {
    let repo = repository(&[(
        "odd",
        Model::AddSub,
        config("odd", Model::AddSub, 8, "", Some("fastest")),
    )]);
    let mut config = Config::for_repository(repo.path());
    config.models.model_control_mode = ModelControlMode::Explicit;
    let server = TestServer::start_with(config).await;
    let mut client = server.client().await;
    let status = client
        .repository_model_load(RepositoryModelLoadRequest {
            model_name: "odd".into(),
            ..Default::default()
        })
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    for needle in [
        "parameters.batching_strategy is \"fastest\"",
        "allowed values: \"triton\", \"adaptive\"",
    ] {
        assert!(status.message().contains(needle), "{needle}: {status:?}");
    }
    server.stop().await.unwrap();
}
