//! The scripted model server: a real HTTP server speaking OpenAI's `/v1/chat/completions`
//! (SSE), Ollama's `/api/chat` (NDJSON) and Anthropic's `/v1/messages` (SSE with typed
//! events), all streaming, driven by a script of turns and recording every request it got.
//! Tests and `kiln bench agent` use it where a hosted model cannot run.
//!
//! Each request takes the next turn of the script, whatever protocol it arrived on; an
//! exhausted script answers 500 with an error body, so a test that expected fewer model calls
//! fails loudly. Routed scripts ([`ScriptedServer::route`]) serve concurrent runs: a request
//! any of whose strings (e.g. the task message) contains a route's key takes that route's
//! next turn.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// One scripted tool call; `arguments` is sent verbatim (it may be deliberately malformed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScriptedCall {
    pub id: String,
    pub name: String,
    pub arguments: String,
}

/// One scripted answer of the model.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Turn {
    #[serde(default)]
    pub text: String,
    #[serde(default)]
    pub tool_calls: Vec<ScriptedCall>,
    #[serde(default)]
    pub input_tokens: u64,
    #[serde(default)]
    pub output_tokens: u64,
    /// Wait this long before answering (to exercise wall-time budgets).
    #[serde(default)]
    pub delay_ms: u64,
}

impl Turn {
    /// A final text answer.
    pub fn text(t: &str) -> Turn {
        Turn {
            text: t.into(),
            input_tokens: 100,
            output_tokens: 20,
            ..Turn::default()
        }
    }
    /// One tool call.
    pub fn call(id: &str, name: &str, args: Value) -> Turn {
        Turn::calls(&[(id, name, args)])
    }
    /// Several tool calls in one answer (parallel tool calls).
    pub fn calls(calls: &[(&str, &str, Value)]) -> Turn {
        Turn {
            tool_calls: calls
                .iter()
                .map(|(id, name, args)| ScriptedCall {
                    id: id.to_string(),
                    name: name.to_string(),
                    arguments: args.to_string(),
                })
                .collect(),
            input_tokens: 100,
            output_tokens: 20,
            ..Turn::default()
        }
    }
    /// A tool call whose arguments are the raw text given (malformed on purpose).
    pub fn raw_call(id: &str, name: &str, raw: &str) -> Turn {
        Turn {
            tool_calls: vec![ScriptedCall {
                id: id.into(),
                name: name.into(),
                arguments: raw.into(),
            }],
            input_tokens: 100,
            output_tokens: 20,
            ..Turn::default()
        }
    }
    pub fn usage(mut self, input: u64, output: u64) -> Turn {
        self.input_tokens = input;
        self.output_tokens = output;
        self
    }
    pub fn delay(mut self, ms: u64) -> Turn {
        self.delay_ms = ms;
        self
    }
}

/// A request the server received.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Recorded {
    /// `/v1/chat/completions`, `/api/chat` or `/v1/messages`.
    pub path: String,
    pub body: Value,
    /// The credential presented (`Authorization` bearer or `x-api-key`), if any.
    pub credential: Option<String>,
}

#[derive(Default)]
struct Inner {
    turns: VecDeque<Turn>,
    /// (key, script): requests mentioning the key take turns from its script.
    routes: Vec<(String, VecDeque<Turn>)>,
    /// When set, the script repeats this turn forever once `turns` is empty (benchmarks).
    forever: Option<Turn>,
    requests: Vec<Recorded>,
}

/// A running scripted model server; stops when dropped.
pub struct ScriptedServer {
    addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for ScriptedServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

impl ScriptedServer {
    /// Starts on 127.0.0.1 with an ephemeral port.
    pub async fn start(turns: Vec<Turn>) -> std::io::Result<ScriptedServer> {
        let inner = Arc::new(Mutex::new(Inner {
            turns: turns.into(),
            ..Inner::default()
        }));
        let app = Router::new()
            .route("/v1/chat/completions", post(openai))
            .route("/api/chat", post(ollama))
            .route("/v1/messages", post(anthropic))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
        });
        Ok(ScriptedServer {
            addr,
            inner,
            stop: Some(tx),
        })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Appends turns to the script.
    pub fn push(&self, turns: impl IntoIterator<Item = Turn>) {
        self.lock().turns.extend(turns);
    }

    /// Requests that contain `key` in any string (a task's text, say) take their turns from
    /// `turns` instead of the main script.
    pub fn route(&self, key: &str, turns: impl IntoIterator<Item = Turn>) {
        self.lock()
            .routes
            .push((key.to_string(), turns.into_iter().collect()));
    }

    /// Answers with `turn` whenever the script is empty.
    pub fn repeat_forever(&self, turn: Turn) {
        self.lock().forever = Some(turn);
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.lock().requests.clone()
    }

