//! The axum router: `fn app(state)` and the handlers of `/v1`. Handlers are thin: they parse,
//! call [`crate::service::Kiln`] or a sandbox's kilnd client, and shape the answer.

use std::time::Instant;

use axum::body::Body;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use base64::Engine as _;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt, TryStreamExt};
use kiln_protocol::api::{
    CreateSandbox, ExecEvent, ExecRequest, FileList, Health, MkdirRequest, MoveRequest,
    ProcessList, ProcessStarted, PtyMessage, SandboxList, SignalArg, SignalRequest, StreamKind,
};
use kiln_protocol::kilnd::{ExecSpec, PtySpec, Reply};
use serde::Deserialize;

use crate::error::{ApiError, ApiJson, ApiQuery};
use crate::service::{AppState, Caller};

/// Builds the whole HTTP application for a server state.
pub fn app(state: AppState) -> Router {
    let v1 = Router::new()
        .route("/sandboxes", post(create_sandbox).get(list_sandboxes))
        .route("/sandboxes/:id", get(get_sandbox).delete(delete_sandbox))
        .route("/sandboxes/:id/pause", post(pause_sandbox))
        .route("/sandboxes/:id/resume", post(resume_sandbox))
        .route("/sandboxes/:id/exec", post(exec))
        .route(
            "/sandboxes/:id/processes",
            post(start_process).get(list_processes),
        )
        .route("/sandboxes/:id/processes/:pid/output", get(attach_process))
        .route("/sandboxes/:id/processes/:pid/stdin", post(process_stdin))
        .route("/sandboxes/:id/processes/:pid/signal", post(process_signal))
        .route(
            "/sandboxes/:id/files",
            get(download).put(upload).delete(remove_file),
        )
        .route("/sandboxes/:id/files/stat", get(stat_file))
        .route("/sandboxes/:id/files/list", get(list_files))
        .route("/sandboxes/:id/files/mkdir", post(mkdir))
        .route("/sandboxes/:id/files/move", post(move_file))
        .route("/sandboxes/:id/files/watch", get(watch))
        .route("/sandboxes/:id/pty", get(pty))
        .merge(crate::templates::routes())
        .merge(crate::devtools::routes())
        .merge(crate::agents::routes())
        .merge(crate::knowledge::routes())
        .merge(crate::ssh::keys::routes())
        .merge(crate::gitcreds::routes())
        .merge(crate::preview::routes())
        .route("/me", get(crate::admin::me))
        .route(
            "/orgs",
            get(crate::admin::list_orgs).post(crate::admin::create_org),
        )
        .route("/orgs/:org", get(crate::admin::get_org))
        .route(
            "/orgs/:org/quota",
            get(crate::admin::get_quota).put(crate::admin::set_quota),
        )
        .route(
            "/orgs/:org/rate-limits",
            get(crate::admin::get_rate_limits).put(crate::admin::set_rate_limits),
        )
        .route(
            "/keys",
            get(crate::admin::list_keys).post(crate::admin::create_key),
        )
        .route("/keys/:id", axum::routing::delete(crate::admin::revoke_key))
        .route("/audit", get(crate::admin::list_audit))
        .route("/usage", get(crate::metering::usage_report))
        .route("/usage/events", get(crate::metering::usage_events))
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .route("/health", get(health));
    Router::new()
        .nest("/v1", v1)
        .route("/metrics", get(metrics_endpoint))
        .route("/openapi.json", get(crate::openapi::serve))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "route_not_found", "no such endpoint")
                .hint("the API lives under /v1; see README for the routes")
        })
        .layer(middleware::from_fn_with_state(
            state.clone(),
            crate::preview::host_router,
        ))
        .layer(middleware::from_fn(track))
        .with_state(state)
}

