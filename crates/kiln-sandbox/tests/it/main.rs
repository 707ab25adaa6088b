//! Integration tests of kiln-sandbox against the real machine: runc, btrfs, cgroups, netns and
//! the real (static) kilnd. They need root, the static kilnd (`$KILN_KILND`, else
//! `target/x86_64-unknown-linux-gnu/kilnd/kilnd`, as `make kilnd` builds it) and the base image
//! (`$KILN_TEST_IMAGES`, as `make test-image` builds it, or any rootfs in `$KILN_LAYER`).
//! `make test` provides all three. Not being root is a failure, not a skip.
//!
//! Every test gets its own data dir, run dir and cgroup parent, so they run in parallel.

mod egress;
mod isolation;
mod leaks;
mod lifecycle;
mod limits;
mod network;
mod reconcile;
mod runsc;
mod userns;

use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_protocol::kilnd::{ExecSpec, Reply, StreamKind};
use kiln_sandbox::{NetworkMode, Runtime, RuntimeConfig, SandboxSpec};

/// Output of a command run in a sandbox.
#[derive(Debug, Default)]
pub struct Out {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Fails the calling test when not running as root: these tests exist to exercise the kernel.
#[macro_export]
macro_rules! require_root {
    () => {
        assert!(
            $crate::is_root(),
            "kiln-sandbox integration tests need root (run them with `make test` as root)"
        );
    };
}

pub fn kilnd_path() -> PathBuf {
    let p = std::env::var("KILN_KILND")
        .or_else(|_| std::env::var("KILND"))
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../target/x86_64-unknown-linux-gnu/kilnd/kilnd")
        });
    p.canonicalize().unwrap_or_else(|_| {
        panic!(
            "static kilnd not found at {} — build it with: CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS=\"-C target-feature=+crt-static\" \
             cargo build --profile kilnd --target x86_64-unknown-linux-gnu -p kilnd, or `make kilnd` (or set KILN_KILND)",
            p.display()
        )
    })
}

/// The image layer the tests run: `$KILN_LAYER` (any rootfs), else the `debian` image (one
/// debootstrap layer) in the store at `$KILN_TEST_IMAGES` (`make test-image` builds it as the
/// bottom of every template and sets that variable).
pub fn layer() -> PathBuf {
    let p = match std::env::var_os("KILN_LAYER") {
        Some(l) => PathBuf::from(l),
        None => {
            let images = PathBuf::from(std::env::var_os("KILN_TEST_IMAGES").expect(
                "set KILN_TEST_IMAGES (an image store with `debian`, as `make test-image` builds it) \
                 or KILN_LAYER (a root filesystem)",
            ));
            let r: serde_json::Value = serde_json::from_slice(
                &std::fs::read(images.join("refs/debian.json"))
                    .expect("refs/debian.json in KILN_TEST_IMAGES"),
            )
            .expect("refs/debian.json is JSON");
            let layers = r["layers"].as_array().expect("layers");
            assert_eq!(layers.len(), 1, "debian is one layer");
            let top = layers[0].as_str().expect("digest");
            images
                .join("layers")
                .join(top.trim_start_matches("sha256:"))
                .join("rootfs")
        }
    };
    assert!(
        p.join("bin/sh").exists(),
        "image layer {} has no /bin/sh (set KILN_LAYER or KILN_TEST_IMAGES)",
        p.display()
    );
    p
}

