//! Labs: a topology of instances and the links between them, brought up and taken down
//! whole (`cela lab up|down|ls|inspect|graph|impair`).
//!
//! * [`file`]: the YAML lab file and its [`file::Plan`];
//! * [`link`]: a link's veth pairs and how its host ends are joined;
//! * [`impair`]: delay, jitter, loss and rate, parsed once;
//! * [`relay`]: the process that carries an impaired link's frames;
//! * [`graph`]: the topology as Graphviz DOT or as an SVG picture.
//!
//! A lab's record is `DATA/labs/NAME.json`, changed under `labs/.lock`, written before
//! anything is made and after each step, so `lab down` finds everything a crashed or failed
//! `lab up` made. Its nodes are instances named `LAB-NODE` (labelled `cela.lab=LAB`), its
//! networks cela networks named `LAB-NET`.

pub mod file;
pub mod graph;
pub mod impair;
pub mod link;
pub mod relay;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read as _};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cela_image::{Progress, Store};
use serde::{Deserialize, Serialize};

use self::file::Plan;
use self::impair::Impairment;
use crate::error::{InstanceError, IoContext};
use crate::network::NetMode;
use crate::network::named::{Attachment, CreateRequest, Networks};
use crate::record::{Instance, Instances, Kind, ProcessId, private_dir};
use crate::run::RunRequest;

/// The label every node instance carries: its lab's name.
pub const LABEL: &str = "cela.lab";
/// The largest lab record read.
const MAX_RECORD: u64 = 4 << 20;

/// A lab's record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Lab {
    pub name: String,
    pub id: String,
    pub created: String,
    pub plan: Plan,
    /// Node name → instance id, as each is made.
    #[serde(default)]
    pub nodes: BTreeMap<String, String>,
    /// The cela networks the lab made.
    #[serde(default)]
    pub networks: Vec<String>,
    /// The links made so far, in the plan's order.
    #[serde(default)]
    pub links: Vec<LinkState>,
    /// Every node and link is up.
    #[serde(default)]
    pub complete: bool,
}

/// A link as it is now.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LinkState {
    /// The host ends.
    pub ends: [String; 2],
    #[serde(default)]
    pub impair: Impairment,
    /// The relay carrying an impaired link's frames.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<ProcessId>,
}

impl Lab {
    fn tag(&self) -> &str {
        &self.id[..6]
    }

    /// The instance name of node `node`.
    pub fn instance_name(&self, node: &str) -> String {
        format!("{}-{node}", self.name)
    }

    /// The cela network a node's `networks:` entry names: the lab's own, or one that exists.
    fn network_name(&self, name: &str) -> String {
        if self.plan.networks.iter().any(|n| n.name == name) {
            format!("{}-{name}", self.name)
        } else {
            name.to_owned()
        }
    }

    /// The link with end `node:iface`.
    fn link_of(&self, end: &str) -> Result<usize, InstanceError> {
        let (node, iface) = end
            .split_once(':')
            .ok_or_else(|| InstanceError::Invalid(format!("{end:?} is not NODE:IFACE")))?;
        self.plan
            .links
            .iter()
            .position(|l| l.ends.iter().any(|e| e.node == node && e.iface == iface))
            .ok_or_else(|| {
                InstanceError::Invalid(format!("lab {} has no link at {end}", self.name))
            })
    }
}

/// The labs directory of a data dir.
pub struct Labs {
    root: PathBuf,
    data_dir: PathBuf,
}

