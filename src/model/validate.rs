//! Checks a (completed) ModelConfig against itself and against the ONNX graph it will run, with
//! Triton's rules: the ones of the server core (dims, reshape, dynamic batching, instance groups) and
//! the ones of the ONNX Runtime backend (every config tensor exists in the model with the same
//! datatype and a compatible shape). Every message names the tensor or setting and says what differs.
use std::collections::HashSet;

use super::{datatype_from_config, datatype_to_config, GraphSignature, GraphTensor, ModelError};
use crate::proto::model_config::SchedulingChoice;
use crate::proto::model_input::Format;
use crate::proto::model_instance_group::Kind;
use crate::proto::model_queue_policy::TimeoutAction;
use crate::proto::{ModelConfig, ModelDynamicBatching, ModelInput, ModelOutput};
use crate::tensor::DataType;

/// The platform and backend Triton reports for ONNX models; nothing else can be served here.
pub const ONNX_PLATFORM: &str = "onnxruntime_onnx";
pub const ONNX_BACKEND: &str = "onnxruntime";

/// Triton's marker for a variable-size dimension.
const WILDCARD: i64 = -1;

/// An input or output as requests see it, from the config: `dims` exclude the batch dimension (a
/// request to a model with max_batch_size > 0 sends `[batch] + dims`), -1 matches any size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DataType,
    pub dims: Vec<i64>,
    /// The config's `reshape`: the shape (also without the batch dimension) the ONNX graph itself
    /// takes or produces when it differs from `dims`, e.g. `dims: [1]`, `reshape: []` for a graph
    /// tensor of shape `[batch]`. The runtime converts between the two with `model_dims` and
    /// `client_dims`; no data moves, only the shape changes.
    pub reshape: Option<Vec<i64>>,
}

impl TensorSpec {
    /// The shape (without batch dimension) to hand the model for a request tensor whose shape
    /// (without batch dimension) is `client_dims`: the reshape with each -1 taken, in order, from the
    /// request's sizes at the -1 positions of `dims`. Without a reshape it is `client_dims` unchanged.
    pub fn model_dims(&self, client_dims: &[i64]) -> Vec<i64> {
        match &self.reshape {
            Some(reshape) => fill_wildcards(reshape, &self.dims, client_dims),
            None => client_dims.to_vec(),
        }
    }

    /// The inverse of `model_dims`: the shape (without batch dimension) a client sees for an output
    /// the model produced with shape (without batch dimension) `model_dims`.
    pub fn client_dims(&self, model_dims: &[i64]) -> Vec<i64> {
        match &self.reshape {
            Some(reshape) => fill_wildcards(&self.dims, reshape, model_dims),
            None => model_dims.to_vec(),
        }
    }
}

/// `target` with its k-th -1 replaced by the size `actual` has where `source` has its k-th -1.
/// Validation guarantees both patterns have the same number of -1 (Triton's reshape rule).
fn fill_wildcards(target: &[i64], source: &[i64], actual: &[i64]) -> Vec<i64> {
    let mut sizes = source
        .iter()
        .zip(actual)
        .filter(|(&s, _)| s == WILDCARD)
        .map(|(_, &a)| a);
    target
        .iter()
        .map(|&t| {
            if t == WILDCARD {
                sizes.next().unwrap_or(WILDCARD)
            } else {
                t
            }
        })
        .collect()
}

/// The inputs and outputs of a validated config, as requests and responses see them. Call after
/// `validate`; a tensor whose data_type is TYPE_INVALID (which `validate` refuses) is left out.
pub fn io_specs(config: &ModelConfig) -> (Vec<TensorSpec>, Vec<TensorSpec>) {
    let spec = |name: &str, data_type: i32, dims: &[i64], reshape: Option<&Vec<i64>>| {
        datatype_from_config(data_type).map(|dtype| TensorSpec {
            name: name.to_string(),
            dtype,
            dims: dims.to_vec(),
            reshape: reshape.cloned(),
        })
    };
    let inputs = config
        .input
        .iter()
        .filter_map(|i| {
            spec(
                &i.name,
                i.data_type,
                &i.dims,
                i.reshape.as_ref().map(|r| &r.shape),
            )
        })
        .collect();
    let outputs = config
        .output
        .iter()
        .filter_map(|o| {
            spec(
                &o.name,
                o.data_type,
                &o.dims,
                o.reshape.as_ref().map(|r| &r.shape),
            )
        })
        .collect();
    (inputs, outputs)
}

