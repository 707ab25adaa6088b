//! LLM providers over their native protocols, all streaming through reqwest: OpenAI-compatible
//! `/chat/completions` (SSE, tool calls assembled by index, usage from the final chunk),
//! Ollama `/api/chat` (NDJSON; `options.num_ctx` always set from the model's configured
//! context window) and Anthropic `/v1/messages` (SSE events, `tool_use` blocks). API keys are
//! held in [`ApiKey`], whose `Debug` never shows them, and are only ever put in headers.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{json, Map, Value};

use crate::model::{ChatRequest, ChatResponse, Message, Role, ToolCall};

/// Errors talking to a model.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("cannot reach {provider} at {url}: {message}")]
    Connect {
        provider: String,
        url: String,
        message: String,
    },
    #[error("{provider} answered {status}: {body}")]
    Status {
        provider: String,
        status: u16,
        body: String,
    },
    #[error("{provider} sent something unexpected: {message}")]
    Protocol { provider: String, message: String },
}

/// Which wire protocol an endpoint speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    Openai,
    Ollama,
    Anthropic,
}

/// An API key. Its `Debug` and `Display` print `***`; it is only read to build a header.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    pub fn new(k: impl Into<String>) -> Self {
        ApiKey(k.into())
    }
    fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(***)")
    }
}

/// Where a provider lives.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// The provider's name as used in `provider/model` (`openai`, `ollama`, `vllm`, ...).
    pub name: String,
    pub protocol: Protocol,
    /// OpenAI: up to and including `/v1`; Ollama and Anthropic: the host root.
    pub base_url: String,
    pub api_key: Option<ApiKey>,
}

impl Endpoint {
    /// The built-in endpoint for `openai`, `ollama` or `anthropic` from the environment
    /// variables each ecosystem uses (read by the server process).
    pub fn from_env(name: &str, env: &dyn Fn(&str) -> Option<String>) -> Option<Endpoint> {
        let (protocol, base_url, key) = match name {
            "openai" => (
                Protocol::Openai,
                env("OPENAI_BASE_URL").unwrap_or_else(|| "https://api.openai.com/v1".into()),
                env("OPENAI_API_KEY"),
            ),
            "ollama" => {
                let host = env("OLLAMA_HOST").unwrap_or_else(|| "127.0.0.1:11434".into());
                let host = if host.contains("://") {
                    host
                } else {
                    format!("http://{host}")
                };
                (Protocol::Ollama, host, None)
            }
            "anthropic" => (
                Protocol::Anthropic,
                env("ANTHROPIC_BASE_URL").unwrap_or_else(|| "https://api.anthropic.com".into()),
                env("ANTHROPIC_API_KEY"),
            ),
            _ => return None,
        };
        Some(Endpoint {
            name: name.into(),
            protocol,
            base_url: base_url.trim_end_matches('/').to_string(),
            api_key: key.filter(|k| !k.is_empty()).map(ApiKey),
        })
    }
}

/// A client for one endpoint.
#[derive(Debug, Clone)]
pub struct Provider {
    pub endpoint: Endpoint,
    http: reqwest::Client,
}

impl Provider {
    pub fn new(endpoint: Endpoint) -> Provider {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .unwrap_or_default();
        Provider { endpoint, http }
    }

    fn err_connect(&self, url: &str, e: reqwest::Error) -> ProviderError {
        ProviderError::Connect {
            provider: self.endpoint.name.clone(),
            url: url.into(),
            message: e.to_string(),
        }
    }
    fn err_protocol(&self, m: impl Into<String>) -> ProviderError {
        ProviderError::Protocol {
            provider: self.endpoint.name.clone(),
            message: m.into(),
        }
    }

