//! Child-process core shared by the daemon (PID 1 in a sandbox) and the host reaper: spawns
//! processes and reaps *every* child (including orphans reparented to us) without stealing the
//! exit statuses of the processes we started ourselves.
//!
//! How: one thread peeks at exited children with `waitid(P_ALL, WEXITED | WNOWAIT | WNOHANG)`,
//! then, holding the spawn mutex, reaps that pid and hands its status to whoever registered it.
//! Spawning happens under the same mutex and registers the pid before releasing it, so a child
//! that exits immediately is always delivered. Children that failed to `exec` are reaped by
//! `std::process::Command::spawn` itself while it still holds the mutex, so the peek/lock/reap
//! dance never races with it. The thread sleeps on a self-pipe written by a `SIGCHLD` handler.
//!
//! Do not mix this with `tokio::process` (its own reaping would race with ours).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use tokio::sync::oneshot;

/// Default `PATH` for processes started by kilnd.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildExit {
    /// It exited with this code.
    Code(i32),
    /// It was killed by this signal.
    Signal(i32),
}

impl ChildExit {
    /// The exit code, if it exited.
    pub fn code(self) -> Option<i32> {
        match self {
            ChildExit::Code(c) => Some(c),
            ChildExit::Signal(_) => None,
        }
    }

    /// The signal that killed it, if any.
    pub fn signal(self) -> Option<i32> {
        match self {
            ChildExit::Code(_) => None,
            ChildExit::Signal(s) => Some(s),
        }
    }

    /// Decodes a `waitpid` status.
    pub fn from_wait_status(status: libc::c_int) -> ChildExit {
        if libc::WIFEXITED(status) {
            ChildExit::Code(libc::WEXITSTATUS(status))
        } else if libc::WIFSIGNALED(status) {
            ChildExit::Signal(libc::WTERMSIG(status))
        } else {
            ChildExit::Code(-1)
        }
    }
}

/// Resolves to the exit status of a spawned child (`None` only if the reaper thread died).
#[derive(Debug)]
pub struct ExitWaiter {
    rx: oneshot::Receiver<ChildExit>,
}

impl Future for ExitWaiter {
    type Output = Option<ChildExit>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.rx).poll(cx).map(|r| r.ok())
    }
}

/// Handle to the process-wide reaper (cheap to clone).
#[derive(Clone, Debug)]
pub struct Reaper {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    waiters: Mutex<HashMap<i32, oneshot::Sender<ChildExit>>>,
}

/// Write end of the self-pipe the `SIGCHLD` handler pokes.
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);
static GLOBAL: Mutex<Option<Reaper>> = Mutex::new(None);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

extern "C" fn on_sigchld(_sig: libc::c_int) {
    let fd = WAKE_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        // SAFETY: write(2) and errno access are async-signal-safe; errno is restored.
        unsafe {
            let errno = *libc::__errno_location();
            let b = 1u8;
            libc::write(fd, (&b as *const u8).cast(), 1);
            *libc::__errno_location() = errno;
        }
    }
}

impl Reaper {
    /// The process-wide reaper, started on first use (installs a `SIGCHLD` handler and starts
    /// the reaper thread).
    pub fn global() -> io::Result<Reaper> {
        let mut g = lock(&GLOBAL);
        if let Some(r) = &*g {
            return Ok(r.clone());
        }
        let r = Reaper::start()?;
        *g = Some(r.clone());
        Ok(r)
    }

    fn start() -> io::Result<Reaper> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: fds is a valid array of two ints.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 just returned these two fresh descriptors; the write end is kept open
        // for the life of the process (the signal handler uses it).
        let rd = unsafe { OwnedFd::from_raw_fd(fds[0]) };
        WAKE_FD.store(fds[1], Ordering::Relaxed);
        // SAFETY: plain sigaction with a handler that only calls async-signal-safe functions.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigchld as *const () as usize;
            sa.sa_flags = libc::SA_RESTART | libc::SA_NOCLDSTOP;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(libc::SIGCHLD, &sa, std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        let inner = Arc::new(Inner {
            waiters: Mutex::new(HashMap::new()),
        });
        let thread_inner = inner.clone();
        std::thread::Builder::new()
            .name("kilnd-reaper".into())
            .stack_size(64 * 1024)
            .spawn(move || reap_loop(&thread_inner, &rd))?;
        Ok(Reaper { inner })
    }

    /// Spawns `cmd` and registers it; never call `wait` on the returned `Child`, await the
    /// [`ExitWaiter`] instead.
    pub fn spawn(&self, cmd: &mut Command) -> io::Result<(Child, ExitWaiter)> {
        self.spawn_with(|| cmd.spawn())
    }

