//! `cela image build debian`: a real Debian image made with debootstrap from Debian's mirror,
//! then flattened and run with chroot, and turned into an ext4 disk that e2fsck accepts. As root;
//! takes about 80 s here (mostly debootstrap).

mod images;

use std::process::Command;
use std::time::Instant;

use cela_image::{Progress, RunConfig, Store};
use images::*;

#[test]
fn a_debian_image_built_with_debootstrap_runs_and_becomes_an_ext4_disk() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (debootstrap)"
    );
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let started = Instant::now();
    let out = cela_ok(&data, &["image", "build", "debian", "--suite", "bookworm"]);
    eprintln!("cela image build debian: {:?}: {out}", started.elapsed());
    let ls = ls_json(&data);
    assert_eq!(ls[0]["names"][0], "docker.io/library/debian:bookworm");
    assert_eq!(
        ls[0]["layers"][0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+zstd"
    );

    let store = Store::open(&data).unwrap();
    let image = store.resolve("debian:bookworm").unwrap();
    assert_eq!(RunConfig::of(&store, &image).unwrap().cmd, ["/bin/bash"]);
    let root = work.path().join("root");
    std::fs::create_dir(&root).unwrap();
    cela_image::flatten(&store, &image, &root).unwrap();
    let out = chroot(
        &root,
        "cat /etc/debian_version; dpkg-query -W -f='${Package}\\n' apt",
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.starts_with("12."), "bookworm is Debian 12: {stdout}");
    assert!(stdout.contains("apt"), "{stdout}");

    let started = Instant::now();
    let disk = cela_image::rootfs_disk(&store, &image, &Progress::hidden()).unwrap();
    eprintln!(
        "ext4 disk of {} bytes in {:?}",
        std::fs::metadata(&disk).unwrap().len(),
        started.elapsed()
    );
    assert_fsck_clean(&disk);
    let version = Command::new("debugfs")
        .args(["-R", "cat /etc/debian_version"])
        .arg(&disk)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("12."));
}

#[test]
fn a_bad_suite_is_refused_before_anything_runs() {
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    cela_err(
        &data,
        &["image", "build", "debian", "--suite", "Book worm"],
        "not a Debian suite name",
    );
    assert!(stored_blobs(&data).is_empty());
}
