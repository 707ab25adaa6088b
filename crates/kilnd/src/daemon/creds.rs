//! Git credentials that never touch the sandbox's disk or environment: for an exec with
//! `credentials: true`, kilnd opens a one-off socket that only the process's user can reach,
//! points git at `kilnd credential` as its only credential helper (through `GIT_CONFIG_*`
//! variables, which also switch off any helper configured in the sandbox, such as `store`),
//! and relays each `get` to the host client on the exec connection. The answer goes straight
//! back to git's helper process; kilnd keeps nothing.

use std::collections::BTreeMap;
use std::io::{self, BufRead, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use kiln_protocol::kilnd::{DaemonError, DaemonErrorCode};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot};

use super::files::err;

/// Environment variable naming the relay socket (read by `kilnd credential`).
pub const SOCKET_ENV: &str = "KILN_CREDENTIAL_SOCKET";

/// How long a helper waits for the host's answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// One line each way on the relay socket.
#[derive(Debug, Serialize, Deserialize)]
struct Line {
    fields: Option<BTreeMap<String, String>>,
}

/// A request waiting for the client: its fields and where the answer goes.
pub struct Pending {
    pub fields: BTreeMap<String, String>,
    pub answer: oneshot::Sender<Option<BTreeMap<String, String>>>,
}

/// A relay socket for one process; removed when dropped.
pub struct Relay {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

static NEXT: AtomicU64 = AtomicU64::new(1);

impl Relay {
    /// Creates the socket in `dir` owned by `uid:gid` (mode 0600), adds the git settings to
    /// `env`, and forwards each request to `tx`.
    pub fn start(
        dir: &Path,
        uid: u32,
        gid: u32,
        env: &mut BTreeMap<String, String>,
        tx: mpsc::Sender<Pending>,
    ) -> Result<Relay, DaemonError> {
        let fail = |what: &str, e: io::Error| {
            err(
                DaemonErrorCode::Internal,
                format!("credential relay: {what}: {e}"),
            )
        };
        let mut rnd = [0u8; 8];
        // SAFETY: getrandom into a local buffer.
        unsafe { libc::getrandom(rnd.as_mut_ptr().cast(), rnd.len(), 0) };
        let name = format!(
            "cred-{}-{}.sock",
            NEXT.fetch_add(1, Ordering::Relaxed),
            rnd.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
        let path = dir.join(name);
        // SAFETY: umask has no failure mode; restored right after the bind.
        let old = unsafe { libc::umask(0o177) };
        let listener = UnixListener::bind(&path);
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        let listener = listener.map_err(|e| fail("bind", e))?;
        std::os::unix::fs::chown(&path, Some(uid), Some(gid)).map_err(|e| fail("chown", e))?;
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
        let exe = std::env::current_exe()
            .map_err(|e| fail("own path", e))?
            .to_string_lossy()
            .into_owned();
        env.insert(SOCKET_ENV.into(), path.to_string_lossy().into_owned());
        env.insert("GIT_TERMINAL_PROMPT".into(), "0".into());
        // An empty helper resets the list, so no helper configured in the sandbox runs.
        env.insert("GIT_CONFIG_COUNT".into(), "2".into());
        env.insert("GIT_CONFIG_KEY_0".into(), "credential.helper".into());
        env.insert("GIT_CONFIG_VALUE_0".into(), String::new());
        env.insert("GIT_CONFIG_KEY_1".into(), "credential.helper".into());
        env.insert("GIT_CONFIG_VALUE_1".into(), format!("!'{exe}' credential"));
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let _ = serve_helper(conn, tx).await;
                });
            }
        });
        Ok(Relay { path, task })
    }
}

async fn serve_helper(conn: tokio::net::UnixStream, tx: mpsc::Sender<Pending>) -> io::Result<()> {
    let (r, mut w) = conn.into_split();
    let mut line = String::new();
    tokio::io::BufReader::new(r.take_limit())
        .read_line(&mut line)
        .await?;
    let req: Line = serde_json::from_str(&line).map_err(io::Error::other)?;
    let (answer, rx) = oneshot::channel();
    let fields = req.fields.unwrap_or_default();
    tx.send(Pending { fields, answer })
        .await
        .map_err(|_| io::Error::other("the client is gone"))?;
    let fields = match tokio::time::timeout(ANSWER_TIMEOUT, rx).await {
        Ok(Ok(f)) => f,
        _ => None,
    };
    let mut out = serde_json::to_vec(&Line { fields }).map_err(io::Error::other)?;
    out.push(b'\n');
    w.write_all(&out).await
}

/// Bounds what a helper may send (64 KiB).
trait TakeLimit {
    fn take_limit(self) -> tokio::io::Take<Self>
    where
        Self: Sized;
}

impl<T: tokio::io::AsyncRead> TakeLimit for T {
    fn take_limit(self) -> tokio::io::Take<Self> {
        tokio::io::AsyncReadExt::take(self, 64 << 10)
    }
}

/// `kilnd credential ACTION`: git's side of the relay. Reads git's request from stdin; for
/// `get` asks kilnd and prints the answer; `store` and `erase` are accepted and ignored
/// (nothing is ever stored in the sandbox).
pub fn helper_main(action: &str) -> io::Result<()> {
    let mut input = String::new();
    io::stdin()
        .lock()
        .take(64 << 10)
        .read_to_string(&mut input)?;
    if action != "get" {
        return Ok(());
    }
    let mut fields = BTreeMap::new();
    for l in input.lines() {
        if let Some((k, v)) = l.split_once('=') {
            fields.insert(k.to_string(), v.to_string());
        }
    }
    let path = std::env::var_os(SOCKET_ENV)
        .ok_or_else(|| io::Error::other(format!("{SOCKET_ENV} is not set")))?;
    let mut s = std::os::unix::net::UnixStream::connect(path)?;
    let mut req = serde_json::to_vec(&Line {
        fields: Some(fields),
    })
    .map_err(io::Error::other)?;
    req.push(b'\n');
    s.write_all(&req)?;
    let mut line = String::new();
    io::BufReader::new(s.take(64 << 10)).read_line(&mut line)?;
    let ans: Line = serde_json::from_str(&line).map_err(io::Error::other)?;
    let mut out = io::stdout().lock();
    for (k, v) in ans.fields.unwrap_or_default() {
        // A value with a newline would inject extra attributes into git's protocol.
        if !k.contains(['=', '\n']) && !v.contains('\n') {
            writeln!(out, "{k}={v}")?;
        }
    }
    Ok(())
}
