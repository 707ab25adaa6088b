//! HumanEval retrieval quality with the real model: on the Python set (its own corpus of 164
//! targets and 164 test files), the default fusion must rank at least as well as each of its
//! inputs at R@1 and MRR@10. The Rust set and the weight sweeps run in `kiln bench knowledge`
//! (they double the embedding work and add no assertion).

use kiln_knowledge::search::Fusion;
use kiln_knowledge::{eval, Engine};

use crate::util::model_dir;

#[test]
fn humaneval_fusion_beats_its_inputs_on_python() {
    let datasets = std::env::var("KILN_DATASET_DIR")
        .expect("KILN_DATASET_DIR must name the datasets dir (make test installs it)");
    let corpus = tempfile::tempdir().unwrap();
    let sets = eval::prepare(std::path::Path::new(&datasets), corpus.path()).unwrap();
    assert_eq!(sets[0].name, "humaneval-python");
    assert_eq!(sets[0].queries.len(), 164);
    assert!(sets[1].queries.len() >= 170, "{}", sets[1].queries.len());
    let python = &sets[..1];
    let data = tempfile::tempdir().unwrap();
    let e = Engine::new(data.path(), &model_dir()).unwrap();
    eval::index_sets(&e, "eval", python).unwrap();
    let rows = eval::evaluate(
        &e,
        "eval",
        python,
        &[("default".to_string(), Fusion::default())],
    )
    .unwrap();
    let get = |m: &str| rows.iter().find(|r| r.method == m).unwrap().clone();
    let (h, v, b) = (get("default"), get("vector"), get("bm25"));
    eprintln!("{rows:#?}");
    assert!(h.r1 >= v.r1 && h.r1 >= b.r1, "{h:?} {v:?} {b:?}");
    assert!(
        h.mrr10 >= v.mrr10 && h.mrr10 >= b.mrr10,
        "{h:?} {v:?} {b:?}"
    );
}
