//! TAP devices (Linux `Documentation/networking/tuntap.rst`): a virtual Ethernet interface on
//! the host whose frames this process reads and writes through a file descriptor. Every frame
//! is preceded by a `struct virtio_net_hdr_v1` (IFF_VNET_HDR, TUNSETVNETHDRSZ = 12 bytes), so
//! checksum and segmentation offloads pass between the guest's virtio-net driver and the host
//! stack untouched (the guest may send 64 KiB TCP segments; the host may deliver them).
//!
//! All the unsafe code of cela's networking sits here, each block with its justification. No
//! maintained crate opens TAP devices the way a VMM needs (vnet headers, offload flags,
//! attaching to an existing persistent TAP without creating one); the `tun` crates aim at
//! layer-3 TUN use.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use vm_memory::VolatileSlice;

/// The TUN/TAP control device.
const TUN_PATH: &str = "/dev/net/tun";
/// Size of `struct virtio_net_hdr_v1`, what precedes every frame on the TAP fd (with
/// VIRTIO_F_VERSION_1 the header always has `num_buffers`, virtio 1.2 §5.1.6).
pub const VNET_HDR_LEN: usize = 12;

/// Why a TAP device could not be opened or set up.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("cannot open {TUN_PATH} (is the tun module loaded?): {0}")]
    OpenTun(io::Error),
    #[error("TAP device {0:?}: no such network interface")]
    NoSuchDevice(String),
    #[error("{0:?} is a network interface but not a TAP device")]
    NotATap(String),
    #[error("TAP device {0:?} is in use (another process has it open)")]
    Busy(String),
    #[error("TAP device {name:?}: cannot attach to it: {err}")]
    Attach { name: String, err: io::Error },
    #[error("cannot create a TAP device: {0}")]
    Create(io::Error),
    #[error("TAP device {name}: {what} failed: {err}")]
    Ioctl {
        name: String,
        what: &'static str,
        err: io::Error,
    },
    #[error("{0:?} is not a valid network interface name (1 to 15 bytes, no '/', ':' or spaces)")]
    BadName(String),
}

/// An open TAP device: non-blocking, Ethernet frames without packet information, each preceded
/// by a 12-byte virtio-net header. A TAP cela created without IFF_PERSIST disappears (with its
/// addresses and routes) when this is dropped — also when the process dies.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

/// Checks `name` is a Linux interface name (`dev_valid_name`).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace())
}

impl Tap {
    /// Creates a new, non-persistent TAP device; the kernel picks the first free name from
    /// `pattern` (`cela%d`).
    pub fn create(pattern: &str) -> Result<Tap, TapError> {
        Self::set_iff(pattern).map_err(|e| match e {
            SetIff::Open(e) => TapError::OpenTun(e),
            SetIff::Ioctl(e) => TapError::Create(e),
        })
    }

