//! `cela-runc`: a runc-compatible command line over `cela-runtime`, so that containerd's runc
//! shim (and through it Docker and Kubernetes) can drive cela's containers.
//!
//! Exit status: 0 on success, 1 on any runtime error (as runc), and for a foreground `run` or
//! `exec` the process's own status (128+N if killed by signal N). Errors print one line,
//! `cela-runc: error: …`, and are also logged to `--log` (as a runc-style JSON record with
//! `--log-format json`, which containerd reads back to report the failure).

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, anyhow, bail};
use cela_runtime::console::{ConsoleSocket, TerminalProxy};
use cela_runtime::{CreateOptions, DEFAULT_ROOT, ExecOptions, Overrides, Runtime, spec};
use clap::{Args, Parser, Subcommand};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::Pid;
use oci_spec::runtime::LinuxResources;
use serde_json::json;

#[derive(Parser, Debug)]
#[command(
    name = "cela-runc",
    version,
    about = "cela's OCI container runtime, runc-compatible"
)]
struct Cli {
    #[command(flatten)]
    global: liboci_cli::GlobalOpts,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    Create(liboci_cli::Create),
    Start(liboci_cli::Start),
    State(liboci_cli::State),
    Kill(liboci_cli::Kill),
    Delete(liboci_cli::Delete),
    Run(liboci_cli::Run),
    Exec(liboci_cli::Exec),
    Ps(liboci_cli::Ps),
    List(liboci_cli::List),
    Pause(liboci_cli::Pause),
    Resume(liboci_cli::Resume),
    Update(liboci_cli::Update),
    Events(liboci_cli::Events),
    Features(liboci_cli::Features),
    Spec(SpecArgs),
}

/// Write a template config.json into a bundle directory
#[derive(Args, Debug)]
struct SpecArgs {
    /// Bundle directory to write config.json into
    #[arg(long, short)]
    bundle: Option<PathBuf>,
    /// Generate a configuration for a rootless container (not supported yet)
    #[arg(long)]
    rootless: bool,
    /// The jail profile: user namespace, own network and hostname, read-only root with a
    /// writable /tmp, few capabilities, seccomp, memory and pids limits
    #[arg(long)]
    jail: bool,
}

/// Where the one error line goes besides stderr.
struct Log {
    file: Option<PathBuf>,
    json: bool,
}

impl Log {
    fn error(&self, msg: &str) {
        let Some(path) = &self.file else { return };
        let Ok(mut f) = OpenOptions::new().create(true).append(true).open(path) else {
            return;
        };
        let line = if self.json {
            json!({"level": "error", "msg": msg, "time": chrono::Utc::now().to_rfc3339()})
                .to_string()
        } else {
            format!(
                "time=\"{}\" level=error msg={msg:?}",
                chrono::Utc::now().to_rfc3339()
            )
        };
        let _ = writeln!(f, "{line}");
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Commands that put a process into a container run from a sealed copy of this binary
    // (cela_runtime::sealed: CVE-2019-5736).
    if matches!(
        cli.command,
        Command::Create(_) | Command::Run(_) | Command::Exec(_)
    ) && let Err(e) = cela_runtime::sealed::reexec_sealed()
    {
        eprintln!("cela-runc: error: re-executing from a sealed copy of cela-runc: {e}");
        return ExitCode::from(1);
    }
    let log = Log {
        file: cli.global.log.clone(),
        json: cli.global.log_format.as_deref() == Some("json"),
    };
    if let Some(fmt) = cli.global.log_format.as_deref()
        && fmt != "json"
        && fmt != "text"
    {
        eprintln!("cela-runc: error: unknown --log-format {fmt:?}: use text or json");
        return ExitCode::from(1);
    }
    init_tracing(&cli.global, log.json);
    match dispatch(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let msg = format!("{e:#}");
            log.error(&msg);
            eprintln!("cela-runc: error: {msg}");
            ExitCode::from(1)
        }
    }
}

/// libcontainer reports through `tracing`. Its records go to `--log` (text format only: a JSON
/// log must hold only runc-shaped records), and to stderr only with `--debug`; its errors also
/// go to [`cela_runtime::cause`], from which a failed create's message takes its cause.
fn init_tracing(g: &liboci_cli::GlobalOpts, json_log: bool) {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let level = if g.debug { "debug" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::new(level);
    let log = match (&g.log, json_log) {
        (Some(path), false) => OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .ok()
            .map(|f| {
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_writer(std::sync::Mutex::new(f))
                    .boxed()
            }),
        _ if g.debug => Some(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .boxed(),
        ),
        _ => None,
    };
    tracing_subscriber::registry()
        .with(log.map(|l| l.with_filter(filter)))
        .with(cela_runtime::cause::layer())
        .init();
}

fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("resolving {}", p.display()))
}

