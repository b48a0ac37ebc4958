//! The boot sequence of `cela-init`, from the kernel handing over PID 1 to the power-off.
//!
//! 1. mount the pseudo-filesystems, load the initramfs's kernel modules;
//! 2. open the control channel (vsock, with the command's output streams, or COM2), decode the
//!    [`BootRequest`] from `/proc/cmdline`, switch to the root disk if it names one, configure
//!    the network it describes, and say `ready`; with `cela.hosts=1`, wait (bounded) for the
//!    host's hosts file and write it to `/etc/hosts`;
//! 3. start the exec agent (with vsock), run the command as the requested user in its working
//!    directory with its output on vsock (or on the raw console), or an interactive shell;
//!    meanwhile pass the host's `signal N` requests on to it;
//! 4. report its status on the control channel, wait for the host to have the output, and
//!    power off.
//!
//! A power signal (busybox `poweroff`/`reboot`/`halt`) ends the machine at once, without a
//! status. Anything unexpected is printed as one `cela-init: ...` line and powers off.

use std::io::Write as _;
use std::os::fd::{AsFd as _, AsRawFd as _, IntoRawFd as _, OwnedFd};
use std::os::unix::fs::OpenOptionsExt as _;

use cela_guest::{BootRequest, CONSOLE_TTY, CONTROL_TTY, ControlMessage, MODULE_LOAD_ORDER};
use nix::fcntl::OFlag;
use nix::sys::termios::tcdrain;

use super::control::{VsockOutput, open_channels};
use super::supervise::{Outcome, Pid1Events, PowerRequest, supervise};
use super::tty::{TtyMode, open_tty};
use super::workload::{ChildIo, RunAs, SHELL, Session, build_env, spawn, split_env_entry};
use super::{agent, modules, mounts, power, rootfs, say};

/// The status reported when the host's request cannot be decoded (as a command the host got
/// wrong, not the workload's own failure).
pub const BAD_REQUEST_STATUS: u8 = 125;
/// How long the init waits for the host's first hosts file ([`cela_guest::BootRequest::hosts`]).
const HOSTS_BOUND: std::time::Duration = std::time::Duration::from_secs(10);

