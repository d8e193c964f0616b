//! The Triton model repository layout on a local file system:
//!
//! ```text
//! <repo>/<model>/config.pbtxt            optional; auto-completed from the graph when absent
//! <repo>/<model>/<version>/model.onnx    a file, or a directory holding model.onnx
//! ```
//!
//! Model names arrive from clients (load/unload, infer), so every function that turns a name into a
//! path first checks it cannot reach outside the repository.
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::autocomplete::DEFAULT_MODEL_FILENAME;
use super::config_text::parse_config_text;
use super::{ModelConfig, ModelError};
use crate::proto::model_version_policy::PolicyChoice;
use crate::proto::ModelVersionPolicy;

/// The config file of a model directory.
pub const CONFIG_FILENAME: &str = "config.pbtxt";

/// Longest file name Linux file systems accept.
const MAX_NAME_BYTES: usize = 255;

fn repo_error(model: &str, reason: impl Into<String>) -> ModelError {
    ModelError::Repository {
        model: model.to_string(),
        reason: reason.into(),
    }
}

/// The model has no directory in the repository. The path stays out of the message: it is the
/// server's business, and the client named the model.
pub fn not_found(name: &str) -> ModelError {
    ModelError::NotFound {
        model: name.to_string(),
        reason: "no such model in the model repository".into(),
    }
}

/// Whether `name` (already validated) has a directory in the repository.
pub fn model_dir_exists(repo: &Path, name: &str) -> bool {
    is_dir(&repo.join(name))
}

/// Refuses a model name that is not a single, plain directory name: empty, too long, containing
/// '/', '\\', "..", NUL or another control character, or starting with '.' (hidden entries, "." and
/// ".." are never models). Nothing outside the repository can be named.
pub fn validate_model_name(name: &str) -> Result<(), ModelError> {
    let problem = if name.is_empty() {
        Some("is empty")
    } else if name.len() > MAX_NAME_BYTES {
        Some("is longer than 255 bytes")
    } else if name.contains('/') || name.contains('\\') {
        Some("contains a path separator")
    } else if name.contains("..") {
        Some("contains '..'")
    } else if name.starts_with('.') {
        Some("starts with '.'")
    } else if name.chars().any(char::is_control) {
        Some("contains a control character")
    } else {
        None
    };
    match problem {
        None => Ok(()),
        Some(problem) => Err(ModelError::InvalidName {
            model: if name.is_empty() {
                "<empty>".to_string()
            } else {
                name.escape_debug().to_string()
            },
            reason: format!("invalid model name: it {problem}"),
        }),
    }
}

/// The models of a repository: its sub-directories (symbolic links followed) whose names are valid
/// model names, sorted. Hidden entries (such as the `..data` links of a Kubernetes ConfigMap mount)
/// and plain files are ignored.
pub fn list_models(repo: &Path) -> Result<Vec<String>, ModelError> {
    let repo_name = repo.display().to_string();
    let entries = fs::read_dir(repo)
        .map_err(|e| repo_error(&repo_name, format!("cannot read the model repository: {e}")))?;
    let mut models = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| {
            repo_error(&repo_name, format!("cannot read the model repository: {e}"))
        })?;
        let Ok(name) = entry.file_name().into_string() else {
            continue; // not UTF-8: no client could name it
        };
        if validate_model_name(&name).is_err() {
            continue;
        }
        if is_dir(&entry.path()) {
            models.push(name);
        }
    }
    models.sort();
    Ok(models)
}

/// Whether the model's directory holds a `config.pbtxt`.
pub fn has_config(repo: &Path, name: &str) -> bool {
    repo.join(name).join(CONFIG_FILENAME).is_file()
}

