//! Integration tests of the Kiln server against the real runtime (runc, overlayfs, kilnd), as
//! root: the API through `tower::ServiceExt::oneshot` and over a real socket.

mod harness;
mod knowledge;

mod agents;
mod devtools;
mod errors;
mod exec;
mod files;
mod gitcreds;
mod lifecycle;
mod openapi;
mod pty;
mod restart;
mod ssh;
mod templates;
mod tenancy;
mod usage;
