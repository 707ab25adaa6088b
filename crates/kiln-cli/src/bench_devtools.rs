//! `kiln bench devtools`: developer tools against a throwaway in-process server (real runc
//! sandboxes of the `python` template, the SSH front door, SQLite), each with a baseline
//! measured in the same run and interleaved with it: LSP definition lookups and diagnostics
//! after an edit through Kiln's API against the same language server (pylsp) spoken to
//! directly over a kilnd `Pipe`; SSH connect-and-exec of `true` with the real OpenSSH client
//! (against a bare kilnd exec of `true`); the preview proxy against the same request sent
//! through a kilnd `Connect` tunnel and from the host to the sandbox's address; and
//! `git clone` of a local repository inside a sandbox against the same clone on the host (on
//! its disk, and in tmpfs as the floor).
//! Overheads are medians of paired differences (each Kiln sample minus the baseline sample
//! taken right after it), so a machine whose load drifts during the run still compares like
//! with like.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use kiln_protocol::api::{CreateSandbox, NetworkMode, Sandbox};
use kiln_protocol::kilnd::{ExecSpec, Reply};
use reqwest::Method;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};

use crate::api::Api;
use crate::bench::{ms, percentiles, progress, Percentiles, Throwaway};
use crate::Global;

#[derive(Args, Debug)]
pub struct DevtoolsBench {
    /// Samples per fast measurement (LSP definition, preview requests)
    #[arg(long, default_value_t = 100)]
    pub n: usize,
    /// Diagnostics after an edit per side (pylsp lints 0.5 s after the last change)
    #[arg(long, default_value_t = 20)]
    pub diag_n: usize,
    /// SSH connect-and-exec runs
    #[arg(long, default_value_t = 50)]
    pub ssh_n: usize,
    /// Clones per side
    #[arg(long, default_value_t = 20)]
    pub clone_n: usize,
    /// Files in the repository that is cloned
    #[arg(long, default_value_t = 500)]
    pub clone_files: usize,
    /// Image store with the `python` template [default: <data dir>/images]
    #[arg(long, env = "KILN_IMAGES_DIR")]
    pub images_dir: Option<PathBuf>,
    /// The static kilnd [default: next to `kiln`, or what `kiln up` finds]
    #[arg(long, env = "KILN_KILND")]
    pub kilnd: Option<PathBuf>,
    /// Print one JSON object
    #[arg(long)]
    pub json: bool,
}

/// Median of `a[i] - b[i]`, rounded to µs.
fn paired_overhead(a: &[f64], b: &[f64]) -> f64 {
    let mut d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    percentiles(&mut d).p50
}

fn ratio(a: &Percentiles, b: &Percentiles) -> f64 {
    (a.p50 / b.p50 * 100.0).round() / 100.0
}

pub async fn run(g: &Global, b: DevtoolsBench) -> Result<i32> {
    if b.n == 0 || b.diag_n == 0 || b.ssh_n == 0 || b.clone_n == 0 {
        bail!("every count must be at least 1");
    }
    let images = b
        .images_dir
        .clone()
        .unwrap_or_else(|| crate::template::default_images_dir(g));
    let server = Throwaway::start("devtools", b.kilnd.clone(), |cfg| {
        cfg.images_dir = images;
        cfg.ssh_listen = Some("127.0.0.1:0".parse()?);
        Ok(())
    })
    .await?;
    let api = Api::from_env(
        Some(server.url.clone()),
        Some(server.kiln.token.clone()),
        None,
    );
    let result = measure(&server.kiln, &api, &b, server.scratch()).await;
    server.stop().await;
    let report = result?;
    if b.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(0)
}

