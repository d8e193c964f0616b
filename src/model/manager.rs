//! The set of loaded models: loading a model's versions from the repository (session per instance,
//! auto-complete, validation, scheduler), lookups for requests, the repository index, readiness.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::RwLock;

use super::validate::TensorSpec;
use super::{autocomplete, repository, validate, warmup, ModelConfig, ModelError};
use crate::proto::model_instance_group::Kind as InstanceKind;
use crate::runtime::{cpu_budget, OrtExecutor, SessionPlan};
use crate::scheduler::{
    InstanceKind as SchedInstanceKind, ModelExecutor, Scheduler, SchedulerSettings,
};
use crate::telemetry::stats::ModelStats;

/// One loaded, serving model version.
pub struct LoadedModel {
    pub name: String,
    pub version: i64,
    /// The effective config: auto-completed and validated. This is what ModelConfig returns.
    pub config: ModelConfig,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    /// The model's scheduler, or for an ensemble the executor that routes to its composing models.
    pub scheduler: crate::ensemble::ModelRunner,
    pub stats: Arc<ModelStats>,
}

impl LoadedModel {
    pub fn max_batch_size(&self) -> usize {
        self.config.max_batch_size.max(0) as usize
    }
}

/// State of a model version as RepositoryIndex reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelState {
    Loading,
    Ready,
    Unavailable,
    Unloading,
}

impl ModelState {
    pub fn as_str(self) -> &'static str {
        match self {
            ModelState::Loading => "LOADING",
            ModelState::Ready => "READY",
            ModelState::Unavailable => "UNAVAILABLE",
            ModelState::Unloading => "UNLOADING",
        }
    }
}

/// One row of the repository index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    pub name: String,
    /// Empty when the failure happened before any version was known.
    pub version: String,
    pub state: ModelState,
    pub reason: String,
}

/// Why a request could not be routed to a model version. Texts follow Triton's.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum LookupError {
    #[error("Request for unknown model: '{0}' is not found")]
    UnknownModel(String),
    #[error("Request for unknown model: '{0}' version {1} is not found")]
    UnknownVersion(String, String),
    #[error("Request for unknown model: '{0}' has no available versions")]
    NoReadyVersion(String),
    #[error("Request for unknown model: '{0}' version {1} is not at ready state")]
    VersionNotReady(String, String),
}

#[derive(Default)]
struct ModelSlot {
    versions: BTreeMap<i64, Arc<LoadedModel>>,
    /// Versions (or the model as a whole, key None) that failed, with the reason.
    failures: BTreeMap<Option<i64>, String>,
    loading: bool,
}

/// Settings the manager needs, taken from the config groups.
#[derive(Debug, Clone)]
pub struct ManagerSettings {
    pub repository: PathBuf,
    pub default_max_queue_size: usize,
    /// Warm up models whose config lists no `model_warmup` over their batch sizes (`--model-auto-warmup`).
    pub auto_warmup: bool,
}

/// Owns every loaded model. Cheap lookups for the request path (one read lock, an Arc clone).
pub struct ModelManager {
    settings: ManagerSettings,
    models: RwLock<BTreeMap<String, ModelSlot>>,
}

impl ModelManager {
    pub fn new(settings: ManagerSettings) -> Self {
        Self {
            settings,
            models: RwLock::new(BTreeMap::new()),
        }
    }

    pub fn repository(&self) -> &Path {
        &self.settings.repository
    }

    /// Names of the models in the repository directory.
    pub fn repository_models(&self) -> Result<Vec<String>, ModelError> {
        repository::list_models(&self.settings.repository)
    }

