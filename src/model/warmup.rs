//! Model warm-up with Triton's semantics (`model_warmup` in config.pbtxt): every sample runs on every
//! instance before the version is published, so the first real request at a shape does not pay for
//! ONNX Runtime's (or TensorRT's) first-run work. Samples run straight on the executors, before the
//! scheduler exists, so they never reach the inference statistics.
//!
//! Each input of a sample is `zero_data`, `random_data` or `input_data_file` (a file in
//! `<model>/warmup/` holding the tensor's raw little-endian bytes, or length-prefixed elements for
//! BYTES). `batch_size` rows are sent (prepended to `dims` when the model batches) and the sample
//! runs `count` times (once when 0). A sample that cannot be built or fails to execute fails the
//! load with a reason naming it.
use std::path::{Component, Path};

use bytes::Bytes;
use rand::Rng;

use super::validate::TensorSpec;
use super::{datatype_from_config, ModelConfig};
use crate::proto::model_warmup::input::InputDataType;
use crate::proto::model_warmup::Input as WarmupInput;
use crate::proto::ModelWarmup;
use crate::scheduler::ModelExecutor;
use crate::tensor::{
    decode_length_prefixed, element_count, DataType, NamedTensor, Tensor, TensorData,
};

// Most runs one sample may ask for (`count`): warm-up delays readiness, so a typo such as
// `count: 100000` is refused rather than holding the model out of service for minutes.
pub use super::bounds::MAX_WARMUP_COUNT;

/// Largest tensor a warm-up input may describe, checked before anything is allocated.
pub const MAX_WARMUP_INPUT_BYTES: usize = 256 << 20;

/// Directory of a model holding its `input_data_file`s, as in Triton.
pub const WARMUP_DIR: &str = "warmup";

/// Config parameter that turns the automatic warm-up on (`"true"`) or off (`"false"`) for one model,
/// overriding `--model-auto-warmup`. It only applies when the config lists no `model_warmup`.
pub const AUTO_WARMUP_PARAMETER: &str = "auto_warmup";

/// A warm-up sample that could not be built or run. The sample's name is always in the message.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("warm-up sample '{sample}': {reason}")]
pub struct WarmupError {
    pub sample: String,
    pub reason: String,
}

/// One sample ready to run: the tensors as the model sees them, and how many times to run it.
#[derive(Debug, Clone)]
pub struct WarmupSample {
    pub name: String,
    pub inputs: Vec<NamedTensor>,
    pub runs: u32,
}

/// The samples to run for a validated `config`: its `model_warmup`, or, when it has none and auto
/// warm-up is on, one zero-data sample per batch size the scheduler may form (1, each preferred
/// size, max_batch_size).
pub fn plan(
    model_dir: &Path,
    config: &ModelConfig,
    inputs: &[TensorSpec],
    auto_default: bool,
) -> Result<Vec<WarmupSample>, WarmupError> {
    let settings = if config.model_warmup.is_empty() && auto_enabled(config, auto_default)? {
        auto_samples(config, inputs)
    } else {
        config.model_warmup.clone()
    };
    settings
        .iter()
        .map(|s| build_sample(model_dir, config.max_batch_size, inputs, s))
        .collect()
}

/// Runs every sample on every executor, in order. The first failure stops the load.
pub fn run(
    model: &str,
    samples: &[WarmupSample],
    executors: &mut [Box<dyn ModelExecutor>],
) -> Result<(), WarmupError> {
    if samples.is_empty() {
        return Ok(());
    }
    let started = std::time::Instant::now();
    for (index, executor) in executors.iter_mut().enumerate() {
        for sample in samples {
            for _ in 0..sample.runs {
                executor
                    .execute(sample.inputs.clone(), &[])
                    .map_err(|e| WarmupError {
                        sample: sample.name.clone(),
                        reason: format!("execution failed on instance {index}: {e}"),
                    })?;
            }
        }
    }
    let runs: u32 = samples.iter().map(|s| s.runs).sum();
    tracing::info!(
        model = %model,
        samples = samples.len(),
        instances = executors.len(),
        runs_per_instance = runs,
        seconds = started.elapsed().as_secs_f64(),
        "warm-up finished"
    );
    Ok(())
}

