//! Template builds: the Debian base image, then one cached layer per Ansible role, published
//! as a named ref with its manifest; plus inspection, removal and garbage collection.
//!
//! Architecture invariant: a role layer's key is sha256(layer format version, parent layer
//! digest, the files of the role and of the roles it depends on, the variables it sees, the
//! wrapping playbook). Equal key = reuse the stored layer; nothing else decides reuse.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::ansible::{self, RoleEvent, RoleRun};
use crate::base::{self, BaseSpec};
use crate::spec::{self, ResolvedTemplate, Sources};
use crate::store::{ImageRef, ImageStore, RoleLayer, TemplateManifest};
use crate::{io_err, TemplateError};

/// A build step, as shown to people (progress bars, lines) and machines (NDJSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum BuildEvent {
    /// The plan: every layer to come, bottom first (`debian` is the debootstrap image).
    Plan {
        template: String,
        layers: Vec<String>,
    },
    /// A layer starts; `tasks` estimates its Ansible tasks (for a bar).
    LayerStart {
        index: usize,
        role: String,
        key: String,
        cached: bool,
        tasks: u64,
    },
    /// Progress inside a layer: an Ansible task or a debootstrap stage.
    Step {
        index: usize,
        role: String,
        n: u64,
        message: String,
    },
    LayerDone {
        index: usize,
        role: String,
        digest: String,
        size_bytes: u64,
        cached: bool,
        seconds: f64,
    },
    /// The template ref now points at the new stack.
    Done {
        template: String,
        layers: usize,
        size_bytes: u64,
        rebuilt: usize,
        seconds: f64,
    },
}

/// Build options.
#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    /// Rebuild every layer even when its key is cached.
    pub no_cache: bool,
    /// Debian mirror for the base image (default: host apt sources).
    pub mirror: Option<String>,
    /// The program that bootstraps the base image (default mmdebstrap).
    pub bootstrapper: base::Bootstrapper,
}

