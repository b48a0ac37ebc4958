//! The content-addressed image store under cela's data directory.
//!
//! ```text
//! <data>/images/
//!   index.json              the image records (name/tag → manifest digest, its config and layers)
//!   blobs/sha256/<hex>      manifests, configs and layers, each stored once by its digest
//!   layers/<hex>/           a layer unpacked for OverlayFS (cache, keyed by the layer digest)
//!   ext4/<hex>.ext4         an image flattened into an ext4 disk (cache, keyed by image digest)
//!   tmp/                    work in progress (same file system, so a rename publishes it)
//!   gc.lock  index.lock     flock(2) locks shared by concurrent cela processes
//! ```
//!
//! Safety rules:
//! * A blob is written to a temporary file in `tmp/` while its sha256 and length are computed,
//!   and renamed into `blobs/` only if both match what it was announced with; a corrupt or
//!   truncated blob never appears in the store.
//! * `index.json` is rewritten whole (write, fsync, rename) under an exclusive `index.lock`.
//! * Everything that adds content (pull, import, unpack, ext4) holds `gc.lock` shared for its
//!   whole run; `remove` holds it exclusively, so garbage collection never deletes a blob that a
//!   running pull has stored but not yet recorded, and may clear `tmp/`.
//! * A pull or an import that fails takes out the blobs it stored that no record names
//!   ([`StoreLock::roll_back`], under `gc.lock` exclusively): it leaves the store as it was.
//! * Garbage collection keeps everything any record names, named or not: an image that
//!   instances use is never removed, only untagged when forced ([`Store::remove`]).

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tempfile::NamedTempFile;

use crate::digest::{Hasher, verify};
use crate::error::IoContext;
use crate::reference::familiar_name;
use crate::{Digest, ImageError, Reference};

/// One stored image: a manifest and what it refers to. Its JSON shape is what
/// `cela image ls --format json` prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ImageRecord {
    /// The manifest's digest: the image's identity.
    #[schema(value_type = String, example = "sha256:…")]
    pub digest: Digest,
    /// Full names (`registry/repository:tag`) pointing at this image; a name points at one
    /// image at a time.
    pub names: Vec<String>,
    /// The image config blob.
    #[schema(value_type = String)]
    pub config: Digest,
    /// The layers, bottom first.
    pub layers: Vec<LayerRecord>,
    /// Bytes of the layer blobs as stored.
    pub size: u64,
    /// When the image was built (its config's `created`), if it says.
    pub created: Option<String>,
    /// When it entered this store (RFC 3339).
    pub added: String,
    /// Where it came from: `pull REF` or `import PATH`.
    pub source: String,
}

/// One layer of an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LayerRecord {
    #[schema(value_type = String)]
    pub digest: Digest,
    pub size: u64,
    #[serde(rename = "mediaType")]
    pub media_type: String,
}

impl ImageRecord {
    /// Names for display (`busybox:latest`), or `<none>`.
    pub fn familiar_names(&self) -> Vec<String> {
        self.names.iter().map(|n| familiar_name(n)).collect()
    }

    /// Every blob this image needs.
    pub fn blobs(&self) -> impl Iterator<Item = &Digest> {
        [&self.digest, &self.config]
            .into_iter()
            .chain(self.layers.iter().map(|l| &l.digest))
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Index {
    version: u32,
    images: Vec<ImageRecord>,
}

const INDEX_VERSION: u32 = 1;

/// What [`Store::remove`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removed {
    /// Names taken off images.
    pub untagged: Vec<String>,
    /// The image removed from the store, if the last reference to it went.
    pub deleted: Option<Digest>,
    /// Blobs garbage-collected, and their bytes.
    pub blobs_freed: usize,
    pub bytes_freed: u64,
}

/// The image store.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    /// Blobs this handle added, when it is a [`Store::journaled`] one.
    journal: Option<Arc<Mutex<Vec<Digest>>>>,
}

/// A held flock, released when dropped (or when the process dies).
#[derive(Debug)]
pub struct StoreLock {
    file: File,
    path: PathBuf,
}

