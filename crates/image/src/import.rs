//! Importing images from files, detected by content:
//!
//! * an **OCI image layout** (OCI image spec, "Image Layout": `oci-layout`, `index.json`,
//!   `blobs/sha256/…`), as a directory or a tar (optionally compressed);
//! * a **`docker save` archive** (`manifest.json` listing each image's config and layer tars;
//!   `docker save` of Docker ≥ 25 also carries an OCI layout, which is then preferred);
//! * anything else that is a tar (optionally gzip/zstd) is a **plain rootfs tarball** and becomes
//!   a one-layer image stored as the file is, with a minimal config (`/bin/sh`, a default PATH).
//!
//! Every blob is verified while it is copied into the store: against its descriptor's digest and
//! size for layouts, against the config's `diff_ids` (the digest of the uncompressed layer) and
//! the config's file name for `docker save` archives. A tar archive is read in place: its
//! members are indexed by offset, never extracted.
//!
//! What is imported is untrusted. The path given must be a regular file or a directory. Inside
//! a layout or an extracted archive, every file is opened beneath its top (`openat2` with
//! `RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS`, never blocking) and must be a regular file: a blob
//! that is a symlink (to `/dev/zero`, to a host file), a FIFO or a device is refused. Inside a
//! tar, links resolve only to other members. Manifests, indexes and configs are read up to
//! [`MAX_METADATA`]; a blob whose length differs from its descriptor's is refused before it is
//! read, and reading stops one byte past the declared size; declared sizes are checked as for a
//! pull. A compressed archive is decompressed into `tmp/` no further than the free space of the
//! store's file system less 256 MiB. An import that fails takes out the blobs it stored that no
//! image record names, so the store is left as it was.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use oci_spec::image::{Descriptor, ImageConfiguration, ImageIndex, ImageManifest};
use serde::Deserialize;
use tempfile::NamedTempFile;

use cela_guest::beneath::{self, Resolve};

use crate::digest::Hasher;
use crate::error::{IoContext, bad_archive};
use crate::manifest::{self, MAX_METADATA, Parsed};
use crate::progress::{Counting, Progress};
use crate::tar_limits::{self, LimitError, Limited};
use crate::unpack::{Compression, open_layer, safe_relative};
use crate::{Digest, ImageError, ImageRecord, Reference, Store};

/// Imports the image(s) at `path` into `store`, naming them `name` (`NAME[:TAG]`) if given,
/// else by the names the archive carries. Returns the stored records.
pub fn import(
    store: &Store,
    path: &Path,
    name: Option<&str>,
    progress: &Progress,
) -> Result<Vec<ImageRecord>, ImageError> {
    let name = match name {
        Some(n) => {
            let r: Reference = n.parse()?;
            Some(r.name().ok_or_else(|| ImageError::BadReference {
                input: n.to_owned(),
                why: "an image is named NAME[:TAG], without a digest".into(),
            })?)
        }
        None => None,
    };
    let store = &store.journaled();
    let lock = store.content_lock()?;
    let result = import_locked(store, path, name, progress, true);
    if result.is_err() {
        lock.roll_back(store);
    }
    result
}

/// Imports the archive `reader` gives (the body of a `docker load`): an OCI layout or a
/// `docker save` tar, optionally compressed, named by the names it carries. It is copied into
/// the store's `tmp/` first, no further than the store's file system can take keeping the
/// reserve, and imported from there; a plain rootfs tarball is refused (it has no name to
/// take: `cela image import FILE --name N`).
pub fn import_reader(
    store: &Store,
    reader: &mut dyn Read,
    progress: &Progress,
) -> Result<Vec<ImageRecord>, ImageError> {
    // The lock first: taking it may clear tmp/ of what killed processes left.
    let store = &store.journaled();
    let lock = store.content_lock()?;
    let result = receive(store, reader)
        .and_then(|tmp| import_locked(store, tmp.path(), None, progress, false));
    if result.is_err() {
        lock.roll_back(store);
    }
    result
}

