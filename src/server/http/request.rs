//! The HTTP infer request (KServe v2 JSON, with Triton's binary tensor data extension) → the same
//! `ModelInferRequest` the gRPC door receives, so `decode_request` validates both alike.
//!
//! Binary tensors become `raw_input_contents` entries that are slices of the request body (no copy).
//! JSON `data` is written straight into little-endian bytes while it is parsed: the element count is
//! checked against the shape element by element, so no buffer is sized from a claimed shape (a
//! `[1099511627776]` shape with three numbers fails at the fourth, having allocated for three).
use std::collections::HashMap;

use bytes::{BufMut, Bytes};
use serde::de::{DeserializeSeed, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::error::HttpError;
use crate::proto::infer_parameter::ParameterChoice;
use crate::proto::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use crate::proto::{InferParameter, ModelInferRequest};
use crate::tensor::{element_count, DataType};

/// Parameters only the HTTP door reads; they never reach the engine.
const BINARY_DATA_SIZE: &str = "binary_data_size";
const BINARY_DATA: &str = "binary_data";
const BINARY_DATA_OUTPUT: &str = "binary_data_output";

#[derive(Deserialize)]
struct InferBody<'a> {
    #[serde(default)]
    id: String,
    #[serde(default)]
    parameters: Map<String, Value>,
    #[serde(borrow)]
    inputs: Vec<InputBody<'a>>,
    #[serde(default)]
    outputs: Vec<OutputBody>,
}

#[derive(Deserialize)]
struct InputBody<'a> {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Map<String, Value>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct OutputBody {
    name: String,
    #[serde(default)]
    parameters: Map<String, Value>,
}

/// How the client wants each output back: binary (after the JSON header) or JSON `data`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct OutputEncoding {
    /// `binary_data_output` on the request: the default for every output.
    pub all_binary: bool,
    /// `binary_data` on a requested output overrides the default for it.
    pub per_output: HashMap<String, bool>,
}

impl OutputEncoding {
    pub fn is_binary(&self, output: &str) -> bool {
        self.per_output
            .get(output)
            .copied()
            .unwrap_or(self.all_binary)
    }
}

/// An HTTP infer body as the engine's request plus how to encode the answer.
pub struct ParsedInfer {
    pub request: ModelInferRequest,
    pub encoding: OutputEncoding,
}

/// Splits `body` at `header_length` (the `Inference-Header-Content-Length` header, when binary
/// tensors follow the JSON) and builds the request for `model` / `version`.
pub fn parse_infer(
    body: Bytes,
    header_length: Option<usize>,
    model: &str,
    version: &str,
) -> Result<ParsedInfer, HttpError> {
    let json_len = header_length.unwrap_or(body.len());
    if json_len > body.len() {
        return Err(HttpError::bad_request(format!(
            "Inference-Header-Content-Length {json_len} is larger than the request body ({} bytes)",
            body.len()
        )));
    }
    let binary = body.slice(json_len..);
    let parsed: InferBody = serde_json::from_slice(&body[..json_len])
        .map_err(|e| HttpError::bad_request(format!("malformed inference request JSON: {e}")))?;
    let mut tail = BinaryTail {
        data: binary,
        offset: 0,
    };
    let mut inputs = Vec::with_capacity(parsed.inputs.len());
    let mut raw_input_contents = Vec::with_capacity(parsed.inputs.len());
    for input in parsed.inputs {
        let (tensor, raw) = input_tensor(input, &mut tail)?;
        inputs.push(tensor);
        raw_input_contents.extend(raw);
    }
    tail.finish()?;
    let mut encoding = OutputEncoding::default();
    let mut parameters = parsed.parameters;
    if let Some(all) = parameters.remove(BINARY_DATA_OUTPUT) {
        encoding.all_binary = as_bool(BINARY_DATA_OUTPUT, &all)?;
    }
    let mut outputs = Vec::with_capacity(parsed.outputs.len());
    for output in parsed.outputs {
        outputs.push(output_tensor(output, &mut encoding)?);
    }
    Ok(ParsedInfer {
        request: ModelInferRequest {
            model_name: model.to_string(),
            model_version: version.to_string(),
            id: parsed.id,
            parameters: parameters_of("request", parameters)?,
            inputs,
            outputs,
            raw_input_contents,
        },
        encoding,
    })
}

