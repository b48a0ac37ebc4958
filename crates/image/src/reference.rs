//! Image references as Docker and OCI registries spell them (the grammar of
//! distribution/reference): `[REGISTRY/]REPOSITORY[:TAG][@sha256:HEX]`.
//!
//! Normalization follows Docker: a first component with a `.` or `:` or equal to `localhost`
//! is a registry, otherwise the registry is `docker.io`; a one-component repository on
//! `docker.io` lives under `library/`; the tag defaults to `latest` when there is no digest.
//! [`Reference::familiar`] undoes that for display (`busybox:latest`).

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use crate::{Digest, ImageError};

/// The registry of references that name none.
pub const DEFAULT_REGISTRY: &str = "docker.io";

/// A parsed, normalized image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// Registry host, with its port if any (`docker.io`, `127.0.0.1:5000`).
    pub registry: String,
    /// Repository path (`library/busybox`).
    pub repository: String,
    /// Tag; `latest` when neither tag nor digest was given.
    pub tag: Option<String>,
    /// Digest, when the reference pins one.
    pub digest: Option<Digest>,
}

impl Reference {
    /// `registry/repository:tag` — the name an image is stored under; `None` for a reference
    /// with only a digest.
    pub fn name(&self) -> Option<String> {
        self.tag
            .as_ref()
            .map(|t| format!("{}/{}:{t}", self.registry, self.repository))
    }

    /// The reference as a user would type it: `busybox:latest` rather than
    /// `docker.io/library/busybox:latest`.
    pub fn familiar(&self) -> String {
        familiar_name(&self.to_string())
    }

    /// Whether the registry is this machine (`localhost`, 127.0.0.0/8, `::1`), which cela
    /// talks to over plain HTTP as Docker does by default.
    pub fn is_loopback_registry(&self) -> bool {
        let host = match self.registry.strip_prefix('[') {
            Some(rest) => rest.split(']').next().unwrap_or(rest),
            None => self.registry.split(':').next().unwrap_or(&self.registry),
        };
        host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// Strips the default registry and `library/` from a full name for display.
pub fn familiar_name(full: &str) -> String {
    let rest = match full.strip_prefix("docker.io/") {
        Some(r) => r,
        None => return full.to_owned(),
    };
    rest.strip_prefix("library/").unwrap_or(rest).to_owned()
}

impl FromStr for Reference {
    type Err = ImageError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| ImageError::BadReference {
            input: input.to_owned(),
            why: why.to_owned(),
        };
        if input.is_empty() {
            return Err(bad("empty"));
        }
        if input.len() > 255 + 64 + 128 {
            return Err(bad("too long"));
        }
        let (rest, digest) = match input.split_once('@') {
            Some((rest, d)) => (rest, Some(d.parse::<Digest>()?)),
            None => (input, None),
        };
        // The tag follows the last ':' that comes after the last '/'.
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
            None => (rest, None),
        };
        if let Some(t) = tag
            && !valid_tag(t)
        {
            return Err(bad(
                "a tag is 1-128 of [A-Za-z0-9_.-] and does not start with '.' or '-'",
            ));
        }
        let (registry, repository) = match name.split_once('/') {
            Some((first, path))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                if !valid_registry(first) {
                    return Err(bad("the registry is HOST[:PORT]"));
                }
                (first.to_owned(), path.to_owned())
            }
            _ => (DEFAULT_REGISTRY.to_owned(), name.to_owned()),
        };
        if repository.is_empty() {
            return Err(bad("no repository name"));
        }
        if repository.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(bad("repository names must be lowercase"));
        }
        if let Some(c) = repository.split('/').find(|c| !valid_component(c)) {
            return Err(bad(&format!(
                "repository component {c:?} is not lowercase letters and digits joined by '.', '_', '__' or '-'"
            )));
        }
        let repository = if registry == DEFAULT_REGISTRY && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        let tag = match (tag, &digest) {
            (Some(t), _) => Some(t.to_owned()),
            (None, None) => Some("latest".to_owned()),
            (None, Some(_)) => None,
        };
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }
}

