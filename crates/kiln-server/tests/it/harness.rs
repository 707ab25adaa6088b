//! Test harness: starts a real Kiln server (real runc, overlayfs, kilnd) on a loopback port
//! with its own data dir, and offers an authenticated HTTP client.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kiln_protocol::api::{CreateSandbox, ExecEvent, ExecRequest, ExitStatus, Sandbox};
use kiln_server::{Kiln, ServerConfig};
use tokio_util::sync::CancellationToken;

/// Image store with the `base` image (`make test` builds it and sets KILN_TEST_IMAGES).
pub fn images_dir() -> PathBuf {
    let dir = std::env::var_os("KILN_TEST_IMAGES")
        .map(PathBuf::from)
        .expect("KILN_TEST_IMAGES is not set: run the suite with `make test` (it builds the base image first)");
    assert!(
        dir.join("refs/base.json").is_file(),
        "no base image in {}: run `make test-image`",
        dir.display()
    );
    dir
}

/// The static kilnd (`make test` sets KILN_KILND).
pub fn kilnd() -> PathBuf {
    std::env::var_os("KILN_KILND").map(PathBuf::from).expect(
        "KILN_KILND is not set: run the suite with `make test` (it builds the static kilnd first)",
    )
}

pub fn config(data_dir: &Path) -> ServerConfig {
    let mut cfg = ServerConfig::new(data_dir.to_path_buf(), kilnd());
    cfg.listen = "127.0.0.1:0".parse().expect("addr");
    cfg.images_dir = images_dir();
    cfg.warm_pool = 0;
    cfg.max_cpus = 2.0;
    cfg.disk_pool_bytes = 8 << 30;
    cfg.defaults.memory_bytes = 256 << 20;
    cfg.defaults.disk_bytes = 512 << 20;
    cfg
}

pub struct TestServer {
    pub kiln: Arc<Kiln>,
    /// The PostgreSQL schema of this server, when the suite runs on PostgreSQL.
    pub schema: Option<kiln_store::testing::TestSchema>,
    pub url: String,
    pub http: reqwest::Client,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
    /// Set once `teardown` or `stop` ran; otherwise `Drop` (a failed test) releases everything.
    done: bool,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        // A test panicked before its teardown: stop serving and release every kernel object
        // of this data dir so one failure does not leak into the next run.
        self.shutdown.cancel();
        let rt = self.kiln.runtime.clone();
        let _ = std::thread::spawn(move || {
            if let Ok(r) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                let _ = r.block_on(rt.destroy_all());
            }
        })
        .join();
    }
}

/// Whether the suite runs on PostgreSQL (`KILN_TEST_STORE=postgres`) instead of SQLite.
pub fn on_postgres() -> bool {
    std::env::var("KILN_TEST_STORE").is_ok_and(|v| v == "postgres")
}

pub async fn start(mut cfg: ServerConfig) -> TestServer {
    let mut schema = None;
    if on_postgres() && cfg.database_url.is_none() {
        // Named after the data dir, so a restart in the same data dir finds its state.
        let name = format!("kiln_t_{}", cfg.instance_tag());
        let s = kiln_store::testing::named(&name)
            .await
            .expect("postgres schema");
        cfg.database_url = Some(s.url.clone());
        schema = Some(s);
    }
    let kiln = kiln_server::start(cfg).await.expect("server start");
    let shutdown = CancellationToken::new();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let k = kiln.clone();
    let sd = shutdown.clone();
    let task = tokio::spawn(async move {
        kiln_server::serve(k, sd, move |addr| {
            let _ = tx.send(addr);
        })
        .await
        .expect("serve");
    });
    let addr = rx.await.expect("listening");
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {}", kiln.token).parse().expect("header"),
    );
    let http = reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .expect("client");
    TestServer {
        kiln,
        schema,
        url: format!("http://{addr}"),
        http,
        shutdown,
        task: Some(task),
        done: false,
    }
}

impl TestServer {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    /// Stops serving (as SIGTERM does): sandboxes keep running.
    pub async fn stop(mut self) {
        self.done = true;
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }

    /// Removes every sandbox, stops, and releases the data dir's kernel resources.
    pub async fn teardown(self) {
        for row in self.kiln.store.list(true).await.expect("list") {
            self.kiln
                .runtime
                .remove(&row.sandbox.id)
                .await
                .expect("remove");
            self.kiln
                .store
                .delete(&row.sandbox.id)
                .await
                .expect("delete");
        }
        if let Some(s) = &self.schema {
            s.drop_schema().await;
        }
        let kiln = self.kiln.clone();
        self.stop().await;
        kiln.runtime
            .destroy_all()
            .await
            .expect("runtime destroy_all");
    }

