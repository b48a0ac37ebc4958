//! `cela`: the command line. It parses arguments, turns them into the libraries' requests and
//! prints results; the mechanisms live in the `cela-vmm`, `cela-assets`, `cela-guest` and
//! `cela-image` crates.

mod image_cmd;
mod paths;
mod run_vm;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit status for failures of cela itself (bad input, missing assets, a VMM fault), as
/// Docker uses 125 for errors of the daemon rather than of the container.
pub const EXIT_CELA_ERROR: u8 = 125;

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
    Run(run_vm::RunArgs),
    /// Pull an image from an OCI/Docker registry into the image store.
    Pull(image_cmd::PullArgs),
    /// Manage stored images (import, ls, rm).
    #[command(subcommand)]
    Image(image_cmd::ImageCommand),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CELA_LOG")
                // rustls' verifier logs each refused certificate as an error of its own; cela
                // reports the failed pull in its one error line.
                .unwrap_or_else(|_| {
                    tracing_subscriber::EnvFilter::new("warn,rustls_platform_verifier=off")
                }),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let data_dir = paths::data_dir(cli.data_dir);
    let result = match cli.command {
        Command::Run(args) => run_vm::run(args, &data_dir),
        Command::Pull(args) => image_cmd::pull(args, &data_dir),
        Command::Image(cmd) => image_cmd::image(cmd, &data_dir),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cela: error: {e:#}");
            ExitCode::from(EXIT_CELA_ERROR)
        }
    }
}
