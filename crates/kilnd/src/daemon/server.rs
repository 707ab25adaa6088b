//! The protocol server: accepts connections and runs one conversation per connection (see
//! `kiln_protocol::kilnd` for what each request looks like on the wire).

use std::io;
use std::sync::Arc;

use bytes::Bytes;
use kiln_protocol::kilnd::{
    Control, DaemonError, DaemonErrorCode, ExecSpec, OkBody, PtySpec, Reply, Request, MAX_FRAME,
};
use kilnd::frame::{self, Frame, DATA_CHUNK};
use tokio::io::{AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;

use super::files::{self, err, AtomicWriter};
use super::procs::{Proc, Procs};
use super::pty::{Pty, Ptys};
use super::ring::{Event, Subscription};
use super::watch::Watcher;

type Reader = BufReader<OwnedReadHalf>;
type Writer = OwnedWriteHalf;

/// Shared state of the daemon.
#[derive(Debug)]
pub struct Daemon {
    pub procs: Arc<Procs>,
    pub ptys: Arc<Ptys>,
    /// Directory of kilnd's socket (credential relay sockets go there too).
    pub run_dir: std::path::PathBuf,
}

/// Accepts connections forever.
pub async fn serve(listener: UnixListener, daemon: Arc<Daemon>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let d = daemon.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle(&d, stream).await {
                        tracing::debug!("connection ended: {e}");
                    }
                });
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!("accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn reply<W: AsyncWrite + Unpin>(w: &mut W, r: &Reply) -> io::Result<()> {
    let mut buf = Vec::new();
    if let Err(e) = frame::encode_json(&mut buf, r) {
        // Too large for one frame (e.g. a huge listing): say so instead.
        buf.clear();
        let msg = format!("reply too large for one frame ({e}, limit {MAX_FRAME} bytes)");
        frame::encode_json(&mut buf, &Reply::Error(err(DaemonErrorCode::Invalid, msg)))?;
    }
    w.write_all(&buf).await
}

async fn reply_result<W: AsyncWrite + Unpin>(
    w: &mut W,
    r: Result<Option<OkBody>, DaemonError>,
) -> io::Result<()> {
    match r {
        Ok(body) => reply(w, &Reply::Ok { body }).await,
        Err(e) => reply(w, &Reply::Error(e)).await,
    }
}

/// Runs blocking file-system work off the runtime thread.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, DaemonError> + Send + 'static,
) -> Result<T, DaemonError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(err(
            DaemonErrorCode::Internal,
            format!("worker failed: {e}"),
        ))
    })
}