/// Every authenticated route as (method, pattern): the isolation matrix and the permission
/// table test walk this list. A new route goes here too.
pub const ROUTES: &[(&str, &str)] = &[
    ("POST", "/v1/sandboxes"),
    ("GET", "/v1/sandboxes"),
    ("GET", "/v1/sandboxes/:id"),
    ("DELETE", "/v1/sandboxes/:id"),
    ("POST", "/v1/sandboxes/:id/pause"),
    ("POST", "/v1/sandboxes/:id/resume"),
    ("POST", "/v1/sandboxes/:id/exec"),
    ("POST", "/v1/sandboxes/:id/processes"),
    ("GET", "/v1/sandboxes/:id/processes"),
    ("GET", "/v1/sandboxes/:id/processes/:pid/output"),
    ("POST", "/v1/sandboxes/:id/processes/:pid/stdin"),
    ("POST", "/v1/sandboxes/:id/processes/:pid/signal"),
    ("GET", "/v1/sandboxes/:id/files"),
    ("PUT", "/v1/sandboxes/:id/files"),
    ("DELETE", "/v1/sandboxes/:id/files"),
    ("GET", "/v1/sandboxes/:id/files/stat"),
    ("GET", "/v1/sandboxes/:id/files/list"),
    ("POST", "/v1/sandboxes/:id/files/mkdir"),
    ("POST", "/v1/sandboxes/:id/files/move"),
    ("GET", "/v1/sandboxes/:id/files/watch"),
    ("GET", "/v1/sandboxes/:id/pty"),
    ("GET", "/v1/sandboxes/:id/egress"),
    ("PUT", "/v1/sandboxes/:id/egress"),
    ("GET", "/v1/sandboxes/:id/ports"),
    ("GET", "/v1/sandboxes/:id/ports/:port"),
    ("GET", "/v1/sandboxes/:id/ports/:port/"),
    ("GET", "/v1/sandboxes/:id/ports/:port/*path"),
    ("POST", "/v1/sandboxes/:id/previews/:port/token"),
    ("POST", "/v1/sandboxes/:id/git/:op"),
    ("POST", "/v1/sandboxes/:id/lsp/:op"),
    ("GET", "/v1/sandboxes/:id/lsp/ws"),
    ("GET", "/v1/templates"),
    ("GET", "/v1/templates/:name"),
    ("PUT", "/v1/templates/:name"),
    ("DELETE", "/v1/templates/:name"),
    ("POST", "/v1/templates/:name/build"),
    ("POST", "/v1/templates/gc"),
    ("GET", "/v1/me"),
    ("GET", "/v1/orgs"),
    ("POST", "/v1/orgs"),
    ("GET", "/v1/orgs/:org"),
    ("GET", "/v1/orgs/:org/quota"),
    ("PUT", "/v1/orgs/:org/quota"),
    ("GET", "/v1/orgs/:org/rate-limits"),
    ("PUT", "/v1/orgs/:org/rate-limits"),
    ("GET", "/v1/keys"),
    ("POST", "/v1/keys"),
    ("DELETE", "/v1/keys/:id"),
    ("GET", "/v1/audit"),
    ("GET", "/v1/usage"),
    ("GET", "/v1/usage/events"),
    ("POST", "/v1/agents"),
    ("GET", "/v1/agents"),
    ("GET", "/v1/agents/:id"),
    ("GET", "/v1/agents/:id/events"),
    ("POST", "/v1/agents/:id/approvals/:call"),
    ("POST", "/v1/agents/:id/stop"),
    ("POST", "/v1/indexes"),
    ("GET", "/v1/indexes"),
    ("GET", "/v1/indexes/:name"),
    ("DELETE", "/v1/indexes/:name"),
    ("POST", "/v1/indexes/:name/sync"),
    ("POST", "/v1/indexes/:name/search"),
    ("POST", "/v1/indexes/:name/context"),
    ("GET", "/v1/ssh"),
    ("GET", "/v1/ssh-keys"),
    ("POST", "/v1/ssh-keys"),
    ("DELETE", "/v1/ssh-keys/:id"),
    ("GET", "/v1/git-credentials"),
    ("POST", "/v1/git-credentials"),
    ("DELETE", "/v1/git-credentials/:id"),
    ("GET", "/v1/orgs/:org/git"),
    ("PUT", "/v1/orgs/:org/git"),
];

