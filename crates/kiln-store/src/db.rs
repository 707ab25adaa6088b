//! The two database backends behind one tiny query interface: embedded SQLite (rusqlite, one
//! connection behind an async mutex) and PostgreSQL (tokio-postgres, a small fixed pool).
//!
//! SQL is written once, in the common subset of both dialects, with `$1`-style placeholders
//! (rewritten to SQLite's `?1`). Values cross the boundary as [`Val`]; rows come back as
//! [`Row`]s of [`Val`]s, so callers never see a driver type.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use rusqlite::types::{Value as SqlValue, ValueRef};
use tokio::sync::{Mutex, OwnedMutexGuard};
use tokio_postgres::types::{ToSql, Type};

use crate::StoreError;

/// A parameter or column value. The typed `None`s matter for PostgreSQL, whose parameters
/// are typed.
#[derive(Debug, Clone, PartialEq)]
pub enum Val {
    I(Option<i64>),
    F(Option<f64>),
    T(Option<String>),
}

impl From<i64> for Val {
    fn from(v: i64) -> Self {
        Val::I(Some(v))
    }
}
impl From<u64> for Val {
    fn from(v: u64) -> Self {
        Val::I(Some(v as i64))
    }
}
impl From<Option<u64>> for Val {
    fn from(v: Option<u64>) -> Self {
        Val::I(v.map(|v| v as i64))
    }
}
impl From<Option<i64>> for Val {
    fn from(v: Option<i64>) -> Self {
        Val::I(v)
    }
}
impl From<f64> for Val {
    fn from(v: f64) -> Self {
        Val::F(Some(v))
    }
}
impl From<Option<f64>> for Val {
    fn from(v: Option<f64>) -> Self {
        Val::F(v)
    }
}
impl From<bool> for Val {
    fn from(v: bool) -> Self {
        Val::I(Some(v as i64))
    }
}
impl From<&str> for Val {
    fn from(v: &str) -> Self {
        Val::T(Some(v.to_string()))
    }
}
impl From<String> for Val {
    fn from(v: String) -> Self {
        Val::T(Some(v))
    }
}
impl From<&String> for Val {
    fn from(v: &String) -> Self {
        Val::T(Some(v.clone()))
    }
}
impl From<Option<String>> for Val {
    fn from(v: Option<String>) -> Self {
        Val::T(v)
    }
}
impl From<Option<&str>> for Val {
    fn from(v: Option<&str>) -> Self {
        Val::T(v.map(str::to_string))
    }
}

/// PostgreSQL cannot store a NUL character in text; neither backend gets one, so both answer
/// the same (a clear error instead of a server error on one of them).
fn check_text(params: &[Val]) -> Result<(), StoreError> {
    if params
        .iter()
        .any(|v| matches!(v, Val::T(Some(s)) if s.contains('\0')))
    {
        return Err(StoreError::InvalidText);
    }
    Ok(())
}

/// Builds an array of [`Val`]s from heterogeneous values.
#[macro_export]
macro_rules! vals {
    ($($v:expr),* $(,)?) => { [$($crate::db::Val::from($v)),*] };
}

/// One result row.
#[derive(Debug, Clone)]
pub struct Row(pub Vec<Val>);

