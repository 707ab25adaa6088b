//! Code-aware chunking: tree-sitter units (functions, methods, classes, impls) for Python,
//! TypeScript/JavaScript and Rust, Markdown by heading, line windows with overlap otherwise.
//! Oversized units are split with their header line(s) kept; small neighbours are merged.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::lang::Language;

/// What a chunk holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SymbolKind {
    Function,
    Method,
    Class,
    Impl,
    Trait,
    Type,
    Module,
    Section,
    Code,
    Lines,
}

impl SymbolKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SymbolKind::Function => "function",
            SymbolKind::Method => "method",
            SymbolKind::Class => "class",
            SymbolKind::Impl => "impl",
            SymbolKind::Trait => "trait",
            SymbolKind::Type => "type",
            SymbolKind::Module => "module",
            SymbolKind::Section => "section",
            SymbolKind::Code => "code",
            SymbolKind::Lines => "lines",
        }
    }

    pub fn parse(s: &str) -> Option<SymbolKind> {
        Some(match s {
            "function" => SymbolKind::Function,
            "method" => SymbolKind::Method,
            "class" => SymbolKind::Class,
            "impl" => SymbolKind::Impl,
            "trait" => SymbolKind::Trait,
            "type" => SymbolKind::Type,
            "module" => SymbolKind::Module,
            "section" => SymbolKind::Section,
            "code" => SymbolKind::Code,
            "lines" => SymbolKind::Lines,
            _ => return None,
        })
    }
}

/// One chunk: a line range of a file (1-based, inclusive) with the text indexed for it. `text`
/// starts with the enclosing unit's header when the chunk is a piece of a split unit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Chunk {
    pub id: String,
    pub path: String,
    pub start_line: u32,
    pub end_line: u32,
    pub language: Language,
    pub symbol: Option<String>,
    pub kind: SymbolKind,
    pub text: String,
}

/// Chunk id: the hash of its text (hex, 128 bits).
pub fn chunk_id(text: &str) -> String {
    let d = Sha256::digest(text.as_bytes());
    hex::encode(&d[..16])
}

/// Size limits of chunks.
#[derive(Debug, Clone, Copy)]
pub struct ChunkLimits {
    /// A unit above this many characters is split.
    pub max_chars: usize,
    /// And above this many lines.
    pub max_lines: usize,
    /// Neighbours below this many characters are merged (up to `max_chars`).
    pub min_chars: usize,
    /// Window and overlap (lines) of plain-text chunks.
    pub window: usize,
    pub overlap: usize,
}

impl Default for ChunkLimits {
    fn default() -> Self {
        ChunkLimits {
            max_chars: 1500,
            max_lines: 60,
            min_chars: 250,
            window: 40,
            overlap: 8,
        }
    }
}

/// A piece before it becomes a chunk: a row range (0-based, inclusive) and an optional header.
#[derive(Debug, Clone)]
struct Piece {
    start: usize,
    end: usize,
    header: Option<(usize, usize)>,
    symbol: Option<String>,
    kind: SymbolKind,
}

/// A syntactic unit found by tree-sitter.
#[derive(Debug)]
struct Unit {
    start: usize,
    end: usize,
    /// Last row of the header (where the body starts), for containers.
    header_end: usize,
    symbol: Option<String>,
    kind: SymbolKind,
    children: Vec<Unit>,
}

/// Splits a file into chunks.
pub fn chunk_file(path: &str, language: Language, text: &str, limits: &ChunkLimits) -> Vec<Chunk> {
    let lines: Vec<&str> = text.split('\n').collect();
    let mut nrows = lines.len();
    if nrows > 0 && lines[nrows - 1].is_empty() {
        nrows -= 1;
    }
    if nrows == 0 {
        return Vec::new();
    }
    let pieces = match language {
        Language::Python
        | Language::Rust
        | Language::TypeScript
        | Language::Tsx
        | Language::JavaScript => match parse_units(language, text) {
            Some(units) => {
                let mut out = Vec::new();
                emit_region(&units, 0, nrows - 1, None, &lines, limits, &mut out);
                out
            }
            None => windows(0, nrows - 1, None, None, SymbolKind::Lines, limits),
        },
        Language::Markdown => markdown(&lines[..nrows], limits),
        Language::Text => windows(0, nrows - 1, None, None, SymbolKind::Lines, limits),
    };
    let pieces = merge_small(pieces, &lines, limits, language);
    pieces
        .into_iter()
        .filter_map(|p| {
            let body = lines[p.start..=p.end].join("\n");
            if body.trim().is_empty() {
                return None;
            }
            let text = match p.header {
                Some((hs, he)) => format!("{}\n{}", lines[hs..=he].join("\n"), body),
                None => body,
            };
            Some(Chunk {
                id: chunk_id(&text),
                path: path.to_string(),
                start_line: p.start as u32 + 1,
                end_line: p.end as u32 + 1,
                language,
                symbol: p.symbol,
                kind: p.kind,
                text,
            })
        })
        .collect()
}

