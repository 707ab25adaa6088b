//! Metering: a usage event for every sandbox lifecycle step, and sampled resource use
//! (sandbox-seconds, CPU-seconds, memory and disk GiB-seconds) read from the sandbox's
//! cgroups and its disk volume every `meter_interval`.
//!
//! Exactly-once accounting without coordination: each sandbox's usage is a chain of windows,
//! each starting where the previous event ended, and a window's event id is derived from
//! its start (`<sandbox>:usage:<start_ms>`). After a crash the chain resumes from the last
//! stored event, so a window is recomputed at most once and its replay is a no-op. CPU time
//! is the cgroup's cumulative counter, so the window after a crash still counts every
//! CPU-second; memory and disk are point samples times the window length.
//!
//! Agent runs meter their own model calls (`dev.kiln.agent.tokens`, see
//! `kiln_agent::runner`): one event per model call with the run's org and key, id
//! `<run>:tokens:<event seq>`, so a run resumed after a restart re-meters its log without
//! counting anything twice.
//!
//! What it does not do: price sandbox time, or meter warm-pool members (they belong to no org;
//! a claimed member is metered from its claim).

use std::collections::HashMap;

use kiln_protocol::api::SandboxState;
use kiln_store::{SandboxRow, UsageEventRow};

use crate::service::{now_ms, Kiln};

/// CloudEvents `type`s of usage events.
pub const STARTED: &str = "dev.kiln.sandbox.started";
pub const USAGE: &str = "dev.kiln.sandbox.usage";
pub const PAUSED: &str = "dev.kiln.sandbox.paused";
pub const RESUMED: &str = "dev.kiln.sandbox.resumed";
pub const STOPPED: &str = "dev.kiln.sandbox.stopped";

const GIB: f64 = (1u64 << 30) as f64;

/// Where a sandbox's next usage window starts.
#[derive(Debug, Clone, Copy)]
struct Mark {
    end_ms: u64,
    cpu_total_ns: Option<u64>,
}

/// The meter's memory: the open window of every sandbox it has seen. Losing it (a crash)
/// loses nothing: [`Kiln::meter_sample`] re-reads the window start from the store.
#[derive(Default)]
pub struct Meter {
    marks: tokio::sync::Mutex<HashMap<String, Mark>>,
}

impl Kiln {
    fn usage_event(&self, row: &SandboxRow, kind: &str, id: String, now: u64) -> UsageEventRow {
        UsageEventRow {
            key_id: row.key_id.clone().unwrap_or_default(),
            sandbox_id: row.sandbox.id.clone(),
            template: row.sandbox.template.clone(),
            ..UsageEventRow::new(
                id,
                format!("kiln://{}", self.store.host()),
                kind,
                &row.org_id,
                now,
            )
        }
    }

    async fn append(&self, e: &UsageEventRow) {
        match self.store.append_usage(e).await {
            Ok(true) => {
                metrics::counter!("kiln_usage_events_total", "type" => e.kind.clone()).increment(1)
            }
            Ok(false) => metrics::counter!("kiln_usage_replays_total").increment(1),
            Err(err) => {
                tracing::error!(id = %e.id, error = %err, "metering: cannot record a usage event")
            }
        }
    }

    /// Records that a user sandbox started (created cold or claimed from the pool): opens
    /// its first window, with the CPU time it already used (as an idle pool member) as the
    /// baseline.
    pub async fn meter_started(&self, row: &SandboxRow) {
        if row.pooled || row.org_id.is_empty() {
            return;
        }
        let now = now_ms();
        let cpu = self.runtime.cpu_usage(&row.sandbox.id).ok().flatten();
        let mut e = self.usage_event(row, STARTED, format!("{}:started", row.sandbox.id), now);
        e.cpu_total_ns = cpu;
        let mut marks = self.meter.marks.lock().await;
        self.append(&e).await;
        marks.insert(
            row.sandbox.id.clone(),
            Mark {
                end_ms: now,
                cpu_total_ns: cpu,
            },
        );
    }

