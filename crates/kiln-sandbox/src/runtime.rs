//! [`Runtime`]: creates, pauses, resumes, removes and reconciles sandboxes.
//!
//! # Layout
//! ```text
//! data_dir/
//!   disk-pool.img                 sparse btrfs image (all writable layers)
//!   disk/                         its mount point
//!     <id>/                       btrfs subvolume with the sandbox's quota
//!       upper/ work/              overlay upper and work dirs
//!       etc/{hosts,hostname,resolv.conf}
//!       kilnd.log                 kilnd's stdout/stderr (inside the quota: a sandbox process
//!                                 can write to PID 1's stdio through /proc/1/fd)
//!   sandboxes/<id>/               OCI bundle
//!     config.json kiln.json       OCI config; Kiln's own state (address, volume id ...)
//!     rootfs/                     overlay mount point
//!     runc.log init.pid
//! run_dir/
//!   <id>/kilnd.sock               a 1 MiB tmpfs, bind-mounted at /.kiln/run in the sandbox
//!   .runc/                        the OCI runtime's --root
//!   .netns/<id>                   pinned network namespace (full networking)
//!   .reaper.sock                  kilnd host-reaper
//! /run/kiln-net/<bridge>/<ip>     address leases, shared by all servers using that bridge
//! ```
//! Names starting with `.` cannot be sandbox ids, so they never collide.
//!
//! # Create path
//! Everything before the OCI runtime is syscalls only (mkdir, a btrfs subvolume + qgroup limit,
//! small file writes without fsync, one overlay mount, and for `full` networking a netns with a
//! veth over rtnetlink), done on one blocking thread. Then `runc run --detach` runs through the
//! host reaper, and kilnd's socket is polled every 200 µs until it answers a ping. Any failure
//! tears down whatever was created.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_protocol::api::NetworkMode;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::config::{
    stable_hash, Created, ReconcileReport, RuntimeConfig, RuntimeStatus, SandboxSpec, Subnet,
};
use crate::error::{IoContext, Result, SandboxError};
use crate::host::{CgroupRoot, Engine, Host, PoolInfo, VethConfig};
use crate::spec::{self, BundleInputs};

/// How long create waits for kilnd to answer.
pub const READY_TIMEOUT: Duration = Duration::from_secs(5);
/// Interval of kilnd readiness polls.
pub const READY_POLL: Duration = Duration::from_micros(200);
/// Host-global directory of address leases (one subdirectory per bridge).
pub const LEASE_ROOT: &str = "/run/kiln-net";

/// Kiln's own per-sandbox state, `kiln.json` in the bundle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct SandboxState {
    id: String,
    volume_id: u64,
    network: String,
    #[serde(default)]
    ip: Option<String>,
    #[serde(default)]
    veth: Option<String>,
    /// The egress allow-list, if the sandbox has one.
    #[serde(default)]
    egress: Option<crate::egress::EgressAllow>,
}

/// All paths of one runtime.
#[derive(Debug, Clone)]
struct Paths {
    data_dir: PathBuf,
    run_dir: PathBuf,
    lease_dir: PathBuf,
}

impl Paths {
    fn sandboxes(&self) -> PathBuf {
        self.data_dir.join("sandboxes")
    }
    fn bundle(&self, id: &str) -> PathBuf {
        self.sandboxes().join(id)
    }
    fn rootfs(&self, id: &str) -> PathBuf {
        self.bundle(id).join("rootfs")
    }
    fn pool(&self) -> PathBuf {
        self.data_dir.join("disk")
    }
    fn pool_image(&self) -> PathBuf {
        self.data_dir.join("disk-pool.img")
    }
    fn volume(&self, id: &str) -> PathBuf {
        self.pool().join(id)
    }
    fn kilnd_log(&self, id: &str) -> PathBuf {
        self.volume(id).join("kilnd.log")
    }
    fn sock_dir(&self, id: &str) -> PathBuf {
        self.run_dir.join(id)
    }
    fn socket(&self, id: &str) -> PathBuf {
        self.sock_dir(id).join(kiln_protocol::kilnd::SOCKET_NAME)
    }
    fn runc_root(&self) -> PathBuf {
        self.run_dir.join(".runc")
    }
    fn netns_dir(&self) -> PathBuf {
        self.run_dir.join(".netns")
    }
    fn netns(&self, id: &str) -> PathBuf {
        self.netns_dir().join(id)
    }
    fn reaper_socket(&self) -> PathBuf {
        self.run_dir.join(".reaper.sock")
    }
}

type IdLocks = Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>;

/// Holds the per-id lock; drops the map entry when nobody else wants it.
struct IdGuard {
    id: String,
    locks: Arc<IdLocks>,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for IdGuard {
    fn drop(&mut self) {
        self.guard.take();
        if let Ok(mut map) = self.locks.lock() {
            if map.get(&self.id).is_some_and(|m| Arc::strong_count(m) == 1) {
                map.remove(&self.id);
            }
        }
    }
}

struct Inner {
    cfg: RuntimeConfig,
    paths: Paths,
    subnet: Subnet,
    host: Arc<dyn Host>,
    engine: Arc<dyn Engine>,
    pool: PoolInfo,
    cgroups: Vec<CgroupRoot>,
    runtime_bin: String,
    /// resolv.conf lines for `full` sandboxes: the egress DNS forwarder if it runs, else the
    /// host's.
    host_resolv: String,
    nofile: u64,
    locks: Arc<IdLocks>,
    policies: crate::egress::Policies,
    dns: std::sync::Mutex<Option<crate::egress::DnsForwarder>>,
}

/// A sandbox's resource use at one moment (see [`Runtime::resource_usage`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ResourceUsage {
    /// Cumulative CPU time of the sandbox's processes since it was created, in nanoseconds.
    pub cpu_ns: Option<u64>,
    /// Memory charged to its cgroup now.
    pub memory_bytes: u64,
    /// Bytes its writable layer holds now.
    pub disk_bytes: Option<u64>,
}

/// The sandbox runtime of one Kiln server. Cheap to clone; all methods take `&self`.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("data_dir", &self.inner.cfg.data_dir)
            .finish_non_exhaustive()
    }
}

