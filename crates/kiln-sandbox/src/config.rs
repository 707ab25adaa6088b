//! Public configuration and value types: [`RuntimeConfig`], [`SandboxSpec`] and the small
//! result types of [`crate::Runtime`]'s methods, plus their validation.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use kiln_protocol::api::NetworkMode;
use sha2::{Digest, Sha256};

use crate::error::{Result, SandboxError};

/// Longest sandbox id accepted.
pub const MAX_ID_LEN: usize = 40;

/// Which OCI runtime binary to drive. All of them take runc's command line
/// (`--root`, `--log`, `--log-format`, `run --detach --bundle --pid-file`, `pause`, `resume`,
/// `state`, `list`, `delete --force`), plus what [`OciRuntimeKind::global_args`] and
/// [`OciRuntimeKind::run_args`] add. runc and runsc are tested; crun and youki are not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OciRuntimeKind {
    #[default]
    Runc,
    Crun,
    Runsc,
    Youki,
}

impl OciRuntimeKind {
    /// The binary name looked up in `PATH` when [`RuntimeConfig::runtime_path`] is `None`.
    pub fn binary_name(self) -> &'static str {
        match self {
            OciRuntimeKind::Runc => "runc",
            OciRuntimeKind::Crun => "crun",
            OciRuntimeKind::Runsc => "runsc",
            OciRuntimeKind::Youki => "youki",
        }
    }

    /// Global flags Kiln adds before the subcommand.
    pub fn global_args(self) -> &'static [&'static str] {
        match self {
            // gVisor's own sockets live in its sentry; kilnd's socket must be a real host
            // socket in the bind-mounted run directory for the host to reach it.
            OciRuntimeKind::Runsc => &["--host-uds=create"],
            _ => &[],
        }
    }

    /// Flags Kiln adds to `run`.
    pub fn run_args(self) -> &'static [&'static str] {
        match self {
            // No session keyring per sandbox: keyctl/add_key/request_key are denied by seccomp
            // anyway, and under a user namespace every sandbox's root is the same host uid,
            // whose kernel key quota (200 keys) would cap the number of sandboxes. gVisor
            // has no host keyrings (and no such flag).
            OciRuntimeKind::Runsc => &[],
            _ => &["--no-new-keyring"],
        }
    }
}

/// Host-wide settings of one Kiln server.
#[derive(Debug, Clone, PartialEq)]
pub struct RuntimeConfig {
    /// Persistent state root, e.g. `/var/lib/kiln`; sandboxes live under `data_dir/sandboxes/<id>/`.
    pub data_dir: PathBuf,
    /// Short path (ideally on tmpfs) for sockets and the OCI runtime's state, e.g.
    /// `/run/kiln-1a2b3c4d`. `run_dir/<id>/kilnd.sock` must stay under 108 bytes.
    pub run_dir: PathBuf,
    pub runtime: OciRuntimeKind,
    /// Overrides the runtime binary (otherwise [`OciRuntimeKind::binary_name`] from `PATH`).
    pub runtime_path: Option<PathBuf>,
    /// Host path of the static kilnd binary (bind-mounted read-only at `/.kiln/kilnd`).
    pub kilnd_path: PathBuf,
    /// Size of the sparse file system image holding every sandbox's writable layer.
    pub disk_pool_bytes: u64,
    /// Name of the Linux bridge for `full` networking, default `kiln0`.
    pub bridge: String,
    /// IPv4 subnet of the bridge (gateway `.1`), default `10.201.0.0/16`.
    pub subnet: String,
    /// cgroup path (relative to each hierarchy's root) under which sandboxes are created,
    /// e.g. `kiln/1a2b3c4d`. Two servers must never share one.
    pub cgroup_parent: String,
    /// Run sandboxes in a user namespace: container uid/gid 0..size map to host
    /// host_base..host_base+size. `None` = no user namespace (container root is host root,
    /// restrained by capabilities, seccomp and no_new_privs only).
    pub userns: Option<IdMap>,
}

