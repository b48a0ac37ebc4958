//! The monitor's system-call filters: one allow-list per kind of thread, each entry with the
//! reason it is there. A guest that takes over a device emulation (a virtio queue parser, a
//! port handler) holds the thread that runs it; the filter leaves that thread only the calls
//! its job needs: no `open`, no `execve`, no new sockets but Unix ones, no `ptrace`, no
//! `mount`, only the KVM and TAP `ioctl`s it issues.
//!
//! | kind | threads | job |
//! |---|---|---|
//! | [`ThreadKind::Vcpu`] | `vcpu<N>` | `KVM_RUN`, port and MMIO exits into the devices |
//! | [`ThreadKind::Device`] | `virtio-devices`, and the `guest-*` threads it starts | virtio queues: disk I/O, TAP frames, vsock's Unix sockets, entropy |
//! | [`ThreadKind::Console`] | `console-in`, `host-signals` | host stdin into COM1; SIGINT/SIGTERM into stop requests |
//! | [`ThreadKind::Main`] | the jailed monitor's main thread | starting the other threads, waiting for the machine to stop, stopping it, the report |
//! | [`ThreadKind::Control`] | `control` | the caller's requests ([`crate::control`]): reading the paused machine, writing it into files the caller passed; the guest's names to its init |
//!
//! Each thread installs its filter itself as the first thing it does, before it handles
//! anything the guest made (a vCPU before its first `KVM_RUN`), with no_new_privs. Threads a
//! filtered thread starts inherit its filter. A call outside the list traps: the SIGSYS
//! handler writes one line naming the call and the thread kind to stderr ("the monitor was
//! killed by its seccomp filter: syscall ptrace on a vCPU thread") and ends the process with
//! status 159 (128 + SIGSYS), never a hang.
//!
//! The main thread gets its filter in a jailed monitor ([`crate::jail`]) once it has started
//! every other thread (filters are inherited and only add up); a monitor that is not jailed
//! (the seccomp tests, `boot_bare` callers) leaves its main thread unfiltered. In a jailed
//! monitor the SIGSYS report also goes to the caller on the report pipe, so the instance
//! records it.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::Arc;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// The exit status of a monitor its filter stopped: 128 + SIGSYS, as a shell reports a
/// process killed by that signal.
pub const KILLED_STATUS: i32 = 128 + libc::SIGSYS;

/// What a thread of the monitor does, and so which filter it runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ThreadKind {
    Vcpu = 1,
    Device = 2,
    Console = 3,
    Main = 4,
    Control = 5,
}

impl ThreadKind {
    fn describe(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "a vCPU thread",
            ThreadKind::Device => "the device thread",
            ThreadKind::Console => "a console thread",
            ThreadKind::Main => "the main thread",
            ThreadKind::Control => "the control thread",
        }
    }

    fn from_u8(v: u8) -> Option<ThreadKind> {
        match v {
            1 => Some(ThreadKind::Vcpu),
            2 => Some(ThreadKind::Device),
            3 => Some(ThreadKind::Console),
            4 => Some(ThreadKind::Main),
            5 => Some(ThreadKind::Control),
            _ => None,
        }
    }
}

/// Why the filters could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("building the monitor's seccomp filter for {kind}: {source}")]
    Build {
        kind: &'static str,
        source: seccompiler::BackendError,
    },
    #[error("installing the monitor's seccomp filter on {kind}: {source}")]
    Apply {
        kind: &'static str,
        source: seccompiler::Error,
    },
    #[error("installing the monitor's SIGSYS handler: {0}")]
    Handler(std::io::Error),
}

