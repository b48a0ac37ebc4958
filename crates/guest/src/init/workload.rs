//! The workload: the command the host asked for, or an interactive shell.
//!
//! This module decides what to run and starts it: the environment it gets, where its program
//! is found on `PATH`, its standard streams, and the status a shell would report for it
//! (`127` not found, `126` found but not runnable, `128 + n` killed by signal `n`). Waiting for
//! it is [`super::supervise`]'s job.

use std::fmt;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::sys::wait::WaitStatus;
use nix::unistd::{AccessFlags, Pid, access};

/// `PATH` for the workload, as Debian's default for root.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// The interactive shell (busybox's ash in a cela initramfs).
pub const SHELL: &str = "/bin/sh";
/// The interactive shell's prompt: the working directory, then `#`.
pub const SHELL_PROMPT: &str = "\\w # ";

/// Splits a `KEY=VALUE` entry; `None` when there is no `=` or the key is empty.
pub fn split_env_entry(entry: &str) -> Option<(&str, &str)> {
    entry.split_once('=').filter(|(key, _)| !key.is_empty())
}

/// The workload's whole environment: cela's defaults, then the host's `KEY=VALUE` entries,
/// which override a default of the same name. Malformed entries are skipped (see
/// [`split_env_entry`]).
pub fn build_env(request_env: &[String], interactive: bool) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> =
        [("PATH", DEFAULT_PATH), ("HOME", "/root"), ("TERM", "linux")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
    if interactive {
        env.push(("PS1".to_owned(), SHELL_PROMPT.to_owned()));
    }
    for (key, value) in request_env.iter().filter_map(|e| split_env_entry(e)) {
        match env.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value.to_owned(),
            None => env.push((key.to_owned(), value.to_owned())),
        }
    }
    env
}

/// Where a program name led.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// An executable regular file.
    Found(PathBuf),
    /// Something by that name exists but cannot be executed (no execute permission, or a
    /// directory named explicitly).
    NotExecutable(PathBuf),
    NotFound,
}

fn classify(path: &Path) -> Option<Lookup> {
    let meta = std::fs::metadata(path).ok()?;
    if meta.is_file() && access(path, AccessFlags::X_OK).is_ok() {
        Some(Lookup::Found(path.to_owned()))
    } else {
        Some(Lookup::NotExecutable(path.to_owned()))
    }
}

/// Finds `program` as a shell would: a name containing `/` is used as is; otherwise each
/// directory of `path_var` is tried in order (an empty entry means the current directory) and
/// the first executable regular file wins. A non-executable file found on the way is reported
/// only if no executable one is found.
pub fn lookup(program: &str, path_var: &str) -> Lookup {
    if program.is_empty() {
        return Lookup::NotFound;
    }
    if program.contains('/') {
        return classify(Path::new(program)).unwrap_or(Lookup::NotFound);
    }
    let mut not_executable = None;
    for dir in path_var.split(':') {
        let candidate = Path::new(if dir.is_empty() { "." } else { dir }).join(program);
        match std::fs::metadata(&candidate) {
            Ok(meta) if meta.is_file() => match classify(&candidate) {
                Some(Lookup::Found(found)) => return Lookup::Found(found),
                Some(Lookup::NotExecutable(p)) if not_executable.is_none() => {
                    not_executable = Some(p)
                }
                _ => {}
            },
            _ => {}
        }
    }
    not_executable.map_or(Lookup::NotFound, Lookup::NotExecutable)
}

/// Why the workload could not be started.
#[derive(Debug)]
pub enum SpawnError {
    /// No such program on `PATH` (status 127).
    NotFound(String),
    /// The program exists but is not executable (status 126).
    NotExecutable(PathBuf),
    /// `execve` failed (status 126): not a valid executable, missing interpreter…
    Exec { program: PathBuf, error: io::Error },
    /// The working directory could not be made (status 126).
    Workdir { dir: PathBuf, error: io::Error },
}

impl SpawnError {
    /// The status a shell reports for this failure.
    pub fn status(&self) -> u8 {
        match self {
            SpawnError::NotFound(_) => 127,
            SpawnError::NotExecutable(_) | SpawnError::Exec { .. } | SpawnError::Workdir { .. } => {
                126
            }
        }
    }
}

