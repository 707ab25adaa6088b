//! `kiln index create|sync|ls|stats|rm`, `kiln search` and `kiln context`: clients of
//! `/v1/indexes`.

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use clap::{Args, Subcommand, ValueEnum};
use reqwest::Method;
use serde_json::{json, Value};

use crate::Global;

#[derive(Subcommand)]
pub enum IndexCmd {
    /// Create an index of a source: a directory of the server's host (operator only), a git
    /// URL, or a sandbox (followed live). Then `kiln index sync NAME`
    Create(CreateArgs),
    /// Bring an index up to date with its source (a git source is fetched first; only changed
    /// files are read; only new chunk texts are embedded); `--watch` keeps it current. A
    /// sandbox index is also followed by the server itself, without --watch
    Sync(SyncArgs),
    /// List the indexes of your organisation
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Files, chunks, embedding progress, cache hit rates, Merkle root and the redaction report
    Stats {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove an index and everything derived from its source (chunks, vectors, BM25 files,
    /// a git source's clone, cached embeddings no other index uses, the redaction report)
    Rm { name: String },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Provider {
    /// all-MiniLM-L6-v2 in the server process
    Local,
    /// Ollama's /api/embed
    Ollama,
    /// An OpenAI-compatible /v1/embeddings
    Openai,
}

#[derive(Args)]
#[command(after_help = "Examples:
  kiln index create app --path /srv/app                  # a directory of the server (operator)
  kiln index create lib --git https://host/lib.git --ref main
  kiln index create ws --sandbox sb-abc123               # its /workspace, followed live
  kiln index create ws --sandbox sb-abc123 --path /workspace/api --encrypt

A git source is fetched shallow into the index's directory on the server; `kiln index sync`
fetches again and re-reads only files whose blob changed. Tenants may use https://, http://
and git:// URLs of public hosts; file://, local paths, SSH and private addresses are the
operator's. A sandbox source must be a sandbox of your organisation; the server follows its
files through kilnd's watch, so edits are searchable within seconds. If the sandbox is
removed the index is kept (searchable as it last was) and a sync answers `source_gone`.
--encrypt seals chunk text, symbols, paths, vectors and the BM25 files with your
organisation's key (derived from the server's secret; never stored).")]
pub struct CreateArgs {
    /// Index name (letters, digits, `-`, `_`, `.`)
    pub name: String,
    /// A directory on the server's machine; with --sandbox, the directory inside the sandbox
    /// [default with --sandbox: /workspace]
    #[arg(long, conflicts_with = "git")]
    pub path: Option<std::path::PathBuf>,
    /// A git URL, fetched by the server (shallow)
    #[arg(long, conflicts_with = "sandbox")]
    pub git: Option<String>,
    /// With --git: the branch or tag [default: the remote's HEAD]
    #[arg(long = "ref", requires = "git")]
    pub git_ref: Option<String>,
    /// A sandbox of your organisation, followed live
    #[arg(long)]
    pub sandbox: Option<String>,
    /// Encrypt the index at rest with your organisation's key
    #[arg(long)]
    pub encrypt: bool,
    /// Embedding provider
    #[arg(long, value_enum, default_value = "local")]
    pub embed: Provider,
    /// Provider URL (ollama: http://127.0.0.1:11434)
    #[arg(long)]
    pub embed_url: Option<String>,
    /// Provider model name
    #[arg(long)]
    pub embed_model: Option<String>,
    /// The environment variable (on the server) holding the OpenAI-compatible API key
    #[arg(long)]
    pub embed_key_env: Option<String>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct SyncArgs {
    pub name: String,
    /// Keep syncing until interrupted
    #[arg(long)]
    pub watch: bool,
    /// Seconds between syncs with --watch
    #[arg(long, default_value_t = 1.0)]
    pub interval: f64,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct SearchArgs {
    /// Index name
    pub name: String,
    /// What to look for (words, identifiers or a question)
    pub query: String,
    /// Number of results
    #[arg(long, default_value_t = 10)]
    pub k: usize,
    /// Only this language (python, rust, typescript, tsx, javascript, markdown, text)
    #[arg(long)]
    pub lang: Option<String>,
    /// Only paths matching this glob (`src/**/*.rs`)
    #[arg(long)]
    pub path: Option<String>,
    /// Only this symbol kind (function, method, class, impl, trait, type, module, section)
    #[arg(long)]
    pub kind: Option<String>,
    /// hybrid (default), bm25 or vector
    #[arg(long)]
    pub mode: Option<String>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct ContextArgs {
    pub name: String,
    pub query: String,
    /// Token budget
    #[arg(long, default_value_t = 4000)]
    pub tokens: usize,
    /// Lead with a map of the most relevant symbols
    #[arg(long)]
    pub symbols: bool,
    #[arg(long)]
    pub json: bool,
}

pub async fn index(g: &Global, cmd: IndexCmd) -> Result<i32> {
    let api = g.api();
    match cmd {
        IndexCmd::Create(a) => {
            let mut body = json!({ "name": a.name, "encrypted": a.encrypt });
            match (&a.path, &a.git, &a.sandbox) {
                (p, None, Some(s)) => {
                    body["sandbox"] = json!(s);
                    if let Some(p) = p {
                        body["path"] = json!(p.display().to_string());
                    }
                }
                (Some(p), _, _) => {
                    let abs = std::fs::canonicalize(p).with_context(|| {
                        format!(
                            "source path {} (hint: give an existing directory)",
                            p.display()
                        )
                    })?;
                    body["path"] = json!(abs.display().to_string());
                }
                (_, Some(u), _) => {
                    body["git"] = json!(u);
                    if let Some(r) = &a.git_ref {
                        body["ref"] = json!(r);
                    }
                }
                _ => bail!("give a source: --path DIR, --git URL or --sandbox ID (hint: see `kiln index create --help`)"),
            }
            body["embed"] = match a.embed {
                Provider::Local => json!({"provider": "local"}),
                Provider::Ollama => json!({
                    "provider": "ollama",
                    "url": a.embed_url.unwrap_or_else(|| "http://127.0.0.1:11434".into()),
                    "model": a.embed_model.ok_or_else(|| anyhow!("--embed ollama needs --embed-model (hint: e.g. nomic-embed-text)"))?,
                }),
                Provider::Openai => json!({
                    "provider": "openai",
                    "url": a.embed_url.ok_or_else(|| anyhow!("--embed openai needs --embed-url (hint: e.g. https://api.openai.com)"))?,
                    "model": a.embed_model.ok_or_else(|| anyhow!("--embed openai needs --embed-model"))?,
                    "api_key_env": a.embed_key_env,
                }),
            };
            let info: Value = api.json(Method::POST, "/v1/indexes", Some(&body)).await?;
            if a.json {
                println!("{info}");
            } else {
                println!("{}", info["name"].as_str().unwrap_or_default());
            }
            Ok(0)
        }
        IndexCmd::Sync(a) => {
            if !(a.interval > 0.0 && a.interval.is_finite()) {
                bail!("--interval must be a positive number of seconds");
            }
            loop {
                let report = sync_once(&api, &a.name, a.json, !a.watch).await?;
                if !a.watch {
                    break;
                }
                let changed = report["added"].as_u64().unwrap_or(0)
                    + report["changed"].as_u64().unwrap_or(0)
                    + report["deleted"].as_u64().unwrap_or(0);
                if changed > 0 && !a.json {
                    println!("{}", summary(&report));
                }
                tokio::time::sleep(Duration::from_secs_f64(a.interval)).await;
            }
            Ok(0)
        }
        IndexCmd::Ls { json } => {
            let v: Value = api.json(Method::GET, "/v1/indexes", None::<&()>).await?;
            if json {
                println!("{v}");
                return Ok(0);
            }
            println!(
                "{:<24} {:>8} {:>8} {:>9}  SOURCE",
                "NAME", "FILES", "CHUNKS", "EMBEDDED"
            );
            for i in v["indexes"].as_array().into_iter().flatten() {
                println!(
                    "{:<24} {:>8} {:>8} {:>9}  {}",
                    i["name"].as_str().unwrap_or_default(),
                    i["files"],
                    i["chunks"],
                    i["embedded"],
                    source_line(i)
                );
            }
            Ok(0)
        }
        IndexCmd::Stats { name, json } => {
            let v: Value = api
                .json(Method::GET, &format!("/v1/indexes/{name}"), None::<&()>)
                .await?;
            if json {
                println!("{v}");
                return Ok(0);
            }
            let i = &v["info"];
            println!("index          {}", i["name"].as_str().unwrap_or_default());
            println!("source         {}", source_line(i));
            if let Some(r) = v["revision"].as_str() {
                println!("revision       {r}");
            }
            if let Some(f) = v["following"].as_bool() {
                println!("following      {}", if f { "yes (live)" } else { "no" });
            }
            if let Some(e) = v["source_error"].as_str() {
                println!("source error   {e}");
            }
            println!(
                "embeddings     {}",
                i["embed"]["provider"].as_str().unwrap_or_default()
            );
            println!("files          {}", i["files"]);
            println!(
                "chunks         {} ({} embedded)",
                i["chunks"], i["embedded"]
            );
            println!("generation     {}", v["generation"]);
            println!(
                "merkle root    {}",
                v["merkle_root"].as_str().unwrap_or("-")
            );
            println!(
                "vector search  {}",
                if v["ann"].as_bool() == Some(true) {
                    "IVF (ANN)"
                } else {
                    "exact"
                }
            );
            for (label, key) in [
                ("query cache", "query_cache"),
                ("embed cache", "embedding_cache"),
            ] {
                let c = &v[key];
                println!(
                    "{label:<14} {:.1} % hits ({} hits, {} misses)",
                    c["hit_rate"].as_f64().unwrap_or(0.0) * 100.0,
                    c["hits"],
                    c["misses"]
                );
            }
            if let Some(e) = v["embedding_error"].as_str() {
                println!("embedding error {e}");
            }
            let reds = v["redactions"].as_array().cloned().unwrap_or_default();
            println!("redactions     {}", reds.len());
            for r in reds {
                println!(
                    "  {}:{} {}",
                    r["path"].as_str().unwrap_or_default(),
                    r["line"],
                    r["kind"].as_str().unwrap_or_default()
                );
            }
            Ok(0)
        }
        IndexCmd::Rm { name } => {
            api.empty(Method::DELETE, &format!("/v1/indexes/{name}"))
                .await?;
            Ok(0)
        }
    }
}

/// The source of an index as one line: a path, `git URL@ref`, `sandbox ID:PATH`, and
/// `(encrypted)`.
fn source_line(i: &Value) -> String {
    let s = &i["source"];
    let text = |k: &str| s[k].as_str().unwrap_or_default().to_string();
    let mut line = match s["type"].as_str() {
        Some("git") => match s["ref"].as_str() {
            Some(r) => format!("git {}@{r}", text("url")),
            None => format!("git {}", text("url")),
        },
        Some("sandbox") => format!("sandbox {}:{}", text("sandbox"), text("path")),
        _ => text("path"),
    };
    if i["encrypted"].as_bool() == Some(true) {
        line.push_str(" (encrypted)");
    }
    line
}

fn summary(r: &Value) -> String {
    let at = r["revision"]
        .as_str()
        .map(|c| format!(" at {}", &c[..c.len().min(12)]))
        .unwrap_or_default();
    format!(
        "{} files{at}: {} added, {} changed, {} deleted, {} unchanged; {} chunks added, {} removed; {} secrets redacted; {} ms",
        r["files"], r["added"], r["changed"], r["deleted"], r["unchanged"], r["chunks_added"],
        r["chunks_removed"], r["redactions"], r["millis"]
    )
}

/// One sync: a bar on a TTY, the NDJSON lines with `--json`, a summary line otherwise.
async fn sync_once(api: &crate::api::Api, name: &str, json: bool, print: bool) -> Result<Value> {
    use futures_util::StreamExt;
    let resp = api
        .send(api.request(Method::POST, &format!("/v1/indexes/{name}/sync")))
        .await?;
    let bar = (print && !json && std::io::stderr().is_terminal()).then(|| {
        let pb = indicatif::ProgressBar::new(0);
        pb.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} files")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        pb
    });
    let mut stream = resp.bytes_stream();
    let mut buf = Vec::new();
    while let Some(chunk) = stream.next().await {
        buf.extend_from_slice(&chunk.map_err(|e| anyhow!("the sync stream broke: {e}"))?);
        while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            let v: Value =
                serde_json::from_slice(&line).map_err(|e| anyhow!("malformed sync event: {e}"))?;
            if json && print {
                println!("{v}");
            }
            match v["type"].as_str() {
                Some("progress") => {
                    if let Some(pb) = &bar {
                        pb.set_length(v["total"].as_u64().unwrap_or(0));
                        pb.set_position(v["done"].as_u64().unwrap_or(0));
                    }
                }
                Some("done") => {
                    if let Some(pb) = &bar {
                        pb.finish_and_clear();
                    }
                    if print && !json {
                        println!("{}", summary(&v["report"]));
                    }
                    return Ok(v["report"].clone());
                }
                Some("error") => {
                    let e = &v["error"];
                    let hint = e["hint"]
                        .as_str()
                        .map(|h| format!(" (hint: {h})"))
                        .unwrap_or_default();
                    bail!("{}{hint}", e["message"].as_str().unwrap_or("sync failed"));
                }
                _ => {}
            }
        }
    }
    bail!("the server ended the sync stream without a result")
}

pub async fn search(g: &Global, a: SearchArgs) -> Result<i32> {
    let body = json!({
        "query": a.query, "k": a.k, "lang": a.lang, "path": a.path, "kind": a.kind, "mode": a.mode,
    });
    let v: Value = g
        .api()
        .json(
            Method::POST,
            &format!("/v1/indexes/{}/search", a.name),
            Some(&body),
        )
        .await?;
    if a.json {
        println!("{v}");
        return Ok(0);
    }
    for h in v["hits"].as_array().into_iter().flatten() {
        println!(
            "{:.3}  {}:{}-{}  {} {}",
            h["score"].as_f64().unwrap_or(0.0),
            h["path"].as_str().unwrap_or_default(),
            h["start_line"],
            h["end_line"],
            h["kind"].as_str().unwrap_or_default(),
            h["symbol"].as_str().unwrap_or("")
        );
    }
    Ok(0)
}

pub async fn context(g: &Global, a: ContextArgs) -> Result<i32> {
    let body = json!({ "query": a.query, "tokens": a.tokens, "symbols": a.symbols });
    let v: Value = g
        .api()
        .json(
            Method::POST,
            &format!("/v1/indexes/{}/context", a.name),
            Some(&body),
        )
        .await?;
    if a.json {
        println!("{v}");
    } else {
        print!("{}", v["text"].as_str().unwrap_or_default());
    }
    Ok(0)
}
