//! Agent runs, their append-only event log and their approvals. The event log is the source
//! of truth of a run: `(run_id, seq)` is the primary key, so an event is written once and a
//! second writer of the same sequence number fails instead of overwriting; nothing here
//! updates or deletes an event. The run row is a summary (state, reason, totals) kept for
//! listings.

use crate::db::Row;
use crate::{vals, Store, StoreError};

/// A run's summary row.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentRunRow {
    pub id: String,
    pub org_id: String,
    pub parent_id: Option<String>,
    pub profile: String,
    pub model: String,
    pub task: String,
    /// `running`, `waiting_approval`, `finished`, `failed`, `stopped`.
    pub state: String,
    /// Why it finished (`done`, `stuck`, `budget_steps`, ...).
    pub reason: Option<String>,
    pub sandbox_id: Option<String>,
    /// The run's full specification as JSON (budget, policy, tools, ...).
    pub spec: String,
    /// Totals as JSON (steps, tokens, cost, ...).
    pub stats: String,
    /// The server that runs it.
    pub host: String,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
}

/// One stored event.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentEventRow {
    pub seq: u64,
    pub time_ms: u64,
    pub kind: String,
    /// The whole event as JSON.
    pub data: String,
}

const RUN_COLS: &str = "id, org_id, parent_id, profile, model, task, state, reason, sandbox_id, spec, stats, host, created_at_ms, updated_at_ms";

fn run_row(r: &Row) -> Result<AgentRunRow, StoreError> {
    Ok(AgentRunRow {
        id: r.text(0)?,
        org_id: r.text(1)?,
        parent_id: r.opt_text(2)?,
        profile: r.text(3)?,
        model: r.text(4)?,
        task: r.text(5)?,
        state: r.text(6)?,
        reason: r.opt_text(7)?,
        sandbox_id: r.opt_text(8)?,
        spec: r.text(9)?,
        stats: r.text(10)?,
        host: r.text(11)?,
        created_at_ms: r.u64(12)?,
        updated_at_ms: r.u64(13)?,
    })
}

fn is_duplicate(e: &StoreError) -> bool {
    let m = e.to_string();
    m.contains("UNIQUE constraint") || m.contains("duplicate key") || m.contains("23505")
}

impl Store {
    pub async fn insert_agent_run(&self, r: &AgentRunRow) -> Result<(), StoreError> {
        self.exec(
            &format!("INSERT INTO agent_runs ({RUN_COLS}) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14)"),
            &vals![
                &r.id,
                &r.org_id,
                r.parent_id.clone(),
                &r.profile,
                &r.model,
                &r.task,
                &r.state,
                r.reason.clone(),
                r.sandbox_id.clone(),
                &r.spec,
                &r.stats,
                self.host(),
                r.created_at_ms,
                r.updated_at_ms,
            ],
        )
        .await?;
        Ok(())
    }

    /// A run of `org_id` (`None` for another org's or a missing run).
    pub async fn agent_run(
        &self,
        org_id: &str,
        id: &str,
    ) -> Result<Option<AgentRunRow>, StoreError> {
        self.query(
            &format!("SELECT {RUN_COLS} FROM agent_runs WHERE id = $1 AND org_id = $2"),
            &vals![id, org_id],
        )
        .await?
        .first()
        .map(run_row)
        .transpose()
    }

    /// An org's runs, newest first.
    pub async fn list_agent_runs(
        &self,
        org_id: &str,
        limit: u64,
    ) -> Result<Vec<AgentRunRow>, StoreError> {
        self.query(
            &format!("SELECT {RUN_COLS} FROM agent_runs WHERE org_id = $1 ORDER BY created_at_ms DESC, id LIMIT $2"),
            &vals![org_id, limit],
        )
        .await?
        .iter()
        .map(run_row)
        .collect()
    }

    /// Runs of this server in one of `states` (to resume them after a restart).
    pub async fn agent_runs_in_state(
        &self,
        states: &[&str],
    ) -> Result<Vec<AgentRunRow>, StoreError> {
        let mut out = Vec::new();
        for s in states {
            let rows = self
                .query(
                    &format!("SELECT {RUN_COLS} FROM agent_runs WHERE host = $1 AND state = $2 ORDER BY created_at_ms"),
                    &vals![self.host(), *s],
                )
                .await?;
            for r in &rows {
                out.push(run_row(r)?);
            }
        }
        Ok(out)
    }

