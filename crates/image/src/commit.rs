//! Committing a container (`cela commit`, Docker's `commit`): its writable layer — an OverlayFS
//! upper directory — written as an OCI layer, and an image made of the container's image with
//! that layer on top and a config saying how the container ran.
//!
//! The upper directory is written by the container, so it is hostile input: it is walked
//! through directory descriptors only, every entry named as (directory, one name), looked at
//! with `AT_SYMLINK_NOFOLLOW` and opened with `O_NOFOLLOW|O_NONBLOCK`, and a file is only read
//! if the descriptor opened is the inode looked at. A file's data is read to the size its
//! descriptor had and no further; one that shrinks meanwhile ends the commit with an error (a
//! running container should be paused, as the CLI does by default). The walk is bounded in
//! depth ([`tree::MAX_DEPTH`], without recursion), in entries ([`MAX_ENTRIES`],
//! [`MAX_DIR_ENTRIES`], [`MAX_HELD_NAMES`]) and in bytes
//! (the free space of the store's file system, keeping [`tar_limits::RESERVE`]).
//!
//! OverlayFS's own markers become the OCI layer's: a 0/0 character device (a deleted file) is a
//! `.wh.NAME` entry, a directory with `trusted.overlay.opaque=y` gets a `.wh..wh..opq` entry.
//! Redirected directories and metadata-only copies (`redirect_dir`, `metacopy`) cannot be
//! written as a layer from the upper directory alone and are refused; cela mounts without them.
//! Extended attributes go into PAX records only where a layer may set them when unpacked
//! ([`xattr_allowed`]). The layer is written uncompressed (its digest is its diff ID).
//!
//! The result is an ordinary stored image: used by `run` (its new layer then goes through the
//! same unpacking as a pulled one), `run --vm`, `image ls` and `image rm`.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{FileType, Mode, OFlags, Stat};
use serde_json::{Map, Value, json};

use crate::error::IoContext;
use crate::manifest::{self, Parsed};
use crate::progress::Progress;
use crate::tar_limits;
use crate::unpack::tree;
use crate::unpack::xattr_allowed;
use crate::{ImageError, ImageRecord, Reference, Store};

/// The most entries a committed layer may hold.
pub const MAX_ENTRIES: u64 = 10_000_000;
/// The most entries one directory of it may hold (its names are held in memory to be sorted).
pub const MAX_DIR_ENTRIES: usize = 1_000_000;
/// The most names held in memory at once: those of every directory open on the way down.
pub const MAX_HELD_NAMES: usize = 2_000_000;
/// The most bytes of paths of hard-linked files held at once.
pub const MAX_LINK_BYTES: usize = 64 << 20;
/// How often (in bytes written) the room left on the store's file system is checked again.
const ROOM_CHECK: u64 = 64 << 20;
/// The media type of the layer cela writes.
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";

/// How the container ran, which the new image's config takes over (as Docker's commit does).
#[derive(Debug, Clone, Default)]
pub struct ContainerSettings {
    /// The full command line it ran.
    pub command: Vec<String>,
    /// `KEY=VALUE`, the image's and then the user's (a later key wins).
    pub env: Vec<String>,
    pub workdir: Option<String>,
    pub user: Option<String>,
    pub labels: BTreeMap<String, String>,
}

/// What to commit, and how to name and describe the image.
#[derive(Debug, Clone, Default)]
pub struct CommitRequest {
    /// The container's image (a digest or a name the store resolves).
    pub base: String,
    /// The container's OverlayFS upper directory; absent is an empty layer.
    pub upper: PathBuf,
    /// Paths (relative to the root) left out when they are an empty file or directory: the
    /// mount points the runtime made for bind mounts (`etc/resolv.conf`, volumes).
    pub mount_points: Vec<PathBuf>,
    /// `NAME[:TAG]`; none leaves the image unnamed, known by its digest.
    pub name: Option<String>,
    pub settings: ContainerSettings,
    /// Dockerfile instructions applied to the config last (`--change`).
    pub changes: Vec<String>,
    /// The commit message, kept in the image's history.
    pub comment: Option<String>,
    pub author: Option<String>,
}

/// Checks what a caller gives before any work, so that a front end can answer a bad name or
/// change as a bad request: the name (`NAME[:TAG]`, returned in full) and each change.
pub fn check_request(name: Option<&str>, changes: &[String]) -> Result<Option<String>, ImageError> {
    let mut scratch = Map::new();
    for line in changes {
        apply_change(&mut scratch, line)?;
    }
    match name {
        Some(n) => {
            let r: Reference = n.parse()?;
            Ok(Some(r.name().ok_or_else(|| ImageError::BadReference {
                input: n.to_owned(),
                why: "an image is named NAME[:TAG], without a digest".into(),
            })?))
        }
        None => Ok(None),
    }
}

