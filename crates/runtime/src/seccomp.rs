//! The default seccomp profile of cela's containers, and profiles given by the user.
//!
//! A container shares the host's kernel, so every system call it can make is attack surface.
//! The default profile is an allow-list, equal in effect to Docker's default (written anew for
//! cela from the system call table; not a copy of Docker's file): what ordinary programs use
//! is allowed, everything else fails with EPERM, and `clone3` with ENOSYS (so that C libraries
//! fall back to `clone`, whose flags the filter can read). What it refuses, and why:
//!
//! * new namespaces and joining others' (`unshare`, `setns`, `clone` with a `CLONE_NEW*`
//!   flag): a user namespace needs no capability and opens the kernel's namespaced-root code
//!   (mount, netfilter, …) to the container — the path of many kernel privilege escalations;
//! * mounting and the new mount API (`mount`, `umount2`, `pivot_root`, `fsopen`, `fsmount`,
//!   `fsconfig`, `fspick`, `move_mount`, `open_tree`, `mount_setattr`);
//! * the kernel keyring (`keyctl`, `add_key`, `request_key`: not namespaced);
//! * `bpf`, `perf_event_open`, `userfaultfd`, `io_uring_*` (large in-kernel attack surface; the
//!   last two make kernel races easy to win);
//! * modules, kexec, reboot, swap, accounting, quotas, the kernel log, time setting, raw I/O
//!   ports (`*_module`, `kexec_*`, `reboot`, `swapon`/`swapoff`, `acct`, `quotactl*`, `syslog`,
//!   `settimeofday`, `clock_settime`, `iopl`, `ioperm`) — host-wide state;
//! * file handles (`open_by_handle_at`, the "shocker" escape, and `name_to_handle_at`), `kcmp`,
//!   `move_pages`/`migrate_pages` (other processes' memory), `modify_ldt`, `vm86`, `uselib`,
//!   `lookup_dcookie`, `_sysctl`, `sysfs`, `ustat`, `vhangup`, and unimplemented numbers;
//! * vsock sockets (`socket(AF_VSOCK)`), which would reach the host's vsock services;
//! * `personality` other than the few flags programs use (Linux, `ADDR_NO_RANDOMIZE`,
//!   `UNAME26`, and the query).
//!
//! As in Docker, a capability given to the container (`--cap-add`) opens the calls it is
//! meant for: CAP_SYS_ADMIN the namespace and mount calls, CAP_SYS_PTRACE `kcmp`, CAP_SYS_MODULE
//! the module calls, and so on ([`CAP_GATED`]). The kernel still checks capabilities; the
//! filter removes what capabilities do not cover (a user namespace needs none).

use std::collections::HashSet;
use std::io::Read;
use std::path::Path;

use oci_spec::runtime::{
    Arch, Capability, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArgBuilder,
    LinuxSeccompBuilder, LinuxSeccompOperator, LinuxSyscall, LinuxSyscallBuilder,
};
use serde_json::Value;

use crate::error::Error;

