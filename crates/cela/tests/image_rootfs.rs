//! Root file systems from stored images, through the `cela-image` library the instance code
//! uses: layers flattened with whiteouts applied, per-layer directories stacked by a real
//! OverlayFS mount (the same view), and the cached ext4 disk checked with e2fsprogs. As root.

mod images;

use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::Command;

use cela_image::{Progress, RunConfig, Store};
use images::*;

/// Two layers: busybox with files, then whiteouts deleting one file and hiding a directory.
fn layered_image() -> TestImage {
    let base = busybox_layer();
    let files = layer(&[
        Entry::Dir("etc"),
        Entry::File("etc/motd", b"welcome\n"),
        Entry::File("etc/hostname", b"cela\n"),
        Entry::Dir("var"),
        Entry::Dir("var/cache"),
        Entry::File("var/cache/old-a", b"a"),
        Entry::File("var/cache/old-b", b"b"),
    ]);
    let top = layer(&[
        Entry::Dir("etc"),
        Entry::File("etc/.wh.motd", b""),
        Entry::Dir("var/cache"),
        Entry::File("var/cache/.wh..wh..opq", b""),
        Entry::File("var/cache/new", b"n"),
        Entry::File("hello", b"from the top layer\n"),
    ]);
    TestImage::new(vec![base, files, top], &["/bin/sh", "-c", "cat /hello"])
}

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn check_view(root: &Path) {
    assert_eq!(
        listing(&root.join("etc")),
        ["hostname"],
        "motd is whited out"
    );
    assert_eq!(
        listing(&root.join("var/cache")),
        ["new"],
        "the opaque dir hides the lower files"
    );
    assert_eq!(
        fs::read(root.join("hello")).unwrap(),
        b"from the top layer\n"
    );
    let out = chroot(root, "cat /hello; echo ok");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().next(),
        Some("from the top layer")
    );
}

fn setup() -> (tempfile::TempDir, Store, cela_image::ImageRecord) {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests need root (OverlayFS, chroot, owners)"
    );
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    layered_image().write_layout(&layout, "latest");
    let store = Store::open(&work.path().join("data")).unwrap();
    let recs = cela_image::import(&store, &layout, Some("layered"), &Progress::hidden()).unwrap();
    (work, store, recs[0].clone())
}

#[test]
fn flattened_layers_apply_whiteouts_and_the_config_is_exposed() {
    let (work, store, image) = setup();
    let root = work.path().join("flat");
    fs::create_dir(&root).unwrap();
    let stats = cela_image::flatten(&store, &image, &root).unwrap();
    assert_eq!(stats.whiteouts, 2);
    check_view(&root);
    let cfg = RunConfig::of(&store, &image).unwrap();
    assert_eq!(cfg.argv(&[]), ["/bin/sh", "-c", "cat /hello"]);
    assert_eq!(cfg.env, ["PATH=/bin"]);
}

#[test]
fn layer_directories_stack_with_overlayfs_into_the_same_view() {
    let (work, store, image) = setup();
    let lowers = cela_image::layer_dirs(&store, &image).unwrap();
    assert_eq!(lowers.len(), 3);
    // Cached: a second call unpacks nothing and returns the same directories.
    assert_eq!(cela_image::layer_dirs(&store, &image).unwrap(), lowers);
    let (upper, wd, merged) = (
        work.path().join("upper"),
        work.path().join("work"),
        work.path().join("merged"),
    );
    for d in [&upper, &wd, &merged] {
        fs::create_dir(d).unwrap();
    }
    let lowerdir: Vec<String> = lowers
        .iter()
        .rev()
        .map(|p| p.display().to_string())
        .collect();
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        lowerdir.join(":"),
        upper.display(),
        wd.display()
    );
    let st = Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o", &opts])
        .arg(&merged)
        .status()
        .unwrap();
    assert!(st.success(), "mount -t overlay -o {opts}");
    let result = std::panic::catch_unwind(|| check_view(&merged));
    let st = Command::new("umount").arg(&merged).status().unwrap();
    assert!(st.success());
    result.unwrap();

    // Removing the image collects its unpacked layers too.
    store
        .remove("layered", || Ok(std::collections::HashSet::new()), false)
        .unwrap();
    assert!(lowers.iter().all(|d| !d.exists()));
}

#[test]
fn the_ext4_disk_holds_the_flattened_tree_and_is_cached() {
    let (work, store, image) = setup();
    let disk = cela_image::rootfs_disk(&store, &image, &Progress::hidden()).unwrap();
    assert_fsck_clean(&disk);
    let debugfs = |req: &str| {
        let out = Command::new("debugfs")
            .args(["-R", req])
            .arg(&disk)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(debugfs("cat /hello"), "from the top layer\n");
    let cache = debugfs("ls /var/cache");
    assert!(cache.contains("new") && !cache.contains("old-a"), "{cache}");
    assert!(!debugfs("ls /etc").contains("motd"));
    assert!(debugfs("stat /bin/busybox").contains("Mode:  0755"));
    let mtime = fs::metadata(&disk).unwrap().modified().unwrap();
    let again = cela_image::rootfs_disk(&store, &image, &Progress::hidden()).unwrap();
    assert_eq!(again, disk);
    assert_eq!(
        fs::metadata(&again).unwrap().modified().unwrap(),
        mtime,
        "rebuilt instead of cached"
    );
    // An instance's copy is its own and stays sparse.
    let copy = work.path().join("instance.ext4");
    cela_image::instance_disk(&store, &image, &copy, &Progress::hidden()).unwrap();
    let (meta, copy_meta) = (fs::metadata(&disk).unwrap(), fs::metadata(&copy).unwrap());
    assert_eq!(copy_meta.len(), meta.len());
    assert!(
        copy_meta.blocks() * 512 < copy_meta.len() / 2,
        "the copy is not sparse"
    );
    fs::OpenOptions::new()
        .write(true)
        .open(&copy)
        .unwrap()
        .write_all_at(&[0xff; 4096], 0)
        .unwrap();
    assert_eq!(fs::metadata(&disk).unwrap().modified().unwrap(), mtime);
    assert_fsck_clean(&disk); // writing the copy left the cached disk alone

    store
        .remove("layered", || Ok(std::collections::HashSet::new()), false)
        .unwrap();
    assert!(!disk.exists(), "the disk outlived its image");
}
