//! Fills in what a config.pbtxt leaves out, the way Triton does for ONNX models, so that a model
//! directory with only `1/model.onnx` serves, and so that the config clients read back through
//! ModelConfig looks like the one Triton would report.
//!
//! Two Triton stages are reproduced:
//! - the ONNX Runtime backend's auto-complete: name, platform/backend, inputs/outputs and
//!   max_batch_size from the graph, dynamic batching for a batching model;
//! - the server core's normalization: default version policy, preferred batch size, pinned-memory
//!   flags and instance groups.
use super::validate::{ONNX_BACKEND, ONNX_PLATFORM};
use super::{datatype_to_config, GraphSignature, GraphTensor, ModelError};
use crate::proto::model_config::SchedulingChoice;
use crate::proto::model_instance_group::Kind;
use crate::proto::model_optimization_policy::PinnedMemoryBuffer;
use crate::proto::model_version_policy::{Latest, PolicyChoice};
use crate::proto::{
    ModelConfig, ModelDynamicBatching, ModelInput, ModelInstanceGroup, ModelOptimizationPolicy,
    ModelOutput, ModelTensorReshape, ModelVersionPolicy,
};

/// The max_batch_size given to a model that can batch but whose config does not say how much
/// (Triton's `--backend-config=default-max-batch-size`, 4 by default).
pub const DEFAULT_MAX_BATCH_SIZE: i32 = 4;

/// Triton's default model file name for ONNX models.
pub const DEFAULT_MODEL_FILENAME: &str = "model.onnx";

/// Completes `config` for the model named `model` from its ONNX graph. Deterministic: the same
/// config and graph always give the same result, tensors in the graph's order.
///
/// Inputs and outputs are taken from the graph only when the config lists none of them (inputs, or
/// outputs, or both), as Triton does; max_batch_size is decided in that same case. In addition (not
/// Triton): a listed tensor that names a graph tensor but leaves out data_type or dims gets them from
/// the graph. Whatever the config states is kept; `validate` judges it afterwards.
pub fn autocomplete(
    model: &str,
    config: ModelConfig,
    graph: &GraphSignature,
) -> Result<ModelConfig, ModelError> {
    autocomplete_with(model, config, graph, Completion::default())
}

/// What `autocomplete_with` may fill in: Triton's `--disable-auto-complete-config` and
/// `--backend-config=default-max-batch-size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// Take inputs, outputs, max_batch_size and the batcher from the graph; false leaves only
    /// the server's normalization (platform names, version policy, instance groups).
    pub from_graph: bool,
    /// The max_batch_size of a model that can batch and whose config gives none.
    pub default_max_batch_size: i32,
}

impl Default for Completion {
    fn default() -> Self {
        Self {
            from_graph: true,
            default_max_batch_size: DEFAULT_MAX_BATCH_SIZE,
        }
    }
}

/// [`autocomplete`] as `completion` allows.
pub fn autocomplete_with(
    model: &str,
    mut config: ModelConfig,
    graph: &GraphSignature,
    completion: Completion,
) -> Result<ModelConfig, ModelError> {
    if config.name.is_empty() {
        config.name = model.to_string();
    }
    complete_platform(&mut config);
    if !completion.from_graph {
        normalize(&mut config);
        return Ok(config);
    }

    let input_count = config.input.len() + config.batch_input.len();
    let output_count = config.output.len();
    if input_count == 0 || output_count == 0 {
        complete_max_batch_size(model, &mut config, graph, completion.default_max_batch_size)?;
        let mbs = config.max_batch_size;
        if input_count == 0 {
            config.input = graph
                .inputs
                .iter()
                .map(|t| input_from_graph(t, mbs))
                .collect();
        }
        if output_count == 0 {
            config.output = graph
                .outputs
                .iter()
                .map(|t| output_from_graph(t, mbs))
                .collect();
        }
    }
    complete_partial_tensors(&mut config, graph);

    normalize(&mut config);
    Ok(config)
}

/// Triton reports ONNX models with both platform and backend set, and the default file name.
fn complete_platform(config: &mut ModelConfig) {
    if config.backend.is_empty() && (config.platform.is_empty() || config.platform == ONNX_PLATFORM)
    {
        config.backend = ONNX_BACKEND.to_string();
    }
    if config.backend == ONNX_BACKEND {
        if config.platform.is_empty() {
            config.platform = ONNX_PLATFORM.to_string();
        }
        if config.default_model_filename.is_empty() {
            config.default_model_filename = DEFAULT_MODEL_FILENAME.to_string();
        }
    }
}

