//! How a running machine comes to an end. Devices (power-off register, keyboard-controller
//! reset, pvpanic), vCPU threads (a fault, a triple fault) and the host (Ctrl-C, the console
//! escape) all *request* a stop with a reason; the first request wins, and the thread that
//! owns the machine waits for it and then stops the vCPUs.
//!
//! The guest's init may also *report* the workload's exit status beforehand on the control
//! channel; the final [`GuestExit`] combines the two.

use std::io::{self, Read};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use std::os::unix::net::UnixStream;

use cela_guest::{ControlMessage, ControlParser, HostRequest};

use crate::machine::GuestExit;

/// Why the machine stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// The guest ended the machine (power-off, reset, panic) or the user detached.
    Guest(GuestExit),
    /// Every vCPU executed HLT with nothing to wake it (machines without an in-kernel irqchip).
    Halted,
    /// A vCPU hit a condition the monitor cannot handle; the text says which.
    Fault(String),
}

#[derive(Debug, Default)]
struct State {
    reason: Option<StopReason>,
    reported_status: Option<u8>,
    ready_at: Option<Instant>,
    halted_vcpus: u32,
    exited_vcpus: u32,
    /// Someone pausing the machine asks the thread that owns the vCPUs to kick them.
    kick: bool,
}

/// What [`StopSignal::wait_event`] woke for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wake {
    Stop(StopReason),
    /// The vCPUs are to be kicked out of `KVM_RUN` (a pause for a snapshot).
    Kick,
    TimedOut,
}

/// Shared between everything that can end the machine.
#[derive(Debug, Default)]
pub struct StopSignal {
    state: Mutex<State>,
    changed: Condvar,
    /// The host's end of cela-init's control channel, for [`HostRequest`]s, while it is open.
    guest_channel: Mutex<Option<UnixStream>>,
    /// Requests are held back (refused) while the machine is paused for a snapshot: one
    /// written then would be saved with the machine and reach every copy of it.
    held: std::sync::atomic::AtomicBool,
    /// Requests to send once the control channel is attached (a restored machine's clock,
    /// entropy and name, queued before its init's connection is back).
    queued: Mutex<Vec<HostRequest>>,
}

impl StopSignal {
    /// Reads cela-init's control lines (`ready`, `exit N`) from `channel` (COM2 under QEMU,
    /// the vsock control port under KVM) and reports them, until the channel closes or a reported
    /// exit's `after_exit` returns true.
    pub fn follow_control(&self, mut channel: impl Read, mut after_exit: impl FnMut() -> bool) {
        let mut parser = ControlParser::default();
        let mut buf = [0u8; 256];
        loop {
            let n = match channel.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            for message in parser.feed(&buf[..n]) {
                match message {
                    ControlMessage::Ready => self.report_ready(),
                    ControlMessage::Exit(code) => {
                        self.report_status(code);
                        if after_exit() {
                            return;
                        }
                    }
                }
            }
        }
    }

    pub fn new() -> Self {
        Self::default()
    }

    /// Lets [`StopSignal::send_to_guest`] write on `channel` (a second handle of the control
    /// connection) until [`StopSignal::detach_guest_channel`].
    pub fn attach_guest_channel(&self, channel: UnixStream) {
        // The queue is sent under the channel's lock, which `send_when_attached` holds while
        // it decides to queue: a request is either queued before this and sent here, or sent
        // by its caller after these.
        let mut slot = self.guest_channel.lock().unwrap_or_else(|p| p.into_inner());
        *slot = Some(channel);
        // A bare newline first: a line the guest had half received when it was saved is
        // ended there, not glued to the first of these.
        if !self.queue_is_empty() && !self.send_locked(&mut slot, "\n") {
            tracing::warn!("the guest's init did not take a request after its restore");
            return;
        }
        if !self.flush_locked(&mut slot) {
            tracing::warn!("the guest's init did not take all it was sent; the rest waits");
        }
    }

