//! Organisation git settings through the API against the real `git http-backend` server
//! (bound on the bridge address, reached from `full` sandboxes): a stored credential is used
//! by clone and push without being passed or ever returned, is sealed in the database, never
//! lands in the sandbox, is audited when used, and is invisible and unused for another
//! organisation; the org's default author signs commits that name none.

use std::path::Path;
use std::process::Command;

use kiln_devtools::gitserver::GitServer;
use serde_json::{json, Value};

use crate::harness::{self, TestServer};
use crate::tenancy::{call, call_full, created, new_org};

const SECRET: &str = "s3cret-Token-9f2c";

fn host_git(dir: &Path, script: &str) {
    let out = Command::new("sh")
        .args(["-c", script])
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", dir)
        .output()
        .expect("sh");
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn git(s: &TestServer, key: &str, id: &str, op: &str, body: Value) -> (u16, Value) {
    let (st, text) = call_full(
        s,
        key,
        "POST",
        &format!("/v1/sandboxes/{id}/git/{op}"),
        Some(&body),
    )
    .await;
    (st, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// The status and error code of an answer.
fn refused(r: &(u16, Value)) -> (u16, Option<&str>) {
    (r.0, r.1["error"]["code"].as_str())
}

async fn full_sandbox(s: &TestServer, key: &str) -> String {
    created(s, key, "POST", "/v1/sandboxes", &json!({"network": "full"})).await["id"]
        .as_str()
        .expect("id")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_credentials_and_default_author() {
    let dir = tempfile::tempdir().expect("tmp");
    let s = harness::start(harness::config(dir.path())).await;
    let owner = s.kiln.token.clone();
    let org_a = s.kiln.system_org.clone();
    // The bridge (and its gateway address) exists once a `full` sandbox does.
    let id = full_sandbox(&s, &owner).await;

    // A bare repository with one commit on the host, served with Basic auth.
    let srv = tempfile::tempdir().expect("srv");
    host_git(
        srv.path(),
        "git init -q --bare -b main repo.git && git clone -q repo.git w 2>/dev/null && cd w && \
         echo one > one.txt && git add one.txt && \
         git -c user.name=host -c user.email=host@example.com commit -q -m one && git push -q origin main",
    );
    let server = GitServer::start_on("10.201.0.1", srv.path(), "alice", SECRET).expect("server");
    let host = server.url.trim_start_matches("http://").to_string();
    let url = format!("{}/repo.git", server.url);

    // Without a credential the clone is refused with a typed error.
    let r = git(
        &s,
        &owner,
        &id,
        "clone",
        json!({"url": url, "repo": "/workspace"}),
    )
    .await;
    assert_eq!(refused(&r), (422, Some("auth_failed")), "{:?}", r.1);

    // Stored once; never shown again (not in the answer, not in the listing), sealed at rest.
    let cred = json!({"host": host, "username": "alice", "password": SECRET});
    let stored = created(&s, &owner, "POST", "/v1/git-credentials", &cred).await;
    assert!(!stored.to_string().contains(SECRET), "{stored}");
    let cred_id = stored["id"].as_str().expect("id").to_string();
    assert_eq!(
        call(&s, &owner, "POST", "/v1/git-credentials", Some(&cred)).await,
        "409 git_credential_exists"
    );
    let rows = s
        .kiln
        .store
        .list_git_credentials(&org_a)
        .await
        .expect("rows");
    assert_eq!(rows.len(), 1);
    assert!(rows[0].secret.starts_with("v1:") && !rows[0].secret.contains(SECRET));
    for (bad, code) in [
        (
            json!({"host": "https://x.org", "username": "a", "password": "b"}),
            "400 invalid_argument",
        ),
        (
            json!({"host": "x.org", "username": "a\nb", "password": "b"}),
            "400 invalid_argument",
        ),
        (
            json!({"host": "x.org", "username": "a", "password": ""}),
            "400 invalid_argument",
        ),
    ] {
        assert_eq!(
            call(&s, &owner, "POST", "/v1/git-credentials", Some(&bad)).await,
            code
        );
    }

    // The org's default author.
    let author = json!({"author": {"name": "Ada Org", "email": "ada@org.example"}});
    let path = format!("/v1/orgs/{org_a}/git");
    assert_eq!(call(&s, &owner, "PUT", &path, Some(&author)).await, "200");
    let bad = json!({"author": {"name": "x", "email": "not-an-email"}});
    assert_eq!(
        call(&s, &owner, "PUT", &path, Some(&bad)).await,
        "400 invalid_argument"
    );

    // Clone and push with the stored credential, no credentials in the calls.
    let (st, v) = git(
        &s,
        &owner,
        &id,
        "clone",
        json!({"url": url, "repo": "/workspace"}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let (_, err, code) = s
        .sh(
            &id,
            "cd /workspace/repo && echo two > two.txt && git add two.txt",
        )
        .await;
    assert_eq!(code, 0, "{err}");
    let (st, v) = git(
        &s,
        &owner,
        &id,
        "commit",
        json!({"repo": "/workspace/repo", "message": "two"}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["author"]["name"], "Ada Org", "{v}");
    assert_eq!(v["author"]["email"], "ada@org.example", "{v}");
    let (st, v) = git(&s, &owner, &id, "push", json!({"repo": "/workspace/repo"})).await;
    assert_eq!(st, 200, "{v}");
    host_git(
        srv.path(),
        "test \"$(git --git-dir=repo.git log -1 --format=%an/%s main)\" = 'Ada Org/two'",
    );
    // Nothing of the secret in the sandbox: files, git config, environment.
    let (out, _, _) = s
        .sh(
            &id,
            &format!(
                "grep -rs -l '{SECRET}' /workspace /root /etc /tmp /home; \
                 cat /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n' | grep -c '{SECRET}'"
            ),
        )
        .await;
    assert_eq!(out.trim(), "0", "the secret leaked into the sandbox: {out}");

    // Use is recorded: last-used time and an audit entry per use.
    let (_, list) = call_full(&s, &owner, "GET", "/v1/git-credentials", None).await;
    assert!(!list.contains(SECRET));
    let list: Value = serde_json::from_str(&list).expect("json");
    assert!(
        list["credentials"][0]["last_used_at_ms"].as_u64().is_some(),
        "{list}"
    );
    let (_, audit) = call_full(&s, &owner, "GET", "/v1/audit?limit=200", None).await;
    let audit: Value = serde_json::from_str(&audit).expect("json");
    let entries = audit["entries"].as_array().expect("entries");
    let used = entries
        .iter()
        .filter(|e| {
            e["action"] == "git credential used"
                && e["resource"] == format!("/v1/git-credentials/{cred_id}")
        })
        .count();
    assert!(used >= 2, "clone and push are audited: {audit}");
    assert!(entries
        .iter()
        .any(|e| e["action"] == "POST /v1/git-credentials" && e["outcome"] == "ok"));
    assert!(entries
        .iter()
        .any(|e| e["action"] == "PUT /v1/orgs/:org/git" && e["outcome"] == "ok"));

    // Another organisation sees none of it and its clone gets no credential.
    let b = new_org(&s, "git-tenant-b").await;
    let key_b = b.key.expect("key").secret;
    let id_b = full_sandbox(&s, &key_b).await;
    let r = git(
        &s,
        &key_b,
        &id_b,
        "clone",
        json!({"url": url, "repo": "/workspace"}),
    )
    .await;
    assert_eq!(refused(&r), (422, Some("auth_failed")), "{:?}", r.1);
    let (_, list) = call_full(&s, &key_b, "GET", "/v1/git-credentials", None).await;
    assert_eq!(list, r#"{"credentials":[]}"#);
    assert_eq!(
        call(
            &s,
            &key_b,
            "DELETE",
            &format!("/v1/git-credentials/{cred_id}"),
            None
        )
        .await,
        "404 git_credential_not_found"
    );
    // B's own default author is Kiln's.
    let (_, d) = call_full(
        &s,
        &key_b,
        "GET",
        &format!("/v1/orgs/{}/git", b.org.id),
        None,
    )
    .await;
    assert_eq!(d, r#"{"author":null}"#);

    // Only owners and admins manage credentials; members cannot even list them.
    let member = created(&s, &owner, "POST", "/v1/keys", &json!({"role": "member"})).await
        ["secret"]
        .as_str()
        .expect("secret")
        .to_string();
    assert_eq!(
        call(&s, &member, "GET", "/v1/git-credentials", None).await,
        "403 permission_denied"
    );
    assert_eq!(
        call(&s, &member, "POST", "/v1/git-credentials", Some(&cred)).await,
        "403 permission_denied"
    );

    // A wrong stored password is a typed auth failure; removing by host works.
    assert_eq!(
        call(
            &s,
            &owner,
            "DELETE",
            &format!("/v1/git-credentials/{host}"),
            None
        )
        .await,
        "204"
    );
    let wrong = json!({"host": host, "username": "alice", "password": "wrong"});
    assert_eq!(
        call(&s, &owner, "POST", "/v1/git-credentials", Some(&wrong)).await,
        "201"
    );
    let r = git(&s, &owner, &id, "pull", json!({"repo": "/workspace/repo"})).await;
    assert_eq!(refused(&r), (422, Some("auth_failed")), "{:?}", r.1);
    // Credentials given in the call come first.
    let (st, v) = git(
        &s,
        &owner,
        &id,
        "pull",
        json!({"repo": "/workspace/repo", "credentials": [{"host": host, "username": "alice", "password": SECRET}]}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    s.teardown().await;
}
