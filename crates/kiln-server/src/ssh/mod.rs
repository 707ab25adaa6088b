//! The SSH front door of `kiln up` (russh, ring crypto): `ssh SANDBOX_ID@HOST -p 2222`
//! authenticates with a public key registered to the sandbox's organisation
//! (`/v1/ssh-keys`) and gives a shell with or without a PTY, `ssh HOST CMD` with its exit
//! status, the `sftp` subsystem (so `scp` and `sftp` work) and local port forwarding
//! (`direct-tcpip`). Everything goes through the sandbox's kilnd: PTYs (`PtyOpen`),
//! processes (`Exec`), files (the SFTP mapping in [`sftp`]) and TCP (`Connect`), so no SSH
//! daemon runs inside a sandbox and every network mode works.
//!
//! Architecture invariant: a session is bound to one sandbox at authentication, and only
//! when the verified key is registered to the organisation that owns that sandbox (the same
//! rule as `Kiln::sandbox`); a key of another organisation is refused like an unknown key.

pub mod keys;
mod sftp;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use kiln_protocol::api::SandboxState;
use kiln_protocol::kilnd::{ExecSpec, ExitStatus, PtySpec, Reply, StreamKind};
use kilnd::client::{Client, PtyEvent};
use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::{HashAlg, PrivateKey, PublicKey};
use russh::server::{Auth, ChannelOpenHandle, Msg, PublicKeyOffer, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId, ChannelMsg, ChannelOpenFailure, MethodKind, MethodSet, Sig};
use tokio_util::sync::CancellationToken;

use crate::service::{now_ms, AppState};
use crate::ServerError;

/// Where the SSH server listens and the host key clients should expect.
#[derive(Debug, Clone)]
pub struct Listening {
    pub addr: SocketAddr,
    /// The host public key as an OpenSSH line (`ssh-ed25519 AAAA...`).
    pub host_key: String,
}

/// The host key file in the data dir.
pub const HOST_KEY_FILE: &str = "ssh_host_ed25519_key";

/// Loads `<data dir>/ssh_host_ed25519_key`, creating it (0600) on first start.
pub fn host_key(data_dir: &Path) -> Result<PrivateKey, ServerError> {
    let path = data_dir.join(HOST_KEY_FILE);
    let io_err = |e: std::io::Error| ServerError::Io {
        path: path.display().to_string(),
        source: e,
    };
    let bad = |e: russh::keys::ssh_key::Error| {
        io_err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            e.to_string(),
        ))
    };
    match std::fs::read_to_string(&path) {
        Ok(pem) => PrivateKey::from_openssh(pem.trim()).map_err(bad),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut seed = [0u8; 32];
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut seed);
            let key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
            let pem = key
                .to_openssh(russh::keys::ssh_key::LineEnding::LF)
                .map_err(bad)?;
            crate::write_0600(&path, &pem).map_err(io_err)?;
            Ok(key)
        }
        Err(e) => Err(io_err(e)),
    }
}

/// Binds `addr` and serves SSH until `shutdown` fires. Returns where it listens.
pub async fn start(
    kiln: AppState,
    addr: SocketAddr,
    shutdown: CancellationToken,
) -> Result<Listening, ServerError> {
    let key = host_key(&kiln.cfg.data_dir)?;
    let host_key = key
        .public_key()
        .to_openssh()
        .map_err(|e| ServerError::Reconcile(format!("ssh host key: {e}")))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| ServerError::Bind { addr, source })?;
    let config = Arc::new(russh::server::Config {
        server_id: russh::SshId::Standard("SSH-2.0-kiln".into()),
        methods: MethodSet::from(&[MethodKind::PublicKey][..]),
        auth_rejection_time: Duration::from_millis(300),
        auth_rejection_time_initial: Some(Duration::ZERO),
        keys: vec![key],
        // IDEs keep idle connections for hours; keepalives find dead peers instead.
        inactivity_timeout: None,
        keepalive_interval: Some(Duration::from_secs(30)),
        keepalive_max: 4,
        nodelay: true,
        ..Default::default()
    });
    let listening = Listening {
        addr: bound,
        host_key,
    };
    let _ = kiln.ssh.set(listening.clone());
    tokio::spawn(async move {
        loop {
            let (sock, peer) = tokio::select! {
                () = shutdown.cancelled() => return,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "ssh accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let handler = Conn {
                kiln: kiln.clone(),
                peer,
                login: None,
            };
            let (config, shutdown) = (config.clone(), shutdown.clone());
            tokio::spawn(async move {
                let _ = sock.set_nodelay(true);
                let session = match russh::server::run_stream(config, sock, handler).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::debug!(error = %e, %peer, "ssh handshake failed");
                        return;
                    }
                };
                let handle = session.handle();
                tokio::select! {
                    () = shutdown.cancelled() => {
                        let _ = handle
                            .disconnect(russh::Disconnect::ByApplication, "server stopping".into(), String::new())
                            .await;
                    }
                    r = session => {
                        if let Err(e) = r {
                            tracing::debug!(error = %e, %peer, "ssh session ended with an error");
                        }
                    }
                }
            });
        }
    });
    Ok(listening)
}

