//! `kiln bench knowledge`: the knowledge engine measured in process (no server): embedding
//! throughput of all-MiniLM-L6-v2, walk-to-searchable time (BM25), a one-file sync in a large
//! tree with its embedding-cache hits, hybrid query latency at 100k chunks including the
//! query's embedding, IVF latency and recall@10 against exact search at 1M vectors, and the
//! HumanEval retrieval evaluation. The large tree and the 1M vectors use synthetic vectors
//! (feature hashing, and Gaussian clusters) so the run stays bounded; the model's own speed
//! is the throughput figure.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _, Result};
use clap::Args;
use kiln_knowledge::embed::{l2_normalise, Embedder, MiniLm};
use kiln_knowledge::engine::Source;
use kiln_knowledge::eval;
use kiln_knowledge::ivf::Ivf;
use kiln_knowledge::search::Mode;
use kiln_knowledge::vector::VectorIndex;
use kiln_knowledge::{EmbedConfig, Engine, SearchParams};
use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::bench::percentiles;
use crate::Global;

#[derive(Args, Debug)]
pub struct KnowledgeBench {
    /// Small scale (1,000 files, 10k chunks, 100k vectors) for a quick check
    #[arg(long)]
    pub quick: bool,
    /// Files in the generated tree (10 functions each) [default: 10000, --quick 1000]
    #[arg(long)]
    pub files: Option<usize>,
    /// Vectors for the ANN measurement, 0 to skip it [default: 1000000, --quick 100000]
    #[arg(long)]
    pub vectors: Option<usize>,
    /// Skip the HumanEval evaluation
    #[arg(long)]
    pub no_eval: bool,
    /// Where the evaluation sets are (scripts/install-knowledge-data.sh)
    #[arg(long, env = "KILN_DATASET_DIR")]
    pub datasets: Option<PathBuf>,
    /// Print one JSON object
    #[arg(long)]
    pub json: bool,
}

/// Feature hashing of identifier parts into 384 dimensions: the synthetic vectors of the large
/// tree (cheap, deterministic, and similar for similar texts).
struct Hashing;

impl Embedder for Hashing {
    fn model_id(&self) -> &str {
        "bench/hashing-384"
    }
    fn dim(&self) -> usize {
        384
    }
    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, kiln_knowledge::Error> {
        Ok(texts
            .iter()
            .map(|t| {
                let mut v = vec![0f32; 384];
                for (_, _, w) in kiln_knowledge::bm25::code_terms(t) {
                    let h = w.bytes().fold(0xcbf29ce484222325u64, |h, b| {
                        (h ^ b as u64).wrapping_mul(0x100000001b3)
                    });
                    v[(h % 384) as usize] += if h & (1 << 40) == 0 { 1.0 } else { -1.0 };
                }
                v[0] += 1e-3;
                l2_normalise(&mut v);
                v
            })
            .collect())
    }
}

const WORDS: &[&str] = &[
    "user", "order", "cart", "price", "total", "invoice", "payment", "account", "session", "token",
    "request", "response", "parse", "render", "cache", "index", "query", "search", "file", "path",
    "buffer", "stream", "event", "queue", "worker", "task", "job", "retry", "timeout", "limit",
    "config", "option", "value", "key", "map", "list", "tree", "node", "edge", "graph", "score",
    "rank", "filter", "sort", "merge", "split", "join", "format", "encode", "decode", "hash",
    "sign", "verify", "load", "save", "open", "close", "read", "write", "send", "receive",
];

fn word(rng: &mut impl Rng) -> &'static str {
    WORDS[rng.gen_range(0..WORDS.len())]
}

/// A Python file of 10 functions.
fn gen_file(rng: &mut impl Rng, n: usize) -> String {
    let mut s = String::from("import os\nimport json\n\n");
    for f in 0..10 {
        let (a, b, c) = (word(rng), word(rng), word(rng));
        s.push_str(&format!(
            "def {a}_{b}_{n}_{f}({c}, {b}_{c}=None):\n    \"\"\"{} the {b} of a {c} and return its {a}.\"\"\"\n    {a} = {{}}\n    for item in {c}:\n        if item.{b} > {}:\n            {a}[item.{c}] = item.{b}\n        else:\n            {a}.setdefault(\"{}\", []).append(item)\n    return {a}\n\n",
            capitalise(word(rng)),
            rng.gen_range(0..1000),
            word(rng),
        ));
    }
    s
}