/// Calls any program may make: the allow-list, by kind. Names a kernel or libseccomp does not
/// know are skipped when the filter is loaded, as runc does.
const ALLOWED: &[&[&str]] = &[
    // Files and descriptors.
    &[
        "read",
        "write",
        "open",
        "openat",
        "openat2",
        "close",
        "close_range",
        "creat",
        "stat",
        "fstat",
        "lstat",
        "newfstatat",
        "statx",
        "stat64",
        "fstat64",
        "lstat64",
        "fstatat64",
        "statfs",
        "fstatfs",
        "statfs64",
        "fstatfs64",
        "lseek",
        "_llseek",
        "pread64",
        "pwrite64",
        "readv",
        "writev",
        "preadv",
        "pwritev",
        "preadv2",
        "pwritev2",
        "access",
        "faccessat",
        "faccessat2",
        "dup",
        "dup2",
        "dup3",
        "pipe",
        "pipe2",
        "fcntl",
        "fcntl64",
        "flock",
        "fsync",
        "fdatasync",
        "sync",
        "syncfs",
        "sync_file_range",
        "truncate",
        "truncate64",
        "ftruncate",
        "ftruncate64",
        "fallocate",
        "fadvise64",
        "fadvise64_64",
        "readahead",
        "getdents",
        "getdents64",
        "getcwd",
        "chdir",
        "fchdir",
        "chroot",
        "rename",
        "renameat",
        "renameat2",
        "mkdir",
        "mkdirat",
        "rmdir",
        "link",
        "linkat",
        "unlink",
        "unlinkat",
        "symlink",
        "symlinkat",
        "readlink",
        "readlinkat",
        "chmod",
        "fchmod",
        "fchmodat",
        "fchmodat2",
        "chown",
        "fchown",
        "lchown",
        "fchownat",
        "chown32",
        "fchown32",
        "lchown32",
        "umask",
        "utime",
        "utimes",
        "utimensat",
        "utimensat_time64",
        "futimesat",
        "mknod",
        "mknodat",
        "sendfile",
        "sendfile64",
        "copy_file_range",
        "splice",
        "tee",
        "vmsplice",
        "ioctl",
        "cachestat",
    ],
    // Extended attributes.
    &[
        "setxattr",
        "lsetxattr",
        "fsetxattr",
        "getxattr",
        "lgetxattr",
        "fgetxattr",
        "listxattr",
        "llistxattr",
        "flistxattr",
        "removexattr",
        "lremovexattr",
        "fremovexattr",
        "setxattrat",
        "getxattrat",
        "listxattrat",
        "removexattrat",
    ],
    // Waiting on descriptors, events, notifications.
    &[
        "poll",
        "ppoll",
        "ppoll_time64",
        "select",
        "_newselect",
        "pselect6",
        "pselect6_time64",
        "epoll_create",
        "epoll_create1",
        "epoll_ctl",
        "epoll_wait",
        "epoll_pwait",
        "epoll_pwait2",
        "eventfd",
        "eventfd2",
        "signalfd",
        "signalfd4",
        "timerfd_create",
        "timerfd_settime",
        "timerfd_gettime",
        "timerfd_settime64",
        "timerfd_gettime64",
        "inotify_init",
        "inotify_init1",
        "inotify_add_watch",
        "inotify_rm_watch",
    ],
    // Memory.
    &[
        "brk",
        "mmap",
        "mmap2",
        "munmap",
        "mremap",
        "mprotect",
        "msync",
        "mincore",
        "madvise",
        "mlock",
        "mlock2",
        "munlock",
        "mlockall",
        "munlockall",
        "remap_file_pages",
        "memfd_create",
        "membarrier",
        "pkey_mprotect",
        "pkey_alloc",
        "pkey_free",
        "mseal",
        "get_mempolicy",
        "set_mempolicy",
        "set_mempolicy_home_node",
        "mbind",
        "map_shadow_stack",
    ],
    // Signals.
    &[
        "rt_sigaction",
        "rt_sigprocmask",
        "rt_sigreturn",
        "rt_sigpending",
        "rt_sigsuspend",
        "rt_sigtimedwait",
        "rt_sigtimedwait_time64",
        "rt_sigqueueinfo",
        "rt_tgsigqueueinfo",
        "sigaltstack",
        "sigaction",
        "sigprocmask",
        "sigreturn",
        "sigsuspend",
        "sigpending",
        "signal",
        "kill",
        "tkill",
        "tgkill",
        "pause",
        "alarm",
        "restart_syscall",
    ],
    // Processes and threads (`clone` and `personality` are conditional, below).
    &[
        "fork",
        "vfork",
        "execve",
        "execveat",
        "exit",
        "exit_group",
        "wait4",
        "waitid",
        "waitpid",
        "getpid",
        "getppid",
        "gettid",
        "getpgrp",
        "getpgid",
        "setpgid",
        "getsid",
        "setsid",
        "set_tid_address",
        "set_robust_list",
        "get_robust_list",
        "arch_prctl",
        "set_thread_area",
        "get_thread_area",
        "prctl",
        "capget",
        "capset",
        "getrlimit",
        "setrlimit",
        "ugetrlimit",
        "prlimit64",
        "getrusage",
        "times",
        "rseq",
        "seccomp",
        "futex",
        "futex_time64",
        "futex_waitv",
        "futex_wake",
        "futex_wait",
        "futex_requeue",
        "pidfd_open",
        "pidfd_send_signal",
        "pidfd_getfd",
        "ptrace",
        "process_vm_readv",
        "process_vm_writev",
        "process_madvise",
        "process_mrelease",
        "getcpu",
        "uname",
        "sysinfo",
        "getrandom",
        "landlock_create_ruleset",
        "landlock_add_rule",
        "landlock_restrict_self",
        "lsm_get_self_attr",
        "lsm_list_modules",
        "sethostname",
        "setdomainname",
    ],
    // Scheduling.
    &[
        "sched_yield",
        "sched_setparam",
        "sched_getparam",
        "sched_setscheduler",
        "sched_getscheduler",
        "sched_get_priority_max",
        "sched_get_priority_min",
        "sched_rr_get_interval",
        "sched_rr_get_interval_time64",
        "sched_setaffinity",
        "sched_getaffinity",
        "sched_setattr",
        "sched_getattr",
        "getpriority",
        "setpriority",
        "ioprio_set",
        "ioprio_get",
    ],
    // User and group ids (the kernel checks CAP_SETUID/CAP_SETGID).
    &[
        "getuid",
        "getgid",
        "geteuid",
        "getegid",
        "setuid",
        "setgid",
        "setreuid",
        "setregid",
        "setresuid",
        "getresuid",
        "setresgid",
        "getresgid",
        "setfsuid",
        "setfsgid",
        "getgroups",
        "setgroups",
        "getuid32",
        "getgid32",
        "geteuid32",
        "getegid32",
        "setuid32",
        "setgid32",
        "setreuid32",
        "setregid32",
        "setresuid32",
        "getresuid32",
        "setresgid32",
        "getresgid32",
        "setfsuid32",
        "setfsgid32",
        "getgroups32",
        "setgroups32",
    ],
    // Clocks and timers (reading; adjtimex changes the clock only with CAP_SYS_TIME).
    &[
        "gettimeofday",
        "time",
        "clock_gettime",
        "clock_gettime64",
        "clock_getres",
        "clock_getres_time64",
        "clock_nanosleep",
        "clock_nanosleep_time64",
        "nanosleep",
        "timer_create",
        "timer_settime",
        "timer_settime64",
        "timer_gettime",
        "timer_gettime64",
        "timer_getoverrun",
        "timer_delete",
        "getitimer",
        "setitimer",
        "adjtimex",
        "clock_adjtime",
        "clock_adjtime64",
    ],
    // System V and POSIX IPC (namespaced).
    &[
        "shmget",
        "shmat",
        "shmctl",
        "shmdt",
        "semget",
        "semop",
        "semctl",
        "semtimedop",
        "semtimedop_time64",
        "msgget",
        "msgsnd",
        "msgrcv",
        "msgctl",
        "ipc",
        "mq_open",
        "mq_unlink",
        "mq_timedsend",
        "mq_timedsend_time64",
        "mq_timedreceive",
        "mq_timedreceive_time64",
        "mq_notify",
        "mq_getsetattr",
    ],
    // Sockets (`socket` is conditional, below).
    &[
        "socketpair",
        "connect",
        "accept",
        "accept4",
        "bind",
        "listen",
        "shutdown",
        "getsockname",
        "getpeername",
        "setsockopt",
        "getsockopt",
        "sendto",
        "recvfrom",
        "sendmsg",
        "recvmsg",
        "sendmmsg",
        "recvmmsg",
        "recvmmsg_time64",
        "socketcall",
    ],
    // Asynchronous I/O (not io_uring).
    &[
        "io_setup",
        "io_destroy",
        "io_getevents",
        "io_pgetevents",
        "io_pgetevents_time64",
        "io_submit",
        "io_cancel",
    ],
];

