//! An inverted-file index (IVF: spherical k-means lists, the nearest `nprobe` lists scanned),
//! kept as the alternative that `kiln bench knowledge` measures against HNSW in the same run.
//! It builds fast, but on wide clusters its recall grows only linearly with the lists probed.

use crate::vector::{dot, TopK};

/// The lists over the slots of a flat vector array.
pub struct Ivf {
    dim: usize,
    nlist: usize,
    centroids: Vec<f32>,
    lists: Vec<Vec<u32>>,
}

impl Ivf {
    /// Trains on a sample and assigns every vector of `data` (slot-major, `dim` floats each).
    pub fn build(data: &[f32], dim: usize) -> Ivf {
        let n = data.len() / dim.max(1);
        let (nlist, centroids, lists) = train(data, dim, n);
        Ivf {
            dim,
            nlist,
            centroids,
            lists,
        }
    }

    /// The best `k` slots for `q`, probing `nprobe` lists; `(slot, score)`.
    pub fn search(&self, data: &[f32], q: &[f32], k: usize, nprobe: usize) -> Vec<(i64, f32)> {
        let dim = self.dim;
        let mut cs: Vec<(f32, usize)> = (0..self.nlist)
            .map(|l| (dot(q, &self.centroids[l * dim..(l + 1) * dim]), l))
            .collect();
        let np = nprobe.clamp(1, self.nlist);
        cs.select_nth_unstable_by(np - 1, |a, b| b.0.total_cmp(&a.0));
        let mut top = TopK::new(k);
        for &(_, l) in &cs[..np] {
            for &s in &self.lists[l] {
                let s = s as usize;
                top.push(dot(q, &data[s * dim..(s + 1) * dim]), s as i64);
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
fn train(data: &[f32], dim: usize, n: usize) -> (usize, Vec<f32>, Vec<Vec<u32>>) {
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
    (nlist, centroids, lists)
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
