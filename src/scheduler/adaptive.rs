//! The adaptive batching strategy (model config parameter `batching_strategy: "adaptive"`).
//!
//! Triton's strategy treats `max_queue_delay_microseconds` as a target: a batch that is not full
//! waits for the whole window. With few requests in flight that wait is pure latency: a client with
//! one request in flight sends nothing while it waits, so the window can never fill. The adaptive
//! strategy treats the window as a cap and waits only when waiting is expected to pay.
//!
//! The decision. With `n` rows queued, an instance free, arrivals at `λ` rows per second while
//! requests wait, and a batch cost `cost(r) = fixed + per_row·r`, running now gives a throughput of
//! `n / cost(n)`; waiting `w` first gives `(n + λw) / (w + cost(n + λw))`. That ratio is monotonic
//! in `w`, and its derivative has the sign of `λ·fixed − n`: waiting pays (up to the cap) exactly
//! when more rows arrive during one fixed cost than are queued now, whatever `per_row` is. So a
//! model whose cost grows with its rows (a CPU MLP) dispatches at once, and a model with a large
//! fixed cost (a GPU launch) under a stream of requests waits for them.
//!
//! What is learned, online, from what the batcher sees:
//! - `λ`: rows that arrived while other requests were waiting, over the time requests were waiting
//!   ([`ArrivalRate`]). Not the plain inter-arrival rate: clients are closed-loop, and a client
//!   whose request waits sends nothing, so only arrivals observed during waits say whether waiting
//!   brings anything. A wait that ends with no arrival counts its whole span with none, so the
//!   estimate falls as soon as waiting stops paying. Once the strategy has waited, what its own
//!   waits brought ([`WaitYield`]) takes over from that rate: it is exactly "what arrives if I
//!   wait", which closed-loop clients make lower than what arrives while an instance is busy.
//! - `fixed`: the intercept of a least-squares line through (rows, compute time) of past executions,
//!   with exponential forgetting ([`CostModel`]). Until executions of different sizes were seen the
//!   fixed part is unknown.
//!
//! Unknown means dispatch: with no estimate of either, the strategy behaves as a zero window. And a
//! wait is abandoned when no row arrived for [`GAP_FACTOR`] mean inter-arrival times (the arrivals
//! have stopped: every client may be waiting already). Preferred and maximum sizes, priorities and
//! queue timeouts are the policy's, unchanged; the window's end stays a hard cap.
use std::time::Duration;

use tokio::time::Instant;

/// How a model's dynamic batcher uses its delay window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum BatchingStrategy {
    /// Triton's semantics: a batch that is not full waits for the whole window.
    #[default]
    Triton,
    /// The window is a cap: dispatch at once unless waiting is expected to raise throughput.
    Adaptive,
}

impl BatchingStrategy {
    /// The model config parameter that chooses the strategy.
    pub const PARAMETER: &'static str = "batching_strategy";
    /// Its allowed values.
    pub const ALLOWED: [&'static str; 2] = ["triton", "adaptive"];

    pub fn as_str(self) -> &'static str {
        match self {
            BatchingStrategy::Triton => "triton",
            BatchingStrategy::Adaptive => "adaptive",
        }
    }

    /// The strategy a config's `parameters` choose; None when they choose none. A value outside
    /// [`Self::ALLOWED`] is refused with a message naming the parameter and the allowed values.
    pub fn from_parameters(
        parameters: &std::collections::HashMap<String, crate::proto::ModelParameter>,
    ) -> Result<Option<BatchingStrategy>, String> {
        let Some(value) = parameters.get(Self::PARAMETER) else {
            return Ok(None);
        };
        match value.string_value.trim() {
            "triton" => Ok(Some(BatchingStrategy::Triton)),
            "adaptive" => Ok(Some(BatchingStrategy::Adaptive)),
            other => Err(format!(
                "parameters.{} is \"{}\"; allowed values: \"{}\"",
                Self::PARAMETER,
                other.escape_debug(),
                Self::ALLOWED.join("\", \"")
            )),
        }
    }
}

