//! The engine: indexes per organisation under `<root>/orgs/<org>/indexes/<name>/`, sync (walk,
//! mtime fast path, content hashes, Merkle tree, redaction, chunking, BM25), the background
//! embedding worker (batched, L2 cache first), search with the L1 cache, context assembly,
//! stats and erasure. A sync reads its source through a `Tree`: a host directory, the commit
//! a git source just fetched, or (given by the server) a sandbox's workspace. An encrypted
//! index seals its store and BM25 files with its organisation's key (`seal`).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::bm25::Bm25;
use crate::chunk::{chunk_file, ChunkLimits, SymbolKind};
use crate::context::{assemble, Context};
use crate::embed::{chunk_body, EmbedConfig, Embedder, HttpEmbedder, MiniLm, CHUNK_INPUT_FORMAT};
use crate::git::{GitPolicy, Repo};
use crate::lang::Language;
use crate::merkle;
use crate::redact::{redact, Redaction};
use crate::seal::{MasterKey, SealedDirectory, Sealer};
use crate::search::{fuse, Fusion, Hit, Mode, QueryCache, SearchParams};
use crate::source::{LocalTree, Tree};
use crate::store::{ChunkStore, EmbeddingCache, FileRecord, Pending, SqliteStore};
use crate::vector::{VectorIndex, GRAPH_FILE};
use crate::walk::{classify, FileContent, Skipped, WalkOptions};
use crate::Error;

pub use crate::source::Source;

/// An index's configuration (`config.json` in its directory).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct IndexConfig {
    pub name: String,
    pub source: Source,
    pub embed: EmbedConfig,
    pub created_at: u64,
    /// Chunk text, symbols, paths, vectors and BM25 files sealed with the org's key.
    #[serde(default)]
    pub encrypted: bool,
}

/// Options of [`Engine::create_with`].
#[derive(Debug, Clone, Copy)]
pub struct CreateOptions {
    /// Encrypt the index at rest with its organisation's key (needs a master key).
    pub encrypted: bool,
    /// What a git URL may point at.
    pub git: GitPolicy,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            encrypted: false,
            git: GitPolicy::TRUSTED,
        }
    }
}

/// What `ls` shows.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct IndexInfo {
    pub name: String,
    pub source: Source,
    pub embed: EmbedConfig,
    pub created_at: u64,
    #[serde(default)]
    pub encrypted: bool,
    pub files: u64,
    pub chunks: u64,
    pub embedded: u64,
}

/// Cache counters of an index since the server started.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub hit_rate: f64,
}

fn rate(hits: u64, misses: u64) -> CacheStats {
    let total = hits + misses;
    CacheStats {
        hits,
        misses,
        hit_rate: if total == 0 {
            0.0
        } else {
            hits as f64 / total as f64
        },
    }
}

/// What `stats` shows.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct IndexStats {
    pub info: IndexInfo,
    pub generation: u64,
    pub merkle_root: Option<String>,
    pub ann: bool,
    pub query_cache: CacheStats,
    pub embedding_cache: CacheStats,
    pub embedding_error: Option<String>,
    /// The commit a git source was last synced at.
    pub revision: Option<String>,
    /// Why the source cannot be synced any more (a removed sandbox), if so.
    pub source_error: Option<String>,
    pub redactions: Vec<Redaction>,
}

/// What a sync did.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SyncReport {
    pub files: u64,
    pub unchanged: u64,
    pub touched: u64,
    pub added: u64,
    pub changed: u64,
    pub deleted: u64,
    pub chunks_added: u64,
    pub chunks_removed: u64,
    pub skipped_binary: u64,
    pub skipped_generated: u64,
    pub skipped_too_large: u64,
    pub redactions: u64,
    pub changed_dirs: Vec<String>,
    pub merkle_root: String,
    /// The commit synced (git sources).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    pub millis: u64,
}

/// Progress of a sync, for bars and NDJSON.
#[derive(Debug, Clone, Serialize)]
pub struct SyncProgress {
    pub done: u64,
    pub total: u64,
}

/// Unfused candidate lists of one query.
pub struct Candidates {
    pub bm25: Vec<(i64, f32)>,
    pub vector: Vec<(i64, f32)>,
}

/// Per-chunk metadata kept in memory for filters.
#[derive(Debug, Clone)]
struct ChunkMeta {
    path: String,
    language: Language,
    kind: SymbolKind,
}

struct Handle {
    org: String,
    config: IndexConfig,
    dir: PathBuf,
    /// The organisation's sealer when the index is encrypted.
    seal: Option<Arc<Sealer>>,
    store: Mutex<SqliteStore>,
    bm25: RwLock<Bm25>,
    vectors: RwLock<VectorIndex>,
    meta: RwLock<HashMap<i64, ChunkMeta>>,
    generation: AtomicU64,
    l1: Mutex<QueryCache>,
    l1_hits: AtomicU64,
    l1_misses: AtomicU64,
    l1_off: AtomicBool,
    l2_hits: AtomicU64,
    l2_misses: AtomicU64,
    embedder: OnceLock<Arc<dyn Embedder>>,
    embed_error: Mutex<Option<String>>,
    queued: AtomicBool,
    /// The worker is embedding or building the vector graph of this index.
    working: AtomicBool,
    sync_lock: Mutex<()>,
    removed: AtomicBool,
}

