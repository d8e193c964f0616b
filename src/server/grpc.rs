//! The GRPCInferenceService: protocol messages in, engine calls, protocol messages out.
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use prost::Message;
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use super::auth::{authorize, may_see, Caller};
use super::trace_context::parent_context_from_headers;

use super::budget::Reservation;
use super::encode::{model_statistics, tensor_metadata};
use super::infer::{infer, infer_admitted};
use super::model_control::{load_failure, load_override, LoadOverride};
use super::state::ServerState;
use crate::config::ModelControlMode;
use crate::error::Error;
use crate::model::override_files::OverrideDir;
use crate::proto::grpc_inference_service_server::GrpcInferenceService;
use crate::proto::repository_index_response::ModelIndex;
use crate::proto::*;
use crate::security::{Access, AuditEvent};
use crate::tensor::names::bounded_text;

/// Requests one stream may have in flight; more wait for a slot, which pushes back on the client
/// through HTTP/2 flow control instead of growing memory.
const STREAM_IN_FLIGHT: usize = 64;

pub struct InferenceService {
    state: Arc<ServerState>,
}

impl InferenceService {
    pub fn new(state: Arc<ServerState>) -> Self {
        Self { state }
    }
}

/// Extension names (as Triton's) for what this server implements.
const EXTENSIONS: &[&str] = &[
    "model_repository",
    "model_configuration",
    "statistics",
    "schedule_policy",
    "parameters",
    "classification",
    "sequence",
];

type StreamResult = Result<ModelStreamInferResponse, Status>;

fn unimplemented(what: &str, issue: &str) -> Status {
    Status::unimplemented(format!(
        "{what} is not implemented by this server ({issue})"
    ))
}

