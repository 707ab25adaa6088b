//! The SFTP subsystem of the SSH front door, mapped onto kilnd's file operations (stat, list,
//! mkdir, move, remove and the streaming read and atomic write). kilnd streams whole files,
//! so a handle is a stream: reads are served in order (a backwards seek re-opens the file, a
//! forward one skips), and a file opened for writing is written with one atomic `WriteFile`
//! fed in offset order, published when the handle is closed. That is what `scp`, `sftp
//! get/put` and IDEs do; rewriting a part of an existing file is refused (`op unsupported`).

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use kiln_protocol::kilnd::{DaemonErrorCode, FileKind, FileStat};
use kilnd::client::{Client, ClientError, DataStream};
use russh_sftp::protocol::{
    Attrs, Data, File, FileAttributes, Handle, Name, OpenFlags, Status, StatusCode, Version,
};
use russh_sftp::server::StatusReply;
use tokio::sync::{mpsc, oneshot};

/// Out-of-order write data held per handle before it is refused.
const MAX_PENDING: usize = 64 << 20;

/// An SFTP session on one sandbox.
pub struct Sftp {
    client: Client,
    home: String,
    handles: HashMap<String, Open>,
    next: u64,
}

enum Open {
    Dir(Option<Vec<FileStat>>),
    Read(Reader),
    Write(Writer),
}

struct Reader {
    path: String,
    stream: DataStream,
    /// File offset of the first byte of `buf`.
    pos: u64,
    buf: Bytes,
    eof: bool,
}

struct Writer {
    path: String,
    /// Bytes handed to kilnd so far (the next in-order offset).
    next: u64,
    pending: BTreeMap<u64, Vec<u8>>,
    pending_bytes: usize,
    tx: Option<mpsc::Sender<std::io::Result<Bytes>>>,
    done: Option<oneshot::Receiver<Result<FileStat, ClientError>>>,
    failed: Option<String>,
    /// `fsetstat` before the file exists: applied once it is written.
    attrs: Option<FileAttributes>,
}

/// Applies SFTP attributes (mode, owner, times, size) with the sandbox's own `chmod`,
/// `chown`, `touch` and `truncate`, so they behave exactly as inside the sandbox.
async fn apply_attrs(client: &Client, path: &str, a: &FileAttributes) -> Result<(), StatusReply> {
    let mut cmds: Vec<Vec<String>> = Vec::new();
    if let Some(size) = a.size {
        cmds.push(vec!["truncate".into(), "-s".into(), size.to_string()]);
    }
    if let (Some(u), Some(g)) = (a.uid, a.gid) {
        cmds.push(vec!["chown".into(), "-h".into(), format!("{u}:{g}")]);
    }
    if let Some(m) = a.permissions {
        cmds.push(vec!["chmod".into(), format!("{:o}", m & 0o7777)]);
    }
    if let Some(t) = a.mtime {
        cmds.push(vec![
            "touch".into(),
            "-m".into(),
            "-d".into(),
            format!("@{t}"),
        ]);
    }
    if let Some(t) = a.atime {
        cmds.push(vec![
            "touch".into(),
            "-a".into(),
            "-d".into(),
            format!("@{t}"),
        ]);
    }
    for mut cmd in cmds {
        cmd.push("--".into());
        cmd.push(path.to_string());
        let spec = kiln_protocol::kilnd::ExecSpec {
            cmd,
            tag: Some("sftp-setstat".into()),
            ..Default::default()
        };
        let mut exec = client.exec(spec).await.map_err(daemon)?;
        let mut stderr = Vec::new();
        let mut ok = false;
        while let Some(r) = exec.next().await {
            match r.map_err(daemon)? {
                kiln_protocol::kilnd::Reply::Output { data, .. } => stderr.extend(data),
                kiln_protocol::kilnd::Reply::Exited(st) => {
                    ok = st.exit_code == Some(0);
                    break;
                }
                _ => {}
            }
        }
        if !ok {
            return Err(err(
                StatusCode::Failure,
                String::from_utf8_lossy(&stderr).trim().to_string(),
            ));
        }
    }
    Ok(())
}

