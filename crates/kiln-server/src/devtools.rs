//! Developer-tool endpoints of a sandbox: the egress allow-list, listening ports and the
//! preview proxy into them, git with typed results, and language servers (high-level queries
//! and a raw LSP WebSocket). Every handler resolves the sandbox through `Kiln::client` first,
//! the single scoping point (another organisation's sandbox is a 404).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Extension, Json, Router};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use kiln_devtools::git::{Credential, Identity};
use kiln_devtools::lsp::{self, LspError, LspManager};
use kiln_devtools::{Git, GitError};
use kiln_protocol::api::NetworkMode;
use kiln_sandbox::egress::EgressAllow;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::{ApiError, ApiJson, ApiQuery};
use crate::service::{AppState, Caller};

type ApiResult<T> = Result<T, ApiError>;

/// The routes, merged into `/v1` by `http::app`.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/sandboxes/:id/egress", get(get_egress).put(put_egress))
        .route("/sandboxes/:id/ports", get(list_ports))
        .route("/sandboxes/:id/ports/:port", any(preview_root))
        .route("/sandboxes/:id/ports/:port/", any(preview_root))
        .route("/sandboxes/:id/ports/:port/*path", any(preview))
        .route("/sandboxes/:id/git/:op", post(git))
        .route("/sandboxes/:id/lsp/ws", get(lsp_ws))
        .route("/sandboxes/:id/lsp/:op", post(lsp_op))
}

// ---------------------------------------------------------------------------------------
// Egress

/// `GET|PUT /v1/sandboxes/{id}/egress`.
#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Egress {
    /// `none` or `full`: fixed at creation.
    #[serde(default, skip_deserializing)]
    pub network: String,
    /// The allow-list (`full` only); `null` = unrestricted.
    #[schemars(with = "Option<kiln_protocol::api::EgressAllowList>")]
    pub allow: Option<EgressAllow>,
    /// Packets refused so far (with an allow-list).
    #[serde(default, skip_deserializing)]
    pub denied_packets: u64,
}

async fn egress_of(k: &AppState, id: &str, network: &NetworkMode) -> Egress {
    // Reads the sandbox's state file and runs `nft list counter`: off the async workers.
    let (rt, i) = (k.runtime.clone(), id.to_string());
    let cur = tokio::task::spawn_blocking(move || rt.egress(&i))
        .await
        .ok()
        .flatten();
    Egress {
        network: match network {
            NetworkMode::Full => "full",
            NetworkMode::None => "none",
        }
        .into(),
        denied_packets: cur.as_ref().map_or(0, |c| c.1),
        allow: cur.map(|c| c.0),
    }
}

async fn get_egress(
    State(k): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<Json<Egress>> {
    let sb = k.running(&c, &id).await?;
    Ok(Json(egress_of(&k, &id, &sb.network).await))
}

async fn put_egress(
    State(k): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<Egress>,
) -> ApiResult<Json<Egress>> {
    let sb = k.running(&c, &id).await?;
    if sb.network != NetworkMode::Full {
        return Err(ApiError::invalid(format!(
            "sandbox {id} has network `none`; an egress policy needs network `full`"
        ))
        .hint("create the sandbox with --network full (or with --allow-domain/--allow-cidr)"));
    }
    k.runtime.set_egress(&id, req.allow).await?;
    Ok(Json(egress_of(&k, &id, &sb.network).await))
}

// ---------------------------------------------------------------------------------------
// Ports and previews

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub(crate) struct PortsQuery {
    #[serde(default)]
    watch: bool,
}

/// Answer of `GET /v1/sandboxes/{id}/ports` (and each line of its watch stream).
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct PortList {
    pub ports: Vec<kiln_protocol::kilnd::ListenPort>,
}

/// `GET /v1/sandboxes/{id}/ports[?watch=true]`: the listening TCP ports; with `watch`, an
/// NDJSON stream of `{"ports":[...]}`, one line now and one per change.
async fn list_ports(
    State(k): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<PortsQuery>,
) -> ApiResult<Response> {
    let client = k.client(&c, &id).await?;
    if !q.watch {
        let ports = k.daemon(&id, client.list_ports()).await?;
        return Ok(Json(PortList { ports }).into_response());
    }
    let (first, updates) = k.daemon(&id, client.watch_ports(500)).await?;
    let head = futures_util::stream::once(async move {
        Ok::<_, std::io::Error>(line(&json!(PortList { ports: first })))
    });
    let rest = futures_util::stream::unfold(updates, |mut u| async move {
        match u.next().await {
            Some(Ok(ports)) => Some((Ok(line(&json!(PortList { ports }))), u)),
            _ => None,
        }
    });
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(head.chain(rest)))
        .unwrap_or_default())
}

