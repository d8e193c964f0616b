//! Triton's sequence batcher for stateful ONNX models. Requests carry a correlation id (UINT64 or
//! string) and START / END flags; every request of a sequence runs on the slot the sequence was
//! given, one at a time and in order, with the control tensors the config asks for (START, END,
//! READY, CORRID) fed as model inputs and implicit state (`state`) carried from one request's
//! output to the next request's input, reset to zeros at START. Direct binds a sequence to one
//! batch row of one instance; Oldest batches the longest-waiting ready sequences on any instance.
//! A sequence with no request for `max_sequence_idle_microseconds` loses its slot.
//!
//! One OS thread per instance owns its executor; all bookkeeping is in [`core::Core`] under one
//! lock, and callers wait on a oneshot, as in the dynamic batcher.
mod core;
pub mod settings;

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use parking_lot::{Condvar, Mutex, MutexGuard};
use tokio::sync::oneshot;

use self::core::{Core, Next};
use self::settings::{ControlKind, FlagEncoding, SequenceSettings};
use super::worker::Responder;
use super::{
    ExecuteError, InferRequest, InferResponse, ModelExecutor, RequestTimings, SchedulerError,
};
use crate::telemetry::stats::ModelStats;
use crate::tensor::batch::{concat_rows, split_rows};
use crate::tensor::{DataType, NamedTensor, Tensor, TensorData};

/// A sequence's correlation id, as the request gave it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CorrelationId {
    Uint(u64),
    Str(String),
}

impl std::fmt::Display for CorrelationId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CorrelationId::Uint(n) => write!(f, "{n}"),
            CorrelationId::Str(s) => write!(f, "{s}"),
        }
    }
}

/// The sequence parameters of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SequenceControl {
    pub correlation_id: CorrelationId,
    pub start: bool,
    pub end: bool,
}

type Outcome = Result<InferResponse, SchedulerError>;

#[derive(Debug)]
struct Job {
    inputs: Vec<NamedTensor>,
    requested_outputs: Vec<String>,
    start: bool,
    end: bool,
    responder: Responder,
}

#[derive(Debug)]
struct Shared {
    settings: SequenceSettings,
    stats: Arc<ModelStats>,
    core: Mutex<Core<Job>>,
    /// Per-sequence implicit state, by correlation id (kept beside the core, under its own lock
    /// taken only by instance threads).
    states: Mutex<std::collections::HashMap<CorrelationId, Vec<NamedTensor>>>,
    wake: Condvar,
}

/// The sequence batcher of one model.
#[derive(Debug)]
pub struct SequenceScheduler {
    shared: Arc<Shared>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl SequenceScheduler {
    /// Starts one named thread per executor (`<model>-seq-<i>`).
    pub fn start(
        settings: SequenceSettings,
        executors: Vec<Box<dyn ModelExecutor>>,
        stats: Arc<ModelStats>,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            core: Mutex::new(Core::new(&settings, executors.len())),
            settings,
            stats,
            states: Mutex::new(Default::default()),
            wake: Condvar::new(),
        });
        let mut threads = Vec::new();
        for (instance, executor) in executors.into_iter().enumerate() {
            let shared = Arc::clone(&shared);
            let name = format!("{}-seq-{instance}", shared.settings.model);
            threads.push(
                std::thread::Builder::new()
                    .name(name)
                    .spawn(move || worker_loop(instance, executor, &shared))?,
            );
        }
        Ok(Self {
            shared,
            threads: Mutex::new(threads),
        })
    }

    pub fn settings(&self) -> &SequenceSettings {
        &self.shared.settings
    }

    /// Queues one request of a sequence and waits for its outputs.
    pub async fn infer(&self, req: InferRequest, control: SequenceControl) -> Outcome {
        self.infer_admitted(req, control, None).await
    }

    /// As `infer`; `admitted` fires once the request is queued (or refused), so a stream can
    /// hand a sequence's requests over in the order it received them.
    pub async fn infer_admitted(
        &self,
        req: InferRequest,
        control: SequenceControl,
        admitted: Option<oneshot::Sender<()>>,
    ) -> Outcome {
        let _admitted = admitted;
        let model = &self.shared.settings.model;
        check_request(&self.shared.settings, &req, &control)?;
        let (tx, rx) = oneshot::channel();
        {
            let mut core = self.shared.core.lock();
            if core.stopping {
                return Err(SchedulerError::ShuttingDown);
            }
            if core.queued >= self.shared.settings.max_queue {
                return Err(SchedulerError::QueueFull);
            }
            if !control.start && !core.sequences.contains_key(&control.correlation_id) {
                return Err(SchedulerError::InvalidRequest(format!(
                    "inference request for sequence {} to model '{model}' must specify the START flag on the first request of the sequence",
                    control.correlation_id
                )));
            }
            let job = Job {
                inputs: req.inputs,
                requested_outputs: req.requested_outputs,
                start: control.start,
                end: control.end,
                responder: Responder::new(tx, Arc::clone(&self.shared.stats)),
            };
            core.enqueue(control.correlation_id, job, Instant::now());
        }
        drop(_admitted);
        self.shared.wake.notify_all();
        rx.await.unwrap_or_else(|_| {
            Err(SchedulerError::Execute(ExecuteError(
                "the sequence batcher dropped the request".into(),
            )))
        })
    }

    /// Stops admitting, lets the instance threads run what is queued, and waits for them.
    pub async fn shutdown(&self) {
        self.shared.core.lock().stopping = true;
        self.shared.wake.notify_all();
        let threads = std::mem::take(&mut *self.threads.lock());
        let _ = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        })
        .await;
    }
}

