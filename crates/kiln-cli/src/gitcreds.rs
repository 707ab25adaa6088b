//! `kiln git-credential add|ls|rm` (credentials for https git hosts stored by the server for
//! your organisation: clone, push and pull in its sandboxes use them; the password is never
//! shown again) and `kiln org git` (the organisation's default commit author).

use std::io::BufRead;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use kiln_protocol::api::{
    AddGitCredential, GitAuthor, GitCredential, GitCredentialList, GitDefaults,
};
use reqwest::Method;

use crate::Global;

#[derive(Subcommand)]
pub enum GitCredentialCmd {
    /// Store a credential for an https git host (owner or admin key). The password or token
    /// comes from stdin (--password-stdin) or $KILN_GIT_PASSWORD, never from the command line
    Add {
        /// Host of the remote, e.g. github.com or git.example.com:8443
        host: String,
        #[arg(long)]
        username: String,
        /// Read the password from the first line of stdin
        #[arg(long)]
        password_stdin: bool,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// List stored credentials (host, user, last use; never passwords)
    Ls {
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// Remove a credential by id or host
    Rm { id: String },
}

/// `kiln org git`.
#[derive(Args)]
pub struct OrgGitArgs {
    /// Organisation id or name [default: your own]
    pub org: Option<String>,
    /// Default commit author as `Name <email>` (owner or admin key)
    #[arg(long)]
    pub author: Option<String>,
    /// Back to Kiln's default author (`Kiln Agent <agent@kiln.invalid>`)
    #[arg(long, conflicts_with = "author")]
    pub reset: bool,
    /// Print JSON
    #[arg(long)]
    pub json: bool,
}

fn password(stdin: bool) -> Result<String> {
    let p = if stdin {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("reading the password from stdin")?;
        line.trim_end_matches(['\n', '\r']).to_string()
    } else {
        std::env::var("KILN_GIT_PASSWORD").map_err(|_| {
            anyhow!(
                "no password (hint: pipe it in with --password-stdin, or set KILN_GIT_PASSWORD)"
            )
        })?
    };
    if p.is_empty() {
        bail!("the password is empty");
    }
    Ok(p)
}

pub async fn git_credential(g: &Global, c: GitCredentialCmd) -> Result<i32> {
    let api = g.api();
    match c {
        GitCredentialCmd::Add {
            host,
            username,
            password_stdin,
            json,
        } => {
            let req = AddGitCredential {
                host,
                username,
                password: password(password_stdin)?,
            };
            let c: GitCredential = api
                .json(Method::POST, "/v1/git-credentials", Some(&req))
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&c)?);
            } else {
                eprintln!("stored a credential for {} (user {})", c.host, c.username);
                println!("{}", c.id);
            }
        }
        GitCredentialCmd::Ls { json } => {
            let list: GitCredentialList = api
                .json(Method::GET, "/v1/git-credentials", None::<&()>)
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!("{:<18} {:<28} {:<20} LAST USED", "ID", "HOST", "USER");
                for c in &list.credentials {
                    println!(
                        "{:<18} {:<28} {:<20} {}",
                        c.id,
                        c.host,
                        c.username,
                        crate::admin::when(c.last_used_at_ms)
                    );
                }
            }
        }
        GitCredentialCmd::Rm { id } => {
            if id.contains(['/', '?', '#', '%']) {
                bail!("`{id}` is neither a credential id nor a host");
            }
            api.empty(Method::DELETE, &format!("/v1/git-credentials/{id}"))
                .await?;
            eprintln!("removed git credential {id}");
        }
    }
    Ok(0)
}

pub async fn org_git(g: &Global, a: OrgGitArgs) -> Result<i32> {
    let api = g.api();
    let org = match a.org {
        Some(o) => o,
        None => {
            let me: kiln_protocol::api::Me = api.json(Method::GET, "/v1/me", None::<&()>).await?;
            me.org
        }
    };
    let path = format!("/v1/orgs/{org}/git");
    let d: GitDefaults = if a.reset || a.author.is_some() {
        let author = match &a.author {
            Some(s) => Some(serde_json::from_value::<GitAuthor>(
                crate::devtools::parse_author(s)?,
            )?),
            None => None,
        };
        api.json(Method::PUT, &path, Some(&GitDefaults { author }))
            .await?
    } else {
        api.json(Method::GET, &path, None::<&()>).await?
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&d)?);
    } else {
        match d.author {
            Some(au) => println!("author {} <{}>", au.name, au.email),
            None => println!("author Kiln Agent <agent@kiln.invalid> (Kiln's default)"),
        }
    }
    Ok(0)
}
