//! `kiln bench agent`: Kiln's own cost of running agents, in-process against a throwaway
//! server (real runc sandboxes, the SQLite store) and the scripted model server: overhead per
//! step excluding model time for a step with one exec tool call (with a direct exec round
//! trip through the same sandbox measured in the same run as the baseline), event-log append
//! and stream throughput, and the time to spawn a sub-agent that shares its parent's sandbox.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use clap::Args;
use kiln_agent::events::{Event, EventKind};
use kiln_agent::runner::StartRun;
use kiln_agent::scripted::{ScriptedServer, Turn};
use kiln_store::agents::AgentEventRow;
use serde_json::json;

use crate::bench::{percentiles, Percentiles, Throwaway};
use crate::Global;

#[derive(Args, Debug)]
pub struct AgentBench {
    /// Steps (each one exec tool call) in the overhead run
    #[arg(long, default_value_t = 200)]
    pub steps: usize,
    /// Events appended in the append-throughput measurement
    #[arg(long, default_value_t = 5000)]
    pub events: usize,
    /// Sub-agents spawned (sharing the parent's sandbox)
    #[arg(long, default_value_t = 30)]
    pub spawns: usize,
    /// Image store with the `base` template [default: <data dir>/images]
    #[arg(long, env = "KILN_IMAGES_DIR")]
    pub images_dir: Option<PathBuf>,
    /// The static kilnd [default: next to `kiln`, or what `kiln up` finds]
    #[arg(long, env = "KILN_KILND")]
    pub kilnd: Option<PathBuf>,
    /// Print one JSON object
    #[arg(long)]
    pub json: bool,
}

async fn wait_finished(
    rx: &mut tokio::sync::broadcast::Receiver<Event>,
    seen: &mut Vec<(Instant, Event)>,
) -> Result<()> {
    loop {
        match tokio::time::timeout(Duration::from_secs(120), rx.recv()).await {
            Ok(Ok(e)) => {
                let fin = matches!(e.kind, EventKind::Finished { .. });
                seen.push((Instant::now(), e));
                if fin {
                    return Ok(());
                }
            }
            Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(n))) => {
                bail!("lagged {n} events")
            }
            Ok(Err(_)) => return Ok(()),
            Err(_) => bail!("the run did not finish within 120 s"),
        }
    }
}

pub async fn run(g: &Global, b: AgentBench) -> Result<i32> {
    let images = b.images_dir.clone().unwrap_or_else(|| {
        g.data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(crate::api::DEFAULT_DATA_DIR))
            .join("images")
    });
    let model = ScriptedServer::start(Vec::new()).await?;
    let kid = ScriptedServer::start(Vec::new()).await?;
    kid.repeat_forever(Turn::text("child done"));
    let server = Throwaway::start("agent", b.kilnd.clone(), |cfg| {
        cfg.images_dir = images;
        cfg.agents = kiln_agent::config::AgentConfig::from_toml(&format!(
            "[providers.bench]\nprotocol = \"openai\"\nbase_url = \"{}/v1\"\n[providers.kid]\nprotocol = \"openai\"\nbase_url = \"{}/v1\"\n\
             [profiles.child]\nmodel = \"kid/m\"\ntools = [\"exec\"]\n[profiles.parent]\nmodel = \"bench/m\"\n[profiles.parent.budget]\nmax_steps = 100000\n",
            model.url(),
            kid.url()
        ))?;
        Ok(())
    })
    .await?;
    let result = measure(&server.kiln, &model, &b, &server.url).await;
    server.stop().await;
    let report = result?;
    if b.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        let p = |name: &str, v: &serde_json::Value| {
            println!(
                "{name:<58} p50 {:>8.3} ms   p99 {:>8.3} ms",
                v["p50"].as_f64().unwrap_or(f64::NAN),
                v["p99"].as_f64().unwrap_or(f64::NAN)
            );
        };
        p(
            "step with one exec call, excluding model time",
            &report["step_overhead_ms"],
        );
        p(
            "  baseline: exec `true` through the same sandbox",
            &report["exec_baseline_ms"],
        );
        p(
            "  Kiln's loop alone (step overhead minus exec p50)",
            &report["loop_only_ms"],
        );
        p("sub-agent spawn, shared sandbox", &report["spawn_ms"]);
        println!(
            "{:<58} {:>10.0} events/s",
            "event append (store)",
            report["append_events_per_sec"].as_f64().unwrap_or(0.0)
        );
        println!(
            "{:<58} {:>10.0} events/s",
            "event stream (GET /v1/agents/ID/events)",
            report["stream_events_per_sec"].as_f64().unwrap_or(0.0)
        );
        println!(
            "step overhead p50 / exec baseline p50: {:.2}x",
            report["overhead_vs_exec_ratio"].as_f64().unwrap_or(0.0)
        );
    }
    Ok(0)
}

