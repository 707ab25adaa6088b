//! Wildcard previews: with `kiln up --preview-domain example.test`, a request whose Host is
//! `{port}-{sandbox id}.example.test` is proxied to that port of the sandbox by the same code
//! as `/v1/sandboxes/{id}/ports/{port}/` (`devtools::proxy_to`), so links, cookies and
//! absolute paths of the previewed app work as on its own origin.
//!
//! Who may pass: the caller's API key (`Authorization: Bearer`, the `exec:write` permission,
//! the sandbox of its own org), or a per-sandbox, per-port access token from
//! `POST /v1/sandboxes/{id}/previews/{port}/token`. A token is stateless:
//! `{expiry ms}.{HMAC-SHA256(server secret, "preview|id|port|expiry")}`, so it survives restarts
//! and works on every replica sharing the secret; it dies with its expiry or its sandbox. It
//! is accepted once in the query (`?kiln_token=`), answered with a redirect that drops it
//! from the URL and sets it as an HttpOnly cookie of that preview host, and then as that
//! cookie.

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Json, Router};
use kiln_protocol::api::SandboxState;
use serde::{Deserialize, Serialize};

use crate::error::{ApiError, ApiJson};
use crate::service::{now_ms, AppState, Caller, Kiln};
use crate::tenancy::{Perm, Resource};

/// The query parameter and the cookie that carry a preview token.
pub const TOKEN_PARAM: &str = "kiln_token";
pub const COOKIE: &str = "kiln_preview";

/// The routes, merged into `/v1` by `http::app`.
pub fn routes() -> Router<AppState> {
    Router::new().route("/sandboxes/:id/previews/:port/token", post(mint))
}

/// Body of `POST /v1/sandboxes/{id}/previews/{port}/token` (all optional).
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    /// Lifetime, e.g. `1h` (default 24h, at most 30d).
    #[serde(default)]
    pub ttl: Option<String>,
}

/// The answer: the token and, with a preview domain, the URL that uses it.
#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub struct PreviewToken {
    pub token: String,
    pub expires_at_ms: u64,
    pub url: Option<String>,
}

fn sign(k: &Kiln, id: &str, port: u16, exp: u64) -> String {
    k.hasher.hash(&format!("preview|{id}|{port}|{exp}"))
}

/// A token for `id`/`port` valid until `exp`.
pub fn token(k: &Kiln, id: &str, port: u16, exp: u64) -> String {
    format!("{exp}.{}", sign(k, id, port, exp))
}

/// Whether `t` is a live token for `id`/`port` (constant-time comparison of the MAC).
pub fn verify(k: &Kiln, id: &str, port: u16, t: &str) -> bool {
    let Some((exp, mac)) = t.split_once('.') else {
        return false;
    };
    let Ok(exp) = exp.parse::<u64>() else {
        return false;
    };
    if exp <= now_ms() {
        return false;
    }
    let want = sign(k, id, port, exp);
    want.len() == mac.len()
        && want
            .bytes()
            .zip(mac.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

async fn mint(
    State(k): State<AppState>,
    Extension(c): Extension<Caller>,
    Path((id, port)): Path<(String, u16)>,
    body: Option<ApiJson<TokenRequest>>,
) -> Result<(StatusCode, Json<PreviewToken>), ApiError> {
    k.sandbox(&c, &id).await?;
    let ttl = match body.and_then(|b| b.0.ttl) {
        Some(t) => {
            crate::units::parse_duration(&t).map_err(|e| ApiError::invalid(format!("ttl: {e}")))?
        }
        None => std::time::Duration::from_secs(86_400),
    };
    if ttl.is_zero() || ttl > std::time::Duration::from_secs(30 * 86_400) {
        return Err(ApiError::invalid("ttl must be between 1s and 30d"));
    }
    let exp = now_ms() + ttl.as_millis() as u64;
    let t = token(&k, &id, port, exp);
    let url = k.cfg.preview_domain.as_ref().map(|d| {
        format!(
            "http://{port}-{id}.{d}:{}/?{TOKEN_PARAM}={t}",
            k.cfg.listen.port()
        )
    });
    Ok((
        StatusCode::CREATED,
        Json(PreviewToken {
            token: t,
            expires_at_ms: exp,
            url,
        }),
    ))
}

/// `{port}-{id}` of a Host under `domain` (any `:port` suffix ignored).
pub fn parse_host<'a>(host: &'a str, domain: &str) -> Option<(u16, &'a str)> {
    let host = host.rsplit_once(':').map_or(host, |(h, p)| {
        if p.bytes().all(|b| b.is_ascii_digit()) {
            h
        } else {
            host
        }
    });
    let label = host.strip_suffix(domain)?.strip_suffix('.')?;
    let (port, id) = label.split_once('-')?;
    let port = port.parse::<u16>().ok().filter(|p| *p > 0)?;
    let ok = id.starts_with("sb-")
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    ok.then_some((port, id))
}

fn cookie_token(req: &Request) -> Option<String> {
    req.headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(n, _)| *n == COOKIE)
        .map(|(_, v)| v.to_string())
}

