//! Lets the Unix-socket listener accept any HTTP/2 `:authority`.
//!
//! gRPC C-core clients (Python `grpcio`, so `tritonclient.grpc`, C++, and grpc-java's netty) send a
//! Unix socket's percent-encoded path as `:authority` (for example `%2Fvar%2Frun%2Fgw.sock`). The h2
//! crate parses every `:authority` with `http::uri::Authority` while decoding the request headers
//! (`h2::server::Peer::convert_poll_message`) and resets the stream with PROTOCOL_ERROR when it does
//! not parse; there is no option to relax that. On a Unix socket the authority means nothing, so this
//! reader sits between the socket and hyper and rewrites the client's header blocks: it decodes each
//! HPACK block (tracking the client's dynamic table across requests), and re-encodes the same fields in
//! the same order with `:authority` replaced by `localhost`. The re-encoded block uses only literals
//! that are never added to a table, so h2's decoder table stays empty and can never disagree with the
//! client's.
//!
//! Every other frame (DATA above all) passes through untouched: its bytes are read from the socket
//! straight into hyper's buffer, never copied here. Only HEADERS and CONTINUATION frames are buffered,
//! up to [`MAX_HEADER_BLOCK_BYTES`]. A frame this reader cannot make sense of is forwarded as it came,
//! and from then on the connection passes through unchanged: h2, the real validator, then answers it
//! with its own connection error.
use std::borrow::Cow;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BufMut, BytesMut};
use loona_hpack::Decoder;
use tokio::io::{AsyncRead, ReadBuf};

/// The authority every request on the socket is given.
const REWRITTEN_AUTHORITY: &[u8] = b"localhost";
/// The HTTP/2 client connection preface, forwarded as is.
const PREFACE_LEN: usize = 24;
const FRAME_HEADER_LEN: usize = 9;
const FRAME_HEADERS: u8 = 0x1;
const FRAME_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
/// SETTINGS_MAX_FRAME_SIZE's floor: the server (hyper's default) never advertises less, so
/// re-encoded frames of at most this size are always acceptable.
const MAX_OUTPUT_FRAME: usize = 16_384;
/// The client's encoder table size: the server does not change SETTINGS_HEADER_TABLE_SIZE from its
/// default, so a client may never grow its table past it.
const CLIENT_TABLE_SIZE: usize = 4_096;
/// Bound on one header block, encoded (all its frames) and decoded. hyper already refuses header
/// lists over 16 KiB; past this much larger bound the connection is closed rather than buffered.
pub const MAX_HEADER_BLOCK_BYTES: usize = 256 * 1024;

/// What a complete HEADERS or CONTINUATION frame turns into.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// The block continues in a CONTINUATION frame; nothing to forward yet.
    NeedContinuation,
    /// The rewritten frames to forward.
    Forward(Vec<u8>),
    /// Not understood: forward these original bytes and stop rewriting.
    GiveUp(Vec<u8>),
}

/// The start of a header block: what its first (HEADERS) frame said besides the fragment.
struct BlockStart {
    stream_id: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
}

/// Decodes the client's header blocks and re-encodes them with the authority replaced. Pure: it
/// sees whole frames and returns bytes, so it is tested without sockets.
struct HeaderRewriter {
    decoder: Decoder<'static>,
    start: Option<BlockStart>,
    fragment: Vec<u8>,
    /// The block's frames as received, for [`Step::GiveUp`].
    raw: Vec<u8>,
}

impl HeaderRewriter {
    fn new() -> Self {
        let mut decoder = Decoder::new();
        decoder.set_max_allowed_table_size(CLIENT_TABLE_SIZE);
        Self {
            decoder,
            start: None,
            fragment: Vec::new(),
            raw: Vec::new(),
        }
    }

    fn in_block(&self) -> bool {
        self.start.is_some()
    }

    /// Takes one whole frame (header and payload) of type HEADERS or CONTINUATION.
    fn push(&mut self, frame: &[u8]) -> io::Result<Step> {
        if self.raw.len() + frame.len() > MAX_HEADER_BLOCK_BYTES {
            return Err(block_too_large());
        }
        self.raw.extend_from_slice(frame);
        let (kind, flags, stream_id) = (frame[3], frame[4], stream_id_of(frame));
        let payload = &frame[FRAME_HEADER_LEN..];
        let accepted = match (kind, &self.start) {
            (FRAME_HEADERS, None) => self.start_block(flags, stream_id, payload),
            (FRAME_CONTINUATION, Some(start)) if start.stream_id == stream_id => {
                self.fragment.extend_from_slice(payload);
                true
            }
            _ => false,
        };
        if !accepted {
            return Ok(Step::GiveUp(self.take_raw()));
        }
        if flags & FLAG_END_HEADERS == 0 {
            return Ok(Step::NeedContinuation);
        }
        self.finish_block()
    }