fn print_report(r: &Value) {
    let p = |name: &str, v: &Value| {
        println!(
            "{name:<54} p50 {:>9.3} ms   p99 {:>9.3} ms",
            v["p50"].as_f64().unwrap_or(f64::NAN),
            v["p99"].as_f64().unwrap_or(f64::NAN)
        );
    };
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    let l = &r["lsp"];
    p(
        "LSP definition through Kiln (HTTP API)",
        &l["definition_ms"],
    );
    p(
        "  baseline: the same pylsp over a kilnd Pipe",
        &l["definition_direct_ms"],
    );
    println!(
        "  Kiln's overhead (median of paired differences): {:.3} ms (target <= 2; warm p50 target <= 50)",
        f(&l["definition_overhead_ms"])
    );
    p(
        "LSP diagnostics after an edit through Kiln",
        &l["diagnostics_after_edit_ms"],
    );
    p(
        "  baseline: the same pylsp over a kilnd Pipe",
        &l["diagnostics_after_edit_direct_ms"],
    );
    println!(
        "  Kiln's overhead (median of paired differences): {:.3} ms (pylsp itself waits {} ms after a change before linting)",
        f(&l["diagnostics_overhead_ms"]),
        l["pylsp_lint_debounce_ms"]
    );
    let s = &r["ssh"];
    p(
        "SSH connect-and-exec `true` (OpenSSH client)",
        &s["connect_exec_true_ms"],
    );
    p(
        "  for scale: exec `true` straight to kilnd",
        &s["kilnd_exec_true_ms"],
    );
    println!("  target p50 <= 150 ms");
    let v = &r["preview"];
    p("preview proxy GET through Kiln", &v["proxy_ms"]);
    p(
        "  baseline: the same GET through a kilnd Connect tunnel",
        &v["tunnel_direct_ms"],
    );
    p(
        "  baseline: the same GET from the host to the sandbox",
        &v["host_direct_ms"],
    );
    println!(
        "  proxy overhead vs the tunnel: {:.3} ms (median of paired differences; target <= 1), ratio {:.2}x; vs the host: ratio {:.2}x",
        f(&v["overhead_vs_tunnel_ms"]),
        f(&v["ratio_vs_tunnel"]),
        f(&v["ratio_vs_host"])
    );
    let c = &r["git_clone"];
    p(
        &format!(
            "git clone of a local repository ({} files), in a sandbox",
            c["files"]
        ),
        &c["sandbox_ms"],
    );
    p(
        "  the same through POST /v1/sandboxes/ID/git/clone",
        &c["api_ms"],
    );
    p(
        "  baseline: the same clone on the host's disk",
        &c["host_ms"],
    );
    p(
        "  baseline: the same clone on the host in tmpfs",
        &c["host_tmpfs_ms"],
    );
    println!(
        "  sandbox / host disk: {:.2}x, sandbox / host tmpfs: {:.2}x (p50)",
        f(&c["ratio_sandbox_vs_host"]),
        f(&c["ratio_sandbox_vs_host_tmpfs"])
    );
}

/// Runs `script` with `sh -c` in the sandbox through kilnd: (exit code, stdout + stderr).
async fn sh(client: &kilnd::client::Client, script: &str) -> Result<(i32, String)> {
    let mut s = client
        .exec(ExecSpec {
            cmd: vec!["sh".into(), "-c".into(), script.into()],
            timeout_secs: Some(600.0),
            ..Default::default()
        })
        .await?;
    let mut out = Vec::new();
    while let Some(r) = s.next().await {
        match r? {
            Reply::Output { data, .. } => out.extend(data),
            Reply::Exited(st) => {
                return Ok((
                    st.exit_code.unwrap_or(-1),
                    String::from_utf8_lossy(&out).into_owned(),
                ))
            }
            _ => {}
        }
    }
    bail!("the exec stream ended without an exit status")
}

async fn sh_ok(client: &kilnd::client::Client, script: &str) -> Result<String> {
    let (code, out) = sh(client, script).await?;
    if code != 0 {
        bail!(
            "`{script}` failed in the sandbox (exit {code}): {}",
            out.trim()
        );
    }
    Ok(out)
}

