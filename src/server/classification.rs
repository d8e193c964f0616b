//! The classification extension between a door and the engine, shared by every protocol: which
//! outputs a request wants classified (Triton's `classification` output parameter) and the
//! rewrite of those outputs into `score:index[:label]` strings after inference.
use std::collections::HashMap;

use super::decode::RequestError;
use crate::model::manager::LoadedModel;
use crate::proto::infer_parameter::ParameterChoice;
use crate::proto::model_infer_request::InferRequestedOutputTensor;
use crate::tensor::classification::top_classes;
use crate::tensor::{NamedTensor, Tensor};

/// Requested outputs that carry `classification: N`, with N; Triton's texts for a bad N.
pub fn requested(
    outputs: &[InferRequestedOutputTensor],
) -> Result<HashMap<String, usize>, RequestError> {
    let mut wanted = HashMap::new();
    for output in outputs {
        let Some(param) = output.parameters.get("classification") else {
            continue;
        };
        let count = match param.parameter_choice {
            Some(ParameterChoice::Int64Param(n)) => n,
            _ => {
                return Err(RequestError(
                    "invalid value type for 'classification' parameter, expected int64_param"
                        .into(),
                ))
            }
        };
        if count <= 0 {
            return Err(RequestError(
                "invalid value for 'classification' parameter, expected >= 0".into(),
            ));
        }
        wanted.insert(
            output.name.clone(),
            usize::try_from(count).unwrap_or(usize::MAX),
        );
    }
    Ok(wanted)
}

/// Replaces each classified output by its top classes, in the shape the client sees.
pub fn apply(
    model: &LoadedModel,
    outputs: &mut [NamedTensor],
    wanted: &HashMap<String, usize>,
) -> Result<(), RequestError> {
    if wanted.is_empty() {
        return Ok(());
    }
    let batched = model.max_batch_size() > 0;
    for output in outputs.iter_mut() {
        let Some(&count) = wanted.get(&output.name) else {
            continue;
        };
        let client = client_view(model, &output.name, &output.tensor, batched);
        let labels = model
            .labels
            .get(&output.name)
            .map(|l| l.as_slice())
            .unwrap_or(&[]);
        output.tensor = top_classes(&client, batched, count, labels)
            .map_err(|e| RequestError(format!("output '{}': {e}", output.name)))?;
    }
    Ok(())
}

/// The tensor with the shape its config `dims` give (the inverse of `reshape`): rows are counted
/// on that shape, as Triton does.
fn client_view(model: &LoadedModel, name: &str, tensor: &Tensor, batched: bool) -> Tensor {
    let Some(spec) = model.outputs.iter().find(|s| s.name == name) else {
        return tensor.clone();
    };
    let shape = if batched && !tensor.shape.is_empty() {
        let mut shape = vec![tensor.shape[0]];
        shape.extend(spec.client_dims(&tensor.shape[1..]));
        shape
    } else {
        spec.client_dims(&tensor.shape)
    };
    Tensor {
        dtype: tensor.dtype,
        shape,
        data: tensor.data.clone(),
    }
}
