//! `kiln bench sandbox`: measures the platform through the server's HTTP API (not by timing
//! CLI processes) and prints p50/p99 of cold and warm create-to-first-output, exec round trip,
//! and host memory per idle sandbox.
//!
//! The memory figure reads this machine's `/proc/meminfo`, so it is only measured when the
//! server runs here (a loopback URL).

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use kiln_protocol::api::{CreateSandbox, ExecEvent, ExecRequest, Health, Sandbox};
use reqwest::Method;
use serde::Serialize;

use crate::api::Api;
use crate::Global;

#[derive(Subcommand)]
pub enum BenchCmd {
    /// Sandbox create/exec latency and idle memory
    Sandbox(SandboxBench),
    /// Template build times (cold, no-change, one-role change) and layer sizes (needs root)
    Template(crate::bench_template::TemplateBench),
    /// Control-plane throughput and latency: authenticated `GET /v1/sandboxes` under a fixed
    /// concurrency against unauthenticated `GET /v1/health` (the HTTP baseline, same run), and
    /// exec of `true` through the API. Needs a key of the system organisation: it runs in a
    /// throwaway org with rate limits lifted, and revokes that org's key at the end.
    Api(ApiBench),
    /// Agent runtime overhead (in-process, throwaway server, scripted model; needs root):
    /// per step excluding model time, event append/stream throughput, sub-agent spawn time
    Agent(crate::bench_agent::AgentBench),
    /// Developer tools (in-process, throwaway server, `python` template; needs root): LSP
    /// definition and diagnostics-after-edit through Kiln against pylsp over a raw kilnd Pipe,
    /// SSH connect-and-exec of `true` with OpenSSH, preview proxy against a kilnd tunnel and
    /// the host, `git clone` of a local repository in a sandbox against the host
    Devtools(crate::bench_devtools::DevtoolsBench),
    /// Knowledge engine, in process: embedding throughput, walk-to-searchable (BM25), one-file
    /// sync in a large tree with embedding-cache hits, hybrid query p99 at 100k chunks with the
    /// query's embedding, HNSW and IVF p99 and recall@10 at 1M vectors against an exact scan,
    /// HumanEval retrieval quality
    Knowledge(crate::bench_knowledge::KnowledgeBench),
}

