//! The sandbox service: admission (validation, defaults, warm-pool claims), lifecycle,
//! reconciliation at start, the warm-pool filler and the TTL reaper. HTTP handlers call this;
//! it knows nothing about HTTP beyond returning [`ApiError`]s.
//!
//! Architecture invariant: every lookup of a sandbox by id from a request goes through
//! [`Kiln::sandbox`], the one place that decides whether the caller may see it. A sandbox the
//! caller may not see is answered exactly like one that does not exist (404).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use kiln_protocol::api::{CreateSandbox, NetworkMode, Sandbox, SandboxState};
use kiln_sandbox::{Runtime, RuntimeStatus, SandboxSpec};
use kiln_store::{PoolKey, SandboxRow, Store};
use kiln_template::ImageStore;
use tokio::sync::Notify;

use crate::config::ServerConfig;
use crate::error::ApiError;
use crate::units;

/// Who is calling. Today every valid token is the single operator; organisations and keys
/// (a later issue) extend this type, and [`Kiln::sandbox`] is where they are enforced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
}

/// The running server's shared state.
pub struct Kiln {
    pub cfg: ServerConfig,
    pub store: Store,
    pub images: ImageStore,
    pub runtime: Runtime,
    pub token: String,
    pool_wake: Notify,
    pub(crate) metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
}

/// Shared handle used as axum state.
pub type AppState = Arc<Kiln>;

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A new sandbox id: `sb-` and 12 characters of [a-z0-9] (62 bits).
pub fn new_sandbox_id() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::thread_rng();
    let s: String = (0..12)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect();
    format!("sb-{s}")
}

const POOL_TEMPLATE: &str = "base";

/// A validated create request.
#[derive(Debug, Clone)]
struct Admitted {
    template: String,
    image: kiln_template::ImageRef,
    cpus: f64,
    memory_bytes: u64,
    disk_bytes: u64,
    network: NetworkMode,
    expires_at_ms: Option<u64>,
    labels: BTreeMap<String, String>,
    use_pool: bool,
}

impl Kiln {
    pub fn new(
        cfg: ServerConfig,
        store: Store,
        images: ImageStore,
        runtime: Runtime,
        token: String,
        metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    ) -> Self {
        Self {
            cfg,
            store,
            images,
            runtime,
            token,
            pool_wake: Notify::new(),
            metrics,
        }
    }

    /// The sandbox `id` as `caller` may see it (404 otherwise). Warm-pool members are invisible.
    pub fn sandbox(&self, _caller: &Caller, id: &str) -> Result<Sandbox, ApiError> {
        match self.store.get(id)? {
            Some(row) if !row.pooled => Ok(row.sandbox),
            _ => Err(ApiError::sandbox_not_found(id)),
        }
    }

    /// Like [`Self::sandbox`], but the sandbox must be running (409 if paused or dead).
    pub fn running(&self, caller: &Caller, id: &str) -> Result<Sandbox, ApiError> {
        let sb = self.sandbox(caller, id)?;
        match sb.state {
            SandboxState::Running => Ok(sb),
            SandboxState::Paused => Err(ApiError::new(
                StatusCode::CONFLICT,
                "sandbox_paused",
                format!("sandbox `{id}` is paused"),
            )
            .hint(format!("resume it first: `kiln sandbox resume {id}`"))),
            SandboxState::Creating => Err(ApiError::new(
                StatusCode::CONFLICT,
                "sandbox_creating",
                format!("sandbox `{id}` is still being created"),
            )
            .hint("retry in a moment")),
            SandboxState::Dead => Err(ApiError::new(
                StatusCode::CONFLICT,
                "sandbox_dead",
                format!("sandbox `{id}` is dead: its processes are gone"),
            )
            .hint(format!(
                "remove it with `kiln sandbox rm {id}` and create a new one"
            ))),
        }
    }

    /// The kilnd client of a running sandbox.
    pub fn client(&self, caller: &Caller, id: &str) -> Result<kilnd::client::Client, ApiError> {
        self.running(caller, id)?;
        Ok(self.runtime.client(id))
    }

