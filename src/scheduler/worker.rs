//! Running one batch on a model instance: assemble, run, split the outputs, answer every caller.
//! The instance threads that call this (see `actor::instance`) own their executor, so there is no
//! lock around a session. Nothing here runs on the tokio reactor.
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant as StdInstant};

use parking_lot::Mutex;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::Span;

use super::policy::Batchable;
use super::{ExecuteError, InferResponse, ModelExecutor, RequestTimings, SchedulerError};
use crate::telemetry::stats::ModelStats;
use crate::tensor::batch::outputs_per_request;
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

/// A request from admission to its answer: queued in the policy, then carried in a batch.
#[derive(Debug)]
pub(crate) struct Job {
    pub inputs: Vec<NamedTensor>,
    pub requested_outputs: Vec<String>,
    pub rows: usize,
    pub span: Span,
    /// The request's `queue` child span, closed when its batch starts.
    pub queue_span: Span,
    pub enqueued: Instant,
    pub responder: Responder,
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

/// One execution's worth of requests, in the order their outputs are split.
#[derive(Debug)]
pub(crate) struct Batch {
    /// Dispatch order, used when responses must keep it.
    pub seq: u64,
    pub rows: usize,
    /// When the batch left the queue: each job's `queue` time ends here.
    pub dispatched: Instant,
    pub jobs: Vec<Job>,
}

impl Batch {
    /// Splits it into its first half of requests and the rest, both keeping its place in the
    /// answer order and its dispatch time.
    pub(crate) fn halve(mut self) -> (Batch, Batch) {
        let rest = self.jobs.split_off(self.jobs.len() / 2);
        let rest_rows: usize = rest.iter().map(|job| job.rows).sum();
        let rest = Batch {
            seq: self.seq,
            rows: rest_rows,
            dispatched: self.dispatched,
            jobs: rest,
        };
        self.rows -= rest_rows;
        (self, rest)
    }
}

/// What one successful execution cost its instance, for the policy to learn from.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BatchCost {
    pub rows: usize,
    /// From the start of assembly to the outputs split per request.
    pub took: Duration,
}

/// What running one batch left behind.
#[derive(Debug, Default)]
pub(crate) struct Ran {
    /// Its cost, when it ran (a failed execution has none).
    pub cost: Option<BatchCost>,
    /// The half of its answers held back for a later reactor turn, when it was split.
    pub later: Option<LaterAnswers>,
}

/// Answers held back one reactor turn (see `answer_split`). Dropping them sends them, so whoever
/// holds them (the task that waits the turn, or that task dropped unrun as the runtime stops),
/// every caller gets its own outcome.
#[derive(Debug)]
pub(crate) struct LaterAnswers(Vec<(Responder, Outcome)>);

impl Drop for LaterAnswers {
    fn drop(&mut self) {
        for (responder, outcome) in self.0.drain(..) {
            responder.send(outcome);
        }
    }
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
    /// Hands the first `first` replies to their callers and returns the rest; all of them, and
    /// None, when `first` is None or the model preserves ordering (a held-back half would let the
    /// next batch's answers overtake it).
    pub(crate) fn deliver_first<I>(
        &self,
        seq: u64,
        replies: I,
        first: Option<usize>,
    ) -> Option<LaterAnswers>
    where
        I: IntoIterator<Item = (Responder, Outcome)>,
    {
        match first.filter(|_| self.orderer.is_none()) {
            Some(first) => {
                let mut now: Vec<_> = replies.into_iter().collect();
                let later = LaterAnswers(now.split_off(first.min(now.len())));
                self.deliver(seq, now);
                Some(later)
            }
            None => {
                self.deliver(seq, replies);
                None
            }
        }
    }

    /// Hands each reply to its caller, in dispatch order when the model preserves ordering. Without
    /// ordering the replies are sent as they come, never collected.
    pub(crate) fn deliver<I>(&self, seq: u64, replies: I)
    where
        I: IntoIterator<Item = (Responder, Outcome)>,
    {
        match &self.orderer {
            Some(orderer) => orderer.deliver(seq, replies.into_iter().collect()),
            None => {
                for (responder, outcome) in replies {
                    responder.send(outcome);
                }
            }
        }
    }
}

/// The text of a panic payload (`panic!` gives a &str or a String).
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
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
    queue: Duration,
    responder: Responder,
}

