//! Turns an ensemble's `ensemble_scheduling` into a checked plan: which ensemble tensor feeds each
//! composing model input, which tensor each output becomes, and what each step waits for. Pure
//! data in, data out: composing models are described by [`StepModel`], so every rule is unit-tested
//! without loading anything.
//!
//! Rules (as Triton's, except where noted): every composing input is mapped; map keys name real
//! inputs/outputs of the composing model; each ensemble tensor has one producer (an ensemble input
//! or one step output); every tensor a step reads and every ensemble output is produced; datatypes
//! agree along each edge; the steps form a DAG. Not supported: composing models that are ensembles
//! themselves, and `reshape` on an ensemble's own inputs/outputs.
use std::collections::{BTreeMap, HashMap, HashSet};

use crate::model::validate::TensorSpec;
use crate::model::{datatype_from_config, ModelConfig};
use crate::proto::model_config::SchedulingChoice;
use crate::tensor::DataType;

/// Platform name of an ensemble, as Triton's.
pub const ENSEMBLE_PLATFORM: &str = "ensemble";

/// Most steps one ensemble may have: a bound on per-request work and on the plan's size.
pub const MAX_ENSEMBLE_STEPS: usize = 64;

/// What the planner needs to know about a composing model version.
#[derive(Debug, Clone)]
pub struct StepModel {
    pub max_batch_size: i32,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    pub is_ensemble: bool,
}

/// One step, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedStep {
    pub model: String,
    /// The version to route to: empty for the latest ready one (`model_version: -1`).
    pub version: String,
    /// (composing model input, ensemble tensor), in the composing model's input order.
    pub inputs: Vec<(String, String)>,
    /// (composing model output, ensemble tensor).
    pub outputs: Vec<(String, String)>,
}

/// A checked ensemble: steps in a topological order, and the ensemble's own outputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub steps: Vec<PlannedStep>,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
}

/// Why an ensemble cannot load; names the step (index and model) when one is at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("{0}")]
    Ensemble(String),
    #[error("ensemble step {index} (model '{model}'): {reason}")]
    Step {
        index: usize,
        model: String,
        reason: String,
    },
}

/// Whether a config describes an ensemble.
pub fn is_ensemble(config: &ModelConfig) -> bool {
    config.platform == ENSEMBLE_PLATFORM
        || matches!(
            config.scheduling_choice,
            Some(SchedulingChoice::EnsembleScheduling(_))
        )
}

/// Where a tensor comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Producer {
    EnsembleInput,
    Step(usize),
}

