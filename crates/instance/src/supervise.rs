//! The supervisor: the process that runs one instance's workload to its end and records it.
//! For a container it creates, starts and waits for the container (whose init is its child);
//! for a microVM it forks the VMM into its jail (`cela_vmm::jail`) and waits for it (or drives
//! the QEMU fallback), so it keeps the records, the log and the TAP while the monitor holds
//! nothing but the machine. Either way the workload's stdout and stderr are this process's fds 1 and 2, pipes that a
//! thread copies into the instance's log ([`crate::log`]), and every change of state is written
//! to `state.json` with this process named as the supervisor, so `cela ps` can tell a live
//! instance from one whose supervisor was killed.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};

use cela_image::Store;
use cela_vmm::{ConsoleMode, DiskConfig, Engine, MachineConfig};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::Pid;

use crate::container;
use crate::error::{InstanceError, IoContext};
use crate::log::{LogEnd, LogWriter, pump};
use crate::record::{Instance, InstanceState, Kind, ProcessId, Status, now};

/// Runs `inst` to its end in this process; returns the workload's exit code. The state says
/// `running` (with this process as supervisor) while it runs and `exited` after.
pub fn supervise(store: &Store, inst: &Instance) -> Result<i32, InstanceError> {
    let mut state = inst.claim(ProcessId::current())?;

    let (pump_thread, saved) = capture_output(inst)?;
    let result = match inst.config.kind {
        Kind::Container => run_container(store, inst, &mut state),
        Kind::Vm => run_vm(store, inst, &mut state),
    };
    restore_output(saved);
    let _ = pump_thread.join();
    if inst.config.kind == Kind::Container {
        crate::network::teardown(inst, state.network.as_ref());
    } else {
        crate::network::release_links(&inst.dir);
    }
    state.network = None;

    state.finished = Some(now());
    match &result {
        Ok(code) => {
            state.status = Status::Exited;
            state.exit_code = Some(*code);
        }
        Err(e) => {
            state.status = Status::Exited;
            state.exit_code = None;
            state.error = Some(e.to_string());
        }
    }
    state.pid = None;
    // What the run left goes before its end is published: a client that removes the
    // instance once `wait` answers finds nothing of the run still being taken apart.
    if inst.config.kind == Kind::Container {
        container::destroy(inst, false);
    }
    inst.save_state(&state)?;
    if inst.config.auto_remove {
        // Marked (now that it is no longer live), so nothing starts it again before its
        // removal; until then no other supervisor claims it, this one being alive.
        inst.mark_removing()?;
    }
    // The end goes into the log too, where a follower finds it even after an auto-removal.
    let end = LogEnd {
        exit_code: state.exit_code,
        error: state.error.clone(),
    };
    if let Err(e) = LogWriter::open(&inst.log_path()).and_then(|mut w| w.end(&end)) {
        tracing::warn!("recording the end in {}: {e}", inst.log_path().display());
    }
    // Docker's `die` carries the exit code; a run that failed to start has none to give.
    let code = state.exit_code.map(|c| ("exitCode", c.to_string()));
    crate::events::record(inst, "die", code.as_slice());
    if inst.config.auto_remove {
        crate::ops::remove_dir(inst);
    }
    result
}

/// Points fds 1 and 2 at pipes copied into the log; returns the copier and the old fds.
fn capture_output(
    inst: &Instance,
) -> Result<(std::thread::JoinHandle<()>, [OwnedFd; 2]), InstanceError> {
    let log = LogWriter::open(&inst.log_path())
        .doing(|| format!("opening {}", inst.log_path().display()))?;
    let pipe = || {
        nix::unistd::pipe()
            .map_err(std::io::Error::from)
            .doing(|| "making a pipe".into())
    };
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let saved = [dup(1)?, dup(2)?];
    dup2(&out_w, 1)?;
    dup2(&err_w, 2)?;
    drop((out_w, err_w));
    let thread = std::thread::spawn(move || {
        if let Err(e) = pump(out_r, err_r, log) {
            tracing::warn!("copying the workload's output to its log: {e}");
        }
    });
    Ok((thread, saved))
}

/// Puts the old fds 1 and 2 back, which closes the pipes' last write ends in this process.
fn restore_output(saved: [OwnedFd; 2]) {
    for (fd, target) in saved.iter().zip([1, 2]) {
        let _ = dup2(fd, target);
    }
}