/// The compiled filters of every thread kind, built once per machine and shared.
#[derive(Debug, Clone)]
pub struct Filters {
    vcpu: Arc<BpfProgram>,
    device: Arc<BpfProgram>,
    console: Arc<BpfProgram>,
    main: Arc<BpfProgram>,
    control: Arc<BpfProgram>,
    /// The jail the main thread enters before it starts the machine's threads (a jailed
    /// monitor only); taken once.
    jail: Arc<std::sync::Mutex<Option<crate::jail::Jail>>>,
    /// Set once the jail is entered, until the main thread is filtered.
    jailed: Arc<std::sync::atomic::AtomicBool>,
    /// Stacked on the device thread's: `clone3` fails with ENOSYS. Its flags sit in memory
    /// a filter cannot read, so it could make a process; the C library then falls back to
    /// `clone`, whose flags the device filter checks. (With two filters the stricter answer
    /// wins, so the device filter itself allows `clone3` and this one answers it.)
    no_clone3: Arc<BpfProgram>,
    /// Stacked on every thread's: `openat` fails with ENOENT. glibc's allocator reads
    /// `/proc/sys/vm/overcommit_memory` the first time it shrinks a thread arena's heap, from
    /// whichever thread freed the memory, whenever that happens (a forked monitor inherits its
    /// parent's arenas, so even its main thread may use one); killing the monitor for it killed
    /// machines at random (seen in the lab; Cloud Hypervisor met the same and allows read-only
    /// opens). Here such an open is let through the thread's own filter (read-only and
    /// close-on-exec exactly, as glibc's are) only to be refused by this one: glibc takes the
    /// failure as "do not shrink that way", and nothing is opened. Any other `openat` is still
    /// a violation (the stricter answer of two filters wins).
    no_open: Arc<BpfProgram>,
}

impl Filters {
    /// Compiles the filters of every thread kind.
    pub fn new() -> Result<Filters, SeccompError> {
        let build = |kind: ThreadKind, rules: Rules| -> Result<Arc<BpfProgram>, SeccompError> {
            let err = |source| SeccompError::Build {
                kind: kind.describe(),
                source,
            };
            let filter = SeccompFilter::new(
                rules.0,
                SeccompAction::Trap,
                SeccompAction::Allow,
                TargetArch::x86_64,
            )
            .map_err(err)?;
            Ok(Arc::new(BpfProgram::try_from(filter).map_err(err)?))
        };
        // A stacked filter that answers system call `nr` with `errno` and allows the rest.
        let answer = |kind: ThreadKind, nr: i64, errno: i32| {
            SeccompFilter::new(
                [(nr, Vec::new())].into_iter().collect(),
                SeccompAction::Allow,
                SeccompAction::Errno(errno as u32),
                TargetArch::x86_64,
            )
            .and_then(BpfProgram::try_from)
            .map(Arc::new)
            .map_err(|source| SeccompError::Build {
                kind: kind.describe(),
                source,
            })
        };
        let no_clone3 = answer(ThreadKind::Device, libc::SYS_clone3, libc::ENOSYS)?;
        // Every thread: an `openat` that passes its own filter (read-only, close-on-exec, as
        // glibc's own opens are) gets ENOENT here, so no file is ever opened.
        let no_open = answer(ThreadKind::Main, libc::SYS_openat, libc::ENOENT)?;
        Ok(Filters {
            vcpu: build(ThreadKind::Vcpu, vcpu_rules())?,
            device: build(ThreadKind::Device, device_rules())?,
            console: build(ThreadKind::Console, console_rules())?,
            main: build(ThreadKind::Main, main_rules())?,
            control: build(ThreadKind::Control, control_rules())?,
            jail: Arc::default(),
            jailed: Arc::default(),
            no_clone3,
            no_open,
        })
    }

    /// These filters, with `jail` to enter before the machine's threads start (see
    /// [`Filters::enter_jail`]).
    pub fn with_jail(self, jail: crate::jail::Jail) -> Filters {
        *self.jail.lock().unwrap_or_else(|e| e.into_inner()) = Some(jail);
        self
    }

    /// Called by the builder on the main thread once the machine is built, before it starts
    /// a thread: enters the jail, if there is one. Without a jail it does nothing.
    pub fn enter_jail(&self) -> Result<(), crate::jail::JailError> {
        let jail = self.jail.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(jail) = jail else {
            return Ok(());
        };
        if jail.enter()? == crate::jail::Landlock::Absent {
            tracing::warn!("this kernel has no Landlock: the monitor's jail has one wall fewer");
        }
        self.jailed
            .store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Filters the calling (main) thread of a jailed monitor, once it has started every other
    /// thread and only waits for the machine ([`crate::builder::RunningMachine::wait`]);
    /// nothing in a monitor that is not jailed. A failure ends the process, as a violation
    /// would.
    pub fn confine_main(&self) {
        if self
            .jailed
            .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            confine_thread(Some(self), ThreadKind::Main);
        }
    }

