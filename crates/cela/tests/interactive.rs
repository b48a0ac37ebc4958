//! Interactive instances, typed into as a user would: `cela run -i` with piped stdin (EOF
//! passed on), `cela run -it` on a pseudo-terminal this test holds the master of (a shell
//! typed into, `stty size` after a resize, the exit status), the detach keys and `cela attach`
//! back; and the same through `cela serve` with the Docker 28 CLI (`docker run -i` with
//! piped stdin, the half-close ending it; `docker run -it` on a terminal). As root.

mod images;
mod world;

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use world::World;

/// A pseudo-terminal whose slave is a child's stdin, stdout and stderr.
struct Pty {
    master: std::fs::File,
    /// The child's side, kept to read back the modes it leaves the terminal in.
    slave: OwnedFd,
    child: Child,
    seen: Vec<u8>,
}

nix::ioctl_write_ptr_bad!(tiocswinsz, libc::TIOCSWINSZ, libc::winsize);

impl Pty {
    fn spawn(cmd: &mut Command, rows: u16, cols: u16) -> Pty {
        let pty = nix::pty::openpty(None, None).unwrap();
        let size = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize, which lives for the call.
        unsafe { tiocswinsz(pty.master.as_raw_fd(), &size) }.unwrap();
        let slave: OwnedFd = pty.slave;
        let child = cmd
            .stdin(Stdio::from(slave.try_clone().unwrap()))
            .stdout(Stdio::from(slave.try_clone().unwrap()))
            .stderr(Stdio::from(slave.try_clone().unwrap()))
            .spawn()
            .unwrap();
        nix::fcntl::fcntl(
            pty.master.as_fd(),
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )
        .unwrap();
        Pty {
            master: std::fs::File::from(pty.master),
            slave,
            child,
            seen: Vec::new(),
        }
    }