    /// Turns a failure to reach a sandbox's daemon into the right answer, marking the sandbox
    /// dead when its container is gone.
    pub async fn daemon_error(&self, id: &str, e: kilnd::client::ClientError) -> ApiError {
        if matches!(e, kilnd::client::ClientError::Connect(_)) {
            if let Ok(RuntimeStatus::Stopped | RuntimeStatus::Missing) =
                self.runtime.status(id).await
            {
                let _ = self.store.set_state(id, SandboxState::Dead);
                return ApiError::new(
                    StatusCode::CONFLICT,
                    "sandbox_dead",
                    format!("sandbox `{id}` is dead: its init process exited (out of memory?)"),
                )
                .hint(format!(
                    "remove it with `kiln sandbox rm {id}` and create a new one"
                ));
            }
        }
        e.into()
    }

    /// Awaits a call to sandbox `id`'s daemon and turns its failure into the API's answer
    /// through [`Self::daemon_error`]. Every handler that talks to kilnd goes through here, so
    /// a vanished sandbox is reported (and marked dead) the same way by every endpoint.
    pub async fn daemon<T>(
        &self,
        id: &str,
        call: impl std::future::Future<Output = Result<T, kilnd::client::ClientError>>,
    ) -> Result<T, ApiError> {
        match call.await {
            Ok(v) => Ok(v),
            Err(e) => Err(self.daemon_error(id, e).await),
        }
    }

    pub fn list(&self, _caller: &Caller) -> Result<Vec<Sandbox>, ApiError> {
        Ok(self
            .store
            .list(false)?
            .into_iter()
            .map(|r| r.sandbox)
            .collect())
    }

    fn admit(&self, req: CreateSandbox) -> Result<Admitted, ApiError> {
        let template = req.template.unwrap_or_else(|| POOL_TEMPLATE.to_string());
        let image = self.images.get(&template)?;
        let d = &self.cfg.defaults;
        let cpus = req.cpus.unwrap_or(d.cpus);
        if !(cpus.is_finite() && cpus >= 0.01 && cpus <= self.cfg.max_cpus) {
            return Err(ApiError::invalid(format!(
                "cpus must be between 0.01 and {} (this machine's limit), got {cpus}",
                self.cfg.max_cpus
            )));
        }
        let memory_bytes = match &req.memory {
            Some(m) => units::size_arg(m).map_err(|e| ApiError::invalid(format!("memory: {e}")))?,
            None => d.memory_bytes,
        };
        if memory_bytes < 16 << 20 || memory_bytes > self.cfg.max_memory_bytes {
            return Err(ApiError::invalid(format!(
                "memory must be between 16M and {}, got {}",
                units::format_size(self.cfg.max_memory_bytes),
                units::format_size(memory_bytes)
            )));
        }
        let disk_bytes = match &req.disk {
            Some(m) => units::size_arg(m).map_err(|e| ApiError::invalid(format!("disk: {e}")))?,
            None => d.disk_bytes,
        };
        let max_disk = self.cfg.max_disk_bytes.min(self.cfg.disk_pool_bytes);
        if disk_bytes < 16 << 20 || disk_bytes > max_disk {
            return Err(ApiError::invalid(format!(
                "disk must be between 16M and {}, got {}",
                units::format_size(max_disk),
                units::format_size(disk_bytes)
            )));
        }
        let expires_at_ms = match &req.ttl {
            Some(t) => {
                let ttl =
                    units::duration_arg(t).map_err(|e| ApiError::invalid(format!("ttl: {e}")))?;
                if ttl.is_zero() {
                    return Err(ApiError::invalid("ttl must be greater than zero"));
                }
                if let Some(max) = self.cfg.max_ttl {
                    if ttl > max {
                        return Err(ApiError::invalid(format!(
                            "ttl {} exceeds this server's maximum of {}",
                            humantime::format_duration(ttl),
                            humantime::format_duration(max)
                        )));
                    }
                }
                Some(now_ms() + ttl.as_millis() as u64)
            }
            None => None,
        };
        for (k, v) in &req.labels {
            if k.is_empty() || k.len() > 128 || v.len() > 1024 {
                return Err(ApiError::invalid(
                    "labels: keys must be 1-128 bytes and values at most 1024 bytes",
                ));
            }
        }
        Ok(Admitted {
            template,
            image,
            cpus,
            memory_bytes,
            disk_bytes,
            network: req.network.unwrap_or_default(),
            expires_at_ms,
            labels: req.labels,
            use_pool: req.pool.unwrap_or(true),
        })
    }

