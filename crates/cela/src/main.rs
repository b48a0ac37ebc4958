//! `cela`: the command line. It parses arguments, turns them into the libraries' requests and
//! prints results; the mechanisms live in the `cela-vmm`, `cela-assets`, `cela-guest` and
//! `cela-image` crates.

/// `println!` for the command's results: a reader that went away (`cela ps | head -1`,
/// `grep -q`) ends cela quietly with 141, as a shell reports a pipe's SIGPIPE, instead of the
/// panic `println!` makes of it; any other failure to write is cela's error.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::write_out(format_args!("{}\n", format_args!($($arg)*)))
    };
}

mod attach_cmd;
mod image_cmd;
mod instance_cmd;
mod lab_cmd;
mod network_cmd;
mod paths;
mod run_vm;
mod snapshot_cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit status for failures of cela itself (bad input, missing assets, a VMM fault), as
/// Docker uses 125 for errors of the daemon rather than of the container.
pub const EXIT_CELA_ERROR: u8 = 125;

/// Writes to stdout for [`out!`].
pub fn write_out(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_fmt(args).and_then(|()| stdout.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(141);
        }
        eprintln!("cela: error: writing the output: {e}");
        std::process::exit(i32::from(EXIT_CELA_ERROR));
    }
}

#[derive(Parser, Debug)]
#[command(
    name = "cela",
    version,
    about = "Run workloads in microVMs and containers"
)]
struct Cli {
    /// Where cela keeps images, guest assets and instances (default: $CELA_DATA_DIR or
    /// /var/lib/cela).
    #[arg(long, global = true, value_name = "DIR")]
    data_dir: Option<std::path::PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a command in a new instance (with --vm: a microVM booting a stock Linux kernel).
    Run(Box<run_vm::RunArgs>),
    /// Pull an image from an OCI/Docker registry into the image store.
    Pull(image_cmd::PullArgs),
    /// Manage stored images (import, ls, rm).
    #[command(subcommand)]
    Image(image_cmd::ImageCommand),
    /// List instances (running ones; all with -a).
    Ps {
        /// Also instances that have ended.
        #[arg(short = 'a', long)]
        all: bool,
        /// Output format: a table, or a JSON array (its shape is documented in the README).
        #[arg(long, value_enum, default_value_t = image_cmd::Format::Table)]
        format: image_cmd::Format,
    },
    /// Print an instance's output (stdout and stderr apart).
    Logs {
        /// Keep printing until the instance ends.
        #[arg(short = 'f', long)]
        follow: bool,
        name: String,
    },
    /// Run a command in a running instance.
    Exec(instance_cmd::ExecArgs),
    /// Connect this terminal to a running instance's input and output (Ctrl-P Ctrl-Q detaches
    /// from one with a terminal).
    Attach {
        /// The keys that detach (comma-separated `ctrl-X` or characters; empty: none).
        #[arg(long, value_name = "KEYS", default_value = "ctrl-p,ctrl-q")]
        detach_keys: String,
        name: String,
    },
    /// Stop instances: SIGTERM, then SIGKILL after the timeout.
    Stop {
        /// Seconds between SIGTERM and SIGKILL.
        #[arg(short = 't', long, default_value_t = 10, value_name = "S")]
        timeout: u64,
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Start instances that have ended, in the background.
    Start {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Remove instances (a running one needs -f).
    Rm {
        /// Stop (kill) a running instance first.
        #[arg(short = 'f', long)]
        force: bool,
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Print what happens to instances (create, start, die, kill, stop, destroy), as it
    /// happens; with --since, what happened before too.
    Events {
        /// From this time: seconds since the epoch, RFC 3339, or a duration ago (10m, 1h30m).
        #[arg(long, value_name = "TIME")]
        since: Option<String>,
        /// Until this time (then cela events ends), in the same forms.
        #[arg(long, value_name = "TIME")]
        until: Option<String>,
        /// Only these: type, event, container, image, label (label=K or label=K=V);
        /// repeatable.
        #[arg(short = 'f', long = "filter", value_name = "KEY=VALUE")]
        filters: Vec<String>,
        /// One line of text per event, or JSON lines.
        #[arg(long, value_enum, default_value_t = image_cmd::Format::Table)]
        format: image_cmd::Format,
    },
    /// Make an image of a container's changes: its writable layer on top of its image, run
    /// as the container was (Docker's commit).
    Commit(instance_cmd::CommitArgs),
    /// Save a running microVM (memory, CPUs, devices, disk) as a snapshot, and list or remove
    /// snapshots (`snapshot ls`, `snapshot rm`).
    Snapshot(snapshot_cmd::SnapshotArgs),
    /// Start a new instance from a snapshot, going on where it was taken.
    Restore(snapshot_cmd::RestoreArgs),
    /// Start copies of a running microVM, each going on from where it is now; it runs on.
    Fork(snapshot_cmd::ForkArgs),
    /// Manage networks that instances share (create, ls, inspect, rm).
    #[command(subcommand)]
    Network(network_cmd::NetworkCommand),
    /// Network labs: topologies of containers and microVMs with links (up, down, ls, inspect,
    /// graph, impair).
    #[command(subcommand)]
    Lab(lab_cmd::LabCommand),
    /// Print instances' config and state as JSON.
    Inspect {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Serve the Docker Engine API and cela's own API on Unix sockets, and a TCP port when asked
    /// (see docs/API.md).
    Serve {
        /// cela's own API (`/cela/v1`); the Docker API is served here too.
        #[arg(long, value_name = "PATH", default_value = "/run/cela/api.sock")]
        socket: std::path::PathBuf,
        /// The socket for Docker clients: `DOCKER_HOST=unix://PATH docker ...`.
        #[arg(long, value_name = "PATH", default_value = "/run/cela/docker.sock")]
        docker_socket: std::path::PathBuf,
        /// Serve both APIs on a TCP port too (every request must carry the token).
        #[arg(long, value_name = "ADDR:PORT", requires = "token_file")]
        listen: Option<std::net::SocketAddr>,
        /// The token TCP clients send (`Authorization: Bearer TOKEN`): a file only root can
        /// read, e.g. `openssl rand -hex 32 > F; chmod 600 F`.
        #[arg(long, value_name = "FILE", requires = "listen")]
        token_file: Option<std::path::PathBuf>,
        /// Serve TLS on the TCP port with this certificate chain (PEM); needed for an address
        /// that is not loopback.
        #[arg(long, value_name = "FILE", requires_all = ["listen", "tls_key"])]
        tls_cert: Option<std::path::PathBuf>,
        /// The certificate's private key (PEM, mode 600).
        #[arg(long, value_name = "FILE", requires = "tls_cert")]
        tls_key: Option<std::path::PathBuf>,
    },
    /// Run an instance's workload in this process (started by cela itself).
    #[command(name = "__supervise", hide = true)]
    Supervise { id: String },
    /// Carry an impaired lab link's frames (started by cela itself).
    #[command(name = "__link-relay", hide = true)]
    LinkRelay(lab_cmd::RelayArgs),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    if let Command::Supervise { id } = &cli.command
        && !cela_instance::record::is_id(id)
    {
        eprintln!("cela: error: {id:?} is not an instance id");
        return ExitCode::from(EXIT_CELA_ERROR);
    }
    // The relay touches no data dir (it is given its namespace), and holds no other state.
    if let Command::LinkRelay(args) = cli.command {
        return match lab_cmd::relay(args) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("cela: error: {e:#}");
                ExitCode::from(EXIT_CELA_ERROR)
            }
        };
    }
    let data_dir = paths::data_dir(cli.data_dir);
    // The data dir holds images' setuid files and device nodes and containers' writable
    // layers: root's alone, whatever command comes first.
    if let Err(e) = cela_instance::record::private_dir(&data_dir) {
        eprintln!("cela: error: {e}");
        return ExitCode::from(EXIT_CELA_ERROR);
    }
    let filter = tracing_subscriber::EnvFilter::try_from_env("CELA_LOG")
        // rustls' verifier logs each refused certificate as an error of its own, libcontainer
        // each failed step; cela reports the failure in its one error line.
        .unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new(
                "warn,libcgroups=error,libcontainer=off,rustls_platform_verifier=off",
            )
        });
    // A supervisor's stderr is its instance's output: its own messages go to a file beside it.
    let supervisor_log = match &cli.command {
        Command::Supervise { id } => std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data_dir.join("instances").join(id).join("supervisor.log"))
            .ok(),
        _ => None,
    };
    {
        use tracing_subscriber::Layer;
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        let log = match supervisor_log {
            Some(file) => tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(file))
                .boxed(),
            None => tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .boxed(),
        };
        // libcontainer's errors also go to cela_runtime::cause, from which a failed
        // container create takes its cause (they are logged only in the container's processes).
        tracing_subscriber::registry()
            .with(log.with_filter(filter))
            .with(cela_runtime::cause::layer())
            .init();
    }
    let result = match cli.command {
        Command::Run(args) => run_vm::run(*args, &data_dir),
        Command::Pull(args) => image_cmd::pull(args, &data_dir),
        Command::Image(cmd) => image_cmd::image(cmd, &data_dir),
        Command::Ps { all, format } => instance_cmd::ps(all, format, &data_dir),
        Command::Logs { follow, name } => instance_cmd::logs(&name, follow, &data_dir),
        Command::Exec(args) => instance_cmd::exec(args, &data_dir),
        Command::Attach { detach_keys, name } => attach_cmd::attach(&name, &detach_keys, &data_dir),
        Command::Stop { timeout, names } => instance_cmd::stop(&names, timeout, &data_dir),
        Command::Start { names } => instance_cmd::start(&names, &data_dir),
        Command::Rm { force, names } => instance_cmd::rm(&names, force, &data_dir),
        Command::Inspect { names } => instance_cmd::inspect(&names, &data_dir),
        Command::Commit(args) => instance_cmd::commit(args, &data_dir),
        Command::Snapshot(args) => snapshot_cmd::snapshot(args, &data_dir),
        Command::Network(cmd) => network_cmd::network(cmd, &data_dir),
        Command::Lab(cmd) => lab_cmd::lab(cmd, &data_dir),
        Command::LinkRelay(_) => unreachable!("run before the data dir is set up"),
        Command::Restore(args) => snapshot_cmd::restore(args, &data_dir),
        Command::Fork(args) => snapshot_cmd::fork(args, &data_dir),
        Command::Events {
            since,
            until,
            filters,
            format,
        } => instance_cmd::events(
            since.as_deref(),
            until.as_deref(),
            &filters,
            format,
            &data_dir,
        ),
        Command::Supervise { id } => instance_cmd::supervise(&id, &data_dir),
        Command::Serve {
            socket,
            docker_socket,
            listen,
            token_file,
            tls_cert,
            tls_key,
        } => cela_api::serve(&cela_api::ServeOptions {
            data_dir: data_dir.clone(),
            socket,
            docker_socket,
            tcp: listen
                .zip(token_file)
                .map(|(listen, token_file)| cela_api::tcp::TcpOptions {
                    listen,
                    token_file,
                    tls: tls_cert.zip(tls_key),
                }),
        })
        .map(|()| ExitCode::SUCCESS)
        .map_err(anyhow::Error::from),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cela: error: {e:#}");
            ExitCode::from(EXIT_CELA_ERROR)
        }
    }
}

/// Help and version go to stdout (status 0); a command line clap refuses becomes one
/// `cela: error:` line naming the problem, status 125, as every other error of cela's.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = e.print();
            ExitCode::SUCCESS
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            ExitCode::from(EXIT_CELA_ERROR)
        }
        _ => {
            let text = e.render().to_string();
            // The message's first paragraph: its first line, and the indented lines under it
            // (the missing arguments, one a line) folded into that line.
            let mut para = text
                .lines()
                .skip_while(|l| l.trim().is_empty())
                .take_while(|l| !l.trim().is_empty());
            let head = para.next().unwrap_or("bad arguments");
            let head = head.strip_prefix("error: ").unwrap_or(head);
            let items: Vec<&str> = para
                .map(str::trim)
                .filter(|l| !l.starts_with("tip: "))
                .collect();
            let first = if items.is_empty() {
                head.to_owned()
            } else {
                format!("{head} {}", items.join(", "))
            };
            let tip = text
                .lines()
                .find_map(|l| l.trim().strip_prefix("tip: "))
                .map(|t| format!("; {t}"))
                .unwrap_or_default();
            eprintln!("cela: error: {first}{tip} (see cela --help)");
            ExitCode::from(EXIT_CELA_ERROR)
        }
    }
}
