//! An instance's network (`cela run [--vm] --net none|host|auto|NAME`).
//!
//! * `NAME` (repeatable): the named networks of [`named`] (a bridge many instances share,
//!   with [`firewall`]'s rules and [`guard`]'s); the container's namespace below is made the
//!   same way. Without `--net`, the built-in NAT'd network `bridge` ([`default_net_arg`]).
//! * `none`: a container gets a network namespace of its own with only the
//!   loopback interface, up (as Docker's); a microVM gets no NIC.
//! * `host`: a container shares the host's network namespace. A microVM cannot (its kernel has
//!   its own network stack), so `--vm --net host` is refused.
//! * `auto`: a private point-to-point /30 between the host and the instance, from the same
//!   allocator as `cela run --vm --net auto` (`cela_vmm::net::configure_auto`: 10.213.0.0/16,
//!   no host address or route overlapping; the host's end gets the first address, the instance
//!   the second and a default route through the host). A microVM's end is a TAP
//!   (`cela_vmm::net::setup`, configured in the guest by cela-init); a container's is a veth
//!   pair: `celaN` on the host, `eth0` in the container.
//!
//! A container's network namespace is made by the supervisor before the container: a thread
//! unshares a new one, brings `lo` up, and bind-mounts it on `netns` in the instance
//! directory; the veth is created with its peer born in it ([`rtnl::add_veth`]) and configured
//! from a thread that enters it; the OCI spec then names the file as the namespace's `path`.
//! Its ping group range is opened (`net.ipv4.ping_group_range`, per namespace, as Docker does)
//! for pings over ICMP datagram sockets; CAP_NET_RAW (Docker's default set has it, see
//! `container::capabilities`) serves those over raw sockets, such as busybox's — not with
//! `--net host`, where a raw socket would see the host's traffic.
//!
//! Teardown ([`teardown`]) deletes `eth0` inside that namespace (which takes the host's
//! `celaN` with it, at once), unmounts and removes the file, and as a last resort deletes the
//! recorded host end if its name and index still match. It runs when the instance ends and on
//! `rm`, so a supervisor killed with SIGKILL leaves nothing `cela rm` does not remove. A VM's
//! TAP needs none: it vanishes when the supervisor's descriptor closes.

pub mod firewall;
pub mod guard;
pub mod named;
pub mod ports;
pub mod rtnl;
pub mod vm_hosts;

use std::fs::File;
use std::io::Read as _;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::error::{InstanceError, IoContext};
use crate::record::{Instance, Kind};

/// What `--net` asked for, as recorded in an instance's config.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum NetMode {
    /// Loopback only (containers); no NIC (microVMs).
    #[default]
    None,
    /// The host's network namespace (containers only).
    Host,
    /// A private /30 link to the host.
    Auto,
}

impl NetMode {
    /// Parses `--net`'s value for an instance of `kind`.
    pub fn parse(arg: &str, kind: Kind) -> Result<NetMode, InstanceError> {
        let mode = match arg {
            "none" => NetMode::None,
            "host" => NetMode::Host,
            "auto" => NetMode::Auto,
            _ => {
                return Err(InstanceError::Other(format!(
                    "--net {arg:?}: expected none, host or auto"
                )));
            }
        };
        if mode == NetMode::Host && kind == Kind::Vm {
            return Err(InstanceError::Other(
                "--net host is for containers: a microVM runs its own kernel and cannot share the host's network stack (use --net auto for a link to the host)".into(),
            ));
        }
        Ok(mode)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            NetMode::None => "none",
            NetMode::Host => "host",
            NetMode::Auto => "auto",
        }
    }
}

