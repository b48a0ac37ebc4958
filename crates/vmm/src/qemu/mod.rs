//! The QEMU TCG fallback engine: runs a cela microVM under `qemu-system-x86_64 -accel tcg`
//! on hosts whose KVM cannot boot a stock kernel (see [`crate::engine`]).
//!
//! The guest sees the same machine contract as under cela's own monitor: the kernel and
//! initramfs with the same command line, the console on COM1, the control channel
//! ([`cela_guest::ControlMessage`] lines) on COM2, ACPI power-off, and a pvpanic device.
//! QEMU's `microvm` machine provides all of it; the only extra kernel parameters are the ones
//! TCG needs ([`tcg_kernel_params`]): the TSC frequency, so the kernel neither calibrates it
//! slowly against the emulated PIT nor distrusts it. Under TCG the guest's RDTSC reads the
//! host's TSC, so the frequency given is the host's, measured ([`host_tsc_khz`]); a fixed
//! guess makes the guest clock run at the wrong speed (with 2 GHz on a 2.6 GHz host, a guest
//! `sleep 10` took 7.7 s).
//!
//! QEMU talks to this process over three socket pairs whose far ends it inherits as file
//! descriptors (`-chardev socket,fd=N`), so nothing is created on disk and nothing is left
//! behind:
//!
//! | channel | QEMU side | host side |
//! | --- | --- | --- |
//! | console | COM1 (`-serial chardev:…`, the machine's own ISA serial) | copied to stdout; stdin copied in (interactive) |
//! | control | COM2 (`-device isa-serial,iobase=0x2f8,irq=3`) | parsed with [`ControlParser`] |
//! | monitor | QMP (`-mon mode=control`) | `SHUTDOWN` / `GUEST_PANICKED` events say how the run ended |
//!
//! QEMU starts paused (`-S`) and is resumed once the QMP handshake is done, so no event is
//! missed. `-no-reboot` turns a guest reset into a `SHUTDOWN` with reason `guest-reset`, and
//! `-action panic=shutdown` turns a pvpanic report into `GUEST_PANICKED` then `SHUTDOWN`.
//!
//! QEMU never sees the host terminal: its stdin and stdout are `/dev/null` and its stderr is
//! collected for error messages. Interactive mode uses cela's own console code
//! ([`crate::console`]): the terminal in raw mode (restored on every return path), `Ctrl-A x`
//! to leave. QEMU runs in its own process group, so a Ctrl-C at the terminal reaches cela
//! only, which stops QEMU and reports [`GuestExit::Interrupted`]; QEMU also gets `SIGKILL` if
//! the thread that started it dies (`PR_SET_PDEATHSIG`), and on every error path.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

pub mod migrate;
pub mod qmp;

pub use migrate::{Incoming, Paused, QemuHandle};
pub use qmp::QemuVersion;

use crate::config::ConfigError;
use crate::console::{self, HostStdout, RawTerminal};
use crate::machine::{ConsoleMode, GuestExit, MachineConfig};
use crate::stop::{StopReason, StopSignal};

/// The QEMU system emulator this engine runs.
pub const QEMU_BINARY: &str = "qemu-system-x86_64";
/// The machine: QEMU's `microvm` with the legacy devices a stock kernel expects on a PC (PIT
/// for timer calibration, RTC, COM1) and ACPI (power-off, the pvpanic device's description),
/// without the i8259 PIC and option ROMs. Checked against QEMU 7.2's `-M microvm,help`.
pub const MACHINE: &str = "microvm,x-option-roms=off,pit=on,pic=off,rtc=on,isa-serial=on,acpi=on";
/// The TSC frequency assumed when the host's cannot be measured.
pub const FALLBACK_TSC_KHZ: u64 = 2_000_000;
/// COM2, the control channel: `microvm` instantiates only COM1 itself.
const COM2: &str = "iobase=0x2f8,irq=3";
/// How much of QEMU's stderr is kept for error messages.
const STDERR_LIMIT: u64 = 64 * 1024;

/// Why the QEMU engine could not run the machine (as opposed to the guest ending it).
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error(
        "{QEMU_BINARY} was not found on PATH; install it with `apt-get install qemu-system-x86`"
    )]
    NotInstalled,
    #[error(
        "--vsock needs cela's KVM engine: the QEMU engine has no vsock here (no /dev/vhost-vsock)"
    )]
    NoVsock,
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{what} {path} is not valid UTF-8, which QEMU's command line cannot carry")]
    NonUtf8Path { what: &'static str, path: PathBuf },
    #[error("setting up QEMU's {what}: {source}")]
    Setup {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("starting {path}: {source}")]
    Spawn {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("QEMU did not start ({why}; QEMU {status}){}", show_stderr(.stderr))]
    Startup {
        why: String,
        status: String,
        stderr: String,
    },
    #[error("{0}")]
    Migration(String),
    #[error("{why} (QEMU {status}){}", show_stderr(.stderr))]
    Ended {
        why: String,
        status: String,
        stderr: String,
    },
}

fn show_stderr(stderr: &str) -> String {
    let text = stderr.trim();
    if text.is_empty() {
        String::new()
    } else {
        format!(": {text}")
    }
}

/// Whether this host can run the QEMU engine: the path of `qemu-system-x86_64` on `PATH`, or
/// why not.
pub fn available() -> Result<PathBuf, QemuError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    find_on_path(QEMU_BINARY, &path.to_string_lossy()).ok_or(QemuError::NotInstalled)
}