/// Makes the image `req` describes and records it in the store. A commit that fails takes out
/// the blobs it stored, leaving the store as it was.
pub fn commit(
    store: &Store,
    req: &CommitRequest,
    progress: &Progress,
) -> Result<ImageRecord, ImageError> {
    let name = check_request(req.name.as_deref(), &req.changes)?;
    let store = &store.journaled();
    let lock = store.content_lock()?;
    let result = commit_locked(store, req, name, progress);
    if result.is_err() {
        lock.roll_back(store);
    }
    result
}

fn commit_locked(
    store: &Store,
    req: &CommitRequest,
    name: Option<String>,
    progress: &Progress,
) -> Result<ImageRecord, ImageError> {
    let base = store.resolve(&req.base)?;
    let what = format!("image {}", base.digest);
    let cfg_bytes = store.read_blob(&base.config)?;
    let mut config: Value = serde_json::from_slice(&cfg_bytes).map_err(|e| bad_config(&what, e))?;
    if !config.is_object() {
        return Err(bad_config(&what, "not a JSON object"));
    }
    // The config is edited before the layer is written, so a bad --change costs nothing.
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    edit_config(&mut config, req, &now)?;

    let step = progress.step("committing the container's changes");
    let mut blob = store.blob_writer()?;
    let stats = write_layer(&req.upper, &req.mount_points, &mut blob, store, &step)?;
    let (layer, size) = blob.commit("the committed layer", None, None)?;
    step.done();
    tracing::debug!(entries = stats.entries, bytes = size, "layer written");

    let root = config
        .as_object_mut()
        .expect("checked to be an object")
        .entry("rootfs")
        .or_insert_with(|| json!({"type": "layers", "diff_ids": []}));
    match root.get_mut("diff_ids").and_then(Value::as_array_mut) {
        Some(ids) => ids.push(json!(layer.to_string())),
        None => return Err(bad_config(&what, "its rootfs has no diff_ids")),
    }
    let cfg_bytes = serde_json::to_vec(&config).expect("JSON values serialize");
    let cfg = store.put_bytes("the committed image's config", &cfg_bytes, None)?;
    let mut layers: Vec<(crate::Digest, u64, &str)> = base
        .layers
        .iter()
        .map(|l| (l.digest.clone(), l.size, l.media_type.as_str()))
        .collect();
    layers.push((layer, size, LAYER_MEDIA_TYPE));
    let bytes = manifest::synthesize((&cfg, cfg_bytes.len() as u64), &layers);
    let digest = store.put_bytes("the committed image's manifest", &bytes, None)?;
    let Parsed::Manifest(m) = manifest::parse("the committed image's manifest", &bytes)? else {
        unreachable!("a synthesized manifest is a manifest")
    };
    let source = format!("commit of {}", base.digest);
    let rec = manifest::record(store, digest, &m, name.into_iter().collect(), source)?;
    store.commit_image(rec)
}

fn bad_config(what: &str, why: impl std::fmt::Display) -> ImageError {
    ImageError::BadManifest {
        what: format!("config of {what}"),
        why: why.to_string(),
    }
}

fn bad_change(line: &str, why: impl std::fmt::Display) -> ImageError {
    ImageError::BadManifest {
        what: format!("--change {line:?}"),
        why: why.to_string(),
    }
}

/// The new image's config: the container's settings, then the changes; its creation time,
/// author and a history entry.
fn edit_config(config: &mut Value, req: &CommitRequest, now: &str) -> Result<(), ImageError> {
    let top = config.as_object_mut().expect("checked to be an object");
    let run = top
        .entry("config")
        .or_insert_with(|| Value::Object(Map::new()));
    if !run.is_object() {
        *run = Value::Object(Map::new());
    }
    let run = run.as_object_mut().expect("made an object");
    apply_settings(run, &req.settings);
    for line in &req.changes {
        apply_change(run, line)?;
    }
    top.insert("created".into(), json!(now));
    if let Some(a) = &req.author {
        top.insert("author".into(), json!(a));
    }
    let mut entry = Map::new();
    entry.insert("created".into(), json!(now));
    entry.insert("created_by".into(), json!("cela commit"));
    if let Some(c) = &req.comment {
        entry.insert("comment".into(), json!(c));
    }
    if let Some(a) = &req.author {
        entry.insert("author".into(), json!(a));
    }
    match top.get_mut("history") {
        Some(Value::Array(h)) => h.push(Value::Object(entry)),
        _ => {
            top.insert("history".into(), json!([entry]));
        }
    }
    Ok(())
}

fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The container's command line as the image's Entrypoint and Cmd: the entrypoint is kept
/// when the command line starts with it (the rest is the Cmd), else the whole line is the Cmd.
fn apply_settings(run: &mut Map<String, Value>, s: &ContainerSettings) {
    if !s.command.is_empty() {
        let entrypoint = strings(run.get("Entrypoint"));
        if s.command.starts_with(&entrypoint) {
            run.insert("Cmd".into(), json!(s.command[entrypoint.len()..]));
        } else {
            run.insert("Entrypoint".into(), Value::Null);
            run.insert("Cmd".into(), json!(s.command));
        }
    }
    if !s.env.is_empty() {
        let mut env: Vec<String> = Vec::new();
        for e in &s.env {
            set_env(&mut env, e);
        }
        run.insert("Env".into(), json!(env));
    }
    if let Some(w) = &s.workdir {
        run.insert("WorkingDir".into(), json!(w));
    }
    if let Some(u) = &s.user {
        run.insert("User".into(), json!(u));
    }
    if !s.labels.is_empty() {
        let labels = object(run, "Labels");
        for (k, v) in &s.labels {
            labels.insert(k.clone(), json!(v));
        }
    }
}

/// Sets `KEY=VALUE` in `env`, replacing an entry of the same key.
fn set_env(env: &mut Vec<String>, entry: &str) {
    let key = entry.split('=').next().unwrap_or(entry);
    match env
        .iter_mut()
        .find(|e| e.split('=').next().unwrap_or(e) == key)
    {
        Some(e) => *e = entry.to_owned(),
        None => env.push(entry.to_owned()),
    }
}

/// The object at `key` of `run`, made if absent or not an object.
fn object<'a>(run: &'a mut Map<String, Value>, key: &str) -> &'a mut Map<String, Value> {
    let v = run.entry(key).or_insert_with(|| Value::Object(Map::new()));
    if !v.is_object() {
        *v = Value::Object(Map::new());
    }
    v.as_object_mut().expect("made an object")
}

/// The instructions `--change` takes (Docker's list, less ONBUILD and HEALTHCHECK).
pub const CHANGES: &str = "CMD, ENTRYPOINT, ENV, EXPOSE, LABEL, STOPSIGNAL, USER, VOLUME, WORKDIR";

/// Applies one Dockerfile instruction to the config's `config` object.
pub fn apply_change(run: &mut Map<String, Value>, line: &str) -> Result<(), ImageError> {
    let line_t = line.trim();
    let (word, rest) = match line_t.split_once(char::is_whitespace) {
        Some((w, r)) => (w, r.trim()),
        None => (line_t, ""),
    };
    let instr = word.to_ascii_uppercase();
    // `$VAR` and `${VAR}` in the arguments (not CMD's or ENTRYPOINT's, left to the shell)
    // are the config's environment before this instruction, as in a Dockerfile.
    let env = strings(run.get("Env"));
    let words = |s: &str| words(line, s, Some(env.as_slice()));
    let pairs = |s: &str| pairs(line, s, &env);
    match instr.as_str() {
        "CMD" | "ENTRYPOINT" => {
            let argv = if rest.starts_with('[') {
                serde_json::from_str::<Vec<String>>(rest)
                    .map_err(|e| bad_change(line, format!("not a JSON array of strings: {e}")))?
            } else if rest.is_empty() {
                return Err(bad_change(line, format!("{instr} needs a command")));
            } else {
                vec!["/bin/sh".into(), "-c".into(), rest.to_owned()]
            };
            let key = if instr == "CMD" { "Cmd" } else { "Entrypoint" };
            run.insert(key.into(), json!(argv));
            // As in a Dockerfile, a new entrypoint drops the image's command.
            if instr == "ENTRYPOINT" {
                run.insert("Cmd".into(), Value::Null);
            }
        }
        "ENV" => {
            let mut env = strings(run.get("Env"));
            for (k, v) in pairs(rest)? {
                set_env(&mut env, &format!("{k}={v}"));
            }
            run.insert("Env".into(), json!(env));
        }
        "LABEL" => {
            let pairs = pairs(rest)?;
            let labels = object(run, "Labels");
            for (k, v) in pairs {
                labels.insert(k, json!(v));
            }
        }
        "EXPOSE" => {
            let words = words(rest)?;
            if words.is_empty() {
                return Err(bad_change(line, "EXPOSE needs a port"));
            }
            let mut ports = Vec::new();
            for w in words {
                let (port, proto) = w.split_once('/').unwrap_or((&w, "tcp"));
                let proto = proto.to_ascii_lowercase();
                if port.parse::<u16>().is_err() || !["tcp", "udp", "sctp"].contains(&&*proto) {
                    return Err(bad_change(
                        line,
                        format!("{w:?} is not PORT or PORT/tcp|udp|sctp"),
                    ));
                }
                ports.push(format!("{port}/{proto}"));
            }
            let exposed = object(run, "ExposedPorts");
            for p in ports {
                exposed.insert(p, json!({}));
            }
        }
        "VOLUME" => {
            let paths = if rest.starts_with('[') {
                serde_json::from_str::<Vec<String>>(rest)
                    .map_err(|e| bad_change(line, format!("not a JSON array of strings: {e}")))?
            } else {
                words(rest)?
            };
            if paths.is_empty() {
                return Err(bad_change(line, "VOLUME needs a path"));
            }
            let volumes = object(run, "Volumes");
            for p in paths {
                volumes.insert(p, json!({}));
            }
        }
        "USER" | "WORKDIR" | "STOPSIGNAL" => {
            let value = words(rest)?;
            let [value] = &value[..] else {
                return Err(bad_change(line, format!("{instr} takes one value")));
            };
            let (key, value) = match instr.as_str() {
                "USER" => ("User", value.clone()),
                "STOPSIGNAL" => ("StopSignal", value.clone()),
                _ => {
                    // A relative directory is taken from the current one, as in a Dockerfile.
                    let cur = run.get("WorkingDir").and_then(Value::as_str).unwrap_or("/");
                    let path = Path::new(cur).join(value);
                    ("WorkingDir", path.to_string_lossy().into_owned())
                }
            };
            run.insert(key.into(), json!(value));
        }
        _ => {
            return Err(bad_change(
                line,
                format!("{word:?} is not an instruction commit takes ({CHANGES})"),
            ));
        }
    }
    Ok(())
}

