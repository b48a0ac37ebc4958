//! `cela-init nc`: a tiny netcat for vsock and Unix sockets (busybox's `nc` speaks neither),
//! for tests and for users: `cela-init nc ADDR` connects, `cela-init nc -l ADDR` accepts one
//! connection; then standard input goes to the socket (its end shuts the socket's sending
//! side) and the socket's bytes go to standard output until the peer's end-of-file. It exits
//! when both directions are done.
//!
//! ADDR is `vsock:CID:PORT` (connect), `vsock:PORT` (listen) or `unix:PATH` (either).

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};

use super::vsock;

/// A parsed ADDR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addr {
    Vsock { cid: u32, port: u32 },
    VsockListen { port: u32 },
    Unix(String),
}

/// Parses ADDR for connecting (`listen` false) or listening.
pub fn parse_addr(text: &str, listen: bool) -> Result<Addr, String> {
    if let Some(path) = text.strip_prefix("unix:") {
        return Ok(Addr::Unix(path.to_owned()));
    }
    let Some(rest) = text.strip_prefix("vsock:") else {
        return Err(format!(
            "{text}: not vsock:CID:PORT, vsock:PORT or unix:PATH"
        ));
    };
    let number = |s: &str| {
        s.parse::<u32>()
            .map_err(|_| format!("{text}: {s:?} is not a number"))
    };
    match (rest.split_once(':'), listen) {
        (Some((cid, port)), false) => Ok(Addr::Vsock {
            cid: number(cid)?,
            port: number(port)?,
        }),
        (None, true) => Ok(Addr::VsockListen {
            port: number(rest)?,
        }),
        (Some(_), true) => Err(format!("{text}: to listen, give vsock:PORT")),
        (None, false) => Err(format!("{text}: to connect, give vsock:CID:PORT")),
    }
}

/// A connected socket.
enum Socket {
    Vsock(File),
    Unix(UnixStream),
}

fn open(addr: &Addr) -> io::Result<Socket> {
    Ok(match addr {
        Addr::Vsock { cid, port } => Socket::Vsock(vsock::connect_to(*cid, *port)?),
        Addr::VsockListen { port } => {
            let listener = vsock::listen_on(*port)?;
            Socket::Vsock(vsock::accept_one(&listener)?)
        }
        Addr::Unix(path) => Socket::Unix(UnixStream::connect(path)?),
    })
}

fn open_listen_unix(path: &str) -> io::Result<Socket> {
    let listener = UnixListener::bind(path)?;
    let (stream, _) = listener.accept()?;
    let _ = std::fs::remove_file(path);
    Ok(Socket::Unix(stream))
}

/// Copies standard input to the socket on a thread (then shuts the socket's sending side) and
/// the socket to standard output until end-of-file.
fn relay(socket: Socket) -> io::Result<()> {
    type Halves = (
        Box<dyn Read + Send>,
        Box<dyn Write + Send>,
        Box<dyn FnOnce() + Send>,
    );
    let (mut reader, mut writer, shut): Halves = match socket {
        Socket::Vsock(f) => {
            let w = f.try_clone()?;
            let s = f.try_clone()?;
            (
                Box::new(f),
                Box::new(w),
                Box::new(move || {
                    let _ = vsock::shutdown_write(&s);
                }),
            )
        }
        Socket::Unix(u) => {
            let w = u.try_clone()?;
            let s = u.try_clone()?;
            (
                Box::new(u),
                Box::new(w),
                Box::new(move || {
                    let _ = s.shutdown(Shutdown::Write);
                }),
            )
        }
    };
    let sender = std::thread::spawn(move || {
        let _ = io::copy(&mut io::stdin().lock(), &mut writer);
        shut();
    });
    let mut out = io::stdout().lock();
    io::copy(&mut reader, &mut out)?;
    out.flush()?;
    // Done when both directions are: the peer's end-of-file and our standard input's.
    let _ = sender.join();
    Ok(())
}

/// The applet's entry point; returns the exit status.
pub fn main(args: &[String]) -> i32 {
    let (listen, addr) = match args {
        [flag, addr] if flag == "-l" => (true, addr),
        [addr] => (false, addr),
        _ => {
            eprintln!("usage: cela-init nc [-l] vsock:CID:PORT | vsock:PORT | unix:PATH");
            return 2;
        }
    };
    let addr = match parse_addr(addr, listen) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("cela-init nc: {e}");
            return 2;
        }
    };
    let socket = match (&addr, listen) {
        (Addr::Unix(path), true) => open_listen_unix(path),
        _ => open(&addr),
    };
    match socket.and_then(relay) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!(
                "cela-init nc: {}: {e}",
                args.last().map_or("", String::as_str)
            );
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            parse_addr("vsock:2:5000", false),
            Ok(Addr::Vsock { cid: 2, port: 5000 })
        );
        assert_eq!(
            parse_addr("vsock:5000", true),
            Ok(Addr::VsockListen { port: 5000 })
        );
        assert_eq!(parse_addr("unix:/a/b", true), Ok(Addr::Unix("/a/b".into())));
        assert!(parse_addr("vsock:5000", false).is_err());
        assert!(parse_addr("vsock:2:5000", true).is_err());
        assert!(
            parse_addr("vsock:x:1", false)
                .unwrap_err()
                .contains("\"x\"")
        );
        assert!(parse_addr("tcp:1", false).is_err());
    }
}