/// The model's `config.pbtxt`, parsed; a model without one gets an empty config carrying its name,
/// to be completed from the graph.
pub fn read_config(repo: &Path, name: &str) -> Result<ModelConfig, ModelError> {
    validate_model_name(name)?;
    let dir = repo.join(name);
    if !is_dir(&dir) {
        return Err(not_found(name));
    }
    let path = dir.join(CONFIG_FILENAME);
    match fs::read(&path) {
        Ok(bytes) => {
            let text = String::from_utf8(bytes).map_err(|e| ModelError::ConfigParse {
                model: name.to_string(),
                reason: format!("not UTF-8 text (byte {})", e.utf8_error().valid_up_to()),
            })?;
            parse_config_text(name, &text)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(ModelConfig {
            name: name.to_string(),
            ..Default::default()
        }),
        Err(e) => Err(repo_error(
            name,
            format!("cannot read {}: {e}", path.display()),
        )),
    }
}

/// The versions present for a model, ascending: sub-directories named by a positive decimal number
/// without leading zeros. Everything else is ignored, as Triton ignores it; an unreadable or
/// invalid model yields no versions.
pub fn available_versions(repo: &Path, name: &str) -> Vec<i64> {
    if validate_model_name(name).is_err() {
        return Vec::new();
    }
    let Ok(entries) = fs::read_dir(repo.join(name)) else {
        return Vec::new();
    };
    let mut versions: Vec<i64> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let version = parse_version(entry.file_name().to_str()?)?;
            is_dir(&entry.path()).then_some(version)
        })
        .collect();
    versions.sort_unstable();
    versions
}

/// "1", "42" -> Some; "0", "01", "-1", "+1", "1a", "v1", too large -> None.
fn parse_version(dir_name: &str) -> Option<i64> {
    let all_digits = !dir_name.is_empty() && dir_name.bytes().all(|b| b.is_ascii_digit());
    if !all_digits || dir_name.starts_with('0') {
        return None;
    }
    dir_name.parse().ok()
}

/// The versions to serve under a version policy, ascending. No policy means `latest { num_versions:
/// 1 }`. Versions a `specific` policy names but the repository lacks are left out; an empty result
/// means nothing can be served (Triton refuses to load such a model).
pub fn select_versions(policy: Option<&ModelVersionPolicy>, available: &[i64]) -> Vec<i64> {
    let mut sorted = available.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    match policy.and_then(|p| p.policy_choice.as_ref()) {
        None => latest(&sorted, 1),
        Some(PolicyChoice::Latest(l)) => latest(&sorted, l.num_versions as usize),
        Some(PolicyChoice::All(_)) => sorted,
        Some(PolicyChoice::Specific(s)) => sorted
            .into_iter()
            .filter(|v| s.versions.contains(v))
            .collect(),
    }
}

fn latest(sorted: &[i64], n: usize) -> Vec<i64> {
    sorted[sorted.len().saturating_sub(n)..].to_vec()
}

/// The ONNX file of one version: `<repo>/<name>/<version>/<default_model_filename or model.onnx>`;
/// when that is a directory (a model with external data), the `model.onnx` inside it; when only
/// `<filename>.enc` is there, that encrypted file (see [`is_encrypted_model_file`]). Errors when
/// the name or file name could leave the repository or the file is missing.
pub fn model_file(
    repo: &Path,
    name: &str,
    version: i64,
    config: &ModelConfig,
) -> Result<PathBuf, ModelError> {
    validate_model_name(name)?;
    let filename = if config.default_model_filename.is_empty() {
        DEFAULT_MODEL_FILENAME
    } else {
        config.default_model_filename.as_str()
    };
    if validate_model_name(filename).is_err() {
        // The config asked for it, so it is the config that is invalid (INVALID_ARGUMENT).
        return Err(ModelError::InvalidConfig {
            model: name.to_string(),
            reason: format!(
                "default_model_filename '{}' must be a plain file name inside the model's version directory",
                filename.escape_debug()
            ),
        });
    }
    let version_dir = repo.join(name).join(version.to_string());
    if !is_dir(&version_dir) {
        return Err(repo_error(
            name,
            format!(
                "version {version}: no version directory {}",
                version_dir.display()
            ),
        ));
    }
    let mut path = version_dir.join(filename);
    if is_dir(&path) {
        path.push(DEFAULT_MODEL_FILENAME);
    }
    let encrypted = version_dir.join(format!("{filename}{ENCRYPTED_SUFFIX}"));
    if !path.exists() && encrypted.is_file() {
        return Ok(encrypted);
    }
    if !path.is_file() {
        return Err(repo_error(
            name,
            format!("version {version}: model file {} not found", path.display()),
        ));
    }
    Ok(path)
}

/// The suffix of an encrypted model file (security/model_crypto.rs holds the format).
pub const ENCRYPTED_SUFFIX: &str = crate::security::model_crypto::ENCRYPTED_SUFFIX;

