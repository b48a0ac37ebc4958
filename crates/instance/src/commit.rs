//! `cela commit`: a container's changes made into an image (Docker's `commit`). The container's
//! writable layer goes on top of its image's layers, and the config takes over how the
//! container ran (command, environment, working directory, user, labels), then the
//! `--change` instructions. A running container is frozen while its layer is read (unless
//! asked not to be) and thawed after, whatever happened. The one path the CLI and both APIs
//! take.

use std::path::PathBuf;

use cela_image::commit::{CommitRequest as ImageCommit, ContainerSettings};
use cela_image::{ImageRecord, Progress, Store};

use crate::error::InstanceError;
use crate::record::{Instance, Kind, Status};
use crate::{container, events, network::NetMode};

/// What the caller asks of a commit.
#[derive(Debug, Clone)]
pub struct CommitRequest {
    /// `NAME[:TAG]` for the image; none leaves it unnamed.
    pub name: Option<String>,
    /// Kept in the image's history.
    pub message: Option<String>,
    pub author: Option<String>,
    /// Dockerfile instructions applied to the config (`--change`).
    pub changes: Vec<String>,
    /// Freeze a running container while its layer is read (Docker's default).
    pub pause: bool,
}

impl Default for CommitRequest {
    fn default() -> Self {
        CommitRequest {
            name: None,
            message: None,
            author: None,
            changes: Vec::new(),
            pause: true,
        }
    }
}

/// Commits `inst` into `store`; returns the new image's record.
pub fn commit(
    store: &Store,
    inst: &Instance,
    req: &CommitRequest,
    progress: &Progress,
) -> Result<ImageRecord, InstanceError> {
    let c = &inst.config;
    if c.kind != Kind::Container {
        return Err(InstanceError::Unsupported(format!(
            "{} is a microVM: commit takes a container (a microVM's disk is not a layer)",
            c.name
        )));
    }
    let mut mount_points: Vec<PathBuf> = c
        .volumes
        .iter()
        .map(|v| PathBuf::from(v.dest.trim_start_matches('/')))
        .collect();
    if matches!(c.net, NetMode::Host | NetMode::Auto) {
        mount_points.push("etc/resolv.conf".into());
    }
    let image_req = ImageCommit {
        base: c.image_digest.clone(),
        upper: inst.dir.join("upper"),
        mount_points,
        name: req.name.clone(),
        settings: ContainerSettings {
            command: c.command.clone(),
            env: c.env.clone(),
            workdir: c.workdir.clone(),
            user: c.user.clone(),
            labels: c.labels.clone(),
        },
        changes: req.changes.clone(),
        comment: req.message.clone(),
        author: req.author.clone(),
    };
    // Bad names and changes are refused before the container is touched.
    cela_image::commit::check_request(req.name.as_deref(), &req.changes)?;
    let frozen = if req.pause && inst.state_or_unknown().status != Status::Exited {
        Frozen::freeze(inst)?
    } else {
        None
    };
    let made = cela_image::commit::commit(store, &image_req, progress);
    // Thawed before anything else; a container that stays frozen is an error to report.
    let thawed = frozen.map_or(Ok(()), Frozen::thaw);
    let rec = match (made, thawed) {
        (Ok(rec), Ok(())) => rec,
        (Err(e), _) => return Err(e.into()),
        (Ok(rec), Err(e)) => {
            return Err(InstanceError::Other(format!(
                "image {} was made, but {e}",
                rec.digest
            )));
        }
    };
    events::record(inst, "commit", &[("imageID", rec.digest.to_string())]);
    Ok(rec)
}

/// A container frozen for the commit: thawed by [`Frozen::thaw`], or when dropped (an error
/// path).
struct Frozen<'a> {
    inst: &'a Instance,
    thawed: bool,
}

impl<'a> Frozen<'a> {
    /// Freezes the container; `None` if it is not running in its runtime (it ended since its
    /// state was read, or never started: there is nothing to freeze). A freeze that fails is
    /// undone before the error is returned.
    fn freeze(inst: &'a Instance) -> Result<Option<Frozen<'a>>, InstanceError> {
        match container::runtime(inst).pause(&inst.config.id) {
            Ok(()) => Ok(Some(Frozen {
                inst,
                thawed: false,
            })),
            Err(cela_runtime::Error::WrongState { .. }) => Ok(None),
            Err(e) => {
                // A freeze that timed out may have left the cgroup frozen half-way.
                let _ = container::thaw_cgroup(&inst.config.id);
                Err(InstanceError::Other(format!(
                    "freezing {} for the commit: {e} (commit it with --pause=false, or stopped)",
                    inst.config.name
                )))
            }
        }
    }

    fn thaw(mut self) -> Result<(), InstanceError> {
        self.thawed = true;
        let runtime = container::runtime(self.inst).resume(&self.inst.config.id);
        // Whatever the runtime said, the cgroups are thawed directly too.
        match (runtime, container::thaw_cgroup(&self.inst.config.id)) {
            (_, Ok(())) => Ok(()),
            (Err(e), Err(d)) => Err(InstanceError::Other(format!(
                "{} could not be thawed after the commit: {e}; {d}",
                self.inst.config.name
            ))),
            (Ok(()), Err(d)) => Err(d),
        }
    }
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        if !self.thawed {
            let _ = container::runtime(self.inst).resume(&self.inst.config.id);
            if let Err(e) = container::thaw_cgroup(&self.inst.config.id) {
                tracing::warn!("{e}");
            }
        }
    }
}