impl StoreLock {
    /// Undoes what a failed pull or import through the journaled `store` added: every blob it
    /// stored that no image record names. Waits for `gc.lock` exclusively first, so that a
    /// concurrent pull that found one of these blobs already there has recorded its image
    /// (and so keeps it) before anything is deleted. Failures are logged: the error that
    /// caused the roll-back is the one to report.
    pub fn roll_back(&self, store: &Store) {
        let Some(journal) = &store.journal else {
            return;
        };
        let added = std::mem::take(&mut *journal.lock().unwrap_or_else(|e| e.into_inner()));
        if added.is_empty() {
            return;
        }
        if let Err(e) = self.relock(libc::LOCK_EX) {
            tracing::warn!("rolling back: {e}");
            return;
        }
        let named: HashSet<Digest> = match store.list() {
            Ok(images) => images.iter().flat_map(|i| i.blobs().cloned()).collect(),
            Err(e) => {
                tracing::warn!("rolling back: {e}");
                return;
            }
        };
        for d in added.iter().filter(|d| !named.contains(d)) {
            let p = store.blob_path(d);
            if let Err(e) = fs::remove_file(&p) {
                tracing::warn!("rolling back: removing {}: {e}", p.display());
            }
        }
        if let Err(e) = self.relock(libc::LOCK_SH) {
            tracing::warn!("rolling back: {e}");
        }
    }

    fn relock(&self, how: libc::c_int) -> Result<(), ImageError> {
        loop {
            match flock(&self.file, how) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => return r.at("locking", &self.path),
            }
        }
    }
}

