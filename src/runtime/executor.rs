//! One model instance: an ORT session owned by the scheduler's worker thread (no lock around it).
//!
//! A batch goes from the requests' tensors into ORT values with at most one copy per request (see
//! `assemble`), and the outputs come back as `Bytes` over ORT's own buffers (see `convert`). The
//! run options are built once per executor and reused for every run.
use std::time::Instant;

use ort::session::{RunOptions, SelectedOutputMarker, Session, SessionInputValue, SessionOutputs};

use super::assemble::input_value;
use super::convert::from_ort;
use super::selection::OutputSubsets;
use super::session::{graph_signature, load_session, SessionPlan};
use super::RuntimeError;
use crate::scheduler::{BatchRun, ExecuteError, ModelExecutor};
use crate::tensor::batch::batch_inputs;
use crate::tensor::signature::GraphSignature;
use crate::tensor::NamedTensor;

/// Runs batches on one ORT session.
pub struct OrtExecutor {
    session: Session,
    output_names: Vec<String>,
    /// Options of every run that wants all outputs: ORT's default selection is every output in
    /// graph order, which is what such a run returns.
    all_outputs: RunOptions,
    /// Options of runs that name a subset of outputs, kept per name list.
    subsets: OutputSubsets,
}

type Inputs<'a> = Vec<(&'a str, SessionInputValue<'a>)>;

impl OrtExecutor {
    /// Builds the session described by `plan`. Blocking; call off the async reactor.
    pub fn load(plan: &SessionPlan) -> Result<Self, RuntimeError> {
        let session = load_session(plan)?;
        let output_names = session
            .outputs()
            .iter()
            .map(|o| o.name().to_string())
            .collect();
        let all_outputs = RunOptions::new().map_err(|e| RuntimeError::Session(e.to_string()))?;
        Ok(Self {
            session,
            output_names,
            all_outputs,
            subsets: OutputSubsets::default(),
        })
    }

    pub fn signature(&self) -> Result<GraphSignature, RuntimeError> {
        graph_signature(&self.session)
    }

    /// Runs `requests` as one batch; the inputs borrow the requests' buffers where they can, so
    /// `requests` outlives the run.
    fn run_batch(
        &mut self,
        requests: &[Vec<NamedTensor>],
        outputs: &[String],
    ) -> Result<BatchRun, ExecuteError> {
        let started = Instant::now();
        let inputs: Inputs<'_> = batch_inputs(requests)
            .map_err(|e| ExecuteError(format!("failed to assemble the batch: {e}")))?
            .into_iter()
            .map(|input| {
                let name = input.name;
                input_value(input).map(|value| (name, value))
            })
            .collect::<Result<_, String>>()
            .map_err(ExecuteError)?;
        let assembly = started.elapsed();
        let outputs = if outputs.is_empty() || outputs == self.output_names.as_slice() {
            run_with(
                &mut self.session,
                inputs,
                &self.all_outputs,
                &self.output_names,
            )?
        } else if let Some(options) = self.subsets.get(outputs) {
            run_with(&mut self.session, inputs, options, outputs)?
        } else {
            let options = OutputSubsets::options_for(outputs)?;
            let produced = run_with(&mut self.session, inputs, &options, outputs)?;
            self.subsets.keep(outputs, options);
            produced
        };
        Ok(BatchRun { outputs, assembly })
    }
}

/// One run with `options`, whose selection yields exactly `expected` in order.
fn run_with<O: SelectedOutputMarker>(
    session: &mut Session,
    inputs: Inputs<'_>,
    options: &RunOptions<O>,
    expected: &[String],
) -> Result<Vec<NamedTensor>, ExecuteError> {
    let results = session
        .run_with_options(inputs, options)
        .map_err(|e| ExecuteError(e.to_string()))?;
    engine_outputs(results, expected)
}

fn engine_outputs(
    results: SessionOutputs<'_>,
    expected: &[String],
) -> Result<Vec<NamedTensor>, ExecuteError> {
    if results.len() != expected.len() {
        let missing = expected
            .iter()
            .find(|name| !results.contains_key(name.as_str()))
            .map_or("?", |name| name.as_str());
        return Err(ExecuteError(format!("output '{missing}' was not produced")));
    }
    results
        .into_iter()
        .map(|(name, value)| {
            let tensor = from_ort(name, value).map_err(ExecuteError)?;
            Ok(NamedTensor {
                name: name.to_string(),
                tensor,
            })
        })
        .collect()
}

impl ModelExecutor for OrtExecutor {
    fn execute(
        &mut self,
        inputs: Vec<NamedTensor>,
        outputs: &[String],
    ) -> Result<Vec<NamedTensor>, ExecuteError> {
        let requests = [inputs];
        self.run_batch(&requests, outputs).map(|run| run.outputs)
    }

    fn execute_batch(
        &mut self,
        requests: Vec<Vec<NamedTensor>>,
        outputs: &[String],
    ) -> Result<BatchRun, ExecuteError> {
        self.run_batch(&requests, outputs)
    }
}

#[cfg(test)]
#[path = "executor_tests.rs"]
mod tests;
