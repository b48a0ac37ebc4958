//! Instances on disk: each has a directory under `<data>/instances/<id>/` holding what was
//! asked (`config.json`, written once) and what is happening (`state.json`, rewritten by the
//! supervisor at each change). Both are written atomically (a temp file, then rename), so a
//! crash never leaves half a record; names are made unique under a lock on the instances
//! directory. The state is the truth on disk, checked against the kernel when read: a state
//! that says "running" whose supervisor process is gone is reported as crashed.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{InstanceError, IoContext};
use crate::network::{NetMode, NetworkState};
use crate::security::Security;

/// What kind of isolation runs an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Container,
    Vm,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::Container => "container",
            Kind::Vm => "vm",
        })
    }
}

/// A bind mount into a container (`-v HOST:DEST[:ro]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    pub host: PathBuf,
    pub dest: String,
    pub read_only: bool,
}

impl Volume {
    /// Parses `HOST:DEST[:ro]`; HOST must be an absolute path that exists, DEST absolute.
    pub fn parse(arg: &str) -> Result<Volume, InstanceError> {
        let bad = |why: &str| InstanceError::Other(format!("-v {arg}: {why}"));
        let (rest, read_only) = match arg.strip_suffix(":ro") {
            Some(r) => (r, true),
            None => (arg.strip_suffix(":rw").unwrap_or(arg), false),
        };
        let (host, dest) = rest
            .split_once(':')
            .ok_or_else(|| bad("expected HOST:DEST[:ro]"))?;
        if !host.starts_with('/') || !dest.starts_with('/') {
            return Err(bad("both paths must be absolute"));
        }
        if dest.split('/').any(|c| c == ".." || c == ".") {
            return Err(bad("the destination may not contain `.` or `..`"));
        }
        // The runtime mounts these itself; a volume over them would hide or replace what
        // confines the container (runc refuses the same).
        let normal: String = dest
            .split('/')
            .filter(|c| !c.is_empty())
            .fold(String::new(), |p, c| p + "/" + c);
        let reserved = normal.is_empty()
            || ["/proc", "/sys"]
                .iter()
                .any(|r| normal == *r || normal.starts_with(&format!("{r}/")))
            || ["/dev", "/dev/pts", "/dev/shm", "/dev/mqueue"].contains(&normal.as_str());
        if reserved {
            return Err(bad(&format!(
                "{dest} may not be a volume's destination (/, /proc, /sys and /dev are the runtime's)"
            )));
        }
        if !Path::new(host).exists() {
            return Err(bad(&format!("{host} does not exist")));
        }
        Ok(Volume {
            host: host.into(),
            dest: dest.into(),
            read_only,
        })
    }
}

/// What a microVM instance boots (resolved when the instance is created).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmBoot {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The image flattened into an ext4 disk (cached by image digest, shared, read-only).
    pub image_disk: PathBuf,
    /// The monitor runs under its seccomp filters (`--no-confine` turns them off).
    #[serde(default = "confined")]
    pub confine: bool,
}

fn confined() -> bool {
    true
}

