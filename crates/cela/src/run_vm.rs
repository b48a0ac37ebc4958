//! `cela run --vm`: boot a microVM with the default guest assets (or the user's kernel and
//! initramfs), run a command in it, and exit with the command's status.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, bail};
use cela_guest::{BootRequest, ROOTFS_SERIAL};
use cela_vmm::net::NetMode;
use cela_vmm::{
    BASE_CMDLINE, ConsoleMode, DiskConfig, Engine, GuestExit, MachineConfig, VsockConfig,
};
use clap::{Args, ValueEnum};

use crate::paths;

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Run in a microVM (a stock Linux kernel on cela's KVM monitor) instead of a container.
    #[arg(long)]
    vm: bool,
    /// Run in the background and print the instance id (with an IMAGE).
    #[arg(short = 'd', long)]
    detach: bool,
    /// Remove the instance when it ends (with an IMAGE).
    #[arg(long)]
    rm: bool,
    /// Keep stdin open and pass it to the instance (with an IMAGE; EOF is passed on; a
    /// microVM takes input on its console, so with -t).
    #[arg(short = 'i', long)]
    interactive: bool,
    /// Give the instance a terminal: this one in raw mode, its size followed (with an IMAGE;
    /// a microVM's workload runs on the guest's console).
    #[arg(short = 't', long)]
    tty: bool,
    /// Pull the image from its registry first: when the store has none by that name
    /// (`missing`), every time (`always`), or never.
    #[arg(long, value_enum, value_name = "WHEN", default_value_t = PullArg::Missing)]
    pull: PullArg,
    /// The keys that detach this terminal from a `-t` instance and leave it running
    /// (comma-separated `ctrl-X` or characters; empty: none).
    #[arg(long, value_name = "KEYS", default_value = "ctrl-p,ctrl-q")]
    detach_keys: String,
    /// Name the instance (default: made from its id).
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// Working directory of the command (default: the image's).
    #[arg(short = 'w', long, value_name = "DIR")]
    workdir: Option<String>,
    /// User of the command: uid[:gid] or a name in the image (default: the image's).
    #[arg(short = 'u', long, value_name = "USER")]
    user: Option<String>,
    /// Bind-mount a host directory or file into a container (repeatable).
    #[arg(short = 'v', long = "volume", value_name = "HOST:DEST[:ro]")]
    volumes: Vec<String>,
    /// vCPUs of a microVM (default 1); CPU limit of a container (default none).
    #[arg(long, value_name = "N")]
    cpus: Option<u32>,
    /// Guest memory of a microVM in MiB (default 512); memory limit of a container.
    #[arg(long, value_name = "MiB")]
    memory: Option<u64>,
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
    /// An ext4 image to use as the guest's root filesystem: the command runs in it (read-only
    /// with `,ro`). It is one more disk after the `--disk` ones, found by its serial.
    #[arg(long, value_name = "IMAGE[,ro]")]
    rootfs: Option<String>,
    /// The network. With an IMAGE: the name of a network (`cela network create`; default:
    /// `bridge`, the built-in NAT'd network made on first use, or $CELA_DEFAULT_NETWORK),
    /// with `,ip=ADDR` and (containers) `,mac=MAC`, repeated for more networks (a
    /// container's eth0, eth1, …); `none` (loopback only; a microVM has no NIC), `host`
    /// (containers: the host's network), or `auto` (a private /30 link to the host: a veth
    /// for a container, a TAP for a microVM; removed with the instance). Without an IMAGE
    /// (`--vm -- CMD`): `auto` or `tap=NAME` (an existing TAP device, left as it is).
    #[arg(long, value_name = "none|host|auto|NAME[,ip=A][,mac=M]|tap=NAME")]
    net: Vec<String>,
    /// Publish a port of the instance on the host: connections to HOST_PORT (of any address
    /// of the host, or IP) reach PORT of the instance (with `--net auto` or a network).
    /// Repeatable.
    #[arg(
        short = 'p',
        long = "publish",
        value_name = "[IP:]HOST_PORT:PORT[/tcp|udp]"
    )]
    publish: Vec<String>,
    /// A vsock host side: the Unix socket PATH (host processes connect and send
    /// `CONNECT <port>\n`; guest connections to host port P reach the socket PATH_P). Without
    /// PATH, a socket in the run directory, printed on stderr. Removed when the VM ends.
    #[arg(long, value_name = "PATH", num_args = 0..=1)]
    vsock: Option<Option<PathBuf>>,
    /// The guest's vsock context id (CID), 3 to 4294967294; default 3. Needs `--vsock`.
    #[arg(long, value_name = "CID", requires = "vsock")]
    vsock_cid: Option<u64>,
    /// Environment variable for the command (repeatable).
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Print boot timings on stderr when the VM ends.
    #[arg(long)]
    timings: bool,
    /// Run a microVM's monitor without its seccomp filters. For debugging only: a guest that
    /// breaks a device emulation then has the monitor's full privileges.
    #[arg(long)]
    no_confine: bool,
    /// Give a container a capability beyond Docker's default set (`ALL` for every one;
    /// repeatable).
    #[arg(long = "cap-add", value_name = "CAP")]
    cap_add: Vec<String>,
    /// Take a capability from a container's set (`ALL` for every one; repeatable).
    #[arg(long = "cap-drop", value_name = "CAP")]
    cap_drop: Vec<String>,
    /// A container's confinement: `seccomp=unconfined` (no filter), `seccomp=PATH` (an OCI
    /// or Docker seccomp profile instead of cela's default); `no-new-privileges` is always on.
    #[arg(long = "security-opt", value_name = "OPT")]
    security_opt: Vec<String>,
    /// The image to run, then the command (default: the image's). Without an IMAGE, `--vm`
    /// boots cela's own initramfs and runs the command given after `--` (or an interactive
    /// shell on the console; leave with Ctrl-A x).
    #[arg(value_name = "IMAGE")]
    image: Option<String>,
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    command: Vec<String>,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum PullArg {
    Missing,
    Always,
    Never,
}