fn mkdir(p: &Path, mode: u32) -> Result<()> {
    match fs::DirBuilder::new().mode(mode).create(p) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
            Err(SandboxError::io(format!("creating {}", p.display()), e))
        }
        _ => Ok(()),
    }
}

/// Removes a directory tree; missing is success.
fn remove_tree(p: &Path) -> io::Result<()> {
    match fs::remove_dir_all(p) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn read_dir_names(p: &Path) -> Vec<String> {
    fs::read_dir(p)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn is_id(name: &str) -> bool {
    crate::config::validate_id(name).is_ok()
}

/// The last `max` bytes of a file, lossy.
fn tail(path: &Path, max: u64) -> String {
    let Ok(mut f) = fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).trim().to_string()
}

/// Error messages from runc's JSON log (`--log-format json`), newest last.
fn runc_log_errors(path: &Path) -> String {
    let text = tail(path, 16 * 1024);
    let msgs: Vec<String> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| matches!(v["level"].as_str(), Some("error") | Some("fatal")))
        .filter_map(|v| v["msg"].as_str().map(String::from))
        .collect();
    msgs.join("; ")
}

/// Host-side veth name of a sandbox: `kv` + 10 hex digits of hash(run_dir, id).
fn veth_name(run_dir: &Path, id: &str) -> String {
    format!("kv{}", &hex::encode(stable_hash(run_dir, id))[..10])
}

impl Runtime {
    /// Prepares directories, the disk pool, the bridge and NAT rules and the host reaper.
    /// Idempotent across restarts (existing pool, mounts, bridge and reaper are reused).
    pub async fn new(cfg: RuntimeConfig) -> Result<Runtime> {
        let host: Arc<dyn Host> = Arc::new(crate::linux::RealHost);
        cfg.validate()?;
        let paths = Paths {
            data_dir: cfg.data_dir.clone(),
            run_dir: cfg.run_dir.clone(),
            lease_dir: PathBuf::new(),
        };
        fs::create_dir_all(&paths.run_dir)
            .ctx(|| format!("creating {}", paths.run_dir.display()))?;
        let engine =
            crate::engine::RealEngine::start(&cfg.kilnd_path, &paths.reaper_socket()).await?;
        let rt = Self::with_parts(cfg, host, Arc::new(engine), Path::new(LEASE_ROOT)).await?;
        rt.start_dns().await;
        Ok(rt)
    }

    /// Starts the egress DNS forwarder on the gateway (port 53). If that fails (another
    /// server on this bridge holds it), `full` sandboxes use the host's name servers and
    /// allow-lists can name CIDRs only.
    async fn start_dns(&self) {
        let inner = &self.inner;
        let Some(upstream) = crate::egress::upstream_from_resolv(
            &fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
        ) else {
            warn!("no IPv4 name server in /etc/resolv.conf: the egress DNS forwarder is off");
            return;
        };
        let listen = std::net::SocketAddr::from((inner.subnet.gateway(), 53));
        match crate::egress::DnsForwarder::start(listen, upstream, inner.policies.clone()).await {
            Ok(f) => {
                if let Ok(mut d) = inner.dns.lock() {
                    *d = Some(f);
                }
            }
            Err(e) => warn!(%listen, "egress DNS forwarder not started: {e}"),
        }
    }

    /// Whether the egress DNS forwarder serves this runtime's sandboxes.
    pub fn dns_forwarder(&self) -> Option<std::net::SocketAddr> {
        self.inner.dns.lock().ok()?.as_ref().map(|f| f.listen)
    }

    fn resolv_conf(&self, network: &NetworkMode) -> String {
        match self.dns_forwarder() {
            Some(a) if *network == NetworkMode::Full => format!(
                "# kiln: the host's DNS forwarder (it enforces the egress allow-list)\nnameserver {}\n",
                a.ip()
            ),
            _ => spec::resolv_conf(network, &self.inner.host_resolv),
        }
    }

    /// Like [`Runtime::new`] with explicit [`Host`] and [`Engine`] implementations and lease
    /// root (tests use fakes and a temporary directory).
    pub async fn with_parts(
        cfg: RuntimeConfig,
        host: Arc<dyn Host>,
        engine: Arc<dyn Engine>,
        lease_root: &Path,
    ) -> Result<Runtime> {
        let mut cfg = cfg;
        if cfg.runtime == crate::config::OciRuntimeKind::Runsc && cfg.userns.is_some() {
            // gVisor puts its sandbox in a user namespace of its own and does not take an
            // id mapping in the spec; the sentry is the isolation boundary.
            info!("runsc: Kiln's user-namespace mapping is off (gVisor brings its own)");
            cfg.userns = None;
        }
        let subnet = cfg.validate()?;
        if !cfg.kilnd_path.is_file() {
            return Err(SandboxError::InvalidConfig(format!(
                "kilnd binary {} does not exist",
                cfg.kilnd_path.display()
            )));
        }
        let paths = Paths {
            data_dir: cfg.data_dir.clone(),
            run_dir: cfg.run_dir.clone(),
            lease_dir: lease_root.join(&cfg.bridge),
        };
        let h = host.clone();
        let c = cfg.clone();
        let p = paths.clone();
        let (pool, cgroups) = tokio::task::spawn_blocking(move || -> Result<(PoolInfo, Vec<CgroupRoot>)> {
            fs::create_dir_all(&p.data_dir).ctx(|| format!("creating {}", p.data_dir.display()))?;
            mkdir(&p.sandboxes(), 0o700)?;
            if c.userns.is_some() {
                crate::userns::make_traversable(&p.data_dir, &p.sandboxes())?;
            }
            fs::create_dir_all(&p.run_dir).ctx(|| format!("creating {}", p.run_dir.display()))?;
            mkdir(&p.runc_root(), 0o700)?;
            mkdir(&p.netns_dir(), 0o700)?;
            fs::create_dir_all(&p.lease_dir).ctx(|| format!("creating {}", p.lease_dir.display()))?;
            let pool = h.prepare_pool(&p.pool_image(), c.disk_pool_bytes, &p.pool())?;
            let cgroups = h.cgroup_roots().kctx(|| "finding cgroup hierarchies".into())?;
            if let Err(e) = h.tune_cgroups() {
                warn!("cannot enable cgroup favordynmods (container starts will be ~10 ms slower): {e}");
            }
            h.ensure_bridge(&c.bridge, subnet.gateway(), subnet.prefix)?;
            h.ensure_nat(&c.bridge, &c.subnet)?;
            Ok((pool, cgroups))
        })
        .await
        .map_err(|e| SandboxError::Host(format!("setup task: {e}")))??;
        let host_resolv = fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        info!(data_dir = %cfg.data_dir.display(), pool = %pool.device, hierarchies = cgroups.len(), "sandbox runtime ready");
        Ok(Runtime {
            inner: Arc::new(Inner {
                runtime_bin: cfg.runtime_binary().to_string_lossy().into_owned(),
                cfg,
                policies: crate::egress::Policies {
                    lease_dir: paths.lease_dir.clone(),
                },
                paths,
                subnet,
                host,
                engine,
                pool,
                cgroups,
                host_resolv,

                dns: std::sync::Mutex::new(None),
                nofile: spec::nofile_limit(),
                locks: Arc::new(Mutex::new(HashMap::new())),
            }),
        })
    }