fn flock(file: &File, how: libc::c_int) -> io::Result<()> {
    // SAFETY: flock on a descriptor the caller owns.
    if unsafe { libc::flock(file.as_raw_fd(), how) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl Store {
    /// Opens (creating if needed) the store under `data_dir/images`.
    pub fn open(data_dir: &Path) -> Result<Store, ImageError> {
        let root = data_dir.join("images");
        // Unpacked layers keep images' setuid files and device nodes: root's alone.
        {
            use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&root)
                .at("creating image store directory", &root)?;
            fs::set_permissions(&root, fs::Permissions::from_mode(0o700))
                .at("making the image store private", &root)?;
        }
        for d in ["blobs/sha256", "tmp", "layers", "ext4"] {
            let p = root.join(d);
            fs::create_dir_all(&p).at("creating image store directory", &p)?;
        }
        Ok(Store {
            root,
            journal: None,
        })
    }

    /// A handle on the same store that remembers every blob it adds, so that a pull or an
    /// import that fails can take them out again ([`StoreLock::roll_back`]).
    pub(crate) fn journaled(&self) -> Store {
        Store {
            root: self.root.clone(),
            journal: Some(Arc::default()),
        }
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a blob lives (whether or not it is there).
    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(d.hex())
    }

    /// Whether a blob is stored.
    pub fn has_blob(&self, d: &Digest) -> bool {
        self.blob_path(d).is_file()
    }

    /// Reads a whole (small) blob: a manifest or a config.
    pub fn read_blob(&self, d: &Digest) -> Result<Vec<u8>, ImageError> {
        let p = self.blob_path(d);
        fs::read(&p).at("reading blob", p)
    }

    pub(crate) fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    pub(crate) fn layers_dir(&self) -> PathBuf {
        self.root.join("layers")
    }

    pub(crate) fn ext4_dir(&self) -> PathBuf {
        self.root.join("ext4")
    }

    /// Takes the store's content lock shared: held while adding blobs or caches, so that a
    /// concurrent `remove` waits before collecting garbage. When no other cela process holds
    /// it, leftovers of killed processes in `tmp/` are cleared first.
    pub fn content_lock(&self) -> Result<StoreLock, ImageError> {
        match self.lock("gc.lock", libc::LOCK_EX | libc::LOCK_NB) {
            Ok(lock) => {
                for (path, _) in entries(&self.tmp_dir())? {
                    remove_any(&path)?;
                }
                // Converting to shared is not atomic, but nothing is written yet: a `remove`
                // slipping in between only collects garbage.
                lock.relock(libc::LOCK_SH)?;
                Ok(lock)
            }
            Err(ImageError::Io { source, .. }) if source.kind() == io::ErrorKind::WouldBlock => {
                self.lock("gc.lock", libc::LOCK_SH)
            }
            Err(e) => Err(e),
        }
    }

    fn lock(&self, name: &str, how: libc::c_int) -> Result<StoreLock, ImageError> {
        let path = self.root.join(name);
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .at("opening lock file", &path)?;
        loop {
            match flock(&file, how) {
                Ok(()) => return Ok(StoreLock { file, path }),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).at("locking", path),
            }
        }
    }

    /// Starts writing a blob whose digest is computed as it is written.
    pub fn blob_writer(&self) -> Result<BlobWriter<'_>, ImageError> {
        let tmp = NamedTempFile::with_prefix_in("blob-", self.tmp_dir())
            .at("creating a temporary file in", self.tmp_dir())?;
        Ok(BlobWriter {
            store: self,
            hasher: Hasher::new(BufWriter::with_capacity(1 << 16, tmp)),
        })
    }

    /// Stores `bytes` as a blob, checking them against `expected` first if given.
    pub fn put_bytes(
        &self,
        what: &str,
        bytes: &[u8],
        expected: Option<&Digest>,
    ) -> Result<Digest, ImageError> {
        let mut w = self.blob_writer()?;
        w.write_all(bytes).at("writing to", self.tmp_dir())?;
        Ok(w.commit(what, expected, Some(bytes.len() as u64))?.0)
    }

    /// Copies `r` into a blob, verified against `expected` and `size`; reading stops one byte
    /// past `size` ([`ImageError::TooLong`]).
    pub fn put_reader(
        &self,
        what: &str,
        r: &mut dyn Read,
        expected: Option<&Digest>,
        size: Option<u64>,
    ) -> Result<(Digest, u64), ImageError> {
        let mut w = self.blob_writer()?;
        // One byte past the announced size is enough to know it is too long.
        let limit = size.map_or(u64::MAX, |s| s.saturating_add(1));
        io::copy(&mut r.take(limit), &mut w).map_err(|e| ImageError::BadArchive {
            path: what.into(),
            why: format!("reading: {e}"),
        })?;
        w.commit(what, expected, size)
    }

    /// Every stored image, in the order they were added.
    pub fn list(&self) -> Result<Vec<ImageRecord>, ImageError> {
        Ok(self.read_index()?.images)
    }

    /// Finds an image by name (`busybox`, `127.0.0.1:5000/busybox:latest`), by full digest
    /// (`sha256:…`) or by a unique digest prefix (at least 4 hex digits, `sha256:` optional).
    pub fn resolve(&self, input: &str) -> Result<ImageRecord, ImageError> {
        let images = self.list()?;
        find(&images, input).map(|i| images[i].clone())
    }

    /// Records an image whose blobs are all stored. Its names move to it from any other image
    /// (which keeps its digest and stays listed, unnamed); an image already stored under the
    /// same digest gains the new names.
    pub fn commit_image(&self, mut record: ImageRecord) -> Result<ImageRecord, ImageError> {
        if let Some(missing) = record.blobs().find(|d| !self.has_blob(d)) {
            return Err(ImageError::BadManifest {
                what: format!("image {}", record.digest),
                why: format!("blob {missing} is not in the store"),
            });
        }
        self.update_index(|index| {
            for other in index.images.iter_mut() {
                if other.digest != record.digest {
                    other.names.retain(|n| !record.names.contains(n));
                }
            }
            if let Some(existing) = index.images.iter_mut().find(|i| i.digest == record.digest) {
                for n in record.names.drain(..) {
                    if !existing.names.contains(&n) {
                        existing.names.push(n);
                    }
                }
                Ok(existing.clone())
            } else {
                index.images.push(record.clone());
                Ok(record)
            }
        })
    }

    /// Removes a name, or an image with all its names when given its digest or its last name,
    /// then deletes the blobs and caches no image needs any more.
    ///
    /// `in_use` gives the digests of the images instances are made from (asked for once the
    /// store's gc lock is held exclusively). Such an image is not
    /// removed: without `force` that is an [`ImageError::InUse`]; with `force` all its names
    /// go but its record (and so its blobs and unpacked layers) stays, listed as `<none>` —
    /// what `docker rmi -f` does to an image a container uses. Taking one name off an image
    /// that keeps others is allowed either way.
    pub fn remove(
        &self,
        input: &str,
        in_use: impl FnOnce() -> Result<HashSet<Digest>, String>,
        force: bool,
    ) -> Result<Removed, ImageError> {
        let _gc = self.lock("gc.lock", libc::LOCK_EX)?;
        // Asked for under the lock: a `cela run` holds the content lock from resolving its
        // image to recording its instance, so no new user slips in between. If it cannot be
        // told, the image counts as in use: nothing is deleted that an instance might need.
        let in_use = in_use();
        let (untagged, deleted) = self.update_index(|index| {
            let i = find(&index.images, input)?;
            let by_name = input
                .parse::<Reference>()
                .ok()
                .and_then(|r| r.name())
                .filter(|n| index.images[i].names.contains(n));
            let image = &mut index.images[i];
            match by_name {
                Some(name) if image.names.len() > 1 => {
                    image.names.retain(|n| *n != name);
                    Ok((vec![name], None))
                }
                _ if in_use.as_ref().is_ok_and(|u| !u.contains(&image.digest)) => {
                    let gone = index.images.remove(i);
                    Ok((gone.names, Some(gone.digest)))
                }
                _ if force => Ok((std::mem::take(&mut image.names), None)),
                _ => Err(match &in_use {
                    Ok(_) => ImageError::InUse {
                        image: input.to_owned(),
                        digest: image.digest.clone(),
                    },
                    Err(why) => ImageError::InUseUnknown {
                        image: input.to_owned(),
                        why: why.clone(),
                    },
                }),
            }
        })?;
        let (blobs_freed, bytes_freed) = self.collect_garbage()?;
        Ok(Removed {
            untagged,
            deleted,
            blobs_freed,
            bytes_freed,
        })
    }

    /// Deletes blobs and caches that no image record refers to (a record without names — an
    /// image kept for its instances — still counts), and stale temporary files. The caller
    /// holds `gc.lock` exclusively.
    fn collect_garbage(&self) -> Result<(usize, u64), ImageError> {
        let images = self.list()?;
        let blobs: HashSet<String> = images
            .iter()
            .flat_map(|i| i.blobs().map(|d| d.hex().to_owned()))
            .collect();
        let image_ids: HashSet<String> = images
            .iter()
            .map(|i| format!("{}.ext4", i.digest.hex()))
            .collect();
        let (mut count, mut bytes) = (0, 0);
        let blob_dir = self.root.join("blobs/sha256");
        for (path, name) in entries(&blob_dir)? {
            if !blobs.contains(&name) {
                bytes += fs::symlink_metadata(&path).map(|m| m.len()).unwrap_or(0);
                fs::remove_file(&path).at("removing blob", &path)?;
                count += 1;
            }
        }
        for (path, name) in entries(&self.layers_dir())? {
            if !blobs.contains(&name) {
                remove_any(&path)?;
            }
        }
        for (path, name) in entries(&self.ext4_dir())? {
            if !image_ids.contains(&name) {
                remove_any(&path)?;
            }
        }
        for (path, _) in entries(&self.tmp_dir())? {
            remove_any(&path)?;
        }
        Ok((count, bytes))
    }

    fn read_index(&self) -> Result<Index, ImageError> {
        let path = self.root.join("index.json");
        match fs::read(&path) {
            Ok(bytes) => {
                let index: Index =
                    serde_json::from_slice(&bytes).map_err(|e| ImageError::BadManifest {
                        what: path.display().to_string(),
                        why: format!("not a cela image index: {e}"),
                    })?;
                Ok(index)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Index {
                version: INDEX_VERSION,
                images: Vec::new(),
            }),
            Err(e) => Err(e).at("reading", path),
        }
    }

    fn update_index<T>(
        &self,
        change: impl FnOnce(&mut Index) -> Result<T, ImageError>,
    ) -> Result<T, ImageError> {
        let _lock = self.lock("index.lock", libc::LOCK_EX)?;
        let mut index = self.read_index()?;
        let out = change(&mut index)?;
        index.version = INDEX_VERSION;
        let path = self.root.join("index.json");
        let mut tmp = NamedTempFile::with_prefix_in(".index-", &self.root)
            .at("creating a temporary file in", &self.root)?;
        serde_json::to_writer_pretty(&mut tmp, &index)
            .map_err(io::Error::from)
            .at("writing", tmp.path().to_owned())?;
        tmp.as_file()
            .sync_all()
            .at("syncing", tmp.path().to_owned())?;
        tmp.persist(&path)
            .map_err(|e| e.error)
            .at("replacing", &path)?;
        Ok(out)
    }
}

