//! Processes started with `Exec`: preparing the command (user, env, cwd, PATH lookup), spawning
//! it in its own session, pumping stdout/stderr into its ring, timeouts, signals, stdin, and
//! keeping the last exited processes around for `Attach` and `ListProcesses`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use kiln_protocol::kilnd::{
    DaemonError, DaemonErrorCode, ExecSpec, ExitStatus, ProcessInfo, StreamKind,
};
use kilnd::child::{self, ChildExit, Credentials, ExitWaiter, Reaper};
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::sync::watch;

use super::files::{err, normalize};
use super::ring::{Ring, Subscription};
use super::users;

/// Output kept per process.
pub const RING_BYTES: usize = 1 << 20;
/// Exited processes kept for `Attach`/`ListProcesses`...
const KEEP_EXITED: usize = 64;
/// ...as long as their buffered output stays under this (the oldest go first).
const KEEP_EXITED_BYTES: usize = 8 << 20;
/// Read size of the output pumps.
const READ_BYTES: usize = 32 * 1024;
/// After the process exited, read at most this much more from a pipe (a grandchild may keep
/// writing into it forever).
const DRAIN_LIMIT: usize = 4 << 20;

pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A command ready to spawn.
#[derive(Debug)]
pub struct Prepared {
    pub program: PathBuf,
    pub argv0: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub cwd: String,
    pub creds: Option<Credentials>,
}

impl Prepared {
    pub fn command(&self) -> Command {
        let mut c = Command::new(&self.program);
        c.arg0(&self.argv0)
            .args(&self.args)
            .env_clear()
            .envs(&self.env)
            .current_dir(&self.cwd);
        c
    }
}

/// Resolves user, environment, working directory and program. `login_shell` = start the
/// user's shell as a login shell when `cmd` is empty (PTY sessions).
pub fn prepare(
    cmd: &[String],
    env: &BTreeMap<String, String>,
    cwd: Option<&str>,
    user: Option<&str>,
    pty: bool,
) -> Result<Prepared, DaemonError> {
    let user = users::resolve(user)?;
    let cwd = match cwd {
        Some(c) => normalize(c)?,
        None if pty && Path::new(&user.home).is_dir() => user.home.clone(),
        None => "/".to_string(),
    };
    match std::fs::metadata(&cwd) {
        Ok(md) if md.is_dir() => {}
        Ok(_) => {
            return Err(err(
                DaemonErrorCode::Invalid,
                format!("working directory is not a directory: {cwd}"),
            ))
        }
        Err(_) => {
            return Err(err(
                DaemonErrorCode::Invalid,
                format!("working directory does not exist: {cwd}"),
            ))
        }
    }
    let mut full_env = BTreeMap::new();
    if std::process::id() == 1 {
        // As a sandbox's PID 1, our environment is the sandbox's (the runtime sets it from the
        // sandbox spec): every process starts from it, the way an image's `ENV` works.
        for (k, v) in std::env::vars() {
            if !k.starts_with("KILND_") {
                full_env.insert(k, v);
            }
        }
    }
    full_env.insert("PATH".to_string(), child::DEFAULT_PATH.to_string());
    full_env.insert("HOME".to_string(), user.home.clone());
    if let Some(name) = &user.name {
        full_env.insert("USER".to_string(), name.clone());
        full_env.insert("LOGNAME".to_string(), name.clone());
    }
    if pty {
        full_env.insert("TERM".to_string(), "xterm-256color".to_string());
    }
    for (k, v) in env {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(err(
                DaemonErrorCode::Invalid,
                format!("invalid environment variable: {k:?}"),
            ));
        }
        full_env.insert(k.clone(), v.clone());
    }
    let path_var = full_env.get("PATH").cloned().unwrap_or_default();
    let (program, argv0, args) = if cmd.is_empty() {
        if !pty {
            return Err(err(DaemonErrorCode::Invalid, "cmd is empty"));
        }
        // The user's login shell, started as a login shell (argv[0] = "-sh").
        let shell = user
            .shell
            .as_deref()
            .map(PathBuf::from)
            .filter(|s| child::resolve_command(&s.to_string_lossy(), "", Path::new("/")).is_some())
            .unwrap_or_else(|| PathBuf::from("/bin/sh"));
        let base = shell
            .file_name()
            .map_or_else(|| "sh".into(), |b| b.to_string_lossy().into_owned());
        (shell, format!("-{base}"), Vec::new())
    } else {
        if cmd.iter().any(|a| a.contains('\0')) {
            return Err(err(
                DaemonErrorCode::Invalid,
                "argument contains a NUL byte",
            ));
        }
        let program =
            child::resolve_command(&cmd[0], &path_var, Path::new(&cwd)).ok_or_else(|| {
                let exists = cmd[0].contains('/') && Path::new(&cwd).join(&cmd[0]).exists();
                let msg = if exists {
                    format!("cannot execute {}: not an executable file", cmd[0])
                } else {
                    format!("command not found: {}", cmd[0])
                };
                err(DaemonErrorCode::CommandNotFound, msg)
            })?;
        (program, cmd[0].clone(), cmd[1..].to_vec())
    };
    // SAFETY: these cannot fail.
    let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let creds = if euid == 0 || user.uid != euid || user.gid != egid {
        Some(Credentials {
            uid: user.uid,
            gid: user.gid,
            groups: user.groups.clone(),
        })
    } else {
        None
    };
    Ok(Prepared {
        program,
        argv0,
        args,
        env: full_env,
        cwd,
        creds,
    })
}