#[derive(Args, Debug)]
pub struct ApiBench {
    /// Requests in flight at once
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Seconds per throughput measurement
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Exec round trips to time
    #[arg(long, default_value_t = 200)]
    pub exec_n: usize,
    /// Print one JSON object
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct Load {
    requests: usize,
    errors: usize,
    per_sec: f64,
    latency_ms: Percentiles,
}

/// Sends `GET path` from `concurrency` tasks for `seconds`.
async fn load(api: &Api, path: &str, concurrency: usize, seconds: f64) -> Load {
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let api = api.clone();
        let path = path.to_string();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0;
            while Instant::now() < deadline {
                let t = Instant::now();
                match api.request(Method::GET, &path).send().await {
                    Ok(r) if r.status().is_success() => {
                        let _ = r.bytes().await;
                        lat.push(ms(t.elapsed()));
                    }
                    _ => errors += 1,
                }
            }
            (lat, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        if let Ok((l, e)) = t.await {
            all.extend(l);
            errors += e;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    Load {
        requests: all.len(),
        errors,
        per_sec: (all.len() as f64 / elapsed).round(),
        latency_ms: percentiles(&mut all),
    }
}

async fn api_bench(admin: &Api, data_dir: Option<std::path::PathBuf>, b: ApiBench) -> Result<i32> {
    use kiln_protocol::api::{OrgCreated, RateLimits};
    let name = format!("bench-{}", std::process::id());
    let org: OrgCreated = admin
        .json(
            Method::POST,
            "/v1/orgs",
            Some(&serde_json::json!({ "name": name })),
        )
        .await
        .map_err(|e| {
            anyhow!("cannot create the bench organisation (a system-org key is needed): {e}")
        })?;
    let key = org
        .key
        .ok_or_else(|| anyhow!("the server did not return the bench org's key"))?;
    let lifted = kiln_protocol::api::Rate {
        per_sec: 1e6,
        burst: 1_000_000,
    };
    let limits = RateLimits {
        manage: lifted,
        create: lifted,
        sandbox: lifted,
    };
    let _: serde_json::Value = admin
        .json(
            Method::PUT,
            &format!("/v1/orgs/{}/rate-limits", org.org.id),
            Some(&limits),
        )
        .await?;
    let api = admin.with_token(&key.secret);
    progress(b.json, "GET /v1/health (baseline: no auth, no database)");
    let health = load(&api, "/v1/health", b.concurrency, b.seconds).await;
    progress(b.json, "GET /v1/sandboxes (authenticated)");
    let list = load(&api, "/v1/sandboxes", b.concurrency, b.seconds).await;
    progress(b.json, "exec `true` through the API");
    let sb = create(&api, true).await?;
    // The runtime's own exec round trip, straight to the sandbox's kilnd socket (same host,
    // root): the baseline the control plane's overhead is measured against, interleaved.
    let run_dir = kiln_server::config::ServerConfig::new(
        data_dir.unwrap_or_else(|| "/var/lib/kiln".into()),
        Default::default(),
    )
    .run_dir();
    let socket = run_dir.join(&sb.id).join(kiln_protocol::kilnd::SOCKET_NAME);
    let direct = socket.exists().then(|| kilnd::client::Client::new(&socket));
    let mut rt = Vec::with_capacity(b.exec_n);
    let mut direct_rt = Vec::with_capacity(b.exec_n);
    let mut health_rt = Vec::with_capacity(b.exec_n);
    for _ in 0..b.exec_n {
        let (_, d) = exec_timed(&api, &sb.id, &["true"]).await?;
        rt.push(ms(d));
        if let Some(c) = &direct {
            let t = Instant::now();
            let spec = kiln_protocol::kilnd::ExecSpec {
                cmd: vec!["true".into()],
                ..Default::default()
            };
            let mut s = c.exec(spec).await.context("direct kilnd exec")?;
            while let Some(r) = s.next().await {
                if let kiln_protocol::kilnd::Reply::Exited(_) = r.context("direct kilnd exec")? {
                    break;
                }
            }
            direct_rt.push(ms(t.elapsed()));
        }
        let t = Instant::now();
        api.send(api.request(Method::GET, "/v1/health")).await?;
        health_rt.push(ms(t.elapsed()));
    }
    remove(&api, &sb.id).await?;
    admin
        .empty(
            Method::DELETE,
            &format!("/v1/keys/{}?org={}", key.key.id, org.org.id),
        )
        .await?;
    let exec = percentiles(&mut rt);
    let baseline = percentiles(&mut health_rt);
    let direct = (!direct_rt.is_empty()).then(|| percentiles(&mut direct_rt));
    let overhead = direct
        .as_ref()
        .map(|d| ((exec.p50 - d.p50) * 1000.0).round() / 1000.0);
    let report = serde_json::json!({
        "concurrency": b.concurrency,
        "seconds": b.seconds,
        "health_baseline": health,
        "authenticated_list": list,
        "authenticated_vs_baseline_p50_ratio": (list.latency_ms.p50 / health.latency_ms.p50 * 100.0).round() / 100.0,
        "exec_true_roundtrip_ms": exec,
        "sequential_health_roundtrip_ms": baseline,
        "exec_true_direct_kilnd_ms": direct,
        "control_plane_exec_overhead_p50_ms": overhead,
        "targets": {"authenticated_gets_per_sec": 3000, "authenticated_get_p99_ms": 10, "control_plane_exec_overhead_p50_ms": 2},
    });
    if b.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for (n, l) in [
            ("GET /v1/health (baseline)", &health),
            ("GET /v1/sandboxes (authenticated)", &list),
        ] {
            println!(
                "{n:<36} {:>8} req/s   p50 {:>7.3} ms   p99 {:>7.3} ms   errors {}",
                l.per_sec, l.latency_ms.p50, l.latency_ms.p99, l.errors
            );
        }
        println!(
            "{:<36} {:>14}   p50 {:>7.3} ms   p99 {:>7.3} ms   (sequential GET /v1/health p50 {:.3} ms)",
            "exec `true` (API round trip)", "", exec.p50, exec.p99, baseline.p50
        );
        match (&direct, overhead) {
            (Some(d), Some(o)) => println!(
                "{:<36} {:>14}   p50 {:>7.3} ms   p99 {:>7.3} ms   (control plane adds {o:.3} ms p50; target <= 2)",
                "exec `true` (kilnd socket, baseline)", "", d.p50, d.p99
            ),
            _ => println!(
                "exec baseline skipped: the sandbox's kilnd socket is not on this host (run the bench as root next to the server, with --data-dir)"
            ),
        }
        println!(
            "targets: >= 3000 authenticated GETs/s with p99 <= 10 ms (concurrency {}); exec overhead <= 2 ms p50",
            b.concurrency
        );
    }
    Ok(0)
}

#[derive(Args, Debug)]
pub struct SandboxBench {
    /// Iterations per latency measurement
    #[arg(long, default_value_t = 200)]
    pub n: usize,
    /// Sandboxes kept alive at once for the memory measurement [default: --n]
    #[arg(long)]
    pub idle: Option<usize>,
    /// Also time cold creates from these built templates, interleaved with the base image's
    /// (same run), and print each one's ratio to base (e.g. --template python --template node)
    #[arg(long = "template")]
    pub templates: Vec<String>,
    /// Print one JSON object
    #[arg(long)]
    pub json: bool,
}

/// A throwaway in-process server for the benches that need one (as root: real runc
/// sandboxes, SQLite in a temporary data dir, listening on a free loopback port).
pub struct Throwaway {
    pub kiln: std::sync::Arc<kiln_server::Kiln>,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    data: std::path::PathBuf,
    shutdown: tokio_util::sync::CancellationToken,
    serving: tokio::task::JoinHandle<()>,
}

impl Throwaway {
    /// A fresh data dir named after `label` and the process; `configure` adjusts the config
    /// (`listen` is a free loopback port, the warm pool is off).
    pub async fn start(
        label: &str,
        kilnd: Option<std::path::PathBuf>,
        configure: impl FnOnce(&mut kiln_server::ServerConfig) -> Result<()>,
    ) -> Result<Throwaway> {
        let data = std::env::temp_dir().join(format!("kiln-bench-{label}-{}", std::process::id()));
        std::fs::create_dir_all(&data)?;
        let kilnd = crate::up::find_kilnd(kilnd)
            .context("no kilnd (hint: pass --kilnd or set KILN_KILND)")?;
        let mut cfg = kiln_server::ServerConfig::new(data.clone(), kilnd);
        cfg.listen = "127.0.0.1:0".parse()?;
        cfg.warm_pool = 0;
        configure(&mut cfg)?;
        let kiln = kiln_server::start(cfg)
            .await
            .map_err(|e| anyhow!("starting a throwaway server: {e}"))?;
        let shutdown = tokio_util::sync::CancellationToken::new();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (k, sd) = (kiln.clone(), shutdown.clone());
        let serving = tokio::spawn(async move {
            let _ = kiln_server::serve(k, sd, move |addr| {
                let _ = tx.send(addr);
            })
            .await;
        });
        let addr = rx
            .await
            .map_err(|_| anyhow!("the throwaway server did not start"))?;
        Ok(Throwaway {
            kiln,
            url: format!("http://{addr}"),
            data,
            shutdown,
            serving,
        })
    }

    /// Stops serving, removes every sandbox and the data dir, releases the runtime.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.serving.await;
        if let Some(a) = self.kiln.agents.get() {
            a.shutdown();
        }
        for row in self.kiln.store.list(true).await.unwrap_or_default() {
            let _ = self.kiln.runtime.remove(&row.sandbox.id).await;
            let _ = self.kiln.store.delete(&row.sandbox.id).await;
        }
        let _ = self.kiln.runtime.destroy_all().await;
        let _ = std::fs::remove_dir_all(&self.data);
    }

    /// Where scratch files of the bench may go (removed by [`Throwaway::stop`]).
    pub fn scratch(&self) -> &std::path::Path {
        &self.data
    }
}

/// p50 and p99 in milliseconds.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Percentiles {
    pub p50: f64,
    pub p99: f64,
}

