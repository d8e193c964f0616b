//! The scheduler of one model: admission, the batcher task and the instance threads.
//!
//! `infer` checks the queue bound synchronously (so a full queue answers at once), then hands the
//! request to the batcher, a tokio task that owns the [`BatchPolicy`]. Whenever an instance is
//! free the batcher asks the policy for a batch and sends it to that instance's thread; the
//! thread runs it and answers every caller's oneshot directly. The batcher never runs a model and
//! the instance threads never touch the reactor, so inference cannot stall the runtime.
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::time::Instant;
use tracing::Span;

use super::policy::{BatchPolicy, Batchable, Next, PolicyConfig};
use super::settings::SchedulerSettings;
use super::timer::PreciseTimer;
use super::worker::{
    worker_loop, Batch, Orderer, Responder, RunningJob, WorkerContext, WorkerNotice,
};
use super::{ExecuteError, InferRequest, InferResponse, ModelExecutor, SchedulerError};
use crate::telemetry::stats::{FailureReason, ModelStats};
use crate::tensor::NamedTensor;

/// Schedules the requests of one model onto its instances. Create it inside a tokio runtime.
#[derive(Debug)]
pub struct Scheduler {
    shared: Arc<Shared>,
    requests: mpsc::Sender<Job>,
    finished: watch::Receiver<bool>,
}

#[derive(Debug)]
struct Shared {
    settings: SchedulerSettings,
    stats: Arc<ModelStats>,
    admission: Arc<Admission>,
    stopping: AtomicBool,
    /// Wakes the batcher to stop admitting and drain.
    shutdown: Notify,
    /// Wakes the batcher to look for cancelled requests after a queue-full refusal.
    sweep: Notify,
    sweep_wanted: AtomicBool,
    /// Why the model cannot serve any more (an instance was lost); None while healthy.
    failure: Mutex<Option<String>>,
}

impl Scheduler {
    /// Starts the batcher task and one named thread per executor (`<model>-inst-<i>`).
    pub fn start(
        settings: SchedulerSettings,
        executors: Vec<Box<dyn ModelExecutor>>,
        stats: Arc<ModelStats>,
    ) -> Scheduler {
        let policy_config = settings.policy.clone();
        let shared = Arc::new(Shared {
            admission: Arc::new(Admission::new(policy_config.clone())),
            settings,
            stats,
            stopping: AtomicBool::new(false),
            shutdown: Notify::new(),
            sweep: Notify::new(),
            sweep_wanted: AtomicBool::new(false),
            failure: Mutex::new(None),
        });
        // Admission already bounds what is in flight; the channel bound is the same number, so a
        // send never finds it full.
        let (requests, requests_rx) = mpsc::channel(policy_config.max_total_queue.max(1));
        let (finished_tx, finished) = watch::channel(false);
        let (free_tx, free_rx) = mpsc::channel(executors.len().max(1));
        let ctx = Arc::new(WorkerContext {
            model: shared.settings.model.clone(),
            stats: shared.stats.clone(),
            orderer: shared
                .settings
                .preserve_ordering
                .then(|| Arc::new(Orderer::default())),
            batched: shared.settings.max_batch_size > 0,
        });
        let workers: Vec<Worker> = executors
            .into_iter()
            .enumerate()
            .map(|(index, executor)| Worker::spawn(index, executor, free_tx.clone(), ctx.clone()))
            .collect();
        let idle = workers
            .iter()
            .enumerate()
            .filter(|(_, w)| w.batches.is_some())
            .map(|(i, _)| i)
            .rev()
            .collect();
        let batcher = Batcher {
            shared: shared.clone(),
            policy: BatchPolicy::new(policy_config),
            requests: requests_rx,
            free: free_rx,
            workers,
            idle,
            busy: 0,
            next_seq: 0,
            timer: PreciseTimer::start(format!("{}-timer", shared.settings.model)),
            ctx,
        };
        let batcher = tokio::spawn(batcher.run(finished_tx));
        // A panic in the batcher itself must not leave a model that looks ready and refuses every
        // request: its callers were answered as their responders dropped; the model is marked.
        let watched = Arc::clone(&shared);
        tokio::spawn(async move {
            if let Err(error) = batcher.await {
                if error.is_panic() {
                    let reason = "the batcher stopped after a panic".to_string();
                    tracing::error!(model = %watched.settings.model, %reason, "model scheduler lost");
                    watched.failure.lock().get_or_insert(reason);
                    watched.stopping.store(true, Ordering::Release);
                }
            }
        });
        Scheduler {
            shared,
            requests,
            finished,
        }
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
        if self.shared.stopping.load(Ordering::Acquire) {
            return Err(SchedulerError::ShuttingDown);
        }
        let rows = request_rows(&req, self.shared.settings.max_batch_size)?;
        let level = self.shared.settings.policy.level_for(req.priority);
        let Some(slot) = self.shared.admission.try_acquire(level) else {
            // Cancelled requests may still hold places: ask the batcher to clear them out.
            self.shared.request_sweep();
            return Err(SchedulerError::QueueFull);
        };
        let (tx, rx) = oneshot::channel();
        // Lives from admission to dispatch (or to the request leaving the queue any other way).
        // Debug level: when neither the logs nor a trace exporter want it, it is Span::none().
        let queue_span = tracing::debug_span!(parent: &req.span, "queue", priority = req.priority);
        let job = Job {
            inputs: req.inputs,
            requested_outputs: req.requested_outputs,
            rows,
            priority: req.priority,
            timeout: req.timeout,
            span: req.span,
            queue_span,
            enqueued: Instant::now(),
            responder: Responder::new(tx, self.shared.stats.clone()),
            _slot: slot,
        };
        match self.requests.try_send(job) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(SchedulerError::ShuttingDown),
            Err(mpsc::error::TrySendError::Full(_)) => return Err(SchedulerError::QueueFull),
        }
        // If the caller goes away (cancelled, gRPC deadline passed) while the request waits, the
        // batcher is told at once, so the request leaves the queue and frees its place now rather
        // than when a batch is next formed, which may be a whole delay window later.
        let mut withdraw = WithdrawOnDrop {
            shared: &self.shared,
            armed: true,
        };
        let outcome = rx.await.unwrap_or_else(|_| {
            Err(SchedulerError::Execute(ExecuteError(
                "the scheduler dropped the request".into(),
            )))
        });
        withdraw.armed = false;
        outcome
    }

    /// Stops admitting (new requests get ShuttingDown), runs everything already queued without
    /// waiting for batch delays, and returns once every instance thread has exited.
    pub async fn shutdown(&self) {
        self.shared.stopping.store(true, Ordering::Release);
        self.shared.shutdown.notify_one();
        let mut finished = self.finished.clone();
        // An error means the batcher is gone already, which is what we wait for.
        let _ = finished.wait_for(|done| *done).await;
    }
}

