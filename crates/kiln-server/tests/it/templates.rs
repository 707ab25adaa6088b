//! Organisation-private templates: a spec uploaded over the shipped roles, built into the
//! organisation's own ref from the shared (cached) layers, used for sandboxes, and invisible
//! to another organisation (404 on inspect, build, create, remove; absent from its listing);
//! public templates stay visible to all and only the system organisation rebuilds or
//! removes them.

use serde_json::{json, Value};

use crate::harness::{self, TestServer};
use crate::tenancy::{call, call_full, created, new_org};

/// Runs `script` in sandbox `id` with `key`: (HTTP status, exit code from the stream).
async fn sh_as(s: &TestServer, key: &str, id: &str, script: &str) -> (u16, Option<i64>) {
    let (st, body) = call_full(
        s,
        key,
        "POST",
        &format!("/v1/sandboxes/{id}/exec"),
        Some(&json!({"cmd": ["sh", "-c", script]})),
    )
    .await;
    let code = body
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|e| e["type"] == "exit")
        .and_then(|e| e["exit_code"].as_i64());
    (st, code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_templates_are_private_and_share_layers() {
    let dir = tempfile::tempdir().expect("tmp");
    let s = harness::start(harness::config(dir.path())).await;
    let a = new_org(&s, "tpl-a").await.key.expect("key").secret;
    let b = new_org(&s, "tpl-b").await.key.expect("key").secret;
    let name = format!("team-{}", std::process::id());
    let path = format!("/v1/templates/{name}");
    let spec =
        json!({"description": "A's base", "parent": "base", "vars": {"git_user_name": "Team A"}});

    // Upload (201), replace (200); bad specs are refused and change nothing.
    let (st, body) = call_full(&s, &a, "PUT", &path, Some(&spec)).await;
    assert_eq!(st, 201, "{body}");
    let v: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["layers"], json!(["base", "git", "ollama"]), "{v}");
    assert_eq!(v["visibility"], "private");
    let spec = json!({"description": "A's base", "parent": "base"});
    assert_eq!(call(&s, &a, "PUT", &path, Some(&spec)).await, "200");
    for (bad, want) in [
        (
            json!({"parent": "base", "vars": {"python_extra_tools": ["x"]}}),
            "422 invalid_template",
        ),
        (
            json!({"parent": "base", "vars": {"git_user_name": "$(id)"}}),
            "422 invalid_template",
        ),
        (
            json!({"parent": "base", "roles": ["nope"]}),
            "422 invalid_template",
        ),
        (json!({"parent": "no-such-parent"}), "422 invalid_template"),
        (
            json!({"parent": "base", "bogus": 1}),
            "400 invalid_argument",
        ),
    ] {
        assert_eq!(call(&s, &a, "PUT", &path, Some(&bad)).await, want, "{bad}");
    }
    assert_eq!(
        call(&s, &a, "PUT", "/v1/templates/python", Some(&spec)).await,
        "409 template_name_taken"
    );
    // Members read templates but do not upload them.
    let member = created(&s, &a, "POST", "/v1/keys", &json!({"role": "member"})).await["secret"]
        .as_str()
        .expect("secret")
        .to_string();
    assert_eq!(
        call(&s, &member, "PUT", &path, Some(&spec)).await,
        "403 permission_denied"
    );

    // Build: every layer is the parent's, already in the store.
    let (st, body) = call_full(&s, &a, "POST", &format!("{path}/build"), None).await;
    assert_eq!(st, 200, "{body}");
    let done: Value = body
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|e| e["event"] == "done")
        .unwrap_or_else(|| panic!("no done event: {body}"));
    assert_eq!(done["rebuilt"], 0, "{body}");
    let (st, body) = call_full(&s, &a, "GET", &path, None).await;
    assert_eq!(st, 200, "{body}");
    let mine: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(mine["visibility"], "private");
    assert_eq!(mine["spec"]["description"], "A's base");
    let (_, body) = call_full(&s, &a, "GET", "/v1/templates/base", None).await;
    let base: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(base["visibility"], "public");
    assert_eq!(
        mine["layers"], base["layers"],
        "the layers are shared, not copied"
    );
    let (_, list) = call_full(&s, &a, "GET", "/v1/templates", None).await;
    let list: Value = serde_json::from_str(&list).expect("json");
    let vis = |n: &str| {
        list["templates"]
            .as_array()
            .expect("templates")
            .iter()
            .find(|t| t["name"] == n)
            .map(|t| t["visibility"].clone())
    };
    assert_eq!(vis(&name), Some(json!("private")));
    assert_eq!(vis("base"), Some(json!("public")));

    // A sandbox of it, for A.
    let (st, body) = call_full(
        &s,
        &a,
        "POST",
        "/v1/sandboxes",
        Some(&json!({"template": name})),
    )
    .await;
    assert_eq!(st, 201, "{body}");
    let sb: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(sb["template"], name.as_str());
    let sb_id = sb["id"].as_str().expect("id").to_string();
    assert_eq!(sh_as(&s, &a, &sb_id, "git --version").await, (200, Some(0)));

    // B: nothing of it exists.
    for (m, p, body) in [
        ("GET", path.clone(), None),
        ("POST", format!("{path}/build"), None),
        ("DELETE", path.clone(), None),
        (
            "POST",
            "/v1/sandboxes".to_string(),
            Some(json!({"template": name})),
        ),
    ] {
        assert_eq!(
            call(&s, &b, m, &p, body.as_ref()).await,
            "404 template_not_found",
            "{m} {p}"
        );
    }
    let (_, list) = call_full(&s, &b, "GET", "/v1/templates", None).await;
    assert!(!list.contains(&name), "{list}");
    assert!(
        list.contains("\"base\""),
        "public templates are listed: {list}"
    );
    // Public templates: visible, but only the system organisation rebuilds or removes them.
    assert_eq!(
        call(&s, &b, "POST", "/v1/templates/base/build", None).await,
        "403 permission_denied"
    );
    assert_eq!(
        call(&s, &b, "DELETE", "/v1/templates/base", None).await,
        "403 permission_denied"
    );

    // A removes it entirely (spec and ref); its sandbox keeps running on the shared layers.
    assert_eq!(call(&s, &a, "DELETE", &path, None).await, "204");
    assert_eq!(
        call(&s, &a, "GET", &path, None).await,
        "404 template_not_found"
    );
    assert_eq!(
        call(&s, &a, "POST", &format!("{path}/build"), None).await,
        "404 template_not_found"
    );
    assert_eq!(sh_as(&s, &a, &sb_id, "true").await, (200, Some(0)));
    s.teardown().await;
}
