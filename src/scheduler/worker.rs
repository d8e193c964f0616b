//! Model instance workers: one OS thread per instance owns its executor (no lock around a session),
//! receives one batch at a time from the batcher, assembles it, runs it, splits the outputs and
//! answers every caller. Nothing here runs on the tokio reactor.
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant as StdInstant};

use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};
use tracing::Span;

use super::{ExecuteError, InferResponse, ModelExecutor, RequestTimings, SchedulerError};
use crate::telemetry::stats::ModelStats;
use crate::tensor::batch::{concat_rows, outputs_per_request};
use crate::tensor::NamedTensor;

pub(crate) type Outcome = Result<InferResponse, SchedulerError>;

/// The way back to one caller. Counts the request as pending in the model's statistics from
/// admission until it is answered or dropped.
#[derive(Debug)]
pub(crate) struct Responder {
    /// Taken when the answer is sent.
    tx: Option<oneshot::Sender<Outcome>>,
    stats: Arc<ModelStats>,
}

impl Responder {
    pub(crate) fn new(tx: oneshot::Sender<Outcome>, stats: Arc<ModelStats>) -> Self {
        stats
            .pending
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self {
            tx: Some(tx),
            stats,
        }
    }

    /// Whether the caller has gone (its future was dropped: cancelled, deadline passed).
    pub(crate) fn is_closed(&self) -> bool {
        self.tx.as_ref().is_none_or(|tx| tx.is_closed())
    }

    pub(crate) fn send(mut self, outcome: Outcome) {
        if let Some(tx) = self.tx.take() {
            // A caller that left after dispatch simply does not read its answer.
            let _ = tx.send(outcome);
        }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        // Dropped unanswered: the batch it was part of panicked (its state unwound). The caller
        // learns why instead of a bare "dropped" error.
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Err(SchedulerError::Execute(ExecuteError(
                "the model instance failed while running this request's batch".into(),
            ))));
        }
        self.stats
            .pending
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A request taken off the queue to run.
#[derive(Debug)]
pub(crate) struct RunningJob {
    pub inputs: Vec<NamedTensor>,
    pub requested_outputs: Vec<String>,
    pub rows: usize,
    pub span: Span,
    /// From admission to the batch leaving the queue.
    pub queue: Duration,
    pub responder: Responder,
}

/// One execution's worth of requests, in the order their outputs are split.
#[derive(Debug)]
pub(crate) struct Batch {
    /// Dispatch order, used when responses must keep it.
    pub seq: u64,
    pub rows: usize,
    pub jobs: Vec<RunningJob>,
}

/// Holds back answers of batches that finished early until every batch dispatched before them
/// has been answered (`preserve_ordering`).
#[derive(Debug, Default)]
pub(crate) struct Orderer {
    state: Mutex<OrderState>,
}

#[derive(Debug, Default)]
struct OrderState {
    next: u64,
    held: BTreeMap<u64, Vec<(Responder, Outcome)>>,
}

impl Orderer {
    pub(crate) fn deliver(&self, seq: u64, replies: Vec<(Responder, Outcome)>) {
        let mut state = self.state.lock();
        if seq < state.next || state.held.contains_key(&seq) {
            // Already released (a batch that panicked after answering): nothing left to order.
            for (responder, outcome) in replies {
                responder.send(outcome);
            }
            return;
        }
        state.held.insert(seq, replies);
        loop {
            let next = state.next;
            let Some(ready) = state.held.remove(&next) else {
                break;
            };
            state.next += 1;
            // Sending on a oneshot never blocks, so answering under the lock is cheap and keeps
            // two workers from interleaving their batches.
            for (responder, outcome) in ready {
                responder.send(outcome);
            }
        }
    }
}

/// What every worker of a model shares.
#[derive(Debug)]
pub(crate) struct WorkerContext {
    pub model: String,
    pub stats: Arc<ModelStats>,
    pub orderer: Option<Arc<Orderer>>,
    /// The model has a batch dimension (max_batch_size > 0): outputs are checked against it.
    pub batched: bool,
}

impl WorkerContext {
    /// Hands each reply to its caller, in dispatch order when the model preserves ordering.
    pub(crate) fn deliver(&self, seq: u64, replies: Vec<(Responder, Outcome)>) {
        match &self.orderer {
            Some(orderer) => orderer.deliver(seq, replies),
            None => {
                for (responder, outcome) in replies {
                    responder.send(outcome);
                }
            }
        }
    }
}

/// What an instance thread tells the batcher after each batch.
#[derive(Debug)]
pub(crate) enum WorkerNotice {
    /// The instance is free for the next batch; with the rows and compute time of the batch it
    /// ran, when that batch succeeded (the batching policy learns execution costs from it).
    Free(usize, Option<(usize, Duration)>),
    /// The instance hit a panic outside the runtime and has stopped: its state can no longer be
    /// trusted. The model is marked UNAVAILABLE with `reason`.
    Lost { instance: usize, reason: String },
}