    /// Counts an org's runs in `running` or `waiting_approval` (top-level only).
    pub async fn active_agent_runs(&self, org_id: &str) -> Result<u64, StoreError> {
        let r = self
            .query(
                "SELECT COUNT(*) FROM agent_runs WHERE org_id = $1 AND parent_id IS NULL AND state IN ('running', 'waiting_approval')",
                &vals![org_id],
            )
            .await?;
        r.first().map_or(Ok(0), |r| r.u64(0))
    }

    pub async fn update_agent_run(
        &self,
        id: &str,
        state: &str,
        reason: Option<&str>,
        stats: &str,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        self.exec(
            "UPDATE agent_runs SET state = $2, reason = $3, stats = $4, updated_at_ms = $5 WHERE id = $1",
            &vals![id, state, reason, stats, now_ms],
        )
        .await?;
        Ok(())
    }

    pub async fn set_agent_run_sandbox(
        &self,
        id: &str,
        sandbox_id: &str,
    ) -> Result<(), StoreError> {
        self.exec(
            "UPDATE agent_runs SET sandbox_id = $2 WHERE id = $1",
            &vals![id, sandbox_id],
        )
        .await?;
        Ok(())
    }

    /// Appends one event; `Conflict` if `seq` is already taken (events are never replaced).
    pub async fn append_agent_event(
        &self,
        run_id: &str,
        e: &AgentEventRow,
    ) -> Result<(), StoreError> {
        match self
            .exec(
                "INSERT INTO agent_events (run_id, seq, time_ms, kind, data) VALUES ($1,$2,$3,$4,$5)",
                &vals![run_id, e.seq, e.time_ms, &e.kind, &e.data],
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(err) if is_duplicate(&err) => Err(StoreError::Conflict(format!(
                "event {} of run {run_id}",
                e.seq
            ))),
            Err(err) => Err(err),
        }
    }

    /// Events of a run with `seq > after`, in order, at most `limit`.
    pub async fn agent_events(
        &self,
        run_id: &str,
        after: u64,
        limit: u64,
    ) -> Result<Vec<AgentEventRow>, StoreError> {
        self.query(
            "SELECT seq, time_ms, kind, data FROM agent_events WHERE run_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
            &vals![run_id, after, limit],
        )
        .await?
        .iter()
        .map(|r| {
            Ok(AgentEventRow {
                seq: r.u64(0)?,
                time_ms: r.u64(1)?,
                kind: r.text(2)?,
                data: r.text(3)?,
            })
        })
        .collect()
    }

    /// Records a pending approval (idempotent: a resumed run asks again for the same call).
    pub async fn request_approval(
        &self,
        run_id: &str,
        call_id: &str,
        tool: &str,
        args: &str,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        match self
            .exec(
                "INSERT INTO agent_approvals (run_id, call_id, tool, args, state, requested_at_ms) VALUES ($1,$2,$3,$4,'pending',$5)",
                &vals![run_id, call_id, tool, args, now_ms],
            )
            .await
        {
            Err(e) if !is_duplicate(&e) => Err(e),
            _ => Ok(()),
        }
    }

    /// Answers a pending approval; false if there is none (unknown or already answered).
    pub async fn answer_approval(
        &self,
        run_id: &str,
        call_id: &str,
        approved: bool,
        by: &str,
        now_ms: u64,
    ) -> Result<bool, StoreError> {
        Ok(self
            .exec(
                "UPDATE agent_approvals SET state = $3, answered_at_ms = $4, answered_by = $5 WHERE run_id = $1 AND call_id = $2 AND state = 'pending'",
                &vals![run_id, call_id, if approved { "approved" } else { "denied" }, now_ms, by],
            )
            .await?
            > 0)
    }

    /// The state of an approval: `pending`, `approved`, `denied`, or `None`.
    pub async fn approval_state(
        &self,
        run_id: &str,
        call_id: &str,
    ) -> Result<Option<(String, Option<String>)>, StoreError> {
        let r = self
            .query(
                "SELECT state, answered_by FROM agent_approvals WHERE run_id = $1 AND call_id = $2",
                &vals![run_id, call_id],
            )
            .await?;
        r.first()
            .map(|r| Ok((r.text(0)?, r.opt_text(1)?)))
            .transpose()
    }
}
