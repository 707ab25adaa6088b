//! gVisor: the same runtime code drives `runsc` (`--runtime runsc`): a sandbox starts, runs
//! commands on gVisor's kernel, moves files, pauses, resumes and goes away without leftovers;
//! `full` networking is refused with a clear error.

use kiln_sandbox::{OciRuntimeKind, SandboxError};

use crate::{require_root, sh, Harness};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runsc_runs_sandboxes_on_gvisor() {
    require_root!();
    let h = Harness::with(|c| c.runtime = OciRuntimeKind::Runsc).await;
    h.rt.create(&h.spec("gv-1")).await.expect("create on runsc");
    let out = sh(
        &h.rt,
        "gv-1",
        "dmesg | head -1; id -u; ls /sys/class/net 2>&1 | head -1; echo data > /tmp/f; cat /tmp/f",
    )
    .await;
    assert!(out.ok(), "{out:?}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert!(lines[0].contains("gVisor"), "gVisor's kernel log: {out:?}");
    assert_eq!(lines[1], "0");
    assert_eq!(lines.last().copied(), Some("data"));

    // Files through kilnd.
    let c = h.rt.client("gv-1");
    c.write_file("/root/hello.txt", None, false, &b"hello gvisor"[..])
        .await
        .expect("write");
    let (stat, mut data) = c.read_file("/root/hello.txt").await.expect("read");
    assert_eq!(stat.size, 12);
    let mut got = Vec::new();
    while let Some(chunk) = data.next_chunk().await {
        got.extend_from_slice(&chunk.expect("chunk"));
    }
    assert_eq!(got, b"hello gvisor");

    h.rt.pause("gv-1").await.expect("pause");
    h.rt.resume("gv-1").await.expect("resume");
    assert!(sh(&h.rt, "gv-1", "true").await.ok());

    let err =
        h.rt.create(&h.full("gv-2"))
            .await
            .expect_err("full on runsc");
    assert!(
        matches!(&err, SandboxError::InvalidSpec(m) if m.contains("runsc")),
        "{err}"
    );

    h.rt.remove("gv-1").await.expect("remove");
    assert!(!h.cfg.data_dir.join("sandboxes/gv-1").exists());
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let data = h.cfg.data_dir.to_string_lossy().into_owned();
    assert!(
        !mounts
            .lines()
            .any(|l| l.contains(&format!("{data}/sandboxes/"))),
        "no sandbox mount left"
    );
    assert!(
        std::process::Command::new("pgrep")
            .args(["-f", "runsc-sandbox.*gv-1"])
            .output()
            .is_ok_and(|o| o.stdout.is_empty()),
        "no gVisor process left"
    );
    h.wipe().await;
}
