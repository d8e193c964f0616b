//! ModelInferRequest → engine InferRequest. Every check happens here, before anything is queued:
//! names, datatypes, shapes, batch size, byte sizes (computed without overflow, before any
//! allocation), BYTES length prefixes, raw-vs-typed contents. Failures name the tensor.
use std::collections::{HashMap, HashSet};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};

use crate::model::manager::LoadedModel;
use crate::model::validate::TensorSpec;
use crate::proto::infer_parameter::ParameterChoice;
use crate::proto::model_infer_request::InferInputTensor;
use crate::proto::{InferParameter, InferTensorContents, ModelInferRequest};
use crate::scheduler::InferRequest;
use crate::shm::{ShmError, ShmOutput, ShmRegistry};
use crate::tensor::names::{shown, shown_str};
use crate::tensor::{
    decode_length_prefixed_exact, element_count, shape_matches, DataType, NamedTensor, Tensor,
    TensorData,
};

pub use crate::error::RequestError;

fn invalid(msg: impl Into<String>) -> RequestError {
    RequestError(msg.into())
}

/// The shared-memory location a tensor's parameters name, if any.
struct ShmLocation {
    region: String,
    offset: u64,
    byte_size: u64,
}

fn shm_location(
    tensor: &str,
    params: &HashMap<String, InferParameter>,
) -> Result<Option<ShmLocation>, RequestError> {
    let Some(region) = params.get("shared_memory_region") else {
        return Ok(None);
    };
    let region = match &region.parameter_choice {
        Some(ParameterChoice::StringParam(r)) => r.clone(),
        _ => {
            return Err(invalid(format!(
                "tensor '{}': parameter shared_memory_region must be a string",
                shown(tensor)
            )))
        }
    };
    let byte_size = params
        .get("shared_memory_byte_size")
        .ok_or_else(|| {
            invalid(format!(
                "tensor '{}': shared_memory_byte_size is required with shared_memory_region '{}'",
                shown(tensor),
                shown(&region)
            ))
        })
        .and_then(|p| int_param("shared_memory_byte_size", p))?;
    let offset = match params.get("shared_memory_offset") {
        Some(p) => int_param("shared_memory_offset", p)?,
        None => 0,
    };
    Ok(Some(ShmLocation {
        region,
        offset,
        byte_size,
    }))
}

fn shm_error(tensor: &str, e: ShmError) -> RequestError {
    invalid(format!("tensor '{}': {e}", shown(tensor)))
}

/// A decoded request plus where its outputs go when the client named shared-memory regions.
pub struct DecodedRequest {
    pub request: InferRequest,
    pub shm_outputs: HashMap<String, ShmOutput>,
    /// Outputs asked for with Triton's `classification: N` parameter, with their N.
    pub classifications: HashMap<String, usize>,
}

/// Decodes and validates a request against the model it was routed to.
/// `span` is the request's own (see `infer`), handed in because looking up the current one costs a
/// dispatcher lookup on every request even when tracing is off.
pub fn decode_request(
    mut req: ModelInferRequest,
    model: &LoadedModel,
    shm: &ShmRegistry,
    span: tracing::Span,
) -> Result<DecodedRequest, RequestError> {
    let name = &model.name;
    check_single_source(&req, name)?;
    check_input_names(&req, model)?;
    // raw_input_contents holds one entry per input that is not read from shared memory, in order.
    let inline_inputs = req
        .inputs
        .iter()
        .filter(|i| !i.parameters.contains_key("shared_memory_region"))
        .count();
    let use_raw = !req.raw_input_contents.is_empty();
    if use_raw && req.raw_input_contents.len() != inline_inputs {
        return Err(invalid(format!(
            "expected {inline_inputs} raw_input_contents (one per input not in shared memory) but got {} for model '{name}'",
            req.raw_input_contents.len()
        )));
    }
    let raw_inputs = std::mem::take(&mut req.raw_input_contents);
    let mut raw_contents = raw_inputs.into_iter();
    let max_batch = model.max_batch_size();
    let mut batch_size: Option<i64> = None;
    let mut inputs = Vec::with_capacity(req.inputs.len());
    // Taken by value so typed BYTES elements move into the tensor instead of being copied.
    for mut input in std::mem::take(&mut req.inputs) {
        let spec = model
            .inputs
            .iter()
            .find(|s| s.name == input.name)
            .ok_or_else(|| {
                invalid(format!(
                    "unexpected inference input '{}' for model '{name}'",
                    shown(&input.name)
                ))
            })?;
        check_shape(&input, spec, max_batch, name, &mut batch_size)?;
        let in_shm = input.parameters.contains_key("shared_memory_region");
        let raw = if use_raw && !in_shm {
            raw_contents.next()
        } else {
            None
        };
        let tensor = decode_tensor(&mut input, spec, max_batch > 0, raw, shm)?;
        inputs.push(NamedTensor {
            name: input.name,
            tensor,
        });
    }
    let requested_outputs = requested_outputs(&req, model)?;
    let shm_outputs = shm_outputs(&req, shm)?;
    let classifications = super::classification::requested(&req.outputs)?;
    let (priority, timeout) = scheduling_parameters(&req.parameters)?;
    let request = InferRequest {
        id: req.id,
        inputs,
        requested_outputs,
        priority,
        timeout,
        span,
    };
    Ok(DecodedRequest {
        request,
        shm_outputs,
        classifications,
    })
}

