//! Kiln's persistent state, in embedded SQLite or in PostgreSQL (`KILN_DATABASE_URL`):
//! organisations, API keys (hashes only), sandboxes (including idle warm-pool members), the
//! audit log, the usage (metering) event log and small key/value metadata. Both backends run the same migrations
//! ([`migrations`]) and the same SQL.
//!
//! What it does not do: talk to the runtime, or hash keys (the server owns the secret). The
//! store records intent and state; the server reconciles it with the runtime on start.
//!
//! Architecture invariant: every state change of a sandbox row is one SQL statement, or one
//! transaction that first takes the org's write lock, so two concurrent claims of the same
//! warm-pool member cannot both win, and two admissions racing for an org's last quota slot
//! cannot both pass.

pub mod agents;
pub mod db;
mod migrations;
mod usage;

pub use usage::{UsageAgg, UsageEventRow, UsageGroup};
mod git;
mod ssh_keys;
pub use git::GitCredentialRow;

use std::collections::BTreeMap;
use std::path::Path;

use kiln_protocol::api::{NetworkMode, Quota, QuotaUsage, RateLimits, Sandbox, SandboxState};

pub use db::{Backend, Row, Val};
use db::{Conn, Db};
pub use ssh_keys::SshKeyRow;

/// Errors of the state store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("postgres error: {0}")]
    Postgres(String),
    #[error("{0}")]
    Config(String),
    #[error("unexpected database value: {0}")]
    Decode(String),
    #[error("corrupt row for sandbox {id}: {message}")]
    Corrupt { id: String, message: String },
    #[error("{0} already exists")]
    Conflict(String),
    #[error("text contains a NUL character")]
    InvalidText,
}

/// A sandbox row: what the API shows plus its owner and whether it idles in the warm pool.
#[derive(Debug, Clone, PartialEq)]
pub struct SandboxRow {
    pub sandbox: Sandbox,
    /// Created ahead of demand and not yet claimed; invisible to the API.
    pub pooled: bool,
    /// Owning organisation (empty for warm-pool members).
    pub org_id: String,
    /// The key that created it.
    pub key_id: Option<String>,
    /// The server (host id) whose runtime runs it; set by the store on insert.
    pub host: String,
}

/// What a create asks of a warm-pool member; a member matches only if all fields are equal.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolKey {
    pub template: String,
    pub cpus: f64,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
    pub network: NetworkMode,
}

/// Effective limits of an org at admission (all concrete).
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub sandboxes: u64,
    pub cpus: f64,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
}

/// Why an admission was refused: which quota, its limit, current use and the request.
#[derive(Debug, Clone, PartialEq)]
pub struct QuotaExceeded {
    /// `sandboxes`, `cpus`, `memory` or `disk`.
    pub quota: &'static str,
    pub limit: f64,
    pub used: f64,
    pub requested: f64,
}

/// An organisation row.
#[derive(Debug, Clone, PartialEq)]
pub struct OrgRow {
    pub id: String,
    pub name: String,
    pub created_at_ms: u64,
    pub quota: Quota,
    /// Per-key rate limits of the org (`None` = server defaults).
    pub rate_limits: Option<RateLimits>,
}

/// An API key row (the hash, never the key).
#[derive(Debug, Clone, PartialEq)]
pub struct KeyRow {
    pub id: String,
    pub org_id: String,
    pub name: String,
    pub prefix: String,
    pub hash: String,
    pub role: String,
    pub scopes: Vec<String>,
    pub created_at_ms: u64,
    pub created_by: Option<String>,
    pub expires_at_ms: Option<u64>,
    pub last_used_at_ms: Option<u64>,
    pub revoked_at_ms: Option<u64>,
}

/// An audit log row.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditRow {
    pub id: String,
    pub time_ms: u64,
    pub org_id: String,
    pub key_prefix: String,
    pub action: String,
    pub resource: String,
    pub outcome: String,
    pub status: u16,
    pub client: String,
    pub request_id: String,
}

/// The store: SQLite or PostgreSQL behind the same methods. `host` names the server using
/// it: sandboxes are inserted with it, and the runtime-facing queries (reconcile listing,
/// warm pool, TTL) see only its own sandboxes, so several servers can share one database.
/// Cloning is cheap: clones share the connection (pool).
#[derive(Clone)]
pub struct Store {
    db: std::sync::Arc<Db>,
    host: String,
}

const COLS: &str = "id, template, image, state, cpus, memory_bytes, disk_bytes, network, created_at_ms, expires_at_ms, pooled, from_pool, labels, ip, org_id, key_id, host";

