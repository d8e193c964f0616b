//! What the transport shares: the models, and the readiness latch that health, ServerReady and
//! /v2/health/ready all read.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::watch;

use crate::config::ModelControlMode;
use crate::model::manager::ModelManager;
use crate::shm::ShmRegistry;
use crate::telemetry::metrics::GrpcMetrics;

/// Liveness and readiness of the whole server. Ready only after startup loading finished, never while
/// draining, and (with strict readiness) only while every model is ready.
pub struct Readiness {
    startup_done: AtomicBool,
    draining: AtomicBool,
    /// The drain delay is over: listeners stop accepting and open streams stop taking requests.
    stopping: AtomicBool,
    strict: bool,
    changed: watch::Sender<()>,
}

impl Readiness {
    pub fn new(strict: bool) -> Self {
        Self {
            startup_done: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            strict,
            changed: watch::channel(()).0,
        }
    }

    pub fn mark_started(&self) {
        self.startup_done.store(true, Ordering::SeqCst);
        self.changed.send_replace(());
    }

    /// Turns readiness off for good: the drain has begun.
    pub fn mark_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.changed.send_replace(());
    }

    /// The drain delay is over: nothing new is accepted, not even on streams already open.
    pub fn mark_stopping(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.stopping.store(true, Ordering::SeqCst);
        self.changed.send_replace(());
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Resolves once `mark_stopping` has been called.
    pub async fn stopped(&self) {
        let mut changes = self.changed.subscribe();
        // Subscribing first means a mark between the check and the wait is still seen.
        while !self.is_stopping() {
            if changes.changed().await.is_err() {
                return;
            }
        }
    }

    /// Tells watchers (gRPC health) to re-evaluate, e.g. after a model load or unload.
    pub fn notify(&self) {
        self.changed.send_replace(());
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    pub fn is_ready(&self, models: &ModelManager) -> bool {
        self.startup_done.load(Ordering::SeqCst)
            && !self.is_draining()
            && (!self.strict || models.all_ready())
    }

    pub fn subscribe(&self) -> watch::Receiver<()> {
        self.changed.subscribe()
    }
}

/// Shared by every RPC handler.
pub struct ServerState {
    pub models: Arc<ModelManager>,
    pub readiness: Arc<Readiness>,
    /// Repository-control RPCs are refused unless this is explicit.
    pub control_mode: ModelControlMode,
    /// Client system shared-memory regions (disabled unless --allow-client-shm).
    pub shm: Arc<ShmRegistry>,
    /// Calls by gRPC method and status code, for /metrics.
    pub grpc_metrics: Arc<GrpcMetrics>,
    /// Requests by HTTP route and status, for /metrics.
    pub http_metrics: Arc<crate::telemetry::metrics::HttpMetrics>,
    /// `--model-alias`: another name for the only model (KServe's InferenceService name).
    pub model_alias: Option<String>,
    /// The memory budget every request's bytes are held against.
    pub budget: Arc<crate::server::budget::MemoryBudget>,
    /// Who may call what (--auth-token-file, --auth-policy-file), and the audit log.
    pub access: Arc<crate::security::AccessControl>,
    /// What ServerMetadata calls this server (`--server-name`).
    pub server_name: String,
    /// The response cache (`--cache-config`); None when not configured.
    pub cache: Option<Arc<crate::cache::ResponseCache>>,
}

impl ServerState {
    pub fn is_ready(&self) -> bool {
        self.readiness.is_ready(&self.models)
    }

    /// The whole Prometheus scrape, from the same statistics ModelStatistics reads.
    pub fn render_metrics(&self) -> String {
        let stats: Vec<_> = self
            .models
            .loaded()
            .iter()
            .map(|m| Arc::clone(&m.stats))
            .collect();
        let mut text = crate::telemetry::metrics::render(&stats, &self.grpc_metrics);
        text.push_str(&self.http_metrics.render());
        if let Some(cache) = &self.cache {
            let snapshot = cache.snapshot();
            text.push_str(&crate::telemetry::metrics::render_cache(
                &stats,
                snapshot.entries,
                snapshot.evictions,
                snapshot.utilization(),
            ));
        }
        text
    }
}