    pub async fn create(&self, req: &CreateSandbox) -> Sandbox {
        let r = self
            .http
            .post(self.url("/v1/sandboxes"))
            .json(req)
            .send()
            .await
            .expect("send");
        assert_eq!(
            r.status(),
            201,
            "create failed: {}",
            r.text().await.unwrap_or_default()
        );
        r.json().await.expect("json")
    }

    /// Runs a command to completion: (stdout, stderr, exit status, all events).
    pub async fn exec(
        &self,
        id: &str,
        req: &ExecRequest,
    ) -> (String, String, ExitStatus, Vec<ExecEvent>) {
        let r = self
            .http
            .post(self.url(&format!("/v1/sandboxes/{id}/exec")))
            .json(req)
            .send()
            .await
            .expect("send");
        assert_eq!(
            r.status(),
            200,
            "exec failed: {}",
            r.text().await.unwrap_or_default()
        );
        let text = r.text().await.expect("body");
        let events: Vec<ExecEvent> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("event line"))
            .collect();
        let mut out = String::new();
        let mut err = String::new();
        let mut exit = None;
        for e in &events {
            match e {
                ExecEvent::Stdout { data, .. } => out.push_str(&String::from_utf8_lossy(data)),
                ExecEvent::Stderr { data, .. } => err.push_str(&String::from_utf8_lossy(data)),
                ExecEvent::Exit(st) => exit = Some(st.clone()),
                _ => {}
            }
        }
        (out, err, exit.expect("exit event"), events)
    }

    pub async fn sh(&self, id: &str, script: &str) -> (String, String, i32) {
        let (o, e, st, _) = self.exec(id, &cmd(&["sh", "-c", script])).await;
        (o, e, st.exit_code.unwrap_or(-1))
    }
}

pub fn cmd(args: &[&str]) -> ExecRequest {
    ExecRequest {
        cmd: args.iter().map(|s| s.to_string()).collect(),
        ..ExecRequest::default()
    }
}

/// Kernel objects and processes of one server instance (data dir), counted host-wide: mounts
/// under its data/run dirs, its cgroup directories, named netns and veths of its sandboxes, and
/// processes in its cgroups or naming its run dir (the host reaper).
#[derive(Debug, PartialEq, Eq, Clone)]
pub struct HostCounts {
    pub mounts: usize,
    pub cgroup_dirs: usize,
    pub netns: usize,
    pub processes: usize,
}

pub fn host_counts(cfg: &ServerConfig) -> HostCounts {
    let tag = cfg.instance_tag();
    let data = std::fs::canonicalize(&cfg.data_dir)
        .unwrap_or_else(|_| cfg.data_dir.clone())
        .display()
        .to_string();
    let run = cfg.run_dir().display().to_string();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")
        .map(|s| {
            s.lines()
                .filter(|l| l.contains(&data) || l.contains(&run))
                .count()
        })
        .unwrap_or(0);
    let mut cgroup_dirs = 0;
    if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
        for c in rd.filter_map(|e| e.ok()) {
            cgroup_dirs += walk_dirs(&c.path().join("kiln").join(&tag));
        }
    }
    let ids: Vec<String> = std::fs::read_dir(cfg.data_dir.join("sandboxes"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default();
    let netns = std::fs::read_dir("/run/netns")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| {
                    let n = e.file_name().to_string_lossy().to_string();
                    n.contains(&tag) || ids.iter().any(|id| n.contains(id.as_str()))
                })
                .count()
        })
        .unwrap_or(0);
    let cg_marker = format!("kiln/{tag}");
    let processes = std::fs::read_dir("/proc")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .bytes()
                        .all(|b| b.is_ascii_digit())
                })
                .filter(|e| {
                    let cg = std::fs::read_to_string(e.path().join("cgroup")).unwrap_or_default();
                    let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
                    cg.contains(&cg_marker) || String::from_utf8_lossy(&cmdline).contains(&run)
                })
                .count()
        })
        .unwrap_or(0);
    HostCounts {
        mounts,
        cgroup_dirs,
        netns,
        processes,
    }
}

fn walk_dirs(p: &Path) -> usize {
    match std::fs::read_dir(p) {
        Ok(rd) => {
            1 + rd
                .filter_map(|e| e.ok())
                .filter(|e| e.path().is_dir())
                .map(|e| walk_dirs(&e.path()))
                .sum::<usize>()
        }
        Err(_) => 0,
    }
}

/// Polls `f` every 50 ms until it returns true, for at most `secs`.
pub async fn eventually(secs: u64, mut f: impl AsyncFnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while tokio::time::Instant::now() < deadline {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}