    fn resize(&self, rows: u16, cols: u16) {
        let size = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: as above.
        unsafe { tiocswinsz(self.master.as_raw_fd(), &size) }.unwrap();
        // The child has no controlling terminal: tell it as the kernel would.
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGWINCH,
        )
        .unwrap();
    }

    /// Whether the terminal is cooked (line editing and echo on), as a user's shell needs it.
    fn cooked(&self) -> bool {
        use nix::sys::termios::LocalFlags;
        let t = nix::sys::termios::tcgetattr(&self.slave).unwrap();
        t.local_flags
            .contains(LocalFlags::ICANON | LocalFlags::ECHO | LocalFlags::ISIG)
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig).unwrap();
    }

    fn type_in(&mut self, s: &str) {
        self.master.write_all(s.as_bytes()).unwrap();
    }

    /// Reads until `needle` has been seen (bounded), keeping everything read.
    fn expect(&mut self, needle: &str) {
        let start = Instant::now();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&self.seen).contains(needle) {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "never saw {needle:?}; the terminal showed {:?}",
                String::from_utf8_lossy(&self.seen)
            );
            match self.master.read(&mut buf) {
                Ok(n) if n > 0 => self.seen.extend_from_slice(&buf[..n]),
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// Waits (bounded) for the child's exit code, draining the terminal meanwhile.
    fn exit_code(&mut self) -> Option<i32> {
        let start = Instant::now();
        let mut buf = [0u8; 4096];
        loop {
            if let Ok(n @ 1..) = self.master.read(&mut buf) {
                self.seen.extend_from_slice(&buf[..n]);
                continue;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "the command did not end; the terminal showed {:?}",
                String::from_utf8_lossy(&self.seen)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A child killed when the test ends, however it ends (a server left running would keep
/// the test harness's output pipe open).
struct KillOnDrop(Child);

impl KillOnDrop {
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.kill();
    }
}

fn cela_cmd(w: &World, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cela"));
    c.arg("--data-dir").arg(w.data()).args(args);
    c.env(images::DEFAULT_NETWORK.0, images::DEFAULT_NETWORK.1);
    c
}

/// Runs `cmd` with `input` on a pipe as its stdin: its status and stdout.
fn with_input(cmd: &mut Command, input: &str) -> (Option<i32>, String, String) {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn run_i_passes_stdin_and_its_end() {
    let w = World::new();
    let (code, out, err) = with_input(
        &mut cela_cmd(
            &w,
            &[
                "run",
                "-i",
                "--rm",
                "testimg",
                "sh",
                "-c",
                "cat; echo done; exit 4",
            ],
        ),
        "line one\nline two\n",
    );
    assert_eq!(code, Some(4), "{err}");
    assert_eq!(out, "line one\nline two\ndone\n");
    assert_eq!(w.ok(&["ps", "-a", "--format", "json"]).trim(), "[]");
    // Without -i the workload's stdin is empty, as before.
    let (code, out, _) = with_input(
        &mut cela_cmd(&w, &["run", "--rm", "testimg", "sh", "-c", "cat; echo end"]),
        "ignored\n",
    );
    assert_eq!((code, out.as_str()), (Some(0), "end\n"));
}

#[test]
fn run_it_is_a_terminal_that_resizes_detaches_and_attaches_again() {
    let w = World::new();
    let mut t = Pty::spawn(
        &mut cela_cmd(&w, &["run", "-it", "--name", "term", "testimg", "sh"]),
        30,
        100,
    );
    t.type_in("stty size; tty\n");
    t.expect("30 100");
    t.expect("/dev/pts/");
    t.resize(40, 120);
    // The resize travels as a signal and a frame; ask until the shell sees it.
    let start = Instant::now();
    loop {
        t.type_in("stty size\n");
        std::thread::sleep(Duration::from_millis(100));
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = t.master.read(&mut buf) {
            t.seen.extend_from_slice(&buf[..n]);
        }
        if String::from_utf8_lossy(&t.seen).contains("40 120") {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "no resize");
    }
    assert!(!t.cooked(), "the session's terminal is raw");
    // Ctrl-P Ctrl-Q: cela returns, the shell runs on, the terminal is as it was.
    t.type_in("\x10\x11");
    assert_eq!(t.exit_code(), Some(0));
    assert!(String::from_utf8_lossy(&t.seen).contains("detached from term"));
    assert!(t.cooked(), "a detach restores the terminal");
    assert_eq!(w.status("term"), "running");

    // A hang-up (the terminal went away) detaches too, and restores it.
    let mut t = Pty::spawn(&mut cela_cmd(&w, &["attach", "term"]), 30, 100);
    t.type_in("echo back-$((40+2))\n");
    t.expect("back-42");
    t.signal(nix::sys::signal::Signal::SIGHUP);
    assert_eq!(t.exit_code(), Some(0));
    assert!(t.cooked(), "SIGHUP restores the terminal");
    assert_eq!(w.status("term"), "running");

    // SIGTERM stops the instance (its shell's trap, run once `wait` is interrupted, gives
    // the status) and restores the terminal.
    let mut t = Pty::spawn(&mut cela_cmd(&w, &["attach", "term"]), 30, 100);
    t.type_in("trap 'exit 9' TERM; echo trap-$((1+1)); sleep 600 & wait\n");
    t.expect("trap-2");
    assert!(!t.cooked());
    t.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(t.exit_code(), Some(9));
    assert!(t.cooked(), "SIGTERM restores the terminal");
    w.wait_status("term", "exited");

    // Attached again after a restart, the shell's own exit status comes back.
    w.ok(&["start", "term"]);
    let mut t = Pty::spawn(&mut cela_cmd(&w, &["attach", "term"]), 30, 100);
    t.type_in("echo back-$((40+3)); exit 5\n");
    t.expect("back-43");
    assert_eq!(t.exit_code(), Some(5));
    assert!(t.cooked());
    w.wait_status("term", "exited");
    w.ok(&["rm", "term"]);
}

impl Pty {
    /// Types `command` until the terminal shows `needle` (bounded): for what may be lost or
    /// late, such as keys typed while a guest boots or a size on its way.
    fn ask_until(&mut self, command: &str, needle: &str) {
        let start = Instant::now();
        let mut buf = [0u8; 4096];
        loop {
            self.type_in(command);
            let asked = Instant::now();
            while asked.elapsed() < Duration::from_millis(500) {
                match self.master.read(&mut buf) {
                    Ok(n @ 1..) => self.seen.extend_from_slice(&buf[..n]),
                    _ => std::thread::sleep(Duration::from_millis(20)),
                }
                if String::from_utf8_lossy(&self.seen).contains(needle) {
                    return;
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "never saw {needle:?}; the terminal showed {:?}",
                String::from_utf8_lossy(&self.seen)
            );
        }
    }
}

/// `cela run --vm -it`: the workload on the guest's console as its terminal, sized from the
/// host's through cela-init's control channel, typed into, resized, and its status back. The
/// QEMU fallback here (COM2 carries the sizes); the nested lab runs the KVM engine (vsock).
#[test]
fn run_vm_it_puts_the_workload_on_the_guest_console() {
    let w = World::new();
    let mut t = Pty::spawn(
        &mut cela_cmd(
            &w,
            &[
                "run", "--vm", "-it", "--rm", "--name", "vmterm", "testimg", "sh",
            ],
        ),
        30,
        100,
    );
    t.ask_until("stty size; tty\n", "30 100");
    t.expect("/dev/ttyS0");
    assert!(!t.cooked(), "the session's terminal is raw");
    t.resize(40, 120);
    t.ask_until("stty size\n", "40 120");
    t.type_in("echo vm-$((40+2)); exit 3\n");
    t.expect("vm-42");
    assert_eq!(t.exit_code(), Some(3));
    assert!(t.cooked(), "the terminal is restored");
    assert_eq!(w.ok(&["ps", "-a", "--format", "json"]).trim(), "[]");
    // -i alone has no console to pass input on: refused, naming what to do.
    let out = cela_cmd(&w, &["run", "--vm", "-i", "--rm", "testimg", "cat"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("-t"), "{err}");
}

/// A snapshot of a VM run with `-it`, restored in the foreground: this terminal is the copy's
/// console again (typed into, its exit code returned), and without a terminal the restore is
/// refused before anything is made.
#[test]
fn a_snapshot_of_a_vm_run_it_restores_onto_this_terminal() {
    let w = World::new();
    w.ok(&[
        "run", "-d", "-i", "-t", "--vm", "--name", "vsrc", "testimg", "sh",
    ]);
    let start = Instant::now();
    while !w.ok(&["logs", "vsrc"]).contains("# ") {
        assert!(start.elapsed() < Duration::from_secs(120), "no prompt");
        std::thread::sleep(Duration::from_millis(100));
    }
    w.ok(&["snapshot", "--name", "vsnap", "vsrc"]);
    let out = cela_cmd(&w, &["restore", "--name", "vnope", "vsnap"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs a terminal"), "{err}");
    let mut t = Pty::spawn(
        &mut cela_cmd(&w, &["restore", "--rm", "--name", "vcopy", "vsnap"]),
        30,
        100,
    );
    t.ask_until(
        "echo restored-$((6*7)) on $(hostname)\n",
        "restored-42 on vcopy",
    );
    t.type_in("exit 5\n");
    assert_eq!(t.exit_code(), Some(5));
    assert!(t.cooked(), "the terminal is restored");
    w.ok(&["rm", "vsrc"]);
    w.ok(&["snapshot", "rm", "vsnap"]);
    assert_eq!(w.ok(&["ps", "-a", "--format", "json"]).trim(), "[]");
}

#[test]
fn docker_run_i_and_it_through_cela_serve() {
    let w = World::new();
    let dir = tempfile::Builder::new()
        .prefix("cela-api-")
        .tempdir()
        .unwrap();
    let sock = dir.path().join("docker.sock");
    let mut server = KillOnDrop(
        cela_cmd(
            &w,
            &[
                "serve",
                "--socket",
                dir.path().join("api.sock").to_str().unwrap(),
                "--docker-socket",
                sock.to_str().unwrap(),
            ],
        )
        .stdin(Stdio::null())
        .spawn()
        .unwrap(),
    );
    let start = Instant::now();
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "cela serve did not listen"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let docker = |bin: &str, args: &[&str]| {
        let mut c = Command::new("timeout");
        c.arg("120")
            .arg(bin)
            .args(args)
            .env("DOCKER_HOST", format!("unix://{}", sock.display()))
            .env("DOCKER_CONFIG", dir.path().join("docker-config"));
        c
    };
    // Piped stdin: the client's half-close at its end becomes the workload's end of stdin.
    for bin in ["/usr/local/bin/docker", "/usr/bin/docker"] {
        let (code, out, err) = with_input(
            &mut docker(
                bin,
                &["run", "-i", "--rm", "testimg", "sh", "-c", "cat; exit 6"],
            ),
            "through docker\n",
        );
        assert_eq!(code, Some(6), "{bin}: {err}");
        assert_eq!(out, "through docker\n", "{bin}");
    }
    let mut t = Pty::spawn(
        &mut docker(
            "/usr/local/bin/docker",
            &["run", "-it", "--rm", "testimg", "sh"],
        ),
        33,
        90,
    );
    t.type_in("stty size; exit 3\n");
    t.expect("33 90");
    assert_eq!(t.exit_code(), Some(3));
    // The same as a microVM: the guest's console, sized by the client's resize call.
    let mut t = Pty::spawn(
        &mut docker(
            "/usr/local/bin/docker",
            &["run", "-it", "--rm", "--runtime", "vm", "testimg", "sh"],
        ),
        33,
        90,
    );
    t.ask_until("stty size; tty\n", "33 90");
    t.expect("/dev/ttyS0");
    t.type_in("exit 5\n");
    assert_eq!(t.exit_code(), Some(5));
    // docker exec -it into a running container: a terminal of the container's own.
    let bg = docker(
        "/usr/local/bin/docker",
        &["run", "-d", "--name", "bg", "testimg", "sleep", "60"],
    )
    .output()
    .unwrap();
    assert!(
        bg.status.success(),
        "{}",
        String::from_utf8_lossy(&bg.stderr)
    );
    let mut t = Pty::spawn(
        &mut docker("/usr/local/bin/docker", &["exec", "-it", "bg", "sh"]),
        25,
        70,
    );
    t.type_in("stty size; tty; exit 7\n");
    t.expect("25 70");
    t.expect("/dev/pts/");
    assert_eq!(t.exit_code(), Some(7));
    let rm = docker("/usr/local/bin/docker", &["rm", "-f", "bg"])
        .output()
        .unwrap();
    assert!(rm.status.success());
    server.kill();
    assert_eq!(w.ok(&["ps", "-a", "--format", "json"]).trim(), "[]");
}
