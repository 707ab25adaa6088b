//! `kiln org ...`, `kiln key ...` and `kiln audit`: the control plane (organisations, quotas,
//! API keys, the audit log). Every command takes `--json`.

use anyhow::{anyhow, Result};
use clap::{Args, Subcommand};
use kiln_protocol::api::{
    AuditList, CreateKey, CreateOrg, DurationArg, KeyCreated, KeyList, OrgCreated, OrgList, Quota,
    QuotaStatus, Role,
};
use reqwest::Method;

use crate::Global;

#[derive(Subcommand)]
pub enum OrgCmd {
    /// Create an organisation and its first owner key (system organisation only)
    Create {
        name: String,
        /// Do not create an owner key
        #[arg(long)]
        no_key: bool,
        #[arg(long)]
        json: bool,
    },
    /// List organisations (all of them for the system organisation, else your own)
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Show an organisation's quota and current use; with limits, change them (system
    /// organisation only)
    Quota(QuotaArgs),
    /// Show or set an organisation's git defaults: the author of commits that name none
    Git(crate::gitcreds::OrgGitArgs),
}

#[derive(Args)]
pub struct QuotaArgs {
    /// Organisation id or name [default: your own]
    pub org: Option<String>,
    /// Concurrent (creating or running) sandboxes
    #[arg(long)]
    pub sandboxes: Option<u64>,
    /// Total vCPUs of running sandboxes
    #[arg(long)]
    pub cpus: Option<f64>,
    /// Total memory of running sandboxes, e.g. 64G
    #[arg(long)]
    pub memory: Option<String>,
    /// Total disk of all sandboxes, e.g. 500G
    #[arg(long)]
    pub disk: Option<String>,
    /// Drop every override (back to the server defaults) before applying the flags above
    #[arg(long)]
    pub reset: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand)]
