//! Snapshots of microVM instances: a running VM's whole machine (memory, CPUs, devices) and
//! its disk written down, and new instances that go on from there (`cela snapshot`, `cela
//! restore`).
//!
//! ```text
//! <data>/snapshots/                 root's alone (0700)
//!   <NAME>/manifest.json            what it is (below), with the size and block digest of each file
//!   <NAME>/state.bin                the machine's state: QEMU's migration stream, or cela's
//!                                   own monitor's (cela_vmm::persist::machine, JSON)
//!   <NAME>/memory.bin               cela's monitor only: guest RAM, sparse, mapped on restore
//!   <NAME>/disk.raw                 the instance's disk as it was (a sparse or reflinked copy)
//!   .tmp-<NAME>-<pid>/              being written; renamed to <NAME> only when complete
//! ```
//!
//! A snapshot is taken by the instance's supervisor, which holds the machine ([`take`], through
//! its control socket, [`crate::control`]): the VM is paused, its state and disk are written
//! into a temporary directory, and the VM resumes (`--leave-running`) or ends as saved once the
//! snapshot is in place. Any failure before that removes the temporary directory and lets the
//! VM run on as before.
//!
//! A restore ([`restore`]) checks the manifest (its format, this cela's version, the engine
//! and, for QEMU, this host's QEMU build and TSC rate) and every file's size and digest
//! *before* it creates anything, then records a new instance with the source's settings and
//! a copy of the disk, and starts it: its supervisor loads the state instead of booting
//! (`restore.json` in the instance directory says from where, once). A restore that fails
//! removes the instance it made.
//!
//! Both engines take snapshots: the QEMU fallback through its own migration, cela's KVM monitor
//! through its control connection ([`cela_vmm::control`]), which writes the state and the RAM
//! into files the supervisor opens and passes it. A snapshot is tied to its engine. The state is
//! what a guest's machine was: it is only ever given back to a jailed QEMU of the build named
//! as the one that wrote it, or to a cela monitor of this version on a CPU that has every
//! feature the guest was offered; that monitor reads and checks the state (bounded, every part)
//! as root before it enters its jail, and the guest it restores runs jailed. A snapshot imported from elsewhere ([`archive`]) comes with its
//! own digests, which show it whole, not honest: its state reaches that jailed QEMU's loader
//! as whoever made it wrote it.

pub mod archive;
pub mod blocks;

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use blocks::{BlockDigest, BlockHasher};
use cela_vmm::control::MonitorControl;
use cela_vmm::persist::cpu::CpuSignature;
use cela_vmm::qemu::{QemuHandle, QemuVersion};
use serde::{Deserialize, Serialize};

use crate::error::{InstanceError, IoContext};
use crate::record::{Instance, InstanceConfig, Instances, Kind, now, private_dir, valid_name};
use crate::{NetMode, ops};

/// The manifest format this cela writes and reads.
pub const FORMAT: u32 = 2;
/// The largest manifest read.
const MAX_MANIFEST: u64 = 1 << 20;
/// The files of a snapshot.
pub const STATE_FILE: &str = "state.bin";
pub const MEMORY_FILE: &str = "memory.bin";
pub const DISK_FILE: &str = "disk.raw";

/// The files a snapshot of `engine` holds, in the order they are written and archived.
pub fn files_of(engine: &str) -> &'static [&'static str] {
    match engine {
        "kvm" => &[STATE_FILE, MEMORY_FILE, DISK_FILE],
        _ => &[STATE_FILE, DISK_FILE],
    }
}
// What a saved state may hold beyond guest RAM: the bound the QEMU engine puts on a save.
use cela_vmm::qemu::migrate::STATE_SLACK;
/// The TSC rate a restoring host may differ by (a guest calibrated its clock against it).
const TSC_TOLERANCE: f64 = 0.005;

/// What a snapshot holds and needs; `manifest.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub name: String,
    /// The cela that wrote it; another one does not restore it.
    pub cela_version: String,
    /// `kvm` (cela's own monitor) or `qemu`.
    pub engine: String,
    /// The QEMU build that wrote the state.
    pub qemu: Option<QemuVersion>,
    /// cela's monitor: the CPU features its guest was offered.
    #[serde(default)]
    pub cpu: Option<CpuSignature>,
    /// The TSC rate the guest was booted with (kHz).
    pub tsc_khz: u64,
    /// RFC 3339.
    pub created: String,
    /// The instance it was taken of.
    pub source: Source,
    /// Its settings, which a restored instance takes over.
    pub config: InstanceConfig,
    pub files: Vec<FileDigest>,
    /// It came from another host (`snapshot import`): what it asks for that reaches this host
    /// (a network link) is given only when the restore asks for it too.
    #[serde(default)]
    pub imported: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Source {
    pub id: String,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    pub name: String,
    pub size: u64,
    /// Its [`blocks::BlockDigest`] (`sha256-blocks:HEX`).
    pub digest: String,
}