struct Lock(#[allow(dead_code)] nix::fcntl::Flock<File>);

impl Labs {
    pub fn open(data_dir: &Path) -> Result<Labs, InstanceError> {
        let root = data_dir.join("labs");
        private_dir(&root)?;
        Ok(Labs {
            root,
            data_dir: data_dir.to_owned(),
        })
    }

    fn lock(&self) -> Result<Lock, InstanceError> {
        crate::record::lock_in(&self.root).map(Lock)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.root.join(format!("{name}.json"))
    }

    fn save(&self, lab: &Lab) -> Result<(), InstanceError> {
        crate::record::write_json(&self.path(&lab.name), lab)
    }

    fn read(path: &Path) -> Result<Lab, InstanceError> {
        let mut bytes = Vec::new();
        File::options()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .and_then(|f| f.take(MAX_RECORD).read_to_end(&mut bytes))
            .doing(|| format!("reading {}", path.display()))?;
        serde_json::from_slice(&bytes).map_err(|e| InstanceError::Corrupt {
            what: path.display().to_string(),
            why: e.to_string(),
        })
    }

    /// The lab `name`.
    pub fn get(&self, name: &str) -> Result<Lab, InstanceError> {
        if !file::valid_name(name) || !self.path(name).exists() {
            return Err(InstanceError::Invalid(format!(
                "no lab named {name} (see `cela lab ls`)"
            )));
        }
        Self::read(&self.path(name))
    }

    /// Every lab, by name.
    pub fn list(&self) -> Result<Vec<Lab>, InstanceError> {
        let mut out = Vec::new();
        for entry in
            std::fs::read_dir(&self.root).doing(|| format!("reading {}", self.root.display()))?
        {
            let Ok(entry) = entry else { continue };
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(stem) = name.strip_suffix(".json")
                && file::valid_name(stem)
            {
                out.push(Self::read(&entry.path())?);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// `cela lab up`: every network, node and link of `plan`, or (on any failure) none of
    /// them, with the error naming the step that failed.
    pub fn up(&self, store: &Store, plan: Plan, progress: &Progress) -> Result<Lab, InstanceError> {
        let _lock = self.lock()?;
        if self.path(&plan.name).exists() {
            return Err(InstanceError::Invalid(format!(
                "a lab named {0} is up already (cela lab down {0} first, or give --name)",
                plan.name
            )));
        }
        let instances = Instances::open(&self.data_dir)?;
        for node in &plan.nodes {
            let name = format!("{}-{}", plan.name, node.name);
            if instances.find(&name).is_ok() {
                return Err(InstanceError::NameTaken(name));
            }
        }
        let mut lab = Lab {
            name: plan.name.clone(),
            id: crate::record::new_id()?,
            created: crate::record::now(),
            plan,
            nodes: BTreeMap::new(),
            networks: Vec::new(),
            links: Vec::new(),
            complete: false,
        };
        self.save(&lab)?;
        match self.bring_up(&mut lab, store, progress) {
            Ok(()) => {
                lab.complete = true;
                self.save(&lab)?;
                Ok(lab)
            }
            Err(e) => {
                let left = self.take_down(&lab);
                if left.is_empty() {
                    let _ = std::fs::remove_file(self.path(&lab.name));
                }
                let undone = if left.is_empty() {
                    "what was made of it is removed".to_owned()
                } else {
                    format!(
                        "removing what was made also failed ({}); `cela lab down {}` retries",
                        left.join("; "),
                        lab.name
                    )
                };
                Err(InstanceError::Other(format!(
                    "lab {} did not come up: {e} ({undone})",
                    lab.name
                )))
            }
        }
    }

    fn bring_up(
        &self,
        lab: &mut Lab,
        store: &Store,
        progress: &Progress,
    ) -> Result<(), InstanceError> {
        let nets = Networks::open(&self.data_dir)?;
        for n in lab.plan.networks.clone() {
            let name = lab.network_name(&n.name);
            nets.create(&CreateRequest {
                name: name.clone(),
                subnet: n.subnet.clone(),
                gateway: None,
                internal: n.internal,
                nat: n.nat,
            })
            .map_err(|e| InstanceError::Other(format!("network {}: {e}", n.name)))?;
            lab.networks.push(name);
            self.save(lab)?;
        }
        // Every node recorded first (quick), then all started at once.
        let mut made = Vec::new();
        for node in lab.plan.nodes.clone() {
            let networks = node
                .networks
                .iter()
                .map(|n| Attachment::parse(&lab.network_name(n)))
                .collect::<Result<Vec<_>, _>>()?;
            let mut labels = BTreeMap::new();
            labels.insert(LABEL.to_owned(), lab.name.clone());
            labels.insert(format!("{LABEL}.node"), node.name.clone());
            let req = RunRequest {
                command: node.command.clone(),
                name: Some(lab.instance_name(&node.name)),
                env: node.env.clone(),
                cpus: node.cpus,
                memory_mib: node.memory_mib,
                net: NetMode::None,
                networks,
                labels,
                ..RunRequest::new(node.image.clone(), node.kind)
            };
            let inst = crate::run::create(&self.data_dir, store, &req, progress)
                .map_err(|e| InstanceError::Other(format!("node {}: {e}", node.name)))?;
            lab.nodes.insert(node.name.clone(), inst.config.id.clone());
            self.save(lab)?;
            made.push((node.name.clone(), inst));
        }
        let data_dir = &self.data_dir;
        let started: Vec<Result<(), InstanceError>> = std::thread::scope(|s| {
            let threads: Vec<_> = made
                .iter()
                .map(|(name, inst)| {
                    s.spawn(move || {
                        crate::run::start(data_dir, inst)
                            .map(drop)
                            .map_err(|e| InstanceError::Other(format!("node {name}: {e}")))
                    })
                })
                .collect();
            threads
                .into_iter()
                .map(|t| {
                    t.join().unwrap_or_else(|_| {
                        Err(InstanceError::Other("a node's start panicked".into()))
                    })
                })
                .collect()
        });
        started.into_iter().collect::<Result<Vec<()>, _>>()?;
        let netns = |node: &str| -> Result<File, InstanceError> {
            let (_, inst) = made
                .iter()
                .find(|(n, _)| n == node)
                .expect("planned links name planned nodes");
            File::open(crate::network::netns_path(inst))
                .doing(|| format!("opening node {node}'s network namespace"))
        };
        for (i, l) in lab.plan.links.clone().iter().enumerate() {
            let ends = link::host_ends(lab.tag(), i);
            let what = format!(
                "link {}:{} – {}:{}",
                l.ends[0].node, l.ends[0].iface, l.ends[1].node, l.ends[1].iface
            );
            lab.links.push(LinkState {
                ends: ends.clone(),
                impair: Impairment::default(),
                relay: None,
            });
            self.save(lab)?;
            for (k, end) in l.ends.iter().enumerate() {
                link::make_end(&ends[k], &netns(&end.node)?, &end.iface, end.address)
                    .map_err(|e| InstanceError::Other(format!("{what}: {e}")))?;
            }
            self.set_impairment(lab, i, l.impair)
                .map_err(|e| InstanceError::Other(format!("{what}: {e}")))?;
        }
        // Routes last: their gateways are on the links.
        for node in &lab.plan.nodes {
            if node.kind == Kind::Vm || (node.routes.is_empty() && node.sysctls.is_empty()) {
                continue;
            }
            let ns = netns(&node.name)?;
            let (routes, sysctls) = (node.routes.clone(), node.sysctls.clone());
            let name = node.name.clone();
            crate::network::in_netns(&ns, move || {
                for (k, v) in &sysctls {
                    let path = Path::new("/proc/sys")
                        .join(file::sysctl_path(k).map_err(InstanceError::Invalid)?);
                    std::fs::write(&path, v).doing(|| format!("node {name}: setting {k} = {v}"))?;
                }
                for r in &routes {
                    cela_guest::netif::add_route(r.dest, r.prefix, r.via).map_err(|e| {
                        InstanceError::Other(format!(
                            "node {name}: route {}/{} via {}: {e}",
                            r.dest, r.prefix, r.via
                        ))
                    })?;
                }
                Ok(())
            })?;
        }
        Ok(())
    }

    /// Joins link `i`'s ends in the kernel, or through a relay with `impair`, replacing
    /// whatever joined them before.
    fn set_impairment(
        &self,
        lab: &mut Lab,
        i: usize,
        impair: Impairment,
    ) -> Result<(), InstanceError> {
        let state = &mut lab.links[i];
        if let Some(relay) = state.relay.take() {
            stop_relay(&relay);
        }
        if impair.is_none() {
            link::wire(&state.ends)?;
        } else {
            link::unwire(&state.ends)?;
            state.relay = Some(self.start_relay(&state.ends, impair)?);
        }
        state.impair = impair;
        self.save(lab)
    }

    /// Starts `cela __link-relay` between `ends` and waits (bounded) for its word that it
    /// holds both ends.
    fn start_relay(
        &self,
        ends: &[String; 2],
        impair: Impairment,
    ) -> Result<ProcessId, InstanceError> {
        let exe = std::env::current_exe().doing(|| "locating the cela executable".into())?;
        let log = File::options()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(self.root.join("relays.log"))
            .doing(|| "opening the relays' log".into())?;
        let mut child = Command::new(exe)
            .args(["__link-relay", &ends[0], &ends[1]])
            .args(["--delay-us", &impair.delay_us.to_string()])
            .args(["--jitter-us", &impair.jitter_us.to_string()])
            .args(["--loss-ppm", &impair.loss_ppm.to_string()])
            .args(["--rate-bps", &impair.rate_bps.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .process_group(0)
            .spawn()
            .doing(|| "starting a link relay".into())?;
        let mut line = String::new();
        // The relay writes one line once its sockets are open, or ends (end of file).
        let _ = BufReader::new(child.stdout.take().expect("piped"))
            .take(64)
            .read_line(&mut line);
        let pid = child.id() as i32;
        if line.trim() != "ready" {
            let _ = child.kill();
            let _ = child.wait();
            return Err(InstanceError::Other(format!(
                "the link relay between {} and {} did not start (see {})",
                ends[0],
                ends[1],
                self.root.join("relays.log").display()
            )));
        }
        let id = ProcessId::of(pid)
            .ok_or_else(|| InstanceError::Other("the link relay ended as it started".into()))?;
        // Reaped here while this process lives (cela serve); init reaps it after.
        std::thread::spawn(move || child.wait());
        Ok(id)
    }

    /// `cela lab impair LAB NODE:IFACE …`: the link at that end, impaired both ways (or, with
    /// a default [`Impairment`], cleared).
    pub fn impair(&self, name: &str, end: &str, impair: Impairment) -> Result<Lab, InstanceError> {
        impair.check().map_err(InstanceError::Invalid)?;
        let _lock = self.lock()?;
        let mut lab = self.get(name)?;
        let i = lab.link_of(end)?;
        if !lab.complete || i >= lab.links.len() {
            return Err(InstanceError::Invalid(format!(
                "lab {name} is not up whole (cela lab down {name}, then up again)"
            )));
        }
        self.set_impairment(&mut lab, i, impair)?;
        Ok(lab)
    }

    /// `cela lab down`: everything of the lab, whatever state it is in. The record goes only
    /// once all is gone, so a failed `down` can be repeated.
    pub fn down(&self, name: &str) -> Result<(), InstanceError> {
        let _lock = self.lock()?;
        let lab = self.get(name)?;
        let left = self.take_down(&lab);
        if !left.is_empty() {
            return Err(InstanceError::Other(format!(
                "lab {name}: could not remove {}",
                left.join("; ")
            )));
        }
        std::fs::remove_file(self.path(name)).doing(|| format!("removing lab {name}'s record"))
    }

    /// Removes what `lab` records; what could not be removed, described.
    fn take_down(&self, lab: &Lab) -> Vec<String> {
        let mut left = Vec::new();
        for l in &lab.links {
            if let Some(relay) = &l.relay {
                stop_relay(relay);
            }
            link::remove(&l.ends);
        }
        // Links a failed up had not recorded yet cannot exist beyond these names.
        for i in lab.links.len()..lab.plan.links.len() {
            link::remove(&link::host_ends(lab.tag(), i));
        }
        if let Ok(instances) = Instances::open(&self.data_dir) {
            for (node, id) in &lab.nodes {
                match instances.find(id) {
                    Ok(inst) => {
                        if let Err(e) = crate::ops::remove(&inst, true) {
                            left.push(format!("node {node}: {e}"));
                        }
                    }
                    Err(InstanceError::NotFound(_)) => {}
                    Err(e) => left.push(format!("node {node}: {e}")),
                }
            }
        }
        if let Ok(nets) = Networks::open(&self.data_dir) {
            for n in &lab.networks {
                match nets.remove(n) {
                    Ok(()) => {}
                    Err(e) if e.to_string().contains("no network named") => {}
                    Err(e) => left.push(format!("network {n}: {e}")),
                }
            }
        }
        left
    }

    /// The instances of `lab`'s nodes that exist, by node name.
    pub fn instances(&self, lab: &Lab) -> BTreeMap<String, Instance> {
        let Ok(all) = Instances::open(&self.data_dir) else {
            return BTreeMap::new();
        };
        lab.nodes
            .iter()
            .filter_map(|(node, id)| Some((node.clone(), all.find(id).ok()?)))
            .collect()
    }
}

/// Kills a relay that is still the process recorded (bounded wait for its end).
fn stop_relay(relay: &ProcessId) {
    if !relay.alive() {
        return;
    }
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", relay.pid)).unwrap_or_default();
    if !cmdline.split(|&b| b == 0).any(|w| w == b"__link-relay") {
        return;
    }
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(relay.pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    let start = Instant::now();
    while relay.alive() && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(5));
    }
}
