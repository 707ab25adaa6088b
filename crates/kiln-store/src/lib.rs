//! Kiln's persistent state in SQLite: the sandbox table (including idle warm-pool members)
//! and small key/value metadata.
//!
//! What it does not do: talk to the runtime. The store records intent and state; the server
//! reconciles it with what the runtime reports on start.
//!
//! Architecture invariant: every state change of a sandbox row is one SQL statement, so two
//! concurrent claims of the same warm-pool member cannot both win.

use std::path::Path;
use std::sync::Mutex;

use kiln_protocol::api::{NetworkMode, Sandbox, SandboxState};
use rusqlite::{params, Connection, OptionalExtension, Row};

/// Errors of the state store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("corrupt row for sandbox {id}: {message}")]
    Corrupt { id: String, message: String },
}

/// A sandbox row: what the API shows plus whether it idles in the warm pool.
#[derive(Debug, Clone, PartialEq)]
pub struct SandboxRow {
    pub sandbox: Sandbox,
    /// Created ahead of demand and not yet claimed; invisible to the API.
    pub pooled: bool,
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

/// The SQLite-backed store. Cheap, short statements behind one connection.
pub struct Store {
    conn: Mutex<Connection>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS sandboxes (
    id TEXT PRIMARY KEY,
    template TEXT NOT NULL,
    image TEXT NOT NULL,
    state TEXT NOT NULL,
    cpus REAL NOT NULL,
    memory_bytes INTEGER NOT NULL,
    disk_bytes INTEGER NOT NULL,
    network TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL,
    expires_at_ms INTEGER,
    pooled INTEGER NOT NULL DEFAULT 0,
    from_pool INTEGER NOT NULL DEFAULT 0,
    labels TEXT NOT NULL DEFAULT '{}',
    ip TEXT
);
CREATE INDEX IF NOT EXISTS sandboxes_pool ON sandboxes(pooled, template);
CREATE INDEX IF NOT EXISTS sandboxes_expiry ON sandboxes(expires_at_ms) WHERE expires_at_ms IS NOT NULL;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
";

const COLS: &str = "id, template, image, state, cpus, memory_bytes, disk_bytes, network, created_at_ms, expires_at_ms, pooled, from_pool, labels, ip";

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

fn from_row(r: &Row<'_>) -> rusqlite::Result<Result<SandboxRow, StoreError>> {
    let id: String = r.get(0)?;
    let state: String = r.get(3)?;
    let network: String = r.get(7)?;
    let labels: String = r.get(12)?;
    let bad = |m: String| StoreError::Corrupt {
        id: id.clone(),
        message: m,
    };
    let state = match state.as_str() {
        "creating" => SandboxState::Creating,
        "running" => SandboxState::Running,
        "paused" => SandboxState::Paused,
        "dead" => SandboxState::Dead,
        o => return Ok(Err(bad(format!("state {o}")))),
    };
    let network = match network.as_str() {
        "none" => NetworkMode::None,
        "full" => NetworkMode::Full,
        o => return Ok(Err(bad(format!("network {o}")))),
    };
    let labels = match serde_json::from_str(&labels) {
        Ok(l) => l,
        Err(e) => return Ok(Err(bad(format!("labels: {e}")))),
    };
    Ok(Ok(SandboxRow {
        sandbox: Sandbox {
            id: id.clone(),
            template: r.get(1)?,
            image: r.get(2)?,
            state,
            cpus: r.get(4)?,
            memory_bytes: r.get::<_, i64>(5)? as u64,
            disk_bytes: r.get::<_, i64>(6)? as u64,
            network,
            created_at_ms: r.get::<_, i64>(8)? as u64,
            expires_at_ms: r.get::<_, Option<i64>>(9)?.map(|v| v as u64),
            from_pool: r.get::<_, i64>(11)? != 0,
            labels,
            ip: r.get(13)?,
        },
        pooled: r.get::<_, i64>(10)? != 0,
    }))
}

impl Store {
    /// Opens (creating) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        Self::init(conn)
    }

