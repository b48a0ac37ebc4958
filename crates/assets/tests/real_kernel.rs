//! Against the real Debian cloud kernel and busybox, fetched with apt into a shared test cache
//! (`$CELA_TEST_CACHE`, default `/var/tmp/cela-test-cache`), so only the first run on a machine
//! downloads anything. Skipped, with a message, on hosts without apt.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use cela_assets::modules::module_name;
use cela_assets::{
    AssetError, DebianKernel, GUEST_MODULES, Progress, build_guest_initramfs, fetch_busybox,
    fetch_kernel, guest_assets,
};

fn test_cache() -> PathBuf {
    std::env::var_os("CELA_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/cela-test-cache"))
}

/// The kernel, or `None` (after saying why) on a host without apt.
fn kernel() -> Option<DebianKernel> {
    match fetch_kernel(&test_cache(), &Progress::new()) {
        Ok(k) => Some(k),
        Err(e @ AssetError::MissingTool { .. }) => {
            eprintln!("skipping: {e}");
            None
        }
        Err(e) => panic!("{e}"),
    }
}

fn names(paths: &[PathBuf]) -> Vec<String> {
    paths.iter().map(|p| module_name(p).unwrap()).collect()
}

/// `cpio -it` of an archive: the entry names.
fn cpio_list(archive: &Path) -> Vec<String> {
    let out = Command::new("cpio")
        .args(["-it", "--quiet"])
        .stdin(std::fs::File::open(archive).unwrap())
        .stderr(Stdio::piped())
        .output()
        .expect("cpio is installed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// `cpio -i --to-stdout <entry>`.
fn cpio_extract(archive: &Path, entry: &str) -> Vec<u8> {
    let out = Command::new("cpio")
        .args(["-i", "--quiet", "--to-stdout", entry])
        .stdin(std::fs::File::open(archive).unwrap())
        .output()
        .expect("cpio is installed");
    assert!(out.status.success());
    out.stdout
}

#[test]
fn kvm_and_tun_modules_resolve_in_dependency_order() {
    let Some(kernel) = kernel() else { return };
    assert!(kernel.bzimage.is_file());
    assert!(
        kernel
            .modules_dir()
            .ends_with(format!("lib/modules/{}", kernel.version))
    );

    let closure = kernel.module_closure(&["kvm_amd", "tun"]).unwrap();
    assert_eq!(names(&closure), ["irqbypass", "kvm", "kvm_amd", "tun"]);
    assert!(
        closure[2]
            .to_string_lossy()
            .contains("arch/x86/kvm/kvm-amd.ko")
    );
    // Either spelling works.
    assert_eq!(kernel.module_closure(&["kvm-amd"]).unwrap(), closure[..3]);

    let err = kernel
        .module_closure(&["no_such_module"])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("kernel module no_such_module is neither in"),
        "{err}"
    );
}

#[test]
fn guest_modules_all_exist_with_their_dependencies() {
    let Some(kernel) = kernel() else { return };
    let closure = names(&kernel.module_closure(GUEST_MODULES).unwrap());
    for m in GUEST_MODULES {
        assert!(
            closure.contains(&m.to_string()),
            "{m} missing from {closure:?}"
        );
    }
    let pos = |m: &str| {
        closure
            .iter()
            .position(|n| n == m)
            .unwrap_or_else(|| panic!("{m} not in {closure:?}"))
    };
    // Each module after what it needs (as read from the 6.1 cloud kernel's .modinfo).
    for (dep, user) in [
        ("virtio_ring", "virtio"),
        ("virtio", "virtio_mmio"),
        ("failover", "net_failover"),
        ("net_failover", "virtio_net"),
        ("vsock", "vmw_vsock_virtio_transport_common"),
        (
            "vmw_vsock_virtio_transport_common",
            "vmw_vsock_virtio_transport",
        ),
    ] {
        assert!(
            pos(dep) < pos(user),
            "{dep} must load before {user}: {closure:?}"
        );
    }
    let mut unique = closure.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), closure.len(), "no duplicates: {closure:?}");
}

#[test]
fn guest_initramfs_holds_init_busybox_and_modules() {
    let Some(kernel) = kernel() else { return };
    let busybox = fetch_busybox(&test_cache(), &Progress::new()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let init = dir.path().join("init");
    std::fs::write(&init, b"#!/bin/sh\nexec sh\n").unwrap();
    let out = dir.path().join("initrd.cpio");
    let started = Instant::now();
    build_guest_initramfs(&kernel, &busybox, &init, &out).unwrap();
    eprintln!(
        "built {} ({} bytes) in {:?}",
        out.display(),
        std::fs::metadata(&out).unwrap().len(),
        started.elapsed()
    );

    let listing = cpio_list(&out);
    for entry in [
        "init",
        "bin/busybox",
        "bin/sh",
        "bin/mount",
        "sbin",
        "dev/console",
        "etc/passwd",
        "tmp",
    ] {
        assert!(
            listing.iter().any(|l| l == entry),
            "{entry} not in the archive"
        );
    }
    let order = String::from_utf8(cpio_extract(&out, "lib/modules/cela/load.order")).unwrap();
    let expected: Vec<String> = names(&kernel.module_closure(GUEST_MODULES).unwrap())
        .iter()
        .map(|n| format!("/lib/modules/cela/{n}.ko"))
        .collect();
    assert_eq!(order.lines().collect::<Vec<_>>(), expected);
    for line in order.lines() {
        let entry = line.trim_start_matches('/');
        assert!(
            listing.iter().any(|l| l == entry),
            "{entry} not in the archive"
        );
    }
    let ko = cpio_extract(&out, "lib/modules/cela/virtio_mmio.ko");
    assert_eq!(&ko[..4], b"\x7fELF", "modules are stored decompressed");
    assert_eq!(cpio_extract(&out, "init"), b"#!/bin/sh\nexec sh\n");
}

#[test]
fn guest_assets_are_cached_and_keyed_by_the_init_binary() {
    if kernel().is_none() {
        return;
    }
    let cache = test_cache();
    let dir = tempfile::tempdir().unwrap();
    let init = dir.path().join("init");
    std::fs::write(&init, b"#!/bin/sh\n# a stable test init\nexec sh\n").unwrap();

    let first = guest_assets(&cache, &init, &Progress::new()).unwrap();
    let started = Instant::now();
    let again = guest_assets(&cache, &init, &Progress::hidden()).unwrap();
    eprintln!("cached guest_assets took {:?}", started.elapsed());
    assert_eq!(first, again);
    assert!(first.initrd.starts_with(cache.join("initramfs")));
    let file = first
        .initrd
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(
        file.starts_with(&format!("{}-", first.kernel_version)) && file.ends_with(".cpio"),
        "{file}"
    );

    // Another init gives another archive; several processes (here threads) asking at once
    // build it once and all get a complete file.
    let unique = format!("#!/bin/sh\n# {} {:?}\n", std::process::id(), Instant::now());
    std::fs::write(&init, unique.as_bytes()).unwrap();
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|_| s.spawn(|| guest_assets(&cache, &init, &Progress::hidden()).unwrap()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_ne!(results[0].initrd, first.initrd);
    assert!(results.iter().all(|r| r == &results[0]));
    assert_eq!(cpio_extract(&results[0].initrd, "init"), unique.as_bytes());
}
