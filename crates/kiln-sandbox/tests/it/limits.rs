//! Resource limits: memory (OOM kill inside, sandbox survives), pids (fork bomb contained),
//! disk (quota hit, host unaffected), cpu quota in the cgroup.

use std::time::Duration;

use kiln_protocol::kilnd::ExecSpec;

use crate::{eventually, require_root, sh, Harness};

fn free_bytes(path: &std::path::Path) -> u64 {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: statvfs into a zeroed local.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out pointer.
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut s) }, 0);
    s.f_bavail as u64 * s.f_frsize as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_bomb_is_oom_killed_and_the_sandbox_survives() {
    require_root!();
    let h = Harness::new().await;
    let mut spec = h.spec("mem-1");
    spec.memory_bytes = 64 << 20;
    h.rt.create(&spec).await.expect("create");
    let limit = std::fs::read_to_string(h.cgroup_file("memory", "mem-1", "memory.limit_in_bytes"))
        .expect("limit");
    assert_eq!(limit.trim(), (64u64 << 20).to_string());
    let memsw =
        std::fs::read_to_string(h.cgroup_file("memory", "mem-1", "memory.memsw.limit_in_bytes"))
            .expect("memsw");
    assert_eq!(memsw.trim(), (64u64 << 20).to_string());

    let out = sh(
        &h.rt,
        "mem-1",
        "perl -e '$x = \"a\" x (400 << 20); print length $x'; echo status=$?",
    )
    .await;
    assert!(
        out.stdout.contains("status=137"),
        "expected an OOM kill: {out:?}"
    );
    let oom = std::fs::read_to_string(h.cgroup_file("memory", "mem-1", "memory.oom_control"))
        .expect("oom_control");
    assert!(
        oom.lines()
            .any(|l| l.starts_with("oom_kill ") && l != "oom_kill 0"),
        "{oom}"
    );
    // kilnd (PID 1) is still there and usable.
    let out = sh(&h.rt, "mem-1", "echo alive").await;
    assert_eq!(out.stdout, "alive\n");
    assert!(h.rt.memory_usage("mem-1").await.expect("usage") <= 64 << 20);
    h.wipe().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fork_bomb_is_contained_by_the_pids_limit() {
    require_root!();
    let h = Harness::new().await;
    let mut spec = h.spec("fork-1");
    spec.pids_limit = 64;
    spec.cpus = 0.5;
    h.rt.create(&spec).await.expect("create");
    let max =
        std::fs::read_to_string(h.cgroup_file("pids", "fork-1", "pids.max")).expect("pids.max");
    assert_eq!(max.trim(), "64");
    let cpu =
        std::fs::read_to_string(h.cgroup_file("cpu", "fork-1", "cpu.cfs_quota_us")).expect("quota");
    assert_eq!(cpu.trim(), "50000");

    let mut s =
        h.rt.client("fork-1")
            .exec(ExecSpec {
                cmd: vec![
                    "/bin/bash".into(),
                    "-c".into(),
                    "bomb() { bomb | bomb & }; bomb".into(),
                ],
                detach: true,
                ..Default::default()
            })
            .await
            .expect("start bomb");
    assert!(s.next().await.is_none());
    let current = h.cgroup_file("pids", "fork-1", "pids.current");
    let events = h.cgroup_file("pids", "fork-1", "pids.events");
    assert!(
        eventually(Duration::from_secs(10), || std::fs::read_to_string(&events)
            .is_ok_and(|e| e.trim() != "max 0"))
        .await,
        "the bomb never hit the limit"
    );
    let n: u64 = std::fs::read_to_string(&current)
        .expect("current")
        .trim()
        .parse()
        .expect("number");
    assert!(n <= 64, "pids.current {n} above the limit");
    // The host is fine: we can still spawn processes here.
    assert!(std::process::Command::new("/bin/true")
        .status()
        .expect("spawn on host")
        .success());
    // Removing the sandbox kills the whole bomb.
    h.rt.remove("fork-1").await.expect("remove");
    assert!(!current.exists());
    h.wipe().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_fill_hits_the_quota_and_spares_the_host() {
    require_root!();
    let h = Harness::new().await;
    let mut spec = h.spec("disk-1");
    spec.disk_bytes = 32 << 20;
    h.rt.create(&spec).await.expect("create");
    let before = free_bytes(h.dir.path());
    let out = sh(
        &h.rt,
        "disk-1",
        "dd if=/dev/zero of=/var/tmp/fill bs=1M count=512 2>&1; sync",
    )
    .await;
    assert!(out.stdout.contains("Disk quota exceeded"), "{out:?}");
    let after = free_bytes(h.dir.path());
    let used = before.saturating_sub(after);
    assert!(
        used < 100 << 20,
        "host lost {} MiB for a 32 MiB quota",
        used >> 20
    );
    // Writing to the bind-mounted /etc files is limited too (they live in the volume).
    let out = sh(
        &h.rt,
        "disk-1",
        "{ head -c 64M /dev/zero >> /etc/hosts; } 2>&1; echo rc=$?",
    )
    .await;
    assert!(out.stdout.contains("Disk quota exceeded"), "{out:?}");
    // PID 1's stdio (reachable through /proc/1/fd) lands in the volume, so it is limited too.
    let _ = sh(&h.rt, "disk-1", "head -c 64M /dev/zero > /proc/1/fd/2").await;
    let log = std::fs::metadata(h.cfg.data_dir.join("disk/disk-1/kilnd.log"))
        .map(|m| m.len())
        .unwrap_or(0);
    assert!(
        log <= 32 << 20,
        "kilnd.log grew to {log} bytes past the quota"
    );
    // /.kiln/run is a small tmpfs.
    let out = sh(
        &h.rt,
        "disk-1",
        "{ head -c 4M /dev/zero > /.kiln/run/big; } 2>&1; echo rc=$?; rm -f /.kiln/run/big",
    )
    .await;
    assert!(
        out.stdout.contains("No space left on device") && !out.stdout.contains("rc=0"),
        "{out:?}"
    );
    // Freeing space makes room again.
    let out = sh(&h.rt, "disk-1", "rm /var/tmp/fill && sync && sleep 0.5 && dd if=/dev/zero of=/var/tmp/small bs=1M count=4 2>&1 && echo ok").await;
    assert!(out.stdout.contains("ok"), "{out:?}");
    // Another sandbox is unaffected by the full one.
    h.rt.create(&h.spec("disk-2")).await.expect("create second");
    let out = sh(
        &h.rt,
        "disk-2",
        "dd if=/dev/zero of=/var/tmp/f bs=1M count=48 2>&1 && echo ok",
    )
    .await;
    assert!(out.stdout.contains("ok"), "{out:?}");
    h.wipe().await;
}
