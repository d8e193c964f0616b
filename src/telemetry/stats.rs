//! Per model-version statistics: the one source that both the ModelStatistics RPC and /metrics read.
//! Everything is an atomic so recording never takes a lock on the request path, except the batch-size
//! table, which is touched once per execution.
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

/// Durations measured at the hand-offs of the request path (see DESIGN.md).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestTimings {
    pub queue: Duration,
    pub compute_input: Duration,
    pub compute_infer: Duration,
    pub compute_output: Duration,
    /// Rows in the execution this request was part of; 0 when it ran in none (a response-cache hit).
    pub batch_size: usize,
}

/// Upper bounds (seconds) of the latency histograms: 100 µs to 10 s, fine enough for p99 of
/// sub-millisecond models and wide enough for slow ones.
pub const LATENCY_BUCKETS_SECONDS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Upper bounds of the batch-size histogram (rows per execution).
pub const BATCH_SIZE_BUCKETS: [f64; 10] =
    [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

/// Upper bounds (seconds) of the batch-wait histogram: how long a batch's oldest request waited
/// before the batch was dispatched. Finer than the latency buckets at the low end, where the
/// batcher's decisions (dispatch at once, or wait a window of tens to hundreds of µs) show.
pub const BATCH_WAIT_BUCKETS_SECONDS: [f64; 16] = [
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 1.0, 10.0,
];

/// The `reason` labels of batches formed: the scheduler's dispatch reasons (kept in step by a test
/// in scheduler/policy.rs), then `other` for any label not listed, so the label set stays bounded.
pub const BATCH_FORMED_REASONS: [&str; 7] = [
    "full",
    "window_expired",
    "no_delay",
    "draining",
    "adaptive_early",
    "adaptive_waited",
    "other",
];

/// Batches formed for one reason, and the rows they held.
#[derive(Debug, Default)]
pub struct BatchFormed {
    pub batches: AtomicU64,
    pub rows: AtomicU64,
}

/// Why a request failed, as a bounded, stable label (Triton's `reason` values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FailureReason {
    /// Refused before it was queued (bad input, queue full).
    Rejected,
    /// Cancelled by the client or timed out while queued.
    Canceled,
    /// Failed in the backend (ONNX Runtime).
    Backend,
    Other,
}

impl FailureReason {
    pub const ALL: [FailureReason; 4] = [
        FailureReason::Rejected,
        FailureReason::Canceled,
        FailureReason::Backend,
        FailureReason::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::Rejected => "REJECTED",
            FailureReason::Canceled => "CANCELED",
            FailureReason::Backend => "BACKEND",
            FailureReason::Other => "OTHER",
        }
    }
}

/// A count and a total duration in nanoseconds, as Triton's StatisticDuration.
#[derive(Debug, Default)]
pub struct DurationStat {
    count: AtomicU64,
    ns: AtomicU64,
}

impl DurationStat {
    pub fn record(&self, d: Duration) {
        self.count.fetch_add(1, Relaxed);
        self.ns.fetch_add(d.as_nanos() as u64, Relaxed);
    }
    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }
    pub fn ns(&self) -> u64 {
        self.ns.load(Relaxed)
    }
}

/// A cumulative histogram with fixed bounds, plus sum and count.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// counts[i] counts observations <= bounds[i]; the last slot is +Inf.
    counts: Vec<AtomicU64>,
    /// Sum of observations in micro-units, so it can be an atomic integer.
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, value: f64) {
        let slot = self
            .bounds
            .iter()
            .position(|&b| value <= b)
            .unwrap_or(self.bounds.len());
        self.counts[slot].fetch_add(1, Relaxed);
        self.sum_micros
            .fetch_add((value * 1e6).round() as u64, Relaxed);
    }

    pub fn bounds(&self) -> &'static [f64] {
        self.bounds
    }

    /// Cumulative counts per bound, the last entry being +Inf (= total count).
    pub fn cumulative(&self) -> Vec<u64> {
        let mut acc = 0;
        self.counts
            .iter()
            .map(|c| {
                acc += c.load(Relaxed);
                acc
            })
            .collect()
    }

    pub fn sum(&self) -> f64 {
        self.sum_micros.load(Relaxed) as f64 / 1e6
    }
}