async fn measure(
    kiln: &Arc<kiln_server::Kiln>,
    api: &Api,
    b: &DevtoolsBench,
    data: &Path,
) -> Result<Value> {
    progress(b.json, "creating a `python` sandbox (network full)");
    let sb: Sandbox = api
        .json(
            Method::POST,
            "/v1/sandboxes",
            Some(&CreateSandbox {
                template: Some("python".into()),
                network: Some(NetworkMode::Full),
                memory: Some(kiln_protocol::api::SizeArg::Text("1G".into())),
                pool: Some(false),
                ..CreateSandbox::default()
            }),
        )
        .await
        .context("cannot create a sandbox of the `python` template (hint: build it with `kiln template build python`, or pass --images-dir)")?;
    let client = kiln.runtime.client(&sb.id);
    let lsp = lsp_bench(api, &client, &sb.id, b).await?;
    let ssh = ssh_bench(kiln, api, &client, &sb.id, b, data).await?;
    let preview = preview_bench(api, &client, &sb, b).await?;
    let clone = clone_bench(api, &client, &sb.id, b, data).await?;
    Ok(json!({
        "sandbox_template": "python",
        "lsp": lsp,
        "ssh": ssh,
        "preview": preview,
        "git_clone": clone,
        "targets": {
            "lsp_warm_p50_ms": 50, "lsp_overhead_ms": 2, "ssh_connect_exec_p50_ms": 150,
            "preview_overhead_p50_ms": 1
        },
    }))
}

// ---------------------------------------------------------------------------------------
// LSP

const UTIL_PY: &str = "def helper(x):\n    return x * 2\n";

fn main_py(missing: &str) -> String {
    format!("from util import helper\n\nprint(helper(2))\nprint({missing})\n")
}

/// A language server spoken to directly: JSON-RPC over a kilnd `Pipe`, one request at a time.
struct DirectLsp {
    rd: BufReader<tokio::io::ReadHalf<kilnd::client::Tunnel>>,
    wr: tokio::io::WriteHalf<kilnd::client::Tunnel>,
    next_id: i64,
}

impl DirectLsp {
    async fn send(&mut self, v: Value) -> Result<()> {
        self.wr
            .write_all(&kiln_devtools::lsp::frame_message(&v))
            .await?;
        Ok(())
    }

    /// Reads messages until `want` matches one, answering the server's own requests.
    async fn until(&mut self, want: impl Fn(&Value) -> bool) -> Result<Value> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let msg = tokio::time::timeout(left, kiln_devtools::lsp::read_message(&mut self.rd))
                .await
                .map_err(|_| anyhow!("pylsp did not answer within 60 s"))??
                .ok_or_else(|| anyhow!("pylsp exited"))?;
            if want(&msg) {
                return Ok(msg);
            }
            if let (Some(m), Some(id)) = (msg.get("method").and_then(Value::as_str), msg.get("id"))
            {
                let result = match m {
                    "workspace/configuration" => {
                        let n = msg["params"]["items"].as_array().map_or(0, Vec::len);
                        Value::Array(vec![Value::Null; n])
                    }
                    "workspace/workspaceFolders" => json!([]),
                    _ => Value::Null,
                };
                let id = id.clone();
                self.send(json!({"jsonrpc": "2.0", "id": id, "result": result}))
                    .await?;
            }
        }
    }

    async fn request(&mut self, method: &str, params: Value) -> Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        self.send(json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}))
            .await?;
        let r = self
            .until(|m| m.get("method").is_none() && m["id"].as_i64() == Some(id))
            .await?;
        if let Some(e) = r.get("error") {
            bail!("pylsp refused {method}: {e}");
        }
        Ok(r["result"].clone())
    }

    async fn notify(&mut self, method: &str, params: Value) -> Result<()> {
        self.send(json!({"jsonrpc": "2.0", "method": method, "params": params}))
            .await
    }

    /// Sends a new version of `uri` (change + save, as Kiln's session does) and waits for
    /// the diagnostics of that version.
    async fn edit_and_wait(&mut self, uri: &str, version: i64, text: &str) -> Result<Value> {
        self.notify(
            "textDocument/didChange",
            json!({"textDocument": {"uri": uri, "version": version}, "contentChanges": [{"text": text}]}),
        )
        .await?;
        self.notify(
            "textDocument/didSave",
            json!({"textDocument": {"uri": uri}}),
        )
        .await?;
        self.until(|m| {
            m["method"] == "textDocument/publishDiagnostics"
                && m["params"]["uri"] == uri
                && m["params"]["version"].as_i64() >= Some(version)
        })
        .await
    }
}