struct Inner {
    root: PathBuf,
    models_dir: PathBuf,
    handles: Mutex<HashMap<(String, String), Arc<Handle>>>,
    local: Mutex<Option<Arc<MiniLm>>>,
    l2: Mutex<HashMap<String, Arc<Mutex<EmbeddingCache>>>>,
    work: Mutex<Option<mpsc::Sender<Arc<Handle>>>>,
    fusion: RwLock<Fusion>,
    master: RwLock<Option<MasterKey>>,
}

/// The knowledge engine of one server (cheap to clone).
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

fn valid_name(kind: &str, s: &str) -> Result<(), Error> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !s.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "{kind} `{s}` must be 1-64 characters of letters, digits, `-`, `_` or `.`, not starting with `.`"
        )))
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Embedding batches: this many chunks per call to the embedder.
const EMBED_BATCH: usize = 32;

impl Engine {
    /// An engine storing under `root` (the server's `<data dir>/knowledge`), loading the local
    /// model from `models_dir` when an index first needs it.
    pub fn new(root: &Path, models_dir: &Path) -> Result<Engine, Error> {
        std::fs::create_dir_all(root.join("orgs"))?;
        let inner = Arc::new(Inner {
            root: root.to_path_buf(),
            models_dir: models_dir.to_path_buf(),
            handles: Mutex::new(HashMap::new()),
            local: Mutex::new(None),
            l2: Mutex::new(HashMap::new()),
            work: Mutex::new(None),
            fusion: RwLock::new(Fusion::default()),
            master: RwLock::new(None),
        });
        let (tx, rx) = mpsc::channel::<Arc<Handle>>();
        *inner.work.lock() = Some(tx);
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("kiln-embed".into())
            .spawn(move || {
                while let Ok(h) = rx.recv() {
                    let Some(inner) = weak.upgrade() else { break };
                    h.working.store(true, Ordering::SeqCst);
                    h.queued.store(false, Ordering::SeqCst);
                    if let Err(e) = (Engine { inner }).embed_pending(&h) {
                        tracing::warn!(index = %h.config.name, error = %e, "embedding failed");
                        *h.embed_error.lock() = Some(e.to_string());
                    }
                    h.working.store(false, Ordering::SeqCst);
                }
            })
            .map_err(|e| Error::Storage(format!("embedding worker: {e}")))?;
        Ok(Engine { inner })
    }

    /// Sets the key encrypted indexes are sealed with (the server derives it from its secret).
    /// Without it, encrypted indexes can be neither created nor opened.
    pub fn set_master_key(&self, key: MasterKey) {
        *self.inner.master.write() = Some(key);
    }

    fn sealer(&self, org: &str) -> Result<Arc<Sealer>, Error> {
        match self.inner.master.read().as_ref() {
            Some(k) => Ok(Arc::new(k.org(org))),
            None => Err(Error::Invalid(
                "encryption at rest needs the server's knowledge key, and this engine has none"
                    .into(),
            )),
        }
    }

    /// Overrides the fusion (the evaluation sweeps weights).
    pub fn set_fusion(&self, f: Fusion) {
        *self.inner.fusion.write() = f;
    }

    fn org_dir(&self, org: &str) -> PathBuf {
        self.inner.root.join("orgs").join(org)
    }

    fn index_dir(&self, org: &str, name: &str) -> PathBuf {
        self.org_dir(org).join("indexes").join(name)
    }

    /// Creates an index (it is empty until the first sync), trusted and unencrypted.
    pub fn create(
        &self,
        org: &str,
        name: &str,
        source: Source,
        embed: EmbedConfig,
    ) -> Result<IndexInfo, Error> {
        self.create_with(org, name, source, embed, CreateOptions::default())
    }