/// Builds template `name` and points its ref at the result. A failure leaves the previous
/// ref untouched (layers finished before the failure stay cached).
pub fn build(
    store: &ImageStore,
    src: &Sources,
    name: &str,
    opts: &BuildOptions,
    on: &mut dyn FnMut(BuildEvent),
) -> Result<ImageRef, TemplateError> {
    let start = Instant::now();
    let t = spec::resolve(src, name)?;
    let _lock = store.lock(false)?;
    let mut plan = vec![base::DEBIAN_REF.to_string()];
    plan.extend(t.roles.iter().cloned());
    on(BuildEvent::Plan {
        template: name.to_string(),
        layers: plan.clone(),
    });
    let base_spec = BaseSpec {
        mirror: opts.mirror.clone(),
        tool: opts.bootstrapper,
        ..BaseSpec::default()
    };
    let mirror = base::resolve_mirror(&base_spec)?;
    let base_key = base::build_key(&base_spec, &mirror);
    let base_cached = !opts.no_cache
        && store
            .public()
            .get(base::DEBIAN_REF)
            .is_ok_and(|r| r.build_key == base_key);
    on(BuildEvent::LayerStart {
        index: 0,
        role: base::DEBIAN_REF.into(),
        key: base_key,
        cached: base_cached,
        tasks: 0,
    });
    let t0 = Instant::now();
    let debian = base::build_base(store, &base_spec, opts.no_cache, &mut |p| {
        on(BuildEvent::Step {
            index: 0,
            role: base::DEBIAN_REF.into(),
            n: p.step,
            message: format!("[{}] {}", p.stage, p.message),
        })
    })?;
    let base_layer = store.layer(&debian.layers[0])?;
    on(BuildEvent::LayerDone {
        index: 0,
        role: base::DEBIAN_REF.into(),
        digest: base_layer.digest.clone(),
        size_bytes: base_layer.size_bytes,
        cached: base_cached,
        seconds: t0.elapsed().as_secs_f64(),
    });
    let mut rebuilt = usize::from(!base_cached);
    let mut stack = vec![base_layer.digest.clone()]; // bottom first
    let mut roles = Vec::new();
    let mut size = base_layer.size_bytes;
    for (i, role) in t.roles.iter().enumerate() {
        let index = i + 1;
        let closure = spec::role_closure(src, role, name)?;
        let vars = spec::layer_vars(src, &t, &closure);
        let pb = ansible::playbook(role);
        let parent = stack.last().cloned().unwrap_or_default();
        let key = spec::layer_key(src, &parent, &closure, &vars, &pb)?;
        let cached = if opts.no_cache {
            None
        } else {
            store.layer_for_key(&key)
        };
        on(BuildEvent::LayerStart {
            index,
            role: role.clone(),
            key: key.clone(),
            cached: cached.is_some(),
            tasks: estimate_tasks(src, &closure),
        });
        let t0 = Instant::now();
        let was_cached = cached.is_some();
        let layer = match cached {
            Some(l) => l,
            None => {
                rebuilt += 1;
                let scratch = store.scratch(&format!("role-{role}"))?;
                let apt = store.apt_view(&scratch)?;
                let lower: Vec<PathBuf> =
                    stack.iter().rev().map(|d| store.layer_rootfs(d)).collect();
                let result = ansible::run_role(
                    &RoleRun {
                        ansible_dir: &src.ansible,
                        role,
                        lower: &lower,
                        vars: &vars,
                        applied_deps: &closure,
                        scratch: &scratch,
                        apt_cache: Some((&apt.lists, &apt.archives)),
                    },
                    &mut |e| match e {
                        RoleEvent::Task { n, name } => on(BuildEvent::Step {
                            index,
                            role: role.clone(),
                            n,
                            message: name,
                        }),
                    },
                )
                .and_then(|upper| {
                    store.apt_merge_back(&apt)?;
                    let l = store.publish(
                        &upper,
                        Some(parent.clone()),
                        &key,
                        &match store.org() {
                            // Layers are shared: a private template's name stays private.
                            Some(_) => format!("ansible role {role} (a private template)"),
                            None => format!("ansible role {role} (template {name})"),
                        },
                    )?;
                    store.set_key(&key, &l.digest)?;
                    Ok(l)
                });
                let _ = std::fs::remove_dir_all(&scratch);
                result?
            }
        };
        on(BuildEvent::LayerDone {
            index,
            role: role.clone(),
            digest: layer.digest.clone(),
            size_bytes: layer.size_bytes,
            cached: was_cached,
            seconds: t0.elapsed().as_secs_f64(),
        });
        size += layer.size_bytes;
        roles.push(RoleLayer {
            role: role.clone(),
            digest: layer.digest.clone(),
            key,
            size_bytes: layer.size_bytes,
            vars: vars.clone(),
        });
        stack.push(layer.digest);
    }
    let mut layers: Vec<String> = stack.iter().rev().cloned().collect();
    layers.dedup();
    let top_key = roles
        .last()
        .map(|r| r.key.clone())
        .unwrap_or_else(|| debian.build_key.clone());
    let tools = read_tools(store, &layers);
    let r = ImageRef {
        name: name.to_string(),
        layers,
        build_key: top_key,
        size_bytes: size,
        created_at_ms: crate::now_ms(),
        template: Some(TemplateManifest {
            description: t.description.clone(),
            base: debian.layers[0].clone(),
            roles,
            vars: t.vars.clone(),
            tools,
        }),
    };
    store.set_ref(&r)?;
    on(BuildEvent::Done {
        template: name.to_string(),
        layers: r.layers.len(),
        size_bytes: r.size_bytes,
        rebuilt,
        seconds: start.elapsed().as_secs_f64(),
    });
    Ok(r)
}

/// Rough task count of a role run (for a progress bar): `- name:` lines in its tasks.
fn estimate_tasks(src: &Sources, closure: &[String]) -> u64 {
    // The Python bootstrap, one no-op per dependency stub, the role's own tasks.
    let mut n = closure.len() as u64;
    if let Some(r) = closure.last() {
        let dir = src.roles_dir().join(r).join("tasks");
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.filter_map(|e| e.ok()) {
                if let Ok(text) = std::fs::read_to_string(e.path()) {
                    n += text
                        .lines()
                        .filter(|l| l.trim_start().starts_with("- name:"))
                        .count() as u64;
                }
            }
        }
    }
    n
}

/// Tool versions the roles recorded in `/etc/kiln/tools.d/*.tsv` (`tool<TAB>version or
/// "unavailable: why"`), read through the layer stack (top layer wins).
pub fn read_tools(store: &ImageStore, layers_top_first: &[String]) -> BTreeMap<String, String> {
    let mut files: BTreeMap<String, PathBuf> = BTreeMap::new();
    for l in layers_top_first {
        let dir = store.layer_rootfs(l).join("etc/kiln/tools.d");
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.filter_map(|e| e.ok()) {
                let n = e.file_name().to_string_lossy().to_string();
                files.entry(n).or_insert_with(|| e.path());
            }
        }
    }
    let mut tools = BTreeMap::new();
    for p in files.values() {
        if let Ok(text) = std::fs::read_to_string(p) {
            for line in text.lines() {
                if let Some((k, v)) = line.split_once('\t') {
                    tools.insert(k.trim().to_string(), v.trim().to_string());
                }
            }
        }
    }
    tools
}

