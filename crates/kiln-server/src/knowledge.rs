//! Knowledge endpoints under `/v1/indexes`: create, list, inspect (stats), sync (NDJSON
//! progress), remove, search and context, over `kiln_knowledge::Engine`. Every index belongs
//! to the caller's organisation: another org's index is the same 404 as a missing one.
//!
//! Sources: a host directory (system organisation only), a git URL (checked against the
//! caller's [`GitPolicy`]), or a sandbox of the caller's organisation, read through its kilnd
//! ([`SandboxTree`]) and followed live: a follower task per sandbox index holds a recursive
//! kilnd watch on the indexed path and syncs the changed files a moment after they change.
//! When the sandbox is removed the index is kept (search answers from what it last saw), the
//! follower stops, `stats` shows `source_error`, and a sync answers 409 `source_gone`.
//!
//! Encrypted indexes (`encrypted: true`) are sealed with their organisation's key, derived
//! from the server secret (`<data dir>/secret`).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use kiln_knowledge::engine::Source;
use kiln_knowledge::git::GitPolicy;
use kiln_knowledge::search::Mode;
use kiln_knowledge::source::{Entry, EntryKind, Tree};
use kiln_knowledge::{
    CreateOptions, EmbedConfig, Engine, Error, Language, SearchParams, SymbolKind,
};
use kiln_protocol::api::SandboxState;
use kiln_protocol::kilnd::{DaemonErrorCode, FileKind, WatchKind};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::error::{ApiError, ApiJson};
use crate::service::{AppState, Caller, Kiln};

/// The knowledge routes (mounted under `/v1`, behind authentication).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/indexes", post(create).get(list))
        .route("/indexes/:name", get(stats).delete(remove))
        .route("/indexes/:name/sync", post(sync))
        .route("/indexes/:name/search", post(search))
        .route("/indexes/:name/context", post(context))
}

/// The knowledge state of one data directory: its engine and the followers of its sandbox
/// indexes. One per data directory (a test process runs several servers, one after another
/// on the same directory too: an index's files are opened by one engine only).
struct Knowledge {
    engine: Engine,
    /// Stops every follower when the server that started them shuts down.
    shutdown: Mutex<CancellationToken>,
    /// (organisation, index) -> (follower number, its stop token).
    followers: Mutex<HashMap<(String, String), (u64, CancellationToken)>>,
}

fn knowledge(k: &Kiln) -> Result<Arc<Knowledge>, ApiError> {
    static ALL: OnceLock<Mutex<HashMap<PathBuf, Arc<Knowledge>>>> = OnceLock::new();
    let mut m = ALL
        .get_or_init(Default::default)
        .lock()
        .map_err(|_| ApiError::internal("knowledge engine lock poisoned"))?;
    if let Some(e) = m.get(&k.cfg.data_dir) {
        return Ok(e.clone());
    }
    let models = kiln_knowledge::embed::model_dir(&k.cfg.data_dir);
    let e = Engine::new(&k.cfg.data_dir.join("knowledge"), &models).map_err(api_err)?;
    e.set_master_key(kiln_knowledge::seal::MasterKey::from_secret(
        &k.hasher.derive("kiln knowledge"),
    ));
    let kn = Arc::new(Knowledge {
        engine: e,
        shutdown: Mutex::new(CancellationToken::new()),
        followers: Mutex::new(HashMap::new()),
    });
    m.insert(k.cfg.data_dir.clone(), kn.clone());
    Ok(kn)
}

