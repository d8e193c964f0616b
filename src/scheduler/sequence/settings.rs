//! The sequence batcher's settings, read from a config's `sequence_batching` with Triton's rules:
//! the strategy (Direct: a sequence keeps one batch slot of one instance; Oldest: the oldest ready
//! sequences are batched on any instance), the idle timeout, the control tensors the batcher
//! feeds, and the implicit state carried between the requests of a sequence.
use std::time::Duration;

use crate::model::{datatype_from_config, GraphSignature, ModelConfig};
use crate::proto::model_config::SchedulingChoice;
use crate::proto::model_sequence_batching::control::Kind;
use crate::proto::model_sequence_batching::{Control, StrategyChoice};
use crate::tensor::DataType;

/// Triton's default `max_sequence_idle_microseconds`.
const DEFAULT_IDLE: Duration = Duration::from_secs(1);
/// Bound on slots: sequences one model may have in progress at once (beyond them, sequences wait
/// in the backlog, which the queue bound limits).
pub const MAX_SLOTS: usize = 4096;

#[derive(Debug, Clone, PartialEq)]
pub enum Strategy {
    Direct,
    Oldest { max_queue_delay: Duration },
}

/// A boolean control (START, END, READY) as the bytes of one element for false and for true.
#[derive(Debug, Clone, PartialEq)]
pub struct FlagEncoding {
    pub dtype: DataType,
    pub false_value: Vec<u8>,
    pub true_value: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ControlKind {
    Start(FlagEncoding),
    End(FlagEncoding),
    Ready(FlagEncoding),
    /// The correlation id as UINT64 (or another integer type) or BYTES.
    CorrId(DataType),
}

#[derive(Debug, Clone, PartialEq)]
pub struct ControlTensor {
    pub name: String,
    pub kind: ControlKind,
}

/// Implicit state: `input` is fed from the previous request's `output` (zeros at START).
#[derive(Debug, Clone, PartialEq)]
pub struct StateTensor {
    pub input: String,
    pub output: String,
    pub dtype: DataType,
    pub dims: Vec<i64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SequenceSettings {
    pub model: String,
    pub max_batch_size: usize,
    pub strategy: Strategy,
    /// Sequences in progress at once: instances x slots per instance (Direct) or
    /// max_candidate_sequences (Oldest).
    pub slots_per_instance: usize,
    pub max_candidates: usize,
    pub idle_timeout: Duration,
    pub controls: Vec<ControlTensor>,
    pub states: Vec<StateTensor>,
    /// Requests that may wait at once, over all sequences.
    pub max_queue: usize,
    /// The config's outputs: what a request that names none receives.
    pub outputs: Vec<String>,
}

impl SequenceSettings {
    /// None when the config has no `sequence_batching`.
    pub fn from_config(
        config: &ModelConfig,
        instances: usize,
        max_queue: usize,
    ) -> Result<Option<SequenceSettings>, String> {
        let Some(SchedulingChoice::SequenceBatching(seq)) = &config.scheduling_choice else {
            return Ok(None);
        };
        if seq.iterative_sequence {
            return Err("sequence_batching.iterative_sequence is not supported".into());
        }
        let max_batch_size = config.max_batch_size.max(0) as usize;
        let slots_per_instance = max_batch_size.max(1);
        let (strategy, max_candidates) = match &seq.strategy_choice {
            None | Some(StrategyChoice::Direct(_)) => {
                (Strategy::Direct, slots_per_instance * instances.max(1))
            }
            Some(StrategyChoice::Oldest(o)) => {
                if o.max_candidate_sequences < 1 {
                    return Err(
                        "sequence_batching.oldest.max_candidate_sequences must be at least 1"
                            .into(),
                    );
                }
                let delay = Duration::from_micros(o.max_queue_delay_microseconds);
                (
                    Strategy::Oldest {
                        max_queue_delay: delay,
                    },
                    o.max_candidate_sequences as usize,
                )
            }
        };
        if max_candidates > MAX_SLOTS {
            return Err(format!(
                "sequence_batching allows {max_candidates} sequences at once; at most {MAX_SLOTS} are supported"
            ));
        }
        let idle_timeout = match seq.max_sequence_idle_microseconds {
            0 => DEFAULT_IDLE,
            us => Duration::from_micros(us),
        };
        let controls = seq
            .control_input
            .iter()
            .map(|c| control_tensor(&c.name, &c.control))
            .collect::<Result<Vec<_>, _>>()?;
        let states = seq
            .state
            .iter()
            .map(|s| {
                let dtype = datatype_from_config(s.data_type).ok_or_else(|| {
                    format!(
                        "sequence_batching state '{}': data_type is missing",
                        s.input_name
                    )
                })?;
                if !s.initial_state.is_empty() {
                    return Err(format!(
                        "sequence_batching state '{}': initial_state is not supported (state starts as zeros)",
                        s.input_name
                    ));
                }
                if dtype == DataType::Bytes {
                    return Err(format!(
                        "sequence_batching state '{}': TYPE_STRING state is not supported",
                        s.input_name
                    ));
                }
                if s.input_name.is_empty() || s.output_name.is_empty() {
                    return Err("sequence_batching state needs input_name and output_name".into());
                }
                if s.dims.iter().any(|&d| d < 1) {
                    return Err(format!(
                        "sequence_batching state '{}': dims must be fixed and positive, got {:?}",
                        s.input_name, s.dims
                    ));
                }
                Ok(StateTensor {
                    input: s.input_name.clone(),
                    output: s.output_name.clone(),
                    dtype,
                    dims: s.dims.clone(),
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Some(SequenceSettings {
            model: config.name.clone(),
            max_batch_size,
            strategy,
            slots_per_instance,
            max_candidates,
            idle_timeout,
            controls,
            states,
            max_queue,
            outputs: config.output.iter().map(|o| o.name.clone()).collect(),
        }))
    }

    /// Graph inputs the batcher feeds itself (controls and state), which requests must not send.
    pub fn fed_inputs(config: &ModelConfig) -> Vec<String> {
        let Some(SchedulingChoice::SequenceBatching(seq)) = &config.scheduling_choice else {
            return Vec::new();
        };
        seq.control_input
            .iter()
            .map(|c| c.name.clone())
            .chain(seq.state.iter().map(|s| s.input_name.clone()))
            .collect()
    }

    /// Every control and state tensor must exist in the graph with the datatype the config gives.
    pub fn check_against_graph(&self, graph: &GraphSignature) -> Result<(), String> {
        for control in &self.controls {
            let dtype = match &control.kind {
                ControlKind::Start(f) | ControlKind::End(f) | ControlKind::Ready(f) => f.dtype,
                ControlKind::CorrId(d) => *d,
            };
            check_graph_tensor(graph, "control input", &control.name, dtype, true)?;
        }
        for state in &self.states {
            check_graph_tensor(graph, "state input", &state.input, state.dtype, true)?;
            check_graph_tensor(graph, "state output", &state.output, state.dtype, false)?;
        }
        Ok(())
    }
}

fn check_graph_tensor(
    graph: &GraphSignature,
    what: &str,
    name: &str,
    dtype: DataType,
    input: bool,
) -> Result<(), String> {
    let list = if input { &graph.inputs } else { &graph.outputs };
    let tensor = list
        .iter()
        .find(|t| t.name == name)
        .ok_or_else(|| format!("sequence_batching {what} '{name}' is not in the model"))?;
    if tensor.dtype != dtype {
        return Err(format!(
            "sequence_batching {what} '{name}' is {} in the config but {} in the model",
            dtype.as_str(),
            tensor.dtype.as_str()
        ));
    }
    Ok(())
}

fn control_tensor(name: &str, controls: &[Control]) -> Result<ControlTensor, String> {
    let [control] = controls else {
        return Err(format!(
            "sequence_batching control_input '{name}' must have exactly one control"
        ));
    };
    let kind = Kind::try_from(control.kind)
        .map_err(|_| format!("control_input '{name}': unknown kind {}", control.kind))?;
    let kind = match kind {
        Kind::ControlSequenceCorrid => {
            let dtype = datatype_from_config(control.data_type).ok_or_else(|| {
                format!("control_input '{name}': CONTROL_SEQUENCE_CORRID needs a data_type")
            })?;
            if !matches!(
                dtype,
                DataType::Uint64
                    | DataType::Int64
                    | DataType::Uint32
                    | DataType::Int32
                    | DataType::Bytes
            ) {
                return Err(format!(
                    "control_input '{name}': CONTROL_SEQUENCE_CORRID data_type must be TYPE_UINT64, TYPE_INT64, TYPE_UINT32, TYPE_INT32 or TYPE_STRING"
                ));
            }
            ControlKind::CorrId(dtype)
        }
        flag => {
            let encoding = flag_encoding(name, control)?;
            match flag {
                Kind::ControlSequenceStart => ControlKind::Start(encoding),
                Kind::ControlSequenceEnd => ControlKind::End(encoding),
                _ => ControlKind::Ready(encoding),
            }
        }
    };
    Ok(ControlTensor {
        name: name.to_string(),
        kind,
    })
}

fn flag_encoding(name: &str, control: &Control) -> Result<FlagEncoding, String> {
    let pair_error = || {
        format!(
            "control_input '{name}': exactly one of int32_false_true, fp32_false_true, bool_false_true must hold two values"
        )
    };
    match (
        control.int32_false_true.as_slice(),
        control.fp32_false_true.as_slice(),
        control.bool_false_true.as_slice(),
    ) {
        ([f, t], [], []) => Ok(FlagEncoding {
            dtype: DataType::Int32,
            false_value: f.to_le_bytes().to_vec(),
            true_value: t.to_le_bytes().to_vec(),
        }),
        ([], [f, t], []) => Ok(FlagEncoding {
            dtype: DataType::Fp32,
            false_value: f.to_le_bytes().to_vec(),
            true_value: t.to_le_bytes().to_vec(),
        }),
        ([], [], [f, t]) => Ok(FlagEncoding {
            dtype: DataType::Bool,
            false_value: vec![*f as u8],
            true_value: vec![*t as u8],
        }),
        _ => Err(pair_error()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::model_sequence_batching::{ControlInput, State, StrategyOldest};
    use crate::proto::ModelSequenceBatching;

    fn config(seq: ModelSequenceBatching) -> ModelConfig {
        ModelConfig {
            name: "m".into(),
            max_batch_size: 4,
            scheduling_choice: Some(SchedulingChoice::SequenceBatching(seq)),
            ..Default::default()
        }
    }

    fn control(name: &str, kind: Kind, int32: Vec<i32>, data_type: i32) -> ControlInput {
        ControlInput {
            name: name.into(),
            control: vec![Control {
                kind: kind as i32,
                int32_false_true: int32,
                data_type,
                ..Default::default()
            }],
        }
    }

    #[test]
    fn direct_is_the_default_with_one_slot_per_batch_row() {
        let s = SequenceSettings::from_config(&config(Default::default()), 2, 10)
            .unwrap()
            .unwrap();
        assert_eq!(s.strategy, Strategy::Direct);
        assert_eq!((s.slots_per_instance, s.max_candidates), (4, 8));
        assert_eq!(s.idle_timeout, DEFAULT_IDLE);
        let plain = ModelConfig::default();
        assert!(SequenceSettings::from_config(&plain, 1, 10)
            .unwrap()
            .is_none());
    }

    #[test]
    fn controls_and_oldest_are_read() {
        let seq = ModelSequenceBatching {
            max_sequence_idle_microseconds: 500,
            control_input: vec![
                control("START", Kind::ControlSequenceStart, vec![0, 1], 0),
                control(
                    "CORRID",
                    Kind::ControlSequenceCorrid,
                    vec![],
                    crate::proto::DataType::TypeString as i32,
                ),
            ],
            strategy_choice: Some(StrategyChoice::Oldest(StrategyOldest {
                max_candidate_sequences: 3,
                max_queue_delay_microseconds: 100,
                ..Default::default()
            })),
            ..Default::default()
        };
        let c = config(seq);
        let s = SequenceSettings::from_config(&c, 1, 10).unwrap().unwrap();
        assert_eq!(s.max_candidates, 3);
        assert_eq!(s.idle_timeout, Duration::from_micros(500));
        assert!(
            matches!(&s.controls[0].kind, ControlKind::Start(f) if f.true_value == 1i32.to_le_bytes())
        );
        assert_eq!(s.controls[1].kind, ControlKind::CorrId(DataType::Bytes));
        assert_eq!(SequenceSettings::fed_inputs(&c), vec!["START", "CORRID"]);
    }

    #[test]
    fn bad_settings_are_refused_by_name() {
        let seq = ModelSequenceBatching {
            control_input: vec![control("START", Kind::ControlSequenceStart, vec![1], 0)],
            ..Default::default()
        };
        let err = SequenceSettings::from_config(&config(seq), 1, 10).unwrap_err();
        assert!(err.contains("control_input 'START'"), "{err}");
        let seq = ModelSequenceBatching {
            state: vec![State {
                input_name: "S".into(),
                output_name: "T".into(),
                data_type: crate::proto::DataType::TypeInt32 as i32,
                dims: vec![-1],
                ..Default::default()
            }],
            ..Default::default()
        };
        let err = SequenceSettings::from_config(&config(seq), 1, 10).unwrap_err();
        assert!(err.contains("state 'S'"), "{err}");
    }
}
