//! Processes started in a running container (`exec`), confined exactly as its init.
//!
//! cela does not use libcontainer's tenant builder for this: in libcontainer 0.7 it rebuilds the
//! spec it runs with and keeps only the namespaces, cgroup path and personality of the
//! container's `linux` section, so an exec'd process ran **without the container's seccomp
//! filter**, and it never joins the **user namespace** (its list of namespaces to join has no
//! `user`), so a process exec'd into a container with a user namespace (the jail) ran as the
//! host's root. runc applies both. [`spawn`] joins the container itself, with libcontainer's
//! public pieces for the single steps (capabilities, seccomp, AppArmor, the console):
//!
//! * At `create`, the container's `process` and `linux.seccomp` are recorded in the state
//!   directory ([`Confinement`], `cela-confinement.json`), so a bundle edited afterwards cannot
//!   weaken what `exec` applies.
//! * Every exec runs a full process object ([`exec_process`]): the caller's `process.json`
//!   (containerd passes one) with what it leaves out taken from the container's, or the
//!   container's own process with runc's `exec` overrides. Capabilities, no_new_privs, rlimits,
//!   the AppArmor profile and the OOM score come along.
//! * [`spawn`] forks, joins every namespace of the container's init that differs from the
//!   caller's in one `setns` on a pidfd (the kernel orders them, user namespace included), forks
//!   again so the process is inside the pid namespace, puts it in the container's cgroup before
//!   it runs anything of its own, and then applies the process object in runc's order.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{
    Capability, LinuxCapabilities, LinuxPersonality, LinuxSeccomp, Process, Spec,
};
use serde::{Deserialize, Serialize};

use crate::error::Error;

mod spawn;

pub use spawn::{Failure, Io, Started, spawn};

/// The file in a container's state directory that holds its [`Confinement`].
pub const CONFINEMENT_FILE: &str = "cela-confinement.json";

/// Largest `process.json` or confinement record read (they are a few KiB).
const MAX_PROCESS_JSON: u64 = 1 << 20;

/// What confines a container's processes, recorded when it is created.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Confinement {
    /// The container's process (its capabilities, rlimits, labels, no_new_privs, user, env).
    pub process: Option<Process>,
    /// The container's seccomp filter.
    pub seccomp: Option<LinuxSeccomp>,
    /// The container's execution domain (`linux.personality`): an exec'd process runs in the
    /// same one (`uname -m` says i686 in a `LINUX32` container). Absent in older records.
    #[serde(default)]
    pub personality: Option<LinuxPersonality>,
}

impl Confinement {
    /// The confinement a bundle's spec asks for.
    pub fn of(spec: &Spec) -> Confinement {
        Confinement {
            process: spec.process().clone(),
            seccomp: spec.linux().as_ref().and_then(|l| l.seccomp().clone()),
            personality: spec.linux().as_ref().and_then(|l| l.personality().clone()),
        }
    }

    /// Writes the record into the container's state directory `dir`.
    pub fn save(&self, dir: &Path) -> Result<(), Error> {
        let path = dir.join(CONFINEMENT_FILE);
        let text = serde_json::to_vec(self).expect("a confinement serializes");
        fs::write(&path, text).map_err(|source| Error::Io {
            what: format!("writing {}", path.display()),
            source,
        })
    }

    /// Reads the record of the container in `dir`; `None` for a container created before
    /// records existed.
    pub fn load(dir: &Path) -> Result<Option<Confinement>, Error> {
        let path = dir.join(CONFINEMENT_FILE);
        if !path.exists() {
            return Ok(None);
        }
        read_json(&path).map(Some)
    }
}

/// Reads a small JSON file, refusing one larger than [`MAX_PROCESS_JSON`].
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, Error> {
    let text = crate::spec::read_bounded(path, MAX_PROCESS_JSON)?;
    serde_json::from_slice(&text)
        .map_err(|e| Error::invalid(&path.display().to_string(), &e.to_string()))
}

/// runc's `exec` options that change the container's process (when no `process.json` is given).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub args: Vec<String>,
    pub env: HashMap<String, String>,
    pub cwd: Option<PathBuf>,
    pub user: Option<(u32, Option<u32>)>,
    pub additional_gids: Vec<u32>,
    pub caps: Vec<String>,
    pub no_new_privs: bool,
    pub tty: bool,
}

/// The process an exec runs: `given` (a caller's process object) with what it leaves unset taken
/// from the container's process, or the container's process with `overrides` applied.
pub fn exec_process(
    container: &Confinement,
    given: Option<Process>,
    overrides: &Overrides,
) -> Result<Process, Error> {
    let base = container.process.clone().unwrap_or_default();
    let p = match given {
        Some(mut p) => {
            if p.capabilities().is_none() {
                p.set_capabilities(base.capabilities().clone());
            }
            if p.rlimits().is_none() {
                p.set_rlimits(base.rlimits().clone());
            }
            if p.apparmor_profile().is_none() {
                p.set_apparmor_profile(base.apparmor_profile().clone());
            }
            if p.selinux_label().is_none() {
                p.set_selinux_label(base.selinux_label().clone());
            }
            if p.oom_score_adj().is_none() {
                p.set_oom_score_adj(base.oom_score_adj());
            }
            if base.no_new_privileges() == Some(true) {
                p.set_no_new_privileges(Some(true));
            }
            p
        }
        None => with_overrides(base, overrides)?,
    };
    Ok(p)
}

fn no_caps() -> LinuxCapabilities {
    let mut c = LinuxCapabilities::default();
    c.set_bounding(Some(Default::default()))
        .set_effective(Some(Default::default()))
        .set_permitted(Some(Default::default()))
        .set_inheritable(None)
        .set_ambient(None);
    c
}