/// A user-namespace id mapping shared by all sandboxes of a runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdMap {
    pub host_base: u32,
    pub size: u32,
}

impl IdMap {
    /// The default range: container ids 0..65536 as host ids 100000..165536 (the range
    /// `useradd` leaves free for subordinate ids on Debian).
    pub const DEFAULT: IdMap = IdMap {
        host_base: 100_000,
        size: 65_536,
    };
}

impl RuntimeConfig {
    /// Defaults for a server whose state lives in `data_dir`: `run_dir` is
    /// `/run/kiln-<8 hex of sha256(data_dir)>`, `cgroup_parent` is `kiln/<same 8 hex>`,
    /// a 64 GiB (sparse) disk pool, runc, bridge `kiln0` on `10.201.0.0/16`.
    pub fn new(data_dir: impl Into<PathBuf>, kilnd_path: impl Into<PathBuf>) -> Self {
        let data_dir = data_dir.into();
        let tag = short_hash(data_dir.as_os_str().as_encoded_bytes());
        RuntimeConfig {
            run_dir: PathBuf::from(format!("/run/kiln-{tag}")),
            cgroup_parent: format!("kiln/{tag}"),
            userns: Some(IdMap::DEFAULT),
            data_dir,
            runtime: OciRuntimeKind::Runc,
            runtime_path: None,
            kilnd_path: kilnd_path.into(),
            disk_pool_bytes: 64 << 30,
            bridge: "kiln0".into(),
            subnet: "10.201.0.0/16".into(),
        }
    }

    /// The OCI runtime binary to execute.
    pub fn runtime_binary(&self) -> PathBuf {
        self.runtime_path
            .clone()
            .unwrap_or_else(|| PathBuf::from(self.runtime.binary_name()))
    }

    pub(crate) fn validate(&self) -> Result<Subnet> {
        let bad = |m: String| Err(SandboxError::InvalidConfig(m));
        if !self.data_dir.is_absolute() || !self.run_dir.is_absolute() {
            return bad("data_dir and run_dir must be absolute paths".into());
        }
        // run_dir/<id>/kilnd.sock and runc's own sockets must fit in sun_path (108 bytes).
        let longest = self.run_dir.as_os_str().len() + 1 + MAX_ID_LEN + "/kilnd.sock".len();
        if longest >= 100 {
            return bad(format!(
                "run_dir {} is too long for Unix socket paths (keep it under ~45 bytes)",
                self.run_dir.display()
            ));
        }
        if !self.kilnd_path.is_absolute() {
            return bad("kilnd_path must be absolute".into());
        }
        if self.disk_pool_bytes < 256 << 20 {
            return bad("disk_pool_bytes must be at least 256 MiB".into());
        }
        if self.bridge.is_empty()
            || self.bridge.len() > 15
            || !self
                .bridge
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return bad(format!(
                "bridge name {:?} is not a valid interface name",
                self.bridge
            ));
        }
        let parent = self.cgroup_parent.trim_matches('/');
        if parent.is_empty()
            || parent
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..")
            || !parent
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
        {
            return bad(format!(
                "cgroup_parent {:?} is not a clean relative path",
                self.cgroup_parent
            ));
        }
        Subnet::parse(&self.subnet)
    }
}

/// What to create.
#[derive(Debug, Clone, PartialEq)]
pub struct SandboxSpec {
    /// e.g. `sb-1a2b3c4d5e6f`; `[a-z0-9-]`, at most 40 characters, starting with a letter or digit.
    pub id: String,
    /// Read-only image layer directories, TOP FIRST (overlay `lowerdir` order).
    pub layers: Vec<PathBuf>,
    pub cpus: f64,
    pub memory_bytes: u64,
    /// Hard limit of the writable layer (enforced by a btrfs quota group).
    pub disk_bytes: u64,
    pub pids_limit: u64,
    pub network: NetworkMode,
    pub hostname: String,
    /// Extra environment of kilnd (and so the default environment of what it runs).
    pub env: Vec<(String, String)>,
    /// Egress allow-list (`full` networking only); `None` = unrestricted.
    pub egress: Option<crate::egress::EgressAllow>,
}

