//! Exec through the API: ordering, exit codes, stdin, env/cwd/user, timeouts, signals,
//! background processes and re-attach with replay.

use base64::Engine as _;
use expect_test::expect;
use kiln_protocol::api::{CreateSandbox, ExecEvent, ExecRequest, ProcessStarted};

use crate::harness::{self, cmd};

fn render(events: &[ExecEvent]) -> String {
    let mut out = String::new();
    for e in events {
        let line = match e {
            ExecEvent::Started { .. } => "started".to_string(),
            ExecEvent::Stdout { seq, data } => {
                format!("{seq} out {:?}", String::from_utf8_lossy(data))
            }
            ExecEvent::Stderr { seq, data } => {
                format!("{seq} err {:?}", String::from_utf8_lossy(data))
            }
            ExecEvent::Gap { from, to } => format!("gap {from}..{to}"),
            ExecEvent::Exit(st) => format!(
                "exit code={:?} signal={:?} timed_out={}",
                st.exit_code, st.signal, st.timed_out
            ),
            ExecEvent::Error(e) => format!("error {}", e.code),
        };
        out.push_str(&line);
        out.push('\n');
    }
    out
}

#[tokio::test]
async fn exec_semantics() {
    let dir = tempfile::tempdir().expect("tmp");
    let s = harness::start(harness::config(dir.path())).await;
    let sb = s.create(&CreateSandbox::default()).await;
    let id = sb.id.as_str();

    // stdout and stderr keep their interleaving through one sequence.
    let (_, _, st, ev) = s
        .exec(
            id,
            &cmd(&[
                "sh",
                "-c",
                "echo one; sleep 0.05; echo two >&2; sleep 0.05; echo three; exit 7",
            ]),
        )
        .await;
    assert_eq!(st.exit_code, Some(7));
    expect![[r#"
        started
        1 out "one\n"
        2 err "two\n"
        3 out "three\n"
        exit code=Some(7) signal=None timed_out=false
    "#]]
    .assert_eq(&render(&ev));

    // stdin, env, cwd, user.
    let req = ExecRequest {
        cmd: vec![
            "sh".into(),
            "-c".into(),
            "cat; echo \" $GREETING $(pwd) $(id -u)\"".into(),
        ],
        env: [("GREETING".to_string(), "hello".to_string())]
            .into_iter()
            .collect(),
        cwd: Some("/tmp".into()),
        user: Some("nobody".into()),
        stdin_b64: Some(base64::engine::general_purpose::STANDARD.encode("from stdin")),
        ..ExecRequest::default()
    };
    let (out, _, st, _) = s.exec(id, &req).await;
    assert_eq!(st.exit_code, Some(0));
    assert_eq!(out, "from stdin hello /tmp 65534\n");

    // Timeout kills the process group.
    let req = ExecRequest {
        timeout_secs: Some(0.5),
        ..cmd(&["sh", "-c", "sleep 30 & sleep 30"])
    };
    let (_, _, st, _) = s.exec(id, &req).await;
    assert!(st.timed_out, "{st:?}");
    assert_eq!(st.signal, Some(9));

    // A missing command is a 400 before anything starts.
    let r = s
        .http
        .post(s.url(&format!("/v1/sandboxes/{id}/exec")))
        .json(&cmd(&["no-such-tool", "x"]))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 400);
    let body: kiln_protocol::api::ErrorBody = r.json().await.expect("json");
    assert_eq!(body.error.code, "command_not_found");
    for bad in [
        r#"{"cmd":[]}"#,
        r#"{"cmd":["ls"],"timeout_secs":-1}"#,
        r#"{"cmd":["ls"],"cwd":"relative"}"#,
    ] {
        let r = s
            .http
            .post(s.url(&format!("/v1/sandboxes/{id}/exec")))
            .header("content-type", "application/json")
            .body(bad)
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 400, "{bad}");
    }
    s.teardown().await;
}