    /// Installs the filter of `kind` on the calling thread (and the SIGSYS handler, once per
    /// process). Irrevocable for this thread and the threads it starts.
    pub fn apply(&self, kind: ThreadKind) -> Result<(), SeccompError> {
        install_sigsys_handler()?;
        let program = match kind {
            ThreadKind::Vcpu => &self.vcpu,
            ThreadKind::Device => &self.device,
            ThreadKind::Console => &self.console,
            ThreadKind::Main => &self.main,
            ThreadKind::Control => &self.control,
        };
        THREAD_KIND.with(|k| k.set(kind as u8));
        let err = |source| SeccompError::Apply {
            kind: kind.describe(),
            source,
        };
        // The stacked filter first: installing a filter needs prctl(PR_SET_NO_NEW_PRIVS),
        // which the device filter does not allow.
        seccompiler::apply_filter(&self.no_open).map_err(err)?;
        if kind == ThreadKind::Device {
            seccompiler::apply_filter(&self.no_clone3).map_err(err)?;
        }
        seccompiler::apply_filter(program).map_err(err)?;
        #[cfg(test)]
        tests::violate_if_asked(kind);
        Ok(())
    }
}

/// Installs `filters`' filter of `kind` on the calling thread, if there are filters (none when
/// confinement is off); a failure to install ends the process, as a violation would.
pub fn confine_thread(filters: Option<&Filters>, kind: ThreadKind) {
    if let Some(f) = filters
        && let Err(e) = f.apply(kind)
    {
        eprintln!("cela: error: {e}");
        std::process::exit(KILLED_STATUS);
    }
}

/// Rules under construction: system call number → the rules that allow it (none: always).
struct Rules(BTreeMap<i64, Vec<SeccompRule>>);

impl Rules {
    /// Starts from what every thread of the monitor needs.
    fn common() -> Rules {
        let mut r = Rules(BTreeMap::new());
        for (nr, _why) in COMMON {
            r.allow(*nr);
        }
        // Only to be answered ENOENT by the stacked `no_open` filter (see `Filters::no_open`).
        r.allow_if(
            libc::SYS_openat,
            &[(
                2,
                SeccompCmpOp::Eq,
                (libc::O_RDONLY | libc::O_CLOEXEC) as u64,
            )],
        );
        // abort() on a panic that cannot unwind: tgkill(own pid, own tid, SIGABRT).
        r.allow_if(
            libc::SYS_tgkill,
            &[(2, SeccompCmpOp::Eq, libc::SIGABRT as u64)],
        );
        r
    }

    fn allow(&mut self, nr: i64) {
        self.0.insert(nr, Vec::new());
    }

    /// Allows `nr` when all of `conds` (argument index, comparison, value) hold; several calls
    /// for one `nr` are alternatives.
    fn allow_if(&mut self, nr: i64, conds: &[(u8, SeccompCmpOp, u64)]) {
        let conds = conds
            .iter()
            .map(|(arg, op, value)| {
                SeccompCondition::new(*arg, SeccompCmpArgLen::Qword, op.clone(), *value)
                    .expect("argument indexes are below 6")
            })
            .collect();
        let rule = SeccompRule::new(conds).expect("a rule has conditions");
        match self.0.get_mut(&nr) {
            // An empty list means "always": a condition would only narrow it.
            Some(rules) if rules.is_empty() => {}
            Some(rules) => rules.push(rule),
            None => {
                self.0.insert(nr, vec![rule]);
            }
        }
    }

    /// Allows `ioctl` with each request number of `requests`.
    fn ioctls(&mut self, requests: &[u64]) {
        for r in requests {
            self.allow_if(libc::SYS_ioctl, &[(1, SeccompCmpOp::Eq, *r)]);
        }
    }
}

