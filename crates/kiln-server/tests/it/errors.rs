//! Bad input answers 4xx with `{"error":{"code","message","hint"}}` and loses nothing:
//! data-driven through `oneshot` on the router, snapshotted.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use expect_test::expect;
use http_body_util::BodyExt;
use tower::ServiceExt;

use crate::harness;

async fn call(
    app: axum::Router,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> String {
    let mut b = Request::builder().method(method).uri(path);
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    if body.is_some() {
        b = b.header("content-type", "application/json");
    }
    let req = b
        .body(
            body.map(|s| Body::from(s.to_string()))
                .unwrap_or_else(Body::empty),
        )
        .expect("request");
    let resp = app.oneshot(req).await.expect("response");
    let status = resp.status();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    format!("{} {}", status.as_u16(), String::from_utf8_lossy(&bytes))
}

#[tokio::test]
async fn bad_requests_get_clear_json_errors() {
    let dir = tempfile::tempdir().expect("tmp");
    let server = harness::start(harness::config(dir.path())).await;
    let token = server.kiln.token.clone();
    let data_dir = dir.path().display().to_string();
    let app = kiln_server::app(server.kiln.clone());
    let t = Some(token.as_str());
    let cases: Vec<(&str, &str, Option<&str>, Option<&str>)> = vec![
        ("GET", "/v1/sandboxes", None, None),
        ("GET", "/v1/sandboxes", Some("kiln_wrong"), None),
        ("GET", "/v1/sandboxes/sb-doesnotexist", t, None),
        ("DELETE", "/v1/sandboxes/sb-doesnotexist", t, None),
        (
            "POST",
            "/v1/sandboxes/sb-doesnotexist/exec",
            t,
            Some(r#"{"cmd":["true"]}"#),
        ),
        ("POST", "/v1/sandboxes", t, Some(r#"{"memory":"lots"}"#)),
        ("POST", "/v1/sandboxes", t, Some(r#"{"memory":"1K"}"#)),
        ("POST", "/v1/sandboxes", t, Some(r#"{"cpus":-1}"#)),
        ("POST", "/v1/sandboxes", t, Some(r#"{"ttl":"soon"}"#)),
        ("POST", "/v1/sandboxes", t, Some(r#"{"template":"nope"}"#)),
        ("POST", "/v1/sandboxes", t, Some(r#"{"template":"../etc"}"#)),
        ("POST", "/v1/sandboxes", t, Some(r#"{"colour":"red"}"#)),
        ("POST", "/v1/sandboxes", t, Some("{not json")),
        ("GET", "/v2/anything", t, None),
    ];
    let mut out = String::new();
    for (m, p, tok, body) in cases {
        let line = call(app.clone(), m, p, tok, body)
            .await
            .replace(&data_dir, "<data-dir>");
        out.push_str(&format!("{m} {p} {}\n  -> {line}\n", body.unwrap_or("")));
    }
    expect![[r#"
        GET /v1/sandboxes 
          -> 401 {"error":{"code":"unauthorized","message":"missing or invalid API key","hint":"send `Authorization: Bearer kiln_...`; the owner key is in <data-dir>/token (the CLI reads it, or KILN_TOKEN)"}}
        GET /v1/sandboxes 
          -> 401 {"error":{"code":"unauthorized","message":"missing or invalid API key","hint":"send `Authorization: Bearer kiln_...`; the owner key is in <data-dir>/token (the CLI reads it, or KILN_TOKEN)"}}
        GET /v1/sandboxes/sb-doesnotexist 
          -> 404 {"error":{"code":"sandbox_not_found","message":"no sandbox with id `sb-doesnotexist`","hint":"list sandboxes with `kiln sandbox ls` (GET /v1/sandboxes)"}}
        DELETE /v1/sandboxes/sb-doesnotexist 
          -> 404 {"error":{"code":"sandbox_not_found","message":"no sandbox with id `sb-doesnotexist`","hint":"list sandboxes with `kiln sandbox ls` (GET /v1/sandboxes)"}}
        POST /v1/sandboxes/sb-doesnotexist/exec {"cmd":["true"]}
          -> 404 {"error":{"code":"sandbox_not_found","message":"no sandbox with id `sb-doesnotexist`","hint":"list sandboxes with `kiln sandbox ls` (GET /v1/sandboxes)"}}
        POST /v1/sandboxes {"memory":"lots"}
          -> 400 {"error":{"code":"invalid_argument","message":"memory: `lots` is not a size: use a number with an optional unit, like 512M or 2G"}}
        POST /v1/sandboxes {"memory":"1K"}
          -> 400 {"error":{"code":"invalid_argument","message":"memory must be between 16M and 64G, got 1K"}}
        POST /v1/sandboxes {"cpus":-1}
          -> 400 {"error":{"code":"invalid_argument","message":"cpus must be between 0.01 and 2 (this machine's limit), got -1"}}
        POST /v1/sandboxes {"ttl":"soon"}
          -> 400 {"error":{"code":"invalid_argument","message":"ttl: `soon` is not a duration: use seconds or a form like 90s, 10m, 1h30m"}}
        POST /v1/sandboxes {"template":"nope"}
          -> 404 {"error":{"code":"template_not_found","message":"template `nope` is not built on this server","hint":"build it with `kiln template build nope`, or list templates with GET /v1/templates"}}
        POST /v1/sandboxes {"template":"../etc"}
          -> 400 {"error":{"code":"invalid_argument","message":"invalid template name `../etc`: use lower-case letters, digits, `-` and `_`"}}
        POST /v1/sandboxes {"colour":"red"}
          -> 400 {"error":{"code":"invalid_argument","message":"Failed to deserialize the JSON body into the target type: colour: unknown field `colour`, expected one of `template`, `cpus`, `memory`, `disk`, `network`, `ttl`, `labels`, `pool`, `egress` at line 1 column 9","hint":"send a JSON body with Content-Type: application/json; see /v1 docs in README"}}
        POST /v1/sandboxes {not json
          -> 400 {"error":{"code":"invalid_argument","message":"Failed to parse the request body as JSON: key must be a string at line 1 column 2","hint":"send a JSON body with Content-Type: application/json; see /v1 docs in README"}}
        GET /v2/anything 
          -> 404 {"error":{"code":"route_not_found","message":"no such endpoint","hint":"the API lives under /v1; see README for the routes"}}
    "#]]
    .assert_eq(&out);
    // Nothing was created by any of it.
    assert!(server.kiln.store.list(true).await.expect("list").is_empty());
    server.teardown().await;
}

#[tokio::test]
async fn health_and_metrics_are_public() {
    let dir = tempfile::tempdir().expect("tmp");
    let server = harness::start(harness::config(dir.path())).await;
    let app = kiln_server::app(server.kiln.clone());
    let h = call(app.clone(), "GET", "/v1/health", None, None).await;
    assert!(h.starts_with("200 {\"status\":\"ok\""), "{h}");
    let req = Request::builder()
        .uri("/metrics")
        .body(Body::empty())
        .expect("req");
    let resp = app.clone().oneshot(req).await.expect("resp");
    assert_eq!(resp.status(), StatusCode::OK);
    // Every answer carries a request id; a sane incoming one is kept.
    let req = Request::builder()
        .uri("/v1/health")
        .header("x-request-id", "abc-123")
        .body(Body::empty())
        .expect("req");
    let resp = app.clone().oneshot(req).await.expect("resp");
    assert_eq!(resp.headers()["x-request-id"], "abc-123");
    let req = Request::builder()
        .uri("/v1/nope")
        .body(Body::empty())
        .expect("req");
    let resp = app.clone().oneshot(req).await.expect("resp");
    let rid = resp.headers()["x-request-id"]
        .to_str()
        .expect("id")
        .to_string();
    assert!(rid.starts_with("req_"), "{rid}");
    // The metrics the issue names are exported.
    let req = Request::builder()
        .uri("/metrics")
        .body(Body::empty())
        .expect("req");
    let resp = app.oneshot(req).await.expect("resp");
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    let text = String::from_utf8_lossy(&body);
    for name in [
        "kiln_http_request_seconds_bucket{",
        "kiln_sandboxes{state=\"running\"}",
        "kiln_http_requests_total{",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics:\n{text}");
    }
    assert!(text.contains("status=\"200\""), "{text}");
    server.teardown().await;
}
