//! Kiln's knowledge engine: walks a source (gitignore + `.kilnignore`), redacts secrets,
//! chunks code with tree-sitter, embeds chunks (all-MiniLM-L6-v2 with candle, or Ollama /
//! OpenAI-compatible endpoints), and answers hybrid (BM25 + vector) searches and context
//! requests per organisation, with an in-memory query cache and an on-disk embedding cache.
//! Sources are host directories, git URLs and sandbox workspaces (`source`, `git`); an index
//! may be encrypted at rest with its organisation's key (`seal`).

pub mod bm25;
pub mod chunk;
pub mod context;
pub mod embed;
pub mod engine;
pub mod eval;
pub mod git;
pub mod hnsw;
pub mod ivf;
pub mod lang;
pub mod merkle;
pub mod redact;
pub mod seal;
pub mod search;
pub mod source;
pub mod store;
pub mod vector;
pub mod walk;

pub use chunk::{Chunk, SymbolKind};
pub use embed::{EmbedConfig, Embedder};
pub use engine::{CreateOptions, Engine, IndexInfo, IndexStats, SyncReport};
pub use lang::Language;
pub use search::{Hit, SearchParams};
pub use source::{Source, Tree};

/// Errors of the knowledge engine. `NotFound` covers another organisation's index too.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("index `{0}` not found")]
    NotFound(String),
    #[error("index `{0}` already exists")]
    Exists(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The caller may not use this source (a host path, SSH or a private address for a tenant).
    #[error("{0}")]
    Forbidden(String),
    #[error("source unreadable: {0}")]
    Source(String),
    #[error("embedding model files missing: {0} (run scripts/install-knowledge-data.sh, or set KILN_MODEL_DIR)")]
    ModelMissing(String),
    #[error("embedding failed: {0}")]
    Embedding(String),
    #[error("storage: {0}")]
    Storage(String),
    #[error("search index: {0}")]
    Search(String),
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        Error::Storage(e.to_string())
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Storage(e.to_string())
    }
}

impl From<tantivy::TantivyError> for Error {
    fn from(e: tantivy::TantivyError) -> Self {
        Error::Search(e.to_string())
    }
}
