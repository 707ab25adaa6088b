//! `kiln ssh-key add|ls|rm` (SSH public keys of your organisation), `kiln ssh ID` (runs the
//! system `ssh` into a sandbox with the server's host key pinned) and `kiln ssh-config`
//! (Host entries for `~/.ssh/config`, for VS Code Remote-SSH, JetBrains Gateway, scp, ...).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use clap::{Args, Subcommand};
use kiln_protocol::api::{AddSshKey, Sandbox, SandboxList, SshInfo, SshKey, SshKeyList};
use reqwest::Method;

use crate::Global;

#[derive(Subcommand)]
pub enum SshKeyCmd {
    /// Register a public key with your organisation (owner or admin key); it then opens
    /// `ssh SANDBOX_ID@HOST` for every sandbox of the organisation
    Add {
        /// Public key file, or `-` for stdin [default: ~/.ssh/id_ed25519.pub, id_ecdsa.pub or
        /// id_rsa.pub, the first that exists]
        file: Option<PathBuf>,
        /// A name to recognise it by [default: the key's comment]
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// List your organisation's SSH keys
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Remove a key by id or fingerprint; it opens nothing from the next login on
    Rm { id: String },
}

#[derive(Args)]
pub struct SshArgs {
    /// Sandbox id
    pub id: String,
    /// Private key to offer (`ssh -i`)
    #[arg(short = 'i', long)]
    pub identity: Option<PathBuf>,
    /// Allocate a terminal even for a command (`ssh -t`)
    #[arg(short = 't')]
    pub tty: bool,
    /// Forward a local port into the sandbox (`ssh -L [BIND:]PORT:HOST:HOSTPORT`), repeatable
    #[arg(short = 'L', value_name = "SPEC")]
    pub forward: Vec<String>,
    /// Command to run instead of a shell
    #[arg(last = true)]
    pub cmd: Vec<String>,
}

#[derive(Args)]
pub struct SshConfigArgs {
    /// Sandboxes to print entries for [default: every sandbox of your organisation]
    pub ids: Vec<String>,
    /// Private key to name in the entries (`IdentityFile`)
    #[arg(short = 'i', long)]
    pub identity: Option<PathBuf>,
}

pub async fn ssh_key(g: &Global, c: SshKeyCmd) -> Result<i32> {
    let api = g.api();
    match c {
        SshKeyCmd::Add { file, name, json } => {
            let (text, from) = read_public_key(file.as_deref())?;
            let req = AddSshKey {
                public_key: text.trim().to_string(),
                name,
            };
            let k: SshKey = api.json(Method::POST, "/v1/ssh-keys", Some(&req)).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&k)?);
            } else {
                eprintln!("added {} from {from} as {}", k.fingerprint, k.name);
                println!("{}", k.id);
            }
        }
        SshKeyCmd::Ls { json } => {
            let list: SshKeyList = api.json(Method::GET, "/v1/ssh-keys", None::<&()>).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!("{:<18} {:<20} {:<12} FINGERPRINT", "ID", "NAME", "TYPE");
                for k in &list.keys {
                    println!(
                        "{:<18} {:<20} {:<12} {}",
                        k.id, k.name, k.algorithm, k.fingerprint
                    );
                }
            }
        }
        SshKeyCmd::Rm { id } => {
            api.empty(Method::DELETE, &format!("/v1/ssh-keys/{}", encode(&id)))
                .await?;
            eprintln!("removed ssh key {id}");
        }
    }
    Ok(0)
}

/// Percent-encodes a path segment (fingerprints contain `/` and `+`).
fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~:".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn home() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
}

fn read_public_key(file: Option<&Path>) -> Result<(String, String)> {
    match file {
        Some(p) if p == Path::new("-") => {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
                .context("cannot read the public key from stdin")?;
            Ok((s, "stdin".into()))
        }
        Some(p) => {
            let s = std::fs::read_to_string(p).with_context(|| {
                format!(
                    "cannot read {} (hint: pass a public key file such as ~/.ssh/id_ed25519.pub)",
                    p.display()
                )
            })?;
            Ok((s, p.display().to_string()))
        }
        None => {
            let dir = home().map(|h| h.join(".ssh")).ok_or_else(|| {
                anyhow!("HOME is not set (hint: pass the public key file: kiln ssh-key add FILE)")
            })?;
            for name in ["id_ed25519.pub", "id_ecdsa.pub", "id_rsa.pub"] {
                let p = dir.join(name);
                if let Ok(s) = std::fs::read_to_string(&p) {
                    return Ok((s, p.display().to_string()));
                }
            }
            Err(anyhow!(
                "no public key in {} (hint: create one with `ssh-keygen -t ed25519`, or pass the file: kiln ssh-key add FILE)",
                dir.display()
            ))
        }
    }
}

/// Where the server's SSH door is: host (from the API URL), port and host key.
struct Door {
    host: String,
    port: u16,
    known_hosts: PathBuf,
}

