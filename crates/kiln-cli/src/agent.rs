//! `kiln agent run|ls|show|logs|approve|stop|replay`: agent runs through `/v1/agents`. `run`
//! prepares a sandbox (a copy of `--path DIR` or a clone of `--git URL` in /workspace),
//! streams a readable transcript (or JSONL events with `--json`), shows the changes as a diff
//! and writes them back to DIR only with `--apply`; it exits 0 only when the run succeeded.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use futures_util::StreamExt;
use kiln_agent::events::{Event, EventKind};
use kiln_protocol::api::{CreateSandbox, NetworkMode, Sandbox};
use reqwest::Method;
use serde_json::{json, Value};

use crate::api::Api;
use crate::Global;

#[derive(Subcommand, Debug)]
pub enum AgentCmd {
    /// Run an agent on a task in a fresh sandbox and stream its transcript
    Run(RunArgs),
    /// List agent runs
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// A run's state, totals (steps, tokens, cost, model time, tool errors) and sub-agents
    Show {
        run: String,
        #[arg(long)]
        json: bool,
    },
    /// A run's events (`--follow` streams until it finishes)
    Logs {
        run: String,
        #[arg(long, short)]
        follow: bool,
        #[arg(long)]
        json: bool,
    },
    /// Answer a pending approval (approves unless --deny)
    Approve {
        run: String,
        call_id: String,
        #[arg(long)]
        deny: bool,
    },
    /// Stop a run and its sub-agents
    Stop { run: String },
    /// Re-render a whole run from its event log, with time offsets
    Replay {
        run: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// What the agent should do
    pub task: String,
    /// Agent profile: coder, planner, reviewer, tester or one from the agent config
    #[arg(long, default_value = "coder")]
    pub profile: String,
    /// Sandbox template
    #[arg(long, default_value = "base")]
    pub template: String,
    /// Copy this directory into /workspace (changes come back only with --apply)
    #[arg(long, conflicts_with = "git")]
    pub path: Option<PathBuf>,
    /// Clone this repository into /workspace (gives the sandbox network access)
    #[arg(long)]
    pub git: Option<String>,
    /// Model as provider/model, e.g. ollama/qwen2.5-coder:7b [default: the profile's]
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Hard cost cap in USD (prices come from the agent config)
    #[arg(long)]
    pub max_cost: Option<f64>,
    /// Hard wall-time cap, e.g. 10m
    #[arg(long)]
    pub max_time: Option<String>,
    /// Write the agent's changes back to --path DIR
    #[arg(long, requires = "path")]
    pub apply: bool,
    /// Keep the sandbox afterwards (its id is printed)
    #[arg(long)]
    pub keep: bool,
    /// Print events as JSON lines instead of a transcript
    #[arg(long)]
    pub json: bool,
}

pub async fn run(g: &Global, cmd: AgentCmd) -> Result<i32> {
    let api = g.api();
    match cmd {
        AgentCmd::Run(a) => run_agent(&api, a).await,
        AgentCmd::Ls { json } => ls(&api, json).await,
        AgentCmd::Show { run, json } => show(&api, &run, json).await,
        AgentCmd::Logs { run, follow, json } => {
            follow_events(&api, &run, 0, follow, json, false).await?;
            Ok(0)
        }
        AgentCmd::Approve { run, call_id, deny } => {
            api.send(
                api.request(
                    Method::POST,
                    &format!("/v1/agents/{run}/approvals/{call_id}"),
                )
                .json(&json!({"approve": !deny})),
            )
            .await?;
            println!(
                "{} {call_id} of {run}",
                if deny { "denied" } else { "approved" }
            );
            Ok(0)
        }
        AgentCmd::Stop { run } => {
            api.empty(Method::POST, &format!("/v1/agents/{run}/stop"))
                .await?;
            println!("stopping {run}");
            Ok(0)
        }
        AgentCmd::Replay { run, json } => {
            follow_events(&api, &run, 0, false, json, true).await?;
            Ok(0)
        }
    }
}

/// Streams a run's events, printing each; returns the finished event's (reason, success).
async fn follow_events(
    api: &Api,
    run: &str,
    after: u64,
    follow: bool,
    json: bool,
    offsets: bool,
) -> Result<Option<(String, bool)>> {
    let resp = api
        .send(api.request(
            Method::GET,
            &format!("/v1/agents/{run}/events?after={after}&follow={follow}"),
        ))
        .await?;
    let mut stream = resp.bytes_stream();
    let mut buf: Vec<u8> = Vec::new();
    let mut start = None;
    let mut end = None;
    let mut out = std::io::stdout().lock();
    while let Some(chunk) = stream.next().await {
        buf.extend_from_slice(&chunk.map_err(|e| anyhow!("the event stream broke: {e}"))?);
        while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            let ev: Event = serde_json::from_slice(&line)
                .map_err(|e| anyhow!("malformed event from the server: {e}"))?;
            if let EventKind::Finished {
                reason, success, ..
            } = &ev.kind
            {
                end = Some((reason.clone(), *success));
            }
            if json {
                writeln!(out, "{}", String::from_utf8_lossy(&line).trim_end())?;
            } else if let Some(text) = kiln_agent::runner::render(&ev) {
                let t0 = *start.get_or_insert(ev.time_ms);
                if offsets {
                    writeln!(out, "[+{:>7.2}s] {text}", (ev.time_ms - t0) as f64 / 1000.0)?;
                } else {
                    writeln!(out, "{text}")?;
                }
            }
            out.flush()?;
        }
    }
    Ok(end)
}