fn auto_enabled(config: &ModelConfig, default: bool) -> Result<bool, WarmupError> {
    match config
        .parameters
        .get(AUTO_WARMUP_PARAMETER)
        .map(|p| p.string_value.trim())
    {
        None => Ok(default),
        Some("true") => Ok(true),
        Some("false") => Ok(false),
        Some(other) => Err(WarmupError {
            sample: "auto".into(),
            reason: format!(
                "parameter {AUTO_WARMUP_PARAMETER} must be \"true\" or \"false\", got \"{other}\""
            ),
        }),
    }
}

/// Zero-data samples over the batch sizes the batcher can form; variable dimensions get size 1.
fn auto_samples(config: &ModelConfig, inputs: &[TensorSpec]) -> Vec<ModelWarmup> {
    let mut sizes = vec![1u32];
    if config.max_batch_size > 0 {
        if let Some(crate::proto::model_config::SchedulingChoice::DynamicBatching(db)) =
            &config.scheduling_choice
        {
            sizes.extend(db.preferred_batch_size.iter().map(|&s| s.max(1) as u32));
        }
        sizes.push(config.max_batch_size as u32);
    }
    sizes.sort_unstable();
    sizes.dedup();
    sizes
        .into_iter()
        .map(|batch_size| ModelWarmup {
            name: format!("auto_batch_{batch_size}"),
            batch_size,
            count: 1,
            inputs: inputs
                .iter()
                .map(|spec| {
                    let input = WarmupInput {
                        data_type: super::datatype_to_config(spec.dtype),
                        dims: spec.dims.iter().map(|&d| d.max(1)).collect(),
                        input_data_type: Some(InputDataType::ZeroData(true)),
                    };
                    (spec.name.clone(), input)
                })
                .collect(),
        })
        .collect()
}

fn build_sample(
    model_dir: &Path,
    max_batch_size: i32,
    specs: &[TensorSpec],
    setting: &ModelWarmup,
) -> Result<WarmupSample, WarmupError> {
    let fail = |reason: String| WarmupError {
        sample: setting.name.clone(),
        reason,
    };
    if setting.name.is_empty() {
        return Err(WarmupError {
            sample: String::new(),
            reason: "every model_warmup entry needs a name".into(),
        });
    }
    check_batch_size(setting.batch_size, max_batch_size).map_err(fail)?;
    if setting.count > MAX_WARMUP_COUNT {
        return Err(fail(format!(
            "count {} exceeds the limit of {MAX_WARMUP_COUNT}",
            setting.count
        )));
    }
    if let Some(unknown) = setting
        .inputs
        .keys()
        .find(|name| !specs.iter().any(|s| &s.name == *name))
    {
        return Err(fail(format!(
            "input '{unknown}' is not an input of the model"
        )));
    }
    let batch = (max_batch_size > 0).then_some(setting.batch_size as i64);
    let inputs = specs
        .iter()
        .map(|spec| {
            let input = setting
                .inputs
                .get(&spec.name)
                .ok_or_else(|| format!("input '{}' of the model has no warm-up data", spec.name))?;
            build_input(model_dir, spec, input, batch)
                .map_err(|reason| format!("input '{}': {reason}", spec.name))
        })
        .collect::<Result<Vec<_>, String>>()
        .map_err(fail)?;
    Ok(WarmupSample {
        name: setting.name.clone(),
        inputs,
        runs: setting.count.max(1),
    })
}