fn ts_language(language: Language) -> tree_sitter::Language {
    match language {
        Language::Python => tree_sitter_python::LANGUAGE.into(),
        Language::Rust => tree_sitter_rust::LANGUAGE.into(),
        Language::TypeScript => tree_sitter_typescript::LANGUAGE_TYPESCRIPT.into(),
        Language::Tsx => tree_sitter_typescript::LANGUAGE_TSX.into(),
        _ => tree_sitter_javascript::LANGUAGE.into(),
    }
}

fn parse_units(language: Language, text: &str) -> Option<Vec<Unit>> {
    let mut parser = tree_sitter::Parser::new();
    parser.set_language(&ts_language(language)).ok()?;
    let tree = parser.parse(text, None)?;
    let mut out = Vec::new();
    collect_units(tree.root_node(), text, language, None, &mut out);
    Some(out)
}

fn node_name(node: tree_sitter::Node, text: &str) -> Option<String> {
    let n = node.child_by_field_name("name")?;
    n.utf8_text(text.as_bytes()).ok().map(str::to_string)
}

/// Classifies a node: its kind, name and the body node holding nested units (for containers).
fn classify<'t>(
    node: tree_sitter::Node<'t>,
    text: &str,
    language: Language,
    in_container: bool,
) -> Option<(SymbolKind, Option<String>, Option<tree_sitter::Node<'t>>)> {
    let fn_kind = if in_container {
        SymbolKind::Method
    } else {
        SymbolKind::Function
    };
    let k = node.kind();
    match language {
        Language::Python => match k {
            "function_definition" => Some((fn_kind, node_name(node, text), None)),
            "class_definition" => Some((
                SymbolKind::Class,
                node_name(node, text),
                node.child_by_field_name("body"),
            )),
            "decorated_definition" => {
                let def = node.child_by_field_name("definition")?;
                let (kind, name, body) = classify(def, text, language, in_container)?;
                Some((kind, name, body))
            }
            _ => None,
        },
        Language::Rust => match k {
            "function_item" | "function_signature_item" => {
                Some((fn_kind, node_name(node, text), None))
            }
            "impl_item" => {
                let ty = node
                    .child_by_field_name("type")
                    .and_then(|t| t.utf8_text(text.as_bytes()).ok());
                let tr = node
                    .child_by_field_name("trait")
                    .and_then(|t| t.utf8_text(text.as_bytes()).ok());
                let name = match (tr, ty) {
                    (Some(tr), Some(ty)) => Some(format!("{tr} for {ty}")),
                    (None, Some(ty)) => Some(ty.to_string()),
                    _ => None,
                };
                Some((SymbolKind::Impl, name, node.child_by_field_name("body")))
            }
            "trait_item" => Some((
                SymbolKind::Trait,
                node_name(node, text),
                node.child_by_field_name("body"),
            )),
            "struct_item" | "enum_item" | "union_item" | "type_item" => {
                Some((SymbolKind::Type, node_name(node, text), None))
            }
            "mod_item" => {
                let body = node.child_by_field_name("body")?;
                Some((SymbolKind::Module, node_name(node, text), Some(body)))
            }
            "macro_definition" => Some((SymbolKind::Function, node_name(node, text), None)),
            _ => None,
        },
        _ => match k {
            "function_declaration" | "generator_function_declaration" => {
                Some((SymbolKind::Function, node_name(node, text), None))
            }
            "method_definition" | "abstract_method_signature" | "method_signature" => {
                Some((SymbolKind::Method, node_name(node, text), None))
            }
            "class_declaration" | "abstract_class_declaration" | "class" => Some((
                SymbolKind::Class,
                node_name(node, text),
                node.child_by_field_name("body"),
            )),
            "interface_declaration" => Some((
                SymbolKind::Trait,
                node_name(node, text),
                node.child_by_field_name("body"),
            )),
            "type_alias_declaration" | "enum_declaration" => {
                Some((SymbolKind::Type, node_name(node, text), None))
            }
            "internal_module" | "module" => Some((
                SymbolKind::Module,
                node_name(node, text),
                node.child_by_field_name("body"),
            )),
            "export_statement" => {
                let decl = node.child_by_field_name("declaration")?;
                classify(decl, text, language, in_container)
            }
            "lexical_declaration" | "variable_declaration" => {
                // `const f = (..) => ..` / `= function ..`: a function named by its variable.
                let mut cur = node.walk();
                let decl = node
                    .named_children(&mut cur)
                    .find(|c| c.kind() == "variable_declarator")?;
                let value = decl.child_by_field_name("value")?;
                if matches!(
                    value.kind(),
                    "arrow_function" | "function_expression" | "function"
                ) {
                    Some((SymbolKind::Function, node_name(decl, text), None))
                } else if value.kind() == "class" {
                    Some((
                        SymbolKind::Class,
                        node_name(decl, text),
                        value.child_by_field_name("body"),
                    ))
                } else {
                    None
                }
            }
            _ => None,
        },
    }
}

