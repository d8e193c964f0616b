//! The scheduler of one model: admission, batch forming and the instance threads, with as few
//! thread hops as the work allows.
//!
//! Everything the parties share sits in one `queue::Core` under one lock. A request arriving in
//! `infer` (on its caller's task) takes the lock once: it is admitted into the policy's queues
//! (whose bounds are the queue bounds), and if an instance is idle and the policy says run, the
//! batch goes straight into that instance's mailbox, the only wake on the arrival path. An
//! instance that finishes a batch answers its callers, then takes the lock and asks the policy for
//! its next batch itself: what formed while it ran starts at once on the same thread. The
//! `timekeeper` task is woken only when a deadline moves earlier (a delay window while an
//! instance idles, a queue timeout), a caller left, or the model shuts down; with no traffic
//! nothing wakes at all. The instance threads never touch the reactor and the timekeeper never
//! runs a model, so inference cannot stall the runtime.
//!
//! Per request, at one in flight with an idle instance and no window: two locks of the core (one
//! before and one after a single `yield_now`, which lets the requests of the same reactor tick join
//! the batch), one wake of the instance thread, one oneshot answer (a wake of the caller's task).
//! A model whose recent batches took at most `SchedulerSettings::inline_below` skips the instance
//! thread: the batch runs on the caller's task, and no thread is woken at all.
//!
//! Threads of one model: one per instance (`<model>-inst-<i>`), plus `<model>-timer` only once a
//! deadline closer than 2 ms was armed (sub-millisecond windows, which tokio's timer rounds up to
//! the next millisecond), plus the timekeeper task on the runtime. Idle, none of them wakes: the
//! instances block on their mailbox without a timeout, the timer thread waits untimed while
//! disarmed, and the timekeeper has no deadline once the queue is empty (a stale deadline costs it
//! at most one look, after which it disarms).
mod instance;
mod queue;
mod timekeeper;

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::{oneshot, watch, Notify};
use tokio::time::Instant;

use super::settings::SchedulerSettings;
use super::worker::{Batch, Job, Orderer, Outcome, Responder, WorkerContext};
use super::{ExecuteError, InferRequest, InferResponse, ModelExecutor, SchedulerError};
use crate::telemetry::stats::ModelStats;
use instance::Mailbox;
use queue::{Core, Released};

/// Schedules the requests of one model onto its instances. Create it inside a tokio runtime.
#[derive(Debug)]
pub struct Scheduler {
    shared: Arc<Shared>,
    finished: watch::Receiver<bool>,
}

#[derive(Debug)]
struct Shared {
    settings: SchedulerSettings,
    stats: Arc<ModelStats>,
    core: Mutex<Core>,
    /// One per instance, by index.
    mailboxes: Vec<Mailbox>,
    /// Each instance's executor, by index. Never contended: a batch is handed to one instance
    /// taken off the idle list, and only its runner (the instance thread, or an inline run on a
    /// request's task) locks it, so there is no waiting on a session.
    executors: Vec<instance::ExecutorSlot>,
    ctx: WorkerContext,
    /// Wakes the timekeeper: a deadline moved earlier, a sweep or the shutdown was asked.
    timekeeper: Notify,
    /// Some caller left while its request waited: the timekeeper removes such requests.
    sweep_wanted: AtomicBool,
    /// What the next inline batch does beyond running (`Core::inline_plan` as of the last batch
    /// that finished, an `answer_split::Plan`), read without the lock by the task that runs it.
    inline_plan: AtomicU8,
    /// Why the model cannot serve any more (an instance was lost); None while healthy.
    failure: Mutex<Option<String>>,
}

