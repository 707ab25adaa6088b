//! Host-side client of a sandbox's kilnd: one Unix connection per operation, speaking the
//! frames of [`kiln_protocol::kilnd`].

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::stream::{self, BoxStream, Stream, StreamExt};
use kiln_protocol::kilnd::{
    Control, DaemonError, DaemonErrorCode, ExecSpec, ExitStatus, FileStat, ListenPort, OkBody,
    ProcessInfo, PtySpec, Reply, Request, WatchEvent,
};
use tokio::io::{AsyncRead, AsyncReadExt, BufReader, ReadHalf, WriteHalf};
use tokio::net::UnixStream;

use crate::frame::{self, Frame, DATA_CHUNK};

/// What can go wrong talking to kilnd.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The daemon is unreachable: its socket is missing or refuses connections.
    #[error("cannot connect to kilnd: {0}")]
    Connect(#[source] io::Error),
    /// The connection failed after it was established.
    #[error("kilnd connection: {0}")]
    Io(#[from] io::Error),
    /// The daemon said something that does not fit the protocol.
    #[error("kilnd protocol error: {0}")]
    Protocol(String),
    /// The daemon answered with an error.
    #[error("kilnd: {}", .0.message)]
    Daemon(DaemonError),
}

impl ClientError {
    /// The daemon's error code, if this is a daemon error.
    pub fn code(&self) -> Option<DaemonErrorCode> {
        match self {
            ClientError::Daemon(e) => Some(e.code),
            _ => None,
        }
    }
}

type Result<T, E = ClientError> = std::result::Result<T, E>;
// `tokio::io::split` (not `into_split`): dropping a write half must not half-close the
// socket, which kilnd would take for a client that went away.
type Reader = BufReader<ReadHalf<UnixStream>>;
type Writer = WriteHalf<UnixStream>;

/// Client of one kilnd socket. Cheap to clone; every operation opens its own connection.
#[derive(Debug, Clone)]
pub struct Client {
    socket: Arc<Path>,
}

struct Conn {
    r: Reader,
    w: Writer,
}

async fn read_reply(r: &mut Reader) -> Result<Reply> {
    match frame::read_frame(r).await? {
        Some(f @ Frame::Json(_)) => f
            .parse::<Reply>()
            .map_err(|e| ClientError::Protocol(e.to_string())),
        Some(Frame::Data(_)) => Err(ClientError::Protocol("unexpected data frame".into())),
        Some(Frame::End) => Err(ClientError::Protocol("unexpected end frame".into())),
        None => Err(ClientError::Protocol(
            "kilnd closed the connection without a reply".into(),
        )),
    }
}

/// Turns `Reply::Error` into `Err`.
fn check(reply: Reply) -> Result<Reply> {
    match reply {
        Reply::Error(e) => Err(ClientError::Daemon(e)),
        other => Ok(other),
    }
}

fn unexpected(reply: &Reply) -> ClientError {
    ClientError::Protocol(format!("unexpected reply: {reply:?}"))
}

impl Client {
    /// A client for the daemon listening on `socket_path`. Connects lazily.
    pub fn new(socket_path: impl Into<PathBuf>) -> Self {
        Client {
            socket: Arc::from(socket_path.into()),
        }
    }

    /// The socket this client talks to.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    async fn open(&self, req: &Request) -> Result<Conn> {
        let stream = UnixStream::connect(&*self.socket)
            .await
            .map_err(ClientError::Connect)?;
        let (r, mut w) = tokio::io::split(stream);
        frame::write_json(&mut w, req).await?;
        Ok(Conn {
            r: BufReader::with_capacity(DATA_CHUNK + 16, r),
            w,
        })
    }

    /// Sends `req` and returns the body of its `Ok` reply.
    async fn call(&self, req: &Request) -> Result<Option<OkBody>> {
        let mut c = self.open(req).await?;
        match check(read_reply(&mut c.r).await?)? {
            Reply::Ok { body } => Ok(body),
            other => Err(unexpected(&other)),
        }
    }

    async fn call_stat(&self, req: &Request) -> Result<FileStat> {
        match self.call(req).await? {
            Some(OkBody::Stat(s)) => Ok(s),
            other => Err(ClientError::Protocol(format!(
                "expected a stat, got {other:?}"
            ))),
        }
    }

    /// Liveness check; returns the daemon's version.
    pub async fn ping(&self) -> Result<String> {
        match self.call(&Request::Ping).await? {
            Some(OkBody::Pong { version }) => Ok(version),
            other => Err(ClientError::Protocol(format!(
                "expected a pong, got {other:?}"
            ))),
        }
    }

    /// Starts a process. Returns once the daemon answered `Started` (or an error such as
    /// `command_not_found`).
    pub async fn exec(&self, spec: ExecSpec) -> Result<ExecStream> {
        let detach = spec.detach;
        let mut c = self.open(&Request::Exec { spec }).await?;
        match check(read_reply(&mut c.r).await?)? {
            Reply::Started { pid, os_pid } => Ok(ExecStream {
                pid,
                os_pid,
                replies: ReplyStream::new(c.r, detach),
                stdin: StdinWriter { w: c.w },
            }),
            other => Err(unexpected(&other)),
        }
    }

    /// Follows a process: `Gap`?, `Output`*, `Exited`. Fails with `not_found` at once for an
    /// unknown id.
    pub async fn attach(&self, pid: &str, after_seq: u64) -> Result<ReplyStream> {
        // The protocol sends nothing for a running, silent process, so check the id first to
        // report an unknown one synchronously.
        if !self.list_processes().await?.iter().any(|p| p.pid == pid) {
            return Err(ClientError::Daemon(DaemonError {
                code: DaemonErrorCode::NotFound,
                message: format!("no such process: {pid}"),
            }));
        }
        let c = self
            .open(&Request::Attach {
                pid: pid.to_string(),
                after_seq,
            })
            .await?;
        Ok(ReplyStream::new(c.r, false))
    }

    /// Writes `data` to a process's stdin (and closes it if `close`).
    pub async fn stdin(&self, pid: &str, data: &[u8], close: bool) -> Result<()> {
        let mut c = self
            .open(&Request::Stdin {
                pid: pid.to_string(),
                close,
            })
            .await?;
        let sent = async {
            frame::write_data(&mut c.w, data).await?;
            frame::write_end(&mut c.w).await
        }
        .await;
        let reply = read_reply(&mut c.r).await;
        match (reply, sent) {
            (Ok(r), _) => match check(r)? {
                Reply::Ok { .. } => Ok(()),
                other => Err(unexpected(&other)),
            },
            (Err(_), Err(e)) => Err(e.into()),
            (Err(e), Ok(())) => Err(e),
        }
    }

    /// Sends signal `sig` to a process's group.
    pub async fn signal(&self, pid: &str, sig: i32) -> Result<()> {
        self.call(&Request::Signal {
            pid: pid.to_string(),
            signal: sig,
        })
        .await
        .map(|_| ())
    }

    /// Processes started through kilnd, running and recently exited.
    pub async fn list_processes(&self) -> Result<Vec<ProcessInfo>> {
        match self.call(&Request::ListProcesses).await? {
            Some(OkBody::Processes { processes }) => Ok(processes),
            other => Err(ClientError::Protocol(format!(
                "expected processes, got {other:?}"
            ))),
        }
    }

    /// Opens a PTY session.
    pub async fn pty_open(&self, spec: PtySpec) -> Result<PtySession> {
        self.pty(&Request::PtyOpen { spec }).await
    }

    /// Re-attaches a PTY session (the buffered output is replayed first).
    pub async fn pty_attach(&self, id: &str) -> Result<PtySession> {
        self.pty(&Request::PtyAttach { id: id.to_string() }).await
    }

    async fn pty(&self, req: &Request) -> Result<PtySession> {
        let mut c = self.open(req).await?;
        match check(read_reply(&mut c.r).await?)? {
            Reply::PtyOpened { id, os_pid } => Ok(PtySession {
                id,
                os_pid,
                reader: PtyReader::new(c.r),
                writer: PtyWriter { w: c.w },
            }),
            other => Err(unexpected(&other)),
        }
    }

    /// Streams a file: its metadata, then its bytes.
    pub async fn read_file(&self, path: &str) -> Result<(FileStat, DataStream)> {
        let mut c = self
            .open(&Request::ReadFile {
                path: path.to_string(),
            })
            .await?;
        match check(read_reply(&mut c.r).await?)? {
            Reply::Ok {
                body: Some(OkBody::Stat(stat)),
            } => Ok((stat, DataStream::new(c.r))),
            other => Err(unexpected(&other)),
        }
    }

    /// Writes a file atomically from `reader`, streamed in 64 KiB frames (never buffered whole).
    pub async fn write_file<R: AsyncRead + Unpin>(
        &self,
        path: &str,
        mode: Option<u32>,
        parents: bool,
        mut reader: R,
    ) -> Result<FileStat> {
        let mut c = self
            .open(&Request::WriteFile {
                path: path.to_string(),
                mode,
                parents,
            })
            .await?;
        let mut buf = vec![0u8; DATA_CHUNK];
        let sent: io::Result<()> = async {
            loop {
                // Fill a whole chunk (or up to EOF) so frames are 64 KiB.
                let mut n = 0;
                while n < buf.len() {
                    let got = reader
                        .read(&mut buf[n..])
                        .await
                        .map_err(|e| io::Error::new(e.kind(), Source(e)))?;
                    if got == 0 {
                        break;
                    }
                    n += got;
                }
                if n == 0 {
                    break;
                }
                frame::write_data(&mut c.w, &buf[..n]).await?;
                if n < buf.len() {
                    break;
                }
            }
            frame::write_end(&mut c.w).await
        }
        .await;
        if let Err(e) = sent {
            if let Some(src) = e.get_ref().and_then(|s| s.downcast_ref::<Source>()) {
                // Reading the source failed: dropping the connection makes kilnd discard the file.
                return Err(ClientError::Io(io::Error::new(
                    src.0.kind(),
                    src.0.to_string(),
                )));
            }
            // kilnd may have answered early (e.g. `not_found`) and closed: prefer its answer.
            return match read_reply(&mut c.r).await {
                Ok(Reply::Error(d)) => Err(ClientError::Daemon(d)),
                _ => Err(ClientError::Io(e)),
            };
        }
        match check(read_reply(&mut c.r).await?)? {
            Reply::Ok {
                body: Some(OkBody::Stat(s)),
            } => Ok(s),
            other => Err(unexpected(&other)),
        }
    }

    /// Lists a directory (`depth` 1 = its entries only).
    pub async fn list_dir(&self, path: &str, depth: u32) -> Result<Vec<FileStat>> {
        match self
            .call(&Request::ListDir {
                path: path.to_string(),
                depth,
            })
            .await?
        {
            Some(OkBody::Entries { entries }) => Ok(entries),
            other => Err(ClientError::Protocol(format!(
                "expected entries, got {other:?}"
            ))),
        }
    }

    /// Metadata of a path (symlinks are not followed).
    pub async fn stat(&self, path: &str) -> Result<FileStat> {
        self.call_stat(&Request::Stat {
            path: path.to_string(),
        })
        .await
    }

    /// Creates a directory (`parents`: like `mkdir -p`).
    pub async fn mkdir(&self, path: &str, parents: bool) -> Result<FileStat> {
        self.call_stat(&Request::Mkdir {
            path: path.to_string(),
            parents,
        })
        .await
    }

    /// Renames `from` to `to`; refuses to replace an existing `to` unless `overwrite`.
    pub async fn move_path(&self, from: &str, to: &str, overwrite: bool) -> Result<FileStat> {
        self.call_stat(&Request::Move {
            from: from.to_string(),
            to: to.to_string(),
            overwrite,
        })
        .await
    }

    /// Removes a file or directory (`recursive` for non-empty directories).
    pub async fn remove(&self, path: &str, recursive: bool) -> Result<()> {
        self.call(&Request::Remove {
            path: path.to_string(),
            recursive,
        })
        .await
        .map(|_| ())
    }

    /// Watches a path; returns once the watch is armed.
    /// The TCP ports something listens on in the sandbox.
    pub async fn list_ports(&self) -> Result<Vec<ListenPort>> {
        match self.call(&Request::ListPorts).await? {
            Some(OkBody::Ports { ports }) => Ok(ports),
            other => Err(ClientError::Protocol(format!(
                "unexpected reply to ListPorts: {other:?}"
            ))),
        }
    }

    /// The listening ports now, then each change (polled every `interval_ms` in the sandbox).
    pub async fn watch_ports(&self, interval_ms: u32) -> Result<(Vec<ListenPort>, PortsStream)> {
        let mut c = self.open(&Request::WatchPorts { interval_ms }).await?;
        match check(read_reply(&mut c.r).await?)? {
            Reply::Ok {
                body: Some(OkBody::Ports { ports }),
            } => {
                let inner = stream::unfold((c, false), |(mut c, ended)| async move {
                    if ended {
                        return None;
                    }
                    let item = match read_reply(&mut c.r).await {
                        Ok(Reply::Ports { ports }) => return Some((Ok(ports), (c, false))),
                        Ok(Reply::Error(e)) => ClientError::Daemon(e),
                        Ok(other) => unexpected(&other),
                        Err(e) => e,
                    };
                    Some((Err(item), (c, true)))
                });
                Ok((
                    ports,
                    PortsStream {
                        inner: inner.boxed(),
                    },
                ))
            }
            other => Err(unexpected(&other)),
        }
    }

    /// A TCP connection to `port` on `host` (default loopback) inside the sandbox, as a
    /// byte stream (reads and writes go to that connection; `shutdown` half-closes it).
    pub async fn connect(&self, port: u16, host: Option<&str>) -> Result<Tunnel> {
        self.tunnel(&Request::Connect {
            port,
            host: host.map(str::to_string),
        })
        .await
    }

    /// Sends `req`, whose `Ok` reply turns the connection into a raw byte stream.
    async fn tunnel(&self, req: &Request) -> Result<Tunnel> {
        let c = self.open(req).await?;
        let mut r = c.r;
        match check(read_reply(&mut r).await?)? {
            Reply::Ok { .. } => {
                // Whatever the far end already sent may sit in the read buffer.
                let early = r.buffer().to_vec();
                let stream = r.into_inner().unsplit(c.w);
                Ok(Tunnel {
                    early,
                    pos: 0,
                    stream,
                })
            }
            other => Err(unexpected(&other)),
        }
    }

    /// Starts `spec.cmd` with this connection as its stdin and stdout (see `Request::Pipe`):
    /// dropping the returned stream kills the process; its exit ends the stream.
    pub async fn pipe(&self, spec: ExecSpec) -> Result<Tunnel> {
        self.tunnel(&Request::Pipe { spec }).await
    }

    pub async fn watch(&self, path: &str, recursive: bool) -> Result<WatchStream> {
        let mut c = self
            .open(&Request::Watch {
                path: path.to_string(),
                recursive,
            })
            .await?;
        match check(read_reply(&mut c.r).await?)? {
            Reply::Ok { .. } => Ok(WatchStream::new(c.r)),
            other => Err(unexpected(&other)),
        }
    }
}

