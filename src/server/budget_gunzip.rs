//! Compressed gRPC requests (`grpc-encoding: gzip` or `deflate`, as Triton's clients send with
//! `compression_algorithm`), decompressed in the budget layer instead of inside tonic, so that the
//! budget holds for them: a compressed message is first decompressed into nothing to learn its
//! size (refused past the message size limit, so a gzip bomb costs CPU bounded by that limit and
//! no memory), that size is reserved from the budget, and only then is the message decompressed
//! again, in chunks, into the plain gRPC message tonic decodes. What a message decompresses to is
//! therefore reserved before it is allocated. tonic sees an uncompressed request (the layer takes
//! the `grpc-encoding` header away) and answers uncompressed, which every client accepts.
use std::collections::VecDeque;
use std::io::Read;
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};

use super::budget::{Hold, Reservation};
use super::budget_grpc::budget_status;

/// The decompressed size a message may reach when the server did not say (`--max-message-bytes`'s
/// default).
pub const DEFAULT_MAX_DECOMPRESSED_BYTES: u64 = 64 << 20;

/// The size of the plain chunks handed to tonic while a message is decompressed.
const CHUNK: usize = 64 << 10;

/// The request compressions the layer decompresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Gzip,
    /// gRPC's `deflate` is the zlib format.
    Deflate,
}

impl Compression {
    /// The compression a `grpc-encoding` header names, if the layer handles it.
    pub fn from_header(value: &[u8]) -> Option<Self> {
        match value {
            b"gzip" => Some(Self::Gzip),
            b"deflate" => Some(Self::Deflate),
            _ => None,
        }
    }