/// Copies what `reader` gives into a temporary file of the store's `tmp/`, within the room
/// its file system has: checked again every [`ROOM_CHECK`] bytes, as other writers may be
/// filling it too. A failure to read is the archive's (`BadArchive`); a failure to write is
/// the store's.
fn receive(store: &Store, reader: &mut dyn Read) -> Result<NamedTempFile, ImageError> {
    let tmp = NamedTempFile::with_prefix_in("load-", store.tmp_dir())
        .at("creating a temporary file in", store.tmp_dir())?;
    let label = tmp.path().to_owned();
    let full = |room: u64| {
        bad_archive(
            &label,
            format!(
                "it is larger than the {room} bytes free for the store (keeping {} in reserve)",
                tar_limits::RESERVE
            ),
        )
    };
    let mut w = io::BufWriter::with_capacity(1 << 16, tmp.as_file());
    let mut buf = vec![0u8; 1 << 16];
    let (mut written, mut checked_at) = (0u64, 0u64);
    let mut room =
        tar_limits::room(tmp.as_file()).at("inspecting the file system of", store.tmp_dir())?;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(bad_archive(&label, format!("cannot receive it: {e}"))),
        };
        w.write_all(&buf[..n]).at("writing", label.clone())?;
        written += n as u64;
        if written - checked_at >= ROOM_CHECK {
            w.flush().at("writing", label.clone())?;
            room = tar_limits::room(tmp.as_file())
                .at("inspecting the file system of", store.tmp_dir())?;
            checked_at = written;
        }
        if written - checked_at > room {
            return Err(full(room));
        }
    }
    w.flush().at("writing", label.clone())?;
    drop(w);
    Ok(tmp)
}

/// How often a received archive checks the room left for it.
const ROOM_CHECK: u64 = 64 << 20;

/// [`import`] under the content lock, through a journaled store; a tar that is neither a
/// layout nor a `docker save` archive is a rootfs only when `rootfs` allows it.
fn import_locked(
    store: &Store,
    path: &Path,
    name: Option<String>,
    progress: &Progress,
    rootfs: bool,
) -> Result<Vec<ImageRecord>, ImageError> {
    let meta = fs::metadata(path).at("reading", path)?;
    if !meta.is_dir() && !meta.is_file() {
        return Err(bad_archive(
            path,
            "not a regular file or a directory (cela reads archives and layouts only from those)",
        ));
    }
    let source = format!("import {}", path.display());
    let imp = Importer {
        store,
        label: path,
        name,
        source,
        progress,
    };
    if meta.is_dir() {
        let src = Source::Dir(path.to_owned());
        return imp.layout_or_docker(&src).unwrap_or_else(|| {
            Err(bad_archive(
                path,
                "a directory to import must be an OCI image layout (with oci-layout) or an extracted docker save archive (with manifest.json)",
            ))
        });
    }
    let mut head = [0u8; 8];
    let n = File::open(path)
        .and_then(|mut f| f.read(&mut head))
        .at("reading", path)?;
    let compression = Compression::sniff(&head[..n]);
    // A compressed tar is decompressed once into the store's tmp/ for random access, and its
    // digest (the diff_id, if it is a rootfs) computed on the way.
    let (tar_path, diff_id, _tmp) = if compression == Compression::None {
        (path.to_owned(), None, None)
    } else {
        let step = progress.step(format!("decompressing {}", path.display()));
        let tmp = NamedTempFile::with_prefix_in("import-", store.tmp_dir())
            .at("creating a temporary file in", store.tmp_dir())?;
        let mut h = Hasher::new(io::BufWriter::new(tmp.as_file()));
        // A compression bomb stops where it would fill the store's file system.
        let room =
            tar_limits::room(tmp.as_file()).at("inspecting the file system of", store.tmp_dir())?;
        io::copy(&mut open_layer(path)?.take(room.saturating_add(1)), &mut h)
            .map_err(|e| bad_archive(path, format!("cannot decompress: {e}")))?;
        if h.len() > room {
            return Err(bad_archive(
                path,
                format!(
                    "decompressed, it is larger than the {room} bytes free for the store (keeping {} in reserve)",
                    tar_limits::RESERVE
                ),
            ));
        }
        let ((d, _), w) = h.finish_into();
        w.into_inner()
            .map_err(|e| e.into_error())
            .at("writing", tmp.path().to_owned())?;
        step.done();
        (tmp.path().to_owned(), Some(d), Some(tmp))
    };
    let src = Source::Tar {
        file: tar_path.clone(),
        members: index_tar(&tar_path, path)?,
    };
    match imp.layout_or_docker(&src) {
        Some(r) => r,
        None if rootfs => imp.rootfs(compression, diff_id),
        None => Err(bad_archive(
            path,
            "it is not an image archive (a docker save tar or an OCI image layout)",
        )),
    }
}

