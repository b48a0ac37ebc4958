//! Switching the root filesystem to a disk (`cela run --vm --rootfs IMAGE`), so the workload
//! runs in a real distribution's userland instead of the initramfs.
//!
//! The host names the disk by its virtio-blk serial ([`cela_guest::ROOT_PARAM`]); the init
//! finds the `/dev/vdX` whose `/sys/block/vdX/serial` matches, mounts it (read-only if the
//! disk is), moves the pseudo-filesystems it mounted at boot into it, and makes it the root the
//! way `switch_root` does: the initramfs is a `rootfs` mount that cannot be unmounted or
//! pivoted away from, so the new root is *moved over* `/` and entered with `chroot`. The init
//! keeps running from memory; its control channel and console stay open across the switch.

use std::fs;
use std::path::{Path, PathBuf};

use nix::mount::{MsFlags, mount};

use super::mounts::MOUNTS;

/// Where the root disk is mounted before it becomes `/`.
const STAGING: &str = "/sysroot";

/// Finds the block device whose serial is `serial` in `sys_block` (normally `/sys/block`).
pub fn find_disk(sys_block: &Path, serial: &str) -> Option<(String, bool)> {
    let mut names: Vec<String> = fs::read_dir(sys_block)
        .ok()?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names.into_iter().find_map(|name| {
        let dir = sys_block.join(&name);
        let found = fs::read_to_string(dir.join("serial")).ok()?;
        if found.trim_end() != serial {
            return None;
        }
        let read_only = fs::read_to_string(dir.join("ro")).is_ok_and(|ro| ro.trim() == "1");
        Some((name, read_only))
    })
}

/// Mounts the disk with serial `serial` and makes it `/`. On error nothing of the initramfs's
/// own mounts has moved unless the message says so.
pub fn switch_to(serial: &str) -> Result<(), String> {
    let (name, read_only) = find_disk(Path::new("/sys/block"), serial)
        .ok_or_else(|| format!("no disk with serial {serial:?} for the root filesystem"))?;
    let device = PathBuf::from("/dev").join(&name);
    fs::create_dir_all(STAGING).map_err(|e| format!("creating {STAGING}: {e}"))?;
    // A read-only disk cannot have its journal replayed: `noload` mounts it as it is (a disk
    // cela-init ended is clean; one from a crashed guest shows its last committed state).
    let (flags, data) = if read_only {
        (MsFlags::MS_RDONLY, Some("noload"))
    } else {
        (MsFlags::empty(), None)
    };
    mount(Some(&device), STAGING, Some("ext4"), flags, data)
        .map_err(|e| format!("mounting the root disk {} as ext4: {e}", device.display()))?;
    // Top-level mounts only: children (/dev/pts) move with their parent.
    for point in MOUNTS
        .iter()
        .filter(|p| Path::new(p.target).parent() == Some(Path::new("/")))
    {
        let target = Path::new(STAGING).join(point.target.trim_start_matches('/'));
        if !target.is_dir() {
            fs::create_dir_all(&target).map_err(|e| {
                format!(
                    "the root filesystem has no {} directory and it cannot be made: {e}",
                    point.target
                )
            })?;
        }
        mount(
            Some(point.target),
            &target,
            None::<&str>,
            MsFlags::MS_MOVE,
            None::<&str>,
        )
        .map_err(|e| format!("moving {} into the root filesystem: {e}", point.target))?;
    }
    std::env::set_current_dir(STAGING).map_err(|e| format!("entering {STAGING}: {e}"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|e| format!("moving the root filesystem over /: {e}"))?;
    nix::unistd::chroot(".").map_err(|e| format!("entering the root filesystem: {e}"))?;
    std::env::set_current_dir("/").map_err(|e| format!("entering /: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::TestDir;

    #[test]
    fn the_disk_is_found_by_its_serial() {
        let dir = TestDir::new();
        for (name, serial, ro) in [("vda", "data.img", "0"), ("vdb", "cela-rootfs", "1")] {
            let d = dir.path().join(name);
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("serial"), format!("{serial}\n")).unwrap();
            fs::write(d.join("ro"), ro).unwrap();
        }
        fs::create_dir_all(dir.path().join("loop0")).unwrap();
        assert_eq!(
            find_disk(dir.path(), "cela-rootfs"),
            Some(("vdb".into(), true))
        );
        assert_eq!(
            find_disk(dir.path(), "data.img"),
            Some(("vda".into(), false))
        );
        assert_eq!(find_disk(dir.path(), "nothing"), None);
    }
}