/// Validates a completed config (see `autocomplete`) against the ONNX graph it will serve.
pub fn validate(
    model: &str,
    config: &ModelConfig,
    graph: &GraphSignature,
) -> Result<(), ModelError> {
    let invalid = |reason: String| ModelError::InvalidConfig {
        model: model.to_string(),
        reason,
    };
    check_identity(model, config).map_err(invalid)?;
    check_unsupported_features(config).map_err(invalid)?;
    if config.max_batch_size < 0 {
        return Err(invalid(format!(
            "max_batch_size must be 0 (no batching) or positive, not {}",
            config.max_batch_size
        )));
    }
    check_inputs(config, graph).map_err(invalid)?;
    check_outputs(config, graph).map_err(invalid)?;
    if let Some(SchedulingChoice::DynamicBatching(batching)) = &config.scheduling_choice {
        check_dynamic_batching(batching, config.max_batch_size).map_err(invalid)?;
    }
    check_instance_groups(config).map_err(invalid)?;
    Ok(())
}

fn check_identity(model: &str, config: &ModelConfig) -> Result<(), String> {
    if config.name != model {
        return Err(format!(
            "config name '{}' does not match the model directory '{model}'",
            config.name
        ));
    }
    if !config.platform.is_empty() && config.platform != ONNX_PLATFORM {
        return Err(format!(
            "platform '{}' is not supported: only ONNX models (platform '{ONNX_PLATFORM}') are served",
            config.platform
        ));
    }
    if !config.backend.is_empty() && config.backend != ONNX_BACKEND {
        return Err(format!(
            "backend '{}' is not supported: only ONNX models (backend '{ONNX_BACKEND}') are served",
            config.backend
        ));
    }
    Ok(())
}

/// Settings that change what a request or response means and that this server does not implement.
/// Refusing them at load is better than serving something else than the config promises.
fn check_unsupported_features(config: &ModelConfig) -> Result<(), String> {
    match &config.scheduling_choice {
        Some(SchedulingChoice::EnsembleScheduling(_)) => {
            return Err("ensemble_scheduling is not supported".into())
        }
        Some(SchedulingChoice::DynamicBatching(_) | SchedulingChoice::SequenceBatching(_))
        | None => {}
    }
    if !config.batch_input.is_empty() {
        return Err("batch_input is not supported".into());
    }
    if !config.batch_output.is_empty() {
        return Err("batch_output is not supported".into());
    }
    if config
        .model_transaction_policy
        .as_ref()
        .is_some_and(|p| p.decoupled)
    {
        return Err(
            "model_transaction_policy.decoupled is not supported: ONNX models answer each request once"
                .into(),
        );
    }
    Ok(())
}

fn check_inputs(config: &ModelConfig, graph: &GraphSignature) -> Result<(), String> {
    let mbs = config.max_batch_size;
    let mut seen = HashSet::new();
    for input in &config.input {
        check_input_flags(input)?;
        check_io_shape(
            "input",
            &input.name,
            input.data_type,
            &input.dims,
            input.reshape.as_ref().map(|r| &r.shape[..]),
            mbs,
        )?;
        if !seen.insert(input.name.as_str()) {
            return Err(format!("input '{}' is listed more than once", input.name));
        }
        let tensor = find_in_graph("input", &input.name, &graph.inputs)?;
        check_against_graph(
            "input",
            input.data_type,
            shape_seen_by_model(&input.dims, input.reshape.as_ref().map(|r| &r.shape[..])),
            tensor,
            mbs,
            false,
        )?;
    }
    // Every graph input must be fed, so each needs a config entry (Triton: "configuration expects N
    // inputs, model provides M"); the sequence batcher feeds its control and state inputs itself.
    let fed = crate::scheduler::sequence::settings::SequenceSettings::fed_inputs(config);
    if let Some(missing) = graph
        .inputs
        .iter()
        .find(|t| !seen.contains(t.name.as_str()) && !fed.contains(&t.name))
    {
        return Err(format!(
            "the model has input '{}' ({} {:?}) that the config does not list",
            missing.name,
            config_type_name(datatype_to_config(missing.dtype)),
            missing.dims
        ));
    }
    Ok(())
}

fn check_input_flags(input: &ModelInput) -> Result<(), String> {
    let name = &input.name;
    if input.optional {
        return Err(format!("input '{name}': optional inputs are not supported"));
    }
    if input.is_shape_tensor {
        return Err(format!(
            "input '{name}': is_shape_tensor is only supported for TensorRT models"
        ));
    }
    if input.is_non_linear_format_io {
        return Err(format!(
            "input '{name}': is_non_linear_format_io is only supported for TensorRT models"
        ));
    }
    if input.allow_ragged_batch {
        return Err(format!(
            "input '{name}': allow_ragged_batch is not supported"
        ));
    }
    let format = Format::try_from(input.format).unwrap_or(Format::None);
    if matches!(format, Format::Nhwc | Format::Nchw) && input.dims.len() != 3 {
        return Err(format!(
            "input '{name}': format {} requires 3 dims, config has {:?}",
            format.as_str_name(),
            input.dims
        ));
    }
    Ok(())
}

