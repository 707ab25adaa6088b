//! PTY sessions: open, input, resize, detach + re-attach with replay, exit.

use std::collections::BTreeMap;

use kiln_protocol::kilnd::{DaemonErrorCode, ExitStatus, PtySpec};
use kilnd::client::{PtyEvent, PtySession};

use crate::harness::{within, Daemon};

/// Reads output until it contains `needle`; returns everything read.
async fn read_until(s: &mut PtySession, needle: &str) -> String {
    let mut out = String::new();
    within(async {
        while !out.contains(needle) {
            match s.next().await {
                Some(Ok(PtyEvent::Output(b))) => out.push_str(&String::from_utf8_lossy(&b)),
                other => panic!("waiting for {needle:?}, got {other:?} after {out:?}"),
            }
        }
    })
    .await;
    out
}

async fn read_exit(s: &mut PtySession) -> ExitStatus {
    within(async {
        loop {
            match s.next().await {
                Some(Ok(PtyEvent::Output(_))) => {}
                Some(Ok(PtyEvent::Exited(st))) => return st,
                other => panic!("waiting for the exit, got {other:?}"),
            }
        }
    })
    .await
}

#[tokio::test]
async fn pty_open_resize_attach_exit() {
    let d = Daemon::start().await;
    let spec = PtySpec {
        cmd: vec!["sh".into()],
        env: BTreeMap::from([("PS1".into(), "$ ".into())]),
        cols: 80,
        rows: 24,
        ..Default::default()
    };
    let mut s = d.client.pty_open(spec).await.expect("pty_open");
    let id = s.id().to_string();
    assert!(s.os_pid() > 0);
    // `$((6*7))` is echoed as typed; only the shell's output contains 42.
    s.input(b"tty; stty size; echo \"v=$((6*7)) $TERM\"\n")
        .await
        .expect("input");
    let out = read_until(&mut s, "v=42 xterm-256color").await;
    assert!(out.contains("24 80"), "{out:?}");
    assert!(out.contains("/dev/pts/"), "{out:?}");

    s.resize(100, 40).await.expect("resize");
    s.input(b"stty size\n").await.expect("input");
    read_until(&mut s, "40 100").await;

    // Detach; the session lives on and replays its screen output on re-attach.
    drop(s);
    let mut s = d.client.pty_attach(&id).await.expect("pty_attach");
    assert_eq!(s.id(), id);
    read_until(&mut s, "v=42").await;
    s.input(b"exit 3\n").await.expect("input");
    let st = read_exit(&mut s).await;
    assert_eq!(st.exit_code, Some(3));
    assert!(s.next().await.is_none(), "nothing after Exited");

    // An ended session can still be attached: replay, then Exited at once.
    let mut s = d
        .client
        .pty_attach(&id)
        .await
        .expect("pty_attach after exit");
    assert_eq!(read_exit(&mut s).await.exit_code, Some(3));

    let e = d
        .client
        .pty_attach("t999")
        .await
        .expect_err("unknown session");
    assert_eq!(e.code(), Some(DaemonErrorCode::NotFound));
}

#[tokio::test]
async fn pty_default_shell_and_split_halves() {
    let d = Daemon::start().await;
    let s = d
        .client
        .pty_open(PtySpec {
            cols: 120,
            rows: 30,
            ..Default::default()
        })
        .await
        .expect("pty_open");
    let (mut reader, mut writer) = s.into_split();
    let pump = tokio::spawn(async move {
        let mut out = String::new();
        while let Some(ev) = reader.next().await {
            match ev.expect("event") {
                PtyEvent::Output(b) => out.push_str(&String::from_utf8_lossy(&b)),
                PtyEvent::Exited(st) => return (out, st),
            }
        }
        panic!("stream ended without Exited: {out:?}");
    });
    writer
        .input(b"echo \"home=$HOME cols=$(tput cols 2>/dev/null || stty size)\"; exit\n")
        .await
        .expect("input");
    let (out, st) = within(pump).await.expect("pump");
    assert!(out.contains("home=/root"), "{out:?}");
    assert_eq!(st.exit_code, Some(0));
}

#[tokio::test]
async fn pty_signal_control() {
    let d = Daemon::start().await;
    let spec = PtySpec {
        cmd: vec!["sleep".into(), "30".into()],
        cols: 80,
        rows: 24,
        ..Default::default()
    };
    let mut s = d.client.pty_open(spec).await.expect("pty_open");
    s.signal(libc::SIGTERM).await.expect("signal");
    assert_eq!(read_exit(&mut s).await.signal, Some(libc::SIGTERM));
    let e = d
        .client
        .pty_open(PtySpec {
            cmd: vec!["no-such-shell".into()],
            ..Default::default()
        })
        .await;
    assert_eq!(
        e.expect_err("not found").code(),
        Some(DaemonErrorCode::CommandNotFound)
    );
}
