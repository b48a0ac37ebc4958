//! Validation of a [`MachineConfig`]: everything that can be checked before any resource is
//! created, each failure with a message naming the value and the limit.

use std::fs::OpenOptions;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::arch::x86_64::boot::{BootError, read_setup_header};
use crate::devices::virtio::block::DiskImage;
use crate::machine::{DiskConfig, MachineConfig, VsockConfig};

/// The most vCPUs cela's machine describes: APIC IDs and MADT processor UIDs are 8-bit, and
/// 0xff is the broadcast ID.
pub const MAX_VCPUS: u32 = 254;
/// The least memory a cela guest can boot in: a Debian kernel with its initramfs needs this.
pub const MIN_MEMORY_MIB: u64 = 64;
/// The most disks a machine gets (a `--rootfs` counts as one): each is a virtio-mmio device
/// with its own IOAPIC line, and the virtio-rng, virtio-net and virtio-vsock take three more
/// (17 lines in all, GSI 5-22 without the SCI's 9; 23 is the Generic Event Device's;
/// `layout::virtio_mmio_slot`).
pub const MAX_DISKS: usize = 14;
/// The most network cards a machine gets: beyond its first, each takes a disk's interrupt
/// line (disks and cards together at most [`MAX_DISKS`] + 1).
pub const MAX_NICS: usize = 8;

/// What is wrong with a machine configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--cpus must be at least 1")]
    NoVcpus,
    #[error("--cpus {asked} is more than {limit}, the most {by} allows")]
    TooManyVcpus {
        asked: u32,
        limit: u32,
        by: &'static str,
    },
    #[error("--memory {asked} MiB is too small: a guest needs at least {MIN_MEMORY_MIB} MiB")]
    TooLittleMemory { asked: u64 },
    #[error("--memory {asked} MiB is more than this host has ({host} MiB of RAM)")]
    TooMuchMemory { asked: u64, host: u64 },
    #[error("kernel {0} does not exist")]
    KernelMissing(String),
    #[error("initramfs {0} does not exist")]
    InitrdMissing(String),
    #[error("{what} {path} is not a regular file")]
    NotAFile { what: &'static str, path: String },
    #[error(transparent)]
    Kernel(#[from] BootError),
    #[error("--disk {0}: no such file")]
    DiskMissing(String),
    #[error("--disk {0} is a directory, not a disk image")]
    DiskIsDirectory(String),
    #[error("--disk {0} is not a regular file")]
    DiskNotAFile(String),
    #[error("--disk {path}: cannot open it {mode}: {err}")]
    DiskOpen {
        path: String,
        mode: &'static str,
        err: std::io::Error,
    },
    #[error(
        "disk {second} is the same file as disk {first}; a file can be given twice only if every use is read-only (,ro)"
    )]
    DiskTwice { first: String, second: String },
    #[error(
        "--vsock {0}: a file is already there (cela creates the socket; remove it or choose another path)"
    )]
    VsockExists(String),
    #[error("--vsock {0}: its directory does not exist")]
    VsockNoDirectory(String),
    #[error("vsock guest CID {0} is reserved or too large (a guest CID is 3 to 4294967294)")]
    VsockCid(u64),
    #[error("{0} disks are more than {MAX_DISKS}, the most cela gives a VM")]
    TooManyDisks(usize),
    #[error(
        "{nics} network cards are more than a VM takes: at most {MAX_NICS}, and with its {disks} disks at most {} in all",
        MAX_DISKS + 1
    )]
    TooManyNics { nics: usize, disks: usize },
    #[error("--rootfs {0}: no such file")]
    RootfsMissing(String),
    #[error("--rootfs {path}: {err}")]
    RootfsOpen { path: String, err: std::io::Error },
    #[error(
        "--rootfs {path} is not an ext4 image ({why}); make one with `mkfs.ext4 -d DIR IMAGE SIZE`"
    )]
    RootfsNotExt4 { path: String, why: String },
}

/// Where the ext2/3/4 superblock keeps its magic number: `s_magic`, 56 bytes into the
/// superblock, which starts 1024 bytes into the filesystem.
const EXT4_MAGIC_OFFSET: u64 = 1024 + 56;
const EXT4_MAGIC: u16 = 0xef53;