/// Errors that end an SSH connection.
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error(transparent)]
    Ssh(#[from] russh::Error),
}

/// Who an authenticated connection is.
#[derive(Debug, Clone)]
struct Login {
    sandbox: String,
    org: String,
    ssh_key: String,
}

/// One SSH connection.
struct Conn {
    kiln: AppState,
    peer: SocketAddr,
    login: Option<Login>,
}

impl Conn {
    /// The login `user` (a sandbox id) gets with `key`, if the key is registered to the
    /// sandbox's organisation.
    async fn authorize(&self, user: &str, key: &PublicKey) -> Option<Login> {
        let fp = key.fingerprint(HashAlg::Sha256).to_string();
        let regs = match self.kiln.store.ssh_keys_by_fingerprint(&fp).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "ssh key lookup failed");
                return None;
            }
        };
        if regs.is_empty() {
            return None;
        }
        let row = self.kiln.store.get(user).await.ok().flatten()?;
        if row.pooled {
            return None;
        }
        let reg = regs.into_iter().find(|r| {
            r.org_id == row.org_id
                && PublicKey::from_openssh(&r.public_key)
                    .is_ok_and(|k| k.key_data() == key.key_data())
        })?;
        Some(Login {
            sandbox: row.sandbox.id,
            org: row.org_id,
            ssh_key: reg.id,
        })
    }

    async fn audit(&self, login: &Login) {
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let time_ms = now_ms();
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let row = kiln_store::AuditRow {
            id: format!("aud_{time_ms:013}_ssh{seq:06}"),
            time_ms,
            org_id: login.org.clone(),
            key_prefix: login.ssh_key.clone(),
            action: "SSH login".into(),
            resource: format!("/v1/sandboxes/{}", login.sandbox),
            outcome: "ok".into(),
            status: 0,
            client: self.peer.ip().to_string(),
            request_id: String::new(),
        };
        if let Err(e) = self.kiln.store.append_audit(&row).await {
            tracing::warn!(error = %e, "ssh audit entry failed");
        }
    }
}

impl russh::server::Handler for Conn {
    type Error = SshError;

    async fn auth_publickey_offered(
        &mut self,
        user: &str,
        offer: PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(match self.authorize(user, offer.public_key).await {
            Some(_) => Auth::Accept,
            None => Auth::reject(),
        })
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        match self.authorize(user, key.public_key).await {
            Some(login) => {
                self.audit(&login).await;
                metrics::counter!("kiln_ssh_logins_total", "outcome" => "ok").increment(1);
                self.login = Some(login);
                Ok(Auth::Accept)
            }
            None => {
                metrics::counter!("kiln_ssh_logins_total", "outcome" => "denied").increment(1);
                Ok(Auth::reject())
            }
        }
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(login) = self.login.clone() else {
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        };
        reply.accept().await;
        let (kiln, handle) = (self.kiln.clone(), session.handle());
        tokio::spawn(session_channel(kiln, login, channel, handle));
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let (Some(login), Ok(port)) = (self.login.clone(), u16::try_from(port_to_connect)) else {
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        };
        let host = match host_to_connect {
            "localhost" | "127.0.0.1" | "" => None,
            h => Some(h.to_string()),
        };
        let kiln = self.kiln.clone();
        tokio::spawn(async move {
            let tunnel = match usable_client(&kiln, &login.sandbox).await {
                Ok(c) => c.connect(port, host.as_deref()).await.ok(),
                Err(_) => None,
            };
            let Some(mut tunnel) = tunnel else {
                reply.reject(ChannelOpenFailure::ConnectFailed).await;
                return;
            };
            reply.accept().await;
            metrics::counter!("kiln_ssh_forwards_total").increment(1);
            let mut stream = channel.into_stream();
            let _ = tokio::io::copy_bidirectional(&mut stream, &mut tunnel).await;
        });
        Ok(())
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        _term: &str,
        _col_width: u32,
        _row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)?;
        Ok(())
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)?;
        Ok(())
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        _data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)?;
        Ok(())
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if name == "sftp" {
            session.channel_success(channel)?;
        } else {
            session.channel_failure(channel)?;
        }
        Ok(())
    }
}