fn line(v: &Value) -> Bytes {
    let mut b = serde_json::to_vec(v).unwrap_or_default();
    b.push(b'\n');
    Bytes::from(b)
}

async fn preview_root(
    State(k): State<AppState>,
    Extension(c): Extension<Caller>,
    Path((id, port)): Path<(String, u16)>,
    req: Request,
) -> ApiResult<Response> {
    proxy(k, c, id, port, String::new(), req).await
}

async fn preview(
    State(k): State<AppState>,
    Extension(c): Extension<Caller>,
    Path((id, port, path)): Path<(String, u16, String)>,
    req: Request,
) -> ApiResult<Response> {
    proxy(k, c, id, port, path, req).await
}

/// Hop-by-hop headers, plus our own credentials, never go to the sandbox.
const DROP: [&str; 6] = [
    "authorization",
    "connection",
    "keep-alive",
    "proxy-authorization",
    "te",
    "transfer-encoding",
];

/// `/v1/sandboxes/{id}/ports/{port}/{path}`: HTTP (and WebSocket) to `port` on the
/// sandbox's loopback, carried over kilnd (`Connect`), so it works for any network mode.
async fn proxy(
    k: AppState,
    c: Caller,
    id: String,
    port: u16,
    path: String,
    req: Request,
) -> ApiResult<Response> {
    let client = k.client(&c, &id).await?;
    proxy_to(&client, port, path, None, req).await
}

/// Sends `req` to `port` on the sandbox's loopback as `/{path}?{query}` (`query`: the
/// request's own unless given) and streams the answer back; upgrades (WebSocket) are
/// passed through. The caller has decided that the request may reach the sandbox.
pub async fn proxy_to(
    client: &kilnd::client::Client,
    port: u16,
    path: String,
    query: Option<String>,
    mut req: Request,
) -> ApiResult<Response> {
    let tunnel = client.connect(port, None).await.map_err(|e| {
        if e.code() == Some(kiln_protocol::kilnd::DaemonErrorCode::NotFound) {
            ApiError::new(StatusCode::BAD_GATEWAY, "port_not_listening", e.to_string())
                .hint("start a server in the sandbox on that port (list them: GET /v1/sandboxes/{id}/ports)")
        } else {
            ApiError::from(e)
        }
    })?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, Body>(hyper_util::rt::TokioIo::new(tunnel))
            .await
            .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, "preview_failed", e.to_string()))?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let upgrade = req.headers().contains_key(header::UPGRADE);
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let query = query
        .or_else(|| req.uri().query().map(str::to_string))
        .filter(|q| !q.is_empty())
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let uri = format!("/{path}{query}");
    let mut out = hyper::Request::builder()
        .method(req.method().clone())
        .uri(&uri);
    for (name, value) in req.headers() {
        let n = name.as_str();
        if DROP.contains(&n) || n == "host" || (n == "upgrade" && !upgrade) {
            continue;
        }
        out = out.header(name, value);
    }
    if upgrade {
        out = out.header(header::CONNECTION, "upgrade");
    }
    out = out.header(header::HOST, format!("localhost:{port}"));
    let out = out
        .body(req.into_body())
        .map_err(|e| ApiError::invalid(format!("preview request: {e}")))?;
    let mut resp = sender
        .send_request(out)
        .await
        .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, "preview_failed", e.to_string()))?;
    metrics::counter!("kiln_preview_requests_total").increment(1);
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(cu) = client_upgrade {
            let backend = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                if let (Ok(a), Ok(b)) = (cu.await, backend.await) {
                    let mut a = hyper_util::rt::TokioIo::new(a);
                    let mut b = hyper_util::rt::TokioIo::new(b);
                    let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                }
            });
        }
    }
    let (mut parts, body) = resp.into_parts();
    for h in ["keep-alive", "transfer-encoding", "te"] {
        parts.headers.remove(h);
    }
    Ok(Response::from_parts(parts, Body::new(body)))
}

