//! Developer tools that run inside a sandbox through its kilnd: git (typed status, diff, log,
//! branches, commit, and clone/push/pull with credentials that stay on the host) and language
//! servers (sessions over kilnd's `Pipe`); plus `gitserver`, a real git smart-HTTP server
//! for tests.
//!
//! What it does not do: talk HTTP or know about organisations; the server maps callers to
//! sandboxes and credentials and calls into here.

pub mod git;
pub mod gitserver;
pub mod lsp;

pub use git::{Git, GitError};
