//! The batch-forming policy: a plain struct with plain methods, no channels, no threads, no clock
//! of its own (every method takes `now`), so it is unit-tested with tokio's paused clock.
//!
//! It follows Triton's dynamic batcher:
//! - Requests wait in one FIFO queue per priority level; level 1 is served before level 2, and so on.
//!   A model without `priority_levels` has one level (0).
//! - A batch is filled in queue order (levels in order, each level's requests in arrival order,
//!   requests delayed by a DELAY timeout after the others of their level). Batch size counts rows.
//!   Filling stops at the first request that would pass `max_batch_rows`, or whose non-batch shapes
//!   differ from the batch's first request; such a batch cannot grow and is dispatched at once.
//! - If some `preferred_batch_sizes` entry is formed, the largest one formed is dispatched at once.
//!   A batch that cannot reach a preferred size without passing the largest one is dispatched at once
//!   at the size it has. Otherwise the batch waits until `max_queue_delay` has passed since its oldest
//!   request arrived, then everything that fits is dispatched. Without preferred sizes the largest
//!   preferred size is `max_batch_rows` (as Triton normalizes the config).
//! - Each level has a queue policy: a size limit (a full level refuses at once), a default timeout,
//!   whether a request may shorten it, and what an expired request suffers: REJECT (removed, answered
//!   "Request timeout expired") or DELAY (moved behind the level's other requests, no longer timed).
//!
//! With `strategy: Adaptive` only the last rule changes: the window becomes a cap, and a batch that
//! Triton would hold is dispatched as soon as waiting is not expected to pay (see `adaptive.rs`).
use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

use super::adaptive::Adaptive;
pub use super::adaptive::BatchingStrategy;

/// What the policy needs to know about a queued payload.
pub trait Batchable {
    /// Rows this request adds to a batch (its dim 0; 1 for models without a batch dimension).
    fn rows(&self) -> usize;
    /// Whether `self` may share a batch with `other`: same inputs, datatypes and non-batch dims.
    fn same_shape(&self, other: &Self) -> bool;
    /// Whether the caller has gone; such a request is dropped instead of run.
    fn is_cancelled(&self) -> bool {
        false
    }
}

/// What happens to a request whose queue timeout expires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TimeoutAction {
    /// Remove it and answer "Request timeout expired".
    #[default]
    Reject,
    /// Keep it, behind every request of its level that has not timed out.
    Delay,
}

/// Queue policy of one priority level (Triton's ModelQueuePolicy, limits already resolved).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct QueuePolicy {
    /// Most requests this level may hold; None leaves only the model-wide limit.
    pub max_queue_size: Option<usize>,
    /// Timeout of every request of this level; None means requests never time out.
    pub default_timeout: Option<Duration>,
    /// Whether a request may ask for a shorter timeout than the default.
    pub allow_timeout_override: bool,
    pub timeout_action: TimeoutAction,
}

impl QueuePolicy {
    /// The timeout a request gets. As in Triton, a request may only shorten a configured timeout:
    /// with no default timeout, a request's own timeout is ignored.
    pub fn effective_timeout(&self, requested: Option<Duration>) -> Option<Duration> {
        match (self.default_timeout, requested) {
            (Some(default), Some(asked))
                if self.allow_timeout_override && !asked.is_zero() && asked < default =>
            {
                Some(asked)
            }
            (default, _) => default,
        }
    }
}

/// Everything that shapes batches and queues for one model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyConfig {
    /// Most rows in one execution (at least 1).
    pub max_batch_rows: usize,
    /// Preferred batch sizes, ascending, each within 1..=max_batch_rows; empty means max_batch_rows.
    pub preferred_batch_sizes: Vec<usize>,
    /// How long a batch may wait for more requests after its oldest request arrived.
    pub max_queue_delay: Duration,
    /// Number of priority levels (1..=priority_levels); 0 means a single level 0.
    pub priority_levels: u32,
    /// Level of requests that give no priority, or one outside 1..=priority_levels.
    pub default_priority_level: u32,
    /// Policy of every level not in `level_policies`.
    pub default_queue_policy: QueuePolicy,
    pub level_policies: BTreeMap<u32, QueuePolicy>,
    /// Most requests queued for the model across all levels: memory stays bounded even when no
    /// level sets `max_queue_size` (Triton's "no limit").
    pub max_total_queue: usize,
    /// How the delay window is used (config parameter `batching_strategy`).
    pub strategy: BatchingStrategy,
}

impl PolicyConfig {
    /// A model without dynamic batching: one FIFO level, every request executed on its own.
    pub fn unbatched(max_total_queue: usize) -> Self {
        Self {
            max_batch_rows: 1,
            preferred_batch_sizes: Vec::new(),
            max_queue_delay: Duration::ZERO,
            priority_levels: 0,
            default_priority_level: 0,
            default_queue_policy: QueuePolicy::default(),
            level_policies: BTreeMap::new(),
            max_total_queue: max_total_queue.max(1),
            strategy: BatchingStrategy::Triton,
        }
    }

    /// The level a request with `priority` joins (Triton: 0 or out of range means the default).
    pub fn level_for(&self, priority: u32) -> u32 {
        if priority == 0 || priority > self.priority_levels {
            self.default_priority_level
        } else {
            priority
        }
    }

    pub fn queue_policy(&self, level: u32) -> &QueuePolicy {
        self.level_policies
            .get(&level)
            .unwrap_or(&self.default_queue_policy)
    }

    fn largest_preferred(&self) -> usize {
        self.preferred_batch_sizes
            .iter()
            .copied()
            .max()
            .unwrap_or(self.max_batch_rows)
    }

    fn is_preferred(&self, rows: usize) -> bool {
        if self.preferred_batch_sizes.is_empty() {
            rows == self.max_batch_rows
        } else {
            self.preferred_batch_sizes.contains(&rows)
        }
    }
}

/// The policy's answer to "an instance is free: what should it run?".
#[derive(Debug, PartialEq, Eq)]
pub enum Next<T> {
    /// Run these requests as one batch, in this order.
    Dispatch(Vec<T>),
    /// Nothing to run before this instant (the batch's delay window ends, or a request times out),
    /// unless more requests arrive.
    WaitUntil(Instant),
    /// The queue is empty.
    Idle,
}

/// Why the policy formed the batch it last dispatched: a bounded, stable label for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DispatchReason {
    /// The batch reached the largest size it can have (max or preferred size, or nothing fits).
    #[default]
    Full,
    /// The delay window of its oldest request ran out.
    WindowExpired,
    /// No delay window is configured (or the model does not batch).
    NoDelay,
    /// Draining at shutdown: dispatched without waiting.
    Draining,
    /// The adaptive strategy judged that waiting would cost more than it could gain.
    AdaptiveEarly,
    /// The adaptive strategy waited for more requests, then dispatched before the window's end:
    /// what arrived made waiting stop paying, or the arrivals stopped.
    AdaptiveWaited,
}

