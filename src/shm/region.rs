//! One client region mapped into the gateway's address space, and the only code in `shm` that touches
//! the mapping through raw pointers.
//!
//! The mapping is a [`MmapRaw`]: it never hands out `&mut [u8]`, because read views of the same
//! pages (zero-copy input tensors) may be alive on other threads while an output is written.
#![allow(unsafe_code)]

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use memmap2::{MmapOptions, MmapRaw};

use super::ShmError;

/// Where Linux keeps POSIX shared-memory objects; `shm_open(name)` is `open("/dev/shm/" + name)`.
const SHM_DIR: &str = "/dev/shm";

/// A registered region: `[offset, offset + byte_size)` of the POSIX shared-memory object `key`.
pub(super) struct MappedRegion {
    pub(super) name: String,
    pub(super) key: String,
    pub(super) offset: u64,
    pub(super) byte_size: usize,
    /// Kept open so every access can check that the client has not shrunk the object under the
    /// mapping (touching pages past the object's end raises SIGBUS instead of an error).
    file: File,
    map: MmapRaw,
}

impl std::fmt::Debug for MappedRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedRegion")
            .field("name", &self.name)
            .field("key", &self.key)
            .field("offset", &self.offset)
            .field("byte_size", &self.byte_size)
            .finish_non_exhaustive()
    }
}

impl MappedRegion {
    /// Opens the shared-memory object `key` read-write, as Triton does, checks that it holds
    /// `[offset, offset + byte_size)` and maps exactly that range.
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
        let map = MmapOptions::new()
            .offset(offset)
            .len(len)
            .map_raw(&file)
            .map_err(|source| ShmError::MapFailed {
                name: name.to_owned(),
                source,
            })?;
        Ok(Self {
            name: name.to_owned(),
            key: key.to_owned(),
            offset,
            byte_size: len,
            file,
            map,
        })
    }

    /// Refuses access to `range` (relative to the region) when the client has truncated the object
    /// so that the range is no longer backed. A truncation racing with the access itself cannot be
    /// caught here; clients must not shrink a registered object (Triton has the same contract).
    pub(super) fn ensure_backed(&self, range: &Range<usize>) -> Result<(), ShmError> {
        let needed = self.offset.saturating_add(range.end as u64);
        let object_size = regular_file_size(&self.file).unwrap_or(0);
        if needed > object_size {
            return Err(ShmError::Truncated {
                name: self.name.clone(),
                key: self.key.clone(),
                object_size,
            });
        }
        Ok(())
    }

    /// The bytes of `range` (relative to the region), or None when it is not inside the region.
    pub(super) fn slice(&self, range: Range<usize>) -> Option<&[u8]> {
        if range.start > range.end || range.end > self.byte_size {
            return None;
        }
        // SAFETY: `range` lies inside the live mapping (checked above; the mapping is
        // `byte_size` bytes and lives as long as `self`), so the pointer is valid, aligned for u8
        // and the length fits isize. The memory is shared with the client process, which may
        // write to it at any time: the protocol makes the client responsible for not changing a
        // region while a request that uses it is in flight, and a client that breaks this only
        // sees its own tensor contain mixed values; nothing outside the mapping is ever read. The
        // gateway itself writes only through `copy_from`, never through a `&mut [u8]`.
        Some(unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(range.start), range.len()) })
    }

    /// Copies `data` into the region at `start`; false (nothing written) when it does not fit.
    pub(super) fn copy_from(&self, start: usize, data: &[u8]) -> bool {
        let fits = start
            .checked_add(data.len())
            .is_some_and(|end| end <= self.byte_size);
        if !fits {
            return false;
        }
        // SAFETY: `[start, start + data.len())` lies inside the live, writable (PROT_WRITE,
        // MAP_SHARED) mapping, checked above. `ptr::copy` tolerates `data` overlapping the
        // destination (a client may name overlapping input and output ranges). Other threads may
        // hold `&[u8]` views of these bytes; like the client's own writes, ours only change the
        // values they observe, within the mapping, which is the protocol's contract.
        unsafe {
            std::ptr::copy(data.as_ptr(), self.map.as_mut_ptr().add(start), data.len());
        }
        true
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
