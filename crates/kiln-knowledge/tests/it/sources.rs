//! Sources and privacy: the generic walker agrees with the host walker, git sources against a
//! real git server on loopback (create, sync after commits, renames and deletes, erasure of
//! the clone), the URL policy, and encryption at rest (a planted word is nowhere in the data
//! directory, while the same index unencrypted shows it).

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use expect_test::expect;
use kiln_knowledge::git::testing::{git_in, GitDaemon};
use kiln_knowledge::git::{check_url, GitPolicy};
use kiln_knowledge::seal::MasterKey;
use kiln_knowledge::search::Mode;
use kiln_knowledge::source::{LocalTree, Tree};
use kiln_knowledge::walk::{walk_tree, WalkOptions};
use kiln_knowledge::{CreateOptions, EmbedConfig, Engine, Error, SearchParams, Source};

use crate::util::{embedding_server, model_dir, write};

fn bm25(q: &str) -> SearchParams {
    SearchParams {
        mode: Mode::Bm25,
        ..SearchParams::new(q, 10)
    }
}

fn hit_paths(e: &Engine, org: &str, name: &str, q: &str) -> Vec<String> {
    let mut p: Vec<String> = e
        .search(org, name, &bm25(q))
        .unwrap()
        .into_iter()
        .map(|h| h.path)
        .collect();
    p.sort();
    p.dedup();
    p
}

