//! Framed input for a terminal: the attach protocol of an instance's supervisor
//! (`cela_instance::attach`), and the console input a supervisor hands a microVM's monitor
//! ([`crate::ConsoleMode::Framed`]). A frame is a kind byte, a big-endian u32 length and that
//! many bytes: data, the end of input, or a new size (rows and columns, two big-endian u16).

use std::io::{self, Read};

/// The longest frame read.
pub const MAX_FRAME: usize = 64 * 1024;

const DATA: u8 = 0;
const EOF: u8 = 1;
const RESIZE: u8 = 2;

/// One piece of input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    Data(Vec<u8>),
    Eof,
    Resize { rows: u16, cols: u16 },
}

impl Input {
    pub fn encode(&self) -> Vec<u8> {
        let (kind, body) = match self {
            Input::Data(d) => (DATA, d.clone()),
            Input::Eof => (EOF, Vec::new()),
            Input::Resize { rows, cols } => {
                let mut b = rows.to_be_bytes().to_vec();
                b.extend_from_slice(&cols.to_be_bytes());
                (RESIZE, b)
            }
        };
        let mut out = vec![kind];
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// Reads one frame; `Ok(None)` at a clean end of the stream.
    pub fn read(r: &mut impl Read) -> io::Result<Option<Input>> {
        let mut head = [0u8; 5];
        match r.read_exact(&mut head) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        if len > MAX_FRAME {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("an input frame of {len} bytes (at most {MAX_FRAME})"),
            ));
        }
        let mut body = vec![0u8; len];
        r.read_exact(&mut body)?;
        match (head[0], body.as_slice()) {
            (DATA, _) => Ok(Some(Input::Data(body))),
            (EOF, []) => Ok(Some(Input::Eof)),
            (RESIZE, [r0, r1, c0, c1]) => Ok(Some(Input::Resize {
                rows: u16::from_be_bytes([*r0, *r1]),
                cols: u16::from_be_bytes([*c0, *c1]),
            })),
            (kind, _) => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("an input frame of kind {kind} and {len} bytes"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_bad_ones_end_the_stream() {
        let inputs = [
            Input::Data(b"echo hi\n".to_vec()),
            Input::Resize {
                rows: 30,
                cols: 100,
            },
            Input::Eof,
        ];
        let bytes: Vec<u8> = inputs.iter().flat_map(Input::encode).collect();
        let mut r = bytes.as_slice();
        for want in &inputs {
            assert_eq!(Input::read(&mut r).unwrap().as_ref(), Some(want));
        }
        assert_eq!(Input::read(&mut r).unwrap(), None);
        let huge = [0u8, 0xff, 0xff, 0xff, 0xff];
        assert!(Input::read(&mut huge.as_slice()).is_err());
        let odd = [RESIZE, 0, 0, 0, 1, 7];
        assert!(Input::read(&mut odd.as_slice()).is_err());
        let unknown = [9u8, 0, 0, 0, 0];
        assert!(Input::read(&mut unknown.as_slice()).is_err());
    }
}
