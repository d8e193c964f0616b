//! Observability end to end: what an operator's tools read from a running gateway.
//!
//! - /metrics after a known number of good and bad requests: exact counters, consistent histograms,
//!   gRPC calls by method and code, load durations and process metrics; ModelStatistics reads the
//!   same numbers; `promtool check metrics` accepts a real scrape.
//! - /v2/health/live and /v2/health/ready as Triton answers them: ready, never ready (strict
//!   readiness with a broken model), and draining.
//! - The real binary exporting OTLP traces (gRPC and HTTP/protobuf) to a receiver inside the test:
//!   the caller's trace continues through `infer`, with `queue` and `compute` children and a linked
//!   `execute_batch` span.
//! - The real binary's JSON logs: every line parses, request lines carry the request's span fields,
//!   and the default level writes no line per successful request.
mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::otlp::{start_grpc_receiver, start_http_receiver, Exports, Receiver};
use common::*;
use onnx_gateway::proto::model_infer_request::InferInputTensor;
use onnx_gateway::proto::*;
use onnx_gateway::telemetry::metrics::TRITON_COMPAT_METRICS;
use onnx_gateway::{Config, Gateway};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::Span as OtlpSpan;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::oneshot;
use tonic::Code;

// ---------------------------------------------------------------------------------------------
// Requests

/// A repository holding only add_sub (FP32 [-1,16] x2, max_batch_size 8), so startup is quick.
fn add_sub_repo() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_model(
        &example_models().join("add_sub"),
        &dir.path().join("add_sub"),
    );
    dir
}

/// Copies a model directory: its files and its version directories' files.
fn copy_model(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_model(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A valid add_sub request of `rows` rows.
fn good_request(id: &str, rows: usize) -> ModelInferRequest {
    let input = |name: &str| InferInputTensor {
        name: name.into(),
        datatype: "FP32".into(),
        shape: vec![rows as i64, 16],
        ..Default::default()
    };
    let values: Vec<f32> = (0..rows * 16).map(|i| i as f32).collect();
    ModelInferRequest {
        model_name: "add_sub".into(),
        id: id.into(),
        inputs: vec![input("INPUT0"), input("INPUT1")],
        raw_input_contents: vec![f32_bytes(&values), f32_bytes(&values)],
        ..Default::default()
    }
}

/// Requests the server must refuse with INVALID_ARGUMENT before queueing them.
fn bad_requests() -> Vec<ModelInferRequest> {
    let mut wrong_dtype = good_request("bad-dtype", 1);
    wrong_dtype.inputs[0].datatype = "INT32".into();
    let mut wrong_shape = good_request("bad-shape", 1);
    wrong_shape.inputs[1].shape = vec![1, 15];
    let mut missing = good_request("bad-missing", 1);
    missing.inputs.pop();
    missing.raw_input_contents.pop();
    vec![wrong_dtype, wrong_shape, missing]
}

/// Sends the good requests one after another (so each runs as its own execution) and the bad ones;
/// returns the rows inferred.
async fn send_traffic(client: &mut Client, good_rows: &[usize]) -> usize {
    for (i, rows) in good_rows.iter().enumerate() {
        let response = client
            .model_infer(good_request(&format!("good-{i}"), *rows))
            .await
            .expect("good request succeeds")
            .into_inner();
        assert_eq!(response.outputs.len(), 2);
    }
    for request in bad_requests() {
        let status = client.model_infer(request).await.expect_err("bad request");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    }
    good_rows.iter().sum()
}

// ---------------------------------------------------------------------------------------------
// The admin HTTP server and the Prometheus text format

/// One plain HTTP/1.1 GET on a fresh connection: (status, body).
async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect to admin HTTP {addr}: {e}"));
    let head = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let raw = String::from_utf8(raw).expect("UTF-8 response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a complete response");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("status line: {head}"));
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    (status, body)
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").expect("chunk size line");
        let size = usize::from_str_radix(size.trim(), 16).expect("hex chunk size");
        if size == 0 {
            return out;
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
}

async fn scrape(admin: SocketAddr) -> String {
    let (status, body) = http_get(admin, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    body
}

#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A parsed scrape: samples in order, and each family's `# TYPE`.
#[derive(Debug, Default)]
struct Scrape {
    samples: Vec<Sample>,
    types: HashMap<String, String>,
    helps: HashMap<String, String>,
}

impl Scrape {
    /// Parses the text format strictly enough that a malformed line fails the test.
    fn parse(text: &str) -> Scrape {
        let mut scrape = Scrape::default();
        for line in text.lines() {
            if line.is_empty() {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
                let old = scrape.types.insert(name.into(), kind.into());
                assert!(old.is_none(), "second TYPE for {name}");
                continue;
            }
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').expect("HELP name text");
                scrape.helps.insert(name.into(), help.into());
                continue;
            }
            assert!(!line.starts_with('#'), "unexpected comment: {line}");
            scrape.samples.push(parse_sample(line));
        }
        scrape
    }

    /// Samples of `name` whose labels include every pair in `labels`.
    fn find<'a>(&'a self, name: &'a str, labels: &'a [(&str, &str)]) -> Vec<&'a Sample> {
        self.samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect()
    }

    /// The value of the one sample of `name` with these labels.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        match self.find(name, labels).as_slice() {
            [one] => one.value,
            found => panic!("expected one {name}{labels:?}, found {found:?}"),
        }
    }

    /// The family a sample belongs to: its name less a histogram suffix.
    fn family_of<'a>(&self, name: &'a str) -> &'a str {
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix) {
                if self.types.get(base).map(String::as_str) == Some("histogram") {
                    return base;
                }
            }
        }
        name
    }
}

