//! Schema migrations, one list for both backends: each is SQL in the common subset of SQLite
//! and PostgreSQL (BIGINT, DOUBLE PRECISION, TEXT; no backend-specific types), applied in
//! order inside a transaction and recorded in `schema_migrations`. Migrations are only ever
//! appended.
//!
//! Concurrency: on PostgreSQL the run holds an advisory lock, so two `kiln up` starting on one
//! database migrate once; on SQLite the transaction is `BEGIN IMMEDIATE`.

use crate::db::{Conn, Db};
use crate::{vals, StoreError};

/// (version, SQL). Version 1 is the schema that existed before migrations were numbered; its
/// `IF NOT EXISTS` lets it adopt such a database.
pub(crate) const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        "CREATE TABLE IF NOT EXISTS sandboxes (
            id TEXT PRIMARY KEY,
            template TEXT NOT NULL,
            image TEXT NOT NULL,
            state TEXT NOT NULL,
            cpus DOUBLE PRECISION NOT NULL,
            memory_bytes BIGINT NOT NULL,
            disk_bytes BIGINT NOT NULL,
            network TEXT NOT NULL,
            created_at_ms BIGINT NOT NULL,
            expires_at_ms BIGINT,
            pooled BIGINT NOT NULL DEFAULT 0,
            from_pool BIGINT NOT NULL DEFAULT 0,
            labels TEXT NOT NULL DEFAULT '{}',
            ip TEXT
        );
        CREATE INDEX IF NOT EXISTS sandboxes_pool ON sandboxes(pooled, template);
        CREATE INDEX IF NOT EXISTS sandboxes_expiry ON sandboxes(expires_at_ms) WHERE expires_at_ms IS NOT NULL;
        CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);",
    ),
    (
        2,
        "ALTER TABLE sandboxes ADD COLUMN org_id TEXT NOT NULL DEFAULT '';
        ALTER TABLE sandboxes ADD COLUMN key_id TEXT;
        CREATE INDEX sandboxes_org ON sandboxes(org_id, pooled, state);
        CREATE TABLE orgs (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            created_at_ms BIGINT NOT NULL,
            max_sandboxes BIGINT,
            max_cpus DOUBLE PRECISION,
            max_memory_bytes BIGINT,
            max_disk_bytes BIGINT
        );
        CREATE TABLE api_keys (
            id TEXT PRIMARY KEY,
            org_id TEXT NOT NULL REFERENCES orgs(id),
            name TEXT NOT NULL,
            prefix TEXT NOT NULL,
            hash TEXT NOT NULL UNIQUE,
            role TEXT NOT NULL,
            scopes TEXT NOT NULL DEFAULT '[]',
            created_at_ms BIGINT NOT NULL,
            created_by TEXT,
            expires_at_ms BIGINT,
            last_used_at_ms BIGINT,
            revoked_at_ms BIGINT
        );
        CREATE INDEX api_keys_org ON api_keys(org_id, created_at_ms);
        CREATE TABLE audit (
            id TEXT PRIMARY KEY,
            time_ms BIGINT NOT NULL,
            org_id TEXT NOT NULL,
            key_prefix TEXT NOT NULL,
            action TEXT NOT NULL,
            resource TEXT NOT NULL,
            outcome TEXT NOT NULL,
            status BIGINT NOT NULL,
            client TEXT NOT NULL,
            request_id TEXT NOT NULL
        );
        CREATE INDEX audit_org_time ON audit(org_id, time_ms);",
    ),
    (3, "ALTER TABLE orgs ADD COLUMN rate_limits TEXT;"),
    (
        4,
        "ALTER TABLE sandboxes ADD COLUMN host TEXT NOT NULL DEFAULT '';
        CREATE INDEX sandboxes_host ON sandboxes(host, pooled);",
    ),
    (
        8,
        "CREATE TABLE usage_events (
            id TEXT PRIMARY KEY,
            source TEXT NOT NULL,
            kind TEXT NOT NULL,
            time_ms BIGINT NOT NULL,
            org_id TEXT NOT NULL,
            key_id TEXT NOT NULL,
            sandbox_id TEXT NOT NULL,
            template TEXT NOT NULL,
            start_ms BIGINT NOT NULL,
            end_ms BIGINT NOT NULL,
            sandbox_seconds DOUBLE PRECISION NOT NULL,
            cpu_seconds DOUBLE PRECISION NOT NULL,
            memory_gib_seconds DOUBLE PRECISION NOT NULL,
            disk_gib_seconds DOUBLE PRECISION NOT NULL,
            cpu_total_ns BIGINT
        );
        CREATE INDEX usage_events_org_end ON usage_events(org_id, end_ms);
        CREATE INDEX usage_events_sandbox_end ON usage_events(sandbox_id, end_ms);",
    ),
    (
        6,
        "CREATE TABLE agent_runs (
            id TEXT PRIMARY KEY,
            org_id TEXT NOT NULL,
            parent_id TEXT,
            profile TEXT NOT NULL,
            model TEXT NOT NULL,
            task TEXT NOT NULL,
            state TEXT NOT NULL,
            reason TEXT,
            sandbox_id TEXT,
            spec TEXT NOT NULL,
            stats TEXT NOT NULL DEFAULT '{}',
            host TEXT NOT NULL DEFAULT '',
            created_at_ms BIGINT NOT NULL,
            updated_at_ms BIGINT NOT NULL
        );
        CREATE INDEX agent_runs_org ON agent_runs(org_id, created_at_ms);
        CREATE INDEX agent_runs_state ON agent_runs(host, state);
        CREATE TABLE agent_events (
            run_id TEXT NOT NULL,
            seq BIGINT NOT NULL,
            time_ms BIGINT NOT NULL,
            kind TEXT NOT NULL,
            data TEXT NOT NULL,
            PRIMARY KEY (run_id, seq)
        );
        CREATE TABLE agent_approvals (
            run_id TEXT NOT NULL,
            call_id TEXT NOT NULL,
            tool TEXT NOT NULL,
            args TEXT NOT NULL,
            state TEXT NOT NULL,
            requested_at_ms BIGINT NOT NULL,
            answered_at_ms BIGINT,
            answered_by TEXT,
            PRIMARY KEY (run_id, call_id)
        );",
    ),
    (
        5,
        "CREATE TABLE ssh_keys (
            id TEXT PRIMARY KEY,
            org_id TEXT NOT NULL REFERENCES orgs(id),
            name TEXT NOT NULL,
            algorithm TEXT NOT NULL,
            fingerprint TEXT NOT NULL,
            public_key TEXT NOT NULL,
            created_at_ms BIGINT NOT NULL,
            created_by TEXT
        );
        CREATE UNIQUE INDEX ssh_keys_org_fp ON ssh_keys(org_id, fingerprint);
        CREATE INDEX ssh_keys_fp ON ssh_keys(fingerprint);",
    ),
    (
        9,
        "CREATE TABLE git_settings (
            org_id TEXT PRIMARY KEY REFERENCES orgs(id),
            author_name TEXT,
            author_email TEXT,
            updated_at_ms BIGINT NOT NULL
        );
        CREATE TABLE git_credentials (
            id TEXT PRIMARY KEY,
            org_id TEXT NOT NULL REFERENCES orgs(id),
            host TEXT NOT NULL,
            username TEXT NOT NULL,
            secret TEXT NOT NULL,
            created_at_ms BIGINT NOT NULL,
            created_by TEXT,
            last_used_at_ms BIGINT
        );
        CREATE UNIQUE INDEX git_credentials_org_host ON git_credentials(org_id, host);",
    ),
    (
        10,
        "ALTER TABLE usage_events ADD COLUMN agent_run TEXT NOT NULL DEFAULT '';
        ALTER TABLE usage_events ADD COLUMN model TEXT NOT NULL DEFAULT '';
        ALTER TABLE usage_events ADD COLUMN input_tokens BIGINT NOT NULL DEFAULT 0;
        ALTER TABLE usage_events ADD COLUMN output_tokens BIGINT NOT NULL DEFAULT 0;
        ALTER TABLE usage_events ADD COLUMN cost_usd DOUBLE PRECISION NOT NULL DEFAULT 0;",
    ),
];

