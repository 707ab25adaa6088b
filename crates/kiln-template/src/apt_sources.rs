//! Finds the host's configured Debian mirror by reading its apt sources
//! (`/etc/apt/sources.list`, `sources.list.d/*.list` one-line format and `*.sources` deb822).
//!
//! Kiln never hard-codes a mirror host: the base image is bootstrapped from whatever archive
//! the host itself installs packages from.

use std::path::Path;

/// One `deb` source entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AptSource {
    pub uri: String,
    pub suites: Vec<String>,
    pub components: Vec<String>,
}

/// Parses a one-line-format file (`deb [opts] URI SUITE COMPONENT...`).
pub fn parse_list(text: &str) -> Vec<AptSource> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let mut words = line.split_whitespace().peekable();
        if words.next() != Some("deb") {
            continue;
        }
        // Options: `[arch=amd64 signed-by=...]`, possibly spread over several words.
        if words.peek().is_some_and(|w| w.starts_with('[')) {
            for w in words.by_ref() {
                if w.ends_with(']') {
                    break;
                }
            }
        }
        let (Some(uri), Some(suite)) = (words.next(), words.next()) else {
            continue;
        };
        out.push(AptSource {
            uri: uri.to_string(),
            suites: vec![suite.to_string()],
            components: words.map(str::to_string).collect(),
        });
    }
    out
}

/// Parses a deb822 `.sources` file (paragraphs of `Field: value`).
pub fn parse_deb822(text: &str) -> Vec<AptSource> {
    let mut out = Vec::new();
    for para in text.split("\n\n") {
        let mut types = Vec::new();
        let mut uris = Vec::new();
        let mut suites = Vec::new();
        let mut comps = Vec::new();
        let mut enabled = true;
        for line in para.lines() {
            if line.starts_with('#') {
                continue;
            }
            let Some((k, v)) = line.split_once(':') else {
                continue;
            };
            let vals = v.split_whitespace().map(str::to_string).collect::<Vec<_>>();
            match k.trim().to_ascii_lowercase().as_str() {
                "types" => types = vals,
                "uris" => uris = vals,
                "suites" => suites = vals,
                "components" => comps = vals,
                "enabled" => enabled = !v.trim().eq_ignore_ascii_case("no"),
                _ => {}
            }
        }
        if !enabled || !types.iter().any(|t| t == "deb") {
            continue;
        }
        for uri in uris {
            out.push(AptSource {
                uri,
                suites: suites.clone(),
                components: comps.clone(),
            });
        }
    }
    out
}

/// Reads every apt source file under `root` (normally `/etc/apt`).
pub fn read_sources(root: &Path) -> Vec<AptSource> {
    let mut out = Vec::new();
    if let Ok(t) = std::fs::read_to_string(root.join("sources.list")) {
        out.extend(parse_list(&t));
    }
    let mut files: Vec<_> = std::fs::read_dir(root.join("sources.list.d"))
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    for f in files {
        let Ok(t) = std::fs::read_to_string(&f) else {
            continue;
        };
        match f.extension().and_then(|e| e.to_str()) {
            Some("list") => out.extend(parse_list(&t)),
            Some("sources") => out.extend(parse_deb822(&t)),
            _ => {}
        }
    }
    out
}

/// Picks the mirror for `suite`: an entry carrying that exact suite with the `main`
/// component, not a security archive; among those, one whose path ends in `/debian`
/// (the conventional archive root) wins over third-party archives.
pub fn pick_mirror(sources: &[AptSource], suite: &str) -> Option<String> {
    let candidates = sources.iter().filter(|s| {
        s.suites.iter().any(|x| x == suite)
            && s.components.iter().any(|c| c == "main")
            && !s.uri.contains("security")
            && (s.uri.starts_with("http://")
                || s.uri.starts_with("https://")
                || s.uri.starts_with("file:/"))
    });
    let mut best: Option<(&AptSource, u8)> = None;
    for s in candidates {
        let score = if s.uri.trim_end_matches('/').ends_with("/debian") {
            2
        } else {
            1
        };
        if best.is_none_or(|(_, b)| score > b) {
            best = Some((s, score));
        }
    }
    best.map(|(s, _)| s.uri.trim_end_matches('/').to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use expect_test::expect;

    #[test]
    fn picks_debian_archive_from_mixed_sources() {
        let deb822 = "Types: deb\n# comment\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\nTypes: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\nComponents: main\n";
        let list = "deb [arch=amd64 signed-by=/k.gpg] https://third.example/apt bookworm main\n# deb http://old.example/debian bookworm main\ndeb https://nodes.example/node_20.x nodistro main\n";
        let mut s = parse_list(list);
        s.extend(parse_deb822(deb822));
        expect![[r#"
            [
                AptSource {
                    uri: "https://third.example/apt",
                    suites: [
                        "bookworm",
                    ],
                    components: [
                        "main",
                    ],
                },
                AptSource {
                    uri: "https://nodes.example/node_20.x",
                    suites: [
                        "nodistro",
                    ],
                    components: [
                        "main",
                    ],
                },
                AptSource {
                    uri: "http://mirror.example/debian",
                    suites: [
                        "bookworm",
                        "bookworm-updates",
                    ],
                    components: [
                        "main",
                    ],
                },
                AptSource {
                    uri: "http://mirror.example/debian-security",
                    suites: [
                        "bookworm-security",
                    ],
                    components: [
                        "main",
                    ],
                },
            ]
        "#]]
        .assert_debug_eq(&s);
        assert_eq!(
            pick_mirror(&s, "bookworm").as_deref(),
            Some("http://mirror.example/debian")
        );
        assert_eq!(pick_mirror(&s, "trixie"), None);
    }

    #[test]
    fn disabled_paragraphs_are_ignored() {
        let s = parse_deb822(
            "Types: deb\nURIs: http://a/debian\nSuites: bookworm\nComponents: main\nEnabled: no\n",
        );
        assert!(s.is_empty());
    }
}
