//! Debian's stock cloud kernel and static busybox, fetched with the host's apt.
//!
//! The kernel is the package the metapackage `linux-image-cloud-amd64` depends on (e.g.
//! `linux-image-6.1.0-56-cloud-amd64`), preferably its `-unsigned` twin, which holds the same
//! kernel without the Secure Boot signature wrapper. `apt-get download` fetches the `.deb` (no
//! installation, no root needed beyond writing the cache) and `dpkg-deb -x` unpacks it. The
//! package holds `boot/vmlinuz-<ver>` (a bzImage) and `lib/modules/<ver>/` (or
//! `usr/lib/modules/<ver>/` on merged-/usr releases), but no `modules.dep`: see
//! [`crate::modules`].
//!
//! Cache layout (each entry appears by an atomic rename, under a lock; see the crate docs):
//!
//! ```text
//! <cache>/kernel/<ver>/               the unpacked kernel package
//! <cache>/busybox/<pkg-version>/busybox
//! ```
//!
//! Once an asset is cached it is used without asking apt at all: later runs are offline and
//! skip apt's start-up (about half a second each call on a host whose apt keeps no binary
//! package cache). Moving to a newer kernel is explicit: [`fetch_current_kernel`], or removing
//! the cache entry.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::cache::{self, AreaLock};
use crate::cmd::{self, APT_HINT};
use crate::error::IoContext;
use crate::modules::ModuleIndex;
use crate::{AssetError, Progress};

/// The metapackage whose dependency names the current cloud kernel.
pub const KERNEL_METAPACKAGE: &str = "linux-image-cloud-amd64";
/// The package holding a statically linked busybox at `bin/busybox`.
pub const BUSYBOX_PACKAGE: &str = "busybox-static";

const APT_NETWORK_HINT: &str = "is apt configured and its mirror reachable? run apt-get update";

/// An unpacked Debian kernel package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DebianKernel {
    /// The kernel release, as `uname -r` prints it in the guest (`6.1.0-56-cloud-amd64`).
    pub version: String,
    /// The bzImage, `tree/boot/vmlinuz-<version>`.
    pub bzimage: PathBuf,
    /// The root of the unpacked package.
    pub tree: PathBuf,
}

impl DebianKernel {
    /// Opens an unpacked kernel package (or any tree laid out like one): finds the single kernel
    /// release under `lib/modules/` and checks that its bzImage is one.
    pub fn open(tree: &Path) -> Result<Self, AssetError> {
        let bad = |reason: String| AssetError::BadPackage {
            package: tree.display().to_string(),
            reason,
        };
        let modules_root = modules_root(tree)
            .ok_or_else(|| bad("has neither lib/modules/ nor usr/lib/modules/".into()))?;
        let mut versions: Vec<String> = std::fs::read_dir(&modules_root)
            .at("listing", &modules_root)?
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        versions.sort();
        let [version] = versions.as_slice() else {
            return Err(bad(format!(
                "expected one kernel release in {}, found {versions:?}",
                modules_root.display()
            )));
        };
        let bzimage = tree.join("boot").join(format!("vmlinuz-{version}"));
        check_bzimage(&bzimage)?;
        Ok(DebianKernel {
            version: version.clone(),
            bzimage,
            tree: tree.to_owned(),
        })
    }

    /// `lib/modules/<version>` of the tree (`usr/lib/modules/<version>` on merged-/usr packages).
    pub fn modules_dir(&self) -> PathBuf {
        modules_root(&self.tree)
            .unwrap_or_else(|| self.tree.join("lib/modules"))
            .join(&self.version)
    }

    /// Indexes this kernel's modules.
    pub fn modules(&self) -> Result<ModuleIndex, AssetError> {
        ModuleIndex::scan(&self.modules_dir())
    }

    /// Every module file needed to load `names` (either spelling, `kvm-amd` or `kvm_amd`),
    /// dependencies first, each once. Modules built into the kernel need no file and are left
    /// out; a name that is neither gives [`AssetError::ModuleNotFound`].
    pub fn module_closure(&self, names: &[&str]) -> Result<Vec<PathBuf>, AssetError> {
        self.modules()?.closure(names)
    }
}