struct Importer<'a> {
    store: &'a Store,
    label: &'a Path,
    name: Option<String>,
    source: String,
    progress: &'a Progress,
}

impl Importer<'_> {
    fn bad(&self, why: impl Into<String>) -> ImageError {
        bad_archive(self.label, why)
    }

    fn layout_or_docker(&self, src: &Source) -> Option<Result<Vec<ImageRecord>, ImageError>> {
        if src.has("oci-layout") {
            Some(self.layout(src))
        } else if src.has("manifest.json") {
            Some(self.docker(src))
        } else {
            None
        }
    }

    /// An OCI image layout: every image its index.json lists (linux/amd64 of nested indexes).
    fn layout(&self, src: &Source) -> Result<Vec<ImageRecord>, ImageError> {
        let layout: serde_json::Value =
            serde_json::from_slice(&src.read_small(self, "oci-layout")?)
                .map_err(|e| self.bad(format!("oci-layout is not JSON: {e}")))?;
        if !layout["imageLayoutVersion"].is_string() {
            return Err(self.bad("oci-layout has no imageLayoutVersion"));
        }
        let index = ImageIndex::from_reader(&src.read_small(self, "index.json")?[..])
            .map_err(|e| self.bad(format!("index.json is not an image index: {e}")))?;
        // Counted before anything is read: each manifest is kept in memory until the end.
        self.check_count(index.manifests().len())?;
        let mut found = Vec::new();
        for desc in index.manifests() {
            let (digest, m, bytes) = self.layout_manifest(src, desc, 0)?;
            let what = format!("image {digest} in {}", self.label.display());
            manifest::check_image(&what, &m)?;
            self.store
                .put_bytes(&format!("manifest of {what}"), &bytes, Some(&digest))?;
            found.push((digest, m, annotated_name(desc)));
        }
        // Every blob of every image is stored before any image is recorded: a refused image
        // leaves no other image of the archive behind (the blobs are rolled back).
        let mut ready = Vec::new();
        for (digest, m, annotated) in found {
            let what = format!("image {digest} in {}", self.label.display());
            let config = manifest::digest_of(&what, m.config())?;
            self.copy_blob(
                src,
                &format!("config of {what}"),
                &config,
                m.config().size(),
            )?;
            for (i, l) in m.layers().iter().enumerate() {
                let d = manifest::digest_of(&what, l)?;
                self.copy_blob(src, &format!("layer {} of {what}", i + 1), &d, l.size())?;
            }
            let names = self.name.clone().or(annotated).into_iter().collect();
            ready.push((digest, m, names));
        }
        self.commit_all(ready)
    }

    /// Records the images whose blobs are all stored.
    fn commit_all(
        &self,
        ready: Vec<(Digest, ImageManifest, Vec<String>)>,
    ) -> Result<Vec<ImageRecord>, ImageError> {
        ready
            .into_iter()
            .map(|(digest, m, names)| self.commit(digest, &m, names))
            .collect()
    }

    /// Reads and verifies the manifest a layout descriptor points at, descending into a nested
    /// index for its linux/amd64 image.
    fn layout_manifest(
        &self,
        src: &Source,
        desc: &Descriptor,
        depth: u32,
    ) -> Result<(Digest, ImageManifest, Vec<u8>), ImageError> {
        let what = format!("{} in {}", desc.digest(), self.label.display());
        let digest = manifest::digest_of(&what, desc)?;
        manifest::check_metadata_size(&what, desc)?;
        let bytes = src.read_small(self, &blob_name(&digest))?;
        let (actual, len) = Digest::of_reader(&bytes[..]).at("hashing", self.label)?;
        crate::digest::verify(
            &format!("manifest {what}"),
            &digest,
            Some(desc.size()),
            &actual,
            len,
        )?;
        match manifest::parse(&what, &bytes)? {
            Parsed::Manifest(m) => Ok((digest, *m, bytes)),
            Parsed::Index(_) if depth > 0 => {
                Err(self.bad("image indexes nested more than one level"))
            }
            Parsed::Index(i) => {
                let d = manifest::pick_platform(&what, &i)?.clone();
                self.layout_manifest(src, &d, depth + 1)
            }
        }
    }

    /// A `docker save` archive: each entry of manifest.json.
    fn docker(&self, src: &Source) -> Result<Vec<ImageRecord>, ImageError> {
        #[derive(Deserialize)]
        struct Entry {
            #[serde(rename = "Config")]
            config: String,
            #[serde(rename = "RepoTags", default)]
            repo_tags: Option<Vec<String>>,
            #[serde(rename = "Layers")]
            layers: Vec<String>,
        }
        let entries: Vec<Entry> = serde_json::from_slice(&src.read_small(self, "manifest.json")?)
            .map_err(|e| {
            self.bad(format!("manifest.json is not a docker save manifest: {e}"))
        })?;
        self.check_count(entries.len())?;
        let mut ready = Vec::new();
        for e in entries {
            let what = format!("image {} in {}", e.config, self.label.display());
            let cfg_bytes = src.read_small(self, &e.config)?;
            // The config's file name is its digest (`<hex>.json` or `blobs/sha256/<hex>`).
            let stem = e.config.rsplit('/').next().unwrap_or(&e.config);
            let expected = format!("sha256:{}", stem.trim_end_matches(".json"))
                .parse::<Digest>()
                .ok();
            let config = self.store.put_bytes(
                &format!("config of {what}"),
                &cfg_bytes,
                expected.as_ref(),
            )?;
            let cfg = ImageConfiguration::from_reader(&cfg_bytes[..])
                .map_err(|err| self.bad(format!("{}: not an image config: {err}", e.config)))?;
            let diff_ids = cfg
                .rootfs()
                .diff_ids()
                .iter()
                .map(|d| d.parse::<Digest>())
                .collect::<Result<Vec<_>, _>>()?;
            if diff_ids.len() != e.layers.len() {
                return Err(self.bad(format!(
                    "{} lists {} layers but its config has {} diff_ids",
                    e.config,
                    e.layers.len(),
                    diff_ids.len()
                )));
            }
            let mut layers = Vec::new();
            for (i, (name, diff_id)) in e.layers.iter().zip(&diff_ids).enumerate() {
                let lwhat = format!("layer {} ({name}) of {what}", i + 1);
                let (r, size) = src.open(self, name)?;
                let mut r = BufReader::new(r);
                let head = r.fill_buf().at("reading", self.label)?.to_vec();
                let c = Compression::sniff(&head);
                let digest = if c == Compression::None {
                    // The blob is the uncompressed tar: its digest must be the diff_id.
                    self.put_counted(&lwhat, &mut r, Some(diff_id), size)?
                } else {
                    let (mut check, _) = src.open(self, name)?;
                    let (actual, len) = Digest::of_reader(decompressor(c, &mut check)?)
                        .map_err(|err| self.bad(format!("{name}: cannot decompress: {err}")))?;
                    crate::digest::verify(&lwhat, diff_id, None, &actual, len)?;
                    self.put_counted(&lwhat, &mut r, None, size)?
                };
                layers.push((digest, size, c.oci_media_type()));
            }
            let cfg_len = cfg_bytes.len() as u64;
            let bytes = manifest::synthesize((&config, cfg_len), &layers);
            let digest = self
                .store
                .put_bytes(&format!("manifest of {what}"), &bytes, None)?;
            let Parsed::Manifest(m) = manifest::parse(&what, &bytes)? else {
                unreachable!("a synthesized manifest is a manifest")
            };
            manifest::check_image(&what, &m)?;
            let names = match &self.name {
                Some(n) => vec![n.clone()],
                None => e
                    .repo_tags
                    .unwrap_or_default()
                    .iter()
                    .map(|t| t.parse::<Reference>().map(|r| r.name().unwrap_or_default()))
                    .collect::<Result<Vec<_>, _>>()?,
            };
            ready.push((digest, *m, names));
        }
        self.commit_all(ready)
    }

    /// A plain rootfs tarball: one layer, stored as the file is.
    fn rootfs(
        &self,
        c: Compression,
        diff_id: Option<Digest>,
    ) -> Result<Vec<ImageRecord>, ImageError> {
        let size = fs::metadata(self.label).at("reading", self.label)?.len();
        let mut f = File::open(self.label).at("opening", self.label)?;
        let what = format!("rootfs tarball {}", self.label.display());
        let layer = self.put_counted(&what, &mut f, None, size)?;
        let diff_id = diff_id.unwrap_or_else(|| layer.clone());
        let rec = manifest::single_layer_image(
            self.store,
            &what,
            (layer, size, c.oci_media_type()),
            &diff_id,
            &["/bin/sh"],
            "cela image import (rootfs tarball)",
            self.name.clone().into_iter().collect(),
            self.source.clone(),
        )?;
        Ok(vec![rec])
    }

    fn check_count(&self, n: usize) -> Result<(), ImageError> {
        if n == 0 {
            return Err(self.bad("the archive lists no images"));
        }
        if n > MAX_IMAGES {
            return Err(self.bad(format!(
                "the archive lists {n} images; at most {MAX_IMAGES} are imported at once"
            )));
        }
        if n > 1 && self.name.is_some() {
            return Err(self.bad(format!(
                "the archive holds {n} images; --name can name only one"
            )));
        }
        Ok(())
    }

    fn copy_blob(&self, src: &Source, what: &str, d: &Digest, size: u64) -> Result<(), ImageError> {
        if self.store.has_blob(d) {
            return Ok(());
        }
        let (mut r, len) = src.open(self, &blob_name(d))?;
        if len != size {
            return Err(ImageError::SizeMismatch {
                what: what.to_owned(),
                expected: size,
                actual: len,
            });
        }
        self.put_counted(what, &mut r, Some(d), size)?;
        Ok(())
    }

    fn put_counted(
        &self,
        what: &str,
        r: &mut dyn Read,
        expected: Option<&Digest>,
        size: u64,
    ) -> Result<Digest, ImageError> {
        let step = self.progress.step(format!("importing {what}"));
        step.set_total_bytes(size);
        let mut counting = Counting {
            inner: r,
            step: &step,
            done: 0,
        };
        let (d, _) = self
            .store
            .put_reader(what, &mut counting, expected, Some(size))?;
        step.done();
        Ok(d)
    }

    fn commit(
        &self,
        digest: Digest,
        m: &ImageManifest,
        names: Vec<String>,
    ) -> Result<ImageRecord, ImageError> {
        let rec = manifest::record(self.store, digest, m, names, self.source.clone())?;
        self.store.commit_image(rec)
    }
}

