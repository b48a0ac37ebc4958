//! Fixtures of the image tests: images built in Rust from busybox-static (layer tars, configs,
//! manifests), written as OCI layouts or `docker save` archives, a private registry from
//! Debian's `docker-registry` on a free loopback port, and `skopeo` to push to it.

#![allow(dead_code)]

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use cela_image::Digest;

/// The suite's instances get no network unless a test asks for one (`--net`): the default,
/// the NAT'd network `bridge`, is tested on its own (networks.rs, api.rs), and would otherwise
/// give each of the hundreds of instances the suite runs a link it does not need.
pub const DEFAULT_NETWORK: (&str, &str) = ("CELA_DEFAULT_NETWORK", "none");

/// Runs `cela` with its own data dir; stdin is /dev/null.
pub fn cela_in(data: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cela"))
        .args(args)
        .env("CELA_DATA_DIR", data)
        .env(DEFAULT_NETWORK.0, DEFAULT_NETWORK.1)
        .stdin(Stdio::null())
        .output()
        .expect("cela runs")
}

/// Runs `cela` with extra environment variables.
pub fn cela_env(data: &Path, env: &[(&str, &Path)], args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cela"));
    cmd.args(args)
        .env("CELA_DATA_DIR", data)
        .env(DEFAULT_NETWORK.0, DEFAULT_NETWORK.1)
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("cela runs")
}

