//! `cela run IMAGE`, `ps`, `logs`, `exec`, `stop`, `start`, `rm`, `inspect`: thin commands over
//! `cela-instance`. Each instance runs under its own supervisor process (`cela __supervise`,
//! started here in its own process group), so it outlives the command that started it; a
//! foreground `cela run` follows the instance's log and exits with its status.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use cela_image::Store;
use cela_instance::log::{LogReader, Stream};
use cela_instance::ops::{self, ExecRequest, is_live};
use cela_instance::run::START_BOUND;
use cela_instance::{
    GuestFiles, Instance, InstanceState, Instances, Kind, RunRequest, Security, Status, Volume,
};
use clap::Args;

use crate::EXIT_CELA_ERROR;
use crate::image_cmd::{Format, progress};

/// What `cela run` asks for when given an IMAGE (the flags shared with `cela run --vm` without
/// an image are passed in too).
pub struct RunImage {
    pub image: String,
    pub command: Vec<String>,
    pub vm: bool,
    pub detach: bool,
    pub rm: bool,
    /// `-i`, `-t`, `--detach-keys`.
    pub interactive: bool,
    pub tty: bool,
    pub detach_keys: String,
    /// `--pull`.
    pub pull: cela_instance::PullPolicy,
    pub name: Option<String>,
    pub cpus: Option<u32>,
    pub memory: Option<u64>,
    pub env: Vec<String>,
    pub workdir: Option<String>,
    pub user: Option<String>,
    pub volumes: Vec<String>,
    /// A microVM's own kernel and initramfs instead of cela's defaults.
    pub kernel: Option<std::path::PathBuf>,
    pub initrd: Option<std::path::PathBuf>,
    /// `--net`: none, host or auto, or named networks.
    pub net: Vec<String>,
    /// `-p`: ports to publish.
    pub publish: Vec<String>,
    /// `--cap-add`, `--cap-drop`, `--security-opt` (containers).
    pub cap_add: Vec<String>,
    pub cap_drop: Vec<String>,
    pub security_opt: Vec<String>,
    /// `--no-confine`: a microVM's monitor without its seccomp filters.
    pub no_confine: bool,
}

pub(crate) fn instances(data_dir: &Path) -> anyhow::Result<Instances> {
    Ok(Instances::open(data_dir)?)
}

