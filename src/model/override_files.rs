//! Triton's `file:` load parameters: model files sent with RepositoryModelLoad. As Triton does, they
//! are written into a temporary model directory (beside the `config` override) and the model is
//! loaded from there; the directory is removed once the load has finished, since the sessions hold
//! everything they read. Every path is checked before anything is written: relative, no `..`, no
//! empty or overlong components, bounded in count and total size.
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::repository::validate_model_name;

/// Most files one load may carry.
pub const MAX_OVERRIDE_FILES: usize = 64;
/// Most bytes all files of one load may carry together (the gRPC message limit also applies).
pub const MAX_OVERRIDE_BYTES: usize = 1 << 30;
/// Longest path component, as NAME_MAX on Linux.
const MAX_COMPONENT_BYTES: usize = 255;

/// One `file:<relative path>` parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverrideFile {
    pub relative_path: String,
    pub contents: Vec<u8>,
}

/// A refused or failed override; the message names the parameter.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct OverrideError(pub String);

/// Checks the count, the total size and every path, before anything touches the disk.
pub fn check_files(files: &[OverrideFile]) -> Result<(), OverrideError> {
    if files.len() > MAX_OVERRIDE_FILES {
        return Err(OverrideError(format!(
            "{} file parameters given; at most {MAX_OVERRIDE_FILES} are accepted",
            files.len()
        )));
    }
    let total: usize = files.iter().map(|f| f.contents.len()).sum();
    if total > MAX_OVERRIDE_BYTES {
        return Err(OverrideError(format!(
            "file parameters hold {total} bytes; at most {MAX_OVERRIDE_BYTES} are accepted"
        )));
    }
    for file in files {
        check_relative_path(&file.relative_path)?;
    }
    Ok(())
}

fn check_relative_path(path: &str) -> Result<(), OverrideError> {
    let refuse = |why: &str| {
        Err(OverrideError(format!(
            "Invalid file parameter 'file:{path}': {why}"
        )))
    };
    if path.is_empty() {
        return refuse("the path is empty");
    }
    if path.contains('\\') || path.chars().any(char::is_control) {
        return refuse("the path contains a backslash or a control character");
    }
    for component in Path::new(path).components() {
        match component {
            Component::Normal(part) => {
                if part.len() > MAX_COMPONENT_BYTES {
                    return refuse("a path component is longer than 255 bytes");
                }
            }
            Component::CurDir => {}
            _ => return refuse("the path must stay within the model directory"),
        }
    }
    if path.split('/').any(str::is_empty) {
        return refuse("the path has an empty component");
    }
    Ok(())
}

/// A temporary repository root holding one model directory; removed on drop.
#[derive(Debug)]
pub struct OverrideDir {
    root: PathBuf,
}

impl OverrideDir {
    /// Writes `files` under `<new temporary root>/<model>/`. Paths must have passed `check_files`.
    pub fn create(model: &str, files: &[OverrideFile]) -> Result<Self, OverrideError> {
        validate_model_name(model).map_err(|e| OverrideError(e.to_string()))?;
        check_files(files)?;
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let root = std::env::temp_dir().join(format!(
            "onnx-gateway-override-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let dir = OverrideDir { root };
        let io = |what: &str, e: std::io::Error| OverrideError(format!("{what}: {e}"));
        // create_dir (not create_dir_all) so a path that already exists is never reused.
        std::fs::create_dir(&dir.root)
            .map_err(|e| io("cannot create the override directory", e))?;
        let model_dir = dir.root.join(model);
        std::fs::create_dir(&model_dir).map_err(|e| io("cannot create the model directory", e))?;
        for file in files {
            let target = model_dir.join(&file.relative_path);
            if let Some(parent) = target.parent() {
                if parent.is_file() {
                    return Err(OverrideError(format!(
                        "Invalid file parameter 'file:{}', directory has been created as a file",
                        file.relative_path
                    )));
                }
                std::fs::create_dir_all(parent)
                    .map_err(|e| io(&format!("file:{}", file.relative_path), e))?;
            }
            std::fs::write(&target, &file.contents)
                .map_err(|e| io(&format!("file:{}", file.relative_path), e))?;
        }
        Ok(dir)
    }

    /// The repository root to load the model from.
    pub fn root(&self) -> &Path {
        &self.root
    }
}

impl Drop for OverrideDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.root) {
            tracing::warn!(dir = %self.root.display(), error = %e, "cannot remove a model override directory");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str) -> OverrideFile {
        OverrideFile {
            relative_path: path.into(),
            contents: b"x".to_vec(),
        }
    }

    #[test]
    fn paths_must_stay_inside_the_model_directory() {
        for bad in [
            "",
            "../x",
            "1/../../x",
            "/etc/passwd",
            "a//b",
            "a\\b",
            "a\nb",
        ] {
            assert!(check_files(&[file(bad)]).is_err(), "{bad:?} was accepted");
        }
        let long = "A".repeat(256);
        let err = check_files(&[file(&long)]).unwrap_err();
        assert!(err.0.contains("longer than 255"), "{err}");
        check_files(&[file("1/model.onnx"), file("./labels.txt")]).unwrap();
    }

    #[test]
    fn counts_are_bounded() {
        let many: Vec<_> = (0..=MAX_OVERRIDE_FILES)
            .map(|i| file(&format!("f{i}")))
            .collect();
        assert!(check_files(&many).is_err());
    }

    #[test]
    fn files_are_written_and_removed() {
        let dir = OverrideDir::create("m", &[file("1/model.onnx")]).unwrap();
        let written = dir.root().join("m/1/model.onnx");
        assert_eq!(std::fs::read(&written).unwrap(), b"x");
        let root = dir.root().to_path_buf();
        drop(dir);
        assert!(!root.exists());
    }
}