fn engine(k: &Kiln) -> Result<Engine, ApiError> {
    Ok(knowledge(k)?.engine.clone())
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
        Error::Forbidden(m) => ApiError::new(StatusCode::FORBIDDEN, "source_forbidden", m).hint(
            "tenants may index public https://, http:// or git:// URLs and their own sandboxes (the operator may allow private git hosts with `kiln up --git-private-hosts`)",
        ),
        Error::Source(m) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "source_unreadable", m)
            .hint("the source must stay reachable by the server: a readable directory, a git URL it can fetch, a running sandbox"),
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
    /// An absolute directory on the server's host (system organisation only); with `sandbox`,
    /// the directory inside the sandbox (default `/workspace`).
    path: Option<String>,
    /// A git URL (https://, http://, git://; the system organisation may also use SSH, file://
    /// and local paths), fetched shallow by the server.
    git: Option<String>,
    /// With `git`: the branch or tag (default: the remote's HEAD).
    #[serde(default, rename = "ref")]
    git_ref: Option<String>,
    /// A sandbox of the caller's organisation, followed live.
    sandbox: Option<String>,
    /// Encrypt chunk text, symbols, paths, vectors and the BM25 files at rest with the
    /// organisation's key.
    #[serde(default)]
    encrypted: bool,
    /// The embedding provider (default: the local model).
    #[serde(default)]
    #[schemars(with = "Option<serde_json::Value>")]
    embed: Option<EmbedConfig>,
}

/// The most bytes a sync reads of one sandbox file (the walk's size limit is 1 MiB).
const MAX_READ: u64 = 4 << 20;

/// A sandbox directory, read through its kilnd (blocking calls on the server's runtime).
struct SandboxTree {
    client: kilnd::client::Client,
    sandbox: String,
    root: String,
    rt: tokio::runtime::Handle,
}

impl SandboxTree {
    fn abs(&self, rel: &str) -> String {
        if rel.is_empty() {
            self.root.clone()
        } else {
            format!("{}/{rel}", self.root.trim_end_matches('/'))
        }
    }
}

fn io_err(e: kilnd::client::ClientError) -> std::io::Error {
    let kind = match e.code() {
        Some(DaemonErrorCode::NotFound) => std::io::ErrorKind::NotFound,
        Some(DaemonErrorCode::PermissionDenied) => std::io::ErrorKind::PermissionDenied,
        // Transport failures too: the walk stops rather than skip what it could not list.
        _ => std::io::ErrorKind::Other,
    };
    std::io::Error::new(kind, e.to_string())
}

impl Tree for SandboxTree {
    fn describe(&self) -> String {
        format!("sandbox {}:{}", self.sandbox, self.root)
    }

    fn list(&self, dir: &str) -> std::io::Result<Vec<Entry>> {
        let entries = self
            .rt
            .block_on(self.client.list_dir(&self.abs(dir), 1))
            .map_err(io_err)?;
        Ok(entries
            .into_iter()
            .map(|f| Entry {
                name: f.name,
                kind: match f.kind {
                    FileKind::File => EntryKind::File,
                    FileKind::Dir => EntryKind::Dir,
                    _ => EntryKind::Other,
                },
                size: f.size,
                stamp: (f.modified_ms as i64).saturating_mul(1_000_000),
            })
            .collect())
    }

    fn read(&self, rel: &str) -> std::io::Result<Vec<u8>> {
        self.rt.block_on(async {
            let (stat, mut data) = self
                .client
                .read_file(&self.abs(rel))
                .await
                .map_err(io_err)?;
            let mut out = Vec::with_capacity(stat.size.min(MAX_READ) as usize);
            while let Some(chunk) = data.next_chunk().await {
                out.extend_from_slice(&chunk?);
                // The walk skipped large files; one that grew since is skipped too.
                if out.len() as u64 > MAX_READ {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("{rel} grew past {MAX_READ} bytes while being read"),
                    ));
                }
            }
            Ok(out)
        })
    }
}

fn source_gone(name: &str, sandbox: &str) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "source_gone",
        format!(
            "sandbox `{sandbox}` of index `{name}` was removed; the index keeps what it last indexed and can still be searched"
        ),
    )
    .hint(format!(
        "`kiln index rm {name}` erases it; index another sandbox with `kiln index create NAME --sandbox ID`"
    ))
}

/// The tree of a sandbox source for `caller`: the sandbox must be one of its org's, on this
/// server and running. A removed sandbox is `source_gone` (and recorded on the index).
async fn sandbox_tree(
    k: &Kiln,
    e: &Engine,
    caller: &Caller,
    name: &str,
    sandbox: &str,
    path: &str,
) -> Result<SandboxTree, ApiError> {
    let org = caller.org_id.as_str();
    match k.client(caller, sandbox).await {
        Ok(client) => Ok(SandboxTree {
            client,
            sandbox: sandbox.to_string(),
            root: path.to_string(),
            rt: tokio::runtime::Handle::current(),
        }),
        Err(err) if err.code == "sandbox_not_found" => {
            let (e, o, n) = (e.clone(), org.to_string(), name.to_string());
            let why = format!("sandbox `{sandbox}` was removed");
            let _ = blocking(move || e.set_source_error(&o, &n, Some(&why))).await;
            Err(source_gone(name, sandbox))
        }
        Err(err) => Err(err),
    }
}

