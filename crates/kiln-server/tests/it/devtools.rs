//! Developer tools through the API: listening ports and the preview proxy (into a `none`
//! sandbox, without leaking the caller's key), git with typed results and errors, and egress
//! allow-lists set at create time and changed live.

use kiln_protocol::api::{CreateSandbox, EgressAllowList, NetworkMode};
use serde_json::{json, Value};

use crate::harness;

/// A tiny HTTP server in the sandbox (perl is in every Debian image): answers each request
/// with its request line and headers.
const ECHO_SERVER: &str = r#"perl -MIO::Socket::INET -e '
$l = IO::Socket::INET->new(Listen => 5, LocalAddr => "127.0.0.1", LocalPort => 8080, ReuseAddr => 1) or die $!;
while ($c = $l->accept) { my $h = ""; while (<$c>) { last if /^\r?\n$/; $h .= $_ }
  print $c "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: " . length($h) . "\r\nConnection: close\r\n\r\n$h"; close $c }'"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ports_previews_git_and_egress() {
    let dir = tempfile::tempdir().expect("tmp");
    let s = harness::start(harness::config(dir.path())).await;
    let sb = s.create(&CreateSandbox::default()).await;
    let id = sb.id.clone();

    // Ports and the preview proxy.
    let r = s
        .http
        .post(s.url(&format!("/v1/sandboxes/{id}/processes")))
        .json(&harness::cmd(&["sh", "-c", ECHO_SERVER]))
        .send()
        .await
        .expect("start server");
    assert!(
        r.status().is_success(),
        "{}",
        r.text().await.unwrap_or_default()
    );
    let listed = harness::eventually(10, async || {
        let v: Value = s
            .http
            .get(s.url(&format!("/v1/sandboxes/{id}/ports")))
            .send()
            .await
            .expect("ports")
            .json()
            .await
            .expect("json");
        v["ports"].as_array().is_some_and(|p| {
            p.iter()
                .any(|p| p["port"] == 8080 && p["command"] == "perl")
        })
    })
    .await;
    assert!(listed, "port 8080 is listed with its process");
    let r = s
        .http
        .get(s.url(&format!("/v1/sandboxes/{id}/ports/8080/hello/world?x=1")))
        .header("x-custom", "kept")
        .send()
        .await
        .expect("preview");
    assert_eq!(r.status(), 200);
    let seen = r.text().await.expect("body");
    assert!(seen.starts_with("GET /hello/world?x=1 HTTP/1.1"), "{seen}");
    assert!(
        seen.to_ascii_lowercase().contains("x-custom: kept"),
        "{seen}"
    );
    assert!(
        !seen.to_ascii_lowercase().contains("authorization") && !seen.contains(&s.kiln.token),
        "the caller's key never reaches the sandbox: {seen}"
    );
    let r = s
        .http
        .get(s.url(&format!("/v1/sandboxes/{id}/ports/8099/")))
        .send()
        .await
        .expect("preview");
    assert_eq!(r.status(), 502);
    let e: Value = r.json().await.expect("json");
    assert_eq!(e["error"]["code"], "port_not_listening");

    // git: a repository made in the sandbox, then typed operations.
    let (_, err, code) = s
        .sh(
            &id,
            "git init -q -b main /workspace/r && printf 'a\\n' > /workspace/r/a.txt",
        )
        .await;
    assert_eq!(code, 0, "{err}");
    let git = |op: &'static str, body: Value| {
        let s = &s;
        let id = id.clone();
        async move {
            let r = s
                .http
                .post(s.url(&format!("/v1/sandboxes/{id}/git/{op}")))
                .json(&body)
                .send()
                .await
                .expect("git");
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.expect("json"))
        }
    };
    let (st, v) = git("status", json!({"repo": "/workspace/r"})).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["branch"], "main");
    assert_eq!(v["entries"][0]["path"], "a.txt");
    assert_eq!(v["entries"][0]["kind"], "untracked");
    let (st, _) = git("add", json!({"repo": "/workspace/r"})).await;
    assert_eq!(st, 200);
    let (st, v) = git(
        "commit",
        json!({"repo": "/workspace/r", "message": "First", "author": {"name": "Ada", "email": "ada@example.com"}}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["author"]["name"], "Ada");
    let (_, v) = git("log", json!({"repo": "/workspace/r"})).await;
    assert_eq!(v["commits"][0]["subject"], "First");
    let (st, v) = git(
        "commit",
        json!({"repo": "/workspace/r", "message": "again"}),
    )
    .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (409, Some("nothing_to_commit")),
        "{v}"
    );
    let (st, v) = git("status", json!({"repo": "/tmp"})).await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (400, Some("not_a_repository")),
        "{v}"
    );
    let (st, v) = git("frobnicate", json!({"repo": "/workspace/r"})).await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (404, Some("unknown_operation")),
        "{v}"
    );
    let (st, v) = git("status", json!({"repo": "/workspace/r", "bogus": 1})).await;
    assert_eq!(st, 400, "unknown fields are refused: {v}");

    // Egress: a `none` sandbox cannot have a list.
    let r = s
        .http
        .put(s.url(&format!("/v1/sandboxes/{id}/egress")))
        .json(&json!({"allow": {"cidrs": ["10.0.0.0/8"]}}))
        .send()
        .await
        .expect("egress");
    assert_eq!(r.status(), 400);

    // A list at create time implies `full`; it is shown, changed and lifted live.
    let sb2 = s
        .create(&CreateSandbox {
            egress: Some(EgressAllowList {
                domains: vec!["deb.debian.org".into()],
                cidrs: vec!["10.201.0.1".into()],
            }),
            ..Default::default()
        })
        .await;
    assert_eq!(sb2.network, NetworkMode::Full);
    let url = s.url(&format!("/v1/sandboxes/{}/egress", sb2.id));
    let v: Value = s
        .http
        .get(&url)
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(v["allow"]["cidrs"], json!(["10.201.0.1/32"]));
    assert_eq!(v["allow"]["domains"], json!(["deb.debian.org"]));
    let (out, _, _) = s
        .sh(
            &sb2.id,
            "timeout 5 bash -c 'exec 3<>/dev/tcp/192.0.2.1/9' 2>&1; echo rc=$?",
        )
        .await;
    assert!(out.contains("Connection refused"), "refused at once: {out}");
    let v: Value = s
        .http
        .get(&url)
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert!(v["denied_packets"].as_u64().is_some_and(|n| n >= 1), "{v}");
    let v: Value = s
        .http
        .put(&url)
        .json(&json!({"allow": null}))
        .send()
        .await
        .expect("put")
        .json()
        .await
        .expect("json");
    assert_eq!(v["allow"], Value::Null);
    let r = s
        .http
        .put(&url)
        .json(&json!({"allow": {"domains": ["not a domain"]}}))
        .send()
        .await
        .expect("put");
    assert_eq!(r.status(), 400);
    let r = s
        .http
        .post(s.url("/v1/sandboxes"))
        .json(&json!({"network": "none", "egress": {"cidrs": ["10.0.0.0/8"]}}))
        .send()
        .await
        .expect("create");
    assert_eq!(r.status(), 400);

    s.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn language_servers_through_the_api_and_a_websocket() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;

    let dir = tempfile::tempdir().expect("tmp");
    let s = harness::start(harness::config(dir.path())).await;
    let sb = s
        .create(&CreateSandbox {
            template: Some("python".into()),
            ..Default::default()
        })
        .await;
    let id = sb.id.clone();
    let (_, err, code) = s
        .sh(
            &id,
            "mkdir -p /workspace && cd /workspace && \
             printf 'def helper(x):\\n    return x * 2\\n' > util.py && \
             printf 'from util import helper\\n\\nprint(helper(2))\\nprint(missing_name)\\n' > main.py",
        )
        .await;
    assert_eq!(code, 0, "{err}");
    let lsp = |op: &'static str, body: Value| {
        let s = &s;
        let id = id.clone();
        async move {
            let r = s
                .http
                .post(s.url(&format!("/v1/sandboxes/{id}/lsp/{op}")))
                .json(&body)
                .send()
                .await
                .expect("lsp");
            (r.status().as_u16(), r.json::<Value>().await.expect("json"))
        }
    };
    let (st, v) = lsp(
        "diagnostics",
        json!({"path": "/workspace/main.py", "wait_ms": 30000}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let d = v["diagnostics"].as_array().expect("diagnostics");
    assert!(
        d.iter().any(|d| d["message"]
            .as_str()
            .is_some_and(|m| m.contains("missing_name"))
            && d["line"] == 4),
        "{v}"
    );
    let (st, v) = lsp(
        "definition",
        json!({"path": "/workspace/main.py", "line": 3, "column": 7}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["locations"][0]["path"], "/workspace/util.py");
    assert_eq!(v["locations"][0]["line"], 1);
    let (st, v) = lsp(
        "definition",
        json!({"path": "/workspace/main.py", "line": 99, "column": 1}),
    )
    .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (400, Some("invalid_argument")),
        "{v}"
    );
    let (st, v) = lsp("diagnostics", json!({"path": "/workspace/notes.txt"})).await;
    assert_eq!(st, 400, "no language for .txt: {v}");
    let (st, v) = lsp("diagnostics", json!({"path": "/workspace/x.rs"})).await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (422, Some("language_server_missing")),
        "{v}"
    );

    // Raw JSON-RPC over a WebSocket: an editor's initialize handshake.
    let url = s
        .url(&format!(
            "/v1/sandboxes/{id}/lsp/ws?language=python&root=/workspace"
        ))
        .replacen("http://", "ws://", 1);
    let mut req = url.into_client_request().expect("req");
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", s.kiln.token).parse().expect("hdr"),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.expect("ws");
    ws.send(Message::Text(
        json!({"jsonrpc": "2.0", "id": 1, "method": "initialize",
               "params": {"processId": null, "rootUri": "file:///workspace", "capabilities": {}}})
        .to_string(),
    ))
    .await
    .expect("send");
    let reply = tokio::time::timeout(std::time::Duration::from_secs(60), async {
        while let Some(Ok(m)) = ws.next().await {
            if let Message::Text(t) = m {
                let v: Value = serde_json::from_str(t.as_ref()).expect("json-rpc");
                if v["id"] == 1 {
                    return v;
                }
            }
        }
        panic!("the socket closed before the initialize result");
    })
    .await
    .expect("initialize within a minute");
    assert!(reply["result"]["capabilities"].is_object(), "{reply}");
    let _ = ws.close(None).await;
    s.teardown().await;
}
