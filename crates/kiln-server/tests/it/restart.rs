//! Crash and restart: sandboxes survive a server restart; dead ones are reconciled; leftovers
//! nobody owns are removed; nothing leaks (mounts, cgroups, netns, processes).

use kiln_protocol::api::{CreateSandbox, SandboxState};

use crate::harness::{self, cmd};

#[tokio::test]
async fn restart_adopts_live_sandboxes_and_reconciles_dead_ones() {
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = harness::config(dir.path());
    let before = harness::host_counts(&cfg);
    assert_eq!(
        before,
        harness::HostCounts {
            mounts: 0,
            cgroup_dirs: 0,
            netns: 0,
            processes: 0
        }
    );

    let s = harness::start(cfg.clone()).await;
    let keep = s.create(&CreateSandbox::default()).await;
    let doomed = s.create(&CreateSandbox::default()).await;
    let r = s
        .http
        .post(s.url(&format!("/v1/sandboxes/{}/processes", keep.id)))
        .json(&cmd(&["sh", "-c", "echo started; sleep 600"]))
        .send()
        .await
        .expect("bg");
    assert_eq!(r.status(), 201);
    let pid: kiln_protocol::api::ProcessStarted = r.json().await.expect("json");
    s.stop().await;

    // While the server is down, one sandbox dies (its PID 1 is killed) ...
    let out = std::process::Command::new("runc")
        .arg("--root")
        .arg(cfg.run_dir().join(".runc"))
        .args(["kill", &doomed.id, "KILL"])
        .output()
        .expect("runc kill");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // ... and a stray bundle appears that no database row owns.
    std::fs::create_dir_all(cfg.data_dir.join("sandboxes/sb-orphan000000")).expect("mkdir");

    let s = harness::start(cfg.clone()).await;
    let got = async |id: &str| {
        s.kiln
            .store
            .get(id)
            .await
            .expect("get")
            .expect("row")
            .sandbox
            .state
    };
    assert_eq!(got(&keep.id).await, SandboxState::Running);
    assert_eq!(got(&doomed.id).await, SandboxState::Dead);
    assert!(!cfg.data_dir.join("sandboxes/sb-orphan000000").exists());
    // The survivor still runs its background process, and its output is still there.
    let text = s
        .http
        .get(s.url(&format!(
            "/v1/sandboxes/{}/processes/{}/output",
            keep.id, pid.pid
        )))
        .send()
        .await
        .expect("attach");
    drop(text);
    let (out, _, code) = s.sh(&keep.id, "echo alive").await;
    assert_eq!((out.as_str(), code), ("alive\n", 0));
    // Exec in the dead one is a clear 409.
    let r = s
        .http
        .post(s.url(&format!("/v1/sandboxes/{}/exec", doomed.id)))
        .json(&cmd(&["true"]))
        .send()
        .await
        .expect("exec");
    assert_eq!(r.status(), 409);

    // Remove everything through the API and check that nothing is left behind.
    for id in [&keep.id, &doomed.id] {
        let r = s
            .http
            .delete(s.url(&format!("/v1/sandboxes/{id}")))
            .send()
            .await
            .expect("rm");
        assert_eq!(r.status(), 204);
    }
    s.teardown().await;
    let settled = harness::eventually(15, async || harness::host_counts(&cfg) == before).await;
    assert!(
        settled,
        "leak: before {before:?}, after {:?}",
        harness::host_counts(&cfg)
    );
}
