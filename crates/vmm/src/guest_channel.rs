//! The host end of cela-init's vsock channel (KVM engine): the three internal vsock ports of
//! the boot contract (`cela_guest::VSOCK_*_PORT`). The command's standard output and error are
//! copied to this process's own, each on its own thread; control lines (`ready`, `exit N`)
//! reach the [`StopSignal`]. After `exit N`, the control connection is closed only once every
//! output stream the guest opened has been written out, which is the init's signal that it
//! may power off.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex};

use cela_guest::{VSOCK_CONTROL_PORT, VSOCK_STDERR_PORT, VSOCK_STDOUT_PORT};

use crate::devices::virtio::vsock::PortHandler;
use crate::stop::StopSignal;

/// Makes the host-side writer of an output stream.
pub type SinkFactory = Box<dyn Fn() -> Box<dyn Write + Send> + Send>;

/// Output streams opened and finished.
#[derive(Default)]
struct Outputs {
    counts: Mutex<(u32, u32)>,
    done: Condvar,
}

impl Outputs {
    fn opened(&self) {
        self.counts.lock().unwrap_or_else(|p| p.into_inner()).0 += 1;
    }

    fn finished(&self) {
        self.counts.lock().unwrap_or_else(|p| p.into_inner()).1 += 1;
        self.done.notify_all();
    }

    fn wait_all_finished(&self) {
        let guard = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        drop(
            self.done
                .wait_while(guard, |(opened, finished)| finished < opened),
        );
    }
}

/// The internal ports and their handlers: standard output to `stdout()`, standard error to
/// `stderr()`, control messages to `stop`.
pub fn ports(
    stop: Arc<StopSignal>,
    stdout: SinkFactory,
    stderr: SinkFactory,
) -> Vec<(u32, PortHandler)> {
    let outputs = Arc::new(Outputs::default());
    let output = |sink: SinkFactory, name: &'static str| -> PortHandler {
        let outputs = outputs.clone();
        Box::new(move |stream: UnixStream| {
            outputs.opened();
            let outputs = outputs.clone();
            let sink = sink();
            let spawned = std::thread::Builder::new()
                .name(format!("guest-{name}"))
                .spawn(move || {
                    copy_out(stream, sink);
                    outputs.finished();
                });
            if let Err(e) = spawned {
                tracing::warn!("cannot start a thread for the guest's {name}: {e}");
            }
        })
    };
    let stdout_handler = output(stdout, "stdout");
    let stderr_handler = output(stderr, "stderr");
    let control: PortHandler = Box::new(move |stream: UnixStream| {
        let stop = stop.clone();
        let outputs = outputs.clone();
        let spawned = std::thread::Builder::new()
            .name("guest-control".into())
            .spawn(move || serve_control(stream, &stop, &outputs));
        if let Err(e) = spawned {
            tracing::warn!("cannot start the guest control thread: {e}");
        }
    });
    vec![
        (VSOCK_CONTROL_PORT, control),
        (VSOCK_STDOUT_PORT, stdout_handler),
        (VSOCK_STDERR_PORT, stderr_handler),
    ]
}

/// Copies a guest output stream to `sink` until end-of-file. If the sink fails (a closed
/// pipe), the rest is read and discarded, so the guest is never left blocked.
fn copy_out(mut stream: UnixStream, mut sink: Box<dyn Write + Send>) {
    let mut buf = vec![0u8; 256 << 10];
    let mut sink_ok = true;
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        if sink_ok
            && sink
                .write_all(&buf[..n])
                .and_then(|()| sink.flush())
                .is_err()
        {
            sink_ok = false;
        }
    }
}

/// The control port: `ready` and `exit N` to the stop signal; after the exit, once both output
/// streams are written out, the connection is closed, which tells the init it may power off.
/// Meanwhile the host may send requests on it ([`StopSignal::send_to_guest`]).
fn serve_control(stream: UnixStream, stop: &StopSignal, outputs: &Outputs) {
    if let Ok(writer) = stream.try_clone() {
        stop.attach_guest_channel(writer);
    }
    stop.follow_control(&stream, || {
        stop.detach_guest_channel();
        outputs.wait_all_finished();
        let _ = stream.shutdown(Shutdown::Both);
        true
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink that appends to a shared buffer.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn factory(s: &Shared) -> SinkFactory {
        let s = s.clone();
        Box::new(move || Box::new(s.clone()))
    }

    #[test]
    fn exit_is_acknowledged_only_after_the_outputs_are_written() {
        let stop = Arc::new(StopSignal::new());
        let (out, err) = (Shared::default(), Shared::default());
        let mut handlers = ports(stop.clone(), factory(&out), factory(&err));
        let mut connect = |port: u32| {
            let (device_end, host_end) = UnixStream::pair().unwrap();
            let handler = &mut handlers.iter_mut().find(|(p, _)| *p == port).unwrap().1;
            handler(host_end);
            device_end
        };
        let mut control = connect(VSOCK_CONTROL_PORT);
        let mut stdout = connect(VSOCK_STDOUT_PORT);
        let mut stderr = connect(VSOCK_STDERR_PORT);
        control.write_all(b"ready\n").unwrap();
        stdout.write_all(b"out\0\r\n").unwrap();
        stderr.write_all(b"err\n").unwrap();
        control.write_all(b"exit 3\n").unwrap();
        // Not acknowledged while stdout is open.
        control
            .set_read_timeout(Some(std::time::Duration::from_millis(100)))
            .unwrap();
        let mut b = [0u8; 1];
        assert!(control.read(&mut b).is_err());
        stdout.shutdown(Shutdown::Write).unwrap();
        stderr.shutdown(Shutdown::Write).unwrap();
        control
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        assert_eq!(control.read(&mut b).unwrap(), 0);
        assert_eq!(out.0.lock().unwrap().as_slice(), b"out\0\r\n");
        assert_eq!(err.0.lock().unwrap().as_slice(), b"err\n");
        assert!(stop.ready_at().is_some());
        stop.request(crate::stop::StopReason::Guest(crate::GuestExit::PoweredOff));
        assert_eq!(
            stop.outcome(),
            Some(crate::stop::StopReason::Guest(crate::GuestExit::Command(3)))
        );
    }
}