    fn spec_for(&self, id: &str, a: &Admitted) -> SandboxSpec {
        SandboxSpec {
            id: id.to_string(),
            layers: self.images.lower_dirs(&a.image),
            cpus: a.cpus,
            memory_bytes: a.memory_bytes,
            disk_bytes: a.disk_bytes,
            pids_limit: self.cfg.defaults.pids_limit,
            network: a.network.clone(),
            hostname: id.to_string(),
            env: vec![("KILN_SANDBOX_ID".to_string(), id.to_string())],
            egress: None,
        }
    }

    /// Creates a sandbox: claims a warm-pool member when one matches, else creates cold.
    pub async fn create(&self, _caller: &Caller, req: CreateSandbox) -> Result<Sandbox, ApiError> {
        let started = Instant::now();
        let a = self.admit(req)?;
        if a.use_pool && self.cfg.warm_pool > 0 {
            let key = PoolKey {
                template: a.template.clone(),
                cpus: a.cpus,
                memory_bytes: a.memory_bytes,
                disk_bytes: a.disk_bytes,
                network: a.network.clone(),
            };
            if let Some(row) =
                self.store
                    .claim_pooled(&key, now_ms(), a.expires_at_ms, &a.labels)?
            {
                self.pool_wake.notify_one();
                metrics::counter!("kiln_sandboxes_created_total", "source" => "pool").increment(1);
                metrics::histogram!("kiln_sandbox_create_seconds", "source" => "pool")
                    .record(started.elapsed().as_secs_f64());
                return Ok(row.sandbox);
            }
        }
        let sb = self.create_cold(&a, false).await?;
        metrics::counter!("kiln_sandboxes_created_total", "source" => "cold").increment(1);
        metrics::histogram!("kiln_sandbox_create_seconds", "source" => "cold")
            .record(started.elapsed().as_secs_f64());
        Ok(sb)
    }

    async fn create_cold(&self, a: &Admitted, pooled: bool) -> Result<Sandbox, ApiError> {
        let id = new_sandbox_id();
        let mut sandbox = Sandbox {
            id: id.clone(),
            template: a.template.clone(),
            image: a.image.layers.first().cloned().unwrap_or_default(),
            state: SandboxState::Creating,
            cpus: a.cpus,
            memory_bytes: a.memory_bytes,
            disk_bytes: a.disk_bytes,
            network: a.network.clone(),
            created_at_ms: now_ms(),
            expires_at_ms: if pooled { None } else { a.expires_at_ms },
            from_pool: false,
            labels: if pooled {
                BTreeMap::new()
            } else {
                a.labels.clone()
            },
            ip: None,
        };
        // Record first, as `creating`: a crash during create leaves a known id that reconcile
        // cleans up, and nothing can claim or use the sandbox before it is ready.
        self.store.insert(&SandboxRow {
            sandbox: sandbox.clone(),
            pooled,
        })?;
        match self.runtime.create(&self.spec_for(&id, a)).await {
            Ok(created) => {
                self.store.mark_created(&id, created.ip.as_deref())?;
                sandbox.state = SandboxState::Running;
                sandbox.ip = created.ip;
                Ok(sandbox)
            }
            Err(e) => {
                let _ = self.runtime.remove(&id).await;
                let _ = self.store.delete(&id);
                Err(e.into())
            }
        }
    }

    pub async fn remove(&self, caller: &Caller, id: &str) -> Result<(), ApiError> {
        self.sandbox(caller, id)?;
        self.destroy(id).await
    }

    async fn destroy(&self, id: &str) -> Result<(), ApiError> {
        self.runtime.remove(id).await?;
        self.store.delete(id)?;
        metrics::counter!("kiln_sandboxes_removed_total").increment(1);
        Ok(())
    }

    pub async fn pause(&self, caller: &Caller, id: &str) -> Result<Sandbox, ApiError> {
        let sb = self.sandbox(caller, id)?;
        match sb.state {
            SandboxState::Paused => Ok(sb),
            SandboxState::Dead | SandboxState::Creating => Err(self
                .running(caller, id)
                .err()
                .unwrap_or_else(|| ApiError::internal("state"))),
            SandboxState::Running => {
                self.runtime.pause(id).await?;
                self.store.set_state(id, SandboxState::Paused)?;
                self.sandbox(caller, id)
            }
        }
    }

