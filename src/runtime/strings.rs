//! ONNX string tensors through ONNX Runtime's C API directly. ort's safe constructors copy elements
//! as NUL-terminated C strings and read them back as UTF-8 `String`s, which would truncate or refuse
//! the arbitrary bytes a BYTES tensor may carry; the length-aware calls keep every byte.
#![allow(unsafe_code)]
use std::ffi::CStr;
use std::ptr::{self, NonNull};

use bytes::Bytes;
use ort::memory::Allocator;
use ort::sys::{ONNXTensorElementDataType, OrtStatusPtr};
use ort::value::{DynValue, Value};
use ort::AsPointer;

/// Turns an ORT status into a Result, releasing it.
fn check(status: OrtStatusPtr, what: &str) -> Result<(), String> {
    if status.0.is_null() {
        return Ok(());
    }
    let api = ort::api();
    // SAFETY: a non-null status is a valid OrtStatus owned by us; its message is a NUL-terminated
    // string that lives until ReleaseStatus, and we copy it before releasing.
    let message = unsafe {
        let text = CStr::from_ptr((api.GetErrorMessage)(status.0))
            .to_string_lossy()
            .into_owned();
        (api.ReleaseStatus)(status.0);
        text
    };
    Err(format!("{what}: {message}"))
}

/// Builds a string tensor of `shape` whose elements are exactly `items` in order (any bytes, NUL
/// included): one request's list or a batch's lists one after another.
pub fn string_tensor<'a>(
    shape: &[i64],
    items: impl IntoIterator<Item = &'a Bytes>,
) -> Result<DynValue, String> {
    let count = crate::tensor::element_count(shape).map_err(|e| e.to_string())?;
    let api = ort::api();
    let allocator = Allocator::default();
    let mut value: *mut ort::sys::OrtValue = ptr::null_mut();
    // SAFETY: the allocator is ORT's default CPU allocator, valid for the call; `shape` outlives it;
    // on success `value` is a new OrtValue that we own.
    let status = unsafe {
        (api.CreateTensorAsOrtValue)(
            allocator.ptr().cast_mut(),
            shape.as_ptr(),
            shape.len(),
            ONNXTensorElementDataType::ONNX_TENSOR_ELEMENT_DATA_TYPE_STRING,
            &mut value,
        )
    };
    check(status, "cannot create a string tensor")?;
    let value = NonNull::new(value).ok_or("ONNX Runtime returned no string tensor")?;
    // SAFETY: `value` is a freshly created, owned OrtValue; from_ptr takes ownership and releases it
    // on drop (also on the error paths below).
    let mut tensor: DynValue = unsafe { Value::from_ptr(value, Some(&allocator)) };
    let mut written = 0usize;
    for (index, item) in items.into_iter().enumerate() {
        if index >= count {
            return Err(format!(
                "more BYTES elements than shape {shape:?} holds ({count})"
            ));
        }
        let mut buffer: *mut std::ffi::c_char = ptr::null_mut();
        // SAFETY: `index` is within the tensor's element count (checked above); ORT returns a
        // buffer of exactly `item.len()` bytes owned by the tensor, which we fill completely.
        let status = unsafe {
            (api.GetResizedStringTensorElementBuffer)(
                tensor.ptr_mut(),
                index,
                item.len(),
                &mut buffer,
            )
        };
        check(status, "cannot size a string element")?;
        if !item.is_empty() {
            // SAFETY: see above; the regions cannot overlap (ORT's buffer is fresh).
            unsafe { ptr::copy_nonoverlapping(item.as_ptr(), buffer.cast::<u8>(), item.len()) };
        }
        written = index + 1;
    }
    if written != count {
        return Err(format!(
            "{written} BYTES elements but shape {shape:?} needs {count}"
        ));
    }
    Ok(tensor)
}

/// Reads every element of a string tensor as raw bytes.
pub fn read_strings(value: &DynValue, count: usize) -> Result<Vec<Bytes>, String> {
    let api = ort::api();
    let mut items = Vec::with_capacity(count);
    for index in 0..count {
        let mut len = 0usize;
        // SAFETY: `value` is a live string tensor with `count` elements; `len` is a valid out pointer.
        let status = unsafe { (api.GetStringTensorElementLength)(value.ptr(), index, &mut len) };
        check(status, "cannot read a string element's length")?;
        let mut out = vec![0u8; len];
        if len > 0 {
            // SAFETY: `out` has exactly `len` writable bytes, the element's length.
            let status = unsafe {
                (api.GetStringTensorElement)(value.ptr(), len, index, out.as_mut_ptr().cast())
            };
            check(status, "cannot read a string element")?;
        }
        items.push(Bytes::from(out));
    }
    Ok(items)
}
