//! The executor against real models (ONNX Runtime from `scripts/setup`): batches assembled straight
//! into ORT values agree bit for bit with the old path (concatenate, copy into ORT, copy out), the
//! copies that were removed stay removed, and malformed batches are refused by name.
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ort::session::{OutputSelector, RunOptions};
use ort::value::{DynValue, Tensor as OrtTensor};

use super::OrtExecutor;
use crate::runtime::selection::{OutputSubsets, MAX_KEPT_SUBSETS};
use crate::runtime::{init_onnxruntime, OptimizationLevel, ProviderPlan, SessionPlan};
use crate::scheduler::ModelExecutor;
use crate::tensor::batch::{concat_rows, split_rows};
use crate::tensor::{DataType, NamedTensor, Tensor, TensorData};

fn model_file(relative: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn executor(relative: &str) -> OrtExecutor {
    init_onnxruntime(None).expect("ONNX Runtime (run scripts/setup)");
    let plan = SessionPlan {
        model_path: model_file(relative),
        intra_op_threads: 1,
        inter_op_threads: 1,
        intra_op_spinning: false,
        parallel_execution: false,
        optimization: OptimizationLevel::All,
        providers: vec![ProviderPlan::Cpu],
        in_memory_graph: None,
    };
    OrtExecutor::load(&plan).expect("model loads")
}

const ADD_SUB: &str = "models/add_sub/1/model.onnx";
const MLP_BENCH: &str = "models/mlp_bench/1/model.onnx";

/// Deterministic values in [-1, 1), different for every `seed`.
fn values(seed: u64, count: usize) -> Vec<f32> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..count)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Little-endian bytes of `values`, starting `misalign` bytes into their allocation so both the
/// aligned (lent to ORT) and the unaligned (copied) input paths are exercised.
fn fp32_bytes(values: &[f32], misalign: usize) -> Bytes {
    let mut raw = vec![0u8; misalign];
    raw.extend(values.iter().flat_map(|v| v.to_le_bytes()));
    Bytes::from(raw).slice(misalign..)
}

fn fp32_input(name: &str, shape: Vec<i64>, values: &[f32], misalign: usize) -> NamedTensor {
    let data = TensorData::Fixed(fp32_bytes(values, misalign));
    NamedTensor {
        name: name.into(),
        tensor: Tensor::new(name, DataType::Fp32, shape, data).unwrap(),
    }
}

fn fp32_values(tensor: &Tensor) -> Vec<f32> {
    match &tensor.data {
        TensorData::Fixed(raw) => raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        TensorData::Strings(_) => panic!("not fixed-size"),
    }
}

fn fixed_ptr(tensor: &Tensor) -> usize {
    match &tensor.data {
        TensorData::Fixed(raw) => raw.as_ptr() as usize,
        TensorData::Strings(_) => panic!("not fixed-size"),
    }
}

type Batch = Vec<Vec<NamedTensor>>;
type MakeBatch = fn(usize) -> Batch;

/// `count` add_sub requests of `rows_of(i)` rows each.
fn add_sub_requests(count: usize, rows_of: impl Fn(usize) -> usize) -> Vec<Vec<NamedTensor>> {
    (0..count)
        .map(|i| {
            let rows = rows_of(i);
            let a = values(2 * i as u64, rows * 16);
            let b = values(2 * i as u64 + 1, rows * 16);
            let shape = vec![rows as i64, 16];
            vec![
                fp32_input("INPUT0", shape.clone(), &a, i % 2),
                fp32_input("INPUT1", shape, &b, (i + 1) % 2),
            ]
        })
        .collect()
}

fn mlp_requests(count: usize) -> Vec<Vec<NamedTensor>> {
    (0..count)
        .map(|i| {
            let x = values(100 + i as u64, 256);
            vec![fp32_input("input", vec![1, 256], &x, i % 4)]
        })
        .collect()
}