fn check_outputs(config: &ModelConfig, graph: &GraphSignature) -> Result<(), String> {
    let mbs = config.max_batch_size;
    let mut seen = HashSet::new();
    for output in &config.output {
        check_output_flags(output)?;
        check_io_shape(
            "output",
            &output.name,
            output.data_type,
            &output.dims,
            output.reshape.as_ref().map(|r| &r.shape[..]),
            mbs,
        )?;
        if !seen.insert(output.name.as_str()) {
            return Err(format!("output '{}' is listed more than once", output.name));
        }
        let tensor = find_in_graph("output", &output.name, &graph.outputs)?;
        // Outputs compare exactly (Triton's ONNX backend): the config promises clients a shape, so
        // a variable graph dimension cannot be declared fixed, nor the other way round.
        check_against_graph(
            "output",
            output.data_type,
            shape_seen_by_model(&output.dims, output.reshape.as_ref().map(|r| &r.shape[..])),
            tensor,
            mbs,
            true,
        )?;
    }
    // A config may list only some of the graph's outputs: the others are computed and dropped.
    Ok(())
}

fn check_output_flags(output: &ModelOutput) -> Result<(), String> {
    if output.is_shape_tensor {
        return Err(format!(
            "output '{}': is_shape_tensor is only supported for TensorRT models",
            output.name
        ));
    }
    if output.is_non_linear_format_io {
        return Err(format!(
            "output '{}': is_non_linear_format_io is only supported for TensorRT models",
            output.name
        ));
    }
    Ok(())
}

/// The config's own shape rules (Triton core, independent of the model): a name, a datatype,
/// non-empty dims of sizes >= 1 or -1, and a reshape that holds the same elements.
fn check_io_shape(
    kind: &str,
    name: &str,
    data_type: i32,
    dims: &[i64],
    reshape: Option<&[i64]>,
    mbs: i32,
) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("an {kind} has no name"));
    }
    if datatype_from_config(data_type).is_none() {
        return Err(format!(
            "{kind} '{name}': data_type must be set to a valid type, not {}",
            config_type_name(data_type)
        ));
    }
    if dims.is_empty() {
        return Err(format!(
            "{kind} '{name}': dims must not be empty (use dims: [ 1 ] with reshape: {{ shape: [ ] }} for a tensor of shape [batch])"
        ));
    }
    if let Some(bad) = dims.iter().find(|&&d| d < 1 && d != WILDCARD) {
        return Err(format!(
            "{kind} '{name}': dimension {bad} in dims {dims:?} must be >= 1, or -1 for a variable size"
        ));
    }
    let Some(reshape) = reshape else {
        return Ok(());
    };
    if reshape.is_empty() && mbs == 0 {
        return Err(format!(
            "{kind} '{name}': an empty reshape needs max_batch_size > 0 (scalar tensors are not supported)"
        ));
    }
    if let Some(bad) = reshape.iter().find(|&&d| d < 1 && d != WILDCARD) {
        return Err(format!(
            "{kind} '{name}': dimension {bad} in reshape {reshape:?} must be >= 1, or -1 for a variable size"
        ));
    }
    // Between consecutive -1s both shapes must hold the same number of elements, so the reshape
    // never moves data and each -1 maps onto the -1 at the same rank among the -1s.
    let dims_runs = fixed_runs(dims);
    let reshape_runs = fixed_runs(reshape);
    if dims_runs.iter().chain(&reshape_runs).any(Option::is_none) {
        return Err(format!(
            "{kind} '{name}': dims {dims:?} or reshape {reshape:?} has too many elements"
        ));
    }
    if dims_runs.len() != reshape_runs.len() {
        return Err(format!(
            "{kind} '{name}': dims {dims:?} and reshape {reshape:?} have a different number of variable-size (-1) dimensions"
        ));
    }
    // An empty reshape counts as one element, so dims [1] -> reshape [] passes (Triton's special case).
    if dims_runs != reshape_runs {
        return Err(format!(
            "{kind} '{name}': dims {dims:?} and reshape {reshape:?} do not hold the same number of elements"
        ));
    }
    Ok(())
}

/// Element counts of the fixed stretches between -1s; None where a product overflows.
fn fixed_runs(shape: &[i64]) -> Vec<Option<i64>> {
    let mut runs = vec![Some(1i64)];
    for &d in shape {
        if d == WILDCARD {
            runs.push(Some(1));
        } else if let Some(last) = runs.last_mut() {
            *last = last.and_then(|n| n.checked_mul(d));
        }
    }
    runs
}

/// The shape (without batch dimension) the ONNX graph sees: the reshape when there is one.
fn shape_seen_by_model<'a>(dims: &'a [i64], reshape: Option<&'a [i64]>) -> &'a [i64] {
    reshape.unwrap_or(dims)
}

