//! One model instance: an ORT session owned by the scheduler's worker thread (no lock around it).
use ort::session::{OutputSelector, RunOptions, Session};

use super::convert::{from_ort, to_ort};
use super::session::{graph_signature, load_session, SessionPlan};
use super::RuntimeError;
use crate::scheduler::{ExecuteError, ModelExecutor};
use crate::tensor::signature::GraphSignature;
use crate::tensor::NamedTensor;

/// Runs batches on one ORT session.
pub struct OrtExecutor {
    session: Session,
    output_names: Vec<String>,
}

impl OrtExecutor {
    /// Builds the session described by `plan`. Blocking; call off the async reactor.
    pub fn load(plan: &SessionPlan) -> Result<Self, RuntimeError> {
        let session = load_session(plan)?;
        let output_names = session
            .outputs()
            .iter()
            .map(|o| o.name().to_string())
            .collect();
        Ok(Self {
            session,
            output_names,
        })
    }

    pub fn signature(&self) -> Result<GraphSignature, RuntimeError> {
        graph_signature(&self.session)
    }
}

impl ModelExecutor for OrtExecutor {
    fn execute(
        &mut self,
        inputs: Vec<NamedTensor>,
        outputs: &[String],
    ) -> Result<Vec<NamedTensor>, ExecuteError> {
        let values = inputs
            .iter()
            .map(|t| to_ort(&t.name, &t.tensor).map(|v| (t.name.clone(), v)))
            .collect::<Result<Vec<_>, String>>()
            .map_err(ExecuteError)?;
        // The ORT values hold their own copies: the engine tensors (the request's wire bytes, a
        // BYTES list's 32-byte handles) need not live through the run and the output copies.
        drop(inputs);
        let wanted: Vec<&String> = if outputs.is_empty() {
            self.output_names.iter().collect()
        } else {
            outputs.iter().collect()
        };
        let selector = wanted.iter().fold(OutputSelector::no_default(), |s, name| {
            s.with(name.as_str())
        });
        let options = RunOptions::new()
            .map_err(|e| ExecuteError(e.to_string()))?
            .with_outputs(selector);
        let results = self
            .session
            .run_with_options(values, &options)
            .map_err(|e| ExecuteError(e.to_string()))?;
        wanted
            .into_iter()
            .map(|name| {
                let value = results
                    .get(name.as_str())
                    .ok_or_else(|| ExecuteError(format!("output '{name}' was not produced")))?;
                let tensor = from_ort(name, value).map_err(ExecuteError)?;
                Ok(NamedTensor {
                    name: name.clone(),
                    tensor,
                })
            })
            .collect()
    }
}
