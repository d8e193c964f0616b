//! Triton's HTTP/REST endpoints. Inference runs the shared engine entry; the other endpoints call
//! the gRPC service's handler with the proto request and answer its response as JSON.
use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Extension, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::Router;
use bytes::Bytes;
use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};
use serde_json::{Map, Value};

use super::compression::{compress, request_body, response_coding};
use super::error::HttpError;
use super::request::parse_infer;
use super::response::encode_infer;
use super::{HttpCaller, HttpState};
use crate::proto::grpc_inference_service_server::GrpcInferenceService;
use crate::proto::model_repository_parameter::ParameterChoice as RepoChoice;
use crate::proto::*;
use crate::security::Access;
use crate::server::grpc::InferenceService;
use crate::server::trace_context::parent_context_from_headers;

type Shared = State<Arc<HttpState>>;
type Params = Result<Path<HashMap<String, String>>, PathRejection>;
type Body = Result<Bytes, BytesRejection>;
type Answer = Result<Response, HttpError>;

/// The binary tensor data extension's header: the JSON part's length when binary data follows.
const HEADER_LENGTH: &str = "inference-header-content-length";

pub fn routes() -> Router<Arc<HttpState>> {
    let mut router = Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2/models/stats", get(statistics))
        .route("/v2/repository/index", post(repository_index))
        .route("/v2/repository/models/{model}/load", post(load))
        .route("/v2/repository/models/{model}/unload", post(unload))
        .route("/v2/systemsharedmemory/status", get(shm_status))
        .route(
            "/v2/systemsharedmemory/region/{region}/status",
            get(shm_status),
        )
        .route(
            "/v2/systemsharedmemory/region/{region}/register",
            post(shm_register),
        )
        .route("/v2/systemsharedmemory/unregister", post(shm_unregister))
        .route(
            "/v2/systemsharedmemory/region/{region}/unregister",
            post(shm_unregister),
        )
        .route("/v2/cudasharedmemory/status", get(cuda_shm_status))
        .route(
            "/v2/cudasharedmemory/region/{region}/status",
            get(cuda_shm_status),
        )
        .route(
            "/v2/cudasharedmemory/region/{region}/register",
            post(cuda_shm_register),
        )
        .route("/v2/cudasharedmemory/unregister", post(cuda_shm_unregister))
        .route(
            "/v2/cudasharedmemory/region/{region}/unregister",
            post(cuda_shm_unregister),
        )
        .route("/v2/cudasharedmemory/{*rest}", any(cuda_shm))
        .route("/v2/trace/setting", any(trace_setting))
        .route("/v2/models/{model}/trace/setting", any(trace_setting))
        .route("/v2/logging", any(log_settings));
    // Every model route exists with and without an explicit version.
    for base in [
        "/v2/models/{model}",
        "/v2/models/{model}/versions/{version}",
    ] {
        router = router
            .route(base, get(model_metadata))
            .route(&format!("{base}/ready"), get(model_ready))
            .route(&format!("{base}/config"), get(model_config))
            .route(&format!("{base}/stats"), get(statistics))
            .route(&format!("{base}/infer"), post(infer));
    }
    router
}

fn service(state: &HttpState) -> InferenceService {
    InferenceService::new(Arc::clone(&state.server))
}

/// The path's model (alias resolved) and version ("" for the server's choice), percent-decoded.
fn target(state: &HttpState, params: Params) -> Result<(String, String), HttpError> {
    let Path(mut params) = params.map_err(|e| HttpError::bad_request(e.body_text()))?;
    let model = params.remove("model").unwrap_or_default();
    let model = state.server.resolve_model_name(&model).into_owned();
    Ok((model, params.remove("version").unwrap_or_default()))
}

fn body_bytes(body: Body) -> Result<Bytes, HttpError> {
    body.map_err(|e| HttpError::new(e.status(), e.body_text()))
}

/// A small JSON request body; an empty body is an empty object.
fn json_object(body: Body) -> Result<Map<String, Value>, HttpError> {
    let body = body_bytes(body)?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    serde_json::from_slice(&body)
        .map_err(|e| HttpError::bad_request(format!("malformed request JSON: {e}")))
}

static POOL: LazyLock<Option<DescriptorPool>> =
    LazyLock::new(|| DescriptorPool::decode(crate::proto::FILE_DESCRIPTOR_SET).ok());

