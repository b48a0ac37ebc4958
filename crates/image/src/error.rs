//! The one error type of this crate. Every variant names what failed and with what input (a
//! reference, a path, a digest), so the CLI can print it as one line.

use std::io;
use std::path::PathBuf;

use crate::Digest;

/// Why an image operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// An image reference (`[registry/]repository[:tag][@digest]`) that does not parse.
    #[error("malformed image reference {input:?}: {why}")]
    BadReference { input: String, why: String },

    /// A digest that is not `sha256:` followed by 64 lowercase hex digits.
    #[error("malformed digest {input:?}: {why}")]
    BadDigest { input: String, why: String },

    /// Content whose sha256 is not the one it was announced with.
    #[error("digest mismatch for {what}: expected {expected}, got {actual}; nothing was stored")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },

    /// Content whose length is not the one it was announced with (truncated or padded).
    #[error(
        "size mismatch for {what}: expected {expected} bytes, got {actual}; nothing was stored"
    )]
    SizeMismatch {
        what: String,
        expected: u64,
        actual: u64,
    },

    /// Content that goes on past the length it was announced with; reading stopped there.
    #[error("{what} is longer than the {expected} bytes it was announced with; nothing was stored")]
    TooLong { what: String, expected: u64 },

    /// The registry could not be reached or answered with an error.
    #[error("registry {registry} {message}")]
    Registry { registry: String, message: String },

    /// No stored image matches a name or digest prefix.
    #[error("no such image: {0} (see `cela image ls`)")]
    UnknownImage(String),

    /// An image that instances are made from, asked to be removed without `force`.
    #[error(
        "image {image} ({digest}) is used by instances: remove them first (a forced removal only takes its names off and keeps it for them)"
    )]
    InUse { image: String, digest: Digest },

    /// Whether instances use an image cannot be told (a record cannot be read).
    #[error(
        "image {image}: cannot tell whether instances use it ({why}); remove or repair those instances first, or untag it with --force"
    )]
    InUseUnknown { image: String, why: String },

    /// A digest prefix that matches several stored images.
    #[error("digest prefix {prefix} matches {count} images; give more digits")]
    AmbiguousImage { prefix: String, count: usize },

    /// An archive or layout that is not what it claims to be, or is damaged.
    #[error("{}: {why}", path.display())]
    BadArchive { path: PathBuf, why: String },

    /// A layer entry that would write outside the root, or another hostile construction.
    #[error("layer {layer}: entry {entry:?}: {why}")]
    HostileEntry {
        layer: String,
        entry: String,
        why: String,
    },

    /// A manifest, index or config that cela cannot use.
    #[error("{what}: {why}")]
    BadManifest { what: String, why: String },

    /// A file-system operation on a named path failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// An image cannot be built as asked.
    #[error("cela image build: {0}")]
    Build(String),

    /// An external tool (mkfs.ext4, debootstrap, tar) failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Tool {
        command: String,
        status: String,
        stderr: String,
    },
}

/// Attaches an action and a path to an `io::Error`.
pub(crate) trait IoContext<T> {
    fn at(self, action: &'static str, path: impl Into<PathBuf>) -> Result<T, ImageError>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn at(self, action: &'static str, path: impl Into<PathBuf>) -> Result<T, ImageError> {
        self.map_err(|source| ImageError::Io {
            action,
            path: path.into(),
            source,
        })
    }
}

/// Shorthand for a [`ImageError::BadArchive`].
pub(crate) fn bad_archive(path: impl Into<PathBuf>, why: impl Into<String>) -> ImageError {
    ImageError::BadArchive {
        path: path.into(),
        why: why.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_input() {
        let e: Result<(), _> = Err(io::Error::from(io::ErrorKind::NotFound)).at("reading", "/x/y");
        assert!(e.unwrap_err().to_string().starts_with("reading /x/y: "));
        let e = ImageError::DigestMismatch {
            what: "layer 1 of busybox".into(),
            expected: "sha256:aa".into(),
            actual: "sha256:bb".into(),
        };
        let msg = e.to_string();
        assert!(
            msg.contains("layer 1 of busybox") && msg.contains("sha256:aa"),
            "{msg}"
        );
    }
}