/// Nearest-rank percentiles of a sample (milliseconds).
pub fn percentiles(samples: &mut [f64]) -> Percentiles {
    samples.sort_by(|a, b| a.total_cmp(b));
    let pick = |q: f64| {
        if samples.is_empty() {
            return f64::NAN;
        }
        let rank = (q * samples.len() as f64).ceil() as usize;
        samples[rank.clamp(1, samples.len()) - 1]
    };
    let round = |v: f64| (v * 1000.0).round() / 1000.0;
    Percentiles {
        p50: round(pick(0.50)),
        p99: round(pick(0.99)),
    }
}

#[derive(Debug, Serialize)]
struct TemplateCold {
    template: String,
    cold_create_to_first_output_ms: Percentiles,
    /// This template's cold p50 / the base image's cold p50, same run.
    p50_ratio_to_base: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    iterations: usize,
    cold_create_to_first_output_ms: Percentiles,
    /// Cold creates from built templates, interleaved with the base image's.
    templates: Vec<TemplateCold>,
    warm_create_to_first_output_ms: Option<Percentiles>,
    /// cold p50 / warm p50, measured in this run.
    warm_speedup_vs_cold: Option<f64>,
    exec_roundtrip_ms: Percentiles,
    idle_sandboxes: usize,
    /// Growth of used memory (MemTotal - MemAvailable) per sandbox.
    memory_per_idle_sandbox_mib: Option<f64>,
    /// The same measured as the growth of MemTotal - MemFree (page cache and reclaimable slab
    /// included; noisier, since the kernel may drop cache meanwhile).
    memory_per_idle_sandbox_mib_incl_cache: Option<f64>,
    host_processes_per_idle_sandbox: Option<f64>,
    targets: serde_json::Value,
}

