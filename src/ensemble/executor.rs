//! Runs one ensemble request: every step whose inputs exist is dispatched at once to its composing
//! model's scheduler (so it batches with other requests there); as steps finish, the steps they
//! unblock are dispatched. Tensors move between steps as reference-counted buffers.
use std::collections::HashMap;
use std::sync::Weak;
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};

use super::planner::{Plan, PlannedStep};
use super::runner::ModelRunner;
use crate::model::manager::{LoadedModel, ModelManager};
use crate::model::validate::TensorSpec;
use crate::scheduler::{ExecuteError, InferRequest, InferResponse, RequestTimings, SchedulerError};
use crate::telemetry::stats::FailureReason;
use crate::tensor::{shape_matches, NamedTensor, Tensor};

/// The "scheduler" of an ensemble model.
#[derive(Debug)]
pub struct EnsembleExecutor {
    name: String,
    plan: Plan,
    models: Weak<ModelManager>,
}

/// What a request carries to every step.
struct RequestContext {
    id: String,
    priority: u32,
    timeout: Option<Duration>,
    span: tracing::Span,
}

type StepOutcome = (
    usize,
    Result<(Vec<NamedTensor>, RequestTimings), SchedulerError>,
);

impl EnsembleExecutor {
    pub fn new(name: &str, plan: Plan, models: Weak<ModelManager>) -> Self {
        Self {
            name: name.to_string(),
            plan,
            models,
        }
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Whether every composing model can serve now: the ensemble's readiness follows them.
    pub fn composing_ready(&self, manager: &ModelManager) -> bool {
        self.plan
            .steps
            .iter()
            .all(|s| manager.get(&s.model, &s.version).is_ok())
    }

    /// Runs the steps as their inputs become available; the first failing step fails the request
    /// with its error (the other steps' requests are withdrawn when their futures drop).
    pub async fn infer(&self, req: InferRequest) -> Result<InferResponse, SchedulerError> {
        let manager = self.models.upgrade().ok_or(SchedulerError::ShuttingDown)?;
        let ctx = RequestContext {
            id: req.id,
            priority: req.priority,
            timeout: req.timeout,
            span: req.span,
        };
        let mut tensors: HashMap<String, Tensor> =
            req.inputs.into_iter().map(|t| (t.name, t.tensor)).collect();
        let mut pending: Vec<usize> = (0..self.plan.steps.len()).collect();
        let mut running = FuturesUnordered::new();
        let mut timings = RequestTimings::default();
        loop {
            pending.retain(|&index| {
                let step = &self.plan.steps[index];
                let Some(inputs) = step_inputs(step, &tensors) else {
                    return true;
                };
                running.push(self.run_step(&manager, index, inputs, &ctx));
                false
            });
            let Some((index, outcome)) = running.next().await else {
                break;
            };
            let (outputs, step_timings) = outcome?;
            add_timings(&mut timings, &step_timings);
            let step = &self.plan.steps[index];
            for output in outputs {
                if let Some((_, tensor_name)) = step.outputs.iter().find(|(o, _)| *o == output.name)
                {
                    tensors.insert(tensor_name.clone(), output.tensor);
                }
            }
        }
        let outputs = self
            .plan
            .outputs
            .iter()
            .filter(|name| req.requested_outputs.is_empty() || req.requested_outputs.contains(name))
            .map(|name| {
                let tensor = tensors.remove(name).ok_or_else(|| {
                    SchedulerError::Execute(ExecuteError(format!(
                        "ensemble '{}': output '{name}' was not produced",
                        self.name
                    )))
                })?;
                Ok(NamedTensor {
                    name: name.clone(),
                    tensor,
                })
            })
            .collect::<Result<Vec<_>, SchedulerError>>()?;
        Ok(InferResponse { outputs, timings })
    }

    async fn run_step(
        &self,
        manager: &ModelManager,
        index: usize,
        inputs: Vec<NamedTensor>,
        ctx: &RequestContext,
    ) -> StepOutcome {
        let step = &self.plan.steps[index];
        let in_step = |e: String| format!("ensemble step {index} (model '{}'): {e}", step.model);
        let model = match manager.get(&step.model, &step.version) {
            Ok(m) => m,
            Err(e) => {
                // Unloaded since the ensemble was looked up: retryable, as any unavailable model.
                tracing::debug!(error = %in_step(e.to_string()), "ensemble step unavailable");
                return (index, Err(SchedulerError::ShuttingDown));
            }
        };
        let outcome = async {
            let inputs = to_model_dims(&model, inputs).map_err(|e| SchedulerError::InvalidRequest(in_step(e)))?;
            let request = InferRequest {
                id: ctx.id.clone(),
                inputs,
                requested_outputs: step.outputs.iter().map(|(o, _)| o.clone()).collect(),
                priority: ctx.priority,
                timeout: ctx.timeout,
                span: tracing::info_span!(parent: &ctx.span, "ensemble_step", step = index, model = %step.model),
            };
            let response = run_counted(&model, request).await.map_err(|e| name_step(e, &in_step))?;
            let outputs = to_client_dims(&model, response.outputs);
            Ok((outputs, response.timings))
        }
        .await;
        (index, outcome)
    }
}

/// The step's inputs, renamed to the composing model's names, once all of them exist.
fn step_inputs(step: &PlannedStep, tensors: &HashMap<String, Tensor>) -> Option<Vec<NamedTensor>> {
    step.inputs
        .iter()
        .map(|(input, tensor)| {
            tensors.get(tensor).map(|t| NamedTensor {
                name: input.clone(),
                tensor: t.clone(),
            })
        })
        .collect()
}

/// Runs a step on its composing model, counted in that model's statistics as Triton counts
/// composing models' work.
async fn run_counted(
    model: &LoadedModel,
    request: InferRequest,
) -> Result<InferResponse, SchedulerError> {
    let started = Instant::now();
    let rows = if model.max_batch_size() > 0 {
        request
            .inputs
            .first()
            .map(|t| t.tensor.batch_rows())
            .unwrap_or(1)
    } else {
        1
    };
    // Composing models are never ensembles (the planner refuses nesting), so this never recurses.
    let outcome = match &model.scheduler {
        ModelRunner::Scheduled(scheduler) => scheduler.infer(request).await,
        ModelRunner::Ensemble(_) => Err(SchedulerError::InvalidRequest(
            "nested ensembles are not supported".into(),
        )),
    };
    match outcome {
        Ok(response) => {
            model
                .stats
                .record_success(started.elapsed(), rows, &response.timings);
            Ok(response)
        }
        Err(e) => {
            let reason = match e {
                SchedulerError::QueueFull | SchedulerError::InvalidRequest(_) => {
                    FailureReason::Rejected
                }
                SchedulerError::TimedOut | SchedulerError::Cancelled => FailureReason::Canceled,
                SchedulerError::Execute(_) => FailureReason::Backend,
                SchedulerError::ShuttingDown => FailureReason::Other,
            };
            model.stats.record_failure(started.elapsed(), reason);
            Err(e)
        }
    }
}

/// A step's error keeps its kind (so the status code is the step's) and names the step.
fn name_step(e: SchedulerError, in_step: &impl Fn(String) -> String) -> SchedulerError {
    match e {
        SchedulerError::Execute(ExecuteError(m)) => {
            SchedulerError::Execute(ExecuteError(in_step(m)))
        }
        SchedulerError::InvalidRequest(m) => SchedulerError::InvalidRequest(in_step(m)),
        other => other,
    }
}

/// Checks each input's shape against the composing model and applies its `reshape`, as the
/// request decoder does for a client's tensors.
fn to_model_dims(
    model: &LoadedModel,
    inputs: Vec<NamedTensor>,
) -> Result<Vec<NamedTensor>, String> {
    let batched = model.max_batch_size() > 0;
    inputs
        .into_iter()
        .map(|mut t| {
            let spec = find(&model.inputs, &t.name)?;
            let declared: Vec<i64> = batched
                .then_some(-1)
                .into_iter()
                .chain(spec.dims.iter().copied())
                .collect();
            if !shape_matches(&declared, &t.tensor.shape) {
                return Err(format!(
                    "input '{}' has shape {:?} but the model takes {declared:?}",
                    t.name, t.tensor.shape
                ));
            }
            if spec.reshape.is_some() {
                t.tensor.shape = convert(spec, batched, &t.tensor.shape, TensorSpec::model_dims);
            }
            Ok(t)
        })
        .collect()
}

fn to_client_dims(model: &LoadedModel, outputs: Vec<NamedTensor>) -> Vec<NamedTensor> {
    let batched = model.max_batch_size() > 0;
    outputs
        .into_iter()
        .map(|mut t| {
            if let Some(spec) = model
                .outputs
                .iter()
                .find(|s| s.name == t.name && s.reshape.is_some())
            {
                t.tensor.shape = convert(spec, batched, &t.tensor.shape, TensorSpec::client_dims);
            }
            t
        })
        .collect()
}

fn convert(
    spec: &TensorSpec,
    batched: bool,
    shape: &[i64],
    f: fn(&TensorSpec, &[i64]) -> Vec<i64>,
) -> Vec<i64> {
    if batched && !shape.is_empty() {
        std::iter::once(shape[0])
            .chain(f(spec, &shape[1..]))
            .collect()
    } else {
        f(spec, shape)
    }
}

fn find<'a>(specs: &'a [TensorSpec], name: &str) -> Result<&'a TensorSpec, String> {
    specs
        .iter()
        .find(|s| s.name == name)
        .ok_or_else(|| format!("the model has no input '{name}'"))
}

fn add_timings(total: &mut RequestTimings, step: &RequestTimings) {
    total.queue += step.queue;
    total.compute_input += step.compute_input;
    total.compute_infer += step.compute_infer;
    total.compute_output += step.compute_output;
    // Never 0, which would read as a response-cache hit; a step answered from no execution
    // still makes the ensemble's own statistics count its compute time.
    total.batch_size = total.batch_size.max(step.batch_size).max(1);
}
