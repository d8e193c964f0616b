//! The instance threads. Each one runs a batch, answers its callers, then takes its next batch from
//! the queue itself: whatever formed while it ran starts at once on this thread, with no other
//! thread or task in between. Only when nothing can run does it mark itself idle and block on its
//! mailbox, where an arriving request or the timekeeper puts its next batch.
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};
use tokio::runtime::Handle;
use tokio::time::Instant;

use super::super::worker::{panic_message, run_batch, Batch, BatchCost};
use super::super::ModelExecutor;
use super::queue::{Formed, Released};
use super::Shared;

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
    executor: Box<dyn ModelExecutor>,
    shared: Arc<Shared>,
    handle: Handle,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let name = format!("{}-inst-{index}", shared.settings.model);
    std::thread::Builder::new()
        .name(name)
        .spawn(move || run_instance(index, executor, &shared, &handle))
}

/// The body of an instance thread: run batches until the mailbox closes. A panic anywhere in a
/// batch outside the executor's call (assembly, splitting, answering) answers that batch's callers
/// with an error, releases its place in the answer order and loses the instance; it never leaves a
/// busy count that will not come back.
fn run_instance(
    instance: usize,
    mut executor: Box<dyn ModelExecutor>,
    shared: &Shared,
    handle: &Handle,
) {
    // tokio's clock (paused in tests) and the timekeeper's deadlines are read from here too.
    let _runtime = handle.enter();
    let mailbox = &shared.mailboxes[instance];
    let mut next = mailbox.take();
    while let Some(batch) = next {
        let seq = batch.seq;
        let ran = catch_unwind(AssertUnwindSafe(|| {
            run_batch(executor.as_mut(), &shared.ctx, instance, batch)
        }));
        match ran {
            Ok(cost) => next = after_batch(shared, instance, cost).or_else(|| mailbox.take()),
            Err(panic) => {
                let reason = format!(
                    "model instance {instance} stopped after a panic while running a batch: {}",
                    panic_message(panic.as_ref())
                );
                // The payload's own drop must not take the thread down before the model is marked.
                let _ = catch_unwind(AssertUnwindSafe(move || drop(panic)));
                lose_instance(shared, seq, reason);
                return;
            }
        }
    }
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
            core.policy.observe_execution(cost.rows, cost.took);
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