fn err(code: StatusCode, msg: impl Into<String>) -> StatusReply {
    StatusReply::new(code).with_message(msg)
}

fn daemon(e: ClientError) -> StatusReply {
    let code = match e.code() {
        Some(DaemonErrorCode::NotFound) => StatusCode::NoSuchFile,
        Some(DaemonErrorCode::PermissionDenied) => StatusCode::PermissionDenied,
        _ => StatusCode::Failure,
    };
    err(code, e.to_string())
}

fn ok(id: u32) -> Status {
    Status {
        id,
        status_code: StatusCode::Ok,
        error_message: "Ok".into(),
        language_tag: "en-US".into(),
    }
}

fn attrs(s: &FileStat) -> FileAttributes {
    let kind = match s.kind {
        FileKind::Dir => 0o040000,
        FileKind::File => 0o100000,
        FileKind::Symlink => 0o120000,
        FileKind::Other => 0,
    };
    let mtime = u32::try_from(s.modified_ms / 1000).unwrap_or(u32::MAX);
    FileAttributes {
        size: Some(s.size),
        uid: Some(s.uid),
        user: None,
        gid: Some(s.gid),
        group: None,
        permissions: Some(kind | (s.mode & 0o7777)),
        atime: Some(mtime),
        mtime: Some(mtime),
    }
}

/// Lexically resolves `path` against `base` (`.` and `..` folded; never above `/`).
pub fn resolve(base: &str, path: &str) -> String {
    let joined = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("{base}/{path}")
    };
    let mut parts: Vec<&str> = Vec::new();
    for p in joined.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    format!("/{}", parts.join("/"))
}

/// The home directory of `root` in the sandbox's `/etc/passwd` (`/root` if unreadable).
async fn root_home(client: &Client) -> String {
    let mut text = Vec::new();
    if let Ok((_, mut data)) = client.read_file("/etc/passwd").await {
        while let Some(Ok(chunk)) = data.next_chunk().await {
            text.extend_from_slice(&chunk);
            if text.len() > 1 << 20 {
                break;
            }
        }
    }
    String::from_utf8_lossy(&text)
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.first() == Some(&"root") && f.len() >= 6).then(|| f[5].to_string())
        })
        .filter(|h| h.starts_with('/'))
        .unwrap_or_else(|| "/root".into())
}

impl Sftp {
    pub async fn new(client: Client) -> Self {
        let home = root_home(&client).await;
        Self {
            client,
            home,
            handles: HashMap::new(),
            next: 0,
        }
    }

    fn path(&self, p: &str) -> String {
        resolve(&self.home, p)
    }

    fn insert(&mut self, open: Open) -> String {
        self.next += 1;
        let h = format!("h{}", self.next);
        self.handles.insert(h.clone(), open);
        h
    }

    fn handle(&mut self, h: &str) -> Result<&mut Open, StatusReply> {
        self.handles
            .get_mut(h)
            .ok_or_else(|| err(StatusCode::Failure, format!("unknown handle {h}")))
    }

    fn start_write(&self, path: &str, mode: Option<u32>) -> Writer {
        let (tx, mut rx) = mpsc::channel::<std::io::Result<Bytes>>(16);
        let (done_tx, done) = oneshot::channel();
        let (client, p) = (self.client.clone(), path.to_string());
        tokio::spawn(async move {
            let body = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
            let reader = tokio_util::io::StreamReader::new(body);
            let r = client.write_file(&p, mode, false, reader).await;
            let _ = done_tx.send(r);
        });
        Writer {
            path: path.to_string(),
            next: 0,
            pending: BTreeMap::new(),
            pending_bytes: 0,
            tx: Some(tx),
            done: Some(done),
            failed: None,
            attrs: None,
        }
    }
}

