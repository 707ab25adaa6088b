//! Latency bench (and smoke check) against a running kilnd:
//! `cargo run --release -p kilnd --example kilnd_bench -- SOCKET [ITERATIONS]`.
//! Reports ping and `exec true` round trips (connect, spawn, exit, `Exited` received).

use std::time::{Duration, Instant};

use kiln_protocol::kilnd::{ExecSpec, Reply};
use kilnd::Client;

fn stats(name: &str, mut v: Vec<Duration>) {
    v.sort();
    let pct = |p: f64| v[((v.len() as f64 - 1.0) * p) as usize];
    let mean = v.iter().sum::<Duration>() / v.len() as u32;
    println!(
        "{name:>10}: n={} mean={:?} p50={:?} p90={:?} p99={:?} max={:?}",
        v.len(),
        mean,
        pct(0.5),
        pct(0.9),
        pct(0.99),
        pct(1.0)
    );
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let socket = args.next().ok_or("usage: bench SOCKET [ITERATIONS]")?;
    let n: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(1000);
    let client = Client::new(socket);
    println!("kilnd {}", client.ping().await?);

    let mut pings = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        client.ping().await?;
        pings.push(t.elapsed());
    }
    stats("ping", pings);

    let spec = ExecSpec {
        cmd: vec!["true".into()],
        ..Default::default()
    };
    let mut execs = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let mut s = client.exec(spec.clone()).await?;
        loop {
            match s.next().await {
                Some(Ok(Reply::Exited(st))) => {
                    if st.exit_code != Some(0) {
                        return Err(format!("true exited with {st:?}").into());
                    }
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
                None => return Err("stream ended early".into()),
            }
        }
        execs.push(t.elapsed());
    }
    stats("exec true", execs);
    Ok(())
}