    /// The configuration this runtime was built with.
    pub fn config(&self) -> &RuntimeConfig {
        &self.inner.cfg
    }

    /// The mounted disk pool.
    pub fn disk_pool(&self) -> &PoolInfo {
        &self.inner.pool
    }

    /// Host path of a sandbox's kilnd socket.
    pub fn socket_path(&self, id: &str) -> PathBuf {
        self.inner.paths.socket(id)
    }

    /// A kilnd client for sandbox `id` (connects lazily).
    pub fn client(&self, id: &str) -> kilnd::client::Client {
        kilnd::client::Client::new(self.socket_path(id))
    }

    async fn lock(&self, id: &str) -> IdGuard {
        let m = {
            let mut map = self.inner.locks.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(id.to_string()).or_default().clone()
        };
        let guard = m.lock_owned().await;
        IdGuard {
            id: id.to_string(),
            locks: self.inner.locks.clone(),
            guard: Some(guard),
        }
    }

    fn try_lock(&self, id: &str) -> Option<IdGuard> {
        let m = {
            let mut map = self.inner.locks.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(id.to_string()).or_default().clone()
        };
        let guard = m.try_lock_owned().ok();
        let g = IdGuard {
            id: id.to_string(),
            locks: self.inner.locks.clone(),
            guard,
        };
        g.guard.is_some().then_some(g)
    }

    fn runc_args(&self, args: &[&str]) -> Vec<String> {
        let root = self.inner.paths.runc_root().to_string_lossy().into_owned();
        let mut v = vec![self.inner.runtime_bin.clone(), "--root".into(), root];
        v.extend(
            self.inner
                .cfg
                .runtime
                .global_args()
                .iter()
                .map(|s| s.to_string()),
        );
        v.extend(args.iter().map(|s| s.to_string()));
        v
    }

    /// Creates and starts a sandbox; returns once its kilnd answers a ping.
    pub async fn create(&self, spec: &SandboxSpec) -> Result<Created> {
        spec.validate()?;
        let mut normalized;
        let spec = match &spec.egress {
            Some(e) => {
                normalized = spec.clone();
                normalized.egress = Some(e.normalized()?);
                &normalized
            }
            None => spec,
        };
        if self.inner.cfg.runtime == crate::config::OciRuntimeKind::Runsc
            && spec.network == NetworkMode::Full
        {
            // runsc 20221219 refuses to set up its netstack from a namespace Kiln pinned
            // ("cannot run with network enabled in root network namespace").
            return Err(SandboxError::InvalidSpec(
                "network `full` is not supported with the runsc runtime (use network `none`, or run `kiln up --runtime runc`)".into(),
            ));
        }
        let _g = self.lock(&spec.id).await;
        let t0 = Instant::now();
        let bundle = self.inner.paths.bundle(&spec.id);
        if bundle.exists() || self.inner.paths.runc_root().join(&spec.id).exists() {
            return Err(SandboxError::AlreadyExists(spec.id.clone()));
        }
        match self.create_locked(spec, t0).await {
            Ok(c) => {
                info!(id = %spec.id, ms = t0.elapsed().as_secs_f64() * 1e3, "sandbox created");
                Ok(c)
            }
            // Someone else's bundle appeared (another runtime over the same data dir): it is
            // not ours to tear down.
            Err(e @ SandboxError::AlreadyExists(_)) => Err(e),
            Err(e) => {
                warn!(id = %spec.id, "create failed, tearing down: {e}");
                if let Err(te) = self.teardown(&spec.id).await {
                    warn!(id = %spec.id, "teardown after failed create: {te}");
                }
                Err(e)
            }
        }
    }

