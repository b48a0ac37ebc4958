//! Bundle configuration (`config.json`, OCI runtime spec §config): the default template that
//! `cela-runc spec` writes, the jail profile (`spec --jail`), and loading a bundle's config with
//! errors that name the offending field.
//!
//! youki's libcontainer validates a spec too, but its serde errors carry only a line and column,
//! and a missing rootfs is found only after the container's state directory exists. Loading the
//! bundle here first keeps bad input from leaving any state behind.

use std::path::{Path, PathBuf};

use oci_spec::runtime::{Capability, Spec};
use serde_json::{Value, json};

use crate::error::Error;

/// Host uid and gid that the jail's root is mapped to, and how many ids the mapping spans.
/// 100000 is the first id Debian's `useradd` gives out as a subordinate range (`/etc/subuid`).
pub const JAIL_HOST_ID: u32 = 100_000;
/// Size of the jail's uid and gid mappings.
pub const JAIL_ID_COUNT: u32 = 65_536;
/// Memory limit of the jail profile, in bytes.
pub const JAIL_MEMORY_BYTES: i64 = 256 << 20;
/// Process limit of the jail profile.
pub const JAIL_PIDS: i64 = 128;
/// Hostname inside a jail.
pub const JAIL_HOSTNAME: &str = "jail";

/// Capabilities runc's template keeps; the jail keeps the same small set.
const DEFAULT_CAPS: [&str; 3] = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"];

/// The capabilities a container run by `cela run` holds: Docker's default set (file ownership
/// and modes, setuid/setgid, binding low ports, raw sockets, chroot, mknod, kill, audit write).
/// Everything else (CAP_SYS_ADMIN above all) is dropped; `--cap-add`/`--cap-drop` change it.
pub const CONTAINER_CAPS: [Capability; 14] = [
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fsetid,
    Capability::Fowner,
    Capability::Mknod,
    Capability::NetRaw,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setfcap,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::SysChroot,
    Capability::Kill,
    Capability::AuditWrite,
];

/// Parses a capability name as Docker's `--cap-add` does: any case, `CAP_` optional.
pub fn parse_capability(name: &str) -> Result<Capability, Error> {
    serde_json::from_value(Value::String(name.to_owned())).map_err(|_| {
        Error::Usage(format!(
            "unknown capability {name:?} (see capabilities(7); e.g. NET_ADMIN or CAP_NET_ADMIN)"
        ))
    })
}

/// Every capability Linux has, for `--cap-add ALL`.
pub fn all_capabilities() -> Vec<Capability> {
    // The names of capabilities(7), in the order of their numbers.
    [
        "CHOWN",
        "DAC_OVERRIDE",
        "DAC_READ_SEARCH",
        "FOWNER",
        "FSETID",
        "KILL",
        "SETGID",
        "SETUID",
        "SETPCAP",
        "LINUX_IMMUTABLE",
        "NET_BIND_SERVICE",
        "NET_BROADCAST",
        "NET_ADMIN",
        "NET_RAW",
        "IPC_LOCK",
        "IPC_OWNER",
        "SYS_MODULE",
        "SYS_RAWIO",
        "SYS_CHROOT",
        "SYS_PTRACE",
        "SYS_PACCT",
        "SYS_ADMIN",
        "SYS_BOOT",
        "SYS_NICE",
        "SYS_RESOURCE",
        "SYS_TIME",
        "SYS_TTY_CONFIG",
        "MKNOD",
        "LEASE",
        "AUDIT_WRITE",
        "AUDIT_CONTROL",
        "SETFCAP",
        "MAC_OVERRIDE",
        "MAC_ADMIN",
        "SYSLOG",
        "WAKE_ALARM",
        "BLOCK_SUSPEND",
        "AUDIT_READ",
        "PERFMON",
        "BPF",
        "CHECKPOINT_RESTORE",
    ]
    .iter()
    .map(|n| parse_capability(n).expect("capabilities(7) names parse"))
    .collect()
}

