use super::*;
use crate::server::budget::MemoryBudget;
use std::io::Write;

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

fn framed(compressed: bool, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![u8::from(compressed)];
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

fn reservation(limit: u64) -> Arc<Reservation> {
    Arc::new(MemoryBudget::new(limit, Arc::default()).reservation())
}

/// Feeds `input` in frames of `frame` bytes; the plain stream, or the first error's text.
/// A decoder of `compression` charging `r`, holding `hold`, with a 1 MiB message limit.
fn gunzip(compression: Compression, r: &Arc<Reservation>, hold: Hold) -> Gunzip {
    Gunzip::new(compression, Arc::clone(r), hold, 1 << 20)
}

fn run(gunzip: &mut Gunzip, input: &[u8], frame: usize) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    for piece in input.chunks(frame) {
        gunzip.feed(Bytes::copy_from_slice(piece));
        while let Some(plain) = gunzip.next_frame().map_err(|e| e.to_string())? {
            out.extend_from_slice(&plain);
        }
    }
    assert!(gunzip.is_idle());
    Ok(out)
}

#[test]
fn compressed_messages_become_plain_ones_in_order_and_their_size_is_reserved() {
    let first: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let second = b"plain message".to_vec();
    let mut input = framed(true, &gzip(&first));
    input.extend(framed(false, &second));
    input.extend(framed(true, &gzip(b"")));
    let mut expected = framed(false, &first);
    expected.extend(framed(false, &second));
    expected.extend(framed(false, b""));
    for frame in [1, 7, 4096, input.len()] {
        let r = reservation(0);
        let mut gunzip = gunzip(Compression::Gzip, &r, Hold::UntilDropped);
        assert_eq!(
            run(&mut gunzip, &input, frame).unwrap(),
            expected,
            "frames of {frame}"
        );
        assert_eq!(r.bytes(), first.len() as u64);
    }
    // A stream gives each message's size back once it was handed on.
    let r = reservation(0);
    let mut gunzip = gunzip(Compression::Gzip, &r, Hold::PerMessage);
    run(&mut gunzip, &input, 4096).unwrap();
    assert_eq!(r.bytes(), 0);
}

#[test]
fn a_bomb_is_refused_before_it_is_decompressed_into_memory() {
    let bomb = gzip(&vec![0u8; 8 << 20]);
    assert!(bomb.len() < 64 << 10);
    let r = reservation(0);
    let mut gunzip = gunzip(Compression::Gzip, &r, Hold::UntilDropped);
    let error = run(&mut gunzip, &framed(true, &bomb), 1 << 20).unwrap_err();
    assert!(
        error.contains("size limit, of 1048576 bytes, exceeded"),
        "{error}"
    );
    assert_eq!(r.bytes(), 0, "nothing of it was reserved or allocated");
}

#[test]
fn the_decompressed_size_must_fit_the_budget() {
    let r = reservation(100_000);
    let mut gunzip = gunzip(Compression::Deflate, &r, Hold::UntilDropped);
    let mut encoder = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(&[1u8; 200_000]).unwrap();
    let error = run(&mut gunzip, &framed(true, &encoder.finish().unwrap()), 512).unwrap_err();
    assert!(error.contains("--max-inflight-bytes 100000"), "{error}");
    assert_eq!(r.bytes(), 0);
}

#[test]
fn broken_compressed_data_is_an_error() {
    let mut gunzip = gunzip(Compression::Gzip, &reservation(0), Hold::UntilDropped);
    let error = run(&mut gunzip, &framed(true, b"not gzip at all"), 64).unwrap_err();
    assert!(error.contains("Error decompressing"), "{error}");
}
