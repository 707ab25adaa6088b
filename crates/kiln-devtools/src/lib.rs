//! Developer tools that run inside a sandbox through its kilnd: today git (typed status,
//! diff, log, branches, commit, and clone/push/pull with credentials that stay on the host).
//!
//! What it does not do: talk HTTP or know about organisations; the server maps callers to
//! sandboxes and credentials and calls into here.

pub mod git;
pub mod lsp;

pub use git::{Git, GitError};
