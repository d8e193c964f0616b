//! `config.pbtxt` is protobuf TEXT format over Triton's ModelConfig message. It is parsed with a real
//! text-format parser (prost-reflect) over the descriptor compiled from proto/, then transcoded into the
//! generated `ModelConfig`, so every field Triton accepts is accepted here with the same spelling.
use std::sync::LazyLock;

use miette::Diagnostic;
use prost_reflect::text_format::FormatOptions;
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor};

use super::{ModelConfig, ModelError};

const MODEL_CONFIG_MESSAGE: &str = "inference.ModelConfig";

/// The ModelConfig descriptor, decoded once from the descriptor set embedded at build time. The set is
/// produced by build.rs from the same proto/ the Rust types come from, so failing to find the message
/// is a build defect, not a runtime condition.
static MODEL_CONFIG_DESCRIPTOR: LazyLock<MessageDescriptor> = LazyLock::new(|| {
    let pool = DescriptorPool::decode(crate::proto::FILE_DESCRIPTOR_SET)
        .expect("the descriptor set embedded by build.rs decodes");
    pool.get_message_by_name(MODEL_CONFIG_MESSAGE)
        .expect("proto/model_config.proto defines inference.ModelConfig")
});

/// Parses the text of a `config.pbtxt`. Errors name the model and say where the text went wrong
/// (line and column, 1-based) and what the parser expected.
pub fn parse_config_text(model: &str, text: &str) -> Result<ModelConfig, ModelError> {
    let (normalized, inserted) = insert_optional_colons(text);
    let message = DynamicMessage::parse_text_format(MODEL_CONFIG_DESCRIPTOR.clone(), &normalized)
        .map_err(|e| ModelError::ConfigParse {
        model: model.to_string(),
        reason: describe_parse_error(&e, text, &inserted),
    })?;
    message
        .transcode_to::<ModelConfig>()
        .map_err(|e| ModelError::ConfigParse {
            model: model.to_string(),
            reason: format!("parsed config does not fit ModelConfig: {e}"),
        })
}

/// Renders a config as multi-line text format (for logs and debugging). Fields at their default value
/// are left out, as a hand-written config.pbtxt would.
pub fn to_config_text(config: &ModelConfig) -> String {
    let mut message = DynamicMessage::new(MODEL_CONFIG_DESCRIPTOR.clone());
    match message.transcode_from(config) {
        Ok(()) => message.to_text_format_with_options(&FormatOptions::new().pretty(true)),
        // Both sides come from the same .proto, so this cannot fail; a Debug dump still beats panicking
        // in a logging path.
        Err(e) => format!("# cannot render config as text ({e})\n# {config:?}"),
    }
}

/// The protobuf text format makes the ':' before a list of messages optional (`input [ { ... } ]`, the
/// way nearly every Triton config is written), but prost-reflect only accepts a missing ':' before a
/// single `{`/`<` message. This inserts the ':' between a field name and a following '[', skipping
/// strings and comments, and returns the byte offsets (in the returned text) of every inserted ':' so
/// error positions can be mapped back to the user's text.
fn insert_optional_colons(text: &str) -> (String, Vec<usize>) {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len() + 16);
    let mut inserted = Vec::new();
    // Whether the last significant token was ':'; an identifier right after ':' is a value (an enum
    // name, `true`), never a field name, so no ':' is ever inserted after it.
    let mut after_colon = false;
    let mut copied = 0;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'#' => {
                i = end_of_line(bytes, i);
            }
            b'"' | b'\'' => {
                i = skip_string(bytes, i);
                after_colon = false;
            }
            b if b.is_ascii_whitespace() => i += 1,
            b if b.is_ascii_alphabetic() || b == b'_' => {
                let start = i;
                while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                    i += 1;
                }
                let is_field_name = !after_colon && start_of_token(bytes, start);
                if is_field_name && next_significant(bytes, i) == Some(b'[') {
                    out.push_str(&text[copied..i]);
                    inserted.push(out.len());
                    out.push(':');
                    copied = i;
                }
                after_colon = false;
            }
            _ => {
                after_colon = b == b':';
                i += 1;
            }
        }
    }
    out.push_str(&text[copied..]);
    (out, inserted)
}

/// An identifier glued to a preceding digit or '.' is part of a number or a dotted name, not a field.
fn start_of_token(bytes: &[u8], start: usize) -> bool {
    start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'.')
}

/// Index just past a quoted string starting at `start` (escapes honoured). An unterminated string ends
/// at the end of its line; the real parser reports it.
fn skip_string(bytes: &[u8], start: usize) -> usize {
    let quote = bytes[start];
    let mut i = start + 1;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b'\n' => return i,
            b if b == quote => return i + 1,
            _ => i += 1,
        }
    }
    bytes.len()
}

