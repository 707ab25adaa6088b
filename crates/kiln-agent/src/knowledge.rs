//! The knowledge tools: `knowledge_search` and `knowledge_context` over the code indexes of
//! the run's organisation. What they need from the knowledge engine is the [`Knowledge`]
//! trait (the server implements it over kiln-knowledge); this module owns the argument types,
//! the choice of index and the text the model reads. It does not index anything.

use std::sync::Arc;

use async_trait::async_trait;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::model::ToolSpec;
use crate::tools::{parse_args, schema, truncate, Tool, ToolCtx};

pub const KNOWLEDGE_SEARCH: &str = "knowledge_search";
pub const KNOWLEDGE_CONTEXT: &str = "knowledge_context";

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KnowledgeSearch {
    /// What to look for, in words or code (`where are API keys hashed`, `fn parse_duration`).
    pub query: String,
    /// The index to search; may be left out when the organisation has exactly one.
    pub index: Option<String>,
    /// At most this many results (default 8, at most 50).
    pub k: Option<usize>,
    /// Only this language (python, rust, typescript, tsx, javascript, markdown, text).
    pub lang: Option<String>,
    /// Only paths matching this glob, relative to the indexed root (`src/**/*.rs`).
    pub path: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KnowledgeContext {
    /// The question or task the context is for.
    pub query: String,
    /// The index to use; may be left out when the organisation has exactly one.
    pub index: Option<String>,
    /// Token budget of the context (default 2000, between 64 and 8000).
    pub tokens: Option<usize>,
}

/// One search result as the knowledge engine returns it.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct KnowledgeHit {
    pub path: String,
    pub start_line: u32,
    pub end_line: u32,
    pub symbol: Option<String>,
    pub score: f32,
    pub text: String,
}

/// What the knowledge tools need: the indexes of an organisation, search, and packed context.
/// Errors are messages for the model (an unknown index, a bad language, ...).
#[async_trait]
pub trait Knowledge: Send + Sync {
    async fn indexes(&self, org_id: &str) -> Result<Vec<String>, String>;
    async fn search(
        &self,
        org_id: &str,
        index: &str,
        args: &KnowledgeSearch,
    ) -> Result<Vec<KnowledgeHit>, String>;
    /// The context rendered as text, within `tokens`.
    async fn context(
        &self,
        org_id: &str,
        index: &str,
        query: &str,
        tokens: usize,
    ) -> Result<String, String>;
}

/// The two knowledge tools over `k`, to register with the runtime.
pub fn knowledge_tools(k: Arc<dyn Knowledge>) -> Vec<Arc<dyn Tool>> {
    vec![Arc::new(SearchTool(k.clone())), Arc::new(ContextTool(k))]
}

/// The index a call names, or the organisation's only one.
async fn pick_index(
    k: &dyn Knowledge,
    org_id: &str,
    named: Option<&str>,
) -> Result<String, String> {
    if let Some(n) = named {
        return Ok(n.to_string());
    }
    let all = k.indexes(org_id).await?;
    match all.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err("this organisation has no knowledge index yet (one is created with `kiln index create`); nothing was searched".into()),
        many => Err(format!(
            "several indexes exist: pass `index`, one of: {}",
            many.join(", ")
        )),
    }
}

struct SearchTool(Arc<dyn Knowledge>);

#[async_trait]
impl Tool for SearchTool {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: KNOWLEDGE_SEARCH.into(),
            description: "Search the organisation's code index (hybrid keyword and semantic \
                search) for code related to a question; returns file, lines, symbol and the code."
                .into(),
            parameters: schema::<KnowledgeSearch>(),
        }
    }

    async fn run(&self, ctx: &ToolCtx, args: Value) -> Result<String, String> {
        let mut a: KnowledgeSearch = parse_args(KNOWLEDGE_SEARCH, args)?;
        if a.query.trim().is_empty() {
            return Err("`query` is empty; say what to look for".into());
        }
        a.k = Some(a.k.unwrap_or(8).clamp(1, 50));
        let index = pick_index(self.0.as_ref(), &ctx.org_id, a.index.as_deref()).await?;
        let hits = self.0.search(&ctx.org_id, &index, &a).await?;
        if hits.is_empty() {
            return Ok(format!("no results in index `{index}`"));
        }
        let mut out = format!("{} results in index `{index}`:\n", hits.len());
        for h in &hits {
            out.push_str(&format!(
                "--- {}:{}-{}{} (score {:.3})\n{}\n",
                h.path,
                h.start_line,
                h.end_line,
                h.symbol
                    .as_deref()
                    .map(|s| format!(" {s}"))
                    .unwrap_or_default(),
                h.score,
                h.text.trim_end()
            ));
        }
        Ok(truncate(&out, ctx.output_budget))
    }
}

struct ContextTool(Arc<dyn Knowledge>);

#[async_trait]
impl Tool for ContextTool {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: KNOWLEDGE_CONTEXT.into(),
            description: "Gather the code most relevant to a task from the organisation's code \
                index, merged and packed within a token budget, with a map of the symbols."
                .into(),
            parameters: schema::<KnowledgeContext>(),
        }
    }

    async fn run(&self, ctx: &ToolCtx, args: Value) -> Result<String, String> {
        let a: KnowledgeContext = parse_args(KNOWLEDGE_CONTEXT, args)?;
        if a.query.trim().is_empty() {
            return Err("`query` is empty; say what the context is for".into());
        }
        let tokens = a.tokens.unwrap_or(2000);
        if !(64..=8000).contains(&tokens) {
            return Err(format!(
                "`tokens` must be between 64 and 8000 (got {tokens}); nothing was run"
            ));
        }
        let index = pick_index(self.0.as_ref(), &ctx.org_id, a.index.as_deref()).await?;
        let text = self
            .0
            .context(&ctx.org_id, &index, &a.query, tokens)
            .await?;
        Ok(truncate(&text, ctx.output_budget))
    }
}
