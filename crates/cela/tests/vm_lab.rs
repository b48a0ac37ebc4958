//! `cela run --vm` with the real Debian cloud kernel on cela's own KVM monitor, inside the
//! nested lab (QEMU TCG → L1 Linux with kvm-amd → cela). One L1 boot runs every scenario; each
//! test checks one of them. See docs/TESTING.md.

mod common;

use std::sync::OnceLock;
use std::time::Duration;

use cela_lab::{Lab, LabReport, LabRun, Scenario};
use common::{cela, guest_assets};

/// Every scenario: a name and the `cela run --vm` arguments after the fixed ones.
const SCENARIOS: &[(&str, &str)] = &[
    ("echo_exit7", "-- sh -c 'echo hi; exit 7'"),
    ("exit0", "-- true"),
    ("signal", "-- sh -c 'kill -9 $$'"),
    ("not_found", "-- no-such-command"),
    ("cpus2", "--cpus 2 -- nproc"),
    ("memory512", "--memory 512 -- grep MemTotal /proc/meminfo"),
    ("env", "-e GREETING=hello -- sh -c 'echo $GREETING'"),
    ("poweroff", "-- poweroff -f"),
    ("reboot", "-- reboot -f"),
    ("panic", "-- sh -c 'echo c > /proc/sysrq-trigger'"),
];

fn report() -> &'static LabReport {
    static REPORT: OnceLock<LabReport> = OnceLock::new();
    REPORT.get_or_init(|| {
        let assets = guest_assets();
        let lab = Lab::new().unwrap_or_else(|e| panic!("the nested lab is unavailable: {e}"));
        let mut run = LabRun::new()
            .file(cela(), "/lab/cela")
            .file(&assets.kernel, "/lab/bzImage")
            .file(&assets.initrd, "/lab/initrd.cpio");
        for (name, args) in SCENARIOS {
            let script = format!(
                "./cela run --vm --engine kvm --kernel /lab/bzImage --initrd /lab/initrd.cpio {args}"
            );
            run = run.scenario(Scenario::new(*name, script).with_timeout(Duration::from_secs(180)));
        }
        lab.run(&run).unwrap_or_else(|e| panic!("the lab run failed: {e}"))
    })
}

#[test]
fn output_and_exit_status_of_the_command() {
    let r = report().get("echo_exit7");
    r.expect_rc(7);
    assert_eq!(r.stdout_str(), "hi\n");
    report().get("exit0").expect_rc(0);
}

#[test]
fn a_command_killed_by_a_signal_gives_128_plus_n() {
    report().get("signal").expect_rc(137);
}

#[test]
fn an_unknown_command_gives_127() {
    let r = report().get("not_found");
    r.expect_rc(127);
    assert!(
        r.stdout_str().contains("no-such-command"),
        "{}",
        r.stdout_str()
    );
}

#[test]
fn the_guest_sees_the_vcpus_asked_for() {
    let r = report().get("cpus2");
    r.expect_rc(0);
    assert_eq!(r.stdout_str().trim(), "2");
}

#[test]
fn the_guest_sees_the_memory_asked_for() {
    let r = report().get("memory512");
    r.expect_rc(0);
    let kib: u64 = r
        .stdout_str()
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no MemTotal in {:?}", r.stdout_str()));
    let asked = 512 * 1024;
    assert!(
        kib <= asked && kib >= asked * 9 / 10,
        "MemTotal {kib} kB is not within 10% of 512 MiB"
    );
}

#[test]
fn environment_reaches_the_command() {
    let r = report().get("env");
    r.expect_rc(0);
    assert_eq!(r.stdout_str(), "hello\n");
}

#[test]
fn guest_poweroff_ends_the_vm() {
    let r = report().get("poweroff");
    r.expect_rc(0);
    assert!(r.stderr_str().contains("powered off"), "{}", r.stderr_str());
}

#[test]
fn guest_reboot_ends_the_vm() {
    let r = report().get("reboot");
    r.expect_rc(0);
    assert!(r.stderr_str().contains("rebooted"), "{}", r.stderr_str());
}

#[test]
fn guest_panic_ends_the_vm_with_a_clear_status() {
    let r = report().get("panic");
    r.expect_rc(125);
    assert!(r.stderr_str().contains("panicked"), "{}", r.stderr_str());
}
