//! Store tests, each run against SQLite and a fresh PostgreSQL schema.

use std::sync::Arc;

use super::*;

fn row(id: &str, pooled: bool, org: &str) -> SandboxRow {
    SandboxRow {
        sandbox: Sandbox {
            id: id.into(),
            template: "base".into(),
            image: "sha256:ab".into(),
            state: SandboxState::Running,
            cpus: 1.0,
            memory_bytes: 512 << 20,
            disk_bytes: 2 << 30,
            network: NetworkMode::None,
            created_at_ms: 1,
            expires_at_ms: None,
            from_pool: false,
            labels: Default::default(),
            ip: None,
        },
        pooled,
        org_id: if pooled { String::new() } else { org.into() },
        key_id: None,
        host: String::new(),
    }
}

fn key() -> PoolKey {
    PoolKey {
        template: "base".into(),
        cpus: 1.0,
        memory_bytes: 512 << 20,
        disk_bytes: 2 << 30,
        network: NetworkMode::None,
    }
}

fn roomy() -> Limits {
    Limits {
        sandboxes: 100,
        cpus: 100.0,
        memory_bytes: 1 << 40,
        disk_bytes: 1 << 40,
    }
}

fn org(id: &str) -> OrgRow {
    OrgRow {
        id: id.into(),
        name: format!("name-{id}"),
        created_at_ms: 1,
        quota: Quota::default(),
        rate_limits: None,
    }
}

/// Runs `f` on a SQLite store and on a PostgreSQL store in its own schema.
async fn on_both<F, Fut>(f: F)
where
    F: Fn(Arc<Store>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let dir = tempfile::tempdir().expect("tmp");
    let s = Store::open(&dir.path().join("kiln.db"))
        .await
        .expect("sqlite");
    f(Arc::new(s)).await;
    let schema = testing::schema().await.expect("postgres");
    let s = Store::connect(Some(&schema.url), Path::new("/nonexistent"))
        .await
        .expect("postgres store");
    assert_eq!(s.backend(), Backend::Postgres);
    f(Arc::new(s)).await;
    schema.drop_schema().await;
}

#[tokio::test]
async fn claim_takes_each_pool_member_once() {
    on_both(|s| async move {
        s.create_org(&org("o1")).await.expect("org");
        s.insert(&row("sb-a", true, "")).await.expect("insert");
        s.insert(&row("sb-b", false, "o1")).await.expect("insert");
        assert_eq!(s.list(false).await.expect("list").len(), 1);
        assert_eq!(s.pooled_count("base", false).await.expect("count"), 1);
        assert_eq!(s.pooled_count("base", true).await.expect("count"), 1);
        let labels = [("k".to_string(), "v".to_string())].into_iter().collect();
        let c = s
            .claim_pooled(
                &key(),
                "o1",
                Some("key_1"),
                &roomy(),
                42,
                Some(100),
                &labels,
            )
            .await
            .expect("claim")
            .expect("quota")
            .expect("some");
        assert_eq!(c.sandbox.id, "sb-a");
        assert!(c.sandbox.from_pool && !c.pooled);
        assert_eq!(
            (c.org_id.as_str(), c.key_id.as_deref()),
            ("o1", Some("key_1"))
        );
        assert_eq!(c.sandbox.labels, labels);
        let again = s
            .claim_pooled(&key(), "o1", None, &roomy(), 43, None, &labels)
            .await
            .expect("claim");
        assert_eq!(again, Ok(None));
        let other = PoolKey { cpus: 2.0, ..key() };
        s.insert(&row("sb-c", true, "")).await.expect("insert");
        let none = s
            .claim_pooled(&other, "o1", None, &roomy(), 43, None, &labels)
            .await
            .expect("claim");
        assert_eq!(none, Ok(None));
        assert_eq!(s.expired(99).await.expect("exp"), Vec::<String>::new());
        assert_eq!(s.expired(100).await.expect("exp"), vec!["sb-a".to_string()]);
        assert_eq!(s.list_org("o1").await.expect("list").len(), 2);
        assert_eq!(s.list_org("o2").await.expect("list").len(), 0);
    })
    .await;
}

