//! The GRPCInferenceService: protocol messages in, engine calls, protocol messages out.
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures::Stream;
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::trace_context::parent_context_from_headers;

use super::decode::{decode_request, DecodedRequest};
use super::encode::{infer_response, model_statistics, tensor_metadata};
use super::state::ServerState;
use crate::config::ModelControlMode;
use crate::error::Error;
use crate::proto::grpc_inference_service_server::GrpcInferenceService;
use crate::proto::repository_index_response::ModelIndex;
use crate::proto::*;
use crate::scheduler::SchedulerError;
use crate::telemetry::stats::FailureReason;

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
];

type StreamResult = Result<ModelStreamInferResponse, Status>;

/// Runs one inference end to end. Shared by ModelInfer and ModelStreamInfer.
async fn infer(
    state: &ServerState,
    request: ModelInferRequest,
    trace_parent: &opentelemetry::Context,
) -> Result<ModelInferResponse, Error> {
    let arrived = Instant::now();
    let model = state
        .models
        .get(&request.model_name, &request.model_version)?;
    let id = request.id.clone();
    let span = tracing::info_span!("infer", request_id = %id, model = %model.name, version = model.version);
    // Continue the caller's trace when it sent a W3C traceparent.
    let _ = span.set_parent(trace_parent.clone());
    async {
        let DecodedRequest {
            request: decoded,
            shm_outputs,
        } = match decode_request(request, &model, &state.shm) {
            Ok(d) => d,
            Err(e) => {
                model
                    .stats
                    .record_failure(arrived.elapsed(), FailureReason::Rejected);
                tracing::debug!(error = %e, "request rejected");
                return Err(Error::from(e));
            }
        };
        let rows = if model.max_batch_size() > 0 {
            decoded
                .inputs
                .first()
                .map(|t| t.tensor.batch_rows())
                .unwrap_or(1)
        } else {
            1
        };
        let cache = state.cache.as_deref();
        let outcome =
            crate::cache::lookup_or_run(cache, &model, decoded, |r| model.scheduler.infer(r)).await;
        match outcome {
            Ok(response) => {
                model
                    .stats
                    .record_success(arrived.elapsed(), rows, &response.timings);
                Ok(infer_response(&model, id, response, &shm_outputs)?)
            }
            Err(e) => {
                let reason = match e {
                    SchedulerError::QueueFull | SchedulerError::InvalidRequest(_) => {
                        FailureReason::Rejected
                    }
                    SchedulerError::TimedOut | SchedulerError::Cancelled => FailureReason::Canceled,
                    SchedulerError::Execute(_) => FailureReason::Backend,
                    SchedulerError::ShuttingDown => FailureReason::Other,
                };
                model.stats.record_failure(arrived.elapsed(), reason);
                tracing::debug!(error = %e, "inference failed");
                Err(Error::from(e))
            }
        }
    }
    .instrument(span)
    .await
}

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
        let r = request.into_inner();
        let ready =
            !self.state.readiness.is_draining() && self.state.models.is_ready(&r.name, &r.version);
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
            name: "onnx-gateway".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions,
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
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
        let parent = parent_context_from_headers(request.metadata().as_ref());
        let response = infer(&self.state, request.into_inner(), &parent).await?;
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
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel::<StreamResult>(STREAM_IN_FLIGHT);
        let state = Arc::clone(&self.state);
        tokio::spawn(async move {
            let slots = Arc::new(Semaphore::new(STREAM_IN_FLIGHT));
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
                    Err(status) => {
                        tracing::debug!(%status, "inference stream ended by the client");
                        break;
                    }
                };
                let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
                    break;
                };
                let (state, tx, parent) = (Arc::clone(&state), tx.clone(), parent.clone());
                tokio::spawn(async move {
                    let id = request.id.clone();
                    let (name, version) =
                        (request.model_name.clone(), request.model_version.clone());
                    let message = match infer(&state, request, &parent).await {
                        Ok(response) => ModelStreamInferResponse {
                            error_message: String::new(),
                            infer_response: Some(response),
                        },
                        Err(e) => ModelStreamInferResponse {
                            error_message: e.to_string(),
                            infer_response: Some(ModelInferResponse {
                                model_name: name,
                                model_version: version,
                                id,
                                ..Default::default()
                            }),
                        },
                    };
                    let _ = tx.send(Ok(message)).await;
                    drop(permit);
                });
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn model_config(
        &self,
        request: Request<ModelConfigRequest>,
    ) -> Result<Response<ModelConfigResponse>, Status> {
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
        let r = request.into_inner();
        let models = if r.name.is_empty() {
            self.state.models.loaded()
        } else if r.version.is_empty() {
            self.state.models.get(&r.name, "").map_err(Error::from)?;
            self.state
                .models
                .loaded()
                .into_iter()
                .filter(|m| m.name == r.name)
                .collect()
        } else {
            vec![self.lookup(&r.name, &r.version)?]
        };
        Ok(Response::new(ModelStatisticsResponse {
            model_stats: models.iter().map(model_statistics).collect(),
        }))
    }

    async fn repository_index(
        &self,
        request: Request<RepositoryIndexRequest>,
    ) -> Result<Response<RepositoryIndexResponse>, Status> {
        let r = request.into_inner();
        let models = self
            .state
            .models
            .index()
            .into_iter()
            .filter(|e| !r.ready || e.state == crate::model::manager::ModelState::Ready)
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
        self.require_explicit_control()?;
        let r = request.into_inner();
        let config = config_override(&r)?;
        self.state
            .models
            .load(&r.model_name, config)
            .await
            .map_err(Error::from)?;
        self.state.readiness.notify();
        Ok(Response::new(RepositoryModelLoadResponse {}))
    }

    async fn repository_model_unload(
        &self,
        request: Request<RepositoryModelUnloadRequest>,
    ) -> Result<Response<RepositoryModelUnloadResponse>, Status> {
        self.require_explicit_control()?;
        let r = request.into_inner();
        crate::model::repository::validate_model_name(&r.model_name).map_err(Error::from)?;
        self.state
            .models
            .unload(&r.model_name)
            .await
            .map_err(Error::from)?;
        self.state.readiness.notify();
        Ok(Response::new(RepositoryModelUnloadResponse {}))
    }

    async fn system_shared_memory_status(
        &self,
        request: Request<SystemSharedMemoryStatusRequest>,
    ) -> Result<Response<SystemSharedMemoryStatusResponse>, Status> {
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
        let r = request.into_inner();
        self.state
            .shm
            .register(&r.name, &r.key, r.offset, r.byte_size)
            .map_err(shm_status)?;
        tracing::debug!(region = %r.name, key = %r.key, bytes = r.byte_size, "shared memory region registered");
        Ok(Response::new(SystemSharedMemoryRegisterResponse {}))
    }

    async fn system_shared_memory_unregister(
        &self,
        request: Request<SystemSharedMemoryUnregisterRequest>,
    ) -> Result<Response<SystemSharedMemoryUnregisterResponse>, Status> {
        let r = request.into_inner();
        if r.name.is_empty() {
            self.state.shm.unregister_all().map_err(shm_status)?;
        } else {
            self.state.shm.unregister(&r.name).map_err(shm_status)?;
        }
        Ok(Response::new(SystemSharedMemoryUnregisterResponse {}))
    }

    async fn cuda_shared_memory_status(
        &self,
        _: Request<CudaSharedMemoryStatusRequest>,
    ) -> Result<Response<CudaSharedMemoryStatusResponse>, Status> {
        Err(cuda_shm_unimplemented())
    }

    async fn cuda_shared_memory_register(
        &self,
        _: Request<CudaSharedMemoryRegisterRequest>,
    ) -> Result<Response<CudaSharedMemoryRegisterResponse>, Status> {
        Err(cuda_shm_unimplemented())
    }

    async fn cuda_shared_memory_unregister(
        &self,
        _: Request<CudaSharedMemoryUnregisterRequest>,
    ) -> Result<Response<CudaSharedMemoryUnregisterResponse>, Status> {
        Err(cuda_shm_unimplemented())
    }

    async fn trace_setting(
        &self,
        _: Request<TraceSettingRequest>,
    ) -> Result<Response<TraceSettingResponse>, Status> {
        Err(unimplemented(
            "TraceSetting",
            "tracing is configured with OTEL_* variables and --trace-* flags at startup",
        ))
    }

    async fn log_settings(
        &self,
        _: Request<LogSettingsRequest>,
    ) -> Result<Response<LogSettingsResponse>, Status> {
        Err(unimplemented(
            "LogSettings",
            "logging is configured with RUST_LOG / --log-verbose at startup",
        ))
    }
}