/// The binary tensors after the JSON header, handed out in input order.
struct BinaryTail {
    data: Bytes,
    offset: usize,
}

impl BinaryTail {
    fn take(&mut self, input: &str, size: usize) -> Result<Bytes, HttpError> {
        let left = self.data.len() - self.offset;
        if size > left {
            return Err(HttpError::bad_request(format!(
                "input '{input}': binary_data_size {size} is larger than the {left} bytes of binary data left in the request body"
            )));
        }
        let slice = self.data.slice(self.offset..self.offset + size);
        self.offset += size;
        Ok(slice)
    }

    fn finish(&self) -> Result<(), HttpError> {
        let left = self.data.len() - self.offset;
        if left > 0 {
            return Err(HttpError::bad_request(format!(
                "the request body has {left} bytes of binary data that no input's binary_data_size accounts for"
            )));
        }
        Ok(())
    }
}

fn input_tensor(
    input: InputBody<'_>,
    tail: &mut BinaryTail,
) -> Result<(InferInputTensor, Option<Bytes>), HttpError> {
    let name = input.name;
    let mut params = input.parameters;
    let binary_size = match params.remove(BINARY_DATA_SIZE) {
        Some(v) => Some(as_size(&name, &v)?),
        None => None,
    };
    let in_shm = params.contains_key("shared_memory_region");
    let raw = match (binary_size, input.data, in_shm) {
        (Some(_), Some(_), _) | (Some(_), _, true) | (_, Some(_), true) => {
            return Err(HttpError::bad_request(format!(
                "input '{name}' has its data given more than once (data, binary_data_size or shared memory): use one"
            )))
        }
        (Some(size), None, false) => Some(tail.take(&name, size)?),
        (None, Some(data), false) => Some(json_data(&name, &input.datatype, &input.shape, data)?),
        (None, None, true) => None,
        (None, None, false) => {
            return Err(HttpError::bad_request(format!(
                "input '{name}' has no data: give 'data', parameters.binary_data_size or a shared-memory region"
            )))
        }
    };
    let tensor = InferInputTensor {
        parameters: parameters_of(&format!("input '{name}'"), params)?,
        name,
        datatype: input.datatype,
        shape: input.shape,
        contents: None,
    };
    Ok((tensor, raw))
}

fn output_tensor(
    output: OutputBody,
    encoding: &mut OutputEncoding,
) -> Result<InferRequestedOutputTensor, HttpError> {
    let mut params = output.parameters;
    if let Some(binary) = params.remove(BINARY_DATA) {
        let binary = as_bool(&format!("output '{}' {BINARY_DATA}", output.name), &binary)?;
        encoding.per_output.insert(output.name.clone(), binary);
    }
    // `classification: N` travels on as an int64 parameter; the shared decode path
    // (server::classification) finds it there, as it does for gRPC.
    Ok(InferRequestedOutputTensor {
        parameters: parameters_of(&format!("output '{}'", output.name), params)?,
        name: output.name,
    })
}

fn as_bool(what: &str, value: &Value) -> Result<bool, HttpError> {
    value
        .as_bool()
        .ok_or_else(|| HttpError::bad_request(format!("parameter {what} must be true or false")))
}

fn as_size(input: &str, value: &Value) -> Result<usize, HttpError> {
    value
        .as_u64()
        .and_then(|v| usize::try_from(v).ok())
        .ok_or_else(|| {
            HttpError::bad_request(format!(
                "input '{input}': binary_data_size must be a non-negative integer, got {value}"
            ))
        })
}