/// The path before this change, kept here as the reference: `concat_rows` (copy 1), each input
/// copied into a new ORT tensor (copy 2), run options and output selector built for the run, every
/// output copied into new `Bytes` (copy 3). Fixed-size FP32 models only.
fn old_path(
    executor: &mut OrtExecutor,
    requests: Vec<Vec<NamedTensor>>,
    outputs: &[String],
) -> Vec<NamedTensor> {
    let assembled = concat_rows(requests).unwrap();
    let values: Vec<(String, DynValue)> = assembled
        .iter()
        .map(|t| {
            let TensorData::Fixed(raw) = &t.tensor.data else {
                panic!("FP32 only")
            };
            let data: Vec<f32> = bytemuck::pod_collect_to_vec(raw);
            let value = OrtTensor::from_array((t.tensor.shape.clone(), data)).unwrap();
            (t.name.clone(), value.into_dyn())
        })
        .collect();
    drop(assembled);
    let wanted: Vec<String> = if outputs.is_empty() {
        executor.output_names.clone()
    } else {
        outputs.to_vec()
    };
    let selector = wanted
        .iter()
        .fold(OutputSelector::no_default(), |s, n| s.with(n.as_str()));
    let options = RunOptions::new().unwrap().with_outputs(selector);
    let results = executor.session.run_with_options(values, &options).unwrap();
    wanted
        .iter()
        .map(|name| {
            let value = results.get(name.as_str()).unwrap();
            let (shape, data) = value.try_extract_tensor::<f32>().unwrap();
            let raw = Bytes::copy_from_slice(bytemuck::cast_slice(data));
            let shape: Vec<i64> = shape.iter().copied().collect();
            NamedTensor {
                name: name.clone(),
                tensor: Tensor::new(name, DataType::Fp32, shape, TensorData::Fixed(raw)).unwrap(),
            }
        })
        .collect()
}

#[test]
fn execute_batch_is_bit_identical_to_the_old_path() {
    let cases: [(&str, MakeBatch); 2] = [
        (ADD_SUB, |n| add_sub_requests(n, |i| 1 + i % 3)),
        (MLP_BENCH, mlp_requests),
    ];
    for (model, requests) in cases {
        let mut executor = executor(model);
        for count in [1, 3, 16] {
            let expected = old_path(&mut executor, requests(count), &[]);
            let run = executor.execute_batch(requests(count), &[]).unwrap();
            assert_eq!(run.outputs.len(), expected.len(), "{model} x{count}");
            for (got, want) in run.outputs.iter().zip(&expected) {
                assert_eq!(got.name, want.name);
                // Bytes compared, so bit-identical (NaN payloads and signed zeros included).
                assert_eq!(got.tensor, want.tensor, "{model} x{count} {}", got.name);
            }
            let one = executor.execute(requests(1).remove(0), &[]).unwrap();
            assert_eq!(one, old_path(&mut executor, requests(1), &[]), "{model}");
        }
    }
}

#[test]
fn add_sub_batch_outputs_are_the_sums_and_differences_per_request() {
    let mut executor = executor(ADD_SUB);
    let requests = add_sub_requests(5, |i| i + 1);
    let rows: Vec<usize> = (0..5).map(|i| i + 1).collect();
    let run = executor.execute_batch(requests.clone(), &[]).unwrap();
    let per_request = split_rows(run.outputs, &rows).unwrap();
    for (inputs, outputs) in requests.iter().zip(&per_request) {
        let a = fp32_values(&inputs[0].tensor);
        let b = fp32_values(&inputs[1].tensor);
        let sum: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
        let difference: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x - y).collect();
        assert_eq!(outputs[0].name, "OUTPUT0");
        assert_eq!(fp32_values(&outputs[0].tensor), sum);
        assert_eq!(outputs[1].name, "OUTPUT1");
        assert_eq!(fp32_values(&outputs[1].tensor), difference);
    }
}

