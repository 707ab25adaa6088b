//! Language servers in sandboxes: one session per (sandbox, workspace root, language), started
//! through kilnd's `Pipe` (the server's stdio is the kilnd connection), reused while it lives,
//! restarted when it died, stopped when idle ([`LspManager`]). A session speaks JSON-RPC with
//! Content-Length framing, answers the server's own requests (configuration, progress,
//! registrations) so it never blocks, keeps the latest diagnostics per file, and syncs files
//! from the sandbox before each query.
//!
//! Positions in this API are 1-based lines and 1-based columns counted in characters (Unicode
//! scalar values); LSP's 0-based UTF-16 positions are converted using the file's text.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_protocol::kilnd::ExecSpec;
use kilnd::Client;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot, watch};

/// How long a request may take before the session gives up on it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Quiet time after which a version-less diagnostics stream counts as complete.
const SETTLE: Duration = Duration::from_millis(1500);

/// Errors of language-server sessions.
#[derive(Debug, thiserror::Error)]
pub enum LspError {
    #[error("no language server for {0:?} (known: python, typescript, javascript, rust)")]
    UnknownLanguage(String),
    #[error("the {language} language server is not installed in this sandbox ({command}); use a template that has it")]
    NotInstalled { language: String, command: String },
    #[error("the language server exited")]
    Exited,
    #[error("the language server did not answer {method} within {secs} s")]
    Timeout { method: String, secs: u64 },
    #[error("the language server refused {method}: {message}")]
    Server { method: String, message: String },
    #[error("invalid position {line}:{column} in {path}")]
    BadPosition {
        path: String,
        line: u32,
        column: u32,
    },
    #[error("{0}")]
    File(String),
    #[error(transparent)]
    Kilnd(#[from] kilnd::ClientError),
}

type Result<T, E = LspError> = std::result::Result<T, E>;

/// The language of a path, from its extension.
pub fn language_of(path: &str) -> Option<&'static str> {
    let ext = path.rsplit_once('.').map(|(_, e)| e)?;
    Some(match ext {
        "py" | "pyi" => "python",
        "ts" | "tsx" | "mts" | "cts" => "typescript",
        "js" | "jsx" | "mjs" | "cjs" => "javascript",
        "rs" => "rust",
        _ => return None,
    })
}

/// The server command for a language; TypeScript and JavaScript share one server.
pub fn server_command(language: &str) -> Result<(&'static str, Vec<String>)> {
    Ok(match language {
        "python" => ("python", vec!["pylsp".into()]),
        "typescript" | "javascript" => (
            "typescript",
            vec!["typescript-language-server".into(), "--stdio".into()],
        ),
        "rust" => ("rust", vec!["rust-analyzer".into()]),
        other => return Err(LspError::UnknownLanguage(other.to_string())),
    })
}

/// A place in a file, 1-based line and character column.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Location {
    pub path: String,
    pub line: u32,
    pub column: u32,
    pub end_line: u32,
    pub end_column: u32,
}

/// A diagnostic, positions as in [`Location`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Diagnostic {
    pub path: String,
    pub line: u32,
    pub column: u32,
    pub end_line: u32,
    pub end_column: u32,
    /// `error`, `warning`, `information` or `hint`.
    pub severity: String,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

/// A symbol (document or workspace).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Symbol {
    pub name: String,
    /// LSP's symbol kind as a word (`function`, `class`, `method`, ...).
    pub kind: String,
    pub location: Location,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
}

/// A completion item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Completion {
    pub label: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// One edit of a rename preview (not applied).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TextEdit {
    pub location: Location,
    pub new_text: String,
}

fn symbol_kind(k: i64) -> &'static str {
    const KINDS: [&str; 26] = [
        "unknown",
        "file",
        "module",
        "namespace",
        "package",
        "class",
        "method",
        "property",
        "field",
        "constructor",
        "enum",
        "interface",
        "function",
        "variable",
        "constant",
        "string",
        "number",
        "boolean",
        "array",
        "object",
        "key",
        "null",
        "enum_member",
        "struct",
        "event",
        "operator",
    ];
    KINDS.get(k as usize).copied().unwrap_or("type_parameter")
}