/// Triton's first check, per input: typed `contents` and `raw_input_contents` exclude each other.
fn check_single_source(req: &ModelInferRequest, model: &str) -> Result<(), RequestError> {
    if req.raw_input_contents.is_empty() {
        return Ok(());
    }
    let both = req
        .inputs
        .iter()
        .find(|i| i.contents.is_some() && !i.parameters.contains_key("shared_memory_region"));
    match both {
        Some(input) => Err(invalid(format!(
            "contents field must not be specified when using raw_input_contents for '{}' for model '{model}'",
            input.name
        ))),
        None => Ok(()),
    }
}

/// Output regions are resolved before the request is queued, so a wrong region fails up front.
fn shm_outputs(
    req: &ModelInferRequest,
    shm: &ShmRegistry,
) -> Result<HashMap<String, ShmOutput>, RequestError> {
    let mut outputs = HashMap::new();
    for output in &req.outputs {
        if let Some(loc) = shm_location(&output.name, &output.parameters)? {
            let target = shm
                .output(&loc.region, loc.offset, loc.byte_size)
                .map_err(|e| shm_error(&output.name, e))?;
            outputs.insert(output.name.clone(), target);
        }
    }
    Ok(outputs)
}

fn check_input_names(req: &ModelInferRequest, model: &LoadedModel) -> Result<(), RequestError> {
    if let Some(name) = repeated_name(&req.inputs) {
        return Err(invalid(format!(
            "input '{}' is given more than once",
            shown(name)
        )));
    }
    let missing: Vec<&str> = model
        .inputs
        .iter()
        .map(|s| s.name.as_str())
        .filter(|n| !req.inputs.iter().any(|i| i.name == *n))
        .collect();
    if !missing.is_empty() {
        return Err(invalid(format!(
            "expected {} inputs but got {} inputs for model '{}'; missing required input(s) {missing:?}",
            model.inputs.len(),
            req.inputs.len(),
            model.name
        )));
    }
    Ok(())
}

/// Up to this many inputs, names are compared pairwise: cheaper than hashing each name, which is
/// what every request with a few inputs would otherwise pay.
const PAIRWISE_NAME_CHECK_MAX: usize = 16;

/// The first input name that repeats an earlier one. Pairwise for a few inputs; past that through a
/// set, so a request with thousands of inputs costs linear time, not quadratic.
fn repeated_name(inputs: &[InferInputTensor]) -> Option<&str> {
    if inputs.len() <= PAIRWISE_NAME_CHECK_MAX {
        return inputs
            .iter()
            .enumerate()
            .find(|(i, input)| inputs[..*i].iter().any(|e| e.name == input.name))
            .map(|(_, input)| input.name.as_str());
    }
    let mut seen = HashSet::with_capacity(inputs.len());
    inputs
        .iter()
        .find(|input| !seen.insert(input.name.as_str()))
        .map(|input| input.name.as_str())
}

