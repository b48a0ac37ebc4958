//! Building Debian images with `debootstrap --variant=minbase` (essential packages and apt,
//! about 80 MB unpacked for bookworm): the tree is packed with GNU tar (numeric owners, hard
//! links, xattrs; `/dev`, `/proc` and `/sys` left empty, apt's caches dropped), compressed with
//! zstd on its way into the store, and recorded as a one-layer image `debian:<suite>`.
//! Needs root and a reachable Debian mirror.

use std::io;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::digest::Hasher;
use crate::error::IoContext;
use crate::progress::Progress;
use crate::unpack::Compression;
use crate::{ImageError, ImageRecord, Reference, Store, manifest};

/// The mirror used when none is given.
pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";

fn build_error(why: impl Into<String>) -> ImageError {
    ImageError::Build(why.into())
}

/// Builds `debian:<suite>` (or `name`) from `mirror` and stores it.
pub fn build_debian(
    store: &Store,
    suite: &str,
    mirror: &str,
    name: Option<&str>,
    progress: &Progress,
) -> Result<ImageRecord, ImageError> {
    if suite.is_empty()
        || !suite
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(build_error(format!(
            "{suite:?} is not a Debian suite name (like bookworm)"
        )));
    }
    let name = name
        .map(str::to_owned)
        .unwrap_or_else(|| format!("debian:{suite}"));
    let name = name
        .parse::<Reference>()?
        .name()
        .ok_or_else(|| ImageError::BadReference {
            input: name.clone(),
            why: "an image is named NAME[:TAG], without a digest".into(),
        })?;
    if !nix::unistd::geteuid().is_root() {
        return Err(build_error(
            "debootstrap needs root: run cela image build as root",
        ));
    }
    let _lock = store.content_lock()?;
    let tmp = tempfile::Builder::new()
        .prefix("debootstrap-")
        .tempdir_in(store.tmp_dir())
        .at("creating a temporary directory in", store.tmp_dir())?;
    let rootfs = tmp.path().join("rootfs");
    let log = tmp.path().join("debootstrap.log");

    let step = progress.step(format!(
        "debootstrap --variant=minbase {suite} from {mirror}"
    ));
    let log_file = std::fs::File::create(&log).at("creating", &log)?;
    let status = Command::new("debootstrap")
        .args(["--variant=minbase", suite])
        .arg(&rootfs)
        .arg(mirror)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().at("opening", &log)?)
        .stderr(log_file)
        .status()
        .map_err(|e| ImageError::Tool {
            command: "debootstrap".into(),
            status: "not started".into(),
            stderr: format!("{e} (install debootstrap)"),
        })?;
    if !status.success() {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(5).collect();
        return Err(ImageError::Tool {
            command: format!(
                "debootstrap --variant=minbase {suite} {} {mirror}",
                rootfs.display()
            ),
            status: status.to_string(),
            stderr: tail.into_iter().rev().collect::<Vec<_>>().join(" | "),
        });
    }
    drop_apt_caches(&rootfs)?;
    step.done();

    let step = progress.step(format!("packing debian:{suite} into the store"));
    let what = format!("debian {suite} root file system");
    let mut child = Command::new("tar")
        .args([
            "--numeric-owner",
            "--xattrs",
            "--xattrs-include=*",
            "--sort=name",
            "--exclude=./dev/*",
            "--exclude=./proc/*",
            "--exclude=./sys/*",
            "-C",
        ])
        .arg(&rootfs)
        .args(["-cf", "-", "."])
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| ImageError::Tool {
            command: "tar".into(),
            status: "not started".into(),
            stderr: e.to_string(),
        })?;
    let mut blob = store.blob_writer()?;
    let encoder = zstd::Encoder::new(&mut blob, 3).at("starting zstd for", &rootfs)?;
    let mut hasher = Hasher::new(encoder);
    let mut out = child.stdout.take().expect("piped");
    io::copy(&mut out, &mut hasher).at("packing", &rootfs)?;
    let ((diff_id, _), encoder) = hasher.finish_into();
    encoder.finish().at("compressing", &rootfs)?;
    let status = child.wait().at("waiting for tar of", &rootfs)?;
    if !status.success() {
        return Err(ImageError::Tool {
            command: format!("tar -C {} -c .", rootfs.display()),
            status: status.to_string(),
            stderr: String::new(),
        });
    }
    let (layer, size) = blob.commit(&what, None, None)?;
    let rec = manifest::single_layer_image(
        store,
        &what,
        (layer, size, Compression::Zstd.oci_media_type()),
        &diff_id,
        &["/bin/bash"],
        &format!("debootstrap --variant=minbase {suite} {mirror}"),
        vec![name],
        format!("build debian {suite} {mirror}"),
    )?;
    step.done();
    Ok(rec)
}

/// Removes downloaded packages and package lists (apt fetches them again when needed).
fn drop_apt_caches(rootfs: &Path) -> Result<(), ImageError> {
    for dir in ["var/cache/apt/archives", "var/lib/apt/lists"] {
        let d = rootfs.join(dir);
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries {
            let p = e.at("listing", &d)?.path();
            if p.is_file() {
                std::fs::remove_file(&p).at("removing", &p)?;
            }
        }
    }
    Ok(())
}