/// Calls allowed only to a container that holds the capability they are meant for.
pub const CAP_GATED: &[(Capability, &[&str])] = &[
    (
        Capability::SysAdmin,
        &[
            "mount",
            "umount",
            "umount2",
            "pivot_root",
            "fsopen",
            "fsconfig",
            "fsmount",
            "fspick",
            "move_mount",
            "open_tree",
            "mount_setattr",
            "unshare",
            "setns",
            "quotactl",
            "quotactl_fd",
            "fanotify_init",
            "fanotify_mark",
            "lookup_dcookie",
            "name_to_handle_at",
        ],
    ),
    (Capability::SysPtrace, &["kcmp"]),
    (
        Capability::SysModule,
        &["init_module", "finit_module", "delete_module"],
    ),
    (
        Capability::SysBoot,
        &["reboot", "kexec_load", "kexec_file_load"],
    ),
    (
        Capability::SysTime,
        &["settimeofday", "stime", "clock_settime", "clock_settime64"],
    ),
    (Capability::SysRawio, &["iopl", "ioperm"]),
    (Capability::SysPacct, &["acct"]),
    (Capability::SysNice, &["move_pages", "migrate_pages"]),
    (Capability::Syslog, &["syslog"]),
    (Capability::DacReadSearch, &["open_by_handle_at"]),
    (Capability::Bpf, &["bpf"]),
    (Capability::Perfmon, &["perf_event_open"]),
];

