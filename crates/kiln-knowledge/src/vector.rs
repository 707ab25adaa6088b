//! Vector search over unit vectors (inner product = cosine): an exact scan below a size
//! threshold, an HNSW graph (`hnsw`) above it, persisted next to the index so a restart loads
//! it instead of rebuilding. HNSW was chosen over the inverted-file index (`ivf`, kept for the
//! comparison) because `kiln bench knowledge` measured it, in the same run at 1M x 384, at the
//! recall target within the latency target where IVF was not (README, knowledge section).

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::hnsw::{Hnsw, HnswParams, Vectors};

/// Below this many vectors search is exact.
pub const DEFAULT_EXACT_THRESHOLD: usize = 50_000;
/// Beam width of an HNSW query (at least the number of results asked for). `kiln bench
/// knowledge` at 1M x 384 (M 16, ef_construction 100): recall@10 0.777 at 128, 0.902 at 256,
/// 0.951 at 384 (p99 2.8 ms), 0.961 at 512; 384 is the smallest width that meets 0.95.
pub const DEFAULT_EF_SEARCH: usize = 384;
/// The file of the persisted graph in an index's directory.
pub const GRAPH_FILE: &str = "vectors.hnsw";

/// A removed slot (HNSW keeps removed nodes as waypoints until the next rebuild).
const DEAD: i64 = i64::MIN;

/// Dot product: AVX2+FMA when the CPU has them (checked once at run time), else a portable
/// loop with independent accumulators that the compiler vectorises.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above).
            return unsafe { dot_avx2(a, b) };
        }
    }
    dot_portable(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    // SAFETY (all loads): `i + 8 * j + 8 <= n` bounds every unaligned 8-float load.
    unsafe {
        while i + 32 <= n {
            for (j, a) in acc.iter_mut().enumerate() {
                let x = _mm256_loadu_ps(pa.add(i + 8 * j));
                let y = _mm256_loadu_ps(pb.add(i + 8 * j));
                *a = _mm256_fmadd_ps(x, y, *a);
            }
            i += 32;
        }
        while i + 8 <= n {
            let x = _mm256_loadu_ps(pa.add(i));
            let y = _mm256_loadu_ps(pb.add(i));
            acc[0] = _mm256_fmadd_ps(x, y, acc[0]);
            i += 8;
        }
    }
    let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let mut lanes = [0f32; 8];
    // SAFETY: `lanes` holds exactly 8 floats.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), s) };
    let mut total: f32 = lanes.iter().sum();
    for k in i..n {
        total += a[k] * b[k];
    }
    total
}

#[inline]
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let ra = ca.remainder();
    let rb = cb.remainder();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// Keeps the best `k` (score, id) pairs.
pub(crate) struct TopK {
    k: usize,
    items: Vec<(f32, i64)>,
    min: f32,
}

impl TopK {
    pub(crate) fn new(k: usize) -> TopK {
        TopK {
            k,
            items: Vec::with_capacity(k + 1),
            min: f32::NEG_INFINITY,
        }
    }
    #[inline]
    pub(crate) fn push(&mut self, score: f32, id: i64) {
        if self.k == 0 {
            return;
        }
        if self.items.len() < self.k {
            self.items.push((score, id));
            if self.items.len() == self.k {
                self.min = self.items.iter().map(|x| x.0).fold(f32::INFINITY, f32::min);
            }
        } else if score > self.min {
            let (pos, _) = self
                .items
                .iter()
                .enumerate()
                .min_by(|a, b| a.1 .0.total_cmp(&b.1 .0))
                .unwrap_or((0, &(0.0, 0)));
            self.items[pos] = (score, id);
            self.min = self.items.iter().map(|x| x.0).fold(f32::INFINITY, f32::min);
        }
    }
    pub(crate) fn into_sorted(mut self) -> Vec<(i64, f32)> {
        self.items.sort_by(|a, b| b.0.total_cmp(&a.0));
        self.items.into_iter().map(|(s, id)| (id, s)).collect()
    }
}

/// An in-memory vector index keyed by chunk row id.
pub struct VectorIndex {
    dim: usize,
    /// Slot -> row id (`DEAD` for a removed slot while a graph exists).
    ids: Vec<i64>,
    data: Vec<f32>,
    slot: HashMap<i64, usize>,
    dead: usize,
    hnsw: Option<Hnsw>,
    /// The graph changed since it was saved or loaded.
    dirty: AtomicBool,
    pub exact_threshold: usize,
    pub ef_search: usize,
    pub params: HnswParams,
}