/// Splits `s` into words as a Dockerfile does: whitespace apart, double or single quotes
/// keeping spaces, a backslash escaping the next character (outside single quotes); with
/// `env`, variables are replaced outside single quotes ([`expand`]).
fn words(line: &str, s: &str, env: Option<&[String]>) -> Result<Vec<String>, ImageError> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    let expanding = env.is_some();
    let env = env.unwrap_or_default();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some('\''), c) => cur.push(c),
            (_, '\\') => match chars.next() {
                Some(n) => {
                    cur.push(n);
                    in_word = true;
                }
                None => return Err(bad_change(line, "it ends with a backslash")),
            },
            (_, '$') if expanding => {
                let value = expand(line, &mut chars, env, 0)?;
                // Unquoted, an empty value makes no word (as in a shell).
                in_word |= quote.is_some() || !value.is_empty();
                cur.push_str(&value);
            }
            (Some(_), c) => cur.push(c),
            (None, '"' | '\'') => {
                quote = Some(c);
                in_word = true;
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            (None, c) => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if quote.is_some() {
        return Err(bad_change(line, "a quote is not closed"));
    }
    if in_word {
        out.push(cur);
    }
    Ok(out)
}

/// How deeply `${A:-${B:-...}}` may nest.
const MAX_NESTING: usize = 16;

/// What follows a `$` (already taken from `chars`): `NAME`, `${NAME}`, `${NAME:-WORD}` (WORD
/// when NAME is unset or empty) or `${NAME:+WORD}` (WORD when it is set and not empty), NAME
/// looked up in `env` (`KEY=VALUE`, the last one wins) and an unset one empty, as Docker's
/// builder does; a `$` before anything else stays a `$`.
fn expand(
    line: &str,
    chars: &mut std::iter::Peekable<std::str::Chars<'_>>,
    env: &[String],
    depth: usize,
) -> Result<String, ImageError> {
    let lookup = |name: &str| {
        env.iter()
            .rev()
            .find_map(|e| e.strip_prefix(name)?.strip_prefix('='))
            .map(str::to_owned)
    };
    let is_name = |c: &char| c.is_ascii_alphanumeric() || *c == '_';
    if chars.peek() != Some(&'{') {
        let mut name = String::new();
        while let Some(c) = chars.next_if(is_name) {
            name.push(c);
        }
        return Ok(if name.is_empty() {
            "$".to_owned()
        } else {
            lookup(&name).unwrap_or_default()
        });
    }
    chars.next();
    if depth >= MAX_NESTING {
        return Err(bad_change(
            line,
            format!("variables nest deeper than {MAX_NESTING}"),
        ));
    }
    let mut name = String::new();
    while let Some(c) = chars.next_if(is_name) {
        name.push(c);
    }
    if name.is_empty() {
        return Err(bad_change(line, "${ without a variable name"));
    }
    let modifier = match chars.next() {
        Some('}') => return Ok(lookup(&name).unwrap_or_default()),
        Some(':') => match chars.next() {
            Some(m @ ('-' | '+')) => m,
            other => {
                return Err(bad_change(
                    line,
                    format!(
                        "${{{name}:{}…}}: only :- and :+ are understood",
                        other.unwrap_or(' ')
                    ),
                ));
            }
        },
        None => return Err(bad_change(line, format!("${{{name}… is not closed"))),
        _ => {
            return Err(bad_change(
                line,
                format!("${{{name}…: a }} or :- or :+ was expected"),
            ));
        }
    };
    // The word, up to the matching brace; itself expanded, escapes kept as in a word.
    let mut word = String::new();
    loop {
        match chars.next() {
            None => return Err(bad_change(line, format!("${{{name}… is not closed"))),
            Some('}') => break,
            Some('\\') => match chars.next() {
                Some(n) => word.push(n),
                None => return Err(bad_change(line, "it ends with a backslash")),
            },
            Some('$') => word.push_str(&expand(line, chars, env, depth + 1)?),
            Some(c) => word.push(c),
        }
    }
    let value = lookup(&name).filter(|v| !v.is_empty());
    Ok(match (modifier, value) {
        ('-', Some(v)) => v,
        ('-', None) => word,
        (_, Some(_)) => word,
        (_, None) => String::new(),
    })
}

