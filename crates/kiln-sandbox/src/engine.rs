//! [`RealEngine`]: the [`Engine`] implementation — `runc run --detach` through kilnd's host
//! reaper (so container inits are reaped by a subreaper, not the machine's PID 1), other OCI
//! runtime commands as plain child processes, and kilnd pings with the real kilnd client.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use kilnd::reaper::{ReaperClient, RunRequest};

use crate::error::{Result, SandboxError};
use crate::host::{BoxFuture, CmdOutput, Engine};

/// Environment of OCI runtime processes (nothing else is inherited).
pub const RUNTIME_ENV: &[(&str, &str)] = &[(
    "PATH",
    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
)];

/// Longest a short OCI runtime command (state, pause, delete ...) may take.
pub const COMMAND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// The real engine.
#[derive(Debug, Clone)]
pub struct RealEngine {
    reaper: ReaperClient,
}

impl RealEngine {
    /// Starts (or finds) the host reaper `kilnd host-reaper` listening on `reaper_socket`.
    pub async fn start(kilnd_path: &Path, reaper_socket: &Path) -> Result<RealEngine> {
        let reaper = ReaperClient::ensure_running(kilnd_path, reaper_socket)
            .await
            .map_err(|e| SandboxError::Host(format!("starting the host reaper: {e}")))?;
        Ok(RealEngine { reaper })
    }
}

impl Engine for RealEngine {
    fn run_detached(
        &self,
        argv: Vec<String>,
        stdio_file: PathBuf,
    ) -> BoxFuture<'_, Result<CmdOutput>> {
        Box::pin(async move {
            let op = argv.first().cloned().unwrap_or_default();
            let out = self
                .reaper
                .run(RunRequest {
                    argv,
                    env: RUNTIME_ENV
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                    cwd: None,
                    stdio_file: Some(stdio_file),
                })
                .await
                .map_err(|e| SandboxError::runtime(format!("{op} run"), e.to_string()))?;
            Ok(CmdOutput {
                status: out.exit_code.unwrap_or(128 + out.signal.unwrap_or(0)),
                stdout: out.stdout.into_bytes(),
                stderr: out.stderr.into_bytes(),
            })
        })
    }

    fn command(&self, argv: Vec<String>) -> BoxFuture<'_, Result<CmdOutput>> {
        Box::pin(async move {
            let Some((bin, args)) = argv.split_first() else {
                return Err(SandboxError::runtime("command", "empty argv"));
            };
            let child = tokio::process::Command::new(bin)
                .args(args)
                .env_clear()
                .envs(RUNTIME_ENV.iter().copied())
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .output();
            let out = tokio::time::timeout(COMMAND_TIMEOUT, child)
                .await
                .map_err(|_| {
                    SandboxError::runtime(
                        argv.join(" "),
                        format!("timed out after {COMMAND_TIMEOUT:?}"),
                    )
                })?
                .map_err(|e| SandboxError::runtime(bin.clone(), format!("cannot run: {e}")))?;
            Ok(CmdOutput {
                status: out.status.code().unwrap_or(-1),
                stdout: out.stdout,
                stderr: out.stderr,
            })
        })
    }

    fn connectable(&self, socket: &Path) -> bool {
        UnixStream::connect(socket).is_ok()
    }

    fn shutdown(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.reaper
                .shutdown()
                .await
                .map_err(|e| SandboxError::Host(format!("stopping the host reaper: {e}")))
        })
    }

    fn ping(&self, socket: PathBuf) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            kilnd::client::Client::new(socket)
                .ping()
                .await
                .map(|_| ())
                .map_err(|e| SandboxError::Daemon(e.to_string()))
        })
    }
}
