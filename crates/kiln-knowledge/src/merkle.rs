//! A Merkle tree over a source: a file's leaf is the hash of its content, a directory's hash is
//! the hash of its children's names and hashes. Two trees with equal roots are equal; a sync
//! reports which directories changed.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

/// Directory path ("" for the root) -> hash, for every directory that holds a file.
pub fn tree<'a>(files: impl IntoIterator<Item = (&'a str, &'a str)>) -> BTreeMap<String, String> {
    // children[dir] = sorted (name, hash)
    let mut children: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let mut dirs: Vec<String> = Vec::new();
    for (path, hash) in files {
        let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
        children
            .entry(dir.to_string())
            .or_default()
            .insert(name.to_string(), hash.to_string());
        let mut d = dir;
        loop {
            dirs.push(d.to_string());
            if d.is_empty() {
                break;
            }
            d = d.rsplit_once('/').map(|x| x.0).unwrap_or("");
        }
    }
    dirs.sort();
    dirs.dedup();
    // Deepest first so a directory's subdirectories are hashed before it.
    dirs.sort_by_key(|d| {
        std::cmp::Reverse(if d.is_empty() {
            0
        } else {
            d.matches('/').count() + 1
        })
    });
    let mut out = BTreeMap::new();
    for d in dirs {
        let mut h = Sha256::new();
        if let Some(c) = children.get(&d) {
            for (name, hash) in c {
                h.update(name.as_bytes());
                h.update([0]);
                h.update(hash.as_bytes());
                h.update([1]);
            }
        }
        let hash = hex::encode(h.finalize());
        if !d.is_empty() {
            let (parent, name) = d.rsplit_once('/').unwrap_or(("", d.as_str()));
            children
                .entry(parent.to_string())
                .or_default()
                .insert(format!("{name}/"), hash.clone());
        }
        out.insert(d, hash);
    }
    out
}

/// Directories whose hash differs between two trees (present in either).
pub fn changed_dirs(old: &BTreeMap<String, String>, new: &BTreeMap<String, String>) -> Vec<String> {
    let mut out: Vec<String> = new
        .iter()
        .filter(|(d, h)| old.get(*d) != Some(h))
        .map(|(d, _)| d.clone())
        .chain(old.keys().filter(|d| !new.contains_key(*d)).cloned())
        .collect();
    out.sort();
    out.dedup();
    out
}
