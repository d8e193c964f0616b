//! Engine tensors to ONNX Runtime values and back. Fixed-size data is reinterpreted from its
//! little-endian bytes with one copy into an aligned buffer; BYTES become ORT string tensors.
use bytes::Bytes;
use half::{bf16, f16};
use ort::value::TensorElementType as Ort;
use ort::value::{DynValue, Tensor as OrtTensor};

use crate::tensor::{DataType, Tensor, TensorData};

/// The protocol datatype of an ORT element type, if the protocol can carry it.
pub fn datatype_of(ty: Ort) -> Option<DataType> {
    Some(match ty {
        Ort::Bool => DataType::Bool,
        Ort::Uint8 => DataType::Uint8,
        Ort::Uint16 => DataType::Uint16,
        Ort::Uint32 => DataType::Uint32,
        Ort::Uint64 => DataType::Uint64,
        Ort::Int8 => DataType::Int8,
        Ort::Int16 => DataType::Int16,
        Ort::Int32 => DataType::Int32,
        Ort::Int64 => DataType::Int64,
        Ort::Float16 => DataType::Fp16,
        Ort::Bfloat16 => DataType::Bf16,
        Ort::Float32 => DataType::Fp32,
        Ort::Float64 => DataType::Fp64,
        Ort::String => DataType::Bytes,
        _ => return None,
    })
}

fn typed<T: bytemuck::Pod + ort::value::PrimitiveTensorElementType + std::fmt::Debug>(
    shape: &[i64],
    raw: &[u8],
) -> ort::Result<DynValue> {
    let data: Vec<T> = bytemuck::pod_collect_to_vec(raw);
    Ok(OrtTensor::from_array((shape.to_vec(), data))?.into_dyn())
}

/// Builds an ORT value from an engine tensor.
pub fn to_ort(name: &str, tensor: &Tensor) -> Result<DynValue, String> {
    let shape = &tensor.shape;
    let result = match (&tensor.data, tensor.dtype) {
        (TensorData::Strings(items), _) => {
            return super::strings::string_tensor(shape, items)
                .map_err(|e| format!("input '{name}': {e}"))
        }
        (TensorData::Fixed(raw), dtype) => match dtype {
            DataType::Bool => {
                let data: Vec<bool> = raw.iter().map(|&b| b != 0).collect();
                OrtTensor::from_array((shape.to_vec(), data)).map(|t| t.into_dyn())
            }
            DataType::Uint8 => typed::<u8>(shape, raw),
            DataType::Uint16 => typed::<u16>(shape, raw),
            DataType::Uint32 => typed::<u32>(shape, raw),
            DataType::Uint64 => typed::<u64>(shape, raw),
            DataType::Int8 => typed::<i8>(shape, raw),
            DataType::Int16 => typed::<i16>(shape, raw),
            DataType::Int32 => typed::<i32>(shape, raw),
            DataType::Int64 => typed::<i64>(shape, raw),
            DataType::Fp16 => typed::<f16>(shape, raw),
            DataType::Bf16 => typed::<bf16>(shape, raw),
            DataType::Fp32 => typed::<f32>(shape, raw),
            DataType::Fp64 => typed::<f64>(shape, raw),
            DataType::Bytes => {
                return Err(format!(
                    "input '{name}': BYTES data must be a list of elements"
                ))
            }
        },
    };
    result.map_err(|e| format!("input '{name}': {e}"))
}

fn bytes_of<T: bytemuck::Pod + ort::value::PrimitiveTensorElementType>(
    value: &DynValue,
) -> ort::Result<Bytes> {
    let (_, data) = value.try_extract_tensor::<T>()?;
    Ok(Bytes::copy_from_slice(bytemuck::cast_slice(data)))
}

/// Copies an ORT output value into an engine tensor.
pub fn from_ort(name: &str, value: &DynValue) -> Result<Tensor, String> {
    let fail = |e: ort::Error| format!("output '{name}': {e}");
    let ty = *value.data_type();
    let dtype = datatype_of(ty).ok_or_else(|| {
        format!("output '{name}' has element type {ty:?}, which the protocol cannot carry")
    })?;
    let shape: Vec<i64> = value.shape().iter().copied().collect();
    let data = match dtype {
        DataType::Bytes => {
            let count = crate::tensor::element_count(&shape)
                .map_err(|e| format!("output '{name}': {e}"))?;
            TensorData::Strings(
                super::strings::read_strings(value, count)
                    .map_err(|e| format!("output '{name}': {e}"))?,
            )
        }
        DataType::Bool => {
            let (_, data) = value.try_extract_tensor::<bool>().map_err(fail)?;
            TensorData::Fixed(data.iter().map(|&b| b as u8).collect::<Vec<u8>>().into())
        }
        DataType::Uint8 => TensorData::Fixed(bytes_of::<u8>(value).map_err(fail)?),
        DataType::Uint16 => TensorData::Fixed(bytes_of::<u16>(value).map_err(fail)?),
        DataType::Uint32 => TensorData::Fixed(bytes_of::<u32>(value).map_err(fail)?),
        DataType::Uint64 => TensorData::Fixed(bytes_of::<u64>(value).map_err(fail)?),
        DataType::Int8 => TensorData::Fixed(bytes_of::<i8>(value).map_err(fail)?),
        DataType::Int16 => TensorData::Fixed(bytes_of::<i16>(value).map_err(fail)?),
        DataType::Int32 => TensorData::Fixed(bytes_of::<i32>(value).map_err(fail)?),
        DataType::Int64 => TensorData::Fixed(bytes_of::<i64>(value).map_err(fail)?),
        DataType::Fp16 => TensorData::Fixed(bytes_of::<f16>(value).map_err(fail)?),
        DataType::Bf16 => TensorData::Fixed(bytes_of::<bf16>(value).map_err(fail)?),
        DataType::Fp32 => TensorData::Fixed(bytes_of::<f32>(value).map_err(fail)?),
        DataType::Fp64 => TensorData::Fixed(bytes_of::<f64>(value).map_err(fail)?),
    };
    Tensor::new(name, dtype, shape, data).map_err(|e| e.to_string())
}