    /// Attaches to the existing TAP device `name` (made with `ip tuntap add NAME mode tap`).
    /// Refuses a name that is no interface, rather than creating one.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        if !valid_name(name) {
            return Err(TapError::BadName(name.to_owned()));
        }
        if !std::path::Path::new("/sys/class/net").join(name).exists() {
            return Err(TapError::NoSuchDevice(name.to_owned()));
        }
        Self::set_iff(name).map_err(|e| match e {
            SetIff::Open(e) => TapError::OpenTun(e),
            SetIff::Ioctl(err) => match err.raw_os_error() {
                Some(libc::EINVAL) => TapError::NotATap(name.to_owned()),
                Some(libc::EBUSY) => TapError::Busy(name.to_owned()),
                _ => TapError::Attach {
                    name: name.to_owned(),
                    err,
                },
            },
        })
    }

    fn set_iff(name: &str) -> Result<Tap, SetIff> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_PATH)
            .map_err(SetIff::Open)?;
        let mut req = ifreq(name).map_err(SetIff::Ioctl)?;
        req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as _;
        // SAFETY: `req` is a live ifreq; TUNSETIFF reads the name and flags and writes the
        // interface's name back into it. `file` is an open /dev/net/tun descriptor.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF as _, &mut req) };
        if rc < 0 {
            return Err(SetIff::Ioctl(io::Error::last_os_error()));
        }
        let name: Vec<u8> = req
            .ifr_name
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        let tap = Tap {
            file,
            name: String::from_utf8_lossy(&name).into_owned(),
        };
        let size = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which is live.
        let rc = unsafe {
            libc::ioctl(
                tap.file.as_raw_fd(),
                libc::TUNSETVNETHDRSZ as _,
                &size as *const libc::c_int,
            )
        };
        if rc < 0 {
            return Err(SetIff::Ioctl(io::Error::last_os_error()));
        }
        Ok(tap)
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Tells the kernel which offloads the reader (the guest) accepts in frames it receives
    /// (TUN_F_CSUM: partial checksums; TUN_F_TSO4/6: TCP segments larger than the MTU).
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value (an unsigned int); no memory.
        let rc = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD as _,
                flags as libc::c_ulong,
            )
        };
        if rc < 0 {
            return Err(TapError::Ioctl {
                name: self.name.clone(),
                what: "TUNSETOFFLOAD",
                err: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Reads one frame (with its virtio-net header) into `buf`; `WouldBlock` when none waits.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        io::Read::read(&mut &self.file, buf)
    }

    /// Writes one frame (with its virtio-net header).
    pub fn write(&self, frame: &[u8]) -> io::Result<usize> {
        io::Write::write(&mut &self.file, frame)
    }

    /// Writes one frame gathered from `header` and pieces of guest memory, with one
    /// `writev`: the kernel copies straight from guest memory, with no copy in between.
    pub fn write_guest(&self, header: &[u8], body: &[VolatileSlice<'_>]) -> io::Result<usize> {
        let mut iovs = Vec::with_capacity(body.len() + 1);
        iovs.push(libc::iovec {
            iov_base: header.as_ptr() as *mut libc::c_void,
            iov_len: header.len(),
        });
        // The guards keep each slice's mapping valid until the write is done.
        let guards: Vec<_> = body.iter().map(|s| (s.ptr_guard(), s.len())).collect();
        for (guard, len) in &guards {
            iovs.push(libc::iovec {
                iov_base: guard.as_ptr() as *mut libc::c_void,
                iov_len: *len,
            });
        }
        let count = libc::c_int::try_from(iovs.len())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: each iovec points at memory that stays mapped for the call: `header` is a
        // borrowed slice, and the others are guest memory held by `guards` (guest RAM is
        // mapped for the VM's whole life). writev only reads them. The guest may change its
        // memory meanwhile, which changes only the frame's bytes: the header the device
        // checked is this process's own copy.
        let n = unsafe { libc::writev(self.file.as_raw_fd(), iovs.as_ptr(), count) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// A duplicate of the descriptor, for handing the TAP to another process (QEMU's
    /// `-netdev tap,fd=`).
    pub fn try_clone_file(&self) -> io::Result<File> {
        self.file.try_clone()
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

enum SetIff {
    Open(io::Error),
    Ioctl(io::Error),
}

/// An `ifreq` naming `name`, the rest zeroed.
fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: ifreq is plain old data (a name array and a union of integers, sockaddrs and a
    // pointer); all-zero is a valid value for each.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_follow_the_kernel_rules() {
        assert!(valid_name("tap0"));
        assert!(valid_name("cela-tap.1"));
        for bad in ["", ".", "..", "a/b", "a:b", "a b", "sixteen-chars-xx"] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn a_missing_tap_is_named_and_not_created() {
        let err = Tap::open("cela-none0").unwrap_err();
        assert!(matches!(err, TapError::NoSuchDevice(_)), "{err}");
        assert!(err.to_string().contains("cela-none0"), "{err}");
        assert!(!std::path::Path::new("/sys/class/net/cela-none0").exists());
        assert!(matches!(
            Tap::open("bad/name").unwrap_err(),
            TapError::BadName(_)
        ));
    }

    /// Needs /dev/net/tun and CAP_NET_ADMIN, which this project's hosts have.
    #[test]
    fn a_created_tap_is_gone_once_closed() {
        let tap = Tap::create("celatest%d").expect("creating a TAP (needs /dev/net/tun)");
        let sys = std::path::Path::new("/sys/class/net").join(tap.name());
        assert!(tap.name().starts_with("celatest"), "{}", tap.name());
        assert!(sys.exists());
        tap.set_offload(libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6)
            .unwrap();
        let mut buf = [0u8; 64];
        let err = tap.read(&mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        // A non-tap interface cannot be attached to as a TAP, nor a TAP in use.
        let err = Tap::open("lo").unwrap_err();
        assert!(matches!(err, TapError::NotATap(_)), "{err}");
        let err = Tap::open(tap.name()).unwrap_err();
        assert!(matches!(err, TapError::Busy(_)), "{err}");
        drop(tap);
        assert!(!sys.exists());
    }
}
