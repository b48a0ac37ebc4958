//! The Docker Engine API's system endpoints: `/_ping` (where clients learn the API version
//! to speak), `/version` and `/info`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::IntoResponse;
use serde_json::{Value, json};

use super::{API_VERSION, MIN_API_VERSION};
use crate::AppState;
use crate::error::{ApiError, blocking};

fn ping_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("API-Version", HeaderValue::from_static(API_VERSION));
    h.insert("OSType", HeaderValue::from_static("linux"));
    h.insert("Docker-Experimental", HeaderValue::from_static("false"));
    h.insert(
        "Cache-Control",
        HeaderValue::from_static("no-cache, no-store, must-revalidate"),
    );
    h.insert("Pragma", HeaderValue::from_static("no-cache"));
    h
}

pub async fn ping() -> impl IntoResponse {
    (ping_headers(), "OK")
}

pub async fn ping_head() -> impl IntoResponse {
    ping_headers()
}

fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

pub async fn version() -> axum::Json<Value> {
    let version = env!("CARGO_PKG_VERSION");
    axum::Json(json!({
        "Platform": {"Name": "cela"},
        "Components": [{
            "Name": "Engine",
            "Version": version,
            "Details": {"ApiVersion": API_VERSION, "MinAPIVersion": MIN_API_VERSION, "Os": "linux", "Arch": "amd64"},
        }],
        "Version": version,
        "ApiVersion": API_VERSION,
        "MinAPIVersion": MIN_API_VERSION,
        "GitCommit": "",
        "GoVersion": "",
        "Os": "linux",
        "Arch": "amd64",
        "KernelVersion": kernel_release(),
        "BuildTime": "",
    }))
}

pub async fn info(State(app): State<Arc<AppState>>) -> Result<axum::Json<Value>, ApiError> {
    blocking(move || {
        let insts = cela_instance::Instances::open(&app.data_dir)?.list()?;
        let states: Vec<_> = insts.iter().map(|i| i.state_or_unknown()).collect();
        let running = states
            .iter()
            .filter(|s| cela_instance::ops::is_live(s))
            .count();
        let images = cela_image::Store::open(&app.data_dir)?.list()?.len();
        let mem_total = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
            .map_or(0, |kb| kb * 1024);
        let hostname = nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default();
        let cgroup_version = if std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
            "2"
        } else {
            "1"
        };
        Ok(axum::Json(json!({
            "ID": "",
            "Containers": insts.len(),
            "ContainersRunning": running,
            "ContainersPaused": 0,
            "ContainersStopped": insts.len() - running,
            "Images": images,
            "Driver": "overlay",
            "DockerRootDir": app.data_dir,
            "OperatingSystem": "cela",
            "OSType": "linux",
            "Architecture": "x86_64",
            "NCPU": std::thread::available_parallelism().map_or(1, |n| n.get()),
            "MemTotal": mem_total,
            "Name": hostname,
            "ServerVersion": env!("CARGO_PKG_VERSION"),
            "KernelVersion": kernel_release(),
            "Runtimes": {"container": {"path": "cela"}, "vm": {"path": "cela"}},
            "DefaultRuntime": "container",
            "CgroupDriver": "cgroupfs",
            "CgroupVersion": cgroup_version,
            "SecurityOptions": ["name=seccomp,profile=builtin", "name=no-new-privileges"],
            "Labels": [],
            "Warnings": [],
        })))
    })
    .await
}
