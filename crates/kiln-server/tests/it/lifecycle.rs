//! Sandbox lifecycle through the API: create, get, list, pause, resume, remove, TTL, warm pool.

use kiln_protocol::api::{CreateSandbox, DurationArg, SandboxList, SandboxState, SizeArg};

use crate::harness::{self, cmd};

#[tokio::test]
async fn create_exec_pause_resume_remove() {
    let dir = tempfile::tempdir().expect("tmp");
    let s = harness::start(harness::config(dir.path())).await;
    let sb = s
        .create(&CreateSandbox {
            memory: Some(SizeArg::Text("128M".into())),
            labels: [("owner".to_string(), "test".to_string())]
                .into_iter()
                .collect(),
            ..Default::default()
        })
        .await;
    assert_eq!(sb.state, SandboxState::Running);
    assert_eq!(sb.memory_bytes, 128 << 20);
    assert!(sb.id.starts_with("sb-"));

    let (out, _, code) = s
        .sh(
            &sb.id,
            "cat /etc/os-release | grep VERSION_ID; hostname; echo $KILN_SANDBOX_ID",
        )
        .await;
    assert_eq!(code, 0);
    assert_eq!(out, format!("VERSION_ID=\"12\"\n{0}\n{0}\n", sb.id));

    let list: SandboxList = s
        .http
        .get(s.url("/v1/sandboxes"))
        .send()
        .await
        .expect("ls")
        .json()
        .await
        .expect("json");
    assert_eq!(
        list.sandboxes
            .iter()
            .map(|x| x.id.clone())
            .collect::<Vec<_>>(),
        vec![sb.id.clone()]
    );

    // A process started before the pause must still be there after the resume.
    let r = s
        .http
        .post(s.url(&format!("/v1/sandboxes/{}/processes", sb.id)))
        .json(&cmd(&["sleep", "600"]))
        .send()
        .await
        .expect("bg");
    assert_eq!(r.status(), 201);

    let r = s
        .http
        .post(s.url(&format!("/v1/sandboxes/{}/pause", sb.id)))
        .send()
        .await
        .expect("pause");
    assert_eq!(r.status(), 200);
    let paused: kiln_protocol::api::Sandbox = r.json().await.expect("json");
    assert_eq!(paused.state, SandboxState::Paused);
    let r = s
        .http
        .post(s.url(&format!("/v1/sandboxes/{}/exec", sb.id)))
        .json(&cmd(&["true"]))
        .send()
        .await
        .expect("exec");
    assert_eq!(r.status(), 409);
    let body: kiln_protocol::api::ErrorBody = r.json().await.expect("json");
    assert_eq!(body.error.code, "sandbox_paused");

    let r = s
        .http
        .post(s.url(&format!("/v1/sandboxes/{}/resume", sb.id)))
        .send()
        .await
        .expect("resume");
    assert_eq!(r.status(), 200);
    let procs: kiln_protocol::api::ProcessList = s
        .http
        .get(s.url(&format!("/v1/sandboxes/{}/processes", sb.id)))
        .send()
        .await
        .expect("ps")
        .json()
        .await
        .expect("json");
    assert!(procs
        .processes
        .iter()
        .any(|p| p.cmd == vec!["sleep".to_string(), "600".to_string()] && p.running));

    let r = s
        .http
        .delete(s.url(&format!("/v1/sandboxes/{}", sb.id)))
        .send()
        .await
        .expect("rm");
    assert_eq!(r.status(), 204);
    let r = s
        .http
        .get(s.url(&format!("/v1/sandboxes/{}", sb.id)))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 404);
    let r = s
        .http
        .post(s.url(&format!("/v1/sandboxes/{}/exec", sb.id)))
        .json(&cmd(&["true"]))
        .send()
        .await
        .expect("exec");
    assert_eq!(r.status(), 404);
    s.teardown().await;
}

#[tokio::test]
async fn ttl_removes_the_sandbox() {
    let dir = tempfile::tempdir().expect("tmp");
    let s = harness::start(harness::config(dir.path())).await;
    let sb = s
        .create(&CreateSandbox {
            ttl: Some(DurationArg::Text("1s".into())),
            ..Default::default()
        })
        .await;
    assert!(sb.expires_at_ms.is_some());
    let id = sb.id.clone();
    let gone = harness::eventually(20, async || {
        s.http
            .get(s.url(&format!("/v1/sandboxes/{id}")))
            .send()
            .await
            .map(|r| r.status() == 404)
            .unwrap_or(false)
    })
    .await;
    assert!(gone, "sandbox with a 1s TTL was not removed");
    assert_eq!(
        s.kiln.runtime.status(&id).await.expect("status"),
        kiln_sandbox::RuntimeStatus::Missing
    );
    s.teardown().await;
}

#[tokio::test]
async fn warm_pool_serves_matching_creates() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut cfg = harness::config(dir.path());
    cfg.warm_pool = 1;
    let s = harness::start(cfg).await;
    let filled = harness::eventually(30, async || s.kiln.pool_size().await == 1).await;
    assert!(filled, "pool never filled");
    // Pool members are invisible.
    let list: SandboxList = s
        .http
        .get(s.url("/v1/sandboxes"))
        .send()
        .await
        .expect("ls")
        .json()
        .await
        .expect("json");
    assert!(list.sandboxes.is_empty());

    let sb = s.create(&CreateSandbox::default()).await;
    assert!(sb.from_pool, "default create should claim the pool member");
    let (out, _, _) = s.sh(&sb.id, "echo claimed").await;
    assert_eq!(out, "claimed\n");
    // A create with a different spec never gets a pool member.
    let other = s
        .create(&CreateSandbox {
            memory: Some(SizeArg::Bytes(64 << 20)),
            ..Default::default()
        })
        .await;
    assert!(!other.from_pool);
    // And `pool: false` forces a cold create.
    let refilled = harness::eventually(30, async || s.kiln.pool_size().await == 1).await;
    assert!(refilled, "pool never refilled");
    let cold = s
        .create(&CreateSandbox {
            pool: Some(false),
            ..Default::default()
        })
        .await;
    assert!(!cold.from_pool);
    s.teardown().await;
}
