//! `cela-lab`: runs one command inside the nested lab's L1 guest (which has a real /dev/kvm) and
//! reports what it did, for humans and benchmark scripts.
//!
//! Prints the command's stdout to stdout and its stderr to stderr, then on stdout the lines
//! `LAB-RC <rc>`, `LAB-L1-SECONDS <seconds>` (L1 uptime around the command),
//! `LAB-L1-READY-SECONDS <seconds>` (L1 uptime when the command started: kernel boot and module
//! loading) and `LAB-WALL-SECONDS <seconds>` (the whole run on the host), each on a line of its
//! own. Exits
//! with the command's exit status, or 125 if the lab itself failed.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use cela_lab::{Lab, LabRun, Scenario};
use clap::Parser;

/// Run COMMAND in the nested lab: an L1 Linux guest under QEMU TCG with a real /dev/kvm.
#[derive(Parser, Debug)]
#[command(name = "cela-lab", version)]
struct Args {
    /// L1 memory in MiB.
    #[arg(long, default_value_t = 2048, value_name = "MiB")]
    mem: u32,
    /// L1 vCPUs.
    #[arg(long, default_value_t = 2, value_name = "N")]
    smp: u32,
    /// Copy a host file or directory into L1; DST defaults to /lab/<basename of SRC>.
    /// Dynamically linked programs bring their libraries.
    #[arg(long = "file", value_name = "SRC[:DST]")]
    files: Vec<String>,
    /// Seconds COMMAND may run inside L1; the whole run may take 300 s more (boot).
    #[arg(long, default_value_t = 600, value_name = "S")]
    timeout: u64,
    /// Copy the L1 console to stderr as it arrives.
    #[arg(long)]
    console: bool,
    /// The shell command to run in L1 (words are joined with spaces and run by `sh`, cwd /lab).
    #[arg(last = true, required = true, value_name = "COMMAND")]
    command: Vec<String>,
}

/// Exit status when the lab could not produce a result.
const LAB_FAILED: u8 = 125;

/// Seconds the whole run may take beyond the command's timeout: the L1 boot and power-off.
const BOOT_ALLOWANCE: u64 = 300;

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cela-lab: {e:#}");
            ExitCode::from(LAB_FAILED)
        }
    }
}

fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let mut run = LabRun {
        mem_mib: args.mem,
        smp: args.smp,
        timeout: Duration::from_secs(args.timeout + BOOT_ALLOWANCE),
        ..LabRun::default()
    };
    run.echo_console |= args.console;
    for spec in &args.files {
        run.files.push(file_spec(spec)?);
    }
    run.scenarios.push(
        Scenario::new("command", args.command.join(" "))
            .with_timeout(Duration::from_secs(args.timeout)),
    );

    let lab = Lab::new().context("setting up the lab")?;
    let report = lab.run(&run)?;
    let result = report.get("command");

    let mut stdout = std::io::stdout().lock();
    let mut stderr = std::io::stderr().lock();
    stderr.write_all(&result.stderr)?;
    stderr.flush()?;
    stdout.write_all(&result.stdout)?;
    if !result.stdout.is_empty() && !result.stdout.ends_with(b"\n") {
        writeln!(stdout)?;
    }
    if result.timed_out {
        writeln!(
            stderr,
            "cela-lab: the command timed out after {} s",
            args.timeout
        )?;
    }
    writeln!(stdout, "LAB-RC {}", result.rc)?;
    writeln!(stdout, "LAB-L1-SECONDS {:.2}", result.l1_seconds)?;
    writeln!(
        stdout,
        "LAB-L1-READY-SECONDS {:.2}",
        report.l1_ready_seconds
    )?;
    writeln!(stdout, "LAB-WALL-SECONDS {:.2}", report.wall.as_secs_f64())?;
    stdout.flush()?;
    Ok(ExitCode::from(
        u8::try_from(result.rc).unwrap_or(LAB_FAILED),
    ))
}

/// `SRC[:DST]` → (SRC, DST), DST defaulting to `/lab/<basename of SRC>`.
fn file_spec(spec: &str) -> anyhow::Result<(PathBuf, String)> {
    let (src, dest) = match spec.split_once(':') {
        Some((src, dest)) => (PathBuf::from(src), dest.to_owned()),
        None => {
            let src = PathBuf::from(spec);
            let base = src
                .file_name()
                .with_context(|| format!("--file {spec}: no file name to default DST to"))?
                .to_string_lossy()
                .into_owned();
            (src, format!("/lab/{base}"))
        }
    };
    Ok((src, dest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_spec_defaults_to_lab() {
        assert_eq!(
            file_spec("target/release/cela").unwrap(),
            (PathBuf::from("target/release/cela"), "/lab/cela".to_owned())
        );
        assert_eq!(
            file_spec("/usr/share/qemu:/usr/share/qemu").unwrap(),
            (
                PathBuf::from("/usr/share/qemu"),
                "/usr/share/qemu".to_owned()
            )
        );
        assert!(file_spec("/").is_err());
    }

    #[test]
    fn command_words_follow_the_double_dash() {
        let a = Args::try_parse_from(["cela-lab", "--file", "x", "--", "ls", "-l", "/dev/kvm"])
            .unwrap();
        assert_eq!(a.command.join(" "), "ls -l /dev/kvm");
        assert_eq!((a.mem, a.smp, a.timeout), (2048, 2, 600));
        assert!(Args::try_parse_from(["cela-lab"]).is_err());
    }
}