impl Scheduler {
    /// Starts one named thread per executor (`<model>-inst-<i>`) and the timekeeper task.
    pub fn start(
        settings: SchedulerSettings,
        executors: Vec<Box<dyn ModelExecutor>>,
        stats: Arc<ModelStats>,
    ) -> Scheduler {
        let ctx = WorkerContext {
            model: settings.model.clone(),
            stats: stats.clone(),
            orderer: settings
                .preserve_ordering
                .then(|| Arc::new(Orderer::default())),
            batched: settings.max_batch_size > 0,
        };
        let shared = Arc::new(Shared {
            core: Mutex::new(Core::new(settings.policy.clone())),
            mailboxes: executors.iter().map(|_| Mailbox::default()).collect(),
            executors: executors
                .into_iter()
                .map(instance::ExecutorSlot::new)
                .collect(),
            settings,
            stats,
            ctx,
            timekeeper: Notify::new(),
            sweep_wanted: AtomicBool::new(false),
            inline_plan: AtomicU8::new(0),
            failure: Mutex::new(None),
        });
        let handle = tokio::runtime::Handle::current();
        let count = shared.executors.len();
        let mut threads = Vec::with_capacity(count);
        let mut started = Vec::with_capacity(count);
        for index in 0..count {
            match instance::spawn(index, Arc::clone(&shared), handle.clone()) {
                Ok(thread) => {
                    threads.push(thread);
                    started.push(index);
                }
                Err(error) => {
                    tracing::error!(model = %shared.settings.model, index, %error, "failed to start a model instance thread");
                }
            }
        }
        {
            let mut core = shared.core.lock();
            core.alive = started.len();
            // Popped from the end: instance 0 is handed the first batch.
            core.idle = started.into_iter().rev().collect();
        }
        let (finished_tx, finished) = watch::channel(false);
        let timekeeper = tokio::spawn(timekeeper::run(Arc::clone(&shared), threads, finished_tx));
        // A panic in the timekeeper must not leave a model that looks ready and hangs its
        // deadlines: the model is marked, and stops admitting.
        let watched = Arc::clone(&shared);
        tokio::spawn(async move {
            if let Err(error) = timekeeper.await {
                if error.is_panic() {
                    let reason = "the scheduler's timekeeper stopped after a panic".to_string();
                    tracing::error!(model = %watched.settings.model, %reason, "model scheduler lost");
                    watched.failure.lock().get_or_insert(reason);
                    watched.core.lock().stopping = true;
                }
            }
        });
        Scheduler { shared, finished }
    }

    pub fn settings(&self) -> &SchedulerSettings {
        &self.shared.settings
    }

    /// Why this model version stopped serving (an instance thread was lost to a panic), if it
    /// did: the model then reports UNAVAILABLE with this reason until it is reloaded.
    pub fn failure(&self) -> Option<String> {
        self.shared.failure.lock().clone()
    }

    /// Queues a request and waits for its outputs. Refuses at once when the queue is full or the
    /// scheduler is shutting down. Dropping the future withdraws a request that has not run yet.
    pub async fn infer(&self, req: InferRequest) -> Result<InferResponse, SchedulerError> {
        let shared = &*self.shared;
        let rows = request_rows(&req, shared.settings.max_batch_size)?;
        let (tx, rx) = oneshot::channel();
        let now = Instant::now();
        // Lives from admission to the start of its batch (or to the request leaving the queue any
        // other way). Debug level: when neither the logs nor a trace exporter want it, it is
        // Span::none().
        let queue_span = tracing::debug_span!(parent: &req.span, "queue", priority = req.priority);
        let job = Job {
            inputs: req.inputs,
            requested_outputs: req.requested_outputs,
            rows,
            span: req.span,
            queue_span,
            enqueued: now,
            responder: Responder::new(tx, shared.stats.clone()),
        };
        let mut released = Released::default();
        let mut gather = false;
        let mut yield_first = false;
        let admitted = {
            let mut core = shared.core.lock();
            let admitted = core.admit(
                job,
                req.priority,
                req.timeout,
                now,
                &shared.sweep_wanted,
                &mut released,
            );
            if admitted.is_ok() {
                core.expire(now, &mut released);
                if !core.gathering && !core.idle.is_empty() && !core.stopping {
                    core.gathering = true;
                    gather = true;
                    yield_first = core.gathers_by_yielding();
                } else if !core.gathering {
                    let next = core.feed_idle(now, &shared.mailboxes, &shared.stats, &mut released);
                    released.wake_timekeeper = core.arm(next);
                }
            }
            admitted
        };
        released.settle(&shared.stats, &shared.timekeeper);
        admitted?;
        // If the caller goes away (cancelled, gRPC deadline passed) while the request waits, the
        // timekeeper is told at once, so the request leaves the queue and frees its place now
        // rather than when a batch is next formed, which may be a whole delay window later.
        let mut answer = Answer {
            shared,
            rx,
            received: false,
        };
        if gather {
            // The reactor read every request of this tick before polling their handlers: yielding
            // once lets the ones already woken queue theirs, so they share this batch instead of
            // each waking the instance thread (a context switch apiece on a one-CPU pod). With one
            // client in flight there is nobody to wait for, and the yield is mostly skipped.
            let gathering = Gathering {
                shared: &self.shared,
                yielded: yield_first,
                done: false,
            };
            if yield_first {
                tokio::task::yield_now().await;
            }
            gathering.finish();
        }
        let outcome = (&mut answer.rx).await.unwrap_or_else(|_| {
            Err(SchedulerError::Execute(ExecuteError(
                "the scheduler dropped the request".into(),
            )))
        });
        answer.received = true;
        outcome
    }

