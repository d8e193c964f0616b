//! The JSON form of ModelConfig that Triton's RepositoryModelLoad `config` parameter carries.
use std::sync::LazyLock;

use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor};

use super::{ModelConfig, ModelError};

static MODEL_CONFIG: LazyLock<Option<MessageDescriptor>> = LazyLock::new(|| {
    DescriptorPool::decode(crate::proto::FILE_DESCRIPTOR_SET)
        .ok()?
        .get_message_by_name("inference.ModelConfig")
});

/// Parses a JSON ModelConfig (proto field names or their JSON camelCase forms, enum names as strings).
pub fn parse_config_json(model: &str, json: &str) -> Result<ModelConfig, ModelError> {
    let fail = |reason: String| ModelError::ConfigParse {
        model: model.to_string(),
        reason,
    };
    let descriptor = MODEL_CONFIG
        .clone()
        .ok_or_else(|| fail("ModelConfig descriptor unavailable".into()))?;
    let mut deserializer = serde_json::Deserializer::from_str(json);
    let message = DynamicMessage::deserialize(descriptor, &mut deserializer)
        .map_err(|e| fail(format!("config override JSON: {e}")))?;
    deserializer
        .end()
        .map_err(|e| fail(format!("config override JSON: {e}")))?;
    message
        .transcode_to::<ModelConfig>()
        .map_err(|e| fail(format!("config override: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_triton_json_config() {
        let json = r#"{"name":"m","max_batch_size":4,"input":[{"name":"X","data_type":"TYPE_FP32","dims":[16]}],
                       "dynamic_batching":{"max_queue_delay_microseconds":100}}"#;
        let c = parse_config_json("m", json).unwrap();
        assert_eq!(c.max_batch_size, 4);
        assert_eq!(c.input[0].dims, vec![16]);
        assert_eq!(
            c.input[0].data_type,
            crate::proto::DataType::TypeFp32 as i32
        );
        match c.scheduling_choice {
            Some(crate::proto::model_config::SchedulingChoice::DynamicBatching(d)) => {
                assert_eq!(d.max_queue_delay_microseconds, 100)
            }
            other => panic!("expected dynamic batching, got {other:?}"),
        }
        assert!(parse_config_json("m", "{\"max_batch_size\": \"x\"}").is_err());
        assert!(parse_config_json("m", "not json").is_err());
    }
}