    /// An in-memory store (tests).
    pub fn in_memory() -> Result<Self, StoreError> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(conn: Connection) -> Result<Self, StoreError> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "busy_timeout", 5000)?;
        conn.execute_batch(SCHEMA)?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent; keep going.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn insert(&self, row: &SandboxRow) -> Result<(), StoreError> {
        let s = &row.sandbox;
        self.conn().execute(
            &format!("INSERT INTO sandboxes ({COLS}) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14)"),
            params![
                s.id,
                s.template,
                s.image,
                state_str(s.state),
                s.cpus,
                s.memory_bytes as i64,
                s.disk_bytes as i64,
                net_str(&s.network),
                s.created_at_ms as i64,
                s.expires_at_ms.map(|v| v as i64),
                row.pooled as i64,
                s.from_pool as i64,
                serde_json::to_string(&s.labels).unwrap_or_else(|_| "{}".into()),
                s.ip,
            ],
        )?;
        Ok(())
    }

    fn query(&self, sql: &str, p: impl rusqlite::Params) -> Result<Vec<SandboxRow>, StoreError> {
        let conn = self.conn();
        let mut st = conn.prepare_cached(sql)?;
        let rows = st.query_map(p, from_row)?;
        let mut out = Vec::new();
        for r in rows {
            out.push(r??);
        }
        Ok(out)
    }

    /// A sandbox by id, pooled members included.
    pub fn get(&self, id: &str) -> Result<Option<SandboxRow>, StoreError> {
        Ok(self
            .query(&format!("SELECT {COLS} FROM sandboxes WHERE id = ?1"), [id])?
            .pop())
    }

    /// All sandboxes, oldest first; `include_pooled` adds idle warm-pool members.
    pub fn list(&self, include_pooled: bool) -> Result<Vec<SandboxRow>, StoreError> {
        let w = if include_pooled {
            ""
        } else {
            "WHERE pooled = 0"
        };
        self.query(
            &format!("SELECT {COLS} FROM sandboxes {w} ORDER BY created_at_ms, id"),
            [],
        )
    }

    pub fn set_state(&self, id: &str, state: SandboxState) -> Result<bool, StoreError> {
        Ok(self.conn().execute(
            "UPDATE sandboxes SET state = ?2 WHERE id = ?1",
            params![id, state_str(state)],
        )? > 0)
    }

    /// A create finished: `creating` -> `running`, recording the sandbox's address.
    pub fn mark_created(&self, id: &str, ip: Option<&str>) -> Result<bool, StoreError> {
        Ok(self.conn().execute(
            "UPDATE sandboxes SET state = 'running', ip = ?2 WHERE id = ?1 AND state = 'creating'",
            params![id, ip],
        )? > 0)
    }