const PG_LOCK: i64 = 0x6b696c6e; // "kiln"

/// Applies every migration the database has not seen yet.
pub(crate) async fn run(db: &Db) -> Result<(), StoreError> {
    let mut c = db.conn().await?;
    let pg = c.backend() == crate::Backend::Postgres;
    if pg {
        c.query("SELECT pg_advisory_lock($1)", &vals![PG_LOCK])
            .await?;
    }
    let r = apply(&mut c).await;
    if pg {
        c.query("SELECT pg_advisory_unlock($1)", &vals![PG_LOCK])
            .await?;
    }
    r
}

async fn apply(c: &mut Conn) -> Result<(), StoreError> {
    c.batch("CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_at_ms BIGINT NOT NULL)")
        .await?;
    for (version, sql) in MIGRATIONS {
        c.begin().await?;
        let r: Result<(), StoreError> = async {
            let seen = c
                .query(
                    "SELECT version FROM schema_migrations WHERE version = $1",
                    &vals![*version],
                )
                .await?;
            if seen.is_empty() {
                c.batch(sql).await?;
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as i64)
                    .unwrap_or(0);
                c.exec(
                    "INSERT INTO schema_migrations (version, applied_at_ms) VALUES ($1, $2)",
                    &vals![*version, now],
                )
                .await?;
            }
            Ok(())
        }
        .await;
        match r {
            Ok(()) => c.commit().await?,
            Err(e) => {
                let _ = c.rollback().await;
                return Err(e);
            }
        }
    }
    Ok(())
}