/// Runs the whole boot. Never returns.
pub fn run() -> ! {
    if std::process::id() != 1 {
        say!(
            "must run as PID 1, the init of a cela microVM (refusing to mount filesystems or power off this machine)"
        );
        std::process::exit(1);
    }
    std::panic::set_hook(Box::new(|info| {
        say!("internal error: {info}");
        power::power_off();
    }));

    mounts::mount_all();
    ensure_standard_fds();
    let mut events = match Pid1Events::new() {
        Ok(events) => events,
        Err(e) => fatal(format_args!("watching signals: {e}")),
    };
    modules::load_all(std::path::Path::new(MODULE_LOAD_ORDER));

    let (mut control, vsock_output) = open_channels(CONTROL_TTY);
    let request = match read_request() {
        Ok(request) => request,
        Err(e) => {
            say!("{e}");
            control.send(ControlMessage::Exit(BAD_REQUEST_STATUS));
            if let Some(output) = &vsock_output {
                output.shutdown();
            }
            control.finish();
            power::silence_kernel_console();
            power::power_off();
        }
    };
    if let Some(serial) = &request.root
        && let Err(e) = rootfs::switch_to(serial)
    {
        say!("{e}");
        control.send(ControlMessage::Exit(BAD_REQUEST_STATUS));
        power::silence_kernel_console();
        power::power_off();
    }
    if let Err(e) = super::net::configure_cards(&request.nets, &request.links) {
        say!("configuring the network: {e}");
        control.send(ControlMessage::Exit(BAD_REQUEST_STATUS));
        power::silence_kernel_console();
        power::power_off();
    }
    for entry in request.env.iter().filter(|e| split_env_entry(e).is_none()) {
        say!("warning: ignoring environment entry {entry:?} (not KEY=VALUE)");
    }
    control.send(ControlMessage::Ready);
    if let Some(output) = &vsock_output {
        let mut close: Vec<_> = [&output.stdout, &output.stderr]
            .iter()
            .map(|f| f.as_raw_fd())
            .collect();
        close.extend(control.raw_fd());
        agent::start(
            agent::Defaults {
                env: request.env.clone(),
                user: request.user.clone(),
                workdir: request.workdir.clone(),
            },
            &close,
        );
    }
    if let Some(channel) = control.requests() {
        events.watch_requests(channel);
    }
    // The names of the network's instances, before the workload looks any up; a host that
    // does not send them in time costs the names, not the run.
    if request.hosts && !events.wait_for_hosts(HOSTS_BOUND) {
        say!(
            "warning: the host sent no hosts file within {HOSTS_BOUND:?}; names of other instances may not resolve yet"
        );
    }
    let mut env = build_env(&request.env, request.command.is_none());
    let run_as = RunAs::resolve(
        request.user.as_deref(),
        request.workdir.as_deref(),
        &mut env,
        &request.env,
    );

    let (console, outcome) = match (&request.command, run_as) {
        (_, Err(e)) => {
            let message = format!("cela-init: {e}\n");
            match &vsock_output {
                Some(output) => {
                    let _ = (&output.stderr).write_all(message.as_bytes());
                }
                None => say!("{e}"),
            }
            (None, Outcome::Exited(BAD_REQUEST_STATUS))
        }
        // A terminal for the command (`cela run -t`): the console, as a shell's.
        (Some(argv), Ok(run_as)) if request.tty => {
            if !request.env.iter().any(|e| e.starts_with("TERM=")) {
                set_var(&mut env, "TERM", "xterm");
            }
            run_on_console(argv, &env, &run_as, &mut events)
        }
        (Some(argv), Ok(run_as)) => match &vsock_output {
            Some(output) => (
                None,
                run_command_on_vsock(argv, &env, &run_as, &mut events, output),
            ),
            None => run_command(argv, &env, &run_as, &mut events),
        },
        (None, Ok(run_as)) => run_on_console(&[SHELL.to_owned()], &env, &run_as, &mut events),
    };
    if let Some(console) = &console {
        let _ = tcdrain(console);
    }
    if request.command.is_some() {
        power::silence_kernel_console();
    }
    match outcome {
        Outcome::Exited(status) => {
            if let Some(output) = &vsock_output {
                output.shutdown();
            }
            control.send(ControlMessage::Exit(status));
            control.finish();
            power::power_off()
        }
        Outcome::Power(PowerRequest::PowerOff) => power::power_off(),
        Outcome::Power(PowerRequest::Reboot) => power::restart(),
    }
}

/// Prints what went wrong and powers off. Never returns.
fn fatal(what: std::fmt::Arguments<'_>) -> ! {
    say!("{what}; powering off");
    power::power_off()
}

fn read_request() -> Result<BootRequest, String> {
    let cmdline = std::fs::read_to_string("/proc/cmdline")
        .map_err(|e| format!("reading /proc/cmdline: {e}"))?;
    BootRequest::from_cmdline(&cmdline)
        .map_err(|e| format!("cannot decode the host's request: {e}"))
}

/// Runs the command with its output on the raw console; returns the console (to drain) and
/// how the run ended.
fn run_command(
    argv: &[String],
    env: &[(String, String)],
    run_as: &RunAs,
    events: &mut Pid1Events,
) -> (Option<OwnedFd>, Outcome) {
    let console = match open_tty(CONSOLE_TTY, OFlag::O_RDWR, TtyMode::Raw) {
        Ok(file) => Some(OwnedFd::from(file)),
        Err(e) => {
            say!(
                "warning: console {CONSOLE_TTY}: {e}; the command's output goes to the kernel console"
            );
            None
        }
    };
    let output = match &console {
        Some(fd) => fd.try_clone(),
        None => std::io::stderr().as_fd().try_clone_to_owned(),
    };
    let io = match output.and_then(|out| {
        Ok(ChildIo {
            stdin: None,
            stdout: out.try_clone()?,
            stderr: out,
        })
    }) {
        Ok(io) => io,
        Err(e) => fatal(format_args!("preparing the command's output: {e}")),
    };
    let outcome = match spawn(argv, env, io, Session::Inherit, run_as) {
        Ok(pid) => supervise_or_die(pid, events),
        Err(e) => {
            match &console {
                // On the console itself, where the command's own error would have gone.
                Some(fd) => write_all(fd, format!("cela-init: {e}\n").as_bytes()),
                None => say!("{e}"),
            }
            Outcome::Exited(e.status())
        }
    };
    (console, outcome)
}