/// JSON parameters as the protocol's typed parameters (bool, int64, uint64 above i64, double, string).
pub fn parameters_of(
    owner: &str,
    params: Map<String, Value>,
) -> Result<HashMap<String, InferParameter>, HttpError> {
    params
        .into_iter()
        .map(|(key, value)| {
            let choice = match &value {
                Value::Bool(b) => ParameterChoice::BoolParam(*b),
                Value::String(s) => ParameterChoice::StringParam(s.clone()),
                Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
                    (Some(i), _, _) => ParameterChoice::Int64Param(i),
                    (None, Some(u), _) => ParameterChoice::Uint64Param(u),
                    (None, None, Some(f)) => ParameterChoice::DoubleParam(f),
                    _ => return Err(bad_parameter(owner, &key)),
                },
                _ => return Err(bad_parameter(owner, &key)),
            };
            Ok((
                key,
                InferParameter {
                    parameter_choice: Some(choice),
                },
            ))
        })
        .collect()
}

fn bad_parameter(owner: &str, key: &str) -> HttpError {
    HttpError::bad_request(format!(
        "{owner} parameter '{key}' must be a bool, a number or a string"
    ))
}

/// JSON `data` (nested or flat, row-major) → the tensor's bytes as `raw_input_contents` holds them.
fn json_data(
    name: &str,
    datatype: &str,
    shape: &[i64],
    data: &RawValue,
) -> Result<Bytes, HttpError> {
    let dtype = DataType::parse(datatype).ok_or_else(|| {
        HttpError::bad_request(format!("input '{name}' has unknown datatype '{datatype}'"))
    })?;
    if matches!(dtype, DataType::Fp16 | DataType::Bf16) {
        return Err(HttpError::bad_request(format!(
            "input '{name}': {dtype} data cannot be given as JSON; send it as binary data (parameters.binary_data_size)"
        )));
    }
    let expected =
        element_count(shape).map_err(|e| HttpError::bad_request(format!("input '{name}': {e}")))?;
    // A JSON element takes at least two bytes ("1,"), so this bounds the buffer by the body.
    let most = expected.min(data.get().len() / 2 + 1);
    let mut writer = ElementWriter {
        dtype,
        out: Vec::with_capacity(most.saturating_mul(dtype.element_size().unwrap_or(8))),
        count: 0,
        expected,
    };
    let mut de = serde_json::Deserializer::from_str(data.get());
    Elements(&mut writer)
        .deserialize(&mut de)
        .map_err(|e| HttpError::bad_request(format!("input '{name}' data: {e}")))?;
    if writer.count != expected {
        return Err(HttpError::bad_request(format!(
            "input '{name}' has {} elements in 'data' but its shape {shape:?} needs {expected}",
            writer.count
        )));
    }
    Ok(Bytes::from(writer.out))
}

/// Writes parsed JSON elements as little-endian bytes of one datatype, refusing past `expected`.
struct ElementWriter {
    dtype: DataType,
    out: Vec<u8>,
    count: usize,
    expected: usize,
}

impl ElementWriter {
    fn admit(&mut self) -> Result<(), String> {
        self.count += 1;
        if self.count > self.expected {
            return Err(format!("more elements than the shape's {}", self.expected));
        }
        Ok(())
    }

    fn wrong(&self, what: &str) -> String {
        format!("{what} is not a valid {} element", self.dtype)
    }