/// `KEY=VALUE ...`, or the old form `KEY VALUE WITH SPACES`, values expanded from `env`.
fn pairs(line: &str, rest: &str, env: &[String]) -> Result<Vec<(String, String)>, ImageError> {
    let first = rest.split_whitespace().next().unwrap_or("");
    let out: Vec<(String, String)> = if first.contains('=') {
        words(line, rest, Some(env))?
            .into_iter()
            .map(|w| match w.split_once('=') {
                Some((k, v)) => Ok((k.to_owned(), v.to_owned())),
                None => Err(bad_change(line, format!("{w:?} is not KEY=VALUE"))),
            })
            .collect::<Result<_, _>>()?
    } else {
        let (k, v) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
        let v = words(line, v, Some(env))?.join(" ");
        vec![(k.to_owned(), v)]
    };
    if out.is_empty() || out.iter().any(|(k, _)| k.is_empty()) {
        return Err(bad_change(line, "a key is missing"));
    }
    Ok(out)
}

/// What a written layer holds.
#[derive(Debug, Default, Clone, Copy)]
pub struct LayerStats {
    pub entries: u64,
    pub whiteouts: u64,
}

/// A writer that stops with an error when the store's file system has no more room (less
/// [`tar_limits::RESERVE`]), checked every [`ROOM_CHECK`] bytes.
struct Roomed<'a> {
    inner: &'a mut dyn Write,
    dir: &'a std::fs::File,
    written: u64,
    checked_at: u64,
    room: u64,
}

impl Write for Roomed<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.written - self.checked_at >= ROOM_CHECK {
            self.inner.flush()?;
            self.room = tar_limits::room(self.dir)?;
            self.checked_at = self.written;
        }
        if self.written - self.checked_at + buf.len() as u64 > self.room {
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                format!(
                    "the layer is larger than the store's file system has free (keeping {} bytes in reserve)",
                    tar_limits::RESERVE
                ),
            ));
        }
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Writes the OCI layer of the upper directory `upper` into `out`.
pub fn write_layer(
    upper: &Path,
    mount_points: &[PathBuf],
    out: &mut dyn Write,
    store: &Store,
    step: &crate::progress::Step,
) -> Result<LayerStats, ImageError> {
    let tmp = std::fs::File::open(store.tmp_dir()).at("opening", store.tmp_dir())?;
    let room = tar_limits::room(&tmp).at("inspecting the file system of", store.tmp_dir())?;
    let roomed = Roomed {
        inner: out,
        dir: &tmp,
        written: 0,
        checked_at: 0,
        room,
    };
    let mut w = Walker {
        tar: tar::Builder::new(roomed),
        links: HashMap::new(),
        link_bytes: 0,
        mount_points,
        stats: LayerStats::default(),
        held: 0,
        upper,
        step,
    };
    match tree::open_root(upper) {
        Ok(root) => w.walk(root)?,
        // A container that never ran has no upper directory: its layer is empty.
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).at("opening", upper),
    }
    let mut roomed = w.tar.into_inner().at("writing the layer of", upper)?;
    roomed.flush().at("writing the layer of", upper)?;
    Ok(w.stats)
}

struct Walker<'a> {
    tar: tar::Builder<Roomed<'a>>,
    /// Files with more than one link, by (device, inode): the path first written, and how
    /// many links are still to come.
    links: HashMap<(u64, u64), (PathBuf, u64)>,
    /// The bytes of the paths in `links`.
    link_bytes: usize,
    mount_points: &'a [PathBuf],
    stats: LayerStats,
    /// Names listed and not yet walked, across the open directories.
    held: usize,
    upper: &'a Path,
    step: &'a crate::progress::Step,
}

fn join(path: &[OsString]) -> PathBuf {
    path.iter().collect()
}