impl DispatchReason {
    pub fn label(self) -> &'static str {
        match self {
            DispatchReason::Full => "full",
            DispatchReason::WindowExpired => "window_expired",
            DispatchReason::NoDelay => "no_delay",
            DispatchReason::Draining => "draining",
            DispatchReason::AdaptiveEarly => "adaptive_early",
            DispatchReason::AdaptiveWaited => "adaptive_waited",
        }
    }
}

/// The queue was full; the request comes back to be answered.
#[derive(Debug, PartialEq, Eq)]
pub struct QueueFull<T>(pub T);

#[derive(Debug)]
struct Entry<T> {
    item: T,
    seq: u64,
    enqueued: Instant,
    /// When a timed request expires; None once delayed or when it has no timeout.
    deadline: Option<Instant>,
}

#[derive(Debug)]
struct Level<T> {
    queue: VecDeque<Entry<T>>,
    /// Requests whose timeout expired under DELAY: served after `queue`.
    delayed: VecDeque<Entry<T>>,
}

impl<T> Level<T> {
    fn new() -> Self {
        Self {
            queue: VecDeque::new(),
            delayed: VecDeque::new(),
        }
    }

    fn len(&self) -> usize {
        self.queue.len() + self.delayed.len()
    }

    fn get(&self, index: usize) -> Option<&Entry<T>> {
        let main = self.queue.len();
        if index < main {
            self.queue.get(index)
        } else {
            self.delayed.get(index - main)
        }
    }

    fn remove(&mut self, index: usize) -> Option<Entry<T>> {
        let main = self.queue.len();
        if index < main {
            self.queue.remove(index)
        } else {
            self.delayed.remove(index - main)
        }
    }

    fn pop_front(&mut self) -> Option<Entry<T>> {
        self.queue.pop_front().or_else(|| self.delayed.pop_front())
    }
}

/// The queues of one model and the rules that turn them into batches.
#[derive(Debug)]
pub struct BatchPolicy<T> {
    config: PolicyConfig,
    levels: BTreeMap<u32, Level<T>>,
    /// Deadlines of every timed request still in a main queue: (deadline, seq, level).
    deadlines: BTreeSet<(Instant, u64, u32)>,
    len: usize,
    next_seq: u64,
    /// Requests found cancelled while forming batches, waiting for `take_cancelled`.
    cancelled: Vec<T>,
    /// Why the last `Dispatch` was formed.
    last_reason: DispatchReason,
    /// What the adaptive strategy learns; None under Triton's strategy, which learns nothing.
    adaptive: Option<Adaptive>,
}

impl<T: Batchable> BatchPolicy<T> {
    pub fn new(config: PolicyConfig) -> Self {
        let adaptive = (config.strategy == BatchingStrategy::Adaptive).then(Adaptive::default);
        Self {
            config,
            levels: BTreeMap::new(),
            deadlines: BTreeSet::new(),
            len: 0,
            next_seq: 0,
            cancelled: Vec::new(),
            last_reason: DispatchReason::default(),
            adaptive,
        }
    }

    pub fn config(&self) -> &PolicyConfig {
        &self.config
    }

    /// Requests queued, all levels together.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Requests queued at one level.
    pub fn level_len(&self, level: u32) -> usize {
        self.levels.get(&level).map_or(0, Level::len)
    }

    /// Queues a request that arrived at `now` with the client's `priority` (0 = default) and
    /// optional timeout. A full level, or a full model, hands the request back.
    pub fn push(
        &mut self,
        item: T,
        priority: u32,
        timeout: Option<Duration>,
        now: Instant,
    ) -> Result<(), QueueFull<T>> {
        let level = self.config.level_for(priority);
        let policy = self.config.queue_policy(level);
        let level_full = policy
            .max_queue_size
            .is_some_and(|max| self.level_len(level) >= max);
        if level_full || self.len >= self.config.max_total_queue {
            return Err(QueueFull(item));
        }
        let deadline = policy
            .effective_timeout(timeout)
            .map(|t| deadline_after(now, t));
        let seq = self.next_seq;
        self.next_seq += 1;
        if let Some(adaptive) = &mut self.adaptive {
            adaptive.on_arrival(now, item.rows().max(1), self.len);
        }
        if let Some(d) = deadline {
            self.deadlines.insert((d, seq, level));
        }
        self.levels
            .entry(level)
            .or_insert_with(Level::new)
            .queue
            .push_back(Entry {
                item,
                seq,
                enqueued: now,
                deadline,
            });
        self.len += 1;
        Ok(())
    }

    /// The earliest instant at which a queued request times out.
    pub fn next_timeout(&self) -> Option<Instant> {
        self.deadlines.first().map(|(d, _, _)| *d)
    }

    /// Applies the queue policies to every request whose timeout has expired by `now`: REJECT ones
    /// are removed and returned (answer them "Request timeout expired"); DELAY ones move behind the
    /// other requests of their level and are never timed out again.
    pub fn expire(&mut self, now: Instant) -> Vec<T> {
        let mut expired: BTreeMap<u32, HashSet<u64>> = BTreeMap::new();
        while let Some(&(deadline, seq, level)) = self.deadlines.first() {
            if deadline > now {
                break;
            }
            self.deadlines.pop_first();
            expired.entry(level).or_default().insert(seq);
        }
        let mut rejected = Vec::new();
        for (level_no, seqs) in expired {
            let action = self.config.queue_policy(level_no).timeout_action;
            let Some(level) = self.levels.get_mut(&level_no) else {
                continue;
            };
            let queue = std::mem::take(&mut level.queue);
            for mut entry in queue {
                if !seqs.contains(&entry.seq) {
                    level.queue.push_back(entry);
                    continue;
                }
                match action {
                    TimeoutAction::Reject => rejected.push(entry.item),
                    TimeoutAction::Delay => {
                        entry.deadline = None;
                        level.delayed.push_back(entry);
                    }
                }
            }
        }
        self.len -= rejected.len();
        self.drop_empty_levels();
        rejected
    }

    /// Forms the batch an idle instance should run now, following Triton's rules (see the module
    /// docs). Call `expire(now)` first so that expired requests do not join the batch. Cancelled
    /// requests met on the way are removed; collect them with `take_cancelled`.
    pub fn next_batch(&mut self, now: Instant) -> Next<T> {
        self.form_batch(now, false)
    }