    /// Stops admitting (new requests get ShuttingDown), runs everything already queued without
    /// waiting for batch delays, and returns once every instance thread has exited.
    pub async fn shutdown(&self) {
        self.shared.core.lock().stopping = true;
        self.shared.timekeeper.notify_one();
        let mut finished = self.finished.clone();
        // An error means the timekeeper is gone already, which is what we wait for.
        let _ = finished.wait_for(|done| *done).await;
    }
}

impl Shared {
    /// Wakes the timekeeper to remove requests whose callers have gone; repeated calls before it
    /// runs cost one sweep.
    fn request_sweep(&self) {
        if !self.sweep_wanted.swap(true, Ordering::AcqRel) {
            self.timekeeper.notify_one();
        }
    }
}

/// The caller's side of its answer; dropped before the answer came means the caller left.
/// Held by the arrival that yields to gather a batch. `finish` (once it resumed) dispatches what
/// queued, running one batch right here when the model is cheap enough; dropped unfinished
/// (cancelled while it yielded), it hands what queued to the idle instances.
struct Gathering<'a> {
    shared: &'a Arc<Shared>,
    /// Whether it yielded (what it finds queued then tells whether yielding pays).
    yielded: bool,
    done: bool,
}

impl Gathering<'_> {
    fn finish(mut self) {
        self.done = true;
        if let Some((instance, batch)) = self.dispatch(true) {
            instance::run_inline(self.shared, instance, batch);
        }
    }

    /// Ends the gathering and hands what queued to the idle instances; with `inline`, the first
    /// batch of a model cheap enough to run on this task is kept and returned instead.
    fn dispatch(&self, inline: bool) -> Option<(usize, Batch)> {
        let shared = self.shared;
        let now = Instant::now();
        let mut released = Released::default();
        let kept = {
            let mut core = shared.core.lock();
            core.gathering = false;
            if self.yielded {
                let queued = core.policy.len();
                core.observe_gathering(queued);
            }
            core.expire(now, &mut released);
            let keep_first = inline && core.runs_inline(shared.settings.inline_below);
            let (kept, next) = core.feed_idle_keeping(
                keep_first,
                now,
                &shared.mailboxes,
                &shared.stats,
                &mut released,
            );
            released.wake_timekeeper = core.arm(next);
            kept
        };
        released.settle(&shared.stats, &shared.timekeeper);
        kept
    }
}

impl Drop for Gathering<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.dispatch(false);
        }
    }
}

struct Answer<'a> {
    shared: &'a Shared,
    rx: oneshot::Receiver<Outcome>,
    received: bool,
}

impl Drop for Answer<'_> {
    fn drop(&mut self) {
        if !self.received {
            // Closed first, so the sweep already sees this request as cancelled.
            self.rx.close();
            self.shared.request_sweep();
        }
    }
}

/// Rows a request adds to a batch: its dim 0 for models with a batch dimension, else 1.
fn request_rows(req: &InferRequest, max_batch_size: usize) -> Result<usize, SchedulerError> {
    if max_batch_size == 0 {
        return Ok(1);
    }
    let mut rows = None;
    for input in &req.inputs {
        let Some(&dim0) = input.tensor.shape.first() else {
            return Err(SchedulerError::InvalidRequest(format!(
                "input '{}' has no batch dimension",
                input.name
            )));
        };
        match rows {
            None => rows = Some(dim0),
            Some(r) if r != dim0 => {
                return Err(SchedulerError::InvalidRequest(format!(
                    "input '{}' has batch size {dim0} but other inputs have {r}",
                    input.name
                )))
            }
            Some(_) => {}
        }
    }
    let rows = rows.unwrap_or(1);
    match usize::try_from(rows) {
        Ok(r) if r >= 1 && r <= max_batch_size => Ok(r),
        _ => Err(SchedulerError::InvalidRequest(format!(
            "inference request batch-size must be within 1..={max_batch_size}, got {rows}"
        ))),
    }
}

#[cfg(test)]
mod tests;
