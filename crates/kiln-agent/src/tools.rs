//! Typed tools over a sandbox. Each tool's arguments are a Rust type with a JSON schema
//! (`schemars`) offered to the model; a call is validated against that type before anything
//! runs. What tools need from a sandbox is the [`Sandbox`] trait (the server implements it
//! over kilnd and kiln-devtools); further tools (knowledge search in `knowledge`, MCP servers
//! in `mcp`) plug in through [`Tool`] and [`Registry::register`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::config::glob_match;
use crate::model::ToolSpec;

/// A failure of the sandbox underneath a tool.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SandboxError {
    #[error("not found: {0}")]
    NotFound(String),
    #[error("{0}")]
    Failed(String),
}

/// The result of a command.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ExecOutput {
    pub stdout: String,
    pub stderr: String,
    pub exit_code: Option<i32>,
    pub timed_out: bool,
}

/// A directory entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    pub path: String,
    pub dir: bool,
    pub size: u64,
}

/// What tools need from a sandbox.
#[async_trait]
pub trait Sandbox: Send + Sync {
    fn id(&self) -> &str;
    /// Runs `cmd` (argv) in `cwd`, killed after `timeout`.
    async fn exec(
        &self,
        cmd: &[String],
        cwd: &str,
        timeout: Duration,
    ) -> Result<ExecOutput, SandboxError>;
    async fn read_file(&self, path: &str) -> Result<Vec<u8>, SandboxError>;
    /// Writes atomically, creating parent directories.
    async fn write_file(&self, path: &str, data: &[u8]) -> Result<(), SandboxError>;
    async fn list(&self, path: &str, depth: u32) -> Result<Vec<Entry>, SandboxError>;
    /// Git: `status` `{repo}`, `diff` `{repo, staged}`, `commit` `{repo, message, all}`.
    async fn git(&self, op: &str, args: Value) -> Result<Value, SandboxError>;
    /// Language servers: `diagnostics` `{path}`, `definition`/`references` `{path, line, column}`.
    async fn lsp(&self, op: &str, args: Value) -> Result<Value, SandboxError>;
}

/// Creates and opens sandboxes for runs (the server scopes them to the run's organisation).
#[async_trait]
pub trait Sandboxes: Send + Sync {
    async fn create(&self, template: &str) -> Result<Arc<dyn Sandbox>, SandboxError>;
    async fn open(&self, id: &str) -> Result<Arc<dyn Sandbox>, SandboxError>;
    async fn remove(&self, id: &str) -> Result<(), SandboxError>;
}

/// What the multi-agent tools need from the loop (implemented by the runner).
#[async_trait]
pub trait AgentOps: Send + Sync {
    async fn spawn(&self, a: SpawnAgent) -> Result<Value, String>;
    async fn send(&self, a: SendMessage) -> Result<Value, String>;
    async fn wait(&self, a: WaitAgents) -> Result<Value, String>;
    async fn list(&self) -> Result<Value, String>;
    async fn close(&self, a: CloseAgent) -> Result<Value, String>;
}

/// Context a tool runs in.
#[derive(Clone)]
pub struct ToolCtx {
    /// The organisation the run belongs to (tools reach only its resources).
    pub org_id: String,
    pub sandbox: Arc<dyn Sandbox>,
    pub agents: Option<Arc<dyn AgentOps>>,
    /// Output beyond this many bytes is cut (head and tail kept) with a note.
    pub output_budget: usize,
}

/// A pluggable tool (knowledge, MCP, ...).
#[async_trait]
pub trait Tool: Send + Sync {
    fn spec(&self) -> ToolSpec;
    async fn run(&self, ctx: &ToolCtx, args: Value) -> Result<String, String>;
}