    /// Like `next_batch`, but does not wait for the delay window: used while draining at shutdown.
    pub fn next_batch_without_delay(&mut self, now: Instant) -> Next<T> {
        self.form_batch(now, true)
    }

    /// Requests removed because their caller had gone, since the last call.
    pub fn take_cancelled(&mut self) -> Vec<T> {
        std::mem::take(&mut self.cancelled)
    }

    /// Removes every queued request whose caller has gone, wherever it waits (forming a batch only
    /// looks at the head of the queue). Returns them.
    pub fn sweep_cancelled(&mut self) -> Vec<T> {
        let mut removed = std::mem::take(&mut self.cancelled);
        let mut timed_out_of_queue: HashSet<u64> = HashSet::new();
        let before = removed.len();
        for level in self.levels.values_mut() {
            for queue in [&mut level.queue, &mut level.delayed] {
                for entry in std::mem::take(queue) {
                    if entry.item.is_cancelled() {
                        if entry.deadline.is_some() {
                            timed_out_of_queue.insert(entry.seq);
                        }
                        removed.push(entry.item);
                    } else {
                        queue.push_back(entry);
                    }
                }
            }
        }
        if !timed_out_of_queue.is_empty() {
            self.deadlines
                .retain(|(_, seq, _)| !timed_out_of_queue.contains(seq));
        }
        self.len -= removed.len() - before;
        self.drop_empty_levels();
        removed
    }

    /// Why the last `Dispatch` this policy answered was formed.
    pub fn last_dispatch_reason(&self) -> DispatchReason {
        self.last_reason
    }

    /// Tells the policy what one execution cost: `rows` rows took `took` on one instance. The
    /// adaptive strategy learns the batch cost from this; Triton's strategy ignores it.
    pub fn observe_execution(&mut self, rows: usize, took: Duration) {
        if let Some(adaptive) = &mut self.adaptive {
            adaptive.observe_execution(rows, took);
        }
    }

    /// Empties every queue, in the order the requests would have run.
    pub fn drain(&mut self) -> Vec<T> {
        let mut out = std::mem::take(&mut self.cancelled);
        for (_, mut level) in std::mem::take(&mut self.levels) {
            while let Some(entry) = level.pop_front() {
                out.push(entry.item);
            }
        }
        self.deadlines.clear();
        self.len = 0;
        out
    }

    fn form_batch(&mut self, now: Instant, ignore_delay: bool) -> Next<T> {
        let scan = self.scan();
        if scan.count == 0 {
            // Nothing but cancelled requests was queued, and the scan removed them.
            return Next::Idle;
        }
        let delay = self.config.max_queue_delay;
        let waited = now.saturating_duration_since(scan.oldest);
        let delay_exceeded = ignore_delay || (!delay.is_zero() && waited >= delay);
        let full = scan.cannot_grow || scan.rows >= self.config.largest_preferred();

        let (take, reason) = match scan.best_preferred {
            Some(count) if !delay_exceeded => (count, self.reason(ignore_delay, true, false)),
            _ if full || delay_exceeded || delay.is_zero() => {
                (scan.count, self.reason(ignore_delay, full, delay_exceeded))
            }
            _ => {
                let window_end = deadline_after(scan.oldest, delay);
                let wake = match self.next_timeout() {
                    Some(t) => t.min(window_end),
                    None => window_end,
                };
                let Some(adaptive) = &mut self.adaptive else {
                    return Next::WaitUntil(wake);
                };
                let waited = adaptive.waits.waiting();
                match adaptive.wait_until(scan.rows, now) {
                    Some(give_up) => return Next::WaitUntil(wake.min(give_up)),
                    None if waited => (scan.count, DispatchReason::AdaptiveWaited),
                    None => (scan.count, DispatchReason::AdaptiveEarly),
                }
            }
        };
        let batch = self.pop_front(take);
        self.last_reason = reason;
        if let Some(adaptive) = &mut self.adaptive {
            adaptive.on_dispatch(now, self.len);
        }
        Next::Dispatch(batch)
    }

    /// Why a batch that did not wait (any longer) goes now.
    fn reason(&self, draining: bool, full: bool, window_expired: bool) -> DispatchReason {
        if draining {
            DispatchReason::Draining
        } else if self.config.max_batch_rows <= 1 {
            DispatchReason::NoDelay
        } else if full {
            DispatchReason::Full
        } else if window_expired {
            DispatchReason::WindowExpired
        } else {
            DispatchReason::NoDelay
        }
    }

    /// Walks the queue from its head as a batch would be filled, removing cancelled requests met.
    fn scan(&mut self) -> Scan {
        let max_rows = self.config.max_batch_rows;
        let largest_preferred = self.config.largest_preferred();
        let mut scan = Scan {
            count: 0,
            rows: 0,
            oldest: Instant::now(),
            best_preferred: None,
            cannot_grow: false,
        };
        let mut first: Option<(u32, usize)> = None;
        let level_keys: Vec<u32> = self.levels.keys().copied().collect();
        'levels: for level_no in level_keys {
            let mut index = 0;
            while let Some(entry) = self.levels.get(&level_no).and_then(|l| l.get(index)) {
                if entry.item.is_cancelled() {
                    self.remove_at(level_no, index);
                    continue;
                }
                let rows = entry.item.rows().max(1);
                if let Some((first_level, first_index)) = first {
                    if scan.rows + rows > largest_preferred && scan.best_preferred.is_none() {
                        scan.best_preferred = Some(scan.count);
                    }
                    if scan.rows + rows > max_rows {
                        scan.cannot_grow = true;
                        break 'levels;
                    }
                    let head = self
                        .levels
                        .get(&first_level)
                        .and_then(|l| l.get(first_index));
                    if head.is_some_and(|h| !entry.item.same_shape(&h.item)) {
                        scan.cannot_grow = true;
                        break 'levels;
                    }
                } else {
                    first = Some((level_no, index));
                    scan.oldest = entry.enqueued;
                }
                scan.oldest = scan.oldest.min(entry.enqueued);
                scan.rows += rows;
                scan.count += 1;
                if self.config.is_preferred(scan.rows) {
                    scan.best_preferred = Some(scan.count);
                }
                index += 1;
            }
        }
        scan
    }

    fn remove_at(&mut self, level_no: u32, index: usize) {
        let Some(level) = self.levels.get_mut(&level_no) else {
            return;
        };
        if let Some(entry) = level.remove(index) {
            if let Some(d) = entry.deadline {
                self.deadlines.remove(&(d, entry.seq, level_no));
            }
            self.len -= 1;
            self.cancelled.push(entry.item);
        }
    }

    /// Removes the first `count` requests in queue order. `scan` already removed the cancelled ones
    /// among them, so these are exactly the requests it counted.
    fn pop_front(&mut self, count: usize) -> Vec<T> {
        let mut batch = Vec::with_capacity(count);
        while batch.len() < count {
            let Some(mut slot) = self.levels.first_entry() else {
                break;
            };
            let level_no = *slot.key();
            match slot.get_mut().pop_front() {
                Some(entry) => {
                    if let Some(d) = entry.deadline {
                        self.deadlines.remove(&(d, entry.seq, level_no));
                    }
                    batch.push(entry.item);
                }
                None => {
                    slot.remove();
                }
            }
        }
        self.len -= batch.len();
        self.drop_empty_levels();
        batch
    }

    fn drop_empty_levels(&mut self) {
        self.levels.retain(|_, level| level.len() > 0);
    }
}

