//! A microVM's names: the hosts file the network code keeps for every instance on a named
//! network ([`super::named::HOSTS_FILE`], rewritten as instances join and leave) reaches a
//! container by a bind mount, and a microVM's guest through its supervisor. The supervisor
//! watches the file (inotify) and passes each new version to the guest's init as a block of
//! host requests ([`cela_guest::HostRequest::hosts_block`]): through the monitor's control
//! connection on cela's engine, on the control port under QEMU. The init writes it to the
//! guest's `/etc/hosts`, and waits for the first one before it starts the workload
//! ([`cela_guest::BootRequest::hosts`]).

use std::net::Ipv4Addr;
use std::os::fd::AsFd as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

use crate::record::Instance;

/// How a hosts file reaches the guest.
pub enum Sender {
    Kvm(Arc<cela_vmm::control::MonitorControl>),
    Qemu(cela_vmm::qemu::QemuHandle),
}

/// Why a send failed: for now (try again), or for good (the machine ended).
enum Failed {
    Now(String),
    ForGood,
}

impl Sender {
    fn send(&self, entries: &[(Ipv4Addr, String)]) -> Result<(), Failed> {
        use cela_vmm::control::ControlError;
        match self {
            Sender::Kvm(c) => c.hosts(entries).map_err(|e| match e {
                ControlError::Refused(why) => Failed::Now(why),
                _ => Failed::ForGood,
            }),
            Sender::Qemu(q) => q.hosts(entries).map_err(|e| match q.ended() {
                true => Failed::ForGood,
                false => Failed::Now(e.to_string()),
            }),
        }
    }
}

/// The longest hosts file read.
const MAX_FILE: u64 = 256 << 10;
/// How soon a send the guest could not take is tried again.
const RETRY: Duration = Duration::from_secs(1);

/// The names of a hosts file (IPv4, loopback left out), in its order.
pub fn entries(text: &str) -> Vec<(Ipv4Addr, String)> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let address: Ipv4Addr = words.next()?.parse().ok()?;
            let name = words.next()?;
            (!address.is_loopback()).then(|| (address, name.to_owned()))
        })
        .take(cela_guest::MAX_HOSTS)
        .collect()
}

fn read(path: &Path) -> Option<String> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let f = std::fs::File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .ok()?;
    let mut text = String::new();
    f.take(MAX_FILE).read_to_string(&mut text).ok()?;
    // The file is rewritten in place (truncated, then written): a read between the two is
    // not a file with no names, and the write's close brings another read.
    whole(&text).then_some(text)
}

/// Whether `text` is a whole hosts file as the network code writes it.
fn whole(text: &str) -> bool {
    text.starts_with("127.0.0.1\tlocalhost\n") && text.ends_with('\n')
}

/// Passes `inst`'s hosts file to its guest now and whenever it changes, on a thread of its
/// own, until the machine ends (the supervisor's end ends it too). Nothing happens for an
/// instance that has no hosts file (it is on no named network).
pub fn forward(inst: &Instance, sender: Sender) {
    let path = inst.dir.join(super::named::HOSTS_FILE);
    if !path.exists() {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("vm-hosts".into())
        .spawn(move || {
            if let Err(e) = follow(&path, &sender) {
                tracing::warn!("the guest's names will not follow its networks: {e}");
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot start the thread passing the guest its names: {e}");
    }
}

fn follow(path: &Path, sender: &Sender) -> nix::Result<()> {
    let inotify = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)?;
    // Watched before the first read, so no rewrite falls between the two.
    inotify.add_watch(path, AddWatchFlags::IN_CLOSE_WRITE)?;
    let mut sent: Option<String> = None;
    loop {
        let mut retry = false;
        if let Some(text) = read(path)
            && sent.as_ref() != Some(&text)
        {
            match sender.send(&entries(&text)) {
                Ok(()) => sent = Some(text),
                Err(Failed::ForGood) => return Ok(()),
                Err(Failed::Now(why)) => {
                    tracing::debug!("the guest did not take its names yet: {why}");
                    retry = true;
                }
            }
        }
        let timeout = if retry {
            PollTimeout::try_from(RETRY).unwrap_or(PollTimeout::MAX)
        } else {
            PollTimeout::NONE
        };
        let mut fds = [PollFd::new(inotify.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e),
        }
        // Drained: one read stands for every change so far.
        while let Ok(events) = inotify.read_events() {
            if events.is_empty() {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_caught_mid_rewrite_is_not_read() {
        assert!(whole("127.0.0.1\tlocalhost\n::1\tlocalhost\n10.0.0.2\ta\n"));
        assert!(!whole(""));
        assert!(!whole("127.0.0.1\tloc"));
        assert!(!whole("127.0.0.1\tlocalhost\n10.0.0.2\ta"));
    }

    #[test]
    fn a_hosts_file_gives_its_ipv4_names_without_loopback() {
        let text = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n10.214.0.2\tvm\n# x\n\n10.214.0.3\tweb extra\nbad line\n";
        assert_eq!(
            entries(text),
            vec![
                (Ipv4Addr::new(10, 214, 0, 2), "vm".to_owned()),
                (Ipv4Addr::new(10, 214, 0, 3), "web".to_owned()),
            ]
        );
    }
}
