//! The HNSW graph against the exact scan: recall, removals, filters, and the saved graph
//! loaded back (with rows removed and added since) instead of rebuilt.

use kiln_knowledge::embed::l2_normalise;
use kiln_knowledge::vector::VectorIndex;
use rand::{Rng, SeedableRng};

fn random_vectors(n: usize, dim: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let mut v: Vec<f32> = (0..dim).map(|_| rng.gen_range(-1.0..1.0)).collect();
            l2_normalise(&mut v);
            v
        })
        .collect()
}

fn recall(ix: &VectorIndex, queries: &[Vec<f32>]) -> f64 {
    let mut hit = 0;
    for q in queries {
        let exact: Vec<i64> = ix
            .search_exact(q, 10, &|_| true)
            .iter()
            .map(|x| x.0)
            .collect();
        let ann = ix.search(q, 10, &|_| true);
        hit += ann.iter().filter(|x| exact.contains(&x.0)).count();
    }
    hit as f64 / (queries.len() * 10) as f64
}

#[test]
fn hnsw_matches_exact_search_survives_removals_and_reloads() {
    let dim = 32;
    let data = random_vectors(3000, dim, 1);
    let queries = random_vectors(50, dim, 2);
    let mut ix = VectorIndex::new(dim);
    ix.exact_threshold = 1000;
    for (i, v) in data.iter().enumerate() {
        ix.upsert(i as i64, v);
    }
    assert!(!ix.uses_ann());
    assert!(ix.needs_graph());
    ix.maintain();
    assert!(ix.uses_ann() && !ix.needs_graph());
    let r = recall(&ix, &queries);
    assert!(r >= 0.95, "recall {r}");

    // Removed rows are never returned; a filter is honoured even when it leaves few rows.
    for id in 0..200 {
        ix.remove(id);
    }
    for q in &queries {
        assert!(ix.search(q, 10, &|_| true).iter().all(|x| x.0 >= 200));
        let odd = ix.search(q, 10, &|id| id % 97 == 1);
        assert_eq!(odd.len(), 10);
        assert!(odd.iter().all(|x| x.0 % 97 == 1 && x.0 >= 200));
    }

    // Saved, then opened with 100 more rows gone and 50 new ones: the graph is reused.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("vectors.hnsw");
    ix.save(&file).unwrap();
    let extra = random_vectors(50, dim, 3);
    let stored: Vec<(i64, Vec<f32>)> = data
        .iter()
        .enumerate()
        .skip(300)
        .map(|(i, v)| (i as i64, v.clone()))
        .chain(
            extra
                .iter()
                .enumerate()
                .map(|(i, v)| (10_000 + i as i64, v.clone())),
        )
        .collect();
    let mut back = VectorIndex::open(dim, stored, Some(&file));
    assert!(back.uses_ann());
    assert_eq!(back.len(), 2700 + 50);
    let r = recall(&back, &queries);
    assert!(r >= 0.95, "recall after reload {r}");
    // A new row is found by its own vector.
    let top = back.search(&extra[7], 1, &|_| true);
    assert_eq!(top[0].0, 10_007);
    assert!(back
        .search(&data[250], 10, &|_| true)
        .iter()
        .all(|x| x.0 >= 300));

    // A file that is not a graph is ignored (the caller builds a new one).
    std::fs::write(&file, b"garbage").unwrap();
    let stored: Vec<(i64, Vec<f32>)> = data
        .iter()
        .enumerate()
        .map(|(i, v)| (i as i64, v.clone()))
        .collect();
    back = VectorIndex::open(dim, stored, Some(&file));
    back.exact_threshold = 1000;
    assert!(!back.uses_ann() && back.needs_graph());
}
