//! Metering: the append-only usage event log and its aggregation by hour or day.
//!
//! An event's id is chosen by its producer so that a replay is a no-op: the insert ignores
//! an id it has seen (`ON CONFLICT DO NOTHING`), and nothing ever updates or deletes a row.
//! Agent runs meter their model calls here too (`dev.kiln.agent.tokens`, one event per
//! model call, its id derived from the run and the call's event sequence number).
//! Aggregation happens at read time over the indexed log (by the bucket of each event's
//! window end), so no rollup can drift from the events it summarises.

use crate::{vals, Row, Store, StoreError};

/// One usage event as stored (the CloudEvents envelope is built from it at the API edge).
#[derive(Debug, Clone, PartialEq)]
pub struct UsageEventRow {
    /// Producer-chosen, deterministic: replaying an event inserts nothing.
    pub id: String,
    /// The producing server (CloudEvents `source`).
    pub source: String,
    /// CloudEvents `type`, e.g. `dev.kiln.sandbox.usage`.
    pub kind: String,
    pub time_ms: u64,
    pub org_id: String,
    pub key_id: String,
    pub sandbox_id: String,
    pub template: String,
    /// The window this event accounts for (equal for lifecycle events).
    pub start_ms: u64,
    pub end_ms: u64,
    pub sandbox_seconds: f64,
    pub cpu_seconds: f64,
    pub memory_gib_seconds: f64,
    pub disk_gib_seconds: f64,
    /// The sandbox's cumulative CPU time at `end_ms`, the baseline of its next window.
    pub cpu_total_ns: Option<u64>,
    /// Agent usage (`dev.kiln.agent.tokens`): the run, its model, the tokens of one model
    /// call and their cost; empty and zero for sandbox events.
    pub agent_run: String,
    pub model: String,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cost_usd: f64,
}

impl UsageEventRow {
    /// A zero-valued event (callers fill in what they count).
    pub fn new(id: String, source: String, kind: &str, org_id: &str, time_ms: u64) -> Self {
        UsageEventRow {
            id,
            source,
            kind: kind.into(),
            time_ms,
            org_id: org_id.into(),
            key_id: String::new(),
            sandbox_id: String::new(),
            template: String::new(),
            start_ms: time_ms,
            end_ms: time_ms,
            sandbox_seconds: 0.0,
            cpu_seconds: 0.0,
            memory_gib_seconds: 0.0,
            disk_gib_seconds: 0.0,
            cpu_total_ns: None,
            agent_run: String::new(),
            model: String::new(),
            input_tokens: 0,
            output_tokens: 0,
            cost_usd: 0.0,
        }
    }
}

/// What usage is grouped by besides the time bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageGroup {
    None,
    Key,
    Sandbox,
    Template,
    /// Agent runs (only agent token events).
    Agent,
    /// Models (only agent token events).
    Model,
}

impl UsageGroup {
    fn column(self) -> &'static str {
        match self {
            UsageGroup::None => "''",
            UsageGroup::Key => "key_id",
            UsageGroup::Sandbox => "sandbox_id",
            UsageGroup::Template => "template",
            UsageGroup::Agent => "agent_run",
            UsageGroup::Model => "model",
        }
    }
    fn filter(self) -> &'static str {
        match self {
            UsageGroup::Agent | UsageGroup::Model => " AND agent_run <> ''",
            _ => "",
        }
    }
}

/// One aggregated row: a time bucket (and group) with the summed quantities.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageAgg {
    pub bucket_start_ms: u64,
    pub group: String,
    pub sandbox_seconds: f64,
    pub cpu_seconds: f64,
    pub memory_gib_seconds: f64,
    pub disk_gib_seconds: f64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cost_usd: f64,
    pub events: u64,
}

const USAGE_COLS: &str = "id, source, kind, time_ms, org_id, key_id, sandbox_id, template, start_ms, end_ms, sandbox_seconds, cpu_seconds, memory_gib_seconds, disk_gib_seconds, cpu_total_ns, agent_run, model, input_tokens, output_tokens, cost_usd";

fn usage_row(r: &Row) -> Result<UsageEventRow, StoreError> {
    Ok(UsageEventRow {
        id: r.text(0)?,
        source: r.text(1)?,
        kind: r.text(2)?,
        time_ms: r.u64(3)?,
        org_id: r.text(4)?,
        key_id: r.text(5)?,
        sandbox_id: r.text(6)?,
        template: r.text(7)?,
        start_ms: r.u64(8)?,
        end_ms: r.u64(9)?,
        sandbox_seconds: r.f64(10)?,
        cpu_seconds: r.f64(11)?,
        memory_gib_seconds: r.f64(12)?,
        disk_gib_seconds: r.f64(13)?,
        cpu_total_ns: r.opt_u64(14)?,
        agent_run: r.text(15)?,
        model: r.text(16)?,
        input_tokens: r.u64(17)?,
        output_tokens: r.u64(18)?,
        cost_usd: r.f64(19)?,
    })
}

