//! The agent runtime in the server: `/v1/agents` (start, list, show, the event stream,
//! approvals, stop) and the implementations of `kiln_agent::tools::Sandbox` and `Sandboxes`
//! over this server's sandbox service, kilnd and kiln-devtools (git, language servers). Runs
//! belong to the organisation that started them; another org's run is a 404 like a missing
//! one.

use std::convert::Infallible;
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use bytes::Bytes;
use futures_util::StreamExt;
use kiln_agent::events::{Event, EventKind};
use kiln_agent::runner::{AgentError, Runtime, SandboxFactory, StartRun};
use kiln_agent::tools::{Entry, ExecOutput, Sandbox, SandboxError, Sandboxes};
use kiln_devtools::git::Identity;
use kiln_devtools::{lsp, Git};
use kiln_protocol::api::CreateSandbox;
use kiln_protocol::kilnd::{ExecSpec, FileKind, Reply, StreamKind};
use kiln_store::agents::AgentRunRow;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::{ApiError, ApiJson, ApiQuery};
use crate::service::{AppState, Caller, Kiln};
use crate::tenancy::role_perms;
use kiln_protocol::api::Role;

type ApiResult<T> = Result<T, ApiError>;

/// The routes, merged into `/v1` by `http::app`.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/agents", post(start_run).get(list_runs))
        .route("/agents/:id", get(get_run))
        .route("/agents/:id/events", get(events))
        .route("/agents/:id/approvals/:call", post(approve))
        .route("/agents/:id/stop", post(stop))
}

/// Creates the agent runtime of a server (its sandboxes are this server's).
pub fn runtime(kiln: &Arc<Kiln>) -> Arc<Runtime> {
    let env: kiln_agent::runner::Env = Arc::new(|k: &str| std::env::var(k).ok());
    let rt = Runtime::new(
        kiln.store.clone(),
        kiln.cfg.agents.clone(),
        env,
        Arc::new(Factory {
            kiln: Arc::downgrade(kiln),
        }),
    );
    // Search and context over the run's organisation's code indexes.
    for t in kiln_agent::knowledge::knowledge_tools(Arc::new(crate::knowledge::AgentKnowledge {
        kiln: Arc::downgrade(kiln),
    })) {
        rt.register_tool(t);
    }
    rt
}

/// The agent runtime of `k` (created on first use).
pub fn agents(k: &Arc<Kiln>) -> Arc<Runtime> {
    k.agents.get_or_init(|| runtime(k)).clone()
}

struct Factory {
    kiln: Weak<Kiln>,
}

impl SandboxFactory for Factory {
    fn for_org(&self, org_id: &str) -> Arc<dyn Sandboxes> {
        Arc::new(OrgSandboxes {
            kiln: self.kiln.clone(),
            caller: agent_caller(org_id),
        })
    }
}

/// The identity agent runs act with inside their organisation: a member's permissions.
fn agent_caller(org_id: &str) -> Caller {
    Caller {
        org_id: org_id.into(),
        key_id: "agent".into(),
        key_prefix: "agent".into(),
        role: Role::Member,
        perms: role_perms(Role::Member),
        system: false,
    }
}

struct OrgSandboxes {
    kiln: Weak<Kiln>,
    caller: Caller,
}

fn sb_err(e: ApiError) -> SandboxError {
    if e.status == StatusCode::NOT_FOUND {
        SandboxError::NotFound(e.message)
    } else {
        SandboxError::Failed(e.into_text())
    }
}

impl OrgSandboxes {
    fn kiln(&self) -> Result<Arc<Kiln>, SandboxError> {
        self.kiln
            .upgrade()
            .ok_or_else(|| SandboxError::Failed("the server is shutting down".into()))
    }
}

#[async_trait]
impl Sandboxes for OrgSandboxes {
    async fn create(&self, template: &str) -> Result<Arc<dyn Sandbox>, SandboxError> {
        let k = self.kiln()?;
        let sb = k
            .create(
                &self.caller,
                CreateSandbox {
                    template: Some(template.into()),
                    labels: [("kiln.agent".to_string(), "true".to_string())].into(),
                    ..CreateSandbox::default()
                },
            )
            .await
            .map_err(sb_err)?;
        self.open(&sb.id).await
    }

    async fn open(&self, id: &str) -> Result<Arc<dyn Sandbox>, SandboxError> {
        let k = self.kiln()?;
        let client = k.client(&self.caller, id).await.map_err(sb_err)?;
        let author = crate::gitcreds::default_author(&k, &self.caller.org_id)
            .await
            .map_err(sb_err)?;
        Ok(Arc::new(ServerSandbox {
            id: id.into(),
            git: Git::new(client.clone(), None),
            client,
            author,
        }))
    }