/// Compute durations of the executions of one batch size.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BatchSizeStats {
    pub count: u64,
    pub compute_input_ns: u64,
    pub compute_infer_ns: u64,
    pub compute_output_ns: u64,
}

/// Statistics of one model version.
#[derive(Debug)]
pub struct ModelStats {
    pub model: String,
    pub version: String,
    pub success: DurationStat,
    pub failures: [DurationStat; 4],
    pub queue: DurationStat,
    pub compute_input: DurationStat,
    pub compute_infer: DurationStat,
    pub compute_output: DurationStat,
    /// Rows inferred (Triton's inference_count).
    pub inference_count: AtomicU64,
    /// Executions run (Triton's execution_count).
    pub execution_count: AtomicU64,
    /// Milliseconds since the epoch of the last inference, 0 if none.
    pub last_inference_ms: AtomicU64,
    /// Requests accepted and not yet answered.
    pub pending: AtomicU64,
    pub request_seconds: Histogram,
    pub queue_seconds: Histogram,
    pub compute_seconds: Histogram,
    pub batch_size: Histogram,
    batches: Mutex<BTreeMap<u64, BatchSizeStats>>,
    /// How long loading this version took, in nanoseconds; 0 until the load finished.
    load_duration_ns: AtomicU64,
    /// Response-cache lookups that hit (lookup time) and successes that missed (lookup + insertion).
    pub cache_hit: DurationStat,
    pub cache_miss: DurationStat,
    /// Batches the batcher formed, per [`BATCH_FORMED_REASONS`] entry.
    pub batches_formed: [BatchFormed; BATCH_FORMED_REASONS.len()],
    /// How long each formed batch's oldest request had waited.
    pub batch_wait_seconds: Histogram,
    /// Batches whose answers left in two halves, a reactor turn apart (`scheduler::answer_split`).
    pub batches_answered_in_halves: AtomicU64,
}

impl ModelStats {
    pub fn new(model: &str, version: &str) -> Self {
        Self {
            model: model.to_string(),
            version: version.to_string(),
            success: DurationStat::default(),
            failures: Default::default(),
            queue: DurationStat::default(),
            compute_input: DurationStat::default(),
            compute_infer: DurationStat::default(),
            compute_output: DurationStat::default(),
            inference_count: AtomicU64::new(0),
            execution_count: AtomicU64::new(0),
            last_inference_ms: AtomicU64::new(0),
            pending: AtomicU64::new(0),
            request_seconds: Histogram::new(&LATENCY_BUCKETS_SECONDS),
            queue_seconds: Histogram::new(&LATENCY_BUCKETS_SECONDS),
            compute_seconds: Histogram::new(&LATENCY_BUCKETS_SECONDS),
            batch_size: Histogram::new(&BATCH_SIZE_BUCKETS),
            batches: Mutex::new(BTreeMap::new()),
            load_duration_ns: AtomicU64::new(0),
            cache_hit: DurationStat::default(),
            cache_miss: DurationStat::default(),
            batches_formed: Default::default(),
            batch_wait_seconds: Histogram::new(&BATCH_WAIT_BUCKETS_SECONDS),
            batches_answered_in_halves: AtomicU64::new(0),
        }
    }

    /// Loading this version (session build and warm-up) took `d`.
    pub fn record_load_duration(&self, d: Duration) {
        // A load can never take 0 ns, so 0 stays free to mean "not loaded yet".
        let ns = (d.as_nanos() as u64).max(1);
        self.load_duration_ns.store(ns, Relaxed);
    }

    /// How long loading took, once the load finished.
    pub fn load_duration(&self) -> Option<Duration> {
        match self.load_duration_ns.load(Relaxed) {
            0 => None,
            ns => Some(Duration::from_nanos(ns)),
        }
    }

    /// A request completed; `total` runs from arrival at the server to the response.
    pub fn record_success(&self, total: Duration, rows: usize, t: &RequestTimings) {
        if t.batch_size == 0 {
            return self.record_cache_hit_success(total, rows);
        }
        self.success.record(total);
        self.queue.record(t.queue);
        self.compute_input.record(t.compute_input);
        self.compute_infer.record(t.compute_infer);
        self.compute_output.record(t.compute_output);
        self.inference_count.fetch_add(rows as u64, Relaxed);
        self.request_seconds.observe(total.as_secs_f64());
        self.queue_seconds.observe(t.queue.as_secs_f64());
        self.compute_seconds
            .observe((t.compute_input + t.compute_infer + t.compute_output).as_secs_f64());
        self.touch_last_inference();
    }

