//! Builds an ONNX Runtime session for one model instance from the model's config, the way Triton's
//! ONNX Runtime backend reads it: config parameters for threads and execution mode, the optimization
//! graph level, and GPU execution accelerators. A provider that cannot be registered fails the load.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ort::ep::{self, ExecutionProviderDispatch};
use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;

use super::{library, RuntimeError};
use crate::proto::{model_instance_group, ModelConfig};
use crate::security::PlaintextModel;
use crate::tensor::signature::{GraphSignature, GraphTensor};

/// Which execution provider an instance runs on.
#[derive(Debug, Clone, PartialEq)]
pub enum ProviderPlan {
    Cpu,
    Cuda {
        device_id: i32,
        options: Vec<(String, String)>,
    },
    TensorRt {
        device_id: i32,
        options: Vec<(String, String)>,
    },
}

/// Everything needed to build one session, decided from the config before any ORT call.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionPlan {
    pub model_path: PathBuf,
    pub intra_op_threads: usize,
    pub inter_op_threads: usize,
    /// Whether idle intra-op threads busy-wait for the next parallel section (ONNX Runtime's
    /// `session.intra_op.allow_spinning`).
    pub intra_op_spinning: bool,
    pub parallel_execution: bool,
    pub optimization: OptimizationLevel,
    /// Providers in priority order; CPU is always the implicit last resort for unsupported nodes.
    pub providers: Vec<ProviderPlan>,
    /// The decrypted graph of an encrypted model file: the session is built from these bytes, and
    /// `model_path` (the `.enc` file) only names the model in errors. None: read `model_path`.
    pub in_memory_graph: Option<PlaintextModel>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptimizationLevel {
    Basic,
    Extended,
    All,
}

impl SessionPlan {
    /// Reads the session settings out of the model config for an instance of `kind` on `device_id`.
    /// `default_intra_threads` is the CPU budget share the caller computed for this instance.
    pub fn from_config(
        model_path: &Path,
        config: &ModelConfig,
        kind: model_instance_group::Kind,
        device_id: i32,
        default_intra_threads: usize,
    ) -> Result<Self, RuntimeError> {
        let params: HashMap<&str, &str> = config
            .parameters
            .iter()
            .map(|(k, v)| (k.as_str(), v.string_value.as_str()))
            .collect();
        let intra_op_threads =
            thread_param(&params, "intra_op_thread_count")?.unwrap_or(default_intra_threads);
        let inter_op_threads = thread_param(&params, "inter_op_thread_count")?.unwrap_or(1);
        // Off unless the config asks: ONNX Runtime's pool threads spin after every run, and in a
        // server they burn the cores the gRPC transport and the other instances need (on 2 cores
        // they took about half the CPU at batch 1 and halved throughput; see docs/PERFORMANCE.md).
        let intra_op_spinning = match params.get(SPINNING_PARAMETER).map(|v| v.trim()) {
            None | Some("0") => false,
            Some("1") => true,
            Some(other) => {
                return Err(RuntimeError::Session(format!(
                    "parameter {SPINNING_PARAMETER} must be \"0\" or \"1\", got \"{other}\""
                )))
            }
        };
        let parallel_execution = match params.get("execution_mode").copied() {
            None | Some("0") => false,
            Some("1") => true,
            Some(other) => {
                return Err(RuntimeError::Session(format!(
                    "parameter execution_mode must be \"0\" (sequential) or \"1\" (parallel), got \"{other}\""
                )))
            }
        };
        let level = config
            .optimization
            .as_ref()
            .and_then(|o| o.graph.as_ref())
            .map(|g| g.level)
            .unwrap_or(0);
        let optimization = match level {
            -1 => OptimizationLevel::Basic,
            1 => OptimizationLevel::Extended,
            _ => OptimizationLevel::All,
        };
        let providers = providers_for(config, kind, device_id)?;
        Ok(Self {
            model_path: model_path.to_path_buf(),
            intra_op_threads: intra_op_threads.max(1),
            inter_op_threads: inter_op_threads.max(1),
            intra_op_spinning,
            parallel_execution,
            optimization,
            providers,
            in_memory_graph: None,
        })
    }

    /// This plan reading the graph from `graph` (decrypted bytes) instead of the file.
    pub fn with_in_memory_graph(mut self, graph: Option<PlaintextModel>) -> Self {
        self.in_memory_graph = graph;
        self
    }
}