impl fmt::Display for SpawnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SpawnError::NotFound(program) => write!(f, "{program}: command not found"),
            SpawnError::NotExecutable(path) => write!(f, "{}: Permission denied", path.display()),
            SpawnError::Exec { program, error } => write!(f, "{}: {error}", program.display()),
            SpawnError::Workdir { dir, error } => {
                write!(f, "working directory {}: {error}", dir.display())
            }
        }
    }
}

/// The workload's standard streams.
#[derive(Debug)]
pub struct ChildIo {
    /// Standard input; `None` is `/dev/null`.
    pub stdin: Option<OwnedFd>,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// Whether the workload gets a session of its own with its standard input as controlling
/// terminal (an interactive shell, so that job control and Ctrl-C work).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Session {
    Inherit,
    ControllingTerminal,
}

/// Who the workload runs as and where: the image's `USER` and `WORKDIR`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
    pub workdir: PathBuf,
}

impl Default for RunAs {
    /// Root, in `/`.
    fn default() -> Self {
        RunAs {
            uid: 0,
            gid: 0,
            workdir: PathBuf::from("/"),
        }
    }
}

impl RunAs {
    /// Resolves the request's `user` in the current root (its `/etc/passwd` and `/etc/group`)
    /// and takes its `workdir`; sets `HOME` in `env` to the user's home unless the request
    /// gave one.
    pub fn resolve(
        user: Option<&str>,
        workdir: Option<&str>,
        env: &mut [(String, String)],
        request_env: &[String],
    ) -> Result<RunAs, String> {
        let mut run_as = RunAs::default();
        if let Some(user) = user {
            let id = cela_guest::users::resolve(Path::new("/"), user)?;
            run_as.uid = id.uid;
            run_as.gid = id.gid;
            let home_asked = request_env.iter().any(|e| e.starts_with("HOME="));
            if let (Some(home), false) = (id.home, home_asked)
                && let Some(slot) = env.iter_mut().find(|(k, _)| k == "HOME")
            {
                slot.1 = home;
            }
        }
        if let Some(dir) = workdir {
            run_as.workdir = PathBuf::from(dir);
        }
        Ok(run_as)
    }
}

