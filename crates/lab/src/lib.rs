//! The nested virtualization lab: a test fixture that runs shell scenarios inside an L1 Linux
//! guest that has a real `/dev/kvm`, so cela's VMM can boot a stock Debian kernel (L2) there.
//!
//! # Why
//! This host's `/dev/kvm` is PVM, a software KVM that cannot boot a stock Linux kernel. So the
//! lab boots Debian's cloud kernel as an *L1* guest under QEMU's TCG emulator with `-cpu max`,
//! which emulates AMD SVM with nested paging; inside L1, the kernel's own `kvm`/`kvm-amd`
//! modules give a working `/dev/kvm`, and cela's VMM (copied into L1) boots its L2 guest there.
//!
//! # A run
//! [`Lab::new`] finds `qemu-system-x86_64` and fetches the L1 kernel, its modules and busybox
//! through `cela_assets` into a cache (`$CELA_LAB_CACHE`, default `/var/tmp/cela-lab-cache`).
//! [`Lab::run`] then, for one [`LabRun`]:
//! 1. builds an uncompressed newc initramfs in a temporary directory: busybox and its applet
//!    links, the modules `irqbypass`, `kvm`, `kvm-amd`, `tun` and `pvpanic`/`pvpanic-mmio`
//!    (and with [`LabRun::networks`] those of cela's networks: `bridge`, `veth`, nftables),
//!    dependencies first, the
//!    caller's files (directories recursively; dynamically linked programs with the libraries
//!    and loader `ldd` names), one script per scenario, and an `/init` script
//!    (`src/protocol.rs` documents it and the console framing);
//! 2. boots QEMU with the flags in `src/qemu.rs` (one place, each flag explained):
//!    `-accel tcg,thread=multi -cpu max -smp N -m MiB -nographic -no-reboot
//!    -M microvm,pit=on,rtc=on -kernel … -initrd … -append "`[`L1_CMDLINE`]`"
//!    -device pvpanic -action panic=exit-failure` (an L1 panic ends QEMU at once);
//! 3. `/init` mounts proc/sys/devtmpfs/tmp, loads the modules with `insmod`, checks
//!    `/dev/kvm`, runs each scenario in `/lab` under busybox `timeout` with its stdout and
//!    stderr in files, prints the results as base64 marker lines on the console, and powers off;
//! 4. the host reads the console through a pipe with a wall-clock bound ([`LabRun::timeout`];
//!    QEMU is killed past it, and whenever the run is abandoned, even by a panic), and parses
//!    the results into a [`LabReport`].
//!
//! One boot runs all scenarios of a run, in order: batch scenarios into one run. Runs on one
//! machine are serialized with a lock file in the cache directory (`lab.lock`): the lab uses both
//! cores, and two at once would only make both slower and their timeouts flaky. A run's timeout
//! counts from when it holds the lock.
//!
//! # Timings
//! Measured on the 2-core development host (AMD EPYC, TSC 2.6 GHz) with QEMU 7.2, Debian's
//! 6.1 cloud kernel, 2 vCPUs and 2 GiB, running `cela-lab -- true` (one trivial scenario):
//! - L1 kernel boot, to `/init`: 0.9-1.2 s of L1 uptime on an idle host;
//! - modules loaded and `/dev/kvm` checked (`LabReport::l1_ready_seconds`): 1.3-1.6 s;
//! - whole run, host wall time (`LabReport::wall`): 1.9-2.3 s (the rest is building the
//!   initramfs, QEMU start-up, kernel decompression and power-off);
//! - all three grow by up to ~70 % while other builds load the host (seen: /init at 2.2 s,
//!   ready at 2.9 s, wall 3.9 s);
//! - a scenario's output crosses the emulated UART as base64: about 200 KB/s, so 1 MB of
//!   stdout adds ~5 s. Keep big data out of stdout, or summarize it inside L1.
//!
//! A boot that hangs is reported after 120 s (no `@@LAB ready` on the console), not at the end
//! of the run's timeout.
//!
//! L1 uptime tracks real time (`src/tsc.rs` says why that needed care), so
//! `l1_seconds` can be read as seconds.
//!
//! # Debugging
//! Set `CELA_LAB_CONSOLE=1` to copy the L1 console to stderr as it arrives (the CLI's
//! `--console`). Every error raised after QEMU started carries the console and prints its tail.

