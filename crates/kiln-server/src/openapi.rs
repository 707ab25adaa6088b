//! The OpenAPI 3.1 description of the HTTP API, served at `GET /openapi.json`.
//!
//! Generated from the code: request, response and query shapes are the JSON Schemas
//! (`schemars`, draft 2020-12, which OpenAPI 3.1 uses as is) of the very types the handlers
//! deserialize and serialize, and the operation table below is checked against
//! [`crate::http::ROUTES`] by a test, so a route cannot exist without its description.
//! Every operation declares the error shape (`{"error":{"code","message","hint"}}`) for 4XX
//! and 5XX answers.
//!
//! What it does not describe: the WebSocket message protocols beyond their first message
//! types, and the bodies a port preview relays (they are the sandbox server's).

use std::sync::OnceLock;

use kiln_protocol::api::*;
use schemars::generate::SchemaSettings;
use schemars::{JsonSchema, SchemaGenerator};
use serde_json::{json, Map, Value};

const JSON: &str = "application/json";
const NDJSON: &str = "application/x-ndjson";
const BYTES: &str = "application/octet-stream";

/// What an operation takes or answers.
enum Body {
    None,
    Json(Value),
    /// A stream of JSON lines, each matching the schema.
    Lines(Value),
    Bytes,
    Text,
    /// Whatever the sandbox's server answers (previews).
    Any,
}

struct Op {
    method: &'static str,
    path: &'static str,
    tag: &'static str,
    summary: &'static str,
    query: Vec<Value>,
    body: Body,
    ok: u16,
    ok_body: Body,
    /// A second success status with the same body (create-or-replace: 201 or 200).
    ok_also: Option<u16>,
    auth: bool,
    websocket: bool,
}

struct Builder {
    gen: SchemaGenerator,
    ops: Vec<Op>,
}

impl Builder {
    fn s<T: JsonSchema>(&mut self) -> Value {
        self.gen.subschema_for::<T>().to_value()
    }

