//! The on-disk image store: read-only layers addressed by content digest, and named
//! references (templates) pointing at a stack of layers.
//!
//! Layout under the store root:
//! ```text
//! layers/<hex>/rootfs      the layer's files (never written after publish)
//! layers/<hex>/layer.json  LayerManifest
//! refs/<name>.json         ImageRef: a template name -> layer stack + build key (+ manifest)
//! orgs/<org>/refs/         an organisation's private refs (same format, visible to it only)
//! orgs/<org>/templates/    the specs (NAME.toml) of its private templates
//! keys/<hex>               role-layer build key -> layer digest (the build cache index)
//! tmp/                     builds in progress (cleared on open)
//! lock                     flock: builds hold it shared, gc exclusive
//! ```
//! Architecture invariant: a directory under `layers/` is complete and immutable; it appears
//! only through an atomic rename from `tmp/`.
//!
//! Layers and the build cache are shared by everyone (content-addressed); only refs are
//! namespaced: [`ImageStore::for_org`] is a view whose refs live under `orgs/<org>/refs`, and
//! gc keeps every layer any namespace refers to.

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
    /// How a role-built template was made (absent for the plain Debian image).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<TemplateManifest>,
}

/// The manifest of a template built from roles.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateManifest {
    pub description: String,
    /// Digest of the Debian base layer at the bottom.
    pub base: String,
    /// Role layers, bottom first.
    pub roles: Vec<RoleLayer>,
    /// Variables of the spec (merged along its parents).
    pub vars: std::collections::BTreeMap<String, serde_json::Value>,
    /// Tool versions the roles recorded (`"unavailable: why"` when a tool could not be had).
    pub tools: std::collections::BTreeMap<String, String>,
}

/// One role's layer in a template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleLayer {
    pub role: String,
    pub digest: String,
    pub key: String,
    pub size_bytes: u64,
    /// The variables this layer saw.
    pub vars: std::collections::BTreeMap<String, serde_json::Value>,
}

/// A held store lock (released on drop).
#[derive(Debug)]
pub struct StoreLock {
    _file: std::fs::File,
}

/// The image store rooted at one directory: the public refs, or (through
/// [`ImageStore::for_org`]) one organisation's private refs over the same layers.
#[derive(Debug, Clone)]
pub struct ImageStore {
    root: PathBuf,
    /// Where this view's refs live: `refs/`, or `orgs/<org>/refs/`.
    refs: PathBuf,
    org: Option<String>,
}