/// A proto message as Triton's HTTP JSON: proto field names, every field, 64-bit integers as numbers.
fn proto_json<M: prost::Message>(full_name: &str, message: &M) -> Result<Value, HttpError> {
    let internal = |e: String| HttpError::new(StatusCode::INTERNAL_SERVER_ERROR, e);
    let descriptor = POOL
        .as_ref()
        .and_then(|p| p.get_message_by_name(full_name))
        .ok_or_else(|| internal(format!("no descriptor for {full_name}")))?;
    let dynamic = DynamicMessage::decode(descriptor, message.encode_to_vec().as_slice())
        .map_err(|e| internal(e.to_string()))?;
    let options = SerializeOptions::new()
        .stringify_64_bit_integers(false)
        .use_proto_field_name(true)
        .skip_default_fields(false);
    dynamic
        .serialize_with_options(serde_json::value::Serializer, &options)
        .map_err(|e| internal(e.to_string()))
}

fn json(value: &Value) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        value.to_string(),
    )
        .into_response()
}

/// Triton's health and readiness answers: 200, or 400 with an empty body.
fn health(ok: bool) -> Response {
    if ok {
        StatusCode::OK
    } else {
        StatusCode::BAD_REQUEST
    }
    .into_response()
}

async fn live() -> Response {
    health(true)
}

async fn ready(State(state): Shared) -> Response {
    health(state.server.is_ready())
}

async fn server_metadata(State(state): Shared, Extension(caller): Extension<HttpCaller>) -> Answer {
    let r = service(&state)
        .server_metadata(caller.grpc_request(ServerMetadataRequest {}))
        .await?;
    let mut r = r.into_inner();
    r.extensions.push("binary_tensor_data".into());
    Ok(json(&proto_json("inference.ServerMetadataResponse", &r)?))
}

async fn model_metadata(
    State(state): Shared,
    Extension(caller): Extension<HttpCaller>,
    params: Params,
) -> Answer {
    let (name, version) = target(&state, params)?;
    let r = service(&state)
        .model_metadata(caller.grpc_request(ModelMetadataRequest { name, version }))
        .await?;
    Ok(json(&proto_json(
        "inference.ModelMetadataResponse",
        r.get_ref(),
    )?))
}

async fn model_ready(
    State(state): Shared,
    Extension(caller): Extension<HttpCaller>,
    params: Params,
) -> Answer {
    let (name, version) = target(&state, params)?;
    let r = service(&state)
        .model_ready(caller.grpc_request(ModelReadyRequest { name, version }))
        .await?;
    Ok(health(r.get_ref().ready))
}

async fn model_config(
    State(state): Shared,
    Extension(caller): Extension<HttpCaller>,
    params: Params,
) -> Answer {
    let (name, version) = target(&state, params)?;
    let r = service(&state)
        .model_config(caller.grpc_request(ModelConfigRequest { name, version }))
        .await?;
    let config = r.into_inner().config.unwrap_or_default();
    Ok(json(&proto_json("inference.ModelConfig", &config)?))
}

async fn statistics(
    State(state): Shared,
    Extension(caller): Extension<HttpCaller>,
    params: Params,
) -> Answer {
    let (name, version) = target(&state, params)?;
    let r = service(&state)
        .model_statistics(caller.grpc_request(ModelStatisticsRequest { name, version }))
        .await?;
    Ok(json(&proto_json(
        "inference.ModelStatisticsResponse",
        r.get_ref(),
    )?))
}

async fn infer(
    State(state): Shared,
    Extension(caller): Extension<HttpCaller>,
    params: Params,
    headers: HeaderMap,
    body: Body,
) -> Answer {
    let (model, version) = target(&state, params)?;
    // Before the body is read: a refused caller reserves nothing and learns nothing.
    let probe = caller.grpc_request(());
    crate::server::auth::authorize(&state.server.access, &probe, Access::Model(&model))?;
    // The body's bytes count against the memory budget from here until the answer is built, as
    // the gRPC door counts its message; an inflated body counts its inflated size too.
    let reservation = Arc::new(state.server.budget.reservation());
    let wire = body_bytes(body)?;
    reservation
        .grow(wire.len() as u64)
        .map_err(|e| HttpError::from(crate::error::Error::from(e)))?;
    let compressed = wire.len();
    let body = request_body(&headers, wire, state.max_body_bytes)?;
    if body.len() != compressed {
        reservation
            .grow(body.len() as u64)
            .map_err(|e| HttpError::from(crate::error::Error::from(e)))?;
    }
    let header_length = match headers.get(HEADER_LENGTH) {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| {
                    HttpError::bad_request(
                        "Inference-Header-Content-Length must be a non-negative integer",
                    )
                })?,
        ),
        None => None,
    };
    let parsed = parse_infer(body, header_length, &model, &version)?;
    let parent = parent_context_from_headers(&headers);
    let response =
        crate::server::infer::infer(&state.server, parsed.request, &parent, reservation).await?;
    let encoded = encode_infer(response, &parsed.encoding)?;
    let mut answer_headers = HeaderMap::new();
    let content_type = if encoded.has_binary() {
        answer_headers.insert(HEADER_LENGTH, HeaderValue::from(encoded.header.len()));
        "application/octet-stream"
    } else {
        "application/json"
    };
    answer_headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    let mut body = encoded.into_body();
    if let Some(coding) = response_coding(&headers) {
        body = compress(coding, &body)
            .map_err(|e| HttpError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        answer_headers.insert(
            header::CONTENT_ENCODING,
            HeaderValue::from_static(coding.name()),
        );
    }
    Ok((answer_headers, body).into_response())
}