#[tonic::async_trait]
impl GrpcInferenceService for InferenceService {
    async fn server_live(
        &self,
        _: Request<ServerLiveRequest>,
    ) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<ServerReadyRequest>,
    ) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse {
            ready: self.state.is_ready(),
        }))
    }

    async fn model_ready(
        &self,
        request: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        let name = self.allow_model(&request, &request.get_ref().name)?;
        let r = request.into_inner();
        let ready =
            !self.state.readiness.is_draining() && self.state.models.is_ready(&name, &r.version);
        Ok(Response::new(ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        let mut extensions: Vec<String> = EXTENSIONS.iter().map(|s| s.to_string()).collect();
        if self.state.shm.is_enabled() {
            extensions.push("system_shared_memory".into());
        }
        Ok(Response::new(ServerMetadataResponse {
            name: self.state.server_name.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions,
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        self.allow_model(&request, &request.get_ref().name)?;
        let r = request.into_inner();
        let model = self.lookup(&r.name, &r.version)?;
        let versions = self
            .state
            .models
            .loaded()
            .iter()
            .filter(|m| m.name == model.name)
            .map(|m| m.version.to_string())
            .collect();
        let mbs = model.max_batch_size();
        Ok(Response::new(ModelMetadataResponse {
            name: model.name.clone(),
            versions,
            platform: model.config.platform.clone(),
            inputs: model
                .inputs
                .iter()
                .map(|s| tensor_metadata(s, mbs))
                .collect(),
            outputs: model
                .outputs
                .iter()
                .map(|s| tensor_metadata(s, mbs))
                .collect(),
        }))
    }

    async fn model_infer(
        &self,
        request: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        self.allow_model(&request, &request.get_ref().model_name)?;
        let parent = parent_context_from_headers(request.metadata().as_ref());
        // The budget layer put the body's reservation here; without the layer (a test harness
        // serving the bare service) the request is still counted, from its decoded size.
        let reservation = match request.extensions().get::<Arc<Reservation>>() {
            Some(r) => Arc::clone(r),
            None => self.reserve_message(request.get_ref())?,
        };
        let response = infer(&self.state, request.into_inner(), &parent, reservation).await?;
        Ok(Response::new(response))
    }

    type ModelStreamInferStream = Pin<Box<dyn Stream<Item = StreamResult> + Send + 'static>>;

    /// Requests on one stream run concurrently (so they can share batches); each answer carries the
    /// request id. A failed request becomes `error_message` and the stream goes on.
    async fn model_stream_infer(
        &self,
        request: Request<Streaming<ModelInferRequest>>,
    ) -> Result<Response<Self::ModelStreamInferStream>, Status> {
        let parent = parent_context_from_headers(request.metadata().as_ref());
        // The layer resolved the token once for the stream; each message's model is checked below.
        let caller = request.extensions().get::<Caller>().cloned();
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel::<StreamResult>(STREAM_IN_FLIGHT);
        let state = Arc::clone(&self.state);
        tokio::spawn(async move {
            let slots = Arc::new(Semaphore::new(STREAM_IN_FLIGHT));
            let mut last_sequence_sent: Option<tokio::sync::oneshot::Receiver<()>> = None;
            loop {
                let message = tokio::select! {
                    message = inbound.next() => message,
                    // A stream would otherwise hold the drain open until the exit timeout cut it:
                    // requests already taken finish, then the stream ends so the client goes elsewhere.
                    _ = state.readiness.stopped() => {
                        let _ = slots.acquire_many(STREAM_IN_FLIGHT as u32).await;
                        let _ = tx.send(Err(Error::ShuttingDown.into())).await;
                        break;
                    }
                };
                let Some(message) = message else { break };
                let request = match message {
                    Ok(r) => r,
                    // A message that does not fit the memory budget cannot be skipped (its bytes
                    // were never read), nor one prost cannot decode (tonic's stream stops at a
                    // decoder error; the codec turns only its own refusals into answers): answers
                    // already taken finish, then the stream ends with that status.
                    Err(status)
                        if matches!(
                            status.code(),
                            tonic::Code::ResourceExhausted
                                | tonic::Code::InvalidArgument
                                | tonic::Code::Internal
                                | tonic::Code::OutOfRange
                        ) =>
                    {
                        let _ = slots.acquire_many(STREAM_IN_FLIGHT as u32).await;
                        let _ = tx.send(Err(status)).await;
                        break;
                    }
                    Err(status) => {
                        tracing::debug!(%status, "inference stream ended by the client");
                        break;
                    }
                };
                let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
                    break;
                };
                // The layer gave the message's wire bytes back once it arrived; this request
                // holds its own (decoded) size until its answer is queued for sending.
                let reservation = Arc::new(state.budget.reservation());
                if let Err(exceeded) = reservation.grow(request.encoded_len() as u64) {
                    let _ = tx
                        .send(Ok(stream_error(
                            &request,
                            Error::from(exceeded).to_string(),
                        )))
                        .await;
                    continue;
                }
                let (state, tx, parent) = (Arc::clone(&state), tx.clone(), parent.clone());
                let caller = caller.clone();
                // Requests of a sequence must reach the sequence batcher in stream order: wait
                // until each is queued before taking the next message.
                let (admitted_tx, admitted_rx) = tokio::sync::oneshot::channel();
                let in_order = request.parameters.contains_key("sequence_id");
                // ...and their answers leave in that order too (a sequence's requests finish in
                // order, but the tasks answering them may wake in any order).
                let (sent_tx, sent_rx) = tokio::sync::oneshot::channel::<()>();
                let previous_sent = if in_order {
                    last_sequence_sent.replace(sent_rx)
                } else {
                    None
                };
                tokio::spawn(async move {
                    let echo = ModelInferRequest {
                        model_name: request.model_name.clone(),
                        model_version: request.model_version.clone(),
                        id: request.id.clone(),
                        ..Default::default()
                    };
                    let allowed = stream_message_allowed(&state, caller.as_ref(), &echo.model_name);
                    let result = match allowed {
                        Ok(()) => {
                            infer_admitted(&state, request, &parent, reservation, Some(admitted_tx))
                                .await
                                .map_err(|e| e.to_string())
                        }
                        Err(refusal) => {
                            drop(admitted_tx);
                            Err(refusal)
                        }
                    };
                    let message = match result {
                        Ok(response) => ModelStreamInferResponse {
                            error_message: String::new(),
                            infer_response: Some(response),
                        },
                        Err(e) => stream_error(&echo, e),
                    };
                    if let Some(previous) = previous_sent {
                        let _ = previous.await;
                    }
                    let _ = tx.send(Ok(message)).await;
                    drop(sent_tx);
                    drop(permit);
                });
                if in_order {
                    let _ = admitted_rx.await;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn model_config(
        &self,
        request: Request<ModelConfigRequest>,
    ) -> Result<Response<ModelConfigResponse>, Status> {
        self.allow_model(&request, &request.get_ref().name)?;
        let r = request.into_inner();
        let model = self.lookup(&r.name, &r.version)?;
        Ok(Response::new(ModelConfigResponse {
            config: Some(model.config.clone()),
        }))
    }

    async fn model_statistics(
        &self,
        request: Request<ModelStatisticsRequest>,
    ) -> Result<Response<ModelStatisticsResponse>, Status> {
        let name = match request.get_ref().name.as_str() {
            "" => String::new(),
            name => self.allow_model(&request, name)?,
        };
        let mut visible = self.state.models.loaded();
        visible.retain(|m| may_see(&request, &m.name));
        let r = request.into_inner();
        let models = if name.is_empty() {
            visible
        } else if r.version.is_empty() {
            self.state.models.get(&name, "").map_err(Error::from)?;
            self.state
                .models
                .loaded()
                .into_iter()
                .filter(|m| m.name == name)
                .collect()
        } else {
            vec![self.lookup(&name, &r.version)?]
        };
        Ok(Response::new(ModelStatisticsResponse {
            model_stats: models.iter().map(model_statistics).collect(),
        }))
    }

    async fn repository_index(
        &self,
        request: Request<RepositoryIndexRequest>,
    ) -> Result<Response<RepositoryIndexResponse>, Status> {
        let models = self
            .state
            .models
            .index()
            .await
            .into_iter()
            .filter(|e| may_see(&request, &e.name))
            .filter(|e| {
                !request.get_ref().ready || e.state == crate::model::manager::ModelState::Ready
            })
            .map(|e| ModelIndex {
                name: e.name,
                version: e.version,
                state: e.state.as_str().to_string(),
                reason: e.reason,
            })
            .collect();
        Ok(Response::new(RepositoryIndexResponse { models }))
    }

    async fn repository_model_load(
        &self,
        request: Request<RepositoryModelLoadRequest>,
    ) -> Result<Response<RepositoryModelLoadResponse>, Status> {
        self.allow(&request, Access::Admin)?;
        self.require_explicit_control()?;
        let caller = request.extensions().get::<Caller>().cloned();
        let r = request.into_inner();
        let name = &r.model_name;
        let LoadOverride { config, files } = load_override(&r)?;
        let result = if files.is_empty() {
            self.state.models.load(name, config).await
        } else {
            // The directory lives until the load has finished: the sessions hold what they read.
            let dir = OverrideDir::create(name, &files).map_err(|e| {
                Status::internal(format!(
                    "failed to load '{name}', failed to poll from model repository: {e}"
                ))
            })?;
            let source = dir.root().to_path_buf();
            self.state
                .models
                .load_from(name, config, Some(source))
                .await
        };
        self.state.readiness.notify();
        let line = audit_line(caller.as_ref(), "model_load", &result).model(name);
        self.state.access.audit().record(line);
        result.map_err(|e| load_failure(name, e))?;
        Ok(Response::new(RepositoryModelLoadResponse {}))
    }

    async fn repository_model_unload(
        &self,
        request: Request<RepositoryModelUnloadRequest>,
    ) -> Result<Response<RepositoryModelUnloadResponse>, Status> {
        self.allow(&request, Access::Admin)?;
        self.require_explicit_control()?;
        let caller = request.extensions().get::<Caller>().cloned();
        let r = request.into_inner();
        crate::model::repository::validate_model_name(&r.model_name).map_err(Error::from)?;
        let result = self.state.models.unload(&r.model_name).await;
        let line = audit_line(caller.as_ref(), "model_unload", &result).model(&r.model_name);
        self.state.access.audit().record(line);
        result.map_err(Error::from)?;
        self.state.readiness.notify();
        Ok(Response::new(RepositoryModelUnloadResponse {}))
    }

    async fn system_shared_memory_status(
        &self,
        request: Request<SystemSharedMemoryStatusRequest>,
    ) -> Result<Response<SystemSharedMemoryStatusResponse>, Status> {
        self.allow(&request, Access::Admin)?;
        let r = request.into_inner();
        let name = (!r.name.is_empty()).then_some(r.name.as_str());
        let regions = self.state.shm.status(name).map_err(shm_status)?;
        let regions = regions
            .into_iter()
            .map(|s| {
                let status = system_shared_memory_status_response::RegionStatus {
                    name: s.name.clone(),
                    key: s.key,
                    offset: s.offset,
                    byte_size: s.byte_size,
                };
                (s.name, status)
            })
            .collect();
        Ok(Response::new(SystemSharedMemoryStatusResponse { regions }))
    }

    async fn system_shared_memory_register(
        &self,
        request: Request<SystemSharedMemoryRegisterRequest>,
    ) -> Result<Response<SystemSharedMemoryRegisterResponse>, Status> {
        self.allow(&request, Access::Admin)?;
        let caller = request.extensions().get::<Caller>().cloned();
        let r = request.into_inner();
        let result = self
            .state
            .shm
            .register(&r.name, &r.key, r.offset, r.byte_size);
        let line = audit_line(caller.as_ref(), "shm_register", &result).region(&r.name);
        self.state.access.audit().record(line);
        result.map_err(shm_status)?;
        tracing::debug!(region = %r.name, key = %r.key, bytes = r.byte_size, "shared memory region registered");
        Ok(Response::new(SystemSharedMemoryRegisterResponse {}))
    }

    async fn system_shared_memory_unregister(
        &self,
        request: Request<SystemSharedMemoryUnregisterRequest>,
    ) -> Result<Response<SystemSharedMemoryUnregisterResponse>, Status> {
        self.allow(&request, Access::Admin)?;
        let caller = request.extensions().get::<Caller>().cloned();
        let r = request.into_inner();
        let result = if r.name.is_empty() {
            self.state.shm.unregister_all()
        } else {
            self.state.shm.unregister(&r.name)
        };
        let line = audit_line(caller.as_ref(), "shm_unregister", &result).region(&r.name);
        self.state.access.audit().record(line);
        result.map_err(shm_status)?;
        Ok(Response::new(SystemSharedMemoryUnregisterResponse {}))
    }

    /// No CUDA region can ever be registered here, so status lists none (or names the one asked
    /// for as unknown), exactly as a CPU-only Triton answers.
    async fn cuda_shared_memory_status(
        &self,
        request: Request<CudaSharedMemoryStatusRequest>,
    ) -> Result<Response<CudaSharedMemoryStatusResponse>, Status> {
        self.allow(&request, Access::Admin)?;
        let r = request.into_inner();
        super::cuda_shm::status(&r.name, &self.state.shm)?;
        Ok(Response::new(CudaSharedMemoryStatusResponse::default()))
    }

    async fn cuda_shared_memory_register(
        &self,
        request: Request<CudaSharedMemoryRegisterRequest>,
    ) -> Result<Response<CudaSharedMemoryRegisterResponse>, Status> {
        self.allow(&request, Access::Admin)?;
        Err(super::cuda_shm::register_refused(
            &request.into_inner().name,
        ))
    }

    /// Unregistering over no CUDA regions is a no-op that succeeds, as on a CPU-only Triton: the
    /// shared-memory examples call it before they start.
    async fn cuda_shared_memory_unregister(
        &self,
        request: Request<CudaSharedMemoryUnregisterRequest>,
    ) -> Result<Response<CudaSharedMemoryUnregisterResponse>, Status> {
        self.allow(&request, Access::Admin)?;
        Ok(Response::new(CudaSharedMemoryUnregisterResponse {}))
    }

    async fn trace_setting(
        &self,
        request: Request<TraceSettingRequest>,
    ) -> Result<Response<TraceSettingResponse>, Status> {
        self.allow(&request, Access::Admin)?;
        Err(unimplemented(
            "TraceSetting",
            "tracing is configured with OTEL_* variables and --trace-* flags at startup",
        ))
    }

    async fn log_settings(
        &self,
        request: Request<LogSettingsRequest>,
    ) -> Result<Response<LogSettingsResponse>, Status> {
        self.allow(&request, Access::Admin)?;
        Err(unimplemented(
            "LogSettings",
            "logging is configured with RUST_LOG / --log-verbose at startup",
        ))
    }
}

/// A failed stream request: the error text (bounded) and the request's identity, so the client can
/// match it.
fn stream_error(request: &ModelInferRequest, error: String) -> ModelStreamInferResponse {
    ModelStreamInferResponse {
        error_message: bounded_text(error),
        infer_response: Some(ModelInferResponse {
            model_name: bounded_text(request.model_name.clone()),
            model_version: bounded_text(request.model_version.clone()),
            id: bounded_text(request.id.clone()),
            ..Default::default()
        }),
    }
}

impl InferenceService {
    /// A reservation of a decoded message's size, for calls that did not pass the budget layer.
    fn reserve_message(&self, request: &ModelInferRequest) -> Result<Arc<Reservation>, Status> {
        let reservation = Arc::new(self.state.budget.reservation());
        reservation
            .grow(request.encoded_len() as u64)
            .map_err(|e| Status::from(Error::from(e)))?;
        Ok(reservation)
    }

    /// The model version a request names, or the status Triton gives for it.
    fn lookup(
        &self,
        name: &str,
        version: &str,
    ) -> Result<Arc<crate::model::manager::LoadedModel>, Status> {
        let name = self.state.resolve_model_name(name);
        Ok(self.state.models.get(&name, version).map_err(Error::from)?)
    }

    /// The per-model check: `name` with `--model-alias` resolved (as the HTTP door resolves it),
    /// authorized for the caller, so a policy names models by their repository names on both doors.
    fn allow_model<T>(&self, request: &Request<T>, name: &str) -> Result<String, Status> {
        let name = self.state.resolve_model_name(name).into_owned();
        self.allow(request, Access::Model(&name))?;
        Ok(name)
    }

    /// The per-call authorization check (the layer already authenticated the token).
    fn allow<T>(&self, request: &Request<T>, access: Access<'_>) -> Result<(), Status> {
        authorize(&self.state.access, request, access)
    }

    fn require_explicit_control(&self) -> Result<(), Status> {
        match self.state.control_mode {
            ModelControlMode::Explicit => Ok(()),
            mode => Err(Status::unavailable(format!(
                "explicit model load / unload is not allowed in model control mode {mode:?}; start the server with --model-control-mode=explicit"
            ))),
        }
    }
}

/// Shared-memory registry errors as Triton reports them (ALREADY_EXISTS, NOT_FOUND, ...).
fn shm_status(e: crate::shm::ShmError) -> Status {
    use crate::shm::ShmErrorKind as K;
    let code = match e.kind() {
        K::NotFound => tonic::Code::NotFound,
        K::AlreadyExists => tonic::Code::AlreadyExists,
        K::InvalidArgument => tonic::Code::InvalidArgument,
        K::Internal => tonic::Code::Internal,
        K::Unavailable => tonic::Code::Unavailable,
    };
    // Region names come from clients.
    Status::new(code, bounded_text(e.to_string()))
}

/// An audit line for an action `caller` asked for, with its outcome.
fn audit_line<E: std::fmt::Display>(
    caller: Option<&Caller>,
    event: &'static str,
    result: &Result<(), E>,
) -> AuditEvent {
    let rpc = caller.map_or("", |c| &*c.rpc);
    let outcome = if result.is_ok() { "ok" } else { "failed" };
    let mut line = AuditEvent::new(event, rpc, outcome).caller(
        caller.map(|c| &*c.principal.name),
        caller.and_then(|c| c.peer.as_deref()),
    );
    line.reason = result.as_ref().err().map(|e| e.to_string());
    line
}

/// The per-message check of ModelStreamInfer: the refusal text becomes that message's
/// `error_message`, and the stream goes on.
fn stream_message_allowed(
    state: &ServerState,
    caller: Option<&Caller>,
    model: &str,
) -> Result<(), String> {
    match caller {
        Some(caller) => {
            let call = caller.context();
            // Resolved again per message: a policy reload applies to streams already open.
            let principal = state.access.principal_of(caller.credential.as_ref(), &call);
            let model = state.resolve_model_name(model);
            principal
                .and_then(|p| state.access.authorize(&p, Access::Model(&model), &call))
                .map_err(|e| e.to_string())
        }
        None if !state.access.is_enabled() => Ok(()),
        None => Err(crate::security::AuthError::Unauthenticated.to_string()),
    }
}