    async fn create_locked(&self, spec: &SandboxSpec, t0: Instant) -> Result<Created> {
        let this = self.clone();
        let s = spec.clone();
        let (ip, bundle, late_veth) = tokio::task::spawn_blocking(move || this.prepare(&s))
            .await
            .map_err(|e| SandboxError::Host(format!("prepare task: {e}")))??;
        let t_prepared = t0.elapsed();

        let p = &self.inner.paths;
        let id = &spec.id;
        let pid_file = bundle.join("init.pid");
        let runc_log = bundle.join("runc.log");
        let (log_s, bundle_s, pid_s) = (
            runc_log.to_string_lossy(),
            bundle.to_string_lossy(),
            pid_file.to_string_lossy(),
        );
        let mut args: Vec<&str> = vec!["--log", &log_s, "--log-format", "json"];
        if self.inner.cfg.runtime == crate::config::OciRuntimeKind::Runsc
            && spec.network == NetworkMode::None
        {
            // gVisor does not create network namespaces; `none` is its own loopback-only
            // netstack (`full` joins the namespace Kiln pinned, as without a user namespace).
            args.push("--network=none");
        }
        args.extend_from_slice(&["run", "--detach"]);
        args.extend_from_slice(self.inner.cfg.runtime.run_args());
        args.extend_from_slice(&["--bundle", &bundle_s, "--pid-file", &pid_s, id]);
        let argv = self.runc_args(&args);
        let out = self
            .inner
            .engine
            .run_detached(argv, p.kilnd_log(id))
            .await?;
        if !out.success() {
            let mut msg = runc_log_errors(&runc_log);
            if msg.is_empty() {
                msg = out.stderr_text();
            }
            if msg.is_empty() {
                msg = tail(&p.kilnd_log(id), 2048);
            }
            return Err(SandboxError::runtime(
                format!("{} run", self.inner.runtime_bin),
                format!("exit {}: {msg}", out.status),
            ));
        }
        let t_started = t0.elapsed();
        let init_pid: u32 = fs::read_to_string(&pid_file)
            .ctx(|| format!("reading {}", pid_file.display()))?
            .trim()
            .parse()
            .map_err(|_| SandboxError::runtime("runc run", "unreadable pid file"))?;
        if let Some(v) = late_veth {
            // The runtime created the netns inside the user namespace; wire it up before
            // anyone can run a command in the sandbox (kilnd is its only process so far).
            let host = self.inner.host.clone();
            tokio::task::spawn_blocking(move || host.attach_veth(init_pid, &v))
                .await
                .map_err(|e| SandboxError::Host(format!("network task: {e}")))?
                .kctx(|| format!("attaching the network of {id}"))?;
        }
        if let (Some(allow), Some(addr)) = (&spec.egress, ip) {
            self.install_egress(id, addr, allow).await?;
        }
        self.wait_ready(id, init_pid, &p.socket(id), &p.kilnd_log(id))
            .await?;
        debug!(
            id = %id,
            prepare_us = t_prepared.as_micros() as u64,
            runc_us = (t_started - t_prepared).as_micros() as u64,
            ready_us = (t0.elapsed() - t_started).as_micros() as u64,
            "create phases"
        );
        Ok(Created {
            ip: ip.map(|a| a.to_string()),
            init_pid,
        })
    }

