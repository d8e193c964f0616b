use std::collections::{BTreeMap, HashSet};
use std::io::Write as _;
use std::process::{Command, Stdio};

use super::*;
use crate::telemetry::stats::RequestTimings;

/// One parsed sample line: metric name, labels, value.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A strict little parser for what `render` writes (not a general text-format parser): it fails the
/// test on anything it does not understand, so malformed output cannot slip through.
fn parse(text: &str) -> (Vec<(String, String)>, Vec<Sample>) {
    let mut types = Vec::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE line has name and type");
            types.push((name.to_string(), kind.to_string()));
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        assert!(!line.starts_with('#'), "unexpected comment {line:?}");
        let (series, value) = line.rsplit_once(' ').expect("sample has a value");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').expect("labels end with }");
                (name.to_string(), parse_labels(body))
            }
        };
        samples.push(Sample {
            name,
            labels,
            value,
        });
    }
    (types, samples)
}

fn parse_labels(body: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut chars = body.chars().peekable();
    loop {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        assert_eq!(chars.next(), Some('"'), "label value starts with a quote");
        let mut value = String::new();
        loop {
            match chars.next().expect("unterminated label value") {
                '\\' => match chars.next().expect("dangling escape") {
                    'n' => value.push('\n'),
                    c @ ('\\' | '"') => value.push(c),
                    c => panic!("bad escape \\{c}"),
                },
                '"' => break,
                '\n' => panic!("raw newline in label value"),
                c => value.push(c),
            }
        }
        labels.insert(key, value);
        match chars.next() {
            None => return labels,
            Some(',') => continue,
            Some(c) => panic!("unexpected {c:?} after label value"),
        }
    }
}

fn find<'a>(samples: &'a [Sample], name: &str, labels: &[(&str, &str)]) -> &'a Sample {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .unwrap_or_else(|| panic!("no sample {name} {labels:?}"))
}

fn timings(queue_us: u64, input_us: u64, infer_us: u64, output_us: u64) -> RequestTimings {
    RequestTimings {
        queue: Duration::from_micros(queue_us),
        compute_input: Duration::from_micros(input_us),
        compute_infer: Duration::from_micros(infer_us),
        compute_output: Duration::from_micros(output_us),
        batch_size: 1,
    }
}

/// Two versions of one model with a known history.
fn sample_models() -> Vec<Arc<ModelStats>> {
    let v1 = ModelStats::new("simple", "1");
    for _ in 0..3 {
        v1.record_success(Duration::from_micros(1500), 2, &timings(100, 10, 1000, 20));
    }
    v1.record_execution(4, Duration::ZERO, Duration::ZERO, Duration::ZERO);
    v1.record_execution(2, Duration::ZERO, Duration::ZERO, Duration::ZERO);
    v1.record_failure(Duration::from_micros(5), FailureReason::Rejected);
    v1.record_failure(Duration::from_micros(5), FailureReason::Rejected);
    v1.record_failure(Duration::from_millis(2), FailureReason::Backend);
    v1.pending.store(7, Relaxed);
    v1.record_load_duration(Duration::from_millis(1250));
    v1.record_batch_formed(4, Duration::from_micros(40), "full");
    v1.record_batch_formed(2, Duration::from_micros(500), "window_expired");
    v1.record_batch_formed(1, Duration::from_micros(8), "adaptive_early");
    let v2 = ModelStats::new("simple", "2");
    vec![Arc::new(v1), Arc::new(v2)]
}

