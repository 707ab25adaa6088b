//! HTTP client of the Kiln API used by every CLI command except `kiln up`: base URL and token
//! resolution, JSON calls, and turning API/transport failures into one-line errors.

use std::path::PathBuf;

use anyhow::{anyhow, Result};
use kiln_protocol::api::{ErrorBody, ExecEvent};
use reqwest::Method;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Default server address (what `kiln up` listens on).
pub const DEFAULT_URL: &str = "http://127.0.0.1:7777";
/// Default data directory (where `kiln up` keeps its token).
pub const DEFAULT_DATA_DIR: &str = "/var/lib/kiln";

/// A configured API client.
#[derive(Clone)]
pub struct Api {
    pub base: String,
    token: Option<String>,
    pub http: reqwest::Client,
}

/// An error the API answered with, kept whole so the CLI can print message and hint.
#[derive(Debug)]
pub struct ApiFailure {
    pub body: ErrorBody,
}

impl std::fmt::Display for ApiFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.body.error.message)?;
        if let Some(h) = &self.body.error.hint {
            write!(f, " (hint: {h})")?;
        }
        Ok(())
    }
}

impl std::error::Error for ApiFailure {}

impl Api {
    /// Resolves the URL (`KILN_URL`) and token (`KILN_TOKEN`, else `<data dir>/token`).
    pub fn from_env(url: Option<String>, token: Option<String>, data_dir: Option<PathBuf>) -> Self {
        let base = url
            .unwrap_or_else(|| DEFAULT_URL.to_string())
            .trim_end_matches('/')
            .to_string();
        let token = token.or_else(|| {
            let dir = data_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
            std::fs::read_to_string(dir.join("token"))
                .ok()
                .map(|t| t.trim().to_string())
        });
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(16)
            .tcp_nodelay(true)
            .build()
            .unwrap_or_default();
        Self { base, token, http }
    }

    /// The same client with another API key.
    pub fn with_token(&self, token: &str) -> Api {
        Api {
            base: self.base.clone(),
            token: Some(token.to_string()),
            http: self.http.clone(),
        }
    }

    pub fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let mut rb = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            rb = rb.bearer_auth(t);
        }
        rb
    }

    /// The WebSocket URL and token for a path.
    pub fn ws_url(&self, path: &str) -> (String, Option<String>) {
        let base = self
            .base
            .replacen("http://", "ws://", 1)
            .replacen("https://", "wss://", 1);
        (format!("{base}{path}"), self.token.clone())
    }

    /// Sends a request; non-2xx answers become [`ApiFailure`], transport failures a clear line.
    pub async fn send(&self, rb: reqwest::RequestBuilder) -> Result<reqwest::Response> {
        let resp = rb.send().await.map_err(|e| self.transport_error(e))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let body = serde_json::from_str::<ErrorBody>(&text).unwrap_or_else(|_| ErrorBody {
            error: kiln_protocol::api::ErrorDetail {
                code: "http_error".into(),
                message: format!("the server answered {status}: {}", text.trim()),
                hint: None,
            },
        });
        Err(ApiFailure { body }.into())
    }

    pub fn transport_error(&self, e: reqwest::Error) -> anyhow::Error {
        if e.is_connect() {
            anyhow!(
                "cannot reach the Kiln server at {} (hint: start it with `kiln up`, or point KILN_URL at a running server)",
                self.base
            )
        } else {
            anyhow!("request to {} failed: {e}", self.base)
        }
    }

    pub async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T> {
        let mut rb = self.request(method, path);
        if let Some(b) = body {
            rb = rb.json(b);
        }
        let resp = self.send(rb).await?;
        resp.json::<T>()
            .await
            .map_err(|e| anyhow!("unexpected answer from the server: {e}"))
    }

    pub async fn empty(&self, method: Method, path: &str) -> Result<()> {
        self.send(self.request(method, path)).await?;
        Ok(())
    }

    /// Reads an NDJSON response line by line, calling `f` for each [`ExecEvent`]; stops when `f`
    /// returns `false` or the stream ends.
    pub async fn each_event(
        &self,
        resp: reqwest::Response,
        f: impl FnMut(ExecEvent) -> Result<bool>,
    ) -> Result<()> {
        self.each_line(resp, f).await
    }

    /// Reads an NDJSON response line by line, calling `f` for each line as a `T`; stops when
    /// `f` returns `false` or the stream ends.
    pub async fn each_line<T: DeserializeOwned>(
        &self,
        resp: reqwest::Response,
        mut f: impl FnMut(T) -> Result<bool>,
    ) -> Result<()> {
        use futures_util::StreamExt;
        let mut stream = resp.bytes_stream();
        let mut buf: Vec<u8> = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| anyhow!("the event stream broke: {e}"))?;
            buf.extend_from_slice(&chunk);
            while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=nl).collect();
                if line.len() <= 1 {
                    continue;
                }
                let ev: T = serde_json::from_slice(&line[..line.len() - 1])
                    .map_err(|e| anyhow!("malformed event from the server: {e}"))?;
                if !f(ev)? {
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}
