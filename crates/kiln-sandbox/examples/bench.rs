//! Measures sandbox create / first-output / remove latency with the real runtime (needs root,
//! runc, btrfs-progs and a static kilnd):
//!
//! ```text
//! cargo run --release -p kiln-sandbox --example bench -- [iterations=50] [none|full]
//! ```
//! `KILND` overrides the kilnd binary (default `target/x86_64-unknown-linux-gnu/kilnd/kilnd`),
//! `KILN_LAYER` the image layer (a rootfs directory, required). Prints p50/p90/p99 in milliseconds.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use kiln_protocol::kilnd::{ExecSpec, Reply};
use kiln_sandbox::{NetworkMode, Runtime, RuntimeConfig, SandboxSpec};

fn pct(v: &mut [Duration], p: f64) -> f64 {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i].as_secs_f64() * 1e3
}

fn line(name: &str, v: &mut [Duration]) {
    println!(
        "{name:<28} p50 {:7.2} ms   p90 {:7.2} ms   p99 {:7.2} ms   max {:7.2} ms   (n={})",
        pct(v, 0.5),
        pct(v, 0.9),
        pct(v, 0.99),
        pct(v, 1.0),
        v.len()
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(50);
    let network = match args.next().as_deref() {
        Some("full") => NetworkMode::Full,
        _ => NetworkMode::None,
    };
    let kilnd = std::env::var("KILN_KILND")
        .or_else(|_| std::env::var("KILND"))
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../target/x86_64-unknown-linux-gnu/kilnd/kilnd")
        });
    let kilnd = kilnd.canonicalize()?;
    let layer = PathBuf::from(std::env::var("KILN_LAYER").map_err(|_| {
        "set KILN_LAYER to a root filesystem (e.g. a layer's rootfs under <images>/layers/)"
    })?);

    let dir = tempfile::Builder::new()
        .prefix("kiln-bench")
        .tempdir_in("/var/tmp")?;
    let tag = std::process::id();
    let mut cfg = RuntimeConfig::new(dir.path().join("data"), kilnd);
    cfg.run_dir = PathBuf::from(format!("/run/kiln-bench-{tag}"));
    cfg.cgroup_parent = format!("kiln-bench/{tag}");
    cfg.disk_pool_bytes = 8 << 30;
    let t = Instant::now();
    let rt = Runtime::new(cfg).await?;
    println!(
        "Runtime::new (cold: mkfs + mount + bridge + reaper): {:.1} ms",
        t.elapsed().as_secs_f64() * 1e3
    );

    let result = run(&rt, n, network, &layer).await;
    rt.destroy_all().await?;
    result
}

async fn run(
    rt: &Runtime,
    n: usize,
    network: NetworkMode,
    layer: &std::path::Path,
) -> Result<(), Box<dyn std::error::Error>> {
    let (mut create, mut first_out, mut remove) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..n + 3 {
        let mut spec = SandboxSpec::new(format!("bench-{i}"), vec![layer.to_path_buf()]);
        spec.network = network.clone();
        let t0 = Instant::now();
        rt.create(&spec).await?;
        let t_created = t0.elapsed();
        let mut stream = rt
            .client(&spec.id)
            .exec(ExecSpec {
                cmd: vec!["echo".into(), "hi".into()],
                ..Default::default()
            })
            .await?;
        let mut t_out = None;
        while let Some(r) = stream.next().await {
            match r? {
                Reply::Output { .. } if t_out.is_none() => t_out = Some(t0.elapsed()),
                Reply::Exited(_) => break,
                _ => {}
            }
        }
        let t1 = Instant::now();
        rt.remove(&spec.id).await?;
        let t_removed = t1.elapsed();
        if i >= 3 {
            create.push(t_created);
            first_out.push(t_out.unwrap_or_default());
            remove.push(t_removed);
        }
    }
    println!("network: {network:?}");
    line("create (until kilnd ping)", &mut create);
    line("create + exec first output", &mut first_out);
    line("remove", &mut remove);
    Ok(())
}