/// What the user asked for; written once when the instance is created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceConfig {
    pub id: String,
    pub name: String,
    pub kind: Kind,
    /// The image as the user named it, and its manifest digest.
    pub image: String,
    pub image_digest: String,
    /// The full command line (the image's entrypoint and cmd, or the user's command).
    pub command: Vec<String>,
    /// `KEY=VALUE`: the image's environment, then the user's.
    pub env: Vec<String>,
    pub workdir: Option<String>,
    /// `uid[:gid]` or a user name of the image.
    pub user: Option<String>,
    /// vCPUs of a VM; CPU limit (in CPUs) of a container.
    pub cpus: Option<u32>,
    /// Guest RAM of a VM; memory limit of a container.
    pub memory_mib: Option<u64>,
    pub volumes: Vec<Volume>,
    /// Removed when it ends (`--rm`).
    pub auto_remove: bool,
    /// RFC 3339.
    pub created: String,
    pub vm: Option<VmBoot>,
    /// `--net` (configs written before it existed read as `none`, which they had).
    #[serde(default)]
    pub net: NetMode,
    /// `--net NAME[,ip=…][,mac=…]`: the named networks it joins, in order (`eth0`, `eth1`, …).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub networks: Vec<crate::network::named::Attachment>,
    /// A lab's vm node: its ends of the lab's links, a network card each after its networks'.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<crate::lab::link::VmEnd>,
    /// `-p`: ports of the host published to the instance's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<crate::network::ports::PortMapping>,
    /// How a container is confined beyond its namespaces: capabilities and seccomp.
    #[serde(default)]
    pub security: Security,
    /// The workload's stdin is a pipe fed through the attach socket (`-i`; else /dev/null).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stdin: bool,
    /// The workload runs on a terminal whose input comes through the attach socket (`-t`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tty: bool,
    /// The terminal's rows and columns when the workload starts (the client's own, so the
    /// first thing the workload reads is its real size, not 0x0 until a resize arrives).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terminal_size: Option<(u16, u16)>,
    /// The caller's key/value labels (the Docker API's `Labels`), for filtering.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
}

/// Where an instance is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Recorded, its supervisor not yet running the workload.
    Created,
    Running,
    /// The workload ended (its exit code is in the state).
    Exited,
    /// The supervisor died without recording an end (killed, or the machine went down).
    Crashed,
    /// The record cannot be read (a corrupt or missing `state.json` or `config.json`): shown
    /// with the error, removable with `rm -f`; never written.
    Unknown,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Status::Created => "created",
            Status::Running => "running",
            Status::Exited => "exited",
            Status::Crashed => "crashed",
            Status::Unknown => "unknown",
        })
    }
}

/// A process, told apart from a later one with the same pid by its start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessId {
    pub pid: i32,
    /// Field 22 of /proc/PID/stat (clock ticks since boot).
    pub start_time: u64,
}

impl ProcessId {
    pub fn of(pid: i32) -> Option<ProcessId> {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let (_, rest) = stat.rsplit_once(')')?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // After the command name: state is field 3, starttime field 22.
        if fields.first() == Some(&"Z") {
            return None;
        }
        Some(ProcessId {
            pid,
            start_time: fields.get(19)?.parse().ok()?,
        })
    }

    pub fn current() -> ProcessId {
        ProcessId::of(std::process::id() as i32).expect("/proc/self/stat is readable")
    }

    /// The same process still exists (and is not a zombie).
    pub fn alive(&self) -> bool {
        ProcessId::of(self.pid) == Some(*self)
    }
}

/// What is happening; rewritten by the supervisor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceState {
    pub status: Status,
    /// The process that runs the workload and records its end.
    pub supervisor: Option<ProcessId>,
    /// The workload's main process on the host (a container's init; the VMM for a VM).
    pub pid: Option<i32>,
    pub exit_code: Option<i32>,
    pub started: Option<String>,
    pub finished: Option<String>,
    /// Why the instance could not run or ended abnormally, if it says.
    pub error: Option<String>,
    /// A microVM's engine in its last run: `kvm` (cela's monitor) or `qemu` (the fallback).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<String>,
    /// The link `--net auto` made, while it exists.
    #[serde(default)]
    pub network: Option<NetworkState>,
}

impl InstanceState {
    fn created() -> Self {
        InstanceState {
            status: Status::Created,
            supervisor: None,
            pid: None,
            exit_code: None,
            started: None,
            finished: None,
            error: None,
            engine: None,
            network: None,
        }
    }
}

/// Renames an instance directory to `.removing-<id>` beside it (see [`Instance::retire`]).
pub fn retire(dir: &Path) -> Result<PathBuf, InstanceError> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let to = dir.with_file_name(format!(".removing-{name}"));
    fs::rename(dir, &to).doing(|| format!("renaming {} to {}", dir.display(), to.display()))?;
    Ok(to)
}

