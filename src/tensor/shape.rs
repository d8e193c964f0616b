//! Shape arithmetic that never overflows and never trusts a client's numbers.

/// Why a shape was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShapeError {
    #[error("shape {0:?} has a negative dimension")]
    Negative(Vec<i64>),
    #[error("shape {0:?} has too many elements")]
    Overflow(Vec<i64>),
}

/// Element count of a concrete shape, refusing negative dims and overflow.
pub fn element_count(shape: &[i64]) -> Result<usize, ShapeError> {
    let mut count: usize = 1;
    for &d in shape {
        let d = usize::try_from(d).map_err(|_| ShapeError::Negative(shape.to_vec()))?;
        count = count
            .checked_mul(d)
            .ok_or_else(|| ShapeError::Overflow(shape.to_vec()))?;
    }
    Ok(count)
}

/// Whether a concrete shape fits a declared one, where -1 in `declared` matches any size.
pub fn shape_matches(declared: &[i64], actual: &[i64]) -> bool {
    declared.len() == actual.len()
        && declared
            .iter()
            .zip(actual)
            .all(|(&d, &a)| d == -1 || d == a)
}