/// `--net`'s values (repeatable): `none`, `host` or `auto` stand alone; anything else names
/// networks to join (`NAME[,ip=ADDR][,mac=MAC]`, checked against the networks that exist
/// when the instance is created). Nothing is the default ([`default_net_arg`]): the built-in
/// NAT'd network `bridge`, as for Docker.
pub fn parse_net_args(
    args: &[String],
    kind: Kind,
) -> Result<(NetMode, Vec<named::Attachment>), InstanceError> {
    if args.is_empty() {
        let default = default_net_arg();
        return parse_net_args(std::slice::from_ref(&default), kind).map_err(|e| {
            InstanceError::Invalid(format!("{} ({default}): {e}", named::DEFAULT_NETWORK_ENV))
        });
    }
    let mut mode = NetMode::None;
    let mut networks = Vec::new();
    for arg in args {
        if matches!(arg.as_str(), "none" | "host" | "auto") {
            if args.len() > 1 {
                return Err(InstanceError::Invalid(format!(
                    "--net {arg} stands alone: it cannot be combined with another --net"
                )));
            }
            mode = NetMode::parse(arg, kind)?;
        } else {
            networks.push(named::Attachment::parse(arg)?);
        }
    }
    Ok((mode, networks))
}

/// What an instance joins when no `--net` is given: `$CELA_DEFAULT_NETWORK` if set and not
/// empty (as `dockerd --bridge=none` turns Docker's default off), else the built-in network.
pub fn default_net_arg() -> String {
    std::env::var(named::DEFAULT_NETWORK_ENV)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| named::DEFAULT_NETWORK.to_owned())
}

/// The link `--net auto` made, recorded in the instance's state while it exists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkState {
    /// The host's end: a veth (containers) or TAP (microVMs), `celaN`.
    pub interface: String,
    /// Its interface index, so a later teardown never deletes another link of that name.
    pub ifindex: u32,
    /// The host end's address, `A.B.C.D/30`.
    pub host_address: String,
    /// The instance's address (its `eth0`), `A.B.C.D/30`.
    pub address: String,
}

/// The name of a container's interface inside its namespace.
const CONTAINER_IFACE: &str = "eth0";

/// The bind mount that holds a container's network namespace.
pub fn netns_path(inst: &Instance) -> PathBuf {
    inst.dir.join("netns")
}

fn ifindex(name: &str) -> Option<u32> {
    std::fs::read_to_string(Path::new("/sys/class/net").join(name).join("ifindex"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Runs `f` on a thread that has entered the network namespace open as `netns`.
pub(crate) fn in_netns<T: Send>(
    netns: &File,
    f: impl FnOnce() -> Result<T, InstanceError> + Send,
) -> Result<T, InstanceError> {
    std::thread::scope(|s| {
        s.spawn(|| {
            use std::os::fd::AsRawFd;
            // SAFETY: setns(2) on a descriptor this function borrows; CLONE_NEWNET moves only
            // the calling thread, which ends when `f` returns.
            if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
                return Err(InstanceError::Io {
                    what: "entering the instance's network namespace".into(),
                    source: std::io::Error::last_os_error(),
                });
            }
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(InstanceError::Other("a network thread panicked".into())))
    })
}

fn netif(e: cela_guest::netif::NetifError) -> InstanceError {
    InstanceError::Other(format!("in the container's network namespace: {e}"))
}

/// Makes a new network namespace with `lo` up and bind-mounts it on `path` (a new file).
pub(crate) fn make_netns(path: &Path) -> Result<(), InstanceError> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o444)
        .open(path)
        .doing(|| format!("creating {}", path.display()))?;
    let made = std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: unshare(2) with CLONE_NEWNET moves only this thread, which ends here.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } < 0 {
                return Err(InstanceError::Io {
                    what: "making a network namespace".into(),
                    source: std::io::Error::last_os_error(),
                });
            }
            cela_guest::netif::set_up("lo").map_err(netif)?;
            // /proc/sys/net is the opening thread's namespace's. A nicety: not fatal.
            if let Err(e) = std::fs::write("/proc/sys/net/ipv4/ping_group_range", "0 2147483647") {
                tracing::warn!(
                    "setting net.ipv4.ping_group_range in {}: {e}",
                    path.display()
                );
            }
            mount(
                Some("/proc/thread-self/ns/net"),
                path,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(|e| InstanceError::Io {
                what: format!("bind-mounting the network namespace on {}", path.display()),
                source: e.into(),
            })
        })
        .join()
        .unwrap_or_else(|_| Err(InstanceError::Other("a network thread panicked".into())))
    });
    if made.is_err() {
        let _ = std::fs::remove_file(path);
    }
    made
}

