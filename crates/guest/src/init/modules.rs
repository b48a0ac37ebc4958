//! Loading the kernel modules the initramfs carries (virtio transports and devices, pvpanic…).
//!
//! The initramfs builder resolves dependencies from the kernel package's `modules.dep` and
//! writes [`cela_guest::MODULE_LOAD_ORDER`]: one module path per line, dependencies first. The
//! init needs no `modprobe`: it hands each file to the kernel with `finit_module(2)`.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::kmod::{ModuleInitFlags, finit_module};

use super::say;

/// The module paths listed in a load-order file, in order. Blank lines and `#` comments are
/// skipped; a relative path is relative to the directory holding the list.
pub fn parse_load_order(text: &str, base: &Path) -> Vec<PathBuf> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| base.join(line))
        .collect()
}

/// Loads one module file. A module that is already loaded (`EEXIST`) counts as loaded.
pub fn load_one(path: &Path) -> Result<(), io::Error> {
    let file = File::open(path)?;
    match finit_module(&file, c"", ModuleInitFlags::empty()) {
        Ok(()) | Err(Errno::EEXIST) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Loads every module listed in `order_file`, in order. A module that fails is reported on
/// one line and the others are still loaded. No list at all means a kernel that needs no
/// modules, which is fine.
pub fn load_all(order_file: &Path) {
    let text = match std::fs::read_to_string(order_file) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return,
        Err(e) => {
            say!("module list {}: {e}", order_file.display());
            return;
        }
    };
    let base = order_file.parent().unwrap_or(Path::new("/"));
    for module in parse_load_order(&text, base) {
        if let Err(e) = load_one(&module) {
            say!("module {}: {e}", module.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_order_keeps_order_and_skips_noise() {
        let text =
            "/lib/modules/cela/virtio.ko\n\n# comment\n  virtio_ring.ko  \nsub/virtio_mmio.ko\n";
        assert_eq!(
            parse_load_order(text, Path::new("/lib/modules/cela")),
            vec![
                PathBuf::from("/lib/modules/cela/virtio.ko"),
                PathBuf::from("/lib/modules/cela/virtio_ring.ko"),
                PathBuf::from("/lib/modules/cela/sub/virtio_mmio.ko"),
            ]
        );
    }

    #[test]
    fn a_missing_module_file_is_an_error_naming_the_cause() {
        let err = load_one(Path::new("/nonexistent/cela/x.ko")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }
}
