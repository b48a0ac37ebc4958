//! What the user sees while assets are fetched and built for the first time.
//!
//! On a terminal, each step is an `indicatif` spinner (or a byte bar for downloads) on stderr,
//! replaced by a `✓` line when it ends. When stderr is not a terminal (CI logs, pipes) each step
//! prints one plain line when it starts and nothing else. Cached runs take no steps and so print
//! nothing at all. A program that shows progress its own way (the API's pull, as Docker's
//! JSON lines) takes the steps as [`StepEvent`]s instead ([`Progress::events`]).

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

#[derive(Debug, Clone)]
enum Mode {
    Hidden,
    Lines,
    Bars(MultiProgress),
    Events(Events),
}

/// What happens to a step, as [`Progress::events`] reports it. `key` is what the step's
/// caller named it by (a blob's short digest), if it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepEvent<'a> {
    Started {
        id: u64,
        key: Option<&'a str>,
        msg: &'a str,
    },
    /// `done` of `total` bytes (`total` 0 when unknown).
    Bytes {
        id: u64,
        done: u64,
        total: u64,
    },
    Done {
        id: u64,
    },
    /// Ended unfinished (an error, or another step's failure).
    Dropped {
        id: u64,
    },
    /// Nothing to do: what the step would have made is there already.
    Present {
        key: &'a str,
        msg: &'a str,
    },
}

type Sink = dyn Fn(&StepEvent<'_>) + Send + Sync;

/// The receiver of a [`Progress::events`] and the next step's id.
#[derive(Clone)]
struct Events {
    sink: Arc<Sink>,
    next: Arc<AtomicU64>,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Events")
    }
}

/// Reports the steps of fetching and building assets. Cheap to clone; clones share one display.
#[derive(Debug, Clone)]
pub struct Progress {
    mode: Mode,
}

impl Default for Progress {
    fn default() -> Self {
        Progress::new()
    }
}

impl Progress {
    /// Bars and spinners on stderr when it is a terminal, otherwise one line per step.
    pub fn new() -> Self {
        let mode = if std::io::stderr().is_terminal() {
            Mode::Bars(MultiProgress::with_draw_target(ProgressDrawTarget::stderr()))
        } else {
            Mode::Lines
        };
        Progress { mode }
    }

    /// Reports nothing (tests, or callers with their own output).
    pub fn hidden() -> Self {
        Progress { mode: Mode::Hidden }
    }

    /// Reports every step to `sink`, from whichever thread runs it.
    pub fn events(sink: impl Fn(&StepEvent<'_>) + Send + Sync + 'static) -> Self {
        Progress {
            mode: Mode::Events(Events {
                sink: Arc::new(sink),
                next: Arc::new(AtomicU64::new(0)),
            }),
        }
    }

    /// Starts a step, shown until the returned [`Step`] is finished or dropped.
    pub fn step(&self, msg: impl Into<String>) -> Step {
        self.step_keyed(None, msg)
    }

    /// Starts a step named by `key` for a program reading [`StepEvent`]s (a blob's short
    /// digest); shown as [`Progress::step`] otherwise.
    pub fn step_keyed(&self, key: Option<&str>, msg: impl Into<String>) -> Step {
        let msg = msg.into();
        let mut events = None;
        let bar = match &self.mode {
            Mode::Hidden => None,
            Mode::Events(e) => {
                let id = e.next.fetch_add(1, Ordering::Relaxed);
                (e.sink)(&StepEvent::Started { id, key, msg: &msg });
                events = Some((e.sink.clone(), id, AtomicU64::new(0)));
                None
            }
            Mode::Lines => {
                eprintln!("cela: {msg}");
                None
            }
            Mode::Bars(multi) => {
                let bar = multi.add(ProgressBar::new_spinner());
                bar.set_style(spinner_style());
                bar.set_message(msg.clone());
                bar.enable_steady_tick(Duration::from_millis(100));
                Some((multi.clone(), bar))
            }
        };
        Step {
            msg,
            bar,
            events,
            started: Instant::now(),
        }
    }

    /// Says that a step named `key` had nothing to do (to a program reading events only).
    pub fn present(&self, key: &str, msg: &str) {
        if let Mode::Events(e) = &self.mode {
            (e.sink)(&StepEvent::Present { key, msg });
        }
    }

    /// Prints a note (a fallback taken, a warning) above any bars; silent when hidden.
    pub fn note(&self, msg: impl AsRef<str>) {
        match &self.mode {
            Mode::Hidden | Mode::Events(_) => {}
            Mode::Lines => eprintln!("cela: {}", msg.as_ref()),
            Mode::Bars(multi) => {
                // A failed write to the terminal is not worth failing a fetch for.
                let _ = multi.println(format!("! {}", msg.as_ref()));
            }
        }
    }
}

fn spinner_style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner:.cyan} {msg} {elapsed:.dim}").expect("valid template")
}

fn bytes_style() -> ProgressStyle {
    ProgressStyle::with_template(
        "{spinner:.cyan} {msg} [{bar:30.cyan/blue}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
    )
    .expect("valid template")
    .progress_chars("=> ")
}

/// One step in progress. Finish it with [`Step::done`]; dropping it unfinished (an error) just
/// removes it from the screen.
pub struct Step {
    msg: String,
    bar: Option<(MultiProgress, ProgressBar)>,
    /// The sink, the step's id and its total bytes.
    events: Option<(Arc<Sink>, u64, AtomicU64)>,
    started: Instant,
}

impl std::fmt::Debug for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Step").field("msg", &self.msg).finish()
    }
}

impl Step {
    /// Turns the spinner into a byte bar of `total` bytes.
    pub fn set_total_bytes(&self, total: u64) {
        if let Some((_, _, t)) = &self.events {
            t.store(total, Ordering::Relaxed);
        }
        if let Some((_, bar)) = &self.bar {
            bar.set_length(total);
            bar.set_style(bytes_style());
        }
    }

    /// Sets how many bytes are done.
    pub fn set_bytes(&self, done: u64) {
        if let Some((sink, id, total)) = &self.events {
            sink(&StepEvent::Bytes {
                id: *id,
                done,
                total: total.load(Ordering::Relaxed),
            });
        }
        if let Some((_, bar)) = &self.bar {
            bar.set_position(done);
        }
    }

    /// Ends the step, leaving a `✓` line with its duration on a terminal.
    pub fn done(mut self) {
        if let Some((sink, id, _)) = self.events.take() {
            sink(&StepEvent::Done { id });
        }
        if let Some((multi, bar)) = self.bar.take() {
            bar.finish_and_clear();
            multi.remove(&bar);
            let secs = self.started.elapsed().as_secs_f64();
            let _ = multi.println(format!("✓ {} ({secs:.1}s)", self.msg));
        }
    }
}

impl Drop for Step {
    fn drop(&mut self) {
        if let Some((sink, id, _)) = self.events.take() {
            sink(&StepEvent::Dropped { id });
        }
        if let Some((multi, bar)) = self.bar.take() {
            bar.finish_and_clear();
            multi.remove(&bar);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hidden_progress_accepts_every_call() {
        let p = Progress::hidden();
        let s = p.step("downloading");
        s.set_total_bytes(10);
        s.set_bytes(5);
        s.done();
        p.note("fallback");
        drop(p.clone().step("dropped unfinished"));
    }
}