/// The `format` of a manifest's bytes, read before the rest: a manifest of another format may
/// not parse as this one, and should be refused for its format, not called damaged.
pub(crate) fn format_of(bytes: &[u8]) -> Option<u32> {
    #[derive(Deserialize)]
    struct Format {
        format: u32,
    }
    serde_json::from_slice::<Format>(bytes)
        .ok()
        .map(|f| f.format)
}

/// The snapshots under a data directory.
pub struct Snapshots {
    root: PathBuf,
}

fn bad(name: &str, why: impl std::fmt::Display) -> InstanceError {
    InstanceError::Corrupt {
        what: format!("snapshot {name}"),
        why: why.to_string(),
    }
}

impl Snapshots {
    /// Opens (creating) `<data>/snapshots`, and clears what interrupted snapshots left.
    pub fn open(data_dir: &Path) -> Result<Snapshots, InstanceError> {
        let root = data_dir.join("snapshots");
        private_dir(&root)?;
        let s = Snapshots { root };
        for e in fs::read_dir(&s.root).doing(|| format!("listing {}", s.root.display()))? {
            let Ok(e) = e else { continue };
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(rest) = name.strip_prefix(".tmp-") {
                // Only what no live process is writing: the suffix is the writer's pid.
                let pid = rest.rsplit('-').next().and_then(|p| p.parse::<i32>().ok());
                let alive = pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
                if !alive {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
        Ok(s)
    }

    pub fn dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Every snapshot, by name; one whose manifest cannot be read is left out with a warning.
    pub fn list(&self) -> Result<Vec<Manifest>, InstanceError> {
        let mut out = Vec::new();
        for e in fs::read_dir(&self.root).doing(|| format!("listing {}", self.root.display()))? {
            let Ok(e) = e else { continue };
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            match self.find(&name) {
                Ok(m) => out.push(m),
                Err(e) => tracing::warn!("{e}"),
            }
        }
        out.sort_by(|a, b| a.created.cmp(&b.created).then(a.name.cmp(&b.name)));
        Ok(out)
    }

    /// The manifest of the snapshot `name`.
    pub fn find(&self, name: &str) -> Result<Manifest, InstanceError> {
        if !valid_name(name) {
            return Err(InstanceError::BadName(name.to_owned()));
        }
        let path = self.dir(name).join("manifest.json");
        let f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(InstanceError::Invalid(format!(
                    "no such snapshot: {name} (see `cela snapshot ls`)"
                )));
            }
            Err(e) => return Err(e).doing(|| format!("opening {}", path.display())),
        };
        let mut bytes = Vec::new();
        io::Read::read_to_end(&mut io::Read::take(f, MAX_MANIFEST + 1), &mut bytes)
            .doing(|| format!("reading {}", path.display()))?;
        if bytes.len() as u64 > MAX_MANIFEST {
            return Err(bad(name, "its manifest is larger than 1 MiB"));
        }
        if let Some(format) = format_of(&bytes).filter(|f| *f != FORMAT) {
            return Err(InstanceError::Unsupported(format!(
                "snapshot {name} cannot be restored here: its format is {format} and this cela reads {FORMAT}"
            )));
        }
        let m: Manifest =
            serde_json::from_slice(&bytes).map_err(|e| bad(name, format!("its manifest: {e}")))?;
        if m.name != name {
            return Err(bad(name, format!("its manifest names it {:?}", m.name)));
        }
        Ok(m)
    }

    /// Removes the snapshot `name` (also one whose manifest is damaged).
    pub fn remove(&self, name: &str) -> Result<(), InstanceError> {
        if !valid_name(name) {
            return Err(InstanceError::BadName(name.to_owned()));
        }
        let dir = self.dir(name);
        if !dir.is_dir() {
            return Err(InstanceError::Invalid(format!(
                "no such snapshot: {name} (see `cela snapshot ls`)"
            )));
        }
        // Out of sight first, so a half-removed snapshot is never listed.
        let gone = self
            .root
            .join(format!(".tmp-removing-{name}-{}", std::process::id()));
        fs::rename(&dir, &gone).doing(|| format!("removing {}", dir.display()))?;
        fs::remove_dir_all(&gone).doing(|| format!("removing {}", gone.display()))
    }
}

/// What `cela snapshot` asks of an instance's supervisor.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotRequest {
    pub name: String,
    /// Resume the VM afterwards instead of ending it.
    pub leave_running: bool,
}

/// The name given to a snapshot taken without one: the instance's and the time.
pub fn default_name(instance: &str) -> String {
    let mut base: String = instance.chars().take(48).collect();
    base.push('-');
    base.push_str(&chrono::Utc::now().format("%Y%m%d-%H%M%S").to_string());
    base
}