/// What every thread needs, and why.
const COMMON: &[(i64, &str)] = &[
    (
        libc::SYS_read,
        "eventfds, pipes, sockets, the TAP device, stdin",
    ),
    (
        libc::SYS_write,
        "eventfds (interrupts, notifies), stdout/stderr, logs",
    ),
    (libc::SYS_readv, "vectored reads of the same"),
    (libc::SYS_writev, "vectored writes of the same"),
    (libc::SYS_close, "dropping descriptors the thread owns"),
    (libc::SYS_futex, "locks and condition variables"),
    (libc::SYS_sched_yield, "spin loops in locks"),
    (libc::SYS_mmap, "the allocator"),
    (libc::SYS_munmap, "the allocator"),
    (libc::SYS_mremap, "the allocator (growing buffers)"),
    (
        libc::SYS_madvise,
        "the allocator returning memory, thread stacks at exit",
    ),
    (libc::SYS_mprotect, "the allocator growing an arena"),
    (libc::SYS_brk, "the allocator"),
    (
        libc::SYS_rt_sigreturn,
        "returning from signal handlers (the vCPU kick)",
    ),
    (
        libc::SYS_rt_sigprocmask,
        "the C library masking signals around some calls",
    ),
    (
        libc::SYS_sigaltstack,
        "Rust's stack-overflow guard, removed at thread exit",
    ),
    (libc::SYS_exit, "a thread ending"),
    (
        libc::SYS_exit_group,
        "the process ending (and the SIGSYS report)",
    ),
    (
        libc::SYS_clock_gettime,
        "time, where the vDSO does not serve it",
    ),
    (libc::SYS_clock_nanosleep, "sleeps"),
    (libc::SYS_nanosleep, "sleeps"),
    (
        libc::SYS_getrandom,
        "hash map keys; the virtio-rng device's entropy",
    ),
    (libc::SYS_gettid, "the C library (raise)"),
    (libc::SYS_getpid, "the C library (raise)"),
    (
        libc::SYS_restart_syscall,
        "a call interrupted by a signal, resumed",
    ),
];

/// A vCPU thread: runs the guest, and the port/MMIO handlers of its exits.
fn vcpu_rules() -> Rules {
    let mut r = Rules::common();
    r.ioctls(&[
        // Running the guest.
        ioctls::kvm_run(),
        // Naming the guest's instruction pointer when a vCPU fails; saving the vCPU's state
        // for a snapshot (each vCPU saves its own when paused).
        ioctls::kvm_get_regs(),
        ioctls::kvm_get_sregs(),
        ioctls::kvm_get_msrs(),
        ioctls::kvm_get_lapic(),
        ioctls::kvm_get_mp_state(),
        ioctls::kvm_get_vcpu_events(),
        ioctls::kvm_get_debugregs(),
        ioctls::kvm_get_xsave(),
        ioctls::kvm_get_xcrs(),
        ioctls::kvm_get_tsc_khz(),
        // virtio-net: the driver's accepted offloads, set when it activates or resets the
        // device (a register write, on the vCPU that made it).
        ioctls::tun_set_offload(),
    ]);
    r
}

/// The device thread: every virtio queue, and the threads it starts for the guest's output.
fn device_rules() -> Rules {
    let mut r = Rules::common();
    for (nr, _why) in DEVICE {
        r.allow(*nr);
    }
    r.ioctls(&[
        // set_nonblocking on vsock's Unix sockets.
        libc::FIONBIO,
        ioctls::tun_set_offload(),
    ]);
    // vsock: Unix sockets only (guest connections to PATH_<port>, internal ports).
    r.allow_if(
        libc::SYS_socket,
        &[(0, SeccompCmpOp::Eq, libc::AF_UNIX as u64)],
    );
    r.allow_if(
        libc::SYS_socketpair,
        &[(0, SeccompCmpOp::Eq, libc::AF_UNIX as u64)],
    );
    for cmd in [
        libc::F_GETFL,
        libc::F_SETFL,
        libc::F_GETFD,
        libc::F_SETFD,
        libc::F_DUPFD_CLOEXEC,
    ] {
        r.allow_if(libc::SYS_fcntl, &[(1, SeccompCmpOp::Eq, cmd as u64)]);
    }
    // A thread per guest output stream: clone with exactly the flags the C library's
    // pthread_create passes (a new thread, never a process).
    r.allow_if(
        libc::SYS_clone,
        &[(0, SeccompCmpOp::Eq, THREAD_CLONE_FLAGS)],
    );
    r.allow(libc::SYS_clone3); // answered ENOSYS by the stacked filter: see `Filters`
    // Naming a new thread.
    r.allow_if(
        libc::SYS_prctl,
        &[(0, SeccompCmpOp::Eq, libc::PR_SET_NAME as u64)],
    );
    r
}

