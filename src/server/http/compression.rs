//! gzip / deflate request and response bodies (`Content-Encoding`, `Accept-Encoding`), as Triton's
//! HTTP server and `tritonclient.http`'s `request_compression_algorithm` use them. A compressed
//! request is inflated into at most the body limit: a small bomb fails at the limit, not at OOM.
use std::io::{Read as _, Write as _};

use axum::http::{HeaderMap, StatusCode};
use bytes::Bytes;
use flate2::read::{GzDecoder, ZlibDecoder};
use flate2::write::{GzEncoder, ZlibEncoder};
use flate2::Compression;

use super::error::HttpError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    Gzip,
    /// HTTP's "deflate" is the zlib format (RFC 9110), which is what clients send.
    Deflate,
}

impl Coding {
    pub fn name(self) -> &'static str {
        match self {
            Coding::Gzip => "gzip",
            Coding::Deflate => "deflate",
        }
    }
}

/// The request body as sent, inflated when `Content-Encoding` says so, at most `limit` bytes.
pub fn request_body(headers: &HeaderMap, body: Bytes, limit: usize) -> Result<Bytes, HttpError> {
    let Some(encoding) = headers.get(axum::http::header::CONTENT_ENCODING) else {
        return Ok(body);
    };
    let encoding = encoding.to_str().unwrap_or("").trim().to_ascii_lowercase();
    let mut out = Vec::new();
    let read = match encoding.as_str() {
        "" | "identity" => return Ok(body),
        "gzip" | "x-gzip" => GzDecoder::new(&body[..])
            .take(limit as u64 + 1)
            .read_to_end(&mut out),
        "deflate" => ZlibDecoder::new(&body[..])
            .take(limit as u64 + 1)
            .read_to_end(&mut out),
        other => {
            return Err(HttpError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("unsupported Content-Encoding '{other}'; use gzip, deflate or identity"),
            ))
        }
    };
    read.map_err(|e| HttpError::bad_request(format!("request body is not valid {encoding}: {e}")))?;
    if out.len() > limit {
        return Err(HttpError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("decompressed request body exceeds the limit of {limit} bytes (--http-max-body-bytes)"),
        ));
    }
    Ok(Bytes::from(out))
}

/// The coding to answer with: the first of gzip / deflate the client accepts (q > 0).
pub fn response_coding(headers: &HeaderMap) -> Option<Coding> {
    let accept = headers
        .get(axum::http::header::ACCEPT_ENCODING)?
        .to_str()
        .ok()?;
    accept.split(',').find_map(|item| {
        let mut parts = item.split(';');
        let coding = parts.next()?.trim().to_ascii_lowercase();
        let refused = parts.any(|p| {
            p.trim()
                .strip_prefix("q=")
                .and_then(|q| q.parse::<f32>().ok())
                .is_some_and(|q| q <= 0.0)
        });
        match coding.as_str() {
            _ if refused => None,
            "gzip" => Some(Coding::Gzip),
            "deflate" => Some(Coding::Deflate),
            _ => None,
        }
    })
}

/// Compresses a response body.
pub fn compress(coding: Coding, body: &[u8]) -> std::io::Result<Vec<u8>> {
    match coding {
        Coding::Gzip => {
            let mut e = GzEncoder::new(Vec::with_capacity(body.len() / 2), Compression::fast());
            e.write_all(body)?;
            e.finish()
        }
        Coding::Deflate => {
            let mut e = ZlibEncoder::new(Vec::with_capacity(body.len() / 2), Compression::fast());
            e.write_all(body)?;
            e.finish()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inflates_within_the_limit_only() {
        let mut headers = HeaderMap::new();
        headers.insert("content-encoding", "gzip".parse().unwrap());
        let packed = compress(Coding::Gzip, &[7u8; 10_000]).unwrap();
        let body = request_body(&headers, Bytes::from(packed.clone()), 10_000).unwrap();
        assert_eq!(body.len(), 10_000);
        let bomb = request_body(&headers, Bytes::from(packed), 9_999).unwrap_err();
        assert_eq!(bomb.status, StatusCode::PAYLOAD_TOO_LARGE);
        let broken = request_body(&headers, Bytes::from_static(b"not gzip"), 100).unwrap_err();
        assert_eq!(broken.status, StatusCode::BAD_REQUEST);
        headers.insert("content-encoding", "deflate".parse().unwrap());
        let packed = compress(Coding::Deflate, b"hello").unwrap();
        assert_eq!(
            request_body(&headers, Bytes::from(packed), 100)
                .unwrap()
                .as_ref(),
            b"hello"
        );
        headers.insert("content-encoding", "br".parse().unwrap());
        assert_eq!(
            request_body(&headers, Bytes::new(), 1).unwrap_err().status,
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        );
    }

    #[test]
    fn picks_an_accepted_coding() {
        let mut headers = HeaderMap::new();
        assert_eq!(response_coding(&headers), None);
        headers.insert("accept-encoding", "br, gzip;q=0, deflate".parse().unwrap());
        assert_eq!(response_coding(&headers), Some(Coding::Deflate));
        headers.insert("accept-encoding", "gzip, deflate".parse().unwrap());
        assert_eq!(response_coding(&headers), Some(Coding::Gzip));
    }
}