/// Maps a failed spawn (the exec or the pre-exec setup failed in the child).
pub fn spawn_error(e: &io::Error, cmd0: &str) -> DaemonError {
    match e.raw_os_error() {
        Some(libc::ENOENT) => err(
            DaemonErrorCode::CommandNotFound,
            format!("command not found: {cmd0}"),
        ),
        Some(libc::EACCES | libc::ENOEXEC) => err(
            DaemonErrorCode::CommandNotFound,
            format!("cannot execute {cmd0}: {}", strip_os(e)),
        ),
        Some(libc::EPERM) => err(
            DaemonErrorCode::PermissionDenied,
            format!("cannot start {cmd0}: {}", strip_os(e)),
        ),
        _ => err(
            DaemonErrorCode::Internal,
            format!("cannot start {cmd0}: {}", strip_os(e)),
        ),
    }
}

fn strip_os(e: &io::Error) -> String {
    let s = e.to_string();
    s.find(" (os error")
        .map_or(s.clone(), |i| s[..i].to_string())
}

/// Sends `sig` to the process group led by `pid` (falls back to the process itself).
pub fn signal_group(pid: u32, sig: i32) -> Result<(), DaemonError> {
    if !(0..=64).contains(&sig) {
        return Err(err(
            DaemonErrorCode::Invalid,
            format!("invalid signal number {sig}"),
        ));
    }
    let pid = pid as libc::pid_t;
    // SAFETY: kill with a negative pid addresses the process group.
    let mut r = unsafe { libc::kill(-pid, sig) };
    if r != 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
        // SAFETY: as above, for the process itself (it may have left its group).
        r = unsafe { libc::kill(pid, sig) };
    }
    if r != 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ESRCH) => Ok(()), // exiting right now
            Some(libc::EPERM) => Err(err(
                DaemonErrorCode::PermissionDenied,
                format!("signal {sig}: {}", strip_os(&e)),
            )),
            _ => Err(err(
                DaemonErrorCode::Invalid,
                format!("signal {sig}: {}", strip_os(&e)),
            )),
        };
    }
    Ok(())
}

pub fn exit_status(exit: Option<ChildExit>, timed_out: bool) -> ExitStatus {
    ExitStatus {
        exit_code: exit.and_then(ChildExit::code),
        signal: exit.and_then(ChildExit::signal),
        timed_out,
        last_seq: 0,
    }
}

/// A process started through kilnd.
#[derive(Debug)]
pub struct Proc {
    pub id: String,
    n: u64,
    pub os_pid: u32,
    pub cmd: Vec<String>,
    pub tag: Option<String>,
    pub started_at_ms: u64,
    pub ring: Arc<Ring>,
    /// The write end of its stdin (`None` once closed or if it had none).
    pub stdin: tokio::sync::Mutex<Option<pipe::Sender>>,
}