    /// Closes a sandbox's open window at now: one `usage` event for the time since the last
    /// event. A running sandbox accrues sandbox-, CPU- and memory-seconds; a paused one only
    /// disk. Returns `false` when the sandbox cannot be read (gone).
    pub async fn meter_sample(&self, row: &SandboxRow) -> bool {
        if row.pooled || row.org_id.is_empty() {
            return true;
        }
        let id = &row.sandbox.id;
        let mut marks = self.meter.marks.lock().await;
        let mark = match marks.get(id) {
            Some(m) => *m,
            None => match self.store.last_usage(id).await {
                Ok(Some(e)) => Mark {
                    end_ms: e.end_ms,
                    cpu_total_ns: e.cpu_total_ns,
                },
                // Never metered (created before metering, or a crash before its start
                // event): it has been running since it was created.
                Ok(None) => Mark {
                    end_ms: row.sandbox.created_at_ms,
                    cpu_total_ns: Some(0),
                },
                Err(e) => {
                    tracing::error!(%id, error = %e, "metering: cannot read the last usage event");
                    return true;
                }
            },
        };
        let usage = match self.runtime.resource_usage(id).await {
            Ok(u) => u,
            Err(_) => return false,
        };
        let now = now_ms().max(mark.end_ms);
        let secs = (now - mark.end_ms) as f64 / 1000.0;
        if secs <= 0.0 {
            return true;
        }
        let running = row.sandbox.state == SandboxState::Running;
        let mut e = self.usage_event(row, USAGE, format!("{id}:usage:{}", mark.end_ms), now);
        e.start_ms = mark.end_ms;
        e.cpu_total_ns = usage.cpu_ns.or(mark.cpu_total_ns);
        e.cpu_seconds = match (usage.cpu_ns, mark.cpu_total_ns) {
            (Some(now_ns), Some(before)) => now_ns.saturating_sub(before) as f64 / 1e9,
            _ => 0.0,
        };
        if running {
            e.sandbox_seconds = secs;
            e.memory_gib_seconds = usage.memory_bytes as f64 / GIB * secs;
        }
        e.disk_gib_seconds = usage.disk_bytes.unwrap_or(0) as f64 / GIB * secs;
        self.append(&e).await;
        marks.insert(
            id.clone(),
            Mark {
                end_ms: now,
                cpu_total_ns: e.cpu_total_ns,
            },
        );
        true
    }

    /// Records a lifecycle step (`paused`, `resumed`, `stopped`) after closing the open
    /// window under the state the sandbox had until now.
    pub async fn meter_transition(&self, row: &SandboxRow, kind: &str) {
        if row.pooled || row.org_id.is_empty() {
            return;
        }
        self.meter_sample(row).await;
        let now = now_ms();
        let id = &row.sandbox.id;
        let suffix = kind.rsplit('.').next().unwrap_or(kind);
        let mut marks = self.meter.marks.lock().await;
        // The step happens where the window just closed: it carries that point and the CPU
        // counter there, so a chain resumed from it (after a crash) loses nothing.
        let mark = marks.get(id).copied();
        let mut e = self.usage_event(row, kind, format!("{id}:{suffix}:{now}"), now);
        if let Some(m) = mark {
            e.start_ms = m.end_ms;
            e.end_ms = m.end_ms;
            e.cpu_total_ns = m.cpu_total_ns;
        }
        self.append(&e).await;
        if kind == STOPPED {
            marks.remove(id);
        }
    }

    /// Drops the meter's memory of open windows, as a crash does; the next sample of each
    /// sandbox re-reads where its window starts from the store.
    pub async fn meter_forget(&self) {
        self.meter.marks.lock().await.clear();
    }

    /// Samples every user sandbox this server runs (the periodic tick, and a final one on
    /// shutdown).
    pub async fn meter_all(&self) {
        let rows = match self.store.list(false).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "metering: cannot list sandboxes");
                return;
            }
        };
        for row in rows.iter().filter(|r| {
            matches!(
                r.sandbox.state,
                SandboxState::Running | SandboxState::Paused
            )
        }) {
            self.meter_sample(row).await;
        }
    }
}