/// What walking the queue found.
struct Scan {
    /// Requests that fit in the batch.
    count: usize,
    rows: usize,
    /// Arrival of the oldest request among them.
    oldest: Instant,
    /// Requests in the largest preferred batch formed, or in the batch just below the point where
    /// it would pass the largest preferred size.
    best_preferred: Option<usize>,
    /// The next request cannot join (too many rows, other shapes): the batch is as big as it gets.
    cannot_grow: bool,
}

/// `base + wait`, checked: a wait too long for the clock becomes a deadline a year away, which
/// every timer can arm (config bounds keep real waits far below it). Never panics.
pub(crate) fn deadline_after(base: Instant, wait: Duration) -> Instant {
    const FAR: Duration = Duration::from_secs(365 * 24 * 3600);
    base.checked_add(wait.min(FAR))
        .or_else(|| base.checked_add(Duration::from_secs(1)))
        .unwrap_or(base)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Req {
        id: u32,
        rows: usize,
        shape: u32,
        cancelled: bool,
    }

    impl Batchable for Req {
        fn rows(&self) -> usize {
            self.rows
        }
        fn same_shape(&self, other: &Self) -> bool {
            self.shape == other.shape
        }
        fn is_cancelled(&self) -> bool {
            self.cancelled
        }
    }

    fn req(id: u32) -> Req {
        Req {
            id,
            rows: 1,
            shape: 0,
            cancelled: false,
        }
    }

    fn rows(id: u32, rows: usize) -> Req {
        Req { rows, ..req(id) }
    }

    fn config(max_batch_rows: usize, preferred: &[usize], delay_us: u64) -> PolicyConfig {
        PolicyConfig {
            max_batch_rows,
            preferred_batch_sizes: preferred.to_vec(),
            max_queue_delay: Duration::from_micros(delay_us),
            priority_levels: 0,
            default_priority_level: 0,
            default_queue_policy: QueuePolicy::default(),
            level_policies: BTreeMap::new(),
            max_total_queue: 1000,
            strategy: BatchingStrategy::Triton,
        }
    }

    fn ids(next: Next<Req>) -> Vec<u32> {
        match next {
            Next::Dispatch(batch) => batch.into_iter().map(|r| r.id).collect(),
            other => panic!("expected a batch, got {other:?}"),
        }
    }

    fn push_all(p: &mut BatchPolicy<Req>, reqs: impl IntoIterator<Item = Req>) {
        for r in reqs {
            p.push(r, 0, None, Instant::now()).unwrap();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn unbounded_delays_and_timeouts_never_overflow_the_clock() {
        // Config bounds refuse these at load; the arithmetic must still not panic or wrap.
        let mut c = config(8, &[4], u64::MAX);
        c.default_queue_policy.default_timeout = Some(Duration::MAX);
        let mut p = BatchPolicy::new(c);
        let start = Instant::now();
        push_all(&mut p, [req(1)]);
        let Next::WaitUntil(at) = p.next_batch(Instant::now()) else {
            panic!("a lone request waits for its window");
        };
        assert!(at > start, "the wake-up lies in the future");
        assert!(p.next_timeout().is_some_and(|t| t > start));
        // Draining ignores the window, so shutdown never waits for it.
        assert_eq!(ids(p.next_batch_without_delay(Instant::now())), vec![1]);
        assert_eq!(
            deadline_after(start, Duration::MAX),
            deadline_after(start, Duration::MAX)
        );
        assert!(
            deadline_after(start, Duration::from_micros(5)) == start + Duration::from_micros(5)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn no_delay_dispatches_whatever_is_queued() {
        let mut p = BatchPolicy::new(config(8, &[], 0));
        assert_eq!(p.next_batch(Instant::now()), Next::Idle);
        push_all(&mut p, [req(1), req(2), req(3)]);
        assert_eq!(ids(p.next_batch(Instant::now())), vec![1, 2, 3]);
        assert!(p.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn delay_window_waits_for_more_requests_then_sends_what_it_has() {
        let mut p = BatchPolicy::new(config(8, &[], 1000));
        let start = Instant::now();
        push_all(&mut p, [req(1)]);
        assert_eq!(
            p.next_batch(Instant::now()),
            Next::WaitUntil(start + Duration::from_micros(1000))
        );
        tokio::time::advance(Duration::from_micros(400)).await;
        push_all(&mut p, [req(2)]);
        // The window is measured from the oldest request, not the newest.
        assert_eq!(
            p.next_batch(Instant::now()),
            Next::WaitUntil(start + Duration::from_micros(1000))
        );
        tokio::time::advance(Duration::from_micros(600)).await;
        assert_eq!(ids(p.next_batch(Instant::now())), vec![1, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn reaching_max_batch_size_dispatches_at_once() {
        let mut p = BatchPolicy::new(config(4, &[], 1_000_000));
        push_all(&mut p, (1..=3).map(req));
        assert!(matches!(p.next_batch(Instant::now()), Next::WaitUntil(_)));
        push_all(&mut p, [req(4), req(5)]);
        assert_eq!(ids(p.next_batch(Instant::now())), vec![1, 2, 3, 4]);
        assert_eq!(p.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn batch_size_counts_rows_and_stops_at_first_request_that_would_pass_max() {
        let mut p = BatchPolicy::new(config(8, &[], 0));
        push_all(&mut p, [rows(1, 3), rows(2, 4), rows(3, 2), rows(4, 1)]);
        // 3 + 4 = 7; request 3 would make 9 > 8, so filling stops there even though 4 would fit.
        assert_eq!(ids(p.next_batch(Instant::now())), vec![1, 2]);
        assert_eq!(ids(p.next_batch(Instant::now())), vec![3, 4]);
    }

    #[tokio::test(start_paused = true)]
    async fn preferred_size_is_dispatched_before_the_window_ends() {
        let mut p = BatchPolicy::new(config(16, &[4, 8], 1_000_000));
        push_all(&mut p, (1..=3).map(req));
        assert!(matches!(p.next_batch(Instant::now()), Next::WaitUntil(_)));
        push_all(&mut p, (4..=7).map(req));
        // 7 queued: the largest preferred size that can be formed is 4.
        assert_eq!(ids(p.next_batch(Instant::now())), vec![1, 2, 3, 4]);
        assert!(matches!(p.next_batch(Instant::now()), Next::WaitUntil(_)));
        push_all(&mut p, (8..=12).map(req));
        // 8 queued now: preferred 8 formed.
        assert_eq!(
            ids(p.next_batch(Instant::now())),
            (5..=12).collect::<Vec<_>>()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn without_delay_the_largest_formed_preferred_size_goes_first() {
        let mut p = BatchPolicy::new(config(16, &[2, 4], 0));
        push_all(&mut p, (1..=5).map(req));
        assert_eq!(ids(p.next_batch(Instant::now())), vec![1, 2, 3, 4]);
        // One left: no preferred size, no delay: send it.
        assert_eq!(ids(p.next_batch(Instant::now())), vec![5]);
    }

    #[tokio::test(start_paused = true)]
    async fn batch_stops_below_the_largest_preferred_size_when_the_next_request_passes_it() {
        let mut p = BatchPolicy::new(config(16, &[4], 1_000_000));
        push_all(&mut p, [rows(1, 3), rows(2, 3)]);
        // 3 rows cannot reach 4 without passing it: send the 3 rows now, within the window.
        assert_eq!(ids(p.next_batch(Instant::now())), vec![1]);
    }

    #[tokio::test(start_paused = true)]
    async fn expired_window_sends_everything_that_fits_past_preferred_sizes() {
        let mut p = BatchPolicy::new(config(16, &[4], 1000));
        push_all(&mut p, [rows(1, 3), rows(2, 3), rows(3, 3)]);
        tokio::time::advance(Duration::from_micros(1000)).await;
        assert_eq!(ids(p.next_batch(Instant::now())), vec![1, 2, 3]);
    }

    #[tokio::test(start_paused = true)]
    async fn different_shapes_are_not_merged() {
        let mut p = BatchPolicy::new(config(8, &[], 1_000_000));
        let mut b = req(2);
        b.shape = 7;
        push_all(&mut p, [req(1), b, req(3)]);
        // The batch ends at the first mismatch and cannot grow, so it goes at once.
        assert_eq!(ids(p.next_batch(Instant::now())), vec![1]);
        assert_eq!(ids(p.next_batch(Instant::now())), vec![2]);
        assert!(matches!(p.next_batch(Instant::now()), Next::WaitUntil(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn unbatched_runs_one_request_per_execution_in_order() {
        let mut p = BatchPolicy::new(PolicyConfig::unbatched(10));
        push_all(&mut p, [rows(1, 3), req(2)]);
        assert_eq!(ids(p.next_batch(Instant::now())), vec![1]);
        assert_eq!(ids(p.next_batch(Instant::now())), vec![2]);
        assert_eq!(p.next_batch(Instant::now()), Next::Idle);
    }

    fn priority_config() -> PolicyConfig {
        let mut c = config(8, &[], 0);
        c.priority_levels = 3;
        c.default_priority_level = 2;
        c
    }

    #[tokio::test(start_paused = true)]
    async fn higher_priority_levels_are_served_first() {
        let mut p = BatchPolicy::new(priority_config());
        p.push(req(1), 3, None, Instant::now()).unwrap();
        p.push(req(2), 0, None, Instant::now()).unwrap(); // default level 2
        p.push(req(3), 1, None, Instant::now()).unwrap();
        p.push(req(4), 9, None, Instant::now()).unwrap(); // out of range: default level 2
        assert_eq!(p.level_len(2), 2);
        assert_eq!(ids(p.next_batch(Instant::now())), vec![3, 2, 4, 1]);
    }

    #[tokio::test(start_paused = true)]
    async fn priority_order_holds_when_batches_are_small() {
        let mut c = priority_config();
        c.max_batch_rows = 1;
        let mut p = BatchPolicy::new(c);
        p.push(req(1), 3, None, Instant::now()).unwrap();
        p.push(req(2), 2, None, Instant::now()).unwrap();
        p.push(req(3), 1, None, Instant::now()).unwrap();
        p.push(req(4), 1, None, Instant::now()).unwrap();
        let order: Vec<u32> = (0..4)
            .flat_map(|_| ids(p.next_batch(Instant::now())))
            .collect();
        assert_eq!(order, vec![3, 4, 2, 1]);
    }

    #[test]
    fn level_for_maps_zero_and_out_of_range_to_default() {
        let c = priority_config();
        assert_eq!(c.level_for(0), 2);
        assert_eq!(c.level_for(1), 1);
        assert_eq!(c.level_for(3), 3);
        assert_eq!(c.level_for(4), 2);
        let single = config(8, &[], 0);
        assert_eq!(single.level_for(5), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn full_level_refuses_but_other_levels_still_accept() {
        let mut c = priority_config();
        c.level_policies.insert(
            1,
            QueuePolicy {
                max_queue_size: Some(2),
                ..QueuePolicy::default()
            },
        );
        let mut p = BatchPolicy::new(c);
        let now = Instant::now();
        p.push(req(1), 1, None, now).unwrap();
        p.push(req(2), 1, None, now).unwrap();
        assert_eq!(p.push(req(3), 1, None, now), Err(QueueFull(req(3))));
        p.push(req(4), 2, None, now).unwrap();
        assert_eq!(p.len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn model_wide_limit_bounds_levels_without_their_own() {
        let mut c = config(8, &[], 0);
        c.max_total_queue = 2;
        let mut p = BatchPolicy::new(c);
        push_all(&mut p, [req(1), req(2)]);
        assert!(p.push(req(3), 0, None, Instant::now()).is_err());
        p.next_batch(Instant::now());
        p.push(req(3), 0, None, Instant::now()).unwrap();
    }

    fn timed(action: TimeoutAction, default_us: u64, allow_override: bool) -> PolicyConfig {
        let mut c = config(8, &[], 1_000_000);
        c.default_queue_policy = QueuePolicy {
            max_queue_size: None,
            default_timeout: Some(Duration::from_micros(default_us)),
            allow_timeout_override: allow_override,
            timeout_action: action,
        };
        c
    }

    #[tokio::test(start_paused = true)]
    async fn reject_timeout_removes_expired_requests() {
        let mut p = BatchPolicy::new(timed(TimeoutAction::Reject, 100, false));
        let start = Instant::now();
        push_all(&mut p, [req(1)]);
        tokio::time::advance(Duration::from_micros(50)).await;
        push_all(&mut p, [req(2)]);
        assert_eq!(p.next_timeout(), Some(start + Duration::from_micros(100)));
        // The wait is cut short by the first timeout, before the delay window ends.
        assert_eq!(
            p.next_batch(Instant::now()),
            Next::WaitUntil(start + Duration::from_micros(100))
        );
        tokio::time::advance(Duration::from_micros(50)).await;
        let rejected = p.expire(Instant::now());
        assert_eq!(rejected, vec![req(1)]);
        assert_eq!(p.len(), 1);
        assert_eq!(p.next_timeout(), Some(start + Duration::from_micros(150)));
    }

    #[tokio::test(start_paused = true)]
    async fn delay_timeout_moves_request_behind_the_others_of_its_level() {
        let mut c = timed(TimeoutAction::Delay, 100, false);
        c.max_batch_rows = 1;
        c.max_queue_delay = Duration::ZERO;
        let mut p = BatchPolicy::new(c);
        let start = Instant::now();
        push_all(&mut p, [req(1)]);
        tokio::time::advance(Duration::from_micros(80)).await;
        push_all(&mut p, [req(2), req(3)]);
        tokio::time::advance(Duration::from_micros(20)).await;
        assert!(p.expire(Instant::now()).is_empty(), "DELAY never rejects");
        assert_eq!(p.len(), 3);
        // Request 1 timed out: it now runs after 2 and 3, and never times out again.
        assert_eq!(p.next_timeout(), Some(start + Duration::from_micros(180)));
        let order: Vec<u32> = (0..3)
            .flat_map(|_| ids(p.next_batch(Instant::now())))
            .collect();
        assert_eq!(order, vec![2, 3, 1]);
        assert_eq!(p.next_timeout(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn delayed_requests_still_batch_with_the_rest() {
        let mut p = BatchPolicy::new(timed(TimeoutAction::Delay, 100, false));
        push_all(&mut p, [req(1)]);
        tokio::time::advance(Duration::from_micros(100)).await;
        p.expire(Instant::now());
        push_all(&mut p, [req(2)]);
        // With a long delay window the batch waits; it holds 2 then the delayed 1.
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(ids(p.next_batch(Instant::now())), vec![2, 1]);
    }

    #[test]
    fn timeout_override_may_only_shorten() {
        let policy = |default_us: Option<u64>, allow| QueuePolicy {
            max_queue_size: None,
            default_timeout: default_us.map(Duration::from_micros),
            allow_timeout_override: allow,
            timeout_action: TimeoutAction::Reject,
        };
        let us = Duration::from_micros;
        assert_eq!(
            policy(Some(100), true).effective_timeout(Some(us(40))),
            Some(us(40))
        );
        assert_eq!(
            policy(Some(100), true).effective_timeout(Some(us(400))),
            Some(us(100))
        );
        assert_eq!(
            policy(Some(100), true).effective_timeout(Some(us(0))),
            Some(us(100))
        );
        assert_eq!(
            policy(Some(100), false).effective_timeout(Some(us(40))),
            Some(us(100))
        );
        assert_eq!(
            policy(Some(100), true).effective_timeout(None),
            Some(us(100))
        );
        // No default timeout: nothing to shorten (Triton ignores the request's timeout too).
        assert_eq!(policy(None, true).effective_timeout(Some(us(40))), None);
    }

    #[tokio::test(start_paused = true)]
    async fn override_applies_per_request() {
        let mut p = BatchPolicy::new(timed(TimeoutAction::Reject, 1000, true));
        let now = Instant::now();
        p.push(req(1), 0, Some(Duration::from_micros(10)), now)
            .unwrap();
        p.push(req(2), 0, Some(Duration::from_micros(5000)), now)
            .unwrap();
        tokio::time::advance(Duration::from_micros(10)).await;
        assert_eq!(p.expire(Instant::now()), vec![req(1)]);
        tokio::time::advance(Duration::from_micros(990)).await;
        assert_eq!(p.expire(Instant::now()), vec![req(2)]);
    }

    #[tokio::test(start_paused = true)]
    async fn per_level_policies_differ() {
        let mut c = priority_config();
        c.level_policies.insert(
            1,
            QueuePolicy {
                default_timeout: Some(Duration::from_micros(10)),
                ..QueuePolicy::default()
            },
        );
        let mut p = BatchPolicy::new(c);
        let now = Instant::now();
        p.push(req(1), 1, None, now).unwrap();
        p.push(req(2), 2, None, now).unwrap();
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(p.expire(Instant::now()), vec![req(1)]);
        assert_eq!(p.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn cancelled_requests_are_dropped_before_they_run() {
        let mut p = BatchPolicy::new(config(8, &[], 0));
        let mut gone = req(2);
        gone.cancelled = true;
        push_all(&mut p, [req(1), gone.clone(), req(3)]);
        assert_eq!(ids(p.next_batch(Instant::now())), vec![1, 3]);
        assert_eq!(p.take_cancelled(), vec![gone]);
        assert!(p.take_cancelled().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn sweep_removes_cancelled_requests_anywhere_in_the_queue() {
        let mut p = BatchPolicy::new(timed(TimeoutAction::Reject, 100, false));
        let mut gone = req(2);
        gone.cancelled = true;
        push_all(&mut p, [req(1), gone.clone(), req(3)]);
        assert_eq!(p.sweep_cancelled(), vec![gone]);
        assert_eq!(p.len(), 2);
        tokio::time::advance(Duration::from_micros(100)).await;
        assert_eq!(p.expire(Instant::now()), vec![req(1), req(3)]);
        assert_eq!(p.next_timeout(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn only_cancelled_requests_leave_an_idle_policy() {
        let mut p = BatchPolicy::new(config(8, &[], 1000));
        let mut gone = req(1);
        gone.cancelled = true;
        push_all(&mut p, [gone]);
        assert_eq!(p.next_batch(Instant::now()), Next::Idle);
        assert!(p.is_empty());
        assert_eq!(p.take_cancelled().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn draining_ignores_the_delay_window() {
        let mut p = BatchPolicy::new(config(8, &[], 1_000_000));
        push_all(&mut p, [req(1), req(2)]);
        assert!(matches!(p.next_batch(Instant::now()), Next::WaitUntil(_)));
        assert_eq!(ids(p.next_batch_without_delay(Instant::now())), vec![1, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn batches_span_priority_levels_in_order() {
        let mut p = BatchPolicy::new(priority_config());
        p.push(rows(1, 4), 2, None, Instant::now()).unwrap();
        p.push(rows(2, 3), 1, None, Instant::now()).unwrap();
        p.push(rows(3, 4), 3, None, Instant::now()).unwrap();
        assert_eq!(ids(p.next_batch(Instant::now())), vec![2, 1]);
        assert_eq!(ids(p.next_batch(Instant::now())), vec![3]);
    }

    // --- Dispatch reasons (both strategies) and the adaptive strategy's decisions. ---

    const US: Duration = Duration::from_micros(1);

    fn reason_of(p: &BatchPolicy<Req>, next: Next<Req>) -> (Vec<u32>, DispatchReason) {
        (ids(next), p.last_dispatch_reason())
    }

    #[test]
    fn triton_records_why_each_batch_went() {
        let t0 = Instant::now();
        let mut p = BatchPolicy::new(config(4, &[], 500));
        p.push(req(1), 0, None, t0).unwrap();
        assert_eq!(p.next_batch(t0), Next::WaitUntil(t0 + US * 500));
        let next = p.next_batch(t0 + US * 500);
        assert_eq!(
            reason_of(&p, next),
            (vec![1], DispatchReason::WindowExpired)
        );
        for id in 2..=5 {
            p.push(req(id), 0, None, t0).unwrap();
        }
        let next = p.next_batch(t0);
        assert_eq!(
            reason_of(&p, next),
            (vec![2, 3, 4, 5], DispatchReason::Full)
        );
        p.push(req(6), 0, None, t0).unwrap();
        let next = p.next_batch_without_delay(t0);
        assert_eq!(reason_of(&p, next), (vec![6], DispatchReason::Draining));

        let mut no_window = BatchPolicy::new(config(4, &[], 0));
        no_window.push(req(7), 0, None, t0).unwrap();
        let next = no_window.next_batch(t0);
        assert_eq!(
            reason_of(&no_window, next),
            (vec![7], DispatchReason::NoDelay)
        );
        let mut unbatched = BatchPolicy::new(PolicyConfig::unbatched(4));
        unbatched.push(req(8), 0, None, t0).unwrap();
        let next = unbatched.next_batch(t0);
        assert_eq!(
            reason_of(&unbatched, next),
            (vec![8], DispatchReason::NoDelay)
        );
    }

    #[test]
    fn every_reason_label_is_one_the_metrics_know() {
        use crate::telemetry::stats::BATCH_FORMED_REASONS;
        for reason in [
            DispatchReason::Full,
            DispatchReason::WindowExpired,
            DispatchReason::NoDelay,
            DispatchReason::Draining,
            DispatchReason::AdaptiveEarly,
            DispatchReason::AdaptiveWaited,
        ] {
            assert!(BATCH_FORMED_REASONS.contains(&reason.label()), "{reason:?}");
        }
    }

    #[test]
    fn triton_ignores_what_executions_cost() {
        // Whatever is learned, a lone request under Triton's strategy waits for its whole window.
        let t0 = Instant::now();
        let mut p = BatchPolicy::new(config(64, &[], 500));
        teach_cost(&mut p, 400, 5);
        teach_burst(&mut p, t0, 16, US * 10, 1000);
        let t1 = t0 + Duration::from_secs(1);
        p.push(req(1), 0, None, t1).unwrap();
        assert_eq!(p.next_batch(t1), Next::WaitUntil(t1 + US * 500));
        assert_eq!(p.next_batch(t1 + US * 499), Next::WaitUntil(t1 + US * 500));
    }

    fn adaptive(max_batch_rows: usize, preferred: &[usize], delay_us: u64) -> PolicyConfig {
        PolicyConfig {
            strategy: BatchingStrategy::Adaptive,
            ..config(max_batch_rows, preferred, delay_us)
        }
    }

    /// Executions of 1..=8 rows costing `fixed_us + per_row_us · rows`.
    fn teach_cost(p: &mut BatchPolicy<Req>, fixed_us: u32, per_row_us: u32) {
        for i in 0..32u32 {
            let rows = 1 + i % 8;
            p.observe_execution(rows as usize, US * (fixed_us + per_row_us * rows));
        }
    }

    /// `count` requests arriving `every` apart while the instance is busy (no batch is asked for),
    /// then one batch of all of them. Ids start at `first_id`.
    fn teach_burst(
        p: &mut BatchPolicy<Req>,
        t0: Instant,
        count: u32,
        every: Duration,
        first_id: u32,
    ) {
        for i in 0..count {
            p.push(req(first_id + i), 0, None, t0 + every * i).unwrap();
        }
        let last = t0 + every * (count - 1);
        assert!(matches!(
            p.next_batch_without_delay(last),
            Next::Dispatch(_)
        ));
        assert!(p.is_empty());
    }

    #[test]
    fn adaptive_dispatches_a_lone_request_at_once() {
        let t0 = Instant::now();
        let mut p = BatchPolicy::new(adaptive(64, &[], 500));
        p.push(req(1), 0, None, t0).unwrap();
        let next = p.next_batch(t0);
        assert_eq!(
            reason_of(&p, next),
            (vec![1], DispatchReason::AdaptiveEarly)
        );
        // A costly fixed part alone is no reason to wait: with one request in flight nothing
        // arrives while it waits.
        teach_cost(&mut p, 400, 5);
        let mut t = t0;
        for id in 2..50 {
            t += US * 300;
            p.push(req(id), 0, None, t).unwrap();
            let next = p.next_batch(t + US * 3);
            assert_eq!(
                reason_of(&p, next),
                (vec![id], DispatchReason::AdaptiveEarly)
            );
        }
    }

    #[test]
    fn adaptive_waits_for_bursty_arrivals_up_to_the_cap() {
        let t0 = Instant::now();
        let mut p = BatchPolicy::new(adaptive(64, &[], 500));
        teach_cost(&mut p, 400, 5);
        // A row every 10 µs while requests waited: 40 rows per fixed cost.
        teach_burst(&mut p, t0, 16, US * 10, 1000);
        let t1 = t0 + Duration::from_secs(1);
        let window_end = t1 + US * 500;
        // A row every 15 µs keeps the wait alive (given up 20 µs after the last arrival), and 34
        // rows stay below what one fixed cost brings, so only the window ends it.
        for k in 0..34u32 {
            let t = t1 + US * 15 * k;
            p.push(req(k), 0, None, t).unwrap();
            match p.next_batch(t) {
                Next::WaitUntil(at) => {
                    assert!(at <= window_end, "never beyond the cap");
                    assert_eq!(at, (t + US * 20).min(window_end));
                }
                other => panic!("expected a wait at {k}, got {other:?}"),
            }
        }
        let next = p.next_batch(window_end);
        let (batch, reason) = reason_of(&p, next);
        assert_eq!(batch, (0..34).collect::<Vec<_>>());
        assert_eq!(reason, DispatchReason::WindowExpired);
    }

    #[test]
    fn adaptive_gives_up_when_arrivals_stop() {
        let t0 = Instant::now();
        let mut p = BatchPolicy::new(adaptive(64, &[], 500));
        teach_cost(&mut p, 400, 5);
        teach_burst(&mut p, t0, 16, US * 10, 1000);
        let t1 = t0 + Duration::from_secs(1);
        p.push(req(1), 0, None, t1).unwrap();
        p.push(req(2), 0, None, t1 + US * 5).unwrap();
        assert_eq!(p.next_batch(t1 + US * 5), Next::WaitUntil(t1 + US * 25));
        let next = p.next_batch(t1 + US * 25);
        assert_eq!(
            reason_of(&p, next),
            (vec![1, 2], DispatchReason::AdaptiveWaited),
            "a batch dispatched after a wait says so"
        );
        // A batch that goes at once, with no wait before it, is told apart: 41 rows are more
        // than one fixed cost brings.
        p.push(rows(3, 41), 0, None, t1 + US * 2000).unwrap();
        let next = p.next_batch(t1 + US * 2000);
        assert_eq!(
            reason_of(&p, next),
            (vec![3], DispatchReason::AdaptiveEarly)
        );
    }

    #[test]
    fn adaptive_dispatches_when_cost_grows_with_rows() {
        // A CPU MLP: the fixed part is small, so waiting for rows never pays, however many arrive.
        let t0 = Instant::now();
        let mut p = BatchPolicy::new(adaptive(64, &[], 500));
        teach_cost(&mut p, 2, 50);
        teach_burst(&mut p, t0, 16, US * 10, 1000);
        let t1 = t0 + Duration::from_secs(1);
        p.push(req(1), 0, None, t1).unwrap();
        let next = p.next_batch(t1);
        assert_eq!(
            reason_of(&p, next),
            (vec![1], DispatchReason::AdaptiveEarly)
        );
    }

    #[test]
    fn adaptive_dispatches_when_enough_rows_are_queued() {
        let t0 = Instant::now();
        let mut p = BatchPolicy::new(adaptive(64, &[], 500));
        teach_cost(&mut p, 400, 5);
        teach_burst(&mut p, t0, 16, US * 10, 1000);
        let t1 = t0 + Duration::from_secs(1);
        // 41 rows at once: more than the 40 one fixed cost brings.
        p.push(rows(1, 41), 0, None, t1).unwrap();
        let next = p.next_batch(t1);
        assert_eq!(
            reason_of(&p, next),
            (vec![1], DispatchReason::AdaptiveEarly)
        );
    }

    #[test]
    fn adaptive_keeps_preferred_sizes_and_priorities() {
        let t0 = Instant::now();
        let mut c = adaptive(64, &[4], 500);
        c.priority_levels = 2;
        c.default_priority_level = 2;
        let mut p = BatchPolicy::new(c);
        teach_cost(&mut p, 400, 5);
        teach_burst(&mut p, t0, 16, US * 10, 1000);
        let t1 = t0 + Duration::from_secs(1);
        for (id, priority) in [(1, 2), (2, 2), (3, 1)] {
            p.push(req(id), priority, None, t1).unwrap();
            assert!(matches!(p.next_batch(t1), Next::WaitUntil(_)));
        }
        // A preferred size formed goes at once, higher priority first.
        p.push(req(4), 2, None, t1).unwrap();
        let next = p.next_batch(t1);
        assert_eq!(
            reason_of(&p, next),
            (vec![3, 1, 2, 4], DispatchReason::Full)
        );
    }

    #[test]
    fn adaptive_waits_never_pass_a_queue_timeout() {
        let t0 = Instant::now();
        let mut c = adaptive(64, &[], 500);
        c.default_queue_policy.default_timeout = Some(US * 100);
        let mut p = BatchPolicy::new(c);
        teach_cost(&mut p, 400, 5);
        teach_burst(&mut p, t0, 16, US * 10, 1000);
        let t1 = t0 + Duration::from_secs(1);
        // Arrivals every 15 µs keep the wait going; the first request's timeout ends it.
        for k in 0..7u32 {
            let t = t1 + US * 15 * k;
            p.push(req(k), 0, None, t).unwrap();
            assert!(p.expire(t).is_empty());
            match p.next_batch(t) {
                Next::WaitUntil(at) => assert_eq!(at, (t + US * 20).min(t1 + US * 100)),
                other => panic!("expected a wait, got {other:?}"),
            }
        }
        // As under Triton's strategy, the expired request is rejected, not run.
        assert_eq!(p.expire(t1 + US * 100), vec![req(0)]);
        assert_eq!(p.len(), 6);
    }

    #[test]
    fn adaptive_stops_waiting_when_its_waits_bring_nothing_but_probes_again() {
        // Bursts arrive while the instance is busy (so the general rate stays high), but a request
        // that finds the instance free never gets company: closed-loop clients are all queued or
        // in flight. Waiting is tried, found useless, and only retried now and then.
        let t0 = Instant::now();
        let mut p = BatchPolicy::new(adaptive(64, &[], 500));
        teach_cost(&mut p, 400, 5);
        let mut waits = Vec::new();
        for i in 0..300u32 {
            let t = t0 + Duration::from_millis(10) * i;
            teach_burst(&mut p, t, 4, US * 10, 1000);
            let lone = t + Duration::from_millis(1);
            p.push(req(i), 0, None, lone).unwrap();
            let at = match p.next_batch(lone) {
                Next::WaitUntil(at) => {
                    waits.push(i);
                    at
                }
                Next::Dispatch(_) => continue,
                Next::Idle => panic!("a request is queued"),
            };
            assert!(at <= lone + US * 500, "never beyond the cap");
            let next = p.next_batch(at);
            let (batch, reason) = reason_of(&p, next);
            assert_eq!(batch, vec![i]);
            assert!(matches!(
                reason,
                DispatchReason::AdaptiveWaited | DispatchReason::WindowExpired
            ));
        }
        assert_eq!(waits.first(), Some(&0), "the first one tries");
        assert!(waits.len() >= 2, "probes again later: {waits:?}");
        assert!(waits.len() <= 15, "but rarely: {waits:?}");
    }
}