#[test]
fn tree_walker_applies_the_same_rules_as_the_host_walker() {
    let src = tempfile::tempdir().unwrap();
    let r = src.path();
    write(r, "a.py", "def a(): pass\n");
    write(r, ".gitignore", "*.log\nbuild_out/\n!keep.log\n");
    write(r, "keep.log", "kept\n");
    write(r, "drop.log", "dropped\n");
    write(r, "build_out/x.py", "x = 1\n");
    write(r, "sub/.gitignore", "local.txt\n");
    write(r, "sub/local.txt", "ignored below sub\n");
    write(r, "local.txt", "not ignored at the root\n");
    write(r, "sub/deeper/.kilnignore", "*.md\n");
    write(r, "sub/deeper/notes.md", "# ignored by kiln\n");
    write(r, "sub/deeper/code.rs", "fn f() {}\n");
    write(r, ".kilnignore", "!drop2.log\n");
    write(
        r,
        "drop2.log",
        "kilnignore re-includes what gitignore drops\n",
    );
    write(r, ".ignore", "private/\n");
    write(r, "private/p.py", "p = 1\n");
    write(r, "node_modules/m/index.js", "module.exports = 1\n");
    write(r, "target/debug/t.rs", "fn t() {}\n");
    write(r, "package-lock.json", "{}\n");
    write(r, "big.txt", &"x".repeat(2000));
    std::os::unix::fs::symlink(r.join("a.py"), r.join("link.py")).unwrap();
    let opts = WalkOptions {
        max_file_bytes: 1000,
    };
    let local = LocalTree::new(r);
    let (host, host_skipped) = local.walk(&opts).unwrap();
    let (generic, generic_skipped) = walk_tree(&local, &opts).unwrap();
    let names = |v: &[kiln_knowledge::walk::WalkedFile]| {
        v.iter()
            .map(|f| format!("{} {}", f.rel, f.size))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(names(&host), names(&generic));
    assert_eq!(host_skipped, generic_skipped);
    expect![[r#"
        .ignore 9
        a.py 14
        drop2.log 44
        keep.log 5
        local.txt 24
        sub/deeper/code.rs 10"#]]
    .assert_eq(&names(&generic));
    // The stamps are the mtimes the host walker reports.
    for (a, b) in host.iter().zip(&generic) {
        assert_eq!(a.mtime_ns, b.mtime_ns, "{}", a.rel);
    }
}

/// A tree whose listing of one directory fails with a given error kind.
struct FailingList {
    inner: LocalTree,
    dir: &'static str,
    kind: std::io::ErrorKind,
}

impl Tree for FailingList {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn list(&self, dir: &str) -> std::io::Result<Vec<kiln_knowledge::source::Entry>> {
        if dir == self.dir {
            return Err(std::io::Error::new(
                self.kind,
                "the source stopped answering",
            ));
        }
        self.inner.list(dir)
    }
    fn read(&self, rel: &str) -> std::io::Result<Vec<u8>> {
        self.inner.read(rel)
    }
}

#[test]
fn a_listing_that_fails_ends_the_walk_but_a_vanished_directory_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path();
    write(r, "a.py", "a = 1\n");
    write(r, "sub/b.py", "b = 2\n");
    let walk = |kind| {
        walk_tree(
            &FailingList {
                inner: LocalTree::new(r),
                dir: "sub",
                kind,
            },
            &WalkOptions::default(),
        )
        .map(|(files, _)| files.into_iter().map(|f| f.rel).collect::<Vec<_>>())
        .map_err(|e| e.to_string())
    };
    // Gone or unreadable: the rest of the tree is still walked.
    assert_eq!(
        walk(std::io::ErrorKind::NotFound),
        Ok(vec!["a.py".to_string()])
    );
    assert_eq!(
        walk(std::io::ErrorKind::PermissionDenied),
        Ok(vec!["a.py".to_string()])
    );
    // Anything else (a sandbox going away mid-walk) is an error, never "sub/ is empty",
    // which a sync would take for deleted files.
    assert_eq!(
        walk(std::io::ErrorKind::ConnectionReset),
        Err("listing `sub`: the source stopped answering".to_string())
    );
}

#[test]
fn git_url_policy() {
    let urls = [
        "https://example.com/org/repo.git",
        "http://example.com/repo",
        "git://example.com/repo.git",
        "https://user@example.com/repo.git",
        "https://user:hunter2@example.com/repo.git",
        "ssh://git@example.com/repo.git",
        "git@example.com:org/repo.git",
        "file:///srv/repo",
        "/srv/repo",
        "../repo",
        "ext::sh -c touch% /tmp/pwned",
        "ext::evil-helper",
        "fd::17",
        "--upload-pack=touch /tmp/pwned",
        "-u",
        "https://127.0.0.1/repo.git",
        "https://localhost:8443/repo.git",
        "https://[::1]/repo.git",
        "http://169.254.169.254/latest",
        "https://10.1.2.3/repo",
        "http://2130706433/repo",
        "http://127.1/repo",
        "ftp://example.com/repo",
        "https://exa mple.com/repo",
        "",
    ];
    let mut out = String::new();
    for u in urls {
        let show = |r: Result<kiln_knowledge::git::Protocol, Error>| match r {
            Ok(p) => format!("{p:?}"),
            Err(Error::Forbidden(m)) => format!("403 {m}"),
            Err(Error::Invalid(m)) => format!("400 {m}"),
            Err(e) => format!("other {e}"),
        };
        out.push_str(&format!(
            "{u}\n  tenant:  {}\n  trusted: {}\n",
            show(check_url(u, GitPolicy::TENANT)),
            show(check_url(u, GitPolicy::TRUSTED))
        ));
    }
    expect![[r#"
        https://example.com/org/repo.git
          tenant:  Https
          trusted: Https
        http://example.com/repo
          tenant:  Http
          trusted: Http
        git://example.com/repo.git
          tenant:  Git
          trusted: Git
        https://user@example.com/repo.git
          tenant:  Https
          trusted: Https
        https://user:hunter2@example.com/repo.git
          tenant:  400 git URL `https://user:***@example.com/repo.git` carries a password; credentials in git URLs are not supported (the URL is stored in the index's configuration)
          trusted: 400 git URL `https://user:***@example.com/repo.git` carries a password; credentials in git URLs are not supported (the URL is stored in the index's configuration)
        ssh://git@example.com/repo.git
          tenant:  403 git URL `ssh://git@example.com/repo.git` uses SSH, which would use the server's own SSH identity
          trusted: Ssh
        git@example.com:org/repo.git
          tenant:  403 git URL `git@example.com:org/repo.git` is an SSH address (it would use the server's own SSH identity)
          trusted: Ssh
        file:///srv/repo
          tenant:  403 git URL `file:///srv/repo` is a path on the server (file://)
          trusted: File
        /srv/repo
          tenant:  403 git URL `/srv/repo` is a path on the server
          trusted: File
        ../repo
          tenant:  403 git URL `../repo` is a path on the server
          trusted: File
        ext::sh -c touch% /tmp/pwned
          tenant:  400 git URL `ext::sh -c touch% /tmp/pwned` contains spaces or control characters
          trusted: 400 git URL `ext::sh -c touch% /tmp/pwned` contains spaces or control characters
        ext::evil-helper
          tenant:  400 git URL `ext::evil-helper` uses the `transport::address` form (ext:: and fd:: run programs on the server)
          trusted: 400 git URL `ext::evil-helper` uses the `transport::address` form (ext:: and fd:: run programs on the server)
        fd::17
          tenant:  400 git URL `fd::17` uses the `transport::address` form (ext:: and fd:: run programs on the server)
          trusted: 400 git URL `fd::17` uses the `transport::address` form (ext:: and fd:: run programs on the server)
        --upload-pack=touch /tmp/pwned
          tenant:  400 git URL `--upload-pack=touch /tmp/pwned` contains spaces or control characters
          trusted: 400 git URL `--upload-pack=touch /tmp/pwned` contains spaces or control characters
        -u
          tenant:  400 git URL `-u` looks like a command-line option
          trusted: 400 git URL `-u` looks like a command-line option
        https://127.0.0.1/repo.git
          tenant:  403 git URL `https://127.0.0.1/repo.git` points at a loopback, private or link-local address
          trusted: Https
        https://localhost:8443/repo.git
          tenant:  403 git URL `https://localhost:8443/repo.git` points at a loopback, private or link-local address
          trusted: Https
        https://[::1]/repo.git
          tenant:  403 git URL `https://[::1]/repo.git` points at a loopback, private or link-local address
          trusted: Https
        http://169.254.169.254/latest
          tenant:  403 git URL `http://169.254.169.254/latest` points at a loopback, private or link-local address
          trusted: Http
        https://10.1.2.3/repo
          tenant:  403 git URL `https://10.1.2.3/repo` points at a loopback, private or link-local address
          trusted: Https
        http://2130706433/repo
          tenant:  403 git URL `http://2130706433/repo` points at a loopback, private or link-local address
          trusted: Http
        http://127.1/repo
          tenant:  403 git URL `http://127.1/repo` points at a loopback, private or link-local address
          trusted: Http
        ftp://example.com/repo
          tenant:  400 git URL `ftp://example.com/repo` has scheme `ftp`; use https://, http:// or git://
          trusted: 400 git URL `ftp://example.com/repo` has scheme `ftp`; use https://, http:// or git://
        https://exa mple.com/repo
          tenant:  400 git URL `https://exa mple.com/repo` contains spaces or control characters
          trusted: 400 git URL `https://exa mple.com/repo` contains spaces or control characters

          tenant:  400 the git URL must be 1-2048 characters
          trusted: 400 the git URL must be 1-2048 characters
    "#]]
    .assert_eq(&out);
}

/// An upstream repository `repo` under `base`, with a first commit.
fn upstream(base: &Path) -> std::path::PathBuf {
    let repo = base.join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    git_in(&repo, &["init", "-q"]);
    write(
        &repo,
        "billing/invoice.py",
        "def compute_invoice_total(lines):\n    return sum(l.amount for l in lines)\n",
    );
    write(
        &repo,
        "net/retry.rs",
        "pub fn retry_with_backoff(attempts: u32) -> u32 {\n    attempts * 2\n}\n",
    );
    write(&repo, "README.md", "# Upstream\n\nBilling and retries.\n");
    git_in(&repo, &["add", "-A"]);
    git_in(&repo, &["commit", "-qm", "first"]);
    repo
}

#[test]
fn git_source_syncs_commits_renames_and_deletes_incrementally() {
    let base = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let repo = upstream(base.path());
    let daemon = GitDaemon::start(base.path()).unwrap();
    let (embed_url, seen) = embedding_server();
    let e = Engine::new(data.path(), &model_dir()).unwrap();
    let url = format!("{}/repo", daemon.url);
    let embed = EmbedConfig::Ollama {
        url: embed_url,
        model: "bow".into(),
    };
    // A branch that does not exist is refused at create, and nothing is left behind.
    let err = e
        .create(
            "acme",
            "up",
            Source::Git {
                url: url.clone(),
                git_ref: Some("nope".into()),
            },
            embed.clone(),
        )
        .unwrap_err();
    assert!(
        matches!(&err, Error::Invalid(m) if m.contains("no branch or tag `nope`")),
        "{err}"
    );
    let err = e
        .create(
            "acme",
            "up",
            Source::Git {
                url: format!("{}/missing", daemon.url),
                git_ref: None,
            },
            embed.clone(),
        )
        .unwrap_err();
    assert!(matches!(&err, Error::Source(_)), "{err}");
    assert!(e.list("acme").unwrap().is_empty());

    e.create(
        "acme",
        "up",
        Source::Git {
            url: url.clone(),
            git_ref: Some("main".into()),
        },
        embed,
    )
    .unwrap();
    let r = e.sync("acme", "up", &|_| {}).unwrap();
    assert_eq!((r.files, r.added), (3, 3), "{r:?}");
    let first_commit = git_in(&repo, &["rev-parse", "HEAD"]).trim().to_string();
    assert_eq!(r.revision.as_deref(), Some(first_commit.as_str()));
    assert_eq!(
        hit_paths(&e, "acme", "up", "invoice total"),
        ["billing/invoice.py"]
    );
    e.wait_embedded("acme", "up", Duration::from_secs(30))
        .unwrap();
    let embedded = || -> usize { seen.lock().unwrap().iter().map(|s| s.inputs.len()).sum() };
    let embedded_first = embedded();
    // The clone lives in the index's own directory; it is bare and shallow.
    let clone = data.path().join("orgs/acme/indexes/up/source.git");
    assert!(clone.join("shallow").is_file());

    // Nothing changed upstream: the blob ids match, nothing is read.
    let r = e.sync("acme", "up", &|_| {}).unwrap();
    assert_eq!((r.unchanged, r.added, r.changed, r.deleted), (3, 0, 0, 0));

    // Edit one file, rename another, delete the third, add one.
    write(
        &repo,
        "billing/invoice.py",
        "def compute_invoice_total(lines):\n    return sum(l.amount for l in lines)\n\ndef apply_discount(total, pct):\n    return total * (1 - pct)\n",
    );
    git_in(&repo, &["mv", "net/retry.rs", "net/backoff.rs"]);
    git_in(&repo, &["rm", "-q", "README.md"]);
    write(
        &repo,
        "docs/guide.md",
        "# Guide\n\nHow a discount is applied.\n",
    );
    git_in(&repo, &["add", "-A"]);
    git_in(&repo, &["commit", "-qm", "second"]);
    let r = e.sync("acme", "up", &|_| {}).unwrap();
    assert_eq!(
        (r.files, r.changed, r.added, r.deleted, r.unchanged),
        (3, 1, 2, 2, 0),
        "{r:?}"
    );
    assert_ne!(r.revision.as_deref(), Some(first_commit.as_str()));
    assert_eq!(
        hit_paths(&e, "acme", "up", "apply discount"),
        ["billing/invoice.py", "docs/guide.md"]
    );
    assert_eq!(
        hit_paths(&e, "acme", "up", "retry backoff"),
        ["net/backoff.rs"]
    );
    assert!(hit_paths(&e, "acme", "up", "upstream billing retries")
        .iter()
        .all(|p| p != "README.md"));
    // Only new chunk texts were embedded: the renamed file's chunk came from the cache.
    e.wait_embedded("acme", "up", Duration::from_secs(30))
        .unwrap();
    let embedded_now = embedded();
    let s = e.stats("acme", "up").unwrap();
    assert!(s.embedding_cache.hits >= 1, "{s:?}");
    assert!(
        embedded_now - embedded_first <= 3,
        "{} texts embedded for one changed and one new file",
        embedded_now - embedded_first
    );
    assert_eq!(s.revision, r.revision);

    // rm erases the clone with everything else.
    e.remove("acme", "up").unwrap();
    assert!(!clone.exists());
    assert!(!data.path().join("orgs/acme/indexes/up").exists());
}

/// The tree of a source with a planted word in code, a symbol, a path and a comment.
fn planted(root: &Path) {
    write(
        root,
        "zanzibarquux/handlers.py",
        "def zanzibarquux_handler(request):\n    \"\"\"The zanzibarquux marker.\"\"\"\n    return request.body\n",
    );
    write(
        root,
        "lib.rs",
        "/// Parses a request line.\npub fn parse_request_line(line: &str) -> usize {\n    line.len()\n}\n",
    );
}

fn grep_hits(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            out.extend(grep_hits(&p, needle));
        } else {
            let b = std::fs::read(&p).unwrap_or_default();
            if b.windows(needle.len()).any(|w| w == needle) {
                out.push(p.display().to_string());
            }
        }
    }
    out
}

#[test]
fn encrypted_index_leaves_no_plaintext_in_the_data_dir() {
    let src = tempfile::tempdir().unwrap();
    planted(src.path());
    let key = MasterKey::from_secret(b"a server secret of 32 bytes, ok!");
    // The control: the same source indexed without encryption shows the word on disk.
    let plain = tempfile::tempdir().unwrap();
    {
        let e = Engine::new(plain.path(), &model_dir()).unwrap();
        e.create(
            "acme",
            "p",
            Source::Path {
                path: src.path().display().to_string(),
            },
            EmbedConfig::Local,
        )
        .unwrap();
        e.sync("acme", "p", &|_| {}).unwrap();
        e.wait_embedded("acme", "p", Duration::from_secs(120))
            .unwrap();
    }
    assert!(!grep_hits(plain.path(), b"zanzibarquux").is_empty());

    let data = tempfile::tempdir().unwrap();
    let e = Engine::new(data.path(), &model_dir()).unwrap();
    let opts = CreateOptions {
        encrypted: true,
        ..Default::default()
    };
    let src_of = || Source::Path {
        path: src.path().display().to_string(),
    };
    // Without the server's key there is no encryption.
    let err = e
        .create_with("acme", "enc", src_of(), EmbedConfig::Local, opts)
        .unwrap_err();
    assert!(matches!(err, Error::Invalid(_)), "{err}");
    e.set_master_key(key.clone());
    let info = e
        .create_with("acme", "enc", src_of(), EmbedConfig::Local, opts)
        .unwrap();
    assert!(info.encrypted);
    e.sync("acme", "enc", &|_| {}).unwrap();
    e.wait_embedded("acme", "enc", Duration::from_secs(120))
        .unwrap();
    // Answers are in clear for the organisation, with every retriever and filter.
    let hits = e
        .search("acme", "enc", &bm25("zanzibarquux handler"))
        .unwrap();
    assert_eq!(hits[0].path, "zanzibarquux/handlers.py");
    assert_eq!(hits[0].symbol.as_deref(), Some("zanzibarquux_handler"));
    assert!(hits[0].text.contains("The zanzibarquux marker"));
    let mut p = SearchParams::new("parse a request line", 3);
    p.mode = Mode::Vector;
    p.path = Some("*.rs".into());
    assert_eq!(e.search("acme", "enc", &p).unwrap()[0].path, "lib.rs");
    // An edit and a sync keep working on sealed rows (lookups by sealed path).
    write(
        src.path(),
        "lib.rs",
        "/// Parses a status line.\npub fn parse_status_line(line: &str) -> usize {\n    line.len()\n}\n",
    );
    let r = e.sync("acme", "enc", &|_| {}).unwrap();
    assert_eq!((r.changed, r.unchanged), (1, 1));
    e.wait_embedded("acme", "enc", Duration::from_secs(120))
        .unwrap();
    let stats_before = e.stats("acme", "enc").unwrap();
    drop(e);
    for needle in [
        &b"zanzibarquux"[..],
        b"parse_status_line",
        b"Parses a status",
        b"status line",
    ] {
        let found = grep_hits(data.path(), needle);
        assert!(
            found.is_empty(),
            "{} found in {found:?}",
            String::from_utf8_lossy(needle)
        );
    }
    // A restart with the key reopens everything.
    let e = Engine::new(data.path(), &model_dir()).unwrap();
    e.set_master_key(key);
    let hits = e.search("acme", "enc", &bm25("status line")).unwrap();
    assert_eq!(hits[0].path, "lib.rs");
    let s = e.stats("acme", "enc").unwrap();
    assert_eq!(s.info.chunks, stats_before.info.chunks);
    assert_eq!(s.merkle_root, stats_before.merkle_root);
    let r = e
        .sync_from("acme", "enc", None, &HashSet::new(), &|_| {})
        .unwrap();
    assert_eq!(r.unchanged, 2);
    drop(e);
    // Another key (a replaced server secret) cannot open it, and says so.
    let e = Engine::new(data.path(), &model_dir()).unwrap();
    e.set_master_key(MasterKey::from_secret(b"another secret entirely, 32 byte"));
    let err = e.search("acme", "enc", &bm25("status")).unwrap_err();
    assert!(
        err.to_string()
            .contains("does not open with this server's key"),
        "{err}"
    );
}

#[test]
fn encrypted_index_keys_are_per_organisation() {
    let key = MasterKey::from_secret(b"0123456789abcdef0123456789abcdef");
    let (a, b) = (key.org("acme"), key.org("globex"));
    let sealed = a.seal(b"text", b"hello");
    assert_eq!(a.open(b"text", &sealed).unwrap(), b"hello");
    assert!(
        b.open(b"text", &sealed).is_err(),
        "another org's key opens it"
    );
    assert!(
        a.open(b"path", &sealed).is_err(),
        "a text passes for a path"
    );
    assert_ne!(a.seal(b"text", b"hello"), sealed, "random nonces");
    assert_eq!(a.seal_det(b"path", b"x"), a.seal_det(b"path", b"x"));
    assert_ne!(a.seal_det(b"path", b"x"), b.seal_det(b"path", b"x"));
    assert_ne!(a.keyed_hash(b"chunk", b"x"), b.keyed_hash(b"chunk", b"x"));
}