fn find_in_graph<'g>(
    kind: &str,
    name: &str,
    tensors: &'g [GraphTensor],
) -> Result<&'g GraphTensor, String> {
    tensors.iter().find(|t| t.name == name).ok_or_else(|| {
        let names: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
        format!(
            "{kind} '{name}' is not an {kind} of the model; the model's {kind}s are: {}",
            if names.is_empty() {
                "(none)".to_string()
            } else {
                names.join(", ")
            }
        )
    })
}

/// Datatype and shape of one config tensor against the graph tensor of the same name.
fn check_against_graph(
    kind: &str,
    data_type: i32,
    config_dims: &[i64],
    tensor: &GraphTensor,
    mbs: i32,
    exact: bool,
) -> Result<(), String> {
    let name = &tensor.name;
    let expected = datatype_to_config(tensor.dtype);
    if data_type != expected {
        return Err(format!(
            "{kind} '{name}': config datatype {} but the model expects {}",
            config_type_name(data_type),
            config_type_name(expected)
        ));
    }

    if tensor.dims.is_empty() {
        // A scalar in the graph: a non-batching config may describe it as [1] (Triton's convention,
        // since config dims cannot be empty); a batching one cannot batch it at all.
        if mbs > 0 {
            return Err(format!(
                "{kind} '{name}': max_batch_size > 0 needs a batch dimension, but the model's {kind} is a scalar"
            ));
        }
        if config_dims.iter().any(|&d| d != 1) {
            return Err(format!(
                "{kind} '{name}': the model's {kind} is a scalar, so the config dims must be [1], not {config_dims:?}"
            ));
        }
        return Ok(());
    }

    let full: Vec<i64> = if mbs > 0 {
        if tensor.dims[0] != WILDCARD {
            return Err(format!(
                "{kind} '{name}': max_batch_size > 0 needs the model's first dimension to be variable (-1) for the batch, but the model's shape is {:?}",
                tensor.dims
            ));
        }
        std::iter::once(WILDCARD)
            .chain(config_dims.iter().copied())
            .collect()
    } else {
        config_dims.to_vec()
    };
    let fits = full.len() == tensor.dims.len()
        && full
            .iter()
            .zip(&tensor.dims)
            .all(|(&c, &g)| c == g || (!exact && g == WILDCARD));
    if !fits {
        let batch_note = if mbs > 0 {
            " (the batch dimension -1 followed by the config dims, since max_batch_size > 0)"
        } else {
            ""
        };
        let rule = if exact {
            "; output dims must equal the model's, -1 where the model's size is variable"
        } else {
            ""
        };
        return Err(format!(
            "{kind} '{name}': config shape {full:?}{batch_note} does not match the model's shape {:?}{rule}",
            tensor.dims
        ));
    }
    Ok(())
}

fn check_dynamic_batching(batching: &ModelDynamicBatching, mbs: i32) -> Result<(), String> {
    for &size in &batching.preferred_batch_size {
        if size < 1 {
            return Err(format!(
                "dynamic_batching: preferred_batch_size {size} must be positive"
            ));
        }
        if size > mbs {
            return Err(format!(
                "dynamic_batching: preferred_batch_size {size} exceeds max_batch_size {mbs}"
            ));
        }
    }
    let levels = batching.priority_levels;
    let default_level = batching.default_priority_level;
    if levels == 0 {
        if default_level != 0 {
            return Err(format!(
                "dynamic_batching: default_priority_level {default_level} is set but priority_levels is 0"
            ));
        }
        if !batching.priority_queue_policy.is_empty() {
            return Err(
                "dynamic_batching: priority_queue_policy is set but priority_levels is 0".into(),
            );
        }
    } else {
        if default_level == 0 || default_level > levels {
            return Err(format!(
                "dynamic_batching: default_priority_level must be in [1, {levels}], not {default_level}"
            ));
        }
        let mut keys: Vec<u64> = batching.priority_queue_policy.keys().copied().collect();
        keys.sort_unstable();
        if let Some(bad) = keys.iter().find(|&&k| k == 0 || k > levels) {
            return Err(format!(
                "dynamic_batching: priority_queue_policy level {bad} is outside [1, {levels}]"
            ));
        }
    }
    if batching.preserve_ordering {
        if levels > 1 {
            return Err(
                "dynamic_batching: preserve_ordering allows only one priority level".into(),
            );
        }
        let delays = batching
            .default_queue_policy
            .iter()
            .chain(batching.priority_queue_policy.values())
            .any(|p| {
                p.default_timeout_microseconds != 0
                    && p.timeout_action == TimeoutAction::Delay as i32
            });
        if delays {
            return Err(
                "dynamic_batching: a queue policy cannot use timeout_action DELAY when preserve_ordering is true"
                    .into(),
            );
        }
    }
    Ok(())
}

