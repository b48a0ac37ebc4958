//! The lab's self-test: one real nested boot (QEMU TCG → Debian L1 kernel with kvm-amd) running
//! scenarios that exercise every part of the fixture: /dev/kvm, exit statuses, byte-exact
//! stdout/stderr, files and directories copied in, a dynamically linked host program, the
//! in-L1 timeout, and cleanup between scenarios.
//!
//! It needs qemu-system-x86_64 and apt (to fetch the L1 kernel on first use); without them it
//! fails, saying what is missing. It never passes without booting.

use std::fs;
use std::time::Duration;

use cela_lab::{Lab, LabRun, Scenario};

fn lab() -> Lab {
    Lab::new().unwrap_or_else(|e| panic!("the nested lab cannot be set up: {e}"))
}

/// Bytes no text framing would survive: every byte value, CR/LF runs, and our own marker.
fn awkward_bytes() -> Vec<u8> {
    let mut data: Vec<u8> = (0..=255u8).collect();
    data.extend_from_slice(b"\r\n\r\n@@LAB 0 end 0 0 0 0 0\n\n\x00\x00");
    data.extend((0..5000u32).map(|i| (i * 7 % 251) as u8));
    data
}

#[test]
fn nested_lab_runs_scenarios_in_one_boot() {
    let lab = lab();
    let dir = tempfile::tempdir().unwrap();
    let data = awkward_bytes();
    fs::write(dir.path().join("data.bin"), &data).unwrap();
    let tree = dir.path().join("tree");
    fs::create_dir_all(tree.join("sub/deeper")).unwrap();
    fs::write(tree.join("top.txt"), "top\n").unwrap();
    fs::write(tree.join("sub/deeper/leaf.txt"), "leaf\n").unwrap();

    let run = LabRun::new()
        .file(dir.path().join("data.bin"), "/lab/data.bin")
        .file(&tree, "/opt/tree")
        // A dynamically linked host program: it runs in L1 only if its libraries and the
        // loader came along.
        .file("/usr/bin/basename", "/lab/host-basename")
        .scenario(Scenario::new("kvm", "ls -l /dev/kvm"))
        .scenario(Scenario::new("exit3", "exit 3"))
        .scenario(Scenario::new(
            "bytes",
            "cat data.bin; printf 'to stderr\\n\\001\\377' >&2",
        ))
        .scenario(Scenario::new(
            "tree",
            "cd /opt/tree && find . | sort && cat sub/deeper/leaf.txt",
        ))
        .scenario(Scenario::new("dynamic", "./host-basename /a/b/c.txt .txt"))
        .scenario(
            Scenario::new("timeout", "sleep 60 & echo started; sleep 60; echo never")
                .with_timeout(Duration::from_secs(2)),
        )
        .scenario(Scenario::new(
            "after-timeout",
            "ps | grep -c '[s]leep 60' || true",
        ));
    let report = lab
        .run(&run)
        .unwrap_or_else(|e| panic!("lab run failed: {e}"));
    eprintln!(
        "lab wall {:.2} s, L1 /init at {:.2} s, ready at {:.2} s",
        report.wall.as_secs_f64(),
        report.l1_init_seconds,
        report.l1_ready_seconds
    );

    let kvm = report.get("kvm").expect_rc(0);
    assert!(
        kvm.stdout_str().contains("/dev/kvm"),
        "{}",
        kvm.stdout_str()
    );
    assert!(
        kvm.stdout_str().starts_with('c'),
        "a character device: {}",
        kvm.stdout_str()
    );

    let exit3 = report.get("exit3").expect_rc(3);
    assert!(!exit3.timed_out);
    assert!(exit3.stdout.is_empty() && exit3.stderr.is_empty());

    let bytes = report.get("bytes").expect_rc(0);
    assert!(
        bytes.stdout == data,
        "stdout differs from data.bin ({} vs {} bytes)",
        bytes.stdout.len(),
        data.len()
    );
    assert_eq!(bytes.stderr, b"to stderr\n\x01\xff");

    let tree = report.get("tree").expect_rc(0);
    assert_eq!(
        tree.stdout_str(),
        ".\n./sub\n./sub/deeper\n./sub/deeper/leaf.txt\n./top.txt\nleaf\n"
    );

    assert_eq!(report.get("dynamic").expect_rc(0).stdout_str(), "c\n");

    let timeout = report.get("timeout");
    assert_eq!(
        timeout.rc, 143,
        "busybox timeout ends the script with SIGTERM"
    );
    assert!(timeout.timed_out);
    assert_eq!(timeout.stdout_str(), "started\n");
    assert!(
        (2.0..10.0).contains(&timeout.l1_seconds),
        "{}",
        timeout.l1_seconds
    );

    // The timed-out scenario's background sleep was killed with its process group.
    assert_eq!(report.get("after-timeout").expect_rc(0).stdout_str(), "0\n");

    assert!(report.console.contains("@@LAB done"));
    assert!(report.l1_init_seconds > 0.0 && report.l1_ready_seconds >= report.l1_init_seconds);
}

#[test]
fn an_l1_crash_is_an_error_naming_the_scenario_with_the_console() {
    let lab = lab();
    // A kernel crash in L1: panic=-1 and -no-reboot make QEMU exit at once, and the error must
    // say which scenario was running and show the panic, not wait for the timeout.
    let run = LabRun::new()
        .scenario(Scenario::new("fine", "true"))
        .scenario(Scenario::new(
            "crash",
            "echo c > /proc/sysrq-trigger; sleep 60",
        ));
    let err = lab.run(&run).expect_err("a crashed L1 has no results");
    let text = err.to_string();
    assert!(
        matches!(err, cela_lab::LabError::Exited { .. }),
        "expected Exited, got: {text}"
    );
    assert!(text.contains("during scenario \"crash\""), "{text}");
    assert!(
        text.contains("sysrq"),
        "the console tail shows the crash: {text}"
    );
}

#[test]
fn a_frozen_l1_is_reported_with_what_its_vcpus_were_doing() {
    let lab = lab();
    // Every process of L1 but its init and the scenario stops, the heartbeat with them: the
    // console goes silent as when L1 froze, and the error must say so and carry QEMU's view
    // of L1's vCPUs (asked through QMP before QEMU is killed), where the cause of a real
    // freeze would show.
    let run = LabRun::new().scenario(Scenario::new("silence", "kill -STOP -1; sleep 600"));
    let err = lab.run(&run).expect_err("a silent L1 has no results");
    let text = err.to_string();
    assert!(
        matches!(err, cela_lab::LabError::Frozen { .. }),
        "expected Frozen, got: {text}"
    );
    assert!(text.contains("during scenario \"silence\""), "{text}");
    assert!(text.contains("(qemu) info cpus"), "{text}");
    assert!(text.contains("CPU #0"), "no vCPU list: {text}");
    assert!(text.contains("RIP="), "no registers: {text}");
}