impl Reader {
    /// Up to `len` bytes at `offset` (empty at end of file).
    async fn read_at(
        &mut self,
        client: &Client,
        offset: u64,
        len: usize,
    ) -> Result<Vec<u8>, StatusReply> {
        if offset < self.pos {
            let (_, stream) = client.read_file(&self.path).await.map_err(daemon)?;
            self.stream = stream;
            self.pos = 0;
            self.buf = Bytes::new();
            self.eof = false;
        }
        let mut out = Vec::with_capacity(len.min(1 << 20));
        loop {
            let end = self.pos + self.buf.len() as u64;
            if offset < end {
                let start = (offset.max(self.pos) - self.pos) as usize;
                let want = len - out.len();
                let take = (self.buf.len() - start).min(want);
                out.extend_from_slice(&self.buf[start..start + take]);
                if out.len() == len {
                    return Ok(out);
                }
            }
            if self.eof {
                return Ok(out);
            }
            // Everything buffered is before `offset + out.len()`: read on.
            self.pos = end;
            match self.stream.next_chunk().await {
                Some(Ok(b)) => self.buf = b,
                Some(Err(e)) => return Err(err(StatusCode::Failure, e.to_string())),
                None => {
                    self.buf = Bytes::new();
                    self.eof = true;
                }
            }
        }
    }
}

impl Writer {
    async fn write_at(&mut self, offset: u64, data: Vec<u8>) -> Result<(), StatusReply> {
        if let Some(f) = &self.failed {
            return Err(err(StatusCode::Failure, f.clone()));
        }
        if offset < self.next {
            return Err(err(
                StatusCode::OpUnsupported,
                "rewriting bytes already written is not supported (Kiln writes files whole)",
            ));
        }
        self.pending_bytes += data.len();
        self.pending.insert(offset, data);
        if self.pending_bytes > MAX_PENDING {
            self.failed = Some("too much out-of-order data".into());
            return Err(err(StatusCode::Failure, "too much out-of-order write data"));
        }
        while let Some(chunk) = self.pending.remove(&self.next) {
            self.pending_bytes -= chunk.len();
            self.next += chunk.len() as u64;
            let Some(tx) = &self.tx else { break };
            if tx.send(Ok(Bytes::from(chunk))).await.is_err() {
                self.failed = Some("the sandbox refused the file".into());
                return Err(err(StatusCode::Failure, "the sandbox refused the file"));
            }
        }
        Ok(())
    }

    async fn finish(mut self, client: &Client) -> Result<(), StatusReply> {
        let gap = !self.pending.is_empty();
        if gap {
            // Dropping the stream with an error makes kilnd discard the file.
            if let Some(tx) = &self.tx {
                let _ = tx
                    .send(Err(std::io::Error::other("hole in the written data")))
                    .await;
            }
        }
        self.tx = None;
        let r = match self.done.take() {
            Some(d) => d
                .await
                .map_err(|_| err(StatusCode::Failure, "write task ended"))?,
            None => return Ok(()),
        };
        if gap {
            return Err(err(
                StatusCode::Failure,
                format!(
                    "{}: the written data has holes; nothing was written",
                    self.path
                ),
            ));
        }
        r.map_err(daemon)?;
        match &self.attrs {
            Some(a) => apply_attrs(client, &self.path, a).await,
            None => Ok(()),
        }
    }
}

impl russh_sftp::server::Handler for Sftp {
    type Error = StatusReply;

    fn unimplemented(&self) -> Self::Error {
        err(
            StatusCode::OpUnsupported,
            "not supported by Kiln's SFTP server",
        )
    }

    async fn init(
        &mut self,
        _version: u32,
        _extensions: HashMap<String, String>,
    ) -> Result<Version, Self::Error> {
        Ok(Version::new())
    }

    async fn realpath(&mut self, id: u32, path: String) -> Result<Name, Self::Error> {
        Ok(Name {
            id,
            files: vec![File::dummy(self.path(&path))],
        })
    }

