//! The state every party of one model shares under one lock: the queues (the policy, whose own
//! bounds are the admission bounds), which instances are idle, and the deadline the timekeeper is
//! armed for. Each party (an arriving request, an instance that finished, the timekeeper) takes
//! the lock once, makes its decision here, and settles what left the queue after unlocking.
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::time::Instant;

use super::super::answer_split::{AnswerSplit, Plan};
use super::super::policy::{BatchPolicy, Next, PolicyConfig};
use super::super::worker::{Batch, Job};
use super::super::{ExecuteError, SchedulerError};
use super::instance::Mailbox;
use crate::telemetry::stats::{FailureReason, ModelStats};

#[derive(Debug)]
pub(super) struct Core {
    pub policy: BatchPolicy<Job>,
    /// Instances blocked on their mailbox; the last one is handed the next batch.
    pub idle: Vec<usize>,
    /// Batches handed out and not yet finished.
    pub busy: usize,
    /// Instance threads still running (started and not lost to a panic).
    pub alive: usize,
    /// Shutting down: nothing is admitted, queued requests run without waiting for the window.
    pub stopping: bool,
    /// An arrival found an instance idle and yields before dispatching, so the requests its reactor
    /// tick already woke join the batch; arrivals meanwhile only queue.
    pub gathering: bool,
    /// Whether gathering yields pay off lately (see `gathers_by_yielding`).
    gather_record: GatherRecord,
    /// What the model's recent batches took (a moving average), once one ran.
    pub recent_cost: Option<std::time::Duration>,
    /// What inline batches do beyond running (answer in halves, run in halves to learn), learned
    /// from the model's runs.
    answer_split: AnswerSplit,
    next_seq: u64,
    /// The instant the timekeeper sleeps until; None while it waits for a notification only.
    armed: Option<Instant>,
    /// Times an arm changed the timekeeper's deadline (each one a wake-up of the timekeeper).
    #[cfg(test)]
    pub arms: usize,
    /// Times the timekeeper looked at the queue.
    #[cfg(test)]
    pub timekeeper_passes: usize,
}

/// Consecutive misses before gatherings stop yielding, and how often they yield while they do not.
const GATHER_MISSES_BEFORE_SKIPPING: u32 = 2;
const GATHER_PROBE_EVERY: u32 = 4;

/// Recent gathering yields: how many in a row found only their own request, and how many
/// gatherings skipped the yield since the last probe.
#[derive(Debug, Default)]
struct GatherRecord {
    misses: u32,
    skipped: u32,
}

/// What left the queue under the lock, answered once it is released.
#[derive(Debug, Default)]
pub(super) struct Released {
    pub expired: Vec<Job>,
    pub cancelled: Vec<Job>,
    /// Requests that can never run: no instance is left.
    pub unservable: Vec<Job>,
    /// The timekeeper must look again (its deadline moved earlier, or the drain may be complete).
    pub wake_timekeeper: bool,
}

/// The policy's answer for an instance that is free now.
pub(super) enum Formed {
    Batch(Batch),
    /// Nothing to run yet; look again at this instant (a window's end or a timeout) if set.
    Wait(Option<Instant>),
}

impl Core {
    pub fn new(config: PolicyConfig) -> Self {
        Self {
            policy: BatchPolicy::new(config),
            idle: Vec::new(),
            busy: 0,
            alive: 0,
            stopping: false,
            gathering: false,
            gather_record: GatherRecord::default(),
            recent_cost: None,
            answer_split: AnswerSplit::default(),
            next_seq: 0,
            armed: None,
            #[cfg(test)]
            arms: 0,
            #[cfg(test)]
            timekeeper_passes: 0,
        }
    }

    /// Queues a request that arrived at `now`. A full queue first gives back the places of callers
    /// that left, when some did (`sweep_wanted`, which this sweep then answers), before refusing.
    pub fn admit(
        &mut self,
        job: Job,
        priority: u32,
        timeout: Option<std::time::Duration>,
        now: Instant,
        sweep_wanted: &AtomicBool,
        released: &mut Released,
    ) -> Result<(), SchedulerError> {
        if self.stopping {
            return Err(SchedulerError::ShuttingDown);
        }
        if self.alive == 0 {
            return Err(no_instance());
        }
        let Err(full) = self.policy.push(job, priority, timeout, now) else {
            return Ok(());
        };
        if !sweep_wanted.swap(false, Ordering::AcqRel) {
            return Err(SchedulerError::QueueFull);
        }
        absorb(&mut released.cancelled, self.policy.sweep_cancelled());
        self.policy
            .push(full.0, priority, timeout, now)
            .map_err(|_| SchedulerError::QueueFull)
    }

