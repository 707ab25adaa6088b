//! `kiln sandbox ...` and `kiln run`: create, exec (streamed), ls, rm, pause, resume, cp, shell.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use kiln_protocol::api::{
    CreateSandbox, DurationArg, ExecEvent, ExecRequest, ExitStatus, FileStat, NetworkMode, Sandbox,
    SandboxList, SizeArg,
};
use reqwest::Method;

use crate::api::Api;
use crate::Global;

#[derive(Subcommand)]
pub enum SandboxCmd {
    /// Create a sandbox and print its id
    Create(CreateArgs),
    /// Run a command in a sandbox, streaming its output; exits with its exit code
    Exec(ExecArgs),
    /// List sandboxes
    Ls {
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// Show one sandbox
    Get {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove sandboxes (kills everything in them)
    Rm {
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Freeze every process of a sandbox
    Pause { id: String },
    /// Thaw a paused sandbox
    Resume { id: String },
    /// Open an interactive shell (PTY) in a sandbox
    Shell(crate::shell::ShellArgs),
    /// Copy a file between this machine and a sandbox: either side may be `ID:/path`
    Cp { src: String, dst: String },
}

/// Resources and options of a new sandbox.
#[derive(Args, Clone, Debug)]
pub struct CreateArgs {
    /// Template to start from
    #[arg(long, default_value = "base")]
    pub template: String,
    /// vCPUs (fractions allowed) [server default: 1]
    #[arg(long)]
    pub cpus: Option<f64>,
    /// Memory limit, e.g. 512M, 2G [server default: 512M]
    #[arg(long)]
    pub memory: Option<String>,
    /// Writable disk limit, e.g. 2G [server default: 2G]
    #[arg(long)]
    pub disk: Option<String>,
    /// Network access: none (loopback only) or full (NAT to the host's uplink)
    /// [default: none, or full with --allow-domain/--allow-cidr]
    #[arg(long, value_parser = ["none", "full"])]
    pub network: Option<String>,
    /// Egress allow-list: this domain (`pypi.org`, `*.github.com`) is reachable; implies
    /// --network full (repeatable; everything not listed is refused)
    #[arg(long = "allow-domain", value_name = "DOMAIN")]
    pub allow_domains: Vec<String>,
    /// Egress allow-list: this IPv4 network (`10.0.0.0/8`) is reachable (repeatable)
    #[arg(long = "allow-cidr", value_name = "CIDR")]
    pub allow_cidrs: Vec<String>,
    /// Remove automatically after this long, e.g. 10m, 1h
    #[arg(long)]
    pub ttl: Option<String>,
    /// Label KEY=VALUE (repeatable)
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// Never claim a warm-pool sandbox; always create a new one
    #[arg(long)]
    pub no_pool: bool,
    /// Print JSON
    #[arg(long)]
    pub json: bool,
}

impl CreateArgs {
    /// The API request, validating sizes and durations locally for an immediate, clear error.
    pub fn request(&self) -> Result<CreateSandbox> {
        if let Some(m) = &self.memory {
            kiln_server::units::parse_size(m).map_err(|e| anyhow!("--memory: {e}"))?;
        }
        if let Some(d) = &self.disk {
            kiln_server::units::parse_size(d).map_err(|e| anyhow!("--disk: {e}"))?;
        }
        if let Some(t) = &self.ttl {
            kiln_server::units::parse_duration(t).map_err(|e| anyhow!("--ttl: {e}"))?;
        }
        let mut labels = std::collections::BTreeMap::new();
        for l in &self.labels {
            let (k, v) = l
                .split_once('=')
                .ok_or_else(|| anyhow!("--label `{l}` must look like KEY=VALUE"))?;
            labels.insert(k.to_string(), v.to_string());
        }
        let egress = (!self.allow_domains.is_empty() || !self.allow_cidrs.is_empty()).then(|| {
            kiln_protocol::api::EgressAllowList {
                domains: self.allow_domains.clone(),
                cidrs: self.allow_cidrs.clone(),
            }
        });
        if egress.is_some() && self.network.as_deref() == Some("none") {
            return Err(anyhow!(
                "--allow-domain/--allow-cidr need --network full (they restrict a full network)"
            ));
        }
        Ok(CreateSandbox {
            template: Some(self.template.clone()),
            cpus: self.cpus,
            memory: self.memory.clone().map(SizeArg::Text),
            disk: self.disk.clone().map(SizeArg::Text),
            network: match self.network.as_deref() {
                Some("full") => Some(NetworkMode::Full),
                Some(_) => Some(NetworkMode::None),
                None if egress.is_some() => Some(NetworkMode::Full),
                None => Some(NetworkMode::None),
            },
            ttl: self.ttl.clone().map(DurationArg::Text),
            labels,
            pool: if self.no_pool { Some(false) } else { None },
            egress,
        })
    }
}

#[derive(Args, Debug)]
pub struct ExecArgs {
    pub id: String,
    #[command(flatten)]
    pub opts: ExecOpts,
    /// The command and its arguments
    #[arg(last = true, required = true)]
    pub cmd: Vec<String>,
}

#[derive(Args, Clone, Debug)]
pub struct ExecOpts {
    /// Working directory inside the sandbox
    #[arg(long)]
    pub cwd: Option<String>,
    /// Environment variable KEY=VALUE (repeatable)
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// User to run as (name or uid)
    #[arg(long, short = 'u')]
    pub user: Option<String>,
    /// Kill the command after this many seconds (exit code 124)
    #[arg(long)]
    pub timeout: Option<f64>,
    /// Forward this terminal's stdin to the command
    #[arg(long, short = 'i')]
    pub interactive: bool,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub create: CreateArgs,
    #[command(flatten)]
    pub opts: ExecOpts,
    /// The command and its arguments
    #[arg(last = true, required = true)]
    pub cmd: Vec<String>,
}

pub async fn run(g: &Global, cmd: SandboxCmd) -> Result<i32> {
    let api = g.api();
    match cmd {
        SandboxCmd::Create(a) => {
            let sb = create(&api, &a).await?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&sb)?);
            } else {
                println!("{}", sb.id);
            }
            Ok(0)
        }
        SandboxCmd::Exec(a) => exec(&api, &a.id, &a.opts, a.cmd).await,
        SandboxCmd::Ls { json } => {
            let list: SandboxList = api.json(Method::GET, "/v1/sandboxes", None::<&()>).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print_table(&list.sandboxes);
            }
            Ok(0)
        }
        SandboxCmd::Get { id, json } => {
            let sb: Sandbox = api
                .json(
                    Method::GET,
                    &format!("/v1/sandboxes/{}", check_id(&id)?),
                    None::<&()>,
                )
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&sb)?);
            } else {
                print_table(std::slice::from_ref(&sb));
            }
            Ok(0)
        }
        SandboxCmd::Rm { ids } => {
            let mut failed = 0;
            for id in ids {
                match api
                    .empty(Method::DELETE, &format!("/v1/sandboxes/{}", check_id(&id)?))
                    .await
                {
                    Ok(()) => println!("{id}"),
                    Err(e) => {
                        eprintln!("error: {e}");
                        failed += 1;
                    }
                }
            }
            Ok(if failed > 0 {
                crate::EXIT_KILN_ERROR
            } else {
                0
            })
        }
        SandboxCmd::Pause { id } => {
            let sb: Sandbox = api
                .json(
                    Method::POST,
                    &format!("/v1/sandboxes/{}/pause", check_id(&id)?),
                    None::<&()>,
                )
                .await?;
            println!("{} {}", sb.id, state_name(&sb));
            Ok(0)
        }
        SandboxCmd::Resume { id } => {
            let sb: Sandbox = api
                .json(
                    Method::POST,
                    &format!("/v1/sandboxes/{}/resume", check_id(&id)?),
                    None::<&()>,
                )
                .await?;
            println!("{} {}", sb.id, state_name(&sb));
            Ok(0)
        }
        SandboxCmd::Shell(a) => crate::shell::run(&api, a).await,
        SandboxCmd::Cp { src, dst } => cp(&api, &src, &dst).await,
    }
}

