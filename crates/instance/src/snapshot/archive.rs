//! A snapshot as one file to carry to another host (`cela snapshot export`, `cela snapshot
//! import`): a plain tar of `manifest.json`, then the files it lists, in that order.
//!
//! Export reads each file once, through one descriptor opened without following links, and
//! hashes what it copies: a snapshot damaged or changed on disk fails the export rather than
//! travel. Import takes the tar as hostile input (a file from anywhere, possibly compressed
//! with gzip or zstd, which is undone): the manifest must come first and be small; it bounds
//! everything after it. Only the listed files, each once, as regular files of exactly the
//! listed size, are accepted; each is hashed while it is written and compared with the
//! manifest; the disk (at most 1 TiB) is written sparse (zero blocks become holes). Nothing is
//! written beyond the snapshot store's free space less its reserve. The snapshot appears under
//! its name only once it is complete; a failed import leaves nothing.
//!
//! The digests travel with the files, so they show that an archive is whole, not that it is
//! honest: an imported state is only as trustworthy as whoever made the archive, and a
//! restore hands it to QEMU's state loader. That QEMU runs confined as in every restore (its
//! own sandbox, the monitor's jail: an unprivileged uid, new namespaces, its cgroup).

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::blocks::BlockHasher;
use cela_image::tar_limits::{self, Limited};

use super::{
    DISK_FILE, FORMAT, MAX_MANIFEST, MEMORY_FILE, Manifest, STATE_FILE, STATE_SLACK, Snapshots,
    bad, files_of,
};
use crate::error::{InstanceError, IoContext};
use crate::record::valid_name;

/// The manifest's name in the archive.
const MANIFEST: &str = "manifest.json";
/// Copy and sparse-detection unit.
const CHUNK: usize = 1 << 16;
/// The largest disk imported (read, hashed and written sparse: zeros cost time, not space).
const MAX_DISK: u64 = 1 << 40;
/// Free space is looked at again after this many bytes are written.
const ROOM_CHECK: u64 = 64 << 20;

/// Writes snapshot `name` to `out` as a tar; returns its manifest.
pub fn export(snaps: &Snapshots, name: &str, out: impl Write) -> Result<Manifest, InstanceError> {
    let m = snaps.find(name)?;
    let wanted = files_of(&m.engine);
    if m.files.len() != wanted.len() {
        return Err(bad(
            name,
            "its manifest lists files other than those of its engine",
        ));
    }
    let dir = snaps.dir(name);
    let mut tar = tar::Builder::new(out);
    // The manifest as read and checked by `find`, within what an import takes.
    let manifest = serde_json::to_vec(&m).expect("a manifest serializes");
    if manifest.len() as u64 > MAX_MANIFEST {
        return Err(bad(
            name,
            format!("its manifest is larger than {MAX_MANIFEST} bytes"),
        ));
    }
    append(&mut tar, MANIFEST, manifest.len() as u64, &manifest[..])?;
    for &want in wanted {
        let Some(f) = m.files.iter().find(|f| f.name == want) else {
            return Err(bad(name, format!("its manifest lists no {want}")));
        };
        let path = dir.join(want);
        let file = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| bad(name, format!("{want}: {e}")))?;
        let meta = file
            .metadata()
            .doing(|| format!("reading {}", path.display()))?;
        if !meta.is_file() || meta.len() != f.size {
            return Err(bad(
                name,
                format!(
                    "{want} has {} bytes where its manifest says {} (truncated or damaged)",
                    meta.len(),
                    f.size
                ),
            ));
        }
        let mut hashed = HashingReader::new(io::Read::take(file, f.size));
        append(&mut tar, want, f.size, &mut hashed)?;
        let (digest, n) = hashed.finish();
        if n != f.size || digest != f.digest {
            return Err(bad(
                name,
                format!(
                    "{want}'s digest is {digest}, not {} as its manifest says (damaged or \
                     tampered with); the export is incomplete",
                    f.digest
                ),
            ));
        }
    }
    tar.into_inner()
        .and_then(|mut w| w.flush())
        .doing(|| "finishing the archive".to_owned())?;
    Ok(m)
}