/// Runs `cela` and insists on success; returns stdout.
pub fn cela_ok(data: &Path, args: &[&str]) -> String {
    let out = cela_in(data, args);
    assert!(
        out.status.success(),
        "cela {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `cela`, expecting status 125 and one `cela: error:` line containing `needle`.
pub fn cela_err(data: &Path, args: &[&str], needle: &str) -> String {
    let out = cela_in(data, args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(125), "cela {args:?}: stderr: {err}");
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("cela: error: "))
        .collect();
    assert_eq!(lines.len(), 1, "one error line: {err}");
    assert!(
        lines[0].contains(needle),
        "cela {args:?}: expected {needle:?} in: {err}"
    );
    err
}

/// The image records `cela image ls --format json` prints.
pub fn ls_json(data: &Path) -> Vec<serde_json::Value> {
    let out = cela_ok(data, &["image", "ls", "--format", "json"]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("image ls JSON: {e}: {out}"))
}

/// Names of the blobs in a store.
pub fn stored_blobs(data: &Path) -> Vec<String> {
    let dir = data.join("images/blobs/sha256");
    let mut v: Vec<String> = match fs::read_dir(&dir) {
        Ok(rd) => rd
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

/// Bytes of the blobs in a store.
pub fn stored_bytes(data: &Path) -> u64 {
    stored_blobs(data)
        .iter()
        .map(|b| {
            fs::metadata(data.join("images/blobs/sha256").join(b))
                .unwrap()
                .len()
        })
        .sum()
}

/// Entries left in a store's tmp/ (partial blobs).
pub fn tmp_entries(data: &Path) -> usize {
    fs::read_dir(data.join("images/tmp"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// A layer: its uncompressed tar (whose digest is the diff_id) and its gzip blob.
#[derive(Clone)]
pub struct Layer {
    pub tar: Vec<u8>,
    pub gz: Vec<u8>,
}

impl Layer {
    /// The layer of this uncompressed tar, gzipped.
    pub fn gzipped(tar: Vec<u8>) -> Layer {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        Layer {
            tar,
            gz: gz.finish().unwrap(),
        }
    }

    pub fn diff_id(&self) -> Digest {
        Digest::of(&self.tar)
    }
    pub fn digest(&self) -> Digest {
        Digest::of(&self.gz)
    }
}

fn header(path: &str, kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_path(path).unwrap();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(1_700_000_000);
    h.set_uid(0);
    h.set_gid(0);
    h
}

/// What goes into a test layer.
pub enum Entry<'a> {
    Dir(&'a str),
    File(&'a str, &'a [u8]),
    Symlink(&'a str, &'a str),
}

/// A layer from entries (deterministic: the same entries give the same digests).
pub fn layer(entries: &[Entry]) -> Layer {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        match e {
            Entry::Dir(p) => {
                let mut h = header(p, tar::EntryType::Directory, 0o755, 0);
                b.append_data(&mut h, p, &[][..]).unwrap();
            }
            Entry::File(p, data) => {
                let mut h = header(p, tar::EntryType::Regular, 0o755, data.len() as u64);
                b.append_data(&mut h, p, *data).unwrap();
            }
            Entry::Symlink(p, target) => {
                let mut h = header(p, tar::EntryType::Symlink, 0o777, 0);
                b.append_link(&mut h, p, target).unwrap();
            }
        }
    }
    Layer::gzipped(b.into_inner().unwrap())
}

/// /bin/busybox from busybox-static and links for a few applets.
pub fn busybox_layer() -> Layer {
    let busybox = fs::read("/bin/busybox").expect(
        "the image tests build images from /bin/busybox: install busybox-static (scripts/deps)",
    );
    let mut entries = vec![Entry::Dir("bin"), Entry::File("bin/busybox", &busybox)];
    for applet in ["sh", "echo", "cat", "ls", "true"] {
        entries.push(Entry::Symlink(
            Box::leak(format!("bin/{applet}").into_boxed_str()),
            "busybox",
        ));
    }
    layer(&entries)
}

/// An image: layers, config and manifest, all bytes.
pub struct TestImage {
    pub layers: Vec<Layer>,
    pub config: Vec<u8>,
    pub manifest: Vec<u8>,
}

impl TestImage {
    pub fn new(layers: Vec<Layer>, cmd: &[&str]) -> TestImage {
        let diff_ids: Vec<String> = layers.iter().map(|l| l.diff_id().to_string()).collect();
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "created": "2026-01-01T00:00:00Z",
            "config": {"Cmd": cmd, "Env": ["PATH=/bin"], "WorkingDir": "/"},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }))
        .unwrap();
        let layer_descs: Vec<serde_json::Value> = layers
            .iter()
            .map(|l| {
                serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": l.digest().to_string(), "size": l.gz.len()})
            })
            .collect();
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": Digest::of(&config).to_string(), "size": config.len()},
            "layers": layer_descs,
        }))
        .unwrap();
        TestImage {
            layers,
            config,
            manifest,
        }
    }

    pub fn digest(&self) -> Digest {
        Digest::of(&self.manifest)
    }

    /// Writes an OCI image layout of this image to `dir`, tagged `tag` (as skopeo would).
    pub fn write_layout(&self, dir: &Path, tag: &str) {
        let blobs = dir.join("blobs/sha256");
        fs::create_dir_all(&blobs).unwrap();
        let put = |b: &[u8]| fs::write(blobs.join(Digest::of(b).hex()), b).unwrap();
        for l in &self.layers {
            put(&l.gz);
        }
        put(&self.config);
        put(&self.manifest);
        fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        let index = serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": self.digest().to_string(), "size": self.manifest.len(),
                "annotations": {"org.opencontainers.image.ref.name": tag}}],
        });
        fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    }

    /// Writes a `docker save` archive (Docker < 25 layout: `<id>/layer.tar`, `<config>.json`,
    /// `manifest.json`, `repositories`).
    pub fn write_docker_save(&self, path: &Path, repo_tag: &str) {
        let mut b = tar::Builder::new(fs::File::create(path).unwrap());
        let mut add = |name: &str, data: &[u8]| {
            let mut h = header(name, tar::EntryType::Regular, 0o644, data.len() as u64);
            b.append_data(&mut h, name, data).unwrap();
        };
        let config_name = format!("{}.json", Digest::of(&self.config).hex());
        let mut layer_names = Vec::new();
        for l in &self.layers {
            let name = format!("{}/layer.tar", l.diff_id().hex());
            add(&name, &l.tar);
            layer_names.push(name);
        }
        add(&config_name, &self.config);
        let manifest = serde_json::json!([{"Config": config_name, "RepoTags": [repo_tag], "Layers": layer_names}]);
        add("manifest.json", &serde_json::to_vec(&manifest).unwrap());
        b.finish().unwrap();
    }
}