/// Checks that `path` (for `--rootfs`) is a regular file holding an ext2/3/4 filesystem, the
/// guest's root (its kernel has ext4 built in and mounts all three).
pub fn check_rootfs(path: &Path) -> Result<(), ConfigError> {
    use std::io::{Read, Seek, SeekFrom};
    let shown = path.display().to_string();
    let open_err = |err| ConfigError::RootfsOpen {
        path: shown.clone(),
        err,
    };
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => ConfigError::RootfsMissing(shown.clone()),
        _ => open_err(e),
    })?;
    if !meta.is_file() {
        return Err(ConfigError::RootfsNotExt4 {
            path: shown,
            why: "not a regular file".into(),
        });
    }
    let mut file = std::fs::File::open(path).map_err(open_err)?;
    let mut magic = [0u8; 2];
    file.seek(SeekFrom::Start(EXT4_MAGIC_OFFSET))
        .and_then(|_| file.read_exact(&mut magic))
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => ConfigError::RootfsNotExt4 {
                path: shown.clone(),
                why: format!("{} bytes is too small to hold a superblock", meta.len()),
            },
            _ => open_err(e),
        })?;
    let found = u16::from_le_bytes(magic);
    if found != EXT4_MAGIC {
        return Err(ConfigError::RootfsNotExt4 {
            path: shown,
            why: format!(
                "no superblock magic 0xef53 at byte {EXT4_MAGIC_OFFSET}, found {found:#06x}"
            ),
        });
    }
    Ok(())
}

/// Total RAM of the host in MiB, from /proc/meminfo.
pub fn host_memory_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

fn check_file(
    what: &'static str,
    path: &Path,
    missing: fn(String) -> ConfigError,
) -> Result<(), ConfigError> {
    let shown = path.display().to_string();
    match std::fs::metadata(path) {
        Err(_) => Err(missing(shown)),
        Ok(m) if !m.is_file() => Err(ConfigError::NotAFile { what, path: shown }),
        Ok(_) => Ok(()),
    }
}

/// Checks what any engine needs: vCPU and memory bounds, that the kernel is a bzImage and the
/// initramfs exists, and that the disks can be opened as asked ([`open_disks`]).
pub fn validate(config: &MachineConfig) -> Result<(), ConfigError> {
    if config.vcpus == 0 {
        return Err(ConfigError::NoVcpus);
    }
    if config.vcpus > MAX_VCPUS {
        return Err(ConfigError::TooManyVcpus {
            asked: config.vcpus,
            limit: MAX_VCPUS,
            by: "cela's machine model",
        });
    }
    if config.memory_mib < MIN_MEMORY_MIB {
        return Err(ConfigError::TooLittleMemory {
            asked: config.memory_mib,
        });
    }
    if let Some(host) = host_memory_mib()
        && config.memory_mib > host
    {
        return Err(ConfigError::TooMuchMemory {
            asked: config.memory_mib,
            host,
        });
    }
    let nics = config.nets.len();
    if config.disks.len() > MAX_DISKS {
        return Err(ConfigError::TooManyDisks(config.disks.len()));
    }
    if nics > MAX_NICS || config.disks.len() + nics.max(1) > MAX_DISKS + 1 {
        return Err(ConfigError::TooManyNics {
            nics,
            disks: config.disks.len(),
        });
    }
    check_file("kernel", &config.kernel, ConfigError::KernelMissing)?;
    read_setup_header(&config.kernel)?;
    if let Some(initrd) = &config.initrd {
        check_file("initramfs", initrd, ConfigError::InitrdMissing)?;
    }
    open_disks(&config.disks)?;
    if let Some(vsock) = &config.vsock {
        check_vsock(vsock)?;
    }
    Ok(())
}

/// Checks a `--vsock` socket before anything is created: the path must not exist (cela
/// creates the socket and removes it when the VM ends), its directory must, and the guest CID
/// must be one a guest may have (3 ..= 0xffff_fffe: 0-2 are reserved, `u32::MAX` means "any").
pub fn check_vsock(vsock: &VsockConfig) -> Result<(), ConfigError> {
    let path = vsock.path.display().to_string();
    if vsock.path.symlink_metadata().is_ok() {
        return Err(ConfigError::VsockExists(path));
    }
    let dir = match vsock.path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(ConfigError::VsockNoDirectory(path));
    }
    if !(3..u64::from(u32::MAX)).contains(&vsock.guest_cid) {
        return Err(ConfigError::VsockCid(vsock.guest_cid));
    }
    Ok(())
}

