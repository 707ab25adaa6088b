//! `kiln template build|push|ls|inspect|test|rm|gc`: templates built from Ansible roles into the
//! local image store (one cached layer per role; progress as a bar per layer on a TTY, plain
//! lines otherwise, NDJSON events with `--json`), and their management. `push` uploads an
//! organisation's private template and builds it on the server (same progress). `ls`,
//! `inspect`, `rm` and `gc` talk to the server unless `--images-dir` names a local store;
//! `test` starts a sandbox through the server.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use kiln_protocol::api::{
    CreateSandbox, ExecEvent, ExecRequest, NetworkMode, Sandbox, TemplateList,
};
use kiln_template::template::{self, BuildEvent, BuildOptions, GcReport, TemplateInfo};
use kiln_template::Bootstrapper;
use kiln_template::{ImageRef, ImageStore, Sources};
use reqwest::Method;

use crate::Global;

/// Where template specs and roles are.
#[derive(Args, Clone, Default)]
pub struct SourceArgs {
    /// Directory of template specs (NAME.toml) [default: the checkout's templates/]
    #[arg(long, env = "KILN_TEMPLATES_DIR")]
    pub templates_dir: Option<PathBuf>,
    /// Ansible directory with roles/ and ansible.cfg [default: the checkout's ansible/]
    #[arg(long, env = "KILN_ANSIBLE_DIR")]
    pub ansible_dir: Option<PathBuf>,
}

impl SourceArgs {
    pub fn sources(&self) -> Sources {
        Sources::discover(self.templates_dir.clone(), self.ansible_dir.clone())
    }
}

#[derive(Subcommand)]
pub enum TemplateCmd {
    /// Build a template from its spec (templates/NAME.toml): the Debian base image, then one
    /// cached layer per Ansible role; only layers whose inputs changed are rebuilt (needs root)
    Build {
        /// Template name: base, python, node, rust, polyglot, or any spec in the templates dir
        name: String,
        /// Image store directory [default: <data dir>/images]
        #[arg(long, env = "KILN_IMAGES_DIR")]
        images_dir: Option<PathBuf>,
        #[command(flatten)]
        src: SourceArgs,
        /// Debian archive URL [default: read from the host's apt sources]
        #[arg(long)]
        mirror: Option<String>,
        /// What bootstraps the Debian base layer: mmdebstrap (one apt run, no docs or man
        /// pages) or debootstrap
        #[arg(long, default_value = "mmdebstrap", value_parser = parse_bootstrapper)]
        bootstrapper: Bootstrapper,
        /// Rebuild every layer, ignoring the cache
        #[arg(long, alias = "force")]
        no_cache: bool,
        /// Print progress and the result as JSON lines
        #[arg(long)]
        json: bool,
    },
    /// List built templates (name, layers, size, built at, cache state)
    Ls {
        #[arg(long)]
        json: bool,
        /// Read this local image store instead of asking the server
        #[arg(long)]
        images_dir: Option<PathBuf>,
        #[command(flatten)]
        src: SourceArgs,
    },
    /// Show a template's manifest: roles, variables, layers and sizes, tool versions
    Inspect {
        name: String,
        #[arg(long)]
        json: bool,
        /// Read this local image store instead of asking the server
        #[arg(long)]
        images_dir: Option<PathBuf>,
        #[command(flatten)]
        src: SourceArgs,
    },
    /// Run every role's checks (roles/NAME/tests/verify.sh) in a fresh sandbox of the template
    /// and print a pass/fail table; exits 1 when a check fails
    Test {
        name: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        src: SourceArgs,
        /// Seconds each role's checks may take
        #[arg(long, default_value_t = 300.0)]
        timeout: f64,
    },
    /// Upload a private template of your organisation and build it on the server: a spec
    /// over the shipped roles in the TOML of templates/*.toml (description, parent, roles,
    /// [vars]); only your organisation sees it (owner or admin key)
    Push {
        /// Template name (not one of the public templates)
        name: String,
        /// The spec file, `-` for stdin
        spec: PathBuf,
        /// Only upload the spec
        #[arg(long)]
        no_build: bool,
        /// Rebuild every layer, ignoring the cache
        #[arg(long)]
        no_cache: bool,
        /// Print the upload's answer and the build events as JSON lines
        #[arg(long)]
        json: bool,
    },
    /// Remove a template (its layers stay until `kiln template gc`); your organisation's
    /// private template goes entirely, a public one only with a system-organisation key
    Rm {
        name: String,
        /// Use this local image store instead of the server
        #[arg(long)]
        images_dir: Option<PathBuf>,
    },
    /// Remove layers that no template and no live sandbox uses
    Gc {
        #[arg(long)]
        json: bool,
        /// Collect this local image store instead of asking the server (layers mounted by
        /// sandboxes on this host are kept)
        #[arg(long)]
        images_dir: Option<PathBuf>,
    },
}

