//! Triton's classification extension, protocol-neutral: an output asked for with
//! `classification: N` is answered as BYTES `score:index[:label]` strings of its top N classes, per
//! batch row when the model batches. Scores print as C's `%f` (six decimals) for floating point
//! and as plain integers otherwise, as Triton writes them; ties keep the lower class index first.
use bytes::Bytes;

use super::{DataType, Tensor, TensorData};

/// Largest tensor (elements) that may be classified: the same bound as Triton's.
pub const MAX_CLASSIFICATION_ELEMENTS: usize = 1_000_000;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct ClassificationError(pub String);

/// The top `count` classes of `tensor` (its client shape), one row per batch entry when `batched`.
/// The result is `[rows, min(count, classes)]` when batched, else `[min(count, classes)]`.
pub fn top_classes(
    tensor: &Tensor,
    batched: bool,
    count: usize,
    labels: &[String],
) -> Result<Tensor, ClassificationError> {
    let TensorData::Fixed(raw) = &tensor.data else {
        return Err(unsupported(tensor.dtype));
    };
    let scores = scores(tensor.dtype, raw)?;
    if scores.len() > MAX_CLASSIFICATION_ELEMENTS {
        return Err(ClassificationError(
            "classification output tensor too large".into(),
        ));
    }
    let rows = if batched && !tensor.shape.is_empty() {
        tensor.shape[0].max(0) as usize
    } else {
        1
    };
    let per_row = scores.len().checked_div(rows).unwrap_or(0);
    let kept = count.min(per_row);
    let mut strings = Vec::with_capacity(rows * kept);
    for row in 0..rows {
        let row_scores = &scores[row * per_row..(row + 1) * per_row];
        let mut order: Vec<usize> = (0..per_row).collect();
        // Stable: equal scores keep ascending class order.
        order.sort_by(|&a, &b| row_scores[b].value.total_cmp(&row_scores[a].value));
        for &class in order.iter().take(kept) {
            let mut text = format!("{}:{class}", row_scores[class].text);
            if let Some(label) = labels.get(class) {
                text.push(':');
                text.push_str(label);
            }
            strings.push(Bytes::from(text));
        }
    }
    let shape = if batched {
        vec![rows as i64, kept as i64]
    } else {
        vec![kept as i64]
    };
    Ok(Tensor {
        dtype: DataType::Bytes,
        shape,
        data: TensorData::Strings(strings),
    })
}

struct Score {
    value: f64,
    text: String,
}

fn unsupported(dtype: DataType) -> ClassificationError {
    ClassificationError(format!(
        "class result not available for output due to unsupported type '{}'",
        dtype.as_str()
    ))
}

fn scores(dtype: DataType, raw: &[u8]) -> Result<Vec<Score>, ClassificationError> {
    fn ints<const N: usize>(raw: &[u8], f: impl Fn([u8; N]) -> i128) -> Vec<Score> {
        raw.chunks_exact(N)
            .map(|c| {
                let v = f(c.try_into().unwrap_or([0; N]));
                Score {
                    value: v as f64,
                    text: v.to_string(),
                }
            })
            .collect()
    }
    fn floats<const N: usize>(raw: &[u8], f: impl Fn([u8; N]) -> f64) -> Vec<Score> {
        raw.chunks_exact(N)
            .map(|c| {
                let v = f(c.try_into().unwrap_or([0; N]));
                Score {
                    value: v,
                    text: format!("{v:.6}"),
                }
            })
            .collect()
    }
    Ok(match dtype {
        DataType::Uint8 => ints::<1>(raw, |b| u8::from_le_bytes(b) as i128),
        DataType::Uint16 => ints::<2>(raw, |b| u16::from_le_bytes(b) as i128),
        DataType::Uint32 => ints::<4>(raw, |b| u32::from_le_bytes(b) as i128),
        DataType::Uint64 => ints::<8>(raw, |b| u64::from_le_bytes(b) as i128),
        DataType::Int8 => ints::<1>(raw, |b| i8::from_le_bytes(b) as i128),
        DataType::Int16 => ints::<2>(raw, |b| i16::from_le_bytes(b) as i128),
        DataType::Int32 => ints::<4>(raw, |b| i32::from_le_bytes(b) as i128),
        DataType::Int64 => ints::<8>(raw, |b| i64::from_le_bytes(b) as i128),
        DataType::Fp32 => floats::<4>(raw, |b| f32::from_le_bytes(b) as f64),
        DataType::Fp64 => floats::<8>(raw, f64::from_le_bytes),
        other => return Err(unsupported(other)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp32(shape: Vec<i64>, values: &[f32]) -> Tensor {
        let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Tensor::new("t", DataType::Fp32, shape, TensorData::Fixed(raw.into())).unwrap()
    }

    fn strings(t: &Tensor) -> Vec<String> {
        match &t.data {
            TensorData::Strings(s) => s
                .iter()
                .map(|b| String::from_utf8(b.to_vec()).unwrap())
                .collect(),
            _ => panic!("not BYTES"),
        }
    }

    #[test]
    fn top_classes_per_row_with_labels() {
        let t = fp32(vec![2, 3], &[0.1, 0.7, 0.2, 0.5, 0.25, 0.25]);
        let labels = vec!["a".to_string(), "b".to_string()];
        let out = top_classes(&t, true, 2, &labels).unwrap();
        assert_eq!(out.shape, vec![2, 2]);
        assert_eq!(
            strings(&out),
            vec!["0.700000:1:b", "0.200000:2", "0.500000:0:a", "0.250000:1:b"]
        );
    }

    #[test]
    fn count_larger_than_classes_returns_all() {
        let t = fp32(vec![3], &[1.0, 3.0, 2.0]);
        let out = top_classes(&t, false, 10, &[]).unwrap();
        assert_eq!(out.shape, vec![3]);
        assert_eq!(
            strings(&out),
            vec!["3.000000:1", "2.000000:2", "1.000000:0"]
        );
    }

    #[test]
    fn integers_print_plainly_and_bytes_are_refused() {
        let raw: Vec<u8> = [5i32, -1, 9].iter().flat_map(|v| v.to_le_bytes()).collect();
        let t = Tensor::new("t", DataType::Int32, vec![3], TensorData::Fixed(raw.into())).unwrap();
        assert_eq!(
            strings(&top_classes(&t, false, 1, &[]).unwrap()),
            vec!["9:2"]
        );
        let s = Tensor::new(
            "s",
            DataType::Bytes,
            vec![1],
            TensorData::Strings(vec![Bytes::from_static(b"x")]),
        )
        .unwrap();
        let err = top_classes(&s, false, 1, &[]).unwrap_err();
        assert!(err.0.contains("unsupported type 'BYTES'"), "{err}");
    }
}
