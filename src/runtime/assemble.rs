//! A batch's inputs straight into the values ONNX Runtime runs on. Fixed-size data costs at most
//! one copy per request: a single request whose bytes are aligned for the element type is lent to
//! ORT as it is (no copy at all), otherwise every request's little-endian bytes are copied once into
//! the buffer the ORT tensor owns. BYTES inputs become ORT string tensors (ORT keeps its own strings,
//! so each element is copied once there, as before).
use std::fmt::Debug;

use half::{bf16, f16};
use ort::session::SessionInputValue;
use ort::value::{PrimitiveTensorElementType, Tensor as OrtTensor, TensorRef};

use crate::tensor::batch::BatchInput;
use crate::tensor::{DataType, TensorData};

/// The ORT value for one input of a batch; it may borrow the requests' bytes, so they must outlive
/// the run.
pub fn input_value(input: BatchInput<'_>) -> Result<SessionInputValue<'_>, String> {
    let name = input.name;
    let BatchInput {
        dtype,
        shape,
        parts,
        ..
    } = input;
    if dtype == DataType::Bytes {
        let mut lists = Vec::with_capacity(parts.len());
        for part in &parts {
            match &part.data {
                TensorData::Strings(items) => lists.push(items.as_slice()),
                TensorData::Fixed(_) => {
                    return Err(format!(
                        "input '{name}': BYTES data must be a list of elements"
                    ))
                }
            }
        }
        let items = lists.into_iter().flatten();
        return super::strings::string_tensor(&shape, items)
            .map(SessionInputValue::from)
            .map_err(|e| format!("input '{name}': {e}"));
    }
    let mut raw: Vec<&[u8]> = Vec::with_capacity(parts.len());
    for part in &parts {
        match &part.data {
            TensorData::Fixed(bytes) => raw.push(bytes.as_ref()),
            TensorData::Strings(_) => {
                return Err(format!("input '{name}' mixes fixed-size and BYTES data"))
            }
        }
    }
    fixed_value(dtype, shape, &raw).map_err(|e| format!("input '{name}': {e}"))
}

fn fixed_value<'a>(
    dtype: DataType,
    shape: Vec<i64>,
    raw: &[&'a [u8]],
) -> ort::Result<SessionInputValue<'a>> {
    match dtype {
        DataType::Bool => bools(shape, raw),
        DataType::Uint8 => fixed::<u8>(shape, raw),
        DataType::Uint16 => fixed::<u16>(shape, raw),
        DataType::Uint32 => fixed::<u32>(shape, raw),
        DataType::Uint64 => fixed::<u64>(shape, raw),
        DataType::Int8 => fixed::<i8>(shape, raw),
        DataType::Int16 => fixed::<i16>(shape, raw),
        DataType::Int32 => fixed::<i32>(shape, raw),
        DataType::Int64 => fixed::<i64>(shape, raw),
        DataType::Fp16 => fixed::<f16>(shape, raw),
        DataType::Bf16 => fixed::<bf16>(shape, raw),
        DataType::Fp32 => fixed::<f32>(shape, raw),
        DataType::Fp64 => fixed::<f64>(shape, raw),
        // Handled by the caller; kept total so a new datatype is a compile error here.
        DataType::Bytes => Err(ort::Error::new("BYTES data must be a list of elements")),
    }
}

/// One request with aligned bytes: a view ORT reads in place. Otherwise one buffer of the batch's
/// size (allocated zeroed, which costs no pass over it for large sizes) with each request's bytes
/// copied in once, handed to ORT without a further copy.
fn fixed<'a, T>(shape: Vec<i64>, raw: &[&'a [u8]]) -> ort::Result<SessionInputValue<'a>>
where
    T: bytemuck::Pod + PrimitiveTensorElementType + Debug,
{
    if let [only] = raw {
        if let Ok(elements) = bytemuck::try_cast_slice::<u8, T>(only) {
            return Ok(TensorRef::from_array_view((shape, elements))?.into());
        }
    }
    let total: usize = raw.iter().map(|part| part.len()).sum();
    let mut data: Vec<T> = bytemuck::zeroed_vec(total / std::mem::size_of::<T>());
    copy_parts(bytemuck::cast_slice_mut(&mut data), raw);
    Ok(OrtTensor::from_array((shape, data))?.into())
}

/// Booleans travel as one byte each; bytes that are all 0 or 1 are already valid `bool`s and are
/// lent as they are, anything else is normalised (non-zero is true) in the one copy.
fn bools<'a>(shape: Vec<i64>, raw: &[&'a [u8]]) -> ort::Result<SessionInputValue<'a>> {
    if let [only] = raw {
        if let Ok(values) = bytemuck::checked::try_cast_slice::<u8, bool>(only) {
            return Ok(TensorRef::from_array_view((shape, values))?.into());
        }
    }
    let data: Vec<bool> = raw
        .iter()
        .flat_map(|part| part.iter().map(|&b| b != 0))
        .collect();
    Ok(OrtTensor::from_array((shape, data))?.into())
}

/// Copies the parts one after another into `target`, whose length is their total.
fn copy_parts(target: &mut [u8], parts: &[&[u8]]) {
    let mut offset = 0;
    for part in parts {
        let end = offset + part.len();
        if let Some(slot) = target.get_mut(offset..end) {
            slot.copy_from_slice(part);
        }
        offset = end;
    }
}
