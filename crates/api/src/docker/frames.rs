//! The Docker Engine API's multiplexed stream (attach and logs of a container without a TTY):
//! each frame is a header of one stream byte (0 stdin, 1 stdout, 2 stderr), three zero bytes
//! and a big-endian u32 length, then that many bytes of output.

use cela_instance::log::Stream;

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