    /// Turns not yet used.
    pub fn remaining(&self) -> usize {
        self.lock().turns.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

type Shared = Arc<Mutex<Inner>>;

fn next_turn(
    inner: &Shared,
    path: &str,
    headers: &HeaderMap,
    body: Value,
) -> Result<Turn, Box<Response>> {
    let credential = headers
        .get("x-api-key")
        .or_else(|| headers.get("authorization"))
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim_start_matches("Bearer ").to_string());
    let mut g = inner.lock().unwrap_or_else(|e| e.into_inner());
    let routed = g.routes.iter().position(|(key, _)| mentions(&body, key));
    g.requests.push(Recorded {
        path: path.into(),
        body,
        credential,
    });
    let next = match routed {
        Some(i) => g.routes[i].1.pop_front(),
        None => g.turns.pop_front(),
    };
    match next.or_else(|| g.forever.clone()) {
        Some(t) => Ok(t),
        None => Err(Box::new(
            (
                StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"error": {"message": "scripted model: script exhausted", "type": "server_error"}})),
        )
            .into_response(),
        )),
    }
}

/// Whether any string in `v` contains `key`.
fn mentions(v: &Value, key: &str) -> bool {
    match v {
        Value::String(s) => s.contains(key),
        Value::Array(a) => a.iter().any(|x| mentions(x, key)),
        Value::Object(o) => o.values().any(|x| mentions(x, key)),
        _ => false,
    }
}

/// Splits `s` into a few pieces (on char boundaries) so clients must reassemble streams.
fn pieces(s: &str) -> Vec<String> {
    if s.is_empty() {
        return Vec::new();
    }
    let chars: Vec<char> = s.chars().collect();
    let n = chars.len().div_ceil(3).max(1);
    chars.chunks(n).map(|c| c.iter().collect()).collect()
}

fn stream_body(chunks: Vec<String>, delay_ms: u64) -> Body {
    let s =
        futures_util::stream::unfold((chunks.into_iter(), delay_ms), |(mut it, d)| async move {
            if d > 0 {
                tokio::time::sleep(Duration::from_millis(d)).await;
            }
            it.next()
                .map(|c| (Ok::<Bytes, std::io::Error>(Bytes::from(c)), (it, 0)))
        });
    Body::from_stream(s)
}

fn sse(event: Option<&str>, data: &Value) -> String {
    match event {
        Some(e) => format!("event: {e}\ndata: {data}\n\n"),
        None => format!("data: {data}\n\n"),
    }
}