fn check_instance_groups(config: &ModelConfig) -> Result<(), String> {
    if config.instance_group.is_empty() {
        return Err("instance_group must list at least one group".into());
    }
    for (i, group) in config.instance_group.iter().enumerate() {
        let label = if group.name.is_empty() {
            format!("instance_group {i}")
        } else {
            format!("instance_group '{}'", group.name)
        };
        if group.count < 1 {
            return Err(format!("{label}: count must be >= 1, not {}", group.count));
        }
        match Kind::try_from(group.kind) {
            Ok(Kind::Cpu) if !group.gpus.is_empty() => {
                return Err(format!("{label}: kind KIND_CPU cannot list gpus"));
            }
            Ok(Kind::Model) => {
                return Err(format!(
                    "{label}: kind KIND_MODEL is not supported for ONNX models"
                ));
            }
            Ok(Kind::Cpu | Kind::Gpu | Kind::Auto) => {}
            Err(_) => return Err(format!("{label}: unknown kind {}", group.kind)),
        }
        if let Some(bad) = group.gpus.iter().find(|&&g| g < 0) {
            return Err(format!("{label}: gpu id {bad} is negative"));
        }
        if !group.profile.is_empty() {
            return Err(format!(
                "{label}: profile is only supported for TensorRT models"
            ));
        }
    }
    Ok(())
}

