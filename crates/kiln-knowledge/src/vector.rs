//! Vector search over unit vectors (inner product = cosine): exact below a size threshold, an
//! inverted-file index (IVF: k-means lists, probing the nearest `nprobe` lists) above it.
//! IVF was chosen over HNSW because it builds in seconds at 1M vectors on two cores, updates in
//! place (a new vector joins its nearest list), and its scan is a contiguous dot-product loop;
//! `kiln bench knowledge` measures its recall@10 against exact search.

use std::collections::HashMap;

/// Below this many vectors search is exact.
pub const DEFAULT_EXACT_THRESHOLD: usize = 50_000;

/// Dot product with independent accumulators so the compiler vectorises it.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
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
struct TopK {
    k: usize,
    items: Vec<(f32, i64)>,
    min: f32,
}

impl TopK {
    fn new(k: usize) -> TopK {
        TopK {
            k,
            items: Vec::with_capacity(k + 1),
            min: f32::NEG_INFINITY,
        }
    }
    #[inline]
    fn push(&mut self, score: f32, id: i64) {
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
    fn into_sorted(mut self) -> Vec<(i64, f32)> {
        self.items.sort_by(|a, b| b.0.total_cmp(&a.0));
        self.items.into_iter().map(|(s, id)| (id, s)).collect()
    }
}

struct Ivf {
    nlist: usize,
    centroids: Vec<f32>,
    /// Per list: the slots of its vectors.
    lists: Vec<Vec<u32>>,
    /// Per slot: its list.
    assign: Vec<u32>,
    /// How many vectors there were when it was trained (retrained when the count doubles).
    trained_for: usize,
}

/// An in-memory vector index keyed by chunk row id.
pub struct VectorIndex {
    dim: usize,
    ids: Vec<i64>,
    data: Vec<f32>,
    slot: HashMap<i64, usize>,
    ivf: Option<Ivf>,
    pub exact_threshold: usize,
    /// Lists probed per query, as a share of all lists (at least 1).
    pub nprobe: usize,
}

impl VectorIndex {
    pub fn new(dim: usize) -> VectorIndex {
        VectorIndex {
            dim,
            ids: Vec::new(),
            data: Vec::new(),
            slot: HashMap::new(),
            ivf: None,
            exact_threshold: DEFAULT_EXACT_THRESHOLD,
            nprobe: 24,
        }
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub fn uses_ann(&self) -> bool {
        self.ivf.is_some()
    }

    /// Adds or replaces a vector.
    pub fn upsert(&mut self, id: i64, v: &[f32]) {
        if v.len() != self.dim {
            return;
        }
        if self.slot.contains_key(&id) {
            self.remove(id);
        }
        let s = self.ids.len();
        self.ids.push(id);
        self.data.extend_from_slice(v);
        self.slot.insert(id, s);
        if let Some(ivf) = &mut self.ivf {
            let l = nearest(&ivf.centroids, self.dim, v);
            ivf.lists[l].push(s as u32);
            ivf.assign.push(l as u32);
        }
    }

    pub fn remove(&mut self, id: i64) {
        let Some(s) = self.slot.remove(&id) else {
            return;
        };
        let last = self.ids.len() - 1;
        if let Some(ivf) = &mut self.ivf {
            let l = ivf.assign[s] as usize;
            ivf.lists[l].retain(|&x| x as usize != s);
            if s != last {
                let ll = ivf.assign[last] as usize;
                for x in ivf.lists[ll].iter_mut() {
                    if *x as usize == last {
                        *x = s as u32;
                    }
                }
                ivf.assign[s] = ivf.assign[last];
            }
            ivf.assign.pop();
        }
        self.ids.swap_remove(s);
        if s != last {
            let (head, tail) = self.data.split_at_mut(last * self.dim);
            head[s * self.dim..(s + 1) * self.dim].copy_from_slice(&tail[..self.dim]);
            self.slot.insert(self.ids[s], s);
        }
        self.data.truncate(last * self.dim);
    }

    /// (Re)builds the IVF when the index is above the threshold and has grown since.
    pub fn maintain(&mut self) {
        let n = self.len();
        if n < self.exact_threshold {
            self.ivf = None;
            return;
        }
        if self.ivf.as_ref().is_some_and(|i| n < i.trained_for * 2) {
            return;
        }
        self.ivf = Some(train(&self.data, self.dim, n));
    }

    fn vec(&self, s: usize) -> &[f32] {
        &self.data[s * self.dim..(s + 1) * self.dim]
    }

    /// The best `k` ids by inner product, among those `allow` accepts.
    pub fn search(&self, q: &[f32], k: usize, allow: &dyn Fn(i64) -> bool) -> Vec<(i64, f32)> {
        match &self.ivf {
            Some(ivf) => self.search_ivf(ivf, q, k, self.nprobe, allow),
            None => self.search_exact(q, k, allow),
        }
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
            if allow(id) {
                top.push(dot(q, self.vec(s)), id);
            }
        }
        top.into_sorted()
    }