async fn create_sandbox(api: &Api, template: &str, network: bool) -> Result<Sandbox> {
    let req = CreateSandbox {
        template: Some(template.into()),
        network: network.then_some(NetworkMode::Full),
        ..CreateSandbox::default()
    };
    api.json(Method::POST, "/v1/sandboxes", Some(&req)).await
}

async fn sh(api: &Api, sb: &str, script: &str) -> Result<(i32, String)> {
    sh_timeout(api, sb, script, None).await
}

/// Runs `sh -c script` in a sandbox (killed after `timeout_secs`); returns the exit code
/// (124 when it timed out) and stdout and stderr interleaved.
pub(crate) async fn sh_timeout(
    api: &Api,
    sb: &str,
    script: &str,
    timeout_secs: Option<f64>,
) -> Result<(i32, String)> {
    let resp = api
        .send(
            api.request(Method::POST, &format!("/v1/sandboxes/{sb}/exec"))
                .json(&json!({"cmd": ["sh", "-c", script], "timeout_secs": timeout_secs})),
        )
        .await?;
    let mut out = String::new();
    let mut code = -1;
    api.each_event(resp, |e| {
        match e {
            kiln_protocol::api::ExecEvent::Stdout { data, .. }
            | kiln_protocol::api::ExecEvent::Stderr { data, .. } => {
                out.push_str(&String::from_utf8_lossy(&data))
            }
            kiln_protocol::api::ExecEvent::Exit(st) => {
                code = if st.timed_out {
                    124
                } else {
                    st.exit_code.unwrap_or(-1)
                }
            }
            _ => {}
        }
        Ok(true)
    })
    .await?;
    Ok((code, out))
}