fn completion_kind(k: i64) -> &'static str {
    const KINDS: [&str; 26] = [
        "unknown",
        "text",
        "method",
        "function",
        "constructor",
        "field",
        "variable",
        "class",
        "interface",
        "module",
        "property",
        "unit",
        "value",
        "enum",
        "keyword",
        "snippet",
        "color",
        "file",
        "reference",
        "folder",
        "enum_member",
        "constant",
        "struct",
        "event",
        "operator",
        "type_parameter",
    ];
    KINDS.get(k as usize).copied().unwrap_or("unknown")
}

/// Converts a 1-based character column on 1-based `line` of `text` to LSP's 0-based UTF-16
/// position; `None` when the line does not exist or the column is past its end (+1).
pub fn to_lsp(text: &str, line: u32, column: u32) -> Option<(u32, u32)> {
    let l = text.split('\n').nth(line.checked_sub(1)? as usize)?;
    let col = column.checked_sub(1)? as usize;
    let chars: Vec<char> = l.trim_end_matches('\r').chars().collect();
    if col > chars.len() {
        return None;
    }
    let utf16: usize = chars[..col].iter().map(|c| c.len_utf16()).sum();
    Some((line - 1, utf16 as u32))
}

/// Converts an LSP position back (lenient: out-of-range values are clamped).
pub fn from_lsp(text: Option<&str>, line: u32, character: u32) -> (u32, u32) {
    let Some(l) = text.and_then(|t| t.split('\n').nth(line as usize)) else {
        return (line + 1, character + 1);
    };
    let mut units = 0u32;
    let mut col = 0u32;
    for c in l.chars() {
        if units >= character {
            break;
        }
        units += c.len_utf16() as u32;
        col += 1;
    }
    (line + 1, col + 1)
}

/// Reads one Content-Length framed message.
pub async fn read_message<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
) -> std::io::Result<Option<Value>> {
    let mut len = None;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await? == 0 {
            return Ok(None);
        }
        let line = line.trim_end();
        if line.is_empty() {
            if len.is_some() {
                break;
            }
            continue;
        }
        if let Some(v) = line.strip_prefix("Content-Length:") {
            len = v.trim().parse::<usize>().ok();
        }
    }
    let len = len.unwrap_or(0);
    if len > 64 << 20 {
        return Err(std::io::Error::other("language server message over 64 MiB"));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    serde_json::from_slice(&body)
        .map(Some)
        .map_err(std::io::Error::other)
}