#[test]
fn triton_counters_are_exact() {
    let (_, samples) = parse(&render_model_metrics(&sample_models()));
    let v1 = [("model", "simple"), ("version", "1")];
    let value = |name: &str| find(&samples, name, &v1).value;
    assert_eq!(value("nv_inference_request_success"), 3.0);
    assert_eq!(value("nv_inference_count"), 6.0);
    assert_eq!(value("nv_inference_exec_count"), 2.0);
    assert_eq!(value("nv_inference_pending_request_count"), 7.0);
    assert_eq!(value("nv_inference_request_duration_us"), 4500.0);
    assert_eq!(value("nv_inference_queue_duration_us"), 300.0);
    assert_eq!(value("nv_inference_compute_input_duration_us"), 30.0);
    assert_eq!(value("nv_inference_compute_infer_duration_us"), 3000.0);
    assert_eq!(value("nv_inference_compute_output_duration_us"), 60.0);
    assert_eq!(value("nv_model_load_duration_secs"), 1.25);

    let failure = |reason: &str| {
        let labels = [v1[0], v1[1], ("reason", reason)];
        find(&samples, "nv_inference_request_failure", &labels).value
    };
    assert_eq!(failure("REJECTED"), 2.0);
    assert_eq!(failure("BACKEND"), 1.0);
    assert_eq!(failure("CANCELED"), 0.0);
    assert_eq!(failure("OTHER"), 0.0);

    // The untouched version is reported with zeros, and without a load time it has not got.
    let v2 = [("model", "simple"), ("version", "2")];
    assert_eq!(
        find(&samples, "nv_inference_request_success", &v2).value,
        0.0
    );
    assert!(!samples
        .iter()
        .any(|s| s.name == "nv_model_load_duration_secs" && s.labels["version"] == "2"));
}

#[test]
fn histograms_are_cumulative_and_match_their_count() {
    let (_, samples) = parse(&render_model_metrics(&sample_models()));
    for base in [
        "onnx_gateway_request_duration_seconds",
        "onnx_gateway_queue_duration_seconds",
        "onnx_gateway_compute_duration_seconds",
        "onnx_gateway_batch_size",
        "onnx_gateway_batch_wait_seconds",
    ] {
        let v1: Vec<&Sample> = samples
            .iter()
            .filter(|s| s.name == format!("{base}_bucket") && s.labels["version"] == "1")
            .collect();
        assert!(!v1.is_empty(), "{base} has buckets");
        let les: Vec<f64> = v1
            .iter()
            .map(|s| match s.labels["le"].as_str() {
                "+Inf" => f64::INFINITY,
                le => le.parse().expect("le is a number"),
            })
            .collect();
        assert!(les.windows(2).all(|w| w[0] < w[1]), "{base} bounds ascend");
        assert_eq!(*les.last().unwrap(), f64::INFINITY, "{base} ends with +Inf");
        assert!(
            v1.windows(2).all(|w| w[0].value <= w[1].value),
            "{base} cumulative"
        );
        let labels = [("model", "simple"), ("version", "1")];
        let count = find(&samples, &format!("{base}_count"), &labels).value;
        assert_eq!(v1.last().unwrap().value, count, "{base} +Inf equals _count");
    }
    let labels = [("model", "simple"), ("version", "1")];
    let request_count = find(
        &samples,
        "onnx_gateway_request_duration_seconds_count",
        &labels,
    );
    assert_eq!(request_count.value, 3.0);
    let request_sum = find(
        &samples,
        "onnx_gateway_request_duration_seconds_sum",
        &labels,
    );
    assert!((request_sum.value - 0.0045).abs() < 1e-9);
    // 1.5 ms falls in the 2.5 ms bucket but not the 1 ms one.
    let bucket = |le: &str| {
        let l = [labels[0], labels[1], ("le", le)];
        find(&samples, "onnx_gateway_request_duration_seconds_bucket", &l).value
    };
    assert_eq!(bucket("0.001"), 0.0);
    assert_eq!(bucket("0.0025"), 3.0);
    let batch = |le: &str| {
        let l = [labels[0], labels[1], ("le", le)];
        find(&samples, "onnx_gateway_batch_size_bucket", &l).value
    };
    assert_eq!(batch("1"), 0.0);
    assert_eq!(batch("2"), 1.0);
    assert_eq!(batch("4"), 2.0);
    let batch_sum = find(&samples, "onnx_gateway_batch_size_sum", &labels);
    assert_eq!(batch_sum.value, 6.0);
}

