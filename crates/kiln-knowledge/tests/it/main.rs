//! Integration tests of kiln-knowledge: chunk boundaries per language (snapshots), redaction,
//! the embedding model against its reference, HTTP embedding providers, sync, search, caches,
//! isolation and erasure.

// Tests may unwrap: a failure is the test failing.
#![allow(clippy::unwrap_used)]

mod chunking;
mod embedding;
mod engine;
mod eval;
mod redaction;
mod sources;
mod util;
mod vector;
