//! Containers made from images: the image's layers (unpacked once per layer by the image store)
//! stacked with OverlayFS under a fresh upper layer per instance, and an OCI bundle whose
//! `config.json` comes from `cela-runc`'s template plus the image's run config and the user's
//! flags. The container itself is created, started and waited for through `cela-runtime`,
//! with its state in the instance directory.
//!
//! In the instance directory: `rootfs/` (the overlay mount point), `upper/` and `work/` (the
//! overlay's writable layer, kept across `stop` and `start`, removed by `rm`), `bundle/` (the
//! OCI bundle's `config.json`) and `runtime/` (the runtime's state root).

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use cela_image::{ImageRecord, Store};
use cela_runtime::{CreateOptions, Runtime};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use serde_json::{Value, json};

use crate::error::{InstanceError, IoContext};
use crate::record::{Instance, InstanceConfig};
use crate::security::Seccomp;

/// The cgroup parent of cela's containers (`/cela/<id>` in each hierarchy).
pub const CGROUP_PARENT: &str = "/cela";

/// The runtime whose state root is in the instance directory.
pub fn runtime(inst: &Instance) -> Runtime {
    runtime_at(&inst.dir)
}

/// The runtime of the instance directory `dir`.
pub fn runtime_at(dir: &Path) -> Runtime {
    Runtime::new(dir.join("runtime"), false)
}

fn rootfs_dir(inst: &Instance) -> PathBuf {
    inst.dir.join("rootfs")
}

/// Mounts the instance's root: the image's layers under its own upper layer.
pub fn mount_rootfs(
    store: &Store,
    image: &ImageRecord,
    inst: &Instance,
) -> Result<PathBuf, InstanceError> {
    let lower = cela_image::layer_dirs(store, image)?;
    let (root, upper, work) = (
        rootfs_dir(inst),
        inst.dir.join("upper"),
        inst.dir.join("work"),
    );
    for d in [&root, &upper, &work] {
        fs::create_dir_all(d).doing(|| format!("creating {}", d.display()))?;
    }
    // OverlayFS lists lower directories highest first; an image with no layers gets an empty one.
    let lowers: Vec<String> = if lower.is_empty() {
        let empty = inst.dir.join("empty");
        fs::create_dir_all(&empty).doing(|| format!("creating {}", empty.display()))?;
        vec![empty.display().to_string()]
    } else {
        lower
            .iter()
            .rev()
            .map(|p| p.display().to_string())
            .collect()
    };
    let data = format!(
        "lowerdir={},upperdir={},workdir={}",
        lowers.join(":"),
        upper.display(),
        work.display()
    );
    if is_mounted(&root) {
        return Ok(root);
    }
    mount(
        Some("overlay"),
        &root,
        Some("overlay"),
        MsFlags::empty(),
        Some(data.as_str()),
    )
    .map_err(|e| InstanceError::Io {
        what: format!(
            "mounting the image layers (OverlayFS) on {}",
            root.display()
        ),
        source: e.into(),
    })?;
    Ok(root)
}

fn is_mounted(path: &Path) -> bool {
    let Ok(mounts) = fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let p = path.display().to_string();
    mounts
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(p.as_str()))
}

/// Whether anything is mounted at `dir` or below it.
pub fn mounted_below(dir: &Path) -> bool {
    let Ok(mounts) = fs::read_to_string("/proc/self/mountinfo") else {
        return true; // cannot tell: assume so
    };
    let p = dir.display().to_string();
    mounts.lines().filter_map(|l| l.split(' ').nth(4)).any(|m| {
        m == p
            || m.strip_prefix(p.as_str())
                .is_some_and(|rest| rest.starts_with('/'))
    })
}

/// Unmounts the instance's root if it is mounted.
pub fn unmount_rootfs(inst: &Instance) {
    unmount_rootfs_at(&inst.dir);
}

/// [`unmount_rootfs`] of the instance directory `dir`.
pub fn unmount_rootfs_at(dir: &Path) {
    let root = dir.join("rootfs");
    if is_mounted(&root)
        && let Err(e) = umount2(&root, MntFlags::MNT_DETACH)
    {
        tracing::warn!("unmounting {}: {e}", root.display());
    }
}

/// A container's memory limit in bytes for `--memory MIB`: at least 6 MiB (as Docker: less
/// cannot start a process) and no more than the kernel's counters hold.
pub fn memory_limit(mib: u64) -> Result<i64, InstanceError> {
    const MIN_MIB: u64 = 6;
    match mib.checked_mul(1 << 20).and_then(|b| i64::try_from(b).ok()) {
        Some(bytes) if mib >= MIN_MIB => Ok(bytes),
        _ => Err(InstanceError::Other(format!(
            "--memory {mib}: a container's memory limit is {MIN_MIB} MiB to {} MiB",
            i64::MAX >> 20
        ))),
    }
}

