//! The set of loaded models: loading a model's versions from the repository (session per instance,
//! auto-complete, validation, scheduler), lookups for requests, the repository index, readiness.
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};

use super::bounds::{self, ConfigLimits};
use super::validate::TensorSpec;
use super::{autocomplete, instance_plan, repository, validate, warmup, ModelConfig, ModelError};
use crate::proto::model_instance_group::Kind as GroupKind;
use crate::runtime::{cpu_budget, OrtExecutor, SessionPlan};
use crate::scheduler::sequence::settings::SequenceSettings;
use crate::scheduler::sequence::{SequenceOnlyExecutor, SequenceScheduler};
use crate::scheduler::{InstanceKind, InstanceSpec, ModelExecutor, Scheduler, SchedulerSettings};
use crate::security::model_crypto::{decrypt_model_file, KeyRing, PlaintextModel};
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
    /// Class labels of outputs that name a `label_filename`, for the classification extension.
    pub labels: super::labels::OutputLabels,
    /// The sequence batcher of a model with `sequence_batching`: its requests go there, not to
    /// `scheduler` (which then only answers that they must carry sequence parameters).
    pub sequence: Option<Arc<SequenceScheduler>>,
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
    /// A version string that is not a number (Triton: INVALID_ARGUMENT, with this text).
    #[error("failed to get model version from specified version string '{0}' (details: stol), version should be an integral value > 0")]
    InvalidVersion(String),
    #[error("invalid model version specified '{0}' , version should be an integral value > 0")]
    NegativeVersion(String),
}

/// A request's version string as Triton reads it: an integer, not negative.
fn parse_version_string(version: &str) -> Result<i64, LookupError> {
    let number: i64 = version
        .trim()
        .parse()
        .map_err(|_| LookupError::InvalidVersion(version.to_string()))?;
    if number < 0 {
        return Err(LookupError::NegativeVersion(version.to_string()));
    }
    Ok(number)
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
    /// Bounds on config values (instances per model, ...), checked before a load builds anything.
    pub limits: ConfigLimits,
    /// A load still building after this long fails (`--model-load-timeout-secs`).
    pub load_timeout: Duration,
    /// Warm up models whose config lists no `model_warmup` over their batch sizes (`--model-auto-warmup`).
    pub auto_warmup: bool,
    /// Batching strategy of models whose config sets none (`--default-batching-strategy`).
    pub default_batching_strategy: crate::scheduler::BatchingStrategy,
    /// Batches of models whose recent batches took at most this long run on the request's task
    /// (`--inline-execution-max-microseconds`); None: always on an instance thread.
    pub inline_execution_max: Option<Duration>,
    /// See `SchedulerSettings::split_answers_from` (`--split-answers-min-microseconds`).
    pub split_answers_from: Option<Duration>,
    /// What a config may be completed with (`--disable-auto-complete-config`,
    /// `--backend-config=default-max-batch-size`).
    pub completion: autocomplete::Completion,
}

/// `--model-load-timeout-secs` when not set.
pub const DEFAULT_LOAD_TIMEOUT: Duration = Duration::from_secs(600);

impl Default for ManagerSettings {
    fn default() -> Self {
        Self {
            repository: PathBuf::new(),
            default_max_queue_size: crate::scheduler::DEFAULT_MAX_QUEUE,
            limits: ConfigLimits::default(),
            load_timeout: DEFAULT_LOAD_TIMEOUT,
            auto_warmup: false,
            default_batching_strategy: crate::scheduler::BatchingStrategy::Triton,
            inline_execution_max: None,
            split_answers_from: None,
            completion: autocomplete::Completion::default(),
        }
    }
}

