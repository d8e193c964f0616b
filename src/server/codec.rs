//! The gRPC codec of the inference service (build.rs names it in `codec_path`): prost encoding and
//! decoding as tonic's own codec, except that a ModelInferRequest (unary ModelInfer and every
//! ModelStreamInfer message) is first walked on the wire (`codec_prescan.rs`). A request whose
//! typed contents cannot match its shapes, or that holds more than any request could use, is
//! refused with INVALID_ARGUMENT before prost allocates one object per element; what prost will
//! allocate for the rest is reserved from the memory budget before it decodes.
//!
//! A refused request is not an error of the decoder: tonic ends a stream at the first one, and
//! Triton answers a bad message on a stream in its `error_message` and goes on. The decoder hands
//! on a stand-in instead ([`refused_request`]): the request's model, version and id, and the
//! reason in the parameter [`REFUSED_PARAMETER`]. The inference entry (`infer.rs`) refuses it with
//! that reason before anything else, so ModelInfer answers INVALID_ARGUMENT as before and a stream
//! answers that message and reads the next.
//!
//! tonic applies everything else as before: the message size limit, decompression (the codec sees
//! the decompressed message), and a decoding error becomes the call's status.
use std::any::{Any, TypeId};
use std::marker::PhantomData;
use std::sync::Arc;

use bytes::{Buf, Bytes};
use prost::Message;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::Status;
use tonic_prost::ProstEncoder;

use super::budget::{MemoryBudget, Reservation};
use super::budget_grpc::{budget_status, current_call_budget};
use super::codec_prescan::{scan_request, RequestScan, ScanError};
use crate::proto::infer_parameter::ParameterChoice;
use crate::proto::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use crate::proto::{InferParameter, ModelInferRequest};

/// The parameter that carries, in a stand-in request, why the pre-scan refused the real one. A
/// client that sends it itself is refused with its own text.
pub const REFUSED_PARAMETER: &str = "onnx_gateway_refused_before_decoding";

/// prost's codec with the ModelInferRequest pre-scan; generic like `tonic_prost::ProstCodec`,
/// since the generated code uses one codec type for every method (and for the client too).
#[derive(Debug)]
pub struct InferenceCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for InferenceCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for InferenceCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = InferenceDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::default())
    }

    /// Called while the budget layer's call is being served (for a stream too: tonic makes the
    /// decoder before the handler runs), so the decoder can keep the call's budget.
    fn decoder(&mut self) -> Self::Decoder {
        InferenceDecoder {
            budget: current_call_budget(),
            held: None,
            _message: PhantomData,
        }
    }
}

/// Decodes `U`; for a ModelInferRequest, walks it first.
#[derive(Debug)]
pub struct InferenceDecoder<U> {
    /// None outside the budget layer (a test harness serving the bare service).
    budget: Option<Arc<MemoryBudget>>,
    /// What the last decoded message's objects were charged; given back at the next message (the
    /// handler has reserved that message on its own by then) or when the call's decoder is dropped.
    held: Option<Reservation>,
    _message: PhantomData<U>,
}

impl<U: Message + Default + 'static> Decoder for InferenceDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.held = None;
        if TypeId::of::<U>() != TypeId::of::<ModelInferRequest>() {
            return U::decode(buf).map(Some).map_err(decode_status);
        }
        // tonic's buffer is one contiguous BytesMut: this takes it without copying, and prost's
        // `bytes::Bytes` fields (raw_input_contents) keep pointing into it as before.
        let message = buf.copy_to_bytes(buf.remaining());
        let checked = match scan_request(&message) {
            Ok(scan) => {
                self.reserve(&scan)?;
                true
            }
            Err(ScanError::Refused(text)) => {
                return Ok(Some(as_decoded(refused_request(&message, text))))
            }
            Err(ScanError::Malformed) => false,
        };
        let decoded = U::decode(message).map_err(decode_status)?;
        if !checked {
            // The walk refuses only what prost refuses; prost accepting it is a bug in the walk.
            tracing::error!("a ModelInferRequest prost accepts was malformed for the pre-scan");
            return Err(Status::invalid_argument(
                "the request could not be checked before decoding; please report this",
            ));
        }
        Ok(Some(decoded))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

/// `request` as the decoder's item type, which the caller has checked is `ModelInferRequest`.
fn as_decoded<U: 'static>(request: ModelInferRequest) -> U {
    *(Box::new(request) as Box<dyn Any>)
        .downcast::<U>()
        .unwrap_or_else(|_| unreachable!("the decoder's item is ModelInferRequest"))
}

