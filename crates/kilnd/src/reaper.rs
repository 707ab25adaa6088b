//! The host-side subreaper service (`kilnd host-reaper`): its wire types and its client.
//!
//! Kiln starts `runc` through this long-lived process, which has `PR_SET_CHILD_SUBREAPER` set,
//! so that every container init is reparented to it (not to the machine's PID 1, which may not
//! reap zombies) and is reaped when it exits, even across restarts of the Kiln server.
//!
//! Wire: one connection per request, frames of [`crate::frame`]: the client sends one JSON
//! [`ReaperRequest`], the reaper answers one JSON [`ReaperReply`] and closes.

use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::net::UnixStream;

use crate::frame::{self, Frame};

/// How long [`ReaperClient::ensure_running`] waits for a freshly started reaper to answer.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A command for the reaper to run.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RunRequest {
    /// argv; `argv[0]` is looked up in the `PATH` of `env` (default PATH if `env` has none).
    pub argv: Vec<String>,
    /// The complete environment of the child (nothing is inherited from the reaper), except
    /// that `PATH` defaults to [`crate::child::DEFAULT_PATH`].
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Working directory (default: the reaper's, `/`).
    #[serde(default)]
    pub cwd: Option<PathBuf>,
    /// Send the child's stdout and stderr to this file (opened append/create) instead of
    /// capturing them; needed for `runc run --detach`, whose container keeps runc's stdio.
    #[serde(default)]
    pub stdio_file: Option<PathBuf>,
}

/// How a command run by the reaper ended.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RunOutput {
    /// Exit code, when it exited.
    pub exit_code: Option<i32>,
    /// Signal number, when it was killed.
    pub signal: Option<i32>,
    /// Captured stdout (empty with `stdio_file`); lossy UTF-8, at most 8 MiB.
    pub stdout: String,
    /// Captured stderr (empty with `stdio_file`); lossy UTF-8, at most 8 MiB.
    pub stderr: String,
}

impl RunOutput {
    /// Exited with code 0.
    pub fn success(&self) -> bool {
        self.exit_code == Some(0)
    }
}

/// Client -> reaper.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ReaperRequest {
    Ping,
    Run(RunRequest),
    /// Exit now, unless children are still running (then `Error`).
    Shutdown,
}

/// Reaper -> client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum ReaperReply {
    /// Answer to `Ping`: the reaper's pid.
    Pong { pid: u32 },
    /// The command ran to completion.
    Done(RunOutput),
    /// The command could not be started (not found, bad cwd ...), or shutdown was refused.
    Error { message: String },
    /// Answer to `Shutdown`: the reaper exits after sending this.
    ShuttingDown,
}