    fn queue_is_empty(&self) -> bool {
        self.queued
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    /// Sends what is queued, in order, with the channel's lock held; what the guest cannot
    /// take now stays queued for the next send. Whether the queue is empty.
    fn flush_locked(&self, slot: &mut Option<UnixStream>) -> bool {
        let mut queue = std::mem::take(&mut *self.queued.lock().unwrap_or_else(|p| p.into_inner()));
        let sent = queue
            .iter()
            .take_while(|r| self.send_locked(slot, &r.to_line()))
            .count();
        queue.drain(..sent);
        let empty = queue.is_empty();
        if !empty {
            let mut now = self.queued.lock().unwrap_or_else(|p| p.into_inner());
            queue.append(&mut now);
            *now = queue;
        }
        empty
    }

    /// Sends `requests` now if the control channel is attached (after what is queued), else
    /// as soon as it is; false if they could not be sent now (see
    /// [`StopSignal::send_to_guest`]), when they wait in the queue with what could not be
    /// sent before. A hosts block queued replaces one queued before it: only the newest is
    /// worth sending.
    pub fn send_when_attached(&self, requests: Vec<HostRequest>) -> bool {
        let mut slot = self.guest_channel.lock().unwrap_or_else(|p| p.into_inner());
        let attached = slot.is_some();
        let flushed = attached && self.flush_locked(&mut slot);
        if flushed {
            let mut left = requests
                .into_iter()
                .skip_while(|r| self.send_locked(&mut slot, &r.to_line()))
                .peekable();
            if left.peek().is_none() {
                return true;
            }
            // Cut off in the middle: the guest drops a cut block when the next begins.
            self.enqueue(left.collect());
            return false;
        }
        self.enqueue(requests);
        !attached
    }

    fn enqueue(&self, requests: Vec<HostRequest>) {
        let mut queue = self.queued.lock().unwrap_or_else(|p| p.into_inner());
        if requests.first() == Some(&HostRequest::HostsBegin) {
            queue.retain(|r| {
                !matches!(
                    r,
                    HostRequest::HostsBegin | HostRequest::Host { .. } | HostRequest::HostsEnd
                )
            });
        }
        queue.extend(requests);
    }

    /// Refuses (`true`) or lets through (`false`) requests to the guest from now on; a caller
    /// whose request is refused acts as for a guest that cannot take it (a SIGTERM stops the
    /// machine, which fails a snapshot in progress).
    pub fn hold_requests(&self, hold: bool) {
        self.held.store(hold, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn detach_guest_channel(&self) {
        *self.guest_channel.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Sends `request` to the guest's init without waiting: false when there is no control
    /// channel to send it on (the init has not connected yet, or has reported its exit), or
    /// the channel has no room now (a guest that does not read it). Nothing here blocks, so
    /// neither a client's stream of sizes nor a guest that stops reading holds up a stop's
    /// SIGTERM (whose caller stops the machine when this fails).
    pub fn send_to_guest(&self, request: HostRequest) -> bool {
        // Held only for one non-blocking send; a poisoned lock still holds the channel.
        let mut slot = self.guest_channel.lock().unwrap_or_else(|p| p.into_inner());
        self.send_locked(&mut slot, &request.to_line())
    }

    /// [`StopSignal::send_to_guest`] of one line, with the channel's lock held.
    fn send_locked(&self, slot: &mut Option<UnixStream>, line: &str) -> bool {
        if self.held.load(std::sync::atomic::Ordering::SeqCst) {
            return false;
        }
        let Some(channel) = slot.as_ref() else {
            return false;
        };
        // A line this short goes into a Unix stream socket whole or not at all.
        match nix::sys::socket::send(
            std::os::fd::AsRawFd::as_raw_fd(channel),
            line.as_bytes(),
            nix::sys::socket::MsgFlags::MSG_DONTWAIT | nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
        ) {
            Ok(n) if n == line.len() => true,
            // The guest's end is gone: nothing more can be sent.
            Err(
                nix::errno::Errno::EPIPE
                | nix::errno::Errno::ECONNRESET
                | nix::errno::Errno::ENOTCONN
                | nix::errno::Errno::EBADF,
            ) => {
                *slot = None;
                false
            }
            _ => false,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panicking holder cannot leave `State` inconsistent (every update is one
        // assignment), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks the machine to stop; ignored if a stop was already requested.
    pub fn request(&self, reason: StopReason) {
        let mut s = self.lock();
        if s.reason.is_none() {
            s.reason = Some(reason);
            self.changed.notify_all();
        }
    }

    /// Records the workload's exit status reported by the guest's init.
    pub fn report_status(&self, status: u8) {
        self.lock().reported_status = Some(status);
    }

    /// Records that the guest's init said it is up (the boot-time marker).
    pub fn report_ready(&self) {
        self.lock().ready_at.get_or_insert_with(Instant::now);
        self.changed.notify_all();
    }

    /// Waits until the guest's init reports it is up; false if the machine stopped first.
    pub fn wait_ready(&self) -> bool {
        let guard = self.lock();
        let guard = self
            .changed
            .wait_while(guard, |s| s.ready_at.is_none() && s.reason.is_none())
            .unwrap_or_else(|p| p.into_inner());
        guard.ready_at.is_some() && guard.reason.is_none()
    }

    /// When the guest's init said it was up, if it did.
    pub fn ready_at(&self) -> Option<Instant> {
        self.lock().ready_at
    }

    /// Records that a vCPU thread left its run loop.
    pub fn vcpu_exited(&self) {
        self.lock().exited_vcpus += 1;
        self.changed.notify_all();
    }

    /// Waits up to `timeout` until `count` vCPU threads in all have left their run loops;
    /// whether they have.
    pub fn wait_vcpus_exited(&self, count: usize, timeout: Duration) -> bool {
        let guard = self.lock();
        let (guard, _) = self
            .changed
            .wait_timeout_while(guard, timeout, |s| (s.exited_vcpus as usize) < count)
            .unwrap_or_else(|e| e.into_inner());
        guard.exited_vcpus as usize >= count
    }

    /// Records that one more vCPU halted for good; stops the machine with
    /// [`StopReason::Halted`] once all `vcpus` have.
    pub fn vcpu_halted(&self, vcpus: u32) {
        let mut s = self.lock();
        s.halted_vcpus += 1;
        if s.halted_vcpus >= vcpus && s.reason.is_none() {
            s.reason = Some(StopReason::Halted);
            self.changed.notify_all();
        }
    }

    /// Asks the thread waiting in [`StopSignal::wait_event`] to kick the vCPUs.
    pub fn request_kick(&self) {
        self.lock().kick = true;
        self.changed.notify_all();
    }

    /// Waits until a stop is requested, a kick is asked for, or `deadline` passes (`None`:
    /// never). A stop wins over a kick.
    pub fn wait_event(&self, deadline: Option<Instant>) -> Wake {
        let mut guard = self.lock();
        loop {
            if let Some(r) = &guard.reason {
                return Wake::Stop(r.clone());
            }
            if guard.kick {
                guard.kick = false;
                return Wake::Kick;
            }
            guard = match deadline {
                None => self.changed.wait(guard).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Wake::TimedOut;
                    }
                    self.changed
                        .wait_timeout(guard, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
        }
    }

    /// Whether a stop has been requested.
    pub fn is_requested(&self) -> bool {
        self.lock().reason.is_some()
    }

    /// Waits until a stop is requested, or `timeout` passes (`None` = forever).
    pub fn wait(&self, timeout: Option<Duration>) -> Option<StopReason> {
        let guard = self.lock();
        let guard = match timeout {
            None => self
                .changed
                .wait_while(guard, |s| s.reason.is_none())
                .unwrap_or_else(|p| p.into_inner()),
            Some(t) => {
                self.changed
                    .wait_timeout_while(guard, t, |s| s.reason.is_none())
                    .unwrap_or_else(|p| p.into_inner())
                    .0
            }
        };
        guard.reason.clone()
    }

    /// The run's outcome: a reported workload status wins over the plain power-off that follows
    /// it; anything else is returned as it was requested.
    pub fn outcome(&self) -> Option<StopReason> {
        let s = self.lock();
        match (&s.reason, s.reported_status) {
            (Some(StopReason::Guest(GuestExit::PoweredOff)), Some(code)) => {
                Some(StopReason::Guest(GuestExit::Command(code)))
            }
            (reason, _) => reason.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn first_request_wins() {
        let s = StopSignal::new();
        s.request(StopReason::Guest(GuestExit::Panicked));
        s.request(StopReason::Guest(GuestExit::PoweredOff));
        assert_eq!(s.outcome(), Some(StopReason::Guest(GuestExit::Panicked)));
    }

    #[test]
    fn reported_status_turns_power_off_into_command_exit() {
        let s = StopSignal::new();
        s.report_status(7);
        s.request(StopReason::Guest(GuestExit::PoweredOff));
        assert_eq!(s.outcome(), Some(StopReason::Guest(GuestExit::Command(7))));
    }

    #[test]
    fn wait_ready_returns_on_ready_or_stop() {
        let s = Arc::new(StopSignal::new());
        let s2 = s.clone();
        let t = std::thread::spawn(move || s2.report_ready());
        assert!(s.wait_ready());
        t.join().unwrap();
        let stopped = StopSignal::new();
        stopped.request(StopReason::Halted);
        assert!(!stopped.wait_ready());
    }

    #[test]
    fn all_vcpus_halting_stops_the_machine() {
        let s = StopSignal::new();
        s.vcpu_halted(2);
        assert!(!s.is_requested());
        s.vcpu_halted(2);
        assert_eq!(s.outcome(), Some(StopReason::Halted));
    }

    #[test]
    fn wait_wakes_on_request_from_another_thread() {
        let s = Arc::new(StopSignal::new());
        let s2 = s.clone();
        let t = std::thread::spawn(move || s2.request(StopReason::Fault("x".into())));
        assert_eq!(
            s.wait(Some(Duration::from_secs(10))),
            Some(StopReason::Fault("x".into()))
        );
        t.join().unwrap();
        assert_eq!(StopSignal::new().wait(Some(Duration::from_millis(1))), None);
    }
}