/// Tars the contents of `dir` into `out` (an OCI layout as a tar file).
pub fn tar_dir(dir: &Path, out: &Path) {
    let mut b = tar::Builder::new(fs::File::create(out).unwrap());
    b.append_dir_all(".", dir).unwrap();
    b.finish().unwrap();
}

/// A loopback port nothing listens on (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A private registry (Debian's docker-registry) on a loopback port, storing into a temp dir;
/// killed when dropped.
pub struct Registry {
    child: Child,
    pub port: u16,
    dir: tempfile::TempDir,
}

/// The user and password of [`Registry::start_with_password`] (its htpasswd holds this bcrypt
/// hash of the password, made once with Python's `crypt`).
pub const REGISTRY_USER: &str = "tester";
pub const REGISTRY_PASSWORD: &str = "cela-test-pw";
const REGISTRY_BCRYPT: &str = "$2b$12$74kKlhDQ7nAEq6LJqv6CrO6HLVFPYl26TxSxd.Tu/ups06Z7AH3Xy";

impl Registry {
    /// A registry anyone may pull from and push to.
    pub fn start() -> Registry {
        Registry::start_with(false)
    }

    /// A registry that wants [`REGISTRY_USER`] and [`REGISTRY_PASSWORD`] (HTTP basic auth).
    pub fn start_with_password() -> Registry {
        Registry::start_with(true)
    }