async fn door(g: &Global) -> Result<Door> {
    let api = g.api();
    let info: SshInfo = api.json(Method::GET, "/v1/ssh", None::<&()>).await?;
    let (Some(port), Some(host_key), true) = (info.port, info.host_key, info.enabled) else {
        return Err(anyhow!(
            "the Kiln server at {} does not listen for SSH (hint: start it without --no-ssh)",
            api.base
        ));
    };
    let url =
        reqwest::Url::parse(&api.base).with_context(|| format!("bad KILN_URL {}", api.base))?;
    let host = url
        .host_str()
        .ok_or_else(|| anyhow!("KILN_URL {} has no host", api.base))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    // The host key came over the authenticated API: pin it in a file of our own so `ssh`
    // checks it strictly and never asks.
    let dir = home()
        .map(|h| h.join(".config/kiln"))
        .unwrap_or_else(|| std::env::temp_dir().join("kiln"));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let known_hosts = dir.join("known_hosts");
    let entry = format!("[{host}]:{port} {}", host_key.trim());
    let existing = std::fs::read_to_string(&known_hosts).unwrap_or_default();
    if !existing.lines().any(|l| l == entry) {
        let prefix = format!("[{host}]:{port} ");
        let mut lines: Vec<&str> = existing
            .lines()
            .filter(|l| !l.starts_with(&prefix))
            .collect();
        lines.push(&entry);
        std::fs::write(&known_hosts, lines.join("\n") + "\n")
            .with_context(|| format!("cannot write {}", known_hosts.display()))?;
    }
    Ok(Door {
        host,
        port,
        known_hosts,
    })
}

/// The `ssh` options every invocation needs.
fn ssh_options(d: &Door) -> Vec<String> {
    vec![
        "-p".into(),
        d.port.to_string(),
        "-o".into(),
        format!("UserKnownHostsFile={}", d.known_hosts.display()),
        "-o".into(),
        "StrictHostKeyChecking=yes".into(),
    ]
}

/// `kiln ssh ID [-- CMD...]`: replaces this process with the system `ssh`.
pub async fn ssh(g: &Global, a: SshArgs) -> Result<i32> {
    // A clear error for an unknown id before ssh says "Permission denied".
    let _: Sandbox = g
        .api()
        .json(Method::GET, &format!("/v1/sandboxes/{}", a.id), None::<&()>)
        .await?;
    let d = door(g).await?;
    let mut args = ssh_options(&d);
    if let Some(i) = &a.identity {
        args.extend(["-i".into(), i.display().to_string()]);
    }
    if a.tty {
        args.push("-t".into());
    }
    for f in &a.forward {
        args.extend(["-L".into(), f.clone()]);
    }
    args.push(format!("{}@{}", a.id, d.host));
    if !a.cmd.is_empty() {
        args.push("--".into());
        args.extend(a.cmd.iter().cloned());
    }
    let err = std::process::Command::new("ssh").args(&args).exec();
    Err(anyhow!(
        "cannot run ssh: {err} (hint: install the OpenSSH client, e.g. apt-get install openssh-client)"
    ))
}

/// `kiln ssh-config [ID...]`: prints `Host kiln-ID` entries.
pub async fn ssh_config(g: &Global, a: SshConfigArgs) -> Result<i32> {
    let d = door(g).await?;
    let ids = if a.ids.is_empty() {
        let list: SandboxList = g
            .api()
            .json(Method::GET, "/v1/sandboxes", None::<&()>)
            .await?;
        list.sandboxes.into_iter().map(|s| s.id).collect()
    } else {
        for id in &a.ids {
            let _: Sandbox = g
                .api()
                .json(Method::GET, &format!("/v1/sandboxes/{id}"), None::<&()>)
                .await?;
        }
        a.ids
    };
    print!("{}", config_text(&d, &ids, a.identity.as_deref()));
    Ok(0)
}

fn config_text(d: &Door, ids: &[String], identity: Option<&Path>) -> String {
    let mut out = String::new();
    for id in ids {
        out.push_str(&format!(
            "Host kiln-{id}\n  HostName {}\n  Port {}\n  User {id}\n  UserKnownHostsFile {}\n  StrictHostKeyChecking yes\n",
            d.host,
            d.port,
            d.known_hosts.display()
        ));
        if let Some(i) = identity {
            out.push_str(&format!("  IdentityFile {}\n", i.display()));
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_entries_and_encoding() {
        let d = Door {
            host: "127.0.0.1".into(),
            port: 2222,
            known_hosts: PathBuf::from("/home/u/.config/kiln/known_hosts"),
        };
        expect_test::expect![[r#"
            Host kiln-sb-abc
              HostName 127.0.0.1
              Port 2222
              User sb-abc
              UserKnownHostsFile /home/u/.config/kiln/known_hosts
              StrictHostKeyChecking yes
              IdentityFile /k

        "#]]
        .assert_eq(&config_text(&d, &["sb-abc".into()], Some(Path::new("/k"))));
        assert_eq!(encode("SHA256:a/b+c="), "SHA256:a%2Fb%2Bc%3D");
    }
}
