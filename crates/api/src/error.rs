//! Errors as the APIs answer them: a status code and a JSON body `{"message": "..."}` (the
//! Docker Engine API's error shape, which cela's own API shares).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use cela_instance::InstanceError;

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn not_implemented(what: impl std::fmt::Display) -> ApiError {
        ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            format!("{what} is not implemented by cela"),
        )
    }

    pub fn internal(message: impl std::fmt::Display) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message.to_string())
    }
}

/// The body of every error answer.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// What went wrong, for a person.
    pub message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            axum::Json(ErrorBody {
                message: self.message,
            }),
        )
            .into_response()
    }
}

impl From<InstanceError> for ApiError {
    fn from(e: InstanceError) -> ApiError {
        use InstanceError as E;
        let status = match &e {
            E::NotFound(_) | E::NoImage(_) | E::NotPulled { .. } => StatusCode::NOT_FOUND,
            E::Image(cela_image::ImageError::UnknownImage(_)) => StatusCode::NOT_FOUND,
            E::NameTaken(_) | E::WrongState { .. } | E::ImageInUse { .. } => StatusCode::CONFLICT,
            E::BadName(_) | E::Invalid(_) => StatusCode::BAD_REQUEST,
            E::Unsupported(_) => StatusCode::NOT_IMPLEMENTED,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let message = match &e {
            // The Docker client recognises a missing image by this message and a 404.
            E::NoImage(image) => format!("No such image: {image}"),
            E::NotFound(key) => format!("No such container: {key}"),
            other => other.to_string(),
        };
        ApiError::new(status, message)
    }
}

impl From<cela_image::ImageError> for ApiError {
    fn from(e: cela_image::ImageError) -> ApiError {
        ApiError::from(InstanceError::from(e))
    }
}

/// Runs blocking library work off the async threads.
pub async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::internal(format!("a request's worker failed: {e}")))?
}
