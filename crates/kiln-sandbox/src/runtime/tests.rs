//! Unit tests of [`Runtime`]'s plan (order of operations, rollback, reconcile) with recording
//! fakes of [`Host`] and [`Engine`]; no root needed.

use std::collections::BTreeMap;
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use kiln_protocol::api::NetworkMode;

use super::*;
use crate::host::{
    BoxFuture, CgroupRoot, CmdOutput, Engine, Host, MountEntry, PoolInfo, VethConfig,
};

#[derive(Default)]
struct FakeHost {
    calls: Mutex<Vec<String>>,
    mounts: Mutex<Vec<PathBuf>>,
    cgroup_base: PathBuf,
    fail_mount: Mutex<bool>,
}

impl FakeHost {
    fn log(&self, s: String) {
        self.calls.lock().unwrap_or_else(|p| p.into_inner()).push(s);
    }
    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    fn clear(&self) {
        self.calls.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

impl Host for FakeHost {
    fn mount_overlay(
        &self,
        lower: &[PathBuf],
        upper: &Path,
        _work: &Path,
        target: &Path,
    ) -> io::Result<()> {
        self.log(format!(
            "mount_overlay {} <- {} (+{})",
            target.display(),
            upper.display(),
            lower.len()
        ));
        if *self.fail_mount.lock().unwrap_or_else(|p| p.into_inner()) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        self.mounts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(target.to_path_buf());
        Ok(())
    }
    fn mount_tmpfs(&self, target: &Path, _options: &str) -> io::Result<()> {
        self.log(format!("mount_tmpfs {}", target.display()));
        self.mounts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(target.to_path_buf());
        Ok(())
    }
    fn unmount(&self, target: &Path) -> io::Result<()> {
        let mut m = self.mounts.lock().unwrap_or_else(|p| p.into_inner());
        if m.iter().any(|p| p == target) {
            self.log(format!("unmount {}", target.display()));
            m.retain(|p| p != target);
        }
        Ok(())
    }
    fn mounts(&self) -> io::Result<Vec<MountEntry>> {
        Ok(self
            .mounts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|p| MountEntry {
                mount_point: p.clone(),
                fs_type: "overlay".into(),
                source: "overlay".into(),
                super_options: String::new(),
            })
            .collect())
    }
    fn prepare_pool(&self, _image: &Path, _bytes: u64, mount_point: &Path) -> Result<PoolInfo> {
        fs::create_dir_all(mount_point).map_err(|e| SandboxError::io("pool", e))?;
        Ok(PoolInfo {
            mount_point: mount_point.into(),
            device: "/dev/loop-fake".into(),
            created: true,
        })
    }
    fn release_pool(&self, _mount_point: &Path) -> io::Result<()> {
        Ok(())
    }
    fn create_volume(&self, pool: &Path, name: &str, limit_bytes: u64) -> io::Result<u64> {
        self.log(format!("create_volume {name} {limit_bytes}"));
        fs::create_dir(pool.join(name))?;
        Ok(300)
    }
    fn delete_volume(&self, pool: &Path, name: &str) -> io::Result<()> {
        if pool.join(name).exists() {
            self.log(format!("delete_volume {name}"));
        }
        remove_tree(&pool.join(name))
    }
    fn cgroup_roots(&self) -> io::Result<Vec<CgroupRoot>> {
        Ok(vec![
            CgroupRoot {
                mount_point: self.cgroup_base.join("memory"),
                unified: false,
                controllers: vec!["memory".into()],
            },
            CgroupRoot {
                mount_point: self.cgroup_base.join("unified"),
                unified: true,
                controllers: vec![],
            },
        ])
    }
    fn kill_init(&self, pid: u32, cgroup_rel: &str, _timeout: Duration) -> io::Result<bool> {
        self.log(format!("kill_init {pid} {cgroup_rel}"));
        Ok(true)
    }
    fn destroy_cgroup(&self, dir: &Path, _root: &CgroupRoot) -> io::Result<()> {
        if dir.exists() {
            self.log(format!("destroy_cgroup {}", dir.display()));
        }
        remove_tree(dir)
    }
    fn ensure_bridge(&self, bridge: &str, gateway: Ipv4Addr, prefix: u8) -> Result<()> {
        self.log(format!("ensure_bridge {bridge} {gateway}/{prefix}"));
        Ok(())
    }
    fn ensure_nat(&self, bridge: &str, subnet: &str) -> Result<()> {
        self.log(format!("ensure_nat {bridge} {subnet}"));
        Ok(())
    }
    fn create_netns(&self, path: &Path, veth: Option<&VethConfig>) -> io::Result<()> {
        let v = veth
            .map(|v| {
                format!(
                    " {} {}/{} gw {}",
                    v.host_name, v.address, v.prefix, v.gateway
                )
            })
            .unwrap_or_default();
        self.log(format!(
            "create_netns {}{v}",
            path.file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default()
        ));
        fs::write(path, b"")
    }
    fn attach_veth(&self, pid: u32, v: &VethConfig) -> io::Result<()> {
        self.log(format!(
            "attach_veth pid={pid} {} {}/{} gw {}",
            v.host_name, v.address, v.prefix, v.gateway
        ));
        Ok(())
    }
    fn delete_netns(&self, path: &Path) -> io::Result<()> {
        if path.exists() {
            self.log(format!(
                "delete_netns {}",
                path.file_name()
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or_default()
            ));
        }
        match fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
    fn nft(&self, script: &str) -> io::Result<()> {
        self.log(format!("nft {}", script.lines().count()));
        Ok(())
    }
    fn delete_link(&self, name: &str) -> io::Result<()> {
        self.log(format!("delete_link {name}"));
        Ok(())
    }
    fn bridge_ports(&self, _bridge: &str) -> io::Result<Vec<String>> {
        Ok(vec![])
    }
}

/// Fake OCI runtime: remembers containers and their status; "runs" kilnd by writing our own
/// pid (alive) or a dead pid to the pid file.
#[derive(Default)]
struct FakeEngine {
    calls: Mutex<Vec<Vec<String>>>,
    containers: Mutex<BTreeMap<String, &'static str>>,
    runc_root: Mutex<PathBuf>,
    fail_run: Mutex<bool>,
    kilnd_dies: Mutex<bool>,
}

fn flag(m: &Mutex<bool>) -> bool {
    *m.lock().unwrap_or_else(|p| p.into_inner())
}

fn arg_after(argv: &[String], flag: &str) -> Option<String> {
    argv.iter()
        .position(|a| a == flag)
        .and_then(|i| argv.get(i + 1).cloned())
}

impl Engine for FakeEngine {
    fn run_detached(
        &self,
        argv: Vec<String>,
        stdio_file: PathBuf,
    ) -> BoxFuture<'_, Result<CmdOutput>> {
        Box::pin(async move {
            self.calls
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(argv.clone());
            let id = argv.last().cloned().unwrap_or_default();
            fs::write(&stdio_file, b"kilnd: starting\nkilnd: something broke\n")
                .map_err(|e| SandboxError::io("log", e))?;
            if flag(&self.fail_run) {
                let log = arg_after(&argv, "--log").unwrap_or_default();
                fs::write(
                    log,
                    "{\"level\":\"error\",\"msg\":\"runc run failed: bad mount\"}\n",
                )
                .map_err(|e| SandboxError::io("log", e))?;
                return Ok(CmdOutput {
                    status: 1,
                    ..Default::default()
                });
            }
            let root = self
                .runc_root
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .join(&id);
            fs::create_dir_all(root).map_err(|e| SandboxError::io("state", e))?;
            let pid = if flag(&self.kilnd_dies) {
                0x3fff_fff0
            } else {
                std::process::id()
            };
            fs::write(
                arg_after(&argv, "--pid-file").unwrap_or_default(),
                pid.to_string(),
            )
            .map_err(|e| SandboxError::io("pid", e))?;
            self.containers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id, "running");
            Ok(CmdOutput::default())
        })
    }