async fn handle(d: &Daemon, stream: UnixStream) -> io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::with_capacity(DATA_CHUNK + 16, r);
    let req = match frame::read_frame(&mut r).await {
        Ok(Some(f)) => f.parse::<Request>(),
        Ok(None) => return Ok(()),
        Err(e) => Err(e),
    };
    let req = match req {
        Ok(req) => req,
        Err(e) => {
            let msg = format!("malformed request: {e}");
            return reply(&mut w, &Reply::Error(err(DaemonErrorCode::Invalid, msg))).await;
        }
    };
    tracing::trace!(?req, "request");
    match req {
        Request::Ping => {
            reply_result(
                &mut w,
                Ok(Some(OkBody::Pong {
                    version: kilnd::VERSION.to_string(),
                })),
            )
            .await
        }
        Request::Exec { spec } => exec(d, spec, &mut r, &mut w).await,
        Request::Attach { pid, after_seq } => match d.procs.get(&pid) {
            Ok(proc) => {
                let sub = proc.ring.subscribe(after_seq);
                follow(&proc, sub, &mut r, &mut w, false, None).await
            }
            Err(e) => reply(&mut w, &Reply::Error(e)).await,
        },
        Request::Stdin { pid, close } => stdin(d, &pid, close, &mut r, &mut w).await,
        Request::Signal { pid, signal } => {
            let res = d.procs.get(&pid).and_then(|p| {
                if p.ring.finished().is_some() {
                    Ok(()) // already exited: nothing to do
                } else {
                    super::procs::signal_group(p.os_pid, signal)
                }
            });
            reply_result(&mut w, res.map(|()| None)).await
        }
        Request::ListProcesses => {
            reply_result(
                &mut w,
                Ok(Some(OkBody::Processes {
                    processes: d.procs.list(),
                })),
            )
            .await
        }
        Request::PtyOpen { spec } => pty_open(d, spec, &mut r, &mut w).await,
        Request::PtyAttach { id } => match d.ptys.get(&id) {
            Ok(pty) => {
                let sub = pty.ring.subscribe(0);
                pty_session(pty, sub, &mut r, &mut w).await
            }
            Err(e) => reply(&mut w, &Reply::Error(e)).await,
        },
        Request::ReadFile { path } => read_file(path, &mut w).await,
        Request::WriteFile {
            path,
            mode,
            parents,
        } => write_file(path, mode, parents, &mut r, &mut w).await,
        Request::ListDir { path, depth } => {
            let res = blocking(move || files::list_dir(&path, depth)).await;
            reply_result(&mut w, res.map(|entries| Some(OkBody::Entries { entries }))).await
        }
        Request::Stat { path } => {
            let res = blocking(move || files::stat(&path)).await;
            reply_result(&mut w, res.map(|s| Some(OkBody::Stat(s)))).await
        }
        Request::Mkdir { path, parents } => {
            let res = blocking(move || files::mkdir(&path, parents)).await;
            reply_result(&mut w, res.map(|s| Some(OkBody::Stat(s)))).await
        }
        Request::Move {
            from,
            to,
            overwrite,
        } => {
            let res = blocking(move || files::move_path(&from, &to, overwrite)).await;
            reply_result(&mut w, res.map(|s| Some(OkBody::Stat(s)))).await
        }
        Request::Remove { path, recursive } => {
            let res = blocking(move || files::remove(&path, recursive)).await;
            reply_result(&mut w, res.map(|()| None)).await
        }
        Request::ListPorts => {
            let res = blocking(super::ports::list).await;
            reply_result(&mut w, res.map(|ports| Some(OkBody::Ports { ports }))).await
        }
        Request::WatchPorts { interval_ms } => watch_ports(interval_ms, &mut r, &mut w).await,
        Request::Connect { port, host } => {
            let host = host.unwrap_or_else(|| "127.0.0.1".into());
            match super::ports::connect(&host, port).await {
                Ok(mut tcp) => {
                    let (early, mut unix) = go_raw(r, w).await?;
                    if !early.is_empty() {
                        tcp.write_all(&early).await?;
                    }
                    tokio::io::copy_bidirectional(&mut unix, &mut tcp).await?;
                    Ok(())
                }
                Err(e) => reply(&mut w, &Reply::Error(e)).await,
            }
        }
        Request::Pipe { spec } => match super::procs::spawn_piped(&d.procs, &spec) {
            Ok(mut p) => {
                let (early, mut unix) = go_raw(r, w).await?;
                let res = p.run(&early, &mut unix).await;
                p.kill().await;
                res
            }
            Err(e) => reply(&mut w, &Reply::Error(e)).await,
        },
        Request::Watch { path, recursive } => {
            match blocking(move || Watcher::arm(&path, recursive)).await {
                Ok(watcher) => {
                    reply(&mut w, &Reply::Ok { body: None }).await?;
                    watcher.run(&mut r, &mut w).await
                }
                Err(e) => reply(&mut w, &Reply::Error(e)).await,
            }
        }
    }
}

/// Replies `Ok` and hands back the connection as a raw stream, with the bytes the client
/// sent right behind its request (already in the read buffer) to be passed on first.
async fn go_raw(r: Reader, mut w: Writer) -> io::Result<(Vec<u8>, UnixStream)> {
    reply(&mut w, &Reply::Ok { body: None }).await?;
    let early = r.buffer().to_vec();
    let unix = r
        .into_inner()
        .reunite(w)
        .map_err(|e| io::Error::other(e.to_string()))?;
    Ok((early, unix))
}

