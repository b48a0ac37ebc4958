//! Validation of a [`MachineConfig`]: everything that can be checked before any resource is
//! created, each failure with a message naming the value and the limit.

use std::path::Path;

use crate::arch::x86_64::boot::{BootError, read_setup_header};
use crate::machine::MachineConfig;

/// The most vCPUs cela's machine describes: APIC IDs and MADT processor UIDs are 8-bit, and
/// 0xff is the broadcast ID.
pub const MAX_VCPUS: u32 = 254;
/// The least memory a cela guest can boot in: a Debian kernel with its initramfs needs this.
pub const MIN_MEMORY_MIB: u64 = 64;

/// What is wrong with a machine configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--cpus must be at least 1")]
    NoVcpus,
    #[error("--cpus {asked} is more than {limit}, the most {by} allows")]
    TooManyVcpus {
        asked: u32,
        limit: u32,
        by: &'static str,
    },
    #[error("--memory {asked} MiB is too small: a guest needs at least {MIN_MEMORY_MIB} MiB")]
    TooLittleMemory { asked: u64 },
    #[error("--memory {asked} MiB is more than this host has ({host} MiB of RAM)")]
    TooMuchMemory { asked: u64, host: u64 },
    #[error("kernel {0} does not exist")]
    KernelMissing(String),
    #[error("initramfs {0} does not exist")]
    InitrdMissing(String),
    #[error("{what} {path} is not a regular file")]
    NotAFile { what: &'static str, path: String },
    #[error(transparent)]
    Kernel(#[from] BootError),
}

/// Total RAM of the host in MiB, from /proc/meminfo.
pub fn host_memory_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

fn check_file(
    what: &'static str,
    path: &Path,
    missing: fn(String) -> ConfigError,
) -> Result<(), ConfigError> {
    let shown = path.display().to_string();
    match std::fs::metadata(path) {
        Err(_) => Err(missing(shown)),
        Ok(m) if !m.is_file() => Err(ConfigError::NotAFile { what, path: shown }),
        Ok(_) => Ok(()),
    }
}

/// Checks what any engine needs: vCPU and memory bounds, and that the kernel is a bzImage and
/// the initramfs exists.
pub fn validate(config: &MachineConfig) -> Result<(), ConfigError> {
    if config.vcpus == 0 {
        return Err(ConfigError::NoVcpus);
    }
    if config.vcpus > MAX_VCPUS {
        return Err(ConfigError::TooManyVcpus {
            asked: config.vcpus,
            limit: MAX_VCPUS,
            by: "cela's machine model",
        });
    }
    if config.memory_mib < MIN_MEMORY_MIB {
        return Err(ConfigError::TooLittleMemory {
            asked: config.memory_mib,
        });
    }
    if let Some(host) = host_memory_mib()
        && config.memory_mib > host
    {
        return Err(ConfigError::TooMuchMemory {
            asked: config.memory_mib,
            host,
        });
    }
    check_file("kernel", &config.kernel, ConfigError::KernelMissing)?;
    read_setup_header(&config.kernel)?;
    if let Some(initrd) = &config.initrd {
        check_file("initramfs", initrd, ConfigError::InitrdMissing)?;
    }
    Ok(())
}

/// Checks the limits KVM itself sets on this host.
pub fn validate_for_kvm(config: &MachineConfig, kvm_max_vcpus: usize) -> Result<(), ConfigError> {
    let limit = u32::try_from(kvm_max_vcpus).unwrap_or(u32::MAX);
    if config.vcpus > limit {
        return Err(ConfigError::TooManyVcpus {
            asked: config.vcpus,
            limit,
            by: "KVM on this host",
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn config(kernel: PathBuf) -> MachineConfig {
        MachineConfig {
            vcpus: 1,
            memory_mib: 256,
            kernel,
            initrd: None,
            cmdline: String::new(),
        }
    }

    #[test]
    fn vcpu_and_memory_bounds() {
        let k = crate::arch::x86_64::boot::tests_support::fake_bzimage();
        let mut c = config(k.path().to_owned());
        assert!(validate(&c).is_ok());
        c.vcpus = 0;
        assert_eq!(
            validate(&c).unwrap_err().to_string(),
            "--cpus must be at least 1"
        );
        c.vcpus = 300;
        assert!(
            validate(&c)
                .unwrap_err()
                .to_string()
                .contains("more than 254")
        );
        c.vcpus = 4;
        assert!(
            validate_for_kvm(&c, 2)
                .unwrap_err()
                .to_string()
                .contains("KVM on this host")
        );
        c.memory_mib = 16;
        assert!(
            validate(&c)
                .unwrap_err()
                .to_string()
                .contains("at least 64 MiB")
        );
        c.memory_mib = 1 << 40;
        assert!(
            validate(&c)
                .unwrap_err()
                .to_string()
                .contains("more than this host has")
        );
    }

    #[test]
    fn missing_or_bad_files_are_named() {
        let mut c = config("/nope/vmlinuz".into());
        assert_eq!(
            validate(&c).unwrap_err().to_string(),
            "kernel /nope/vmlinuz does not exist"
        );
        c.kernel = "/".into();
        assert!(
            validate(&c)
                .unwrap_err()
                .to_string()
                .contains("not a regular file")
        );
        let not_kernel = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(not_kernel.path(), vec![0u8; 4096]).unwrap();
        c.kernel = not_kernel.path().to_owned();
        assert!(
            validate(&c)
                .unwrap_err()
                .to_string()
                .contains("not a bzImage")
        );
        let k = crate::arch::x86_64::boot::tests_support::fake_bzimage();
        c.kernel = k.path().to_owned();
        c.initrd = Some("/nope/initrd".into());
        assert_eq!(
            validate(&c).unwrap_err().to_string(),
            "initramfs /nope/initrd does not exist"
        );
    }
}
