//! A compact HNSW graph (hierarchical navigable small world, Malkov & Yashunin) over the slots
//! of a `VectorIndex`: inner product on unit vectors, neighbour selection by the paper's
//! heuristic, a batch-parallel build without locks (each batch searches the graph as it was,
//! then links are written, reverse links partitioned by target node across threads), single
//! inserts for later additions, and a binary file format so a restart loads the graph instead
//! of rebuilding it.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};
use std::io::{Read, Write};
use std::path::Path;

use parking_lot::Mutex;
use rand::{Rng, SeedableRng};

use crate::vector::dot;

const EMPTY: u32 = u32::MAX;
const MAGIC: &[u8; 8] = b"KILNHNS1";

/// Graph parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HnswParams {
    /// Links per node on the upper layers (layer 0 has twice as many).
    pub m: usize,
    /// Beam width while building.
    pub ef_construction: usize,
}

impl Default for HnswParams {
    fn default() -> Self {
        HnswParams {
            m: 16,
            ef_construction: 100,
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
struct Scored(f32, u32);
impl Eq for Scored {}
impl PartialOrd for Scored {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Scored {
    fn cmp(&self, o: &Self) -> Ordering {
        self.0.total_cmp(&o.0).then(o.1.cmp(&self.1))
    }
}

/// Visited marks reused across searches (an epoch per search instead of clearing).
struct Visited {
    marks: Vec<u32>,
    epoch: u32,
}

impl Visited {
    fn new(n: usize) -> Visited {
        Visited {
            marks: vec![0; n],
            epoch: 0,
        }
    }
    fn reset(&mut self, n: usize) {
        if self.marks.len() < n {
            self.marks.resize(n, 0);
        }
        self.epoch = self.epoch.wrapping_add(1);
        if self.epoch == 0 {
            self.marks.iter_mut().for_each(|m| *m = 0);
            self.epoch = 1;
        }
    }
    /// Marks `i`; true when it was not marked yet.
    #[inline]
    fn insert(&mut self, i: u32) -> bool {
        let m = &mut self.marks[i as usize];
        if *m == self.epoch {
            false
        } else {
            *m = self.epoch;
            true
        }
    }
}

/// The vectors a graph is built over: slot -> unit vector.
pub struct Vectors<'a> {
    pub data: &'a [f32],
    pub dim: usize,
}

impl Vectors<'_> {
    #[inline]
    fn get(&self, s: u32) -> &[f32] {
        let s = s as usize;
        &self.data[s * self.dim..(s + 1) * self.dim]
    }
    fn len(&self) -> usize {
        self.data.len() / self.dim.max(1)
    }
}

/// The graph.
pub struct Hnsw {
    params: HnswParams,
    m0: usize,
    levels: Vec<u8>,
    /// Layer 0: `m0` slots per node, `EMPTY` after the last link.
    layer0: Vec<u32>,
    /// Layers 1.. of the nodes that reach them: node -> links per layer (index 0 = layer 1).
    upper: HashMap<u32, Vec<Vec<u32>>>,
    entry: u32,
    max_level: u8,
    rng: rand::rngs::StdRng,
    pool: Mutex<Vec<Visited>>,
}

/// Links of one node found by a search, per layer from 0 up.
type Found = Vec<Vec<(f32, u32)>>;

impl Hnsw {
    fn empty(params: HnswParams) -> Hnsw {
        Hnsw {
            params,
            m0: params.m * 2,
            levels: Vec::new(),
            layer0: Vec::new(),
            upper: HashMap::new(),
            entry: EMPTY,
            max_level: 0,
            rng: rand::rngs::StdRng::seed_from_u64(0x4b494c4e),
            pool: Mutex::new(Vec::new()),
        }
    }

    pub fn len(&self) -> usize {
        self.levels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.levels.is_empty()
    }

    pub fn params(&self) -> HnswParams {
        self.params
    }

    fn random_level(&mut self) -> u8 {
        let ml = 1.0 / (self.params.m as f64).ln();
        let u: f64 = self.rng.gen_range(f64::EPSILON..1.0);
        ((-u.ln() * ml) as usize).min(16) as u8
    }

    fn links(&self, node: u32, level: u8) -> &[u32] {
        if level == 0 {
            let s = node as usize * self.m0;
            let l = &self.layer0[s..s + self.m0];
            let n = l.iter().position(|&x| x == EMPTY).unwrap_or(self.m0);
            &l[..n]
        } else {
            self.upper
                .get(&node)
                .and_then(|v| v.get(level as usize - 1))
                .map(Vec::as_slice)
                .unwrap_or(&[])
        }
    }

    fn set_links(&mut self, node: u32, level: u8, links: &[u32]) {
        if level == 0 {
            let s = node as usize * self.m0;
            let dst = &mut self.layer0[s..s + self.m0];
            dst.fill(EMPTY);
            for (d, &l) in dst.iter_mut().zip(links) {
                *d = l;
            }
        } else {
            let v = self.upper.entry(node).or_default();
            if v.len() < level as usize {
                v.resize(level as usize, Vec::new());
            }
            v[level as usize - 1] = links.to_vec();
        }
    }

    fn max_links(&self, level: u8) -> usize {
        if level == 0 {
            self.m0
        } else {
            self.params.m
        }
    }

    fn visited(&self, n: usize) -> Visited {
        let mut v = self.pool.lock().pop().unwrap_or_else(|| Visited::new(n));
        v.reset(n);
        v
    }

    fn give_back(&self, v: Visited) {
        let mut p = self.pool.lock();
        if p.len() < 8 {
            p.push(v);
        }
    }

    /// Greedy descent on one layer from `ep`.
    fn greedy(&self, vs: &Vectors, q: &[f32], mut ep: Scored, level: u8) -> Scored {
        loop {
            let mut moved = false;
            for &n in self.links(ep.1, level) {
                let s = dot(q, vs.get(n));
                if s > ep.0 {
                    ep = Scored(s, n);
                    moved = true;
                }
            }
            if !moved {
                return ep;
            }
        }
    }

    /// Beam search on one layer: the best `ef` nodes, best first.
    fn search_layer(
        &self,
        vs: &Vectors,
        q: &[f32],
        eps: &[Scored],
        ef: usize,
        level: u8,
        visited: &mut Visited,
    ) -> Vec<Scored> {
        let mut cand: BinaryHeap<Scored> = BinaryHeap::with_capacity(ef * 4);
        let mut best: BinaryHeap<std::cmp::Reverse<Scored>> = BinaryHeap::with_capacity(ef + 1);
        for &e in eps {
            if visited.insert(e.1) {
                cand.push(e);
                best.push(std::cmp::Reverse(e));
                if best.len() > ef {
                    best.pop();
                }
            }
        }
        while let Some(c) = cand.pop() {
            let worst = best.peek().map(|r| r.0 .0).unwrap_or(f32::NEG_INFINITY);
            if c.0 < worst && best.len() >= ef {
                break;
            }
            for &n in self.links(c.1, level) {
                if !visited.insert(n) {
                    continue;
                }
                let s = dot(q, vs.get(n));
                let worst = best.peek().map(|r| r.0 .0).unwrap_or(f32::NEG_INFINITY);
                if best.len() < ef || s > worst {
                    cand.push(Scored(s, n));
                    best.push(std::cmp::Reverse(Scored(s, n)));
                    if best.len() > ef {
                        best.pop();
                    }
                }
            }
        }
        let mut out: Vec<Scored> = best.into_iter().map(|r| r.0).collect();
        out.sort_by(|a, b| b.cmp(a));
        out
    }

    /// The paper's heuristic: keep a candidate only if it is closer to the base than to every
    /// neighbour kept so far (spreads links across directions). `cands` best first.
    fn select(vs: &Vectors, cands: &[(f32, u32)], m: usize) -> Vec<u32> {
        let mut kept: Vec<u32> = Vec::with_capacity(m);
        for &(s, c) in cands {
            if kept.len() >= m {
                break;
            }
            let cv = vs.get(c);
            if kept.iter().all(|&k| dot(cv, vs.get(k)) < s) {
                kept.push(c);
            }
        }
        kept
    }

    /// Finds the links of a new node `node` (vector `q`, level `level`) in the graph as it is.
    fn find(&self, vs: &Vectors, q: &[f32], node: u32, level: u8, visited: &mut Visited) -> Found {
        let mut out: Found = vec![Vec::new(); level as usize + 1];
        if self.entry == EMPTY {
            return out;
        }
        let mut ep = Scored(dot(q, vs.get(self.entry)), self.entry);
        let mut l = self.max_level;
        while l > level {
            ep = self.greedy(vs, q, ep, l);
            l -= 1;
        }
        let mut eps = vec![ep];
        let top = level.min(self.max_level);
        for l in (0..=top).rev() {
            visited.reset(vs.len());
            let w = self.search_layer(vs, q, &eps, self.params.ef_construction, l, visited);
            let cands: Vec<(f32, u32)> = w
                .iter()
                .filter(|s| s.1 != node)
                .map(|s| (s.0, s.1))
                .collect();
            // A new node gets `m` links on every layer; layer 0 lists may grow to `2m` by the
            // links later nodes add back (hnswlib does the same).
            let sel = Self::select(vs, &cands, self.params.m);
            let sims: HashMap<u32, f32> = cands.iter().map(|&(s, c)| (c, s)).collect();
            out[l as usize] = sel.iter().map(|&c| (sims[&c], c)).collect();
            eps = w;
        }
        out
    }

    /// Adds `node -> links` forward and the reverse links, pruning overfull lists.
    fn link_serial(&mut self, vs: &Vectors, node: u32, found: &Found) {
        for (l, links) in found.iter().enumerate() {
            let l = l as u8;
            let ids: Vec<u32> = links.iter().map(|x| x.1).collect();
            self.set_links(node, l, &ids);
            for &(_, n) in links {
                let merged = self.with_reverse(vs, n, l, &[node]);
                self.set_links(n, l, &merged);
            }
        }
    }

    /// `n`'s links at `level` plus `new`, pruned by the heuristic when over capacity.
    fn with_reverse(&self, vs: &Vectors, n: u32, level: u8, new: &[u32]) -> Vec<u32> {
        let mut all: Vec<u32> = self.links(n, level).to_vec();
        for &x in new {
            if x != n && !all.contains(&x) {
                all.push(x);
            }
        }
        let cap = self.max_links(level);
        if all.len() <= cap {
            return all;
        }
        let nv = vs.get(n);
        let mut scored: Vec<(f32, u32)> = all.iter().map(|&c| (dot(nv, vs.get(c)), c)).collect();
        scored.sort_by(|a, b| b.0.total_cmp(&a.0));
        Self::select(vs, &scored, cap)
    }

    fn push_node(&mut self, level: u8) -> u32 {
        let id = self.levels.len() as u32;
        self.levels.push(level);
        self.layer0.extend(std::iter::repeat_n(EMPTY, self.m0));
        id
    }

    fn promote(&mut self, node: u32, level: u8) {
        if self.entry == EMPTY || level > self.max_level {
            self.entry = node;
            self.max_level = level;
        }
    }

    /// Appends the next slot (its vector must already be in `vs`).
    pub fn insert(&mut self, vs: &Vectors) {
        let level = self.random_level();
        let node = self.push_node(level);
        let mut visited = self.visited(vs.len());
        let found = self.find(vs, vs.get(node), node, level, &mut visited);
        self.give_back(visited);
        self.link_serial(vs, node, &found);
        self.promote(node, level);
    }

    /// Builds a graph over every slot of `vs` on `threads` threads.
    pub fn build(vs: &Vectors, params: HnswParams, threads: usize) -> Hnsw {
        let n = vs.len();
        let mut g = Hnsw::empty(params);
        let serial = n.min(2_000);
        for _ in 0..serial {
            g.insert(vs);
        }
        let threads = threads.max(1);
        while g.len() < n {
            let start = g.len();
            let batch = (start / 40).clamp(256, 16_384).min(n - start);
            let levels: Vec<u8> = (0..batch).map(|_| g.random_level()).collect();
            // 1. Links of every new node, searched in parallel in the graph as it is.
            let found: Vec<Found> = {
                let gr = &g;
                let per = batch.div_ceil(threads);
                let mut out: Vec<Found> = Vec::with_capacity(batch);
                std::thread::scope(|s| {
                    let hs: Vec<_> = (0..batch)
                        .step_by(per)
                        .map(|from| {
                            let levels = &levels;
                            s.spawn(move || {
                                let mut visited = Visited::new(n);
                                (from..(from + per).min(batch))
                                    .map(|i| {
                                        let node = (start + i) as u32;
                                        gr.find(vs, vs.get(node), node, levels[i], &mut visited)
                                    })
                                    .collect::<Vec<Found>>()
                            })
                        })
                        .collect();
                    for h in hs {
                        out.extend(h.join().unwrap_or_default());
                    }
                });
                out
            };
            // 2. Forward links.
            for (i, f) in found.iter().enumerate() {
                let node = g.push_node(levels[i]);
                for (l, links) in f.iter().enumerate() {
                    let ids: Vec<u32> = links.iter().map(|x| x.1).collect();
                    g.set_links(node, l as u8, &ids);
                }
            }
            // 3. Reverse links: layer 0 in parallel by target range, upper layers serially.
            let mut rev: Vec<(u32, u32)> = Vec::new();
            for (i, f) in found.iter().enumerate() {
                let node = (start + i) as u32;
                if let Some(l0) = f.first() {
                    rev.extend(l0.iter().map(|&(_, t)| (t, node)));
                }
                for (l, links) in f.iter().enumerate().skip(1) {
                    for &(_, t) in links {
                        let merged = g.with_reverse(vs, t, l as u8, &[node]);
                        g.set_links(t, l as u8, &merged);
                    }
                }
            }
            rev.sort_unstable();
            g.reverse_layer0(vs, &rev, threads);
            for (i, &lv) in levels.iter().enumerate() {
                g.promote((start + i) as u32, lv);
            }
        }
        g
    }

    fn reverse_layer0(&mut self, vs: &Vectors, rev: &[(u32, u32)], threads: usize) {
        let nodes = self.levels.len();
        let m0 = self.m0;
        let per = nodes.div_ceil(threads).max(1);
        let mut updates: Vec<Vec<(u32, Vec<u32>)>> = Vec::new();
        {
            let gr = &*self;
            std::thread::scope(|s| {
                let hs: Vec<_> = (0..nodes)
                    .step_by(per)
                    .map(|from| {
                        let to = (from + per).min(nodes) as u32;
                        let lo = rev.partition_point(|x| x.0 < from as u32);
                        let hi = rev.partition_point(|x| x.0 < to);
                        let part = &rev[lo..hi];
                        s.spawn(move || {
                            let mut out = Vec::new();
                            let mut i = 0;
                            while i < part.len() {
                                let t = part[i].0;
                                let mut j = i;
                                while j < part.len() && part[j].0 == t {
                                    j += 1;
                                }
                                let new: Vec<u32> = part[i..j].iter().map(|x| x.1).collect();
                                out.push((t, gr.with_reverse(vs, t, 0, &new)));
                                i = j;
                            }
                            out
                        })
                    })
                    .collect();
                for h in hs {
                    updates.push(h.join().unwrap_or_default());
                }
            });
        }
        for (t, links) in updates.into_iter().flatten() {
            let s = t as usize * m0;
            let dst = &mut self.layer0[s..s + m0];
            dst.fill(EMPTY);
            for (d, l) in dst.iter_mut().zip(links) {
                *d = l;
            }
        }
    }

    /// The best `ef` slots for `q` (best first); the caller filters and cuts to k.
    pub fn search(&self, vs: &Vectors, q: &[f32], ef: usize) -> Vec<(f32, u32)> {
        if self.entry == EMPTY {
            return Vec::new();
        }
        let mut ep = Scored(dot(q, vs.get(self.entry)), self.entry);
        let mut l = self.max_level;
        while l > 0 {
            ep = self.greedy(vs, q, ep, l);
            l -= 1;
        }
        let mut visited = self.visited(vs.len());
        let w = self.search_layer(vs, q, &[ep], ef, 0, &mut visited);
        self.give_back(visited);
        w.into_iter().map(|s| (s.0, s.1)).collect()
    }

    /// Writes the graph (not the vectors) to `path`, atomically.
    pub fn save(&self, path: &Path, slot_ids: &[i64]) -> std::io::Result<()> {
        let tmp = path.with_extension("tmp");
        {
            let f = std::fs::File::create(&tmp)?;
            let mut w = std::io::BufWriter::new(f);
            w.write_all(MAGIC)?;
            for x in [
                self.params.m as u64,
                self.params.ef_construction as u64,
                self.levels.len() as u64,
                self.entry as u64,
                self.max_level as u64,
                self.upper.len() as u64,
            ] {
                w.write_all(&x.to_le_bytes())?;
            }
            for id in slot_ids {
                w.write_all(&id.to_le_bytes())?;
            }
            w.write_all(&self.levels)?;
            for x in &self.layer0 {
                w.write_all(&x.to_le_bytes())?;
            }
            let mut keys: Vec<&u32> = self.upper.keys().collect();
            keys.sort();
            for k in keys {
                let ls = &self.upper[k];
                w.write_all(&k.to_le_bytes())?;
                w.write_all(&(ls.len() as u32).to_le_bytes())?;
                for l in ls {
                    w.write_all(&(l.len() as u32).to_le_bytes())?;
                    for x in l {
                        w.write_all(&x.to_le_bytes())?;
                    }
                }
            }
            w.flush()?;
            w.get_ref().sync_all()?;
        }
        std::fs::rename(tmp, path)
    }

    /// Reads a graph written by `save`: the graph and the row id of every slot.
    pub fn load(path: &Path) -> std::io::Result<(Hnsw, Vec<i64>)> {
        let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
        let mut r = std::io::BufReader::new(std::fs::File::open(path)?);
        let mut magic = [0u8; 8];
        r.read_exact(&mut magic)?;
        if &magic != MAGIC {
            return Err(bad("not a kiln HNSW file"));
        }
        let mut u64s = [0u64; 6];
        for x in u64s.iter_mut() {
            let mut b = [0u8; 8];
            r.read_exact(&mut b)?;
            *x = u64::from_le_bytes(b);
        }
        let [m, efc, n, entry, max_level, nupper] = u64s;
        if !(2..=256).contains(&m) || n > u32::MAX as u64 / 2 || max_level > 16 {
            return Err(bad("HNSW header out of range"));
        }
        let n = n as usize;
        let mut g = Hnsw::empty(HnswParams {
            m: m as usize,
            ef_construction: efc as usize,
        });
        let mut buf = vec![0u8; n * 8];
        r.read_exact(&mut buf)?;
        let ids: Vec<i64> = buf
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap_or_default()))
            .collect();
        g.levels = vec![0u8; n];
        r.read_exact(&mut g.levels)?;
        let mut buf = vec![0u8; n * g.m0 * 4];
        r.read_exact(&mut buf)?;
        g.layer0 = buf
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap_or_default()))
            .collect();
        let read_u32 = |r: &mut std::io::BufReader<std::fs::File>| -> std::io::Result<u32> {
            let mut b = [0u8; 4];
            r.read_exact(&mut b)?;
            Ok(u32::from_le_bytes(b))
        };
        for _ in 0..nupper {
            let k = read_u32(&mut r)?;
            let nl = read_u32(&mut r)? as usize;
            if nl > 16 || k as usize >= n {
                return Err(bad("HNSW upper layer out of range"));
            }
            let mut ls = Vec::with_capacity(nl);
            for _ in 0..nl {
                let len = read_u32(&mut r)? as usize;
                if len > m as usize {
                    return Err(bad("HNSW link list too long"));
                }
                let mut l = Vec::with_capacity(len);
                for _ in 0..len {
                    l.push(read_u32(&mut r)?);
                }
                ls.push(l);
            }
            g.upper.insert(k, ls);
        }
        let in_range = |x: u32| x == EMPTY || (x as usize) < n;
        if !g.layer0.iter().all(|&x| in_range(x))
            || !g
                .upper
                .values()
                .flatten()
                .flatten()
                .all(|&x| (x as usize) < n)
            || (n > 0 && entry as usize >= n)
        {
            return Err(bad("HNSW link out of range"));
        }
        g.entry = if n == 0 { EMPTY } else { entry as u32 };
        g.max_level = max_level as u8;
        g.rng = rand::rngs::StdRng::seed_from_u64(n as u64);
        Ok((g, ids))
    }
}