/// `WatchPorts`: the list now, then again whenever it changes, until the client goes away.
async fn watch_ports(interval_ms: u32, r: &mut Reader, w: &mut Writer) -> io::Result<()> {
    let every = std::time::Duration::from_millis(u64::from(interval_ms.clamp(100, 10_000)));
    let mut last = match blocking(super::ports::list).await {
        Ok(ports) => {
            reply(
                w,
                &Reply::Ok {
                    body: Some(OkBody::Ports {
                        ports: ports.clone(),
                    }),
                },
            )
            .await?;
            ports
        }
        Err(e) => return reply(w, &Reply::Error(e)).await,
    };
    loop {
        tokio::select! {
            // Anything from the client (or EOF) ends the watch.
            _ = frame::read_frame(r) => return Ok(()),
            () = tokio::time::sleep(every) => {
                if let Ok(ports) = blocking(super::ports::list).await {
                    if ports != last {
                        reply(w, &Reply::Ports { ports: ports.clone() }).await?;
                        last = ports;
                    }
                }
            }
        }
    }
}

async fn exec(d: &Daemon, mut spec: ExecSpec, r: &mut Reader, w: &mut Writer) -> io::Result<()> {
    let accept_stdin = spec.stdin;
    let mut relay = None;
    if spec.credentials {
        if spec.detach {
            let e = err(
                DaemonErrorCode::Invalid,
                "credentials need an attached client to answer them (detach is set)",
            );
            return reply(w, &Reply::Error(e)).await;
        }
        let user = match super::users::resolve(spec.user.as_deref()) {
            Ok(u) => u,
            Err(e) => return reply(w, &Reply::Error(e)).await,
        };
        let (tx, rx) = mpsc::channel(4);
        match super::creds::Relay::start(&d.run_dir, user.uid, user.gid, &mut spec.env, tx) {
            Ok(r) => relay = Some((r, rx)),
            Err(e) => return reply(w, &Reply::Error(e)).await,
        }
    }
    let (proc, sub) = match d.procs.spawn(spec) {
        Ok(x) => x,
        Err(e) => return reply(w, &Reply::Error(e)).await,
    };
    reply(
        w,
        &Reply::Started {
            pid: proc.id.clone(),
            os_pid: proc.os_pid,
        },
    )
    .await?;
    let res = match sub {
        Some(sub) => {
            let creds = relay.as_mut().map(|(_, rx)| rx);
            follow(&proc, sub, r, w, accept_stdin, creds).await
        }
        None => Ok(()), // detached
    };
    drop(relay); // removes the relay socket
    res
}

