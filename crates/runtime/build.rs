//! Makes the static `cela-runc` link libseccomp statically.
//!
//! Every cela binary is linked with `+crt-static` (see `.cargo/config.toml`), but the
//! `libseccomp-sys` crate asks for `-lseccomp` as a dynamic library unless
//! `LIBSECCOMP_LINK_TYPE=static` is set in the environment; the linker then finds
//! `libseccomp.so` and produces a static-pie that names a shared library and crashes at start.
//! This script puts Debian's `libseccomp.a` (package libseccomp-dev) alone in a directory that
//! comes first on the library search path, so `-lseccomp` resolves to the archive with no
//! environment variable needed.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=LIBSECCOMP_LIB_PATH");
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Ok(p) = std::env::var("LIBSECCOMP_LIB_PATH") {
        dirs.push(p.into());
    }
    if let Ok(out) = Command::new("pkg-config")
        .args(["--variable=libdir", "libseccomp"])
        .output()
        && out.status.success()
    {
        dirs.push(String::from_utf8_lossy(&out.stdout).trim().into());
    }
    for d in [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib64",
        "/usr/lib",
        "/usr/local/lib",
    ] {
        dirs.push(d.into());
    }
    let Some(archive) = dirs
        .iter()
        .map(|d| d.join("libseccomp.a"))
        .find(|p| p.is_file())
    else {
        panic!(
            "libseccomp.a not found (looked in {dirs:?}): install libseccomp-dev (scripts/deps \
             does), or set LIBSECCOMP_LIB_PATH to the directory holding it"
        );
    };
    println!("cargo:rerun-if-changed={}", archive.display());
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let dir = out.join("static-seccomp");
    std::fs::create_dir_all(&dir).expect("creating OUT_DIR/static-seccomp");
    let dest = dir.join("libseccomp.a");
    copy_if_changed(&archive, &dest);
    println!("cargo:rustc-link-search=native={}", dir.display());
}

fn copy_if_changed(src: &Path, dest: &Path) {
    let same = std::fs::read(src).ok() == std::fs::read(dest).ok();
    if !same {
        std::fs::copy(src, dest)
            .unwrap_or_else(|e| panic!("copying {} to {}: {e}", src.display(), dest.display()));
    }
}
