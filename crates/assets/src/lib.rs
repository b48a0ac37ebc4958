//! Guest assets for cela microVMs: Debian's stock cloud kernel, its modules, a static busybox,
//! and the initramfs cela builds around its own init.
//!
//! On first use [`guest_assets`] fetches the kernel and busybox with the host's apt and builds
//! the initramfs, all into a cache directory; later calls find them there and work offline.
//!
//! * [`debian`]: fetching and unpacking the Debian packages ([`fetch_kernel`], [`fetch_busybox`]).
//! * [`modules`]: the kernel's modules and their load order, computed from each module's
//!   `.modinfo` (Debian's package ships no `modules.dep`).
//! * [`initramfs`]: the archive's layout ([`build_guest_initramfs`]).
//! * [`cpio`]: the newc archive writer.
//! * [`Progress`]: what the user sees meanwhile.
//!
//! Cache layout:
//!
//! ```text
//! <cache>/kernel/<ver>/                    unpacked kernel package (boot/vmlinuz-<ver>, lib/modules/<ver>/)
//! <cache>/busybox/<pkg-version>/busybox
//! <cache>/initramfs/<ver>-<hash16>.cpio    keyed by the init binary, busybox and kernel
//! ```
//!
//! Concurrent cela processes share the cache safely: see the `cache` module (a lock per area,
//! work in temporary entries renamed into place).

mod cache;
mod cmd;
pub mod cpio;
pub mod debian;
mod error;
pub mod initramfs;
pub mod modules;
mod progress;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

pub use debian::{DebianKernel, fetch_busybox, fetch_current_kernel, fetch_kernel};
pub use error::AssetError;
pub use initramfs::{GUEST_MODULES, build_guest_initramfs};
pub use progress::{Progress, Step, StepEvent};

use crate::cache::AreaLock;
use crate::error::IoContext;

/// The files a default microVM boots with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestAssets {
    /// The bzImage.
    pub kernel: PathBuf,
    /// The uncompressed newc initramfs.
    pub initrd: PathBuf,
    /// The kernel release (`6.1.0-56-cloud-amd64`).
    pub kernel_version: String,
}

/// Bump when the initramfs layout changes, so that cached archives are rebuilt.
const INITRAMFS_FORMAT: u32 = 1;

/// An initramfs unused for this long, and not the current one, is removed when another is
/// built. The delay keeps the archive of a concurrently running older cela (say, a debug and a
/// release build side by side) from being removed between its lookup and its boot.
const STALE_AFTER: Duration = Duration::from_secs(10 * 60);

/// The `cela-init` binary that goes into guest initramfs images: $CELA_INIT, else the file
/// next to the running executable (cargo builds both into the same directory).
pub fn guest_init() -> Result<PathBuf, AssetError> {
    if let Some(p) = std::env::var_os("CELA_INIT") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().at("locating the running executable", "/proc/self/exe")?;
    let candidate = exe.with_file_name("cela-init");
    if !candidate.is_file() {
        return Err(AssetError::MissingInit { path: candidate });
    }
    Ok(candidate)
}

/// [`guest_assets`] with cela's own init ([`guest_init`]).
pub fn default_guest_assets(cache: &Path, progress: &Progress) -> Result<GuestAssets, AssetError> {
    guest_assets(cache, &guest_init()?, progress)
}

/// Everything a default microVM needs, fetched/built on first use into `cache` (e.g.
/// `/var/lib/cela/assets`), reused afterwards.
///
/// The initramfs is rebuilt when the init binary changes: it is cached as
/// `cache/initramfs/<ver>-<hash16>.cpio`, keyed by a hash of the init binary's bytes, the kernel
/// release, the busybox package and the archive layout.
pub fn guest_assets(
    cache: &Path,
    init: &Path,
    progress: &Progress,
) -> Result<GuestAssets, AssetError> {
    let kernel = fetch_kernel(cache, progress)?;
    let busybox = fetch_busybox(cache, progress)?;
    let init_bytes = std::fs::read(init).at("reading init binary", init)?;
    // The busybox path below the cache, which names its package version: the same cache
    // reached through another path (a data dir whose `assets` links to a shared one) keys the
    // same archive.
    let key = initramfs_key(
        &kernel.version,
        busybox.strip_prefix(cache).unwrap_or(&busybox),
        &init_bytes,
    );
    let area = cache.join("initramfs");
    let initrd = area.join(format!(
        "{}-{key:016x}.cpio",
        cache::component(&kernel.version)
    ));

    // The fast path marks the archive as in use; a failure means it is missing (or was just
    // pruned by another process), so build it.
    if mark_used(&initrd).is_err() {
        let _lock = AreaLock::acquire(&area, progress)?;
        if mark_used(&initrd).is_err() {
            cache::remove_leftovers(&area)?;
            let step = progress.step(format!(
                "building the guest initramfs for {}",
                kernel.version
            ));
            initramfs::build_with_init(&kernel, &busybox, &init_bytes, &initrd)?;
            step.done();
            prune_stale(&area, &initrd, STALE_AFTER);
        }
    }
    Ok(GuestAssets {
        kernel: kernel.bzimage,
        initrd,
        kernel_version: kernel.version,
    })
}