/// Frames one message.
pub fn frame_message(v: &Value) -> Vec<u8> {
    let body = v.to_string();
    let mut out = format!("Content-Length: {}\r\n\r\n", body.len()).into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

/// uri -> (document version the diagnostics are for, diagnostics as sent).
type DiagnosticsByUri = HashMap<String, (Option<i64>, Value)>;

type Pending = Arc<Mutex<HashMap<i64, oneshot::Sender<std::result::Result<Value, String>>>>>;

struct OpenFile {
    version: i64,
    text: String,
}

/// One running language server.
pub struct LspSession {
    pub language: String,
    pub root: String,
    client: Client,
    out: mpsc::UnboundedSender<Vec<u8>>,
    pending: Pending,
    next_id: AtomicI64,
    diagnostics: Arc<Mutex<DiagnosticsByUri>>,
    diag_tick: watch::Receiver<u64>,
    files: tokio::sync::Mutex<HashMap<String, OpenFile>>,
    alive: watch::Receiver<bool>,
    last_used: Mutex<Instant>,
}

impl std::fmt::Debug for LspSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LspSession")
            .field("language", &self.language)
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

fn uri(path: &str) -> String {
    format!("file://{path}")
}

fn path_of(uri: &str) -> String {
    uri.strip_prefix("file://").unwrap_or(uri).to_string()
}

impl LspSession {
    /// Starts the server for `language` in `root` (an absolute directory in the sandbox) and
    /// completes the `initialize` handshake.
    pub async fn start(
        client: Client,
        language: &str,
        root: &str,
        user: Option<String>,
    ) -> Result<Arc<LspSession>> {
        let (lang, cmd) = server_command(language)?;
        let pipe = client
            .pipe(ExecSpec {
                cmd: cmd.clone(),
                cwd: Some(root.to_string()),
                user,
                tag: Some(format!("lsp-{lang}")),
                ..Default::default()
            })
            .await
            .map_err(|e| match e.code() {
                Some(kiln_protocol::kilnd::DaemonErrorCode::CommandNotFound) => {
                    LspError::NotInstalled {
                        language: lang.to_string(),
                        command: cmd.join(" "),
                    }
                }
                _ => LspError::Kilnd(e),
            })?;
        let (rd, mut wr) = tokio::io::split(pipe);
        let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Vec<u8>>();
        let (alive_tx, alive_rx) = watch::channel(true);
        let (tick_tx, tick_rx) = watch::channel(0u64);
        let pending: Pending = Default::default();
        let diagnostics: Arc<Mutex<DiagnosticsByUri>> = Default::default();
        tokio::spawn(async move {
            while let Some(m) = out_rx.recv().await {
                if wr.write_all(&m).await.is_err() {
                    break;
                }
            }
        });
        {
            let pending = pending.clone();
            let diagnostics = diagnostics.clone();
            let out = out_tx.clone();
            tokio::spawn(async move {
                let mut rd = BufReader::new(rd);
                while let Ok(Some(msg)) = read_message(&mut rd).await {
                    let method = msg.get("method").and_then(Value::as_str);
                    let id = msg.get("id").cloned();
                    match (method, id) {
                        // A response to one of ours.
                        (None, Some(id)) => {
                            let Some(id) = id.as_i64() else { continue };
                            let tx = pending.lock().ok().and_then(|mut p| p.remove(&id));
                            if let Some(tx) = tx {
                                let r = match msg.get("error") {
                                    Some(e) => Err(e
                                        .get("message")
                                        .and_then(Value::as_str)
                                        .unwrap_or("error")
                                        .to_string()),
                                    None => Ok(msg.get("result").cloned().unwrap_or(Value::Null)),
                                };
                                let _ = tx.send(r);
                            }
                        }
                        // A request from the server: answer so it never waits on us.
                        (Some(m), Some(id)) => {
                            let result = match m {
                                "workspace/configuration" => {
                                    let n = msg["params"]["items"].as_array().map_or(0, Vec::len);
                                    Value::Array(vec![Value::Null; n])
                                }
                                "workspace/workspaceFolders" => Value::Array(vec![]),
                                _ => Value::Null,
                            };
                            let _ = out.send(frame_message(
                                &json!({"jsonrpc": "2.0", "id": id, "result": result}),
                            ));
                        }
                        (Some("textDocument/publishDiagnostics"), None) => {
                            let p = &msg["params"];
                            if let Some(u) = p["uri"].as_str() {
                                if let Ok(mut d) = diagnostics.lock() {
                                    d.insert(
                                        u.to_string(),
                                        (p["version"].as_i64(), p["diagnostics"].clone()),
                                    );
                                }
                                tick_tx.send_modify(|t| *t += 1);
                            }
                        }
                        _ => {}
                    }
                }
                let _ = alive_tx.send(false);
                // Fail everything still waiting.
                if let Ok(mut p) = pending.lock() {
                    p.clear();
                }
            });
        }
        let s = Arc::new(LspSession {
            language: lang.to_string(),
            root: root.to_string(),
            client,
            out: out_tx,
            pending,
            next_id: AtomicI64::new(1),
            diagnostics,
            diag_tick: tick_rx,
            files: Default::default(),
            alive: alive_rx,
            last_used: Mutex::new(Instant::now()),
        });
        let caps = json!({
            "general": {"positionEncodings": ["utf-16"]},
            "textDocument": {
                "synchronization": {"didSave": true},
                "publishDiagnostics": {"versionSupport": true},
                "hover": {"contentFormat": ["plaintext", "markdown"]},
                "completion": {"completionItem": {"snippetSupport": false}},
                "definition": {}, "references": {},
                "documentSymbol": {"hierarchicalDocumentSymbolSupport": true},
                "rename": {"prepareSupport": false}
            },
            "workspace": {"symbol": {}, "configuration": true, "workspaceFolders": true}
        });
        s.request(
            "initialize",
            json!({
                "processId": null,
                "rootUri": uri(root),
                "rootPath": root,
                "workspaceFolders": [{"uri": uri(root), "name": "workspace"}],
                "capabilities": caps,
                "clientInfo": {"name": "kiln"}
            }),
        )
        .await?;
        s.notify("initialized", json!({}));
        Ok(s)
    }

    /// Whether the server process still runs.
    pub fn alive(&self) -> bool {
        *self.alive.borrow()
    }

    /// Time since the last request.
    pub fn idle(&self) -> Duration {
        self.last_used
            .lock()
            .map(|t| t.elapsed())
            .unwrap_or_default()
    }

    fn notify(&self, method: &str, params: Value) {
        let _ = self.out.send(frame_message(
            &json!({"jsonrpc": "2.0", "method": method, "params": params}),
        ));
    }

    /// Sends a request and waits for its result.
    pub async fn request(&self, method: &str, params: Value) -> Result<Value> {
        if let Ok(mut t) = self.last_used.lock() {
            *t = Instant::now();
        }
        if !self.alive() {
            return Err(LspError::Exited);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        if let Ok(mut p) = self.pending.lock() {
            p.insert(id, tx);
        }
        let _ = self.out.send(frame_message(
            &json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}),
        ));
        match tokio::time::timeout(REQUEST_TIMEOUT, rx).await {
            Ok(Ok(Ok(v))) => Ok(v),
            Ok(Ok(Err(message))) => Err(LspError::Server {
                method: method.to_string(),
                message,
            }),
            Ok(Err(_)) => Err(LspError::Exited),
            Err(_) => {
                if let Ok(mut p) = self.pending.lock() {
                    p.remove(&id);
                }
                Err(LspError::Timeout {
                    method: method.to_string(),
                    secs: REQUEST_TIMEOUT.as_secs(),
                })
            }
        }
    }

    async fn read_text(&self, path: &str) -> Result<String> {
        let (_, mut data) = self
            .client
            .read_file(path)
            .await
            .map_err(|e| LspError::File(format!("{path}: {e}")))?;
        let mut buf = Vec::new();
        while let Some(c) = data.next_chunk().await {
            buf.extend_from_slice(&c.map_err(|e| LspError::File(format!("{path}: {e}")))?);
        }
        String::from_utf8(buf).map_err(|_| LspError::File(format!("{path} is not UTF-8 text")))
    }

    /// Makes the server see the current contents of `path` (open, or change); returns the
    /// text and its document version.
    pub async fn sync(&self, path: &str) -> Result<(String, i64)> {
        let text = self.read_text(path).await?;
        let mut files = self.files.lock().await;
        let u = uri(path);
        match files.get_mut(path) {
            Some(f) if f.text == text => Ok((text, f.version)),
            Some(f) => {
                f.version += 1;
                f.text = text.clone();
                self.notify(
                    "textDocument/didChange",
                    json!({"textDocument": {"uri": u, "version": f.version}, "contentChanges": [{"text": text}]}),
                );
                self.notify("textDocument/didSave", json!({"textDocument": {"uri": u}}));
                Ok((text, f.version))
            }
            None => {
                let lang = language_of(path).unwrap_or(self.language.as_str());
                let lang = if lang == "typescript" && path.ends_with("x") {
                    "typescriptreact"
                } else {
                    lang
                };
                self.notify(
                    "textDocument/didOpen",
                    json!({"textDocument": {"uri": u, "languageId": lang, "version": 1, "text": text}}),
                );
                files.insert(
                    path.to_string(),
                    OpenFile {
                        version: 1,
                        text: text.clone(),
                    },
                );
                Ok((text, 1))
            }
        }
    }

    async fn text_of(&self, path: &str) -> Option<String> {
        if let Some(f) = self.files.lock().await.get(path) {
            return Some(f.text.clone());
        }
        self.read_text(path).await.ok()
    }

    async fn position(&self, path: &str, line: u32, column: u32) -> Result<(String, Value)> {
        let (text, _) = self.sync(path).await?;
        let (l, c) = to_lsp(&text, line, column).ok_or(LspError::BadPosition {
            path: path.to_string(),
            line,
            column,
        })?;
        Ok((
            text,
            json!({"textDocument": {"uri": uri(path)}, "position": {"line": l, "character": c}}),
        ))
    }

    async fn location(&self, uri_s: &str, range: &Value) -> Location {
        let path = path_of(uri_s);
        let text = self.text_of(&path).await;
        let p = |v: &Value| {
            (
                v["line"].as_u64().unwrap_or(0) as u32,
                v["character"].as_u64().unwrap_or(0) as u32,
            )
        };
        let (sl, sc) = p(&range["start"]);
        let (el, ec) = p(&range["end"]);
        let (line, column) = from_lsp(text.as_deref(), sl, sc);
        let (end_line, end_column) = from_lsp(text.as_deref(), el, ec);
        Location {
            path,
            line,
            column,
            end_line,
            end_column,
        }
    }

    async fn locations(&self, v: &Value) -> Vec<Location> {
        let items: Vec<Value> = match v {
            Value::Array(a) => a.clone(),
            Value::Null => vec![],
            one => vec![one.clone()],
        };
        let mut out = Vec::new();
        for it in items {
            // Location or LocationLink.
            let (u, r) = match it.get("targetUri") {
                Some(u) => (
                    u.as_str().unwrap_or(""),
                    it.get("targetSelectionRange")
                        .unwrap_or(&it["targetRange"])
                        .clone(),
                ),
                None => (it["uri"].as_str().unwrap_or(""), it["range"].clone()),
            };
            out.push(self.location(u, &r).await);
        }
        out
    }

    /// Diagnostics for `path` after syncing it: waits (up to `wait`) for the server to
    /// publish diagnostics for the synced version (or any, for servers without versions).
    pub async fn diagnostics(&self, path: &str, wait: Duration) -> Result<Vec<Diagnostic>> {
        let before = *self.diag_tick.borrow();
        let (text, version) = self.sync(path).await?;
        let u = uri(path);
        let mut tick = self.diag_tick.clone();
        let deadline = tokio::time::Instant::now() + wait;
        let current = |d: &Mutex<DiagnosticsByUri>| d.lock().ok().and_then(|d| d.get(&u).cloned());
        loop {
            let fresh = match current(&self.diagnostics) {
                Some((Some(v), _)) => v >= version,
                Some((None, _)) => *tick.borrow() > before,
                None => false,
            };
            if fresh {
                break;
            }
            if !self.alive() {
                return Err(LspError::Exited);
            }
            if tokio::time::timeout_at(deadline, tick.changed())
                .await
                .is_err()
            {
                break; // report what we have
            }
        }
        // Servers that publish without a version (or publish in stages: syntax first, then
        // semantics) may send more for this file: wait until it has been quiet for a moment.
        if let Some((ver, list)) = current(&self.diagnostics) {
            if ver.is_none() || list.as_array().is_none_or(Vec::is_empty) {
                let mut last = list;
                loop {
                    let settle = (tokio::time::Instant::now() + SETTLE).min(deadline);
                    if tokio::time::timeout_at(settle, tick.changed())
                        .await
                        .is_err()
                    {
                        break;
                    }
                    match current(&self.diagnostics) {
                        Some((_, l)) if l != last => last = l,
                        _ => {}
                    }
                    if tokio::time::Instant::now() >= deadline {
                        break;
                    }
                }
            }
        }
        let raw = self
            .diagnostics
            .lock()
            .ok()
            .and_then(|d| d.get(&u).map(|x| x.1.clone()))
            .unwrap_or(Value::Null);
        let mut out = Vec::new();
        for d in raw.as_array().into_iter().flatten() {
            let r = &d["range"];
            let p = |v: &Value| {
                (
                    v["line"].as_u64().unwrap_or(0) as u32,
                    v["character"].as_u64().unwrap_or(0) as u32,
                )
            };
            let (line, column) = from_lsp(Some(&text), p(&r["start"]).0, p(&r["start"]).1);
            let (end_line, end_column) = from_lsp(Some(&text), p(&r["end"]).0, p(&r["end"]).1);
            out.push(Diagnostic {
                path: path.to_string(),
                line,
                column,
                end_line,
                end_column,
                severity: match d["severity"].as_i64() {
                    Some(1) => "error",
                    Some(2) => "warning",
                    Some(3) => "information",
                    Some(4) => "hint",
                    _ => "error",
                }
                .to_string(),
                message: d["message"].as_str().unwrap_or("").to_string(),
                source: d["source"].as_str().map(str::to_string),
                code: match &d["code"] {
                    Value::String(s) => Some(s.clone()),
                    Value::Number(n) => Some(n.to_string()),
                    _ => None,
                },
            });
        }
        Ok(out)
    }

    pub async fn definition(&self, path: &str, line: u32, column: u32) -> Result<Vec<Location>> {
        let (_, params) = self.position(path, line, column).await?;
        let v = self.request("textDocument/definition", params).await?;
        Ok(self.locations(&v).await)
    }

    pub async fn references(&self, path: &str, line: u32, column: u32) -> Result<Vec<Location>> {
        let (_, mut params) = self.position(path, line, column).await?;
        params["context"] = json!({"includeDeclaration": true});
        let v = self.request("textDocument/references", params).await?;
        Ok(self.locations(&v).await)
    }

    /// Hover text (markdown or plain), `None` when there is nothing.
    pub async fn hover(&self, path: &str, line: u32, column: u32) -> Result<Option<String>> {
        let (_, params) = self.position(path, line, column).await?;
        let v = self.request("textDocument/hover", params).await?;
        let text = match &v["contents"] {
            Value::String(s) => s.clone(),
            Value::Object(o) => o
                .get("value")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            Value::Array(a) => a
                .iter()
                .map(|x| {
                    x.as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| x["value"].as_str().unwrap_or("").to_string())
                })
                .collect::<Vec<_>>()
                .join("\n"),
            _ => String::new(),
        };
        Ok((!text.trim().is_empty()).then_some(text))
    }

    pub async fn completion(&self, path: &str, line: u32, column: u32) -> Result<Vec<Completion>> {
        let (_, params) = self.position(path, line, column).await?;
        let v = self.request("textDocument/completion", params).await?;
        let items = match &v {
            Value::Array(a) => a.clone(),
            Value::Object(o) => o
                .get("items")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default(),
            _ => vec![],
        };
        Ok(items
            .iter()
            .map(|i| Completion {
                label: i["label"].as_str().unwrap_or("").to_string(),
                kind: i["kind"].as_i64().map(|k| completion_kind(k).to_string()),
                detail: i["detail"].as_str().map(str::to_string),
            })
            .collect())
    }

    /// Symbols of one file (flattened, with their container).
    pub async fn document_symbols(&self, path: &str) -> Result<Vec<Symbol>> {
        self.sync(path).await?;
        let v = self
            .request(
                "textDocument/documentSymbol",
                json!({"textDocument": {"uri": uri(path)}}),
            )
            .await?;
        let mut out = Vec::new();
        let mut stack: Vec<(Value, Option<String>)> = v
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .rev()
            .map(|s| (s, None))
            .collect();
        while let Some((s, container)) = stack.pop() {
            let name = s["name"].as_str().unwrap_or("").to_string();
            let location = match s.get("location") {
                Some(l) => {
                    self.location(l["uri"].as_str().unwrap_or(""), &l["range"])
                        .await
                }
                None => {
                    self.location(&uri(path), s.get("selectionRange").unwrap_or(&s["range"]))
                        .await
                }
            };
            let container = container.or_else(|| s["containerName"].as_str().map(str::to_string));
            for c in s["children"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .rev()
            {
                stack.push((c, Some(name.clone())));
            }
            out.push(Symbol {
                kind: symbol_kind(s["kind"].as_i64().unwrap_or(0)).to_string(),
                name,
                location,
                container,
            });
        }
        Ok(out)
    }

    /// Symbols matching `query` across the workspace.
    pub async fn workspace_symbols(&self, query: &str) -> Result<Vec<Symbol>> {
        let v = self
            .request("workspace/symbol", json!({"query": query}))
            .await?;
        let mut out = Vec::new();
        for s in v.as_array().cloned().unwrap_or_default() {
            let l = &s["location"];
            let location = self
                .location(l["uri"].as_str().unwrap_or(""), &l["range"])
                .await;
            out.push(Symbol {
                name: s["name"].as_str().unwrap_or("").to_string(),
                kind: symbol_kind(s["kind"].as_i64().unwrap_or(0)).to_string(),
                location,
                container: s["containerName"].as_str().map(str::to_string),
            });
        }
        Ok(out)
    }

    /// The edits a rename would make (nothing is applied).
    pub async fn rename_preview(
        &self,
        path: &str,
        line: u32,
        column: u32,
        new_name: &str,
    ) -> Result<Vec<TextEdit>> {
        let (_, mut params) = self.position(path, line, column).await?;
        params["newName"] = json!(new_name);
        let v = self.request("textDocument/rename", params).await?;
        let mut out = Vec::new();
        if let Some(changes) = v["changes"].as_object() {
            for (u, edits) in changes {
                for e in edits.as_array().cloned().unwrap_or_default() {
                    out.push(TextEdit {
                        location: self.location(u, &e["range"]).await,
                        new_text: e["newText"].as_str().unwrap_or("").to_string(),
                    });
                }
            }
        }
        for dc in v["documentChanges"].as_array().cloned().unwrap_or_default() {
            let u = dc["textDocument"]["uri"].as_str().unwrap_or("").to_string();
            for e in dc["edits"].as_array().cloned().unwrap_or_default() {
                out.push(TextEdit {
                    location: self.location(&u, &e["range"]).await,
                    new_text: e["newText"].as_str().unwrap_or("").to_string(),
                });
            }
        }
        Ok(out)
    }

    /// Asks the server to shut down and exit.
    pub async fn shutdown(&self) {
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            self.request("shutdown", Value::Null),
        )
        .await;
        self.notify("exit", Value::Null);
    }
}

