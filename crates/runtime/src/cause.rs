//! The cause of a failed container operation, carried back from the process that met it.
//!
//! libcontainer sets a container up in forked processes (the intermediate and the init) and,
//! when a step fails there, sends its parent only a summary ("failed to prepare rootfs"); the
//! reason ("filesystem proc must be mounted on ordinary directory", "capset: EPERM") goes to
//! its `tracing` log alone, which nobody reads without `--debug`. [`Causes`] is a `tracing`
//! layer that writes each error event of libcontainer's, as one line, into a pipe that the
//! forked processes inherit (close-on-exec, so the container's program never holds it; both
//! ends non-blocking, so no process ever waits on it). A program installs it once with
//! [`layer`]; [`crate::Runtime::create`] then empties it before it starts and, when the create
//! fails, reads the first line back ([`take`]) into its error, as runc's messages carry their
//! cause.

use std::fmt::Write as _;
use std::os::fd::OwnedFd;
use std::sync::{Arc, OnceLock};

use nix::fcntl::OFlag;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::{Filtered, Targets};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::LookupSpan;

/// The longest line kept from one event, and the most read back.
const MAX_LINE: usize = 1024;
const MAX_READ: usize = 64 << 10;

/// The process's [`Causes`], once [`layer`] made it.
static GLOBAL: OnceLock<Causes> = OnceLock::new();

/// The layer to add to the program's `tracing` subscriber (once; `None` when the pipe could
/// not be made, or on a second call): only libcontainer's errors reach it, so its other events
/// cost nothing when nothing else logs them.
pub fn layer<S>() -> Option<Filtered<Causes, Targets, S>>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let causes = Causes::new().ok()?;
    GLOBAL.set(causes.clone()).ok()?;
    Some(causes.with_filter(Targets::new().with_target("libcontainer", Level::ERROR)))
}

/// The first error libcontainer logged since the last call, in this process or one it forked
/// (and emptied the pipe); `None` without [`layer`].
pub fn take() -> Option<String> {
    GLOBAL.get()?.first()
}

/// Both ends of the pipe; clones share them.
#[derive(Clone)]
pub struct Causes {
    write: Arc<OwnedFd>,
    read: Arc<OwnedFd>,
}

impl Causes {
    pub fn new() -> std::io::Result<Causes> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
        Ok(Causes {
            write: Arc::new(write),
            read: Arc::new(read),
        })
    }

    /// The first error line written so far by this process or one it forked, if any.
    pub fn first(&self) -> Option<String> {
        let mut buf = vec![0u8; MAX_READ];
        let mut len = 0;
        while len < buf.len() {
            match nix::unistd::read(&*self.read, &mut buf[len..]) {
                Ok(0) | Err(_) => break,
                Ok(n) => len += n,
            }
        }
        let text = String::from_utf8_lossy(&buf[..len]);
        // Cleaned again on this side: whatever else holds the write end is not trusted.
        text.lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .map(printable)
    }
}

/// Collects an event's message and fields as `message: field=value, …`.
struct Line(String);

impl Visit for Line {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if !self.0.is_empty() {
            self.0
                .push_str(if field.name() == "message" { " " } else { ", " });
        }
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.0, "{}={value:?}", field.name());
        }
    }
}

impl<S: Subscriber> Layer<S> for Causes {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let meta = event.metadata();
        if *meta.level() != Level::ERROR || !meta.target().starts_with("libcontainer") {
            return;
        }
        let mut line = Line(String::new());
        event.record(&mut line);
        let mut text = printable(&line.0);
        text.push('\n');
        // One write per line (under PIPE_BUF, so lines from several processes never mix); a
        // full pipe drops the line rather than block the container's set-up.
        let _ = nix::unistd::write(&*self.write, text.as_bytes());
    }
}

/// `text` on one line, control characters escaped, at most [`MAX_LINE`] bytes.
fn printable(text: &str) -> String {
    let mut out = String::new();
    for c in text.chars() {
        let piece: String = if c.is_control() || is_invisible_format(c) {
            c.escape_default().collect()
        } else {
            c.to_string()
        };
        if out.len() + piece.len() > MAX_LINE - 1 {
            break;
        }
        out.push_str(&piece);
    }
    out
}

/// `message` with `cause` added, unless it already says it; when the message ends with the
/// cause's own summary, only the cause's fields are added after it.
pub fn with_cause(message: String, cause: Option<String>) -> String {
    let Some(c) = cause else { return message };
    if message.contains(&c) {
        return message;
    }
    match c.split_once(", ") {
        Some((summary, fields)) if message.ends_with(summary) => format!("{message}: {fields}"),
        _ => format!("{message} (cause: {c})"),
    }
}

/// Unicode format characters that change how the text around them is shown without being
/// shown themselves (bidirectional overrides and isolates, zero-width characters): escaped
/// like control characters, so a message reads as it is.
fn is_invisible_format(c: char) -> bool {
    matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2069}' | '\u{FEFF}')
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn the_first_libcontainer_error_comes_back_once_on_one_line() {
        let causes = Causes::new().unwrap();
        let subscriber = tracing_subscriber::registry().with(causes.clone());
        tracing::subscriber::with_default(subscriber, || {
            tracing::error!(target: "cela", "not libcontainer's");
            tracing::warn!(target: "libcontainer::x", "only a warning");
            tracing::error!(
                target: "libcontainer::process::init",
                err = "Mount(Other(\"proc\\n\u{1b}[2J\"))",
                "failed to prepare rootfs"
            );
            tracing::error!(target: "libcontainer::container", "a later summary");
        });
        let first = causes.first().unwrap();
        assert_eq!(
            first,
            "failed to prepare rootfs, err=\"Mount(Other(\\\"proc\\\\n\\u{1b}[2J\\\"))\""
        );
        assert!(!first.chars().any(char::is_control));
        assert_eq!(causes.first(), None, "read once");
    }

    #[test]
    fn a_cause_is_added_once() {
        assert_eq!(
            with_cause("create failed".into(), Some("capset: EPERM".into())),
            "create failed (cause: capset: EPERM)"
        );
        assert_eq!(
            with_cause(
                "create failed: capset: EPERM".into(),
                Some("capset: EPERM".into())
            ),
            "create failed: capset: EPERM"
        );
        assert_eq!(
            with_cause(
                "create failed: failed to prepare rootfs".into(),
                Some("failed to prepare rootfs, err=Mount(\"proc\")".into())
            ),
            "create failed: failed to prepare rootfs: err=Mount(\"proc\")"
        );
        assert_eq!(with_cause("x".into(), None), "x");
        assert_eq!(printable(&"y".repeat(5000)).len(), MAX_LINE - 1);
    }
}