fn check_batch_size(batch_size: u32, max_batch_size: i32) -> Result<(), String> {
    if batch_size == 0 {
        return Err("batch_size must be at least 1".into());
    }
    let limit = max_batch_size.max(1) as u32;
    if batch_size > limit {
        return Err(if max_batch_size > 0 {
            format!("batch_size {batch_size} exceeds max_batch_size {max_batch_size}")
        } else {
            format!("batch_size {batch_size} must be 1 for a model that does not batch (max_batch_size 0)")
        });
    }
    Ok(())
}

/// The tensor for one input of a sample, in the model's own shape (after any `reshape`).
fn build_input(
    model_dir: &Path,
    spec: &TensorSpec,
    input: &WarmupInput,
    batch: Option<i64>,
) -> Result<NamedTensor, String> {
    let dtype =
        datatype_from_config(input.data_type).ok_or_else(|| "data_type must be set".to_string())?;
    if dtype != spec.dtype {
        return Err(format!(
            "data_type {} does not match the model's {}",
            dtype.as_str(),
            spec.dtype.as_str()
        ));
    }
    check_dims(&input.dims, &spec.dims)?;
    let mut shape: Vec<i64> = batch.into_iter().collect();
    shape.extend(spec.model_dims(&input.dims));
    let count = element_count(&shape).map_err(|e| e.to_string())?;
    let bytes = count.saturating_mul(dtype.element_size().unwrap_or(4));
    if bytes > MAX_WARMUP_INPUT_BYTES {
        return Err(format!(
            "shape {shape:?} needs {bytes} bytes, more than the limit of {MAX_WARMUP_INPUT_BYTES}"
        ));
    }
    let data = match &input.input_data_type {
        None => return Err("one of zero_data, random_data or input_data_file must be set".into()),
        Some(InputDataType::ZeroData(_)) => zero_data(dtype, count),
        Some(InputDataType::RandomData(_)) => random_data(dtype, count),
        Some(InputDataType::InputDataFile(file)) => file_data(model_dir, file, dtype, count)?,
    };
    let tensor = Tensor::new(&spec.name, dtype, shape, data).map_err(|e| e.to_string())?;
    Ok(NamedTensor {
        name: spec.name.clone(),
        tensor,
    })
}

/// Warm-up dims are concrete: the config's dims with each -1 given a size.
fn check_dims(dims: &[i64], declared: &[i64]) -> Result<(), String> {
    let fits = dims.len() == declared.len()
        && dims
            .iter()
            .zip(declared)
            .all(|(&d, &c)| d >= 0 && (c == -1 || c == d));
    if fits {
        Ok(())
    } else {
        Err(format!(
            "dims {dims:?} do not fit the model's dims {declared:?} (every size fixed, -1 only where the config has -1)"
        ))
    }
}

fn zero_data(dtype: DataType, count: usize) -> TensorData {
    match dtype.element_size() {
        Some(size) => TensorData::Fixed(Bytes::from(vec![0u8; count * size])),
        None => TensorData::Strings(vec![Bytes::new(); count]),
    }
}

/// Values a model can take without overflow or NaN: floats in [0, 1), integers 0..=127, booleans.
/// Random BYTES elements would mean nothing to a model, so they are empty, as zero data.
fn random_data(dtype: DataType, count: usize) -> TensorData {
    let mut rng = rand::rng();
    let mut raw = Vec::with_capacity(count * dtype.element_size().unwrap_or(0));
    for _ in 0..count {
        match dtype {
            DataType::Bytes => return zero_data(dtype, count),
            DataType::Bool => raw.push(rng.random_range(0..=1u8)),
            DataType::Fp32 => raw.extend(rng.random::<f32>().to_le_bytes()),
            DataType::Fp64 => raw.extend(rng.random::<f64>().to_le_bytes()),
            DataType::Fp16 => raw.extend(half::f16::from_f32(rng.random()).to_le_bytes()),
            DataType::Bf16 => raw.extend(half::bf16::from_f32(rng.random()).to_le_bytes()),
            other => {
                let size = other.element_size().unwrap_or(1);
                let value: u8 = rng.random_range(0..=127);
                raw.push(value);
                raw.extend(std::iter::repeat_n(0u8, size - 1));
            }
        }
    }
    TensorData::Fixed(Bytes::from(raw))
}