async fn create(
    State(k): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiJson(req): ApiJson<CreateIndex>,
) -> Result<Response, ApiError> {
    if req.git_ref.is_some() && req.git.is_none() {
        return Err(ApiError::invalid("`ref` goes with a `git` source").hint(
            "e.g. {\"name\":\"app\",\"git\":\"https://example.com/app.git\",\"ref\":\"main\"}",
        ));
    }
    let source =
        match (req.path, req.git, req.sandbox) {
            // A host directory is the operator's to give: a tenant must not read the server's
            // files through an index.
            (Some(_), None, None) if !caller.system => return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "source_forbidden",
                "only keys of the system organisation may index a directory of the server's host",
            )
            .hint("ask the operator to index it for you, or index a git URL or a sandbox")),
            (Some(path), None, None) => Source::Path { path },
            (None, Some(url), None) => Source::Git {
                url,
                git_ref: req.git_ref,
            },
            (path, None, Some(sandbox)) => {
                let path = path.unwrap_or_else(|| "/workspace".to_string());
                if !path.starts_with('/') || path.contains('\0') {
                    return Err(ApiError::invalid(format!(
                        "sandbox path `{path}` must be absolute"
                    ))
                    .hint("e.g. /workspace"));
                }
                // The caller's own sandbox only (another org's is a 404), running on this server.
                let client = k.client(&caller, &sandbox).await?;
                match client.stat(&path).await {
                    Ok(st) if st.kind == FileKind::Dir => {}
                    Ok(_) => {
                        return Err(ApiError::invalid(format!(
                            "`{path}` in sandbox `{sandbox}` is not a directory"
                        )))
                    }
                    Err(err) if err.code() == Some(DaemonErrorCode::NotFound) => {
                        return Err(ApiError::invalid(format!(
                            "sandbox `{sandbox}` has no directory `{path}`"
                        ))
                        .hint("create it first, or give another --path"))
                    }
                    Err(err) => return Err(k.daemon_error(&sandbox, err).await),
                }
                Source::Sandbox {
                    sandbox,
                    // kilnd's normal form (no trailing or doubled slashes).
                    path: format!(
                        "/{}",
                        path.split('/')
                            .filter(|c| !c.is_empty() && *c != ".")
                            .collect::<Vec<_>>()
                            .join("/")
                    ),
                }
            }
            _ => {
                return Err(
                    ApiError::invalid("give exactly one source: path, git or sandbox")
                        .hint("e.g. {\"name\":\"app\",\"git\":\"https://example.com/app.git\"}"),
                )
            }
        };
    let opts = CreateOptions {
        encrypted: req.encrypted,
        git: if caller.system {
            GitPolicy::TRUSTED
        } else {
            GitPolicy {
                allow_local: false,
                allow_private_hosts: k.cfg.git_private_hosts,
            }
        },
    };
    let kn = knowledge(&k)?;
    let e = kn.engine.clone();
    let embed = req.embed.unwrap_or(EmbedConfig::Local);
    let org = caller.org_id.clone();
    let name = req.name.clone();
    let follow = source.clone();
    let is_git = matches!(source, Source::Git { .. });
    let info = blocking(move || e.create_with(&org, &req.name, source, embed, opts))
        .await
        .map_err(|err| match err.hint {
            None if is_git && err.code == "invalid_argument" => err.hint(
                "give a git URL such as https://git.example.com/org/repo.git and, with `ref`, a branch or tag name",
            ),
            _ => err,
        })?;
    if let Source::Sandbox { sandbox, path } = follow {
        start_follower(&k, &kn, &caller.org_id, &name, &sandbox, &path, false);
    }
    Ok((StatusCode::CREATED, Json(info)).into_response())
}