fn threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(8)
}

impl VectorIndex {
    pub fn new(dim: usize) -> VectorIndex {
        VectorIndex {
            dim,
            ids: Vec::new(),
            data: Vec::new(),
            slot: HashMap::new(),
            dead: 0,
            hnsw: None,
            dirty: AtomicBool::new(false),
            exact_threshold: DEFAULT_EXACT_THRESHOLD,
            ef_search: DEFAULT_EF_SEARCH,
            params: HnswParams::default(),
        }
    }

    /// The index of `stored` vectors, reusing the graph saved at `graph` when there is one
    /// (slots of rows gone since become waypoints, rows added since are inserted). It builds
    /// no graph: when `needs_graph` says so, the caller has one built in the background.
    pub fn open(dim: usize, stored: Vec<(i64, Vec<f32>)>, graph: Option<&Path>) -> VectorIndex {
        let mut ix = VectorIndex::new(dim);
        let saved = graph.and_then(|p| match Hnsw::load(p) {
                Ok(x) => Some(x),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => {
                    tracing::warn!(path = %p.display(), error = %e, "vector graph unreadable; rebuilding");
                    None
                }
            });
        let Some((g, slot_ids)) = saved else {
            for (id, v) in &stored {
                ix.upsert(*id, v);
            }
            return ix;
        };
        let mut by_id: HashMap<i64, Vec<f32>> = stored.into_iter().collect();
        ix.data.reserve(slot_ids.len() * dim);
        for &id in &slot_ids {
            match by_id.remove(&id).filter(|v| v.len() == dim) {
                Some(v) if id != DEAD => {
                    ix.slot.insert(id, ix.ids.len());
                    ix.ids.push(id);
                    ix.data.extend_from_slice(&v);
                }
                _ => {
                    ix.ids.push(DEAD);
                    ix.dead += 1;
                    ix.data.extend(std::iter::repeat_n(0f32, dim));
                }
            }
        }
        ix.hnsw = Some(g);
        let mut rest: Vec<(i64, Vec<f32>)> = by_id.into_iter().collect();
        rest.sort_by_key(|x| x.0);
        for (id, v) in rest {
            ix.upsert(id, &v);
        }
        ix
    }

    /// True when a graph should be built (or rebuilt, or dropped): see `prepare_graph`.
    pub fn needs_graph(&self) -> bool {
        let live = self.len();
        if live < self.exact_threshold {
            return self.hnsw.is_some();
        }
        self.hnsw.is_none() || self.dead * 4 > self.ids.len()
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Live vectors.
    pub fn len(&self) -> usize {
        self.slot.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slot.is_empty()
    }

    pub fn uses_ann(&self) -> bool {
        self.hnsw.is_some()
    }

    fn vectors(&self) -> Vectors<'_> {
        Vectors {
            data: &self.data,
            dim: self.dim,
        }
    }

    /// Adds or replaces a vector.
    pub fn upsert(&mut self, id: i64, v: &[f32]) {
        if v.len() != self.dim || id == DEAD {
            return;
        }
        if self.slot.contains_key(&id) {
            self.remove(id);
        }
        let s = self.ids.len();
        self.ids.push(id);
        self.data.extend_from_slice(v);
        self.slot.insert(id, s);
        if let Some(mut g) = self.hnsw.take() {
            g.insert(&self.vectors());
            self.hnsw = Some(g);
            self.dirty.store(true, Ordering::Relaxed);
        }
    }

    pub fn remove(&mut self, id: i64) {
        let Some(s) = self.slot.remove(&id) else {
            return;
        };
        if self.hnsw.is_some() {
            self.ids[s] = DEAD;
            self.dead += 1;
            self.dirty.store(true, Ordering::Relaxed);
            return;
        }
        let last = self.ids.len() - 1;
        self.ids.swap_remove(s);
        if s != last {
            let (head, tail) = self.data.split_at_mut(last * self.dim);
            head[s * self.dim..(s + 1) * self.dim].copy_from_slice(&tail[..self.dim]);
            self.slot.insert(self.ids[s], s);
        }
        self.data.truncate(last * self.dim);
    }

