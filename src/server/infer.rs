//! One inference end to end, protocol-neutral: both front doors (gRPC and HTTP) translate their
//! request into a `ModelInferRequest` and call [`infer`], so validation (decode.rs), scheduling,
//! statistics, tracing and encoding (encode.rs) exist once.
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use futures::future::Either;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::budget::Reservation;
use super::decode::{decode_request, decoding_overhead, DecodedRequest};
use super::encode::infer_response;
use super::state::ServerState;
use crate::error::Error;
use crate::model::manager::LoadedModel;
use crate::proto::{ModelInferRequest, ModelInferResponse};
use crate::scheduler::{InferRequest, InferResponse, SchedulerError};
use crate::shm::ShmOutput;
use crate::telemetry::stats::FailureReason;

/// Runs one inference end to end. Shared by ModelInfer, ModelStreamInfer and HTTP `.../infer`.
/// `reservation` holds the request's wire bytes against the memory budget; what decoding adds is
/// reserved before it runs, and all of it is held until the answer is built (for ModelInfer, until
/// it was sent).
pub fn infer<'a>(
    state: &'a ServerState,
    request: ModelInferRequest,
    trace_parent: &opentelemetry::Context,
    reservation: Arc<Reservation>,
) -> impl Future<Output = Result<ModelInferResponse, Error>> + Send + 'a {
    infer_admitted(state, request, trace_parent, reservation, None)
}

/// As `infer`; a sequence request drops `admitted` once it is queued or refused, so a stream can
/// hand its sequence requests to the sequence batcher in the order it received them.
///
/// Not an `async fn`: the lookup, the reservation and the span happen before the future exists,
/// which is then `decode_run_encode`'s alone. Each async level holds its arguments and the future
/// below, and every level is copied whole when it is created, on every call.
pub fn infer_admitted<'a>(
    state: &'a ServerState,
    request: ModelInferRequest,
    trace_parent: &opentelemetry::Context,
    reservation: Arc<Reservation>,
    admitted: Option<tokio::sync::oneshot::Sender<()>>,
) -> impl Future<Output = Result<ModelInferResponse, Error>> + Send + 'a {
    let arrived = Instant::now();
    let model = match admit(state, &request, &reservation, arrived) {
        Ok(model) => model,
        Err(error) => return Either::Left(std::future::ready(Err(error))),
    };
    // Debug level: at the default log level (and without a trace exporter, whose filter takes debug
    // spans) this is Span::none() and costs nothing per request; --log-verbose or OTLP turn it on.
    let span = tracing::debug_span!("infer", request_id = %request.id, model = %model.name, version = model.version);
    // Continue the caller's trace when it sent a W3C traceparent (a span that is off records none).
    if !span.is_disabled() {
        let _ = span.set_parent(trace_parent.clone());
    }
    let call = Call {
        state,
        model,
        admitted,
        arrived,
        span: span.clone(),
        _reservation: reservation,
    };
    Either::Right(decode_run_encode(call, request).instrument(span))
}

/// The model the request names, once what decoding it adds fits the memory budget.
fn admit(
    state: &ServerState,
    request: &ModelInferRequest,
    reservation: &Reservation,
    arrived: Instant,
) -> Result<Arc<LoadedModel>, Error> {
    // Refused by the codec's pre-scan (see `codec`): first, as when the codec answered it itself.
    if let Some(reason) = super::codec::refusal(request) {
        return Err(Error::Request(crate::error::RequestError(reason)));
    }
    let model = state.models.get(
        &state.resolve_model_name(&request.model_name),
        &request.model_version,
    )?;
    if let Err(exceeded) = reservation.grow(decoding_overhead(request)) {
        model
            .stats
            .record_failure(arrived.elapsed(), FailureReason::Rejected);
        return Err(Error::from(exceeded));
    }
    Ok(model)
}

