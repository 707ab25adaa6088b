//! `kilnd serve`: runtime setup, the listening socket, orphan reaping, and shutdown on SIGTERM
//! (terminate the children, then exit).

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use kilnd::child::Reaper;
use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};

use super::procs::{self, Procs};
use super::pty::Ptys;
use super::server::{self, Daemon};

/// How long children get between SIGTERM and SIGKILL at shutdown.
const GRACE: Duration = Duration::from_secs(3);

/// A current-thread runtime with a small blocking pool (file I/O).
pub fn runtime() -> io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(16)
        .thread_keep_alive(Duration::from_secs(5))
        .build()
}

/// Removes a stale socket file and binds a new one (mode 0600: only root talks to kilnd).
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir)?;
        }
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // Created 0600 through the umask rather than chmod afterwards: no window in which the
    // socket is open to everyone, and gVisor refuses chmod on a host socket. Nothing else runs
    // yet (this is start-up), so the process-wide umask is restored before anyone sees it.
    // SAFETY: umask has no failure mode.
    let old = unsafe { libc::umask(0o177) };
    let listener = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener = listener
        .map_err(|e| io::Error::new(e.kind(), format!("binding {}: {e}", path.display())))?;
    Ok(listener)
}

/// Become the reaper of orphaned descendants (PID 1 is one anyway).
pub fn set_subreaper() {
    // SAFETY: prctl with integer arguments.
    unsafe {
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    }
}

/// Runs the daemon until SIGTERM/SIGINT.
pub fn run(listen: &Path) -> io::Result<()> {
    let pid1 = std::process::id() == 1;
    if !pid1 {
        set_subreaper();
    }
    let rt = runtime()?;
    rt.block_on(async {
        let reaper = Reaper::global().map_err(|e| io::Error::new(e.kind(), format!("starting the reaper: {e}")))?;
        let listener = bind(listen)?;
        let daemon = Arc::new(Daemon {
            procs: Procs::new(reaper.clone(), procs::RING_BYTES),
            ptys: Ptys::new(reaper.clone()),
            run_dir: listen
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| std::path::PathBuf::from("/")),
        });
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tracing::info!(socket = %listen.display(), pid1, version = kilnd::VERSION, "kilnd listening");
        tokio::select! {
            () = server::serve(listener, daemon.clone()) => {}
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
        let _ = std::fs::remove_file(listen);
        shutdown(&daemon, &reaper, pid1).await;
        Ok(())
    })
}

async fn shutdown(daemon: &Daemon, reaper: &Reaper, pid1: bool) {
    let kill_all = |sig: i32| {
        if pid1 {
            // From PID 1 this reaches every other process of the sandbox.
            // SAFETY: plain kill(2).
            unsafe { libc::kill(-1, sig) };
        } else {
            for pid in daemon
                .procs
                .running_pids()
                .into_iter()
                .chain(daemon.ptys.running_pids())
            {
                let _ = procs::signal_group(pid, sig);
            }
        }
    };
    kill_all(libc::SIGTERM);
    if wait_children_gone(reaper, GRACE).await {
        return;
    }
    kill_all(libc::SIGKILL);
    wait_children_gone(reaper, Duration::from_secs(1)).await;
}

async fn wait_children_gone(reaper: &Reaper, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if !reaper.has_children() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    !reaper.has_children()
}