    fn int(&mut self, v: i128) -> Result<(), String> {
        self.admit()?;
        let out = &mut self.out;
        let fits = |lo: i128, hi: i128| (lo..=hi).contains(&v);
        match self.dtype {
            DataType::Int8 if fits(i8::MIN.into(), i8::MAX.into()) => out.put_i8(v as i8),
            DataType::Int16 if fits(i16::MIN.into(), i16::MAX.into()) => out.put_i16_le(v as i16),
            DataType::Int32 if fits(i32::MIN.into(), i32::MAX.into()) => out.put_i32_le(v as i32),
            DataType::Int64 if fits(i64::MIN.into(), i64::MAX.into()) => out.put_i64_le(v as i64),
            DataType::Uint8 if fits(0, u8::MAX.into()) => out.put_u8(v as u8),
            DataType::Uint16 if fits(0, u16::MAX.into()) => out.put_u16_le(v as u16),
            DataType::Uint32 if fits(0, u32::MAX.into()) => out.put_u32_le(v as u32),
            DataType::Uint64 if fits(0, u64::MAX.into()) => out.put_u64_le(v as u64),
            DataType::Fp32 => out.put_f32_le(v as f32),
            DataType::Fp64 => out.put_f64_le(v as f64),
            _ => return Err(self.wrong(&format!("the integer {v}"))),
        }
        Ok(())
    }

    fn float(&mut self, v: f64) -> Result<(), String> {
        self.admit()?;
        match self.dtype {
            DataType::Fp32 => self.out.put_f32_le(v as f32),
            DataType::Fp64 => self.out.put_f64_le(v),
            _ => return Err(self.wrong(&format!("the number {v}"))),
        }
        Ok(())
    }

    fn boolean(&mut self, v: bool) -> Result<(), String> {
        self.admit()?;
        match self.dtype {
            DataType::Bool => self.out.put_u8(v as u8),
            _ => return Err(self.wrong(&format!("the boolean {v}"))),
        }
        Ok(())
    }

    fn string(&mut self, v: &str) -> Result<(), String> {
        self.admit()?;
        let len = u32::try_from(v.len()).map_err(|_| "a string longer than 4 GiB".to_string())?;
        match self.dtype {
            DataType::Bytes => {
                self.out.put_u32_le(len);
                self.out.put_slice(v.as_bytes());
            }
            _ => return Err(self.wrong("a string")),
        }
        Ok(())
    }
}

/// Walks nested arrays depth-first (row-major), feeding every leaf to the writer.
struct Elements<'w>(&'w mut ElementWriter);

