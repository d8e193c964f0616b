//! Scheduler tests with a fake executor (no ONNX Runtime). Instances that must be held busy wait on
//! a gate the test opens; nothing waits on wall-clock sleeps.
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::mpsc as tokio_mpsc;
use tracing::Span;

use super::*;
use crate::proto::model_config::SchedulingChoice;
use crate::proto::model_queue_policy::TimeoutAction as ProtoTimeoutAction;
use crate::proto::{ModelConfig, ModelDynamicBatching, ModelInstanceGroup, ModelQueuePolicy};
use crate::telemetry::stats::FailureReason;
use crate::tensor::NamedTensor;
use crate::tensor::{DataType, Tensor, TensorData};

/// Adds 1 ("OUT") and doubles ("DOUBLE") an FP32 input "IN"; records what each execution saw.
struct Fake {
    executions: Arc<Mutex<Vec<Vec<f32>>>>,
    started: Option<tokio_mpsc::UnboundedSender<usize>>,
    gate: Option<std::sync::mpsc::Receiver<()>>,
    barrier: Option<Arc<Barrier>>,
    fail: bool,
}

impl ModelExecutor for Fake {
    fn execute(
        &mut self,
        inputs: Vec<NamedTensor>,
        outputs: &[String],
    ) -> Result<Vec<NamedTensor>, ExecuteError> {
        let input = inputs
            .iter()
            .find(|t| t.name == "IN")
            .ok_or_else(|| ExecuteError("no IN".into()))?;
        let values = fp32_values(&input.tensor);
        self.executions.lock().push(values.clone());
        if let Some(started) = &self.started {
            let _ = started.send(input.tensor.batch_rows());
        }
        if let Some(gate) = &self.gate {
            let _ = gate.recv();
        }
        if let Some(barrier) = &self.barrier {
            barrier.wait();
        }
        if self.fail {
            return Err(ExecuteError("boom".into()));
        }
        let shape = input.tensor.shape.clone();
        let plus_one: Vec<f32> = values.iter().map(|v| v + 1.0).collect();
        let doubled: Vec<f32> = values.iter().map(|v| v * 2.0).collect();
        let mut out = Vec::new();
        for (name, data) in [("OUT", plus_one), ("DOUBLE", doubled)] {
            if outputs.is_empty() || outputs.iter().any(|o| o == name) {
                out.push(fp32(name, shape.clone(), &data));
            }
        }
        Ok(out)
    }
}

struct Harness {
    executions: Arc<Mutex<Vec<Vec<f32>>>>,
    started: tokio_mpsc::UnboundedReceiver<usize>,
    gates: Vec<std::sync::mpsc::Sender<()>>,
    stats: Arc<ModelStats>,
    scheduler: Arc<Scheduler>,
}

#[derive(Clone, Copy, PartialEq)]
enum Gate {
    Open,
    Closed,
}

fn fp32(name: &str, shape: Vec<i64>, values: &[f32]) -> NamedTensor {
    let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    NamedTensor {
        name: name.into(),
        tensor: Tensor::new(
            name,
            DataType::Fp32,
            shape,
            TensorData::Fixed(Bytes::from(raw)),
        )
        .unwrap(),
    }
}

fn fp32_values(t: &Tensor) -> Vec<f32> {
    match &t.data {
        TensorData::Fixed(raw) => raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        TensorData::Strings(_) => panic!("not FP32"),
    }
}

/// A request of `rows` rows of two values each, starting at `first`.
fn request(first: f32, rows: usize) -> InferRequest {
    let values: Vec<f32> = (0..rows * 2).map(|i| first + i as f32).collect();
    InferRequest {
        id: format!("r{first}"),
        inputs: vec![fp32("IN", vec![rows as i64, 2], &values)],
        requested_outputs: Vec::new(),
        priority: 0,
        timeout: None,
        span: Span::none(),
    }
}

fn with_priority(mut r: InferRequest, priority: u32) -> InferRequest {
    r.priority = priority;
    r
}

