//! Making and starting instances: the one path from a typed [`RunRequest`] to a running
//! instance, shared by `cela run`, `cela start` and the HTTP APIs (`cela serve`). Front ends
//! parse their own syntax (flags, JSON) into a request; everything after that — the image's
//! config merged with the request, the user checked against the image, the guest kernel and
//! image disk of a microVM prepared, the record written, the supervisor started — happens
//! here, once.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use cela_image::{Progress, RunConfig, Store};

use crate::error::{InstanceError, IoContext};
use crate::network::NetMode;
use crate::ops;
use crate::record::{
    Instance, InstanceConfig, InstanceState, Instances, Kind, Status, VmBoot, Volume,
};
use crate::security::Security;

/// The kernel and initramfs a microVM instance boots.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum GuestFiles {
    /// cela's: the Debian cloud kernel and the initramfs built around cela-init, fetched and
    /// built on first use.
    #[default]
    Default,
    /// The caller's (its init must follow cela's boot contract: cela-init in the initramfs).
    Custom { kernel: PathBuf, initrd: PathBuf },
}

/// When [`create`] pulls the image from its registry first (Docker's `--pull`).
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum PullPolicy {
    /// When the store has no image by that name.
    #[default]
    Missing,
    /// Every time (a newer image under the same tag is taken).
    Always,
    /// Never: a missing image is an error.
    Never,
}

/// Everything that makes a new instance, as typed values.
#[derive(Debug, Clone)]
pub struct RunRequest {
    /// The image as the caller names it (a name, a tag, a digest or a prefix of one).
    pub image: String,
    /// The command after the image's entrypoint (or instead of its cmd); empty: the image's.
    pub command: Vec<String>,
    /// Replaces the image's entrypoint when set (an empty one clears it).
    pub entrypoint: Option<Vec<String>>,
    pub kind: Kind,
    /// Empty or absent: a name made from the id.
    pub name: Option<String>,
    /// `KEY=VALUE`, after the image's (a key given here replaces the image's).
    pub env: Vec<String>,
    /// Absolute; absent: the image's.
    pub workdir: Option<String>,
    /// `uid[:gid]` or a user name of the image; absent: the image's.
    pub user: Option<String>,
    pub volumes: Vec<Volume>,
    /// vCPUs of a microVM; CPU limit of a container.
    pub cpus: Option<u32>,
    /// Guest RAM of a microVM; memory limit of a container.
    pub memory_mib: Option<u64>,
    pub net: NetMode,
    /// Named networks to join (`--net NAME`), with `net` left at `none`.
    pub networks: Vec<crate::network::named::Attachment>,
    /// A lab's vm node: its ends of the lab's links (`cela lab up` sets them).
    pub links: Vec<crate::lab::link::VmEnd>,
    /// `-p`: host ports published to the instance's (needs `--net auto` or a network).
    pub ports: Vec<crate::network::ports::PortMapping>,
    pub security: Security,
    /// A microVM's kernel and initramfs.
    pub guest: GuestFiles,
    /// A microVM's monitor under its seccomp filters.
    pub confine: bool,
    /// The supervisor removes the instance when it ends.
    pub auto_remove: bool,
    /// Key/value labels, kept with the instance for filtering.
    pub labels: std::collections::BTreeMap<String, String>,
    /// Stdin kept open and fed through the attach socket (`crate::attach`).
    pub stdin: bool,
    /// A terminal for the workload (containers).
    pub tty: bool,
    /// The terminal's rows and columns at start (`-t`; zeros are taken as unknown).
    pub terminal_size: Option<(u16, u16)>,
    pub pull: PullPolicy,
}

impl RunRequest {
    /// A request for `image` with the image's command and every default.
    pub fn new(image: impl Into<String>, kind: Kind) -> RunRequest {
        RunRequest {
            image: image.into(),
            command: Vec::new(),
            entrypoint: None,
            kind,
            name: None,
            env: Vec::new(),
            workdir: None,
            user: None,
            volumes: Vec::new(),
            cpus: None,
            memory_mib: None,
            net: NetMode::None,
            networks: Vec::new(),
            links: Vec::new(),
            ports: Vec::new(),
            security: Security::default(),
            guest: GuestFiles::Default,
            confine: true,
            auto_remove: false,
            labels: Default::default(),
            stdin: false,
            tty: false,
            terminal_size: None,
            pull: PullPolicy::Missing,
        }
    }
}

/// How long starting waits for the supervisor to report the workload running (a microVM's
/// first start may build its disk).
pub const START_BOUND: Duration = Duration::from_secs(120);

