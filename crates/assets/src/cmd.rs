//! Running the host tools cela relies on (apt, dpkg-deb, decompressors), with errors that name
//! the command line and carry its stderr.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::AssetError;

/// Why the apt tools are needed, for [`AssetError::MissingTool`].
pub(crate) const APT_HINT: &str =
    "cela fetches the guest kernel with apt; on non-Debian hosts pass --kernel and --initrd";

/// Checks that `tool` is in `PATH` (then run it by name, so that messages show the command as a
/// user would type it), or says why it is needed.
pub(crate) fn require(tool: &str, why: &'static str) -> Result<PathBuf, AssetError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|p| is_executable(p))
        .ok_or_else(|| AssetError::MissingTool {
            tool: tool.to_owned(),
            why,
        })
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The command as a user would type it, for messages.
pub(crate) fn display(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` to completion and returns its stdout; a failure carries stderr and `hint`.
pub(crate) fn stdout(cmd: &mut Command, hint: &'static str) -> Result<Vec<u8>, AssetError> {
    let out = cmd.output().map_err(|source| AssetError::Spawn {
        command: display(cmd),
        source,
    })?;
    check(cmd, out, hint)
}

/// Turns a finished command's output into its stdout, or an error if it failed.
pub(crate) fn check(cmd: &Command, out: Output, hint: &'static str) -> Result<Vec<u8>, AssetError> {
    if out.status.success() {
        return Ok(out.stdout);
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    // apt's sandbox warning is noise next to the real error.
    let stderr: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.contains("couldn't be accessed by user '_apt'"))
        .collect();
    Err(AssetError::Command {
        command: display(cmd),
        status: out.status.to_string(),
        stderr: stderr.join(" / "),
        hint,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_name_the_command_and_carry_stderr() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo oops >&2; exit 3"]);
        let err = stdout(&mut cmd, "try again").unwrap_err().to_string();
        assert!(
            err.contains("`sh -c echo oops >&2; exit 3` failed"),
            "{err}"
        );
        assert!(
            err.contains("oops") && err.ends_with("; try again"),
            "{err}"
        );
        assert_eq!(stdout(Command::new("echo").arg("hi"), "").unwrap(), b"hi\n");
    }

    #[test]
    fn missing_tools_are_named() {
        let err = require("no-such-tool-cela", APT_HINT)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no-such-tool-cela") && err.contains("--kernel"),
            "{err}"
        );
        assert!(require("sh", APT_HINT).is_ok());
    }
}