impl From<PullArg> for cela_instance::PullPolicy {
    fn from(p: PullArg) -> Self {
        match p {
            PullArg::Missing => cela_instance::PullPolicy::Missing,
            PullArg::Always => cela_instance::PullPolicy::Always,
            PullArg::Never => cela_instance::PullPolicy::Never,
        }
    }
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

/// Splits `cela run`'s positional arguments: `IMAGE [CMD...]`, or, for `--vm -- CMD...`
/// (nothing before `--`), no image. `raw` is the whole command line.
fn split_image(args: &mut RunArgs, raw: &[String]) {
    if args.command.first().map(String::as_str) == Some("--") {
        args.command.remove(0);
    }
    let positional = usize::from(args.image.is_some()) + args.command.len();
    let after_dashes = raw
        .iter()
        .position(|a| a == "--")
        .map(|i| raw.len() - i - 1);
    if after_dashes == Some(positional)
        && positional > 0
        && let Some(first) = args.image.take()
    {
        args.command.insert(0, first);
    }
}

pub fn run(mut args: RunArgs, data_dir: &std::path::Path) -> anyhow::Result<ExitCode> {
    let raw: Vec<String> = std::env::args().collect();
    split_image(&mut args, &raw);
    if let Some(dir) = &args.workdir
        && !dir.starts_with('/')
    {
        bail!("-w {dir:?}: the working directory must be an absolute path");
    }
    if let Some(image) = args.image.take() {
        let unsupported = [
            ("--cmdline", args.cmdline.is_some()),
            ("--engine", args.engine.is_some()),
            ("--disk", !args.disks.is_empty()),
            ("--rootfs", args.rootfs.is_some()),
            ("--timings", args.timings),
        ];
        if let Some((flag, _)) = unsupported.iter().find(|(_, set)| *set) {
            bail!(
                "{flag} is not supported with an IMAGE yet (run it without an image: `cela run --vm {flag} ... -- CMD`)"
            );
        }
        return crate::instance_cmd::run(
            crate::instance_cmd::RunImage {
                image,
                command: args.command,
                vm: args.vm,
                detach: args.detach,
                rm: args.rm,
                interactive: args.interactive,
                tty: args.tty,
                detach_keys: args.detach_keys,
                pull: args.pull.into(),
                name: args.name,
                cpus: args.cpus,
                memory: args.memory,
                env: args.env,
                workdir: args.workdir,
                user: args.user,
                volumes: args.volumes,
                kernel: args.kernel,
                initrd: args.initrd,
                net: args.net,
                publish: args.publish,
                cap_add: args.cap_add,
                cap_drop: args.cap_drop,
                security_opt: args.security_opt,
                no_confine: args.no_confine,
            },
            data_dir,
        );
    }
    if !args.vm {
        bail!(
            "cela run needs an IMAGE (a container; see cela image ls), or --vm to boot cela's own initramfs (`cela run --vm -- CMD`)"
        );
    }
    for (flag, set) in [
        ("--cap-add", !args.cap_add.is_empty()),
        ("--cap-drop", !args.cap_drop.is_empty()),
        ("--security-opt", !args.security_opt.is_empty()),
        ("-d", args.detach),
        ("--rm", args.rm),
        ("-i", args.interactive),
        ("-t", args.tty),
        ("--name", args.name.is_some()),
        ("-v", !args.volumes.is_empty()),
        ("-p", !args.publish.is_empty()),
    ] {
        if set {
            bail!(
                "{flag} needs an IMAGE (an instance); `cela run --vm -- CMD` runs once in the foreground"
            );
        }
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
    let mut disks: Vec<DiskConfig> = args.disks.iter().map(|d| DiskConfig::parse(d)).collect();
    if let Some(arg) = &args.rootfs {
        let rootfs = DiskConfig {
            serial: Some(ROOTFS_SERIAL.to_owned()),
            ..DiskConfig::parse(arg)
        };
        cela_vmm::config::check_rootfs(&rootfs.path)?;
        disks.push(rootfs);
    }
    cela_vmm::config::open_disks(&disks)?;
    if args.net.len() > 1 {
        anyhow::bail!("a microVM without an IMAGE has one --net (auto or tap=NAME)");
    }
    let net_mode = args.net.first().map(|n| NetMode::parse(n)).transpose()?;
    if net_mode == Some(NetMode::Auto) {
        // The link reaches the host alone, as an instance's does.
        cela_instance::network::firewall::ensure_auto_links_or_warn();
    }
    // The TAP (and for `auto` its address) exists from here on; it goes away with this
    // process, however the run ends.
    let net = net_mode.as_ref().map(cela_vmm::net::setup).transpose()?;
    let vsock = match &args.vsock {
        None => None,
        Some(path) => {
            let path = match path {
                Some(p) => p.clone(),
                None => paths::default_vsock_socket()?,
            };
            let v = VsockConfig {
                path,
                guest_cid: args
                    .vsock_cid
                    .unwrap_or(cela_vmm::devices::virtio::vsock::DEFAULT_GUEST_CID),
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
        root: args.rootfs.as_ref().map(|_| ROOTFS_SERIAL.to_owned()),
        nets: net.as_ref().and_then(|n| n.guest).into_iter().collect(),
        workdir: args.workdir.clone(),
        user: args.user.clone(),
        tty: false,
        hosts: false,
        links: Vec::new(),
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
        vcpus: args.cpus.unwrap_or(1),
        memory_mib: args.memory.unwrap_or(512),
        kernel,
        initrd: Some(initrd),
        cmdline,
        disks,
        nets: net.map(|n| n.nic).into_iter().collect(),
        vsock,
        confine: !args.no_confine,
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