    fn start_with(password: bool) -> Registry {
        assert!(
            which("docker-registry"),
            "the registry tests need docker-registry: install it (scripts/deps)"
        );
        let dir = tempfile::tempdir().unwrap();
        // A port can be taken between choosing it and the registry binding it: try again then.
        for _ in 0..5 {
            let port = free_port();
            let config = dir.path().join("config.yml");
            let mut yaml = format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
                dir.path().join("data").display()
            );
            if password {
                let htpasswd = dir.path().join("htpasswd");
                fs::write(&htpasswd, format!("{REGISTRY_USER}:{REGISTRY_BCRYPT}\n")).unwrap();
                yaml.push_str(&format!(
                    "auth:\n  htpasswd:\n    realm: cela-test\n    path: {}\n",
                    htpasswd.display()
                ));
            }
            fs::write(&config, yaml).unwrap();
            let log = fs::File::create(dir.path().join("registry.log")).unwrap();
            let mut child = Command::new("docker-registry")
                .arg("serve")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("docker-registry starts");
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if child.try_wait().unwrap().is_some() {
                    break; // it exited: most likely the port was taken
                }
                // 401 is the answer of a registry that wants a password.
                if matches!(http_status(port, "/v2/"), Some(200 | 401)) {
                    return Registry { child, port, dir };
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!(
            "docker-registry did not answer on /v2/: {}",
            fs::read_to_string(dir.path().join("registry.log")).unwrap_or_default()
        );
    }

    /// `127.0.0.1:PORT/<repo_tag>`
    pub fn reference(&self, repo_tag: &str) -> String {
        format!("127.0.0.1:{}/{repo_tag}", self.port)
    }

    /// Pushes the OCI layout `dir` (tag `tag`) as `repo_tag` with skopeo.
    pub fn push(&self, dir: &Path, tag: &str, repo_tag: &str) {
        self.push_args(dir, tag, repo_tag, &[]);
    }

    /// The same, with more `skopeo copy` flags.
    pub fn push_args(&self, dir: &Path, tag: &str, repo_tag: &str, extra: &[&str]) {
        assert!(
            which("skopeo"),
            "the registry tests need skopeo: install it (scripts/deps)"
        );
        let out = Command::new("skopeo")
            .args([
                "--insecure-policy",
                "copy",
                "--quiet",
                "--dest-tls-verify=false",
            ])
            .args(extra)
            .arg(format!("oci:{}:{tag}", dir.display()))
            .arg(format!("docker://{}", self.reference(repo_tag)))
            .stdin(Stdio::null())
            .output()
            .expect("skopeo runs");
        assert!(
            out.status.success(),
            "skopeo copy: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Puts a manifest (or index) under `repo:tag` over the registry API.
    pub fn put_manifest(&self, repo: &str, tag: &str, media_type: &str, body: &[u8]) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "PUT /v2/{repo}/manifests/{tag} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: {media_type}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .unwrap();
        s.write_all(body).unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        assert!(
            reply.starts_with("HTTP/1.0 201") || reply.starts_with("HTTP/1.1 201"),
            "PUT manifest: {reply}"
        );
    }

    /// The manifest digest a tag points at (from the registry's storage).
    pub fn tag_target(&self, repo: &str, tag: &str) -> Digest {
        let link = self
            .dir
            .path()
            .join("data/docker/registry/v2/repositories")
            .join(repo)
            .join("_manifests/tags")
            .join(tag)
            .join("current/link");
        fs::read_to_string(&link).unwrap().trim().parse().unwrap()
    }

    /// Where the registry keeps a blob's bytes (docker-registry's filesystem driver layout).
    pub fn blob_file(&self, d: &Digest) -> PathBuf {
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&d.hex()[..2])
            .join(d.hex())
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a shell command in `root` with chroot. A freshly written /bin/busybox can be briefly
/// "text file busy": a process forked by another test thread at the moment it was being written
/// holds a copy of the writing descriptor until that process execs. Retried, within a bound.
pub fn chroot(root: &Path, script: &str) -> std::process::Output {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let out = Command::new("chroot")
            .arg(root)
            .args(["/bin/sh", "-c", script])
            .output()
            .unwrap();
        let busy = String::from_utf8_lossy(&out.stderr).contains("Text file busy");
        if !busy || std::time::Instant::now() > deadline {
            return out;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Checks an ext4 image with `e2fsck -fn` (read-only, forced).
pub fn assert_fsck_clean(disk: &Path) {
    let out = Command::new("e2fsck")
        .arg("-fn")
        .arg(disk)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "e2fsck {}: {}",
        disk.display(),
        String::from_utf8_lossy(&out.stdout)
    );
}

/// The status of `GET path` on the loopback port, if anything answers.
pub fn http_status(port: u16, path: &str) -> Option<u16> {
    let addr = ("127.0.0.1", port);
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).ok()?;
    let line = String::from_utf8_lossy(&buf[..n]).into_owned();
    line.split_whitespace().nth(1)?.parse().ok()
}

fn which(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

/// busybox with every applet, a passwd with an unprivileged user, a greeting; the image's
/// config runs `sh -c 'echo default-cmd'` with PATH=/bin in /.
pub fn test_image() -> TestImage {
    let busybox = std::fs::read("/bin/busybox").expect("busybox-static (scripts/deps)");
    let list = Command::new("/bin/busybox").arg("--list").output().unwrap();
    let applets: Vec<String> = String::from_utf8_lossy(&list.stdout)
        .lines()
        .filter(|a| *a != "busybox")
        .map(|a| format!("bin/{a}"))
        .collect();
    let mut entries = vec![
        Entry::Dir("bin"),
        Entry::File("bin/busybox", &busybox),
        Entry::Dir("etc"),
        Entry::File(
            "etc/passwd",
            b"root:x:0:0:root:/root:/bin/sh\nwww:x:33:34:www:/var/www:/bin/sh\n",
        ),
        Entry::File("etc/group", b"root:x:0:\nwww:x:34:\n"),
        Entry::File("etc/greeting", b"the-test-image\n"),
        Entry::Dir("srv"),
        Entry::Dir("tmp"),
    ];
    for a in &applets {
        entries.push(Entry::Symlink(a, "busybox"));
    }
    TestImage::new(vec![layer(&entries)], &["sh", "-c", "echo default-cmd"])
}