mod error;
mod initramfs;
mod protocol;
mod qemu;
mod tsc;

use std::borrow::Cow;
use std::env;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cela_assets::Progress;
use cela_assets::debian::{self, DebianKernel};
use nix::fcntl::{Flock, FlockArg};

pub use error::LabError;
pub use qemu::{L1_CMDLINE, l1_cmdline};

use error::IoContext;
use initramfs::{Entry, Source, Tree, archive_path};
use protocol::ScenarioPlan;

/// The kernel modules L1 loads: KVM for AMD (its closure brings `kvm` and `irqbypass`), TUN
/// for VMM network tests, and pvpanic-mmio so that an L1 panic ends QEMU at once.
const L1_MODULES: &[&str] = &["kvm_amd", "tun", "pvpanic_mmio"];

/// What a run with [`LabRun::networks`] loads beside them: what cela's named networks use,
/// bridges, veths and the nftables expressions of their rules (the bridge family's port guard
/// with its own `meta`, NAT, connection marks, `fib`), with their closures (conntrack, nf_nat,
/// nfnetlink). L1 has no modprobe: a missing one fails a rule with "No such file or
/// directory". Only the runs that use networks load them, so every other run boots L1 as it
/// always has.
const L1_NET_MODULES: &[&str] = &[
    "bridge",
    "veth",
    "nf_tables",
    "nft_ct",
    "nft_nat",
    "nft_masq",
    "nft_chain_nat",
    "nft_fib_inet",
    "nft_meta_bridge",
];

/// Where in L1 the modules are put.
const L1_MODULE_DIR: &str = "lib/modules/lab";

/// Busybox applets the `/init` script uses; checked when the lab is set up.
const REQUIRED_APPLETS: &[&str] = &[
    "sh", "mount", "dmesg", "tail", "insmod", "poweroff", "setsid", "timeout", "base64", "sed",
    "wc", "usleep",
];

/// L1 paths a caller's file may not go to: `/init` and the scenario directory are the lab's,
/// and the mount points would hide anything put there.
const RESERVED: &[&str] = &[
    "init",
    protocol::WORK_DIR,
    "proc",
    "sys",
    "dev",
    "tmp",
    "bin/busybox",
];

/// How long L1 may take to boot, load its modules and find /dev/kvm (normally 1-3 s). A boot
/// that hangs (as an L1 kernel left to calibrate its TSC against the emulated PIT sometimes did)
/// is reported after this rather than at the end of the run's timeout.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// The default cache directory for the L1 kernel and busybox.
pub const DEFAULT_CACHE: &str = "/var/tmp/cela-lab-cache";

/// What the lab needs on the host: QEMU, the L1 kernel and modules, busybox.
#[derive(Debug)]
pub struct Lab {
    qemu: PathBuf,
    kernel: DebianKernel,
    /// Kernel modules for L1, dependencies first.
    modules: Vec<PathBuf>,
    /// Those and the networks' ([`LabRun::networks`]), dependencies first.
    net_modules: Vec<PathBuf>,
    busybox: PathBuf,
    /// Busybox's applet links as archive paths (`bin/ls`, `sbin/insmod`, …).
    applets: Vec<String>,
    cache: PathBuf,
}

