//! The PTY WebSocket: a shell that answers, resizes, detaches and re-attaches.

use futures_util::{SinkExt, StreamExt};
use kiln_protocol::api::{CreateSandbox, PtyMessage};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::harness;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(s: &harness::TestServer, path: &str) -> Ws {
    let url = s.url(path).replacen("http://", "ws://", 1);
    let mut req = url.into_client_request().expect("req");
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", s.kiln.token).parse().expect("hdr"),
    );
    tokio_tungstenite::connect_async(req)
        .await
        .expect("ws connect")
        .0
}

/// Reads until the screen output contains `needle` (10 s at most); returns the text seen and
/// any control message.
async fn read_until(ws: &mut Ws, needle: &str) -> (String, Vec<PtyMessage>) {
    let mut text = String::new();
    let mut ctl = Vec::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while !text.contains(needle) && tokio::time::Instant::now() < deadline {
        match tokio::time::timeout(std::time::Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => text.push_str(&String::from_utf8_lossy(&b)),
            Ok(Some(Ok(Message::Text(t)))) => {
                ctl.push(serde_json::from_str(&t).expect("pty message"))
            }
            _ => break,
        }
    }
    (text, ctl)
}

#[tokio::test]
async fn shell_resize_detach_reattach() {
    let dir = tempfile::tempdir().expect("tmp");
    let s = harness::start(harness::config(dir.path())).await;
    let sb = s.create(&CreateSandbox::default()).await;
    let mut ws = connect(
        &s,
        &format!("/v1/sandboxes/{}/pty?cols=100&rows=40&cmd=/bin/bash", sb.id),
    )
    .await;
    ws.send(Message::Binary(
        b"echo kiln-$((40+2)); stty size\n".to_vec(),
    ))
    .await
    .expect("send");
    let (text, ctl) = read_until(&mut ws, "40 100").await;
    assert!(text.contains("kiln-42"), "{text}");
    let session = match ctl.first() {
        Some(PtyMessage::Opened { session }) => session.clone(),
        other => panic!("expected opened first, got {other:?}"),
    };
    let resize = serde_json::to_string(&PtyMessage::Resize {
        cols: 120,
        rows: 50,
    })
    .expect("json");
    ws.send(Message::Text(resize)).await.expect("send");
    ws.send(Message::Binary(
        b"stty size; export MARK=still-here\n".to_vec(),
    ))
    .await
    .expect("send");
    let (text, _) = read_until(&mut ws, "50 120").await;
    assert!(text.contains("50 120"), "{text}");
    // Detach by closing; the shell lives on and re-attach finds its state.
    ws.close(None).await.expect("close");
    drop(ws);
    let mut ws = connect(
        &s,
        &format!("/v1/sandboxes/{}/pty?session={session}", sb.id),
    )
    .await;
    ws.send(Message::Binary(b"echo mark=$MARK; exit 3\n".to_vec()))
        .await
        .expect("send");
    let (text, ctl) = read_until(&mut ws, "mark=still-here").await;
    assert!(text.contains("mark=still-here"), "{text}");
    let mut exit = ctl.into_iter().find_map(|m| match m {
        PtyMessage::Exit(st) => Some(st),
        _ => None,
    });
    if exit.is_none() {
        exit = read_until(&mut ws, "\u{0}never")
            .await
            .1
            .into_iter()
            .find_map(|m| match m {
                PtyMessage::Exit(st) => Some(st),
                _ => None,
            });
    }
    assert_eq!(exit.and_then(|e| e.exit_code), Some(3));
    s.teardown().await;
}