#[test]
fn split_outputs_are_views_of_the_batch_output() {
    let mut executor = executor(MLP_BENCH);
    let run = executor.execute_batch(mlp_requests(3), &[]).unwrap();
    let base = fixed_ptr(&run.outputs[0].tensor);
    let per_request = split_rows(run.outputs, &[1, 1, 1]).unwrap();
    for (index, outputs) in per_request.iter().enumerate() {
        // 10 FP32 values per row.
        assert_eq!(fixed_ptr(&outputs[0].tensor), base + index * 40);
    }
}

#[test]
fn outputs_stay_valid_after_the_executor_runs_again_and_is_dropped() {
    let mut first = executor(ADD_SUB);
    let requests = add_sub_requests(2, |_| 1);
    let kept = first.execute_batch(requests.clone(), &[]).unwrap().outputs;
    let kept_ptr = fixed_ptr(&kept[0].tensor);
    let snapshot: Vec<Vec<f32>> = kept.iter().map(|t| fp32_values(&t.tensor)).collect();
    // Same shapes again: an allocator that handed the same buffer out would overwrite `kept`.
    let again = first
        .execute_batch(add_sub_requests(2, |_| 1), &[])
        .unwrap();
    assert_ne!(fixed_ptr(&again.outputs[0].tensor), kept_ptr);
    drop(again);
    drop(first);
    drop(requests);
    let mut second = executor(ADD_SUB);
    second
        .execute_batch(add_sub_requests(4, |_| 2), &[])
        .unwrap();
    let now: Vec<Vec<f32>> = kept.iter().map(|t| fp32_values(&t.tensor)).collect();
    assert_eq!(now, snapshot);
    assert_eq!(fixed_ptr(&kept[0].tensor), kept_ptr);
}

#[test]
fn fixed_size_outputs_read_ort_memory_without_a_copy() {
    init_onnxruntime(None).expect("ONNX Runtime (run scripts/setup)");
    let value = OrtTensor::from_array((vec![2i64, 3], vec![1.5f32, -2.0, 3.25, 0.0, 8.0, -0.5]))
        .unwrap()
        .into_dyn();
    let ort_ptr = value.try_extract_tensor::<f32>().unwrap().1.as_ptr() as usize;
    let tensor = super::super::convert::from_ort("y", value).unwrap();
    assert_eq!(fixed_ptr(&tensor), ort_ptr);
    assert_eq!(tensor.shape, vec![2, 3]);
    assert_eq!(fp32_values(&tensor), vec![1.5, -2.0, 3.25, 0.0, 8.0, -0.5]);
    let bools = OrtTensor::from_array((vec![3i64], vec![true, false, true]))
        .unwrap()
        .into_dyn();
    let bool_ptr = bools.try_extract_tensor::<bool>().unwrap().1.as_ptr() as usize;
    let tensor = super::super::convert::from_ort("b", bools).unwrap();
    assert_eq!(fixed_ptr(&tensor), bool_ptr);
    assert_eq!(
        tensor.data,
        TensorData::Fixed(Bytes::from_static(&[1, 0, 1]))
    );
}

#[test]
fn one_aligned_request_is_lent_to_ort_and_an_unaligned_one_copied_once() {
    init_onnxruntime(None).expect("ONNX Runtime (run scripts/setup)");
    let numbers = values(7, 32);
    for misalign in [0, 1] {
        let requests = vec![vec![fp32_input("x", vec![2, 16], &numbers, misalign)]];
        let request_ptr = fixed_ptr(&requests[0][0].tensor);
        let mut inputs = crate::tensor::batch::batch_inputs(&requests).unwrap();
        let value = super::super::assemble::input_value(inputs.remove(0)).unwrap();
        let (shape, data) = value.try_extract_tensor::<f32>().unwrap();
        assert_eq!(shape.iter().copied().collect::<Vec<i64>>(), vec![2, 16]);
        assert_eq!(data, numbers.as_slice());
        let lent = data.as_ptr() as usize == request_ptr;
        assert_eq!(lent, request_ptr.is_multiple_of(4), "misalign {misalign}");
    }
}

