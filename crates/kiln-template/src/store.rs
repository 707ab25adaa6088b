//! The on-disk image store: read-only layers addressed by content digest, and named
//! references (templates) pointing at a stack of layers.
//!
//! Layout under the store root:
//! ```text
//! layers/<hex>/rootfs      the layer's files (never written after publish)
//! layers/<hex>/layer.json  LayerManifest
//! refs/<name>.json         ImageRef: a template name -> layer stack + build key
//! tmp/                     builds in progress (cleared on open)
//! ```
//! Architecture invariant: a directory under `layers/` is complete and immutable; it appears
//! only through an atomic rename from `tmp/`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{io_err, TemplateError};

/// Metadata of one stored layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerManifest {
    /// `sha256:<hex>` of the tree (see [`crate::digest`]).
    pub digest: String,
    /// Digest of the layer below, if any.
    pub parent: Option<String>,
    /// Hash of everything that went into building it.
    pub build_key: String,
    /// Human description of how it was made.
    pub source: String,
    pub size_bytes: u64,
    pub created_at_ms: u64,
}

/// A named image: a stack of layers, top first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRef {
    pub name: String,
    /// Layer digests, top first.
    pub layers: Vec<String>,
    pub build_key: String,
    pub size_bytes: u64,
    pub created_at_ms: u64,
}

/// The image store rooted at one directory.
#[derive(Debug, Clone)]
pub struct ImageStore {
    root: PathBuf,
}

/// Valid template names: `[a-z0-9][a-z0-9_-]{0,63}`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && name.as_bytes()[0].is_ascii_alphanumeric()
}

