//! The dynamic batcher over real gRPC: shared executions inside a delay window, queue bounds,
//! queue timeouts, priority levels, several instances and cancelled requests.
//!
//! Every test holds requests in the queue with a delay window far longer than the test
//! (`max_queue_delay_microseconds` of 30 s) and a preferred batch size of 4 rows: a batch is
//! dispatched exactly when its rows reach 4, or when the next request cannot join it. That makes
//! every dispatch decision a consequence of what the test sent, never of timing. Whether a request
//! has been admitted is read from the pending-request gauge on /metrics, polled with a deadline.
mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use common::*;
use onnx_gateway::proto::infer_parameter::ParameterChoice;
use onnx_gateway::proto::model_infer_request::InferInputTensor;
use onnx_gateway::proto::*;
use parking_lot::Mutex;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;
use tonic::Code;

/// Far longer than any test: a request held by it is dispatched only by what the test sends next.
const HOLD_US: u64 = 30_000_000;
/// How long a test waits for something that must happen (never for something that must not).
const PATIENCE: Duration = Duration::from_secs(20);

/// config.pbtxt of an add_sub copy (FP32 [rows, 16] x2 -> sum, difference).
fn add_sub_config(name: &str, max_batch_size: u32, scheduling: &str, instances: u32) -> String {
    let tensor = |n: &str| format!("{{ name: \"{n}\" data_type: TYPE_FP32 dims: [ 16 ] }}");
    format!(
        "name: \"{name}\"\nbackend: \"onnxruntime\"\nmax_batch_size: {max_batch_size}\n\
         input [ {}, {} ]\noutput [ {}, {} ]\n{scheduling}\n\
         instance_group [ {{ count: {instances} kind: KIND_CPU }} ]\n",
        tensor("INPUT0"),
        tensor("INPUT1"),
        tensor("OUTPUT0"),
        tensor("OUTPUT1"),
    )
}

/// A dynamic_batching block that holds requests until 4 rows are queued.
fn held_batching(extra: &str) -> String {
    format!(
        "dynamic_batching {{ preferred_batch_size: [ 4 ] max_queue_delay_microseconds: {HOLD_US} {extra} }}"
    )
}

/// A repository of add_sub copies, one per (name, config.pbtxt).
fn repository(models: &[(&str, String)]) -> TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    let onnx = example_models().join("add_sub/1/model.onnx");
    for (name, config) in models {
        let version = dir.path().join(name).join("1");
        std::fs::create_dir_all(&version).expect("model dir");
        std::fs::copy(&onnx, version.join("model.onnx")).expect("copy model");
        std::fs::write(dir.path().join(name).join("config.pbtxt"), config).expect("config");
    }
    dir
}

/// Inputs of one request: `rows` rows, values derived from `seed` so every request differs.
fn inputs(seed: u32, rows: usize) -> (Vec<f32>, Vec<f32>) {
    let n = rows * 16;
    let a = (0..n).map(|i| seed as f32 * 100.0 + i as f32).collect();
    let b = (0..n).map(|i| (i as f32) * 0.5 - seed as f32).collect();
    (a, b)
}

fn infer_request(model: &str, seed: u32, rows: usize) -> ModelInferRequest {
    let (a, b) = inputs(seed, rows);
    let input = |name: &str| InferInputTensor {
        name: name.into(),
        datatype: "FP32".into(),
        shape: vec![rows as i64, 16],
        ..Default::default()
    };
    ModelInferRequest {
        model_name: model.into(),
        id: format!("seed-{seed}"),
        inputs: vec![input("INPUT0"), input("INPUT1")],
        raw_input_contents: vec![f32_bytes(&a), f32_bytes(&b)],
        ..Default::default()
    }
}

fn with_param(mut req: ModelInferRequest, key: &str, value: i64) -> ModelInferRequest {
    req.parameters.insert(
        key.into(),
        InferParameter {
            parameter_choice: Some(ParameterChoice::Int64Param(value)),
        },
    );
    req
}

/// OUTPUT0 and OUTPUT1 of a response, by name.
fn outputs(resp: &ModelInferResponse) -> HashMap<String, Vec<f32>> {
    resp.outputs
        .iter()
        .zip(&resp.raw_output_contents)
        .map(|(meta, raw)| (meta.name.clone(), f32_from(raw)))
        .collect()
}

