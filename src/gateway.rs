//! Wires the parts together: ONNX Runtime, listeners, model loading, the gRPC server with health and
//! reflection, and the drain on shutdown.
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::config::{Config, ModelControlMode};
use crate::model::autocomplete::Completion;
use crate::model::bounds::ConfigLimits;
use crate::model::manager::{ManagerSettings, ModelManager};
use crate::model::poll;
use crate::runtime::init_onnxruntime;
use crate::security;
use crate::server::admin::{serve_admin, AdminState};
use crate::server::budget::MemoryBudget;
use crate::server::grpc_server::{serve_grpc, GrpcListeners};
use crate::server::http::listener::HttpListener;
use crate::server::state::{Readiness, ServerState};
use crate::shm::ShmRegistry;
use crate::telemetry::metrics::GrpcMetrics;

mod reload;

/// A gateway whose listeners are bound (so their ports are known) but which is not serving yet.
pub struct Gateway {
    config: Config,
    /// None with --allow-grpc=false.
    grpc: Option<GrpcListeners>,
    admin: TcpListener,
    state: Arc<ServerState>,
    /// None with --allow-http=false.
    http: Option<HttpListener>,
}

impl Gateway {
    /// Loads ONNX Runtime and binds the listeners. Fails with one clear message if the library is
    /// missing or a port is taken.
    pub async fn bind(config: Config) -> anyhow::Result<Self> {
        let location = init_onnxruntime(config.runtime.onnxruntime_lib.as_deref())?;
        tracing::info!(library = ?location, "ONNX Runtime loaded");
        let access = security::setup::access_control(
            &config.security,
            config.grpc.auth.auth_token_file.as_deref(),
        )?;
        let grpc = match doors(&config)? {
            true => Some(GrpcListeners::bind(&config.grpc, &access).await?),
            false => None,
        };
        let admin_addr = SocketAddr::new(config.admin.metrics_address, config.admin.metrics_port);
        let admin = TcpListener::bind(admin_addr)
            .await
            .with_context(|| format!("cannot bind admin HTTP address {admin_addr}"))?;
        let models = Arc::new(
            ModelManager::new(ManagerSettings {
                repository: config.models.model_repository.clone(),
                default_max_queue_size: config.models.default_max_queue_size,
                limits: ConfigLimits {
                    max_instances_per_model: config
                        .models
                        .max_instances_per_model
                        .map_or_else(ConfigLimits::default_max_instances, |n| n as usize),
                },
                load_timeout: Duration::from_secs(config.models.model_load_timeout_secs),
                auto_warmup: config.models.model_auto_warmup,
                default_batching_strategy: config.models.default_batching_strategy,
                inline_execution_max: config
                    .models
                    .inline_execution_max(crate::runtime::cpu_budget()),
                split_answers_from: config.models.split_answers_from(),
                completion: Completion {
                    from_graph: config.models.auto_complete(),
                    default_max_batch_size: config
                        .models
                        .default_max_batch_size()
                        .map_err(anyhow::Error::msg)?,
                },
            })
            .with_model_keys(security::setup::model_keys(&config.security)?),
        );
        let readiness = Arc::new(Readiness::new(config.models.strict_readiness));
        let control_mode = config.models.model_control_mode;
        let shm = Arc::new(if config.shm.allow_client_shm {
            ShmRegistry::new()
        } else {
            ShmRegistry::disabled()
        });
        let grpc_metrics = Arc::new(GrpcMetrics::new());
        let budget = MemoryBudget::new(
            config.memory.inflight_bytes(),
            Arc::clone(&grpc_metrics.budget),
        );
        tracing::info!(
            max_inflight_bytes = budget.limit(),
            "memory budget for requests in flight"
        );
        let cache = crate::cache::parse_cache_config(&config.cache.cache_config)
            .map_err(anyhow::Error::msg)?
            .map(|settings| Arc::new(crate::cache::ResponseCache::new(settings)));
        let state = Arc::new(ServerState {
            models,
            readiness,
            control_mode,
            shm,
            grpc_metrics,
            http_metrics: Arc::new(crate::telemetry::metrics::HttpMetrics::new()),
            model_alias: config.http.model_alias.clone(),
            budget,
            access,
            server_name: config.identity.server_name.clone(),
            cache,
        });
        let http = match config.http.allow_http {
            true => Some(HttpListener::bind(&config.http).await?),
            false => None,
        };
        Ok(Self {
            config,
            grpc,
            admin,
            state,
            http,
        })
    }

    /// The gRPC TCP listener's address; None with --allow-grpc=false.
    pub fn grpc_addr(&self) -> Option<SocketAddr> {
        self.grpc.as_ref().and_then(|g| g.tcp_addr().ok())
    }