impl Shared {
    /// Wakes the batcher to remove requests whose callers have gone; repeated calls before it
    /// runs cost one sweep.
    fn request_sweep(&self) {
        if !self.sweep_wanted.swap(true, Ordering::AcqRel) {
            self.sweep.notify_one();
        }
    }
}

/// Armed while a caller waits for its answer; dropping it armed means the caller left.
struct WithdrawOnDrop<'a> {
    shared: &'a Shared,
    armed: bool,
}

impl Drop for WithdrawOnDrop<'_> {
    fn drop(&mut self) {
        if self.armed {
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

/// A queued request.
#[derive(Debug)]
struct Job {
    inputs: Vec<NamedTensor>,
    requested_outputs: Vec<String>,
    rows: usize,
    priority: u32,
    timeout: Option<Duration>,
    span: Span,
    /// The request's `queue` child span, closed when the job leaves the queue.
    queue_span: Span,
    enqueued: Instant,
    responder: Responder,
    /// Its place in the admission count, given back when the job leaves the queue.
    _slot: QueueSlot,
}

impl Job {
    fn start(self, now: Instant) -> RunningJob {
        // Dispatch ends the wait, for the span as for the `queue` duration measured below.
        drop(self.queue_span);
        RunningJob {
            inputs: self.inputs,
            requested_outputs: self.requested_outputs,
            rows: self.rows,
            span: self.span,
            queue: now.saturating_duration_since(self.enqueued),
            responder: self.responder,
        }
    }
}

impl Batchable for Job {
    fn rows(&self) -> usize {
        self.rows
    }

    fn same_shape(&self, other: &Self) -> bool {
        self.inputs.len() == other.inputs.len()
            && self.inputs.iter().enumerate().all(|(i, mine)| {
                let theirs = match other.inputs.get(i) {
                    Some(t) if t.name == mine.name => Some(t),
                    _ => other.inputs.iter().find(|t| t.name == mine.name),
                };
                theirs.is_some_and(|t| {
                    t.tensor.dtype == mine.tensor.dtype
                        && t.tensor.shape.get(1..) == mine.tensor.shape.get(1..)
                })
            })
    }

    fn is_cancelled(&self) -> bool {
        self.responder.is_closed()
    }
}

/// The queue bounds, checked synchronously at admission. Mirrors the policy's limits; counts a
/// request from admission until it leaves the queue (dispatched, timed out or cancelled).
#[derive(Debug)]
struct Admission {
    config: PolicyConfig,
    counts: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_level: HashMap<u32, usize>,
}

impl Admission {
    fn new(config: PolicyConfig) -> Self {
        Self {
            config,
            counts: Mutex::new(Counts::default()),
        }
    }

    fn try_acquire(self: &Arc<Self>, level: u32) -> Option<QueueSlot> {
        let limit = self.config.queue_policy(level).max_queue_size;
        let mut counts = self.counts.lock();
        let at_level = counts.per_level.get(&level).copied().unwrap_or(0);
        if counts.total >= self.config.max_total_queue || limit.is_some_and(|max| at_level >= max) {
            return None;
        }
        counts.total += 1;
        *counts.per_level.entry(level).or_insert(0) += 1;
        Some(QueueSlot {
            admission: self.clone(),
            level,
        })
    }

    fn release(&self, level: u32) {
        let mut counts = self.counts.lock();
        counts.total = counts.total.saturating_sub(1);
        if let Some(n) = counts.per_level.get_mut(&level) {
            *n -= 1;
            if *n == 0 {
                counts.per_level.remove(&level);
            }
        }
    }
}

#[derive(Debug)]
struct QueueSlot {
    admission: Arc<Admission>,
    level: u32,
}

impl Drop for QueueSlot {
    fn drop(&mut self) {
        self.admission.release(self.level);
    }
}

/// One instance thread and the channel that feeds it.
struct Worker {
    /// None once the thread is gone (it failed to start, or its channel broke).
    batches: Option<std::sync::mpsc::SyncSender<Batch>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Worker {
    fn spawn(
        index: usize,
        executor: Box<dyn ModelExecutor>,
        free: mpsc::Sender<WorkerNotice>,
        ctx: Arc<WorkerContext>,
    ) -> Worker {
        // Capacity 1: the batcher only sends to an idle instance, so the slot is always empty.
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let name = format!("{}-inst-{index}", ctx.model);
        let spawned = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || worker_loop(index, executor, rx, free, ctx));
        match spawned {
            Ok(thread) => Worker {
                batches: Some(tx),
                thread: Some(thread),
            },
            Err(error) => {
                tracing::error!(thread = %name, %error, "failed to start a model instance thread");
                Worker {
                    batches: None,
                    thread: None,
                }
            }
        }
    }
}

/// The batcher task's state: the queues, and which instances are free.
struct Batcher {
    shared: Arc<Shared>,
    policy: BatchPolicy<Job>,
    requests: mpsc::Receiver<Job>,
    free: mpsc::Receiver<WorkerNotice>,
    workers: Vec<Worker>,
    /// Instances waiting for a batch.
    idle: Vec<usize>,
    /// Batches sent and not yet finished.
    busy: usize,
    next_seq: u64,
    /// Wakes the batcher at sub-millisecond deadlines, which tokio's timer rounds up.
    timer: PreciseTimer,
    ctx: Arc<WorkerContext>,
}

impl Batcher {
    async fn run(mut self, finished: watch::Sender<bool>) {
        let mut closing = false;
        let mut drained = false;
        let mut wake: Option<Instant> = None;
        loop {
            tokio::select! {
                biased;
                Some(notice) = self.free.recv() => self.instance_notice(notice),
                message = self.requests.recv(), if !drained => match message {
                    Some(job) => self.enqueue(job),
                    None => drained = true,
                },
                _ = self.shared.shutdown.notified(), if !closing => {
                    closing = true;
                    // Already-sent requests stay readable; later sends fail with ShuttingDown.
                    self.requests.close();
                }
                _ = self.shared.sweep.notified() => {}
                _ = self.timer.fired() => {}
                _ = sleep_until_or_forever(wake) => {}
            }
            while let Ok(notice) = self.free.try_recv() {
                self.instance_notice(notice);
            }
            if !drained {
                drained = self.absorb_ready_requests();
            }
            let now = Instant::now();
            self.reject_expired(now);
            if self.shared.sweep_wanted.swap(false, Ordering::AcqRel) {
                let gone = self.policy.sweep_cancelled();
                self.record_cancelled(gone, now);
            }
            wake = self.dispatch(now, drained);
            self.timer.set(wake.map(Instant::into_std));
            let gone = self.policy.take_cancelled();
            self.record_cancelled(gone, now);
            if drained && self.policy.is_empty() && self.busy == 0 {
                break;
            }
        }
        self.stop_workers().await;
        let _ = finished.send(true);
    }

    /// Takes every request already waiting in the channel; true once the channel is closed and empty.
    fn absorb_ready_requests(&mut self) -> bool {
        loop {
            match self.requests.try_recv() {
                Ok(job) => self.enqueue(job),
                Err(mpsc::error::TryRecvError::Empty) => return false,
                Err(mpsc::error::TryRecvError::Disconnected) => return true,
            }
        }
    }

    fn enqueue(&mut self, job: Job) {
        let (priority, timeout, enqueued) = (job.priority, job.timeout, job.enqueued);
        if let Err(full) = self.policy.push(job, priority, timeout, enqueued) {
            // Admission mirrors the policy's bounds, so this is only a safety net.
            full.0.responder.send(Err(SchedulerError::QueueFull));
        }
    }

    fn instance_notice(&mut self, notice: WorkerNotice) {
        self.busy = self.busy.saturating_sub(1);
        match notice {
            WorkerNotice::Free(instance, executed) => {
                self.idle.push(instance);
                if let Some((rows, took)) = executed {
                    self.policy.observe_execution(rows, took);
                }
            }
            WorkerNotice::Lost { instance, reason } => {
                // Never given a batch again; once no instance is left, dispatch fails what waits.
                if let Some(worker) = self.workers.get_mut(instance) {
                    worker.batches = None;
                }
                self.shared.failure.lock().get_or_insert(reason);
            }
        }
    }

    fn reject_expired(&mut self, now: Instant) {
        for job in self.policy.expire(now) {
            job.responder.send(Err(SchedulerError::TimedOut));
        }
    }

    fn record_cancelled(&self, jobs: Vec<Job>, now: Instant) {
        for job in jobs {
            // Nobody is left to count it: the caller's future is gone.
            self.shared.stats.record_failure(
                now.saturating_duration_since(job.enqueued),
                FailureReason::Canceled,
            );
            tracing::debug!(parent: &job.span, "request withdrawn by its caller before it ran");
        }
    }

    /// Gives a batch to every idle instance that the policy says should run now; returns when the
    /// batcher must look again even if nothing arrives.
    fn dispatch(&mut self, now: Instant, draining: bool) -> Option<Instant> {
        if self.idle.is_empty() && self.busy == 0 {
            // No instance runs at all: nothing queued could ever be served.
            for job in self.policy.drain() {
                job.responder.send(Err(SchedulerError::Execute(ExecuteError(
                    "no model instance is running".into(),
                ))));
            }
            return None;
        }
        let mut wake = None;
        while let Some(&instance) = self.idle.last() {
            let next = if draining {
                self.policy.next_batch_without_delay(now)
            } else {
                self.policy.next_batch(now)
            };
            match next {
                Next::Dispatch(jobs) => {
                    self.idle.pop();
                    self.send_batch(instance, jobs, now);
                }
                Next::WaitUntil(at) => {
                    wake = Some(at);
                    break;
                }
                Next::Idle => break,
            }
        }
        match (wake, self.policy.next_timeout()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn send_batch(&mut self, instance: usize, jobs: Vec<Job>, now: Instant) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let rows = jobs.iter().map(|j| j.rows).sum();
        let oldest = jobs.iter().map(|j| j.enqueued).min().unwrap_or(now);
        self.shared.stats.record_batch_formed(
            rows,
            now.saturating_duration_since(oldest),
            self.policy.last_dispatch_reason().label(),
        );
        let batch = Batch {
            seq,
            rows,
            jobs: jobs.into_iter().map(|j| j.start(now)).collect(),
        };
        let Some(sender) = self.workers[instance].batches.as_ref() else {
            self.fail_batch(batch, "model instance is not running");
            return;
        };
        match sender.try_send(batch) {
            Ok(()) => self.busy += 1,
            Err(std::sync::mpsc::TrySendError::Full(batch)) => {
                // Cannot happen while the idle list is right; keep the instance, fail the batch.
                self.idle.push(instance);
                self.fail_batch(batch, "model instance was busy");
            }
            Err(std::sync::mpsc::TrySendError::Disconnected(batch)) => {
                tracing::error!(model = %self.ctx.model, instance, "model instance thread has stopped");
                self.workers[instance].batches = None;
                self.fail_batch(batch, "model instance has stopped");
            }
        }
    }

    fn fail_batch(&self, batch: Batch, why: &str) {
        let replies = batch
            .jobs
            .into_iter()
            .map(|job| {
                let error = SchedulerError::Execute(ExecuteError(why.to_string()));
                (job.responder, Err(error))
            })
            .collect();
        self.ctx.deliver(batch.seq, replies);
    }

    /// Closes every instance's channel and waits for the threads to exit, off the reactor.
    async fn stop_workers(&mut self) {
        let threads: Vec<_> = self
            .workers
            .iter_mut()
            .filter_map(|w| {
                w.batches = None;
                w.thread.take()
            })
            .collect();
        let joined = tokio::task::spawn_blocking(move || {
            for thread in threads {
                if thread.join().is_err() {
                    tracing::error!("a model instance thread panicked");
                }
            }
        })
        .await;
        if joined.is_err() {
            tracing::error!("failed to join the model instance threads");
        }
    }
}

async fn sleep_until_or_forever(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests;
