//! The response cache (`--cache-config local,size=BYTES` and `response_cache { enable: true }` per
//! model): successful responses by [`CacheKey`], least recently used first out, bounded in bytes and
//! shared by every model. A hit answers without queueing or running the model.
//!
//! Statistics: each model's `cache_hit` (lookup time) and `cache_miss` (lookup plus insertion time)
//! in ModelStatistics, as Triton's; misses are counted for successful responses only, so for a
//! cache-enabled model hits + misses = successes. Cache-wide counters feed `nv_cache_*`.
pub mod key;
pub mod lru;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Weak};
use std::time::Instant;

use parking_lot::Mutex;

pub use key::CacheKey;
use key::{tensors_byte_size, ENTRY_OVERHEAD_BYTES};
use lru::ByteLru;

use crate::model::manager::LoadedModel;
use crate::model::ModelConfig;
use crate::scheduler::{InferRequest, InferResponse, RequestTimings, SchedulerError};
use crate::telemetry::stats::ModelStats;
use crate::tensor::{NamedTensor, Tensor, TensorData};

/// The one cache implementation, named as Triton's in-memory cache.
pub const LOCAL_CACHE: &str = "local";

/// Largest `size` accepted (1 TiB): a bound that catches a mistyped number of digits.
pub const MAX_CACHE_BYTES: u64 = 1 << 40;

/// `--cache-config` parsed: the cache's capacity in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheSettings {
    pub size_bytes: usize,
}

/// Parses Triton's `--cache-config <cache>,<key>=<value>` flags (repeatable; settings of one cache
/// merge). None when no flag is given: no cache.
pub fn parse_cache_config(flags: &[String]) -> Result<Option<CacheSettings>, String> {
    let mut size: Option<u64> = None;
    for flag in flags {
        let (cache, setting) = flag.split_once(',').ok_or_else(|| {
            format!(
                "--cache-config '{flag}' must be <cache>,<key>=<value>, e.g. local,size=1048576"
            )
        })?;
        if cache != LOCAL_CACHE {
            return Err(format!(
                "--cache-config: cache '{cache}' is not available; the only cache is '{LOCAL_CACHE}'"
            ));
        }
        let (key, value) = setting.split_once('=').ok_or_else(|| {
            format!("--cache-config '{flag}': setting '{setting}' must be <key>=<value>")
        })?;
        match key {
            "size" => {
                let bytes: u64 = value.parse().map_err(|_| {
                    format!("--cache-config: size '{value}' must be a number of bytes")
                })?;
                if bytes == 0 || bytes > MAX_CACHE_BYTES {
                    return Err(format!(
                        "--cache-config: size {bytes} must be between 1 and {MAX_CACHE_BYTES} bytes"
                    ));
                }
                size = Some(bytes);
            }
            other => {
                return Err(format!(
                    "--cache-config: unknown setting '{other}' of the local cache (known: size)"
                ))
            }
        }
    }
    match (flags.is_empty(), size) {
        (true, _) => Ok(None),
        (false, Some(bytes)) => Ok(Some(CacheSettings {
            size_bytes: usize::try_from(bytes).map_err(|_| "cache size too large".to_string())?,
        })),
        (false, None) => Err("--cache-config local needs size=<bytes>".into()),
    }
}

/// Whether a model's config asks for its responses to be cached.
pub fn enabled_for(config: &ModelConfig) -> bool {
    config.response_cache.as_ref().is_some_and(|c| c.enable)
}

/// A stored response. The weak reference pins the model load's statistics allocation, so the
/// address used as the load's identity in keys cannot be reused by a later load while any entry
/// of this one exists: a reloaded model never gets the old model's answers.
#[derive(Debug)]
struct Cached {
    outputs: Vec<NamedTensor>,
    _load: Weak<ModelStats>,
}

/// Cache-wide figures for `nv_cache_*`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CacheSnapshot {
    pub entries: u64,
    pub evictions: u64,
    pub used_bytes: u64,
    pub capacity_bytes: u64,
}

impl CacheSnapshot {
    /// Fraction of the capacity in use, 0 to 1 (Triton's nv_cache_util).
    pub fn utilization(&self) -> f64 {
        if self.capacity_bytes == 0 {
            0.0
        } else {
            self.used_bytes as f64 / self.capacity_bytes as f64
        }
    }
}

/// The response cache shared by every model.
#[derive(Debug)]
pub struct ResponseCache {
    entries: Mutex<ByteLru<CacheKey, Arc<Cached>>>,
    evictions: AtomicU64,
}