/// Checks `config` against the composing models `resolve` describes (by name and config version,
/// -1 meaning the latest) and returns the plan.
pub fn plan(
    config: &ModelConfig,
    resolve: impl Fn(&str, i64) -> Result<StepModel, String>,
) -> Result<Plan, PlanError> {
    let ens = |reason: String| PlanError::Ensemble(reason);
    let Some(SchedulingChoice::EnsembleScheduling(scheduling)) = &config.scheduling_choice else {
        return Err(ens(
            "platform 'ensemble' needs an ensemble_scheduling block".into(),
        ));
    };
    if config.platform != ENSEMBLE_PLATFORM {
        return Err(ens(format!(
            "ensemble_scheduling needs platform '{ENSEMBLE_PLATFORM}', not '{}'",
            config.platform
        )));
    }
    if scheduling.step.is_empty() || scheduling.step.len() > MAX_ENSEMBLE_STEPS {
        return Err(ens(format!(
            "ensemble_scheduling must have 1 to {MAX_ENSEMBLE_STEPS} steps, not {}",
            scheduling.step.len()
        )));
    }
    let (inputs, outputs) = ensemble_io(config).map_err(ens)?;
    let mut dtypes: HashMap<String, DataType> = HashMap::new();
    let mut producers: HashMap<String, Producer> = HashMap::new();
    for spec in &inputs {
        dtypes.insert(spec.name.clone(), spec.dtype);
        producers.insert(spec.name.clone(), Producer::EnsembleInput);
    }
    let mut models = Vec::with_capacity(scheduling.step.len());
    for (index, step) in scheduling.step.iter().enumerate() {
        let fail = |reason: String| PlanError::Step {
            index,
            model: step.model_name.clone(),
            reason,
        };
        let model = resolve_step(config, step, &resolve).map_err(fail)?;
        claim_outputs(index, step, &model, &mut producers, &mut dtypes).map_err(fail)?;
        models.push(model);
    }
    let mut steps = Vec::with_capacity(models.len());
    let mut needs = Vec::with_capacity(models.len());
    for (index, (step, model)) in scheduling.step.iter().zip(&models).enumerate() {
        let fail = |reason: String| PlanError::Step {
            index,
            model: step.model_name.clone(),
            reason,
        };
        let inputs = bind_inputs(step, model, &producers, &dtypes).map_err(fail)?;
        needs.push(
            inputs
                .iter()
                .filter_map(|(_, t)| match producers.get(t) {
                    Some(Producer::Step(s)) => Some(*s),
                    _ => None,
                })
                .collect::<HashSet<usize>>(),
        );
        let version = if step.model_version == -1 {
            String::new()
        } else {
            step.model_version.to_string()
        };
        let outputs = step
            .output_map
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        steps.push(PlannedStep {
            model: step.model_name.clone(),
            version,
            inputs,
            outputs,
        });
    }
    for spec in &outputs {
        match (producers.get(&spec.name), dtypes.get(&spec.name)) {
            (Some(Producer::Step(_)), Some(&dtype)) if dtype == spec.dtype => {}
            (Some(Producer::Step(_)), Some(&dtype)) => {
                return Err(ens(format!(
                    "ensemble output '{}' is {} but the step producing it gives {}",
                    spec.name,
                    spec.dtype.as_str(),
                    dtype.as_str()
                )))
            }
            _ => {
                return Err(ens(format!(
                    "ensemble output '{}' is not produced by any step's output_map",
                    spec.name
                )))
            }
        }
    }
    let order = topological_order(&needs).ok_or_else(|| {
        ens("the steps form a cycle: each step's inputs must come from earlier steps or the ensemble inputs".into())
    })?;
    let mut slots: Vec<Option<PlannedStep>> = steps.into_iter().map(Some).collect();
    Ok(Plan {
        steps: order.into_iter().filter_map(|i| slots[i].take()).collect(),
        inputs: inputs.into_iter().map(|s| s.name).collect(),
        outputs: outputs.into_iter().map(|s| s.name).collect(),
    })
}

/// The ensemble's own inputs and outputs, checked.
pub fn ensemble_io(config: &ModelConfig) -> Result<(Vec<TensorSpec>, Vec<TensorSpec>), String> {
    let mut seen = HashSet::new();
    let mut check = |kind: &str, name: &str, data_type: i32, dims: &[i64], reshape: bool| {
        if name.is_empty() {
            return Err(format!("an ensemble {kind} has no name"));
        }
        if !seen.insert(name.to_string()) {
            return Err(format!("ensemble tensor '{name}' is listed more than once"));
        }
        let dtype = datatype_from_config(data_type)
            .ok_or_else(|| format!("ensemble {kind} '{name}': data_type must be set"))?;
        if dims.is_empty() || dims.iter().any(|&d| d < 1 && d != -1) {
            return Err(format!(
                "ensemble {kind} '{name}': dims {dims:?} must be non-empty, each >= 1 or -1"
            ));
        }
        if reshape {
            return Err(format!(
                "ensemble {kind} '{name}': reshape is not supported on an ensemble's own tensors"
            ));
        }
        Ok(TensorSpec {
            name: name.to_string(),
            dtype,
            dims: dims.to_vec(),
            reshape: None,
        })
    };
    let inputs = config
        .input
        .iter()
        .map(|i| check("input", &i.name, i.data_type, &i.dims, i.reshape.is_some()))
        .collect::<Result<Vec<_>, _>>()?;
    let outputs = config
        .output
        .iter()
        .map(|o| check("output", &o.name, o.data_type, &o.dims, o.reshape.is_some()))
        .collect::<Result<Vec<_>, _>>()?;
    if inputs.is_empty() || outputs.is_empty() {
        return Err("an ensemble needs at least one input and one output".into());
    }
    Ok((inputs, outputs))
}

