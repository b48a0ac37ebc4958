//! The initramfs every cela microVM boots with: cela's init, busybox, and the modules the
//! guest needs to reach its virtio devices, as one uncompressed newc archive.
//!
//! ```text
//! /init                         the given init binary (0755)
//! /bin/busybox, /bin/<applet>   busybox and a symlink per applet; /sbin, /usr/bin, /usr/sbin → bin
//! /dev/console                  so that the kernel can give init its stdin/stdout/stderr
//! /proc /sys /tmp /run /root /etc/{passwd,group}
//! /lib/modules/cela/<name>.ko   GUEST_MODULES and their dependencies, decompressed, flat
//! /lib/modules/cela/load.order  their paths, one per line, dependencies first
//! ```
//!
//! The init reads [`LOAD_ORDER`] and loads each module in turn, so the guest needs no modprobe,
//! depmod or `modules.dep`.

use std::io::{BufWriter, Write};
use std::path::Path;
use std::process::Command;

use crate::cpio::CpioWriter;
use crate::debian::DebianKernel;
use crate::error::IoContext;
use crate::modules::{self, module_name};
use crate::{AssetError, cmd};

/// The modules a default guest loads: its paravirtual devices on the virtio-mmio transport,
/// and pvpanic so that a guest kernel panic reaches the VMM. Their dependencies come along.
pub const GUEST_MODULES: &[&str] = &[
    "pvpanic_mmio",
    "virtio_mmio",
    "virtio_blk",
    "virtio_net",
    "virtio_rng",
    "vmw_vsock_virtio_transport",
];

/// Directory of the guest's modules inside the initramfs (no leading `/`: an archive path).
pub const MODULE_DIR: &str = "lib/modules/cela";
/// The file listing the modules to load, in order; the same path as
/// `cela_guest::MODULE_LOAD_ORDER`.
pub const LOAD_ORDER: &str = "/lib/modules/cela/load.order";

const PASSWD: &str =
    "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
const GROUP: &str = "root:x:0:\nnogroup:x:65534:\n";

/// Builds the guest initramfs for `kernel` at `out`, atomically (a temporary file in the same
/// directory, renamed when complete).
pub fn build_guest_initramfs(
    kernel: &DebianKernel,
    busybox: &Path,
    init: &Path,
    out: &Path,
) -> Result<(), AssetError> {
    let init = std::fs::read(init).at("reading init binary", init)?;
    build_with_init(kernel, busybox, &init, out)
}

/// [`build_guest_initramfs`] with the init binary's bytes already read.
pub(crate) fn build_with_init(
    kernel: &DebianKernel,
    busybox: &Path,
    init: &[u8],
    out: &Path,
) -> Result<(), AssetError> {
    let modules = kernel.module_closure(GUEST_MODULES)?;
    let applets = busybox_applets(busybox)?;

    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let tmp = tempfile::Builder::new()
        .prefix(crate::cache::TMP_PREFIX)
        .tempfile_in(dir)
        .at("creating a temporary file in", dir)?;
    let writing = |e| AssetError::Io {
        action: "writing initramfs",
        path: tmp.path().to_owned(),
        source: e,
    };
    let mut cpio = CpioWriter::new(BufWriter::new(tmp.as_file()));
    write_skeleton(&mut cpio, init, busybox, &applets).map_err(writing)?;
    let mut order = String::new();
    for path in &modules {
        let name = module_name(path).expect("the module index holds only module files");
        let entry = format!("{MODULE_DIR}/{name}.ko");
        if path.extension().is_some_and(|e| e == "ko") {
            cpio.file_from_path(&entry, 0o644, path).map_err(writing)?;
        } else {
            let image = modules::read_module(path)?;
            cpio.file(&entry, 0o644, &image).map_err(writing)?;
        }
        order.push_str(&format!("/{entry}\n"));
    }
    let order_entry = LOAD_ORDER.trim_start_matches('/');
    cpio.file(order_entry, 0o644, order.as_bytes())
        .map_err(writing)?;
    let mut buf = cpio.finish().map_err(writing)?;
    buf.flush().map_err(writing)?;
    drop(buf);

    use std::os::unix::fs::PermissionsExt;
    let file = tmp.as_file();
    file.set_permissions(std::fs::Permissions::from_mode(0o644))
        .map_err(writing)?;
    file.sync_all().map_err(writing)?;
    tmp.persist(out)
        .map_err(|e| e.error)
        .at("moving the initramfs into place at", out)?;
    Ok(())
}

