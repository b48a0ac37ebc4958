//! The event journal: what happened to instances (create, start, die, kill, stop, destroy),
//! one JSON line each in `events.jsonl` of the data dir (0600 in the root-only data dir). The
//! process that does a thing writes its event — the CLI, a supervisor, the API server — so
//! the journal holds every instance's history whoever drove it, and `docker events` (through
//! `cela serve`) reads the same journal as `cela events`. An event is one `write` on a file
//! opened `O_APPEND`, so concurrent writers never interleave. At [`ROTATE_AT`] bytes the
//! journal is renamed to `events.jsonl.1` (the one before is dropped) under an exclusive lock
//! that appends take shared; readers go on from the renamed file to the new one. A reader
//! more than a whole journal behind misses what was rotated away. Writing an event never
//! fails what it records: a failure is logged and the operation goes on.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::record::Instance;

/// The size at which the journal is rotated.
pub const ROTATE_AT: u64 = 4 << 20;

/// The longest line written (attributes beyond it are dropped, labels first) and read.
pub const MAX_LINE: usize = 16 * 1024;

/// One event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Event {
    /// Nanoseconds since the Unix epoch.
    pub time_nano: i64,
    /// `container` (a container or a microVM: the Docker API's word for both).
    #[serde(rename = "type")]
    pub kind: String,
    /// `create`, `start`, `die`, `kill`, `stop`, `destroy`, `commit`, `checkpoint`.
    pub action: String,
    /// The instance's id.
    pub id: String,
    /// `name`, `image`, `kind` (`container` or `vm`), the instance's labels, and per action:
    /// `exitCode` (die), `signal` (kill), `imageID` (commit), `snapshot` (checkpoint; create of a
    /// restored instance).
    pub attributes: BTreeMap<String, String>,
}

fn journal(data_dir: &Path) -> PathBuf {
    data_dir.join("events.jsonl")
}

fn rotated(data_dir: &Path) -> PathBuf {
    data_dir.join("events.jsonl.1")
}

/// Now, in nanoseconds since the Unix epoch (the journal's clock).
pub fn now_nano() -> i64 {
    chrono::Utc::now().timestamp_nanos_opt().unwrap_or(i64::MAX)
}

/// Records `action` of `inst`, with `extra` attributes.
pub fn record(inst: &Instance, action: &str, extra: &[(&str, String)]) {
    let Some(data_dir) = inst.data_dir() else {
        return;
    };
    let c = &inst.config;
    let mut attributes: BTreeMap<String, String> = c.labels.clone();
    attributes.insert("name".into(), c.name.clone());
    attributes.insert("image".into(), c.image.clone());
    attributes.insert(
        "kind".into(),
        match c.kind {
            crate::record::Kind::Container => "container",
            crate::record::Kind::Vm => "vm",
        }
        .into(),
    );
    for (k, v) in extra {
        attributes.insert((*k).into(), v.clone());
    }
    let event = Event {
        time_nano: now_nano(),
        kind: "container".into(),
        action: action.into(),
        id: c.id.clone(),
        attributes,
    };
    if let Err(e) = append(data_dir, &event) {
        tracing::warn!("recording the {action} event of {}: {e}", c.name);
    }
}

/// The line `event` is written as: within [`MAX_LINE`], labels dropped when they make it
/// longer.
fn line(event: &Event) -> io::Result<Vec<u8>> {
    let mut bytes = serde_json::to_vec(event)?;
    if bytes.len() >= MAX_LINE {
        let mut slim = event.clone();
        slim.attributes
            .retain(|k, _| ["name", "image", "kind", "exitCode", "signal"].contains(&k.as_str()));
        bytes = serde_json::to_vec(&slim)?;
    }
    if bytes.len() >= MAX_LINE {
        return Err(io::Error::other("the event is too long to record"));
    }
    bytes.push(b'\n');
    Ok(bytes)
}

