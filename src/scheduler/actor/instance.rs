//! The instance threads. Each one runs a batch, answers its callers, then takes its next batch from
//! the queue itself: whatever formed while it ran starts at once on this thread, with no other
//! thread or task in between. Only when nothing can run does it mark itself idle and block on its
//! mailbox, where an arriving request or the timekeeper puts its next batch.
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};
use tokio::runtime::Handle;
use tokio::time::Instant;

use super::super::answer_split::{LastSplit, Plan, MIN_REQUESTS};
use super::super::worker::{panic_message, run_batch, Batch, BatchCost, LaterAnswers, Ran};
use super::super::ModelExecutor;
use super::queue::{Core, Formed, Released};
use super::Shared;

/// One instance's executor and what its runs keep, behind a lock that is never contended (see
/// `Shared::executors`).
pub(super) struct ExecutorSlot(Mutex<Slot>);

struct Slot {
    executor: Box<dyn ModelExecutor>,
    last_split: LastSplit,
}

impl ExecutorSlot {
    pub fn new(executor: Box<dyn ModelExecutor>) -> Self {
        Self(Mutex::new(Slot {
            executor,
            last_split: LastSplit::default(),
        }))
    }
}

impl std::fmt::Debug for ExecutorSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExecutorSlot")
    }
}

/// Where one idle instance waits for its next batch. Holds at most one: a batch is only put in
/// the mailbox of an instance taken off the idle list.
#[derive(Debug, Default)]
pub(super) struct Mailbox {
    mail: Mutex<Mail>,
    ready: Condvar,
}

#[derive(Debug, Default)]
struct Mail {
    batch: Option<Batch>,
    closed: bool,
}

impl Mailbox {
    /// Gives the instance its batch and wakes it; hands the batch back if the mailbox is closed or
    /// (which the idle list rules out) already full.
    pub fn put(&self, batch: Batch) -> Result<(), Batch> {
        let mut mail = self.mail.lock();
        if mail.closed || mail.batch.is_some() {
            return Err(batch);
        }
        mail.batch = Some(batch);
        drop(mail);
        self.ready.notify_one();
        Ok(())
    }

    /// Blocks until a batch arrives (no timeout: an idle instance never wakes by itself); None once
    /// the mailbox is closed and empty.
    fn take(&self) -> Option<Batch> {
        let mut mail = self.mail.lock();
        loop {
            if let Some(batch) = mail.batch.take() {
                return Some(batch);
            }
            if mail.closed {
                return None;
            }
            self.ready.wait(&mut mail);
        }
    }

    pub fn close(&self) {
        self.mail.lock().closed = true;
        self.ready.notify_one();
    }
}

/// Starts the thread of one instance (`<model>-inst-<index>`).
pub(super) fn spawn(
    index: usize,
    shared: Arc<Shared>,
    handle: Handle,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let name = format!("{}-inst-{index}", shared.settings.model);
    std::thread::Builder::new()
        .name(name)
        .spawn(move || run_instance(index, &shared, &handle))
}

/// The body of an instance thread: run batches until the mailbox closes. A panic anywhere in a
/// batch outside the executor's call (assembly, splitting, answering) answers that batch's callers
/// with an error, releases its place in the answer order and loses the instance; it never leaves a
/// busy count that will not come back.
fn run_instance(instance: usize, shared: &Shared, handle: &Handle) {
    // tokio's clock (paused in tests) and the timekeeper's deadlines are read from here too.
    let _runtime = handle.enter();
    let mailbox = &shared.mailboxes[instance];
    let mut next = mailbox.take();
    while let Some(batch) = next {
        match run_guarded(shared, instance, batch, false) {
            Ok(ran) => next = after_batch(shared, instance, ran.cost).or_else(|| mailbox.take()),
            Err(()) => return,
        }
    }
}