    pub async fn resume(&self, caller: &Caller, id: &str) -> Result<Sandbox, ApiError> {
        let sb = self.sandbox(caller, id)?;
        match sb.state {
            SandboxState::Running => Ok(sb),
            SandboxState::Dead | SandboxState::Creating => Err(self
                .running(caller, id)
                .err()
                .unwrap_or_else(|| ApiError::internal("state"))),
            SandboxState::Paused => {
                self.runtime.resume(id).await?;
                self.store.set_state(id, SandboxState::Running)?;
                self.sandbox(caller, id)
            }
        }
    }

    /// Brings the store and the runtime into agreement after a start: artefacts of unknown
    /// sandboxes are removed, known sandboxes whose processes are gone are marked dead and their
    /// resources released, and paused/running states are re-read.
    pub async fn reconcile(&self) -> Result<(), ApiError> {
        let rows = self.store.list(true)?;
        let known: Vec<String> = rows.iter().map(|r| r.sandbox.id.clone()).collect();
        let report = self.runtime.reconcile(&known).await?;
        for id in &report.removed {
            tracing::info!(%id, "reconcile: removed leftover sandbox artefacts");
        }
        for row in &rows {
            let id = &row.sandbox.id;
            if row.sandbox.state == SandboxState::Creating {
                // Its create was cut short by a crash: nobody has seen it work; undo it.
                tracing::warn!(%id, "reconcile: removing a sandbox whose create was interrupted");
                let _ = self.runtime.remove(id).await;
                self.store.delete(id)?;
                continue;
            }
            if report.dead.contains(id) {
                let _ = self.runtime.remove(id).await;
                if row.pooled {
                    self.store.delete(id)?;
                } else {
                    tracing::warn!(%id, "reconcile: sandbox is dead");
                    self.store.set_state(id, SandboxState::Dead)?;
                }
                continue;
            }
            match self.runtime.status(id).await {
                Ok(RuntimeStatus::Paused) => {
                    self.store.set_state(id, SandboxState::Paused)?;
                }
                Ok(RuntimeStatus::Running) => {
                    self.store.set_state(id, SandboxState::Running)?;
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Removes expired sandboxes; returns how many.
    pub async fn reap_expired(&self) -> usize {
        let ids = match self.store.expired(now_ms()) {
            Ok(ids) => ids,
            Err(e) => {
                tracing::error!(error = %e, "ttl: cannot read expired sandboxes");
                return 0;
            }
        };
        let mut n = 0;
        for id in ids {
            match self.destroy(&id).await {
                Ok(()) => {
                    tracing::info!(%id, "ttl: removed expired sandbox");
                    n += 1;
                }
                Err(e) => tracing::error!(%id, error = %e, "ttl: remove failed"),
            }
        }
        n
    }

    /// Number of idle warm-pool members ready to be claimed.
    pub fn pool_size(&self) -> u64 {
        self.store.pooled_count(POOL_TEMPLATE, true).unwrap_or(0)
    }

    /// Creates pool members until the pool is full; returns how many were added.
    pub async fn fill_pool(&self) -> Result<usize, ApiError> {
        let mut added = 0;
        while (self.store.pooled_count(POOL_TEMPLATE, false)? as usize) < self.cfg.warm_pool {
            let a = self.admit(CreateSandbox::default())?;
            self.create_cold(&a, true).await?;
            added += 1;
        }
        Ok(added)
    }

    /// Removes all idle warm-pool members (clean shutdown).
    pub async fn drain_pool(&self) {
        if let Ok(rows) = self.store.list(true) {
            for r in rows.into_iter().filter(|r| r.pooled) {
                if let Err(e) = self.destroy(&r.sandbox.id).await {
                    tracing::warn!(id = %r.sandbox.id, error = %e, "drain: remove failed");
                }
            }
        }
    }

    /// Background loops: the warm-pool filler and the TTL reaper. They end with `shutdown`.
    pub fn spawn_background(self: &Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        let k = self.clone();
        let sd = shutdown.clone();
        tokio::spawn(async move {
            loop {
                if k.cfg.warm_pool > 0 && k.images.get(POOL_TEMPLATE).is_ok() {
                    if let Err(e) = k.fill_pool().await {
                        tracing::error!(error = %e, "warm pool: create failed; retrying in 5s");
                        tokio::select! {
                            _ = sd.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                        }
                        continue;
                    }
                }
                tokio::select! {
                    _ = sd.cancelled() => return,
                    _ = k.pool_wake.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
            }
        });
        let k = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
                k.reap_expired().await;
            }
        });
    }
}