/// The index of the image `input` names among `images`.
fn find(images: &[ImageRecord], input: &str) -> Result<usize, ImageError> {
    let parsed = input.parse::<Reference>();
    if let Ok(r) = &parsed {
        if let Some(name) = r.name()
            && let Some(i) = images.iter().position(|i| i.names.contains(&name))
            && r.digest.as_ref().is_none_or(|d| *d == images[i].digest)
        {
            return Ok(i);
        }
        if r.tag.is_none()
            && let Some(d) = &r.digest
            && let Some(i) = images.iter().position(|i| i.digest == *d)
        {
            return Ok(i);
        }
    }
    let prefix = input.strip_prefix("sha256:").unwrap_or(input);
    let is_prefix = (4..=64).contains(&prefix.len())
        && prefix
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if is_prefix {
        let matches: Vec<usize> = (0..images.len())
            .filter(|&i| images[i].digest.hex().starts_with(prefix))
            .collect();
        match matches.len() {
            1 => return Ok(matches[0]),
            0 => {}
            count => {
                return Err(ImageError::AmbiguousImage {
                    prefix: input.to_owned(),
                    count,
                });
            }
        }
    } else {
        parsed?;
    }
    Err(ImageError::UnknownImage(input.to_owned()))
}

/// (path, file name) of every entry of `dir`.
fn entries(dir: &Path) -> Result<Vec<(PathBuf, String)>, ImageError> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).at("listing", dir)? {
        let e = e.at("listing", dir)?;
        out.push((e.path(), e.file_name().to_string_lossy().into_owned()));
    }
    Ok(out)
}