fn absolute_opt(p: &Option<PathBuf>) -> Result<Option<PathBuf>> {
    p.as_deref().map(absolute).transpose()
}

fn dispatch(cli: Cli) -> Result<u8> {
    let root = cli
        .global
        .root
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_ROOT));
    let rt = Runtime::new(absolute(&root)?, cli.global.systemd_cgroup);
    match cli.command {
        Command::Create(a) => {
            let opts = CreateOptions {
                bundle: absolute(&a.bundle)?,
                console_socket: absolute_opt(&a.console_socket)?,
                pid_file: absolute_opt(&a.pid_file)?,
                no_pivot: a.no_pivot,
                preserve_fds: a.preserve_fds,
                detach: true,
            };
            rt.create(&a.container_id, &opts)?;
        }
        Command::Start(a) => rt.start(&a.container_id)?,
        Command::State(a) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&rt.state(&a.container_id)?)?
            );
        }
        Command::Kill(a) => rt.kill(&a.container_id, &a.signal, a.all)?,
        Command::Delete(a) => rt.delete(&a.container_id, a.force)?,
        Command::Run(a) => return run(&rt, a),
        Command::Exec(a) => return exec(&rt, a),
        Command::Ps(a) => ps(&rt, a)?,
        Command::List(a) => list(&rt, a)?,
        Command::Pause(a) => rt.pause(&a.container_id)?,
        Command::Resume(a) => rt.resume(&a.container_id)?,
        Command::Update(a) => {
            let resources = update_resources(&a)?;
            rt.update(&a.container_id, &resources)?;
        }
        Command::Events(a) => events(&rt, a)?,
        Command::Features(_) => {
            println!("{}", serde_json::to_string_pretty(&features())?);
        }
        Command::Spec(a) => write_spec(a)?,
    }
    Ok(0)
}

/// Signals a foreground `run` or `exec` passes on to the container's process.
const FORWARDED: [Signal; 7] = [
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
];

/// Waits for a child process, forwarding [`FORWARDED`] signals to it; returns its status as a
/// shell would (128+N when killed by signal N). Must be called after the process exists: the
/// signals are blocked in this process, and a process forked later would inherit the mask.
fn wait_forwarding(pid: Pid) -> Result<u8> {
    let mut set = SigSet::empty();
    for s in FORWARDED {
        set.add(s);
    }
    set.thread_block().context("blocking signals to forward")?;
    std::thread::spawn(move || {
        while let Ok(sig) = set.wait() {
            let _ = nix::sys::signal::kill(pid, sig);
        }
    });
    loop {
        match waitpid(pid, None) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(code as u8),
            Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(128 + sig as u8),
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => bail!("waiting for container process {pid}: {e}"),
        }
    }
}

fn run(rt: &Runtime, a: liboci_cli::Run) -> Result<u8> {
    let mut opts = CreateOptions {
        bundle: absolute(&a.bundle)?,
        console_socket: absolute_opt(&a.console_socket)?,
        pid_file: absolute_opt(&a.pid_file)?,
        no_pivot: a.no_pivot,
        preserve_fds: a.preserve_fds,
        detach: a.detach,
    };
    let terminal = spec::load_bundle(&opts.bundle)?
        .spec
        .process()
        .as_ref()
        .and_then(|p| p.terminal())
        .unwrap_or(false);
    let console = own_console(rt, terminal && !a.detach, &mut opts.console_socket)?;
    let id = &a.container_id;
    let container = rt.create(id, &opts)?;
    let started = (|| -> Result<(Pid, Option<TerminalProxy>)> {
        let pid = container
            .pid()
            .map(|p| Pid::from_raw(p.as_raw()))
            .ok_or_else(|| anyhow!("container {id} has no init pid"))?;
        let proxy = attach(console.as_ref())?;
        rt.start(id)?;
        Ok((pid, proxy))
    })();
    let (pid, proxy) = match started {
        Ok(s) => s,
        Err(e) => {
            let _ = rt.delete(id, true);
            return Err(e);
        }
    };
    if a.detach {
        return Ok(0);
    }
    let code = wait_forwarding(pid)?;
    if let Some(p) = proxy {
        p.finish();
    }
    if !a.keep {
        rt.delete(id, true)?;
    }
    Ok(code)
}

/// For a foreground process with a terminal and no `--console-socket`, cela-runc takes the
/// terminal itself: listens on a console socket of its own and points `console_socket` at it.
fn own_console(
    rt: &Runtime,
    foreground_terminal: bool,
    console_socket: &mut Option<PathBuf>,
) -> Result<Option<ConsoleSocket>> {
    if !foreground_terminal || console_socket.is_some() {
        return Ok(None);
    }
    let console = ConsoleSocket::listen(rt.root())?;
    *console_socket = Some(console.path().to_owned());
    Ok(Some(console))
}