impl Row {
    fn at(&self, i: usize) -> Result<&Val, StoreError> {
        self.0
            .get(i)
            .ok_or_else(|| StoreError::Decode(format!("no column {i}")))
    }
    pub fn opt_i64(&self, i: usize) -> Result<Option<i64>, StoreError> {
        match self.at(i)? {
            Val::I(v) => Ok(*v),
            Val::F(Some(f)) => Ok(Some(*f as i64)),
            Val::F(None) | Val::T(None) => Ok(None),
            Val::T(Some(t)) => Err(StoreError::Decode(format!(
                "column {i}: expected an integer, got `{t}`"
            ))),
        }
    }
    pub fn i64(&self, i: usize) -> Result<i64, StoreError> {
        self.opt_i64(i)?
            .ok_or_else(|| StoreError::Decode(format!("column {i} is NULL")))
    }
    pub fn u64(&self, i: usize) -> Result<u64, StoreError> {
        Ok(self.i64(i)?.max(0) as u64)
    }
    pub fn opt_u64(&self, i: usize) -> Result<Option<u64>, StoreError> {
        Ok(self.opt_i64(i)?.map(|v| v.max(0) as u64))
    }
    pub fn opt_f64(&self, i: usize) -> Result<Option<f64>, StoreError> {
        match self.at(i)? {
            Val::F(v) => Ok(*v),
            Val::I(v) => Ok(v.map(|v| v as f64)),
            Val::T(None) => Ok(None),
            Val::T(Some(t)) => Err(StoreError::Decode(format!(
                "column {i}: expected a number, got `{t}`"
            ))),
        }
    }
    pub fn f64(&self, i: usize) -> Result<f64, StoreError> {
        self.opt_f64(i)?
            .ok_or_else(|| StoreError::Decode(format!("column {i} is NULL")))
    }
    pub fn opt_text(&self, i: usize) -> Result<Option<String>, StoreError> {
        match self.at(i)? {
            Val::T(v) => Ok(v.clone()),
            Val::I(None) | Val::F(None) => Ok(None),
            other => Err(StoreError::Decode(format!(
                "column {i}: expected text, got {other:?}"
            ))),
        }
    }
    pub fn text(&self, i: usize) -> Result<String, StoreError> {
        self.opt_text(i)?
            .ok_or_else(|| StoreError::Decode(format!("column {i} is NULL")))
    }
    pub fn bool(&self, i: usize) -> Result<bool, StoreError> {
        Ok(self.i64(i)? != 0)
    }
}

/// Which database a store runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A PostgreSQL connection with its prepared-statement cache.
pub(crate) struct PgSlot {
    client: Option<tokio_postgres::Client>,
    statements: std::collections::HashMap<String, tokio_postgres::Statement>,
    in_tx: bool,
}

pub(crate) struct PgPool {
    config: tokio_postgres::Config,
    slots: Vec<Arc<Mutex<PgSlot>>>,
    next: AtomicUsize,
}

/// The database: SQLite (one connection) or a PostgreSQL pool; clones share it.
#[derive(Clone)]
pub(crate) enum Db {
    Sqlite(Arc<Mutex<rusqlite::Connection>>),
    Postgres(Arc<PgPool>),
}

/// A checked-out connection; statements on it run in order, and `begin`/`commit` make a
/// transaction. Dropping it in the middle of a transaction rolls back at the next checkout.
pub(crate) enum Conn {
    Sqlite(OwnedMutexGuard<rusqlite::Connection>),
    Postgres(OwnedMutexGuard<PgSlot>),
}

const PG_POOL_SIZE: usize = 8;

impl Db {
    pub(crate) fn sqlite(conn: rusqlite::Connection) -> Self {
        Db::Sqlite(Arc::new(Mutex::new(conn)))
    }

    pub(crate) async fn postgres(url: &str) -> Result<Self, StoreError> {
        let config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| StoreError::Config(format!("KILN_DATABASE_URL: {e}")))?;
        let pool = PgPool {
            config,
            slots: (0..PG_POOL_SIZE)
                .map(|_| {
                    Arc::new(Mutex::new(PgSlot {
                        client: None,
                        statements: Default::default(),
                        in_tx: false,
                    }))
                })
                .collect(),
            next: AtomicUsize::new(0),
        };
        let db = Db::Postgres(Arc::new(pool));
        // Connect one now so a bad URL fails at start, not at the first request.
        db.conn().await?;
        Ok(db)
    }

    pub(crate) fn backend(&self) -> Backend {
        match self {
            Db::Sqlite(_) => Backend::Sqlite,
            Db::Postgres(_) => Backend::Postgres,
        }
    }

    pub(crate) async fn conn(&self) -> Result<Conn, StoreError> {
        match self {
            Db::Sqlite(m) => {
                let g = m.clone().lock_owned().await;
                if !g.is_autocommit() {
                    // A transaction abandoned by a cancelled request.
                    let _ = g.execute_batch("ROLLBACK");
                }
                Ok(Conn::Sqlite(g))
            }
            Db::Postgres(p) => {
                let n = p.slots.len();
                let start = p.next.fetch_add(1, Ordering::Relaxed);
                // Prefer an idle slot; otherwise wait for the round-robin one.
                let mut guard = None;
                for i in 0..n {
                    if let Ok(g) = p.slots[(start + i) % n].clone().try_lock_owned() {
                        guard = Some(g);
                        break;
                    }
                }
                let mut g = match guard {
                    Some(g) => g,
                    None => p.slots[start % n].clone().lock_owned().await,
                };
                if g.client.as_ref().is_none_or(|c| c.is_closed()) {
                    let (client, connection) = p
                        .config
                        .connect(tokio_postgres::NoTls)
                        .await
                        .map_err(|e| StoreError::Postgres(format!("cannot connect: {e}")))?;
                    tokio::spawn(async move {
                        if let Err(e) = connection.await {
                            tracing_log(&e);
                        }
                    });
                    g.client = Some(client);
                    g.statements.clear();
                    g.in_tx = false;
                }
                if g.in_tx {
                    if let Some(c) = &g.client {
                        c.batch_execute("ROLLBACK").await.map_err(pg_err)?;
                    }
                    g.in_tx = false;
                }
                Ok(Conn::Postgres(g))
            }
        }
    }
}