fn blob_name(d: &Digest) -> String {
    format!("blobs/sha256/{}", d.hex())
}

/// The name an OCI layout's index gives an image: containerd's annotation, or the OCI
/// `ref.name` when it is a full reference (skopeo writes a bare tag there, which names nothing).
fn annotated_name(desc: &Descriptor) -> Option<String> {
    let a = desc.annotations().as_ref()?;
    let full = a.get("io.containerd.image.name").or_else(|| {
        a.get("org.opencontainers.image.ref.name")
            .filter(|n| n.contains('/') || n.contains(':'))
    })?;
    full.parse::<Reference>().ok()?.name()
}

fn decompressor<'a>(c: Compression, r: &'a mut dyn Read) -> Result<Box<dyn Read + 'a>, ImageError> {
    Ok(match c {
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(r)),
        Compression::Zstd => {
            Box::new(zstd::Decoder::new(r).map_err(|e| ImageError::BadArchive {
                path: "zstd layer".into(),
                why: e.to_string(),
            })?)
        }
        Compression::None => Box::new(r),
    })
}

/// Where an image's files come from: a directory, or a tar read in place.
enum Source {
    Dir(PathBuf),
    Tar {
        file: PathBuf,
        members: HashMap<String, Member>,
    },
}

#[derive(Debug)]
enum Member {
    File {
        offset: u64,
        size: u64,
    },
    /// A symlink or hard link, as the archive-relative name it points at.
    Link(String),
}