/// Unmounts and removes a network namespace's bind mount made by [`make_netns`] (the
/// namespace goes with its last user); one already gone is fine.
pub(crate) fn remove_netns(path: &Path) -> Result<(), String> {
    if !path.exists() {
        return Ok(());
    }
    match umount2(path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) => {}
        Err(e) => return Err(format!("unmounting {}: {e}", path.display())),
    }
    std::fs::remove_file(path).map_err(|e| format!("removing {}: {e}", path.display()))
}

/// Creates the veth pair `celaN` ↔ `eth0` (in `netns`); returns the host end's name.
fn create_veth(netns: &File) -> Result<String, InstanceError> {
    for n in 0..4096 {
        let name = format!("cela{n}");
        if Path::new("/sys/class/net").join(&name).exists() {
            continue;
        }
        match rtnl::add_veth(&name, CONTAINER_IFACE, netns.as_fd()) {
            Ok(()) => return Ok(name),
            // Taken meanwhile (another instance, or a VM's TAP): try the next.
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => continue,
            Err(e) => {
                return Err(InstanceError::Io {
                    what: format!("--net auto: creating the veth pair {name} ↔ {CONTAINER_IFACE}"),
                    source: e,
                });
            }
        }
    }
    Err(InstanceError::Other(
        "--net auto: no free interface name cela0…cela4095".into(),
    ))
}

/// Sets up a container's network before it is created: for `none` and `auto` its namespace
/// (and for `auto` the veth link); nothing for `host`. What was made is undone on error.
pub fn setup_container(inst: &Instance) -> Result<Option<NetworkState>, InstanceError> {
    if inst.config.net == NetMode::Host {
        return Ok(None);
    }
    let path = netns_path(inst);
    // What an earlier run left (a killed supervisor).
    teardown(inst, None);
    make_netns(&path)?;
    if !inst.config.networks.is_empty() {
        let joined = (|| {
            let netns = File::open(&path).doing(|| format!("opening {}", path.display()))?;
            let nets = named::Networks::open(data_dir_of(inst))?;
            nets.join_container(inst, &netns)?;
            nets.write_initial_hosts(&inst.config.id, &inst.dir.join(named::HOSTS_FILE))
        })();
        if let Err(e) = joined {
            teardown(inst, None);
            return Err(e);
        }
        return Ok(None);
    }
    if inst.config.net == NetMode::None {
        return Ok(None);
    }
    firewall::ensure_auto_links_or_warn();
    let linked = (|| {
        let netns = File::open(&path).doing(|| format!("opening {}", path.display()))?;
        let name = create_veth(&netns)?;
        let configured = (|| {
            let index = ifindex(&name).ok_or_else(|| {
                InstanceError::Other(format!("--net auto: the new veth {name} is not listed"))
            })?;
            let link = cela_vmm::net::configure_auto(&name)
                .map_err(|e| InstanceError::Other(e.to_string()))?;
            let (addr, gateway) = (link.host(2), link.host(1));
            in_netns(&netns, || {
                cela_guest::netif::set_ipv4(CONTAINER_IFACE, addr, link.prefix).map_err(netif)?;
                cela_guest::netif::set_up(CONTAINER_IFACE).map_err(netif)?;
                cela_guest::netif::add_default_route(gateway).map_err(netif)
            })?;
            Ok(NetworkState {
                interface: name.clone(),
                ifindex: index,
                host_address: format!("{gateway}/{}", link.prefix),
                address: format!("{addr}/{}", link.prefix),
            })
        })();
        if configured.is_err() {
            let _ = rtnl::delete_link(&name);
        }
        configured
    })();
    if linked.is_err() {
        teardown(inst, None);
    }
    linked.map(Some)
}

