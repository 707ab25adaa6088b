//! Organisations and keys over a real socket: the isolation matrix (every endpoint, a key of
//! another org, 404), roles and scopes, expiry and instant revocation, racing creates for the
//! last quota slot, and audit entries. Runs on SQLite, or PostgreSQL with
//! `KILN_TEST_STORE=postgres`.

use expect_test::expect;
use kiln_protocol::api::{AuditList, CreateSandbox, KeyCreated, OrgCreated, QuotaStatus, Sandbox};
use serde_json::json;

use crate::harness::{self, TestServer};

/// One call with an explicit key: `STATUS code` (or `STATUS` for successes).
pub async fn call(
    s: &TestServer,
    key: &str,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> String {
    let (status, text) = call_full(s, key, method, path, body).await;
    let code = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v["error"]["code"].as_str().map(str::to_string));
    match code {
        Some(c) => format!("{status} {c}"),
        None => format!("{status}"),
    }
}

pub async fn call_full(
    s: &TestServer,
    key: &str,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> (u16, String) {
    let m: reqwest::Method = method.parse().expect("method");
    let client = reqwest::Client::new();
    let mut rb = client.request(m, s.url(path)).bearer_auth(key);
    if path.ends_with("/pty") {
        rb = rb
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==");
    }
    if let Some(b) = body {
        rb = rb.json(b);
    }
    let r = rb.send().await.expect("send");
    let status = r.status().as_u16();
    (status, r.text().await.unwrap_or_default())
}

/// A call that must answer 201; its JSON body.
pub async fn created(
    s: &TestServer,
    key: &str,
    method: &str,
    path: &str,
    body: &serde_json::Value,
) -> serde_json::Value {
    let (st, text) = call_full(s, key, method, path, Some(body)).await;
    assert_eq!(st, 201, "{method} {path}: {text}");
    serde_json::from_str(&text).expect("json")
}

pub async fn new_org(s: &TestServer, name: &str) -> OrgCreated {
    let (st, body) = call_full(
        s,
        &s.kiln.token,
        "POST",
        "/v1/orgs",
        Some(&json!({"name": name})),
    )
    .await;
    assert_eq!(st, 201, "{body}");
    serde_json::from_str(&body).expect("org")
}

async fn new_key(s: &TestServer, by: &str, req: serde_json::Value) -> KeyCreated {
    let (st, body) = call_full(s, by, "POST", "/v1/keys", Some(&req)).await;
    assert_eq!(st, 201, "{body}");
    serde_json::from_str(&body).expect("key")
}

/// A body that gets a request past parsing, so only visibility decides the answer.
fn body_for(method: &str, route: &str) -> Option<serde_json::Value> {
    match (method, route) {
        ("POST", r) if r.ends_with("/exec") || r.ends_with("/processes") => {
            Some(json!({"cmd": ["true"]}))
        }
        ("POST", r) if r.ends_with("/signal") => Some(json!({"signal": "TERM"})),
        ("POST", r) if r.ends_with("/mkdir") => Some(json!({"path": "/tmp/x"})),
        ("POST", r) if r.ends_with("/move") => Some(json!({"from": "/tmp/a", "to": "/tmp/b"})),
        ("PUT", r) if r.ends_with("/quota") => Some(json!({"sandboxes": 1000})),
        ("PUT", r) if r.ends_with("/rate-limits") => Some(serde_json::Value::Null),
        ("PUT", r) if r.ends_with("/egress") => Some(json!({"allow": null})),
        ("PUT", r) if r.ends_with("/git") => Some(json!({"author": null})),
        ("POST", r) if r.ends_with("/git/:op") => Some(json!({"repo": "/workspace"})),
        ("POST", r) if r.ends_with("/lsp/:op") => Some(json!({"path": "/workspace/a.py"})),
        ("POST", r) if r.ends_with("/approvals/:call") => Some(json!({"approve": true})),
        ("POST", r) if r.ends_with("/search") || r.ends_with("/context") => {
            Some(json!({"query": "main"}))
        }
        ("POST", "/v1/sandboxes") => Some(json!({})),
        ("POST", "/v1/orgs") => Some(json!({"name": "x"})),
        ("POST", "/v1/keys") => Some(json!({"org": "{org}"})),
        _ => None,
    }
}

#[tokio::test]
async fn isolation_matrix_every_endpoint_answers_404_to_another_org() {
    let dir = tempfile::tempdir().expect("tmp");
    let s = harness::start(harness::config(dir.path())).await;
    let owner_a = s.kiln.token.clone();
    let sb = s.create(&CreateSandbox::default()).await;
    let a_keys: kiln_protocol::api::KeyList =
        serde_json::from_str(&call_full(&s, &owner_a, "GET", "/v1/keys", None).await.1)
            .expect("keys");
    let a_key = a_keys.keys[0].id.clone();
    let org_a = s.kiln.system_org.clone();
    let a_ssh_key = created(
        &s,
        &owner_a,
        "POST",
        "/v1/ssh-keys",
        &json!({"public_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICI1ft6dcHM8fmHeVF4mengMBbxuj0Z9hy32wxkWwIOD matrix"}),
    )
    .await["id"]
        .as_str()
        .expect("id")
        .to_string();
    // A stored git credential and a private template (spec only) of A.
    let cred = json!({"host": "git.example.com", "username": "a", "password": "secret-of-a"});
    let a_git_cred = created(&s, &owner_a, "POST", "/v1/git-credentials", &cred).await["id"]
        .as_str()
        .expect("id")
        .to_string();
    let spec = json!({"description": "A's own", "parent": "base"});
    created(&s, &owner_a, "PUT", "/v1/templates/idx-a", &spec).await;
    let b = new_org(&s, "tenant-b").await;
    let key_b = b.key.expect("owner key").secret;
    // A knowledge index of A (lexical only: no model needed to search it).
    let src = tempfile::tempdir().expect("tmp");
    std::fs::write(src.path().join("main.py"), "def main():\n    pass\n").expect("write");
    let idx = json!({"name": "idx-a", "path": src.path().display().to_string()});
    let (st, body) = call_full(&s, &owner_a, "POST", "/v1/indexes", Some(&idx)).await;
    assert_eq!(st, 201, "{body}");
    let mut out = String::new();
    for (method, route) in kiln_server::http::ROUTES {
        // Routes that name another org's resource; the rest are checked below by listing.
        let path = route
            .replace(
                ":id",
                if route.starts_with("/v1/keys") {
                    &a_key
                } else if route.starts_with("/v1/ssh-keys") {
                    &a_ssh_key
                } else if route.starts_with("/v1/git-credentials") {
                    &a_git_cred
                } else {
                    &sb.id
                },
            )
            .replace(":pid", "p-1")
            .replace(":org", &org_a)
            .replace(":port", "8080")
            .replace(":op", "status")
            .replace(":name", "idx-a")
            .replace("*path", "index.html");
        let path = match *route {
            "/v1/keys" | "/v1/audit" | "/v1/usage" | "/v1/usage/events" => {
                format!("{path}?org={org_a}")
            }
            r if r.contains("/files") => format!("{path}?path=/etc/hostname"),
            r if r.ends_with("/lsp/ws") => format!("{path}?language=python"),
            _ => path,
        };
        if !path.contains(&sb.id)
            && !path.contains(&org_a)
            && !path.contains(&a_key)
            && !path.contains("idx-a")
            && !path.contains(&a_ssh_key)
            && !path.contains(&a_git_cred)
        {
            continue;
        }
        // A PUT of a template name creates the caller's own private template: checked below.
        if (*method, *route) == ("PUT", "/v1/templates/:name") {
            continue;
        }
        let body = body_for(method, route)
            .map(|b| serde_json::from_str(&b.to_string().replace("{org}", &org_a)).expect("json"));
        let got = call(&s, &key_b, method, &path, body.as_ref()).await;
        let shown = path
            .replace(&sb.id, "<sb-a>")
            .replace(&org_a, "<org-a>")
            .replace(&a_key, "<key-a>")
            .replace(&a_ssh_key, "<ssh-key-a>")
            .replace(&a_git_cred, "<git-cred-a>");
        out.push_str(&format!("{method} {shown} -> {got}\n"));
    }
    expect![[r#"
        GET /v1/sandboxes/<sb-a> -> 404 sandbox_not_found
        DELETE /v1/sandboxes/<sb-a> -> 404 sandbox_not_found
        POST /v1/sandboxes/<sb-a>/pause -> 404 sandbox_not_found
        POST /v1/sandboxes/<sb-a>/resume -> 404 sandbox_not_found
        POST /v1/sandboxes/<sb-a>/exec -> 404 sandbox_not_found
        POST /v1/sandboxes/<sb-a>/processes -> 404 sandbox_not_found
        GET /v1/sandboxes/<sb-a>/processes -> 404 sandbox_not_found
        GET /v1/sandboxes/<sb-a>/processes/p-1/output -> 404 sandbox_not_found
        POST /v1/sandboxes/<sb-a>/processes/p-1/stdin -> 404 sandbox_not_found
        POST /v1/sandboxes/<sb-a>/processes/p-1/signal -> 404 sandbox_not_found
        GET /v1/sandboxes/<sb-a>/files?path=/etc/hostname -> 404 sandbox_not_found
        PUT /v1/sandboxes/<sb-a>/files?path=/etc/hostname -> 404 sandbox_not_found
        DELETE /v1/sandboxes/<sb-a>/files?path=/etc/hostname -> 404 sandbox_not_found
        GET /v1/sandboxes/<sb-a>/files/stat?path=/etc/hostname -> 404 sandbox_not_found
        GET /v1/sandboxes/<sb-a>/files/list?path=/etc/hostname -> 404 sandbox_not_found
        POST /v1/sandboxes/<sb-a>/files/mkdir?path=/etc/hostname -> 404 sandbox_not_found
        POST /v1/sandboxes/<sb-a>/files/move?path=/etc/hostname -> 404 sandbox_not_found
        GET /v1/sandboxes/<sb-a>/files/watch?path=/etc/hostname -> 404 sandbox_not_found
        GET /v1/sandboxes/<sb-a>/pty -> 404 sandbox_not_found
        GET /v1/sandboxes/<sb-a>/egress -> 404 sandbox_not_found
        PUT /v1/sandboxes/<sb-a>/egress -> 404 sandbox_not_found
        GET /v1/sandboxes/<sb-a>/ports -> 404 sandbox_not_found
        GET /v1/sandboxes/<sb-a>/ports/8080 -> 404 sandbox_not_found
        GET /v1/sandboxes/<sb-a>/ports/8080/ -> 404 sandbox_not_found
        GET /v1/sandboxes/<sb-a>/ports/8080/index.html -> 404 sandbox_not_found
        POST /v1/sandboxes/<sb-a>/previews/8080/token -> 404 sandbox_not_found
        POST /v1/sandboxes/<sb-a>/git/status -> 404 sandbox_not_found
        POST /v1/sandboxes/<sb-a>/lsp/status -> 404 sandbox_not_found
        GET /v1/sandboxes/<sb-a>/lsp/ws?language=python -> 404 sandbox_not_found
        GET /v1/templates/idx-a -> 404 template_not_found
        DELETE /v1/templates/idx-a -> 404 template_not_found
        POST /v1/templates/idx-a/build -> 404 template_not_found
        GET /v1/orgs/<org-a> -> 404 org_not_found
        GET /v1/orgs/<org-a>/quota -> 404 org_not_found
        PUT /v1/orgs/<org-a>/quota -> 404 org_not_found
        GET /v1/orgs/<org-a>/rate-limits -> 404 org_not_found
        PUT /v1/orgs/<org-a>/rate-limits -> 404 org_not_found
        GET /v1/keys?org=<org-a> -> 404 org_not_found
        POST /v1/keys?org=<org-a> -> 404 org_not_found
        DELETE /v1/keys/<key-a> -> 404 key_not_found
        GET /v1/audit?org=<org-a> -> 404 org_not_found
        GET /v1/usage?org=<org-a> -> 404 org_not_found
        GET /v1/usage/events?org=<org-a> -> 404 org_not_found
        GET /v1/agents/<sb-a> -> 404 agent_run_not_found
        GET /v1/agents/<sb-a>/events -> 404 agent_run_not_found
        POST /v1/agents/<sb-a>/approvals/:call -> 404 agent_run_not_found
        POST /v1/agents/<sb-a>/stop -> 404 agent_run_not_found
        GET /v1/indexes/idx-a -> 404 index_not_found
        DELETE /v1/indexes/idx-a -> 404 index_not_found
        POST /v1/indexes/idx-a/sync -> 404 index_not_found
        POST /v1/indexes/idx-a/search -> 404 index_not_found
        POST /v1/indexes/idx-a/context -> 404 index_not_found
        DELETE /v1/ssh-keys/<ssh-key-a> -> 404 ssh_key_not_found
        DELETE /v1/git-credentials/<git-cred-a> -> 404 git_credential_not_found
        GET /v1/orgs/<org-a>/git -> 404 org_not_found
        PUT /v1/orgs/<org-a>/git -> 404 org_not_found
    "#]]
    .assert_eq(&out);
    // Creating in another org and listing show nothing of A either.
    let post_key = call(&s, &key_b, "POST", "/v1/keys", Some(&json!({"org": org_a}))).await;
    assert_eq!(post_key, "404 org_not_found");
    let (_, list) = call_full(&s, &key_b, "GET", "/v1/sandboxes", None).await;
    assert_eq!(list, r#"{"sandboxes":[]}"#);
    let (_, list) = call_full(&s, &key_b, "GET", "/v1/ssh-keys", None).await;
    assert_eq!(list, r#"{"keys":[]}"#);
    let (_, orgs) = call_full(&s, &key_b, "GET", "/v1/orgs", None).await;
    assert!(!orgs.contains(&org_a), "{orgs}");
    let (_, indexes) = call_full(&s, &key_b, "GET", "/v1/indexes", None).await;
    assert_eq!(indexes, r#"{"indexes":[]}"#);
    let (_, creds) = call_full(&s, &key_b, "GET", "/v1/git-credentials", None).await;
    assert_eq!(creds, r#"{"credentials":[]}"#);
    let (_, templates) = call_full(&s, &key_b, "GET", "/v1/templates", None).await;
    assert!(!templates.contains("idx-a"), "{templates}");
    let got = call(
        &s,
        &key_b,
        "POST",
        "/v1/sandboxes",
        Some(&json!({"template": "idx-a"})),
    )
    .await;
    assert_eq!(got, "404 template_not_found");
    // B's PUT of the same name makes B's own template; A's stays A's.
    let mine = json!({"description": "B's own", "parent": "base"});
    let got = call(&s, &key_b, "PUT", "/v1/templates/idx-a", Some(&mine)).await;
    assert_eq!(got, "201");
    let got = call(&s, &key_b, "DELETE", "/v1/templates/idx-a", None).await;
    assert_eq!(got, "204");
    let got = call(&s, &key_b, "DELETE", "/v1/templates/idx-a", None).await;
    assert_eq!(got, "404 template_not_found");
    let got = call(&s, &owner_a, "DELETE", "/v1/templates/idx-a", None).await;
    assert_eq!(got, "204", "A's template was still there");
    // B cannot index a directory of the server's host at all (only the system organisation
    // may): a tenant must not read the host's files through an index.
    let got = call(&s, &key_b, "POST", "/v1/indexes", Some(&idx)).await;
    assert_eq!(got, "403 source_forbidden");
    // Nor A's sandbox: indexing it is the same 404 as any other look at it.
    let of_a = json!({"name": "idx-b", "sandbox": sb.id});
    let got = call(&s, &key_b, "POST", "/v1/indexes", Some(&of_a)).await;
    assert_eq!(got, "404 sandbox_not_found");
    let (st, _) = call_full(&s, &owner_a, "GET", "/v1/indexes/idx-a", None).await;
    assert_eq!(st, 200);
    // A's sandbox is untouched and still works for A.
    let (out, _, code) = s.sh(&sb.id, "echo alive").await;
    assert_eq!((out.as_str(), code), ("alive\n", 0));
    s.teardown().await;
}

#[tokio::test]
async fn roles_scopes_expiry_and_instant_revocation() {
    let dir = tempfile::tempdir().expect("tmp");
    let s = harness::start(harness::config(dir.path())).await;
    let owner = s.kiln.token.clone();
    let admin = new_key(&s, &owner, json!({"role": "admin", "name": "adm"}))
        .await
        .secret;
    let member = new_key(&s, &owner, json!({"role": "member"})).await.secret;
    let auditor = new_key(&s, &owner, json!({"role": "auditor"})).await.secret;
    let reader = new_key(
        &s,
        &owner,
        json!({"role": "member", "scopes": ["sandboxes:read"]}),
    )
    .await
    .secret;
    let keyman = new_key(&s, &admin, json!({"role": "admin", "scopes": ["keys:*"]}))
        .await
        .secret;
    let keys = [
        ("admin", admin.as_str()),
        ("member", member.as_str()),
        ("auditor", auditor.as_str()),
        ("reader", reader.as_str()),
        ("keyman", keyman.as_str()),
    ];
    let cases: Vec<(&str, &str, Option<serde_json::Value>)> = vec![
        ("GET", "/v1/sandboxes", None),
        ("POST", "/v1/sandboxes", Some(json!({"template": "nope"}))),
        ("GET", "/v1/templates", None),
        ("GET", "/v1/keys", None),
        ("POST", "/v1/keys", Some(json!({"role": "member"}))),
        ("POST", "/v1/keys", Some(json!({"role": "owner"}))),
        ("POST", "/v1/keys", Some(json!({"role": "auditor"}))),
        (
            "POST",
            "/v1/keys",
            Some(json!({"role": "member", "scopes": ["keys:read"]})),
        ),
        ("GET", "/v1/audit", None),
        ("POST", "/v1/orgs", Some(json!({"name": "nope"}))),
        ("GET", "/v1/me", None),
    ];
    let mut out = String::new();
    for (m, p, b) in &cases {
        let mut line = format!(
            "{m} {p} {}:",
            b.as_ref().map(|b| b.to_string()).unwrap_or_default()
        );
        for (name, k) in keys {
            line.push_str(&format!(
                " {name}={}",
                call(&s, k, m, p, b.as_ref()).await.replace(' ', "/")
            ));
        }
        out.push_str(&line);
        out.push('\n');
    }
    expect![[r#"
        GET /v1/sandboxes : admin=200 member=200 auditor=200 reader=200 keyman=403/permission_denied
        POST /v1/sandboxes {"template":"nope"}: admin=404/template_not_found member=404/template_not_found auditor=403/permission_denied reader=403/permission_denied keyman=403/permission_denied
        GET /v1/templates : admin=200 member=200 auditor=200 reader=403/permission_denied keyman=403/permission_denied
        GET /v1/keys : admin=200 member=403/permission_denied auditor=200 reader=403/permission_denied keyman=200
        POST /v1/keys {"role":"member"}: admin=201 member=403/permission_denied auditor=403/permission_denied reader=403/permission_denied keyman=403/permission_denied
        POST /v1/keys {"role":"owner"}: admin=403/permission_denied member=403/permission_denied auditor=403/permission_denied reader=403/permission_denied keyman=403/permission_denied
        POST /v1/keys {"role":"auditor"}: admin=201 member=403/permission_denied auditor=403/permission_denied reader=403/permission_denied keyman=403/permission_denied
        POST /v1/keys {"role":"member","scopes":["keys:read"]}: admin=201 member=403/permission_denied auditor=403/permission_denied reader=403/permission_denied keyman=201
        GET /v1/audit : admin=200 member=403/permission_denied auditor=200 reader=403/permission_denied keyman=403/permission_denied
        POST /v1/orgs {"name":"nope"}: admin=201 member=403/permission_denied auditor=403/permission_denied reader=403/permission_denied keyman=403/permission_denied
        GET /v1/me : admin=200 member=200 auditor=200 reader=200 keyman=200
    "#]]
    .assert_eq(&out);
    // The refusal names what is missing.
    let (_, body) = call_full(
        &s,
        &keyman,
        "POST",
        "/v1/keys",
        Some(&json!({"role": "member"})),
    )
    .await;
    assert!(
        body.contains("permissions this key lacks: sandboxes:read"),
        "{body}"
    );

    // Expiry: a key that expires in one second works, then gets key_expired.
    let short = new_key(&s, &owner, json!({"expires_in": 1})).await.secret;
    assert_eq!(call(&s, &short, "GET", "/v1/sandboxes", None).await, "200");
    let expired = harness::eventually(10, async || {
        call(&s, &short, "GET", "/v1/sandboxes", None).await == "401 key_expired"
    })
    .await;
    assert!(expired);

    // Revocation applies to the very next request.
    let k = new_key(&s, &owner, json!({"role": "member"})).await;
    assert_eq!(
        call(&s, &k.secret, "GET", "/v1/sandboxes", None).await,
        "200"
    );
    assert_eq!(
        call(
            &s,
            &owner,
            "DELETE",
            &format!("/v1/keys/{}", k.key.id),
            None
        )
        .await,
        "204"
    );
    assert_eq!(
        call(&s, &k.secret, "GET", "/v1/sandboxes", None).await,
        "401 key_revoked"
    );
    // An admin cannot revoke the owner key; last-used is recorded.
    let (_, list) = call_full(&s, &owner, "GET", "/v1/keys", None).await;
    let list: kiln_protocol::api::KeyList = serde_json::from_str(&list).expect("keys");
    let owner_key = list.keys.iter().find(|k| k.name == "owner").expect("owner");
    assert!(owner_key.last_used_at_ms.is_some());
    assert_eq!(
        call(
            &s,
            &admin,
            "DELETE",
            &format!("/v1/keys/{}", owner_key.id),
            None
        )
        .await,
        "403 permission_denied"
    );
    s.teardown().await;
}

#[tokio::test]
async fn racing_creates_for_the_last_quota_slot_exactly_one_wins() {
    let dir = tempfile::tempdir().expect("tmp");
    let s = harness::start(harness::config(dir.path())).await;
    let b = new_org(&s, "tenant-q").await;
    let kb = b.key.expect("key").secret;
    let (st, body) = call_full(
        &s,
        &s.kiln.token,
        "PUT",
        &format!("/v1/orgs/{}/quota", b.org.id),
        Some(&json!({"sandboxes": 1})),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    // Only the system organisation may change quotas.
    assert_eq!(
        call(
            &s,
            &kb,
            "PUT",
            &format!("/v1/orgs/{}/quota", b.org.id),
            Some(&json!({"sandboxes": 9}))
        )
        .await,
        "403 permission_denied"
    );
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let url = s.url("/v1/sandboxes");
        let kb = kb.clone();
        tasks.push(tokio::spawn(async move {
            let r = reqwest::Client::new()
                .post(url)
                .bearer_auth(kb)
                .json(&json!({"pool": false}))
                .send()
                .await
                .expect("send");
            (r.status().as_u16(), r.text().await.unwrap_or_default())
        }));
    }
    let mut won = Vec::new();
    let mut refused = Vec::new();
    for t in tasks {
        let (st, body) = t.await.expect("join");
        match st {
            201 => won.push(serde_json::from_str::<Sandbox>(&body).expect("sandbox")),
            _ => refused.push(format!("{st} {body}")),
        }
    }
    assert_eq!(won.len(), 1, "refused: {refused:?}");
    let msg = refused[0].replace(&b.org.id, "<org>");
    expect![[r#"403 {"error":{"code":"quota_exceeded","message":"quota `sandboxes` of organisation `<org>` exceeded: limit 1, in use 1, requested 1","hint":"remove or pause sandboxes, or ask an operator to raise the quota (`kiln org quota`)"}}"#]]
        .assert_eq(&msg);
    // Pausing releases the slot; resuming the paused one then needs it back.
    let id = &won[0].id;
    assert_eq!(
        call(&s, &kb, "POST", &format!("/v1/sandboxes/{id}/pause"), None).await,
        "200"
    );
    let (st, body) = call_full(&s, &kb, "POST", "/v1/sandboxes", Some(&json!({}))).await;
    assert_eq!(st, 201, "{body}");
    assert_eq!(
        call(&s, &kb, "POST", &format!("/v1/sandboxes/{id}/resume"), None).await,
        "403 quota_exceeded"
    );
    let (_, q) = call_full(
        &s,
        &kb,
        "GET",
        &format!("/v1/orgs/{}/quota", b.org.id),
        None,
    )
    .await;
    let q: QuotaStatus = serde_json::from_str(&q).expect("quota");
    assert_eq!((q.usage.sandboxes, q.limits.sandboxes), (1, Some(1)));
    s.teardown().await;
}

#[tokio::test]
async fn mutating_calls_and_refusals_are_audited() {
    let dir = tempfile::tempdir().expect("tmp");
    let s = harness::start(harness::config(dir.path())).await;
    let owner = s.kiln.token.clone();
    let auditor = new_key(&s, &owner, json!({"role": "auditor"})).await.secret;
    let sb = s.create(&CreateSandbox::default()).await;
    call(
        &s,
        &owner,
        "POST",
        &format!("/v1/sandboxes/{}/exec", sb.id),
        Some(&json!({"cmd": ["true"]})),
    )
    .await;
    call(&s, &owner, "GET", "/v1/sandboxes", None).await;
    call(
        &s,
        &auditor,
        "DELETE",
        &format!("/v1/sandboxes/{}", sb.id),
        None,
    )
    .await;
    call(
        &s,
        "kiln_notavalidkeyatallreally",
        "GET",
        "/v1/sandboxes",
        None,
    )
    .await;
    call(
        &s,
        &owner,
        "DELETE",
        &format!("/v1/sandboxes/{}", sb.id),
        None,
    )
    .await;
    let (st, body) = call_full(&s, &auditor, "GET", "/v1/audit", None).await;
    assert_eq!(st, 200, "{body}");
    let list: AuditList = serde_json::from_str(&body).expect("audit");
    let mut out = String::new();
    for e in list.entries.iter().rev() {
        assert!(
            e.request_id.starts_with("req_") && e.client == "127.0.0.1",
            "{e:?}"
        );
        assert!(e.resource.starts_with("/v1/"), "{e:?}");
        out.push_str(&format!(
            "{} {} {} {} org={}\n",
            e.action,
            e.outcome,
            e.status,
            e.key_prefix.get(..5).unwrap_or("-"),
            if e.org.is_empty() { "-" } else { "own" },
        ));
    }
    expect![[r#"
        POST /v1/keys ok 201 kiln_ org=own
        POST /v1/sandboxes ok 201 kiln_ org=own
        POST /v1/sandboxes/:id/exec ok 200 kiln_ org=own
        DELETE /v1/sandboxes/:id denied 403 kiln_ org=own
        GET /v1/sandboxes denied 401 kiln_ org=-
        DELETE /v1/sandboxes/:id ok 204 kiln_ org=own
    "#]]
    .assert_eq(&out);
    s.teardown().await;
}

#[tokio::test]
async fn rate_limits_answer_429_with_headers_per_key_and_bucket() {
    let dir = tempfile::tempdir().expect("tmp");
    let s = harness::start(harness::config(dir.path())).await;
    let b = new_org(&s, "tenant-r").await;
    let kb = b.key.expect("key").secret;
    let limits = json!({
        "manage": {"per_sec": 0.01, "burst": 2},
        "create": {"per_sec": 0.01, "burst": 1},
        "sandbox": {"per_sec": 0.01, "burst": 1}
    });
    let path = format!("/v1/orgs/{}/rate-limits", b.org.id);
    let (st, body) = call_full(&s, &s.kiln.token, "PUT", &path, Some(&limits)).await;
    assert_eq!(st, 200, "{body}");
    let mut out = String::new();
    for _ in 0..3 {
        let r = reqwest::Client::new()
            .get(s.url("/v1/sandboxes"))
            .bearer_auth(&kb)
            .send()
            .await
            .expect("send");
        let h = |n: &str| {
            r.headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_string()
        };
        out.push_str(&format!(
            "{} limit={} remaining={} retry-after={}\n",
            r.status().as_u16(),
            h("ratelimit-limit"),
            h("ratelimit-remaining"),
            if h("retry-after") == "-" { "-" } else { "set" },
        ));
    }
    // The create bucket is separate from the management one, and other keys are unaffected.
    let create = call(
        &s,
        &kb,
        "POST",
        "/v1/sandboxes",
        Some(&json!({"template": "nope"})),
    )
    .await;
    out.push_str(&format!("create: {create}\n"));
    let create = call(
        &s,
        &kb,
        "POST",
        "/v1/sandboxes",
        Some(&json!({"template": "nope"})),
    )
    .await;
    out.push_str(&format!("create again: {create}\n"));
    let other = new_key(
        &s,
        &s.kiln.token,
        json!({"role": "member", "org": b.org.id}),
    )
    .await;
    let got = call(&s, &other.secret, "GET", "/v1/sandboxes", None).await;
    out.push_str(&format!("another key of the org: {got}\n"));
    expect![[r#"
        200 limit=2 remaining=1 retry-after=-
        200 limit=2 remaining=0 retry-after=-
        429 limit=2 remaining=0 retry-after=set
        create: 404 template_not_found
        create again: 429 rate_limited
        another key of the org: 200
    "#]]
    .assert_eq(&out);
    s.teardown().await;
}

/// Two servers on one PostgreSQL database (one shared secret): keys, orgs and revocation are
/// shared; each acts only on its own sandboxes, and a restart of one never marks the other's
/// sandboxes dead.
#[tokio::test]
async fn two_servers_share_one_postgres_database() {
    let schema = kiln_store::testing::schema().await.expect("postgres");
    let shared = tempfile::tempdir().expect("tmp");
    let secret = shared.path().join("secret");
    let (da, db) = (
        tempfile::tempdir().expect("tmp"),
        tempfile::tempdir().expect("tmp"),
    );
    let mut ca = harness::config(da.path());
    ca.database_url = Some(schema.url.clone());
    ca.secret_path = Some(secret.clone());
    let mut cb = harness::config(db.path());
    cb.database_url = Some(schema.url.clone());
    cb.secret_path = Some(secret.clone());
    let a = harness::start(ca).await;
    let b = harness::start(cb.clone()).await;
    let owner = a.kiln.token.clone();
    assert!(!owner.is_empty());
    assert!(
        b.kiln.token.is_empty(),
        "the second server does not mint a second owner key"
    );
    // A key minted on A works on B; revoked on B, it fails on A at once.
    let k = new_key(&a, &owner, json!({"role": "member"})).await;
    assert_eq!(
        call(&b, &k.secret, "GET", "/v1/sandboxes", None).await,
        "200"
    );
    assert_eq!(
        call(
            &b,
            &owner,
            "DELETE",
            &format!("/v1/keys/{}", k.key.id),
            None
        )
        .await,
        "204"
    );
    assert_eq!(
        call(&a, &k.secret, "GET", "/v1/sandboxes", None).await,
        "401 key_revoked"
    );
    // A's sandbox is visible through B but only A acts on it.
    let (st, body) = call_full(&a, &owner, "POST", "/v1/sandboxes", Some(&json!({}))).await;
    assert_eq!(st, 201, "{body}");
    let sb: Sandbox = serde_json::from_str(&body).expect("sandbox");
    assert_eq!(
        call(&b, &owner, "GET", &format!("/v1/sandboxes/{}", sb.id), None).await,
        "200"
    );
    let exec = format!("/v1/sandboxes/{}/exec", sb.id);
    let cmd = json!({"cmd": ["true"]});
    assert_eq!(
        call(&b, &owner, "POST", &exec, Some(&cmd)).await,
        "409 sandbox_on_other_server"
    );
    // Restarting B (reconcile) leaves A's sandbox alone.
    b.stop().await;
    let b = harness::start(cb).await;
    let (out, _, code) = a.sh(&sb.id, "echo still-here").await;
    assert_eq!((out.as_str(), code), ("still-here\n", 0));
    b.teardown().await;
    a.teardown().await;
    schema.drop_schema().await;
}
