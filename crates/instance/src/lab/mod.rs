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
use crate::record::{Instance, Instances, JsonDir, Kind, ProcessId};
use crate::run::RunRequest;

/// The label every node instance carries: its lab's name.
pub const LABEL: &str = "cela.lab";

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

/// A link as it is now (its lab ends are [`link::lab_ends`] of its index).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LinkState {
    #[serde(default)]
    pub impair: Impairment,
    /// The relay carrying an impaired link's frames.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<ProcessId>,
    /// The lab ends' interface indexes when they were joined: an end made again since (a vm
    /// node started again) is not joined.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ifindexes: Option<[u32; 2]>,
}

impl Lab {
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
    records: JsonDir,
    data_dir: PathBuf,
}

struct Lock(#[allow(dead_code)] nix::fcntl::Flock<File>);

impl Labs {
    pub fn open(data_dir: &Path) -> Result<Labs, InstanceError> {
        Ok(Labs {
            records: JsonDir::open(data_dir.join("labs"))?,
            data_dir: data_dir.to_owned(),
        })
    }

    fn lock(&self) -> Result<Lock, InstanceError> {
        self.records.lock().map(Lock)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.records.path(name)
    }

    fn save(&self, lab: &Lab) -> Result<(), InstanceError> {
        self.records.save(&lab.name, lab)
    }

    /// The bind mount of lab `name`'s network namespace, which holds its links' lab ends.
    fn netns_path(&self, name: &str) -> PathBuf {
        self.records.root.join(format!("{name}.netns"))
    }

    fn netns(&self, name: &str) -> Result<File, InstanceError> {
        let path = self.netns_path(name);
        File::open(&path).doing(|| format!("opening lab {name}'s network namespace"))
    }

    /// The lab `name`.
    pub fn get(&self, name: &str) -> Result<Lab, InstanceError> {
        if !file::valid_name(name) || !self.path(name).exists() {
            return Err(InstanceError::Invalid(format!(
                "no lab named {name} (see `cela lab ls`)"
            )));
        }
        JsonDir::read(&self.path(name))
    }

    /// Every lab, by name.
    pub fn list(&self) -> Result<Vec<Lab>, InstanceError> {
        self.records.list(file::valid_name)
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
        // A namespace left by a lab whose record was removed by hand: nothing owns it now.
        let _ = crate::network::remove_netns(&self.netns_path(&lab.name));
        let made = link::make_namespace(&self.netns_path(&lab.name))
            .and_then(|()| self.bring_up(&mut lab, store, progress));
        match made {
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
            if nets.get(&name).is_ok() {
                return Err(InstanceError::Invalid(format!(
                    "network {}: a network named {name} exists already",
                    n.name
                )));
            }
            // Recorded before it is made, so a crash in between leaves it to `lab down`.
            lab.networks.push(name.clone());
            self.save(lab)?;
            let made = nets.create(&CreateRequest {
                name,
                subnet: n.subnet.clone(),
                gateway: None,
                internal: n.internal,
                nat: n.nat,
            });
            if let Err(e) = made {
                // A failed create leaves nothing; a network of that name made meanwhile by
                // someone else is theirs, not for `lab down` to remove.
                lab.networks.pop();
                self.save(lab)?;
                return Err(InstanceError::Other(format!("network {}: {e}", n.name)));
            }
        }
        // Every node recorded first (quick), then all started at once.
        let mut made = Vec::new();
        for node in lab.plan.nodes.clone() {
            let networks = node
                .networks
                .iter()
                .map(|n| Attachment::parse(&lab.network_name(n)))
                .collect::<Result<Vec<_>, _>>()?;
            // A vm's ends of links are TAPs its supervisor makes in the lab's namespace.
            let links = match node.kind {
                Kind::Vm => lab
                    .plan
                    .links
                    .iter()
                    .enumerate()
                    .flat_map(|(i, l)| {
                        let ends = link::lab_ends(i);
                        l.ends
                            .iter()
                            .zip(ends)
                            .filter(|(e, _)| e.node == node.name)
                            .map(|(e, tap)| link::VmEnd {
                                netns: self.netns_path(&lab.name),
                                tap,
                                iface: e.iface.clone(),
                                address: e.address,
                            })
                            .collect::<Vec<_>>()
                    })
                    .collect(),
                Kind::Container => Vec::new(),
            };
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
                links,
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
        let lab_ns = self.netns(&lab.name)?;
        for (i, l) in lab.plan.links.clone().iter().enumerate() {
            let ends = link::lab_ends(i);
            let what = format!(
                "link {}:{} – {}:{}",
                l.ends[0].node, l.ends[0].iface, l.ends[1].node, l.ends[1].iface
            );
            lab.links.push(LinkState {
                impair: Impairment::default(),
                relay: None,
                ifindexes: None,
            });
            self.save(lab)?;
            for (k, end) in l.ends.iter().enumerate() {
                let vm = lab
                    .plan
                    .nodes
                    .iter()
                    .any(|n| n.name == end.node && n.kind == Kind::Vm);
                if vm {
                    // Made by the VM's start, which has returned.
                    if !link::end_exists(&lab_ns, &ends[k]) {
                        return Err(InstanceError::Other(format!(
                            "{what}: {}'s end {} is not in the lab's namespace",
                            end.node, ends[k]
                        )));
                    }
                    continue;
                }
                link::make_end(
                    &lab_ns,
                    &ends[k],
                    &netns(&end.node)?,
                    &end.iface,
                    end.address,
                )
                .map_err(|e| InstanceError::Other(format!("{what}: {e}")))?;
            }
            lab.links[i].ifindexes = link::end_indexes(&lab_ns, &ends);
            self.set_impairment(lab, &lab_ns, i, l.impair)
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
    /// whatever joined them before. A relay that does not start leaves the link a plain wire
    /// (recorded so), not dead.
    fn set_impairment(
        &self,
        lab: &mut Lab,
        lab_ns: &File,
        i: usize,
        impair: Impairment,
    ) -> Result<(), InstanceError> {
        let name = lab.name.clone();
        let ends = link::lab_ends(i);
        let state = &mut lab.links[i];
        if let Some(relay) = state.relay.take() {
            stop_relay(&relay).map_err(InstanceError::Other)?;
        }
        state.impair = Impairment::default();
        let joined = if impair.is_none() {
            link::wire(lab_ns, &ends)
        } else {
            link::unwire(lab_ns, &ends)
                .and_then(|()| self.start_relay(&name, &ends, impair))
                .map(|relay| {
                    state.relay = Some(relay);
                    state.impair = impair;
                })
                .or_else(|e| {
                    link::wire(lab_ns, &ends)?;
                    Err(e)
                })
        };
        self.save(lab)?;
        joined
    }

    /// Starts `cela __link-relay` between `ends` in lab `name`'s namespace and waits
    /// (bounded) for its word that it holds both ends.
    fn start_relay(
        &self,
        name: &str,
        ends: &[String; 2],
        impair: Impairment,
    ) -> Result<ProcessId, InstanceError> {
        let exe = std::env::current_exe().doing(|| "locating the cela executable".into())?;
        let log_path = self.records.root.join("relays.log");
        let log = File::options()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&log_path)
            .doing(|| "opening the relays' log".into())?;
        let mut child = Command::new(exe)
            .arg("__link-relay")
            .arg("--netns")
            .arg(self.netns_path(name))
            .args([&ends[0], &ends[1]])
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
        let id = ProcessId::of(pid).filter(|_| line.trim() == "ready");
        let Some(id) = id else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(InstanceError::Other(format!(
                "the link relay between {} and {} did not start (see {})",
                ends[0],
                ends[1],
                log_path.display()
            )));
        };
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
        let lab_ns = self.netns(name)?;
        if !link::ends_exist(&lab_ns, &link::lab_ends(i), lab.links[i].ifindexes) {
            let l = &lab.plan.links[i];
            return Err(InstanceError::Invalid(format!(
                "the link {}:{} – {}:{} is gone: a node of it stopped or restarted, and its links went with its namespace (cela lab down {name}, then up again)",
                l.ends[0].node, l.ends[0].iface, l.ends[1].node, l.ends[1].iface
            )));
        }
        self.set_impairment(&mut lab, &lab_ns, i, impair)?;
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

    /// Removes what `lab` records (and any instance labelled as its node); what could not
    /// be removed, described.
    fn take_down(&self, lab: &Lab) -> Vec<String> {
        let mut left = Vec::new();
        for l in &lab.links {
            if let Some(relay) = &l.relay
                && let Err(e) = stop_relay(relay)
            {
                left.push(e);
            }
        }
        // The lab's namespace holds every lab end: with it go all links, made or half-made.
        if let Err(e) = crate::network::remove_netns(&self.netns_path(&lab.name)) {
            left.push(e);
        }
        match Instances::open(&self.data_dir).and_then(|all| all.list()) {
            Ok(all) => {
                let ours = all.iter().filter(|i| {
                    lab.nodes.values().any(|id| *id == i.config.id)
                        || i.config.labels.get(LABEL) == Some(&lab.name)
                });
                for inst in ours {
                    match crate::ops::remove(inst, true) {
                        Ok(()) | Err(InstanceError::NotFound(_)) => {}
                        Err(e) => left.push(format!("node {}: {e}", inst.name())),
                    }
                }
            }
            Err(e) => left.push(format!("the nodes: {e}")),
        }
        match Networks::open(&self.data_dir) {
            Ok(nets) => {
                for n in &lab.networks {
                    if nets.get(n).is_err() {
                        continue;
                    }
                    if let Err(e) = nets.remove(n) {
                        left.push(format!("network {n}: {e}"));
                    }
                }
            }
            Err(e) => left.push(format!("the networks: {e}")),
        }
        left
    }

    /// Whether each recorded link's ends still exist, in the plan's order.
    pub fn links_up(&self, lab: &Lab) -> Vec<bool> {
        let Ok(ns) = self.netns(&lab.name) else {
            return vec![false; lab.links.len()];
        };
        (0..lab.links.len())
            .map(|i| link::ends_exist(&ns, &link::lab_ends(i), lab.links[i].ifindexes))
            .collect()
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

/// Kills a relay that is still the process recorded and waits (bounded) for its end.
fn stop_relay(relay: &ProcessId) -> Result<(), String> {
    if !relay.alive() {
        return Ok(());
    }
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", relay.pid)).unwrap_or_default();
    if !cmdline.split(|&b| b == 0).any(|w| w == b"__link-relay") {
        return Ok(());
    }
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(relay.pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    let start = Instant::now();
    while relay.alive() {
        if start.elapsed() > Duration::from_secs(5) {
            return Err(format!("the link relay {} did not end", relay.pid));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}