fn open_journal(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// Appends `event` to the journal of `data_dir`, rotating it first when it is full. Writers
/// hold `events.lock` shared while they append and a rotation holds it exclusive, so no event
/// lands in a journal after it has been renamed (where a follower would no longer look).
pub fn append(data_dir: &Path, event: &Event) -> io::Result<()> {
    use nix::fcntl::{Flock, FlockArg};
    let bytes = line(event)?;
    let path = journal(data_dir);
    let lock_file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(data_dir.join("events.lock"))?;
    let relock = |f: File, how| Flock::lock(f, how).map_err(|(_, e)| io::Error::from(e));
    let mut lock = relock(lock_file, FlockArg::LockShared)?;
    let mut file = open_journal(&path)?;
    if file.metadata()?.len() >= ROTATE_AT {
        let exclusive = relock(
            lock.unlock().map_err(|(_, e)| io::Error::from(e))?,
            FlockArg::LockExclusive,
        )?;
        // One rotation, whoever else saw the journal full.
        if std::fs::symlink_metadata(&path).is_ok_and(|m| m.len() >= ROTATE_AT) {
            std::fs::rename(&path, rotated(data_dir))?;
        }
        lock = relock(
            exclusive.unlock().map_err(|(_, e)| io::Error::from(e))?,
            FlockArg::LockShared,
        )?;
        file = open_journal(&path)?;
    }
    file.write_all(&bytes)?;
    drop(lock);
    Ok(())
}

/// Reads the journal: the events already in it, then (when followed) those that come,
/// across rotations.
pub struct Reader {
    data_dir: PathBuf,
    file: Option<BufReader<File>>,
    /// The inode of the file being read, to notice a rotation.
    ino: u64,
    /// Whether `file` is the rotated journal, read before the current one.
    in_rotated: bool,
    partial: Vec<u8>,
    /// Inside a line longer than [`MAX_LINE`], read on to its end and dropped.
    skipping: bool,
    /// The file being read has been rotated away: it is read to its end once more (what was
    /// appended before the rename) before the reader moves on.
    draining: bool,
}

impl Reader {
    /// A reader from the oldest event kept.
    pub fn open(data_dir: &Path) -> Reader {
        let mut r = Reader {
            data_dir: data_dir.to_owned(),
            file: None,
            ino: 0,
            in_rotated: false,
            partial: Vec::new(),
            skipping: false,
            draining: false,
        };
        if let Some((f, ino)) = open_plain(&rotated(data_dir)) {
            r.file = Some(BufReader::new(f));
            r.ino = ino;
            r.in_rotated = true;
        }
        r
    }

    /// A reader of the events that come from now on.
    pub fn at_end(data_dir: &Path) -> Reader {
        let mut r = Reader::open(data_dir);
        r.file = None;
        r.in_rotated = false;
        if let Some((mut f, ino)) = open_plain(&journal(data_dir)) {
            let _ = f.seek(io::SeekFrom::End(0));
            r.file = Some(BufReader::new(f));
            r.ino = ino;
        }
        r
    }

    /// The next complete event written so far, or `None` for now. Lines that do not parse
    /// (or are longer than [`MAX_LINE`]) are skipped.
    pub fn next_event(&mut self) -> Option<Event> {
        loop {
            if self.file.is_none() {
                let (f, ino) = open_plain(&journal(&self.data_dir))?;
                self.file = Some(BufReader::new(f));
                self.ino = ino;
                self.in_rotated = false;
            }
            let file = self.file.as_mut()?;
            let mut chunk = Vec::new();
            let limit = (MAX_LINE + 1).saturating_sub(self.partial.len()).max(1) as u64;
            let n = file
                .by_ref()
                .take(limit)
                .read_until(b'\n', &mut chunk)
                .unwrap_or(0);
            if self.skipping {
                self.skipping = !chunk.ends_with(b"\n");
                if n > 0 {
                    continue;
                }
            } else {
                self.partial.extend_from_slice(&chunk);
            }
            if self.partial.ends_with(b"\n") {
                let text = std::mem::take(&mut self.partial);
                match serde_json::from_slice::<Event>(&text) {
                    Ok(e) => return Some(e),
                    Err(_) => continue,
                }
            }
            if self.partial.len() > MAX_LINE {
                // A line too long: dropped, and what is left of it skipped.
                self.partial.clear();
                self.skipping = true;
                continue;
            }
            if n > 0 {
                continue;
            }
            // At the end of this file: on to the current journal when this one was rotated
            // (or is the rotated one); else wait for more.
            let current = std::fs::symlink_metadata(journal(&self.data_dir))
                .ok()
                .map(|m| m.ino());
            let moved_on = current.is_some_and(|ino| ino != self.ino);
            if moved_on && !self.in_rotated && !self.draining {
                self.draining = true;
                continue;
            }
            if self.in_rotated || moved_on {
                self.file = None;
                self.partial.clear();
                self.skipping = false;
                self.draining = false;
                continue;
            }
            return None;
        }
    }
}

fn open_plain(path: &Path) -> Option<(File, u64)> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .ok()?;
    let ino = f.metadata().ok()?.ino();
    Some((f, ino))
}