    /// Loads (or reloads) every selected version of `name`. On failure the model's previous versions
    /// keep serving and the failure is recorded for the index; the error is returned to the caller.
    pub async fn load(
        self: &Arc<Self>,
        name: &str,
        config_override: Option<ModelConfig>,
    ) -> Result<(), ModelError> {
        repository::validate_model_name(name)?;
        if !repository::model_dir_exists(&self.settings.repository, name) {
            // Recorded nowhere: a misspelt load request must not leave a failed model behind that
            // holds strict readiness down.
            return Err(repository::not_found(name));
        }
        self.models
            .write()
            .entry(name.to_string())
            .or_default()
            .loading = true;
        let started = Instant::now();
        let this = Arc::clone(self);
        let model = name.to_string();
        let result = tokio::task::spawn_blocking(move || {
            this.load_versions_blocking(&model, config_override)
        })
        .await
        .map_err(|e| ModelError::Repository {
            model: name.to_string(),
            reason: format!("load task failed: {e}"),
        })
        .and_then(|r| r);
        let mut models = self.models.write();
        let slot = models.entry(name.to_string()).or_default();
        slot.loading = false;
        match result {
            Ok(loaded) => {
                let elapsed = started.elapsed();
                let old = std::mem::take(&mut slot.versions);
                slot.failures.clear();
                for model in loaded {
                    model.stats.record_load_duration(elapsed);
                    tracing::info!(model = %name, version = model.version, seconds = elapsed.as_secs_f64(), "model loaded");
                    slot.versions.insert(model.version, model);
                }
                drop(models);
                retire(old);
                Ok(())
            }
            Err(e) if !slot.versions.is_empty() => {
                // A failed reload never takes down what is serving: the previous versions stay.
                tracing::error!(model = %name, reason = %e, "model reload failed; previous versions keep serving");
                Err(e)
            }
            Err(e) => {
                tracing::error!(model = %name, reason = %e, "model failed to load");
                slot.failures.insert(None, e.to_string());
                Err(e)
            }
        }
    }

    /// Stops serving `name`: new requests get NOT_FOUND/UNAVAILABLE; requests already accepted finish.
    pub async fn unload(&self, name: &str) -> Result<(), ModelError> {
        let slot = self.models.write().remove(name);
        match slot {
            Some(slot) => {
                for model in slot.versions.into_values() {
                    model.scheduler.shutdown().await;
                    tracing::info!(model = %name, version = model.version, "model unloaded");
                }
                Ok(())
            }
            None => Err(ModelError::NotFound {
                model: name.to_string(),
                reason: "model is not loaded".into(),
            }),
        }
    }

    /// Finishes all accepted work of every model and stops their workers.
    pub async fn shutdown(&self) {
        let slots = std::mem::take(&mut *self.models.write());
        for (_, slot) in slots {
            for model in slot.versions.into_values() {
                model.scheduler.shutdown().await;
            }
        }
    }

    /// The model version a request names; an empty version means the latest ready one. An
    /// ensemble is not ready while any of its composing models is not.
    pub fn get(&self, name: &str, version: &str) -> Result<Arc<LoadedModel>, LookupError> {
        let model = self.get_loaded(name, version)?;
        match model.scheduler.ensemble() {
            Some(e) if !e.composing_ready(self) => Err(LookupError::VersionNotReady(
                name.to_string(),
                model.version.to_string(),
            )),
            _ => Ok(model),
        }
    }

    fn get_loaded(&self, name: &str, version: &str) -> Result<Arc<LoadedModel>, LookupError> {
        let models = self.models.read();
        let slot = models
            .get(name)
            .ok_or_else(|| LookupError::UnknownModel(name.to_string()))?;
        if version.is_empty() {
            return slot
                .versions
                .values()
                .next_back()
                .cloned()
                .ok_or_else(|| LookupError::NoReadyVersion(name.to_string()));
        }
        let number: i64 = version
            .parse()
            .map_err(|_| LookupError::UnknownVersion(name.to_string(), version.to_string()))?;
        if let Some(model) = slot.versions.get(&number) {
            return Ok(Arc::clone(model));
        }
        if slot.failures.contains_key(&Some(number)) || slot.loading {
            return Err(LookupError::VersionNotReady(
                name.to_string(),
                version.to_string(),
            ));
        }
        Err(LookupError::UnknownVersion(
            name.to_string(),
            version.to_string(),
        ))
    }