    /// Removes the requests whose queue timeout has passed (REJECT) or moves them back (DELAY).
    pub fn expire(&mut self, now: Instant, released: &mut Released) {
        if self.policy.next_timeout().is_some_and(|t| t <= now) {
            absorb(&mut released.expired, self.policy.expire(now));
        }
    }

    /// Asks the policy what an instance that is free at `now` should run. Call `expire` first.
    pub fn form(&mut self, now: Instant, stats: &ModelStats, released: &mut Released) -> Formed {
        let next = if self.stopping {
            self.policy.next_batch_without_delay(now)
        } else {
            self.policy.next_batch(now)
        };
        absorb(&mut released.cancelled, self.policy.take_cancelled());
        match next {
            Next::Dispatch(jobs) => {
                let rows = jobs.iter().map(|j| j.rows).sum();
                let oldest = jobs.iter().map(|j| j.enqueued).min().unwrap_or(now);
                stats.record_batch_formed(
                    rows,
                    now.saturating_duration_since(oldest),
                    self.policy.last_dispatch_reason().label(),
                );
                let seq = self.next_seq;
                self.next_seq += 1;
                Formed::Batch(Batch {
                    seq,
                    rows,
                    dispatched: now,
                    jobs,
                })
            }
            Next::WaitUntil(at) => Formed::Wait(Some(at)),
            Next::Idle => Formed::Wait(None),
        }
    }

    /// Whether the arrival that starts a gathering should yield first. The yield costs a pass of the
    /// reactor (an `epoll_wait`); once two yields in a row found no other request (one client in
    /// flight), only every `GATHER_PROBE_EVERY`-th gathering yields, to notice when traffic returns.
    pub fn gathers_by_yielding(&mut self) -> bool {
        let record = &mut self.gather_record;
        if record.misses < GATHER_MISSES_BEFORE_SKIPPING {
            return true;
        }
        record.skipped += 1;
        if record.skipped >= GATHER_PROBE_EVERY {
            record.skipped = 0;
            return true;
        }
        false
    }

    /// Records how many requests a gathering that yielded found queued when it resumed (its own
    /// included).
    pub fn observe_gathering(&mut self, queued: usize) {
        let record = &mut self.gather_record;
        if queued > 1 {
            *record = GatherRecord::default();
        } else {
            record.misses = record.misses.saturating_add(1);
        }
    }

    /// Whether a batch may run on the caller's task: the model's recent batches took at most
    /// `inline_below`, and it is not shutting down.
    pub fn runs_inline(&self, inline_below: Option<std::time::Duration>) -> bool {
        let cheap =
            matches!((inline_below, self.recent_cost), (Some(max), Some(cost)) if cost <= max);
        cheap && !self.stopping
    }

    /// Folds one batch's run time into `recent_cost`, and lets the answer split learn from it
    /// (`split_from`: `SchedulerSettings::split_answers_from`).
    pub fn observe_cost(
        &mut self,
        rows: usize,
        took: std::time::Duration,
        split_from: Option<std::time::Duration>,
    ) {
        let recent = match self.recent_cost {
            None => took,
            Some(recent) => (recent * 3 + took) / 4,
        };
        self.recent_cost = Some(recent);
        self.answer_split.observe(rows, took, recent, split_from);
    }

    /// What the next inline batch does beyond running (`answer_split::Plan`), as the last batch
    /// that ran decided.
    pub fn inline_plan(&self) -> Plan {
        self.answer_split.plan()
    }

    /// Takes the model's cost as known and mostly per row, so that its answers are split.
    #[cfg(test)]
    pub fn assume_per_row_cost(&mut self) {
        self.answer_split.assume_per_row_cost();
    }

    /// The learned `(fixed, per_row)` cost in seconds, when known (for the logs).
    pub fn cost_line(&self) -> Option<(f64, f64)> {
        self.answer_split.line()
    }

    /// Hands batches to idle instances while the policy says run; fails what waits when no
    /// instance is left. Returns the instant the queue must be looked at again if nothing arrives
    /// and no instance finishes (a window's end while an instance is idle, a queue timeout).
    pub fn feed_idle(
        &mut self,
        now: Instant,
        mailboxes: &[Mailbox],
        stats: &ModelStats,
        released: &mut Released,
    ) -> Option<Instant> {
        self.feed_idle_keeping(false, now, mailboxes, stats, released)
            .1
    }

