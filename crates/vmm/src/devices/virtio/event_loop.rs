//! The device event loop: one thread that waits (epoll) on the eventfds devices are notified
//! through — for virtio, the queue-notify eventfds KVM signals when the guest writes a queue
//! index to the notify register (KVM_IOEVENTFD) — and runs each one's handler. Device I/O thus
//! happens off the vCPU threads, and a guest notification costs no exit to userspace on the
//! vCPU that made it.
//!
//! Devices with host-side I/O (a TAP device, Unix sockets) also register those file
//! descriptors ([`EventLoop::add_fd`]), edge-triggered: a device that cannot take all the
//! data now (the guest gave no receive buffers) leaves it and retries when the guest adds
//! buffers, instead of the loop spinning on a readable fd. A device whose set of host fds changes at run time (one socket per vsock
//! connection) keeps its own epoll and registers that one fd here.
//!
//! Handlers are registered before the loop starts; the loop runs until its handle is dropped.
//! A loop given the machine's [`Gate`] parks there between two handlers while a snapshot is
//! taken: [`EventLoopHandle::wake`] makes it look.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::seccomp::{Filters, ThreadKind};
use crate::vstate::pause::Gate;

/// What runs when an eventfd is signalled.
pub type Handler = Box<dyn FnMut() + Send>;

/// What the loop waits on.
enum Source {
    /// A counter the loop resets before running the handler.
    EventFd(EventFd),
    /// A host fd owned by the device; the handler drains it.
    Fd(RawFd),
}

/// An event loop being assembled: eventfds and their handlers.
#[derive(Default)]
pub struct EventLoop {
    sources: Vec<(Source, Handler)>,
    gate: Option<std::sync::Arc<Gate>>,
}

impl EventLoop {
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `handler` each time `evt` is signalled (several signals between two runs of the
    /// loop coalesce into one call).
    pub fn add(&mut self, evt: EventFd, handler: Handler) {
        self.sources.push((Source::EventFd(evt), handler));
    }

    /// Runs `handler` when `fd` becomes readable or writable (edge-triggered: data the handler
    /// leaves unread is not signalled again until more arrives). The fd stays owned by whoever
    /// registered it and must stay open while the loop runs (a device's handler holds the
    /// device, and with it the fd).
    pub fn add_fd(&mut self, fd: RawFd, handler: Handler) {
        self.sources.push((Source::Fd(fd), handler));
    }

    /// Parks the loop at `gate` while it is closed (checked between handlers, and when
    /// [`EventLoopHandle::wake`] is called).
    pub fn with_gate(mut self, gate: std::sync::Arc<Gate>) -> Self {
        self.gate = Some(gate);
        self
    }

    /// Starts the loop on its own thread, which first puts itself under `filters`' device
    /// filter (none: unconfined).
    pub fn start(self, filters: Option<Filters>) -> io::Result<EventLoopHandle> {
        let epoll = Epoll::new()?;
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let wake = EventFd::new(libc::EFD_NONBLOCK)?;
        let stop_token = self.sources.len() as u64;
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, stop_token),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, stop_token + 1),
        )?;
        for (token, (source, _)) in self.sources.iter().enumerate() {
            let (fd, events) = match source {
                Source::EventFd(evt) => (evt.as_raw_fd(), EventSet::IN),
                Source::Fd(fd) => (*fd, EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED),
            };
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(events, token as u64),
            )?;
        }
        let stop_clone = stop.try_clone()?;
        let wake_clone = wake.try_clone()?;
        let mut sources = self.sources;
        let gate = self.gate;
        let thread = std::thread::Builder::new()
            .name("devices".into())
            .spawn(move || {
                crate::seccomp::confine_thread(filters.as_ref(), ThreadKind::Device);
                let waker = (wake_clone, gate);
                run(epoll, &mut sources, stop_token, stop_clone, &waker);
                // Handed back to whoever stops the loop: the devices are dropped there, not
                // here (a vsock device removes its socket file, which the filter forbids).
                sources
            })?;
        Ok(EventLoopHandle {
            stop,
            wake,
            thread: Some(thread),
        })
    }
}

fn run(
    epoll: Epoll,
    sources: &mut [(Source, Handler)],
    stop_token: u64,
    _stop: EventFd,
    (wake, gate): &(EventFd, Option<std::sync::Arc<Gate>>),
) {
    let mut events = vec![EpollEvent::default(); sources.len() + 2];
    loop {
        if let Some(g) = gate {
            g.park();
        }
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!("the device event loop failed waiting for events: {e}");
                return;
            }
        };
        for event in &events[..n] {
            let token = event.data();
            if token == stop_token {
                return;
            }
            if token == stop_token + 1 {
                let _ = wake.read();
                if let Some(g) = gate {
                    g.park();
                }
                continue;
            }
            if let Some((source, handler)) =
                usize::try_from(token).ok().and_then(|t| sources.get_mut(t))
            {
                // Consume the count first: a signal arriving while the handler runs makes
                // the fd readable again and is handled on the next pass.
                if let Source::EventFd(evt) = source {
                    let _ = evt.read();
                }
                handler();
            }
        }
    }
}

/// A running event loop; dropping it stops and joins the thread.
pub struct EventLoopHandle {
    stop: EventFd,
    wake: EventFd,
    thread: Option<JoinHandle<Vec<(Source, Handler)>>>,
}

impl EventLoopHandle {
    /// A second handle of the loop's wake-up eventfd: writing 1 makes the loop check its gate
    /// at once (a closed gate parks it).
    pub fn waker(&self) -> io::Result<EventFd> {
        self.wake.try_clone()
    }
}

impl Drop for EventLoopHandle {
    fn drop(&mut self) {
        if let Err(e) = self.stop.write(1) {
            tracing::warn!("cannot stop the device event loop: {e}");
            return;
        }
        if let Some(t) = self.thread.take() {
            drop(t.join());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn handlers_run_on_signals_and_the_loop_stops_on_drop() {
        let (tx, rx) = mpsc::channel();
        let mut el = EventLoop::new();
        let evts: Vec<EventFd> = (0..2)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        for (i, evt) in evts.iter().enumerate() {
            let tx = tx.clone();
            el.add(
                evt.try_clone().unwrap(),
                Box::new(move || tx.send(i).unwrap()),
            );
        }
        let handle = el.start(None).unwrap();
        evts[1].write(1).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(1));
        evts[0].write(1).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(0));
        drop(handle);
        drop(tx);
        // The thread is gone, so its handlers (holding the other senders) were dropped.
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(10)),
            Err(mpsc::RecvTimeoutError::Disconnected)
        );
    }

    #[test]
    fn host_fd_handlers_run_when_data_arrives() {
        use std::io::{Read, Write};
        use std::os::unix::net::UnixStream;
        let (mut host, guest_side) = UnixStream::pair().unwrap();
        guest_side.set_nonblocking(true).unwrap();
        let (tx, rx) = mpsc::channel();
        let mut el = EventLoop::new();
        let fd = guest_side.as_raw_fd();
        let mut reader = guest_side;
        el.add_fd(
            fd,
            Box::new(move || {
                let mut buf = [0u8; 16];
                while let Ok(n @ 1..) = reader.read(&mut buf) {
                    tx.send(buf[..n].to_vec()).unwrap();
                }
            }),
        );
        let handle = el.start(None).unwrap();
        host.write_all(b"ping").unwrap();
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(10)),
            Ok(b"ping".to_vec())
        );
        drop(handle);
    }
}