fn rand_tag() -> String {
    let mut b = [0u8; 4];
    // SAFETY: getrandom into a local buffer.
    unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// One isolated runtime (own data dir, run dir, cgroup parent); wiped on drop.
pub struct Harness {
    pub rt: Runtime,
    pub cfg: RuntimeConfig,
    pub dir: tempfile::TempDir,
    wiped: bool,
}

impl Harness {
    pub async fn new() -> Harness {
        Self::with(|_| {}).await
    }

    pub async fn with(tweak: impl FnOnce(&mut RuntimeConfig)) -> Harness {
        let dir = tempfile::Builder::new()
            .prefix("kiln-it-")
            .tempdir_in("/var/tmp")
            .expect("tempdir");
        // Sandboxes run in a user namespace; their mapped root must reach the data dir.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o711),
        )
        .expect("chmod");
        let tag = rand_tag();
        let mut cfg = RuntimeConfig::new(dir.path().join("data"), kilnd_path());
        cfg.run_dir = PathBuf::from(format!("/run/kiln-it-{tag}"));
        cfg.cgroup_parent = format!("kiln-it/{tag}");
        cfg.disk_pool_bytes = 4 << 30;
        tweak(&mut cfg);
        let rt = Runtime::new(cfg.clone()).await.expect("Runtime::new");
        Harness {
            rt,
            cfg,
            dir,
            wiped: false,
        }
    }

    pub fn spec(&self, id: &str) -> SandboxSpec {
        let mut s = SandboxSpec::new(id, vec![layer()]);
        s.memory_bytes = 256 << 20;
        s.disk_bytes = 256 << 20;
        s.cpus = 1.0;
        s
    }

    pub fn full(&self, id: &str) -> SandboxSpec {
        let mut s = self.spec(id);
        s.network = NetworkMode::Full;
        s
    }

    /// Host path of a cgroup file of sandbox `id` in hierarchy `hier` (e.g. `memory`).
    pub fn cgroup_file(&self, hier: &str, id: &str, file: &str) -> PathBuf {
        Path::new("/sys/fs/cgroup")
            .join(hier)
            .join(&self.cfg.cgroup_parent)
            .join(id)
            .join(file)
    }

    pub async fn wipe(mut self) {
        self.wiped = true;
        self.rt.destroy_all().await.expect("destroy_all");
        let _ = std::fs::remove_dir_all(&self.cfg.run_dir);
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if self.wiped {
            return;
        }
        // A test failed before wiping: clean up from a fresh thread + runtime (we may be inside
        // the test's async context).
        let rt = self.rt.clone();
        let run_dir = self.cfg.run_dir.clone();
        let _ = std::thread::spawn(move || {
            if let Ok(r) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                let _ = r.block_on(rt.destroy_all());
            }
            let _ = std::fs::remove_dir_all(run_dir);
        })
        .join();
    }
}

/// Runs `script` with `/bin/sh -c` in sandbox `id` through kilnd.
pub async fn sh(rt: &Runtime, id: &str, script: &str) -> Out {
    run(rt, id, &["/bin/sh", "-c", script]).await
}

pub async fn run(rt: &Runtime, id: &str, argv: &[&str]) -> Out {
    let spec = ExecSpec {
        cmd: argv.iter().map(|s| s.to_string()).collect(),
        timeout_secs: Some(60.0),
        ..Default::default()
    };
    let mut stream = rt
        .client(id)
        .exec(spec)
        .await
        .unwrap_or_else(|e| panic!("exec {argv:?} in {id}: {e}"));
    let mut out = Out::default();
    let mut so = Vec::new();
    let mut se = Vec::new();
    while let Some(r) = stream.next().await {
        match r.unwrap_or_else(|e| panic!("exec stream of {argv:?}: {e}")) {
            Reply::Output {
                stream: StreamKind::Stdout,
                data,
                ..
            } => so.extend(data),
            Reply::Output {
                stream: StreamKind::Stderr,
                data,
                ..
            } => se.extend(data),
            Reply::Exited(st) => {
                out.code = st.exit_code;
                out.signal = st.signal;
                break;
            }
            _ => {}
        }
    }
    out.stdout = String::from_utf8_lossy(&so).into_owned();
    out.stderr = String::from_utf8_lossy(&se).into_owned();
    out
}

/// Polls `f` until it returns true or `timeout` passes.
pub async fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = std::time::Instant::now();
    loop {
        if f() {
            return true;
        }
        if start.elapsed() > timeout {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls the async `f` until it yields `Some` or `timeout` passes (a hang guard).
pub async fn eventually_value<T, F, Fut>(timeout: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = std::time::Instant::now();
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if start.elapsed() > timeout {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
