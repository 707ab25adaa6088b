//! Kiln's Linux sandbox runtime: turns a [`SandboxSpec`] into a running, isolated container
//! whose PID 1 is kilnd, and cleans up after it.
//!
//! * [`Runtime`] — create / pause / resume / remove / status / reconcile / memory usage.
//! * [`spec`] — the generated OCI `config.json` (namespaces, capabilities, cgroups, mounts),
//!   with the security decisions documented there; [`seccomp`] — the syscall filter.
//! * [`host`] — the [`Host`] and [`Engine`] traits every machine interaction goes through,
//!   implemented for real by [`linux::RealHost`] (mounts, btrfs volumes with quota groups,
//!   cgroups, netns/veth over rtnetlink, bridge + nftables NAT) and [`engine::RealEngine`]
//!   (runc through kilnd's host reaper, kilnd pings).

pub mod config;
pub mod egress;
pub mod engine;
pub mod error;
pub mod host;
pub mod linux;
mod netlink;
pub mod runtime;
pub mod seccomp;
pub mod spec;
pub mod userns;

pub use config::{
    validate_id, Created, IdMap, OciRuntimeKind, ReconcileReport, RuntimeConfig, RuntimeStatus,
    SandboxSpec,
};
pub use error::SandboxError;
pub use host::{Engine, Host};
pub use kiln_protocol::api::NetworkMode;
pub use runtime::{ResourceUsage, Runtime};