/// A wait is abandoned after this many mean inter-arrival times (`1/λ`) without an arrival. Since
/// waiting only happens when `1/λ < fixed / n`, a wait that brings nothing costs at most two fixed
/// costs.
pub const GAP_FACTOR: f64 = 2.0;

/// Weight kept by the past at each dispatch (arrivals) and each execution (cost): about the last
/// 10 and 20 of them count.
const ARRIVAL_DECAY: f64 = 0.9;
const COST_DECAY: f64 = 0.95;
/// Weight kept by the evidence of past waits at each dispatch: slower, so that after waits that
/// brought nothing a probe comes only every hundred dispatches or so.
const WAIT_DECAY: f64 = 0.99;
/// Executions seen before the cost line is trusted.
const MIN_COST_SAMPLES: u32 = 4;
/// Variance of the rows of past executions (decayed) below which sizes count as all the same: the
/// fixed and per-row parts cannot be told apart.
const MIN_ROW_VARIANCE: f64 = 0.05;

/// Rows arriving while other requests wait, per second of waiting.
#[derive(Debug, Clone, Default)]
pub struct ArrivalRate {
    /// Decayed rows that arrived while others waited, and the decayed seconds they waited over.
    rows: f64,
    waited: f64,
    /// The same, since the last dispatch (folded in at the next one).
    period_rows: f64,
    period_waited: f64,
    /// Since when requests have been waiting without an arrival or dispatch; None when none waits.
    mark: Option<Instant>,
}

impl ArrivalRate {
    /// `rows` arrived at `now`; `queued_before` requests were waiting then.
    pub fn on_arrival(&mut self, now: Instant, rows: usize, queued_before: usize) {
        match self.mark {
            Some(mark) if queued_before > 0 => {
                self.period_waited += seconds(now.saturating_duration_since(mark));
                self.period_rows += rows as f64;
                // Arrival times are taken at admission, so they may precede the last dispatch.
                self.mark = Some(mark.max(now));
            }
            // Nobody was waiting (or the queue emptied by timeouts): a new span starts.
            _ => self.mark = Some(now),
        }
    }

    /// A batch left the queue at `now`; `queued_after` requests are still waiting.
    pub fn on_dispatch(&mut self, now: Instant, queued_after: usize) {
        if let Some(mark) = self.mark {
            self.period_waited += seconds(now.saturating_duration_since(mark));
        }
        self.mark = (queued_after > 0).then_some(now);
        self.rows = self.rows * ARRIVAL_DECAY + self.period_rows;
        self.waited = self.waited * ARRIVAL_DECAY + self.period_waited;
        self.period_rows = 0.0;
        self.period_waited = 0.0;
    }

    /// Rows per second; None before any wait was observed.
    pub fn per_second(&self) -> Option<f64> {
        (self.waited > 0.0).then(|| self.rows / self.waited)
    }
}

/// What the strategy's own waits brought: rows that arrived while it chose to wait with an
/// instance free, over the time it waited. This is the rate that matters (closed-loop clients may
/// all be queued or in flight already, whatever the rate seen while the instance was busy), so it
/// replaces the general rate as evidence accumulates. The evidence fades at each dispatch, so after
/// waits that brought nothing the strategy still probes again now and then, at the cost of one
/// short wait, and notices when the load has changed.
#[derive(Debug, Clone, Default)]
pub struct WaitYield {
    /// Decayed rows that arrived during waits, and the decayed seconds waited.
    rows: f64,
    waited: f64,
    /// The wait in progress: when it started and the rows that arrived since.
    current: Option<(Instant, f64)>,
}

impl WaitYield {
    /// The strategy chose to wait at `now` (a wait already in progress goes on).
    pub fn on_wait(&mut self, now: Instant) {
        self.current.get_or_insert((now, 0.0));
    }

