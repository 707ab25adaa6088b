//! Builds the Debian base layer, `minbase` from the host's own Debian mirror, with
//! `mmdebstrap` (default) or `debootstrap`, and publishes it in the image store as the `debian`
//! image, the bottom layer of every template.
//!
//! The layer carries what Ansible needs to manage it (`python3`, `python3-apt`), so no role
//! has to bootstrap Python. With mmdebstrap, dpkg is told to leave out documentation, manual
//! pages and translations (as Debian's "slim" container images do; the rule stays in the image,
//! so packages installed later skip them too), and the package lists it downloaded are moved
//! into the store's apt cache, where role builds find them (`ImageStore::apt_cache`).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

use crate::store::{ImageRef, ImageStore};
use crate::{io_err, TemplateError, LAYER_FORMAT_VERSION};

/// The ref name of the base image.
pub const DEBIAN_REF: &str = "debian";

/// Packages every base layer gets on top of minbase: what Ansible's modules need.
pub const ANSIBLE_PACKAGES: &[&str] = &["python3", "python3-apt"];

/// dpkg path filters of the mmdebstrap base (what Debian's slim images leave out).
pub const DPKG_EXCLUDES: &[&str] = &[
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/groff/*",
    "path-exclude=/usr/share/lintian/*",
    "path-exclude=/usr/share/linda/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
];

/// The program that bootstraps the base layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Bootstrapper {
    /// `mmdebstrap`: one apt solve, parallel downloads, dpkg path filters (default).
    #[default]
    Mmdebstrap,
    /// `debootstrap`: the classic shell implementation; no path filters.
    Debootstrap,
}

impl Bootstrapper {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Mmdebstrap => "mmdebstrap",
            Self::Debootstrap => "debootstrap",
        }
    }
}

impl std::str::FromStr for Bootstrapper {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "mmdebstrap" => Ok(Self::Mmdebstrap),
            "debootstrap" => Ok(Self::Debootstrap),
            other => Err(format!(
                "unknown bootstrapper `{other}` (use mmdebstrap or debootstrap)"
            )),
        }
    }
}

/// What goes into the base layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseSpec {
    pub suite: String,
    pub variant: String,
    /// Archive URI; `None` = read it from the host's apt sources.
    pub mirror: Option<String>,
    /// Packages on top of the variant (`ANSIBLE_PACKAGES` by default).
    pub include: Vec<String>,
    pub tool: Bootstrapper,
}

impl Default for BaseSpec {
    fn default() -> Self {
        Self {
            suite: "bookworm".into(),
            variant: "minbase".into(),
            mirror: None,
            include: ANSIBLE_PACKAGES.iter().map(|s| s.to_string()).collect(),
            tool: Bootstrapper::default(),
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
        "kiln-layer-v{LAYER_FORMAT_VERSION}\nbase\n{}\nsuite={}\nvariant={}\nmirror={}\ninclude={}\n",
        spec.tool.as_str(),
        spec.suite,
        spec.variant,
        mirror,
        spec.include.join(",")
    ));
    if spec.tool == Bootstrapper::Mmdebstrap {
        h.update(DPKG_EXCLUDES.join("\n"));
    }
    format!("sha256:{}", hex::encode(h.finalize()))
}

/// The command line that bootstraps `rootfs`.
fn command(spec: &BaseSpec, exe: &Path, rootfs: &Path, mirror: &str) -> Command {
    let mut cmd = Command::new(exe);
    cmd.arg(format!("--variant={}", spec.variant));
    if !spec.include.is_empty() {
        cmd.arg(format!("--include={}", spec.include.join(",")));
    }
    if spec.tool == Bootstrapper::Mmdebstrap {
        for o in DPKG_EXCLUDES {
            cmd.arg(format!("--dpkgopt={o}"));
        }
        // The lists stay for the store's apt cache; Kiln moves them out of the layer.
        cmd.arg("--skip=cleanup/apt/lists");
    }
    cmd.arg(&spec.suite).arg(rootfs).arg(mirror);
    cmd
}

/// The progress stage of one line the bootstrapper printed (without its `I: `).
fn stage_of(msg: &str) -> &'static str {
    let m = msg.to_ascii_lowercase();
    if m.starts_with("retrieving")
        || m.starts_with("validating")
        || m.contains("apt-get update")
        || m.starts_with("downloading")
    {
        "fetch"
    } else if m.starts_with("extracting") || m.starts_with("unpacking") {
        "unpack"
    } else if m.starts_with("configuring") || m.starts_with("installing") {
        "configure"
    } else {
        "resolve"
    }
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
    let tool = spec.tool.as_str();
    report(
        "resolve",
        format!("{tool} {} ({}) from {mirror}", spec.suite, spec.variant),
    );
    let exe = which(tool).ok_or_else(|| TemplateError::MissingTool {
        tool: tool.into(),
        hint: format!("run `make deps` (or `apt-get install {tool}`)"),
    })?;
    let scratch = store.scratch("base")?;
    let rootfs = scratch.join("rootfs");
    let result = (|| {
        let mut cmd = command(spec, &exe, &rootfs, &mirror);
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(Stdio::null());
        let mut child = cmd.spawn().map_err(io_err(&exe))?;
        // debootstrap reports on stdout, mmdebstrap on stderr: read both, in arrival order.
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let readers: Vec<_> = [
            child
                .stdout
                .take()
                .map(|o| Box::new(o) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|e| Box::new(e) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        .map(|r| {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(r).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            })
        })
        .collect();
        drop(tx);
        let mut tail = Vec::new();
        for line in rx {
            if let Some(msg) = line.strip_prefix("I: ") {
                report(stage_of(msg), msg.to_string());
            }
            tail.push(line);
            if tail.len() > 30 {
                tail.remove(0);
            }
        }
        for r in readers {
            let _ = r.join();
        }
        let status = child.wait().map_err(io_err(&exe))?;
        if !status.success() {
            return Err(TemplateError::ToolFailed {
                tool: tool.into(),
                status: status.to_string(),
                tail: tail.join("\n"),
            });
        }
        store.take_apt_lists(&rootfs)?;
        prepare_rootfs(&rootfs)?;
        report("digest", "hashing the root filesystem".into());
        let source = format!(
            "{tool} --variant={} --include={} {} {mirror}",
            spec.variant,
            spec.include.join(","),
            spec.suite
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
        let s3 = BaseSpec {
            tool: Bootstrapper::Debootstrap,
            ..BaseSpec::default()
        };
        assert_ne!(a, build_key(&s3, "http://m/debian"));
    }

    #[test]
    fn command_lines() {
        let line = |tool| {
            let spec = BaseSpec {
                tool,
                ..BaseSpec::default()
            };
            let c = command(
                &spec,
                Path::new("/usr/bin/x"),
                Path::new("/s/rootfs"),
                "http://m/debian",
            );
            c.get_args()
                .map(|a| a.to_string_lossy().to_string())
                .collect::<Vec<_>>()
                .join(" ")
        };
        expect_test::expect![[r#"
            --variant=minbase --include=python3,python3-apt --dpkgopt=path-exclude=/usr/share/man/* --dpkgopt=path-exclude=/usr/share/info/* --dpkgopt=path-exclude=/usr/share/groff/* --dpkgopt=path-exclude=/usr/share/lintian/* --dpkgopt=path-exclude=/usr/share/linda/* --dpkgopt=path-exclude=/usr/share/doc/* --dpkgopt=path-include=/usr/share/doc/*/copyright --dpkgopt=path-exclude=/usr/share/locale/* --dpkgopt=path-include=/usr/share/locale/locale.alias --skip=cleanup/apt/lists bookworm /s/rootfs http://m/debian"#]]
        .assert_eq(&line(Bootstrapper::Mmdebstrap));
        expect_test::expect![[
            r#"--variant=minbase --include=python3,python3-apt bookworm /s/rootfs http://m/debian"#
        ]]
        .assert_eq(&line(Bootstrapper::Debootstrap));
        assert_eq!(stage_of("downloading packages with apt..."), "fetch");
        assert_eq!(stage_of("Extracting zlib1g..."), "unpack");
        assert_eq!(stage_of("installing essential packages..."), "configure");
    }
}
