//! Search parameters, hits, score fusion and the L1 query cache.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::chunk::SymbolKind;
use crate::lang::Language;

/// Which retrievers a search uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Hybrid,
    Bm25,
    Vector,
}

/// How two ranked lists are fused.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Fusion {
    /// `w * cosine + (1 - w) * bm25 / max bm25` over the union of both candidate lists.
    Weighted { vector_weight: f32 },
    /// `w * minmax(cosine) + (1 - w) * minmax(bm25)`, each min-max normalised over its own
    /// candidate list (a row missing from a list scores 0 there).
    MinMax { vector_weight: f32 },
    /// Reciprocal rank fusion, `1 / (k + rank)` summed (unweighted; kept as the baseline).
    Rrf { k: f32 },
    /// `w * z(cosine) + (1 - w) * z(bm25)`, each list standardised by its own mean and
    /// standard deviation, so a top score far above the rest of its list counts more than one
    /// barely ahead (min-max maps both to 1). A row missing from a list gets that list's
    /// lowest z-score.
    ZScore { vector_weight: f32 },
}

/// The fusion's vector weight, tuned on HumanEval-Rust (z-score and min-max fusions, weight
/// swept 0.5-1.0 by `kiln bench knowledge`): z-score at 0.8 had the best Rust R@1 and MRR@10,
/// and was then measured on HumanEval Python, which played no part in the choice (README).
pub const DEFAULT_VECTOR_WEIGHT: f32 = 0.8;

impl Default for Fusion {
    fn default() -> Self {
        Fusion::ZScore {
            vector_weight: DEFAULT_VECTOR_WEIGHT,
        }
    }
}

/// A search request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SearchParams {
    pub query: String,
    #[serde(default = "default_k")]
    pub k: usize,
    #[serde(default)]
    pub lang: Option<Language>,
    /// A glob over the path relative to the source root (`src/**/*.rs`).
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub kind: Option<SymbolKind>,
    #[serde(default)]
    pub mode: Mode,
}

fn default_k() -> usize {
    10
}

impl SearchParams {
    pub fn new(query: &str, k: usize) -> SearchParams {
        SearchParams {
            query: query.to_string(),
            k,
            lang: None,
            path: None,
            kind: None,
            mode: Mode::Hybrid,
        }
    }

    /// The L1 key: normalised query text and every parameter.
    pub fn cache_key(&self, generation: u64) -> String {
        let q = self
            .query
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .to_lowercase();
        format!(
            "{generation}\u{0}{q}\u{0}{}\u{0}{:?}\u{0}{:?}\u{0}{:?}\u{0}{:?}",
            self.k, self.lang, self.path, self.kind, self.mode
        )
    }
}

/// One result.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Hit {
    pub path: String,
    pub start_line: u32,
    pub end_line: u32,
    pub language: Language,
    pub symbol: Option<String>,
    pub kind: SymbolKind,
    pub score: f32,
    pub chunk_id: String,
    pub text: String,
}

/// Fuses BM25 and vector candidates into one ranking of row ids.
pub fn fuse(bm25: &[(i64, f32)], vec: &[(i64, f32)], fusion: Fusion) -> Vec<(i64, f32)> {
    let mut score: HashMap<i64, f32> = HashMap::new();
    match fusion {
        Fusion::Weighted { vector_weight } => {
            let bmax = bm25.iter().map(|x| x.1).fold(0f32, f32::max);
            for &(id, s) in bm25 {
                if bmax > 0.0 {
                    *score.entry(id).or_default() += (1.0 - vector_weight) * s / bmax;
                }
            }
            for &(id, s) in vec {
                *score.entry(id).or_default() += vector_weight * s.max(0.0);
            }
        }
        Fusion::MinMax { vector_weight } => {
            let norm = |xs: &[(i64, f32)]| -> Vec<(i64, f32)> {
                let hi = xs.iter().map(|x| x.1).fold(f32::NEG_INFINITY, f32::max);
                let lo = xs.iter().map(|x| x.1).fold(f32::INFINITY, f32::min);
                let span = (hi - lo).max(1e-6);
                xs.iter().map(|&(id, s)| (id, (s - lo) / span)).collect()
            };
            for (id, s) in norm(bm25) {
                *score.entry(id).or_default() += (1.0 - vector_weight) * s;
            }
            for (id, s) in norm(vec) {
                *score.entry(id).or_default() += vector_weight * s;
            }
        }
        Fusion::ZScore { vector_weight } => {
            let z = |xs: &[(i64, f32)]| -> (Vec<(i64, f32)>, f32) {
                let n = xs.len().max(1) as f32;
                let mean = xs.iter().map(|x| x.1).sum::<f32>() / n;
                let var = xs.iter().map(|x| (x.1 - mean).powi(2)).sum::<f32>() / n;
                let sd = var.sqrt().max(1e-6);
                let out: Vec<(i64, f32)> =
                    xs.iter().map(|&(id, s)| (id, (s - mean) / sd)).collect();
                let floor = out.iter().map(|x| x.1).fold(0f32, f32::min);
                (out, floor)
            };
            let (zb, fb) = z(bm25);
            let (zv, fv) = z(vec);
            let zb: HashMap<i64, f32> = zb.into_iter().collect();
            let zv: HashMap<i64, f32> = zv.into_iter().collect();
            for id in zb.keys().chain(zv.keys()) {
                let b = zb.get(id).copied().unwrap_or(fb);
                let v = zv.get(id).copied().unwrap_or(fv);
                score.insert(*id, vector_weight * v + (1.0 - vector_weight) * b);
            }
        }
        Fusion::Rrf { k } => {
            for (r, &(id, _)) in bm25.iter().enumerate() {
                *score.entry(id).or_default() += 1.0 / (k + r as f32 + 1.0);
            }
            for (r, &(id, _)) in vec.iter().enumerate() {
                *score.entry(id).or_default() += 1.0 / (k + r as f32 + 1.0);
            }
        }
    }
    let mut out: Vec<(i64, f32)> = score.into_iter().collect();
    out.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    out
}

/// The L1 cache: query results by key, bounded; keys carry the index generation, so any change
/// to the index makes old entries unreachable (and they are dropped on the next insert).
pub struct QueryCache {
    cap: usize,
    generation: u64,
    map: HashMap<String, Vec<Hit>>,
}

impl QueryCache {
    pub fn new(cap: usize) -> QueryCache {
        QueryCache {
            cap,
            generation: 0,
            map: HashMap::new(),
        }
    }

    pub fn get(&self, key: &str) -> Option<Vec<Hit>> {
        self.map.get(key).cloned()
    }

    pub fn put(&mut self, generation: u64, key: String, hits: Vec<Hit>) {
        if generation != self.generation || self.map.len() >= self.cap {
            self.map.clear();
            self.generation = generation;
        }
        self.map.insert(key, hits);
    }

    pub fn clear(&mut self) {
        self.map.clear();
    }
}