/// Opens the disk images of `disks`, in order: each must be an existing regular file that can
/// be opened read-write (read-only with `,ro`), and no file may be given twice unless every
/// use of it is read-only (two writers would corrupt it). Files are compared by device and
/// inode, so another path to the same file is caught too.
pub fn open_disks(disks: &[DiskConfig]) -> Result<Vec<DiskImage>, ConfigError> {
    if disks.len() > MAX_DISKS {
        return Err(ConfigError::TooManyDisks(disks.len()));
    }
    let mut seen: Vec<(u64, u64, &DiskConfig)> = Vec::new();
    let mut images = Vec::new();
    for disk in disks {
        let shown = disk.path.display().to_string();
        let meta = std::fs::metadata(&disk.path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ConfigError::DiskMissing(shown.clone()),
            _ => ConfigError::DiskOpen {
                path: shown.clone(),
                mode: "at all",
                err: e,
            },
        })?;
        if meta.is_dir() {
            return Err(ConfigError::DiskIsDirectory(shown));
        }
        if !meta.is_file() {
            return Err(ConfigError::DiskNotAFile(shown));
        }
        let mode = if disk.read_only {
            "read-only"
        } else {
            "read-write"
        };
        let open_err = |err| ConfigError::DiskOpen {
            path: shown.clone(),
            mode,
            err,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!disk.read_only)
            .open(&disk.path)
            .map_err(open_err)?;
        let opened = file.metadata().map_err(open_err)?;
        let key = (opened.dev(), opened.ino());
        if let Some((_, _, first)) = seen
            .iter()
            .find(|(dev, ino, first)| (*dev, *ino) == key && !(first.read_only && disk.read_only))
        {
            return Err(ConfigError::DiskTwice {
                first: first.path.display().to_string(),
                second: shown.clone(),
            });
        }
        seen.push((key.0, key.1, disk));
        let image = DiskImage::new(file, &disk.path, disk.read_only).map_err(open_err)?;
        images.push(match &disk.serial {
            Some(serial) => image.with_serial(serial.as_bytes()),
            None => image,
        });
    }
    Ok(images)
}

/// Checks the limits KVM itself sets on this host.
pub fn validate_for_kvm(config: &MachineConfig, kvm_max_vcpus: usize) -> Result<(), ConfigError> {
    let limit = u32::try_from(kvm_max_vcpus).unwrap_or(u32::MAX);
    if config.vcpus > limit {
        return Err(ConfigError::TooManyVcpus {
            asked: config.vcpus,
            limit,
            by: "KVM on this host",
        });
    }
    Ok(())
}

