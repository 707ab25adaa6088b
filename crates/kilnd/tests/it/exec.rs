//! Exec, attach, stdin, signals, timeouts, ring buffer gaps and malformed requests.

use std::collections::BTreeMap;
use std::time::Duration;

use expect_test::expect;
use kiln_protocol::kilnd::{DaemonErrorCode, ExecSpec, Reply, StreamKind, MAX_FRAME};
use kilnd::frame::{self, Frame};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

use crate::harness::{cmd, collect, run, wait_gone, within, Daemon};

fn summary(r: &Result<crate::harness::Collected, kilnd::ClientError>) -> String {
    match r {
        Ok(c) => {
            let exit = c.exit.clone().unwrap_or_default();
            let mut s = match (exit.exit_code, exit.signal) {
                (Some(code), _) => format!("exit={code}"),
                (None, Some(sig)) => format!("signal={sig}"),
                (None, None) => "no exit".to_string(),
            };
            if exit.timed_out {
                s.push_str(" timed_out");
            }
            for (name, text) in [("stdout", c.stdout()), ("stderr", c.stderr())] {
                if !text.is_empty() {
                    s.push_str(&format!(" {name}={text:?}"));
                }
            }
            s
        }
        Err(kilnd::ClientError::Daemon(e)) => format!("error {:?}: {}", e.code, e.message),
        Err(e) => format!("client error: {e}"),
    }
}