/// Receives the terminal on cela-runc's own console socket and starts copying it.
fn attach(console: Option<&ConsoleSocket>) -> Result<Option<TerminalProxy>> {
    console
        .map(|c| {
            let master = c.receive_master()?;
            TerminalProxy::start(master).context("copying the container's terminal")
        })
        .transpose()
}

fn exec(rt: &Runtime, a: liboci_cli::Exec) -> Result<u8> {
    let process = absolute_opt(&a.process)?;
    let terminal = a.tty
        || match &process {
            Some(p) => cela_runtime::exec::read_json::<oci_spec::runtime::Process>(p)?
                .terminal()
                .unwrap_or(false),
            None => false,
        };
    let mut opts = ExecOptions {
        process,
        overrides: Overrides {
            args: a.command,
            env: a.env.into_iter().collect::<HashMap<_, _>>(),
            cwd: a.cwd,
            user: a.user,
            additional_gids: a.additional_gids,
            caps: a.cap,
            no_new_privs: a.no_new_privs,
            tty: a.tty,
        },
        console_socket: absolute_opt(&a.console_socket)?,
        pid_file: absolute_opt(&a.pid_file)?,
        detach: a.detach,
        preserve_fds: a.preserve_fds,
        ignore_paused: a.ignore_paused,
        cgroup: a.cgroup,
    };
    let console = own_console(rt, terminal && !a.detach, &mut opts.console_socket)?;
    let pid = Pid::from_raw(rt.exec(&a.container_id, &opts)?);
    if a.detach {
        return Ok(0);
    }
    let proxy = match attach(console.as_ref()) {
        Ok(p) => p,
        Err(e) => {
            let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
            let _ = waitpid(pid, None);
            return Err(e);
        }
    };
    let code = wait_forwarding(pid)?;
    if let Some(p) = proxy {
        p.finish();
    }
    Ok(code)
}

