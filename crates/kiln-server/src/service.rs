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

pub use crate::tenancy::Caller;
use crate::tenancy::KeyHasher;
use kiln_store::{Limits, QuotaExceeded};

/// The running server's shared state.
pub struct Kiln {
    pub cfg: ServerConfig,
    pub store: Store,
    pub images: ImageStore,
    pub runtime: Runtime,
    /// The owner key from `<data dir>/token` (empty when that file is absent).
    pub token: String,
    /// Hashes presented keys (the secret of `<data dir>/secret`).
    pub hasher: KeyHasher,
    /// The organisation created on first start.
    pub system_org: String,
    /// The owner key when this start created it (to print once).
    pub created_owner_key: Option<String>,
    /// Per-key GCRA state.
    pub limiter: crate::ratelimit::Limiter,
    /// Org rate limits, re-read from the store at most every few seconds.
    rate_cache: std::sync::Mutex<
        std::collections::HashMap<String, (kiln_protocol::api::RateLimits, Instant)>,
    >,
    pool_wake: Notify,
    /// Appends audit rows off the request path (see [`crate::auditlog`]).
    pub audit: crate::auditlog::AuditWriter,
    /// Open usage windows (see [`crate::metering`]).
    pub(crate) meter: crate::metering::Meter,
    /// The SSH front door, once it listens (`kiln up --ssh-listen`).
    pub ssh: std::sync::OnceLock<crate::ssh::Listening>,
    pub(crate) metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// The agent runtime (created on first use; see `agents::agents`).
    pub agents: std::sync::OnceLock<Arc<kiln_agent::runner::Runtime>>,
}

/// Shared handle used as axum state.
pub type AppState = Arc<Kiln>;

pub fn now_ms() -> u64 {
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
    egress: Option<kiln_sandbox::egress::EgressAllow>,
}