/// Model config parameter (named as ONNX Runtime's session config key) that turns spinning back on.
pub const SPINNING_PARAMETER: &str = "session.intra_op.allow_spinning";

fn thread_param(params: &HashMap<&str, &str>, key: &str) -> Result<Option<usize>, RuntimeError> {
    match params.get(key) {
        None => Ok(None),
        Some(v) => match v.trim().parse::<i64>() {
            // Triton treats 0 as "let ONNX Runtime decide"; we keep our CPU-budget default instead so a
            // sidecar never spawns one thread per node core.
            Ok(n) if n <= 0 => Ok(None),
            Ok(n) => Ok(Some(n as usize)),
            Err(_) => Err(RuntimeError::Session(format!(
                "parameter {key} must be an integer, got \"{v}\""
            ))),
        },
    }
}

/// GPU instances get CUDA, plus TensorRT first when the config names it as a GPU accelerator.
fn providers_for(
    config: &ModelConfig,
    kind: model_instance_group::Kind,
    device_id: i32,
) -> Result<Vec<ProviderPlan>, RuntimeError> {
    let accelerators = config
        .optimization
        .as_ref()
        .and_then(|o| o.execution_accelerators.as_ref())
        .map(|a| a.gpu_execution_accelerator.clone())
        .unwrap_or_default();
    if kind != model_instance_group::Kind::Gpu {
        if !accelerators.is_empty() {
            tracing::warn!(model = %config.name, "gpu_execution_accelerator ignored for a CPU instance");
        }
        return Ok(vec![ProviderPlan::Cpu]);
    }
    let mut plans = Vec::new();
    let mut cuda_options = Vec::new();
    for acc in &accelerators {
        let options: Vec<(String, String)> = acc
            .parameters
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        match acc.name.as_str() {
            "tensorrt" => plans.push(ProviderPlan::TensorRt { device_id, options }),
            "cuda" => cuda_options.extend(options),
            other => {
                return Err(RuntimeError::Provider(format!(
                    "unknown gpu_execution_accelerator \"{other}\" (supported: tensorrt, cuda)"
                )))
            }
        }
    }
    plans.push(ProviderPlan::Cuda {
        device_id,
        options: cuda_options,
    });
    Ok(plans)
}

/// Triton's TensorRT accelerator parameter names mapped onto the TensorRT provider.
fn tensorrt_provider(
    device_id: i32,
    options: &[(String, String)],
) -> Result<ExecutionProviderDispatch, RuntimeError> {
    let mut trt = ep::TensorRT::default().with_device_id(device_id);
    for (key, value) in options {
        trt = match key.as_str() {
            "precision_mode" => match value.as_str() {
                "FP32" => trt,
                "FP16" => trt.with_fp16(true),
                "INT8" => trt.with_int8(true),
                other => {
                    return Err(RuntimeError::Provider(format!(
                        "tensorrt precision_mode must be FP32, FP16 or INT8, got \"{other}\""
                    )))
                }
            },
            "max_workspace_size_bytes" => trt.with_max_workspace_size(parse_num(key, value)?),
            "trt_engine_cache_enable" => trt.with_engine_cache(parse_bool(key, value)?),
            "trt_engine_cache_path" => trt.with_engine_cache_path(value),
            "trt_timing_cache_enable" => trt.with_timing_cache(parse_bool(key, value)?),
            "trt_timing_cache_path" => trt.with_timing_cache_path(value),
            "max_partition_iterations" | "trt_max_partition_iterations" => {
                trt.with_max_partition_iterations(parse_num(key, value)? as u32)
            }
            "minimum_segment_size" | "trt_min_subgraph_size" => {
                trt.with_min_subgraph_size(parse_num(key, value)?)
            }
            "trt_build_heuristics_enable" => trt.with_build_heuristics(parse_bool(key, value)?),
            "trt_sparsity_enable" => trt.with_sparsity(parse_bool(key, value)?),
            "trt_builder_optimization_level" => {
                trt.with_builder_optimization_level(parse_num(key, value)? as u8)
            }
            other => {
                return Err(RuntimeError::Provider(format!(
                    "unsupported tensorrt accelerator parameter \"{other}\""
                )))
            }
        };
    }
    Ok(trt.build().error_on_failure())
}