#[test]
fn label_values_are_escaped() {
    let nasty = "a\"b\\c\nd";
    let models = vec![Arc::new(ModelStats::new(nasty, "1"))];
    let text = render_model_metrics(&models);
    assert!(text.contains(r#"model="a\"b\\c\nd""#), "{text}");
    let (_, samples) = parse(&text);
    let s = find(&samples, "nv_inference_count", &[("model", nasty)]);
    assert_eq!(s.value, 0.0);
    assert_eq!(escape_label_value("plain"), "plain");
}

#[test]
fn every_rendered_family_is_declared_once_and_contiguous() {
    let grpc = GrpcMetrics::new();
    grpc.record("ModelInfer", 0, Duration::from_millis(3));
    let text = render(&sample_models(), &grpc);
    let (types, samples) = parse(&text);

    let declared: HashSet<&str> = ALL_METRICS.iter().map(|d| d.name).collect();
    assert_eq!(declared.len(), ALL_METRICS.len(), "metric names are unique");
    let mut seen = HashSet::new();
    for (name, kind) in &types {
        assert!(seen.insert(name.clone()), "{name} declared twice");
        let d = ALL_METRICS
            .iter()
            .find(|d| d.name == name)
            .expect("declared");
        assert_eq!(d.kind.as_str(), kind);
    }
    for d in TRITON_COMPAT_METRICS {
        assert!(ALL_METRICS.contains(&d));
    }

    // Samples of one family sit together, right after its TYPE line.
    let family_of = |sample: &str| {
        types
            .iter()
            .map(|(n, _)| n.as_str())
            .filter(|n| {
                sample == *n
                    || ["_bucket", "_sum", "_count"]
                        .iter()
                        .any(|suffix| sample == format!("{n}{suffix}"))
            })
            .max_by_key(|n| n.len())
            .unwrap_or_else(|| panic!("{sample} belongs to no declared family"))
            .to_string()
    };
    let mut order: Vec<String> = Vec::new();
    for s in &samples {
        let family = family_of(&s.name);
        if order.last() != Some(&family) {
            assert!(!order.contains(&family), "{family} is split");
            order.push(family);
        }
    }
}

#[test]
fn grpc_labels_are_bounded() {
    let grpc = GrpcMetrics::new();
    grpc.record("ModelInfer", 0, Duration::from_millis(1));
    grpc.record("ModelInfer", 0, Duration::from_millis(1));
    grpc.record("ModelInfer", 3, Duration::from_millis(1));
    grpc.record("NoSuchMethod", 12, Duration::from_millis(1));
    grpc.record("AnotherMadeUpOne", 12, Duration::from_millis(1));
    grpc.record("Check", 99, Duration::from_millis(1));
    grpc.record("Check", -1, Duration::from_millis(1));

    assert_eq!(
        GrpcMetrics::method_label("ServerReflectionInfo"),
        "ServerReflectionInfo"
    );
    assert_eq!(GrpcMetrics::method_label("../etc"), OTHER_METHOD);
    assert_eq!(GrpcMetrics::code_label(14), "UNAVAILABLE");
    assert_eq!(GrpcMetrics::code_label(17), "UNKNOWN");
    assert_eq!(grpc.requests("ModelInfer", 0), 2);
    assert_eq!(grpc.requests("other", 12), 2);
    assert_eq!(grpc.requests("Check", 2), 2);

    let (_, samples) = parse(&grpc.render());
    let requests = |method: &str, code: &str| {
        let labels = [("method", method), ("code", code)];
        find(&samples, "onnx_gateway_grpc_requests_total", &labels).value
    };
    assert_eq!(requests("ModelInfer", "OK"), 2.0);
    assert_eq!(requests("ModelInfer", "INVALID_ARGUMENT"), 1.0);
    assert_eq!(requests("other", "UNIMPLEMENTED"), 2.0);
    assert_eq!(requests("Check", "UNKNOWN"), 2.0);
    let count = find(
        &samples,
        "onnx_gateway_grpc_request_duration_seconds_count",
        &[("method", "ModelInfer")],
    );
    assert_eq!(count.value, 3.0);
    // Pairs that never occurred are not written.
    assert!(!samples
        .iter()
        .any(|s| s.labels.get("method").map(String::as_str) == Some("ServerLive")));
}

#[test]
fn proc_stat_is_parsed_from_the_last_parenthesis() {
    // comm may hold spaces and ')' ; the numbered fields only start after the last ')'.
    let stat = "4242 (we ird) (name) S 1 4242 4242 0 -1 4194560 500 0 0 0 250 125 0 0 20 0 \
                9 0 123456 104857600 2560 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 3 0 0";
    let f = StatFields::parse(stat).expect("parses");
    assert_eq!(f.utime_ticks, 250);
    assert_eq!(f.stime_ticks, 125);
    assert_eq!(f.threads, 9);
    assert_eq!(f.start_ticks, 123456);
    assert_eq!(f.vsize_bytes, 104857600);
    assert_eq!(f.rss_pages, 2560);
    assert_eq!(StatFields::parse("12 (truncated"), None);

    assert_eq!(
        parse_boot_time("cpu  1 2 3\nbtime 1700000000\nprocesses 5\n"),
        Some(1700000000)
    );
    let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                  Max open files            1024                 524288               files     \n";
    assert_eq!(parse_max_open_files(limits), Some(1024));
    let unlimited = "Max open files            unlimited            unlimited            files\n";
    assert_eq!(parse_max_open_files(unlimited), None);
}

#[cfg(target_os = "linux")]
#[test]
fn process_metrics_are_read_from_proc() {
    let p = ProcessStats::read().expect("/proc/self is readable on Linux");
    assert!(p.resident_bytes > 0);
    assert!(p.virtual_bytes >= p.resident_bytes);
    assert!(p.threads >= 1);
    assert!(
        p.open_fds.unwrap_or(0) >= 3,
        "stdin, stdout, stderr at least"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let started = p.start_time_seconds.expect("boot time is known");
    assert!(started <= now + 1.0 && started > now - 86400.0 * 365.0);

    let text = render(&[], &GrpcMetrics::new());
    let (_, samples) = parse(&text);
    assert!(find(&samples, "process_resident_memory_bytes", &[]).value > 0.0);
    assert!(find(&samples, "process_cpu_seconds_total", &[]).value >= 0.0);
}

/// Runs `promtool check metrics` on a full scrape when promtool is installed (Debian package
/// `prometheus`). Parse errors fail; lint findings are accepted only for the Triton-compatible
/// names, whose spelling is fixed by the dashboards that use them.
#[test]
fn promtool_accepts_a_scrape() {
    let Some(promtool) = promtool() else {
        return;
    };
    let grpc = GrpcMetrics::new();
    grpc.record("ModelInfer", 0, Duration::from_millis(3));
    grpc.record("Bogus", 12, Duration::from_millis(3));
    let mut models = sample_models();
    models.push(Arc::new(ModelStats::new("we\"ird\\name\nx", "3")));
    let text = render(&models, &grpc);

    let (code, report) = promtool_check_metrics(&promtool, &text);
    // promtool exits 0 when clean, 3 when it only found lint problems, 1 on errors.
    assert!(
        matches!(code, Some(0) | Some(3)),
        "promtool failed ({code:?}):\n{report}"
    );
    for finding in report.lines().filter(|l| !l.trim().is_empty()) {
        let metric = finding.split_whitespace().next().unwrap_or_default();
        assert!(
            TRITON_COMPAT_METRICS.iter().any(|d| d.name == metric),
            "lint finding on a metric we named ourselves: {finding}"
        );
    }
}

/// The same check on everything but the Triton names: promtool must find nothing at all.
#[test]
fn promtool_finds_nothing_in_our_own_names() {
    let Some(promtool) = promtool() else {
        return;
    };
    let grpc = GrpcMetrics::new();
    grpc.record("ModelStreamInfer", 1, Duration::from_secs(20));
    let full = render(&sample_models(), &grpc);
    let triton: HashSet<&str> = TRITON_COMPAT_METRICS.iter().map(|d| d.name).collect();
    let ours: String = full
        .lines()
        .filter(|l| {
            let name = l
                .trim_start_matches("# HELP ")
                .trim_start_matches("# TYPE ")
                .split(['{', ' '])
                .next()
                .unwrap_or_default();
            !triton.contains(name)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let (code, report) = promtool_check_metrics(&promtool, &ours);
    assert_eq!(code, Some(0), "promtool: {report}\n{ours}");
}

/// Writes `text` to a temp file and feeds it to `promtool check metrics`; returns the exit code and
/// everything promtool printed. A scrape promtool cannot parse is kept, and its path printed.
fn promtool_check_metrics(promtool: &std::path::Path, text: &str) -> (Option<i32>, String) {
    let mut scrape = tempfile::Builder::new()
        .prefix("scrape-")
        .suffix(".prom")
        .tempfile()
        .expect("temp file");
    scrape.write_all(text.as_bytes()).expect("write scrape");
    let stdin = scrape.reopen().expect("reopen scrape");
    let output = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::from(stdin))
        .output()
        .expect("run promtool");
    let report = String::from_utf8_lossy(&output.stderr).to_string()
        + &String::from_utf8_lossy(&output.stdout);
    let code = output.status.code();
    if !matches!(code, Some(0) | Some(3)) {
        if let Ok(path) = scrape.into_temp_path().keep() {
            eprintln!(
                "promtool could not parse the scrape kept at {}",
                path.display()
            );
        }
    }
    (code, report)
}

/// promtool when installed. Missing, the test skips with a note, except where CI=true: there
/// scripts/setup installs it, so its absence is a failure, not a reason to pass silently.
fn promtool() -> Option<std::path::PathBuf> {
    let found = find_on_path("promtool");
    if found.is_none() {
        assert!(
            !in_ci(),
            "promtool is missing in CI: scripts/setup installs it (apt-get install prometheus)"
        );
        eprintln!("note: promtool not on PATH, skipping (scripts/setup installs it as root)");
    }
    found
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

#[test]
fn cache_families_are_declared_and_read_the_model_statistics() {
    let models = sample_models();
    models[0].cache_hit.record(Duration::from_micros(7));
    models[0].cache_hit.record(Duration::from_micros(5));
    models[0].cache_miss.record(Duration::from_micros(40));
    let text = render_cache(&models, 3, 2, 0.25);
    let (types, samples) = parse(&text);
    let names: Vec<&str> = types.iter().map(|(n, _)| n.as_str()).collect();
    let expected: Vec<&str> = CACHE_METRICS.iter().map(|d| d.name).collect();
    assert_eq!(names, expected);
    for d in CACHE_METRICS {
        assert!(ALL_METRICS.contains(&d));
    }
    let (model, version) = (models[0].model.as_str(), models[0].version.as_str());
    let labels = [("model", model), ("version", version)];
    let value = |name: &str, labels: &[(&str, &str)]| find(&samples, name, labels).value;
    assert_eq!(value("nv_cache_num_hits_per_model", &labels), 2.0);
    assert_eq!(value("nv_cache_num_misses_per_model", &labels), 1.0);
    assert_eq!(value("nv_cache_hit_duration_per_model", &labels), 12.0);
    assert_eq!(value("nv_cache_miss_duration_per_model", &labels), 40.0);
    assert_eq!(value("nv_cache_num_entries", &[]), 3.0);
    assert_eq!(value("nv_cache_num_evictions", &[]), 2.0);
    assert_eq!(value("nv_cache_util", &[]), 0.25);
}

#[test]
fn batches_formed_are_rendered_per_reason_with_the_wait_histogram() {
    let (types, samples) = parse(&render_model_metrics(&sample_models()));
    let kind = |name: &str| {
        types
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, k)| k.as_str())
    };
    assert_eq!(kind("onnx_gateway_batch_formed_total"), Some("counter"));
    assert_eq!(
        kind("onnx_gateway_batch_formed_rows_total"),
        Some("counter")
    );
    assert_eq!(kind("onnx_gateway_batch_wait_seconds"), Some("histogram"));
    let formed = |version: &str, reason: &str| {
        let labels = [
            ("model", "simple"),
            ("version", version),
            ("reason", reason),
        ];
        (
            find(&samples, "onnx_gateway_batch_formed_total", &labels).value,
            find(&samples, "onnx_gateway_batch_formed_rows_total", &labels).value,
        )
    };
    assert_eq!(formed("1", "full"), (1.0, 4.0));
    assert_eq!(formed("1", "window_expired"), (1.0, 2.0));
    assert_eq!(formed("1", "adaptive_early"), (1.0, 1.0));
    // Every reason is present from the start, zeros included, for every version.
    for reason in crate::telemetry::stats::BATCH_FORMED_REASONS {
        assert_eq!(formed("2", reason), (0.0, 0.0));
    }
    let v1 = [("model", "simple"), ("version", "1")];
    let wait_bucket = |le: &str| {
        let l = [v1[0], v1[1], ("le", le)];
        find(&samples, "onnx_gateway_batch_wait_seconds_bucket", &l).value
    };
    assert_eq!(wait_bucket("0.00001"), 1.0, "8 µs");
    assert_eq!(wait_bucket("0.00005"), 2.0, "40 µs");
    assert_eq!(wait_bucket("0.0005"), 3.0, "500 µs");
    let count = find(&samples, "onnx_gateway_batch_wait_seconds_count", &v1).value;
    assert_eq!(count, 3.0);
}
