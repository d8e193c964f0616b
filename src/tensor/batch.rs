//! Batch assembly: the inputs of several requests concatenated along dim 0 into one tensor per input,
//! and a batch's outputs split back into per-request row ranges.
//!
//! Concatenation copies each request's bytes exactly once into a buffer allocated at its final size;
//! splitting copies nothing (fixed-size outputs are `Bytes` slices of the batch output, BYTES outputs
//! move their element handles).
use bytes::{Bytes, BytesMut};

use super::{DataType, NamedTensor, Tensor, TensorData, TensorError};

/// Concatenates the inputs of `requests` along dim 0, one output tensor per input name, in the order
/// of the first request's inputs. Every request must carry the same input names with the same
/// datatypes and the same non-batch dims; a single request is passed through untouched.
pub fn concat_rows(requests: Vec<Vec<NamedTensor>>) -> Result<Vec<NamedTensor>, TensorError> {
    if requests.len() <= 1 {
        return Ok(requests.into_iter().next().unwrap_or_default());
    }
    batch_inputs(&requests)?
        .iter()
        .map(|input| {
            concat_one(input).map(|tensor| NamedTensor {
                name: input.name.to_string(),
                tensor,
            })
        })
        .collect()
}

/// One input of a batch before assembly: every request's tensor for it, checked to agree, and the
/// shape of the assembled tensor. Lets a runtime assemble straight into its own buffers.
#[derive(Debug)]
pub struct BatchInput<'a> {
    pub name: &'a str,
    pub dtype: DataType,
    /// The first request's shape with dim 0 the sum of every request's rows (a single request's
    /// shape as it is, batch dimension or not).
    pub shape: Vec<i64>,
    /// Each request's tensor for this input, in request order.
    pub parts: Vec<&'a Tensor>,
}

/// The inputs of `requests` as `concat_rows` would assemble them, in the order of the first
/// request's inputs, with the same checks and errors, but nothing copied. A single request is taken
/// as it is.
pub fn batch_inputs(requests: &[Vec<NamedTensor>]) -> Result<Vec<BatchInput<'_>>, TensorError> {
    let Some((first, rest)) = requests.split_first() else {
        return Ok(Vec::new());
    };
    if rest.is_empty() {
        return Ok(first
            .iter()
            .map(|input| BatchInput {
                name: &input.name,
                dtype: input.tensor.dtype,
                shape: input.tensor.shape.clone(),
                parts: vec![&input.tensor],
            })
            .collect());
    }
    for (index, other) in rest.iter().enumerate() {
        if other.len() != first.len() {
            return Err(TensorError::Invalid(format!(
                "request {} of the batch has {} inputs, the first has {}",
                index + 1,
                other.len(),
                first.len()
            )));
        }
    }
    first
        .iter()
        .enumerate()
        .map(|(position, head)| {
            let mut parts = Vec::with_capacity(rest.len() + 1);
            parts.push(&head.tensor);
            for other in rest {
                parts.push(find_input(other, position, &head.name)?);
            }
            let shape = batch_shape(&head.name, &parts)?;
            Ok(BatchInput {
                name: &head.name,
                dtype: head.tensor.dtype,
                shape,
                parts,
            })
        })
        .collect()
}

/// Splits each batch output along dim 0 into consecutive ranges of `row_counts` rows, returning one
/// list of outputs per request (same order as `row_counts`).
pub fn split_rows(
    outputs: Vec<NamedTensor>,
    row_counts: &[usize],
) -> Result<Vec<Vec<NamedTensor>>, TensorError> {
    let mut per_request: Vec<Vec<NamedTensor>> = (0..row_counts.len())
        .map(|_| Vec::with_capacity(outputs.len()))
        .collect();
    let total_rows: usize = row_counts.iter().sum();
    for output in outputs {
        let pieces = split_one(&output.name, output.tensor, row_counts, total_rows)?;
        for (list, tensor) in per_request.iter_mut().zip(pieces) {
            list.push(NamedTensor {
                name: output.name.clone(),
                tensor,
            });
        }
    }
    Ok(per_request)
}

/// A batch's outputs back to its requests. For a model with a batch dimension every output must
/// have the batch's rows in dim 0, one request or many (a single request is checked like a batch,
/// so a model that drops or changes the batch dimension fails the same way at batch 1); a model
/// without one runs one request at a time and its outputs pass through untouched.
pub fn outputs_per_request(
    outputs: Vec<NamedTensor>,
    row_counts: &[usize],
    batched: bool,
) -> Result<Vec<Vec<NamedTensor>>, TensorError> {
    if !batched && row_counts.len() == 1 {
        return Ok(vec![outputs]);
    }
    split_rows(outputs, row_counts)
}