pub async fn run(g: &Global, cmd: BenchCmd) -> Result<i32> {
    match cmd {
        BenchCmd::Sandbox(b) => sandbox(&g.api(), b).await,
        BenchCmd::Template(b) => crate::bench_template::run(g, b).await,
        BenchCmd::Api(b) => api_bench(&g.api(), g.data_dir.clone(), b).await,
        BenchCmd::Agent(b) => crate::bench_agent::run(g, b).await,
        BenchCmd::Devtools(b) => crate::bench_devtools::run(g, b).await,
        BenchCmd::Knowledge(b) => crate::bench_knowledge::run(g, b).await,
    }
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn create(api: &Api, pool: bool) -> Result<Sandbox> {
    create_from(api, pool, None).await
}

async fn create_from(api: &Api, pool: bool, template: Option<&str>) -> Result<Sandbox> {
    let req = CreateSandbox {
        pool: Some(pool),
        template: template.map(str::to_string),
        ..CreateSandbox::default()
    };
    api.json(Method::POST, "/v1/sandboxes", Some(&req)).await
}

/// Cold create from `template` (or the default image) until `echo` printed: milliseconds.
async fn cold_create_ms(api: &Api, template: Option<&str>) -> Result<f64> {
    let t0 = Instant::now();
    let sb = create_from(api, false, template).await?;
    let (first, _) = exec_timed(api, &sb.id, &["echo", "kiln"]).await?;
    let first = first.ok_or_else(|| anyhow!("echo printed nothing"))?;
    remove(api, &sb.id).await?;
    Ok(ms(first - t0))
}

/// Runs `cmd` and returns (the instant its first stdout chunk arrived, time from request to exit).
async fn exec_timed(api: &Api, id: &str, cmd: &[&str]) -> Result<(Option<Instant>, Duration)> {
    let t0 = Instant::now();
    let req = ExecRequest {
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        ..ExecRequest::default()
    };
    let resp = api
        .send(
            api.request(Method::POST, &format!("/v1/sandboxes/{id}/exec"))
                .json(&req),
        )
        .await?;
    let mut first = None;
    let mut exited = false;
    api.each_event(resp, |ev| {
        match ev {
            ExecEvent::Stdout { .. } if first.is_none() => first = Some(Instant::now()),
            ExecEvent::Exit(_) => {
                exited = true;
                return Ok(false);
            }
            ExecEvent::Error(e) => return Err(anyhow!("exec failed: {}", e.message)),
            _ => {}
        }
        Ok(true)
    })
    .await?;
    if !exited {
        bail!("exec stream ended without an exit event");
    }
    Ok((first, t0.elapsed()))
}

async fn remove(api: &Api, id: &str) -> Result<()> {
    api.empty(Method::DELETE, &format!("/v1/sandboxes/{id}"))
        .await
}

/// (MemAvailable, MemFree) in KiB from /proc/meminfo.
fn meminfo_kib() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("MemAvailable:"), field("MemFree:"))
}