/// A microVM's network cards, ready for the machine: its networks' (or `--net auto`'s),
/// then its lab links' (whose guest side is in `links`).
pub struct VmNet {
    pub cards: Vec<cela_vmm::net::HostNet>,
    /// The link recorded (the first network's, or `--net auto`'s): ports are published to it.
    pub state: Option<NetworkState>,
    pub links: Vec<cela_guest::LinkRequest>,
}

/// Sets up a microVM's network before it boots: a TAP per named network (joined to it), or
/// `--net auto`'s link, then a TAP in the lab's namespace per lab link it ends. What was made
/// is undone on error (a TAP goes when it is dropped; networks are left).
pub fn setup_vm(inst: &Instance) -> Result<VmNet, InstanceError> {
    let mut vm = setup_vm_networks(inst)?;
    let mut made = Vec::new();
    for end in &inst.config.links {
        match end.open() {
            Ok(tap) => made.push((tap, end)),
            Err(e) => {
                if !inst.config.networks.is_empty()
                    && let Ok(nets) = named::Networks::open(data_dir_of(inst))
                {
                    nets.leave(&inst.config.id);
                }
                return Err(e);
            }
        }
    }
    for (tap, end) in made {
        let mac = cela_vmm::net::random_mac();
        vm.links.push(cela_guest::LinkRequest {
            name: end.iface.clone(),
            mac,
            address: end.address,
        });
        vm.cards.push(cela_vmm::net::HostNet {
            nic: cela_vmm::net::NicConfig {
                tap: std::sync::Arc::new(tap),
                mac,
            },
            guest: None,
        });
    }
    Ok(vm)
}

fn setup_vm_networks(inst: &Instance) -> Result<VmNet, InstanceError> {
    let none = || VmNet {
        cards: Vec::new(),
        state: None,
        links: Vec::new(),
    };
    if !inst.config.networks.is_empty() {
        // A TAP of cela's pattern without an address per network, plugged into its bridge.
        let mut taps = Vec::new();
        for _ in &inst.config.networks {
            let tap = cela_vmm::net::tap::Tap::create(cela_vmm::net::AUTO_TAP_PATTERN)
                .map_err(|e| InstanceError::Other(format!("creating the microVM's TAP: {e}")))?;
            taps.push(tap);
        }
        let names: Vec<&str> = taps.iter().map(|t| t.name()).collect();
        let nets = named::Networks::open(data_dir_of(inst))?;
        // The names of the network's instances, which the supervisor passes to the guest
        // ([`vm_hosts`]) and the network code rewrites as they come and go.
        let joined = nets.join_vm(inst, &names).and_then(|guests| {
            nets.write_initial_hosts(&inst.config.id, &inst.dir.join(named::HOSTS_FILE))
                .map(|()| guests)
        });
        let guests = match joined {
            Ok(g) => g,
            Err(e) => {
                nets.leave(&inst.config.id);
                return Err(e);
            }
        };
        // The first card's link is the one recorded (and ports are published to).
        let first = &guests[0];
        let name = taps[0].name().to_owned();
        let state = NetworkState {
            ifindex: ifindex(&name).unwrap_or(0),
            interface: name,
            host_address: if first.gateway.is_unspecified() {
                String::new()
            } else {
                format!("{}/{}", first.gateway, first.prefix)
            },
            address: format!("{}/{}", first.address, first.prefix),
        };
        let host = taps
            .into_iter()
            .zip(guests)
            .map(|(tap, guest)| cela_vmm::net::HostNet {
                nic: cela_vmm::net::NicConfig {
                    tap: std::sync::Arc::new(tap),
                    mac: guest.mac,
                },
                guest: Some(guest),
            })
            .collect();
        return Ok(VmNet {
            cards: host,
            state: Some(state),
            links: Vec::new(),
        });
    }
    if inst.config.net != NetMode::Auto {
        return Ok(none());
    }
    firewall::ensure_auto_links_or_warn();
    let host = cela_vmm::net::setup(&cela_vmm::net::NetMode::Auto)
        .map_err(|e| InstanceError::Other(e.to_string()))?;
    let guest = host.guest.expect("--net auto tells the guest its address");
    let name = host.nic.tap.name().to_owned();
    let state = NetworkState {
        ifindex: ifindex(&name).unwrap_or(0),
        interface: name,
        host_address: format!("{}/{}", guest.gateway, guest.prefix),
        address: format!("{}/{}", guest.address, guest.prefix),
    };
    Ok(VmNet {
        cards: vec![host],
        state: Some(state),
        links: Vec::new(),
    })
}