/// Whether `inst` can be snapshotted at all (checked by the CLI before it asks, and by the
/// supervisor again).
pub fn check_snapshottable(inst: &Instance) -> Result<(), InstanceError> {
    if inst.config.kind != Kind::Vm {
        return Err(InstanceError::Unsupported(format!(
            "{} is a container: snapshots are of microVMs (`cela commit` makes an image of a container)",
            inst.config.name
        )));
    }
    // A VM on a named network is snapshotted as any other: a copy rejoins the network with an
    // address and MAC of its own, and its guest is moved to them on resume (`restore_checked`).
    // That move is of one card.
    if !inst.config.links.is_empty() {
        return Err(InstanceError::Unsupported(format!(
            "{} is at the end of lab links: a microVM on lab links cannot be snapshotted yet",
            inst.config.name
        )));
    }
    if inst.config.networks.len() > 1 {
        return Err(InstanceError::Unsupported(format!(
            "{} is on {} networks: a microVM with more than one network card cannot be snapshotted yet",
            inst.config.name,
            inst.config.networks.len()
        )));
    }
    Ok(())
}

/// The machine a supervisor holds, as a snapshot reaches it.
pub enum Machine {
    Qemu(QemuHandle),
    /// cela's own monitor, through its control connection (shared with the thread that
    /// passes the guest its names, [`crate::network::vm_hosts`]).
    Kvm(std::sync::Arc<MonitorControl>),
}

fn control_err(e: cela_vmm::control::ControlError) -> InstanceError {
    InstanceError::Other(format!("the snapshot failed: {e}"))
}

/// A paused machine: resumed when dropped, unless it was ended or resumed on purpose.
enum Held<'a> {
    Qemu(cela_vmm::qemu::Paused<'a>),
    Kvm(KvmPaused<'a>),
}

/// cela's monitor, paused through its control connection.
struct KvmPaused<'a> {
    control: &'a MonitorControl,
    done: bool,
}

impl Drop for KvmPaused<'_> {
    fn drop(&mut self) {
        if !self.done
            && let Err(e) = self.control.resume()
        {
            tracing::warn!("resuming the VM after a failed snapshot: {e}");
        }
    }
}

impl Held<'_> {
    fn resume(self) -> Result<(), InstanceError> {
        match self {
            Held::Qemu(p) => p.resume().map_err(Into::into),
            Held::Kvm(mut k) => {
                k.done = true;
                k.control.resume().map_err(control_err)
            }
        }
    }

    fn end(self) -> Result<(), InstanceError> {
        match self {
            Held::Qemu(p) => p.end().map_err(Into::into),
            Held::Kvm(mut k) => {
                k.done = true;
                k.control.end().map_err(control_err)
            }
        }
    }
}