pub enum KeyCmd {
    /// Create an API key (never with more rights than the key you use); prints the secret once
    Create(KeyCreateArgs),
    /// List the keys of your organisation
    Ls {
        /// Organisation id or name (system organisation only)
        #[arg(long)]
        org: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key by id or prefix; it stops working on its next request
    Revoke {
        id: String,
        #[arg(long)]
        org: Option<String>,
    },
}

#[derive(Args)]
pub struct KeyCreateArgs {
    /// A name to recognise the key by
    #[arg(long)]
    pub name: Option<String>,
    /// owner, admin, member or auditor
    #[arg(long, default_value = "member", value_parser = ["owner", "admin", "member", "auditor"])]
    pub role: String,
    /// Narrow the role to RESOURCE:ACTION (repeatable), e.g. sandboxes:read, exec:write,
    /// files:*; resources: sandboxes exec files templates keys orgs audit usage
    #[arg(long = "scope", value_name = "RESOURCE:ACTION")]
    pub scopes: Vec<String>,
    /// Lifetime, e.g. 30d, 12h [default: never expires]
    #[arg(long)]
    pub expires: Option<String>,
    /// Create it in this organisation (system organisation only)
    #[arg(long)]
    pub org: Option<String>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct AuditArgs {
    /// Only entries newer than this, e.g. 1h, 7d
    #[arg(long)]
    pub since: Option<String>,
    /// At most this many entries (newest first)
    #[arg(long, default_value_t = 50)]
    pub limit: u64,
    /// Organisation id or name (system organisation only)
    #[arg(long)]
    pub org: Option<String>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct UsageArgs {
    /// Organisation id or name (system organisation only) [default: your own]
    #[arg(long)]
    pub org: Option<String>,
    /// Start: a duration ago (24h, 7d), a UTC date (2026-11-24), RFC 3339 or unix ms
    /// [default: 24h ago for hours, 30d ago for days]
    #[arg(long)]
    pub from: Option<String>,
    /// End (exclusive), same forms [default: now]
    #[arg(long)]
    pub to: Option<String>,
    /// Split each bucket by key, sandbox, template, agent run or model (the last two show
    /// only agent token usage)
    #[arg(long, value_parser = ["key", "sandbox", "template", "agent", "model"])]
    pub by: Option<String>,
    /// Bucket size
    #[arg(long, default_value = "hour", value_parser = ["hour", "day"])]
    pub granularity: String,
    /// Print the raw usage events (CloudEvents) instead of sums
    #[arg(long)]
    pub events: bool,
    #[arg(long)]
    pub json: bool,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub(crate) fn when(ms: Option<u64>) -> String {
    let Some(t) = ms else { return "-".into() };
    let now = now_ms();
    let (d, later) = if t > now {
        (t - now, true)
    } else {
        (now - t, false)
    };
    let s = d / 1000;
    let txt = if s >= 86400 {
        format!("{}d", s / 86400)
    } else if s >= 3600 {
        format!("{}h", s / 3600)
    } else if s >= 60 {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    };
    if later {
        format!("in {txt}")
    } else {
        format!("{txt} ago")
    }
}

fn q(org: Option<&str>) -> String {
    match org {
        Some(o) => format!("?org={o}"),
        None => String::new(),
    }
}

pub async fn org(g: &Global, c: OrgCmd) -> Result<i32> {
    let api = g.api();
    match c {
        OrgCmd::Create { name, no_key, json } => {
            let req = CreateOrg {
                name,
                owner_key: Some(!no_key),
            };
            let out: OrgCreated = api.json(Method::POST, "/v1/orgs", Some(&req)).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                println!("created organisation {} ({})", out.org.name, out.org.id);
                if let Some(k) = out.key {
                    println!("owner key (shown only now): {}", k.secret);
                }
            }
        }
        OrgCmd::Ls { json } => {
            let list: OrgList = api.json(Method::GET, "/v1/orgs", None::<&()>).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!("{:<18} {:<24} {:<8} CREATED", "ID", "NAME", "SYSTEM");
                for o in &list.orgs {
                    println!(
                        "{:<18} {:<24} {:<8} {}",
                        o.id,
                        o.name,
                        if o.system { "yes" } else { "" },
                        when(Some(o.created_at_ms))
                    );
                }
            }
        }
        OrgCmd::Git(a) => return crate::gitcreds::org_git(g, a).await,
        OrgCmd::Quota(a) => {
            let org = match &a.org {
                Some(o) => o.clone(),
                None => {
                    let me: kiln_protocol::api::Me =
                        api.json(Method::GET, "/v1/me", None::<&()>).await?;
                    me.org
                }
            };
            let path = format!("/v1/orgs/{org}/quota");
            let size = |flag: &str, v: &Option<String>| -> Result<Option<u64>> {
                v.as_deref()
                    .map(|s| {
                        kiln_server::units::parse_size(s).map_err(|e| anyhow!("--{flag}: {e}"))
                    })
                    .transpose()
            };
            let memory = size("memory", &a.memory)?;
            let disk = size("disk", &a.disk)?;
            let changing = a.reset
                || a.sandboxes.is_some()
                || a.cpus.is_some()
                || memory.is_some()
                || disk.is_some();
            let st: QuotaStatus = if changing {
                let cur: QuotaStatus = api.json(Method::GET, &path, None::<&()>).await?;
                let base = if a.reset {
                    Quota::default()
                } else {
                    cur.overrides
                };
                let new = Quota {
                    sandboxes: a.sandboxes.or(base.sandboxes),
                    cpus: a.cpus.or(base.cpus),
                    memory_bytes: memory.or(base.memory_bytes),
                    disk_bytes: disk.or(base.disk_bytes),
                };
                api.json(Method::PUT, &path, Some(&new)).await?
            } else {
                api.json(Method::GET, &path, None::<&()>).await?
            };
            if a.json {
                println!("{}", serde_json::to_string_pretty(&st)?);
            } else {
                let fs = kiln_server::units::format_size;
                let l = &st.limits;
                let u = &st.usage;
                println!("organisation {}", st.org);
                println!("{:<10} {:>10} {:>10}", "QUOTA", "USED", "LIMIT");
                println!(
                    "{:<10} {:>10} {:>10}",
                    "sandboxes",
                    u.sandboxes,
                    l.sandboxes.unwrap_or(0)
                );
                println!(
                    "{:<10} {:>10} {:>10}",
                    "cpus",
                    u.cpus,
                    l.cpus.unwrap_or(0.0)
                );
                println!(
                    "{:<10} {:>10} {:>10}",
                    "memory",
                    fs(u.memory_bytes),
                    fs(l.memory_bytes.unwrap_or(0))
                );
                println!(
                    "{:<10} {:>10} {:>10}",
                    "disk",
                    fs(u.disk_bytes),
                    fs(l.disk_bytes.unwrap_or(0))
                );
            }
        }
    }
    Ok(0)
}

pub async fn key(g: &Global, c: KeyCmd) -> Result<i32> {
    let api = g.api();
    match c {
        KeyCmd::Create(a) => {
            let req = CreateKey {
                name: a.name,
                role: Role::parse(&a.role),
                scopes: a.scopes,
                expires_in: a.expires.map(DurationArg::Text),
                org: a.org,
            };
            let out: KeyCreated = api.json(Method::POST, "/v1/keys", Some(&req)).await?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                eprintln!(
                    "created {} key {} ({}); the secret below is shown only now",
                    out.key.role.as_str(),
                    out.key.id,
                    out.key.prefix
                );
                println!("{}", out.secret);
            }
        }
        KeyCmd::Ls { org, json } => {
            let list: KeyList = api
                .json(
                    Method::GET,
                    &format!("/v1/keys{}", q(org.as_deref())),
                    None::<&()>,
                )
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!(
                    "{:<16} {:<14} {:<12} {:<8} {:<10} {:<10} {:<10} SCOPES",
                    "ID", "PREFIX", "NAME", "ROLE", "LAST USED", "EXPIRES", "STATUS"
                );
                let now = now_ms();
                for k in &list.keys {
                    let status = if k.revoked_at_ms.is_some() {
                        "revoked"
                    } else if k.expires_at_ms.is_some_and(|e| e <= now) {
                        "expired"
                    } else {
                        "active"
                    };
                    println!(
                        "{:<16} {:<14} {:<12} {:<8} {:<10} {:<10} {:<10} {}",
                        k.id,
                        k.prefix,
                        k.name,
                        k.role.as_str(),
                        when(k.last_used_at_ms),
                        when(k.expires_at_ms),
                        status,
                        if k.scopes.is_empty() {
                            "*".to_string()
                        } else {
                            k.scopes.join(",")
                        }
                    );
                }
            }
        }
        KeyCmd::Revoke { id, org } => {
            api.empty(
                Method::DELETE,
                &format!("/v1/keys/{id}{}", q(org.as_deref())),
            )
            .await?;
            eprintln!("revoked {id}");
        }
    }
    Ok(0)
}