fn invalid(why: impl Into<String>) -> InstanceError {
    InstanceError::Invalid(why.into())
}

/// Checks `req`, resolves it against the image and records the instance (status `created`,
/// no supervisor yet). Nothing is recorded when anything is wrong. The image is held (its
/// content lock) until the record exists, so a concurrent `image rm` sees the new user.
pub fn create(
    data_dir: &Path,
    store: &Store,
    req: &RunRequest,
    progress: &Progress,
) -> Result<Instance, InstanceError> {
    let vm = req.kind == Kind::Vm;
    if let Some(dir) = &req.workdir
        && !dir.starts_with('/')
    {
        return Err(invalid(format!(
            "the working directory {dir:?} must be an absolute path"
        )));
    }
    if let Some(bad) = req
        .env
        .iter()
        .find(|e| !e.contains('=') || e.starts_with('='))
    {
        return Err(invalid(format!(
            "environment entry {bad:?} is not KEY=VALUE"
        )));
    }
    crate::network::named::check_attachments(data_dir, req.kind, req.net, &req.networks)?;
    if !req.ports.is_empty() {
        crate::network::ports::check_distinct(&req.ports)?;
        crate::network::ports::check_host_addresses(&req.ports)?;
        let first_internal = match req.networks.first() {
            // The built-in network (made NAT'd, perhaps not yet) is not internal.
            Some(a) => crate::network::named::Networks::open(data_dir)?
                .get(&a.network)
                .is_ok_and(|n| n.internal),
            None => false,
        };
        if (req.net != NetMode::Auto && req.networks.is_empty()) || first_internal {
            return Err(invalid(
                "-p publishes ports to the instance's address: it needs --net auto or a network that is not --internal (its first)",
            ));
        }
    }
    if vm && !req.volumes.is_empty() {
        return Err(InstanceError::Unsupported(
            "volumes are not supported for microVMs yet (give the VM a disk instead)".into(),
        ));
    }
    if vm && req.stdin && !req.tty {
        return Err(InstanceError::Unsupported(
            "a microVM's workload takes input on its console, a terminal: ask for one with -t (-it), or pipe input through `cela exec -i`".into(),
        ));
    }
    if !vm && req.guest != GuestFiles::Default {
        return Err(invalid(
            "a kernel and initramfs are for microVMs, not containers",
        ));
    }
    if !vm && let Some(mib) = req.memory_mib {
        crate::container::memory_limit(mib)?;
    }
    let missing = matches!(
        store.resolve(&req.image),
        Err(cela_image::ImageError::UnknownImage(_))
    );
    let pull = req.pull == PullPolicy::Always || (req.pull == PullPolicy::Missing && missing);
    if pull && let Err(e) = cela_image::pull(store, &req.image, progress) {
        return Err(if missing {
            InstanceError::NotPulled {
                image: req.image.clone(),
                why: e.to_string(),
            }
        } else {
            e.into()
        });
    }
    let content = store.content_lock()?;
    let image = store.resolve(&req.image).map_err(|e| match e {
        cela_image::ImageError::UnknownImage(_) => InstanceError::NoImage(req.image.clone()),
        other => other.into(),
    })?;
    let rc = RunConfig::of(store, &image)?;
    let command = match &req.entrypoint {
        // As Docker: a new entrypoint drops the image's cmd; an empty one clears the
        // entrypoint (the command, or else the image's cmd, is then the whole command line).
        Some(ep) if ep.iter().all(String::is_empty) => {
            if req.command.is_empty() {
                rc.cmd.clone()
            } else {
                req.command.clone()
            }
        }
        Some(ep) => ep.iter().chain(&req.command).cloned().collect(),
        None => rc.argv(&req.command),
    };
    if command.is_empty() {
        return Err(invalid(format!(
            "image {} has no command (no Entrypoint or Cmd): give one after the image",
            req.image
        )));
    }
    let mut env = rc.env.clone();
    for e in &req.env {
        let key = e.split('=').next().unwrap_or_default();
        env.retain(|x| x.split('=').next() != Some(key));
        env.push(e.clone());
    }
    let user = req.user.clone().or(rc.user.clone());
    let boot = if vm {
        let (kernel, initrd) = match &req.guest {
            GuestFiles::Custom { kernel, initrd } => {
                for p in [kernel, initrd] {
                    if !p.is_file() {
                        return Err(invalid(format!("{}: no such file", p.display())));
                    }
                }
                let abs = |p: &PathBuf| {
                    std::path::absolute(p).doing(|| format!("resolving {}", p.display()))
                };
                (abs(kernel)?, abs(initrd)?)
            }
            GuestFiles::Default => {
                let assets = cela_assets::default_guest_assets(&data_dir.join("assets"), progress)?;
                (assets.kernel, assets.initrd)
            }
        };
        let image_disk = cela_image::rootfs_disk(store, &image, progress)?;
        Some(VmBoot {
            kernel,
            initrd,
            image_disk,
            confine: req.confine,
        })
    } else {
        // Unpack the layers now (once per layer), not in the supervisor, and check the user
        // against the image's /etc/passwd.
        let layers = cela_image::layer_dirs(store, &image)?;
        if let Some(user) = &user {
            crate::container::check_user(&layers, user)?;
        }
        None
    };
    let config = InstanceConfig {
        id: String::new(),
        name: req.name.clone().unwrap_or_default(),
        kind: req.kind,
        image: req.image.clone(),
        image_digest: image.digest.to_string(),
        command,
        env,
        workdir: req.workdir.clone().or(rc.working_dir.clone()),
        user,
        cpus: req.cpus,
        memory_mib: req.memory_mib,
        volumes: req.volumes.clone(),
        auto_remove: req.auto_remove,
        created: crate::record::now(),
        vm: boot,
        net: req.net,
        networks: req.networks.clone(),
        links: req.links.clone(),
        ports: req.ports.clone(),
        security: req.security.clone(),
        labels: req.labels.clone(),
        stdin: req.stdin,
        tty: req.tty,
        terminal_size: req
            .terminal_size
            .filter(|&(rows, cols)| req.tty && rows > 0 && cols > 0),
    };
    // The built-in network is made on first use (as Docker's docker0 is there before anyone
    // runs on it), once everything else is known to be right: a refused run changes nothing.
    crate::network::named::Networks::open(data_dir)?.ensure_builtin(&req.networks)?;
    let inst = Instances::open(data_dir)?.create(config)?;
    drop(content);
    crate::events::record(&inst, "create", &[]);
    // The log exists from the start, so a follower attached before the first run holds it
    // open even if the run ends and removes the instance before the follower looks again.
    let log = inst.log_path();
    if let Err(e) = std::fs::File::create(&log) {
        let _ = ops::remove(&inst, true);
        return Err(InstanceError::Io {
            what: format!("creating {}", log.display()),
            source: e,
        });
    }
    Ok(inst)
}

