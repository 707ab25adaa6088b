//! Secret redaction: the report, what is left alone, and planted secrets that must not appear
//! in any stored file or answer.

use std::path::Path;
use std::time::Duration;

use expect_test::expect;
use kiln_knowledge::redact::redact;
use kiln_knowledge::{EmbedConfig, Engine, SearchParams};

use crate::util::{model_dir, write};

const AWS: &str = "AKIAQWERTYUIOPASDFGH";
const GH: &str = "ghp_Zx9Qw8Er7Ty6Ui5Op4As3Df2Gh1Jk0LmNbVc";
const PEM_BODY: &str = "MIIEowIBAAKCAQEAu7RyZbXk9wQhLmPz3sVnT2aFgHjKlQwErTyUiOpAsDfGhJkLz";
const URL_PW: &str = "S3cr3tP4ssw0rdXyz";
const ASSIGNED: &str = "q8Zr4Lm2Vx9Tb7Nk3Pw6";
const OPENAI: &str = "sk-proj-Ab12Cd34Ef56Gh78Ij90KlMnOpQr";

fn planted() -> String {
    format!(
        r#"import os

AWS_ACCESS_KEY_ID = "{AWS}"
GITHUB = "{GH}"
DATABASE_URL = "postgres://admin:{URL_PW}@db.example.com/app"
api_secret = "{ASSIGNED}"
OPENAI_KEY = "{OPENAI}"
KEY = """-----BEGIN RSA PRIVATE KEY-----
{PEM_BODY}
-----END RSA PRIVATE KEY-----"""

def connect():
    password = os.environ["DB_PASSWORD"]
    token_count = 5
    return password
"#
    )
}

#[test]
fn report_names_path_line_kind_and_keeps_lines() {
    let text = planted();
    let (clean, report) = redact("settings.py", &text);
    assert_eq!(
        clean.lines().count(),
        text.lines().count(),
        "line structure kept"
    );
    let rendered: String = report
        .iter()
        .map(|r| format!("{}:{} {}\n", r.path, r.line, r.kind))
        .collect();
    expect![[r#"
        settings.py:3 aws_access_key_id
        settings.py:4 github_token
        settings.py:5 url_password
        settings.py:6 secret_assignment
        settings.py:7 api_key
        settings.py:8 private_key
    "#]]
    .assert_eq(&rendered);
    for s in [AWS, GH, PEM_BODY, URL_PW, ASSIGNED, OPENAI] {
        assert!(!clean.contains(s), "{s} left in the text");
    }
    // Code that reads secrets is not a secret.
    assert!(clean.contains(r#"password = os.environ["DB_PASSWORD"]"#));
    assert!(clean.contains("token_count = 5"));
}

#[test]
fn low_entropy_and_code_assignments_are_kept() {
    let text =
        "password = get_password()\nTOKEN_TYPE = \"bearer\"\nsecret_name = \"aaaaaaaaaaaaaaaa\"\n";
    let (clean, report) = redact("a.py", text);
    assert!(report.is_empty(), "{report:?}");
    assert_eq!(clean, text);
}

/// Every file under `dir`, read as bytes, must not contain any of `needles` (case-insensitive,
/// since the BM25 terms are lowercased).
fn grep_dir(dir: &Path, needles: &[&str]) {
    for entry in walk(dir) {
        let bytes = std::fs::read(&entry).unwrap_or_default();
        let hay = String::from_utf8_lossy(&bytes).to_lowercase();
        for n in needles {
            assert!(
                !hay.contains(&n.to_lowercase()),
                "secret {n} found in {}",
                entry.display()
            );
        }
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn planted_secrets_never_reach_the_data_dir_or_answers() {
    let src = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    write(src.path(), "settings.py", &planted());
    write(
        src.path(),
        "docs/deploy.md",
        &format!("# Deploy\n\nUse the key {AWS} and {GH}.\n"),
    );
    let engine = Engine::new(data.path(), &model_dir()).unwrap();
    engine
        .create(
            "acme",
            "app",
            kiln_knowledge::engine::Source::Path {
                path: src.path().display().to_string(),
            },
            EmbedConfig::Local,
        )
        .unwrap();
    let report = engine.sync("acme", "app", &|_| {}).unwrap();
    assert_eq!(report.redactions, 8);
    engine
        .wait_embedded("acme", "app", Duration::from_secs(120))
        .unwrap();
    let needles = [
        AWS,
        GH,
        PEM_BODY,
        URL_PW,
        ASSIGNED,
        OPENAI,
        &PEM_BODY[..20],
        &GH[4..24],
    ];
    let mut answers = String::new();
    for q in [
        "aws access key",
        "github token",
        "database url password",
        "private key",
        "api_secret",
        AWS,
    ] {
        let hits = engine
            .search("acme", "app", &SearchParams::new(q, 10))
            .unwrap();
        assert!(!hits.is_empty());
        answers.push_str(&serde_json::to_string(&hits).unwrap());
        answers.push_str(
            &serde_json::to_string(&engine.context("acme", "app", q, 2000, true).unwrap()).unwrap(),
        );
    }
    let stats = engine.stats("acme", "app").unwrap();
    answers.push_str(&serde_json::to_string(&stats).unwrap());
    assert_eq!(stats.redactions.len(), 8);
    assert!(answers.contains("[REDACTED:aws_access_key_id]"));
    for n in needles {
        assert!(!answers.contains(n), "secret {n} in an answer");
    }
    drop(engine);
    grep_dir(data.path(), &needles);
}