/// The fields of a ModelInferRequest that name it; prost skips every other field without
/// allocating, so reading them from a refused request costs nothing per element.
#[derive(Clone, PartialEq, prost::Message)]
struct RequestNames {
    #[prost(string, tag = "1")]
    model_name: String,
    #[prost(string, tag = "2")]
    model_version: String,
    #[prost(string, tag = "3")]
    id: String,
}

/// The stand-in for a request the pre-scan refused: its names (empty where they cannot be read)
/// and `reason` in [`REFUSED_PARAMETER`].
pub fn refused_request(message: &Bytes, reason: String) -> ModelInferRequest {
    let names = RequestNames::decode(message.clone()).unwrap_or_default();
    let reason = InferParameter {
        parameter_choice: Some(ParameterChoice::StringParam(reason)),
    };
    ModelInferRequest {
        model_name: names.model_name,
        model_version: names.model_version,
        id: names.id,
        parameters: [(REFUSED_PARAMETER.to_string(), reason)].into(),
        ..Default::default()
    }
}

/// Why the pre-scan refused the request `request` stands in for, if it is such a stand-in.
pub fn refusal(request: &ModelInferRequest) -> Option<String> {
    let parameter = request.parameters.get(REFUSED_PARAMETER)?;
    Some(match &parameter.parameter_choice {
        Some(ParameterChoice::StringParam(reason)) => reason.clone(),
        _ => format!("parameter '{REFUSED_PARAMETER}' is reserved"),
    })
}

impl<U> InferenceDecoder<U> {
    fn reserve(&mut self, scan: &RequestScan) -> Result<(), Status> {
        let Some(budget) = &self.budget else {
            return Ok(());
        };
        let reservation = budget.reservation();
        reservation
            .grow(prost_overhead(scan))
            .map_err(|exceeded| budget_status(&exceeded))?;
        self.held = Some(reservation);
        Ok(())
    }
}

/// As tonic's prost codec maps a decoding error (INTERNAL, per gRPC's status code guide).
fn decode_status(error: prost::DecodeError) -> Status {
    Status::internal(error.to_string())
}

/// What one typed BYTES element costs prost beyond its payload: a `Bytes` handle into the request's
/// buffer (32 bytes), twice over while the element list doubles.
pub const PROST_BYTES_ELEMENT: u64 = 64;

/// The bytes prost allocates for a request beyond its wire bytes, from the walk's counts: each
/// repeated field's `Vec` may hold up to twice its elements while it grows.
pub fn prost_overhead(scan: &RequestScan) -> u64 {
    const WIDTHS: [u64; 7] = [1, 4, 8, 4, 8, 4, 8];
    let doubled = |count: u64, size: usize| count.saturating_mul(2 * size as u64);
    let numbers = scan.typed[..7]
        .iter()
        .zip(WIDTHS)
        .fold(0u64, |sum, (&count, width)| {
            sum.saturating_add(count.saturating_mul(2 * width))
        });
    [
        numbers,
        scan.typed[7].saturating_mul(PROST_BYTES_ELEMENT),
        doubled(scan.inputs, std::mem::size_of::<InferInputTensor>()),
        doubled(
            scan.outputs,
            std::mem::size_of::<InferRequestedOutputTensor>(),
        ),
        doubled(scan.raw_contents, std::mem::size_of::<bytes::Bytes>()),
        doubled(scan.dims, std::mem::size_of::<i64>()),
        // A map entry: its key, its value and the hash table's slot.
        doubled(
            scan.parameters,
            8 + std::mem::size_of::<(String, InferParameter)>(),
        ),
    ]
    .iter()
    .fold(0u64, |sum, &cost| sum.saturating_add(cost))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_overhead_counts_every_object_prost_allocates() {
        let empty = RequestScan::default();
        assert_eq!(prost_overhead(&empty), 0);
        let bytes = RequestScan {
            typed: [0, 0, 0, 0, 0, 0, 0, 1000],
            ..RequestScan::default()
        };
        assert_eq!(prost_overhead(&bytes), 1000 * PROST_BYTES_ELEMENT);
        let int64 = RequestScan {
            typed: [0, 0, 1000, 0, 0, 0, 0, 0],
            inputs: 1,
            ..RequestScan::default()
        };
        let tensor = std::mem::size_of::<InferInputTensor>() as u64;
        assert_eq!(prost_overhead(&int64), 16_000 + 2 * tensor);
        let huge = RequestScan {
            typed: [u64::MAX; 8],
            ..RequestScan::default()
        };
        assert_eq!(prost_overhead(&huge), u64::MAX);
    }
}
