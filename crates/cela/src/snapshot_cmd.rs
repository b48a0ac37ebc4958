//! `cela snapshot` (take, ls, rm, export, import) and `cela restore`: thin commands over
//! `cela_instance::snapshot`; the supervisor of the VM takes the snapshot itself.

use std::fs::File;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use cela_instance::control::{self, Reply, Request};
use cela_instance::run::START_BOUND;
use cela_instance::snapshot::{self, RestoreRequest, SnapshotRequest, Snapshots};
use cela_instance::{Kind, NetMode, ops};
use clap::{Args, Subcommand};

use crate::image_cmd::{Format, human_size};
use crate::instance_cmd::{exit_of, follow, instances};

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct SnapshotArgs {
    #[command(subcommand)]
    command: Option<SnapshotCommand>,
    /// The snapshot's name (default: the instance's and the time).
    #[arg(long, value_name = "SNAP")]
    name: Option<String>,
    /// Let the VM run on after the snapshot (by default it ends as saved).
    #[arg(long)]
    leave_running: bool,
    /// The running microVM to save.
    instance: Option<String>,
}

#[derive(Subcommand, Debug)]
enum SnapshotCommand {
    /// List snapshots.
    #[command(alias = "list")]
    Ls {
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Remove snapshots.
    #[command(alias = "remove")]
    Rm {
        #[arg(value_name = "SNAP", required = true)]
        names: Vec<String>,
    },
    /// Write a snapshot to a tar file (`-`: standard output) to take to another host.
    Export {
        #[arg(value_name = "SNAP")]
        snapshot: String,
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Store a snapshot from a tar file made by export (`-`: standard input; gzip or zstd
    /// compressed is fine).
    Import {
        /// Store it under this name (default: the name it was exported with).
        #[arg(long, value_name = "SNAP")]
        name: Option<String>,
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// The new instance's name.
    #[arg(long)]
    name: Option<String>,
    /// Run in the background: print the new instance's id and return.
    #[arg(short = 'd', long)]
    detach: bool,
    /// Remove the instance when it ends.
    #[arg(long)]
    rm: bool,
    /// The network: `auto` (a link to the host of its own: a new TAP, MAC and /30, which the
    /// guest takes on resume) or `none`. Default: the snapshot's (a VM that was on a named
    /// network rejoins it with an address and MAC of its own); the other is refused (a
    /// restore cannot add or remove the machine's network card), except that a VM from a
    /// named network may take `auto`. An imported snapshot with a `--net auto` card gets a
    /// link to this host only with `--net auto` given.
    #[arg(long, value_name = "none|auto")]
    net: Option<String>,
    /// The keys that detach from a copy with a terminal (comma-separated `ctrl-X` or
    /// characters; empty: none).
    #[arg(long, value_name = "KEYS", default_value = "ctrl-p,ctrl-q")]
    detach_keys: String,
    /// The snapshot.
    snapshot: String,
}

pub fn snapshot(args: SnapshotArgs, data_dir: &Path) -> anyhow::Result<ExitCode> {
    match args.command {
        Some(SnapshotCommand::Ls { format }) => ls(format, data_dir),
        Some(SnapshotCommand::Rm { names }) => {
            let snaps = Snapshots::open(data_dir)?;
            for n in names {
                snaps.remove(&n)?;
                out!("{n}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Some(SnapshotCommand::Export { snapshot, file }) => export(&snapshot, &file, data_dir),
        Some(SnapshotCommand::Import { name, file }) => {
            let snaps = Snapshots::open(data_dir)?;
            let input: Box<dyn std::io::Read> = if file == Path::new("-") {
                if std::io::stdin().is_terminal() {
                    bail!(
                        "refusing to read a snapshot archive from a terminal: give a file, or redirect"
                    );
                }
                Box::new(std::io::stdin())
            } else {
                Box::new(File::open(&file).with_context(|| format!("opening {}", file.display()))?)
            };
            let m = snapshot::archive::import(&snaps, input, name.as_deref())?;
            out!("{}", m.name);
            Ok(ExitCode::SUCCESS)
        }
        None => {
            let Some(name) = args.instance else {
                bail!("cela snapshot needs an instance (or ls, rm): see cela snapshot --help");
            };
            take(&name, args.name, args.leave_running, data_dir)
        }
    }
}

fn take(
    instance: &str,
    name: Option<String>,
    leave_running: bool,
    data_dir: &Path,
) -> anyhow::Result<ExitCode> {
    let inst = instances(data_dir)?.find(instance)?;
    snapshot::check_snapshottable(&inst)?;
    require_live(&inst, "a snapshot is of a running microVM")?;
    let req = Request::Snapshot(SnapshotRequest {
        name: name.unwrap_or_else(|| snapshot::default_name(&inst.config.name)),
        leave_running,
    });
    match control::request(&inst, &req, control::SNAPSHOT_BOUND)? {
        Reply::Snapshot(m) => {
            if !leave_running {
                // The machine has ended as saved; its end is recorded as it shuts down (an
                // instance made with --rm is then gone, which is as ended).
                if let Err(e) = ops::wait_state(&inst, START_BOUND, |s| !ops::is_live(s))
                    && inst.dir.exists()
                {
                    return Err(e.into());
                }
            }
            let bytes: u64 = m.files.iter().map(|f| f.size).sum();
            out!("{}", m.name);
            eprintln!(
                "saved {} ({}{})",
                inst.config.name,
                human_size(bytes),
                if leave_running {
                    "; it runs on"
                } else {
                    "; it ended"
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        Reply::Error(e) => bail!("{e}"),
    }
}

/// `cela snapshot export`: to standard output, to a device or pipe as it is, or to a
/// regular file through a temporary sibling renamed into place once whole (an existing file
/// is replaced only then; a failure removes only the temporary file).
fn export(name: &str, file: &Path, data_dir: &Path) -> anyhow::Result<ExitCode> {
    let snaps = Snapshots::open(data_dir)?;
    if file == Path::new("-") {
        if std::io::stdout().is_terminal() {
            bail!("refusing to write a snapshot archive to a terminal: give a file, or redirect");
        }
        let out = std::io::BufWriter::with_capacity(1 << 20, std::io::stdout().lock());
        snapshot::archive::export(&snaps, name, out)?;
        return Ok(ExitCode::SUCCESS);
    }
    snaps.find(name)?;
    if let Ok(meta) = std::fs::metadata(file)
        && !meta.is_file()
    {
        // /dev/null, a FIFO, a tape: written as it is, never removed.
        let out = std::fs::OpenOptions::new()
            .write(true)
            .open(file)
            .with_context(|| format!("opening {}", file.display()))?;
        snapshot::archive::export(
            &snaps,
            name,
            std::io::BufWriter::with_capacity(1 << 20, out),
        )?;
        return Ok(ExitCode::SUCCESS);
    }
    let base = file
        .file_name()
        .with_context(|| format!("{} names no file", file.display()))?;
    let tmp = file.with_file_name(format!(
        ".{}.tmp-{}",
        base.to_string_lossy(),
        std::process::id()
    ));
    let out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    let written = snapshot::archive::export(
        &snaps,
        name,
        std::io::BufWriter::with_capacity(1 << 20, &out),
    )
    .map_err(anyhow::Error::from)
    .and_then(|_| {
        out.sync_all()
            .with_context(|| format!("writing {}", tmp.display()))
    })
    .and_then(|_| {
        std::fs::rename(&tmp, file)
            .with_context(|| format!("renaming {} to {}", tmp.display(), file.display()))
    });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(ExitCode::SUCCESS)
}

/// The state of `inst`, which must be live (`hint` says why).
fn require_live(
    inst: &cela_instance::Instance,
    hint: &'static str,
) -> anyhow::Result<cela_instance::InstanceState> {
    let state = inst.state()?;
    if !ops::is_live(&state) {
        return Err(cela_instance::InstanceError::WrongState {
            name: inst.config.name.clone(),
            status: state.status.to_string(),
            hint,
        }
        .into());
    }
    Ok(state)
}

fn ls(format: Format, data_dir: &Path) -> anyhow::Result<ExitCode> {
    let snaps = Snapshots::open(data_dir)?;
    let list = snaps.list()?;
    match format {
        Format::Json => out!("{}", serde_json::to_string_pretty(&list)?),
        Format::Table => {
            out!(
                "{:<32} {:<20} {:<8} {:>10}  CREATED",
                "NAME",
                "SOURCE",
                "ENGINE",
                "SIZE"
            );
            for m in list {
                let bytes: u64 = m.files.iter().map(|f| f.size).sum();
                out!(
                    "{:<32} {:<20} {:<8} {:>10}  {}",
                    m.name,
                    m.source.name,
                    m.engine,
                    human_size(bytes),
                    m.created
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Args, Debug)]
pub struct ForkArgs {
    /// How many copies.
    #[arg(short = 'n', long, default_value_t = 1)]
    count: u32,
    /// The copies are named PREFIX-1, PREFIX-2, … (default: INSTANCE-fork).
    #[arg(long, value_name = "PREFIX")]
    name_prefix: Option<String>,
    /// The running microVM to copy; it runs on.
    instance: String,
}

pub fn fork(args: ForkArgs, data_dir: &Path) -> anyhow::Result<ExitCode> {
    let inst = instances(data_dir)?.find(&args.instance)?;
    require_live(&inst, "fork copies a running microVM")?;
    let copies = snapshot::fork(data_dir, &inst, args.count, args.name_prefix.as_deref())?;
    for c in copies {
        out!("{}", c.config.name);
    }
    Ok(ExitCode::SUCCESS)
}

pub fn restore(args: RestoreArgs, data_dir: &Path) -> anyhow::Result<ExitCode> {
    // A copy takes input as its source did (`run -i`/`-t`): in the foreground this terminal
    // is connected to it, as `run -it` connects one.
    let source = Snapshots::open(data_dir)?.find(&args.snapshot)?.config;
    let interactive = (source.stdin || source.tty) && !args.detach;
    if source.tty && interactive && !std::io::stdin().is_terminal() {
        bail!(
            "snapshot {} is of a VM run with -t: a foreground restore needs a terminal on stdin (the input device is not a TTY); use -d and `cela attach`, or run it from a terminal",
            args.snapshot
        );
    }
    let keys = cela_instance::attach::parse_detach_keys(&args.detach_keys)?;
    let req = RestoreRequest {
        snapshot: args.snapshot,
        name: args.name,
        // A foreground restore removes the instance itself, after reading its output; an
        // interactive one may be detached from, so its supervisor does.
        auto_remove: args.rm && (args.detach || interactive),
        net: args
            .net
            .as_deref()
            .map(|n| NetMode::parse(n, Kind::Vm))
            .transpose()?,
    };
    let inst = snapshot::restore(data_dir, &req)?;
    if args.detach {
        out!("{}", inst.config.id);
        return Ok(ExitCode::SUCCESS);
    }
    if interactive {
        return Ok(match crate::attach_cmd::session(&inst, true, &keys)? {
            crate::attach_cmd::Outcome::Ended(code) => code,
            crate::attach_cmd::Outcome::Detached => ExitCode::SUCCESS,
        });
    }
    ops::wait_state(&inst, START_BOUND, |s| s.supervisor.is_some())?;
    let state = follow(&inst, true)?;
    if args.rm {
        ops::remove(&inst, true)?;
    }
    Ok(exit_of(&inst, &state))
}