fn dup(fd: i32) -> Result<OwnedFd, InstanceError> {
    // SAFETY: fds 0-2 are open for the life of the process; the borrow ends with the call.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    borrowed
        .try_clone_to_owned()
        .doing(|| format!("duplicating fd {fd}"))
}

fn dup2(from: &OwnedFd, to: i32) -> Result<(), InstanceError> {
    // SAFETY: dup2 only manipulates the descriptor table; `from` is open and `to` is a
    // standard stream this process owns.
    if unsafe { libc::dup2(from.as_raw_fd(), to) } < 0 {
        return Err(InstanceError::Io {
            what: format!("redirecting fd {to}"),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

fn run_container(
    store: &Store,
    inst: &Instance,
    state: &mut InstanceState,
) -> Result<i32, InstanceError> {
    let image = store.resolve(&inst.config.image_digest)?;
    state.network = crate::network::setup_container(inst)?;
    crate::network::publish_ports(inst, state.network.as_ref())?;
    // `-i` without a terminal: the container inherits a pipe as fd 0 (instead of /dev/null)
    // whose write end the attach socket feeds.
    let stdin = if inst.config.stdin && !inst.config.tty {
        let (read, write) = crate::attach::stdin_pipe()?;
        let saved = dup(0)?;
        dup2(&read, 0)?;
        Some((write, saved))
    } else {
        None
    };
    let created = container::create(store, &image, inst);
    let stdin = stdin.map(|(write, saved)| {
        let _ = dup2(&saved, 0);
        write
    });
    let (pid, master) = created?;
    let terminal_output = match master {
        Some(master) => {
            // The client's size before the workload starts: its first `stty size` or
            // full-screen draw sees it, not 0x0 waiting for a resize that races the keys.
            if let Some((rows, cols)) = inst.config.terminal_size {
                cela_runtime::console::set_rows_cols(&master, rows, cols)
                    .map_err(std::io::Error::from)
                    .doing(|| "sizing the terminal".into())?;
            }
            let output = File::from(
                master
                    .try_clone()
                    .doing(|| "duplicating the terminal".into())?,
            );
            crate::attach::serve(inst, crate::attach::Sink::Terminal(File::from(master)))?;
            Some(copy_terminal(inst, output)?)
        }
        None => {
            if let Some(write) = stdin {
                crate::attach::serve(inst, crate::attach::Sink::Pipe(Some(write)))?;
            }
            None
        }
    };
    container::runtime(inst).start(&inst.config.id)?;
    state.status = Status::Running;
    state.pid = Some(pid);
    inst.save_state(state)?;
    crate::events::record(inst, "start", &[]);
    let code = wait_child(pid);
    // What the workload wrote to its terminal before it ended; a process it left behind
    // holding the terminal must not keep the end from being recorded.
    if let Some(done) = terminal_output {
        let _ = done.recv_timeout(std::time::Duration::from_secs(2));
    }
    code
}

/// Copies the terminal's output into the log (as stdout) until every process holding the
/// terminal has closed it; the receiver hears when it is done.
fn copy_terminal(
    inst: &Instance,
    mut master: File,
) -> Result<std::sync::mpsc::Receiver<()>, InstanceError> {
    let mut log = LogWriter::open(&inst.log_path())
        .doing(|| format!("opening {}", inst.log_path().display()))?;
    let (done, wait) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 16 * 1024];
        // EIO once the terminal's other side is closed everywhere.
        while let Ok(n @ 1..) = std::io::Read::read(&mut master, &mut buf) {
            if log.write(crate::log::Stream::Stdout, &buf[..n]).is_err() {
                break;
            }
        }
        let _ = done.send(());
    });
    Ok(wait)
}

/// Waits for child `pid`; its status as a shell reports it (128+N for signal N).
pub fn wait_child(pid: i32) -> Result<i32, InstanceError> {
    loop {
        match waitpid(Pid::from_raw(pid), None) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(code),
            Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(128 + sig as i32),
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                return Err(InstanceError::Other(format!(
                    "waiting for the workload (pid {pid}): {e}"
                )));
            }
        }
    }
}

/// The instance's own copy of the image disk (its writable root), made on first start.
fn instance_disk(store: &Store, inst: &Instance) -> Result<std::path::PathBuf, InstanceError> {
    let disk = inst.dir.join("root.ext4");
    if !disk.exists() {
        let image = store.resolve(&inst.config.image_digest)?;
        let tmp = inst.dir.join("root.ext4.tmp");
        cela_image::ext4::instance_disk(store, &image, &tmp, &cela_image::Progress::hidden())?;
        std::fs::rename(&tmp, &disk).doing(|| format!("renaming {}", tmp.display()))?;
    }
    Ok(disk)
}