/// Sandbox ids are `[a-z0-9-]`; anything else is refused before a request is made.
fn check_id(id: &str) -> Result<&str> {
    if id.is_empty()
        || id.len() > 64
        || !id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        bail!("`{id}` is not a sandbox id (hint: ids look like sb-1a2b3c4d5e6f; list them with `kiln sandbox ls`)");
    }
    Ok(id)
}

fn state_name(sb: &Sandbox) -> String {
    serde_json::to_value(sb.state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn print_table(list: &[Sandbox]) {
    println!(
        "{:<16} {:<10} {:<8} {:>5} {:>7} {:>6} {:<7} {:<20}",
        "ID", "TEMPLATE", "STATE", "CPUS", "MEMORY", "DISK", "NETWORK", "EXPIRES"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    for s in list {
        let expires = match s.expires_at_ms {
            Some(t) if t > now => format!("in {}", humanize((t - now) / 1000)),
            Some(_) => "expired".into(),
            None => "-".into(),
        };
        println!(
            "{:<16} {:<10} {:<8} {:>5} {:>7} {:>6} {:<7} {:<20}",
            s.id,
            s.template,
            state_name(s),
            s.cpus,
            kiln_server::units::format_size(s.memory_bytes),
            kiln_server::units::format_size(s.disk_bytes),
            if s.network == NetworkMode::Full {
                "full"
            } else {
                "none"
            },
            expires
        );
    }
}

fn humanize(secs: u64) -> String {
    if secs >= 3600 {
        format!("{}h{}m", secs / 3600, (secs % 3600) / 60)
    } else if secs >= 60 {
        format!("{}m{}s", secs / 60, secs % 60)
    } else {
        format!("{secs}s")
    }
}

pub async fn create(api: &Api, a: &CreateArgs) -> Result<Sandbox> {
    let req = a.request()?;
    api.json(Method::POST, "/v1/sandboxes", Some(&req)).await
}

fn exec_request(opts: &ExecOpts, cmd: Vec<String>) -> Result<ExecRequest> {
    let mut env = std::collections::BTreeMap::new();
    for e in &opts.env {
        let (k, v) = e
            .split_once('=')
            .ok_or_else(|| anyhow!("--env `{e}` must look like KEY=VALUE"))?;
        env.insert(k.to_string(), v.to_string());
    }
    if let Some(t) = opts.timeout {
        if !(t.is_finite() && t > 0.0) {
            bail!("--timeout must be a positive number of seconds, got {t}");
        }
    }
    Ok(ExecRequest {
        cmd,
        env,
        cwd: opts.cwd.clone(),
        user: opts.user.clone(),
        timeout_secs: opts.timeout,
        stdin_b64: None,
        keep_stdin_open: opts.interactive,
        tag: None,
    })
}

/// The exit code a shell would report for a sandbox process's end.
pub fn exit_code(st: &ExitStatus) -> i32 {
    if st.timed_out {
        124
    } else if let Some(c) = st.exit_code {
        c
    } else if let Some(s) = st.signal {
        128 + s
    } else {
        crate::EXIT_KILN_ERROR
    }
}

/// Runs a command, streaming stdout/stderr to ours; returns its exit code.
pub async fn exec(api: &Api, id: &str, opts: &ExecOpts, cmd: Vec<String>) -> Result<i32> {
    let req = exec_request(opts, cmd)?;
    let resp = api
        .send(
            api.request(
                Method::POST,
                &format!("/v1/sandboxes/{}/exec", check_id(id)?),
            )
            .json(&req),
        )
        .await?;
    let mut code: Option<i32> = None;
    let mut stdin_task: Option<tokio::task::JoinHandle<()>> = None;
    let mut err: Option<String> = None;
    api.each_event(resp, |ev| {
        match ev {
            ExecEvent::Started { pid, .. } => {
                if opts.interactive {
                    stdin_task = Some(tokio::spawn(forward_stdin(
                        api.clone(),
                        id.to_string(),
                        pid,
                    )));
                }
            }
            ExecEvent::Stdout { data, .. } => {
                let mut o = std::io::stdout().lock();
                o.write_all(&data)?;
                o.flush()?;
            }
            ExecEvent::Stderr { data, .. } => {
                let mut e = std::io::stderr().lock();
                e.write_all(&data)?;
                e.flush()?;
            }
            ExecEvent::Gap { from, to } => {
                eprintln!("kiln: output {from}..{to} was dropped from the buffer")
            }
            ExecEvent::Exit(st) => {
                if st.timed_out {
                    eprintln!("kiln: command timed out and was killed");
                }
                code = Some(exit_code(&st));
                return Ok(false);
            }
            ExecEvent::Error(e) => {
                err = Some(match e.hint {
                    Some(h) => format!("{} (hint: {h})", e.message),
                    None => e.message,
                });
                return Ok(false);
            }
        }
        Ok(true)
    })
    .await?;
    if let Some(t) = stdin_task {
        t.abort();
    }
    if let Some(e) = err {
        bail!(e);
    }
    code.ok_or_else(|| {
        anyhow!(
            "the exec stream ended before the command finished (the sandbox may have been removed)"
        )
    })
}

async fn forward_stdin(api: Api, id: String, pid: String) {
    use tokio::io::AsyncReadExt;
    let mut stdin = tokio::io::stdin();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = stdin.read(&mut buf).await.unwrap_or(0);
        let close = n == 0;
        let path = format!(
            "/v1/sandboxes/{id}/processes/{pid}/stdin{}",
            if close { "?close=true" } else { "" }
        );
        let rb = api.request(Method::POST, &path).body(buf[..n].to_vec());
        if api.send(rb).await.is_err() || close {
            return;
        }
    }
}

/// `kiln run`: create, exec, remove (always), exit with the command's code.
pub async fn run_once(g: &Global, a: RunArgs) -> Result<i32> {
    let api = g.api();
    let sb = create(&api, &a.create).await?;
    let result = exec(&api, &sb.id, &a.opts, a.cmd).await;
    let removed = api
        .empty(Method::DELETE, &format!("/v1/sandboxes/{}", sb.id))
        .await;
    let code = result?;
    removed.with_context(|| {
        format!(
            "the command finished but sandbox {} could not be removed",
            sb.id
        )
    })?;
    Ok(code)
}

/// `ID:/path` -> (id, path).
fn remote(s: &str) -> Option<(&str, &str)> {
    let (id, path) = s.split_once(':')?;
    (id.starts_with("sb-") || (!id.contains('/') && !id.is_empty() && path.starts_with('/')))
        .then_some((id, path))
}

async fn cp(api: &Api, src: &str, dst: &str) -> Result<i32> {
    match (remote(src), remote(dst)) {
        (Some(_), Some(_)) => bail!("copy between two sandboxes is not supported (hint: copy to this machine first)"),
        (None, None) => bail!("one side of `kiln sandbox cp` must be ID:/path (hint: kiln sandbox cp ./file sb-xxx:/workspace/file)"),
        (None, Some((id, path))) => {
            let local = PathBuf::from(src);
            let md = tokio::fs::metadata(&local).await.with_context(|| format!("cannot read {src}"))?;
            if md.is_dir() {
                bail!("{src} is a directory; cp copies single files (hint: tar it, copy the archive, untar with exec)");
            }
            let mut path = path.to_string();
            if path.ends_with('/') {
                let name = local.file_name().and_then(|n| n.to_str()).unwrap_or("file");
                path.push_str(name);
            }
            use std::os::unix::fs::PermissionsExt;
            let mode = format!("{:o}", md.permissions().mode() & 0o7777);
            let file = tokio::fs::File::open(&local).await.with_context(|| format!("cannot open {src}"))?;
            let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024));
            let rb = api
                .request(Method::PUT, &format!("/v1/sandboxes/{}/files", check_id(id)?))
                .query(&[("path", path.as_str()), ("mode", mode.as_str()), ("parents", "true")])
                .header(reqwest::header::CONTENT_LENGTH, md.len())
                .body(body);
            let st: FileStat = api.send(rb).await?.json().await?;
            eprintln!("{} bytes -> {id}:{}", st.size, st.path);
            Ok(0)
        }
        (Some((id, path)), None) => {
            let rb = api.request(Method::GET, &format!("/v1/sandboxes/{}/files", check_id(id)?)).query(&[("path", path)]);
            let resp = api.send(rb).await?;
            let mut local = PathBuf::from(dst);
            if local.is_dir() {
                let name = std::path::Path::new(path).file_name().map(|n| n.to_owned()).unwrap_or_default();
                local.push(name);
            }
            let tmp = local.with_extension("kiln-partial");
            let mut f = tokio::fs::File::create(&tmp).await.with_context(|| format!("cannot write {}", tmp.display()))?;
            let mut stream = resp.bytes_stream();
            let mut total = 0u64;
            use futures_util::StreamExt;
            use tokio::io::AsyncWriteExt;
            while let Some(chunk) = stream.next().await {
                let chunk = match chunk {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = tokio::fs::remove_file(&tmp).await;
                        bail!("download broke after {total} bytes: {e}");
                    }
                };
                total += chunk.len() as u64;
                f.write_all(&chunk).await?;
            }
            f.flush().await?;
            drop(f);
            tokio::fs::rename(&tmp, &local).await.with_context(|| format!("cannot write {}", local.display()))?;
            eprintln!("{id}:{path} -> {} ({total} bytes)", local.display());
            Ok(0)
        }
    }
}
