//! How a container is confined beyond its namespaces: its capabilities (Docker's default set,
//! changed by `--cap-add`/`--cap-drop`) and its seccomp filter (cela's default profile,
//! `cela_runtime::seccomp`, or `--security-opt seccomp=unconfined|PATH`). Containers always run
//! with no_new_privs, so a setuid binary in an image gains nothing.

use std::collections::HashSet;
use std::path::Path;

use oci_spec::runtime::Capability;
use serde::{Deserialize, Serialize};

use crate::error::InstanceError;
use crate::network::NetMode;
use crate::record::InstanceConfig;

/// `--cap-add`, `--cap-drop` and `--security-opt` of a container.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Security {
    /// Capabilities added to Docker's default set (`ALL`, or names as `capabilities(7)` has
    /// them, `CAP_` optional).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cap_add: Vec<String>,
    /// Capabilities taken from it (`ALL` drops every one).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cap_drop: Vec<String>,
    /// The seccomp filter.
    #[serde(default)]
    pub seccomp: Seccomp,
}

/// Which seccomp filter a container runs under.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Seccomp {
    /// cela's default profile (`cela_runtime::seccomp`), for the container's capabilities.
    #[default]
    Default,
    /// No filter (`--security-opt seccomp=unconfined`).
    Unconfined,
    /// A profile read from a file when the instance was created (`seccomp=PATH`), as an OCI
    /// `linux.seccomp` object.
    Profile(serde_json::Value),
}

impl Security {
    /// Builds the settings from the flags, checking every capability name and reading a
    /// seccomp profile file (its rules conditioned on capabilities resolved for the
    /// container's set). `opts` are Docker's `--security-opt` values: `seccomp=unconfined`,
    /// `seccomp=PATH`, `no-new-privileges[=true]` (always on).
    pub fn parse(
        cap_add: &[String],
        cap_drop: &[String],
        opts: &[String],
        net: NetMode,
    ) -> Result<Security, InstanceError> {
        let mut s = Security {
            cap_add: cap_add.to_vec(),
            cap_drop: cap_drop.to_vec(),
            seccomp: Seccomp::Default,
        };
        let caps = effective(&s, net)?;
        for opt in opts {
            let (key, value) = opt.split_once(['=', ':']).unwrap_or((opt, ""));
            match (key, value) {
                ("seccomp", "unconfined") => s.seccomp = Seccomp::Unconfined,
                ("seccomp", "") => {
                    return Err(InstanceError::Other(
                        "--security-opt seccomp= needs `unconfined` or a profile's path".into(),
                    ));
                }
                ("seccomp", path) => {
                    let profile = cela_runtime::seccomp::load_profile(Path::new(path), &caps)?;
                    s.seccomp = Seccomp::Profile(
                        serde_json::to_value(profile).expect("a seccomp profile serializes"),
                    );
                }
                ("no-new-privileges", "" | "true") => {}
                _ => {
                    return Err(InstanceError::Other(format!(
                        "--security-opt {opt}: not supported (cela takes seccomp=unconfined, \
                         seccomp=PATH and no-new-privileges, which is always on)"
                    )));
                }
            }
        }
        Ok(s)
    }
}

/// The capabilities of a container: Docker's default set (without CAP_NET_RAW in the host's
/// network namespace, where a raw socket would see the host's traffic), then `--cap-drop` and
/// `--cap-add` (`ALL` for every capability), as Docker applies them.
pub fn capabilities(config: &InstanceConfig) -> Result<HashSet<Capability>, InstanceError> {
    effective(&config.security, config.net)
}

fn effective(s: &Security, net: NetMode) -> Result<HashSet<Capability>, InstanceError> {
    use cela_runtime::spec::{CONTAINER_CAPS, all_capabilities, parse_capability};
    let parse = |names: &[String]| -> Result<Vec<Capability>, InstanceError> {
        let mut out = Vec::new();
        for n in names {
            if n.eq_ignore_ascii_case("all") {
                out.extend(all_capabilities());
            } else {
                out.push(parse_capability(n)?);
            }
        }
        Ok(out)
    };
    let mut caps: HashSet<Capability> = CONTAINER_CAPS.into_iter().collect();
    if net == NetMode::Host {
        caps.remove(&Capability::NetRaw);
    }
    for c in parse(&s.cap_drop)? {
        caps.remove(&c);
    }
    caps.extend(parse(&s.cap_add)?);
    Ok(caps)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(add: &[&str], drop: &[&str], opts: &[&str]) -> Result<Security, InstanceError> {
        let v = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        Security::parse(&v(add), &v(drop), &v(opts), NetMode::None)
    }

    #[test]
    fn capabilities_follow_dockers_rules() {
        let caps = |s: &Security, net| effective(s, net).unwrap();
        let s = parse(&[], &[], &[]).unwrap();
        assert_eq!(caps(&s, NetMode::None).len(), 14);
        assert!(caps(&s, NetMode::None).contains(&Capability::NetRaw));
        assert!(!caps(&s, NetMode::Host).contains(&Capability::NetRaw));
        assert!(!caps(&s, NetMode::None).contains(&Capability::SysAdmin));
        let s = parse(&["sys_admin"], &["CAP_CHOWN"], &[]).unwrap();
        let c = caps(&s, NetMode::None);
        assert!(c.contains(&Capability::SysAdmin) && !c.contains(&Capability::Chown));
        let s = parse(&["NET_ADMIN"], &["ALL"], &[]).unwrap();
        assert_eq!(caps(&s, NetMode::None), [Capability::NetAdmin].into());
        assert!(parse(&["CAP_BOGUS"], &[], &[]).is_err());
    }

    #[test]
    fn security_opts_are_checked() {
        assert_eq!(
            parse(&[], &[], &["seccomp=unconfined"]).unwrap().seccomp,
            Seccomp::Unconfined
        );
        assert_eq!(
            parse(&[], &[], &["no-new-privileges"]).unwrap().seccomp,
            Seccomp::Default
        );
        for bad in [
            "seccomp=",
            "seccomp=/nonexistent.json",
            "apparmor=x",
            "label=disable",
        ] {
            assert!(parse(&[], &[], &[bad]).is_err(), "{bad}");
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p.json");
        std::fs::write(&p, r#"{"defaultAction":"SCMP_ACT_ALLOW"}"#).unwrap();
        let s = parse(&[], &[], &[&format!("seccomp={}", p.display())]).unwrap();
        assert!(matches!(s.seccomp, Seccomp::Profile(_)));
    }
}
