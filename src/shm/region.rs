//! One client region: an open POSIX shared-memory object and the range of it the client registered.
//!
//! The gateway reads and writes the object with `pread`/`pwrite` on the open descriptor instead of
//! through a mapping. A client may truncate its object at any moment (by mistake or on purpose),
//! and touching a mapped page past the new end of the file raises SIGBUS, which kills the whole
//! server; no size check before the access can close that window, because a zero-copy view is read
//! much later (batch assembly, ONNX Runtime). A `pread` of a truncated object just returns fewer
//! bytes, which is refused as an error naming the region. The price is one copy of each shared-
//! memory input, which is what Triton's own CPU path pays as well; the gRPC message and its
//! decoding are still avoided.
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;

use super::ShmError;

/// Where Linux keeps POSIX shared-memory objects; `shm_open(name)` is `open("/dev/shm/" + name)`.
const SHM_DIR: &str = "/dev/shm";

/// A registered region: `[offset, offset + byte_size)` of the POSIX shared-memory object `key`.
pub(super) struct OpenRegion {
    pub(super) name: String,
    pub(super) key: String,
    pub(super) offset: u64,
    pub(super) byte_size: usize,
    /// Kept open for the life of the registration: the object stays reachable even if the client
    /// unlinks its name, as it would with a mapping.
    file: File,
}

impl std::fmt::Debug for OpenRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenRegion")
            .field("name", &self.name)
            .field("key", &self.key)
            .field("offset", &self.offset)
            .field("byte_size", &self.byte_size)
            .finish_non_exhaustive()
    }
}

impl OpenRegion {
    /// Opens the shared-memory object `key` read-write, as Triton does, and checks that it holds
    /// `[offset, offset + byte_size)`.
    pub(super) fn open(
        name: &str,
        key: &str,
        offset: u64,
        byte_size: u64,
    ) -> Result<Self, ShmError> {
        let invalid = |reason: String| ShmError::InvalidRegistration {
            name: name.to_owned(),
            reason,
        };
        let path = object_path(key).ok_or_else(|| ShmError::InvalidKey {
            name: name.to_owned(),
            key: key.to_owned(),
        })?;
        if byte_size == 0 {
            return Err(invalid("byte_size must be greater than 0".to_owned()));
        }
        let len = usize::try_from(byte_size)
            .map_err(|_| invalid(format!("byte_size {byte_size} does not fit in memory")))?;
        let end = offset
            .checked_add(byte_size)
            .ok_or_else(|| invalid(format!("offset {offset} + byte_size {byte_size} overflows")))?;

        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            // shm_open's flags: never follow a planted symlink, never leak the fd into children.
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(|source| ShmError::OpenFailed {
                key: key.to_owned(),
                source,
            })?;
        let object_size = regular_file_size(&file).ok_or_else(|| ShmError::InvalidObject {
            key: key.to_owned(),
        })?;
        if end > object_size {
            return Err(invalid(format!(
                "offset {offset} + byte_size {byte_size} exceeds the {object_size} bytes of '{key}'"
            )));
        }
        Ok(Self {
            name: name.to_owned(),
            key: key.to_owned(),
            offset,
            byte_size: len,
            file,
        })
    }

    /// Refuses access to `range` (relative to the region) when the client has truncated the object
    /// so that the range is no longer backed. Only an early, clear error: the accesses themselves
    /// cannot fault whatever the client does meanwhile.
    pub(super) fn ensure_backed(&self, range: &Range<usize>) -> Result<(), ShmError> {
        let needed = self.offset.saturating_add(range.end as u64);
        let object_size = regular_file_size(&self.file).unwrap_or(0);
        if needed > object_size {
            return Err(self.truncated(object_size));
        }
        Ok(())
    }

    /// A copy of the bytes of `range` (relative to the region, already bounds-checked). An object
    /// truncated before or during the read gives a short read, refused as truncated.
    pub(super) fn read(&self, range: Range<usize>) -> Result<Vec<u8>, ShmError> {
        let mut buf = vec![0u8; range.len()];
        let at = self.offset.saturating_add(range.start as u64);
        self.file.read_exact_at(&mut buf, at).map_err(|_| {
            let size = regular_file_size(&self.file).unwrap_or(0);
            self.truncated(size)
        })?;
        Ok(buf)
    }

    /// Copies `data` into the region at `start`; false (nothing written) when it does not fit.
    /// A write racing a truncation only grows the client's object again; it cannot fault.
    pub(super) fn copy_from(&self, start: usize, data: &[u8]) -> Result<bool, ShmError> {
        let fits = start
            .checked_add(data.len())
            .is_some_and(|end| end <= self.byte_size);
        if !fits {
            return Ok(false);
        }
        let at = self.offset.saturating_add(start as u64);
        self.file
            .write_all_at(data, at)
            .map_err(|source| ShmError::WriteFailed {
                name: self.name.clone(),
                source,
            })?;
        Ok(true)
    }

    fn truncated(&self, object_size: u64) -> ShmError {
        ShmError::Truncated {
            name: self.name.clone(),
            key: self.key.clone(),
            object_size,
        }
    }
}

/// `/dev/shm/<name>` for a POSIX shared-memory name, or None for a name shm_open would refuse or
/// that would escape the directory. Leading slashes are dropped as glibc's shm_open does.
fn object_path(key: &str) -> Option<PathBuf> {
    let name = key.trim_start_matches('/');
    let refused = name.is_empty()
        || name == "."
        || name == ".."
        || name.contains('/')
        || name.contains('\0')
        || name.len() > 255;
    (!refused).then(|| PathBuf::from(SHM_DIR).join(name))
}

/// The object's current size, or None when it is not a regular file (a directory, a device).
fn regular_file_size(file: &File) -> Option<u64> {
    let meta = file.metadata().ok()?;
    meta.file_type().is_file().then_some(meta.len())
}

/// For tests: the path of a key, to create and remove objects without calling shm_open.
#[cfg(test)]
pub(super) fn path_for_test(key: &str) -> Option<PathBuf> {
    object_path(key)
}