/// Index of the '\n' ending the line that contains `from` (or the end of the text).
fn end_of_line(bytes: &[u8], from: usize) -> usize {
    bytes[from..]
        .iter()
        .position(|&b| b == b'\n')
        .map_or(bytes.len(), |n| from + n)
}

/// The first byte at or after `from` that is neither whitespace nor inside a comment.
fn next_significant(bytes: &[u8], mut from: usize) -> Option<u8> {
    while from < bytes.len() {
        match bytes[from] {
            b'#' => from = end_of_line(bytes, from),
            b if b.is_ascii_whitespace() => from += 1,
            b => return Some(b),
        }
    }
    None
}

/// "line L, column C: <what the parser said>", or "at end of input: ..." when the parser ran out of
/// text. `inserted` are the positions of the ':' added by `insert_optional_colons`.
fn describe_parse_error(
    error: &prost_reflect::text_format::ParseError,
    text: &str,
    inserted: &[usize],
) -> String {
    let offset = error
        .labels()
        .and_then(|mut labels| labels.next())
        .map(|label| label.offset());
    match offset {
        Some(offset) => {
            let original = offset - inserted.iter().filter(|&&p| p < offset).count();
            let (line, column) = line_and_column(text, original);
            format!("line {line}, column {column}: {error}")
        }
        None => format!("at end of input: {error}"),
    }
}

/// 1-based line and column (in characters) of a byte offset into `text`.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let mut end = offset.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let before = &text[..end];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::model_config::SchedulingChoice;
    use crate::proto::model_instance_group::Kind;
    use crate::proto::model_optimization_policy::ModelPriority;
    use crate::proto::model_queue_policy::TimeoutAction;
    use crate::proto::model_version_policy::PolicyChoice;
    use crate::proto::DataType as C;

    const DENSENET: &str = r#"
