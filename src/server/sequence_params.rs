//! The sequence parameters of an inference request (`sequence_id` as an integer or a string,
//! `sequence_start`, `sequence_end`), read for models served by the sequence batcher.
use std::collections::HashMap;

use super::decode::RequestError;
use crate::proto::infer_parameter::ParameterChoice;
use crate::proto::InferParameter;
use crate::scheduler::sequence::{CorrelationId, SequenceControl};

pub fn sequence_control(
    params: &HashMap<String, InferParameter>,
) -> Result<SequenceControl, RequestError> {
    let correlation_id = match params
        .get("sequence_id")
        .and_then(|p| p.parameter_choice.as_ref())
    {
        None => CorrelationId::Uint(0),
        Some(ParameterChoice::Int64Param(n)) if *n >= 0 => CorrelationId::Uint(*n as u64),
        Some(ParameterChoice::Uint64Param(n)) => CorrelationId::Uint(*n),
        Some(ParameterChoice::StringParam(s)) => CorrelationId::Str(s.clone()),
        Some(_) => {
            return Err(RequestError(
                "request parameter 'sequence_id' must be a non-negative integer or a string".into(),
            ))
        }
    };
    Ok(SequenceControl {
        correlation_id,
        start: flag(params, "sequence_start")?,
        end: flag(params, "sequence_end")?,
    })
}

fn flag(params: &HashMap<String, InferParameter>, key: &str) -> Result<bool, RequestError> {
    match params.get(key).and_then(|p| p.parameter_choice.as_ref()) {
        None => Ok(false),
        Some(ParameterChoice::BoolParam(b)) => Ok(*b),
        Some(_) => Err(RequestError(format!(
            "request parameter '{key}' must be a boolean"
        ))),
    }
}