    /// The HTTP/REST listener's address; None with --allow-http=false.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().and_then(|h| h.local_addr().ok())
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// Serves until `shutdown` resolves, then drains. Models load while the server already answers
    /// liveness (readiness stays false until loading is done).
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Gateway {
            config,
            grpc,
            admin,
            state,
            http,
        } = self;
        match &grpc {
            Some(grpc) => tracing::info!(addr = %grpc.tcp_addr()?, "gRPC listening"),
            None => tracing::info!("gRPC off (--allow-grpc=false)"),
        }
        if let Some(http) = &http {
            tracing::info!(addr = %http.local_addr()?, "HTTP listening");
        }
        tracing::info!(addr = %admin.local_addr()?, "admin HTTP listening");
        let renewable_tls = (grpc.as_ref().and_then(|g| g.tls()))
            .into_iter()
            .chain(http.as_ref().and_then(|h| h.tls()));
        let reloads = reload::Reloads::new(&state.access, renewable_tls.collect());
        reloads.start(config.security.reload_poll_secs)?;

        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        // The admin server outlives the gRPC drain, so liveness and metrics answer until the end.
        let (admin_stop_tx, admin_stop_rx) = tokio::sync::watch::channel(false);
        let mut grpc_task = match grpc {
            Some(grpc) => tokio::spawn(serve_grpc(
                grpc,
                Arc::clone(&state),
                config.grpc.clone(),
                stop_rx.clone(),
            )),
            // Ends with the drain, as a server would, so the watch below never fires for it.
            None => {
                let mut stop = stop_rx.clone();
                tokio::spawn(async move {
                    let _ = stop.wait_for(|s| *s).await;
                    Ok(())
                })
            }
        };

        let http_task = match http {
            Some(http) => {
                let router = crate::server::http::router(http_state(&config, &state)?);
                tokio::spawn(http.serve(router, stop_rx.clone()))
            }
            None => tokio::spawn(async {}),
        };

        let admin_task = tokio::spawn(serve_admin(
            admin,
            admin_state(&state, config.admin.allow_metrics),
            {
                let mut stop = admin_stop_rx.clone();
                async move {
                    let _ = stop.wait_for(|s| *s).await;
                }
            },
        ));

        tokio::pin!(shutdown);
        let poll_baseline = poll_baseline(&config, &state).await;
        // A SIGTERM while models load must not wait for the loading to finish (Kubernetes may be
        // scaling down a pod that never became ready).
        let loaded = tokio::select! {
            result = load_models(&config, &state) => Some(result),
            _ = &mut shutdown => None,
        };
        let started = loaded.is_some();
        match loaded {
            Some(Err(e)) => {
                let _ = stop_tx.send(true);
                let _ = admin_stop_tx.send(true);
                let _ = grpc_task.await;
                let _ = http_task.await;
                let _ = admin_task.await;
                return Err(e);
            }
            Some(Ok(())) => {
                state.readiness.mark_started();
                tracing::info!(ready = state.is_ready(), "startup complete");
                if let Some(before) = poll_baseline {
                    let every = Duration::from_secs(config.models.repository_poll_secs.max(1));
                    let state = Arc::clone(&state);
                    tokio::spawn(poll_repository(state, every, stop_rx.clone(), before));
                }
                tokio::select! {
                    _ = &mut shutdown => {}
                    // Serving without gRPC would leave a live, ready process that answers nothing.
                    ended = &mut grpc_task => {
                        let error = match ended {
                            Ok(Err(e)) => e,
                            Ok(Ok(())) => anyhow::anyhow!("the gRPC server stopped by itself"),
                            Err(e) => anyhow::anyhow!("the gRPC server task failed: {e}"),
                        };
                        state.readiness.mark_stopping();
                        let _ = admin_stop_tx.send(true);
                        let _ = admin_task.await;
                        state.models.shutdown().await;
                        return Err(error.context("gRPC server"));
                    }
                }
            }
            None => tracing::info!("shutdown requested during startup"),
        }

        // Never ready means no load balancer is sending: no point in waiting for one to notice.
        let delay = if started {
            Duration::from_secs(config.lifecycle.drain_delay_secs)
        } else {
            Duration::ZERO
        };
        tracing::info!(
            drain_delay_secs = delay.as_secs(),
            "shutdown requested: readiness off, draining"
        );
        state.readiness.mark_draining();
        // Loads in progress stop building instances now, so neither the drain nor the exit waits
        // for a load that could take minutes.
        state.models.stop_loading();
        // Keep serving while load balancers notice the readiness change; then stop accepting.
        tokio::time::sleep(delay).await;
        let exit_timeout = Duration::from_secs(config.lifecycle.exit_timeout_secs);
        let drain = async {
            // Open inference streams finish what they took and end; listeners stop accepting.
            state.readiness.mark_stopping();
            let _ = stop_tx.send(true);
            let _ = grpc_task.await;
            let _ = http_task.await;
            state.models.shutdown().await;
        };
        if tokio::time::timeout(exit_timeout, drain).await.is_err() {
            tracing::warn!(
                seconds = exit_timeout.as_secs(),
                "exit timeout reached with work still in flight"
            );
        }
        // Mappings are released once no request holds them.
        let _ = state.shm.unregister_all();
        let _ = admin_stop_tx.send(true);
        let _ = admin_task.await;
        tracing::info!("shutdown complete");
        Ok(())
    }
}

