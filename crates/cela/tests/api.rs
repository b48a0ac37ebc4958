//! `cela serve` driven by real clients: the Docker 28 CLI of these machines (API 1.50) and
//! Debian's docker.io 20.10 client (API 1.41), both with no dockerd anywhere, and curl for
//! cela's own API and the error answers. Instances made through the API are the CLI's
//! instances and the other way round; a killed server loses none; concurrent runs leave
//! nothing behind. As root.

mod images;
mod world;

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use world::World;

/// The Docker 28 CLI these machines come with, and Debian's docker.io client.
const DOCKER_28: &str = "/usr/local/bin/docker";
const DOCKER_20: &str = "/usr/bin/docker";

fn client(path: &str) -> &str {
    assert!(
        Path::new(path).is_file(),
        "{path} is missing: the Docker 28 CLI comes with the machine image, the 20.10 client with Debian's docker.io (scripts/deps)"
    );
    path
}

/// A running `cela serve` on sockets of its own, killed when dropped.
struct Server {
    child: Child,
    dir: tempfile::TempDir,
}

impl Server {
    fn start(w: &World) -> Server {
        let dir = tempfile::Builder::new()
            .prefix("cela-api-")
            .tempdir()
            .unwrap();
        let mut s = Server {
            child: Command::new(env!("CARGO_BIN_EXE_cela"))
                .arg("--data-dir")
                .arg(w.data())
                .arg("serve")
                .arg("--socket")
                .arg(dir.path().join("api.sock"))
                .arg("--docker-socket")
                .arg(dir.path().join("docker.sock"))
                .stdin(Stdio::null())
                .spawn()
                .unwrap(),
            dir,
        };
        s.wait_listening();
        s
    }

    /// Starts another server on the same sockets (after this one was killed).
    fn restart(&mut self, w: &World) {
        self.child = Command::new(env!("CARGO_BIN_EXE_cela"))
            .arg("--data-dir")
            .arg(w.data())
            .arg("serve")
            .arg("--socket")
            .arg(self.api())
            .arg("--docker-socket")
            .arg(self.docker_sock())
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        self.wait_listening();
    }

