//! The knowledge API over a real socket: create, sync (NDJSON), search with filters, context,
//! stats with the redaction report, errors with hints, and erasure; git sources against a real
//! git server on loopback, sandbox sources followed live through kilnd's watch (and what is
//! left when the sandbox goes), encrypted indexes, and the source errors tenants get.

use expect_test::expect;
use kiln_knowledge::git::testing::{git_in, GitDaemon};
use kiln_protocol::api::CreateSandbox;
use serde_json::{json, Value};

use crate::harness;
use crate::tenancy::{call_full, new_org};

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

/// The last NDJSON line of a sync.
async fn sync(s: &harness::TestServer, name: &str) -> Value {
    let (st, body) = call(s, "POST", &format!("/v1/indexes/{name}/sync"), None).await;
    assert_eq!(st, 200, "{body}");
    serde_json::from_str(body.lines().last().expect("a line")).expect("json")
}

/// Paths of the BM25 hits of `q`, sorted.
async fn found(s: &harness::TestServer, name: &str, q: &str) -> Vec<String> {
    let (st, body) = call(
        s,
        "POST",
        &format!("/v1/indexes/{name}/search"),
        Some(json!({"query": q, "mode": "bm25"})),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("json");
    let mut p: Vec<String> = v["hits"]
        .as_array()
        .expect("hits")
        .iter()
        .map(|h| h["path"].as_str().expect("path").to_string())
        .collect();
    p.sort();
    p.dedup();
    p
}

fn grep(dir: &std::path::Path, needle: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).expect("read_dir") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            out.extend(grep(&p, needle));
        } else if std::fs::read(&p)
            .unwrap_or_default()
            .windows(needle.len())
            .any(|w| w == needle)
        {
            out.push(p.display().to_string());
        }
    }
    out
}

