//! Engine results → protocol messages: infer responses, metadata, statistics.
use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

use super::decode::RequestError;
use crate::proto::infer_parameter::ParameterChoice;
use crate::proto::InferParameter;
use crate::shm::ShmOutput;

use crate::model::manager::LoadedModel;
use crate::model::validate::TensorSpec;
use crate::proto::model_infer_response::InferOutputTensor;
use crate::proto::model_metadata_response::TensorMetadata;
use crate::proto::{
    InferBatchStatistics, InferStatistics, ModelInferResponse, ModelStatistics, StatisticDuration,
};
use crate::scheduler::InferResponse;
use crate::telemetry::stats::{DurationStat, FailureReason, ModelStats};
use crate::tensor::{encode_length_prefixed, DataType, TensorData};

/// Outputs as `raw_output_contents`, in the order the engine returned them. An output bound to a
/// shared-memory region is written there and keeps an empty slot, so clients that find outputs by
/// position still line up.
pub fn infer_response(
    model: &LoadedModel,
    id: String,
    response: InferResponse,
    shm_outputs: &HashMap<String, ShmOutput>,
) -> Result<ModelInferResponse, RequestError> {
    let mut outputs = Vec::with_capacity(response.outputs.len());
    let mut raw = Vec::with_capacity(response.outputs.len());
    for output in response.outputs {
        let tensor = output.tensor;
        let bytes = match tensor.data {
            TensorData::Fixed(bytes) => bytes,
            TensorData::Strings(items) => encode_length_prefixed(&items),
        };
        let mut parameters = HashMap::new();
        match shm_outputs.get(&output.name) {
            Some(target) => {
                target
                    .write(&bytes)
                    .map_err(|e| RequestError(format!("output '{}': {e}", output.name)))?;
                parameters.insert(
                    "shared_memory_region".to_string(),
                    string_param(target.region_name()),
                );
                parameters.insert(
                    "shared_memory_byte_size".to_string(),
                    int_param(bytes.len() as i64),
                );
                raw.push(Bytes::new());
            }
            None => raw.push(bytes),
        }
        let shape = client_shape(model, &output.name, tensor.dtype, tensor.shape);
        outputs.push(InferOutputTensor {
            name: output.name,
            datatype: tensor.dtype.as_str().to_string(),
            shape,
            parameters,
            contents: None,
        });
    }
    Ok(ModelInferResponse {
        model_name: model.name.clone(),
        model_version: model.version.to_string(),
        id,
        outputs,
        raw_output_contents: raw,
        ..Default::default()
    })
}

/// The shape the client sees: the inverse of the config's `reshape` on the non-batch dims.
fn client_shape(model: &LoadedModel, name: &str, dtype: DataType, shape: Vec<i64>) -> Vec<i64> {
    let Some(spec) = model.outputs.iter().find(|s| s.name == name) else {
        return shape;
    };
    // A classification result (BYTES where the model gives scores) already has its client shape.
    if spec.reshape.is_none() || spec.dtype != dtype {
        return shape;
    }
    if model.max_batch_size() > 0 && !shape.is_empty() {
        let mut out = vec![shape[0]];
        out.extend(spec.client_dims(&shape[1..]));
        out
    } else {
        spec.client_dims(&shape)
    }
}

fn string_param(value: &str) -> InferParameter {
    InferParameter {
        parameter_choice: Some(ParameterChoice::StringParam(value.to_string())),
    }
}

fn int_param(value: i64) -> InferParameter {
    InferParameter {
        parameter_choice: Some(ParameterChoice::Int64Param(value)),
    }
}

/// Metadata shape: the batch dimension appears as -1 when the model batches.
pub fn tensor_metadata(spec: &TensorSpec, max_batch_size: usize) -> TensorMetadata {
    let mut shape = Vec::with_capacity(spec.dims.len() + 1);
    if max_batch_size > 0 {
        shape.push(-1);
    }
    shape.extend_from_slice(&spec.dims);
    TensorMetadata {
        name: spec.name.clone(),
        datatype: spec.dtype.as_str().to_string(),
        shape,
    }
}

fn duration(stat: &DurationStat) -> Option<StatisticDuration> {
    Some(StatisticDuration {
        count: stat.count(),
        ns: stat.ns(),
    })
}

/// ModelStatistics read from the same ModelStats that /metrics renders.
pub fn model_statistics(model: &Arc<LoadedModel>) -> ModelStatistics {
    let s: &ModelStats = &model.stats;
    let fail_count: u64 = FailureReason::ALL
        .iter()
        .map(|r| s.failure(*r).count())
        .sum();
    let fail_ns: u64 = FailureReason::ALL.iter().map(|r| s.failure(*r).ns()).sum();
    let batch_stats = s
        .batch_table()
        .into_iter()
        .map(|(size, b)| InferBatchStatistics {
            batch_size: size,
            compute_input: Some(StatisticDuration {
                count: b.count,
                ns: b.compute_input_ns,
            }),
            compute_infer: Some(StatisticDuration {
                count: b.count,
                ns: b.compute_infer_ns,
            }),
            compute_output: Some(StatisticDuration {
                count: b.count,
                ns: b.compute_output_ns,
            }),
        })
        .collect();
    ModelStatistics {
        name: model.name.clone(),
        version: model.version.to_string(),
        last_inference: s
            .last_inference_ms
            .load(std::sync::atomic::Ordering::Relaxed),
        inference_count: s.inference_count.load(std::sync::atomic::Ordering::Relaxed),
        execution_count: s.execution_count.load(std::sync::atomic::Ordering::Relaxed),
        inference_stats: Some(InferStatistics {
            success: duration(&s.success),
            fail: Some(StatisticDuration {
                count: fail_count,
                ns: fail_ns,
            }),
            queue: duration(&s.queue),
            compute_input: duration(&s.compute_input),
            compute_infer: duration(&s.compute_infer),
            compute_output: duration(&s.compute_output),
            cache_hit: duration(&s.cache_hit),
            cache_miss: duration(&s.cache_miss),
        }),
        batch_stats,
        ..Default::default()
    }
}