fn run_vm(store: &Store, inst: &Instance, state: &mut InstanceState) -> Result<i32, InstanceError> {
    let vm = inst
        .config
        .vm
        .as_ref()
        .expect("a VM instance has its boot files");
    let restore = crate::snapshot::pending_restore(inst)?;
    // Instances live in <data>/instances/<id>.
    let data_dir = inst
        .dir
        .parent()
        .and_then(std::path::Path::parent)
        .ok_or_else(|| {
            InstanceError::Other(format!("{} is not in a data directory", inst.dir.display()))
        })?;
    let disk = instance_disk(store, inst)?;
    // The TAPs (of `--net auto`, and of lab links) live as long as `host_net` (and QEMU's
    // inherited copies).
    let host_net = crate::network::setup_vm(inst)?;
    crate::network::publish_ports(inst, host_net.state.as_ref())?;
    let request = cela_guest::BootRequest {
        command: Some(inst.config.command.clone()),
        env: inst.config.env.clone(),
        root: Some(cela_guest::ROOTFS_SERIAL.to_owned()),
        nets: host_net.cards.iter().filter_map(|h| h.guest).collect(),
        links: host_net.links.clone(),
        workdir: inst.config.workdir.clone(),
        user: inst.config.user.clone(),
        tty: inst.config.tty,
        // On a named network: the names of its instances come after the boot.
        hosts: !inst.config.networks.is_empty(),
    };
    // A snapshot is tied to its engine: a restore runs on the one that saved it.
    let forced = restore.as_ref().map(|r| match r.engine.as_deref() {
        Some("kvm") => Engine::Kvm,
        _ => Engine::Qemu,
    });
    let (engine, _) = cela_vmm::engine::choose(forced).map_err(InstanceError::Other)?;
    // The socket of a previous run (its monitor was killed) would stop the device binding.
    let vsock_path = inst.vsock_path();
    let _ = std::fs::remove_file(&vsock_path);
    let vsock = (engine == Engine::Kvm).then_some(cela_vmm::VsockConfig {
        path: vsock_path,
        guest_cid: cela_vmm::devices::virtio::vsock::DEFAULT_GUEST_CID,
    });
    let config = MachineConfig {
        vcpus: inst.config.cpus.unwrap_or(1),
        memory_mib: inst.config.memory_mib.unwrap_or(512),
        kernel: vm.kernel.clone(),
        initrd: Some(vm.initrd.clone()),
        cmdline: format!("{} {}", cela_vmm::BASE_CMDLINE, request.to_kernel_params()),
        disks: vec![DiskConfig {
            serial: Some(cela_guest::ROOTFS_SERIAL.to_owned()),
            ..DiskConfig::parse(&disk.display().to_string())
        }],
        nets: host_net.cards.iter().map(|h| h.nic.clone()).collect(),
        vsock,
        confine: vm.confine,
    };
    state.pid = Some(std::process::id() as i32);
    state.engine = Some(engine.to_string());
    state.network = host_net.state.clone();
    // A boot is running from here; a restore only once its state is loaded and the guest
    // runs on (so `run::start` reports a restore that fails).
    if restore.is_none() {
        state.status = Status::Running;
        inst.save_state(state)?;
    }
    // `-t`: the workload runs on the guest's console, whose input is a pipe (the monitor's
    // fd 0) that the attach socket feeds with frames: keys, and sizes for the guest's init.
    let console = if inst.config.tty {
        let (read, write) = crate::attach::stdin_pipe()?;
        let saved = dup(0)?;
        dup2(&read, 0)?;
        // The client's size is the first frame the guest's init reads.
        if let Some((rows, cols)) = inst.config.terminal_size {
            (&write)
                .write_all(&crate::attach::Input::Resize { rows, cols }.encode())
                .doing(|| "sizing the console".into())?;
        }
        crate::attach::serve(inst, crate::attach::Sink::Framed(write))?;
        Some(saved)
    } else {
        None
    };
    let mode = match console {
        Some(_) => ConsoleMode::Framed,
        None => ConsoleMode::Stream,
    };
    crate::events::record(inst, "start", &[]);
    // Who a restored guest is now: this instance, on this instance's link.
    let identity = cela_vmm::persist::machine::Identity {
        hostname: Some(inst.config.name.clone()),
        // Only a machine with one card is snapshotted.
        net: request.nets.first().copied(),
    };
    let in_flight = crate::control::InFlight::default();
    let exit = match engine {
        Engine::Kvm => {
            let (control, monitor_end) = cela_vmm::control::MonitorControl::pair()
                .doing(|| "making the monitor's control connection".into())?;
            let options = cela_vmm::KvmOptions {
                control: Some(monitor_end),
                restore: restore.as_ref().map(|r| cela_vmm::RestoreFrom {
                    state: r.snapshot.join(crate::snapshot::STATE_FILE),
                    memory: r.snapshot.join(crate::snapshot::MEMORY_FILE),
                    identity: identity.clone(),
                }),
            };
            // Once the monitor says the machine runs: a restore is done (and running), and the
            // control socket takes snapshot requests.
            let waiter = {
                let (data_dir, inst, restoring) =
                    (data_dir.to_owned(), inst.clone(), restore.is_some());
                let mut running = state.clone();
                let in_flight = in_flight.clone();
                std::thread::Builder::new()
                    .name("monitor-up".into())
                    .spawn(move || -> Result<(), InstanceError> {
                        if let Err(e) = control.wait_running() {
                            if !restoring {
                                tracing::warn!("the monitor never ran the machine: {e}");
                            }
                            return Err(InstanceError::Other(format!(
                                "the monitor never ran the machine: {e}"
                            )));
                        }
                        if restoring {
                            crate::snapshot::restore_done(&inst);
                            running.status = Status::Running;
                            inst.save_state(&running)?;
                        }
                        let control = std::sync::Arc::new(control);
                        crate::network::vm_hosts::forward(
                            &inst,
                            crate::network::vm_hosts::Sender::Kvm(control.clone()),
                        );
                        let machine = crate::snapshot::Machine::Kvm(control);
                        if let Err(e) = crate::control::serve(&data_dir, &inst, machine, in_flight)
                        {
                            tracing::warn!("no control socket (snapshots cannot be taken): {e}");
                        }
                        Ok(())
                    })
                    .doing(|| "starting a thread".into())?
            };
            let exit = cela_vmm::run_with(&config, mode, options)
                .map(|r| r.exit)
                .map_err(InstanceError::from);
            let up = waiter.join().unwrap_or_else(|_| {
                Err(InstanceError::Other(
                    "the monitor-up thread panicked".into(),
                ))
            });
            in_flight.settle();
            let _ = std::fs::remove_file(inst.control_path());
            match (exit, up) {
                (Err(e), _) => Err(e),
                // A restore whose monitor never ran the machine failed, whatever it reported.
                (Ok(_), Err(e)) if restore.is_some() => Err(e),
                (Ok(exit), _) => Ok(exit),
            }
        }
        Engine::Qemu => {
            let incoming = match &restore {
                Some(r) => {
                    let path = r.snapshot.join(crate::snapshot::STATE_FILE);
                    let state =
                        File::open(&path).doing(|| format!("opening {}", path.display()))?;
                    let expect = r.qemu.clone().ok_or_else(|| InstanceError::Corrupt {
                        what: "restore.json".into(),
                        why: "it does not say which QEMU saved the state".into(),
                    })?;
                    Some(cela_vmm::qemu::Incoming {
                        state,
                        expect,
                        identity: identity.clone(),
                    })
                }
                None => None,
            };
            let mut started: Result<(), InstanceError> = Ok(());
            let on_running = |machine: cela_vmm::qemu::QemuHandle| {
                if restore.is_some() {
                    crate::snapshot::restore_done(inst);
                    state.status = Status::Running;
                    started = inst.save_state(state);
                }
                crate::network::vm_hosts::forward(
                    inst,
                    crate::network::vm_hosts::Sender::Qemu(machine.clone()),
                );
                let machine = crate::snapshot::Machine::Qemu(machine);
                if let Err(e) = crate::control::serve(data_dir, inst, machine, in_flight.clone()) {
                    tracing::warn!("no control socket (snapshots cannot be taken): {e}");
                }
            };
            let opts = cela_vmm::qemu::RunOptions {
                incoming,
                on_running: Some(Box::new(on_running)),
            };
            let exit = cela_vmm::qemu::run_with(&config, mode, opts).map_err(InstanceError::from);
            in_flight.settle();
            let _ = std::fs::remove_file(inst.control_path());
            started.and(exit)
        }
    };
    if let Some(saved) = console {
        let _ = dup2(&saved, 0);
    }
    Ok(exit?.exit_code())
}
