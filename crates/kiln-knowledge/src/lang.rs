//! Language detection from a path (extension and a few well-known file names).

use serde::{Deserialize, Serialize};

/// The languages the engine knows; `Text` is everything else it indexes with line windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Language {
    Python,
    Rust,
    TypeScript,
    Tsx,
    JavaScript,
    Markdown,
    Text,
}

impl Language {
    pub fn detect(path: &str) -> Language {
        let name = path.rsplit('/').next().unwrap_or(path);
        let ext = name.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase());
        match ext.as_deref() {
            Some("py" | "pyi") => Language::Python,
            Some("rs") => Language::Rust,
            Some("ts" | "mts" | "cts") => Language::TypeScript,
            Some("tsx") => Language::Tsx,
            Some("js" | "mjs" | "cjs" | "jsx") => Language::JavaScript,
            Some("md" | "markdown") => Language::Markdown,
            _ => Language::Text,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Language::Python => "python",
            Language::Rust => "rust",
            Language::TypeScript => "typescript",
            Language::Tsx => "tsx",
            Language::JavaScript => "javascript",
            Language::Markdown => "markdown",
            Language::Text => "text",
        }
    }

    /// Parses a user-given language name (`--lang`); `ts` and `js` are accepted too.
    pub fn parse(s: &str) -> Option<Language> {
        Some(match s.to_ascii_lowercase().as_str() {
            "python" | "py" => Language::Python,
            "rust" | "rs" => Language::Rust,
            "typescript" | "ts" => Language::TypeScript,
            "tsx" => Language::Tsx,
            "javascript" | "js" => Language::JavaScript,
            "markdown" | "md" => Language::Markdown,
            "text" => Language::Text,
            _ => return None,
        })
    }
}