/// Sets the file's modification time to now: "last used".
fn mark_used(path: &Path) -> std::io::Result<()> {
    std::fs::File::options()
        .write(true)
        .open(path)?
        .set_modified(SystemTime::now())
}

/// Removes the archives in `area` other than `keep` that were not used for `older_than`.
/// Failures only cost disk space, so they are logged, not returned.
fn prune_stale(area: &Path, keep: &Path, older_than: Duration) {
    let Ok(entries) = std::fs::read_dir(area) else {
        return;
    };
    let now = SystemTime::now();
    for entry in entries.flatten() {
        let path = entry.path();
        let stale = path != keep
            && path.extension().is_some_and(|e| e == "cpio")
            && entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| now.duration_since(t).unwrap_or_default() >= older_than);
        if !stale {
            continue;
        }
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!("could not remove stale initramfs {}: {e}", path.display());
        }
    }
}

/// The cache key of an initramfs: FNV-1a (64-bit) over its inputs, each length-prefixed. Not a
/// cryptographic hash: it tells apart builds of the same files, not adversaries (anyone who
/// can write the cache can write the archive itself).
fn initramfs_key(kernel_version: &str, busybox: &Path, init: &[u8]) -> u64 {
    let mut h = Fnv1a::default();
    h.field(&INITRAMFS_FORMAT.to_le_bytes());
    h.field(GUEST_MODULES.join(",").as_bytes());
    h.field(kernel_version.as_bytes());
    // The busybox path names its package version.
    h.field(busybox.as_os_str().as_encoded_bytes());
    h.field(init);
    h.0
}

struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv1a {
    fn field(&mut self, bytes: &[u8]) {
        for &b in (bytes.len() as u64).to_le_bytes().iter().chain(bytes) {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_the_reference_vectors() {
        // Published FNV-1a 64 test vectors ("" and "a"), hashed without our length prefix.
        let raw = |s: &[u8]| {
            let mut h = Fnv1a::default();
            for &b in s {
                h.0 = (h.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
            }
            h.0
        };
        assert_eq!(raw(b""), 0xcbf29ce484222325);
        assert_eq!(raw(b"a"), 0xaf63dc4c8601ec8c);
    }

    #[test]
    fn the_key_changes_with_every_input() {
        let base = initramfs_key(
            "6.1.0-56-cloud-amd64",
            Path::new("/c/busybox/1/busybox"),
            b"init",
        );
        assert_eq!(
            base,
            initramfs_key(
                "6.1.0-56-cloud-amd64",
                Path::new("/c/busybox/1/busybox"),
                b"init"
            )
        );
        assert_ne!(
            base,
            initramfs_key(
                "6.1.0-57-cloud-amd64",
                Path::new("/c/busybox/1/busybox"),
                b"init"
            )
        );
        assert_ne!(
            base,
            initramfs_key(
                "6.1.0-56-cloud-amd64",
                Path::new("/c/busybox/2/busybox"),
                b"init"
            )
        );
        assert_ne!(
            base,
            initramfs_key(
                "6.1.0-56-cloud-amd64",
                Path::new("/c/busybox/1/busybox"),
                b"init2"
            )
        );
    }

    #[test]
    fn only_stale_archives_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path();
        for f in ["old.cpio", "keep.cpio", ".lock"] {
            std::fs::write(a.join(f), b"").unwrap();
        }
        prune_stale(a, &a.join("keep.cpio"), Duration::from_secs(3600));
        assert!(a.join("old.cpio").exists(), "recently used archives stay");
        prune_stale(a, &a.join("keep.cpio"), Duration::ZERO);
        assert!(!a.join("old.cpio").exists());
        assert!(a.join("keep.cpio").exists() && a.join(".lock").exists());
    }

    #[test]
    fn load_order_path_matches_the_guest_contract() {
        assert_eq!(initramfs::LOAD_ORDER, cela_guest::MODULE_LOAD_ORDER);
    }
}