pub async fn audit(g: &Global, a: AuditArgs) -> Result<i32> {
    let api = g.api();
    let mut path = format!("/v1/audit?limit={}", a.limit);
    if let Some(s) = &a.since {
        let d = kiln_server::units::parse_duration(s).map_err(|e| anyhow!("--since: {e}"))?;
        path.push_str(&format!(
            "&since={}",
            now_ms().saturating_sub(d.as_millis() as u64)
        ));
    }
    if let Some(o) = &a.org {
        path.push_str(&format!("&org={o}"));
    }
    let list: AuditList = api.json(Method::GET, &path, None::<&()>).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(0);
    }
    println!(
        "{:<9} {:<14} {:<40} {:<7} {:>4} {:<15} RESOURCE",
        "WHEN", "KEY", "ACTION", "OUTCOME", "CODE", "CLIENT"
    );
    for e in &list.entries {
        println!(
            "{:<9} {:<14} {:<40} {:<7} {:>4} {:<15} {}",
            when(Some(e.time_ms)),
            if e.key_prefix.is_empty() {
                "-"
            } else {
                &e.key_prefix
            },
            e.action,
            e.outcome,
            e.status,
            if e.client.is_empty() { "-" } else { &e.client },
            e.resource
        );
    }
    Ok(0)
}