#[test]
fn an_output_never_aliases_a_lent_input() {
    let mut executor = executor("tests/models/identity_fp32/1/model.onnx");
    let numbers = values(9, 6);
    let requests = vec![vec![fp32_input("INPUT0", vec![2, 3], &numbers, 0)]];
    let input_ptr = fixed_ptr(&requests[0][0].tensor);
    assert!(
        input_ptr.is_multiple_of(4),
        "the request's bytes are lent to ORT"
    );
    let outputs = executor.execute_batch(requests, &[]).unwrap().outputs;
    assert_ne!(fixed_ptr(&outputs[0].tensor), input_ptr);
    assert_eq!(fp32_values(&outputs[0].tensor), numbers);
}

fn assembly_error(requests: Vec<Vec<NamedTensor>>) -> String {
    let mut executor = executor(ADD_SUB);
    executor
        .execute_batch(requests, &[])
        .unwrap_err()
        .to_string()
}

#[test]
fn mismatched_requests_are_refused_with_the_reason() {
    let good = || add_sub_requests(1, |_| 1).remove(0);
    let mut wide = good();
    wide[1] = fp32_input("INPUT1", vec![1, 8], &values(1, 8), 0);
    let error = assembly_error(vec![good(), wide]);
    assert!(error.starts_with("failed to assemble the batch"), "{error}");
    assert!(error.contains("input 'INPUT1'"), "{error}");
    assert!(error.contains("cannot be batched"), "{error}");

    let mut renamed = good();
    renamed[0].name = "INPUT9".into();
    let error = assembly_error(vec![good(), renamed]);
    assert!(error.contains("input 'INPUT0' is missing"), "{error}");

    let mut short = good();
    short.pop();
    let error = assembly_error(vec![good(), good(), short]);
    assert!(
        error.contains("request 2 of the batch has 1 inputs, the first has 2"),
        "{error}"
    );

    let mut other_type = good();
    other_type[0] = NamedTensor {
        name: "INPUT0".into(),
        tensor: Tensor::new(
            "INPUT0",
            DataType::Int32,
            vec![1, 16],
            TensorData::Fixed(Bytes::from(vec![0u8; 64])),
        )
        .unwrap(),
    };
    let error = assembly_error(vec![good(), other_type]);
    assert!(error.contains("INT32"), "{error}");
    assert!(error.contains("cannot be batched"), "{error}");

    let mut scalar = good();
    scalar[0] = fp32_input("INPUT0", vec![], &[1.0], 0);
    let error = assembly_error(vec![scalar, good()]);
    assert!(error.contains("no batch dimension"), "{error}");
}

fn strings_input(shape: Vec<i64>, items: &[&[u8]]) -> Vec<NamedTensor> {
    let items = items.iter().map(|s| Bytes::copy_from_slice(s)).collect();
    vec![NamedTensor {
        name: "INPUT0".into(),
        tensor: Tensor::new("INPUT0", DataType::Bytes, shape, TensorData::Strings(items)).unwrap(),
    }]
}

#[test]
fn bytes_batches_keep_every_byte_of_every_element() {
    let mut executor = executor("tests/models/identity_bytes/1/model.onnx");
    let requests = vec![
        strings_input(vec![1, 2], &[b"a\0b", b""]),
        strings_input(vec![2, 2], &[b"\xff\xfe", b"ccc", b"d", b"\0"]),
        strings_input(vec![1, 2], &["é".as_bytes(), b"z"]),
    ];
    let expected = concat_rows(requests.clone()).unwrap();
    let run = executor.execute_batch(requests.clone(), &[]).unwrap();
    assert_eq!(run.outputs.len(), 1);
    assert_eq!(run.outputs[0].name, "OUTPUT0");
    assert_eq!(run.outputs[0].tensor, expected[0].tensor);
    let back = split_rows(run.outputs, &[1, 2, 1]).unwrap();
    assert_eq!(back[1][0].tensor, requests[1][0].tensor);
    let one = executor.execute(requests[0].clone(), &[]).unwrap();
    assert_eq!(one[0].tensor, requests[0][0].tensor);
}

