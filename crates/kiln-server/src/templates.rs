//! Template endpoints: list, inspect, build (streamed NDJSON progress), remove and garbage
//! collection of the image store. Kept apart from `http.rs`; the router merges [`routes`].
//!
//! Specs and roles are read from [`kiln_template::Sources::discover`] (`KILN_TEMPLATES_DIR`,
//! `KILN_ANSIBLE_DIR`, else the checkout the server was built from).

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use kiln_protocol::api::{Template, TemplateList};
use kiln_template::template::{self, BuildEvent, BuildOptions, GcReport, TemplateInfo};
use kiln_template::{Sources, TemplateError};
use serde::Deserialize;

use crate::error::{ApiError, ApiQuery};
use crate::service::AppState;

/// The template routes (mounted under `/v1`, behind authentication).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/templates", get(list_templates))
        .route("/templates/gc", post(gc))
        .route(
            "/templates/:name",
            get(inspect_template).delete(remove_template),
        )
        .route("/templates/:name/build", post(build_template))
}

fn sources() -> Sources {
    Sources::discover(None, None)
}

/// Maps template errors that only these endpoints produce; the rest go through `From`.
fn api_err(e: TemplateError) -> ApiError {
    match e {
        TemplateError::UnknownTemplate { .. } => {
            ApiError::new(StatusCode::NOT_FOUND, "template_not_found", e.to_string())
                .hint("template specs are the templates/*.toml files of the server's checkout")
        }
        TemplateError::UnknownRole { .. } | TemplateError::InvalidSpec { .. } => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_template",
            e.to_string(),
        ),
        TemplateError::MissingTool { .. } => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "missing_tool",
            e.to_string(),
        ),
        TemplateError::RoleFailed { .. } => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "build_failed",
            e.to_string(),
        )
        .hint("fix the role and build again; the previous template stays usable"),
        other => other.into(),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, TemplateError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("template task failed: {e}")))?
        .map_err(api_err)
}

async fn list_templates(State(k): State<AppState>) -> Result<Json<TemplateList>, ApiError> {
    let images = k.images.clone();
    let list = blocking(move || Ok(template::list(&images, &sources()))).await?;
    let templates = list
        .into_iter()
        .map(|t| Template {
            image: t.image.layers.first().cloned().unwrap_or_default(),
            size_bytes: t.image.size_bytes,
            created_at_ms: t.image.created_at_ms,
            layers: t.image.layers.len(),
            roles: t
                .image
                .template
                .as_ref()
                .map(|m| m.roles.iter().map(|r| r.role.clone()).collect())
                .unwrap_or_default(),
            cache: serde_json::to_value(t.cache)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            name: t.image.name,
        })
        .collect();
    Ok(Json(TemplateList { templates }))
}

async fn inspect_template(
    State(k): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<TemplateInfo>, ApiError> {
    let images = k.images.clone();
    Ok(Json(
        blocking(move || template::info(&images, &sources(), &name)).await?,
    ))
}

async fn remove_template(
    State(k): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let images = k.images.clone();
    blocking(move || template::remove(&images, &name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Layers of live sandboxes are protected by their overlay mounts (see [`template::gc`]).
async fn gc(State(k): State<AppState>) -> Result<Json<GcReport>, ApiError> {
    let images = k.images.clone();
    Ok(Json(
        blocking(move || template::gc(&images, &Default::default())).await?,
    ))
}

#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct BuildQuery {
    #[serde(default)]
    no_cache: bool,
}

/// Streams [`BuildEvent`]s as NDJSON; a failure ends the stream with
/// `{"event":"error","error":{code,message,hint}}`. Spec errors are answered before streaming.
async fn build_template(
    State(k): State<AppState>,
    Path(name): Path<String>,
    ApiQuery(q): ApiQuery<BuildQuery>,
) -> Result<Response, ApiError> {
    let src = sources();
    {
        let (src, name) = (src.clone(), name.clone());
        blocking(move || template::resolve(&src, &name)).await?;
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<bytes::Bytes>();
    let images = k.images.clone();
    tokio::task::spawn_blocking(move || {
        let line = |v: &serde_json::Value| {
            let mut b = serde_json::to_vec(v).unwrap_or_default();
            b.push(b'\n');
            bytes::Bytes::from(b)
        };
        let opts = BuildOptions {
            no_cache: q.no_cache,
            mirror: None,
            ..BuildOptions::default()
        };
        let r = template::build(&images, &src, &name, &opts, &mut |ev: BuildEvent| {
            let _ = tx.send(line(&serde_json::to_value(&ev).unwrap_or_default()));
        });
        if let Err(e) = r {
            let body = api_err(e).body();
            let _ = tx.send(line(
                &serde_json::json!({"event": "error", "error": body.error}),
            ));
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    });
    let mut resp = Body::from_stream(stream).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    Ok(resp)
}