/// What the device thread needs beyond the common list.
const DEVICE: &[(i64, &str)] = &[
    (
        libc::SYS_epoll_wait,
        "the event loop, and vsock's own epoll",
    ),
    (libc::SYS_epoll_pwait, "the event loop"),
    (libc::SYS_epoll_ctl, "vsock connections coming and going"),
    (libc::SYS_pread64, "virtio-blk reads"),
    (libc::SYS_pwrite64, "virtio-blk writes"),
    (libc::SYS_preadv, "virtio-blk reads"),
    (libc::SYS_pwritev, "virtio-blk writes"),
    (libc::SYS_preadv2, "virtio-blk reads"),
    (libc::SYS_pwritev2, "virtio-blk writes"),
    (libc::SYS_fdatasync, "virtio-blk flush"),
    (libc::SYS_fsync, "virtio-blk flush"),
    (
        libc::SYS_fallocate,
        "virtio-blk discard and write-zeroes (punching holes)",
    ),
    (libc::SYS_lseek, "virtio-blk"),
    (
        libc::SYS_connect,
        "vsock: a guest connection to PATH_<port>",
    ),
    (
        libc::SYS_accept4,
        "vsock: host processes connecting on PATH",
    ),
    (
        libc::SYS_sendmsg,
        "vsock: data to a host socket (MSG_NOSIGNAL)",
    ),
    (libc::SYS_sendto, "vsock: data to a host socket"),
    (libc::SYS_recvfrom, "vsock: data from a host socket"),
    (libc::SYS_recvmsg, "vsock: data from a host socket"),
    (libc::SYS_shutdown, "vsock: a half-closed connection"),
    (
        libc::SYS_set_robust_list,
        "a new guest-output thread starting",
    ),
    (libc::SYS_rseq, "a new guest-output thread starting"),
    (libc::SYS_sched_getaffinity, "a new thread starting"),
];

/// clone's flags from the C library's pthread_create.
const THREAD_CLONE_FLAGS: u64 = (libc::CLONE_VM
    | libc::CLONE_FS
    | libc::CLONE_FILES
    | libc::CLONE_SIGHAND
    | libc::CLONE_THREAD
    | libc::CLONE_SYSVSEM
    | libc::CLONE_SETTLS
    | libc::CLONE_PARENT_SETTID
    | libc::CLONE_CHILD_CLEARTID) as u64;

/// The console threads: host stdin into the guest's UART, host signals into stop requests
/// (and SIGTERM on to the guest's init over its control socket).
fn console_rules() -> Rules {
    let mut r = Rules::common();
    r.allow(libc::SYS_sendto); // the guest's control socket
    r.allow(libc::SYS_sendmsg);
    r
}

/// A jailed monitor's main thread once every other thread has started (a thread inherits its
/// starter's filter, and filters only add up, so the main thread cannot be filtered before
/// it starts the others): waits for the machine to stop, kicks and joins the vCPUs, drops the
/// machine and writes the report.
fn main_rules() -> Rules {
    let mut r = Rules::common();
    for (nr, _why) in MAIN {
        r.allow(*nr);
    }
    // The vCPU kick (pthread_kill to a thread of this process).
    r.allow_if(
        libc::SYS_tgkill,
        &[(2, SeccompCmpOp::Eq, vmm_sys_util::signal::SIGRTMIN() as u64)],
    );
    r
}

