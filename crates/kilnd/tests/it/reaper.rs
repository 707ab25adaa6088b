//! The host reaper: started daemonized on demand, runs commands, captures or redirects their
//! output, reaps orphans, and goes away by itself when idle.

use std::time::Duration;

use kilnd::reaper::{ReaperClient, ReaperError, RunRequest};

use crate::harness::{kilnd_bin, wait_gone, within};

fn req(argv: &[&str]) -> RunRequest {
    RunRequest {
        argv: argv.iter().map(|a| a.to_string()).collect(),
        ..Default::default()
    }
}

#[tokio::test]
async fn host_reaper_runs_and_reaps() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("reaper.sock");
    // Two concurrent starts end up with one reaper.
    let (a, b) = tokio::join!(
        ReaperClient::ensure_running(kilnd_bin(), &sock),
        ReaperClient::ensure_running(kilnd_bin(), &sock)
    );
    let (a, b) = (a.expect("start a"), b.expect("start b"));
    let pid = a.ping().await.expect("ping");
    assert_eq!(b.ping().await.expect("ping"), pid);

    let out = a
        .run(req(&["sh", "-c", "echo out; echo err >&2; exit 3"]))
        .await
        .expect("run");
    assert_eq!(
        (out.exit_code, out.stdout.as_str(), out.stderr.as_str()),
        (Some(3), "out\n", "err\n")
    );
    assert!(!out.success());

    let out = a
        .run(req(&["sh", "-c", "kill -TERM $$"]))
        .await
        .expect("run");
    assert_eq!((out.exit_code, out.signal), (None, Some(libc::SIGTERM)));

    // Clean environment plus what is given; cwd.
    let mut r = req(&["sh", "-c", "echo $A:$PATH:$(pwd)"]);
    r.env = vec![("A".into(), "1".into())];
    r.cwd = Some("/usr".into());
    let out = a.run(r).await.expect("run");
    assert_eq!(
        out.stdout,
        "1:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/usr\n"
    );

    // stdio_file: both streams go to the file (appended), nothing is captured.
    let log = dir.path().join("out.log");
    std::fs::write(&log, "before\n").expect("write");
    let mut r = req(&["sh", "-c", "echo out; echo err >&2"]);
    r.stdio_file = Some(log.clone());
    let out = a.run(r).await.expect("run");
    assert!(out.success());
    assert_eq!((out.stdout.as_str(), out.stderr.as_str()), ("", ""));
    assert_eq!(
        std::fs::read_to_string(&log).expect("read"),
        "before\nout\nerr\n"
    );

    // Like `runc run --detach`: a background child keeps the stdio file open; the run returns
    // when the direct child exits.
    let mut r = req(&["sh", "-c", "sleep 0.3 & echo $! > pidfile"]);
    r.stdio_file = Some(log.clone());
    r.cwd = Some(dir.path().to_path_buf());
    a.run(r).await.expect("run");

    // An orphaned grandchild is reparented to the reaper and reaped (no zombie).
    let out = a
        .run(req(&["sh", "-c", "sleep 0.2 & echo $!"]))
        .await
        .expect("run");
    let orphan: u32 = out.stdout.trim().parse().expect("pid");
    wait_gone(orphan).await;
    let bg: u32 = std::fs::read_to_string(dir.path().join("pidfile"))
        .expect("pidfile")
        .trim()
        .parse()
        .expect("pid");
    wait_gone(bg).await;

    match a.run(req(&["no-such-command-here"])).await {
        Err(ReaperError::Failed(m)) => assert_eq!(m, "command not found: no-such-command-here"),
        other => panic!("{other:?}"),
    }
    match a.run(req(&[])).await {
        Err(ReaperError::Failed(m)) => assert_eq!(m, "argv is empty"),
        other => panic!("{other:?}"),
    }

    // With no client and no child left (and its parent, this test, alive), it exits by itself and removes its socket (watch the
    // file: pinging would keep it busy)...
    within(async {
        while sock.exists() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let plain = ReaperClient::new(&sock);
    assert!(matches!(plain.ping().await, Err(ReaperError::Connect(_))));
    // ...and a client made by `ensure_running` brings it back on demand.
    let out = a.run(req(&["true"])).await.expect("run after idle exit");
    assert!(out.success());
    let pid2 = a.ping().await.expect("ping");
    assert_ne!(pid2, pid);

    // Explicit shutdown is refused while children run, then granted.
    let busy = {
        let a = a.clone();
        tokio::spawn(async move { a.run(req(&["sleep", "0.5"])).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(matches!(a.shutdown().await, Err(ReaperError::Failed(_))));
    assert!(busy.await.expect("join").expect("run").success());
    a.shutdown().await.expect("shutdown");
    // Both reapers were children of this process and have been reaped: no zombie left.
    wait_gone(pid).await;
    wait_gone(pid2).await;
}