/// A model can batch when every graph input and output has a variable first dimension. Such a model
/// without max_batch_size gets the default and, if it can then batch more than one request, a
/// dynamic batcher. A model that cannot batch must not ask for it.
fn complete_max_batch_size(
    model: &str,
    config: &mut ModelConfig,
    graph: &GraphSignature,
    default_max_batch_size: i32,
) -> Result<(), ModelError> {
    let can_batch = graph
        .inputs
        .iter()
        .chain(&graph.outputs)
        .all(|t| t.dims.first() == Some(&-1));
    if !can_batch {
        if config.max_batch_size != 0 {
            return Err(ModelError::InvalidConfig {
                model: model.to_string(),
                reason: format!(
                    "max_batch_size is {} but the model cannot batch: not every input and output has a variable (-1) first dimension",
                    config.max_batch_size
                ),
            });
        }
        return Ok(());
    }
    // proto3 cannot tell "max_batch_size: 0" from absent; like Triton, 0 means "not given" here.
    if config.max_batch_size == 0 {
        config.max_batch_size = default_max_batch_size;
    }
    if config.max_batch_size > 1 && config.scheduling_choice.is_none() {
        config.scheduling_choice = Some(SchedulingChoice::DynamicBatching(
            ModelDynamicBatching::default(),
        ));
    }
    Ok(())
}

/// Config dims for a graph tensor: without the batch dimension when the model batches. A tensor
/// that is only a batch dimension (graph shape [-1]) becomes dims [1] with an empty reshape, a graph
/// scalar in a non-batching model becomes dims [1] (config dims cannot be empty).
fn dims_from_graph(tensor: &GraphTensor, mbs: i32) -> (Vec<i64>, Option<ModelTensorReshape>) {
    let skip = usize::from(mbs > 0 && !tensor.dims.is_empty());
    let dims = tensor.dims[skip..].to_vec();
    if !dims.is_empty() {
        return (dims, None);
    }
    let reshape = (mbs > 0).then(|| ModelTensorReshape { shape: Vec::new() });
    (vec![1], reshape)
}

fn input_from_graph(tensor: &GraphTensor, mbs: i32) -> ModelInput {
    let (dims, reshape) = dims_from_graph(tensor, mbs);
    ModelInput {
        name: tensor.name.clone(),
        data_type: datatype_to_config(tensor.dtype),
        dims,
        reshape,
        ..Default::default()
    }
}

fn output_from_graph(tensor: &GraphTensor, mbs: i32) -> ModelOutput {
    let (dims, reshape) = dims_from_graph(tensor, mbs);
    ModelOutput {
        name: tensor.name.clone(),
        data_type: datatype_to_config(tensor.dtype),
        dims,
        reshape,
        ..Default::default()
    }
}

/// Fills data_type and dims of listed tensors that leave them out, from the graph tensor of the same
/// name. A tensor that names nothing in the graph is left for `validate` to report.
fn complete_partial_tensors(config: &mut ModelConfig, graph: &GraphSignature) {
    let mbs = config.max_batch_size;
    let find = |tensors: &'_ [GraphTensor], name: &str| -> Option<GraphTensor> {
        tensors.iter().find(|t| t.name == name).cloned()
    };
    for input in &mut config.input {
        if let Some(tensor) = find(&graph.inputs, &input.name) {
            if input.data_type == 0 {
                input.data_type = datatype_to_config(tensor.dtype);
            }
            if input.dims.is_empty() && input.reshape.is_none() {
                (input.dims, input.reshape) = dims_from_graph(&tensor, mbs);
            }
        }
    }
    for output in &mut config.output {
        if let Some(tensor) = find(&graph.outputs, &output.name) {
            if output.data_type == 0 {
                output.data_type = datatype_to_config(tensor.dtype);
            }
            if output.dims.is_empty() && output.reshape.is_none() {
                (output.dims, output.reshape) = dims_from_graph(&tensor, mbs);
            }
        }
    }
}

