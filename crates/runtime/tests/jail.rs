//! The jail profile (`cela-runc spec --jail`), checked from inside a real container: one test
//! per restriction, each expecting EPERM or the equivalent refusal (EROFS for read-only
//! filesystems). Needs root and cgroups.

mod common;

use common::*;

/// Runs `script` in a fresh jail and returns its status, stdout and stderr.
fn in_jail(name: &str, script: &str) -> (i32, String, String) {
    let f = Fixture::new(&format!("jail-{name}"));
    let id = f.id("c");
    let b = f.bundle(&id, true, &["sh", "-c", script], |_| {});
    let out = f.runc(&["run", "--bundle", b.to_str().unwrap(), &id]);
    f.assert_nothing_left(&id, None);
    (out.status.code().unwrap_or(-1), stdout(&out), stderr(&out))
}

/// Asserts that `cmd` fails inside the jail with a message containing `why`.
fn refused(name: &str, cmd: &str, why: &str) {
    let (code, out, err) = in_jail(name, &format!("{cmd}; echo status=$?"));
    assert_eq!(code, 0, "jail did not run: {err}");
    assert!(
        !out.contains("status=0"),
        "`{cmd}` succeeded in the jail: {out}{err}"
    );
    assert!(
        err.contains(why),
        "`{cmd}` failed, but not with {why:?}: {err}"
    );
}

#[test]
fn jail_cannot_change_sysctls() {
    refused(
        "sysctl",
        "sysctl -w kernel.domainname=x",
        "Read-only file system",
    );
    refused(
        "sysctl-net",
        "echo 1 > /proc/sys/net/ipv4/ip_forward",
        "Read-only file system",
    );
}

#[test]
fn jail_cannot_load_kernel_modules() {
    refused(
        "insmod",
        "head -c 4096 /dev/zero > /tmp/m.ko; insmod /tmp/m.ko",
        "Operation not permitted",
    );
}

#[test]
fn jail_cannot_remove_kernel_modules() {
    refused("rmmod", "rmmod loop", "Operation not permitted");
}

#[test]
fn jail_cannot_change_network_interfaces() {
    refused("iflink", "ip link set lo up", "Operation not permitted");
    refused(
        "ifaddr",
        "ip addr add 10.9.9.9/24 dev lo",
        "Operation not permitted",
    );
}

#[test]
fn jail_cannot_change_routes() {
    refused(
        "route",
        "ip route add 10.0.0.0/8 dev lo",
        "Operation not permitted",
    );
}

#[test]
fn jail_cannot_mount() {
    refused("mount", "mount -t tmpfs t /mnt", "permission denied");
}

#[test]
fn jail_cannot_unmount() {
    refused("umount", "umount /proc", "Operation not permitted");
}

#[test]
fn jail_cannot_create_device_nodes() {
    refused("mknod", "mknod /tmp/null c 1 3", "Operation not permitted");
}

#[test]
fn jail_cannot_change_its_hostname() {
    refused("sethostname", "hostname other", "Operation not permitted");
}

#[test]
fn jail_sees_only_its_own_processes() {
    let (code, out, err) = in_jail("procs", "ls /proc | grep -c '^[0-9]'; cat /proc/1/cmdline");
    assert_eq!(code, 0, "{err}");
    let mut lines = out.lines();
    let n: u32 = lines.next().unwrap().parse().unwrap();
    // sh, ls and grep (the command substitution's cat comes after).
    assert!(n <= 3, "the jail sees {n} processes: {out}");
    // pid 1 is the jail's own command (busybox sh execs the script's last command itself).
    let init = lines.next().unwrap_or_default();
    assert!(
        init.contains("/proc/1/cmdline"),
        "pid 1 is not the jail's init: {out:?}"
    );
}

#[test]
fn jail_has_its_own_hostname() {
    let (code, out, err) = in_jail("hostname", "hostname");
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), cela_runtime::spec::JAIL_HOSTNAME);
}

#[test]
fn jail_network_namespace_has_only_loopback() {
    let (code, out, err) = in_jail("net", "ls /sys/class/net; cat /proc/net/route | wc -l");
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[..lines.len() - 1], ["lo"], "interfaces: {out}");
    let route_lines: u32 = lines.last().unwrap().parse().unwrap();
    assert!(route_lines <= 1, "the jail has routes: {out}");
}

#[test]
fn jail_root_is_read_only_and_tmp_writable() {
    refused("rootro", "touch /etc/x", "Read-only file system");
    let (code, out, err) = in_jail("tmp", "echo hi > /tmp/f && cat /tmp/f");
    assert_eq!((code, out.as_str()), (0, "hi\n"), "{err}");
}

#[test]
fn jail_root_is_an_unprivileged_host_uid() {
    let f = Fixture::new("jail-uid");
    let id = f.id("c");
    let b = f.bundle(&id, true, &["sleep", "1000"], |_| {});
    let pid = f.start_detached(&id, &b);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    let host = cela_runtime::spec::JAIL_HOST_ID.to_string();
    assert!(
        uid_line.split_whitespace().skip(1).all(|u| u == host),
        "{uid_line}"
    );
    let map = std::fs::read_to_string(format!("/proc/{pid}/uid_map")).unwrap();
    assert_eq!(
        map.split_whitespace().collect::<Vec<_>>(),
        ["0", host.as_str(), "65536"]
    );
    let out = f.ok(&["exec", &id, "id", "-u"]);
    assert_eq!(stdout(&out).trim(), "0");
    f.ok(&["delete", "--force", &id]);
    f.assert_nothing_left(&id, Some(pid));
}

#[test]
fn jail_has_pids_and_memory_limits() {
    let f = Fixture::new("jail-lim");
    let id = f.id("c");
    let b = f.bundle(&id, true, &["sleep", "1000"], |_| {});
    let pid = f.start_detached(&id, &b);
    let pids = f.cgroup_file(&id, "pids", "pids.max");
    assert_eq!(pids.trim(), cela_runtime::spec::JAIL_PIDS.to_string());
    let mem = f.cgroup_file(&id, "memory", "memory.limit_in_bytes");
    assert_eq!(
        mem.trim(),
        cela_runtime::spec::JAIL_MEMORY_BYTES.to_string()
    );
    f.ok(&["delete", "--force", &id]);
    f.assert_nothing_left(&id, Some(pid));
}