/// Owns every loaded model. Cheap lookups for the request path (one read lock, an Arc clone).
///
/// Load, reload and unload of one model are serialized by that model's lifecycle lock, so an
/// unload cannot race a load (the load would resurrect the model) and two loads never build
/// sessions at once. The `models` lock is only ever held for map updates, never across file-system
/// work or session building.
pub struct ModelManager {
    settings: ManagerSettings,
    models: RwLock<BTreeMap<String, ModelSlot>>,
    /// Keys for encrypted model files (`--model-key-file`); empty unless given.
    model_keys: Arc<KeyRing>,
    /// One lifecycle lock per model name that has been loaded (names are validated and their
    /// directories exist, so the map is bounded by the repository).
    lifecycle: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Set by `shutdown`: loads stop building instances and install nothing.
    stopping: Arc<AtomicBool>,
}

impl ModelManager {
    pub fn new(settings: ManagerSettings) -> Self {
        Self {
            settings,
            models: RwLock::new(BTreeMap::new()),
            model_keys: Arc::new(KeyRing::default()),
            lifecycle: Mutex::new(HashMap::new()),
            stopping: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The keys that open encrypted model files.
    pub fn with_model_keys(mut self, keys: Arc<KeyRing>) -> Self {
        self.model_keys = keys;
        self
    }

    pub fn repository(&self) -> &Path {
        &self.settings.repository
    }

    /// Names of the models in the repository directory (read off the reactor).
    pub async fn repository_models(&self) -> Result<Vec<String>, ModelError> {
        let repo = self.settings.repository.clone();
        blocking(move || repository::list_models(&repo)).await?
    }

    /// Loads (or reloads) every selected version of `name`. On failure the model's previous versions
    /// keep serving and the failure is recorded for the index; the error is returned to the caller.
    /// Waits for any load or unload of the same model in progress; fails after the load timeout,
    /// and stops building instances when the server shuts down.
    pub async fn load(
        self: &Arc<Self>,
        name: &str,
        config_override: Option<ModelConfig>,
    ) -> Result<(), ModelError> {
        self.load_from(name, config_override, None).await
    }

    /// As `load`, reading the model from `source` (a repository root holding `name`) instead of the
    /// configured repository: the temporary directory of a `file:` override.
    pub async fn load_from(
        self: &Arc<Self>,
        name: &str,
        config_override: Option<ModelConfig>,
        source: Option<PathBuf>,
    ) -> Result<(), ModelError> {
        repository::validate_model_name(name)?;
        let source = source.unwrap_or_else(|| self.settings.repository.clone());
        let (repo, model) = (source.clone(), name.to_string());
        if !blocking(move || repository::model_dir_exists(&repo, &model)).await? {
            // Recorded nowhere: a misspelt load request must not leave a failed model behind that
            // holds strict readiness down.
            return Err(repository::not_found(name));
        }
        let lock = self
            .lifecycle_lock(name, true)
            .ok_or_else(|| cancelled(name))?;
        // Waiting behind another load of the model counts against this load's timeout too, so a
        // caller never waits unbounded behind a build that will not finish.
        let timeout = self.settings.load_timeout;
        let deadline = tokio::time::Instant::now()
            .checked_add(timeout)
            .ok_or_else(|| self.timed_out(name))?;
        let guard = tokio::time::timeout_at(deadline, lock.lock_owned())
            .await
            .map_err(|_| self.timed_out(name))?;
        self.refuse_when_stopping(name)?;
        self.models
            .write()
            .entry(name.to_string())
            .or_default()
            .loading = true;
        let started = Instant::now();
        let (result, guard) = self
            .build_with_timeout(name, source, config_override, guard, deadline)
            .await;
        let installed = self.install(name, result, started);
        // Released only now: an unload waiting for this load must find what it installed.
        drop(guard);
        installed
    }

    /// Builds the versions off the reactor, bounded by the load timeout. A load that times out is
    /// told to stop; it keeps the model's lifecycle lock until its current session is built, so the
    /// next load or unload of the model never overlaps it.
    async fn build_with_timeout(
        self: &Arc<Self>,
        name: &str,
        source: PathBuf,
        config_override: Option<ModelConfig>,
        guard: tokio::sync::OwnedMutexGuard<()>,
        deadline: tokio::time::Instant,
    ) -> (
        Result<Vec<Arc<LoadedModel>>, ModelError>,
        Option<tokio::sync::OwnedMutexGuard<()>>,
    ) {
        let cancel = LoadCancel {
            timed_out: Arc::new(AtomicBool::new(false)),
            stopping: Arc::clone(&self.stopping),
        };
        let this = Arc::clone(self);
        let model = name.to_string();
        let task_cancel = cancel.clone();
        let mut build = tokio::task::spawn_blocking(move || {
            this.load_versions_blocking(&source, &model, config_override, &task_cancel)
        });
        match tokio::time::timeout_at(deadline, &mut build).await {
            Ok(joined) => {
                let built = joined
                    .map_err(|e| ModelError::Repository {
                        model: name.to_string(),
                        reason: format!("load task failed: {e}"),
                    })
                    .and_then(|r| r);
                (built, Some(guard))
            }
            Err(_) => {
                cancel.timed_out.store(true, Ordering::Release);
                let model = name.to_string();
                tokio::spawn(async move {
                    // Whatever it built is dropped with its result.
                    let _ = build.await;
                    drop(guard);
                    tracing::info!(model = %model, "timed-out load stopped; nothing was installed");
                });
                (Err(self.timed_out(name)), None)
            }
        }
    }

    /// Swaps the built versions in (or records the failure). Nothing is installed once the server
    /// is shutting down: the drain has already taken the models it will finish.
    fn install(
        &self,
        name: &str,
        result: Result<Vec<Arc<LoadedModel>>, ModelError>,
        started: Instant,
    ) -> Result<(), ModelError> {
        let mut models = self.models.write();
        let result = match result {
            Ok(_) if self.stopping.load(Ordering::Acquire) => Err(cancelled(name)),
            other => other,
        };
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
    /// Waits for a load of the same model in progress, then unloads what it installed.
    pub async fn unload(&self, name: &str) -> Result<(), ModelError> {
        let not_loaded = || ModelError::NotFound {
            model: name.to_string(),
            reason: "model is not loaded".into(),
        };
        let lock = self.lifecycle_lock(name, false).ok_or_else(not_loaded)?;
        let _guard = lock.lock().await;
        let slot = self.models.write().remove(name);
        let slot = slot.ok_or_else(not_loaded)?;
        for model in slot.versions.into_values() {
            model.scheduler.shutdown().await;
            if let Some(sequence) = &model.sequence {
                sequence.shutdown().await;
            }
            tracing::info!(model = %name, version = model.version, "model unloaded");
        }
        Ok(())
    }

    /// Makes loads in progress stop before their next instance and install nothing, and refuses
    /// new loads. Serving models are untouched (see `shutdown`).
    pub fn stop_loading(&self) {
        self.stopping.store(true, Ordering::Release);
    }

    /// Finishes all accepted work of every model and stops their workers. Loads in progress stop
    /// building instances and install nothing.
    pub async fn shutdown(&self) {
        self.stop_loading();
        let slots = std::mem::take(&mut *self.models.write());
        for (_, slot) in slots {
            for model in slot.versions.into_values() {
                model.scheduler.shutdown().await;
            }
        }
    }

    /// The model's lifecycle lock; created only when `create` (a load of an existing directory)
    /// or when the model is known, so unknown names never grow the map. None once stopping.
    fn lifecycle_lock(&self, name: &str, create: bool) -> Option<Arc<tokio::sync::Mutex<()>>> {
        let mut locks = self.lifecycle.lock();
        if let Some(lock) = locks.get(name) {
            return Some(Arc::clone(lock));
        }
        if !create && !self.models.read().contains_key(name) {
            return None;
        }
        if create && self.stopping.load(Ordering::Acquire) {
            return None;
        }
        let lock = Arc::new(tokio::sync::Mutex::new(()));
        locks.insert(name.to_string(), Arc::clone(&lock));
        Some(lock)
    }

    fn timed_out(&self, name: &str) -> ModelError {
        ModelError::LoadTimedOut {
            model: name.to_string(),
            seconds: self.settings.load_timeout.as_secs(),
        }
    }

    fn refuse_when_stopping(&self, name: &str) -> Result<(), ModelError> {
        if self.stopping.load(Ordering::Acquire) {
            Err(cancelled(name))
        } else {
            Ok(())
        }
    }

    /// The model version a request names; an empty version means the latest ready one. A version
    /// whose instances have all failed is not ready, nor an ensemble while any of its composing
    /// models is not.
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
                .rev()
                .find(|m| m.scheduler.failure().is_none())
                .cloned()
                .ok_or_else(|| LookupError::NoReadyVersion(name.to_string()));
        }
        let number = parse_version_string(version)?;
        if let Some(model) = slot.versions.get(&number) {
            if model.scheduler.failure().is_some() {
                return Err(LookupError::VersionNotReady(
                    name.to_string(),
                    version.to_string(),
                ));
            }
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
        self.models.read().values().all(|s| {
            s.failures.is_empty()
                && (s.loading || !s.versions.is_empty())
                && s.versions.values().all(|m| m.scheduler.failure().is_none())
        })
    }

    /// Rows for RepositoryIndex: every model in the repository, loaded or not. The directory is
    /// read off the reactor, before the models lock is taken.
    pub async fn index(&self) -> Vec<IndexEntry> {
        let listed = self.repository_models().await.unwrap_or_default();
        let models = self.models.read();
        let mut names = listed;
        for name in models.keys() {
            if !names.contains(name) {
                names.push(name.clone());
            }
        }
        names.sort();
        let mut rows = Vec::new();
        for name in names {
            match models.get(&name) {
                Some(slot) => rows.extend(slot_rows(&name, slot)),
                None => rows.push(IndexEntry {
                    name,
                    version: String::new(),
                    state: ModelState::Unavailable,
                    reason: "unloaded".into(),
                }),
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
        repo: &Path,
        name: &str,
        config_override: Option<ModelConfig>,
        cancel: &LoadCancel,
    ) -> Result<Vec<Arc<LoadedModel>>, ModelError> {
        let mut config = match config_override {
            Some(c) => c,
            None if !self.settings.completion.from_graph && !repository::has_config(repo, name) => {
                return Err(ModelError::InvalidConfig {
                    model: name.to_string(),
                    reason: format!(
                        "no {} and auto-complete is off (--disable-auto-complete-config): the model needs a complete config",
                        repository::CONFIG_FILENAME
                    ),
                });
            }
            None => repository::read_config(repo, name)?,
        };
        if config.name.is_empty() {
            config.name = name.to_string();
        }
        // Before anything is built: an absurd count or delay fails here, with nothing allocated.
        bounds::check(name, &config, &self.settings.limits)?;
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
            .map(|v| {
                self.load_version(repo, name, v, &config, cancel)
                    .map(Arc::new)
            })
            .collect()
    }

    fn load_version(
        &self,
        repo: &Path,
        name: &str,
        version: i64,
        config: &ModelConfig,
        cancel: &LoadCancel,
    ) -> Result<LoadedModel, ModelError> {
        let fail = |reason: String| ModelError::Repository {
            model: name.to_string(),
            reason: format!("version {version}: {reason}"),
        };
        let path = repository::model_file(repo, name, version, config)?;
        // Decrypted once for all instances; wiped when the last session plan drops it below.
        let decrypted = self.decrypt_if_encrypted(&path, name, version)?;
        let invalid = |reason: String| ModelError::InvalidConfig {
            model: name.to_string(),
            reason,
        };
        let planned = instance_plan::plan(name, &config.instance_group).map_err(invalid)?;
        let intra = (cpu_budget() / planned.len().max(1)).max(1);
        let build = |spec: &InstanceSpec, config: &ModelConfig| {
            cancel.check(name)?;
            let (kind, device) = match spec.kind {
                InstanceKind::Cpu => (GroupKind::Cpu, 0),
                InstanceKind::Gpu(d) => (GroupKind::Gpu, d),
            };
            let plan = SessionPlan::from_config(&path, config, kind, device, intra)
                .map(|plan| plan.with_in_memory_graph(decrypted.clone()))
                .map_err(|e| fail(e.to_string()))?;
            OrtExecutor::load(&plan).map_err(|e| fail(e.to_string()))
        };
        // The first instance's session also tells the graph signature the config is completed from.
        let first = build(&planned[0], config)?;
        let graph = first.signature().map_err(|e| fail(e.to_string()))?;
        let config = autocomplete::autocomplete_with(
            name,
            config.clone(),
            &graph,
            self.settings.completion,
        )?;
        validate::validate(name, &config, &graph)?;
        bounds::check(name, &config, &self.settings.limits)?;
        let mut settings = SchedulerSettings::from_config_with_strategy(
            &without_sequence_batching(&config),
            self.settings.default_max_queue_size,
            self.settings.default_batching_strategy,
        )
        .map_err(invalid)?;
        settings.inline_below = self.settings.inline_execution_max;
        settings.split_answers_from = self.settings.split_answers_from;
        let mut config = config;
        crate::scheduler::settings::report_strategy(&mut config, &settings);
        // Completion only names groups (and adds one CPU group when there was none), so the plan
        // keeps its devices; the first session is rebuilt should that ever change.
        let mut executors: Vec<Box<dyn ModelExecutor>> =
            Vec::with_capacity(settings.instances.len());
        if settings.instances[0].kind == planned[0].kind {
            executors.push(Box::new(first));
        }
        for spec in &settings.instances[executors.len()..] {
            executors.push(Box::new(build(spec, &config)?));
        }
        let labels = super::labels::read_output_labels(&repo.join(name), &config)?;
        let (inputs, outputs) = validate::io_specs(&config);
        // Before the scheduler exists: every instance warms up, and nothing reaches the statistics.
        let model_dir = self.settings.repository.join(name);
        warmup::plan(&model_dir, &config, &inputs, self.settings.auto_warmup)
            .and_then(|samples| warmup::run(name, &samples, &mut executors))
            .map_err(|e| fail(e.to_string()))?;
        let stats = Arc::new(ModelStats::new(name, &version.to_string()));
        let (scheduler, sequence) = start_schedulers(
            &config,
            &graph,
            settings,
            executors,
            &stats,
            self.settings.default_max_queue_size,
        )?;
        Ok(LoadedModel {
            name: name.to_string(),
            version,
            config,
            inputs,
            outputs,
            scheduler: scheduler.into(),
            stats,
            labels,
            sequence,
        })
    }
}

impl ModelManager {
    /// The plaintext of an encrypted model file (held in memory only), or None for a plain file.
    fn decrypt_if_encrypted(
        &self,
        path: &Path,
        name: &str,
        version: i64,
    ) -> Result<Option<PlaintextModel>, ModelError> {
        if !repository::is_encrypted_model_file(path) {
            return Ok(None);
        }
        let fail = |reason: String| ModelError::Decryption {
            model: name.to_string(),
            reason: format!("version {version}: {}: {reason}", path.display()),
        };
        if self.model_keys.is_empty() {
            return Err(fail(
                "the model file is encrypted and no --model-key-file was given".into(),
            ));
        }
        decrypt_model_file(&self.model_keys, path, name, version)
            .map(Some)
            .map_err(|e| fail(e.to_string()))
    }
}

/// The dynamic batcher's settings read a sequence model as an unbatched one: its instances run
/// in the sequence batcher instead.
fn without_sequence_batching(config: &ModelConfig) -> ModelConfig {
    use crate::proto::model_config::SchedulingChoice;
    let mut config = config.clone();
    if matches!(
        config.scheduling_choice,
        Some(SchedulingChoice::SequenceBatching(_))
    ) {
        config.scheduling_choice = None;
    }
    config
}

/// The dynamic batcher over the instances, or, for a sequence model, the sequence batcher over
/// them beside a dynamic batcher that refuses what reaches it without sequence parameters.
fn start_schedulers(
    config: &ModelConfig,
    graph: &super::GraphSignature,
    settings: SchedulerSettings,
    executors: Vec<Box<dyn ModelExecutor>>,
    stats: &Arc<ModelStats>,
    max_queue: usize,
) -> Result<(Scheduler, Option<Arc<SequenceScheduler>>), ModelError> {
    let invalid = |reason: String| ModelError::InvalidConfig {
        model: config.name.clone(),
        reason,
    };
    let Some(sequence) =
        SequenceSettings::from_config(config, executors.len(), max_queue).map_err(invalid)?
    else {
        return Ok((
            Scheduler::start(settings, executors, Arc::clone(stats)),
            None,
        ));
    };
    sequence.check_against_graph(graph).map_err(invalid)?;
    let batcher = SequenceScheduler::start(sequence, executors, Arc::clone(stats))
        .map_err(|e| invalid(format!("cannot start the sequence batcher: {e}")))?;
    let refusing: Vec<Box<dyn ModelExecutor>> =
        vec![Box::new(SequenceOnlyExecutor::new(&config.name))];
    let scheduler = Scheduler::start(settings, refusing, Arc::clone(stats));
    Ok((scheduler, Some(Arc::new(batcher))))
}

/// Index rows of one known model: its ready (or failed) versions, failures, a load in progress.
fn slot_rows(name: &str, slot: &ModelSlot) -> Vec<IndexEntry> {
    let row = |version: String, state: ModelState, reason: String| IndexEntry {
        name: name.to_string(),
        version,
        state,
        reason,
    };
    let mut rows = Vec::new();
    for (version, model) in &slot.versions {
        match model.scheduler.failure() {
            None => rows.push(row(version.to_string(), ModelState::Ready, String::new())),
            Some(reason) => rows.push(row(version.to_string(), ModelState::Unavailable, reason)),
        }
    }
    for (version, reason) in &slot.failures {
        let version = version.map(|v| v.to_string()).unwrap_or_default();
        rows.push(row(version, ModelState::Unavailable, reason.clone()));
    }
    if slot.loading {
        rows.push(row(String::new(), ModelState::Loading, String::new()));
    }
    rows
}

/// Why a load must stop building: it timed out, or the server is shutting down.
#[derive(Clone)]
struct LoadCancel {
    timed_out: Arc<AtomicBool>,
    stopping: Arc<AtomicBool>,
}

impl LoadCancel {
    /// Checked before each session is built: a session build cannot be interrupted, so this is
    /// how soon a load notices.
    fn check(&self, name: &str) -> Result<(), ModelError> {
        if self.stopping.load(Ordering::Acquire) {
            return Err(cancelled(name));
        }
        if self.timed_out.load(Ordering::Acquire) {
            return Err(ModelError::LoadCancelled {
                model: name.to_string(),
                reason: "the load timed out".into(),
            });
        }
        Ok(())
    }
}

fn cancelled(name: &str) -> ModelError {
    ModelError::LoadCancelled {
        model: name.to_string(),
        reason: "the server is shutting down".into(),
    }
}

/// Runs file-system work on the blocking pool, never on a reactor thread.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ModelError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ModelError::Repository {
            model: String::new(),
            reason: format!("repository task failed: {e}"),
        })
}

/// Lets replaced versions go without refusing anyone. A request that looked a version up just
/// before the swap may not have reached its queue yet; shutting the scheduler now would answer it
/// UNAVAILABLE. Instead the last holder's drop closes the queue, the batcher runs what is queued
/// and the instance threads exit.
fn retire(old: BTreeMap<i64, Arc<LoadedModel>>) {
    drop(old);
}