/// System calls a jail may not make at all, refused with EPERM by its seccomp filter. Capabilities
/// and the user namespace already refuse them; the filter makes the refusal independent of both.
const JAIL_DENIED_SYSCALLS: [&str; 17] = [
    "mount",
    "umount2",
    "pivot_root",
    "move_mount",
    "fsmount",
    "fsopen",
    "open_tree",
    "init_module",
    "finit_module",
    "delete_module",
    "kexec_load",
    "kexec_file_load",
    "mknod",
    "mknodat",
    "sethostname",
    "setdomainname",
    "swapon",
];

/// The template `cela-runc spec` writes: the same shape as runc's (an interactive `sh` in
/// `rootfs`, read-only root, the usual pseudo-filesystems, masked and read-only /proc paths).
pub fn default_spec() -> Spec {
    from_value(default_value())
}

/// The jail profile: everything a FreeBSD jail confines. Own user namespace mapping root to
/// host uid/gid [`JAIL_HOST_ID`], own pid/net/ipc/uts/mount/cgroup namespaces (the network
/// namespace has only loopback), read-only root with a tmpfs `/tmp`, three capabilities, a
/// seccomp filter refusing mount/module/mknod/hostname calls, and memory and pids limits.
pub fn jail_spec() -> Spec {
    let mut v = default_value();
    v["process"]["terminal"] = json!(false);
    v["hostname"] = json!(JAIL_HOSTNAME);
    // No cgroup filesystem: cgroup v1 cannot be mounted from inside a user namespace.
    let mounts = v["mounts"].as_array_mut().expect("template has mounts");
    mounts.retain(|m| m["destination"] != "/sys/fs/cgroup");
    mounts.push(json!({
        "destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
        "options": ["nosuid", "nodev", "mode=1777", "size=65536k"]
    }));
    let linux = &mut v["linux"];
    linux["namespaces"]
        .as_array_mut()
        .expect("template has namespaces")
        .push(json!({"type": "user"}));
    linux["uidMappings"] =
        json!([{"containerID": 0, "hostID": JAIL_HOST_ID, "size": JAIL_ID_COUNT}]);
    linux["gidMappings"] =
        json!([{"containerID": 0, "hostID": JAIL_HOST_ID, "size": JAIL_ID_COUNT}]);
    linux["resources"]["memory"] = json!({"limit": JAIL_MEMORY_BYTES, "swap": JAIL_MEMORY_BYTES});
    linux["resources"]["pids"] = json!({"limit": JAIL_PIDS});
    linux["seccomp"] = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [{"names": JAIL_DENIED_SYSCALLS, "action": "SCMP_ACT_ERRNO", "errnoRet": libc::EPERM}]
    });
    from_value(v)
}

fn from_value(v: Value) -> Spec {
    serde_json::from_value(v).expect("built-in spec templates are valid OCI specs")
}

fn default_value() -> Value {
    let caps = json!(DEFAULT_CAPS);
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": true,
            "user": {"uid": 0, "gid": 0},
            "args": ["sh"],
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
            "cwd": "/",
            "capabilities": {
                "bounding": caps, "effective": caps, "permitted": caps
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": true},
        "hostname": "cela",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
             "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}
        ],
        "linux": {
            "resources": {"devices": [{"allow": false, "access": "rwm"}]},
            "namespaces": [
                {"type": "pid"}, {"type": "network"}, {"type": "ipc"},
                {"type": "uts"}, {"type": "mount"}, {"type": "cgroup"}
            ],
            "maskedPaths": [
                "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
                "/proc/scsi"
            ],
            "readonlyPaths": [
                "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"
            ]
        }
    })
}

/// A bundle's configuration, loaded and checked.
#[derive(Debug)]
pub struct Bundle {
    /// The bundle directory, absolute.
    pub dir: PathBuf,
    /// Its parsed `config.json`.
    pub spec: Spec,
    /// The root filesystem, absolute.
    pub rootfs: PathBuf,
}

