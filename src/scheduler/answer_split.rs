//! Whether a batch run on the reactor answers its first half one turn before the second.
//!
//! With closed-loop clients every request in flight arrives at once, forms one batch and gets its
//! answer in the same write: on one CPU the client and the server then take turns, and the server
//! idles while the client turns its answers into new requests. Writing the first half of a long
//! batch's answers one reactor turn before the second lets the client send while the server still
//! answers, so the next batch forms while the server works: a pipeline. Its batches are about half
//! as large. That is free for a model whose cost grows with its rows and costs up to twice the runs
//! for one whose cost is mostly fixed per run (a GPU launch), so the split follows the cost shape
//! learned from the model's own runs. Once two groups take turns they stay so, whatever the model
//! costs; so the shape is learned first, from a few batches run (not answered) in halves, which
//! leaves the clients in step.
use std::time::Duration;

use super::adaptive::CostModel;

/// Fewest requests in a batch worth splitting: in a smaller one, the half that leaves early is
/// too few requests to keep the client busy while the rest is answered.
pub(crate) const MIN_REQUESTS: usize = 8;

/// The largest part of a batch's cost that may be fixed per run. Halving a batch then costs at most
/// this much more compute per request: `fixed / (fixed + per_row · rows)`. About what the split
/// can gain: the share of time a one-CPU server idles while a closed-loop client takes its turn
/// (7-12% for the benchmark's MLP), and wide enough for the noise of a fit over timed runs
/// (inside the gateway the MLP's fixed cost came out between 0 and 47 µs against 20-35 µs a row).
const MAX_FIXED_SHARE: f64 = 0.10;

/// Batches seen with the cost shape known and then lost again (its batches all alike) before a
/// few are run in halves to check it.
const REPROBE_EVERY: u32 = 1000;
/// Batches run in halves in a row when the shape is checked again: one timed half alone would
/// leave the fit to one run's noise.
const PROBES_PER_CHECK: u32 = 3;

/// What the next batch run on the reactor does beyond running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(u8)]
pub(crate) enum Plan {
    /// Runs once and answers everyone at once.
    #[default]
    Whole = 0,
    /// Answers its first half one reactor turn before the second.
    AnswerInHalves = 1,
    /// Runs as two executions of half its requests each, back to back, and answers everyone in
    /// the same turn: a run of another size, timed, for the cost shape to be learned from, that
    /// leaves the clients in step (splitting the answers to learn would start the two groups it
    /// is meant to decide about).
    RunInHalves = 2,
}

impl Plan {
    pub fn from_u8(value: u8) -> Plan {
        match value {
            1 => Plan::AnswerInHalves,
            2 => Plan::RunInHalves,
            _ => Plan::Whole,
        }
    }
}

/// The learned decision for one model.
#[derive(Debug, Clone, Default)]
pub(crate) struct AnswerSplit {
    cost: CostModel,
    /// What the cost shape last said; None until it was known once.
    fixed_share_small: Option<bool>,
    /// The decision for the next batches.
    plan: Plan,
    /// Batches since the shape was last checked, and the runs in halves still to make for it.
    since_check: u32,
    probes_left: u32,
}

impl AnswerSplit {
    /// Learns from one run of `rows` rows that took `took` and plans the next batch. Its answers
    /// leave in two halves when the model's runs lately took at least `min_run` (a shorter batch
    /// answers almost at once anyway, and a second write would cost more than the overlap gains)
    /// and halving its batches costs little. Until the cost shape was known once, and for a few
    /// batches every `REPROBE_EVERY` while it cannot be told (all batches alike), long batches are
    /// run in halves to learn it; in between, the last verdict stands.
    pub fn observe(
        &mut self,
        rows: usize,
        took: Duration,
        recent_cost: Duration,
        min_run: Option<Duration>,
    ) -> Plan {
        self.cost.observe(rows, took);
        // Both are judged for the batches as they would be unsplit: while the answers are split,
        // the batches are about half that, and a batch run in halves runs halves.
        let unsplit: u32 = if self.plan == Plan::Whole { 1 } else { 2 };
        let line = self.cost.line();
        if let Some((fixed, per_row)) = line {
            let whole = fixed + per_row * f64::from(unsplit) * rows.max(1) as f64;
            self.fixed_share_small = Some(whole > 0.0 && fixed <= MAX_FIXED_SHARE * whole);
        }
        let long = min_run.is_some_and(|min| recent_cost * unsplit >= min);
        self.plan = if long && self.fixed_share_small == Some(true) {
            Plan::AnswerInHalves
        } else if long && line.is_none() && self.wants_a_check() {
            Plan::RunInHalves
        } else {
            Plan::Whole
        };
        self.plan
    }

    /// Whether the next batch should be run in halves to learn the shape (counts the batches).
    fn wants_a_check(&mut self) -> bool {
        if self.fixed_share_small.is_none() {
            return true;
        }
        self.since_check = self.since_check.saturating_add(1);
        if self.since_check >= REPROBE_EVERY {
            self.since_check = 0;
            self.probes_left = PROBES_PER_CHECK;
        }
        if self.probes_left == 0 {
            return false;
        }
        self.probes_left -= 1;
        true
    }

    /// The plan the last run gave.
    pub fn plan(&self) -> Plan {
        self.plan
    }

    /// The learned `(fixed, per_row)` cost in seconds, when the run sizes seen tell them apart.
    pub fn line(&self) -> Option<(f64, f64)> {
        self.cost.line()
    }

    /// Takes the shape as known and mostly per row, for tests that need the split on.
    #[cfg(test)]
    pub fn assume_per_row_cost(&mut self) {
        self.fixed_share_small = Some(true);
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
        fn ran(&mut self, rows: usize, us: f64) -> Plan {
            self.observe(rows, micros(us), micros(us), MIN_RUN)
        }
    }

