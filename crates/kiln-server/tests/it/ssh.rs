//! The SSH front door with the real OpenSSH client: keys registered per organisation
//! (`/v1/ssh-keys`), an interactive shell on a PTY (`ssh -tt`), exec with its exit status,
//! `scp` both ways with checksums (SFTP), `ssh -L` to `python3 -m http.server` in the sandbox,
//! and a key of another organisation refused.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use kiln_protocol::api::{CreateSandbox, OrgCreated, SshKey};
use serde_json::{json, Value};
use sha2::Digest;

use crate::harness::{self, TestServer};

fn keygen(dir: &Path, name: &str) -> (PathBuf, String) {
    let key = dir.join(name);
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&key)
        .status()
        .expect("ssh-keygen (install openssh-client: scripts/install-deps.sh)");
    assert!(st.success());
    let public = std::fs::read_to_string(key.with_extension("pub")).expect("pub");
    (key, public)
}

struct Door {
    port: u16,
    known_hosts: PathBuf,
}

fn door(s: &TestServer, dir: &Path) -> Door {
    let l = s.kiln.ssh.get().expect("ssh listening");
    let known_hosts = dir.join("known_hosts");
    std::fs::write(
        &known_hosts,
        format!("[127.0.0.1]:{} {}\n", l.addr.port(), l.host_key),
    )
    .expect("known_hosts");
    Door {
        port: l.addr.port(),
        known_hosts,
    }
}

/// The options every OpenSSH tool gets: our port, our key only, the pinned host key, no
/// prompts.
fn opts(d: &Door, key: &Path, port_flag: &str) -> Vec<String> {
    vec![
        port_flag.into(),
        d.port.to_string(),
        "-i".into(),
        key.display().to_string(),
        "-o".into(),
        "IdentitiesOnly=yes".into(),
        "-o".into(),
        "BatchMode=yes".into(),
        "-o".into(),
        format!("UserKnownHostsFile={}", d.known_hosts.display()),
        "-o".into(),
        "StrictHostKeyChecking=yes".into(),
        "-o".into(),
        "LogLevel=ERROR".into(),
    ]
}

/// Runs a client tool off the async workers (the server runs on them).
async fn run(mut cmd: Command, stdin: &[u8]) -> Output {
    let stdin = stdin.to_vec();
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn client");
        let mut input = child.stdin.take().expect("stdin");
        let _ = input.write_all(&stdin);
        drop(input);
        child.wait_with_output().expect("wait")
    })
    .await
    .expect("join")
}