/// Checks a response against the arithmetic add_sub does (exact in FP32 for these values).
fn assert_add_sub(resp: &ModelInferResponse, seed: u32, rows: usize) {
    let (a, b) = inputs(seed, rows);
    let out = outputs(resp);
    let sum: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
    let diff: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x - y).collect();
    assert_eq!(out["OUTPUT0"], sum, "OUTPUT0 of request {seed}");
    assert_eq!(out["OUTPUT1"], diff, "OUTPUT1 of request {seed}");
    assert_eq!(resp.outputs[0].shape, vec![rows as i64, 16]);
    assert_eq!(resp.id, format!("seed-{seed}"));
}

type Pending = JoinHandle<Result<ModelInferResponse, tonic::Status>>;

/// Sends a request on its own task; the test awaits it later.
async fn send(server: &TestServer, req: ModelInferRequest) -> Pending {
    let mut client = server.client().await;
    tokio::spawn(async move { client.model_infer(req).await.map(|r| r.into_inner()) })
}

/// Sends a request and returns once the gateway has admitted it (the model's pending count rose).
async fn send_admitted(server: &TestServer, model: &str, req: ModelInferRequest) -> Pending {
    let before = pending(server, model).await;
    let task = send(server, req).await;
    wait_for(
        || async { pending(server, model).await > before },
        "request admitted",
    )
    .await;
    task
}

async fn answer(task: Pending) -> Result<ModelInferResponse, tonic::Status> {
    tokio::time::timeout(PATIENCE, task)
        .await
        .expect("request answered in time")
        .expect("request task")
}

/// Polls `check` until it holds; fails the test after PATIENCE.
async fn wait_for<F, Fut>(mut check: F, what: &str)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// GET on the admin listener with a bare HTTP/1.1 exchange (no HTTP client crate needed).
async fn admin_get(server: &TestServer, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(server.admin_addr)
        .await
        .expect("admin connect");
    let head = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    stream.write_all(head.as_bytes()).await.expect("write");
    let mut body = String::new();
    stream.read_to_string(&mut body).await.expect("read");
    body
}

/// The model's nv_inference_pending_request_count: requests admitted and not yet answered.
async fn pending(server: &TestServer, model: &str) -> u64 {
    let text = admin_get(server, "/metrics").await;
    let label = format!("model=\"{model}\"");
    text.lines()
        .find(|l| l.starts_with("nv_inference_pending_request_count{") && l.contains(&label))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no pending gauge for {model} in:\n{text}"))
}

/// Executions per batch size, from batch_stats.
fn executions_by_size(stats: &ModelStatistics) -> BTreeMap<u64, u64> {
    stats
        .batch_stats
        .iter()
        .map(|b| {
            (
                b.batch_size,
                b.compute_infer.as_ref().map_or(0, |d| d.count),
            )
        })
        .collect()
}

fn count(d: &Option<StatisticDuration>) -> u64 {
    d.as_ref().map_or(0, |d| d.count)
}

