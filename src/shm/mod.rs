//! Triton's system shared-memory extension, engine side: the registry of POSIX shared-memory regions
//! that clients register by name, reads of input tensors out of them and bounded writes of output
//! tensors into them. Knows nothing of gRPC; `server` maps [`ShmErrorKind`] to status codes.
//!
//! Accesses go through the object's open descriptor (`pread`/`pwrite`), never a mapping, so a client
//! that truncates its object gets an error instead of killing the server with SIGBUS (see
//! `region`). Lifetimes: the object is opened once at registration and closed when the last user
//! lets go of it. Unregistering removes the name at once, but a request already holding an
//! [`ShmOutput`] of that region keeps the object open until it finishes. Dropping the registry
//! (server shutdown) closes every object no request still holds.
mod region;

use std::collections::BTreeMap;
use std::io;
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::RwLock;

use region::OpenRegion;

/// The registered system shared-memory regions, by name.
#[derive(Debug)]
pub struct ShmRegistry {
    /// False when the server runs with `--allow-client-shm=false`: every call is refused.
    enabled: bool,
    regions: RwLock<BTreeMap<String, Arc<OpenRegion>>>,
}

/// One row of SystemSharedMemoryStatus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionStatus {
    pub name: String,
    pub key: String,
    pub offset: u64,
    pub byte_size: u64,
}

/// Which status a client gets for a [`ShmError`]; `server` maps each kind to one gRPC code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShmErrorKind {
    NotFound,
    AlreadyExists,
    InvalidArgument,
    Internal,
    Unavailable,
}

/// Why a shared-memory call failed. Messages follow Triton's where Triton has one, so clients that
/// match on them keep working; each names the region (or the key) it concerns.
#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    #[error("client shared memory is disabled; start the server with --allow-client-shm=true")]
    Disabled,
    #[error("shared memory region '{name}' already in manager")]
    AlreadyExists { name: String },
    /// SystemSharedMemoryStatus for a name that is not registered.
    #[error("Unable to find system shared memory region: '{name}'")]
    NotFound { name: String },
    /// An inference request named a region that is not registered.
    #[error("Unable to find shared memory region: '{name}'")]
    UnknownRegion { name: String },
    #[error(
        "failed to register shared memory region '{name}': invalid key '{key}' \
         (expected a POSIX shared memory name such as '/my_region')"
    )]
    InvalidKey { name: String, key: String },
    #[error("Unable to open shared memory region: '{key}': {source}")]
    OpenFailed { key: String, source: io::Error },
    #[error("Invalid shared memory region: '{key}'")]
    InvalidObject { key: String },
    #[error("failed to register shared memory region '{name}': invalid args ({reason})")]
    InvalidRegistration { name: String, reason: String },
    #[error("failed to register shared memory region '{name}': {source}")]
    MapFailed { name: String, source: io::Error },
    #[error("Invalid offset for shared memory region: '{name}'")]
    InvalidOffset { name: String },
    #[error("Invalid offset + byte size for shared memory region: '{name}'")]
    OutOfBounds { name: String },
    #[error(
        "shared memory region '{name}' is no longer backed: the client truncated '{key}' \
         to {object_size} bytes"
    )]
    Truncated {
        name: String,
        key: String,
        object_size: u64,
    },
    #[error("failed to write to shared memory region '{name}': {source}")]
    WriteFailed { name: String, source: io::Error },
}

impl ShmError {
    /// The status kind; exhaustive so a new variant cannot reach a client unmapped.
    pub fn kind(&self) -> ShmErrorKind {
        match self {
            ShmError::Disabled => ShmErrorKind::Unavailable,
            ShmError::AlreadyExists { .. } => ShmErrorKind::AlreadyExists,
            ShmError::NotFound { .. } => ShmErrorKind::NotFound,
            // Triton says INTERNAL when the key cannot be opened or stat'ed; kept for clients
            // that handle it, although the cause is usually the client's.
            ShmError::OpenFailed { .. }
            | ShmError::InvalidObject { .. }
            | ShmError::WriteFailed { .. } => ShmErrorKind::Internal,
            ShmError::UnknownRegion { .. }
            | ShmError::InvalidKey { .. }
            | ShmError::InvalidRegistration { .. }
            | ShmError::MapFailed { .. }
            | ShmError::InvalidOffset { .. }
            | ShmError::OutOfBounds { .. }
            | ShmError::Truncated { .. } => ShmErrorKind::InvalidArgument,
        }
    }
}

impl Default for ShmRegistry {
    fn default() -> Self {
        Self::new()
    }
}

impl ShmRegistry {
    /// A registry that accepts registrations (`--allow-client-shm=true`).
    pub fn new() -> Self {
        Self {
            enabled: true,
            regions: RwLock::new(BTreeMap::new()),
        }
    }

