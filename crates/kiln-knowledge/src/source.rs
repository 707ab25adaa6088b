//! Where an index reads from. A [`Source`] is stored in the index's config: a host directory,
//! a git URL (fetched by Kiln into the index's own directory, see `git`) or a sandbox's
//! workspace (read through kilnd by the server). A sync reads any of them through the [`Tree`]
//! trait: list a directory, read a file, and (by default) walk with the same ignore rules as a
//! host directory (`walk::walk_tree`).

use std::io;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::walk::{Skipped, WalkOptions, WalkedFile};

/// Where an index reads from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Source {
    /// A directory on the server's host.
    Path { path: String },
    /// A git repository, fetched (shallow) into the index's directory; `ref` is a branch or
    /// tag (default: the remote's HEAD).
    Git {
        url: String,
        #[serde(default, rename = "ref", skip_serializing_if = "Option::is_none")]
        git_ref: Option<String>,
    },
    /// A directory inside a sandbox of the index's organisation, read through its kilnd.
    Sandbox { sandbox: String, path: String },
}

impl Source {
    /// One line for listings: the path, `URL@ref`, or `sandbox:path`.
    pub fn describe(&self) -> String {
        match self {
            Source::Path { path } => path.clone(),
            Source::Git { url, git_ref } => match git_ref {
                Some(r) => format!("{url}@{r}"),
                None => url.clone(),
            },
            Source::Sandbox { sandbox, path } => format!("{sandbox}:{path}"),
        }
    }
}

/// What a directory entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    File,
    Dir,
    /// Symlinks, submodules, devices: never indexed.
    Other,
}

/// An entry of a listed directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub kind: EntryKind,
    pub size: u64,
    /// Changes whenever the content may have changed: the mtime in nanoseconds for a host
    /// directory or a sandbox, bits of the blob id for git. Equal size and stamp let a sync
    /// skip reading the file (the mtime fast path).
    pub stamp: i64,
}

/// A readable tree of files. Paths are relative to the tree's root, `/`-separated; `""` is
/// the root itself.
pub trait Tree: Send + Sync {
    /// Names the tree in error messages.
    fn describe(&self) -> String;
    /// The entries of directory `dir`.
    fn list(&self, dir: &str) -> io::Result<Vec<Entry>>;
    /// The bytes of file `rel`.
    fn read(&self, rel: &str) -> io::Result<Vec<u8>>;
    /// The files to index, with gitignore + `.kilnignore` rules and the skip rules applied.
    fn walk(&self, opts: &WalkOptions) -> io::Result<(Vec<WalkedFile>, Skipped)> {
        crate::walk::walk_tree(self, opts)
    }
}

/// A directory on the server's host.
pub struct LocalTree {
    root: PathBuf,
}

impl LocalTree {
    pub fn new(root: impl Into<PathBuf>) -> LocalTree {
        LocalTree { root: root.into() }
    }
}

fn mtime_ns(md: &std::fs::Metadata) -> i64 {
    md.modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

impl Tree for LocalTree {
    fn describe(&self) -> String {
        self.root.display().to_string()
    }

    fn list(&self, dir: &str) -> io::Result<Vec<Entry>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(self.root.join(dir))? {
            let e = e?;
            let Ok(md) = e.path().symlink_metadata() else {
                continue;
            };
            let kind = if md.is_file() {
                EntryKind::File
            } else if md.is_dir() {
                EntryKind::Dir
            } else {
                EntryKind::Other
            };
            out.push(Entry {
                name: e.file_name().to_string_lossy().into_owned(),
                kind,
                size: md.len(),
                stamp: mtime_ns(&md),
            });
        }
        Ok(out)
    }

    fn read(&self, rel: &str) -> io::Result<Vec<u8>> {
        std::fs::read(self.root.join(rel))
    }

    /// The `ignore` crate's walker (same rules as `walk_tree`, proven by a test).
    fn walk(&self, opts: &WalkOptions) -> io::Result<(Vec<WalkedFile>, Skipped)> {
        crate::walk::walk(&self.root, opts)
    }
}
