//! The events of a run. Every step of the loop is one immutable event appended to the run's
//! log; the loop's state (conversation, pending calls, usage, stuck detection) is derived from
//! the events alone by [`RunState::apply`], both live and when a run resumes after a restart,
//! so the log is the single source of truth.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::model::{Message, Role, ToolCall};

/// One event as stored and streamed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub run_id: String,
    pub seq: u64,
    pub time_ms: u64,
    #[serde(flatten)]
    pub kind: EventKind,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    TaskStarted {
        task: String,
        profile: String,
        model: String,
        system_prompt: String,
        /// The model gets tools through the text format (no native tool calling).
        text_tools: bool,
        tools: Vec<String>,
        #[serde(default)]
        parent_id: Option<String>,
    },
    ModelRequest {
        step: u64,
        messages: usize,
        estimated_tokens: u64,
    },
    ModelResponse {
        step: u64,
        text: String,
        tool_calls: Vec<ToolCall>,
        input_tokens: u64,
        output_tokens: u64,
        cost_usd: f64,
        latency_ms: u64,
        /// The same in microseconds (benchmarks subtract model time from step time).
        #[serde(default)]
        latency_us: u64,
        /// Text mode: the reply looked like a tool call but could not be read.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        malformed: Option<String>,
    },
    ToolCallBegin {
        call_id: String,
        tool: String,
        args: Value,
    },
    ToolCallOutput {
        call_id: String,
        output: String,
    },
    ToolCallEnd {
        call_id: String,
        tool: String,
        ok: bool,
        /// `ok`, `error`, `malformed`, `denied`, `interrupted`.
        status: String,
        duration_ms: u64,
    },
    ApprovalRequested {
        call_id: String,
        tool: String,
        args: Value,
    },
    ApprovalAnswered {
        call_id: String,
        approved: bool,
        by: String,
    },
    /// A message between agents, or from Kiln to the agent (nudges, repair requests).
    Message {
        from: String,
        to: String,
        text: String,
    },
    SubAgentSpawned {
        agent: String,
        profile: String,
        task: String,
        sandbox: String,
    },
    SubAgentFinished {
        agent: String,
        reason: String,
        summary: String,
        input_tokens: u64,
        output_tokens: u64,
        cost_usd: f64,
    },
    BudgetWarning {
        budget: String,
        used: f64,
        limit: f64,
    },
    /// `search_tools` found these deferred tools; they are offered from the next step on.
    ToolsLoaded {
        tools: Vec<String>,
    },
    Condensation {
        summary: String,
        /// Messages kept verbatim after the summary.
        kept: usize,
        dropped: usize,
        input_tokens: u64,
        output_tokens: u64,
        cost_usd: f64,
    },
    Finished {
        /// `done`, `stuck`, `stopped`, `error`, `malformed_tool_calls`, `budget_steps`,
        /// `budget_input_tokens`, `budget_output_tokens`, `budget_cost`, `budget_time`.
        reason: String,
        success: bool,
        summary: String,
    },
}

impl EventKind {
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::TaskStarted { .. } => "task_started",
            EventKind::ModelRequest { .. } => "model_request",
            EventKind::ModelResponse { .. } => "model_response",
            EventKind::ToolCallBegin { .. } => "tool_call_begin",
            EventKind::ToolCallOutput { .. } => "tool_call_output",
            EventKind::ToolCallEnd { .. } => "tool_call_end",
            EventKind::ApprovalRequested { .. } => "approval_requested",
            EventKind::ApprovalAnswered { .. } => "approval_answered",
            EventKind::Message { .. } => "message",
            EventKind::SubAgentSpawned { .. } => "sub_agent_spawned",
            EventKind::SubAgentFinished { .. } => "sub_agent_finished",
            EventKind::BudgetWarning { .. } => "budget_warning",
            EventKind::ToolsLoaded { .. } => "tools_loaded",
            EventKind::Condensation { .. } => "condensation",
            EventKind::Finished { .. } => "finished",
        }
    }
}

