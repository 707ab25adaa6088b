//! `kiln template build|ls`: builds sandbox images into the local image store (with progress:
//! a spinner on a TTY, plain lines otherwise, JSON lines with `--json`) and lists them.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use kiln_protocol::api::TemplateList;
use kiln_template::{BaseSpec, ImageRef, ImageStore, Progress};
use reqwest::Method;

use crate::Global;

#[derive(Subcommand)]
pub enum TemplateCmd {
    /// Build a template into the local image store (needs root: debootstrap)
    Build {
        /// Template name (today: base)
        name: String,
        /// Image store directory [default: <data dir>/images]
        #[arg(long, env = "KILN_IMAGES_DIR")]
        images_dir: Option<PathBuf>,
        /// Debian archive URL [default: read from the host's apt sources]
        #[arg(long)]
        mirror: Option<String>,
        /// Rebuild even if the cached layer is up to date
        #[arg(long)]
        force: bool,
        /// Print progress and the result as JSON lines
        #[arg(long)]
        json: bool,
    },
    /// List templates the server can start sandboxes from
    Ls {
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(g: &Global, cmd: TemplateCmd) -> Result<i32> {
    match cmd {
        TemplateCmd::Build {
            name,
            images_dir,
            mirror,
            force,
            json,
        } => {
            if name != "base" {
                bail!("unknown template `{name}` (hint: this version builds `base`; role-based templates come with the templates issue)");
            }
            let dir = images_dir.unwrap_or_else(|| {
                g.data_dir
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(crate::api::DEFAULT_DATA_DIR))
                    .join("images")
            });
            let spec = BaseSpec {
                mirror,
                ..BaseSpec::default()
            };
            let r =
                tokio::task::spawn_blocking(move || build_base(&dir, &spec, force, json)).await??;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"event": "result", "template": r.name, "image": r.layers[0], "size_bytes": r.size_bytes})
                );
            } else {
                println!("{} {}", r.name, r.layers[0]);
            }
            Ok(0)
        }
        TemplateCmd::Ls { json } => {
            let list: TemplateList = g
                .api()
                .json(Method::GET, "/v1/templates", None::<&()>)
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!("{:<16} {:<20} {:>10}", "NAME", "IMAGE", "SIZE");
                for t in list.templates {
                    let short: String = t
                        .image
                        .trim_start_matches("sha256:")
                        .chars()
                        .take(12)
                        .collect();
                    println!(
                        "{:<16} {:<20} {:>10}",
                        t.name,
                        short,
                        kiln_server::units::format_size(t.size_bytes)
                    );
                }
            }
            Ok(0)
        }
    }
}

/// Builds the base image with progress output; shared by `kiln template build` and `kiln up`.
pub fn build_base(
    images_dir: &std::path::Path,
    spec: &BaseSpec,
    force: bool,
    json: bool,
) -> Result<ImageRef> {
    let store = ImageStore::open(images_dir)
        .with_context(|| format!("cannot open the image store at {}", images_dir.display()))?;
    let tty = std::io::stderr().is_terminal() && !json;
    let bar = tty.then(|| {
        let pb = indicatif::ProgressBar::new_spinner();
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {prefix:>9} {pos:>4} steps  {wide_msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        pb.enable_steady_tick(std::time::Duration::from_millis(120));
        pb
    });
    let mut on = |p: Progress| {
        if json {
            println!(
                "{}",
                serde_json::json!({"event": "progress", "stage": p.stage, "step": p.step, "message": p.message})
            );
        } else if let Some(pb) = &bar {
            pb.set_prefix(p.stage.clone());
            pb.set_position(p.step);
            pb.set_message(p.message.clone());
        } else {
            eprintln!("[{}] {}", p.stage, p.message);
        }
    };
    let r = kiln_template::base::build_base(&store, spec, force, &mut on);
    if let Some(pb) = bar {
        pb.finish_and_clear();
    }
    Ok(r?)
}