/// The input called `name` of one request; requests usually list inputs in the same order, so the
/// same position is tried before a search.
fn find_input<'a>(
    inputs: &'a [NamedTensor],
    position: usize,
    name: &str,
) -> Result<&'a Tensor, TensorError> {
    match inputs.get(position) {
        Some(t) if t.name == name => Ok(&t.tensor),
        _ => inputs
            .iter()
            .find(|t| t.name == name)
            .map(|t| &t.tensor)
            .ok_or_else(|| {
                TensorError::Invalid(format!("input '{name}' is missing from a batched request"))
            }),
    }
}

/// The shape of `parts` stacked along dim 0, after checking they agree on datatype and inner dims.
fn batch_shape(name: &str, parts: &[&Tensor]) -> Result<Vec<i64>, TensorError> {
    let head = parts[0];
    let Some((_, inner_dims)) = head.shape.split_first() else {
        return Err(TensorError::Invalid(format!(
            "input '{name}' has no batch dimension to concatenate along"
        )));
    };
    let mut rows: i64 = 0;
    for part in parts {
        if part.dtype != head.dtype || part.shape.get(1..) != Some(inner_dims) {
            return Err(TensorError::Invalid(format!(
                "input '{name}': {} {:?} cannot be batched with {} {:?}",
                part.dtype, part.shape, head.dtype, head.shape
            )));
        }
        rows = rows.checked_add(part.shape[0]).ok_or_else(|| {
            TensorError::Invalid(format!("input '{name}': batch dimension overflows"))
        })?;
    }
    let mut shape = head.shape.clone();
    shape[0] = rows;
    Ok(shape)
}

fn concat_one(input: &BatchInput<'_>) -> Result<Tensor, TensorError> {
    let (name, parts) = (input.name, &input.parts);
    let data = match &parts[0].data {
        TensorData::Fixed(_) => {
            let mut total = 0usize;
            for part in parts {
                total += fixed_bytes(name, part)?.len();
            }
            let mut buffer = BytesMut::with_capacity(total);
            for part in parts {
                buffer.extend_from_slice(fixed_bytes(name, part)?);
            }
            TensorData::Fixed(buffer.freeze())
        }
        TensorData::Strings(_) => {
            let mut total = 0usize;
            for part in parts {
                total += string_items(name, part)?.len();
            }
            let mut items = Vec::with_capacity(total);
            for part in parts {
                items.extend(string_items(name, part)?.iter().cloned());
            }
            TensorData::Strings(items)
        }
    };
    Tensor::new(name, input.dtype, input.shape.clone(), data)
}

fn fixed_bytes<'a>(name: &str, tensor: &'a Tensor) -> Result<&'a Bytes, TensorError> {
    match &tensor.data {
        TensorData::Fixed(raw) => Ok(raw),
        TensorData::Strings(_) => Err(TensorError::Invalid(format!(
            "input '{name}' mixes fixed-size and BYTES data"
        ))),
    }
}

fn string_items<'a>(name: &str, tensor: &'a Tensor) -> Result<&'a [Bytes], TensorError> {
    match &tensor.data {
        TensorData::Strings(items) => Ok(items),
        TensorData::Fixed(_) => Err(TensorError::Invalid(format!(
            "input '{name}' mixes fixed-size and BYTES data"
        ))),
    }
}