    pub fn on_arrival(&mut self, rows: usize, queued_before: usize) {
        if queued_before == 0 {
            // The queue emptied (timeouts, cancellations) without a dispatch: that wait is over.
            self.current = None;
        } else if let Some((_, arrived)) = &mut self.current {
            *arrived += rows as f64;
        }
    }

    /// Whether a wait the strategy chose is in progress (not yet ended by a dispatch).
    pub fn waiting(&self) -> bool {
        self.current.is_some()
    }

    /// A batch left the queue at `now`, ending any wait.
    pub fn on_dispatch(&mut self, now: Instant) {
        self.rows *= WAIT_DECAY;
        self.waited *= WAIT_DECAY;
        if let Some((started, arrived)) = self.current.take() {
            self.waited += seconds(now.saturating_duration_since(started));
            self.rows += arrived;
        }
    }

    /// Rows per second during waits, with `prior` (rows per second) counting as one arrival
    /// expected at that rate.
    pub fn rate(&self, prior: f64) -> Option<f64> {
        if prior <= 0.0 {
            return (self.waited > 0.0).then(|| self.rows / self.waited);
        }
        Some((self.rows + 1.0) / (self.waited + 1.0 / prior))
    }
}

/// Batch cost as `fixed + per_row · rows`, fitted by least squares with exponential forgetting.
#[derive(Debug, Clone, Default)]
pub struct CostModel {
    /// Decayed sums: weights, rows, rows², seconds, rows·seconds.
    w: f64,
    x: f64,
    xx: f64,
    y: f64,
    xy: f64,
    samples: u32,
}

impl CostModel {
    /// One execution of `rows` rows took `took`.
    pub fn observe(&mut self, rows: usize, took: Duration) {
        let (x, y) = (rows.max(1) as f64, seconds(took));
        self.w = self.w * COST_DECAY + 1.0;
        self.x = self.x * COST_DECAY + x;
        self.xx = self.xx * COST_DECAY + x * x;
        self.y = self.y * COST_DECAY + y;
        self.xy = self.xy * COST_DECAY + x * y;
        self.samples = self.samples.saturating_add(1);
    }

    /// `(fixed, per_row)` in seconds; None while too few executions, or executions of too similar
    /// sizes, were seen to tell the two apart.
    pub fn line(&self) -> Option<(f64, f64)> {
        if self.samples < MIN_COST_SAMPLES {
            return None;
        }
        let spread = self.w * self.xx - self.x * self.x;
        if spread <= self.w * self.w * MIN_ROW_VARIANCE {
            return None;
        }
        let mean_cost = self.y / self.w;
        let per_row = ((self.w * self.xy - self.x * self.y) / spread).max(0.0);
        let fixed = ((self.y - per_row * self.x) / self.w).clamp(0.0, mean_cost);
        (fixed.is_finite() && per_row.is_finite()).then_some((fixed, per_row))
    }

    /// The fixed part of one execution's cost, in seconds, when known.
    pub fn fixed_seconds(&self) -> Option<f64> {
        self.line().map(|(fixed, _)| fixed)
    }
}

/// What the adaptive strategy learns and decides for one model.
#[derive(Debug, Clone, Default)]
pub struct Adaptive {
    pub arrivals: ArrivalRate,
    pub waits: WaitYield,
    pub cost: CostModel,
    /// When the last request arrived.
    last_arrival: Option<Instant>,
}

impl Adaptive {
    pub fn on_arrival(&mut self, now: Instant, rows: usize, queued_before: usize) {
        self.arrivals.on_arrival(now, rows, queued_before);
        self.waits.on_arrival(rows, queued_before);
        self.last_arrival = Some(self.last_arrival.map_or(now, |last| last.max(now)));
    }

    pub fn on_dispatch(&mut self, now: Instant, queued_after: usize) {
        self.arrivals.on_dispatch(now, queued_after);
        self.waits.on_dispatch(now);
    }