fn with_overrides(mut p: Process, o: &Overrides) -> Result<Process, Error> {
    if o.args.is_empty() {
        return Err(Error::Usage("exec needs a command or --process".into()));
    }
    p.set_args(Some(o.args.clone()));
    p.set_command_line(None);
    let mut env: Vec<String> = p
        .env()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|e| !o.env.contains_key(e.split('=').next().unwrap_or_default()))
        .collect();
    let mut extra: Vec<_> = o.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    extra.sort();
    env.extend(extra);
    p.set_env(Some(env));
    if let Some(cwd) = &o.cwd {
        if !cwd.is_absolute() {
            return Err(Error::Usage(format!(
                "exec --cwd {}: the working directory must be an absolute path",
                cwd.display()
            )));
        }
        p.set_cwd(cwd.clone());
    }
    if let Some((uid, gid)) = o.user {
        let mut user = p.user().clone();
        user.set_uid(uid);
        user.set_gid(gid.unwrap_or(0));
        user.set_additional_gids(None);
        p.set_user(user);
    }
    if !o.additional_gids.is_empty() {
        let mut user = p.user().clone();
        user.set_additional_gids(Some(o.additional_gids.clone()));
        p.set_user(user);
    }
    if !o.caps.is_empty() {
        let mut caps = p.capabilities().clone().unwrap_or_else(no_caps);
        for name in &o.caps {
            let cap: Capability =
                serde_json::from_value(serde_json::Value::String(name.clone()))
                    .map_err(|_| Error::Usage(format!("exec --cap {name}: unknown capability")))?;
            let add = |s: &Option<oci_spec::runtime::Capabilities>| {
                let mut s = s.clone().unwrap_or_default();
                s.insert(cap);
                Some(s)
            };
            let (b, e, pm) = (
                add(caps.bounding()),
                add(caps.effective()),
                add(caps.permitted()),
            );
            caps.set_bounding(b).set_effective(e).set_permitted(pm);
        }
        p.set_capabilities(Some(caps));
    }
    if o.no_new_privs {
        p.set_no_new_privileges(Some(true));
    }
    p.set_terminal(Some(o.tty));
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::Capabilities;

    fn container(nnp: Option<bool>, seccomp: bool) -> Confinement {
        let spec = crate::spec::jail_spec();
        let mut process = spec.process().clone().unwrap();
        process.set_no_new_privileges(nnp);
        process.set_oom_score_adj(Some(100));
        process.set_apparmor_profile(Some("cela-test".into()));
        Confinement {
            process: Some(process),
            seccomp: if seccomp {
                spec.linux().as_ref().unwrap().seccomp().clone()
            } else {
                None
            },
            personality: None,
        }
    }

    fn set(caps: &Option<Capabilities>) -> Vec<Capability> {
        let mut v: Vec<_> = caps.clone().unwrap_or_default().into_iter().collect();
        v.sort_by_key(|c| c.to_string());
        v
    }

    #[test]
    fn an_exec_keeps_the_containers_confinement() {
        let c = container(Some(true), true);
        let o = Overrides {
            args: vec!["ls".into()],
            env: [("A".to_string(), "1".to_string())].into(),
            cwd: Some("/tmp".into()),
            user: Some((7, Some(8))),
            ..Default::default()
        };
        let p = exec_process(&c, None, &o).unwrap();
        let base = c.process.as_ref().unwrap();
        assert_eq!(p.args().as_deref(), Some(&["ls".to_string()][..]));
        assert_eq!(p.capabilities(), base.capabilities());
        assert_eq!(p.rlimits(), base.rlimits());
        assert_eq!(p.no_new_privileges(), Some(true));
        assert_eq!(p.apparmor_profile().as_deref(), Some("cela-test"));
        assert_eq!(p.oom_score_adj(), Some(100));
        assert_eq!((p.user().uid(), p.user().gid()), (7, 8));
        assert!(p.env().as_ref().unwrap().contains(&"A=1".to_string()));
        assert!(
            p.env()
                .as_ref()
                .unwrap()
                .iter()
                .any(|e| e.starts_with("PATH="))
        );
    }

    fn base_caps(c: &Confinement) -> &Option<LinuxCapabilities> {
        c.process.as_ref().unwrap().capabilities()
    }

    #[test]
    fn a_given_process_gets_what_it_leaves_out_from_the_container() {
        let c = container(Some(true), true);
        let given: Process =
            serde_json::from_str(r#"{"args":["id"],"cwd":"/","user":{"uid":0,"gid":0}}"#).unwrap();
        let p = exec_process(&c, Some(given), &Overrides::default()).unwrap();
        assert_eq!(p.capabilities(), base_caps(&c));
        assert_eq!(p.rlimits(), c.process.as_ref().unwrap().rlimits());
        assert_eq!(p.no_new_privileges(), Some(true));
        assert_eq!(p.args().as_deref(), Some(&["id".to_string()][..]));
    }

    #[test]
    fn bad_overrides_are_refused() {
        let c = container(Some(true), false);
        let o = |f: fn(&mut Overrides)| {
            let mut o = Overrides {
                args: vec!["x".into()],
                ..Default::default()
            };
            f(&mut o);
            exec_process(&c, None, &o)
        };
        assert!(matches!(o(|o| o.args.clear()), Err(Error::Usage(_))));
        assert!(matches!(
            o(|o| o.cwd = Some("rel".into())),
            Err(Error::Usage(_))
        ));
        assert!(matches!(
            o(|o| o.caps = vec!["CAP_BOGUS".into()]),
            Err(Error::Usage(_))
        ));
        let p = o(|o| o.caps = vec!["CAP_NET_ADMIN".into()]).unwrap();
        assert!(
            set(p.capabilities().as_ref().unwrap().effective()).contains(&Capability::NetAdmin)
        );
    }
}
