//! `kiln template ...` end to end: builds with the real ansible-playbook into the test image
//! store, `template test` through a real server and sandboxes, the template API, and the
//! error contract. node, rust and polyglot run only with `KILN_TEST_ALL_TEMPLATES=1`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::{env_path, kiln, one_line_error, text, Server};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn build(name: &str, extra_env: &[(&str, &Path)]) -> Output {
    Command::new(kiln())
        .args(["template", "build", name, "--json", "--images-dir"])
        .arg(env_path("KILN_TEST_IMAGES"))
        .envs(extra_env.iter().map(|(k, v)| (*k, *v)))
        .output()
        .expect("run kiln template build")
}

fn events(o: &Output) -> Vec<serde_json::Value> {
    text(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect()
}

fn salt() -> String {
    format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(1)
    )
}

/// A templates dir with one spec (roles from the repo's ansible/).
fn spec_dir(name: &str, toml: &str) -> tempfile::TempDir {
    let d = tempfile::tempdir().expect("tmp");
    std::fs::write(d.path().join(format!("{name}.toml")), toml).expect("spec");
    d
}

/// One HTTP/1.1 request to the server; returns (status, body).
fn http(s: &Server, method: &str, path: &str) -> (u16, String) {
    let token = std::fs::read_to_string(s.data.path().join("token")).expect("token");
    let addr = s.url.trim_start_matches("http://");
    let mut c = std::net::TcpStream::connect(addr).expect("connect");
    write!(
        c,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        token.trim()
    )
    .expect("write");
    let mut raw = Vec::new();
    c.read_to_end(&mut raw).expect("read");
    let raw = text(&raw);
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    (status, body)
}

fn dechunk(mut b: &str) -> String {
    let mut out = String::new();
    while let Some((len, rest)) = b.split_once("\r\n") {
        let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        b = rest[n..].trim_start_matches("\r\n");
    }
    out
}