fn tar_dir(dir: &Path) -> Result<Vec<u8>> {
    let out = std::process::Command::new("tar")
        .arg("-C")
        .arg(dir)
        .args(["--exclude=./.git", "-cf", "-", "."])
        .output()
        .context("cannot run tar")?;
    if !out.status.success() {
        bail!(
            "tar of {} failed: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

pub(crate) async fn upload(api: &Api, sb: &str, path: &str, data: Vec<u8>) -> Result<()> {
    api.send(
        api.request(
            Method::PUT,
            &format!("/v1/sandboxes/{sb}/files?path={path}&parents=true"),
        )
        .body(data),
    )
    .await?;
    Ok(())
}

async fn prepare(api: &Api, sb: &str, a: &RunArgs) -> Result<()> {
    if let Some(dir) = &a.path {
        if !dir.is_dir() {
            bail!("--path {} is not a directory (hint: pass the project directory to copy into /workspace)", dir.display());
        }
        upload(api, sb, "/tmp/kiln-in.tar", tar_dir(dir)?).await?;
        let (code, out) = sh(
            api,
            sb,
            "mkdir -p /workspace /tmp/kiln-base && tar -xf /tmp/kiln-in.tar -C /workspace && tar -xf /tmp/kiln-in.tar -C /tmp/kiln-base && rm /tmp/kiln-in.tar",
        )
        .await?;
        if code != 0 {
            bail!(
                "copying {} into the sandbox failed: {}",
                dir.display(),
                out.trim()
            );
        }
    }
    if let Some(url) = &a.git {
        api.send(
            api.request(Method::POST, &format!("/v1/sandboxes/{sb}/git/clone"))
                .json(&json!({"url": url, "dir": "/workspace"})),
        )
        .await
        .with_context(|| format!("cloning {url}"))?;
    }
    Ok(())
}

/// Shows the agent's changes under --path and, with --apply, writes them back.
async fn diff_back(api: &Api, sb: &str, dir: &Path, apply: bool) -> Result<()> {
    let (_, diff) = sh(
        api,
        sb,
        "cd / && diff -ruN --exclude=.git tmp/kiln-base workspace",
    )
    .await?;
    if diff.trim().is_empty() {
        println!("no changes");
        return Ok(());
    }
    println!("{diff}");
    if !apply {
        println!(
            "(not applied: rerun with --apply to write these changes to {})",
            dir.display()
        );
        return Ok(());
    }
    let (code, out) = sh(api, sb, "cd /workspace && tar --exclude=./.git -cf /tmp/kiln-out.tar . && cd / && diff -rq --exclude=.git tmp/kiln-base workspace | sed -n 's|^Only in tmp/kiln-base\\(.*\\): \\(.*\\)$|\\1/\\2|p'").await?;
    if code != 0 {
        bail!("packing the changes failed: {}", out.trim());
    }
    let resp = api
        .send(api.request(
            Method::GET,
            &format!("/v1/sandboxes/{sb}/files?path=/tmp/kiln-out.tar"),
        ))
        .await?;
    let bytes = resp
        .bytes()
        .await
        .map_err(|e| anyhow!("download failed: {e}"))?;
    let mut child = std::process::Command::new("tar")
        .arg("-C")
        .arg(dir)
        .args(["-xf", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .context("cannot run tar")?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(&bytes)?;
    }
    if !child.wait()?.success() {
        bail!("unpacking the changes into {} failed", dir.display());
    }
    for rel in out.lines().filter(|l| !l.trim().is_empty()) {
        let p = dir.join(rel.trim_start_matches('/'));
        if p.is_dir() {
            std::fs::remove_dir_all(&p)?;
        } else if p.exists() {
            std::fs::remove_file(&p)?;
        }
    }
    println!("applied to {}", dir.display());
    Ok(())
}

async fn run_agent(api: &Api, a: RunArgs) -> Result<i32> {
    let sb = create_sandbox(api, &a.template, a.git.is_some()).await?;
    let result = async {
        prepare(api, &sb.id, &a).await?;
        let mut budget = serde_json::Map::new();
        if let Some(n) = a.max_steps {
            budget.insert("max_steps".into(), json!(n));
        }
        if let Some(c) = a.max_cost {
            budget.insert("max_cost_usd".into(), json!(c));
        }
        if let Some(t) = &a.max_time {
            let d = kiln_server::units::parse_duration(t)
                .map_err(|e| anyhow!("--max-time {t}: {e} (hint: e.g. 90s, 10m)"))?;
            budget.insert("max_wall_secs".into(), json!(d.as_secs_f64()));
        }
        let body = json!({"task": a.task, "profile": a.profile, "model": a.model,
            "sandbox": sb.id, "budget": Value::Object(budget)});
        let r: Value = api.json(Method::POST, "/v1/agents", Some(&body)).await?;
        let id = r["id"].as_str().unwrap_or_default().to_string();
        if !a.json {
            eprintln!("run {id} in sandbox {}", sb.id);
        }
        let end = follow_events(api, &id, 0, true, a.json, false).await?;
        if let Some(dir) = &a.path {
            if !a.json {
                diff_back(api, &sb.id, dir, a.apply).await?;
            }
        }
        Ok::<_, anyhow::Error>(end)
    }
    .await;
    if a.keep {
        eprintln!("sandbox {} kept", sb.id);
    } else {
        let _ = api
            .empty(Method::DELETE, &format!("/v1/sandboxes/{}", sb.id))
            .await;
    }
    match result? {
        Some((_, true)) => Ok(0),
        Some((reason, false)) => {
            if !a.json {
                eprintln!("the run did not succeed: {reason}");
            }
            Ok(1)
        }
        None => {
            eprintln!(
                "the event stream ended before the run finished (hint: `kiln agent logs RUN -f`)"
            );
            Ok(1)
        }
    }
}

async fn ls(api: &Api, json: bool) -> Result<i32> {
    let v: Value = api.json(Method::GET, "/v1/agents", None::<&()>).await?;
    if json {
        println!("{}", serde_json::to_string(&v["runs"])?);
        return Ok(0);
    }
    println!(
        "{:<17} {:<17} {:<22} {:<9} {:<24} {:>5} {:>9} {:>9}  TASK",
        "RUN", "STATE", "REASON", "PROFILE", "MODEL", "STEPS", "TOKENS", "COST"
    );
    for r in v["runs"].as_array().into_iter().flatten() {
        let s = &r["stats"];
        let tokens = s["total_input_tokens"].as_u64().unwrap_or(0)
            + s["total_output_tokens"].as_u64().unwrap_or(0);
        let task: String = r["task"]
            .as_str()
            .unwrap_or_default()
            .chars()
            .take(40)
            .collect();
        println!(
            "{:<17} {:<17} {:<22} {:<9} {:<24} {:>5} {:>9} {:>9.4}  {}",
            r["id"].as_str().unwrap_or_default(),
            r["state"].as_str().unwrap_or_default(),
            r["reason"].as_str().unwrap_or("-"),
            r["profile"].as_str().unwrap_or_default(),
            r["model"].as_str().unwrap_or_default(),
            s["steps"].as_u64().unwrap_or(0),
            tokens,
            s["total_cost_usd"].as_f64().unwrap_or(0.0),
            task.replace('\n', " ")
        );
    }
    Ok(0)
}

async fn show(api: &Api, run: &str, json: bool) -> Result<i32> {
    let v: Value = api
        .json(Method::GET, &format!("/v1/agents/{run}"), None::<&()>)
        .await?;
    if json {
        println!("{v}");
        return Ok(0);
    }
    let s = &v["stats"];
    println!("run       {}", v["id"].as_str().unwrap_or_default());
    println!(
        "state     {} ({})",
        v["state"].as_str().unwrap_or_default(),
        v["reason"].as_str().unwrap_or("-")
    );
    println!("profile   {}", v["profile"].as_str().unwrap_or_default());
    println!("model     {}", v["model"].as_str().unwrap_or_default());
    println!("sandbox   {}", v["sandbox_id"].as_str().unwrap_or("-"));
    println!("task      {}", v["task"].as_str().unwrap_or_default());
    println!("steps     {}", s["steps"].as_u64().unwrap_or(0));
    println!(
        "tokens    {} in / {} out (with sub-agents: {} / {})",
        s["input_tokens"].as_u64().unwrap_or(0),
        s["output_tokens"].as_u64().unwrap_or(0),
        s["total_input_tokens"].as_u64().unwrap_or(0),
        s["total_output_tokens"].as_u64().unwrap_or(0)
    );
    println!(
        "cost      ${:.4} (with sub-agents ${:.4})",
        s["cost_usd"].as_f64().unwrap_or(0.0),
        s["total_cost_usd"].as_f64().unwrap_or(0.0)
    );
    println!(
        "model     {} ms in model calls",
        s["model_ms"].as_u64().unwrap_or(0)
    );
    println!(
        "tools     {} calls, {} errors",
        s["tool_calls"].as_u64().unwrap_or(0),
        s["tool_errors"].as_u64().unwrap_or(0)
    );
    if let Some(summary) = s["summary"].as_str().filter(|x| !x.is_empty()) {
        println!("summary   {summary}");
    }
    for c in v["children"].as_array().into_iter().flatten() {
        println!(
            "  sub-agent {} {} {} ({})",
            c["id"].as_str().unwrap_or_default(),
            c["profile"].as_str().unwrap_or_default(),
            c["state"].as_str().unwrap_or_default(),
            c["reason"].as_str().unwrap_or("-")
        );
    }
    Ok(0)
}
