//! One memory budget for the whole server: the bytes of every request in flight, counted as they
//! arrive (before decoding) and held until the answer is sent. A request that would take the total
//! past the limit is refused at once, naming the budget, so memory follows the budget rather than
//! whatever clients send. Protocol-neutral: each front door wraps its request bodies in a
//! [`CountingBody`] (see `budget_grpc.rs` for gRPC) or reserves through a [`Reservation`] directly.
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::telemetry::metrics::BudgetGauges;

/// Used when no cgroup memory limit is set: enough for a few dozen maximum-size (64 MiB) messages.
pub const DEFAULT_BUDGET_BYTES: u64 = 2 << 30;

/// The share of a cgroup memory limit the budget takes by default; the rest is for the models'
/// sessions, ONNX Runtime's arenas and the outputs.
const CGROUP_SHARE_DIVISOR: u64 = 2;

pub use crate::error::BudgetExceeded;

/// The shared budget: one atomic counter of bytes in flight, compared against the limit.
#[derive(Debug)]
pub struct MemoryBudget {
    /// 0 means unlimited (still counted, for the metric).
    limit: u64,
    gauges: Arc<BudgetGauges>,
}

impl MemoryBudget {
    pub fn new(limit: u64, gauges: Arc<BudgetGauges>) -> Arc<Self> {
        gauges.limit.store(limit, Ordering::Relaxed);
        Arc::new(Self { limit, gauges })
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    pub fn in_flight(&self) -> u64 {
        self.gauges.in_flight.load(Ordering::Relaxed)
    }

    /// An empty reservation that grows as a request's bytes arrive.
    pub fn reservation(self: &Arc<Self>) -> Reservation {
        Reservation {
            budget: Arc::clone(self),
            bytes: AtomicU64::new(0),
        }
    }

    /// Takes `bytes` from the budget, or refuses without taking anything.
    fn take(&self, bytes: u64) -> Result<(), BudgetExceeded> {
        let limit = self.limit;
        let result =
            self.gauges
                .in_flight
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |current| {
                    current
                        .checked_add(bytes)
                        .filter(|total| limit == 0 || *total <= limit)
                });
        match result {
            Ok(before) => {
                self.gauges
                    .peak
                    .fetch_max(before.saturating_add(bytes), Ordering::Relaxed);
                Ok(())
            }
            Err(in_flight) => {
                self.gauges.refused.fetch_add(1, Ordering::Relaxed);
                Err(BudgetExceeded {
                    requested: bytes,
                    limit,
                    in_flight,
                })
            }
        }
    }

    fn give_back(&self, bytes: u64) {
        // Saturating: a bookkeeping slip must never wrap the gauge to 2^64.
        let _ =
            self.gauges
                .in_flight
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |current| {
                    Some(current.saturating_sub(bytes))
                });
    }
}

/// The bytes one request holds; everything it still holds goes back to the budget when it is
/// dropped. Shared (behind an `Arc`) by the request body, the handler and the response body, so the
/// bytes stay reserved until the last of them is gone, i.e. until the answer was sent.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<MemoryBudget>,
    bytes: AtomicU64,
}

impl Reservation {
    /// Reserves `bytes` more, or refuses (the reservation keeps what it had).
    pub fn grow(&self, bytes: u64) -> Result<(), BudgetExceeded> {
        if bytes == 0 {
            return Ok(());
        }
        self.budget.take(bytes)?;
        self.bytes.fetch_add(bytes, Ordering::AcqRel);
        Ok(())
    }

    /// Gives back up to `bytes` early (a streamed message that was handed on).
    pub fn shrink(&self, bytes: u64) {
        let released = self
            .bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                Some(held.saturating_sub(bytes))
            })
            .map(|held| held.min(bytes))
            .unwrap_or(0);
        self.budget.give_back(released);
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Acquire)
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.give_back(*self.bytes.get_mut());
    }
}

/// How a [`CountingBody`] finds the units it reserves for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Each data frame is reserved as it arrives (an HTTP body).
    Raw,
    /// gRPC length-prefixed messages: a message's whole declared size is reserved when its 5-byte
    /// header arrives, so an oversized message is refused before its payload is read.
    Grpc,
}

/// What a [`CountingBody`] does with a message's bytes once the message is complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// Keep them until the reservation is dropped (a unary call: until its answer was sent).
    UntilDropped,
    /// Give them back when the message is complete: a long-lived stream, whose handler reserves
    /// each decoded message on its own for as long as that message is being served.
    PerMessage,
}

