//! The JSON shape of an instance that `cela ps --format json`, `cela inspect` and cela's own
//! HTTP API (`/cela/v1/instances`) all show, so that a program sees the same object whichever
//! front end it asks.

use serde_json::{Value, json};

use crate::record::{Broken, Instance, InstanceState, Status};

/// One instance as `ps --format json` lists it.
pub fn summary(inst: &Instance, state: &InstanceState) -> Value {
    json!({
        "id": inst.config.id,
        "name": inst.config.name,
        "kind": inst.config.kind,
        "image": inst.config.image,
        "image_digest": inst.config.image_digest,
        "command": inst.config.command,
        "status": state.status,
        "exit_code": state.exit_code,
        "pid": state.pid,
        "created": inst.config.created,
        "started": state.started,
        "finished": state.finished,
        "error": state.error,
        "network": crate::network::view(inst.config.net, state.network.as_ref()),
        "labels": inst.config.labels,
    })
}

/// One instance as `inspect` shows it: the summary with its whole config and state.
pub fn detail(inst: &Instance, state: &InstanceState) -> Value {
    let mut v = summary(inst, state);
    v["config"] = serde_json::to_value(&inst.config).expect("a config serializes");
    v["state"] = serde_json::to_value(state).expect("a state serializes");
    v["dir"] = json!(inst.dir);
    v
}

/// An instance whose record cannot be read: its id, `unknown`, and why.
pub fn broken(b: &Broken) -> Value {
    json!({"id": b.id, "status": Status::Unknown, "error": b.error})
}