fn ps(rt: &Runtime, a: liboci_cli::Ps) -> Result<()> {
    let pids = rt.pids(&a.container_id)?;
    match a.format.as_str() {
        "json" => println!("{}", serde_json::to_string(&pids)?),
        "table" => {
            let opts = if a.ps_options.is_empty() {
                vec!["-ef".to_owned()]
            } else {
                a.ps_options
            };
            let out = std::process::Command::new("ps")
                .args(&opts)
                .output()
                .context("running ps")?;
            if !out.status.success() {
                bail!(
                    "ps {}: {}",
                    opts.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            let text = String::from_utf8_lossy(&out.stdout);
            let mut lines = text.lines();
            let header = lines.next().unwrap_or_default();
            let col = header
                .split_whitespace()
                .position(|c| c == "PID")
                .ok_or_else(|| anyhow!("ps output has no PID column"))?;
            println!("{header}");
            for line in lines {
                let pid = line
                    .split_whitespace()
                    .nth(col)
                    .and_then(|p| p.parse::<i32>().ok());
                if pid.is_some_and(|p| pids.contains(&p)) {
                    println!("{line}");
                }
            }
        }
        other => bail!("unknown ps format {other:?}: use table or json"),
    }
    Ok(())
}

fn list(rt: &Runtime, a: liboci_cli::List) -> Result<()> {
    let states = rt.list()?;
    if a.quiet {
        for s in &states {
            println!("{}", s.id);
        }
        return Ok(());
    }
    match a.format.as_str() {
        "json" => println!("{}", serde_json::to_string(&states)?),
        "table" => {
            println!(
                "{:<20} {:<8} {:<8} {:<40} {:<32} OWNER",
                "ID", "PID", "STATUS", "BUNDLE", "CREATED"
            );
            for s in &states {
                println!(
                    "{:<20} {:<8} {:<8} {:<40} {:<32} {}",
                    s.id,
                    s.pid,
                    s.status,
                    s.bundle.display(),
                    s.created,
                    s.owner
                );
            }
        }
        other => bail!("unknown list format {other:?}: use table or json"),
    }
    Ok(())
}

fn update_resources(a: &liboci_cli::Update) -> Result<LinuxResources> {
    if let Some(path) = &a.resources {
        let text = if path == Path::new("-") {
            std::io::read_to_string(std::io::stdin()).context("reading resources from stdin")?
        } else {
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
        };
        let de = &mut serde_json::Deserializer::from_str(&text);
        return serde_path_to_error::deserialize(de)
            .map_err(|e| anyhow!("resources field `{}`: {}", e.path(), e.inner()));
    }
    let mut memory = serde_json::Map::new();
    let put = |m: &mut serde_json::Map<_, _>, k: &str, v: Option<serde_json::Value>| {
        if let Some(v) = v {
            m.insert(k.to_owned(), v);
        }
    };
    put(&mut memory, "limit", a.memory.map(|v| json!(v)));
    put(
        &mut memory,
        "reservation",
        a.memory_reservation.map(|v| json!(v)),
    );
    put(&mut memory, "swap", a.memory_swap.map(|v| json!(v)));
    let mut cpu = serde_json::Map::new();
    put(&mut cpu, "shares", a.cpu_share.map(|v| json!(v)));
    put(&mut cpu, "quota", a.cpu_quota.map(|v| json!(v)));
    put(&mut cpu, "period", a.cpu_period.map(|v| json!(v)));
    put(
        &mut cpu,
        "realtimeRuntime",
        a.cpu_rt_runtime.map(|v| json!(v)),
    );
    put(
        &mut cpu,
        "realtimePeriod",
        a.cpu_rt_period.map(|v| json!(v)),
    );
    put(&mut cpu, "cpus", a.cpuset_cpus.clone().map(|v| json!(v)));
    put(&mut cpu, "mems", a.cpuset_mems.clone().map(|v| json!(v)));
    let mut res = serde_json::Map::new();
    if !memory.is_empty() {
        res.insert("memory".into(), memory.into());
    }
    if !cpu.is_empty() {
        res.insert("cpu".into(), cpu.into());
    }
    put(&mut res, "pids", a.pids_limit.map(|v| json!({"limit": v})));
    put(
        &mut res,
        "blockIO",
        a.blkio_weight.map(|v| json!({"weight": v})),
    );
    if a.l3_cache_schema.is_some() || a.mem_bw_schema.is_some() {
        bail!("Intel RDT (--l3-cache-schema, --mem-bw-schema) is not supported");
    }
    if res.is_empty() {
        bail!("update: give a limit to change (e.g. --memory, --pids-limit) or --resources FILE");
    }
    Ok(serde_json::from_value(res.into())?)
}

fn events(rt: &Runtime, a: liboci_cli::Events) -> Result<()> {
    let id = &a.container_id;
    loop {
        let stats = rt.stats(id)?;
        let event = json!({"type": "stats", "id": id, "data": stats});
        let mut out = std::io::stdout().lock();
        writeln!(out, "{event}")?;
        out.flush()?;
        drop(out);
        if a.stats {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_secs(a.interval.max(1).into()));
        if rt.state(id)?.status == "stopped" {
            return Ok(());
        }
    }
}

/// What this runtime supports, in the shape of the OCI runtime spec's features document.
fn features() -> serde_json::Value {
    json!({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": "1.2.0",
        "hooks": ["prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop"],
        "mountOptions": ["ro", "rw", "nosuid", "suid", "nodev", "dev", "noexec", "exec", "bind",
            "rbind", "private", "rprivate", "shared", "rshared", "slave", "rslave", "relatime",
            "norelatime", "strictatime", "nostrictatime", "noatime", "atime", "sync", "async",
            "remount", "mand", "nomand", "dirsync", "tmpcopyup", "idmap", "ridmap"],
        "linux": {
            "namespaces": ["cgroup", "ipc", "mount", "network", "pid", "user", "uts", "time"],
            "capabilities": caps::all().iter().map(|c| c.to_string()).collect::<Vec<_>>(),
            "cgroup": {"v1": true, "v2": true, "systemd": true, "systemdUser": true},
            "seccomp": {
                "enabled": true,
                "actions": ["SCMP_ACT_ALLOW", "SCMP_ACT_ERRNO", "SCMP_ACT_KILL",
                    "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_KILL_THREAD", "SCMP_ACT_LOG",
                    "SCMP_ACT_NOTIFY", "SCMP_ACT_TRACE", "SCMP_ACT_TRAP"],
                "operators": ["SCMP_CMP_EQ", "SCMP_CMP_GE", "SCMP_CMP_GT", "SCMP_CMP_LE",
                    "SCMP_CMP_LT", "SCMP_CMP_MASKED_EQ", "SCMP_CMP_NE"],
                "archs": ["SCMP_ARCH_X86", "SCMP_ARCH_X86_64", "SCMP_ARCH_X32"]
            },
            "apparmor": {"enabled": false},
            "selinux": {"enabled": false}
        },
        "annotations": {"org.opencontainers.runc.version": "1.1.0-compatible",
            "dev.cela.runtime": "libcontainer 0.7"}
    })
}

fn write_spec(a: SpecArgs) -> Result<()> {
    if a.rootless {
        bail!("spec --rootless is not supported yet; cela-runc runs as root");
    }
    let dir = a.bundle.unwrap_or_else(|| PathBuf::from("."));
    let path = dir.join("config.json");
    let spec = if a.jail {
        spec::jail_spec()
    } else {
        spec::default_spec()
    };
    let text = serde_json::to_string_pretty(&spec)?;
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .with_context(|| format!("writing {} (remove an existing one first)", path.display()))?;
    f.write_all(text.as_bytes())?;
    f.write_all(b"\n")?;
    Ok(())
}
