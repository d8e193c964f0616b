//! ONNX Runtime output values to engine tensors. Fixed-size outputs are not copied: the engine
//! tensor's `Bytes` owns the ORT value and reads its buffer in place, so splitting a batch and
//! encoding the response read ONNX Runtime's memory directly. BYTES outputs are read element by
//! element (ORT keeps them as its own strings).
use std::marker::PhantomData;

use bytes::Bytes;
use half::{bf16, f16};
use ort::value::DynValue;
use ort::value::PrimitiveTensorElementType;
use ort::value::TensorElementType as Ort;

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

/// An ORT output tensor as the owner of a `Bytes`: the value is moved in and never handed out, so
/// nothing can write to its buffer while the `Bytes` (and every slice of it) reads it.
struct OrtOutputBuffer<T> {
    value: DynValue,
    element: PhantomData<fn() -> T>,
}

impl<T: PrimitiveTensorElementType + bytemuck::NoUninit> AsRef<[u8]> for OrtOutputBuffer<T> {
    fn as_ref(&self) -> &[u8] {
        // The element type was checked before the owner was built, so the empty fallback is never
        // taken (and would be refused by the caller's size check if it were).
        self.value
            .try_extract_tensor::<T>()
            .map(|(_, data)| bytemuck::cast_slice(data))
            .unwrap_or_default()
    }
}

fn output_bytes<T>(value: DynValue) -> ort::Result<Bytes>
where
    T: PrimitiveTensorElementType + bytemuck::NoUninit + 'static,
{
    value.try_extract_tensor::<T>()?;
    Ok(Bytes::from_owner(OrtOutputBuffer::<T> {
        value,
        element: PhantomData,
    }))
}

/// Turns an ORT output value into an engine tensor; fixed-size data stays in ORT's buffer.
pub fn from_ort(name: &str, value: DynValue) -> Result<Tensor, String> {
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
                super::strings::read_strings(&value, count)
                    .map_err(|e| format!("output '{name}': {e}"))?,
            )
        }
        DataType::Bool => TensorData::Fixed(output_bytes::<bool>(value).map_err(fail)?),
        DataType::Uint8 => TensorData::Fixed(output_bytes::<u8>(value).map_err(fail)?),
        DataType::Uint16 => TensorData::Fixed(output_bytes::<u16>(value).map_err(fail)?),
        DataType::Uint32 => TensorData::Fixed(output_bytes::<u32>(value).map_err(fail)?),
        DataType::Uint64 => TensorData::Fixed(output_bytes::<u64>(value).map_err(fail)?),
        DataType::Int8 => TensorData::Fixed(output_bytes::<i8>(value).map_err(fail)?),
        DataType::Int16 => TensorData::Fixed(output_bytes::<i16>(value).map_err(fail)?),
        DataType::Int32 => TensorData::Fixed(output_bytes::<i32>(value).map_err(fail)?),
        DataType::Int64 => TensorData::Fixed(output_bytes::<i64>(value).map_err(fail)?),
        DataType::Fp16 => TensorData::Fixed(output_bytes::<f16>(value).map_err(fail)?),
        DataType::Bf16 => TensorData::Fixed(output_bytes::<bf16>(value).map_err(fail)?),
        DataType::Fp32 => TensorData::Fixed(output_bytes::<f32>(value).map_err(fail)?),
        DataType::Fp64 => TensorData::Fixed(output_bytes::<f64>(value).map_err(fail)?),
    };
    Tensor::new(name, dtype, shape, data).map_err(|e| e.to_string())
}