/// One lab boot: files to copy into L1 and the scenarios to run there, in order.
#[derive(Debug, Clone)]
pub struct LabRun {
    /// Host file or directory → absolute L1 path. Directories are copied recursively, symlinks
    /// followed; a dynamically linked program brings its shared libraries and loader.
    pub files: Vec<(PathBuf, String)>,
    pub scenarios: Vec<Scenario>,
    /// L1 memory in MiB (default 2048).
    pub mem_mib: u32,
    /// L1 vCPUs (default 2).
    pub smp: u32,
    /// Wall-clock bound for the whole run, boot included (default 900 s).
    pub timeout: Duration,
    /// Copy the L1 console to stderr as it arrives (default: `CELA_LAB_CONSOLE` is set and not
    /// `0`).
    pub echo_console: bool,
    /// Load the kernel modules cela's named networks need (default false).
    pub networks: bool,
}

/// A shell script run in L1 (`sh`, busybox ash) with cwd `/lab`, stdin `/dev/null`, and
/// `PATH=/lab:/bin:/sbin:/usr/bin:/usr/sbin`.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Unique within a run; [`LabReport::get`] finds the result by it.
    pub name: String,
    pub script: String,
    /// Enforced inside L1 by busybox `timeout`, rounded up to whole seconds (default 300 s).
    pub timeout: Duration,
}

/// What one scenario did.
#[derive(Debug, Clone, PartialEq)]
pub struct ScenarioResult {
    pub name: String,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// The script's exit status; 128+N if a signal N ended it (143 when it timed out).
    pub rc: i32,
    /// L1 uptime elapsed around the script (centisecond resolution).
    pub l1_seconds: f64,
    /// Whether the scenario's timeout ended it (rc 143 after at least its timeout).
    pub timed_out: bool,
}

/// The results of a run.
#[derive(Debug, Clone)]
pub struct LabReport {
    /// One per scenario, in the order of [`LabRun::scenarios`].
    pub results: Vec<ScenarioResult>,
    /// The whole L1 console (`\r\n` folded to `\n`), for diagnostics.
    pub console: String,
    /// Host wall time of the run: initramfs build, boot, scenarios, power-off.
    pub wall: Duration,
    /// L1 uptime when `/init` started: how long the L1 kernel took to boot.
    pub l1_init_seconds: f64,
    /// L1 uptime when the modules were loaded and the first scenario started.
    pub l1_ready_seconds: f64,
}

impl Default for LabRun {
    fn default() -> Self {
        LabRun {
            files: Vec::new(),
            scenarios: Vec::new(),
            mem_mib: 2048,
            smp: 2,
            timeout: Duration::from_secs(900),
            echo_console: env::var_os("CELA_LAB_CONSOLE")
                .is_some_and(|v| v != "0" && !v.is_empty()),
            networks: false,
        }
    }
}

impl LabRun {
    /// A run with the defaults and nothing in it.
    pub fn new() -> Self {
        Self::default()
    }

    /// Copies host `src` (file or directory) to the absolute L1 path `dest`.
    pub fn file(mut self, src: impl Into<PathBuf>, dest: impl Into<String>) -> Self {
        self.files.push((src.into(), dest.into()));
        self
    }

    /// Appends a scenario.
    pub fn scenario(mut self, scenario: Scenario) -> Self {
        self.scenarios.push(scenario);
        self
    }

    /// Checks what the lab cannot do before anything is built or booted.
    fn validate(&self) -> Result<(), LabError> {
        let bad = |msg: String| Err(LabError::InvalidRun(msg));
        if self.scenarios.is_empty() {
            return bad("no scenarios".into());
        }
        if self.mem_mib < 256 {
            return bad(format!(
                "mem_mib {} is below the 256 MiB L1 needs",
                self.mem_mib
            ));
        }
        if self.smp == 0 {
            return bad("smp must be at least 1".into());
        }
        for (i, s) in self.scenarios.iter().enumerate() {
            if s.name.is_empty() {
                return bad(format!("scenario {i} has an empty name"));
            }
            if self.scenarios[..i].iter().any(|o| o.name == s.name) {
                return bad(format!("two scenarios are named {:?}", s.name));
            }
            if s.timeout.is_zero() {
                return bad(format!("scenario {:?} has a zero timeout", s.name));
            }
        }
        for (src, dest) in &self.files {
            let path = archive_path(dest).map_err(LabError::InvalidRun)?;
            if let Some(r) = RESERVED
                .iter()
                .find(|r| path == **r || path.starts_with(&format!("{r}/")))
            {
                return bad(format!(
                    "{} cannot go to {dest}: /{r} belongs to the lab or is a mount point in L1",
                    src.display()
                ));
            }
        }
        Ok(())
    }
}