/// Takes the snapshot `req` of `inst`, whose machine `machine` is: run by its supervisor.
pub fn take(
    data_dir: &Path,
    inst: &Instance,
    machine: &Machine,
    req: &SnapshotRequest,
) -> Result<Manifest, InstanceError> {
    check_snapshottable(inst)?;
    if !valid_name(&req.name) {
        return Err(InstanceError::BadName(req.name.clone()));
    }
    let snaps = Snapshots::open(data_dir)?;
    let dest = snaps.dir(&req.name);
    if dest.exists() {
        return Err(InstanceError::Invalid(format!(
            "a snapshot named {} exists already (remove it with `cela snapshot rm {}`, or choose another --name)",
            req.name, req.name
        )));
    }
    let tmp = snaps
        .root
        .join(format!(".tmp-{}-{}", req.name, std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    private_dir(&tmp)?;
    let result = write_snapshot(inst, machine, req, &tmp, &dest);
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result
}

fn create(path: &Path) -> Result<File, InstanceError> {
    File::create(path).doing(|| format!("creating {}", path.display()))
}

fn write_snapshot(
    inst: &Instance,
    machine: &Machine,
    req: &SnapshotRequest,
    tmp: &Path,
    dest: &Path,
) -> Result<Manifest, InstanceError> {
    let state_path = tmp.join(STATE_FILE);
    // What the guest was offered, asked before the machine is held.
    let cpu = match machine {
        Machine::Qemu(_) => None,
        Machine::Kvm(_) => {
            Some(cela_vmm::persist::cpu::host_signature().map_err(InstanceError::Other)?)
        }
    };
    // Resumed if anything below fails (its drop), or when asked; ended once published.
    let (mut held, state_digest) = match machine {
        Machine::Qemu(q) => {
            let mut paused = q.pause()?;
            let file = create(&state_path)?;
            let mut hashed = BlockHasher::new(io::BufWriter::with_capacity(1 << 20, file));
            paused.save_state(&mut hashed)?;
            let (digest, buf) = hashed.finish_into();
            let file = buf
                .into_inner()
                .map_err(|e| e.into_error())
                .doing(|| format!("writing {}", state_path.display()))?;
            file.sync_all()
                .doing(|| format!("syncing {}", state_path.display()))?;
            (Some(Held::Qemu(paused)), Some(digest))
        }
        Machine::Kvm(c) => {
            c.pause().map_err(control_err)?;
            let held = Held::Kvm(KvmPaused {
                control: c,
                done: false,
            });
            let state = create(&state_path)?;
            let memory = create(&tmp.join(MEMORY_FILE))?;
            c.save(&state, &memory).map_err(control_err)?;
            (Some(held), None)
        }
    };
    // The disk as the memory knows it: copied while the machine is paused.
    let disk_path = tmp.join(DISK_FILE);
    cela_image::ext4::copy_disk(&inst.dir.join("root.ext4"), &disk_path)?;
    // Still paused all along (a stop meanwhile let the machine write its disk again)?
    if let Some(Held::Kvm(k)) = &held {
        k.control.status().map_err(control_err)?;
    }
    if req.leave_running
        && let Some(h) = held.take()
    {
        h.resume()?;
    }
    let engine = match machine {
        Machine::Qemu(_) => "qemu",
        Machine::Kvm(_) => "kvm",
    };
    let mut files = Vec::new();
    for name in files_of(engine) {
        let (digest, size) = match (name, state_digest.clone()) {
            (&STATE_FILE, Some(d)) => d,
            _ => digest_file(&tmp.join(name))?,
        };
        files.push(FileDigest {
            name: (*name).into(),
            size,
            digest: digest.to_string(),
        });
    }
    let (qemu, tsc_khz) = match machine {
        Machine::Qemu(q) => (Some(q.version().clone()), q.tsc_khz),
        Machine::Kvm(_) => (None, cela_vmm::qemu::host_tsc_khz().unwrap_or(0)),
    };
    let manifest = Manifest {
        format: FORMAT,
        name: req.name.clone(),
        cela_version: env!("CARGO_PKG_VERSION").to_owned(),
        engine: engine.into(),
        qemu,
        cpu,
        tsc_khz,
        created: now(),
        source: Source {
            id: inst.config.id.clone(),
            name: inst.config.name.clone(),
        },
        config: inst.config.clone(),
        files,
        imported: false,
    };
    let mpath = tmp.join("manifest.json");
    let mut f = File::create(&mpath).doing(|| format!("creating {}", mpath.display()))?;
    f.write_all(&serde_json::to_vec_pretty(&manifest).expect("a manifest serializes"))
        .and_then(|_| f.sync_all())
        .doing(|| format!("writing {}", mpath.display()))?;
    // Their digests were just taken from what is on disk: a restore need not read them again.
    Stamp::record(tmp, &manifest.files);
    // Published whole, or not at all; a name taken meanwhile is not overwritten.
    if dest.exists() {
        return Err(InstanceError::Invalid(format!(
            "a snapshot named {} exists already",
            req.name
        )));
    }
    fs::rename(tmp, dest).doing(|| format!("renaming {} to {}", tmp.display(), dest.display()))?;
    if let Some(dir) = dest.parent() {
        let _ = File::open(dir).and_then(|d| d.sync_all());
    }
    crate::events::record(inst, "checkpoint", &[("snapshot", req.name.clone())]);
    if let Some(h) = held {
        h.end()?;
    }
    Ok(manifest)
}

fn digest_file(path: &Path) -> Result<(BlockDigest, u64), InstanceError> {
    let f = File::open(path).doing(|| format!("opening {}", path.display()))?;
    blocks::of_file(&f).doing(|| format!("reading {}", path.display()))
}

impl Manifest {
    /// Whether this host and this cela can restore the snapshot; the refusal names what
    /// differs.
    pub fn check_restorable(&self) -> Result<(), InstanceError> {
        let refuse = |why: String| {
            Err(InstanceError::Unsupported(format!(
                "snapshot {} cannot be restored here: {why}",
                self.name
            )))
        };
        if self.format != FORMAT {
            return refuse(format!(
                "its format is {} and this cela reads {FORMAT}",
                self.format
            ));
        }
        let me = env!("CARGO_PKG_VERSION");
        if self.cela_version != me {
            return refuse(format!(
                "it was written by cela {} and this is cela {me}",
                self.cela_version
            ));
        }
        match self.engine.as_str() {
            "qemu" => self.check_qemu_here(&refuse)?,
            "kvm" => {
                cela_vmm::engine::kvm_can_boot_linux()
                    .or_else(|why| refuse(format!("it is of cela's KVM engine, and {why}")))?;
                let Some(saved) = &self.cpu else {
                    return Err(bad(
                        &self.name,
                        "its manifest does not say which CPU features its guest was offered",
                    ));
                };
                match cela_vmm::persist::cpu::host_signature() {
                    Ok(here) => here.check_covers(saved).or_else(refuse)?,
                    Err(e) => refuse(e)?,
                }
            }
            other => {
                return refuse(format!(
                    "it is of an engine this cela does not know, {other:?}"
                ));
            }
        }
        if self.config.kind != Kind::Vm || self.config.vm.is_none() {
            return Err(bad(&self.name, "its instance is not a microVM"));
        }
        if !matches!(self.config.net, NetMode::None | NetMode::Auto)
            || !self.config.volumes.is_empty()
        {
            return Err(bad(
                &self.name,
                "its instance has a host network or volumes, which snapshots do not carry",
            ));
        }
        if self.config.networks.len() > 1 {
            return Err(bad(&self.name, "a microVM joins at most one network"));
        }
        Ok(())
    }

    /// The QEMU engine's conditions: this host's QEMU build is the one that saved it, and its
    /// TSC runs at the rate the guest calibrated against.
    fn check_qemu_here(
        &self,
        refuse: &dyn Fn(String) -> Result<(), InstanceError>,
    ) -> Result<(), InstanceError> {
        let host = qemu_version_here().map_err(|e| {
            InstanceError::Unsupported(format!(
                "snapshot {} cannot be restored here: {e}",
                self.name
            ))
        })?;
        let Some(q) = &self.qemu else {
            return Err(bad(
                &self.name,
                "its manifest does not say which QEMU saved it",
            ));
        };
        if !same_qemu(q, &host) {
            return refuse(format!(
                "it was saved by QEMU {q} and this host has QEMU {}",
                host_display(&host)
            ));
        }
        if self.tsc_khz == 0 {
            return Err(bad(&self.name, "its manifest does not give its TSC rate"));
        }
        if let Some(khz) = cela_vmm::qemu::host_tsc_khz() {
            let diff = (khz as f64 - self.tsc_khz as f64).abs() / self.tsc_khz as f64;
            if diff > TSC_TOLERANCE {
                return refuse(format!(
                    "its guest's clock runs at the TSC rate of its host, {} kHz, and this host's is {khz} kHz",
                    self.tsc_khz
                ));
            }
        }
        Ok(())
    }

    /// Checks every file's size and digest; names the first that differs.
    /// A file checked before and not changed since (its stamp in [`VERIFIED`] matches: same
    /// inode, size, change and modification times) is not read again; every other one is,
    /// and the stamps are written anew.
    pub fn verify(&self, dir: &Path) -> Result<(), InstanceError> {
        let stamps = Stamp::read_all(dir);
        let mut fresh = Vec::new();
        let wanted = files_of(&self.engine);
        for want in wanted {
            if !self.files.iter().any(|f| f.name == *want) {
                return Err(bad(&self.name, format!("its manifest lists no {want}")));
            }
        }
        for f in &self.files {
            if !wanted.contains(&f.name.as_str()) {
                return Err(bad(&self.name, format!("its manifest lists {:?}", f.name)));
            }
            let path = dir.join(&f.name);
            let meta = fs::symlink_metadata(&path)
                .map_err(|e| bad(&self.name, format!("{}: {e}", f.name)))?;
            if !meta.is_file() {
                return Err(bad(&self.name, format!("{} is not a regular file", f.name)));
            }
            if meta.len() != f.size {
                return Err(bad(
                    &self.name,
                    format!(
                        "{} has {} bytes where its manifest says {} (truncated or damaged)",
                        f.name,
                        meta.len(),
                        f.size
                    ),
                ));
            }
            if stamps
                .iter()
                .any(|st| st.vouches_for(&Stamp::of(&f.name, &meta, &f.digest)))
            {
                // Read whole with this digest before, and not changed since.
                fresh.push(Stamp::of(&f.name, &meta, &f.digest));
                continue;
            }
            let (d, _) = digest_file(&path)?;
            if d.to_string() != f.digest {
                return Err(bad(
                    &self.name,
                    format!(
                        "{}'s digest is {d}, not {} as its manifest says (damaged or tampered with)",
                        f.name, f.digest
                    ),
                ));
            }
            fresh.push(Stamp::of(&f.name, &meta, &f.digest));
        }
        // Kept as they were where they still vouch, so a stamp keeps its first time.
        let keep: Vec<Stamp> = fresh
            .into_iter()
            .map(|f| {
                stamps
                    .iter()
                    .find(|st| st.vouches_for(&f))
                    .cloned()
                    .unwrap_or(f)
            })
            .collect();
        if keep != stamps {
            Stamp::write_all(dir, &keep);
        }
        Ok(())
    }
}

/// The stamps of a snapshot's files as last verified, in its directory (root's, like the
/// rest; not in the manifest, not exported).
pub const VERIFIED: &str = ".verified.json";

/// A file as it was when its digest was last found to be the manifest's. A file written
/// since has another change time (which no one can set back), so its stamp no longer matches.
/// The kernel keeps that time at the granularity of its clock tick, so a stamp taken within
/// [`STAMP_SETTLE`] of the file's last change vouches for nothing (a write in the same tick
/// would not show).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    name: String,
    size: u64,
    ino: u64,
    ctime_ns: i128,
    mtime_ns: i128,
    digest: String,
    /// When it was taken (the real-time clock, as the change time is).
    at_ns: i128,
}

/// How long after a file's last change a stamp of it must be taken to count.
const STAMP_SETTLE_NS: i128 = 100_000_000;

impl Stamp {
    fn of(name: &str, meta: &fs::Metadata, digest: &str) -> Stamp {
        use std::os::unix::fs::MetadataExt;
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Stamp {
            name: name.to_owned(),
            size: meta.len(),
            ino: meta.ino(),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            digest: digest.to_owned(),
            at_ns: now.as_nanos() as i128,
        }
    }

    /// Whether this stamp shows the file `now` describes unchanged since it was verified.
    fn vouches_for(&self, now: &Stamp) -> bool {
        self.at_ns - self.ctime_ns > STAMP_SETTLE_NS
            && (
                &self.name,
                self.size,
                self.ino,
                self.ctime_ns,
                self.mtime_ns,
                &self.digest,
            ) == (
                &now.name,
                now.size,
                now.ino,
                now.ctime_ns,
                now.mtime_ns,
                &now.digest,
            )
    }

    /// The stamps in `dir` (none when missing, unreadable or past 64 KiB).
    fn read_all(dir: &Path) -> Vec<Stamp> {
        let Ok(f) = File::open(dir.join(VERIFIED)) else {
            return Vec::new();
        };
        let mut bytes = Vec::new();
        if io::Read::read_to_end(&mut io::Read::take(f, 64 << 10), &mut bytes).is_err() {
            return Vec::new();
        }
        serde_json::from_slice(&bytes).unwrap_or_default()
    }

    /// Records `stamps` for the files of the snapshot in `dir` (best effort: without them
    /// the next restore reads the files again).
    fn write_all(dir: &Path, stamps: &[Stamp]) {
        let tmp = dir.join(format!("{VERIFIED}.{}", std::process::id()));
        let written = fs::write(&tmp, serde_json::to_vec(stamps).expect("stamps serialize"))
            .and_then(|()| fs::rename(&tmp, dir.join(VERIFIED)));
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            tracing::debug!("recording the verified files of {}: {e}", dir.display());
        }
    }

    /// Stamps the files `files` in `dir`, whose digests were just computed as they were written.
    pub fn record(dir: &Path, files: &[FileDigest]) {
        let mut stamps = Vec::new();
        for f in files {
            match fs::symlink_metadata(dir.join(&f.name)) {
                Ok(meta) => stamps.push(Stamp::of(&f.name, &meta, &f.digest)),
                Err(_) => return,
            }
        }
        Stamp::write_all(dir, &stamps);
    }
}

