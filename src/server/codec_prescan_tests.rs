use super::*;
use crate::proto::infer_parameter::ParameterChoice;
use crate::proto::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use crate::proto::{InferParameter, InferTensorContents, ModelInferRequest};
use proptest::prelude::*;
use prost::Message;
use std::collections::HashMap;

fn input(name: &str, datatype: &str, shape: &[i64]) -> InferInputTensor {
    InferInputTensor {
        name: name.into(),
        datatype: datatype.into(),
        shape: shape.to_vec(),
        ..Default::default()
    }
}

fn request(inputs: Vec<InferInputTensor>) -> ModelInferRequest {
    ModelInferRequest {
        model_name: "m".into(),
        inputs,
        ..Default::default()
    }
}

fn refused(request: &ModelInferRequest) -> String {
    match scan_request(&request.encode_to_vec()) {
        Err(Refused(text)) => text,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// The counts prost's decoding gives, as the walk should find them (map entries counted as
/// distinct keys: prost keeps the last of equal keys).
fn prost_counts(r: &ModelInferRequest) -> RequestScan {
    let mut scan = RequestScan {
        inputs: r.inputs.len() as u64,
        outputs: r.outputs.len() as u64,
        raw_contents: r.raw_input_contents.len() as u64,
        parameters: r.parameters.len() as u64,
        ..Default::default()
    };
    for i in &r.inputs {
        scan.parameters += i.parameters.len() as u64;
        scan.dims += i.shape.len() as u64;
        if let Some(c) = &i.contents {
            let lens = [
                c.bool_contents.len(),
                c.int_contents.len(),
                c.int64_contents.len(),
                c.uint_contents.len(),
                c.uint64_contents.len(),
                c.fp32_contents.len(),
                c.fp64_contents.len(),
                c.bytes_contents.len(),
            ];
            for (total, n) in scan.typed.iter_mut().zip(lens) {
                *total += n as u64;
            }
        }
    }
    scan.parameters += r
        .outputs
        .iter()
        .map(|o| o.parameters.len() as u64)
        .sum::<u64>();
    scan
}

#[test]
fn typed_bytes_beyond_the_shape_are_refused_with_decode_requests_text() {
    let mut tensor = input("INPUT0", "BYTES", &[1, 2]);
    tensor.contents = Some(InferTensorContents {
        bytes_contents: vec![bytes::Bytes::new(); 3],
        ..Default::default()
    });
    assert_eq!(
        refused(&request(vec![tensor])),
        "input 'INPUT0' has 3 elements in its typed contents but its shape needs 2"
    );
}

#[test]
fn a_matching_request_passes_with_its_counts() {
    let mut tensor = input("INPUT0", "FP32", &[1, 3]);
    tensor.contents = Some(InferTensorContents {
        fp32_contents: vec![1.0, 2.0, 3.0],
        ..Default::default()
    });
    let mut r = request(vec![tensor, input("INPUT1", "INT8", &[1, 2])]);
    r.raw_input_contents = vec![bytes::Bytes::from_static(&[1, 2])];
    r.outputs = vec![InferRequestedOutputTensor::default()];
    let scan = scan_request(&r.encode_to_vec()).expect("passes");
    assert_eq!(scan, prost_counts(&r));
    assert_eq!(scan.typed[5], 3);
}

#[test]
fn elements_in_a_field_the_datatype_does_not_read_are_refused() {
    let mut tensor = input("INPUT0", "FP32", &[1, 1]);
    tensor.contents = Some(InferTensorContents {
        fp32_contents: vec![1.0],
        bytes_contents: vec![bytes::Bytes::new(); 5],
        ..Default::default()
    });
    let text = refused(&request(vec![tensor]));
    assert!(text.contains("5 elements in bytes_contents"), "{text}");
}

#[test]
fn shapes_are_checked_as_decode_request_checks_them() {
    let typed = |shape: &[i64], datatype: &str| {
        let mut tensor = input("X", datatype, shape);
        tensor.contents = Some(InferTensorContents {
            int_contents: vec![1],
            ..Default::default()
        });
        refused(&request(vec![tensor]))
    };
    assert_eq!(
        typed(&[1, -1], "INT32"),
        "input 'X' has a negative dimension in shape [1, -1]"
    );
    assert_eq!(
        typed(&[1 << 40, 1 << 40], "INT32"),
        "input 'X': shape [1099511627776, 1099511627776] has too many elements"
    );
    assert_eq!(typed(&[1], "INT9"), "input 'X' has unknown datatype 'INT9'");
    assert!(typed(&[1], "FP16").contains("must be sent in raw_input_contents"));
    // No typed contents: a shape of too many dimensions is refused all the same.
    let text = refused(&request(vec![input("X", "FP32", &[1; 65])]));
    assert!(text.contains("65 dimensions; at most 64"), "{text}");
}

#[test]
fn more_raw_contents_than_inline_inputs_are_refused() {
    let mut shm = input("B", "FP32", &[1]);
    shm.parameters = HashMap::from([(
        "shared_memory_region".to_string(),
        InferParameter {
            parameter_choice: Some(ParameterChoice::StringParam("r".into())),
        },
    )]);
    let mut r = request(vec![input("A", "FP32", &[1]), shm]);
    r.raw_input_contents = vec![bytes::Bytes::new(); 2];
    assert_eq!(
        refused(&r),
        "expected 1 raw_input_contents (one per input not in shared memory) but got 2 for model 'm'"
    );
    r.raw_input_contents.truncate(1);
    assert!(scan_request(&r.encode_to_vec()).is_ok());
}

#[test]
fn too_many_inputs_are_refused() {
    let r = request(vec![InferInputTensor::default(); MAX_TENSORS as usize + 1]);
    assert!(refused(&r).contains("at most 4096 inputs"));
}

#[test]
fn unpacked_fields_and_unknown_groups_are_read_as_prost_reads_them() {
    // Input: name "A" (field 1), shape 2 and 3 unpacked (field 3, varint), contents with two
    // unpacked int_contents; an unknown group (field 9) holding a varint, at the top level.
    let contents = [0x10, 0x01, 0x10, 0x02];
    let mut tensor = vec![0x0a, 0x01, b'A', 0x12, 0x05, b'I', b'N', b'T', b'3', b'2'];
    tensor.extend([0x18, 0x02, 0x18, 0x03, 0x2a, contents.len() as u8]);
    tensor.extend(contents);
    let mut wire = vec![0x2a, tensor.len() as u8];
    wire.extend(tensor);
    wire.extend([0x4b, 0x08, 0x01, 0x4c]);
    let decoded = ModelInferRequest::decode(&wire[..]).expect("prost reads it");
    assert_eq!(decoded.inputs[0].shape, [2, 3]);
    // 2 int elements for a shape of 6.
    assert_eq!(
        scan_request(&wire),
        Err(Refused(
            "input 'A' has 2 elements in its typed contents but its shape needs 6".into()
        ))
    );
    // An unmatched end group, a truncated length, a wrong wire type for shape: prost refuses them.
    for broken in [
        &[0x4b, 0x54][..],
        &[0x2a, 0x05, 0x0a],
        &[0x2a, 0x02, 0x1d, 0x00],
    ] {
        assert!(ModelInferRequest::decode(broken).is_err());
        assert_eq!(scan_request(broken), Err(Malformed), "{broken:?}");
    }
}

fn parameter() -> impl Strategy<Value = (String, InferParameter)> {
    ("[a-z_]{0,20}", any::<i64>()).prop_map(|(key, v)| {
        let value = InferParameter {
            parameter_choice: Some(ParameterChoice::Int64Param(v)),
        };
        (key, value)
    })
}

fn contents() -> impl Strategy<Value = InferTensorContents> {
    let n = 0..6usize;
    (
        prop::collection::vec(any::<bool>(), n.clone()),
        prop::collection::vec(any::<i32>(), n.clone()),
        prop::collection::vec(any::<i64>(), n.clone()),
        prop::collection::vec(any::<u32>(), n.clone()),
        prop::collection::vec(any::<u64>(), n.clone()),
        prop::collection::vec(any::<f32>(), n.clone()),
        prop::collection::vec(any::<f64>(), n.clone()),
        prop::collection::vec(prop::collection::vec(any::<u8>(), 0..4), n),
    )
        .prop_map(|(b, i, i64s, u, u64s, f, d, s)| InferTensorContents {
            bool_contents: b,
            int_contents: i,
            int64_contents: i64s,
            uint_contents: u,
            uint64_contents: u64s,
            fp32_contents: f,
            fp64_contents: d,
            bytes_contents: s.into_iter().map(bytes::Bytes::from).collect(),
        })
}

fn tensor() -> impl Strategy<Value = InferInputTensor> {
    (
        "[A-Z0-9_]{0,8}",
        prop::sample::select(vec!["FP32", "INT8", "INT64", "BYTES", "BOOL", "FP16", "X"]),
        prop::collection::vec(-2i64..5, 0..4),
        prop::collection::hash_map("[a-z_]{0,20}", parameter().prop_map(|p| p.1), 0..3),
        prop::option::of(contents()),
    )
        .prop_map(
            |(name, datatype, shape, parameters, contents)| InferInputTensor {
                name,
                datatype: datatype.into(),
                shape,
                parameters,
                contents,
            },
        )
}

fn any_request() -> impl Strategy<Value = ModelInferRequest> {
    (
        prop::collection::vec(tensor(), 0..4),
        prop::collection::vec(prop::collection::vec(any::<u8>(), 0..8), 0..4),
        prop::collection::vec("[a-z]{0,4}", 0..3),
        prop::collection::hash_map("[a-z_]{0,20}", parameter().prop_map(|p| p.1), 0..3),
    )
        .prop_map(|(inputs, raw, outputs, parameters)| ModelInferRequest {
            model_name: "m".into(),
            inputs,
            raw_input_contents: raw.into_iter().map(bytes::Bytes::from).collect(),
            outputs: outputs
                .into_iter()
                .map(|name| InferRequestedOutputTensor {
                    name,
                    ..Default::default()
                })
                .collect(),
            parameters,
            ..Default::default()
        })
}

/// What prost and the walk must agree on for any bytes: whatever prost accepts the walk has
/// read (never "malformed"), and where both accept, the walk's counts are prost's.
fn agree(wire: &[u8]) -> Result<(), TestCaseError> {
    let scanned = scan_request(wire);
    // The walk may pass what prost refuses (invalid UTF-8, broken parameters): prost then
    // refuses it, as before.
    if let Ok(decoded) = ModelInferRequest::decode(wire) {
        prop_assert_ne!(&scanned, &Err(Malformed), "prost accepted it");
        if let Ok(scan) = scanned {
            let expected = prost_counts(&decoded);
            prop_assert!(scan.parameters >= expected.parameters);
            let without_parameters = |s: RequestScan| RequestScan { parameters: 0, ..s };
            prop_assert_eq!(without_parameters(scan), without_parameters(expected));
        }
    }
    Ok(())
}

/// The request with every repeated number encoded unpacked (one field per value), as other
/// protobuf encoders may send it; prost reads both forms.
fn encode_unpacked(r: &ModelInferRequest) -> Vec<u8> {
    use prost::encoding::{self as enc, encode_key, encode_varint, WireType};
    fn delimited(tag: u32, inner: &[u8], out: &mut Vec<u8>) {
        encode_key(tag, WireType::LengthDelimited, out);
        encode_varint(inner.len() as u64, out);
        out.extend_from_slice(inner);
    }
    let mut out = ModelInferRequest {
        inputs: Vec::new(),
        ..r.clone()
    }
    .encode_to_vec();
    for input in &r.inputs {
        let mut tensor = InferInputTensor {
            shape: Vec::new(),
            contents: None,
            ..input.clone()
        }
        .encode_to_vec();
        enc::int64::encode_repeated(3, &input.shape, &mut tensor);
        if let Some(c) = &input.contents {
            let mut contents = Vec::new();
            enc::bool::encode_repeated(1, &c.bool_contents, &mut contents);
            enc::int32::encode_repeated(2, &c.int_contents, &mut contents);
            enc::int64::encode_repeated(3, &c.int64_contents, &mut contents);
            enc::uint32::encode_repeated(4, &c.uint_contents, &mut contents);
            enc::uint64::encode_repeated(5, &c.uint64_contents, &mut contents);
            enc::float::encode_repeated(6, &c.fp32_contents, &mut contents);
            enc::double::encode_repeated(7, &c.fp64_contents, &mut contents);
            enc::bytes::encode_repeated(8, &c.bytes_contents, &mut contents);
            delimited(5, &contents, &mut tensor);
        }
        delimited(5, &tensor, &mut out);
    }
    out
}

/// Mutations of an encoded message: a flipped byte, an inserted byte, a cut.
#[derive(Debug, Clone)]
enum Mutation {
    Set(usize, u8),
    Insert(usize, u8),
    Truncate(usize),
}

fn mutate(mut wire: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let len = wire.len().max(1);
        match *m {
            Mutation::Set(at, b) if !wire.is_empty() => wire[at % len] = b,
            Mutation::Insert(at, b) => wire.insert(at % (wire.len() + 1), b),
            Mutation::Truncate(at) => wire.truncate(at % len),
            Mutation::Set(..) => {}
        }
    }
    wire
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(a, b)| Mutation::Set(a, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(a, b)| Mutation::Insert(a, b)),
        any::<usize>().prop_map(Mutation::Truncate),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    /// Every request prost can encode is read by the walk with prost's counts, or refused for a
    /// reason decode_request would refuse it too.
    #[test]
    fn the_walk_reads_every_encoded_request(r in any_request()) {
        let wire = r.encode_to_vec();
        agree(&wire)?;
        if let Err(Refused(text)) = scan_request(&wire) {
            prop_assert!(text.contains("input '") || text.contains("raw_input_contents"), "{}", text);
        }
    }

    /// Unpacked numbers: read as prost reads them, to the same counts as the packed form.
    #[test]
    fn the_walk_reads_unpacked_numbers_as_prost_does(r in any_request()) {
        let unpacked = encode_unpacked(&r);
        prop_assert_eq!(&ModelInferRequest::decode(&unpacked[..]).expect("prost reads it"), &r);
        agree(&unpacked)?;
        prop_assert_eq!(scan_request(&unpacked), scan_request(&r.encode_to_vec()));
    }

    #[test]
    fn the_walk_agrees_with_prost_on_mutated_requests(
        r in any_request(),
        unpacked in any::<bool>(),
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        let wire = if unpacked { encode_unpacked(&r) } else { r.encode_to_vec() };
        agree(&mutate(wire, &mutations))?;
    }

    #[test]
    fn the_walk_agrees_with_prost_on_random_bytes(wire in prop::collection::vec(any::<u8>(), 0..64)) {
        agree(&wire)?;
    }
}