/// Which events a reader wants: times in nanoseconds since the epoch, and Docker's filters
/// (`type`, `event`, `container` — a name or an id prefix —, `image`, `label` — `KEY` or
/// `KEY=VALUE`); within a key any value matches, across keys all must.
#[derive(Debug, Clone, Default)]
pub struct Query {
    /// The events from this time (those already recorded included); none: from now on.
    pub since: Option<i64>,
    /// Until this time (then the stream ends); none: for ever.
    pub until: Option<i64>,
    pub filters: BTreeMap<String, Vec<String>>,
}

/// The filters [`Query`] knows: Docker's, of which `network`, `volume`, `plugin`, `node`,
/// `service`, `secret` and `config` match nothing (cela records container events only),
/// `scope` matches `local` and `daemon` anything.
pub const FILTERS: [&str; 14] = [
    "type",
    "event",
    "container",
    "image",
    "label",
    "scope",
    "daemon",
    "network",
    "volume",
    "plugin",
    "node",
    "service",
    "secret",
    "config",
];

impl Query {
    /// Refuses a filter it does not know (rather than matching nothing).
    pub fn check(&self) -> Result<(), String> {
        match self.filters.keys().find(|k| !FILTERS.contains(&k.as_str())) {
            Some(bad) => Err(format!(
                "invalid filter {bad:?}: events filter by {}",
                FILTERS[..5].join(", ")
            )),
            None => Ok(()),
        }
    }

    pub fn matches(&self, e: &Event) -> bool {
        if self.since.is_some_and(|s| e.time_nano < s)
            || self.until.is_some_and(|u| e.time_nano > u)
        {
            return false;
        }
        let attr = |k: &str| e.attributes.get(k).map(String::as_str).unwrap_or("");
        self.filters.iter().all(|(key, values)| {
            values.iter().any(|want| match key.as_str() {
                "type" => want == &e.kind,
                "event" => want == &e.action,
                "container" => {
                    want == attr("name") || (!want.is_empty() && e.id.starts_with(want.as_str()))
                }
                "image" => want == attr("image"),
                "scope" => want == "local",
                "daemon" => true,
                "label" => match want.split_once('=') {
                    Some((k, v)) => e.attributes.get(k).is_some_and(|x| x == v),
                    None => e.attributes.contains_key(want.as_str()),
                },
                _ => false,
            })
        })
    }
}

/// How often a followed journal is looked at again.
const POLL: std::time::Duration = std::time::Duration::from_millis(50);

/// Gives `emit` every event of `data_dir`'s journal that `query` wants, in order: those
/// recorded since `query.since`, then those that come, until `query.until` has passed, `gone`
/// says the reader has gone, or `emit` returns false.
pub fn follow(
    data_dir: &Path,
    query: &Query,
    gone: &dyn Fn() -> bool,
    mut emit: impl FnMut(&Event) -> bool,
) {
    let mut reader = match query.since {
        Some(_) => Reader::open(data_dir),
        None => Reader::at_end(data_dir),
    };
    loop {
        // Whether `until` had passed before this look: everything written by then is read.
        let past = query.until.is_some_and(|u| now_nano() > u);
        while let Some(e) = reader.next_event() {
            // (`matches` drops events after `until`: the journal is in the order events were
            // written, which is not strictly the order of their times.)
            if query.matches(&e) && !emit(&e) {
                return;
            }
        }
        if past || gone() {
            return;
        }
        std::thread::sleep(POLL);
    }
}