/// Runs a batch that `Core::feed_idle_keeping` kept for the caller's task (a model whose batches are
/// cheaper than the two context switches of a hand-off). What formed behind it is not run here:
/// it goes on to a task of its own (`InlineNext`), queued behind the connection's, so the answers
/// of this batch are written before the next batch starts. The client can then send its next
/// requests while the server runs that batch, where running both back to back made the two sides
/// take turns (16 in flight to a `max_batch_size: 8` model left the server core 20% idle).
pub(super) fn run_inline(shared: &Arc<Shared>, instance: usize, first: Batch) {
    if let Some(next) = run_one_inline(shared, instance, first) {
        let next = InlineNext {
            shared: Arc::clone(shared),
            instance,
            batch: Some(next),
        };
        tokio::spawn(next.run());
    }
}

/// Runs one batch on the current task. Returns the next batch for this instance while the one
/// just run took less than the inline bound; past the bound that next batch went to the
/// instance's thread, and None also means nothing was left to run.
fn run_one_inline(shared: &Shared, instance: usize, batch: Batch) -> Option<Batch> {
    let started = Instant::now();
    let plan = inline_plan(shared);
    let ran = match plan {
        Plan::RunInHalves => run_first_half_alone(shared, instance, batch)
            .and_then(|rest| run_guarded(shared, instance, rest, false)),
        _ => run_guarded(shared, instance, batch, plan == Plan::AnswerInHalves),
    };
    let Ok(ran) = ran else {
        // The instance is lost: its thread, blocked on the mailbox, exits.
        shared.mailboxes[instance].close();
        return None;
    };
    let took = started.elapsed();
    if let Some(later) = ran.later {
        answer_next_turn(later);
    }
    let next = after_batch(shared, instance, ran.cost)?;
    match shared.settings.inline_below {
        Some(bound) if took < bound => Some(next),
        _ => {
            mail(shared, instance, next);
            None
        }
    }
}

/// The plan the last batch that finished made for the next inline one.
fn inline_plan(shared: &Shared) -> Plan {
    Plan::from_u8(shared.inline_plan.load(Ordering::Relaxed))
}

/// Runs the first half of a batch large enough as an execution of its own, its cost learned as
/// any batch's, and returns the rest to run next (`Plan::RunInHalves`). Its callers are answered,
/// but their task cannot take the answer before this one yields, after the rest ran: the clients
/// stay in step. Err: the instance was lost (the rest's callers learn it as their jobs drop).
fn run_first_half_alone(shared: &Shared, instance: usize, batch: Batch) -> Result<Batch, ()> {
    if batch.jobs.len() < MIN_REQUESTS || shared.ctx.orderer.is_some() {
        return Ok(batch);
    }
    let (first, rest) = batch.halve();
    if let Some(cost) = run_guarded(shared, instance, first, false)?.cost {
        learn_cost(shared, &mut shared.core.lock(), cost);
    }
    Ok(rest)
}

/// Sends the held-back half of a batch's answers once the reactor has had a turn, in which the
/// connections write the first half: the clients send their next requests while these are still
/// being answered. Spawned before anything that runs the next batch, so it goes first.
pub(super) fn answer_next_turn(later: LaterAnswers) {
    tokio::spawn(async move {
        tokio::task::yield_now().await;
        drop(later);
    });
}

/// Gives a busy instance's next batch to its thread.
fn mail(shared: &Shared, instance: usize, batch: Batch) {
    if let Err(batch) = shared.mailboxes[instance].put(batch) {
        // Closed only once nothing is queued or running: cannot happen while busy.
        shared.ctx.deliver(batch.seq, Vec::new());
    }
}

/// The batches an inline run found behind its own, run on a task of their own. Each turn first
/// yields, which lets the answers of the batches before leave and the requests that came meanwhile
/// join the queue, then runs what is queued for at most the inline bound. The instance stays busy
/// throughout. Dropped with a batch still held (the runtime shutting down), it hands that batch to
/// the instance's thread, so nothing taken from the queue is lost.
struct InlineNext {
    shared: Arc<Shared>,
    instance: usize,
    batch: Option<Batch>,
}

