//! Create / exec / pause / resume / remove, status reporting and create failures.

use std::time::Duration;

use kiln_protocol::kilnd::ExecSpec;
use kiln_sandbox::engine::RealEngine;
use kiln_sandbox::linux::RealHost;
use kiln_sandbox::{Runtime, RuntimeStatus, SandboxError};

use crate::{require_root, sh, Harness};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_exec_pause_resume_remove() {
    require_root!();
    let h = Harness::new().await;
    let mut spec = h.spec("life-1");
    spec.env = vec![("KILN_TEST".into(), "hello".into())];
    spec.hostname = "box-one".into();
    let created = h.rt.create(&spec).await.expect("create");
    assert!(created.ip.is_none());
    assert!(std::path::Path::new(&format!("/proc/{}", created.init_pid)).exists());
    assert_eq!(
        h.rt.status("life-1").await.expect("status"),
        RuntimeStatus::Running
    );

    let out = sh(&h.rt, "life-1", "tr '\\0' '\\n' < /proc/1/environ | grep ^KILN_TEST=; hostname; cat /etc/hostname; cat /proc/1/cmdline | tr '\\0' ' '; echo; id -u").await;
    assert!(out.ok(), "{out:?}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(
        lines[0], "KILN_TEST=hello",
        "spec.env is kilnd's environment"
    );
    assert_eq!(lines[1], "box-one");
    assert_eq!(lines[2], "box-one");
    assert!(lines[3].starts_with("/.kiln/kilnd serve"), "{out:?}");
    assert_eq!(lines[4], "0");

    // The writable layer works and is private to the sandbox.
    let out = sh(
        &h.rt,
        "life-1",
        "echo data > /root/file && cat /root/file && touch /usr/bin/new-tool",
    )
    .await;
    assert!(out.ok() && out.stdout == "data\n", "{out:?}");
    assert!(
        !crate::layer().join("usr/bin/new-tool").exists(),
        "the image layer must stay untouched"
    );
    assert!(h.rt.memory_usage("life-1").await.expect("memory") > 0);

    // Metering reads: CPU time grows with work done, disk counts the writable layer.
    let before = h.rt.resource_usage("life-1").await.expect("usage");
    let out = sh(
        &h.rt,
        "life-1",
        "head -c 3000000 /dev/urandom > /root/blob && sync && i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done",
    )
    .await;
    assert!(out.ok(), "{out:?}");
    let after = h.rt.resource_usage("life-1").await.expect("usage");
    let (b, a) = (before.cpu_ns.expect("cpu"), after.cpu_ns.expect("cpu"));
    assert!(a > b, "cpu time must grow: {b} -> {a}");
    assert!(after.memory_bytes > 0);
    let disk = after
        .disk_bytes
        .expect("btrfs publishes quota-group counts in sysfs");
    assert!(disk >= 3_000_000, "the 3 MB blob is counted: {disk}");

    h.rt.pause("life-1").await.expect("pause");
    assert_eq!(
        h.rt.status("life-1").await.expect("status"),
        RuntimeStatus::Paused
    );
    let frozen = std::fs::read_to_string(h.cgroup_file("freezer", "life-1", "freezer.state"))
        .expect("freezer");
    assert_eq!(frozen.trim(), "FROZEN");
    // A frozen kilnd does not answer.
    let ping = tokio::time::timeout(Duration::from_millis(300), h.rt.client("life-1").ping()).await;
    assert!(ping.is_err(), "a paused sandbox must not answer");
    h.rt.resume("life-1").await.expect("resume");
    assert_eq!(
        h.rt.status("life-1").await.expect("status"),
        RuntimeStatus::Running
    );
    assert!(sh(&h.rt, "life-1", "cat /root/file").await.stdout == "data\n");

    // Remove while paused works too.
    h.rt.pause("life-1").await.expect("pause again");
    h.rt.remove("life-1").await.expect("remove");
    assert_eq!(
        h.rt.status("life-1").await.expect("status"),
        RuntimeStatus::Missing
    );
    assert!(!std::path::Path::new(&format!("/proc/{}", created.init_pid)).exists());
    h.rt.remove("life-1").await.expect("remove is idempotent");
    assert!(matches!(
        h.rt.pause("life-1").await,
        Err(SandboxError::NotFound(_))
    ));
    assert!(matches!(
        h.rt.memory_usage("life-1").await,
        Err(SandboxError::NotFound(_))
    ));
    assert!(matches!(
        h.rt.resource_usage("life-1").await,
        Err(SandboxError::NotFound(_))
    ));
    h.wipe().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_and_invalid_creates_are_refused() {
    require_root!();
    let h = Harness::new().await;
    h.rt.create(&h.spec("dup-1")).await.expect("create");
    assert!(matches!(
        h.rt.create(&h.spec("dup-1")).await,
        Err(SandboxError::AlreadyExists(_))
    ));
    // The first one is unharmed.
    assert!(sh(&h.rt, "dup-1", "true").await.ok());
    let mut bad = h.spec("bad-1");
    bad.layers = vec!["/nonexistent/layer".into()];
    assert!(matches!(
        h.rt.create(&bad).await,
        Err(SandboxError::InvalidSpec(_))
    ));
    assert!(matches!(
        h.rt.create(&h.spec("UPPER")).await,
        Err(SandboxError::InvalidSpec(_))
    ));
    assert_eq!(
        h.rt.status("bad-1").await.expect("status"),
        RuntimeStatus::Missing
    );
    h.wipe().await;
}

/// A "kilnd" that exits at once: create fails fast with the log, and leaves nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_fails_cleanly_when_kilnd_dies() {
    require_root!();
    let h = Harness::new().await;
    let fake = h.dir.path().join("fake-kilnd");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho 'fake kilnd: giving up' >&2\nexit 3\n",
    )
    .expect("fake");
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let mut cfg = h.cfg.clone();
    cfg.kilnd_path = fake;
    let engine = RealEngine::start(&crate::kilnd_path(), &cfg.run_dir.join(".reaper.sock"))
        .await
        .expect("engine");
    let rt = Runtime::with_parts(
        cfg,
        std::sync::Arc::new(RealHost),
        std::sync::Arc::new(engine),
        std::path::Path::new("/run/kiln-net"),
    )
    .await
    .expect("runtime");
    let t = std::time::Instant::now();
    let err = rt.create(&h.spec("dies-1")).await.expect_err("must fail");
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t.elapsed()
    );
    match &err {
        SandboxError::DaemonTimeout { log_tail, .. } => {
            assert!(log_tail.contains("giving up"), "{log_tail}")
        }
        other => panic!("unexpected error {other}"),
    }
    assert_eq!(
        rt.status("dies-1").await.expect("status"),
        RuntimeStatus::Missing
    );
    assert!(!h.cfg.data_dir.join("sandboxes/dies-1").exists());
    assert!(!h.cfg.data_dir.join("disk/dies-1").exists());
    assert!(!h.cgroup_file("memory", "dies-1", "").exists());
    h.wipe().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_sandboxes_side_by_side() {
    require_root!();
    let h = Harness::new().await;
    let ids: Vec<String> = (0..6).map(|i| format!("par-{i}")).collect();
    let mut tasks = Vec::new();
    for id in &ids {
        let rt = h.rt.clone();
        let spec = h.spec(id);
        tasks.push(tokio::spawn(async move { rt.create(&spec).await }));
    }
    for t in tasks {
        t.await.expect("join").expect("create");
    }
    for id in &ids {
        let out = crate::run(&h.rt, id, &["/bin/hostname"]).await;
        assert_eq!(out.stdout.trim(), id);
    }
    // A detached process survives the client going away.
    let mut s =
        h.rt.client("par-0")
            .exec(ExecSpec {
                cmd: vec!["sleep".into(), "30".into()],
                detach: true,
                ..Default::default()
            })
            .await
            .expect("exec");
    assert!(s.next().await.is_none());
    let procs = h.rt.client("par-0").list_processes().await.expect("list");
    assert!(procs.iter().any(|p| p.running && p.cmd[0] == "sleep"));
    let mut tasks = Vec::new();
    for id in ids {
        let rt = h.rt.clone();
        tasks.push(tokio::spawn(async move { rt.remove(&id).await }));
    }
    for t in tasks {
        t.await.expect("join").expect("remove");
    }
    h.wipe().await;
}