pub fn parse_bootstrapper(s: &str) -> Result<Bootstrapper, String> {
    s.parse()
}

fn open_store(dir: &std::path::Path) -> Result<ImageStore> {
    ImageStore::open(dir)
        .with_context(|| format!("cannot open the image store at {}", dir.display()))
}

pub fn default_images_dir(g: &Global) -> PathBuf {
    g.data_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(crate::api::DEFAULT_DATA_DIR))
        .join("images")
}

pub async fn run(g: &Global, cmd: TemplateCmd) -> Result<i32> {
    match cmd {
        TemplateCmd::Build {
            name,
            images_dir,
            src,
            mirror,
            bootstrapper,
            no_cache,
            json,
        } => {
            let dir = images_dir.unwrap_or_else(|| default_images_dir(g));
            let opts = BuildOptions {
                no_cache,
                mirror,
                bootstrapper,
            };
            let src = src.sources();
            let r = tokio::task::spawn_blocking(move || build(&dir, &src, &name, &opts, json))
                .await??;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"event": "result", "template": r.name, "image": r.layers[0], "layers": r.layers, "size_bytes": r.size_bytes})
                );
            } else {
                println!("{} {}", r.name, r.layers[0]);
            }
            Ok(0)
        }
        TemplateCmd::Ls {
            json,
            images_dir,
            src,
        } => {
            let list: TemplateList = match images_dir {
                Some(d) => {
                    let store = open_store(&d)?;
                    let src = src.sources();
                    to_list(template::list(&store, &src))
                }
                None => {
                    g.api()
                        .json(Method::GET, "/v1/templates", None::<&()>)
                        .await?
                }
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!(
                    "{:<14} {:<8} {:<14} {:>6} {:>10} {:<20} {:<8}  ROLES",
                    "NAME", "VISIBLE", "IMAGE", "LAYERS", "SIZE", "BUILT", "CACHE"
                );
                for t in list.templates {
                    println!(
                        "{:<14} {:<8} {:<14} {:>6} {:>10} {:<20} {:<8}  {}",
                        t.name,
                        t.visibility,
                        short(&t.image),
                        t.layers,
                        kiln_server::units::format_size(t.size_bytes),
                        fmt_time(t.created_at_ms),
                        t.cache,
                        t.roles.join(",")
                    );
                }
            }
            Ok(0)
        }
        TemplateCmd::Inspect {
            name,
            json,
            images_dir,
            src,
        } => {
            let info: TemplateInfo = match images_dir {
                Some(d) => template::info(&open_store(&d)?, &src.sources(), &name)?,
                None => {
                    g.api()
                        .json(
                            Method::GET,
                            &format!("/v1/templates/{}", path_name(&name)?),
                            None::<&()>,
                        )
                        .await?
                }
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                print_manifest(&info);
            }
            Ok(0)
        }
        TemplateCmd::Test {
            name,
            json,
            src,
            timeout,
        } => test(g, &name, &src.sources(), json, timeout).await,
        TemplateCmd::Push {
            name,
            spec,
            no_build,
            no_cache,
            json,
        } => push(g, &name, &spec, !no_build, no_cache, json).await,
        TemplateCmd::Rm { name, images_dir } => {
            match images_dir {
                Some(d) => {
                    template::remove(&open_store(&d)?, &name)?;
                }
                None => {
                    g.api()
                        .empty(
                            Method::DELETE,
                            &format!("/v1/templates/{}", path_name(&name)?),
                        )
                        .await?
                }
            }
            eprintln!("removed template {name} (its layers are freed by `kiln template gc`)");
            Ok(0)
        }
        TemplateCmd::Gc { json, images_dir } => {
            let rep: GcReport = match images_dir {
                Some(d) => {
                    let store = open_store(&d)?;
                    tokio::task::spawn_blocking(move || template::gc(&store, &Default::default()))
                        .await??
                }
                None => {
                    g.api()
                        .json(Method::POST, "/v1/templates/gc", None::<&()>)
                        .await?
                }
            };
            if json {
                println!("{}", serde_json::to_string(&rep)?);
            } else {
                for d in &rep.removed {
                    println!("removed {}", short(d));
                }
                println!(
                    "{} layers removed, {} freed, {} kept",
                    rep.removed.len(),
                    kiln_server::units::format_size(rep.freed_bytes),
                    rep.kept
                );
            }
            Ok(0)
        }
    }
}