    /// Runs batches of `rows` the way the scheduler would on what each plan says, each costing
    /// `fixed + per_row · rows` µs; returns the plans.
    fn drive(
        split: &mut AnswerSplit,
        fixed: f64,
        per_row: f64,
        rows: usize,
        batches: usize,
    ) -> Vec<Plan> {
        let cost = |rows: usize| fixed + per_row * rows as f64;
        let mut plans = Vec::new();
        let mut plan = split.plan();
        for _ in 0..batches {
            plan = match plan {
                Plan::RunInHalves => {
                    split.ran(rows / 2, cost(rows / 2));
                    split.ran(rows - rows / 2, cost(rows - rows / 2))
                }
                // Split answers make the next batches about half as large.
                Plan::AnswerInHalves => split.ran(rows / 2, cost(rows / 2)),
                Plan::Whole => split.ran(rows, cost(rows)),
            };
            plans.push(plan);
        }
        plans
    }

    /// How many batches ran in halves, to learn the cost shape, before the first other plan.
    fn runs_in_halves_first(plans: &[Plan]) -> usize {
        plans
            .iter()
            .take_while(|p| **p == Plan::RunInHalves)
            .count()
    }

    #[test]
    fn nothing_is_split_before_the_cost_shape_is_known_it_is_run_in_halves_to_learn_it() {
        let mut split = AnswerSplit::default();
        assert_eq!(split.ran(16, 400.0), Plan::RunInHalves);
        assert_eq!(
            AnswerSplit::default().ran(16, 149.0),
            Plan::Whole,
            "a short run"
        );
        let mut off = AnswerSplit::default();
        assert_eq!(
            off.observe(16, micros(400.0), micros(400.0), None),
            Plan::Whole
        );
    }

    #[test]
    fn a_model_whose_cost_grows_with_its_rows_learns_it_then_splits_its_answers() {
        // The benchmark's MLP: about 30 µs a row and little per run.
        let mut split = AnswerSplit::default();
        let plans = drive(&mut split, 5.0, 30.0, 16, 40);
        let learning = runs_in_halves_first(&plans);
        assert!(learning <= 3, "{plans:?}");
        assert!(
            plans[learning..].iter().all(|p| *p == Plan::AnswerInHalves),
            "{plans:?}"
        );
    }

    #[test]
    fn a_model_with_a_large_fixed_cost_never_splits_its_answers() {
        // A launch-bound model: 400 µs a run whatever its size. It is learned, left whole, and
        // checked again now and then while its batches are all alike; never split.
        let mut split = AnswerSplit::default();
        let plans = drive(&mut split, 400.0, 1.0, 16, 5000);
        assert!(!plans.contains(&Plan::AnswerInHalves));
        let checks = plans.iter().filter(|p| **p == Plan::RunInHalves).count();
        assert!(
            checks <= 3 + 5 * PROBES_PER_CHECK as usize,
            "{checks} runs in halves"
        );
    }

    #[test]
    fn a_split_model_is_judged_long_by_what_its_batches_would_take_unsplit() {
        let mut split = AnswerSplit::default();
        split.assume_per_row_cost();
        assert_eq!(split.ran(16, 200.0), Plan::AnswerInHalves);
        // Split, its batches take half as long: still long enough unsplit.
        assert_eq!(split.ran(8, 100.0), Plan::AnswerInHalves);
        // Only once they would be short unsplit too does the split stop.
        assert_eq!(split.ran(8, 70.0), Plan::Whole);
        assert_eq!(split.ran(8, 100.0), Plan::Whole, "unsplit, 100 µs is short");
    }

    #[test]
    fn the_verdict_follows_the_share_of_the_fixed_cost() {
        // Split batches of 8 would be 16 unsplit; 10% of a batch of 16 at 20 µs a row is 35.6 µs
        // of fixed cost.
        let plans = |fixed| drive(&mut AnswerSplit::default(), fixed, 20.0, 16, 60);
        assert_eq!(plans(33.0).last(), Some(&Plan::AnswerInHalves));
        assert_eq!(plans(38.0).last(), Some(&Plan::Whole));
    }

    #[test]
    fn a_fixed_cost_near_the_bound_does_not_flip_the_verdict_with_each_batch() {
        // A model of 50 µs a run and 30 µs a row: unsplit batches of 16 are halved to 8 for 9.4%
        // more compute per request. Judged at their own size, the split batches of 8 would look
        // like 17%, past the bound, and each run would flip the verdict.
        let mut split = AnswerSplit::default();
        let plans = drive(&mut split, 50.0, 30.0, 16, 200);
        let learning = runs_in_halves_first(&plans);
        assert!(
            plans[learning..].iter().all(|p| *p == Plan::AnswerInHalves),
            "{plans:?}"
        );
    }

    #[test]
    fn a_verdict_whose_shape_was_lost_is_checked_again_in_a_few_runs_in_halves() {
        let mut split = AnswerSplit::default();
        drive(&mut split, 400.0, 1.0, 16, 10);
        // All alike for long enough that the line cannot be told.
        let plans = drive(&mut split, 400.0, 1.0, 16, REPROBE_EVERY as usize * 2);
        let checks: Vec<usize> = plans
            .iter()
            .enumerate()
            .filter(|(_, p)| **p == Plan::RunInHalves)
            .map(|(i, _)| i)
            .collect();
        assert!(
            !checks.is_empty() && checks.len() <= 2 * PROBES_PER_CHECK as usize,
            "{checks:?}"
        );
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
