//! The MCP client: connects to the MCP servers of the agent config (stdio servers started as
//! child processes, streamable-HTTP servers by URL) with the official `rmcp` crate, and
//! offers their tools to agents as [`Tool`]s named `<server>__<tool>`. A call's arguments are
//! checked against the tool's input schema before anything is sent ([`validate`]); the
//! result comes back as text, which the loop wraps as untrusted tool output like any other.
//! Permissions apply as to built-in tools: the name is what policies and profiles match
//! (`fs__*` matches every tool of server `fs`).
//!
//! When more MCP tools are configured than `max_tools`, they are deferred: the model gets a
//! `search_tools` tool instead, and only the tools it finds are offered from then on (see
//! [`crate::tools::Registry::search`]).

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rmcp::service::RunningService;
use rmcp::{RoleClient, ServiceExt};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::model::ToolSpec;
use crate::runner::Env;
use crate::tools::{truncate, Tool, ToolCtx};

/// Separates the server name from the tool name.
pub const SEP: &str = "__";

/// The `[mcp]` table of the agent config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct McpConfig {
    /// Offer at most this many MCP tools up front; beyond it, every MCP tool is found
    /// through `search_tools` instead.
    pub max_tools: usize,
    pub servers: BTreeMap<String, McpServerConfig>,
}

impl Default for McpConfig {
    fn default() -> Self {
        McpConfig {
            max_tools: 32,
            servers: BTreeMap::new(),
        }
    }
}

/// One MCP server: `command` (stdio) or `url` (streamable HTTP).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct McpServerConfig {
    /// Program of a stdio server, started on the Kiln server's host.
    pub command: Option<String>,
    pub args: Vec<String>,
    /// Environment of a stdio server (added to the server's own).
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    /// URL of a streamable-HTTP server, e.g. `http://127.0.0.1:8000/mcp`.
    pub url: Option<String>,
    /// Name of an environment variable of the Kiln server holding a bearer token for `url`.
    pub bearer_token_env: Option<String>,
    /// Per-call time limit in seconds (default 60).
    pub timeout_secs: Option<f64>,
}

/// MCP failures; each names the server.
#[derive(Debug, thiserror::Error)]
pub enum McpError {
    #[error("MCP server name `{0}` must be [a-z0-9_-] without `__`")]
    Name(String),
    #[error("MCP server `{0}`: give exactly one of `command` (stdio) or `url` (streamable HTTP)")]
    Transport(String),
    #[error("MCP server `{server}`: cannot start `{command}`: {error}")]
    Spawn {
        server: String,
        command: String,
        error: String,
    },
    #[error("MCP server `{server}`: {error}")]
    Protocol { server: String, error: String },
}

/// A connected server and its tools.
pub struct McpServer {
    pub name: String,
    cfg: McpServerConfig,
    env: Env,
    client: tokio::sync::Mutex<Option<RunningService<RoleClient, ()>>>,
    /// (tool name, description, input schema) as the server listed them.
    pub tools: Vec<(String, String, Value)>,
}

impl McpServer {
    /// Connects and lists the server's tools.
    pub async fn connect(
        name: &str,
        cfg: McpServerConfig,
        env: Env,
    ) -> Result<Arc<McpServer>, McpError> {
        if name.is_empty()
            || name.contains(SEP)
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        {
            return Err(McpError::Name(name.into()));
        }
        let mut s = McpServer {
            name: name.into(),
            cfg,
            env,
            client: tokio::sync::Mutex::new(None),
            tools: Vec::new(),
        };
        let client = s.open().await?;
        let perr = |e: String| McpError::Protocol {
            server: name.into(),
            error: e,
        };
        let listed = client
            .list_all_tools()
            .await
            .map_err(|e| perr(format!("listing tools: {e}")))?;
        for t in listed {
            let v = serde_json::to_value(&t).map_err(|e| perr(e.to_string()))?;
            let schema = match v.get("inputSchema") {
                Some(Value::Object(o)) => Value::Object(o.clone()),
                _ => serde_json::json!({"type": "object"}),
            };
            s.tools.push((
                t.name.to_string(),
                t.description.as_deref().unwrap_or_default().to_string(),
                schema,
            ));
        }
        *s.client.get_mut() = Some(client);
        tracing::info!(server = %name, tools = s.tools.len(), "MCP server connected");
        Ok(Arc::new(s))
    }