impl Drop for SequenceScheduler {
    /// A retired version's threads finish what is queued and exit on their own.
    fn drop(&mut self) {
        self.shared.core.lock().stopping = true;
        self.shared.wake.notify_all();
    }
}

fn check_request(
    settings: &SequenceSettings,
    req: &InferRequest,
    control: &SequenceControl,
) -> Result<(), SchedulerError> {
    let model = &settings.model;
    let empty = match &control.correlation_id {
        CorrelationId::Uint(n) => *n == 0,
        CorrelationId::Str(s) => s.is_empty(),
    };
    if empty {
        return Err(SchedulerError::InvalidRequest(format!(
            "inference request to model '{model}' must specify a non-zero or non-empty correlation ID"
        )));
    }
    if settings.max_batch_size > 0 && req.inputs.iter().any(|t| t.tensor.batch_rows() != 1) {
        return Err(SchedulerError::InvalidRequest(format!(
            "inference request to model '{model}' must specify batch-size 1 due to requirements of sequence batcher"
        )));
    }
    for control_tensor in &settings.controls {
        if let (ControlKind::CorrId(dtype), CorrelationId::Str(_)) =
            (&control_tensor.kind, &control.correlation_id)
        {
            if *dtype != DataType::Bytes {
                return Err(SchedulerError::InvalidRequest(format!(
                    "inference request to model '{model}': the model takes correlation IDs as {}, not strings",
                    dtype.as_str()
                )));
            }
        }
    }
    Ok(())
}

/// The body of an instance thread.
fn worker_loop(instance: usize, mut executor: Box<dyn ModelExecutor>, shared: &Shared) {
    let settings = &shared.settings;
    let mut core = shared.core.lock();
    loop {
        let now = Instant::now();
        let (released, idle_next) = core.reap_idle(settings.idle_timeout, now);
        if !released.is_empty() && !settings.states.is_empty() {
            let mut states = shared.states.lock();
            for id in &released {
                states.remove(id);
            }
        }
        match core.next_batch(instance, settings, now) {
            Next::Run(rows) => {
                let ids: Vec<(CorrelationId, bool)> =
                    rows.iter().map(|r| (r.1.clone(), r.2.end)).collect();
                MutexGuard::unlocked(&mut core, || run_rows(executor.as_mut(), shared, rows));
                let now = Instant::now();
                for (id, end) in &ids {
                    core.finish(id, *end, now);
                    if *end {
                        shared.states.lock().remove(id);
                    }
                }
                shared.wake.notify_all();
            }
            Next::Wait(until) => {
                if core.stopping && core.queued == 0 {
                    break;
                }
                match [until, idle_next].into_iter().flatten().min() {
                    Some(deadline) => {
                        shared.wake.wait_until(&mut core, deadline);
                    }
                    None => shared.wake.wait(&mut core),
                }
            }
        }
    }
}

