//! `kilnd host-reaper`: a long-lived host process with `PR_SET_CHILD_SUBREAPER` that runs
//! commands for Kiln (notably `runc run --detach`) and reaps everything reparented to it, so
//! container init processes never become unreaped zombies. Wire types and client live in
//! `kilnd::reaper`. It exits by itself after a while without clients and without children.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kilnd::child::{self, Reaper};
use kilnd::frame::{self, Frame};
use kilnd::reaper::{ReaperReply, ReaperRequest, RunOutput, RunRequest};
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::net::UnixStream;
use tokio::sync::watch;

use super::procs::{lock, read_raw};
use super::serve;

/// Captured output kept per stream.
const CAPTURE_LIMIT: usize = 8 << 20;

/// Forks into the background: the calling process waits for an intermediate child that starts
/// a new session and forks the daemon, then exits. Returns in the daemon only.
/// Must be called before any thread is started.
pub fn daemonize() -> io::Result<()> {
    // SAFETY: single-threaded here; the children only call async-signal-safe functions until
    // they return into main.
    unsafe {
        match libc::fork() {
            -1 => Err(io::Error::last_os_error()),
            0 => {
                if libc::setsid() < 0 {
                    libc::_exit(1);
                }
                match libc::fork() {
                    -1 => libc::_exit(1),
                    0 => Ok(()),
                    _ => libc::_exit(0),
                }
            }
            pid => {
                let mut status = 0;
                libc::waitpid(pid, &mut status, 0);
                let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
                libc::_exit(if ok { 0 } else { 1 });
            }
        }
    }
}

/// Runs the reaper on `listen`. `idle`: exit after this long without clients and children.
pub fn run(listen: &Path, idle: Option<Duration>) -> io::Result<()> {
    let _ = std::env::set_current_dir("/");
    // One reaper per socket: hold an exclusive lock for our whole life.
    let lock_path = PathBuf::from(format!("{}.lock", listen.display()));
    if let Some(dir) = lock_path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let lock_file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(lock_file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        tracing::info!("another host reaper holds {}; exiting", lock_path.display());
        return Ok(());
    }
    serve::set_subreaper();
    let rt = serve::runtime()?;
    rt.block_on(async {
        let reaper = Reaper::global()?;
        let listener = serve::bind(listen)?;
        tracing::info!(socket = %listen.display(), "host reaper listening");
        // Idle exit only while the parent that started us can reap us: once orphaned we would
        // end as a zombie of a PID 1 that may never reap, so we stay up instead.
        // SAFETY: getppid cannot fail.
        let parent = unsafe { libc::getppid() };
        let mut orphaned_logged = false;
        let active = Arc::new(AtomicUsize::new(0));
        let shutdown = Arc::new(tokio::sync::Notify::new());
        let last_busy = Arc::new(Mutex::new(Instant::now()));
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                acc = listener.accept() => match acc {
                    Ok((stream, _)) => {
                        active.fetch_add(1, Ordering::SeqCst);
                        let (reaper, active, last_busy) = (reaper.clone(), active.clone(), last_busy.clone());
                        let shutdown = shutdown.clone();
                        tokio::spawn(async move {
                            if let Err(e) = handle(&reaper, stream, &shutdown).await {
                                tracing::debug!("reaper connection: {e}");
                            }
                            *lock(&last_busy) = Instant::now();
                            active.fetch_sub(1, Ordering::SeqCst);
                        });
                    }
                    Err(e) => {
                        tracing::warn!("accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                () = shutdown.notified() => {
                    tracing::info!("shutdown requested: exiting");
                    break;
                }
                _ = tick.tick() => {
                    if active.load(Ordering::SeqCst) > 0 || reaper.has_children() {
                        *lock(&last_busy) = Instant::now();
                    } else if let Some(idle) = idle {
                        // SAFETY: getppid cannot fail.
                        let still_parented = parent != 1 && unsafe { libc::getppid() } == parent;
                        if !still_parented {
                            if !orphaned_logged {
                                tracing::info!("orphaned: staying up (exiting would leave a zombie)");
                                orphaned_logged = true;
                            }
                        } else if lock(&last_busy).elapsed() >= idle {
                            tracing::info!("idle: exiting");
                            break;
                        }
                    }
                }
            }
        }
        let _ = std::fs::remove_file(listen);
        Ok::<(), io::Error>(())
    })?;
    drop(lock_file);
    Ok(())
}

