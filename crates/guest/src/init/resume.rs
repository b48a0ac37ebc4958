//! What a machine restored from a snapshot is told by the host (on the control channel, as
//! [`crate::HostRequest`]s): the time now, random bytes for the kernel's generator, and the
//! host name of the instance it now is (and, with `--net auto`, its new link: see
//! [`super::net::reconfigure`]). cela's monitor also gives a restored machine a new VM
//! generation ID, but Debian's 6.1 cloud kernel has no driver for it, so these requests are
//! what tell it that it was copied. Failures are reported on the console and
//! change nothing else: the workload runs on either way.

use std::os::fd::AsRawFd;

use super::say;

/// `RNDADDENTROPY` (`_IOW('R', 0x03, int[2])`) and `RNDRESEEDCRNG` (`_IO('R', 0x07)`) of
/// `<linux/random.h>`, which the libc crate does not carry.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Sets the wall clock (`CLOCK_REALTIME`).
pub fn set_clock(secs: i64, nanos: u32) {
    let t = nix::sys::time::TimeSpec::new(secs, i64::from(nanos));
    if let Err(e) = nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, t) {
        say!("setting the clock after a restore: {e}");
    }
}

/// `struct rand_pool_info` with `bytes` as its buffer: entropy_count (bits), buf_size
/// (bytes), then the bytes.
fn pool_info(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + bytes.len());
    out.extend_from_slice(&((bytes.len() * 8) as i32).to_ne_bytes());
    out.extend_from_slice(&(bytes.len() as i32).to_ne_bytes());
    out.extend_from_slice(bytes);
    out
}

/// Credits `bytes` to the kernel's pool and makes its generator reseed at once.
pub fn add_entropy(bytes: &[u8]) {
    let dev = match std::fs::OpenOptions::new().write(true).open("/dev/urandom") {
        Ok(f) => f,
        Err(e) => {
            say!("opening /dev/urandom after a restore: {e}");
            return;
        }
    };
    let info = pool_info(bytes);
    // SAFETY: RNDADDENTROPY reads a `rand_pool_info` whose `buf_size` bytes follow its two
    // ints: `info` is exactly that, alive for the call; the descriptor is open.
    let added = unsafe { libc::ioctl(dev.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) };
    // SAFETY: RNDRESEEDCRNG takes no argument.
    let reseeded = unsafe { libc::ioctl(dev.as_raw_fd(), RNDRESEEDCRNG) };
    if added < 0 || reseeded < 0 {
        say!(
            "reseeding the kernel's random generator after a restore: {}",
            std::io::Error::last_os_error()
        );
    }
}

pub fn set_hostname(name: &str) {
    if let Err(e) = nix::unistd::sethostname(name) {
        say!("setting the host name after a restore: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_info_is_two_ints_then_the_bytes() {
        let info = pool_info(&[1, 2, 3]);
        assert_eq!(&info[..4], &24i32.to_ne_bytes());
        assert_eq!(&info[4..8], &3i32.to_ne_bytes());
        assert_eq!(&info[8..], &[1, 2, 3]);
    }
}