fn process_count() -> usize {
    std::fs::read_dir("/proc")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .bytes()
                        .all(|b| b.is_ascii_digit())
                })
                .count()
        })
        .unwrap_or(0)
}

fn local_server(api: &Api) -> bool {
    let host = api
        .base
        .trim_start_matches("http://")
        .trim_start_matches("https://");
    host.starts_with("127.") || host.starts_with("localhost") || host.starts_with("[::1]")
}

pub(crate) fn progress(json: bool, msg: &str) {
    if !json {
        eprintln!("bench: {msg}");
    }
}

async fn sandbox(api: &Api, b: SandboxBench) -> Result<i32> {
    if b.n == 0 {
        bail!("--n must be at least 1");
    }
    let health: Health = api.json(Method::GET, "/v1/health", None::<&()>).await?;
    let idle_n = b.idle.unwrap_or(b.n);

    // 1. Cold: create (skipping the pool) then the first byte of `echo` output; creates from
    //    the compared templates are interleaved with these, so both see the same machine.
    progress(b.json, &format!("cold create-to-first-output x{}", b.n));
    let mut cold = Vec::with_capacity(b.n);
    let mut by_template: Vec<Vec<f64>> = vec![Vec::with_capacity(b.n); b.templates.len()];
    for t in &b.templates {
        // The first create from a template makes its uid-shifted layers: not timed.
        cold_create_ms(api, Some(t))
            .await
            .with_context(|| format!("creating a sandbox from template `{t}`"))?;
    }
    for _ in 0..b.n {
        cold.push(cold_create_ms(api, None).await?);
        for (t, v) in b.templates.iter().zip(by_template.iter_mut()) {
            v.push(cold_create_ms(api, Some(t)).await?);
        }
    }

    // 2. Warm: the same, claiming a ready pool member (waiting for the pool to refill between
    //    iterations is not timed).
    let warm = if health.warm_pool > 0 || pool_configured(api).await {
        progress(
            b.json,
            &format!("warm-pool create-to-first-output x{}", b.n),
        );
        let mut warm = Vec::with_capacity(b.n);
        for _ in 0..b.n {
            wait_for_pool(api).await?;
            let t0 = Instant::now();
            let sb = create(api, true).await?;
            let (first, _) = exec_timed(api, &sb.id, &["echo", "kiln"]).await?;
            let first = first.ok_or_else(|| anyhow!("echo printed nothing"))?;
            if !sb.from_pool {
                bail!("the warm pool did not serve the create (is --warm-pool 0?)");
            }
            warm.push(ms(first - t0));
            remove(api, &sb.id).await?;
        }
        Some(warm)
    } else {
        None
    };

    // 3. Exec round trip of `true` in one live sandbox.
    progress(b.json, &format!("exec round trip x{}", b.n));
    let sb = create(api, false).await?;
    let mut rt = Vec::with_capacity(b.n);
    for _ in 0..b.n {
        let (_, total) = exec_timed(api, &sb.id, &["true"]).await?;
        rt.push(ms(total));
    }
    remove(api, &sb.id).await?;

    // 4. Host memory per idle sandbox.
    let (mem, mem_cache, procs) = if local_server(api) && idle_n > 0 {
        progress(b.json, &format!("memory with {idle_n} idle sandboxes"));
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (before, free_before) = meminfo_kib();
        let p_before = process_count();
        let mut ids = Vec::with_capacity(idle_n);
        let result: Result<()> = async {
            for _ in 0..idle_n {
                ids.push(create(api, false).await?.id);
            }
            Ok(())
        }
        .await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (after, free_after) = meminfo_kib();
        let p_after = process_count();
        progress(b.json, "removing idle sandboxes");
        let removals = futures_util::future::join_all(ids.chunks(8).map(|chunk| async move {
            for id in chunk {
                let _ = remove(api, id).await;
            }
        }));
        removals.await;
        result?;
        let per = |b: u64, a: u64| {
            (((b.saturating_sub(a)) as f64 / 1024.0 / idle_n as f64) * 100.0).round() / 100.0
        };
        let procs = p_after.saturating_sub(p_before) as f64 / idle_n as f64;
        (
            Some(per(before, after)),
            Some(per(free_before, free_after)),
            Some((procs * 100.0).round() / 100.0),
        )
    } else {
        (None, None, None)
    };

    let cold_p = percentiles(&mut cold);
    let warm_p = warm.map(|mut w| percentiles(&mut w));
    let templates: Vec<TemplateCold> = b
        .templates
        .iter()
        .zip(by_template.iter_mut())
        .map(|(t, v)| {
            let p = percentiles(v);
            TemplateCold {
                template: t.clone(),
                cold_create_to_first_output_ms: p,
                p50_ratio_to_base: ((p.p50 / cold_p.p50) * 100.0).round() / 100.0,
            }
        })
        .collect();
    let report = Report {
        iterations: b.n,
        cold_create_to_first_output_ms: cold_p,
        templates,
        warm_speedup_vs_cold: warm_p.map(|w| ((cold_p.p50 / w.p50) * 10.0).round() / 10.0),
        warm_create_to_first_output_ms: warm_p,
        exec_roundtrip_ms: percentiles(&mut rt),
        idle_sandboxes: idle_n,
        memory_per_idle_sandbox_mib: mem,
        memory_per_idle_sandbox_mib_incl_cache: mem_cache,
        host_processes_per_idle_sandbox: procs,
        targets: serde_json::json!({
            "cold_p50_ms": 50, "cold_p99_ms": 150, "warm_p50_ms": 5, "exec_roundtrip_p50_ms": 3,
            "memory_per_idle_sandbox_mib": 4
        }),
    };
    if b.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let row = |name: &str, p: &Percentiles, target: &str| {
            println!(
                "{name:<34} p50 {:>8.2} ms   p99 {:>8.2} ms   (target {target})",
                p.p50, p.p99
            );
        };
        println!(
            "kiln bench sandbox: {} iterations, runtime {}",
            b.n, health.runtime
        );
        row(
            "cold create -> first output",
            &report.cold_create_to_first_output_ms,
            "p50 <= 50, p99 <= 150",
        );
        for t in &report.templates {
            row(
                &format!("cold create, template {}", t.template),
                &t.cold_create_to_first_output_ms,
                &format!("as base; {:.2}x base p50", t.p50_ratio_to_base),
            );
        }
        match &report.warm_create_to_first_output_ms {
            Some(w) => row("warm-pool create -> first output", w, "p50 <= 5"),
            None => println!(
                "{:<34} skipped: the server has no warm pool",
                "warm-pool create -> first output"
            ),
        }
        if let Some(s) = report.warm_speedup_vs_cold {
            println!(
                "{:<34} {s}x faster than cold (p50, same run)",
                "warm pool vs cold"
            );
        }
        row(
            "exec round trip (`true`)",
            &report.exec_roundtrip_ms,
            "p50 <= 3",
        );
        match report.memory_per_idle_sandbox_mib {
            Some(m) => println!(
                "{:<34} {m:.2} MiB per sandbox with {idle_n} alive (by MemFree: {:.2} MiB), {:.2} host processes each (target <= 4 MiB)",
                "memory per idle sandbox",
                report.memory_per_idle_sandbox_mib_incl_cache.unwrap_or(0.0),
                report.host_processes_per_idle_sandbox.unwrap_or(0.0)
            ),
            None if idle_n == 0 => println!("{:<34} skipped (--idle 0)", "memory per idle sandbox"),
            None => println!("{:<34} skipped: the server is not on this machine", "memory per idle sandbox"),
        }
    }
    Ok(0)
}

async fn pool_configured(api: &Api) -> bool {
    // The pool may be empty right now (just drained); give the filler a moment.
    for _ in 0..50 {
        if let Ok(h) = api
            .json::<Health>(Method::GET, "/v1/health", None::<&()>)
            .await
        {
            if h.warm_pool > 0 {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

async fn wait_for_pool(api: &Api) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let h: Health = api.json(Method::GET, "/v1/health", None::<&()>).await?;
        if h.warm_pool > 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the warm pool did not refill within 30s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(
            percentiles(&mut v),
            Percentiles {
                p50: 50.0,
                p99: 99.0
            }
        );
        let mut one = vec![3.0];
        assert_eq!(percentiles(&mut one), Percentiles { p50: 3.0, p99: 3.0 });
    }
}