/// The request id of a request (`x-request-id`), set by [`track`].
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// The single authentication and authorisation layer: resolves the bearer key to a
/// [`Caller`] (no cache: a revoked key fails on its next request), checks the route's
/// permission from [`crate::tenancy::required`], and appends every mutating call and every
/// refusal to the audit log. Handlers receive the [`Caller`] and never read credentials.
async fn auth(State(k): State<AppState>, mut req: Request, next: Next) -> Response {
    use crate::tenancy::{required, Need};
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let method = req.method().clone();
    // The full path (inside the nested `/v1` router `uri()` has the prefix stripped).
    let resource = req
        .extensions()
        .get::<axum::extract::OriginalUri>()
        .map(|u| u.0.path().to_string())
        .unwrap_or_else(|| req.uri().path().to_string());
    let client = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip().to_string())
        .unwrap_or_default();
    let request_id = req
        .extensions()
        .get::<RequestId>()
        .map(|r| r.0.clone())
        .unwrap_or_default();
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|v| v.trim().to_string());
    let (resp, org, prefix) = match k.authenticate(presented.as_deref()).await {
        Err(e) => {
            metrics::counter!("kiln_auth_failures_total").increment(1);
            let prefix = presented
                .as_deref()
                .filter(|p| crate::tenancy::looks_like_key(p))
                .map(crate::tenancy::key_prefix)
                .unwrap_or_default();
            (e.into_response(), String::new(), prefix)
        }
        Ok(c) => {
            let org = c.org_id.clone();
            let prefix = c.key_prefix.clone();
            let refusal = match required(&method, &route) {
                None => Some(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "permission_denied",
                    format!("{method} {route} has no permission rule; refused for every key"),
                )),
                Some(Need::Perm(p)) if !c.perms.has(p) => Some(
                    ApiError::new(
                        StatusCode::FORBIDDEN,
                        "permission_denied",
                        format!(
                            "this key ({}, role {}) lacks the `{p}` permission",
                            c.key_prefix,
                            c.role.as_str()
                        ),
                    )
                    .hint("use a key whose role and scopes include it (`kiln key create --role ... --scope ...`)"),
                ),
                _ => None,
            };
            match refusal {
                Some(e) => (e.into_response(), org, prefix),
                None => {
                    let bucket = crate::ratelimit::Bucket::of(&method, &route);
                    let decision = match k.rate_limits(&c.org_id).await {
                        Ok(l) => Ok(k.limiter.check(&c.key_id, bucket, bucket.rate(&l))),
                        Err(e) => Err(e),
                    };
                    match decision {
                        Err(e) => (e.into_response(), org, prefix),
                        Ok(d) if !d.allowed => {
                            metrics::counter!("kiln_rate_limited_total", "bucket" => bucket.name())
                                .increment(1);
                            let mut resp = ApiError::new(
                                StatusCode::TOO_MANY_REQUESTS,
                                "rate_limited",
                                format!(
                                    "rate limit of the `{}` bucket reached for key {}: {} requests at once",
                                    bucket.name(),
                                    c.key_prefix,
                                    d.limit
                                ),
                            )
                            .hint(format!("retry after {} s", d.retry_after_secs))
                            .into_response();
                            rate_headers(&mut resp, &d);
                            resp.headers_mut()
                                .insert(header::RETRY_AFTER, HeaderValue::from(d.retry_after_secs));
                            (resp, org, prefix)
                        }
                        Ok(d) => {
                            req.extensions_mut().insert(c);
                            let mut resp = next.run(req).await;
                            rate_headers(&mut resp, &d);
                            (resp, org, prefix)
                        }
                    }
                }
            }
        }
    };
    let status = resp.status();
    let mutating = !matches!(method, Method::GET | Method::HEAD | Method::OPTIONS);
    if mutating || status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        let outcome = if status.is_success() || status.is_redirection() {
            "ok"
        } else if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            "denied"
        } else {
            "error"
        };
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let time_ms = crate::service::now_ms();
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let row = kiln_store::AuditRow {
            // Sorts by time, then by order within this process; the random tail keeps ids of
            // several replicas apart.
            id: format!("au_{time_ms:013}_{seq:08}{}", kiln_store::random_id("_", 6)),
            time_ms,
            org_id: org,
            key_prefix: prefix,
            action: format!("{method} {route}"),
            resource,
            outcome: outcome.into(),
            status: status.as_u16(),
            client,
            request_id,
        };
        k.audit.append(row);
    }
    resp
}