    fn command(&self, argv: Vec<String>) -> BoxFuture<'_, Result<CmdOutput>> {
        Box::pin(async move {
            self.calls
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(argv.clone());
            let mut c = self.containers.lock().unwrap_or_else(|p| p.into_inner());
            let ops: Vec<&str> = argv.iter().skip(3).map(String::as_str).collect();
            let missing = || CmdOutput {
                status: 1,
                stderr: b"container does not exist".to_vec(),
                ..Default::default()
            };
            Ok(match ops.as_slice() {
                ["list", "--format", "json"] => {
                    let v: Vec<serde_json::Value> = c
                        .iter()
                        .map(|(id, st)| serde_json::json!({"id": id, "status": st}))
                        .collect();
                    CmdOutput {
                        stdout: serde_json::to_vec(&v).unwrap_or_default(),
                        ..Default::default()
                    }
                }
                ["delete", "--force", id] => {
                    let root = self
                        .runc_root
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .join(id);
                    let _ = fs::remove_dir_all(root);
                    if c.remove(*id).is_some() {
                        CmdOutput::default()
                    } else {
                        missing()
                    }
                }
                ["pause", id] | ["resume", id] | ["state", id] => match c.get_mut(*id) {
                    Some(st) => {
                        if ops[0] == "pause" {
                            *st = "paused";
                        } else if ops[0] == "resume" {
                            *st = "running";
                        }
                        let out = serde_json::json!({"id": id, "status": *st});
                        CmdOutput {
                            stdout: serde_json::to_vec(&out).unwrap_or_default(),
                            ..Default::default()
                        }
                    }
                    None => missing(),
                },
                _ => CmdOutput {
                    status: 2,
                    stderr: b"unknown".to_vec(),
                    ..Default::default()
                },
            })
        })
    }

    fn connectable(&self, _socket: &Path) -> bool {
        !flag(&self.kilnd_dies)
    }

    fn ping(&self, _socket: PathBuf) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move { Ok(()) })
    }
}