// ---------------------------------------------------------------------------------------
// git

/// Body of `POST /v1/sandboxes/{id}/git/{op}`; which fields matter depends on `op`.
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GitRequest {
    /// The repository (absolute path in the sandbox); for `clone`, the directory to clone
    /// into (default `/workspace`).
    #[serde(default)]
    pub repo: Option<String>,
    #[serde(default)]
    pub url: Option<String>,
    /// `clone`: target directory name (default: from the URL).
    #[serde(default)]
    pub dir: Option<String>,
    #[serde(default)]
    pub branch: Option<String>,
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub staged: bool,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub author: Option<Identity>,
    /// `commit`: also commit every tracked change (`-a`).
    #[serde(default)]
    pub all: bool,
    #[serde(default)]
    pub remote: Option<String>,
    #[serde(default)]
    pub set_upstream: bool,
    /// `log`: how many commits (default 20).
    #[serde(default)]
    pub n: Option<u32>,
    /// `checkout`: create the branch first.
    #[serde(default)]
    pub create: bool,
    /// `branch`: start point.
    #[serde(default)]
    pub start: Option<String>,
    /// Credentials for clone/push/pull, held by the server for this call and handed to git
    /// through kilnd's relay (never written into the sandbox). They come before the
    /// organisation's stored credentials (`/v1/git-credentials`) for the same host.
    #[serde(default)]
    pub credentials: Vec<Credential>,
    /// Run git as this sandbox user (default root).
    #[serde(default)]
    pub user: Option<String>,
}

fn git_error(e: GitError) -> ApiError {
    let (status, hint) = match &e {
        GitError::NotARepository { .. } => (
            StatusCode::BAD_REQUEST,
            Some("pass `repo`: the repository's directory in the sandbox"),
        ),
        GitError::AuthFailed { .. } => (
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("store a credential for the remote's host (`kiln git-credential add HOST`) or pass `credentials`"),
        ),
        GitError::NonFastForward { .. } => (StatusCode::CONFLICT, Some("pull first, then push")),
        GitError::MergeConflict { .. } => (
            StatusCode::CONFLICT,
            Some("resolve the conflicted paths, add them and commit"),
        ),
        GitError::NothingToCommit { .. } => {
            (StatusCode::CONFLICT, Some("add changes first (op `add`)"))
        }
        GitError::NotFound { .. } => (StatusCode::NOT_FOUND, None),
        GitError::Invalid(_) => (StatusCode::BAD_REQUEST, None),
        GitError::Failed { .. } => (StatusCode::UNPROCESSABLE_ENTITY, None),
        GitError::NotInstalled => (
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("create the sandbox from a template with the `git` role (e.g. base)"),
        ),
        GitError::Kilnd(_) => (StatusCode::SERVICE_UNAVAILABLE, None),
    };
    let code: &'static str = match &e {
        GitError::NotFound { .. } => "git_not_found",
        GitError::Invalid(_) => "invalid_argument",
        other => other.code(),
    };
    let detail = match &e {
        GitError::MergeConflict { message, .. } | GitError::NotARepository { message, .. } => {
            format!("{e}: {message}")
        }
        _ => e.to_string(),
    };
    let err = ApiError::new(status, code, detail);
    match hint {
        Some(h) => err.hint(h),
        None => err,
    }
}