/// The QEMU build of this host, as its monitor would greet (the version line of `--version`:
/// `QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)`).
fn qemu_version_here() -> Result<(u64, u64, u64, String), String> {
    let binary = cela_vmm::qemu::available().map_err(|e| e.to_string())?;
    let out = std::process::Command::new(&binary)
        .arg("--version")
        .output()
        .map_err(|e| format!("running {} --version: {e}", binary.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().next().unwrap_or("");
    let rest = line
        .strip_prefix("QEMU emulator version ")
        .ok_or_else(|| format!("unexpected QEMU version line {line:?}"))?;
    let (num, package) = match rest.split_once(' ') {
        Some((n, p)) => (n, p.trim().trim_start_matches('(').trim_end_matches(')')),
        None => (rest, ""),
    };
    let mut parts = num.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
    Ok((
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        package.to_owned(),
    ))
}

fn same_qemu(q: &QemuVersion, host: &(u64, u64, u64, String)) -> bool {
    (q.major, q.minor, q.micro) == (host.0, host.1, host.2) && q.package.trim() == host.3.trim()
}

fn host_display(h: &(u64, u64, u64, String)) -> String {
    format!("{}.{}.{} ({})", h.0, h.1, h.2, h.3)
}

/// What `cela restore` asks.
#[derive(Debug, Clone, Default)]
pub struct RestoreRequest {
    pub snapshot: String,
    /// The new instance's name; one is made up without it.
    pub name: Option<String>,
    /// Removed when it ends (`--rm`).
    pub auto_remove: bool,
    /// `--net`; `None` is the snapshot's own. A restore cannot add or remove the machine's
    /// network card, so another mode than the snapshot's is refused (but a VM from a named
    /// network may be moved onto an `auto` link).
    pub net: Option<NetMode>,
}

/// Where a restored instance's supervisor finds its state (`restore.json`, read once).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PendingRestore {
    /// The snapshot's directory.
    pub snapshot: PathBuf,
    /// The engine that saved it, and so runs it (`qemu` when absent: written before cela's
    /// monitor took snapshots).
    #[serde(default)]
    pub engine: Option<String>,
    pub qemu: Option<QemuVersion>,
}

const PENDING: &str = "restore.json";

/// The restore the supervisor of `inst` is to make instead of booting, if any.
pub fn pending_restore(inst: &Instance) -> Result<Option<PendingRestore>, InstanceError> {
    let path = inst.dir.join(PENDING);
    match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| InstanceError::Corrupt {
                what: path.display().to_string(),
                why: e.to_string(),
            }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).doing(|| format!("reading {}", path.display())),
    }
}

