//! Integration tests of kilnd: the real `kilnd` binary serving a socket in a tempdir, driven
//! through the library's `Client` (and the host reaper through `ReaperClient`).

mod creds;
mod exec;
mod files;
mod harness;
mod ports;
mod pty;
mod reaper;
mod watch;
