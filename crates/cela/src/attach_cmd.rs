//! The terminal side of `cela run -i/-t` and `cela attach`: this process's stdin goes to the
//! instance through its attach socket (`cela_instance::attach`), raw when it is a terminal
//! and the instance has one (window size sent at once and on every SIGWINCH), while the
//! instance's output is followed from its log. The detach keys (Ctrl-P Ctrl-Q unless
//! `--detach-keys` says otherwise) leave the instance running, as does a hang-up (SIGHUP: the
//! terminal has gone). SIGINT and SIGTERM stop the instance, as for a foreground `cela run`.
//! The terminal is restored on every way out: the end of the run, a detach, a signal (caught,
//! so the session ends through its normal path) and a panic (a hook puts it back).

use std::io::Read;
use std::os::fd::AsFd;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use cela_instance::attach::{Attached, DetachWatch, Input};
use cela_instance::log::LogReader;
use cela_instance::ops::is_live;
use cela_instance::run::START_BOUND;
use cela_instance::{Instance, Status};

use crate::EXIT_CELA_ERROR;

static RESIZED: AtomicBool = AtomicBool::new(false);
static HUNG_UP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_winch(_: libc::c_int) {
    RESIZED.store(true, Ordering::SeqCst);
}

extern "C" fn on_hangup(_: libc::c_int) {
    HUNG_UP.store(true, Ordering::SeqCst);
}

fn catch(sig: nix::sys::signal::Signal, handler: extern "C" fn(libc::c_int)) -> anyhow::Result<()> {
    let action = nix::sys::signal::SigAction::new(
        nix::sys::signal::SigHandler::Handler(handler),
        nix::sys::signal::SaFlags::SA_RESTART,
        nix::sys::signal::SigSet::empty(),
    );
    // SAFETY: the handlers only store to an atomic, which is async-signal-safe.
    unsafe { nix::sys::signal::sigaction(sig, &action) }
        .with_context(|| format!("installing the {sig} handler"))?;
    Ok(())
}

/// How a session ended.
pub enum Outcome {
    /// The instance's run ended with this status (an error already printed).
    Ended(ExitCode),
    /// The user detached; the instance runs on.
    Detached,
}

/// Copies this process's stdin to the instance until it ends or the detach keys are typed.
fn forward_stdin(mut to: Attached, tty: bool, keys: Vec<u8>, detached: Arc<AtomicBool>) {
    let mut watch = DetachWatch::new(if tty { &keys } else { &[] });
    let mut buf = vec![0u8; 16 * 1024];
    let mut stdin = std::io::stdin().lock();
    loop {
        match stdin.read(&mut buf) {
            // A signal caught on this thread is not the end of the input.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Ok(0) | Err(_) => {
                let held = watch.finish();
                if !held.is_empty() {
                    let _ = to.send(&Input::Data(held));
                }
                let _ = to.send(&Input::Eof);
                return;
            }
            Ok(n) => {
                let (pass, detach) = watch.feed(&buf[..n]);
                if !pass.is_empty() && to.send(&Input::Data(pass)).is_err() {
                    return;
                }
                if detach {
                    detached.store(true, Ordering::SeqCst);
                    return;
                }
            }
        }
    }
}

fn send_window_size(to: &mut Attached) {
    if let Ok(size) = cela_runtime::console::window_size(&std::io::stdin().as_fd()) {
        let _ = to.send(&Input::Resize {
            rows: size.ws_row,
            cols: size.ws_col,
        });
    }
}

