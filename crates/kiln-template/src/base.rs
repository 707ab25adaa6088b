//! Builds the Debian base layer with `debootstrap --variant=minbase` against the host's own
//! Debian mirror, and publishes it in the image store as the `debian` image, the bottom layer
//! of every template.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

use crate::store::{ImageRef, ImageStore};
use crate::{io_err, TemplateError, LAYER_FORMAT_VERSION};

/// The ref name of the debootstrap image.
pub const DEBIAN_REF: &str = "debian";

/// What goes into the base layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseSpec {
    pub suite: String,
    pub variant: String,
    /// Archive URI; `None` = read it from the host's apt sources.
    pub mirror: Option<String>,
    /// Extra packages for `--include`.
    pub include: Vec<String>,
}

impl Default for BaseSpec {
    fn default() -> Self {
        Self {
            suite: "bookworm".into(),
            variant: "minbase".into(),
            mirror: None,
            include: Vec::new(),
        }
    }
}

/// One step of a long build, for progress display.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// Short stage name: `resolve`, `fetch`, `unpack`, `configure`, `digest`, `publish`, `cached`, `done`.
    pub stage: String,
    /// Steps done so far within the whole build (monotonic).
    pub step: u64,
    pub message: String,
}

/// Where the mirror comes from: the spec, or the host's apt sources.
pub fn resolve_mirror(spec: &BaseSpec) -> Result<String, TemplateError> {
    if let Some(m) = &spec.mirror {
        return Ok(m.trim_end_matches('/').to_string());
    }
    let sources = crate::apt_sources::read_sources(Path::new("/etc/apt"));
    crate::apt_sources::pick_mirror(&sources, &spec.suite).ok_or_else(|| {
        TemplateError::NoMirror(format!(
            "no `deb` entry for suite {} with component main in /etc/apt/sources.list[.d]; \
             add one or pass --mirror URL",
            spec.suite
        ))
    })
}

/// The build key of the base layer: everything that determines its content.
pub fn build_key(spec: &BaseSpec, mirror: &str) -> String {
    let mut h = Sha256::new();
    h.update(format!(
        "kiln-layer-v{LAYER_FORMAT_VERSION}\nbase\ndebootstrap\nsuite={}\nvariant={}\nmirror={}\ninclude={}\n",
        spec.suite,
        spec.variant,
        mirror,
        spec.include.join(",")
    ));
    format!("sha256:{}", hex::encode(h.finalize()))
}

