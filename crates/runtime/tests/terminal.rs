//! Terminals without a console socket: a foreground `run` of a container with
//! `process.terminal` and `exec -t` give the process a pseudo-terminal that cela-runc copies to
//! and from its own stdio (as `runc run` does); a detached container with a terminal and no
//! console socket is refused before anything is created. The host side of the terminal is made
//! with util-linux's `script`, as a user's shell would have one. Needs root and cgroups.

mod common;

use std::process::{Command, Output, Stdio};

use common::*;

/// Runs `cela-runc --root ROOT ARGS` under `script`, so its stdin and stdout are a terminal
/// whose size is 30x100; `input` is typed into it.
fn in_terminal(f: &Fixture, args: &str, input: &str) -> Output {
    let cmd = format!(
        "stty rows 30 cols 100; {} --root {} {args}",
        runc_bin(),
        f.root.display()
    );
    let mut child = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("script (bsdutils) is needed: scripts/deps installs it");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn foreground_run_with_terminal_gets_a_pty_of_the_callers_size() {
    let f = Fixture::new("tty-run");
    let id = f.id("c");
    let b = f.bundle(&id, false, &["sh"], |v| {
        v["process"]["terminal"] = true.into()
    });
    let out = in_terminal(
        &f,
        &format!("run --bundle {} {id}", b.display()),
        "tty; stty size; exit 6\n",
    );
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(6), "run: {text}{}", stderr(&out));
    assert!(
        text.contains("/dev/pts/0"),
        "no terminal in the container: {text}"
    );
    assert!(
        text.contains("30 100"),
        "the terminal size was not passed on: {text}"
    );
    f.assert_nothing_left(&id, None);
    assert!(
        !std::fs::read_dir(&f.root)
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with(".console")),
        "console socket left in the state root"
    );
}

#[test]
fn exec_t_gets_a_pty_and_its_exit_code() {
    let f = Fixture::new("tty-exec");
    let id = f.id("c");
    let b = f.bundle(&id, false, &["sleep", "1000"], |_| {});
    let pid = f.start_detached(&id, &b);
    let out = in_terminal(&f, &format!("exec -t {id} sh -c 'tty; exit 7'"), "");
    let text = stdout(&out);
    assert_eq!(
        out.status.code(),
        Some(7),
        "exec -t: {text}{}",
        stderr(&out)
    );
    assert!(
        text.contains("/dev/pts/"),
        "no terminal for exec -t: {text}"
    );

    let out = f.runc(&["exec", "-t", "-d", &id, "true"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("--console-socket"),
        "{}",
        stderr(&out)
    );
    f.ok(&["delete", "--force", &id]);
    f.assert_nothing_left(&id, Some(pid));
}

#[test]
fn detached_terminal_without_console_socket_is_refused_and_leaves_nothing() {
    let f = Fixture::new("tty-det");
    let id = f.id("c");
    let b = f.bundle(&id, false, &["sh"], |v| {
        v["process"]["terminal"] = true.into()
    });
    for args in [
        vec!["create", "--bundle", b.to_str().unwrap(), &id],
        vec!["run", "-d", "--bundle", b.to_str().unwrap(), &id],
    ] {
        let out = f.runc(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(
            stderr(&out).contains("no --console-socket"),
            "{args:?}: {}",
            stderr(&out)
        );
        f.assert_nothing_left(&id, None);
    }
}