    async fn stat(&mut self, id: u32, path: String) -> Result<Attrs, Self::Error> {
        let s = self.client.stat(&self.path(&path)).await.map_err(daemon)?;
        Ok(Attrs {
            id,
            attrs: attrs(&s),
        })
    }

    async fn lstat(&mut self, id: u32, path: String) -> Result<Attrs, Self::Error> {
        self.stat(id, path).await
    }

    async fn fstat(&mut self, id: u32, handle: String) -> Result<Attrs, Self::Error> {
        let path = match self.handle(&handle)? {
            Open::Read(r) => r.path.clone(),
            Open::Write(w) => w.path.clone(),
            Open::Dir(_) => return Err(self.unimplemented()),
        };
        self.stat(id, path).await
    }

    async fn opendir(&mut self, id: u32, path: String) -> Result<Handle, Self::Error> {
        let p = self.path(&path);
        let entries = self.client.list_dir(&p, 1).await.map_err(daemon)?;
        Ok(Handle {
            id,
            handle: self.insert(Open::Dir(Some(entries))),
        })
    }

    async fn readdir(&mut self, id: u32, handle: String) -> Result<Name, Self::Error> {
        match self.handle(&handle)? {
            Open::Dir(entries) => match entries.take() {
                Some(list) => Ok(Name {
                    id,
                    files: list.iter().map(|e| File::new(&e.name, attrs(e))).collect(),
                }),
                None => Err(StatusCode::Eof.into()),
            },
            _ => Err(err(StatusCode::Failure, "not a directory handle")),
        }
    }

    async fn open(
        &mut self,
        id: u32,
        filename: String,
        pflags: OpenFlags,
        attrs_in: FileAttributes,
    ) -> Result<Handle, Self::Error> {
        let path = self.path(&filename);
        if pflags.contains(OpenFlags::WRITE) {
            let existing = match self.client.stat(&path).await {
                Ok(s) => Some(s),
                Err(e) if e.code() == Some(DaemonErrorCode::NotFound) => None,
                Err(e) => return Err(daemon(e)),
            };
            if let Some(s) = &existing {
                if pflags.contains(OpenFlags::EXCLUDE) {
                    return Err(err(StatusCode::Failure, format!("{path} exists")));
                }
                if s.kind == FileKind::Dir {
                    return Err(err(StatusCode::Failure, format!("{path} is a directory")));
                }
                if !pflags.contains(OpenFlags::TRUNCATE) && s.size > 0 {
                    return Err(err(
                        StatusCode::OpUnsupported,
                        "Kiln writes files whole: open with truncate (appending or patching an existing file is not supported)",
                    ));
                }
            } else if !pflags.contains(OpenFlags::CREATE) {
                return Err(err(
                    StatusCode::NoSuchFile,
                    format!("{path} does not exist"),
                ));
            }
            let mode = attrs_in
                .permissions
                .map(|m| m & 0o7777)
                .or(existing.map(|s| s.mode & 0o7777));
            let w = self.start_write(&path, mode);
            return Ok(Handle {
                id,
                handle: self.insert(Open::Write(w)),
            });
        }
        let (stat, stream) = self.client.read_file(&path).await.map_err(daemon)?;
        if stat.kind == FileKind::Dir {
            return Err(err(StatusCode::Failure, format!("{path} is a directory")));
        }
        Ok(Handle {
            id,
            handle: self.insert(Open::Read(Reader {
                path,
                stream,
                pos: 0,
                buf: Bytes::new(),
                eof: false,
            })),
        })
    }

    async fn read(
        &mut self,
        id: u32,
        handle: String,
        offset: u64,
        len: u32,
    ) -> Result<Data, Self::Error> {
        let client = self.client.clone();
        let Open::Read(r) = self.handle(&handle)? else {
            return Err(err(StatusCode::Failure, "not opened for reading"));
        };
        let data = r
            .read_at(&client, offset, len.min(1 << 20) as usize)
            .await?;
        if data.is_empty() {
            return Err(StatusCode::Eof.into());
        }
        Ok(Data { id, data })
    }