/// Builds (or reuses) the base image and points the `debian` ref at it.
/// Reuses the existing layer when the build key is unchanged, unless `force`.
pub fn build_base(
    store: &ImageStore,
    spec: &BaseSpec,
    force: bool,
    progress: &mut dyn FnMut(Progress),
) -> Result<ImageRef, TemplateError> {
    // The Debian image is always public, whichever view builds on it.
    let store = &store.public();
    let mut step = 0u64;
    let mut report = |stage: &str, message: String| {
        step += 1;
        progress(Progress {
            stage: stage.into(),
            step,
            message,
        });
    };
    let mirror = resolve_mirror(spec)?;
    let key = build_key(spec, &mirror);
    if !force {
        if let Ok(existing) = store.get(DEBIAN_REF) {
            if existing.build_key == key {
                report(
                    "cached",
                    format!("base image {} is up to date", existing.layers[0]),
                );
                return Ok(existing);
            }
        }
    }
    report(
        "resolve",
        format!(
            "debootstrap {} ({}) from {mirror}",
            spec.suite, spec.variant
        ),
    );
    let debootstrap = which("debootstrap").ok_or_else(|| TemplateError::MissingTool {
        tool: "debootstrap".into(),
        hint: "run `make deps` (or `apt-get install debootstrap`)".into(),
    })?;
    let scratch = store.scratch("base")?;
    let rootfs = scratch.join("rootfs");
    let result = (|| {
        let mut cmd = Command::new(debootstrap);
        cmd.arg(format!("--variant={}", spec.variant));
        if !spec.include.is_empty() {
            cmd.arg(format!("--include={}", spec.include.join(",")));
        }
        cmd.arg(&spec.suite).arg(&rootfs).arg(&mirror);
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(Stdio::null());
        let mut child = cmd.spawn().map_err(io_err(Path::new("debootstrap")))?;
        let stderr = child.stderr.take();
        let err_thread = std::thread::spawn(move || {
            let mut tail = Vec::new();
            if let Some(e) = stderr {
                for line in BufReader::new(e).lines().map_while(Result::ok) {
                    tail.push(line);
                    if tail.len() > 20 {
                        tail.remove(0);
                    }
                }
            }
            tail
        });
        let mut tail = Vec::new();
        if let Some(out) = child.stdout.take() {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let stage = if line.starts_with("I: Retrieving")
                    || line.starts_with("I: Validating")
                {
                    "fetch"
                } else if line.starts_with("I: Extracting") || line.starts_with("I: Unpacking") {
                    "unpack"
                } else if line.starts_with("I: Configuring") || line.starts_with("I: Installing") {
                    "configure"
                } else {
                    "resolve"
                };
                if let Some(msg) = line.strip_prefix("I: ") {
                    report(stage, msg.to_string());
                }
                tail.push(line);
                if tail.len() > 20 {
                    tail.remove(0);
                }
            }
        }
        let status = child.wait().map_err(io_err(Path::new("debootstrap")))?;
        let errs = err_thread.join().unwrap_or_default();
        if !status.success() {
            tail.extend(errs);
            return Err(TemplateError::ToolFailed {
                tool: "debootstrap".into(),
                status: status.to_string(),
                tail: tail.join("\n"),
            });
        }
        prepare_rootfs(&rootfs)?;
        report("digest", "hashing the root filesystem".into());
        let source = format!(
            "debootstrap --variant={} {} {mirror}",
            spec.variant, spec.suite
        );
        let layer = store.publish(&rootfs, None, &key, &source)?;
        report("publish", format!("layer {}", layer.digest));
        let r = ImageRef {
            name: DEBIAN_REF.into(),
            layers: vec![layer.digest.clone()],
            build_key: key.clone(),
            size_bytes: layer.size_bytes,
            created_at_ms: crate::now_ms(),
            template: None,
        };
        store.set_ref(&r)?;
        Ok(r)
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    let r = result?;
    report("done", format!("debian image ready: {}", r.layers[0]));
    Ok(r)
}

/// Makes a fresh rootfs ready to be a sandbox image: mount points for what the runtime
/// bind-mounts in (so no sandbox has to create them in its writable layer), and no host
/// identity left behind.
pub fn prepare_rootfs(rootfs: &Path) -> Result<(), TemplateError> {
    for d in [".kiln/run", "workspace"] {
        let p = rootfs.join(d);
        std::fs::create_dir_all(&p).map_err(io_err(&p))?;
    }
    for f in [
        ".kiln/kilnd",
        "etc/hosts",
        "etc/hostname",
        "etc/resolv.conf",
    ] {
        let p = rootfs.join(f);
        // Replace symlinks (resolv.conf may be one) with plain files usable as bind targets.
        if std::fs::symlink_metadata(&p).is_ok_and(|m| !m.is_file()) {
            std::fs::remove_file(&p).map_err(io_err(&p))?;
        }
        std::fs::write(&p, b"").map_err(io_err(&p))?;
    }
    let mid = rootfs.join("etc/machine-id");
    if mid.exists() {
        std::fs::write(&mid, b"").map_err(io_err(&mid))?;
    }
    Ok(())
}

fn which(tool: &str) -> Option<std::path::PathBuf> {
    for dir in [
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
        "/usr/local/sbin",
        "/usr/local/bin",
    ] {
        let p = Path::new(dir).join(tool);
        if p.is_file() {
            return Some(p);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_key_changes_with_inputs() {
        let s = BaseSpec::default();
        let a = build_key(&s, "http://m/debian");
        assert_eq!(a, build_key(&s, "http://m/debian"));
        assert_ne!(a, build_key(&s, "http://other/debian"));
        let s2 = BaseSpec {
            include: vec!["procps".into()],
            ..BaseSpec::default()
        };
        assert_ne!(a, build_key(&s2, "http://m/debian"));
    }
}
