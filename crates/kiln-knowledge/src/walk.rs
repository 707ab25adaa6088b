//! Walking a source tree: gitignore semantics plus `.kilnignore`, and the files never indexed
//! (binaries, vendored and generated code, anything over the size limit). `walk` walks a host
//! directory with the `ignore` crate; `walk_tree` applies the same rules to any `Tree` (a git
//! commit, a sandbox's workspace through kilnd), one directory listing at a time.

use std::path::{Path, PathBuf};

use ignore::gitignore::{Gitignore, GitignoreBuilder};
use ignore::Match;

use crate::lang::Language;
use crate::source::{EntryKind, Tree};

/// Directories whose content is vendored or produced by a build; never indexed.
const SKIP_DIRS: &[&str] = &[
    ".git",
    "node_modules",
    "vendor",
    "third_party",
    "target",
    "dist",
    "build",
    "__pycache__",
    ".venv",
    "venv",
    ".tox",
    ".mypy_cache",
    ".pytest_cache",
    ".next",
    "coverage",
];

/// Whether a directory of this name is never walked (vendored or build output).
pub fn skipped_dir(name: &str) -> bool {
    SKIP_DIRS.contains(&name)
}

/// File names that are generated (lock files, minified bundles, protobuf output).
fn generated_name(name: &str) -> bool {
    name.ends_with(".min.js")
        || name.ends_with(".min.css")
        || name.ends_with(".map")
        || name.ends_with("_pb2.py")
        || name.ends_with(".pb.go")
        || matches!(
            name,
            "Cargo.lock"
                | "package-lock.json"
                | "yarn.lock"
                | "pnpm-lock.yaml"
                | "poetry.lock"
                | "uv.lock"
        )
}

/// Options of a walk.
#[derive(Debug, Clone)]
pub struct WalkOptions {
    /// Files larger than this are skipped.
    pub max_file_bytes: u64,
}

impl Default for WalkOptions {
    fn default() -> Self {
        WalkOptions {
            max_file_bytes: 1 << 20,
        }
    }
}

/// A file the walk kept: its path relative to the root (with `/`), size, mtime and language.
#[derive(Debug, Clone, PartialEq)]
pub struct WalkedFile {
    pub rel: String,
    /// The file on the host (`walk`); the relative path again for `walk_tree`.
    pub abs: PathBuf,
    pub size: u64,
    pub mtime_ns: i64,
    pub language: Language,
}

/// Why a file was left out (counted in sync reports).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Skipped {
    pub too_large: u64,
    pub generated: u64,
    pub binary: u64,
}

/// Walks `root` and returns the files to index, sorted by relative path.
pub fn walk(root: &Path, opts: &WalkOptions) -> std::io::Result<(Vec<WalkedFile>, Skipped)> {
    if !root.is_dir() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{} is not a directory", root.display()),
        ));
    }
    let mut skipped = Skipped::default();
    let mut out = Vec::new();
    let walker = ignore::WalkBuilder::new(root)
        .hidden(false)
        .git_ignore(true)
        .git_global(false)
        .git_exclude(true)
        .require_git(false)
        .parents(false)
        .add_custom_ignore_filename(".kilnignore")
        .filter_entry(|e| {
            let name = e.file_name().to_string_lossy();
            !(e.file_type().is_some_and(|t| t.is_dir()) && SKIP_DIRS.contains(&name.as_ref()))
        })
        .build();
    for entry in walker {
        let Ok(entry) = entry else { continue };
        if !entry.file_type().is_some_and(|t| t.is_file()) {
            continue;
        }
        let abs = entry.path().to_path_buf();
        let Ok(rel) = abs.strip_prefix(root) else {
            continue;
        };
        let rel = rel.to_string_lossy().replace('\\', "/");
        let name = rel.rsplit('/').next().unwrap_or(&rel);
        if name == ".kilnignore" || name == ".gitignore" {
            continue;
        }
        if generated_name(name) {
            skipped.generated += 1;
            continue;
        }
        let Ok(meta) = entry.metadata() else { continue };
        if meta.len() > opts.max_file_bytes {
            skipped.too_large += 1;
            continue;
        }
        let mtime_ns = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0);
        out.push(WalkedFile {
            language: Language::detect(&rel),
            rel,
            abs,
            size: meta.len(),
            mtime_ns,
        });
    }
    out.sort_by(|a, b| a.rel.cmp(&b.rel));
    Ok((out, skipped))
}

/// The ignore files of one directory level, by precedence (the `ignore` crate's order).
struct Level {
    kiln: Gitignore,
    dot_ignore: Gitignore,
    git: Gitignore,
    exclude: Gitignore,
    has_git: bool,
}

/// Builds the matcher of an ignore file's `text` found in directory `dir` (`""` = root).
fn matcher(dir: &str, text: Option<Vec<u8>>) -> Gitignore {
    let Some(text) = text else {
        return Gitignore::empty();
    };
    let mut b = GitignoreBuilder::new(Path::new("/").join(dir));
    for line in String::from_utf8_lossy(&text).lines() {
        // A bad pattern is skipped, as git does.
        let _ = b.add_line(None, line);
    }
    b.build().unwrap_or_else(|_| Gitignore::empty())
}