fn cuda_provider(
    device_id: i32,
    options: &[(String, String)],
) -> Result<ExecutionProviderDispatch, RuntimeError> {
    let mut cuda = ep::CUDA::default().with_device_id(device_id);
    for (key, value) in options {
        cuda = match key.as_str() {
            "gpu_mem_limit" => cuda.with_memory_limit(parse_num(key, value)?),
            "cudnn_conv_use_max_workspace" => cuda.with_conv_max_workspace(parse_bool(key, value)?),
            "enable_cuda_graph" => cuda.with_cuda_graph(parse_bool(key, value)?),
            "use_tf32" => cuda.with_tf32(parse_bool(key, value)?),
            // Triton's integer codes for these three.
            "arena_extend_strategy" => cuda.with_arena_extend_strategy(match value.trim() {
                "0" => ep::ArenaExtendStrategy::NextPowerOfTwo,
                "1" => ep::ArenaExtendStrategy::SameAsRequested,
                _ => {
                    return Err(one_of(
                        key,
                        value,
                        "0 (next power of two) or 1 (same as requested)",
                    ))
                }
            }),
            "cudnn_conv_algo_search" => cuda.with_conv_algorithm_search(match value.trim() {
                "0" => ep::cuda::ConvAlgorithmSearch::Exhaustive,
                "1" => ep::cuda::ConvAlgorithmSearch::Heuristic,
                "2" => ep::cuda::ConvAlgorithmSearch::Default,
                _ => {
                    return Err(one_of(
                        key,
                        value,
                        "0 (exhaustive), 1 (heuristic) or 2 (default)",
                    ))
                }
            }),
            "do_copy_in_default_stream" => {
                use ep::ArbitrarilyConfigurableExecutionProvider as _;
                let on = parse_bool(key, value)?;
                cuda.with_arbitrary_config(key, if on { "1" } else { "0" })
            }
            other => {
                return Err(RuntimeError::Provider(format!(
                    "unsupported cuda accelerator parameter \"{other}\""
                )))
            }
        };
    }
    Ok(cuda.build().error_on_failure())
}

fn parse_num(key: &str, value: &str) -> Result<usize, RuntimeError> {
    value.trim().parse().map_err(|_| {
        RuntimeError::Provider(format!("parameter {key} must be a number, got \"{value}\""))
    })
}

fn one_of(key: &str, value: &str, allowed: &str) -> RuntimeError {
    RuntimeError::Provider(format!(
        "parameter {key} must be {allowed}, got \"{value}\""
    ))
}

fn parse_bool(key: &str, value: &str) -> Result<bool, RuntimeError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" => Ok(true),
        "0" | "false" => Ok(false),
        _ => Err(RuntimeError::Provider(format!(
            "parameter {key} must be true/false or 1/0, got \"{value}\""
        ))),
    }
}

fn session_error(plan: &SessionPlan, e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Session(format!("cannot load {}: {e}", plan.model_path.display()))
}