fn query_string(pairs: &[(&str, Option<&str>)]) -> String {
    let parts: Vec<String> = pairs
        .iter()
        .filter_map(|(k, v)| {
            v.map(|v| {
                let enc: String = v
                    .bytes()
                    .map(|b| match b {
                        b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                            (b as char).to_string()
                        }
                        _ => format!("%{b:02X}"),
                    })
                    .collect();
                format!("{k}={enc}")
            })
        })
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}

/// `kiln usage`: metered usage by hour or day (optionally by key, sandbox, template, agent
/// run or model), sandbox time and agent tokens with their cost, or
/// the raw events.
pub async fn usage(g: &Global, a: UsageArgs) -> Result<i32> {
    let api = g.api();
    if a.events {
        let q = query_string(&[
            ("org", a.org.as_deref()),
            ("from", a.from.as_deref()),
            ("to", a.to.as_deref()),
        ]);
        let list: kiln_protocol::api::UsageEventList = api
            .json(Method::GET, &format!("/v1/usage/events{q}"), None::<&()>)
            .await?;
        if a.json {
            for e in &list.events {
                println!("{}", serde_json::to_string(e)?);
            }
            return Ok(0);
        }
        println!(
            "{:<24} {:<26} {:<16} {:>9} {:>8} {:>9} {:>9} {:>9} {:>9}",
            "TIME",
            "TYPE",
            "SANDBOX",
            "SB-SEC",
            "CPU-SEC",
            "MEM-GiBs",
            "DISK-GiBs",
            "TOKENS",
            "COST"
        );
        for e in &list.events {
            let d = &e.data;
            println!(
                "{:<24} {:<26} {:<16} {:>9.1} {:>8.2} {:>9.3} {:>9.3} {:>9} {:>9.4}",
                e.time,
                e.kind,
                d.sandbox,
                d.sandbox_seconds,
                d.cpu_seconds,
                d.memory_gib_seconds,
                d.disk_gib_seconds,
                d.input_tokens + d.output_tokens,
                d.cost_usd
            );
        }
        return Ok(0);
    }
    let q = query_string(&[
        ("org", a.org.as_deref()),
        ("from", a.from.as_deref()),
        ("to", a.to.as_deref()),
        ("by", a.by.as_deref()),
        ("granularity", Some(a.granularity.as_str())),
    ]);
    let r: kiln_protocol::api::UsageReport = api
        .json(Method::GET, &format!("/v1/usage{q}"), None::<&()>)
        .await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(0);
    }
    let group = a.by.as_deref().map(str::to_uppercase).unwrap_or_default();
    println!(
        "{:<24} {:<18} {:>10} {:>9} {:>10} {:>10} {:>10} {:>10} {:>9}",
        if a.granularity == "day" {
            "DAY"
        } else {
            "HOUR"
        },
        group,
        "SB-SEC",
        "CPU-SEC",
        "MEM-GiBs",
        "DISK-GiBs",
        "TOKENS-IN",
        "TOKENS-OUT",
        "COST-USD"
    );
    let line = |start: &str, group: &str, u: &kiln_protocol::api::UsageTotals| {
        println!(
            "{:<24} {:<18} {:>10.1} {:>9.2} {:>10.3} {:>10.3} {:>10} {:>10} {:>9.4}",
            start,
            group,
            u.sandbox_seconds,
            u.cpu_seconds,
            u.memory_gib_seconds,
            u.disk_gib_seconds,
            u.input_tokens,
            u.output_tokens,
            u.cost_usd
        )
    };
    for b in &r.buckets {
        line(&b.start, b.group.as_deref().unwrap_or(""), &b.usage);
    }
    line("TOTAL", "", &r.total);
    Ok(0)
}
