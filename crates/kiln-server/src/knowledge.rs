//! Knowledge endpoints under `/v1/indexes`: create, list, inspect (stats), sync (NDJSON
//! progress), remove, search and context, over `kiln_knowledge::Engine`. Every index belongs
//! to the caller's organisation: another org's index is the same 404 as a missing one.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use kiln_knowledge::engine::Source;
use kiln_knowledge::search::Mode;
use kiln_knowledge::{EmbedConfig, Engine, Error, Language, SearchParams, SymbolKind};
use serde::Deserialize;

use crate::error::{ApiError, ApiJson};
use crate::service::{AppState, Caller};

/// The knowledge routes (mounted under `/v1`, behind authentication).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/indexes", post(create).get(list))
        .route("/indexes/:name", get(stats).delete(remove))
        .route("/indexes/:name/sync", post(sync))
        .route("/indexes/:name/search", post(search))
        .route("/indexes/:name/context", post(context))
}

/// One engine per data directory (a test process runs several servers).
fn engine(k: &AppState) -> Result<Engine, ApiError> {
    static ENGINES: OnceLock<Mutex<HashMap<PathBuf, Engine>>> = OnceLock::new();
    let mut m = ENGINES
        .get_or_init(Default::default)
        .lock()
        .map_err(|_| ApiError::internal("knowledge engine lock poisoned"))?;
    if let Some(e) = m.get(&k.cfg.data_dir) {
        return Ok(e.clone());
    }
    let models = kiln_knowledge::embed::model_dir(&k.cfg.data_dir);
    let e = Engine::new(&k.cfg.data_dir.join("knowledge"), &models).map_err(api_err)?;
    m.insert(k.cfg.data_dir.clone(), e.clone());
    Ok(e)
}

/// The one mapping of knowledge errors to API errors.
fn api_err(e: Error) -> ApiError {
    match e {
        Error::NotFound(name) => ApiError::new(
            StatusCode::NOT_FOUND,
            "index_not_found",
            format!("no index named `{name}`"),
        )
        .hint("list indexes with `kiln index ls` (GET /v1/indexes)"),
        Error::Exists(name) => ApiError::new(
            StatusCode::CONFLICT,
            "index_exists",
            format!("an index named `{name}` already exists"),
        )
        .hint("pick another name, or `kiln index rm` the old one"),
        Error::Invalid(m) => ApiError::invalid(m),
        Error::Source(m) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "source_unreadable", m)
            .hint("the source path must stay readable by the server"),
        e @ Error::ModelMissing(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "model_missing",
            e.to_string(),
        )
        .hint("run scripts/install-knowledge-data.sh (make run does), or set KILN_MODEL_DIR"),
        Error::Embedding(m) => ApiError::new(StatusCode::BAD_GATEWAY, "embedding_failed", m),
        e => ApiError::internal(e.to_string()),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("knowledge task failed: {e}")))?
        .map_err(api_err)
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateIndex {
    name: String,
    /// An absolute directory on the server's host.
    path: Option<String>,
    git: Option<String>,
    sandbox: Option<String>,
    /// The embedding provider (default: the local model).
    #[serde(default)]
    #[schemars(with = "Option<serde_json::Value>")]
    embed: Option<EmbedConfig>,
}

async fn create(
    State(k): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiJson(req): ApiJson<CreateIndex>,
) -> Result<Response, ApiError> {
    let source =
        match (req.path, req.git, req.sandbox) {
            // A host directory is the operator's to give: a tenant must not read the server's
            // files through an index.
            (Some(_), None, None) if !caller.system => return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "source_forbidden",
                "only keys of the system organisation may index a directory of the server's host",
            )
            .hint("ask the operator to index it for you")),
            (Some(path), None, None) => Source::Path { path },
            (None, Some(_), None) | (None, None, Some(_)) => {
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "source_unsupported",
                    "git and sandbox sources are not built yet",
                )
                .hint("index a directory of the server's host with `path`"))
            }
            _ => {
                return Err(
                    ApiError::invalid("give exactly one source: path, git or sandbox")
                        .hint("e.g. {\"name\":\"app\",\"path\":\"/srv/app\"}"),
                )
            }
        };
    let e = engine(&k)?;
    let embed = req.embed.unwrap_or(EmbedConfig::Local);
    let org = caller.org_id.clone();
    let info = blocking(move || e.create(&org, &req.name, source, embed)).await?;
    Ok((StatusCode::CREATED, Json(info)).into_response())
}