/// Streams a process's output until it exits; meanwhile forwards stdin frames (exec
/// connections). The client going away ends the conversation, never the process.
async fn follow(
    proc: &Proc,
    mut sub: Subscription,
    r: &mut Reader,
    w: &mut Writer,
    accept_stdin: bool,
    mut creds: Option<&mut mpsc::Receiver<super::creds::Pending>>,
) -> io::Result<()> {
    type Waiting = std::collections::HashMap<
        u64,
        tokio::sync::oneshot::Sender<Option<std::collections::BTreeMap<String, String>>>,
    >;
    let waiting: std::sync::Mutex<Waiting> = Default::default();
    let mut next_id = 0u64;
    let input = async {
        loop {
            match frame::read_frame(r).await {
                Ok(Some(Frame::Data(data))) if accept_stdin => {
                    let mut stdin = proc.stdin.lock().await;
                    if let Some(pipe) = stdin.as_mut() {
                        if pipe.write_all(&data).await.is_err() {
                            *stdin = None; // the process closed its stdin
                        }
                    }
                }
                Ok(Some(Frame::End)) if accept_stdin => {
                    proc.stdin.lock().await.take();
                }
                Ok(Some(f @ Frame::Json(_))) => {
                    if let Ok(Control::Credential { id, fields }) = f.parse::<Control>() {
                        let tx = waiting.lock().ok().and_then(|mut m| m.remove(&id));
                        if let Some(tx) = tx {
                            let _ = tx.send(fields);
                        }
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return,
            }
        }
    };
    let output = async {
        loop {
            let mut buf = Vec::new();
            let pending = async {
                match creds.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            let ev = tokio::select! {
                ev = sub.next() => ev,
                Some(p) = pending => {
                    next_id += 1;
                    if let Ok(mut m) = waiting.lock() {
                        m.insert(next_id, p.answer);
                    }
                    let req = Reply::CredentialRequest { id: next_id, fields: p.fields };
                    frame::encode_json(&mut buf, &req)?;
                    w.write_all(&buf).await?;
                    continue;
                }
            };
            match ev {
                Event::Gap { from, to } => frame::encode_json(&mut buf, &Reply::Gap { from, to })?,
                Event::Chunks(chunks) => {
                    for c in chunks {
                        let out = Reply::Output {
                            seq: c.seq,
                            stream: c.stream,
                            data: c.data.to_vec(),
                        };
                        frame::encode_json(&mut buf, &out)?;
                    }
                }
                Event::Finished(status) => {
                    frame::encode_json(&mut buf, &Reply::Exited(status))?;
                    w.write_all(&buf).await?;
                    return Ok(());
                }
            }
            w.write_all(&buf).await?;
        }
    };
    tokio::select! {
        res = output => res,
        () = input => Ok(()),
    }
}

async fn stdin(
    d: &Daemon,
    pid: &str,
    close: bool,
    r: &mut Reader,
    w: &mut Writer,
) -> io::Result<()> {
    let proc = match d.procs.get(pid) {
        Ok(p) => p,
        Err(e) => return reply(w, &Reply::Error(e)).await,
    };
    let mut guard = proc.stdin.lock().await;
    let Some(pipe) = guard.as_mut() else {
        let msg = format!("stdin of process {pid} is not open (start it with stdin: true)");
        return reply(w, &Reply::Error(err(DaemonErrorCode::Invalid, msg))).await;
    };
    loop {
        match frame::read_frame(r).await? {
            Some(Frame::Data(data)) => {
                if let Err(e) = pipe.write_all(&data).await {
                    *guard = None;
                    let msg = format!("writing to stdin of process {pid}: {e}");
                    return reply(w, &Reply::Error(err(DaemonErrorCode::Invalid, msg))).await;
                }
            }
            Some(Frame::End) => break,
            Some(Frame::Json(_)) => {
                let msg = "expected data frames and an end frame".to_string();
                return reply(w, &Reply::Error(err(DaemonErrorCode::Invalid, msg))).await;
            }
            None => return Ok(()),
        }
    }
    if close {
        *guard = None;
    }
    drop(guard);
    reply(w, &Reply::Ok { body: None }).await
}

async fn pty_open(d: &Daemon, spec: PtySpec, r: &mut Reader, w: &mut Writer) -> io::Result<()> {
    match d.ptys.open(&spec) {
        Ok((pty, sub)) => pty_session(pty, sub, r, w).await,
        Err(e) => reply(w, &Reply::Error(e)).await,
    }
}

async fn pty_session(
    pty: Arc<Pty>,
    mut sub: Subscription,
    r: &mut Reader,
    w: &mut Writer,
) -> io::Result<()> {
    reply(
        w,
        &Reply::PtyOpened {
            id: pty.id.clone(),
            os_pid: pty.os_pid,
        },
    )
    .await?;
    let input = async {
        loop {
            match frame::read_frame(r).await {
                Ok(Some(Frame::Data(data))) => {
                    if let Err(e) = pty.input(&data).await {
                        tracing::debug!(id = %pty.id, "PTY input: {e}");
                    }
                }
                Ok(Some(f @ Frame::Json(_))) => match f.parse::<Control>() {
                    Ok(Control::Resize { cols, rows }) => {
                        if let Err(e) = pty.resize(cols, rows) {
                            tracing::debug!(id = %pty.id, "{}", e.message);
                        }
                    }
                    Ok(Control::Signal { signal }) => {
                        if let Err(e) = pty.signal(signal) {
                            tracing::debug!(id = %pty.id, "{}", e.message);
                        }
                    }
                    Ok(Control::Credential { .. }) => {} // only for execs with credentials
                    Err(e) => tracing::debug!(id = %pty.id, "bad PTY control message: {e}"),
                },
                Ok(Some(Frame::End)) => {}
                Ok(None) | Err(_) => return,
            }
        }
    };
    let output = async {
        loop {
            let mut buf = Vec::new();
            match sub.next().await {
                Event::Gap { .. } => continue,
                Event::Chunks(chunks) => {
                    for c in chunks {
                        frame::encode_data(&mut buf, &c.data);
                    }
                }
                Event::Finished(status) => {
                    frame::encode_json(&mut buf, &Reply::Exited(status))?;
                    w.write_all(&buf).await?;
                    return Ok(());
                }
            }
            w.write_all(&buf).await?;
        }
    };
    tokio::select! {
        res = output => res,
        () = input => Ok(()),
    }
}

async fn read_file(path: String, w: &mut Writer) -> io::Result<()> {
    let (file, stat) = match blocking(move || files::open_read(&path)).await {
        Ok(x) => x,
        Err(e) => return reply(w, &Reply::Error(e)).await,
    };
    let stat_path = stat.path.clone();
    reply(
        w,
        &Reply::Ok {
            body: Some(OkBody::Stat(stat)),
        },
    )
    .await?;
    let (tx, mut rx) = mpsc::channel::<io::Result<Vec<u8>>>(4);
    tokio::task::spawn_blocking(move || {
        let mut file = file;
        loop {
            let item = files::read_chunk(&mut file, DATA_CHUNK);
            let stop = !matches!(item, Ok(Some(_)));
            let msg = match item {
                Ok(Some(chunk)) => Ok(chunk),
                Ok(None) => break,
                Err(e) => Err(e),
            };
            if tx.blocking_send(msg).is_err() || stop {
                break;
            }
        }
    });
    while let Some(item) = rx.recv().await {
        match item {
            Ok(chunk) => frame::write_data(w, &chunk).await?,
            Err(e) => {
                // Mid-stream failure: an error instead of the end frame.
                return reply(w, &Reply::Error(files::io_error(&e, &stat_path))).await;
            }
        }
    }
    frame::write_end(w).await
}

enum WriteMsg {
    Data(Bytes),
    End,
}

async fn write_file(
    path: String,
    mode: Option<u32>,
    parents: bool,
    r: &mut Reader,
    w: &mut Writer,
) -> io::Result<()> {
    let writer = match blocking(move || AtomicWriter::create(&path, mode, parents)).await {
        Ok(x) => x,
        Err(e) => return reply(w, &Reply::Error(e)).await,
    };
    let (tx, mut rx) = mpsc::channel::<WriteMsg>(8);
    let job = tokio::task::spawn_blocking(move || {
        let mut writer = writer;
        loop {
            match rx.blocking_recv() {
                Some(WriteMsg::Data(d)) => writer.write(&d)?,
                Some(WriteMsg::End) => return writer.commit().map(Some),
                // The client went away before `End`: dropping the writer removes the temp file.
                None => return Ok(None),
            }
        }
    });
    let mut protocol_error = None;
    loop {
        let msg = match frame::read_frame(r).await {
            Ok(Some(Frame::Data(d))) => WriteMsg::Data(d),
            Ok(Some(Frame::End)) => WriteMsg::End,
            Ok(Some(Frame::Json(_))) => {
                protocol_error = Some(err(
                    DaemonErrorCode::Invalid,
                    "expected data frames and an end frame",
                ));
                break;
            }
            Ok(None) | Err(_) => break,
        };
        let end = matches!(msg, WriteMsg::End);
        if tx.send(msg).await.is_err() || end {
            break; // the writer failed (its error is reported below) or we are done
        }
    }
    drop(tx);
    let res = job.await.unwrap_or_else(|e| {
        Err(err(
            DaemonErrorCode::Internal,
            format!("writer failed: {e}"),
        ))
    });
    match (protocol_error, res) {
        (Some(e), _) => reply(w, &Reply::Error(e)).await,
        (None, Ok(Some(stat))) => {
            reply(
                w,
                &Reply::Ok {
                    body: Some(OkBody::Stat(stat)),
                },
            )
            .await
        }
        (None, Ok(None)) => Ok(()), // client gone
        (None, Err(e)) => reply(w, &Reply::Error(e)).await,
    }
}