async fn git(
    State(k): State<AppState>,
    Extension(c): Extension<Caller>,
    request_id: Option<Extension<crate::http::RequestId>>,
    Path((id, op)): Path<(String, String)>,
    ApiJson(mut r): ApiJson<GitRequest>,
) -> ApiResult<Response> {
    let client = k.client(&c, &id).await?;
    if matches!(op.as_str(), "clone" | "push" | "pull") {
        // The call's own credentials first, then the organisation's stored ones.
        r.credentials
            .extend(crate::gitcreds::stored_credentials(&k, &c).await?);
    }
    let g = Git::new(client, r.user.clone());
    let repo = || {
        r.repo.clone().ok_or_else(|| {
            ApiError::invalid(format!(
                "git {op} needs `repo` (the repository's directory)"
            ))
        })
    };
    // The call's author, else the organisation's default (only commit and pull need one).
    let author = || async {
        match r.author.clone() {
            Some(a) => Ok::<Identity, ApiError>(a),
            None => crate::gitcreds::default_author(&k, &c.org_id).await,
        }
    };
    let remote = r.remote.clone().unwrap_or_else(|| "origin".into());
    metrics::counter!("kiln_git_ops_total", "op" => op.clone()).increment(1);
    let result: ApiResult<Value> = async {
        Ok(match op.as_str() {
            "clone" => {
                let url = r
                    .url
                    .clone()
                    .ok_or_else(|| ApiError::invalid("git clone needs `url`"))?;
                let cwd = r.repo.clone().unwrap_or_else(|| "/workspace".into());
                json!(g
                    .clone(
                        &cwd,
                        &url,
                        r.dir.as_deref(),
                        r.branch.as_deref(),
                        &r.credentials
                    )
                    .await
                    .map_err(git_error)?)
            }
            "status" => json!(g.status(&repo()?).await.map_err(git_error)?),
            "diff" => json!({"files": g.diff(&repo()?, r.staged, &r.paths).await.map_err(git_error)?}),
            "add" => json!(g.add(&repo()?, &r.paths).await.map_err(git_error)?),
            "commit" => {
                let msg = r
                    .message
                    .clone()
                    .ok_or_else(|| ApiError::invalid("git commit needs `message`"))?;
                json!(g
                    .commit(&repo()?, &msg, &author().await?, r.all)
                    .await
                    .map_err(git_error)?)
            }
            "log" => {
                json!({"commits": g.log(&repo()?, r.n.unwrap_or(20), r.branch.as_deref()).await.map_err(git_error)?})
            }
            "branches" => json!({"branches": g.branches(&repo()?).await.map_err(git_error)?}),
            "branch" => {
                let name = r
                    .branch
                    .clone()
                    .ok_or_else(|| ApiError::invalid("git branch needs `branch`"))?;
                g.create_branch(&repo()?, &name, r.start.as_deref())
                    .await
                    .map_err(git_error)?;
                json!({"branches": g.branches(&repo()?).await.map_err(git_error)?})
            }
            "checkout" => {
                let name = r
                    .branch
                    .clone()
                    .ok_or_else(|| ApiError::invalid("git checkout needs `branch`"))?;
                json!(g
                    .checkout(&repo()?, &name, r.create)
                    .await
                    .map_err(git_error)?)
            }
            "push" => json!(g
                .push(
                    &repo()?,
                    &remote,
                    r.branch.as_deref(),
                    r.set_upstream,
                    &r.credentials
                )
                .await
                .map_err(git_error)?),
            "pull" => json!(g
                .pull(
                    &repo()?,
                    &remote,
                    r.branch.as_deref(),
                    &author().await?,
                    &r.credentials
                )
                .await
                .map_err(git_error)?),
            other => return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown_operation",
                format!("unknown git operation `{other}`"),
            )
            .hint(
                "one of clone, status, diff, add, commit, log, branches, branch, checkout, push, pull",
            )),
        })
    }
    .await;
    let used = g.used_credentials();
    if !used.is_empty() {
        let rid = request_id.map(|r| r.0 .0).unwrap_or_default();
        crate::gitcreds::record_use(&k, &c, &used, &rid).await;
    }
    Ok(Json(result?).into_response())
}

// ---------------------------------------------------------------------------------------
// Language servers