fn state_str(s: SandboxState) -> &'static str {
    match s {
        SandboxState::Creating => "creating",
        SandboxState::Running => "running",
        SandboxState::Paused => "paused",
        SandboxState::Dead => "dead",
    }
}

fn net_str(n: &NetworkMode) -> &'static str {
    match n {
        NetworkMode::None => "none",
        NetworkMode::Full => "full",
    }
}

fn sandbox_row(r: &Row) -> Result<SandboxRow, StoreError> {
    let id = r.text(0)?;
    let bad = |m: String| StoreError::Corrupt {
        id: id.clone(),
        message: m,
    };
    let state = match r.text(3)?.as_str() {
        "creating" => SandboxState::Creating,
        "running" => SandboxState::Running,
        "paused" => SandboxState::Paused,
        "dead" => SandboxState::Dead,
        o => return Err(bad(format!("state {o}"))),
    };
    let network = match r.text(7)?.as_str() {
        "none" => NetworkMode::None,
        "full" => NetworkMode::Full,
        o => return Err(bad(format!("network {o}"))),
    };
    let labels = serde_json::from_str(&r.text(12)?).map_err(|e| bad(format!("labels: {e}")))?;
    Ok(SandboxRow {
        sandbox: Sandbox {
            id: id.clone(),
            template: r.text(1)?,
            image: r.text(2)?,
            state,
            cpus: r.f64(4)?,
            memory_bytes: r.u64(5)?,
            disk_bytes: r.u64(6)?,
            network,
            created_at_ms: r.u64(8)?,
            expires_at_ms: r.opt_u64(9)?,
            from_pool: r.bool(11)?,
            labels,
            ip: r.opt_text(13)?,
        },
        pooled: r.bool(10)?,
        org_id: r.text(14)?,
        key_id: r.opt_text(15)?,
        host: r.text(16)?,
    })
}

const KEY_COLS: &str = "id, org_id, name, prefix, hash, role, scopes, created_at_ms, created_by, expires_at_ms, last_used_at_ms, revoked_at_ms";

fn key_row(r: &Row) -> Result<KeyRow, StoreError> {
    Ok(KeyRow {
        id: r.text(0)?,
        org_id: r.text(1)?,
        name: r.text(2)?,
        prefix: r.text(3)?,
        hash: r.text(4)?,
        role: r.text(5)?,
        scopes: serde_json::from_str(&r.text(6)?)
            .map_err(|e| StoreError::Decode(format!("key scopes: {e}")))?,
        created_at_ms: r.u64(7)?,
        created_by: r.opt_text(8)?,
        expires_at_ms: r.opt_u64(9)?,
        last_used_at_ms: r.opt_u64(10)?,
        revoked_at_ms: r.opt_u64(11)?,
    })
}

const ORG_COLS: &str =
    "id, name, created_at_ms, max_sandboxes, max_cpus, max_memory_bytes, max_disk_bytes, rate_limits";

fn org_row(r: &Row) -> Result<OrgRow, StoreError> {
    Ok(OrgRow {
        id: r.text(0)?,
        name: r.text(1)?,
        created_at_ms: r.u64(2)?,
        quota: Quota {
            sandboxes: r.opt_u64(3)?,
            cpus: r.opt_f64(4)?,
            memory_bytes: r.opt_u64(5)?,
            disk_bytes: r.opt_u64(6)?,
        },
        rate_limits: match r.opt_text(7)? {
            Some(t) => Some(
                serde_json::from_str(&t)
                    .map_err(|e| StoreError::Decode(format!("org rate limits: {e}")))?,
            ),
            None => None,
        },
    })
}

const AUDIT_COLS: &str =
    "id, time_ms, org_id, key_prefix, action, resource, outcome, status, client, request_id";

fn audit_row(r: &Row) -> Result<AuditRow, StoreError> {
    Ok(AuditRow {
        id: r.text(0)?,
        time_ms: r.u64(1)?,
        org_id: r.text(2)?,
        key_prefix: r.text(3)?,
        action: r.text(4)?,
        resource: r.text(5)?,
        outcome: r.text(6)?,
        status: r.u64(7)? as u16,
        client: r.text(8)?,
        request_id: r.text(9)?,
    })
}

/// Usage held against an org's quota, read inside the admission transaction. Creating and
/// running sandboxes hold a slot, vCPUs and memory; every sandbox (paused and dead included)
/// holds its disk.
const USAGE_SQL: &str = "SELECT
    CAST(COALESCE(SUM(CASE WHEN state IN ('creating','running') THEN 1 ELSE 0 END), 0) AS BIGINT),
    CAST(COALESCE(SUM(CASE WHEN state IN ('creating','running') THEN cpus ELSE 0 END), 0) AS DOUBLE PRECISION),
    CAST(COALESCE(SUM(CASE WHEN state IN ('creating','running') THEN memory_bytes ELSE 0 END), 0) AS BIGINT),
    CAST(COALESCE(SUM(disk_bytes), 0) AS BIGINT)
    FROM sandboxes WHERE org_id = $1 AND pooled = 0";

