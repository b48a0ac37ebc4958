//! Starting the L1 guest under QEMU and reading its console, with a wall-clock bound.
//!
//! The QEMU flags and the L1 kernel command line live here and nowhere else, each with the reason
//! it is there. QEMU's stdin is /dev/null, its stdout (the L1 serial console, through
//! `-nographic`) is a pipe read by a thread that hands chunks to the caller; the caller waits on
//! that channel with a deadline, so a hung guest costs at most the run's timeout. QEMU is killed
//! when the run ends in any way other than its own exit, including a panic that unwinds through
//! [`Qemu`]'s `Drop`, and (through `PR_SET_PDEATHSIG`) when the process that started it dies.

use std::io::{self, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::error::LabError;

/// The L1 kernel command line, word by word, with the reason for each word. [`l1_cmdline`]
/// appends `tsc_early_khz=<the host's TSC rate>`: `src/tsc.rs` says why it is needed and
/// why it must be the host's rate rather than a constant.
pub const L1_CMDLINE: &[(&str, &str)] = &[
    (
        "console=ttyS0",
        "the microvm machine's one UART; -nographic connects it to QEMU's stdout, our pipe",
    ),
    (
        "reboot=k",
        "reboot through the keyboard controller (falling back to a triple fault) rather than \
         ACPI; any reset ends QEMU because of -no-reboot",
    ),
    (
        "panic=-1",
        "on a panic, reboot at once instead of hanging: QEMU exits (-no-reboot) and the host \
         sees the panic in the console tail without waiting for the timeout",
    ),
    (
        "quiet",
        "only warnings and worse during boot: fewer bytes through the emulated UART, and a \
         console a human can read",
    ),
    (
        "tsc=reliable",
        "keep the TSC as clocksource: TCG's timing jitter would make the clocksource watchdog \
         declare it unstable and fall back to a slow one",
    ),
];

/// The L1 kernel command line as one string: [`L1_CMDLINE`] and `tsc_early_khz=`.
pub fn l1_cmdline() -> String {
    let mut words: Vec<String> = L1_CMDLINE.iter().map(|(w, _)| (*w).to_owned()).collect();
    words.push(format!("tsc_early_khz={}", crate::tsc::host_tsc_khz()));
    words.join(" ")
}

/// Whether `path` can be QMP's socket: short enough for a Unix socket address and free of
/// the comma QEMU's option syntax splits on. A run whose temp dir fails this goes without
/// QMP (and without [`frozen_state`]) rather than not at all.
pub(crate) fn usable_socket_path(path: &Path) -> bool {
    let s = path.as_os_str().as_encoded_bytes();
    s.len() < 100 && !s.contains(&b',')
}

/// The QEMU invocation for one lab run; QEMU's machine protocol (QMP) listens on `qmp`
/// when given.
pub(crate) fn command(
    qemu: &Path,
    kernel: &Path,
    initrd: &Path,
    mem_mib: u32,
    smp: u32,
    qmp: Option<&Path>,
) -> Command {
    let mut c = Command::new(qemu);
    // TCG, not KVM: this host's /dev/kvm (PVM) cannot run a stock kernel. `thread=multi` gives
    // each vCPU its own host thread (MTTCG), so -smp 2 uses both cores.
    c.args(["-accel", "tcg,thread=multi"]);
    // Every CPU feature TCG can emulate, among them AMD SVM with nested paging (NPT): what
    // kvm-amd needs to give L1 a working /dev/kvm.
    c.args(["-cpu", "max"]);
    c.args(["-smp", &smp.to_string(), "-m", &mem_mib.to_string()]);
    // No display; the serial console goes to stdout.
    c.arg("-nographic");
    // A guest reset (panic=-1, reboot=k) ends QEMU instead of booting the same run again.
    c.arg("-no-reboot");
    // microvm: no PCI, no firmware, direct kernel boot: the L1 kernel reaches /init in ~1 s of
    // L1 time. The legacy PIT and CMOS RTC are forced on because the stock Debian kernel uses
    // them for early timer setup and wall-clock time (TCG has no kvmclock).
    c.args(["-M", "microvm,pit=on,rtc=on"]);
    c.arg("-kernel").arg(kernel);
    c.arg("-initrd").arg(initrd);
    c.args(["-append", &l1_cmdline()]);
    // A panic in L1 ends QEMU at once through the pvpanic device (L1 loads pvpanic-mmio). The
    // reset that panic=-1 asks for is not enough on its own: seen here under load, L1 printed
    // its panic and then sat with both vCPUs halted, and QEMU never exited.
    c.args(["-device", "pvpanic", "-action", "panic=exit-failure"]);
    // The monitor, for a frozen L1: where its vCPUs are (`info registers`), asked before QEMU
    // is killed ([`frozen_state`]). Not waited for: QEMU starts whether or not anyone connects.
    if let Some(qmp) = qmp {
        c.arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()));
    }
    c
}