fn parse_sample(line: &str) -> Sample {
    let (name_and_labels, value) = line.rsplit_once(' ').expect("sample value");
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v
            .parse()
            .unwrap_or_else(|e| panic!("value {v:?} in {line}: {e}")),
    };
    let (name, labels) = match name_and_labels.split_once('{') {
        None => (name_and_labels, BTreeMap::new()),
        Some((name, rest)) => {
            let inner = rest.strip_suffix('}').expect("closing brace");
            (name, parse_labels(inner))
        }
    };
    Sample {
        name: name.into(),
        labels,
        value,
    }
}

/// `k="v",k2="v2"` with `\\`, `\"` and `\n` escapes in values.
fn parse_labels(mut s: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    while !s.is_empty() {
        let (key, rest) = s.split_once("=\"").expect("label=\"value\"");
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next().expect("unterminated label value") {
                (i, '"') => break i,
                (_, '\\') => match chars.next().expect("escape").1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        labels.insert(key.to_string(), value);
        s = rest[end + 1..]
            .strip_prefix(',')
            .unwrap_or(&rest[end + 1..]);
    }
    labels
}

/// A series' labels but `le`, in order.
type Labels = Vec<(String, String)>;

/// Every histogram series is well formed: buckets in ascending `le` with non-decreasing counts,
/// a +Inf bucket equal to `_count`, and a non-negative `_sum`.
fn check_histograms(scrape: &Scrape) {
    let histograms: Vec<&String> = scrape
        .types
        .iter()
        .filter(|(_, kind)| *kind == "histogram")
        .map(|(name, _)| name)
        .collect();
    assert!(!histograms.is_empty());
    for family in histograms {
        let mut series: BTreeMap<Labels, Vec<(f64, f64)>> = BTreeMap::new();
        for s in scrape.find(&format!("{family}_bucket"), &[]) {
            let mut labels = s.labels.clone();
            let le = labels.remove("le").expect("bucket without le");
            let le: f64 = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap()
            };
            series
                .entry(labels.into_iter().collect())
                .or_default()
                .push((le, s.value));
        }
        for (labels, buckets) in series {
            let pairs: Vec<(&str, &str)> = labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            for w in buckets.windows(2) {
                assert!(w[0].0 < w[1].0, "{family}{labels:?}: le not ascending");
                assert!(w[0].1 <= w[1].1, "{family}{labels:?}: counts decrease");
            }
            let (le, inf) = *buckets.last().unwrap();
            assert_eq!(le, f64::INFINITY, "{family}{labels:?}: last bucket is +Inf");
            let count = scrape.value(&format!("{family}_count"), &pairs);
            assert_eq!(inf, count, "{family}{labels:?}: +Inf bucket == _count");
            let sum = scrape.value(&format!("{family}_sum"), &pairs);
            assert!(sum >= 0.0, "{family}{labels:?}: _sum {sum}");
        }
    }
}

