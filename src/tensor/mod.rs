//! Engine tensors: datatypes, shapes, owned buffers, BYTES encoding and the checks every tensor passes
//! before it is queued. Knows nothing of gRPC or ONNX Runtime.
pub mod batch;
mod bytes_codec;
pub mod classification;
mod datatype;
pub mod names;
mod shape;
pub mod signature;

pub use bytes_codec::{
    count_length_prefixed, decode_length_prefixed, decode_length_prefixed_exact,
    encode_length_prefixed,
};
pub use datatype::DataType;
pub use shape::{element_count, shape_matches, ShapeError};

use bytes::Bytes;

/// Errors found in a tensor's contents or shape. Each names the tensor it concerns.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum TensorError {
    #[error("{0}")]
    Invalid(String),
}

/// The payload of a tensor. Fixed-size datatypes keep their little-endian bytes exactly as they came
/// off the wire (zero-copy from the request); BYTES keeps one `Bytes` per element.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    Fixed(Bytes),
    Strings(Vec<Bytes>),
}

/// An owned tensor: datatype, shape and data, already checked to agree with each other.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub dtype: DataType,
    pub shape: Vec<i64>,
    pub data: TensorData,
}

impl Tensor {
    /// Builds a tensor after checking that the data holds exactly `shape`'s element count.
    pub fn new(
        name: &str,
        dtype: DataType,
        shape: Vec<i64>,
        data: TensorData,
    ) -> Result<Self, TensorError> {
        let count = element_count(&shape)
            .map_err(|e| TensorError::Invalid(format!("input '{name}': {e}")))?;
        match (&data, dtype.element_size()) {
            (TensorData::Fixed(raw), Some(size)) => {
                let expected = count.checked_mul(size).ok_or_else(|| {
                    TensorError::Invalid(format!(
                        "input '{name}': byte size of shape {shape:?} overflows"
                    ))
                })?;
                if raw.len() != expected {
                    return Err(TensorError::Invalid(format!(
                        "input '{name}' has {} bytes of data but shape {shape:?} of {} needs {expected}",
                        raw.len(),
                        dtype.as_str()
                    )));
                }
            }
            (TensorData::Strings(items), None) => {
                if items.len() != count {
                    return Err(TensorError::Invalid(format!(
                        "input '{name}' has {} BYTES elements but shape {shape:?} needs {count}",
                        items.len()
                    )));
                }
            }
            _ => {
                return Err(TensorError::Invalid(format!(
                    "input '{name}': data does not fit datatype {}",
                    dtype.as_str()
                )))
            }
        }
        Ok(Self { dtype, shape, data })
    }

    /// Number of elements (the shape was checked at construction, so this cannot overflow).
    pub fn element_count(&self) -> usize {
        element_count(&self.shape).unwrap_or(0)
    }

    /// Size of the first dimension: the rows a batched request contributes.
    pub fn batch_rows(&self) -> usize {
        self.shape.first().map(|d| *d as usize).unwrap_or(1)
    }
}

/// A tensor with its name, as requests carry them.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    pub name: String,
    pub tensor: Tensor,
}
