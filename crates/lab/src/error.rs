//! The one error type of the lab. Every variant says what failed and with what input; the ones
//! that happen after QEMU started carry the L1 console, whose tail they print, because that is
//! where the reason is.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use cela_assets::AssetError;

/// How many console lines an error message shows.
const TAIL_LINES: usize = 60;

/// Why a lab could not be set up or a lab run did not produce results.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// A host program the lab needs is not installed.
    #[error("`{tool}` not found (looked in {looked}); {hint}")]
    MissingTool {
        tool: &'static str,
        looked: String,
        hint: &'static str,
    },

    /// The L1 kernel, its modules or busybox could not be fetched into the cache.
    #[error("fetching the lab's L1 assets into {}: {source}", cache.display())]
    Assets {
        cache: PathBuf,
        #[source]
        source: AssetError,
    },

    /// A file-system operation on a named path failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// A host command the lab runs (ldd, busybox, QEMU) could not be started or failed.
    #[error("`{command}` failed: {detail}")]
    Command { command: String, detail: String },

    /// The `LabRun` asks for something the lab cannot do.
    #[error("invalid lab run: {0}")]
    InvalidRun(String),

    /// The run took longer than `LabRun::timeout`; QEMU was killed.
    #[error(
        "lab run exceeded its wall-clock bound of {}s{}; QEMU was killed. L1 console tail:\n{}",
        timeout.as_secs_f64(),
        during(scenario),
        tail(console)
    )]
    Timeout {
        timeout: Duration,
        /// The scenario that had started and not finished, if any.
        scenario: Option<String>,
        console: String,
    },

    /// L1's console (which carries a heartbeat) stayed silent for the silence bound: L1
    /// froze. QEMU was asked what L1's vCPUs were doing, then killed.
    #[error(
        "the L1 guest printed nothing for {}s (no heartbeat: it froze){}; QEMU was killed. L1 \
         console tail:\n{}\nL1's vCPUs when it was killed:\n{qemu_state}",
        silent_for.as_secs_f64(),
        during(scenario),
        tail(console)
    )]
    Frozen {
        silent_for: Duration,
        scenario: Option<String>,
        console: String,
        /// QEMU's `info cpus` and `info registers -a`, or why it did not answer.
        qemu_state: String,
    },

    /// L1 did not get ready (boot, modules, /dev/kvm) within the boot bound; QEMU was killed.
    #[error(
        "the L1 guest was not ready after {}s (a hung boot: its console shows where it stopped); \
         QEMU was killed. L1 console tail:\n{}",
        waited.as_secs_f64(),
        tail(console)
    )]
    NotReady { waited: Duration, console: String },

    /// The L1 init script reported an error it cannot get past (no /dev/kvm, a module that does
    /// not load).
    #[error("L1 guest: {message}. L1 console tail:\n{}", tail(console))]
    L1 { message: String, console: String },

    /// QEMU exited before the L1 guest printed all results (a kernel panic, a crash of QEMU).
    #[error(
        "QEMU exited ({status}) before the L1 guest finished{}{}. L1 console tail:\n{}",
        during(scenario),
        qemu_stderr(stderr),
        tail(console)
    )]
    Exited {
        status: String,
        scenario: Option<String>,
        stderr: String,
        console: String,
    },

    /// The result lines on the console do not parse (a corrupted line, a length mismatch).
    #[error(
        "malformed lab results on the L1 console: {message}. L1 console tail:\n{}",
        tail(console)
    )]
    Protocol { message: String, console: String },
}

impl LabError {
    /// The whole L1 console, for the errors raised after QEMU started.
    pub fn console(&self) -> Option<&str> {
        match self {
            LabError::Timeout { console, .. }
            | LabError::Frozen { console, .. }
            | LabError::NotReady { console, .. }
            | LabError::L1 { console, .. }
            | LabError::Exited { console, .. }
            | LabError::Protocol { console, .. } => Some(console),
            _ => None,
        }
    }
}

fn during(scenario: &Option<String>) -> String {
    match scenario {
        Some(name) => format!(", during scenario {name:?}"),
        None => String::new(),
    }
}

fn qemu_stderr(stderr: &str) -> String {
    match stderr.trim() {
        "" => String::new(),
        text => format!("; QEMU said: {text}"),
    }
}

/// The last [`TAIL_LINES`] lines of `console`.
pub(crate) fn tail(console: &str) -> String {
    let lines: Vec<&str> = console.lines().collect();
    let start = lines.len().saturating_sub(TAIL_LINES);
    let mut out = String::new();
    if start > 0 {
        out.push_str(&format!("[... {start} earlier lines ...]\n"));
    }
    out.push_str(&lines[start..].join("\n"));
    out
}

/// Attaches an action and a path to an `io::Error`.
pub(crate) trait IoContext<T> {
    fn at(self, action: &'static str, path: impl Into<PathBuf>) -> Result<T, LabError>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn at(self, action: &'static str, path: impl Into<PathBuf>) -> Result<T, LabError> {
        self.map_err(|source| LabError::Io {
            action,
            path: path.into(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_last_lines_and_says_how_many_it_dropped() {
        let console: String = (0..100).map(|i| format!("line {i}\n")).collect();
        let t = tail(&console);
        assert!(t.starts_with("[... 40 earlier lines ...]\nline 40\n"));
        assert!(t.ends_with("line 99"));
        assert_eq!(tail("a\nb"), "a\nb");
    }
}