struct Env {
    _dir: tempfile::TempDir,
    root: PathBuf,
    host: Arc<FakeHost>,
    engine: Arc<FakeEngine>,
    rt: Runtime,
}

async fn env() -> Env {
    env_with(|_| {}).await
}

async fn env_with(tweak: impl FnOnce(&mut RuntimeConfig)) -> Env {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().to_path_buf();
    let kilnd = root.join("kilnd");
    fs::write(&kilnd, b"#!").expect("kilnd");
    let mut cfg = RuntimeConfig::new(root.join("data"), &kilnd);
    cfg.run_dir = root.join("run");
    cfg.subnet = "10.77.0.0/24".into();
    tweak(&mut cfg);
    let host = Arc::new(FakeHost {
        cgroup_base: root.join("cg"),
        ..Default::default()
    });
    let engine = Arc::new(FakeEngine::default());
    *engine.runc_root.lock().unwrap_or_else(|p| p.into_inner()) = root.join("run/.runc");
    let rt = Runtime::with_parts(cfg, host.clone(), engine.clone(), &root.join("leases"))
        .await
        .expect("runtime");
    host.clear();
    Env {
        _dir: dir,
        root,
        host,
        engine,
        rt,
    }
}

fn spec(e: &Env, id: &str, network: NetworkMode) -> SandboxSpec {
    let layer = e.root.join("layer");
    fs::create_dir_all(&layer).expect("layer");
    let mut s = SandboxSpec::new(id, vec![layer]);
    s.network = network;
    s.disk_bytes = 64 << 20;
    s
}