/// Dynamic batching whose queue holds one request.
fn queue_of_one() -> ModelDynamicBatching {
    ModelDynamicBatching {
        default_queue_policy: Some(ModelQueuePolicy {
            max_queue_size: 1,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Dynamic batching whose queue policy rejects a request that waited `timeout` µs.
fn rejecting_after_microseconds(timeout: u64) -> ModelDynamicBatching {
    ModelDynamicBatching {
        default_queue_policy: Some(ModelQueuePolicy {
            timeout_action: ProtoTimeoutAction::Reject as i32,
            default_timeout_microseconds: timeout,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn batching_config(max_batch_size: i32, db: ModelDynamicBatching, instances: i32) -> ModelConfig {
    ModelConfig {
        name: "fake".into(),
        max_batch_size,
        scheduling_choice: Some(SchedulingChoice::DynamicBatching(db)),
        instance_group: vec![ModelInstanceGroup {
            count: instances,
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn start(config: ModelConfig, gate: Gate) -> Harness {
    start_with(config, gate, None, false)
}

fn start_with(
    config: ModelConfig,
    gate: Gate,
    barrier: Option<Arc<Barrier>>,
    fail: bool,
) -> Harness {
    let settings = SchedulerSettings::from_config(&config, 100).unwrap();
    let executions = Arc::new(Mutex::new(Vec::new()));
    let (started_tx, started) = tokio_mpsc::unbounded_channel();
    let mut gates = Vec::new();
    let executors: Vec<Box<dyn ModelExecutor>> = settings
        .instances
        .iter()
        .map(|_| {
            let gate_rx = (gate == Gate::Closed).then(|| {
                let (tx, rx) = std::sync::mpsc::channel();
                gates.push(tx);
                rx
            });
            Box::new(Fake {
                executions: executions.clone(),
                started: Some(started_tx.clone()),
                gate: gate_rx,
                barrier: barrier.clone(),
                fail,
            }) as Box<dyn ModelExecutor>
        })
        .collect();
    let stats = Arc::new(ModelStats::new("fake", "1"));
    let scheduler = Arc::new(Scheduler::start(settings, executors, stats.clone()));
    Harness {
        executions,
        started,
        gates,
        stats,
        scheduler,
    }
}

impl Harness {
    /// Lets `n` executions through, on any instance.
    fn open(&self, n: usize) {
        for _ in 0..n {
            for gate in &self.gates {
                let _ = gate.send(());
            }
        }
    }

    fn first_values(&self) -> Vec<f32> {
        self.executions.lock().iter().map(|e| e[0]).collect()
    }

    /// A request that has been admitted (its first poll ran) and is waiting for its answer.
    async fn admitted(
        &self,
        req: InferRequest,
    ) -> tokio::task::JoinHandle<Result<InferResponse, SchedulerError>> {
        let scheduler = self.scheduler.clone();
        let mut fut = Box::pin(async move { scheduler.infer(req).await });
        assert!(
            futures::poll!(&mut fut).is_pending(),
            "request answered at once"
        );
        tokio::spawn(fut)
    }
}

fn out_values(resp: &InferResponse, name: &str) -> Vec<f32> {
    let t = resp
        .outputs
        .iter()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no output {name}"));
    fp32_values(&t.tensor)
}

#[tokio::test(start_paused = true)]
async fn concurrent_requests_inside_the_delay_window_share_one_execution() {
    let db = ModelDynamicBatching {
        max_queue_delay_microseconds: 10_000,
        ..Default::default()
    };
    let h = start(batching_config(8, db, 1), Gate::Open);
    let s = &h.scheduler;
    let (a, b, c) = tokio::join!(
        s.infer(request(0.0, 1)),
        s.infer(request(100.0, 2)),
        s.infer(request(200.0, 3))
    );
    let (a, b, c) = (a.unwrap(), b.unwrap(), c.unwrap());
    assert_eq!(h.executions.lock().len(), 1, "one execution for all three");
    assert_eq!(h.executions.lock()[0].len(), 12, "6 rows of 2 values");
    // Each response is what the request alone would have produced.
    assert_eq!(out_values(&a, "OUT"), vec![1.0, 2.0]);
    assert_eq!(out_values(&b, "OUT"), vec![101.0, 102.0, 103.0, 104.0]);
    assert_eq!(
        out_values(&c, "DOUBLE"),
        (200..206).map(|v| v as f32 * 2.0).collect::<Vec<_>>()
    );
    assert_eq!(b.outputs[0].tensor.shape, vec![2, 2]);
    assert_eq!(a.timings.batch_size, 6);
    assert_eq!(h.stats.execution_count.load(Relaxed), 1);
    assert_eq!(h.stats.batch_table()[0].0, 6);
    h.scheduler.shutdown().await;
}

#[tokio::test]
async fn each_response_matches_its_own_request_and_requested_outputs() {
    let db = ModelDynamicBatching {
        max_queue_delay_microseconds: 1_000_000_000,
        preferred_batch_size: vec![4],
        ..Default::default()
    };
    let h = start(batching_config(8, db, 1), Gate::Open);
    let s = &h.scheduler;
    let mut only_double = request(10.0, 1);
    only_double.requested_outputs = vec!["DOUBLE".into()];
    // Four rows reach the preferred size, so they go at once despite the long window.
    let (a, b, c) = tokio::join!(
        s.infer(request(0.0, 2)),
        s.infer(only_double),
        s.infer(request(20.0, 1))
    );
    let (a, b, c) = (a.unwrap(), b.unwrap(), c.unwrap());
    assert_eq!(h.executions.lock().len(), 1);
    assert_eq!(out_values(&a, "OUT"), vec![1.0, 2.0, 3.0, 4.0]);
    assert_eq!(b.outputs.len(), 1, "only the requested output");
    assert_eq!(out_values(&b, "DOUBLE"), vec![20.0, 22.0]);
    assert_eq!(c.outputs.len(), 2);
    assert_eq!(out_values(&c, "OUT"), vec![21.0, 22.0]);
    h.scheduler.shutdown().await;
}

#[tokio::test]
async fn full_queue_refuses_at_once() {
    let db = queue_of_one();
    let mut h = start(batching_config(1, db, 1), Gate::Closed);
    let running = h.admitted(request(0.0, 1)).await;
    assert_eq!(h.started.recv().await, Some(1));
    let queued = h.admitted(request(1.0, 1)).await;
    let refused = h.scheduler.infer(request(2.0, 1)).await;
    assert!(
        matches!(refused, Err(SchedulerError::QueueFull)),
        "{refused:?}"
    );
    h.open(2);
    assert!(running.await.unwrap().is_ok());
    assert!(queued.await.unwrap().is_ok());
    // The place is free again.
    h.open(1);
    assert!(h.scheduler.infer(request(3.0, 1)).await.is_ok());
    h.scheduler.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn queued_request_past_its_timeout_is_rejected() {
    let db = rejecting_after_microseconds(1_000);
    let mut h = start(batching_config(1, db, 1), Gate::Closed);
    let running = h.admitted(request(0.0, 1)).await;
    assert_eq!(h.started.recv().await, Some(1));
    // The instance is held busy; the paused clock runs to the queued request's deadline.
    let timed_out = h.scheduler.infer(request(1.0, 1)).await;
    assert!(
        matches!(timed_out, Err(SchedulerError::TimedOut)),
        "{timed_out:?}"
    );
    h.open(1);
    assert!(running.await.unwrap().is_ok());
    assert_eq!(
        h.first_values(),
        vec![0.0],
        "the timed-out request never ran"
    );
    h.scheduler.shutdown().await;
}

#[tokio::test]
async fn higher_priority_runs_first() {
    let db = ModelDynamicBatching {
        priority_levels: 2,
        default_priority_level: 2,
        ..Default::default()
    };
    let mut h = start(batching_config(1, db, 1), Gate::Closed);
    let first = h.admitted(request(0.0, 1)).await;
    assert_eq!(h.started.recv().await, Some(1));
    let low = h.admitted(with_priority(request(1.0, 1), 2)).await;
    let default_level = h.admitted(request(2.0, 1)).await;
    let high = h.admitted(with_priority(request(3.0, 1), 1)).await;
    h.open(4);
    for task in [first, low, default_level, high] {
        assert!(task.await.unwrap().is_ok());
    }
    assert_eq!(h.first_values(), vec![0.0, 3.0, 1.0, 2.0]);
    h.scheduler.shutdown().await;
}

/// One request running behind a closed gate, a second whose caller leaves while it queues, and a
/// third queued after that; opens the gate `opens` times and checks that the first and third ran,
/// the second never did, and it counts as cancelled.
async fn run_past_an_abandoned_request(db: ModelDynamicBatching, opens: usize) -> Harness {
    let mut h = start(batching_config(1, db, 1), Gate::Closed);
    let running = h.admitted(request(0.0, 1)).await;
    assert_eq!(h.started.recv().await, Some(1));
    let abandoned = h.admitted(request(1.0, 1)).await;
    abandoned.abort();
    let _ = abandoned.await;
    let kept = h.admitted(request(2.0, 1)).await;
    h.open(opens);
    assert!(running.await.unwrap().is_ok());
    assert!(kept.await.unwrap().is_ok());
    assert_eq!(h.first_values(), vec![0.0, 2.0]);
    assert_eq!(h.stats.failure(FailureReason::Canceled).count(), 1);
    h
}

#[tokio::test]
async fn request_whose_caller_left_is_dropped_before_it_runs() {
    let h = run_past_an_abandoned_request(ModelDynamicBatching::default(), 3).await;
    h.scheduler.shutdown().await;
    assert_eq!(h.stats.pending.load(Relaxed), 0);
}

#[tokio::test]
async fn a_caller_leaving_frees_its_queue_place_at_once() {
    let db = ModelDynamicBatching {
        // The request waits for a window longer than any test: only its withdrawal can free it.
        max_queue_delay_microseconds: 3_600_000_000,
        preferred_batch_size: vec![4],
        default_queue_policy: Some(ModelQueuePolicy {
            max_queue_size: 1,
            ..Default::default()
        }),
        ..Default::default()
    };
    let h = start(batching_config(4, db, 1), Gate::Open);
    let abandoned = h.admitted(request(0.0, 1)).await;
    abandoned.abort();
    let _ = abandoned.await;
    // The batcher hears of the withdrawal by itself; no refused request is needed to trigger it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while h.stats.failure(FailureReason::Canceled).count() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "never withdrawn");
        tokio::task::yield_now().await;
    }
    let full_batch = h.scheduler.infer(request(10.0, 4)).await;
    assert!(full_batch.is_ok(), "{full_batch:?}");
    assert_eq!(
        h.first_values(),
        vec![10.0],
        "the abandoned request never ran"
    );
    h.scheduler.shutdown().await;
    assert_eq!(h.stats.pending.load(Relaxed), 0);
}

#[tokio::test]
async fn shutdown_refuses_new_requests_and_drains_queued_ones() {
    let db = ModelDynamicBatching {
        // A window longer than any test: draining must not wait for it.
        max_queue_delay_microseconds: 3_600_000_000,
        ..Default::default()
    };
    let mut h = start(batching_config(8, db, 1), Gate::Closed);
    let running = h.admitted(request(0.0, 8)).await;
    assert_eq!(h.started.recv().await, Some(8));
    let queued_a = h.admitted(request(100.0, 1)).await;
    let queued_b = h.admitted(request(200.0, 1)).await;

    let scheduler = h.scheduler.clone();
    let mut shutdown = Box::pin(async move { scheduler.shutdown().await });
    assert!(futures::poll!(&mut shutdown).is_pending());
    let refused = h.scheduler.infer(request(300.0, 1)).await;
    assert!(
        matches!(refused, Err(SchedulerError::ShuttingDown)),
        "{refused:?}"
    );

    h.open(2);
    let shutdown = tokio::spawn(shutdown);
    assert!(running.await.unwrap().is_ok());
    assert_eq!(
        out_values(&queued_a.await.unwrap().unwrap(), "OUT")[0],
        101.0
    );
    assert_eq!(
        out_values(&queued_b.await.unwrap().unwrap(), "OUT")[0],
        201.0
    );
    shutdown.await.unwrap();
    assert_eq!(
        h.executions.lock().len(),
        2,
        "both queued requests ran as one batch"
    );
    // Shutting down twice is harmless.
    h.scheduler.shutdown().await;
}

#[tokio::test]
async fn instances_run_batches_in_parallel() {
    // Each execution waits at a barrier for the other: this finishes only if both run at once.
    let config = ModelConfig {
        name: "fake".into(),
        max_batch_size: 4,
        instance_group: vec![ModelInstanceGroup {
            count: 2,
            ..Default::default()
        }],
        ..Default::default()
    };
    let h = start_with(config, Gate::Open, Some(Arc::new(Barrier::new(2))), false);
    let s = &h.scheduler;
    let both = async { tokio::join!(s.infer(request(0.0, 1)), s.infer(request(10.0, 1))) };
    let (a, b) = tokio::time::timeout(Duration::from_secs(60), both)
        .await
        .expect("the two instances did not run concurrently");
    assert!(a.is_ok() && b.is_ok());
    assert_eq!(h.executions.lock().len(), 2);
    h.scheduler.shutdown().await;
}

#[tokio::test]
async fn preserve_ordering_answers_in_dispatch_order_across_instances() {
    let db = ModelDynamicBatching {
        preserve_ordering: true,
        ..Default::default()
    };
    let mut h = start(batching_config(1, db, 2), Gate::Closed);
    let first = h.admitted(request(0.0, 1)).await;
    let scheduler = h.scheduler.clone();
    let mut second = Box::pin(async move { scheduler.infer(request(1.0, 1)).await });
    assert!(futures::poll!(&mut second).is_pending());
    assert_eq!(h.started.recv().await, Some(1));
    assert_eq!(h.started.recv().await, Some(1));
    // The first runs on instance 0, the second on instance 1. Let instance 1 finish, and prove
    // it has answered (or held its answer) by seeing it take the next request.
    h.gates[1].send(()).unwrap();
    let third = h.admitted(request(2.0, 1)).await;
    assert_eq!(h.started.recv().await, Some(1));
    assert!(
        futures::poll!(&mut second).is_pending(),
        "the second answer overtook the first"
    );
    h.gates[0].send(()).unwrap();
    assert!(first.await.unwrap().is_ok());
    assert_eq!(out_values(&second.await.unwrap(), "OUT"), vec![2.0, 3.0]);
    h.gates[1].send(()).unwrap();
    assert!(third.await.unwrap().is_ok());
    h.scheduler.shutdown().await;
}

#[tokio::test]
async fn without_preserve_ordering_a_fast_instance_answers_first() {
    let mut h = start(
        batching_config(1, ModelDynamicBatching::default(), 2),
        Gate::Closed,
    );
    let first = h.admitted(request(0.0, 1)).await;
    let second = h.admitted(request(1.0, 1)).await;
    assert_eq!(h.started.recv().await, Some(1));
    assert_eq!(h.started.recv().await, Some(1));
    h.gates[1].send(()).unwrap();
    assert!(second.await.unwrap().is_ok());
    assert!(!first.is_finished());
    h.gates[0].send(()).unwrap();
    assert!(first.await.unwrap().is_ok());
    h.scheduler.shutdown().await;
}

#[tokio::test]
async fn execution_failure_answers_every_request_of_the_batch() {
    let db = ModelDynamicBatching {
        preferred_batch_size: vec![2],
        max_queue_delay_microseconds: 3_600_000_000,
        ..Default::default()
    };
    let h = start_with(batching_config(4, db, 1), Gate::Open, None, true);
    let s = &h.scheduler;
    let (a, b) = tokio::join!(s.infer(request(0.0, 1)), s.infer(request(1.0, 1)));
    for r in [a, b] {
        match r {
            Err(SchedulerError::Execute(e)) => assert_eq!(e.0, "boom"),
            other => panic!("expected an execution error, got {other:?}"),
        }
    }
    assert_eq!(h.stats.execution_count.load(Relaxed), 0);
    h.scheduler.shutdown().await;
}

#[tokio::test]
async fn batch_size_beyond_max_is_refused_before_queueing() {
    let h = start(
        batching_config(4, ModelDynamicBatching::default(), 1),
        Gate::Open,
    );
    let r = h.scheduler.infer(request(0.0, 5)).await;
    assert!(matches!(r, Err(SchedulerError::InvalidRequest(_))), "{r:?}");
    assert!(h.executions.lock().is_empty());
    h.scheduler.shutdown().await;
}

#[tokio::test]
async fn without_dynamic_batching_requests_run_one_by_one() {
    let config = ModelConfig {
        name: "fake".into(),
        max_batch_size: 8,
        ..Default::default()
    };
    let h = start(config, Gate::Open);
    let s = &h.scheduler;
    let (a, b, c) = tokio::join!(
        s.infer(request(0.0, 2)),
        s.infer(request(10.0, 1)),
        s.infer(request(20.0, 1))
    );
    assert!(a.is_ok() && b.is_ok() && c.is_ok());
    assert_eq!(h.first_values(), vec![0.0, 10.0, 20.0]);
    assert_eq!(a.unwrap().timings.batch_size, 2);
    h.scheduler.shutdown().await;
}

#[tokio::test]
async fn instance_threads_are_named_after_the_model() {
    struct ThreadName(Arc<Mutex<Option<String>>>);
    impl ModelExecutor for ThreadName {
        fn execute(
            &mut self,
            inputs: Vec<NamedTensor>,
            _outputs: &[String],
        ) -> Result<Vec<NamedTensor>, ExecuteError> {
            *self.0.lock() = std::thread::current().name().map(str::to_string);
            Ok(inputs)
        }
    }
    let seen = Arc::new(Mutex::new(None));
    let config = ModelConfig {
        name: "fake".into(),
        ..Default::default()
    };
    let settings = SchedulerSettings::from_config(&config, 10).unwrap();
    let stats = Arc::new(ModelStats::new("fake", "1"));
    let s = Scheduler::start(settings, vec![Box::new(ThreadName(seen.clone()))], stats);
    let mut r = request(0.0, 1);
    r.inputs[0].tensor.shape = vec![2];
    s.infer(r).await.unwrap();
    assert_eq!(seen.lock().as_deref(), Some("fake-inst-0"));
    s.shutdown().await;
}

#[tokio::test]
async fn no_instances_means_every_request_fails_instead_of_waiting() {
    let config = batching_config(4, ModelDynamicBatching::default(), 1);
    let settings = SchedulerSettings::from_config(&config, 10).unwrap();
    let s = Scheduler::start(settings, Vec::new(), Arc::new(ModelStats::new("fake", "1")));
    let r = s.infer(request(0.0, 1)).await;
    assert!(matches!(r, Err(SchedulerError::Execute(_))), "{r:?}");
    s.shutdown().await;
}

/// A panic payload whose own drop panics: the executor's panic is caught where `execute` is
/// called, and dropping the payload there panics again, outside the executor, in the worker's
/// batch code. That is the path a bug in assembly, splitting or answering takes.
struct PanicsWhenDropped;

impl Drop for PanicsWhenDropped {
    fn drop(&mut self) {
        panic!("invariant broken while handling the batch");
    }
}

/// Panics on its first execution (as `mode` says), answers normally afterwards.
struct Panicking {
    outside_execute: bool,
    runs: usize,
}

impl ModelExecutor for Panicking {
    fn execute(
        &mut self,
        inputs: Vec<NamedTensor>,
        _outputs: &[String],
    ) -> Result<Vec<NamedTensor>, ExecuteError> {
        self.runs += 1;
        if self.runs == 1 {
            if self.outside_execute {
                std::panic::panic_any(PanicsWhenDropped);
            }
            panic!("panic inside the runtime");
        }
        let input = inputs
            .into_iter()
            .next()
            .ok_or_else(|| ExecuteError("no input".into()))?;
        Ok(vec![NamedTensor {
            name: "OUT".into(),
            tensor: input.tensor,
        }])
    }
}

fn start_panicking(outside_execute: bool, preserve_ordering: bool) -> Scheduler {
    let db = ModelDynamicBatching {
        preserve_ordering,
        ..Default::default()
    };
    let settings = SchedulerSettings::from_config(&batching_config(4, db, 1), 10).unwrap();
    let executor = Panicking {
        outside_execute,
        runs: 0,
    };
    Scheduler::start(
        settings,
        vec![Box::new(executor)],
        Arc::new(ModelStats::new("fake", "1")),
    )
}

#[tokio::test]
async fn a_panic_inside_execute_fails_the_batch_and_the_instance_keeps_serving() {
    let s = start_panicking(false, false);
    let r = s.infer(request(0.0, 1)).await;
    assert!(matches!(r, Err(SchedulerError::Execute(_))), "{r:?}");
    assert!(s.infer(request(0.0, 1)).await.is_ok());
    assert_eq!(s.failure(), None);
    s.shutdown().await;
}

#[tokio::test]
async fn a_panic_outside_execute_answers_the_batch_marks_the_model_failed_and_drains() {
    for preserve_ordering in [false, true] {
        let s = start_panicking(true, preserve_ordering);
        match s.infer(request(0.0, 1)).await {
            Err(SchedulerError::Execute(e)) => {
                assert!(e.0.contains("model instance failed"), "{e}")
            }
            other => panic!("expected an execution error, got {other:?}"),
        }
        // The lost instance is never used again: later requests fail at once instead of hanging
        // behind a busy flag that would never clear, and the ordering does not block them.
        let later = s.infer(request(1.0, 1)).await;
        assert!(
            matches!(later, Err(SchedulerError::Execute(_))),
            "{later:?}"
        );
        let reason = s.failure().expect("the model is marked failed");
        assert!(
            reason.contains("invariant broken") && reason.contains("instance 0"),
            "{reason}"
        );
        // Drain and unload still finish.
        tokio::time::timeout(Duration::from_secs(30), s.shutdown())
            .await
            .expect("shutdown finishes");
    }
}

/// Times the timekeeper's deadline moved earlier (each one wakes it) and times it looked at the
/// queue, since the scheduler started.
fn timekeeper_counts(s: &Scheduler) -> (usize, usize) {
    let core = s.shared.core.lock();
    (core.arms, core.timekeeper_passes)
}

fn no_delay_batching(max_batch_size: i32, instances: i32) -> ModelConfig {
    batching_config(max_batch_size, ModelDynamicBatching::default(), instances)
}

#[tokio::test(start_paused = true)]
async fn a_batch_that_forms_while_an_instance_runs_is_taken_by_it_when_it_finishes() {
    let mut h = start(no_delay_batching(4, 1), Gate::Closed);
    let running = h.admitted(request(0.0, 1)).await;
    assert_eq!(h.started.recv().await, Some(1));
    let a = h.admitted(request(1.0, 1)).await;
    let b = h.admitted(request(2.0, 1)).await;
    h.open(2);
    assert!(running.await.unwrap().is_ok());
    assert_eq!(
        out_values(&a.await.unwrap().unwrap(), "OUT"),
        vec![2.0, 3.0]
    );
    assert_eq!(
        out_values(&b.await.unwrap().unwrap(), "OUT"),
        vec![3.0, 4.0]
    );
    assert_eq!(
        *h.executions.lock(),
        vec![vec![0.0, 1.0], vec![1.0, 2.0, 2.0, 3.0]],
        "the two that waited ran as one batch, right after the first"
    );
    let (arms, passes) = timekeeper_counts(&h.scheduler);
    assert_eq!(arms, 0, "no deadline was ever armed");
    assert!(passes <= 1, "only the timekeeper's first look: {passes}");
    h.scheduler.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn an_arrival_with_an_idle_instance_runs_without_the_timekeeper() {
    let unbatched = ModelConfig {
        name: "fake".into(),
        max_batch_size: 4,
        ..Default::default()
    };
    for config in [unbatched, no_delay_batching(4, 2)] {
        let h = start(config, Gate::Open);
        for first in [0.0, 10.0, 20.0] {
            let r = h.scheduler.infer(request(first, 1)).await;
            assert_eq!(
                out_values(&r.unwrap(), "OUT"),
                vec![first + 1.0, first + 2.0]
            );
        }
        let (arms, passes) = timekeeper_counts(&h.scheduler);
        assert_eq!(arms, 0);
        assert!(passes <= 1, "only the timekeeper's first look: {passes}");
        assert_eq!(h.executions.lock().len(), 3);
        h.scheduler.shutdown().await;
    }
}

#[tokio::test(start_paused = true)]
async fn the_timekeeper_is_armed_once_per_window_not_per_arrival() {
    let db = ModelDynamicBatching {
        max_queue_delay_microseconds: 10_000,
        ..Default::default()
    };
    let h = start(batching_config(8, db, 1), Gate::Open);
    // The timekeeper's first look happens before any arrival.
    for _ in 0..4 {
        tokio::task::yield_now().await;
    }
    let mut waiting = Vec::new();
    for first in [0.0, 10.0, 20.0, 30.0] {
        waiting.push(h.admitted(request(first, 1)).await);
    }
    // The first arrival yields once to gather the others before it looks at the window.
    for _ in 0..4 {
        tokio::task::yield_now().await;
    }
    assert_eq!(
        timekeeper_counts(&h.scheduler).0,
        1,
        "one arm for the window"
    );
    for task in waiting {
        assert_eq!(task.await.unwrap().unwrap().timings.batch_size, 4);
    }
    assert_eq!(h.executions.lock().len(), 1);
    // A second window, after the first ran: one more arm.
    let later = h.admitted(request(40.0, 1)).await;
    assert!(later.await.unwrap().is_ok());
    assert_eq!(timekeeper_counts(&h.scheduler).0, 2);
    h.scheduler.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_timeout_while_every_instance_is_busy_rejects_at_its_deadline() {
    let db = rejecting_after_microseconds(50_000);
    let mut h = start(batching_config(1, db, 2), Gate::Closed);
    let busy_a = h.admitted(request(0.0, 1)).await;
    let busy_b = h.admitted(request(1.0, 1)).await;
    assert_eq!(h.started.recv().await, Some(1));
    assert_eq!(h.started.recv().await, Some(1));
    let queued_at = tokio::time::Instant::now();
    let timed_out = h.scheduler.infer(request(2.0, 1)).await;
    assert!(
        matches!(timed_out, Err(SchedulerError::TimedOut)),
        "{timed_out:?}"
    );
    // The paused clock moves only to armed deadlines: the rejection came at the request's own.
    assert!(queued_at.elapsed() >= Duration::from_millis(50));
    assert_eq!(
        timekeeper_counts(&h.scheduler).0,
        1,
        "one arm, for the timeout"
    );
    h.open(1);
    assert!(busy_a.await.unwrap().is_ok());
    assert!(busy_b.await.unwrap().is_ok());
    assert_eq!(
        h.executions.lock().len(),
        2,
        "the timed-out request never ran"
    );
    h.scheduler.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_model_without_traffic_has_no_wake_ups() {
    let db = ModelDynamicBatching {
        max_queue_delay_microseconds: 10_000,
        default_queue_policy: Some(ModelQueuePolicy {
            default_timeout_microseconds: 20_000,
            ..Default::default()
        }),
        ..Default::default()
    };
    let h = start(batching_config(8, db, 2), Gate::Open);
    assert!(h.scheduler.infer(request(0.0, 1)).await.is_ok());
    let before = timekeeper_counts(&h.scheduler);
    // An hour of an idle model: no deadline is armed, so nothing wakes.
    tokio::time::advance(Duration::from_secs(3600)).await;
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert_eq!(timekeeper_counts(&h.scheduler), before);
    h.scheduler.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_runs_a_request_waiting_for_its_window_at_once() {
    let db = ModelDynamicBatching {
        max_queue_delay_microseconds: 3_600_000_000,
        ..Default::default()
    };
    let h = start(batching_config(8, db, 1), Gate::Open);
    let waiting = h.admitted(request(0.0, 1)).await;
    let started = tokio::time::Instant::now();
    h.scheduler.shutdown().await;
    assert!(waiting.await.unwrap().is_ok());
    assert!(
        started.elapsed() < Duration::from_secs(3600),
        "waited for the window"
    );
}

#[tokio::test]
async fn a_full_queue_takes_back_the_place_of_a_caller_that_left() {
    // With a queue of one, the third request is admitted only because the second's place came back.
    let h = run_past_an_abandoned_request(queue_of_one(), 2).await;
    h.scheduler.shutdown().await;
}

#[tokio::test]
async fn a_lost_instance_leaves_the_others_serving_what_waits() {
    let settings =
        SchedulerSettings::from_config(&batching_config(4, ModelDynamicBatching::default(), 2), 10)
            .unwrap();
    // Instance 0 panics outside execute on its first batch; instance 1 has had its first run.
    let executors: Vec<Box<dyn ModelExecutor>> = vec![
        Box::new(Panicking {
            outside_execute: true,
            runs: 0,
        }),
        Box::new(Panicking {
            outside_execute: true,
            runs: 1,
        }),
    ];
    let s = Scheduler::start(settings, executors, Arc::new(ModelStats::new("fake", "1")));
    let lost = s.infer(request(0.0, 1)).await;
    assert!(matches!(lost, Err(SchedulerError::Execute(_))), "{lost:?}");
    for first in [1.0, 2.0, 3.0] {
        let served = s.infer(request(first, 1)).await;
        assert!(served.is_ok(), "{served:?}");
    }
    // The last answer goes out before its instance takes the lock to mark itself idle.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let state = {
            let core = s.shared.core.lock();
            (core.alive, core.busy, core.idle.clone())
        };
        if state == (1, 0, vec![1]) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{state:?}");
        tokio::task::yield_now().await;
    }
    // Marked before its instance was counted out.
    assert!(s.failure().is_some_and(|r| r.contains("instance 0")));
    tokio::time::timeout(Duration::from_secs(30), s.shutdown())
        .await
        .expect("shutdown finishes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_callers_on_a_multi_threaded_runtime_each_get_their_own_answer() {
    // A sub-millisecond window, so the precise timer's path takes part too.
    let db = ModelDynamicBatching {
        max_queue_delay_microseconds: 100,
        ..Default::default()
    };
    let h = start(batching_config(8, db, 2), Gate::Open);
    // Fewer callers than the harness's queue bound (100), so none is refused.
    let callers: Vec<_> = (0..90u16)
        .map(|i| {
            let scheduler = h.scheduler.clone();
            let rows = usize::from(i % 3) + 1;
            let first = f32::from(i) * 10.0;
            tokio::spawn(async move {
                let resp = scheduler.infer(request(first, rows)).await;
                let resp = resp.unwrap_or_else(|e| panic!("caller {i}: {e}"));
                let expected: Vec<f32> = (0..rows * 2).map(|v| first + v as f32 + 1.0).collect();
                assert_eq!(out_values(&resp, "OUT"), expected);
                rows
            })
        })
        .collect();
    let mut rows_sent = 0;
    for caller in callers {
        rows_sent += tokio::time::timeout(Duration::from_secs(60), caller)
            .await
            .expect("answered")
            .unwrap();
    }
    let rows_run: usize = h.executions.lock().iter().map(|e| e.len() / 2).sum();
    assert_eq!(rows_run, rows_sent, "every row ran exactly once");
    h.scheduler.shutdown().await;
    let core = h.scheduler.shared.core.lock();
    assert_eq!((core.busy, core.policy.len()), (0, 0));
    assert_eq!(h.stats.pending.load(Relaxed), 0);
}

#[tokio::test]
async fn requests_woken_in_one_reactor_tick_share_a_batch_without_a_window() {
    // No delay window: before gathering, the first arrival woke the idle instance alone and the
    // other three formed a second batch behind it.
    let h = start(no_delay_batching(8, 1), Gate::Open);
    let mut waiting = Vec::new();
    for first in [0.0, 10.0, 20.0, 30.0] {
        waiting.push(h.admitted(request(first, 1)).await);
    }
    for task in waiting {
        assert_eq!(task.await.unwrap().unwrap().timings.batch_size, 4);
    }
    assert_eq!(h.executions.lock().len(), 1);
    h.scheduler.shutdown().await;
}

#[tokio::test]
async fn a_gathering_arrival_cancelled_while_it_yields_still_dispatches_the_others() {
    let h = start(no_delay_batching(8, 1), Gate::Open);
    let gathering = h.admitted(request(0.0, 1)).await;
    let other = h.admitted(request(10.0, 1)).await;
    gathering.abort();
    let _ = gathering.await;
    let answer = other.await.unwrap().unwrap();
    assert_eq!(out_values(&answer, "OUT")[0], 11.0);
    h.scheduler.shutdown().await;
}

/// An executor that records the name of the thread each execution ran on.
struct RecordsThread(Arc<Mutex<Vec<Option<String>>>>);

impl ModelExecutor for RecordsThread {
    fn execute(
        &mut self,
        inputs: Vec<NamedTensor>,
        _outputs: &[String],
    ) -> Result<Vec<NamedTensor>, ExecuteError> {
        self.0
            .lock()
            .push(std::thread::current().name().map(str::to_string));
        Ok(inputs)
    }
}

/// Runs three requests one after another on an unbatched model whose batches run inline while
/// they took at most `inline_below`; returns the thread name of each execution.
async fn threads_of_three_runs(inline_below: Option<Duration>) -> Vec<Option<String>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let config = ModelConfig {
        name: "fake".into(),
        ..Default::default()
    };
    let mut settings = SchedulerSettings::from_config(&config, 10).unwrap();
    settings.inline_below = inline_below;
    let stats = Arc::new(ModelStats::new("fake", "1"));
    let s = Scheduler::start(settings, vec![Box::new(RecordsThread(seen.clone()))], stats);
    for first in [0.0, 1.0, 2.0] {
        let mut r = request(first, 1);
        r.inputs[0].tensor.shape = vec![2];
        let answer = s.infer(r).await.unwrap();
        assert_eq!(answer.outputs[0].tensor.shape, vec![2]);
        // The instance thread answers before it records the batch's cost and goes idle: a request
        // sent in between would queue behind a busy instance and run on its thread.
        while s.shared.core.lock().idle.is_empty() {
            tokio::task::yield_now().await;
        }
    }
    s.shutdown().await;
    let seen = seen.lock().clone();
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_cheap_model_runs_on_the_requests_task_once_its_cost_is_known() {
    let threads = threads_of_three_runs(Some(Duration::from_secs(1))).await;
    // The first batch has no cost yet: the instance thread runs it; then the caller's task does.
    assert_eq!(threads[0].as_deref(), Some("fake-inst-0"));
    for name in &threads[1..] {
        assert_ne!(name.as_deref(), Some("fake-inst-0"), "{threads:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_model_slower_than_the_inline_bound_stays_on_its_instance_threads() {
    for bound in [None, Some(Duration::from_nanos(1))] {
        let threads = threads_of_three_runs(bound).await;
        assert!(
            threads.iter().all(|t| t.as_deref() == Some("fake-inst-0")),
            "{bound:?}: {threads:?}"
        );
    }
}

/// Records each execution's thread like `RecordsThread`; every execution after the first takes at
/// least `later_runs_take`.
struct SlowAfterTheFirst {
    records: RecordsThread,
    later_runs_take: Duration,
}

impl ModelExecutor for SlowAfterTheFirst {
    fn execute(
        &mut self,
        inputs: Vec<NamedTensor>,
        outputs: &[String],
    ) -> Result<Vec<NamedTensor>, ExecuteError> {
        if !self.records.0.lock().is_empty() {
            std::thread::sleep(self.later_runs_take);
        }
        self.records.execute(inputs, outputs)
    }
}

/// Starts a `max_batch_size: 2` model on `executor` whose batches run inline under `inline_below`,
/// primes its cost with one request (which its instance thread runs) and waits for the instance to
/// go idle, so that the next batches form on the requests' tasks.
async fn primed_for_inline(
    executor: Box<dyn ModelExecutor>,
    inline_below: Duration,
) -> Arc<Scheduler> {
    primed_for_inline_with(executor, 2, inline_below, None).await
}

/// As `primed_for_inline`, with a `max_batch_size` and `SchedulerSettings::split_answers_from`.
async fn primed_for_inline_with(
    executor: Box<dyn ModelExecutor>,
    max_batch_size: i32,
    inline_below: Duration,
    split_answers_from: Option<Duration>,
) -> Arc<Scheduler> {
    let config = batching_config(max_batch_size, Default::default(), 1);
    let mut settings = SchedulerSettings::from_config(&config, 64).unwrap();
    settings.inline_below = Some(inline_below);
    settings.split_answers_from = split_answers_from;
    let stats = Arc::new(ModelStats::new("fake", "1"));
    let s = Arc::new(Scheduler::start(settings, vec![executor], stats));
    s.infer(request(0.0, 1)).await.unwrap();
    while s.shared.core.lock().idle.is_empty() {
        tokio::task::yield_now().await;
    }
    s
}

/// Primes a `max_batch_size: 2` model's cost with one fast request (run by its instance thread),
/// then sends six at once from one task, so that they queue in one reactor tick; returns the thread
/// of each execution of the burst, whose runs take at least `later_runs_take`.
async fn threads_of_a_burst(
    inline_below: Duration,
    later_runs_take: Duration,
) -> Vec<Option<String>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let executor = SlowAfterTheFirst {
        records: RecordsThread(seen.clone()),
        later_runs_take,
    };
    let s = primed_for_inline(Box::new(executor), inline_below).await;
    let burst = (1..=6).map(|i| s.infer(request(i as f32, 1)));
    for answer in futures::future::join_all(burst).await {
        assert_eq!(answer.unwrap().outputs[0].tensor.shape, vec![1, 2]);
    }
    s.shutdown().await;
    let seen = seen.lock().clone();
    assert_eq!(
        seen.len(),
        4,
        "one priming run and three full batches: {seen:?}"
    );
    seen[1..].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_burst_larger_than_one_batch_runs_on_the_requests_task_within_the_bound() {
    let threads = threads_of_a_burst(Duration::from_secs(10), Duration::ZERO).await;
    assert!(
        threads.iter().all(|t| t.as_deref() != Some("fake-inst-0")),
        "{threads:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn what_queued_behind_an_inline_batch_past_the_bound_goes_to_the_instance_thread() {
    // The primed cost is under the bound, so the burst's first batch runs on the task; it takes
    // longer than the bound, so the next goes to the thread, which then takes the last itself.
    let threads = threads_of_a_burst(Duration::from_millis(2), Duration::from_millis(5)).await;
    assert_ne!(threads[0].as_deref(), Some("fake-inst-0"), "{threads:?}");
    assert_eq!(threads[1].as_deref(), Some("fake-inst-0"), "{threads:?}");
    assert_eq!(threads[2].as_deref(), Some("fake-inst-0"), "{threads:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_cheap_model_with_a_delay_window_answers_every_lone_request() {
    // Found by the benchmark: the inline path once armed the window without waking the
    // timekeeper, and a lone request waited forever.
    let db = ModelDynamicBatching {
        max_queue_delay_microseconds: 500,
        ..Default::default()
    };
    let mut config = batching_config(8, db, 1);
    config.name = "windowed".into();
    let mut settings = SchedulerSettings::from_config(&config, 10).unwrap();
    settings.inline_below = Some(Duration::from_secs(1));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let stats = Arc::new(ModelStats::new("windowed", "1"));
    let s = Scheduler::start(settings, vec![Box::new(RecordsThread(seen.clone()))], stats);
    for first in [0.0, 1.0, 2.0, 3.0] {
        let answer = tokio::time::timeout(Duration::from_secs(30), s.infer(request(first, 1)))
            .await
            .expect("a lone request is answered once its window ends");
        assert!(answer.is_ok(), "{answer:?}");
    }
    assert_eq!(seen.lock().len(), 4);
    s.shutdown().await;
}

/// How many callers had their answer when an execution started, and the execution's thread.
type AnsweredAndThread = (usize, Option<String>);

/// Records an `AnsweredAndThread` at each execution.
struct CountsAnswered {
    answered: Arc<std::sync::atomic::AtomicUsize>,
    seen: Arc<Mutex<Vec<AnsweredAndThread>>>,
}

impl CountsAnswered {
    /// An executor with fresh counters, and the counters: callers answered (the tests add to it),
    /// and what each execution saw.
    fn with_counters() -> (
        Self,
        Arc<std::sync::atomic::AtomicUsize>,
        Arc<Mutex<Vec<AnsweredAndThread>>>,
    ) {
        let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let executor = CountsAnswered {
            answered: answered.clone(),
            seen: seen.clone(),
        };
        (executor, answered, seen)
    }
}

impl ModelExecutor for CountsAnswered {
    fn execute(
        &mut self,
        inputs: Vec<NamedTensor>,
        _outputs: &[String],
    ) -> Result<Vec<NamedTensor>, ExecuteError> {
        let thread = std::thread::current().name().map(str::to_string);
        self.seen.lock().push((self.answered.load(Relaxed), thread));
        Ok(inputs)
    }
}

/// Sends `callers` one-row requests at once, each from a task of its own that checks its answer
/// (`CountsAnswered` echoes its input) and counts it in `answered`; then shuts the model down.
async fn answer_a_burst(
    s: &Arc<Scheduler>,
    answered: &Arc<std::sync::atomic::AtomicUsize>,
    callers: usize,
) {
    let callers: Vec<_> = (1..=callers)
        .map(|i| {
            let (s, answered) = (s.clone(), answered.clone());
            tokio::spawn(async move {
                let answer = s.infer(request(i as f32, 1)).await.unwrap();
                assert_eq!(out_values(&answer, "IN"), vec![i as f32, i as f32 + 1.0]);
                answered.fetch_add(1, Relaxed);
            })
        })
        .collect();
    for caller in callers {
        caller.await.unwrap();
    }
    s.shutdown().await;
}

#[tokio::test]
async fn an_inline_batch_answers_its_callers_before_the_batch_queued_behind_it_runs() {
    // On the one-thread runtime the caller tasks and the scheduler share one thread, as on a
    // one-CPU pod: the second batch must wait for the first batch's callers to take their answers
    // (whose connection then writes them), not run before them.
    let (executor, answered, seen) = CountsAnswered::with_counters();
    let s = primed_for_inline(Box::new(executor), Duration::from_secs(10)).await;
    // The priming request's caller had its answer.
    answered.fetch_add(1, Relaxed);
    answer_a_burst(&s, &answered, 4).await;
    let seen = seen.lock().clone();
    assert_eq!(
        seen.len(),
        3,
        "a priming run and two full batches: {seen:?}"
    );
    for (_, thread) in &seen[1..] {
        assert_ne!(thread.as_deref(), Some("fake-inst-0"), "{seen:?}");
    }
    assert_eq!(seen[1].0, 1, "the burst's first batch runs first: {seen:?}");
    assert_eq!(
        seen[2].0, 3,
        "both callers of the first batch had their answer before the second ran: {seen:?}"
    );
}

#[test]
fn a_batch_held_between_inline_turns_runs_on_the_instance_thread_when_its_task_is_dropped() {
    // The runtime goes away (shutdown) after the burst's first batch ran inline and before the
    // task holding the second batch had its turn: that batch is not lost with the task.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let scheduler = runtime.block_on(async {
        let executor = Box::new(RecordsThread(seen.clone()));
        let s = primed_for_inline(executor, Duration::from_secs(10)).await;
        for i in 1..=4 {
            let s = s.clone();
            tokio::spawn(async move { s.infer(request(i as f32, 1)).await });
        }
        while seen.lock().len() < 2 {
            tokio::task::yield_now().await;
        }
        s
    });
    drop(runtime);
    // The execution is recorded as it starts; the instance is marked idle after it answered.
    let settled = || seen.lock().len() >= 3 && scheduler.shared.core.lock().busy == 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !settled() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    let seen = seen.lock().clone();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert_eq!(seen[2].as_deref(), Some("fake-inst-0"), "{seen:?}");
    assert_eq!(scheduler.shared.core.lock().busy, 0);
    scheduler.shared.mailboxes[0].close();
}

#[tokio::test]
async fn a_batch_answered_in_two_halves_answers_all_its_callers_before_the_next_batch_runs() {
    // Sixteen callers, batches of eight, every batch's answers split (no shortest run). On the
    // one-thread runtime, as on a one-CPU pod: the first half of the first batch's answers goes
    // out, the second half a turn later, and only then does the batch queued behind it run.
    let (executor, answered, seen) = CountsAnswered::with_counters();
    let s = primed_for_inline_with(
        Box::new(executor),
        8,
        Duration::from_secs(10),
        Some(Duration::ZERO),
    )
    .await;
    answered.fetch_add(1, Relaxed);
    // The cost shape is learned from batches run in halves (tested on their own); here it is
    // taken as mostly per row, and the priming run's plan set as the next batch's would be.
    s.shared.core.lock().assume_per_row_cost();
    s.shared.inline_plan.store(
        crate::scheduler::answer_split::Plan::AnswerInHalves as u8,
        Relaxed,
    );
    answer_a_burst(&s, &answered, 16).await;
    let seen = seen.lock().clone();
    assert_eq!(
        seen.len(),
        3,
        "a priming run and two batches of 8: {seen:?}"
    );
    assert_eq!(
        seen[2].0, 9,
        "all eight callers of the first batch had their answer before the second ran: {seen:?}"
    );
    assert_eq!(answered.load(Relaxed), 17);
}

#[test]
fn held_back_answers_reach_their_callers_when_the_runtime_stops_before_their_turn() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let stats = Arc::new(ModelStats::new("fake", "1"));
    let (tx, mut rx) = oneshot::channel();
    runtime.block_on(async {
        let ctx = WorkerContext {
            model: "fake".into(),
            stats: stats.clone(),
            orderer: None,
            batched: true,
        };
        let replies = vec![(
            Responder::new(tx, stats.clone()),
            Err(SchedulerError::TimedOut),
        )];
        let later = ctx.deliver_first(0, replies, Some(0)).expect("held back");
        instance::answer_next_turn(later);
    });
    assert!(rx.try_recv().is_err(), "not sent before its turn");
    drop(runtime);
    assert!(matches!(rx.try_recv(), Ok(Err(SchedulerError::TimedOut))));
    assert_eq!(stats.pending.load(Relaxed), 0);
}