#[tokio::test]
async fn concurrent_requests_in_the_delay_window_share_one_execution() {
    let repo = repository(&[
        (
            "batched",
            add_sub_config("batched", 8, &held_batching(""), 1),
        ),
        ("plain", add_sub_config("plain", 8, "", 1)),
    ]);
    let server = TestServer::start(repo.path()).await;

    // Four batch-1 requests at once: none can go before the fourth arrives.
    let mut tasks = Vec::new();
    for seed in 0..4 {
        tasks.push(send(&server, infer_request("batched", seed, 1)).await);
    }
    let mut batched = Vec::new();
    for (seed, task) in (0..4).zip(tasks) {
        let resp = answer(task).await.expect("batched request");
        assert_add_sub(&resp, seed, 1);
        batched.push(resp);
    }
    // Rows of different requests are split back correctly: 2 + 1 + 1 rows make the second batch.
    let mixed: Vec<(u32, usize)> = vec![(10, 2), (11, 1), (12, 1)];
    let mut tasks = Vec::new();
    for &(seed, rows) in &mixed {
        tasks.push(send(&server, infer_request("batched", seed, rows)).await);
    }
    for (&(seed, rows), task) in mixed.iter().zip(tasks) {
        let resp = answer(task).await.expect("mixed request");
        assert_add_sub(&resp, seed, rows);
        batched.push(resp);
    }

    // Each response is what the request alone gives on an unbatched copy of the model.
    let mut client = server.client().await;
    let seeds = (0..4).map(|s| (s, 1)).chain(mixed.iter().copied());
    for ((seed, rows), resp) in seeds.zip(&batched) {
        let alone = client
            .model_infer(infer_request("plain", seed, rows))
            .await
            .expect("plain request")
            .into_inner();
        assert_eq!(alone.raw_output_contents, resp.raw_output_contents);
    }

    let stats = server.statistics("batched").await;
    assert_eq!(stats.inference_count, 8, "rows inferred");
    assert_eq!(stats.execution_count, 2, "two executions of 4 rows");
    assert!(stats.execution_count < stats.inference_count);
    assert_eq!(executions_by_size(&stats), BTreeMap::from([(4, 2)]));
    let infer = stats.inference_stats.expect("inference_stats");
    assert_eq!(count(&infer.success), 7, "seven requests succeeded");
    assert_eq!(count(&infer.fail), 0);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_full_queue_refuses_at_once() {
    let batching = held_batching("default_queue_policy { max_queue_size: 1 }");
    let repo = repository(&[("bounded", add_sub_config("bounded", 4, &batching, 1))]);
    let server = TestServer::start(repo.path()).await;

    let held = send_admitted(&server, "bounded", infer_request("bounded", 0, 1)).await;
    let mut client = server.client().await;
    let refused = client
        .model_infer(infer_request("bounded", 1, 1))
        .await
        .expect_err("the queue holds one request");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("Exceeds maximum queue size"),
        "{refused:?}"
    );

    // The held request's client gives up; its place is free again at once.
    held.abort();
    let _ = held.await;
    wait_for(
        || async { pending(&server, "bounded").await == 0 },
        "abandoned request withdrawn",
    )
    .await;
    let full_batch = client
        .model_infer(infer_request("bounded", 2, 4))
        .await
        .expect("a 4-row request runs at once")
        .into_inner();
    assert_add_sub(&full_batch, 2, 4);

    let stats = server.statistics("bounded").await;
    assert_eq!(stats.execution_count, 1, "the abandoned request never ran");
    assert_eq!(stats.inference_count, 4);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_request_past_its_queue_timeout_is_rejected() {
    let batching = held_batching(&format!(
        "default_queue_policy {{ timeout_action: REJECT default_timeout_microseconds: {HOLD_US} \
         allow_timeout_override: true }}"
    ));
    let repo = repository(&[("timed", add_sub_config("timed", 4, &batching, 1))]);
    let server = TestServer::start(repo.path()).await;

    // One request keeps the model's default timeout (as long as the hold), one shortens it.
    let patient = send_admitted(&server, "timed", infer_request("timed", 0, 1)).await;
    let hasty = send(
        &server,
        with_param(infer_request("timed", 1, 1), "timeout", 100_000),
    )
    .await;
    let status = answer(hasty).await.expect_err("timed out in the queue");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("Request timeout expired"),
        "{status:?}"
    );
    assert_eq!(
        pending(&server, "timed").await,
        1,
        "the other one still waits"
    );

    // Three more rows complete the held batch.
    let release = send(&server, infer_request("timed", 2, 3)).await;
    assert_add_sub(&answer(patient).await.expect("patient request"), 0, 1);
    assert_add_sub(&answer(release).await.expect("release request"), 2, 3);

    let stats = server.statistics("timed").await;
    assert_eq!(stats.execution_count, 1);
    assert_eq!(executions_by_size(&stats), BTreeMap::from([(4, 1)]));
    let infer = stats.inference_stats.expect("inference_stats");
    assert_eq!(count(&infer.fail), 1, "the timed-out request");
    assert_eq!(count(&infer.success), 2);
    server.stop().await.unwrap();
}