fn path_name(name: &str) -> Result<&str> {
    if !kiln_template::store::valid_name(name) {
        bail!("invalid template name `{name}`: use lower-case letters, digits, `-` and `_`");
    }
    Ok(name)
}

fn short(digest: &str) -> String {
    digest
        .trim_start_matches("sha256:")
        .chars()
        .take(12)
        .collect()
}

fn fmt_time(ms: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
        .to_string()
        .replace('T', " ")
        .trim_end_matches('Z')
        .to_string()
}

pub fn to_list(list: Vec<TemplateInfo>) -> TemplateList {
    TemplateList {
        templates: list
            .into_iter()
            .map(|t| kiln_server::templates::to_template(t, "public"))
            .collect(),
    }
}

fn print_manifest(info: &TemplateInfo) {
    let r = &info.image;
    let cache = serde_json::to_value(info.cache).unwrap_or_default();
    println!("template   {}", r.name);
    println!(
        "image      {}",
        r.layers.first().map(String::as_str).unwrap_or("")
    );
    println!(
        "size       {}",
        kiln_server::units::format_size(r.size_bytes)
    );
    println!("built      {}", fmt_time(r.created_at_ms));
    println!("cache      {}", cache.as_str().unwrap_or(""));
    let Some(m) = &r.template else {
        println!("(plain Debian image, no roles)");
        return;
    };
    if !m.description.is_empty() {
        println!("about      {}", m.description);
    }
    println!("\nLAYERS (bottom first)");
    println!("  {:<10} {:<14} {:>10}", "debian", short(&m.base), "");
    for l in &m.roles {
        println!(
            "  {:<10} {:<14} {:>10}  key {}",
            l.role,
            short(&l.digest),
            kiln_server::units::format_size(l.size_bytes),
            short(&l.key)
        );
    }
    println!("\nVARIABLES");
    if m.vars.is_empty() {
        println!("  (role defaults)");
    }
    for (k, v) in &m.vars {
        println!("  {k} = {v}");
    }
    println!("\nTOOLS");
    for (k, v) in &m.tools {
        println!("  {k:<28} {v}");
    }
}

/// Shows build events: a bar per layer on a TTY, plain lines otherwise, NDJSON with `json`.
/// Shared by local builds and builds streamed from the server.
pub struct BuildProgress {
    json: bool,
    tty: bool,
    multi: indicatif::MultiProgress,
    bars: BTreeMap<usize, indicatif::ProgressBar>,
    style: indicatif::ProgressStyle,
}