/// The query without `kiln_token`, and the token if there was one.
fn split_query(q: &str) -> (String, Option<String>) {
    let mut token = None;
    let rest: Vec<&str> = q
        .split('&')
        .filter(|kv| match kv.split_once('=') {
            Some((TOKEN_PARAM, v)) => {
                token = Some(v.to_string());
                false
            }
            _ => !kv.is_empty(),
        })
        .collect();
    (rest.join("&"), token)
}

/// Layer over the whole router: requests for a preview host go to the sandbox, everything
/// else passes on.
pub async fn host_router(State(k): State<AppState>, req: Request, next: Next) -> Response {
    let Some(domain) = k.cfg.preview_domain.clone() else {
        return next.run(req).await;
    };
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(|h| h.to_ascii_lowercase())
        .or_else(|| req.uri().host().map(str::to_string))
        .unwrap_or_default();
    let Some((port, id)) = parse_host(&host, &domain) else {
        return next.run(req).await;
    };
    let id = id.to_string();
    match serve(&k, &id, port, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn serve(k: &AppState, id: &str, port: u16, req: Request) -> Result<Response, ApiError> {
    let (query, query_token) = split_query(req.uri().query().unwrap_or(""));
    let path = req.uri().path().trim_start_matches('/').to_string();
    // 1. An API key of the sandbox's org with exec:write.
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|v| v.trim().to_string());
    if let Some(b) = bearer.filter(|b| crate::tenancy::looks_like_key(b)) {
        let c = k.authenticate(Some(&b)).await?;
        if !c.perms.has(Perm::write(Resource::Exec)) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "permission_denied",
                format!(
                    "this key ({}) lacks the `exec:write` permission",
                    c.key_prefix
                ),
            ));
        }
        let client = k.client(&c, id).await?;
        return crate::devtools::proxy_to(&client, port, path, Some(query), req).await;
    }
    let denied = || {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "preview_unauthorized",
            format!("no valid credentials for the preview of port {port} of {id}"),
        )
        .hint(
            "send the API key, or open the URL from POST /v1/sandboxes/{id}/previews/{port}/token",
        )
    };
    // 2. A token in the query: set it as a cookie and drop it from the URL.
    if let Some(t) = query_token {
        if !verify(k, id, port, &t) {
            return Err(denied());
        }
        let location = if query.is_empty() {
            format!("/{path}")
        } else {
            format!("/{path}?{query}")
        };
        let exp = t
            .split_once('.')
            .and_then(|(e, _)| e.parse::<u64>().ok())
            .unwrap_or(0);
        let max_age = exp.saturating_sub(now_ms()) / 1000;
        let cookie = format!("{COOKIE}={t}; Path=/; HttpOnly; SameSite=Lax; Max-Age={max_age}");
        let mut r = Response::new(Body::empty());
        *r.status_mut() = StatusCode::SEE_OTHER;
        if let (Ok(l), Ok(c)) = (
            HeaderValue::from_str(&location),
            HeaderValue::from_str(&cookie),
        ) {
            r.headers_mut().insert(header::LOCATION, l);
            r.headers_mut().insert(header::SET_COOKIE, c);
        }
        return Ok(r);
    }
    // 3. The cookie.
    match cookie_token(&req) {
        Some(t) if verify(k, id, port, &t) => {}
        _ => return Err(denied()),
    }
    let row = k
        .store
        .get(id)
        .await?
        .filter(|r| !r.pooled)
        .ok_or_else(|| ApiError::sandbox_not_found(id))?;
    if row.host != k.store.host() || row.sandbox.state != SandboxState::Running {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "sandbox_not_running",
            format!("sandbox `{id}` is not running on this server"),
        ));
    }
    let client = k.runtime.client(id);
    crate::devtools::proxy_to(&client, port, path, Some(query), req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_and_queries() {
        let d = "example.test";
        assert_eq!(
            parse_host("8000-sb-abc123.example.test", d),
            Some((8000, "sb-abc123"))
        );
        assert_eq!(
            parse_host("8000-sb-abc123.example.test:7777", d),
            Some((8000, "sb-abc123"))
        );
        for bad in [
            "example.test",
            "sb-abc.example.test",
            "0-sb-abc.example.test",
            "99999-sb-abc.example.test",
            "8000-sb-abc.other.test",
            "8000-sb-abc.xexample.test",
            "8000-x.example.test",
            "8000-sb-a.b.example.test",
        ] {
            assert_eq!(parse_host(bad, d), None, "{bad}");
        }
        assert_eq!(
            split_query("a=1&kiln_token=T&b=2"),
            ("a=1&b=2".to_string(), Some("T".to_string()))
        );
        assert_eq!(split_query(""), (String::new(), None));
    }
}
