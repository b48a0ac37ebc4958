//! What the user sees while assets are fetched and built for the first time.
//!
//! On a terminal, each step is an `indicatif` spinner (or a byte bar for downloads) on stderr,
//! replaced by a `✓` line when it ends. When stderr is not a terminal (CI logs, pipes) each step
//! prints one plain line when it starts and nothing else. Cached runs take no steps and so print
//! nothing at all.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

#[derive(Debug, Clone)]
enum Mode {
    Hidden,
    Lines,
    Bars(MultiProgress),
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

    /// Starts a step, shown until the returned [`Step`] is finished or dropped.
    pub fn step(&self, msg: impl Into<String>) -> Step {
        let msg = msg.into();
        let bar = match &self.mode {
            Mode::Hidden => None,
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
            started: Instant::now(),
        }
    }

    /// Prints a note (a fallback taken, a warning) above any bars; silent when hidden.
    pub fn note(&self, msg: impl AsRef<str>) {
        match &self.mode {
            Mode::Hidden => {}
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
#[derive(Debug)]
pub struct Step {
    msg: String,
    bar: Option<(MultiProgress, ProgressBar)>,
    started: Instant,
}

impl Step {
    /// Turns the spinner into a byte bar of `total` bytes.
    pub fn set_total_bytes(&self, total: u64) {
        if let Some((_, bar)) = &self.bar {
            bar.set_length(total);
            bar.set_style(bytes_style());
        }
    }

    /// Sets how many bytes are done.
    pub fn set_bytes(&self, done: u64) {
        if let Some((_, bar)) = &self.bar {
            bar.set_position(done);
        }
    }

    /// Ends the step, leaving a `✓` line with its duration on a terminal.
    pub fn done(mut self) {
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