    /// Reads a HEADERS frame's padding and priority fields; false when they do not fit.
    fn start_block(&mut self, flags: u8, stream_id: u32, payload: &[u8]) -> bool {
        let mut body = payload;
        let mut padding = 0;
        if flags & FLAG_PADDED != 0 {
            let Some((&pad, rest)) = body.split_first() else {
                return false;
            };
            padding = usize::from(pad);
            body = rest;
        }
        let mut priority = None;
        if flags & FLAG_PRIORITY != 0 {
            let Some((fields, rest)) = body.split_first_chunk::<5>() else {
                return false;
            };
            priority = Some(*fields);
            body = rest;
        }
        let Some(fragment_len) = body.len().checked_sub(padding) else {
            return false;
        };
        self.fragment.clear();
        self.fragment.extend_from_slice(&body[..fragment_len]);
        self.start = Some(BlockStart {
            stream_id,
            end_stream: flags & FLAG_END_STREAM != 0,
            priority,
        });
        true
    }

    fn finish_block(&mut self) -> io::Result<Step> {
        let Some(start) = self.start.take() else {
            return Ok(Step::GiveUp(self.take_raw()));
        };
        let mut block = Vec::with_capacity(self.fragment.len() + 16);
        let mut too_large = false;
        let decoded = self.decoder.decode_with_cb(&self.fragment, |name, value| {
            too_large |= block.len() > MAX_HEADER_BLOCK_BYTES;
            if !too_large {
                encode_literal(&mut block, &name, &authority_or(&name, value));
            }
        });
        if decoded.is_err() {
            // h2's own decoder will fail on the same bytes and close the connection with
            // COMPRESSION_ERROR: the client table is unknown from here on, so step aside.
            return Ok(Step::GiveUp(self.take_raw()));
        }
        if too_large {
            return Err(block_too_large());
        }
        self.raw.clear();
        Ok(Step::Forward(frame_block(&start, &block)))
    }

    fn take_raw(&mut self) -> Vec<u8> {
        self.start = None;
        self.fragment.clear();
        std::mem::take(&mut self.raw)
    }
}

fn authority_or<'a>(name: &[u8], value: Cow<'a, [u8]>) -> Cow<'a, [u8]> {
    if name == b":authority" {
        Cow::Borrowed(REWRITTEN_AUTHORITY)
    } else {
        value
    }
}

fn block_too_large() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("HTTP/2 header block over {MAX_HEADER_BLOCK_BYTES} bytes"),
    )
}

fn stream_id_of(frame: &[u8]) -> u32 {
    u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff
}

/// One field as "literal header field without indexing, new name" (first byte 0), strings not
/// Huffman-coded (RFC 7541 section 6.2.2): h2's decoder adds nothing to its table.
fn encode_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x00);
    for string in [name, value] {
        encode_integer(out, string.len(), 7);
        out.extend_from_slice(string);
    }
}