fn collect_units(
    node: tree_sitter::Node,
    text: &str,
    language: Language,
    container: Option<&str>,
    out: &mut Vec<Unit>,
) {
    let mut cur = node.walk();
    for child in node.named_children(&mut cur) {
        if let Some((kind, name, body)) = classify(child, text, language, container.is_some()) {
            let symbol = match (container, name) {
                (Some(c), Some(n)) if matches!(kind, SymbolKind::Method) => {
                    Some(format!("{c}.{n}"))
                }
                (_, n) => n,
            };
            let mut children = Vec::new();
            let mut header_end = child.start_position().row;
            if let Some(body) = body {
                header_end = body.start_position().row.max(child.start_position().row);
                let cname = symbol.clone().unwrap_or_default();
                collect_units(body, text, language, Some(&cname), &mut children);
                if let Some(first) = children.first() {
                    header_end = header_end
                        .min(first.start.saturating_sub(1))
                        .max(child.start_position().row);
                }
            }
            out.push(Unit {
                start: child.start_position().row,
                end: child.end_position().row,
                header_end,
                symbol,
                kind,
                children,
            });
        }
    }
}

fn region_chars(lines: &[&str], start: usize, end: usize) -> usize {
    lines[start..=end].iter().map(|l| l.len() + 1).sum()
}

fn too_big(lines: &[&str], start: usize, end: usize, limits: &ChunkLimits) -> bool {
    end + 1 - start > limits.max_lines || region_chars(lines, start, end) > limits.max_chars
}

/// Emits pieces for the rows `start..=end` holding `units` (sorted, non-overlapping), with the
/// gaps between units as `Code` pieces.
fn emit_region(
    units: &[Unit],
    start: usize,
    end: usize,
    header: Option<(usize, usize)>,
    lines: &[&str],
    limits: &ChunkLimits,
    out: &mut Vec<Piece>,
) {
    let mut row = start;
    for u in units {
        let us = u.start.max(row);
        if us > end {
            break;
        }
        let ue = u.end.min(end);
        if us > row {
            gap(row, us - 1, header, lines, limits, out);
        }
        emit_unit(u, us, ue, header, lines, limits, out);
        row = ue + 1;
    }
    if row <= end {
        gap(row, end, header, lines, limits, out);
    }
}

fn gap(
    start: usize,
    end: usize,
    header: Option<(usize, usize)>,
    lines: &[&str],
    limits: &ChunkLimits,
    out: &mut Vec<Piece>,
) {
    // Trim blank rows at both ends; an all-blank gap yields nothing.
    let mut s = start;
    let mut e = end;
    while s <= e && lines[s].trim().is_empty() {
        s += 1;
    }
    while e > s && lines[e].trim().is_empty() {
        e -= 1;
    }
    if s > e {
        return;
    }
    out.extend(windows(s, e, header, None, SymbolKind::Code, limits));
}