async fn repository_index(
    State(state): Shared,
    Extension(caller): Extension<HttpCaller>,
    body: Body,
) -> Answer {
    let body = json_object(body)?;
    let ready = match body.get("ready") {
        None => false,
        Some(v) => v
            .as_bool()
            .ok_or_else(|| HttpError::bad_request("'ready' must be true or false"))?,
    };
    let r = service(&state)
        .repository_index(caller.grpc_request(RepositoryIndexRequest {
            repository_name: String::new(),
            ready,
        }))
        .await?;
    let index = proto_json("inference.RepositoryIndexResponse", r.get_ref())?;
    Ok(json(
        index.get("models").unwrap_or(&Value::Array(Vec::new())),
    ))
}

/// `{"parameters": {...}}` of a load or unload body as the protocol's repository parameters.
fn repository_parameters(
    body: Body,
) -> Result<HashMap<String, ModelRepositoryParameter>, HttpError> {
    let mut body = json_object(body)?;
    let params = match body.remove("parameters") {
        None => Map::new(),
        Some(Value::Object(m)) => m,
        Some(_) => return Err(HttpError::bad_request("'parameters' must be an object")),
    };
    params
        .into_iter()
        .map(|(key, value)| {
            let choice = match value {
                Value::String(s) => RepoChoice::StringParam(s),
                Value::Bool(b) => RepoChoice::BoolParam(b),
                Value::Number(n) if n.is_i64() => RepoChoice::Int64Param(n.as_i64().unwrap_or(0)),
                _ => {
                    return Err(HttpError::bad_request(format!(
                        "load parameter '{key}' must be a string, a bool or an integer"
                    )))
                }
            };
            Ok((
                key,
                ModelRepositoryParameter {
                    parameter_choice: Some(choice),
                },
            ))
        })
        .collect()
}

async fn load(
    State(state): Shared,
    Extension(caller): Extension<HttpCaller>,
    params: Params,
    body: Body,
) -> Answer {
    let (model_name, _) = target(&state, params)?;
    let parameters = repository_parameters(body)?;
    service(&state)
        .repository_model_load(caller.grpc_request(RepositoryModelLoadRequest {
            repository_name: String::new(),
            model_name,
            parameters,
        }))
        .await?;
    Ok(StatusCode::OK.into_response())
}

async fn unload(
    State(state): Shared,
    Extension(caller): Extension<HttpCaller>,
    params: Params,
    body: Body,
) -> Answer {
    let (model_name, _) = target(&state, params)?;
    let parameters = repository_parameters(body)?;
    service(&state)
        .repository_model_unload(caller.grpc_request(RepositoryModelUnloadRequest {
            repository_name: String::new(),
            model_name,
            parameters,
        }))
        .await?;
    Ok(StatusCode::OK.into_response())
}

fn region(params: Params) -> Result<String, HttpError> {
    let Path(mut params) = params.map_err(|e| HttpError::bad_request(e.body_text()))?;
    Ok(params.remove("region").unwrap_or_default())
}

async fn shm_status(
    State(state): Shared,
    Extension(caller): Extension<HttpCaller>,
    params: Params,
) -> Answer {
    let name = region(params)?;
    let r = service(&state)
        .system_shared_memory_status(caller.grpc_request(SystemSharedMemoryStatusRequest { name }))
        .await?;
    let mut regions: Vec<_> = r.into_inner().regions.into_values().collect();
    regions.sort_by(|a, b| a.name.cmp(&b.name));
    let regions: Vec<Value> = regions
        .into_iter()
        .map(|s| serde_json::json!({"name": s.name, "key": s.key, "offset": s.offset, "byte_size": s.byte_size}))
        .collect();
    Ok(json(&Value::Array(regions)))
}

