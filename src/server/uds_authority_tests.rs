use super::*;
use loona_hpack::Encoder;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SOCKET_AUTHORITY: &[u8] = b"%2Ftmp%2Fgateway.sock";

fn request_headers(authority: &[u8], path: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    [
        (&b":method"[..], &b"POST"[..]),
        (b":scheme", b"http"),
        (b":path", path),
        (b":authority", authority),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
    ]
    .into_iter()
    .map(|(n, v)| (n.to_vec(), v.to_vec()))
    .collect()
}

fn encode(encoder: &mut Encoder, headers: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    encoder.encode(headers.iter().map(|(n, v)| (&n[..], &v[..])))
}

fn frame(kind: u8, flags: u8, stream_id: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    put_frame_header(&mut out, payload.len(), kind, flags, stream_id);
    out.extend_from_slice(payload);
    out
}

/// Splits frames back out of bytes: (kind, flags, stream id, payload).
fn parse_frames(mut bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
    let mut frames = Vec::new();
    while !bytes.is_empty() {
        let len = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]) as usize;
        let end = FRAME_HEADER_LEN + len;
        frames.push((
            bytes[3],
            bytes[4],
            stream_id_of(bytes),
            bytes[FRAME_HEADER_LEN..end].to_vec(),
        ));
        bytes = &bytes[end..];
    }
    frames
}

/// Decodes a forwarded block the way h2 does: a decoder of its own, whose table must stay empty.
fn decode_forwarded(decoder: &mut Decoder, forwarded: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut block = Vec::new();
    for (kind, flags, _, payload) in parse_frames(forwarded) {
        let skip = if kind == FRAME_HEADERS && flags & FLAG_PRIORITY != 0 {
            5
        } else {
            0
        };
        block.extend_from_slice(&payload[skip..]);
    }
    decoder.decode(&block).expect("the forwarded block decodes")
}

fn forwarded(step: Step) -> Vec<u8> {
    match step {
        Step::Forward(bytes) => bytes,
        other => panic!("expected a rewritten block, got {other:?}"),
    }
}

#[test]
fn authority_is_replaced_and_every_other_field_kept_in_order() {
    let mut client = Encoder::new();
    let mut rewriter = HeaderRewriter::new();
    let mut server = Decoder::new();
    let headers = request_headers(
        SOCKET_AUTHORITY,
        b"/inference.GRPCInferenceService/ModelInfer",
    );
    let block = encode(&mut client, &headers);
    let out = forwarded(
        rewriter
            .push(&frame(FRAME_HEADERS, FLAG_END_HEADERS, 1, &block))
            .unwrap(),
    );
    let mut expected = headers.clone();
    expected[3].1 = b"localhost".to_vec();
    assert_eq!(decode_forwarded(&mut server, &out), expected);
    let frames = parse_frames(&out);
    assert_eq!(frames.len(), 1);
    assert_eq!(
        (frames[0].0, frames[0].1, frames[0].2),
        (FRAME_HEADERS, FLAG_END_HEADERS, 1)
    );
}

#[test]
fn the_client_dynamic_table_is_followed_across_requests() {
    let mut client = Encoder::new();
    let mut rewriter = HeaderRewriter::new();
    let mut server = Decoder::new();
    for (i, stream_id) in (1..40).step_by(2).enumerate() {
        // Same fields each time (indexed from the client's table after the first) and one that
        // changes, so entries are added and evicted.
        let path = format!("/inference.GRPCInferenceService/Model{}", i % 3);
        let mut headers = request_headers(SOCKET_AUTHORITY, path.as_bytes());
        headers.push((format!("x-request-{i}").into_bytes(), vec![b'v'; 700]));
        let block = encode(&mut client, &headers);
        let step = rewriter.push(&frame(
            FRAME_HEADERS,
            FLAG_END_HEADERS | FLAG_END_STREAM,
            stream_id,
            &block,
        ));
        let out = forwarded(step.unwrap());
        assert_eq!(parse_frames(&out)[0].1 & FLAG_END_STREAM, FLAG_END_STREAM);
        let decoded = decode_forwarded(&mut server, &out);
        assert_eq!(decoded[3], (b":authority".to_vec(), b"localhost".to_vec()));
        assert_eq!(decoded[2].1, path.as_bytes());
        assert_eq!(decoded.len(), headers.len());
        assert_eq!(decoded.last(), headers.last());
    }
}

