//! Direct KVM tests: tiny 64-bit guests, assembled by hand below, run on this host's /dev/kvm
//! under cela's monitor (bare machine: no in-kernel irqchip, so HLT ends a vCPU). They check
//! that port I/O and MMIO exits reach the right device, that HLT and the i8042 reset end the
//! VM, and that several vCPUs run with the CPUID cela gives them.
//!
//! These tests need /dev/kvm and fail (never skip) without it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cela_vmm::builder::{SerialSinks, boot_bare};
use cela_vmm::devices::bus::{BusDevice, Placement};
use cela_vmm::devices::legacy::serial::SharedBuffer;
use cela_vmm::machine::GuestExit;
use cela_vmm::stop::{StopReason, StopSignal};

const ENTRY: u64 = 0x10000;
const LIMIT: Option<Duration> = Some(Duration::from_secs(30));

fn require_kvm() {
    if let Err(e) = cela_vmm::vstate::vm::open_kvm() {
        panic!("these tests run tiny guests on /dev/kvm, which is unusable here: {e}");
    }
}

struct Run {
    reason: StopReason,
    console: Vec<u8>,
}

fn run(code: &[u8], vcpus: u32, mmio: Vec<Placement>) -> Run {
    require_kvm();
    let console = SharedBuffer::default();
    let sinks = SerialSinks {
        console: Box::new(console.clone()),
        control: Box::new(std::io::sink()),
    };
    let stop = Arc::new(StopSignal::new());
    // Every tiny guest runs under the monitor's filters, as real machines do.
    let filters = cela_vmm::seccomp::Filters::new().expect("the filters build");
    let mut machine = boot_bare(code, ENTRY, vcpus, mmio, sinks, stop, Some(filters))
        .expect("the bare machine builds");
    let reason = machine.wait(LIMIT);
    let console = console.0.lock().unwrap().clone();
    Run { reason, console }
}

// mov dx, 0x3f8
const MOV_DX_COM1: [u8; 4] = [0x66, 0xba, 0xf8, 0x03];
const OUT_DX_AL: u8 = 0xee;
const HLT: u8 = 0xf4;

#[test]
fn serial_output_reaches_the_host_and_hlt_ends_the_vm() {
    let mut code = MOV_DX_COM1.to_vec();
    for b in b"OK\n" {
        code.extend_from_slice(&[0xb0, *b, OUT_DX_AL]); // mov al, b; out dx, al
    }
    code.push(HLT);
    let r = run(&code, 1, vec![]);
    assert_eq!(r.reason, StopReason::Halted);
    assert_eq!(r.console, b"OK\n");
}

#[test]
fn i8042_reset_ends_the_vm_as_a_reboot() {
    // mov al, 0xfe; out 0x64, al; hlt
    let code = [0xb0, 0xfe, 0xe6, 0x64, HLT];
    let r = run(&code, 1, vec![]);
    assert_eq!(r.reason, StopReason::Guest(GuestExit::Rebooted));
}

#[test]
fn acpi_sleep_control_register_powers_off() {
    // mov dx, 0x600; mov al, (5 << 2) | SLP_EN; out dx, al; hlt
    let code = [
        0x66,
        0xba,
        0x00,
        0x06,
        0xb0,
        (5 << 2) | 0x20,
        OUT_DX_AL,
        HLT,
    ];
    let r = run(&code, 1, vec![]);
    assert_eq!(r.reason, StopReason::Guest(GuestExit::PoweredOff));
}

#[test]
fn pvpanic_write_reports_a_panic() {
    // mov dx, 0x505; mov al, 1; out dx, al; hlt
    let code = [0x66, 0xba, 0x05, 0x05, 0xb0, 0x01, OUT_DX_AL, HLT];
    let r = run(&code, 1, vec![]);
    assert_eq!(r.reason, StopReason::Guest(GuestExit::Panicked));
}

/// Records MMIO writes and answers reads with 'Z'.
#[derive(Default)]
struct MmioProbe {
    writes: Vec<(u64, Vec<u8>)>,
}

impl BusDevice for MmioProbe {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(b'Z');
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.writes.push((offset, data.to_vec()));
    }
}

#[test]
fn mmio_exits_reach_the_device_at_that_address() {
    const BASE: u64 = 0x2000_0000; // identity-mapped, beyond the 16 MiB of RAM
    let probe = Arc::new(Mutex::new(MmioProbe::default()));
    let mut code = vec![
        0xb8, 0x08, 0x00, 0x00, 0x20, // mov eax, BASE + 8
        0xc7, 0x00, 0x78, 0x56, 0x34, 0x12, // mov dword [rax], 0x12345678
        0x8b, 0x18, // mov ebx, [rax]
    ];
    code.extend_from_slice(&MOV_DX_COM1);
    code.extend_from_slice(&[0x88, 0xd8, OUT_DX_AL, HLT]); // mov al, bl; out dx, al; hlt
    let dev: Arc<Mutex<dyn BusDevice>> = probe.clone();
    let r = run(&code, 1, vec![(dev, BASE, 0x1000)]);
    assert_eq!(r.reason, StopReason::Halted);
    assert_eq!(r.console, b"Z");
    assert_eq!(
        probe.lock().unwrap().writes,
        vec![(8, vec![0x78, 0x56, 0x34, 0x12])]
    );
}

#[test]
fn several_vcpus_run_and_see_their_own_apic_id() {
    let mut code = vec![
        0xb8, 0x01, 0x00, 0x00, 0x00, // mov eax, 1
        0x0f, 0xa2, // cpuid
        0xc1, 0xeb, 0x18, // shr ebx, 24   (initial APIC ID)
        0x89, 0xd8, // mov eax, ebx
        0x04, b'0', // add al, '0'
    ];
    code.extend_from_slice(&MOV_DX_COM1);
    code.extend_from_slice(&[OUT_DX_AL, HLT]);
    let r = run(&code, 3, vec![]);
    assert_eq!(r.reason, StopReason::Halted, "all three vCPUs halt");
    let mut ids = r.console.clone();
    ids.sort_unstable();
    assert_eq!(ids, b"012");
}

#[test]
fn a_triple_fault_ends_the_vm_as_a_failure_not_a_reboot() {
    // ud2 with an empty IDT: #UD → #DF → triple fault → KVM_EXIT_SHUTDOWN.
    let r = run(&[0x0f, 0x0b], 1, vec![]);
    assert_eq!(r.reason, StopReason::Guest(GuestExit::TripleFault));
}

#[test]
fn an_instruction_kvm_cannot_emulate_is_a_fault_naming_the_exit() {
    let code = [
        0x0f, 0x20, 0xe0, // mov rax, cr4
        0x0d, 0x00, 0x06, 0x00, 0x00, // or eax, OSFXSR | OSXMMEXCPT (enable SSE)
        0x0f, 0x22, 0xe0, // mov cr4, rax
        0xb8, 0x00, 0x00, 0x00, 0x20, // mov eax, 0x20000000 (MMIO: no RAM there)
        0x66, 0x0f, 0x38, 0xdc, 0x00, // aesenc xmm0, [rax]: KVM's emulator has no AES-NI
        HLT,
    ];
    let r = run(&code, 1, vec![]);
    match r.reason {
        StopReason::Fault(text) => {
            assert!(
                text.contains("KVM internal error (suberror 1: emulation failure)"),
                "{text}"
            );
            assert!(text.contains("guest RIP 0x10010"), "{text}");
        }
        other => panic!("expected a KVM internal error, got {other:?}"),
    }
}