/// Language-server sessions of this server (reused per sandbox, root and language; idle ones
/// are stopped after ten minutes).
pub fn lsp_manager() -> Arc<LspManager> {
    static M: OnceLock<Arc<LspManager>> = OnceLock::new();
    M.get_or_init(|| {
        let m = LspManager::new(Duration::from_secs(600));
        let weak = Arc::downgrade(&m);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(30)).await;
                match weak.upgrade() {
                    Some(m) => {
                        m.reap().await;
                    }
                    None => return,
                }
            }
        });
        m
    })
    .clone()
}

/// Body of `POST /v1/sandboxes/{id}/lsp/{op}`. Positions: 1-based line, 1-based column in
/// characters.
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LspRequest {
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub line: Option<u32>,
    #[serde(default)]
    pub column: Option<u32>,
    /// Default: from the file's extension.
    #[serde(default)]
    pub language: Option<String>,
    /// Workspace root (default `/workspace`).
    #[serde(default)]
    pub root: Option<String>,
    /// `workspace_symbols`.
    #[serde(default)]
    pub query: Option<String>,
    /// `rename`.
    #[serde(default)]
    pub new_name: Option<String>,
    /// `diagnostics`: how long to wait for the server (default 10 s).
    #[serde(default)]
    pub wait_ms: Option<u64>,
    #[serde(default)]
    pub user: Option<String>,
}

fn lsp_error(e: LspError) -> ApiError {
    match &e {
        LspError::UnknownLanguage(_) | LspError::BadPosition { .. } => {
            ApiError::invalid(e.to_string())
        }
        LspError::NotInstalled { .. } => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "language_server_missing",
            e.to_string(),
        )
        .hint(
            "create the sandbox from a template with that language (python, node, rust, polyglot)",
        ),
        LspError::File(_) => ApiError::new(StatusCode::NOT_FOUND, "file_not_found", e.to_string()),
        LspError::Timeout { .. } => ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "language_server_timeout",
            e.to_string(),
        ),
        LspError::Exited | LspError::Server { .. } => ApiError::new(
            StatusCode::BAD_GATEWAY,
            "language_server_error",
            e.to_string(),
        ),
        LspError::Kilnd(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "sandbox_unavailable",
            e.to_string(),
        ),
    }
}