    /// Whether the named model (and version) can serve now.
    pub fn is_ready(&self, name: &str, version: &str) -> bool {
        self.get(name, version).is_ok()
    }

    /// Every model that was asked to load serves and none failed. A load in progress does not
    /// count against it: a reload keeps the previous versions serving, and a model being added
    /// must not take the whole server out of its load balancer (startup loading is covered by the
    /// startup latch instead).
    pub fn all_ready(&self) -> bool {
        self.models
            .read()
            .values()
            .all(|s| s.failures.is_empty() && (s.loading || !s.versions.is_empty()))
    }

    /// Rows for RepositoryIndex: every model in the repository, loaded or not.
    pub fn index(&self) -> Vec<IndexEntry> {
        let models = self.models.read();
        let mut names: Vec<String> = self.repository_models().unwrap_or_default();
        for name in models.keys() {
            if !names.contains(name) {
                names.push(name.clone());
            }
        }
        names.sort();
        let mut rows = Vec::new();
        for name in names {
            let Some(slot) = models.get(&name) else {
                rows.push(IndexEntry {
                    name,
                    version: String::new(),
                    state: ModelState::Unavailable,
                    reason: "unloaded".into(),
                });
                continue;
            };
            for version in slot.versions.keys() {
                rows.push(IndexEntry {
                    name: name.clone(),
                    version: version.to_string(),
                    state: ModelState::Ready,
                    reason: String::new(),
                });
            }
            for (version, reason) in &slot.failures {
                let version = version.map(|v| v.to_string()).unwrap_or_default();
                rows.push(IndexEntry {
                    name: name.clone(),
                    version,
                    state: ModelState::Unavailable,
                    reason: reason.clone(),
                });
            }
            if slot.loading {
                rows.push(IndexEntry {
                    name: name.clone(),
                    version: String::new(),
                    state: ModelState::Loading,
                    reason: String::new(),
                });
            }
        }
        drop(models);
        self.mark_unready_ensembles(&mut rows);
        rows
    }

    /// An ensemble version whose composing models are not all ready is listed UNAVAILABLE.
    fn mark_unready_ensembles(&self, rows: &mut [IndexEntry]) {
        for row in rows.iter_mut().filter(|r| r.state == ModelState::Ready) {
            if let Err(e) = self.get(&row.name, &row.version) {
                row.state = ModelState::Unavailable;
                row.reason = format!("{e}: a composing model is not ready");
            }
        }
    }

    /// Every loaded model version, for statistics and metrics.
    pub fn loaded(&self) -> Vec<Arc<LoadedModel>> {
        self.models
            .read()
            .values()
            .flat_map(|s| s.versions.values().cloned())
            .collect()
    }

    fn load_versions_blocking(
        self: &Arc<Self>,
        name: &str,
        config_override: Option<ModelConfig>,
    ) -> Result<Vec<Arc<LoadedModel>>, ModelError> {
        let repo = &self.settings.repository;
        let mut config = match config_override {
            Some(c) => c,
            None => repository::read_config(repo, name)?,
        };
        if config.name.is_empty() {
            config.name = name.to_string();
        }
        let available = repository::available_versions(repo, name);
        let versions = repository::select_versions(config.version_policy.as_ref(), &available);
        if versions.is_empty() {
            return Err(ModelError::Repository {
                model: name.to_string(),
                reason: format!(
                    "no version to load (found versions {available:?} in the repository)"
                ),
            });
        }
        super::ignored::warn_ignored(name, &config);
        if crate::ensemble::is_ensemble(&config) {
            let load = |v| crate::ensemble::runner::load_ensemble(self, name, v, &config);
            return versions
                .into_iter()
                .map(|v| load(v).map(Arc::new))
                .collect();
        }
        versions
            .into_iter()
            .map(|v| self.load_version(name, v, &config).map(Arc::new))
            .collect()
    }