fn append(
    tar: &mut tar::Builder<impl Write>,
    name: &str,
    size: u64,
    data: impl Read,
) -> Result<(), InstanceError> {
    // GNU headers: a disk may pass ustar's 8 GiB.
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o600);
    h.set_size(size);
    h.set_mtime(0);
    tar.append_data(&mut h, name, data)
        .doing(|| format!("writing {name} into the archive"))
}

/// Reads a snapshot archive from `input` into `snaps`, named `rename` or as its manifest
/// says; returns the stored manifest.
pub fn import(
    snaps: &Snapshots,
    input: impl Read + 'static,
    rename: Option<&str>,
) -> Result<Manifest, InstanceError> {
    let input = cela_image::unpack::decompress(input).doing(|| "reading the archive".to_owned())?;
    let tmp = snaps
        .root
        .join(format!(".tmp-import-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    {
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&tmp)
            .doing(|| format!("creating {}", tmp.display()))?;
    }
    let made = import_into(snaps, input, rename, &tmp);
    if made.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    made
}

fn import_into(
    snaps: &Snapshots,
    input: Box<dyn Read>,
    rename: Option<&str>,
    tmp: &Path,
) -> Result<Manifest, InstanceError> {
    let refuse =
        |why: String| InstanceError::Invalid(format!("the archive is not a cela snapshot: {why}"));
    let dir_fd = File::open(tmp).doing(|| format!("opening {}", tmp.display()))?;
    // No byte budget on the stream: what is read is bounded by the manifest (every entry
    // taken is checked against its size, and one more entry ends the import), what is
    // written by the store's free space (`copy_sparse`), and a sparse disk may be larger than
    // that free space. `Limited` still bounds PAX headers and long names.
    let mut archive = tar::Archive::new(Limited::new(input, None));
    let mut entries = archive.entries().map_err(|e| refuse(e.to_string()))?;

    // The manifest, first and small.
    let Some(mut entry) = next_entry(&mut entries).map_err(refuse)? else {
        return Err(refuse("it is empty".into()));
    };
    let name = entry_name(&entry).map_err(refuse)?;
    if name != MANIFEST {
        return Err(refuse(format!(
            "its first entry is {name:?}, not {MANIFEST}"
        )));
    }
    if entry.header().entry_type() != tar::EntryType::Regular {
        return Err(refuse(format!("its {MANIFEST} is not a regular file")));
    }
    if entry.size() > MAX_MANIFEST {
        return Err(refuse(format!(
            "its manifest is larger than {MAX_MANIFEST} bytes"
        )));
    }
    let mut bytes = Vec::new();
    entry
        .read_to_end(&mut bytes)
        .map_err(|e| refuse(format!("{MANIFEST}: {e}")))?;
    // The format first: another format's manifest may not parse as this one's.
    if let Some(format) = super::format_of(&bytes).filter(|f| *f != FORMAT) {
        return Err(InstanceError::Unsupported(format!(
            "the archive's snapshot format is {format} and this cela reads {FORMAT}"
        )));
    }
    // (A manifest that parses has a format, which `format_of` just read: this one.)
    let mut m: Manifest =
        serde_json::from_slice(&bytes).map_err(|e| refuse(format!("{MANIFEST}: {e}")))?;
    let target = rename.map_or_else(|| m.name.clone(), str::to_owned);
    if !valid_name(&target) {
        return Err(InstanceError::BadName(target));
    }
    if snaps.dir(&target).exists() {
        return Err(InstanceError::Invalid(format!(
            "a snapshot named {target} exists already (import it with --name)"
        )));
    }
    // What the manifest lists bounds what follows.
    if m.engine != "qemu" && m.engine != "kvm" {
        return Err(refuse(format!(
            "it is of an engine this cela does not know, {:?}",
            m.engine
        )));
    }
    let wanted = files_of(&m.engine);
    let mut files = Vec::new();
    for &want in wanted {
        let listed: Vec<_> = m.files.iter().filter(|f| f.name == want).collect();
        let [f] = listed[..] else {
            return Err(refuse(format!(
                "its manifest lists {want} {} times",
                listed.len()
            )));
        };
        files.push(f.clone());
    }
    for f in &files {
        let well_formed =
            super::blocks::BlockDigest::parse(&f.digest).is_some_and(|d| d.to_string() == f.digest);
        if !well_formed {
            return Err(refuse(format!(
                "its manifest gives {} no block digest",
                f.name
            )));
        }
    }
    if m.files.len() != wanted.len() {
        return Err(refuse(
            "its manifest lists files other than those of its engine".into(),
        ));
    }
    // Guest RAM as the manifest says, which a restore here could give (no more than this
    // host has); the state may hold that and the slack.
    let ram = m.config.memory_mib.unwrap_or(512);
    let host = cela_vmm::config::host_memory_mib().unwrap_or(u64::MAX >> 20);
    if ram > host {
        return Err(refuse(format!(
            "its machine has {ram} MiB of RAM and this host {host} MiB"
        )));
    }
    let ram_bytes = ram.saturating_mul(1 << 20);
    // cela's monitor keeps RAM apart: its state is registers and device state only.
    let state_bound = match m.engine.as_str() {
        "kvm" => cela_vmm::persist::machine::MAX_STATE_BYTES,
        _ => ram_bytes.saturating_add(STATE_SLACK),
    };
    for f in &files {
        let (fits, bound) = match f.name.as_str() {
            STATE_FILE => (
                f.size <= state_bound,
                format!("{state_bound} bytes at most"),
            ),
            MEMORY_FILE => (
                f.size == ram_bytes,
                format!("the {ram_bytes} bytes of its RAM"),
            ),
            DISK_FILE => (
                f.size <= MAX_DISK,
                format!("{} TiB at most", MAX_DISK >> 40),
            ),
            _ => (false, "nothing".into()),
        };
        if !fits {
            return Err(refuse(format!(
                "its {} has {} bytes where a machine of {ram} MiB has {bound}",
                f.name, f.size
            )));
        }
    }

    let mut seen = vec![false; files.len()];
    while let Some(mut entry) = next_entry(&mut entries).map_err(refuse)? {
        let name = entry_name(&entry).map_err(refuse)?;
        let Some(i) = files.iter().position(|f| f.name == name) else {
            return Err(refuse(format!(
                "it holds {name:?}, which its manifest does not list"
            )));
        };
        if seen[i] {
            return Err(refuse(format!("it holds {name} twice")));
        }
        seen[i] = true;
        let f = &files[i];
        if entry.header().entry_type() != tar::EntryType::Regular {
            return Err(refuse(format!("{name} is not a regular file")));
        }
        if entry.size() != f.size {
            return Err(refuse(format!(
                "{name} has {} bytes where its manifest says {}",
                entry.size(),
                f.size
            )));
        }
        let path = tmp.join(&f.name);
        let digest = copy_sparse(&mut entry, &path, f.size, &dir_fd).map_err(|e| match e {
            CopyError::Read(e) => refuse(format!("{name}: {e}")),
            CopyError::Write(source) => InstanceError::Io {
                what: format!("writing {}", path.display()),
                source,
            },
        })?;
        if digest != f.digest {
            return Err(bad(
                &target,
                format!(
                    "{name}'s digest is {digest}, not {} as its manifest says (damaged or \
                     tampered with)",
                    f.digest
                ),
            ));
        }
    }
    if let Some(i) = seen.iter().position(|s| !s) {
        return Err(refuse(format!("it ends without {}", files[i].name)));
    }
    m.name = target.clone();
    // Paths on the host it came from name nothing of this one's: a restore here boots (on a
    // later cold start) this host's own kernel and initramfs.
    m.imported = true;
    if let Some(vm) = &mut m.config.vm {
        vm.kernel = Default::default();
        vm.initrd = Default::default();
        vm.image_disk = Default::default();
    }
    let bytes = serde_json::to_vec(&m).expect("a manifest serializes");
    if bytes.len() as u64 > MAX_MANIFEST {
        return Err(refuse(format!(
            "its manifest, renamed, is larger than {MAX_MANIFEST} bytes"
        )));
    }
    let mpath = tmp.join(MANIFEST);
    let mut out = File::create(&mpath).doing(|| format!("creating {}", mpath.display()))?;
    out.write_all(&bytes)
        .and_then(|_| out.sync_all())
        .doing(|| format!("writing {}", mpath.display()))?;
    // Every file was hashed as it was written: a restore need not read them again.
    super::Stamp::record(tmp, &m.files);
    // Published whole, under a name nobody took meanwhile.
    let dest = snaps.dir(&target);
    match rustix::fs::renameat_with(
        rustix::fs::CWD,
        tmp,
        rustix::fs::CWD,
        &dest,
        rustix::fs::RenameFlags::NOREPLACE,
    ) {
        Ok(()) => {}
        Err(rustix::io::Errno::EXIST | rustix::io::Errno::NOTEMPTY) => {
            return Err(InstanceError::Invalid(format!(
                "a snapshot named {target} exists already (import it with --name)"
            )));
        }
        Err(e) => {
            return Err(InstanceError::Io {
                what: format!("renaming {} to {}", tmp.display(), dest.display()),
                source: e.into(),
            });
        }
    }
    let _ = File::open(&snaps.root).and_then(|d| d.sync_all());
    Ok(m)
}

