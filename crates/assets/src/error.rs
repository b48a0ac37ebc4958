//! The one error type of this crate. Every variant names what failed (a command, a path, a
//! package or a module) and, where there is one, what the user can do about it.

use std::io;
use std::path::PathBuf;

/// Why a guest asset could not be fetched or built.
#[derive(Debug, thiserror::Error)]
pub enum AssetError {
    /// A tool cela needs (apt-get, apt-cache, dpkg-deb, xz, …) is not installed.
    #[error("`{tool}` not found in PATH: {why}")]
    MissingTool { tool: String, why: &'static str },

    /// A command could not be started at all.
    #[error("could not run `{command}`: {source}")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },

    /// A command ran and failed.
    #[error("`{command}` failed ({status}): {stderr}; {hint}")]
    Command {
        command: String,
        status: String,
        stderr: String,
        hint: &'static str,
    },

    /// apt does not know a package cela needs.
    #[error(
        "apt knows no package {package} ({detail}); is apt configured for Debian? run apt-get update"
    )]
    NoPackage { package: String, detail: String },

    /// A package was fetched but does not look as expected.
    #[error("package {package}: {reason}")]
    BadPackage { package: String, reason: String },

    /// A file-system operation on a named path failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// A requested kernel module is neither a module file of the kernel nor built into it.
    #[error(
        "kernel module {name}{} is neither in {} nor built into the kernel",
        needed_by.as_ref().map(|n| format!(" (needed by {n})")).unwrap_or_default(),
        dir.display()
    )]
    ModuleNotFound {
        name: String,
        needed_by: Option<String>,
        dir: PathBuf,
    },

    /// A kernel module file could not be read as a module.
    #[error("kernel module {}: {reason}", path.display())]
    BadModule { path: PathBuf, reason: String },

    /// Module dependencies form a cycle (the kernel's build never produces one).
    #[error("kernel modules depend on each other in a cycle: {0}")]
    ModuleCycle(String),

    /// The guest init binary that goes into the initramfs is not where cela looks for it.
    #[error(
        "the guest init {} is missing: build it with `cargo build --release` (it is built with cela), or set CELA_INIT",
        path.display()
    )]
    MissingInit { path: PathBuf },

    /// The kernel image is not a bzImage.
    #[error("kernel image {} is not a bzImage ({reason})", path.display())]
    NotBzImage { path: PathBuf, reason: String },
}

/// Attaches an action and a path to an `io::Error`.
pub(crate) trait IoContext<T> {
    fn at(self, action: &'static str, path: impl Into<PathBuf>) -> Result<T, AssetError>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn at(self, action: &'static str, path: impl Into<PathBuf>) -> Result<T, AssetError> {
        self.map_err(|source| AssetError::Io {
            action,
            path: path.into(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_subject_and_the_remedy() {
        let e = AssetError::MissingTool {
            tool: "apt-get".into(),
            why: crate::cmd::APT_HINT,
        };
        assert!(e.to_string().contains("apt-get"));
        assert!(e.to_string().contains("--kernel and --initrd"));

        let e: Result<(), _> = Err(io::Error::from(io::ErrorKind::NotFound)).at("reading", "/x/y");
        let msg = e.unwrap_err().to_string();
        assert!(msg.starts_with("reading /x/y: "), "{msg}");

        let e = AssetError::ModuleNotFound {
            name: "net_failover".into(),
            needed_by: Some("virtio_net".into()),
            dir: "/m".into(),
        };
        assert_eq!(
            e.to_string(),
            "kernel module net_failover (needed by virtio_net) is neither in /m nor built into the kernel"
        );
    }
}