#[test]
fn a_block_split_over_continuation_frames_is_forwarded_whole() {
    let mut client = Encoder::new();
    let mut rewriter = HeaderRewriter::new();
    let block = encode(&mut client, &request_headers(SOCKET_AUTHORITY, b"/a"));
    let (one, rest) = block.split_at(5);
    let (two, three) = rest.split_at(7);
    assert_eq!(
        rewriter.push(&frame(FRAME_HEADERS, 0, 3, one)).unwrap(),
        Step::NeedContinuation
    );
    assert_eq!(
        rewriter
            .push(&frame(FRAME_CONTINUATION, 0, 3, two))
            .unwrap(),
        Step::NeedContinuation
    );
    let out = forwarded(
        rewriter
            .push(&frame(FRAME_CONTINUATION, FLAG_END_HEADERS, 3, three))
            .unwrap(),
    );
    let decoded = decode_forwarded(&mut Decoder::new(), &out);
    assert_eq!(decoded[3].1, b"localhost");
}

#[test]
fn padding_and_priority_are_read_and_priority_is_kept() {
    let mut client = Encoder::new();
    let mut rewriter = HeaderRewriter::new();
    let block = encode(&mut client, &request_headers(SOCKET_AUTHORITY, b"/a"));
    let mut payload = vec![3u8];
    payload.extend_from_slice(&[0, 0, 0, 0, 15]);
    payload.extend_from_slice(&block);
    payload.extend_from_slice(&[0, 0, 0]);
    let flags = FLAG_END_HEADERS | FLAG_PADDED | FLAG_PRIORITY;
    let out = forwarded(
        rewriter
            .push(&frame(FRAME_HEADERS, flags, 5, &payload))
            .unwrap(),
    );
    let frames = parse_frames(&out);
    assert_eq!(frames[0].1, FLAG_END_HEADERS | FLAG_PRIORITY);
    assert_eq!(&frames[0].3[..5], &[0, 0, 0, 0, 15]);
    assert_eq!(
        decode_forwarded(&mut Decoder::new(), &out)[3].1,
        b"localhost"
    );
}

#[test]
fn a_large_rewritten_block_is_split_into_frames_hyper_accepts() {
    let mut client = Encoder::new();
    let mut rewriter = HeaderRewriter::new();
    let mut headers = request_headers(SOCKET_AUTHORITY, b"/a");
    for i in 0..5 {
        headers.push((format!("x-big-{i}").into_bytes(), vec![b'x'; 9_000]));
    }
    let block = encode(&mut client, &headers);
    let mut frames_in = Vec::new();
    for (i, chunk) in block.chunks(MAX_OUTPUT_FRAME).enumerate() {
        let kind = if i == 0 {
            FRAME_HEADERS
        } else {
            FRAME_CONTINUATION
        };
        frames_in.push(frame(kind, 0, 7, chunk));
    }
    let last = frames_in.len() - 1;
    frames_in[last][4] = FLAG_END_HEADERS;
    let mut out = Vec::new();
    for f in &frames_in {
        if let Step::Forward(bytes) = rewriter.push(f).unwrap() {
            out = bytes;
        }
    }
    let frames = parse_frames(&out);
    assert!(frames.len() > 1);
    assert!(frames.iter().all(|f| f.3.len() <= MAX_OUTPUT_FRAME));
    assert!(frames[1..]
        .iter()
        .all(|f| f.0 == FRAME_CONTINUATION && f.2 == 7));
    assert_eq!(
        frames
            .iter()
            .filter(|f| f.1 & FLAG_END_HEADERS != 0)
            .count(),
        1
    );
    assert_eq!(
        frames.last().unwrap().1 & FLAG_END_HEADERS,
        FLAG_END_HEADERS
    );
    assert_eq!(
        decode_forwarded(&mut Decoder::new(), &out).len(),
        headers.len()
    );
}

