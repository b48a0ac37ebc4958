//! The pseudo-filesystems every Linux userspace expects, mounted before anything else runs.
//!
//! The kernel hands PID 1 a bare initramfs (a tmpfs/ramfs root with whatever the cpio held);
//! nothing is mounted on it. The table below is what a minimal init provides: process and
//! device views (`proc`, `sysfs`, `devtmpfs`, `devpts`) and two scratch tmpfs.

use std::fs;
use std::path::Path;

use nix::errno::Errno;
use nix::mount::{MsFlags, mount};

use super::say;

/// One filesystem to mount.
#[derive(Debug, Clone, Copy)]
pub struct MountPoint {
    pub fstype: &'static str,
    pub target: &'static str,
    pub flags: MsFlags,
    pub data: Option<&'static str>,
}

const NOSUID_NODEV: MsFlags = MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV);
const NOSUID_NODEV_NOEXEC: MsFlags = NOSUID_NODEV.union(MsFlags::MS_NOEXEC);

/// What cela-init mounts, parents before children.
pub const MOUNTS: [MountPoint; 6] = [
    MountPoint {
        fstype: "proc",
        target: "/proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    MountPoint {
        fstype: "sysfs",
        target: "/sys",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    MountPoint {
        fstype: "devtmpfs",
        target: "/dev",
        flags: MsFlags::MS_NOSUID,
        data: Some("mode=0755"),
    },
    MountPoint {
        fstype: "devpts",
        target: "/dev/pts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: Some("mode=0620,ptmxmode=0666"),
    },
    MountPoint {
        fstype: "tmpfs",
        target: "/tmp",
        flags: NOSUID_NODEV,
        data: Some("mode=1777"),
    },
    MountPoint {
        fstype: "tmpfs",
        target: "/run",
        flags: NOSUID_NODEV,
        data: Some("mode=0755"),
    },
];

/// Mounts one filesystem, creating its mount point first. A filesystem already mounted there
/// (`EBUSY`) is fine.
pub fn mount_one(point: &MountPoint) -> Result<(), String> {
    fs::create_dir_all(point.target).map_err(|e| format!("creating {}: {e}", point.target))?;
    match mount(
        Some(point.fstype),
        Path::new(point.target),
        Some(point.fstype),
        point.flags,
        point.data,
    ) {
        Ok(()) | Err(Errno::EBUSY) => Ok(()),
        Err(e) => Err(format!(
            "mounting {} on {}: {e}",
            point.fstype, point.target
        )),
    }
}

/// Mounts everything in [`MOUNTS`]; a failure is reported and the boot goes on (the workload
/// may not need that filesystem).
pub fn mount_all() {
    for point in &MOUNTS {
        if let Err(e) = mount_one(point) {
            say!("{e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_are_mounted_before_children() {
        for (i, child) in MOUNTS.iter().enumerate() {
            for parent in &MOUNTS[i + 1..] {
                assert!(
                    !Path::new(child.target).starts_with(parent.target),
                    "{} is mounted before its parent {}",
                    child.target,
                    parent.target
                );
            }
        }
    }
}