    async fn write(
        &mut self,
        id: u32,
        handle: String,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<Status, Self::Error> {
        let Open::Write(w) = self.handle(&handle)? else {
            return Err(err(StatusCode::Failure, "not opened for writing"));
        };
        w.write_at(offset, data).await?;
        Ok(ok(id))
    }

    async fn close(&mut self, id: u32, handle: String) -> Result<Status, Self::Error> {
        match self.handles.remove(&handle) {
            Some(Open::Write(w)) => w.finish(&self.client).await.map(|()| ok(id)),
            Some(_) => Ok(ok(id)),
            None => Err(err(StatusCode::Failure, format!("unknown handle {handle}"))),
        }
    }

    async fn setstat(
        &mut self,
        id: u32,
        path: String,
        attrs: FileAttributes,
    ) -> Result<Status, Self::Error> {
        apply_attrs(&self.client, &self.path(&path), &attrs).await?;
        Ok(ok(id))
    }

    async fn fsetstat(
        &mut self,
        id: u32,
        handle: String,
        attrs: FileAttributes,
    ) -> Result<Status, Self::Error> {
        let path = match self.handle(&handle)? {
            Open::Write(w) => {
                // The file appears when the handle closes; apply then (last call wins).
                w.attrs = Some(attrs);
                return Ok(ok(id));
            }
            Open::Read(r) => r.path.clone(),
            Open::Dir(_) => return Err(self.unimplemented()),
        };
        apply_attrs(&self.client, &path, &attrs).await?;
        Ok(ok(id))
    }

    async fn mkdir(
        &mut self,
        id: u32,
        path: String,
        _attrs: FileAttributes,
    ) -> Result<Status, Self::Error> {
        self.client
            .mkdir(&self.path(&path), false)
            .await
            .map_err(daemon)?;
        Ok(ok(id))
    }

    async fn rmdir(&mut self, id: u32, path: String) -> Result<Status, Self::Error> {
        let p = self.path(&path);
        let s = self.client.stat(&p).await.map_err(daemon)?;
        if s.kind != FileKind::Dir {
            return Err(err(StatusCode::Failure, format!("{p} is not a directory")));
        }
        self.client.remove(&p, false).await.map_err(daemon)?;
        Ok(ok(id))
    }

    async fn remove(&mut self, id: u32, filename: String) -> Result<Status, Self::Error> {
        let p = self.path(&filename);
        let s = self.client.stat(&p).await.map_err(daemon)?;
        if s.kind == FileKind::Dir {
            return Err(err(StatusCode::Failure, format!("{p} is a directory")));
        }
        self.client.remove(&p, false).await.map_err(daemon)?;
        Ok(ok(id))
    }

    async fn rename(
        &mut self,
        id: u32,
        oldpath: String,
        newpath: String,
    ) -> Result<Status, Self::Error> {
        self.client
            .move_path(&self.path(&oldpath), &self.path(&newpath), false)
            .await
            .map_err(daemon)?;
        Ok(ok(id))
    }

    async fn readlink(&mut self, id: u32, path: String) -> Result<Name, Self::Error> {
        let s = self.client.stat(&self.path(&path)).await.map_err(daemon)?;
        match s.symlink_target {
            Some(t) => Ok(Name {
                id,
                files: vec![File::dummy(t)],
            }),
            None => Err(err(StatusCode::Failure, "not a symbolic link")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::resolve;

    #[test]
    fn paths_resolve_against_home() {
        let cases = [
            (".", "/root"),
            ("", "/root"),
            ("a/b", "/root/a/b"),
            ("../etc/./passwd", "/etc/passwd"),
            ("/x/../../y", "/y"),
            ("/", "/"),
        ];
        for (p, want) in cases {
            assert_eq!(resolve("/root", p), want, "{p}");
        }
    }
}