#[tokio::test]
async fn creating_members_cannot_be_claimed() {
    on_both(|s| async move {
        s.create_org(&org("o1")).await.expect("org");
        let mut r = row("sb-a", true, "");
        r.sandbox.state = SandboxState::Creating;
        s.insert(&r).await.expect("insert");
        let labels = Default::default();
        let c = s
            .claim_pooled(&key(), "o1", None, &roomy(), 1, None, &labels)
            .await
            .expect("claim");
        assert_eq!(c, Ok(None));
        assert_eq!(
            (
                s.pooled_count("base", false).await.expect("n"),
                s.pooled_count("base", true).await.expect("n")
            ),
            (1, 0)
        );
        assert!(s
            .mark_created("sb-a", Some("10.0.0.2"))
            .await
            .expect("mark"));
        assert!(!s
            .mark_created("sb-a", None)
            .await
            .expect("mark twice is a no-op"));
        let c = s
            .claim_pooled(&key(), "o1", None, &roomy(), 1, None, &labels)
            .await
            .expect("claim")
            .expect("quota")
            .expect("some");
        assert_eq!(c.sandbox.ip.as_deref(), Some("10.0.0.2"));
    })
    .await;
}

#[tokio::test]
async fn state_and_meta_round_trip() {
    on_both(|s| async move {
        s.insert(&row("sb-a", false, "o1")).await.expect("insert");
        assert!(s
            .set_state("sb-a", SandboxState::Paused)
            .await
            .expect("set"));
        assert_eq!(
            s.get("sb-a")
                .await
                .expect("get")
                .expect("some")
                .sandbox
                .state,
            SandboxState::Paused
        );
        assert!(!s.set_state("nope", SandboxState::Dead).await.expect("set"));
        assert!(s.delete("sb-a").await.expect("del"));
        assert_eq!(s.get("sb-a").await.expect("get"), None);
        s.set_meta("k", "1").await.expect("meta");
        s.set_meta("k", "2").await.expect("meta");
        assert_eq!(s.get_meta("k").await.expect("meta").as_deref(), Some("2"));
        assert_eq!(s.init_meta("k", "3").await.expect("init"), "2");
        assert_eq!(s.init_meta("j", "3").await.expect("init"), "3");
    })
    .await;
}

#[tokio::test]
async fn orgs_and_keys_round_trip() {
    on_both(|s| async move {
        s.create_org(&org("o1")).await.expect("org");
        let dup = OrgRow {
            id: "o2".into(),
            ..org("o1")
        };
        assert!(matches!(
            s.create_org(&dup).await,
            Err(StoreError::Conflict(_))
        ));
        assert_eq!(
            s.get_org("name-o1").await.expect("get").map(|o| o.id),
            Some("o1".to_string())
        );
        let q = Quota {
            sandboxes: Some(3),
            cpus: Some(1.5),
            memory_bytes: None,
            disk_bytes: Some(10),
        };
        assert!(s.set_quota("o1", &q).await.expect("quota"));
        assert_eq!(s.get_org("o1").await.expect("get").expect("some").quota, q);
        let rl = kiln_protocol::api::RateLimits {
            manage: kiln_protocol::api::Rate {
                per_sec: 1.5,
                burst: 2,
            },
            create: kiln_protocol::api::Rate {
                per_sec: 1.0,
                burst: 1,
            },
            sandbox: kiln_protocol::api::Rate {
                per_sec: 9.0,
                burst: 9,
            },
        };
        assert!(s.set_rate_limits("o1", Some(&rl)).await.expect("rl"));
        assert_eq!(
            s.get_org("o1")
                .await
                .expect("get")
                .expect("some")
                .rate_limits,
            Some(rl)
        );
        let k = KeyRow {
            id: "key_a".into(),
            org_id: "o1".into(),
            name: "ci".into(),
            prefix: "kiln_abcdefg".into(),
            hash: "h1".into(),
            role: "member".into(),
            scopes: vec!["sandboxes:read".into()],
            created_at_ms: 5,
            created_by: Some("key_root".into()),
            expires_at_ms: Some(99),
            last_used_at_ms: None,
            revoked_at_ms: None,
        };
        s.insert_key(&k).await.expect("key");
        assert_eq!(s.key_by_hash("h1").await.expect("get"), Some(k.clone()));
        assert_eq!(s.key_by_hash("h2").await.expect("get"), None);
        s.touch_key("key_a", 7).await.expect("touch");
        assert!(!s.revoke_key("o2", "key_a", 8).await.expect("other org"));
        assert!(s.revoke_key("o1", "kiln_abcdefg", 8).await.expect("revoke"));
        assert!(!s.revoke_key("o1", "key_a", 9).await.expect("twice"));
        let got = s.key_by_hash("h1").await.expect("get").expect("some");
        assert_eq!((got.last_used_at_ms, got.revoked_at_ms), (Some(7), Some(8)));
        assert_eq!(s.list_keys("o1").await.expect("list").len(), 1);
        assert_eq!(s.list_keys("o2").await.expect("list").len(), 0);
    })
    .await;
}