    /// Sends one request and assembles the streamed answer.
    pub async fn chat(&self, req: &ChatRequest) -> Result<ChatResponse, ProviderError> {
        let (url, body) = match self.endpoint.protocol {
            Protocol::Openai => (
                format!("{}/chat/completions", self.endpoint.base_url),
                openai_body(req),
            ),
            Protocol::Ollama => (
                format!("{}/api/chat", self.endpoint.base_url),
                ollama_body(req),
            ),
            Protocol::Anthropic => (
                format!("{}/v1/messages", self.endpoint.base_url),
                anthropic_body(req),
            ),
        };
        let mut rb = self.http.post(&url).json(&body);
        if let Some(k) = &self.endpoint.api_key {
            rb = match self.endpoint.protocol {
                Protocol::Anthropic => rb.header("x-api-key", k.expose()),
                _ => rb.bearer_auth(k.expose()),
            };
        }
        if self.endpoint.protocol == Protocol::Anthropic {
            rb = rb.header("anthropic-version", "2023-06-01");
        }
        let resp = rb.send().await.map_err(|e| self.err_connect(&url, e))?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            return Err(ProviderError::Status {
                provider: self.endpoint.name.clone(),
                status: status.as_u16(),
                body: body.chars().take(500).collect(),
            });
        }
        let mut lines = Lines::default();
        let mut acc = Acc::default();
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| self.err_connect(&url, e))?;
            lines.buf.extend_from_slice(&chunk);
            while let Some(line) = lines.next_line() {
                self.feed(&mut acc, &line)?;
            }
        }
        if !lines.buf.is_empty() {
            let rest = String::from_utf8_lossy(&std::mem::take(&mut lines.buf)).to_string();
            self.feed(&mut acc, rest.trim_end())?;
        }
        self.finish(acc)
    }

    fn feed(&self, acc: &mut Acc, line: &str) -> Result<(), ProviderError> {
        match self.endpoint.protocol {
            Protocol::Openai => {
                let Some(data) = line.strip_prefix("data:") else {
                    return Ok(());
                };
                let data = data.trim();
                if data == "[DONE]" || data.is_empty() {
                    return Ok(());
                }
                let v: Value = serde_json::from_str(data)
                    .map_err(|e| self.err_protocol(format!("bad SSE chunk ({e}): {data}")))?;
                openai_chunk(acc, &v);
            }
            Protocol::Ollama => {
                if line.trim().is_empty() {
                    return Ok(());
                }
                let v: Value = serde_json::from_str(line)
                    .map_err(|e| self.err_protocol(format!("bad NDJSON line ({e}): {line}")))?;
                if let Some(e) = v["error"].as_str() {
                    return Err(self.err_protocol(e.to_string()));
                }
                ollama_chunk(acc, &v);
            }
            Protocol::Anthropic => {
                let Some(data) = line.strip_prefix("data:") else {
                    return Ok(());
                };
                let v: Value = serde_json::from_str(data.trim())
                    .map_err(|e| self.err_protocol(format!("bad SSE event ({e}): {data}")))?;
                if v["type"] == "error" {
                    return Err(self.err_protocol(v["error"]["message"].to_string()));
                }
                anthropic_event(acc, &v);
            }
        }
        Ok(())
    }

    fn finish(&self, acc: Acc) -> Result<ChatResponse, ProviderError> {
        let mut calls = Vec::new();
        for (i, c) in acc.calls.into_iter().enumerate() {
            let id = if c.id.is_empty() {
                format!("call_{i}")
            } else {
                c.id
            };
            let arguments = if c.arguments.trim().is_empty() {
                "{}".to_string()
            } else {
                c.arguments
            };
            calls.push(ToolCall {
                id,
                name: c.name,
                arguments,
            });
        }
        Ok(ChatResponse {
            text: acc.text,
            tool_calls: calls,
            input_tokens: acc.input_tokens,
            output_tokens: acc.output_tokens,
            stop_reason: acc.stop_reason,
        })
    }
}

#[derive(Default)]
struct Lines {
    buf: Vec<u8>,
}

impl Lines {
    fn next_line(&mut self) -> Option<String> {
        let pos = self.buf.iter().position(|b| *b == b'\n')?;
        let line: Vec<u8> = self.buf.drain(..=pos).collect();
        Some(
            String::from_utf8_lossy(&line)
                .trim_end_matches(['\n', '\r'])
                .to_string(),
        )
    }
}

#[derive(Default)]
struct PartialCall {
    id: String,
    name: String,
    arguments: String,
}

#[derive(Default)]
struct Acc {
    text: String,
    calls: Vec<PartialCall>,
    input_tokens: u64,
    output_tokens: u64,
    stop_reason: String,
}

impl Acc {
    fn call(&mut self, index: usize) -> &mut PartialCall {
        while self.calls.len() <= index {
            self.calls.push(PartialCall::default());
        }
        &mut self.calls[index]
    }
}