/// The config spelling of a datatype value (`TYPE_FP32`), or the raw number if it is unknown.
pub(crate) fn config_type_name(value: i32) -> String {
    crate::proto::DataType::try_from(value)
        .map(|d| d.as_str_name().to_string())
        .unwrap_or_else(|_| format!("data_type {value}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::model_instance_group::Kind;
    use crate::proto::{
        DataType as C, ModelInstanceGroup, ModelQueuePolicy, ModelTensorReshape,
        ModelTransactionPolicy,
    };

    fn tensor(name: &str, dtype: DataType, dims: &[i64]) -> GraphTensor {
        GraphTensor {
            name: name.into(),
            dtype,
            dims: dims.to_vec(),
        }
    }

    fn graph() -> GraphSignature {
        GraphSignature {
            inputs: vec![
                tensor("INPUT0", DataType::Int32, &[-1, 16]),
                tensor("INPUT1", DataType::Int32, &[-1, -1]),
            ],
            outputs: vec![
                tensor("OUTPUT0", DataType::Int32, &[-1, 16]),
                tensor("OUTPUT1", DataType::Fp32, &[-1]),
            ],
        }
    }

    fn input(name: &str, dtype: C, dims: &[i64]) -> ModelInput {
        ModelInput {
            name: name.into(),
            data_type: dtype as i32,
            dims: dims.to_vec(),
            ..Default::default()
        }
    }

    fn output(name: &str, dtype: C, dims: &[i64]) -> ModelOutput {
        ModelOutput {
            name: name.into(),
            data_type: dtype as i32,
            dims: dims.to_vec(),
            ..Default::default()
        }
    }

    /// A valid batching config for `graph()`.
    fn config() -> ModelConfig {
        ModelConfig {
            name: "simple".into(),
            platform: ONNX_PLATFORM.into(),
            backend: ONNX_BACKEND.into(),
            max_batch_size: 8,
            input: vec![
                input("INPUT0", C::TypeInt32, &[16]),
                input("INPUT1", C::TypeInt32, &[4]),
            ],
            output: vec![
                output("OUTPUT0", C::TypeInt32, &[16]),
                ModelOutput {
                    reshape: Some(ModelTensorReshape { shape: vec![] }),
                    ..output("OUTPUT1", C::TypeFp32, &[1])
                },
            ],
            instance_group: vec![ModelInstanceGroup {
                name: "simple".into(),
                kind: Kind::Cpu as i32,
                count: 1,
                ..Default::default()
            }],
            scheduling_choice: Some(SchedulingChoice::DynamicBatching(ModelDynamicBatching {
                preferred_batch_size: vec![4, 8],
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    fn error(config: &ModelConfig) -> String {
        validate("simple", config, &graph())
            .expect_err("config should be refused")
            .to_string()
    }

    fn assert_refused(config: &ModelConfig, needles: &[&str]) {
        let err = error(config);
        assert!(err.starts_with("simple: invalid config: "), "{err}");
        for needle in needles {
            assert!(err.contains(needle), "expected {needle:?} in {err:?}");
        }
    }

    #[test]
    fn a_matching_config_is_accepted() {
        validate("simple", &config(), &graph()).expect("valid");
    }

    #[test]
    fn datatype_mismatch_names_the_tensor_and_both_types() {
        let mut c = config();
        c.input[0].data_type = C::TypeFp32 as i32;
        assert_refused(
            &c,
            &["input 'INPUT0': config datatype TYPE_FP32 but the model expects TYPE_INT32"],
        );
        let mut c = config();
        c.output[1].data_type = C::TypeFp16 as i32;
        assert_refused(&c, &["output 'OUTPUT1'", "TYPE_FP16", "TYPE_FP32"]);
    }

    #[test]
    fn invalid_or_missing_datatype_is_refused() {
        let mut c = config();
        c.input[0].data_type = 0;
        assert_refused(&c, &["input 'INPUT0'", "TYPE_INVALID"]);
        let mut c = config();
        c.input[0].data_type = 99;
        assert_refused(&c, &["data_type 99"]);
    }

    #[test]
    fn unknown_and_missing_tensors_are_named() {
        let mut c = config();
        c.input[1].name = "INPUT9".into();
        assert_refused(
            &c,
            &[
                "input 'INPUT9' is not an input of the model",
                "INPUT0, INPUT1",
            ],
        );

        let mut c = config();
        c.input.pop();
        assert_refused(&c, &["the model has input 'INPUT1'", "does not list"]);

        let mut c = config();
        c.output[0].name = "nope".into();
        assert_refused(&c, &["output 'nope' is not an output of the model"]);

        // Listing a subset of the outputs is fine.
        let mut c = config();
        c.output.remove(1);
        validate("simple", &c, &graph()).expect("subset of outputs is valid");
    }

    #[test]
    fn duplicates_are_refused() {
        let mut c = config();
        c.input.push(input("INPUT0", C::TypeInt32, &[16]));
        assert_refused(&c, &["input 'INPUT0' is listed more than once"]);
    }

    #[test]
    fn input_dims_must_fit_where_the_model_is_fixed() {
        let mut c = config();
        c.input[0].dims = vec![15];
        assert_refused(&c, &["input 'INPUT0'", "[-1, 15]", "[-1, 16]"]);
        let mut c = config();
        c.input[0].dims = vec![16, 1];
        assert_refused(&c, &["input 'INPUT0'", "[-1, 16, 1]"]);
        // A variable graph dim accepts a fixed or variable config dim.
        let mut c = config();
        c.input[1].dims = vec![-1];
        validate("simple", &c, &graph()).expect("valid");
        // A variable config dim where the model is fixed is refused.
        let mut c = config();
        c.input[0].dims = vec![-1];
        assert_refused(&c, &["input 'INPUT0'"]);
    }

    #[test]
    fn output_dims_must_equal_the_model_exactly() {
        let graph = GraphSignature {
            inputs: graph().inputs,
            outputs: vec![tensor("OUTPUT0", DataType::Int32, &[-1, -1])],
        };
        let mut c = config();
        c.output = vec![output("OUTPUT0", C::TypeInt32, &[16])];
        let err = validate("simple", &c, &graph).unwrap_err().to_string();
        assert!(err.contains("output 'OUTPUT0'"), "{err}");
        c.output[0].dims = vec![-1];
        validate("simple", &c, &graph).expect("-1 where the model is variable");
    }

    #[test]
    fn batching_needs_a_variable_first_dimension() {
        let graph = GraphSignature {
            inputs: vec![tensor("INPUT0", DataType::Int32, &[1, 16])],
            outputs: vec![],
        };
        let mut c = config();
        c.input.truncate(1);
        c.output.clear();
        let err = validate("simple", &c, &graph).unwrap_err().to_string();
        assert!(err.contains("input 'INPUT0'"), "{err}");
        assert!(err.contains("first dimension to be variable"), "{err}");
        assert!(err.contains("[1, 16]"), "{err}");

        // The same graph is fine without batching, with the full shape in dims.
        c.max_batch_size = 0;
        c.scheduling_choice = None;
        c.input[0].dims = vec![1, 16];
        validate("simple", &c, &graph).expect("valid without batching");
    }

    #[test]
    fn non_batching_config_compares_full_shapes() {
        let mut c = config();
        c.max_batch_size = 0;
        c.scheduling_choice = None;
        c.input[0].dims = vec![-1, 16];
        c.input[1].dims = vec![2, 3];
        c.output = vec![output("OUTPUT0", C::TypeInt32, &[-1, 16])];
        validate("simple", &c, &graph()).expect("valid");
        c.input[0].dims = vec![16];
        assert_refused(&c, &["input 'INPUT0'", "[16]", "[-1, 16]"]);
    }

    #[test]
    fn config_dims_rules() {
        let mut c = config();
        c.input[0].dims = vec![];
        assert_refused(&c, &["input 'INPUT0': dims must not be empty"]);
        let mut c = config();
        c.input[1].dims = vec![0];
        assert_refused(&c, &["input 'INPUT1'", "dimension 0", ">= 1, or -1"]);
        let mut c = config();
        c.input[1].dims = vec![-2];
        assert_refused(&c, &["dimension -2"]);
        let mut c = config();
        c.input[0].name = String::new();
        assert_refused(&c, &["an input has no name"]);
    }

    #[test]
    fn reshape_rules() {
        // Same element count, graph checked against the reshape.
        let graph = GraphSignature {
            inputs: vec![tensor("x", DataType::Fp32, &[-1, 2, 8, -1])],
            outputs: vec![tensor("y", DataType::Fp32, &[-1])],
        };
        let mut c = config();
        c.input = vec![ModelInput {
            reshape: Some(ModelTensorReshape {
                shape: vec![2, 8, -1],
            }),
            ..input("x", C::TypeFp32, &[16, -1])
        }];
        c.output = vec![ModelOutput {
            reshape: Some(ModelTensorReshape { shape: vec![] }),
            ..output("y", C::TypeFp32, &[1])
        }];
        validate("simple", &c, &graph).expect("valid reshapes");

        let mut bad = c.clone();
        bad.input[0].reshape = Some(ModelTensorReshape {
            shape: vec![2, 7, -1],
        });
        let err = validate("simple", &bad, &graph).unwrap_err().to_string();
        assert!(
            err.contains("do not hold the same number of elements"),
            "{err}"
        );

        let mut bad = c.clone();
        bad.input[0].reshape = Some(ModelTensorReshape {
            shape: vec![16, -1, -1],
        });
        let err = validate("simple", &bad, &graph).unwrap_err().to_string();
        assert!(err.contains("different number of variable-size"), "{err}");

        let mut bad = c.clone();
        bad.max_batch_size = 0;
        bad.scheduling_choice = None;
        bad.input[0].dims = vec![-1, 16, -1];
        bad.input[0].reshape = Some(ModelTensorReshape {
            shape: vec![-1, 2, 8, -1],
        });
        let err = validate("simple", &bad, &graph).unwrap_err().to_string();
        assert!(
            err.contains("empty reshape needs max_batch_size > 0"),
            "{err}"
        );

        let mut bad = c.clone();
        bad.output[0].dims = vec![2];
        let err = validate("simple", &bad, &graph).unwrap_err().to_string();
        assert!(err.contains("output 'y'"), "{err}");

        let mut bad = c;
        bad.input[0].reshape = Some(ModelTensorReshape {
            shape: vec![i64::MAX, 4, -1],
        });
        bad.input[0].dims = vec![i64::MAX, 4, -1];
        let err = validate("simple", &bad, &graph).unwrap_err().to_string();
        assert!(err.contains("too many elements"), "{err}");
    }

    #[test]
    fn scalar_graph_tensors() {
        let graph = GraphSignature {
            inputs: vec![tensor("s", DataType::Bool, &[])],
            outputs: vec![],
        };
        let mut c = config();
        c.max_batch_size = 0;
        c.scheduling_choice = None;
        c.input = vec![input("s", C::TypeBool, &[1])];
        c.output.clear();
        validate("simple", &c, &graph).expect("[1] describes a scalar without batching");
        c.input[0].dims = vec![2];
        let err = validate("simple", &c, &graph).unwrap_err().to_string();
        assert!(err.contains("scalar"), "{err}");
        c.input[0].dims = vec![1];
        c.max_batch_size = 4;
        let err = validate("simple", &c, &graph).unwrap_err().to_string();
        assert!(err.contains("scalar"), "{err}");
    }

    #[test]
    fn identity_and_platform() {
        let err = validate("other", &config(), &graph())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("config name 'simple' does not match the model directory 'other'"),
            "{err}"
        );
        let mut c = config();
        c.platform = "tensorrt_plan".into();
        assert_refused(&c, &["platform 'tensorrt_plan' is not supported"]);
        let mut c = config();
        c.backend = "python".into();
        assert_refused(&c, &["backend 'python' is not supported"]);
        let mut c = config();
        c.max_batch_size = -1;
        c.scheduling_choice = None;
        assert_refused(&c, &["max_batch_size must be 0", "-1"]);
    }

    #[test]
    fn unsupported_features_are_refused_clearly() {
        let mut c = config();
        c.model_transaction_policy = Some(ModelTransactionPolicy { decoupled: true });
        assert_refused(&c, &["decoupled"]);
        let mut c = config();
        c.input[0].optional = true;
        assert_refused(&c, &["input 'INPUT0': optional"]);
        let mut c = config();
        c.input[0].is_shape_tensor = true;
        assert_refused(&c, &["input 'INPUT0': is_shape_tensor"]);
        let mut c = config();
        c.input[0].allow_ragged_batch = true;
        assert_refused(&c, &["allow_ragged_batch"]);
        let mut c = config();
        c.input[0].format = Format::Nchw as i32;
        assert_refused(&c, &["format FORMAT_NCHW requires 3 dims"]);
    }

    #[test]
    fn dynamic_batching_rules() {
        let with = |db: ModelDynamicBatching| {
            let mut c = config();
            c.scheduling_choice = Some(SchedulingChoice::DynamicBatching(db));
            c
        };
        assert_refused(
            &with(ModelDynamicBatching {
                preferred_batch_size: vec![4, 16],
                ..Default::default()
            }),
            &["preferred_batch_size 16 exceeds max_batch_size 8"],
        );
        assert_refused(
            &with(ModelDynamicBatching {
                preferred_batch_size: vec![0],
                ..Default::default()
            }),
            &["preferred_batch_size 0 must be positive"],
        );
        assert_refused(
            &with(ModelDynamicBatching {
                priority_levels: 3,
                default_priority_level: 4,
                ..Default::default()
            }),
            &["default_priority_level must be in [1, 3], not 4"],
        );
        assert_refused(
            &with(ModelDynamicBatching {
                priority_levels: 3,
                default_priority_level: 0,
                ..Default::default()
            }),
            &["not 0"],
        );
        assert_refused(
            &with(ModelDynamicBatching {
                default_priority_level: 1,
                ..Default::default()
            }),
            &["priority_levels is 0"],
        );
        assert_refused(
            &with(ModelDynamicBatching {
                priority_levels: 2,
                default_priority_level: 1,
                priority_queue_policy: [(3, ModelQueuePolicy::default())].into(),
                ..Default::default()
            }),
            &["priority_queue_policy level 3 is outside [1, 2]"],
        );
        assert_refused(
            &with(ModelDynamicBatching {
                preserve_ordering: true,
                priority_levels: 2,
                default_priority_level: 1,
                ..Default::default()
            }),
            &["preserve_ordering allows only one priority level"],
        );
        assert_refused(
            &with(ModelDynamicBatching {
                preserve_ordering: true,
                default_queue_policy: Some(ModelQueuePolicy {
                    timeout_action: TimeoutAction::Delay as i32,
                    default_timeout_microseconds: 100,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            &["DELAY"],
        );
        validate(
            "simple",
            &with(ModelDynamicBatching {
                priority_levels: 2,
                default_priority_level: 2,
                priority_queue_policy: [(1, ModelQueuePolicy::default())].into(),
                ..Default::default()
            }),
            &graph(),
        )
        .expect("consistent priorities are valid");
    }

    #[test]
    fn instance_group_rules() {
        let mut c = config();
        c.instance_group.clear();
        assert_refused(&c, &["instance_group must list at least one group"]);
        let mut c = config();
        c.instance_group[0].count = 0;
        assert_refused(&c, &["instance_group 'simple': count must be >= 1, not 0"]);
        let mut c = config();
        c.instance_group[0].gpus = vec![0];
        assert_refused(&c, &["KIND_CPU cannot list gpus"]);
        let mut c = config();
        c.instance_group[0].kind = Kind::Model as i32;
        assert_refused(&c, &["KIND_MODEL"]);
        let mut c = config();
        c.instance_group[0].kind = Kind::Gpu as i32;
        c.instance_group[0].gpus = vec![0, 1];
        validate("simple", &c, &graph()).expect("GPU groups are valid");
    }

    #[test]
    fn io_specs_give_config_dims_without_batch() {
        let (inputs, outputs) = io_specs(&config());
        assert_eq!(
            inputs[0],
            TensorSpec {
                name: "INPUT0".into(),
                dtype: DataType::Int32,
                dims: vec![16],
                reshape: None,
            }
        );
        assert_eq!(inputs[1].dims, vec![4]);
        assert_eq!(outputs[1].dtype, DataType::Fp32);
        assert_eq!(outputs[1].dims, vec![1]);
        assert_eq!(outputs[1].reshape, Some(vec![]));
    }

    #[test]
    fn reshape_resolution_between_client_and_model_shapes() {
        let spec = TensorSpec {
            name: "x".into(),
            dtype: DataType::Fp32,
            dims: vec![2, 4, -1, 6],
            reshape: Some(vec![8, -1, 1, 6]),
        };
        assert_eq!(spec.model_dims(&[2, 4, 5, 6]), vec![8, 5, 1, 6]);
        assert_eq!(spec.client_dims(&[8, 5, 1, 6]), vec![2, 4, 5, 6]);

        let label = TensorSpec {
            name: "label".into(),
            dtype: DataType::Int64,
            dims: vec![1],
            reshape: Some(vec![]),
        };
        assert_eq!(label.model_dims(&[1]), Vec::<i64>::new());
        assert_eq!(label.client_dims(&[]), vec![1]);

        let plain = TensorSpec {
            reshape: None,
            ..label
        };
        assert_eq!(plain.model_dims(&[3, 3]), vec![3, 3]);
        assert_eq!(plain.client_dims(&[7]), vec![7]);
    }
}
