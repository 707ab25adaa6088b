//! `kiln git`, `kiln lsp`, `kiln ports` and `kiln egress`: developer tools inside a sandbox,
//! through the server's API.

use anyhow::{anyhow, Result};
use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::{json, Value};

use crate::Global;

#[derive(Args)]
pub struct GitArgs {
    /// Sandbox id
    pub id: String,
    /// Repository directory in the sandbox (for `clone`: where to clone into)
    #[arg(long, short = 'C', default_value = "/workspace")]
    pub repo: String,
    /// Run git as this sandbox user
    #[arg(long)]
    pub user: Option<String>,
    /// Print the server's JSON answer
    #[arg(long)]
    pub json: bool,
    /// User name for clone/push/pull (the password comes from $KILN_GIT_PASSWORD, read here on
    /// the host and never written into the sandbox); without it, credentials stored for the
    /// remote's host (`kiln git-credential add`) are used
    #[arg(long, env = "KILN_GIT_USERNAME")]
    pub username: Option<String>,
    #[command(subcommand)]
    pub op: GitOp,
}

#[derive(Subcommand)]
pub enum GitOp {
    /// Clone URL into DIR (default: named after the repository) under --repo
    Clone {
        url: String,
        dir: Option<String>,
        #[arg(long)]
        branch: Option<String>,
    },
    /// Changed, staged, untracked and conflicted paths
    Status,
    /// Unified diff per file (work tree vs index; --staged: index vs HEAD)
    Diff {
        #[arg(long)]
        staged: bool,
        paths: Vec<String>,
    },
    /// Stage paths (all changes when none are given)
    Add { paths: Vec<String> },
    /// Commit what is staged
    Commit {
        #[arg(short = 'm', long)]
        message: String,
        /// Also commit every tracked change
        #[arg(short = 'a', long)]
        all: bool,
        /// Author as `Name <email>` [default: the organisation's (`kiln org git`), else
        /// `Kiln Agent <agent@kiln.invalid>`]
        #[arg(long)]
        author: Option<String>,
    },
    /// Recent commits
    Log {
        #[arg(short = 'n', default_value_t = 20)]
        n: u32,
    },
    /// List branches, or create one
    Branch {
        name: Option<String>,
        #[arg(long)]
        start: Option<String>,
    },
    /// Switch branches (-b: create it first)
    Checkout {
        name: String,
        #[arg(short = 'b')]
        create: bool,
    },
    /// Push (to origin by default)
    Push {
        #[arg(long, default_value = "origin")]
        remote: String,
        branch: Option<String>,
        #[arg(short = 'u', long)]
        set_upstream: bool,
    },
    /// Pull with a merge
    Pull {
        #[arg(long, default_value = "origin")]
        remote: String,
        branch: Option<String>,
    },
}