fn next_entry<'a, R: Read>(
    entries: &mut tar::Entries<'a, R>,
) -> Result<Option<tar::Entry<'a, R>>, String> {
    entries.next().transpose().map_err(|e| e.to_string())
}

/// An entry's path, which must be a plain file name.
fn entry_name<R: Read>(entry: &tar::Entry<'_, R>) -> Result<String, String> {
    let raw = entry.path_bytes();
    let name = std::str::from_utf8(&raw)
        .map_err(|_| "an entry's name is not UTF-8".to_owned())?
        .to_owned();
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(format!(
            "it holds {name:?}, which is not a snapshot file's name"
        ));
    }
    Ok(name)
}

/// Why a copy out of the archive stopped: the archive, or this host.
enum CopyError {
    Read(io::Error),
    Write(io::Error),
}

/// Writes `size` bytes of `from` to a new file `path`, all-zero chunks as holes, keeping the
/// store's reserve free (`dir` is on its file system); returns the bytes' block digest.
fn copy_sparse(
    from: &mut impl Read,
    path: &Path,
    size: u64,
    dir: &File,
) -> Result<String, CopyError> {
    use CopyError::{Read as R, Write as W};
    let mut out = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(W)?;
    let mut hasher = BlockHasher::new(io::sink());
    let mut buf = vec![0u8; CHUNK];
    // The first bytes written look at the free space at once.
    let (mut done, mut since_check) = (0u64, ROOM_CHECK);
    while done < size {
        let want = (size - done).min(CHUNK as u64) as usize;
        from.read_exact(&mut buf[..want]).map_err(R)?;
        if buf[..want].iter().all(|&b| b == 0) {
            hasher.zeros(want as u64);
            out.seek(SeekFrom::Current(want as i64)).map_err(W)?;
        } else {
            if since_check >= ROOM_CHECK {
                since_check = 0;
                if tar_limits::room(dir).map_err(W)? == 0 {
                    return Err(W(io::Error::other(format!(
                        "the snapshot store's file system has less than {} MiB free left",
                        tar_limits::RESERVE >> 20
                    ))));
                }
            }
            hasher.update(&buf[..want]);
            out.write_all(&buf[..want]).map_err(W)?;
            since_check += want as u64;
        }
        done += want as u64;
    }
    out.set_len(size).map_err(W)?;
    out.sync_all().map_err(W)?;
    let (digest, _) = hasher.finish();
    Ok(digest.to_string())
}

/// A reader that hashes what passes through it.
struct HashingReader<R> {
    inner: R,
    hasher: BlockHasher<io::Sink>,
}

impl<R: Read> HashingReader<R> {
    fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: BlockHasher::new(io::sink()),
        }
    }

    fn finish(self) -> (String, u64) {
        let (d, n) = self.hasher.finish();
        (d.to_string(), n)
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}