async fn lsp_op(
    State(k): State<AppState>,
    Extension(c): Extension<Caller>,
    Path((id, op)): Path<(String, String)>,
    ApiJson(r): ApiJson<LspRequest>,
) -> ApiResult<Response> {
    let client = k.client(&c, &id).await?;
    let path = r.path.clone();
    let language = match (&r.language, &path) {
        (Some(l), _) => l.clone(),
        (None, Some(p)) => lsp::language_of(p)
            .ok_or_else(|| {
                ApiError::invalid(format!("cannot tell the language of {p}; pass `language`"))
            })?
            .to_string(),
        (None, None) => return Err(ApiError::invalid("pass `path` or `language`")),
    };
    let root = r.root.clone().unwrap_or_else(|| "/workspace".into());
    let need_path = || {
        path.clone()
            .ok_or_else(|| ApiError::invalid(format!("lsp {op} needs `path`")))
    };
    let pos = || -> ApiResult<(String, u32, u32)> {
        match (path.clone(), r.line, r.column) {
            (Some(p), Some(l), Some(c)) => Ok((p, l, c)),
            _ => Err(ApiError::invalid(format!(
                "lsp {op} needs `path`, `line` and `column` (1-based)"
            ))),
        }
    };
    let s = lsp_manager()
        .session(&id, &client, &language, &root, r.user.clone())
        .await
        .map_err(lsp_error)?;
    let started = std::time::Instant::now();
    let v = match op.as_str() {
        "diagnostics" => {
            let wait = Duration::from_millis(r.wait_ms.unwrap_or(10_000).min(120_000));
            json!({"diagnostics": s.diagnostics(&need_path()?, wait).await.map_err(lsp_error)?})
        }
        "definition" => {
            let (p, l, c) = pos()?;
            json!({"locations": s.definition(&p, l, c).await.map_err(lsp_error)?})
        }
        "references" => {
            let (p, l, c) = pos()?;
            json!({"locations": s.references(&p, l, c).await.map_err(lsp_error)?})
        }
        "hover" => {
            let (p, l, c) = pos()?;
            json!({"hover": s.hover(&p, l, c).await.map_err(lsp_error)?})
        }
        "completion" => {
            let (p, l, c) = pos()?;
            json!({"items": s.completion(&p, l, c).await.map_err(lsp_error)?})
        }
        "symbols" => json!({"symbols": s.document_symbols(&need_path()?).await.map_err(lsp_error)?}),
        "workspace_symbols" => json!({"symbols": s.workspace_symbols(r.query.as_deref().unwrap_or("")).await.map_err(lsp_error)?}),
        "rename" => {
            let (p, l, c) = pos()?;
            let n = r.new_name.clone().ok_or_else(|| ApiError::invalid("lsp rename needs `new_name`"))?;
            json!({"edits": s.rename_preview(&p, l, c, &n).await.map_err(lsp_error)?, "applied": false})
        }
        other => {
            return Err(ApiError::new(StatusCode::NOT_FOUND, "unknown_operation", format!("unknown lsp operation `{other}`"))
                .hint("one of diagnostics, definition, references, hover, completion, symbols, workspace_symbols, rename"))
        }
    };
    metrics::histogram!("kiln_lsp_request_seconds", "op" => op.clone())
        .record(started.elapsed().as_secs_f64());
    Ok(Json(v).into_response())
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub(crate) struct LspWsQuery {
    language: String,
    #[serde(default)]
    root: Option<String>,
    #[serde(default)]
    user: Option<String>,
}

/// `GET /v1/sandboxes/{id}/lsp/ws?language=python[&root=/workspace]`: a WebSocket carrying raw
/// LSP JSON-RPC, one message per text frame, to a language server of its own (started for
/// this connection, stopped when it closes) — what an editor such as Monaco talks to.
async fn lsp_ws(
    State(k): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<LspWsQuery>,
    ws: Option<WebSocketUpgrade>,
) -> ApiResult<Response> {
    let client = k.client(&c, &id).await?;
    let ws = ws.ok_or_else(|| {
        ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            "websocket_required",
            "this endpoint speaks WebSocket",
        )
        .hint("connect with a WebSocket client (ws://.../v1/sandboxes/ID/lsp/ws?language=python)")
    })?;
    let (lang, cmd) = lsp::server_command(&q.language).map_err(lsp_error)?;
    let pipe = client
        .pipe(kiln_protocol::kilnd::ExecSpec {
            cmd: cmd.clone(),
            cwd: Some(q.root.clone().unwrap_or_else(|| "/workspace".into())),
            user: q.user.clone(),
            tag: Some(format!("lsp-ws-{lang}")),
            ..Default::default()
        })
        .await
        .map_err(|e| match e.code() {
            Some(kiln_protocol::kilnd::DaemonErrorCode::CommandNotFound) => {
                lsp_error(LspError::NotInstalled {
                    language: lang.to_string(),
                    command: cmd.join(" "),
                })
            }
            _ => ApiError::from(e),
        })?;
    Ok(ws.on_upgrade(move |socket| pump_lsp(socket, pipe)))
}

async fn pump_lsp(socket: WebSocket, pipe: kilnd::client::Tunnel) {
    let (mut tx, mut rx) = socket.split();
    let (rd, mut wr) = tokio::io::split(pipe);
    let to_server = async move {
        while let Some(Ok(m)) = rx.next().await {
            let text = match m {
                Message::Text(t) => t,
                Message::Binary(b) => String::from_utf8_lossy(&b).into_owned(),
                Message::Close(_) => break,
                _ => continue,
            };
            let Ok(v) = serde_json::from_str::<Value>(&text) else {
                continue;
            };
            if tokio::io::AsyncWriteExt::write_all(&mut wr, &lsp::frame_message(&v))
                .await
                .is_err()
            {
                break;
            }
        }
    };
    let from_server = async move {
        let mut rd = tokio::io::BufReader::new(rd);
        while let Ok(Some(v)) = lsp::read_message(&mut rd).await {
            if tx.send(Message::Text(v.to_string())).await.is_err() {
                break;
            }
        }
        let _ = tx.send(Message::Close(None)).await;
    };
    tokio::select! {
        () = to_server => {}
        () = from_server => {}
    }
}
