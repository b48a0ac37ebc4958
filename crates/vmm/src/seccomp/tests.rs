//! The filters on real threads of the monitor. A forbidden call (`openat` of /etc/shadow) is
//! made on each kind of thread in a child process (this test binary, run again for the one
//! ignored test [`child`]), which must end with status 159 and the one-line report. A tiny
//! guest shows its vCPU thread filtered while the rest of the process is not; the tiny-guest
//! integration tests and the lab's Linux guests run every device under the filters.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::builder::{SerialSinks, boot_bare};
use crate::stop::{StopReason, StopSignal};

const CHILD: &str = "CELA_TEST_SECCOMP_CHILD";
const VIOLATE: &str = "CELA_TEST_SECCOMP_VIOLATE";

fn name(kind: ThreadKind) -> &'static str {
    match kind {
        ThreadKind::Vcpu => "vcpu",
        ThreadKind::Device => "device",
        ThreadKind::Console => "console",
        ThreadKind::Main => "main",
        ThreadKind::Control => "control",
    }
}

/// Called by [`Filters::apply`] in test builds only, once the thread is filtered: the
/// forbidden call, if this process was asked to make it on this kind of thread.
pub(super) fn violate_if_asked(kind: ThreadKind) {
    if std::env::var(VIOLATE).ok().as_deref() == Some(name(kind)) {
        // SAFETY: openat(2) with a NUL-terminated path; a descriptor it might return is leaked
        // in a child process about to end.
        unsafe {
            libc::syscall(
                libc::SYS_openat,
                libc::AT_FDCWD,
                c"/etc/shadow".as_ptr(),
                libc::O_RDONLY,
            )
        };
    }
}

fn require_kvm() {
    if let Err(e) = crate::vstate::vm::open_kvm() {
        panic!("this test runs a tiny guest on /dev/kvm, which is unusable here: {e}");
    }
}

/// A guest that spins (`jmp $`) until it is stopped.
fn spinning_guest(filters: Option<Filters>) -> crate::builder::RunningMachine {
    require_kvm();
    let sinks = SerialSinks {
        console: Box::new(std::io::sink()),
        control: Box::new(std::io::sink()),
    };
    let stop = Arc::new(StopSignal::new());
    boot_bare(&[0xeb, 0xfe], 0x10000, 1, vec![], sinks, stop, filters)
        .expect("the bare machine builds")
}

/// The child's side of [`a_forbidden_call_on_each_thread_kind_ends_the_monitor_with_a_report`]:
/// starts a thread of the kind `CELA_TEST_SECCOMP_VIOLATE` names under its filter. Run only by
/// that test (ignored otherwise).
#[test]
#[ignore = "the child process of a_forbidden_call_on_each_thread_kind_ends_the_monitor_with_a_report"]
fn child() {
    assert!(
        std::env::var_os(CHILD).is_some(),
        "run by the parent test only"
    );
    let filters = Filters::new().unwrap();
    let _keep = match std::env::var(VIOLATE).unwrap().as_str() {
        "vcpu" => Some(spinning_guest(Some(filters))),
        "device" => {
            std::mem::forget(
                crate::devices::virtio::event_loop::EventLoop::new()
                    .start(Some(filters))
                    .unwrap(),
            );
            None
        }
        "console" => {
            let stop = Arc::new(StopSignal::new());
            crate::console::spawn_stdin_forwarder(
                stop,
                Some(filters),
                crate::ConsoleMode::Interactive,
                |_| Ok(()),
            );
            None
        }
        "control" => {
            std::thread::spawn(move || confine_thread(Some(&filters), ThreadKind::Control));
            None
        }
        other => panic!("unknown thread kind {other}"),
    };
    // The filtered thread ends this process; if it does not, the parent sees status 0.
    std::thread::park_timeout(Duration::from_secs(20));
}

#[test]
fn a_forbidden_call_on_each_thread_kind_ends_the_monitor_with_a_report() {
    for kind in [
        ThreadKind::Vcpu,
        ThreadKind::Device,
        ThreadKind::Console,
        ThreadKind::Control,
    ] {
        let out = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "seccomp::tests::child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD, "1")
            .env(VIOLATE, name(kind))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(KILLED_STATUS),
            "{}: {err}",
            name(kind)
        );
        let want = format!(
            "cela: error: the monitor was killed by its seccomp filter: syscall openat (257) on {}\n",
            kind.describe()
        );
        assert!(
            err.contains(&want),
            "{}: wanted {want:?} in:\n{err}",
            name(kind)
        );
    }
}

