//! Storage of an index behind a trait (`ChunkStore`), so a PostgreSQL + pgvector backend can
//! replace the embedded default without touching the callers. The default, `SqliteStore`, keeps
//! files, chunks (with their vectors) and the redaction report in one SQLite file per index;
//! `EmbeddingCache` is the L2 cache, one SQLite file per organisation.
//!
//! An encrypted index's store is given its organisation's [`Sealer`]: chunk text, symbols and
//! vectors are sealed (random nonces), paths are sealed deterministically (so lookups by path
//! still work) and chunk ids become keyed hashes; line numbers, languages, symbol kinds and
//! sizes stay in clear.

use std::path::Path;
use std::sync::Arc;

use rusqlite::types::{Value, ValueRef};
use rusqlite::{params, Connection, OptionalExtension};

use crate::chunk::{Chunk, SymbolKind};
use crate::lang::Language;
use crate::redact::Redaction;
use crate::seal::Sealer;
use crate::Error;

/// A file as last indexed.
#[derive(Debug, Clone, PartialEq)]
pub struct FileRecord {
    pub path: String,
    pub size: u64,
    pub mtime_ns: i64,
    pub hash: String,
}

/// A stored chunk and its row id (the id used by the BM25 and vector indexes).
#[derive(Debug, Clone)]
pub struct StoredChunk {
    pub rowid: i64,
    pub chunk: Chunk,
}

/// A chunk waiting for its vector.
#[derive(Debug, Clone)]
pub struct Pending {
    pub rowid: i64,
    pub id: String,
    pub text: String,
    pub symbol: Option<String>,
}

/// Counts for stats.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counts {
    pub files: u64,
    pub chunks: u64,
    pub embedded: u64,
}

/// What an index stores. Every method is one transaction.
pub trait ChunkStore: Send {
    fn meta(&self, key: &str) -> Result<Option<String>, Error>;
    fn set_meta(&mut self, key: &str, value: &str) -> Result<(), Error>;
    fn files(&self) -> Result<Vec<FileRecord>, Error>;
    /// Replaces a file's chunks and redactions (a new file too); returns the rows removed and
    /// the rows added.
    fn replace_file(
        &mut self,
        file: &FileRecord,
        chunks: &[Chunk],
        redactions: &[Redaction],
    ) -> Result<(Vec<i64>, Vec<i64>), Error>;
    /// Updates a file's size and mtime only (content unchanged).
    fn touch_file(&mut self, file: &FileRecord) -> Result<(), Error>;
    /// Removes a file and everything derived from it; returns the removed rows.
    fn remove_file(&mut self, path: &str) -> Result<Vec<i64>, Error>;
    fn chunks(&self, rowids: &[i64]) -> Result<Vec<StoredChunk>, Error>;
    fn all_chunks(&self) -> Result<Vec<StoredChunk>, Error>;
    /// Chunks without a vector: (rowid, chunk id, text, symbol).
    fn pending_vectors(&self, limit: usize) -> Result<Vec<Pending>, Error>;
    fn set_vectors(&mut self, rows: &[(i64, Vec<f32>)]) -> Result<(), Error>;
    fn vectors(&self) -> Result<Vec<(i64, Vec<f32>)>, Error>;
    fn counts(&self) -> Result<Counts, Error>;
    fn redactions(&self) -> Result<Vec<Redaction>, Error>;
}

