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
}

fn find_kilnd(explicit: Option<PathBuf>) -> Result<PathBuf> {
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
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
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
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("cannot create {}", cfg.data_dir.display()))?;
    let (token, created) = kiln_server::ensure_token(&cfg.data_dir)?;
    if created {
        eprintln!("kiln: created API token {token}");
        eprintln!(
            "kiln: it is stored in {}/token (mode 0600); the CLI reads it from there",
            cfg.data_dir.display()
        );
    }
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
    let kiln = kiln_server::start(cfg)
        .await
        .context("cannot start the server")?;
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
    kiln_server::serve(kiln, shutdown, |addr| {
        tracing::info!(%addr, "kiln is listening");
        eprintln!("kiln: listening on http://{addr}");
    })
    .await?;
    Ok(0)
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