/// Everything but the modules.
fn write_skeleton<W: Write>(
    cpio: &mut CpioWriter<W>,
    init: &[u8],
    busybox: &Path,
    applets: &[String],
) -> std::io::Result<()> {
    for (dir, mode) in [
        ("bin", 0o755),
        ("dev", 0o755),
        ("etc", 0o755),
        ("proc", 0o555),
        ("root", 0o700),
        ("run", 0o755),
        ("sys", 0o555),
        ("tmp", 0o1777),
        ("usr", 0o755),
        (MODULE_DIR, 0o755),
    ] {
        cpio.dir(dir, mode)?;
    }
    cpio.char_device("dev/console", 0o600, 5, 1)?;
    cpio.file("init", 0o755, init)?;
    cpio.file_from_path("bin/busybox", 0o755, busybox)?;
    for applet in applets {
        cpio.symlink(&format!("bin/{applet}"), "busybox")?;
    }
    cpio.symlink("sbin", "bin")?;
    cpio.symlink("usr/bin", "../bin")?;
    cpio.symlink("usr/sbin", "../bin")?;
    cpio.file("etc/passwd", 0o644, PASSWD.as_bytes())?;
    cpio.file("etc/group", 0o644, GROUP.as_bytes())?;
    Ok(())
}

/// The applets of a busybox binary (`busybox --list`), without `busybox` itself.
fn busybox_applets(busybox: &Path) -> Result<Vec<String>, AssetError> {
    let out = cmd::stdout(
        Command::new(busybox).arg("--list"),
        "the busybox binary may be damaged: remove it from the asset cache to fetch it again",
    )?;
    let list = String::from_utf8_lossy(&out);
    let applets: Vec<String> = list
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && *a != "busybox" && !a.contains('/'))
        .map(str::to_owned)
        .collect();
    if applets.is_empty() {
        return Err(AssetError::BadPackage {
            package: busybox.display().to_string(),
            reason: "`busybox --list` printed no applets".into(),
        });
    }
    Ok(applets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_skeleton_holds_init_busybox_and_applets() {
        let dir = tempfile::tempdir().unwrap();
        let busybox = dir.path().join("busybox");
        std::fs::write(&busybox, b"\x7fELF fake").unwrap();
        let mut cpio = CpioWriter::new(Vec::new());
        let applets = ["sh".to_string(), "mount".to_string()];
        write_skeleton(&mut cpio, b"init!", &busybox, &applets).unwrap();
        let entries = crate::cpio::testing::parse(&cpio.finish().unwrap());
        let get = |n: &str| {
            entries
                .iter()
                .find(|e| e.0 == n)
                .unwrap_or_else(|| panic!("{n} missing"))
        };
        assert_eq!(get("init").3, b"init!");
        assert_eq!(get("init").1, 0o100755);
        assert_eq!(get("bin/busybox").3, b"\x7fELF fake");
        assert_eq!(get("bin/sh").3, b"busybox");
        assert_eq!(get("usr/bin").3, b"../bin");
        assert_eq!(get("tmp").1, 0o041777);
        assert_eq!(get("dev/console").2, (5, 1));
        assert!(get("etc/passwd").3.starts_with(b"root:x:0:0:"));
    }

    #[test]
    fn load_order_path_is_inside_the_module_dir() {
        assert!(LOAD_ORDER.trim_start_matches('/').starts_with(MODULE_DIR));
    }

    #[test]
    fn busybox_list_must_name_applets() {
        // `true --list` prints nothing, like a broken busybox would.
        let err = busybox_applets(Path::new("/bin/true"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("printed no applets"), "{err}");
    }
}