impl Scenario {
    /// A scenario with the default timeout (300 s).
    pub fn new(name: impl Into<String>, script: impl Into<String>) -> Self {
        Scenario {
            name: name.into(),
            script: script.into(),
            timeout: Duration::from_secs(300),
        }
    }

    /// Sets the timeout enforced inside L1.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    fn timeout_secs(&self) -> u64 {
        self.timeout.as_secs() + u64::from(self.timeout.subsec_nanos() > 0)
    }
}

impl ScenarioResult {
    /// stdout as text (invalid UTF-8 replaced).
    pub fn stdout_str(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(&self.stdout)
    }

    /// stderr as text (invalid UTF-8 replaced).
    pub fn stderr_str(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(&self.stderr)
    }

    /// Panics, showing the scenario's output, unless it exited with `rc`.
    #[track_caller]
    pub fn expect_rc(&self, rc: i32) -> &Self {
        assert!(
            self.rc == rc,
            "lab scenario {:?} exited {} (expected {rc}){}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.name,
            self.rc,
            if self.timed_out { ", timed out" } else { "" },
            self.stdout_str(),
            self.stderr_str()
        );
        self
    }
}

impl LabReport {
    /// The result of scenario `name`. Panics with the L1 console if there is none: this is a
    /// test fixture, and the console says why.
    #[track_caller]
    pub fn get(&self, name: &str) -> &ScenarioResult {
        match self.results.iter().find(|r| r.name == name) {
            Some(r) => r,
            None => panic!(
                "the lab run has no scenario named {name:?} (it has {:?}); L1 console:\n{}",
                self.results.iter().map(|r| &r.name).collect::<Vec<_>>(),
                self.console
            ),
        }
    }
}

impl Lab {
    /// Finds `qemu-system-x86_64` (or `$CELA_LAB_QEMU`) and fetches the L1 kernel, its modules
    /// and busybox into the cache (`$CELA_LAB_CACHE`, default [`DEFAULT_CACHE`]), showing
    /// progress when stderr is a terminal.
    pub fn new() -> Result<Lab, LabError> {
        let cache = env::var_os("CELA_LAB_CACHE")
            .filter(|v| !v.is_empty())
            .map_or_else(|| PathBuf::from(DEFAULT_CACHE), PathBuf::from);
        Lab::with_cache(&cache, &Progress::new())
    }

    /// Like [`Lab::new`], with an explicit cache directory and progress display.
    pub fn with_cache(cache: &Path, progress: &Progress) -> Result<Lab, LabError> {
        // QEMU first: a missing QEMU should not cost a kernel download to find out.
        let qemu = find_qemu()?;
        fs::create_dir_all(cache).at("creating the lab cache directory", cache)?;
        let assets = |source| LabError::Assets {
            cache: cache.to_owned(),
            source,
        };
        let kernel = debian::fetch_kernel(cache, progress).map_err(assets)?;
        let modules = kernel.module_closure(L1_MODULES).map_err(assets)?;
        let net_modules = kernel
            .module_closure(&[L1_MODULES, L1_NET_MODULES].concat())
            .map_err(assets)?;
        if let Some(m) = net_modules
            .iter()
            .find(|m| m.extension().is_none_or(|e| e != "ko"))
        {
            return Err(LabError::Command {
                command: "loading L1 modules".into(),
                detail: format!(
                    "{} is compressed; the lab loads plain .ko files with busybox insmod",
                    m.display()
                ),
            });
        }
        let busybox = debian::fetch_busybox(cache, progress).map_err(assets)?;
        let applets = busybox_applets(&busybox)?;
        Ok(Lab {
            qemu,
            kernel,
            modules,
            net_modules,
            busybox,
            applets,
            cache: cache.to_owned(),
        })
    }