impl InlineNext {
    async fn run(mut self) {
        let turn_bound = self.shared.settings.inline_below.unwrap_or_default();
        while self.batch.is_some() {
            tokio::task::yield_now().await;
            if inline_plan(&self.shared) == Plan::AnswerInHalves {
                // The first turn sent the held-back half of the last batch's answers
                // (`answer_next_turn`, which went first); the second lets its callers take them
                // before this batch holds the reactor.
                tokio::task::yield_now().await;
            }
            // Then what queued runs back to back: one more write for all of it, not one per batch
            // (which cost add_sub at 64 in flight 15%), until the turn has held the reactor for
            // the inline bound.
            let turn = Instant::now();
            while let Some(batch) = self.batch.take() {
                self.batch = run_one_inline(&self.shared, self.instance, batch);
                // A batch whose answers are split ends the turn too: its second half goes first.
                if turn.elapsed() >= turn_bound || inline_plan(&self.shared) == Plan::AnswerInHalves
                {
                    break;
                }
            }
        }
    }
}

impl Drop for InlineNext {
    fn drop(&mut self) {
        if let Some(batch) = self.batch.take() {
            mail(&self.shared, self.instance, batch);
        }
    }
}

/// Runs one batch on `instance`'s executor. A panic outside the executor's own guard loses the
/// instance (its state can no longer be trusted): the model is marked, and Err is returned.
fn run_guarded(
    shared: &Shared,
    instance: usize,
    batch: Batch,
    split_answers: bool,
) -> Result<Ran, ()> {
    let seq = batch.seq;
    let ran = catch_unwind(AssertUnwindSafe(|| {
        let mut slot = shared.executors[instance].0.lock();
        let Slot {
            executor,
            last_split,
        } = &mut *slot;
        let first_half = split_answers
            .then(|| last_split.first_half(batch.jobs.len()))
            .flatten();
        run_batch(executor.as_mut(), &shared.ctx, instance, batch, first_half)
    }));
    ran.map_err(|panic| {
        let reason = format!(
            "model instance {instance} stopped after a panic while running a batch: {}",
            panic_message(panic.as_ref())
        );
        // The payload's own drop must not take the thread down before the model is marked.
        let _ = catch_unwind(AssertUnwindSafe(move || drop(panic)));
        lose_instance(shared, seq, reason);
    })
}

/// Takes the next batch for this instance, which just finished one: Some to run it right here,
/// None after marking the instance idle.
fn after_batch(shared: &Shared, instance: usize, cost: Option<BatchCost>) -> Option<Batch> {
    let now = Instant::now();
    let mut released = Released::default();
    let next = {
        let mut core = shared.core.lock();
        core.busy -= 1;
        if let Some(cost) = cost {
            learn_cost(shared, &mut core, cost);
            let plan = core.inline_plan();
            if shared.inline_plan.swap(plan as u8, Ordering::Relaxed) != plan as u8 {
                tracing::debug!(model = %shared.settings.model, ?plan, cost_line = ?core.cost_line(), "the plan for inline batches changed");
            }
        }
        core.expire(now, &mut released);
        match core.form(now, &shared.stats, &mut released) {
            Formed::Batch(batch) => {
                core.busy += 1;
                Some(batch)
            }
            Formed::Wait(at) => {
                core.idle.push(instance);
                released.wake_timekeeper = core.arm(at) || core.drained();
                None
            }
        }
    };
    released.settle(&shared.stats, &shared.timekeeper);
    next
}

/// Lets the batch policy and the core's cost records learn what one execution cost.
fn learn_cost(shared: &Shared, core: &mut Core, cost: BatchCost) {
    core.policy.observe_execution(cost.rows, cost.took);
    core.observe_cost(cost.rows, cost.took, shared.settings.split_answers_from);
}

/// An instance hit a panic outside the executor: its state can no longer be trusted, so it stops.
/// The model is marked UNAVAILABLE with `reason`; once no instance is left, what waits fails.
fn lose_instance(shared: &Shared, seq: u64, reason: String) {
    tracing::error!(model = %shared.settings.model, %reason, "model instance lost");
    // Its callers were answered as the unwinding dropped their responders; its place in the
    // answer order is released so later batches are not held behind it.
    shared.ctx.deliver(seq, Vec::new());
    shared.failure.lock().get_or_insert(reason);
    let mut released = Released::default();
    {
        let mut core = shared.core.lock();
        core.busy -= 1;
        core.alive -= 1;
        if core.alive == 0 {
            let waiting = core.policy.drain();
            released.unservable = waiting;
        }
        released.wake_timekeeper = core.drained();
    }
    released.settle(&shared.stats, &shared.timekeeper);
}