    async fn remove(&self, id: &str) -> Result<(), SandboxError> {
        let k = self.kiln()?;
        k.remove(&self.caller, id).await.map_err(sb_err)
    }
}

/// A sandbox as agent tools see it: kilnd for processes and files, kiln-devtools for git and
/// language servers.
pub struct ServerSandbox {
    id: String,
    client: kilnd::client::Client,
    git: Git,
    /// Commits are authored as the organisation's default author (or Kiln's).
    author: Identity,
}

fn cerr(e: kilnd::client::ClientError) -> SandboxError {
    match e.code() {
        Some(kiln_protocol::kilnd::DaemonErrorCode::NotFound) => {
            SandboxError::NotFound(e.to_string())
        }
        _ => SandboxError::Failed(e.to_string()),
    }
}

#[async_trait]
impl Sandbox for ServerSandbox {
    fn id(&self) -> &str {
        &self.id
    }

    async fn exec(
        &self,
        cmd: &[String],
        cwd: &str,
        timeout: Duration,
    ) -> Result<ExecOutput, SandboxError> {
        let mut s = self
            .client
            .exec(ExecSpec {
                cmd: cmd.to_vec(),
                cwd: Some(cwd.into()),
                timeout_secs: Some(timeout.as_secs_f64()),
                ..ExecSpec::default()
            })
            .await
            .map_err(cerr)?;
        let mut out = ExecOutput::default();
        // Output beyond this is dropped here already (tools truncate further to their budget).
        const CAP: usize = 4 << 20;
        let (mut o, mut e) = (Vec::new(), Vec::new());
        while let Some(r) = s.next().await {
            match r.map_err(cerr)? {
                Reply::Output { stream, data, .. } => {
                    let buf = if stream == StreamKind::Stdout {
                        &mut o
                    } else {
                        &mut e
                    };
                    if buf.len() < CAP {
                        buf.extend_from_slice(&data[..data.len().min(CAP - buf.len())]);
                    }
                }
                Reply::Exited(st) => {
                    out.exit_code = st.exit_code;
                    out.timed_out = st.timed_out;
                    break;
                }
                Reply::Error(d) => return Err(SandboxError::Failed(d.message)),
                _ => {}
            }
        }
        out.stdout = String::from_utf8_lossy(&o).into_owned();
        out.stderr = String::from_utf8_lossy(&e).into_owned();
        Ok(out)
    }

    async fn read_file(&self, path: &str) -> Result<Vec<u8>, SandboxError> {
        let (_, mut data) = self.client.read_file(path).await.map_err(cerr)?;
        let mut out = Vec::new();
        while let Some(chunk) = data.next().await {
            out.extend_from_slice(&chunk.map_err(|e| SandboxError::Failed(e.to_string()))?);
        }
        Ok(out)
    }

    async fn write_file(&self, path: &str, data: &[u8]) -> Result<(), SandboxError> {
        self.client
            .write_file(path, None, true, data)
            .await
            .map_err(cerr)?;
        Ok(())
    }

    async fn list(&self, path: &str, depth: u32) -> Result<Vec<Entry>, SandboxError> {
        Ok(self
            .client
            .list_dir(path, depth)
            .await
            .map_err(cerr)?
            .into_iter()
            .map(|f| Entry {
                dir: f.kind == FileKind::Dir,
                path: f.path,
                size: f.size,
            })
            .collect())
    }

    async fn git(&self, op: &str, args: Value) -> Result<Value, SandboxError> {
        let repo = args["repo"].as_str().unwrap_or("/workspace").to_string();
        let gerr =
            |e: kiln_devtools::GitError| SandboxError::Failed(format!("{} ({})", e, e.code()));
        let v = match op {
            "status" => serde_json::to_value(self.git.status(&repo).await.map_err(gerr)?),
            "diff" => serde_json::to_value(
                self.git
                    .diff(&repo, args["staged"].as_bool().unwrap_or(false), &[])
                    .await
                    .map_err(gerr)?,
            ),
            "commit" => {
                if args["all"].as_bool().unwrap_or(true) {
                    self.git
                        .add(&repo, &[".".to_string()])
                        .await
                        .map_err(gerr)?;
                }
                serde_json::to_value(
                    self.git
                        .commit(
                            &repo,
                            args["message"].as_str().unwrap_or_default(),
                            &self.author,
                            false,
                        )
                        .await
                        .map_err(gerr)?,
                )
            }
            other => {
                return Err(SandboxError::Failed(format!(
                    "unknown git operation `{other}`"
                )))
            }
        };
        v.map_err(|e| SandboxError::Failed(e.to_string()))
    }

