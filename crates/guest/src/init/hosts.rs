//! The guest's `/etc/hosts`, as the host sends it ([`cela_guest::HostRequest::Host`] blocks):
//! the names of the instances on the microVM's networks, so that its workload reaches them
//! by name as a container on the same network does. A block is collected whole and then
//! replaces the file at once (written beside it, renamed over it), so a reader never sees
//! half of it; a block cut off by a newer one is dropped.

use std::io::Write as _;
use std::net::Ipv4Addr;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use cela_guest::{Hostname, MAX_HOSTS};

/// The loopback names every hosts file starts with.
const LOOPBACK: &str = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n";

/// A block being received.
#[derive(Debug, Default)]
pub struct Block {
    entries: Option<Vec<(Ipv4Addr, Hostname)>>,
}

impl Block {
    /// A block begins (one still open is dropped).
    pub fn begin(&mut self) {
        self.entries = Some(Vec::new());
    }

    /// One name of the open block; without a block (its begin was lost) or past
    /// [`MAX_HOSTS`] it is dropped.
    pub fn add(&mut self, address: Ipv4Addr, name: Hostname) {
        if let Some(e) = &mut self.entries
            && e.len() < MAX_HOSTS
        {
            e.push((address, name));
        }
    }

    /// The block ends: its text, if one was open.
    pub fn end(&mut self) -> Option<String> {
        self.entries.take().map(|entries| text(&entries))
    }
}

/// The hosts file of `entries`: loopback first, then one line per name.
pub fn text(entries: &[(Ipv4Addr, Hostname)]) -> String {
    let mut out = String::from(LOOPBACK);
    for (address, name) in entries {
        out.push_str(&format!("{address}\t{}\n", name.as_str()));
    }
    out
}

/// Replaces `root`'s `etc/hosts` with `text`: written to a new file in `etc` (made if
/// missing) and renamed over the old one, never through a link the image put there.
pub fn install(root: &Path, text: &str) -> std::io::Result<()> {
    let etc = root.join("etc");
    match std::fs::create_dir(&etc) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    let temp = etc.join(".hosts.cela");
    let _ = std::fs::remove_file(&temp);
    let mut f = std::fs::File::options()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&temp)?;
    f.write_all(text.as_bytes())?;
    drop(f);
    std::fs::rename(&temp, etc.join("hosts")).inspect_err(|_| {
        let _ = std::fs::remove_file(&temp);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> Hostname {
        Hostname::new(s).unwrap()
    }

    #[test]
    fn a_block_is_taken_whole_and_a_cut_one_is_dropped() {
        let mut b = Block::default();
        // A name without its begin is dropped.
        b.add([10, 0, 0, 9].into(), name("stray"));
        assert_eq!(b.end(), None);
        b.begin();
        b.add([10, 0, 0, 1].into(), name("lost"));
        b.begin();
        b.add([10, 0, 0, 2].into(), name("web"));
        b.add([10, 0, 0, 3].into(), name("db.1"));
        let text = b.end().unwrap();
        assert_eq!(text, format!("{LOOPBACK}10.0.0.2\tweb\n10.0.0.3\tdb.1\n"));
        assert_eq!(b.end(), None);
        b.begin();
        for i in 0..MAX_HOSTS + 5 {
            b.add([10, 1, (i / 256) as u8, (i % 256) as u8].into(), name("n"));
        }
        assert_eq!(b.end().unwrap().lines().count(), 2 + MAX_HOSTS);
    }

    #[test]
    fn install_replaces_a_link_rather_than_writing_through_it() {
        let dir = crate::init::TestDir::new();
        let root = dir.path();
        // No etc at all: made.
        install(root, "a\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(root.join("etc/hosts")).unwrap(),
            "a\n"
        );
        // A hosts file that is a link to somewhere else: the link is replaced, its target kept.
        let target = root.join("elsewhere");
        std::fs::write(&target, "keep\n").unwrap();
        std::fs::remove_file(root.join("etc/hosts")).unwrap();
        std::os::unix::fs::symlink(&target, root.join("etc/hosts")).unwrap();
        install(root, "b\n").unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep\n");
        let meta = std::fs::symlink_metadata(root.join("etc/hosts")).unwrap();
        assert!(meta.file_type().is_file());
        assert_eq!(
            std::fs::read_to_string(root.join("etc/hosts")).unwrap(),
            "b\n"
        );
    }
}
