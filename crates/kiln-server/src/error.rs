//! The one place where every error becomes an HTTP answer:
//! `{"error":{"code","message","hint"}}` with the right status.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use kiln_protocol::api::{ErrorBody, ErrorDetail};
use kiln_protocol::kilnd::{DaemonError, DaemonErrorCode};
use kilnd::client::ClientError;

/// An error answer of the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub hint: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            hint: None,
        }
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_argument", message)
    }

    pub fn sandbox_not_found(id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "sandbox_not_found",
            format!("no sandbox with id `{id}`"),
        )
        .hint("list sandboxes with `kiln sandbox ls` (GET /v1/sandboxes)")
    }

    /// The error as one line for an agent's model: the message, then the hint in brackets.
    pub fn into_text(self) -> String {
        match self.hint {
            Some(h) => format!("{} ({h})", self.message),
            None => self.message,
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message.clone(),
                hint: self.hint.clone(),
            },
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(code = self.code, message = %self.message, "request failed");
        }
        (self.status, Json(self.body())).into_response()
    }
}

impl From<DaemonError> for ApiError {
    fn from(e: DaemonError) -> Self {
        let (status, code, hint) = match e.code {
            DaemonErrorCode::Invalid => (StatusCode::BAD_REQUEST, "invalid_argument", None),
            DaemonErrorCode::NotFound => (StatusCode::NOT_FOUND, "not_found", None),
            DaemonErrorCode::AlreadyExists => {
                (StatusCode::CONFLICT, "already_exists", Some("pass overwrite=true to replace it"))
            }
            DaemonErrorCode::PermissionDenied => (StatusCode::FORBIDDEN, "permission_denied", None),
            DaemonErrorCode::WrongKind => (StatusCode::BAD_REQUEST, "wrong_file_kind", None),
            DaemonErrorCode::CommandNotFound => (
                StatusCode::BAD_REQUEST,
                "command_not_found",
                Some("check the command name; install it in the sandbox or use a template that has it"),
            ),
            DaemonErrorCode::NoSpace => (
                StatusCode::INSUFFICIENT_STORAGE,
                "disk_full",
                Some("the sandbox's disk limit is reached; free space or create it with a larger --disk"),
            ),
            DaemonErrorCode::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "sandbox_daemon_error", None),
        };
        let mut a = ApiError::new(status, code, e.message);
        a.hint = hint.map(str::to_string);
        a
    }
}

impl From<ClientError> for ApiError {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Daemon(d) => d.into(),
            ClientError::Connect(err) => ApiError::new(
                StatusCode::CONFLICT,
                "sandbox_unreachable",
                format!("the sandbox's daemon does not answer: {err}"),
            )
            .hint("the sandbox may have died; check `kiln sandbox ls` and recreate it"),
            other => ApiError::new(
                StatusCode::BAD_GATEWAY,
                "sandbox_daemon_error",
                other.to_string(),
            ),
        }
    }
}

impl From<kiln_sandbox::SandboxError> for ApiError {
    fn from(e: kiln_sandbox::SandboxError) -> Self {
        use kiln_sandbox::SandboxError as E;
        match e {
            E::NotFound(id) => ApiError::sandbox_not_found(&id),
            E::InvalidSpec(m) => ApiError::invalid(m),
            other => ApiError::internal(other.to_string()),
        }
    }
}

impl From<kiln_store::StoreError> for ApiError {
    fn from(e: kiln_store::StoreError) -> Self {
        match e {
            kiln_store::StoreError::Conflict(what) => ApiError::new(
                StatusCode::CONFLICT,
                "already_exists",
                format!("{what} already exists"),
            ),
            kiln_store::StoreError::InvalidText => {
                ApiError::invalid("a value of the request contains a NUL character")
                    .hint("remove the \\0 (%00) from names, ids and query values")
            }
            other => ApiError::internal(other.to_string()),
        }
    }
}

impl From<kiln_template::TemplateError> for ApiError {
    fn from(e: kiln_template::TemplateError) -> Self {
        use kiln_template::TemplateError as E;
        match e {
            E::NotBuilt(name) => ApiError::new(
                StatusCode::NOT_FOUND,
                "template_not_found",
                format!("template `{name}` is not built on this server"),
            )
            .hint(format!("build it with `kiln template build {name}`, or list templates with GET /v1/templates")),
            E::InvalidName(_) => ApiError::invalid(e.to_string()),
            other => ApiError::internal(other.to_string()),
        }
    }
}

/// JSON body extraction whose rejections are answered in the API's error shape.
pub struct ApiJson<T>(pub T);

#[axum::async_trait]
impl<T, S> axum::extract::FromRequest<S> for ApiJson<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(rej) => Err(ApiError::invalid(rej.body_text()).hint(
                "send a JSON body with Content-Type: application/json; see /v1 docs in README",
            )),
        }
    }
}

/// Query extraction with API-shaped rejections.
pub struct ApiQuery<T>(pub T);

#[axum::async_trait]
impl<T, S> axum::extract::FromRequestParts<S> for ApiQuery<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(ApiQuery(v)),
            Err(rej) => Err(ApiError::invalid(rej.body_text())),
        }
    }
}