impl Source {
    fn has(&self, name: &str) -> bool {
        match self {
            Source::Dir(d) => fs::symlink_metadata(d.join(name)).is_ok(),
            Source::Tar { members, .. } => members.contains_key(name),
        }
    }

    /// Opens a member for reading; returns it and its length.
    fn open(&self, imp: &Importer<'_>, name: &str) -> Result<(Box<dyn Read>, u64), ImageError> {
        let rel =
            safe_relative(Path::new(name)).map_err(|why| imp.bad(format!("{name}: {why}")))?;
        let missing = || imp.bad(format!("{name} is missing from the archive"));
        match self {
            Source::Dir(d) => {
                let io_err = |e: io::Error| ImageError::Io {
                    action: "opening",
                    path: d.join(&rel),
                    source: e,
                };
                let found = beneath::find(d, &rel, Resolve::NoLinks)
                    .map_err(|e| match e.raw_os_error() {
                        Some(libc::ELOOP | libc::EXDEV) => imp.bad(format!(
                            "{name} is a symbolic link (or passes through one); an image layout must hold its files itself"
                        )),
                        _ => io_err(e),
                    })?
                    .ok_or_else(missing)?;
                // Only a regular file is opened: a device node in a layout is never touched.
                let (f, meta) = found.open_regular(name).map_err(|e| {
                    if e.kind() == io::ErrorKind::InvalidData {
                        imp.bad(e.to_string())
                    } else {
                        io_err(e)
                    }
                })?;
                Ok((Box::new(f), meta.len()))
            }
            Source::Tar { file, members } => {
                let mut key = rel.to_string_lossy().into_owned();
                for _ in 0..8 {
                    match members.get(&key).ok_or_else(missing)? {
                        Member::Link(target) => key = target.clone(),
                        Member::File { offset, size } => {
                            let mut f = File::open(file).at("opening", file)?;
                            f.seek(SeekFrom::Start(*offset)).at("reading", file)?;
                            return Ok((Box::new(f.take(*size)), *size));
                        }
                    }
                }
                Err(imp.bad(format!("{name}: too many links")))
            }
        }
    }