/// A request's resources, checked against [`Limits`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ask {
    /// Takes a sandbox slot, vCPUs and memory (false for a resume's disk-only re-check).
    pub active: bool,
    /// Also takes new disk (false when resuming: the disk is already held).
    pub new_disk: bool,
    pub cpus: f64,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
}

fn check_quota(u: &QuotaUsage, l: &Limits, a: &Ask) -> Option<QuotaExceeded> {
    if a.active && u.sandboxes + 1 > l.sandboxes {
        return Some(QuotaExceeded {
            quota: "sandboxes",
            limit: l.sandboxes as f64,
            used: u.sandboxes as f64,
            requested: 1.0,
        });
    }
    if a.active && u.cpus + a.cpus > l.cpus + 1e-9 {
        return Some(QuotaExceeded {
            quota: "cpus",
            limit: l.cpus,
            used: u.cpus,
            requested: a.cpus,
        });
    }
    if a.active && u.memory_bytes + a.memory_bytes > l.memory_bytes {
        return Some(QuotaExceeded {
            quota: "memory",
            limit: l.memory_bytes as f64,
            used: u.memory_bytes as f64,
            requested: a.memory_bytes as f64,
        });
    }
    if a.new_disk && u.disk_bytes + a.disk_bytes > l.disk_bytes {
        return Some(QuotaExceeded {
            quota: "disk",
            limit: l.disk_bytes as f64,
            used: u.disk_bytes as f64,
            requested: a.disk_bytes as f64,
        });
    }
    None
}

/// Runs `body` inside a transaction on `c`: commit on `Ok`, roll back on `Err`.
macro_rules! tx {
    ($c:expr, $body:expr) => {{
        $c.begin().await?;
        let r = async { $body }.await;
        match r {
            Ok(v) => {
                $c.commit().await?;
                Ok(v)
            }
            Err(e) => {
                let _ = $c.rollback().await;
                Err(e)
            }
        }
    }};
}

fn sandbox_params(row: &SandboxRow, host: &str) -> Vec<Val> {
    let s = &row.sandbox;
    vals![
        &s.id,
        &s.template,
        &s.image,
        state_str(s.state),
        s.cpus,
        s.memory_bytes,
        s.disk_bytes,
        net_str(&s.network),
        s.created_at_ms,
        s.expires_at_ms,
        row.pooled,
        s.from_pool,
        serde_json::to_string(&s.labels).unwrap_or_else(|_| "{}".into()),
        s.ip.clone(),
        &row.org_id,
        row.key_id.clone(),
        host,
    ]
    .to_vec()
}

const INSERT_SANDBOX: &str = "INSERT INTO sandboxes (id, template, image, state, cpus, memory_bytes, disk_bytes, network, created_at_ms, expires_at_ms, pooled, from_pool, labels, ip, org_id, key_id, host) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17)";

/// A random id: `prefix` and `n` characters of [a-z0-9].
pub fn random_id(prefix: &str, n: usize) -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::thread_rng();
    let s: String = (0..n)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect();
    format!("{prefix}{s}")
}