#[tokio::test]
async fn create_prepares_everything_in_order_and_remove_undoes_it() {
    // Without a user namespace, a `full` sandbox joins a netns the host pinned beforehand.
    let e = env_with(|c| c.userns = None).await;
    let created =
        e.rt.create(&spec(&e, "sb-a", NetworkMode::Full))
            .await
            .expect("create");
    assert_eq!(created.init_pid, std::process::id());
    let ip: Ipv4Addr = created.ip.clone().expect("ip").parse().expect("ipv4");
    assert!(
        u32::from(ip) > u32::from(Ipv4Addr::new(10, 77, 0, 1))
            && u32::from(ip) < u32::from(Ipv4Addr::new(10, 77, 0, 255))
    );

    let calls = e.host.calls();
    let veth = veth_name(&e.root.join("run"), "sb-a");
    assert_eq!(
        calls[0],
        format!("mount_tmpfs {}", e.root.join("run/sb-a").display())
    );
    assert_eq!(calls[1], "create_volume sb-a 67108864");
    assert_eq!(
        calls[2],
        format!("create_netns sb-a {veth} {ip}/24 gw 10.77.0.1")
    );
    assert!(
        calls[3].starts_with("mount_overlay ") && calls[3].contains("sandboxes/sb-a/rootfs"),
        "{calls:?}"
    );
    assert_eq!(calls.len(), 4, "{calls:?}");

    // The runtime was started through run_detached with our root, log and pid file.
    let run = e.engine.calls.lock().unwrap_or_else(|p| p.into_inner())[0].clone();
    assert_eq!(run[1], "--root");
    assert!(run.contains(&"--detach".to_string()) && run.contains(&"json".to_string()));
    // Without it, ~200 sandboxes under one mapped uid exhaust the kernel's per-uid key quota.
    assert!(run.contains(&"--no-new-keyring".to_string()), "{run:?}");
    assert_eq!(run.last().map(String::as_str), Some("sb-a"));

    // Bundle contents.
    let bundle = e.root.join("data/sandboxes/sb-a");
    let cfg: serde_json::Value =
        serde_json::from_slice(&fs::read(bundle.join("config.json")).expect("config"))
            .expect("json");
    assert_eq!(
        cfg["linux"]["cgroupsPath"],
        format!("/{}/sb-a", e.rt.config().cgroup_parent)
    );
    let netns = cfg["linux"]["namespaces"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n["type"] == "network")
        .cloned();
    assert_eq!(
        netns.map(|n| n["path"].clone()),
        Some(serde_json::json!(e.root.join("run/.netns/sb-a")))
    );
    let etc = e.root.join("data/disk/sb-a/etc");
    assert!(fs::read_to_string(etc.join("hosts"))
        .expect("hosts")
        .contains(&format!("{ip}\tsb-a")));
    assert_eq!(
        fs::read_to_string(etc.join("hostname")).expect("hostname"),
        "sb-a\n"
    );
    let lease = e.root.join("leases/kiln0").join(ip.to_string());
    assert!(lease.exists());
    assert_eq!(
        e.rt.status("sb-a").await.expect("status"),
        RuntimeStatus::Running
    );

    e.rt.pause("sb-a").await.expect("pause");
    assert_eq!(
        e.rt.status("sb-a").await.expect("status"),
        RuntimeStatus::Paused
    );
    e.rt.resume("sb-a").await.expect("resume");

    e.host.clear();
    e.rt.remove("sb-a").await.expect("remove");
    let calls = e.host.calls();
    assert_eq!(
        calls,
        vec![
            format!(
                "kill_init {} /{}/sb-a",
                std::process::id(),
                e.rt.config().cgroup_parent
            ),
            format!("unmount {}", bundle.join("rootfs").display()),
            "delete_netns sb-a".to_string(),
            "delete_volume sb-a".to_string(),
            format!("unmount {}", e.root.join("run/sb-a").display()),
        ]
    );
    assert!(!bundle.exists());
    assert!(!lease.exists());
    assert!(!e.root.join("run/sb-a").exists());
    assert_eq!(
        e.rt.status("sb-a").await.expect("status"),
        RuntimeStatus::Missing
    );
    // Idempotent.
    e.rt.remove("sb-a").await.expect("second remove");
    e.rt.remove("never-existed").await.expect("remove unknown");
    assert!(matches!(
        e.rt.pause("sb-a").await,
        Err(SandboxError::NotFound(_))
    ));
}

#[tokio::test]
async fn duplicate_ids_and_bad_specs_are_refused() {
    let e = env().await;
    e.rt.create(&spec(&e, "sb-b", NetworkMode::None))
        .await
        .expect("create");
    assert!(matches!(
        e.rt.create(&spec(&e, "sb-b", NetworkMode::None)).await,
        Err(SandboxError::AlreadyExists(_))
    ));
    let mut bad = spec(&e, "sb-c", NetworkMode::None);
    bad.layers = vec![e.root.join("no-such-layer")];
    assert!(matches!(
        e.rt.create(&bad).await,
        Err(SandboxError::InvalidSpec(_))
    ));
    assert!(!e.root.join("data/sandboxes/sb-c").exists());
    assert!(matches!(
        e.rt.create(&spec(&e, "Bad/Id", NetworkMode::None)).await,
        Err(SandboxError::InvalidSpec(_))
    ));
    // `none` networking: no netns of ours, no lease.
    assert!(!e.root.join("run/.netns/sb-b").exists());
    assert_eq!(
        fs::read_dir(e.root.join("leases/kiln0"))
            .map(|d| d.count())
            .unwrap_or(0),
        0
    );
}