/// Wraps tool output as untrusted data for the prompt.
pub fn wrap_untrusted(call_id: &str, tool: &str, output: &str) -> String {
    let safe = output.replace("</tool_output", "<\\/tool_output");
    format!("<tool_output call_id=\"{call_id}\" tool=\"{tool}\" trust=\"untrusted\">\n{safe}\n</tool_output>")
}

/// Totals of a run (its own steps; children's usage is added when they finish).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub steps: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cost_usd: f64,
    pub tool_calls: u64,
    pub tool_errors: u64,
    pub model_ms: u64,
    pub sub_agents: u64,
}

/// The loop's state, derived from events.
#[derive(Debug, Clone, Default)]
pub struct RunState {
    pub run_id: String,
    pub task: String,
    pub profile: String,
    pub model: String,
    pub text_tools: bool,
    pub tools: Vec<String>,
    /// Deferred tools found by `search_tools` (offered from then on).
    pub loaded_tools: Vec<String>,
    pub parent_id: Option<String>,
    pub messages: Vec<Message>,
    /// Calls of the last response without an end yet.
    pub pending: Vec<ToolCall>,
    pub begun: Vec<String>,
    outputs: BTreeMap<String, String>,
    pub approvals: BTreeMap<String, bool>,
    pub asked: Vec<String>,
    pub stats: Stats,
    /// Children's usage (counted against this run's budget).
    pub child_input_tokens: u64,
    pub child_output_tokens: u64,
    pub child_cost_usd: f64,
    step_prints: Vec<String>,
    pub last_fingerprint: Option<String>,
    /// How many consecutive steps repeated the previous one exactly.
    pub repeats: u32,
    pub nudged: bool,
    /// Consecutive malformed answers (one repair round is allowed).
    pub malformed_streak: u32,
    step_malformed: bool,
    pub warned: Vec<String>,
    pub children: Vec<String>,
    pub finished_children: Vec<String>,
    pub started_ms: u64,
    pub last_seq: u64,
    pub finished: Option<(String, bool, String)>,
}

impl RunState {
    pub fn total_input(&self) -> u64 {
        self.stats.input_tokens + self.child_input_tokens
    }
    pub fn total_output(&self) -> u64 {
        self.stats.output_tokens + self.child_output_tokens
    }
    pub fn total_cost(&self) -> f64 {
        self.stats.cost_usd + self.child_cost_usd
    }

