//! Saving and restoring a vCPU and its VM (`cela_vmm::persist`) on this host's /dev/kvm, with a
//! tiny real-mode guest that counts in memory and reports each count with an OUT. Its state
//! is taken between two OUTs and written as JSON, its memory to a file; new VMs whose memory
//! maps that file privately are restored from it and count on from where it was, each on
//! its own, and the file keeps the count it was saved with. Both without and with an
//! in-kernel irqchip (the PICs, IOAPIC, PIT and local APIC saved too).
//!
//! These tests need /dev/kvm and fail (never skip) without it.

use std::fs::File;
use std::io::Write as _;

use cela_vmm::persist::vcpu::{VcpuState, complete_pending_io, msrs_to_save};
use cela_vmm::persist::vm::VmState;
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::mmap::MmapRegion;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

const MEM: usize = 0x10000;
const ENTRY: u64 = 0x1000;
const COUNTER: u64 = 0x500;
const PORT: u16 = 0x10;

/// loop: inc word [0x500]; mov ax, [0x500]; mov dx, 0x10; out dx, ax; jmp loop
const CODE: [u8; 13] = [
    0xff, 0x06, 0x00, 0x05, 0xa1, 0x00, 0x05, 0xba, 0x10, 0x00, 0xef, 0xeb, 0xf3,
];

fn kvm() -> Kvm {
    Kvm::new().unwrap_or_else(|e| {
        panic!("these tests run tiny guests on /dev/kvm, which is unusable here: {e}")
    })
}

/// A VM with one vCPU over `memory` (at guest address 0).
fn machine(kvm: &Kvm, memory: &GuestMemoryMmap, irqchip: bool) -> (VmFd, VcpuFd) {
    let vm = kvm.create_vm().unwrap();
    let region = memory.iter().next().unwrap();
    let host = region
        .get_host_address(vm_memory::MemoryRegionAddress(0))
        .unwrap();
    let slot = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: MEM as u64,
        userspace_addr: host as u64,
        flags: 0,
    };
    // SAFETY: the region is `memory`'s mapping, which every caller keeps alive for as long
    // as the VM runs.
    unsafe { vm.set_user_memory_region(slot) }.unwrap();
    if irqchip {
        vm.set_tss_address(0xfffb_d000).unwrap();
        vm.create_irq_chip().unwrap();
        vm.create_pit2(kvm_pit_config::default()).unwrap();
    }
    let vcpu = vm.create_vcpu(0).unwrap();
    (vm, vcpu)
}

/// Real mode at ENTRY.
fn boot(vcpu: &VcpuFd) {
    let mut sregs = vcpu.get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    sregs.ds.base = 0;
    sregs.ds.selector = 0;
    vcpu.set_sregs(&sregs).unwrap();
    let mut regs = vcpu.get_regs().unwrap();
    regs.rip = ENTRY;
    regs.rflags = 2;
    vcpu.set_regs(&regs).unwrap();
}

/// Runs until the guest's next count.
fn next_count(vcpu: &mut VcpuFd) -> u16 {
    loop {
        match vcpu.run().unwrap() {
            VcpuExit::IoOut(PORT, data) => return u16::from_le_bytes([data[0], data[1]]),
            VcpuExit::IoOut(..) | VcpuExit::IoIn(..) => {}
            other => panic!("the guest stopped counting: {other:?}"),
        }
    }
}

/// A private (copy-on-write) mapping of `file` as guest memory.
fn memory_from(file: &File) -> GuestMemoryMmap {
    let region = MmapRegion::build(
        Some(FileOffset::new(file.try_clone().unwrap(), 0)),
        MEM,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_PRIVATE | libc::MAP_NORESERVE,
    )
    .unwrap();
    GuestMemoryMmap::from_regions(vec![GuestRegionMmap::new(region, GuestAddress(0)).unwrap()])
        .unwrap()
}

fn count_on_after_restore(irqchip: bool) {
    let kvm = kvm();
    let msrs = msrs_to_save(&kvm).unwrap();
    let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    memory.write_slice(&CODE, GuestAddress(ENTRY)).unwrap();
    let (vm, mut vcpu) = machine(&kvm, &memory, irqchip);
    boot(&vcpu);
    for want in 1..=100u16 {
        assert_eq!(next_count(&mut vcpu), want);
    }
    complete_pending_io(&mut vcpu).unwrap();
    let saved = VcpuState::save(&vcpu, &msrs, irqchip).unwrap();
    let vm_saved = VmState::save(&vm, irqchip).unwrap();
    assert_eq!(saved.lapic.is_some(), irqchip);
    // Through JSON, as a snapshot file carries it.
    let json = serde_json::to_vec(&(&saved, &vm_saved)).unwrap();
    let (saved, vm_saved): (VcpuState, VmState) = serde_json::from_slice(&json).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("memory");
    let mut image = vec![0u8; MEM];
    memory.read_slice(&mut image, GuestAddress(0)).unwrap();
    File::create(&path).unwrap().write_all(&image).unwrap();
    // The source runs on: the snapshot does not move with it.
    assert_eq!(next_count(&mut vcpu), 101);
    drop((vcpu, vm));

    let file = File::open(&path).unwrap();
    for _ in 0..2 {
        let memory = memory_from(&file);
        let (vm, mut vcpu) = machine(&kvm, &memory, irqchip);
        saved.restore(&vcpu).unwrap();
        vm_saved.restore(&vm).unwrap();
        vm_saved.restore_clock(&vm).unwrap();
        for want in 101..=150u16 {
            assert_eq!(next_count(&mut vcpu), want, "irqchip: {irqchip}");
        }
        let mut counter = [0u8; 2];
        memory
            .read_slice(&mut counter, GuestAddress(COUNTER))
            .unwrap();
        assert_eq!(u16::from_le_bytes(counter), 150);
    }
    let on_disk = std::fs::read(&path).unwrap();
    let at = COUNTER as usize;
    assert_eq!(
        u16::from_le_bytes([on_disk[at], on_disk[at + 1]]),
        100,
        "a restored guest writes to its own copy of the memory file"
    );
}

#[test]
fn a_counting_guest_counts_on_after_restore() {
    count_on_after_restore(false);
}

#[test]
fn a_counting_guest_with_an_irqchip_counts_on_after_restore() {
    count_on_after_restore(true);
}