    async fn lsp(&self, op: &str, args: Value) -> Result<Value, SandboxError> {
        let path = args["path"].as_str().unwrap_or_default().to_string();
        let language = lsp::language_of(&path)
            .ok_or_else(|| SandboxError::Failed(format!("no language server for {path}")))?;
        let lerr = |e: lsp::LspError| SandboxError::Failed(e.to_string());
        let s = crate::devtools::lsp_manager()
            .session(&self.id, &self.client, language, "/workspace", None)
            .await
            .map_err(lerr)?;
        let (line, col) = (
            args["line"].as_u64().unwrap_or(1) as u32,
            args["column"].as_u64().unwrap_or(1) as u32,
        );
        Ok(match op {
            "diagnostics" => {
                json!({"diagnostics": s.diagnostics(&path, Duration::from_secs(10)).await.map_err(lerr)?})
            }
            "definition" => {
                json!({"locations": s.definition(&path, line, col).await.map_err(lerr)?})
            }
            "references" => {
                json!({"locations": s.references(&path, line, col).await.map_err(lerr)?})
            }
            other => {
                return Err(SandboxError::Failed(format!(
                    "unknown lsp operation `{other}`"
                )))
            }
        })
    }
}

// ---------------------------------------------------------------------------------------
// HTTP

/// A run as the API shows it.
#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Run {
    pub id: String,
    pub parent_id: Option<String>,
    pub profile: String,
    pub model: String,
    pub task: String,
    pub state: String,
    pub reason: Option<String>,
    pub sandbox_id: Option<String>,
    pub stats: Value,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
}

impl From<AgentRunRow> for Run {
    fn from(r: AgentRunRow) -> Run {
        Run {
            stats: serde_json::from_str(&r.stats).unwrap_or(json!({})),
            id: r.id,
            parent_id: r.parent_id,
            profile: r.profile,
            model: r.model,
            task: r.task,
            state: r.state,
            reason: r.reason,
            sandbox_id: r.sandbox_id,
            created_at_ms: r.created_at_ms,
            updated_at_ms: r.updated_at_ms,
        }
    }
}

fn agent_error(e: AgentError) -> ApiError {
    match e {
        AgentError::NotFound(id) => not_found(&id),
        AgentError::Config(c) => ApiError::new(StatusCode::BAD_REQUEST, "invalid_agent_request", c.to_string())
            .hint("models are `provider/model` (openai, ollama, anthropic or a provider of the agent config); profiles: coder, planner, reviewer, tester or one of the config"),
        AgentError::NoModel => ApiError::new(StatusCode::BAD_REQUEST, "no_model", e.to_string())
            .hint("pass `model`, e.g. \"ollama/qwen2.5-coder:7b\""),
        AgentError::Invalid(m) => ApiError::invalid(m),
        AgentError::Concurrency(n) => ApiError::new(StatusCode::TOO_MANY_REQUESTS, "agent_concurrency", format!("the organisation already runs {n} agents, its limit"))
            .hint("wait for a run to finish or stop one with `kiln agent stop RUN`"),
        AgentError::Sandbox(m) => ApiError::new(StatusCode::CONFLICT, "agent_sandbox", m),
        AgentError::NoApproval { run, call } => ApiError::new(StatusCode::NOT_FOUND, "approval_not_found", format!("no pending approval `{call}` in run `{run}`"))
            .hint(format!("see the run's approval_requested events: `kiln agent logs {run}`")),
        AgentError::Store(s) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", s.to_string()),
    }
}

fn not_found(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "agent_run_not_found",
        format!("no agent run `{id}`"),
    )
    .hint("list runs with `kiln agent ls`")
}

async fn row(k: &AppState, c: &Caller, id: &str) -> ApiResult<AgentRunRow> {
    k.store
        .agent_run(&c.org_id, id)
        .await?
        .ok_or_else(|| not_found(id))
}

