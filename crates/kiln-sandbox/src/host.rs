//! The seams between Kiln's sandbox logic and the machine: [`Host`] (privileged kernel
//! operations: mounts, volumes with quotas, cgroups, network namespaces and links) and
//! [`Engine`] (the OCI runtime and kilnd). [`crate::Runtime`] only talks to the machine
//! through these two traits (plus plain file I/O under its own directories), so its
//! plan — what is created in which order and how it is undone — is unit-testable without root
//! using recording fakes; the real implementations live in [`crate::linux`] and
//! [`crate::engine`].

use std::future::Future;
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use crate::error::Result;

/// A boxed, sendable future (the traits are object-safe).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One line of `/proc/self/mountinfo`, reduced to what Kiln needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_point: PathBuf,
    pub fs_type: String,
    pub source: String,
    pub super_options: String,
}

/// A mounted cgroup hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupRoot {
    pub mount_point: PathBuf,
    /// `true` for cgroup2 (the unified hierarchy).
    pub unified: bool,
    /// v1 controllers bound to this hierarchy (`memory`, `freezer`, `name=systemd` ...);
    /// for v2 the contents of `cgroup.controllers`.
    pub controllers: Vec<String>,
}

/// The mounted disk pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolInfo {
    pub mount_point: PathBuf,
    /// Backing block device (the loop device).
    pub device: String,
    /// Whether the pool was created (formatted) by this call.
    pub created: bool,
}

/// The container side of a `full` network: one veth pair between the host bridge and the
/// sandbox's namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VethConfig {
    /// Host-side name (≤ 15 bytes), enslaved to `bridge`.
    pub host_name: String,
    pub bridge: String,
    /// Address and prefix of `eth0` inside the sandbox.
    pub address: Ipv4Addr,
    pub prefix: u8,
    /// Default route.
    pub gateway: Ipv4Addr,
}

/// Privileged kernel operations. Implementations must be cheap (syscalls, no process spawns)
/// for everything on the create/remove path; only `prepare_pool`, `ensure_bridge` and
/// `ensure_nat` (run once at startup) may run host tools.
pub trait Host: Send + Sync + 'static {
    /// Mounts an overlay at `target` with `lower` (top first), `upper` and `work`.
    fn mount_overlay(
        &self,
        lower: &[PathBuf],
        upper: &Path,
        work: &Path,
        target: &Path,
    ) -> io::Result<()>;
    /// Mounts a tmpfs with `options` (e.g. `size=1m`) at `target`.
    fn mount_tmpfs(&self, target: &Path, options: &str) -> io::Result<()>;
    /// Unmounts `target`; not mounted or missing is success. Busy mounts are detached lazily.
    fn unmount(&self, target: &Path) -> io::Result<()>;
    /// The current mount table.
    fn mounts(&self) -> io::Result<Vec<MountEntry>>;

    /// Makes sure the disk pool image exists (sparse, formatted once) and is mounted at
    /// `mount_point` with quotas enabled. Reuses an existing image and mount.
    fn prepare_pool(&self, image: &Path, bytes: u64, mount_point: &Path) -> Result<PoolInfo>;
    /// Unmounts the pool (which also frees its loop device).
    fn release_pool(&self, mount_point: &Path) -> io::Result<()>;
    /// Creates the quota-limited volume `pool/name` (a directory); returns its volume id.
    fn create_volume(&self, pool: &Path, name: &str, limit_bytes: u64) -> io::Result<u64>;
    /// Deletes volume `pool/name` and everything in it; missing is success.
    fn delete_volume(&self, pool: &Path, name: &str) -> io::Result<()>;
    /// Bytes volume `pool/name` holds (its quota group's referenced count), read on the pool
    /// backed by `device`; `None` where the kernel does not expose quota-group counts.
    fn volume_usage(&self, _device: &str, _pool: &Path, _name: &str) -> io::Result<Option<u64>> {
        Ok(None)
    }

    /// The mounted cgroup hierarchies.
    fn cgroup_roots(&self) -> io::Result<Vec<CgroupRoot>>;
    /// Host-wide cgroup tuning for fast container starts (best effort; see
    /// [`crate::linux::RealHost`]).
    fn tune_cgroups(&self) -> io::Result<()> {
        Ok(())
    }
    /// SIGKILLs a sandbox's init (and so its whole pid namespace) if `pid` is still a process
    /// in cgroup `cgroup_rel` (guards against pid reuse), thaws it if frozen, and waits up to
    /// `timeout` for it to exit. Returns whether it was running.
    fn kill_init(
        &self,
        pid: u32,
        cgroup_rel: &str,
        timeout: std::time::Duration,
    ) -> io::Result<bool>;
    /// Kills every process in the cgroup directory `dir` (and its children), then removes the
    /// directories; missing is success.
    fn destroy_cgroup(&self, dir: &Path, root: &CgroupRoot) -> io::Result<()>;

    /// Creates the host bridge with `gateway/prefix` (idempotent).
    fn ensure_bridge(&self, bridge: &str, gateway: Ipv4Addr, prefix: u8) -> Result<()>;
    /// Enables forwarding and the masquerade rules for `subnet` leaving through anything but
    /// `bridge` (idempotent).
    fn ensure_nat(&self, bridge: &str, subnet: &str) -> Result<()>;
    /// Creates a network namespace pinned by a bind mount at `path`, with loopback up and, if
    /// given, the veth pair configured.
    fn create_netns(&self, path: &Path, veth: Option<&VethConfig>) -> io::Result<()>;
    /// Creates the veth pair with its sandbox end (`eth0`, addressed and routed) in the
    /// network namespace of process `pid`, one the OCI runtime created inside the sandbox's
    /// user namespace (loopback is already up there).
    fn attach_veth(&self, pid: u32, veth: &VethConfig) -> io::Result<()>;
    /// Unpins (unmounts and deletes) the namespace at `path`; missing is success.
    fn delete_netns(&self, path: &Path) -> io::Result<()>;
    /// Runs an nftables script as one transaction (egress allow-lists).
    fn nft(&self, script: &str) -> io::Result<()>;
    /// Deletes a network link by name; missing is success.
    fn delete_link(&self, name: &str) -> io::Result<()>;
    /// Names of the links enslaved to `bridge`.
    fn bridge_ports(&self, bridge: &str) -> io::Result<Vec<String>>;
}

/// Result of running a command.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CmdOutput {
    pub status: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl CmdOutput {
    pub fn success(&self) -> bool {
        self.status == 0
    }
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).trim().to_string()
    }
}

/// The OCI runtime and kilnd.
pub trait Engine: Send + Sync + 'static {
    /// Runs `argv` (an OCI runtime `run --detach` command line) so that the container's init
    /// ends up reparented to a subreaper that reaps it; its stdout/stderr go to `stdio_file`
    /// (the container's stdio inherits them).
    fn run_detached(
        &self,
        argv: Vec<String>,
        stdio_file: PathBuf,
    ) -> BoxFuture<'_, Result<CmdOutput>>;
    /// Runs a short command (`runc state`, `pause`, `delete` ...) and collects its output.
    fn command(&self, argv: Vec<String>) -> BoxFuture<'_, Result<CmdOutput>>;
    /// Cheap readiness check: can a connection to kilnd's socket be made right now?
    fn connectable(&self, socket: &Path) -> bool;
    /// One kilnd ping over `socket`.
    fn ping(&self, socket: PathBuf) -> BoxFuture<'_, Result<()>>;
    /// Stops helper processes (the host reaper) once no sandbox is left.
    fn shutdown(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async { Ok(()) })
    }
}