    /// As `feed_idle`; with `keep_first`, the first batch formed is returned with its instance
    /// (taken off the idle list, counted busy) instead of going into that instance's mailbox.
    pub fn feed_idle_keeping(
        &mut self,
        keep_first: bool,
        now: Instant,
        mailboxes: &[Mailbox],
        stats: &ModelStats,
        released: &mut Released,
    ) -> (Option<(usize, Batch)>, Option<Instant>) {
        if self.alive == 0 {
            absorb(&mut released.unservable, self.policy.drain());
            return (None, None);
        }
        let mut kept = None;
        let mut window = None;
        while let Some(&instance) = self.idle.last() {
            match self.form(now, stats, released) {
                Formed::Batch(batch) => {
                    self.idle.pop();
                    self.busy += 1;
                    if keep_first && kept.is_none() {
                        kept = Some((instance, batch));
                    } else if let Err(batch) = mailboxes[instance].put(batch) {
                        // Cannot happen while the idle list is right: a mailbox closes only
                        // once nothing is queued or running.
                        self.busy -= 1;
                        absorb(&mut released.unservable, batch.jobs);
                    }
                }
                Formed::Wait(at) => {
                    window = at;
                    break;
                }
            }
        }
        (kept, earliest(window, self.policy.next_timeout()))
    }

    /// Lowers the timekeeper's deadline to `at` when that is earlier: true if it must be woken to
    /// see it. A later deadline needs no wake: the timekeeper looks again at the one it has and
    /// re-arms then, so a window costs one wake however many requests join it.
    pub fn arm(&mut self, at: Option<Instant>) -> bool {
        let Some(at) = at else {
            return false;
        };
        if self.armed.is_some_and(|armed| armed <= at) {
            return false;
        }
        self.armed = Some(at);
        #[cfg(test)]
        {
            self.arms += 1;
        }
        true
    }

    /// The timekeeper sets the deadline it sleeps until after looking at the queue.
    pub fn set_armed(&mut self, at: Option<Instant>) {
        self.armed = at;
    }

    /// Shutting down and nothing left to run: the timekeeper may stop the instances.
    pub fn drained(&self) -> bool {
        self.stopping && self.busy == 0 && self.policy.is_empty()
    }
}

impl Released {
    /// Answers what left the queue; wakes the timekeeper if asked.
    pub fn settle(self, stats: &ModelStats, timekeeper: &tokio::sync::Notify) {
        for job in self.expired {
            job.responder.send(Err(SchedulerError::TimedOut));
        }
        for job in self.unservable {
            job.responder.send(Err(no_instance()));
        }
        if !self.cancelled.is_empty() {
            let now = Instant::now();
            for job in self.cancelled {
                // Nobody is left to count it: the caller's future is gone.
                stats.record_failure(
                    now.saturating_duration_since(job.enqueued),
                    FailureReason::Canceled,
                );
                tracing::debug!(parent: &job.span, "request withdrawn by its caller before it ran");
            }
        }
        if self.wake_timekeeper {
            timekeeper.notify_one();
        }
    }
}

pub(super) fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn no_instance() -> SchedulerError {
    SchedulerError::Execute(ExecuteError("no model instance is running".into()))
}

/// Appends without allocating when `into` is still empty (the usual case: nothing, or one source).
fn absorb(into: &mut Vec<Job>, more: Vec<Job>) {
    if into.is_empty() {
        *into = more;
    } else {
        into.extend(more);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yields(core: &mut Core, n: usize) -> Vec<bool> {
        (0..n).map(|_| core.gathers_by_yielding()).collect()
    }

    #[test]
    fn gatherings_yield_until_two_in_a_row_find_nobody_then_only_probe() {
        let mut core = Core::new(PolicyConfig::unbatched(8));
        // One gathering that found company, then one that did not: still yielding.
        assert!(core.gathers_by_yielding());
        core.observe_gathering(3);
        assert!(core.gathers_by_yielding());
        core.observe_gathering(1);
        assert!(core.gathers_by_yielding());
        // The second miss in a row: from now on only every fourth gathering yields.
        core.observe_gathering(1);
        assert_eq!(
            yields(&mut core, 8),
            [false, false, false, true, false, false, false, true]
        );
    }

    #[test]
    fn a_probe_that_finds_company_makes_every_gathering_yield_again() {
        let mut core = Core::new(PolicyConfig::unbatched(8));
        core.observe_gathering(1);
        core.observe_gathering(1);
        assert_eq!(yields(&mut core, 4), [false, false, false, true]);
        core.observe_gathering(5);
        assert_eq!(yields(&mut core, 3), [true, true, true]);
    }
}
