//! `kiln bench template`: build times of templates (cold from an empty store with `--cold`,
//! no-change rebuild, one-role-change rebuild) and their layer sizes, measured in-process
//! around the same build code `kiln template build` runs.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use kiln_template::template::{self, BuildOptions};
use kiln_template::{Bootstrapper, ImageStore, Sources};
use serde::Serialize;

use crate::template::SourceArgs;
use crate::Global;

#[derive(Args)]
pub struct TemplateBench {
    /// Templates to measure, in order [default: base python]
    pub names: Vec<String>,
    /// Image store for the warm measurements [default: <data dir>/images]
    #[arg(long, env = "KILN_IMAGES_DIR")]
    pub images_dir: Option<PathBuf>,
    #[command(flatten)]
    pub src: SourceArgs,
    /// Also build each template cold, in a throwaway empty store (base image included)
    #[arg(long)]
    pub cold: bool,
    /// With --cold: also bootstrap the base image with debootstrap in another empty store,
    /// the baseline for the default mmdebstrap (time and size ratio)
    #[arg(long, requires = "cold")]
    pub compare_debootstrap: bool,
    /// Print one JSON object
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct LayerSize {
    role: String,
    digest: String,
    size_bytes: u64,
}

#[derive(Debug, Serialize)]
struct LayerTime {
    role: String,
    seconds: f64,
    cached: bool,
}

#[derive(Debug, Serialize)]
struct TemplateFigures {
    template: String,
    cold_build_s: Option<f64>,
    /// Each layer's time in the cold build.
    cold_layers: Vec<LayerTime>,
    /// The build in the given store as it stood (cached layers reused).
    build_s: f64,
    layers_rebuilt: usize,
    no_change_rebuild_s: f64,
    /// The top role whose variable was changed, and the rebuild time.
    one_role_change: String,
    one_role_change_rebuild_s: f64,
    one_role_change_layers_rebuilt: usize,
    layers: Vec<LayerSize>,
    total_size_bytes: u64,
}

fn timed_build(store: &ImageStore, src: &Sources, name: &str) -> Result<(f64, usize)> {
    let (s, rebuilt, _) = timed_build_with(store, src, name, &BuildOptions::default())?;
    Ok((s, rebuilt))
}

/// One build: its time, the layers rebuilt, and each layer's time.
fn timed_build_with(
    store: &ImageStore,
    src: &Sources,
    name: &str,
    opts: &BuildOptions,
) -> Result<(f64, usize, Vec<LayerTime>)> {
    let t0 = Instant::now();
    let mut rebuilt = 0;
    let mut layers = Vec::new();
    template::build(store, src, name, opts, &mut |e| match e {
        template::BuildEvent::Done { rebuilt: r, .. } => rebuilt = r,
        template::BuildEvent::LayerDone {
            role,
            seconds,
            cached,
            ..
        } => layers.push(LayerTime {
            role,
            seconds: round(seconds),
            cached,
        }),
        _ => {}
    })
    .with_context(|| format!("building {name}"))?;
    Ok((round(t0.elapsed().as_secs_f64()), rebuilt, layers))
}

/// The base image bootstrapped with `tool` in an empty store next to `root`: seconds and size.
fn cold_base(root: &Path, tool: Bootstrapper) -> Result<(f64, u64)> {
    let dir = root.join(format!("cold-debian-{}", tool.as_str()));
    let store = ImageStore::open(&dir)?;
    let spec = kiln_template::BaseSpec {
        tool,
        ..Default::default()
    };
    let t0 = Instant::now();
    let r = kiln_template::base::build_base(&store, &spec, true, &mut |_| {})
        .with_context(|| format!("bootstrapping with {}", tool.as_str()))?;
    let s = round(t0.elapsed().as_secs_f64());
    drop(store);
    std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    Ok((s, r.size_bytes))
}

fn round(s: f64) -> f64 {
    (s * 100.0).round() / 100.0
}

/// A copy of the specs where `name` sets one more variable of its top role.
fn changed_specs(src: &Sources, name: &str, role: &str, dir: &Path) -> Result<Sources> {
    for n in src.template_names() {
        let from = src.templates.join(format!("{n}.toml"));
        let mut text = std::fs::read_to_string(&from)
            .with_context(|| format!("reading {}", from.display()))?;
        if n == name {
            let line = format!("{role}_kiln_bench = \"{:x}\"\n", rand::random::<u64>());
            text = match text.find("\n[vars]\n") {
                Some(i) => format!("{}{line}{}", &text[..i + 8], &text[i + 8..]),
                None => format!("{text}\n[vars]\n{line}"),
            };
        }
        std::fs::write(dir.join(format!("{n}.toml")), text)?;
    }
    Ok(Sources {
        templates: dir.to_path_buf(),
        ansible: src.ansible.clone(),
        private: None,
    })
}

fn measure(
    store: &ImageStore,
    src: &Sources,
    name: &str,
    cold_root: Option<&Path>,
) -> Result<TemplateFigures> {
    let (cold_build_s, cold_layers) = match cold_root {
        Some(root) => {
            let dir = root.join(format!("cold-{name}"));
            let cold = ImageStore::open(&dir)?;
            let (s, _, layers) = timed_build_with(&cold, src, name, &BuildOptions::default())?;
            drop(cold);
            std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
            (Some(s), layers)
        }
        None => (None, Vec::new()),
    };
    let (build_s, layers_rebuilt) = timed_build(store, src, name)?;
    let (no_change_rebuild_s, _) = timed_build(store, src, name)?;
    let r = store.get(name)?;
    let m = r.template.clone().context("not a role-built template")?;
    let top = m.roles.last().map(|l| l.role.clone()).unwrap_or_default();
    let tmp = tempfile_dir()?;
    let changed = changed_specs(src, name, &top, &tmp)?;
    let (one_s, one_rebuilt) = timed_build(store, &changed, name)?;
    let _ = std::fs::remove_dir_all(&tmp);
    // Point the ref back at the unchanged build (all cached).
    timed_build(store, src, name)?;
    let mut layers = vec![LayerSize {
        role: "debian".into(),
        digest: m.base.clone(),
        size_bytes: store.layer(&m.base).map(|l| l.size_bytes).unwrap_or(0),
    }];
    layers.extend(m.roles.iter().map(|l| LayerSize {
        role: l.role.clone(),
        digest: l.digest.clone(),
        size_bytes: l.size_bytes,
    }));
    Ok(TemplateFigures {
        template: name.to_string(),
        cold_build_s,
        cold_layers,
        build_s,
        layers_rebuilt,
        no_change_rebuild_s,
        one_role_change: top,
        one_role_change_rebuild_s: one_s,
        one_role_change_layers_rebuilt: one_rebuilt,
        total_size_bytes: r.size_bytes,
        layers,
    })
}

#[derive(Debug, Serialize)]
struct BaseComparison {
    mmdebstrap_s: f64,
    mmdebstrap_size_bytes: u64,
    debootstrap_s: f64,
    debootstrap_size_bytes: u64,
    /// mmdebstrap time / debootstrap time.
    time_ratio: f64,
}

fn tempfile_dir() -> Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("kiln-bench-{:016x}", rand::random::<u64>()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

pub async fn run(g: &Global, b: TemplateBench) -> Result<i32> {
    let dir = b
        .images_dir
        .clone()
        .unwrap_or_else(|| crate::template::default_images_dir(g));
    let names = if b.names.is_empty() {
        vec!["base".to_string(), "python".to_string()]
    } else {
        b.names.clone()
    };
    let src = b.src.sources();
    let cold = b.cold;
    let compare = b.compare_debootstrap;
    let (figures, base_cmp) = tokio::task::spawn_blocking(
        move || -> Result<(Vec<TemplateFigures>, Option<BaseComparison>)> {
            let store = ImageStore::open(&dir)?;
            // Cold stores live next to the real one (same filesystem, like a real build).
            let cold_root = dir.with_file_name(format!(
                "{}-bench-cold",
                dir.file_name().and_then(|n| n.to_str()).unwrap_or("images")
            ));
            let mut out = Vec::new();
            for n in &names {
                out.push(measure(
                    &store,
                    &src,
                    n,
                    cold.then_some(cold_root.as_path()),
                )?);
            }
            let cmp = if compare {
                let (mm_s, mm_size) = cold_base(&cold_root, Bootstrapper::Mmdebstrap)?;
                let (db_s, db_size) = cold_base(&cold_root, Bootstrapper::Debootstrap)?;
                Some(BaseComparison {
                    mmdebstrap_s: mm_s,
                    mmdebstrap_size_bytes: mm_size,
                    debootstrap_s: db_s,
                    debootstrap_size_bytes: db_size,
                    time_ratio: round(mm_s / db_s.max(0.01)),
                })
            } else {
                None
            };
            let _ = std::fs::remove_dir_all(&cold_root);
            Ok((out, cmp))
        },
    )
    .await??;
    let targets = serde_json::json!({
        "base_cold_s": 60, "python_cold_s": 180, "no_change_rebuild_s": 3
    });
    if b.json {
        println!(
            "{}",
            serde_json::json!({"templates": figures, "base_bootstrap": base_cmp, "targets": targets})
        );
        return Ok(0);
    }
    let size = kiln_server::units::format_size;
    for f in &figures {
        println!("template {}", f.template);
        if let Some(c) = f.cold_build_s {
            println!("  cold build (empty store)      {c:>8.2} s");
            for l in &f.cold_layers {
                println!(
                    "    {:<26}  {:>8.2} s{}",
                    l.role,
                    l.seconds,
                    if l.cached { "  (cached)" } else { "" }
                );
            }
        }
        println!(
            "  build in store                {:>8.2} s  ({} layers rebuilt)",
            f.build_s, f.layers_rebuilt
        );
        println!(
            "  no-change rebuild             {:>8.2} s",
            f.no_change_rebuild_s
        );
        println!(
            "  one-role change ({:<8})     {:>8.2} s  ({} layers rebuilt)",
            f.one_role_change, f.one_role_change_rebuild_s, f.one_role_change_layers_rebuilt
        );
        println!("  layers:");
        for l in &f.layers {
            println!(
                "    {:<10} {:<14} {:>10}",
                l.role,
                l.digest
                    .trim_start_matches("sha256:")
                    .chars()
                    .take(12)
                    .collect::<String>(),
                size(l.size_bytes)
            );
        }
        println!(
            "  total                         {:>10}",
            size(f.total_size_bytes)
        );
    }
    if let Some(c) = &base_cmp {
        println!("base image, cold, same run");
        println!(
            "  mmdebstrap                    {:>8.2} s  {:>10}",
            c.mmdebstrap_s,
            size(c.mmdebstrap_size_bytes)
        );
        println!(
            "  debootstrap (baseline)        {:>8.2} s  {:>10}",
            c.debootstrap_s,
            size(c.debootstrap_size_bytes)
        );
        println!("  time ratio                    {:>8.2}x", c.time_ratio);
    }
    println!("targets: base cold <= 60 s, python cold <= 180 s, no-change rebuild <= 3 s");
    Ok(0)
}