    /// A registry that refuses every call with [`ShmError::Disabled`] (`--allow-client-shm=false`).
    pub fn disabled() -> Self {
        Self {
            enabled: false,
            regions: RwLock::new(BTreeMap::new()),
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    fn check_enabled(&self) -> Result<(), ShmError> {
        if self.enabled {
            Ok(())
        } else {
            Err(ShmError::Disabled)
        }
    }

    /// Maps `[offset, offset + byte_size)` of the POSIX shared-memory object `key` under `name`.
    pub fn register(
        &self,
        name: &str,
        key: &str,
        offset: u64,
        byte_size: u64,
    ) -> Result<(), ShmError> {
        self.check_enabled()?;
        let already = || ShmError::AlreadyExists {
            name: name.to_owned(),
        };
        // Checked first so a duplicate is refused without touching the key, and again on insert
        // because the object is opened outside the lock (opening and checking are syscalls that
        // must not stall readers).
        if self.regions.read().contains_key(name) {
            return Err(already());
        }
        let region = Arc::new(OpenRegion::open(name, key, offset, byte_size)?);
        match self.regions.write().entry(name.to_owned()) {
            std::collections::btree_map::Entry::Occupied(_) => Err(already()),
            std::collections::btree_map::Entry::Vacant(slot) => {
                slot.insert(region);
                Ok(())
            }
        }
    }

    /// Forgets `name`. Unknown names are not an error, as in Triton. The object is closed when
    /// the last in-flight request using it finishes.
    pub fn unregister(&self, name: &str) -> Result<(), ShmError> {
        self.check_enabled()?;
        let removed = self.regions.write().remove(name);
        // Dropped after the lock is released: closing is a syscall.
        drop(removed);
        Ok(())
    }

    /// Forgets every region.
    pub fn unregister_all(&self) -> Result<(), ShmError> {
        self.check_enabled()?;
        let removed = std::mem::take(&mut *self.regions.write());
        drop(removed);
        Ok(())
    }

    /// The status of one region, or of all (sorted by name) when `name` is None. The server passes
    /// None for the protocol's empty name.
    pub fn status(&self, name: Option<&str>) -> Result<Vec<RegionStatus>, ShmError> {
        self.check_enabled()?;
        let regions = self.regions.read();
        let status = |r: &OpenRegion| RegionStatus {
            name: r.name.clone(),
            key: r.key.clone(),
            offset: r.offset,
            byte_size: r.byte_size as u64,
        };
        match name {
            None => Ok(regions.values().map(|r| status(r)).collect()),
            Some(name) => {
                regions
                    .get(name)
                    .map(|r| vec![status(r)])
                    .ok_or_else(|| ShmError::NotFound {
                        name: name.to_owned(),
                    })
            }
        }
    }

    /// A copy of the `byte_size` bytes at `offset` in region `name`, read now: later changes to
    /// the object (a truncation included) cannot reach it.
    pub fn read(&self, name: &str, offset: u64, byte_size: u64) -> Result<Bytes, ShmError> {
        let (region, range) = self.resolve(name, offset, byte_size)?;
        region.ensure_backed(&range)?;
        Ok(Bytes::from(region.read(range)?))
    }

    /// Reserves `[offset, offset + byte_size)` of region `name` for an output tensor. Call it when
    /// the request is validated, before inference, so a bad region fails before anything is queued;
    /// the reservation keeps the object open until the output is written.
    pub fn output(&self, name: &str, offset: u64, byte_size: u64) -> Result<ShmOutput, ShmError> {
        let (region, range) = self.resolve(name, offset, byte_size)?;
        Ok(ShmOutput { region, range })
    }

    /// Copies `data` into region `name` at `offset` (shorthand for [`Self::output`] + write).
    pub fn write(&self, name: &str, offset: u64, data: &[u8]) -> Result<(), ShmError> {
        self.output(name, offset, data.len() as u64)?.write(data)
    }

    /// Looks `name` up and bounds-checks `[offset, offset + byte_size)` against its size.
    fn resolve(
        &self,
        name: &str,
        offset: u64,
        byte_size: u64,
    ) -> Result<(Arc<OpenRegion>, Range<usize>), ShmError> {
        self.check_enabled()?;
        let region =
            self.regions
                .read()
                .get(name)
                .cloned()
                .ok_or_else(|| ShmError::UnknownRegion {
                    name: name.to_owned(),
                })?;
        let range = checked_range(region.byte_size, offset, byte_size, name)?;
        Ok((region, range))
    }
}

/// `[offset, offset + byte_size)` as a range inside a region of `region_size` bytes. An offset
/// equal to the size is accepted for an empty range (a zero-element tensor at the very end).
fn checked_range(
    region_size: usize,
    offset: u64,
    byte_size: u64,
    name: &str,
) -> Result<Range<usize>, ShmError> {
    let start = usize::try_from(offset)
        .ok()
        .filter(|start| *start <= region_size)
        .ok_or_else(|| ShmError::InvalidOffset {
            name: name.to_owned(),
        })?;
    let end = usize::try_from(byte_size)
        .ok()
        .and_then(|len| start.checked_add(len))
        .filter(|end| *end <= region_size)
        .ok_or_else(|| ShmError::OutOfBounds {
            name: name.to_owned(),
        })?;
    Ok(start..end)
}

/// A validated place in a region for one output tensor.
#[derive(Debug)]
pub struct ShmOutput {
    region: Arc<OpenRegion>,
    range: Range<usize>,
}

impl ShmOutput {
    /// The bytes reserved, as the request's `shared_memory_byte_size` gave them.
    pub fn byte_size(&self) -> usize {
        self.range.len()
    }

    /// The region's name, for error messages.
    pub fn region_name(&self) -> &str {
        &self.region.name
    }

    /// Copies `data` to the start of the reserved range. Data longer than the reservation is
    /// refused whole (the server should first report it naming the tensor, as Triton does).
    pub fn write(&self, data: &[u8]) -> Result<(), ShmError> {
        let out_of_bounds = || ShmError::OutOfBounds {
            name: self.region.name.clone(),
        };
        if data.len() > self.range.len() {
            return Err(out_of_bounds());
        }
        let target = self.range.start..self.range.start + data.len();
        self.region.ensure_backed(&target)?;
        if self.region.copy_from(target.start, data)? {
            Ok(())
        } else {
            Err(out_of_bounds())
        }
    }
}

#[cfg(test)]
mod tests;