/// Starts the followers of every sandbox index whose sandbox was not found gone (at server
/// start; they stop when `shutdown` fires).
pub fn start_followers(k: &AppState, shutdown: CancellationToken) {
    if !k.cfg.data_dir.join("knowledge").is_dir() {
        return;
    }
    let kn = match knowledge(k) {
        Ok(kn) => kn,
        Err(e) => {
            tracing::warn!(error = %e.message, "knowledge: cannot start followers");
            return;
        }
    };
    if let Ok(mut s) = kn.shutdown.lock() {
        *s = shutdown;
    }
    match kn.engine.sources_all() {
        Ok(all) => {
            for (org, cfg) in all {
                if let Source::Sandbox { sandbox, path } = &cfg.source {
                    // Changes made while the server was down are caught up with a sync.
                    start_follower(k, &kn, &org, &cfg.name, sandbox, path, true);
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "knowledge: cannot list indexes"),
    }
}

fn start_follower(
    k: &AppState,
    kn: &Arc<Knowledge>,
    org: &str,
    name: &str,
    sb: &str,
    path: &str,
    catch_up: bool,
) {
    let parent = match kn.shutdown.lock() {
        Ok(s) => s.clone(),
        Err(_) => return,
    };
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let token = parent.child_token();
    if let Ok(mut f) = kn.followers.lock() {
        if let Some((_, old)) = f.insert((org.to_string(), name.to_string()), (id, token.clone())) {
            old.cancel();
        }
    }
    let (k, kn) = (k.clone(), kn.clone());
    let (org, name, sb, path) = (
        org.to_string(),
        name.to_string(),
        sb.to_string(),
        path.to_string(),
    );
    tokio::spawn(async move {
        follow(&k, &kn.engine, &org, &name, &sb, &path, catch_up, &token).await;
        // Unless a newer follower took its place.
        if let Ok(mut f) = kn.followers.lock() {
            let key = (org, name);
            if f.get(&key).is_some_and(|(n, _)| *n == id) {
                f.remove(&key);
            }
        }
    });
}

fn stop_follower(kn: &Knowledge, org: &str, name: &str) {
    if let Ok(mut f) = kn.followers.lock() {
        if let Some((_, t)) = f.remove(&(org.to_string(), name.to_string())) {
            t.cancel();
        }
    }
}

/// Whether the follower of `org`/`name` is running.
fn following(kn: &Knowledge, org: &str, name: &str) -> bool {
    kn.followers
        .lock()
        .map(|f| {
            f.get(&(org.to_string(), name.to_string()))
                .is_some_and(|(_, t)| !t.is_cancelled())
        })
        .unwrap_or(false)
}

/// Quiet time after a change before the follower syncs (edits come in bursts).
const SETTLE: Duration = Duration::from_millis(150);
/// The longest a burst of changes delays a sync.
const SETTLE_MAX: Duration = Duration::from_secs(2);

/// Keeps a sandbox index current: a recursive kilnd watch on the indexed path; after a burst
/// of changes (outside vendored and build directories) a sync that re-reads the changed files.
/// The watch is re-armed (and the index re-synced, changes may have been missed) when it
/// breaks: a paused sandbox, a kilnd restart. Ends when the sandbox or the index is removed,
/// or the server stops. With `catch_up` (a server start), the first arming syncs too.
#[allow(clippy::too_many_arguments)]
async fn follow(
    k: &Kiln,
    e: &Engine,
    org: &str,
    name: &str,
    sb: &str,
    path: &str,
    catch_up: bool,
    stop: &CancellationToken,
) {
    let mut backoff = Duration::from_millis(500);
    let mut rearmed = catch_up;
    loop {
        if stop.is_cancelled() {
            return;
        }
        let row = match k.org_sandbox_row(org, sb).await {
            Ok(row) => row,
            Err(err) if err.code == "sandbox_not_found" => {
                let (e, o, n) = (e.clone(), org.to_string(), name.to_string());
                let why = format!("sandbox `{sb}` was removed");
                let _ = blocking(move || e.set_source_error(&o, &n, Some(&why))).await;
                tracing::info!(index = %name, sandbox = %sb, "knowledge: the followed sandbox was removed; the index is kept");
                return;
            }
            Err(_) => {
                tokio::select! { _ = stop.cancelled() => return, _ = tokio::time::sleep(backoff) => {} }
                continue;
            }
        };
        if row.sandbox.state != SandboxState::Running || row.host != k.store.host() {
            tokio::select! { _ = stop.cancelled() => return, _ = tokio::time::sleep(backoff) => {} }
            backoff = (backoff * 2).min(Duration::from_secs(30));
            continue;
        }
        let client = k.runtime.client(sb);
        let mut watch = match client.watch(path, true).await {
            Ok(w) => w,
            Err(err) => {
                tracing::debug!(index = %name, error = %err, "knowledge: watch failed; retrying");
                tokio::select! { _ = stop.cancelled() => return, _ = tokio::time::sleep(backoff) => {} }
                backoff = (backoff * 2).min(Duration::from_secs(30));
                rearmed = true;
                continue;
            }
        };
        backoff = Duration::from_millis(500);
        let tree = Arc::new(SandboxTree {
            client,
            sandbox: sb.to_string(),
            root: path.to_string(),
            rt: tokio::runtime::Handle::current(),
        });
        if rearmed {
            // Changes made while the watch was down are found by a full (mtime) sync.
            follow_sync(e, org, name, &tree, HashSet::new()).await;
        }
        rearmed = true;
        'events: loop {
            let mut changed: HashSet<String> = HashSet::new();
            let mut any = false;
            let first = tokio::select! {
                _ = stop.cancelled() => return,
                ev = watch.next() => ev,
            };
            let mut next = first;
            let burst = tokio::time::Instant::now();
            loop {
                match next {
                    Some(Ok(ev)) if ev.kind == WatchKind::Overflow => any = true,
                    Some(Ok(ev)) => {
                        if let Some(rel) = relevant(path, &ev.path, ev.is_dir) {
                            any = true;
                            if !ev.is_dir {
                                changed.insert(rel);
                            }
                        }
                    }
                    // The watch broke: sync what was seen, then re-arm.
                    Some(Err(_)) | None => {
                        if any {
                            follow_sync(e, org, name, &tree, changed).await;
                        }
                        break 'events;
                    }
                }
                if burst.elapsed() > SETTLE_MAX {
                    break;
                }
                next = tokio::select! {
                    _ = stop.cancelled() => return,
                    ev = watch.next() => ev,
                    _ = tokio::time::sleep(SETTLE) => break,
                };
            }
            if any && !follow_sync(e, org, name, &tree, changed).await {
                return;
            }
        }
    }
}

/// The path of a watch event relative to the indexed root, unless it lies in a directory a
/// walk skips (`node_modules`, `target`, `.git` ...) or outside the root.
fn relevant(root: &str, abs: &str, is_dir: bool) -> Option<String> {
    let rel = if root == "/" {
        abs.trim_start_matches('/')
    } else {
        abs.strip_prefix(root)?.strip_prefix('/').unwrap_or("")
    };
    let parts: Vec<&str> = rel.split('/').collect();
    let dirs = if is_dir {
        &parts[..]
    } else {
        &parts[..parts.len().saturating_sub(1)]
    };
    if dirs.iter().any(|p| kiln_knowledge::walk::skipped_dir(p)) {
        return None;
    }
    Some(rel.to_string())
}

/// One follower sync; false when the index is gone (the follower stops).
async fn follow_sync(
    e: &Engine,
    org: &str,
    name: &str,
    tree: &Arc<SandboxTree>,
    force: HashSet<String>,
) -> bool {
    let (e, o, n, t) = (e.clone(), org.to_string(), name.to_string(), tree.clone());
    let r =
        tokio::task::spawn_blocking(move || e.sync_from(&o, &n, Some(t.as_ref()), &force, &|_| {}))
            .await;
    match r {
        Ok(Ok(report)) => {
            metrics::counter!("kiln_knowledge_follow_syncs_total").increment(1);
            tracing::debug!(index = %name, changed = report.added + report.changed + report.deleted, "knowledge: followed a change");
            true
        }
        Ok(Err(Error::NotFound(_))) => false,
        Ok(Err(err)) => {
            tracing::warn!(index = %name, error = %err, "knowledge: follower sync failed");
            true
        }
        Err(_) => true,
    }
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
    let kn = knowledge(&k)?;
    let e = kn.engine.clone();
    let (org, n2) = (caller.org_id.clone(), name.clone());
    let stats = blocking(move || e.stats(&org, &n2)).await?;
    let mut v = serde_json::to_value(&stats).map_err(|e| ApiError::internal(e.to_string()))?;
    if matches!(stats.info.source, Source::Sandbox { .. }) {
        v["following"] = serde_json::Value::Bool(following(&kn, &caller.org_id, &name));
    }
    Ok(Json(v).into_response())
}

async fn remove(
    State(k): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let kn = knowledge(&k)?;
    let e = kn.engine.clone();
    let (org, n2) = (caller.org_id.clone(), name.clone());
    // Checked first: another org's index is a 404, and its follower is not touched.
    blocking(move || e.info(&org, &n2).map(|_| ())).await?;
    stop_follower(&kn, &caller.org_id, &name);
    let e = kn.engine.clone();
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
    let info = blocking(move || e2.info(&org, &n2)).await?;
    let tree = match &info.source {
        Source::Sandbox { sandbox, path } => {
            Some(sandbox_tree(&k, &e, &caller, &name, sandbox, path).await?)
        }
        _ => None,
    };
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<serde_json::Value>();
    tokio::task::spawn_blocking(move || {
        let tx2 = tx.clone();
        let progress = move |p: kiln_knowledge::engine::SyncProgress| {
            let _ =
                tx2.send(serde_json::json!({"type": "progress", "done": p.done, "total": p.total}));
        };
        let tree = tree.as_ref().map(|t| t as &dyn Tree);
        let line = match e.sync_from(&caller.org_id, &name, tree, &HashSet::new(), &progress) {
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

/// The knowledge tools of agent runs (`knowledge_search`, `knowledge_context`): this
/// server's engine, scoped to the run's organisation like the API is to a caller's.
pub(crate) struct AgentKnowledge {
    pub(crate) kiln: std::sync::Weak<Kiln>,
}

impl AgentKnowledge {
    fn engine(&self) -> Result<Engine, String> {
        let k = self
            .kiln
            .upgrade()
            .ok_or_else(|| "the server is shutting down".to_string())?;
        engine(&k).map_err(ApiError::into_text)
    }
}

#[async_trait::async_trait]
impl kiln_agent::knowledge::Knowledge for AgentKnowledge {
    async fn indexes(&self, org_id: &str) -> Result<Vec<String>, String> {
        let e = self.engine()?;
        let org = org_id.to_string();
        let list = blocking(move || e.list(&org))
            .await
            .map_err(ApiError::into_text)?;
        Ok(list.into_iter().map(|i| i.name).collect())
    }

    async fn search(
        &self,
        org_id: &str,
        index: &str,
        a: &kiln_agent::knowledge::KnowledgeSearch,
    ) -> Result<Vec<kiln_agent::knowledge::KnowledgeHit>, String> {
        let p = params(SearchReq {
            query: a.query.clone(),
            k: a.k,
            lang: a.lang.clone(),
            path: a.path.clone(),
            kind: None,
            mode: None,
        })
        .map_err(ApiError::into_text)?;
        let e = self.engine()?;
        let (org, name) = (org_id.to_string(), index.to_string());
        let hits = blocking(move || e.search(&org, &name, &p))
            .await
            .map_err(ApiError::into_text)?;
        Ok(hits
            .into_iter()
            .map(|h| kiln_agent::knowledge::KnowledgeHit {
                path: h.path,
                start_line: h.start_line,
                end_line: h.end_line,
                symbol: h.symbol,
                score: h.score,
                text: h.text,
            })
            .collect())
    }

    async fn context(
        &self,
        org_id: &str,
        index: &str,
        query: &str,
        tokens: usize,
    ) -> Result<String, String> {
        let e = self.engine()?;
        let (org, name, q) = (org_id.to_string(), index.to_string(), query.to_string());
        let c = blocking(move || e.context(&org, &name, &q, tokens, true))
            .await
            .map_err(ApiError::into_text)?;
        Ok(c.render())
    }
}