impl Store {
    /// Appends an event; `false` when its id was already recorded (a replay: nothing changes).
    pub async fn append_usage(&self, e: &UsageEventRow) -> Result<bool, StoreError> {
        let n = self
            .exec(
                &format!(
                    "INSERT INTO usage_events ({USAGE_COLS}) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17,$18,$19,$20) ON CONFLICT (id) DO NOTHING"
                ),
                &vals![
                    &e.id,
                    &e.source,
                    &e.kind,
                    e.time_ms,
                    &e.org_id,
                    &e.key_id,
                    &e.sandbox_id,
                    &e.template,
                    e.start_ms,
                    e.end_ms,
                    e.sandbox_seconds,
                    e.cpu_seconds,
                    e.memory_gib_seconds,
                    e.disk_gib_seconds,
                    e.cpu_total_ns,
                    &e.agent_run,
                    &e.model,
                    e.input_tokens,
                    e.output_tokens,
                    e.cost_usd
                ],
            )
            .await?;
        Ok(n > 0)
    }

    /// The newest sandbox event of a sandbox (by window end): where its next window starts.
    /// Agent token events attributed to the sandbox are not part of its chain.
    pub async fn last_usage(&self, sandbox_id: &str) -> Result<Option<UsageEventRow>, StoreError> {
        let rows = self
            .query(
                &format!("SELECT {USAGE_COLS} FROM usage_events WHERE sandbox_id = $1 AND agent_run = '' ORDER BY end_ms DESC, CASE WHEN kind = 'dev.kiln.sandbox.usage' THEN 0 ELSE 1 END DESC, time_ms DESC LIMIT 1"),
                &vals![sandbox_id],
            )
            .await?;
        rows.first().map(usage_row).transpose()
    }

    /// Events of an org whose window ends in `[from_ms, to_ms)`, in chain order (a usage
    /// window before the lifecycle step at its end), at most `limit`.
    pub async fn usage_events(
        &self,
        org_id: &str,
        from_ms: u64,
        to_ms: u64,
        limit: u64,
    ) -> Result<Vec<UsageEventRow>, StoreError> {
        self.query(
            &format!("SELECT {USAGE_COLS} FROM usage_events WHERE org_id = $1 AND end_ms >= $2 AND end_ms < $3 ORDER BY end_ms, CASE WHEN kind = 'dev.kiln.sandbox.usage' THEN 0 ELSE 1 END, time_ms, id LIMIT $4"),
            &vals![org_id, from_ms, to_ms, limit],
        )
        .await?
        .iter()
        .map(usage_row)
        .collect()
    }

    /// Sums an org's usage in `[from_ms, to_ms)` per bucket of `bucket_ms` (3,600,000 for
    /// hours, 86,400,000 for UTC days) and `group`, ordered by bucket then group.
    pub async fn usage_report(
        &self,
        org_id: &str,
        from_ms: u64,
        to_ms: u64,
        bucket_ms: u64,
        group: UsageGroup,
    ) -> Result<Vec<UsageAgg>, StoreError> {
        let bucket_ms = bucket_ms.max(1);
        let g = group.column();
        let f = group.filter();
        let sql = format!(
            "SELECT CAST((end_ms / {bucket_ms}) * {bucket_ms} AS BIGINT) AS b, {g} AS g,
                CAST(SUM(sandbox_seconds) AS DOUBLE PRECISION), CAST(SUM(cpu_seconds) AS DOUBLE PRECISION),
                CAST(SUM(memory_gib_seconds) AS DOUBLE PRECISION), CAST(SUM(disk_gib_seconds) AS DOUBLE PRECISION),
                CAST(COUNT(*) AS BIGINT), CAST(SUM(input_tokens) AS BIGINT), CAST(SUM(output_tokens) AS BIGINT),
                CAST(SUM(cost_usd) AS DOUBLE PRECISION)
             FROM usage_events WHERE org_id = $1 AND end_ms >= $2 AND end_ms < $3{f}
             GROUP BY b, g ORDER BY b, g"
        );
        self.query(&sql, &vals![org_id, from_ms, to_ms])
            .await?
            .iter()
            .map(|r| {
                Ok(UsageAgg {
                    bucket_start_ms: r.u64(0)?,
                    group: r.text(1)?,
                    sandbox_seconds: r.f64(2)?,
                    cpu_seconds: r.f64(3)?,
                    memory_gib_seconds: r.f64(4)?,
                    disk_gib_seconds: r.f64(5)?,
                    events: r.u64(6)?,
                    input_tokens: r.u64(7)?,
                    output_tokens: r.u64(8)?,
                    cost_usd: r.f64(9)?,
                })
            })
            .collect()
    }
}