/// Marks errors of the caller's reader in `write_file`.
#[derive(Debug)]
struct Source(io::Error);

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "reading the source: {}", self.0)
    }
}

impl std::error::Error for Source {}

/// Replies of a process conversation: `Gap`?, `Output`*, then `Exited` (after which the stream
/// ends). A daemon error is yielded as `Err` and ends the stream.
pub struct ReplyStream {
    inner: BoxStream<'static, Result<Reply>>,
}

impl std::fmt::Debug for ReplyStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReplyStream")
    }
}

impl ReplyStream {
    fn new(r: Reader, ended: bool) -> Self {
        let inner = stream::unfold((r, ended), |(mut r, ended)| async move {
            if ended {
                return None;
            }
            match read_reply(&mut r).await {
                Ok(reply @ Reply::Exited(_)) => Some((Ok(reply), (r, true))),
                Ok(Reply::Error(e)) => Some((Err(ClientError::Daemon(e)), (r, true))),
                Ok(reply) => Some((Ok(reply), (r, false))),
                Err(e) => Some((Err(e), (r, true))),
            }
        });
        ReplyStream {
            inner: inner.boxed(),
        }
    }

    /// The next reply, or `None` after `Exited` (or at once for a detached exec).
    pub async fn next(&mut self) -> Option<Result<Reply>> {
        self.inner.next().await
    }
}

