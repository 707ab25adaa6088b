//! End-to-end tests of the `kiln` binary: `kiln up` runs as a real server process (real runc,
//! overlayfs, kilnd) and every other command is run as a user would, checking output, exit codes
//! and that bad input gets one clear line.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

mod agents;
mod evals;
mod templates;

fn kiln() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_kiln"))
}

fn env_path(var: &str) -> PathBuf {
    std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("{var} is not set: run the suite with `make test`"))
}

struct Server {
    child: Child,
    url: String,
    data: tempfile::TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        Self::start_env(extra, &[])
    }

    fn start_env(extra: &[&str], env: &[(&str, &std::path::Path)]) -> Server {
        let data = tempfile::tempdir().expect("tmp");
        let port = free_port();
        let url = format!("http://127.0.0.1:{port}");
        let log = std::fs::File::create(data.path().join("server.log")).expect("log");
        let child = Command::new(kiln())
            .arg("up")
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--ssh-listen", &format!("127.0.0.1:{}", free_port())])
            .arg("--data-dir")
            .arg(data.path())
            .arg("--images-dir")
            .arg(env_path("KILN_TEST_IMAGES"))
            .arg("--kilnd")
            .arg(env_path("KILN_KILND"))
            .args([
                "--no-build",
                "--disk-pool",
                "8G",
                "--default-memory",
                "256M",
                "--default-disk",
                "512M",
            ])
            .args(extra)
            .envs(env.iter().map(|(k, v)| (*k, *v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn kiln up");
        let s = Server { child, url, data };
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(s.url.trim_start_matches("http://")).is_ok() {
                return s;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "kiln up did not listen: {}",
            std::fs::read_to_string(s.data.path().join("server.log")).unwrap_or_default()
        );
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(kiln());
        c.args(args)
            .env("KILN_URL", &self.url)
            .env("KILN_DATA_DIR", self.data.path())
            .env_remove("KILN_TOKEN");
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args)
            .stdin(Stdio::null())
            .output()
            .expect("run kiln")
    }

    fn run_stdin(&self, args: &[&str], input: &[u8]) -> Output {
        let mut child = self
            .cmd(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input)
            .expect("write");
        child.wait_with_output().expect("wait")
    }

    /// Sends SIGTERM and waits for a clean exit.
    fn stop(mut self) -> std::process::ExitStatus {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> std::process::ExitStatus {
        // SAFETY: plain kill(2) of our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = self.child.try_wait().expect("wait") {
                return st;
            }
            assert!(Instant::now() < deadline, "kiln up did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Removes every sandbox through the CLI (so the server releases its kernel resources on stop).
    fn remove_all(&self) {
        let o = self.run(&["sandbox", "ls", "--json"]);
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&o.stdout) {
            for sb in v["sandboxes"].as_array().cloned().unwrap_or_default() {
                if let Some(id) = sb["id"].as_str() {
                    let _ = self.run(&["sandbox", "rm", id]);
                }
            }
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.data.path().join("server.log")).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // After a failed assertion: clean up like a careful operator would.
        if matches!(self.child.try_wait(), Ok(None)) {
            self.remove_all();
            let _ = self.stop_inner();
        }
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_string()
}

/// The CLI's error contract: non-zero exit, exactly one line on stderr starting with `error:`.
#[track_caller]
fn one_line_error(o: &Output, code: i32, needle: &str) {
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(code), "stderr: {err}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "expected one line, got: {err}"
    );
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains(needle), "`{needle}` not in: {err}");
}

#[test]
fn server_not_running_is_one_clear_line() {
    let o = Command::new(kiln())
        .args(["sandbox", "ls"])
        .env("KILN_URL", format!("http://127.0.0.1:{}", free_port()))
        .env("KILN_TOKEN", "x")
        .output()
        .expect("run");
    one_line_error(&o, 125, "cannot reach the Kiln server");
    assert!(text(&o.stderr).contains("kiln up"));
    // Output into a closed pipe ends quietly (no panic message).
    let mut child = Command::new(kiln())
        .args(["completions", "bash"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    drop(child.stdout.take());
    let o = child.wait_with_output().expect("wait");
    assert!(!text(&o.stderr).contains("panicked"), "{}", text(&o.stderr));
    // Usage errors come from clap with exit code 2.
    let o = Command::new(kiln())
        .args(["sandbox", "create", "--network", "sideways"])
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn sandbox_commands_end_to_end() {
    let s = Server::start(&["--warm-pool", "1"]);

    // Bad input, before and after reaching the server.
    one_line_error(
        &s.run(&["sandbox", "create", "--memory", "lots"]),
        125,
        "--memory: `lots` is not a size",
    );
    one_line_error(
        &s.run(&["sandbox", "create", "--memory", "1K"]),
        125,
        "memory must be between 16M",
    );
    one_line_error(
        &s.run(&["sandbox", "exec", "sb-nope00000000", "--", "true"]),
        125,
        "no sandbox with id `sb-nope00000000`",
    );
    one_line_error(
        &s.run(&["sandbox", "exec", "NOT/AN/ID", "--", "true"]),
        125,
        "is not a sandbox id",
    );

    let o = s.run(&[
        "sandbox",
        "create",
        "--json",
        "--ttl",
        "10m",
        "--label",
        "suite=cli",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let sb: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let id = sb["id"].as_str().expect("id").to_string();
    assert!(sb["expires_at_ms"].as_u64().is_some());

    // Streams, exit codes, timeouts, stdin.
    let o = s.run(&[
        "sandbox",
        "exec",
        &id,
        "--env",
        "X=1",
        "--cwd",
        "/tmp",
        "--",
        "sh",
        "-c",
        "echo out $X $(pwd); echo err >&2; exit 4",
    ]);
    assert_eq!(
        (o.status.code(), text(&o.stdout), text(&o.stderr)),
        (Some(4), "out 1 /tmp\n".into(), "err\n".into())
    );
    one_line_error(
        &s.run(&["sandbox", "exec", &id, "--", "no-such-command"]),
        125,
        "command not found",
    );
    let o = s.run(&[
        "sandbox",
        "exec",
        &id,
        "--timeout",
        "0.5",
        "--",
        "sleep",
        "30",
    ]);
    assert_eq!(o.status.code(), Some(124));
    let o = s.run_stdin(
        &["sandbox", "exec", "-i", &id, "--", "sh", "-c", "tr a-z A-Z"],
        b"piped through\n",
    );
    assert_eq!(
        (o.status.code(), text(&o.stdout)),
        (Some(0), "PIPED THROUGH\n".into()),
        "{}",
        text(&o.stderr)
    );

    // Files both ways.
    let local = s.data.path().join("local.txt");
    std::fs::write(&local, "kiln cp round trip\n").expect("write");
    let o = s.run(&[
        "sandbox",
        "cp",
        local.to_str().expect("p"),
        &format!("{id}:/workspace/"),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let o = s.run(&["sandbox", "exec", &id, "--", "cat", "/workspace/local.txt"]);
    assert_eq!(text(&o.stdout), "kiln cp round trip\n");
    let back = s.data.path().join("back.txt");
    let o = s.run(&[
        "sandbox",
        "cp",
        &format!("{id}:/workspace/local.txt"),
        back.to_str().expect("p"),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert_eq!(
        std::fs::read_to_string(&back).expect("read"),
        "kiln cp round trip\n"
    );
    one_line_error(
        &s.run(&[
            "sandbox",
            "cp",
            &format!("{id}:/nope/missing"),
            back.to_str().expect("p"),
        ]),
        125,
        "missing",
    );
    one_line_error(
        &s.run(&["sandbox", "cp", "a", "b"]),
        125,
        "must be ID:/path",
    );

    // Listing.
    let o = s.run(&["sandbox", "ls", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert!(list["sandboxes"]
        .as_array()
        .expect("arr")
        .iter()
        .any(|x| x["id"] == id.as_str()));
    let o = s.run(&["sandbox", "ls"]);
    assert!(text(&o.stdout).lines().any(|l| l.starts_with(&id)));

    // Pause / resume.
    assert_eq!(s.run(&["sandbox", "pause", &id]).status.code(), Some(0));
    one_line_error(
        &s.run(&["sandbox", "exec", &id, "--", "true"]),
        125,
        "is paused (hint: resume it first",
    );
    assert_eq!(s.run(&["sandbox", "resume", &id]).status.code(), Some(0));
    assert_eq!(
        s.run(&["sandbox", "exec", &id, "--", "true"]).status.code(),
        Some(0)
    );

    // An interactive shell over the PTY WebSocket, driven through a pipe.
    let o = s.run_stdin(
        &["sandbox", "shell", &id, "--cmd", "/bin/sh"],
        b"echo in-the-pty\nexit 5\n",
    );
    assert_eq!(o.status.code(), Some(5), "{}", text(&o.stderr));
    assert!(text(&o.stdout).contains("in-the-pty"));

    // kiln run: create, exec, remove.
    let before = s.run(&["sandbox", "ls", "--json"]).stdout;
    let o = s.run(&[
        "run",
        "--memory",
        "128M",
        "--",
        "sh",
        "-c",
        "echo ran; exit 3",
    ]);
    assert_eq!(
        (o.status.code(), text(&o.stdout)),
        (Some(3), "ran\n".into()),
        "{}",
        text(&o.stderr)
    );
    assert_eq!(
        s.run(&["sandbox", "ls", "--json"]).stdout,
        before,
        "kiln run must remove its sandbox"
    );

    // Removal, twice.
    let o = s.run(&["sandbox", "rm", &id]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(s.run(&["sandbox", "rm", &id]).status.code(), Some(125));

    // The benchmark speaks JSON with the fields it promises.
    let o = s.run(&[
        "bench",
        "sandbox",
        "--n",
        "3",
        "--idle",
        "2",
        "--template",
        "python",
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let b: serde_json::Value = serde_json::from_slice(&o.stdout).expect("bench json");
    for k in [
        "cold_create_to_first_output_ms",
        "warm_create_to_first_output_ms",
        "exec_roundtrip_ms",
    ] {
        assert!(
            b[k]["p50"].as_f64().is_some() && b[k]["p99"].as_f64().is_some(),
            "{k}: {b}"
        );
    }
    assert_eq!(b["idle_sandboxes"], 2);
    assert!(b["memory_per_idle_sandbox_mib"].as_f64().is_some());
    assert_eq!(b["templates"][0]["template"], "python", "{b}");
    assert!(
        b["templates"][0]["p50_ratio_to_base"].as_f64().is_some(),
        "{b}"
    );
    let o = s.run(&[
        "bench",
        "sandbox",
        "--n",
        "1",
        "--template",
        "no-such-template",
    ]);
    assert_eq!(o.status.code(), Some(125), "{}", text(&o.stderr));

    let log_hint = s.log();
    s.remove_all();
    let st = s.stop();
    assert!(st.success(), "kiln up exited with {st}: {log_hint}");
}

#[test]
fn orgs_keys_quota_and_audit_from_the_cli() {
    let s = Server::start(&[
        "--warm-pool",
        "0",
        "--log-format",
        "json",
        "--log",
        "kiln_server=debug,info",
    ]);
    // The owner key was written 0600 to the data dir and printed once.
    let token = s.data.path().join("token");
    let mode = std::fs::metadata(&token).expect("token").permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
    assert!(s.log().contains("owner key kiln_"), "{}", s.log());

    let o = s.run(&["org", "create", "acme", "--json"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let created: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let acme_key = created["key"]["secret"]
        .as_str()
        .expect("secret")
        .to_string();
    let acme = created["org"]["id"].as_str().expect("id").to_string();
    let o = s.run(&["org", "ls"]);
    let out = text(&o.stdout);
    assert!(out.contains("acme") && out.contains("system"), "{out}");
    one_line_error(&s.run(&["org", "create", "acme"]), 125, "already exists");

    let o = s.run(&[
        "org",
        "quota",
        &acme,
        "--sandboxes",
        "3",
        "--memory",
        "4G",
        "--json",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let q: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(q["limits"]["sandboxes"], 3);
    assert_eq!(q["limits"]["memory_bytes"], 4u64 << 30);

    // A key of acme: scoped, expiring; listed without its secret; revoked at once.
    let acme_cmd = |args: &[&str]| {
        s.cmd(args)
            .env("KILN_TOKEN", &acme_key)
            .stdin(Stdio::null())
            .output()
            .expect("run")
    };
    let o = acme_cmd(&[
        "key",
        "create",
        "--role",
        "member",
        "--scope",
        "sandboxes:read",
        "--expires",
        "30d",
        "--name",
        "ci",
        "--json",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let k: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let secret = k["secret"].as_str().expect("secret").to_string();
    let id = k["key"]["id"].as_str().expect("id").to_string();
    let o = acme_cmd(&["key", "ls"]);
    let out = text(&o.stdout);
    assert!(
        out.contains("ci") && out.contains("sandboxes:read") && !out.contains(&secret),
        "{out}"
    );
    let scoped = |args: &[&str]| {
        s.cmd(args)
            .env("KILN_TOKEN", &secret)
            .stdin(Stdio::null())
            .output()
            .expect("run")
    };
    assert!(scoped(&["sandbox", "ls"]).status.success());
    one_line_error(
        &scoped(&["key", "ls"]),
        125,
        "lacks the `keys:read` permission",
    );
    one_line_error(
        &acme_cmd(&["key", "create", "--role", "owner", "--org", "nope"]),
        125,
        "no organisation `nope`",
    );
    assert!(acme_cmd(&["key", "revoke", &id]).status.success());
    one_line_error(&scoped(&["sandbox", "ls"]), 125, "was revoked");
    // Usage errors stay exit 2.
    assert_eq!(
        s.run(&["key", "create", "--role", "god"]).status.code(),
        Some(2)
    );

    let o = s.run(&["audit", "--json", "--org", &acme]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let a: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let actions: Vec<String> = a["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .rev()
        .map(|e| {
            format!(
                "{} {}",
                e["action"].as_str().unwrap_or(""),
                e["outcome"].as_str().unwrap_or("")
            )
        })
        .collect();
    expect_test::expect![[r#"
        [
            "POST /v1/keys ok",
            "GET /v1/keys denied",
            "POST /v1/keys error",
            "DELETE /v1/keys/:id ok",
        ]
    "#]]
    .assert_debug_eq(&actions);
    let o = s.run(&["audit"]);
    assert!(
        text(&o.stdout).contains("POST /v1/orgs"),
        "{}",
        text(&o.stdout)
    );
    assert!(s.stop().success());
}
