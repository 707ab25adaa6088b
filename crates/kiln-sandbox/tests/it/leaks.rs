//! Nothing is left behind: mounts, cgroups, namespaces, veths, processes, files.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use crate::{eventually, require_root, sh, Harness};

#[derive(Debug, PartialEq, Eq, Clone)]
struct Snapshot {
    mounts: usize,
    our_mounts: usize,
    cgroup_dirs: usize,
    netns_files: usize,
    kilnd_procs: usize,
    zombies: BTreeSet<u32>,
    files: usize,
    volumes: usize,
}

fn count_dirs(p: &Path) -> usize {
    let mut n = 0;
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                n += 1 + count_dirs(&e.path());
            }
        }
    }
    n
}

/// Processes whose cgroup is under our parent, zombies (pid set), and kilnd processes.
fn procs(parent: &str) -> (usize, BTreeSet<u32>) {
    let mut ours = 0;
    let mut zombies = BTreeSet::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if std::fs::read_to_string(format!("/proc/{pid}/cgroup")).is_ok_and(|c| c.contains(parent))
        {
            ours += 1;
        }
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            if stat
                .rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z'))
            {
                zombies.insert(pid);
            }
        }
    }
    (ours, zombies)
}

fn snapshot(h: &Harness) -> Snapshot {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let data = h.cfg.data_dir.to_string_lossy().into_owned();
    let run = h.cfg.run_dir.to_string_lossy().into_owned();
    let cgroup_dirs = std::fs::read_dir("/sys/fs/cgroup")
        .expect("cgroup root")
        .flatten()
        .map(|e| count_dirs(&e.path().join(&h.cfg.cgroup_parent)))
        .sum();
    let (kilnd_procs, zombies) = procs(&h.cfg.cgroup_parent);
    Snapshot {
        mounts: mountinfo.lines().count(),
        our_mounts: mountinfo
            .lines()
            .filter(|l| l.contains(&data) || l.contains(&run))
            .count(),
        cgroup_dirs,
        netns_files: std::fs::read_dir(h.cfg.run_dir.join(".netns"))
            .map(|d| d.count())
            .unwrap_or(0),
        kilnd_procs,
        zombies,
        files: std::fs::read_dir(h.cfg.data_dir.join("sandboxes"))
            .map(|d| d.count())
            .unwrap_or(0)
            + std::fs::read_dir(&h.cfg.run_dir)
                .map(|d| d.count())
                .unwrap_or(0),
        volumes: std::fs::read_dir(h.cfg.data_dir.join("disk"))
            .map(|d| d.count())
            .unwrap_or(0),
    }
}

fn kv_links() -> BTreeSet<String> {
    std::fs::read_dir("/sys/class/net")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("kv"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_remove_batch_leaks_nothing() {
    require_root!();
    let h = Harness::new().await;
    // Warm up (first create makes the cgroup parents).
    h.rt.create(&h.spec("warm")).await.expect("warm create");
    h.rt.remove("warm").await.expect("warm remove");
    let before = snapshot(&h);
    let leases_before = std::fs::read_dir("/run/kiln-net/kiln0")
        .map(|d| d.count())
        .unwrap_or(0);

    let mut veths = Vec::new();
    for round in 0..2 {
        let ids: Vec<String> = (0..5).map(|i| format!("leak-{round}-{i}")).collect();
        for (i, id) in ids.iter().enumerate() {
            let spec = if i % 2 == 0 { h.full(id) } else { h.spec(id) };
            h.rt.create(&spec).await.expect("create");
            if i % 2 == 0 {
                let state = std::fs::read_to_string(
                    h.cfg.data_dir.join("sandboxes").join(id).join("kiln.json"),
                )
                .expect("state");
                let v: serde_json::Value = serde_json::from_str(&state).expect("json");
                veths.push(v["veth"].as_str().expect("veth").to_string());
            }
            // Leave some activity behind: background processes, files, a paused one.
            assert!(sh(&h.rt, id, "(sleep 100 &) ; echo x > /tmp/x").await.ok());
        }
        h.rt.pause(&ids[1]).await.expect("pause");
        let during = snapshot(&h);
        // Under a user namespace the runtime owns each netns (nothing pinned on the host);
        // without one, the host pins the three `full` sandboxes' namespaces.
        let pinned = if h.cfg.userns.is_some() { 0 } else { 3 };
        assert!(
            during.our_mounts > before.our_mounts
                && during.kilnd_procs > 0
                && during.netns_files == pinned,
            "{during:?}"
        );
        let links = kv_links();
        assert!(
            veths[veths.len() - 3..].iter().all(|v| links.contains(v)),
            "{veths:?} {links:?}"
        );
        for id in &ids {
            h.rt.remove(id).await.expect("remove");
        }
    }
    let after = snapshot(&h);
    // (The global mount count moves with tests running in parallel; ours must be back.)
    assert_eq!(after.our_mounts, before.our_mounts, "mounts leaked");
    assert_eq!(after.cgroup_dirs, before.cgroup_dirs, "cgroup dirs leaked");
    assert_eq!(after.netns_files, 0);
    assert_eq!(after.kilnd_procs, 0, "sandbox processes survived");
    let new_zombies: Vec<u32> = after.zombies.difference(&before.zombies).copied().collect();
    assert!(
        eventually(Duration::from_secs(2), || {
            let (_, z) = procs(&h.cfg.cgroup_parent);
            new_zombies.iter().all(|p| !z.contains(p))
        })
        .await,
        "zombies left: {new_zombies:?}"
    );
    assert_eq!(
        after.files, before.files,
        "files left in sandboxes/ or run_dir"
    );
    assert_eq!(after.volumes, before.volumes, "volumes left");
    assert!(
        eventually(Duration::from_secs(10), || veths
            .iter()
            .all(|v| !kv_links().contains(v)))
        .await,
        "veths left: {:?}",
        veths
            .iter()
            .filter(|v| kv_links().contains(*v))
            .collect::<Vec<_>>()
    );
    assert!(
        std::fs::read_dir("/run/kiln-net/kiln0")
            .map(|d| d.count())
            .unwrap_or(0)
            <= leases_before
    );
    h.wipe().await;
}
