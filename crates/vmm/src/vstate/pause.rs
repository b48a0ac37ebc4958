//! Holding a running machine still while its state is written down (a snapshot). Every thread
//! that changes the machine — each vCPU, and the device event loop — checks a [`Gate`] between
//! two pieces of work; once the gate is closed, it parks there until it opens again or the
//! machine stops. Whoever closes the gate waits until all of them are parked: from then on no
//! guest instruction runs, no device touches guest memory, and the state read is one moment's.
//!
//! Only then are the vCPUs asked to save themselves ([`Gate::request_save`]): each parked vCPU
//! reads its own state (KVM wants a vCPU's state read by its thread) and parks on. Saving
//! before every other vCPU is parked would miss what they still send it (an IPI, a TLB
//! shootdown) and leave a restored guest waiting for an answer that never comes.
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
    /// Counts save rounds; a parked thread with work to do for a round does it once.
    round: u64,
    /// Threads done with the current round.
    saved: usize,
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

    /// Parks the calling thread while the gate is closed; it takes no part in save rounds.
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

    /// Parks the calling thread while the gate is closed, running `save` once for each save
    /// round asked for meanwhile ([`Gate::request_save`]).
    pub fn park_saving(&self, mut save: impl FnMut()) {
        let mut s = self.lock();
        if !s.closed {
            return;
        }
        s.parked += 1;
        self.changed.notify_all();
        // Rounds asked before this thread parked are not its to answer.
        let mut seen = s.round;
        loop {
            s = self
                .changed
                .wait_while(s, |s| s.closed && !s.released && s.round == seen)
                .unwrap_or_else(|p| p.into_inner());
            if !s.closed || s.released {
                break;
            }
            seen = s.round;
            drop(s);
            save();
            s = self.lock();
            if s.round == seen {
                s.saved += 1;
                self.changed.notify_all();
            }
        }
        s.parked -= 1;
    }

    /// Asks every thread parked with [`Gate::park_saving`] to save (once all are parked).
    pub fn request_save(&self) {
        let mut s = self.lock();
        s.round += 1;
        s.saved = 0;
        self.changed.notify_all();
    }

    /// Waits up to `timeout` until `count` threads have answered the current save round.
    pub fn wait_saved(&self, count: usize, timeout: Duration) -> bool {
        self.wait_for(
            timeout,
            |s| s.saved >= count && s.closed && !s.released,
            |s| !s.closed || s.released,
        )
    }

    /// Waits up to `timeout` until `done` holds, or `hopeless` does; whether `done` holds.
    fn wait_for(
        &self,
        timeout: Duration,
        done: impl Fn(&State) -> bool,
        hopeless: impl Fn(&State) -> bool,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        let mut s = self.lock();
        while !done(&s) && !hopeless(&s) {
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
        done(&s)
    }

    /// Whether the machine has let its threads go for good (it is stopping).
    pub fn is_released(&self) -> bool {
        self.lock().released
    }

    /// Waits up to `timeout` until `count` threads are parked; whether they are.
    pub fn wait_parked(&self, count: usize, timeout: Duration) -> bool {
        self.wait_for(
            timeout,
            |s| s.parked >= count && !s.released,
            |s| s.released,
        )
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
    fn parked_threads_save_once_per_round_and_only_when_asked() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let gate = Arc::new(Gate::new());
        let saves = Arc::new(AtomicUsize::new(0));
        gate.close();
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let (g, n) = (gate.clone(), saves.clone());
                std::thread::spawn(move || {
                    g.park_saving(|| {
                        n.fetch_add(1, Ordering::SeqCst);
                    })
                })
            })
            .collect();
        assert!(gate.wait_parked(2, Duration::from_secs(10)));
        // Parked, nobody saved yet.
        assert_eq!(saves.load(Ordering::SeqCst), 0);
        assert!(!gate.wait_saved(1, Duration::from_millis(1)));
        gate.request_save();
        assert!(gate.wait_saved(2, Duration::from_secs(10)));
        assert_eq!(saves.load(Ordering::SeqCst), 2);
        // A second round: each saves once more.
        gate.request_save();
        assert!(gate.wait_saved(2, Duration::from_secs(10)));
        assert_eq!(saves.load(Ordering::SeqCst), 4);
        gate.open();
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn waiting_for_more_threads_than_park_times_out() {
        let gate = Gate::new();
        gate.close();
        assert!(!gate.wait_parked(1, Duration::from_millis(10)));
    }
}