fn resolve_step(
    config: &ModelConfig,
    step: &crate::proto::model_ensembling::Step,
    resolve: &impl Fn(&str, i64) -> Result<StepModel, String>,
) -> Result<StepModel, String> {
    if step.model_name.is_empty() {
        return Err("model_name is empty".into());
    }
    if step.model_name == config.name {
        return Err("an ensemble cannot be its own step".into());
    }
    if step.model_version < -1 {
        return Err(format!(
            "model_version {} must be -1 (latest) or a version number",
            step.model_version
        ));
    }
    let model = resolve(&step.model_name, step.model_version)?;
    if model.is_ensemble {
        return Err(
            "the composing model is itself an ensemble; nested ensembles are not supported".into(),
        );
    }
    if config.max_batch_size > 0 && model.max_batch_size < config.max_batch_size {
        return Err(format!(
            "the ensemble's max_batch_size {} exceeds the composing model's {}",
            config.max_batch_size, model.max_batch_size
        ));
    }
    Ok(model)
}

fn claim_outputs(
    index: usize,
    step: &crate::proto::model_ensembling::Step,
    model: &StepModel,
    producers: &mut HashMap<String, Producer>,
    dtypes: &mut HashMap<String, DataType>,
) -> Result<(), String> {
    if step.output_map.is_empty() {
        return Err("output_map is empty: the step's results would go nowhere".into());
    }
    for (output, tensor) in sorted(&step.output_map) {
        let spec = model
            .outputs
            .iter()
            .find(|s| &s.name == output)
            .ok_or_else(|| {
                format!(
                    "output_map names output '{output}', which the composing model does not have (it has {:?})",
                    names(&model.outputs)
                )
            })?;
        match producers.get(tensor) {
            Some(Producer::EnsembleInput) => {
                return Err(format!(
                    "output '{output}' maps to '{tensor}', which is an ensemble input"
                ))
            }
            Some(Producer::Step(other)) => {
                return Err(format!(
                    "output '{output}' maps to '{tensor}', which step {other} already produces"
                ))
            }
            None => {}
        }
        producers.insert(tensor.clone(), Producer::Step(index));
        dtypes.insert(tensor.clone(), spec.dtype);
    }
    Ok(())
}

fn bind_inputs(
    step: &crate::proto::model_ensembling::Step,
    model: &StepModel,
    producers: &HashMap<String, Producer>,
    dtypes: &HashMap<String, DataType>,
) -> Result<Vec<(String, String)>, String> {
    if let Some(unknown) = step
        .input_map
        .keys()
        .find(|k| !model.inputs.iter().any(|s| &s.name == *k))
    {
        return Err(format!(
            "input_map names input '{unknown}', which the composing model does not have (it has {:?})",
            names(&model.inputs)
        ));
    }
    model
        .inputs
        .iter()
        .map(|spec| {
            let tensor = step.input_map.get(&spec.name).ok_or_else(|| {
                format!("input_map does not feed the composing model's input '{}'", spec.name)
            })?;
            if !producers.contains_key(tensor) {
                return Err(format!(
                    "input '{}' reads '{tensor}', which is neither an ensemble input nor any step's output",
                    spec.name
                ));
            }
            match dtypes.get(tensor) {
                Some(&dtype) if dtype != spec.dtype => Err(format!(
                    "input '{}' is {} but '{tensor}' is {}",
                    spec.name,
                    spec.dtype.as_str(),
                    dtype.as_str()
                )),
                _ => Ok((spec.name.clone(), tensor.clone())),
            }
        })
        .collect()
}

/// Kahn's algorithm over "step i needs step j"; None when there is a cycle. Ties keep config
/// order, so a chain written in order stays in order.
fn topological_order(needs: &[HashSet<usize>]) -> Option<Vec<usize>> {
    let mut remaining: Vec<HashSet<usize>> = needs.to_vec();
    let mut done = vec![false; needs.len()];
    let mut order = Vec::with_capacity(needs.len());
    while order.len() < needs.len() {
        let next = (0..needs.len()).find(|&i| !done[i] && remaining[i].is_empty())?;
        done[next] = true;
        order.push(next);
        for r in &mut remaining {
            r.remove(&next);
        }
    }
    Some(order)
}

fn sorted(map: &HashMap<String, String>) -> BTreeMap<&String, &String> {
    map.iter().collect()
}

fn names(specs: &[TensorSpec]) -> Vec<&str> {
    specs.iter().map(|s| s.name.as_str()).collect()
}

#[cfg(test)]
mod tests;