fn split_one(
    name: &str,
    tensor: Tensor,
    row_counts: &[usize],
    total_rows: usize,
) -> Result<Vec<Tensor>, TensorError> {
    let batch_dim = tensor.shape.first().copied();
    if batch_dim != Some(total_rows as i64) {
        return Err(TensorError::Invalid(format!(
            "output '{name}' has shape {:?} but the batch has {total_rows} rows",
            tensor.shape
        )));
    }
    if row_counts.len() == 1 {
        return Ok(vec![tensor]);
    }
    // Elements per row; the shape was checked when the tensor was built, so this cannot overflow.
    let row_elements = tensor.element_count().checked_div(total_rows).unwrap_or(0);
    let Tensor { dtype, shape, data } = tensor;
    let shape_for = |rows: usize| {
        let mut s = shape.clone();
        s[0] = rows as i64;
        s
    };
    match data {
        TensorData::Fixed(raw) => {
            let row_bytes = row_elements * dtype.element_size().unwrap_or(1);
            let mut start = 0usize;
            row_counts
                .iter()
                .map(|&rows| {
                    let end = start + rows * row_bytes;
                    let piece = raw.slice(start..end);
                    start = end;
                    Tensor::new(name, dtype, shape_for(rows), TensorData::Fixed(piece))
                })
                .collect()
        }
        TensorData::Strings(items) => {
            let mut items = items.into_iter();
            row_counts
                .iter()
                .map(|&rows| {
                    let piece: Vec<Bytes> = items.by_ref().take(rows * row_elements).collect();
                    Tensor::new(name, dtype, shape_for(rows), TensorData::Strings(piece))
                })
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_one_outputs_are_checked_like_batched_ones() {
        // The model returned 3 rows for a request of 1: refused at batch 1 as it is at batch 2.
        let wrong = || vec![fp32("y", vec![3, 1], &[1.0, 2.0, 3.0])];
        let error = outputs_per_request(wrong(), &[1], true).unwrap_err();
        assert!(error.to_string().contains("batch has 1 rows"), "{error}");
        assert!(outputs_per_request(wrong(), &[1, 1], true).is_err());
        // Right shape: passed through whole.
        let right = vec![fp32("y", vec![1, 2], &[1.0, 2.0])];
        let per_request = outputs_per_request(right.clone(), &[1], true).unwrap();
        assert_eq!(per_request, vec![right]);
        // Without a batch dimension there is nothing to check against.
        assert_eq!(
            outputs_per_request(wrong(), &[1], false).unwrap(),
            vec![wrong()]
        );
    }

    fn fp32(name: &str, shape: Vec<i64>, values: &[f32]) -> NamedTensor {
        let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        NamedTensor {
            name: name.into(),
            tensor: Tensor::new(name, DataType::Fp32, shape, TensorData::Fixed(raw.into()))
                .unwrap(),
        }
    }

    fn strings(name: &str, shape: Vec<i64>, values: &[&str]) -> NamedTensor {
        let items = values
            .iter()
            .map(|s| Bytes::copy_from_slice(s.as_bytes()))
            .collect();
        NamedTensor {
            name: name.into(),
            tensor: Tensor::new(name, DataType::Bytes, shape, TensorData::Strings(items)).unwrap(),
        }
    }

    fn fp16(name: &str, shape: Vec<i64>, values: &[f32]) -> NamedTensor {
        let raw: Vec<u8> = values
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect();
        NamedTensor {
            name: name.into(),
            tensor: Tensor::new(name, DataType::Fp16, shape, TensorData::Fixed(raw.into()))
                .unwrap(),
        }
    }

    #[test]
    fn fixed_inputs_concatenate_in_request_order() {
        let a = vec![fp32("x", vec![1, 2], &[1.0, 2.0])];
        let b = vec![fp32("x", vec![2, 2], &[3.0, 4.0, 5.0, 6.0])];
        let batch = concat_rows(vec![a, b]).unwrap();
        assert_eq!(batch.len(), 1);
        assert_eq!(
            batch[0],
            fp32("x", vec![3, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
        );
    }

    #[test]
    fn inputs_are_matched_by_name_not_position() {
        let a = vec![
            fp32("x", vec![1, 1], &[1.0]),
            fp32("y", vec![1, 1], &[10.0]),
        ];
        let b = vec![
            fp32("y", vec![1, 1], &[20.0]),
            fp32("x", vec![1, 1], &[2.0]),
        ];
        let batch = concat_rows(vec![a, b]).unwrap();
        assert_eq!(batch[0], fp32("x", vec![2, 1], &[1.0, 2.0]));
        assert_eq!(batch[1], fp32("y", vec![2, 1], &[10.0, 20.0]));
    }

    #[test]
    fn single_request_passes_through_without_copy() {
        let a = vec![fp32("x", vec![1, 2], &[1.0, 2.0])];
        let ptr = match &a[0].tensor.data {
            TensorData::Fixed(raw) => raw.as_ptr(),
            TensorData::Strings(_) => unreachable!(),
        };
        let batch = concat_rows(vec![a]).unwrap();
        match &batch[0].tensor.data {
            TensorData::Fixed(raw) => assert_eq!(raw.as_ptr(), ptr),
            TensorData::Strings(_) => panic!("datatype changed"),
        }
    }

    #[test]
    fn bytes_inputs_concatenate_and_split_back() {
        let a = vec![strings("s", vec![1, 2], &["a", "bb"])];
        let b = vec![strings("s", vec![2, 2], &["", "ccc", "d", "ee"])];
        let batch = concat_rows(vec![a.clone(), b.clone()]).unwrap();
        assert_eq!(
            batch[0],
            strings("s", vec![3, 2], &["a", "bb", "", "ccc", "d", "ee"])
        );
        let back = split_rows(batch, &[1, 2]).unwrap();
        assert_eq!(back, vec![a, b]);
    }

    #[test]
    fn fp16_rows_split_on_two_byte_elements() {
        let batch = vec![fp16("h", vec![3, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0])];
        let back = split_rows(batch, &[2, 1]).unwrap();
        assert_eq!(back[0], vec![fp16("h", vec![2, 2], &[1.0, 2.0, 3.0, 4.0])]);
        assert_eq!(back[1], vec![fp16("h", vec![1, 2], &[5.0, 6.0])]);
    }

    #[test]
    fn fp16_concat_round_trips() {
        let a = vec![fp16("h", vec![1, 3], &[0.5, 1.5, 2.5])];
        let b = vec![fp16("h", vec![1, 3], &[-1.0, 0.0, 8.0])];
        let batch = concat_rows(vec![a.clone(), b.clone()]).unwrap();
        match &batch[0].tensor.data {
            TensorData::Fixed(raw) => assert_eq!(raw.len(), 12),
            TensorData::Strings(_) => panic!("datatype changed"),
        }
        assert_eq!(split_rows(batch, &[1, 1]).unwrap(), vec![a, b]);
    }

    #[test]
    fn split_is_zero_copy_for_fixed_outputs() {
        let batch = vec![fp32("y", vec![2, 1], &[7.0, 8.0])];
        let base = match &batch[0].tensor.data {
            TensorData::Fixed(raw) => raw.as_ptr() as usize,
            TensorData::Strings(_) => unreachable!(),
        };
        let back = split_rows(batch, &[1, 1]).unwrap();
        match &back[1][0].tensor.data {
            TensorData::Fixed(raw) => assert_eq!(raw.as_ptr() as usize, base + 4),
            TensorData::Strings(_) => panic!("datatype changed"),
        }
    }

    #[test]
    fn batch_inputs_sum_rows_and_lend_every_request_tensor() {
        let a = vec![fp32("x", vec![1, 2], &[1.0, 2.0])];
        let b = vec![fp32("x", vec![2, 2], &[3.0, 4.0, 5.0, 6.0])];
        let requests = vec![a, b];
        let inputs = batch_inputs(&requests).unwrap();
        assert_eq!(inputs.len(), 1);
        assert_eq!((inputs[0].name, inputs[0].dtype), ("x", DataType::Fp32));
        assert_eq!(inputs[0].shape, vec![3, 2]);
        assert!(std::ptr::eq(inputs[0].parts[1], &requests[1][0].tensor));
        // One request is taken as it is, even without a batch dimension.
        let scalar = vec![vec![fp32("s", vec![], &[1.0])]];
        assert_eq!(batch_inputs(&scalar).unwrap()[0].shape, Vec::<i64>::new());
    }

    #[test]
    fn mismatched_inner_dims_are_refused() {
        let a = vec![fp32("x", vec![1, 2], &[1.0, 2.0])];
        let b = vec![fp32("x", vec![1, 3], &[1.0, 2.0, 3.0])];
        let err = concat_rows(vec![a, b]).unwrap_err();
        assert!(err.to_string().contains("cannot be batched"), "{err}");
    }

    #[test]
    fn mismatched_datatypes_are_refused() {
        let a = vec![fp32("x", vec![1, 2], &[1.0, 2.0])];
        let b = vec![fp16("x", vec![1, 2], &[1.0, 2.0])];
        assert!(concat_rows(vec![a, b]).is_err());
    }

    #[test]
    fn missing_input_is_refused() {
        let a = vec![fp32("x", vec![1, 1], &[1.0])];
        let b = vec![fp32("z", vec![1, 1], &[1.0])];
        let err = concat_rows(vec![a, b]).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }

    #[test]
    fn output_with_wrong_batch_dim_is_refused() {
        let batch = vec![fp32("y", vec![2, 1], &[7.0, 8.0])];
        let err = split_rows(batch, &[1, 2]).unwrap_err();
        assert!(err.to_string().contains("3 rows"), "{err}");
    }

    #[test]
    fn split_keeps_every_output_for_every_request() {
        let batch = vec![
            fp32("a", vec![3], &[1.0, 2.0, 3.0]),
            strings("b", vec![3, 1], &["x", "y", "z"]),
        ];
        let back = split_rows(batch, &[1, 1, 1]).unwrap();
        assert_eq!(back.len(), 3);
        assert_eq!(back[2][0], fp32("a", vec![1], &[3.0]));
        assert_eq!(back[2][1], strings("b", vec![1, 1], &["z"]));
    }
}