/// Points the container's spec at its network: the namespace file for `none`/`auto`, the
/// host's namespace (no network namespace entry) for `host`. With a network beyond loopback
/// the container also gets the host's name servers, as Docker gives them: a copy of the host's
/// `/etc/resolv.conf` in the instance directory, bind-mounted read-only on the container's.
pub fn apply_to_spec(spec: &mut Value, inst: &Instance) -> Result<(), InstanceError> {
    if let Some(namespaces) = spec["linux"]["namespaces"].as_array_mut() {
        namespaces.retain(|n| n["type"] != "network");
        if inst.config.net != NetMode::Host {
            namespaces.push(json!({"type": "network", "path": netns_path(inst)}));
        }
    }
    if !inst.config.networks.is_empty()
        && let Some(mounts) = spec["mounts"].as_array_mut()
    {
        mounts.push(json!({
            "destination": "/etc/hosts",
            "type": "bind",
            "source": inst.dir.join(named::HOSTS_FILE),
            "options": ["rbind", "ro", "rprivate", "nosuid", "nodev", "noexec"],
        }));
    }
    if matches!(inst.config.net, NetMode::Host | NetMode::Auto) || !inst.config.networks.is_empty()
    {
        let copy = inst.dir.join("resolv.conf");
        let mut text = Vec::new();
        // The host's own file, but still bounded: it is copied into a container.
        let _ = File::open("/etc/resolv.conf")
            .and_then(|f| std::io::Read::take(f, 64 << 10).read_to_end(&mut text));
        std::fs::write(&copy, &text).doing(|| format!("writing {}", copy.display()))?;
        if let Some(mounts) = spec["mounts"].as_array_mut() {
            mounts.push(json!({
                "destination": "/etc/resolv.conf",
                "type": "bind",
                "source": copy,
                "options": ["rbind", "ro", "rprivate", "nosuid", "nodev", "noexec"],
            }));
        }
    }
    Ok(())
}

/// Removes a container's network: `eth0` in its namespace (with the host's end), the
/// namespace's bind mount and file, and the `recorded` host end if it is still the same link.
/// Quiet and idempotent: what is not there is skipped.
pub fn teardown(inst: &Instance, recorded: Option<&NetworkState>) {
    teardown_at(
        &inst.dir,
        recorded.filter(|_| inst.config.kind == Kind::Container),
    );
}

/// Deletes the host's end of a link `rec` recorded (a container's veth end, a microVM's TAP)
/// if that link still exists (same name and index: a name reused since is left alone). A
/// microVM's monitor killed a moment ago may still hold its TAP open; the link goes now, not
/// whenever its last descriptor closes.
pub fn delete_host_link(rec: &NetworkState) {
    if ifindex(&rec.interface) == Some(rec.ifindex)
        && let Err(e) = rtnl::delete_link(&rec.interface)
        && e.raw_os_error() != Some(libc::ENODEV)
    {
        tracing::warn!("deleting {}: {e}", rec.interface);
    }
}

/// The data dir an instance belongs to.
fn data_dir_of(inst: &Instance) -> &Path {
    inst.data_dir().unwrap_or(Path::new("/"))
}

/// The data dir a (possibly retired) instance directory belongs to.
fn data_dir_of_dir(dir: &Path) -> &Path {
    dir.parent()
        .and_then(Path::parent)
        .unwrap_or(Path::new("/"))
}