const ADD_SUB: [(&str, &str); 2] = [("model", "add_sub"), ("version", "1")];

fn with_model<'a>(extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    ADD_SUB
        .iter()
        .copied()
        .chain(extra.iter().copied())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_exactly_what_was_sent_and_model_statistics_agree() {
    let repo = add_sub_repo();
    let server = TestServer::start(repo.path()).await;
    let mut client = server.client().await;
    let good_rows = [1, 2, 3, 1, 2];
    let rows = send_traffic(&mut client, &good_rows).await;
    let good = good_rows.len() as f64;
    let bad = bad_requests().len() as f64;

    let text = scrape(server.admin_addr).await;
    let m = Scrape::parse(&text);

    // Every sample belongs to a family with a TYPE and a HELP.
    for s in &m.samples {
        let family = m.family_of(&s.name);
        assert!(m.types.contains_key(family), "no TYPE for {}", s.name);
        assert!(m.helps.contains_key(family), "no HELP for {}", s.name);
    }

    // Triton's counters, exact.
    assert_eq!(m.value("nv_inference_request_success", &ADD_SUB), good);
    let failure = |reason| {
        m.value(
            "nv_inference_request_failure",
            &with_model(&[("reason", reason)]),
        )
    };
    assert_eq!(failure("REJECTED"), bad);
    for reason in ["CANCELED", "BACKEND", "OTHER"] {
        assert_eq!(failure(reason), 0.0, "{reason}");
    }
    assert_eq!(m.value("nv_inference_count", &ADD_SUB), rows as f64);
    // Sequential requests never share a batch.
    assert_eq!(m.value("nv_inference_exec_count", &ADD_SUB), good);
    assert_eq!(m.value("nv_inference_pending_request_count", &ADD_SUB), 0.0);
    for name in [
        "nv_inference_request_duration_us",
        "nv_inference_queue_duration_us",
        "nv_inference_compute_input_duration_us",
        "nv_inference_compute_infer_duration_us",
        "nv_inference_compute_output_duration_us",
    ] {
        assert!(m.value(name, &ADD_SUB) >= 0.0, "{name}");
    }
    assert!(m.value("nv_inference_request_duration_us", &ADD_SUB) > 0.0);
    assert!(m.value("nv_model_load_duration_secs", &ADD_SUB) > 0.0);

    // Histograms: well formed, and counting what was sent.
    check_histograms(&m);
    for family in [
        "onnx_gateway_request_duration_seconds",
        "onnx_gateway_queue_duration_seconds",
        "onnx_gateway_compute_duration_seconds",
    ] {
        assert_eq!(
            m.value(&format!("{family}_count"), &ADD_SUB),
            good,
            "{family}"
        );
    }
    assert_eq!(m.value("onnx_gateway_batch_size_count", &ADD_SUB), good);
    assert_eq!(
        m.value("onnx_gateway_batch_size_sum", &ADD_SUB),
        rows as f64
    );
    let one_row = with_model(&[("le", "1")]);
    assert_eq!(m.value("onnx_gateway_batch_size_bucket", &one_row), 2.0);

    // gRPC calls by method and code.
    let grpc = |method, code| {
        m.value(
            "onnx_gateway_grpc_requests_total",
            &[("method", method), ("code", code)],
        )
    };
    assert_eq!(grpc("ModelInfer", "OK"), good);
    assert_eq!(grpc("ModelInfer", "INVALID_ARGUMENT"), bad);
    assert!(m
        .find(
            "onnx_gateway_grpc_requests_total",
            &[("method", "ServerReady")]
        )
        .iter()
        .any(|s| s.value >= 1.0));
    assert_eq!(
        m.value(
            "onnx_gateway_grpc_request_duration_seconds_count",
            &[("method", "ModelInfer")]
        ),
        good + bad
    );

    // The process.
    for name in [
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_threads",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
    ] {
        assert!(m.value(name, &[]) > 0.0, "{name}");
    }
    assert!(m.value("process_cpu_seconds_total", &[]) >= 0.0);

    // ModelStatistics reads the same numbers: one source of truth.
    let stats = client
        .model_statistics(ModelStatisticsRequest {
            name: "add_sub".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let [stats] = stats.model_stats.as_slice() else {
        panic!("one version: {stats:?}");
    };
    assert_eq!(
        (stats.name.as_str(), stats.version.as_str()),
        ("add_sub", "1")
    );
    let inference = stats.inference_stats.as_ref().expect("inference_stats");
    let duration = |d: &Option<StatisticDuration>| *d.as_ref().expect("duration");
    let success = duration(&inference.success);
    assert_eq!(success.count as f64, good);
    assert_eq!(
        success.count as f64,
        m.value("nv_inference_request_success", &ADD_SUB)
    );
    assert_eq!(
        stats.inference_count as f64,
        m.value("nv_inference_count", &ADD_SUB)
    );
    assert_eq!(
        stats.execution_count as f64,
        m.value("nv_inference_exec_count", &ADD_SUB)
    );
    assert_eq!(
        duration(&inference.fail).count as f64,
        m.value(
            "nv_inference_request_failure",
            &with_model(&[("reason", "REJECTED")])
        )
    );
    // The cumulative durations are the very same nanoseconds, shown in microseconds.
    let us = |d: &Option<StatisticDuration>| (duration(d).ns / 1000) as f64;
    assert_eq!(
        us(&inference.success),
        m.value("nv_inference_request_duration_us", &ADD_SUB)
    );
    assert_eq!(
        us(&inference.queue),
        m.value("nv_inference_queue_duration_us", &ADD_SUB)
    );
    assert_eq!(
        us(&inference.compute_infer),
        m.value("nv_inference_compute_infer_duration_us", &ADD_SUB)
    );

    server.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// promtool

/// `promtool check metrics` on a real scrape. promtool comes from Debian's `prometheus` package,
/// which scripts/setup installs; where CI=true a missing promtool fails the test instead of
/// skipping it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_a_real_scrape() {
    let Some(promtool) = find_on_path("promtool") else {
        assert!(
            !in_ci(),
            "promtool is missing in CI: scripts/setup installs it (apt-get install prometheus)"
        );
        eprintln!("note: promtool not on PATH, skipping (scripts/setup installs it as root)");
        return;
    };
    let repo = add_sub_repo();
    let server = TestServer::start(repo.path()).await;
    let mut client = server.client().await;
    send_traffic(&mut client, &[1, 4]).await;
    let text = scrape(server.admin_addr).await;
    server.stop().await.unwrap();

    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(text.as_bytes()).unwrap();
    let output = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::from(file.reopen().unwrap()))
        .output()
        .expect("run promtool");
    let report = String::from_utf8_lossy(&output.stderr).to_string()
        + &String::from_utf8_lossy(&output.stdout);
    // 0: clean; 3: lint findings only; anything else: it could not parse the scrape.
    assert!(
        matches!(output.status.code(), Some(0 | 3)),
        "promtool failed ({:?}):\n{report}\n{text}",
        output.status
    );
    // Lint findings are accepted on the names Triton's dashboards fix, and on no other.
    for finding in report.lines().filter(|l| !l.trim().is_empty()) {
        let metric = finding.split_whitespace().next().unwrap_or_default();
        assert!(
            TRITON_COMPAT_METRICS.iter().any(|d| d.name == metric),
            "lint finding on a metric we named ourselves: {finding}"
        );
    }
}

/// CI=true (or any value but empty, 0 or false), as CI systems and .ci/run set it.
fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !matches!(v.trim(), "" | "0" | "false"))
}