impl ResponseCache {
    pub fn new(settings: CacheSettings) -> Self {
        Self {
            entries: Mutex::new(ByteLru::new(settings.size_bytes)),
            evictions: AtomicU64::new(0),
        }
    }

    pub fn snapshot(&self) -> CacheSnapshot {
        let entries = self.entries.lock();
        CacheSnapshot {
            entries: entries.len() as u64,
            evictions: self.evictions.load(Relaxed),
            used_bytes: entries.used() as u64,
            capacity_bytes: entries.capacity() as u64,
        }
    }

    fn get(&self, key: &CacheKey) -> Option<Arc<Cached>> {
        self.entries.lock().get(key)
    }

    /// Stores copies of the outputs (they may be slices of a whole batch's buffer, which an entry
    /// must not keep alive) under a detached key.
    fn insert(&self, key: &CacheKey, outputs: &[NamedTensor], load: Weak<ModelStats>) {
        let outputs: Vec<NamedTensor> = outputs.iter().map(detached).collect();
        let key = key.detached();
        let bytes = key.byte_size() + tensors_byte_size(&outputs) + ENTRY_OVERHEAD_BYTES;
        let value = Arc::new(Cached {
            outputs,
            _load: load,
        });
        let inserted = self.entries.lock().insert(key, value, bytes);
        self.evictions.fetch_add(inserted.evicted, Relaxed);
    }
}

/// The identity of one model load inside keys (see [`Cached`]).
fn load_identity(stats: &Arc<ModelStats>) -> usize {
    Arc::as_ptr(stats) as usize
}

/// Answers `request` from the cache when the model enables it and an identical request succeeded
/// before; otherwise runs it with `run` (the model's scheduler) and stores a success. A hit comes
/// back with `timings.batch_size` 0: it took part in no execution.
pub async fn lookup_or_run<F, Fut>(
    cache: Option<&ResponseCache>,
    model: &LoadedModel,
    request: InferRequest,
    run: F,
) -> Result<InferResponse, SchedulerError>
where
    F: FnOnce(InferRequest) -> Fut,
    Fut: Future<Output = Result<InferResponse, SchedulerError>>,
{
    let Some(cache) = cache.filter(|_| enabled_for(&model.config)) else {
        return run(request).await;
    };
    let started = Instant::now();
    let key = CacheKey::new(
        load_identity(&model.stats),
        &model.name,
        model.version,
        &request,
    );
    if let Some(hit) = cache.get(&key) {
        model.stats.cache_hit.record(started.elapsed());
        return Ok(InferResponse {
            outputs: hit.outputs.clone(),
            timings: RequestTimings::default(),
        });
    }
    let lookup = started.elapsed();
    let response = run(request).await?;
    let inserting = Instant::now();
    cache.insert(&key, &response.outputs, Arc::downgrade(&model.stats));
    model.stats.cache_miss.record(lookup + inserting.elapsed());
    Ok(response)
}

fn detached(t: &NamedTensor) -> NamedTensor {
    let data = match &t.tensor.data {
        TensorData::Fixed(b) => TensorData::Fixed(bytes::Bytes::copy_from_slice(b)),
        TensorData::Strings(items) => TensorData::Strings(
            items
                .iter()
                .map(|b| bytes::Bytes::copy_from_slice(b))
                .collect(),
        ),
    };
    NamedTensor {
        name: t.name.clone(),
        tensor: Tensor {
            dtype: t.tensor.dtype,
            shape: t.tensor.shape.clone(),
            data,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parses_triton_cache_flags() {
        assert_eq!(parse_cache_config(&[]), Ok(None));
        assert_eq!(
            parse_cache_config(&flags(&["local,size=1048576"])),
            Ok(Some(CacheSettings {
                size_bytes: 1048576
            }))
        );
        let refused = [
            (vec!["redis,size=10"], "cache 'redis' is not available"),
            (vec!["local"], "must be <cache>,<key>=<value>"),
            (vec!["local,size"], "must be <key>=<value>"),
            (vec!["local,size=ten"], "must be a number of bytes"),
            (vec!["local,size=0"], "must be between 1 and"),
            (vec!["local,size=2000000000000"], "must be between 1 and"),
            (vec!["local,colour=red"], "unknown setting 'colour'"),
        ];
        for (given, expected) in refused {
            let err = parse_cache_config(&flags(&given)).unwrap_err();
            assert!(err.contains(expected), "{given:?}: {err}");
        }
    }
}
