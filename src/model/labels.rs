//! Class labels of outputs (`label_filename` in the config): one label per line, line k naming
//! class k, read from the model directory when the model loads. Used by the classification
//! extension.
use std::collections::HashMap;
use std::path::{Component, Path};
use std::sync::Arc;

use super::{ModelConfig, ModelError};

/// Largest label file accepted.
pub const MAX_LABEL_FILE_BYTES: u64 = 16 << 20;

/// Labels by output name; outputs without a label file are absent.
pub type OutputLabels = HashMap<String, Arc<Vec<String>>>;

/// Reads every output's label file, refusing names that leave the model directory.
pub fn read_output_labels(
    model_dir: &Path,
    config: &ModelConfig,
) -> Result<OutputLabels, ModelError> {
    let mut labels = OutputLabels::new();
    for output in &config.output {
        if output.label_filename.is_empty() {
            continue;
        }
        let fail = |reason: String| ModelError::InvalidConfig {
            model: config.name.clone(),
            reason: format!(
                "output '{}': label_filename '{}': {reason}",
                output.name, output.label_filename
            ),
        };
        let relative = Path::new(&output.label_filename);
        if !relative
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return Err(fail("must name a file inside the model directory".into()));
        }
        let path = model_dir.join(relative);
        let size = std::fs::metadata(&path)
            .map_err(|e| fail(format!("cannot read it: {e}")))?
            .len();
        if size > MAX_LABEL_FILE_BYTES {
            return Err(fail(format!(
                "{size} bytes; at most {MAX_LABEL_FILE_BYTES} are accepted"
            )));
        }
        let text =
            std::fs::read_to_string(&path).map_err(|e| fail(format!("cannot read it: {e}")))?;
        let lines = text.lines().map(str::to_string).collect();
        labels.insert(output.name.clone(), Arc::new(lines));
    }
    Ok(labels)
}