fn capitalise(w: &str) -> String {
    let mut c = w.chars();
    c.next()
        .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
        .unwrap_or_default()
}

fn gen_tree(root: &Path, files: usize) -> Result<()> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    for i in 0..files {
        let dir = root.join(format!("pkg{:03}", i / 100));
        if i % 100 == 0 {
            std::fs::create_dir_all(&dir)?;
        }
        std::fs::write(dir.join(format!("mod{i:05}.py")), gen_file(&mut rng, i))?;
    }
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn say(json: bool, line: String) {
    if !json {
        eprintln!("{line}");
    }
}

pub async fn run(g: &Global, b: KnowledgeBench) -> Result<i32> {
    let data_dir = g
        .data_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(crate::api::DEFAULT_DATA_DIR));
    let models = kiln_knowledge::embed::model_dir(&data_dir);
    let datasets = b
        .datasets
        .clone()
        .unwrap_or_else(|| data_dir.join("datasets"));
    tokio::task::spawn_blocking(move || bench(b, &models, &datasets))
        .await
        .map_err(|e| anyhow!("benchmark task failed: {e}"))?
}

fn bench(b: KnowledgeBench, models: &Path, datasets: &Path) -> Result<i32> {
    let files = b.files.unwrap_or(if b.quick { 1_000 } else { 10_000 });
    let nvec = b
        .vectors
        .unwrap_or(if b.quick { 100_000 } else { 1_000_000 });
    let json_out = b.json;
    let model = Arc::new(MiniLm::load(models).context("loading all-MiniLM-L6-v2")?);
    let mut report = serde_json::Map::new();

    // 1. Embedding throughput on generated functions (batches of 32).
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let sample: Vec<String> = (0..(if b.quick { 128 } else { 512 }))
        .map(|i| {
            let f = gen_file(&mut rng, i);
            f.split("\n\n").nth(1).unwrap_or("").to_string()
        })
        .collect();
    let texts: Vec<&str> = sample.iter().map(String::as_str).collect();
    model.embed(&texts[..8])?;
    let t = Instant::now();
    for batch in texts.chunks(32) {
        model.embed(batch)?;
    }
    let per_sec = texts.len() as f64 / t.elapsed().as_secs_f64();
    let mut qlat: Vec<f64> = Vec::new();
    for q in [
        "sum the prices of the cart",
        "parse a request and return the token",
        "retry a job after a timeout",
    ]
    .iter()
    .cycle()
    .take(60)
    {
        let t = Instant::now();
        model.embed(&[q])?;
        qlat.push(ms(t.elapsed()));
    }
    let qp = percentiles(&mut qlat);
    say(json_out, format!("embedding (all-MiniLM-L6-v2, candle, CPU)  {per_sec:>8.1} chunks/s   query embedding p50 {:.2} ms  p99 {:.2} ms", qp.p50, qp.p99));
    report.insert(
        "embedding".into(),
        json!({"chunks_per_sec": per_sec, "chunks": texts.len(), "query_embedding_ms": qp}),
    );

    // 2. Walk-to-searchable (BM25) on a generated tree.
    let work = tempfile::tempdir()?;
    let src = work.path().join("src");
    gen_tree(&src, files)?;
    let engine = Engine::new(&work.path().join("data"), models)?;
    engine.create(
        "bench",
        "tree",
        Source::Path {
            path: src.display().to_string(),
        },
        EmbedConfig::Local,
    )?;
    engine.set_embedder("bench", "tree", Arc::new(Hashing))?;
    let t = Instant::now();
    let first = engine.sync("bench", "tree", &|_| {})?;
    let walk_to_searchable = t.elapsed();
    let hits = engine.search(
        "bench",
        "tree",
        &SearchParams {
            mode: Mode::Bm25,
            ..SearchParams::new("order total", 5)
        },
    )?;
    if hits.is_empty() {
        return Err(anyhow!("the fresh index found nothing"));
    }
    say(
        json_out,
        format!(
            "walk-to-searchable (BM25)  {files} files, {} chunks: {:.2} s",
            first.chunks_added,
            walk_to_searchable.as_secs_f64()
        ),
    );
    let t = Instant::now();
    let info = engine.wait_embedded("bench", "tree", Duration::from_secs(3600))?;
    say(
        json_out,
        format!(
            "synthetic vectors for {} chunks: {:.2} s",
            info.embedded,
            t.elapsed().as_secs_f64()
        ),
    );
    report.insert(
        "walk_to_searchable".into(),
        json!({"files": files, "chunks": first.chunks_added, "seconds": walk_to_searchable.as_secs_f64()}),
    );

    // 3. A one-file change: sync time and embedding-cache hits.
    let no_change = engine.sync("bench", "tree", &|_| {})?;
    let before = engine.stats("bench", "tree")?.embedding_cache;
    let victim = src.join("pkg000/mod00007.py");
    let text = std::fs::read_to_string(&victim)?;
    std::fs::write(&victim, text.replacen("return", "return  ", 1))?;
    let t = Instant::now();
    let one = engine.sync("bench", "tree", &|_| {})?;
    let sync_time = t.elapsed();
    let info = engine.wait_embedded("bench", "tree", Duration::from_secs(600))?;
    let embed_done = t.elapsed();
    let after = engine.stats("bench", "tree")?.embedding_cache;
    let newly_embedded = after.misses - before.misses;
    let hit_rate = 1.0 - newly_embedded as f64 / info.chunks.max(1) as f64;
    say(json_out, format!(
        "one-file change in {files} files: sync {:.1} ms (no-change sync {} ms), vectors current after {:.1} ms; {} of {} chunks embedded again, cache hits {:.3} %",
        ms(sync_time), no_change.millis, ms(embed_done), newly_embedded, info.chunks, hit_rate * 100.0
    ));
    report.insert(
        "one_file_sync".into(),
        json!({"files": files, "sync_ms": ms(sync_time), "no_change_sync_ms": no_change.millis, "vectors_current_ms": ms(embed_done),
               "chunks": info.chunks, "embedded_again": newly_embedded, "changed_files": one.changed,
               "embedding_cache_hit_rate": hit_rate, "targets": {"sync_s": 2.0, "hit_rate": 0.99}}),
    );

    // 4. Hybrid query latency at this index's size, including the query's embedding.
    engine.set_query_cache("bench", "tree", false)?;
    let stats = engine.stats("bench", "tree")?;
    let queries: Vec<String> = (0..200)
        .map(|_| {
            format!(
                "{} the {} of each {} by {}",
                word(&mut rng),
                word(&mut rng),
                word(&mut rng),
                word(&mut rng)
            )
        })
        .collect();
    let mut lat = Vec::new();
    let mut embed_lat = Vec::new();
    let mut search_lat = Vec::new();
    let mut bm_lat = Vec::new();
    for q in &queries {
        let t = Instant::now();
        let v = model.embed(&[q.as_str()])?.remove(0);
        let embedded = t.elapsed();
        let hits = engine.search_with_vector("bench", "tree", &SearchParams::new(q, 10), v)?;
        lat.push(ms(t.elapsed()));
        embed_lat.push(ms(embedded));
        search_lat.push(ms(t.elapsed() - embedded));
        if hits.is_empty() {
            return Err(anyhow!("hybrid search found nothing for {q}"));
        }
        let t = Instant::now();
        engine.search(
            "bench",
            "tree",
            &SearchParams {
                mode: Mode::Bm25,
                ..SearchParams::new(q, 10)
            },
        )?;
        bm_lat.push(ms(t.elapsed()));
    }
    let hp = percentiles(&mut lat);
    let bp = percentiles(&mut bm_lat);
    let qe = percentiles(&mut embed_lat);
    let sp = percentiles(&mut search_lat);
    say(json_out, format!(
        "hybrid query at {} chunks ({}), incl. query embedding: p50 {:.2} ms  p99 {:.2} ms   (BM25 alone p50 {:.2} ms p99 {:.2} ms; ratio p99 {:.1}x)",
        stats.info.chunks,
        if stats.ann { "HNSW" } else { "exact" },
        hp.p50, hp.p99, bp.p50, bp.p99, hp.p99 / bp.p99.max(1e-9)
    ));
    say(json_out, format!(
        "  of which query embedding p50 {:.2} ms p99 {:.2} ms; search given the vector (BM25 + vectors + fusion + fetch) p50 {:.2} ms p99 {:.2} ms",
        qe.p50, qe.p99, sp.p50, sp.p99
    ));
    report.insert(
        "hybrid_query".into(),
        json!({"chunks": stats.info.chunks, "ann": stats.ann, "latency_ms": hp, "query_embedding_ms": qe,
               "search_given_vector_ms": sp, "bm25_only_ms": bp, "target_p99_ms": 50}),
    );
    drop(engine);

    // 5. Vector retrieval at `nvec` synthetic vectors: HNSW and IVF against exact.
    if nvec > 0 {
        report.insert("ann".into(), ann_bench(nvec, json_out)?);
    }

    // 6. HumanEval: one index per set, every fusion of the sweep on the same candidates.
    if !b.no_eval {
        let corpus = tempfile::tempdir()?;
        let sets = eval::prepare(datasets, corpus.path())?;
        let e = Engine::new(&corpus.path().join("data"), models)?;
        let t = Instant::now();
        eval::index_sets(&e, "eval", &sets)?;
        let chunks: u64 = sets
            .iter()
            .map(|s| e.info("eval", &s.name).map(|i| i.chunks))
            .sum::<Result<u64, _>>()?;
        say(
            json_out,
            format!(
                "HumanEval corpora: {chunks} chunks indexed and embedded in {:.1} s",
                t.elapsed().as_secs_f64()
            ),
        );
        let weights: Vec<f32> = (5..=10).map(|i| i as f32 / 10.0).collect();
        let rows = eval::evaluate(&e, "eval", &sets, &eval::sweep(&weights))?;
        for r in &rows {
            say(
                json_out,
                format!(
                    "{:<18} {:<14} R@1 {:.3}  R@5 {:.3}  MRR@10 {:.3}  ({} queries)",
                    r.set, r.method, r.r1, r.r5, r.mrr10, r.queries
                ),
            );
        }
        report.insert("humaneval".into(), serde_json::to_value(&rows)?);
    }
    if json_out {
        println!("{}", serde_json::Value::Object(report));
    }
    Ok(0)
}