#[test]
fn a_string_tensor_needs_exactly_its_shape_s_element_count() {
    init_onnxruntime(None).expect("ONNX Runtime (run scripts/setup)");
    let items = [Bytes::from_static(b"a"), Bytes::from_static(b"b")];
    let built = super::super::strings::string_tensor(&[1, 2], &items).unwrap();
    assert_eq!(
        super::super::strings::read_strings(&built, 2).unwrap(),
        items
    );
    let error = super::super::strings::string_tensor(&[1, 1], &items).unwrap_err();
    assert!(error.contains("more BYTES elements"), "{error}");
    let error = super::super::strings::string_tensor(&[1, 3], &items).unwrap_err();
    assert!(error.contains("needs 3"), "{error}");
}

fn bool_input(shape: Vec<i64>, raw: &[u8]) -> Vec<NamedTensor> {
    let data = TensorData::Fixed(Bytes::copy_from_slice(raw));
    vec![NamedTensor {
        name: "INPUT0".into(),
        tensor: Tensor::new("INPUT0", DataType::Bool, shape, data).unwrap(),
    }]
}

#[test]
fn bool_inputs_are_normalised_alone_and_in_batches() {
    let mut executor = executor("tests/models/identity_bool/1/model.onnx");
    let lent = executor
        .execute(bool_input(vec![1, 3], &[0, 1, 1]), &[])
        .unwrap();
    assert_eq!(
        lent[0].tensor.data,
        TensorData::Fixed(Bytes::from_static(&[0, 1, 1]))
    );
    let odd = executor
        .execute(bool_input(vec![1, 3], &[2, 0, 255]), &[])
        .unwrap();
    assert_eq!(
        odd[0].tensor.data,
        TensorData::Fixed(Bytes::from_static(&[1, 0, 1]))
    );
    let batch = vec![
        bool_input(vec![1, 2], &[1, 0]),
        bool_input(vec![2, 2], &[0, 7, 1, 1]),
    ];
    let run = executor.execute_batch(batch, &[]).unwrap();
    assert_eq!(run.outputs[0].tensor.shape, vec![3, 2]);
    let expected = Bytes::from_static(&[1, 0, 0, 1, 1, 1]);
    assert_eq!(run.outputs[0].tensor.data, TensorData::Fixed(expected));
}

#[test]
fn a_requested_subset_comes_back_in_the_order_asked_and_its_options_are_kept() {
    let mut executor = executor(ADD_SUB);
    let requests = || add_sub_requests(3, |_| 1);
    let reversed = ["OUTPUT1".to_string(), "OUTPUT0".to_string()];
    for _ in 0..3 {
        let only = executor
            .execute_batch(requests(), &["OUTPUT1".to_string()])
            .unwrap();
        let names: Vec<&str> = only.outputs.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["OUTPUT1"]);
        let both = executor.execute_batch(requests(), &reversed).unwrap();
        let names: Vec<&str> = both.outputs.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["OUTPUT1", "OUTPUT0"]);
        let expected = old_path(&mut executor, requests(), &reversed);
        assert_eq!(both.outputs, expected);
    }
    assert_eq!(executor.subsets.len(), 2, "one kept options per list");
    // Naming every output in graph order is the same run as naming none: nothing more is kept.
    let all = ["OUTPUT0".to_string(), "OUTPUT1".to_string()];
    executor.execute_batch(requests(), &all).unwrap();
    assert_eq!(executor.subsets.len(), 2);
}