/// The restore is done (the machine runs): a later start boots the disk.
pub fn restore_done(inst: &Instance) {
    let _ = fs::remove_file(inst.dir.join(PENDING));
}

/// Makes a new instance from the snapshot `req` names and starts it; a failure removes it.
pub fn restore(data_dir: &Path, req: &RestoreRequest) -> Result<Instance, InstanceError> {
    let snaps = Snapshots::open(data_dir)?;
    let manifest = snaps.find(&req.snapshot)?;
    manifest.check_restorable()?;
    check_net(&manifest, req.net)?;
    let dir = snaps.dir(&req.snapshot);
    manifest.verify(&dir)?;
    restore_checked(data_dir, &manifest, &dir, req)
}

/// Whether a restore asking for `net` (`None`: the snapshot's own) can have it: a restore
/// cannot add or remove the machine's network card, and an imported snapshot gets a link to
/// this host only when the restore asks for one by name.
fn check_net(manifest: &Manifest, net: Option<NetMode>) -> Result<(), InstanceError> {
    let saved = manifest.config.net;
    if let Some(network) = manifest.config.networks.first() {
        // Its card was on a named network: a copy rejoins it (by name, on this host), or
        // takes a link of its own to the host with `--net auto`. One from another host joins
        // a network here only when asked: a network of that name here is not the one it
        // left.
        return match net {
            None if manifest.imported => Err(InstanceError::Invalid(format!(
                "snapshot {} came from another host, where it was on network {}: restore it with --net auto to give it a link to this host",
                manifest.name, network.network
            ))),
            None | Some(NetMode::Auto) => Ok(()),
            Some(other) => Err(InstanceError::Invalid(format!(
                "snapshot {} is of a microVM on network {}, and a restore cannot remove its network card (--net {}): restore it as it is, or with --net auto",
                manifest.name,
                network.network,
                other.as_str()
            ))),
        };
    }
    if let Some(net) = net.filter(|n| *n != saved) {
        return Err(InstanceError::Invalid(format!(
            "snapshot {} is of a microVM with --net {}, and a restore cannot {} its network card: restore it with --net {}",
            manifest.name,
            saved.as_str(),
            if net == NetMode::None {
                "remove"
            } else {
                "add"
            },
            saved.as_str(),
        )));
    }
    if manifest.imported && saved == NetMode::Auto && net.is_none() {
        return Err(InstanceError::Invalid(format!(
            "snapshot {} came from another host and has a network card: restore it with --net auto to give it a link to this host",
            manifest.name
        )));
    }
    Ok(())
}