    async fn open(&self) -> Result<RunningService<RoleClient, ()>, McpError> {
        let perr = |e: String| McpError::Protocol {
            server: self.name.clone(),
            error: e,
        };
        match (&self.cfg.command, &self.cfg.url) {
            (Some(command), None) => {
                let mut cmd = tokio::process::Command::new(command);
                cmd.args(&self.cfg.args).envs(&self.cfg.env);
                if let Some(d) = &self.cfg.cwd {
                    cmd.current_dir(d);
                }
                let (transport, stderr) = rmcp::transport::TokioChildProcess::builder(cmd)
                    .stderr(Stdio::piped())
                    .spawn()
                    .map_err(|e| McpError::Spawn {
                        server: self.name.clone(),
                        command: command.clone(),
                        error: e.to_string(),
                    })?;
                if let Some(err) = stderr {
                    let server = self.name.clone();
                    tokio::spawn(async move {
                        use tokio::io::AsyncBufReadExt;
                        let mut lines = tokio::io::BufReader::new(err).lines();
                        while let Ok(Some(l)) = lines.next_line().await {
                            tracing::debug!(%server, "MCP server stderr: {l}");
                        }
                    });
                }
                ().serve(transport)
                    .await
                    .map_err(|e| perr(format!("initialising over stdio: {e}")))
            }
            (None, Some(url)) => {
                use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
                let mut c = StreamableHttpClientTransportConfig::with_uri(url.as_str());
                if let Some(var) = &self.cfg.bearer_token_env {
                    match (self.env)(var) {
                        Some(token) => c = c.auth_header(token),
                        None => {
                            return Err(perr(format!(
                                "bearer_token_env names `{var}`, which is not set"
                            )))
                        }
                    }
                }
                let transport = rmcp::transport::StreamableHttpClientTransport::from_config(c);
                ().serve(transport)
                    .await
                    .map_err(|e| perr(format!("initialising over HTTP at {url}: {e}")))
            }
            _ => Err(McpError::Transport(self.name.clone())),
        }
    }

    /// Calls a tool of this server; `Err` is a message for the model. A server that went
    /// away (its process died, its session ended) is reconnected before the call, never
    /// after a call was sent, so no call runs twice.
    pub async fn call(&self, tool: &str, args: Value, budget: usize) -> Result<String, String> {
        let timeout = Duration::from_secs_f64(self.cfg.timeout_secs.unwrap_or(60.0).max(0.1));
        let peer = {
            let mut g = self.client.lock().await;
            let dead = g
                .as_ref()
                .map(|c| c.is_closed() || c.is_transport_closed())
                .unwrap_or(true);
            if dead {
                tracing::info!(server = %self.name, "reconnecting to MCP server");
                *g = Some(self.open().await.map_err(|e| e.to_string())?);
            }
            match g.as_ref() {
                Some(c) => c.peer().clone(),
                None => return Err(format!("MCP server `{}` is not connected", self.name)),
            }
        };
        let mut p = rmcp::model::CallToolRequestParams::new(tool.to_string());
        p.arguments = args.as_object().cloned();
        let r = tokio::time::timeout(timeout, peer.call_tool(p))
            .await
            .map_err(|_| {
                format!(
                    "MCP server `{}` did not answer `{tool}` within {} s",
                    self.name,
                    timeout.as_secs_f64()
                )
            })?
            .map_err(|e| format!("MCP server `{}` failed on `{tool}`: {e}", self.name))?;
        let v = serde_json::to_value(&r).map_err(|e| e.to_string())?;
        let text = render_result(&v);
        if v["isError"].as_bool().unwrap_or(false) {
            Err(truncate(
                &format!("the tool reported an error: {text}"),
                budget,
            ))
        } else {
            Ok(truncate(&text, budget))
        }
    }

    /// Closes the connection (a stdio server's process ends).
    pub async fn close(&self) {
        if let Some(c) = self.client.lock().await.take() {
            let _ = c.cancel().await;
        }
    }
}