/// What one inference carries from its admission to its answer.
struct Call<'a> {
    state: &'a ServerState,
    model: Arc<LoadedModel>,
    admitted: Option<tokio::sync::oneshot::Sender<()>>,
    arrived: Instant,
    /// The span the call runs in, which the scheduler's request carries on.
    span: tracing::Span,
    /// Held until the answer is built (see `infer`).
    _reservation: Arc<Reservation>,
}

async fn decode_run_encode(
    call: Call<'_>,
    request: ModelInferRequest,
) -> Result<ModelInferResponse, Error> {
    let Call {
        state,
        ref model,
        admitted,
        arrived,
        span,
        ..
    } = call;
    let control = match &model.sequence {
        Some(_) => Some(super::sequence_params::sequence_control(
            &request.parameters,
        )?),
        None => None,
    };
    let id = request.id.clone();
    let DecodedRequest {
        request: decoded,
        shm_outputs,
        classifications,
    } = decode_request(request, model, &state.shm, span).map_err(|e| {
        model
            .stats
            .record_failure(arrived.elapsed(), FailureReason::Rejected);
        tracing::debug!(error = %e, "request rejected");
        Error::from(e)
    })?;
    let rows = request_rows(model, &decoded);
    let outcome = match (&model.sequence, control) {
        (Some(sequence), Some(control)) => {
            sequence.infer_admitted(decoded, control, admitted).await
        }
        _ => {
            let cache = state.cache.as_deref();
            crate::cache::lookup_or_run(cache, model, decoded, |r| model.scheduler.infer(r)).await
        }
    };
    let mut response = outcome.map_err(|e| {
        model
            .stats
            .record_failure(arrived.elapsed(), failure_reason(&e));
        tracing::debug!(error = %e, "inference failed");
        Error::from(e)
    })?;
    let timings = response.timings;
    // Success only once the answer exists: classifying or writing an output region can still fail.
    let answer = super::classification::apply(model, &mut response.outputs, &classifications)
        .map_err(Error::from)
        .and_then(|()| encode(model, id, response, &shm_outputs));
    match &answer {
        Ok(_) => model
            .stats
            .record_success(arrived.elapsed(), rows, &timings),
        Err(_) => model
            .stats
            .record_failure(arrived.elapsed(), FailureReason::Other),
    }
    answer
}

fn encode(
    model: &LoadedModel,
    id: String,
    response: InferResponse,
    shm_outputs: &HashMap<String, ShmOutput>,
) -> Result<ModelInferResponse, Error> {
    infer_response(model, id, response, shm_outputs).map_err(Error::from)
}

/// Rows the request adds to a batch (1 for a model that does not batch).
fn request_rows(model: &LoadedModel, request: &InferRequest) -> usize {
    if model.max_batch_size() == 0 {
        return 1;
    }
    request
        .inputs
        .first()
        .map(|t| t.tensor.batch_rows())
        .unwrap_or(1)
}

/// The statistics bucket of a scheduler failure, as Triton counts them.
fn failure_reason(error: &SchedulerError) -> FailureReason {
    match error {
        SchedulerError::QueueFull | SchedulerError::InvalidRequest(_) => FailureReason::Rejected,
        SchedulerError::TimedOut | SchedulerError::Cancelled => FailureReason::Canceled,
        SchedulerError::Execute(_) => FailureReason::Backend,
        SchedulerError::ShuttingDown => FailureReason::Other,
    }
}

impl ServerState {
    /// The model a request's name stands for: itself, or, when it is the `--model-alias` and no
    /// model has that name, the only model loaded. KServe routes an InferenceService's requests by
    /// its own name, which need not be the model directory's name under /mnt/models.
    pub fn resolve_model_name<'a>(&self, name: &'a str) -> std::borrow::Cow<'a, str> {
        if self.model_alias.as_deref() != Some(name) {
            return name.into();
        }
        let mut names: Vec<String> = self
            .models
            .loaded()
            .iter()
            .map(|m| m.name.clone())
            .collect();
        names.dedup();
        if names.iter().any(|n| n == name) {
            return name.into();
        }
        match <[String; 1]>::try_from(names) {
            Ok([only]) => only.into(),
            Err(_) => name.into(),
        }
    }
}