/// The kilnd client of a sandbox that is running on this server, or why not.
async fn usable_client(kiln: &AppState, id: &str) -> Result<Client, String> {
    let row = kiln
        .store
        .get(id)
        .await
        .map_err(|e| format!("kiln: cannot read sandbox {id}: {e}"))?
        .ok_or_else(|| format!("kiln: sandbox {id} no longer exists"))?;
    if row.host != kiln.store.host() {
        return Err(format!(
            "kiln: sandbox {id} runs on another Kiln server; connect to that one"
        ));
    }
    match row.sandbox.state {
        SandboxState::Running => Ok(kiln.runtime.client(id)),
        SandboxState::Paused => Err(format!(
            "kiln: sandbox {id} is paused (resume it: kiln sandbox resume {id})"
        )),
        SandboxState::Creating => Err(format!("kiln: sandbox {id} is still being created")),
        SandboxState::Dead => Err(format!("kiln: sandbox {id} is dead")),
    }
}

/// What a session channel was asked to run.
enum Start {
    Shell,
    Exec(String),
    Sftp,
}

/// Environment variables a client may set (as OpenSSH's default `AcceptEnv`).
fn accepted_env(name: &str) -> bool {
    name == "LANG" || name.starts_with("LC_") || name == "COLORTERM"
}

type Writer = russh::ChannelWriteHalf<Msg>;

/// Drives one session channel: collects `pty-req`/`env`, then runs the shell, the command or
/// the SFTP server it asks for.
async fn session_channel(
    kiln: AppState,
    login: Login,
    mut channel: Channel<Msg>,
    handle: russh::server::Handle,
) {
    let mut pty: Option<(u16, u16)> = None;
    let mut env = BTreeMap::new();
    let start = loop {
        match channel.wait().await {
            Some(ChannelMsg::RequestPty {
                term,
                col_width,
                row_height,
                ..
            }) => {
                pty = Some((clamp(col_width), clamp(row_height)));
                env.insert("TERM".to_string(), term);
            }
            Some(ChannelMsg::SetEnv {
                variable_name,
                variable_value,
                ..
            }) if accepted_env(&variable_name) => {
                env.insert(variable_name, variable_value);
            }
            Some(ChannelMsg::RequestShell { .. }) => break Start::Shell,
            Some(ChannelMsg::Exec { command, .. }) => {
                break Start::Exec(String::from_utf8_lossy(&command).into_owned())
            }
            Some(ChannelMsg::RequestSubsystem { name, .. }) if name == "sftp" => break Start::Sftp,
            Some(ChannelMsg::Close) | None => return,
            Some(_) => {}
        }
    };
    let id = channel.id();
    let client = match usable_client(&kiln, &login.sandbox).await {
        Ok(c) => c,
        Err(msg) => {
            let (_, w) = channel.split();
            let _ = w
                .extended_data_bytes(1, format!("{msg}\r\n").into_bytes())
                .await;
            finish(&w, &handle, id, 255, None).await;
            return;
        }
    };
    metrics::counter!("kiln_ssh_channels_total", "kind" => match (&start, pty) {
        (Start::Sftp, _) => "sftp",
        (_, Some(_)) => "pty",
        (Start::Exec(_), None) => "exec",
        (Start::Shell, None) => "shell",
    })
    .increment(1);
    match (start, pty) {
        (Start::Sftp, _) => run_sftp(client, channel, handle).await,
        (start, Some((cols, rows))) => {
            let cmd = match start {
                Start::Exec(c) => vec!["/bin/sh".into(), "-c".into(), c],
                _ => Vec::new(),
            };
            run_pty(client, channel, handle, cmd, cols, rows, env).await;
        }
        (start, None) => {
            // As sshd does: the command runs through a shell in the user's home directory.
            let cmd = match start {
                Start::Exec(c) => vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    "cd 2>/dev/null; exec /bin/sh -c \"$1\"".into(),
                    "sh".into(),
                    c,
                ],
                _ => vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    "cd 2>/dev/null; exec /bin/sh -l".into(),
                ],
            };
            run_exec(client, channel, handle, cmd, env).await;
        }
    }
}