#[tokio::test]
async fn failed_runtime_start_rolls_back_and_reports_runc_errors() {
    let e = env().await;
    *e.engine.fail_run.lock().unwrap_or_else(|p| p.into_inner()) = true;
    let err =
        e.rt.create(&spec(&e, "sb-f", NetworkMode::Full))
            .await
            .expect_err("must fail");
    let msg = err.to_string();
    assert!(msg.contains("bad mount"), "{msg}");
    assert!(!e.root.join("data/sandboxes/sb-f").exists());
    assert!(!e.root.join("data/disk/sb-f").exists());
    assert!(!e.root.join("run/.netns/sb-f").exists());
    assert!(e.host.mounts().expect("mounts").is_empty());
    assert_eq!(
        fs::read_dir(e.root.join("leases/kiln0"))
            .map(|d| d.count())
            .unwrap_or(0),
        0
    );
}

#[tokio::test]
async fn with_a_user_namespace_the_veth_is_attached_to_the_runtime_created_netns() {
    let e = env().await;
    assert!(e.rt.config().userns.is_some(), "on by default");
    let created =
        e.rt.create(&spec(&e, "sb-u", NetworkMode::Full))
            .await
            .expect("create");
    let ip = created.ip.clone().expect("ip");
    let veth = veth_name(&e.root.join("run"), "sb-u");
    let calls = e.host.calls();
    // No host-made netns; the veth goes into the namespace of the container's init, after
    // the runtime started it.
    assert!(
        !calls.iter().any(|c| c.starts_with("create_netns")),
        "{calls:?}"
    );
    assert_eq!(
        calls.last().cloned(),
        Some(format!(
            "attach_veth pid={} {veth} {ip}/24 gw 10.77.0.1",
            created.init_pid
        ))
    );
    let bundle = e.root.join("data/sandboxes/sb-u");
    let cfg: serde_json::Value =
        serde_json::from_slice(&fs::read(bundle.join("config.json")).expect("config"))
            .expect("json");
    let types: Vec<(String, bool)> = cfg["linux"]["namespaces"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|n| {
            (
                n["type"].as_str().unwrap_or_default().to_string(),
                n.get("path").is_some_and(|p| !p.is_null()),
            )
        })
        .collect();
    assert!(types.contains(&("network".into(), false)), "{types:?}");
    assert!(types.contains(&("user".into(), false)), "{types:?}");

    e.host.clear();
    e.rt.remove("sb-u").await.expect("remove");
    let calls = e.host.calls();
    assert!(calls.contains(&format!("delete_link {veth}")), "{calls:?}");
    assert!(!calls.iter().any(|c| c.contains("netns")), "{calls:?}");
}

#[tokio::test]
async fn failed_mount_rolls_back() {
    let e = env().await;
    *e.host.fail_mount.lock().unwrap_or_else(|p| p.into_inner()) = true;
    let err =
        e.rt.create(&spec(&e, "sb-m", NetworkMode::Full))
            .await
            .expect_err("must fail");
    assert!(matches!(err, SandboxError::Kernel { .. }), "{err}");
    let calls = e.host.calls();
    assert!(
        calls.contains(&"delete_volume sb-m".to_string()),
        "{calls:?}"
    );
    let veth = veth_name(&e.root.join("run"), "sb-m");
    assert!(calls.contains(&format!("delete_link {veth}")), "{calls:?}");
    assert!(!e.root.join("data/sandboxes/sb-m").exists());
    assert!(
        e.engine
            .calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty(),
        "runc must not run"
    );
}

