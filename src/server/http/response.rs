//! `ModelInferResponse` (what the shared engine entry returns) → the HTTP answer: a JSON header with
//! each output either as JSON `data` or, with Triton's binary tensor data extension, as raw bytes
//! after the header (`parameters.binary_data_size`, `Inference-Header-Content-Length`).
use std::fmt::Write as _;

use bytes::Bytes;

use super::error::HttpError;
use super::request::OutputEncoding;
use crate::proto::infer_parameter::ParameterChoice;
use crate::proto::{InferParameter, ModelInferResponse};
use crate::tensor::{decode_length_prefixed, DataType};

/// The JSON header and the binary outputs that follow it, in output order.
pub struct EncodedInfer {
    pub header: String,
    pub binary: Vec<Bytes>,
}

impl EncodedInfer {
    /// Whether the body carries binary outputs (and so needs `Inference-Header-Content-Length`).
    pub fn has_binary(&self) -> bool {
        !self.binary.is_empty()
    }

    /// The whole body: header then binary outputs. Copies the outputs once (into the body).
    pub fn into_body(self) -> Vec<u8> {
        let total = self.header.len() + self.binary.iter().map(Bytes::len).sum::<usize>();
        let mut body = Vec::with_capacity(total);
        body.extend_from_slice(self.header.as_bytes());
        for part in &self.binary {
            body.extend_from_slice(part);
        }
        body
    }
}

pub fn encode_infer(
    response: ModelInferResponse,
    encoding: &OutputEncoding,
) -> Result<EncodedInfer, HttpError> {
    let mut header = String::with_capacity(256);
    header.push_str("{\"model_name\":");
    push_json_string(&mut header, &response.model_name);
    header.push_str(",\"model_version\":");
    push_json_string(&mut header, &response.model_version);
    if !response.id.is_empty() {
        header.push_str(",\"id\":");
        push_json_string(&mut header, &response.id);
    }
    header.push_str(",\"outputs\":[");
    let mut binary = Vec::new();
    let raw = response.raw_output_contents.into_iter();
    for (i, (output, raw)) in response.outputs.into_iter().zip(raw).enumerate() {
        if i > 0 {
            header.push(',');
        }
        header.push_str("{\"name\":");
        push_json_string(&mut header, &output.name);
        header.push_str(",\"datatype\":");
        push_json_string(&mut header, &output.datatype);
        let _ = write!(header, ",\"shape\":{:?}", output.shape);
        let mut parameters = output.parameters;
        let in_shm = parameters.contains_key("shared_memory_region");
        let as_binary = !in_shm && encoding.is_binary(&output.name);
        if as_binary {
            parameters.insert(
                "binary_data_size".into(),
                InferParameter {
                    parameter_choice: Some(ParameterChoice::Int64Param(raw.len() as i64)),
                },
            );
        }
        if !parameters.is_empty() {
            header.push_str(",\"parameters\":");
            push_parameters(&mut header, &parameters);
        }
        if as_binary {
            binary.push(raw);
        } else if !in_shm {
            header.push_str(",\"data\":");
            push_data(&mut header, &output.name, &output.datatype, &raw)?;
        }
        header.push('}');
    }
    header.push_str("]}");
    Ok(EncodedInfer { header, binary })
}

fn push_json_string(out: &mut String, value: &str) {
    // serde_json escapes exactly as JSON requires; a &str always serialises.
    out.push_str(&serde_json::to_string(value).unwrap_or_else(|_| "\"\"".into()));
}

fn push_parameters(
    out: &mut String,
    parameters: &std::collections::HashMap<String, InferParameter>,
) {
    let mut keys: Vec<&String> = parameters.keys().collect();
    keys.sort();
    out.push('{');
    for (i, key) in keys.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_json_string(out, key);
        out.push(':');
        match &parameters[key].parameter_choice {
            Some(ParameterChoice::BoolParam(b)) => {
                let _ = write!(out, "{b}");
            }
            Some(ParameterChoice::Int64Param(v)) => {
                let _ = write!(out, "{v}");
            }
            Some(ParameterChoice::Uint64Param(v)) => {
                let _ = write!(out, "{v}");
            }
            Some(ParameterChoice::DoubleParam(v)) => push_float(out, *v),
            Some(ParameterChoice::StringParam(s)) => push_json_string(out, s),
            None => out.push_str("null"),
        }
    }
    out.push('}');
}

/// JSON numbers cannot be NaN or infinite; as serde_json does, those become null. A whole number
/// keeps its ".0" so typed clients still see a float.
fn push_float(out: &mut String, v: f64) {
    push_finite(out, v.is_finite(), format_args!("{v}"));
}

fn push_finite(out: &mut String, finite: bool, v: std::fmt::Arguments) {
    if !finite {
        out.push_str("null");
        return;
    }
    let start = out.len();
    let _ = out.write_fmt(v);
    if !out[start..].contains('.') {
        out.push_str(".0");
    }
}