/// Takes the instance whose directory is `dir` off every named network it is on and
/// unpublishes its ports (its run ends, or it is removed).
pub fn release_links(dir: &Path) {
    let Some(id) = named::id_of_dir(dir) else {
        return;
    };
    // Only an instance that published ports has a table to delete (nft is not run for the
    // others, whose end this would slow).
    let marker = dir.join(ports::MARKER);
    if marker.exists() {
        ports::unpublish(&id);
        let _ = std::fs::remove_file(&marker);
    }
    if let Ok(nets) = named::Networks::open(data_dir_of_dir(dir)) {
        nets.leave(&id);
    }
}

/// Publishes `inst`'s ports (`-p`) to its address on the link just set up (`state` is its
/// `--net auto` link, if it has one; else its first named network's), once no other running
/// instance and no host process has those ports.
pub fn publish_ports(inst: &Instance, state: Option<&NetworkState>) -> Result<(), InstanceError> {
    if inst.config.ports.is_empty() {
        return Ok(());
    }
    let nets = named::Networks::open(data_dir_of(inst))?;
    let on_link = state.and_then(|s| {
        let (addr, prefix) = s.address.split_once('/')?;
        let (addr, prefix): (std::net::Ipv4Addr, u8) = (addr.parse().ok()?, prefix.parse().ok()?);
        let mask = u32::from(cela_guest::netif::netmask(prefix));
        Some((
            addr,
            (std::net::Ipv4Addr::from(u32::from(addr) & mask), prefix),
        ))
    });
    let (target, subnet) = match on_link {
        Some(t) => Some(t),
        None => nets.address_of(inst),
    }
    .ok_or_else(|| {
        InstanceError::Invalid(format!(
            "{} has no address to publish ports to (-p needs --net auto or a network)",
            inst.config.name
        ))
    })?;
    // Marked first: a supervisor killed right after publishing still has its table removed.
    let marker = inst.dir.join(ports::MARKER);
    std::fs::write(&marker, b"").doing(|| format!("writing {}", marker.display()))?;
    nets.publish(inst, target, subnet)
}

/// [`teardown`] of the instance directory `dir` (also one whose config cannot be read).
pub fn teardown_at(dir: &Path, recorded: Option<&NetworkState>) {
    let path = dir.join("netns");
    if let Ok(netns) = File::open(&path) {
        // Fails (EINVAL) on a plain file: nothing was mounted, so there is no link in it.
        let _ = in_netns(&netns, || {
            for i in 0..named::MAX_ATTACHMENTS {
                let name = format!("eth{i}");
                match rtnl::delete_link(&name) {
                    Err(e) if e.raw_os_error() != Some(libc::ENODEV) => {
                        tracing::warn!("deleting {name} of {}: {e}", path.display());
                    }
                    _ => {}
                }
            }
            Ok(())
        });
    }
    release_links(dir);
    if let Err(e) = remove_netns(&path) {
        tracing::warn!("{e}");
    }
    if let Some(rec) = recorded {
        delete_host_link(rec);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_values_parse_per_kind() {
        assert_eq!(
            NetMode::parse("none", Kind::Container).unwrap(),
            NetMode::None
        );
        assert_eq!(
            NetMode::parse("host", Kind::Container).unwrap(),
            NetMode::Host
        );
        assert_eq!(NetMode::parse("auto", Kind::Vm).unwrap(), NetMode::Auto);
        assert_eq!(NetMode::parse("none", Kind::Vm).unwrap(), NetMode::None);
        let err = NetMode::parse("host", Kind::Vm).unwrap_err().to_string();
        assert!(err.contains("--net host is for containers"), "{err}");
        for bad in ["", "Auto", "bridge", "tap=x", "auto "] {
            let err = NetMode::parse(bad, Kind::Container)
                .unwrap_err()
                .to_string();
            assert!(err.contains("expected none, host or auto"), "{err}");
        }
    }
}