async fn start_run(
    State(k): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiJson(req): ApiJson<StartRun>,
) -> ApiResult<Response> {
    let rt = agents(&k);
    let row = rt
        .start(&c.org_id, &c.key_id, req)
        .await
        .map_err(agent_error)?;
    let row = k.store.agent_run(&c.org_id, &row.id).await?.unwrap_or(row);
    Ok((StatusCode::CREATED, Json(Run::from(row))).into_response())
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub(crate) struct ListQuery {
    #[serde(default)]
    limit: Option<u64>,
}

async fn list_runs(
    State(k): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> ApiResult<Json<Value>> {
    let rows = k
        .store
        .list_agent_runs(&c.org_id, q.limit.unwrap_or(100).min(1000))
        .await?;
    let runs: Vec<Run> = rows.into_iter().map(Run::from).collect();
    Ok(Json(json!({"runs": runs})))
}

async fn get_run(
    State(k): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let r = row(&k, &c, &id).await?;
    let children = k
        .store
        .list_agent_runs(&c.org_id, 1000)
        .await?
        .into_iter()
        .filter(|x| x.parent_id.as_deref() == Some(id.as_str()))
        .map(Run::from)
        .collect::<Vec<_>>();
    let mut v = serde_json::to_value(Run::from(r)).unwrap_or(json!({}));
    v["children"] = json!(children);
    Ok(Json(v))
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub(crate) struct EventsQuery {
    #[serde(default)]
    after: Option<u64>,
    /// Keep streaming until the run finishes.
    #[serde(default)]
    follow: Option<bool>,
}

fn frame(e: &Event, sse: bool) -> Bytes {
    let data = serde_json::to_string(e).unwrap_or_default();
    Bytes::from(if sse {
        format!("id: {}\nevent: {}\ndata: {data}\n\n", e.seq, e.kind.name())
    } else {
        format!("{data}\n")
    })
}

/// `GET /v1/agents/{id}/events?after=SEQ&follow=true`: NDJSON, or SSE with
/// `Accept: text/event-stream`; with `follow` it streams live until the run finishes.
async fn events(
    State(k): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<EventsQuery>,
) -> ApiResult<Response> {
    row(&k, &c, &id).await?;
    let sse = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    let rt = agents(&k);
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(256);
    let follow = q.follow.unwrap_or(false);
    let mut last = q.after.unwrap_or(0);
    let store = k.store.clone();
    tokio::spawn(async move {
        let mut sub = if follow {
            rt.live(&id).map(|l| l.subscribe())
        } else {
            None
        };
        loop {
            // The store is the source of truth; live events only wake us up early.
            let stored = match rt.events(&id, last).await {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(run = %id, error = %e, "reading agent events");
                    return;
                }
            };
            let mut finished = false;
            for e in stored {
                last = e.seq;
                finished |= matches!(e.kind, EventKind::Finished { .. });
                if tx.send(frame(&e, sse)).await.is_err() {
                    return;
                }
            }
            if !follow || finished || rt.halted() {
                return;
            }
            if sub.is_none() {
                sub = rt.live(&id).map(|l| l.subscribe());
            }
            let woke = match &mut sub {
                Some(rx) => tokio::time::timeout(Duration::from_millis(500), rx.recv()).await,
                None => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    // A run that is neither live here nor running is over (stopped elsewhere).
                    if let Ok(Some(r)) = store.agent_run(&c.org_id, &id).await {
                        if !matches!(r.state.as_str(), "running" | "waiting_approval")
                            && rt
                                .events(&id, last)
                                .await
                                .map(|v| v.is_empty())
                                .unwrap_or(true)
                        {
                            return;
                        }
                    }
                    continue;
                }
            };
            match woke {
                // In order: send it without a store read.
                Ok(Ok(e)) if e.seq == last + 1 => {
                    last = e.seq;
                    let fin = matches!(e.kind, EventKind::Finished { .. });
                    if tx.send(frame(&e, sse)).await.is_err() || fin {
                        return;
                    }
                }
                Ok(Ok(_))
                | Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_)))
                | Err(_) => {}
                Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) => sub = None,
            }
        }
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<Bytes, Infallible>(b), rx))
    });
    Ok(Response::builder()
        .header(
            header::CONTENT_TYPE,
            if sse {
                "text/event-stream"
            } else {
                "application/x-ndjson"
            },
        )
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response()))
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ApproveBody {
    approve: bool,
}

async fn approve(
    State(k): State<AppState>,
    Extension(c): Extension<Caller>,
    Path((id, call)): Path<(String, String)>,
    ApiJson(b): ApiJson<ApproveBody>,
) -> ApiResult<StatusCode> {
    row(&k, &c, &id).await?;
    agents(&k)
        .approve(&c.org_id, &id, &call, b.approve, &c.key_prefix)
        .await
        .map_err(agent_error)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn stop(
    State(k): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    row(&k, &c, &id).await?;
    agents(&k).stop(&c.org_id, &id).await.map_err(agent_error)?;
    Ok(StatusCode::ACCEPTED)
}