async fn handle(
    reaper: &Reaper,
    mut stream: UnixStream,
    shutdown: &tokio::sync::Notify,
) -> io::Result<()> {
    let req = match frame::read_frame(&mut stream).await? {
        Some(f @ Frame::Json(_)) => f.parse::<ReaperRequest>(),
        Some(_) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "expected a JSON frame",
        )),
        None => return Ok(()),
    };
    let reply = match req {
        Ok(ReaperRequest::Ping) => ReaperReply::Pong {
            pid: std::process::id(),
        },
        Ok(ReaperRequest::Run(run)) => run_command(reaper, run).await,
        Ok(ReaperRequest::Shutdown) => {
            if reaper.has_children() {
                ReaperReply::Error {
                    message: "refusing to shut down: children are still running".into(),
                }
            } else {
                frame::write_json(&mut stream, &ReaperReply::ShuttingDown).await?;
                shutdown.notify_one();
                return Ok(());
            }
        }
        Err(e) => ReaperReply::Error {
            message: format!("malformed request: {e}"),
        },
    };
    frame::write_json(&mut stream, &reply).await
}

async fn run_command(reaper: &Reaper, req: RunRequest) -> ReaperReply {
    let fail = |message: String| ReaperReply::Error { message };
    let Some(argv0) = req.argv.first() else {
        return fail("argv is empty".into());
    };
    let mut env: BTreeMap<String, String> = req.env.iter().cloned().collect();
    env.entry("PATH".into())
        .or_insert_with(|| child::DEFAULT_PATH.into());
    let cwd = req.cwd.clone().unwrap_or_else(|| PathBuf::from("/"));
    if !cwd.is_dir() {
        return fail(format!(
            "working directory does not exist: {}",
            cwd.display()
        ));
    }
    let path_var = env.get("PATH").cloned().unwrap_or_default();
    let Some(program) = child::resolve_command(argv0, &path_var, &cwd) else {
        return fail(format!("command not found: {argv0}"));
    };
    let mut cmd = Command::new(program);
    cmd.arg0(argv0)
        .args(&req.argv[1..])
        .env_clear()
        .envs(&env)
        .current_dir(&cwd)
        .stdin(Stdio::null());
    match &req.stdio_file {
        Some(file) => {
            let opened = OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o640)
                .open(file);
            let f = match opened.and_then(|f| Ok((f.try_clone()?, f))) {
                Ok(f) => f,
                Err(e) => return fail(format!("opening {}: {e}", file.display())),
            };
            cmd.stdout(Stdio::from(f.0)).stderr(Stdio::from(f.1));
        }
        None => {
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        }
    }
    let (mut child, waiter) = match reaper.spawn(&mut cmd) {
        Ok(x) => x,
        Err(e) => return fail(format!("cannot start {argv0}: {e}")),
    };
    drop(cmd); // closes our copies of the stdio file
    let pid = child.id();
    tracing::debug!(pid, argv = ?req.argv, "started");
    let rx =
        |fd: Option<std::os::fd::OwnedFd>| fd.and_then(|fd| pipe::Receiver::from_owned_fd(fd).ok());
    let stdout = rx(child.stdout.take().map(Into::into));
    let stderr = rx(child.stderr.take().map(Into::into));
    let (exit_tx, exit_rx) = watch::channel(false);
    let wait = async {
        let exit = waiter.await;
        let _ = exit_tx.send(true);
        exit
    };
    let (exit, out, err) = tokio::join!(
        wait,
        collect(stdout, exit_rx.clone()),
        collect(stderr, exit_rx)
    );
    tracing::debug!(pid, ?exit, "exited");
    ReaperReply::Done(RunOutput {
        exit_code: exit.and_then(child::ChildExit::code),
        signal: exit.and_then(child::ChildExit::signal),
        stdout: String::from_utf8_lossy(&out).into_owned(),
        stderr: String::from_utf8_lossy(&err).into_owned(),
    })
}

/// Reads a pipe until EOF, or, once the child exited, until it is momentarily empty (a
/// daemonized grandchild may hold it open forever).
async fn collect(rx: Option<pipe::Receiver>, mut exited: watch::Receiver<bool>) -> Vec<u8> {
    let mut out = Vec::new();
    let Some(mut rx) = rx else { return out };
    let mut buf = vec![0u8; 16 * 1024];
    let keep = |out: &mut Vec<u8>, data: &[u8]| {
        let room = CAPTURE_LIMIT.saturating_sub(out.len());
        out.extend_from_slice(&data[..data.len().min(room)]);
    };
    loop {
        tokio::select! {
            r = rx.read(&mut buf) => match r {
                Ok(0) => return out,
                Ok(n) => keep(&mut out, &buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return out,
            },
            ok = async { exited.wait_for(|v| *v).await.is_ok() } => {
                if !ok {
                    return out;
                }
                break;
            }
        }
    }
    let mut drained = 0;
    loop {
        match read_raw(&rx, &mut buf) {
            Ok(0) => return out,
            Ok(n) => {
                keep(&mut out, &buf[..n]);
                drained += n;
                if drained > CAPTURE_LIMIT {
                    return out;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return out,
        }
    }
}