/// [`restore`] of a snapshot already found, checked and verified.
fn restore_checked(
    data_dir: &Path,
    manifest: &Manifest,
    dir: &Path,
    req: &RestoreRequest,
) -> Result<Instance, InstanceError> {
    let dir = dir.to_owned();
    // What the workload is comes from the manifest; how the machine is confined comes from
    // this host: the jail always. What it is given to read (a restore reads neither; a later
    // cold start boots them) is the source instance's kernel and initramfs when the snapshot
    // was taken here and they are still there, else this host's defaults (an imported
    // manifest names none: see `archive`).
    let vm = manifest.config.vm.as_ref();
    let local = vm.filter(|v| v.kernel.is_file() && v.initrd.is_file());
    let (kernel, initrd) = match local {
        Some(v) => (v.kernel.clone(), v.initrd.clone()),
        None => {
            let assets = cela_assets::default_guest_assets(
                &data_dir.join("assets"),
                &cela_assets::Progress::hidden(),
            )?;
            (assets.kernel, assets.initrd)
        }
    };
    let source = &manifest.config;
    // `--net auto` moves a copy of a VM on a network onto a link of its own (`check_net`);
    // otherwise it rejoins the source's networks by name, never with the source's address
    // or MAC, which the source (or another copy) holds.
    let (net, networks) = match req.net {
        Some(NetMode::Auto) if !source.networks.is_empty() => (NetMode::Auto, Vec::new()),
        _ => (
            source.net,
            source
                .networks
                .iter()
                .map(|a| crate::network::named::Attachment {
                    network: a.network.clone(),
                    ip: None,
                    mac: None,
                })
                .collect(),
        ),
    };
    if !networks.is_empty() {
        let nets = crate::network::named::Networks::open(data_dir)?;
        nets.ensure_builtin(&networks)?;
        crate::network::named::check_attachments(data_dir, Kind::Vm, net, &networks)?;
    }
    let config = InstanceConfig {
        id: String::new(),
        name: req.name.clone().unwrap_or_default(),
        kind: Kind::Vm,
        created: now(),
        auto_remove: req.auto_remove,
        // Its labels go with it (a lab node's copy is the lab's, taken down with it), but not
        // those of a snapshot from another host, which could name a lab of this one.
        labels: if manifest.imported {
            Default::default()
        } else {
            source.labels.clone()
        },
        volumes: Vec::new(),
        // A copy gets a link of its own (a TAP, MAC and /30 made when it starts, or an
        // address and MAC of its own on the source's network), which its guest is told to
        // take on resume.
        net,
        // A host port is one instance's: copies do not publish the source's.
        ports: Vec::new(),
        networks,
        // Snapshots are not taken of a VM on lab links.
        links: Vec::new(),
        security: Default::default(),
        vm: Some(crate::record::VmBoot {
            kernel,
            initrd,
            image_disk: PathBuf::new(),
            confine: true,
        }),
        ..source.clone()
    };
    let inst = Instances::open(data_dir)?.create(config)?;
    crate::events::record(&inst, "create", &[("snapshot", manifest.name.clone())]);
    // A panic while the copy is made is a failure like any other: the copy is removed.
    let made = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        File::create(inst.log_path())
            .doing(|| format!("creating {}", inst.log_path().display()))?;
        let disk = inst.dir.join("root.ext4");
        cela_image::ext4::copy_disk(&dir.join(DISK_FILE), &disk)?;
        let pending = PendingRestore {
            snapshot: dir.clone(),
            engine: Some(manifest.engine.clone()),
            qemu: manifest.qemu.clone(),
        };
        let path = inst.dir.join(PENDING);
        fs::write(&path, serde_json::to_vec(&pending).expect("serializes"))
            .doing(|| format!("writing {}", path.display()))?;
        let state = crate::run::start(data_dir, &inst)?;
        if state.status != crate::record::Status::Running {
            return Err(InstanceError::NotStarted {
                name: inst.config.name.clone(),
                why: state.error.unwrap_or_else(|| {
                    format!(
                        "it ended at once after its restore{}",
                        if inst.dir.exists() {
                            ""
                        } else {
                            " (and was removed: --rm)"
                        }
                    )
                }),
            });
        }
        Ok(())
    }))
    .unwrap_or_else(|_| {
        Err(InstanceError::Other(
            "restoring it failed unexpectedly (a bug: see the log)".into(),
        ))
    });
    if let Err(e) = made {
        let _ = ops::remove(&inst, true);
        return Err(e);
    }
    Ok(inst)
}