    /// Rows per second expected to arrive if the batcher waits now: what its own past waits
    /// brought, starting from (and, as their evidence fades, returning to) the rate seen while
    /// requests waited for any reason.
    pub fn expected_rate(&self) -> Option<f64> {
        self.waits.rate(self.arrivals.per_second()?)
    }

    pub fn observe_execution(&mut self, rows: usize, took: Duration) {
        self.cost.observe(rows, took);
    }

    /// With `rows` rows queued and an instance free at `now`: the instant until which waiting for
    /// more is expected to pay (the caller caps it by the window and timeouts), or None to
    /// dispatch now.
    pub fn wait_until(&mut self, rows: usize, now: Instant) -> Option<Instant> {
        let give_up = self.worth_waiting_until(rows, now)?;
        self.waits.on_wait(now);
        Some(give_up)
    }

    fn worth_waiting_until(&self, rows: usize, now: Instant) -> Option<Instant> {
        let rate = self.expected_rate()?;
        let fixed = self.cost.fixed_seconds()?;
        if rate * fixed <= rows as f64 {
            return None;
        }
        // In whole microseconds (finer than any timer wakes); at least one.
        let gap_us = (GAP_FACTOR / rate * 1e6)
            .round()
            .clamp(1.0, u64::MAX as f64);
        let gap = Duration::from_micros(gap_us as u64);
        let give_up = super::policy::deadline_after(self.last_arrival?, gap);
        (now < give_up).then_some(give_up)
    }
}