/// Whether gRPC is served: Triton's `--allow-grpc`. Refuses a configuration that would answer
/// no inference at all, or a Unix socket with gRPC off.
fn doors(config: &Config) -> anyhow::Result<bool> {
    let grpc = config.grpc.allow_grpc;
    anyhow::ensure!(
        grpc || config.http.allow_http,
        "--allow-grpc=false and --allow-http=false: the server would serve no inference"
    );
    anyhow::ensure!(
        grpc || config.grpc.grpc_uds.is_none(),
        "--grpc-uds serves gRPC, which --allow-grpc=false turns off"
    );
    Ok(grpc)
}

fn admin_state(state: &Arc<ServerState>, allow_metrics: bool) -> AdminState {
    let (ready, metrics) = (Arc::clone(state), Arc::clone(state));
    let render_metrics = move || metrics.render_metrics();
    AdminState {
        live: Arc::new(|| true),
        ready: Arc::new(move || ready.is_ready()),
        render_metrics: allow_metrics.then(|| Arc::new(render_metrics) as Arc<_>),
    }
}

/// The HTTP door's share of the config: the same access control (in `state`) and health exemption
/// as gRPC.
fn http_state(
    config: &Config,
    state: &Arc<ServerState>,
) -> anyhow::Result<Arc<crate::server::http::HttpState>> {
    Ok(Arc::new(crate::server::http::HttpState {
        server: Arc::clone(state),
        exempt_health: config.grpc.auth.auth_exempt_health,
        max_body_bytes: config.http.http_max_body_bytes,
    }))
}

/// Binds per `config`, serves until `shutdown`, drains.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    Gateway::bind(config).await?.serve(shutdown).await
}

/// Startup loading per the model control mode: everything (none, poll) or the --load-model names
/// (explicit, `*` meaning all).
async fn load_models(config: &Config, state: &Arc<ServerState>) -> anyhow::Result<()> {
    let available = state.models.repository_models().await?;
    let names = match config.models.model_control_mode {
        ModelControlMode::Explicit if !config.models.load_models.iter().any(|m| m == "*") => {
            config.models.load_models.clone()
        }
        _ => available,
    };
    if names.is_empty() {
        tracing::warn!(repository = %config.models.model_repository.display(), "no models to load");
    }
    let names = crate::ensemble::runner::load_order(state.models.repository(), names);
    for name in names {
        let result = state.models.load(&name, None).await;
        state.readiness.notify();
        state
            .access
            .audit()
            .model_change("model_load", "startup", &name, &result);
        if let Err(e) = result {
            if config.models.exit_on_error {
                anyhow::bail!("failed to load model '{name}': {e}");
            }
        }
    }
    Ok(())
}

/// Poll mode: the repository as it was before the startup load read it, which the first poll
/// compares against. Taken before loading, not once serving starts: a model added while the
/// others loaded, or after readiness but before the poller's first scan, would otherwise be in
/// the baseline already and never be loaded.
async fn poll_baseline(config: &Config, state: &ServerState) -> Option<poll::Scan> {
    if config.models.model_control_mode != ModelControlMode::Poll {
        return None;
    }
    let names = state.models.repository_models().await.unwrap_or_default();
    Some(scan_off_reactor(state.models.repository(), names).await)
}

/// Poll mode: applies added, changed and removed models every --repository-poll-secs until stopped,
/// starting from the `before` scan.
async fn poll_repository(
    state: Arc<ServerState>,
    every: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
    mut before: poll::Scan,
) {
    let repo = state.models.repository().to_path_buf();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let names = match state.models.repository_models().await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "repository scan failed");
                continue;
            }
        };
        let after = scan_off_reactor(&repo, names).await;
        let changes = poll::diff(&before, &after);
        let to_load: Vec<String> = changes
            .added
            .iter()
            .chain(&changes.changed)
            .cloned()
            .collect();
        for name in &crate::ensemble::runner::load_order(&repo, to_load) {
            tracing::info!(model = %name, "repository change detected: loading");
            let result = state.models.load(name, None).await;
            state
                .access
                .audit()
                .model_change("model_load", "poll", name, &result);
        }
        for name in &changes.removed {
            tracing::info!(model = %name, "model removed from the repository: unloading");
            let result = state.models.unload(name).await;
            state
                .access
                .audit()
                .model_change("model_unload", "poll", name, &result);
        }
        state.readiness.notify();
        before = after;
    }
}

/// Fingerprints the repository on the blocking pool (it reads every model directory).
async fn scan_off_reactor(repo: &Path, names: Vec<String>) -> poll::Scan {
    let repo = repo.to_path_buf();
    tokio::task::spawn_blocking(move || poll::scan(&repo, &names))
        .await
        .unwrap_or_default()
}
