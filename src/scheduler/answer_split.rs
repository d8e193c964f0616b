//! Whether a batch run on the reactor answers its first half one turn before the second.
//!
//! With closed-loop clients every request in flight arrives at once, forms one batch and gets its
//! answer in the same write: on one CPU the client and the server then take turns, and the server
//! idles while the client turns its answers into new requests. Writing the first half of a long
//! batch's answers one reactor turn before the second lets the client send while the server still
//! answers, so the next batch forms while the server works: a pipeline. Its batches are about half
//! as large. That is free for a model whose cost grows with its rows and costs up to twice the runs
//! for one whose cost is mostly fixed per run, so the split follows the cost shape learned from
//! the model's own runs.
use std::time::Duration;

use super::adaptive::CostModel;

/// Fewest requests in a batch worth splitting: in a smaller one, the half that leaves early is
/// too few requests to keep the client busy while the rest is answered.
const MIN_REQUESTS: usize = 8;

/// The largest part of a batch's cost that may be fixed per run. Halving a batch then costs at most
/// this much more compute per request: `fixed / (fixed + per_row · rows)`. About what the split
/// can gain: the share of time a one-CPU server idles while a closed-loop client takes its turn
/// (7-12% for the benchmark's MLP), and wide enough for the noise of a fit over timed runs
/// (the MLP's fixed cost came out between 0 and 26 µs against 30 µs a row).
const MAX_FIXED_SHARE: f64 = 0.10;

/// The learned decision for one model.
#[derive(Debug, Clone)]
pub(crate) struct AnswerSplit {
    cost: CostModel,
    /// What the cost shape last said. True until the shape is known: the split itself makes the
    /// batches of different sizes that the shape is learned from (lockstep batches are all alike).
    fixed_share_small: bool,
    /// The decision for the next batches.
    splitting: bool,
}

impl Default for AnswerSplit {
    fn default() -> Self {
        AnswerSplit {
            cost: CostModel::default(),
            fixed_share_small: true,
            splitting: false,
        }
    }
}

impl AnswerSplit {
    /// Learns from one run of `rows` rows that took `took` and decides whether the next batches'
    /// answers leave in two halves: the model's runs lately took at least `min_run` (a shorter
    /// batch answers almost at once anyway, and a second write would cost more than the overlap
    /// gains) and halving its batches costs little. While the run sizes seen are too alike to tell
    /// the fixed cost from the per-row cost, the last verdict on the cost stands.
    pub fn observe(
        &mut self,
        rows: usize,
        took: Duration,
        recent_cost: Duration,
        min_run: Option<Duration>,
    ) -> bool {
        self.cost.observe(rows, took);
        // Both are judged for the batches as they would be unsplit: while the answers are split,
        // the batches are about half that.
        let unsplit: u32 = if self.splitting { 2 } else { 1 };
        if let Some((fixed, per_row)) = self.cost.line() {
            let whole = fixed + per_row * f64::from(unsplit) * rows.max(1) as f64;
            self.fixed_share_small = whole > 0.0 && fixed <= MAX_FIXED_SHARE * whole;
        }
        let long = min_run.is_some_and(|min| recent_cost * unsplit >= min);
        self.splitting = long && self.fixed_share_small;
        self.splitting
    }

    /// The decision the last run gave.
    pub fn splitting(&self) -> bool {
        self.splitting
    }

    /// The learned `(fixed, per_row)` cost in seconds, when the run sizes seen tell them apart.
    pub fn line(&self) -> Option<(f64, f64)> {
        self.cost.line()
    }
}

/// The size of the last batch an instance split. Its halves come back as batches of their own,
/// and two groups taking turns is the whole gain: splitting the halves again would only make more
/// and smaller runs (at 16 in flight, batches of 5.7 on average and +15% CPU per request, against
/// two groups of 8). So a batch is split only when it holds more than three quarters of the last
/// one split, which happens again once the groups merge. A batch of a quarter or less of it means
/// the load fell, and the bar goes.
#[derive(Debug, Default)]
pub(crate) struct LastSplit(Option<usize>);

