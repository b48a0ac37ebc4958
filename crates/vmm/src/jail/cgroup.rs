//! A jailed monitor's cgroup, `/cela-monitors/<id>` (cgroup v2, or each v1 controller's
//! hierarchy on a v1 or hybrid host; libcgroups chooses), sized from the VM:
//!
//! | limit | value |
//! |---|---|
//! | memory | guest RAM + [`super::MEMORY_OVERHEAD_MIB`] (QEMU: + [`crate::qemu::MEMORY_OVERHEAD_MIB`]) |
//! | CPU | vCPUs + 1 (the device thread), as a CFS quota |
//! | tasks | vCPUs + 64 (device, console and guest-output threads; QEMU: + 128) |
//! | devices | /dev/kvm and /dev/null only |
//!
//! A guest cannot make its monitor take more of the host than that, whatever it makes the
//! devices do. The reaper is put in it before the monitor is forked, so every byte the
//! monitor allocates is charged here; the cgroup is removed once both have ended.

use libcgroups::common::{
    AnyCgroupManager, CgroupConfig, CgroupManager, ControllerOpt, CreateCgroupSetupError,
    create_cgroup_manager,
};
use nix::unistd::Pid;
use oci_spec::runtime::{
    LinuxCpuBuilder, LinuxDeviceCgroup, LinuxDeviceCgroupBuilder, LinuxDeviceType,
    LinuxMemoryBuilder, LinuxPidsBuilder, LinuxResources, LinuxResourcesBuilder,
};

use super::JailError;

/// CFS period of the CPU quota, in microseconds.
const CPU_PERIOD_US: u64 = 100_000;

/// The cgroup, removed when dropped.
pub struct MonitorCgroup {
    manager: AnyCgroupManager,
    resources: LinuxResources,
}

/// The cgroup path of the monitor with id `id`.
pub fn path(id: u32) -> std::path::PathBuf {
    format!("/cela-monitors/{id}").into()
}

impl MonitorCgroup {
    /// The cgroup of monitor `id`, made (and limited) when the first process is added;
    /// `None` on a host with no cgroup file system mounted at all (then the monitor runs
    /// without these limits, and a warning says so).
    pub fn create(
        id: u32,
        cpus: u64,
        memory: u64,
        tasks: u64,
    ) -> Result<Option<MonitorCgroup>, JailError> {
        let err = |e: &dyn std::fmt::Display| JailError::Cgroup(e.to_string());
        let manager = match create_cgroup_manager(CgroupConfig {
            cgroup_path: path(id),
            systemd_cgroup: false,
            container_name: format!("cela-monitor-{id}"),
        }) {
            Ok(m) => m,
            Err(CreateCgroupSetupError::FailedToDetect) => {
                tracing::warn!(
                    "no cgroup file system is mounted: the monitor runs without memory, CPU and task limits"
                );
                return Ok(None);
            }
            Err(e) => return Err(err(&e)),
        };
        let resources = LinuxResourcesBuilder::default()
            .memory(
                LinuxMemoryBuilder::default()
                    .limit(memory as i64)
                    .build()
                    .map_err(|e| err(&e))?,
            )
            .cpu(
                LinuxCpuBuilder::default()
                    .quota((cpus * CPU_PERIOD_US) as i64)
                    .period(CPU_PERIOD_US)
                    .build()
                    .map_err(|e| err(&e))?,
            )
            .devices(monitor_devices().map_err(|e| err(&e))?)
            .pids(
                LinuxPidsBuilder::default()
                    .limit(tasks as i64)
                    .build()
                    .map_err(|e| err(&e))?,
            )
            .build()
            .map_err(|e| err(&e))?;
        // A cgroup of this id left by a caller that was killed: nothing runs in it any more
        // (its lease was free), so it goes.
        let _ = manager.remove();
        Ok(Some(MonitorCgroup { manager, resources }))
    }

    /// Moves process `pid` (the monitor) into the cgroup (libcgroups makes it then, in every
    /// v1 hierarchy), and sets the limits.
    pub fn add(&self, pid: Pid) -> Result<(), JailError> {
        self.manager
            .add_task(nix_lc::unistd::Pid::from_raw(pid.as_raw()))
            .map_err(|e| JailError::Cgroup(format!("adding the monitor: {e}")))?;
        self.manager
            .apply(&ControllerOpt {
                resources: &self.resources,
                disable_oom_killer: false,
                oom_score_adj: None,
                freezer_state: None,
            })
            .map_err(|e| JailError::Cgroup(format!("setting the limits: {e}")))
    }
}

/// The device rules: none but /dev/kvm (character 10:232), the one device node the monitor
/// opens (disks are regular files; the TAP is opened by the caller), and /dev/null (1:3, a
/// QEMU's stdin and stdout). A v2 host enforces them with an eBPF program, which denies
/// everything the list does not allow.
fn monitor_devices() -> Result<Vec<LinuxDeviceCgroup>, oci_spec::OciSpecError> {
    Ok(vec![
        LinuxDeviceCgroupBuilder::default()
            .allow(false)
            .typ(LinuxDeviceType::A)
            .access("rwm")
            .build()?,
        LinuxDeviceCgroupBuilder::default()
            .allow(true)
            .typ(LinuxDeviceType::C)
            .major(10)
            .minor(232)
            .access("rw")
            .build()?,
        LinuxDeviceCgroupBuilder::default()
            .allow(true)
            .typ(LinuxDeviceType::C)
            .major(1)
            .minor(3)
            .access("rw")
            .build()?,
    ])
}

impl Drop for MonitorCgroup {
    fn drop(&mut self) {
        if let Err(e) = self.manager.remove() {
            tracing::warn!("removing the monitor's cgroup: {e}");
        }
    }
}
