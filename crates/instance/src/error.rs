//! Errors of instance operations: each names the instance or file and what went wrong.

/// What went wrong with an instance operation.
#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error("no such instance: {0}")]
    NotFound(String),
    #[error(
        "an instance named {0} exists already (remove it with `cela rm {0}`, or choose another --name)"
    )]
    NameTaken(String),
    #[error(
        "{0:?} is not a valid instance name: use 1-64 of a-z A-Z 0-9 _ . - , starting with a letter or digit"
    )]
    BadName(String),
    #[error("instance {name} is {status}: {hint}")]
    WrongState {
        name: String,
        status: String,
        hint: &'static str,
    },
    #[error("{0}")]
    Unsupported(String),
    /// A request that cannot be carried out as asked (a relative working directory, an
    /// environment entry without `=`, …).
    #[error("{0}")]
    Invalid(String),
    #[error("no image {0} in the store (cela pull or cela image import it first)")]
    NoImage(String),
    #[error("no image {image} in the store, and pulling it failed: {why}")]
    NotPulled { image: String, why: String },
    #[error("instance {name} did not start: {why}")]
    NotStarted { name: String, why: String },
    /// An image that instances use; a forced removal only untags it.
    #[error(
        "image {image} is used by instance{} {}: remove {} first (a forced removal only takes its names off and keeps it for them)",
        if users.len() == 1 { "" } else { "s" },
        users.join(", "),
        if users.len() == 1 { "it" } else { "them" }
    )]
    ImageInUse { image: String, users: Vec<String> },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {why}")]
    Corrupt { what: String, why: String },
    #[error(transparent)]
    Image(#[from] cela_image::ImageError),
    #[error(transparent)]
    Runtime(#[from] cela_runtime::Error),
    #[error("preparing the default guest kernel and initramfs: {0}")]
    Assets(#[from] cela_assets::AssetError),
    #[error(transparent)]
    Vmm(#[from] cela_vmm::VmmError),
    #[error(transparent)]
    Qemu(#[from] cela_vmm::qemu::QemuError),
    #[error("{0}")]
    Other(String),
}

/// Attaches "what was being done" to an I/O error.
pub(crate) trait IoContext<T> {
    fn doing(self, what: impl FnOnce() -> String) -> Result<T, InstanceError>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn doing(self, what: impl FnOnce() -> String) -> Result<T, InstanceError> {
        self.map_err(|source| InstanceError::Io {
            what: what(),
            source,
        })
    }
}