impl Store {
    /// Opens (creating) the SQLite database at `path` and migrates it.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = rusqlite::Connection::open(path)?;
        Self::init_sqlite(conn).await
    }

    /// Opens PostgreSQL (`postgres://...`) or, for `None`, SQLite at `sqlite_path`.
    pub async fn connect(url: Option<&str>, sqlite_path: &Path) -> Result<Self, StoreError> {
        match url {
            Some(u) if u.starts_with("postgres://") || u.starts_with("postgresql://") => {
                let s = Self {
                    db: std::sync::Arc::new(Db::postgres(u).await?),
                    host: String::new(),
                };
                migrations::run(&s.db).await?;
                Ok(s)
            }
            Some(u) => Err(StoreError::Config(format!(
                "KILN_DATABASE_URL must start with postgres:// (got `{}`); leave it unset for the embedded SQLite",
                u.split(':').next().unwrap_or("")
            ))),
            None => Self::open(sqlite_path).await,
        }
    }

    /// An in-memory SQLite store (tests).
    pub async fn in_memory() -> Result<Self, StoreError> {
        Self::init_sqlite(rusqlite::Connection::open_in_memory()?).await
    }

    async fn init_sqlite(conn: rusqlite::Connection) -> Result<Self, StoreError> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "busy_timeout", 5000)?;
        let s = Self {
            db: std::sync::Arc::new(Db::sqlite(conn)),
            host: String::new(),
        };
        migrations::run(&s.db).await?;
        Ok(s)
    }

    pub fn backend(&self) -> Backend {
        self.db.backend()
    }

    /// Names the server using this store (see [`Store`]).
    pub fn with_host(mut self, host: &str) -> Self {
        self.host = host.to_string();
        self
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    async fn conn(&self) -> Result<Conn, StoreError> {
        self.db.conn().await
    }

    async fn query(&self, sql: &str, p: &[Val]) -> Result<Vec<Row>, StoreError> {
        self.conn().await?.query(sql, p).await
    }

    async fn exec(&self, sql: &str, p: &[Val]) -> Result<u64, StoreError> {
        self.conn().await?.exec(sql, p).await
    }

    async fn sandboxes(&self, sql: &str, p: &[Val]) -> Result<Vec<SandboxRow>, StoreError> {
        self.query(sql, p).await?.iter().map(sandbox_row).collect()
    }

    // ---- sandboxes ----

    /// Inserts a row without any quota check (warm-pool members belong to no org).
    pub async fn insert(&self, row: &SandboxRow) -> Result<(), StoreError> {
        self.exec(INSERT_SANDBOX, &sandbox_params(row, &self.host))
            .await?;
        Ok(())
    }

    /// Locks the org for the rest of the transaction (PostgreSQL: a row lock on `orgs`;
    /// SQLite: `BEGIN IMMEDIATE` already holds the database write lock), then reads its usage.
    async fn locked_usage(c: &mut Conn, org_id: &str) -> Result<QuotaUsage, StoreError> {
        if c.backend() == Backend::Postgres {
            c.query(
                "SELECT id FROM orgs WHERE id = $1 FOR UPDATE",
                &vals![org_id],
            )
            .await?;
        }
        let r = c.query(USAGE_SQL, &vals![org_id]).await?;
        let r = r
            .first()
            .ok_or_else(|| StoreError::Decode("usage query returned no row".into()))?;
        Ok(QuotaUsage {
            sandboxes: r.u64(0)?,
            cpus: r.f64(1)?,
            memory_bytes: r.u64(2)?,
            disk_bytes: r.u64(3)?,
        })
    }

    /// Locks the org like [`Self::locked_usage`] and also reads its quota in the same
    /// transaction: the effective limits are its overrides over `defaults`.
    async fn locked_state(
        c: &mut Conn,
        org_id: &str,
        defaults: &Limits,
    ) -> Result<(QuotaUsage, Limits), StoreError> {
        let lock = if c.backend() == Backend::Postgres {
            " FOR UPDATE"
        } else {
            ""
        };
        let rows = c
            .query(
                &format!("SELECT max_sandboxes, max_cpus, max_memory_bytes, max_disk_bytes FROM orgs WHERE id = $1{lock}"),
                &vals![org_id],
            )
            .await?;
        let limits = match rows.first() {
            Some(r) => Limits {
                sandboxes: r.opt_u64(0)?.unwrap_or(defaults.sandboxes),
                cpus: r.opt_f64(1)?.unwrap_or(defaults.cpus),
                memory_bytes: r.opt_u64(2)?.unwrap_or(defaults.memory_bytes),
                disk_bytes: r.opt_u64(3)?.unwrap_or(defaults.disk_bytes),
            },
            None => defaults.clone(),
        };
        let r = c.query(USAGE_SQL, &vals![org_id]).await?;
        let r = r
            .first()
            .ok_or_else(|| StoreError::Decode("usage query returned no row".into()))?;
        let u = QuotaUsage {
            sandboxes: r.u64(0)?,
            cpus: r.f64(1)?,
            memory_bytes: r.u64(2)?,
            disk_bytes: r.u64(3)?,
        };
        Ok((u, limits))
    }

    /// Current usage of an org against its quota.
    pub async fn usage(&self, org_id: &str) -> Result<QuotaUsage, StoreError> {
        let mut c = self.conn().await?;
        tx!(c, Self::locked_usage(&mut c, org_id).await)
    }

    /// Inserts a user sandbox if the org's quota (its overrides over `defaults`, read in the
    /// same transaction) allows it, atomically: the check and the insert happen under the
    /// org's lock.
    pub async fn admit_insert(
        &self,
        row: &SandboxRow,
        defaults: &Limits,
    ) -> Result<Result<(), QuotaExceeded>, StoreError> {
        let ask = Ask {
            active: true,
            new_disk: true,
            cpus: row.sandbox.cpus,
            memory_bytes: row.sandbox.memory_bytes,
            disk_bytes: row.sandbox.disk_bytes,
        };
        let mut c = self.conn().await?;
        tx!(c, {
            let (u, limits) = Self::locked_state(&mut c, &row.org_id, defaults).await?;
            if let Some(q) = check_quota(&u, &limits, &ask) {
                return Ok::<_, StoreError>(Err(q));
            }
            c.exec(INSERT_SANDBOX, &sandbox_params(row, &self.host))
                .await?;
            Ok(Ok(()))
        })
    }

    /// Atomically takes one running, idle warm-pool member matching `key` for `org_id`, if
    /// the org's quota allows it, and turns it into a user sandbox.
    #[allow(clippy::too_many_arguments)]
    pub async fn claim_pooled(
        &self,
        key: &PoolKey,
        org_id: &str,
        key_id: Option<&str>,
        defaults: &Limits,
        now_ms: u64,
        expires_at_ms: Option<u64>,
        labels: &BTreeMap<String, String>,
    ) -> Result<Result<Option<SandboxRow>, QuotaExceeded>, StoreError> {
        let ask = Ask {
            active: true,
            new_disk: true,
            cpus: key.cpus,
            memory_bytes: key.memory_bytes,
            disk_bytes: key.disk_bytes,
        };
        let skip_locked = if self.backend() == Backend::Postgres {
            " FOR UPDATE SKIP LOCKED"
        } else {
            ""
        };
        let sql = format!(
            "UPDATE sandboxes SET pooled = 0, from_pool = 1, created_at_ms = $6, expires_at_ms = $7, labels = $8, org_id = $9, key_id = $10
             WHERE pooled = 1 AND id = (SELECT id FROM sandboxes WHERE pooled = 1 AND state = 'running' AND template = $1
                         AND cpus = $2 AND memory_bytes = $3 AND disk_bytes = $4 AND network = $5 AND host = $11
                         ORDER BY created_at_ms LIMIT 1{skip_locked})
             RETURNING {COLS}"
        );
        let mut c = self.conn().await?;
        let claimed: Result<Option<SandboxRow>, QuotaExceeded> = tx!(c, {
            let (u, limits) = Self::locked_state(&mut c, org_id, defaults).await?;
            if let Some(q) = check_quota(&u, &limits, &ask) {
                return Ok::<_, StoreError>(Err(q));
            }
            let rows = c
                .query(
                    &sql,
                    &vals![
                        &key.template,
                        key.cpus,
                        key.memory_bytes,
                        key.disk_bytes,
                        net_str(&key.network),
                        now_ms,
                        expires_at_ms,
                        serde_json::to_string(labels).unwrap_or_else(|_| "{}".into()),
                        org_id,
                        key_id.map(str::to_string),
                        &self.host,
                    ],
                )
                .await?;
            Ok(Ok(match rows.first() {
                Some(r) => Some(sandbox_row(r)?),
                None => None,
            }))
        })?;
        Ok(claimed)
    }

    /// Moves a paused sandbox back to running if its org's quota allows it (atomically).
    pub async fn admit_resume(
        &self,
        id: &str,
        org_id: &str,
        defaults: &Limits,
    ) -> Result<Result<bool, QuotaExceeded>, StoreError> {
        let mut c = self.conn().await?;
        tx!(c, {
            let rows = c
                .query(
                    "SELECT cpus, memory_bytes FROM sandboxes WHERE id = $1 AND org_id = $2 AND state = 'paused'",
                    &vals![id, org_id],
                )
                .await?;
            let Some(r) = rows.first() else {
                return Ok::<_, StoreError>(Ok(false));
            };
            let ask = Ask {
                active: true,
                new_disk: false,
                cpus: r.f64(0)?,
                memory_bytes: r.u64(1)?,
                disk_bytes: 0,
            };
            let (u, limits) = Self::locked_state(&mut c, org_id, defaults).await?;
            if let Some(q) = check_quota(&u, &limits, &ask) {
                return Ok(Err(q));
            }
            c.exec(
                "UPDATE sandboxes SET state = 'running' WHERE id = $1 AND state = 'paused'",
                &vals![id],
            )
            .await?;
            Ok(Ok(true))
        })
    }

    /// A sandbox by id, pooled members included.
    pub async fn get(&self, id: &str) -> Result<Option<SandboxRow>, StoreError> {
        Ok(self
            .sandboxes(
                &format!("SELECT {COLS} FROM sandboxes WHERE id = $1"),
                &vals![id],
            )
            .await?
            .pop())
    }

    /// This server's sandboxes, oldest first; `include_pooled` adds idle warm-pool members.
    pub async fn list(&self, include_pooled: bool) -> Result<Vec<SandboxRow>, StoreError> {
        let w = if include_pooled { "" } else { "AND pooled = 0" };
        self.sandboxes(
            &format!("SELECT {COLS} FROM sandboxes WHERE host = $1 {w} ORDER BY created_at_ms, id"),
            &vals![&self.host],
        )
        .await
    }

    /// The user sandboxes of one org, oldest first.
    pub async fn list_org(&self, org_id: &str) -> Result<Vec<SandboxRow>, StoreError> {
        self.sandboxes(
            &format!("SELECT {COLS} FROM sandboxes WHERE pooled = 0 AND org_id = $1 ORDER BY created_at_ms, id"),
            &vals![org_id],
        )
        .await
    }

    pub async fn count(&self, include_pooled: bool) -> Result<u64, StoreError> {
        let r = self
            .query(
                "SELECT COUNT(*) FROM sandboxes WHERE host = $2 AND (pooled = 0 OR pooled = $1)",
                &vals![include_pooled, &self.host],
            )
            .await?;
        r.first().map(|r| r.u64(0)).unwrap_or(Ok(0))
    }

    /// This server's sandboxes by state (`pooled` for idle warm-pool members).
    pub async fn count_by_state(&self) -> Result<Vec<(String, u64)>, StoreError> {
        self.query(
            "SELECT CASE WHEN pooled = 1 THEN 'pooled' ELSE state END, COUNT(*) FROM sandboxes WHERE host = $1 GROUP BY 1",
            &vals![&self.host],
        )
        .await?
        .iter()
        .map(|r| Ok((r.text(0)?, r.u64(1)?)))
        .collect()
    }

    pub async fn set_state(&self, id: &str, state: SandboxState) -> Result<bool, StoreError> {
        Ok(self
            .exec(
                "UPDATE sandboxes SET state = $2 WHERE id = $1",
                &vals![id, state_str(state)],
            )
            .await?
            > 0)
    }

    /// A create finished: `creating` -> `running`, recording the sandbox's address.
    pub async fn mark_created(&self, id: &str, ip: Option<&str>) -> Result<bool, StoreError> {
        Ok(self
            .exec(
                "UPDATE sandboxes SET state = 'running', ip = $2 WHERE id = $1 AND state = 'creating'",
                &vals![id, ip],
            )
            .await?
            > 0)
    }

    pub async fn delete(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self
            .exec("DELETE FROM sandboxes WHERE id = $1", &vals![id])
            .await?
            > 0)
    }

    /// Number of warm-pool members for a template: all of them, or only those ready to be
    /// claimed (`ready_only`: not still being created).
    pub async fn pooled_count(&self, template: &str, ready_only: bool) -> Result<u64, StoreError> {
        let sql = if ready_only {
            "SELECT COUNT(*) FROM sandboxes WHERE pooled = 1 AND template = $1 AND host = $2 AND state = 'running'"
        } else {
            "SELECT COUNT(*) FROM sandboxes WHERE pooled = 1 AND template = $1 AND host = $2"
        };
        let r = self.query(sql, &vals![template, &self.host]).await?;
        r.first().map(|r| r.u64(0)).unwrap_or(Ok(0))
    }

    /// Ids of user sandboxes whose TTL has passed.
    pub async fn expired(&self, now_ms: u64) -> Result<Vec<String>, StoreError> {
        self.query(
            "SELECT id FROM sandboxes WHERE pooled = 0 AND host = $2 AND expires_at_ms IS NOT NULL AND expires_at_ms <= $1 ORDER BY id",
            &vals![now_ms, &self.host],
        )
        .await?
        .iter()
        .map(|r| r.text(0))
        .collect()
    }

    /// Gives sandboxes without an org (made before organisations existed) to `org_id`, and
    /// sandboxes without a host (made before hosts were recorded) to this server.
    pub async fn adopt_orphans(&self, org_id: &str) -> Result<u64, StoreError> {
        self.exec(
            "UPDATE sandboxes SET host = $1 WHERE host = ''",
            &vals![&self.host],
        )
        .await?;
        self.exec(
            "UPDATE sandboxes SET org_id = $1 WHERE org_id = '' AND pooled = 0",
            &vals![org_id],
        )
        .await
    }

    // ---- metadata ----

    pub async fn get_meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        let r = self
            .query("SELECT value FROM meta WHERE key = $1", &vals![key])
            .await?;
        r.first().map(|r| r.text(0)).transpose()
    }

    pub async fn set_meta(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.exec(
            "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            &vals![key, value],
        )
        .await?;
        Ok(())
    }

    /// Sets `key` only if it is unset; returns the value that is now stored (first writer
    /// wins, across processes).
    pub async fn init_meta(&self, key: &str, value: &str) -> Result<String, StoreError> {
        self.exec(
            "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
            &vals![key, value],
        )
        .await?;
        self.get_meta(key)
            .await?
            .ok_or_else(|| StoreError::Decode(format!("meta `{key}` vanished")))
    }

    // ---- organisations ----

    pub async fn create_org(&self, org: &OrgRow) -> Result<(), StoreError> {
        let q = &org.quota;
        let r = self
            .exec(
                &format!("INSERT INTO orgs ({ORG_COLS}) VALUES ($1,$2,$3,$4,$5,$6,$7,$8) ON CONFLICT DO NOTHING"),
                &vals![
                    &org.id,
                    &org.name,
                    org.created_at_ms,
                    q.sandboxes,
                    q.cpus,
                    q.memory_bytes,
                    q.disk_bytes,
                    org.rate_limits
                        .as_ref()
                        .map(|r| serde_json::to_string(r).unwrap_or_default()),
                ],
            )
            .await?;
        if r == 0 {
            return Err(StoreError::Conflict(format!("organisation `{}`", org.name)));
        }
        Ok(())
    }

    pub async fn get_org(&self, id_or_name: &str) -> Result<Option<OrgRow>, StoreError> {
        self.query(
            &format!("SELECT {ORG_COLS} FROM orgs WHERE id = $1 OR name = $1"),
            &vals![id_or_name],
        )
        .await?
        .first()
        .map(org_row)
        .transpose()
    }

    pub async fn list_orgs(&self) -> Result<Vec<OrgRow>, StoreError> {
        self.query(
            &format!("SELECT {ORG_COLS} FROM orgs ORDER BY created_at_ms, id"),
            &[],
        )
        .await?
        .iter()
        .map(org_row)
        .collect()
    }

    /// Replaces an org's quota overrides.
    pub async fn set_quota(&self, org_id: &str, q: &Quota) -> Result<bool, StoreError> {
        Ok(self
            .exec(
                "UPDATE orgs SET max_sandboxes = $2, max_cpus = $3, max_memory_bytes = $4, max_disk_bytes = $5 WHERE id = $1",
                &vals![org_id, q.sandboxes, q.cpus, q.memory_bytes, q.disk_bytes],
            )
            .await?
            > 0)
    }

    /// Replaces an org's rate limits (`None` = server defaults).
    pub async fn set_rate_limits(
        &self,
        org_id: &str,
        limits: Option<&RateLimits>,
    ) -> Result<bool, StoreError> {
        Ok(self
            .exec(
                "UPDATE orgs SET rate_limits = $2 WHERE id = $1",
                &vals![
                    org_id,
                    limits.map(|r| serde_json::to_string(r).unwrap_or_default())
                ],
            )
            .await?
            > 0)
    }

    // ---- API keys ----

    pub async fn insert_key(&self, k: &KeyRow) -> Result<(), StoreError> {
        self.exec(
            &format!(
                "INSERT INTO api_keys ({KEY_COLS}) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12)"
            ),
            &vals![
                &k.id,
                &k.org_id,
                &k.name,
                &k.prefix,
                &k.hash,
                &k.role,
                serde_json::to_string(&k.scopes).unwrap_or_else(|_| "[]".into()),
                k.created_at_ms,
                k.created_by.clone(),
                k.expires_at_ms,
                k.last_used_at_ms,
                k.revoked_at_ms,
            ],
        )
        .await?;
        Ok(())
    }

    /// The key with this hash, whatever its state (the caller checks expiry and revocation).
    pub async fn key_by_hash(&self, hash: &str) -> Result<Option<KeyRow>, StoreError> {
        self.query(
            &format!("SELECT {KEY_COLS} FROM api_keys WHERE hash = $1"),
            &vals![hash],
        )
        .await?
        .first()
        .map(key_row)
        .transpose()
    }

    pub async fn get_key(&self, org_id: &str, id: &str) -> Result<Option<KeyRow>, StoreError> {
        self.query(
            &format!(
                "SELECT {KEY_COLS} FROM api_keys WHERE org_id = $1 AND (id = $2 OR prefix = $2)"
            ),
            &vals![org_id, id],
        )
        .await?
        .first()
        .map(key_row)
        .transpose()
    }

    pub async fn list_keys(&self, org_id: &str) -> Result<Vec<KeyRow>, StoreError> {
        self.query(
            &format!(
                "SELECT {KEY_COLS} FROM api_keys WHERE org_id = $1 ORDER BY created_at_ms, id"
            ),
            &vals![org_id],
        )
        .await?
        .iter()
        .map(key_row)
        .collect()
    }

    /// Revokes a key of `org_id` (by id or prefix); true if it was live until now.
    pub async fn revoke_key(
        &self,
        org_id: &str,
        id: &str,
        now_ms: u64,
    ) -> Result<bool, StoreError> {
        Ok(self
            .exec(
                "UPDATE api_keys SET revoked_at_ms = $3 WHERE org_id = $1 AND (id = $2 OR prefix = $2) AND revoked_at_ms IS NULL",
                &vals![org_id, id, now_ms],
            )
            .await?
            > 0)
    }

    /// Records a key's use (callers throttle how often).
    pub async fn touch_key(&self, id: &str, now_ms: u64) -> Result<(), StoreError> {
        self.exec(
            "UPDATE api_keys SET last_used_at_ms = $2 WHERE id = $1",
            &vals![id, now_ms],
        )
        .await?;
        Ok(())
    }

    // ---- audit log ----

    pub async fn append_audit(&self, a: &AuditRow) -> Result<(), StoreError> {
        self.exec(
            &format!("INSERT INTO audit ({AUDIT_COLS}) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10)"),
            &vals![
                &a.id,
                a.time_ms,
                &a.org_id,
                &a.key_prefix,
                &a.action,
                &a.resource,
                &a.outcome,
                a.status as i64,
                &a.client,
                &a.request_id
            ],
        )
        .await?;
        Ok(())
    }

    /// Appends several audit rows in one transaction.
    pub async fn append_audit_batch(&self, rows: &[AuditRow]) -> Result<(), StoreError> {
        let mut c = self.conn().await?;
        tx!(c, {
            for a in rows {
                c.exec(
                    &format!(
                        "INSERT INTO audit ({AUDIT_COLS}) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10)"
                    ),
                    &vals![
                        &a.id,
                        a.time_ms,
                        &a.org_id,
                        &a.key_prefix,
                        &a.action,
                        &a.resource,
                        &a.outcome,
                        a.status as i64,
                        &a.client,
                        &a.request_id
                    ],
                )
                .await?;
            }
            Ok::<_, StoreError>(())
        })
    }

    /// Audit entries of an org, newest first, at most `limit`, optionally since a time.
    pub async fn list_audit(
        &self,
        org_id: &str,
        since_ms: Option<u64>,
        limit: u64,
    ) -> Result<Vec<AuditRow>, StoreError> {
        self.query(
            &format!("SELECT {AUDIT_COLS} FROM audit WHERE org_id = $1 AND time_ms >= $2 ORDER BY time_ms DESC, id DESC LIMIT $3"),
            &vals![org_id, since_ms.unwrap_or(0), limit],
        )
        .await?
        .iter()
        .map(audit_row)
        .collect()
    }

    /// Deletes audit entries older than `before_ms`; returns how many.
    pub async fn prune_audit(&self, before_ms: u64) -> Result<u64, StoreError> {
        self.exec("DELETE FROM audit WHERE time_ms < $1", &vals![before_ms])
            .await
    }
}

