//! `kiln up`: prepares everything a fresh machine needs (data dir, token, base image) and runs
//! the server until SIGTERM/SIGINT.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;

#[derive(Args, Debug)]
pub struct UpArgs {
    /// Address to listen on
    #[arg(long, env = "KILN_LISTEN", default_value = "127.0.0.1:7777")]
    pub listen: SocketAddr,
    /// Image store directory [default: <data dir>/images]
    #[arg(long, env = "KILN_IMAGES_DIR")]
    pub images_dir: Option<PathBuf>,
    /// OCI runtime: runc, crun, runsc or youki
    #[arg(long, env = "KILN_RUNTIME", default_value = "runc")]
    pub runtime: String,
    /// Path of the OCI runtime binary [default: found in PATH]
    #[arg(long, env = "KILN_RUNTIME_PATH")]
    pub runtime_path: Option<PathBuf>,
    /// Path of the static kilnd binary [default: next to this executable]
    #[arg(long, env = "KILN_KILND")]
    pub kilnd: Option<PathBuf>,
    /// Idle sandboxes kept ready for the default `base` spec (0 disables the warm pool)
    #[arg(long, env = "KILN_WARM_POOL", default_value_t = 2)]
    pub warm_pool: usize,
    /// Size of the sparse filesystem that holds every sandbox's writable layer
    #[arg(long, default_value = "64G")]
    pub disk_pool: String,
    /// Default vCPUs of a sandbox
    #[arg(long, default_value_t = 1.0)]
    pub default_cpus: f64,
    /// Default memory limit of a sandbox
    #[arg(long, default_value = "512M")]
    pub default_memory: String,
    /// Default disk limit of a sandbox
    #[arg(long, default_value = "2G")]
    pub default_disk: String,
    /// Longest TTL a create may ask for (e.g. 24h) [default: unbounded]
    #[arg(long)]
    pub max_ttl: Option<String>,
    /// Do not build the base image if it is missing
    #[arg(long)]
    pub no_build: bool,
    /// Run sandboxes without a user namespace (by default every sandbox's root is host uid
    /// 100000 inside one)
    #[arg(long)]
    pub no_userns: bool,
    /// Log filter (tracing EnvFilter syntax), e.g. info, kiln_server=debug
    #[arg(long, env = "KILN_LOG", default_value = "info")]
    pub log: String,
    /// Log line format: text, or json (one object per line, with the request id)
    #[arg(long, env = "KILN_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
    /// Keep state in PostgreSQL (postgres://user@host/db) instead of SQLite in the data dir.
    /// Replicas on one database must share the --secret-file.
    #[arg(long, env = "KILN_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// The key-hashing secret [default: <data dir>/secret, created 0600 on first start]
    #[arg(long, env = "KILN_SECRET_FILE")]
    pub secret_file: Option<PathBuf>,
    /// Default quota per organisation: concurrent (creating or running) sandboxes
    #[arg(long, default_value_t = 100)]
    pub org_max_sandboxes: u64,
    /// Default quota per organisation: total vCPUs of running sandboxes
    #[arg(long, default_value_t = 64.0)]
    pub org_max_cpus: f64,
    /// Default quota per organisation: total memory of running sandboxes
    #[arg(long, default_value = "256G")]
    pub org_max_memory: String,
    /// Default quota per organisation: total disk of all its sandboxes
    #[arg(long, default_value = "1T")]
    pub org_max_disk: String,
    /// Where to listen for SSH (`ssh SANDBOX_ID@HOST -p PORT`) [default: the --listen
    /// address, port 2222]
    #[arg(long, env = "KILN_SSH_LISTEN")]
    pub ssh_listen: Option<SocketAddr>,
    /// Do not listen for SSH
    #[arg(long, conflicts_with = "ssh_listen")]
    pub no_ssh: bool,
    /// Wildcard preview domain: requests for `{port}-{sandbox id}.DOMAIN` (a wildcard DNS
    /// record pointing here) are proxied to that port of the sandbox
    #[arg(long, env = "KILN_PREVIEW_DOMAIN")]
    pub preview_domain: Option<String>,
    /// How long audit entries are kept (e.g. 90d; 0 keeps them forever)
    #[arg(long, default_value = "90d")]
    pub audit_retention: String,
    /// How often each sandbox's CPU, memory and disk use is sampled into usage events
    /// (a crash loses at most one interval of memory and disk accounting)
    #[arg(long, default_value = "15s")]
    pub meter_interval: String,
    /// Agent configuration (TOML): providers, models with context windows and prices,
    /// profiles; without it, `openai/`, `ollama/` and `anthropic/` models use OPENAI_BASE_URL +
    /// OPENAI_API_KEY, OLLAMA_HOST, ANTHROPIC_BASE_URL + ANTHROPIC_API_KEY
    #[arg(long = "agent-config", env = "KILN_AGENT_CONFIG")]
    pub agent_config: Option<PathBuf>,
    /// Let tenants index git repositories on loopback, private and link-local addresses (a
    /// git server on your LAN); off by default, as such URLs reach the server's own network.
    /// The system organisation may always
    #[arg(long, env = "KILN_GIT_PRIVATE_HOSTS")]
    pub git_private_hosts: bool,
}