/// `n` unit vectors around `n / 1000` Gaussian cluster centres, and `q` queries near data.
fn clustered(n: usize, dim: usize, q: usize) -> (Vec<f32>, Vec<Vec<f32>>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let gauss = move |rng: &mut rand::rngs::StdRng| -> f32 {
        // Box-Muller.
        let u1: f32 = rng.gen_range(f32::EPSILON..1.0);
        let u2: f32 = rng.gen();
        (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
    };
    let nc = (n / 1000).max(16);
    let centres: Vec<Vec<f32>> = (0..nc)
        .map(|_| {
            let mut c: Vec<f32> = (0..dim).map(|_| gauss(&mut rng)).collect();
            l2_normalise(&mut c);
            c
        })
        .collect();
    let mut data = Vec::with_capacity(n * dim);
    for _ in 0..n {
        let c = &centres[rng.gen_range(0..nc)];
        let mut v: Vec<f32> = c.iter().map(|x| x + 0.06 * gauss(&mut rng)).collect();
        l2_normalise(&mut v);
        data.extend_from_slice(&v);
    }
    let queries = (0..q)
        .map(|_| {
            let i = rng.gen_range(0..n);
            let mut v: Vec<f32> = data[i * dim..(i + 1) * dim]
                .iter()
                .map(|x| x + 0.03 * gauss(&mut rng))
                .collect();
            l2_normalise(&mut v);
            v
        })
        .collect();
    (data, queries)
}

/// Recall@10 of `found` against `truth` (both lists of ids).
fn recall(found: &[Vec<i64>], truth: &[Vec<i64>]) -> f64 {
    let hit: usize = found
        .iter()
        .zip(truth)
        .map(|(f, t)| f.iter().filter(|x| t.contains(x)).count())
        .sum();
    hit as f64 / (truth.len() * 10).max(1) as f64
}

/// HNSW (the engine's ANN) and IVF (the alternative) over the same `nvec` clustered vectors,
/// each swept over its speed/recall knob, against the exact scan of the same run; and the
/// graph's save and load (what a restart costs instead of a rebuild).
fn ann_bench(nvec: usize, json_out: bool) -> Result<serde_json::Value> {
    let dim = 384;
    let t = Instant::now();
    let (data, queries) = clustered(nvec, dim, 200);
    let gen_s = t.elapsed().as_secs_f64();
    let mut index = VectorIndex::new(dim);
    index.exact_threshold = usize::MAX;
    for (i, v) in data.chunks_exact(dim).enumerate() {
        index.upsert(i as i64, v);
    }
    drop(data);
    let mut exact_lat = Vec::new();
    let truth: Vec<Vec<i64>> = queries
        .iter()
        .map(|q| {
            let t = Instant::now();
            let r = index.search_exact(q, 10, &|_| true);
            exact_lat.push(ms(t.elapsed()));
            r.into_iter().map(|x| x.0).collect()
        })
        .collect();
    let ep = percentiles(&mut exact_lat);
    say(json_out, format!(
        "exact scan at {nvec} x {dim}: p50 {:.2} ms  p99 {:.2} ms (baseline; {} queries near the data, synthetic vectors generated in {gen_s:.1} s)",
        ep.p50, ep.p99, queries.len()
    ));

    // HNSW: build, save, load, sweep ef.
    index.exact_threshold = 0;
    let t = Instant::now();
    index.maintain();
    let hnsw_build_s = t.elapsed().as_secs_f64();
    let dir = tempfile::tempdir()?;
    let graph = dir.path().join("vectors.hnsw");
    let t = Instant::now();
    index.save(&graph)?;
    let save_s = t.elapsed().as_secs_f64();
    let graph_mb = std::fs::metadata(&graph)?.len() as f64 / 1e6;
    let (raw, ids) = index.raw();
    let stored: Vec<(i64, Vec<f32>)> = ids
        .iter()
        .zip(raw.chunks_exact(dim))
        .map(|(&id, v)| (id, v.to_vec()))
        .collect();
    let t = Instant::now();
    let mut reopened = VectorIndex::open(dim, stored, Some(&graph));
    let load_s = t.elapsed().as_secs_f64();
    if !reopened.uses_ann() {
        return Err(anyhow!("the saved graph was not loaded"));
    }
    say(json_out, format!(
        "HNSW (M {}, ef_construction {}) built in {hnsw_build_s:.1} s on {} threads; saved in {save_s:.2} s ({graph_mb:.0} MB), loaded with the vectors in {load_s:.2} s",
        index.params.m, index.params.ef_construction, std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    ));
    drop(index);
    let mut hnsw_rows = Vec::new();
    for ef in [16usize, 32, 64, 128, 256, 384, 512] {
        let mut lat = Vec::new();
        let found: Vec<Vec<i64>> = queries
            .iter()
            .map(|q| {
                let t = Instant::now();
                let r = reopened.search_ef(q, 10, ef, &|_| true);
                lat.push(ms(t.elapsed()));
                r.into_iter().map(|x| x.0).collect()
            })
            .collect();
        let r = recall(&found, &truth);
        let p = percentiles(&mut lat);
        say(json_out, format!(
            "HNSW at {nvec} x {dim}: ef {ef:>3}      p50 {:.3} ms  p99 {:.3} ms  recall@10 {r:.3}   (p99 {:.0}x faster than exact)",
            p.p50, p.p99, ep.p99 / p.p99.max(1e-9)
        ));
        hnsw_rows.push(json!({"ef": ef, "latency_ms": p, "recall_at_10": r}));
    }
    reopened.ef_search = kiln_knowledge::vector::DEFAULT_EF_SEARCH;

    // IVF over the same vectors.
    let (raw, _) = reopened.raw();
    let t = Instant::now();
    let ivf = Ivf::build(raw, dim);
    let ivf_build_s = t.elapsed().as_secs_f64();
    say(json_out, format!("IVF built in {ivf_build_s:.1} s"));
    let mut ivf_rows = Vec::new();
    for nprobe in [8usize, 32, 64, 128] {
        let mut lat = Vec::new();
        let found: Vec<Vec<i64>> = queries
            .iter()
            .map(|q| {
                let t = Instant::now();
                let r = ivf.search(raw, q, 10, nprobe);
                lat.push(ms(t.elapsed()));
                r.into_iter().map(|x| x.0).collect()
            })
            .collect();
        let r = recall(&found, &truth);
        let p = percentiles(&mut lat);
        say(json_out, format!(
            "IVF  at {nvec} x {dim}: nprobe {nprobe:>3}  p50 {:.3} ms  p99 {:.3} ms  recall@10 {r:.3}   (p99 {:.1}x faster than exact)",
            p.p50, p.p99, ep.p99 / p.p99.max(1e-9)
        ));
        ivf_rows.push(json!({"nprobe": nprobe, "latency_ms": p, "recall_at_10": r}));
    }
    Ok(
        json!({"vectors": nvec, "dim": dim, "generate_s": gen_s, "exact_ms": ep,
              "hnsw": {"build_s": hnsw_build_s, "save_s": save_s, "load_s": load_s, "file_mb": graph_mb, "sweep": hnsw_rows},
              "ivf": {"build_s": ivf_build_s, "sweep": ivf_rows},
              "targets": {"p99_ms": 10, "recall_at_10": 0.95}}),
    )
}