async fn lsp_bench(
    api: &Api,
    client: &kilnd::client::Client,
    id: &str,
    b: &DevtoolsBench,
) -> Result<Value> {
    progress(b.json, "LSP: pylsp through Kiln and over a raw kilnd Pipe");
    sh_ok(client, "mkdir -p /workspace").await?;
    let write = |path: &'static str, text: String| async move {
        client
            .write_file(path, None, true, std::io::Cursor::new(text.into_bytes()))
            .await
            .map(|_| ())
    };
    write("/workspace/util.py", UTIL_PY.to_string()).await?;
    write("/workspace/main.py", main_py("missing_0")).await?;
    let lsp = |op: &'static str, body: Value| async move {
        let t = Instant::now();
        let v: Value = api
            .json(
                Method::POST,
                &format!("/v1/sandboxes/{id}/lsp/{op}"),
                Some(&body),
            )
            .await?;
        Ok::<_, anyhow::Error>((ms(t.elapsed()), v))
    };
    let def_body = json!({"path": "/workspace/main.py", "line": 3, "column": 7});
    // Warm Kiln's session: start, open both files, first lint and definition.
    let (_, v) = lsp(
        "diagnostics",
        json!({"path": "/workspace/main.py", "wait_ms": 60000}),
    )
    .await?;
    if !v.to_string().contains("missing_0") {
        bail!("pylsp reported no undefined name through Kiln: {v}");
    }
    let (_, v) = lsp("definition", def_body.clone()).await?;
    if v["locations"][0]["path"] != "/workspace/util.py" {
        bail!("definition through Kiln did not find util.py: {v}");
    }

    // The baseline: the same server binary, raw JSON-RPC over a kilnd Pipe.
    let pipe = client
        .pipe(ExecSpec {
            cmd: vec!["pylsp".into()],
            cwd: Some("/workspace".into()),
            tag: Some("lsp-bench".into()),
            ..Default::default()
        })
        .await
        .context("starting pylsp over a kilnd Pipe")?;
    let (rd, wr) = tokio::io::split(pipe);
    let mut d = DirectLsp {
        rd: BufReader::new(rd),
        wr,
        next_id: 0,
    };
    d.request(
        "initialize",
        json!({
            "processId": null, "rootUri": "file:///workspace", "rootPath": "/workspace",
            "workspaceFolders": [{"uri": "file:///workspace", "name": "workspace"}],
            "capabilities": {
                "textDocument": {"synchronization": {"didSave": true},
                                 "publishDiagnostics": {"versionSupport": true}, "definition": {}},
                "workspace": {"configuration": true, "workspaceFolders": true}
            },
            "clientInfo": {"name": "kiln-bench"}
        }),
    )
    .await?;
    d.notify("initialized", json!({})).await?;
    let uri = "file:///workspace/main.py";
    let mut version = 1;
    d.notify(
        "textDocument/didOpen",
        json!({"textDocument": {"uri": uri, "languageId": "python", "version": version, "text": main_py("missing_0")}}),
    )
    .await?;
    d.until(|m| m["method"] == "textDocument/publishDiagnostics" && m["params"]["uri"] == uri)
        .await?;
    let def_params = json!({"textDocument": {"uri": uri}, "position": {"line": 2, "character": 6}});
    let r = d
        .request("textDocument/definition", def_params.clone())
        .await?;
    if !r.to_string().contains("util.py") {
        bail!("definition over the pipe did not find util.py: {r}");
    }

    // Definition, interleaved.
    let (mut kiln_def, mut direct_def) = (Vec::new(), Vec::new());
    for _ in 0..b.n {
        kiln_def.push(lsp("definition", def_body.clone()).await?.0);
        let t = Instant::now();
        d.request("textDocument/definition", def_params.clone())
            .await?;
        direct_def.push(ms(t.elapsed()));
    }
    let def_overhead = paired_overhead(&kiln_def, &direct_def);

    // Diagnostics after an edit, interleaved: Kiln reads the edited file from the sandbox;
    // the baseline sends the new text itself.
    let (mut kiln_diag, mut direct_diag) = (Vec::new(), Vec::new());
    for i in 1..=b.diag_n {
        let missing = format!("missing_{i}");
        write("/workspace/main.py", main_py(&missing)).await?;
        let (t, v) = lsp(
            "diagnostics",
            json!({"path": "/workspace/main.py", "wait_ms": 60000}),
        )
        .await?;
        if !v.to_string().contains(&missing) {
            bail!("diagnostics through Kiln missed the edit: {v}");
        }
        kiln_diag.push(t);
        version += 1;
        let t = Instant::now();
        let m = d.edit_and_wait(uri, version, &main_py(&missing)).await?;
        direct_diag.push(ms(t.elapsed()));
        if !m.to_string().contains(&missing) {
            bail!("diagnostics over the pipe missed the edit: {m}");
        }
    }
    let diag_overhead = paired_overhead(&kiln_diag, &direct_diag);
    drop(d);
    Ok(json!({
        "server": "pylsp",
        "definition_samples": b.n,
        "definition_ms": percentiles(&mut kiln_def),
        "definition_direct_ms": percentiles(&mut direct_def),
        "definition_overhead_ms": def_overhead,
        "diagnostics_samples": b.diag_n,
        "diagnostics_after_edit_ms": percentiles(&mut kiln_diag),
        "diagnostics_after_edit_direct_ms": percentiles(&mut direct_diag),
        "diagnostics_overhead_ms": diag_overhead,
        "pylsp_lint_debounce_ms": 500,
    }))
}

