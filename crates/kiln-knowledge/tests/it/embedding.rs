//! The local model against reference vectors, and the HTTP providers against our server.

use kiln_knowledge::embed::{EmbedConfig, Embedder, HttpEmbedder, MiniLm};

use crate::util::{bag_of_words, embedding_server, model_dir};

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let d: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    d / (na * nb)
}

#[derive(serde::Deserialize)]
struct Reference {
    text: String,
    vector: Vec<f32>,
}

#[test]
fn minilm_matches_the_reference_vectors() {
    let refs: Vec<Reference> =
        serde_json::from_str(include_str!("../fixtures/minilm_reference.json")).expect("fixture");
    let model = MiniLm::load(&model_dir()).expect("model installed");
    assert_eq!(model.dim(), 384);
    let texts: Vec<&str> = refs.iter().map(|r| r.text.as_str()).collect();
    // One batch (padded to the longest) and one at a time must agree with the reference.
    let batch = model.embed(&texts).unwrap();
    for (r, v) in refs.iter().zip(&batch) {
        assert_eq!(v.len(), 384);
        let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "not normalised: {norm}");
        let c = cosine(v, &r.vector);
        assert!(
            c > 0.99,
            "cosine {c} against the reference for {:?}",
            r.text
        );
        let single = model.embed(&[r.text.as_str()]).unwrap();
        assert!(
            cosine(&single[0], v) > 0.9999,
            "batching changed the vector of {:?}",
            r.text
        );
    }
    // Meaning: the code and its description are closer than unrelated texts.
    assert!(cosine(&batch[0], &batch[1]) > cosine(&batch[0], &batch[3]));
}

#[test]
fn long_inputs_are_truncated_not_rejected() {
    let model = MiniLm::load(&model_dir()).unwrap();
    let long = "word ".repeat(2000);
    let v = model.embed(&[long.as_str()]).unwrap();
    assert_eq!(v[0].len(), 384);
}

#[test]
fn ollama_provider_speaks_api_embed() {
    let (url, seen) = embedding_server();
    let e = HttpEmbedder::new(EmbedConfig::Ollama {
        url: url.clone(),
        model: "nomic-embed-text".into(),
    })
    .unwrap();
    let v = e.embed(&["fn parse", "class Store"]).unwrap();
    let mut want = bag_of_words("class Store");
    kiln_knowledge::embed::l2_normalise(&mut want);
    assert!(cosine(&v[1], &want) > 0.9999);
    assert_eq!(e.dim(), 64);
    let s = seen.lock().unwrap();
    assert_eq!(s[0].path, "/api/embed");
    assert_eq!(s[0].model, "nomic-embed-text");
    assert_eq!(s[0].inputs, vec!["fn parse", "class Store"]);
}

#[test]
fn openai_provider_speaks_v1_embeddings_and_sorts_by_index() {
    let (url, seen) = embedding_server();
    std::env::set_var("KILN_TEST_EMBED_KEY", "test-key-123");
    let e = HttpEmbedder::new(EmbedConfig::Openai {
        url: url.clone(),
        model: "text-embedding-3-small".into(),
        api_key_env: Some("KILN_TEST_EMBED_KEY".into()),
    })
    .unwrap();
    let v = e.embed(&["alpha beta", "gamma", "delta epsilon"]).unwrap();
    for (t, got) in ["alpha beta", "gamma", "delta epsilon"].iter().zip(&v) {
        let mut want = bag_of_words(t);
        kiln_knowledge::embed::l2_normalise(&mut want);
        assert!(cosine(got, &want) > 0.9999, "{t}");
    }
    let s = seen.lock().unwrap();
    assert_eq!(s[0].path, "/v1/embeddings");
    assert_eq!(s[0].auth.as_deref(), Some("Bearer test-key-123"));
}

#[test]
fn provider_errors_are_errors() {
    let e = HttpEmbedder::new(EmbedConfig::Ollama {
        url: "http://127.0.0.1:1".into(),
        model: "m".into(),
    })
    .unwrap();
    assert!(e.embed(&["x"]).is_err());
}