    /// Query parameters from a query type's schema: one per property.
    fn q<T: JsonSchema>(&mut self) -> Vec<Value> {
        let root = SchemaSettings::draft2020_12()
            .with(|s| s.inline_subschemas = true)
            .into_generator()
            .into_root_schema_for::<T>()
            .to_value();
        let required: Vec<&str> = root["required"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let mut out = Vec::new();
        if let Some(props) = root["properties"].as_object() {
            for (name, schema) in props {
                let mut schema = schema.clone();
                // `Option<T>` is `type: [T, "null"]`; a query parameter is absent instead.
                if let Some(Value::Array(types)) = schema.get_mut("type") {
                    types.retain(|t| t != "null");
                    if types.len() == 1 {
                        let t = types[0].clone();
                        schema["type"] = t;
                    }
                }
                if let Some(o) = schema.as_object_mut() {
                    o.remove("default");
                }
                let description = schema
                    .get("description")
                    .cloned()
                    .unwrap_or(Value::String(String::new()));
                out.push(json!({
                    "name": name,
                    "in": "query",
                    "required": required.contains(&name.as_str()),
                    "description": description,
                    "schema": schema,
                }));
            }
        }
        out
    }

    #[allow(clippy::too_many_arguments)]
    fn op(
        &mut self,
        method: &'static str,
        path: &'static str,
        tag: &'static str,
        summary: &'static str,
        query: Vec<Value>,
        body: Body,
        ok: u16,
        ok_body: Body,
    ) -> &mut Op {
        self.ops.push(Op {
            method,
            path,
            tag,
            summary,
            query,
            body,
            ok,
            ok_body,
            ok_also: None,
            auth: true,
            websocket: false,
        });
        self.ops.last_mut().expect("just pushed")
    }
}

fn content(b: &Body) -> Option<Value> {
    Some(match b {
        Body::None => return None,
        Body::Json(s) => json!({ JSON: { "schema": s } }),
        Body::Lines(s) => json!({ NDJSON: {
            "schema": { "type": "string", "description": "one JSON object per line" },
            "x-kiln-line-schema": s,
        }}),
        Body::Bytes => {
            json!({ BYTES: { "schema": { "type": "string", "contentMediaType": BYTES } } })
        }
        Body::Text => json!({ "text/plain": { "schema": { "type": "string" } } }),
        Body::Any => json!({ "*/*": { "schema": {} } }),
    })
}

fn path_param(name: &str) -> Value {
    let (schema, description) = match name {
        "port" => (
            json!({"type": "integer", "minimum": 1, "maximum": 65535}),
            "TCP port in the sandbox",
        ),
        "op" => (json!({"type": "string"}), "the operation (see the summary)"),
        "path" => (json!({"type": "string"}), "path on the sandbox's server"),
        "id" => (json!({"type": "string"}), "resource id"),
        "pid" => (json!({"type": "string"}), "process id given by Kiln"),
        "org" => (json!({"type": "string"}), "organisation id or name"),
        "name" => (json!({"type": "string"}), "template or index name"),
        "call" => (json!({"type": "string"}), "the tool call awaiting approval"),
        _ => (json!({"type": "string"}), ""),
    };
    json!({"name": name, "in": "path", "required": true, "description": description, "schema": schema})
}

/// `/v1/sandboxes/:id/ports/:port/*path` -> `/v1/sandboxes/{id}/ports/{port}/{path}`.
pub fn openapi_path(route: &str) -> String {
    route
        .split('/')
        .map(
            |seg| match seg.strip_prefix(':').or_else(|| seg.strip_prefix('*')) {
                Some(name) => format!("{{{name}}}"),
                None => seg.to_string(),
            },
        )
        .collect::<Vec<_>>()
        .join("/")
}

fn operations(b: &mut Builder) {
    use Body::*;
    let sandbox = b.s::<Sandbox>();
    let exec_event = b.s::<ExecEvent>();
    let exec_req = b.s::<ExecRequest>();
    // Sandboxes
    let v = b.s::<CreateSandbox>();
    b.op(
        "POST",
        "/v1/sandboxes",
        "sandboxes",
        "Create a sandbox (a warm-pool claim when one matches)",
        vec![],
        Json(v),
        201,
        Json(sandbox.clone()),
    );
    let v = b.s::<SandboxList>();
    b.op(
        "GET",
        "/v1/sandboxes",
        "sandboxes",
        "List the organisation's sandboxes",
        vec![],
        None,
        200,
        Json(v),
    );
    b.op(
        "GET",
        "/v1/sandboxes/:id",
        "sandboxes",
        "Get a sandbox",
        vec![],
        None,
        200,
        Json(sandbox.clone()),
    );
    b.op(
        "DELETE",
        "/v1/sandboxes/:id",
        "sandboxes",
        "Remove a sandbox and everything it holds",
        vec![],
        None,
        204,
        None,
    );
    b.op(
        "POST",
        "/v1/sandboxes/:id/pause",
        "sandboxes",
        "Freeze a sandbox (releases its CPU and memory quota)",
        vec![],
        None,
        200,
        Json(sandbox.clone()),
    );
    b.op(
        "POST",
        "/v1/sandboxes/:id/resume",
        "sandboxes",
        "Thaw a paused sandbox (re-admitted against the quota)",
        vec![],
        None,
        200,
        Json(sandbox),
    );
    // Processes
    b.op(
        "POST",
        "/v1/sandboxes/:id/exec",
        "processes",
        "Run a command; streams its output and exit as NDJSON",
        vec![],
        Json(exec_req.clone()),
        200,
        Lines(exec_event.clone()),
    );
    let v = b.s::<ProcessStarted>();
    b.op(
        "POST",
        "/v1/sandboxes/:id/processes",
        "processes",
        "Start a background process",
        vec![],
        Json(exec_req),
        201,
        Json(v),
    );
    let v = b.s::<ProcessList>();
    b.op(
        "GET",
        "/v1/sandboxes/:id/processes",
        "processes",
        "List processes",
        vec![],
        None,
        200,
        Json(v),
    );
    let q = b.q::<crate::http::AttachQuery>();
    b.op(
        "GET",
        "/v1/sandboxes/:id/processes/:pid/output",
        "processes",
        "Replay (after a sequence number) and follow a process's output",
        q,
        None,
        200,
        Lines(exec_event),
    );
    let q = b.q::<crate::http::StdinQuery>();
    b.op(
        "POST",
        "/v1/sandboxes/:id/processes/:pid/stdin",
        "processes",
        "Write the body to a process's stdin",
        q,
        Bytes,
        204,
        None,
    );
    let v = b.s::<SignalRequest>();
    b.op(
        "POST",
        "/v1/sandboxes/:id/processes/:pid/signal",
        "processes",
        "Send a signal to a process",
        vec![],
        Json(v),
        204,
        None,
    );
    b.op(
        "GET",
        "/v1/sandboxes/:id/pty",
        "processes",
        "Interactive terminal over a WebSocket (binary = terminal bytes, text = PtyMessage)",
        vec![],
        None,
        101,
        None,
    )
    .websocket = true;
    // Files
    let stat = b.s::<FileStat>();
    let q = b.q::<crate::http::PathQuery>();
    b.op(
        "GET",
        "/v1/sandboxes/:id/files",
        "files",
        "Download a file",
        q.clone(),
        None,
        200,
        Bytes,
    );
    b.op(
        "PUT",
        "/v1/sandboxes/:id/files",
        "files",
        "Upload a file (the body), atomically",
        q.clone(),
        Bytes,
        201,
        Json(stat.clone()),
    );
    b.op(
        "DELETE",
        "/v1/sandboxes/:id/files",
        "files",
        "Remove a file or directory",
        q.clone(),
        None,
        204,
        None,
    );
    b.op(
        "GET",
        "/v1/sandboxes/:id/files/stat",
        "files",
        "Stat a path",
        q.clone(),
        None,
        200,
        Json(stat.clone()),
    );
    let v = b.s::<FileList>();
    b.op(
        "GET",
        "/v1/sandboxes/:id/files/list",
        "files",
        "List a directory",
        q.clone(),
        None,
        200,
        Json(v),
    );
    let v = b.s::<MkdirRequest>();
    b.op(
        "POST",
        "/v1/sandboxes/:id/files/mkdir",
        "files",
        "Create a directory",
        vec![],
        Json(v),
        201,
        Json(stat.clone()),
    );
    let v = b.s::<MoveRequest>();
    b.op(
        "POST",
        "/v1/sandboxes/:id/files/move",
        "files",
        "Move or rename a path",
        vec![],
        Json(v),
        200,
        Json(stat),
    );
    let v = b.s::<WatchEvent>();
    b.op(
        "GET",
        "/v1/sandboxes/:id/files/watch",
        "files",
        "Follow changes under a path as NDJSON",
        q,
        None,
        200,
        Lines(v),
    );
    // Developer tools
    let v = b.s::<crate::devtools::Egress>();
    b.op(
        "GET",
        "/v1/sandboxes/:id/egress",
        "devtools",
        "The sandbox's egress policy and refused packets",
        vec![],
        None,
        200,
        Json(v.clone()),
    );
    b.op(
        "PUT",
        "/v1/sandboxes/:id/egress",
        "devtools",
        "Change the egress allow-list of a live sandbox",
        vec![],
        Json(v.clone()),
        200,
        Json(v),
    );
    let q = b.q::<crate::devtools::PortsQuery>();
    let v = b.s::<crate::devtools::PortList>();
    b.op(
        "GET",
        "/v1/sandboxes/:id/ports",
        "devtools",
        "Listening TCP ports (with watch=true, an NDJSON stream of changes)",
        q,
        None,
        200,
        Json(v),
    );
    b.op(
        "GET",
        "/v1/sandboxes/:id/ports/:port",
        "devtools",
        "Preview: proxied to the port (any method; WebSocket upgrades pass through)",
        vec![],
        None,
        200,
        Any,
    );
    b.op(
        "GET",
        "/v1/sandboxes/:id/ports/:port/",
        "devtools",
        "Preview root (any method)",
        vec![],
        None,
        200,
        Any,
    );
    b.op(
        "GET",
        "/v1/sandboxes/:id/ports/:port/*path",
        "devtools",
        "Preview of a path (any method)",
        vec![],
        None,
        200,
        Any,
    );
    let v = b.s::<crate::devtools::GitRequest>();
    b.op(
        "POST",
        "/v1/sandboxes/:id/git/:op",
        "devtools",
        "git: clone, status, diff, add, commit, log, branch, checkout, push, pull",
        vec![],
        Json(v),
        200,
        Json(json!({"type": "object"})),
    );
    let v = b.s::<crate::devtools::LspRequest>();
    b.op("POST", "/v1/sandboxes/:id/lsp/:op", "devtools", "Language servers: diagnostics, definition, references, hover, symbols, workspace_symbols, completion, rename, status", vec![], Json(v), 200, Json(json!({"type": "object"})));
    let q = b.q::<crate::devtools::LspWsQuery>();
    b.op(
        "GET",
        "/v1/sandboxes/:id/lsp/ws",
        "devtools",
        "Raw LSP JSON-RPC over a WebSocket",
        q,
        None,
        101,
        None,
    )
    .websocket = true;
    // Templates
    let v = b.s::<TemplateList>();
    b.op(
        "GET",
        "/v1/templates",
        "templates",
        "List templates",
        vec![],
        None,
        200,
        Json(v),
    );
    let v = json!({"type": "object", "description": "the template's manifest: layers, roles, sizes, tools"});
    b.op(
        "GET",
        "/v1/templates/:name",
        "templates",
        "Inspect a template",
        vec![],
        None,
        200,
        Json(v),
    );
    let (req, res) = (
        b.s::<kiln_template::spec::TemplateSpec>(),
        b.s::<crate::templates::PrivateTemplate>(),
    );
    b.op(
        "PUT",
        "/v1/templates/:name",
        "templates",
        "Create (201) or replace (200) a private template of the organisation over the shipped roles",
        vec![],
        Json(req),
        201,
        Json(res),
    )
    .ok_also = Some(200);
    b.op(
        "DELETE",
        "/v1/templates/:name",
        "templates",
        "Remove a template: a private one entirely, a public one's ref (system organisation); layers go at the next gc",
        vec![],
        None,
        204,
        None,
    );
    let q = b.q::<crate::templates::BuildQuery>();
    b.op(
        "POST",
        "/v1/templates/:name/build",
        "templates",
        "Build a template; streams build events as NDJSON",
        q,
        None,
        200,
        Lines(json!({"type": "object"})),
    );
    b.op(
        "POST",
        "/v1/templates/gc",
        "templates",
        "Remove layers no template uses",
        vec![],
        None,
        200,
        Json(json!({"type": "object"})),
    );
    // Control plane
    let v = b.s::<Me>();
    b.op(
        "GET",
        "/v1/me",
        "control plane",
        "The calling key and its effective permissions",
        vec![],
        None,
        200,
        Json(v),
    );
    let v = b.s::<OrgList>();
    b.op(
        "GET",
        "/v1/orgs",
        "control plane",
        "List organisations",
        vec![],
        None,
        200,
        Json(v),
    );
    let (req, res) = (b.s::<CreateOrg>(), b.s::<OrgCreated>());
    b.op(
        "POST",
        "/v1/orgs",
        "control plane",
        "Create an organisation (and its owner key)",
        vec![],
        Json(req),
        201,
        Json(res),
    );
    let v = b.s::<Org>();
    b.op(
        "GET",
        "/v1/orgs/:org",
        "control plane",
        "Get an organisation",
        vec![],
        None,
        200,
        Json(v),
    );
    let (req, res) = (b.s::<Quota>(), b.s::<QuotaStatus>());
    b.op(
        "GET",
        "/v1/orgs/:org/quota",
        "control plane",
        "An organisation's quota and current use",
        vec![],
        None,
        200,
        Json(res.clone()),
    );
    b.op(
        "PUT",
        "/v1/orgs/:org/quota",
        "control plane",
        "Change an organisation's quota",
        vec![],
        Json(req),
        200,
        Json(res),
    );
    let (req, res) = (b.s::<Option<RateLimits>>(), b.s::<RateLimitStatus>());
    b.op(
        "GET",
        "/v1/orgs/:org/rate-limits",
        "control plane",
        "An organisation's per-key rate limits",
        vec![],
        None,
        200,
        Json(res.clone()),
    );
    b.op(
        "PUT",
        "/v1/orgs/:org/rate-limits",
        "control plane",
        "Set (or with null, reset) an organisation's rate limits",
        vec![],
        Json(req),
        200,
        Json(res),
    );
    let q = b.q::<crate::admin::OrgQuery>();
    let v = b.s::<KeyList>();
    b.op(
        "GET",
        "/v1/keys",
        "control plane",
        "List API keys (hashes are never shown)",
        q.clone(),
        None,
        200,
        Json(v),
    );
    let (req, res) = (b.s::<CreateKey>(), b.s::<KeyCreated>());
    b.op(
        "POST",
        "/v1/keys",
        "control plane",
        "Create a key (never with more rights than the caller); the secret is shown once",
        vec![],
        Json(req),
        201,
        Json(res),
    );
    b.op(
        "DELETE",
        "/v1/keys/:id",
        "control plane",
        "Revoke a key (effective on its next request)",
        q,
        None,
        204,
        None,
    );
    let q = b.q::<crate::admin::AuditQuery>();
    let v = b.s::<AuditList>();
    b.op(
        "GET",
        "/v1/audit",
        "control plane",
        "The audit log, newest first",
        q,
        None,
        200,
        Json(v),
    );
    let q = b.q::<crate::metering::UsageQuery>();
    let v = b.s::<UsageReport>();
    b.op(
        "GET",
        "/v1/usage",
        "control plane",
        "Metered usage (sandbox time, agent tokens and cost) by hour or day, optionally by key, sandbox, template, agent run or model",
        q.clone(),
        None,
        200,
        Json(v),
    );
    let v = b.s::<UsageEventList>();
    b.op(
        "GET",
        "/v1/usage/events",
        "control plane",
        "The raw usage events (CloudEvents 1.0)",
        q,
        None,
        200,
        Json(v),
    );
    // Agents
    let run = b.s::<crate::agents::Run>();
    let v = b.s::<kiln_agent::runner::StartRun>();
    b.op(
        "POST",
        "/v1/agents",
        "agents",
        "Start an agent run",
        vec![],
        Json(v),
        201,
        Json(run.clone()),
    );
    let q = b.q::<crate::agents::ListQuery>();
    let list = json!({"type": "object", "properties": {"runs": {"type": "array", "items": run}}, "required": ["runs"]});
    b.op(
        "GET",
        "/v1/agents",
        "agents",
        "List agent runs",
        q,
        None,
        200,
        Json(list),
    );
    b.op(
        "GET",
        "/v1/agents/:id",
        "agents",
        "A run with its sub-agents (`children`)",
        vec![],
        None,
        200,
        Json(run),
    );
    let q = b.q::<crate::agents::EventsQuery>();
    b.op("GET", "/v1/agents/:id/events", "agents", "A run's events as NDJSON (or SSE with Accept: text/event-stream); with follow=true, live until it ends", q, None, 200, Lines(json!({"type": "object"})));
    let v = b.s::<crate::agents::ApproveBody>();
    b.op(
        "POST",
        "/v1/agents/:id/approvals/:call",
        "agents",
        "Answer a pending approval",
        vec![],
        Json(v),
        204,
        None,
    );
    b.op(
        "POST",
        "/v1/agents/:id/stop",
        "agents",
        "Stop a run",
        vec![],
        None,
        202,
        None,
    );
    // SSH and previews
    let v = b.s::<SshInfo>();
    b.op(
        "GET",
        "/v1/ssh",
        "devtools",
        "The SSH front door: whether it listens, its port and host key",
        vec![],
        None,
        200,
        Json(v),
    );
    let v = b.s::<SshKeyList>();
    b.op(
        "GET",
        "/v1/ssh-keys",
        "devtools",
        "The organisation's SSH public keys",
        vec![],
        None,
        200,
        Json(v),
    );
    let (req, res) = (b.s::<AddSshKey>(), b.s::<SshKey>());
    b.op(
        "POST",
        "/v1/ssh-keys",
        "devtools",
        "Register an SSH public key (opens every sandbox of the organisation)",
        vec![],
        Json(req),
        201,
        Json(res),
    );
    b.op(
        "DELETE",
        "/v1/ssh-keys/:id",
        "devtools",
        "Remove an SSH key (by id or fingerprint)",
        vec![],
        None,
        204,
        None,
    );
    let v = b.s::<GitCredentialList>();
    b.op(
        "GET",
        "/v1/git-credentials",
        "devtools",
        "The organisation's stored git credentials (never their passwords)",
        vec![],
        None,
        200,
        Json(v),
    );
    let (req, res) = (b.s::<AddGitCredential>(), b.s::<GitCredential>());
    b.op(
        "POST",
        "/v1/git-credentials",
        "devtools",
        "Store a credential for an https git host (used by clone, push and pull in the organisation's sandboxes)",
        vec![],
        Json(req),
        201,
        Json(res),
    );
    b.op(
        "DELETE",
        "/v1/git-credentials/:id",
        "devtools",
        "Remove a stored git credential (by id or host)",
        vec![],
        None,
        204,
        None,
    );
    let v = b.s::<GitDefaults>();
    b.op(
        "GET",
        "/v1/orgs/:org/git",
        "control plane",
        "An organisation's git defaults (commit author)",
        vec![],
        None,
        200,
        Json(v.clone()),
    );
    b.op(
        "PUT",
        "/v1/orgs/:org/git",
        "control plane",
        "Set (or with a null author, reset) an organisation's git defaults",
        vec![],
        Json(v.clone()),
        200,
        Json(v),
    );
    let (req, res) = (
        b.s::<crate::preview::TokenRequest>(),
        b.s::<crate::preview::PreviewToken>(),
    );
    b.op(
        "POST",
        "/v1/sandboxes/:id/previews/:port/token",
        "devtools",
        "An access token for a wildcard-domain preview of a port",
        vec![],
        Json(req),
        201,
        Json(res),
    );
    // Knowledge
    let obj = json!({"type": "object"});
    let v = b.s::<crate::knowledge::CreateIndex>();
    b.op(
        "POST",
        "/v1/indexes",
        "knowledge",
        "Create an index of a source: a host directory (system organisation only), a git URL, or a sandbox of the organisation (followed live); optionally encrypted at rest",
        vec![],
        Json(v),
        201,
        Json(obj.clone()),
    );
    b.op(
        "GET",
        "/v1/indexes",
        "knowledge",
        "List the organisation's indexes",
        vec![],
        None,
        200,
        Json(obj.clone()),
    );
    b.op(
        "GET",
        "/v1/indexes/:name",
        "knowledge",
        "An index's statistics (files, chunks, cache hit rates, git revision, follower state, source error)",
        vec![],
        None,
        200,
        Json(obj.clone()),
    );
    b.op(
        "DELETE",
        "/v1/indexes/:name",
        "knowledge",
        "Erase an index and everything derived from its source",
        vec![],
        None,
        204,
        None,
    );
    b.op(
        "POST",
        "/v1/indexes/:name/sync",
        "knowledge",
        "Sync an index incrementally (a git source is fetched first); streams progress as NDJSON; 409 source_gone once a followed sandbox was removed",
        vec![],
        None,
        200,
        Lines(obj.clone()),
    );
    let v = b.s::<crate::knowledge::SearchReq>();
    b.op(
        "POST",
        "/v1/indexes/:name/search",
        "knowledge",
        "Hybrid search with filters on language, path glob and symbol kind",
        vec![],
        Json(v),
        200,
        Json(obj.clone()),
    );
    let v = b.s::<crate::knowledge::ContextReq>();
    b.op(
        "POST",
        "/v1/indexes/:name/context",
        "knowledge",
        "The best context for a query within a token budget",
        vec![],
        Json(v),
        200,
        Json(obj),
    );
    // Unauthenticated
    let v = b.s::<Health>();
    b.op(
        "GET",
        "/v1/health",
        "server",
        "Liveness and version",
        vec![],
        None,
        200,
        Json(v),
    )
    .auth = false;
    b.op(
        "GET",
        "/metrics",
        "server",
        "Prometheus metrics",
        vec![],
        None,
        200,
        Text,
    )
    .auth = false;
    b.op(
        "GET",
        "/openapi.json",
        "server",
        "This document",
        vec![],
        None,
        200,
        Json(json!({"type": "object"})),
    )
    .auth = false;
}

fn build() -> Value {
    let mut b = Builder {
        gen: SchemaSettings::draft2020_12()
            .with(|s| s.definitions_path = "/components/schemas".into())
            .into_generator(),
        ops: Vec::new(),
    };
    operations(&mut b);
    let error = b.s::<ErrorBody>();
    let mut paths = Map::new();
    for op in &b.ops {
        let path = openapi_path(op.path);
        let mut params: Vec<Value> = path
            .split('/')
            .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(path_param)
            .collect();
        params.extend(op.query.iter().cloned());
        let mut responses = Map::new();
        let mut ok = json!({ "description": "success" });
        if let Some(c) = content(&op.ok_body) {
            ok["content"] = c;
        }
        if op.websocket {
            ok["description"] = "switching protocols to a WebSocket".into();
        }
        if let Some(also) = op.ok_also {
            responses.insert(also.to_string(), ok.clone());
        }
        responses.insert(op.ok.to_string(), ok);
        for range in ["4XX", "5XX"] {
            responses.insert(
                range.into(),
                json!({"description": "an error", "content": { JSON: { "schema": error } }}),
            );
        }
        let method = op.method.to_lowercase();
        let mut o = json!({
            "tags": [op.tag],
            "summary": op.summary,
            "operationId": format!("{method}{}", path.replace(['/', '{', '}', '-', '.', '*'], "_")),
            "parameters": params,
            "responses": responses,
        });
        if let Some(c) = content(&op.body) {
            o["requestBody"] = json!({ "required": true, "content": c });
        }
        if !op.auth {
            o["security"] = json!([]);
        }
        paths
            .entry(path)
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .expect("object")
            .insert(method, o);
    }
    let schemas = Value::Object(b.gen.take_definitions(true));
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Kiln API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Sandboxes, templates, developer tools and the multi-tenant control plane of a Kiln server. Authenticate with `Authorization: Bearer kiln_...`. Errors are always {\"error\":{\"code\",\"message\",\"hint\"}}.",
        },
        "servers": [{ "url": "/" }],
        "security": [{ "bearer": [] }],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } },
        },
    })
}

/// The document (built once).
pub fn spec() -> &'static Value {
    static SPEC: OnceLock<Value> = OnceLock::new();
    SPEC.get_or_init(build)
}

/// `(method, route)` of every described operation, in axum's route syntax.
pub fn described() -> Vec<(String, String)> {
    let mut out = Vec::new();
    if let Some(paths) = spec()["paths"].as_object() {
        for (path, item) in paths {
            for method in item
                .as_object()
                .map(|m| m.keys().cloned().collect::<Vec<_>>())
                .unwrap_or_default()
            {
                out.push((method.to_uppercase(), path.clone()));
            }
        }
    }
    out
}

/// `GET /openapi.json`.
pub async fn serve() -> axum::Json<Value> {
    axum::Json(spec().clone())
}