/// Triton's server-side normalization, applied to every config whatever its origin.
fn normalize(config: &mut ModelConfig) {
    if config.version_policy.is_none() {
        config.version_policy = Some(ModelVersionPolicy {
            policy_choice: Some(PolicyChoice::Latest(Latest { num_versions: 1 })),
        });
    }

    let mbs = config.max_batch_size;
    if let Some(SchedulingChoice::DynamicBatching(batching)) = &mut config.scheduling_choice {
        if batching.preferred_batch_size.is_empty() && mbs > 0 {
            batching.preferred_batch_size.push(mbs);
        }
    }

    let optimization = config
        .optimization
        .get_or_insert_with(ModelOptimizationPolicy::default);
    optimization
        .input_pinned_memory
        .get_or_insert(PinnedMemoryBuffer { enable: true });
    optimization
        .output_pinned_memory
        .get_or_insert(PinnedMemoryBuffer { enable: true });

    normalize_instance_groups(config);
}

/// One CPU instance when the config names no group; otherwise every group gets a name
/// (`<model>_<index>`) and at least one instance. KIND_AUTO is left for the runtime, which alone knows
/// whether a GPU is present.
fn normalize_instance_groups(config: &mut ModelConfig) {
    if config.instance_group.is_empty() {
        config.instance_group.push(ModelInstanceGroup {
            name: config.name.clone(),
            kind: Kind::Cpu as i32,
            count: 1,
            ..Default::default()
        });
    }
    for (index, group) in config.instance_group.iter_mut().enumerate() {
        if group.name.is_empty() {
            group.name = format!("{}_{index}", config.name);
        }
        if group.count < 1 {
            group.count = 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::validate::validate;
    use crate::proto::DataType as C;
    use crate::tensor::DataType;

    fn tensor(name: &str, dtype: DataType, dims: &[i64]) -> GraphTensor {
        GraphTensor {
            name: name.into(),
            dtype,
            dims: dims.to_vec(),
        }
    }

    /// A scikit-learn classifier as skl2onnx exports it (zipmap off).
    fn classifier() -> GraphSignature {
        GraphSignature {
            inputs: vec![tensor("float_input", DataType::Fp32, &[-1, 4])],
            outputs: vec![
                tensor("label", DataType::Int64, &[-1]),
                tensor("probabilities", DataType::Fp32, &[-1, 3]),
            ],
        }
    }

    fn fixed_shape() -> GraphSignature {
        GraphSignature {
            inputs: vec![tensor("x", DataType::Int32, &[1, 16])],
            outputs: vec![tensor("y", DataType::Int32, &[1, 16])],
        }
    }

    #[test]
    fn without_the_graph_only_the_servers_defaults_are_filled_in() {
        let off = Completion {
            from_graph: false,
            ..Completion::default()
        };
        let c = autocomplete_with("iris", ModelConfig::default(), &classifier(), off).unwrap();
        assert_eq!(
            (c.name.as_str(), c.backend.as_str()),
            ("iris", "onnxruntime")
        );
        assert!(c.input.is_empty() && c.output.is_empty());
        assert_eq!(c.max_batch_size, 0);
        assert!(c.scheduling_choice.is_none());
        assert!(c.version_policy.is_some() && !c.instance_group.is_empty());
    }

    #[test]
    fn the_default_max_batch_size_is_the_one_given() {
        let sixteen = Completion {
            default_max_batch_size: 16,
            ..Completion::default()
        };
        let c = autocomplete_with("iris", ModelConfig::default(), &classifier(), sixteen).unwrap();
        assert_eq!(c.max_batch_size, 16);
    }

    #[test]
    fn empty_config_of_a_batching_model_is_completed_like_triton() {
        let c = autocomplete("iris", ModelConfig::default(), &classifier()).expect("completes");
        assert_eq!(c.name, "iris");
        assert_eq!(c.platform, "onnxruntime_onnx");
        assert_eq!(c.backend, "onnxruntime");
        assert_eq!(c.default_model_filename, "model.onnx");
        assert_eq!(c.max_batch_size, DEFAULT_MAX_BATCH_SIZE);

        assert_eq!(c.input.len(), 1);
        assert_eq!(c.input[0].name, "float_input");
        assert_eq!(c.input[0].data_type, C::TypeFp32 as i32);
        assert_eq!(c.input[0].dims, vec![4]);
        assert_eq!(c.input[0].reshape, None);

        let names: Vec<&str> = c.output.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(names, ["label", "probabilities"], "graph order is kept");
        assert_eq!(c.output[0].data_type, C::TypeInt64 as i32);
        assert_eq!(c.output[0].dims, vec![1]);
        assert_eq!(
            c.output[0].reshape,
            Some(ModelTensorReshape { shape: vec![] })
        );
        assert_eq!(c.output[1].dims, vec![3]);

        let Some(SchedulingChoice::DynamicBatching(db)) = &c.scheduling_choice else {
            panic!("dynamic batching expected: {:?}", c.scheduling_choice);
        };
        assert_eq!(db.preferred_batch_size, vec![DEFAULT_MAX_BATCH_SIZE]);
        assert_eq!(
            c.version_policy
                .as_ref()
                .and_then(|p| p.policy_choice.clone()),
            Some(PolicyChoice::Latest(Latest { num_versions: 1 }))
        );
        let opt = c.optimization.as_ref().expect("optimization");
        assert_eq!(
            opt.input_pinned_memory,
            Some(PinnedMemoryBuffer { enable: true })
        );
        assert_eq!(
            opt.output_pinned_memory,
            Some(PinnedMemoryBuffer { enable: true })
        );
        assert_eq!(c.instance_group.len(), 1);
        assert_eq!(c.instance_group[0].name, "iris");
        assert_eq!(c.instance_group[0].kind, Kind::Cpu as i32);
        assert_eq!(c.instance_group[0].count, 1);

        validate("iris", &c, &classifier()).expect("the completed config validates");
    }

    #[test]
    fn completion_is_deterministic_and_idempotent() {
        let once = autocomplete("iris", ModelConfig::default(), &classifier()).expect("completes");
        let again = autocomplete("iris", ModelConfig::default(), &classifier()).expect("completes");
        assert_eq!(once, again);
        let twice = autocomplete("iris", once.clone(), &classifier()).expect("completes");
        assert_eq!(twice, once);
    }

    #[test]
    fn a_model_with_fixed_first_dims_does_not_batch() {
        let c = autocomplete("fixed", ModelConfig::default(), &fixed_shape()).expect("completes");
        assert_eq!(c.max_batch_size, 0);
        assert_eq!(c.input[0].dims, vec![1, 16]);
        assert_eq!(c.output[0].dims, vec![1, 16]);
        assert!(
            c.scheduling_choice.is_none(),
            "no batcher for a non-batching model"
        );
        validate("fixed", &c, &fixed_shape()).expect("validates");
    }

    #[test]
    fn asking_a_non_batching_model_to_batch_is_refused() {
        let config = ModelConfig {
            max_batch_size: 8,
            ..Default::default()
        };
        let err = autocomplete("fixed", config, &fixed_shape())
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("fixed: invalid config: "), "{err}");
        assert!(err.contains("max_batch_size is 8"), "{err}");
    }

    #[test]
    fn explicit_max_batch_size_is_kept_and_batch_dim_dropped() {
        let config = ModelConfig {
            max_batch_size: 32,
            ..Default::default()
        };
        let c = autocomplete("iris", config, &classifier()).expect("completes");
        assert_eq!(c.max_batch_size, 32);
        assert_eq!(c.input[0].dims, vec![4]);
        let Some(SchedulingChoice::DynamicBatching(db)) = &c.scheduling_choice else {
            panic!("dynamic batching expected");
        };
        assert_eq!(db.preferred_batch_size, vec![32]);
    }

    #[test]
    fn max_batch_size_one_gets_no_batcher() {
        let config = ModelConfig {
            max_batch_size: 1,
            ..Default::default()
        };
        let c = autocomplete("iris", config, &classifier()).expect("completes");
        assert!(c.scheduling_choice.is_none());
    }

    #[test]
    fn a_config_with_inputs_and_outputs_is_not_touched_beyond_normalization() {
        // Triton skips auto-complete entirely here, so max_batch_size stays 0 (no batching) even
        // though the graph could batch, and the config's own dims are kept as written.
        let config = ModelConfig {
            input: vec![ModelInput {
                name: "float_input".into(),
                data_type: C::TypeFp32 as i32,
                dims: vec![-1, 4],
                ..Default::default()
            }],
            output: vec![ModelOutput {
                name: "probabilities".into(),
                data_type: C::TypeFp32 as i32,
                dims: vec![-1, 3],
                ..Default::default()
            }],
            ..Default::default()
        };
        let c = autocomplete("iris", config, &classifier()).expect("completes");
        assert_eq!(c.max_batch_size, 0);
        assert_eq!(c.input[0].dims, vec![-1, 4]);
        assert_eq!(c.output.len(), 1, "listed outputs are a chosen subset");
        assert!(c.scheduling_choice.is_none());
        validate("iris", &c, &classifier()).expect("validates");
    }

    #[test]
    fn only_the_missing_side_is_filled() {
        let config = ModelConfig {
            max_batch_size: 8,
            input: vec![ModelInput {
                name: "float_input".into(),
                data_type: C::TypeFp32 as i32,
                dims: vec![4],
                ..Default::default()
            }],
            ..Default::default()
        };
        let c = autocomplete("iris", config, &classifier()).expect("completes");
        assert_eq!(c.input.len(), 1);
        assert_eq!(c.output.len(), 2);
        assert_eq!(c.output[1].dims, vec![3]);
    }

    #[test]
    fn partially_written_tensors_are_completed_from_the_graph() {
        let config = ModelConfig {
            max_batch_size: 2,
            input: vec![ModelInput {
                name: "float_input".into(),
                ..Default::default()
            }],
            output: vec![ModelOutput {
                name: "label".into(),
                data_type: C::TypeInt64 as i32,
                ..Default::default()
            }],
            ..Default::default()
        };
        let c = autocomplete("iris", config, &classifier()).expect("completes");
        assert_eq!(c.input[0].data_type, C::TypeFp32 as i32);
        assert_eq!(c.input[0].dims, vec![4]);
        assert_eq!(c.output[0].dims, vec![1]);
        assert_eq!(
            c.output[0].reshape,
            Some(ModelTensorReshape { shape: vec![] })
        );
        validate("iris", &c, &classifier()).expect("validates");
    }

    #[test]
    fn scalar_graph_tensors_of_a_non_batching_model_become_dims_one() {
        let graph = GraphSignature {
            inputs: vec![tensor("s", DataType::Fp64, &[])],
            outputs: vec![tensor("t", DataType::Fp64, &[])],
        };
        let c = autocomplete("scalar", ModelConfig::default(), &graph).expect("completes");
        assert_eq!(c.max_batch_size, 0);
        assert_eq!(c.input[0].dims, vec![1]);
        assert_eq!(c.input[0].reshape, None);
        validate("scalar", &c, &graph).expect("validates");
    }

    #[test]
    fn stated_fields_are_kept() {
        let config = ModelConfig {
            name: "other".into(),
            platform: "tensorrt_plan".into(),
            default_model_filename: "net.onnx".into(),
            instance_group: vec![
                ModelInstanceGroup {
                    kind: Kind::Gpu as i32,
                    count: 3,
                    ..Default::default()
                },
                ModelInstanceGroup {
                    name: "cpu_pool".into(),
                    kind: Kind::Cpu as i32,
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let c = autocomplete("iris", config, &classifier()).expect("completes");
        assert_eq!(
            c.name, "other",
            "a wrong name is left for validate to report"
        );
        assert_eq!(c.platform, "tensorrt_plan");
        assert_eq!(
            c.backend, "",
            "no ONNX backend is claimed for a foreign platform"
        );
        assert_eq!(c.default_model_filename, "net.onnx");
        assert_eq!(c.instance_group[0].name, "other_0");
        assert_eq!(c.instance_group[0].count, 3);
        assert_eq!(c.instance_group[1].name, "cpu_pool");
        assert_eq!(c.instance_group[1].count, 1);
        assert!(validate("iris", &c, &classifier()).is_err());
    }

    #[test]
    fn existing_scheduler_and_preferred_sizes_are_kept() {
        let config = ModelConfig {
            max_batch_size: 16,
            scheduling_choice: Some(SchedulingChoice::DynamicBatching(ModelDynamicBatching {
                preferred_batch_size: vec![4, 8],
                max_queue_delay_microseconds: 500,
                ..Default::default()
            })),
            ..Default::default()
        };
        let c = autocomplete("iris", config, &classifier()).expect("completes");
        let Some(SchedulingChoice::DynamicBatching(db)) = &c.scheduling_choice else {
            panic!("dynamic batching expected");
        };
        assert_eq!(db.preferred_batch_size, vec![4, 8]);
        assert_eq!(db.max_queue_delay_microseconds, 500);
    }
}