    /// Reads a small member (a manifest, index or config) whole.
    fn read_small(&self, imp: &Importer<'_>, name: &str) -> Result<Vec<u8>, ImageError> {
        let (r, len) = self.open(imp, name)?;
        if len > MAX_METADATA {
            return Err(imp.bad(format!("{name} is {len} bytes, too large for metadata")));
        }
        let mut buf = Vec::with_capacity(len as usize);
        r.take(MAX_METADATA)
            .read_to_end(&mut buf)
            .at("reading", imp.label)?;
        if buf.len() as u64 != len {
            return Err(imp.bad(format!("{name} is truncated")));
        }
        Ok(buf)
    }
}

/// The most images one archive may hold.
const MAX_IMAGES: usize = 64;

/// The most entries an image archive may hold (a `docker save` of 500 layers has ~1,500).
const MAX_MEMBERS: usize = 100_000;

/// Indexes a tar's members by name (`./` and `/` prefixes dropped, symlinks resolved to the
/// member they name). `label` is the user's path, for errors.
fn index_tar(tar: &Path, label: &Path) -> Result<HashMap<String, Member>, ImageError> {
    let bad = |why: String| bad_archive(label, why);
    let not_tar = |e: io::Error| match LimitError::of(&e) {
        Some(limit) => bad(format!("refused: {limit}")),
        None => bad(format!(
            "not a tar archive, OCI image layout or docker save archive ({e})"
        )),
    };
    let f = File::open(tar).at("opening", tar)?;
    let mut archive = tar::Archive::new(Limited::new(f, None));
    let mut members = HashMap::new();
    let mut count = 0usize;
    for entry in archive.entries_with_seek().map_err(not_tar)? {
        let entry = entry.map_err(not_tar)?;
        count += 1;
        if count > MAX_MEMBERS {
            return Err(bad(format!(
                "more than {MAX_MEMBERS} tar entries: not an image archive"
            )));
        }
        let path = entry.path().map_err(not_tar)?.into_owned();
        let Ok(rel) = safe_relative(&path) else {
            continue; // a `..` name can never be a member a layout refers to
        };
        let key = rel.to_string_lossy().into_owned();
        let kind = entry.header().entry_type();
        let member = if kind.is_file() {
            Member::File {
                offset: entry.raw_file_position(),
                size: entry.size(),
            }
        } else if kind.is_symlink() || kind.is_hard_link() {
            let Some(target) = entry.link_name().map_err(not_tar)? else {
                continue;
            };
            let base = if kind.is_symlink() {
                rel.parent().map(Path::to_path_buf).unwrap_or_default()
            } else {
                PathBuf::new()
            };
            match normalize(&base.join(target)) {
                Some(t) => Member::Link(t),
                None => continue,
            }
        } else {
            continue;
        };
        members.insert(key, member);
    }
    if count == 0 {
        return Err(bad("empty archive (no tar entries)".into()));
    }
    Ok(members)
}

/// Resolves `.` and `..` lexically; `None` if it climbs above the top.
fn normalize(p: &Path) -> Option<String> {
    let mut out: Vec<&std::ffi::OsStr> = Vec::new();
    for c in p.components() {
        match c {
            std::path::Component::Normal(n) => out.push(n),
            std::path::Component::ParentDir => {
                out.pop()?;
            }
            _ => {}
        }
    }
    let joined: PathBuf = out.iter().collect();
    Some(joined.to_string_lossy().into_owned())
}