/// How long [`frozen_state`] waits for each of QEMU's answers.
const QMP_WAIT: Duration = Duration::from_secs(5);

/// The most of QEMU's answers kept.
const QMP_MAX: usize = 256 << 10;

/// What a frozen L1's vCPUs were doing, asked of QEMU through QMP before it is killed: `info
/// cpus` and `info registers -a` (the instruction pointer of each vCPU: in L1's kernel, at an
/// L2 guest's entry, or halted). A QEMU that does not answer is itself stuck (its main loop
/// holds the big lock), which says as much. Bounded in time and size.
pub(crate) fn frozen_state(qmp: &Path) -> String {
    match ask_qmp(qmp, &["info cpus", "info registers -a"]) {
        Ok(text) => text,
        Err(e) => format!(
            "QEMU's monitor did not answer ({e}): QEMU itself is stuck, not only the L1 guest"
        ),
    }
}

/// Asks QEMU `commands` through QMP; what it answered before an error is kept, with the error.
fn ask_qmp(qmp: &Path, commands: &[&str]) -> Result<String, String> {
    let mut out = String::new();
    ask_qmp_into(qmp, commands, &mut out).map_err(|e| {
        if out.is_empty() {
            e.to_string()
        } else {
            format!("{e}; it had answered:\n{out}")
        }
    })?;
    Ok(out)
}

fn ask_qmp_into(qmp: &Path, commands: &[&str], out: &mut String) -> io::Result<()> {
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixStream;
    let stream = UnixStream::connect(qmp)?;
    stream.set_read_timeout(Some(QMP_WAIT))?;
    stream.set_write_timeout(Some(QMP_WAIT))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream.take(QMP_MAX as u64));
    // Each answer is one JSON object on a line; events (`{"event": …}`) come in between.
    let answer = |reader: &mut BufReader<_>| -> io::Result<serde_json::Value> {
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "QMP closed"));
            }
            let v: serde_json::Value = serde_json::from_str(&line)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            if v.get("event").is_none() {
                return Ok(v);
            }
        }
    };
    answer(&mut reader)?; // the greeting
    writer.write_all(b"{\"execute\":\"qmp_capabilities\"}\n")?;
    answer(&mut reader)?;
    for command in commands {
        let request = serde_json::json!({
            "execute": "human-monitor-command",
            "arguments": {"command-line": command},
        });
        writer.write_all(format!("{request}\n").as_bytes())?;
        let v = answer(&mut reader)?;
        let text = v["return"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| v.to_string());
        out.push_str(&format!(
            "(qemu) {command}\n{}\n",
            text.replace("\r\n", "\n")
        ));
    }
    Ok(())
}

/// A running QEMU, killed and reaped when dropped unless it already exited.
struct Qemu {
    child: Child,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// How a QEMU run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    /// QEMU exited by itself.
    Exited(ExitStatus),
    /// Killed at the run's deadline.
    Deadline,
    /// Killed because the console stayed silent (after readiness) for the silence bound: the
    /// guest froze.
    Silent,
    /// Killed because the console had not shown the readiness marker by its deadline.
    NotReady,
}

/// What QEMU printed, and how it ended.
pub(crate) struct Outcome {
    /// Everything QEMU wrote to stdout: the L1 console.
    pub console: Vec<u8>,
    pub stderr: Vec<u8>,
    pub end: End,
    /// For an L1 that froze ([`End::Silent`]): what its vCPUs were doing ([`frozen_state`]).
    pub frozen_state: Option<String>,
}

