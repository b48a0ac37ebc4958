//! Boots a tiny guest on cela's monitor and exits: the subject of `scripts/bench/tiny-boot`,
//! which times process start → first serial byte → exit against QEMU on the same code.
//!
//! The guest writes "X\n" to COM1, then powers off through the ACPI sleep-control register.
//! With a path argument, the guest code is read from that file instead. The monitor runs
//! jailed under its seccomp filters, as in cela; `--no-confine` (first) runs it in this process
//! without either, to measure what confinement costs.

use std::sync::Arc;

use cela_vmm::builder::{SerialSinks, boot_bare};
use cela_vmm::console::HostStdout;
use cela_vmm::machine::GuestExit;
use cela_vmm::stop::{StopReason, StopSignal};

/// mov dx, 0x3f8; mov al, 'X'; out dx, al; mov al, '\n'; out dx, al;
/// mov dx, 0x600; mov al, S5|SLP_EN; out dx, al; hlt
const CODE: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, 0xb0, b'X', 0xee, 0xb0, b'\n', 0xee, 0x66, 0xba, 0x00, 0x06, 0xb0,
    0x34, 0xee, 0xf4,
];

fn main() -> std::process::ExitCode {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let confine = args.first().is_none_or(|a| a != "--no-confine");
    if !confine {
        args.remove(0);
    }
    let code = match args.first() {
        Some(path) => std::fs::read(path).expect("read the guest code"),
        None => CODE.to_vec(),
    };
    if !confine {
        return boot(&code, None);
    }
    // As `cela run --vm` does: a jailed monitor process of its own (`cela_vmm::jail`).
    let config = cela_vmm::jail::JailConfig::monitor(1, 16);
    let result = cela_vmm::jail::run(&config, |jail| {
        let filters = cela_vmm::seccomp::Filters::new()
            .map_err(|e| e.to_string())?
            .with_jail(jail);
        Ok(boot(&code, Some(filters)) == std::process::ExitCode::SUCCESS)
    });
    match result {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("tiny_vm: {e}");
            std::process::ExitCode::from(125)
        }
    }
}

fn boot(code: &[u8], filters: Option<cela_vmm::seccomp::Filters>) -> std::process::ExitCode {
    let sinks = SerialSinks {
        console: Box::new(HostStdout),
        control: Box::new(std::io::sink()),
    };
    let stop = Arc::new(StopSignal::new());
    let mut machine = match boot_bare(code, 0x10000, 1, vec![], sinks, stop, filters) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("tiny_vm: {e}");
            return std::process::ExitCode::from(125);
        }
    };
    match machine.wait(None) {
        StopReason::Guest(GuestExit::PoweredOff) => std::process::ExitCode::SUCCESS,
        other => {
            eprintln!("tiny_vm: unexpected end: {other:?}");
            std::process::ExitCode::FAILURE
        }
    }
}