/// A tool result as text: text blocks verbatim, other blocks described, structured
/// content as JSON when there is nothing else.
pub fn render_result(v: &Value) -> String {
    let mut parts = Vec::new();
    for b in v["content"].as_array().into_iter().flatten() {
        let s = match b["type"].as_str().unwrap_or_default() {
            "text" => b["text"].as_str().unwrap_or_default().to_string(),
            "image" | "audio" => format!(
                "[{} {}, {} bytes of base64]",
                b["type"].as_str().unwrap_or_default(),
                b["mimeType"].as_str().unwrap_or("?"),
                b["data"].as_str().map_or(0, str::len)
            ),
            "resource" => match b["resource"]["text"].as_str() {
                Some(t) => t.to_string(),
                None => format!(
                    "[resource {}]",
                    b["resource"]["uri"].as_str().unwrap_or("?")
                ),
            },
            "resource_link" => format!("[resource link {}]", b["uri"].as_str().unwrap_or("?")),
            other => format!("[{other} content]"),
        };
        parts.push(s);
    }
    if parts.is_empty() {
        if let Some(s) = v.get("structuredContent") {
            return s.to_string();
        }
    }
    parts.join("\n")
}

/// One tool of one MCP server, as agents see it.
pub struct McpTool {
    server: Arc<McpServer>,
    tool: String,
    description: String,
    schema: Value,
}

#[async_trait]
impl Tool for McpTool {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: format!("{}{SEP}{}", self.server.name, self.tool),
            description: format!("[MCP server {}] {}", self.server.name, self.description),
            parameters: self.schema.clone(),
        }
    }

    async fn run(&self, ctx: &ToolCtx, args: Value) -> Result<String, String> {
        validate(&self.schema, &args, "arguments").map_err(|e| {
            format!(
                "invalid arguments for `{}{SEP}{}`: {e}; nothing was sent",
                self.server.name, self.tool
            )
        })?;
        self.server.call(&self.tool, args, ctx.output_budget).await
    }
}

/// Every configured MCP server, connected.
#[derive(Default)]
pub struct McpHub {
    pub servers: Vec<Arc<McpServer>>,
    /// MCP tools beyond the config's `max_tools` are found through `search_tools`.
    pub deferred: bool,
}

impl McpHub {
    /// Connects to every server of `cfg`. A server that fails is reported and left out; the
    /// others still serve.
    pub async fn connect(cfg: &McpConfig, env: Env) -> (McpHub, Vec<McpError>) {
        let mut hub = McpHub::default();
        let mut errors = Vec::new();
        for (name, sc) in &cfg.servers {
            match McpServer::connect(name, sc.clone(), env.clone()).await {
                Ok(s) => hub.servers.push(s),
                Err(e) => errors.push(e),
            }
        }
        hub.deferred = hub.tools().len() > cfg.max_tools;
        (hub, errors)
    }

    /// Every tool of every server.
    pub fn tools(&self) -> Vec<Arc<dyn Tool>> {
        self.servers
            .iter()
            .flat_map(|s| {
                s.tools.iter().map(|(t, d, schema)| {
                    Arc::new(McpTool {
                        server: s.clone(),
                        tool: t.clone(),
                        description: d.clone(),
                        schema: schema.clone(),
                    }) as Arc<dyn Tool>
                })
            })
            .collect()
    }

    pub async fn close(&self) {
        for s in &self.servers {
            s.close().await;
        }
    }
}

// ------------------------------------------------------------------------------------
// Argument validation

fn type_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(n) if n.as_f64().is_some_and(|f| f.fract() == 0.0) => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn type_ok(want: &str, v: &Value) -> bool {
    let have = type_of(v);
    want == have || (want == "number" && have == "integer")
}

/// Checks `v` against a JSON Schema: the keywords MCP tool schemas use (`type`, `properties`,
/// `required`, `additionalProperties`, `items`, `enum`, `const`, numeric and length bounds,
/// `anyOf`/`oneOf`/`allOf`, local `$ref`s to `$defs`/`definitions`). Other keywords are
/// annotations here and are not checked. The error names the path of the first problem.
pub fn validate(schema: &Value, v: &Value, path: &str) -> Result<(), String> {
    validate_in(schema, schema, v, path, 0)
}