async fn ssh(d: &Door, key: &Path, extra: &[&str], stdin: &[u8]) -> Output {
    let mut c = Command::new("ssh");
    c.args(opts(d, key, "-p")).args(extra);
    run(c, stdin).await
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

async fn add_key(s: &TestServer, token: &str, public: &str) -> (u16, Value) {
    let r = s
        .http
        .post(s.url("/v1/ssh-keys"))
        .bearer_auth(token)
        .json(&json!({ "public_key": public }))
        .send()
        .await
        .expect("add key");
    let st = r.status().as_u16();
    (st, r.json().await.expect("json"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_shell_exec_scp_forwarding_and_org_isolation() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut cfg = harness::config(dir.path());
    cfg.ssh_listen = Some("127.0.0.1:0".parse().expect("addr"));
    let s = harness::start(cfg).await;
    let keys = tempfile::tempdir().expect("tmp");
    let (key_a, pub_a) = keygen(keys.path(), "alice");
    let (key_b, pub_b) = keygen(keys.path(), "bob");
    let d = door(&s, keys.path());

    // Keys: bad input is refused with a clear error; the key is added once.
    let (st, e) = add_key(&s, &s.kiln.token, "ssh-ed25519 not-base64!").await;
    assert_eq!(
        (st, e["error"]["code"].as_str()),
        (400, Some("invalid_argument"))
    );
    let (st, added) = add_key(&s, &s.kiln.token, &pub_a).await;
    assert_eq!(st, 201, "{added}");
    let added: SshKey = serde_json::from_value(added).expect("key");
    assert_eq!(
        (added.name.as_str(), added.algorithm.as_str()),
        ("alice", "ssh-ed25519")
    );
    let (st, e) = add_key(&s, &s.kiln.token, &pub_a).await;
    assert_eq!(
        (st, e["error"]["code"].as_str()),
        (409, Some("ssh_key_exists"))
    );

    let sb = s.create(&CreateSandbox::default()).await;
    let user_at = format!("{}@127.0.0.1", sb.id);

    // Exec: stdout, stderr and the exit status come back apart.
    let o = ssh(
        &d,
        &key_a,
        &[&user_at, "echo out; echo err >&2; exit 7"],
        b"",
    )
    .await;
    assert_eq!(
        (text(&o.stdout), text(&o.stderr), o.status.code()),
        ("out\n".into(), "err\n".into(), Some(7))
    );
    // stdin reaches the command and EOF ends it.
    let o = ssh(&d, &key_a, &[&user_at, "wc -c"], b"12345").await;
    assert_eq!((text(&o.stdout).trim(), o.status.code()), ("5", Some(0)));

    // An interactive shell on a PTY.
    let o = ssh(
        &d,
        &key_a,
        &["-tt", &user_at],
        b"tty; echo \"prod=$((6*7))\"; exit 3\n",
    )
    .await;
    let out = text(&o.stdout);
    assert!(out.contains("/dev/pts/"), "{out}");
    assert!(out.contains("prod=42"), "{out}");
    assert_eq!(o.status.code(), Some(3), "{out}");

    // scp both ways (SFTP), checked by SHA-256 on both sides.
    let mut data = vec![0u8; 3 << 20];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut data);
    let local = keys.path().join("blob");
    std::fs::write(&local, &data).expect("write");
    let sum = hex::encode(sha2::Sha256::digest(&data));
    let scp = |args: &[String]| {
        let mut c = Command::new("scp");
        c.args(opts(&d, &key_a, "-P")).args(args);
        run(c, b"")
    };
    let o = scp(&[local.display().to_string(), format!("{user_at}:/tmp/blob")]).await;
    assert!(
        o.status.success(),
        "{:?} {} {}",
        o.status,
        text(&o.stdout),
        text(&o.stderr)
    );
    let o = ssh(&d, &key_a, &[&user_at, "sha256sum /tmp/blob"], b"").await;
    assert_eq!(text(&o.stdout), format!("{sum}  /tmp/blob\n"));
    let back = keys.path().join("back");
    let o = scp(&[format!("{user_at}:/tmp/blob"), back.display().to_string()]).await;
    assert!(
        o.status.success(),
        "{:?} {} {}",
        o.status,
        text(&o.stdout),
        text(&o.stderr)
    );
    assert_eq!(
        hex::encode(sha2::Sha256::digest(std::fs::read(&back).expect("read"))),
        sum
    );
    // A relative path lands in the home directory; a missing file is a clear scp error.
    let o = scp(&[local.display().to_string(), format!("{user_at}:rel")]).await;
    assert!(
        o.status.success(),
        "{:?} {} {}",
        o.status,
        text(&o.stdout),
        text(&o.stderr)
    );
    let o = ssh(
        &d,
        &key_a,
        &[&user_at, "cmp /tmp/blob ~/rel && echo same"],
        b"",
    )
    .await;
    assert_eq!(text(&o.stdout), "same\n");
    let o = scp(&[format!("{user_at}:/nope"), back.display().to_string()]).await;
    assert!(!o.status.success());

    // ssh -L to an HTTP server in the sandbox (network none: through kilnd's Connect).
    let o = ssh(
        &d,
        &key_a,
        &[
            &user_at,
            "mkdir -p /srv/www && echo hello-from-sandbox > /srv/www/index.html && cd /srv/www && (setsid python3 -m http.server 8000 --bind 127.0.0.1 >/dev/null 2>&1 &) ; sleep 0.2",
        ],
        b"",
    )
    .await;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let local_port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let mut fwd = Command::new("ssh")
        .args(opts(&d, &key_a, "-p"))
        .args([
            "-N",
            "-o",
            "ExitOnForwardFailure=yes",
            "-L",
            &format!("127.0.0.1:{local_port}:localhost:8000"),
            &user_at,
        ])
        .stdin(Stdio::null())
        .spawn()
        .expect("ssh -L");
    let body = harness::eventually(20, async || {
        match reqwest::get(format!("http://127.0.0.1:{local_port}/index.html")).await {
            Ok(r) if r.status() == 200 => r.text().await.is_ok_and(|t| t == "hello-from-sandbox\n"),
            _ => false,
        }
    })
    .await;
    let _ = fwd.kill();
    let _ = fwd.wait();
    assert!(body, "the forwarded port serves the sandbox's file");

    // Another organisation's key is refused, even when registered to its own org.
    let r = s
        .http
        .post(s.url("/v1/orgs"))
        .json(&json!({"name": "org-b"}))
        .send()
        .await
        .expect("org");
    let b: OrgCreated = r.json().await.expect("org");
    let owner_b = b.key.expect("owner key").secret;
    let (st, _) = add_key(&s, &owner_b, &pub_b).await;
    assert_eq!(st, 201);
    let o = ssh(&d, &key_b, &[&user_at, "true"], b"").await;
    assert_eq!(o.status.code(), Some(255));
    assert!(
        text(&o.stderr).contains("Permission denied"),
        "{}",
        text(&o.stderr)
    );
    // B cannot see or remove A's key either.
    let r = s
        .http
        .delete(s.url(&format!("/v1/ssh-keys/{}", added.id)))
        .bearer_auth(&owner_b)
        .send()
        .await
        .expect("rm");
    assert_eq!(r.status(), 404);

    // Removing A's key closes the door from the next login; both changes are audited.
    let r = s
        .http
        .delete(s.url(&format!("/v1/ssh-keys/{}", added.id)))
        .send()
        .await
        .expect("rm");
    assert_eq!(r.status(), 204);
    let o = ssh(&d, &key_a, &[&user_at, "true"], b"").await;
    assert_eq!(o.status.code(), Some(255));
    let audit: Value = s
        .http
        .get(s.url("/v1/audit?limit=200"))
        .send()
        .await
        .expect("audit")
        .json()
        .await
        .expect("json");
    let actions: Vec<String> = audit["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| {
            format!(
                "{} {}",
                e["action"].as_str().unwrap_or(""),
                e["outcome"].as_str().unwrap_or("")
            )
        })
        .collect();
    for want in [
        "POST /v1/ssh-keys ok",
        "DELETE /v1/ssh-keys/:id ok",
        "SSH login ok",
    ] {
        assert!(actions.iter().any(|a| a == want), "{want} in {actions:?}");
    }
    s.teardown().await;
}

/// Wildcard previews over a real socket: `Host: {port}-{id}.{domain}` reaches the sandbox's
/// port with the API key, or with a preview token (once in the query, then as a cookie).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcard_previews_by_host_with_key_or_token() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut cfg = harness::config(dir.path());
    cfg.preview_domain = Some("preview.test".into());
    let s = harness::start(cfg).await;
    let sb = s.create(&CreateSandbox::default()).await;
    let id = sb.id.clone();
    let (_, _, code) = s
        .sh(
            &id,
            "mkdir -p /srv/www && echo from-preview > /srv/www/index.html && cd /srv/www && (setsid python3 -m http.server 8000 --bind 127.0.0.1 >/dev/null 2>&1 &)",
        )
        .await;
    assert_eq!(code, 0);
    let host = format!("8000-{id}.preview.test");
    let plain = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    // With the API key.
    let ok = harness::eventually(20, async || {
        let r = s
            .http
            .get(s.url("/index.html"))
            .header("host", &host)
            .send()
            .await
            .expect("get");
        r.status() == 200 && r.text().await.is_ok_and(|t| t == "from-preview\n")
    })
    .await;
    assert!(ok, "the key reaches the preview by host");
    // Without credentials: 401.
    let r = plain
        .get(s.url("/index.html"))
        .header("host", &host)
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 401);
    // A token: once in the query (redirect + cookie), then as the cookie.
    let t: Value = s
        .http
        .post(s.url(&format!("/v1/sandboxes/{id}/previews/8000/token")))
        .send()
        .await
        .expect("mint")
        .json()
        .await
        .expect("json");
    let token = t["token"].as_str().expect("token").to_string();
    let r = plain
        .get(s.url(&format!("/index.html?a=1&kiln_token={token}")))
        .header("host", &host)
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/index.html?a=1");
    let cookie = r.headers()["set-cookie"]
        .to_str()
        .expect("cookie")
        .to_string();
    let pair = cookie.split(';').next().expect("pair").to_string();
    let r = plain
        .get(s.url("/index.html"))
        .header("host", &host)
        .header("cookie", &pair)
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.expect("body"), "from-preview\n");
    // The token is bound to its port and sandbox, and a forged one is refused.
    for (h, c) in [
        (format!("8001-{id}.preview.test"), pair.clone()),
        (host.clone(), format!("kiln_preview={}x", token)),
    ] {
        let r = plain
            .get(s.url("/"))
            .header("host", h)
            .header("cookie", c)
            .send()
            .await
            .expect("get");
        assert_eq!(r.status(), 401);
    }
    // Other hosts are the API as usual.
    let r = s
        .http
        .get(s.url("/v1/health"))
        .send()
        .await
        .expect("health");
    assert_eq!(r.status(), 200);
    s.teardown().await;
}