pub fn vec_to_blob(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub fn blob_to_vec(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Turns a value read from SQLite into text, opening it when the store is sealed.
fn text_out(
    seal: Option<&Sealer>,
    purpose: &[u8],
    v: ValueRef,
    col: usize,
) -> rusqlite::Result<String> {
    let fail = |e: Box<dyn std::error::Error + Send + Sync>| {
        rusqlite::Error::FromSqlConversionFailure(col, v.data_type(), e)
    };
    match (seal, v) {
        (None, ValueRef::Text(t)) => String::from_utf8(t.to_vec()).map_err(|e| fail(e.into())),
        (Some(s), ValueRef::Blob(b)) => s
            .open(purpose, b)
            .map_err(|e| fail(e.to_string().into()))
            .and_then(|p| String::from_utf8(p).map_err(|e| fail(e.into()))),
        _ => Err(fail(
            "a value is not sealed as the index's configuration says (or the reverse)".into(),
        )),
    }
}

fn opt_text_out(
    seal: Option<&Sealer>,
    purpose: &[u8],
    v: ValueRef,
    col: usize,
) -> rusqlite::Result<Option<String>> {
    match v {
        ValueRef::Null => Ok(None),
        v => text_out(seal, purpose, v, col).map(Some),
    }
}

fn vector_out(seal: Option<&Sealer>, b: &[u8]) -> rusqlite::Result<Vec<f32>> {
    match seal {
        None => Ok(blob_to_vec(b)),
        Some(s) => s.open(b"vector", b).map(|p| blob_to_vec(&p)).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(
                1,
                rusqlite::types::Type::Blob,
                e.to_string().into(),
            )
        }),
    }
}

/// The embedded default: one SQLite file.
pub struct SqliteStore {
    conn: Connection,
    seal: Option<Arc<Sealer>>,
}

impl SqliteStore {
    pub fn open(path: &Path) -> Result<SqliteStore, Error> {
        Self::open_sealed(path, None)
    }

    /// A store whose chunk text, symbols, vectors and paths are sealed with `seal`.
    pub fn open_sealed(path: &Path, seal: Option<Arc<Sealer>>) -> Result<SqliteStore, Error> {
        let conn = Connection::open(path)?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;
             CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER NOT NULL,
               mtime_ns INTEGER NOT NULL, hash TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS chunks (rowid INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL,
               path TEXT NOT NULL, start_line INTEGER NOT NULL, end_line INTEGER NOT NULL,
               language TEXT NOT NULL, symbol TEXT, kind TEXT NOT NULL, text TEXT NOT NULL, vector BLOB);
             CREATE INDEX IF NOT EXISTS chunks_path ON chunks(path);
             -- Rows waiting for a vector: the worker's batches and the counts read this small
             -- index instead of scanning every row (quadratic over a large first sync).
             CREATE INDEX IF NOT EXISTS chunks_unembedded ON chunks(rowid) WHERE vector IS NULL;
             CREATE TABLE IF NOT EXISTS redactions (path TEXT NOT NULL, line INTEGER NOT NULL, kind TEXT NOT NULL);
             CREATE INDEX IF NOT EXISTS redactions_path ON redactions(path);",
        )?;
        if seal.is_some() {
            // Deleted rows are overwritten, not left in free pages.
            conn.execute_batch("PRAGMA secure_delete=ON;")?;
        }
        Ok(SqliteStore { conn, seal })
    }

    fn sealer(&self) -> Option<&Sealer> {
        self.seal.as_deref()
    }

    /// A value to store: sealed with a random nonce when the store is sealed.
    fn text_in(&self, purpose: &[u8], s: &str) -> Value {
        match self.sealer() {
            None => Value::Text(s.to_string()),
            Some(k) => Value::Blob(k.seal(purpose, s.as_bytes())),
        }
    }

    /// A path to store or look up: sealed deterministically when the store is sealed.
    fn path_in(&self, p: &str) -> Value {
        match self.sealer() {
            None => Value::Text(p.to_string()),
            Some(k) => Value::Blob(k.seal_det(b"path", p.as_bytes())),
        }
    }

    /// A chunk id to store: a keyed hash of it when the store is sealed (the organisation's
    /// key, so its encrypted indexes still share cached embeddings).
    fn id_in(&self, id: &str) -> String {
        match self.sealer() {
            None => id.to_string(),
            Some(k) => k.keyed_hash(b"chunk", id.as_bytes()),
        }
    }

    fn vector_in(&self, v: &[f32]) -> Vec<u8> {
        match self.sealer() {
            None => vec_to_blob(v),
            Some(k) => k.seal(b"vector", &vec_to_blob(v)),
        }
    }
}