    /// A request answered from the response cache: a success of `rows` rows that spent no time
    /// queued or computing (as Triton, it counts in inference_count but not in execution_count).
    fn record_cache_hit_success(&self, total: Duration, rows: usize) {
        self.success.record(total);
        self.inference_count.fetch_add(rows as u64, Relaxed);
        self.request_seconds.observe(total.as_secs_f64());
        self.touch_last_inference();
    }

    /// A request failed for `reason` after `total`.
    pub fn record_failure(&self, total: Duration, reason: FailureReason) {
        self.failures[reason as usize].record(total);
    }

    /// A batch was formed and dispatched: its rows, how long its oldest request waited in the
    /// queue, and why it was dispatched then (a `DispatchReason` label).
    pub fn record_batch_formed(&self, rows: usize, waited: Duration, reason: &'static str) {
        let slot = BATCH_FORMED_REASONS
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(BATCH_FORMED_REASONS.len() - 1);
        let formed = &self.batches_formed[slot];
        formed.batches.fetch_add(1, Relaxed);
        formed.rows.fetch_add(rows as u64, Relaxed);
        self.batch_wait_seconds.observe(waited.as_secs_f64());
    }

    /// One execution of `batch_rows` rows ran with these compute durations.
    pub fn record_execution(
        &self,
        batch_rows: usize,
        input: Duration,
        infer: Duration,
        output: Duration,
    ) {
        self.execution_count.fetch_add(1, Relaxed);
        self.batch_size.observe(batch_rows as f64);
        let mut batches = self.batches.lock();
        let entry = batches.entry(batch_rows as u64).or_default();
        entry.count += 1;
        entry.compute_input_ns += input.as_nanos() as u64;
        entry.compute_infer_ns += infer.as_nanos() as u64;
        entry.compute_output_ns += output.as_nanos() as u64;
    }

    pub fn failure(&self, reason: FailureReason) -> &DurationStat {
        &self.failures[reason as usize]
    }

    /// Executions per batch size, ascending.
    pub fn batch_table(&self) -> Vec<(u64, BatchSizeStats)> {
        self.batches.lock().iter().map(|(k, v)| (*k, *v)).collect()
    }

    fn touch_last_inference(&self) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        self.last_inference_ms.store(now, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let h = Histogram::new(&BATCH_SIZE_BUCKETS);
        for v in [1.0, 3.0, 3.0, 1000.0] {
            h.observe(v);
        }
        let c = h.cumulative();
        assert_eq!(c[0], 1);
        assert_eq!(c[2], 3);
        assert_eq!(*c.last().unwrap(), 4);
        assert_eq!(h.sum(), 1007.0);
    }

    #[test]
    fn batches_formed_are_counted_per_reason_with_their_wait() {
        let stats = ModelStats::new("m", "1");
        stats.record_batch_formed(4, Duration::from_micros(30), "full");
        stats.record_batch_formed(1, Duration::from_micros(5), "adaptive_early");
        stats.record_batch_formed(3, Duration::from_micros(500), "adaptive_early");
        stats.record_batch_formed(2, Duration::ZERO, "not_a_reason");
        let formed = |label: &str| {
            let slot = BATCH_FORMED_REASONS
                .iter()
                .position(|r| *r == label)
                .unwrap();
            let f = &stats.batches_formed[slot];
            (f.batches.load(Relaxed), f.rows.load(Relaxed))
        };
        assert_eq!(formed("full"), (1, 4));
        assert_eq!(formed("adaptive_early"), (2, 4));
        assert_eq!(formed("window_expired"), (0, 0));
        assert_eq!(formed("other"), (1, 2), "unknown labels stay bounded");
        let waits = stats.batch_wait_seconds.cumulative();
        assert_eq!(waits[0], 2, "0 and 5 µs are within 10 µs");
        assert_eq!(*waits.last().unwrap(), 4);
        assert!((stats.batch_wait_seconds.sum() - 0.000535).abs() < 1e-9);
    }
}