/// Three level-2 requests wait (3 rows, short of the preferred 4). A 2-row level-1 request sent
/// after them goes to the head of the queue: the batch dispatched is that request plus the two
/// oldest level-2 ones, and the third level-2 request, sent before it, is left waiting. In arrival
/// order (no priorities) the three level-2 requests would have gone first and the 2-row request
/// would be the one left waiting.
#[tokio::test]
async fn a_higher_priority_request_is_answered_before_earlier_lower_ones() {
    let batching = held_batching("priority_levels: 2 default_priority_level: 2");
    let repo = repository(&[("ranked", add_sub_config("ranked", 4, &batching, 1))]);
    let server = TestServer::start(repo.path()).await;

    let mut low = Vec::new();
    for seed in 0..3 {
        let req = with_param(infer_request("ranked", seed, 1), "priority", 2);
        low.push(send_admitted(&server, "ranked", req).await);
    }
    let high = send(
        &server,
        with_param(infer_request("ranked", 10, 2), "priority", 1),
    )
    .await;
    assert_add_sub(&answer(high).await.expect("high priority"), 10, 2);
    let last_low = low.pop().expect("three low requests");
    for (seed, task) in (0..2).zip(low) {
        assert_add_sub(&answer(task).await.expect("low priority"), seed, 1);
    }
    wait_for(
        || async { pending(&server, "ranked").await == 1 },
        "only the third level-2 request left",
    )
    .await;
    assert!(!last_low.is_finished(), "the third level-2 request waits");
    let stats = server.statistics("ranked").await;
    assert_eq!(stats.execution_count, 1);

    // Release it with three more level-2 rows.
    let release = send(
        &server,
        with_param(infer_request("ranked", 20, 3), "priority", 2),
    )
    .await;
    assert_add_sub(&answer(last_low).await.expect("last low"), 2, 1);
    assert_add_sub(&answer(release).await.expect("release"), 20, 3);
    let stats = server.statistics("ranked").await;
    assert_eq!(executions_by_size(&stats), BTreeMap::from([(4, 2)]));
    server.stop().await.unwrap();
}

/// Records which (model, instance) ran each batch, from the scheduler's `execute_batch` spans.
#[derive(Default)]
struct BatchSpans {
    seen: Mutex<Vec<(String, u64)>>,
}

struct SpanFields {
    model: Option<String>,
    instance: Option<u64>,
}

impl tracing::field::Visit for SpanFields {
    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        if field.name() == "instance" {
            self.instance = Some(value);
        }
    }
    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        if field.name() == "instance" {
            self.instance = u64::try_from(value).ok();
        }
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "model" {
            self.model = Some(value.to_string());
        }
    }
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "model" {
            self.model = Some(format!("{value:?}").trim_matches('"').to_string());
        }
    }
}

struct BatchSpanLayer(Arc<BatchSpans>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for BatchSpanLayer {
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        _id: &tracing::span::Id,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if attrs.metadata().name() != "execute_batch" {
            return;
        }
        let mut fields = SpanFields {
            model: None,
            instance: None,
        };
        attrs.record(&mut fields);
        if let (Some(model), Some(instance)) = (fields.model, fields.instance) {
            self.0.seen.lock().push((model, instance));
        }
    }
}

/// The process-wide span recorder (a global subscriber can be installed once per test binary).
fn batch_spans() -> Arc<BatchSpans> {
    static SPANS: OnceLock<Arc<BatchSpans>> = OnceLock::new();
    SPANS
        .get_or_init(|| {
            use tracing_subscriber::layer::SubscriberExt;
            let spans = Arc::new(BatchSpans::default());
            let subscriber = tracing_subscriber::registry().with(BatchSpanLayer(spans.clone()));
            tracing::subscriber::set_global_default(subscriber).expect("no other subscriber");
            spans
        })
        .clone()
}