#[tokio::test]
async fn exec_cases() {
    let d = Daemon::start().await;
    let with = |args: &[&str], f: &dyn Fn(&mut ExecSpec)| {
        let mut s = cmd(args);
        f(&mut s);
        s
    };
    let cases: Vec<(&str, ExecSpec)> = vec![
        ("true", cmd(&["true"])),
        ("false", cmd(&["false"])),
        ("exit code", cmd(&["sh", "-c", "exit 7"])),
        ("both streams", cmd(&["sh", "-c", "echo out; echo err >&2"])),
        (
            "env",
            with(&["sh", "-c", "echo $FOO $HOME $PATH"], &|s| {
                s.env = BTreeMap::from([("FOO".into(), "bar".into())]);
            }),
        ),
        (
            "env is clean",
            cmd(&["sh", "-c", "env | grep -v '^PWD=' | sort"]),
        ),
        ("default cwd", cmd(&["pwd"])),
        (
            "cwd",
            with(&["pwd"], &|s| s.cwd = Some("/usr/../etc".into())),
        ),
        (
            "user by name",
            with(&["id"], &|s| s.user = Some("nobody".into())),
        ),
        (
            "uid:gid",
            with(&["sh", "-c", "id -u; id -g; echo $HOME"], &|s| {
                s.user = Some("4321:1234".into())
            }),
        ),
        ("killed", cmd(&["sh", "-c", "kill -9 $$"])),
        ("absolute path", cmd(&["/bin/echo", "hi"])),
        ("not found", cmd(&["definitely-not-a-command"])),
        ("not found (path)", cmd(&["/no/such/binary"])),
        ("not executable", cmd(&["/etc/passwd"])),
        ("empty cmd", cmd(&[])),
        (
            "missing cwd",
            with(&["true"], &|s| s.cwd = Some("/no/such/dir".into())),
        ),
        (
            "cwd escapes",
            with(&["true"], &|s| s.cwd = Some("/../..".into())),
        ),
        (
            "unknown user",
            with(&["true"], &|s| s.user = Some("no-such-user".into())),
        ),
        (
            "bad timeout",
            with(&["true"], &|s| s.timeout_secs = Some(-1.0)),
        ),
    ];
    let mut out = String::new();
    for (name, spec) in cases {
        let r = run(&d.client, spec).await;
        out.push_str(&format!("{name}: {}\n", summary(&r)));
    }
    expect![[r#"
        true: exit=0
        false: exit=1
        exit code: exit=7
        both streams: exit=0 stdout="out\n" stderr="err\n"
        env: exit=0 stdout="bar /root /usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
        env is clean: exit=0 stdout="HOME=/root\nLOGNAME=root\nPATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\nUSER=root\n"
        default cwd: exit=0 stdout="/\n"
        cwd: exit=0 stdout="/etc\n"
        user by name: exit=0 stdout="uid=65534(nobody) gid=65534(nogroup) groups=65534(nogroup)\n"
        uid:gid: exit=0 stdout="4321\n1234\n/\n"
        killed: signal=9
        absolute path: exit=0 stdout="hi\n"
        not found: error CommandNotFound: command not found: definitely-not-a-command
        not found (path): error CommandNotFound: command not found: /no/such/binary
        not executable: error CommandNotFound: cannot execute /etc/passwd: not an executable file
        empty cmd: error Invalid: cmd is empty
        missing cwd: error Invalid: working directory does not exist: /no/such/dir
        cwd escapes: error Invalid: path escapes the sandbox root: /../..
        unknown user: error Invalid: unknown user: no-such-user
        bad timeout: error Invalid: invalid timeout_secs: -1
    "#]]
    .assert_eq(&out);
}

/// Chunks are numbered in one order across stdout and stderr. The process only writes line
/// `i + 1` after the test has seen both outputs of line `i`, so the expected order is exact.
#[tokio::test]
async fn seq_orders_stdout_and_stderr() {
    let d = Daemon::start().await;
    let mut spec = cmd(&["sh", "-c", "while read x; do echo o$x; echo e$x >&2; done"]);
    spec.stdin = true;
    let mut s = d.client.exec(spec).await.expect("exec");
    let mut seen: Vec<(u64, StreamKind, String)> = Vec::new();
    for i in 1..=4 {
        s.send_stdin(format!("{i}\n").as_bytes())
            .await
            .expect("stdin");
        let want = format!("o{i}\ne{i}\n");
        within(async {
            loop {
                let so_far: String = seen.iter().map(|c| c.2.as_str()).collect();
                if so_far.ends_with(&want) || so_far.ends_with(&format!("e{i}\no{i}\n")) {
                    break;
                }
                match s.next().await {
                    Some(Ok(Reply::Output { seq, stream, data })) => {
                        seen.push((seq, stream, String::from_utf8_lossy(&data).into_owned()))
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
        })
        .await;
    }
    s.close_stdin().await.expect("close stdin");
    let exit = match within(s.next()).await {
        Some(Ok(Reply::Exited(st))) => st,
        other => panic!("unexpected {other:?}"),
    };
    assert!(s.next().await.is_none(), "nothing after Exited");
    let seqs: Vec<u64> = seen.iter().map(|c| c.0).collect();
    assert_eq!(
        seqs,
        (1..=seen.len() as u64).collect::<Vec<_>>(),
        "seqs are 1, 2, 3 ..."
    );
    assert_eq!(exit.last_seq, seen.len() as u64);
    assert_eq!(exit.exit_code, Some(0));
    let by_stream = |k: StreamKind| {
        seen.iter()
            .filter(|c| c.1 == k)
            .map(|c| c.2.as_str())
            .collect::<String>()
    };
    assert_eq!(by_stream(StreamKind::Stdout), "o1\no2\no3\no4\n");
    assert_eq!(by_stream(StreamKind::Stderr), "e1\ne2\ne3\ne4\n");
}

#[tokio::test]
async fn stdin_round_trip() {
    let d = Daemon::start().await;
    // On the exec connection.
    let mut spec = cmd(&["cat"]);
    spec.stdin = true;
    let mut s = d.client.exec(spec).await.expect("exec");
    s.send_stdin(b"hello\n").await.expect("stdin");
    s.send_stdin(b"world").await.expect("stdin");
    s.close_stdin().await.expect("close");
    let (mut replies, _w) = s.into_split();
    let c = collect(&mut replies).await;
    assert_eq!(c.stdout(), "hello\nworld");
    assert_eq!(c.exit.and_then(|e| e.exit_code), Some(0));

    // Through separate `Stdin` requests to a detached process.
    let mut spec = cmd(&["cat"]);
    spec.stdin = true;
    spec.detach = true;
    let s = d.client.exec(spec).await.expect("exec");
    let pid = s.pid().to_string();
    let big = vec![b'x'; 300_000];
    d.client.stdin(&pid, &big, false).await.expect("stdin 1");
    d.client.stdin(&pid, b"end", true).await.expect("stdin 2");
    let mut a = d.client.attach(&pid, 0).await.expect("attach");
    let c = collect(&mut a).await;
    assert_eq!(c.stdout().len(), 300_003);
    assert!(c.stdout().ends_with("xend"));
    assert_eq!(c.exit.and_then(|e| e.exit_code), Some(0));

    // Stdin to a process that has none / an unknown process.
    let s = d
        .client
        .exec(ExecSpec {
            detach: true,
            ..cmd(&["true"])
        })
        .await
        .expect("exec");
    let e = d
        .client
        .stdin(s.pid(), b"x", true)
        .await
        .expect_err("no stdin");
    assert_eq!(e.code(), Some(DaemonErrorCode::Invalid), "{e}");
    let e = d
        .client
        .stdin("p999", b"x", true)
        .await
        .expect_err("unknown");
    assert_eq!(e.code(), Some(DaemonErrorCode::NotFound), "{e}");
}

#[tokio::test]
async fn timeout_kills_the_process_group() {
    let d = Daemon::start().await;
    let mut spec = cmd(&["sh", "-c", "sleep 30 & echo $!; wait"]);
    spec.timeout_secs = Some(0.3);
    let c = run(&d.client, spec).await.expect("exec");
    let exit = c.exit.clone().expect("exited");
    assert!(exit.timed_out, "{exit:?}");
    assert_eq!(exit.signal, Some(libc::SIGKILL));
    let bg: u32 = c.stdout().trim().parse().expect("pid of sleep");
    wait_gone(bg).await; // killed with the group, then reaped by kilnd (its subreaper)
}

#[tokio::test]
async fn signal_and_list() {
    let d = Daemon::start().await;
    let mut spec = cmd(&["sleep", "30"]);
    spec.detach = true;
    spec.tag = Some("sleeper".into());
    let s = d.client.exec(spec).await.expect("exec");
    let pid = s.pid().to_string();
    let procs = d.client.list_processes().await.expect("list");
    let p = procs.iter().find(|p| p.pid == pid).expect("listed");
    assert!(p.running);
    assert_eq!(p.tag.as_deref(), Some("sleeper"));
    assert_eq!(p.cmd, vec!["sleep", "30"]);
    assert_eq!(p.os_pid, s.os_pid());

    d.client.signal(&pid, libc::SIGTERM).await.expect("signal");
    let mut a = d.client.attach(&pid, 0).await.expect("attach");
    let c = collect(&mut a).await;
    assert_eq!(c.exit.as_ref().and_then(|e| e.signal), Some(libc::SIGTERM));
    let procs = d.client.list_processes().await.expect("list");
    let p = procs.iter().find(|p| p.pid == pid).expect("still listed");
    assert!(!p.running);
    assert_eq!(p.exit.as_ref().and_then(|e| e.signal), Some(libc::SIGTERM));

    // Signalling an exited process is a no-op; unknown ids and bad signals are errors.
    d.client.signal(&pid, libc::SIGTERM).await.expect("no-op");
    let e = d.client.signal("p999", 15).await.expect_err("unknown");
    assert_eq!(e.code(), Some(DaemonErrorCode::NotFound));
    let s = d
        .client
        .exec(ExecSpec {
            detach: true,
            ..cmd(&["sleep", "30"])
        })
        .await
        .expect("exec");
    let e = d
        .client
        .signal(s.pid(), 1000)
        .await
        .expect_err("bad signal");
    assert_eq!(e.code(), Some(DaemonErrorCode::Invalid));
    d.client.signal(s.pid(), libc::SIGKILL).await.expect("kill");
    let e = d
        .client
        .attach("p999", 0)
        .await
        .expect_err("attach unknown");
    assert_eq!(e.code(), Some(DaemonErrorCode::NotFound));
}

#[tokio::test]
async fn detach_and_reattach_replays_output() {
    let d = Daemon::start().await;
    let mut spec = cmd(&[
        "sh",
        "-c",
        "echo one; sleep 0.1; echo two >&2; sleep 0.1; echo three",
    ]);
    spec.detach = true;
    let mut s = d.client.exec(spec).await.expect("exec");
    assert!(
        s.next().await.is_none(),
        "a detached exec ends after Started"
    );
    let pid = s.pid().to_string();
    let mut a = d.client.attach(&pid, 0).await.expect("attach");
    let c = collect(&mut a).await;
    assert_eq!(c.stdout(), "one\nthree\n");
    assert_eq!(c.stderr(), "two\n");
    assert!(c.gaps.is_empty());
    let exit = c.exit.expect("exit");
    assert_eq!(exit.exit_code, Some(0));
    // Re-attach after the first chunk: only the rest.
    let mut a = d.client.attach(&pid, 1).await.expect("attach");
    let c2 = collect(&mut a).await;
    assert_eq!(c2.chunks.first().map(|c| c.0), Some(2));
    assert_eq!(c2.exit.map(|e| e.last_seq), Some(exit.last_seq));
}

#[tokio::test]
async fn client_disconnect_does_not_kill() {
    let d = Daemon::start().await;
    let s = d
        .client
        .exec(cmd(&["sh", "-c", "sleep 0.3; echo done"]))
        .await
        .expect("exec");
    let pid = s.pid().to_string();
    drop(s);
    let mut a = d.client.attach(&pid, 0).await.expect("attach");
    let c = collect(&mut a).await;
    assert_eq!(c.stdout(), "done\n");
    assert_eq!(c.exit.and_then(|e| e.exit_code), Some(0));
}

#[tokio::test]
async fn overflowing_ring_reports_a_gap() {
    let d = Daemon::start().await;
    // 3 MB of output while nobody is attached: the 1 MiB ring drops the oldest chunks.
    let mut spec = cmd(&["head", "-c", "3000000", "/dev/zero"]);
    spec.detach = true;
    let s = d.client.exec(spec).await.expect("exec");
    let pid = s.pid().to_string();
    within(async {
        loop {
            let procs = d.client.list_processes().await.expect("list");
            if procs.iter().any(|p| p.pid == pid && !p.running) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let mut a = d.client.attach(&pid, 0).await.expect("attach");
    let c = collect(&mut a).await;
    assert_eq!(c.gaps.len(), 1, "{:?}", c.gaps);
    let (from, to) = c.gaps[0];
    assert_eq!(from, 1);
    assert_eq!(
        c.chunks.first().map(|c| c.0),
        Some(to + 1),
        "output resumes right after the gap"
    );
    let kept: usize = c.chunks.iter().map(|c| c.2.len()).sum();
    assert!(kept > 0 && kept <= 1 << 20, "kept {kept} bytes");
    let exit = c.exit.expect("exit");
    assert_eq!(exit.exit_code, Some(0));
    assert_eq!(c.chunks.last().map(|c| c.0), Some(exit.last_seq));
}

#[tokio::test]
async fn a_live_client_gets_everything() {
    let d = Daemon::start().await;
    // Far more than the ring holds: an attached client exerts backpressure instead of losing data.
    let c = run(&d.client, cmd(&["head", "-c", "5000000", "/dev/zero"]))
        .await
        .expect("exec");
    assert!(c.gaps.is_empty());
    assert_eq!(c.stdout().len(), 5_000_000);
}

#[tokio::test]
async fn orphans_are_reaped() {
    let d = Daemon::start().await;
    let c = run(&d.client, cmd(&["sh", "-c", "sleep 0.2 & echo $!"]))
        .await
        .expect("exec");
    assert_eq!(c.exit.as_ref().and_then(|e| e.exit_code), Some(0));
    let orphan: u32 = c.stdout().trim().parse().expect("pid");
    wait_gone(orphan).await;
}

#[tokio::test]
async fn malformed_requests_get_invalid() {
    let d = Daemon::start().await;
    let sock = d.client.socket_path().to_path_buf();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("not json", {
            let mut b = Vec::new();
            let payload = b"{nope";
            b.extend_from_slice(&((payload.len() + 1) as u32).to_be_bytes());
            b.push(0);
            b.extend_from_slice(payload);
            b
        }),
        ("unknown op", {
            let mut b = Vec::new();
            frame::encode_json(&mut b, &serde_json::json!({"op": "launch_missiles"}))
                .expect("encode");
            b
        }),
        ("wrong field type", {
            let mut b = Vec::new();
            frame::encode_json(
                &mut b,
                &serde_json::json!({"op": "exec", "spec": {"cmd": "ls"}}),
            )
            .expect("encode");
            b
        }),
        ("data frame first", {
            let mut b = Vec::new();
            frame::encode_data(&mut b, b"hello");
            b
        }),
        (
            "oversized frame",
            (MAX_FRAME + 1)
                .to_be_bytes()
                .into_iter()
                .chain([0u8])
                .collect(),
        ),
        ("unknown frame kind", vec![0, 0, 0, 1, 7]),
    ];
    let mut out = String::new();
    for (name, bytes) in cases {
        let mut conn = UnixStream::connect(&sock).await.expect("connect");
        conn.write_all(&bytes).await.expect("write");
        let reply = within(frame::read_frame(&mut conn)).await.expect("read");
        let line = match reply {
            Some(f @ Frame::Json(_)) => match f.parse::<Reply>().expect("reply") {
                Reply::Error(e) => format!(
                    "{:?}: {}",
                    e.code,
                    e.message.split(':').next().unwrap_or_default()
                ),
                other => format!("{other:?}"),
            },
            other => format!("{other:?}"),
        };
        out.push_str(&format!("{name}: {line}\n"));
    }
    expect![[r#"
        not json: Invalid: malformed request
        unknown op: Invalid: malformed request
        wrong field type: Invalid: malformed request
        data frame first: Invalid: malformed request
        oversized frame: Invalid: malformed request
        unknown frame kind: Invalid: malformed request
    "#]]
    .assert_eq(&out);
    // Still alive.
    d.client.ping().await.expect("ping");
}

/// A client that pushes stdin without reading output (the process echoes it back) must not
/// deadlock: once it has taken nothing for a while, the ring stops waiting for it and it gets
/// a `Gap` instead.
#[tokio::test]
async fn stdin_writer_that_does_not_read_does_not_deadlock() {
    let d = Daemon::start().await;
    let mut spec = cmd(&["cat"]);
    spec.stdin = true;
    let mut s = d.client.exec(spec).await.expect("exec");
    let block = vec![b'y'; 64 * 1024];
    within(async {
        for _ in 0..64 {
            s.send_stdin(&block).await.expect("stdin");
        }
        s.close_stdin().await.expect("close");
    })
    .await;
    let (mut replies, _w) = s.into_split();
    let c = collect(&mut replies).await;
    let exit = c.exit.clone().expect("exit");
    assert_eq!(exit.exit_code, Some(0));
    let received: usize = c.chunks.iter().map(|c| c.2.len()).sum();
    assert!(
        !c.gaps.is_empty() && received < 4 << 20,
        "gaps {:?}, {received} bytes",
        c.gaps
    );
    // Every seq is accounted for, by a chunk or a gap.
    let mut covered: Vec<u64> = c.chunks.iter().map(|c| c.0).collect();
    covered.extend(c.gaps.iter().flat_map(|&(from, to)| from..=to));
    covered.sort_unstable();
    assert_eq!(covered, (1..=exit.last_seq).collect::<Vec<_>>());
}