async fn shm_register(
    State(state): Shared,
    Extension(caller): Extension<HttpCaller>,
    params: Params,
    body: Body,
) -> Answer {
    let name = region(params)?;
    let body = json_object(body)?;
    let key = body
        .get("key")
        .and_then(Value::as_str)
        .ok_or_else(|| HttpError::bad_request("shared memory register needs 'key' (a string)"))?;
    let number = |field: &str, default: Option<u64>| match body.get(field) {
        None => default.ok_or_else(|| {
            HttpError::bad_request(format!("shared memory register needs '{field}'"))
        }),
        Some(v) => v.as_u64().ok_or_else(|| {
            HttpError::bad_request(format!("'{field}' must be a non-negative integer"))
        }),
    };
    let request = SystemSharedMemoryRegisterRequest {
        name,
        key: key.to_string(),
        offset: number("offset", Some(0))?,
        byte_size: number("byte_size", None)?,
    };
    service(&state)
        .system_shared_memory_register(caller.grpc_request(request))
        .await?;
    Ok(StatusCode::OK.into_response())
}

async fn shm_unregister(
    State(state): Shared,
    Extension(caller): Extension<HttpCaller>,
    params: Params,
) -> Answer {
    let name = region(params)?;
    service(&state)
        .system_shared_memory_unregister(
            caller.grpc_request(SystemSharedMemoryUnregisterRequest { name }),
        )
        .await?;
    Ok(StatusCode::OK.into_response())
}

/// Admin-only, as on gRPC: a refused caller learns nothing, not even that the endpoint is
/// unimplemented.
fn require_admin(state: &HttpState, caller: &HttpCaller) -> Result<(), HttpError> {
    let probe = caller.grpc_request(());
    crate::server::auth::authorize(&state.server.access, &probe, Access::Admin)?;
    Ok(())
}

/// CUDA shared memory as a CPU-only Triton answers it (the gRPC door's answers): status lists no
/// regions, unregistering is a no-op that succeeds, registering is refused.
async fn cuda_shm_status(
    State(state): Shared,
    Extension(caller): Extension<HttpCaller>,
    params: Params,
) -> Answer {
    let name = region(params)?;
    service(&state)
        .cuda_shared_memory_status(caller.grpc_request(CudaSharedMemoryStatusRequest { name }))
        .await?;
    Ok(json(&Value::Array(Vec::new())))
}

async fn cuda_shm_register(
    State(state): Shared,
    Extension(caller): Extension<HttpCaller>,
    params: Params,
) -> Answer {
    let name = region(params)?;
    service(&state)
        .cuda_shared_memory_register(caller.grpc_request(CudaSharedMemoryRegisterRequest {
            name,
            ..Default::default()
        }))
        .await?;
    Ok(StatusCode::OK.into_response())
}

async fn cuda_shm_unregister(
    State(state): Shared,
    Extension(caller): Extension<HttpCaller>,
    params: Params,
) -> Answer {
    let name = region(params)?;
    service(&state)
        .cuda_shared_memory_unregister(
            caller.grpc_request(CudaSharedMemoryUnregisterRequest { name }),
        )
        .await?;
    Ok(StatusCode::OK.into_response())
}

async fn cuda_shm(State(state): Shared, Extension(caller): Extension<HttpCaller>) -> HttpError {
    if let Err(refused) = require_admin(&state, &caller) {
        return refused;
    }
    HttpError::unimplemented(
        "CUDA shared memory is not supported by this server; use system shared memory or inline tensors",
    )
}

async fn trace_setting(
    State(state): Shared,
    Extension(caller): Extension<HttpCaller>,
) -> HttpError {
    if let Err(refused) = require_admin(&state, &caller) {
        return refused;
    }
    HttpError::unimplemented(
        "trace settings are not implemented by this server (tracing is configured with OTEL_* variables and --trace-* flags at startup)",
    )
}

async fn log_settings(State(state): Shared, Extension(caller): Extension<HttpCaller>) -> HttpError {
    if let Err(refused) = require_admin(&state, &caller) {
        return refused;
    }
    HttpError::unimplemented(
        "log settings are not implemented by this server (logging is configured with RUST_LOG / --log-verbose at startup)",
    )
}
