//! Holding a running machine still while its state is written down (a snapshot). Every thread
//! that changes the machine — each vCPU, and the device event loop — checks a [`Gate`] between
//! two pieces of work; once the gate is closed, it parks there until it opens again or the
//! machine stops. Whoever closes the gate waits until all of them are parked: from then on no
//! guest instruction runs, no device touches guest memory, and the state read is one moment's.
//!
//! A vCPU inside `KVM_RUN` only sees the gate after its next exit, so the closer also kicks the
//! vCPUs ([`crate::stop::StopSignal::request_kick`] asks the thread that owns them); the event
//! loop is woken through an eventfd of its own.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Default)]
struct State {
    closed: bool,
    parked: usize,
    /// The machine is going away: parked threads leave, and none parks again.
    released: bool,
}

/// Where the machine's threads park while a snapshot is taken.
#[derive(Debug, Default)]
pub struct Gate {
    state: Mutex<State>,
    changed: Condvar,
}

impl Gate {
    pub fn new() -> Gate {
        Gate::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Every update is a plain assignment: a poisoned lock still holds a consistent state.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks every thread to park at its next check.
    pub fn close(&self) {
        let mut s = self.lock();
        if !s.released {
            s.closed = true;
        }
    }

    /// Whether threads are to park (checked by each between two pieces of work).
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Parks the calling thread while the gate is closed.
    pub fn park(&self) {
        let mut s = self.lock();
        if !s.closed {
            return;
        }
        s.parked += 1;
        self.changed.notify_all();
        let mut s = self
            .changed
            .wait_while(s, |s| s.closed && !s.released)
            .unwrap_or_else(|p| p.into_inner());
        s.parked -= 1;
    }

    /// Waits up to `timeout` until `count` threads are parked; whether they are.
    pub fn wait_parked(&self, count: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut s = self.lock();
        while s.parked < count && !s.released {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            s = self
                .changed
                .wait_timeout(s, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        s.parked >= count && !s.released
    }

    /// Lets every parked thread go on.
    pub fn open(&self) {
        self.lock().closed = false;
        self.changed.notify_all();
    }

    /// The machine stops: parked threads leave (to see the stop) and the gate never closes
    /// again.
    pub fn release(&self) {
        let mut s = self.lock();
        s.released = true;
        s.closed = false;
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn threads_park_while_closed_and_go_on_when_opened() {
        let gate = Arc::new(Gate::new());
        gate.close();
        let threads: Vec<_> = (0..3)
            .map(|_| {
                let g = gate.clone();
                std::thread::spawn(move || g.park())
            })
            .collect();
        assert!(gate.wait_parked(3, Duration::from_secs(10)));
        gate.open();
        for t in threads {
            t.join().unwrap();
        }
        // Open: parking returns at once.
        gate.park();
    }

    #[test]
    fn release_frees_parked_threads_and_keeps_the_gate_open() {
        let gate = Arc::new(Gate::new());
        gate.close();
        let g = gate.clone();
        let t = std::thread::spawn(move || g.park());
        assert!(gate.wait_parked(1, Duration::from_secs(10)));
        gate.release();
        t.join().unwrap();
        gate.close();
        assert!(!gate.is_closed());
        assert!(!gate.wait_parked(1, Duration::from_millis(1)));
    }

    #[test]
    fn waiting_for_more_threads_than_park_times_out() {
        let gate = Gate::new();
        gate.close();
        assert!(!gate.wait_parked(1, Duration::from_millis(10)));
    }
}