/// What can go wrong with the host reaper.
#[derive(Debug, thiserror::Error)]
pub enum ReaperError {
    /// The reaper is unreachable: its socket is missing or refuses connections.
    #[error("cannot connect to the host reaper: {0}")]
    Connect(#[source] io::Error),
    /// The connection failed after it was established.
    #[error("host reaper connection: {0}")]
    Io(#[from] io::Error),
    /// The reaper said something that does not fit the protocol.
    #[error("host reaper protocol error: {0}")]
    Protocol(String),
    /// Starting `kilnd host-reaper` failed.
    #[error("cannot start the host reaper: {0}")]
    Spawn(#[source] io::Error),
    /// The reaper was started but did not answer in time.
    #[error("the host reaper did not come up within {0:?}")]
    NotReady(Duration),
    /// The reaper could not start the command.
    #[error("host reaper: {0}")]
    Failed(String),
}

/// Client of the host reaper. Cheap to clone; one connection per request.
#[derive(Debug, Clone)]
pub struct ReaperClient {
    socket: Arc<Path>,
    /// Set by `ensure_running`: lets `run` restart a reaper that exited while idle.
    kilnd: Option<Arc<Path>>,
}

impl ReaperClient {
    /// A client for a reaper listening on `socket` (it is not started).
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        ReaperClient {
            socket: Arc::from(socket.into()),
            kilnd: None,
        }
    }

    /// The reaper's socket.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// Returns a client of the reaper on `socket`, first starting `kilnd_path host-reaper` if
    /// the socket does not answer, and waiting until it does. The reaper runs in its own
    /// session (setsid) with stdin/stdout on `/dev/null` and stderr appended to
    /// `<socket>.log`; it stays a child of the calling process, which reaps it from a
    /// background thread when it exits. It exits by itself after ~3 s without clients and
    /// children, but only while its parent is alive: once orphaned (the caller exited) it
    /// stays up for good, since exiting would leave it a zombie under a PID 1 that may not
    /// reap. The returned client restarts it the same way if it later finds it gone.
    ///
    /// Do not call this from a process that reaps with `waitpid(-1)` (e.g. one using
    /// [`crate::child::Reaper`]).
    pub async fn ensure_running(
        kilnd_path: impl AsRef<Path>,
        socket: impl AsRef<Path>,
    ) -> Result<Self, ReaperError> {
        let client = ReaperClient {
            socket: Arc::from(socket.as_ref().to_path_buf()),
            kilnd: Some(Arc::from(kilnd_path.as_ref().to_path_buf())),
        };
        client.start_if_needed().await?;
        Ok(client)
    }

    async fn start_if_needed(&self) -> Result<(), ReaperError> {
        if self.ping().await.is_ok() {
            return Ok(());
        }
        let Some(kilnd) = self.kilnd.clone() else {
            return Err(ReaperError::Connect(io::Error::new(
                io::ErrorKind::NotFound,
                "host reaper not running",
            )));
        };
        let socket = self.socket.clone();
        let log = PathBuf::from(format!("{}.log", socket.display()));
        tokio::task::spawn_blocking(move || -> io::Result<()> {
            let stderr = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .map(Stdio::from)
                .unwrap_or_else(|_| Stdio::null());
            let mut cmd = std::process::Command::new(&*kilnd);
            cmd.arg("host-reaper")
                .arg("--listen")
                .arg(&*socket)
                .current_dir("/")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(stderr);
            // SAFETY: setsid is async-signal-safe.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::setsid() < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            let mut child = cmd.spawn()?;
            // Stay its parent and reap it when it exits (idle exit, or losing the race against
            // a concurrently started reaper): a double-forked daemon would be reparented to
            // the machine's PID 1 and, if that does not reap, end as a zombie.
            std::thread::Builder::new()
                .name("kilnd-reaper-wait".into())
                .spawn(move || {
                    let _ = child.wait();
                })?;
            Ok(())
        })
        .await
        .map_err(|e| ReaperError::Spawn(io::Error::other(e)))?
        .map_err(ReaperError::Spawn)?;

        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        let mut delay = Duration::from_millis(2);
        loop {
            if self.ping().await.is_ok() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ReaperError::NotReady(START_TIMEOUT));
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(50));
        }
    }

    async fn call(&self, req: &ReaperRequest) -> Result<ReaperReply, ReaperError> {
        let mut stream = UnixStream::connect(&*self.socket)
            .await
            .map_err(ReaperError::Connect)?;
        frame::write_json(&mut stream, req).await?;
        match frame::read_frame(&mut stream).await? {
            Some(f @ Frame::Json(_)) => f
                .parse::<ReaperReply>()
                .map_err(|e| ReaperError::Protocol(e.to_string())),
            Some(_) => Err(ReaperError::Protocol("unexpected non-JSON frame".into())),
            None => Err(ReaperError::Protocol(
                "the reaper closed the connection without a reply".into(),
            )),
        }
    }

    /// Liveness check; returns the reaper's pid.
    pub async fn ping(&self) -> Result<u32, ReaperError> {
        match self.call(&ReaperRequest::Ping).await? {
            ReaperReply::Pong { pid } => Ok(pid),
            other => Err(ReaperError::Protocol(format!("unexpected reply {other:?}"))),
        }
    }

    /// Asks the reaper to exit now. Refused (`Failed`) while it still has children (e.g.
    /// running containers), which would otherwise be orphaned. Meant for tests and tear-down:
    /// the reaper otherwise exits by itself when idle.
    pub async fn shutdown(&self) -> Result<(), ReaperError> {
        match self.call(&ReaperRequest::Shutdown).await? {
            ReaperReply::ShuttingDown => Ok(()),
            ReaperReply::Error { message } => Err(ReaperError::Failed(message)),
            other => Err(ReaperError::Protocol(format!("unexpected reply {other:?}"))),
        }
    }

    /// Runs a command to completion under the reaper. stdin is `/dev/null`.
    pub async fn run(&self, req: RunRequest) -> Result<RunOutput, ReaperError> {
        let req = ReaperRequest::Run(req);
        let reply = match self.call(&req).await {
            Err(ReaperError::Connect(e)) if self.kilnd.is_some() => {
                tracing::debug!("host reaper unreachable ({e}); restarting it");
                self.start_if_needed().await?;
                self.call(&req).await?
            }
            other => other?,
        };
        match reply {
            ReaperReply::Done(out) => Ok(out),
            ReaperReply::Error { message } => Err(ReaperError::Failed(message)),
            other => Err(ReaperError::Protocol(format!("unexpected reply {other:?}"))),
        }
    }
}