/// Loads `<bundle>/config.json` and checks what the runtime needs before it creates anything:
/// the JSON matches the OCI schema (an error names the field, e.g. `process.args`), the version
/// is 1.x, a process with arguments is given, and the root filesystem is a directory.
pub fn load_bundle(bundle: &Path) -> Result<Bundle, Error> {
    let dir = std::path::absolute(bundle).map_err(|source| Error::Io {
        what: format!("resolving bundle path {}", bundle.display()),
        source,
    })?;
    let path = dir.join("config.json");
    let text = read_config_file(&path)?;
    let spec = parse_config(&text).map_err(|e| e.in_file(&path))?;
    let root = spec
        .root()
        .as_ref()
        .ok_or_else(|| Error::invalid("root", "missing: the bundle needs a root filesystem"))
        .map_err(|e| e.in_file(&path))?;
    let rootfs = if root.path().is_absolute() {
        root.path().clone()
    } else {
        dir.join(root.path())
    };
    if !rootfs.is_dir() {
        return Err(Error::MissingRootfs(rootfs));
    }
    check_masked_paths(&spec, &rootfs).map_err(|e| e.in_file(&path))?;
    Ok(Bundle { dir, spec, rootfs })
}

/// The largest `config.json` read (a bundle is untrusted input; real ones are a few KiB).
const MAX_CONFIG: u64 = 4 << 20;