/// A 1-row request waits; a 4-row request cannot join it (it would pass 4 rows), so the waiting
/// one is dispatched at once, and the 4-row batch, complete by itself, goes in the same pass to
/// the other instance, which is free: both instances run a batch.
#[tokio::test]
async fn two_instances_both_serve_requests() {
    let spans = batch_spans();
    let repo = repository(&[("twin", add_sub_config("twin", 4, &held_batching(""), 2))]);
    let server = TestServer::start(repo.path()).await;

    let small = send_admitted(&server, "twin", infer_request("twin", 0, 1)).await;
    let large = send(&server, infer_request("twin", 1, 4)).await;
    assert_add_sub(&answer(small).await.expect("1-row request"), 0, 1);
    assert_add_sub(&answer(large).await.expect("4-row request"), 1, 4);

    let instances: BTreeSet<u64> = spans
        .seen
        .lock()
        .iter()
        .filter(|(model, _)| model == "twin")
        .map(|(_, instance)| *instance)
        .collect();
    assert_eq!(
        instances,
        BTreeSet::from([0, 1]),
        "each instance ran one batch"
    );
    let stats = server.statistics("twin").await;
    assert_eq!(executions_by_size(&stats), BTreeMap::from([(1, 1), (4, 1)]));
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_request_whose_deadline_passes_in_the_queue_never_runs() {
    let repo = repository(&[(
        "deadline",
        add_sub_config("deadline", 4, &held_batching(""), 1),
    )]);
    let server = TestServer::start(repo.path()).await;

    let mut client = server.client().await;
    let mut request = tonic::Request::new(infer_request("deadline", 0, 1));
    request.set_timeout(Duration::from_millis(200));
    let status = client
        .model_infer(request)
        .await
        .expect_err("the deadline passes while the request waits");
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    // The gateway drops it from the queue and counts it as failed, without running it.
    wait_for(
        || async {
            let stats = server.statistics("deadline").await;
            count(&stats.inference_stats.and_then(|s| s.fail)) == 1
        },
        "the abandoned request counted as failed",
    )
    .await;
    assert_eq!(pending(&server, "deadline").await, 0);

    // Four new rows form a batch of exactly 4: the abandoned request did not join it.
    let mut tasks = Vec::new();
    for seed in 1..5 {
        tasks.push(send(&server, infer_request("deadline", seed, 1)).await);
    }
    for (seed, task) in (1..5).zip(tasks) {
        assert_add_sub(&answer(task).await.expect("later request"), seed, 1);
    }
    let stats = server.statistics("deadline").await;
    assert_eq!(stats.inference_count, 4);
    assert_eq!(stats.execution_count, 1);
    assert_eq!(executions_by_size(&stats), BTreeMap::from([(4, 1)]));
    server.stop().await.unwrap();
}

/// The value of `name{model="…"}` on /metrics.
async fn model_counter(server: &TestServer, name: &str, model: &str) -> f64 {
    let text = admin_get(server, "/metrics").await;
    let label = format!("model=\"{model}\"");
    text.lines()
        .find(|l| l.starts_with(&format!("{name}{{")) && l.contains(&label))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} for {model} in:\n{text}"))
}

/// Until a model's cost shape is known, a long inline batch runs as two executions of half its
/// requests (`answer_split::Plan::RunInHalves`), and every caller still gets its own rows. Batches
/// of 16 from 16 callers (a window far longer than the test, so each batch is exactly one round):
/// the first, with no cost known yet, runs whole on the instance thread; the next two run on the
/// request's task, in halves, since three runs (16, 8, 8) are too few to fit the shape. None of
/// them has its answers split, which waits for the shape (the split is tested in the scheduler).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_run_in_halves_to_learn_the_cost_answer_each_caller_its_own_rows() {
    let batching =
        "dynamic_batching { preferred_batch_size: [ 16 ] max_queue_delay_microseconds: 30000000 }";
    let repo = repository(&[("halves", add_sub_config("halves", 16, batching, 1))]);
    let mut config = onnx_gateway::Config::for_repository(repo.path());
    config.models.inline_execution_max_microseconds = Some(10_000);
    config.models.split_answers_min_microseconds = 1;
    let server = TestServer::start_with(config).await;
    for round in 0..3 {
        let mut tasks = Vec::new();
        for i in 0..16 {
            let seed = round * 100 + i;
            tasks.push((seed, send(&server, infer_request("halves", seed, 1)).await));
        }
        for (seed, task) in tasks {
            assert_add_sub(&answer(task).await.expect("answered"), seed, 1);
        }
    }
    let stats = server.statistics("halves").await;
    assert_eq!(
        executions_by_size(&stats),
        BTreeMap::from([(16, 1), (8, 4)])
    );
    let split = model_counter(&server, "onnx_gateway_batch_answers_split_total", "halves").await;
    assert_eq!(
        split, 0.0,
        "no answers split before the cost shape is known"
    );
    server.stop().await.unwrap();
}