fn emit_unit(
    u: &Unit,
    start: usize,
    end: usize,
    header: Option<(usize, usize)>,
    lines: &[&str],
    limits: &ChunkLimits,
    out: &mut Vec<Piece>,
) {
    if !too_big(lines, start, end, limits) {
        out.push(Piece {
            start,
            end,
            header,
            symbol: u.symbol.clone(),
            kind: u.kind,
        });
        return;
    }
    // The header of this unit: from its first row to where its body starts (at most 4 rows).
    let he = u.header_end.clamp(start, (start + 3).min(end));
    let own_header = Some((start, he));
    if !u.children.is_empty() {
        // The header rows form the first piece's start; the rest is split by children.
        let body_start = he + 1;
        out.push(Piece {
            start,
            end: he,
            header,
            symbol: u.symbol.clone(),
            kind: u.kind,
        });
        if body_start <= end {
            emit_region(&u.children, body_start, end, own_header, lines, limits, out);
        }
        return;
    }
    // A leaf that is too big: windows, each after the first led by the header.
    let mut first = true;
    for mut p in windows(start, end, None, u.symbol.clone(), u.kind, limits) {
        if !first {
            p.header = own_header;
        }
        first = false;
        p.header = p.header.or(header);
        out.push(p);
    }
}

/// Line windows over `start..=end`, each at most `window` rows and `max_chars`, overlapping by
/// `overlap` rows.
fn windows(
    start: usize,
    end: usize,
    header: Option<(usize, usize)>,
    symbol: Option<String>,
    kind: SymbolKind,
    limits: &ChunkLimits,
) -> Vec<Piece> {
    let mut out = Vec::new();
    let win = if kind == SymbolKind::Lines {
        limits.window
    } else {
        limits.max_lines
    };
    let mut s = start;
    loop {
        let e = (s + win - 1).min(end);
        out.push(Piece {
            start: s,
            end: e,
            header,
            symbol: symbol.clone(),
            kind,
        });
        if e >= end {
            break;
        }
        let overlap = if kind == SymbolKind::Lines {
            limits.overlap
        } else {
            0
        };
        s = (e + 1).saturating_sub(overlap).max(s + 1);
    }
    out
}

fn markdown(lines: &[&str], limits: &ChunkLimits) -> Vec<Piece> {
    let mut heads: Vec<(usize, String)> = Vec::new();
    let mut fence = false;
    for (i, l) in lines.iter().enumerate() {
        let t = l.trim_start();
        if t.starts_with("```") || t.starts_with("~~~") {
            fence = !fence;
            continue;
        }
        if !fence && t.starts_with('#') {
            let title = t.trim_start_matches('#');
            if title.is_empty() || title.starts_with(' ') {
                heads.push((i, title.trim().to_string()));
            }
        }
    }
    let mut out = Vec::new();
    let end = lines.len() - 1;
    let first = heads.first().map(|h| h.0).unwrap_or(end + 1);
    if first > 0 {
        let e = first - 1;
        if lines[..=e].iter().any(|l| !l.trim().is_empty()) {
            out.extend(windows(0, e, None, None, SymbolKind::Section, limits));
        }
    }
    for (n, (row, title)) in heads.iter().enumerate() {
        let e = heads.get(n + 1).map(|h| h.0 - 1).unwrap_or(end);
        let mut ps = windows(
            *row,
            e,
            None,
            Some(title.clone()),
            SymbolKind::Section,
            limits,
        );
        for p in ps.iter_mut().skip(1) {
            p.header = Some((*row, *row));
        }
        out.extend(ps);
    }
    out
}

/// Merges runs of adjacent small pieces that share a header, up to the size limit.
fn merge_small(
    pieces: Vec<Piece>,
    lines: &[&str],
    limits: &ChunkLimits,
    language: Language,
) -> Vec<Piece> {
    let mut out: Vec<Piece> = Vec::new();
    for p in pieces {
        if let Some(last) = out.last_mut() {
            let adjacent = p.start <= last.end + 2 && p.start > last.end;
            let small = region_chars(lines, last.start, last.end) < limits.min_chars
                || region_chars(lines, p.start, p.end) < limits.min_chars;
            let fits = !too_big(lines, last.start, p.end, limits);
            let same_ctx = last.header == p.header;
            // Markdown sections merge only into a preceding small section of the same file.
            let mergeable = language != Language::Text && p.kind != SymbolKind::Lines;
            if adjacent && small && fits && same_ctx && mergeable {
                last.end = p.end;
                last.symbol = match (last.symbol.take(), p.symbol) {
                    (Some(a), Some(b)) => Some(format!("{a}, {b}")),
                    (a, b) => a.or(b),
                };
                if last.kind == SymbolKind::Code {
                    last.kind = p.kind;
                }
                continue;
            }
        }
        out.push(p);
    }
    out
}