impl BuildProgress {
    pub fn new(json: bool) -> Self {
        BuildProgress {
            json,
            tty: std::io::stderr().is_terminal() && !json,
            multi: indicatif::MultiProgress::new(),
            bars: BTreeMap::new(),
            style: indicatif::ProgressStyle::with_template(
                "{prefix:>10} [{bar:24}] {pos:>3}/{len:<3} {elapsed:>4} {wide_msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        }
    }

    pub fn event(&mut self, ev: BuildEvent) {
        if self.json {
            println!("{}", serde_json::to_string(&ev).unwrap_or_default());
            return;
        }
        if !self.tty {
            match &ev {
                BuildEvent::Plan { template, layers } => {
                    eprintln!("[{template}] layers: {}", layers.join(" -> "))
                }
                BuildEvent::LayerStart {
                    role, cached, key, ..
                } => eprintln!(
                    "[{role}] {} (key {})",
                    if *cached { "cached" } else { "building" },
                    short(key)
                ),
                BuildEvent::Step {
                    role, n, message, ..
                } => eprintln!("[{role}] {n:>3} {message}"),
                BuildEvent::LayerDone {
                    role,
                    digest,
                    size_bytes,
                    cached,
                    seconds,
                    ..
                } => eprintln!(
                    "[{role}] {} layer {} {} in {seconds:.1}s",
                    if *cached { "reused" } else { "built" },
                    short(digest),
                    kiln_server::units::format_size(*size_bytes)
                ),
                BuildEvent::Done {
                    template,
                    layers,
                    rebuilt,
                    seconds,
                    size_bytes,
                } => eprintln!(
                    "[{template}] ready: {layers} layers, {}, {rebuilt} rebuilt, {seconds:.1}s",
                    kiln_server::units::format_size(*size_bytes)
                ),
            }
            return;
        }
        match ev {
            BuildEvent::LayerStart {
                index,
                role,
                cached,
                tasks,
                ..
            } => {
                let pb = self.multi.add(indicatif::ProgressBar::new(tasks.max(1)));
                pb.set_style(self.style.clone());
                pb.set_prefix(role);
                if cached {
                    pb.set_position(tasks.max(1));
                    pb.set_message("cached");
                } else {
                    pb.enable_steady_tick(std::time::Duration::from_millis(200));
                }
                self.bars.insert(index, pb);
            }
            BuildEvent::Step {
                index, n, message, ..
            } => {
                if let Some(pb) = self.bars.get(&index) {
                    if n > pb.length().unwrap_or(0) {
                        pb.set_length(n);
                    }
                    pb.set_position(n);
                    pb.set_message(message);
                }
            }
            BuildEvent::LayerDone {
                index,
                digest,
                size_bytes,
                cached,
                seconds,
                ..
            } => {
                if let Some(pb) = self.bars.get(&index) {
                    pb.set_position(pb.length().unwrap_or(1));
                    pb.finish_with_message(format!(
                        "{} {} {} {seconds:.1}s",
                        if cached { "cached" } else { "built " },
                        short(&digest),
                        kiln_server::units::format_size(size_bytes)
                    ));
                }
            }
            BuildEvent::Plan { .. } | BuildEvent::Done { .. } => {}
        }
    }

    /// Leaves unfinished bars (a failed build) where they stopped.
    pub fn finish(self) {
        for pb in self.bars.values() {
            if !pb.is_finished() {
                pb.abandon();
            }
        }
    }
}

/// Builds with progress output; shared by `kiln template build`, `kiln up` and the bench.
pub fn build(
    images_dir: &std::path::Path,
    src: &Sources,
    name: &str,
    opts: &BuildOptions,
    json: bool,
) -> Result<ImageRef> {
    let store = open_store(images_dir)?;
    let mut progress = BuildProgress::new(json);
    let r = template::build(&store, src, name, opts, &mut |ev| progress.event(ev));
    progress.finish();
    Ok(r?)
}

/// One line of a server-side build: an event, or the error that ended it.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum BuildLine {
    Event(BuildEvent),
    Error {
        error: kiln_protocol::api::ErrorDetail,
    },
}

/// `kiln template push`: uploads a private template's spec, then builds it on the server.
async fn push(
    g: &Global,
    name: &str,
    spec_file: &std::path::Path,
    build: bool,
    no_cache: bool,
    json: bool,
) -> Result<i32> {
    let text = if spec_file == std::path::Path::new("-") {
        std::io::read_to_string(std::io::stdin()).context("reading the spec from stdin")?
    } else {
        std::fs::read_to_string(spec_file)
            .with_context(|| format!("cannot read {}", spec_file.display()))?
    };
    let spec = kiln_template::spec::parse(&text).map_err(|e| {
        anyhow!(
            "{} is not a template spec: {} (hint: description, parent, roles and [vars], as in templates/*.toml)",
            spec_file.display(),
            e.message()
        )
    })?;
    let api = g.api();
    let path = format!("/v1/templates/{}", path_name(name)?);
    let saved: serde_json::Value = api.json(Method::PUT, &path, Some(&spec)).await?;
    if !json {
        eprintln!(
            "uploaded private template {name}: layers {}",
            saved["layers"]
                .as_array()
                .map(|l| l
                    .iter()
                    .filter_map(|v| v.as_str())
                    .collect::<Vec<_>>()
                    .join(" -> "))
                .unwrap_or_default()
        );
    } else {
        println!("{saved}");
    }
    if !build {
        return Ok(0);
    }
    let resp = api
        .send(
            api.request(Method::POST, &format!("{path}/build"))
                .query(&[("no_cache", no_cache)]),
        )
        .await?;
    let mut progress = BuildProgress::new(json);
    let mut failure = None;
    let mut done = false;
    api.each_line(resp, |line: BuildLine| {
        match line {
            BuildLine::Event(ev) => {
                done |= matches!(ev, BuildEvent::Done { .. });
                progress.event(ev);
            }
            BuildLine::Error { error } => failure = Some(error),
        }
        Ok(true)
    })
    .await?;
    progress.finish();
    if let Some(e) = failure {
        return Err(crate::api::ApiFailure {
            body: kiln_protocol::api::ErrorBody { error: e },
        }
        .into());
    }
    if !done {
        bail!("the build stream ended early (hint: see the server's log)");
    }
    if !json {
        println!("{name}");
    }
    Ok(0)
}

/// One role's check result.
#[derive(Debug, serde::Serialize)]
struct CheckResult {
    role: String,
    passed: bool,
    exit_code: Option<i32>,
    seconds: f64,
    output: String,
}

async fn test(g: &Global, name: &str, src: &Sources, json: bool, timeout: f64) -> Result<i32> {
    let api = g.api();
    let info: TemplateInfo = api
        .json(
            Method::GET,
            &format!("/v1/templates/{}", path_name(name)?),
            None::<&()>,
        )
        .await?;
    let roles: Vec<String> = info
        .image
        .template
        .as_ref()
        .map(|m| m.roles.iter().map(|r| r.role.clone()).collect())
        .unwrap_or_default();
    if roles.is_empty() {
        bail!("template `{name}` has no roles to test (hint: `kiln template inspect {name}`)");
    }
    let sb: Sandbox = api
        .json(
            Method::POST,
            "/v1/sandboxes",
            Some(&CreateSandbox {
                template: Some(name.to_string()),
                network: Some(NetworkMode::None),
                pool: Some(false),
                ..CreateSandbox::default()
            }),
        )
        .await
        .context("cannot start a sandbox of the template")?;
    let result = run_checks(&api, &sb.id, &roles, src, timeout).await;
    let _ = api
        .empty(Method::DELETE, &format!("/v1/sandboxes/{}", sb.id))
        .await;
    let results = result?;
    let failed = results.iter().filter(|r| !r.passed).count();
    if json {
        println!(
            "{}",
            serde_json::json!({"template": name, "sandbox": sb.id, "passed": failed == 0, "checks": results})
        );
    } else {
        println!("{:<10} {:<6} {:>7}  DETAIL", "ROLE", "RESULT", "TIME");
        for r in &results {
            let last = r
                .output
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("");
            println!(
                "{:<10} {:<6} {:>6.1}s  {}",
                r.role,
                if r.passed { "pass" } else { "FAIL" },
                r.seconds,
                last
            );
            for l in r.output.lines().filter(|l| l.contains("unavailable")) {
                println!("{:<10} {:<6} {:>7}  {}", "", "note", "", l.trim());
            }
        }
        for r in results.iter().filter(|r| !r.passed) {
            eprintln!("--- {} output ---\n{}", r.role, r.output.trim_end());
        }
    }
    Ok(if failed == 0 { 0 } else { 1 })
}

async fn run_checks(
    api: &crate::api::Api,
    id: &str,
    roles: &[String],
    src: &Sources,
    timeout: f64,
) -> Result<Vec<CheckResult>> {
    let mut out = Vec::new();
    for role in roles {
        let Some(script) = template::verify_script(src, role)? else {
            out.push(CheckResult {
                role: role.clone(),
                passed: true,
                exit_code: None,
                seconds: 0.0,
                output: "no checks (no tests/verify.sh)".into(),
            });
            continue;
        };
        let path = format!("/tmp/kiln-verify/{role}.sh");
        let rb = api
            .request(Method::PUT, &format!("/v1/sandboxes/{id}/files"))
            .query(&[
                ("path", path.as_str()),
                ("mode", "755"),
                ("parents", "true"),
            ])
            .body(script);
        api.send(rb)
            .await
            .with_context(|| format!("cannot upload the checks of role {role}"))?;
        let start = std::time::Instant::now();
        let req = ExecRequest {
            cmd: vec!["/bin/sh".into(), path.clone()],
            env: BTreeMap::from([(
                "PATH".to_string(),
                "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin".to_string(),
            )]),
            cwd: Some("/tmp".into()),
            user: None,
            timeout_secs: Some(timeout),
            stdin_b64: None,
            keep_stdin_open: false,
            tag: None,
        };
        let resp = api
            .send(
                api.request(Method::POST, &format!("/v1/sandboxes/{id}/exec"))
                    .json(&req),
            )
            .await?;
        let mut output = Vec::new();
        let mut code = None;
        api.each_event(resp, |ev| {
            match ev {
                ExecEvent::Stdout { data, .. } | ExecEvent::Stderr { data, .. } => {
                    output.extend_from_slice(&data)
                }
                ExecEvent::Exit(st) => {
                    code = Some(crate::sandbox::exit_code(&st));
                    return Ok(false);
                }
                ExecEvent::Error(e) => return Err(anyhow!("{}", e.message)),
                _ => {}
            }
            Ok(true)
        })
        .await?;
        out.push(CheckResult {
            role: role.clone(),
            passed: code == Some(0),
            exit_code: code,
            seconds: start.elapsed().as_secs_f64(),
            output: String::from_utf8_lossy(&output).into_owned(),
        });
    }
    Ok(out)
}