/// Sessions by (sandbox, root, language): reused while alive, restarted when dead, stopped
/// after `idle` without requests.
#[derive(Debug)]
pub struct LspManager {
    sessions: tokio::sync::Mutex<HashMap<(String, String, String), Arc<LspSession>>>,
    pub idle: Duration,
    started: std::sync::atomic::AtomicU64,
}

impl LspManager {
    pub fn new(idle: Duration) -> Arc<LspManager> {
        Arc::new(LspManager {
            sessions: Default::default(),
            idle,
            started: Default::default(),
        })
    }

    /// How many servers this manager has started (restarts included).
    pub fn started(&self) -> u64 {
        self.started.load(Ordering::Relaxed)
    }

    /// The live session for `language` in `root` of `sandbox`, starting one if needed.
    pub async fn session(
        &self,
        sandbox: &str,
        client: &Client,
        language: &str,
        root: &str,
        user: Option<String>,
    ) -> Result<Arc<LspSession>> {
        let (lang, _) = server_command(language)?;
        let key = (sandbox.to_string(), root.to_string(), lang.to_string());
        let mut map = self.sessions.lock().await;
        if let Some(s) = map.get(&key) {
            if s.alive() {
                return Ok(s.clone());
            }
            tracing::info!(
                sandbox,
                root,
                language = lang,
                "language server died; restarting"
            );
        }
        let s = LspSession::start(client.clone(), lang, root, user).await?;
        self.started.fetch_add(1, Ordering::Relaxed);
        map.insert(key, s.clone());
        Ok(s)
    }