/// Many admissions race for the last slots of one org: exactly `limit` win, on both backends.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_admissions_never_exceed_the_quota() {
    on_both(|s| async move {
        s.create_org(&org("o1")).await.expect("org");
        s.insert(&row("sb-old", false, "o1")).await.expect("insert");
        let limits = Limits {
            sandboxes: 3,
            ..roomy()
        };
        let mut tasks = Vec::new();
        for i in 0..12 {
            let s = s.clone();
            let limits = limits.clone();
            tasks.push(tokio::spawn(async move {
                s.admit_insert(&row(&format!("sb-{i}"), false, "o1"), &limits)
                    .await
                    .expect("admit")
            }));
        }
        let mut won = 0;
        let mut refused = Vec::new();
        for t in tasks {
            match t.await.expect("join") {
                Ok(()) => won += 1,
                Err(q) => refused.push(q),
            }
        }
        assert_eq!(won, 2, "one slot was already used");
        assert_eq!(
            refused[0],
            QuotaExceeded {
                quota: "sandboxes",
                limit: 3.0,
                used: 3.0,
                requested: 1.0
            }
        );
        let u = s.usage("o1").await.expect("usage");
        assert_eq!((u.sandboxes, u.cpus), (3, 3.0));
        // Pausing releases the slot (not the disk); resuming re-admits.
        s.set_state("sb-old", SandboxState::Paused)
            .await
            .expect("pause");
        let u = s.usage("o1").await.expect("usage");
        assert_eq!((u.sandboxes, u.disk_bytes), (2, 3 * (2 << 30)));
        s.admit_insert(&row("sb-new", false, "o1"), &limits)
            .await
            .expect("admit")
            .expect("fits");
        let r = s
            .admit_resume("sb-old", "o1", &limits)
            .await
            .expect("resume");
        assert_eq!(r.map_err(|q| q.quota), Err("sandboxes"));
        let disk = Limits {
            disk_bytes: 4 << 30,
            ..roomy()
        };
        let r = s
            .admit_insert(&row("sb-disk", false, "o2"), &disk)
            .await
            .expect("admit");
        assert_eq!(r, Ok(()));
        let r = s
            .admit_insert(&row("sb-disk2", false, "o2"), &disk)
            .await
            .expect("admit");
        assert_eq!(r, Ok(()));
        let r = s
            .admit_insert(&row("sb-disk3", false, "o2"), &disk)
            .await
            .expect("admit");
        assert_eq!(r.map_err(|q| q.quota), Err("disk"));
    })
    .await;
}

#[tokio::test]
async fn audit_appends_and_prunes() {
    on_both(|s| async move {
        for i in 0..3u64 {
            s.append_audit(&AuditRow {
                id: format!("a{i}"),
                time_ms: 10 * i,
                org_id: "o1".into(),
                key_prefix: "kiln_x".into(),
                action: "POST /v1/sandboxes".into(),
                resource: "/v1/sandboxes".into(),
                outcome: "ok".into(),
                status: 201,
                client: "127.0.0.1".into(),
                request_id: format!("r{i}"),
            })
            .await
            .expect("append");
        }
        let ids: Vec<String> = s
            .list_audit("o1", None, 10)
            .await
            .expect("list")
            .into_iter()
            .map(|a| a.id)
            .collect();
        assert_eq!(ids, ["a2", "a1", "a0"]);
        assert_eq!(
            s.list_audit("o1", Some(10), 1).await.expect("list").len(),
            1
        );
        assert_eq!(s.list_audit("o2", None, 10).await.expect("list").len(), 0);
        assert_eq!(s.prune_audit(15).await.expect("prune"), 2);
    })
    .await;
}