fn rate_headers(resp: &mut Response, d: &crate::ratelimit::Decision) {
    let h = resp.headers_mut();
    h.insert("ratelimit-limit", HeaderValue::from(d.limit));
    h.insert("ratelimit-remaining", HeaderValue::from(d.remaining));
    h.insert("ratelimit-reset", HeaderValue::from(d.reset_secs));
}

/// Every error answer in the API's shape: rejections that axum produces before a handler
/// runs (an undecodable path segment, a wrong method, a body over the limit) come as plain
/// text, and are rewritten here to `{"error":{"code","message","hint"}}` with the same status.
/// Preview answers (the sandbox server's own) are left alone by the caller.
async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 4096)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let code = match status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::UNPROCESSABLE_ENTITY => "invalid_argument",
        s if s.is_server_error() => "internal",
        _ => "http_error",
    };
    let message = if text.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("request refused")
            .to_string()
    } else {
        text
    };
    let mut out = ApiError::new(status, code, message)
        .hint("see the API's OpenAPI document at /openapi.json")
        .into_response();
    for name in [header::ALLOW, header::RETRY_AFTER] {
        if let Some(v) = parts.headers.get(&name) {
            out.headers_mut().insert(name, v.clone());
        }
    }
    out
}

/// Request ids, counting and latency per route. The id (a sane incoming `x-request-id`, or a
/// new one) is on the response and on every log line of the request.
async fn track(mut req: Request, next: Next) -> Response {
    use tracing::Instrument;
    let start = Instant::now();
    let rid = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 64 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(|| kiln_store::random_id("req_", 16));
    req.extensions_mut().insert(RequestId(rid.clone()));
    let path = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().to_string();
    let span = tracing::info_span!("request", request_id = %rid, method = %method, route = %path);
    let mut resp = next.run(req).instrument(span).await;
    if !path.contains("/ports/:port") {
        resp = json_errors(resp).await;
    }
    if let Ok(v) = HeaderValue::from_str(&rid) {
        resp.headers_mut().insert("x-request-id", v);
    }
    let status = resp.status().as_u16().to_string();
    tracing::debug!(request_id = %rid, %method, route = %path, %status, elapsed_us = start.elapsed().as_micros() as u64, "request");
    metrics::counter!("kiln_http_requests_total", "method" => method.clone(), "route" => path.clone(), "status" => status.clone())
        .increment(1);
    metrics::histogram!("kiln_http_request_seconds", "method" => method, "route" => path, "status" => status)
        .record(start.elapsed().as_secs_f64());
    resp
}

async fn metrics_endpoint(State(k): State<AppState>) -> Response {
    // Gauges read from the store at scrape time: this server's sandboxes by state.
    if let Ok(counts) = k.store.count_by_state().await {
        for state in ["creating", "running", "paused", "dead", "pooled"] {
            let n = counts
                .iter()
                .find(|(s, _)| s == state)
                .map(|(_, n)| *n)
                .unwrap_or(0);
            metrics::gauge!("kiln_sandboxes", "state" => state).set(n as f64);
        }
    }
    match &k.metrics {
        Some(h) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            h.render(),
        )
            .into_response(),
        None => ApiError::new(
            StatusCode::NOT_FOUND,
            "metrics_disabled",
            "metrics are not enabled",
        )
        .into_response(),
    }
}

async fn health(State(k): State<AppState>) -> Json<Health> {
    let sandboxes = k.store.count(false).await.unwrap_or(0);
    Json(Health {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        runtime: format!("{:?}", k.cfg.runtime).to_lowercase(),
        sandboxes,
        warm_pool: k.pool_size().await,
    })
}

type ApiResult<T> = Result<T, ApiError>;

async fn create_sandbox(
    State(k): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiJson(req): ApiJson<CreateSandbox>,
) -> ApiResult<Response> {
    let sb = k.create(&c, req).await?;
    Ok((StatusCode::CREATED, Json(sb)).into_response())
}

async fn list_sandboxes(
    State(k): State<AppState>,
    Extension(c): Extension<Caller>,
) -> ApiResult<Json<SandboxList>> {
    Ok(Json(SandboxList {
        sandboxes: k.list(&c).await?,
    }))
}

async fn get_sandbox(
    State(k): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    Ok(Json(k.sandbox(&c, &id).await?).into_response())
}