fn row_chunk(seal: Option<&Sealer>, r: &rusqlite::Row) -> rusqlite::Result<StoredChunk> {
    let language: String = r.get(5)?;
    let kind: String = r.get(7)?;
    Ok(StoredChunk {
        rowid: r.get(0)?,
        chunk: Chunk {
            id: r.get(1)?,
            path: text_out(seal, b"path", r.get_ref(2)?, 2)?,
            start_line: r.get(3)?,
            end_line: r.get(4)?,
            language: Language::parse(&language).unwrap_or(Language::Text),
            symbol: opt_text_out(seal, b"symbol", r.get_ref(6)?, 6)?,
            kind: SymbolKind::parse(&kind).unwrap_or(SymbolKind::Code),
            text: text_out(seal, b"text", r.get_ref(8)?, 8)?,
        },
    })
}

const CHUNK_COLS: &str = "rowid, id, path, start_line, end_line, language, symbol, kind, text";

impl ChunkStore for SqliteStore {
    fn meta(&self, key: &str) -> Result<Option<String>, Error> {
        Ok(self
            .conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()?)
    }

    fn set_meta(&mut self, key: &str, value: &str) -> Result<(), Error> {
        self.conn.execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            params![key, value],
        )?;
        Ok(())
    }

    fn files(&self) -> Result<Vec<FileRecord>, Error> {
        let seal = self.sealer();
        let mut st = self
            .conn
            .prepare("SELECT path, size, mtime_ns, hash FROM files")?;
        let rows = st.query_map([], |r| {
            Ok(FileRecord {
                path: text_out(seal, b"path", r.get_ref(0)?, 0)?,
                size: r.get::<_, i64>(1)? as u64,
                mtime_ns: r.get(2)?,
                hash: r.get(3)?,
            })
        })?;
        let mut files: Vec<FileRecord> = rows.collect::<Result<_, _>>()?;
        files.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(files)
    }

    fn replace_file(
        &mut self,
        file: &FileRecord,
        chunks: &[Chunk],
        redactions: &[Redaction],
    ) -> Result<(Vec<i64>, Vec<i64>), Error> {
        let path = self.path_in(&file.path);
        let sealed: Vec<[Value; 4]> = chunks
            .iter()
            .map(|c| {
                [
                    Value::Text(self.id_in(&c.id)),
                    self.path_in(&c.path),
                    c.symbol
                        .as_deref()
                        .map_or(Value::Null, |s| self.text_in(b"symbol", s)),
                    self.text_in(b"text", &c.text),
                ]
            })
            .collect();
        let red_paths: Vec<Value> = redactions.iter().map(|r| self.path_in(&r.path)).collect();
        let tx = self.conn.transaction()?;
        let removed = remove_in(&tx, &path)?;
        tx.execute(
            "INSERT INTO files (path, size, mtime_ns, hash) VALUES (?1, ?2, ?3, ?4)",
            params![path, file.size as i64, file.mtime_ns, file.hash],
        )?;
        let mut added = Vec::with_capacity(chunks.len());
        {
            let mut ins = tx.prepare_cached(
                "INSERT INTO chunks (id, path, start_line, end_line, language, symbol, kind, text)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?;
            for (c, [id, cpath, symbol, text]) in chunks.iter().zip(sealed) {
                ins.execute(params![
                    id,
                    cpath,
                    c.start_line,
                    c.end_line,
                    c.language.as_str(),
                    symbol,
                    c.kind.as_str(),
                    text
                ])?;
                added.push(tx.last_insert_rowid());
            }
            let mut red =
                tx.prepare_cached("INSERT INTO redactions (path, line, kind) VALUES (?1, ?2, ?3)")?;
            for (r, p) in redactions.iter().zip(red_paths) {
                red.execute(params![p, r.line, r.kind])?;
            }
        }
        tx.commit()?;
        Ok((removed, added))
    }

    fn touch_file(&mut self, file: &FileRecord) -> Result<(), Error> {
        self.conn.execute(
            "UPDATE files SET size = ?2, mtime_ns = ?3 WHERE path = ?1",
            params![self.path_in(&file.path), file.size as i64, file.mtime_ns],
        )?;
        Ok(())
    }

    fn remove_file(&mut self, path: &str) -> Result<Vec<i64>, Error> {
        let path = self.path_in(path);
        let tx = self.conn.transaction()?;
        let removed = remove_in(&tx, &path)?;
        tx.commit()?;
        Ok(removed)
    }

    fn chunks(&self, rowids: &[i64]) -> Result<Vec<StoredChunk>, Error> {
        let mut st = self
            .conn
            .prepare_cached(&format!("SELECT {CHUNK_COLS} FROM chunks WHERE rowid = ?1"))?;
        let seal = self.sealer();
        let mut out = Vec::with_capacity(rowids.len());
        for id in rowids {
            if let Some(c) = st.query_row([id], |r| row_chunk(seal, r)).optional()? {
                out.push(c);
            }
        }
        Ok(out)
    }

    fn all_chunks(&self) -> Result<Vec<StoredChunk>, Error> {
        let mut st = self
            .conn
            .prepare(&format!("SELECT {CHUNK_COLS} FROM chunks ORDER BY rowid"))?;
        let seal = self.sealer();
        let rows = st.query_map([], |r| row_chunk(seal, r))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn pending_vectors(&self, limit: usize) -> Result<Vec<Pending>, Error> {
        let mut st = self
            .conn
            .prepare_cached("SELECT rowid, id, text, symbol FROM chunks WHERE vector IS NULL ORDER BY rowid LIMIT ?1")?;
        let seal = self.sealer();
        let rows = st.query_map([limit as i64], |r| {
            Ok(Pending {
                rowid: r.get(0)?,
                id: r.get(1)?,
                text: text_out(seal, b"text", r.get_ref(2)?, 2)?,
                symbol: opt_text_out(seal, b"symbol", r.get_ref(3)?, 3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn set_vectors(&mut self, rows: &[(i64, Vec<f32>)]) -> Result<(), Error> {
        let blobs: Vec<Vec<u8>> = rows.iter().map(|(_, v)| self.vector_in(v)).collect();
        let tx = self.conn.transaction()?;
        {
            let mut st = tx.prepare_cached("UPDATE chunks SET vector = ?2 WHERE rowid = ?1")?;
            for ((id, _), blob) in rows.iter().zip(blobs) {
                st.execute(params![id, blob])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn vectors(&self) -> Result<Vec<(i64, Vec<f32>)>, Error> {
        let mut st = self
            .conn
            .prepare("SELECT rowid, vector FROM chunks WHERE vector IS NOT NULL")?;
        let seal = self.sealer();
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                vector_out(seal, r.get_ref(1)?.as_blob()?)?,
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn counts(&self) -> Result<Counts, Error> {
        let files: i64 = self
            .conn
            .query_row("SELECT COUNT(*) FROM files", [], |r| r.get(0))?;
        // Both counts come from indexes (`chunks_path`, `chunks_unembedded`), not row scans.
        let (chunks, pending): (i64, i64) = self.conn.query_row(
            "SELECT (SELECT COUNT(*) FROM chunks), (SELECT COUNT(*) FROM chunks WHERE vector IS NULL)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        Ok(Counts {
            files: files as u64,
            chunks: chunks as u64,
            embedded: (chunks - pending).max(0) as u64,
        })
    }

    fn redactions(&self) -> Result<Vec<Redaction>, Error> {
        let seal = self.sealer();
        let mut st = self
            .conn
            .prepare("SELECT path, line, kind FROM redactions")?;
        let rows = st.query_map([], |r| {
            Ok(Redaction {
                path: text_out(seal, b"path", r.get_ref(0)?, 0)?,
                line: r.get(1)?,
                kind: r.get(2)?,
            })
        })?;
        let mut out: Vec<Redaction> = rows.collect::<Result<_, _>>()?;
        out.sort_by(|a, b| (&a.path, a.line).cmp(&(&b.path, b.line)));
        Ok(out)
    }
}

fn remove_in(tx: &rusqlite::Transaction, path: &Value) -> Result<Vec<i64>, Error> {
    let mut st = tx.prepare_cached("SELECT rowid FROM chunks WHERE path = ?1")?;
    let removed: Vec<i64> = st
        .query_map([path], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    tx.execute("DELETE FROM chunks WHERE path = ?1", [path])?;
    tx.execute("DELETE FROM redactions WHERE path = ?1", [path])?;
    tx.execute("DELETE FROM files WHERE path = ?1", [path])?;
    Ok(removed)
}

fn cache_model(model: &str, seal: Option<&Sealer>) -> String {
    match seal {
        None => model.to_string(),
        Some(_) => format!("{model}#sealed"),
    }
}

/// The L2 cache: vectors keyed by (model id, chunk hash), one file per organisation, shared by
/// all of its indexes. Deleted rows are overwritten (`secure_delete`), so an erased source
/// leaves no vector in free pages.
pub struct EmbeddingCache {
    conn: Connection,
}

impl EmbeddingCache {
    pub fn open(path: &Path) -> Result<EmbeddingCache, Error> {
        let conn = Connection::open(path)?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA secure_delete=ON;
             CREATE TABLE IF NOT EXISTS embeddings (model TEXT NOT NULL, hash TEXT NOT NULL, vector BLOB NOT NULL,
               PRIMARY KEY (model, hash));",
        )?;
        Ok(EmbeddingCache { conn })
    }

    /// The cached vector of a chunk. With `seal` (an encrypted index), the entry was sealed
    /// with the organisation's key and is opened; such entries are kept under `model#sealed`.
    pub fn get(
        &self,
        model: &str,
        hash: &str,
        seal: Option<&Sealer>,
    ) -> Result<Option<Vec<f32>>, Error> {
        let model = cache_model(model, seal);
        let mut st = self
            .conn
            .prepare_cached("SELECT vector FROM embeddings WHERE model = ?1 AND hash = ?2")?;
        let Some(b) = st
            .query_row(params![model, hash], |r| r.get::<_, Vec<u8>>(0))
            .optional()?
        else {
            return Ok(None);
        };
        Ok(Some(match seal {
            None => blob_to_vec(&b),
            Some(s) => blob_to_vec(&s.open(b"l2-vector", &b)?),
        }))
    }

    pub fn put(
        &mut self,
        model: &str,
        rows: &[(String, Vec<f32>)],
        seal: Option<&Sealer>,
    ) -> Result<(), Error> {
        let model = cache_model(model, seal);
        let tx = self.conn.transaction()?;
        {
            let mut st = tx.prepare_cached(
                "INSERT OR REPLACE INTO embeddings (model, hash, vector) VALUES (?1, ?2, ?3)",
            )?;
            for (h, v) in rows {
                let blob = match seal {
                    None => vec_to_blob(v),
                    Some(s) => s.seal(b"l2-vector", &vec_to_blob(v)),
                };
                st.execute(params![model, h, blob])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Drops the vectors of these hashes (when `kiln index rm` erases a source, hashes no
    /// other index of the organisation still uses).
    pub fn remove(&mut self, hashes: &[String]) -> Result<(), Error> {
        let tx = self.conn.transaction()?;
        {
            let mut st = tx.prepare_cached("DELETE FROM embeddings WHERE hash = ?1")?;
            for h in hashes {
                st.execute([h])?;
            }
        }
        tx.commit()?;
        Ok(())
    }
}