// ---- API ----

use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use kiln_protocol::api::{
    UsageBucket, UsageData, UsageEvent, UsageEventList, UsageReport, UsageTotals,
};
use kiln_store::UsageGroup;
use serde::Deserialize;

use crate::error::{ApiError, ApiQuery};
use crate::service::{AppState, Caller};

const HOUR_MS: u64 = 3_600_000;
const DAY_MS: u64 = 24 * HOUR_MS;

/// Query of `GET /v1/usage` and `GET /v1/usage/events`.
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UsageQuery {
    /// Another org (owner/admin of the system org only).
    #[serde(default)]
    org: Option<String>,
    /// Start (inclusive): unix ms, RFC 3339, `YYYY-MM-DD` (UTC) or a duration ago (`24h`).
    #[serde(default)]
    from: Option<String>,
    /// End (exclusive), same forms; default now.
    #[serde(default)]
    to: Option<String>,
    /// `hour` (default) or `day`.
    #[serde(default)]
    granularity: Option<String>,
    /// `key`, `sandbox`, `template`, `agent` (agent runs' tokens and cost) or `model`.
    #[serde(default)]
    by: Option<String>,
    /// Events only: at most this many (default 1000).
    #[serde(default)]
    limit: Option<u64>,
}

fn bad(field: &str, value: &str, hint: &str) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid_query",
        format!("{field}={value:?} is not understood"),
    )
    .hint(hint.to_string())
}

/// A point in time as the usage API accepts it.
pub fn parse_time(field: &str, v: &str, now: u64) -> Result<u64, ApiError> {
    const HINT: &str =
        "use unix milliseconds, RFC 3339 (2026-11-24T08:00:00Z), a UTC date (2026-11-24) or a duration ago (24h, 7d)";
    let v = v.trim();
    if let Ok(ms) = v.parse::<u64>() {
        return Ok(ms);
    }
    if let Ok(d) = crate::units::parse_duration(v) {
        return Ok(now.saturating_sub(d.as_millis() as u64));
    }
    let full = if v.len() == 10 {
        format!("{v}T00:00:00Z")
    } else {
        v.to_string()
    };
    let t = humantime::parse_rfc3339_weak(&full).map_err(|_| bad(field, v, HINT))?;
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .map_err(|_| bad(field, v, HINT))
}

fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
        .to_string()
}

struct Window {
    org: String,
    from: u64,
    to: u64,
}

async fn window(
    k: &Kiln,
    c: &Caller,
    q: &UsageQuery,
    default_span: u64,
) -> Result<Window, ApiError> {
    let org = match q.org.as_deref() {
        None => c.org_id.clone(),
        Some(o) => k.org(c, o).await?.id,
    };
    let now = now_ms();
    let to = match &q.to {
        Some(v) => parse_time("to", v, now)?,
        None => now + 1,
    };
    let from = match &q.from {
        Some(v) => parse_time("from", v, now)?,
        None => to.saturating_sub(default_span),
    };
    if from >= to {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            format!(
                "from ({}) is not before to ({})",
                rfc3339(from),
                rfc3339(to)
            ),
        )
        .hint("give a from earlier than to"));
    }
    Ok(Window { org, from, to })
}