impl Kiln {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: ServerConfig,
        store: Store,
        images: ImageStore,
        runtime: Runtime,
        token: String,
        hasher: KeyHasher,
        system_org: String,
        metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    ) -> Self {
        Self {
            audit: crate::auditlog::AuditWriter::start(store.clone()),
            cfg,
            store,
            images,
            runtime,
            token,
            hasher,
            system_org,
            created_owner_key: None,
            limiter: Default::default(),
            rate_cache: Default::default(),
            pool_wake: Notify::new(),
            meter: Default::default(),
            ssh: std::sync::OnceLock::new(),
            metrics,
            agents: std::sync::OnceLock::new(),
        }
    }

    /// The sandbox `id` as `caller` may see it: only sandboxes of the caller's organisation;
    /// anything else (another org's, a warm-pool member, nothing) is the same 404.
    pub async fn sandbox_row(&self, caller: &Caller, id: &str) -> Result<SandboxRow, ApiError> {
        self.org_sandbox_row(&caller.org_id, id).await
    }

    /// [`Self::sandbox_row`] for work done on behalf of an organisation outside a request (the
    /// knowledge follower of a sandbox index).
    pub async fn org_sandbox_row(&self, org_id: &str, id: &str) -> Result<SandboxRow, ApiError> {
        match self.store.get(id).await? {
            Some(row) if !row.pooled && row.org_id == org_id => Ok(row),
            _ => Err(ApiError::sandbox_not_found(id)),
        }
    }

    /// [`Self::sandbox_row`]'s sandbox.
    pub async fn sandbox(&self, caller: &Caller, id: &str) -> Result<Sandbox, ApiError> {
        Ok(self.sandbox_row(caller, id).await?.sandbox)
    }

    /// Like [`Self::sandbox`], but the sandbox must run on this server (409 otherwise: with
    /// several servers on one database, each acts only on its own sandboxes).
    pub async fn local(&self, caller: &Caller, id: &str) -> Result<Sandbox, ApiError> {
        let row = self.sandbox_row(caller, id).await?;
        if row.host != self.store.host() {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "sandbox_on_other_server",
                format!("sandbox `{id}` runs on another Kiln server sharing this database"),
            )
            .hint("send requests for it to the server that created it"));
        }
        Ok(row.sandbox)
    }

    /// Like [`Self::sandbox`], but the sandbox must be running (409 if paused or dead).
    pub async fn running(&self, caller: &Caller, id: &str) -> Result<Sandbox, ApiError> {
        let sb = self.local(caller, id).await?;
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
    pub async fn client(
        &self,
        caller: &Caller,
        id: &str,
    ) -> Result<kilnd::client::Client, ApiError> {
        self.running(caller, id).await?;
        Ok(self.runtime.client(id))
    }

    /// Turns a failure to reach a sandbox's daemon into the right answer, marking the sandbox
    /// dead when its container is gone.
    pub async fn daemon_error(&self, id: &str, e: kilnd::client::ClientError) -> ApiError {
        use kilnd::client::ClientError as E;
        if matches!(e, E::Connect(_) | E::Io(_)) {
            // The connection failed: the sandbox may have been removed meanwhile (a
            // concurrent delete), or its init may have died.
            if let Ok(None) = self.store.get(id).await {
                return ApiError::sandbox_not_found(id);
            }
            if let Ok(RuntimeStatus::Stopped | RuntimeStatus::Missing) =
                self.runtime.status(id).await
            {
                let _ = self.store.set_state(id, SandboxState::Dead).await;
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

    /// The caller's organisation's sandboxes.
    pub async fn list(&self, caller: &Caller) -> Result<Vec<Sandbox>, ApiError> {
        Ok(self
            .store
            .list_org(&caller.org_id)
            .await?
            .into_iter()
            .map(|r| r.sandbox)
            .collect())
    }

    /// Validates a create for `org` (`None`: a warm-pool member); the template is the org's
    /// private one of that name, else a public one.
    fn admit(&self, org: Option<&str>, req: CreateSandbox) -> Result<Admitted, ApiError> {
        let template = req.template.unwrap_or_else(|| POOL_TEMPLATE.to_string());
        let (image, private) = crate::templates::image_for(&self.images, org, &template)?;
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
        let egress = match req.egress {
            Some(e) => Some(
                kiln_sandbox::egress::EgressAllow {
                    domains: e.domains,
                    cidrs: e.cidrs,
                }
                .normalized()
                .map_err(|e| ApiError::invalid(e.to_string()))?,
            ),
            None => None,
        };
        let network = match (req.network, &egress) {
            (Some(NetworkMode::None), Some(_)) => {
                return Err(ApiError::invalid(
                    "an egress allow-list needs network `full` (it restricts a full network)",
                ))
            }
            (None, Some(_)) => NetworkMode::Full,
            (n, _) => n.unwrap_or_default(),
        };
        Ok(Admitted {
            template,
            image,
            cpus,
            memory_bytes,
            disk_bytes,
            network,
            expires_at_ms,
            labels: req.labels,
            // Pool members have no allow-list; a sandbox with one is always created cold.
            use_pool: req.pool.unwrap_or(true) && egress.is_none() && !private,
            egress,
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
            egress: a.egress.clone(),
        }
    }

    /// Creates a sandbox: claims a warm-pool member when one matches, else creates cold.
    /// Admission is atomic per organisation: the quota check and the insert (or pool claim)
    /// happen in one transaction under the org's lock.
    pub async fn create(&self, caller: &Caller, req: CreateSandbox) -> Result<Sandbox, ApiError> {
        let started = Instant::now();
        let a = self.admit(Some(&caller.org_id), req)?;
        // The org's own quota is read inside the admission transaction.
        let limits = self.cfg.quota.clone();
        if a.use_pool && self.cfg.warm_pool > 0 {
            let key = PoolKey {
                template: a.template.clone(),
                cpus: a.cpus,
                memory_bytes: a.memory_bytes,
                disk_bytes: a.disk_bytes,
                network: a.network.clone(),
            };
            let claimed = self
                .store
                .claim_pooled(
                    &key,
                    &caller.org_id,
                    Some(&caller.key_id),
                    &limits,
                    now_ms(),
                    a.expires_at_ms,
                    &a.labels,
                )
                .await?
                .map_err(|q| quota_error(&caller.org_id, &q))?;
            if let Some(row) = claimed {
                self.pool_wake.notify_one();
                self.meter_started(&row).await;
                metrics::counter!("kiln_sandboxes_created_total", "source" => "pool").increment(1);
                metrics::histogram!("kiln_sandbox_create_seconds", "source" => "pool")
                    .record(started.elapsed().as_secs_f64());
                return Ok(row.sandbox);
            }
        }
        let sb = self.create_cold(&a, Some((caller, &limits))).await?;
        metrics::counter!("kiln_sandboxes_created_total", "source" => "cold").increment(1);
        metrics::histogram!("kiln_sandbox_create_seconds", "source" => "cold")
            .record(started.elapsed().as_secs_f64());
        Ok(sb)
    }

    /// Creates a sandbox from scratch: for `owner` (a caller and its org's limits), or as an
    /// idle warm-pool member when `owner` is `None`.
    async fn create_cold(
        &self,
        a: &Admitted,
        owner: Option<(&Caller, &Limits)>,
    ) -> Result<Sandbox, ApiError> {
        let pooled = owner.is_none();
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
        let row = SandboxRow {
            sandbox: sandbox.clone(),
            pooled,
            org_id: owner.map(|(c, _)| c.org_id.clone()).unwrap_or_default(),
            key_id: owner.map(|(c, _)| c.key_id.clone()),
            host: self.store.host().to_string(),
        };
        match owner {
            None => self.store.insert(&row).await?,
            Some((c, limits)) => self
                .store
                .admit_insert(&row, limits)
                .await?
                .map_err(|q| quota_error(&c.org_id, &q))?,
        }
        match self.runtime.create(&self.spec_for(&id, a)).await {
            Ok(created) => {
                self.store.mark_created(&id, created.ip.as_deref()).await?;
                sandbox.state = SandboxState::Running;
                sandbox.ip = created.ip;
                if !pooled {
                    self.meter_started(&SandboxRow {
                        sandbox: sandbox.clone(),
                        ..row
                    })
                    .await;
                }
                Ok(sandbox)
            }
            Err(e) => {
                let _ = self.runtime.remove(&id).await;
                let _ = self.store.delete(&id).await;
                Err(e.into())
            }
        }
    }

    pub async fn remove(&self, caller: &Caller, id: &str) -> Result<(), ApiError> {
        self.local(caller, id).await?;
        self.destroy(id).await
    }

    async fn destroy(&self, id: &str) -> Result<(), ApiError> {
        if let Some(row) = self.store.get(id).await? {
            self.meter_transition(&row, crate::metering::STOPPED).await;
        }
        self.runtime.remove(id).await?;
        self.store.delete(id).await?;
        metrics::counter!("kiln_sandboxes_removed_total").increment(1);
        Ok(())
    }

    pub async fn pause(&self, caller: &Caller, id: &str) -> Result<Sandbox, ApiError> {
        let sb = self.local(caller, id).await?;
        match sb.state {
            SandboxState::Paused => Ok(sb),
            SandboxState::Dead | SandboxState::Creating => Err(self
                .running(caller, id)
                .await
                .err()
                .unwrap_or_else(|| ApiError::internal("state"))),
            SandboxState::Running => {
                let row = self.sandbox_row(caller, id).await?;
                self.meter_transition(&row, crate::metering::PAUSED).await;
                self.runtime.pause(id).await?;
                // Paused sandboxes hold only their disk against the org's quota.
                self.store.set_state(id, SandboxState::Paused).await?;
                self.sandbox(caller, id).await
            }
        }
    }

    pub async fn resume(&self, caller: &Caller, id: &str) -> Result<Sandbox, ApiError> {
        let sb = self.local(caller, id).await?;
        match sb.state {
            SandboxState::Running => Ok(sb),
            SandboxState::Dead | SandboxState::Creating => Err(self
                .running(caller, id)
                .await
                .err()
                .unwrap_or_else(|| ApiError::internal("state"))),
            SandboxState::Paused => {
                // Re-admit first (atomically against the quota), then thaw.
                let limits = self.cfg.quota.clone();
                let admitted = self
                    .store
                    .admit_resume(id, &caller.org_id, &limits)
                    .await?
                    .map_err(|q| quota_error(&caller.org_id, &q))?;
                if admitted {
                    if let Err(e) = self.runtime.resume(id).await {
                        let _ = self.store.set_state(id, SandboxState::Paused).await;
                        return Err(e.into());
                    }
                    // Close the paused window (disk only), then open a running one.
                    let mut row = self.sandbox_row(caller, id).await?;
                    row.sandbox.state = SandboxState::Paused;
                    self.meter_transition(&row, crate::metering::RESUMED).await;
                }
                self.sandbox(caller, id).await
            }
        }
    }

    /// Brings the store and the runtime into agreement after a start: artefacts of unknown
    /// sandboxes are removed, known sandboxes whose processes are gone are marked dead and their
    /// resources released, and paused/running states are re-read.
    pub async fn reconcile(&self) -> Result<(), ApiError> {
        let rows = self.store.list(true).await?;
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
                self.store.delete(id).await?;
                continue;
            }
            if report.dead.contains(id) {
                let _ = self.runtime.remove(id).await;
                if row.pooled {
                    self.store.delete(id).await?;
                } else {
                    tracing::warn!(%id, "reconcile: sandbox is dead");
                    self.store.set_state(id, SandboxState::Dead).await?;
                }
                continue;
            }
            match self.runtime.status(id).await {
                Ok(RuntimeStatus::Paused) => {
                    self.store.set_state(id, SandboxState::Paused).await?;
                }
                Ok(RuntimeStatus::Running) => {
                    self.store.set_state(id, SandboxState::Running).await?;
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Removes expired sandboxes; returns how many.
    pub async fn reap_expired(&self) -> usize {
        let ids = match self.store.expired(now_ms()).await {
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
    pub async fn pool_size(&self) -> u64 {
        self.store
            .pooled_count(POOL_TEMPLATE, true)
            .await
            .unwrap_or(0)
    }

    /// Creates pool members until the pool is full; returns how many were added.
    pub async fn fill_pool(&self) -> Result<usize, ApiError> {
        let mut added = 0;
        while (self.store.pooled_count(POOL_TEMPLATE, false).await? as usize) < self.cfg.warm_pool {
            let a = self.admit(None, CreateSandbox::default())?;
            self.create_cold(&a, None).await?;
            added += 1;
        }
        Ok(added)
    }

    /// Removes all idle warm-pool members (clean shutdown).
    pub async fn drain_pool(&self) {
        if let Ok(rows) = self.store.list(true).await {
            for r in rows.into_iter().filter(|r| r.pooled) {
                if let Err(e) = self.destroy(&r.sandbox.id).await {
                    tracing::warn!(id = %r.sandbox.id, error = %e, "drain: remove failed");
                }
            }
        }
    }

    /// Background loops: the warm-pool filler and the TTL reaper. They end with `shutdown`.
    pub fn spawn_background(self: &Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        crate::knowledge::start_followers(self, shutdown.child_token());
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
        if let Some(keep) = self.cfg.audit_retention {
            let k = self.clone();
            let sd = shutdown.clone();
            tokio::spawn(async move {
                loop {
                    let before = now_ms().saturating_sub(keep.as_millis() as u64);
                    match k.store.prune_audit(before).await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(n, "audit: pruned entries past retention"),
                        Err(e) => tracing::error!(error = %e, "audit: prune failed"),
                    }
                    tokio::select! {
                        _ = sd.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(3600)) => {}
                    }
                }
            });
        }
        let k = self.clone();
        let sd = shutdown.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = sd.cancelled() => return,
                    _ = tokio::time::sleep(k.cfg.meter_interval) => {}
                }
                k.meter_all().await;
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

/// The API error for a refused admission: names the quota, its limit and current use.
pub fn quota_error(org: &str, q: &QuotaExceeded) -> ApiError {
    let fmt = |v: f64| match q.quota {
        "memory" | "disk" => units::format_size(v as u64),
        "cpus" => format!("{v}"),
        _ => format!("{}", v as u64),
    };
    metrics::counter!("kiln_quota_rejections_total", "quota" => q.quota).increment(1);
    ApiError::new(
        StatusCode::FORBIDDEN,
        "quota_exceeded",
        format!(
            "quota `{}` of organisation `{org}` exceeded: limit {}, in use {}, requested {}",
            q.quota,
            fmt(q.limit),
            fmt(q.used),
            fmt(q.requested)
        ),
    )
    .hint("remove or pause sandboxes, or ask an operator to raise the quota (`kiln org quota`)")
}

impl Kiln {
    /// The effective limits of an org: its overrides over the server's defaults.
    pub async fn limits(&self, org_id: &str) -> Result<Limits, ApiError> {
        let d = &self.cfg.quota;
        let q = self
            .store
            .get_org(org_id)
            .await?
            .map(|o| o.quota)
            .unwrap_or_default();
        Ok(Limits {
            sandboxes: q.sandboxes.unwrap_or(d.sandboxes),
            cpus: q.cpus.unwrap_or(d.cpus),
            memory_bytes: q.memory_bytes.unwrap_or(d.memory_bytes),
            disk_bytes: q.disk_bytes.unwrap_or(d.disk_bytes),
        })
    }

    /// Resolves a presented bearer key to its [`Caller`]. Every request reads the key row
    /// (no cache), so a revocation applies to the very next request.
    pub async fn authenticate(&self, presented: Option<&str>) -> Result<Caller, ApiError> {
        let unauthorized = |m: &str| {
            ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", m.to_string()).hint(format!(
                "send `Authorization: Bearer kiln_...`; the owner key is in {}/token (the CLI reads it, or KILN_TOKEN)",
                self.cfg.data_dir.display()
            ))
        };
        let Some(p) = presented.filter(|p| crate::tenancy::looks_like_key(p)) else {
            return Err(unauthorized("missing or invalid API key"));
        };
        let Some(k) = self.store.key_by_hash(&self.hasher.hash(p)).await? else {
            return Err(unauthorized("missing or invalid API key"));
        };
        let now = now_ms();
        if k.revoked_at_ms.is_some() {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "key_revoked",
                format!("API key {} was revoked", k.prefix),
            )
            .hint("ask an admin of your organisation for a new key"));
        }
        if k.expires_at_ms.is_some_and(|e| e <= now) {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "key_expired",
                format!("API key {} has expired", k.prefix),
            )
            .hint("ask an admin of your organisation for a new key (`kiln key create`)"));
        }
        let role = kiln_protocol::api::Role::parse(&k.role)
            .ok_or_else(|| ApiError::internal(format!("key {} has unknown role", k.prefix)))?;
        let scopes = crate::tenancy::parse_scopes(&k.scopes).map_err(ApiError::internal)?;
        // last-used is precise to a second: at most one write per key per second.
        if k.last_used_at_ms
            .is_none_or(|t| now.saturating_sub(t) >= 1000)
        {
            let _ = self.store.touch_key(&k.id, now).await;
        }
        Ok(Caller {
            system: k.org_id == self.system_org,
            perms: crate::tenancy::role_perms(role).and(scopes),
            org_id: k.org_id,
            key_id: k.id,
            key_prefix: k.prefix,
            role,
        })
    }

    /// The rate limits of an org: its own, or the server defaults. Cached for 5 s per org
    /// (changes made through this server apply at once; other replicas see them within 5 s).
    pub async fn rate_limits(
        &self,
        org_id: &str,
    ) -> Result<kiln_protocol::api::RateLimits, ApiError> {
        if let Some((l, at)) = self
            .rate_cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(org_id)
        {
            if at.elapsed() < Duration::from_secs(5) {
                return Ok(*l);
            }
        }
        let l = self
            .store
            .get_org(org_id)
            .await?
            .and_then(|o| o.rate_limits)
            .unwrap_or(self.cfg.rate_limits);
        self.rate_cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(org_id.to_string(), (l, Instant::now()));
        Ok(l)
    }

    /// Forgets the cached rate limits of an org (after a change).
    pub fn forget_rate_limits(&self, org_id: &str) {
        self.rate_cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(org_id);
    }

    /// The organisation `id_or_name` as `caller` may see it: its own, or any for the system
    /// organisation; everything else is 404.
    pub async fn org(
        &self,
        caller: &Caller,
        id_or_name: &str,
    ) -> Result<kiln_store::OrgRow, ApiError> {
        match self.store.get_org(id_or_name).await? {
            Some(o) if caller.system || o.id == caller.org_id => Ok(o),
            _ => Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "org_not_found",
                format!("no organisation `{id_or_name}`"),
            )
            .hint("list organisations with `kiln org ls`")),
        }
    }
}
