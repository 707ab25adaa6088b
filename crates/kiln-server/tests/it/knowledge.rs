//! The knowledge API over a real socket: create, sync (NDJSON), search with filters, context,
//! stats with the redaction report, errors with hints, and erasure.

use serde_json::{json, Value};

use crate::harness;

async fn call(
    s: &harness::TestServer,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, String) {
    let m: reqwest::Method = method.parse().expect("method");
    let mut rb = s.http.request(m, s.url(path));
    if let Some(b) = body {
        rb = rb.json(&b);
    }
    let r = rb.send().await.expect("send");
    (r.status().as_u16(), r.text().await.unwrap_or_default())
}

#[tokio::test]
async fn index_sync_search_context_stats_rm() {
    let dir = tempfile::tempdir().expect("tmp");
    let s = harness::start(harness::config(dir.path())).await;
    let src = tempfile::tempdir().expect("src");
    std::fs::write(
        src.path().join("cart.py"),
        "class Cart:\n    def total_price(self):\n        return sum(i.price for i in self.items)\n\nAPI_TOKEN = \"ghp_Zx9Qw8Er7Ty6Ui5Op4As3Df2Gh1Jk0LmNbVc\"\n",
    )
    .expect("write");
    std::fs::write(
        src.path().join("util.rs"),
        "pub fn parse_header(line: &str) -> Option<&str> {\n    line.split(':').next()\n}\n",
    )
    .expect("write");
    let path = src.path().display().to_string();

    let (st, body) = call(
        &s,
        "POST",
        "/v1/indexes",
        Some(json!({"name": "shop", "path": path})),
    )
    .await;
    assert_eq!(st, 201, "{body}");
    let (st, body) = call(
        &s,
        "POST",
        "/v1/indexes",
        Some(json!({"name": "shop", "path": path})),
    )
    .await;
    assert_eq!((st, body.contains("index_exists")), (409, true), "{body}");
    let (st, body) = call(
        &s,
        "POST",
        "/v1/indexes",
        Some(json!({"name": "x", "path": "rel"})),
    )
    .await;
    assert_eq!(st, 400, "{body}");
    let (st, body) = call(&s, "POST", "/v1/indexes", Some(json!({"name": "x"}))).await;
    assert!(st == 400 && body.contains("hint"), "{body}");

    let (st, body) = call(&s, "POST", "/v1/indexes/shop/sync", None).await;
    assert_eq!(st, 200);
    let last: Value = serde_json::from_str(body.lines().last().expect("a line")).expect("json");
    assert_eq!(last["type"], "done", "{body}");
    assert_eq!(last["report"]["added"], 2);
    assert_eq!(last["report"]["redactions"], 1);

    // Lexical search answers at once (mode bm25), with identifier splitting and filters.
    let (st, body) = call(
        &s,
        "POST",
        "/v1/indexes/shop/search",
        Some(json!({"query": "total price", "mode": "bm25"})),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["hits"][0]["path"], "cart.py");
    let (_, body) = call(
        &s,
        "POST",
        "/v1/indexes/shop/search",
        Some(json!({"query": "parse header", "lang": "rust", "mode": "bm25"})),
    )
    .await;
    let v: Value = serde_json::from_str(&body).expect("json");
    assert!(
        v["hits"]
            .as_array()
            .expect("hits")
            .iter()
            .all(|h| h["language"] == "rust"),
        "{body}"
    );
    let (st, body) = call(
        &s,
        "POST",
        "/v1/indexes/shop/search",
        Some(json!({"query": "x", "lang": "cobol"})),
    )
    .await;
    assert!(st == 400 && body.contains("unknown language"), "{body}");
    let (st, _) = call(
        &s,
        "POST",
        "/v1/indexes/shop/search",
        Some(json!({"query": "x", "bogus": 1})),
    )
    .await;
    assert_eq!(st, 400);

    let (st, body) = call(
        &s,
        "POST",
        "/v1/indexes/shop/context",
        Some(json!({"query": "cart total", "tokens": 500})),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("json");
    assert!(v["tokens"].as_u64().expect("tokens") <= 500);
    assert!(
        v["text"].as_str().expect("text").contains("--- cart.py:"),
        "{body}"
    );

    let (st, body) = call(&s, "GET", "/v1/indexes/shop", None).await;
    assert_eq!(st, 200);
    assert!(body.contains(r#""kind":"github_token""#), "{body}");
    assert!(!body.contains("ghp_Zx9Qw8"), "{body}");
    let (_, body) = call(&s, "GET", "/v1/indexes", None).await;
    assert!(body.contains(r#""name":"shop""#), "{body}");

    let (st, _) = call(&s, "DELETE", "/v1/indexes/shop", None).await;
    assert_eq!(st, 204);
    let (st, body) = call(
        &s,
        "POST",
        "/v1/indexes/shop/search",
        Some(json!({"query": "cart"})),
    )
    .await;
    assert!(st == 404 && body.contains("index_not_found"), "{body}");
    assert!(!dir
        .path()
        .join("knowledge/orgs")
        .join(&s.kiln.system_org)
        .join("indexes/shop")
        .exists());
    s.teardown().await;
}