/// How many copies a fork starts at once.
const FORK_WORKERS: u32 = 4;

/// `cela fork`: `count` running copies of the running VM `inst`, named `PREFIX-1`…, which runs
/// on. Under cela's monitor every copy maps the saved RAM privately, so the pages none of them
/// has written are the page cache's, once for all; under QEMU each copy loads the saved state
/// (no memory is shared). The snapshot they come from is removed once they run (a mapped file
/// stays while mapped). A failure removes every copy made.
pub fn fork(
    data_dir: &Path,
    inst: &Instance,
    count: u32,
    prefix: Option<&str>,
) -> Result<Vec<Instance>, InstanceError> {
    check_snapshottable(inst)?;
    if !(1..=64).contains(&count) {
        return Err(InstanceError::Invalid(format!(
            "fork makes 1 to 64 copies at once, not {count}"
        )));
    }
    let prefix = prefix.map_or_else(|| format!("{}-fork", inst.config.name), str::to_owned);
    // The longest name made must be valid too.
    if !valid_name(&format!("{prefix}-{count}")) {
        return Err(InstanceError::BadName(format!("{prefix}-{count}")));
    }
    // Hidden by nothing but its name; this process's pid keeps two forks apart.
    let name = default_name(&format!("fork{}", std::process::id()));
    let req = crate::control::Request::Snapshot(SnapshotRequest {
        name: name.clone(),
        leave_running: true,
    });
    let manifest = match crate::control::request(inst, &req, crate::control::SNAPSHOT_BOUND)? {
        crate::control::Reply::Snapshot(m) => *m,
        crate::control::Reply::Error(e) => return Err(InstanceError::Other(e)),
    };
    let snaps = Snapshots::open(data_dir)?;
    let dir = snaps.dir(&name);
    let made = (|| {
        manifest.check_restorable()?;
        manifest.verify(&dir)?;
        // A few at a time: each start waits on its supervisor and monitor, which the others
        // can use the time of (more at once only queue for the CPUs and near start's bound).
        let next = std::sync::atomic::AtomicU32::new(1);
        let results = std::sync::Mutex::new(Vec::new());
        let work = || {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i > count {
                    return;
                }
                let req = RestoreRequest {
                    snapshot: name.clone(),
                    name: Some(format!("{prefix}-{i}")),
                    auto_remove: false,
                    net: None,
                };
                // A panic inside is an error there (its copy removed), not one here.
                let made = restore_checked(data_dir, &manifest, &dir, &req);
                let failed = made.is_err();
                results
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((i, made));
                if failed {
                    // The others finish what they started; nothing new is begun.
                    next.store(count + 1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        };
        std::thread::scope(|s| {
            let started = (0..FORK_WORKERS.min(count))
                .filter(|_| std::thread::Builder::new().spawn_scoped(s, work).is_ok())
                .count();
            // No thread to be had (a pid limit): the copies are made here, one by one.
            if started == 0 {
                work();
            }
        });
        let mut results = results.into_inner().unwrap_or_else(|e| e.into_inner());
        results.sort_by_key(|(i, _)| *i);
        let (made, failed): (Vec<_>, Vec<_>) = results.into_iter().partition(|(_, r)| r.is_ok());
        let made: Vec<Instance> = made.into_iter().filter_map(|(_, r)| r.ok()).collect();
        if let Some((_, Err(e))) = failed.into_iter().next() {
            for copy in &made {
                let _ = ops::remove(copy, true);
            }
            return Err(e);
        }
        Ok(made)
    })();
    // The copies have loaded it; they keep nothing of the snapshot but their disks.
    let _ = snaps.remove(&name);
    made
}

#[cfg(test)]
mod tests;