/// What the main thread needs beyond the common list.
const MAIN: &[(i64, &str)] = &[
    (
        libc::SYS_shutdown,
        "ending the caller's control connection once the machine stops",
    ),
    (
        libc::SYS_mincore,
        "measuring how much guest RAM is resident, for the report",
    ),
    (
        libc::SYS_getrusage,
        "the monitor's peak RSS, for the report",
    ),
];

/// The control thread: answers the caller's requests on the control connection, reads the
/// paused machine (devices, the VM's interrupt controllers and clock, guest RAM) and writes
/// it into the two files the caller passed with the request. It opens nothing.
fn control_rules() -> Rules {
    let mut r = Rules::common();
    for (nr, _why) in CONTROL {
        r.allow(*nr);
    }
    r.ioctls(&[
        ioctls::kvm_get_irqchip(),
        ioctls::kvm_get_pit2(),
        ioctls::kvm_get_clock(),
    ]);
    // The saved state's size (Rust's `File::metadata`): of the descriptor itself only
    // (AT_EMPTY_PATH), never of a path.
    r.allow_if(
        libc::SYS_statx,
        &[(
            2,
            SeccompCmpOp::MaskedEq(libc::AT_EMPTY_PATH as u64),
            libc::AT_EMPTY_PATH as u64,
        )],
    );
    r
}

/// What the control thread needs beyond the common list.
const CONTROL: &[(i64, &str)] = &[
    (
        libc::SYS_recvmsg,
        "requests, and the descriptors of the files a save writes",
    ),
    (libc::SYS_sendmsg, "replies"),
    (
        libc::SYS_sendto,
        "a guest's names, as host requests on its init's control socket (`hosts`)",
    ),
    (libc::SYS_pwrite64, "guest RAM into the memory file"),
    (libc::SYS_ftruncate, "sizing the memory file"),
    (libc::SYS_fsync, "making the saved files durable"),
    (libc::SYS_fdatasync, "making the saved files durable"),
    (libc::SYS_fstat, "the saved state's size"),
];

/// The ioctl request numbers the filters allow.
mod ioctls {
    use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

    const KVMIO: u32 = 0xAE;
    const TUNTAP: u32 = b'T' as u32;
    ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
    ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_bindings::kvm_regs);
    ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_bindings::kvm_sregs);
    ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_bindings::kvm_msrs);
    ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_bindings::kvm_lapic_state);
    ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_bindings::kvm_mp_state);
    ioctl_ior_nr!(
        KVM_GET_VCPU_EVENTS,
        KVMIO,
        0x9f,
        kvm_bindings::kvm_vcpu_events
    );
    ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_bindings::kvm_debugregs);
    ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_bindings::kvm_xsave);
    ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_bindings::kvm_xcrs);
    ioctl_io_nr!(KVM_GET_TSC_KHZ, KVMIO, 0xa3);
    ioctl_iowr_nr!(KVM_GET_IRQCHIP, KVMIO, 0x62, kvm_bindings::kvm_irqchip);
    ioctl_ior_nr!(KVM_GET_PIT2, KVMIO, 0x9f, kvm_bindings::kvm_pit_state2);
    ioctl_ior_nr!(KVM_GET_CLOCK, KVMIO, 0x7c, kvm_bindings::kvm_clock_data);
    ioctl_iow_nr!(TUNSETOFFLOAD, TUNTAP, 0xd0, std::os::raw::c_uint);

    pub fn kvm_run() -> u64 {
        KVM_RUN() as u64
    }
    pub fn kvm_get_regs() -> u64 {
        KVM_GET_REGS() as u64
    }
    pub fn kvm_get_sregs() -> u64 {
        KVM_GET_SREGS() as u64
    }
    pub fn kvm_get_msrs() -> u64 {
        KVM_GET_MSRS() as u64
    }
    pub fn kvm_get_lapic() -> u64 {
        KVM_GET_LAPIC() as u64
    }
    pub fn kvm_get_mp_state() -> u64 {
        KVM_GET_MP_STATE() as u64
    }
    pub fn kvm_get_vcpu_events() -> u64 {
        KVM_GET_VCPU_EVENTS() as u64
    }
    pub fn kvm_get_debugregs() -> u64 {
        KVM_GET_DEBUGREGS() as u64
    }
    pub fn kvm_get_xsave() -> u64 {
        KVM_GET_XSAVE() as u64
    }
    pub fn kvm_get_xcrs() -> u64 {
        KVM_GET_XCRS() as u64
    }
    pub fn kvm_get_tsc_khz() -> u64 {
        KVM_GET_TSC_KHZ() as u64
    }
    pub fn kvm_get_irqchip() -> u64 {
        KVM_GET_IRQCHIP() as u64
    }
    pub fn kvm_get_pit2() -> u64 {
        KVM_GET_PIT2() as u64
    }
    pub fn kvm_get_clock() -> u64 {
        KVM_GET_CLOCK() as u64
    }
    pub fn tun_set_offload() -> u64 {
        TUNSETOFFLOAD() as u64
    }
}

