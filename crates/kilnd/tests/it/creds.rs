//! Git credentials relayed to the client: real git asks `kilnd credential`, the test answers
//! on the exec connection, git gets the secret, and neither the process environment nor any
//! helper configured in the sandbox (here `store`) ever sees it.

use std::collections::BTreeMap;

use kiln_protocol::kilnd::{DaemonErrorCode, ExecSpec, Reply};

use crate::harness::{within, Daemon};

/// Runs `script` with credentials on, answering each request with `answer`; returns
/// (stdout, stderr, exit code, the requests seen).
async fn run(
    d: &Daemon,
    home: &std::path::Path,
    script: &str,
    answer: Option<BTreeMap<String, String>>,
) -> (String, String, i32, Vec<BTreeMap<String, String>>) {
    let mut env = BTreeMap::new();
    env.insert("HOME".to_string(), home.to_string_lossy().into_owned());
    env.insert(
        "PATH".to_string(),
        "/usr/local/bin:/usr/bin:/bin".to_string(),
    );
    let mut p = d
        .client
        .exec(ExecSpec {
            cmd: vec!["sh".into(), "-c".into(), script.into()],
            env,
            credentials: true,
            ..Default::default()
        })
        .await
        .expect("exec");
    let (mut out, mut err, mut seen) = (Vec::new(), Vec::new(), Vec::new());
    let code = within(async {
        loop {
            match p.next().await.expect("reply").expect("ok") {
                Reply::Output { stream, data, .. } => match stream {
                    kiln_protocol::kilnd::StreamKind::Stdout => out.extend(data),
                    kiln_protocol::kilnd::StreamKind::Stderr => err.extend(data),
                },
                Reply::CredentialRequest { id, fields } => {
                    seen.push(fields);
                    p.answer_credential(id, answer.clone())
                        .await
                        .expect("answer");
                }
                Reply::Exited(st) => return st.exit_code.unwrap_or(-1),
                other => panic!("unexpected {other:?}"),
            }
        }
    })
    .await;
    (
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
        code,
        seen,
    )
}

#[tokio::test]
async fn git_gets_credentials_from_the_client_only() {
    let d = Daemon::start().await;
    let home = d.scratch();
    // A helper configured in the sandbox that would write secrets to disk.
    std::fs::write(home.join(".gitconfig"), "[credential]\n\thelper = store\n").expect("gitconfig");
    let secret = BTreeMap::from([
        ("username".to_string(), "alice".to_string()),
        ("password".to_string(), "s3cret-token".to_string()),
    ]);
    let (out, err, code, seen) = run(
        &d,
        &home,
        "printf 'protocol=https\\nhost=git.example.com\\npath=org/repo.git\\n\\n' | git credential fill > filled; \
         cat filled; git credential approve < filled; \
         env | grep -c s3cret-token; ls -A \"$HOME\"",
        Some(secret),
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(
        seen[0].get("host").map(String::as_str),
        Some("git.example.com")
    );
    assert_eq!(seen[0].get("protocol").map(String::as_str), Some("https"));
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines.contains(&"username=alice"), "{out}");
    assert!(lines.contains(&"password=s3cret-token"), "{out}");
    assert!(lines.contains(&"0"), "not in the environment: {out}");
    assert!(!out.contains(".git-credentials"), "nothing stored: {out}");

    // Declined: git fails without prompting.
    let (_, err, code, seen) = run(
        &d,
        &home,
        "printf 'protocol=https\\nhost=git.example.com\\n\\n' | git credential fill",
        None,
    )
    .await;
    assert_eq!(seen.len(), 1);
    assert_ne!(code, 0);
    assert!(err.contains("terminal prompts disabled"), "{err}");
    // The relay socket goes away with the process's conversation.
    let relay_sockets = || -> Vec<String> {
        std::fs::read_dir(d.dir.path().join("run"))
            .expect("run dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("cred-"))
            .collect()
    };
    within(async {
        while !relay_sockets().is_empty() {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;

    // Credentials need someone attached to answer.
    let e = d
        .client
        .exec(ExecSpec {
            cmd: vec!["true".into()],
            credentials: true,
            detach: true,
            ..Default::default()
        })
        .await
        .expect_err("detached");
    assert_eq!(e.code(), Some(DaemonErrorCode::Invalid), "{e}");
}
