//! Removes every sandbox of one Kiln data dir and unmounts its disk pool (dev/CI helper):
//!
//! ```text
//! cargo run -p kiln-sandbox --example wipe -- DATA_DIR RUN_DIR CGROUP_PARENT [KILND]
//! ```

use std::path::PathBuf;

use kiln_sandbox::{Runtime, RuntimeConfig};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let a: Vec<String> = std::env::args().skip(1).collect();
    if a.len() < 3 {
        eprintln!("usage: wipe DATA_DIR RUN_DIR CGROUP_PARENT [KILND]");
        std::process::exit(2);
    }
    let kilnd = a.get(3).map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../target/x86_64-unknown-linux-gnu/kilnd/kilnd")
    });
    let mut cfg = RuntimeConfig::new(&a[0], kilnd.canonicalize()?);
    cfg.run_dir = PathBuf::from(&a[1]);
    cfg.cgroup_parent = a[2].clone();
    let rt = Runtime::new(cfg).await?;
    let report = rt.destroy_all().await?;
    println!("removed: {:?}", report.removed);
    Ok(())
}