#[test]
fn what_cannot_be_understood_is_forwarded_unchanged() {
    // An index far past both tables: h2 will answer COMPRESSION_ERROR itself.
    let garbage = frame(
        FRAME_HEADERS,
        FLAG_END_HEADERS,
        1,
        &[0xff, 0xff, 0xff, 0x0f],
    );
    assert_eq!(
        HeaderRewriter::new().push(&garbage).unwrap(),
        Step::GiveUp(garbage.clone())
    );
    // Padding longer than the frame.
    let bad_padding = frame(FRAME_HEADERS, FLAG_END_HEADERS | FLAG_PADDED, 1, &[9, 0x82]);
    assert_eq!(
        HeaderRewriter::new().push(&bad_padding).unwrap(),
        Step::GiveUp(bad_padding.clone())
    );
    // A CONTINUATION for another stream than the open block's.
    let mut rewriter = HeaderRewriter::new();
    let first = frame(FRAME_HEADERS, 0, 1, &[0x82]);
    assert_eq!(rewriter.push(&first).unwrap(), Step::NeedContinuation);
    let other = frame(FRAME_CONTINUATION, FLAG_END_HEADERS, 3, &[0x86]);
    let mut both = first.clone();
    both.extend_from_slice(&other);
    assert_eq!(rewriter.push(&other).unwrap(), Step::GiveUp(both));
}

#[test]
fn an_endless_header_block_is_refused_not_buffered() {
    let mut rewriter = HeaderRewriter::new();
    rewriter.push(&frame(FRAME_HEADERS, 0, 1, &[0x82])).unwrap();
    let chunk = frame(FRAME_CONTINUATION, 0, 1, &[0u8; MAX_OUTPUT_FRAME]);
    let mut result = Ok(Step::NeedContinuation);
    for _ in 0..(MAX_HEADER_BLOCK_BYTES / MAX_OUTPUT_FRAME + 1) {
        result = rewriter.push(&chunk);
        if result.is_err() {
            break;
        }
    }
    assert_eq!(result.unwrap_err().kind(), io::ErrorKind::InvalidData);
}

#[tokio::test]
async fn a_connection_passes_data_through_and_rewrites_headers() {
    let (mut client, server) = tokio::io::duplex(64 * 1024);
    let mut rewritten = AuthorityRewrite::new(server);
    let mut encoder = Encoder::new();
    let mut sent = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    sent.extend(frame(0x4, 0, 0, &[]));
    sent.extend(frame(
        FRAME_HEADERS,
        FLAG_END_HEADERS,
        1,
        &encode(&mut encoder, &request_headers(SOCKET_AUTHORITY, b"/a")),
    ));
    let body: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    for chunk in body.chunks(MAX_OUTPUT_FRAME) {
        sent.extend(frame(0x0, 0, 1, chunk));
    }
    sent.extend(frame(0x0, FLAG_END_STREAM, 1, &[]));
    let writer = tokio::spawn(async move {
        client.write_all(&sent).await.unwrap();
        client.shutdown().await.unwrap();
        client
    });
    let mut received = Vec::new();
    rewritten.read_to_end(&mut received).await.unwrap();
    drop(writer.await.unwrap());
    assert_eq!(
        &received[..PREFACE_LEN],
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    );
    let frames = parse_frames(&received[PREFACE_LEN..]);
    assert_eq!(frames[0].0, 0x4);
    let headers = Decoder::new().decode(&frames[1].3).unwrap();
    assert_eq!(headers[3].1, b"localhost");
    let data: Vec<u8> = frames[2..].iter().flat_map(|f| f.3.clone()).collect();
    assert_eq!(data, body);
}