async fn measure(
    kiln: &Arc<kiln_server::Kiln>,
    model: &ScriptedServer,
    b: &AgentBench,
    url: &str,
) -> Result<serde_json::Value> {
    let rt = kiln_server::agents::agents(kiln);
    let org = kiln.system_org.clone();
    // 1. Steps with one exec call each (distinct commands, so stuck detection stays quiet).
    model.push((0..b.steps).map(|i| {
        Turn::call(
            &format!("s{i}"),
            "exec",
            json!({"cmd": format!("true {i}")}),
        )
    }));
    model.push([Turn::text("done")]);
    let row = rt
        .start(
            &org,
            "bench",
            StartRun {
                task: "bench".into(),
                profile: Some("parent".into()),
                template: Some("base".into()),
                keep_sandbox: true,
                ..StartRun::default()
            },
        )
        .await?;
    let live = rt.live(&row.id).ok_or_else(|| anyhow!("run not live"))?;
    let mut rx = live.subscribe();
    let mut seen = Vec::new();
    wait_finished(&mut rx, &mut seen).await?;
    let mut overhead = Vec::new();
    let reqs: Vec<(Instant, u64)> = seen
        .iter()
        .filter(|(_, e)| matches!(e.kind, EventKind::ModelRequest { .. }))
        .map(|(t, e)| (*t, e.seq))
        .collect();
    let lat: Vec<u64> = seen
        .iter()
        .filter_map(|(_, e)| match &e.kind {
            EventKind::ModelResponse { latency_us, .. } => Some(*latency_us),
            _ => None,
        })
        .collect();
    // Responses seen after the first observed request pair with it.
    let skip = lat.len().saturating_sub(reqs.len());
    for (i, w) in reqs.windows(2).enumerate() {
        if let Some(l) = lat.get(skip + i) {
            let step = w[1].0.duration_since(w[0].0).as_secs_f64() * 1000.0;
            overhead.push(step - *l as f64 / 1000.0);
        }
    }
    if overhead.is_empty() {
        bail!("no steps measured");
    }
    let step_p = percentiles(&mut overhead);
    // Baseline: the same exec through the same sandbox trait, without the loop.
    let sb_id = row.sandbox_id.clone().unwrap_or_default();
    let client = kiln.runtime.client(&sb_id);
    let mut exec = Vec::new();
    for i in 0..b.steps.min(200) {
        let t0 = Instant::now();
        let mut s = client
            .exec(kiln_protocol::kilnd::ExecSpec {
                cmd: vec!["sh".into(), "-c".into(), format!("true {i}")],
                cwd: Some("/workspace".into()),
                timeout_secs: Some(120.0),
                ..Default::default()
            })
            .await?;
        while let Some(r) = s.next().await {
            if matches!(r?, kiln_protocol::kilnd::Reply::Exited(_)) {
                break;
            }
        }
        exec.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    let exec_p = percentiles(&mut exec);
    let mut loop_only: Vec<f64> = overhead.iter().map(|o| o - exec_p.p50).collect();
    let loop_p = percentiles(&mut loop_only);

    // 2. Event stream over HTTP (the finished run's whole log) and appends to the store.
    let n_events = rt.events(&row.id, 0).await?.len();
    let http = reqwest::Client::new();
    let t0 = Instant::now();
    let mut streamed = 0usize;
    for _ in 0..5 {
        let text = http
            .get(format!("{url}/v1/agents/{}/events", row.id))
            .bearer_auth(&kiln.token)
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        streamed += text.lines().count();
    }
    let stream_rate = streamed as f64 / t0.elapsed().as_secs_f64();
    let data = serde_json::to_string(
        &json!({"type": "message", "from": "bench", "to": "bench", "text": "x".repeat(200)}),
    )?;
    let t0 = Instant::now();
    for i in 0..b.events {
        kiln.store
            .append_agent_event(
                "run-bench-append",
                &AgentEventRow {
                    seq: i as u64 + 1,
                    time_ms: 0,
                    kind: "message".into(),
                    data: data.clone(),
                },
            )
            .await?;
    }
    let append_rate = b.events as f64 / t0.elapsed().as_secs_f64();

    // 3. Sub-agent spawns sharing the parent's sandbox.
    model.push((0..b.spawns).map(|i| {
        Turn::call(
            &format!("p{i}"),
            "spawn_agent",
            json!({"profile": "child", "task": format!("task {i}")}),
        )
    }));
    model.push([
        Turn::call("w", "wait_agents", json!({})),
        Turn::text("done"),
    ]);
    let row = rt
        .start(
            &org,
            "bench",
            StartRun {
                task: "spawn".into(),
                profile: Some("parent".into()),
                sandbox: Some(sb_id.clone()),
                ..StartRun::default()
            },
        )
        .await?;
    let live = rt.live(&row.id).ok_or_else(|| anyhow!("run not live"))?;
    let mut rx = live.subscribe();
    let mut seen = Vec::new();
    wait_finished(&mut rx, &mut seen).await?;
    let mut spawn = Vec::new();
    let mut begun: std::collections::HashMap<String, Instant> = Default::default();
    for (t, e) in &seen {
        match &e.kind {
            EventKind::ToolCallBegin { call_id, tool, .. } if tool == "spawn_agent" => {
                begun.insert(call_id.clone(), *t);
            }
            EventKind::ToolCallEnd { call_id, .. } => {
                if let Some(t0) = begun.remove(call_id) {
                    spawn.push(t.duration_since(t0).as_secs_f64() * 1000.0);
                }
            }
            _ => {}
        }
    }
    let spawn_p: Percentiles = percentiles(&mut spawn);
    Ok(json!({
        "steps_measured": overhead.len(),
        "step_overhead_ms": step_p,
        "exec_baseline_ms": exec_p,
        "loop_only_ms": loop_p,
        "overhead_vs_exec_ratio": (step_p.p50 / exec_p.p50 * 100.0).round() / 100.0,
        "events_in_log": n_events,
        "stream_events_per_sec": stream_rate.round(),
        "append_events_per_sec": append_rate.round(),
        "spawns_measured": spawn.len(),
        "spawn_ms": spawn_p,
    }))
}
