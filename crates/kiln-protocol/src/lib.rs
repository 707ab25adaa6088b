//! Kiln wire types: what crosses a process boundary, and nothing else.
//!
//! * [`api`] — JSON bodies of the HTTP API under `/v1` (server <-> CLI/SDKs).
//! * [`kilnd`] — messages between the host and the in-sandbox daemon `kilnd`.
//!
//! This crate holds types only: no I/O, no validation logic beyond serde, so that
//! every side (server, CLI, daemon, future SDK generators) can depend on it cheaply.

pub mod api;
pub mod b64;
pub mod kilnd;
