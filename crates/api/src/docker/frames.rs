//! The Docker Engine API's streams (attach, exec, logs): the multiplexed stream of a process
//! without a TTY — each frame is a header of one stream byte (0 stdin, 1 stdout, 2 stderr),
//! three zero bytes and a big-endian u32 length, then that many bytes of output — or the raw
//! bytes of a terminal; and the `101 UPGRADED` answer that hijacks a connection for them.

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use cela_instance::log::Stream;

/// The content type of a stream: raw with a terminal, multiplexed without.
pub fn content_type(tty: bool) -> HeaderValue {
    HeaderValue::from_static(if tty {
        "application/vnd.docker.raw-stream"
    } else {
        "application/vnd.docker.multiplexed-stream"
    })
}

/// The answer that hands the connection over to a stream (`Upgrade: tcp`).
pub fn switching_protocols(tty: bool) -> Response {
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, content_type(tty));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("tcp"));
    resp
}

/// A resize's query: `h` rows, `w` columns.
#[derive(serde::Deserialize)]
pub struct ResizeQuery {
    pub h: Option<u16>,
    pub w: Option<u16>,
}

/// The largest payload put in one frame (longer output is split).
const MAX_FRAME: usize = 1 << 20;

/// Appends `data` from `stream` to `out` as frames.
pub fn frame(out: &mut Vec<u8>, stream: Stream, data: &[u8]) {
    let kind = match stream {
        Stream::Stdout => 1u8,
        Stream::Stderr => 2u8,
    };
    for chunk in data.chunks(MAX_FRAME) {
        out.extend_from_slice(&[kind, 0, 0, 0]);
        out.extend_from_slice(&(chunk.len() as u32).to_be_bytes());
        out.extend_from_slice(chunk);
    }
}

/// The detach keys of an attach or exec: as given, or Ctrl-P Ctrl-Q when not given (an empty
/// value, which the docker CLI always sends, is not given); only with a terminal, as dockerd
/// (piped input is passed on whole, whatever bytes it holds).
pub fn detach_keys(given: Option<&str>, tty: bool) -> Result<Vec<u8>, crate::ApiError> {
    if !tty {
        return Ok(Vec::new());
    }
    match given.filter(|k| !k.is_empty()) {
        Some(k) => Ok(cela_instance::attach::parse_detach_keys(k)?),
        None => Ok(vec![16, 17]),
    }
}

/// Reads a hijacked connection's input into `to`, chunk by chunk, then `None` at its end
/// (the client's half-close, or the connection gone). `to` is bounded: a client sending
/// faster than the workload reads is held back by its connection.
pub async fn read_input(
    mut from: impl tokio::io::AsyncRead + Unpin,
    to: tokio::sync::mpsc::Sender<Option<Vec<u8>>>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match tokio::io::AsyncReadExt::read(&mut from, &mut buf).await {
            Ok(0) | Err(_) => {
                let _ = to.send(None).await;
                return;
            }
            Ok(n) => {
                if to.send(Some(buf[..n].to_vec())).await.is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_carry_stream_and_big_endian_length() {
        let mut out = Vec::new();
        frame(&mut out, Stream::Stdout, b"hi\n");
        frame(&mut out, Stream::Stderr, b"");
        frame(&mut out, Stream::Stderr, b"e");
        assert_eq!(
            out,
            [
                1, 0, 0, 0, 0, 0, 0, 3, b'h', b'i', b'\n', 2, 0, 0, 0, 0, 0, 0, 1, b'e'
            ],
            "an empty write makes no frame"
        );
    }
}
