//! Metering end to end: lifecycle and sampled usage events for a real sandbox (CPU from its
//! cgroup, disk from its volume), windows that chain without gaps or overlaps through pause,
//! resume, a lost meter state (a crash) and a restart, idempotent replays, the `/v1/usage`
//! aggregation and its org isolation.

use kiln_protocol::api::{CreateSandbox, UsageEventList, UsageReport};
use serde_json::json;

use crate::harness;

async fn events(s: &harness::TestServer, sandbox: &str) -> Vec<kiln_protocol::api::UsageEvent> {
    let r = s
        .http
        .get(s.url("/v1/usage/events?from=0"))
        .send()
        .await
        .expect("events");
    assert_eq!(r.status(), 200);
    let list: UsageEventList = r.json().await.expect("json");
    list.events
        .into_iter()
        .filter(|e| e.data.sandbox == sandbox)
        .collect()
}

#[tokio::test]
async fn usage_windows_chain_through_pause_crash_and_restart_and_aggregate() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut cfg = harness::config(dir.path());
    // The test drives sampling itself.
    cfg.meter_interval = std::time::Duration::from_secs(3600);
    let s = harness::start(cfg.clone()).await;
    let sb = s.create(&CreateSandbox::default()).await;
    // Work: CPU time and a 4 MB file in the writable layer.
    let (_, _, code) = s
        .sh(
            &sb.id,
            "head -c 4000000 /dev/urandom > /root/blob; sync; i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done",
        )
        .await;
    assert_eq!(code, 0);
    s.kiln.meter_all().await;
    let r = s
        .http
        .post(s.url(&format!("/v1/sandboxes/{}/pause", sb.id)))
        .send()
        .await
        .expect("pause");
    assert_eq!(r.status(), 200);
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    s.kiln.meter_all().await;
    let r = s
        .http
        .post(s.url(&format!("/v1/sandboxes/{}/resume", sb.id)))
        .send()
        .await
        .expect("resume");
    assert_eq!(r.status(), 200);
    // A crash loses the meter's memory; the next sample continues from the stored chain.
    s.kiln.meter_forget().await;
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    s.kiln.meter_all().await;
    // A clean restart closes the open window, the new server continues the chain.
    s.stop().await;
    let s = harness::start(cfg).await;
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    s.kiln.meter_all().await;
    let r = s
        .http
        .delete(s.url(&format!("/v1/sandboxes/{}", sb.id)))
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 204);

    let evs = events(&s, &sb.id).await;
    let kinds: Vec<&str> = evs
        .iter()
        .map(|e| e.kind.trim_start_matches("dev.kiln.sandbox."))
        .collect();
    assert_eq!(kinds.first(), Some(&"started"), "{kinds:?}");
    assert_eq!(kinds.last(), Some(&"stopped"), "{kinds:?}");
    for k in ["paused", "resumed"] {
        assert_eq!(kinds.iter().filter(|x| **x == k).count(), 1, "{kinds:?}");
    }
    // The usage windows chain: each starts where the previous event ended.
    let usage: Vec<_> = evs
        .iter()
        .filter(|e| e.kind == "dev.kiln.sandbox.usage")
        .collect();
    assert!(usage.len() >= 5, "{kinds:?}");
    let started = &evs[0];
    let mut end = started.data.end_ms;
    for u in &usage {
        assert_eq!(u.data.start_ms, end, "a gap or an overlap: {usage:#?}");
        assert!(u.data.end_ms > u.data.start_ms);
        assert!(u.subject.ends_with(&format!("/sandbox/{}", sb.id)));
        end = u.data.end_ms;
    }
    // Sandbox-seconds are the running time: every window but the paused one.
    // While paused: the sample taken then, and the window the resume closed.
    let paused: Vec<_> = usage
        .iter()
        .filter(|u| u.data.sandbox_seconds == 0.0)
        .collect();
    assert_eq!(paused.len(), 2, "two windows were paused: {usage:#?}");
    assert!(paused
        .iter()
        .all(|u| u.data.memory_gib_seconds == 0.0 && u.data.disk_gib_seconds > 0.0));
    let span_ms = end - started.data.end_ms;
    let paused_ms: u64 = paused.iter().map(|u| u.data.end_ms - u.data.start_ms).sum();
    let total_sb: f64 = usage.iter().map(|u| u.data.sandbox_seconds).sum();
    assert!(
        (total_sb - (span_ms - paused_ms) as f64 / 1000.0).abs() < 1e-6,
        "{total_sb} vs {span_ms} - {paused_ms}"
    );
    let cpu: f64 = usage.iter().map(|u| u.data.cpu_seconds).sum();
    assert!(cpu > 0.0, "the busy loop used CPU: {usage:#?}");
    let mem: f64 = usage.iter().map(|u| u.data.memory_gib_seconds).sum();
    assert!(mem > 0.0);
    let disk: f64 = usage.iter().map(|u| u.data.disk_gib_seconds).sum();
    assert!(disk > 0.0, "the 4 MB file is on disk: {usage:#?}");

    // Replaying every recorded event is a no-op.
    let before = s
        .kiln
        .store
        .usage_events(&s.kiln.system_org, 0, u64::MAX / 2, 10_000)
        .await
        .expect("events");
    for e in &before {
        assert!(!s.kiln.store.append_usage(e).await.expect("replay"));
    }

    // The report sums the same numbers, by sandbox and by template.
    let r: UsageReport = s
        .http
        .get(s.url("/v1/usage?from=0&by=sandbox&granularity=day"))
        .send()
        .await
        .expect("report")
        .json()
        .await
        .expect("json");
    let row = r
        .buckets
        .iter()
        .find(|b| b.group.as_deref() == Some(sb.id.as_str()))
        .expect("a row for the sandbox");
    assert!((row.usage.sandbox_seconds - total_sb).abs() < 1e-6);
    assert!((row.usage.cpu_seconds - cpu).abs() < 1e-6);
    assert_eq!(row.usage.events as usize, evs.len());
    let r: UsageReport = s
        .http
        .get(s.url("/v1/usage?from=0&by=template"))
        .send()
        .await
        .expect("report")
        .json()
        .await
        .expect("json");
    assert!(r.buckets.iter().all(|b| b.group.as_deref() == Some("base")));
    assert!((r.total.sandbox_seconds - total_sb).abs() < 1e-6);

    // Another org sees none of it; bad queries are 400 with a hint.
    let b: kiln_protocol::api::OrgCreated = s
        .http
        .post(s.url("/v1/orgs"))
        .json(&json!({"name": "other"}))
        .send()
        .await
        .expect("org")
        .json()
        .await
        .expect("json");
    let key_b = b.key.expect("key").secret;
    let r: UsageReport = reqwest::Client::new()
        .get(s.url("/v1/usage?from=0"))
        .bearer_auth(&key_b)
        .send()
        .await
        .expect("report")
        .json()
        .await
        .expect("json");
    assert!(r.buckets.is_empty() && r.total.events == 0, "{r:?}");
    let mut bad = String::new();
    for q in [
        "granularity=week",
        "by=colour",
        "from=yesterday",
        "from=2026-11-24&to=2026-11-23",
    ] {
        let r = s
            .http
            .get(s.url(&format!("/v1/usage?{q}")))
            .send()
            .await
            .expect("bad");
        let st = r.status().as_u16();
        let v: serde_json::Value = r.json().await.expect("json");
        bad.push_str(&format!(
            "{q} -> {st} {} | {}\n",
            v["error"]["message"].as_str().unwrap_or_default(),
            v["error"]["hint"].as_str().unwrap_or_default()
        ));
    }
    expect_test::expect![[r#"
        granularity=week -> 400 granularity="week" is not understood | use hour or day
        by=colour -> 400 by="colour" is not understood | use key, sandbox, template, agent or model
        from=yesterday -> 400 from="yesterday" is not understood | use unix milliseconds, RFC 3339 (2026-11-24T08:00:00Z), a UTC date (2026-11-24) or a duration ago (24h, 7d)
        from=2026-11-24&to=2026-11-23 -> 400 from (2026-11-24T00:00:00.000Z) is not before to (2026-11-23T00:00:00.000Z) | give a from earlier than to
    "#]]
    .assert_eq(&bad);
    s.teardown().await;
}
