//! Watch streams: recursive events with absolute paths, single files, errors.

use std::collections::BTreeSet;
use std::time::Duration;

use kiln_protocol::kilnd::{DaemonErrorCode, WatchKind};
use kilnd::client::WatchStream;

use crate::harness::{within, Daemon};

/// Collects `(kind, path, is_dir)` until `done` holds for the collected set.
async fn events_until(
    w: &mut WatchStream,
    done: impl Fn(&BTreeSet<(String, String, bool)>) -> bool,
) -> BTreeSet<(String, String, bool)> {
    let mut seen = BTreeSet::new();
    within(async {
        while !done(&seen) {
            let ev = w.next().await.expect("stream ended").expect("event");
            seen.insert((format!("{:?}", ev.kind), ev.path, ev.is_dir));
        }
    })
    .await;
    seen
}

fn has(set: &BTreeSet<(String, String, bool)>, kind: WatchKind, path: &str, is_dir: bool) -> bool {
    set.contains(&(format!("{kind:?}"), path.to_string(), is_dir))
}

#[tokio::test]
async fn recursive_watch_reports_changes() {
    let d = Daemon::start().await;
    let dir = d.scratch();
    let t = dir.display().to_string();
    std::fs::create_dir(dir.join("pre")).expect("mkdir");
    let mut w = d.client.watch(&t, true).await.expect("watch");

    std::fs::write(dir.join("a.txt"), "1").expect("write");
    std::fs::create_dir_all(dir.join("sub/deeper")).expect("mkdir");
    std::fs::write(dir.join("pre/in-pre.txt"), "x").expect("write");
    let a = format!("{t}/a.txt");
    let seen = events_until(&mut w, |s| {
        has(s, WatchKind::Modify, &a, false)
            && has(s, WatchKind::Create, &format!("{t}/sub/deeper"), true)
            && has(s, WatchKind::Create, &format!("{t}/pre/in-pre.txt"), false)
    })
    .await;
    assert!(has(&seen, WatchKind::Create, &a, false), "{seen:?}");
    assert!(
        has(&seen, WatchKind::Create, &format!("{t}/sub"), true),
        "{seen:?}"
    );

    // The new subdirectory is watched too.
    std::fs::write(dir.join("sub/deeper/b.txt"), "2").expect("write");
    std::fs::rename(dir.join("a.txt"), dir.join("c.txt")).expect("rename");
    std::fs::remove_file(dir.join("c.txt")).expect("rm");
    let c = format!("{t}/c.txt");
    let seen = events_until(&mut w, |s| has(s, WatchKind::Remove, &c, false)).await;
    assert!(
        has(
            &seen,
            WatchKind::Create,
            &format!("{t}/sub/deeper/b.txt"),
            false
        ),
        "{seen:?}"
    );
    assert!(has(&seen, WatchKind::Rename, &a, false), "{seen:?}");
    assert!(has(&seen, WatchKind::Rename, &c, false), "{seen:?}");

    // A directory moved within the tree keeps reporting under its new name.
    std::fs::rename(dir.join("sub"), dir.join("moved")).expect("rename dir");
    tokio::time::sleep(Duration::from_millis(50)).await;
    std::fs::write(dir.join("moved/deeper/after.txt"), "3").expect("write");
    let after = format!("{t}/moved/deeper/after.txt");
    events_until(&mut w, |s| has(s, WatchKind::Create, &after, false)).await;
}

#[tokio::test]
async fn watch_a_single_file_and_errors() {
    let d = Daemon::start().await;
    let dir = d.scratch();
    let f = dir.join("watched.txt").display().to_string();
    std::fs::write(&f, "v1").expect("write");
    std::fs::write(dir.join("other.txt"), "x").expect("write");
    let mut w = d.client.watch(&f, false).await.expect("watch");
    std::fs::write(dir.join("other.txt"), "ignored").expect("write");
    // An atomic replacement (temp file + rename) is seen on the file's own path.
    d.client
        .write_file(&f, None, false, &b"v2"[..])
        .await
        .expect("write_file");
    let seen = events_until(&mut w, |s| !s.is_empty()).await;
    assert!(seen.iter().all(|(_, p, _)| *p == f), "{seen:?}");

    let e = d
        .client
        .watch(&dir.join("missing").display().to_string(), true)
        .await
        .expect_err("missing");
    assert_eq!(e.code(), Some(DaemonErrorCode::NotFound));
    let e = d.client.watch("/../x", true).await.expect_err("escape");
    assert_eq!(e.code(), Some(DaemonErrorCode::Invalid));
}