    /// Drops removed slots (the graph, if any, is rebuilt by the caller).
    fn compact(&mut self) {
        if self.dead == 0 {
            return;
        }
        let mut ids = Vec::with_capacity(self.slot.len());
        let mut data = Vec::with_capacity(self.slot.len() * self.dim);
        for (s, &id) in self.ids.iter().enumerate() {
            if id != DEAD {
                ids.push(id);
                data.extend_from_slice(&self.data[s * self.dim..(s + 1) * self.dim]);
            }
        }
        self.slot = ids.iter().enumerate().map(|(s, &id)| (id, s)).collect();
        self.ids = ids;
        self.data = data;
        self.dead = 0;
    }

    /// Builds the graph when the index crosses the threshold, rebuilds it when a quarter of its
    /// nodes were removed, drops it below the threshold.
    pub fn maintain(&mut self) {
        if self.prepare_graph() {
            let g = self.build_graph();
            self.install_graph(g);
        }
    }

    /// The cheap part of `maintain` (drops the graph below the threshold, compacts before a
    /// rebuild); true when a graph must be built. The engine then builds it under a shared
    /// borrow (`build_graph`), so searches go on meanwhile, and installs it.
    pub fn prepare_graph(&mut self) -> bool {
        let live = self.len();
        if live < self.exact_threshold {
            if self.hnsw.take().is_some() {
                self.dirty.store(true, Ordering::Relaxed);
            }
            self.compact();
            return false;
        }
        if self.hnsw.is_some() && self.dead * 4 <= self.ids.len() {
            return false;
        }
        self.compact();
        true
    }

    /// A graph over the current slots.
    pub fn build_graph(&self) -> Hnsw {
        Hnsw::build(&self.vectors(), self.params, threads())
    }

    /// Installs a graph built by `build_graph`, adding slots appended since.
    pub fn install_graph(&mut self, mut g: Hnsw) {
        if g.len() > self.ids.len() {
            return;
        }
        while g.len() < self.ids.len() {
            g.insert(&self.vectors());
        }
        self.hnsw = Some(g);
        self.dirty.store(true, Ordering::Relaxed);
    }

    /// Saves the graph to `path` if it changed since it was saved or loaded (removes the file
    /// when there is no graph). Needs only a shared borrow, so searches go on meanwhile.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        if !self.dirty.swap(false, Ordering::Relaxed) {
            return Ok(());
        }
        let r = match &self.hnsw {
            Some(g) => g.save(path, &self.ids),
            None => match std::fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
        };
        if r.is_err() {
            self.dirty.store(true, Ordering::Relaxed);
        }
        r
    }

    fn vec(&self, s: usize) -> &[f32] {
        &self.data[s * self.dim..(s + 1) * self.dim]
    }

    /// The best `k` ids by inner product, among those `allow` accepts.
    pub fn search(&self, q: &[f32], k: usize, allow: &dyn Fn(i64) -> bool) -> Vec<(i64, f32)> {
        self.search_ef(q, k, self.ef_search, allow)
    }

    /// Search with an explicit beam width (the benchmark sweeps it). A filter that leaves
    /// fewer than `k` of the beam widens it, then falls back to the exact scan.
    pub fn search_ef(
        &self,
        q: &[f32],
        k: usize,
        ef: usize,
        allow: &dyn Fn(i64) -> bool,
    ) -> Vec<(i64, f32)> {
        let Some(g) = &self.hnsw else {
            return self.search_exact(q, k, allow);
        };
        if q.len() != self.dim {
            return Vec::new();
        }
        let mut ef = ef.max(k);
        for _ in 0..2 {
            let found = g.search(&self.vectors(), q, ef);
            let out: Vec<(i64, f32)> = found
                .into_iter()
                .filter_map(|(s, slot)| {
                    let id = self.ids[slot as usize];
                    (id != DEAD && allow(id)).then_some((id, s))
                })
                .take(k)
                .collect();
            if out.len() >= k.min(self.len()) {
                return out;
            }
            ef *= 4;
        }
        self.search_exact(q, k, allow)
    }

    pub fn search_exact(
        &self,
        q: &[f32],
        k: usize,
        allow: &dyn Fn(i64) -> bool,
    ) -> Vec<(i64, f32)> {
        let mut top = TopK::new(k);
        if q.len() != self.dim {
            return Vec::new();
        }
        for (s, &id) in self.ids.iter().enumerate() {
            if id != DEAD && allow(id) {
                top.push(dot(q, self.vec(s)), id);
            }
        }
        top.into_sorted()
    }

    /// The raw vectors by slot and their ids, for building other indexes over them (the
    /// benchmark's IVF comparison).
    pub fn raw(&self) -> (&[f32], &[i64]) {
        (&self.data, &self.ids)
    }
}
