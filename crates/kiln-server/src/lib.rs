//! Kiln's HTTP API server (`kiln up`): the sandbox API under `/v1`, Prometheus metrics at
//! `/metrics`, organisations and API keys, SQLite or PostgreSQL state, reconciliation on start, the warm pool and the
//! TTL reaper.
//!
//! What it does not do: command-line parsing (that is `kiln-cli`) or anything inside a sandbox
//! (that is `kilnd`, reached through `kiln-sandbox`).

pub mod admin;
pub mod agents;
pub mod auditlog;
pub mod config;
pub mod devtools;
pub mod error;
pub mod gitcreds;
pub mod http;
pub mod knowledge;
pub mod metering;
pub mod openapi;
pub mod preview;
pub mod ratelimit;
pub mod service;
pub mod ssh;
pub mod templates;
pub mod tenancy;
pub mod units;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

pub use config::{Defaults, ServerConfig};
pub use http::app;
pub use service::{AppState, Caller, Kiln};
use tokio_util::sync::CancellationToken;

/// Errors that stop the server from starting or serving.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot prepare {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] kiln_store::StoreError),
    #[error(transparent)]
    Template(#[from] kiln_template::TemplateError),
    #[error(transparent)]
    Sandbox(#[from] kiln_sandbox::SandboxError),
    #[error("reconcile failed: {0}")]
    Reconcile(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ServerError + '_ {
    move |source| ServerError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Writes `contents` to `path` with mode 0600, atomically (temp file + rename).
pub fn write_0600(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode_0600()
            .open(&tmp)?;
        f.write_all(contents.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

trait Mode0600 {
    fn mode_0600(&mut self) -> &mut Self;
}
impl Mode0600 for std::fs::OpenOptions {
    fn mode_0600(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.mode(0o600)
    }
}

/// Copies kilnd into `data_dir/bin/kilnd-<digest>` so running sandboxes keep the exact binary
/// they were started with even when a newer one is installed. Returns the stable path.
pub fn install_kilnd(src: &Path, data_dir: &Path) -> Result<PathBuf, ServerError> {
    use sha2::Digest;
    let bytes = std::fs::read(src).map_err(io(src))?;
    let digest = hex::encode(&sha2::Sha256::digest(&bytes)[..8]);
    let dir = data_dir.join("bin");
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let dest = dir.join(format!("kilnd-{digest}"));
    if !dest.is_file() {
        let tmp = dest.with_extension("tmp");
        std::fs::write(&tmp, &bytes).map_err(io(&tmp))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &dest).map_err(io(&dest))?;
    }
    Ok(dest)
}

/// The process-wide Prometheus recorder (installed once; later servers in the same process —
/// tests — share it).
pub fn metrics_handle() -> Option<metrics_exporter_prometheus::PrometheusHandle> {
    static HANDLE: OnceLock<Option<metrics_exporter_prometheus::PrometheusHandle>> =
        OnceLock::new();
    HANDLE
        .get_or_init(|| {
            const SECONDS: &[f64] = &[
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ];
            let builder = metrics_exporter_prometheus::PrometheusBuilder::new();
            // Latencies as real histograms (buckets), so they aggregate across servers.
            let builder = builder
                .set_buckets(SECONDS)
                .unwrap_or_else(|_| metrics_exporter_prometheus::PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok().map(|_| handle)
        })
        .clone()
}

/// Opens state, prepares the runtime and reconciles: everything `serve` does before listening.
pub async fn start(cfg: ServerConfig) -> Result<Arc<Kiln>, ServerError> {
    std::fs::create_dir_all(&cfg.data_dir).map_err(io(&cfg.data_dir))?;
    let images = kiln_template::ImageStore::open(&cfg.images_dir)?;
    let kilnd_path = install_kilnd(&cfg.kilnd_path, &cfg.data_dir)?;
    let host_path = cfg.data_dir.join("host-id");
    let host = match std::fs::read_to_string(&host_path) {
        Ok(h) if !h.trim().is_empty() => h.trim().to_string(),
        _ => {
            let h = kiln_store::random_id("host_", 12);
            write_0600(&host_path, &format!("{h}\n")).map_err(io(&host_path))?;
            h
        }
    };
    let store =
        kiln_store::Store::connect(cfg.database_url.as_deref(), &cfg.data_dir.join("kiln.db"))
            .await?
            .with_host(&host);
    let secret_path = cfg
        .secret_path
        .clone()
        .unwrap_or_else(|| cfg.data_dir.join("secret"));
    let hasher = tenancy::KeyHasher::load_or_create(&secret_path).map_err(io(&secret_path))?;
    let boot = tenancy::bootstrap(&store, &hasher, &cfg.data_dir, service::now_ms()).await?;
    let token = std::fs::read_to_string(cfg.data_dir.join("token"))
        .map(|t| t.trim().to_string())
        .unwrap_or_default();
    let rt_cfg = kiln_sandbox::RuntimeConfig {
        data_dir: cfg.data_dir.clone(),
        run_dir: cfg.run_dir(),
        runtime: cfg.runtime,
        runtime_path: cfg.runtime_path.clone(),
        kilnd_path,
        disk_pool_bytes: cfg.disk_pool_bytes,
        bridge: cfg.bridge.clone(),
        subnet: cfg.subnet.clone(),
        cgroup_parent: format!("kiln/{}", cfg.instance_tag()),
        userns: cfg.userns.then_some(kiln_sandbox::IdMap::DEFAULT),
    };
    let runtime = kiln_sandbox::Runtime::new(rt_cfg).await?;
    let mut kiln = Kiln::new(
        cfg,
        store,
        images,
        runtime,
        token,
        hasher,
        boot.system_org.clone(),
        metrics_handle(),
    );
    kiln.created_owner_key = boot.created_key;
    let kiln = Arc::new(kiln);
    kiln.reconcile()
        .await
        .map_err(|e| ServerError::Reconcile(e.to_string()))?;
    // The tools of the configured MCP servers (a server that fails is logged and left out).
    for e in agents::agents(&kiln).connect_mcp().await {
        tracing::error!(error = %e, "MCP server unavailable; its tools are not offered");
    }
    // Unfinished agent runs of this server continue from their event logs.
    match agents::agents(&kiln).resume_all().await {
        Ok(0) => {}
        Ok(n) => tracing::info!(runs = n, "resumed agent runs"),
        Err(e) => tracing::warn!(error = %e, "resuming agent runs"),
    }
    Ok(kiln)
}

/// Serves until `shutdown` fires, then stops cleanly: stops accepting, finishes in-flight
/// requests, removes idle warm-pool sandboxes and, if no user sandbox is left, releases the
/// runtime's kernel resources. User sandboxes keep running and are adopted by the next start. `on_listen` is called with the bound address.
pub async fn serve(
    kiln: Arc<Kiln>,
    shutdown: CancellationToken,
    on_listen: impl FnOnce(SocketAddr),
) -> Result<(), ServerError> {
    let addr = kiln.cfg.listen;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| ServerError::Bind { addr, source })?;
    kiln.spawn_background(shutdown.clone());
    if let Some(ssh) = kiln.cfg.ssh_listen {
        ssh::start(kiln.clone(), ssh, shutdown.clone()).await?;
    }
    on_listen(bound);
    let sd = shutdown.clone();
    let k2 = kiln.clone();
    // Streams are many small writes; without TCP_NODELAY, Nagle + delayed ACK add ~40 ms.
    let result = axum::serve(
        listener,
        app(kiln.clone()).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .tcp_nodelay(true)
    .with_graceful_shutdown(async move {
        sd.cancelled().await;
        // Agent runs pause (they resume on the next start) and their event streams end.
        if let Some(a) = k2.agents.get() {
            a.shutdown();
        }
    })
    .await;
    shutdown.cancel();
    if let Some(a) = kiln.agents.get() {
        a.close_mcp().await;
    }
    // Close every open usage window and store every queued audit entry, so a clean stop
    // loses no accounting at all.
    kiln.meter_all().await;
    kiln.audit.flush().await;
    kiln.drain_pool().await;
    // With no user sandboxes left, release everything (disk pool mount, cgroup parents) so a
    // stopped server leaves nothing in the kernel; otherwise the next start adopts them.
    if kiln
        .store
        .count(true)
        .await
        .map(|n| n == 0)
        .unwrap_or(false)
    {
        if let Err(e) = kiln.runtime.destroy_all().await {
            tracing::warn!(error = %e, "releasing runtime resources failed");
        }
    }
    result.map_err(|source| ServerError::Io {
        path: "http server".into(),
        source,
    })
}