fn openai_body(req: &ChatRequest) -> Value {
    let messages: Vec<Value> = req
        .messages
        .iter()
        .map(|m| match m.role {
            Role::Tool => json!({"role": "tool", "tool_call_id": m.tool_call_id, "content": m.content}),
            Role::Assistant if !m.tool_calls.is_empty() => json!({
                "role": "assistant",
                "content": if m.content.is_empty() { Value::Null } else { Value::String(m.content.clone()) },
                "tool_calls": m.tool_calls.iter().map(|c| json!({"id": c.id, "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments}})).collect::<Vec<_>>(),
            }),
            r => json!({"role": role_name(r), "content": m.content}),
        })
        .collect();
    let mut body = json!({
        "model": req.model,
        "messages": messages,
        "stream": true,
        "stream_options": {"include_usage": true},
        "max_tokens": req.max_output_tokens,
    });
    if !req.tools.is_empty() {
        body["tools"] = req
            .tools
            .iter()
            .map(|t| {
                json!({"type": "function", "function": {"name": t.name,
                "description": t.description, "parameters": t.parameters}})
            })
            .collect();
        body["parallel_tool_calls"] = Value::Bool(true);
    }
    body
}

fn openai_chunk(acc: &mut Acc, v: &Value) {
    if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
        acc.input_tokens = u["prompt_tokens"].as_u64().unwrap_or(acc.input_tokens);
        acc.output_tokens = u["completion_tokens"].as_u64().unwrap_or(acc.output_tokens);
    }
    let Some(choice) = v["choices"].get(0) else {
        return;
    };
    if let Some(f) = choice["finish_reason"].as_str() {
        acc.stop_reason = f.into();
    }
    let d = &choice["delta"];
    if let Some(t) = d["content"].as_str() {
        acc.text.push_str(t);
    }
    if let Some(calls) = d["tool_calls"].as_array() {
        for (n, c) in calls.iter().enumerate() {
            let index = c["index"].as_u64().map_or(n, |i| i as usize);
            let p = acc.call(index);
            if let Some(id) = c["id"].as_str() {
                p.id = id.into();
            }
            if let Some(name) = c["function"]["name"].as_str() {
                p.name.push_str(name);
            }
            if let Some(a) = c["function"]["arguments"].as_str() {
                p.arguments.push_str(a);
            }
        }
    }
}

fn role_name(r: Role) -> &'static str {
    match r {
        Role::System => "system",
        Role::User => "user",
        Role::Assistant => "assistant",
        Role::Tool => "tool",
    }
}

fn ollama_body(req: &ChatRequest) -> Value {
    let messages: Vec<Value> = req
        .messages
        .iter()
        .map(|m| {
            let mut o = json!({"role": role_name(m.role), "content": m.content});
            if m.role == Role::Tool {
                if let Some(n) = &m.tool_name {
                    o["tool_name"] = Value::String(n.clone());
                }
            }
            if !m.tool_calls.is_empty() {
                o["tool_calls"] = m
                    .tool_calls
                    .iter()
                    .map(|c| {
                        let args = serde_json::from_str::<Value>(&c.arguments)
                            .unwrap_or_else(|_| Value::Object(Map::new()));
                        json!({"function": {"name": c.name, "arguments": args}})
                    })
                    .collect();
            }
            o
        })
        .collect();
    let mut body = json!({
        "model": req.model,
        "messages": messages,
        "stream": true,
        // Ollama's default context is small and it truncates silently: always say.
        "options": {"num_ctx": req.context_window, "num_predict": req.max_output_tokens},
    });
    if !req.tools.is_empty() {
        body["tools"] = req
            .tools
            .iter()
            .map(|t| {
                json!({"type": "function", "function": {"name": t.name,
                "description": t.description, "parameters": t.parameters}})
            })
            .collect();
    }
    body
}

fn ollama_chunk(acc: &mut Acc, v: &Value) {
    let m = &v["message"];
    if let Some(t) = m["content"].as_str() {
        acc.text.push_str(t);
    }
    if let Some(calls) = m["tool_calls"].as_array() {
        for c in calls {
            let f = &c["function"];
            let args = match &f["arguments"] {
                Value::String(s) => s.clone(),
                Value::Null => "{}".into(),
                other => other.to_string(),
            };
            acc.calls.push(PartialCall {
                id: c["id"].as_str().unwrap_or_default().to_string(),
                name: f["name"].as_str().unwrap_or_default().to_string(),
                arguments: args,
            });
        }
    }
    if v["done"].as_bool() == Some(true) {
        acc.input_tokens = v["prompt_eval_count"].as_u64().unwrap_or(0);
        acc.output_tokens = v["eval_count"].as_u64().unwrap_or(0);
        acc.stop_reason = v["done_reason"].as_str().unwrap_or("stop").into();
    }
}

fn anthropic_body(req: &ChatRequest) -> Value {
    let mut system = String::new();
    let mut messages: Vec<Value> = Vec::new();
    for m in &req.messages {
        let (role, blocks) = match m.role {
            Role::System => {
                if !system.is_empty() {
                    system.push_str("\n\n");
                }
                system.push_str(&m.content);
                continue;
            }
            Role::User => ("user", vec![json!({"type": "text", "text": m.content})]),
            Role::Assistant => {
                let mut b = Vec::new();
                if !m.content.is_empty() {
                    b.push(json!({"type": "text", "text": m.content}));
                }
                for c in &m.tool_calls {
                    let input = serde_json::from_str::<Value>(&c.arguments)
                        .unwrap_or_else(|_| Value::Object(Map::new()));
                    b.push(json!({"type": "tool_use", "id": c.id, "name": c.name, "input": input}));
                }
                if b.is_empty() {
                    b.push(json!({"type": "text", "text": "(no text)"}));
                }
                ("assistant", b)
            }
            Role::Tool => (
                "user",
                vec![
                    json!({"type": "tool_result", "tool_use_id": m.tool_call_id, "content": m.content}),
                ],
            ),
        };
        // Consecutive messages of one role are merged (tool results of parallel calls).
        match messages.last_mut() {
            Some(last) if last["role"] == role => {
                if let Some(arr) = last["content"].as_array_mut() {
                    arr.extend(blocks);
                }
            }
            _ => messages.push(json!({"role": role, "content": blocks})),
        }
    }
    let mut body = json!({
        "model": req.model,
        "max_tokens": req.max_output_tokens,
        "messages": messages,
        "stream": true,
    });
    if !system.is_empty() {
        body["system"] = Value::String(system);
    }
    if !req.tools.is_empty() {
        body["tools"] = req
            .tools
            .iter()
            .map(|t| json!({"name": t.name, "description": t.description, "input_schema": t.parameters}))
            .collect();
    }
    body
}

fn anthropic_event(acc: &mut Acc, v: &Value) {
    match v["type"].as_str().unwrap_or_default() {
        "message_start" => {
            let u = &v["message"]["usage"];
            acc.input_tokens = u["input_tokens"].as_u64().unwrap_or(0);
            acc.output_tokens = u["output_tokens"].as_u64().unwrap_or(0);
        }
        "content_block_start" => {
            let b = &v["content_block"];
            if b["type"] == "tool_use" {
                acc.calls.push(PartialCall {
                    id: b["id"].as_str().unwrap_or_default().into(),
                    name: b["name"].as_str().unwrap_or_default().into(),
                    arguments: String::new(),
                });
            } else if let Some(t) = b["text"].as_str() {
                acc.text.push_str(t);
            }
        }
        "content_block_delta" => {
            let d = &v["delta"];
            match d["type"].as_str().unwrap_or_default() {
                "text_delta" => acc.text.push_str(d["text"].as_str().unwrap_or_default()),
                "input_json_delta" => {
                    if let Some(c) = acc.calls.last_mut() {
                        c.arguments
                            .push_str(d["partial_json"].as_str().unwrap_or_default());
                    }
                }
                _ => {}
            }
        }
        "message_delta" => {
            if let Some(s) = v["delta"]["stop_reason"].as_str() {
                acc.stop_reason = s.into();
            }
            if let Some(o) = v["usage"]["output_tokens"].as_u64() {
                acc.output_tokens = o;
            }
        }
        _ => {}
    }
}

/// Renders the request a provider would send, for tests and debugging (never holds keys).
pub fn wire_body(protocol: Protocol, req: &ChatRequest) -> Value {
    match protocol {
        Protocol::Openai => openai_body(req),
        Protocol::Ollama => ollama_body(req),
        Protocol::Anthropic => anthropic_body(req),
    }
}

/// Convenience for tests: the last user message of a request.
pub fn last_user(messages: &[Message]) -> Option<&str> {
    messages
        .iter()
        .rev()
        .find(|m| m.role == Role::User)
        .map(|m| m.content.as_str())
}
