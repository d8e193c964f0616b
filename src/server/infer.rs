//! One inference end to end, protocol-neutral: both front doors (gRPC and HTTP) translate their
//! request into a `ModelInferRequest` and call [`infer`], so validation (decode.rs), scheduling,
//! statistics, tracing and encoding (encode.rs) exist once.
use std::sync::Arc;
use std::time::Instant;

use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::budget::Reservation;
use super::decode::{decode_request, decoding_overhead, DecodedRequest};
use super::encode::infer_response;
use super::state::ServerState;
use crate::error::Error;
use crate::proto::{ModelInferRequest, ModelInferResponse};
use crate::scheduler::SchedulerError;
use crate::telemetry::stats::FailureReason;

/// Runs one inference end to end. Shared by ModelInfer, ModelStreamInfer and HTTP `.../infer`. `reservation` holds
/// the request's wire bytes against the memory budget; what decoding adds is reserved before it
/// runs, and all of it is held until the answer is built (for ModelInfer, until it was sent).
pub async fn infer(
    state: &ServerState,
    request: ModelInferRequest,
    trace_parent: &opentelemetry::Context,
    reservation: Arc<Reservation>,
) -> Result<ModelInferResponse, Error> {
    let arrived = Instant::now();
    let model = state.models.get(
        &state.resolve_model_name(&request.model_name),
        &request.model_version,
    )?;
    if let Err(exceeded) = reservation.grow(decoding_overhead(&request)) {
        model
            .stats
            .record_failure(arrived.elapsed(), FailureReason::Rejected);
        return Err(Error::from(exceeded));
    }
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
        match model.scheduler.infer(decoded).await {
            Ok(response) => {
                let timings = response.timings;
                // Success only once the answer exists: writing an output region can still fail.
                match infer_response(&model, id, response, &shm_outputs) {
                    Ok(answer) => {
                        model
                            .stats
                            .record_success(arrived.elapsed(), rows, &timings);
                        Ok(answer)
                    }
                    Err(e) => {
                        model
                            .stats
                            .record_failure(arrived.elapsed(), FailureReason::Other);
                        Err(Error::from(e))
                    }
                }
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

impl ServerState {
    /// The model a request's name stands for: itself, or, when it is the `--model-alias` and no
    /// model has that name, the only model loaded. KServe routes an InferenceService's requests by
    /// its own name, which need not be the model directory's name under /mnt/models.
    pub fn resolve_model_name<'a>(&self, name: &'a str) -> std::borrow::Cow<'a, str> {
        let is_alias = self.model_alias.as_deref() == Some(name);
        if !is_alias || self.models.index().iter().any(|e| e.name == name) {
            return name.into();
        }
        let mut names: Vec<String> = self
            .models
            .loaded()
            .iter()
            .map(|m| m.name.clone())
            .collect();
        names.dedup();
        match <[String; 1]>::try_from(names) {
            Ok([only]) => only.into(),
            Err(_) => name.into(),
        }
    }
}