impl SandboxSpec {
    /// A spec with Kiln's default limits: 1 CPU, 512 MiB memory, 1 GiB disk, 1024 pids,
    /// no network, hostname = id.
    pub fn new(id: impl Into<String>, layers: Vec<PathBuf>) -> Self {
        let id = id.into();
        SandboxSpec {
            hostname: id.clone(),
            id,
            layers,
            cpus: 1.0,
            memory_bytes: 512 << 20,
            disk_bytes: 1 << 30,
            pids_limit: 1024,
            network: NetworkMode::None,
            env: Vec::new(),
            egress: None,
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(SandboxError::InvalidSpec(m));
        validate_id(&self.id)?;
        if self.layers.is_empty() {
            return bad("at least one image layer is required".into());
        }
        for l in &self.layers {
            let s = l.to_string_lossy();
            if !l.is_absolute() || s.contains(',') || s.contains(':') || s.contains('\n') {
                return bad(format!(
                    "layer path {} must be absolute and contain no ',' or ':'",
                    l.display()
                ));
            }
        }
        if !(self.cpus.is_finite() && self.cpus >= 0.01 && self.cpus <= 1024.0) {
            return bad(format!(
                "cpus must be between 0.01 and 1024, got {}",
                self.cpus
            ));
        }
        if self.memory_bytes < 16 << 20 {
            return bad("memory must be at least 16 MiB".into());
        }
        if self.memory_bytes > i64::MAX as u64 || self.disk_bytes > i64::MAX as u64 {
            return bad("limit too large".into());
        }
        if self.disk_bytes < 16 << 20 {
            return bad("disk must be at least 16 MiB".into());
        }
        if !(8..=4_194_304).contains(&self.pids_limit) {
            return bad("pids_limit must be between 8 and 4194304".into());
        }
        let h = &self.hostname;
        if h.is_empty()
            || h.len() > 63
            || !h
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            || h.starts_with(['-', '.'])
        {
            return bad(format!("hostname {h:?} is not a valid host name"));
        }
        if let Some(e) = &self.egress {
            if self.network != NetworkMode::Full {
                return bad("an egress allow-list needs network `full`".into());
            }
            e.normalized()?;
        }
        for (k, v) in &self.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
                return bad(format!("environment variable {k:?} is malformed"));
            }
        }
        Ok(())
    }
}

/// Checks a sandbox id: `[a-z0-9-]`, 1..=40 characters, not starting with `-`.
pub fn validate_id(id: &str) -> Result<()> {
    if id.is_empty()
        || id.len() > MAX_ID_LEN
        || id.starts_with('-')
        || !id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(SandboxError::InvalidSpec(format!(
            "sandbox id {id:?} must be 1-{MAX_ID_LEN} characters of [a-z0-9-]"
        )));
    }
    Ok(())
}

/// Answer of [`crate::Runtime::create`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Created {
    /// Sandbox address on the bridge (`full` networking only).
    pub ip: Option<String>,
    /// Host pid of the sandbox's PID 1 (kilnd).
    pub init_pid: u32,
}

/// What the OCI runtime says about a sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuntimeStatus {
    Running,
    Paused,
    /// Artefacts exist but its processes are gone.
    Stopped,
    /// Nothing is known about this id.
    Missing,
}

/// Answer of [`crate::Runtime::reconcile`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReconcileReport {
    /// Unknown ids whose artefacts were removed.
    pub removed: Vec<String>,
    /// Known ids whose container is not running (or paused).
    pub dead: Vec<String>,
}

/// An IPv4 subnet such as `10.201.0.0/16`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Subnet {
    pub base: Ipv4Addr,
    pub prefix: u8,
}

