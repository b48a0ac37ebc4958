//! Registry credentials as `docker login` stores them: the `auths` map of
//! `$DOCKER_CONFIG/config.json` (default `~/.docker/config.json`), each entry's `auth` the base64
//! of `USER:PASSWORD`, keyed by registry host (`127.0.0.1:5000`, or a URL such as
//! `https://index.docker.io/v1/` for Docker Hub). Credential helpers (`credsStore`) are not
//! consulted. No entry means anonymous access.

use std::path::{Path, PathBuf};

use base64::Engine;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;

use crate::ImageError;

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: std::collections::HashMap<String, AuthEntry>,
}

#[derive(Deserialize)]
struct AuthEntry {
    auth: Option<String>,
}

/// Where `docker login` keeps credentials.
pub fn docker_config_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"))
}

/// The credentials for `registry` in the docker config at `path` (anonymous if the file or the
/// entry is missing).
pub fn for_registry(path: &Path, registry: &str) -> Result<RegistryAuth, ImageError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(RegistryAuth::Anonymous),
        Err(source) => {
            return Err(ImageError::Io {
                action: "reading",
                path: path.to_owned(),
                source,
            });
        }
    };
    let bad = |why: String| ImageError::BadManifest {
        what: format!("docker config {}", path.display()),
        why,
    };
    let config: DockerConfig =
        serde_json::from_slice(&bytes).map_err(|e| bad(format!("not JSON: {e}")))?;
    let entry = config.auths.iter().find(|(key, _)| {
        host_of(key) == registry || {
            registry == crate::reference::DEFAULT_REGISTRY && host_of(key) == "index.docker.io"
        }
    });
    let Some((key, AuthEntry { auth: Some(auth) })) = entry else {
        return Ok(RegistryAuth::Anonymous);
    };
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(auth.trim())
        .map_err(|e| bad(format!("auths.{key:?}.auth is not base64: {e}")))?;
    let text =
        String::from_utf8(decoded).map_err(|_| bad(format!("auths.{key:?}.auth is not UTF-8")))?;
    let (user, password) = text
        .split_once(':')
        .ok_or_else(|| bad(format!("auths.{key:?}.auth is not USER:PASSWORD")))?;
    Ok(RegistryAuth::Basic(user.to_owned(), password.to_owned()))
}

/// `host[:port]` of a config key that may be a URL.
fn host_of(key: &str) -> &str {
    let rest = key.split_once("://").map_or(key, |(_, r)| r);
    rest.split('/').next().unwrap_or(rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path, json: &str) -> PathBuf {
        let p = dir.join("config.json");
        std::fs::write(&p, json).unwrap();
        p
    }

    #[test]
    fn entries_are_found_by_host_and_decoded() {
        let dir = tempfile::tempdir().unwrap();
        // base64("tester:pw:with:colons"), base64("hub:secret")
        let p = config(
            dir.path(),
            r#"{"auths":{"127.0.0.1:5000":{"auth":"dGVzdGVyOnB3OndpdGg6Y29sb25z"},
                "https://index.docker.io/v1/":{"auth":"aHViOnNlY3JldA=="}}}"#,
        );
        let RegistryAuth::Basic(u, pw) = for_registry(&p, "127.0.0.1:5000").unwrap() else {
            panic!("no credentials found");
        };
        assert_eq!((u.as_str(), pw.as_str()), ("tester", "pw:with:colons"));
        assert!(
            matches!(for_registry(&p, "docker.io").unwrap(), RegistryAuth::Basic(u, _) if u == "hub")
        );
        assert!(matches!(
            for_registry(&p, "other:5000").unwrap(),
            RegistryAuth::Anonymous
        ));
        assert!(matches!(
            for_registry(&dir.path().join("missing.json"), "x").unwrap(),
            RegistryAuth::Anonymous
        ));
    }

    #[test]
    fn a_broken_config_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = config(dir.path(), r#"{"auths":{"r:1":{"auth":"%%%"}}}"#);
        let e = for_registry(&p, "r:1").unwrap_err().to_string();
        assert!(e.contains("config.json") && e.contains("not base64"), "{e}");
    }
}