impl Walker<'_> {
    fn hostile(&self, path: &Path, why: impl Into<String>) -> ImageError {
        ImageError::HostileEntry {
            layer: format!("upper directory {}", self.upper.display()),
            entry: path.display().to_string(),
            why: why.into(),
        }
    }

    fn io(&self, path: &Path) -> impl FnOnce(io::Error) -> ImageError + use<> {
        let at = self.upper.join(path);
        move |source| ImageError::Io {
            action: "committing",
            path: at,
            source,
        }
    }

    fn count(&mut self, path: &Path) -> Result<(), ImageError> {
        self.stats.entries += 1;
        if self.stats.entries > MAX_ENTRIES {
            return Err(self.hostile(
                path,
                format!("the layer has more than {MAX_ENTRIES} entries"),
            ));
        }
        Ok(())
    }

    /// Writes the tree below `root`, each directory's entries sorted by name. The walk keeps
    /// its own stack of open directories (no recursion), at most [`tree::MAX_DEPTH`] deep, and
    /// holds at most [`MAX_HELD_NAMES`] names at once across it.
    fn walk(&mut self, root: OwnedFd) -> Result<(), ImageError> {
        struct Level {
            fd: OwnedFd,
            names: Vec<OsString>,
            next: usize,
        }
        let mut path: Vec<OsString> = Vec::new();
        let names = self.list(root.as_fd(), &path)?;
        let mut stack = vec![Level {
            fd: root,
            names,
            next: 0,
        }];
        while let Some(top) = stack.last_mut() {
            if top.next == top.names.len() {
                self.held -= top.names.len();
                stack.pop();
                path.pop();
                continue;
            }
            path.push(std::mem::take(&mut top.names[top.next]));
            top.next += 1;
            match self.entry(top.fd.as_fd(), &path)? {
                Some(fd) => {
                    if stack.len() >= tree::MAX_DEPTH {
                        return Err(self.hostile(
                            &join(&path),
                            format!("deeper than {} levels", tree::MAX_DEPTH),
                        ));
                    }
                    let names = self.list(fd.as_fd(), &path)?;
                    stack.push(Level { fd, names, next: 0 });
                }
                None => {
                    path.pop();
                }
            }
        }
        Ok(())
    }

    /// The names in the directory `dir` (at `path`), sorted.
    fn list(
        &mut self,
        dir: BorrowedFd<'_>,
        path: &[OsString],
    ) -> Result<Vec<OsString>, ImageError> {
        let here = join(path);
        let mut names: Vec<OsString> = Vec::new();
        for e in rustix::fs::Dir::read_from(dir).map_err(|e| self.io(&here)(e.into()))? {
            let e = e.map_err(|e| self.io(&here)(e.into()))?;
            let n = e.file_name().to_bytes();
            if n == b"." || n == b".." {
                continue;
            }
            if names.len() >= MAX_DIR_ENTRIES {
                return Err(self.hostile(
                    &here,
                    format!("a directory with more than {MAX_DIR_ENTRIES} entries"),
                ));
            }
            if self.held + names.len() >= MAX_HELD_NAMES {
                return Err(self.hostile(
                    &here,
                    format!(
                        "more than {MAX_HELD_NAMES} entries in the directories above it and in it"
                    ),
                ));
            }
            names.push(OsStr::from_bytes(n).to_owned());
        }
        names.sort();
        self.held += names.len();
        Ok(names)
    }

    /// Writes the entry at `path` of `dir`; a directory (to descend into) is returned open.
    fn entry(
        &mut self,
        dir: BorrowedFd<'_>,
        path: &[OsString],
    ) -> Result<Option<OwnedFd>, ImageError> {
        let name = path.last().expect("an entry has a name").clone();
        let rel = join(path);
        if name.as_bytes().starts_with(b".wh.") {
            // In a layer such a name deletes what it names: the container cannot make one.
            return Err(self.hostile(
                &rel,
                "a name starting with .wh. is what an image layer marks deletions with",
            ));
        }
        let Some(st) = tree::lstat_at(dir, &name).map_err(self.io(&rel))? else {
            // Gone since it was listed (a container that runs on).
            return Ok(None);
        };
        let is_mount_point = self.mount_points.iter().any(|m| m == &rel);
        match tree::kind(&st) {
            FileType::CharacterDevice if st.st_rdev == 0 => {
                self.count(&rel)?;
                self.stats.whiteouts += 1;
                let mut wh = OsString::from(".wh.");
                wh.push(&name);
                let at = rel.with_file_name(wh);
                self.empty_file(&at, &st)?;
                Ok(None)
            }
            FileType::Directory => {
                let fd = tree::open_dir_at(dir, &name).map_err(self.io(&rel))?;
                let now = rustix::fs::fstat(&fd).map_err(|e| self.io(&rel)(e.into()))?;
                if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino) {
                    return Err(self.changed(&rel));
                }
                let xattrs = self.xattrs(fd.as_fd(), &rel, true)?;
                let opaque = xattrs.opaque;
                if is_mount_point && !opaque && is_empty_dir(fd.as_fd()) {
                    return Ok(None);
                }
                self.count(&rel)?;
                let mut h = header(&now, tar::EntryType::Directory);
                self.pax(&xattrs.carried, &rel)?;
                let mut dir_path = rel.clone().into_os_string();
                dir_path.push("/");
                self.tar
                    .append_data(&mut h, Path::new(&dir_path), io::empty())
                    .map_err(self.io(&rel))?;
                if opaque {
                    self.count(&rel)?;
                    self.empty_file(&rel.join(".wh..wh..opq"), &now)?;
                }
                Ok(Some(fd))
            }
            FileType::RegularFile => {
                if is_mount_point && st.st_size == 0 {
                    return Ok(None);
                }
                self.count(&rel)?;
                self.file(dir, &name, &rel, &st)?;
                Ok(None)
            }
            FileType::Symlink => {
                self.count(&rel)?;
                let target = tree::readlink_at(dir, &name).map_err(self.io(&rel))?;
                let mut h = header(&st, tar::EntryType::Symlink);
                self.tar
                    .append_link(&mut h, &rel, &target)
                    .map_err(self.io(&rel))?;
                Ok(None)
            }
            t @ (FileType::CharacterDevice | FileType::BlockDevice | FileType::Fifo) => {
                self.count(&rel)?;
                let kind = match t {
                    FileType::CharacterDevice => tar::EntryType::Char,
                    FileType::BlockDevice => tar::EntryType::Block,
                    _ => tar::EntryType::Fifo,
                };
                let mut h = header(&st, kind);
                if t != FileType::Fifo {
                    h.set_device_major(rustix::fs::major(st.st_rdev))
                        .map_err(self.io(&rel))?;
                    h.set_device_minor(rustix::fs::minor(st.st_rdev))
                        .map_err(self.io(&rel))?;
                }
                self.tar
                    .append_data(&mut h, &rel, io::empty())
                    .map_err(self.io(&rel))?;
                Ok(None)
            }
            // Sockets have no place in an image (Docker leaves them out too).
            _ => Ok(None),
        }
    }

    fn changed(&self, rel: &Path) -> ImageError {
        self.hostile(
            rel,
            "it changed while being committed (pause the container, or commit it stopped)",
        )
    }

    fn empty_file(&mut self, at: &Path, st: &Stat) -> Result<(), ImageError> {
        let mut h = header(st, tar::EntryType::Regular);
        h.set_mode(0o600);
        h.set_size(0);
        self.tar
            .append_data(&mut h, at, io::empty())
            .map_err(self.io(at))
    }

    fn file(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        rel: &Path,
        st: &Stat,
    ) -> Result<(), ImageError> {
        // Looked at through an O_PATH descriptor first, and opened for reading only once it
        // is known to be this regular file: a device node swapped in is never opened.
        let path_fd: OwnedFd = rustix::fs::openat(
            dir,
            name,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| self.io(rel)(e.into()))?;
        let now = rustix::fs::fstat(&path_fd).map_err(|e| self.io(rel)(e.into()))?;
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino)
            || tree::kind(&now) != FileType::RegularFile
        {
            return Err(self.changed(rel));
        }
        let fd: OwnedFd = rustix::fs::open(
            format!(
                "/proc/self/fd/{}",
                std::os::fd::AsRawFd::as_raw_fd(&path_fd)
            )
            .as_str(),
            OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| self.io(rel)(e.into()))?;
        if now.st_nlink > 1 {
            let key = (now.st_dev, now.st_ino);
            if let Some((first, left)) = self.links.get_mut(&key) {
                let first = first.clone();
                *left = left.saturating_sub(1);
                if *left == 0 {
                    // Every link seen: the path need not be kept.
                    self.links.remove(&key);
                    self.link_bytes -= first.as_os_str().len();
                }
                let mut h = header(&now, tar::EntryType::Link);
                h.set_size(0);
                return self
                    .tar
                    .append_link(&mut h, rel, &first)
                    .map_err(self.io(rel));
            }
            self.link_bytes += rel.as_os_str().len();
            if self.link_bytes > MAX_LINK_BYTES {
                return Err(self.hostile(
                    rel,
                    format!("more than {MAX_LINK_BYTES} bytes of paths of hard-linked files"),
                ));
            }
            self.links.insert(key, (rel.to_owned(), now.st_nlink - 1));
        }
        let xattrs = self.xattrs(fd.as_fd(), rel, false)?;
        self.pax(&xattrs.carried, rel)?;
        let size = now.st_size as u64;
        let mut h = header(&now, tar::EntryType::Regular);
        h.set_size(size);
        let mut data = Exact {
            inner: std::fs::File::from(fd),
            left: size,
        };
        self.tar
            .append_data(&mut h, rel, &mut data)
            .map_err(|e| match e.kind() {
                io::ErrorKind::UnexpectedEof => self.changed(rel),
                _ => self.io(rel)(e),
            })?;
        self.step.set_bytes(self.tar.get_ref().written);
        Ok(())
    }

    /// The extended attributes of an open file or directory: those a layer carries, and
    /// whether it is an opaque directory. OverlayFS redirects and metadata-only copies are
    /// refused (the upper directory alone does not hold what they stand for).
    fn xattrs(&self, fd: BorrowedFd<'_>, rel: &Path, is_dir: bool) -> Result<Xattrs, ImageError> {
        let mut out = Xattrs::default();
        let mut list = vec![0u8; 1 << 16];
        let n = match rustix::fs::flistxattr(fd, &mut list[..]) {
            Ok(n) => n,
            Err(rustix::io::Errno::NOTSUP) => return Ok(out),
            Err(e) => return Err(self.io(rel)(e.into())),
        };
        let mut value = vec![0u8; 1 << 16];
        for name in list[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
            let Ok(name) = std::str::from_utf8(name) else {
                continue;
            };
            if name == "trusted.overlay.redirect" || name == "trusted.overlay.metacopy" {
                return Err(self.hostile(
                    rel,
                    format!("it carries {name}: OverlayFS redirects and metadata-only copies cannot be committed"),
                ));
            }
            let wanted = xattr_allowed(name) || (is_dir && name == "trusted.overlay.opaque");
            if !wanted {
                continue;
            }
            let len = match rustix::fs::fgetxattr(fd, name, &mut value[..]) {
                Ok(len) => len,
                // Removed since listed.
                Err(rustix::io::Errno::NODATA) => continue,
                Err(e) => return Err(self.io(rel)(e.into())),
            };
            if name == "trusted.overlay.opaque" {
                out.opaque = &value[..len] == b"y";
            } else {
                out.bytes += name.len() + len;
                // What the unpacker takes in one PAX header.
                if out.bytes as u64 > tar_limits::MAX_SPECIAL {
                    return Err(self.hostile(
                        rel,
                        format!(
                            "more than {} bytes of extended attributes",
                            tar_limits::MAX_SPECIAL
                        ),
                    ));
                }
                out.carried.push((name.to_owned(), value[..len].to_vec()));
            }
        }
        Ok(out)
    }

    /// A PAX extended header carrying `xattrs` for the next entry.
    fn pax(&mut self, xattrs: &[(String, Vec<u8>)], rel: &Path) -> Result<(), ImageError> {
        if xattrs.is_empty() {
            return Ok(());
        }
        let data = pax_records(xattrs);
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::XHeader);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        self.tar
            .append_data(&mut h, "PaxHeaders/entry", &data[..])
            .map_err(self.io(rel))
    }
}