    /// Creates an index. A git source is checked against `opts.git` and asked for its ref
    /// (so a wrong URL or branch fails here); a sandbox source is checked by the server.
    pub fn create_with(
        &self,
        org: &str,
        name: &str,
        source: Source,
        embed: EmbedConfig,
        opts: CreateOptions,
    ) -> Result<IndexInfo, Error> {
        valid_name("organisation", org)?;
        valid_name("index name", name)?;
        match &source {
            Source::Path { path } => {
                let p = Path::new(path);
                if !p.is_absolute() || !p.is_dir() {
                    return Err(Error::Invalid(format!(
                        "source path `{path}` is not an absolute path to a directory"
                    )));
                }
            }
            Source::Git { url, git_ref } => {
                crate::git::check_url(url, opts.git)?;
                // Probed outside the index directory: nothing is stored if it fails.
                Repo::new(&self.inner.root, url, git_ref.as_deref())?.probe()?;
            }
            Source::Sandbox { sandbox, path } => {
                if sandbox.is_empty() || !path.starts_with('/') {
                    return Err(Error::Invalid(format!(
                        "sandbox source `{sandbox}:{path}` needs a sandbox id and an absolute path"
                    )));
                }
            }
        }
        if opts.encrypted {
            self.sealer(org)?;
        }
        if let EmbedConfig::Ollama { url, .. } | EmbedConfig::Openai { url, .. } = &embed {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(Error::Invalid(format!(
                    "embedding url `{url}` must start with http:// or https://"
                )));
            }
        }
        let dir = self.index_dir(org, name);
        if dir.join("config.json").exists() {
            return Err(Error::Exists(name.to_string()));
        }
        std::fs::create_dir_all(&dir)?;
        let config = IndexConfig {
            name: name.to_string(),
            source,
            embed,
            created_at: now(),
            encrypted: opts.encrypted,
        };
        let tmp = dir.join("config.json.tmp");
        std::fs::write(
            &tmp,
            serde_json::to_vec_pretty(&config).map_err(|e| Error::Storage(e.to_string()))?,
        )?;
        std::fs::rename(&tmp, dir.join("config.json"))?;
        self.info(org, name)
    }

    fn handle(&self, org: &str, name: &str) -> Result<Arc<Handle>, Error> {
        if valid_name("organisation", org).is_err() || valid_name("index name", name).is_err() {
            return Err(Error::NotFound(name.to_string()));
        }
        let key = (org.to_string(), name.to_string());
        let mut handles = self.inner.handles.lock();
        if let Some(h) = handles.get(&key) {
            return Ok(h.clone());
        }
        let dir = self.index_dir(org, name);
        let config: IndexConfig = match std::fs::read(dir.join("config.json")) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| Error::Storage(format!("config.json: {e}")))?,
            Err(_) => return Err(Error::NotFound(name.to_string())),
        };
        let seal = if config.encrypted {
            Some(self.sealer(org)?)
        } else {
            None
        };
        let store = SqliteStore::open_sealed(&dir.join("index.sqlite"), seal.clone())?;
        let mut bm25 = match &seal {
            Some(s) => Bm25::open_in(Box::new(SealedDirectory::open(
                &dir.join("bm25"),
                s.clone(),
            )?))?,
            None => Bm25::open(&dir.join("bm25"))?,
        };
        let refill = bm25.needs_refill();
        let mut meta = HashMap::new();
        for c in store.all_chunks()? {
            if refill {
                bm25.add(c.rowid, &c.chunk.text, c.chunk.symbol.as_deref())?;
            }
            meta.insert(
                c.rowid,
                ChunkMeta {
                    path: c.chunk.path,
                    language: c.chunk.language,
                    kind: c.chunk.kind,
                },
            );
        }
        if refill {
            bm25.commit()?;
        }
        let stored = store.vectors()?;
        let dim = stored
            .first()
            .map(|v| v.1.len())
            .unwrap_or(crate::embed::MINILM_DIM);
        let vectors = VectorIndex::open(dim, stored, Some(&dir.join(GRAPH_FILE)));
        let generation = store
            .meta("generation")?
            .and_then(|g| g.parse().ok())
            .unwrap_or(0);
        let h = Arc::new(Handle {
            org: org.to_string(),
            config,
            dir,
            seal,
            store: Mutex::new(store),
            bm25: RwLock::new(bm25),
            vectors: RwLock::new(vectors),
            meta: RwLock::new(meta),
            generation: AtomicU64::new(generation),
            l1: Mutex::new(QueryCache::new(1024)),
            l1_hits: AtomicU64::new(0),
            l1_misses: AtomicU64::new(0),
            l1_off: AtomicBool::new(false),
            l2_hits: AtomicU64::new(0),
            l2_misses: AtomicU64::new(0),
            embedder: OnceLock::new(),
            embed_error: Mutex::new(None),
            queued: AtomicBool::new(false),
            working: AtomicBool::new(false),
            sync_lock: Mutex::new(()),
            removed: AtomicBool::new(false),
        });
        handles.insert(key, h.clone());
        // Chunks left without vectors by a previous run are embedded now, and a vector graph
        // that was not saved is built.
        if h.store.lock().counts()?.embedded < h.meta.read().len() as u64
            || h.vectors.read().needs_graph()
        {
            self.enqueue(&h);
        }
        Ok(h)
    }

    fn bump(&self, h: &Handle) -> Result<u64, Error> {
        let g = h.generation.fetch_add(1, Ordering::SeqCst) + 1;
        h.store.lock().set_meta("generation", &g.to_string())?;
        h.l1.lock().clear();
        Ok(g)
    }

    fn info_of(&self, h: &Handle) -> Result<IndexInfo, Error> {
        let c = h.store.lock().counts()?;
        Ok(IndexInfo {
            name: h.config.name.clone(),
            source: h.config.source.clone(),
            embed: h.config.embed.clone(),
            created_at: h.config.created_at,
            encrypted: h.config.encrypted,
            files: c.files,
            chunks: c.chunks,
            embedded: c.embedded,
        })
    }

    pub fn info(&self, org: &str, name: &str) -> Result<IndexInfo, Error> {
        let h = self.handle(org, name)?;
        self.info_of(&h)
    }

    fn names(&self, org: &str) -> Vec<String> {
        let mut names: Vec<String> = match std::fs::read_dir(self.org_dir(org).join("indexes")) {
            Ok(rd) => rd
                .filter_map(|e| e.ok())
                .filter(|e| e.path().join("config.json").exists())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect(),
            Err(_) => Vec::new(),
        };
        names.sort();
        names
    }

    /// The indexes of an organisation, by name.
    pub fn list(&self, org: &str) -> Result<Vec<IndexInfo>, Error> {
        if valid_name("organisation", org).is_err() {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for n in self.names(org) {
            match self.info(org, &n) {
                Ok(i) => out.push(i),
                Err(Error::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// The configuration of every index of every organisation (read from `config.json`
    /// only: nothing is opened), as (organisation, configuration).
    pub fn sources_all(&self) -> Result<Vec<(String, IndexConfig)>, Error> {
        let mut out = Vec::new();
        let Ok(rd) = std::fs::read_dir(self.inner.root.join("orgs")) else {
            return Ok(out);
        };
        let mut orgs: Vec<String> = rd
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|o| valid_name("organisation", o).is_ok())
            .collect();
        orgs.sort();
        for org in orgs {
            for name in self.names(&org) {
                let Ok(b) = std::fs::read(self.index_dir(&org, &name).join("config.json")) else {
                    continue;
                };
                match serde_json::from_slice::<IndexConfig>(&b) {
                    Ok(c) => out.push((org.clone(), c)),
                    Err(e) => tracing::warn!(index = %name, error = %e, "unreadable config.json"),
                }
            }
        }
        Ok(out)
    }

    /// Records (or clears) why the index's source cannot be synced (shown by `stats`).
    pub fn set_source_error(
        &self,
        org: &str,
        name: &str,
        error: Option<&str>,
    ) -> Result<(), Error> {
        let h = self.handle(org, name)?;
        let mut st = h.store.lock();
        st.set_meta("source_error", error.unwrap_or(""))
    }

    /// Brings the index up to date with its source. Lexical search sees the result when this
    /// returns; vectors follow on the background worker.
    pub fn sync(
        &self,
        org: &str,
        name: &str,
        progress: &dyn Fn(SyncProgress),
    ) -> Result<SyncReport, Error> {
        self.sync_from(org, name, None, &HashSet::new(), progress)
    }

    /// [`Self::sync`] reading from `tree` (a sandbox's workspace, given by the server; host
    /// directories and git sources are read by the engine itself when `tree` is `None`).
    /// Files in `force` are read even if their size and stamp did not change (a watch saw them
    /// change within the stamp's resolution).
    pub fn sync_from(
        &self,
        org: &str,
        name: &str,
        tree: Option<&dyn Tree>,
        force: &HashSet<String>,
        progress: &dyn Fn(SyncProgress),
    ) -> Result<SyncReport, Error> {
        let h = self.handle(org, name)?;
        let _guard = h.sync_lock.lock();
        let started = Instant::now();
        let owned: Box<dyn Tree>;
        let mut revision = None;
        let tree: &dyn Tree = match (tree, &h.config.source) {
            (Some(t), _) => t,
            (None, Source::Path { path }) => {
                owned = Box::new(LocalTree::new(path));
                &*owned
            }
            (None, Source::Git { url, git_ref }) => {
                let repo = Repo::new(&h.dir.join("source.git"), url, git_ref.as_deref())?;
                let commit = repo.fetch()?;
                owned = Box::new(repo.tree(&commit)?);
                revision = Some(commit);
                &*owned
            }
            (None, Source::Sandbox { sandbox, .. }) => {
                return Err(Error::Invalid(format!(
                    "index `{name}` follows sandbox `{sandbox}`: the server syncs it (POST /v1/indexes/{name}/sync)"
                )))
            }
        };
        let (files, skipped): (_, Skipped) = tree
            .walk(&WalkOptions::default())
            .map_err(|e| Error::Source(format!("{}: {e}", tree.describe())))?;
        let old: HashMap<String, FileRecord> = h
            .store
            .lock()
            .files()?
            .into_iter()
            .map(|f| (f.path.clone(), f))
            .collect();
        let old_tree = merkle::tree(old.values().map(|f| (f.path.as_str(), f.hash.as_str())));
        let mut report = SyncReport {
            files: files.len() as u64,
            skipped_too_large: skipped.too_large,
            skipped_generated: skipped.generated,
            ..Default::default()
        };
        let limits = ChunkLimits::default();
        let mut seen = HashSet::new();
        let mut new_hashes: Vec<(String, String)> = Vec::with_capacity(files.len());
        let total = files.len() as u64;
        let mut pending_commit = 0usize;
        for (i, f) in files.iter().enumerate() {
            if i % 256 == 0 {
                progress(SyncProgress {
                    done: i as u64,
                    total,
                });
            }
            seen.insert(f.rel.clone());
            let prev = old.get(&f.rel);
            if let Some(o) = prev {
                if o.size == f.size && o.mtime_ns == f.mtime_ns && !force.contains(&f.rel) {
                    report.unchanged += 1;
                    new_hashes.push((f.rel.clone(), o.hash.clone()));
                    continue;
                }
            }
            let Ok(bytes) = tree.read(&f.rel) else {
                continue;
            };
            let hash = match &h.seal {
                None => hex::encode(Sha256::digest(&bytes)),
                Some(s) => s.keyed_hash(b"file", &bytes),
            };
            let record = FileRecord {
                path: f.rel.clone(),
                size: f.size,
                mtime_ns: f.mtime_ns,
                hash: hash.clone(),
            };
            new_hashes.push((f.rel.clone(), hash.clone()));
            if prev.is_some_and(|o| o.hash == hash) {
                h.store.lock().touch_file(&record)?;
                report.touched += 1;
                continue;
            }
            let (chunks, reds) = match classify(bytes) {
                FileContent::Text(text) => {
                    let (clean, reds) = redact(&f.rel, &text);
                    (chunk_file(&f.rel, f.language, &clean, &limits), reds)
                }
                FileContent::Binary => {
                    report.skipped_binary += 1;
                    (Vec::new(), Vec::new())
                }
                FileContent::Generated => {
                    report.skipped_generated += 1;
                    (Vec::new(), Vec::new())
                }
            };
            report.redactions += reds.len() as u64;
            let (removed, added) = h.store.lock().replace_file(&record, &chunks, &reds)?;
            if prev.is_some() {
                report.changed += 1;
            } else {
                report.added += 1;
            }
            report.chunks_added += added.len() as u64;
            report.chunks_removed += removed.len() as u64;
            self.apply(&h, &removed, &added, &chunks)?;
            pending_commit += 1;
            if pending_commit >= 2000 {
                h.bm25.write().commit()?;
                pending_commit = 0;
            }
        }
        for p in old.keys() {
            if !seen.contains(p) {
                let removed = h.store.lock().remove_file(p)?;
                report.chunks_removed += removed.len() as u64;
                report.deleted += 1;
                self.apply(&h, &removed, &[], &[])?;
            }
        }
        let touched_index = report.added + report.changed + report.deleted > 0;
        if touched_index {
            h.bm25.write().commit()?;
        }
        progress(SyncProgress { done: total, total });
        let new_tree = merkle::tree(new_hashes.iter().map(|(p, h)| (p.as_str(), h.as_str())));
        report.changed_dirs = merkle::changed_dirs(&old_tree, &new_tree);
        report.merkle_root = new_tree.get("").cloned().unwrap_or_default();
        h.store
            .lock()
            .set_meta("merkle_root", &report.merkle_root)?;
        if let Some(r) = &revision {
            h.store.lock().set_meta("revision", r)?;
        }
        report.revision = revision;
        if touched_index {
            self.bump(&h)?;
            self.enqueue(&h);
        }
        report.millis = started.elapsed().as_millis() as u64;
        metrics::counter!("kiln_knowledge_sync_files_changed_total")
            .increment(report.added + report.changed + report.deleted);
        Ok(report)
    }

    /// Applies a file's change to BM25, vectors and the filter metadata.
    fn apply(
        &self,
        h: &Handle,
        removed: &[i64],
        added: &[i64],
        chunks: &[crate::chunk::Chunk],
    ) -> Result<(), Error> {
        {
            let mut bm = h.bm25.write();
            for &r in removed {
                bm.delete(r);
            }
            for (&r, c) in added.iter().zip(chunks) {
                bm.add(r, &c.text, c.symbol.as_deref())?;
            }
        }
        if !removed.is_empty() {
            let mut v = h.vectors.write();
            for &r in removed {
                v.remove(r);
            }
        }
        let mut m = h.meta.write();
        for r in removed {
            m.remove(r);
        }
        for (&r, c) in added.iter().zip(chunks) {
            m.insert(
                r,
                ChunkMeta {
                    path: c.path.clone(),
                    language: c.language,
                    kind: c.kind,
                },
            );
        }
        Ok(())
    }

    fn enqueue(&self, h: &Arc<Handle>) {
        if !h.queued.swap(true, Ordering::SeqCst) {
            if let Some(tx) = self.inner.work.lock().as_ref() {
                let _ = tx.send(h.clone());
            }
        }
    }

    fn embedder(&self, h: &Handle) -> Result<Arc<dyn Embedder>, Error> {
        if let Some(e) = h.embedder.get() {
            return Ok(e.clone());
        }
        let e: Arc<dyn Embedder> = match &h.config.embed {
            EmbedConfig::Local => {
                let mut local = self.inner.local.lock();
                match local.as_ref() {
                    Some(m) => m.clone(),
                    None => {
                        let m = Arc::new(MiniLm::load(&self.inner.models_dir)?);
                        *local = Some(m.clone());
                        m
                    }
                }
            }
            other => Arc::new(HttpEmbedder::new(other.clone())?),
        };
        Ok(h.embedder.get_or_init(|| e).clone())
    }

    fn l2(&self, org: &str) -> Result<Arc<Mutex<EmbeddingCache>>, Error> {
        let mut m = self.inner.l2.lock();
        if let Some(c) = m.get(org) {
            return Ok(c.clone());
        }
        let dir = self.org_dir(org);
        std::fs::create_dir_all(&dir)?;
        let c = Arc::new(Mutex::new(EmbeddingCache::open(
            &dir.join("embeddings.sqlite"),
        )?));
        m.insert(org.to_string(), c.clone());
        Ok(c)
    }

    /// The worker's job: vectors for every chunk without one, from the L2 cache or the model.
    fn embed_pending(&self, h: &Arc<Handle>) -> Result<(), Error> {
        let embedder = self.embedder(h)?;
        // The cache key names the input format too (see `embed::chunk_body`).
        let model = format!("{}#{CHUNK_INPUT_FORMAT}", embedder.model_id());
        let cache = self.l2(&h.org)?;
        *h.embed_error.lock() = None;
        loop {
            if h.removed.load(Ordering::SeqCst) {
                return Ok(());
            }
            let pending = h.store.lock().pending_vectors(256)?;
            if pending.is_empty() {
                break;
            }
            let mut ready: Vec<(i64, Vec<f32>)> = Vec::with_capacity(pending.len());
            let mut misses: Vec<&Pending> = Vec::new();
            {
                let c = cache.lock();
                for p in &pending {
                    match c.get(&model, &p.id, h.seal.as_deref())? {
                        Some(v) => ready.push((p.rowid, v)),
                        None => misses.push(p),
                    }
                }
            }
            let hits = ready.len() as u64;
            h.l2_hits.fetch_add(hits, Ordering::Relaxed);
            h.l2_misses
                .fetch_add(misses.len() as u64, Ordering::Relaxed);
            metrics::counter!("kiln_knowledge_embedding_cache_hits_total").increment(hits);
            metrics::counter!("kiln_knowledge_embedding_cache_misses_total")
                .increment(misses.len() as u64);
            for batch in misses.chunks(EMBED_BATCH) {
                let inputs: Vec<String> = batch
                    .iter()
                    .map(|p| chunk_body(p.symbol.as_deref(), &p.text))
                    .collect();
                let texts: Vec<&str> = inputs.iter().map(String::as_str).collect();
                let vecs = embedder.embed(&texts)?;
                let rows: Vec<(String, Vec<f32>)> = batch
                    .iter()
                    .zip(&vecs)
                    .map(|(p, v)| (p.id.clone(), v.clone()))
                    .collect();
                cache.lock().put(&model, &rows, h.seal.as_deref())?;
                metrics::counter!("kiln_knowledge_chunks_embedded_total")
                    .increment(batch.len() as u64);
                ready.extend(batch.iter().zip(vecs).map(|(p, v)| (p.rowid, v)));
            }
            // A chunk may have been replaced meanwhile: only rows still present get vectors.
            let live: Vec<(i64, Vec<f32>)> = {
                let m = h.meta.read();
                ready
                    .into_iter()
                    .filter(|(id, _)| m.contains_key(id))
                    .collect()
            };
            h.store.lock().set_vectors(&live)?;
            {
                let mut v = h.vectors.write();
                if v.is_empty() && live.first().is_some_and(|x| x.1.len() != v.dim()) {
                    *v = VectorIndex::new(live[0].1.len());
                }
                for (id, vec) in &live {
                    v.upsert(*id, vec);
                }
            }
            // Rows that vanished before their vector arrived would loop forever: stop if the
            // store made no progress.
            if live.is_empty() {
                break;
            }
            self.bump(h)?;
        }
        // A graph is built under a shared lock: searches go on meanwhile.
        if h.vectors.write().prepare_graph() {
            let g = h.vectors.read().build_graph();
            h.vectors.write().install_graph(g);
        }
        // The graph is saved so a restart loads it instead of rebuilding.
        if !h.removed.load(Ordering::SeqCst) {
            h.vectors.read().save(&h.dir.join(GRAPH_FILE))?;
        }
        Ok(())
    }

    /// Waits until every chunk has a vector (or the embedding failed, or the timeout passed).
    pub fn wait_embedded(
        &self,
        org: &str,
        name: &str,
        timeout: Duration,
    ) -> Result<IndexInfo, Error> {
        let h = self.handle(org, name)?;
        let deadline = Instant::now() + timeout;
        loop {
            let info = self.info_of(&h)?;
            if info.embedded >= info.chunks
                && !h.queued.load(Ordering::SeqCst)
                && !h.working.load(Ordering::SeqCst)
            {
                return Ok(info);
            }
            if let Some(e) = h.embed_error.lock().clone() {
                return Err(Error::Embedding(e));
            }
            if Instant::now() > deadline {
                return Ok(info);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Hybrid (or BM25-only / vector-only) search.
    pub fn search(&self, org: &str, name: &str, params: &SearchParams) -> Result<Vec<Hit>, Error> {
        self.search_inner(org, name, params, None)
    }

    /// Search with the query's vector given (computed by the caller, e.g. to time it apart).
    pub fn search_with_vector(
        &self,
        org: &str,
        name: &str,
        params: &SearchParams,
        query_vector: Vec<f32>,
    ) -> Result<Vec<Hit>, Error> {
        self.search_inner(org, name, params, Some(query_vector))
    }

    /// Uses `embedder` for this index from now on (until the engine restarts) instead of its
    /// configured provider: for models plugged in by a library user, and for benchmarks with
    /// synthetic vectors.
    pub fn set_embedder(
        &self,
        org: &str,
        name: &str,
        embedder: Arc<dyn Embedder>,
    ) -> Result<(), Error> {
        let h = self.handle(org, name)?;
        h.embedder
            .set(embedder)
            .map_err(|_| Error::Invalid("the index already has an embedder".into()))
    }

    /// Turns the L1 query cache off or on (benchmarks measure uncached queries).
    pub fn set_query_cache(&self, org: &str, name: &str, on: bool) -> Result<(), Error> {
        let h = self.handle(org, name)?;
        h.l1_off.store(!on, Ordering::SeqCst);
        Ok(())
    }

    fn search_inner(
        &self,
        org: &str,
        name: &str,
        params: &SearchParams,
        query_vector: Option<Vec<f32>>,
    ) -> Result<Vec<Hit>, Error> {
        let h = self.handle(org, name)?;
        if params.query.trim().is_empty() {
            return Err(Error::Invalid("the query is empty".into()));
        }
        if params.k == 0 || params.k > 1000 {
            return Err(Error::Invalid("k must be between 1 and 1000".into()));
        }
        let glob = match &params.path {
            Some(g) => Some(
                globset::Glob::new(g)
                    .map_err(|e| Error::Invalid(format!("path glob `{g}`: {e}")))?
                    .compile_matcher(),
            ),
            None => None,
        };
        let generation = h.generation.load(Ordering::SeqCst);
        let fusion = *self.inner.fusion.read();
        let key = format!("{}\u{0}{fusion:?}", params.cache_key(generation));
        let l1_on = !h.l1_off.load(Ordering::SeqCst);
        if let Some(hits) = l1_on.then(|| h.l1.lock().get(&key)).flatten() {
            h.l1_hits.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("kiln_knowledge_query_cache_hits_total").increment(1);
            return Ok(hits);
        }
        h.l1_misses.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("kiln_knowledge_query_cache_misses_total").increment(1);
        let filtered = params.lang.is_some() || glob.is_some() || params.kind.is_some();
        let meta = h.meta.read();
        let allow = |id: i64| -> bool {
            let Some(m) = meta.get(&id) else { return false };
            params.lang.is_none_or(|l| l == m.language)
                && params.kind.is_none_or(|k| k == m.kind)
                && glob.as_ref().is_none_or(|g| g.is_match(&m.path))
        };
        let n = (params.k * 5).max(50);
        let bm = if params.mode != Mode::Vector {
            let want = if filtered { n * 20 } else { n };
            let raw = h.bm25.read().search(&params.query, want)?;
            raw.into_iter()
                .filter(|(id, _)| allow(*id))
                .take(n)
                .collect()
        } else {
            Vec::new()
        };
        let has_vectors = !h.vectors.read().is_empty();
        let vs = if params.mode != Mode::Bm25 && has_vectors {
            let q = match query_vector {
                Some(v) => v,
                None => self
                    .embedder(&h)?
                    .embed(&[params.query.as_str()])?
                    .remove(0),
            };
            h.vectors.read().search(&q, n, &allow)
        } else {
            Vec::new()
        };
        drop(meta);
        let fused = match params.mode {
            Mode::Bm25 => bm,
            Mode::Vector => vs,
            Mode::Hybrid if vs.is_empty() => bm,
            Mode::Hybrid => fuse(&bm, &vs, fusion),
        };
        let top: Vec<(i64, f32)> = fused.into_iter().take(params.k).collect();
        let ids: Vec<i64> = top.iter().map(|x| x.0).collect();
        let chunks = h.store.lock().chunks(&ids)?;
        let by_id: HashMap<i64, crate::chunk::Chunk> =
            chunks.into_iter().map(|c| (c.rowid, c.chunk)).collect();
        let hits: Vec<Hit> = top
            .into_iter()
            .filter_map(|(id, score)| {
                let c = by_id.get(&id)?;
                Some(Hit {
                    path: c.path.clone(),
                    start_line: c.start_line,
                    end_line: c.end_line,
                    language: c.language,
                    symbol: c.symbol.clone(),
                    kind: c.kind,
                    score,
                    chunk_id: c.id.clone(),
                    text: c.text.clone(),
                })
            })
            .collect();
        if l1_on {
            h.l1.lock().put(generation, key, hits.clone());
        }
        Ok(hits)
    }

    /// The unfused candidates of a query (BM25, vectors; `n` each) and the path of every
    /// chunk row, for the evaluation, which fuses them with many weights.
    pub fn raw_candidates(
        &self,
        org: &str,
        name: &str,
        query: &str,
        n: usize,
    ) -> Result<Candidates, Error> {
        let h = self.handle(org, name)?;
        let bm25 = h.bm25.read().search(query, n)?;
        let q = self.embedder(&h)?.embed(&[query])?;
        let vector = h.vectors.read().search(&q[0], n, &|_| true);
        Ok(Candidates { bm25, vector })
    }

    /// Row id -> path of every chunk of an index.
    pub fn chunk_paths(&self, org: &str, name: &str) -> Result<HashMap<i64, String>, Error> {
        let h = self.handle(org, name)?;
        let m = h.meta.read();
        Ok(m.iter().map(|(id, c)| (*id, c.path.clone())).collect())
    }

    /// The best context for `query` within `tokens`.
    pub fn context(
        &self,
        org: &str,
        name: &str,
        query: &str,
        tokens: usize,
        symbols: bool,
    ) -> Result<Context, Error> {
        if !(64..=1_000_000).contains(&tokens) {
            return Err(Error::Invalid(
                "the token budget must be between 64 and 1000000".into(),
            ));
        }
        let mut p = SearchParams::new(query, 50);
        p.k = 50;
        let hits = self.search(org, name, &p)?;
        Ok(assemble(&hits, tokens, symbols))
    }

    pub fn stats(&self, org: &str, name: &str) -> Result<IndexStats, Error> {
        let h = self.handle(org, name)?;
        let info = self.info_of(&h)?;
        let ann = h.vectors.read().uses_ann();
        let embedding_error = h.embed_error.lock().clone();
        let store = h.store.lock();
        let stats = IndexStats {
            info,
            generation: h.generation.load(Ordering::SeqCst),
            merkle_root: store.meta("merkle_root")?,
            ann,
            query_cache: rate(
                h.l1_hits.load(Ordering::Relaxed),
                h.l1_misses.load(Ordering::Relaxed),
            ),
            embedding_cache: rate(
                h.l2_hits.load(Ordering::Relaxed),
                h.l2_misses.load(Ordering::Relaxed),
            ),
            embedding_error,
            revision: store.meta("revision")?,
            source_error: store.meta("source_error")?.filter(|e| !e.is_empty()),
            redactions: store.redactions()?,
        };
        Ok(stats)
    }

    /// Erases the index and everything derived from its source: chunks, vectors, BM25 files,
    /// the redaction report, and the organisation's cached embeddings that no other index of
    /// it still uses.
    pub fn remove(&self, org: &str, name: &str) -> Result<(), Error> {
        let h = self.handle(org, name)?;
        let _guard = h.sync_lock.lock();
        h.removed.store(true, Ordering::SeqCst);
        let mine: HashSet<String> = h
            .store
            .lock()
            .all_chunks()?
            .into_iter()
            .map(|c| c.chunk.id)
            .collect();
        self.inner
            .handles
            .lock()
            .remove(&(org.to_string(), name.to_string()));
        let mut others: HashSet<String> = HashSet::new();
        for other in self.names(org) {
            if other == name {
                continue;
            }
            let oh = self.handle(org, &other)?;
            let chunks = oh.store.lock().all_chunks()?;
            others.extend(chunks.into_iter().map(|c| c.chunk.id));
        }
        let drop_hashes: Vec<String> = mine.difference(&others).cloned().collect();
        self.l2(org)?.lock().remove(&drop_hashes)?;
        let dir = h.dir.clone();
        drop(_guard);
        drop(h);
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    /// Keeps the index current: a sync every `interval` until `stop` returns true.
    pub fn watch(
        &self,
        org: &str,
        name: &str,
        interval: Duration,
        stop: &dyn Fn() -> bool,
        on_sync: &dyn Fn(&SyncReport),
    ) -> Result<(), Error> {
        while !stop() {
            let r = self.sync(org, name, &|_| {})?;
            if r.added + r.changed + r.deleted > 0 {
                on_sync(&r);
            }
            std::thread::sleep(interval);
        }
        Ok(())
    }
}
