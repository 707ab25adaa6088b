//! Content digest of a directory tree: the address under which a layer is stored.
//!
//! The digest covers, for every entry in sorted path order: its relative path, type,
//! permission bits, owner, size, content (files), link target (symlinks) and device number
//! (device nodes). Timestamps are left out so that identical content gets one address.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::{io_err, TemplateError};

/// Digest (`sha256:<hex>`) and apparent size in bytes of the tree under `root`.
pub fn tree_digest(root: &Path) -> Result<(String, u64), TemplateError> {
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    walk(root, root, &mut hasher, &mut total)?;
    Ok((format!("sha256:{}", hex::encode(hasher.finalize())), total))
}

fn walk(root: &Path, dir: &Path, h: &mut Sha256, total: &mut u64) -> Result<(), TemplateError> {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .map_err(io_err(dir))?
        .filter_map(|e| e.ok().map(|e| e.file_name()))
        .collect();
    names.sort();
    for name in names {
        let path = dir.join(&name);
        let md = std::fs::symlink_metadata(&path).map_err(io_err(&path))?;
        let rel = path.strip_prefix(root).unwrap_or(&path);
        let ft = md.file_type();
        let kind = if ft.is_dir() {
            'd'
        } else if ft.is_symlink() {
            'l'
        } else if ft.is_file() {
            'f'
        } else {
            'o'
        };
        h.update(format!(
            "{kind} {} {:o} {}:{} {}\n",
            rel.display(),
            md.mode(),
            md.uid(),
            md.gid(),
            md.size()
        ));
        if ft.is_file() {
            *total += md.size();
            let mut f = std::fs::File::open(&path).map_err(io_err(&path))?;
            let mut fh = Sha256::new();
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let n = f.read(&mut buf).map_err(io_err(&path))?;
                if n == 0 {
                    break;
                }
                fh.update(&buf[..n]);
            }
            h.update(fh.finalize());
        } else if ft.is_symlink() {
            let t = std::fs::read_link(&path).map_err(io_err(&path))?;
            h.update(t.as_os_str().as_encoded_bytes());
        } else if ft.is_dir() {
            walk(root, &path, h, total)?;
        } else {
            h.update(md.rdev().to_le_bytes());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_depends_on_content_not_time() {
        let a = tempfile::tempdir().expect("tmp");
        let b = tempfile::tempdir().expect("tmp");
        for d in [a.path(), b.path()] {
            std::fs::create_dir(d.join("etc")).expect("mkdir");
            std::fs::write(d.join("etc/hostname"), "kiln\n").expect("write");
            std::os::unix::fs::symlink("etc/hostname", d.join("link")).expect("symlink");
        }
        let (da, sa) = tree_digest(a.path()).expect("digest");
        let (db, _) = tree_digest(b.path()).expect("digest");
        assert_eq!(da, db);
        assert_eq!(sa, 5);
        std::fs::write(b.path().join("etc/hostname"), "kilN\n").expect("write");
        assert_ne!(da, tree_digest(b.path()).expect("digest").0);
    }
}