#[derive(Default)]
struct Xattrs {
    carried: Vec<(String, Vec<u8>)>,
    bytes: usize,
    opaque: bool,
}

/// PAX records `LEN SCHILY.xattr.NAME=VALUE\n`, LEN counting the whole record with itself.
fn pax_records(xattrs: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in xattrs {
        let body = 1 + "SCHILY.xattr.".len() + name.len() + 1 + value.len() + 1;
        let mut len = body + 1;
        while len != body + len.to_string().len() {
            len = body + len.to_string().len();
        }
        out.extend_from_slice(format!("{len} SCHILY.xattr.{name}=").as_bytes());
        out.extend_from_slice(value);
        out.push(b'\n');
    }
    out
}

fn is_empty_dir(fd: BorrowedFd<'_>) -> bool {
    let Ok(d) = rustix::fs::Dir::read_from(fd) else {
        return false;
    };
    d.filter_map(Result::ok)
        .all(|e| matches!(e.file_name().to_bytes(), b"." | b".."))
}

/// A tar header of `kind` with the mode, owner and time of `st`.
fn header(st: &Stat, kind: tar::EntryType) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(st.st_mode & 0o7777);
    h.set_uid(st.st_uid as u64);
    h.set_gid(st.st_gid as u64);
    h.set_mtime(st.st_mtime.max(0) as u64);
    h.set_size(0);
    h
}

/// Reads exactly `left` bytes: fewer is `UnexpectedEof` (the file shrank), more are not read.
struct Exact<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let max = buf.len().min(self.left.min(usize::MAX as u64) as usize);
        let n = self.inner.read(&mut buf[..max])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the file shrank while being read",
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests;