fn check_shape(
    input: &InferInputTensor,
    spec: &TensorSpec,
    max_batch: usize,
    model: &str,
    batch_size: &mut Option<i64>,
) -> Result<(), RequestError> {
    let name = shown(&input.name);
    let datatype = DataType::parse(&input.datatype).ok_or_else(|| {
        invalid(format!(
            "input '{name}' has unknown datatype '{}'",
            shown(&input.datatype)
        ))
    })?;
    if datatype != spec.dtype {
        return Err(invalid(format!(
            "inference input '{name}' data-type is '{}', but model '{model}' expects '{}'",
            input.datatype, spec.dtype
        )));
    }
    let shape = &input.shape;
    if shape.iter().any(|&d| d < 0) {
        return Err(invalid(format!(
            "input '{name}' has a negative dimension in shape {}",
            shown(&format!("{shape:?}"))
        )));
    }
    let dims = if max_batch > 0 {
        let Some(&batch) = shape.first() else {
            return Err(invalid(format!(
                "input '{name}' for model '{model}' needs a batch dimension: expected shape [-1,{}], got []",
                join(&spec.dims)
            )));
        };
        if batch < 1 || batch as usize > max_batch {
            return Err(invalid(format!(
                "inference request batch-size must be <= {max_batch} for '{model}' (input '{name}' has batch {batch})"
            )));
        }
        if batch_size.is_some_and(|b| b != batch) {
            return Err(invalid(format!(
                "input '{name}' has batch size {batch}, different from the other inputs"
            )));
        }
        *batch_size = Some(batch);
        &shape[1..]
    } else {
        &shape[..]
    };
    if !shape_matches(&spec.dims, dims) {
        let expected = if max_batch > 0 {
            format!("[-1,{}]", join(&spec.dims))
        } else {
            format!("[{}]", join(&spec.dims))
        };
        return Err(invalid(format!(
            "unexpected shape for input '{name}' for model '{model}'. Expected {expected}, got [{}]",
            shown(&join(shape))
        )));
    }
    Ok(())
}