/// The marker a removal leaves in an instance directory before it takes it apart: no
/// supervisor claims an instance that has it.
const REMOVING: &str = "removing";

/// The current time in RFC 3339, as every record writes it.
pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The instances directory of a data dir.
#[derive(Debug, Clone)]
pub struct Instances {
    root: PathBuf,
}

/// An instance directory whose config cannot be read: listed as `unknown` with the error.
#[derive(Debug, Clone)]
pub struct Broken {
    /// The directory's name, the instance's id.
    pub id: String,
    pub dir: PathBuf,
    /// Why its record cannot be read.
    pub error: String,
}

/// One instance: its directory and its config.
#[derive(Debug, Clone)]
pub struct Instance {
    pub dir: PathBuf,
    pub config: InstanceConfig,
}

pub(crate) fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

/// Creates `dir` (and its parents) if missing and makes it root's alone (0700): instance
/// directories hold containers' writable layers, in which a container may plant setuid files
/// and device nodes, so no other local user may reach them (Docker closes its data root the
/// same way). A directory another user owns is refused rather than taken over.
pub fn private_dir(dir: &Path) -> Result<(), InstanceError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .doing(|| format!("creating {}", dir.display()))?;
    let meta = fs::metadata(dir).doing(|| format!("reading {}", dir.display()))?;
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        return Err(InstanceError::Other(format!(
            "{} belongs to uid {}, not to this user (uid {me}): cela keeps its data in a directory of its own",
            dir.display(),
            meta.uid()
        )));
    }
    if meta.permissions().mode() & 0o7777 != 0o700 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .doing(|| format!("making {} private (0700)", dir.display()))?;
    }
    Ok(())
}

/// Whether `s` has the shape of an instance id (12 lowercase hex digits), so that it names a
/// directory under `instances/` and nothing else.
pub fn is_id(s: &str) -> bool {
    s.len() == 12
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// 12 random hex digits (the ids `cela ps` shows in full).
pub(crate) fn new_id() -> Result<String, InstanceError> {
    let mut bytes = [0u8; 6];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .doing(|| "reading /dev/urandom".into())?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Takes the lock of the instances directory `root` (`root/.lock`), held while names are
/// chosen and while a supervisor claims an instance or a removal marks one.
pub(crate) fn lock_in(root: &Path) -> Result<nix::fcntl::Flock<fs::File>, InstanceError> {
    let path = root.join(".lock");
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .doing(|| format!("opening {}", path.display()))?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, e)| {
        InstanceError::Io {
            what: format!("locking {}", path.display()),
            source: e.into(),
        }
    })
}

/// A directory of named JSON records — `DATA/networks`, `DATA/labs` — root's alone, each
/// `NAME.json`, changed under the directory's `.lock`, read bounded and without following a
/// link.
#[derive(Debug, Clone)]
pub(crate) struct JsonDir {
    pub root: PathBuf,
}

/// The largest record a [`JsonDir`] reads.
const MAX_JSON_RECORD: u64 = 4 << 20;

impl JsonDir {
    pub fn open(root: PathBuf) -> Result<JsonDir, InstanceError> {
        private_dir(&root)?;
        Ok(JsonDir { root })
    }

    pub fn lock(&self) -> Result<nix::fcntl::Flock<fs::File>, InstanceError> {
        lock_in(&self.root)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.root.join(format!("{name}.json"))
    }

    pub fn read<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, InstanceError> {
        use std::io::Read as _;
        use std::os::unix::fs::OpenOptionsExt;
        let mut bytes = Vec::new();
        fs::File::options()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .and_then(|f| f.take(MAX_JSON_RECORD).read_to_end(&mut bytes))
            .doing(|| format!("reading {}", path.display()))?;
        serde_json::from_slice(&bytes).map_err(|e| InstanceError::Corrupt {
            what: path.display().to_string(),
            why: e.to_string(),
        })
    }