pub(crate) fn find_kilnd(explicit: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        if p.is_file() {
            return Ok(p);
        }
        bail!(
            "kilnd not found at {} (hint: build it with `make build`)",
            p.display()
        );
    }
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            candidates.push(dir.join("kilnd"));
            // `cargo build` puts the static build under target/x86_64-unknown-linux-gnu/kilnd/.
            if let Some(target) = dir.parent() {
                candidates.push(target.join("x86_64-unknown-linux-gnu/kilnd/kilnd"));
            }
        }
    }
    candidates.push(PathBuf::from("/usr/local/lib/kiln/kilnd"));
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .ok_or_else(|| anyhow!("the kilnd binary was not found next to `kiln` (hint: run `make build`, or pass --kilnd PATH)"))
}

/// Runs the server; its state directory is the global `--data-dir` (`KILN_DATA_DIR`,
/// default /var/lib/kiln).
pub async fn run(data_dir: Option<PathBuf>, a: UpArgs) -> Result<i32> {
    let data_dir = data_dir.unwrap_or_else(|| PathBuf::from(crate::api::DEFAULT_DATA_DIR));
    let filter =
        tracing_subscriber::EnvFilter::try_new(&a.log).map_err(|e| anyhow!("--log: {e}"))?;
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if a.log_format == "json" {
        fmt.json().with_current_span(true).init();
    } else {
        fmt.init();
    }
    if !nix_is_root() {
        bail!("kiln up must run as root: it mounts overlays and runs an OCI runtime (hint: sudo kiln up)");
    }
    let kilnd = find_kilnd(a.kilnd)?;
    let name = if a.runtime == "gvisor" {
        "runsc"
    } else {
        a.runtime.as_str()
    };
    let runtime = kiln_server::config::runtime_kind(name).ok_or_else(|| {
        anyhow!(
            "unknown --runtime `{}` (hint: use runc, crun, runsc or youki)",
            a.runtime
        )
    })?;
    let size =
        |flag: &str, v: &str| kiln_server::units::parse_size(v).map_err(|e| anyhow!("{flag}: {e}"));
    let mut cfg = kiln_server::ServerConfig::new(data_dir, kilnd);
    cfg.listen = a.listen;
    if let Some(d) = &a.preview_domain {
        let d = d.trim().trim_matches('.').to_ascii_lowercase();
        if d.is_empty()
            || !d.contains('.')
            || d.chars()
                .any(|c| !(c.is_ascii_alphanumeric() || c == '.' || c == '-'))
        {
            return Err(anyhow!(
                "--preview-domain `{}` is not a domain name (hint: e.g. --preview-domain preview.example.com)",
                a.preview_domain.as_deref().unwrap_or_default()
            ));
        }
        cfg.preview_domain = Some(d);
    }
    cfg.ssh_listen = (!a.no_ssh).then(|| {
        a.ssh_listen
            .unwrap_or_else(|| SocketAddr::new(a.listen.ip(), 2222))
    });
    if let Some(d) = a.images_dir {
        cfg.images_dir = d;
    }
    cfg.runtime = runtime;
    cfg.runtime_path = a.runtime_path;
    cfg.warm_pool = a.warm_pool;
    cfg.userns = !a.no_userns;
    cfg.disk_pool_bytes = size("--disk-pool", &a.disk_pool)?;
    cfg.defaults.cpus = a.default_cpus;
    cfg.defaults.memory_bytes = size("--default-memory", &a.default_memory)?;
    cfg.defaults.disk_bytes = size("--default-disk", &a.default_disk)?;
    if let Some(t) = &a.max_ttl {
        cfg.max_ttl =
            Some(kiln_server::units::parse_duration(t).map_err(|e| anyhow!("--max-ttl: {e}"))?);
    }
    cfg.git_private_hosts = a.git_private_hosts;
    cfg.database_url = a.database_url.clone();
    cfg.secret_path = a.secret_file.clone();
    cfg.quota = kiln_store::Limits {
        sandboxes: a.org_max_sandboxes,
        cpus: a.org_max_cpus,
        memory_bytes: size("--org-max-memory", &a.org_max_memory)?,
        disk_bytes: size("--org-max-disk", &a.org_max_disk)?,
    };
    let retention = kiln_server::units::parse_duration(&a.audit_retention)
        .map_err(|e| anyhow!("--audit-retention: {e}"))?;
    cfg.audit_retention = (!retention.is_zero()).then_some(retention);
    cfg.meter_interval = kiln_server::units::parse_duration(&a.meter_interval)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| anyhow!("--meter-interval: expected a duration such as 15s or 1m (hint: it must be above zero)"))?;
    if let Some(p) = &a.agent_config {
        let text = std::fs::read_to_string(p)
            .with_context(|| format!("cannot read the agent config {}", p.display()))?;
        cfg.agents = kiln_agent::config::AgentConfig::from_toml(&text)
            .with_context(|| format!("in {}", p.display()))?;
    }
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("cannot create {}", cfg.data_dir.display()))?;
    if !a.no_build {
        let store = kiln_template::ImageStore::open(&cfg.images_dir)?;
        if store.get("base").is_err() {
            eprintln!("kiln: building the base template (debootstrap + Ansible roles, a few minutes on first start)");
            let dir = cfg.images_dir.clone();
            tokio::task::spawn_blocking(move || {
                crate::template::build(
                    &dir,
                    &kiln_template::Sources::discover(None, None),
                    "base",
                    &kiln_template::BuildOptions::default(),
                    false,
                )
            })
            .await??;
        }
    }
    let data_dir = cfg.data_dir.clone();
    let kiln = kiln_server::start(cfg)
        .await
        .context("cannot start the server")?;
    if let Some(key) = &kiln.created_owner_key {
        eprintln!("kiln: created the system organisation and its owner key {key}");
        eprintln!(
            "kiln: it is stored in {}/token (mode 0600) and shown only now; the CLI reads it from there",
            data_dir.display()
        );
    }
    let shutdown = tokio_util::sync::CancellationToken::new();
    let sd = shutdown.clone();
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return,
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutting down");
        sd.cancel();
    });
    let k = kiln.clone();
    kiln_server::serve(kiln, shutdown, move |addr| {
        tracing::info!(%addr, "kiln is listening");
        eprintln!("kiln: listening on http://{addr}");
        if let Some(ssh) = k.ssh.get() {
            eprintln!(
                "kiln: ssh on {} (ssh -p {} SANDBOX_ID@HOST)",
                ssh.addr,
                ssh.addr.port()
            );
        }
    })
    .await?;
    Ok(0)
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
