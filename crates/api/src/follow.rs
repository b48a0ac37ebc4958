//! Following an instance from a request: its output as it is logged and the end of its run.
//! The instance's log (`cela_instance::log`) is the one source: the supervisor appends output
//! and, when a run ends, an end record, which a follower reads even after an auto-removal
//! took the instance's directory away. Followers run on blocking threads and hand what they
//! read to the request's task through a bounded channel, so a slow client slows only its own
//! follower.

use std::time::Duration;

use cela_instance::log::{LogEnd, LogReader, Record};
use cela_instance::ops::is_live;
use cela_instance::{Instance, InstanceState, Status};

/// How often a follower looks for new output or a change of state.
const POLL: Duration = Duration::from_millis(20);

/// Where following starts.
pub enum From {
    /// The whole log (logs).
    Start,
    /// What is written from now on (attach, wait).
    Now,
    /// Where an earlier follow stopped ([`Ending::reader`]).
    Reader(LogReader),
}

/// When following ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    /// What is logged so far has been read.
    Drained,
    /// The instance is not live (logs --follow).
    NotLive,
    /// The run that is next to end has ended (attach, wait), or the instance is gone.
    RunEnds,
}

/// How a followed run ended.
#[derive(Default)]
pub struct Ending {
    /// The reader, positioned after what was read (absent if the log never appeared).
    pub reader: Option<LogReader>,
    pub end: Option<LogEnd>,
    /// The instance's directory is gone (removed).
    pub removed: bool,
    /// The last state read.
    pub state: Option<InstanceState>,
}

impl Ending {
    /// The exit status the run ended with, and why it could not run if it says.
    pub fn status(&self) -> (i64, Option<String>) {
        if let Some(end) = &self.end {
            return (end.exit_code.map_or(-1, i64::from), end.error.clone());
        }
        match &self.state {
            Some(s) => (s.exit_code.map_or(-1, i64::from), s.error.clone()),
            None => (-1, Some("the instance was removed".into())),
        }
    }
}

/// Reads `inst`'s output from `from` until `until`, handing each record to `out`, which
/// returns false once nobody wants more (then following stops); `gone` says the client has
/// left (then too). `finished_before` is the finishing time of the state the caller saw: a
/// run ends, for [`Until::RunEnds`], with an end record or a state finished at another time.
pub fn follow(
    inst: &Instance,
    from: From,
    until: Until,
    finished_before: Option<String>,
    gone: &dyn Fn() -> bool,
    mut out: impl FnMut(Record<'_>) -> bool,
) -> Ending {
    let path = inst.log_path();
    let mut reader = match from {
        From::Start => LogReader::open(&path).ok(),
        From::Now => LogReader::open_at_end(&path).ok(),
        From::Reader(r) => Some(r),
    };
    // A log that does not exist yet is the first run's: read it from its start.
    let mut wanted = true;
    let mut ending = Ending::default();
    loop {
        if reader.is_none() {
            reader = LogReader::open(&path).ok();
        }
        // The state first: output written before a change of state is then in the log.
        let state = inst.state().ok();
        if state.is_none() && !inst.dir.exists() {
            ending.removed = true;
        }
        let mut any = false;
        if let Some(r) = &mut reader {
            any = r
                .read_records(|rec| {
                    if wanted {
                        wanted = out(rec);
                    }
                })
                .unwrap_or(false);
            if !wanted {
                ending.state = state;
                ending.reader = reader;
                return ending;
            }
            if until == Until::RunEnds
                && let Some(end) = r.end()
            {
                ending.end = Some(end.clone());
                ending.state = state;
                ending.reader = reader;
                return ending;
            }
        }
        let done = match until {
            Until::Drained => !any,
            Until::NotLive => !any && state.as_ref().is_none_or(|s| !is_live(s)),
            // Without an end record (a killed supervisor, or one written before this reader
            // opened the log): the state says how it ended.
            Until::RunEnds => {
                !any && (ending.removed
                    || state.as_ref().is_some_and(|s| {
                        matches!(s.status, Status::Crashed | Status::Unknown)
                            || (s.status == Status::Exited && s.finished != finished_before)
                    }))
            }
        };
        if let Some(s) = state {
            ending.state = Some(s);
        }
        if done || gone() {
            ending.reader = reader;
            return ending;
        }
        if !any {
            std::thread::sleep(POLL);
        }
    }
}
