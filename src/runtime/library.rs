//! Finds libonnxruntime and initialises the one ONNX Runtime environment of the process.
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use super::RuntimeError;

/// Where the library was found, for the startup log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LibraryLocation {
    Flag(PathBuf),
    EnvVar(PathBuf),
    ProjectLocal(PathBuf),
    SystemPath,
}

impl LibraryLocation {
    fn path(&self) -> PathBuf {
        match self {
            LibraryLocation::Flag(p)
            | LibraryLocation::EnvVar(p)
            | LibraryLocation::ProjectLocal(p) => p.clone(),
            LibraryLocation::SystemPath => PathBuf::from(SYSTEM_LIBRARY_NAME),
        }
    }
}

/// File name the dynamic loader resolves through the system library path.
const SYSTEM_LIBRARY_NAME: &str = "libonnxruntime.so";
/// Where `scripts/setup` puts the library taken from the onnxruntime wheel.
const PROJECT_LOCAL_DIR: &str = ".onnxruntime/lib";

const HOW_TO_GET_IT: &str = "ONNX Runtime 1.31 is needed: run `scripts/setup` (it copies libonnxruntime.so out of the \
`onnxruntime` Python wheel into .onnxruntime/lib/), or pass --onnxruntime-lib /path/to/libonnxruntime.so, or set \
ORT_DYLIB_PATH";

static ENVIRONMENT: OnceLock<ort::environment::Environment> = OnceLock::new();

/// The process-wide ONNX Runtime environment; `init_onnxruntime` must have succeeded first.
pub(super) fn environment() -> Result<&'static ort::environment::Environment, String> {
    ENVIRONMENT
        .get()
        .ok_or_else(|| "ONNX Runtime is not initialised".to_string())
}

/// Discovery order: the flag, `ORT_DYLIB_PATH`, the project-local copy (relative to the working
/// directory and to the executable's ../../), then the system library path.
fn locate(flag: Option<&Path>) -> Result<LibraryLocation, RuntimeError> {
    if let Some(path) = flag {
        return existing(path).map(LibraryLocation::Flag);
    }
    if let Some(path) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        return existing(Path::new(&path)).map(LibraryLocation::EnvVar);
    }
    let mut candidates = vec![PathBuf::from(PROJECT_LOCAL_DIR).join(SYSTEM_LIBRARY_NAME)];
    if let Some(root) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.ancestors().nth(3).map(Path::to_path_buf))
    {
        candidates.push(root.join(PROJECT_LOCAL_DIR).join(SYSTEM_LIBRARY_NAME));
    }
    if let Some(found) = candidates.into_iter().find(|p| p.is_file()) {
        return Ok(LibraryLocation::ProjectLocal(
            std::fs::canonicalize(&found).unwrap_or(found),
        ));
    }
    Ok(LibraryLocation::SystemPath)
}

fn existing(path: &Path) -> Result<PathBuf, RuntimeError> {
    if path.is_file() {
        Ok(path.to_path_buf())
    } else {
        Err(RuntimeError::Library(format!(
            "ONNX Runtime library not found at {}. {HOW_TO_GET_IT}",
            path.display()
        )))
    }
}

/// Loads libonnxruntime and builds the environment. Idempotent: later calls return the first result's
/// location without loading again.
pub fn init_onnxruntime(flag: Option<&Path>) -> Result<LibraryLocation, RuntimeError> {
    static LOCATION: OnceLock<LibraryLocation> = OnceLock::new();
    if let Some(location) = LOCATION.get() {
        return Ok(location.clone());
    }
    let location = locate(flag)?;
    let path = location.path();
    require_executable_path_for_relative(&path)?;
    let builder = ort::init_from(&path).map_err(|e| {
        RuntimeError::Library(format!(
            "cannot load ONNX Runtime from {}: {e}. {HOW_TO_GET_IT}",
            path.display()
        ))
    })?;
    // The gateway sizes threads per session; ORT's own telemetry is off so nothing leaves the pod.
    let env = builder
        .with_name("onnx-gateway")
        .with_telemetry(false)
        .build()
        .map_err(|e| {
            RuntimeError::Library(format!("cannot create the ONNX Runtime environment: {e}"))
        })?;
    let _ = ENVIRONMENT.set(env);
    let _ = LOCATION.set(location.clone());
    Ok(location)
}

/// ort resolves a relative library path against the executable's directory first, and panics ("could
/// not get current executable path") when that directory is unknown, as in a container or chroot
/// without /proc. Asking the same question first turns that panic into a startup error saying what to do.
fn require_executable_path_for_relative(path: &Path) -> Result<(), RuntimeError> {
    executable_path_check(path, std::env::current_exe().map(|_| ()))
}

fn executable_path_check(path: &Path, exe: std::io::Result<()>) -> Result<(), RuntimeError> {
    if path.is_absolute() {
        return Ok(());
    }
    exe.map_err(|e| {
        RuntimeError::Library(format!(
            "cannot load ONNX Runtime from the relative path {}: the executable's own path is unknown \
             ({e}), and ONNX Runtime's loader needs it for a relative path. Mount /proc (a container \
             runtime does; a bare chroot does not), or give an absolute path with --onnxruntime-lib or \
             ORT_DYLIB_PATH (the image sets ORT_DYLIB_PATH=/opt/onnxruntime/lib/libonnxruntime.so)",
            path.display()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_proc() -> std::io::Result<()> {
        Err(std::io::Error::other(
            "no /proc/self/exe available. Is /proc mounted?",
        ))
    }

    #[test]
    fn relative_path_without_executable_path_is_a_clear_error() {
        let err = executable_path_check(Path::new(SYSTEM_LIBRARY_NAME), no_proc()).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("relative path libonnxruntime.so"), "{text}");
        assert!(text.contains("Mount /proc"), "{text}");
        assert!(text.contains("--onnxruntime-lib"), "{text}");
    }

    #[test]
    fn absolute_path_needs_no_executable_path() {
        let path = Path::new("/opt/onnxruntime/lib/libonnxruntime.so");
        assert!(executable_path_check(path, no_proc()).is_ok());
    }

    #[test]
    fn relative_path_with_executable_path_is_left_to_ort() {
        assert!(executable_path_check(Path::new(SYSTEM_LIBRARY_NAME), Ok(())).is_ok());
    }
}