pub fn run(req: RunImage, data_dir: &Path) -> anyhow::Result<ExitCode> {
    let kind = if req.vm { Kind::Vm } else { Kind::Container };
    let (net, networks) = cela_instance::network::parse_net_args(&req.net, kind)?;
    let security_flags =
        !req.cap_add.is_empty() || !req.cap_drop.is_empty() || !req.security_opt.is_empty();
    if req.no_confine && !req.vm {
        bail!("--no-confine is for microVMs (a container's confinement is --security-opt)");
    }
    if req.vm && security_flags {
        bail!(
            "--cap-add, --cap-drop and --security-opt are for containers (a microVM's guest kernel confines its processes)"
        );
    }
    if req.vm && !req.volumes.is_empty() {
        bail!(
            "-v is not supported for --vm yet (mount a disk with `cela run --vm --disk` instead)"
        );
    }
    if let Some(bad) = req
        .env
        .iter()
        .find(|e| !e.contains('=') || e.starts_with('='))
    {
        bail!("--env {bad:?} is not KEY=VALUE");
    }
    if !req.vm && (req.kernel.is_some() || req.initrd.is_some()) {
        bail!("--kernel and --initrd are for microVMs: add --vm");
    }
    let guest = match (req.kernel, req.initrd) {
        (Some(kernel), Some(initrd)) => {
            for (flag, p) in [("--kernel", &kernel), ("--initrd", &initrd)] {
                if !p.is_file() {
                    bail!("{flag} {}: no such file", p.display());
                }
            }
            GuestFiles::Custom { kernel, initrd }
        }
        (None, None) => GuestFiles::Default,
        _ => bail!(
            "--kernel and --initrd go together with an IMAGE (cela-init must be in the initramfs)"
        ),
    };
    let keys = cela_instance::attach::parse_detach_keys(&req.detach_keys)?;
    if req.tty && !req.detach && !std::io::stdin().is_terminal() {
        bail!(
            "-t needs a terminal on stdin (the input device is not a TTY); drop -t, or run it from a terminal"
        );
    }
    let interactive = (req.interactive || req.tty) && !req.detach;
    let request = RunRequest {
        command: req.command,
        name: req.name,
        env: req.env,
        workdir: req.workdir,
        user: req.user,
        volumes: req
            .volumes
            .iter()
            .map(|v| Volume::parse(v))
            .collect::<Result<Vec<_>, _>>()?,
        cpus: req.cpus,
        memory_mib: req.memory,
        net,
        networks,
        ports: req
            .publish
            .iter()
            .map(|p| cela_instance::network::ports::PortMapping::parse(p))
            .collect::<Result<Vec<_>, _>>()?,
        security: Security::parse(&req.cap_add, &req.cap_drop, &req.security_opt, net)?,
        guest,
        confine: !req.no_confine,
        // A foreground run removes the instance itself, after reading all its output; an
        // interactive one may be detached from, so its supervisor does.
        auto_remove: req.rm && (req.detach || interactive),
        stdin: req.interactive,
        tty: req.tty,
        // This terminal's size, for the workload's first look at its own.
        terminal_size: req
            .tty
            .then(|| cela_runtime::console::window_size(&std::io::stdin()).ok())
            .flatten()
            .map(|w| (w.ws_row, w.ws_col)),
        pull: req.pull,
        ..RunRequest::new(req.image, kind)
    };
    let store = crate::image_cmd::open(data_dir)?;
    let inst = cela_instance::run::create(data_dir, &store, &request, &progress())?;
    if req.detach {
        cela_instance::run::start(data_dir, &inst)?;
        out!("{}", inst.config.id);
        return Ok(ExitCode::SUCCESS);
    }
    cela_instance::run::spawn_supervisor(data_dir, &inst)?;
    if interactive {
        return Ok(match crate::attach_cmd::session(&inst, true, &keys)? {
            crate::attach_cmd::Outcome::Ended(code) => {
                // With --rm its supervisor removes it: gone when this returns, as Docker's
                // client waits for the removal.
                if req.rm {
                    wait_removed(&inst);
                }
                code
            }
            crate::attach_cmd::Outcome::Detached => ExitCode::SUCCESS,
        });
    }
    // Followed once its supervisor has claimed it (before that it is created, not live).
    ops::wait_state(&inst, START_BOUND, |s| s.supervisor.is_some())?;
    let state = follow(&inst, true)?;
    if req.rm {
        ops::remove(&inst, true)?;
    }
    Ok(exit_of(&inst, &state))
}

/// Waits (up to 30 s) until the supervisor of an auto-removed instance has removed it.
fn wait_removed(inst: &Instance) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while inst.dir.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// The status a foreground run or `cela wait` gives: the workload's, or 125 with the reason.
pub(crate) fn exit_of(inst: &Instance, state: &InstanceState) -> ExitCode {
    match (state.status, state.exit_code) {
        (Status::Exited, Some(code)) => ExitCode::from(code.clamp(0, 255) as u8),
        _ => {
            eprintln!(
                "cela: error: instance {} {}: {}",
                inst.name(),
                state.status,
                state.error.as_deref().unwrap_or("no exit status recorded")
            );
            ExitCode::from(EXIT_CELA_ERROR)
        }
    }
}

/// `cela __supervise ID`: runs the instance in this process (see cela_instance::supervise).
pub fn supervise(id: &str, data_dir: &Path) -> anyhow::Result<ExitCode> {
    let inst = instances(data_dir)?.find(id)?;
    if inst.config.kind == Kind::Container {
        reexec_sealed()?;
    }
    let store = Store::open(data_dir)?;
    cela_instance::supervise::supervise(&store, &inst)?;
    Ok(ExitCode::SUCCESS)
}

/// A process that puts processes into a container runs from a sealed copy of cela
/// (`cela_runtime::sealed`, CVE-2019-5736); this re-executes it so, unless it already does.
fn reexec_sealed() -> anyhow::Result<()> {
    cela_runtime::sealed::reexec_sealed().context("re-executing from a sealed copy of cela")
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// From here on, SIGINT and SIGTERM only set a flag ([`interrupted`]): the caller stops the
/// instance it follows.
pub(crate) fn catch_interrupts() -> anyhow::Result<()> {
    let action = nix::sys::signal::SigAction::new(
        nix::sys::signal::SigHandler::Handler(on_interrupt),
        nix::sys::signal::SaFlags::empty(),
        nix::sys::signal::SigSet::empty(),
    );
    for sig in [
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGTERM,
    ] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { nix::sys::signal::sigaction(sig, &action) }
            .context("installing a signal handler")?;
    }
    Ok(())
}