/// The body of an instance thread: run batches until the batcher drops the channel, telling the
/// batcher after each one that this instance is free again. A panic anywhere in a batch (assembly,
/// splitting, answering) answers that batch's callers with an error, releases its place in the
/// answer order and stops the instance, which the batcher is told about; it never leaves the
/// batcher counting a busy instance that will not come back.
pub(crate) fn worker_loop(
    instance: usize,
    mut executor: Box<dyn ModelExecutor>,
    batches: std::sync::mpsc::Receiver<Batch>,
    free: mpsc::Sender<WorkerNotice>,
    ctx: Arc<WorkerContext>,
) {
    while let Ok(batch) = batches.recv() {
        let seq = batch.seq;
        let ran = catch_unwind(AssertUnwindSafe(|| {
            run_batch(executor.as_mut(), &ctx, instance, batch)
        }));
        let executed = ran.as_ref().ok().copied().flatten();
        if let Err(panic) = ran {
            let reason = format!(
                "model instance {instance} stopped after a panic while running a batch: {}",
                panic_message(panic.as_ref())
            );
            // The payload's own drop must not take the thread down before the batcher is told.
            let _ = catch_unwind(AssertUnwindSafe(move || drop(panic)));
            tracing::error!(model = %ctx.model, instance, %reason, "model instance lost");
            // Its callers were answered as the unwinding dropped their responders.
            ctx.deliver(seq, Vec::new());
            let _ = free.blocking_send(WorkerNotice::Lost { instance, reason });
            return;
        }
        // Capacity covers every instance, and each has at most one notice outstanding, so this
        // never waits; an error means the batcher is gone and the next recv ends the loop.
        let _ = free.blocking_send(WorkerNotice::Free(instance, executed));
    }
}

/// The text of a panic payload (`panic!` gives a &str or a String).
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_string()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "non-text panic payload".to_string()
    }
}

struct Waiting {
    /// The request's `compute` child span, open while its batch is assembled, run and split.
    _compute_span: Span,
    requested_outputs: Vec<String>,
    rows: usize,
    queue: Duration,
    responder: Responder,
}

/// Runs one batch and answers its callers; returns its rows and compute time when it succeeded.
fn run_batch(
    executor: &mut dyn ModelExecutor,
    ctx: &WorkerContext,
    instance: usize,
    batch: Batch,
) -> Option<(usize, Duration)> {
    let span = tracing::debug_span!(
        "execute_batch",
        model = %ctx.model,
        instance,
        requests = batch.jobs.len(),
        rows = batch.rows
    );
    let _entered = span.enter();

    let mut inputs = Vec::with_capacity(batch.jobs.len());
    let mut waiting = Vec::with_capacity(batch.jobs.len());
    for job in batch.jobs {
        // The batch is linked to each member; each member gets its own `compute` child. Both are
        // no-ops when no subscriber wants debug spans (tracing off, default log level).
        span.follows_from(&job.span);
        let compute_span = tracing::debug_span!(
            parent: &job.span,
            "compute",
            instance,
            batch_size = batch.rows
        );
        inputs.push(job.inputs);
        waiting.push(Waiting {
            _compute_span: compute_span,
            requested_outputs: job.requested_outputs,
            rows: job.rows,
            queue: job.queue,
            responder: job.responder,
        });
    }
    let output_names = union_of_outputs(&waiting);
    let row_counts: Vec<usize> = waiting.iter().map(|w| w.rows).collect();

    let mut executed = None;
    let replies = match execute(executor, inputs, &output_names, &row_counts, ctx.batched) {
        Ok((per_request, input_time, infer_time, output_time)) => {
            ctx.stats
                .record_execution(batch.rows, input_time, infer_time, output_time);
            executed = Some((batch.rows, input_time + infer_time + output_time));
            waiting
                .into_iter()
                .zip(per_request)
                .map(|(w, outputs)| {
                    let timings = RequestTimings {
                        queue: w.queue,
                        compute_input: input_time,
                        compute_infer: infer_time,
                        compute_output: output_time,
                        batch_size: batch.rows,
                    };
                    let outputs = select_outputs(outputs, &w.requested_outputs);
                    (w.responder, Ok(InferResponse { outputs, timings }))
                })
                .collect()
        }
        Err(error) => {
            tracing::warn!(model = %ctx.model, instance, %error, "batch execution failed");
            waiting
                .into_iter()
                .map(|w| (w.responder, Err(error.clone())))
                .collect()
        }
    };
    ctx.deliver(batch.seq, replies);
    executed
}

type Executed = (Vec<Vec<NamedTensor>>, Duration, Duration, Duration);

/// Assembles, runs and splits one batch, timing each hand-off.
fn execute(
    executor: &mut dyn ModelExecutor,
    inputs: Vec<Vec<NamedTensor>>,
    output_names: &[String],
    row_counts: &[usize],
    batched: bool,
) -> Result<Executed, SchedulerError> {
    let started = StdInstant::now();
    let assembled = concat_rows(inputs)
        .map_err(|e| ExecuteError(format!("failed to assemble the batch: {e}")))?;
    let assembled_at = StdInstant::now();
    // A panic inside the runtime must not take the instance (and every later request) down.
    let outputs = catch_unwind(AssertUnwindSafe(|| {
        executor.execute(assembled, output_names)
    }))
    .map_err(|_| ExecuteError("the model instance panicked while executing".into()))??;
    let executed_at = StdInstant::now();
    let per_request = outputs_per_request(outputs, row_counts, batched)
        .map_err(|e| ExecuteError(format!("failed to split the batch outputs: {e}")))?;
    let split_at = StdInstant::now();
    Ok((
        per_request,
        assembled_at - started,
        executed_at - assembled_at,
        split_at - executed_at,
    ))
}