# A realistic config in the style of Triton's examples.
name: "densenet_onnx"
platform: "onnxruntime_onnx"
max_batch_size : 8   # spaces before the colon are legal
version_policy: { specific: { versions: [1, 3] } }
input [
  {
    name: "data_0"
    data_type: TYPE_FP32
    format: FORMAT_NCHW
    dims: [ 3, 224, 224 ]
    reshape { shape: [ 1, 3, 224, 224 ] }
  }
]
output [
  {
    name: "fc6_1"
    data_type: TYPE_FP32
    dims: [ -1, 16 ]
    label_filename: "densenet_labels.txt"
  }
]
instance_group [
  { count: 2, kind: KIND_CPU },
  { kind: KIND_GPU gpus: [ 0, 1 ] }
]
dynamic_batching {
  preferred_batch_size: [ 4, 8 ]
  max_queue_delay_microseconds: 100
  priority_levels: 2
  default_priority_level: 1
  default_queue_policy { timeout_action: DELAY default_timeout_microseconds: 5000 max_queue_size: 16 }
  priority_queue_policy {
    key: 1
    value: { timeout_action: REJECT allow_timeout_override: true max_queue_size: 4 }
  }
  priority_queue_policy [ { key: 2 value { max_queue_size: 32 } } ]
}
parameters { key: "intra_op_thread_count" value: { string_value: "2" } }
parameters: [ { key: "execution_mode" value: { string_value: "0" } } ]
optimization {
  priority: PRIORITY_MAX
  graph: { level: 1 }
  execution_accelerators {
    gpu_execution_accelerator : [ {
      name : "tensorrt"
      parameters { key: "precision_mode" value: "FP16" }
      parameters { key: "max_workspace_size_bytes" value: "1073741824" }
    } ]
    cpu_execution_accelerator: [ { name: "openvino" } ]
  }
  input_pinned_memory { enable: false }
}
model_warmup [ {
  name: "zeros"
  batch_size: 1
  inputs { key: "data_0" value: { data_type: TYPE_FP32 dims: [ 3, 224, 224 ] zero_data: true } }
} ]
"#;

    #[test]
    fn parses_a_realistic_config() {
        let c = parse_config_text("densenet_onnx", DENSENET).expect("parses");
        assert_eq!(c.name, "densenet_onnx");
        assert_eq!(c.platform, "onnxruntime_onnx");
        assert_eq!(c.max_batch_size, 8);
        match c.version_policy.and_then(|p| p.policy_choice) {
            Some(PolicyChoice::Specific(s)) => assert_eq!(s.versions, vec![1, 3]),
            other => panic!("unexpected version policy {other:?}"),
        }

        assert_eq!(c.input.len(), 1);
        assert_eq!(c.input[0].name, "data_0");
        assert_eq!(c.input[0].data_type, C::TypeFp32 as i32);
        assert_eq!(c.input[0].dims, vec![3, 224, 224]);
        assert_eq!(
            c.input[0].reshape.as_ref().map(|r| r.shape.clone()),
            Some(vec![1, 3, 224, 224])
        );
        assert_eq!(c.output[0].dims, vec![-1, 16]);
        assert_eq!(c.output[0].label_filename, "densenet_labels.txt");

        assert_eq!(c.instance_group.len(), 2);
        assert_eq!(c.instance_group[0].count, 2);
        assert_eq!(c.instance_group[0].kind, Kind::Cpu as i32);
        assert_eq!(c.instance_group[1].kind, Kind::Gpu as i32);
        assert_eq!(c.instance_group[1].gpus, vec![0, 1]);

        let Some(SchedulingChoice::DynamicBatching(db)) = c.scheduling_choice else {
            panic!("dynamic_batching expected, got {:?}", c.scheduling_choice);
        };
        assert_eq!(db.preferred_batch_size, vec![4, 8]);
        assert_eq!(db.max_queue_delay_microseconds, 100);
        assert_eq!(db.priority_levels, 2);
        assert_eq!(db.default_priority_level, 1);
        let default_policy = db.default_queue_policy.expect("default_queue_policy");
        assert_eq!(default_policy.timeout_action, TimeoutAction::Delay as i32);
        assert_eq!(default_policy.default_timeout_microseconds, 5000);
        assert_eq!(default_policy.max_queue_size, 16);
        assert_eq!(db.priority_queue_policy.len(), 2);
        assert!(db.priority_queue_policy[&1].allow_timeout_override);
        assert_eq!(db.priority_queue_policy[&1].max_queue_size, 4);
        assert_eq!(db.priority_queue_policy[&2].max_queue_size, 32);

        assert_eq!(c.parameters["intra_op_thread_count"].string_value, "2");
        assert_eq!(c.parameters["execution_mode"].string_value, "0");

        let opt = c.optimization.expect("optimization");
        assert_eq!(opt.priority, ModelPriority::PriorityMax as i32);
        assert_eq!(opt.graph.map(|g| g.level), Some(1));
        let ea = opt.execution_accelerators.expect("execution_accelerators");
        assert_eq!(ea.gpu_execution_accelerator.len(), 1);
        assert_eq!(ea.gpu_execution_accelerator[0].name, "tensorrt");
        assert_eq!(
            ea.gpu_execution_accelerator[0].parameters["precision_mode"],
            "FP16"
        );
        assert_eq!(ea.cpu_execution_accelerator[0].name, "openvino");
        assert_eq!(opt.input_pinned_memory.map(|p| p.enable), Some(false));

        assert_eq!(c.model_warmup.len(), 1);
        assert_eq!(c.model_warmup[0].inputs["data_0"].dims, vec![3, 224, 224]);
    }

    #[test]
    fn nested_lists_without_colons_parse() {
        let text = r#"
            sequence_batching {
              oldest { max_candidate_sequences: 8 }
              control_input [
                { name: "S" control [ { kind: CONTROL_SEQUENCE_START int32_false_true: [ 0, 1 ] } ] },
                { name: "C" control [ { kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_UINT64 } ] }
              ]
            }
        "#;
        let c = parse_config_text("seq", text).expect("parses");
        let Some(SchedulingChoice::SequenceBatching(sb)) = c.scheduling_choice else {
            panic!("sequence_batching expected");
        };
        assert_eq!(sb.control_input.len(), 2);
        assert_eq!(sb.control_input[0].control[0].int32_false_true, vec![0, 1]);

        let text = r#"
            platform: "ensemble"
            ensemble_scheduling { step [
              { model_name: "a" model_version: -1 input_map { key: "IN" value: "x" } },
              { model_name: "b" input_map [ { key: "y" value: "x" } ] }
            ] }
        "#;
        let c = parse_config_text("ens", text).expect("parses");
        let Some(SchedulingChoice::EnsembleScheduling(es)) = c.scheduling_choice else {
            panic!("ensemble_scheduling expected");
        };
        assert_eq!(es.step.len(), 2);
        assert_eq!(es.step[0].model_version, -1);
        assert_eq!(es.step[1].input_map["y"], "x");
    }

    #[test]
    fn empty_text_is_an_all_default_config() {
        let c = parse_config_text("m", "  # only a comment\n").expect("parses");
        assert_eq!(c, ModelConfig::default());
    }

    #[test]
    fn accepts_the_alternative_spellings_protobuf_allows() {
        // Angle brackets, semicolons/commas as separators, capitalised booleans as in Triton's docs,
        // enums by number, adjacent string literals.
        let text = r#"
            name: "a" "b";
            max_batch_size: 4,
            instance_group < kind: 2 count: 1 rate_limiter { resources [ { name: "R" global: True count: 2 } ] } >
            response_cache { enable: true }
        "#;
        let c = parse_config_text("ab", text).expect("parses");
        assert_eq!(c.name, "ab");
        assert_eq!(c.max_batch_size, 4);
        assert_eq!(c.instance_group[0].kind, Kind::Cpu as i32);
        let limiter = c.instance_group[0].rate_limiter.as_ref().expect("limiter");
        assert!(limiter.resources[0].global);
        assert_eq!(c.response_cache.map(|r| r.enable), Some(true));
    }

    #[test]
    fn unknown_field_names_the_model_field_and_position() {
        let text = "name: \"m\"\nmax_batch_sise: 8\n";
        let err = parse_config_text("m", text).unwrap_err().to_string();
        assert!(err.starts_with("m: config.pbtxt: "), "{err}");
        assert!(err.contains("line 2, column 1"), "{err}");
        assert!(err.contains("max_batch_sise"), "{err}");
    }

    #[test]
    fn unknown_enum_value_is_reported_with_position() {
        let text = "input [ { name: \"x\" data_type: TYPE_FLOAT32 dims: [1] } ]";
        let err = parse_config_text("m", text).unwrap_err().to_string();
        assert!(err.contains("TYPE_FLOAT32"), "{err}");
        assert!(err.contains("line 1, column 32"), "{err}");
    }

    #[test]
    fn wrong_value_kinds_are_refused() {
        for (text, needle) in [
            ("max_batch_size: \"8\"", "line 1"),
            ("max_batch_size: 99999999999", "out of range"),
            ("dims: [1, 2]", "dims"),
            ("name: \"x\"\nname: \"y\"", "already set"),
            ("dynamic_batching {}\nsequence_batching {}", "oneof"),
        ] {
            let err = parse_config_text("m", text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?} -> {err}");
        }
    }

    #[test]
    fn unterminated_input_says_so() {
        let err = parse_config_text("m", "input [ { name: \"x\" ")
            .unwrap_err()
            .to_string();
        assert!(err.contains("end of input"), "{err}");
    }

    #[test]
    fn colon_is_inserted_only_between_a_field_name_and_a_list() {
        let cases = [
            ("input [ {} ]", "input: [ {} ]"),
            ("input: [ {} ]", "input: [ {} ]"),
            ("input # c\n [ ]", "input: # c\n [ ]"),
            ("kind: KIND_CPU [", "kind: KIND_CPU ["),
            ("name: \"a [\" x [", "name: \"a [\" x: ["),
            ("name: 'it\\'s' x [", "name: 'it\\'s' x: ["),
            ("# input [\nv: 1e5 [", "# input [\nv: 1e5 ["),
            ("a{b [1]}c[2]", "a{b: [1]}c:[2]"),
        ];
        for (text, want) in cases {
            assert_eq!(insert_optional_colons(text).0, want, "{text:?}");
        }
        let (out, inserted) = insert_optional_colons("a [ ] b [ ]");
        assert_eq!(out, "a: [ ] b: [ ]");
        assert_eq!(inserted, vec![1, 8]);
    }

    #[test]
    fn error_positions_refer_to_the_original_text() {
        // Two ':' are inserted before the error; the reported column must still be the user's.
        let text = "input [ ] output [ ]\ninstance_group [ { count: x } ]";
        let err = parse_config_text("m", text).unwrap_err().to_string();
        assert!(err.contains("line 2, column 27"), "{err}");
    }

    #[test]
    fn position_counts_characters_not_bytes() {
        assert_eq!(line_and_column("ab\ncdé f", 9), (2, 6));
        assert_eq!(line_and_column("", 0), (1, 1));
        assert_eq!(line_and_column("x", 100), (1, 2));
    }

    #[test]
    fn text_round_trips() {
        let c = parse_config_text("densenet_onnx", DENSENET).expect("parses");
        let text = to_config_text(&c);
        assert!(text.contains("name: \"densenet_onnx\""), "{text}");
        assert!(text.contains("TYPE_FP32"), "{text}");
        let again = parse_config_text("densenet_onnx", &text).expect("re-parses");
        assert_eq!(again, c);
    }
}