pub(crate) fn parse_author(s: &str) -> Result<Value> {
    let (name, rest) = s
        .split_once('<')
        .ok_or_else(|| anyhow!("--author must look like `Name <email>` (got {s:?})"))?;
    let email = rest.trim_end().trim_end_matches('>');
    Ok(json!({"name": name.trim(), "email": email.trim()}))
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

pub async fn git(g: &Global, a: GitArgs) -> Result<i32> {
    let api = g.api();
    let mut body = json!({"repo": a.repo, "user": a.user});
    let creds = match (&a.username, std::env::var("KILN_GIT_PASSWORD").ok()) {
        (Some(u), Some(p)) => json!([{"username": u, "password": p}]),
        (None, Some(p)) => json!([{"username": "x-access-token", "password": p}]),
        _ => json!([]),
    };
    let op = match &a.op {
        GitOp::Clone { url, dir, branch } => {
            body["url"] = json!(url);
            body["dir"] = json!(dir);
            body["branch"] = json!(branch);
            body["credentials"] = creds;
            "clone"
        }
        GitOp::Status => "status",
        GitOp::Diff { staged, paths } => {
            body["staged"] = json!(staged);
            body["paths"] = json!(paths);
            "diff"
        }
        GitOp::Add { paths } => {
            body["paths"] = json!(paths);
            "add"
        }
        GitOp::Commit {
            message,
            all,
            author,
        } => {
            body["message"] = json!(message);
            body["all"] = json!(all);
            if let Some(au) = author {
                body["author"] = parse_author(au)?;
            }
            "commit"
        }
        GitOp::Log { n } => {
            body["n"] = json!(n);
            "log"
        }
        GitOp::Branch {
            name: Some(n),
            start,
        } => {
            body["branch"] = json!(n);
            body["start"] = json!(start);
            "branch"
        }
        GitOp::Branch { name: None, .. } => "branches",
        GitOp::Checkout { name, create } => {
            body["branch"] = json!(name);
            body["create"] = json!(create);
            "checkout"
        }
        GitOp::Push {
            remote,
            branch,
            set_upstream,
        } => {
            body["remote"] = json!(remote);
            body["branch"] = json!(branch);
            body["set_upstream"] = json!(set_upstream);
            body["credentials"] = creds;
            "push"
        }
        GitOp::Pull { remote, branch } => {
            body["remote"] = json!(remote);
            body["branch"] = json!(branch);
            body["credentials"] = creds;
            "pull"
        }
    };
    let v: Value = api
        .json(
            Method::POST,
            &format!("/v1/sandboxes/{}/git/{op}", a.id),
            Some(&body),
        )
        .await?;
    if a.json {
        print_json(&v);
        return Ok(0);
    }
    match op {
        "status" | "clone" | "add" | "checkout" | "push" | "pull" => {
            let branch = v["branch"].as_str().unwrap_or("(detached)");
            let mut head = format!("on {branch}");
            if let Some(u) = v["upstream"].as_str() {
                head.push_str(&format!(
                    " ... {u} (ahead {}, behind {})",
                    v["ahead"], v["behind"]
                ));
            }
            println!("{head}");
            for e in v["entries"].as_array().into_iter().flatten() {
                let x = e["index"].as_str().unwrap_or(".");
                let y = e["worktree"].as_str().unwrap_or(".");
                match e["orig_path"].as_str() {
                    Some(o) => println!("{x}{y} {o} -> {}", e["path"].as_str().unwrap_or("")),
                    None => println!("{x}{y} {}", e["path"].as_str().unwrap_or("")),
                }
            }
            if v["clean"].as_bool() == Some(true) {
                println!("nothing to commit, working tree clean");
            }
        }
        "diff" => {
            for f in v["files"].as_array().into_iter().flatten() {
                print!("{}", f["patch"].as_str().unwrap_or(""));
            }
        }
        "commit" => println!(
            "[{}] {}",
            v["sha"].as_str().unwrap_or("").get(..12).unwrap_or(""),
            v["subject"].as_str().unwrap_or("")
        ),
        "log" => {
            for c in v["commits"].as_array().into_iter().flatten() {
                println!(
                    "{} {} ({}, {})",
                    c["sha"].as_str().unwrap_or("").get(..12).unwrap_or(""),
                    c["subject"].as_str().unwrap_or(""),
                    c["author"]["name"].as_str().unwrap_or(""),
                    c["date"].as_str().unwrap_or("")
                );
            }
        }
        _ => {
            for b in v["branches"].as_array().into_iter().flatten() {
                let mark = if b["current"].as_bool() == Some(true) {
                    "*"
                } else {
                    " "
                };
                println!("{mark} {}", b["name"].as_str().unwrap_or(""));
            }
        }
    }
    Ok(0)
}

#[derive(Args)]
pub struct LspArgs {
    /// Sandbox id
    pub id: String,
    /// Workspace root the language server serves
    #[arg(long, default_value = "/workspace")]
    pub root: String,
    /// Language (default: from the file's extension)
    #[arg(long)]
    pub language: Option<String>,
    #[arg(long)]
    pub json: bool,
    #[command(subcommand)]
    pub op: LspOp,
}

/// Positions are PATH:LINE:COL, 1-based, columns in characters.
#[derive(Subcommand)]
pub enum LspOp {
    /// Diagnostics of a file
    Diagnostics { path: String },
    /// Where the symbol at PATH:LINE:COL is defined
    Definition { at: String },
    /// References to the symbol at PATH:LINE:COL
    References { at: String },
    /// Hover text at PATH:LINE:COL
    Hover { at: String },
    /// Symbols of a file, or of the workspace matching --query
    Symbols {
        path: Option<String>,
        #[arg(long)]
        query: Option<String>,
    },
    /// Completions at PATH:LINE:COL
    Complete { at: String },
    /// The edits renaming the symbol at PATH:LINE:COL would make (not applied)
    Rename { at: String, new_name: String },
}

fn parse_at(at: &str) -> Result<(String, u32, u32)> {
    let bad = || anyhow!("expected PATH:LINE:COL with 1-based numbers (got {at:?})");
    let (rest, col) = at.rsplit_once(':').ok_or_else(bad)?;
    let (path, line) = rest.rsplit_once(':').ok_or_else(bad)?;
    let line: u32 = line.parse().map_err(|_| bad())?;
    let col: u32 = col.parse().map_err(|_| bad())?;
    if line == 0 || col == 0 || path.is_empty() {
        return Err(bad());
    }
    Ok((path.to_string(), line, col))
}

fn loc(l: &Value) -> String {
    format!(
        "{}:{}:{}",
        l["path"].as_str().unwrap_or(""),
        l["line"],
        l["column"]
    )
}

pub async fn lsp(g: &Global, a: LspArgs) -> Result<i32> {
    let api = g.api();
    let mut body = json!({"root": a.root, "language": a.language});
    let at = |s: &str, body: &mut Value| -> Result<()> {
        let (p, l, c) = parse_at(s)?;
        body["path"] = json!(p);
        body["line"] = json!(l);
        body["column"] = json!(c);
        Ok(())
    };
    let op = match &a.op {
        LspOp::Diagnostics { path } => {
            body["path"] = json!(path);
            "diagnostics"
        }
        LspOp::Definition { at: s } => {
            at(s, &mut body)?;
            "definition"
        }
        LspOp::References { at: s } => {
            at(s, &mut body)?;
            "references"
        }
        LspOp::Hover { at: s } => {
            at(s, &mut body)?;
            "hover"
        }
        LspOp::Complete { at: s } => {
            at(s, &mut body)?;
            "completion"
        }
        LspOp::Rename { at: s, new_name } => {
            at(s, &mut body)?;
            body["new_name"] = json!(new_name);
            "rename"
        }
        LspOp::Symbols { path: Some(p), .. } => {
            body["path"] = json!(p);
            "symbols"
        }
        LspOp::Symbols { path: None, query } => {
            if a.language.is_none() {
                return Err(anyhow!(
                    "workspace symbols need --language (e.g. --language python)"
                ));
            }
            body["query"] = json!(query.clone().unwrap_or_default());
            "workspace_symbols"
        }
    };
    let v: Value = api
        .json(
            Method::POST,
            &format!("/v1/sandboxes/{}/lsp/{op}", a.id),
            Some(&body),
        )
        .await?;
    if a.json {
        print_json(&v);
        return Ok(0);
    }
    match op {
        "diagnostics" => {
            let d = v["diagnostics"].as_array().cloned().unwrap_or_default();
            for x in &d {
                println!(
                    "{}: {}: {}",
                    loc(x),
                    x["severity"].as_str().unwrap_or(""),
                    x["message"].as_str().unwrap_or("")
                );
            }
            return Ok(if d.iter().any(|x| x["severity"] == "error") {
                1
            } else {
                0
            });
        }
        "definition" | "references" => {
            for l in v["locations"].as_array().into_iter().flatten() {
                println!("{}", loc(l));
            }
        }
        "hover" => println!("{}", v["hover"].as_str().unwrap_or("")),
        "completion" => {
            for i in v["items"].as_array().into_iter().flatten() {
                println!(
                    "{}\t{}",
                    i["label"].as_str().unwrap_or(""),
                    i["kind"].as_str().unwrap_or("")
                );
            }
        }
        "rename" => {
            for e in v["edits"].as_array().into_iter().flatten() {
                println!(
                    "{}: replace with {:?}",
                    loc(&e["location"]),
                    e["new_text"].as_str().unwrap_or("")
                );
            }
        }
        _ => {
            for s in v["symbols"].as_array().into_iter().flatten() {
                println!(
                    "{}\t{}\t{}",
                    s["kind"].as_str().unwrap_or(""),
                    s["name"].as_str().unwrap_or(""),
                    loc(&s["location"])
                );
            }
        }
    }
    Ok(0)
}

#[derive(Args)]
pub struct PortsArgs {
    /// Sandbox id
    pub id: String,
    #[arg(long)]
    pub json: bool,
}

pub async fn ports(g: &Global, a: PortsArgs) -> Result<i32> {
    let v: Value = g
        .api()
        .json(
            Method::GET,
            &format!("/v1/sandboxes/{}/ports", a.id),
            None::<&()>,
        )
        .await?;
    if a.json {
        print_json(&v);
        return Ok(0);
    }
    for p in v["ports"].as_array().into_iter().flatten() {
        println!(
            "{}\t{}\t{}",
            p["port"],
            p["address"].as_str().unwrap_or(""),
            p["command"].as_str().unwrap_or("-")
        );
    }
    Ok(0)
}

#[derive(Args)]
pub struct EgressArgs {
    /// Sandbox id (network `full`)
    pub id: String,
    /// Allow this domain (`pypi.org`, `*.github.com`); repeatable
    #[arg(long = "allow-domain")]
    pub domains: Vec<String>,
    /// Allow this IPv4 network (`10.0.0.0/8`); repeatable
    #[arg(long = "allow-cidr")]
    pub cidrs: Vec<String>,
    /// Lift the allow-list (everything reachable)
    #[arg(long, conflicts_with_all = ["domains", "cidrs"])]
    pub unrestricted: bool,
    #[arg(long)]
    pub json: bool,
}

pub async fn egress(g: &Global, a: EgressArgs) -> Result<i32> {
    let api = g.api();
    let path = format!("/v1/sandboxes/{}/egress", a.id);
    let v: Value = if a.unrestricted {
        api.json(Method::PUT, &path, Some(&json!({"allow": null})))
            .await?
    } else if !a.domains.is_empty() || !a.cidrs.is_empty() {
        api.json(
            Method::PUT,
            &path,
            Some(&json!({"allow": {"domains": a.domains, "cidrs": a.cidrs}})),
        )
        .await?
    } else {
        api.json(Method::GET, &path, None::<&()>).await?
    };
    if a.json {
        print_json(&v);
        return Ok(0);
    }
    println!("network: {}", v["network"].as_str().unwrap_or(""));
    match v["allow"].as_object() {
        None => println!("egress: unrestricted"),
        Some(l) => {
            println!(
                "egress: allow-list ({} packets denied so far)",
                v["denied_packets"]
            );
            for d in l
                .get("domains")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                println!("  domain {}", d.as_str().unwrap_or(""));
            }
            for c in l
                .get("cidrs")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                println!("  cidr   {}", c.as_str().unwrap_or(""));
            }
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_and_authors_parse() {
        assert_eq!(
            parse_at("/w/a.py:3:7").expect("ok"),
            ("/w/a.py".into(), 3, 7)
        );
        assert!(parse_at("/w/a.py:0:7").is_err());
        assert!(parse_at("/w/a.py:3").is_err());
        assert!(parse_at("a.py:x:1").is_err());
        assert_eq!(
            parse_author("Ada Agent <ada@example.com>").expect("ok"),
            json!({"name": "Ada Agent", "email": "ada@example.com"})
        );
        assert!(parse_author("nobody").is_err());
    }
}