/// One execution: the rows' inputs plus control and state tensors, padded (Direct) so each row
/// sits at its slot's index, then the outputs split back and the state kept.
fn run_rows(
    executor: &mut dyn ModelExecutor,
    shared: &Shared,
    rows: Vec<(usize, CorrelationId, Job, Instant)>,
) {
    let settings = &shared.settings;
    let started = Instant::now();
    let height = rows.iter().map(|r| r.0 + 1).max().unwrap_or(0);
    let mut by_row: Vec<Option<(CorrelationId, Job, Instant)>> =
        (0..height).map(|_| None).collect();
    for (row, id, job, enqueued) in rows {
        by_row[row] = Some((id, job, enqueued));
    }
    let template = by_row
        .iter()
        .flatten()
        .next()
        .map(|(_, job, _)| job.inputs.clone())
        .unwrap_or_default();
    let states = shared.states.lock().clone();
    let mut inputs = Vec::with_capacity(height);
    for slot in &by_row {
        let row_inputs = match slot {
            Some((id, job, _)) => {
                let state = (!job.start).then(|| states.get(id)).flatten();
                row_tensors(settings, job.inputs.clone(), Some((id, job)), state)
            }
            None => row_tensors(settings, template.clone(), None, None),
        };
        inputs.push(row_inputs);
    }
    let output_names = output_names(settings, &by_row);
    let result = execute(
        executor,
        inputs,
        &output_names,
        height,
        settings.max_batch_size > 0,
    );
    let done = Instant::now();
    match result {
        Ok((per_row, assembled, executed)) => {
            let (input_time, infer_time, output_time) =
                (assembled - started, executed - assembled, done - executed);
            shared
                .stats
                .record_execution(height, input_time, infer_time, output_time);
            let mut states = shared.states.lock();
            for (slot, outputs) in by_row.into_iter().zip(per_row) {
                let Some((id, job, enqueued)) = slot else {
                    continue;
                };
                let (state, outputs): (Vec<_>, Vec<_>) = outputs
                    .into_iter()
                    .partition(|t| settings.states.iter().any(|s| s.output == t.name));
                if !settings.states.is_empty() {
                    states.insert(id, state_as_input(settings, state));
                }
                let outputs = select(outputs, &job.requested_outputs, settings);
                let timings = RequestTimings {
                    queue: started.saturating_duration_since(enqueued),
                    compute_input: input_time,
                    compute_infer: infer_time,
                    compute_output: output_time,
                    batch_size: height,
                };
                job.responder.send(Ok(InferResponse { outputs, timings }));
            }
        }
        Err(error) => {
            tracing::warn!(model = %settings.model, %error, "sequence batch execution failed");
            for (_, job, _) in by_row.into_iter().flatten() {
                job.responder.send(Err(error.clone()));
            }
        }
    }
}

type Executed = (Vec<Vec<NamedTensor>>, Instant, Instant);

fn execute(
    executor: &mut dyn ModelExecutor,
    inputs: Vec<Vec<NamedTensor>>,
    outputs: &[String],
    height: usize,
    batched: bool,
) -> Result<Executed, SchedulerError> {
    let assembled = if height == 1 {
        inputs.into_iter().next().unwrap_or_default()
    } else {
        concat_rows(inputs)
            .map_err(|e| ExecuteError(format!("failed to assemble the batch: {e}")))?
    };
    let assembled_at = Instant::now();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        executor.execute(assembled, outputs)
    }))
    .map_err(|_| ExecuteError("the model instance panicked while executing".into()))??;
    let executed_at = Instant::now();
    let per_row = if height == 1 || !batched {
        vec![result]
    } else {
        split_rows(result, &vec![1; height])
            .map_err(|e| ExecuteError(format!("failed to split the batch outputs: {e}")))?
    };
    Ok((per_row, assembled_at, executed_at))
}

/// Every output some row asked for (all of the config's when one asked for none), plus the state
/// outputs the batcher keeps.
fn output_names(
    settings: &SequenceSettings,
    rows: &[Option<(CorrelationId, Job, Instant)>],
) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for (_, job, _) in rows.iter().flatten() {
        let wanted = if job.requested_outputs.is_empty() {
            &settings.outputs
        } else {
            &job.requested_outputs
        };
        for name in wanted {
            if !names.contains(name) {
                names.push(name.clone());
            }
        }
    }
    for state in &settings.states {
        if !names.contains(&state.output) {
            names.push(state.output.clone());
        }
    }
    names
}

fn select(
    outputs: Vec<NamedTensor>,
    requested: &[String],
    settings: &SequenceSettings,
) -> Vec<NamedTensor> {
    let wanted = if requested.is_empty() {
        &settings.outputs
    } else {
        requested
    };
    let mut available: Vec<Option<NamedTensor>> = outputs.into_iter().map(Some).collect();
    wanted
        .iter()
        .filter_map(|name| {
            available
                .iter_mut()
                .find(|t| t.as_ref().is_some_and(|t| &t.name == name))
                .and_then(Option::take)
        })
        .collect()
}

