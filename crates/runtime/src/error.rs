//! The runtime's typed errors: each says what failed and with what input, in one line.

use std::path::{Path, PathBuf};

use libcontainer::container::ContainerStatus;

/// Everything a runtime operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `config.json` does not match the OCI schema or breaks a rule the runtime needs.
    #[error("{}field `{field}`: {message}", file.as_ref().map(|f| format!("{}: ", f.display())).unwrap_or_default())]
    InvalidConfig {
        /// The file, once known.
        file: Option<PathBuf>,
        /// Path of the field inside the document, e.g. `process.args`.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// The bundle's root filesystem is not a directory.
    #[error(
        "root filesystem {0} does not exist or is not a directory (config.json field `root.path`)"
    )]
    MissingRootfs(PathBuf),
    /// A container with this id exists already.
    #[error("container {0} already exists")]
    Exists(String),
    /// No container with this id.
    #[error("container {0} does not exist")]
    NotFound(String),
    /// The id would escape the state directory or is empty.
    #[error(
        "invalid container id {0:?}: use letters, digits, '_', '-', '.' and '+' only, not starting with '.'"
    )]
    InvalidId(String),
    /// The operation needs another state.
    #[error("cannot {op} container {id}: it is {status}{hint}")]
    WrongState {
        /// The operation, e.g. `start`.
        op: &'static str,
        /// The container.
        id: String,
        /// Its state, lowercase as in the OCI spec.
        status: &'static str,
        /// What to do about it, if anything.
        hint: &'static str,
    },
    /// Another cela-runc held the state root's lock for too long.
    #[error(
        "gave up after {} s waiting for {}: another cela-runc holds it (/proc/locks names its pid)",
        waited.as_secs(),
        path.display()
    )]
    Locked {
        /// The lock file.
        path: PathBuf,
        /// How long this process waited.
        waited: std::time::Duration,
    },
    /// A signal name or number that Linux does not have.
    #[error("unknown signal {0:?}: use a name (KILL, SIGTERM) or a number from 1 to 31")]
    UnknownSignal(String),
    /// A ps or update option that is not understood.
    #[error("{0}")]
    Usage(String),
    /// A file operation of the runtime itself.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, with the path.
        what: String,
        /// The system error.
        source: std::io::Error,
    },
    /// A process could not be started in a running container.
    #[error("exec in container {id}: {message}")]
    Exec {
        /// The container.
        id: String,
        /// What failed.
        message: String,
        /// The status a shell would give: 127 not found, 126 not executable, 1 otherwise.
        status: u8,
    },
    /// A cgroup operation.
    #[error("cgroup: {0}")]
    Cgroup(String),
    /// An error from youki's libcontainer, with its cause chain in the message (and no
    /// `source`, so a printer of the chain does not repeat it), and the cause libcontainer
    /// logged in the process that met it, where [`crate::cause`] caught one.
    #[error("{}", crate::cause::with_cause(chain(.0), .1.clone()))]
    Container(Box<libcontainer::error::LibcontainerError>, Option<String>),
}

impl From<libcontainer::error::LibcontainerError> for Error {
    fn from(e: libcontainer::error::LibcontainerError) -> Self {
        Error::Container(Box::new(e), None)
    }
}

impl Error {
    /// A config error in `field`.
    pub fn invalid(field: &str, message: &str) -> Self {
        Error::InvalidConfig {
            file: None,
            field: field.to_owned(),
            message: message.to_owned(),
        }
    }

    /// Adds the file name to a config error.
    pub fn in_file(self, path: &Path) -> Self {
        match self {
            Error::InvalidConfig { field, message, .. } => Error::InvalidConfig {
                file: Some(path.to_owned()),
                field,
                message,
            },
            other => other,
        }
    }
}

/// Lowercase OCI name of a libcontainer status.
pub fn status_name(s: ContainerStatus) -> &'static str {
    match s {
        ContainerStatus::Creating => "creating",
        ContainerStatus::Created => "created",
        ContainerStatus::Running => "running",
        ContainerStatus::Stopped => "stopped",
        ContainerStatus::Paused => "paused",
    }
}

fn chain(e: &libcontainer::error::LibcontainerError) -> String {
    let e: &dyn std::error::Error = e;
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if t.contains(&s) {
            s = t;
        } else if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}
