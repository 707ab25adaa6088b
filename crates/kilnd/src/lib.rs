//! kilnd: the daemon that runs as PID 1 inside every Kiln sandbox, plus what the host needs to
//! talk to it.
//!
//! * [`frame`] — the frame codec of the host<->kilnd protocol ([`kiln_protocol::kilnd`]).
//! * [`client`] — the host-side client of a sandbox's kilnd.
//! * [`reaper`] — the host-side subreaper service (`kilnd host-reaper`): its client and wire types.
//! * [`child`] — the child-process core (spawn + reap without stealing exit statuses), shared by
//!   the daemon and the host reaper.
//!
//! The daemon itself lives in the `kilnd` binary.

pub mod child;
pub mod client;
pub mod frame;
pub mod reaper;

pub use client::{Client, ClientError};
pub use reaper::{ReaperClient, ReaperError};

/// Version of this crate, reported by the daemon's `Ping`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