fn join(dims: &[i64]) -> String {
    dims.iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// The shape the graph receives: the config's `reshape` applied to the non-batch dims. Without a
/// reshape it is the client's shape, moved rather than copied.
fn model_shape(spec: &TensorSpec, shape: Vec<i64>, batched: bool) -> Vec<i64> {
    if spec.reshape.is_none() {
        return shape;
    }
    if !batched {
        return spec.model_dims(&shape);
    }
    let mut out = vec![shape[0]];
    out.extend(spec.model_dims(&shape[1..]));
    out
}

fn decode_tensor(
    input: &mut InferInputTensor,
    spec: &TensorSpec,
    batched: bool,
    raw: Option<Bytes>,
    registry: &ShmRegistry,
) -> Result<Tensor, RequestError> {
    let full_name = input.name.as_str();
    // Errors name the input as `shown` cuts it; only a name too long to show whole is copied.
    let name = shown_str(full_name);
    let name = name.as_ref();
    let count = element_count(&input.shape).map_err(|e| invalid(format!("input '{name}': {e}")))?;
    let shm = match shm_location(full_name, &input.parameters)? {
        Some(loc) => Some(
            registry
                .read(&loc.region, loc.offset, loc.byte_size)
                .map_err(|e| shm_error(name, e))?,
        ),
        None => None,
    };
    let typed = input.contents.as_mut().filter(|c| !contents_empty(c));
    let sources = [raw.is_some(), typed.is_some(), shm.is_some()]
        .iter()
        .filter(|b| **b)
        .count();
    if sources > 1 {
        return Err(invalid(format!(
            "input '{name}' has its data given more than once (raw_input_contents, typed contents or shared memory): use one"
        )));
    }
    let data = match (raw.or(shm), typed) {
        (Some(bytes), _) => from_raw(name, spec.dtype, count, bytes)?,
        (None, Some(contents)) => from_typed(name, spec.dtype, count, contents)?,
        (None, None) if count == 0 => empty_data(spec.dtype),
        (None, None) => return Err(invalid(format!("input '{name}' has no data"))),
    };
    let shape = model_shape(spec, std::mem::take(&mut input.shape), batched);
    Tensor::new(name, spec.dtype, shape, data).map_err(|e| invalid(e.to_string()))
}

fn empty_data(dtype: DataType) -> TensorData {
    match dtype {
        DataType::Bytes => TensorData::Strings(Vec::new()),
        _ => TensorData::Fixed(Bytes::new()),
    }
}

/// Raw bytes: the size is checked against the shape before anything else is done with them.
fn from_raw(
    name: &str,
    dtype: DataType,
    count: usize,
    raw: Bytes,
) -> Result<TensorData, RequestError> {
    match dtype.element_size() {
        Some(size) => {
            let expected = count.checked_mul(size).ok_or_else(|| {
                invalid(format!("input '{name}': byte size of the shape overflows"))
            })?;
            if raw.len() != expected {
                return Err(invalid(format!(
                    "input byte size mismatch for input '{name}'. Expected {expected}, got {}",
                    raw.len()
                )));
            }
            Ok(TensorData::Fixed(raw))
        }
        None => {
            let items = decode_length_prefixed_exact(&raw, count)
                .map_err(|e| invalid(format!("input '{name}' BYTES data: {e}")))?;
            Ok(TensorData::Strings(items))
        }
    }
}

fn contents_empty(c: &InferTensorContents) -> bool {
    c.bool_contents.is_empty()
        && c.int_contents.is_empty()
        && c.int64_contents.is_empty()
        && c.uint_contents.is_empty()
        && c.uint64_contents.is_empty()
        && c.fp32_contents.is_empty()
        && c.fp64_contents.is_empty()
        && c.bytes_contents.is_empty()
}

/// Typed contents: the element count must equal the shape's before the little-endian copy is made,
/// and every value must fit the datatype (an INT8 tensor refuses 300 rather than wrapping it).
fn from_typed(
    name: &str,
    dtype: DataType,
    count: usize,
    c: &mut InferTensorContents,
) -> Result<TensorData, RequestError> {
    let wrong_count = |found: usize| {
        invalid(format!(
            "input '{name}' has {found} elements in its typed contents but its shape needs {count}"
        ))
    };
    /// Packs `items` little-endian; `put` refuses a value that does not fit.
    fn pack<T: Copy + std::fmt::Display>(
        name: &str,
        dtype: DataType,
        items: &[T],
        put: impl Fn(&mut BytesMut, T) -> bool,
    ) -> Result<TensorData, RequestError> {
        let size = dtype.element_size().unwrap_or(1);
        let mut out = BytesMut::with_capacity(items.len() * size);
        for (index, &item) in items.iter().enumerate() {
            if !put(&mut out, item) {
                return Err(invalid(format!(
                    "input '{name}': typed value {item} at index {index} is out of range for {dtype}"
                )));
            }
        }
        Ok(TensorData::Fixed(out.freeze()))
    }
    if matches!(dtype, DataType::Fp16 | DataType::Bf16) {
        return Err(invalid(format!(
            "input '{name}': {dtype} data must be sent in raw_input_contents (the protocol has no typed field for it)"
        )));
    }
    let found = typed_len(dtype, c);
    if found != count {
        return Err(wrong_count(found));
    }
    match dtype {
        DataType::Bool => pack(name, dtype, &c.bool_contents, |o, v| {
            o.put_u8(v as u8);
            true
        }),
        DataType::Int8 => pack(name, dtype, &c.int_contents, |o, v| {
            i8::try_from(v).map(|v| o.put_i8(v)).is_ok()
        }),
        DataType::Int16 => pack(name, dtype, &c.int_contents, |o, v| {
            i16::try_from(v).map(|v| o.put_i16_le(v)).is_ok()
        }),
        DataType::Int32 => pack(name, dtype, &c.int_contents, |o, v| {
            o.put_i32_le(v);
            true
        }),
        DataType::Int64 => pack(name, dtype, &c.int64_contents, |o, v| {
            o.put_i64_le(v);
            true
        }),
        DataType::Uint8 => pack(name, dtype, &c.uint_contents, |o, v| {
            u8::try_from(v).map(|v| o.put_u8(v)).is_ok()
        }),
        DataType::Uint16 => pack(name, dtype, &c.uint_contents, |o, v| {
            u16::try_from(v).map(|v| o.put_u16_le(v)).is_ok()
        }),
        DataType::Uint32 => pack(name, dtype, &c.uint_contents, |o, v| {
            o.put_u32_le(v);
            true
        }),
        DataType::Uint64 => pack(name, dtype, &c.uint64_contents, |o, v| {
            o.put_u64_le(v);
            true
        }),
        DataType::Fp32 => pack(name, dtype, &c.fp32_contents, |o, v| {
            o.put_f32_le(v);
            true
        }),
        DataType::Fp64 => pack(name, dtype, &c.fp64_contents, |o, v| {
            o.put_f64_le(v);
            true
        }),
        DataType::Fp16 | DataType::Bf16 => Err(wrong_count(0)),
        // The decoded elements (slices of the request's buffer) move into the tensor as they are.
        DataType::Bytes => Ok(TensorData::Strings(std::mem::take(&mut c.bytes_contents))),
    }
}

/// The number of values in the typed field `dtype` reads.
fn typed_len(dtype: DataType, c: &InferTensorContents) -> usize {
    match dtype {
        DataType::Bool => c.bool_contents.len(),
        DataType::Int8 | DataType::Int16 | DataType::Int32 => c.int_contents.len(),
        DataType::Int64 => c.int64_contents.len(),
        DataType::Uint8 | DataType::Uint16 | DataType::Uint32 => c.uint_contents.len(),
        DataType::Uint64 => c.uint64_contents.len(),
        DataType::Fp32 => c.fp32_contents.len(),
        DataType::Fp64 => c.fp64_contents.len(),
        DataType::Fp16 | DataType::Bf16 => 0,
        DataType::Bytes => c.bytes_contents.len(),
    }
}

/// Bytes that decoding and running a request add beyond its wire bytes, reserved from the memory
/// budget before decoding: per BYTES element the engine's handle and ONNX Runtime's string object,
/// and for typed contents their packed copy. Counted from what is on the wire (a declared shape
/// larger than the data is refused by decoding, not charged).
pub fn decoding_overhead(req: &ModelInferRequest) -> u64 {
    let raw_bytes: u64 = req.raw_input_contents.iter().map(|r| r.len() as u64).sum();
    let mut total = 0u64;
    for input in &req.inputs {
        let Some(dtype) = DataType::parse(&input.datatype) else {
            continue;
        };
        let declared = element_count(&input.shape).unwrap_or(0) as u64;
        let typed = input.contents.as_ref().map_or(0, |c| typed_len(dtype, c)) as u64;
        let cost = match dtype.element_size() {
            // At most one element per 4-byte prefix of the raw data, or the typed elements.
            None => declared.min(raw_bytes / 4 + typed) * BYTES_ELEMENT_OVERHEAD,
            Some(size) => typed.saturating_mul(size as u64),
        };
        total = total.saturating_add(cost);
    }
    total
}

/// What one BYTES element costs beyond its payload while the request runs: a `Bytes` handle (32)
/// and an ONNX Runtime `std::string` (32) for the input, the same again for a string output of the
/// same shape. Measured: 32 MiB of empty elements (8 Mi) peaked about 800 MiB above the idle RSS.
pub const BYTES_ELEMENT_OVERHEAD: u64 = 128;

fn requested_outputs(
    req: &ModelInferRequest,
    model: &LoadedModel,
) -> Result<Vec<String>, RequestError> {
    let mut names = Vec::with_capacity(req.outputs.len());
    for output in &req.outputs {
        if !model.outputs.iter().any(|s| s.name == output.name) {
            return Err(invalid(format!(
                "unexpected inference output '{}' for model '{}'",
                shown(&output.name),
                model.name
            )));
        }
        if names.contains(&output.name) {
            return Err(invalid(format!(
                "output '{}' is requested more than once",
                shown(&output.name)
            )));
        }
        names.push(output.name.clone());
    }
    Ok(names)
}

fn int_param(key: &str, p: &InferParameter) -> Result<u64, RequestError> {
    match &p.parameter_choice {
        Some(ParameterChoice::Int64Param(v)) if *v >= 0 => Ok(*v as u64),
        Some(ParameterChoice::Uint64Param(v)) => Ok(*v),
        _ => Err(invalid(format!(
            "request parameter '{}' must be a non-negative integer",
            shown(key)
        ))),
    }
}

/// Triton's `priority` (level, 1 is highest, 0 = model default) and `timeout` (microseconds).
fn scheduling_parameters(
    params: &HashMap<String, InferParameter>,
) -> Result<(u32, Option<Duration>), RequestError> {
    let priority = match params.get("priority") {
        Some(p) => u32::try_from(int_param("priority", p)?)
            .map_err(|_| invalid("request parameter 'priority' is too large"))?,
        None => 0,
    };
    let timeout = match params.get("timeout") {
        Some(p) => match int_param("timeout", p)? {
            0 => None,
            us => Some(Duration::from_micros(us)),
        },
        None => None,
    };
    Ok((priority, timeout))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(names: &[&str]) -> Vec<InferInputTensor> {
        names
            .iter()
            .map(|name| InferInputTensor {
                name: name.to_string(),
                ..Default::default()
            })
            .collect()
    }

    #[test]
    fn a_repeated_input_name_is_found_pairwise_and_through_the_set() {
        assert_eq!(repeated_name(&inputs(&["a", "b", "a"])), Some("a"));
        assert_eq!(repeated_name(&inputs(&["a", "b", "c"])), None);
        let mut many: Vec<String> = (0..PAIRWISE_NAME_CHECK_MAX + 8)
            .map(|i| format!("in{i}"))
            .collect();
        let distinct: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_eq!(repeated_name(&inputs(&distinct)), None);
        many.push("in3".into());
        let repeated: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_eq!(repeated_name(&inputs(&repeated)), Some("in3"));
    }
}
