//! The Docker Engine API subset cela serves, so that the `docker` CLI and Docker's SDKs drive
//! cela unchanged. Shapes and status codes follow Docker's OpenAPI document of
//! [`API_VERSION`]; clients of any version from [`MIN_API_VERSION`] on are served (requests
//! come as `/v1.NN/...` or unversioned). What is not implemented answers 501 naming the
//! endpoint (see [`crate::not_implemented`]).

mod containers;
pub(crate) mod events;
pub(crate) mod exec;
mod frames;
mod images;
mod networks;
mod system;

pub use containers::{parse_create, parse_filters};

use std::sync::Arc;

use axum::Router;
use axum::routing::{get, post};

use crate::AppState;

/// The API version cela speaks (Docker Engine 28.2's).
pub const API_VERSION: &str = "1.50";
/// The oldest API version clients may ask for.
pub const MIN_API_VERSION: &str = "1.24";

/// The Docker routes, without version prefix.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/_ping", get(system::ping).head(system::ping_head))
        .route("/version", get(system::version))
        .route("/info", get(system::info))
        .route("/containers/json", get(containers::list))
        .route("/events", get(events::events))
        .route("/containers/create", post(containers::create))
        .route(
            "/containers/{id}",
            axum::routing::delete(containers::remove),
        )
        .route("/containers/{id}/json", get(containers::inspect))
        .route("/containers/{id}/start", post(containers::start))
        .route("/containers/{id}/stop", post(containers::stop))
        .route("/containers/{id}/restart", post(containers::restart))
        .route("/containers/{id}/kill", post(containers::kill))
        .route("/containers/{id}/wait", post(containers::wait))
        .route("/containers/{id}/logs", get(containers::logs))
        .route("/containers/{id}/attach", post(containers::attach))
        .route("/containers/{id}/resize", post(containers::resize))
        .route("/containers/{id}/exec", post(exec::create))
        .route("/exec/{id}/start", post(exec::start))
        .route("/exec/{id}/resize", post(exec::resize))
        .route("/exec/{id}/json", get(exec::inspect))
        .route("/images/json", get(images::list))
        .route("/commit", post(images::commit))
        .route("/images/create", post(images::create))
        // An image archive is as large as the images in it: streamed to the store's tmp/,
        // bounded by its free space, not by the API's body limit.
        .route(
            "/images/load",
            post(images::load).layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route("/images/{*name}", get(image_get).delete(images::remove))
        .route("/networks", get(networks::list))
        .route("/networks/create", post(networks::create))
        .route(
            "/networks/{id}",
            get(networks::inspect).delete(networks::remove),
        )
        .route("/networks/{id}/connect", post(networks::connect))
        .route("/networks/{id}/disconnect", post(networks::disconnect))
}

/// `GET /images/NAME/json`: image names contain slashes, so the route takes the rest of the
/// path and expects it to end in `/json`.
async fn image_get(
    state: axum::extract::State<Arc<AppState>>,
    axum::extract::Path(rest): axum::extract::Path<String>,
) -> Result<axum::Json<serde_json::Value>, crate::error::ApiError> {
    match rest.strip_suffix("/json") {
        Some(name) => images::inspect(state, axum::extract::Path(name.to_owned())).await,
        None => Err(crate::error::ApiError::not_implemented(format!(
            "GET /images/{rest}"
        ))),
    }
}

/// Whether `version` (`1.NN`) is one cela serves; an error names the range otherwise.
pub fn check_version(version: &str) -> Result<(), String> {
    let parse = |v: &str| -> Option<(u32, u32)> {
        let (a, b) = v.split_once('.')?;
        Some((a.parse().ok()?, b.parse().ok()?))
    };
    let (Some(v), Some(max), Some(min)) =
        (parse(version), parse(API_VERSION), parse(MIN_API_VERSION))
    else {
        return Err(format!("malformed API version {version:?}"));
    };
    if v > max {
        return Err(format!(
            "client version {version} is too new. Maximum supported API version is {API_VERSION}"
        ));
    }
    if v < min {
        return Err(format!(
            "client version {version} is too old. Minimum supported API version is {MIN_API_VERSION}, please upgrade your client to a newer version"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_routes_fit_together() {
        // Conflicting routes panic when the router is built.
        let _ = crate::router(std::path::Path::new("/nonexistent"));
    }

    #[test]
    fn versions_in_range_are_served() {
        assert!(super::check_version("1.41").is_ok());
        assert!(super::check_version("1.50").is_ok());
        assert!(
            super::check_version("1.51")
                .unwrap_err()
                .contains("too new")
        );
        assert!(
            super::check_version("1.12")
                .unwrap_err()
                .contains("too old")
        );
        assert!(super::check_version("x").is_err());
    }
}