/// The SFTP server on a channel, through an in-memory pipe so that when it ends (the client
/// sent EOF) the channel still reports exit status 0 before closing, as OpenSSH's does.
async fn run_sftp(client: Client, channel: Channel<Msg>, handle: russh::server::Handle) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let id = channel.id();
    let (ours, theirs) = tokio::io::duplex(256 << 10);
    russh_sftp::server::run(theirs, sftp::Sftp::new(client).await).await;
    let (mut cr, cw) = channel.split();
    let (mut rd, mut wr) = tokio::io::split(ours);
    let up = async {
        while let Some(m) = cr.wait().await {
            match m {
                ChannelMsg::Data { data } => {
                    let failed = wr.write_all(&data).await.is_err();
                    if failed {
                        break;
                    }
                }
                ChannelMsg::Eof | ChannelMsg::Close => break,
                _ => {}
            }
        }
        let _ = wr.shutdown().await;
    };
    let down = async {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if cw.data_bytes(buf[..n].to_vec()).await.is_err() {
                        break;
                    }
                }
            }
        }
    };
    tokio::join!(up, down);
    finish(&cw, &handle, id, 0, None).await;
}

fn clamp(v: u32) -> u16 {
    u16::try_from(v).unwrap_or(u16::MAX).max(1)
}

/// The signal names SSH knows (RFC 4254 6.10) and their numbers.
const SIGNALS: [(Sig, i32); 12] = [
    (Sig::ABRT, libc::SIGABRT),
    (Sig::ALRM, libc::SIGALRM),
    (Sig::FPE, libc::SIGFPE),
    (Sig::HUP, libc::SIGHUP),
    (Sig::ILL, libc::SIGILL),
    (Sig::INT, libc::SIGINT),
    (Sig::KILL, libc::SIGKILL),
    (Sig::PIPE, libc::SIGPIPE),
    (Sig::QUIT, libc::SIGQUIT),
    (Sig::SEGV, libc::SIGSEGV),
    (Sig::TERM, libc::SIGTERM),
    (Sig::USR1, libc::SIGUSR1),
];

fn signal_number(s: &Sig) -> Option<i32> {
    SIGNALS
        .iter()
        .find(|(n, _)| std::mem::discriminant(n) == std::mem::discriminant(s))
        .map(|(_, v)| *v)
}

/// Reports how the process ended (`exit-status`, or `exit-signal` for a known signal),
/// then EOF and close.
async fn finish(
    w: &Writer,
    handle: &russh::server::Handle,
    id: ChannelId,
    code: u32,
    signal: Option<i32>,
) {
    match signal.and_then(|s| SIGNALS.iter().find(|(_, v)| *v == s)) {
        Some((sig, _)) => {
            let _ = handle
                .exit_signal_request(id, sig.clone(), false, String::new(), String::new())
                .await;
        }
        None => {
            let _ = w.exit_status(code).await;
        }
    }
    let _ = w.eof().await;
    let _ = w.close().await;
}

fn exit_code(s: &ExitStatus) -> (u32, Option<i32>) {
    match (s.exit_code, s.signal) {
        (Some(c), _) => (c as u32, None),
        (None, Some(sig)) => (128 + sig as u32, Some(sig)),
        (None, None) => (255, None),
    }
}

fn start_error(e: &kilnd::client::ClientError) -> (String, u32) {
    match e.code() {
        Some(kiln_protocol::kilnd::DaemonErrorCode::CommandNotFound) => {
            (format!("kiln: {e}\r\n"), 127)
        }
        _ => (format!("kiln: cannot start: {e}\r\n"), 255),
    }
}

