//! The daemon side of the `kilnd` binary: the protocol server and what it manages, plus the
//! host reaper's server loop.

pub mod creds;
pub mod files;
pub mod host_reaper;
pub mod log;
pub mod ports;
pub mod procs;
pub mod pty;
pub mod ring;
pub mod serve;
pub mod server;
pub mod users;
pub mod watch;