impl Proc {
    pub fn info(&self) -> ProcessInfo {
        let exit = self.ring.finished();
        ProcessInfo {
            pid: self.id.clone(),
            os_pid: self.os_pid,
            cmd: self.cmd.clone(),
            tag: self.tag.clone(),
            running: exit.is_none(),
            exit,
            started_at_ms: self.started_at_ms,
        }
    }
}

#[derive(Debug, Default)]
struct Table {
    procs: HashMap<String, Arc<Proc>>,
    exited: VecDeque<String>,
}

/// All processes started through kilnd.
#[derive(Debug)]
pub struct Procs {
    reaper: Reaper,
    table: Mutex<Table>,
    next_id: AtomicU64,
    ring_bytes: usize,
}

fn pipe_rx(fd: Option<impl Into<OwnedFd>>) -> io::Result<Option<pipe::Receiver>> {
    fd.map(|fd| pipe::Receiver::from_owned_fd(fd.into()))
        .transpose()
}

/// A process whose stdio is a client connection ([`Request::Pipe`]).
///
/// [`Request::Pipe`]: kiln_protocol::kilnd::Request::Pipe
pub struct Piped {
    os_pid: u32,
    stdin: Option<pipe::Sender>,
    stdout: Option<pipe::Receiver>,
    waiter: Option<ExitWaiter>,
}

/// A child started by [`start`]: its pid, exit waiter and async pipe ends.
struct Started {
    os_pid: u32,
    waiter: ExitWaiter,
    stdin: Option<pipe::Sender>,
    stdout: Option<pipe::Receiver>,
    stderr: Option<pipe::Receiver>,
}

/// Prepares and spawns `spec.cmd` in its own session as the requested user (stdout piped,
/// stdin piped when `stdin`, stderr piped or discarded), registered with `reaper`.
fn start(
    reaper: &Reaper,
    spec: &ExecSpec,
    stdin: bool,
    stderr: bool,
) -> Result<Started, DaemonError> {
    let p = prepare(
        &spec.cmd,
        &spec.env,
        spec.cwd.as_deref(),
        spec.user.as_deref(),
        false,
    )?;
    let mut cmd = p.command();
    let piped_or = |on: bool| if on { Stdio::piped() } else { Stdio::null() };
    cmd.stdin(piped_or(stdin))
        .stdout(Stdio::piped())
        .stderr(piped_or(stderr));
    let creds = p.creds.clone();
    // SAFETY: the closure only makes async-signal-safe calls (setsid, setgroups, setgid,
    // setuid) on data prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            child::setsid_in_child()?;
            if let Some(c) = &creds {
                c.apply()?;
            }
            Ok(())
        });
    }
    let (mut child, waiter) = reaper
        .spawn(&mut cmd)
        .map_err(|e| spawn_error(&e, &p.argv0))?;
    let os_pid = child.id();
    let pipes = (|| -> io::Result<_> {
        let stdin = child
            .stdin
            .take()
            .map(|s| pipe::Sender::from_owned_fd(s.into()))
            .transpose()?;
        Ok((
            stdin,
            pipe_rx(child.stdout.take())?,
            pipe_rx(child.stderr.take())?,
        ))
    })();
    match pipes {
        Ok((stdin, stdout, stderr)) => Ok(Started {
            os_pid,
            waiter,
            stdin,
            stdout,
            stderr,
        }),
        Err(e) => {
            let _ = signal_group(os_pid, libc::SIGKILL);
            Err(err(
                DaemonErrorCode::Internal,
                format!("setting up pipes: {e}"),
            ))
        }
    }
}

/// Spawns `spec.cmd` with piped stdin/stdout (stderr to /dev/null) in its own process group.
pub fn spawn_piped(procs: &Procs, spec: &ExecSpec) -> Result<Piped, DaemonError> {
    let c = start(&procs.reaper, spec, true, false)?;
    Ok(Piped {
        os_pid: c.os_pid,
        stdin: c.stdin,
        stdout: c.stdout,
        waiter: Some(c.waiter),
    })
}