/// Valid organisation ids for a namespace (`org_...` ids; no path tricks).
fn valid_org(org: &str) -> bool {
    !org.is_empty()
        && org.len() <= 64
        && !org.starts_with('.')
        && org
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
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
        for d in ["layers", "refs", "keys"] {
            let p = root.join(d);
            std::fs::create_dir_all(&p).map_err(io_err(&p))?;
        }
        let store = Self {
            refs: root.join("refs"),
            root,
            org: None,
        };
        // Interrupted builds are cleared only when no build runs (one holds the lock shared).
        if let Some(_l) = store.try_lock_exclusive()? {
            let tmp = store.root.join("tmp");
            if tmp.exists() {
                std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
            }
        }
        let tmp = store.root.join("tmp");
        std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
        Ok(store)
    }

    /// The view of organisation `org`: its private refs (under `orgs/<org>/refs`) over the
    /// shared layers and build cache.
    pub fn for_org(&self, org: &str) -> Result<Self, TemplateError> {
        if !valid_org(org) {
            return Err(TemplateError::InvalidName(org.to_string()));
        }
        Ok(Self {
            root: self.root.clone(),
            refs: self.root.join("orgs").join(org).join("refs"),
            org: Some(org.to_string()),
        })
    }

    /// The public view (the built-in templates and the `debian` image).
    pub fn public(&self) -> Self {
        Self {
            root: self.root.clone(),
            refs: self.root.join("refs"),
            org: None,
        }
    }

    /// The organisation of this view (`None`: public).
    pub fn org(&self) -> Option<&str> {
        self.org.as_deref()
    }

    /// Where the private template specs of this view's organisation live.
    pub fn org_specs_dir(&self) -> Option<PathBuf> {
        self.org
            .as_ref()
            .map(|o| self.root.join("orgs").join(o).join("templates"))
    }

    /// Every ref of every namespace (public and all organisations'): what gc must keep.
    pub fn all_refs(&self) -> Vec<ImageRef> {
        let mut out = self.public().list();
        let orgs = std::fs::read_dir(self.root.join("orgs"))
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter_map(|e| e.file_name().to_str().map(str::to_string))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        for o in orgs {
            if let Ok(view) = self.for_org(&o) {
                out.extend(view.list());
            }
        }
        out
    }

    fn lock_file(&self) -> Result<std::fs::File, TemplateError> {
        let p = self.root.join("lock");
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .map_err(io_err(&p))
    }

    /// Takes the store lock: shared for builds, exclusive for gc (blocks until free).
    pub fn lock(&self, exclusive: bool) -> Result<StoreLock, TemplateError> {
        use std::os::fd::AsRawFd;
        let f = self.lock_file()?;
        let op = if exclusive {
            libc::LOCK_EX
        } else {
            libc::LOCK_SH
        };
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(f.as_raw_fd(), op) } != 0 {
            return Err(io_err(&self.root.join("lock"))(
                std::io::Error::last_os_error(),
            ));
        }
        Ok(StoreLock { _file: f })
    }

    fn try_lock_exclusive(&self) -> Result<Option<StoreLock>, TemplateError> {
        use std::os::fd::AsRawFd;
        let f = self.lock_file()?;
        // SAFETY: flock on a file descriptor we own.
        let ok = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
        Ok(ok.then_some(StoreLock { _file: f }))
    }

    /// The layer cached under a role-layer build key, if it is still stored.
    pub fn layer_for_key(&self, key: &str) -> Option<LayerManifest> {
        let p = self
            .root
            .join("keys")
            .join(key.trim_start_matches("sha256:"));
        let digest = std::fs::read_to_string(p).ok()?;
        let digest = digest.trim();
        if self.has_layer(digest) {
            self.layer(digest).ok()
        } else {
            None
        }
    }

    /// Records that `key` built `digest` (atomic replace).
    pub fn set_key(&self, key: &str, digest: &str) -> Result<(), TemplateError> {
        let p = self
            .root
            .join("keys")
            .join(key.trim_start_matches("sha256:"));
        let tmp = p.with_extension("tmp");
        std::fs::write(&tmp, digest).map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, &p).map_err(io_err(&p))
    }

    /// Drops cache index entries whose layer is gone.
    pub fn prune_keys(&self) {
        if let Ok(rd) = std::fs::read_dir(self.root.join("keys")) {
            for e in rd.filter_map(|e| e.ok()) {
                let d = std::fs::read_to_string(e.path()).unwrap_or_default();
                if !self.has_layer(d.trim()) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }

    /// Digests of every stored layer.
    pub fn layer_digests(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.root.join("layers"))
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter_map(|e| e.file_name().to_str().map(|h| format!("sha256:{h}")))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Deletes a layer and its uid-shifted copies: renamed into `tmp/` first, so a half
    /// deleted layer is never visible under `layers/`.
    pub fn remove_layer(&self, digest: &str) -> Result<(), TemplateError> {
        let dir = self.layer_dir(digest);
        let doomed = self
            .root
            .join("tmp")
            .join(format!("gc-{:016x}", rand::random::<u64>()));
        std::fs::rename(&dir, &doomed).map_err(io_err(&dir))?;
        std::fs::remove_dir_all(&doomed).map_err(io_err(&doomed))
    }

    /// Names of every ref file (built or not), sorted.
    pub fn ref_names(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.refs)
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
        names
    }

    /// Removes the ref `name`.
    pub fn remove_ref(&self, name: &str) -> Result<(), TemplateError> {
        if !valid_name(name) {
            return Err(TemplateError::InvalidName(name.to_string()));
        }
        let p = self.refs.join(format!("{name}.json"));
        match std::fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(TemplateError::NotBuilt(name.to_string()))
            }
            Err(e) => Err(io_err(&p)(e)),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The apt cache that role builds share (bind-mounted over the build tree's
    /// `/var/lib/apt/lists` and `/var/cache/apt/archives`, so package lists and downloaded
    /// packages never become part of a layer and later layers reuse them): `(lists, archives)`.
    pub fn apt_cache(&self) -> Result<(PathBuf, PathBuf), TemplateError> {
        let lists = self.root.join("cache/apt/lists");
        let archives = self.root.join("cache/apt/archives");
        for d in [lists.join("partial"), archives.join("partial")] {
            std::fs::create_dir_all(&d).map_err(io_err(&d))?;
        }
        Ok((lists, archives))
    }

    /// Moves the package lists a bootstrap left in `rootfs` into the apt cache (replacing
    /// older copies), leaving the image's list directory empty.
    pub fn take_apt_lists(&self, rootfs: &Path) -> Result<(), TemplateError> {
        let (lists, _) = self.apt_cache()?;
        let from = rootfs.join("var/lib/apt/lists");
        let Ok(rd) = std::fs::read_dir(&from) else {
            return Ok(());
        };
        for e in rd.filter_map(|e| e.ok()) {
            let name = e.file_name();
            if name == "partial" || name == "lock" || name == "auxfiles" {
                continue;
            }
            let to = lists.join(&name);
            std::fs::rename(e.path(), &to).map_err(io_err(&to))?;
        }
        Ok(())
    }

    /// A private view of the apt cache for one role run, inside `scratch`: every package list
    /// and downloaded `.deb` hard-linked in. Concurrent builds each hold their own view, so
    /// apt's lock files (`lists/lock`, `archives/lock`) are never shared between them, while
    /// nothing is copied. Hand the view to `apt_merge_back` after the run.
    pub fn apt_view(&self, scratch: &Path) -> Result<AptView, TemplateError> {
        use std::os::unix::fs::MetadataExt;
        let (lists, archives) = self.apt_cache()?;
        let view = AptView {
            lists: scratch.join("apt/lists"),
            archives: scratch.join("apt/archives"),
            linked: Default::default(),
        };
        let mut linked = std::collections::HashSet::new();
        for (from, to) in [(&lists, &view.lists), (&archives, &view.archives)] {
            let partial = to.join("partial");
            std::fs::create_dir_all(&partial).map_err(io_err(&partial))?;
            for e in std::fs::read_dir(from).map_err(io_err(from))?.flatten() {
                if !apt_cache_file(&e) {
                    continue;
                }
                let dst = to.join(e.file_name());
                // A file gc removes meanwhile is simply not in this view.
                match std::fs::hard_link(e.path(), &dst) {
                    Ok(()) => {
                        if let Ok(m) = std::fs::metadata(&dst) {
                            linked.insert(m.ino());
                        }
                    }
                    Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                    Err(err) => return Err(io_err(&dst)(err)),
                }
            }
        }
        Ok(AptView { linked, ..view })
    }

    /// Publishes what a role run added to its private view (`apt_view`): package lists an
    /// `apt-get update` replaced take the place of the shared ones (atomic renames), new
    /// `.deb` files are linked into the shared cache unless another build got there first.
    pub fn apt_merge_back(&self, view: &AptView) -> Result<(), TemplateError> {
        use std::os::unix::fs::MetadataExt;
        let (lists, archives) = self.apt_cache()?;
        for (to, from) in [(&lists, &view.lists), (&archives, &view.archives)] {
            let Ok(rd) = std::fs::read_dir(from) else {
                continue;
            };
            for e in rd.flatten() {
                if !apt_cache_file(&e) {
                    continue;
                }
                if e.metadata().is_ok_and(|m| view.linked.contains(&m.ino())) {
                    continue;
                }
                let dst = to.join(e.file_name());
                let res = if to == &lists {
                    std::fs::rename(e.path(), &dst)
                } else {
                    std::fs::hard_link(e.path(), &dst)
                };
                match res {
                    Ok(()) => {}
                    Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(err) => return Err(io_err(&dst)(err)),
                }
            }
        }
        Ok(())
    }

    /// Empties the shared download cache (`.deb` files); the package lists stay.
    pub fn clear_apt_archives(&self) -> Result<u64, TemplateError> {
        let (_, archives) = self.apt_cache()?;
        let mut freed = 0;
        for e in std::fs::read_dir(&archives)
            .map_err(io_err(&archives))?
            .flatten()
        {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "deb") {
                freed += e.metadata().map(|m| m.len()).unwrap_or(0);
                std::fs::remove_file(&p).map_err(io_err(&p))?;
            }
        }
        Ok(freed)
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
        std::fs::create_dir_all(&self.refs).map_err(io_err(&self.refs))?;
        let p = self.refs.join(format!("{}.json", r.name));
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
        let p = self.refs.join(format!("{name}.json"));
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

    /// All named images of this view, sorted by name.
    pub fn list(&self) -> Vec<ImageRef> {
        self.ref_names()
            .iter()
            .filter_map(|n| self.get(n).ok())
            .collect()
    }

    /// Root filesystems of an image's layers, top first (overlay `lowerdir` order).
    pub fn lower_dirs(&self, r: &ImageRef) -> Vec<PathBuf> {
        r.layers.iter().map(|l| self.layer_rootfs(l)).collect()
    }
}

/// One role run's view of the apt cache (`ImageStore::apt_view`).
pub struct AptView {
    /// Bound over the build tree's `/var/lib/apt/lists`.
    pub lists: PathBuf,
    /// Bound over the build tree's `/var/cache/apt/archives`.
    pub archives: PathBuf,
    /// The inodes linked in from the shared cache: what the run did not replace is not
    /// published back (a stale list never overwrites a fresher one).
    linked: std::collections::HashSet<u64>,
}

/// A regular file of an apt cache directory, not apt's lock or bookkeeping.
fn apt_cache_file(e: &std::fs::DirEntry) -> bool {
    let name = e.file_name();
    name != "lock"
        && name != "partial"
        && name != "auxfiles"
        && e.file_type().is_ok_and(|t| t.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apt_views_are_private_and_merge_back_what_a_run_added() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = ImageStore::open(dir.path()).expect("open");
        let (lists, archives) = store.apt_cache().expect("cache");
        std::fs::write(lists.join("d_Packages"), "old").expect("write");
        std::fs::write(archives.join("a.deb"), "a").expect("write");
        let (s1, s2) = (
            store.scratch("r1").expect("s"),
            store.scratch("r2").expect("s"),
        );
        let (v1, v2) = (
            store.apt_view(&s1).expect("view"),
            store.apt_view(&s2).expect("view"),
        );
        let (vl1, va1, va2) = (&v1.lists, &v1.archives, &v2.archives);
        assert_eq!(
            std::fs::read_to_string(va1.join("a.deb")).expect("read"),
            "a"
        );
        // apt's lock files are per view, never the shared ones.
        std::fs::write(va1.join("lock"), "").expect("lock");
        assert!(!va2.join("lock").exists() && !archives.join("lock").exists());
        // Run 1 refreshes the lists (apt renames new files in) and downloads b.deb;
        // run 2 downloads b.deb too.
        std::fs::write(vl1.join("d_Packages.new"), "new").expect("write");
        std::fs::rename(vl1.join("d_Packages.new"), vl1.join("d_Packages")).expect("rename");
        std::fs::write(va1.join("b.deb"), "b1").expect("write");
        std::fs::write(va2.join("b.deb"), "b2").expect("write");
        store.apt_merge_back(&v1).expect("merge");
        store.apt_merge_back(&v2).expect("merge");
        assert_eq!(
            std::fs::read_to_string(lists.join("d_Packages")).expect("read"),
            "new"
        );
        assert_eq!(
            std::fs::read_to_string(archives.join("b.deb")).expect("read"),
            "b1"
        );
        assert!(!archives.join("lock").exists());
        // Removing the shared download cache leaves a running view's files alone.
        store.clear_apt_archives().expect("clear");
        assert!(va2.join("a.deb").is_file() && !archives.join("a.deb").exists());
    }

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
            template: None,
        };
        store.set_ref(&r).expect("set");
        assert_eq!(store.get("base").expect("get"), r);
        assert!(matches!(store.get("nope"), Err(TemplateError::NotBuilt(_))));
        assert!(matches!(
            store.get("../x"),
            Err(TemplateError::InvalidName(_))
        ));
        assert_eq!(store.list().len(), 1);

        // An organisation's refs are its own; the layers are shared; gc sees every namespace.
        let acme = store.for_org("org_acme").expect("view");
        assert!(matches!(acme.get("base"), Err(TemplateError::NotBuilt(_))));
        let mine = ImageRef {
            name: "mine".into(),
            ..r.clone()
        };
        acme.set_ref(&mine).expect("set private");
        assert_eq!(acme.get("mine").expect("get"), mine);
        assert!(matches!(store.get("mine"), Err(TemplateError::NotBuilt(_))));
        assert!(matches!(
            store.for_org("org_other").expect("view").get("mine"),
            Err(TemplateError::NotBuilt(_))
        ));
        assert_eq!(store.list().len(), 1);
        assert_eq!(store.all_refs().len(), 2);
        assert!(store.for_org("../x").is_err());
        assert_eq!(acme.public().get("base").expect("public"), r);
    }
}