    fn wait_listening(&mut self) {
        let start = Instant::now();
        while UnixStream::connect(self.docker_sock()).is_err() {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("cela serve ended before it listened: {status}");
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "cela serve did not listen within 20 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn api(&self) -> PathBuf {
        self.dir.path().join("api.sock")
    }

    fn docker_sock(&self) -> PathBuf {
        self.dir.path().join("docker.sock")
    }

    /// `docker ARGS` with `bin` against this server, bounded to 2 minutes.
    fn docker_cmd(&self, bin: &str, args: &[&str]) -> Command {
        let mut c = Command::new("timeout");
        c.arg("120")
            .arg(client(bin))
            .args(args)
            .env(
                "DOCKER_HOST",
                format!("unix://{}", self.docker_sock().display()),
            )
            .env("DOCKER_CONFIG", self.dir.path().join("docker-config"));
        c
    }

    /// `docker ARGS` with `bin`, stdin /dev/null.
    fn docker(&self, bin: &str, args: &[&str]) -> Output {
        self.docker_cmd(bin, args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// `docker ARGS` with `input` on its stdin (closed after it).
    fn docker_with_input(&self, bin: &str, args: &[&str], input: &[u8]) -> Output {
        let mut child = self
            .docker_cmd(bin, args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), input).unwrap();
        child.wait_with_output().unwrap()
    }

    fn docker_ok(&self, bin: &str, args: &[&str]) -> String {
        let out = self.docker(bin, args);
        assert!(
            out.status.success(),
            "{bin} {args:?}: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    /// An HTTP request with curl over the API socket: status and body.
    fn http(&self, method: &str, path: &str, body: Option<&[u8]>) -> (u16, String) {
        let body_file = self.dir.path().join("body");
        let mut cmd = Command::new("curl");
        cmd.args(["-s", "--max-time", "60", "-o"])
            .arg(self.dir.path().join("answer"))
            .args(["-w", "%{http_code}", "-X", method, "--unix-socket"])
            .arg(self.api())
            .arg(format!("http://cela{path}"));
        if let Some(b) = body {
            std::fs::write(&body_file, b).unwrap();
            cmd.args(["-H", "Content-Type: application/json", "--data-binary"])
                .arg(format!("@{}", body_file.display()));
        }
        let out = cmd.output().expect("curl (scripts/deps)");
        let status = text(&out.stdout).parse().unwrap_or_else(|_| {
            panic!("curl {method} {path}: {}", text(&out.stderr));
        });
        let answer = std::fs::read(self.dir.path().join("answer")).unwrap_or_default();
        (status, text(&answer))
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Waits (bounded) until `f` holds.
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < Duration::from_secs(60), "never: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn both_docker_clients_run_containers_through_cela_serve() {
    let w = World::new();
    let s = Server::start(&w);
    for (bin, client_api) in [(DOCKER_28, "1.50"), (DOCKER_20, "1.41")] {
        let v = s.docker_ok(
            bin,
            &[
                "version",
                "--format",
                "{{.Client.APIVersion}} {{.Server.APIVersion}}",
            ],
        );
        assert_eq!(v.trim(), format!("{client_api} 1.50"), "{bin}");

        // Foreground, output streams apart, the exit status passed on; --rm leaves nothing.
        let out = s.docker(
            bin,
            &[
                "run",
                "--rm",
                "testimg",
                "sh",
                "-c",
                "echo out; echo err >&2; exit 7",
            ],
        );
        assert_eq!(out.status.code(), Some(7), "{bin}: {}", text(&out.stderr));
        assert_eq!(text(&out.stdout), "out\n", "{bin}");
        assert!(text(&out.stderr).contains("err\n"), "{bin}");
        assert_eq!(s.docker_ok(bin, &["ps", "-aq"]), "", "{bin}: --rm left it");

        // Detached: listed (by label too), its logs, inspected, stopped, removed.
        let id = s.docker_ok(
            bin,
            &[
                "run",
                "-d",
                "--name",
                "web",
                "-l",
                "team=blue",
                "testimg",
                "sh",
                "-c",
                "echo started; echo warn >&2; exec sleep 60",
            ],
        );
        let id = id.trim().to_owned();
        let listed = s.docker_ok(
            bin,
            &[
                "ps",
                "--filter",
                "label=team=blue",
                "--format",
                "{{.Names}}",
            ],
        );
        assert_eq!(listed.trim(), "web", "{bin}");
        eventually("the output is logged", || {
            s.docker(bin, &["logs", "web"]).stdout == b"started\n"
        });
        let logs = s.docker(bin, &["logs", "web"]);
        assert_eq!(text(&logs.stderr), "warn\n", "{bin}: stderr apart");
        // `--tail` counts the lines of both streams: the last is stderr's.
        let stamped = s.docker_ok(bin, &["logs", "-t", "--tail", "2", "web"]);
        assert!(
            stamped.starts_with("20") && stamped.ends_with(" started\n"),
            "{bin}: {stamped:?}"
        );
        let state = s.docker_ok(bin, &["inspect", "-f", "{{.State.Status}}", "web"]);
        assert_eq!(state.trim(), "running", "{bin}");
        // exec: output, exit status, stdin through a half-close, the environment and user.
        let out = s.docker(
            bin,
            &[
                "exec",
                "web",
                "sh",
                "-c",
                "echo in-exec; echo e >&2; exit 3",
            ],
        );
        assert_eq!(out.status.code(), Some(3), "{bin}: {}", text(&out.stderr));
        assert_eq!(text(&out.stdout), "in-exec\n", "{bin}");
        assert_eq!(text(&out.stderr), "e\n", "{bin}");
        let mut child = Command::new("timeout")
            .arg("60")
            .arg(bin)
            .args([
                "exec",
                "-i",
                "-e",
                "K=v",
                "-u",
                "www",
                "web",
                "sh",
                "-c",
                "cat; echo $K $(id -u)",
            ])
            .env(
                "DOCKER_HOST",
                format!("unix://{}", s.docker_sock().display()),
            )
            .env("DOCKER_CONFIG", s.dir.path().join("docker-config"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), b"piped\n").unwrap();
        let out = child.wait_with_output().unwrap();
        assert_eq!(text(&out.stdout), "piped\nv 33\n", "{bin}");

        // The CLI sees the API's instance.
        let ps: Value = serde_json::from_str(&w.ok(&["ps", "--format", "json"])).unwrap();
        assert_eq!(ps[0]["name"], "web", "{bin}");
        assert_eq!(ps[0]["labels"]["team"], "blue", "{bin}");
        let pid = ps[0]["pid"].as_i64().unwrap();
        s.docker_ok(bin, &["stop", "-t", "1", "web"]);
        let state = s.docker_ok(
            bin,
            &[
                "inspect",
                "-f",
                "{{.State.Status}} {{.State.ExitCode}}",
                "web",
            ],
        );
        assert_eq!(state.trim(), "exited 137", "{bin}");
        s.docker_ok(bin, &["rm", "web"]);
        w.assert_gone(&id, &[pid]);

        // kill and wait (SIGKILL: a container's init ignores signals it has no handler for).
        let id = s.docker_ok(bin, &["run", "-d", "testimg", "sleep", "60"]);
        let id = id.trim();
        s.docker_ok(bin, &["kill", id]);
        assert_eq!(s.docker_ok(bin, &["wait", id]).trim(), "137", "{bin}");
        s.docker_ok(bin, &["rm", id]);

        // The API's view of what the CLI started.
        w.ok(&["run", "-d", "--name", "from-cli", "testimg", "sleep", "60"]);
        let names = s.docker_ok(bin, &["ps", "--format", "{{.Names}} {{.State}}"]);
        assert_eq!(names.trim(), "from-cli running", "{bin}");
        s.docker_ok(bin, &["rm", "-f", "from-cli"]);
        assert_eq!(w.ok(&["ps", "-a", "--format", "json"]).trim(), "[]");

        let images = s.docker_ok(bin, &["images", "--format", "{{.Repository}}:{{.Tag}}"]);
        assert!(images.contains("testimg:latest"), "{bin}: {images}");
    }
}

#[test]
fn dockers_python_sdk_drives_cela_serve() {
    let w = World::new();
    let s = Server::start(&w);
    assert!(
        Path::new("/usr/bin/python3").is_file(),
        "/usr/bin/python3 is missing (scripts/deps installs python3-docker)"
    );
    let out = Command::new("timeout")
        .args(["120", "/usr/bin/python3"])
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/workload/docker_sdk.py"
        ))
        .arg(s.docker_sock())
        .arg("testimg:latest")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the SDK script failed:\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert_eq!(
        text(&out.stdout),
        "version 1.50\nrun ok\nlifecycle ok\nimages and errors ok\n"
    );
}

#[test]
fn docker_run_with_the_vm_runtime_boots_the_image_as_a_microvm() {
    let w = World::new();
    let s = Server::start(&w);
    // The QEMU fallback on this host (its /dev/kvm cannot boot Linux); the same instance
    // code runs the KVM engine in the nested lab.
    let out = s.docker(
        DOCKER_28,
        &[
            "run",
            "--runtime",
            "vm",
            "--rm",
            "testimg",
            "sh",
            "-c",
            "cat /etc/greeting; exit 4",
        ],
    );
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "the-test-image\n");
    assert_eq!(s.docker_ok(DOCKER_28, &["ps", "-aq"]), "");
}

#[test]
fn the_apis_answer_errors_with_their_status_codes() {
    let w = World::new();
    let s = Server::start(&w);
    let (code, body) = s.http("GET", "/cela/v1/instances", None);
    assert_eq!((code, body.trim()), (200, "[]"));
    let (code, body) = s.http("POST", "/cela/v1/instances", Some(b"{not json"));
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("malformed instance request"), "{body}");
    let (code, body) = s.http(
        "POST",
        "/cela/v1/instances",
        Some(br#"{"image": "testimg", "privileged": true}"#),
    );
    assert_eq!(code, 400, "unknown fields are refused: {body}");
    assert!(body.contains("privileged"), "{body}");
    let big = vec![b' '; 2 << 20];
    let (code, _) = s.http("POST", "/cela/v1/instances", Some(&big));
    assert_eq!(code, 413);
    let (code, body) = s.http("GET", "/cela/v1/instances/nosuch", None);
    assert_eq!(code, 404, "{body}");
    let (code, body) = s.http(
        "POST",
        "/cela/v1/instances",
        Some(br#"{"image": "no-such-image"}"#),
    );
    assert_eq!(code, 404, "{body}");

    // Made, listed as the CLI lists it, in conflict by name and state, removed.
    let req = br#"{"image": "testimg", "command": ["sleep", "60"], "name": "api-one", "labels": {"a": "b"}}"#;
    let (code, body) = s.http("POST", "/cela/v1/instances", Some(req));
    assert_eq!(code, 201, "{body}");
    let made: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(made["status"], "running", "{body}");
    let id = made["id"].as_str().unwrap().to_owned();
    let cli: Value = serde_json::from_str(&w.ok(&["ps", "--format", "json"])).unwrap();
    let (_, listed) = s.http("GET", "/cela/v1/instances", None);
    let listed: Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed, cli, "the API lists what the CLI lists");
    let (code, body) = s.http("POST", "/cela/v1/instances", Some(req));
    assert_eq!(code, 409, "{body}");
    let (code, body) = s.http("DELETE", "/cela/v1/instances/api-one", None);
    assert_eq!(code, 409, "a running instance needs force: {body}");
    let pid = made["pid"].as_i64().unwrap();
    let (code, body) = s.http("DELETE", "/cela/v1/instances/api-one?force=true", None);
    assert_eq!(code, 204, "{body}");
    w.assert_gone(&id, &[pid]);

    // The Docker side: versions, unknown images and containers, what is not implemented.
    let (code, body) = s.http("GET", "/v1.99/info", None);
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("too new"), "{body}");
    let (code, body) = s.http(
        "POST",
        "/v1.50/containers/create",
        Some(br#"{"Image": "no-such-image"}"#),
    );
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("No such image: no-such-image"), "{body}");
    let (code, body) = s.http("POST", "/v1.50/containers/create", Some(br#"{"Image": 5}"#));
    assert_eq!(code, 400, "{body}");
    let (code, body) = s.http(
        "POST",
        "/v1.50/containers/create",
        Some(br#"{"Image": "testimg", "HostConfig": {"Privileged": true}}"#),
    );
    assert_eq!(code, 501, "{body}");
    let (code, body) = s.http("POST", "/v1.50/exec/abc/start", Some(b"{}"));
    assert_eq!(code, 404, "{body}");
    // Not implemented, on a path with other methods (GET and DELETE /images/...) and on none.
    let (code, body) = s.http("POST", "/v1.50/images/load", Some(b""));
    assert_eq!(code, 501, "{body}");
    assert!(body.contains("POST /images/load"), "{body}");
    let (code, body) = s.http("GET", "/v1.50/events", None);
    assert_eq!(code, 501, "{body}");
    // axum's own refusals carry the JSON shape too.
    let (code, body) = s.http("GET", "/v1.50/containers/json?limit=x", None);
    assert_eq!(code, 400, "{body}");
    assert!(body.starts_with("{\"message\":"), "{body}");
    let (code, body) = s.http("GET", "/v1.41/containers/nosuch/json", None);
    assert_eq!(code, 404, "{body}");
    assert_eq!(w.ok(&["ps", "-a", "--format", "json"]).trim(), "[]");
}

#[test]
fn execs_and_restarts_end_and_take_input_where_others_break() {
    let w = World::new();
    let s = Server::start(&w);
    let bin = DOCKER_28;
    s.docker_ok(
        bin,
        &["run", "-d", "--name", "box", "testimg", "sleep", "600"],
    );
    // A process the exec leaves in the background holds its stdout: the exec is over when
    // its own process exits all the same (timeout's 124 after 120 s otherwise).
    let out = s.docker(
        bin,
        &["exec", "box", "sh", "-c", "sleep 600 & echo left; exit 4"],
    );
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "left\n");
    // Values that begin with a dash stay values.
    let out = s.docker_ok(
        bin,
        &["exec", "-e", "OPT=--help", "box", "sh", "-c", "echo $OPT"],
    );
    assert_eq!(out, "--help\n");

    // An exec started without Upgrade streams its output in the body (as dockerd does), and
    // it starts once.
    let (code, body) = s.http(
        "POST",
        "/v1.50/containers/box/exec",
        Some(br#"{"Cmd": ["echo", "plain"], "AttachStdout": true}"#),
    );
    assert_eq!(code, 201, "{body}");
    let exec: Value = serde_json::from_str(&body).unwrap();
    let start = format!("/v1.50/exec/{}/start", exec["Id"].as_str().unwrap());
    let (code, body) = s.http("POST", &start, Some(b"{}"));
    assert_eq!(code, 200, "{body}");
    assert_eq!(body, "\u{1}\0\0\0\0\0\0\u{6}plain\n", "one stdout frame");
    let (code, body) = s.http("POST", &start, Some(b"{}"));
    assert_eq!(code, 409, "{body}");
    // Stdin needs the hijacked connection.
    let (_, body) = s.http(
        "POST",
        "/v1.50/containers/box/exec",
        Some(br#"{"Cmd": ["cat"], "AttachStdin": true}"#),
    );
    let exec: Value = serde_json::from_str(&body).unwrap();
    let start = format!("/v1.50/exec/{}/start", exec["Id"].as_str().unwrap());
    let (code, body) = s.http("POST", &start, Some(b"{}"));
    assert_eq!(code, 400, "{body}");
    s.docker_ok(bin, &["rm", "-f", "box"]);

    // `docker start -ai` attaches to an exited container before it starts it: its input
    // reaches the next run.
    let out = s.docker_with_input(
        bin,
        &["run", "-i", "--name", "again", "testimg", "cat"],
        b"one\n",
    );
    assert_eq!(text(&out.stdout), "one\n", "{}", text(&out.stderr));
    let out = s.docker_with_input(bin, &["start", "-ai", "again"], b"two\n");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "two\n");
    s.docker_ok(bin, &["rm", "again"]);
    assert_eq!(w.ok(&["ps", "-a", "--format", "json"]).trim(), "[]");
}

#[test]
fn a_killed_server_loses_no_instance() {
    let w = World::new();
    let mut s = Server::start(&w);
    let id = s.docker_ok(
        DOCKER_28,
        &["run", "-d", "--name", "keeps", "testimg", "sleep", "60"],
    );
    s.kill();
    // The instance runs on under its supervisor; a new server (over the stale sockets)
    // finds it.
    assert_eq!(w.status("keeps"), "running");
    s.restart(&w);
    let listed = s.docker_ok(DOCKER_28, &["ps", "--format", "{{.ID}} {{.State}}"]);
    assert_eq!(listed.trim(), format!("{} running", id.trim()));
    s.docker_ok(DOCKER_28, &["rm", "-f", "keeps"]);
}

#[test]
fn fifty_concurrent_docker_runs_leave_nothing_behind() {
    let w = World::new();
    let s = Server::start(&w);
    let codes: Vec<(Option<i32>, String)> = std::thread::scope(|scope| {
        let runs: Vec<_> = (0..50)
            .map(|i| {
                let s = &s;
                scope.spawn(move || {
                    let out = s.docker(
                        DOCKER_28,
                        &[
                            "run",
                            "--rm",
                            "testimg",
                            "sh",
                            "-c",
                            &format!("echo {i}; exit {}", i % 3),
                        ],
                    );
                    (
                        out.status.code(),
                        format!("{}{}", text(&out.stdout), text(&out.stderr)),
                    )
                })
            })
            .collect();
        runs.into_iter().map(|r| r.join().unwrap()).collect()
    });
    for (i, (code, out)) in codes.iter().enumerate() {
        assert_eq!(*code, Some(i as i32 % 3), "run {i}: {out}");
        assert_eq!(out, &format!("{i}\n"), "run {i}");
    }
    assert_eq!(s.docker_ok(DOCKER_28, &["ps", "-aq"]), "");
    let instances = w.data().join("instances");
    let left: Vec<_> = std::fs::read_dir(&instances)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name() != ".lock")
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "left in {}: {left:?}", instances.display());
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(&w.data().display().to_string()),
        "mounts left:\n{mounts}"
    );
}