fn validate_in(root: &Value, s: &Value, v: &Value, path: &str, depth: u32) -> Result<(), String> {
    if depth > 32 {
        return Err(format!("{path}: schema nests too deeply"));
    }
    let s = match s {
        Value::Bool(true) => return Ok(()),
        Value::Bool(false) => return Err(format!("{path}: no value is allowed here")),
        Value::Object(o) => o,
        _ => return Ok(()),
    };
    if let Some(r) = s.get("$ref").and_then(Value::as_str) {
        let target = r
            .strip_prefix("#/")
            .map(|p| {
                p.split('/').try_fold(root, |node, key| {
                    node.get(key.replace("~1", "/").replace("~0", "~"))
                })
            })
            .unwrap_or(None);
        match target {
            Some(t) => validate_in(root, t, v, path, depth + 1)?,
            None => {
                return Err(format!(
                    "{path}: the schema's reference `{r}` cannot be resolved"
                ))
            }
        }
    }
    match s.get("type") {
        Some(Value::String(t)) if !type_ok(t, v) => {
            return Err(format!("{path} must be {t}, not {}", type_of(v)))
        }
        Some(Value::Array(ts)) if !ts.iter().filter_map(Value::as_str).any(|t| type_ok(t, v)) => {
            let names: Vec<&str> = ts.iter().filter_map(Value::as_str).collect();
            return Err(format!(
                "{path} must be one of {}, not {}",
                names.join("/"),
                type_of(v)
            ));
        }
        _ => {}
    }
    if let Some(Value::Array(allowed)) = s.get("enum") {
        if !allowed.contains(v) {
            return Err(format!(
                "{path} must be one of {}",
                Value::Array(allowed.clone())
            ));
        }
    }
    if let Some(c) = s.get("const") {
        if c != v {
            return Err(format!("{path} must be {c}"));
        }
    }
    if let Some(x) = v.as_f64() {
        let bound = |k: &str| s.get(k).and_then(Value::as_f64);
        if let Some(m) = bound("minimum").filter(|m| x < *m) {
            return Err(format!("{path} must be >= {m}"));
        }
        if let Some(m) = bound("maximum").filter(|m| x > *m) {
            return Err(format!("{path} must be <= {m}"));
        }
        if let Some(m) = bound("exclusiveMinimum").filter(|m| x <= *m) {
            return Err(format!("{path} must be > {m}"));
        }
        if let Some(m) = bound("exclusiveMaximum").filter(|m| x >= *m) {
            return Err(format!("{path} must be < {m}"));
        }
    }
    let len_bound = |k: &str| s.get(k).and_then(Value::as_u64);
    if let Some(t) = v.as_str() {
        let n = t.chars().count() as u64;
        if let Some(m) = len_bound("minLength").filter(|m| n < *m) {
            return Err(format!("{path} must have at least {m} characters"));
        }
        if let Some(m) = len_bound("maxLength").filter(|m| n > *m) {
            return Err(format!("{path} must have at most {m} characters"));
        }
    }
    if let Some(items) = v.as_array() {
        let n = items.len() as u64;
        if let Some(m) = len_bound("minItems").filter(|m| n < *m) {
            return Err(format!("{path} must have at least {m} items"));
        }
        if let Some(m) = len_bound("maxItems").filter(|m| n > *m) {
            return Err(format!("{path} must have at most {m} items"));
        }
        if let Some(is) = s.get("items") {
            for (i, item) in items.iter().enumerate() {
                validate_in(root, is, item, &format!("{path}[{i}]"), depth + 1)?;
            }
        }
    }
    if let Some(obj) = v.as_object() {
        let props = s.get("properties").and_then(Value::as_object);
        for r in s
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            if !obj.contains_key(r) {
                return Err(format!("{path}.{r} is required"));
            }
        }
        for (k, val) in obj {
            match props.and_then(|p| p.get(k)) {
                Some(ps) => validate_in(root, ps, val, &format!("{path}.{k}"), depth + 1)?,
                None => match s.get("additionalProperties") {
                    Some(Value::Bool(false)) => {
                        let known: Vec<&String> =
                            props.map(|p| p.keys().collect()).unwrap_or_default();
                        return Err(format!(
                            "{path}.{k} is not a known property (known: {})",
                            known
                                .iter()
                                .map(|s| s.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ));
                    }
                    Some(extra @ Value::Object(_)) => {
                        validate_in(root, extra, val, &format!("{path}.{k}"), depth + 1)?
                    }
                    _ => {}
                },
            }
        }
    }
    if let Some(Value::Array(all)) = s.get("allOf") {
        for sub in all {
            validate_in(root, sub, v, path, depth + 1)?;
        }
    }
    if let Some(Value::Array(any)) = s.get("anyOf") {
        let errs: Vec<String> = any
            .iter()
            .filter_map(|sub| validate_in(root, sub, v, path, depth + 1).err())
            .collect();
        if errs.len() == any.len() && !any.is_empty() {
            return Err(format!(
                "{path} matches none of the allowed forms ({})",
                errs.join("; ")
            ));
        }
    }
    if let Some(Value::Array(one)) = s.get("oneOf") {
        let ok = one
            .iter()
            .filter(|sub| validate_in(root, sub, v, path, depth + 1).is_ok())
            .count();
        if ok != 1 {
            return Err(format!(
                "{path} must match exactly one of {} forms (matches {ok})",
                one.len()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn arguments_are_checked_against_the_schema() {
        let schema = json!({
            "type": "object",
            "properties": {
                "path": {"type": "string", "minLength": 1},
                "head": {"type": "integer", "minimum": 1},
                "mode": {"enum": ["a", "b"]},
                "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
                "edit": {"$ref": "#/$defs/Edit"}
            },
            "required": ["path"],
            "additionalProperties": false,
            "$defs": {"Edit": {"type": "object", "required": ["old"], "properties": {"old": {"type": "string"}}}}
        });
        let cases = [
            json!({"path": "a.txt"}),
            json!({"path": "a.txt", "head": 3, "mode": "b", "tags": ["x"], "edit": {"old": "o"}}),
            json!({}),
            json!({"path": ""}),
            json!({"path": "a", "head": 0}),
            json!({"path": "a", "head": 1.5}),
            json!({"path": "a", "mode": "c"}),
            json!({"path": "a", "tags": ["x", 1]}),
            json!({"path": "a", "tags": ["x", "y", "z"]}),
            json!({"path": "a", "bogus": true}),
            json!({"path": "a", "edit": {}}),
            json!("not an object"),
        ];
        let got: Vec<String> = cases
            .iter()
            .map(|c| match validate(&schema, c, "arguments") {
                Ok(()) => "ok".into(),
                Err(e) => e,
            })
            .collect();
        expect_test::expect![[r#"
            [
                "ok",
                "ok",
                "arguments.path is required",
                "arguments.path must have at least 1 characters",
                "arguments.head must be >= 1",
                "arguments.head must be integer, not number",
                "arguments.mode must be one of [\"a\",\"b\"]",
                "arguments.tags[1] must be string, not integer",
                "arguments.tags must have at most 2 items",
                "arguments.bogus is not a known property (known: edit, head, mode, path, tags)",
                "arguments.edit.old is required",
                "arguments must be object, not string",
            ]
        "#]]
        .assert_debug_eq(&got);
        let any = json!({"anyOf": [{"type": "string"}, {"type": "null"}]});
        assert!(validate(&any, &json!(null), "x").is_ok());
        assert!(validate(&any, &json!(3), "x").is_err());
    }

    #[test]
    fn results_render_as_text() {
        let v = json!({"content": [
            {"type": "text", "text": "hello"},
            {"type": "image", "mimeType": "image/png", "data": "AAAA"},
            {"type": "resource", "resource": {"uri": "file:///a", "text": "body"}}
        ]});
        expect_test::expect![[r#"
            hello
            [image image/png, 4 bytes of base64]
            body"#]]
        .assert_eq(&render_result(&v));
        assert_eq!(
            render_result(&json!({"content": [], "structuredContent": {"n": 1}})),
            r#"{"n":1}"#
        );
    }
}
