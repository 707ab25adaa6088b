//! Secret redaction: every file's text passes through here before it is chunked, stored,
//! indexed or embedded. Secrets become `[REDACTED:<kind>]` (line structure kept) and each one
//! is reported by path, line and kind; the value is never kept anywhere.

use std::sync::OnceLock;

use regex::Regex;
use serde::{Deserialize, Serialize};

/// One redacted secret: where and what kind, never the value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Redaction {
    pub path: String,
    pub line: u32,
    pub kind: String,
}

struct Rule {
    kind: &'static str,
    re: Regex,
    /// The capture group holding the secret (0 = the whole match).
    group: usize,
    /// For assignments: the value must look random.
    entropy: bool,
}

fn rules() -> &'static [Rule] {
    static RULES: OnceLock<Vec<Rule>> = OnceLock::new();
    RULES.get_or_init(|| {
        let r = |kind, pat: &str, group, entropy| Rule {
            kind,
            re: Regex::new(pat).unwrap_or_else(|e| panic!("redaction rule {kind}: {e}")),
            group,
            entropy,
        };
        vec![
            r(
                "private_key",
                r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY( BLOCK)?-----[\s\S]*?-----END [A-Z0-9 ]*PRIVATE KEY( BLOCK)?-----",
                0,
                false,
            ),
            r("aws_access_key_id", r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA)[0-9A-Z]{16}\b", 0, false),
            r("github_token", r"\bgh[pousr]_[A-Za-z0-9]{36,255}\b", 0, false),
            r("github_token", r"\bgithub_pat_[A-Za-z0-9_]{40,255}\b", 0, false),
            r("gitlab_token", r"\bglpat-[A-Za-z0-9_-]{20,}\b", 0, false),
            r("slack_token", r"\bxox[abposr]-[A-Za-z0-9-]{10,}\b", 0, false),
            r("api_key", r"\bsk-(?:ant-|proj-)?[A-Za-z0-9_-]{20,}\b", 0, false),
            r("google_api_key", r"\bAIza[0-9A-Za-z_-]{35}\b", 0, false),
            r("stripe_key", r"\b(?:sk|rk|pk)_live_[0-9A-Za-z]{20,}\b", 0, false),
            r("kiln_api_key", r"\bkiln_[A-Za-z0-9]{8,}_[A-Za-z0-9_-]{16,}\b", 0, false),
            r("jwt", r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}", 0, false),
            r("url_password", r"\b[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]+:([^/\s@]+)@", 1, false),
            r(
                "secret_assignment",
                r#"(?i)[A-Za-z0-9_.-]*(?:secret|token|passwd|password|pwd|api_?key|apikey|access_?key|private_?key|credential|auth)[A-Za-z0-9_]*["']?\s*(?::=|=|:)\s*["']([^\s"']{12,})["']?"#,
                1,
                true,
            ),
            r(
                "secret_assignment",
                r#"(?i)\b[A-Z0-9_]*(?:SECRET|TOKEN|PASSWORD|PASSWD|API_?KEY|ACCESS_?KEY)[A-Z0-9_]*\s*=\s*([^\s"'#]{12,})"#,
                1,
                true,
            ),
        ]
    })
}

/// Shannon entropy in bits per character.
fn entropy(s: &str) -> f64 {
    let mut counts = [0u32; 256];
    for b in s.bytes() {
        counts[b as usize] += 1;
    }
    let n = s.len() as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / n;
            -p * p.log2()
        })
        .sum()
}

/// A value that reads like code rather than a literal secret (a call, a path, an env lookup).
fn looks_like_code(v: &str) -> bool {
    v.contains('(')
        || v.contains('[')
        || v.starts_with('$')
        || v.starts_with("os.")
        || v.starts_with("process.")
        || v.starts_with("self.")
        || v.starts_with('<')
        || v.starts_with("{{")
        || v.contains("REDACTED")
}

/// Redacts `text` (the content of `path`): returns the new text and what was redacted.
pub fn redact(path: &str, text: &str) -> (String, Vec<Redaction>) {
    // Collect byte ranges to replace, then apply them from the end.
    let mut spans: Vec<(usize, usize, &'static str)> = Vec::new();
    for rule in rules() {
        for caps in rule.re.captures_iter(text) {
            let Some(m) = caps.get(rule.group) else {
                continue;
            };
            if rule.entropy {
                let v = m.as_str();
                if looks_like_code(v) || entropy(v) < 3.0 {
                    continue;
                }
            }
            if spans.iter().any(|&(s, e, _)| m.start() < e && s < m.end()) {
                continue;
            }
            spans.push((m.start(), m.end(), rule.kind));
        }
    }
    if spans.is_empty() {
        return (text.to_string(), Vec::new());
    }
    spans.sort_by_key(|s| s.0);
    let mut out = String::with_capacity(text.len());
    let mut report = Vec::new();
    let mut at = 0;
    for (s, e, kind) in spans {
        out.push_str(&text[at..s]);
        let line = text[..s].bytes().filter(|&b| b == b'\n').count() as u32 + 1;
        out.push_str("[REDACTED:");
        out.push_str(kind);
        out.push(']');
        // Keep the line structure: a multi-line secret leaves its newlines behind.
        for _ in text[s..e].bytes().filter(|&b| b == b'\n') {
            out.push('\n');
        }
        report.push(Redaction {
            path: path.to_string(),
            line,
            kind: kind.to_string(),
        });
        at = e;
    }
    out.push_str(&text[at..]);
    (out, report)
}
