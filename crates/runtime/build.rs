//! Makes the static `cela-runc` (and every binary that links `cela-runtime`) link its C
//! libraries statically.
//!
//! Every cela binary is linked with `+crt-static` (see `.cargo/config.toml`), but two crates
//! under libcontainer ask for C libraries as shared ones: `libseccomp-sys` asks for `-lseccomp`
//! unless `LIBSECCOMP_LINK_TYPE=static` is set in the environment, and `libbpf-sys` (the eBPF
//! device filter of cgroup v2, libcgroups' `cgroupsv2_devices`) builds its vendored libbpf as
//! an archive but asks for `-lelf` and `-lz`, which libbpf needs. The linker would find the
//! `.so` files and produce a static-pie that names shared libraries and crashes at start. This
//! script copies Debian's archives (`libseccomp.a` from libseccomp-dev, `libelf.a` from
//! libelf-dev, `libz.a` from zlib1g-dev) alone into a directory that comes first on the
//! library search path, so each `-l` resolves to the archive with no environment variable
//! needed.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A C library linked statically: its `-l` name, its pkg-config name, the environment
/// variable that may name the directory holding its archive, and the Debian package that
/// ships the archive.
struct Archive {
    lib: &'static str,
    pkg_config: &'static str,
    env: &'static str,
    package: &'static str,
}

const ARCHIVES: &[Archive] = &[
    Archive {
        lib: "seccomp",
        pkg_config: "libseccomp",
        env: "LIBSECCOMP_LIB_PATH",
        package: "libseccomp-dev",
    },
    Archive {
        lib: "elf",
        pkg_config: "libelf",
        env: "LIBELF_LIB_PATH",
        package: "libelf-dev",
    },
    Archive {
        lib: "z",
        pkg_config: "zlib",
        env: "ZLIB_LIB_PATH",
        package: "zlib1g-dev",
    },
];

const SYSTEM_DIRS: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/lib",
];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let dir = out.join("static-libs");
    std::fs::create_dir_all(&dir).expect("creating OUT_DIR/static-libs");
    for a in ARCHIVES {
        let archive = find(a);
        println!("cargo:rerun-if-changed={}", archive.display());
        copy_if_changed(&archive, &dir.join(format!("lib{}.a", a.lib)));
    }
    println!("cargo:rustc-link-search=native={}", dir.display());
}

/// The archive `lib<name>.a`: in the directory the environment names, pkg-config's libdir, or
/// a system library directory, in that order.
fn find(a: &Archive) -> PathBuf {
    println!("cargo:rerun-if-env-changed={}", a.env);
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Ok(p) = std::env::var(a.env) {
        dirs.push(p.into());
    }
    if let Ok(out) = Command::new("pkg-config")
        .args(["--variable=libdir", a.pkg_config])
        .output()
        && out.status.success()
    {
        dirs.push(String::from_utf8_lossy(&out.stdout).trim().into());
    }
    dirs.extend(SYSTEM_DIRS.iter().map(PathBuf::from));
    let name = format!("lib{}.a", a.lib);
    dirs.iter()
        .map(|d| d.join(&name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{name} not found (looked in {dirs:?}): install {} (scripts/deps does), or set \
                 {} to the directory holding it",
                a.package, a.env
            )
        })
}

fn copy_if_changed(src: &Path, dest: &Path) {
    let same = std::fs::read(src).ok() == std::fs::read(dest).ok();
    if !same {
        std::fs::copy(src, dest)
            .unwrap_or_else(|e| panic!("copying {} to {}: {e}", src.display(), dest.display()));
    }
}