/// An output's raw little-endian bytes as a flat JSON array (row-major, as Triton answers).
fn push_data(out: &mut String, name: &str, datatype: &str, raw: &Bytes) -> Result<(), HttpError> {
    let dtype = DataType::parse(datatype).ok_or_else(|| {
        HttpError::new(
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            format!("output '{name}' has unknown datatype '{datatype}'"),
        )
    })?;
    out.push('[');
    let mut first = true;
    let mut sep = |out: &mut String| {
        if !first {
            out.push(',');
        }
        first = false;
    };
    macro_rules! each {
        ($size:expr, |$c:ident| $body:expr) => {
            for $c in raw.chunks_exact($size) {
                sep(out);
                $body;
            }
        };
    }
    match dtype {
        DataType::Bool => each!(1, |c| out.push_str(if c[0] != 0 {
            "true"
        } else {
            "false"
        })),
        DataType::Int8 => each!(1, |c| {
            let _ = write!(out, "{}", c[0] as i8);
        }),
        DataType::Uint8 => each!(1, |c| {
            let _ = write!(out, "{}", c[0]);
        }),
        DataType::Int16 => each!(2, |c| {
            let _ = write!(out, "{}", i16::from_le_bytes([c[0], c[1]]));
        }),
        DataType::Uint16 => each!(2, |c| {
            let _ = write!(out, "{}", u16::from_le_bytes([c[0], c[1]]));
        }),
        DataType::Int32 => each!(4, |c| {
            let _ = write!(out, "{}", i32::from_le_bytes(le4(c)));
        }),
        DataType::Uint32 => each!(4, |c| {
            let _ = write!(out, "{}", u32::from_le_bytes(le4(c)));
        }),
        DataType::Int64 => each!(8, |c| {
            let _ = write!(out, "{}", i64::from_le_bytes(le8(c)));
        }),
        DataType::Uint64 => each!(8, |c| {
            let _ = write!(out, "{}", u64::from_le_bytes(le8(c)));
        }),
        DataType::Fp16 => each!(2, |c| push_float(
            out,
            half::f16::from_le_bytes([c[0], c[1]]).to_f64()
        )),
        DataType::Bf16 => each!(2, |c| push_float(
            out,
            half::bf16::from_le_bytes([c[0], c[1]]).to_f64()
        )),
        DataType::Fp32 => each!(4, |c| push_float32(out, f32::from_le_bytes(le4(c)))),
        DataType::Fp64 => each!(8, |c| push_float(out, f64::from_le_bytes(le8(c)))),
        DataType::Bytes => {
            let items = decode_length_prefixed(raw).map_err(|e| {
                HttpError::new(
                    axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                    format!("output '{name}': {e}"),
                )
            })?;
            for item in items {
                let text = std::str::from_utf8(&item).map_err(|_| {
                    HttpError::bad_request(format!(
                        "output '{name}' holds BYTES that are not UTF-8 and cannot be JSON strings; request it with parameters.binary_data=true"
                    ))
                })?;
                sep(out);
                push_json_string(out, text);
            }
        }
    }
    out.push(']');
    Ok(())
}

/// f32 printed at f32 precision (0.1, not 0.10000000149011612).
fn push_float32(out: &mut String, v: f32) {
    push_finite(out, v.is_finite(), format_args!("{v}"));
}

fn le4(c: &[u8]) -> [u8; 4] {
    [c[0], c[1], c[2], c[3]]
}

fn le8(c: &[u8]) -> [u8; 8] {
    [c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::model_infer_response::InferOutputTensor;

    fn response(datatype: &str, raw: Vec<u8>) -> ModelInferResponse {
        ModelInferResponse {
            model_name: "m".into(),
            model_version: "1".into(),
            id: "r1".into(),
            outputs: vec![InferOutputTensor {
                name: "Y".into(),
                datatype: datatype.into(),
                shape: vec![2],
                ..Default::default()
            }],
            raw_output_contents: vec![Bytes::from(raw)],
            ..Default::default()
        }
    }

    #[test]
    fn json_and_binary_outputs() {
        let raw: Vec<u8> = [0.5f32, -2.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let json = encode_infer(response("FP32", raw.clone()), &OutputEncoding::default()).unwrap();
        assert!(!json.has_binary());
        let v: serde_json::Value = serde_json::from_str(&json.header).unwrap();
        assert_eq!(v["outputs"][0]["data"], serde_json::json!([0.5, -2.0]));
        assert_eq!(v["id"], "r1");

        let all = OutputEncoding {
            all_binary: true,
            ..Default::default()
        };
        let bin = encode_infer(response("FP32", raw.clone()), &all).unwrap();
        let v: serde_json::Value = serde_json::from_str(&bin.header).unwrap();
        assert_eq!(v["outputs"][0]["parameters"]["binary_data_size"], 8);
        assert!(v["outputs"][0].get("data").is_none());
        let header_len = bin.header.len();
        assert_eq!(&bin.into_body()[header_len..], &raw[..]);
    }

    #[test]
    fn bytes_and_bool_outputs_as_json() {
        let raw = vec![1, 0, 0, 0, b'a', 2, 0, 0, 0, b'b', b'"'];
        let json = encode_infer(response("BYTES", raw), &OutputEncoding::default()).unwrap();
        let v: serde_json::Value = serde_json::from_str(&json.header).unwrap();
        assert_eq!(v["outputs"][0]["data"], serde_json::json!(["a", "b\""]));
        let json = encode_infer(response("BOOL", vec![1, 0]), &OutputEncoding::default()).unwrap();
        let v: serde_json::Value = serde_json::from_str(&json.header).unwrap();
        assert_eq!(v["outputs"][0]["data"], serde_json::json!([true, false]));
    }
}