    /// Folds one event into the state.
    pub fn apply(&mut self, e: &Event) {
        self.last_seq = e.seq;
        match &e.kind {
            EventKind::TaskStarted {
                task,
                profile,
                model,
                system_prompt,
                text_tools,
                tools,
                parent_id,
            } => {
                self.run_id = e.run_id.clone();
                self.task = task.clone();
                self.profile = profile.clone();
                self.model = model.clone();
                self.text_tools = *text_tools;
                self.tools = tools.clone();
                self.parent_id = parent_id.clone();
                self.started_ms = e.time_ms;
                self.messages = vec![
                    Message::system(system_prompt.clone()),
                    Message::user(task.clone()),
                ];
            }
            EventKind::ModelRequest { .. } => {}
            EventKind::ModelResponse {
                text,
                tool_calls,
                input_tokens,
                output_tokens,
                cost_usd,
                latency_ms,
                malformed,
                ..
            } => {
                self.stats.steps += 1;
                self.stats.input_tokens += input_tokens;
                self.stats.output_tokens += output_tokens;
                self.stats.cost_usd += cost_usd;
                self.stats.model_ms += latency_ms;
                self.messages
                    .push(Message::assistant(text.clone(), tool_calls.clone()));
                self.pending = tool_calls.clone();
                self.begun.clear();
                self.outputs.clear();
                self.step_prints.clear();
                // A text reply that could not be read counts now; calls count when the step
                // completes (any malformed call makes the step malformed).
                if malformed.is_some() {
                    self.malformed_streak += 1;
                }
                self.step_malformed = false;
            }
            EventKind::ToolCallBegin { call_id, .. } => {
                self.begun.push(call_id.clone());
                self.stats.tool_calls += 1;
            }
            EventKind::ToolCallOutput { call_id, output } => {
                self.outputs.insert(call_id.clone(), output.clone());
            }
            EventKind::ToolCallEnd {
                call_id,
                tool,
                ok,
                status,
                ..
            } => {
                let output = self.outputs.remove(call_id).unwrap_or_default();
                if !ok {
                    self.stats.tool_errors += 1;
                }
                if status == "malformed" {
                    self.step_malformed = true;
                }
                if let Some(pos) = self.pending.iter().position(|c| &c.id == call_id) {
                    let call = self.pending.remove(pos);
                    self.step_prints.push(format!(
                        "{}|{}|{}|{}",
                        call.name, call.arguments, status, output
                    ));
                    let mut m = Message::tool(&call, wrap_untrusted(call_id, tool, &output));
                    if self.text_tools {
                        m.role = Role::User;
                    }
                    self.messages.push(m);
                    if self.pending.is_empty() {
                        if self.step_malformed {
                            self.malformed_streak += 1;
                        } else {
                            self.malformed_streak = 0;
                        }
                        let fp = self.step_prints.join("\n");
                        if self.last_fingerprint.as_deref() == Some(fp.as_str()) {
                            self.repeats += 1;
                        } else {
                            self.repeats = 0;
                        }
                        self.last_fingerprint = Some(fp);
                    }
                }
            }
            EventKind::ApprovalRequested { call_id, .. } => self.asked.push(call_id.clone()),
            EventKind::ApprovalAnswered {
                call_id, approved, ..
            } => {
                self.approvals.insert(call_id.clone(), *approved);
            }
            EventKind::Message { from, to, text } => {
                if *to == self.run_id {
                    let body = if from.starts_with("kiln") {
                        text.clone()
                    } else {
                        format!("[message from agent {from}]\n{text}")
                    };
                    self.messages.push(Message::user(body));
                    if from == "kiln/nudge" {
                        self.nudged = true;
                    }
                }
            }
            EventKind::SubAgentSpawned { agent, .. } => {
                self.children.push(agent.clone());
                self.stats.sub_agents += 1;
            }
            EventKind::SubAgentFinished {
                agent,
                input_tokens,
                output_tokens,
                cost_usd,
                ..
            } => {
                if !self.finished_children.contains(agent) {
                    self.finished_children.push(agent.clone());
                    self.child_input_tokens += input_tokens;
                    self.child_output_tokens += output_tokens;
                    self.child_cost_usd += cost_usd;
                }
            }
            EventKind::BudgetWarning { budget, .. } => self.warned.push(budget.clone()),
            EventKind::ToolsLoaded { tools } => {
                for t in tools {
                    if !self.loaded_tools.contains(t) {
                        self.loaded_tools.push(t.clone());
                    }
                }
            }
            EventKind::Condensation {
                summary,
                kept,
                input_tokens,
                output_tokens,
                cost_usd,
                ..
            } => {
                self.stats.input_tokens += input_tokens;
                self.stats.output_tokens += output_tokens;
                self.stats.cost_usd += cost_usd;
                let n = self.messages.len();
                let tail: Vec<Message> = self.messages[n.saturating_sub(*kept).max(2)..].to_vec();
                self.messages.truncate(2);
                self.messages.push(Message::user(format!(
                    "[Earlier steps were condensed to stay within the context window. Summary:]\n{summary}"
                )));
                self.messages.extend(tail);
            }
            EventKind::Finished {
                reason,
                success,
                summary,
            } => self.finished = Some((reason.clone(), *success, summary.clone())),
        }
    }
}