// ------------------------------------------------------------------------------------
// Argument types

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Exec {
    /// Shell command line, run with `sh -c`.
    pub cmd: String,
    /// Working directory (default /workspace).
    pub cwd: Option<String>,
    /// Kill after this many seconds (default 120, at most 3600).
    pub timeout_secs: Option<u64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReadFile {
    pub path: String,
    /// First line to return (1-based, inclusive).
    pub start_line: Option<u64>,
    /// Last line to return (1-based, inclusive).
    pub end_line: Option<u64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WriteFile {
    pub path: String,
    pub content: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Edit {
    pub path: String,
    /// Exact text to find (must occur exactly once unless `replace_all`).
    pub old: String,
    pub new: String,
    pub replace_all: Option<bool>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct List {
    /// Directory (default /workspace).
    pub path: Option<String>,
    /// 1 = entries only (default 2, at most 5).
    pub depth: Option<u32>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Glob {
    /// Pattern over paths relative to `path`; `*` matches any characters (also `/`).
    pub pattern: String,
    pub path: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Grep {
    /// Extended regular expression.
    pub pattern: String,
    pub path: Option<String>,
    /// Only files whose name matches this glob, e.g. `*.py`.
    pub include: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GitStatus {
    pub repo: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GitDiff {
    pub repo: Option<String>,
    pub staged: Option<bool>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GitCommit {
    pub repo: Option<String>,
    pub message: String,
    /// Stage every change first (`git add -A`).
    pub all: Option<bool>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LspFile {
    pub path: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LspPosition {
    pub path: String,
    /// 1-based line.
    pub line: u32,
    /// 1-based column (characters).
    pub column: u32,
}

/// Where a sub-agent works.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SandboxChoice {
    Shared,
    New,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SpawnAgent {
    /// Profile: planner, coder, reviewer, tester or one from the config.
    pub profile: String,
    pub task: String,
    /// `shared` (default): this agent's sandbox; `new`: a fresh one.
    pub sandbox: Option<SandboxChoice>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SendMessage {
    /// An agent id, or `parent`.
    pub agent: String,
    pub text: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WaitAgents {
    /// Agent ids; empty = all children.
    #[serde(default)]
    pub ids: Vec<String>,
    pub timeout_secs: Option<f64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListAgents {}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CloseAgent {
    pub agent: String,
}

/// The tool that finds deferred (MCP) tools and loads them for later steps.
pub const SEARCH_TOOLS: &str = "search_tools";

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SearchTools {
    /// Words describing the tool you need, e.g. `read file` or `weather`.
    pub query: String,
    /// At most this many tools (default 5, at most 20).
    pub limit: Option<usize>,
}

fn search_spec() -> ToolSpec {
    ToolSpec {
        name: SEARCH_TOOLS.into(),
        description: "Find more tools (from MCP servers) by describing what you need; the tools \
            found can be called from the next step on."
            .into(),
        parameters: schema::<SearchTools>(),
    }
}

/// The JSON schema offered to a model for an argument type (inlined, no `$schema` or title).
pub fn schema<T: JsonSchema>() -> Value {
    let mut v = schemars::generate::SchemaSettings::draft07()
        .with(|s| s.inline_subschemas = true)
        .into_generator()
        .into_root_schema_for::<T>()
        .to_value();
    if let Some(o) = v.as_object_mut() {
        o.remove("$schema");
        o.remove("title");
        o.remove("definitions");
        o.remove("$defs");
    }
    v
}

/// The built-in tools: (name, description, schema).
pub fn builtin_specs() -> Vec<ToolSpec> {
    let t = |name: &str, d: &str, p: Value| ToolSpec {
        name: name.into(),
        description: d.into(),
        parameters: p,
    };
    vec![
        t("exec", "Run a shell command in the sandbox; output is truncated to a budget.", schema::<Exec>()),
        t("read_file", "Read a file, optionally a range of lines.", schema::<ReadFile>()),
        t("write_file", "Create or overwrite a file.", schema::<WriteFile>()),
        t("edit", "Replace exact text in a file; fails and changes nothing when the text is not found exactly once.", schema::<Edit>()),
        t("list", "List a directory.", schema::<List>()),
        t("glob", "Find files whose path matches a pattern.", schema::<Glob>()),
        t("grep", "Search file contents with a regular expression.", schema::<Grep>()),
        t("git_status", "git status of a repository.", schema::<GitStatus>()),
        t("git_diff", "git diff of a repository.", schema::<GitDiff>()),
        t("git_commit", "Commit changes.", schema::<GitCommit>()),
        t("lsp_diagnostics", "Errors and warnings of a file from its language server.", schema::<LspFile>()),
        t("lsp_definition", "Where the symbol at a position is defined.", schema::<LspPosition>()),
        t("lsp_references", "Where the symbol at a position is used.", schema::<LspPosition>()),
        t("spawn_agent", "Start a sub-agent with a profile and a task; returns its id.", schema::<SpawnAgent>()),
        t("send_message", "Send a message to a sub-agent (or `parent`).", schema::<SendMessage>()),
        t("wait_agents", "Wait until sub-agents finish; returns their outcomes.", schema::<WaitAgents>()),
        t("list_agents", "List this agent's sub-agents and their states.", schema::<ListAgents>()),
        t("close_agent", "Stop a sub-agent.", schema::<CloseAgent>()),
    ]
}

/// Tools offered to a run: the built-ins (optionally restricted) and plugged-in tools.
/// Deferred plugins (MCP tools beyond the tool budget) are offered only once `search_tools`
/// found them ([`Registry::search`], [`Registry::set_loaded`]).
#[derive(Clone, Default)]
pub struct Registry {
    builtins: Vec<ToolSpec>,
    plugins: BTreeMap<String, Arc<dyn Tool>>,
    deferred: BTreeSet<String>,
    loaded: BTreeSet<String>,
}

/// Whether `name` is allowed by a list of names and `*` patterns (`fs__*`).
pub fn allowed_by(list: &[String], name: &str) -> bool {
    list.iter().any(|p| glob_match(p, name))
}

/// A call that could not run: the arguments did not validate, or the tool is unknown.
#[derive(Debug, Clone, PartialEq)]
pub enum CallError {
    /// Not JSON, or an unknown tool: the model is asked to repair the call.
    Malformed(String),
    /// The tool ran (or was refused) and failed; the message goes back to the model.
    Failed(String),
}

impl Registry {
    /// Built-ins restricted to `allowed` (`None` = all).
    pub fn new(allowed: Option<&[String]>) -> Registry {
        let builtins = builtin_specs()
            .into_iter()
            .filter(|s| match allowed {
                None => true,
                Some(a) => a.iter().any(|n| n == &s.name),
            })
            .collect();
        Registry {
            builtins,
            ..Registry::default()
        }
    }

    pub fn register(&mut self, tool: Arc<dyn Tool>) {
        self.plugins.insert(tool.spec().name, tool);
    }

    /// Registers a tool the model finds through `search_tools` instead of seeing it up front.
    pub fn register_deferred(&mut self, tool: Arc<dyn Tool>) {
        let name = tool.spec().name;
        self.deferred.insert(name.clone());
        self.plugins.insert(name, tool);
    }

    /// Keeps only tools that `allowed` names or matches (a child never gets more than its
    /// parent).
    pub fn restrict(&mut self, allowed: &[String]) {
        self.builtins.retain(|s| allowed_by(allowed, &s.name));
        self.plugins.retain(|n, _| allowed_by(allowed, n));
        let plugins = &self.plugins;
        self.deferred.retain(|n| plugins.contains_key(n));
    }

    /// Makes these deferred tools callable (the run's `tools_loaded` events).
    pub fn set_loaded(&mut self, names: &[String]) {
        self.loaded = names
            .iter()
            .filter(|n| self.deferred.contains(*n))
            .cloned()
            .collect();
    }

    /// Every tool the run may use (deferred ones included).
    pub fn names(&self) -> Vec<String> {
        self.builtins
            .iter()
            .map(|s| s.name.clone())
            .chain(self.plugins.keys().cloned())
            .collect()
    }

    /// What the model is offered now: built-ins, plugins that are not deferred, deferred
    /// ones already found, and `search_tools` while any are deferred.
    pub fn specs(&self) -> Vec<ToolSpec> {
        let mut v: Vec<ToolSpec> = self
            .builtins
            .iter()
            .cloned()
            .chain(
                self.plugins
                    .iter()
                    .filter(|(n, _)| !self.deferred.contains(*n) || self.loaded.contains(*n))
                    .map(|(_, t)| t.spec()),
            )
            .collect();
        if !self.deferred.is_empty() {
            v.push(search_spec());
        }
        v
    }

    pub fn has(&self, name: &str) -> bool {
        self.builtins.iter().any(|s| s.name == name)
            || self.plugins.contains_key(name)
            || (name == SEARCH_TOOLS && !self.deferred.is_empty())
    }

    /// Deferred tools matching `query` (words scored over name and description), best
    /// first.
    pub fn search(&self, query: &str, limit: usize) -> Vec<ToolSpec> {
        let words: Vec<String> = query
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .map(str::to_lowercase)
            .collect();
        let mut hits: Vec<(usize, ToolSpec)> = self
            .deferred
            .iter()
            .filter_map(|n| self.plugins.get(n))
            .map(|t| {
                let spec = t.spec();
                let name = spec.name.to_lowercase().replace('_', " ");
                let desc = spec.description.to_lowercase();
                let score = words
                    .iter()
                    .map(|w| {
                        2 * usize::from(name.contains(w.as_str()))
                            + usize::from(desc.contains(w.as_str()))
                    })
                    .sum();
                (score, spec)
            })
            .filter(|(score, _)| *score > 0)
            .collect();
        hits.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.name.cmp(&b.1.name)));
        hits.into_iter().take(limit).map(|(_, s)| s).collect()
    }

    /// Parses a call's arguments: JSON first (else `Malformed`), then the tool's type.
    pub fn parse_args(&self, name: &str, raw: &str) -> Result<Value, CallError> {
        if !self.has(name) {
            return Err(CallError::Malformed(format!(
                "unknown tool `{name}`; available: {}",
                self.specs()
                    .iter()
                    .map(|s| s.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        if self.deferred.contains(name) && !self.loaded.contains(name) {
            return Err(CallError::Malformed(format!(
                "tool `{name}` is not loaded yet: find it with `{SEARCH_TOOLS}` first"
            )));
        }
        let v: Value = serde_json::from_str(if raw.trim().is_empty() { "{}" } else { raw })
            .map_err(|e| {
                CallError::Malformed(format!("arguments of `{name}` are not valid JSON: {e}"))
            })?;
        if !v.is_object() {
            return Err(CallError::Malformed(format!(
                "arguments of `{name}` must be a JSON object"
            )));
        }
        Ok(v)
    }

    /// Validates and runs a call.
    pub async fn run(&self, ctx: &ToolCtx, name: &str, args: Value) -> Result<String, CallError> {
        if let Some(p) = self.plugins.get(name) {
            return p.run(ctx, args).await.map_err(CallError::Failed);
        }
        run_builtin(ctx, name, args).await
    }
}

fn typed<T: DeserializeOwned>(name: &str, v: Value) -> Result<T, CallError> {
    parse_args(name, v).map_err(CallError::Failed)
}

/// A call's arguments as the tool's type, or the message a model gets when they do not fit.
pub fn parse_args<T: DeserializeOwned>(name: &str, v: Value) -> Result<T, String> {
    serde_json::from_value(v)
        .map_err(|e| format!("invalid arguments for `{name}`: {e}; nothing was run"))
}

fn fail(e: SandboxError) -> CallError {
    CallError::Failed(e.to_string())
}

/// Cuts `s` to `budget` bytes, keeping head and tail, with a note saying so.
pub fn truncate(s: &str, budget: usize) -> String {
    if s.len() <= budget {
        return s.to_string();
    }
    let head_end = floor_char(s, budget * 2 / 3);
    let tail_start = ceil_char(s, s.len() - budget / 3);
    format!(
        "{}\n[... {} bytes omitted: output exceeded the {budget}-byte budget ...]\n{}",
        &s[..head_end],
        tail_start - head_end,
        &s[tail_start..]
    )
}

fn floor_char(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}
fn ceil_char(s: &str, mut i: usize) -> usize {
    while i < s.len() && !s.is_char_boundary(i) {
        i += 1;
    }
    i
}

fn abs(path: &str) -> String {
    if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/workspace/{path}")
    }
}

async fn sh(ctx: &ToolCtx, script: &str, cwd: &str, secs: u64) -> Result<ExecOutput, CallError> {
    ctx.sandbox
        .exec(
            &["sh".into(), "-c".into(), script.into()],
            cwd,
            Duration::from_secs(secs),
        )
        .await
        .map_err(fail)
}

/// Quotes for `sh`.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

async fn run_builtin(ctx: &ToolCtx, name: &str, v: Value) -> Result<String, CallError> {
    let budget = ctx.output_budget;
    let sb = &ctx.sandbox;
    match name {
        "exec" => {
            let a: Exec = typed(name, v)?;
            let secs = a.timeout_secs.unwrap_or(120).clamp(1, 3600);
            let cwd = a
                .cwd
                .as_deref()
                .map(abs)
                .unwrap_or_else(|| "/workspace".into());
            let o = sh(ctx, &a.cmd, &cwd, secs).await?;
            let mut out = String::new();
            if o.timed_out {
                out.push_str(&format!("[timed out after {secs} s and was killed]\n"));
            } else {
                out.push_str(&format!(
                    "[exit code {}]\n",
                    o.exit_code.map_or("none".into(), |c| c.to_string())
                ));
            }
            out.push_str(&o.stdout);
            if !o.stderr.is_empty() {
                out.push_str("\n[stderr]\n");
                out.push_str(&o.stderr);
            }
            Ok(truncate(&out, budget))
        }
        "read_file" => {
            let a: ReadFile = typed(name, v)?;
            let bytes = sb.read_file(&abs(&a.path)).await.map_err(fail)?;
            let text = String::from_utf8_lossy(&bytes);
            let out = if a.start_line.is_some() || a.end_line.is_some() {
                let start = a.start_line.unwrap_or(1).max(1);
                let end = a.end_line.unwrap_or(u64::MAX);
                if end < start {
                    return Err(CallError::Failed(format!(
                        "end_line {end} is before start_line {start}"
                    )));
                }
                text.lines()
                    .enumerate()
                    .filter(|(i, _)| (*i as u64 + 1) >= start && (*i as u64 + 1) <= end)
                    .map(|(i, l)| format!("{}\t{l}\n", i + 1))
                    .collect::<String>()
            } else {
                text.to_string()
            };
            Ok(truncate(&out, budget))
        }
        "write_file" => {
            let a: WriteFile = typed(name, v)?;
            sb.write_file(&abs(&a.path), a.content.as_bytes())
                .await
                .map_err(fail)?;
            Ok(format!(
                "wrote {} bytes to {}",
                a.content.len(),
                abs(&a.path)
            ))
        }
        "edit" => {
            let a: Edit = typed(name, v)?;
            if a.old.is_empty() {
                return Err(CallError::Failed(
                    "`old` must not be empty; nothing was changed".into(),
                ));
            }
            let path = abs(&a.path);
            let bytes = sb.read_file(&path).await.map_err(fail)?;
            let text = String::from_utf8(bytes).map_err(|_| {
                CallError::Failed(format!("{path} is not UTF-8 text; nothing was changed"))
            })?;
            let n = text.matches(&a.old).count();
            let all = a.replace_all.unwrap_or(false);
            if n == 0 {
                return Err(CallError::Failed(format!(
                    "edit failed: the text to replace was not found in {path}; the file was not changed (read it again and copy the text exactly)"
                )));
            }
            if n > 1 && !all {
                return Err(CallError::Failed(format!(
                    "edit failed: the text to replace occurs {n} times in {path}; the file was not changed (include more context, or set replace_all)"
                )));
            }
            let new = if all {
                text.replace(&a.old, &a.new)
            } else {
                text.replacen(&a.old, &a.new, 1)
            };
            sb.write_file(&path, new.as_bytes()).await.map_err(fail)?;
            Ok(format!(
                "replaced {} occurrence(s) in {path}",
                if all { n } else { 1 }
            ))
        }
        "list" => {
            let a: List = typed(name, v)?;
            let path = abs(a.path.as_deref().unwrap_or("/workspace"));
            let mut es = sb
                .list(&path, a.depth.unwrap_or(2).clamp(1, 5))
                .await
                .map_err(fail)?;
            es.sort_by(|a, b| a.path.cmp(&b.path));
            let out: String = es
                .iter()
                .map(|e| {
                    if e.dir {
                        format!("{}/\n", e.path)
                    } else {
                        format!("{}\t{} bytes\n", e.path, e.size)
                    }
                })
                .collect();
            Ok(truncate(&out, budget))
        }
        "glob" => {
            let a: Glob = typed(name, v)?;
            let root = abs(a.path.as_deref().unwrap_or("/workspace"));
            let o = sh(
                ctx,
                &format!(
                    "find {} -path '*/.git' -prune -o -type f -print",
                    shell_quote(&root)
                ),
                "/",
                60,
            )
            .await?;
            let prefix = format!("{}/", root.trim_end_matches('/'));
            let mut hits: Vec<&str> = o
                .stdout
                .lines()
                .filter(|p| glob_match(&a.pattern, p.strip_prefix(&prefix).unwrap_or(p)))
                .collect();
            hits.sort();
            Ok(truncate(&(hits.join("\n") + "\n"), budget))
        }
        "grep" => {
            let a: Grep = typed(name, v)?;
            let root = abs(a.path.as_deref().unwrap_or("/workspace"));
            let include = a
                .include
                .map(|g| format!(" --include={}", shell_quote(&g)))
                .unwrap_or_default();
            let o = sh(
                ctx,
                &format!(
                    "grep -rnIE --exclude-dir=.git{include} -e {} {} | head -n 500",
                    shell_quote(&a.pattern),
                    shell_quote(&root)
                ),
                "/",
                60,
            )
            .await?;
            if o.stdout.is_empty() {
                return Ok(if o.stderr.is_empty() {
                    "no matches".into()
                } else {
                    format!("no matches ({})", o.stderr.trim())
                });
            }
            Ok(truncate(&o.stdout, budget))
        }
        "git_status" => {
            let a: GitStatus = typed(name, v)?;
            let r = sb
                .git(
                    "status",
                    json!({"repo": a.repo.unwrap_or_else(|| "/workspace".into())}),
                )
                .await
                .map_err(fail)?;
            Ok(truncate(&r.to_string(), budget))
        }
        "git_diff" => {
            let a: GitDiff = typed(name, v)?;
            let r = sb
                .git(
                    "diff",
                    json!({"repo": a.repo.unwrap_or_else(|| "/workspace".into()), "staged": a.staged.unwrap_or(false)}),
                )
                .await
                .map_err(fail)?;
            Ok(truncate(&r.to_string(), budget))
        }
        "git_commit" => {
            let a: GitCommit = typed(name, v)?;
            let r = sb
                .git(
                    "commit",
                    json!({"repo": a.repo.unwrap_or_else(|| "/workspace".into()), "message": a.message, "all": a.all.unwrap_or(true)}),
                )
                .await
                .map_err(fail)?;
            Ok(truncate(&r.to_string(), budget))
        }
        "lsp_diagnostics" => {
            let a: LspFile = typed(name, v)?;
            let r = sb
                .lsp("diagnostics", json!({"path": abs(&a.path)}))
                .await
                .map_err(fail)?;
            Ok(truncate(&r.to_string(), budget))
        }
        "lsp_definition" | "lsp_references" => {
            let a: LspPosition = typed(name, v)?;
            let op = name.trim_start_matches("lsp_");
            let r = sb
                .lsp(
                    op,
                    json!({"path": abs(&a.path), "line": a.line, "column": a.column}),
                )
                .await
                .map_err(fail)?;
            Ok(truncate(&r.to_string(), budget))
        }
        "spawn_agent" | "send_message" | "wait_agents" | "list_agents" | "close_agent" => {
            let ops = ctx.agents.as_ref().ok_or_else(|| {
                CallError::Failed("multi-agent tools are not available here".into())
            })?;
            let r = match name {
                "spawn_agent" => ops.spawn(typed(name, v)?).await,
                "send_message" => ops.send(typed(name, v)?).await,
                "wait_agents" => ops.wait(typed(name, v)?).await,
                "list_agents" => {
                    let _: ListAgents = typed(name, v)?;
                    ops.list().await
                }
                _ => ops.close(typed(name, v)?).await,
            };
            r.map(|v| v.to_string()).map_err(CallError::Failed)
        }
        other => Err(CallError::Malformed(format!("unknown tool `{other}`"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_keeps_head_and_tail_and_says_so() {
        let s: String = (0..100).map(|i| format!("line {i}\n")).collect();
        let t = truncate(&s, 120);
        assert!(t.starts_with("line 0\n"));
        assert!(t.trim_end().ends_with("line 99"));
        assert!(t.contains("bytes omitted: output exceeded the 120-byte budget"));
        assert_eq!(truncate("short", 120), "short");
        // Never splits a character.
        let u = "é".repeat(200);
        assert!(truncate(&u, 101).contains("omitted"));
    }

    #[test]
    fn schemas_are_objects_with_required_fields() {
        let specs = builtin_specs();
        let edit = specs.iter().find(|s| s.name == "edit").expect("edit");
        expect_test::expect![[r#"["path","old","new"]"#]]
            .assert_eq(&edit.parameters["required"].to_string());
        assert!(specs.iter().all(|s| s.parameters["type"] == "object"));
        let r = Registry::new(None);
        assert!(matches!(
            r.parse_args("exec", "{not json"),
            Err(CallError::Malformed(_))
        ));
        assert!(matches!(
            r.parse_args("nope", "{}"),
            Err(CallError::Malformed(_))
        ));
        assert!(r.parse_args("exec", r#"{"cmd":"ls"}"#).is_ok());
        let bad = typed::<Exec>("exec", json!({"command": "ls"}));
        assert!(matches!(bad, Err(CallError::Failed(m)) if m.contains("nothing was run")));
    }
}