fn modules_root(tree: &Path) -> Option<PathBuf> {
    ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|p| tree.join(p))
        .find(|p| p.is_dir())
}

/// Checks the Linux boot protocol's header magic `HdrS` at offset 0x202 of a bzImage.
fn check_bzimage(path: &Path) -> Result<(), AssetError> {
    use std::io::Read;
    let mut head = [0u8; 0x206];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .at("reading kernel image", path)?;
    if &head[0x202..0x206] != b"HdrS" {
        return Err(AssetError::NotBzImage {
            path: path.to_owned(),
            reason: "no HdrS magic at 0x202".into(),
        });
    }
    Ok(())
}

/// Returns the cloud kernel unpacked in `cache/kernel/<ver>/`: the highest release already
/// there, without asking apt (so it works offline and costs no apt start-up), or else the
/// current one, downloaded by [`fetch_current_kernel`].
pub fn fetch_kernel(cache: &Path, progress: &Progress) -> Result<DebianKernel, AssetError> {
    let area = cache.join("kernel");
    if let Some(cached) = cache::finished_entries(&area)
        .iter()
        .find_map(|dir| DebianKernel::open(dir).ok())
    {
        return Ok(cached);
    }
    fetch_current_kernel(cache, progress)
}

/// Returns the kernel that apt's lists name as current, downloading it unless it is cached
/// already. Asking apt takes about half a second; [`fetch_kernel`] avoids it when it can. A
/// cache update command can call this to move to a newer kernel after `apt-get update`.
pub fn fetch_current_kernel(cache: &Path, progress: &Progress) -> Result<DebianKernel, AssetError> {
    let area = cache.join("kernel");
    let version = current_kernel_version()?;
    let dir = area.join(cache::component(&version));
    if !dir.is_dir() {
        fill_once(&area, &dir, progress, |out| {
            download_kernel(&version, out, progress)
        })?;
    }
    DebianKernel::open(&dir)
}

/// Returns a static busybox binary: the highest version cached in
/// `cache/busybox/<package version>/busybox`, or else the `busybox-static` package's current
/// one, downloaded.
pub fn fetch_busybox(cache: &Path, progress: &Progress) -> Result<PathBuf, AssetError> {
    let area = cache.join("busybox");
    if let Some(cached) = cache::finished_entries(&area)
        .into_iter()
        .map(|d| d.join("busybox"))
        .find(|b| b.is_file())
    {
        return Ok(cached);
    }
    let info = package_info(BUSYBOX_PACKAGE)?.ok_or_else(|| AssetError::NoPackage {
        package: BUSYBOX_PACKAGE.into(),
        detail: "apt-cache show found nothing".into(),
    })?;
    let dir = area.join(cache::component(&info.version));
    let busybox = dir.join("busybox");
    if !busybox.is_file() {
        fill_once(&area, &dir, progress, |out| {
            let work = out.parent().expect("work dirs have a parent");
            let deb = apt_download(BUSYBOX_PACKAGE, info.size, work, progress)?;
            let root = work.join("root");
            unpack(&deb, &root)?;
            let src = root.join("bin/busybox");
            std::fs::create_dir(out).at("creating", out)?;
            std::fs::rename(&src, out.join("busybox")).at("moving busybox out of", &src)
        })?;
    }
    Ok(busybox)
}

/// Makes `dest` (an entry of `area`) exist, unless another process already made it: under the
/// area's lock, `fill` builds it at a path in a fresh work directory, which is then renamed.
fn fill_once(
    area: &Path,
    dest: &Path,
    progress: &Progress,
    fill: impl FnOnce(&Path) -> Result<(), AssetError>,
) -> Result<(), AssetError> {
    let _lock = AreaLock::acquire(area, progress)?;
    if dest.exists() {
        return Ok(());
    }
    cache::remove_leftovers(area)?;
    let work = cache::work_dir(area)?;
    let out = work.path().join("out");
    fill(&out)?;
    std::fs::rename(&out, dest).at("moving into place", dest)
    // `work` (the download and anything else left) is removed on drop.
}