/// The first executable regular file called `name` in the directories of `path_var`.
fn find_on_path(name: &str, path_var: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    path_var
        .split(':')
        .filter(|dir| !dir.is_empty())
        .map(|dir| Path::new(dir).join(name))
        .find(|candidate| {
            std::fs::metadata(candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Kernel parameters added under TCG: the TSC frequency for the early TSC code (there is no
/// firmware or hypervisor to report it, and no HPET or PM timer on `microvm` to refine it
/// against), and that the TSC is to be trusted without a watchdog.
pub fn tcg_kernel_params(tsc_khz: u64) -> String {
    format!("tsc_early_khz={tsc_khz} tsc=reliable")
}

/// The host's TSC frequency in kHz, measured against the monotonic clock over 20 ms; `None`
/// if the result is implausible. QEMU's TCG reads the host TSC for the guest's RDTSC, so this
/// is the guest's TSC frequency too.
pub fn host_tsc_khz() -> Option<u64> {
    let sample = || {
        let now = Instant::now();
        // SAFETY: RDTSC reads a counter; it has no preconditions and touches no memory.
        let tsc = unsafe { core::arch::x86_64::_rdtsc() };
        (now, tsc)
    };
    let (t0, c0) = sample();
    std::thread::sleep(std::time::Duration::from_millis(20));
    let (t1, c1) = sample();
    let khz = c1.wrapping_sub(c0) as f64 / (t1 - t0).as_secs_f64() / 1000.0;
    (100_000.0..20_000_000.0)
        .contains(&khz)
        .then(|| khz.round() as u64)
}

/// The descriptor numbers, in QEMU's process, of its ends of the three channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelFds {
    pub console: RawFd,
    pub control: RawFd,
    pub monitor: RawFd,
}

fn utf8<'a>(what: &'static str, path: &'a Path) -> Result<&'a str, QemuError> {
    path.to_str().ok_or_else(|| QemuError::NonUtf8Path {
        what,
        path: path.to_owned(),
    })
}

/// QEMU's `-sandbox` setting when the monitor is confined.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// QEMU's command line (without the program name) for `config`, with the channels on `fds`
/// and the guest told its TSC runs at `tsc_khz`.
pub fn qemu_args(
    config: &MachineConfig,
    fds: ChannelFds,
    tsc_khz: u64,
) -> Result<Vec<String>, QemuError> {
    qemu_args_with_disks(config, fds, tsc_khz, None, false)
}

/// [`qemu_args`], with the disks given as descriptors QEMU inherits rather than paths: a
/// jailed QEMU can open no path of the host's, and runs as a uid that could not open them
/// anyway. `disk_fds` has, per disk in order, the descriptors of its fd set: one opened
/// read-only, and for a writable disk a second opened read-write (QEMU opens an image
/// read-only first, and takes from a set only a descriptor of the access mode it asks for).
/// `incoming`: the machine is to be loaded from a saved state (`-incoming defer`), which
/// needs every other argument as the saving machine had it.
pub fn qemu_args_with_disks(
    config: &MachineConfig,
    fds: ChannelFds,
    tsc_khz: u64,
    disk_fds: Option<&[Vec<RawFd>]>,
    incoming: bool,
) -> Result<Vec<String>, QemuError> {
    let mut args: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| args.extend(items.iter().map(|s| s.to_string()));
    push(&["-M", MACHINE, "-accel", "tcg,thread=multi", "-cpu", "max"]);
    push(&["-smp", &config.vcpus.to_string()]);
    push(&["-m", &format!("{}M", config.memory_mib)]);
    // No default devices, no config files, no display; a reset ends QEMU; start paused until
    // the monitor handshake is done.
    push(&[
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-S",
    ]);
    push(&["-action", "panic=shutdown"]);
    if config.confine {
        // QEMU's own seccomp filter: no obsolete calls, no setuid/setgid, no fork or exec,
        // no scheduler or affinity changes. A guest that breaks an emulated device gets no
        // further than what QEMU itself needs.
        push(&["-sandbox", SANDBOX]);
    }
    push(&["-kernel", utf8("kernel", &config.kernel)?]);
    if let Some(initrd) = &config.initrd {
        push(&["-initrd", utf8("initramfs", initrd)?]);
    }
    let cmdline = config.cmdline.trim();
    push(&[
        "-append",
        &format!("{cmdline} {}", tcg_kernel_params(tsc_khz)),
    ]);
    push(&["-chardev", &format!("socket,id=console,fd={}", fds.console)]);
    push(&["-serial", "chardev:console"]);
    push(&["-chardev", &format!("socket,id=control,fd={}", fds.control)]);
    push(&["-device", &format!("isa-serial,chardev=control,{COM2}")]);
    push(&["-chardev", &format!("socket,id=monitor,fd={}", fds.monitor)]);
    push(&["-mon", "chardev=monitor,mode=control"]);
    push(&["-device", "pvpanic"]);
    // Disks: virtio-blk on microvm's virtio-mmio transports, in order (vda, vdb, …), as
    // virtio 1.x devices like cela's own. QEMU's option syntax escapes a comma by doubling it.
    if !config.disks.is_empty() || !config.nets.is_empty() {
        push(&["-global", "virtio-mmio.force-legacy=false"]);
    }
    for (n, disk) in config.disks.iter().enumerate() {
        let path = match disk_fds.and_then(|f| f.get(n)) {
            // An fd set of QEMU's monitor, one per disk: `/dev/fdset/N` names it.
            Some(set) => {
                for fd in set {
                    push(&["-add-fd", &format!("fd={fd},set={}", n + 1)]);
                }
                format!("/dev/fdset/{}", n + 1)
            }
            None => utf8("disk", &disk.path)?.replace(',', ",,"),
        };
        let readonly = if disk.read_only { "on" } else { "off" };
        // No image locks: a machine whose state was saved gives its disks up, and taking the
        // lock back on an fd set fails, so it could not run on (cela's own monitor takes no
        // locks either; `config::open_disks` refuses one file writable twice in a VM, and an
        // instance's disk is its own).
        push(&[
            "-drive",
            &format!("file={path},format=raw,if=none,id=d{n},readonly={readonly},file.locking=off"),
        ]);
        // The serial the guest reads, as cela's own block device gives it: the one asked
        // for, or the file name; at most 20 bytes.
        let serial = disk.serial.clone().unwrap_or_else(|| {
            disk.path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
        let serial: String = serial
            .chars()
            .take(20)
            .collect::<String>()
            .replace(',', ",,");
        push(&[
            "-device",
            &format!("virtio-blk-device,drive=d{n},serial={serial}"),
        ]);
    }
    // The NIC: QEMU inherits the TAP cela opened (a TAP made by `--net auto` exists only
    // while a descriptor of it is open, so QEMU cannot open it by name). QEMU sees the vnet
    // header flag on the descriptor itself (`vnet_hdr=` is refused with `fd=`).
    for (n, nic) in config.nets.iter().enumerate() {
        let fd = nic.tap.as_raw_fd();
        push(&["-netdev", &format!("tap,id=net{n},fd={fd}")]);
        let mac = cela_guest::format_mac(&nic.mac);
        push(&[
            "-device",
            &format!("virtio-net-device,netdev=net{n},mac={mac}"),
        ]);
    }
    if incoming {
        push(&["-incoming", "defer"]);
    }
    Ok(args)
}

/// How long QEMU is given to quit after a snapshot ended the machine.
const QUIT_BOUND: std::time::Duration = std::time::Duration::from_secs(10);

/// Memory a jailed QEMU may use beyond guest RAM: TCG's translation cache alone may grow to
/// 1 GiB, plus QEMU's own heap and threads.
pub const MEMORY_OVERHEAD_MIB: u64 = 1024;

/// A running QEMU, killed and reaped when dropped unless it was already waited for: a plain
/// child (`--no-confine`), or a jailed one ([`crate::jail`]).
enum QemuProcess {
    Plain(Child),
    Jailed(Option<Box<crate::jail::Spawned>>),
}

impl QemuProcess {
    /// Starts QEMU with `inherited` descriptors kept open across exec, in its own process
    /// group, and set to die with the calling thread.
    fn spawn(binary: &Path, args: &[String], inherited: Vec<RawFd>) -> Result<Self, QemuError> {
        let parent = std::process::id();
        let mut command = Command::new(binary);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: the closure runs in the forked child before exec; it only makes
        // async-signal-safe system calls (setpgid, prctl, getppid, fcntl) on plain integers
        // and allocates nothing.
        unsafe {
            command.pre_exec(move || {
                if libc::setpgid(0, 0) < 0 || libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0
                {
                    return Err(io::Error::last_os_error());
                }
                // The parent may have died before PR_SET_PDEATHSIG took effect.
                if libc::getppid() as u32 != parent {
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
                for &fd in &inherited {
                    if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = command.spawn().map_err(|source| QemuError::Spawn {
            path: binary.to_owned(),
            source,
        })?;
        Ok(QemuProcess::Plain(child))
    }

    /// Starts QEMU in the same jail as cela's own monitor (its namespaces, an empty root with
    /// only the host's /usr and libraries, the kernel and initramfs read-only, a uid of its
    /// own, no capability, Landlock, a cgroup sized from the VM), on top of its own seccomp
    /// sandbox. The disks are opened before the jail and passed as fd sets. Its stderr goes to
    /// `stderr`.
    fn spawn_jailed(
        binary: &Path,
        config: &MachineConfig,
        fds: ChannelFds,
        tsc_khz: u64,
        stderr: RawFd,
        incoming: bool,
    ) -> Result<Self, QemuError> {
        let mut inherited = vec![fds.console, fds.control, fds.monitor];
        inherited.extend(config.nets.iter().map(|nic| nic.tap.as_raw_fd()));
        let jail_config = crate::jail::JailConfig {
            memory_overhead_mib: MEMORY_OVERHEAD_MIB,
            tasks: u64::from(config.vcpus) + 128,
            largest_file: crate::config::largest_disk(&config.disks),
            keep_fds: inherited.iter().copied().chain([stderr]).collect(),
            forward_signals: false,
            own_process_group: true,
            ..crate::jail::JailConfig::monitor(config.vcpus, config.memory_mib)
        };
        let spawned = crate::jail::spawn(&jail_config, |jail| -> Result<(), String> {
            // SAFETY: dup2 only changes this process's descriptor table; `stderr` is the
            // caller's pipe, kept open here.
            if unsafe { libc::dup2(stderr, 2) } < 0 {
                return Err(format!(
                    "redirecting QEMU's stderr: {}",
                    io::Error::last_os_error()
                ));
            }
            let mut inherit = inherited.clone();
            let mut disk_fds = Vec::new();
            for disk in &config.disks {
                let open = |write: bool| {
                    std::fs::OpenOptions::new()
                        .read(true)
                        .write(write)
                        .open(&disk.path)
                        .map(std::os::fd::IntoRawFd::into_raw_fd)
                        .map_err(|e| format!("opening the disk {}: {e}", disk.path.display()))
                };
                let mut set = vec![open(false)?];
                if !disk.read_only {
                    set.push(open(true)?);
                }
                inherit.extend(&set);
                disk_fds.push(set);
            }
            // The kernel and initramfs by their real paths, where the jail shows them.
            let real =
                |p: &Path| std::fs::canonicalize(p).map_err(|e| format!("{}: {e}", p.display()));
            let mut config = config.clone();
            config.kernel = real(&config.kernel)?;
            config.initrd = config.initrd.as_deref().map(real).transpose()?;
            let args = qemu_args_with_disks(&config, fds, tsc_khz, Some(&disk_fds), incoming)
                .map_err(|e| e.to_string())?;
            let mut files = vec![config.kernel.clone()];
            files.extend(config.initrd.clone());
            Err(jail.exec(binary, &args, &inherit, &files).to_string())
        })
        .map_err(|e| QemuError::Setup {
            what: "QEMU's jail",
            source: io::Error::other(e.to_string()),
        })?;
        Ok(QemuProcess::Jailed(Some(Box::new(spawned))))
    }

    /// Waits up to `bound` for QEMU to exit by itself, then kills it.
    fn exit_within(&mut self, bound: std::time::Duration) {
        let deadline = Instant::now() + bound;
        loop {
            let exited = match self {
                QemuProcess::Plain(child) => child.try_wait().map_or(true, |s| s.is_some()),
                QemuProcess::Jailed(Some(s)) => s.pid().is_none_or(|pid| {
                    use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};
                    // WNOWAIT: looked at, left for `wait` to reap.
                    let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
                    !matches!(waitid(Id::Pid(pid), flags), Ok(WaitStatus::StillAlive))
                }),
                QemuProcess::Jailed(None) => true,
            };
            if exited {
                return;
            }
            if Instant::now() > deadline {
                self.kill();
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        // An error means it has already exited, which is what was wanted.
        match self {
            QemuProcess::Plain(child) => {
                let _ = child.kill();
            }
            QemuProcess::Jailed(Some(s)) => s.kill(),
            QemuProcess::Jailed(None) => {}
        }
    }

    fn wait(&mut self) -> String {
        match self {
            QemuProcess::Plain(child) => match child.wait() {
                Ok(status) => describe_status(status),
                Err(e) => format!("could not be waited for: {e}"),
            },
            QemuProcess::Jailed(spawned) => {
                let Some(s) = spawned.take() else {
                    return "was already waited for".into();
                };
                let (report, status) = s.wait_status();
                // What the jail reported before QEMU ran (it failed to start), as JSON.
                let said = match serde_json::from_str::<Result<(), String>>(&report) {
                    Ok(Err(why)) => Some(why),
                    Ok(Ok(())) => None,
                    Err(_) => Some(report.trim().to_owned()).filter(|s| !s.is_empty()),
                };
                let code = crate::jail::exit_code(status);
                let how = if code > 128 {
                    format!("was killed by signal {}", code - 128)
                } else {
                    format!("exited with status {code}")
                };
                match said {
                    Some(why) => format!("{how} ({why})"),
                    None => how,
                }
            }
        }
    }
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        // Both are no-ops once the child has been reaped (std keeps its status); a jailed
        // QEMU not waited for is killed and reaped by its handle's own drop.
        if let QemuProcess::Plain(child) = self {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn describe_status(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => format!("was killed by signal {signal}"),
        _ => status.to_string(),
    }
}

/// Socket pairs for the three channels: `.0` is this process's end, `.1` QEMU's.
struct Channels {
    console: (UnixStream, UnixStream),
    control: (UnixStream, UnixStream),
    monitor: (UnixStream, UnixStream),
}

impl Channels {
    fn new() -> Result<Self, QemuError> {
        let pair = |what| UnixStream::pair().map_err(|source| QemuError::Setup { what, source });
        Ok(Channels {
            console: pair("console channel")?,
            control: pair("control channel")?,
            monitor: pair("monitor channel")?,
        })
    }

    fn qemu_fds(&self) -> ChannelFds {
        ChannelFds {
            console: self.console.1.as_raw_fd(),
            control: self.control.1.as_raw_fd(),
            monitor: self.monitor.1.as_raw_fd(),
        }
    }
}

/// How one QMP event ends the run, if it does.
fn stop_reason_for(event: &serde_json::Value) -> Option<StopReason> {
    match event.get("event")?.as_str()? {
        "GUEST_PANICKED" => Some(StopReason::Guest(GuestExit::Panicked)),
        "SHUTDOWN" => Some(match event["data"].get("reason").and_then(|r| r.as_str()) {
            Some("guest-shutdown") => StopReason::Guest(GuestExit::PoweredOff),
            Some("guest-reset") => StopReason::Guest(GuestExit::Rebooted),
            Some("guest-panic") => StopReason::Guest(GuestExit::Panicked),
            Some(reason) => StopReason::Fault(format!(
                "QEMU shut down ({})",
                crate::jail::printable(reason)
            )),
            None => StopReason::Fault("QEMU shut down without saying why".into()),
        }),
        _ => None,
    }
}

fn spawn_named<T: Send + 'static>(
    name: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<JoinHandle<T>, QemuError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(work)
        .map_err(|source| QemuError::Setup {
            what: "threads",
            source,
        })
}

/// What [`run_with`] does besides booting the machine and waiting for it to end.
#[derive(Default)]
pub struct RunOptions<'a> {
    /// Start the machine from a saved state instead of booting it.
    pub incoming: Option<Incoming>,
    /// Called on this thread once the guest runs, with a handle to pause and save it.
    pub on_running: Option<Box<dyn FnOnce(QemuHandle) + 'a>>,
}

/// Boots the machine under `qemu-system-x86_64 -accel tcg -M microvm` and waits for it to end.
pub fn run(config: &MachineConfig, console: ConsoleMode) -> Result<GuestExit, QemuError> {
    run_with(config, console, RunOptions::default())
}

/// [`run`], from a saved state if asked, handing out a [`QemuHandle`] once the guest runs.
pub fn run_with(
    config: &MachineConfig,
    console: ConsoleMode,
    opts: RunOptions<'_>,
) -> Result<GuestExit, QemuError> {
    if config.vsock.is_some() {
        return Err(QemuError::NoVsock);
    }
    crate::config::validate(config)?;
    let binary = available()?;
    let channels = Channels::new()?;
    let fds = channels.qemu_fds();
    let tsc_khz = host_tsc_khz().unwrap_or_else(|| {
        tracing::warn!("could not measure the host's TSC frequency; assuming {FALLBACK_TSC_KHZ} kHz (the guest clock may drift)");
        FALLBACK_TSC_KHZ
    });
    let incoming = opts.incoming.is_some();
    let args = qemu_args_with_disks(config, fds, tsc_khz, None, incoming)?;
    tracing::debug!("starting {} {}", binary.display(), args.join(" "));

    let launched = Instant::now();
    let (mut qemu, stderr_source): (QemuProcess, Option<Box<dyn Read + Send>>) = if config.confine {
        let (r, w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| QemuError::Setup {
                what: "QEMU's stderr",
                source: e.into(),
            })?;
        let qemu =
            QemuProcess::spawn_jailed(&binary, config, fds, tsc_khz, w.as_raw_fd(), incoming)?;
        drop(w);
        (qemu, Some(Box::new(std::fs::File::from(r))))
    } else {
        let mut inherited = vec![fds.console, fds.control, fds.monitor];
        inherited.extend(config.nets.iter().map(|nic| nic.tap.as_raw_fd()));
        let mut qemu = QemuProcess::spawn(&binary, &args, inherited)?;
        let stderr = match &mut qemu {
            QemuProcess::Plain(child) => child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
            QemuProcess::Jailed(_) => None,
        };
        (qemu, stderr)
    };
    let Channels {
        console: (console_io, qemu_console),
        control: (control_in, qemu_control),
        monitor: (monitor, qemu_monitor),
    } = channels;
    // Close QEMU's ends here, so that ours see EOF when QEMU exits.
    drop((qemu_console, qemu_control, qemu_monitor));
    let stderr = collect_stderr(stderr_source)?;

    let stop = Arc::new(StopSignal::new());
    // The monitor: the handshake, its reader on a thread (events end the run), then the
    // machine started: resumed, or first loaded from the saved state.
    let started = qmp::Qmp::connect(monitor)
        .map_err(|e| e.to_string())
        .and_then(|(qmp, events)| {
            let stop_e = stop.clone();
            let reader = spawn_named("qemu-events", move || watch_events(events, &stop_e))
                .map_err(|e| e.to_string())?;
            let qmp = Arc::new(qmp);
            if let Some(saved) = &opts.incoming {
                migrate::load(&qmp, saved)
                    .map_err(|e| format!("restoring the saved state: {e}"))?;
            }
            qmp.execute("cont", None).map_err(|e| e.to_string())?;
            Ok((qmp, reader))
        });
    let (qmp, events_thread) = match started {
        Ok(s) => s,
        Err(why) => {
            qemu.kill();
            let status = qemu.wait();
            return Err(QemuError::Startup {
                why,
                status,
                stderr: join_stderr(stderr),
            });
        }
    };

    console::stop_on_host_signals(stop.clone(), None);
    if let Some(saved) = &opts.incoming {
        // Before anything else reaches the guest: what changed while it was away.
        let lines = migrate::restored_requests(&saved.identity);
        if let Err(e) = (&control_in).write_all(lines.as_bytes()) {
            tracing::warn!("telling the restored guest the time and fresh entropy: {e}");
        }
    }
    let raw_terminal = match console {
        ConsoleMode::Interactive => RawTerminal::stdin(),
        ConsoleMode::Stream | ConsoleMode::Framed => None,
    };
    let threads = (|| {
        if console != ConsoleMode::Stream {
            let input = console_io.try_clone().map_err(|source| QemuError::Setup {
                what: "console input",
                source,
            })?;
            console::spawn_stdin_forwarder(stop.clone(), None, console, move |bytes| {
                (&input).write_all(bytes)
            });
        }
        let output = spawn_named("qemu-console", move || copy_console(console_io))?;
        let stop_c = stop.clone();
        let control = spawn_named("qemu-control", move || read_control(control_in, &stop_c))?;
        Ok::<_, QemuError>([output, control, events_thread])
    })();
    // On an error, `qemu` and `raw_terminal` are dropped: QEMU killed, the terminal restored.
    let threads = threads?;
    if incoming {
        // A restored guest said `ready` before it was saved; it will not again.
        stop.report_ready();
    }
    if let Some(on_running) = opts.on_running {
        on_running(QemuHandle {
            qmp: qmp.clone(),
            stop: stop.clone(),
            busy: Arc::new(std::sync::Mutex::new(())),
            tsc_khz,
            memory_mib: config.memory_mib,
        });
    }

    let reason = stop.wait(None);
    match reason {
        // QEMU ends by itself: the guest ended the machine.
        Some(StopReason::Guest(
            GuestExit::Command(_)
            | GuestExit::PoweredOff
            | GuestExit::Rebooted
            | GuestExit::Panicked
            | GuestExit::TripleFault,
        )) => {}
        // Told to quit once saved: given a moment to do so.
        Some(StopReason::Guest(GuestExit::Snapshotted)) => qemu.exit_within(QUIT_BOUND),
        // Everything else (the host stopping it, a monitor that broke off or talked
        // nonsense, a machine that could not be resumed): QEMU must not outlive the run.
        _ => qemu.kill(),
    }
    let status = qemu.wait();
    for thread in threads {
        let _ = thread.join();
    }
    drop(raw_terminal);
    let stderr = join_stderr(stderr);
    let ended = launched.elapsed();
    tracing::debug!(
        "QEMU {status} {:.0} ms after launch; guest init ready {}",
        ended.as_secs_f64() * 1e3,
        stop.ready_at().map_or("never".into(), |t| format!(
            "after {:.0} ms",
            t.duration_since(launched).as_secs_f64() * 1e3
        )),
    );
    if !stderr.trim().is_empty() {
        tracing::debug!("QEMU's stderr: {}", stderr.trim());
    }
    match stop.outcome() {
        Some(StopReason::Guest(exit)) => Ok(exit),
        Some(StopReason::Fault(why)) => Err(QemuError::Ended {
            why,
            status,
            stderr,
        }),
        Some(StopReason::Halted) | None => Err(QemuError::Ended {
            why: "QEMU ended without reporting how the guest stopped".into(),
            status,
            stderr,
        }),
    }
}

/// Guest console → host stdout until QEMU closes the channel. If stdout goes away the channel
/// is still drained, so the guest never blocks on a full serial port.
fn copy_console(mut channel: UnixStream) {
    let mut out = Some(HostStdout);
    let mut buf = [0u8; 4096];
    loop {
        let n = match channel.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        if let Some(writer) = &mut out
            && writer.write_all(&buf[..n]).is_err()
        {
            out = None;
        }
    }
}

/// Control channel → the stop signal's reported status and ready time.
/// The host's requests go the other way on the same port.
fn read_control(channel: UnixStream, stop: &StopSignal) {
    if let Ok(writer) = channel.try_clone() {
        stop.attach_guest_channel(writer);
    }
    stop.follow_control(&channel, || {
        stop.detach_guest_channel();
        false
    });
    stop.detach_guest_channel();
}

/// QMP events → stop requests. The monitor closing means QEMU is gone; if nothing said why
/// before, that is a fault.
fn watch_events(events: qmp::QmpEvents, stop: &StopSignal) {
    events.run(|event| {
        if let Some(reason) = stop_reason_for(event) {
            stop.request(reason);
        }
    });
    stop.request(StopReason::Fault(
        "QEMU exited without the guest ending the machine".into(),
    ));
}

type StderrThread = Option<JoinHandle<String>>;

/// Collects QEMU's stderr (its error messages) on a thread, up to [`STDERR_LIMIT`] bytes; the
/// rest is read and dropped so QEMU never blocks writing it.
fn collect_stderr(stderr: Option<Box<dyn Read + Send>>) -> Result<StderrThread, QemuError> {
    let Some(mut stderr) = stderr else {
        return Ok(None);
    };
    let thread = spawn_named("qemu-stderr", move || {
        let mut kept = Vec::new();
        let _ = (&mut stderr).take(STDERR_LIMIT).read_to_end(&mut kept);
        let _ = io::copy(&mut stderr, &mut io::sink());
        String::from_utf8_lossy(&kept).into_owned()
    })?;
    Ok(Some(thread))
}

fn join_stderr(thread: StderrThread) -> String {
    thread.and_then(|t| t.join().ok()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(initrd: Option<&str>) -> MachineConfig {
        MachineConfig {
            vcpus: 2,
            memory_mib: 512,
            kernel: "/boot/vmlinuz".into(),
            initrd: initrd.map(PathBuf::from),
            cmdline: "console=ttyS0 quiet cela.cmd=c2gA ".into(),
            disks: vec![],
            nets: Vec::new(),
            vsock: None,
            confine: true,
        }
    }

    const FDS: ChannelFds = ChannelFds {
        console: 5,
        control: 7,
        monitor: 9,
    };

    /// The value following `flag` (the first occurrence).
    fn value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
        let i = args.iter().position(|a| a == flag)?;
        args.get(i + 1).map(String::as_str)
    }

    fn values<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn arguments_describe_the_machine() {
        let args = qemu_args(&config(Some("/tmp/initrd.img")), FDS, 2_596_129).unwrap();
        assert_eq!(value(&args, "-M"), Some(MACHINE));
        assert_eq!(value(&args, "-accel"), Some("tcg,thread=multi"));
        assert_eq!(value(&args, "-smp"), Some("2"));
        assert_eq!(value(&args, "-m"), Some("512M"));
        assert_eq!(value(&args, "-kernel"), Some("/boot/vmlinuz"));
        assert_eq!(value(&args, "-initrd"), Some("/tmp/initrd.img"));
        assert_eq!(
            value(&args, "-append"),
            Some("console=ttyS0 quiet cela.cmd=c2gA tsc_early_khz=2596129 tsc=reliable")
        );
        for flag in [
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-no-reboot",
            "-S",
        ] {
            assert!(args.iter().any(|a| a == flag), "{flag} missing");
        }
        assert_eq!(value(&args, "-action"), Some("panic=shutdown"));
        assert_eq!(value(&args, "-sandbox"), Some(SANDBOX));
        let mut unconfined = config(None);
        unconfined.confine = false;
        let args = qemu_args(&unconfined, FDS, 1).unwrap();
        assert_eq!(
            value(&args, "-sandbox"),
            None,
            "--no-confine leaves QEMU unfiltered"
        );
    }

    #[test]
    fn channels_are_the_inherited_descriptors() {
        let args = qemu_args(&config(None), FDS, 1).unwrap();
        assert_eq!(
            values(&args, "-chardev"),
            [
                "socket,id=console,fd=5",
                "socket,id=control,fd=7",
                "socket,id=monitor,fd=9"
            ]
        );
        assert_eq!(values(&args, "-serial"), ["chardev:console"]);
        assert_eq!(
            values(&args, "-device"),
            ["isa-serial,chardev=control,iobase=0x2f8,irq=3", "pvpanic"]
        );
        assert_eq!(value(&args, "-mon"), Some("chardev=monitor,mode=control"));
        assert_eq!(value(&args, "-initrd"), None);
    }

    #[test]
    fn disks_are_virtio_1_block_devices_in_order() {
        let mut c = config(None);
        assert_eq!(value(&qemu_args(&c, FDS, 1).unwrap(), "-global"), None);
        c.disks = vec![
            crate::DiskConfig::parse("/d/a.img"),
            crate::DiskConfig::parse("/d/b,c.img,ro"),
            crate::DiskConfig {
                serial: Some("cela-rootfs".into()),
                ..crate::DiskConfig::parse("/d/root.ext4")
            },
        ];
        let args = qemu_args(&c, FDS, 1).unwrap();
        assert_eq!(
            value(&args, "-global"),
            Some("virtio-mmio.force-legacy=false")
        );
        assert_eq!(
            values(&args, "-drive"),
            [
                "file=/d/a.img,format=raw,if=none,id=d0,readonly=off,file.locking=off",
                "file=/d/b,,c.img,format=raw,if=none,id=d1,readonly=on,file.locking=off",
                "file=/d/root.ext4,format=raw,if=none,id=d2,readonly=off,file.locking=off"
            ]
        );
        assert_eq!(
            &values(&args, "-device")[2..],
            [
                "virtio-blk-device,drive=d0,serial=a.img",
                "virtio-blk-device,drive=d1,serial=b,,c.img",
                "virtio-blk-device,drive=d2,serial=cela-rootfs"
            ]
        );
    }

    #[test]
    fn a_jailed_qemus_disks_are_fd_sets_of_inherited_descriptors() {
        let mut c = config(None);
        c.disks = vec![
            crate::DiskConfig::parse("/d/a.img"),
            crate::DiskConfig::parse("/d/b.img,ro"),
        ];
        let sets = [vec![20, 21], vec![22]];
        let args = qemu_args_with_disks(&c, FDS, 1, Some(&sets), false).unwrap();
        let restoring = qemu_args_with_disks(&c, FDS, 1, Some(&sets), true).unwrap();
        // A restore adds `-incoming defer` and changes nothing else.
        assert_eq!(restoring[..args.len()], args[..]);
        assert_eq!(restoring[args.len()..], ["-incoming", "defer"]);
        assert_eq!(
            values(&args, "-add-fd"),
            ["fd=20,set=1", "fd=21,set=1", "fd=22,set=2"]
        );
        assert_eq!(
            values(&args, "-drive"),
            [
                "file=/dev/fdset/1,format=raw,if=none,id=d0,readonly=off,file.locking=off",
                "file=/dev/fdset/2,format=raw,if=none,id=d1,readonly=on,file.locking=off"
            ]
        );
    }

    /// Needs /dev/net/tun and CAP_NET_ADMIN, which this project's hosts have.
    #[test]
    fn the_nic_is_a_virtio_net_device_on_the_inherited_tap() {
        let tap = crate::net::tap::Tap::create("celaq%d").expect("creating a TAP");
        let fd = tap.as_raw_fd();
        let mut c = config(None);
        c.nets = vec![crate::net::NicConfig {
            tap: std::sync::Arc::new(tap),
            mac: [2, 0, 0, 0, 0, 0xa1],
        }];
        let args = qemu_args(&c, FDS, 1).unwrap();
        assert_eq!(
            value(&args, "-global"),
            Some("virtio-mmio.force-legacy=false")
        );
        assert_eq!(
            value(&args, "-netdev"),
            Some(format!("tap,id=net0,fd={fd}").as_str())
        );
        assert_eq!(
            values(&args, "-device").last().copied(),
            Some("virtio-net-device,netdev=net0,mac=02:00:00:00:00:a1")
        );
    }

    #[test]
    fn non_utf8_paths_are_refused_by_name() {
        use std::os::unix::ffi::OsStrExt as _;
        let mut c = config(None);
        c.kernel = PathBuf::from(std::ffi::OsStr::from_bytes(b"/boot/\xff"));
        let err = qemu_args(&c, FDS, 1).unwrap_err();
        assert!(err.to_string().starts_with("kernel /boot/"), "{err}");
    }

    // Lines as QEMU 7.2 prints them.
    const SHUTDOWN: &str = r#"{"timestamp": {"seconds": 1795664760, "microseconds": 960387}, "event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-shutdown"}}"#;
    const RESET: &str = r#"{"timestamp": {"seconds": 1795664824, "microseconds": 248551}, "event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-reset"}}"#;
    const PANICKED: &str = r#"{"timestamp": {"seconds": 1795664831, "microseconds": 930527}, "event": "GUEST_PANICKED", "data": {"action": "poweroff"}}"#;
    const HOST_SIGNAL: &str = r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "SHUTDOWN", "data": {"guest": false, "reason": "host-signal"}}"#;
    const RESUME: &str =
        r#"{"timestamp": {"seconds": 1795664758, "microseconds": 403030}, "event": "RESUME"}"#;

    fn stop_reason_of(line: &str) -> Option<StopReason> {
        stop_reason_for(&serde_json::from_str(line).unwrap_or_default())
    }

    #[test]
    fn qmp_events_map_to_guest_exits() {
        let stop_reason_for = stop_reason_of;
        let guest = |exit| Some(StopReason::Guest(exit));
        assert_eq!(stop_reason_for(SHUTDOWN), guest(GuestExit::PoweredOff));
        assert_eq!(stop_reason_for(RESET), guest(GuestExit::Rebooted));
        assert_eq!(stop_reason_for(PANICKED), guest(GuestExit::Panicked));
        assert_eq!(
            stop_reason_for(HOST_SIGNAL),
            Some(StopReason::Fault("QEMU shut down (host-signal)".into()))
        );
        assert_eq!(stop_reason_for(RESUME), None);
        assert_eq!(stop_reason_for(r#"{"return": {}}"#), None);
        assert_eq!(stop_reason_for("garbage"), None);
    }

    #[test]
    fn a_guest_status_turns_the_power_off_into_a_command_exit() {
        let stop_reason_for = stop_reason_of;
        let stop = StopSignal::new();
        stop.report_status(7);
        stop.request(stop_reason_for(SHUTDOWN).unwrap());
        assert_eq!(
            stop.outcome(),
            Some(StopReason::Guest(GuestExit::Command(7)))
        );
        // A panic is reported first and wins over the shutdown that follows it.
        let stop = StopSignal::new();
        stop.request(stop_reason_for(PANICKED).unwrap());
        stop.request(stop_reason_for(SHUTDOWN).unwrap());
        assert_eq!(stop.outcome(), Some(StopReason::Guest(GuestExit::Panicked)));
    }

    #[test]
    fn the_host_tsc_frequency_is_measured() {
        let khz = host_tsc_khz().expect("a plausible TSC frequency");
        // Between 100 MHz and 20 GHz, as any x86 host of this century.
        assert!((100_000..20_000_000).contains(&khz), "{khz}");
    }

    #[test]
    fn the_binary_is_searched_on_path() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("not-exec");
        std::fs::write(&plain, "").unwrap();
        let path = format!("::{}:/bin", dir.path().display());
        assert_eq!(find_on_path("sh", &path), Some(PathBuf::from("/bin/sh")));
        assert_eq!(find_on_path("not-exec", &path), None);
        assert_eq!(find_on_path("no-such-binary-cela", &path), None);
        assert!(
            QemuError::NotInstalled
                .to_string()
                .contains("apt-get install qemu-system-x86")
        );
    }

    /// Boots a real guest: set CELA_TEST_KERNEL to a bzImage and CELA_TEST_INITRD to a cela
    /// initramfs (cela-init as /init, busybox in /bin), then run with `--ignored`.
    #[test]
    #[ignore = "needs qemu-system-x86_64, a kernel and a cela initramfs (CELA_TEST_KERNEL, CELA_TEST_INITRD)"]
    fn boots_a_real_guest_and_reports_its_status() {
        let (Some(kernel), Some(initrd)) = (
            std::env::var_os("CELA_TEST_KERNEL"),
            std::env::var_os("CELA_TEST_INITRD"),
        ) else {
            panic!("set CELA_TEST_KERNEL and CELA_TEST_INITRD");
        };
        let boot = |argv: &[&str]| {
            let request = cela_guest::BootRequest {
                command: Some(argv.iter().map(|s| s.to_string()).collect()),
                ..Default::default()
            };
            let config = MachineConfig {
                vcpus: 1,
                memory_mib: 256,
                kernel: kernel.clone().into(),
                initrd: Some(initrd.clone().into()),
                cmdline: format!("{} {}", crate::BASE_CMDLINE, request.to_kernel_params()),
                disks: vec![],
                nets: Vec::new(),
                vsock: None,
                confine: true,
            };
            run(&config, ConsoleMode::Stream).unwrap()
        };
        assert_eq!(
            boot(&["sh", "-c", "echo hello; exit 7"]),
            GuestExit::Command(7)
        );
        assert_eq!(boot(&["poweroff"]), GuestExit::PoweredOff);
        assert_eq!(boot(&["reboot"]), GuestExit::Rebooted);
        assert_eq!(
            boot(&["sh", "-c", "echo c > /proc/sysrq-trigger"]),
            GuestExit::Panicked
        );
    }
}