/// Starts `cela --data-dir DATA __supervise ID` (the running executable) in its own process
/// group, stdio on /dev/null, so that the instance outlives its caller and a Ctrl-C at the
/// caller's terminal does not reach it. Returns at once; see [`start`] to wait.
pub fn spawn_supervisor(data_dir: &Path, inst: &Instance) -> Result<(), InstanceError> {
    let exe = std::env::current_exe().doing(|| "locating the cela executable".into())?;
    Command::new(exe)
        .arg("--data-dir")
        .arg(data_dir)
        .args(["__supervise", &inst.config.id])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .doing(|| "starting the instance's supervisor".into())?;
    Ok(())
}

/// Starts an instance that is not running (just created, or ended) and waits, at most
/// [`START_BOUND`], until its supervisor reports the workload running or its end. An
/// instance that could not start is an error naming why.
pub fn start(data_dir: &Path, inst: &Instance) -> Result<InstanceState, InstanceError> {
    let before = inst.state()?;
    if ops::is_live(&before) {
        return Err(InstanceError::WrongState {
            name: inst.name().to_owned(),
            status: before.status.to_string(),
            hint: "it is started already",
        });
    }
    // The previous run's supervisor may still be taking that run apart (a restart).
    let before = ops::wait_state(inst, Duration::from_secs(30), |s| {
        s.supervisor.is_none_or(|p| !p.alive())
    })?;
    spawn_supervisor(data_dir, inst)?;
    let started = |s: &InstanceState| s.started != before.started && s.status != Status::Created;
    let state = match ops::wait_state(inst, START_BOUND, started) {
        Ok(state) if !started(&state) => {
            return Err(InstanceError::NotStarted {
                name: inst.name().to_owned(),
                why: format!(
                    "its supervisor did not report it running within {}s",
                    START_BOUND.as_secs()
                ),
            });
        }
        Ok(state) => state,
        // An instance that removes itself when it ends may have run and gone already.
        Err(_) if inst.config.auto_remove && !inst.dir.exists() => InstanceState {
            status: Status::Exited,
            ..before
        },
        Err(e) => return Err(e),
    };
    if state.status != Status::Running
        && let Some(err) = &state.error
    {
        return Err(InstanceError::NotStarted {
            name: inst.name().to_owned(),
            why: err.clone(),
        });
    }
    Ok(state)
}