    /// Runs `f` (which must fork at most one child and return it) while holding the spawn lock,
    /// then registers the child. Use it when descriptors must be created without racing with
    /// another fork (e.g. a PTY pair that is not `CLOEXEC` yet).
    pub fn spawn_with<F>(&self, f: F) -> io::Result<(Child, ExitWaiter)>
    where
        F: FnOnce() -> io::Result<Child>,
    {
        let mut waiters = lock(&self.inner.waiters);
        let child = f()?;
        let (tx, rx) = oneshot::channel();
        waiters.insert(child.id() as i32, tx);
        Ok((child, ExitWaiter { rx }))
    }

    /// Whether this process has any child at all (running or zombie, ours or reparented).
    pub fn has_children(&self) -> bool {
        // SAFETY: info is a zeroed siginfo_t owned by us; WNOWAIT reaps nothing.
        unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let r = libc::waitid(
                libc::P_ALL,
                0,
                &mut info,
                libc::WEXITED | libc::WNOWAIT | libc::WNOHANG,
            );
            r == 0 || *libc::__errno_location() != libc::ECHILD
        }
    }
}

fn reap_loop(inner: &Inner, wake: &OwnedFd) {
    loop {
        // SAFETY: info is zeroed so si_pid reads 0 when no child has exited.
        let (r, pid, errno) = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let r = libc::waitid(
                libc::P_ALL,
                0,
                &mut info,
                libc::WEXITED | libc::WNOWAIT | libc::WNOHANG,
            );
            (r, info.si_pid(), *libc::__errno_location())
        };
        if r == 0 && pid != 0 {
            let mut waiters = lock(&inner.waiters);
            let mut status: libc::c_int = 0;
            // SAFETY: plain waitpid on a pid we just saw exit.
            let got = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
            if got == pid {
                if let Some(tx) = waiters.remove(&pid) {
                    let _ = tx.send(ChildExit::from_wait_status(status));
                }
            }
            continue;
        }
        if r != 0 && errno == libc::EINTR {
            continue;
        }
        // Nothing has exited (or there are no children): sleep until the next SIGCHLD.
        let mut pfd = libc::pollfd {
            fd: wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: pfd is valid for one entry; buf is a local buffer.
        unsafe {
            libc::poll(&mut pfd, 1, -1);
            let mut buf = [0u8; 64];
            while libc::read(wake.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) > 0 {}
        }
    }
}

/// Finds `cmd` the way `execvp` would: a name containing a slash is taken as is (relative to
/// `cwd`), anything else is searched in the colon-separated `path_var`. Returns the path of an
/// executable regular file, or `None`.
pub fn resolve_command(cmd: &str, path_var: &str, cwd: &Path) -> Option<PathBuf> {
    if cmd.is_empty() {
        return None;
    }
    if cmd.contains('/') {
        let p = cwd.join(cmd);
        return is_executable(&p).then_some(p);
    }
    for dir in path_var.split(':') {
        let dir = if dir.is_empty() { "." } else { dir };
        let p = cwd.join(dir).join(cmd);
        if is_executable(&p) {
            return Some(p);
        }
    }
    None
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::metadata(p) {
        Ok(m) => m.is_file() && m.permissions().mode() & 0o111 != 0,
        Err(_) => false,
    }
}

/// Identity to switch to in a child before `exec`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

impl Credentials {
    /// Switches to this identity. Meant for `pre_exec` (after `fork`): async-signal-safe only.
    pub fn apply(&self) -> io::Result<()> {
        // SAFETY: setgroups/setgid/setuid with a valid pointer and length.
        unsafe {
            if libc::setgroups(self.groups.len(), self.groups.as_ptr()) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::setgid(self.gid) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::setuid(self.uid) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

/// `setsid()` for `pre_exec`: the child leads a new session and process group.
pub fn setsid_in_child() -> io::Result<()> {
    // SAFETY: setsid is async-signal-safe.
    if unsafe { libc::setsid() } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Marks a descriptor close-on-exec.
pub fn set_cloexec(fd: &impl AsRawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFD);
        if flags < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, flags | libc::FD_CLOEXEC) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Makes a descriptor non-blocking.
pub fn set_nonblocking(fd: &impl AsRawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_like_execvp() {
        let root = Path::new("/");
        assert!(resolve_command("sh", DEFAULT_PATH, root).is_some());
        assert!(resolve_command("/bin/sh", "", root).is_some());
        assert_eq!(
            resolve_command("definitely-not-a-command-kiln", DEFAULT_PATH, root),
            None
        );
        assert_eq!(resolve_command("", DEFAULT_PATH, root), None);
        // Not executable.
        assert_eq!(resolve_command("/etc/passwd", DEFAULT_PATH, root), None);
    }

    #[test]
    fn decodes_wait_status() {
        assert_eq!(ChildExit::from_wait_status(3 << 8), ChildExit::Code(3));
        assert_eq!(ChildExit::from_wait_status(9), ChildExit::Signal(9));
    }
}