/// Whether `rel` is ignored: per kind of ignore file the deepest match decides, and
/// `.kilnignore` beats `.ignore`, which beats `.gitignore`, which beats `.git/info/exclude`.
fn ignored(levels: &[Level], rel: &str, is_dir: bool) -> bool {
    let path = Path::new("/").join(rel);
    // The deepest match among one kind of ignore file (git's stop at a repository's root).
    let kind = |pick: fn(&Level) -> &Gitignore, git_only: bool| -> Option<bool> {
        let mut saw_git = false;
        for l in levels.iter().rev() {
            if git_only && saw_git {
                break;
            }
            match pick(l).matched(&path, is_dir) {
                Match::None => {}
                m => return Some(m.is_ignore()),
            }
            saw_git |= l.has_git;
        }
        None
    };
    kind(|l| &l.kiln, false)
        .or_else(|| kind(|l| &l.dot_ignore, false))
        .or_else(|| kind(|l| &l.git, true))
        .or_else(|| kind(|l| &l.exclude, true))
        .unwrap_or(false)
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

/// Walks any [`Tree`] with the rules of [`walk`]: one `list` per directory not ignored, the
/// ignore files read as they are met. An unreadable root is an error; a directory that
/// vanishes during the walk (`NotFound`) or may not be read (`PermissionDenied`) is skipped;
/// any other failure to list (the source stopped answering: a sandbox going away, a broken
/// connection) ends the walk with that error, so a sync never takes what it could not list
/// for deleted files.
pub fn walk_tree<T: Tree + ?Sized>(
    tree: &T,
    opts: &WalkOptions,
) -> std::io::Result<(Vec<WalkedFile>, Skipped)> {
    let mut out = Vec::new();
    let mut skipped = Skipped::default();
    let mut levels: Vec<Level> = Vec::new();
    let root = tree.list("")?;
    visit(tree, "", root, opts, &mut levels, &mut out, &mut skipped)?;
    out.sort_by(|a, b| a.rel.cmp(&b.rel));
    Ok((out, skipped))
}

fn visit<T: Tree + ?Sized>(
    tree: &T,
    dir: &str,
    mut entries: Vec<crate::source::Entry>,
    opts: &WalkOptions,
    levels: &mut Vec<Level>,
    out: &mut Vec<WalkedFile>,
    skipped: &mut Skipped,
) -> std::io::Result<()> {
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    let has = |name: &str| {
        entries
            .iter()
            .any(|e| e.name == name && e.kind == EntryKind::File)
    };
    let read = |name: &str| {
        has(name)
            .then(|| tree.read(&join(dir, name)).ok())
            .flatten()
    };
    let has_git = entries
        .iter()
        .any(|e| e.name == ".git" && e.kind == EntryKind::Dir);
    levels.push(Level {
        kiln: matcher(dir, read(".kilnignore")),
        dot_ignore: matcher(dir, read(".ignore")),
        git: matcher(dir, read(".gitignore")),
        exclude: if has_git {
            matcher(dir, tree.read(&join(dir, ".git/info/exclude")).ok())
        } else {
            Gitignore::empty()
        },
        has_git,
    });
    for e in entries {
        let rel = join(dir, &e.name);
        match e.kind {
            EntryKind::Dir => {
                if SKIP_DIRS.contains(&e.name.as_str()) || ignored(levels, &rel, true) {
                    continue;
                }
                match tree.list(&rel) {
                    Ok(children) => visit(tree, &rel, children, opts, levels, out, skipped)?,
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied
                        ) => {}
                    Err(e) => {
                        return Err(std::io::Error::new(
                            e.kind(),
                            format!("listing `{rel}`: {e}"),
                        ))
                    }
                }
            }
            EntryKind::File => {
                if ignored(levels, &rel, false) {
                    continue;
                }
                if e.name == ".kilnignore" || e.name == ".gitignore" {
                    continue;
                }
                if generated_name(&e.name) {
                    skipped.generated += 1;
                    continue;
                }
                if e.size > opts.max_file_bytes {
                    skipped.too_large += 1;
                    continue;
                }
                out.push(WalkedFile {
                    language: Language::detect(&rel),
                    abs: PathBuf::from(&rel),
                    rel,
                    size: e.size,
                    mtime_ns: e.stamp,
                });
            }
            EntryKind::Other => {}
        }
    }
    levels.pop();
    Ok(())
}

/// What reading a walked file gives: its text, or why it is left out.
pub enum FileContent {
    Text(String),
    Binary,
    Generated,
}

/// Classifies bytes: NUL in the first 8 KiB or invalid UTF-8 is binary; a generated-code
/// marker in the first lines is generated.
pub fn classify(bytes: Vec<u8>) -> FileContent {
    let head = &bytes[..bytes.len().min(8192)];
    if head.contains(&0) {
        return FileContent::Binary;
    }
    let Ok(text) = String::from_utf8(bytes) else {
        return FileContent::Binary;
    };
    let first: String = text.lines().take(5).collect::<Vec<_>>().join("\n");
    if first.contains("@generated")
        || first.contains("DO NOT EDIT")
        || first.contains("Code generated by")
    {
        return FileContent::Generated;
    }
    FileContent::Text(text)
}