/// Whether [`model_file`] chose an encrypted file, which must be decrypted before loading.
pub fn is_encrypted_model_file(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.ends_with(ENCRYPTED_SUFFIX))
}

/// Whether `path` is a directory, following symbolic links.
fn is_dir(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_dir())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::model_version_policy::{All, Latest, Specific};
    use tempfile::TempDir;

    fn write(path: &Path, text: &str) {
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).expect("create parent");
        }
        fs::write(path, text).expect("write file");
    }

    /// alpha: config + versions 1, 3, 10 and junk; beta: no config, version 2; plus hidden and
    /// non-model entries at the top level.
    fn repo() -> TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = dir.path();
        write(
            &r.join("alpha/config.pbtxt"),
            "name: \"alpha\"\nmax_batch_size: 4\n",
        );
        for v in ["1", "3", "10"] {
            write(&r.join("alpha").join(v).join("model.onnx"), "onnx");
        }
        for junk in ["0", "01", "v2", "-1", "99999999999999999999", ".5"] {
            fs::create_dir_all(r.join("alpha").join(junk)).expect("junk dir");
        }
        write(&r.join("alpha/7"), "a file, not a version directory");
        write(&r.join("beta/2/model.onnx"), "onnx");
        fs::create_dir_all(r.join(".hidden")).expect("hidden");
        fs::create_dir_all(r.join("..data")).expect("configmap link dir");
        write(&r.join("README.md"), "not a model");
        dir
    }

    #[test]
    fn model_names_that_could_escape_are_refused() {
        for bad in [
            "", ".", "..", "../etc", "a/b", "/abs", "a\\b", "a..b", ".hidden", "nul\0", "tab\t",
        ] {
            let err = validate_model_name(bad).expect_err(bad).to_string();
            assert!(err.contains("invalid model name"), "{bad:?}: {err}");
        }
        assert!(validate_model_name(&"x".repeat(256)).is_err());
        for good in [
            "resnet50",
            "simple_int8",
            "my-model.v2",
            "模型",
            &"x".repeat(255),
        ] {
            validate_model_name(good).expect(good);
        }
    }

    #[test]
    fn lists_model_directories_sorted() {
        let r = repo();
        assert_eq!(list_models(r.path()).expect("lists"), ["alpha", "beta"]);
    }

    #[cfg(unix)]
    #[test]
    fn symlinked_model_directories_are_listed() {
        let r = repo();
        std::os::unix::fs::symlink(r.path().join("beta"), r.path().join("gamma")).expect("link");
        assert_eq!(
            list_models(r.path()).expect("lists"),
            ["alpha", "beta", "gamma"]
        );
        assert_eq!(available_versions(r.path(), "gamma"), [2]);
    }

    #[test]
    fn a_missing_repository_is_an_error() {
        let r = repo();
        let err = list_models(&r.path().join("nope")).unwrap_err().to_string();
        assert!(err.contains("cannot read the model repository"), "{err}");
    }

    #[test]
    fn reads_config_or_defaults_to_the_name() {
        let r = repo();
        let alpha = read_config(r.path(), "alpha").expect("alpha");
        assert_eq!(alpha.name, "alpha");
        assert_eq!(alpha.max_batch_size, 4);
        let beta = read_config(r.path(), "beta").expect("beta");
        assert_eq!(
            beta,
            ModelConfig {
                name: "beta".into(),
                ..Default::default()
            }
        );
    }

    #[test]
    fn config_errors_name_the_model() {
        let r = repo();
        write(&r.path().join("bad/config.pbtxt"), "max_batch_size: [\n");
        let err = read_config(r.path(), "bad").unwrap_err().to_string();
        assert!(err.starts_with("bad: config.pbtxt: line 1"), "{err}");

        fs::write(r.path().join("bad/config.pbtxt"), [0x6e, 0xff]).expect("write");
        let err = read_config(r.path(), "bad").unwrap_err().to_string();
        assert!(err.contains("not UTF-8"), "{err}");

        let err = read_config(r.path(), "missing").unwrap_err().to_string();
        assert!(err.starts_with("missing: no such model"), "{err}");
        assert!(read_config(r.path(), "../alpha").is_err());
    }

    #[test]
    fn versions_are_positive_numeric_directories() {
        let r = repo();
        assert_eq!(available_versions(r.path(), "alpha"), [1, 3, 10]);
        assert_eq!(available_versions(r.path(), "beta"), [2]);
        assert!(available_versions(r.path(), "missing").is_empty());
        assert!(available_versions(r.path(), "..").is_empty());
    }

    #[test]
    fn version_policies() {
        let available = [10, 1, 3];
        let policy = |choice| ModelVersionPolicy {
            policy_choice: Some(choice),
        };
        assert_eq!(select_versions(None, &available), [10]);
        assert_eq!(
            select_versions(Some(&ModelVersionPolicy::default()), &available),
            [10]
        );
        assert_eq!(
            select_versions(
                Some(&policy(PolicyChoice::Latest(Latest { num_versions: 2 }))),
                &available
            ),
            [3, 10]
        );
        assert_eq!(
            select_versions(
                Some(&policy(PolicyChoice::Latest(Latest { num_versions: 9 }))),
                &available
            ),
            [1, 3, 10]
        );
        assert!(select_versions(
            Some(&policy(PolicyChoice::Latest(Latest { num_versions: 0 }))),
            &available
        )
        .is_empty());
        assert_eq!(
            select_versions(Some(&policy(PolicyChoice::All(All {}))), &available),
            [1, 3, 10]
        );
        assert_eq!(
            select_versions(
                Some(&policy(PolicyChoice::Specific(Specific {
                    versions: vec![10, 2, 1]
                }))),
                &available
            ),
            [1, 10]
        );
        assert!(select_versions(None, &[]).is_empty());
    }

    #[test]
    fn model_file_default_custom_and_directory_forms() {
        let r = repo();
        let default = ModelConfig::default();
        assert_eq!(
            model_file(r.path(), "alpha", 3, &default).expect("file"),
            r.path().join("alpha/3/model.onnx")
        );

        write(&r.path().join("alpha/3/net.onnx"), "onnx");
        let custom = ModelConfig {
            default_model_filename: "net.onnx".into(),
            ..Default::default()
        };
        assert_eq!(
            model_file(r.path(), "alpha", 3, &custom).expect("file"),
            r.path().join("alpha/3/net.onnx")
        );

        write(&r.path().join("big/1/model.onnx/model.onnx"), "onnx");
        write(&r.path().join("big/1/model.onnx/weights.bin"), "data");
        assert_eq!(
            model_file(r.path(), "big", 1, &default).expect("file"),
            r.path().join("big/1/model.onnx/model.onnx")
        );
    }

    #[test]
    fn an_encrypted_file_stands_in_for_a_missing_plain_one() {
        let r = repo();
        let default = ModelConfig::default();
        write(&r.path().join("sealed/1/model.onnx.enc"), "ciphertext");
        let path = model_file(r.path(), "sealed", 1, &default).expect("file");
        assert_eq!(path, r.path().join("sealed/1/model.onnx.enc"));
        assert!(is_encrypted_model_file(&path));
        // The plain file wins when both are there.
        write(&r.path().join("sealed/1/model.onnx"), "onnx");
        let path = model_file(r.path(), "sealed", 1, &default).expect("file");
        assert!(!is_encrypted_model_file(&path));
    }

    #[test]
    fn model_file_errors() {
        let r = repo();
        let default = ModelConfig::default();
        let err = model_file(r.path(), "alpha", 2, &default)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("alpha: version 2: no version directory"),
            "{err}"
        );

        let other = ModelConfig {
            default_model_filename: "other.onnx".into(),
            ..Default::default()
        };
        let err = model_file(r.path(), "alpha", 1, &other)
            .unwrap_err()
            .to_string();
        assert!(err.contains("other.onnx not found"), "{err}");

        fs::create_dir_all(r.path().join("empty/1/model.onnx")).expect("dir");
        let err = model_file(r.path(), "empty", 1, &default)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not found"), "{err}");

        for escape in ["../../beta/2/model.onnx", "/etc/passwd", ".."] {
            let config = ModelConfig {
                default_model_filename: escape.into(),
                ..Default::default()
            };
            let err = model_file(r.path(), "alpha", 1, &config).unwrap_err();
            assert!(
                matches!(err, ModelError::InvalidConfig { .. }),
                "{escape}: {err}"
            );
            let err = err.to_string();
            assert!(err.contains("plain file name"), "{escape}: {err}");
        }
        assert!(model_file(r.path(), "../alpha", 1, &default).is_err());
    }
}
