//! Helpers shared by the tests: the model directory, source trees, an HTTP server of
//! ours speaking the Ollama and OpenAI embedding protocols.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The installed model (scripts/install-knowledge-data.sh); `make test` sets KILN_MODEL_DIR.
pub fn model_dir() -> PathBuf {
    let d = std::env::var("KILN_MODEL_DIR")
        .expect("KILN_MODEL_DIR must name the models dir (make test installs it with scripts/install-knowledge-data.sh)");
    PathBuf::from(d)
}

pub fn write(root: &Path, rel: &str, text: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

/// A deterministic 64-dimension embedding of ours: hashed bag of lowercase words.
pub fn bag_of_words(text: &str) -> Vec<f32> {
    let mut v = vec![0f32; 64];
    for w in text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        let h = w
            .to_lowercase()
            .bytes()
            .fold(1469598103934665603u64, |h, b| {
                (h ^ b as u64).wrapping_mul(1099511628211)
            });
        v[(h % 64) as usize] += 1.0;
    }
    v[0] += 0.01;
    v
}

/// A request the embedding server received: path, model, inputs, authorization header.
#[derive(Debug, Clone)]
pub struct Seen {
    pub path: String,
    pub model: String,
    pub inputs: Vec<String>,
    pub auth: Option<String>,
}

/// Serves `/api/embed` (Ollama) and `/v1/embeddings` (OpenAI) over HTTP/1.1 on a thread.
pub fn embedding_server() -> (String, Arc<Mutex<Vec<Seen>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut conn) = conn else { continue };
            let seen = s2.clone();
            std::thread::spawn(move || loop {
                let mut r = BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 {
                    return;
                }
                let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                let mut len = 0;
                let mut auth = None;
                loop {
                    let mut h = String::new();
                    r.read_line(&mut h).unwrap();
                    let h = h.trim_end();
                    if h.is_empty() {
                        break;
                    }
                    let (k, v) = h.split_once(':').unwrap();
                    match k.to_ascii_lowercase().as_str() {
                        "content-length" => len = v.trim().parse().unwrap(),
                        "authorization" => auth = Some(v.trim().to_string()),
                        _ => {}
                    }
                }
                let mut body = vec![0; len];
                r.read_exact(&mut body).unwrap();
                let req: serde_json::Value = serde_json::from_slice(&body).unwrap();
                let inputs: Vec<String> = match &req["input"] {
                    serde_json::Value::String(s) => vec![s.clone()],
                    serde_json::Value::Array(a) => {
                        a.iter().map(|x| x.as_str().unwrap().to_string()).collect()
                    }
                    _ => vec![],
                };
                let model = req["model"].as_str().unwrap_or("").to_string();
                seen.lock().unwrap().push(Seen {
                    path: path.clone(),
                    model: model.clone(),
                    inputs: inputs.clone(),
                    auth,
                });
                let (status, resp) = match path.as_str() {
                    "/api/embed" => (
                        "200 OK",
                        serde_json::json!({
                            "model": model,
                            "embeddings": inputs.iter().map(|t| bag_of_words(t)).collect::<Vec<_>>(),
                        }),
                    ),
                    "/v1/embeddings" => (
                        "200 OK",
                        serde_json::json!({
                            "object": "list",
                            "model": model,
                            // Out of order on purpose: clients must sort by `index`.
                            "data": inputs.iter().enumerate().rev().map(|(i, t)| serde_json::json!({
                                "object": "embedding", "index": i, "embedding": bag_of_words(t)
                            })).collect::<Vec<_>>(),
                            "usage": {"prompt_tokens": 0, "total_tokens": 0},
                        }),
                    ),
                    _ => ("404 Not Found", serde_json::json!({"error": "not found"})),
                };
                let body = resp.to_string();
                let out = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                if conn.write_all(out.as_bytes()).is_err() {
                    return;
                }
            });
        }
    });
    (url, seen)
}