impl Stream for ReplyStream {
    type Item = Result<Reply>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

/// Writes to the stdin of the process of an [`ExecStream`] (on the exec connection).
#[derive(Debug)]
pub struct StdinWriter {
    w: Writer,
}

impl StdinWriter {
    /// Sends bytes to the process's stdin (needs `spec.stdin`).
    pub async fn send(&mut self, data: &[u8]) -> Result<()> {
        frame::write_data(&mut self.w, data)
            .await
            .map_err(Into::into)
    }

    /// Closes the process's stdin.
    pub async fn close(&mut self) -> Result<()> {
        frame::write_end(&mut self.w).await.map_err(Into::into)
    }

    /// Sends a control message on the exec connection.
    pub async fn control(&mut self, c: &Control) -> Result<()> {
        frame::write_json(&mut self.w, c).await.map_err(Into::into)
    }
}

/// A started process. Dropping it detaches: the process keeps running.
#[derive(Debug)]
pub struct ExecStream {
    pid: String,
    os_pid: u32,
    replies: ReplyStream,
    stdin: StdinWriter,
}

impl ExecStream {
    /// kilnd's id of the process (for `attach`, `stdin`, `signal`).
    pub fn pid(&self) -> &str {
        &self.pid
    }

    /// The Linux pid inside the sandbox.
    pub fn os_pid(&self) -> u32 {
        self.os_pid
    }