/// The time limits of a QEMU run.
pub(crate) struct Bounds {
    /// QEMU is killed at this instant, whatever it is doing.
    pub deadline: Instant,
    /// QEMU is also killed if this marker has not appeared on the console by this instant: a
    /// guest that hangs while booting is found out in minutes, not at the run's deadline.
    pub ready: Option<(&'static [u8], Instant)>,
    /// Once ready, QEMU is also killed when the console stays silent this long (the guest
    /// prints a heartbeat).
    pub silence: Option<Duration>,
}

/// Runs `cmd` to completion or until a bound in `bounds` is passed, and returns what it
/// printed. With `echo`, the console is also copied to our stderr as it arrives. `qmp` is the
/// QMP socket `cmd` listens on, asked about a frozen L1 before QEMU is killed.
pub(crate) fn run(
    mut cmd: Command,
    bounds: &Bounds,
    echo: bool,
    qmp: Option<&Path>,
) -> Result<Outcome, LabError> {
    let program = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: the closure runs in the child between fork and exec, where only async-signal-safe
    // calls are allowed; it makes one prctl(2) system call and allocates nothing.
    unsafe {
        cmd.pre_exec(|| nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(io::Error::from));
    }
    let child = cmd.spawn().map_err(|e| LabError::Command {
        command: program.clone(),
        detail: format!("cannot start QEMU: {e}"),
    })?;
    let mut qemu = Qemu { child };
    let stdout = qemu.child.stdout.take().expect("stdout is piped");
    let stderr = qemu.child.stderr.take().expect("stderr is piped");
    let stderr_reader = thread::spawn(move || read_all(stderr));
    let (chunks, stdout_reader) = stream(stdout);

    let mut console = Vec::new();
    let mut echo_out = io::stderr();
    let mut waiting_for = bounds.ready;
    let mut killed = None;
    loop {
        let (deadline, on_timeout) = match (waiting_for, bounds.silence) {
            (Some((_, ready)), _) if ready < bounds.deadline => (ready, End::NotReady),
            (None, Some(silence)) if Instant::now() + silence < bounds.deadline => {
                (Instant::now() + silence, End::Silent)
            }
            _ => (bounds.deadline, End::Deadline),
        };
        let left = deadline.saturating_duration_since(Instant::now());
        match chunks.recv_timeout(left) {
            Ok(chunk) => {
                if echo {
                    let _ = echo_out.write_all(&chunk);
                }
                let searched_to = console.len();
                console.extend_from_slice(&chunk);
                if let Some((marker, _)) = waiting_for {
                    let from = searched_to.saturating_sub(marker.len());
                    if console[from..].windows(marker.len()).any(|w| w == marker) {
                        waiting_for = None;
                    }
                }
            }
            // The reader saw end of file: QEMU closed its stdout, i.e. it is exiting.
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {
                killed = Some(on_timeout);
                break;
            }
        }
    }
    let frozen_state = match (killed, qmp) {
        (Some(End::Silent), Some(qmp)) => Some(frozen_state(qmp)),
        _ => None,
    };
    let end = if let Some(end) = killed {
        let _ = qemu.child.kill();
        let _ = qemu.child.wait();
        // Whatever the guest printed between the last chunk and the kill, until the reader
        // sees end of file (bounded, in case something else holds the pipe open).
        let grace = Instant::now() + Duration::from_secs(2);
        while let Ok(chunk) = chunks.recv_timeout(grace.saturating_duration_since(Instant::now())) {
            console.extend_from_slice(&chunk);
        }
        end
    } else {
        let status = qemu.child.wait().map_err(|e| LabError::Command {
            command: program.clone(),
            detail: format!("waiting for QEMU: {e}"),
        })?;
        End::Exited(status)
    };
    // The stdout reader ends at end of file; it is not joined, so a pipe held open by something
    // other than QEMU cannot hang the run.
    drop((chunks, stdout_reader));
    let stderr = stderr_reader.join().unwrap_or_default();
    Ok(Outcome {
        console,
        stderr,
        end,
        frozen_state,
    })
}

/// Reads `stdout` on a thread, sending each chunk; the channel closes at end of file.
fn stream(mut stdout: ChildStdout) -> (mpsc::Receiver<Vec<u8>>, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel();
    let handle = thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
            }
        }
    });
    (rx, handle)
}