#[cfg(test)]
mod tests;

/// Throwaway PostgreSQL schemas for tests: each test run gets its own schema (through the
/// connection's `search_path`), so parallel runs never collide.
pub mod testing {
    /// The PostgreSQL server tests use: `KILN_TEST_DATABASE_URL`, default the local one.
    pub fn base_url() -> String {
        std::env::var("KILN_TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://root@127.0.0.1:5432/test".into())
    }

    /// A fresh schema; `url` selects it.
    pub struct TestSchema {
        pub schema: String,
        pub url: String,
    }

    /// Creates a fresh schema on the test PostgreSQL server.
    pub async fn schema() -> Result<TestSchema, String> {
        named(&super::random_id("kiln_t_", 12)).await
    }

    /// The schema `name` ([a-z0-9_]), created if it does not exist (a server restarted in a
    /// test finds its state again).
    pub async fn named(name: &str) -> Result<TestSchema, String> {
        let base = base_url();
        let (client, conn) = tokio_postgres::connect(&base, tokio_postgres::NoTls)
            .await
            .map_err(|e| format!("cannot reach the test PostgreSQL at {base}: {e} (start it: pg_ctlcluster --skip-systemctl-redirect 15 main start)"))?;
        tokio::spawn(conn);
        let schema = name.to_string();
        client
            .batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
            .await
            .map_err(|e| e.to_string())?;
        let sep = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{sep}options=-c%20search_path%3D{schema}");
        Ok(TestSchema { schema, url })
    }

    impl TestSchema {
        /// Drops the schema and everything in it.
        pub async fn drop_schema(&self) {
            if let Ok((client, conn)) =
                tokio_postgres::connect(&base_url(), tokio_postgres::NoTls).await
            {
                tokio::spawn(conn);
                let _ = client
                    .batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema))
                    .await;
            }
        }
    }
}