/// Reads a bundle's `config.json`: a regular file of at most [`MAX_CONFIG`] bytes (never a
/// FIFO that blocks, or a device such as /dev/zero that never ends).
fn read_config_file(path: &Path) -> Result<String, Error> {
    let io = |source| Error::Io {
        what: format!("reading {}", path.display()),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    if !meta.is_file() || meta.len() > MAX_CONFIG {
        return Err(Error::invalid(
            "config.json",
            &format!(
                "{} must be a regular file of at most {MAX_CONFIG} bytes",
                path.display()
            ),
        ));
    }
    String::from_utf8(read_bounded(path, MAX_CONFIG)?)
        .map_err(|_| Error::invalid("config.json", &format!("{} is not UTF-8", path.display())))
}

/// Reads at most `max` bytes of `path`; more is an error naming the file.
pub fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, Error> {
    use std::io::Read;
    let io = |source| Error::Io {
        what: format!("reading {}", path.display()),
        source,
    };
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .map_err(io)?
        .take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > max {
        return Err(Error::invalid(
            &path.display().to_string(),
            &format!("larger than {max} bytes"),
        ));
    }
    Ok(bytes)
}

/// Refuses a masked path that is a symbolic link in the root filesystem, as runc does: the
/// mask (a bind mount of /dev/null or a tmpfs) would land wherever the link points.
fn check_masked_paths(spec: &Spec, rootfs: &Path) -> Result<(), Error> {
    use rustix::fs::{FileType, Mode, OFlags, ResolveFlags};
    let masked = spec
        .linux()
        .as_ref()
        .and_then(|l| l.masked_paths().clone())
        .unwrap_or_default();
    if masked.is_empty() {
        return Ok(());
    }
    let root = rustix::fs::open(
        rootfs,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| Error::Io {
        what: format!("opening {}", rootfs.display()),
        source: e.into(),
    })?;
    for m in &masked {
        let found = rustix::fs::openat2(
            &root,
            m.trim_start_matches('/'),
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
        );
        let Ok(fd) = found else { continue }; // not in the image: masked after the mounts
        let st = rustix::fs::fstat(&fd).map_err(|e| Error::Io {
            what: format!("inspecting {m} in {}", rootfs.display()),
            source: e.into(),
        })?;
        if FileType::from_raw_mode(st.st_mode) == FileType::Symlink {
            return Err(Error::invalid(
                "linux.maskedPaths",
                &format!(
                    "{m} is a symbolic link in the root filesystem; a masked path must not be one"
                ),
            ));
        }
    }
    Ok(())
}

/// Parses and checks a `config.json` text (see [`load_bundle`]).
pub fn parse_config(text: &str) -> Result<Spec, Error> {
    let de = &mut serde_json::Deserializer::from_str(text);
    let spec: Spec = serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        let message = e.into_inner().to_string();
        Error::invalid(
            if field == "." || field == "?" {
                "(document)"
            } else {
                &field
            },
            &message,
        )
    })?;
    if !spec.version().starts_with("1.") {
        return Err(Error::invalid(
            "ociVersion",
            &format!("{:?} is not a 1.x runtime-spec version", spec.version()),
        ));
    }
    let process = spec
        .process()
        .as_ref()
        .ok_or_else(|| Error::invalid("process", "missing: nothing to run"))?;
    match process.args() {
        Some(args) if !args.is_empty() && !args[0].is_empty() => {}
        _ => {
            return Err(Error::invalid(
                "process.args",
                "empty: give the program to run",
            ));
        }
    }
    if !process.cwd().is_absolute() {
        return Err(Error::invalid(
            "process.cwd",
            &format!("{} is not an absolute path", process.cwd().display()),
        ));
    }
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(text: &str) -> String {
        match parse_config(text) {
            Err(Error::InvalidConfig { field, .. }) => field,
            other => panic!("expected an invalid-config error, got {other:?}"),
        }
    }

    #[test]
    fn templates_are_valid_and_round_trip() {
        for spec in [default_spec(), jail_spec()] {
            let text = serde_json::to_string(&spec).unwrap();
            parse_config(&text).unwrap();
        }
    }

    #[test]
    fn jail_has_user_namespace_limits_and_tmp() {
        let spec = jail_spec();
        let linux = spec.linux().as_ref().unwrap();
        let ns = linux.namespaces().as_ref().unwrap();
        assert!(
            ns.iter()
                .any(|n| n.typ() == oci_spec::runtime::LinuxNamespaceType::User)
        );
        assert_eq!(
            linux.uid_mappings().as_ref().unwrap()[0].host_id(),
            JAIL_HOST_ID
        );
        let res = linux.resources().as_ref().unwrap();
        assert_eq!(res.pids().as_ref().unwrap().limit(), JAIL_PIDS);
        assert_eq!(
            res.memory().as_ref().unwrap().limit(),
            Some(JAIL_MEMORY_BYTES)
        );
        assert!(
            spec.mounts()
                .as_ref()
                .unwrap()
                .iter()
                .any(|m| m.destination() == Path::new("/tmp"))
        );
        assert!(spec.root().as_ref().unwrap().readonly().unwrap());
    }

    #[test]
    fn capabilities_parse_as_docker_takes_them() {
        assert_eq!(parse_capability("net_admin").unwrap(), Capability::NetAdmin);
        assert_eq!(
            parse_capability("CAP_SYS_ADMIN").unwrap(),
            Capability::SysAdmin
        );
        assert!(matches!(
            parse_capability("CAP_BOGUS"),
            Err(Error::Usage(_))
        ));
        assert_eq!(all_capabilities().len(), 41);
    }

    #[test]
    fn malformed_config_names_the_field() {
        let mut v = serde_json::to_value(default_spec()).unwrap();
        v["process"]["args"] = json!("sh");
        assert_eq!(field_of(&v.to_string()), "process.args");

        let mut v = serde_json::to_value(default_spec()).unwrap();
        v["linux"]["namespaces"][1]["type"] = json!("bogus");
        assert_eq!(field_of(&v.to_string()), "linux.namespaces[1].type");

        let mut v = serde_json::to_value(default_spec()).unwrap();
        v["process"]["args"] = json!([]);
        assert_eq!(field_of(&v.to_string()), "process.args");

        let mut v = serde_json::to_value(default_spec()).unwrap();
        v["ociVersion"] = json!("0.9");
        assert_eq!(field_of(&v.to_string()), "ociVersion");

        assert_eq!(field_of("{\"ociVersion\": \"1.0.2\", "), "(document)");
    }
}