    /// The QEMU binary the lab runs.
    pub fn qemu(&self) -> &Path {
        &self.qemu
    }

    /// The L1 kernel.
    pub fn kernel(&self) -> &DebianKernel {
        &self.kernel
    }

    /// Boots L1 once and runs the scenarios of `run` in order.
    pub fn run(&self, run: &LabRun) -> Result<LabReport, LabError> {
        run.validate()?;
        let _lock = self.lock()?;
        let start = Instant::now();
        let deadline = start + run.timeout;

        let work = tempfile::Builder::new()
            .prefix("cela-lab-")
            .tempdir()
            .at("creating a temporary directory in", env::temp_dir())?;
        let initrd = work.path().join("l1.cpio");
        self.initramfs(run)?.write_cpio(&initrd)?;

        let qmp = Some(work.path().join("qmp.sock")).filter(|p| qemu::usable_socket_path(p));
        let cmd = qemu::command(
            &self.qemu,
            &self.kernel.bzimage,
            &initrd,
            run.mem_mib,
            run.smp,
            qmp.as_deref(),
        );
        let bounds = qemu::Bounds {
            deadline,
            ready: Some((protocol::READY_MARK, Instant::now() + READY_TIMEOUT)),
            silence: Some(protocol::SILENCE_BOUND),
        };
        let outcome = qemu::run(cmd, &bounds, run.echo_console, qmp.as_deref())?;
        let wall = start.elapsed();
        let console = String::from_utf8_lossy(&outcome.console).replace("\r\n", "\n");
        report(run, outcome, console, wall)
    }

    /// Holds the machine-wide lab lock until dropped.
    fn lock(&self) -> Result<Flock<File>, LabError> {
        let path = self.cache.join("lab.lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .at("opening the lab lock", &path)?;
        let file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(lock),
            Err((file, nix::errno::Errno::EWOULDBLOCK)) => file,
            Err((_, errno)) => return Err(std::io::Error::from(errno)).at("locking", &path),
        };
        // Another lab run holds the machine; it is bounded by its own timeout.
        eprintln!(
            "cela-lab: waiting for another lab run to finish (lock {})",
            path.display()
        );
        Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, errno)| std::io::Error::from(errno))
            .at("locking", &path)
    }

    /// The L1 file tree for `run`.
    fn initramfs(&self, run: &LabRun) -> Result<Tree, LabError> {
        let invalid = LabError::InvalidRun;
        let mut tree = Tree::default();
        for dir in ["proc", "sys", "dev", "lab", "run", protocol::WORK_DIR] {
            tree.dir(dir, 0o755).map_err(invalid)?;
        }
        tree.dir("tmp", 0o1777).map_err(invalid)?;
        tree.put("bin/busybox", host_file(&self.busybox, 0o755))
            .map_err(invalid)?;
        for applet in &self.applets {
            let link = Entry::Symlink {
                target: "/bin/busybox".into(),
            };
            tree.put(applet, link).map_err(invalid)?;
        }
        let mut module_paths = Vec::new();
        let modules = if run.networks {
            &self.net_modules
        } else {
            &self.modules
        };
        for module in modules {
            let name = module.file_name().unwrap_or_default().to_string_lossy();
            let path = format!("{L1_MODULE_DIR}/{name}");
            tree.put(&path, host_file(module, 0o644)).map_err(invalid)?;
            module_paths.push(format!("/{path}"));
        }
        for (src, dest) in &run.files {
            let path = archive_path(dest).map_err(invalid)?;
            initramfs::add_host_path(&mut tree, src, &path)?;
        }
        let mut plans = Vec::new();
        for (i, s) in run.scenarios.iter().enumerate() {
            let script = Entry::File {
                source: Source::Bytes(s.script.clone().into_bytes()),
                mode: 0o644,
            };
            tree.put(&protocol::script_path(i), script)
                .map_err(invalid)?;
            plans.push(ScenarioPlan {
                timeout_secs: s.timeout_secs(),
            });
        }
        let init = Entry::File {
            source: Source::Bytes(protocol::init_script(&module_paths, &plans).into_bytes()),
            mode: 0o755,
        };
        tree.put("init", init).map_err(invalid)?;
        Ok(tree)
    }
}

