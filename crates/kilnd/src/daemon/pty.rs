//! PTY sessions: `openpty`, a child with its own session and the PTY as controlling terminal,
//! output pumped into a ring (replayed on re-attach), input, resize and signals.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use kiln_protocol::kilnd::{DaemonError, DaemonErrorCode, PtySpec, StreamKind};
use kilnd::child::{self, ExitWaiter, Reaper};
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;

use super::files::err;
use super::procs::{exit_status, lock, prepare, read_raw, signal_group, spawn_error};
use super::ring::{Ring, Subscription};

/// Screen output kept per session.
const RING_BYTES: usize = 256 * 1024;
/// Exited sessions kept for `PtyAttach`.
const KEEP_EXITED: usize = 16;
const READ_BYTES: usize = 16 * 1024;
const DRAIN_LIMIT: usize = 4 << 20;

/// One PTY session.
#[derive(Debug)]
pub struct Pty {
    pub id: String,
    pub os_pid: u32,
    pub ring: Arc<Ring>,
    /// The master side; `None` once the session ended.
    master: Mutex<Option<Arc<AsyncFd<OwnedFd>>>>,
    /// Serialises input from several attached clients.
    write_lock: tokio::sync::Mutex<()>,
}

impl Pty {
    fn master(&self) -> Option<Arc<AsyncFd<OwnedFd>>> {
        lock(&self.master).clone()
    }