/// The release the kernel metapackage currently depends on, from apt's local lists.
fn current_kernel_version() -> Result<String, AssetError> {
    cmd::require("apt-cache", APT_HINT)?;
    let out = cmd::stdout(
        Command::new("apt-cache").args(["depends", KERNEL_METAPACKAGE]),
        "is apt configured for Debian? run apt-get update",
    )?;
    parse_kernel_depends(&String::from_utf8_lossy(&out)).ok_or_else(|| AssetError::NoPackage {
        package: KERNEL_METAPACKAGE.into(),
        detail: "apt-cache depends lists no linux-image-* dependency".into(),
    })
}

/// `  Depends: linux-image-6.1.0-56-cloud-amd64` → `6.1.0-56-cloud-amd64`.
fn parse_kernel_depends(text: &str) -> Option<String> {
    text.lines()
        .map(|l| l.trim().trim_start_matches('|'))
        .filter_map(|l| l.strip_prefix("Depends:"))
        .filter_map(|dep| dep.trim().strip_prefix("linux-image-"))
        .map(str::to_owned)
        .find(|v| !v.is_empty())
}

/// What `apt-cache show` says about a package's candidate version.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PackageInfo {
    version: String,
    size: Option<u64>,
}

/// The candidate version of `package`, or `None` when apt does not know it.
fn package_info(package: &str) -> Result<Option<PackageInfo>, AssetError> {
    cmd::require("apt-cache", APT_HINT)?;
    let out = Command::new("apt-cache")
        .args(["show", "--no-all-versions", package])
        .stdin(Stdio::null())
        .output()
        .map_err(|source| AssetError::Spawn {
            command: format!("apt-cache show --no-all-versions {package}"),
            source,
        })?;
    if !out.status.success() {
        return Ok(None);
    }
    Ok(parse_show(&String::from_utf8_lossy(&out.stdout)))
}

fn parse_show(text: &str) -> Option<PackageInfo> {
    let field = |name: &str| {
        text.lines()
            .take_while(|l| !l.is_empty())
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':').map(str::trim))
    };
    Some(PackageInfo {
        version: field("Version")?.to_owned(),
        size: field("Size").and_then(|s| s.parse().ok()),
    })
}

/// Downloads and unpacks the kernel package of release `version` into `out`.
fn download_kernel(version: &str, out: &Path, progress: &Progress) -> Result<(), AssetError> {
    let signed = format!("linux-image-{version}");
    let unsigned = format!("{signed}-unsigned");
    let (package, info) = match package_info(&unsigned)? {
        Some(info) => (unsigned, info),
        None => match package_info(&signed)? {
            Some(info) => (signed, info),
            None => {
                return Err(AssetError::NoPackage {
                    package: unsigned,
                    detail: format!("nor {signed}"),
                });
            }
        },
    };
    let work = out.parent().expect("work dirs have a parent");
    let deb = apt_download(&package, info.size, work, progress)?;
    let step = progress.step(format!("unpacking {package}"));
    unpack(&deb, out)?;
    std::fs::remove_file(&deb).at("removing", &deb)?;
    let kernel = DebianKernel::open(out)?;
    if kernel.version != version {
        return Err(AssetError::BadPackage {
            package,
            reason: format!("holds kernel {}, expected {version}", kernel.version),
        });
    }
    // Work directories are private (0700); the finished tree is readable like any package.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(out, std::fs::Permissions::from_mode(0o755))
        .at("setting mode of", out)?;
    step.done();
    Ok(())
}

