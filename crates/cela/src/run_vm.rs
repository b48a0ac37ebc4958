//! `cela run --vm`: boot a microVM with the default guest assets (or the user's kernel and
//! initramfs), run a command in it, and exit with the command's status.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, bail};
use cela_guest::BootRequest;
use cela_vmm::{
    BASE_CMDLINE, ConsoleMode, DiskConfig, Engine, GuestExit, MachineConfig, VsockConfig,
};
use clap::{Args, ValueEnum};

use crate::paths;

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Run in a microVM (a stock Linux kernel on cela's KVM monitor).
    #[arg(long)]
    vm: bool,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1, value_name = "N")]
    cpus: u32,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 512, value_name = "MiB")]
    memory: u64,
    /// Boot this bzImage instead of the Debian cloud kernel cela fetches.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Use this initramfs instead of the one cela builds (its init must follow cela's
    /// boot contract to run CMD and report its status).
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Extra kernel command-line parameters, appended to cela's own.
    #[arg(long, value_name = "STR")]
    cmdline: Option<String>,
    /// Which engine runs the VM: cela's KVM monitor or QEMU's TCG emulator (default: KVM
    /// when it can boot Linux here, QEMU otherwise).
    #[arg(long, value_enum, value_name = "ENGINE")]
    engine: Option<EngineArg>,
    /// A raw disk image for the guest, read-write, or read-only with `,ro` (repeatable; the
    /// guest sees them as /dev/vda, /dev/vdb, … in this order).
    #[arg(long = "disk", value_name = "PATH[,ro]")]
    disks: Vec<String>,
    /// A vsock host side: the Unix socket PATH (host processes connect and send
    /// `CONNECT <port>\n`; guest connections to host port P reach the socket PATH_P). Without
    /// PATH, a socket in the run directory, printed on stderr. Removed when the VM ends.
    #[arg(long, value_name = "PATH", num_args = 0..=1)]
    vsock: Option<Option<PathBuf>>,
    /// Environment variable for the command (repeatable).
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Print boot timings on stderr when the VM ends.
    #[arg(long)]
    timings: bool,
    /// The command to run in the guest; without it, an interactive shell on the console
    /// (leave with Ctrl-A x).
    #[arg(last = true, value_name = "CMD")]
    command: Vec<String>,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum EngineArg {
    Kvm,
    Qemu,
}

impl From<EngineArg> for Engine {
    fn from(e: EngineArg) -> Engine {
        match e {
            EngineArg::Kvm => Engine::Kvm,
            EngineArg::Qemu => Engine::Qemu,
        }
    }
}

/// The kernel and initramfs to boot: the user's, or the default assets (fetched/built on
/// first use).
fn guest_files(args: &RunArgs, data_dir: &std::path::Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    if let (Some(k), Some(i)) = (&args.kernel, &args.initrd) {
        return Ok((k.clone(), i.clone()));
    }
    let init = paths::guest_init()?;
    let progress = cela_assets::Progress::new();
    let assets = cela_assets::guest_assets(&paths::assets_dir(data_dir), &init, &progress)
        .context("preparing the default guest kernel and initramfs")?;
    Ok((
        args.kernel.clone().unwrap_or(assets.kernel),
        args.initrd.clone().unwrap_or(assets.initrd),
    ))
}

pub fn run(args: RunArgs, data_dir: &std::path::Path) -> anyhow::Result<ExitCode> {
    if !args.vm {
        bail!(
            "containers are not implemented yet: use `cela run --vm` to run the command in a microVM"
        );
    }
    if let Some(bad) = args
        .env
        .iter()
        .find(|e| !e.contains('=') || e.starts_with('='))
    {
        bail!("--env {bad:?} is not KEY=VALUE");
    }
    for (flag, path) in [("--kernel", &args.kernel), ("--initrd", &args.initrd)] {
        if let Some(p) = path
            && !p.is_file()
        {
            bail!("{flag} {}: no such file", p.display());
        }
    }
    // Disks are checked (opened as asked, none shared read-write) before anything else is
    // chosen, fetched or created.
    let disks: Vec<DiskConfig> = args.disks.iter().map(|d| DiskConfig::parse(d)).collect();
    cela_vmm::config::open_disks(&disks)?;
    let vsock = match &args.vsock {
        None => None,
        Some(path) => {
            let path = match path {
                Some(p) => p.clone(),
                None => paths::default_vsock_socket()?,
            };
            let v = VsockConfig {
                path,
                guest_cid: cela_vmm::devices::virtio::vsock::DEFAULT_GUEST_CID,
            };
            cela_vmm::config::check_vsock(&v)?;
            Some(v)
        }
    };
    let launched = Instant::now();
    let (engine, note) =
        cela_vmm::engine::choose(args.engine.map(Engine::from)).map_err(anyhow::Error::msg)?;
    if vsock.is_some() && engine == Engine::Qemu {
        bail!(
            "--vsock needs cela's KVM engine; the QEMU engine has no vsock here (no /dev/vhost-vsock)"
        );
    }
    if let (Some(v), Some(None)) = (&vsock, &args.vsock) {
        eprintln!("cela: vsock socket: {}", v.path.display());
    }
    if let Some(note) = note {
        eprintln!("cela: {note}");
    }
    let (kernel, initrd) = guest_files(&args, data_dir)?;
    let request = BootRequest {
        command: (!args.command.is_empty()).then(|| args.command.clone()),
        env: args.env.clone(),
    };
    let mut cmdline = BASE_CMDLINE.to_string();
    if let Some(extra) = &args.cmdline {
        cmdline.push(' ');
        cmdline.push_str(extra);
    }
    let params = request.to_kernel_params();
    if !params.is_empty() {
        cmdline.push(' ');
        cmdline.push_str(&params);
    }
    let config = MachineConfig {
        vcpus: args.cpus,
        memory_mib: args.memory,
        kernel,
        initrd: Some(initrd),
        cmdline,
        disks,
        vsock,
    };
    let console = if request.command.is_some() {
        ConsoleMode::Stream
    } else {
        ConsoleMode::Interactive
    };

    let exit = match engine {
        Engine::Kvm => {
            let report = cela_vmm::run(&config, console)?;
            if args.timings {
                let ready = report
                    .guest_ready
                    .map(|t| t.duration_since(launched).as_secs_f64() * 1e3);
                eprintln!(
                    "cela: timings: vcpus started {:.1} ms, guest init ready {}, ended {:.1} ms after launch",
                    report.started.duration_since(launched).as_secs_f64() * 1e3,
                    ready.map_or("never".to_string(), |ms| format!("{ms:.1} ms")),
                    launched.elapsed().as_secs_f64() * 1e3,
                );
                eprintln!("cela: exits: {}", report.exits.summary(6));
                if let Some(peak) = report.peak_rss {
                    let mib = |b: u64| b as f64 / (1 << 20) as f64;
                    eprintln!(
                        "cela: memory: peak RSS {:.1} MiB, guest RAM resident {:.1} MiB, monitor overhead {:.1} MiB",
                        mib(peak),
                        mib(report.guest_resident),
                        mib(peak.saturating_sub(report.guest_resident)),
                    );
                }
            }
            report.exit
        }
        Engine::Qemu => cela_vmm::qemu::run(&config, console)?,
    };
    Ok(finish(exit))
}

fn finish(exit: GuestExit) -> ExitCode {
    if let Some(text) = exit.describe() {
        eprintln!("cela: {text}");
    }
    ExitCode::from(exit.exit_code().clamp(0, 255) as u8)
}
