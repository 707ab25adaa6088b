//! Kiln's HTTP API server (`kiln up`): the sandbox API under `/v1`, Prometheus metrics at
//! `/metrics`, bearer-token auth, SQLite state, reconciliation on start, the warm pool and the
//! TTL reaper.
//!
//! What it does not do: command-line parsing (that is `kiln-cli`) or anything inside a sandbox
//! (that is `kilnd`, reached through `kiln-sandbox`).

pub mod config;
pub mod error;
pub mod http;
pub mod service;
pub mod templates;
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

/// Reads the API token from `data_dir/token`, creating it (mode 0600) on first start.
/// Returns the token and whether it was just created.
pub fn ensure_token(data_dir: &Path) -> Result<(String, bool), ServerError> {
    let p = data_dir.join("token");
    match std::fs::read_to_string(&p) {
        Ok(t) if !t.trim().is_empty() => return Ok((t.trim().to_string(), false)),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(&p)(e)),
    }
    use rand::Rng;
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rngs::OsRng;
    let secret: String = (0..40)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect();
    let token = format!("kiln_{secret}");
    let tmp = p.with_extension("tmp");
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode_0600()
            .open(&tmp)
            .map_err(io(&tmp))?;
        f.write_all(format!("{token}\n").as_bytes())
            .map_err(io(&tmp))?;
    }
    std::fs::rename(&tmp, &p).map_err(io(&p))?;
    Ok((token, true))
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
            let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok().map(|_| handle)
        })
        .clone()
}

/// Opens state, prepares the runtime and reconciles: everything `serve` does before listening.
pub async fn start(cfg: ServerConfig) -> Result<Arc<Kiln>, ServerError> {
    std::fs::create_dir_all(&cfg.data_dir).map_err(io(&cfg.data_dir))?;
    let (token, _) = ensure_token(&cfg.data_dir)?;
    let images = kiln_template::ImageStore::open(&cfg.images_dir)?;
    let kilnd_path = install_kilnd(&cfg.kilnd_path, &cfg.data_dir)?;
    let store = kiln_store::Store::open(&cfg.data_dir.join("kiln.db"))?;
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
    let kiln = Arc::new(Kiln::new(
        cfg,
        store,
        images,
        runtime,
        token,
        metrics_handle(),
    ));
    kiln.reconcile()
        .await
        .map_err(|e| ServerError::Reconcile(e.to_string()))?;
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
    on_listen(bound);
    let sd = shutdown.clone();
    // Streams are many small writes; without TCP_NODELAY, Nagle + delayed ACK add ~40 ms.
    let result = axum::serve(listener, app(kiln.clone()))
        .tcp_nodelay(true)
        .with_graceful_shutdown(async move { sd.cancelled().await })
        .await;
    shutdown.cancel();
    kiln.drain_pool().await;
    // With no user sandboxes left, release everything (disk pool mount, cgroup parents) so a
    // stopped server leaves nothing in the kernel; otherwise the next start adopts them.
    if kiln
        .store
        .list(true)
        .map(|rows| rows.is_empty())
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