/// A time as Docker's clients send it: `SECONDS[.NANOS]` since the epoch (what the docker CLI
/// makes of `--since 10m` or a date), or RFC 3339; in nanoseconds since the epoch.
pub fn parse_time(v: &str) -> Result<i64, String> {
    let bad = || format!("{v:?} is not a time (seconds since the epoch, or RFC 3339)");
    let (secs, frac) = v.split_once('.').unwrap_or((v, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if !secs.is_empty() && digits(secs) && digits(frac) && frac.len() <= 9 {
        let secs: i64 = secs.parse().map_err(|_| bad())?;
        let nanos: i64 = format!("{frac:0<9}").parse().map_err(|_| bad())?;
        return secs
            .checked_mul(1_000_000_000)
            .and_then(|s| s.checked_add(nanos))
            .ok_or_else(bad);
    }
    chrono::DateTime::parse_from_rfc3339(v)
        .ok()
        .and_then(|t| t.timestamp_nanos_opt())
        .ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(n: i64, action: &str) -> Event {
        Event {
            time_nano: n,
            kind: "container".into(),
            action: action.into(),
            id: format!("{n:012}"),
            attributes: BTreeMap::from([("name".into(), format!("i{n}"))]),
        }
    }

    #[test]
    fn events_are_read_back_in_order_across_a_rotation_and_as_they_come() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        append(d, &event(1, "create")).unwrap();
        append(d, &event(2, "start")).unwrap();
        let mut follower = Reader::at_end(d);
        assert_eq!(follower.next_event(), None);
        // A full journal: rotated by the next append.
        let f = OpenOptions::new().append(true).open(journal(d)).unwrap();
        f.set_len(ROTATE_AT).unwrap();
        append(d, &event(3, "die")).unwrap();
        assert!(rotated(d).exists());
        append(d, &event(4, "destroy")).unwrap();
        let mut all = Reader::open(d);
        let actions: Vec<String> = std::iter::from_fn(|| all.next_event())
            .map(|e| e.action)
            .collect();
        assert_eq!(actions, ["create", "start", "die", "destroy"]);
        // The follower, at the end of the old journal when it was rotated, goes on.
        let seen: Vec<i64> = std::iter::from_fn(|| follower.next_event())
            .map(|e| e.time_nano)
            .collect();
        assert_eq!(seen, [3, 4]);
        append(d, &event(5, "create")).unwrap();
        assert_eq!(follower.next_event().map(|e| e.time_nano), Some(5));
        assert_eq!(follower.next_event(), None);
    }

    #[test]
    fn times_parse_as_docker_clients_send_them() {
        assert_eq!(parse_time("12").unwrap(), 12_000_000_000);
        assert_eq!(parse_time("12.5").unwrap(), 12_500_000_000);
        assert_eq!(
            parse_time("1700000000.000000001").unwrap(),
            1_700_000_000_000_000_001
        );
        assert_eq!(parse_time("1970-01-01T00:00:01Z").unwrap(), 1_000_000_000);
        for bad in ["99999999999999999999", "1.2.3", "10m", "", "1.0000000001"] {
            assert!(parse_time(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn queries_select_by_time_and_filters() {
        let mut e = event(5, "die");
        e.attributes.insert("image".into(), "busybox".into());
        e.attributes.insert("team".into(), "blue".into());
        let q = |since, until, f: &[(&str, &[&str])]| Query {
            since,
            until,
            filters: f
                .iter()
                .map(|(k, v)| (k.to_string(), v.iter().map(|s| s.to_string()).collect()))
                .collect(),
        };
        assert!(q(None, None, &[]).matches(&e));
        assert!(q(Some(5), Some(5), &[]).matches(&e));
        assert!(!q(Some(6), None, &[]).matches(&e));
        assert!(!q(None, Some(4), &[]).matches(&e));
        assert!(q(None, None, &[("event", &["start", "die"])]).matches(&e));
        assert!(!q(None, None, &[("event", &["start"])]).matches(&e));
        assert!(
            q(
                None,
                None,
                &[("container", &["i5"]), ("image", &["busybox"])]
            )
            .matches(&e)
        );
        assert!(
            q(None, None, &[("container", &["0000"])]).matches(&e),
            "an id prefix"
        );
        assert!(!q(None, None, &[("container", &[""])]).matches(&e));
        assert!(q(None, None, &[("label", &["team=blue"])]).matches(&e));
        assert!(q(None, None, &[("label", &["team"])]).matches(&e));
        assert!(!q(None, None, &[("label", &["team=red"])]).matches(&e));
        assert!(q(None, None, &[("type", &["network"])]).check().is_ok());
        assert!(q(None, None, &[("colour", &["x"])]).check().is_err());
    }

    #[test]
    fn a_huge_event_loses_its_labels_and_bad_lines_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mut big = event(1, "create");
        big.attributes.insert("label".into(), "x".repeat(MAX_LINE));
        append(d, &big).unwrap();
        let mut f = OpenOptions::new().append(true).open(journal(d)).unwrap();
        f.write_all(b"not json\n").unwrap();
        f.write_all(&vec![b'y'; MAX_LINE * 2]).unwrap();
        f.write_all(b"\n").unwrap();
        drop(f);
        append(d, &event(2, "start")).unwrap();
        let mut r = Reader::open(d);
        let first = r.next_event().unwrap();
        assert_eq!(first.attributes.get("name").unwrap(), "i1");
        assert!(!first.attributes.contains_key("label"));
        assert_eq!(r.next_event().unwrap().action, "start");
        assert_eq!(r.next_event(), None);
    }
}
