//! User namespaces: a sandbox's root is an unprivileged host id, the image shows its original
//! owners inside, and what the sandbox writes is owned by the mapped id on the host. A `full`
//! sandbox's network namespace belongs to its user namespace, so it sees only its own links.

use std::os::unix::fs::MetadataExt;

use kiln_sandbox::{IdMap, NetworkMode};

use crate::{require_root, sh, Harness};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandboxes_run_in_a_user_namespace() {
    require_root!();
    let h = Harness::new().await;
    let m = h.cfg.userns.expect("user namespaces are on by default");
    assert_eq!(m, IdMap::DEFAULT);
    h.rt.create(&h.spec("uns-1")).await.expect("create");
    let out = sh(
        &h.rt,
        "uns-1",
        "cat /proc/self/uid_map /proc/self/gid_map | tr -s ' '; id -u; stat -c '%u:%g' /etc/passwd /usr/bin/su; \
         stat -c '%a' /usr/bin/su; echo data > /written-inside",
    )
    .await;
    assert!(out.ok(), "{out:?}");
    let lines: Vec<&str> = out.stdout.lines().map(str::trim).collect();
    assert_eq!(lines[0], "0 100000 65536", "{out:?}");
    assert_eq!(lines[1], "0 100000 65536", "{out:?}");
    assert_eq!(lines[2], "0", "root inside");
    assert_eq!(lines[3], "0:0", "image files keep their owners inside");
    assert_eq!(lines[4], "0:0");
    assert_eq!(lines[5], "4755", "set-id bits survive the shift");
    // On the host the sandbox's writes belong to the mapped, unprivileged id.
    let written = h.cfg.data_dir.join("disk/uns-1/upper/written-inside");
    let md = std::fs::metadata(&written).expect("file in the writable layer");
    assert_eq!((md.uid(), md.gid()), (100_000, 100_000));

    // A `full` sandbox is in one too; the runtime creates its netns inside it and the host
    // attaches the veth afterwards, so sysfs shows the sandbox's links only, and it routes.
    let mut spec = h.spec("uns-full");
    spec.network = NetworkMode::Full;
    let created = h.rt.create(&spec).await.expect("create full");
    assert!(created.ip.is_some(), "full sandboxes get an address");
    let out = sh(
        &h.rt,
        "uns-full",
        "cat /proc/self/uid_map | tr -s ' '; ls /sys/class/net | tr '\\n' ' '; echo; \
         cat /sys/class/net/eth0/operstate; grep -c . /proc/net/route",
    )
    .await;
    assert!(out.ok(), "{out:?}");
    let lines: Vec<&str> = out.stdout.lines().map(str::trim).collect();
    assert_eq!(lines[0], "0 100000 65536", "{out:?}");
    assert_eq!(lines[1], "eth0 lo", "{out:?}");
    assert_eq!(lines[2], "up", "{out:?}");
    assert_eq!(lines[3], "3", "header, default route, subnet: {out:?}");
    h.wipe().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_user_namespaces_full_sandboxes_join_a_host_created_netns() {
    require_root!();
    let h = Harness::with(|c| c.userns = None).await;
    let created = h.rt.create(&h.full("nouns-full")).await.expect("create");
    assert!(created.ip.is_some());
    let out = sh(
        &h.rt,
        "nouns-full",
        "cat /proc/self/uid_map | tr -s ' '; ls /sys/class/net | tr '\\n' ' '; echo; cat /sys/class/net/eth0/operstate",
    )
    .await;
    assert!(out.ok(), "{out:?}");
    let lines: Vec<&str> = out.stdout.lines().map(str::trim).collect();
    assert_eq!(lines[0], "0 0 4294967295", "{out:?}");
    assert_eq!(lines[1], "eth0 lo", "{out:?}");
    assert_eq!(lines[2], "up", "{out:?}");
    // The pinned namespace goes with the sandbox.
    let pinned = h.cfg.run_dir.join(".netns/nouns-full");
    assert!(pinned.exists());
    h.rt.remove("nouns-full").await.expect("remove");
    assert!(!pinned.exists());
    h.wipe().await;
}