impl Subnet {
    pub fn parse(s: &str) -> Result<Subnet> {
        let bad = || {
            SandboxError::InvalidConfig(format!(
                "subnet {s:?} is not an IPv4 CIDR like 10.201.0.0/16"
            ))
        };
        let (a, p) = s.split_once('/').ok_or_else(bad)?;
        let base: Ipv4Addr = a.parse().map_err(|_| bad())?;
        let prefix: u8 = p.parse().map_err(|_| bad())?;
        if !(8..=28).contains(&prefix) {
            return Err(bad());
        }
        let mask = u32::MAX << (32 - prefix);
        if u32::from(base) & !mask != 0 {
            return Err(bad());
        }
        Ok(Subnet { base, prefix })
    }

    /// Number of addresses in the subnet.
    pub fn size(&self) -> u32 {
        1u32 << (32 - self.prefix)
    }

    /// The gateway (`.1`), owned by the bridge.
    pub fn gateway(&self) -> Ipv4Addr {
        self.nth(1)
    }

    pub fn nth(&self, n: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.base) + n)
    }

    /// Host offsets usable by sandboxes: 2 ..= size-2 (skip network, gateway, broadcast).
    pub fn host_offsets(&self) -> std::ops::RangeInclusive<u32> {
        2..=self.size() - 2
    }
}

/// First 8 hex digits of sha256(bytes).
pub(crate) fn short_hash(bytes: &[u8]) -> String {
    let d = Sha256::digest(bytes);
    hex::encode(&d[..4])
}

/// Stable hash of (namespace, id) as a u64, used for veth names and address probing.
pub(crate) fn stable_hash(ns: &Path, id: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(ns.as_os_str().as_encoded_bytes());
    h.update([0]);
    h.update(id.as_bytes());
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_validated() {
        assert!(validate_id("sb-1a2b3c4d5e6f").is_ok());
        assert!(validate_id("").is_err());
        assert!(validate_id("-x").is_err());
        assert!(validate_id("Sb").is_err());
        assert!(validate_id("a/b").is_err());
        assert!(validate_id("..").is_err());
        assert!(validate_id(&"a".repeat(41)).is_err());
        assert!(validate_id(&"a".repeat(40)).is_ok());
    }

    #[test]
    fn subnet_math() {
        let s = Subnet::parse("10.201.0.0/16").expect("parse");
        assert_eq!(s.gateway(), Ipv4Addr::new(10, 201, 0, 1));
        assert_eq!(s.size(), 65536);
        assert_eq!(s.nth(258), Ipv4Addr::new(10, 201, 1, 2));
        assert!(Subnet::parse("10.201.0.1/16").is_err());
        assert!(Subnet::parse("10.201.0.0").is_err());
        assert!(Subnet::parse("10.201.0.0/31").is_err());
    }

    #[test]
    fn default_config_is_valid_and_namespaced() {
        let a = RuntimeConfig::new("/var/lib/kiln", "/usr/lib/kiln/kilnd");
        let b = RuntimeConfig::new("/var/lib/kiln2", "/usr/lib/kiln/kilnd");
        assert!(a.validate().is_ok());
        assert_ne!(a.run_dir, b.run_dir);
        assert_ne!(a.cgroup_parent, b.cgroup_parent);
        assert!(a.run_dir.to_string_lossy().starts_with("/run/kiln-"));
        let mut long = a.clone();
        long.run_dir = PathBuf::from(format!("/{}", "x".repeat(60)));
        assert!(long.validate().is_err());
    }

    #[test]
    fn spec_validation() {
        let ok = SandboxSpec::new("sb-1", vec![PathBuf::from("/img/a")]);
        assert!(ok.validate().is_ok());
        let mut s = ok.clone();
        s.layers = vec![PathBuf::from("relative")];
        assert!(s.validate().is_err());
        let mut s = ok.clone();
        s.layers = vec![PathBuf::from("/a,upperdir=/etc")];
        assert!(s.validate().is_err());
        let mut s = ok.clone();
        s.cpus = 0.0;
        assert!(s.validate().is_err());
        let mut s = ok.clone();
        s.env = vec![("A=B".into(), "c".into())];
        assert!(s.validate().is_err());
        let mut s = ok;
        s.hostname = "bad host".into();
        assert!(s.validate().is_err());
    }
}