async fn openai(
    State(inner): State<Shared>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let stream = body["stream"].as_bool().unwrap_or(false);
    let usage_wanted = body["stream_options"]["include_usage"]
        .as_bool()
        .unwrap_or(false);
    let model = body["model"].as_str().unwrap_or("scripted").to_string();
    let turn = match next_turn(&inner, "/v1/chat/completions", &headers, body) {
        Ok(t) => t,
        Err(r) => return *r,
    };
    let usage = json!({"prompt_tokens": turn.input_tokens, "completion_tokens": turn.output_tokens,
        "total_tokens": turn.input_tokens + turn.output_tokens});
    let finish = if turn.tool_calls.is_empty() {
        "stop"
    } else {
        "tool_calls"
    };
    if !stream {
        let calls: Vec<Value> = turn
            .tool_calls
            .iter()
            .map(|c| {
                json!({"id": c.id, "type": "function",
            "function": {"name": c.name, "arguments": c.arguments}})
            })
            .collect();
        let mut msg = json!({"role": "assistant", "content": turn.text});
        if !calls.is_empty() {
            msg["tool_calls"] = Value::Array(calls);
        }
        return Json(
            json!({"id": "chatcmpl-scripted", "object": "chat.completion", "model": model,
            "choices": [{"index": 0, "message": msg, "finish_reason": finish}], "usage": usage}),
        )
        .into_response();
    }
    let chunk = |delta: Value, finish: Option<&str>| {
        sse(
            None,
            &json!({"id": "chatcmpl-scripted", "object": "chat.completion.chunk", "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}),
        )
    };
    let mut out = vec![chunk(json!({"role": "assistant", "content": ""}), None)];
    for p in pieces(&turn.text) {
        out.push(chunk(json!({"content": p}), None));
    }
    for (i, c) in turn.tool_calls.iter().enumerate() {
        out.push(chunk(
            json!({"tool_calls": [{"index": i, "id": c.id, "type": "function",
            "function": {"name": c.name, "arguments": ""}}]}),
            None,
        ));
        for p in pieces(&c.arguments) {
            out.push(chunk(
                json!({"tool_calls": [{"index": i, "function": {"arguments": p}}]}),
                None,
            ));
        }
    }
    out.push(chunk(json!({}), Some(finish)));
    if usage_wanted {
        out.push(sse(
            None,
            &json!({"id": "chatcmpl-scripted", "object": "chat.completion.chunk",
            "model": model, "choices": [], "usage": usage}),
        ));
    }
    out.push("data: [DONE]\n\n".into());
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(stream_body(out, turn.delay_ms))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

async fn ollama(
    State(inner): State<Shared>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let stream = body["stream"].as_bool().unwrap_or(true);
    let model = body["model"].as_str().unwrap_or("scripted").to_string();
    let turn = match next_turn(&inner, "/api/chat", &headers, body) {
        Ok(t) => t,
        Err(r) => return *r,
    };
    let calls: Vec<Value> = turn
        .tool_calls
        .iter()
        .map(|c| {
            // Ollama carries arguments as a JSON object.
            let args = serde_json::from_str::<Value>(&c.arguments)
                .unwrap_or_else(|_| Value::String(c.arguments.clone()));
            json!({"function": {"name": c.name, "arguments": args}})
        })
        .collect();
    let done = |msg: Value| {
        json!({"model": model, "created_at": "2026-01-01T00:00:00Z", "message": msg, "done": true,
            "done_reason": "stop", "prompt_eval_count": turn.input_tokens, "eval_count": turn.output_tokens})
    };
    if !stream {
        let mut msg = json!({"role": "assistant", "content": turn.text});
        if !calls.is_empty() {
            msg["tool_calls"] = Value::Array(calls);
        }
        return Json(done(msg)).into_response();
    }
    let mut out = Vec::new();
    for p in pieces(&turn.text) {
        out.push(format!(
            "{}\n",
            json!({"model": model, "created_at": "2026-01-01T00:00:00Z",
            "message": {"role": "assistant", "content": p}, "done": false})
        ));
    }
    if !calls.is_empty() {
        out.push(format!(
            "{}\n",
            json!({"model": model, "created_at": "2026-01-01T00:00:00Z",
            "message": {"role": "assistant", "content": "", "tool_calls": calls}, "done": false})
        ));
    }
    out.push(format!(
        "{}\n",
        done(json!({"role": "assistant", "content": ""}))
    ));
    Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(stream_body(out, turn.delay_ms))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

async fn anthropic(
    State(inner): State<Shared>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if headers.get("anthropic-version").is_none() {
        return (
            StatusCode::BAD_REQUEST,
            Json(
                json!({"type": "error", "error": {"type": "invalid_request_error",
                "message": "anthropic-version: header is required"}}),
            ),
        )
            .into_response();
    }
    let model = body["model"].as_str().unwrap_or("scripted").to_string();
    let turn = match next_turn(&inner, "/v1/messages", &headers, body) {
        Ok(t) => t,
        Err(r) => return *r,
    };
    let stop = if turn.tool_calls.is_empty() {
        "end_turn"
    } else {
        "tool_use"
    };
    let mut out = vec![sse(
        Some("message_start"),
        &json!({"type": "message_start", "message": {"id": "msg_scripted", "type": "message",
            "role": "assistant", "model": model, "content": [], "stop_reason": null,
            "usage": {"input_tokens": turn.input_tokens, "output_tokens": 1}}}),
    )];
    let mut index = 0;
    // One content block: its start, its deltas, its stop.
    let mut block = |start: Value, deltas: Vec<Value>| {
        out.push(sse(
            Some("content_block_start"),
            &json!({"type": "content_block_start", "index": index, "content_block": start}),
        ));
        for d in deltas {
            out.push(sse(
                Some("content_block_delta"),
                &json!({"type": "content_block_delta", "index": index, "delta": d}),
            ));
        }
        out.push(sse(
            Some("content_block_stop"),
            &json!({"type": "content_block_stop", "index": index}),
        ));
        index += 1;
    };
    if !turn.text.is_empty() {
        block(
            json!({"type": "text", "text": ""}),
            pieces(&turn.text)
                .into_iter()
                .map(|p| json!({"type": "text_delta", "text": p}))
                .collect(),
        );
    }
    for c in &turn.tool_calls {
        block(
            json!({"type": "tool_use", "id": c.id, "name": c.name, "input": {}}),
            pieces(&c.arguments)
                .into_iter()
                .map(|p| json!({"type": "input_json_delta", "partial_json": p}))
                .collect(),
        );
    }
    out.push(sse(
        Some("message_delta"),
        &json!({"type": "message_delta",
        "delta": {"stop_reason": stop, "stop_sequence": null},
        "usage": {"output_tokens": turn.output_tokens}}),
    ));
    out.push(sse(Some("message_stop"), &json!({"type": "message_stop"})));
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(stream_body(out, turn.delay_ms))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}