/// A shell or command on a PTY (`ssh -t`): kilnd's PTY session, resized on `window-change`;
/// closing the channel hangs the session up.
async fn run_pty(
    client: Client,
    channel: Channel<Msg>,
    handle: russh::server::Handle,
    cmd: Vec<String>,
    cols: u16,
    rows: u16,
    env: BTreeMap<String, String>,
) {
    let id = channel.id();
    let (mut cr, cw) = channel.split();
    let spec = PtySpec {
        cmd,
        env,
        cwd: None,
        user: None,
        cols,
        rows,
    };
    let session = match client.pty_open(spec).await {
        Ok(s) => s,
        Err(e) => {
            let (msg, code) = start_error(&e);
            let _ = cw.extended_data_bytes(1, msg.into_bytes()).await;
            finish(&cw, &handle, id, code, None).await;
            return;
        }
    };
    let (mut rd, mut wr) = session.into_split();
    let output = async {
        while let Some(ev) = rd.next().await {
            match ev {
                Ok(PtyEvent::Output(b)) => {
                    if cw.data_bytes(b).await.is_err() {
                        return None;
                    }
                }
                Ok(PtyEvent::Exited(s)) => return Some(s),
                Err(_) => return None,
            }
        }
        None
    };
    let input = async {
        while let Some(m) = cr.wait().await {
            let r = match m {
                ChannelMsg::Data { data } => wr.input(&data).await,
                ChannelMsg::WindowChange {
                    col_width,
                    row_height,
                    ..
                } => wr.resize(clamp(col_width), clamp(row_height)).await,
                ChannelMsg::Signal { signal } => match signal_number(&signal) {
                    Some(n) => wr.signal(n).await,
                    None => Ok(()),
                },
                ChannelMsg::Close => break,
                _ => Ok(()),
            };
            if r.is_err() {
                break;
            }
        }
    };
    let ended = tokio::select! {
        s = output => s,
        () = input => {
            // The client went away: hang up the terminal as a real one would.
            let _ = wr.signal(libc::SIGHUP).await;
            return;
        }
    };
    let (code, sig) = ended.as_ref().map_or((255, None), exit_code);
    finish(&cw, &handle, id, code, sig).await;
}

/// A command (or a shell) without a PTY: stdout as channel data, stderr as extended data 1,
/// EOF closes stdin, the exit status is reported.
async fn run_exec(
    client: Client,
    channel: Channel<Msg>,
    handle: russh::server::Handle,
    cmd: Vec<String>,
    env: BTreeMap<String, String>,
) {
    let id = channel.id();
    let (mut cr, cw) = channel.split();
    let spec = ExecSpec {
        cmd,
        env,
        stdin: true,
        tag: Some("ssh".into()),
        ..Default::default()
    };
    let exec = match client.exec(spec).await {
        Ok(s) => s,
        Err(e) => {
            let (msg, code) = start_error(&e);
            let _ = cw.extended_data_bytes(1, msg.into_bytes()).await;
            finish(&cw, &handle, id, code, None).await;
            return;
        }
    };
    let pid = exec.pid().to_string();
    let (mut replies, mut stdin) = exec.into_split();
    let output = async {
        while let Some(r) = replies.next().await {
            match r {
                Ok(Reply::Output { stream, data, .. }) => {
                    let sent = match stream {
                        StreamKind::Stdout => cw.data_bytes(data).await,
                        StreamKind::Stderr => cw.extended_data_bytes(1, data).await,
                    };
                    if sent.is_err() {
                        return None;
                    }
                }
                Ok(Reply::Exited(s)) => return Some(s),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
        None
    };
    let input = async {
        let mut open = true;
        while let Some(m) = cr.wait().await {
            match m {
                ChannelMsg::Data { data } if open => {
                    open = stdin.send(&data).await.is_ok();
                }
                ChannelMsg::Eof if open => {
                    open = false;
                    let _ = stdin.close().await;
                }
                ChannelMsg::Signal { signal } => {
                    if let Some(n) = signal_number(&signal) {
                        let _ = client.signal(&pid, n).await;
                    }
                }
                ChannelMsg::Close => break,
                _ => {}
            }
        }
    };
    let ended = tokio::select! {
        s = output => s,
        () = input => {
            let _ = client.signal(&pid, libc::SIGHUP).await;
            return;
        }
    };
    let (code, sig) = ended.as_ref().map_or((255, None), exit_code);
    finish(&cw, &handle, id, code, sig).await;
}
