//! The response-cache key. Unlike Triton's (model, version, input names and raw bytes), it covers
//! everything that can change a response: the model load, every input's name, datatype, shape and
//! bytes, and the requested outputs with their order. Two requests with the same bytes in another
//! shape or datatype never share an entry.
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};

use bytes::Bytes;

use crate::scheduler::InferRequest;
use crate::tensor::{NamedTensor, TensorData};

/// Bytes an entry costs beyond its tensors' contents (map slots, Vec headers), so that many tiny
/// entries cannot exceed the configured size.
pub const ENTRY_OVERHEAD_BYTES: usize = 256;

/// Identifies one response. Equality compares every byte; the hash is computed once at
/// construction, outside the cache's lock.
#[derive(Debug, Clone)]
pub struct CacheKey {
    hash: u64,
    /// The model load the response came from (see [`super::ModelScope`]).
    load: usize,
    model: String,
    version: i64,
    inputs: Vec<KeyTensor>,
    requested_outputs: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct KeyTensor {
    name: String,
    datatype: &'static str,
    shape: Vec<i64>,
    data: KeyData,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum KeyData {
    Fixed(Bytes),
    Strings(Vec<Bytes>),
}

impl CacheKey {
    /// The key of `request` to the model load `load` (`model` version `version`). Borrows the
    /// request's buffers (reference counts only); [`CacheKey::detached`] copies them for storing.
    pub fn new(load: usize, model: &str, version: i64, request: &InferRequest) -> Self {
        let inputs: Vec<KeyTensor> = request.inputs.iter().map(key_tensor).collect();
        let mut key = CacheKey {
            hash: 0,
            load,
            model: model.to_string(),
            version,
            inputs,
            requested_outputs: request.requested_outputs.clone(),
        };
        let mut hasher = DefaultHasher::new();
        key.load.hash(&mut hasher);
        key.model.hash(&mut hasher);
        key.version.hash(&mut hasher);
        key.inputs.hash(&mut hasher);
        key.requested_outputs.hash(&mut hasher);
        key.hash = hasher.finish();
        key
    }

    /// The same key owning its bytes: a request's tensors may be slices of a whole gRPC message,
    /// which a stored key must not keep alive (its size would not be what the cache counts).
    pub fn detached(&self) -> Self {
        let mut key = self.clone();
        for input in &mut key.inputs {
            input.data = match &input.data {
                KeyData::Fixed(b) => KeyData::Fixed(Bytes::copy_from_slice(b)),
                KeyData::Strings(items) => {
                    KeyData::Strings(items.iter().map(|b| Bytes::copy_from_slice(b)).collect())
                }
            };
        }
        key
    }

    /// Bytes this key holds, counted against the cache size.
    pub fn byte_size(&self) -> usize {
        let inputs: usize = self
            .inputs
            .iter()
            .map(|t| t.name.len() + t.shape.len() * 8 + data_bytes(&t.data))
            .sum();
        let outputs: usize = self.requested_outputs.iter().map(String::len).sum();
        self.model.len() + inputs + outputs
    }
}

impl PartialEq for CacheKey {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash
            && self.load == other.load
            && self.version == other.version
            && self.model == other.model
            && self.requested_outputs == other.requested_outputs
            && self.inputs == other.inputs
    }
}

impl Eq for CacheKey {}

impl Hash for CacheKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

fn key_tensor(t: &NamedTensor) -> KeyTensor {
    KeyTensor {
        name: t.name.clone(),
        datatype: t.tensor.dtype.as_str(),
        shape: t.tensor.shape.clone(),
        data: match &t.tensor.data {
            TensorData::Fixed(b) => KeyData::Fixed(b.clone()),
            TensorData::Strings(items) => KeyData::Strings(items.clone()),
        },
    }
}

fn data_bytes(data: &KeyData) -> usize {
    match data {
        KeyData::Fixed(b) => b.len(),
        // 4 bytes of length prefix per element, as on the wire.
        KeyData::Strings(items) => items.iter().map(|b| b.len() + 4).sum(),
    }
}

/// Bytes of a set of tensors' contents, names and shapes.
pub fn tensors_byte_size(tensors: &[NamedTensor]) -> usize {
    tensors
        .iter()
        .map(|t| {
            let data = match &t.tensor.data {
                TensorData::Fixed(b) => b.len(),
                TensorData::Strings(items) => items.iter().map(|b| b.len() + 4).sum(),
            };
            t.name.len() + t.tensor.shape.len() * 8 + data
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::{DataType, Tensor};

    fn request(
        inputs: Vec<(&str, DataType, Vec<i64>, TensorData)>,
        outputs: &[&str],
    ) -> InferRequest {
        InferRequest {
            id: "r".into(),
            inputs: inputs
                .into_iter()
                .map(|(name, dtype, shape, data)| NamedTensor {
                    name: name.into(),
                    tensor: Tensor::new(name, dtype, shape, data).unwrap(),
                })
                .collect(),
            requested_outputs: outputs.iter().map(|s| s.to_string()).collect(),
            priority: 0,
            timeout: None,
            span: tracing::Span::none(),
        }
    }

    fn fixed(n: usize) -> TensorData {
        TensorData::Fixed(Bytes::from((0..n as u8).collect::<Vec<_>>()))
    }

    fn key(r: &InferRequest) -> CacheKey {
        CacheKey::new(1, "m", 1, r)
    }

    #[test]
    fn same_request_same_key() {
        let a = request(vec![("x", DataType::Fp32, vec![1, 4], fixed(16))], &[]);
        let b = request(vec![("x", DataType::Fp32, vec![1, 4], fixed(16))], &[]);
        assert_eq!(key(&a), key(&b));
        assert_eq!(key(&a).detached(), key(&b));
    }

    #[test]
    fn every_part_of_the_request_is_in_the_key() {
        let base = key(&request(
            vec![("x", DataType::Fp32, vec![1, 4], fixed(16))],
            &[],
        ));
        let different = [
            // Same bytes, other shape: Triton's key would collide here.
            key(&request(
                vec![("x", DataType::Fp32, vec![2, 2], fixed(16))],
                &[],
            )),
            // Same bytes, other datatype.
            key(&request(
                vec![("x", DataType::Int32, vec![1, 4], fixed(16))],
                &[],
            )),
            key(&request(
                vec![("y", DataType::Fp32, vec![1, 4], fixed(16))],
                &[],
            )),
            key(&request(
                vec![("x", DataType::Fp32, vec![1, 4], fixed(16))],
                &["out"],
            )),
            CacheKey::new(
                2,
                "m",
                1,
                &request(vec![("x", DataType::Fp32, vec![1, 4], fixed(16))], &[]),
            ),
            CacheKey::new(
                1,
                "n",
                1,
                &request(vec![("x", DataType::Fp32, vec![1, 4], fixed(16))], &[]),
            ),
            CacheKey::new(
                1,
                "m",
                2,
                &request(vec![("x", DataType::Fp32, vec![1, 4], fixed(16))], &[]),
            ),
        ];
        for other in &different {
            assert_ne!(&base, other);
        }
        let mut flipped = fixed(16);
        if let TensorData::Fixed(b) = &mut flipped {
            let mut v = b.to_vec();
            v[15] ^= 1;
            *b = Bytes::from(v);
        }
        assert_ne!(
            base,
            key(&request(
                vec![("x", DataType::Fp32, vec![1, 4], flipped)],
                &[]
            ))
        );
    }

    #[test]
    fn strings_are_keyed_by_element_boundaries() {
        let split = |items: &[&str]| {
            TensorData::Strings(items.iter().map(|s| Bytes::from(s.to_string())).collect())
        };
        let ab = key(&request(
            vec![("s", DataType::Bytes, vec![2], split(&["a", "bc"]))],
            &[],
        ));
        let ba = key(&request(
            vec![("s", DataType::Bytes, vec![2], split(&["ab", "c"]))],
            &[],
        ));
        assert_ne!(ab, ba);
        assert_eq!(ab.byte_size(), 1 + 1 + 8 + (1 + 4) + (2 + 4));
    }

    #[test]
    fn detached_keys_do_not_share_the_request_buffer() {
        let message = Bytes::from(vec![7u8; 1024]);
        let slice = message.slice(0..16);
        let r = request(
            vec![("x", DataType::Fp32, vec![4], TensorData::Fixed(slice))],
            &[],
        );
        let stored = key(&r).detached();
        let KeyData::Fixed(b) = &stored.inputs[0].data else {
            panic!("fixed data expected")
        };
        assert_ne!(b.as_ptr(), message.as_ptr());
        assert_eq!(stored, key(&r));
    }
}