fn file_data(
    model_dir: &Path,
    file: &str,
    dtype: DataType,
    count: usize,
) -> Result<TensorData, String> {
    let relative = Path::new(file);
    let plain = !file.is_empty()
        && relative
            .components()
            .all(|c| matches!(c, Component::Normal(_)));
    if !plain {
        return Err(format!(
            "input_data_file '{}' must be a relative path inside the model's {WARMUP_DIR}/ directory",
            file.escape_debug()
        ));
    }
    let path = model_dir.join(WARMUP_DIR).join(relative);
    let size = std::fs::metadata(&path)
        .map_err(|e| format!("input_data_file '{file}' cannot be read: {e}"))?
        .len();
    if size > MAX_WARMUP_INPUT_BYTES as u64 {
        return Err(format!(
            "input_data_file '{file}' has {size} bytes, more than the limit of {MAX_WARMUP_INPUT_BYTES}"
        ));
    }
    let raw = Bytes::from(
        std::fs::read(&path)
            .map_err(|e| format!("input_data_file '{file}' cannot be read: {e}"))?,
    );
    match dtype.element_size() {
        Some(size) if raw.len() != count * size => Err(format!(
            "input_data_file '{file}' has {} bytes but the shape needs {}",
            raw.len(),
            count * size
        )),
        Some(_) => Ok(TensorData::Fixed(raw)),
        None => {
            let items = decode_length_prefixed(&raw)
                .map_err(|e| format!("input_data_file '{file}': {e}"))?;
            if items.len() != count {
                return Err(format!(
                    "input_data_file '{file}' holds {} BYTES elements but the shape needs {count}",
                    items.len()
                ));
            }
            Ok(TensorData::Strings(items))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::model_config::SchedulingChoice;
    use crate::proto::ModelDynamicBatching;

    fn spec(name: &str, dims: &[i64]) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            dtype: DataType::Fp32,
            dims: dims.to_vec(),
            reshape: None,
        }
    }

    fn sample(
        name: &str,
        batch_size: u32,
        inputs: &[(&str, &[i64], InputDataType)],
    ) -> ModelWarmup {
        ModelWarmup {
            name: name.into(),
            batch_size,
            count: 0,
            inputs: inputs
                .iter()
                .map(|(n, dims, data)| {
                    let input = WarmupInput {
                        data_type: crate::proto::DataType::TypeFp32 as i32,
                        dims: dims.to_vec(),
                        input_data_type: Some(data.clone()),
                    };
                    (n.to_string(), input)
                })
                .collect(),
        }
    }

    fn config(mbs: i32, warmup: Vec<ModelWarmup>) -> ModelConfig {
        ModelConfig {
            name: "m".into(),
            max_batch_size: mbs,
            model_warmup: warmup,
            ..Default::default()
        }
    }

    fn plan_err(c: &ModelConfig, specs: &[TensorSpec]) -> String {
        plan(Path::new("/nonexistent"), c, specs, false)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn zero_sample_gets_the_batch_dimension_and_runs_once() {
        let c = config(
            8,
            vec![sample(
                "s",
                4,
                &[("x", &[3], InputDataType::ZeroData(true))],
            )],
        );
        let samples = plan(Path::new("/nonexistent"), &c, &[spec("x", &[-1])], false).unwrap();
        assert_eq!(samples[0].runs, 1);
        assert_eq!(samples[0].inputs[0].tensor.shape, vec![4, 3]);
        assert_eq!(
            samples[0].inputs[0].tensor.data,
            TensorData::Fixed(Bytes::from(vec![0u8; 48]))
        );
    }

    #[test]
    fn random_data_is_finite_and_in_range() {
        let TensorData::Fixed(raw) = random_data(DataType::Fp32, 100) else {
            panic!("fixed data expected")
        };
        let values: &[f32] = bytemuck::cast_slice(&raw);
        assert!(values.iter().all(|v| (0.0..1.0).contains(v)));
    }

    #[test]
    fn bad_samples_are_refused_with_their_name() {
        let specs = [spec("x", &[2])];
        let zero = InputDataType::ZeroData(true);
        let cases = [
            (
                config(8, vec![sample("a", 0, &[("x", &[2], zero.clone())])]),
                "warm-up sample 'a': batch_size must be at least 1",
            ),
            (
                config(8, vec![sample("b", 9, &[("x", &[2], zero.clone())])]),
                "warm-up sample 'b': batch_size 9 exceeds max_batch_size 8",
            ),
            (
                config(0, vec![sample("c", 2, &[("x", &[2], zero.clone())])]),
                "warm-up sample 'c': batch_size 2 must be 1",
            ),
            (
                config(8, vec![sample("d", 1, &[("y", &[2], zero.clone())])]),
                "warm-up sample 'd': input 'y' is not an input",
            ),
            (
                config(8, vec![sample("e", 1, &[])]),
                "warm-up sample 'e': input 'x' of the model has no warm-up data",
            ),
            (
                config(8, vec![sample("f", 1, &[("x", &[3], zero.clone())])]),
                "warm-up sample 'f': input 'x': dims [3] do not fit",
            ),
            (
                config(
                    8,
                    vec![sample(
                        "g",
                        1,
                        &[("x", &[2], InputDataType::InputDataFile("../x".into()))],
                    )],
                ),
                "warm-up sample 'g': input 'x': input_data_file '../x' must be a relative path",
            ),
            (
                config(
                    8,
                    vec![sample(
                        "h",
                        1,
                        &[(
                            "x",
                            &[2],
                            InputDataType::InputDataFile("missing.bin".into()),
                        )],
                    )],
                ),
                "warm-up sample 'h': input 'x': input_data_file 'missing.bin' cannot be read",
            ),
        ];
        for (c, expected) in cases {
            let got = plan_err(&c, &specs);
            assert!(
                got.starts_with(expected),
                "{got} should start with {expected}"
            );
        }
        let mut c = config(8, vec![sample("i", 1, &[("x", &[2], zero)])]);
        c.model_warmup[0].count = MAX_WARMUP_COUNT + 1;
        assert!(plan_err(&c, &specs).contains("count 1001 exceeds the limit of 1000"));
    }

    #[test]
    fn absurd_shapes_are_refused_before_allocation() {
        let c = config(
            0,
            vec![sample(
                "big",
                1,
                &[("x", &[1 << 20, 1 << 20], InputDataType::ZeroData(true))],
            )],
        );
        let got = plan_err(&c, &[spec("x", &[-1, -1])]);
        assert!(got.contains("more than the limit"), "{got}");
    }

    #[test]
    fn file_data_must_have_the_exact_size() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(WARMUP_DIR)).unwrap();
        std::fs::write(dir.path().join(WARMUP_DIR).join("x.bin"), [0u8; 8]).unwrap();
        let file = InputDataType::InputDataFile("x.bin".into());
        let ok = config(8, vec![sample("s", 1, &[("x", &[2], file.clone())])]);
        assert!(plan(dir.path(), &ok, &[spec("x", &[2])], false).is_ok());
        let wrong = config(8, vec![sample("s", 2, &[("x", &[2], file)])]);
        let err = plan(dir.path(), &wrong, &[spec("x", &[2])], false).unwrap_err();
        assert!(
            err.reason.contains("has 8 bytes but the shape needs 16"),
            "{err}"
        );
    }

    #[test]
    fn bytes_file_data_is_length_prefixed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(WARMUP_DIR)).unwrap();
        let items = [Bytes::from_static(b"ab"), Bytes::from_static(b"")];
        let encoded = crate::tensor::encode_length_prefixed(&items);
        std::fs::write(dir.path().join(WARMUP_DIR).join("s.bin"), &encoded).unwrap();
        let mut setting = sample(
            "s",
            1,
            &[("t", &[2], InputDataType::InputDataFile("s.bin".into()))],
        );
        setting.inputs.get_mut("t").unwrap().data_type = crate::proto::DataType::TypeString as i32;
        let bytes_spec = TensorSpec {
            dtype: DataType::Bytes,
            ..spec("t", &[2])
        };
        let samples = plan(
            dir.path(),
            &config(0, vec![setting.clone()]),
            std::slice::from_ref(&bytes_spec),
            false,
        )
        .unwrap();
        assert_eq!(
            samples[0].inputs[0].tensor.data,
            TensorData::Strings(items.to_vec())
        );
        setting.inputs.get_mut("t").unwrap().dims = vec![3];
        let err = plan(
            dir.path(),
            &config(0, vec![setting]),
            &[spec("t", &[-1])].map(|s| TensorSpec {
                dtype: DataType::Bytes,
                ..s
            }),
            false,
        )
        .unwrap_err();
        assert!(
            err.reason
                .contains("holds 2 BYTES elements but the shape needs 3"),
            "{err}"
        );
    }

    #[test]
    fn auto_warmup_covers_the_batch_sizes_and_obeys_the_parameter() {
        let mut c = config(8, vec![]);
        c.scheduling_choice = Some(SchedulingChoice::DynamicBatching(ModelDynamicBatching {
            preferred_batch_size: vec![4, 8],
            ..Default::default()
        }));
        let specs = [spec("x", &[-1])];
        let none = plan(Path::new("/nonexistent"), &c, &specs, false).unwrap();
        assert!(none.is_empty());
        let auto = plan(Path::new("/nonexistent"), &c, &specs, true).unwrap();
        let shapes: Vec<_> = auto
            .iter()
            .map(|s| s.inputs[0].tensor.shape.clone())
            .collect();
        assert_eq!(shapes, vec![vec![1, 1], vec![4, 1], vec![8, 1]]);
        c.parameters.insert(
            AUTO_WARMUP_PARAMETER.into(),
            crate::proto::ModelParameter {
                string_value: "false".into(),
            },
        );
        assert!(plan(Path::new("/nonexistent"), &c, &specs, true)
            .unwrap()
            .is_empty());
    }

    /// Counts executions; fails from the `fail_at`-th one on.
    struct CountingExecutor {
        runs: std::sync::Arc<std::sync::atomic::AtomicU32>,
        fail_at: u32,
    }

    impl ModelExecutor for CountingExecutor {
        fn execute(
            &mut self,
            inputs: Vec<NamedTensor>,
            _: &[String],
        ) -> Result<Vec<NamedTensor>, crate::scheduler::ExecuteError> {
            let n = self.runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            if n >= self.fail_at {
                return Err(crate::scheduler::ExecuteError("boom".into()));
            }
            Ok(inputs)
        }
    }

    #[test]
    fn every_instance_runs_every_sample_count_times() {
        let runs = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let executor = |fail_at| -> Box<dyn ModelExecutor> {
            Box::new(CountingExecutor {
                runs: runs.clone(),
                fail_at,
            })
        };
        let mut c = config(
            8,
            vec![sample(
                "s",
                1,
                &[("x", &[2], InputDataType::ZeroData(true))],
            )],
        );
        c.model_warmup[0].count = 3;
        let samples = plan(Path::new("/nonexistent"), &c, &[spec("x", &[2])], false).unwrap();
        let mut executors = vec![executor(u32::MAX), executor(u32::MAX)];
        run("m", &samples, &mut executors).unwrap();
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 6);
        let mut failing = vec![executor(0)];
        let err = run("m", &samples, &mut failing).unwrap_err();
        assert_eq!(
            err.to_string(),
            "warm-up sample 's': execution failed on instance 0: boom"
        );
    }
}