fn find_on_path(program: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|candidate| candidate.is_file())
    })
}

// ---------------------------------------------------------------------------------------------
// Health endpoints

/// Polls `path` until it answers `want` (or fails after 60 s).
async fn wait_for_status(admin: SocketAddr, path: &str, want: u16) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if http_get(admin, path).await.0 == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{path} never answered {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_endpoints_answer_as_triton() {
    let repo = add_sub_repo();
    let server = TestServer::start(repo.path()).await;
    assert_eq!(
        http_get(server.admin_addr, "/v2/health/live").await,
        (200, String::new())
    );
    assert_eq!(
        http_get(server.admin_addr, "/v2/health/ready").await,
        (200, String::new())
    );
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_is_400_with_strict_readiness_and_a_broken_model() {
    let repo = add_sub_repo();
    std::fs::create_dir_all(repo.path().join("broken/1")).unwrap();
    std::fs::write(repo.path().join("broken/1/model.onnx"), b"not an onnx file").unwrap();

    // Without strict readiness the same repository is ready: the 400 below is the broken model.
    let mut config = Config::for_repository(repo.path());
    config.models.exit_on_error = false;
    config.models.strict_readiness = false;
    let server = TestServer::start_with(config).await;
    assert_eq!(http_get(server.admin_addr, "/v2/health/ready").await.0, 200);
    server.stop().await.unwrap();

    let mut config = Config::for_repository(repo.path());
    config.models.exit_on_error = false;
    let server = TestServer::spawn(config).await;
    let mut client = server.client().await;
    // Startup is over once add_sub serves and broken is listed as failed.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let index = client
            .repository_index(RepositoryIndexRequest::default())
            .await
            .map(|r| r.into_inner().models)
            .unwrap_or_default();
        let state = |name: &str| {
            index
                .iter()
                .find(|m| m.name == name)
                .map(|m| m.state.clone())
        };
        if state("broken").as_deref() == Some("UNAVAILABLE")
            && state("add_sub").as_deref() == Some("READY")
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "models never settled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    client
        .model_infer(good_request("still-serving", 1))
        .await
        .unwrap();
    assert_eq!(http_get(server.admin_addr, "/v2/health/live").await.0, 200);
    assert_eq!(http_get(server.admin_addr, "/v2/health/ready").await.0, 400);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_is_400_while_draining_and_the_rest_keeps_answering() {
    let repo = add_sub_repo();
    let mut config = Config::for_repository(repo.path());
    // Long enough that the drain is still on when the test looks; the test ends it by aborting.
    config.lifecycle.drain_delay_secs = 600;
    let gateway = Gateway::bind(config).await.unwrap();
    let (admin, grpc) = (
        gateway.admin_addr(),
        gateway.grpc_addr().expect("gRPC is on"),
    );
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(gateway.serve(async move {
        let _ = stopped.await;
    }));
    wait_for_status(admin, "/v2/health/ready", 200).await;

    stop.send(()).unwrap();
    wait_for_status(admin, "/v2/health/ready", 400).await;
    assert_eq!(http_get(admin, "/v2/health/live").await.0, 200);
    assert_eq!(http_get(admin, "/metrics").await.0, 200);
    let mut client = grpc_client(grpc);
    let ready = client.server_ready(ServerReadyRequest {}).await.unwrap();
    assert!(!ready.into_inner().ready);
    // During the drain delay requests are still served, so load balancers can move away calmly.
    client
        .model_infer(good_request("draining", 1))
        .await
        .unwrap();
    task.abort();
}

fn grpc_client(addr: SocketAddr) -> Client {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    Client::new(channel)
}

// ---------------------------------------------------------------------------------------------
// The real binary

/// The gateway binary running as a child process, its stderr collected line by line.
struct Binary {
    /// Taken by `terminate`.
    child: Option<Child>,
    grpc_addr: SocketAddr,
    lines: Arc<Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Binary {
    /// Starts the binary on 127.0.0.1 port 0 with JSON logs and `args`, in an environment free of
    /// the variables that would change what it does (RUST_LOG, OTEL_*, ONNX_GATEWAY_*), and waits
    /// until it is ready.
    async fn start(repo: &Path, args: &[&str]) -> Binary {
        let mut command = Command::new(env!("CARGO_BIN_EXE_onnx-gateway"));
        command
            .current_dir(project_dir())
            .arg("--model-repository")
            .arg(repo)
            .args(["--grpc-address", "127.0.0.1", "--grpc-port", "0"])
            .args(["--metrics-address", "127.0.0.1", "--metrics-port", "0"])
            .args(["--http-address", "127.0.0.1", "--http-port", "0"])
            .args(["--drain-delay-secs", "0", "--log-format", "json"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            if name == "RUST_LOG" || name.starts_with("OTEL_") || name.starts_with("ONNX_GATEWAY_")
            {
                command.env_remove(name.as_ref());
            }
        }
        let mut child = command.spawn().expect("start the gateway binary");
        let stderr = child.stderr.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let reader = {
            let lines = Arc::clone(&lines);
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if let Some(addr) = grpc_listening_addr(&line) {
                        let _ = addr_tx.send(addr);
                    }
                    lines.lock().unwrap().push(line);
                }
            })
        };
        let grpc_addr =
            tokio::task::spawn_blocking(move || addr_rx.recv_timeout(Duration::from_secs(60)))
                .await
                .unwrap()
                .unwrap_or_else(|_| {
                    panic!(
                        "the binary never logged its gRPC address: {:?}",
                        lines.lock().unwrap()
                    )
                });
        let binary = Binary {
            child: Some(child),
            grpc_addr,
            lines,
            reader: Some(reader),
        };
        binary.wait_ready().await;
        binary
    }

    async fn wait_ready(&self) {
        wait_until_ready(&mut self.client(), || {
            format!(
                "the binary never became ready: {:?}",
                self.lines.lock().unwrap()
            )
        })
        .await;
    }

    fn client(&self) -> Client {
        grpc_client(self.grpc_addr)
    }

    /// Waits until stderr has shown a JSON line with this message (or fails after 60 s).
    async fn wait_for_line(&self, message: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let seen = self.lines.lock().unwrap().iter().any(|l| {
                serde_json::from_str::<serde_json::Value>(l).is_ok_and(|j| j["message"] == message)
            });
            if seen {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no {message:?} line: {:?}",
                self.lines.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then waits for a clean exit; returns every stderr line.
    async fn terminate(mut self) -> Vec<String> {
        let mut child = self.child.take().expect("running");
        let pid = libc::pid_t::try_from(child.id()).unwrap();
        // SAFETY: kill only sends a signal to our own child process, which has not been reaped.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let reader = self.reader.take();
        let lines = Arc::clone(&self.lines);
        tokio::task::spawn_blocking(move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            let status = loop {
                if let Some(status) = child.try_wait().unwrap() {
                    break status;
                }
                if std::time::Instant::now() > deadline {
                    let _ = child.kill();
                    panic!(
                        "the binary did not exit after SIGTERM: {:?}",
                        lines.lock().unwrap()
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            if let Some(reader) = reader {
                reader.join().unwrap();
            }
            let lines = std::mem::take(&mut *lines.lock().unwrap());
            assert!(status.success(), "exit status {status:?}: {lines:?}");
            lines
        })
        .await
        .unwrap()
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        // A failed test must not leave a server behind.
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The address in the `gRPC listening` line, JSON or text.
fn grpc_listening_addr(line: &str) -> Option<SocketAddr> {
    if let Ok(json) = serde_json::from_str::<serde_json::Value>(line) {
        if json["message"] == "gRPC listening" {
            return json["addr"].as_str()?.parse().ok();
        }
        return None;
    }
    let rest = line.split("gRPC listening addr=").nth(1)?;
    rest.split_whitespace().next()?.parse().ok()
}

// ---------------------------------------------------------------------------------------------
// OTLP traces from the binary

const TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";
const CALLER_SPAN_ID: &str = "b7ad6b7169203331";

/// The spans of every export received so far, with the service names of their resources.
fn received_spans(exports: &mut Exports) -> (Vec<OtlpSpan>, Vec<String>) {
    let (mut spans, mut services) = (Vec::new(), Vec::new());
    while let Ok(export) = exports.try_recv() {
        for resource_spans in export.resource_spans {
            let attributes = resource_spans
                .resource
                .map(|r| r.attributes)
                .unwrap_or_default();
            if let Some(name) = string_attribute(&attributes, "service.name") {
                services.push(name);
            }
            for scope in resource_spans.scope_spans {
                spans.extend(scope.spans);
            }
        }
    }
    (spans, services)
}

fn string_attribute(attributes: &[KeyValue], key: &str) -> Option<String> {
    attributes.iter().find(|kv| kv.key == key).and_then(|kv| {
        match kv.value.as_ref()?.value.as_ref()? {
            AnyValue::StringValue(s) => Some(s.clone()),
            AnyValue::IntValue(i) => Some(i.to_string()),
            other => Some(format!("{other:?}")),
        }
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A traced request through the binary: the receiver must get the caller's trace continued by
/// `infer`, its `queue` and `compute` children, and an `execute_batch` span linked to it.
async fn traced_request_reaches_the_receiver(protocol: &str, mut receiver: Receiver) {
    let repo = add_sub_repo();
    let endpoint = format!("http://{}", receiver.addr);
    let binary = Binary::start(
        repo.path(),
        &[
            "--trace-otlp-endpoint",
            &endpoint,
            "--trace-protocol",
            protocol,
        ],
    )
    .await;
    let mut client = binary.client();
    let mut request = tonic::Request::new(good_request("traced-1", 2));
    let traceparent = format!("00-{TRACE_ID}-{CALLER_SPAN_ID}-01");
    request
        .metadata_mut()
        .insert("traceparent", traceparent.parse().unwrap());
    client.model_infer(request).await.expect("traced request");
    // Shutdown flushes the spans still queued in the batch processor.
    let logs = binary.terminate().await;

    let (spans, services) = received_spans(&mut receiver.exports);
    let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    let context = format!("spans {names:?}\nlogs {logs:#?}");
    assert!(
        !services.is_empty() && services.iter().all(|s| s == "onnx-gateway"),
        "{services:?}"
    );

    let infer: Vec<&OtlpSpan> = spans
        .iter()
        .filter(|s| s.name == "infer" && hex(&s.trace_id) == TRACE_ID)
        .collect();
    let [infer] = infer.as_slice() else {
        panic!("one infer span in the caller's trace: {context}");
    };
    assert_eq!(hex(&infer.parent_span_id), CALLER_SPAN_ID, "{context}");
    assert_eq!(
        string_attribute(&infer.attributes, "request_id").as_deref(),
        Some("traced-1")
    );
    assert_eq!(
        string_attribute(&infer.attributes, "model").as_deref(),
        Some("add_sub")
    );
    assert_eq!(
        string_attribute(&infer.attributes, "version").as_deref(),
        Some("1")
    );

    for child in ["queue", "compute"] {
        let found: Vec<&OtlpSpan> = spans.iter().filter(|s| s.name == child).collect();
        let [span] = found.as_slice() else {
            panic!("one {child} span: {context}");
        };
        assert_eq!(hex(&span.trace_id), TRACE_ID, "{child}: {context}");
        assert_eq!(
            span.parent_span_id, infer.span_id,
            "{child} is a child of infer"
        );
        assert!(
            span.start_time_unix_nano >= infer.start_time_unix_nano,
            "{child}"
        );
        assert!(
            span.end_time_unix_nano <= infer.end_time_unix_nano,
            "{child}"
        );
    }
    let queue = spans.iter().find(|s| s.name == "queue").unwrap();
    let compute = spans.iter().find(|s| s.name == "compute").unwrap();
    assert!(
        queue.end_time_unix_nano <= compute.start_time_unix_nano,
        "queue before compute"
    );
    assert_eq!(
        string_attribute(&compute.attributes, "batch_size").as_deref(),
        Some("2")
    );

    let batches: Vec<&OtlpSpan> = spans.iter().filter(|s| s.name == "execute_batch").collect();
    let [batch] = batches.as_slice() else {
        panic!("one execute_batch span: {context}");
    };
    assert!(
        batch
            .links
            .iter()
            .any(|l| hex(&l.trace_id) == TRACE_ID && l.span_id == infer.span_id),
        "execute_batch is linked to the request: {:?}\n{context}",
        batch.links
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_exports_request_spans_over_otlp_grpc() {
    traced_request_reaches_the_receiver("grpc", start_grpc_receiver().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_exports_request_spans_over_otlp_http() {
    traced_request_reaches_the_receiver("http/protobuf", start_http_receiver().await).await;
}

// ---------------------------------------------------------------------------------------------
// JSON logs from the binary

fn parse_json_lines(lines: &[String]) -> Vec<serde_json::Value> {
    lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_parse_and_carry_the_request() {
    let repo = add_sub_repo();
    let binary = Binary::start(repo.path(), &["--log-verbose", "1"]).await;
    let mut client = binary.client();
    let mut bad = good_request("bad-7", 1);
    bad.inputs[0].datatype = "INT32".into();
    let status = client.model_infer(bad).await.expect_err("bad request");
    assert_eq!(status.code(), Code::InvalidArgument);
    let lines = parse_json_lines(&binary.terminate().await);

    for line in &lines {
        assert!(line["timestamp"].is_string(), "{line}");
        assert!(line["level"].is_string(), "{line}");
        assert!(line["target"].is_string(), "{line}");
    }
    let loaded = lines
        .iter()
        .find(|l| l["message"] == "model loaded")
        .expect("a model load line");
    assert_eq!(loaded["model"], "add_sub");
    assert_eq!(loaded["version"], 1);
    assert!(
        loaded["seconds"].as_f64().is_some_and(|s| s > 0.0),
        "{loaded}"
    );

    let rejected = lines
        .iter()
        .find(|l| l["message"] == "request rejected")
        .unwrap_or_else(|| panic!("a line for the failed request: {lines:#?}"));
    assert_eq!(rejected["level"], "DEBUG");
    assert!(
        rejected["error"]
            .as_str()
            .is_some_and(|e| e.contains("INPUT0")),
        "the reason names the tensor: {rejected}"
    );
    let span = &rejected["span"];
    assert_eq!(span["name"], "infer", "{rejected}");
    assert_eq!(span["request_id"], "bad-7");
    assert_eq!(span["model"], "add_sub");
    assert_eq!(span["version"], 1);

    for message in ["startup complete", "shutdown complete"] {
        assert!(lines.iter().any(|l| l["message"] == message), "{message}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_level_writes_no_line_per_successful_request() {
    let repo = add_sub_repo();
    let binary = Binary::start(repo.path(), &[]).await;
    binary.wait_for_line("startup complete").await;
    let mut client = binary.client();
    for i in 0..20 {
        client
            .model_infer(good_request(&format!("quiet-{i}"), 1))
            .await
            .unwrap();
    }
    let raw = binary.terminate().await;
    let lines = parse_json_lines(&raw);
    let position = |message: &str| {
        lines
            .iter()
            .position(|l| {
                l["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with(message))
            })
            .unwrap_or_else(|| panic!("no {message:?} line: {raw:#?}"))
    };
    // Everything logged while the 20 requests ran lies between these two lines: nothing.
    let (started, stopping) = (position("startup complete"), position("shutdown requested"));
    assert_eq!(
        stopping,
        started + 1,
        "lines while serving: {:#?}",
        &raw[started..=stopping]
    );
    for (line, raw) in lines.iter().zip(&raw) {
        assert!(
            matches!(line["level"].as_str(), Some("INFO" | "WARN" | "ERROR")),
            "{raw}"
        );
        assert!(
            !raw.contains("quiet-"),
            "a line about a successful request: {raw}"
        );
        assert!(line.get("span").is_none(), "a line inside a request: {raw}");
    }
    // ONNX Runtime's own info lines (dozens per session) stay out of the default level.
    assert!(
        lines.iter().all(|l| l["target"] != "ort::logging"),
        "{raw:#?}"
    );
}