/// Runs a session on `inst`: input from this process's stdin (when the instance takes
/// input), output from its log — all of it when `from_start` (a run this process started),
/// else what comes from now on — until its run ends or the user detaches.
pub fn session(inst: &Instance, from_start: bool, detach_keys: &[u8]) -> anyhow::Result<Outcome> {
    let tty = inst.config.tty;
    let takes_input = inst.config.stdin || tty;
    let detached = Arc::new(AtomicBool::new(false));
    let mut resizer = None;
    let mut raw = None;
    // The handlers first: from the moment the terminal is raw, every way out restores it.
    // Ctrl-C at a terminal that is not raw (raw, it goes to the instance's terminal) and
    // SIGTERM stop the instance, as a foreground `cela run` without -i/-t does.
    crate::instance_cmd::catch_interrupts()?;
    catch(nix::sys::signal::Signal::SIGHUP, on_hangup)?;
    if takes_input {
        let conn = cela_instance::attach::connect(inst, START_BOUND)?;
        if tty {
            catch(nix::sys::signal::Signal::SIGWINCH, on_winch)?;
            // Raw only when keys typed here reach the instance; without -i, Ctrl-C stays a
            // signal to this process (handled below).
            if inst.config.stdin {
                raw = cela_runtime::console::RawStdin::enable();
            }
            // Resizes on a connection of their own: never queued behind input the workload
            // has not read.
            let mut r = cela_instance::attach::connect(inst, START_BOUND)?;
            send_window_size(&mut r);
            resizer = Some(r);
        }
        if inst.config.stdin {
            let keys = detach_keys.to_vec();
            let d = detached.clone();
            std::thread::spawn(move || forward_stdin(conn, tty, keys, d));
        }
    }
    let mut stopping = false;
    let log = inst.log_path();
    let mut reader = None;
    let mut seen_running = false;
    // The run's end (exit code, error), or `None` for a detach.
    let ended = loop {
        if reader.is_none() {
            reader = if from_start {
                LogReader::open(&log).ok()
            } else {
                LogReader::open_at_end(&log).ok()
            };
        }
        if RESIZED.swap(false, Ordering::SeqCst)
            && let Some(r) = &mut resizer
        {
            send_window_size(r);
        }
        let state = inst.state().ok();
        let mut any = false;
        if let Some(r) = &mut reader {
            any = r.read_available(crate::instance_cmd::print_record)?;
            if let Some(end) = r.end() {
                break Some((end.exit_code, end.error.clone()));
            }
        }
        if detached.load(Ordering::SeqCst) || HUNG_UP.load(Ordering::SeqCst) {
            break None;
        }
        if crate::instance_cmd::interrupted() && !stopping {
            stopping = true;
            let inst = inst.clone();
            std::thread::spawn(move || cela_instance::ops::stop(&inst, Duration::from_secs(10)));
        }
        match &state {
            // Removed (auto-removal) without an end record read: nothing more will come.
            None if !inst.dir.exists() => {
                break Some((None, Some("it was removed".to_owned())));
            }
            Some(s) if is_live(s) => seen_running = true,
            Some(s)
                if !any
                    && (seen_running || !from_start)
                    && matches!(s.status, Status::Exited | Status::Crashed) =>
            {
                break Some((s.exit_code, s.error.clone()));
            }
            _ => {}
        }
        if !any {
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    // The terminal first: what is printed next needs it cooked.
    drop(raw);
    Ok(match ended {
        Some((code, error)) => Outcome::Ended(status(inst, code, error.as_deref())),
        None => {
            if !HUNG_UP.load(Ordering::SeqCst) {
                eprintln!(
                    "\ncela: detached from {} (it runs on; cela attach {0})",
                    inst.name()
                );
            }
            Outcome::Detached
        }
    })
}

fn status(inst: &Instance, code: Option<i32>, error: Option<&str>) -> ExitCode {
    match code {
        Some(code) => ExitCode::from(code.clamp(0, 255) as u8),
        None => {
            eprintln!(
                "cela: error: instance {}: {}",
                inst.name(),
                error.unwrap_or("no exit status recorded")
            );
            ExitCode::from(EXIT_CELA_ERROR)
        }
    }
}

/// `cela attach NAME`: reconnects this terminal to a running instance.
pub fn attach(
    name: &str,
    detach_keys: &str,
    data_dir: &std::path::Path,
) -> anyhow::Result<ExitCode> {
    let keys = cela_instance::attach::parse_detach_keys(detach_keys)?;
    let inst = cela_instance::Instances::open(data_dir)?.find(name)?;
    let state = inst.state()?;
    if state.status != Status::Running {
        bail!(
            "instance {} is {}: attaching needs a running instance",
            inst.name(),
            state.status
        );
    }
    match session(&inst, false, &keys)? {
        Outcome::Ended(code) => Ok(code),
        Outcome::Detached => Ok(ExitCode::SUCCESS),
    }
}