    /// Types `data` into the terminal (dropped if the session ended).
    pub async fn input(&self, data: &[u8]) -> io::Result<()> {
        let Some(fd) = self.master() else {
            return Ok(());
        };
        let _g = self.write_lock.lock().await;
        let mut off = 0;
        while off < data.len() {
            let mut guard = fd.writable().await?;
            let rest = &data[off..];
            match guard.try_io(|inner| {
                // SAFETY: rest is valid for rest.len() bytes.
                let n = unsafe { libc::write(inner.as_raw_fd(), rest.as_ptr().cast(), rest.len()) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            }) {
                Ok(Ok(n)) => off += n,
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => {}
            }
        }
        Ok(())
    }

    /// Sets the window size (the kernel sends SIGWINCH to the foreground group).
    pub fn resize(&self, cols: u16, rows: u16) -> Result<(), DaemonError> {
        let Some(fd) = self.master() else {
            return Ok(());
        };
        set_winsize(fd.get_ref(), cols, rows)
            .map_err(|e| err(DaemonErrorCode::Invalid, format!("resize: {e}")))
    }

    /// Signals the session's process group.
    pub fn signal(&self, sig: i32) -> Result<(), DaemonError> {
        if self.ring.finished().is_some() {
            return Ok(());
        }
        signal_group(self.os_pid, sig)
    }
}

fn winsize(cols: u16, rows: u16) -> libc::winsize {
    libc::winsize {
        ws_row: if rows == 0 { 24 } else { rows },
        ws_col: if cols == 0 { 80 } else { cols },
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

fn set_winsize(fd: &OwnedFd, cols: u16, rows: u16) -> io::Result<()> {
    let ws = winsize(cols, rows);
    // SAFETY: TIOCSWINSZ reads a winsize struct we own.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[derive(Debug, Default)]
struct Table {
    ptys: HashMap<String, Arc<Pty>>,
    exited: VecDeque<String>,
}

/// All PTY sessions.
#[derive(Debug)]
pub struct Ptys {
    reaper: Reaper,
    table: Mutex<Table>,
    next_id: AtomicU64,
}

impl Ptys {
    pub fn new(reaper: Reaper) -> Arc<Ptys> {
        Arc::new(Ptys {
            reaper,
            table: Mutex::new(Table::default()),
            next_id: AtomicU64::new(1),
        })
    }

    pub fn get(&self, id: &str) -> Result<Arc<Pty>, DaemonError> {
        lock(&self.table).ptys.get(id).cloned().ok_or_else(|| {
            err(
                DaemonErrorCode::NotFound,
                format!("no such PTY session: {id}"),
            )
        })
    }

    /// Running sessions' pids (for shutdown).
    pub fn running_pids(&self) -> Vec<u32> {
        lock(&self.table)
            .ptys
            .values()
            .filter(|p| p.ring.finished().is_none())
            .map(|p| p.os_pid)
            .collect()
    }

    /// Opens a session; returns it with a subscription taken before any output.
    pub fn open(self: &Arc<Self>, spec: &PtySpec) -> Result<(Arc<Pty>, Subscription), DaemonError> {
        let p = prepare(
            &spec.cmd,
            &spec.env,
            spec.cwd.as_deref(),
            spec.user.as_deref(),
            true,
        )?;
        let mut master_slot: Option<OwnedFd> = None;
        let mut pty_error: Option<io::Error> = None;
        let spawned = self.reaper.spawn_with(|| {
            // Under the spawn lock: no other fork can inherit these before they are CLOEXEC.
            let ws = winsize(spec.cols, spec.rows);
            let pair = nix::pty::openpty(Some(&ws), None)
                .map_err(io::Error::from)
                .and_then(|pair| {
                    child::set_cloexec(&pair.master)?;
                    child::set_cloexec(&pair.slave)?;
                    Ok(pair)
                })
                .map_err(|e| {
                    let kind = e.kind();
                    pty_error = Some(e);
                    io::Error::from(kind)
                })?;
            let mut cmd = p.command();
            cmd.stdin(Stdio::from(pair.slave.try_clone()?))
                .stdout(Stdio::from(pair.slave.try_clone()?))
                .stderr(Stdio::from(pair.slave));
            let creds = p.creds.clone();
            // SAFETY: only async-signal-safe calls (setsid, ioctl, set*id) on prepared data.
            unsafe {
                cmd.pre_exec(move || {
                    child::setsid_in_child()?;
                    if libc::ioctl(0, libc::TIOCSCTTY, 0) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    if let Some(c) = &creds {
                        c.apply()?;
                    }
                    Ok(())
                });
            }
            let child = cmd.spawn()?;
            master_slot = Some(pair.master);
            Ok(child)
        });
        if let Some(e) = pty_error {
            return Err(err(
                DaemonErrorCode::Internal,
                format!("cannot open a PTY: {e}"),
            ));
        }
        let (child, waiter) =
            spawned.map_err(|e| spawn_error(&e, p.argv0.trim_start_matches('-')))?;
        let os_pid = child.id();
        let master = master_slot
            .ok_or_else(|| io::Error::other("no PTY master"))
            .and_then(|m| {
                child::set_nonblocking(&m)?;
                // SAFETY: the AsyncFd owns the descriptor, which stays open while it lives.
                unsafe { AsyncFd::register(m) }.map_err(io::Error::from)
            });
        let master = match master {
            Ok(m) => Arc::new(m),
            Err(e) => {
                let _ = signal_group(os_pid, libc::SIGKILL);
                return Err(err(
                    DaemonErrorCode::Internal,
                    format!("setting up the PTY: {e}"),
                ));
            }
        };
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let ring = Ring::new(RING_BYTES);
        let sub = ring.subscribe(0);
        let pty = Arc::new(Pty {
            id: format!("t{n}"),
            os_pid,
            ring,
            master: Mutex::new(Some(master.clone())),
            write_lock: tokio::sync::Mutex::new(()),
        });
        lock(&self.table).ptys.insert(pty.id.clone(), pty.clone());
        tracing::debug!(id = %pty.id, os_pid, "PTY session started");
        tokio::spawn(supervise(self.clone(), pty.clone(), waiter, master));
        Ok((pty, sub))
    }

    fn retire(&self, id: &str) {
        let mut t = lock(&self.table);
        t.exited.push_back(id.to_string());
        while t.exited.len() > KEEP_EXITED {
            if let Some(old) = t.exited.pop_front() {
                t.ptys.remove(&old);
            }
        }
    }
}

async fn supervise(
    ptys: Arc<Ptys>,
    pty: Arc<Pty>,
    waiter: ExitWaiter,
    master: Arc<AsyncFd<OwnedFd>>,
) {
    let (exit_tx, exit_rx) = watch::channel(false);
    let wait = async {
        let exit = waiter.await;
        let _ = exit_tx.send(true);
        exit
    };
    let (exit, ()) = tokio::join!(wait, pump(&master, &pty.ring, exit_rx));
    lock(&pty.master).take();
    drop(master);
    let status = pty.ring.finish(exit_status(exit, false));
    tracing::debug!(id = %pty.id, ?status, "PTY session ended");
    ptys.retire(&pty.id);
}

/// Copies the master's output into the ring until EIO/EOF (no slave left), or, once the child
/// exited, until it is momentarily empty.
async fn pump(master: &AsyncFd<OwnedFd>, ring: &Ring, mut exited: watch::Receiver<bool>) {
    let mut buf = vec![0u8; READ_BYTES];
    loop {
        tokio::select! {
            guard = master.readable() => {
                let Ok(mut guard) = guard else { return };
                match guard.try_io(|inner| read_raw(inner, &mut buf)) {
                    Ok(Ok(0)) => return,
                    Ok(Ok(n)) => ring.push(StreamKind::Stdout, Bytes::copy_from_slice(&buf[..n])).await,
                    Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                    Ok(Err(_)) => return, // EIO: every slave descriptor is closed
                    Err(_would_block) => {}
                }
            }
            ok = async { exited.wait_for(|v| *v).await.is_ok() } => {
                if !ok {
                    return;
                }
                break;
            }
        }
    }
    let mut drained = 0;
    loop {
        match read_raw(master, &mut buf) {
            Ok(0) => return,
            Ok(n) => {
                ring.push(StreamKind::Stdout, Bytes::copy_from_slice(&buf[..n]))
                    .await;
                drained += n;
                if drained > DRAIN_LIMIT {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}