    /// The next `Output` or `Exited`; `None` after `Exited` or for a detached exec.
    pub async fn next(&mut self) -> Option<Result<Reply>> {
        self.replies.next().await
    }

    /// Sends bytes to the process's stdin (needs `spec.stdin`).
    pub async fn send_stdin(&mut self, data: &[u8]) -> Result<()> {
        self.stdin.send(data).await
    }

    /// Closes the process's stdin.
    pub async fn close_stdin(&mut self) -> Result<()> {
        self.stdin.close().await
    }

    /// Answers a `CredentialRequest` (`None` declines); see `ExecSpec::credentials`.
    pub async fn answer_credential(
        &mut self,
        id: u64,
        fields: Option<std::collections::BTreeMap<String, String>>,
    ) -> Result<()> {
        self.stdin
            .control(&Control::Credential { id, fields })
            .await
    }

    /// Splits into the reply stream and the stdin writer, to use them concurrently.
    pub fn into_split(self) -> (ReplyStream, StdinWriter) {
        (self.replies, self.stdin)
    }
}

/// What a PTY session produces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PtyEvent {
    /// Terminal output.
    Output(Bytes),
    /// The session's process ended (the stream ends after this).
    Exited(ExitStatus),
}

/// An attached PTY session. Dropping it detaches; the session keeps running.
#[derive(Debug)]
pub struct PtySession {
    id: String,
    os_pid: u32,
    reader: PtyReader,
    writer: PtyWriter,
}

