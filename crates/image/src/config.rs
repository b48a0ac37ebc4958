//! The part of an image config (OCI image spec, "Image Configuration" `config` object; Docker's
//! container config has the same fields) that says how to run the image: entrypoint, command,
//! environment, working directory and user.

use oci_spec::image::ImageConfiguration;
use serde::Serialize;

use crate::ImageError;

/// How an image asks to be run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RunConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// `KEY=VALUE` entries.
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
}

impl RunConfig {
    /// Parses the run settings out of an image config blob; `what` names it in errors.
    pub fn from_config_json(what: &str, bytes: &[u8]) -> Result<RunConfig, ImageError> {
        let cfg = ImageConfiguration::from_reader(bytes).map_err(|e| ImageError::BadManifest {
            what: what.to_owned(),
            why: format!("not an image config: {e}"),
        })?;
        Ok(RunConfig::from(&cfg))
    }

    /// The run settings of a stored image.
    pub fn of(store: &crate::Store, image: &crate::ImageRecord) -> Result<RunConfig, ImageError> {
        let bytes = store.read_blob(&image.config)?;
        RunConfig::from_config_json(&format!("config {}", image.config), &bytes)
    }

    /// The command line to run: the entrypoint followed by `cmd` (the caller's if given,
    /// otherwise the image's), as Docker combines them.
    pub fn argv(&self, cmd: &[String]) -> Vec<String> {
        let tail = if cmd.is_empty() { &self.cmd } else { cmd };
        self.entrypoint.iter().chain(tail).cloned().collect()
    }
}

impl From<&ImageConfiguration> for RunConfig {
    fn from(cfg: &ImageConfiguration) -> Self {
        let Some(c) = cfg.config() else {
            return RunConfig::default();
        };
        let non_empty = |s: &Option<String>| s.clone().filter(|s| !s.is_empty());
        RunConfig {
            entrypoint: c.entrypoint().clone().unwrap_or_default(),
            cmd: c.cmd().clone().unwrap_or_default(),
            env: c.env().clone().unwrap_or_default(),
            working_dir: non_empty(c.working_dir()),
            user: non_empty(c.user()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_style_config_fields_are_read() {
        let json = br#"{"architecture":"amd64","os":"linux",
            "config":{"Entrypoint":["/bin/tini","--"],"Cmd":["sh"],"Env":["PATH=/bin","A=b"],
                      "WorkingDir":"/srv","User":"1000:1000","ExposedPorts":{"80/tcp":{}}},
            "rootfs":{"type":"layers","diff_ids":[]},"container":"ignored"}"#;
        let c = RunConfig::from_config_json("config", json).unwrap();
        assert_eq!(c.entrypoint, ["/bin/tini", "--"]);
        assert_eq!(c.cmd, ["sh"]);
        assert_eq!(c.env, ["PATH=/bin", "A=b"]);
        assert_eq!(c.working_dir.as_deref(), Some("/srv"));
        assert_eq!(c.user.as_deref(), Some("1000:1000"));
        assert_eq!(c.argv(&[]), ["/bin/tini", "--", "sh"]);
        assert_eq!(
            c.argv(&["echo".into(), "hi".into()]),
            ["/bin/tini", "--", "echo", "hi"]
        );
    }

    #[test]
    fn a_config_without_run_settings_is_empty_and_garbage_is_named() {
        let json =
            br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
        assert_eq!(
            RunConfig::from_config_json("c", json).unwrap(),
            RunConfig::default()
        );
        let e = RunConfig::from_config_json("config sha256:ab", b"[]").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("config sha256:ab: not an image config"),
            "{e}"
        );
    }
}