#[tokio::test]
async fn migrations_are_idempotent_and_adopt_the_old_schema() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("kiln.db");
    {
        // The schema as it was before numbered migrations.
        let c = rusqlite::Connection::open(&path).expect("open");
        c.execute_batch(
            "CREATE TABLE sandboxes (id TEXT PRIMARY KEY, template TEXT NOT NULL, image TEXT NOT NULL,
               state TEXT NOT NULL, cpus REAL NOT NULL, memory_bytes INTEGER NOT NULL,
               disk_bytes INTEGER NOT NULL, network TEXT NOT NULL, created_at_ms INTEGER NOT NULL,
               expires_at_ms INTEGER, pooled INTEGER NOT NULL DEFAULT 0,
               from_pool INTEGER NOT NULL DEFAULT 0, labels TEXT NOT NULL DEFAULT '{}', ip TEXT);
             CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
             INSERT INTO sandboxes (id, template, image, state, cpus, memory_bytes, disk_bytes, network, created_at_ms)
               VALUES ('sb-old', 'base', 'sha256:x', 'running', 1.0, 1, 1, 'none', 1);",
        )
        .expect("old schema");
    }
    let s = Store::open(&path).await.expect("migrate");
    assert_eq!(s.adopt_orphans("o1").await.expect("adopt"), 1);
    drop(s);
    let s = Store::open(&path).await.expect("reopen");
    let r = s.get("sb-old").await.expect("get").expect("some");
    assert_eq!(r.org_id, "o1");
    // And on PostgreSQL, two concurrent opens of one fresh schema migrate once.
    let schema = testing::schema().await.expect("postgres");
    let (a, b) = tokio::join!(
        Store::connect(Some(&schema.url), Path::new("/x")),
        Store::connect(Some(&schema.url), Path::new("/x"))
    );
    a.expect("a");
    b.expect("b");
    schema.drop_schema().await;
}

fn usage_event(id: &str, sandbox: &str, key: &str, end_ms: u64, secs: f64) -> UsageEventRow {
    UsageEventRow {
        id: id.into(),
        source: "kiln://host-a".into(),
        kind: "dev.kiln.sandbox.usage".into(),
        time_ms: end_ms,
        org_id: "o1".into(),
        key_id: key.into(),
        sandbox_id: sandbox.into(),
        template: "base".into(),
        start_ms: end_ms - (secs * 1000.0) as u64,
        end_ms,
        sandbox_seconds: secs,
        cpu_seconds: secs / 10.0,
        memory_gib_seconds: secs / 4.0,
        disk_gib_seconds: secs / 2.0,
        cpu_total_ns: Some(end_ms * 1000),
        ..UsageEventRow::new(String::new(), String::new(), "", "", 0)
    }
}

fn token_event(id: &str, run: &str, model: &str, end_ms: u64, tokens: u64) -> UsageEventRow {
    UsageEventRow {
        key_id: "k1".into(),
        sandbox_id: "sb-a".into(),
        agent_run: run.into(),
        model: model.into(),
        input_tokens: tokens,
        output_tokens: tokens / 10,
        cost_usd: tokens as f64 / 1e6,
        ..UsageEventRow::new(
            id.into(),
            "kiln://host-a".into(),
            "dev.kiln.agent.tokens",
            "o1",
            end_ms,
        )
    }
}