/// Builds the session. Blocking (it reads and optimises the graph): call it off the async reactor.
pub fn load_session(plan: &SessionPlan) -> Result<Session, RuntimeError> {
    let env = library::environment().map_err(RuntimeError::Library)?;
    let providers = plan
        .providers
        .iter()
        .filter_map(|p| match p {
            ProviderPlan::Cpu => None,
            ProviderPlan::Cuda { device_id, options } => Some(cuda_provider(*device_id, options)),
            ProviderPlan::TensorRt { device_id, options } => {
                Some(tensorrt_provider(*device_id, options))
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    let level = match plan.optimization {
        OptimizationLevel::Basic => GraphOptimizationLevel::Level1,
        OptimizationLevel::Extended => GraphOptimizationLevel::Level2,
        OptimizationLevel::All => GraphOptimizationLevel::All,
    };
    let fail = |e: ort::Error<_>| session_error(plan, e);
    let builder = Session::builder(env).map_err(|e| session_error(plan, e))?;
    let builder = builder
        .with_intra_threads(plan.intra_op_threads)
        .map_err(fail)?;
    let builder = builder
        .with_inter_threads(plan.inter_op_threads)
        .map_err(fail)?;
    let builder = builder
        .with_intra_op_spinning(plan.intra_op_spinning)
        .map_err(fail)?;
    let builder = builder
        .with_parallel_execution(plan.parallel_execution)
        .map_err(fail)?;
    let builder = builder.with_optimization_level(level).map_err(fail)?;
    let mut builder = if providers.is_empty() {
        builder
    } else {
        builder.with_execution_providers(providers).map_err(|e| {
            RuntimeError::Provider(format!(
                "execution provider could not be registered for {}: {e}",
                plan.model_path.display()
            ))
        })?
    };
    match &plan.in_memory_graph {
        // ONNX Runtime parses the bytes into its own structures; nothing is written to disk.
        Some(graph) => builder.commit_from_memory(graph.bytes()),
        None => builder.commit_from_file(&plan.model_path),
    }
    .map_err(|e| session_error(plan, e))
}

/// The graph's inputs and outputs as the model domain describes them. Non-tensor inputs/outputs
/// (sequences, maps) are refused: the protocol carries only tensors.
pub fn graph_signature(session: &Session) -> Result<GraphSignature, RuntimeError> {
    let describe = |outlet: &ort::value::Outlet| -> Result<GraphTensor, RuntimeError> {
        let dtype = outlet
            .dtype()
            .tensor_type()
            .and_then(super::convert::datatype_of)
            .ok_or_else(|| {
                RuntimeError::Session(format!(
                    "'{}' has type {:?}, which the inference protocol cannot carry",
                    outlet.name(),
                    outlet.dtype()
                ))
            })?;
        let dims = outlet
            .dtype()
            .tensor_shape()
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        Ok(GraphTensor {
            name: outlet.name().to_string(),
            dtype,
            dims,
        })
    };
    Ok(GraphSignature {
        inputs: session
            .inputs()
            .iter()
            .map(describe)
            .collect::<Result<_, _>>()?,
        outputs: session
            .outputs()
            .iter()
            .map(describe)
            .collect::<Result<_, _>>()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::ModelParameter;

    fn plan_with(params: &[(&str, &str)]) -> Result<SessionPlan, RuntimeError> {
        let config = ModelConfig {
            parameters: params
                .iter()
                .map(|(k, v)| {
                    let value = ModelParameter {
                        string_value: v.to_string(),
                    };
                    (k.to_string(), value)
                })
                .collect(),
            ..Default::default()
        };
        SessionPlan::from_config(
            Path::new("model.onnx"),
            &config,
            model_instance_group::Kind::Cpu,
            0,
            2,
        )
    }

    #[test]
    fn intra_op_spinning_is_off_unless_the_config_asks() {
        assert!(!plan_with(&[]).unwrap().intra_op_spinning);
        assert!(
            !plan_with(&[(SPINNING_PARAMETER, "0")])
                .unwrap()
                .intra_op_spinning
        );
        assert!(
            plan_with(&[(SPINNING_PARAMETER, "1")])
                .unwrap()
                .intra_op_spinning
        );
        let error = plan_with(&[(SPINNING_PARAMETER, "yes")]).unwrap_err();
        assert!(error.to_string().contains(SPINNING_PARAMETER), "{error}");
    }
}

#[cfg(test)]
mod cuda_parameter_tests {
    use super::cuda_provider;

    fn with(key: &str, value: &str) -> Result<(), String> {
        let options = [(key.to_string(), value.to_string())];
        cuda_provider(0, &options)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn triton_cuda_parameters_are_accepted_with_their_integer_codes() {
        for (key, value) in [
            ("arena_extend_strategy", "0"),
            ("arena_extend_strategy", "1"),
            ("cudnn_conv_algo_search", "0"),
            ("cudnn_conv_algo_search", "2"),
            ("do_copy_in_default_stream", "true"),
            ("gpu_mem_limit", "1073741824"),
        ] {
            assert_eq!(with(key, value), Ok(()), "{key}={value}");
        }
    }

    #[test]
    fn an_out_of_range_code_names_the_parameter_and_the_choices() {
        let error = with("cudnn_conv_algo_search", "3").unwrap_err();
        assert!(
            error.contains("cudnn_conv_algo_search") && error.contains("heuristic"),
            "{error}"
        );
        let error = with("arena_extend_strategy", "kSameAsRequested").unwrap_err();
        assert!(error.contains("arena_extend_strategy"), "{error}");
    }
}