fn host_file(path: &Path, mode: u32) -> Entry {
    Entry::File {
        source: Source::Host(path.to_owned()),
        mode,
    }
}

/// Turns what QEMU printed into results, or the error that explains why there are none.
fn report(
    run: &LabRun,
    outcome: qemu::Outcome,
    console: String,
    wall: Duration,
) -> Result<LabReport, LabError> {
    let parsed = protocol::parse(&console, run.scenarios.len());
    let name_of = |i: Option<usize>| i.map(|i| run.scenarios[i].name.clone());
    if let Some(message) = parsed.as_ref().ok().and_then(|t| t.fatal.clone()) {
        return Err(LabError::L1 { message, console });
    }
    let status = match outcome.end {
        qemu::End::Exited(status) => status,
        qemu::End::NotReady => {
            return Err(LabError::NotReady {
                waited: READY_TIMEOUT,
                console,
            });
        }
        qemu::End::Deadline => {
            let scenario = parsed.as_ref().ok().and_then(|t| name_of(t.running));
            return Err(LabError::Timeout {
                timeout: run.timeout,
                scenario,
                console,
            });
        }
        qemu::End::Silent => {
            let scenario = parsed.as_ref().ok().and_then(|t| name_of(t.running));
            return Err(LabError::Frozen {
                silent_for: protocol::SILENCE_BOUND,
                scenario,
                console,
                qemu_state: outcome.frozen_state.unwrap_or_default(),
            });
        }
    };
    let t = match parsed {
        Ok(t) => t,
        Err(message) => return Err(LabError::Protocol { message, console }),
    };
    if !t.done {
        return Err(LabError::Exited {
            status: status.to_string(),
            scenario: name_of(t.running),
            stderr: String::from_utf8_lossy(&outcome.stderr).into_owned(),
            console,
        });
    }
    let mut results = Vec::new();
    for (scenario, raw) in run.scenarios.iter().zip(t.results) {
        let Some(raw) = raw else {
            return Err(LabError::Protocol {
                message: format!("no result for scenario {:?}", scenario.name),
                console,
            });
        };
        let l1_seconds = raw.t1 - raw.t0;
        results.push(ScenarioResult {
            name: scenario.name.clone(),
            timed_out: raw.rc == 143 && l1_seconds + 0.5 >= scenario.timeout_secs() as f64,
            stdout: raw.stdout,
            stderr: raw.stderr,
            rc: raw.rc,
            l1_seconds,
        });
    }
    Ok(LabReport {
        results,
        console,
        wall,
        l1_init_seconds: t.init.unwrap_or(f64::NAN),
        l1_ready_seconds: t.ready.unwrap_or(f64::NAN),
    })
}

/// `$CELA_LAB_QEMU`, or `qemu-system-x86_64` on `PATH`.
fn find_qemu() -> Result<PathBuf, LabError> {
    find_qemu_in(
        env::var_os("CELA_LAB_QEMU").filter(|v| !v.is_empty()),
        &env::var_os("PATH").unwrap_or_default(),
    )
}