fn read_all(mut r: impl Read) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = r.read_to_end(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_is_the_documented_words_in_order() {
        let line = l1_cmdline();
        assert!(
            line.starts_with("console=ttyS0 reboot=k panic=-1 quiet tsc=reliable tsc_early_khz="),
            "{line}"
        );
    }

    #[test]
    fn command_has_the_lab_flags() {
        let c = command(
            Path::new("/usr/bin/qemu-system-x86_64"),
            Path::new("/k"),
            Path::new("/i"),
            2048,
            2,
            Some(Path::new("/w/qmp.sock")),
        );
        let args: Vec<String> = c
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let joined = args.join(" ");
        assert!(joined.starts_with("-accel tcg,thread=multi -cpu max -smp 2 -m 2048"));
        assert!(joined.contains("-nographic -no-reboot -M microvm,pit=on,rtc=on"));
        assert!(joined.contains("-kernel /k -initrd /i -append console=ttyS0"));
    }

    /// The capture machinery, with `sh` standing in for QEMU.
    #[test]
    fn captures_output_and_exit_status() {
        let mut c = Command::new("sh");
        c.args(["-c", "printf 'a\\r\\nb'; echo err >&2; exit 7"]);
        let out = run(c, &within(Duration::from_secs(60)), false, None).unwrap();
        assert_eq!(out.console, b"a\r\nb");
        assert_eq!(out.stderr, b"err\n");
        let End::Exited(status) = out.end else {
            panic!("{:?}", out.end)
        };
        assert_eq!(status.code(), Some(7));
    }

    #[test]
    fn kills_at_the_deadline_and_keeps_what_was_printed() {
        let mut c = Command::new("sh");
        // exec: the shell becomes sleep, so killing the child closes the pipe.
        c.args(["-c", "echo started; exec sleep 600"]);
        let begin = Instant::now();
        let out = run(c, &within(Duration::from_millis(500)), false, None).unwrap();
        assert_eq!(out.end, End::Deadline);
        assert_eq!(out.console, b"started\n");
        assert!(begin.elapsed() < Duration::from_secs(30));
    }

    fn within(limit: Duration) -> Bounds {
        Bounds {
            deadline: Instant::now() + limit,
            ready: None,
            silence: None,
        }
    }

    #[test]
    fn a_guest_that_never_gets_ready_is_killed_early() {
        let mut c = Command::new("sh");
        c.args(["-c", "echo booting; exec sleep 600"]);
        let bounds = Bounds {
            deadline: Instant::now() + Duration::from_secs(600),
            ready: Some((b"READY", Instant::now() + Duration::from_millis(500))),
            silence: None,
        };
        let out = run(c, &bounds, false, None).unwrap();
        assert_eq!(out.end, End::NotReady);
        assert_eq!(out.console, b"booting\n");
    }

    #[test]
    fn the_ready_marker_lifts_the_ready_bound_even_split_across_chunks() {
        let mut c = Command::new("sh");
        // The marker arrives in two writes; after it, only the run's deadline counts.
        c.args([
            "-c",
            "printf RE; sleep 0.2; printf 'ADY\\n'; sleep 4; echo end",
        ]);
        let bounds = Bounds {
            deadline: Instant::now() + Duration::from_secs(60),
            ready: Some((b"READY", Instant::now() + Duration::from_secs(3))),
            silence: Some(Duration::from_secs(30)),
        };
        let out = run(c, &bounds, false, None).unwrap();
        assert!(matches!(out.end, End::Exited(_)), "{:?}", out.end);
        assert_eq!(out.console, b"READY\nend\n");
    }

    #[test]
    fn a_guest_that_falls_silent_after_ready_is_killed_early() {
        let mut c = Command::new("sh");
        c.args(["-c", "echo READY; sleep 0.2; echo tick; exec sleep 600"]);
        let bounds = Bounds {
            deadline: Instant::now() + Duration::from_secs(600),
            ready: Some((b"READY", Instant::now() + Duration::from_secs(30))),
            silence: Some(Duration::from_millis(700)),
        };
        let begin = Instant::now();
        let out = run(c, &bounds, false, None).unwrap();
        assert_eq!(out.end, End::Silent);
        assert_eq!(out.console, b"READY\ntick\n");
        assert!(begin.elapsed() < Duration::from_secs(30));
    }
}