/// Kills every process in the cgroup of container `id` (`/cela/<id>` in each cgroup v1
/// hierarchy, or in the v2 tree) and removes the cgroup directories once empty. A fork loop
/// cannot outrun it: on v2 `cgroup.kill` kills the whole cgroup at once, on v1 the freezer
/// stops the processes before they are listed and killed; and it goes on until the cgroups
/// are empty (10 s at most: then an error says what is left).
pub fn kill_cgroup(id: &str) -> Result<(), InstanceError> {
    let parent = CGROUP_PARENT.trim_start_matches('/');
    let mut dirs = Vec::new();
    if let Ok(hierarchies) = fs::read_dir("/sys/fs/cgroup") {
        for h in hierarchies.flatten() {
            dirs.push(h.path().join(parent).join(id));
        }
    }
    dirs.push(Path::new("/sys/fs/cgroup").join(parent).join(id));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        dirs.retain(|d| d.is_dir());
        for d in &dirs {
            kill_all_in(d);
            // Empty once the killed processes are reaped by their parents.
            let _ = fs::remove_dir(d);
        }
        dirs.retain(|d| d.is_dir());
        if dirs.is_empty() {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            let left: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
            return Err(InstanceError::Other(format!(
                "the processes of container {id} could not all be killed: {} still hold processes",
                left.join(", ")
            )));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Thaws the cgroups of container `id` directly (v1 `freezer.state`, v2 `cgroup.freeze`): the
/// way back when the runtime cannot (a freeze that timed out half-way leaves the cgroup
/// frozen while the runtime still says running). Errors name what could not be written.
pub fn thaw_cgroup(id: &str) -> Result<(), InstanceError> {
    let parent = CGROUP_PARENT.trim_start_matches('/');
    let mut failed = Vec::new();
    let mut dirs: Vec<PathBuf> = fs::read_dir("/sys/fs/cgroup")
        .map(|hs| {
            hs.flatten()
                .map(|h| h.path().join(parent).join(id))
                .collect()
        })
        .unwrap_or_default();
    dirs.push(Path::new("/sys/fs/cgroup").join(parent).join(id));
    for d in dirs.iter().filter(|d| d.is_dir()) {
        for (file, value) in [("freezer.state", "THAWED"), ("cgroup.freeze", "0")] {
            let f = d.join(file);
            if f.exists() && fs::write(&f, value).is_err() {
                failed.push(f.display().to_string());
            }
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(InstanceError::Other(format!(
            "container {id} could not be thawed: writing {} failed",
            failed.join(", ")
        )))
    }
}

/// Sends SIGKILL to every process of the cgroup directory `d`.
fn kill_all_in(d: &Path) {
    let kill_file = d.join("cgroup.kill");
    if kill_file.exists() {
        let _ = fs::write(&kill_file, "1");
        return;
    }
    let freezer = d.join("freezer.state");
    let frozen = freezer.exists() && fs::write(&freezer, "FROZEN").is_ok();
    if let Ok(procs) = fs::read_to_string(d.join("cgroup.procs")) {
        for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    if frozen {
        // Frozen processes take their SIGKILL once thawed.
        let _ = fs::write(&freezer, "THAWED");
    }
}

/// Checks `user` against an image's layers before its container exists: in the highest layer
/// that has an `etc/passwd` entry (read beneath the layer's root, never through its links). If
/// a layer's `etc` is itself a link, the check waits for the supervisor, which resolves the
/// user in the mounted root where the layers' links mean what they will in the container.
pub fn check_user(layers: &[PathBuf], user: &str) -> Result<(), InstanceError> {
    for layer in layers.iter().rev() {
        match fs::symlink_metadata(layer.join("etc")) {
            Ok(m) if m.file_type().is_symlink() => return Ok(()),
            Ok(m) if m.is_dir() => {}
            _ => continue,
        }
        match fs::symlink_metadata(layer.join("etc/passwd")) {
            // An OverlayFS whiteout (a 0:0 character device): deleted in this layer. What the
            // merged root then holds is the supervisor's to resolve.
            Ok(m) if m.file_type().is_char_device() && m.rdev() == 0 => return Ok(()),
            Ok(_) => return resolve_user(layer, user).map(|_| ()),
            Err(_) => {}
        }
        // An opaque `etc` hides the layers below it: likewise left to the supervisor.
        if xattr_is(&layer.join("etc"), "trusted.overlay.opaque", b"y") {
            return Ok(());
        }
    }
    match layers.last() {
        Some(top) => resolve_user(top, user).map(|_| ()),
        None => Ok(()),
    }
}

/// Whether the extended attribute `name` of `path` (not followed if a link) is `value`.
fn xattr_is(path: &Path, name: &str, value: &[u8]) -> bool {
    let mut buf = [0u8; 8];
    rustix::fs::lgetxattr(path, name, &mut buf).is_ok_and(|n| &buf[..n] == value)
}

/// Resolves `user` (`uid[:gid]`, or names from the image's /etc/passwd and /etc/group) to ids,
/// as the init of a microVM does for the same image ([`cela_guest::users`]).
pub fn resolve_user(rootfs: &Path, user: &str) -> Result<(u32, u32), InstanceError> {
    let id = cela_guest::users::resolve(rootfs, user).map_err(InstanceError::Other)?;
    Ok((id.uid, id.gid))
}

/// The bundle's `config.json` for `config`, rooted at `rootfs`.
pub fn spec(config: &InstanceConfig, rootfs: &Path) -> Result<Value, InstanceError> {
    let mut v =
        serde_json::to_value(cela_runtime::spec::default_spec()).expect("a spec serializes");
    v["root"] = json!({"path": rootfs, "readonly": false});
    v["hostname"] = json!(config.name);
    let p = &mut v["process"];
    p["terminal"] = json!(config.tty);
    // Keeps setuid binaries from gaining privileges; Docker's `no-new-privileges`.
    p["noNewPrivileges"] = json!(true);
    p["args"] = json!(config.command);
    let mut env = config.env.clone();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.insert(
            0,
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        );
    }
    if !env.iter().any(|e| e.starts_with("HOSTNAME=")) {
        env.push(format!("HOSTNAME={}", config.name));
    }
    p["env"] = json!(env);
    p["cwd"] = json!(config.workdir.as_deref().unwrap_or("/"));
    if let Some(user) = &config.user {
        let (uid, gid) = resolve_user(rootfs, user)?;
        p["user"] = json!({"uid": uid, "gid": gid});
    }
    let caps = crate::security::capabilities(config)?;
    let mut names: Vec<Value> = caps.iter().map(|c| json!(c)).collect();
    names.sort_by_key(|n| n.to_string());
    p["capabilities"] = json!({"bounding": names, "effective": names, "permitted": names});
    match &config.security.seccomp {
        Seccomp::Default => {
            v["linux"]["seccomp"] = json!(cela_runtime::seccomp::default_profile(&caps));
        }
        Seccomp::Unconfined => {
            v["linux"].as_object_mut().map(|l| l.remove("seccomp"));
        }
        Seccomp::Profile(profile) => v["linux"]["seccomp"] = profile.clone(),
    }
    v["linux"]["cgroupsPath"] = json!(format!("{CGROUP_PARENT}/{}", config.id));
    let mut resources = json!({});
    if let Some(mib) = config.memory_mib {
        let bytes = memory_limit(mib)?;
        resources["memory"] = json!({"limit": bytes, "swap": bytes});
    }
    if let Some(cpus) = config.cpus {
        resources["cpu"] = json!({"quota": i64::from(cpus) * 100_000, "period": 100_000});
    }
    // Keep the template's device rules (deny all, then the usual nodes).
    if let Some(devices) = v["linux"]["resources"]["devices"].as_array() {
        resources["devices"] = json!(devices);
    }
    v["linux"]["resources"] = resources;
    let mounts = v["mounts"].as_array_mut().expect("the template has mounts");
    for vol in &config.volumes {
        let mut options = vec!["rbind", "rprivate"];
        if vol.read_only {
            options.push("ro");
        }
        mounts.push(json!({
            "destination": vol.dest,
            "type": "bind",
            "source": vol.host,
            "options": options,
        }));
    }
    Ok(v)
}

/// Writes the bundle and creates the container (its init waits for `start`); its stdio are
/// the caller's. Returns the init's pid.
/// Creates the container of `inst` (not started): its init's pid, and with a terminal
/// (`tty`) the terminal's master, received on a console socket in the instance directory.
pub fn create(
    store: &Store,
    image: &ImageRecord,
    inst: &Instance,
) -> Result<(i32, Option<std::os::fd::OwnedFd>), InstanceError> {
    let rootfs = mount_rootfs(store, image, inst)?;
    let made = (|| {
        let console = if inst.config.tty {
            Some(cela_runtime::console::ConsoleSocket::listen(&inst.dir)?)
        } else {
            None
        };
        let bundle = inst.dir.join("bundle");
        fs::create_dir_all(&bundle).doing(|| format!("creating {}", bundle.display()))?;
        let mut v = spec(&inst.config, &rootfs)?;
        crate::network::apply_to_spec(&mut v, inst)?;
        crate::record::write_json(&bundle.join("config.json"), &v)?;
        let rt = runtime(inst);
        // A container left by an earlier run (stop, then start) is replaced.
        let _ = rt.delete(&inst.config.id, true);
        let c = rt.create(
            &inst.config.id,
            &CreateOptions {
                bundle,
                detach: true,
                console_socket: console.as_ref().map(|c| c.path().to_path_buf()),
                ..Default::default()
            },
        )?;
        let pid = c.pid().map(|p| p.as_raw()).ok_or_else(|| {
            InstanceError::Other(format!("container {} has no init pid", inst.config.id))
        })?;
        let master = console.map(|c| c.receive_master()).transpose()?;
        Ok((pid, master))
    })();
    if made.is_err() {
        unmount_rootfs(inst);
    }
    made
}

/// Removes the container (killing what runs in it) and unmounts its root; keeps the upper
/// layer unless `purge`.
pub fn destroy(inst: &Instance, purge: bool) {
    let rt = runtime(inst);
    if let Err(e) = rt.delete(&inst.config.id, true) {
        tracing::warn!("deleting container {}: {e}", inst.config.id);
    }
    unmount_rootfs(inst);
    if purge {
        for d in ["upper", "work"] {
            let _ = fs::remove_dir_all(inst.dir.join(d));
        }
    }
}