impl<'de> DeserializeSeed<'de> for Elements<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Elements<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "an array of {} elements", self.0.dtype)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Elements(&mut *self.0))?.is_some() {}
        Ok(())
    }

    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<(), E> {
        self.0.boolean(v).map_err(E::custom)
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<(), E> {
        self.0.int(v.into()).map_err(E::custom)
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<(), E> {
        self.0.int(v.into()).map_err(E::custom)
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<(), E> {
        self.0.float(v).map_err(E::custom)
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<(), E> {
        self.0.string(v).map_err(E::custom)
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        Err(E::custom(self.0.wrong("null")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<ParsedInfer, HttpError> {
        parse_infer(Bytes::copy_from_slice(json.as_bytes()), None, "m", "")
    }

    #[test]
    fn nested_and_flat_json_give_the_same_bytes() {
        let flat =
            parse(r#"{"inputs":[{"name":"X","shape":[2,2],"datatype":"INT32","data":[1,2,3,4]}]}"#)
                .unwrap();
        let nested = parse(
            r#"{"inputs":[{"name":"X","shape":[2,2],"datatype":"INT32","data":[[1,2],[3,4]]}]}"#,
        )
        .unwrap();
        assert_eq!(
            flat.request.raw_input_contents,
            nested.request.raw_input_contents
        );
        assert_eq!(flat.request.raw_input_contents[0].len(), 16);
    }

    #[test]
    fn element_counts_out_of_range_and_dtypes_are_refused() {
        let cases = [
            (
                r#"{"inputs":[{"name":"X","shape":[3],"datatype":"INT32","data":[1,2]}]}"#,
                "needs 3",
            ),
            (
                r#"{"inputs":[{"name":"X","shape":[1099511627776],"datatype":"FP32","data":[1,2,3]}]}"#,
                "needs 1099511627776",
            ),
            (
                r#"{"inputs":[{"name":"X","shape":[1],"datatype":"INT32","data":[1,2]}]}"#,
                "more elements",
            ),
            (
                r#"{"inputs":[{"name":"X","shape":[1],"datatype":"INT8","data":[300]}]}"#,
                "not a valid INT8",
            ),
            (
                r#"{"inputs":[{"name":"X","shape":[1],"datatype":"INT32","data":[1.5]}]}"#,
                "not a valid INT32",
            ),
            (
                r#"{"inputs":[{"name":"X","shape":[1],"datatype":"FP16","data":[1.5]}]}"#,
                "binary data",
            ),
            (
                r#"{"inputs":[{"name":"X","shape":[1],"datatype":"INT32"}]}"#,
                "has no data",
            ),
            (
                r#"{"inputs":[{"name":"X","shape":[1],"datatype":"INT32","data":[1]}"#,
                "malformed",
            ),
        ];
        for (json, needle) in cases {
            let error = parse(json)
                .err()
                .unwrap_or_else(|| panic!("{json} was accepted"));
            assert_eq!(error.status, axum::http::StatusCode::BAD_REQUEST);
            assert!(error.message.contains(needle), "{json}: {}", error.message);
        }
    }

    #[test]
    fn binary_tail_sizes_must_add_up() {
        let header = r#"{"inputs":[{"name":"X","shape":[2],"datatype":"INT32","parameters":{"binary_data_size":8}}],"outputs":[{"name":"Y","parameters":{"binary_data":true}}]}"#;
        let mut body = header.as_bytes().to_vec();
        body.extend_from_slice(&[1, 0, 0, 0, 2, 0, 0, 0]);
        let ok = parse_infer(Bytes::from(body.clone()), Some(header.len()), "m", "1").unwrap();
        assert_eq!(
            ok.request.raw_input_contents[0].as_ref(),
            &body[header.len()..]
        );
        assert!(ok.encoding.is_binary("Y"));
        assert!(!ok.encoding.is_binary("Z"));
        assert!(ok.request.inputs[0].parameters.is_empty());

        body.push(0);
        let extra = parse_infer(Bytes::from(body.clone()), Some(header.len()), "m", "1");
        assert!(extra.err().unwrap().message.contains("accounts for"));
        let short = parse_infer(
            Bytes::from(body[..header.len() + 4].to_vec()),
            Some(header.len()),
            "m",
            "1",
        );
        assert!(short
            .err()
            .unwrap()
            .message
            .contains("larger than the 4 bytes"));
        let outside = parse_infer(Bytes::from(body), Some(10_000), "m", "1");
        assert!(outside
            .err()
            .unwrap()
            .message
            .contains("Inference-Header-Content-Length"));
    }

    #[test]
    fn classification_reaches_the_requested_output() {
        let parsed = parse(
            r#"{"inputs":[{"name":"X","shape":[1],"datatype":"FP32","data":[1]}],"outputs":[{"name":"Y","parameters":{"classification":3,"binary_data":false}}]}"#,
        )
        .unwrap();
        let output = &parsed.request.outputs[0];
        assert_eq!(output.name, "Y");
        assert_eq!(
            output.parameters["classification"].parameter_choice,
            Some(ParameterChoice::Int64Param(3))
        );
        assert!(!output.parameters.contains_key(BINARY_DATA));
        assert!(!parsed.encoding.is_binary("Y"));
    }

    #[test]
    fn bytes_become_length_prefixed() {
        let parsed = parse(
            r#"{"inputs":[{"name":"S","shape":[2],"datatype":"BYTES","data":["ab","\u00e9"]}]}"#,
        )
        .unwrap();
        assert_eq!(
            parsed.request.raw_input_contents[0].as_ref(),
            &[2, 0, 0, 0, b'a', b'b', 2, 0, 0, 0, 0xc3, 0xa9]
        );
    }
}