/// Tracks where the body is in the gRPC framing: inside a header or inside a message's payload.
#[derive(Debug, Default)]
struct GrpcFraming {
    header: [u8; 5],
    header_len: usize,
    /// Payload bytes of the current message still to come.
    payload_left: u64,
    /// The size reserved for the current message (header included).
    reserved: u64,
}

/// A request body that reserves its bytes from the budget as they arrive and ends with the budget
/// error (as a boxed [`BudgetExceeded`]) as soon as they do not fit.
pub struct CountingBody<B> {
    inner: B,
    reservation: Arc<Reservation>,
    framing: Framing,
    hold: Hold,
    grpc: GrpcFraming,
    refused: bool,
}

impl<B> CountingBody<B> {
    pub fn new(inner: B, reservation: Arc<Reservation>, framing: Framing, hold: Hold) -> Self {
        Self {
            inner,
            reservation,
            framing,
            hold,
            grpc: GrpcFraming::default(),
            refused: false,
        }
    }

    /// Accounts for one data frame.
    fn count(&mut self, mut data: &[u8]) -> Result<(), BudgetExceeded> {
        if self.framing == Framing::Raw {
            return self.reservation.grow(data.len() as u64);
        }
        while !data.is_empty() {
            let g = &mut self.grpc;
            if g.payload_left == 0 && g.header_len < 5 {
                let take = (5 - g.header_len).min(data.len());
                g.header[g.header_len..g.header_len + take].copy_from_slice(&data[..take]);
                g.header_len += take;
                data = &data[take..];
                if g.header_len == 5 {
                    let len =
                        u32::from_be_bytes([g.header[1], g.header[2], g.header[3], g.header[4]]);
                    g.payload_left = u64::from(len);
                    g.reserved = 5 + u64::from(len);
                    self.reservation.grow(g.reserved)?;
                    if g.payload_left == 0 {
                        self.message_done();
                    }
                }
                continue;
            }
            let take = (g.payload_left.min(data.len() as u64)) as usize;
            g.payload_left -= take as u64;
            data = &data[take..];
            if g.payload_left == 0 {
                self.message_done();
            }
        }
        Ok(())
    }

    fn message_done(&mut self) {
        if self.hold == Hold::PerMessage {
            self.reservation.shrink(self.grpc.reserved);
        }
        self.grpc = GrpcFraming::default();
    }
}

impl<B> Body for CountingBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        if self.refused {
            return Poll::Ready(None);
        }
        let frame = match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => return Poll::Pending,
        };
        if let Some(data) = frame.data_ref() {
            let data = data.clone();
            if let Err(exceeded) = self.count(&data) {
                self.refused = true;
                return Poll::Ready(Some(Err(Box::new(exceeded))));
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.refused || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that keeps the request's reservation until it is dropped (the answer was sent
/// or abandoned), so queued and running requests hold their bytes.
#[derive(Default)]
pub struct HoldingBody<B> {
    inner: B,
    /// `None` only for the empty default body hyper may ask for.
    _reservation: Option<Arc<Reservation>>,
}

impl<B> HoldingBody<B> {
    pub fn new(inner: B, reservation: Arc<Reservation>) -> Self {
        Self {
            inner,
            _reservation: Some(reservation),
        }
    }
}

impl<B: Body + Unpin> Body for HoldingBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The budget when `--max-inflight-bytes` is not given: half the cgroup memory limit where one is
/// set, else [`DEFAULT_BUDGET_BYTES`].
pub fn default_budget_bytes() -> u64 {
    cgroup_memory_limit()
        .map(|limit| limit / CGROUP_SHARE_DIVISOR)
        .filter(|b| *b > 0)
        .unwrap_or(DEFAULT_BUDGET_BYTES)
}

/// The memory limit of this process's cgroup (v2 `memory.max`, else v1 `memory.limit_in_bytes`).
fn cgroup_memory_limit() -> Option<u64> {
    let read = |path: &str| std::fs::read_to_string(path).ok();
    read("/sys/fs/cgroup/memory.max")
        .and_then(|s| parse_cgroup_limit(&s))
        .or_else(|| {
            read("/sys/fs/cgroup/memory/memory.limit_in_bytes").and_then(|s| parse_cgroup_limit(&s))
        })
}

/// `max` (v2) and the near-2^63 value v1 reports for "no limit" both mean no limit.
fn parse_cgroup_limit(text: &str) -> Option<u64> {
    let value: u64 = text.trim().parse().ok()?;
    (value < 1 << 60).then_some(value)
}

#[cfg(test)]
#[path = "budget_tests.rs"]
mod tests;