// ---------------------------------------------------------------------------------------
// SSH

async fn ssh_bench(
    kiln: &Arc<kiln_server::Kiln>,
    api: &Api,
    client: &kilnd::client::Client,
    id: &str,
    b: &DevtoolsBench,
    data: &Path,
) -> Result<Value> {
    progress(
        b.json,
        "SSH: connect-and-exec `true` with the OpenSSH client",
    );
    let listening = kiln
        .ssh
        .get()
        .ok_or_else(|| anyhow!("the SSH front door did not start"))?
        .clone();
    let dir = data.join("ssh-bench");
    std::fs::create_dir_all(&dir)?;
    let key = dir.join("id_ed25519");
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "kiln-bench", "-f"])
        .arg(&key)
        .stdin(Stdio::null())
        .status()
        .context("ssh-keygen (hint: install openssh-client, scripts/install-deps.sh does)")?;
    if !st.success() {
        bail!("ssh-keygen failed");
    }
    let public = std::fs::read_to_string(key.with_extension("pub"))?;
    let added: Value = api
        .json(
            Method::POST,
            "/v1/ssh-keys",
            Some(&json!({"public_key": public.trim(), "name": "bench"})),
        )
        .await?;
    let known = dir.join("known_hosts");
    let port = listening.addr.port();
    std::fs::write(
        &known,
        format!("[127.0.0.1]:{port} {}\n", listening.host_key),
    )?;
    let args: Vec<String> = vec![
        "-p".into(),
        port.to_string(),
        "-i".into(),
        key.display().to_string(),
        "-o".into(),
        "IdentitiesOnly=yes".into(),
        "-o".into(),
        "BatchMode=yes".into(),
        "-o".into(),
        format!("UserKnownHostsFile={}", known.display()),
        "-o".into(),
        "StrictHostKeyChecking=yes".into(),
        "-o".into(),
        "LogLevel=ERROR".into(),
        "-F".into(),
        "/dev/null".into(),
        format!("{id}@127.0.0.1"),
        "true".into(),
    ];
    let (mut ssh_t, mut exec_t) = (Vec::new(), Vec::new());
    for _ in 0..b.ssh_n {
        let a = args.clone();
        let (elapsed, st) = tokio::task::spawn_blocking(move || {
            let t = Instant::now();
            let out = Command::new("ssh").args(&a).stdin(Stdio::null()).output();
            (t.elapsed(), out)
        })
        .await?;
        let out = st.context("running ssh")?;
        if !out.status.success() {
            bail!(
                "ssh exited with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        ssh_t.push(ms(elapsed));
        let t = Instant::now();
        sh_ok(client, "true").await?;
        exec_t.push(ms(t.elapsed()));
    }
    if let Some(kid) = added["id"].as_str() {
        api.empty(Method::DELETE, &format!("/v1/ssh-keys/{kid}"))
            .await?;
    }
    Ok(json!({
        "samples": b.ssh_n,
        "connect_exec_true_ms": percentiles(&mut ssh_t),
        "kilnd_exec_true_ms": percentiles(&mut exec_t),
    }))
}

// ---------------------------------------------------------------------------------------
// Previews

/// One `GET /index.html` over `io` (HTTP/1.1, `Connection: close`), read to the end.
async fn raw_get<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut io: S,
) -> Result<usize> {
    io.write_all(b"GET /index.html HTTP/1.1\r\nHost: localhost:8080\r\nConnection: close\r\n\r\n")
        .await?;
    let mut buf = Vec::new();
    io.read_to_end(&mut buf).await?;
    if !buf.starts_with(b"HTTP/1.") || !buf.windows(10).any(|w| w == b"kiln-bench") {
        bail!(
            "unexpected answer: {}",
            String::from_utf8_lossy(&buf[..buf.len().min(200)])
        );
    }
    Ok(buf.len())
}

