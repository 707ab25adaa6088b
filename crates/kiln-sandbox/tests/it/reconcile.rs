//! Reconcile after a "restart": unknown sandboxes and stray artefacts go, known ones stay.

use std::time::Duration;

use kiln_sandbox::{Runtime, RuntimeStatus};

use crate::{eventually, require_root, sh, Harness};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_removes_leaked_sandboxes_and_keeps_known_ones() {
    require_root!();
    let h = Harness::new().await;
    h.rt.create(&h.full("known-1")).await.expect("create");
    let dead = h.rt.create(&h.spec("known-dead")).await.expect("create");
    h.rt.create(&h.full("leaked-1")).await.expect("create");
    h.rt.create(&h.spec("leaked-2")).await.expect("create");
    assert!(sh(&h.rt, "known-1", "echo keep > /root/keep").await.ok());
    // Stray artefacts without a container: a cgroup, a volume dir, a socket dir.
    let stray_cg = std::path::Path::new("/sys/fs/cgroup/pids")
        .join(&h.cfg.cgroup_parent)
        .join("stray-cg");
    std::fs::create_dir_all(&stray_cg).expect("stray cgroup");
    std::fs::create_dir_all(h.cfg.run_dir.join("stray-run")).expect("stray run dir");
    // known-dead's init dies behind our back.
    // SAFETY: plain kill(2) of the sandbox's init.
    unsafe { libc::kill(dead.init_pid as i32, libc::SIGKILL) };
    assert!(
        eventually(Duration::from_secs(5), || !std::path::Path::new(&format!(
            "/proc/{}",
            dead.init_pid
        ))
        .exists())
        .await
    );

    // "Restart": a second Runtime over the same directories.
    let rt2 = Runtime::new(h.cfg.clone())
        .await
        .expect("Runtime::new again");
    let known = vec![
        "known-1".to_string(),
        "known-dead".to_string(),
        "never-created".to_string(),
    ];
    let mut report = rt2.reconcile(&known).await.expect("reconcile");
    report.removed.sort();
    report.dead.sort();
    assert_eq!(
        report.removed,
        ["leaked-1", "leaked-2", "stray-cg", "stray-run"]
    );
    assert_eq!(report.dead, ["known-dead", "never-created"]);
    assert!(!stray_cg.exists());
    assert!(!h.cfg.run_dir.join("stray-run").exists());
    assert!(!h.cfg.data_dir.join("sandboxes/leaked-1").exists());
    assert!(!h.cfg.data_dir.join("disk/leaked-2").exists());
    assert_eq!(
        rt2.status("leaked-1").await.expect("status"),
        RuntimeStatus::Missing
    );
    // The known sandbox is untouched and still works through the new runtime.
    assert_eq!(
        rt2.status("known-1").await.expect("status"),
        RuntimeStatus::Running
    );
    assert_eq!(sh(&rt2, "known-1", "cat /root/keep").await.stdout, "keep\n");
    assert_eq!(
        rt2.status("known-dead").await.expect("status"),
        RuntimeStatus::Stopped
    );
    // A dead sandbox can still be removed cleanly.
    rt2.remove("known-dead").await.expect("remove dead");
    assert!(!h.cfg.data_dir.join("sandboxes/known-dead").exists());
    // Reconcile again is a no-op.
    let again = rt2
        .reconcile(&["known-1".to_string()])
        .await
        .expect("reconcile again");
    assert!(
        again.removed.is_empty() && again.dead.is_empty(),
        "{again:?}"
    );
    h.wipe().await;
}
