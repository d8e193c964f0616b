//! BYTES tensors on the wire: each element is a 4-byte little-endian length followed by its bytes.
use bytes::{BufMut, Bytes, BytesMut};

/// Counts the elements of a length-prefixed buffer without allocating, checking every prefix, so a
/// caller can compare the count with the declared shape before any per-element allocation.
pub fn count_length_prefixed(raw: &[u8]) -> Result<usize, String> {
    let mut count = 0usize;
    let mut pos = 0usize;
    while pos < raw.len() {
        pos = element_end(raw, pos)?;
        count += 1;
    }
    Ok(count)
}

/// Where the element whose prefix starts at `pos` ends; an error for a truncated or lying prefix.
fn element_end(raw: &[u8], pos: usize) -> Result<usize, String> {
    let Some(prefix) = raw.get(pos..pos + 4) else {
        return Err(format!("truncated length prefix at byte {pos}"));
    };
    let len = u32::from_le_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
    let start = pos + 4;
    start
        .checked_add(len)
        .filter(|&e| e <= raw.len())
        .ok_or_else(|| {
            format!(
                "element at byte {pos} claims {len} bytes but only {} remain",
                raw.len() - start
            )
        })
}

/// Splits a length-prefixed buffer of exactly `count` elements without copying the elements. The
/// count is checked first (no allocation), so a buffer of many tiny elements that its shape does
/// not declare is refused before the element list is built.
pub fn decode_length_prefixed_exact(raw: &Bytes, count: usize) -> Result<Vec<Bytes>, String> {
    let found = count_length_prefixed(raw)?;
    if found != count {
        return Err(format!(
            "{found} BYTES elements in the data but its shape needs {count}"
        ));
    }
    let mut items = Vec::with_capacity(count);
    let mut pos = 0usize;
    while pos < raw.len() {
        let end = element_end(raw, pos)?;
        items.push(raw.slice(pos + 4..end));
        pos = end;
    }
    Ok(items)
}

/// Splits a length-prefixed buffer into its elements without copying. Every length is checked
/// against what is left, so a broken prefix is an error, never an out-of-bounds read.
pub fn decode_length_prefixed(raw: &Bytes) -> Result<Vec<Bytes>, String> {
    let mut items = Vec::new();
    let mut pos = 0usize;
    while pos < raw.len() {
        let Some(prefix) = raw.get(pos..pos + 4) else {
            return Err(format!("truncated length prefix at byte {pos}"));
        };
        let len = u32::from_le_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
        let start = pos + 4;
        let end = start
            .checked_add(len)
            .filter(|&e| e <= raw.len())
            .ok_or_else(|| {
                format!(
                    "element at byte {pos} claims {len} bytes but only {} remain",
                    raw.len() - start
                )
            })?;
        items.push(raw.slice(start..end));
        pos = end;
    }
    Ok(items)
}

/// Serializes elements with their 4-byte little-endian length prefixes.
pub fn encode_length_prefixed(items: &[Bytes]) -> Bytes {
    let total: usize = items.iter().map(|i| i.len() + 4).sum();
    let mut out = BytesMut::with_capacity(total);
    for item in items {
        out.put_u32_le(item.len() as u32);
        out.put_slice(item);
    }
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let items = vec![
            Bytes::from_static(b"a"),
            Bytes::new(),
            Bytes::from_static(b"hello"),
        ];
        let raw = encode_length_prefixed(&items);
        assert_eq!(decode_length_prefixed(&raw).unwrap(), items);
    }

    #[test]
    fn broken_prefix_is_refused() {
        let raw = Bytes::from_static(&[10, 0, 0, 0, b'x']);
        assert!(decode_length_prefixed(&raw)
            .unwrap_err()
            .contains("claims 10 bytes"));
        let raw = Bytes::from_static(&[1, 0]);
        assert!(decode_length_prefixed(&raw)
            .unwrap_err()
            .contains("truncated"));
        let raw = Bytes::from_static(&[0xff, 0xff, 0xff, 0xff]);
        assert!(decode_length_prefixed(&raw).is_err());
    }

    #[test]
    fn exact_decoding_checks_the_count_first() {
        let items = vec![Bytes::from_static(b"ab"), Bytes::new()];
        let raw = encode_length_prefixed(&items);
        assert_eq!(count_length_prefixed(&raw).unwrap(), 2);
        assert_eq!(decode_length_prefixed_exact(&raw, 2).unwrap(), items);
        let err = decode_length_prefixed_exact(&raw, 3).unwrap_err();
        assert!(
            err.contains("2 BYTES elements") && err.contains("needs 3"),
            "{err}"
        );
        let broken = Bytes::from_static(&[9, 0, 0, 0]);
        assert!(decode_length_prefixed_exact(&broken, 1).is_err());
    }
}