/// Whether the ref of `name` matches its spec as the sources stand now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheState {
    /// Every layer key matches: a build would reuse everything.
    Fresh,
    /// Some role, variable or parent changed since the build.
    Stale,
    /// No spec for it (e.g. the `debian` image), or the spec does not resolve.
    NoSpec,
}

/// A built template as `inspect` and `ls` show it: the ref and manifest, plus whether the
/// sources still match it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TemplateInfo {
    #[serde(flatten)]
    pub image: ImageRef,
    pub cache: CacheState,
}

/// [`TemplateInfo`] of one ref.
pub fn info(store: &ImageStore, src: &Sources, name: &str) -> Result<TemplateInfo, TemplateError> {
    let image = store.get(name)?;
    let cache = cache_state(src, &image);
    Ok(TemplateInfo { image, cache })
}

/// [`TemplateInfo`] of every built ref, sorted by name.
pub fn list(store: &ImageStore, src: &Sources) -> Vec<TemplateInfo> {
    store
        .list()
        .into_iter()
        .map(|image| TemplateInfo {
            cache: cache_state(src, &image),
            image,
        })
        .collect()
}

/// Computes the cache state of a built template without building.
pub fn cache_state(src: &Sources, r: &ImageRef) -> CacheState {
    let Some(m) = &r.template else {
        return CacheState::NoSpec;
    };
    let Ok(t) = spec::resolve(src, &r.name) else {
        return CacheState::NoSpec;
    };
    if t.roles.len() != m.roles.len() {
        return CacheState::Stale;
    }
    let mut parent = m.base.clone();
    for (role, built) in t.roles.iter().zip(&m.roles) {
        let Ok(closure) = spec::role_closure(src, role, &r.name) else {
            return CacheState::NoSpec;
        };
        let vars = spec::layer_vars(src, &t, &closure);
        match spec::layer_key(src, &parent, &closure, &vars, &ansible::playbook(role)) {
            Ok(k) if k == built.key && *role == built.role => {}
            _ => return CacheState::Stale,
        }
        parent = built.digest.clone();
    }
    CacheState::Fresh
}

/// Removes the ref `name` (its layers stay until [`gc`]).
pub fn remove(store: &ImageStore, name: &str) -> Result<ImageRef, TemplateError> {
    let r = store.get(name)?;
    store.remove_ref(name)?;
    Ok(r)
}

/// What [`gc`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcReport {
    pub removed: Vec<String>,
    pub freed_bytes: u64,
    pub kept: usize,
}

/// Removes every layer (and its uid-shifted copies) that no ref uses, no mounted overlay on
/// this host uses (live sandboxes), and that is not in `keep` (layers the caller knows are
/// used), and empties the shared apt download cache. Runs under the store's exclusive lock,
/// so never during a build.
pub fn gc(store: &ImageStore, keep: &BTreeSet<String>) -> Result<GcReport, TemplateError> {
    let _lock = store.lock(true)?;
    let mut used: BTreeSet<String> = keep.clone();
    for r in store.all_refs() {
        used.extend(r.layers);
    }
    used.extend(mounted_layers(store.root()));
    let mut report = GcReport::default();
    for d in store.layer_digests() {
        if used.contains(&d) {
            report.kept += 1;
            continue;
        }
        report.freed_bytes += store.layer(&d).map(|l| l.size_bytes).unwrap_or(0);
        store.remove_layer(&d)?;
        report.removed.push(d);
    }
    store.prune_keys();
    report.freed_bytes += store.clear_apt_archives()?;
    Ok(report)
}

/// Layers referenced by overlay mounts on this host (sandboxes' root filesystems), read from
/// `/proc/self/mountinfo`.
pub fn mounted_layers(root: &Path) -> BTreeSet<String> {
    let root = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf());
    let prefix = format!("{}/", root.join("layers").display());
    let mut out = BTreeSet::new();
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return out;
    };
    for line in text.lines() {
        let mut rest = line;
        while let Some(i) = rest.find(&prefix) {
            let after = &rest[i + prefix.len()..];
            let hex: String = after
                .chars()
                .take_while(|c| c.is_ascii_hexdigit())
                .collect();
            if hex.len() == 64 {
                out.insert(format!("sha256:{hex}"));
            }
            rest = &after[hex.len()..];
        }
    }
    out
}

/// Reads a file of the source tree for `kiln template test`: a role's `tests/verify.sh`.
pub fn verify_script(src: &Sources, role: &str) -> Result<Option<Vec<u8>>, TemplateError> {
    let p = src.roles_dir().join(role).join("tests/verify.sh");
    match std::fs::read(&p) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(&p)(e)),
    }
}

/// The resolved spec of a template (for `inspect` before a build).
pub fn resolve(src: &Sources, name: &str) -> Result<ResolvedTemplate, TemplateError> {
    spec::resolve(src, name)
}