/// Removes a file or a whole tree.
pub(crate) fn remove_any(path: &Path) -> Result<(), ImageError> {
    let r = match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    r.at("removing", path)
}

/// A blob being written: hashed as it goes, published by [`BlobWriter::commit`] only if it is
/// what was expected. Dropping it uncommitted deletes the temporary file.
pub struct BlobWriter<'a> {
    store: &'a Store,
    hasher: Hasher<BufWriter<NamedTempFile>>,
}

impl BlobWriter<'_> {
    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.hasher.len()
    }

    /// Verifies the content against `expected`/`size` (`what` names it in errors) and moves it
    /// into the store. Returns its digest and length.
    pub fn commit(
        self,
        what: &str,
        expected: Option<&Digest>,
        size: Option<u64>,
    ) -> Result<(Digest, u64), ImageError> {
        if let Some(s) = size
            && self.hasher.len() > s
        {
            return Err(ImageError::TooLong {
                what: what.to_owned(),
                expected: s,
            });
        }
        let ((digest, len), buf) = self.hasher.finish_into();
        let tmp = buf
            .into_inner()
            .map_err(|e| e.into_error())
            .at("writing to", self.store.tmp_dir())?;
        if let Some(exp) = expected {
            verify(what, exp, size, &digest, len)?;
        } else if let Some(s) = size
            && s != len
        {
            return Err(ImageError::SizeMismatch {
                what: what.to_owned(),
                expected: s,
                actual: len,
            });
        }
        let dest = self.store.blob_path(&digest);
        if dest.is_file() {
            return Ok((digest, len));
        }
        tmp.as_file()
            .sync_all()
            .at("syncing", tmp.path().to_owned())?;
        let tmp_path = tmp.path().to_owned();
        let file = tmp
            .persist(&dest)
            .map_err(|e| e.error)
            .at("storing blob", &tmp_path)?;
        let _ = file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644));
        if let Some(j) = &self.store.journal {
            j.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(digest.clone());
        }
        Ok((digest, len))
    }
}

impl Write for BlobWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.hasher.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.hasher.flush()
    }
}

#[cfg(test)]
mod tests;