/// Runs the command with its standard output and error on their vsock streams.
fn run_command_on_vsock(
    argv: &[String],
    env: &[(String, String)],
    run_as: &RunAs,
    events: &mut Pid1Events,
    output: &VsockOutput,
) -> Outcome {
    let io = (|| {
        Ok::<_, std::io::Error>(ChildIo {
            stdin: None,
            stdout: output.stdout.try_clone()?.into(),
            stderr: output.stderr.try_clone()?.into(),
        })
    })()
    .unwrap_or_else(|e| fatal(format_args!("preparing the command's output: {e}")));
    match spawn(argv, env, io, Session::Inherit, run_as) {
        Ok(pid) => supervise_or_die(pid, events),
        Err(e) => {
            // On the command's standard error, where a shell would have put it.
            let _ = (&output.stderr).write_all(format!("cela-init: {e}\n").as_bytes());
            Outcome::Exited(e.status())
        }
    }
}

fn set_var(env: &mut Vec<(String, String)>, key: &str, value: &str) {
    match env.iter_mut().find(|(k, _)| k == key) {
        Some(slot) => slot.1 = value.to_owned(),
        None => env.push((key.to_owned(), value.to_owned())),
    }
}

/// Runs `argv` (an interactive shell, or a command asked to have a terminal) on the console:
/// cooked mode, its controlling terminal, 24 rows and 80 columns until the host says.
fn run_on_console(
    argv: &[String],
    env: &[(String, String)],
    run_as: &RunAs,
    events: &mut Pid1Events,
) -> (Option<OwnedFd>, Outcome) {
    let console = match open_tty(CONSOLE_TTY, OFlag::O_RDWR, TtyMode::Sane) {
        Ok(file) => OwnedFd::from(file),
        Err(e) => fatal(format_args!(
            "console {CONSOLE_TTY}: {e}; no interactive shell without it"
        )),
    };
    let io = (|| {
        Ok::<_, std::io::Error>(ChildIo {
            stdin: Some(console.try_clone()?),
            stdout: console.try_clone()?,
            stderr: console.try_clone()?,
        })
    })()
    .unwrap_or_else(|e| fatal(format_args!("console {CONSOLE_TTY}: {e}")));
    super::tty::set_window_size(&console, 24, 80);
    events.read_waiting_requests();
    let outcome = match spawn(argv, env, io, Session::ControllingTerminal, run_as) {
        Ok(pid) => supervise_or_die(pid, events),
        Err(e) => {
            write_all(&console, format!("cela-init: {e}\r\n").as_bytes());
            Outcome::Exited(e.status())
        }
    };
    (Some(console), outcome)
}

fn supervise_or_die(pid: nix::unistd::Pid, events: &mut Pid1Events) -> Outcome {
    supervise(pid, events).unwrap_or_else(|e| fatal(format_args!("waiting for the workload: {e}")))
}

/// Makes sure file descriptors 0, 1 and 2 are open (on the console, or `/dev/null`), so that
/// init's own messages never land in a file it opens later. The kernel normally opens them on
/// `/dev/console`; it cannot when the initramfs lacks that node.
fn ensure_standard_fds() {
    for fd in 0..3 {
        // SAFETY: F_GETFD only queries the descriptor's flags; no memory is involved.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0 {
            continue;
        }
        // `open` returns the lowest free descriptor, which is `fd`: the lower ones are open.
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open("/dev/console")
            .or_else(|_| {
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/null")
            });
        // Kept open for init's whole life.
        if let Some(file) = opened.ok().filter(|f| f.as_raw_fd() == fd) {
            let _ = file.into_raw_fd();
        }
    }
}

/// Writes all of `bytes` to `fd`, giving up silently on an error (it is only a message).
fn write_all(fd: &OwnedFd, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        match nix::unistd::write(fd, bytes) {
            Ok(0) => return,
            Ok(n) => bytes = &bytes[n..],
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return,
        }
    }
}