#[tokio::test]
async fn background_process_reattach_stdin_and_signal() {
    let dir = tempfile::tempdir().expect("tmp");
    let s = harness::start(harness::config(dir.path())).await;
    let sb = s.create(&CreateSandbox::default()).await;
    let id = sb.id.as_str();

    // Start detached; it prints while nobody listens.
    let r = s
        .http
        .post(s.url(&format!("/v1/sandboxes/{id}/processes")))
        .json(&cmd(&[
            "sh",
            "-c",
            "for i in 1 2 3; do echo line$i; done; sleep 0.3; echo late",
        ]))
        .send()
        .await
        .expect("start");
    assert_eq!(r.status(), 201);
    let p: ProcessStarted = r.json().await.expect("json");
    // Attach from the beginning: everything missed is replayed, then the live rest.
    let text = s
        .http
        .get(s.url(&format!(
            "/v1/sandboxes/{id}/processes/{}/output?after=0",
            p.pid
        )))
        .send()
        .await
        .expect("attach")
        .text()
        .await
        .expect("text");
    let events: Vec<ExecEvent> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("line"))
        .collect();
    let out: String = events
        .iter()
        .filter_map(|e| match e {
            ExecEvent::Stdout { data, .. } => Some(String::from_utf8_lossy(data).to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(out, "line1\nline2\nline3\nlate\n");
    assert!(matches!(events.last(), Some(ExecEvent::Exit(st)) if st.exit_code == Some(0)));
    // Re-attach after the last seq: only the exit.
    let last = events
        .iter()
        .filter_map(|e| match e {
            ExecEvent::Stdout { seq, .. } => Some(*seq),
            _ => None,
        })
        .max()
        .unwrap_or(0);
    let text = s
        .http
        .get(s.url(&format!(
            "/v1/sandboxes/{id}/processes/{}/output?after={last}",
            p.pid
        )))
        .send()
        .await
        .expect("attach")
        .text()
        .await
        .expect("text");
    assert_eq!(text.lines().count(), 1, "{text}");

    // Interactive stdin through the process API, then a signal.
    let req = ExecRequest {
        keep_stdin_open: true,
        ..cmd(&["cat"])
    };
    let p: ProcessStarted = s
        .http
        .post(s.url(&format!("/v1/sandboxes/{id}/processes")))
        .json(&req)
        .send()
        .await
        .expect("start")
        .json()
        .await
        .expect("json");
    let r = s
        .http
        .post(s.url(&format!("/v1/sandboxes/{id}/processes/{}/stdin", p.pid)))
        .body("abc\n")
        .send()
        .await
        .expect("stdin");
    assert_eq!(r.status(), 204);
    let r = s
        .http
        .post(s.url(&format!(
            "/v1/sandboxes/{id}/processes/{}/stdin?close=true",
            p.pid
        )))
        .body("def\n")
        .send()
        .await
        .expect("stdin");
    assert_eq!(r.status(), 204);
    let text = s
        .http
        .get(s.url(&format!("/v1/sandboxes/{id}/processes/{}/output", p.pid)))
        .send()
        .await
        .expect("a")
        .text()
        .await
        .expect("t");
    assert!(
        text.contains(&base64::engine::general_purpose::STANDARD.encode("abc\n"))
            || text.contains("YWJj"),
        "{text}"
    );

    let p: ProcessStarted = s
        .http
        .post(s.url(&format!("/v1/sandboxes/{id}/processes")))
        .json(&cmd(&["sleep", "600"]))
        .send()
        .await
        .expect("start")
        .json()
        .await
        .expect("json");
    let r = s
        .http
        .post(s.url(&format!("/v1/sandboxes/{id}/processes/{}/signal", p.pid)))
        .json(&serde_json::json!({"signal": "TERM"}))
        .send()
        .await
        .expect("signal");
    assert_eq!(r.status(), 204);
    let text = s
        .http
        .get(s.url(&format!("/v1/sandboxes/{id}/processes/{}/output", p.pid)))
        .send()
        .await
        .expect("a")
        .text()
        .await
        .expect("t");
    let last: ExecEvent = serde_json::from_str(text.lines().last().expect("line")).expect("json");
    assert!(
        matches!(last, ExecEvent::Exit(st) if st.signal == Some(15)),
        "{text}"
    );
    let r = s
        .http
        .post(s.url(&format!("/v1/sandboxes/{id}/processes/{}/signal", p.pid)))
        .json(&serde_json::json!({"signal": "BOGUS"}))
        .send()
        .await
        .expect("signal");
    assert_eq!(r.status(), 400);
    s.teardown().await;
}