#[tokio::test]
async fn git_and_encrypted_sources_and_the_errors_tenants_get() {
    let dir = tempfile::tempdir().expect("tmp");
    let s = harness::start(harness::config(dir.path())).await;
    let base = tempfile::tempdir().expect("base");
    let repo = base.path().join("repo");
    std::fs::create_dir_all(repo.join("src")).expect("mkdir");
    git_in(&repo, &["init", "-q"]);
    let commit = |path: &str, text: &str| {
        std::fs::write(repo.join(path), text).expect("write");
        git_in(&repo, &["add", "-A"]);
        git_in(&repo, &["commit", "-qm", path]);
    };
    commit(
        "src/ledger.py",
        "def reconcile_ledger(entries):\n    return sorted(entries)\n",
    );
    let daemon = GitDaemon::start(base.path()).expect("git daemon");
    let url = format!("{}/repo", daemon.url);

    // The operator (system organisation) may fetch from a loopback git server.
    let (st, body) = call(
        &s,
        "POST",
        "/v1/indexes",
        Some(json!({"name": "up", "git": url, "ref": "main"})),
    )
    .await;
    assert_eq!(st, 201, "{body}");
    let v: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(
        v["source"],
        json!({"type": "git", "url": url, "ref": "main"})
    );
    let done = sync(&s, "up").await;
    assert_eq!(done["type"], "done", "{done}");
    assert_eq!(done["report"]["added"], 1);
    assert_eq!(found(&s, "up", "reconcile ledger").await, ["src/ledger.py"]);
    commit(
        "src/audit.py",
        "def audit_trail(entries):\n    return list(entries)\n",
    );
    let done = sync(&s, "up").await;
    assert_eq!(
        (&done["report"]["added"], &done["report"]["unchanged"]),
        (&json!(1), &json!(1)),
        "{done}"
    );
    let head = git_in(&repo, &["rev-parse", "HEAD"]).trim().to_string();
    let (_, body) = call(&s, "GET", "/v1/indexes/up", None).await;
    let v: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["revision"], head.as_str());
    assert_eq!(found(&s, "up", "audit trail").await, ["src/audit.py"]);

    // What a tenant gets for sources that are not its to use.
    let b = new_org(&s, "tenant-b").await;
    let key_b = b.key.expect("owner key").secret;
    let cases = [
        json!({"name": "x", "git": url}),
        json!({"name": "x", "git": "file:///etc"}),
        json!({"name": "x", "git": "/srv/repo"}),
        json!({"name": "x", "git": "git@example.com:org/repo.git"}),
        json!({"name": "x", "git": "ext::sh"}),
        json!({"name": "x", "git": "--upload-pack=touch"}),
        json!({"name": "x", "git": "https://me:hunter2@example.com/r.git"}),
        json!({"name": "x", "git": "http://169.254.169.254/latest"}),
        json!({"name": "x", "ref": "main", "path": "/srv"}),
        json!({"name": "x", "git": "https://example.com/r.git", "ref": "--force"}),
        json!({"name": "x", "path": "/srv"}),
        json!({"name": "x", "sandbox": "sb-doesnotexist"}),
        json!({"name": "x", "git": "https://example.com/r.git", "sandbox": "sb-x"}),
    ];
    let mut out = String::new();
    for c in cases {
        let (st, body) = call_full(&s, &key_b, "POST", "/v1/indexes", Some(&c)).await;
        let v: Value = serde_json::from_str(&body).expect("json");
        let e = &v["error"];
        out.push_str(&format!(
            "{}\n  {st} {}: {}\n  hint: {}\n",
            c.to_string().replace(&daemon.url, "git://<daemon>"),
            e["code"].as_str().unwrap_or_default(),
            e["message"]
                .as_str()
                .unwrap_or_default()
                .replace(&daemon.url, "git://<daemon>"),
            e["hint"].as_str().unwrap_or("-"),
        ));
    }
    expect![[r#"
        {"git":"git://<daemon>/repo","name":"x"}
          403 source_forbidden: git URL `git://<daemon>/repo` points at a loopback, private or link-local address
          hint: tenants may index public https://, http:// or git:// URLs and their own sandboxes (the operator may allow private git hosts with `kiln up --git-private-hosts`)
        {"git":"file:///etc","name":"x"}
          403 source_forbidden: git URL `file:///etc` is a path on the server (file://)
          hint: tenants may index public https://, http:// or git:// URLs and their own sandboxes (the operator may allow private git hosts with `kiln up --git-private-hosts`)
        {"git":"/srv/repo","name":"x"}
          403 source_forbidden: git URL `/srv/repo` is a path on the server
          hint: tenants may index public https://, http:// or git:// URLs and their own sandboxes (the operator may allow private git hosts with `kiln up --git-private-hosts`)
        {"git":"git@example.com:org/repo.git","name":"x"}
          403 source_forbidden: git URL `git@example.com:org/repo.git` is an SSH address (it would use the server's own SSH identity)
          hint: tenants may index public https://, http:// or git:// URLs and their own sandboxes (the operator may allow private git hosts with `kiln up --git-private-hosts`)
        {"git":"ext::sh","name":"x"}
          400 invalid_argument: git URL `ext::sh` uses the `transport::address` form (ext:: and fd:: run programs on the server)
          hint: give a git URL such as https://git.example.com/org/repo.git and, with `ref`, a branch or tag name
        {"git":"--upload-pack=touch","name":"x"}
          400 invalid_argument: git URL `--upload-pack=touch` looks like a command-line option
          hint: give a git URL such as https://git.example.com/org/repo.git and, with `ref`, a branch or tag name
        {"git":"https://me:hunter2@example.com/r.git","name":"x"}
          400 invalid_argument: git URL `https://me:***@example.com/r.git` carries a password; credentials in git URLs are not supported (the URL is stored in the index's configuration)
          hint: give a git URL such as https://git.example.com/org/repo.git and, with `ref`, a branch or tag name
        {"git":"http://169.254.169.254/latest","name":"x"}
          403 source_forbidden: git URL `http://169.254.169.254/latest` points at a loopback, private or link-local address
          hint: tenants may index public https://, http:// or git:// URLs and their own sandboxes (the operator may allow private git hosts with `kiln up --git-private-hosts`)
        {"name":"x","path":"/srv","ref":"main"}
          400 invalid_argument: `ref` goes with a `git` source
          hint: e.g. {"name":"app","git":"https://example.com/app.git","ref":"main"}
        {"git":"https://example.com/r.git","name":"x","ref":"--force"}
          400 invalid_argument: `--force` is not a branch or tag name git accepts
          hint: give a git URL such as https://git.example.com/org/repo.git and, with `ref`, a branch or tag name
        {"name":"x","path":"/srv"}
          403 source_forbidden: only keys of the system organisation may index a directory of the server's host
          hint: ask the operator to index it for you, or index a git URL or a sandbox
        {"name":"x","sandbox":"sb-doesnotexist"}
          404 sandbox_not_found: no sandbox with id `sb-doesnotexist`
          hint: list sandboxes with `kiln sandbox ls` (GET /v1/sandboxes)
        {"git":"https://example.com/r.git","name":"x","sandbox":"sb-x"}
          400 invalid_argument: give exactly one source: path, git or sandbox
          hint: e.g. {"name":"app","git":"https://example.com/app.git"}
    "#]].assert_eq(&out);
    let (_, body) = call_full(&s, &key_b, "GET", "/v1/indexes", None).await;
    assert_eq!(body, r#"{"indexes":[]}"#);

    // An encrypted index: answers in clear, nothing in clear under the knowledge directory.
    let src = tempfile::tempdir().expect("src");
    std::fs::write(
        src.path().join("quokkaflux.py"),
        "def quokkaflux_rotate(keys):\n    \"\"\"Rotate the quokkaflux keys.\"\"\"\n    return keys[1:] + keys[:1]\n",
    )
    .expect("write");
    let (st, body) = call(
        &s,
        "POST",
        "/v1/indexes",
        Some(
            json!({"name": "sealed", "path": src.path().display().to_string(), "encrypted": true}),
        ),
    )
    .await;
    assert_eq!(st, 201, "{body}");
    assert!(body.contains(r#""encrypted":true"#), "{body}");
    assert_eq!(sync(&s, "sealed").await["type"], "done");
    assert_eq!(
        found(&s, "sealed", "quokkaflux rotate").await,
        ["quokkaflux.py"]
    );
    let knowledge = dir.path().join("knowledge");
    assert!(
        grep(&knowledge, b"quokkaflux").is_empty(),
        "{:?}",
        grep(&knowledge, b"quokkaflux")
    );
    assert!(
        !grep(&knowledge, b"reconcile_ledger").is_empty(),
        "the plain index is the control"
    );

    // rm erases the clone with the index.
    let clone = knowledge
        .join("orgs")
        .join(&s.kiln.system_org)
        .join("indexes/up/source.git");
    assert!(clone.is_dir());
    let (st, _) = call(&s, "DELETE", "/v1/indexes/up", None).await;
    assert_eq!(st, 204);
    assert!(!clone.exists());
    assert!(grep(&knowledge, b"reconcile_ledger").is_empty());
    s.teardown().await;
}

#[tokio::test]
async fn sandbox_source_follows_edits_live_and_outlives_its_sandbox() {
    let dir = tempfile::tempdir().expect("tmp");
    let s = harness::start(harness::config(dir.path())).await;
    let sb = s.create(&CreateSandbox::default()).await;
    let (_, err, code) = s
        .sh(
            &sb.id,
            "mkdir -p /workspace/src /workspace/node_modules/dep && printf 'def alpha_widget():\\n    return 1\\n' > /workspace/src/app.py && echo 'function vendored_thing() {}' > /workspace/node_modules/dep/index.js",
        )
        .await;
    assert_eq!(code, 0, "{err}");
    let (st, body) = call(
        &s,
        "POST",
        "/v1/indexes",
        Some(json!({"name": "ws", "sandbox": sb.id, "path": "/workspace/"})),
    )
    .await;
    assert_eq!(st, 201, "{body}");
    let v: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(
        v["source"],
        json!({"type": "sandbox", "sandbox": sb.id, "path": "/workspace"})
    );
    let (st, body) = call(
        &s,
        "POST",
        "/v1/indexes",
        Some(json!({"name": "ws2", "sandbox": sb.id, "path": "/nope"})),
    )
    .await;
    assert!(
        st == 400 && body.contains("has no directory `/nope`"),
        "{body}"
    );
    let done = sync(&s, "ws").await;
    assert_eq!(done["report"]["added"], 1, "{done}");
    assert_eq!(found(&s, "ws", "alpha widget").await, ["src/app.py"]);
    assert!(found(&s, "ws", "vendored thing").await.is_empty());

    // Edits in the sandbox become searchable without a sync: the server follows the watch.
    let (_, err, code) = s
        .sh(
            &sb.id,
            "printf 'def beta_gadget():\\n    return 2\\n' > /workspace/src/beta.py && printf 'def alpha_widget_renamed():\\n    return 3\\n' > /workspace/src/app.py",
        )
        .await;
    assert_eq!(code, 0, "{err}");
    let ok = harness::eventually(30, async || {
        found(&s, "ws", "beta gadget").await == ["src/beta.py"]
            && found(&s, "ws", "widget renamed").await == ["src/app.py"]
    })
    .await;
    assert!(
        ok,
        "the edit was not followed: {:?}",
        found(&s, "ws", "beta gadget").await
    );
    let (_, _, code) = s.sh(&sb.id, "rm /workspace/src/beta.py").await;
    assert_eq!(code, 0);
    let ok =
        harness::eventually(30, async || found(&s, "ws", "beta gadget").await.is_empty()).await;
    assert!(ok, "the delete was not followed");
    let (_, body) = call(&s, "GET", "/v1/indexes/ws", None).await;
    let v: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["following"], true, "{body}");
    assert_eq!(v["info"]["files"], 1, "{body}");

    // A change made while the server is down is caught up when it starts again.
    let kiln = s.kiln.clone();
    s.stop().await;
    kiln.runtime
        .client(&sb.id)
        .write_file(
            "/workspace/src/offline.py",
            None,
            false,
            &b"def gamma_offline():\n    pass\n"[..],
        )
        .await
        .expect("write while the server is down");
    drop(kiln);
    let s = harness::start(harness::config(dir.path())).await;
    let ok = harness::eventually(30, async || {
        found(&s, "ws", "gamma offline").await == ["src/offline.py"]
    })
    .await;
    assert!(ok, "the change made while down was not caught up");

    // The sandbox goes: the index stays searchable, the follower stops, syncs say why.
    let (st, _) = call(&s, "DELETE", &format!("/v1/sandboxes/{}", sb.id), None).await;
    assert_eq!(st, 204);
    let ok = harness::eventually(30, async || {
        let (_, body) = call(&s, "GET", "/v1/indexes/ws", None).await;
        let v: Value = serde_json::from_str(&body).expect("json");
        v["following"] == false && v["source_error"].is_string()
    })
    .await;
    assert!(ok, "{}", call(&s, "GET", "/v1/indexes/ws", None).await.1);
    let (st, body) = call(&s, "POST", "/v1/indexes/ws/sync", None).await;
    let v: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(st, 409, "{body}");
    expect![[r#"
        source_gone: sandbox `<sb>` of index `ws` was removed; the index keeps what it last indexed and can still be searched
        hint: `kiln index rm ws` erases it; index another sandbox with `kiln index create NAME --sandbox ID`"#]].assert_eq(&format!(
        "{}: {}\nhint: {}",
        v["error"]["code"].as_str().unwrap_or_default(),
        v["error"]["message"].as_str().unwrap_or_default().replace(&sb.id, "<sb>"),
        v["error"]["hint"].as_str().unwrap_or_default()
    ));
    assert_eq!(found(&s, "ws", "widget renamed").await, ["src/app.py"]);
    let (st, _) = call(&s, "DELETE", "/v1/indexes/ws", None).await;
    assert_eq!(st, 204);
    s.teardown().await;
}
