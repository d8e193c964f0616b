//! CUDA shared memory on a server that has none: the answers a CPU-only Triton gives, so clients
//! that tidy up CUDA regions before they start (every shared-memory example does) keep working.
use tonic::Status;

use crate::shm::ShmRegistry;

/// Status over no CUDA regions: empty for all, NOT_FOUND for a named one (with Triton's text for a
/// name that is a system shared-memory region instead).
pub fn status(name: &str, system: &ShmRegistry) -> Result<(), Status> {
    if name.is_empty() {
        return Ok(());
    }
    if system.is_enabled() && system.status(Some(name)).is_ok() {
        return Err(Status::not_found(format!(
            "The region named '{name}' is registered as system shared memory, not CUDA shared memory"
        )));
    }
    Err(Status::not_found(format!(
        "Unable to find cuda shared memory region: '{name}'"
    )))
}

/// Registering stays refused: this server never maps GPU memory.
pub fn register_refused(name: &str) -> Status {
    Status::unimplemented(format!(
        "failed to register CUDA shared memory region: '{name}': CUDA shared memory is not supported by this server; use system shared memory or inline tensors"
    ))
}