fn seconds(d: Duration) -> f64 {
    d.as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    #[test]
    fn cost_learning_converges_to_the_fixed_and_per_row_parts() {
        let mut cost = CostModel::default();
        // 40 µs fixed + 10 µs per row, with ±1 µs of noise, over varied sizes.
        for i in 0..200u32 {
            let rows = 1 + (i as usize * 7) % 16;
            let noise = if i % 2 == 0 { 1 } else { 0 };
            cost.observe(rows, US * (40 + 10 * rows as u32 + noise));
        }
        let (fixed, per_row) = cost.line().expect("learned");
        assert!((fixed - 40e-6).abs() < 2e-6, "fixed {fixed}");
        assert!((per_row - 10e-6).abs() < 0.3e-6, "per row {per_row}");
    }

    #[test]
    fn cost_follows_a_change_of_the_model_cost() {
        let mut cost = CostModel::default();
        for i in 0..100u32 {
            let rows = 1 + i as usize % 8;
            cost.observe(rows, US * (100 + rows as u32));
        }
        for i in 0..200u32 {
            let rows = 1 + i as usize % 8;
            cost.observe(rows, US * (10 + 20 * rows as u32));
        }
        let (fixed, per_row) = cost.line().unwrap();
        assert!((fixed - 10e-6).abs() < 1e-6, "fixed {fixed}");
        assert!((per_row - 20e-6).abs() < 0.2e-6, "per row {per_row}");
    }

    #[test]
    fn cost_is_unknown_until_sizes_differ() {
        let mut cost = CostModel::default();
        for _ in 0..50 {
            cost.observe(1, US * 30);
        }
        assert_eq!(cost.line(), None, "batch-1 only: fixed and per-row are one");
        cost.observe(2, US * 31);
        cost.observe(4, US * 33);
        assert!(cost.fixed_seconds().is_some());
        assert_eq!(CostModel::default().fixed_seconds(), None);
    }

    #[test]
    fn a_fixed_cost_is_never_negative_nor_above_the_mean_cost() {
        let mut cost = CostModel::default();
        // Cost shrinking with rows (noise): the slope is clamped at 0, the fixed part at the mean.
        for (rows, us) in [(1, 50), (2, 40), (4, 30), (8, 20), (1, 50), (8, 20)] {
            cost.observe(rows, US * us);
        }
        let (fixed, per_row) = cost.line().unwrap();
        assert_eq!(per_row, 0.0);
        assert!(fixed > 0.0 && fixed <= 50e-6);
        // Cost growing faster than linear: the intercept would be negative; it is 0.
        let mut steep = CostModel::default();
        for (rows, us) in [(1, 1), (2, 2), (8, 200), (16, 900), (1, 1), (16, 900)] {
            steep.observe(rows, US * us);
        }
        assert_eq!(steep.fixed_seconds(), Some(0.0));
    }

    #[test]
    fn arrivals_count_only_while_others_wait() {
        let t0 = Instant::now();
        let mut rate = ArrivalRate::default();
        assert_eq!(rate.per_second(), None);
        // A lone request, dispatched 10 µs later: 10 µs of waiting, nothing arrived.
        rate.on_arrival(t0, 1, 0);
        rate.on_dispatch(t0 + US * 10, 0);
        assert_eq!(rate.per_second(), Some(0.0));
        // A long idle gap counts for nothing; then 4 rows join a waiting request over 40 µs.
        let t1 = t0 + Duration::from_secs(1);
        rate.on_arrival(t1, 1, 0);
        for i in 1..=4 {
            rate.on_arrival(t1 + US * (10 * i), 1, i as usize);
        }
        rate.on_dispatch(t1 + US * 40, 0);
        // 4 rows over (0.9 · 10 + 40) µs of waiting.
        let expected = 4.0 / (49e-6);
        let got = rate.per_second().unwrap();
        assert!((got - expected).abs() / expected < 1e-9, "{got}");
    }

    #[test]
    fn a_wait_that_brings_nothing_lowers_the_rate() {
        let t0 = Instant::now();
        let mut rate = ArrivalRate::default();
        rate.on_arrival(t0, 1, 0);
        rate.on_arrival(t0 + US * 5, 1, 1);
        rate.on_dispatch(t0 + US * 5, 0);
        let before = rate.per_second().unwrap();
        rate.on_arrival(t0 + US * 100, 1, 0);
        rate.on_dispatch(t0 + US * 600, 0);
        assert!(rate.per_second().unwrap() < before / 10.0);
    }

    fn learned(fixed_us: u32, per_row_us: u32) -> Adaptive {
        let mut a = Adaptive::default();
        for i in 0..32u32 {
            let rows = 1 + i as usize % 8;
            a.observe_execution(rows, US * (fixed_us + per_row_us * rows as u32));
        }
        a
    }

    /// Feeds one burst of `count` single-row arrivals `every` apart to a waiting request.
    fn burst(a: &mut Adaptive, start: Instant, count: usize, every: Duration) -> Instant {
        a.on_arrival(start, 1, 0);
        let mut t = start;
        for queued in 1..count {
            t += every;
            a.on_arrival(t, 1, queued);
        }
        a.on_dispatch(t, 0);
        t
    }

    #[test]
    fn nothing_learned_means_dispatch() {
        let now = Instant::now();
        let mut a = Adaptive::default();
        a.on_arrival(now, 1, 0);
        assert_eq!(a.wait_until(1, now), None);
        // Arrivals known but no cost: still dispatch.
        burst(&mut a, now, 8, US);
        assert_eq!(a.wait_until(1, now + US * 8), None);
    }

    #[test]
    fn a_costly_fixed_part_and_a_stream_of_arrivals_make_it_wait() {
        let mut a = learned(400, 5);
        let t0 = Instant::now();
        // A row every 10 µs while requests wait: 40 rows per fixed cost.
        let end = burst(&mut a, t0, 16, US * 10);
        let t = end + US * 100;
        a.on_arrival(t, 1, 0);
        let until = a.wait_until(1, t).expect("waiting pays");
        // Given up after GAP_FACTOR mean gaps without an arrival.
        assert_eq!(until, t + US * 20);
        assert_eq!(a.wait_until(1, until), None);
        // Enough rows queued to outweigh what one fixed cost brings: go.
        assert_eq!(a.wait_until(41, t), None);
    }

    #[test]
    fn cost_growing_with_rows_dispatches_despite_arrivals() {
        // A CPU MLP: 2 µs fixed, 50 µs per row; arrivals every 10 µs bring 0.2 rows per fixed cost.
        let mut a = learned(2, 50);
        let t0 = Instant::now();
        let end = burst(&mut a, t0, 16, US * 10);
        a.on_arrival(end + US, 1, 0);
        assert_eq!(a.wait_until(1, end + US), None);
    }

    #[test]
    fn a_closed_loop_client_never_waits() {
        // One request in flight: each arrives alone and leaves at once, whatever the cost.
        let mut a = learned(400, 5);
        let mut t = Instant::now();
        for _ in 0..100 {
            a.on_arrival(t, 1, 0);
            assert_eq!(a.wait_until(1, t), None);
            t += US * 3;
            a.on_dispatch(t, 0);
            t += US * 500;
        }
    }

    #[test]
    fn waits_that_bring_nothing_lower_the_expected_rate_and_fade() {
        let t0 = Instant::now();
        let mut waits = WaitYield::default();
        let prior = 100_000.0; // a row every 10 µs
        let close =
            |rate: Option<f64>, want: f64| rate.is_some_and(|r| (r - want).abs() < 1e-6 * want);
        assert!(close(waits.rate(prior), prior), "no evidence: the prior");
        waits.on_wait(t0);
        waits.on_dispatch(t0 + US * 20);
        // 20 µs with nothing against one arrival expected in 10 µs: a third of the prior.
        let after_one = waits.rate(prior).unwrap();
        assert!((after_one - prior / 3.0).abs() < 1.0, "{after_one}");
        // Without more waits the evidence fades and the rate climbs back toward the prior.
        for _ in 0..400 {
            waits.on_dispatch(t0 + US * 20);
        }
        assert!(waits.rate(prior).unwrap() > 0.9 * prior);
        // Waits that do bring rows are believed: 5 rows in 10 µs, twice the prior's rate.
        let mut busy = WaitYield::default();
        for i in 0..50u32 {
            let start = t0 + US * 100 * i;
            busy.on_wait(start);
            for queued in 1..=5 {
                busy.on_arrival(1, queued);
            }
            busy.on_dispatch(start + US * 10);
        }
        let rate = busy.rate(prior).unwrap();
        assert!((rate - 500_000.0).abs() / 500_000.0 < 0.05, "{rate}");
        // A queue emptied by timeouts ends the wait without evidence.
        let mut expired = WaitYield::default();
        expired.on_wait(t0);
        expired.on_arrival(1, 0);
        expired.on_dispatch(t0 + Duration::from_secs(1));
        assert!(close(expired.rate(prior), prior));
    }

    #[test]
    fn the_parameter_names_the_allowed_values() {
        use crate::proto::ModelParameter;
        let mut params = std::collections::HashMap::new();
        assert_eq!(BatchingStrategy::from_parameters(&params), Ok(None));
        let set = |params: &mut std::collections::HashMap<_, _>, v: &str| {
            params.insert(
                BatchingStrategy::PARAMETER.to_string(),
                ModelParameter {
                    string_value: v.into(),
                },
            );
        };
        set(&mut params, " adaptive ");
        assert_eq!(
            BatchingStrategy::from_parameters(&params),
            Ok(Some(BatchingStrategy::Adaptive))
        );
        set(&mut params, "triton");
        assert_eq!(
            BatchingStrategy::from_parameters(&params),
            Ok(Some(BatchingStrategy::Triton))
        );
        set(&mut params, "cork");
        let err = BatchingStrategy::from_parameters(&params).unwrap_err();
        assert_eq!(
            err,
            "parameters.batching_strategy is \"cork\"; allowed values: \"triton\", \"adaptive\""
        );
    }
}