async fn list(
    State(k): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Response, ApiError> {
    let e = engine(&k)?;
    let list = blocking(move || e.list(&caller.org_id)).await?;
    Ok(Json(serde_json::json!({ "indexes": list })).into_response())
}

async fn stats(
    State(k): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let e = engine(&k)?;
    Ok(Json(blocking(move || e.stats(&caller.org_id, &name)).await?).into_response())
}

async fn remove(
    State(k): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let e = engine(&k)?;
    blocking(move || e.remove(&caller.org_id, &name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Streams `{"type":"progress","done","total"}` lines, then `{"type":"done","report"}` (or
/// `{"type":"error","error":{..}}`). The index is checked before the stream starts, so a
/// missing index is a plain 404.
async fn sync(
    State(k): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let e = engine(&k)?;
    let (org, n2, e2) = (caller.org_id.clone(), name.clone(), e.clone());
    blocking(move || e2.info(&org, &n2)).await?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<serde_json::Value>();
    tokio::task::spawn_blocking(move || {
        let tx2 = tx.clone();
        let progress = move |p: kiln_knowledge::engine::SyncProgress| {
            let _ =
                tx2.send(serde_json::json!({"type": "progress", "done": p.done, "total": p.total}));
        };
        let line = match e.sync(&caller.org_id, &name, &progress) {
            Ok(report) => serde_json::json!({"type": "done", "report": report}),
            Err(err) => serde_json::json!({"type": "error", "error": api_err(err).body().error}),
        };
        let _ = tx.send(line);
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        let v = rx.recv().await?;
        let mut line = v.to_string();
        line.push('\n');
        Some((
            Ok::<_, std::convert::Infallible>(bytes::Bytes::from(line)),
            rx,
        ))
    });
    let mut resp = Response::new(Body::from_stream(stream));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    Ok(resp)
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SearchReq {
    query: String,
    #[serde(default)]
    k: Option<usize>,
    #[serde(default)]
    lang: Option<String>,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    /// `hybrid` (default), `bm25` or `vector`.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    mode: Option<Mode>,
}

fn params(req: SearchReq) -> Result<SearchParams, ApiError> {
    let lang = match req.lang {
        Some(l) => Some(Language::parse(&l).ok_or_else(|| {
            ApiError::invalid(format!("unknown language `{l}`"))
                .hint("use python, rust, typescript, tsx, javascript, markdown or text")
        })?),
        None => None,
    };
    let kind = match req.kind {
        Some(s) => Some(SymbolKind::parse(&s).ok_or_else(|| {
            ApiError::invalid(format!("unknown symbol kind `{s}`")).hint(
                "use function, method, class, impl, trait, type, module, section, code or lines",
            )
        })?),
        None => None,
    };
    Ok(SearchParams {
        query: req.query,
        k: req.k.unwrap_or(10),
        lang,
        path: req.path,
        kind,
        mode: req.mode.unwrap_or_default(),
    })
}

async fn search(
    State(k): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<SearchReq>,
) -> Result<Response, ApiError> {
    let p = params(req)?;
    let e = engine(&k)?;
    let hits = blocking(move || e.search(&caller.org_id, &name, &p)).await?;
    Ok(Json(serde_json::json!({ "hits": hits })).into_response())
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ContextReq {
    query: String,
    #[serde(default = "default_tokens")]
    tokens: usize,
    #[serde(default)]
    symbols: bool,
}

fn default_tokens() -> usize {
    4000
}

async fn context(
    State(k): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<ContextReq>,
) -> Result<Response, ApiError> {
    let e = engine(&k)?;
    let c = blocking(move || e.context(&caller.org_id, &name, &req.query, req.tokens, req.symbols))
        .await?;
    let text = c.render();
    let mut v = serde_json::to_value(&c).map_err(|e| ApiError::internal(e.to_string()))?;
    v["text"] = serde_json::Value::String(text);
    Ok(Json(v).into_response())
}