/// The outputs to ask the executor for: every output (empty) as soon as one request wants all,
/// else the union of what was asked, in first-asked order.
fn union_of_outputs(waiting: &[Waiting]) -> Vec<String> {
    if waiting.iter().any(|w| w.requested_outputs.is_empty()) {
        return Vec::new();
    }
    let mut names: Vec<String> = Vec::new();
    for name in waiting.iter().flat_map(|w| &w.requested_outputs) {
        if !names.contains(name) {
            names.push(name.clone());
        }
    }
    names
}

/// Keeps the outputs one request asked for, in the order it asked; all of them when it named none.
fn select_outputs(outputs: Vec<NamedTensor>, requested: &[String]) -> Vec<NamedTensor> {
    if requested.is_empty() {
        return outputs;
    }
    let mut available: Vec<Option<NamedTensor>> = outputs.into_iter().map(Some).collect();
    requested
        .iter()
        .filter_map(|name| {
            available
                .iter_mut()
                .find(|slot| slot.as_ref().is_some_and(|t| &t.name == name))
                .and_then(Option::take)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn responder(stats: &Arc<ModelStats>) -> (Responder, oneshot::Receiver<Outcome>) {
        let (tx, rx) = oneshot::channel();
        (Responder::new(tx, stats.clone()), rx)
    }

    #[test]
    fn orderer_holds_later_batches_until_earlier_ones_answer() {
        let stats = Arc::new(ModelStats::new("m", "1"));
        let orderer = Orderer::default();
        let (r0, mut rx0) = responder(&stats);
        let (r1, mut rx1) = responder(&stats);
        let (r2, mut rx2) = responder(&stats);
        assert_eq!(stats.pending.load(std::sync::atomic::Ordering::Relaxed), 3);
        orderer.deliver(1, vec![(r1, Err(SchedulerError::TimedOut))]);
        orderer.deliver(2, vec![(r2, Err(SchedulerError::TimedOut))]);
        assert!(rx1.try_recv().is_err(), "batch 1 must wait for batch 0");
        assert!(rx2.try_recv().is_err());
        orderer.deliver(0, vec![(r0, Err(SchedulerError::QueueFull))]);
        assert!(rx0.try_recv().is_ok());
        assert!(rx1.try_recv().is_ok());
        assert!(rx2.try_recv().is_ok());
        assert_eq!(stats.pending.load(std::sync::atomic::Ordering::Relaxed), 0);
    }

    #[test]
    fn a_released_sequence_number_lets_later_batches_through() {
        let stats = Arc::new(ModelStats::new("m", "1"));
        let orderer = Orderer::default();
        let (r1, mut rx1) = responder(&stats);
        orderer.deliver(1, vec![(r1, Err(SchedulerError::TimedOut))]);
        assert!(rx1.try_recv().is_err(), "batch 1 waits for batch 0");
        // Batch 0 panicked: its callers were answered as it unwound; its place is released empty.
        orderer.deliver(0, Vec::new());
        assert!(rx1.try_recv().is_ok());
        // A late delivery for a released place is answered at once, never held forever.
        let (late, mut rx_late) = responder(&stats);
        orderer.deliver(0, vec![(late, Err(SchedulerError::TimedOut))]);
        assert!(rx_late.try_recv().is_ok());
        assert!(orderer.state.lock().held.is_empty());
    }

    #[test]
    fn a_responder_dropped_unanswered_tells_its_caller_why() {
        let stats = Arc::new(ModelStats::new("m", "1"));
        let (r, mut rx) = responder(&stats);
        drop(r);
        match rx.try_recv() {
            Ok(Err(SchedulerError::Execute(e))) => assert!(e.0.contains("model instance failed")),
            other => panic!("expected an execution error, got {other:?}"),
        }
        assert_eq!(stats.pending.load(std::sync::atomic::Ordering::Relaxed), 0);
    }

    #[test]
    fn outputs_are_filtered_in_requested_order() {
        use crate::tensor::{DataType, Tensor, TensorData};
        let t = |name: &str| NamedTensor {
            name: name.into(),
            tensor: Tensor::new(
                name,
                DataType::Uint8,
                vec![1],
                TensorData::Fixed(vec![0].into()),
            )
            .unwrap(),
        };
        let picked = select_outputs(vec![t("a"), t("b"), t("c")], &["c".into(), "a".into()]);
        let names: Vec<&str> = picked.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, vec!["c", "a"]);
        assert_eq!(select_outputs(vec![t("a"), t("b")], &[]).len(), 2);
    }
}