#[test]
fn template_build_is_cached_and_errors_are_one_line() {
    // `make test-image` built base: everything is reused.
    let o = build("base", &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let ev = events(&o);
    let starts: Vec<_> = ev.iter().filter(|e| e["event"] == "layer_start").collect();
    assert_eq!(
        starts
            .iter()
            .map(|e| e["role"].as_str().unwrap_or(""))
            .collect::<Vec<_>>(),
        ["debian", "base", "git", "ollama"]
    );
    assert!(starts.iter().all(|e| e["cached"] == true), "{ev:?}");
    let done = ev
        .iter()
        .find(|e| e["event"] == "done")
        .expect("done event");
    assert_eq!(done["rebuilt"], 0);
    assert_eq!(
        ev.last().map(|e| e["event"].clone()),
        Some(serde_json::json!("result"))
    );

    let o = build("no-such-template", &[]);
    one_line_error(&o, 125, "unknown template `no-such-template`");

    let d = spec_dir("badrole", "roles = [\"base\", \"nope\"]\n");
    let o = build("badrole", &[("KILN_TEMPLATES_DIR", d.path())]);
    one_line_error(&o, 125, "template `badrole` uses unknown role `nope`");

    // A layer that must be built, with no ansible-playbook on PATH. (`--json` keeps progress
    // on stdout; without it progress lines go to stderr before the one error line.)
    let d = spec_dir(
        "noansible",
        &format!(
            "roles = [\"base\", \"git\"]\n[vars]\ngit_default_branch = \"b{}\"\n",
            salt()
        ),
    );
    let o = Command::new(kiln())
        .args(["template", "build", "noansible", "--json", "--images-dir"])
        .arg(env_path("KILN_TEST_IMAGES"))
        .env("KILN_TEMPLATES_DIR", d.path())
        .env("PATH", "/nonexistent")
        .output()
        .expect("run");
    one_line_error(&o, 125, "`ansible-playbook` is not installed");
    assert!(
        text(&o.stderr).contains("install-deps"),
        "{}",
        text(&o.stderr)
    );

    // A failing role: one line naming the role, the task and the command's output.
    let roles = tempfile::tempdir().expect("tmp");
    let ansible = roles.path().join("ansible");
    std::fs::create_dir_all(ansible.join("roles/broken/tasks")).expect("mkdir");
    std::os::unix::fs::symlink(
        repo().join("ansible/roles/base"),
        ansible.join("roles/base"),
    )
    .expect("link");
    std::fs::write(
        ansible.join("roles/broken/tasks/main.yml"),
        format!(
            "---\n- name: Break here\n  ansible.builtin.command: ls /no-such-path-{}\n",
            salt()
        ),
    )
    .expect("tasks");
    let d = spec_dir("broken", "roles = [\"base\", \"broken\"]\n");
    let o = Command::new(kiln())
        .args(["template", "build", "broken", "--json", "--images-dir"])
        .arg(env_path("KILN_TEST_IMAGES"))
        .env("KILN_TEMPLATES_DIR", d.path())
        .env("KILN_ANSIBLE_DIR", &ansible)
        .output()
        .expect("run");
    one_line_error(
        &o,
        125,
        "role `broken` failed at task `broken : Break here`",
    );
    assert!(
        text(&o.stderr).contains("No such file or directory"),
        "{}",
        text(&o.stderr)
    );
}

fn check_template(s: &Server, name: &str, roles: &[&str], tools: &[&str]) {
    let o = build(name, &[]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "build {name}: {}",
        text(&o.stderr)
    );
    let o = s.run(&["template", "inspect", name, "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let info: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(info["cache"], "fresh");
    let got: Vec<&str> = info["template"]["roles"]
        .as_array()
        .expect("roles")
        .iter()
        .filter_map(|r| r["role"].as_str())
        .collect();
    assert_eq!(got, roles);
    for t in tools {
        assert!(
            info["template"]["tools"][t]
                .as_str()
                .is_some_and(|v| !v.is_empty()),
            "{name}: tool {t} not recorded: {}",
            info["template"]["tools"]
        );
    }
    let o = s.run(&["template", "test", name]);
    let out = text(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{out}\n{}", text(&o.stderr));
    for r in roles {
        assert!(
            out.lines()
                .any(|l| l.starts_with(r) && l.contains(" pass ")),
            "{r} did not pass:\n{out}"
        );
    }
}

#[test]
fn base_and_python_templates_build_test_and_run() {
    let s = Server::start(&["--warm-pool", "0"]);
    check_template(
        &s,
        "base",
        &["base", "git", "ollama"],
        &["curl", "git", "ollama_host"],
    );
    check_template(
        &s,
        "python",
        &["base", "git", "ollama", "python"],
        &["python", "pip", "uv", "pylsp"],
    );
    // The template is usable by `run` and `sandbox create`.
    let o = s.run(&[
        "run",
        "--template",
        "python",
        "--",
        "python3",
        "-c",
        "import sys; print(sys.version_info[0] * 14)",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout).trim(), "42");
    let o = s.run(&[
        "run",
        "--template",
        "python",
        "--",
        "sh",
        "-c",
        "id -un user && git config --system init.defaultBranch",
    ]);
    assert_eq!(text(&o.stdout).trim(), "user\nmain", "{}", text(&o.stderr));
    let o = s.run(&["sandbox", "create", "--template", "nope"]);
    one_line_error(&o, 125, "template `nope` is not built");
    let o = s.run(&["template", "ls", "--json"]);
    let ls: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let py = ls["templates"]
        .as_array()
        .expect("list")
        .iter()
        .find(|t| t["name"] == "python")
        .expect("python listed")
        .clone();
    assert_eq!(py["layers"], 5);
    assert_eq!(py["cache"], "fresh");
    s.remove_all();
}

#[test]
fn template_api_builds_removes_and_collects() {
    let name = format!("scratch-{}", &salt()[..8]);
    let specs = spec_dir(&name, "roles = [\"base\"]\n");
    let s = Server::start_env(
        &["--warm-pool", "0"],
        &[("KILN_TEMPLATES_DIR", specs.path())],
    );
    let (st, body) = http(&s, "POST", &format!("/v1/templates/{name}/build"));
    assert_eq!(st, 200, "{body}");
    let ev: Vec<serde_json::Value> = body
        .lines()
        .map(|l| serde_json::from_str(l).expect("ndjson"))
        .collect();
    let last = ev.last().expect("events");
    assert_eq!(last["event"], "done", "{body}");
    assert_eq!(last["rebuilt"], 0, "base layers are cached: {body}");
    let (st, body) = http(&s, "GET", &format!("/v1/templates/{name}"));
    assert_eq!(st, 200, "{body}");
    let (st, body) = http(&s, "POST", "/v1/templates/nope/build");
    assert_eq!(st, 404, "{body}");
    assert!(body.contains("\"code\":\"template_not_found\""), "{body}");
    let o = s.run(&["template", "rm", &name]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let o = s.run(&["template", "inspect", &name]);
    one_line_error(&o, 125, &format!("template `{name}` is not built"));
    let o = s.run(&["template", "gc", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let rep: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert!(rep["kept"].as_u64().unwrap_or(0) >= 4, "{rep}");
    // The base template survives gc.
    let o = s.run(&["template", "inspect", "base", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
}

#[test]
fn node_rust_polyglot_templates() {
    if std::env::var("KILN_TEST_ALL_TEMPLATES").as_deref() != Ok("1") {
        eprintln!("skipped: set KILN_TEST_ALL_TEMPLATES=1 to build node, rust and polyglot");
        return;
    }
    let s = Server::start(&["--warm-pool", "0"]);
    check_template(
        &s,
        "node",
        &["base", "git", "ollama", "node"],
        &["node", "npm", "tsc", "typescript-language-server", "pnpm"],
    );
    check_template(
        &s,
        "rust",
        &["base", "git", "ollama", "rust"],
        &["rustc", "cargo", "rust_toolchain_source", "rust-analyzer"],
    );
    check_template(
        &s,
        "polyglot",
        &["base", "git", "ollama", "python", "node", "rust"],
        &["python", "node", "rustc"],
    );
    s.remove_all();
}

#[test]
fn private_template_push_and_git_settings_from_the_cli() {
    let s = Server::start(&["--warm-pool", "0"]);
    let name = format!("cli-{}", salt());
    let spec = spec_dir(
        "spec",
        "description = \"team base\"\nparent = \"base\"\n[vars]\ngit_user_name = \"Team Bot\"\n",
    );
    let file = spec.path().join("spec.toml");
    let f = file.to_str().expect("path");
    // Upload and build on the server: progress lines, the name on stdout.
    let o = s.run(&["template", "push", &name, f]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout).trim(), name);
    assert!(text(&o.stderr).contains("ready:"), "{}", text(&o.stderr));
    let o = s.run(&["template", "ls"]);
    let line = text(&o.stdout)
        .lines()
        .find(|l| l.starts_with(&name))
        .map(str::to_string)
        .unwrap_or_default();
    assert!(line.contains("private"), "{}", text(&o.stdout));
    let o = s.run(&[
        "run",
        "--template",
        &name,
        "--",
        "git",
        "config",
        "--system",
        "user.name",
    ]);
    assert_eq!(text(&o.stdout).trim(), "Team Bot", "{}", text(&o.stderr));
    // Bad specs and public names are one line each.
    let bad = spec_dir(
        "bad",
        "parent = \"base\"\n[vars]\npython_extra_tools = [\"x\"]\n",
    );
    let o = s.run(&[
        "template",
        "push",
        &name,
        bad.path().join("bad.toml").to_str().expect("p"),
    ]);
    one_line_error(&o, 125, "cannot be set by a private template");
    let o = s.run(&["template", "push", "python", f, "--no-build"]);
    one_line_error(&o, 125, "is a public template");
    let o = s.run(&["template", "rm", &name]);
    assert!(o.status.success(), "{}", text(&o.stderr));

    // Stored git credentials: the password from stdin, never printed again.
    let o = s.run_stdin(
        &[
            "git-credential",
            "add",
            "git.example.com",
            "--username",
            "bot",
            "--password-stdin",
        ],
        b"hunter2-token\n",
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let o = s.run(&["git-credential", "ls", "--json"]);
    let out = text(&o.stdout);
    assert!(
        out.contains("git.example.com") && !out.contains("hunter2"),
        "{out}"
    );
    let o = s.run(&[
        "git-credential",
        "add",
        "git.example.com",
        "--username",
        "bot",
    ]);
    one_line_error(&o, 125, "--password-stdin");
    let o = s.run(&["git-credential", "rm", "git.example.com"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    // The organisation's default author.
    let o = s.run(&["org", "git", "--author", "Team Bot <bot@example.com>"]);
    assert_eq!(text(&o.stdout).trim(), "author Team Bot <bot@example.com>");
    let o = s.run(&["org", "git", "--reset"]);
    assert!(
        text(&o.stdout).contains("Kiln's default"),
        "{}",
        text(&o.stdout)
    );
    s.remove_all();
    assert!(s.stop().success());
}