async fn delete_sandbox(
    State(k): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    k.remove(&c, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn pause_sandbox(
    State(k): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    Ok(Json(k.pause(&c, &id).await?).into_response())
}

async fn resume_sandbox(
    State(k): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    Ok(Json(k.resume(&c, &id).await?).into_response())
}

fn exec_spec(req: ExecRequest, detach: bool) -> ApiResult<(ExecSpec, Option<Vec<u8>>)> {
    if req.cmd.is_empty() || req.cmd[0].is_empty() {
        return Err(ApiError::invalid(
            "cmd must name a command: a non-empty array like [\"ls\", \"-l\"]",
        ));
    }
    if let Some(t) = req.timeout_secs {
        if !(t.is_finite() && t > 0.0) {
            return Err(ApiError::invalid(format!(
                "timeout_secs must be a positive number, got {t}"
            )));
        }
    }
    if let Some(cwd) = &req.cwd {
        if !cwd.starts_with('/') {
            return Err(ApiError::invalid(format!(
                "cwd must be an absolute path, got `{cwd}`"
            )));
        }
    }
    let stdin = match &req.stdin_b64 {
        Some(s) => Some(
            base64::engine::general_purpose::STANDARD
                .decode(s)
                .map_err(|e| ApiError::invalid(format!("stdin_b64 is not valid base64: {e}")))?,
        ),
        None => None,
    };
    let spec = ExecSpec {
        cmd: req.cmd,
        env: req.env,
        cwd: req.cwd,
        user: req.user,
        timeout_secs: req.timeout_secs,
        stdin: stdin.is_some() || req.keep_stdin_open,
        detach,
        tag: req.tag,
        credentials: false,
    };
    Ok((spec, if req.keep_stdin_open { None } else { stdin }))
}

fn ndjson_line<T: serde::Serialize>(v: &T) -> Bytes {
    let mut line = serde_json::to_vec(v).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

fn reply_event(r: Reply) -> Option<ExecEvent> {
    match r {
        Reply::Output {
            seq,
            stream: StreamKind::Stdout,
            data,
        } => Some(ExecEvent::Stdout { seq, data }),
        Reply::Output {
            seq,
            stream: StreamKind::Stderr,
            data,
        } => Some(ExecEvent::Stderr { seq, data }),
        Reply::Gap { from, to } => Some(ExecEvent::Gap { from, to }),
        Reply::Exited(st) => Some(ExecEvent::Exit(st)),
        Reply::Error(e) => Some(ExecEvent::Error(ApiError::from(e).body().error)),
        _ => None,
    }
}

fn ndjson_response(body: Body) -> Response {
    let mut resp = Response::new(body);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// The two kilnd reply streams an NDJSON answer is made from.
enum Replies {
    Exec(kilnd::client::ExecStream),
    Attach(kilnd::client::ReplyStream),
}

impl Replies {
    async fn next(&mut self) -> Option<Result<Reply, kilnd::client::ClientError>> {
        match self {
            Replies::Exec(s) => s.next().await,
            Replies::Attach(s) => s.next().await,
        }
    }
}

/// Streams kilnd replies as [`ExecEvent`] lines (after `first`, if any) until the process exits
/// or the stream breaks; a break is reported as a final `error` event.
fn reply_stream_response(first: Option<Bytes>, replies: Replies) -> Response {
    let events = futures_util::stream::unfold((replies, false), |(mut r, done)| async move {
        if done {
            return None;
        }
        let (line, end) = match r.next().await? {
            Ok(reply) => {
                let end = matches!(reply, Reply::Exited(_) | Reply::Error(_));
                (
                    reply_event(reply)
                        .map(|e| ndjson_line(&e))
                        .unwrap_or_default(),
                    end,
                )
            }
            Err(e) => (
                ndjson_line(&ExecEvent::Error(ApiError::from(e).body().error)),
                true,
            ),
        };
        Some((Ok::<_, std::io::Error>(line), (r, end)))
    });
    let head = futures_util::stream::iter(first.map(Ok::<_, std::io::Error>));
    ndjson_response(Body::from_stream(head.chain(events)))
}

/// `POST /v1/sandboxes/{id}/exec`: runs a command and streams its events as NDJSON.
async fn exec(
    State(k): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<ExecRequest>,
) -> ApiResult<Response> {
    let client = k.client(&c, &id).await?;
    let keep_open = req.keep_stdin_open;
    let has_stdin = req.stdin_b64.is_some();
    let (spec, stdin) = exec_spec(req, false)?;
    let mut stream = k.daemon(&id, client.exec(spec)).await?;
    metrics::counter!("kiln_exec_total").increment(1);
    if has_stdin && !keep_open {
        if let Some(data) = stdin {
            if !data.is_empty() {
                stream.send_stdin(&data).await.map_err(ApiError::from)?;
            }
            stream.close_stdin().await.map_err(ApiError::from)?;
        }
    }
    let first = ndjson_line(&ExecEvent::Started {
        pid: stream.pid().to_string(),
        os_pid: stream.os_pid(),
    });
    Ok(reply_stream_response(Some(first), Replies::Exec(stream)))
}

/// `POST /v1/sandboxes/{id}/processes`: starts a background process and returns its id.
async fn start_process(
    State(k): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<ExecRequest>,
) -> ApiResult<Response> {
    let client = k.client(&c, &id).await?;
    let inline_stdin = req.stdin_b64.is_some() && !req.keep_stdin_open;
    let (mut spec, stdin) = exec_spec(req, true)?;
    if inline_stdin {
        // Keep stdin open past the detach, then write it and close it through the process id
        // (a non-detached conversation that never reads output could stall on back-pressure).
        spec.stdin = true;
    }
    let stream = k.daemon(&id, client.exec(spec)).await?;
    if inline_stdin {
        k.daemon(
            &id,
            client.stdin(stream.pid(), &stdin.unwrap_or_default(), true),
        )
        .await?;
    }
    let started = ProcessStarted {
        pid: stream.pid().to_string(),
        os_pid: stream.os_pid(),
    };
    Ok((StatusCode::CREATED, Json(started)).into_response())
}

async fn list_processes(
    State(k): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<Json<ProcessList>> {
    let client = k.client(&c, &id).await?;
    let processes = k.daemon(&id, client.list_processes()).await?;
    Ok(Json(ProcessList { processes }))
}

#[derive(Deserialize, schemars::JsonSchema)]
pub(crate) struct AttachQuery {
    #[serde(default)]
    after: u64,
}

/// `GET /v1/sandboxes/{id}/processes/{pid}/output?after=SEQ`: replay + follow as NDJSON.
async fn attach_process(
    State(k): State<AppState>,
    Extension(c): Extension<Caller>,
    Path((id, pid)): Path<(String, String)>,
    ApiQuery(q): ApiQuery<AttachQuery>,
) -> ApiResult<Response> {
    let client = k.client(&c, &id).await?;
    let stream = k.daemon(&id, client.attach(&pid, q.after)).await?;
    Ok(reply_stream_response(None, Replies::Attach(stream)))
}

#[derive(Deserialize, schemars::JsonSchema)]
pub(crate) struct StdinQuery {
    #[serde(default)]
    close: bool,
}

/// `POST /v1/sandboxes/{id}/processes/{pid}/stdin[?close=true]`: raw body bytes to stdin.
async fn process_stdin(
    State(k): State<AppState>,
    Extension(c): Extension<Caller>,
    Path((id, pid)): Path<(String, String)>,
    ApiQuery(q): ApiQuery<StdinQuery>,
    body: Bytes,
) -> ApiResult<StatusCode> {
    let client = k.client(&c, &id).await?;
    k.daemon(&id, client.stdin(&pid, &body, q.close)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Signal names accepted besides numbers.
pub fn signal_number(a: &SignalArg) -> Result<i32, ApiError> {
    let n = match a {
        SignalArg::Number(n) => *n,
        SignalArg::Name(name) => {
            let up = name.trim().to_ascii_uppercase();
            let bare = up.strip_prefix("SIG").unwrap_or(&up);
            match bare {
                "HUP" => 1,
                "INT" => 2,
                "QUIT" => 3,
                "KILL" => 9,
                "USR1" => 10,
                "USR2" => 12,
                "TERM" => 15,
                "CONT" => 18,
                "STOP" => 19,
                "WINCH" => 28,
                _ => bare.parse().map_err(|_| {
                    ApiError::invalid(format!("unknown signal `{name}`")).hint(
                        "use a number or one of HUP INT QUIT KILL USR1 USR2 TERM CONT STOP WINCH",
                    )
                })?,
            }
        }
    };
    if !(1..=64).contains(&n) {
        return Err(ApiError::invalid(format!(
            "signal must be between 1 and 64, got {n}"
        )));
    }
    Ok(n)
}

async fn process_signal(
    State(k): State<AppState>,
    Extension(c): Extension<Caller>,
    Path((id, pid)): Path<(String, String)>,
    ApiJson(req): ApiJson<SignalRequest>,
) -> ApiResult<StatusCode> {
    let sig = signal_number(&req.signal)?;
    let client = k.client(&c, &id).await?;
    k.daemon(&id, client.signal(&pid, sig)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, schemars::JsonSchema)]
pub(crate) struct PathQuery {
    path: String,
    #[serde(default)]
    recursive: Option<bool>,
    #[serde(default)]
    depth: Option<u32>,
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    parents: Option<bool>,
}

/// `GET /v1/sandboxes/{id}/files?path=`: streams a file out.
async fn download(
    State(k): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<PathQuery>,
) -> ApiResult<Response> {
    let client = k.client(&c, &id).await?;
    let (stat, data) = k.daemon(&id, client.read_file(&q.path)).await?;
    let mut resp = Response::new(Body::from_stream(data.map_err(std::io::Error::other)));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(stat.size));
    h.insert("x-kiln-file-mode", HeaderValue::from(stat.mode));
    Ok(resp)
}

/// `PUT /v1/sandboxes/{id}/files?path=&mode=0644&parents=true`: streams the body into a file,
/// atomically.
async fn upload(
    State(k): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<PathQuery>,
    body: Body,
) -> ApiResult<Response> {
    let client = k.client(&c, &id).await?;
    let mode = match &q.mode {
        Some(m) => Some(
            u32::from_str_radix(m.trim_start_matches("0o"), 8).map_err(|_| {
                ApiError::invalid(format!(
                    "mode must be octal permission bits like 0644, got `{m}`"
                ))
            })?,
        ),
        None => None,
    };
    let reader =
        tokio_util::io::StreamReader::new(body.into_data_stream().map_err(std::io::Error::other));
    let stat = k
        .daemon(
            &id,
            client.write_file(&q.path, mode, q.parents.unwrap_or(true), reader),
        )
        .await?;
    Ok((StatusCode::CREATED, Json(stat)).into_response())
}

async fn stat_file(
    State(k): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<PathQuery>,
) -> ApiResult<Response> {
    let client = k.client(&c, &id).await?;
    Ok(Json(k.daemon(&id, client.stat(&q.path)).await?).into_response())
}

async fn list_files(
    State(k): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<PathQuery>,
) -> ApiResult<Json<FileList>> {
    let client = k.client(&c, &id).await?;
    let entries = k
        .daemon(&id, client.list_dir(&q.path, q.depth.unwrap_or(1)))
        .await?;
    Ok(Json(FileList { entries }))
}

async fn mkdir(
    State(k): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<MkdirRequest>,
) -> ApiResult<Response> {
    let client = k.client(&c, &id).await?;
    Ok((
        StatusCode::CREATED,
        Json(k.daemon(&id, client.mkdir(&req.path, req.parents)).await?),
    )
        .into_response())
}

async fn move_file(
    State(k): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<MoveRequest>,
) -> ApiResult<Response> {
    let client = k.client(&c, &id).await?;
    Ok(Json(
        k.daemon(&id, client.move_path(&req.from, &req.to, req.overwrite))
            .await?,
    )
    .into_response())
}

async fn remove_file(
    State(k): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<PathQuery>,
) -> ApiResult<StatusCode> {
    let client = k.client(&c, &id).await?;
    k.daemon(&id, client.remove(&q.path, q.recursive.unwrap_or(false)))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /v1/sandboxes/{id}/files/watch?path=&recursive=`: change events as NDJSON.
async fn watch(
    State(k): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<PathQuery>,
) -> ApiResult<Response> {
    let client = k.client(&c, &id).await?;
    let stream = k
        .daemon(&id, client.watch(&q.path, q.recursive.unwrap_or(true)))
        .await?;
    let events = futures_util::stream::unfold(stream, |mut s| async move {
        match s.next().await {
            Some(Ok(ev)) => Some((Ok::<_, std::io::Error>(ndjson_line(&ev)), s)),
            _ => None,
        }
    });
    Ok(ndjson_response(Body::from_stream(events)))
}

#[derive(Deserialize, schemars::JsonSchema)]
pub(crate) struct PtyQuery {
    #[serde(default)]
    session: Option<String>,
    #[serde(default)]
    cols: Option<u16>,
    #[serde(default)]
    rows: Option<u16>,
    /// Command to run instead of the login shell (space separated).
    #[serde(default)]
    cmd: Option<String>,
    #[serde(default)]
    cwd: Option<String>,
    #[serde(default)]
    user: Option<String>,
}

/// `GET /v1/sandboxes/{id}/pty` (WebSocket): an interactive terminal. Binary messages carry
/// terminal bytes both ways; text messages are [`PtyMessage`]s. Closing detaches; the session
/// keeps running and `?session=ID` re-attaches.
async fn pty(
    State(k): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<PtyQuery>,
    ws: Option<WebSocketUpgrade>,
) -> ApiResult<Response> {
    let client = k.client(&c, &id).await?;
    let ws = ws.ok_or_else(|| {
        ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            "websocket_required",
            "this endpoint speaks WebSocket",
        )
        .hint("connect with a WebSocket client (ws://.../v1/sandboxes/ID/pty)")
    })?;
    let session = match &q.session {
        Some(s) => k.daemon(&id, client.pty_attach(s)).await?,
        None => {
            let spec = PtySpec {
                cmd: q
                    .cmd
                    .as_deref()
                    .map(|c| c.split_whitespace().map(str::to_string).collect())
                    .unwrap_or_default(),
                env: Default::default(),
                cwd: q.cwd.clone(),
                user: q.user.clone(),
                cols: q.cols.unwrap_or(80).max(1),
                rows: q.rows.unwrap_or(24).max(1),
            };
            k.daemon(&id, client.pty_open(spec)).await?
        }
    };
    Ok(ws.on_upgrade(move |socket| pump_pty(socket, session)))
}

async fn pump_pty(socket: WebSocket, session: kilnd::client::PtySession) {
    let sid = session.id().to_string();
    let (mut ws_tx, mut ws_rx) = socket.split();
    let (mut reader, mut writer) = session.into_split();
    let opened = serde_json::to_string(&PtyMessage::Opened { session: sid }).unwrap_or_default();
    if ws_tx.send(Message::Text(opened)).await.is_err() {
        return;
    }
    let out = async move {
        while let Some(ev) = reader.next().await {
            match ev {
                Ok(kilnd::client::PtyEvent::Output(b)) => {
                    if ws_tx.send(Message::Binary(b.to_vec())).await.is_err() {
                        return;
                    }
                }
                Ok(kilnd::client::PtyEvent::Exited(st)) => {
                    let msg = serde_json::to_string(&PtyMessage::Exit(st)).unwrap_or_default();
                    let _ = ws_tx.send(Message::Text(msg)).await;
                    let _ = ws_tx.close().await;
                    return;
                }
                Err(_) => break,
            }
        }
        let _ = ws_tx.close().await;
    };
    let inp = async move {
        while let Some(Ok(msg)) = ws_rx.next().await {
            let ok = match msg {
                Message::Binary(b) => writer.input(&b).await.is_ok(),
                Message::Text(t) => match serde_json::from_str::<PtyMessage>(&t) {
                    Ok(PtyMessage::Resize { cols, rows }) => {
                        writer.resize(cols.max(1), rows.max(1)).await.is_ok()
                    }
                    _ => writer.input(t.as_bytes()).await.is_ok(),
                },
                Message::Close(_) => false,
                _ => true,
            };
            if !ok {
                break;
            }
        }
    };
    // The output side ending ends the bridge; the PTY session itself lives on in kilnd. When
    // the input side ends first (the client detached, or the program exited and kilnd refused
    // a late write such as piped input's final EOT), the output side still gets a moment to
    // deliver what is left, the exit status above all.
    tokio::pin!(out);
    tokio::select! {
        _ = &mut out => {}
        _ = inp => {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), out).await;
        }
    }
}
