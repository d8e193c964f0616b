//! What serves a loaded model's requests: its own scheduler (an ONNX model) or the ensemble
//! executor. `LoadedModel::scheduler` holds one, so the request path calls `infer` either way.
use std::path::Path;
use std::sync::Arc;

use super::executor::EnsembleExecutor;
use super::planner::{self, StepModel};
use crate::model::manager::{LoadedModel, ModelManager};
use crate::model::{repository, ModelConfig, ModelError};
use crate::scheduler::{InferRequest, InferResponse, Scheduler, SchedulerError};
use crate::telemetry::stats::ModelStats;

pub enum ModelRunner {
    Scheduled(Scheduler),
    Ensemble(Arc<EnsembleExecutor>),
}

impl std::fmt::Debug for ModelRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModelRunner::Scheduled(s) => s.fmt(f),
            ModelRunner::Ensemble(_) => f.write_str("EnsembleExecutor"),
        }
    }
}

impl From<Scheduler> for ModelRunner {
    fn from(s: Scheduler) -> Self {
        ModelRunner::Scheduled(s)
    }
}

impl ModelRunner {
    /// Runs one request; see [`Scheduler::infer`] and [`EnsembleExecutor::infer`].
    pub async fn infer(&self, req: InferRequest) -> Result<InferResponse, SchedulerError> {
        match self {
            ModelRunner::Scheduled(s) => s.infer(req).await,
            ModelRunner::Ensemble(e) => e.infer(req).await,
        }
    }

    /// Finishes accepted work. An ensemble owns no queue: its steps live in the composing models.
    pub async fn shutdown(&self) {
        if let ModelRunner::Scheduled(s) = self {
            s.shutdown().await;
        }
    }

    /// The model's own scheduler; None for an ensemble (which queues nothing itself).
    pub fn scheduled(&self) -> Option<&Scheduler> {
        match self {
            ModelRunner::Scheduled(s) => Some(s),
            ModelRunner::Ensemble(_) => None,
        }
    }

    /// Why the model's instances stopped serving (see [`Scheduler::failure`]); an ensemble's own
    /// readiness follows its composing models instead.
    pub fn failure(&self) -> Option<String> {
        self.scheduled().and_then(Scheduler::failure)
    }

    pub fn ensemble(&self) -> Option<&EnsembleExecutor> {
        match self {
            ModelRunner::Ensemble(e) => Some(e),
            ModelRunner::Scheduled(_) => None,
        }
    }
}

/// Loads one version of an ensemble: checks its steps against the composing models loaded now.
pub fn load_ensemble(
    manager: &Arc<ModelManager>,
    name: &str,
    version: i64,
    config: &ModelConfig,
) -> Result<LoadedModel, ModelError> {
    let invalid = |reason: String| ModelError::InvalidConfig {
        model: name.to_string(),
        reason,
    };
    if config.name != name {
        return Err(invalid(format!(
            "config name '{}' does not match the model directory '{name}'",
            config.name
        )));
    }
    if config.max_batch_size < 0 {
        return Err(invalid("max_batch_size must not be negative".into()));
    }
    if !config.model_warmup.is_empty() {
        tracing::warn!(model = %name, "model_warmup ignored on an ensemble: its composing models warm up themselves");
    }
    let plan = planner::plan(config, |model, v| {
        let version = if v == -1 {
            String::new()
        } else {
            v.to_string()
        };
        let composing = manager
            .get(model, &version)
            .map_err(|e| format!("{e} (composing models must be loaded before the ensemble)"))?;
        Ok(StepModel {
            max_batch_size: composing.config.max_batch_size,
            inputs: composing.inputs.clone(),
            outputs: composing.outputs.clone(),
            is_ensemble: composing.scheduler.ensemble().is_some(),
        })
    })
    .map_err(|e| invalid(e.to_string()))?;
    let (inputs, outputs) = planner::ensemble_io(config).map_err(invalid)?;
    let executor = EnsembleExecutor::new(name, plan, Arc::downgrade(manager));
    Ok(LoadedModel {
        name: name.to_string(),
        version,
        config: config.clone(),
        inputs,
        outputs,
        scheduler: ModelRunner::Ensemble(Arc::new(executor)),
        stats: Arc::new(ModelStats::new(name, &version.to_string())),
        // Classification labels and sequences belong to the composing models.
        labels: Default::default(),
        sequence: None,
    })
}

/// `names` with the ensembles moved after every other model, so their composing models are
/// loaded when they are checked. Order is otherwise kept.
pub fn load_order(repository_dir: &Path, names: Vec<String>) -> Vec<String> {
    let (ensembles, models): (Vec<String>, Vec<String>) = names.into_iter().partition(|name| {
        repository::read_config(repository_dir, name)
            .map(|c| planner::is_ensemble(&c))
            .unwrap_or(false)
    });
    models.into_iter().chain(ensembles).collect()
}