    fn load_version(
        &self,
        name: &str,
        version: i64,
        config: &ModelConfig,
    ) -> Result<LoadedModel, ModelError> {
        let fail = |reason: String| ModelError::Repository {
            model: name.to_string(),
            reason: format!("version {version}: {reason}"),
        };
        let path = repository::model_file(&self.settings.repository, name, version, config)?;
        let instances = instance_plan(config);
        let intra = (cpu_budget() / instances.len().max(1)).max(1);
        let plan_for = |kind: InstanceKind, device: i32, config: &ModelConfig| {
            SessionPlan::from_config(&path, config, kind, device, intra)
                .map_err(|e| fail(e.to_string()))
        };
        let (kind0, device0) = instances[0];
        let first = OrtExecutor::load(&plan_for(kind0, device0, config)?)
            .map_err(|e| fail(e.to_string()))?;
        let graph = first.signature().map_err(|e| fail(e.to_string()))?;
        let config = autocomplete::autocomplete(name, config.clone(), &graph)?;
        validate::validate(name, &config, &graph)?;
        let settings =
            SchedulerSettings::from_config(&config, self.settings.default_max_queue_size).map_err(
                |e| ModelError::InvalidConfig {
                    model: name.to_string(),
                    reason: e,
                },
            )?;
        let mut executors: Vec<Box<dyn ModelExecutor>> = vec![Box::new(first)];
        for spec in settings.instances.iter().skip(1) {
            let (kind, device) = match spec.kind {
                SchedInstanceKind::Cpu => (InstanceKind::Cpu, 0),
                SchedInstanceKind::Gpu(d) => (InstanceKind::Gpu, d),
            };
            let executor = OrtExecutor::load(&plan_for(kind, device, &config)?)
                .map_err(|e| fail(e.to_string()))?;
            executors.push(Box::new(executor));
        }
        let (inputs, outputs) = validate::io_specs(&config);
        // Before the scheduler exists: every instance warms up, and nothing reaches the statistics.
        let model_dir = self.settings.repository.join(name);
        warmup::plan(&model_dir, &config, &inputs, self.settings.auto_warmup)
            .and_then(|samples| warmup::run(name, &samples, &mut executors))
            .map_err(|e| fail(e.to_string()))?;
        let stats = Arc::new(ModelStats::new(name, &version.to_string()));
        let scheduler = Scheduler::start(settings, executors, Arc::clone(&stats));
        Ok(LoadedModel {
            name: name.to_string(),
            version,
            config,
            inputs,
            outputs,
            scheduler: scheduler.into(),
            stats,
        })
    }
}

/// (kind, device) of each instance the config asks for; one CPU instance when it names none. The
/// first entry decides the session used to read the graph signature.
fn instance_plan(config: &ModelConfig) -> Vec<(InstanceKind, i32)> {
    let mut plan = Vec::new();
    for group in &config.instance_group {
        let count = group.count.max(1) as usize;
        let kind = InstanceKind::try_from(group.kind).unwrap_or(InstanceKind::Cpu);
        for i in 0..count {
            match kind {
                InstanceKind::Gpu => {
                    let device = if group.gpus.is_empty() {
                        0
                    } else {
                        group.gpus[i % group.gpus.len()]
                    };
                    plan.push((InstanceKind::Gpu, device));
                }
                _ => plan.push((InstanceKind::Cpu, 0)),
            }
        }
    }
    if plan.is_empty() {
        plan.push((InstanceKind::Cpu, 0));
    }
    plan
}

/// Lets replaced versions go without refusing anyone. A request that looked a version up just
/// before the swap may not have reached its queue yet; shutting the scheduler now would answer it
/// UNAVAILABLE. Instead the last holder's drop closes the queue, the batcher runs what is queued
/// and the instance threads exit.
fn retire(old: BTreeMap<i64, Arc<LoadedModel>>) {
    drop(old);
}
