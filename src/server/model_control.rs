//! RepositoryModelLoad's parameters and answers as Triton gives them: the `config` JSON override,
//! `file:<path>` model files (loaded from a temporary model directory), and the
//! `failed to load '<name>', ...` texts Triton's clients look for.
use tonic::{Code, Status};

use crate::error::Error;
use crate::model::override_files::{check_files, OverrideFile};
use crate::model::{ModelConfig, ModelError};
use crate::proto::model_repository_parameter::ParameterChoice;
use crate::proto::RepositoryModelLoadRequest;

/// What a load request asks for beyond the model name.
#[derive(Debug, Default)]
pub struct LoadOverride {
    pub config: Option<ModelConfig>,
    pub files: Vec<OverrideFile>,
}

/// Triton fails these before any model is touched ("failed to poll"), with INTERNAL.
fn poll_failure(model: &str, detail: &str) -> Status {
    Status::internal(format!(
        "failed to load '{model}', failed to poll from model repository: {detail}"
    ))
}

/// Reads `config` and `file:` parameters; anything else is refused by name.
pub fn load_override(r: &RepositoryModelLoadRequest) -> Result<LoadOverride, Status> {
    let name = &r.model_name;
    let mut out = LoadOverride::default();
    for (key, value) in &r.parameters {
        let choice = value.parameter_choice.as_ref();
        if let Some(path) = key.strip_prefix("file:") {
            let Some(ParameterChoice::BytesParam(bytes)) = choice else {
                return Err(poll_failure(
                    name,
                    &format!("File parameter '{key}' must have bytes type for its value"),
                ));
            };
            out.files.push(OverrideFile {
                relative_path: path.to_string(),
                contents: bytes.clone(),
            });
        } else if key == "config" {
            let Some(ParameterChoice::StringParam(json)) = choice else {
                return Err(poll_failure(
                    name,
                    "Config parameter 'config' must have string type for its value",
                ));
            };
            let config = crate::model::config_json::parse_config_json(name, json)
                .map_err(|e| poll_failure(name, &e.to_string()))?;
            out.config = Some(config);
        } else {
            return Err(Status::invalid_argument(format!(
                "failed to load '{name}', unknown load parameter '{key}'"
            )));
        }
    }
    if !out.files.is_empty() {
        if out.config.is_none() {
            return Err(poll_failure(
                name,
                "Load parameter 'config' must be specified for model file override",
            ));
        }
        check_files(&out.files).map_err(|e| poll_failure(name, &e.0))?;
    }
    Ok(out)
}

/// A failed load, in Triton's words: an unknown model fails at the repository poll (INTERNAL);
/// any other failure keeps its own code and says which model failed to load.
pub fn load_failure(model: &str, error: ModelError) -> Status {
    if let ModelError::NotFound { reason, .. } = &error {
        return poll_failure(model, reason);
    }
    let status = Status::from(Error::from(error));
    let code: Code = status.code();
    Status::new(
        code,
        format!("failed to load '{model}': {}", status.message()),
    )
}