    pub fn save(&self, name: &str, value: &impl Serialize) -> Result<(), InstanceError> {
        write_json(&self.path(name), value)
    }

    /// Every record whose name `valid` accepts, by name.
    pub fn list<T: serde::de::DeserializeOwned>(
        &self,
        valid: fn(&str) -> bool,
    ) -> Result<Vec<T>, InstanceError> {
        let mut names = Vec::new();
        for entry in
            fs::read_dir(&self.root).doing(|| format!("reading {}", self.root.display()))?
        {
            let Ok(entry) = entry else { continue };
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(stem) = name.strip_suffix(".json")
                && valid(stem)
            {
                names.push(stem.to_owned());
            }
        }
        names.sort();
        names.iter().map(|n| Self::read(&self.path(n))).collect()
    }
}

/// Writes `value` as JSON to `path` atomically.
pub(crate) fn write_json(path: &Path, value: &impl Serialize) -> Result<(), InstanceError> {
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec_pretty(value).expect("records serialize");
    (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })()
    .doing(|| format!("writing {}", path.display()))
}

pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, InstanceError> {
    let bytes = fs::read(path).doing(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&bytes).map_err(|e| InstanceError::Corrupt {
        what: path.display().to_string(),
        why: e.to_string(),
    })
}

impl Instances {
    pub fn open(data_dir: &Path) -> Result<Instances, InstanceError> {
        let root = data_dir.join("instances");
        private_dir(&root)?;
        Ok(Instances { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Records a new instance (state `created`). `config.id` is filled in; an empty
    /// `config.name` gets one made from the id.
    pub fn create(&self, mut config: InstanceConfig) -> Result<Instance, InstanceError> {
        let _lock = self.lock()?;
        config.id = new_id()?;
        if config.name.is_empty() {
            config.name = format!(
                "{}-{}",
                match config.kind {
                    Kind::Container => "ct",
                    Kind::Vm => "vm",
                },
                &config.id[..6]
            );
        }
        if !valid_name(&config.name) {
            return Err(InstanceError::BadName(config.name));
        }
        if self
            .scan_locked()?
            .0
            .iter()
            .any(|i| i.config.name == config.name)
        {
            return Err(InstanceError::NameTaken(config.name));
        }
        let dir = self.root.join(&config.id);
        fs::create_dir(&dir).doing(|| format!("creating {}", dir.display()))?;
        let inst = Instance { dir, config };
        let written = write_json(&inst.dir.join("config.json"), &inst.config)
            .and_then(|_| inst.save_state(&InstanceState::created()));
        if let Err(e) = written {
            let _ = fs::remove_dir_all(&inst.dir);
            return Err(e);
        }
        Ok(inst)
    }

    fn lock(&self) -> Result<nix::fcntl::Flock<fs::File>, InstanceError> {
        lock_in(&self.root)
    }

    /// Every instance with a readable config, oldest first.
    pub fn list(&self) -> Result<Vec<Instance>, InstanceError> {
        Ok(self.scan()?.0)
    }

    /// Every instance directory: those with a readable config (oldest first), and those
    /// without one ([`Broken`]), which `cela ps` lists as unknown and `rm -f` removes. Taken
    /// under the instances lock, so a directory being created is never seen half-made; one
    /// being removed was renamed to a hidden name first ([`Instance::retire`]).
    pub fn scan(&self) -> Result<(Vec<Instance>, Vec<Broken>), InstanceError> {
        let _lock = self.lock()?;
        self.scan_locked()
    }

    /// [`Instances::scan`] for a caller holding the lock.
    fn scan_locked(&self) -> Result<(Vec<Instance>, Vec<Broken>), InstanceError> {
        let (mut good, mut broken) = (Vec::new(), Vec::new());
        for entry in
            fs::read_dir(&self.root).doing(|| format!("reading {}", self.root.display()))?
        {
            let Ok(entry) = entry else { continue };
            let id = entry.file_name().to_string_lossy().into_owned();
            let dir = entry.path();
            if id.starts_with('.') || !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            match read_json::<InstanceConfig>(&dir.join("config.json")) {
                Ok(config) if config.id == id => good.push(Instance { dir, config }),
                Ok(config) => broken.push(Broken {
                    error: format!(
                        "{}: records id {:?}, not its directory's",
                        dir.join("config.json").display(),
                        config.id
                    ),
                    id,
                    dir,
                }),
                Err(e) => broken.push(Broken {
                    id,
                    dir,
                    error: e.to_string(),
                }),
            }
        }
        good.sort_by(|a, b| a.config.created.cmp(&b.config.created));
        broken.sort_by(|a, b| a.id.cmp(&b.id));
        Ok((good, broken))
    }

    /// The broken instance directory whose id is or starts with `key`.
    pub fn find_broken(&self, key: &str) -> Result<Option<Broken>, InstanceError> {
        let broken = self.scan()?.1;
        let mut hits = broken
            .into_iter()
            .filter(|b| !key.is_empty() && b.id.starts_with(key));
        Ok(match (hits.next(), hits.next()) {
            (Some(b), None) => Some(b),
            _ => None,
        })
    }

    /// The instance named `key`, or whose id is or starts with `key`.
    pub fn find(&self, key: &str) -> Result<Instance, InstanceError> {
        let all = self.list()?;
        if let Some(i) = all
            .iter()
            .find(|i| i.config.name == key || i.config.id == key)
        {
            return Ok(i.clone());
        }
        let mut by_prefix = all
            .into_iter()
            .filter(|i| !key.is_empty() && i.config.id.starts_with(key));
        match (by_prefix.next(), by_prefix.next()) {
            (Some(i), None) => Ok(i),
            (Some(_), Some(_)) => Err(InstanceError::Invalid(format!(
                "{key} matches several instance ids; give more of it, or the name"
            ))),
            _ => Err(InstanceError::NotFound(key.to_owned())),
        }
    }
}

impl Instance {
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The data dir it belongs to (`DATA/instances/ID`).
    pub fn data_dir(&self) -> Option<&Path> {
        self.dir.parent()?.parent()
    }

    /// The recorded state, with a running or created instance whose supervisor is gone shown
    /// as crashed.
    pub fn state(&self) -> Result<InstanceState, InstanceError> {
        let mut state: InstanceState = read_json(&self.dir.join("state.json"))?;
        if matches!(state.status, Status::Running | Status::Created)
            && let Some(sup) = state.supervisor
            && !sup.alive()
        {
            state.status = Status::Crashed;
            state.error.get_or_insert_with(|| {
                format!(
                    "its supervisor (pid {}) died without recording an end",
                    sup.pid
                )
            });
        }
        Ok(state)
    }

    /// [`Instance::state`], or an `unknown` state carrying the error when the record cannot be
    /// read, for listing and removal.
    pub fn state_or_unknown(&self) -> InstanceState {
        self.state().unwrap_or_else(|e| InstanceState {
            status: Status::Unknown,
            error: Some(e.to_string()),
            ..InstanceState::created()
        })
    }

    /// Renames the instance's directory to a hidden name in the same place, so listings no
    /// longer see it while it is being deleted; returns the new path.
    pub fn retire(&self) -> Result<PathBuf, InstanceError> {
        retire(&self.dir)
    }

    pub fn save_state(&self, state: &InstanceState) -> Result<(), InstanceError> {
        write_json(&self.dir.join("state.json"), state)
    }

    /// Claims the instance for the supervisor `me`: under the instances lock, refuses an
    /// instance being removed or one another live supervisor runs, and records `me` as its
    /// supervisor (status `created`). A removal either marks the instance first (and no
    /// supervisor runs it) or sees the supervisor recorded (and stops it).
    pub fn claim(&self, me: ProcessId) -> Result<InstanceState, InstanceError> {
        let root = self.dir.parent().unwrap_or(Path::new("/"));
        let _lock = lock_in(root)?;
        if self.dir.join(REMOVING).exists() || !self.dir.join("config.json").exists() {
            return Err(InstanceError::NotFound(self.name().to_owned()));
        }
        let mut state = self.state()?;
        // A supervisor that has recorded its run's end may still be taking the run apart.
        let other = state.supervisor.filter(|s| *s != me && s.alive());
        if crate::ops::is_live(&state) || other.is_some() {
            return Err(InstanceError::WrongState {
                name: self.name().to_owned(),
                status: state.status.to_string(),
                hint: "another supervisor runs it",
            });
        }
        state.status = Status::Created;
        state.supervisor = Some(me);
        state.pid = None;
        state.exit_code = None;
        state.error = None;
        state.started = Some(now());
        state.finished = None;
        self.save_state(&state)?;
        Ok(state)
    }

    /// Marks the instance as being removed unless it is live, under the instances lock (see
    /// [`Instance::claim`]); returns the state it had. A live one is left as it is.
    pub fn mark_removing(&self) -> Result<InstanceState, InstanceError> {
        let root = self.dir.parent().unwrap_or(Path::new("/"));
        let _lock = lock_in(root)?;
        let state = self.state_or_unknown();
        // An unreadable record is not marked: no supervisor can claim it, and a refused
        // `rm` (it needs -f) leaves it as it was.
        if !crate::ops::is_live(&state) && state.status != Status::Unknown {
            fs::write(self.dir.join(REMOVING), b"")
                .doing(|| format!("marking {} for removal", self.dir.display()))?;
        }
        Ok(state)
    }

    /// The instance's output log.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("output.log")
    }

    /// A microVM's vsock socket (the hybrid Unix-socket front of its vsock device), present
    /// while it runs on cela's KVM engine; `cela exec` reaches the guest's agent through it.
    pub fn vsock_path(&self) -> PathBuf {
        self.dir.join("vsock.sock")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(name: &str) -> InstanceConfig {
        InstanceConfig {
            id: String::new(),
            name: name.into(),
            kind: Kind::Container,
            image: "busybox".into(),
            image_digest: "sha256:00".into(),
            command: vec!["true".into()],
            env: vec![],
            workdir: None,
            user: None,
            cpus: None,
            memory_mib: None,
            volumes: vec![],
            auto_remove: false,
            created: now(),
            vm: None,
            net: NetMode::None,
            networks: Vec::new(),
            links: Vec::new(),
            ports: Vec::new(),
            security: Default::default(),
            stdin: false,
            tty: false,
            terminal_size: None,
            labels: Default::default(),
        }
    }

    #[test]
    fn names_are_unique_and_valid_and_found_by_id_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let insts = Instances::open(dir.path()).unwrap();
        let a = insts.create(config("web")).unwrap();
        assert_eq!(a.config.id.len(), 12);
        assert!(matches!(
            insts.create(config("web")),
            Err(InstanceError::NameTaken(_))
        ));
        assert!(matches!(
            insts.create(config("-x")),
            Err(InstanceError::BadName(_))
        ));
        assert!(matches!(
            insts.create(config("a b")),
            Err(InstanceError::BadName(_))
        ));
        let b = insts.create(config("")).unwrap();
        assert!(b.config.name.starts_with("ct-"));
        assert_eq!(insts.find("web").unwrap().config.id, a.config.id);
        assert_eq!(insts.find(&a.config.id[..5]).unwrap().config.name, "web");
        assert!(matches!(
            insts.find("nope"),
            Err(InstanceError::NotFound(_))
        ));
        assert_eq!(a.state().unwrap().status, Status::Created);
        assert_eq!(insts.list().unwrap().len(), 2);
    }

    #[test]
    fn a_running_state_whose_supervisor_is_gone_reads_as_crashed() {
        let dir = tempfile::tempdir().unwrap();
        let insts = Instances::open(dir.path()).unwrap();
        let a = insts.create(config("c")).unwrap();
        let mut st = a.state().unwrap();
        st.status = Status::Running;
        st.supervisor = Some(ProcessId::current());
        a.save_state(&st).unwrap();
        assert_eq!(a.state().unwrap().status, Status::Running);
        st.supervisor = Some(ProcessId {
            pid: i32::MAX,
            start_time: 1,
        });
        a.save_state(&st).unwrap();
        let read = a.state().unwrap();
        assert_eq!(read.status, Status::Crashed);
        assert!(read.error.unwrap().contains("died"));
    }

    #[test]
    fn a_corrupt_record_is_listed_as_broken_or_unknown_and_hides_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let insts = Instances::open(dir.path()).unwrap();
        let a = insts.create(config("a")).unwrap();
        let b = insts.create(config("b")).unwrap();
        let c = insts.create(config("c")).unwrap();
        std::fs::write(b.dir.join("config.json"), b"{not json").unwrap();
        std::fs::write(c.dir.join("state.json"), b"").unwrap();
        std::fs::create_dir(insts.root().join("stray")).unwrap();
        let (good, broken) = insts.scan().unwrap();
        let names: Vec<_> = good.iter().map(|i| i.name()).collect();
        assert_eq!(names, ["a", "c"]);
        let ids: Vec<_> = broken.iter().map(|b| b.id.as_str()).collect();
        let mut want = vec![b.config.id.as_str(), "stray"];
        want.sort();
        assert_eq!(ids, want);
        assert!(broken.iter().all(|b| !b.error.is_empty()));
        assert_eq!(
            insts.find_broken(&b.config.id[..6]).unwrap().unwrap().id,
            b.config.id
        );
        assert!(insts.find_broken(&a.config.id).unwrap().is_none());
        let st = insts.find("c").unwrap().state_or_unknown();
        assert_eq!(st.status, Status::Unknown);
        assert!(st.error.unwrap().contains("state.json"));
        // A retired directory is not listed at all.
        a.retire().unwrap();
        assert_eq!(insts.list().unwrap().len(), 1);
    }

    #[test]
    fn records_written_before_net_existed_read_as_none() {
        let mut v = serde_json::to_value(config("old")).unwrap();
        v.as_object_mut().unwrap().remove("net");
        let c: InstanceConfig = serde_json::from_value(v).unwrap();
        assert_eq!(c.net, NetMode::None);
        let mut v = serde_json::to_value(InstanceState::created()).unwrap();
        v.as_object_mut().unwrap().remove("network");
        let s: InstanceState = serde_json::from_value(v).unwrap();
        assert_eq!(s.network, None);
    }

    #[test]
    fn volumes_parse_and_are_checked() {
        let v = Volume::parse("/tmp:/data:ro").unwrap();
        assert_eq!(
            (v.host.to_str().unwrap(), v.dest.as_str(), v.read_only),
            ("/tmp", "/data", true)
        );
        assert!(!Volume::parse("/tmp:/data").unwrap().read_only);
        assert!(Volume::parse("tmp:/data").is_err());
        assert!(Volume::parse("/nonexistent-x:/data").is_err());
        assert!(Volume::parse("/tmp").is_err());
        for dest in [
            "/",
            "/proc",
            "/proc/sys",
            "//proc/",
            "/sys",
            "/sys/fs/cgroup",
            "/dev",
            "/a/../proc",
        ] {
            assert!(Volume::parse(&format!("/tmp:{dest}")).is_err(), "{dest}");
        }
        assert!(Volume::parse("/tmp:/dev/fuse").is_ok());
        assert!(Volume::parse("/tmp:/procedures").is_ok());
        assert!(is_id("0123456789ab") && !is_id("../../x") && !is_id("0123456789AB"));
    }
}
