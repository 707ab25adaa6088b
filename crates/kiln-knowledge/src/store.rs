//! Storage of an index behind a trait (`ChunkStore`), so a PostgreSQL + pgvector backend can
//! replace the embedded default without touching the callers. The default, `SqliteStore`, keeps
//! files, chunks (with their vectors) and the redaction report in one SQLite file per index;
//! `EmbeddingCache` is the L2 cache, one SQLite file per organisation.

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};

use crate::chunk::{Chunk, SymbolKind};
use crate::lang::Language;
use crate::redact::Redaction;
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

/// The embedded default: one SQLite file.
pub struct SqliteStore {
    conn: Connection,
}

impl SqliteStore {
    pub fn open(path: &Path) -> Result<SqliteStore, Error> {
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
        Ok(SqliteStore { conn })
    }
}

fn row_chunk(r: &rusqlite::Row) -> rusqlite::Result<StoredChunk> {
    let language: String = r.get(5)?;
    let kind: String = r.get(7)?;
    Ok(StoredChunk {
        rowid: r.get(0)?,
        chunk: Chunk {
            id: r.get(1)?,
            path: r.get(2)?,
            start_line: r.get(3)?,
            end_line: r.get(4)?,
            language: Language::parse(&language).unwrap_or(Language::Text),
            symbol: r.get(6)?,
            kind: SymbolKind::parse(&kind).unwrap_or(SymbolKind::Code),
            text: r.get(8)?,
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
        let mut st = self
            .conn
            .prepare("SELECT path, size, mtime_ns, hash FROM files ORDER BY path")?;
        let rows = st.query_map([], |r| {
            Ok(FileRecord {
                path: r.get(0)?,
                size: r.get::<_, i64>(1)? as u64,
                mtime_ns: r.get(2)?,
                hash: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn replace_file(
        &mut self,
        file: &FileRecord,
        chunks: &[Chunk],
        redactions: &[Redaction],
    ) -> Result<(Vec<i64>, Vec<i64>), Error> {
        let tx = self.conn.transaction()?;
        let removed = remove_in(&tx, &file.path)?;
        tx.execute(
            "INSERT INTO files (path, size, mtime_ns, hash) VALUES (?1, ?2, ?3, ?4)",
            params![file.path, file.size as i64, file.mtime_ns, file.hash],
        )?;
        let mut added = Vec::with_capacity(chunks.len());
        {
            let mut ins = tx.prepare_cached(
                "INSERT INTO chunks (id, path, start_line, end_line, language, symbol, kind, text)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?;
            for c in chunks {
                ins.execute(params![
                    c.id,
                    c.path,
                    c.start_line,
                    c.end_line,
                    c.language.as_str(),
                    c.symbol,
                    c.kind.as_str(),
                    c.text
                ])?;
                added.push(tx.last_insert_rowid());
            }
            let mut red =
                tx.prepare_cached("INSERT INTO redactions (path, line, kind) VALUES (?1, ?2, ?3)")?;
            for r in redactions {
                red.execute(params![r.path, r.line, r.kind])?;
            }
        }
        tx.commit()?;
        Ok((removed, added))
    }

    fn touch_file(&mut self, file: &FileRecord) -> Result<(), Error> {
        self.conn.execute(
            "UPDATE files SET size = ?2, mtime_ns = ?3 WHERE path = ?1",
            params![file.path, file.size as i64, file.mtime_ns],
        )?;
        Ok(())
    }

    fn remove_file(&mut self, path: &str) -> Result<Vec<i64>, Error> {
        let tx = self.conn.transaction()?;
        let removed = remove_in(&tx, path)?;
        tx.commit()?;
        Ok(removed)
    }

    fn chunks(&self, rowids: &[i64]) -> Result<Vec<StoredChunk>, Error> {
        let mut st = self
            .conn
            .prepare_cached(&format!("SELECT {CHUNK_COLS} FROM chunks WHERE rowid = ?1"))?;
        let mut out = Vec::with_capacity(rowids.len());
        for id in rowids {
            if let Some(c) = st.query_row([id], row_chunk).optional()? {
                out.push(c);
            }
        }
        Ok(out)
    }

    fn all_chunks(&self) -> Result<Vec<StoredChunk>, Error> {
        let mut st = self
            .conn
            .prepare(&format!("SELECT {CHUNK_COLS} FROM chunks ORDER BY rowid"))?;
        let rows = st.query_map([], row_chunk)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn pending_vectors(&self, limit: usize) -> Result<Vec<Pending>, Error> {
        let mut st = self
            .conn
            .prepare_cached("SELECT rowid, id, text, symbol FROM chunks WHERE vector IS NULL ORDER BY rowid LIMIT ?1")?;
        let rows = st.query_map([limit as i64], |r| {
            Ok(Pending {
                rowid: r.get(0)?,
                id: r.get(1)?,
                text: r.get(2)?,
                symbol: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn set_vectors(&mut self, rows: &[(i64, Vec<f32>)]) -> Result<(), Error> {
        let tx = self.conn.transaction()?;
        {
            let mut st = tx.prepare_cached("UPDATE chunks SET vector = ?2 WHERE rowid = ?1")?;
            for (id, v) in rows {
                st.execute(params![id, vec_to_blob(v)])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn vectors(&self) -> Result<Vec<(i64, Vec<f32>)>, Error> {
        let mut st = self
            .conn
            .prepare("SELECT rowid, vector FROM chunks WHERE vector IS NOT NULL")?;
        let rows = st.query_map([], |r| {
            Ok((r.get::<_, i64>(0)?, blob_to_vec(&r.get::<_, Vec<u8>>(1)?)))
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
        let mut st = self
            .conn
            .prepare("SELECT path, line, kind FROM redactions ORDER BY path, line")?;
        let rows = st.query_map([], |r| {
            Ok(Redaction {
                path: r.get(0)?,
                line: r.get(1)?,
                kind: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

fn remove_in(tx: &rusqlite::Transaction, path: &str) -> Result<Vec<i64>, Error> {
    let mut st = tx.prepare_cached("SELECT rowid FROM chunks WHERE path = ?1")?;
    let removed: Vec<i64> = st
        .query_map([path], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    tx.execute("DELETE FROM chunks WHERE path = ?1", [path])?;
    tx.execute("DELETE FROM redactions WHERE path = ?1", [path])?;
    tx.execute("DELETE FROM files WHERE path = ?1", [path])?;
    Ok(removed)
}

/// The L2 cache: vectors keyed by (model id, chunk hash), one file per organisation, shared by
/// all of its indexes.
pub struct EmbeddingCache {
    conn: Connection,
}

impl EmbeddingCache {
    pub fn open(path: &Path) -> Result<EmbeddingCache, Error> {
        let conn = Connection::open(path)?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;
             CREATE TABLE IF NOT EXISTS embeddings (model TEXT NOT NULL, hash TEXT NOT NULL, vector BLOB NOT NULL,
               PRIMARY KEY (model, hash));",
        )?;
        Ok(EmbeddingCache { conn })
    }

    pub fn get(&self, model: &str, hash: &str) -> Result<Option<Vec<f32>>, Error> {
        let mut st = self
            .conn
            .prepare_cached("SELECT vector FROM embeddings WHERE model = ?1 AND hash = ?2")?;
        Ok(st
            .query_row(params![model, hash], |r| r.get::<_, Vec<u8>>(0))
            .optional()?
            .map(|b| blob_to_vec(&b)))
    }

    pub fn put(&mut self, model: &str, rows: &[(String, Vec<f32>)]) -> Result<(), Error> {
        let tx = self.conn.transaction()?;
        {
            let mut st = tx.prepare_cached(
                "INSERT OR REPLACE INTO embeddings (model, hash, vector) VALUES (?1, ?2, ?3)",
            )?;
            for (h, v) in rows {
                st.execute(params![model, h, vec_to_blob(v)])?;
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
