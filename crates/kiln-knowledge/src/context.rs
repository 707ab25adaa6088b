//! Context assembly: from ranked hits to the best context for an LLM within a token budget:
//! duplicates dropped, overlapping and adjacent ranges of a file merged, pieces packed by score
//! per token, each with its path and line numbers, optionally led by a map of the most relevant
//! symbols.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::search::Hit;

/// Tokens of a text, estimated (4 characters per token, the usual rule for BPE vocabularies on
/// code and English).
pub fn estimate_tokens(text: &str) -> usize {
    text.len().div_ceil(4)
}

/// One piece of context.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Piece {
    pub path: String,
    pub start_line: u32,
    pub end_line: u32,
    pub score: f32,
    pub tokens: usize,
    pub text: String,
}

/// The assembled context.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Context {
    pub symbol_map: Option<String>,
    pub pieces: Vec<Piece>,
    pub tokens: usize,
    pub budget: usize,
}

impl Context {
    /// The context as one text: the symbol map, then each piece under `path:start-end`.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Some(m) = &self.symbol_map {
            out.push_str(m);
            out.push('\n');
        }
        for p in &self.pieces {
            out.push_str(&format!(
                "--- {}:{}-{}\n{}\n",
                p.path, p.start_line, p.end_line, p.text
            ));
        }
        out
    }
}

/// The body lines of a hit (a split unit's chunk starts with its header, which is not part of
/// its line range).
fn body_lines(h: &Hit) -> Vec<&str> {
    let lines: Vec<&str> = h.text.split('\n').collect();
    let n = (h.end_line - h.start_line + 1) as usize;
    lines[lines.len().saturating_sub(n)..].to_vec()
}

/// Assembles a context from hits (best first).
pub fn assemble(hits: &[Hit], budget: usize, with_symbols: bool) -> Context {
    // Drop repeated texts (the same chunk in two files).
    let mut seen = HashSet::new();
    let hits: Vec<&Hit> = hits
        .iter()
        .filter(|h| seen.insert(h.chunk_id.clone()))
        .collect();
    // Merge ranges per file: line -> text, and the best score of each merged range.
    let mut by_file: BTreeMap<&str, Vec<&Hit>> = BTreeMap::new();
    for h in &hits {
        by_file.entry(h.path.as_str()).or_default().push(h);
    }
    let mut pieces = Vec::new();
    for (path, mut hs) in by_file {
        hs.sort_by_key(|h| h.start_line);
        let mut cur: Option<(u32, u32, f32, BTreeMap<u32, String>)> = None;
        for h in hs {
            let lines = body_lines(h);
            let take = |m: &mut BTreeMap<u32, String>| {
                for (i, l) in lines.iter().enumerate() {
                    m.entry(h.start_line + i as u32)
                        .or_insert_with(|| l.to_string());
                }
            };
            match &mut cur {
                Some((_, e, s, m)) if h.start_line <= *e + 1 => {
                    *e = (*e).max(h.end_line);
                    *s = s.max(h.score);
                    take(m);
                }
                _ => {
                    if let Some(c) = cur.take() {
                        pieces.push(make_piece(path, c));
                    }
                    let mut m = BTreeMap::new();
                    take(&mut m);
                    cur = Some((h.start_line, h.end_line, h.score, m));
                }
            }
        }
        if let Some(c) = cur.take() {
            pieces.push(make_piece(path, c));
        }
    }
    let mut used = 0;
    let symbol_map = if with_symbols {
        let mut lines = vec!["Relevant symbols:".to_string()];
        let mut seen = HashSet::new();
        for h in &hits {
            if let Some(s) = &h.symbol {
                if seen.insert((h.path.clone(), s.clone())) {
                    lines.push(format!(
                        "  {}:{} {} {}",
                        h.path,
                        h.start_line,
                        h.kind.as_str(),
                        s
                    ));
                }
            }
        }
        let mut text = String::new();
        for l in lines {
            // The map takes at most a tenth of the budget.
            if estimate_tokens(&text) + estimate_tokens(&l) + 1 > budget / 10 {
                break;
            }
            text.push_str(&l);
            text.push('\n');
        }
        if text.contains('\n') && text.lines().count() > 1 {
            used += estimate_tokens(&text);
            Some(text)
        } else {
            None
        }
    } else {
        None
    };
    // Pack by score per token.
    pieces.sort_by(|a, b| (b.score / b.tokens as f32).total_cmp(&(a.score / a.tokens as f32)));
    let mut chosen = Vec::new();
    for p in pieces {
        if used + p.tokens <= budget {
            used += p.tokens;
            chosen.push(p);
        }
    }
    chosen.sort_by(|a, b| b.score.total_cmp(&a.score));
    Context {
        symbol_map,
        pieces: chosen,
        tokens: used,
        budget,
    }
}

fn make_piece(path: &str, (s, e, score, m): (u32, u32, f32, BTreeMap<u32, String>)) -> Piece {
    let text = (s..=e)
        .map(|l| m.get(&l).map(String::as_str).unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    // The header line `--- path:s-e` counts too.
    let tokens = estimate_tokens(&text) + estimate_tokens(path) + 4;
    Piece {
        path: path.to_string(),
        start_line: s,
        end_line: e,
        score,
        tokens,
        text,
    }
}