    /// IVF search with an explicit `nprobe` (the benchmark sweeps it).
    pub fn search_with_nprobe(&self, q: &[f32], k: usize, nprobe: usize) -> Vec<(i64, f32)> {
        match &self.ivf {
            Some(ivf) => self.search_ivf(ivf, q, k, nprobe, &|_| true),
            None => self.search_exact(q, k, &|_| true),
        }
    }

    fn search_ivf(
        &self,
        ivf: &Ivf,
        q: &[f32],
        k: usize,
        nprobe: usize,
        allow: &dyn Fn(i64) -> bool,
    ) -> Vec<(i64, f32)> {
        if q.len() != self.dim {
            return Vec::new();
        }
        let mut cs: Vec<(f32, usize)> = (0..ivf.nlist)
            .map(|l| (dot(q, &ivf.centroids[l * self.dim..(l + 1) * self.dim]), l))
            .collect();
        let np = nprobe.clamp(1, ivf.nlist);
        cs.select_nth_unstable_by(np - 1, |a, b| b.0.total_cmp(&a.0));
        let mut top = TopK::new(k);
        for &(_, l) in &cs[..np] {
            for &s in &ivf.lists[l] {
                let id = self.ids[s as usize];
                if allow(id) {
                    top.push(dot(q, self.vec(s as usize)), id);
                }
            }
        }
        top.into_sorted()
    }
}

fn nearest(centroids: &[f32], dim: usize, v: &[f32]) -> usize {
    let mut best = (f32::NEG_INFINITY, 0);
    for (l, c) in centroids.chunks_exact(dim).enumerate() {
        let d = dot(v, c);
        if d > best.0 {
            best = (d, l);
        }
    }
    best.1
}

/// Spherical k-means on a sample, then every vector assigned to its nearest centroid (found
/// through a coarse level of centroid groups, so assignment costs ~2*sqrt(nlist) dot products).
fn train(data: &[f32], dim: usize, n: usize) -> Ivf {
    use rand::{seq::index::sample, SeedableRng};
    let nlist = ((n as f64).sqrt() as usize).clamp(16, 1024);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let sample_n = n.min(nlist * 32);
    let idx = sample(&mut rng, n, sample_n).into_vec();
    let sample_vecs: Vec<&[f32]> = idx.iter().map(|&i| &data[i * dim..(i + 1) * dim]).collect();
    let mut centroids: Vec<f32> = sample_vecs[..nlist]
        .iter()
        .flat_map(|v| v.iter().copied())
        .collect();
    for _ in 0..6 {
        let assign = par_map(&sample_vecs, |v| nearest(&centroids, dim, v));
        let mut sums = vec![0f32; nlist * dim];
        let mut counts = vec![0usize; nlist];
        for (v, &l) in sample_vecs.iter().zip(&assign) {
            counts[l] += 1;
            for (s, x) in sums[l * dim..(l + 1) * dim].iter_mut().zip(v.iter()) {
                *s += x;
            }
        }
        for l in 0..nlist {
            let c = &mut sums[l * dim..(l + 1) * dim];
            if counts[l] == 0 {
                c.copy_from_slice(&centroids[l * dim..(l + 1) * dim]);
            }
            crate::embed::l2_normalise(c);
        }
        centroids = sums;
    }
    // Coarse groups of centroids for fast assignment.
    let ngroups = ((nlist as f64).sqrt() as usize).max(1);
    let gcent: Vec<f32> = centroids[..ngroups * dim].to_vec();
    let mut groups: Vec<Vec<usize>> = vec![Vec::new(); ngroups];
    for l in 0..nlist {
        groups[nearest(&gcent, dim, &centroids[l * dim..(l + 1) * dim])].push(l);
    }
    let all: Vec<&[f32]> = data.chunks_exact(dim).take(n).collect();
    let assign: Vec<u32> = par_map(&all, |v| {
        // The two best groups, then the best centroid in them.
        let mut gs: Vec<(f32, usize)> = gcent
            .chunks_exact(dim)
            .enumerate()
            .map(|(g, c)| (dot(v, c), g))
            .collect();
        gs.sort_by(|a, b| b.0.total_cmp(&a.0));
        let mut best = (f32::NEG_INFINITY, 0);
        for &(_, g) in gs.iter().take(2) {
            for &l in &groups[g] {
                let d = dot(v, &centroids[l * dim..(l + 1) * dim]);
                if d > best.0 {
                    best = (d, l);
                }
            }
        }
        best.1 as u32
    });
    let mut lists = vec![Vec::new(); nlist];
    for (s, &l) in assign.iter().enumerate() {
        lists[l as usize].push(s as u32);
    }
    Ivf {
        nlist,
        centroids,
        lists,
        assign,
        trained_for: n,
    }
}

/// Maps over a slice on all cores with scoped threads.
fn par_map<T: Sync, R: Send + Default + Clone>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(8);
    let per = items.len().div_ceil(threads).max(1);
    let mut out = vec![R::default(); items.len()];
    std::thread::scope(|s| {
        for (src, dst) in items.chunks(per).zip(out.chunks_mut(per)) {
            let f = &f;
            s.spawn(move || {
                for (x, y) in src.iter().zip(dst.iter_mut()) {
                    *y = f(x);
                }
            });
        }
    });
    out
}
