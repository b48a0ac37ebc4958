//! Failure paths of fetching, against stand-in apt tools on `PATH`: no apt at all, and a
//! download that fails half-way. Kept as the only test of its binary because it changes the
//! process's `PATH`.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use cela_assets::{AssetError, Progress, fetch_kernel};

fn script(dir: &Path, name: &str, body: &str) {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn missing_apt_and_failed_downloads_are_reported_and_leave_nothing_behind() {
    let tools = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();

    // SAFETY: this is the only test in this binary, so no other thread reads the environment
    // while it changes.
    unsafe { std::env::set_var("PATH", tools.path()) };
    let err = fetch_kernel(cache.path(), &Progress::hidden()).unwrap_err();
    assert!(matches!(err, AssetError::MissingTool { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("`apt-cache` not found") && msg.contains("pass --kernel and --initrd"),
        "{msg}"
    );

    // apt knows the kernel (only signed), and its download dies after writing part of the file.
    script(
        tools.path(),
        "apt-cache",
        r#"case "$1 $3" in
  "depends ") printf 'linux-image-cloud-amd64\n  Depends: linux-image-9.9.9-test\n' ;;
  "show linux-image-9.9.9-test") printf 'Package: linux-image-9.9.9-test\nVersion: 9.9.9-1\nSize: 4096\n' ;;
  *) echo "E: No packages found" >&2; exit 100 ;;
esac
"#,
    );
    script(
        tools.path(),
        "apt-get",
        r#"printf 'partial' > "$2_9.9.9-1_amd64.deb"
echo "E: Failed to fetch http://deb.example/$2.deb  Connection reset" >&2
exit 100
"#,
    );
    script(tools.path(), "dpkg-deb", "exit 2\n");
    let err = fetch_kernel(cache.path(), &Progress::hidden())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`apt-get download linux-image-9.9.9-test` failed"),
        "{err}"
    );
    assert!(
        err.contains("Connection reset") && err.contains("run apt-get update"),
        "{err}"
    );
    assert_eq!(
        entries(&cache.path().join("kernel")),
        [".lock"],
        "no partial download is left"
    );
}