/// Whether SIGINT or SIGTERM came since [`catch_interrupts`].
pub(crate) fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Copies the instance's log to stdout/stderr until it has ended (when `until_end`) or until
/// everything written so far is out; Ctrl-C (with `until_end`) stops the instance.
pub(crate) fn follow(inst: &Instance, until_end: bool) -> anyhow::Result<InstanceState> {
    if until_end {
        catch_interrupts()?;
    }
    let mut reader: Option<LogReader> = None;
    let mut stopping = false;
    loop {
        if reader.is_none() {
            reader = LogReader::open(&inst.log_path()).ok();
        }
        // Read the state first: output written before it ended is then in the log.
        let state = inst.state()?;
        let any = match &mut reader {
            Some(r) => r.read_available(print_record)?,
            None => false,
        };
        let unread =
            STOP_ON_CLOSED_OUTPUT.load(Ordering::SeqCst) && OUTPUT_CLOSED.load(Ordering::SeqCst);
        if !until_end || !is_live(&state) || unread {
            if let Some(r) = &mut reader
                && !unread
            {
                r.read_available(print_record)?;
            }
            return Ok(state);
        }
        if interrupted() && !stopping {
            stopping = true;
            let inst = inst.clone();
            std::thread::spawn(move || ops::stop(&inst, Duration::from_secs(10)));
        }
        if !any {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Set once stdout or stderr is a pipe nobody reads any more (`cela logs -f | head`): a
/// follower then stops, as `docker logs -f` does, instead of following into the void.
static OUTPUT_CLOSED: AtomicBool = AtomicBool::new(false);
/// Only `cela logs -f` stops on a closed output; a foreground run waits for its instance.
static STOP_ON_CLOSED_OUTPUT: AtomicBool = AtomicBool::new(false);

pub(crate) fn print_record(stream: Stream, data: &[u8]) {
    let written = match stream {
        Stream::Stdout => std::io::stdout()
            .lock()
            .write_all(data)
            .and_then(|_| std::io::stdout().flush()),
        Stream::Stderr => std::io::stderr().lock().write_all(data),
    };
    if let Err(e) = written
        && e.kind() == std::io::ErrorKind::BrokenPipe
    {
        OUTPUT_CLOSED.store(true, Ordering::SeqCst);
    }
}

pub fn ps(all: bool, format: Format, data_dir: &Path) -> anyhow::Result<ExitCode> {
    let (good, broken) = instances(data_dir)?.scan()?;
    let mut rows = Vec::new();
    for inst in good {
        // A record that cannot be read is listed (as unknown, with the error), never fatal.
        let state = inst.state_or_unknown();
        if all || is_live(&state) || state.status == Status::Unknown {
            rows.push(cela_instance::view::summary(&inst, &state));
        }
    }
    rows.extend(broken.iter().map(cela_instance::view::broken));
    match format {
        Format::Json => out!("{}", serde_json::to_string_pretty(&rows)?),
        Format::Table => {
            out!(
                "{:12}  {:16}  {:9}  {:20}  {:24}  STATUS",
                "ID",
                "NAME",
                "KIND",
                "IMAGE",
                "COMMAND"
            );
            let cell = |v: &serde_json::Value, key: &str| v[key].as_str().unwrap_or("?").to_owned();
            for v in rows {
                let status = match (v["status"].as_str(), v["exit_code"].as_i64()) {
                    (Some("exited"), Some(c)) => format!("exited ({c})"),
                    (Some("unknown"), _) => format!("unknown: {}", cell(&v, "error")),
                    (st, _) => st.unwrap_or("?").to_owned(),
                };
                let mut cmd = v["command"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|x| x.as_str())
                            .collect::<Vec<_>>()
                            .join(" ")
                    })
                    .unwrap_or_default();
                if cmd.chars().count() > 24 {
                    cmd = cmd.chars().take(21).collect::<String>() + "...";
                }
                out!(
                    "{:12}  {:16}  {:9}  {:20}  {:24}  {status}",
                    cell(&v, "id"),
                    cell(&v, "name"),
                    cell(&v, "kind"),
                    cell(&v, "image"),
                    cmd
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn logs(name: &str, follow_it: bool, data_dir: &Path) -> anyhow::Result<ExitCode> {
    let inst = instances(data_dir)?.find(name)?;
    STOP_ON_CLOSED_OUTPUT.store(true, Ordering::SeqCst);
    follow(&inst, follow_it)?;
    Ok(ExitCode::SUCCESS)
}

/// A time for `cela events`: what a Docker client sends (seconds, RFC 3339), or a duration
/// ago as the docker CLI takes it (`30s`, `10m`, `1h30m`, `2d`).
fn event_time(v: &str) -> anyhow::Result<i64> {
    if let Ok(t) = cela_instance::events::parse_time(v) {
        return Ok(t);
    }
    let mut ago: i64 = 0;
    let mut number = String::new();
    for c in v.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let unit: i64 = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => bail!("{v:?} is not a time (seconds, RFC 3339, or a duration such as 10m)"),
        };
        let n: i64 = number
            .parse()
            .with_context(|| format!("{v:?}: a number before {c}"))?;
        ago = n
            .checked_mul(unit)
            .and_then(|x| x.checked_add(ago))
            .with_context(|| format!("{v:?} is too long ago"))?;
        number.clear();
    }
    if !number.is_empty() || v.is_empty() {
        bail!("{v:?} is not a time (seconds, RFC 3339, or a duration such as 10m)");
    }
    Ok(cela_instance::events::now_nano().saturating_sub(ago.saturating_mul(1_000_000_000)))
}

/// `cela events`: the journal's events that the filters select, one per line, as they come.
pub fn events(
    since: Option<&str>,
    until: Option<&str>,
    filters: &[String],
    format: Format,
    data_dir: &Path,
) -> anyhow::Result<ExitCode> {
    let mut query = cela_instance::events::Query {
        since: since.map(event_time).transpose()?,
        until: until.map(event_time).transpose()?,
        ..Default::default()
    };
    for f in filters {
        let (k, v) = f
            .split_once('=')
            .with_context(|| format!("filter {f:?} is not KEY=VALUE"))?;
        query
            .filters
            .entry(k.to_owned())
            .or_default()
            .push(v.to_owned());
    }
    query.check().map_err(anyhow::Error::msg)?;
    // The data dir exists (and is root's) before the journal is looked for.
    cela_instance::Instances::open(data_dir)?;
    let mut out = std::io::stdout().lock();
    cela_instance::events::follow(data_dir, &query, &|| false, |e| {
        let line = match format {
            Format::Json => serde_json::to_string(e).unwrap_or_default(),
            Format::Table => {
                let when = chrono::DateTime::from_timestamp_nanos(e.time_nano)
                    .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
                let attrs: Vec<String> = e
                    .attributes
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                format!(
                    "{when} {} {} {} ({})",
                    e.kind,
                    e.action,
                    e.id,
                    attrs.join(", ")
                )
            }
        };
        // A closed stdout (the reader of a pipe went) ends it.
        writeln!(out, "{line}").and_then(|()| out.flush()).is_ok()
    });
    Ok(ExitCode::SUCCESS)
}

pub fn inspect(names: &[String], data_dir: &Path) -> anyhow::Result<ExitCode> {
    let insts = instances(data_dir)?;
    let mut out = Vec::new();
    for n in names {
        let inst = insts.find(n)?;
        let state = inst.state_or_unknown();
        out.push(cela_instance::view::detail(&inst, &state));
    }
    out!("{}", serde_json::to_string_pretty(&out)?);
    Ok(ExitCode::SUCCESS)
}

#[derive(clap::Args, Debug)]
pub struct CommitArgs {
    /// The commit message, kept in the image's history.
    #[arg(short = 'm', long, value_name = "TEXT")]
    message: Option<String>,
    /// The author (e.g. "Name <mail>").
    #[arg(short = 'a', long)]
    author: Option<String>,
    /// A Dockerfile instruction to apply to the image's config: CMD, ENTRYPOINT, ENV, EXPOSE,
    /// LABEL, STOPSIGNAL, USER, VOLUME or WORKDIR (repeatable).
    #[arg(short = 'c', long = "change", value_name = "INSTRUCTION")]
    changes: Vec<String>,
    /// Freeze a running container while its changes are read (--pause=false to not).
    #[arg(short = 'p', long, default_value_t = true, action = clap::ArgAction::Set)]
    pause: bool,
    /// The container.
    instance: String,
    /// NAME[:TAG] for the image; without it the image is known by its digest only.
    name: Option<String>,
}

pub fn commit(args: CommitArgs, data_dir: &Path) -> anyhow::Result<ExitCode> {
    let insts = instances(data_dir)?;
    let inst = insts.find(&args.instance)?;
    let store = Store::open(data_dir)?;
    let req = cela_instance::commit::CommitRequest {
        name: args.name,
        message: args.message,
        author: args.author,
        changes: args.changes,
        pause: args.pause,
    };
    // Ctrl-C waits for the commit to end, so a frozen container is always thawed.
    catch_interrupts()?;
    let rec = cela_instance::commit::commit(&store, &inst, &req, &crate::image_cmd::progress())?;
    out!("{}", rec.digest);
    Ok(ExitCode::SUCCESS)
}

pub fn stop(names: &[String], timeout: u64, data_dir: &Path) -> anyhow::Result<ExitCode> {
    let insts = instances(data_dir)?;
    for n in names {
        let inst = insts.find(n)?;
        ops::stop(&inst, Duration::from_secs(timeout))?;
        out!("{}", inst.name());
    }
    Ok(ExitCode::SUCCESS)
}

pub fn start(names: &[String], data_dir: &Path) -> anyhow::Result<ExitCode> {
    let insts = instances(data_dir)?;
    for n in names {
        let inst = insts.find(n)?;
        cela_instance::run::start(data_dir, &inst)?;
        out!("{}", inst.name());
    }
    Ok(ExitCode::SUCCESS)
}

pub fn rm(names: &[String], force: bool, data_dir: &Path) -> anyhow::Result<ExitCode> {
    let insts = instances(data_dir)?;
    for n in names {
        match insts.find(n) {
            Ok(inst) => {
                ops::remove(&inst, force)?;
                out!("{}", inst.name());
            }
            // An instance whose config cannot be read is known by its id only.
            Err(e @ cela_instance::InstanceError::NotFound(_)) => match insts.find_broken(n)? {
                Some(b) => {
                    ops::remove_broken(&b, force)?;
                    out!("{}", b.id);
                }
                None => return Err(e.into()),
            },
            Err(e) => return Err(e.into()),
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Args, Debug)]
pub struct ExecArgs {
    /// Allocate a pseudo-terminal (with -i: an interactive shell).
    #[arg(short = 't', long)]
    tty: bool,
    /// Keep stdin open (the command reads cela's stdin; always so without -t).
    #[arg(short = 'i', long)]
    interactive: bool,
    /// Environment variable (repeatable).
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Working directory of the command.
    #[arg(short = 'w', long, value_name = "DIR")]
    workdir: Option<String>,
    /// Run as this user (`USER[:GROUP]`, names or numbers of the image).
    #[arg(short = 'u', long, value_name = "USER")]
    user: Option<String>,
    /// The instance (name or id).
    name: String,
    /// The command and its arguments.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        required = true,
        value_name = "CMD"
    )]
    command: Vec<String>,
}

pub fn exec(args: ExecArgs, data_dir: &Path) -> anyhow::Result<ExitCode> {
    let inst = instances(data_dir)?.find(&args.name)?;
    if inst.config.kind == Kind::Container {
        reexec_sealed()?;
    }
    // A microVM's terminal is the guest agent's; a container's comes through a console socket.
    let console = if args.tty && inst.config.kind == Kind::Container {
        Some(cela_runtime::console::ConsoleSocket::listen(
            &inst.dir.join("runtime"),
        )?)
    } else {
        None
    };
    let command = match args.command.first().map(String::as_str) {
        Some("--") => args.command[1..].to_vec(),
        _ => args.command.clone(),
    };
    let req = ExecRequest {
        args: command,
        env: args.env.clone(),
        workdir: args.workdir.clone(),
        user: args.user.clone(),
        tty: args.tty,
        console_socket: console.as_ref().map(|c| c.path().to_path_buf()),
        stdin: args.interactive || !args.tty,
    };
    let pid = match ops::exec(&inst, &req) {
        Ok(ops::Exec::Child(pid)) => pid,
        Ok(ops::Exec::Finished(code)) => return Ok(ExitCode::from(code.clamp(0, 255) as u8)),
        // A program that is not there or not executable gives a shell's status (127, 126).
        Err(
            e @ cela_instance::InstanceError::Runtime(cela_runtime::Error::Exec { status, .. }),
        ) if status != 1 => {
            eprintln!("cela: error: {e}");
            return Ok(ExitCode::from(status));
        }
        Err(e) => return Err(e.into()),
    };
    let proxy = match &console {
        Some(c) => Some(cela_runtime::console::TerminalProxy::start(
            c.receive_master()?,
        )?),
        None => None,
    };
    let code = cela_instance::supervise::wait_child(pid)?;
    if let Some(p) = proxy {
        p.finish();
    }
    Ok(ExitCode::from(code.clamp(0, 255) as u8))
}