    /// Stops idle or dead sessions (call periodically); returns how many were stopped.
    pub async fn reap(&self) -> usize {
        let mut map = self.sessions.lock().await;
        let stale: Vec<_> = map
            .iter()
            .filter(|(_, s)| !s.alive() || s.idle() >= self.idle)
            .map(|(k, _)| k.clone())
            .collect();
        for k in &stale {
            if let Some(s) = map.remove(k) {
                s.shutdown().await;
            }
        }
        stale.len()
    }

    /// Drops every session of a sandbox (it is gone).
    pub async fn forget_sandbox(&self, sandbox: &str) {
        self.sessions.lock().await.retain(|k, _| k.0 != sandbox);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_convert_both_ways() {
        let text = "a = 1\nπ😀x = 2\n";
        assert_eq!(to_lsp(text, 1, 1), Some((0, 0)));
        // 😀 is two UTF-16 units.
        assert_eq!(to_lsp(text, 2, 3), Some((1, 3)));
        assert_eq!(to_lsp(text, 2, 4), Some((1, 4)));
        assert_eq!(from_lsp(Some(text), 1, 3), (2, 3));
        assert_eq!(from_lsp(Some(text), 1, 4), (2, 4));
        assert_eq!(to_lsp(text, 0, 1), None);
        assert_eq!(to_lsp(text, 9, 1), None);
        assert_eq!(to_lsp(text, 1, 99), None);
    }

    #[tokio::test]
    async fn framing_round_trips() {
        let a = json!({"jsonrpc": "2.0", "id": 1, "result": {"x": "é"}});
        let b = json!({"jsonrpc": "2.0", "method": "m"});
        let mut bytes = frame_message(&a);
        bytes.extend(frame_message(&b));
        let mut r = BufReader::new(&bytes[..]);
        assert_eq!(read_message(&mut r).await.expect("a"), Some(a));
        assert_eq!(read_message(&mut r).await.expect("b"), Some(b));
        assert_eq!(read_message(&mut r).await.expect("eof"), None);
    }

    #[test]
    fn languages() {
        assert_eq!(language_of("/w/a.py"), Some("python"));
        assert_eq!(language_of("/w/a.tsx"), Some("typescript"));
        assert_eq!(language_of("/w/Makefile"), None);
        assert!(matches!(
            server_command("cobol"),
            Err(LspError::UnknownLanguage(_))
        ));
        assert_eq!(server_command("javascript").expect("js").0, "typescript");
    }
}