async fn preview_bench(
    api: &Api,
    client: &kilnd::client::Client,
    sb: &Sandbox,
    b: &DevtoolsBench,
) -> Result<Value> {
    progress(
        b.json,
        "preview: python3 -m http.server through Kiln, a kilnd tunnel and the host",
    );
    sh_ok(
        client,
        "mkdir -p /tmp/www && printf '<html><body>kiln-bench</body></html>\\n' > /tmp/www/index.html",
    )
    .await?;
    let started = client
        .exec(ExecSpec {
            cmd: [
                "python3",
                "-m",
                "http.server",
                "8080",
                "--bind",
                "0.0.0.0",
                "--directory",
                "/tmp/www",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            detach: true,
            tag: Some("bench-http".into()),
            ..Default::default()
        })
        .await?;
    drop(started);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !client.list_ports().await?.iter().any(|p| p.port == 8080) {
        if Instant::now() > deadline {
            bail!("python3 -m http.server did not listen within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ip = sb
        .ip
        .clone()
        .ok_or_else(|| anyhow!("the sandbox has no address (network full expected)"))?;
    let host_addr: std::net::SocketAddr = format!("{ip}:8080").parse()?;
    let path = format!("/v1/sandboxes/{}/ports/8080/index.html", sb.id);
    // Warm every path once.
    api.send(api.request(Method::GET, &path)).await?;
    raw_get(client.connect(8080, None).await?).await?;
    raw_get(tokio::net::TcpStream::connect(host_addr).await?).await?;
    let (mut proxy, mut tunnel, mut host) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..b.n {
        let t = Instant::now();
        let body = api
            .send(api.request(Method::GET, &path))
            .await?
            .bytes()
            .await?;
        proxy.push(ms(t.elapsed()));
        if !body.windows(10).any(|w| w == b"kiln-bench") {
            bail!("the preview answered something else");
        }
        let t = Instant::now();
        raw_get(client.connect(8080, None).await?).await?;
        tunnel.push(ms(t.elapsed()));
        let t = Instant::now();
        let s = tokio::net::TcpStream::connect(host_addr).await?;
        s.set_nodelay(true)?;
        raw_get(s).await?;
        host.push(ms(t.elapsed()));
    }
    let overhead = paired_overhead(&proxy, &tunnel);
    let (pp, tp, hp) = (
        percentiles(&mut proxy),
        percentiles(&mut tunnel),
        percentiles(&mut host),
    );
    Ok(json!({
        "samples": b.n,
        "server": "python3 -m http.server",
        "proxy_ms": pp,
        "tunnel_direct_ms": tp,
        "host_direct_ms": hp,
        "overhead_vs_tunnel_ms": overhead,
        "ratio_vs_tunnel": ratio(&pp, &tp),
        "ratio_vs_host": ratio(&pp, &hp),
    }))
}

// ---------------------------------------------------------------------------------------
// git clone

/// A repository of `files` small files in `dir`, one commit (the same script in the sandbox
/// and on the host).
fn repo_script(dir: &str, files: usize) -> String {
    format!(
        "set -e; rm -rf {dir}; mkdir -p {dir}/src; cd {dir}; git init -q -b main .; \
         i=0; while [ $i -lt {files} ]; do printf 'def f%d():\\n    return %d\\n' $i $i > src/m$i.py; i=$((i+1)); done; \
         git add -A; git -c user.name=bench -c user.email=bench@kiln.invalid commit -q -m init"
    )
}

async fn clone_bench(
    api: &Api,
    client: &kilnd::client::Client,
    id: &str,
    b: &DevtoolsBench,
    data: &Path,
) -> Result<Value> {
    progress(
        b.json,
        &format!(
            "git clone of a local repository ({} files): sandbox vs host",
            b.clone_files
        ),
    );
    sh_ok(client, &repo_script("/tmp/bench-src", b.clone_files)).await?;
    // Two host baselines: a directory next to the data dir (the host's disk, which other
    // writers on the machine slow down), and tmpfs (no disk at all: the floor).
    let shm = PathBuf::from(format!(
        "/dev/shm/kiln-bench-devtools-{}",
        std::process::id()
    ));
    let result = host_clones(api, client, id, b, data, &shm).await;
    let _ = std::fs::remove_dir_all(&shm);
    result
}

fn host_repo(dir: &Path, files: usize) -> Result<PathBuf> {
    let src = dir.join("bench-src");
    std::fs::create_dir_all(dir)?;
    let out = Command::new("sh")
        .args(["-c", &repo_script(&src.display().to_string(), files)])
        .output()
        .context("git on the host")?;
    if !out.status.success() {
        bail!(
            "making the host repository failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(src)
}

/// `git clone -q SRC DST` on the host, timed; DST is removed afterwards (not timed).
async fn host_clone(src: &Path, dst: PathBuf) -> Result<f64> {
    let src = src.to_path_buf();
    let (elapsed, out) = tokio::task::spawn_blocking(move || {
        let t = Instant::now();
        let out = Command::new("git")
            .args(["clone", "-q"])
            .arg(&src)
            .arg(&dst)
            .output();
        let elapsed = t.elapsed();
        let _ = std::fs::remove_dir_all(&dst);
        (elapsed, out)
    })
    .await?;
    let out = out.context("git clone on the host")?;
    if !out.status.success() {
        bail!(
            "git clone on the host failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(ms(elapsed))
}

async fn host_clones(
    api: &Api,
    client: &kilnd::client::Client,
    id: &str,
    b: &DevtoolsBench,
    data: &Path,
    shm: &Path,
) -> Result<Value> {
    let disk_src = host_repo(data, b.clone_files)?;
    let shm_src = host_repo(shm, b.clone_files)?;
    let (mut sandbox, mut via_api, mut host, mut tmpfs) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..b.clone_n {
        let t = Instant::now();
        sh_ok(
            client,
            &format!("git clone -q /tmp/bench-src /tmp/bench-dst-{i}"),
        )
        .await?;
        sandbox.push(ms(t.elapsed()));
        let t = Instant::now();
        let _: Value = api
            .json(
                Method::POST,
                &format!("/v1/sandboxes/{id}/git/clone"),
                Some(&json!({"url": "/tmp/bench-src", "repo": "/tmp", "dir": format!("bench-api-{i}")})),
            )
            .await?;
        via_api.push(ms(t.elapsed()));
        host.push(host_clone(&disk_src, data.join(format!("bench-dst-{i}"))).await?);
        tmpfs.push(host_clone(&shm_src, shm.join(format!("bench-dst-{i}"))).await?);
        // Clean up outside the timed part.
        sh_ok(
            client,
            &format!("rm -rf /tmp/bench-dst-{i} /tmp/bench-api-{i}"),
        )
        .await?;
    }
    let (sp, ap, hp, tp) = (
        percentiles(&mut sandbox),
        percentiles(&mut via_api),
        percentiles(&mut host),
        percentiles(&mut tmpfs),
    );
    Ok(json!({
        "samples": b.clone_n,
        "files": b.clone_files,
        "sandbox_ms": sp,
        "api_ms": ap,
        "host_ms": hp,
        "host_tmpfs_ms": tp,
        "ratio_sandbox_vs_host": ratio(&sp, &hp),
        "ratio_sandbox_vs_host_tmpfs": ratio(&sp, &tp),
        "ratio_api_vs_host": ratio(&ap, &hp),
    }))
}