#[test]
fn the_vcpu_thread_is_filtered_and_the_rest_of_the_process_is_not() {
    let mut machine = spinning_guest(Some(Filters::new().unwrap()));
    let status_of = |comm: &str| -> Option<String> {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .flatten()
            .find(|t| {
                std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == comm)
            })
            .map(|t| std::fs::read_to_string(t.path().join("status")).unwrap())
    };
    // The vCPU filters itself as it starts: wait (bounded) for that.
    let start = std::time::Instant::now();
    let vcpu = loop {
        if let Some(s) = status_of("vcpu0").filter(|s| s.contains("Seccomp:\t2")) {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "vcpu0 never showed a filter: {:?}",
            status_of("vcpu0")
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(vcpu.contains("NoNewPrivs:\t1"), "{vcpu}");
    let me = std::fs::read_to_string("/proc/thread-self/status").unwrap();
    assert!(me.contains("Seccomp:\t0"), "{me}");
    // Stopping it kicks the vCPU out of KVM_RUN with a signal: allowed by its filter.
    machine
        .stop_signal()
        .request(StopReason::Fault("stopped by the test".into()));
    let reason = machine.wait(Some(Duration::from_secs(10)));
    assert_eq!(reason, StopReason::Fault("stopped by the test".into()));
}

#[test]
fn the_report_is_formatted_without_allocating() {
    let mut m = Message::default();
    m.push(b"n=");
    m.push_number(0);
    m.push(b",");
    m.push_number(-257);
    m.push(b",");
    m.push_number(i64::MAX);
    assert_eq!(&m.buf[..m.len], b"n=0,-257,9223372036854775807");
    let long = [b'x'; 300];
    m.push(&long);
    assert_eq!(m.len, 256, "the buffer never overflows");
}

#[test]
fn the_device_thread_starts_threads_but_clone3_answers_enosys() {
    // On a thread of its own: the filter stays with it (and the threads it starts).
    let filters = Filters::new().unwrap();
    let outcome = std::thread::spawn(move || {
        filters.apply(ThreadKind::Device).unwrap();
        // SAFETY: clone3 with no arguments; the filter answers before the kernel reads them.
        let r = unsafe { libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0usize) };
        let errno = std::io::Error::last_os_error().raw_os_error();
        // The C library falls back to clone with pthread's flags, which the filter allows.
        let joined = std::thread::spawn(|| 42).join().unwrap();
        (r, errno, joined)
    })
    .join()
    .unwrap();
    assert_eq!(outcome, (-1, Some(libc::ENOSYS), 42));
}

#[test]
fn a_read_only_open_as_glibc_makes_gets_enoent_on_every_thread_kind() {
    // glibc's allocator opens /proc/sys/vm/overcommit_memory this way from any thread; the
    // file exists, so ENOENT shows the stacked filter answered and nothing was opened.
    for kind in [
        ThreadKind::Vcpu,
        ThreadKind::Device,
        ThreadKind::Console,
        ThreadKind::Main,
        ThreadKind::Control,
    ] {
        let filters = Filters::new().unwrap();
        let outcome = std::thread::spawn(move || {
            filters.apply(kind).unwrap();
            // SAFETY: openat(2) with a NUL-terminated path; a descriptor is not expected.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_openat,
                    libc::AT_FDCWD,
                    c"/proc/sys/vm/overcommit_memory".as_ptr(),
                    libc::O_RDONLY | libc::O_CLOEXEC,
                )
            };
            (r, std::io::Error::last_os_error().raw_os_error())
        })
        .join()
        .unwrap();
        assert_eq!(outcome, (-1, Some(libc::ENOENT)), "{}", name(kind));
    }
}

#[test]
fn the_control_thread_may_pass_the_guest_its_names() {
    use std::io::Read as _;
    // What a `hosts` request does on the control thread: send on the init's control socket.
    let stop = Arc::new(StopSignal::new());
    let (ours, mut guest) = std::os::unix::net::UnixStream::pair().unwrap();
    stop.attach_guest_channel(ours);
    let filters = Filters::new().unwrap();
    let s = stop.clone();
    let sent = std::thread::spawn(move || {
        filters.apply(ThreadKind::Control).unwrap();
        let (block, _) = cela_guest::HostRequest::hosts_block(&[(
            std::net::Ipv4Addr::new(10, 0, 0, 2),
            "web".to_owned(),
        )]);
        s.send_when_attached(block)
    })
    .join()
    .unwrap();
    assert!(sent);
    stop.detach_guest_channel();
    let mut got = String::new();
    guest.read_to_string(&mut got).unwrap();
    assert_eq!(got, "hosts-begin\nhost 10.0.0.2 web\nhosts-end\n");
}
