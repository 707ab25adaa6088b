//! Kiln's agent runtime: providers for OpenAI-compatible servers, Ollama and Anthropic
//! ([`provider`]), a text tool-call format for models without native tools ([`textcall`]),
//! typed tools over a sandbox ([`tools`]), the agent loop with its append-only event log,
//! budgets, approvals, stuck detection, condensation and sub-agents ([`runner`]), and the
//! scripted model server used by tests and benchmarks ([`scripted`]), the message bus
//! between agents, in-process or over NATS ([`bus`]), the MCP client that offers the tools
//! of configured MCP servers ([`mcp`]), and the evaluation suites ([`eval`]).
//!
//! What it does not do: HTTP routing, tenancy or sandbox lifecycle. The server implements
//! [`tools::Sandbox`] and [`tools::Sandboxes`] over its sandbox service and hands them in.

pub mod bus;
pub mod config;
pub mod eval;
pub mod events;
pub mod knowledge;
pub mod mcp;
pub mod mcp_testserver;
pub mod model;
pub mod provider;
pub mod runner;
pub mod scripted;
pub mod textcall;
pub mod tools;