/// Starts `argv` with exactly the environment `env`, resolving `argv[0]` on the `PATH` in
/// `env`, as `run_as`'s user in its working directory (created if missing, as Docker does).
/// The child starts with an empty signal mask (cleared before exec) and default dispositions,
/// whatever init blocks. Returns its pid; the caller reaps it.
pub fn spawn(
    argv: &[String],
    env: &[(String, String)],
    io: ChildIo,
    session: Session,
    run_as: &RunAs,
) -> Result<Pid, SpawnError> {
    let Some(program) = argv.first() else {
        return Err(SpawnError::NotFound(String::new()));
    };
    let path_var = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map_or(DEFAULT_PATH, |(_, v)| v.as_str());
    let resolved = match lookup(program, path_var) {
        Lookup::Found(path) => path,
        Lookup::NotExecutable(path) => return Err(SpawnError::NotExecutable(path)),
        Lookup::NotFound => return Err(SpawnError::NotFound(program.clone())),
    };
    if !run_as.workdir.is_dir()
        && let Err(error) = std::fs::create_dir_all(&run_as.workdir)
    {
        return Err(SpawnError::Workdir {
            dir: run_as.workdir.clone(),
            error,
        });
    }
    let mut command = Command::new(&resolved);
    command
        .arg0(program)
        .args(&argv[1..])
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(&run_as.workdir)
        .stdin(io.stdin.map_or_else(Stdio::null, Stdio::from))
        .stdout(Stdio::from(io.stdout))
        .stderr(Stdio::from(io.stderr));
    // std does not always clear the signal mask (seen in the guest: the workload inherited
    // init's blocked SIGCHLD, SIGTERM, SIGUSR1/2, and busybox sh's `wait` then never
    // returned), so clear it here.
    // SAFETY: the closure runs in the forked child before exec and only calls sigemptyset
    // and sigprocmask (async-signal-safe) on a set on its own stack.
    unsafe {
        command.pre_exec(|| {
            let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
            libc::sigemptyset(set.as_mut_ptr());
            if libc::sigprocmask(libc::SIG_SETMASK, set.as_ptr(), std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    if (run_as.uid, run_as.gid) != (0, 0) {
        // std sets the group, drops the supplementary groups and then sets the user in the
        // child (the order that leaves no way back to root).
        command.uid(run_as.uid).gid(run_as.gid);
    }
    if session == Session::ControllingTerminal {
        // SAFETY: the closure runs in the forked child before exec and only makes two
        // async-signal-safe system calls (setsid, ioctl), touching no memory of the parent.
        unsafe {
            command.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::ioctl(libc::STDIN_FILENO, libc::TIOCSCTTY, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    match command.spawn() {
        // The std handle is dropped without waiting: init reaps every child itself.
        Ok(child) => Ok(Pid::from_raw(child.id() as i32)),
        Err(error) => Err(SpawnError::Exec {
            program: resolved,
            error,
        }),
    }
}

/// The status a shell reports for a child that ended: its exit code, or 128 + the number of
/// the signal that killed it. `None` for a child that only stopped or continued.
pub fn exit_status(status: WaitStatus) -> Option<u8> {
    match status {
        WaitStatus::Exited(_, code) => Some(code as u8),
        WaitStatus::Signaled(_, signal, _) => Some(128u8.wrapping_add(signal as u8)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::Signal;
    use std::fs;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn env_defaults_are_overridden_by_the_request() {
        let env = build_env(
            &[
                "TERM=xterm".into(),
                "A=1=2".into(),
                "junk".into(),
                "=x".into(),
            ],
            false,
        );
        let get = |key: &str| env.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
        assert_eq!(get("PATH"), Some(DEFAULT_PATH));
        assert_eq!(get("HOME"), Some("/root"));
        assert_eq!(get("TERM"), Some("xterm"));
        assert_eq!(get("A"), Some("1=2"));
        assert_eq!(get("PS1"), None);
        assert_eq!(env.len(), 4);
        assert!(build_env(&[], true).iter().any(|(k, _)| k == "PS1"));
    }

    #[test]
    fn statuses_follow_the_shell() {
        let pid = Pid::from_raw(42);
        assert_eq!(exit_status(WaitStatus::Exited(pid, 7)), Some(7));
        assert_eq!(
            exit_status(WaitStatus::Signaled(pid, Signal::SIGKILL, false)),
            Some(137)
        );
        assert_eq!(
            exit_status(WaitStatus::Signaled(pid, Signal::SIGSEGV, true)),
            Some(139)
        );
        assert_eq!(exit_status(WaitStatus::Stopped(pid, Signal::SIGSTOP)), None);
        assert_eq!(SpawnError::NotFound("x".into()).status(), 127);
        assert_eq!(SpawnError::NotExecutable("x".into()).status(), 126);
    }

    fn write_file(path: &Path, text: &str, mode: u32) {
        fs::write(path, text).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn lookup_walks_path_like_a_shell() {
        let dir = crate::init::TestDir::new();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        fs::create_dir_all(&a).unwrap();
        fs::create_dir_all(&b).unwrap();
        write_file(&a.join("tool"), "", 0o644);
        write_file(&b.join("tool"), "", 0o755);
        write_file(&a.join("plain"), "", 0o644);
        fs::create_dir(b.join("dir")).unwrap();
        let path = format!("{}:{}", a.display(), b.display());

        assert_eq!(lookup("tool", &path), Lookup::Found(b.join("tool")));
        assert_eq!(
            lookup("plain", &path),
            Lookup::NotExecutable(a.join("plain"))
        );
        assert_eq!(lookup("dir", &path), Lookup::NotFound);
        assert_eq!(lookup("missing", &path), Lookup::NotFound);
        assert_eq!(lookup("", &path), Lookup::NotFound);
        let explicit = b.join("tool");
        assert_eq!(
            lookup(explicit.to_str().unwrap(), ""),
            Lookup::Found(explicit.clone())
        );
        let explicit_dir = b.join("dir");
        assert_eq!(
            lookup(explicit_dir.to_str().unwrap(), ""),
            Lookup::NotExecutable(explicit_dir)
        );
        assert_eq!(lookup("/nonexistent/tool", &path), Lookup::NotFound);
    }
}