/// `CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER |
/// CLONE_NEWPID | CLONE_NEWNET` (and CLONE_NEWTIME's bit, 0x80, is in the low byte `clone`
/// uses for the exit signal, so it is refused through `unshare` instead).
const CLONE_NAMESPACES: u64 = 0x7e02_0000;

/// `personality` values programs ask for: PER_LINUX, UNAME26, ADDR_NO_RANDOMIZE, both, and the
/// query (0xffffffff).
const PERSONALITIES: [u64; 5] = [0x0, 0x8, 0x2_0000, 0x2_0008, 0xffff_ffff];

/// AF_VSOCK.
const AF_VSOCK: u64 = 40;

fn rule(names: &[&str], action: LinuxSeccompAction) -> LinuxSyscall {
    LinuxSyscallBuilder::default()
        .names(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .action(action)
        .build()
        .expect("a seccomp rule builds")
}

fn rule_if(
    name: &str,
    op: LinuxSeccompOperator,
    index: usize,
    value: u64,
    value_two: Option<u64>,
) -> LinuxSyscall {
    let mut arg = LinuxSeccompArgBuilder::default()
        .index(index)
        .value(value)
        .op(op);
    if let Some(v2) = value_two {
        arg = arg.value_two(v2);
    }
    let mut r = rule(&[name], LinuxSeccompAction::ScmpActAllow);
    r.set_args(Some(vec![arg.build().expect("a seccomp argument builds")]));
    r
}

/// The default profile for a container holding `caps` (see the module documentation).
pub fn default_profile(caps: &HashSet<Capability>) -> LinuxSeccomp {
    let mut allowed: Vec<&str> = ALLOWED.iter().flat_map(|g| g.iter().copied()).collect();
    let admin = caps.contains(&Capability::SysAdmin);
    for (cap, names) in CAP_GATED {
        if caps.contains(cap) {
            allowed.extend(names.iter().copied());
        }
    }
    let mut rules = vec![rule(&allowed, LinuxSeccompAction::ScmpActAllow)];
    if admin {
        rules.push(rule(&["clone"], LinuxSeccompAction::ScmpActAllow));
    } else {
        // Allowed when (flags & CLONE_NAMESPACES) == 0: runc's and libseccomp's order, the mask
        // in `value`, the expected bits in `valueTwo`.
        rules.push(rule_if(
            "clone",
            LinuxSeccompOperator::ScmpCmpMaskedEq,
            0,
            CLONE_NAMESPACES,
            Some(0),
        ));
    }
    for p in PERSONALITIES {
        rules.push(rule_if(
            "personality",
            LinuxSeccompOperator::ScmpCmpEq,
            0,
            p,
            None,
        ));
    }
    rules.push(rule_if(
        "socket",
        LinuxSeccompOperator::ScmpCmpNe,
        0,
        AF_VSOCK,
        None,
    ));
    let mut enosys = rule(&["clone3"], LinuxSeccompAction::ScmpActErrno);
    enosys.set_errno_ret(Some(libc::ENOSYS as u32));
    rules.push(enosys);
    LinuxSeccompBuilder::default()
        .default_action(LinuxSeccompAction::ScmpActErrno)
        .default_errno_ret(libc::EPERM as u32)
        .architectures(vec![
            Arch::ScmpArchX86_64,
            Arch::ScmpArchX86,
            Arch::ScmpArchX32,
        ])
        .syscalls(rules)
        .build()
        .expect("the default seccomp profile builds")
}

/// Largest profile file read.
const MAX_PROFILE: u64 = 1 << 20;

/// Reads a seccomp profile (`--security-opt seccomp=PATH`): an OCI `linux.seccomp` object, or
/// a Docker profile, whose `archMap` becomes the architectures and whose rules with
/// `includes`/`excludes` of capabilities apply as they would under Docker for `caps`.
pub fn load_profile(path: &Path, caps: &HashSet<Capability>) -> Result<LinuxSeccomp, Error> {
    let bad = |why: String| Error::invalid(&format!("seccomp profile {}", path.display()), &why);
    let mut text = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_PROFILE + 1).read_to_end(&mut text))
        .map_err(|source| Error::Io {
            what: format!("reading seccomp profile {}", path.display()),
            source,
        })?;
    if text.len() as u64 > MAX_PROFILE {
        return Err(bad(format!("larger than {MAX_PROFILE} bytes")));
    }
    let mut v: Value = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
    let obj = v
        .as_object_mut()
        .ok_or_else(|| bad("not a JSON object".into()))?;
    if let Some(map) = obj.remove("archMap") {
        let mut arches = Vec::new();
        for a in map.as_array().into_iter().flatten() {
            arches.extend(a.get("architecture").cloned());
            arches.extend(
                a.get("subArchitectures")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .cloned(),
            );
        }
        obj.entry("architectures").or_insert(Value::Array(arches));
    }
    obj.remove("defaultErrno");
    let has = |list: Option<&Value>| -> Vec<String> {
        list.and_then(|l| l.get("caps"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|c| c.as_str().map(str::to_owned))
            .collect()
    };
    let held = |name: &str| {
        serde_json::from_value::<Capability>(Value::String(name.to_owned()))
            .is_ok_and(|c| caps.contains(&c))
    };
    if let Some(rules) = obj.get_mut("syscalls").and_then(Value::as_array_mut) {
        rules.retain(|r| {
            has(r.get("includes")).iter().all(|c| held(c))
                && !has(r.get("excludes")).iter().any(|c| held(c))
        });
        for r in rules.iter_mut() {
            if let Some(r) = r.as_object_mut() {
                for key in ["includes", "excludes", "comment"] {
                    r.remove(key);
                }
                if let Some(name) = r.remove("name") {
                    r.entry("names").or_insert(Value::Array(vec![name]));
                }
            }
        }
    }
    serde_path_to_error::deserialize(v)
        .map_err(|e| bad(format!("field `{}`: {}", e.path(), e.inner())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(p: &LinuxSeccomp, action: LinuxSeccompAction) -> HashSet<String> {
        p.syscalls()
            .iter()
            .flatten()
            .filter(|r| r.action() == action && r.args().is_none())
            .flat_map(|r| r.names().clone())
            .collect()
    }

    #[test]
    fn the_default_refuses_the_dangerous_calls_and_allows_the_usual() {
        let p = default_profile(&HashSet::new());
        assert_eq!(p.default_action(), LinuxSeccompAction::ScmpActErrno);
        assert_eq!(p.default_errno_ret(), Some(libc::EPERM as u32));
        let allowed = names(&p, LinuxSeccompAction::ScmpActAllow);
        for denied in [
            "unshare",
            "setns",
            "mount",
            "umount2",
            "pivot_root",
            "fsopen",
            "open_tree",
            "keyctl",
            "add_key",
            "request_key",
            "bpf",
            "perf_event_open",
            "userfaultfd",
            "io_uring_setup",
            "init_module",
            "finit_module",
            "kexec_load",
            "reboot",
            "swapon",
            "acct",
            "open_by_handle_at",
            "name_to_handle_at",
            "kcmp",
            "iopl",
            "ioperm",
            "settimeofday",
            "clock_settime",
            "syslog",
            "modify_ldt",
            "clone",
            "clone3",
            "personality",
            "socket",
        ] {
            assert!(
                !allowed.contains(denied),
                "{denied} is allowed unconditionally"
            );
        }
        for usual in [
            "read",
            "openat",
            "execve",
            "futex",
            "mmap",
            "connect",
            "getrandom",
        ] {
            assert!(allowed.contains(usual), "{usual} is not allowed");
        }
        let enosys = p
            .syscalls()
            .iter()
            .flatten()
            .find(|r| r.names().contains(&"clone3".to_string()))
            .unwrap();
        assert_eq!(enosys.errno_ret(), Some(libc::ENOSYS as u32));
        // No name twice: a rule listed both allowed and gated would be ambiguous.
        let all: Vec<&str> = ALLOWED.iter().flat_map(|g| g.iter().copied()).collect();
        let unique: HashSet<&str> = all.iter().copied().collect();
        assert_eq!(all.len(), unique.len(), "a name is listed twice");
        for (_, gated) in CAP_GATED {
            for g in *gated {
                assert!(!unique.contains(g), "{g} is both allowed and gated");
            }
        }
    }

    #[test]
    fn capabilities_open_their_calls() {
        let admin: HashSet<_> = [Capability::SysAdmin].into();
        let p = default_profile(&admin);
        let allowed = names(&p, LinuxSeccompAction::ScmpActAllow);
        assert!(allowed.contains("mount") && allowed.contains("unshare"));
        assert!(
            allowed.contains("clone"),
            "CAP_SYS_ADMIN may clone namespaces"
        );
        assert!(!allowed.contains("bpf"));
    }

    #[test]
    fn docker_profiles_load_with_their_capability_conditions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.json");
        std::fs::write(
            &path,
            r#"{"defaultAction":"SCMP_ACT_ERRNO","defaultErrnoRet":1,
                "archMap":[{"architecture":"SCMP_ARCH_X86_64","subArchitectures":["SCMP_ARCH_X86"]}],
                "syscalls":[
                  {"names":["read","write"],"action":"SCMP_ACT_ALLOW"},
                  {"names":["mount"],"action":"SCMP_ACT_ALLOW","includes":{"caps":["CAP_SYS_ADMIN"]}},
                  {"names":["chroot"],"action":"SCMP_ACT_ALLOW","excludes":{"caps":["CAP_SYS_ADMIN"]},
                   "comment":"x"}
                ]}"#,
        )
        .unwrap();
        let p = load_profile(&path, &HashSet::new()).unwrap();
        let allowed = names(&p, LinuxSeccompAction::ScmpActAllow);
        assert!(allowed.contains("read") && allowed.contains("chroot"));
        assert!(!allowed.contains("mount"));
        assert_eq!(p.architectures().as_ref().unwrap().len(), 2);
        let p = load_profile(&path, &[Capability::SysAdmin].into()).unwrap();
        let allowed = names(&p, LinuxSeccompAction::ScmpActAllow);
        assert!(allowed.contains("mount") && !allowed.contains("chroot"));

        std::fs::write(&path, r#"{"defaultAction":"SCMP_ACT_BOGUS"}"#).unwrap();
        let e = load_profile(&path, &HashSet::new())
            .unwrap_err()
            .to_string();
        assert!(e.contains("defaultAction"), "{e}");
        std::fs::write(&path, "[]").unwrap();
        assert!(load_profile(&path, &HashSet::new()).is_err());
    }
}