/// The inputs of one row: the request's (or, for a padding row, a copy of another row's), then
/// each control tensor, then the state (zeros at START and on padding rows).
fn row_tensors(
    settings: &SequenceSettings,
    mut inputs: Vec<NamedTensor>,
    row: Option<(&CorrelationId, &Job)>,
    state: Option<&Vec<NamedTensor>>,
) -> Vec<NamedTensor> {
    let lead: Vec<i64> = if settings.max_batch_size > 0 {
        vec![1]
    } else {
        vec![]
    };
    let mut control_shape = lead.clone();
    control_shape.push(1);
    for control in &settings.controls {
        let flag = |encoding: &FlagEncoding, on: bool| {
            fixed(
                encoding.dtype,
                &control_shape,
                if on {
                    &encoding.true_value
                } else {
                    &encoding.false_value
                },
            )
        };
        let tensor = match (&control.kind, row) {
            (ControlKind::Start(e), r) => flag(e, r.is_some_and(|(_, j)| j.start)),
            (ControlKind::End(e), r) => flag(e, r.is_some_and(|(_, j)| j.end)),
            (ControlKind::Ready(e), r) => flag(e, r.is_some()),
            (ControlKind::CorrId(dtype), r) => {
                corrid_tensor(*dtype, &control_shape, r.map(|(id, _)| id))
            }
        };
        inputs.push(NamedTensor {
            name: control.name.clone(),
            tensor,
        });
    }
    for spec in &settings.states {
        let carried = state
            .and_then(|s| s.iter().find(|t| t.name == spec.input))
            .cloned();
        let tensor = carried.map(|t| t.tensor).unwrap_or_else(|| {
            let mut shape = lead.clone();
            shape.extend(&spec.dims);
            let count: i64 = shape.iter().product();
            let size = spec.dtype.element_size().unwrap_or(1);
            Tensor {
                dtype: spec.dtype,
                shape,
                data: TensorData::Fixed(Bytes::from(vec![0u8; count.max(0) as usize * size])),
            }
        });
        inputs.push(NamedTensor {
            name: spec.input.clone(),
            tensor,
        });
    }
    inputs
}

/// A state output saved under the name of the input it feeds next time.
fn state_as_input(settings: &SequenceSettings, outputs: Vec<NamedTensor>) -> Vec<NamedTensor> {
    outputs
        .into_iter()
        .filter_map(|t| {
            let spec = settings.states.iter().find(|s| s.output == t.name)?;
            Some(NamedTensor {
                name: spec.input.clone(),
                tensor: t.tensor,
            })
        })
        .collect()
}

fn fixed(dtype: DataType, shape: &[i64], element: &[u8]) -> Tensor {
    Tensor {
        dtype,
        shape: shape.to_vec(),
        data: TensorData::Fixed(Bytes::copy_from_slice(element)),
    }
}

fn corrid_tensor(dtype: DataType, shape: &[i64], id: Option<&CorrelationId>) -> Tensor {
    let number = match id {
        Some(CorrelationId::Uint(n)) => *n,
        _ => 0,
    };
    match dtype {
        DataType::Bytes => {
            let text = id.map(|i| i.to_string()).unwrap_or_default();
            Tensor {
                dtype,
                shape: shape.to_vec(),
                data: TensorData::Strings(vec![Bytes::from(text)]),
            }
        }
        DataType::Uint32 | DataType::Int32 => fixed(dtype, shape, &(number as u32).to_le_bytes()),
        _ => fixed(dtype, shape, &number.to_le_bytes()),
    }
}

/// Stands in for the instances of a sequence model in its dynamic batcher, so a request that
/// reaches it without going through the sequence batcher gets a clear answer instead of waiting.
#[derive(Debug)]
pub struct SequenceOnlyExecutor {
    model: String,
}

impl SequenceOnlyExecutor {
    pub fn new(model: &str) -> Self {
        Self {
            model: model.to_string(),
        }
    }
}

impl ModelExecutor for SequenceOnlyExecutor {
    fn execute(
        &mut self,
        _: Vec<NamedTensor>,
        _: &[String],
    ) -> Result<Vec<NamedTensor>, ExecuteError> {
        Err(ExecuteError(format!(
            "model '{}' uses the sequence batcher: requests must go through it with a correlation ID",
            self.model
        )))
    }
}