/// `GET /v1/usage`: summed usage per hour or day, optionally by key, sandbox, template,
/// agent run or model.
pub async fn usage_report(
    State(k): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiQuery(q): ApiQuery<UsageQuery>,
) -> Result<Json<UsageReport>, ApiError> {
    let (granularity, bucket) = match q.granularity.as_deref().unwrap_or("hour") {
        "hour" => ("hour", HOUR_MS),
        "day" => ("day", DAY_MS),
        o => return Err(bad("granularity", o, "use hour or day")),
    };
    let group = match q.by.as_deref() {
        None => UsageGroup::None,
        Some("key") => UsageGroup::Key,
        Some("sandbox") => UsageGroup::Sandbox,
        Some("template") => UsageGroup::Template,
        Some("agent") => UsageGroup::Agent,
        Some("model") => UsageGroup::Model,
        Some(o) => return Err(bad("by", o, "use key, sandbox, template, agent or model")),
    };
    let w = window(
        &k,
        &c,
        &q,
        if bucket == DAY_MS {
            30 * DAY_MS
        } else {
            DAY_MS
        },
    )
    .await?;
    let rows = k
        .store
        .usage_report(&w.org, w.from, w.to, bucket, group)
        .await?;
    let mut total = UsageTotals::default();
    let buckets = rows
        .into_iter()
        .map(|r| {
            let u = UsageTotals {
                sandbox_seconds: r.sandbox_seconds,
                cpu_seconds: r.cpu_seconds,
                memory_gib_seconds: r.memory_gib_seconds,
                disk_gib_seconds: r.disk_gib_seconds,
                input_tokens: r.input_tokens,
                output_tokens: r.output_tokens,
                cost_usd: r.cost_usd,
                events: r.events,
            };
            total.input_tokens += u.input_tokens;
            total.output_tokens += u.output_tokens;
            total.cost_usd += u.cost_usd;
            total.sandbox_seconds += u.sandbox_seconds;
            total.cpu_seconds += u.cpu_seconds;
            total.memory_gib_seconds += u.memory_gib_seconds;
            total.disk_gib_seconds += u.disk_gib_seconds;
            total.events += u.events;
            UsageBucket {
                start: rfc3339(r.bucket_start_ms),
                start_ms: r.bucket_start_ms,
                group: (group != UsageGroup::None).then_some(r.group),
                usage: u,
            }
        })
        .collect();
    Ok(Json(UsageReport {
        org: w.org,
        from_ms: w.from,
        to_ms: w.to,
        granularity: granularity.into(),
        by: q.by.clone(),
        buckets,
        total,
    }))
}

/// `GET /v1/usage/events`: the raw CloudEvents, oldest first.
pub async fn usage_events(
    State(k): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiQuery(q): ApiQuery<UsageQuery>,
) -> Result<Json<UsageEventList>, ApiError> {
    if q.granularity.is_some() || q.by.is_some() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            "granularity and by apply to /v1/usage, not to its events",
        )
        .hint("drop them, or ask GET /v1/usage for sums"));
    }
    let w = window(&k, &c, &q, DAY_MS).await?;
    let limit = q.limit.unwrap_or(1000).clamp(1, 100_000);
    let events = k
        .store
        .usage_events(&w.org, w.from, w.to, limit)
        .await?
        .into_iter()
        .map(|e| UsageEvent {
            specversion: "1.0".into(),
            subject: if e.agent_run.is_empty() {
                format!("org/{}/key/{}/sandbox/{}", e.org_id, e.key_id, e.sandbox_id)
            } else {
                format!("org/{}/key/{}/agent/{}", e.org_id, e.key_id, e.agent_run)
            },
            time: rfc3339(e.time_ms),
            datacontenttype: "application/json".into(),
            data: UsageData {
                org: e.org_id,
                key: e.key_id,
                sandbox: e.sandbox_id,
                template: e.template,
                start_ms: e.start_ms,
                end_ms: e.end_ms,
                sandbox_seconds: e.sandbox_seconds,
                cpu_seconds: e.cpu_seconds,
                memory_gib_seconds: e.memory_gib_seconds,
                disk_gib_seconds: e.disk_gib_seconds,
                agent_run: (!e.agent_run.is_empty()).then_some(e.agent_run),
                model: (!e.model.is_empty()).then_some(e.model),
                input_tokens: e.input_tokens,
                output_tokens: e.output_tokens,
                cost_usd: e.cost_usd,
            },
            id: e.id,
            source: e.source,
            kind: e.kind,
        })
        .collect();
    Ok(Json(UsageEventList { events }))
}
