//! The host's TSC frequency, which the L1 kernel must be told (`tsc_early_khz=`).
//!
//! Under TCG, QEMU's `rdtsc` returns the host's own time-stamp counter, so L1's TSC ticks at the
//! host's rate. The L1 kernel learns that rate either from `tsc_early_khz=` or by calibrating
//! against the emulated PIT, and the PIT calibration fails now and then under TCG (measured: 3
//! boots in 15 printed `tsc: Unable to calibrate against PIT`, `Marking TSC unstable`, and hung
//! there; microvm has no HPET or PM timer to fall back on). A fixed guess (the reference sketch
//! said 2000000) avoids the hang but makes L1 time run at host rate / guess: on this 2.6 GHz
//! host every L1 second lasted 0.77 real seconds, so `l1_seconds` read 30 % long and in-L1
//! timeouts fired early. So the lab measures the host's TSC against the monotonic clock, in our
//! own process (QEMU reads the very same counter), and passes that.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How long the measurement spins. The error is the jitter of the endpoints (tens of
/// nanoseconds) over this window: a few parts per million.
const WINDOW: Duration = Duration::from_millis(20);

/// A TSC reading and a clock reading taken back to back: the pair whose two TSC reads around
/// the clock read are closest, out of a few tries (a preemption between them would skew it).
fn paired_reading() -> (u64, Instant) {
    let mut best: Option<(u64, u64, Instant)> = None;
    for _ in 0..16 {
        let before = rdtsc();
        let now = Instant::now();
        let after = rdtsc();
        let spread = after.wrapping_sub(before);
        if best.is_none_or(|(s, _, _)| spread < s) {
            best = Some((spread, before / 2 + after / 2, now));
        }
    }
    let (_, tsc, now) = best.expect("at least one reading");
    (tsc, now)
}

fn rdtsc() -> u64 {
    // SAFETY: RDTSC reads a counter and has no memory effects; every x86_64 CPU has it, and
    // Linux lets user space execute it (CR4.TSD is clear; QEMU itself depends on that).
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// The host's TSC frequency in kHz, measured once per process.
pub(crate) fn host_tsc_khz() -> u32 {
    static KHZ: OnceLock<u32> = OnceLock::new();
    *KHZ.get_or_init(|| {
        let (tsc0, t0) = paired_reading();
        // Spinning, not sleeping: this is a measurement window, and a busy core keeps the
        // end reading prompt.
        while t0.elapsed() < WINDOW {
            std::hint::spin_loop();
        }
        let (tsc1, t1) = paired_reading();
        let nanos = (t1 - t0).as_nanos().max(1);
        let khz = u128::from(tsc1.wrapping_sub(tsc0)) * 1_000_000 / nanos;
        u32::try_from(khz).unwrap_or(u32::MAX)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_tsc_runs_at_a_plausible_rate_and_is_measured_once() {
        let khz = host_tsc_khz();
        assert!((500_000..10_000_000).contains(&khz), "{khz} kHz");
        assert_eq!(host_tsc_khz(), khz);
    }
}