/// `apt-get download <package>` into `dir`, with a byte bar fed by the growing file. Returns the
/// downloaded `.deb`.
fn apt_download(
    package: &str,
    size: Option<u64>,
    dir: &Path,
    progress: &Progress,
) -> Result<PathBuf, AssetError> {
    cmd::require("apt-get", APT_HINT)?;
    let mut command = Command::new("apt-get");
    command
        .args(["download", package])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let step = progress.step(format!("downloading {package}"));
    if let Some(size) = size {
        step.set_total_bytes(size);
    }
    let child = command.spawn().map_err(|source| AssetError::Spawn {
        command: cmd::display(&command),
        source,
    })?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output()));
    let output = loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(output) => break output,
            Err(mpsc::RecvTimeoutError::Timeout) => step.set_bytes(bytes_below(dir)),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                break Err(std::io::Error::other(
                    "the thread waiting for apt-get ended",
                ));
            }
        }
    };
    let output = output.map_err(|source| AssetError::Spawn {
        command: cmd::display(&command),
        source,
    })?;
    cmd::check(&command, output, APT_NETWORK_HINT)?;
    let deb = std::fs::read_dir(dir)
        .at("listing", dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .ok_or_else(|| AssetError::BadPackage {
            package: package.into(),
            reason: format!(
                "apt-get download succeeded but left no .deb in {}",
                dir.display()
            ),
        })?;
    step.done();
    Ok(deb)
}

/// Total size of the files below `dir` (a download in progress).
fn bytes_below(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => bytes_below(&e.path()),
            _ => e.metadata().map(|m| m.len()).unwrap_or(0),
        })
        .sum()
}

/// `dpkg-deb -x <deb> <dir>`.
fn unpack(deb: &Path, dir: &Path) -> Result<(), AssetError> {
    cmd::require("dpkg-deb", APT_HINT)?;
    cmd::stdout(
        Command::new("dpkg-deb").arg("-x").arg(deb).arg(dir),
        "the download may be corrupt or the disk full",
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_release_comes_from_the_metapackage() {
        let out = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64\n";
        assert_eq!(
            parse_kernel_depends(out).as_deref(),
            Some("6.1.0-56-cloud-amd64")
        );
        let alt = "x\n |Depends: <virtual>\n  Depends: linux-image-6.12.9+deb13-cloud-amd64\n";
        assert_eq!(
            parse_kernel_depends(alt).as_deref(),
            Some("6.12.9+deb13-cloud-amd64")
        );
        assert_eq!(parse_kernel_depends("linux-image-cloud-amd64\n"), None);
    }

    #[test]
    fn apt_cache_show_gives_version_and_size() {
        let out =
            "Package: busybox-static\nVersion: 1:1.35.0-4+deb12u1+b1\nSize: 928188\n\nPackage: x\n";
        assert_eq!(
            parse_show(out),
            Some(PackageInfo {
                version: "1:1.35.0-4+deb12u1+b1".into(),
                size: Some(928188)
            })
        );
        assert_eq!(parse_show("Package: x\n"), None);
    }

    #[test]
    fn open_checks_the_tree_and_the_bzimage() {
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path();
        let err = DebianKernel::open(t).unwrap_err().to_string();
        assert!(err.contains("neither lib/modules/"), "{err}");
        std::fs::create_dir_all(t.join("usr/lib/modules/6.12.1-cloud-amd64/kernel")).unwrap();
        std::fs::create_dir_all(t.join("boot")).unwrap();
        let image = t.join("boot/vmlinuz-6.12.1-cloud-amd64");
        std::fs::write(&image, vec![0u8; 0x400]).unwrap();
        let err = DebianKernel::open(t).unwrap_err().to_string();
        assert!(err.contains("no HdrS magic at 0x202"), "{err}");
        let mut bytes = vec![0u8; 0x400];
        bytes[0x202..0x206].copy_from_slice(b"HdrS");
        std::fs::write(&image, bytes).unwrap();
        let k = DebianKernel::open(t).unwrap();
        assert_eq!(k.version, "6.12.1-cloud-amd64");
        assert_eq!(k.bzimage, image);
        assert_eq!(
            k.modules_dir(),
            t.join("usr/lib/modules/6.12.1-cloud-amd64")
        );
    }
}