/// An HPACK integer (RFC 7541 section 5.1) with the H bit (Huffman) clear.
fn encode_integer(out: &mut Vec<u8>, mut value: usize, prefix_bits: u8) {
    let max_prefix = (1usize << prefix_bits) - 1;
    if value < max_prefix {
        out.push(value as u8);
        return;
    }
    out.push(max_prefix as u8);
    value -= max_prefix;
    while value >= 0x80 {
        out.push((value & 0x7f) as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// The re-encoded block as a HEADERS frame followed by as many CONTINUATION frames as it needs.
fn frame_block(start: &BlockStart, block: &[u8]) -> Vec<u8> {
    let priority = start.priority.as_ref().map_or(&[][..], |p| &p[..]);
    let first_room = MAX_OUTPUT_FRAME - priority.len();
    let (first, mut rest) = block.split_at(block.len().min(first_room));
    let mut out = Vec::with_capacity(block.len() + priority.len() + 2 * FRAME_HEADER_LEN);
    let mut flags = if start.end_stream { FLAG_END_STREAM } else { 0 };
    if start.priority.is_some() {
        flags |= FLAG_PRIORITY;
    }
    if rest.is_empty() {
        flags |= FLAG_END_HEADERS;
    }
    let payload_len = priority.len() + first.len();
    put_frame_header(&mut out, payload_len, FRAME_HEADERS, flags, start.stream_id);
    out.extend_from_slice(priority);
    out.extend_from_slice(first);
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(rest.len().min(MAX_OUTPUT_FRAME));
        let flags = if tail.is_empty() { FLAG_END_HEADERS } else { 0 };
        put_frame_header(
            &mut out,
            chunk.len(),
            FRAME_CONTINUATION,
            flags,
            start.stream_id,
        );
        out.extend_from_slice(chunk);
        rest = tail;
    }
    out
}

fn put_frame_header(out: &mut Vec<u8>, len: usize, kind: u8, flags: u8, stream_id: u32) {
    out.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream_id.to_be_bytes());
}

/// A client connection whose header blocks are rewritten on the way in; writes pass through.
pub struct AuthorityRewrite<S> {
    inner: S,
    rewriter: HeaderRewriter,
    /// Bytes read ahead: at most one frame header, or one whole HEADERS/CONTINUATION frame.
    pending_in: BytesMut,
    /// Rewritten (or given-up) bytes waiting for hyper to read them.
    pending_out: BytesMut,
    /// Bytes of the current frame still to pass through unchanged (`usize::MAX`: all of them).
    passthrough: usize,
    eof: bool,
}

impl<S> AuthorityRewrite<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            rewriter: HeaderRewriter::new(),
            pending_in: BytesMut::new(),
            pending_out: BytesMut::new(),
            passthrough: PREFACE_LEN,
            eof: false,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AuthorityRewrite<S> {
    /// Reads until `pending_in` holds `need` bytes; false at end of stream. Reads only what is
    /// needed, so the payload of a frame that passes through is never read into this buffer.
    fn poll_fill(&mut self, cx: &mut Context<'_>, need: usize) -> Poll<io::Result<bool>> {
        while self.pending_in.len() < need {
            let start = self.pending_in.len();
            self.pending_in.resize(need, 0);
            let mut read = ReadBuf::new(&mut self.pending_in[start..]);
            let polled = Pin::new(&mut self.inner).poll_read(cx, &mut read);
            let filled = read.filled().len();
            self.pending_in.truncate(start + filled);
            ready!(polled)?;
            if filled == 0 {
                return Poll::Ready(Ok(false));
            }
        }
        Poll::Ready(Ok(true))
    }

    /// Forwards part of a pass-through frame: read-ahead bytes first, then straight from the socket
    /// into the caller's buffer, never more than the frame has left.
    fn poll_passthrough(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.pending_in.is_empty() {
            let n = self
                .passthrough
                .min(self.pending_in.len())
                .min(buf.remaining());
            buf.put_slice(&self.pending_in[..n]);
            self.pending_in.advance(n);
            self.passthrough -= n;
            return Poll::Ready(Ok(()));
        }
        if self.passthrough >= buf.remaining() {
            let before = buf.filled().len();
            ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
            self.passthrough -= buf.filled().len() - before;
            return Poll::Ready(Ok(()));
        }
        let window = buf.initialize_unfilled_to(self.passthrough);
        let mut limited = ReadBuf::new(window);
        ready!(Pin::new(&mut self.inner).poll_read(cx, &mut limited))?;
        let n = limited.filled().len();
        buf.advance(n);
        self.passthrough -= n;
        Poll::Ready(Ok(()))
    }

    /// Reads the next frame's header and decides whether it passes through or is rewritten.
    fn poll_next_frame(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !ready!(self.poll_fill(cx, FRAME_HEADER_LEN))? {
            self.end_of_stream();
            return Poll::Ready(Ok(()));
        }
        let len = u32::from_be_bytes([
            0,
            self.pending_in[0],
            self.pending_in[1],
            self.pending_in[2],
        ]);
        let kind = self.pending_in[3];
        let frame_len = FRAME_HEADER_LEN + len as usize;
        let rewritten = matches!(kind, FRAME_HEADERS | FRAME_CONTINUATION);
        if !rewritten && !self.rewriter.in_block() {
            self.passthrough = frame_len;
            return Poll::Ready(Ok(()));
        }
        if frame_len > MAX_HEADER_BLOCK_BYTES {
            return Poll::Ready(Err(block_too_large()));
        }
        if !ready!(self.poll_fill(cx, frame_len))? {
            self.end_of_stream();
            return Poll::Ready(Ok(()));
        }
        let frame = self.pending_in.split_to(frame_len);
        match self.rewriter.push(&frame)? {
            Step::NeedContinuation => {}
            Step::Forward(bytes) => self.pending_out.put_slice(&bytes),
            Step::GiveUp(bytes) => {
                self.pending_out.put_slice(&bytes);
                self.passthrough = usize::MAX;
            }
        }
        Poll::Ready(Ok(()))
    }

    /// At end of stream whatever was held back goes to hyper as it came (it will see a truncated
    /// frame and close).
    fn end_of_stream(&mut self) {
        let held = self.rewriter.take_raw();
        self.pending_out.put_slice(&held);
        let read_ahead = self.pending_in.split();
        self.pending_out.put_slice(&read_ahead);
        self.eof = true;
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityRewrite<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            if !this.pending_out.is_empty() {
                let n = this.pending_out.len().min(buf.remaining());
                buf.put_slice(&this.pending_out[..n]);
                this.pending_out.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            if this.passthrough > 0 {
                return this.poll_passthrough(cx, buf);
            }
            ready!(this.poll_next_frame(cx))?;
        }
    }
}

super::write_through::write_through_to_inner!(AuthorityRewrite);

#[cfg(test)]
#[path = "uds_authority_tests.rs"]
mod tests;