/// Runs one batch and answers its callers; returns its cost when it ran. With `first_half`, it
/// answers that many callers now and returns the rest (`answer_split`), unless its model keeps
/// the answer order. A panic outside the executor's own call (assembly and splitting are guarded
/// there too) unwinds out of here: the callers are answered as their responders drop, and the
/// caller of this function decides the instance's fate.
pub(crate) fn run_batch(
    executor: &mut dyn ModelExecutor,
    ctx: &WorkerContext,
    instance: usize,
    batch: Batch,
    first_half: Option<usize>,
) -> Ran {
    let span = tracing::debug_span!(
        "execute_batch",
        model = %ctx.model,
        instance,
        requests = batch.jobs.len(),
        rows = batch.rows
    );
    let _entered = span.enter();

    let mut inputs = Vec::with_capacity(batch.jobs.len());
    let mut row_counts = Vec::with_capacity(batch.jobs.len());
    let mut waiting = Vec::with_capacity(batch.jobs.len());
    for job in batch.jobs {
        // The wait ends as the batch starts. The batch is linked to each member; each member gets
        // its own `compute` child. All are no-ops when no subscriber wants debug spans.
        drop(job.queue_span);
        span.follows_from(&job.span);
        let compute_span = tracing::debug_span!(
            parent: &job.span,
            "compute",
            instance,
            batch_size = batch.rows
        );
        inputs.push(job.inputs);
        row_counts.push(job.rows);
        waiting.push(Waiting {
            _compute_span: compute_span,
            requested_outputs: job.requested_outputs,
            queue: batch.dispatched.saturating_duration_since(job.enqueued),
            responder: job.responder,
        });
    }
    let executed = {
        let output_names = outputs_to_compute(&waiting);
        execute(executor, inputs, &output_names, &row_counts, ctx.batched)
    };
    match executed {
        Ok(done) => {
            let t = done.timings;
            ctx.stats
                .record_execution(batch.rows, t.input, t.infer, t.output);
            let replies = waiting
                .into_iter()
                .zip(done.per_request)
                .map(|(w, outputs)| {
                    let timings = RequestTimings {
                        queue: w.queue,
                        compute_input: t.input,
                        compute_infer: t.infer,
                        compute_output: t.output,
                        batch_size: batch.rows,
                    };
                    let outputs = select_outputs(outputs, &w.requested_outputs);
                    (w.responder, Ok(InferResponse { outputs, timings }))
                });
            let later = ctx.deliver_first(batch.seq, replies, first_half);
            if later.is_some() {
                ctx.stats
                    .batches_answered_in_halves
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            let cost = BatchCost {
                rows: batch.rows,
                took: t.input + t.infer + t.output,
            };
            Ran {
                cost: Some(cost),
                later,
            }
        }
        Err(error) => {
            tracing::warn!(model = %ctx.model, instance, %error, "batch execution failed");
            let replies = waiting
                .into_iter()
                .map(|w| (w.responder, Err(error.clone())));
            ctx.deliver(batch.seq, replies);
            Ran::default()
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct PhaseTimes {
    input: Duration,
    infer: Duration,
    output: Duration,
}

struct Executed {
    per_request: Vec<Vec<NamedTensor>>,
    timings: PhaseTimes,
}

/// Assembles and runs one batch through the executor, then splits it, timing each hand-off.
fn execute(
    executor: &mut dyn ModelExecutor,
    inputs: Vec<Vec<NamedTensor>>,
    output_names: &[String],
    row_counts: &[usize],
    batched: bool,
) -> Result<Executed, SchedulerError> {
    let started = StdInstant::now();
    // A panic inside the runtime must not take the instance (and every later request) down.
    let run = catch_unwind(AssertUnwindSafe(|| {
        executor.execute_batch(inputs, output_names)
    }))
    .map_err(|_| ExecuteError("the model instance panicked while executing".into()))??;
    let executed_at = StdInstant::now();
    let per_request = outputs_per_request(run.outputs, row_counts, batched)
        .map_err(|e| ExecuteError(format!("failed to split the batch outputs: {e}")))?;
    let split_at = StdInstant::now();
    let call = executed_at - started;
    Ok(Executed {
        per_request,
        timings: PhaseTimes {
            input: run.assembly.min(call),
            infer: call.saturating_sub(run.assembly),
            output: split_at - executed_at,
        },
    })
}

/// The outputs to ask the executor for: every output (empty) as soon as one request wants all; the
/// list the requests share when they all ask the same (no copy); else the union of what was asked,
/// in first-asked order.
fn outputs_to_compute(waiting: &[Waiting]) -> Cow<'_, [String]> {
    let Some(first) = waiting.first() else {
        return Cow::Borrowed(&[]);
    };
    if waiting.iter().any(|w| w.requested_outputs.is_empty()) {
        return Cow::Borrowed(&[]);
    }
    if waiting
        .iter()
        .all(|w| w.requested_outputs == first.requested_outputs)
    {
        return Cow::Borrowed(&first.requested_outputs);
    }
    let mut names: Vec<String> = Vec::new();
    for name in waiting.iter().flat_map(|w| &w.requested_outputs) {
        if !names.contains(name) {
            names.push(name.clone());
        }
    }
    Cow::Owned(names)
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

    /// Answers with its inputs, as its outputs.
    struct Echo;

    impl ModelExecutor for Echo {
        fn execute(
            &mut self,
            inputs: Vec<NamedTensor>,
            _outputs: &[String],
        ) -> Result<Vec<NamedTensor>, ExecuteError> {
            Ok(inputs)
        }
    }

    fn row(value: u8) -> NamedTensor {
        use crate::tensor::{DataType, Tensor, TensorData};
        NamedTensor {
            name: "IN".into(),
            tensor: Tensor::new(
                "IN",
                DataType::Uint8,
                vec![1, 1],
                TensorData::Fixed(vec![value].into()),
            )
            .unwrap(),
        }
    }

    /// A batch of `requests` one-row requests whose input is their index, and their answers.
    fn batch_of(stats: &Arc<ModelStats>, requests: u8) -> (Batch, Vec<oneshot::Receiver<Outcome>>) {
        let now = Instant::now();
        let (jobs, answers) = (0..requests)
            .map(|i| {
                let (responder, rx) = responder(stats);
                let job = Job {
                    inputs: vec![row(i)],
                    requested_outputs: Vec::new(),
                    rows: 1,
                    span: Span::none(),
                    queue_span: Span::none(),
                    enqueued: now,
                    responder,
                };
                (job, rx)
            })
            .unzip();
        let batch = Batch {
            seq: 0,
            rows: usize::from(requests),
            dispatched: now,
            jobs,
        };
        (batch, answers)
    }

    fn context(stats: &Arc<ModelStats>, preserve_ordering: bool) -> WorkerContext {
        WorkerContext {
            model: "m".into(),
            stats: stats.clone(),
            orderer: preserve_ordering.then(|| Arc::new(Orderer::default())),
            batched: true,
        }
    }

    /// The input each answer echoed, None for a caller not answered yet.
    fn echoed(answers: &mut [oneshot::Receiver<Outcome>]) -> Vec<Option<u8>> {
        answers
            .iter_mut()
            .map(|rx| {
                let answer = rx.try_recv().ok()?.expect("an answer");
                match &answer.outputs[0].tensor.data {
                    crate::tensor::TensorData::Fixed(bytes) => Some(bytes[0]),
                    other => panic!("unexpected data {other:?}"),
                }
            })
            .collect()
    }

    #[tokio::test]
    async fn a_split_batch_answers_its_first_half_now_and_the_rest_when_released() {
        let stats = Arc::new(ModelStats::new("m", "1"));
        let (batch, mut answers) = batch_of(&stats, 9);
        let ran = run_batch(&mut Echo, &context(&stats, false), 0, batch, Some(4));
        assert_eq!(ran.cost.map(|c| c.rows), Some(9));
        let later = ran.later.expect("nine requests are split");
        let now = echoed(&mut answers);
        assert_eq!(now[..4], [Some(0), Some(1), Some(2), Some(3)]);
        assert!(now[4..].iter().all(Option::is_none), "{now:?}");
        assert_eq!(stats.pending.load(std::sync::atomic::Ordering::Relaxed), 5);
        drop(later);
        let rest = echoed(&mut answers[4..]);
        assert_eq!(rest, [Some(4), Some(5), Some(6), Some(7), Some(8)]);
        assert_eq!(stats.pending.load(std::sync::atomic::Ordering::Relaxed), 0);
        let split = stats
            .batches_answered_in_halves
            .load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(split, 1);
    }

    #[tokio::test]
    async fn ordered_models_and_unsplit_runs_answer_everyone_at_once() {
        let stats = Arc::new(ModelStats::new("m", "1"));
        for preserve_ordering in [true, false] {
            let requests = 8;
            let (batch, mut answers) = batch_of(&stats, requests);
            let ctx = context(&stats, preserve_ordering);
            let first_half = preserve_ordering.then_some(4);
            let ran = run_batch(&mut Echo, &ctx, 0, batch, first_half);
            assert!(ran.later.is_none(), "{preserve_ordering}");
            let all = echoed(&mut answers);
            assert_eq!(all, (0..requests).map(Some).collect::<Vec<_>>());
        }
        let split = stats
            .batches_answered_in_halves
            .load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(split, 0);
    }

    fn waiting(stats: &Arc<ModelStats>, requested: &[&str]) -> Waiting {
        Waiting {
            _compute_span: Span::none(),
            requested_outputs: requested.iter().map(|s| s.to_string()).collect(),
            queue: Duration::ZERO,
            responder: responder(stats).0,
        }
    }

    #[test]
    fn outputs_to_compute_borrows_unless_the_requests_differ() {
        let stats = Arc::new(ModelStats::new("m", "1"));
        let all = [waiting(&stats, &["b"]), waiting(&stats, &[])];
        assert!(matches!(outputs_to_compute(&all), Cow::Borrowed(names) if names.is_empty()));
        let same = [waiting(&stats, &["b", "a"]), waiting(&stats, &["b", "a"])];
        assert!(matches!(outputs_to_compute(&same), Cow::Borrowed(names) if names == ["b", "a"]));
        let differ = [waiting(&stats, &["b"]), waiting(&stats, &["a", "b"])];
        assert!(matches!(outputs_to_compute(&differ), Cow::Owned(names) if names == ["b", "a"]));
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