#[tokio::test]
async fn usage_events_are_idempotent_and_aggregate_by_bucket_and_group() {
    on_both(|s| async move {
        const H: u64 = 3_600_000;
        let events = [
            usage_event("e1", "sb-a", "k1", 10 * H + 30_000, 30.0),
            usage_event("e2", "sb-a", "k1", 10 * H + 60_000, 30.0),
            usage_event("e3", "sb-b", "k2", 11 * H + 5_000, 10.0),
            usage_event("e4", "sb-b", "k2", 35 * H, 20.0),
        ];
        for e in &events {
            assert!(s.append_usage(e).await.expect("append"));
        }
        // A replay (same id, even with different numbers) changes nothing.
        let replay = usage_event("e2", "sb-a", "k1", 10 * H + 60_000, 999.0);
        assert!(!s.append_usage(&replay).await.expect("replay"));
        // Agent token events: attributed to the sandbox, but not part of its usage chain.
        for t in [
            token_event("run-1:tokens:3", "run-1", "m/a", 10 * H + 90_000, 1000),
            token_event("run-1:tokens:9", "run-1", "m/a", 10 * H + 95_000, 500),
            token_event("run-2:tokens:3", "run-2", "m/b", 10 * H + 96_000, 200),
        ] {
            assert!(s.append_usage(&t).await.expect("append tokens"));
        }
        let again = token_event("run-1:tokens:9", "run-1", "m/a", 10 * H + 95_000, 77);
        assert!(!s.append_usage(&again).await.expect("replayed tokens"));

        let last = s.last_usage("sb-a").await.expect("last").expect("some");
        assert_eq!((last.id.as_str(), last.sandbox_seconds), ("e2", 30.0));
        assert_eq!(s.last_usage("sb-none").await.expect("last"), None);

        let fmt = |rows: Vec<UsageAgg>| {
            rows.iter()
                .map(|r| {
                    format!(
                        "{} {:<6} sb={} cpu={} mem={} disk={} n={}\n",
                        r.bucket_start_ms / H,
                        r.group,
                        r.sandbox_seconds,
                        r.cpu_seconds,
                        r.memory_gib_seconds,
                        r.disk_gib_seconds,
                        r.events
                    )
                })
                .collect::<String>()
        };
        let by_hour = s
            .usage_report("o1", 0, 100 * H, H, UsageGroup::Key)
            .await
            .expect("report");
        expect_test::expect![[r#"
            10 k1     sb=60 cpu=6 mem=15 disk=30 n=5
            11 k2     sb=10 cpu=1 mem=2.5 disk=5 n=1
            35 k2     sb=20 cpu=2 mem=5 disk=10 n=1
        "#]]
        .assert_eq(&fmt(by_hour));
        let tokens = |rows: Vec<UsageAgg>| {
            rows.iter()
                .map(|r| {
                    format!(
                        "{} {} in={} out={} usd={} n={}\n",
                        r.bucket_start_ms / H,
                        r.group,
                        r.input_tokens,
                        r.output_tokens,
                        r.cost_usd,
                        r.events
                    )
                })
                .collect::<String>()
        };
        let by_agent = s
            .usage_report("o1", 0, 100 * H, H, UsageGroup::Agent)
            .await
            .expect("report");
        expect_test::expect![[r#"
            10 run-1 in=1500 out=150 usd=0.0015 n=2
            10 run-2 in=200 out=20 usd=0.0002 n=1
        "#]]
        .assert_eq(&tokens(by_agent));
        let by_model = s
            .usage_report("o1", 0, 100 * H, 24 * H, UsageGroup::Model)
            .await
            .expect("report");
        expect_test::expect![[r#"
            0 m/a in=1500 out=150 usd=0.0015 n=2
            0 m/b in=200 out=20 usd=0.0002 n=1
        "#]]
        .assert_eq(&tokens(by_model));
        let by_day = s
            .usage_report("o1", 0, 100 * H, 24 * H, UsageGroup::None)
            .await
            .expect("report");
        expect_test::expect![[r#"
            0        sb=70 cpu=7 mem=17.5 disk=35 n=6
            24        sb=20 cpu=2 mem=5 disk=10 n=1
        "#]]
        .assert_eq(&fmt(by_day));
        // The window is half-open on the window end; another org sees nothing.
        let window = s
            .usage_report("o1", 10 * H + 60_000, 12 * H, H, UsageGroup::Sandbox)
            .await
            .expect("report");
        expect_test::expect![[r#"
            10 sb-a   sb=30 cpu=3 mem=7.5 disk=15 n=4
            11 sb-b   sb=10 cpu=1 mem=2.5 disk=5 n=1
        "#]]
        .assert_eq(&fmt(window));
        assert!(s
            .usage_report("o2", 0, 100 * H, H, UsageGroup::None)
            .await
            .expect("report")
            .is_empty());
        let evs = s.usage_events("o1", 0, 100 * H, 2).await.expect("events");
        let all = s.usage_events("o1", 0, 100 * H, 100).await.expect("events");
        let t = all
            .iter()
            .find(|e| e.id == "run-1:tokens:9")
            .expect("token event");
        assert_eq!((t.input_tokens, t.model.as_str()), (500, "m/a"));
        assert_eq!(
            evs.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
            ["e1", "e2"]
        );
    })
    .await;
}

#[tokio::test]
async fn agent_events_are_append_only_and_approvals_answer_once() {
    on_both(|s| async move {
        let run = agents::AgentRunRow {
            id: "run-1".into(),
            org_id: "o1".into(),
            parent_id: None,
            profile: "coder".into(),
            model: "ollama/m".into(),
            task: "t".into(),
            state: "running".into(),
            reason: None,
            sandbox_id: Some("sb-1".into()),
            spec: "{}".into(),
            stats: "{}".into(),
            host: String::new(),
            created_at_ms: 1,
            updated_at_ms: 1,
        };
        s.insert_agent_run(&run).await.expect("insert");
        assert!(s.agent_run("o2", "run-1").await.expect("get").is_none());
        let ev = |seq: u64, data: &str| agents::AgentEventRow {
            seq,
            time_ms: seq,
            kind: "message".into(),
            data: data.into(),
        };
        s.append_agent_event("run-1", &ev(1, "a")).await.expect("1");
        s.append_agent_event("run-1", &ev(2, "b")).await.expect("2");
        // A second writer of the same sequence number fails; the first event stays.
        assert!(matches!(
            s.append_agent_event("run-1", &ev(2, "x")).await,
            Err(StoreError::Conflict(_))
        ));
        let got: Vec<String> = s
            .agent_events("run-1", 0, 10)
            .await
            .expect("events")
            .into_iter()
            .map(|e| e.data)
            .collect();
        assert_eq!(got, ["a", "b"]);
        assert_eq!(
            s.agent_events("run-1", 1, 10).await.expect("after").len(),
            1
        );
        assert_eq!(s.active_agent_runs("o1").await.expect("active"), 1);
        s.request_approval("run-1", "c1", "exec", "{}", 5)
            .await
            .expect("ask");
        s.request_approval("run-1", "c1", "exec", "{}", 6)
            .await
            .expect("ask again is a no-op");
        assert!(s
            .answer_approval("run-1", "c1", false, "kiln_ab", 7)
            .await
            .expect("answer"));
        assert!(!s
            .answer_approval("run-1", "c1", true, "kiln_cd", 8)
            .await
            .expect("again"));
        assert_eq!(
            s.approval_state("run-1", "c1").await.expect("state"),
            Some(("denied".to_string(), Some("kiln_ab".to_string())))
        );
        s.update_agent_run("run-1", "finished", Some("done"), "{\"steps\":1}", 9)
            .await
            .expect("update");
        assert!(s
            .agent_runs_in_state(&["running"])
            .await
            .expect("list")
            .is_empty());
        assert_eq!(
            s.list_agent_runs("o1", 10).await.expect("list")[0]
                .reason
                .as_deref(),
            Some("done")
        );
    })
    .await;
}

#[tokio::test]
async fn ssh_keys_are_per_org() {
    on_both(|s| async move {
        s.create_org(&org("o1")).await.expect("org");
        s.create_org(&org("o2")).await.expect("org");
        let k = |id: &str, org_id: &str| SshKeyRow {
            id: id.into(),
            org_id: org_id.into(),
            name: "laptop".into(),
            algorithm: "ssh-ed25519".into(),
            fingerprint: "SHA256:abc".into(),
            public_key: "ssh-ed25519 AAAA laptop".into(),
            created_at_ms: 3,
            created_by: Some("key_a".into()),
        };
        s.insert_ssh_key(&k("sk_1", "o1")).await.expect("add");
        assert!(matches!(
            s.insert_ssh_key(&k("sk_2", "o1")).await,
            Err(StoreError::Conflict(_))
        ));
        // The same public key may be registered by another org too.
        s.insert_ssh_key(&k("sk_3", "o2")).await.expect("add o2");
        let mut orgs: Vec<String> = s
            .ssh_keys_by_fingerprint("SHA256:abc")
            .await
            .expect("by fp")
            .into_iter()
            .map(|r| r.org_id)
            .collect();
        orgs.sort();
        assert_eq!(orgs, ["o1", "o2"]);
        assert_eq!(
            s.list_ssh_keys("o1").await.expect("ls"),
            vec![k("sk_1", "o1")]
        );
        assert_eq!(s.remove_ssh_key("o1", "sk_3").await.expect("rm"), None);
        assert_eq!(
            s.remove_ssh_key("o1", "SHA256:abc").await.expect("rm"),
            Some(k("sk_1", "o1"))
        );
        assert!(s.list_ssh_keys("o1").await.expect("ls").is_empty());
        assert_eq!(s.list_ssh_keys("o2").await.expect("ls").len(), 1);
    })
    .await;
}

#[tokio::test]
async fn text_with_a_nul_character_is_refused_by_both_backends() {
    on_both(|s| async move {
        assert!(matches!(
            s.get_org("acme\0x").await,
            Err(StoreError::InvalidText)
        ));
        assert!(s.get_org("acme").await.expect("plain text").is_none());
    })
    .await;
}

#[tokio::test]
async fn git_credentials_and_authors_are_per_org() {
    on_both(|s| async move {
        s.create_org(&org("o1")).await.expect("org");
        s.create_org(&org("o2")).await.expect("org");
        let c = |id: &str, org_id: &str, host: &str| GitCredentialRow {
            id: id.into(),
            org_id: org_id.into(),
            host: host.into(),
            username: "bot".into(),
            secret: "sealed".into(),
            created_at_ms: 3,
            created_by: Some("key_a".into()),
            last_used_at_ms: None,
        };
        s.insert_git_credential(&c("gc_1", "o1", "git.example.com"))
            .await
            .expect("add");
        assert!(matches!(
            s.insert_git_credential(&c("gc_2", "o1", "git.example.com"))
                .await,
            Err(StoreError::Conflict(_))
        ));
        // Another org may store a credential for the same host.
        s.insert_git_credential(&c("gc_3", "o2", "git.example.com"))
            .await
            .expect("add o2");
        s.touch_git_credential("gc_1", 9).await.expect("touch");
        let mut used = c("gc_1", "o1", "git.example.com");
        used.last_used_at_ms = Some(9);
        assert_eq!(
            s.list_git_credentials("o1").await.expect("ls"),
            vec![used.clone()]
        );
        // Not by another org's id; by host (any case) for the owner.
        assert_eq!(
            s.remove_git_credential("o1", "gc_3").await.expect("rm"),
            None
        );
        assert_eq!(
            s.remove_git_credential("o1", "Git.Example.com")
                .await
                .expect("rm"),
            Some(used)
        );
        assert!(s.list_git_credentials("o1").await.expect("ls").is_empty());
        assert_eq!(s.list_git_credentials("o2").await.expect("ls").len(), 1);

        assert_eq!(s.git_author("o1").await.expect("author"), None);
        s.set_git_author("o1", Some(("Ada", "ada@example.com")), 5)
            .await
            .expect("set");
        s.set_git_author("o1", Some(("Ada L", "ada@example.com")), 6)
            .await
            .expect("replace");
        assert_eq!(
            s.git_author("o1").await.expect("author"),
            Some(("Ada L".into(), "ada@example.com".into()))
        );
        assert_eq!(s.git_author("o2").await.expect("author"), None);
        s.set_git_author("o1", None, 7).await.expect("clear");
        assert_eq!(s.git_author("o1").await.expect("author"), None);
    })
    .await;
}