/// A jailed monitor's report pipe (-1: none), where the SIGSYS report goes too.
static REPORT_FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

/// Sends the SIGSYS report to `fd` as well as to stderr (a jailed monitor's report pipe).
pub fn set_report_fd(fd: i32) {
    REPORT_FD.store(fd, std::sync::atomic::Ordering::Relaxed);
}

thread_local! {
    /// The kind of the calling thread, once it is filtered (read by the SIGSYS handler).
    static THREAD_KIND: Cell<u8> = const { Cell::new(0) };
}

/// Installs [`on_sigsys`] for SIGSYS, once per process.
fn install_sigsys_handler() -> Result<(), SeccompError> {
    static ONCE: std::sync::OnceLock<Result<(), i32>> = std::sync::OnceLock::new();
    let r = ONCE.get_or_init(|| {
        vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, on_sigsys)
            .map_err(|e| e.errno())
    });
    r.map_err(|errno| SeccompError::Handler(std::io::Error::from_raw_os_error(errno)))
}

/// The SIGSYS handler: reports the call a filter refused, then ends the process. Only
/// async-signal-safe work: formatting into a stack buffer, write(2), exit_group(2).
extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for SIGSYS (SA_SIGINFO is set by
    // register_signal_handler); its `_sigsys` member (call address, then the int system call
    // number) starts 16 bytes in on x86_64, so the number is the i32 at offset 24.
    let nr = unsafe { info.cast::<u8>().add(24).cast::<i32>().read_unaligned() };
    let kind = THREAD_KIND
        .try_with(|k| ThreadKind::from_u8(k.get()))
        .ok()
        .flatten();
    let mut msg = Message::default();
    msg.push(b"cela: error: the monitor was killed by its seccomp filter: syscall ");
    match syscalls::Sysno::new(nr as usize) {
        Some(s) => msg.push(s.name().as_bytes()),
        None => msg.push(b"unknown"),
    }
    msg.push(b" (");
    msg.push_number(nr as i64);
    msg.push(b") on ");
    msg.push(kind.map_or("a thread", ThreadKind::describe).as_bytes());
    msg.push(b"\n");
    // SAFETY: write(2) and exit_group(2) are async-signal-safe and allowed by every filter;
    // the buffer is valid for its length.
    unsafe {
        libc::write(2, msg.buf.as_ptr().cast(), msg.len);
        let report = REPORT_FD.load(std::sync::atomic::Ordering::Relaxed);
        if report >= 0 {
            libc::write(report, msg.buf.as_ptr().cast(), msg.len);
        }
        libc::syscall(libc::SYS_exit_group, KILLED_STATUS);
    }
}

/// A message built without allocating (in a signal handler).
struct Message {
    buf: [u8; 256],
    len: usize,
}

impl Default for Message {
    fn default() -> Message {
        Message {
            buf: [0; 256],
            len: 0,
        }
    }
}

impl Message {
    fn push(&mut self, s: &[u8]) {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s[..n]);
        self.len += n;
    }

    fn push_number(&mut self, mut v: i64) {
        if v < 0 {
            self.push(b"-");
            v = -v;
        }
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

#[cfg(test)]
mod tests;