#[tokio::test]
async fn dead_kilnd_fails_fast_with_its_log() {
    let e = env().await;
    *e.engine
        .kilnd_dies
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = true;
    let t = Instant::now();
    let err =
        e.rt.create(&spec(&e, "sb-d", NetworkMode::None))
            .await
            .expect_err("must fail");
    assert!(t.elapsed() < Duration::from_secs(2));
    match err {
        SandboxError::DaemonTimeout { log_tail, .. } => {
            assert!(log_tail.contains("something broke"), "{log_tail}")
        }
        other => panic!("unexpected {other}"),
    }
    assert!(!e.root.join("data/sandboxes/sb-d").exists());
    assert!(
        e.engine
            .containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty(),
        "runc delete must run"
    );
}

#[tokio::test]
async fn reconcile_removes_unknown_artefacts_and_reports_dead_ones() {
    let e = env().await;
    e.rt.create(&spec(&e, "keep", NetworkMode::Full))
        .await
        .expect("create");
    e.rt.create(&spec(&e, "leaked", NetworkMode::Full))
        .await
        .expect("create");
    e.rt.create(&spec(&e, "gone", NetworkMode::None))
        .await
        .expect("create");
    // "gone" died: the runtime forgot it but its files remain.
    e.engine
        .containers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove("gone");
    // Stray artefacts of ids nobody knows.
    let parent = e.rt.config().cgroup_parent.clone();
    fs::create_dir_all(e.root.join("cg/memory").join(&parent).join("orphan-cg")).expect("cg");
    fs::create_dir_all(e.root.join("data/disk/orphan-vol")).expect("vol");
    fs::write(e.root.join("run/.netns/orphan-ns"), b"").expect("ns");
    fs::write(
        e.root.join("leases/kiln0/10.77.0.200"),
        format!("{}\norphan-lease\n", e.root.join("run").display()),
    )
    .expect("lease");
    fs::write(
        e.root.join("leases/kiln0/10.77.0.201"),
        "/some/other/server\nother\n",
    )
    .expect("lease");

    let report =
        e.rt.reconcile(&["keep".to_string(), "gone".to_string()])
            .await
            .expect("reconcile");
    let mut removed = report.removed.clone();
    removed.sort();
    assert_eq!(
        removed,
        [
            "leaked",
            "orphan-cg",
            "orphan-lease",
            "orphan-ns",
            "orphan-vol"
        ]
    );
    assert_eq!(report.dead, ["gone"]);
    assert!(e.root.join("data/sandboxes/keep").exists());
    assert!(!e.root.join("data/sandboxes/leaked").exists());
    assert!(!e
        .root
        .join("cg/memory")
        .join(&parent)
        .join("orphan-cg")
        .exists());
    assert!(!e.root.join("data/disk/orphan-vol").exists());
    assert!(!e.root.join("run/.netns/orphan-ns").exists());
    assert!(!e.root.join("leases/kiln0/10.77.0.200").exists());
    assert!(
        e.root.join("leases/kiln0/10.77.0.201").exists(),
        "other servers' leases are not ours"
    );
    assert_eq!(
        e.rt.status("keep").await.expect("status"),
        RuntimeStatus::Running
    );
    assert_eq!(
        e.rt.status("gone").await.expect("status"),
        RuntimeStatus::Stopped
    );
}

#[tokio::test]
async fn addresses_are_unique_and_reused_after_remove() {
    let e = env().await;
    let mut ips = Vec::new();
    for i in 0..20 {
        let c =
            e.rt.create(&spec(&e, &format!("n{i}"), NetworkMode::Full))
                .await
                .expect("create");
        ips.push(c.ip.expect("ip"));
    }
    let mut dedup = ips.clone();
    dedup.sort();
    dedup.dedup();
    assert_eq!(dedup.len(), ips.len());
    assert!(!ips.contains(&"10.77.0.1".to_string()) && !ips.contains(&"10.77.0.0".to_string()));
    e.rt.remove("n3").await.expect("remove");
    let again =
        e.rt.create(&spec(&e, "n3", NetworkMode::Full))
            .await
            .expect("create");
    assert_eq!(
        again.ip.as_deref(),
        Some(ips[3].as_str()),
        "deterministic for a free address"
    );
}
