//! Test harness: starts `kilnd serve` on a temp socket and tears it down (SIGTERM, so the
//! daemon terminates its children) when dropped.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kiln_protocol::kilnd::{ExecSpec, ExitStatus, Reply, StreamKind};
use kilnd::client::ReplyStream;
use kilnd::{Client, ClientError};

/// Upper bound for anything a test waits for (a hang guard, not a timing assertion).
pub const LIMIT: Duration = Duration::from_secs(60);

pub fn kilnd_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_kilnd"))
}

pub async fn within<F: Future>(f: F) -> F::Output {
    match tokio::time::timeout(LIMIT, f).await {
        Ok(v) => v,
        Err(_) => panic!("test step did not finish within {LIMIT:?}"),
    }
}

pub struct Daemon {
    child: Child,
    pub dir: tempfile::TempDir,
    pub client: Client,
}

impl Daemon {
    pub async fn start() -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("run/kilnd.sock");
        let child = Command::new(kilnd_bin())
            .arg("serve")
            .arg("--listen")
            .arg(&sock)
            .args(["--log-level", "warn"])
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn kilnd");
        let client = Client::new(&sock);
        let mut d = Daemon { child, dir, client };
        within(async {
            loop {
                match d.client.ping().await {
                    Ok(_) => break,
                    Err(ClientError::Connect(_)) => {
                        tokio::time::sleep(Duration::from_millis(5)).await
                    }
                    Err(e) => panic!("ping: {e}"),
                }
                if let Ok(Some(st)) = d.child.try_wait() {
                    panic!("kilnd exited early: {st}");
                }
            }
        })
        .await;
        d
    }

    /// A scratch directory for file tests.
    pub fn scratch(&self) -> PathBuf {
        let p = self.dir.path().join("scratch");
        std::fs::create_dir_all(&p).expect("mkdir scratch");
        p
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: plain kill(2) of our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        for _ in 0..500 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Everything a process printed, in seq order, and how it ended.
#[derive(Debug, Default)]
pub struct Collected {
    pub chunks: Vec<(u64, StreamKind, Vec<u8>)>,
    pub gaps: Vec<(u64, u64)>,
    pub exit: Option<ExitStatus>,
}

impl Collected {
    pub fn text(&self, which: StreamKind) -> String {
        let bytes: Vec<u8> = self
            .chunks
            .iter()
            .filter(|c| c.1 == which)
            .flat_map(|c| c.2.iter().copied())
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
    pub fn stdout(&self) -> String {
        self.text(StreamKind::Stdout)
    }
    pub fn stderr(&self) -> String {
        self.text(StreamKind::Stderr)
    }
}

/// Drains a reply stream (exec or attach) to its end.
pub async fn collect(s: &mut ReplyStream) -> Collected {
    let mut c = Collected::default();
    within(async {
        while let Some(r) = s.next().await {
            match r.expect("reply") {
                Reply::Output { seq, stream, data } => c.chunks.push((seq, stream, data)),
                Reply::Gap { from, to } => c.gaps.push((from, to)),
                Reply::Exited(st) => c.exit = Some(st),
                other => panic!("unexpected reply {other:?}"),
            }
        }
    })
    .await;
    c
}

/// Runs `spec` to completion.
pub async fn run(client: &Client, spec: ExecSpec) -> Result<Collected, ClientError> {
    let stream = client.exec(spec).await?;
    let (mut replies, _stdin) = stream.into_split();
    Ok(collect(&mut replies).await)
}

pub fn cmd(args: &[&str]) -> ExecSpec {
    ExecSpec {
        cmd: args.iter().map(|a| a.to_string()).collect(),
        ..Default::default()
    }
}

/// Waits until `pid` no longer exists (not even as a zombie).
pub async fn wait_gone(pid: u32) {
    let stat = format!("/proc/{pid}/stat");
    within(async {
        loop {
            // Running or zombie: both mean "not reaped yet".
            if std::fs::metadata(&stat).is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// Replaces the temp dir in `s` by `$T`.
pub fn redact(s: &str, dir: &Path) -> String {
    s.replace(&dir.display().to_string(), "$T")
}