fn find_qemu_in(explicit: Option<OsString>, path_var: &OsStr) -> Result<PathBuf, LabError> {
    const QEMU: &str = "qemu-system-x86_64";
    const HINT: &str = "the nested lab runs L1 under QEMU: apt-get install qemu-system-x86 \
                        (or set CELA_LAB_QEMU to the binary)";
    if let Some(path) = explicit {
        let path = PathBuf::from(path);
        if is_executable(&path) {
            return Ok(path);
        }
        return Err(LabError::MissingTool {
            tool: QEMU,
            looked: format!("CELA_LAB_QEMU={}", path.display()),
            hint: HINT,
        });
    }
    for dir in env::split_paths(path_var) {
        let candidate = dir.join(QEMU);
        if is_executable(&candidate) {
            return Ok(candidate);
        }
    }
    Err(LabError::MissingTool {
        tool: QEMU,
        looked: format!("PATH={}", path_var.to_string_lossy()),
        hint: HINT,
    })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Busybox's applet links as archive paths, from `busybox --list-full`, checked for the applets
/// `/init` uses.
fn busybox_applets(busybox: &Path) -> Result<Vec<String>, LabError> {
    let command = format!("{} --list-full", busybox.display());
    let out = Command::new(busybox)
        .arg("--list-full")
        .output()
        .map_err(|e| LabError::Command {
            command: command.clone(),
            detail: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(LabError::Command {
            command,
            detail: format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr)),
        });
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let applets: Vec<String> = text
        .lines()
        .map(|l| l.trim().trim_start_matches('/').to_owned())
        .filter(|l| !l.is_empty() && l != "bin/busybox" && archive_path(&format!("/{l}")).is_ok())
        .collect();
    let missing: Vec<&str> = REQUIRED_APPLETS
        .iter()
        .copied()
        .filter(|a| !applets.iter().any(|l| l.rsplit('/').next() == Some(a)))
        .collect();
    if !missing.is_empty() {
        return Err(LabError::Command {
            command,
            detail: format!(
                "busybox lacks applets the lab's /init needs: {}",
                missing.join(", ")
            ),
        });
    }
    Ok(applets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_what_is_wrong() {
        let ok = LabRun::new().scenario(Scenario::new("a", "true"));
        assert!(ok.validate().is_ok());
        let err = |r: LabRun| r.validate().unwrap_err().to_string();
        assert!(err(LabRun::new()).contains("no scenarios"));
        let dup = ok.clone().scenario(Scenario::new("a", "false"));
        assert!(err(dup).contains("two scenarios are named \"a\""));
        let tmp = ok.clone().file("/etc/hostname", "/tmp/hostname");
        assert!(err(tmp).contains("mount point"));
        let init = ok.clone().file("/etc/hostname", "/init");
        assert!(err(init).contains("/init belongs to the lab"));
        let rel = ok.clone().file("/etc/hostname", "lab/x");
        assert!(err(rel).contains("not absolute"));
        assert!(
            ok.clone()
                .file("/etc/hostname", "/lab/hostname")
                .validate()
                .is_ok()
        );
        // "/tmpx" is not under "/tmp".
        assert!(ok.file("/etc/hostname", "/tmpx/h").validate().is_ok());
    }

    #[test]
    fn a_missing_qemu_is_named_with_where_we_looked_and_how_to_install_it() {
        let empty = tempfile::tempdir().unwrap();
        let err = find_qemu_in(None, empty.path().as_os_str())
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("`qemu-system-x86_64` not found"), "{err}");
        assert!(err.contains(&empty.path().display().to_string()), "{err}");
        assert!(err.contains("apt-get install qemu-system-x86"), "{err}");
        let err = find_qemu_in(Some("/nonexistent/qemu".into()), OsStr::new(""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("CELA_LAB_QEMU=/nonexistent/qemu"), "{err}");
        // A directory on PATH holding an executable of that name is found.
        let bin = empty.path().join("qemu-system-x86_64");
        fs::write(&bin, "#!/bin/sh\n").unwrap();
        fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        assert_eq!(find_qemu_in(None, empty.path().as_os_str()).unwrap(), bin);
    }

    fn outcome(console: &str, end: qemu::End) -> (qemu::Outcome, String) {
        let out = qemu::Outcome {
            console: console.as_bytes().to_vec(),
            stderr: Vec::new(),
            end,
            frozen_state: None,
        };
        (out, console.to_owned())
    }

    fn exited(code: i32) -> qemu::End {
        qemu::End::Exited(std::os::unix::process::ExitStatusExt::from_raw(code << 8))
    }

    fn two() -> LabRun {
        LabRun::new()
            .scenario(Scenario::new("first", "true"))
            .scenario(Scenario::new("second", "sleep 9").with_timeout(Duration::from_secs(2)))
    }

    #[test]
    fn a_complete_console_becomes_a_report() {
        let (out, console) = outcome(
            "@@LAB init 1.0\n@@LAB ready 1.5\n@@LAB 0 begin\n@@LAB 0 stdout aGkK\n\
             @@LAB 0 end 0 1.50 1.75 3 0\n@@LAB 1 begin\n@@LAB 1 end 143 1.80 3.81 0 0\n\
             @@LAB done\n",
            exited(0),
        );
        let r = report(&two(), out, console, Duration::from_secs(3)).unwrap();
        assert_eq!((r.l1_init_seconds, r.l1_ready_seconds), (1.0, 1.5));
        let first = r.get("first");
        assert_eq!((first.rc, first.stdout_str().as_ref()), (0, "hi\n"));
        assert!((first.l1_seconds - 0.25).abs() < 1e-9 && !first.timed_out);
        assert!(r.get("second").timed_out);
    }

    #[test]
    fn each_way_of_failing_is_its_own_error() {
        let begun = "@@LAB init 1\n@@LAB ready 2\n@@LAB 0 begin\n";
        let (out, console) = outcome(begun, qemu::End::Deadline);
        let err = report(&two(), out, console, Duration::ZERO).unwrap_err();
        assert!(matches!(&err, LabError::Timeout { scenario: Some(s), .. } if s == "first"));

        let (out, console) = outcome("[ 0.1] booting\n", qemu::End::NotReady);
        let err = report(&two(), out, console, Duration::ZERO).unwrap_err();
        assert!(matches!(err, LabError::NotReady { .. }));
        assert!(err.to_string().contains("[ 0.1] booting"));

        let (out, console) = outcome("@@LAB init 1\n@@LAB fatal no /dev/kvm\n", exited(0));
        let err = report(&two(), out, console, Duration::ZERO).unwrap_err();
        assert!(matches!(&err, LabError::L1 { message, .. } if message == "no /dev/kvm"));

        let (out, console) = outcome(begun, exited(0));
        let err = report(&two(), out, console, Duration::ZERO).unwrap_err();
        assert!(matches!(&err, LabError::Exited { scenario: Some(s), .. } if s == "first"));

        let (out, console) = outcome("@@LAB 0 end 0 1 2 5 0\n@@LAB done\n", exited(0));
        let err = report(&two(), out, console, Duration::ZERO).unwrap_err();
        assert!(matches!(err, LabError::Protocol { .. }), "{err}");
    }

    #[test]
    #[should_panic(expected = "no scenario named \"third\"")]
    fn get_panics_naming_the_missing_scenario() {
        let (out, console) = outcome(
            "@@LAB 0 end 0 1 2 0 0\n@@LAB 1 end 0 1 2 0 0\n@@LAB done\n",
            exited(0),
        );
        report(&two(), out, console, Duration::ZERO)
            .unwrap()
            .get("third");
    }

    #[test]
    fn scenario_timeouts_round_up_to_seconds() {
        let s = Scenario::new("a", "true").with_timeout(Duration::from_millis(1500));
        assert_eq!(s.timeout_secs(), 2);
        assert_eq!(Scenario::new("a", "true").timeout_secs(), 300);
    }
}