#[test]
fn kept_subset_options_are_bounded() {
    init_onnxruntime(None).expect("ONNX Runtime (run scripts/setup)");
    let mut subsets = OutputSubsets::default();
    for index in 0..MAX_KEPT_SUBSETS + 5 {
        let names = vec![format!("out{index}")];
        let options = OutputSubsets::options_for(&names).unwrap();
        subsets.keep(&names, options);
    }
    assert_eq!(subsets.len(), MAX_KEPT_SUBSETS);
    assert!(subsets.get(&["out0".to_string()]).is_some());
    assert!(subsets.get(&[format!("out{MAX_KEPT_SUBSETS}")]).is_none());
}

fn microseconds_per_call(mut call: impl FnMut(), iterations: u32) -> f64 {
    let started = Instant::now();
    for _ in 0..iterations {
        call();
    }
    started.elapsed().as_secs_f64() * 1e6 / f64::from(iterations)
}

/// The batch's inputs as plain FP32 arrays, prepared once for the ORT-alone floor.
type Prepared = Vec<(String, Vec<i64>, Vec<f32>)>;

fn prepare(requests: &Batch) -> Prepared {
    concat_rows(requests.clone())
        .unwrap()
        .iter()
        .map(|t| {
            let values = fp32_values(&t.tensor);
            (t.name.clone(), t.tensor.shape.clone(), values)
        })
        .collect()
}

/// ORT alone on inputs prepared beforehand (viewed in place, options reused, outputs not read):
/// the floor both paths are measured against.
fn ort_floor(executor: &mut OrtExecutor, prepared: &Prepared) {
    let inputs: Vec<(&str, ort::session::SessionInputValue<'_>)> = prepared
        .iter()
        .map(|(name, shape, values)| {
            let view = ort::value::TensorRef::from_array_view((shape.clone(), values.as_slice()));
            (name.as_str(), view.unwrap().into())
        })
        .collect();
    drop(
        executor
            .session
            .run_with_options(inputs, &executor.all_outputs)
            .unwrap(),
    );
}

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// Not a test of anything: prints µs per batch, ORT alone (inputs prepared beforehand) against
/// the old path and `execute_batch`, interleaved in rounds. Run with
/// `cargo test --lib runtime::executor::tests::measure -- --ignored --nocapture` (add --release for
/// figures that mean something: in a debug build the Rust side is unoptimised).
#[test]
#[ignore]
fn measure_execute_batch_against_the_old_path() {
    let cases: [(&str, &str, MakeBatch); 2] = [
        ("add_sub", ADD_SUB, |n| add_sub_requests(n, |_| 1)),
        ("mlp_bench", MLP_BENCH, mlp_requests),
    ];
    for (label, model, make) in cases {
        let mut executor = executor(model);
        for batch in [1usize, 16, 64] {
            let requests = make(batch);
            let prepared = prepare(&requests);
            let calibrate = Instant::now();
            let mut iterations = 0u32;
            while calibrate.elapsed() < Duration::from_millis(60) {
                old_path(&mut executor, requests.clone(), &[]);
                iterations += 1;
            }
            let (mut floor, mut old, mut new) = (Vec::new(), Vec::new(), Vec::new());
            let mut harness = Vec::new();
            for _round in 0..11 {
                // Both paths take the requests by value: what cloning them costs is the harness's.
                harness.push(microseconds_per_call(
                    || drop(std::hint::black_box(requests.clone())),
                    iterations,
                ));
                floor.push(microseconds_per_call(
                    || ort_floor(&mut executor, &prepared),
                    iterations,
                ));
                old.push(microseconds_per_call(
                    || drop(old_path(&mut executor, requests.clone(), &[])),
                    iterations,
                ));
                new.push(microseconds_per_call(
                    || drop(executor.execute_batch(requests.clone(), &[]).unwrap()),
                    iterations,
                ));
            }
            let (floor, old, new) = (median(floor), median(old), median(new));
            let floor = floor + median(harness);
            println!(
                "{label:>9} batch {batch:>2}: ORT alone + clone {floor:>8.1} us | old path {old:>8.1} us \
                 (+{:>6.1}) | execute_batch {new:>8.1} us (+{:>6.1})   median of 11 rounds",
                old - floor,
                new - floor
            );
        }
    }
}