fn tracing_log(_e: &tokio_postgres::Error) {
    // The next checkout sees the closed client and reconnects; nothing else to do.
}

pub(crate) fn pg_err(e: tokio_postgres::Error) -> StoreError {
    if let Some(db) = e.as_db_error() {
        return StoreError::Postgres(format!("{}: {}", db.code().code(), db.message()));
    }
    StoreError::Postgres(e.to_string())
}

/// `$1` -> `?1` for SQLite.
fn sqlite_sql(sql: &str) -> String {
    sql.replace('$', "?")
}

fn to_sqlite(v: &Val) -> SqlValue {
    match v {
        Val::I(Some(i)) => SqlValue::Integer(*i),
        Val::F(Some(f)) => SqlValue::Real(*f),
        Val::T(Some(t)) => SqlValue::Text(t.clone()),
        _ => SqlValue::Null,
    }
}

fn pg_param(v: &Val) -> &(dyn ToSql + Sync) {
    match v {
        Val::I(i) => i,
        Val::F(f) => f,
        Val::T(t) => t,
    }
}

fn pg_row(r: &tokio_postgres::Row) -> Result<Row, StoreError> {
    let mut out = Vec::with_capacity(r.len());
    for (i, c) in r.columns().iter().enumerate() {
        let t = c.type_();
        let v = if *t == Type::INT8 {
            Val::I(r.try_get::<_, Option<i64>>(i).map_err(pg_err)?)
        } else if *t == Type::INT4 {
            Val::I(
                r.try_get::<_, Option<i32>>(i)
                    .map_err(pg_err)?
                    .map(i64::from),
            )
        } else if *t == Type::INT2 {
            Val::I(
                r.try_get::<_, Option<i16>>(i)
                    .map_err(pg_err)?
                    .map(i64::from),
            )
        } else if *t == Type::BOOL {
            Val::I(
                r.try_get::<_, Option<bool>>(i)
                    .map_err(pg_err)?
                    .map(i64::from),
            )
        } else if *t == Type::FLOAT8 {
            Val::F(r.try_get::<_, Option<f64>>(i).map_err(pg_err)?)
        } else if *t == Type::FLOAT4 {
            Val::F(
                r.try_get::<_, Option<f32>>(i)
                    .map_err(pg_err)?
                    .map(f64::from),
            )
        } else if *t == Type::VOID {
            Val::T(None)
        } else {
            Val::T(r.try_get::<_, Option<String>>(i).map_err(pg_err)?)
        };
        out.push(v);
    }
    Ok(Row(out))
}

impl Conn {
    pub(crate) fn backend(&self) -> Backend {
        match self {
            Conn::Sqlite(_) => Backend::Sqlite,
            Conn::Postgres(_) => Backend::Postgres,
        }
    }

    async fn pg_statement(
        slot: &mut PgSlot,
        sql: &str,
    ) -> Result<tokio_postgres::Statement, StoreError> {
        if let Some(s) = slot.statements.get(sql) {
            return Ok(s.clone());
        }
        let client = slot
            .client
            .as_ref()
            .ok_or_else(|| StoreError::Postgres("not connected".into()))?;
        let st = client.prepare(sql).await.map_err(pg_err)?;
        slot.statements.insert(sql.to_string(), st.clone());
        Ok(st)
    }