impl ImageStore {
    /// Opens (creating) the store and clears interrupted builds.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, TemplateError> {
        let root = root.into();
        for d in ["layers", "refs"] {
            let p = root.join(d);
            std::fs::create_dir_all(&p).map_err(io_err(&p))?;
        }
        let tmp = root.join("tmp");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
        }
        std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
        Ok(Self { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A fresh scratch directory for a build, on the same filesystem as `layers/`.
    pub fn scratch(&self, label: &str) -> Result<PathBuf, TemplateError> {
        let p = self
            .root
            .join("tmp")
            .join(format!("{label}-{:016x}", rand::random::<u64>()));
        std::fs::create_dir_all(&p).map_err(io_err(&p))?;
        Ok(p)
    }

    fn layer_dir(&self, digest: &str) -> PathBuf {
        self.root
            .join("layers")
            .join(digest.trim_start_matches("sha256:"))
    }

    /// Path of a layer's root filesystem (an overlay lowerdir).
    pub fn layer_rootfs(&self, digest: &str) -> PathBuf {
        self.layer_dir(digest).join("rootfs")
    }

    pub fn has_layer(&self, digest: &str) -> bool {
        self.layer_dir(digest).join("layer.json").is_file()
    }

    /// Publishes a built tree at `rootfs` (inside [`Self::scratch`]) as a layer. If a layer with
    /// the same digest exists, the new copy is dropped and the existing one reused.
    pub fn publish(
        &self,
        rootfs: &Path,
        parent: Option<String>,
        build_key: &str,
        source: &str,
    ) -> Result<LayerManifest, TemplateError> {
        let (digest, size_bytes) = crate::digest::tree_digest(rootfs)?;
        let m = LayerManifest {
            digest: digest.clone(),
            parent,
            build_key: build_key.to_string(),
            source: source.to_string(),
            size_bytes,
            created_at_ms: crate::now_ms(),
        };
        let dest = self.layer_dir(&digest);
        if self.has_layer(&digest) {
            let _ = std::fs::remove_dir_all(rootfs);
            return self.layer(&digest);
        }
        let staging = rootfs.with_extension("publish");
        std::fs::create_dir_all(&staging).map_err(io_err(&staging))?;
        std::fs::rename(rootfs, staging.join("rootfs")).map_err(io_err(rootfs))?;
        let mj = staging.join("layer.json");
        std::fs::write(&mj, serde_json::to_vec_pretty(&m).unwrap_or_default())
            .map_err(io_err(&mj))?;
        if dest.exists() {
            // A half-published directory without layer.json: replace it.
            std::fs::remove_dir_all(&dest).map_err(io_err(&dest))?;
        }
        std::fs::rename(&staging, &dest).map_err(io_err(&dest))?;
        Ok(m)
    }

    pub fn layer(&self, digest: &str) -> Result<LayerManifest, TemplateError> {
        let p = self.layer_dir(digest).join("layer.json");
        let bytes = std::fs::read(&p).map_err(io_err(&p))?;
        serde_json::from_slice(&bytes).map_err(|e| TemplateError::Corrupt {
            path: p.display().to_string(),
            message: e.to_string(),
        })
    }

    /// Points `name` at a layer stack (atomic replace).
    pub fn set_ref(&self, r: &ImageRef) -> Result<(), TemplateError> {
        if !valid_name(&r.name) {
            return Err(TemplateError::InvalidName(r.name.clone()));
        }
        let p = self.root.join("refs").join(format!("{}.json", r.name));
        let tmp = p.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(r).unwrap_or_default())
            .map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, &p).map_err(io_err(&p))
    }

    /// The image `name`, if built and all its layers are present.
    pub fn get(&self, name: &str) -> Result<ImageRef, TemplateError> {
        if !valid_name(name) {
            return Err(TemplateError::InvalidName(name.to_string()));
        }
        let p = self.root.join("refs").join(format!("{name}.json"));
        let bytes = match std::fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(TemplateError::NotBuilt(name.to_string()))
            }
            Err(e) => return Err(io_err(&p)(e)),
        };
        let r: ImageRef = serde_json::from_slice(&bytes).map_err(|e| TemplateError::Corrupt {
            path: p.display().to_string(),
            message: e.to_string(),
        })?;
        if r.layers.iter().any(|l| !self.has_layer(l)) {
            return Err(TemplateError::NotBuilt(name.to_string()));
        }
        Ok(r)
    }

    /// All named images, sorted by name.
    pub fn list(&self) -> Vec<ImageRef> {
        let mut names: Vec<String> = std::fs::read_dir(self.root.join("refs"))
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter_map(|e| {
                        e.file_name()
                            .to_str()?
                            .strip_suffix(".json")
                            .map(str::to_string)
                    })
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names.iter().filter_map(|n| self.get(n).ok()).collect()
    }

    /// Root filesystems of an image's layers, top first (overlay `lowerdir` order).
    pub fn lower_dirs(&self, r: &ImageRef) -> Vec<PathBuf> {
        r.layers.iter().map(|l| self.layer_rootfs(l)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_dedupes_and_refs_round_trip() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = ImageStore::open(dir.path()).expect("open");
        let mut digests = Vec::new();
        for _ in 0..2 {
            let s = store.scratch("t").expect("scratch");
            let rootfs = s.join("rootfs");
            std::fs::create_dir_all(rootfs.join("bin")).expect("mkdir");
            std::fs::write(rootfs.join("bin/hello"), "hi").expect("write");
            digests.push(
                store
                    .publish(&rootfs, None, "key", "test")
                    .expect("publish")
                    .digest,
            );
        }
        assert_eq!(digests[0], digests[1]);
        assert!(store.layer_rootfs(&digests[0]).join("bin/hello").is_file());
        let r = ImageRef {
            name: "base".into(),
            layers: vec![digests[0].clone()],
            build_key: "key".into(),
            size_bytes: 2,
            created_at_ms: 1,
        };
        store.set_ref(&r).expect("set");
        assert_eq!(store.get("base").expect("get"), r);
        assert!(matches!(store.get("nope"), Err(TemplateError::NotBuilt(_))));
        assert!(matches!(
            store.get("../x"),
            Err(TemplateError::InvalidName(_))
        ));
        assert_eq!(store.list().len(), 1);
    }
}