fn valid_tag(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 128
        && !t.starts_with(['.', '-'])
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

fn valid_registry(r: &str) -> bool {
    let (host, port) = if let Some(v6) = r.strip_prefix('[') {
        match v6.split_once(']') {
            Some((h, p)) => {
                if h.parse::<std::net::Ipv6Addr>().is_err() {
                    return false;
                }
                (None, p.strip_prefix(':'))
            }
            None => return false,
        }
    } else {
        match r.split_once(':') {
            Some((h, p)) => (Some(h), Some(p)),
            None => (Some(r), None),
        }
    };
    let host_ok = host.is_none_or(|h| {
        !h.is_empty()
            && h.split('.').all(|label| {
                !label.is_empty()
                    && !label.starts_with('-')
                    && !label.ends_with('-')
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            })
    });
    let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok_and(|n| n > 0));
    host_ok && port_ok
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() || !is_alnum(b[0]) || !is_alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if is_alnum(b[i]) {
            i += 1;
            continue;
        }
        let sep_start = i;
        while i < b.len() && !is_alnum(b[i]) {
            i += 1;
        }
        let sep = &c[sep_start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

fn is_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Reference {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn docker_hub_short_names_are_normalized() {
        let r = parse("busybox");
        assert_eq!(r.registry, "docker.io");
        assert_eq!(r.repository, "library/busybox");
        assert_eq!(r.tag.as_deref(), Some("latest"));
        assert_eq!(r.to_string(), "docker.io/library/busybox:latest");
        assert_eq!(r.familiar(), "busybox:latest");
        let r = parse("someone/tool:1.2");
        assert_eq!(r.to_string(), "docker.io/someone/tool:1.2");
        assert_eq!(r.familiar(), "someone/tool:1.2");
    }

    #[test]
    fn registries_with_ports_and_localhost() {
        let r = parse("127.0.0.1:5000/busybox:latest");
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            ("127.0.0.1:5000", "busybox")
        );
        assert!(r.is_loopback_registry());
        let r = parse("localhost/a/b");
        assert_eq!(r.registry, "localhost");
        assert!(r.is_loopback_registry());
        assert!(parse("[::1]:5000/x").is_loopback_registry());
        let r = parse("registry.example:5000/busybox");
        assert_eq!(r.name().unwrap(), "registry.example:5000/busybox:latest");
        assert!(!r.is_loopback_registry());
        assert!(!parse("127.example/x").is_loopback_registry());
    }

    #[test]
    fn digests_pin_and_tags_default_only_without_one() {
        let d = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let r = parse(&format!("busybox@{d}"));
        assert_eq!(r.tag, None);
        assert_eq!(r.digest.as_ref().unwrap().to_string(), d);
        assert_eq!(r.name(), None);
        let r = parse(&format!("localhost:5000/busybox:1@{d}"));
        assert_eq!(r.tag.as_deref(), Some("1"));
        assert_eq!(r.to_string(), format!("localhost:5000/busybox:1@{d}"));
    }

    #[test]
    fn malformed_references_say_why() {
        for (input, why) in [
            ("", "empty"),
            ("Busybox", "lowercase"),
            ("busybox:", "tag"),
            ("busybox:-x", "tag"),
            ("bad..name", "component"),
            ("a/-b", "component"),
            ("reg.example:99999/x", "HOST[:PORT]"),
            ("busybox@sha256:abc", "64 hex"),
            ("localhost:5000/", "no repository"),
        ] {
            let e = input.parse::<Reference>().unwrap_err().to_string();
            assert!(e.contains(why), "{input:?}: {e}");
            assert!(
                e.contains(&format!("{input:?}")) || input.contains('@'),
                "{e}"
            );
        }
    }

    #[test]
    fn separators_in_components() {
        for ok in ["a.b", "a_b", "a__b", "a---b", "a1/b2"] {
            parse(ok);
        }
        for bad in ["a___b", "a._b", "_a", "a-"] {
            assert!(bad.parse::<Reference>().is_err(), "{bad}");
        }
    }
}