    fn reader(self, compressed: Bytes) -> Box<dyn Read + Send> {
        match self {
            Self::Gzip => Box::new(flate2::read::GzDecoder::new(compressed.reader())),
            Self::Deflate => Box::new(flate2::read::ZlibDecoder::new(compressed.reader())),
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Where the framing of the compressed stream is.
enum State {
    /// Reading a message header (`have` of its 5 bytes).
    Header { bytes: [u8; 5], have: usize },
    /// An uncompressed message inside the stream: `left` bytes pass through.
    Plain { left: usize },
    /// Collecting a compressed message of `len` bytes.
    Compressed { data: BytesMut, len: usize },
}

/// Turns a compressed gRPC message stream into the same messages uncompressed.
pub struct Gunzip {
    compression: Compression,
    reservation: Arc<Reservation>,
    hold: Hold,
    max_decompressed: u64,
    state: State,
    /// Plain frames ready for tonic.
    ready: VecDeque<Bytes>,
    /// The message being decompressed, and its size (held per message for streams).
    inflating: Option<(Box<dyn Read + Send>, u64)>,
    /// Input not yet read.
    pending: Bytes,
}

impl Gunzip {
    pub fn new(
        compression: Compression,
        reservation: Arc<Reservation>,
        hold: Hold,
        max_decompressed: u64,
    ) -> Self {
        Self {
            compression,
            reservation,
            hold,
            // The plain header holds the size in 32 bits.
            max_decompressed: max_decompressed.min(u64::from(u32::MAX)),
            state: State::Header {
                bytes: [0; 5],
                have: 0,
            },
            ready: VecDeque::new(),
            inflating: None,
            pending: Bytes::new(),
        }
    }

    /// The next plain frame, or None when more input is needed ([`Self::feed`]).
    pub fn next_frame(&mut self) -> Result<Option<Bytes>, BoxError> {
        loop {
            if let Some(frame) = self.ready.pop_front() {
                return Ok(Some(frame));
            }
            if self.inflating.is_some() {
                match self.inflate_chunk()? {
                    Some(chunk) => return Ok(Some(chunk)),
                    None => continue,
                }
            }
            if self.pending.is_empty() {
                return Ok(None);
            }
            self.process()?;
        }
    }

    /// Whether everything fed has been handed on.
    pub fn is_idle(&self) -> bool {
        self.ready.is_empty() && self.inflating.is_none() && self.pending.is_empty()
    }

    /// Takes one frame of the compressed stream, once [`Self::next_frame`] gave None.
    pub fn feed(&mut self, data: Bytes) {
        debug_assert!(self.pending.is_empty());
        self.pending = data;
    }

    fn inflate_chunk(&mut self) -> Result<Option<Bytes>, BoxError> {
        let Some((reader, size)) = &mut self.inflating else {
            return Ok(None);
        };
        let mut chunk = BytesMut::zeroed(CHUNK);
        let n = reader.read(&mut chunk).map_err(decompress_error)?;
        if n == 0 {
            if self.hold == Hold::PerMessage {
                self.reservation.shrink(*size);
            }
            self.inflating = None;
            return Ok(None);
        }
        chunk.truncate(n);
        Ok(Some(chunk.freeze()))
    }

    /// Reads the framing of `pending` until it is used up or a message starts decompressing (the
    /// rest waits, so the messages keep their order).
    fn process(&mut self) -> Result<(), BoxError> {
        while !self.pending.is_empty() && self.inflating.is_none() {
            let data = &mut self.pending;
            match &mut self.state {
                State::Header { bytes, have } => {
                    let take = (5 - *have).min(data.len());
                    bytes[*have..*have + take].copy_from_slice(&data.split_to(take));
                    *have += take;
                    if *have == 5 {
                        self.header_complete()?;
                    }
                }
                State::Plain { left } => {
                    let take = (*left).min(data.len());
                    *left -= take;
                    self.ready.push_back(data.split_to(take));
                    if *left == 0 {
                        self.state = header();
                    }
                }
                State::Compressed {
                    data: collected,
                    len,
                } => {
                    let take = (*len - collected.len()).min(data.len());
                    collected.extend_from_slice(&data.split_to(take));
                    if collected.len() == *len {
                        let compressed = std::mem::take(collected).freeze();
                        self.state = header();
                        self.start_inflating(compressed)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn header_complete(&mut self) -> Result<(), BoxError> {
        let State::Header { bytes, .. } = self.state else {
            return Ok(());
        };
        let len = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
        if bytes[0] == 0 {
            self.ready.push_back(Bytes::copy_from_slice(&bytes));
            self.state = if len == 0 {
                header()
            } else {
                State::Plain { left: len }
            };
            return Ok(());
        }
        // The counting body reserved the compressed message when this header arrived.
        let data = BytesMut::with_capacity(len);
        self.state = State::Compressed { data, len };
        if len == 0 {
            self.state = header();
            self.start_inflating(Bytes::new())?;
        }
        Ok(())
    }

    /// Learns the decompressed size, reserves it, and queues the plain header.
    fn start_inflating(&mut self, compressed: Bytes) -> Result<(), BoxError> {
        let limit = self.max_decompressed;
        let size = std::io::copy(
            &mut self.compression.reader(compressed.clone()).take(limit + 1),
            &mut std::io::sink(),
        )
        .map_err(decompress_error)?;
        if size > limit {
            return Err(Box::new(tonic::Status::resource_exhausted(format!(
                "Error decompressing: size limit, of {limit} bytes, exceeded while decompressing message"
            ))));
        }
        self.reservation
            .grow(size)
            .map_err(|exceeded| Box::new(budget_status(&exceeded)) as BoxError)?;
        let mut plain_header = [0u8; 5];
        plain_header[1..].copy_from_slice(&(size as u32).to_be_bytes());
        self.ready.push_back(Bytes::copy_from_slice(&plain_header));
        self.inflating = Some((self.compression.reader(compressed), size));
        Ok(())
    }
}

fn header() -> State {
    State::Header {
        bytes: [0; 5],
        have: 0,
    }
}

/// As tonic reports a message it cannot decompress.
fn decompress_error(error: std::io::Error) -> BoxError {
    Box::new(tonic::Status::internal(format!(
        "Error decompressing: {error}, while sending request"
    )))
}

#[cfg(test)]
#[path = "budget_gunzip_tests.rs"]
mod tests;