impl Piped {
    /// Copies `early` then the connection into stdin, and stdout into the connection, until
    /// either side ends.
    pub async fn run(&mut self, early: &[u8], conn: &mut tokio::net::UnixStream) -> io::Result<()> {
        use tokio::io::AsyncWriteExt;
        let (mut cr, mut cw) = conn.split();
        let (Some(mut stdin), Some(mut stdout)) = (self.stdin.take(), self.stdout.take()) else {
            return Ok(());
        };
        let to_proc = async move {
            if !early.is_empty() {
                stdin.write_all(early).await?;
            }
            tokio::io::copy(&mut cr, &mut stdin).await?;
            // Dropping `stdin` closes it: the process sees EOF.
            io::Result::Ok(())
        };
        let from_proc = async {
            tokio::io::copy(&mut stdout, &mut cw).await?;
            cw.shutdown().await
        };
        tokio::pin!(to_proc, from_proc);
        // The process closing its output (exiting) ends the session. The client's EOF closes
        // the process's stdin; its remaining output still flows for a short grace period.
        tokio::select! {
            r = &mut from_proc => return r,
            r = &mut to_proc => r?,
        }
        match tokio::time::timeout(Duration::from_secs(5), from_proc).await {
            Ok(r) => r,
            Err(_) => Ok(()),
        }
    }

    /// Kills the process group (SIGTERM, then SIGKILL after a second) and reaps it.
    pub async fn kill(&mut self) {
        let Some(waiter) = self.waiter.take() else {
            return;
        };
        let _ = signal_group(self.os_pid, libc::SIGTERM);
        let mut waiter = std::pin::pin!(waiter);
        if tokio::time::timeout(Duration::from_secs(1), &mut waiter)
            .await
            .is_err()
        {
            let _ = signal_group(self.os_pid, libc::SIGKILL);
            let _ = waiter.await;
        }
    }
}

impl Procs {
    pub fn new(reaper: Reaper, ring_bytes: usize) -> Arc<Procs> {
        Arc::new(Procs {
            reaper,
            table: Mutex::new(Table::default()),
            next_id: AtomicU64::new(1),
            ring_bytes,
        })
    }

    pub fn get(&self, id: &str) -> Result<Arc<Proc>, DaemonError> {
        lock(&self.table)
            .procs
            .get(id)
            .cloned()
            .ok_or_else(|| err(DaemonErrorCode::NotFound, format!("no such process: {id}")))
    }

    pub fn list(&self) -> Vec<ProcessInfo> {
        let mut procs: Vec<Arc<Proc>> = lock(&self.table).procs.values().cloned().collect();
        procs.sort_by_key(|p| p.n);
        procs.iter().map(|p| p.info()).collect()
    }

    /// Running processes' pids (for shutdown).
    pub fn running_pids(&self) -> Vec<u32> {
        lock(&self.table)
            .procs
            .values()
            .filter(|p| p.ring.finished().is_none())
            .map(|p| p.os_pid)
            .collect()
    }

    /// Starts a process. Unless detached, also returns a subscription to its output taken
    /// before it could print anything.
    pub fn spawn(
        self: &Arc<Self>,
        spec: ExecSpec,
    ) -> Result<(Arc<Proc>, Option<Subscription>), DaemonError> {
        let timeout = match spec.timeout_secs {
            None => None,
            Some(t) => Some(
                Duration::try_from_secs_f64(t)
                    .ok()
                    .filter(|d| !d.is_zero())
                    .ok_or_else(|| {
                        err(
                            DaemonErrorCode::Invalid,
                            format!("invalid timeout_secs: {t}"),
                        )
                    })?,
            ),
        };
        let Started {
            os_pid,
            waiter,
            stdin,
            stdout,
            stderr,
        } = start(&self.reaper, &spec, spec.stdin, true)?;
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let ring = Ring::new(self.ring_bytes);
        let sub = (!spec.detach).then(|| ring.subscribe(0));
        let proc = Arc::new(Proc {
            id: format!("p{n}"),
            n,
            os_pid,
            cmd: spec.cmd.clone(),
            tag: spec.tag.clone(),
            started_at_ms: now_ms(),
            ring,
            stdin: tokio::sync::Mutex::new(stdin),
        });
        lock(&self.table)
            .procs
            .insert(proc.id.clone(), proc.clone());
        tracing::debug!(id = %proc.id, os_pid, cmd = ?spec.cmd, "started");
        tokio::spawn(supervise(
            self.clone(),
            proc.clone(),
            waiter,
            stdout,
            stderr,
            timeout,
        ));
        Ok((proc, sub))
    }