    /// Everything before the OCI runtime (blocking; runs on a blocking thread).
    /// Returns the leased address, the bundle, and for a `full` sandbox with a user namespace
    /// the veth to attach once its init exists.
    fn prepare(
        &self,
        spec: &SandboxSpec,
    ) -> Result<(Option<Ipv4Addr>, PathBuf, Option<VethConfig>)> {
        let inner = &self.inner;
        let p = &inner.paths;
        let id = spec.id.as_str();
        for l in &spec.layers {
            if !l.is_dir() {
                return Err(SandboxError::InvalidSpec(format!(
                    "layer {} is not a directory",
                    l.display()
                )));
            }
        }
        let bundle = p.bundle(id);
        // Under a user namespace runc's init (the sandbox's mapped root) must reach the rootfs
        // through the bundle: searchable, not listable.
        let bundle_mode = if inner.cfg.userns.is_some() {
            0o711
        } else {
            0o700
        };
        match fs::DirBuilder::new().mode(bundle_mode).create(&bundle) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(SandboxError::AlreadyExists(id.into()))
            }
            r => r.ctx(|| format!("creating {}", bundle.display()))?,
        }
        let rootfs = p.rootfs(id);
        mkdir(&rootfs, 0o755)?;
        let sock_dir = p.sock_dir(id);
        mkdir(&sock_dir, 0o755)?;
        // A small tmpfs: the sandbox can write to /.kiln/run, and run_dir may be on a disk.
        let tmpfs_opts = match inner.cfg.userns {
            // Owned by the sandbox's root, so kilnd can create its socket there.
            Some(m) => format!(
                "size=1m,nr_inodes=256,mode=0755,uid={0},gid={0}",
                m.host_base
            ),
            None => "size=1m,nr_inodes=256,mode=0755".to_string(),
        };
        inner
            .host
            .mount_tmpfs(&sock_dir, &tmpfs_opts)
            .kctx(|| format!("mounting {}", sock_dir.display()))?;

        let volume_id = inner
            .host
            .create_volume(&p.pool(), id, spec.disk_bytes)
            .kctx(|| format!("creating the disk volume of {id}"))?;
        let vol = p.volume(id);
        let (upper, work, etc) = (vol.join("upper"), vol.join("work"), vol.join("etc"));
        for d in [&upper, &work, &etc] {
            mkdir(d, 0o755)?;
        }

        let (ip, veth, netns) = match spec.network {
            NetworkMode::None => (None, None, None),
            NetworkMode::Full => {
                let ip = self.lease_ip(id)?;
                let v = VethConfig {
                    host_name: veth_name(&p.run_dir, id),
                    bridge: inner.cfg.bridge.clone(),
                    address: ip,
                    prefix: inner.subnet.prefix,
                    gateway: inner.subnet.gateway(),
                };
                // With a user namespace the runtime must create the netns inside it (a
                // namespace owned by the host's user namespace would not let the sandbox
                // mount sysfs); the veth is attached after start instead.
                let netns = inner.cfg.userns.is_none().then(|| p.netns(id));
                (Some(ip), Some(v), netns)
            }
        };
        let state = SandboxState {
            id: id.into(),
            volume_id,
            network: match spec.network {
                NetworkMode::Full => "full".into(),
                NetworkMode::None => "none".into(),
            },
            ip: ip.map(|a| a.to_string()),
            veth: veth.as_ref().map(|v| v.host_name.clone()),
            egress: spec.egress.clone(),
        };
        // Written first so teardown finds the address and veth even if a later step fails.
        write_file(
            &bundle.join("kiln.json"),
            &serde_json::to_vec(&state)
                .map_err(io::Error::other)
                .ctx(|| "state".into())?,
        )?;
        if let Some(ns) = &netns {
            let t = Instant::now();
            inner
                .host
                .create_netns(ns, veth.as_ref())
                .kctx(|| format!("creating the network namespace of {id}"))?;
            debug!(id, us = t.elapsed().as_micros() as u64, "netns ready");
        }

        let ip_s = ip.map(|a| a.to_string());
        write_file(
            &etc.join("hostname"),
            format!("{}\n", spec.hostname).as_bytes(),
        )?;
        write_file(
            &etc.join("hosts"),
            spec::hosts_file(&spec.hostname, ip_s.as_deref()).as_bytes(),
        )?;
        write_file(
            &etc.join("resolv.conf"),
            self.resolv_conf(&spec.network).as_bytes(),
        )?;

        let userns = inner.cfg.userns;
        let shifted;
        let layers = match userns {
            Some(m) => {
                // The writable layer and generated files belong to the sandbox's root; the
                // read-only layers are used through a copy shifted into the mapped id range.
                for d in [&upper, &work, &etc] {
                    crate::userns::chown_shifted(d, m)?;
                }
                for f in ["hostname", "hosts", "resolv.conf"] {
                    crate::userns::chown_shifted(&etc.join(f), m)?;
                }
                shifted = spec
                    .layers
                    .iter()
                    .map(|l| crate::userns::shifted_layer(l, m))
                    .collect::<Result<Vec<_>>>()?;
                &shifted
            }
            None => &spec.layers,
        };
        inner
            .host
            .mount_overlay(layers, &upper, &work, &rootfs)
            .kctx(|| format!("mounting the overlay rootfs of {id}"))?;

        let cfg = spec::oci_config(&BundleInputs {
            spec,
            cgroups_path: self.cgroups_path(id),
            kilnd_host_path: &inner.cfg.kilnd_path,
            run_dir_host: &p.sock_dir(id),
            etc_dir_host: &etc,
            netns_path: netns.as_deref(),
            nofile: inner.nofile,
            userns,
        })?;
        let json = serde_json::to_vec(&cfg)
            .map_err(|e| SandboxError::InvalidSpec(format!("serializing config.json: {e}")))?;
        write_file(&bundle.join("config.json"), &json)?;
        let late_veth = if netns.is_none() { veth } else { None };
        Ok((ip, bundle, late_veth))
    }

    fn cgroups_path(&self, id: &str) -> String {
        format!("/{}/{}", self.inner.cfg.cgroup_parent.trim_matches('/'), id)
    }

    async fn wait_ready(&self, id: &str, init_pid: u32, socket: &Path, log: &Path) -> Result<()> {
        let start = Instant::now();
        let engine = self.inner.engine.clone();
        loop {
            // Poll connect() on a blocking thread (tokio timers have 1 ms resolution), in
            // slices so a dead init is noticed quickly.
            let e = engine.clone();
            let s = socket.to_path_buf();
            let connectable = tokio::task::spawn_blocking(move || {
                let slice = Instant::now();
                loop {
                    if e.connectable(&s) {
                        return true;
                    }
                    if slice.elapsed() > Duration::from_millis(50) {
                        return false;
                    }
                    std::thread::sleep(READY_POLL);
                }
            })
            .await
            .unwrap_or(false);
            if connectable && engine.ping(socket.to_path_buf()).await.is_ok() {
                return Ok(());
            }
            let dead = !Path::new(&format!("/proc/{init_pid}")).exists();
            if dead || start.elapsed() >= READY_TIMEOUT {
                let mut log_tail = tail(log, 4096);
                if dead {
                    log_tail = format!("(kilnd exited)\n{log_tail}");
                }
                return Err(SandboxError::DaemonTimeout {
                    id: id.into(),
                    waited_ms: start.elapsed().as_millis() as u64,
                    log_tail,
                });
            }
            if !connectable {
                continue;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Leases an address: first free one probing from hash(id), recorded as a file
    /// `lease_dir/<ip>` created with O_EXCL (shared by all servers on the same bridge).
    fn nft_bridge(&self) -> String {
        self.inner.cfg.bridge.replace('-', "_")
    }

    async fn install_egress(
        &self,
        id: &str,
        addr: Ipv4Addr,
        allow: &crate::egress::EgressAllow,
    ) -> Result<()> {
        let script = crate::egress::apply_script(
            &self.nft_bridge(),
            id,
            addr,
            self.inner.subnet.gateway(),
            allow,
        );
        let host = self.inner.host.clone();
        tokio::task::spawn_blocking(move || host.nft(&script))
            .await
            .map_err(|e| SandboxError::Host(format!("egress task: {e}")))?
            .kctx(|| format!("installing the egress allow-list of {id}"))?;
        crate::egress::Policies::store(&self.inner.paths.run_dir, id, Some(allow))
            .ctx(|| format!("storing the egress allow-list of {id}"))?;
        Ok(())
    }

    fn uninstall_egress(&self, id: &str, addr: Ipv4Addr) -> Result<()> {
        crate::egress::Policies::store(&self.inner.paths.run_dir, id, None)
            .ctx(|| format!("removing the egress allow-list file of {id}"))?;
        let script = crate::egress::remove_script(&self.nft_bridge(), id, addr);
        self.inner
            .host
            .nft(&script)
            .kctx(|| format!("removing the egress allow-list of {id}"))
    }

    fn read_state(&self, id: &str) -> Option<SandboxState> {
        fs::read(self.inner.paths.bundle(id).join("kiln.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
    }

    /// Changes the egress policy of a live `full` sandbox: `Some(list)` restricts it to the
    /// list (replacing any previous one), `None` lifts the restriction. Takes effect for new
    /// connections at once; established ones are kept.
    pub async fn set_egress(
        &self,
        id: &str,
        allow: Option<crate::egress::EgressAllow>,
    ) -> Result<()> {
        crate::config::validate_id(id)?;
        let allow = allow.map(|a| a.normalized()).transpose()?;
        let _g = self.lock(id).await;
        let mut state = self
            .read_state(id)
            .ok_or_else(|| SandboxError::NotFound(id.to_string()))?;
        let addr: Ipv4Addr = match state.ip.as_deref().and_then(|s| s.parse().ok()) {
            Some(a) if state.network == "full" => a,
            _ => {
                return Err(SandboxError::InvalidSpec(format!(
                    "sandbox {id} has network `none`; an egress allow-list needs network `full`"
                )))
            }
        };
        match &allow {
            Some(a) => self.install_egress(id, addr, a).await?,
            None if state.egress.is_some() => {
                let this = self.clone();
                let i = id.to_string();
                tokio::task::spawn_blocking(move || this.uninstall_egress(&i, addr))
                    .await
                    .map_err(|e| SandboxError::Host(format!("egress task: {e}")))??;
            }
            None => {}
        }
        state.egress = allow;
        write_file(
            &self.inner.paths.bundle(id).join("kiln.json"),
            &serde_json::to_vec(&state)
                .map_err(io::Error::other)
                .ctx(|| "state".into())?,
        )?;
        Ok(())
    }

    /// The egress allow-list of a sandbox and how many packets it has denied so far
    /// (blocking: reads its state file and runs `nft`).
    pub fn egress(&self, id: &str) -> Option<(crate::egress::EgressAllow, u64)> {
        let allow = self.read_state(id)?.egress?;
        let denied = crate::egress::denied_packets(id).unwrap_or(0);
        Some((allow, denied))
    }

    fn lease_ip(&self, id: &str) -> Result<Ipv4Addr> {
        let inner = &self.inner;
        let range = inner.subnet.host_offsets();
        let count = range.end() - range.start() + 1;
        let h = stable_hash(Path::new(""), id);
        let start = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) % count;
        let owner = format!("{}\n{}\n", inner.paths.run_dir.display(), id);
        for i in 0..count {
            let ip = inner.subnet.nth(range.start() + (start + i) % count);
            let path = inner.paths.lease_dir.join(ip.to_string());
            match fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .open(&path)
            {
                Ok(mut f) => {
                    f.write_all(owner.as_bytes())
                        .ctx(|| format!("writing {}", path.display()))?;
                    return Ok(ip);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(SandboxError::io(format!("creating {}", path.display()), e)),
            }
        }
        Err(SandboxError::Host(format!(
            "no free address left in {}",
            inner.cfg.subnet
        )))
    }

    /// Leases in our lease dir owned by this runtime: (ip file name, id).
    fn our_leases(&self) -> Vec<(String, String)> {
        let run_dir = self.inner.paths.run_dir.display().to_string();
        read_dir_names(&self.inner.paths.lease_dir)
            .into_iter()
            .filter_map(|name| {
                let text = fs::read_to_string(self.inner.paths.lease_dir.join(&name)).ok()?;
                let mut lines = text.lines();
                (lines.next()? == run_dir)
                    .then(|| lines.next().map(|id| (name.clone(), id.to_string())))?
            })
            .collect()
    }

    /// Pauses (freezes) a sandbox.
    pub async fn pause(&self, id: &str) -> Result<()> {
        self.simple_op(id, "pause").await
    }

    /// Resumes (thaws) a sandbox.
    pub async fn resume(&self, id: &str) -> Result<()> {
        self.simple_op(id, "resume").await
    }

    async fn simple_op(&self, id: &str, op: &str) -> Result<()> {
        crate::config::validate_id(id)?;
        let _g = self.lock(id).await;
        if !self.inner.paths.bundle(id).exists() {
            return Err(SandboxError::NotFound(id.into()));
        }
        let out = self.inner.engine.command(self.runc_args(&[op, id])).await?;
        if !out.success() {
            let msg = out.stderr_text();
            if msg.contains("does not exist") {
                return Err(SandboxError::NotFound(id.into()));
            }
            return Err(SandboxError::runtime(
                format!("{} {op}", self.inner.runtime_bin),
                msg,
            ));
        }
        Ok(())
    }

    /// Kills and removes a sandbox and everything it had on the host. Idempotent: removing an
    /// unknown or half-created sandbox succeeds.
    pub async fn remove(&self, id: &str) -> Result<()> {
        crate::config::validate_id(id)?;
        let _g = self.lock(id).await;
        let t0 = Instant::now();
        let r = self.teardown(id).await;
        debug!(id, us = t0.elapsed().as_micros() as u64, "sandbox removed");
        r
    }

    /// Removes every artefact of `id`; tries every step and reports the first failure.
    async fn teardown(&self, id: &str) -> Result<()> {
        let inner = &self.inner;
        let p = &inner.paths;
        let mut first: Option<SandboxError> = None;
        if p.runc_root().join(id).exists() {
            // Kill the init ourselves first: `runc delete --force` on a running container
            // signals it and then sleeps 100 ms before checking; on a dead one it is quick.
            let pid = fs::read_to_string(p.bundle(id).join("init.pid"))
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok());
            if let Some(pid) = pid {
                let host = inner.host.clone();
                let rel = self.cgroups_path(id);
                let r = tokio::task::spawn_blocking(move || {
                    host.kill_init(pid, &rel, Duration::from_secs(5))
                })
                .await;
                if let Ok(Err(e)) = r {
                    warn!(id, pid, "killing sandbox init: {e}");
                }
            }
            match inner
                .engine
                .command(self.runc_args(&["delete", "--force", id]))
                .await
            {
                Ok(out) if !out.success() && !out.stderr_text().contains("does not exist") => {
                    let msg = out.stderr_text();
                    warn!(id, "runc delete failed: {msg}");
                    first.get_or_insert(SandboxError::runtime(
                        format!("{} delete", inner.runtime_bin),
                        msg,
                    ));
                }
                Err(e) => {
                    first.get_or_insert(e);
                }
                _ => {}
            }
        }
        let this = self.clone();
        let id2 = id.to_string();
        let r = tokio::task::spawn_blocking(move || this.teardown_host(&id2))
            .await
            .map_err(|e| SandboxError::Host(format!("teardown task: {e}")))?;
        if let Err(e) = r {
            first.get_or_insert(e);
        }
        match first {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn teardown_host(&self, id: &str) -> Result<()> {
        let inner = &self.inner;
        let p = &inner.paths;
        let mut first: Option<SandboxError> = None;
        let mut note = |r: Result<()>| {
            if let Err(e) = r {
                warn!(id, "teardown: {e}");
                first.get_or_insert(e);
            }
        };
        // The runc state may be gone while processes survive (e.g. the runtime's root was
        // wiped): kill them through the cgroups, then remove the cgroup directories.
        let rel = self.cgroups_path(id);
        for root in &inner.cgroups {
            let dir = root.mount_point.join(rel.trim_start_matches('/'));
            note(
                inner
                    .host
                    .destroy_cgroup(&dir, root)
                    .kctx(|| format!("removing cgroup {}", dir.display())),
            );
        }
        // `runc delete` removed its state unless it failed; the processes are dead by now.
        let state_dir = p.runc_root().join(id);
        note(remove_tree(&state_dir).ctx(|| format!("removing {}", state_dir.display())));
        let rootfs = p.rootfs(id);
        note(
            inner
                .host
                .unmount(&rootfs)
                .kctx(|| format!("unmounting {}", rootfs.display())),
        );

        let state: Option<SandboxState> = self.read_state(id);
        let egress_addr = state
            .as_ref()
            .filter(|s| s.egress.is_some())
            .and_then(|s| s.ip.as_deref()?.parse::<Ipv4Addr>().ok());
        match egress_addr {
            Some(addr) => note(self.uninstall_egress(id, addr)),
            None => note(
                crate::egress::Policies::store(&p.run_dir, id, None)
                    .ctx(|| format!("removing the egress allow-list file of {id}")),
            ),
        }
        // Unpinning the namespace makes the kernel destroy it, and its veth pair with it, in
        // the background (a synchronous RTM_DELLINK costs 10-30 ms of RCU grace periods).
        let netns = p.netns(id);
        if netns.exists() {
            note(
                inner
                    .host
                    .delete_netns(&netns)
                    .kctx(|| format!("deleting netns {}", netns.display())),
            );
        } else if let Some(veth) = state.as_ref().and_then(|s| s.veth.clone()) {
            note(
                inner
                    .host
                    .delete_link(&veth)
                    .kctx(|| format!("deleting link {veth}")),
            );
        }
        // Release the address lease (only if it is ours).
        let owner = format!("{}\n{}\n", p.run_dir.display(), id);
        let mut lease_files: Vec<String> = state
            .as_ref()
            .and_then(|s| s.ip.clone())
            .into_iter()
            .collect();
        if lease_files.is_empty() && state.is_none() {
            lease_files = self
                .our_leases()
                .into_iter()
                .filter(|(_, i)| i == id)
                .map(|(ip, _)| ip)
                .collect();
        }
        for ip in lease_files {
            let f = p.lease_dir.join(&ip);
            if fs::read_to_string(&f).is_ok_and(|t| t == owner) {
                note(fs::remove_file(&f).ctx(|| format!("removing lease {}", f.display())));
            }
        }

        note(
            inner
                .host
                .delete_volume(&p.pool(), id)
                .kctx(|| format!("deleting the disk volume of {id}")),
        );
        let sock_dir = p.sock_dir(id);
        note(
            inner
                .host
                .unmount(&sock_dir)
                .kctx(|| format!("unmounting {}", sock_dir.display())),
        );
        note(remove_tree(&sock_dir).ctx(|| format!("removing {}", sock_dir.display())));
        // Remove the bundle last: it holds kiln.json, which the steps above rely on.
        let bundle = p.bundle(id);
        if inner
            .host
            .mounts()
            .map(|m| m.iter().any(|m| m.mount_point.starts_with(&bundle)))
            .unwrap_or(false)
        {
            note(Err(SandboxError::Host(format!(
                "{} still has mounts; not deleting it",
                bundle.display()
            ))));
        } else {
            note(remove_tree(&bundle).ctx(|| format!("removing {}", bundle.display())));
        }
        match first {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Runtime state of one sandbox.
    pub async fn status(&self, id: &str) -> Result<RuntimeStatus> {
        crate::config::validate_id(id)?;
        let p = &self.inner.paths;
        let has_bundle = p.bundle(id).exists();
        if !p.runc_root().join(id).exists() {
            return Ok(if has_bundle {
                RuntimeStatus::Stopped
            } else {
                RuntimeStatus::Missing
            });
        }
        let out = self
            .inner
            .engine
            .command(self.runc_args(&["state", id]))
            .await?;
        if !out.success() {
            return Ok(if has_bundle {
                RuntimeStatus::Stopped
            } else {
                RuntimeStatus::Missing
            });
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
            SandboxError::runtime(
                format!("{} state", self.inner.runtime_bin),
                format!("bad JSON: {e}"),
            )
        })?;
        Ok(parse_status(v["status"].as_str().unwrap_or("")))
    }

    /// Status of every container the OCI runtime knows under our root.
    async fn list_containers(&self) -> Result<HashMap<String, RuntimeStatus>> {
        let out = self
            .inner
            .engine
            .command(self.runc_args(&["list", "--format", "json"]))
            .await?;
        if !out.success() {
            return Err(SandboxError::runtime(
                format!("{} list", self.inner.runtime_bin),
                out.stderr_text(),
            ));
        }
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        Ok(v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| {
                Some((
                    c["id"].as_str()?.to_string(),
                    parse_status(c["status"].as_str().unwrap_or("")),
                ))
            })
            .collect())
    }

    /// Every sandbox id that has any artefact on this host.
    fn artefact_ids(&self, containers: &HashMap<String, RuntimeStatus>) -> BTreeSet<String> {
        let inner = &self.inner;
        let p = &inner.paths;
        let mut ids: BTreeSet<String> = containers.keys().cloned().collect();
        ids.extend(read_dir_names(&p.sandboxes()));
        ids.extend(read_dir_names(&p.pool()));
        ids.extend(read_dir_names(&p.run_dir));
        ids.extend(read_dir_names(&p.netns_dir()));
        ids.extend(read_dir_names(&p.runc_root()));
        ids.extend(
            read_dir_names(&p.run_dir.join(".egress"))
                .into_iter()
                .filter_map(|n| n.strip_suffix(".json").map(str::to_string)),
        );
        let sandboxes = p.sandboxes();
        if let Ok(mounts) = inner.host.mounts() {
            for m in mounts {
                if let Ok(rest) = m.mount_point.strip_prefix(&sandboxes) {
                    if let Some(first) = rest.components().next() {
                        ids.insert(first.as_os_str().to_string_lossy().into_owned());
                    }
                }
            }
        }
        let parent = inner.cfg.cgroup_parent.trim_matches('/');
        for root in &inner.cgroups {
            ids.extend(
                read_dir_names(&root.mount_point.join(parent))
                    .into_iter()
                    .filter(|n| root.mount_point.join(parent).join(n).is_dir()),
            );
        }
        ids.extend(self.our_leases().into_iter().map(|(_, id)| id));
        ids.retain(|i| is_id(i));
        ids
    }

    /// Removes every sandbox artefact whose id is not in `known_ids` and reports the known ids
    /// whose container is not running. Sandboxes with an operation in flight are left alone.
    /// Call it at startup, before serving creates.
    pub async fn reconcile(&self, known_ids: &[String]) -> Result<ReconcileReport> {
        let known: HashSet<&str> = known_ids.iter().map(String::as_str).collect();
        let containers = self.list_containers().await?;
        let mut report = ReconcileReport::default();
        for id in self.artefact_ids(&containers) {
            if known.contains(id.as_str()) {
                continue;
            }
            let Some(_g) = self.try_lock(&id) else {
                continue;
            };
            info!(id, "reconcile: removing unknown sandbox");
            self.teardown(&id).await?;
            report.removed.push(id);
        }
        for id in known_ids {
            match containers.get(id) {
                Some(RuntimeStatus::Running) | Some(RuntimeStatus::Paused) => {}
                _ => report.dead.push(id.clone()),
            }
        }
        Ok(report)
    }

    /// Reads a value of a sandbox's cgroup: the first hierarchy (v1 with `v1` bound, or the
    /// unified one offering `v2`) whose file exists; `None` when no hierarchy offers it.
    fn cgroup_file(&self, id: &str, v1: (&str, &str), v2: (&str, &str)) -> Result<Option<String>> {
        let rel = self.cgroups_path(id);
        let rel = rel.trim_start_matches('/');
        let mut found = false;
        for r in &self.inner.cgroups {
            let (controller, file) = if r.unified { v2 } else { v1 };
            if !r.controllers.iter().any(|c| c == controller) {
                continue;
            }
            found = true;
            let path = r.mount_point.join(rel).join(file);
            match fs::read_to_string(&path) {
                Ok(s) => return Ok(Some(s)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(SandboxError::io(format!("reading {}", path.display()), e)),
            }
        }
        if found {
            Err(SandboxError::NotFound(id.into()))
        } else {
            Ok(None)
        }
    }

    /// Current memory usage of a sandbox's cgroup, in bytes.
    pub async fn memory_usage(&self, id: &str) -> Result<u64> {
        crate::config::validate_id(id)?;
        let s = self
            .cgroup_file(
                id,
                ("memory", "memory.usage_in_bytes"),
                ("memory", "memory.current"),
            )?
            .ok_or_else(|| SandboxError::Host("no memory cgroup controller is mounted".into()))?;
        s.trim()
            .parse()
            .map_err(|_| SandboxError::Host(format!("unreadable memory usage of {id}")))
    }

    /// Cumulative CPU time of a sandbox's cgroup in nanoseconds (`None` where no cpuacct or
    /// cpu controller accounts it). A file read, cheap enough for a request path.
    pub fn cpu_usage(&self, id: &str) -> Result<Option<u64>> {
        crate::config::validate_id(id)?;
        Ok(
            match self.cgroup_file(id, ("cpuacct", "cpuacct.usage"), ("cpu", "cpu.stat"))? {
                None => None,
                Some(s) if s.contains("usage_usec") => s
                    .lines()
                    .find_map(|l| l.strip_prefix("usage_usec "))
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(|us| us * 1000),
                Some(s) => s.trim().parse().ok(),
            },
        )
    }

    /// What a sandbox uses right now, for metering: cumulative CPU time of its cgroup, its
    /// memory and the bytes its writable layer holds. CPU and disk are `None` where the host
    /// does not account them (no cpuacct/cpu controller; no quota-group counts).
    pub async fn resource_usage(&self, id: &str) -> Result<ResourceUsage> {
        crate::config::validate_id(id)?;
        let memory_bytes = self.memory_usage(id).await?;
        let cpu_ns = self.cpu_usage(id)?;
        let inner = self.inner.clone();
        let name = id.to_string();
        let disk_bytes = tokio::task::spawn_blocking(move || {
            inner
                .host
                .volume_usage(&inner.pool.device, &inner.paths.pool(), &name)
        })
        .await
        .map_err(|e| SandboxError::Host(format!("disk usage task: {e}")))?
        .unwrap_or(None);
        Ok(ResourceUsage {
            cpu_ns,
            memory_bytes,
            disk_bytes,
        })
    }

    /// Removes all sandboxes of this runtime, unmounts the disk pool and removes the cgroup
    /// parent and the run directory, and stops the host reaper. For tests and uninstall; the
    /// runtime is unusable afterwards. Tests should call it before their temporary data dir
    /// is deleted (a deleted data dir leaves the pool mounted on a deleted image).
    pub async fn destroy_all(&self) -> Result<ReconcileReport> {
        let report = self.reconcile(&[]).await?;
        // The host reaper is daemonized and never exits by itself (an orphan that exits would
        // stay a zombie where PID 1 does not reap); with no sandbox left, stop it.
        if let Err(e) = self.inner.engine.shutdown().await {
            warn!("{e}");
        }
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || -> Result<()> {
            let p = &inner.paths;
            inner
                .host
                .release_pool(&p.pool())
                .kctx(|| "unmounting the disk pool".into())?;
            let parent = inner.cfg.cgroup_parent.trim_matches('/').to_string();
            for root in &inner.cgroups {
                // Remove the parent chain bottom-up while it is empty ("kiln/abcd" then "kiln").
                let mut rel = PathBuf::from(&parent);
                loop {
                    let _ = fs::remove_dir(root.mount_point.join(&rel));
                    if !rel.pop() || rel.as_os_str().is_empty() {
                        break;
                    }
                }
            }
            // The run dir holds nothing else of value (the host reaper exits by itself once idle).
            let _ = remove_tree(&p.run_dir);
            Ok(())
        })
        .await
        .map_err(|e| SandboxError::Host(format!("destroy task: {e}")))??;
        Ok(report)
    }
}

fn parse_status(s: &str) -> RuntimeStatus {
    match s {
        "running" => RuntimeStatus::Running,
        "paused" | "pausing" => RuntimeStatus::Paused,
        _ => RuntimeStatus::Stopped,
    }
}

fn write_file(path: &Path, data: &[u8]) -> Result<()> {
    fs::write(path, data).ctx(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests;