impl PtySession {
    /// kilnd's id of the session (for `pty_attach`).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The Linux pid of the session's process.
    pub fn os_pid(&self) -> u32 {
        self.os_pid
    }

    /// The next output chunk or the exit; `None` after `Exited`.
    pub async fn next(&mut self) -> Option<Result<PtyEvent>> {
        self.reader.next().await
    }

    /// Types bytes into the terminal.
    pub async fn input(&mut self, data: &[u8]) -> Result<()> {
        self.writer.input(data).await
    }

    /// Resizes the terminal.
    pub async fn resize(&mut self, cols: u16, rows: u16) -> Result<()> {
        self.writer.resize(cols, rows).await
    }

    /// Sends a signal to the session's process group.
    pub async fn signal(&mut self, signal: i32) -> Result<()> {
        self.writer.signal(signal).await
    }

    /// Splits into an output reader and an input writer, to pump both directions concurrently.
    pub fn into_split(self) -> (PtyReader, PtyWriter) {
        (self.reader, self.writer)
    }
}

/// Output half of a [`PtySession`].
pub struct PtyReader {
    inner: BoxStream<'static, Result<PtyEvent>>,
}

impl std::fmt::Debug for PtyReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PtyReader")
    }
}

impl PtyReader {
    fn new(r: Reader) -> Self {
        let inner = stream::unfold((r, false), |(mut r, ended)| async move {
            if ended {
                return None;
            }
            loop {
                let item = match frame::read_frame(&mut r).await {
                    Ok(Some(Frame::Data(d))) => Ok(PtyEvent::Output(d)),
                    Ok(Some(f @ Frame::Json(_))) => match f.parse::<Reply>() {
                        Ok(Reply::Exited(s)) => return Some((Ok(PtyEvent::Exited(s)), (r, true))),
                        Ok(Reply::Error(e)) => Err(ClientError::Daemon(e)),
                        Ok(_) => continue,
                        Err(e) => Err(ClientError::Protocol(e.to_string())),
                    },
                    Ok(Some(Frame::End)) => continue,
                    Ok(None) => Err(ClientError::Protocol(
                        "kilnd closed the PTY connection".into(),
                    )),
                    Err(e) => Err(ClientError::Io(e)),
                };
                let ended = item.is_err();
                return Some((item, (r, ended)));
            }
        });
        PtyReader {
            inner: inner.boxed(),
        }
    }