impl InferenceService {
    /// The model version a request names, or the status Triton gives for it.
    fn lookup(
        &self,
        name: &str,
        version: &str,
    ) -> Result<Arc<crate::model::manager::LoadedModel>, Status> {
        Ok(self.state.models.get(name, version).map_err(Error::from)?)
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

/// Triton's `config` load parameter: a JSON ModelConfig that replaces config.pbtxt for this load.
fn config_override(
    r: &RepositoryModelLoadRequest,
) -> Result<Option<crate::model::ModelConfig>, Status> {
    use crate::proto::model_repository_parameter::ParameterChoice;
    for key in r.parameters.keys() {
        if key.starts_with("file:") {
            return Err(Status::invalid_argument(format!(
                "load parameter '{key}': model file overrides are not supported; place the file in the repository"
            )));
        }
        if key != "config" {
            return Err(Status::invalid_argument(format!(
                "unknown load parameter '{key}'"
            )));
        }
    }
    match r
        .parameters
        .get("config")
        .and_then(|p| p.parameter_choice.as_ref())
    {
        None => Ok(None),
        Some(ParameterChoice::StringParam(json)) => {
            crate::model::config_json::parse_config_json(&r.model_name, json)
                .map(Some)
                .map_err(|e| Status::invalid_argument(e.to_string()))
        }
        Some(_) => Err(Status::invalid_argument(
            "load parameter 'config' must be a string holding JSON",
        )),
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
    Status::new(code, e.to_string())
}

fn cuda_shm_unimplemented() -> Status {
    Status::unimplemented(
        "CUDA shared memory is not supported by this server; use system shared memory or inline tensors",
    )
}
