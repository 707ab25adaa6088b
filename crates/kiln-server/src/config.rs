//! Server configuration: where state lives, which OCI runtime runs sandboxes, defaults and
//! bounds for sandbox resources, and the warm pool size.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Resource defaults applied when a create request leaves a field out.
#[derive(Debug, Clone, PartialEq)]
pub struct Defaults {
    pub cpus: f64,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
    pub pids_limit: u64,
}

impl Default for Defaults {
    fn default() -> Self {
        Self {
            cpus: 1.0,
            memory_bytes: 512 << 20,
            disk_bytes: 2 << 30,
            pids_limit: 1024,
        }
    }
}

/// Everything `kiln up` needs to serve.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// State root: token, SQLite database, sandbox bundles, the disk pool.
    pub data_dir: PathBuf,
    /// Image store root (may be shared between data dirs, e.g. a CI cache).
    pub images_dir: PathBuf,
    pub runtime: kiln_sandbox::OciRuntimeKind,
    pub runtime_path: Option<PathBuf>,
    /// The static kilnd binary to put into sandboxes.
    pub kilnd_path: PathBuf,
    /// Idle sandboxes kept ready for the default spec of the `base` template (0 = off).
    pub warm_pool: usize,
    pub defaults: Defaults,
    pub max_cpus: f64,
    pub max_memory_bytes: u64,
    pub max_disk_bytes: u64,
    /// Upper bound on a sandbox TTL (`None` = unbounded).
    pub max_ttl: Option<std::time::Duration>,
    /// Size of the sparse filesystem holding all writable layers.
    pub disk_pool_bytes: u64,
    pub bridge: String,
    pub subnet: String,
    /// Run `none`-network sandboxes in a user namespace (root inside = host uid 100000).
    pub userns: bool,
    /// `postgres://...` to keep state in PostgreSQL; `None` = SQLite in the data dir.
    pub database_url: Option<String>,
    /// Where the key-hashing secret lives [default: `<data dir>/secret`]; replicas sharing a
    /// database must share this file.
    pub secret_path: Option<PathBuf>,
    /// Per-organisation limits unless an org overrides them.
    pub quota: kiln_store::Limits,
    /// How long audit entries are kept (`None` = forever).
    pub audit_retention: Option<std::time::Duration>,
    /// Per-key rate limits unless an org sets its own.
    pub rate_limits: kiln_protocol::api::RateLimits,
    /// How often the resource use of every sandbox is sampled into usage events (a crash
    /// loses at most this much of memory and disk accounting; CPU time is cumulative).
    pub meter_interval: std::time::Duration,
    /// Agent providers, models, profiles (`kiln up --agent-config FILE`).
    pub agents: kiln_agent::config::AgentConfig,
    /// Where the SSH front door listens (`None` = no SSH; `kiln up` defaults to port 2222).
    pub ssh_listen: Option<SocketAddr>,
    /// Wildcard preview domain: `{port}-{id}.{domain}` is proxied to that sandbox port.
    pub preview_domain: Option<String>,
    /// Tenants' git sources may point at loopback, private and link-local addresses (a
    /// self-hosted git server on the LAN); off by default, as such URLs reach the server's
    /// own network.
    pub git_private_hosts: bool,
}

impl ServerConfig {
    /// Defaults for a data dir, as `kiln up` uses them.
    pub fn new(data_dir: PathBuf, kilnd_path: PathBuf) -> Self {
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get() as f64)
            .unwrap_or(1.0);
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7777)),
            images_dir: data_dir.join("images"),
            data_dir,
            runtime: kiln_sandbox::OciRuntimeKind::Runc,
            runtime_path: None,
            kilnd_path,
            warm_pool: 2,
            defaults: Defaults::default(),
            max_cpus: cpus,
            max_memory_bytes: 64 << 30,
            max_disk_bytes: 256 << 30,
            max_ttl: None,
            disk_pool_bytes: 64 << 30,
            bridge: "kiln0".into(),
            subnet: "10.201.0.0/16".into(),
            userns: true,
            database_url: None,
            secret_path: None,
            quota: kiln_store::Limits {
                sandboxes: 100,
                cpus: 64.0,
                memory_bytes: 256 << 30,
                disk_bytes: 1 << 40,
            },
            audit_retention: Some(std::time::Duration::from_secs(90 * 86400)),
            rate_limits: crate::ratelimit::default_limits(),
            meter_interval: std::time::Duration::from_secs(15),
            agents: kiln_agent::config::AgentConfig::default(),
            ssh_listen: None,
            preview_domain: None,
            git_private_hosts: false,
        }
    }

    /// Short per-data-dir directory for sockets and runtime state (Unix socket paths must stay
    /// under 108 bytes, so it cannot live under an arbitrary data dir).
    pub fn run_dir(&self) -> PathBuf {
        PathBuf::from(format!("/run/kiln-{}", self.instance_tag()))
    }

    /// 8 hex digits naming this data dir in shared kernel namespaces (cgroups, run dirs), so
    /// two servers with different data dirs never touch each other's sandboxes.
    pub fn instance_tag(&self) -> String {
        use sha2::Digest;
        let canon = std::fs::canonicalize(&self.data_dir).unwrap_or_else(|_| self.data_dir.clone());
        let h = sha2::Sha256::digest(canon.as_os_str().as_encoded_bytes());
        hex::encode(&h[..4])
    }
}

/// The runtime kind for a name (`runc`, `crun`, `runsc`, `youki`).
pub fn runtime_kind(name: &str) -> Option<kiln_sandbox::OciRuntimeKind> {
    use kiln_sandbox::OciRuntimeKind as K;
    match name {
        "runc" => Some(K::Runc),
        "crun" => Some(K::Crun),
        "runsc" => Some(K::Runsc),
        "youki" => Some(K::Youki),
        _ => None,
    }
}
