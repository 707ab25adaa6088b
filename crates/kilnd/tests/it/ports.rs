//! Ports: listening sockets with their owners, a stream of changes, and `Connect` as a raw
//! byte pipe (echo round trip, half-close, data sent before the request's reply, refusal).

use kiln_protocol::kilnd::DaemonErrorCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{within, Daemon};

#[tokio::test]
async fn ports_are_listed_and_watched() {
    let d = Daemon::start().await;
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    let ports = d.client.list_ports().await.expect("list");
    let mine = ports
        .iter()
        .find(|p| p.port == port)
        .unwrap_or_else(|| panic!("port {port} in {ports:?}"));
    assert_eq!(mine.address, "127.0.0.1");
    assert_eq!(
        mine.pid,
        Some(std::process::id()),
        "owner found through /proc"
    );

    let (first, mut updates) = d.client.watch_ports(100).await.expect("watch");
    assert!(first.iter().any(|p| p.port == port));
    let l2 = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port2 = l2.local_addr().expect("addr").port();
    within(async {
        loop {
            let ports = updates.next().await.expect("open").expect("update");
            if ports.iter().any(|p| p.port == port2) {
                break;
            }
        }
    })
    .await;
    drop(l2);
    within(async {
        loop {
            let ports = updates.next().await.expect("open").expect("update");
            if !ports.iter().any(|p| p.port == port2) {
                break;
            }
        }
    })
    .await;
    drop(l);
}

#[tokio::test]
async fn connect_is_a_raw_pipe() {
    let d = Daemon::start().await;
    // A server that greets first, then echoes until EOF and says bye.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = l.local_addr().expect("addr").port();
    let server = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.expect("accept");
        s.write_all(b"hello\n").await.expect("greet");
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.expect("read");
        s.write_all(&got).await.expect("echo");
        s.write_all(b"bye\n").await.expect("bye");
    });
    let mut t = d.client.connect(port, None).await.expect("connect");
    let mut greet = [0u8; 6];
    within(t.read_exact(&mut greet)).await.expect("greeting");
    assert_eq!(&greet, b"hello\n");
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    t.write_all(&payload).await.expect("send");
    t.shutdown().await.expect("half-close");
    let mut back = Vec::new();
    within(t.read_to_end(&mut back)).await.expect("read back");
    assert_eq!(back.len(), payload.len() + 4);
    assert_eq!(&back[..payload.len()], &payload[..]);
    assert_eq!(&back[payload.len()..], b"bye\n");
    server.await.expect("server");

    // Nothing listening: a clear error, not a hang.
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let e = d.client.connect(free, None).await.expect_err("refused");
    assert_eq!(e.code(), Some(DaemonErrorCode::NotFound), "{e}");
    assert!(e.to_string().contains("nothing listens"), "{e}");
    let e = d.client.connect(0, None).await.expect_err("port 0");
    assert_eq!(e.code(), Some(DaemonErrorCode::Invalid), "{e}");
}

#[tokio::test]
async fn pipe_runs_a_process_on_the_connection() {
    let d = Daemon::start().await;
    let spec = |script: &str| kiln_protocol::kilnd::ExecSpec {
        cmd: vec!["sh".into(), "-c".into(), script.into()],
        ..Default::default()
    };
    // Round trip through the process; its exit ends the stream.
    let mut t = d
        .client
        .pipe(spec("read line; echo \"got $line\""))
        .await
        .expect("pipe");
    t.write_all(b"ping\n").await.expect("write");
    let mut out = String::new();
    within(t.read_to_string(&mut out)).await.expect("read");
    assert_eq!(out, "got ping\n");

    // Closing the connection kills the process (and its group).
    let mut t = d
        .client
        .pipe(spec("echo $$; exec sleep 1000"))
        .await
        .expect("pipe");
    let mut line = Vec::new();
    within(async {
        let mut b = [0u8; 1];
        while t.read_exact(&mut b).await.is_ok() && b[0] != b'\n' {
            line.push(b[0]);
        }
    })
    .await;
    let pid: u32 = String::from_utf8_lossy(&line).trim().parse().expect("pid");
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    drop(t);
    within(async {
        while std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z"))
        {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;

    let e = d
        .client
        .pipe(kiln_protocol::kilnd::ExecSpec {
            cmd: vec!["no-such-language-server".into()],
            ..Default::default()
        })
        .await
        .expect_err("missing command");
    assert_eq!(e.code(), Some(DaemonErrorCode::CommandNotFound), "{e}");
}