    pub fn delete(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn()
            .execute("DELETE FROM sandboxes WHERE id = ?1", [id])?
            > 0)
    }

    /// Atomically takes one running, idle warm-pool member matching `key` and turns it into a
    /// user sandbox with the given creation time, expiry and labels.
    pub fn claim_pooled(
        &self,
        key: &PoolKey,
        now_ms: u64,
        expires_at_ms: Option<u64>,
        labels: &std::collections::BTreeMap<String, String>,
    ) -> Result<Option<SandboxRow>, StoreError> {
        let id: Option<String> = self
            .conn()
            .query_row(
                "UPDATE sandboxes SET pooled = 0, from_pool = 1, created_at_ms = ?6, expires_at_ms = ?7, labels = ?8
                 WHERE id = (SELECT id FROM sandboxes WHERE pooled = 1 AND state = 'running' AND template = ?1
                             AND cpus = ?2 AND memory_bytes = ?3 AND disk_bytes = ?4 AND network = ?5
                             ORDER BY created_at_ms LIMIT 1)
                 RETURNING id",
                params![
                    key.template,
                    key.cpus,
                    key.memory_bytes as i64,
                    key.disk_bytes as i64,
                    net_str(&key.network),
                    now_ms as i64,
                    expires_at_ms.map(|v| v as i64),
                    serde_json::to_string(labels).unwrap_or_else(|_| "{}".into()),
                ],
                |r| r.get(0),
            )
            .optional()?;
        match id {
            Some(id) => self.get(&id),
            None => Ok(None),
        }
    }

    /// Number of warm-pool members for a template: all of them, or only those ready to be
    /// claimed (`ready_only`: not still being created).
    pub fn pooled_count(&self, template: &str, ready_only: bool) -> Result<u64, StoreError> {
        let n: i64 = self.conn().query_row(
            "SELECT COUNT(*) FROM sandboxes WHERE pooled = 1 AND template = ?1 AND (?2 = 0 OR state = 'running')",
            params![template, ready_only as i64],
            |r| r.get(0),
        )?;
        Ok(n as u64)
    }

    /// Ids of user sandboxes whose TTL has passed.
    pub fn expired(&self, now_ms: u64) -> Result<Vec<String>, StoreError> {
        let conn = self.conn();
        let mut st = conn.prepare_cached(
            "SELECT id FROM sandboxes WHERE pooled = 0 AND expires_at_ms IS NOT NULL AND expires_at_ms <= ?1",
        )?;
        let ids = st
            .query_map([now_ms as i64], |r| r.get(0))?
            .collect::<Result<Vec<String>, _>>()?;
        Ok(ids)
    }

    pub fn get_meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn()
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()?)
    }

    pub fn set_meta(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            params![key, value],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, pooled: bool) -> SandboxRow {
        SandboxRow {
            sandbox: Sandbox {
                id: id.into(),
                template: "base".into(),
                image: "sha256:ab".into(),
                state: SandboxState::Running,
                cpus: 1.0,
                memory_bytes: 512 << 20,
                disk_bytes: 2 << 30,
                network: NetworkMode::None,
                created_at_ms: 1,
                expires_at_ms: None,
                from_pool: false,
                labels: Default::default(),
                ip: None,
            },
            pooled,
        }
    }

    fn key() -> PoolKey {
        PoolKey {
            template: "base".into(),
            cpus: 1.0,
            memory_bytes: 512 << 20,
            disk_bytes: 2 << 30,
            network: NetworkMode::None,
        }
    }

    #[test]
    fn claim_takes_each_pool_member_once() {
        let s = Store::in_memory().expect("open");
        s.insert(&row("sb-a", true)).expect("insert");
        s.insert(&row("sb-b", false)).expect("insert");
        assert_eq!(s.list(false).expect("list").len(), 1);
        assert_eq!(s.pooled_count("base", false).expect("count"), 1);
        assert_eq!(s.pooled_count("base", true).expect("count"), 1);
        let labels = [("k".to_string(), "v".to_string())].into_iter().collect();
        let c = s
            .claim_pooled(&key(), 42, Some(100), &labels)
            .expect("claim")
            .expect("some");
        assert_eq!(c.sandbox.id, "sb-a");
        assert!(c.sandbox.from_pool && !c.pooled);
        assert_eq!(c.sandbox.labels, labels);
        assert_eq!(
            s.claim_pooled(&key(), 43, None, &labels).expect("claim"),
            None
        );
        let other = PoolKey { cpus: 2.0, ..key() };
        s.insert(&row("sb-c", true)).expect("insert");
        assert_eq!(
            s.claim_pooled(&other, 43, None, &labels).expect("claim"),
            None
        );
        assert_eq!(s.expired(99).expect("exp"), Vec::<String>::new());
        assert_eq!(s.expired(100).expect("exp"), vec!["sb-a".to_string()]);
    }

    #[test]
    fn creating_members_cannot_be_claimed() {
        let s = Store::in_memory().expect("open");
        let mut r = row("sb-a", true);
        r.sandbox.state = SandboxState::Creating;
        s.insert(&r).expect("insert");
        let labels = Default::default();
        assert_eq!(
            s.claim_pooled(&key(), 1, None, &labels).expect("claim"),
            None
        );
        assert_eq!(
            (
                s.pooled_count("base", false).expect("n"),
                s.pooled_count("base", true).expect("n")
            ),
            (1, 0)
        );
        assert!(s.mark_created("sb-a", Some("10.0.0.2")).expect("mark"));
        assert!(!s.mark_created("sb-a", None).expect("mark twice is a no-op"));
        let c = s
            .claim_pooled(&key(), 1, None, &labels)
            .expect("claim")
            .expect("some");
        assert_eq!(c.sandbox.ip.as_deref(), Some("10.0.0.2"));
    }

    #[test]
    fn state_and_meta_round_trip() {
        let s = Store::in_memory().expect("open");
        s.insert(&row("sb-a", false)).expect("insert");
        assert!(s.set_state("sb-a", SandboxState::Paused).expect("set"));
        assert_eq!(
            s.get("sb-a").expect("get").expect("some").sandbox.state,
            SandboxState::Paused
        );
        assert!(!s.set_state("nope", SandboxState::Dead).expect("set"));
        assert!(s.delete("sb-a").expect("del"));
        assert_eq!(s.get("sb-a").expect("get"), None);
        s.set_meta("k", "1").expect("meta");
        s.set_meta("k", "2").expect("meta");
        assert_eq!(s.get_meta("k").expect("meta").as_deref(), Some("2"));
    }
}