    fn retire(&self, id: &str) {
        let mut t = lock(&self.table);
        t.exited.push_back(id.to_string());
        let held = |t: &Table| {
            t.exited
                .iter()
                .filter_map(|id| t.procs.get(id))
                .map(|p| p.ring.bytes())
                .sum::<usize>()
        };
        let mut evicted = 0;
        while t.exited.len() > KEEP_EXITED || (t.exited.len() > 1 && held(&t) > KEEP_EXITED_BYTES) {
            if let Some(old) = t.exited.pop_front() {
                if let Some(p) = t.procs.remove(&old) {
                    evicted += p.ring.bytes();
                }
            }
        }
        drop(t);
        if evicted > 256 * 1024 {
            // Hand the freed output buffers back to the system (idle RSS matters).
            // SAFETY: malloc_trim has no preconditions.
            unsafe { libc::malloc_trim(0) };
        }
    }
}

async fn supervise(
    procs: Arc<Procs>,
    proc: Arc<Proc>,
    waiter: ExitWaiter,
    stdout: Option<pipe::Receiver>,
    stderr: Option<pipe::Receiver>,
    timeout: Option<Duration>,
) {
    let (exit_tx, exit_rx) = watch::channel(false);
    let wait = async {
        let mut waiter = waiter;
        let exit = match timeout {
            None => (&mut waiter).await,
            Some(t) => tokio::select! {
                exit = &mut waiter => exit,
                () = tokio::time::sleep(t) => {
                    let _ = signal_group(proc.os_pid, libc::SIGKILL);
                    (&mut waiter).await
                }
            },
        };
        let _ = exit_tx.send(true);
        exit
    };
    let (exit, (), ()) = tokio::join!(
        wait,
        pump(stdout, &proc.ring, StreamKind::Stdout, exit_rx.clone()),
        pump(stderr, &proc.ring, StreamKind::Stderr, exit_rx),
    );
    let timed_out = timeout.is_some() && exit == Some(ChildExit::Signal(libc::SIGKILL));
    proc.stdin.lock().await.take();
    let status = proc.ring.finish(exit_status(exit, timed_out));
    tracing::debug!(id = %proc.id, ?status, "exited");
    procs.retire(&proc.id);
}

/// One non-blocking `read(2)`.
pub fn read_raw(fd: &impl AsRawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: buf is valid for buf.len() bytes.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Copies a pipe into the ring until EOF, or, once the process exited, until the pipe is
/// momentarily empty (so a grandchild holding the pipe open does not keep the process alive).
async fn pump(
    rx: Option<pipe::Receiver>,
    ring: &Ring,
    stream: StreamKind,
    mut exited: watch::Receiver<bool>,
) {
    let Some(mut rx) = rx else { return };
    let mut buf = vec![0u8; READ_BYTES];
    let mut exiting = false;
    loop {
        if !exiting {
            tokio::select! {
                r = rx.read(&mut buf) => match r {
                    Ok(0) => return,
                    Ok(n) => ring.push(stream, Bytes::copy_from_slice(&buf[..n])).await,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return,
                },
                ok = async { exited.wait_for(|v| *v).await.is_ok() } => {
                    exiting = true;
                    if !ok {
                        return;
                    }
                }
            }
        } else {
            let mut drained = 0;
            loop {
                // A raw read: tokio's `try_read` trusts its cached readiness, which may not have
                // seen the last writes yet.
                match read_raw(&rx, &mut buf) {
                    Ok(0) => return,
                    Ok(n) => {
                        ring.push(stream, Bytes::copy_from_slice(&buf[..n])).await;
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
    }
}
