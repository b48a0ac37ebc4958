//! Choosing how to run a microVM on this host: cela's own monitor on KVM when KVM can boot a
//! stock kernel, otherwise QEMU's TCG emulator. Measured on PVM hosts (`kvm_pvm`, KVM done in
//! software with no vmx/svm CPU flag): KVM ioctls work and tiny guests run, but a stock
//! kernel's ring-0 code goes through KVM's instruction emulator and dies with an emulation
//! failure, so such a KVM counts as unusable for Linux guests.

use std::path::Path;

/// Which engine runs the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// cela's own monitor on /dev/kvm.
    Kvm,
    /// QEMU with the TCG emulator (slow, but needs no virtualization support).
    Qemu,
}

impl std::fmt::Display for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Engine::Kvm => "kvm",
            Engine::Qemu => "qemu",
        })
    }
}

/// Why KVM on this host cannot boot a stock Linux kernel, or `Ok` if it can.
pub fn kvm_can_boot_linux() -> Result<(), String> {
    crate::vstate::vm::open_kvm().map_err(|e| e.to_string())?;
    if Path::new("/sys/module/kvm_pvm").exists() {
        return Err(
            "/dev/kvm is PVM (kvm_pvm, KVM in software), which cannot run a stock kernel".into(),
        );
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if !hw {
        return Err("the CPU has no hardware virtualization (no vmx or svm flag), so /dev/kvm cannot run a stock kernel".into());
    }
    Ok(())
}

/// Picks an engine: `forced` if given (an error if it is unusable), otherwise KVM when it can
/// boot Linux and QEMU when not. The second value is a note for the user when falling back.
pub fn choose(forced: Option<Engine>) -> Result<(Engine, Option<String>), String> {
    match forced {
        Some(Engine::Kvm) => kvm_can_boot_linux()
            .map(|_| (Engine::Kvm, None))
            .map_err(|why| format!("--engine kvm: {why}")),
        Some(Engine::Qemu) => crate::qemu::available()
            .map(|_| (Engine::Qemu, None))
            .map_err(|e| format!("--engine qemu: {e}")),
        None => match kvm_can_boot_linux() {
            Ok(()) => Ok((Engine::Kvm, None)),
            Err(why) => {
                crate::qemu::available()
                    .map_err(|e| format!("{why}, and the QEMU fallback is unavailable: {e}"))?;
                Ok((
                    Engine::Qemu,
                    Some(format!(
                        "{why}; running the VM under QEMU's TCG emulator instead (slow)"
                    )),
                ))
            }
        },
    }
}