impl LastSplit {
    /// How many of a batch's `requests` to answer first when it is split; None when it is too
    /// small, or a half of the last batch split.
    pub fn first_half(&mut self, requests: usize) -> Option<usize> {
        if self.0.is_some_and(|last| requests * 4 <= last) {
            self.0 = None;
        }
        let whole = self.0.is_none_or(|last| requests * 4 > last * 3);
        (requests >= MIN_REQUESTS && whole).then(|| {
            self.0 = Some(requests);
            requests / 2
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN_RUN: Option<Duration> = Some(Duration::from_micros(150));

    fn micros(us: f64) -> Duration {
        Duration::from_secs_f64(us / 1e6)
    }

    impl AnswerSplit {
        /// One run, with its own time as the recent cost.
        fn ran(&mut self, rows: usize, us: f64) -> bool {
            self.observe(rows, micros(us), micros(us), MIN_RUN)
        }
    }

    /// Feeds runs cycling through `sizes`, each costing `fixed + per_row · rows` µs.
    fn learned(fixed: f64, per_row: f64, sizes: &[usize], runs: usize) -> AnswerSplit {
        let mut split = AnswerSplit::default();
        for rows in sizes.iter().cycle().take(runs) {
            split.ran(*rows, fixed + per_row * *rows as f64);
        }
        split
    }

    #[test]
    fn only_long_batches_are_split_and_only_when_the_split_is_on() {
        assert!(AnswerSplit::default().ran(16, 400.0));
        assert!(AnswerSplit::default().ran(16, 150.0));
        assert!(!AnswerSplit::default().ran(16, 149.0), "a short run");
        let mut off = AnswerSplit::default();
        assert!(
            !off.observe(16, micros(400.0), micros(400.0), None),
            "switched off"
        );
        assert!(!off.splitting());
    }

    #[test]
    fn a_split_model_is_judged_long_by_what_its_batches_would_take_unsplit() {
        let mut split = AnswerSplit::default();
        assert!(split.ran(16, 200.0));
        // Split, its batches take half as long: still long enough, as unsplit they would not be
        // shorter than before.
        assert!(split.ran(8, 100.0));
        assert!(split.ran(8, 100.0));
        // Only once they would be short unsplit too does the split stop.
        assert!(!split.ran(8, 70.0));
        assert!(!split.ran(8, 100.0), "unsplit, 100 µs is short");
    }

    #[test]
    fn a_model_whose_cost_grows_with_its_rows_keeps_splitting() {
        // The benchmark's MLP: about 30 µs a row and little per run.
        let split = learned(5.0, 30.0, &[16, 8, 5, 11], 40);
        assert!(split.splitting());
    }

    #[test]
    fn a_model_with_a_large_fixed_cost_stops_splitting_and_stays_stopped() {
        // A launch-bound model: 400 µs a run whatever its size.
        let mut split = learned(400.0, 1.0, &[16, 8], 8);
        assert!(!split.splitting());
        // Unsplit, its batches are all alike again: the line cannot be told any more, and the
        // verdict it gave stands.
        for _ in 0..200 {
            split.ran(16, 416.0);
        }
        assert!(split.line().is_none());
        assert!(!split.splitting());
    }

    #[test]
    fn the_verdict_follows_the_share_of_the_fixed_cost() {
        // Split batches of 7 to 9 would be 14 to 18 unsplit; 10% of a batch of 14 at 20 µs a row
        // is 31 µs of fixed cost.
        assert!(learned(28.0, 20.0, &[8, 7, 9], 60).splitting());
        assert!(!learned(34.0, 20.0, &[8, 7, 9], 60).splitting());
    }

    #[test]
    fn a_fixed_cost_near_the_bound_does_not_flip_the_verdict_with_each_batch() {
        // A model of 50 µs a run and 30 µs a row: unsplit batches of 16 are halved to 8 for 9.4%
        // more compute per request. Judged at their own size, the split batches of 8 would look
        // like 17%, past the bound, and each run would flip the verdict.
        let mut split = AnswerSplit::default();
        let mut flips = 0;
        for rows in [16, 8, 9, 8, 10, 8, 11, 8].iter().cycle().take(200) {
            let before = split.splitting();
            flips += usize::from(before != split.ran(*rows, 50.0 + 30.0 * *rows as f64));
        }
        assert!(split.splitting());
        assert_eq!(flips, 1, "on once, at the first run");
    }

    #[test]
    fn sizes_too_alike_to_tell_keep_the_split_so_it_can_learn() {
        let split = learned(400.0, 1.0, &[16], 50);
        assert!(split.line().is_none());
        assert!(split.splitting());
    }

    #[test]
    fn batches_of_fewer_than_eight_requests_are_not_split() {
        let mut last = LastSplit::default();
        assert_eq!(last.first_half(7), None);
        assert_eq!(last.first_half(8), Some(4));
        assert_eq!(LastSplit::default().first_half(17), Some(8));
    }

    #[test]
    fn the_halves_of_a_split_batch_are_not_split_again_until_the_groups_merge() {
        let mut last = LastSplit::default();
        assert_eq!(last.first_half(16), Some(8));
        // The two groups of 8 take turns.
        for _ in 0..100 {
            assert_eq!(last.first_half(8), None);
            assert_eq!(last.first_half(9), None);
        }
        // They merged: split again.
        assert_eq!(last.first_half(13), Some(6));
        assert_eq!(last.first_half(8), None);
    }

    #[test]
    fn a_load_fallen_to_a_quarter_is_split_afresh() {
        let mut last = LastSplit::default();
        assert_eq!(last.first_half(64), Some(32));
        assert_eq!(last.first_half(32), None);
        assert_eq!(last.first_half(16), Some(8), "64 in flight fell to 16");
        assert_eq!(last.first_half(8), None);
    }
}