/// The size of the largest of `disks` (0 without any): the monitor's RLIMIT_FSIZE.
pub fn largest_disk(disks: &[DiskConfig]) -> u64 {
    disks
        .iter()
        .filter_map(|d| std::fs::metadata(&d.path).ok())
        .map(|m| m.len())
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn config(kernel: PathBuf) -> MachineConfig {
        MachineConfig {
            vcpus: 1,
            memory_mib: 256,
            kernel,
            initrd: None,
            cmdline: String::new(),
            disks: vec![],
            nets: Vec::new(),
            vsock: None,
            confine: true,
        }
    }

    #[test]
    fn vcpu_and_memory_bounds() {
        let k = crate::arch::x86_64::boot::tests_support::fake_bzimage();
        let mut c = config(k.path().to_owned());
        assert!(validate(&c).is_ok());
        c.vcpus = 0;
        assert_eq!(
            validate(&c).unwrap_err().to_string(),
            "--cpus must be at least 1"
        );
        c.vcpus = 300;
        assert!(
            validate(&c)
                .unwrap_err()
                .to_string()
                .contains("more than 254")
        );
        c.vcpus = 4;
        assert!(
            validate_for_kvm(&c, 2)
                .unwrap_err()
                .to_string()
                .contains("KVM on this host")
        );
        c.memory_mib = 16;
        assert!(
            validate(&c)
                .unwrap_err()
                .to_string()
                .contains("at least 64 MiB")
        );
        c.memory_mib = 1 << 40;
        assert!(
            validate(&c)
                .unwrap_err()
                .to_string()
                .contains("more than this host has")
        );
    }

    #[test]
    fn missing_or_bad_files_are_named() {
        let mut c = config("/nope/vmlinuz".into());
        assert_eq!(
            validate(&c).unwrap_err().to_string(),
            "kernel /nope/vmlinuz does not exist"
        );
        c.kernel = "/".into();
        assert!(
            validate(&c)
                .unwrap_err()
                .to_string()
                .contains("not a regular file")
        );
        let not_kernel = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(not_kernel.path(), vec![0u8; 4096]).unwrap();
        c.kernel = not_kernel.path().to_owned();
        assert!(
            validate(&c)
                .unwrap_err()
                .to_string()
                .contains("not a bzImage")
        );
        let k = crate::arch::x86_64::boot::tests_support::fake_bzimage();
        c.kernel = k.path().to_owned();
        c.initrd = Some("/nope/initrd".into());
        assert_eq!(
            validate(&c).unwrap_err().to_string(),
            "initramfs /nope/initrd does not exist"
        );
    }

    fn disk(path: &Path, read_only: bool) -> DiskConfig {
        DiskConfig {
            path: path.to_owned(),
            read_only,
            serial: None,
        }
    }

    #[test]
    fn rootfs_must_be_an_ext4_image() {
        let dir = tempfile::tempdir().unwrap();
        let small = dir.path().join("small.img");
        std::fs::write(&small, [0u8; 100]).unwrap();
        assert!(
            check_rootfs(&small)
                .unwrap_err()
                .to_string()
                .contains("too small")
        );
        let zeros = dir.path().join("zeros.img");
        std::fs::write(&zeros, vec![0u8; 4096]).unwrap();
        assert!(
            check_rootfs(&zeros)
                .unwrap_err()
                .to_string()
                .contains("no superblock magic 0xef53 at byte 1080, found 0x0000")
        );
        let mut ext = vec![0u8; 4096];
        ext[1080..1082].copy_from_slice(&[0x53, 0xef]);
        let fake = dir.path().join("ext.img");
        std::fs::write(&fake, ext).unwrap();
        check_rootfs(&fake).unwrap();
        assert!(
            check_rootfs(&dir.path().join("missing"))
                .unwrap_err()
                .to_string()
                .starts_with("--rootfs ")
        );
        assert!(
            check_rootfs(dir.path())
                .unwrap_err()
                .to_string()
                .contains("not a regular file")
        );
    }

    #[test]
    fn vsock_sockets_must_be_new_in_an_existing_directory() {
        let dir = tempfile::tempdir().unwrap();
        let v = |path: PathBuf, guest_cid| VsockConfig { path, guest_cid };
        assert!(check_vsock(&v(dir.path().join("v.sock"), 3)).is_ok());
        let taken = dir.path().join("taken");
        std::fs::write(&taken, "").unwrap();
        let err = check_vsock(&v(taken, 3)).unwrap_err().to_string();
        assert!(err.contains("already there"), "{err}");
        let err = check_vsock(&v(dir.path().join("no/v.sock"), 3))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no/v.sock: its directory does not exist"),
            "{err}"
        );
        for cid in [0, 2, u64::from(u32::MAX)] {
            assert!(check_vsock(&v(dir.path().join("c.sock"), cid)).is_err());
        }
    }

    #[test]
    fn the_most_disks_and_the_other_virtio_devices_fill_the_interrupt_lines_exactly() {
        let slots = (0..)
            .map_while(crate::arch::x86_64::layout::virtio_mmio_slot)
            .count();
        assert_eq!(MAX_DISKS + 3, slots);
    }

    #[test]
    fn disks_are_opened_as_asked() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.img");
        std::fs::write(&a, vec![0u8; 4096]).unwrap();
        let images = open_disks(&[disk(&a, false)]).unwrap();
        assert_eq!(images[0].sectors(), 8);
        let missing = dir.path().join("nope.img");
        assert_eq!(
            open_disks(&[disk(&missing, true)]).unwrap_err().to_string(),
            format!("--disk {}: no such file", missing.display())
        );
        assert!(
            open_disks(&[disk(dir.path(), true)])
                .unwrap_err()
                .to_string()
                .contains("is a directory")
        );
        assert!(
            open_disks(&[disk(Path::new("/dev/null"), true)])
                .unwrap_err()
                .to_string()
                .contains("not a regular file")
        );
        // sysfs refuses to open a read-only attribute for writing, even for root.
        let ro_attr = Path::new("/sys/devices/system/cpu/online");
        if ro_attr.exists() {
            let err = open_disks(&[disk(ro_attr, false)]).unwrap_err().to_string();
            assert!(err.contains("cannot open it read-write"), "{err}");
            assert!(open_disks(&[disk(ro_attr, true)]).is_ok());
        }
        let too_many: Vec<_> = (0..=MAX_DISKS).map(|_| disk(&a, true)).collect();
        assert!(
            open_disks(&too_many)
                .unwrap_err()
                .to_string()
                .contains(&format!("more than {MAX_DISKS}"))
        );
    }

    #[test]
    fn a_file_given_twice_must_be_read_only_each_time() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.img");
        std::fs::write(&a, vec![0u8; 512]).unwrap();
        let link = dir.path().join("link.img");
        std::fs::hard_link(&a, &link).unwrap();
        assert!(open_disks(&[disk(&a, true), disk(&link, true)]).is_ok());
        for (ra, rb) in [(false, false), (true, false), (false, true)] {
            let err = open_disks(&[disk(&a, ra), disk(&link, rb)])
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("is the same file as") && err.contains("a.img"),
                "{err}"
            );
        }
    }
}