    /// The next output chunk or the exit; `None` after `Exited`.
    pub async fn next(&mut self) -> Option<Result<PtyEvent>> {
        self.inner.next().await
    }
}

impl Stream for PtyReader {
    type Item = Result<PtyEvent>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

/// Input half of a [`PtySession`].
#[derive(Debug)]
pub struct PtyWriter {
    w: Writer,
}

impl PtyWriter {
    /// Types bytes into the terminal.
    pub async fn input(&mut self, data: &[u8]) -> Result<()> {
        frame::write_data(&mut self.w, data)
            .await
            .map_err(Into::into)
    }

    /// Resizes the terminal.
    pub async fn resize(&mut self, cols: u16, rows: u16) -> Result<()> {
        frame::write_json(&mut self.w, &Control::Resize { cols, rows })
            .await
            .map_err(Into::into)
    }

    /// Sends a signal to the session's process group.
    pub async fn signal(&mut self, signal: i32) -> Result<()> {
        frame::write_json(&mut self.w, &Control::Signal { signal })
            .await
            .map_err(Into::into)
    }
}

/// The bytes of a file being read. Ends after the daemon's `End`; a connection that ends
/// early yields an `UnexpectedEof` error, so truncation is never silent.
pub struct DataStream {
    inner: BoxStream<'static, io::Result<Bytes>>,
}

impl std::fmt::Debug for DataStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataStream")
    }
}

impl DataStream {
    fn new(r: Reader) -> Self {
        let inner = stream::unfold((r, false), |(mut r, ended)| async move {
            if ended {
                return None;
            }
            let item = match frame::read_frame(&mut r).await {
                Ok(Some(Frame::Data(d))) => return Some((Ok(d), (r, false))),
                Ok(Some(Frame::End)) => return None,
                Ok(Some(f @ Frame::Json(_))) => match f.parse::<Reply>() {
                    Ok(Reply::Error(e)) => io::Error::other(e.message),
                    Ok(other) => io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("unexpected reply {other:?}"),
                    ),
                    Err(e) => e,
                },
                Ok(None) => io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "kilnd closed the connection mid-file",
                ),
                Err(e) => e,
            };
            Some((Err(item), (r, true)))
        });
        DataStream {
            inner: inner.boxed(),
        }
    }

    /// The next chunk; `None` at the end of the file.
    pub async fn next_chunk(&mut self) -> Option<io::Result<Bytes>> {
        self.inner.next().await
    }
}

impl Stream for DataStream {
    type Item = io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

/// Changes under a watched path, until dropped.
/// Updates of [`Client::watch_ports`]: the whole list each time it changes.
pub struct PortsStream {
    inner: BoxStream<'static, Result<Vec<ListenPort>>>,
}

impl std::fmt::Debug for PortsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PortsStream")
    }
}

impl PortsStream {
    /// The next list; `None` once the stream failed.
    pub async fn next(&mut self) -> Option<Result<Vec<ListenPort>>> {
        self.inner.next().await
    }
}

/// A TCP connection inside a sandbox, carried over kilnd's socket ([`Client::connect`]).
#[derive(Debug)]
pub struct Tunnel {
    early: Vec<u8>,
    pos: usize,
    stream: UnixStream,
}

impl AsyncRead for Tunnel {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pos < self.early.len() {
            let n = buf.remaining().min(self.early.len() - self.pos);
            let start = self.pos;
            buf.put_slice(&self.early[start..start + n]);
            self.pos += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Tunnel {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

pub struct WatchStream {
    inner: BoxStream<'static, Result<WatchEvent>>,
}

impl std::fmt::Debug for WatchStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WatchStream")
    }
}

impl WatchStream {
    fn new(r: Reader) -> Self {
        let inner = stream::unfold((r, false), |(mut r, ended)| async move {
            if ended {
                return None;
            }
            let item = match read_reply(&mut r).await {
                Ok(Reply::Watch(ev)) => return Some((Ok(ev), (r, false))),
                Ok(Reply::Error(e)) => ClientError::Daemon(e),
                Ok(other) => unexpected(&other),
                Err(e) => e,
            };
            Some((Err(item), (r, true)))
        });
        WatchStream {
            inner: inner.boxed(),
        }
    }

    /// The next event; `None` once the stream failed.
    pub async fn next(&mut self) -> Option<Result<WatchEvent>> {
        self.inner.next().await
    }
}

impl Stream for WatchStream {
    type Item = Result<WatchEvent>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}