    /// Runs a statement and returns its rows.
    pub(crate) async fn query(
        &mut self,
        sql: &str,
        params: &[Val],
    ) -> Result<Vec<Row>, StoreError> {
        check_text(params)?;
        match self {
            Conn::Sqlite(c) => {
                let mut st = c.prepare_cached(&sqlite_sql(sql))?;
                let ncol = st.column_count();
                let mut rows =
                    st.query(rusqlite::params_from_iter(params.iter().map(to_sqlite)))?;
                let mut out = Vec::new();
                while let Some(r) = rows.next()? {
                    let mut vals = Vec::with_capacity(ncol);
                    for i in 0..ncol {
                        vals.push(match r.get_ref(i)? {
                            ValueRef::Null => Val::T(None),
                            ValueRef::Integer(v) => Val::I(Some(v)),
                            ValueRef::Real(v) => Val::F(Some(v)),
                            ValueRef::Text(t) => Val::T(Some(String::from_utf8_lossy(t).into())),
                            ValueRef::Blob(b) => Val::T(Some(String::from_utf8_lossy(b).into())),
                        });
                    }
                    out.push(Row(vals));
                }
                Ok(out)
            }
            Conn::Postgres(slot) => {
                let st = Self::pg_statement(slot, sql).await?;
                let client = slot
                    .client
                    .as_ref()
                    .ok_or_else(|| StoreError::Postgres("not connected".into()))?;
                let ps: Vec<&(dyn ToSql + Sync)> = params.iter().map(pg_param).collect();
                let rows = client.query(&st, &ps).await.map_err(pg_err)?;
                rows.iter().map(pg_row).collect()
            }
        }
    }

    /// Runs a statement; returns the number of rows it changed.
    pub(crate) async fn exec(&mut self, sql: &str, params: &[Val]) -> Result<u64, StoreError> {
        check_text(params)?;
        match self {
            Conn::Sqlite(c) => {
                let mut st = c.prepare_cached(&sqlite_sql(sql))?;
                Ok(st.execute(rusqlite::params_from_iter(params.iter().map(to_sqlite)))? as u64)
            }
            Conn::Postgres(slot) => {
                let st = Self::pg_statement(slot, sql).await?;
                let client = slot
                    .client
                    .as_ref()
                    .ok_or_else(|| StoreError::Postgres("not connected".into()))?;
                let ps: Vec<&(dyn ToSql + Sync)> = params.iter().map(pg_param).collect();
                client.execute(&st, &ps).await.map_err(pg_err)
            }
        }
    }

    /// Runs several `;`-separated statements without parameters.
    pub(crate) async fn batch(&mut self, sql: &str) -> Result<(), StoreError> {
        match self {
            Conn::Sqlite(c) => Ok(c.execute_batch(sql)?),
            Conn::Postgres(slot) => {
                let client = slot
                    .client
                    .as_ref()
                    .ok_or_else(|| StoreError::Postgres("not connected".into()))?;
                client.batch_execute(sql).await.map_err(pg_err)
            }
        }
    }

    /// Starts a transaction. On SQLite it takes the write lock at once (`IMMEDIATE`), so a
    /// read-check-write inside it is serialised against every other writer, in any process.
    pub(crate) async fn begin(&mut self) -> Result<(), StoreError> {
        match self {
            Conn::Sqlite(c) => Ok(c.execute_batch("BEGIN IMMEDIATE")?),
            Conn::Postgres(slot) => {
                slot.in_tx = true;
                let client = slot
                    .client
                    .as_ref()
                    .ok_or_else(|| StoreError::Postgres("not connected".into()))?;
                client.batch_execute("BEGIN").await.map_err(pg_err)
            }
        }
    }

    pub(crate) async fn commit(&mut self) -> Result<(), StoreError> {
        self.end("COMMIT").await
    }

    pub(crate) async fn rollback(&mut self) -> Result<(), StoreError> {
        self.end("ROLLBACK").await
    }

    async fn end(&mut self, what: &str) -> Result<(), StoreError> {
        match self {
            Conn::Sqlite(c) => Ok(c.execute_batch(what)?),
            Conn::Postgres(slot) => {
                let client = slot
                    .client
                    .as_ref()
                    .ok_or_else(|| StoreError::Postgres("not connected".into()))?;
                let r = client.batch_execute(what).await.map_err(pg_err);
                slot.in_tx = false;
                r
            }
        }
    }
}
